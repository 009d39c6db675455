//! Kafka sources against the `tansu` broker: a source ingests a 4-partition topic exactly once,
//! through kill -9 of the process that runs it.

use std::time::{Duration, Instant};

use basalt_cluster_tests::{Deployment, Kafka};
use serde_json::json;

async fn wait_count(pg: &tokio_postgres::Client, sql: &str, want: i64, what: &str) {
    let started = Instant::now();
    loop {
        let n: i64 = pg.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(-1);
        if n == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "{what}: {n} rows, want {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_ingests_exactly_once_through_kill_9() {
    let kafka = Kafka::start().await;
    kafka.create_topic("clicks", 4).await;
    const N: i64 = 4000;
    // Records with ids (some from the message key), one bad record per partition.
    let record = |i: i64| {
        let partition = (i % 4) as i32;
        if i % 2 == 0 {
            (
                partition,
                None,
                json!({"_id": format!("c{i}"), "n": i, "kind": if i % 10 == 0 { "rare" } else { "common" }})
                    .to_string(),
            )
        } else {
            (partition, Some(format!("c{i}")), json!({"n": i, "kind": "common"}).to_string())
        }
    };
    kafka.produce("clicks", (0..N / 2).map(record).collect()).await;
    kafka.produce("clicks", (0..4).map(|p| (p, None, "{not json".to_string())).collect()).await;

    let mut d = Deployment::dev().await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION clicks").await.unwrap();
    let create = format!(
        "CREATE SOURCE clicks_src FROM KAFKA (brokers = '{}', topic = 'clicks', format = 'json', start = 'earliest', \
         key_as_id = true) INTO clicks",
        kafka.brokers()
    );
    pg.batch_execute(&create).await.unwrap();
    let err = pg.batch_execute(&create).await.unwrap_err();
    let msg = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(msg.contains("already exists"), "{err:?}");
    wait_count(&pg, "SELECT count(*) FROM clicks", N / 2, "first half").await;

    // The second half arrives while the process is killed and restarted twice.
    for round in 0..2 {
        let half = N / 2 + round * N / 4;
        kafka.produce("clicks", (half..half + N / 8).map(record).collect()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        d.proc("dev").kill9();
        kafka.produce("clicks", (half + N / 8..half + N / 4).map(record).collect()).await;
        d.proc("dev").restart();
        basalt_cluster_tests::wait_http(&d.http("/healthz"), d.proc("dev")).await;
    }
    let pg = d.pg().await;
    wait_count(&pg, "SELECT count(*) FROM clicks", N, "all records").await;
    let row = pg.query_one("SELECT count(DISTINCT _id), sum(n) FROM clicks", &[]).await.unwrap();
    let (distinct, sum): (i64, i64) = (row.get(0), row.get(1));
    let rare: i64 = pg.query_one("SELECT count(*) FROM clicks WHERE kind = 'rare'", &[]).await.unwrap().get(0);
    assert_eq!((distinct, sum, rare), (N, (0..N).sum::<i64>(), N / 10));

    // Prometheus: documents, lag and data latency per source.
    let metrics = reqwest::get(d.http("/metrics")).await.unwrap().text().await.unwrap();
    for name in [
        "basalt_source_documents_total{result=\"ok\",source=\"commons.clicks_src\"}",
        "basalt_source_data_latency_seconds{source=\"commons.clicks_src\"}",
        "basalt_source_newest_event_time_seconds{source=\"commons.clicks_src\"}",
        "basalt_source_lag_records{",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    // SHOW SOURCES: four running partitions, nothing left to read, the bad records counted.
    let started = Instant::now();
    loop {
        let rows = pg.query("SHOW SOURCES", &[]).await.unwrap();
        let states: Vec<String> = rows.iter().map(|r| r.get::<_, String>("state")).collect();
        let lag: i64 = rows.iter().map(|r| r.get::<_, Option<i64>>("lag").unwrap_or(i64::MAX / 8)).sum();
        if rows.len() == 4 && states.iter().all(|s| s == "running") && lag == 0 {
            let errors: i64 = rows.iter().map(|r| r.get::<_, i64>("errors")).sum();
            // Bad records counted since the last restart (at least those read after it).
            assert!(errors <= 4, "errors {errors}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "SHOW SOURCES: {states:?}, lag {lag}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The bad records, one per partition, are in the errors collection with their position.
    let rows = pg
        .query("SELECT partition, \"offset\", payload, error FROM clicks_src_errors ORDER BY partition", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    for (p, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, i64>(0), p as i64);
        assert_eq!(row.get::<_, i64>(1), N / 8, "the bad record follows the first half's records");
        assert_eq!(row.get::<_, String>(2), "{not json");
        assert!(row.get::<_, String>(3).contains("malformed json"), "{}", row.get::<_, String>(3));
    }
    // SHOW statements through the extended protocol describe the rows they return.
    let rows = pg.query("SHOW COLLECTIONS", &[]).await.unwrap();
    assert!(rows.iter().any(|r| r.get::<_, String>("collection") == "clicks"));
    assert!(!pg.query("SHOW WORKSPACES", &[]).await.unwrap().is_empty());
    pg.batch_execute("DROP SOURCE clicks_src").await.unwrap();
    let rows = pg.query("SHOW SOURCES", &[]).await.unwrap();
    assert!(rows.is_empty());

    // The same over HTTP: create (bad requests get JSON errors), list with partitions, drop.
    let http = reqwest::Client::new();
    let kafka_spec = json!({"brokers": kafka.brokers(), "topic": "clicks", "start": "latest"});
    for (body, code) in [
        (json!({"name": "h", "collection": "clicks", "kafka": {"topic": "clicks"}}), 400),
        (json!({"name": "h", "collection": "clicks", "kafka": {"brokers": "b", "topic": "t", "password": "x"}}), 400),
        (json!({"name": "h", "collection": "nope", "kafka": kafka_spec.clone()}), 404),
    ] {
        let r = http.post(d.http("/v1/sources")).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), code, "{body}");
        let err: serde_json::Value = r.json().await.unwrap();
        assert!(err["error"]["code"].is_string(), "{err}");
    }
    let r = http
        .post(d.http("/v1/sources"))
        .json(&json!({"name": "h", "collection": "clicks", "kafka": kafka_spec}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let started = Instant::now();
    loop {
        let list: serde_json::Value = http.get(d.http("/v1/sources")).send().await.unwrap().json().await.unwrap();
        let data = list["data"].as_array().unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0]["source"]["name"]["name"], "h");
        if data[0]["partitions"].as_array().unwrap().len() == 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = http.delete(d.http("/v1/sources/h")).send().await.unwrap();
    assert!(r.status().is_success());
    assert!(pg.query("SHOW SOURCES", &[]).await.unwrap().is_empty());
    drop(kafka);
}

/// The exactly-once check: records produced to a 4-partition topic while two tailer
/// processes share its partitions; tailers and the leaf are killed with -9 at different points
/// six times. Afterwards the collection holds every record exactly once (count, distinct ids,
/// checksum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tailers_and_the_leaf_killed_six_times_lose_and_duplicate_nothing() {
    let kafka = Kafka::start().await;
    kafka.create_topic("events", 4).await;
    let mut d = Deployment::cluster().await;
    d.add_tailer("tailer2").await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION events WITH (shards = 3)").await.unwrap();
    pg.batch_execute(&format!(
        "CREATE SOURCE events_src FROM KAFKA (brokers = '{}', topic = 'events') INTO events",
        kafka.brokers()
    ))
    .await
    .unwrap();
    drop(pg);
    const N: i64 = 12_000;
    const BATCHES: i64 = 24;
    let record = |i: i64| ((i % 4) as i32, None, json!({"_id": format!("e{i}"), "v": i, "text": "event"}).to_string());
    // Production runs alongside the kills.
    let producer = {
        let brokers = kafka.brokers();
        tokio::spawn(async move {
            let kafka = basalt_cluster_tests::KafkaClient::new(&brokers);
            for b in 0..BATCHES {
                let per = N / BATCHES;
                kafka.produce("events", (b * per..(b + 1) * per).map(record).collect()).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let victims = ["tailer", "leaf", "tailer2", "tailer", "leaf", "tailer2"];
    for (round, victim) in victims.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(400 + 150 * round as u64)).await;
        let p = d.proc(victim);
        p.kill9();
        p.restart();
    }
    producer.await.unwrap();
    let pg = loop {
        // The aggregator reconnects to the restarted leaf lazily.
        if let Ok(pg) = tokio::time::timeout(Duration::from_secs(5), d.pg()).await {
            break pg;
        }
    };
    let started = Instant::now();
    loop {
        let n: i64 = pg.query_one("SELECT count(*) FROM events", &[]).await.map(|r| r.get(0)).unwrap_or(-1);
        if n >= N {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{n} of {N} records after 120 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let row = pg.query_one("SELECT count(*), count(DISTINCT _id), sum(v) FROM events", &[]).await.unwrap();
    let (count, distinct, sum): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((count, distinct, sum), (N, N, (0..N).sum::<i64>()));
    // Both tailers work: partitions are split between the two live members.
    let started = Instant::now();
    loop {
        let rows = pg.query("SHOW SOURCES", &[]).await.unwrap();
        let tailers: std::collections::HashSet<String> =
            rows.iter().filter_map(|r| r.get::<_, Option<String>>("tailer")).collect();
        if rows.len() == 4 && tailers.len() == 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "partitions not split: {} rows, {tailers:?}", rows.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// An ingest transformation computes `_id` and `_event_time`, renames, casts, drops fields and
/// filters records; a record the transformation fails on goes to the errors collection alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_transforms_records_on_the_way_in() {
    let kafka = Kafka::start().await;
    kafka.create_topic("raw", 2).await;
    let mut records: Vec<(i32, Option<String>, String)> = (0..200)
        .map(|i| {
            let doc = json!({"user": format!("u{i}"), "n": i, "ts": 1_700_000_000 + i,
                             "address": {"city": format!("c{}", i % 3)}, "secret": "x"});
            (i % 2, None, doc.to_string())
        })
        .collect();
    records.push((1, None, json!({"user": "bad", "n": "oops", "ts": 1}).to_string()));
    kafka.produce("raw", records).await;
    let d = Deployment::dev().await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION people").await.unwrap();
    pg.batch_execute(&format!(
        "CREATE SOURCE people_src FROM KAFKA (brokers = '{}', topic = 'raw') INTO people \
         TRANSFORM SELECT concat('p-', user) AS _id, CAST(n AS BIGINT) AS n, upper(address.city) AS city, \
         to_timestamp(ts) AS _event_time FROM _input WHERE CAST(n AS BIGINT) % 2 = 0",
        kafka.brokers()
    ))
    .await
    .unwrap();
    wait_count(&pg, "SELECT count(*) FROM people", 100, "even records").await;
    wait_count(&pg, "SELECT count(*) FROM people_src_errors", 1, "the bad record").await;
    let row = pg
        .query_one("SELECT _id, n, city, to_unixtime(_event_time) FROM people WHERE _id = 'p-u4'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "p-u4");
    assert_eq!(row.get::<_, i64>(1), 4);
    assert_eq!(row.get::<_, String>(2), "C1");
    assert_eq!(row.get::<_, i64>(3), 1_700_000_004);
    // Fields the transformation leaves out are not stored.
    let fields: Vec<String> = pg.query("DESCRIBE people", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(!fields.iter().any(|f| f == "secret" || f == "user" || f.starts_with("address")), "{fields:?}");
    let err: String = pg.query_one("SELECT error FROM people_src_errors", &[]).await.unwrap().get(0);
    assert!(err.contains("transform"), "{err}");
    // A transformation that is not a plain SELECT ... FROM _input is refused up front.
    let bad = pg
        .batch_execute(&format!(
            "CREATE SOURCE s2 FROM KAFKA (brokers = '{}', topic = 'raw') INTO people \
             TRANSFORM SELECT count(*) FROM _input GROUP BY n",
            kafka.brokers()
        ))
        .await
        .unwrap_err();
    assert!(bad.as_db_error().is_some_and(|e| e.message().contains("GROUP BY")), "{bad:?}");
}
