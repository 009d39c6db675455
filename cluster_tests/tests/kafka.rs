//! Kafka sources against the `tansu` broker: a source ingests a 4-partition topic exactly once,
//! through kill -9 of the process that runs it.

use std::time::{Duration, Instant};

use basalt_cluster_tests::{Deployment, Kafka, wait_count};
use serde_json::json;

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
        (json!({"name": "h", "collection": "clicks", "kafka": {"brokers": "b", "topic": "t", "format": "csv"}}), 400),
        (
            json!({"name": "h", "collection": "clicks",
                   "kafka": {"brokers": "b", "topic": "t", "format": "csv", "columns": ["a", " a"]}}),
            400,
        ),
        (json!({"name": "h", "collection": "clicks", "kafka": {"brokers": "b", "topic": "t", "columns": "a, b"}}), 400),
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

/// The issue's exactly-once check: records produced to a 4-partition topic while two tailer
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
    // A rollup makes the test sensitive to duplicates: a record applied twice counts twice.
    pg.batch_execute(
        "CREATE COLLECTION events_by_bucket WITH (shards = 2) AS ROLLUP SELECT bucket, count(*) AS n, sum(v) AS total, \
         min(v) AS lo, max(v) AS hi FROM _input GROUP BY bucket FROM SOURCE events_src",
    )
    .await
    .unwrap();
    drop(pg);
    const N: i64 = 12_000;
    const BATCHES: i64 = 24;
    let record = |i: i64| {
        let doc = json!({"_id": format!("e{i}"), "v": i, "bucket": (i * 7) % 13, "text": "event"});
        ((i % 4) as i32, None, doc.to_string())
    };
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
    d.kill_in_turn(&victims, Duration::from_millis(400), Duration::from_millis(150)).await;
    producer.await.unwrap();
    let pg = d.pg_when_ready().await;
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
    // The rollup equals the GROUP BY over the raw records: nothing counted twice or lost.
    wait_groups_match(
        &pg,
        "SELECT CAST(bucket AS VARCHAR), n, total, lo, hi FROM events_by_bucket",
        "SELECT CAST(bucket AS VARCHAR), count(*), sum(v), min(v), max(v) FROM events GROUP BY bucket",
        None,
    )
    .await;
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
    // A broker that cannot be reached: retried with backoff, shown in SHOW SOURCES, no crash.
    pg.batch_execute("CREATE SOURCE dead_src FROM KAFKA (brokers = '127.0.0.1:1', topic = 'raw') INTO people")
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let rows = pg.query("SHOW SOURCES", &[]).await.unwrap();
        let dead = rows.iter().find(|r| r.get::<_, String>("source") == "commons.dead_src");
        let state = dead.map(|r| (r.get::<_, String>("state"), r.get::<_, Option<String>>("last_error")));
        if let Some((state, Some(error))) = &state {
            assert_eq!(state, "retrying");
            assert!(error.contains("kafka"), "{error}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{state:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The other source goes on.
    assert_eq!(pg.query_one("SELECT count(*) FROM people", &[]).await.unwrap().get::<_, i64>(0), 100);
}

/// CSV messages (one row each, no header: the source names the cells) become typed documents;
/// a message that is not one row of at most that many cells goes to the errors collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_reads_csv_messages() {
    let kafka = Kafka::start().await;
    kafka.create_topic("csv", 2).await;
    let mut records: Vec<(i32, Option<String>, String)> =
        (0..60).map(|i| (i % 2, None, format!("r{i},\"name, {i}\",{}.5,{}", i, i % 3 == 0))).collect();
    records.push((0, None, "r60,n,1.5".into())); // fewer cells: `active` is absent
    records.push((1, None, "r61,n,1,true,extra".into()));
    records.push((0, None, "r62,n,1,true\nr63,n,2,false".into()));
    kafka.produce("csv", records).await;
    let d = Deployment::dev().await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION items").await.unwrap();
    let no_columns = pg
        .batch_execute(&format!(
            "CREATE SOURCE bad_src FROM KAFKA (brokers = '{}', topic = 'csv', format = 'csv') INTO items",
            kafka.brokers()
        ))
        .await
        .unwrap_err();
    assert!(no_columns.as_db_error().is_some_and(|e| e.message().contains("columns")), "{no_columns:?}");
    pg.batch_execute(&format!(
        "CREATE SOURCE items_src FROM KAFKA (brokers = '{}', topic = 'csv', format = 'csv', \
         columns = '_id, name, price, active') INTO items",
        kafka.brokers()
    ))
    .await
    .unwrap();
    wait_count(&pg, "SELECT count(*) FROM items", 61, "csv rows").await;
    wait_count(&pg, "SELECT count(*) FROM items_src_errors", 2, "the bad messages").await;
    let row = pg.query_one("SELECT name, price, active FROM items WHERE _id = 'r3'", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "name, 3");
    assert_eq!(row.get::<_, f64>(1), 3.5);
    assert!(row.get::<_, bool>(2));
    let sum: f64 = pg.query_one("SELECT sum(price) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(sum, (0..60).map(|i| i as f64 + 0.5).sum::<f64>() + 1.5);
    let absent: i64 = pg.query_one("SELECT count(*) FROM items WHERE active IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(absent, 1);
    let errors: Vec<String> = pg
        .query("SELECT error FROM items_src_errors ORDER BY error", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(errors[0].contains("more than one row"), "{errors:?}");
    assert!(errors[1].contains("5 cells"), "{errors:?}");
}

/// Avro's binary encoding of a long (zigzag, then base-128 varint), written out here so the
/// test's messages do not come from the library Basalt decodes them with.
fn avro_long(v: i64, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn avro_string(s: &str, out: &mut Vec<u8>) {
    avro_long(s.len() as i64, out);
    out.extend_from_slice(s.as_bytes());
}

/// A `Click` datum (see the schema in the test) in Confluent framing with `schema_id`.
fn avro_click(schema_id: u32, id: &str, n: i64, tags: &[&str], price: Option<f64>) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&schema_id.to_be_bytes());
    avro_string(id, &mut out);
    avro_long(n, &mut out);
    if !tags.is_empty() {
        avro_long(tags.len() as i64, &mut out);
        for t in tags {
            avro_string(t, &mut out);
        }
    }
    avro_long(0, &mut out);
    match price {
        None => avro_long(0, &mut out),
        Some(p) => {
            avro_long(1, &mut out);
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    out
}

/// Avro messages (Confluent framing, the writer schema given with the source) become
/// documents; a truncated message, one with another schema id and one with bytes after the
/// datum go to the errors collection, and the rest arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_reads_avro_messages() {
    let kafka = Kafka::start().await;
    kafka.create_topic("avro", 2).await;
    let mut records: Vec<(i32, Option<String>, Vec<u8>)> = (0..50)
        .map(|i| {
            let tags: &[&str] = if i % 5 == 0 { &["promo", "mobile"] } else { &[] };
            let price = (i % 4 != 0).then_some(i as f64 + 0.25);
            (i % 2, None, avro_click(3, &format!("a{i}"), i as i64 * 10, tags, price))
        })
        .collect();
    let whole = avro_click(3, "bad1", 1, &[], None);
    records.push((0, None, whole[..whole.len() - 2].to_vec()));
    records.push((1, None, avro_click(4, "bad2", 1, &[], None)));
    records.push((0, None, [avro_click(3, "bad3", 1, &[], None), vec![7, 7]].concat()));
    kafka.produce_bytes("avro", records).await;
    let d = Deployment::dev().await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION clicks").await.unwrap();
    let schema = r#"{"type": "record", "name": "Click", "fields": [
        {"name": "_id", "type": "string"}, {"name": "n", "type": "long"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "price", "type": ["null", "double"]}]}"#;
    let no_schema = pg
        .batch_execute(&format!(
            "CREATE SOURCE bad_src FROM KAFKA (brokers = '{}', topic = 'avro', format = 'avro') INTO clicks",
            kafka.brokers()
        ))
        .await
        .unwrap_err();
    assert!(no_schema.as_db_error().is_some_and(|e| e.message().contains("schema")), "{no_schema:?}");
    pg.batch_execute(&format!(
        "CREATE SOURCE clicks_src FROM KAFKA (brokers = '{}', topic = 'avro', format = 'avro', \
         schema = '{schema}', framing = 'confluent', schema_id = '3') INTO clicks",
        kafka.brokers()
    ))
    .await
    .unwrap();
    wait_count(&pg, "SELECT count(*) FROM clicks", 50, "avro messages").await;
    wait_count(&pg, "SELECT count(*) FROM clicks_src_errors", 3, "the bad messages").await;
    let sum: i64 = pg.query_one("SELECT sum(n) FROM clicks", &[]).await.unwrap().get(0);
    assert_eq!(sum, (0..50).map(|i| i * 10).sum::<i64>());
    let nulls: i64 = pg.query_one("SELECT count(*) FROM clicks WHERE price IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(nulls, 13);
    let row = pg.query_one("SELECT price, tags::text FROM clicks WHERE _id = 'a5'", &[]).await.unwrap();
    assert_eq!(row.get::<_, f64>(0), 5.25);
    assert!(row.get::<_, String>(1).contains("promo"), "{:?}", row.get::<_, String>(1));
    let errors: Vec<String> = pg
        .query("SELECT error FROM clicks_src_errors ORDER BY error", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(errors.iter().any(|e| e.contains("2 bytes after")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("schema id 4")), "{errors:?}");
    assert_eq!(errors.len(), 3, "{errors:?}");
}

/// xorshift: reproducible random input without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Rows of a query as text, keyed by their first `keys` columns, for comparing rollups with
/// the same GROUP BY over raw records.
async fn groups(pg: &tokio_postgres::Client, sql: &str) -> std::collections::BTreeMap<String, Vec<i64>> {
    let rows = pg.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.iter()
        .map(|r| {
            let key: String = r.get(0);
            let values: Vec<i64> = (1..r.len()).map(|i| r.get::<_, Option<i64>>(i).unwrap_or(i64::MIN)).collect();
            (key, values)
        })
        .collect()
}

/// Distinct counts from sketches: within 2 (or 5%) of the exact count; every other value exact.
fn groups_match(
    rollup: &std::collections::BTreeMap<String, Vec<i64>>,
    raw: &std::collections::BTreeMap<String, Vec<i64>>,
    approx_column: Option<usize>,
) -> Result<(), String> {
    if rollup.keys().ne(raw.keys()) {
        return Err(format!("groups differ: rollup {:?}, raw {:?}", rollup.keys(), raw.keys()));
    }
    for (key, want) in raw {
        let got = &rollup[key];
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = if Some(i) == approx_column { (g - w).abs() <= 2.max(w / 20) } else { g == w };
            if !ok {
                return Err(format!("group {key} column {i}: rollup {got:?}, raw {want:?}"));
            }
        }
    }
    Ok(())
}

/// Wait until the rollup query's groups match the raw query's (rollups trail the raw
/// collection by at most a chunk).
async fn wait_groups_match(pg: &tokio_postgres::Client, rollup_sql: &str, raw_sql: &str, approx: Option<usize>) {
    let raw = groups(pg, raw_sql).await;
    let started = Instant::now();
    loop {
        let rollup = groups(pg, rollup_sql).await;
        match groups_match(&rollup, &raw, approx) {
            Ok(()) => return,
            Err(e) if started.elapsed() > Duration::from_secs(30) => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Rollups on randomized, out-of-order input equal the same GROUP BY over the raw records:
/// counts, sums, minima, maxima and approximate distinct counts, late events in the minute
/// their `_event_time` names; a rollup added after the source has run covers the records
/// before it too; a record the rollup fails on goes to the errors collection; through a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_group_by_over_randomized_out_of_order_records() {
    let kafka = Kafka::start().await;
    kafka.create_topic("clicks", 3).await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let base = 1_700_000_000_000i64; // ms
    let mut record = |i: i64| {
        let mut doc = json!({
            "_id": format!("k{i}"),
            "who": format!("u{}", rng.next(6)),
            "kind": if rng.next(5) == 0 { "view" } else { "click" },
            "page": format!("p{}", rng.next(40)),
            // Up to 8 minutes, in no order.
            "_event_time": base + rng.next(8 * 60_000) as i64,
        });
        if rng.next(10) != 0 {
            doc["price"] = json!(rng.next(500));
        }
        ((i % 3) as i32, None, doc.to_string())
    };
    let first: Vec<_> = (0..1500).map(&mut record).collect();
    let second: Vec<_> = (1500..3000).map(&mut record).collect();
    kafka.produce("clicks", first).await;
    // A record every rollup below fails on (a price that is no number), and one without `who`.
    let bad = json!({"_id": "bad-1", "who": "u1", "kind": "click", "page": "p1", "price": "n/a", "_event_time": base});
    let no_who = json!({"_id": "k-none", "kind": "click", "page": "p2", "price": 7, "_event_time": base + 1});
    kafka.produce("clicks", vec![(0, None, bad.to_string()), (1, None, no_who.to_string())]).await;

    let mut d = Deployment::dev().await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION events").await.unwrap();
    pg.batch_execute(&format!(
        "CREATE SOURCE clicks_src FROM KAFKA (brokers = '{}', topic = 'clicks') INTO events",
        kafka.brokers()
    ))
    .await
    .unwrap();
    pg.batch_execute(
        "CREATE COLLECTION clicks_per_minute WITH (shards = 3) AS ROLLUP \
         SELECT who, date_trunc('minute', _event_time) AS minute, count(*) AS clicks, \
         sum(CAST(price AS BIGINT)) AS spend, min(CAST(price AS BIGINT)) AS low, max(CAST(price AS BIGINT)) AS high, \
         count(price) AS priced, approx_distinct(page) AS pages \
         FROM _input WHERE kind = 'click' GROUP BY who, minute FROM SOURCE clicks_src",
    )
    .await
    .unwrap();
    wait_count(&pg, "SELECT count(*) FROM events", 1502, "first records").await;
    // A rollup added later (over HTTP) starts from the source's start like the source did.
    let r = reqwest::Client::new()
        .post(d.http("/v1/rollups"))
        .json(&json!({"name": "per_user", "source": "clicks_src", "shards": 2,
                      "sql": "SELECT who, count(*) AS n, approx_distinct(page) AS pages FROM _input GROUP BY who"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let rows = pg.query("SHOW SOURCES", &[]).await.unwrap();
    assert!(rows.iter().all(|r| r.get::<_, Option<String>>("rollups").is_some()), "rollups listed");
    // Bad rollups are refused up front.
    for bad_sql in [
        "CREATE COLLECTION r1 AS ROLLUP SELECT who, avg(price) AS a FROM _input GROUP BY who FROM SOURCE clicks_src",
        "CREATE COLLECTION r2 AS ROLLUP SELECT who, count(*) AS n FROM _input GROUP BY who FROM SOURCE nope",
    ] {
        assert!(pg.batch_execute(bad_sql).await.is_err(), "{bad_sql}");
    }

    // The rest arrives across a kill -9.
    kafka.produce("clicks", second[..700].to_vec()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.proc("dev").kill9();
    kafka.produce("clicks", second[700..].to_vec()).await;
    d.proc("dev").restart();
    basalt_cluster_tests::wait_http(&d.http("/healthz"), d.proc("dev")).await;
    let pg = d.pg().await;
    wait_count(&pg, "SELECT count(*) FROM events", 3002, "all records").await;

    let raw_sql = "SELECT concat(coalesce(who, '-'), ' ', CAST(to_unixtime(date_trunc('minute', _event_time)) AS VARCHAR)), \
                   count(*), sum(CAST(price AS BIGINT)), min(CAST(price AS BIGINT)), max(CAST(price AS BIGINT)), \
                   count(price), count(DISTINCT page) FROM events WHERE kind = 'click' AND _id <> 'bad-1' GROUP BY 1";
    let rollup_sql = "SELECT concat(coalesce(who, '-'), ' ', CAST(to_unixtime(minute) AS VARCHAR)), clicks, spend, low, \
                      high, priced, \"pages.estimate\" FROM clicks_per_minute";
    assert!(groups(&pg, raw_sql).await.len() > 40, "enough groups to mean something");
    wait_groups_match(&pg, rollup_sql, raw_sql, Some(5)).await;
    // Sketches merge across groups: distinct pages per user over all minutes.
    wait_groups_match(
        &pg,
        "SELECT coalesce(who, '-'), approx_distinct_merge(\"pages.sketch\") FROM clicks_per_minute GROUP BY 1",
        "SELECT coalesce(who, '-'), count(DISTINCT page) FROM events WHERE kind = 'click' AND _id <> 'bad-1' \
         GROUP BY 1",
        Some(0),
    )
    .await;
    // per_user has no CAST: the bad record counts there too.
    wait_groups_match(
        &pg,
        "SELECT coalesce(who, '-'), n, \"pages.estimate\" FROM per_user",
        "SELECT coalesce(who, '-'), count(*), count(DISTINCT page) FROM events GROUP BY 1",
        Some(1),
    )
    .await;
    // The record clicks_per_minute failed on is in the errors collection, under the rollup.
    let rows = pg.query("SELECT _id, error FROM clicks_src_errors", &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (id, error): (String, String) = (rows[0].get(0), rows[0].get(1));
    assert!(id.ends_with("-clicks_per_minute") && error.contains("clicks_per_minute"), "{id}: {error}");
}
