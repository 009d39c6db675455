//! The HTTP JSON API of a running `basalt dev`.

use std::time::Duration;

use basalt_cluster_tests::Deployment;
use serde_json::{Value, json};

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.timeout(Duration::from_secs(30)).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not json ({status}): {text}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_query_and_errors_over_http() {
    let d = Deployment::dev().await;
    let c = reqwest::Client::new();
    let (s, _) = send(c.post(d.http("/v1/collections")).json(&json!({"name": "web.hits"}))).await;
    assert_eq!(s, 404, "workspace must exist first");
    let (s, _) = send(
        c.post(d.http("/v1/query"))
            .json(&json!({"sql": "CREATE WORKSPACE web; CREATE COLLECTION web.hits WITH (shards = 3)"})),
    )
    .await;
    assert_eq!(s, 200);

    // Per-document statuses; good documents land even when others fail.
    let docs = json!({"data": [{"_id": "h1", "path": "/", "ms": 12}, "not an object", {"path": "/about", "ms": 30}, {"_id": ["bad"]}]});
    let (s, body) = send(c.post(d.http("/v1/collections/web.hits/docs")).json(&docs)).await;
    assert_eq!(s, 200);
    let statuses: Vec<&str> = body["data"].as_array().unwrap().iter().map(|x| x["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["ok", "error", "ok", "error"]);
    assert_eq!(body["data"][1]["error"]["code"], "invalid_input");
    let generated = body["data"][2]["_id"].as_str().unwrap().to_string();
    assert_eq!(generated.len(), 32);
    assert!(!body["last_offset"].as_str().unwrap().is_empty());

    // Read your writes: the next query sees them.
    let q = json!({"sql": "SELECT _id, ms FROM web.hits WHERE ms > $1 ORDER BY ms", "params": [10]});
    let (s, body) = send(c.post(d.http("/v1/query")).json(&q)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["columns"][1], json!({"name": "ms", "type": "int8"}));
    assert_eq!(body["rows"], json!([["h1", 12], [generated, 30]]));
    assert!(body["timing"]["elapsed_ms"].as_f64().unwrap() >= 0.0);

    // Field-level patch, then delete.
    let patch = json!({"data": [
        {"_id": "h1", "patch": [{"op": "increment", "path": "/ms", "value": 5}, {"op": "add", "path": "/geo/city", "value": "Oslo"}]},
        {"_id": "h1", "patch": [{"op": "remove", "path": "/nope"}]},
        {"_id": "missing", "patch": [{"op": "add", "path": "/a", "value": 1}]},
        {"patch": []}
    ]});
    let (s, body) = send(c.patch(d.http("/v1/collections/web.hits/docs")).json(&patch)).await;
    assert_eq!(s, 200);
    let codes: Vec<Value> = body["data"].as_array().unwrap().iter().map(|x| x["error"]["code"].clone()).collect();
    assert_eq!(codes, [Value::Null, json!("invalid_input"), json!("not_found"), json!("invalid_input")]);
    let (_, body) =
        send(c.post(d.http("/v1/query")).json(&json!({"sql": "SELECT ms, geo.city FROM web.hits WHERE _id = 'h1'"})))
            .await;
    assert_eq!(body["rows"], json!([[17, "Oslo"]]));
    // An upsert patch creates a missing document (a counter starting at zero).
    let counter = json!({"data": [
        {"_id": "ctr", "upsert": true, "patch": [{"op": "increment", "path": "/n", "value": 2}, {"op": "max", "path": "/hi", "value": 7}]},
        {"_id": "ctr", "upsert": true, "patch": [{"op": "increment", "path": "/n", "value": 3}, {"op": "max", "path": "/hi", "value": 4}]}
    ]});
    let (s, body) = send(c.patch(d.http("/v1/collections/web.hits/docs")).json(&counter)).await;
    assert_eq!(s, 200, "{body}");
    let (_, body) =
        send(c.post(d.http("/v1/query")).json(&json!({"sql": "SELECT n, hi FROM web.hits WHERE _id = 'ctr'"}))).await;
    assert_eq!(body["rows"], json!([[5, 7]]));
    let (s, _) =
        send(c.delete(d.http("/v1/collections/web.hits/docs")).json(&json!({"data": [{"_id": "h1"}, {"_id": "ctr"}]})))
            .await;
    assert_eq!(s, 200);
    let (_, body) = send(c.post(d.http("/v1/query")).json(&json!({"sql": "SELECT count(*) AS n FROM web.hits"}))).await;
    assert_eq!(body["rows"], json!([[1]]));

    // Schema and stats.
    let (s, body) = send(c.get(d.http("/v1/collections/web.hits"))).await;
    assert_eq!(s, 200);
    assert_eq!(body["shards"], 3);
    assert_eq!(body["stats"]["documents"], 1);
    assert!(body["stats"]["fields"].as_array().unwrap().iter().any(|f| f["path"] == "ms" && f["types"]["int"] == 1));

    // Errors: JSON with a code and a fitting status.
    let (s, body) = send(c.get(d.http("/v1/collections/web.nope"))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, body) = send(c.post(d.http("/v1/collections/web.hits/docs")).body("{\"data\": [")).await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("invalid_input")));
    let (s, _) = send(c.post(d.http("/v1/collections/web.hits/docs")).body(vec![0xff, 0xfe, b'{'])).await;
    assert_eq!(s, 400);
    let (s, body) = send(c.post(d.http("/v1/query")).json(&json!({"sql": "SELECT * FROM"}))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("syntax_error")));
    let big = "x".repeat(11 * 1024 * 1024);
    let (s, body) =
        send(c.post(d.http("/v1/collections/web.hits/docs")).body(format!("{{\"data\": [\"{big}\"]}}"))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (413, Some("limit_exceeded")));
    let many: Vec<Value> = (0..20_001).map(|i| json!({"_id": i})).collect();
    let (s, body) = send(c.post(d.http("/v1/collections/web.hits/docs")).json(&json!({"data": many}))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (413, Some("limit_exceeded")));
    let (s, _) = send(c.get(d.http("/v1/nope"))).await;
    assert_eq!(s, 404);

    // The process is still healthy, and exports metrics.
    let metrics = c.get(d.http("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("basalt_leaf_write_ops_total"), "{metrics}");
    assert!(metrics.contains("basalt_http_request_seconds"));
}
