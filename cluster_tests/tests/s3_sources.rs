//! S3 sources against `moto_server`: JSON lines, CSV and Parquet objects under a prefix are
//! ingested exactly once, including objects added while ingesting and across kill -9 of the
//! processes; bad lines land in the errors collection with their object and line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_cluster_tests::{Deployment, S3Server, wait_count};
use serde_json::json;

/// Wait until a `kind` rollup (`n`, `total`) equals the GROUP BY over its raw collection.
async fn wait_rollup_by_kind(pg: &tokio_postgres::Client, raw: &str, rollup: &str) {
    let rows = |r: &[tokio_postgres::Row]| {
        r.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1), r.get::<_, i64>(2))).collect::<Vec<_>>()
    };
    let started = Instant::now();
    loop {
        let sql = format!("SELECT kind, count(*), sum(v) FROM {raw} GROUP BY kind ORDER BY kind");
        let want = rows(&pg.query(&sql, &[]).await.unwrap());
        let got = rows(&pg.query(&format!("SELECT kind, n, total FROM {rollup} ORDER BY kind"), &[]).await.unwrap());
        if want == got {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "rollup {got:?} raw {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// JSON lines: records `first..first+n` with `v` = index; every 3rd without `_id`.
fn jsonl(first: i64, n: i64) -> Vec<u8> {
    let mut out = String::new();
    for i in first..first + n {
        let doc = if i % 3 == 0 {
            json!({"v": i, "kind": format!("k{}", i % 4), "text": "log line"})
        } else {
            json!({"_id": format!("r{i}"), "v": i, "kind": format!("k{}", i % 4), "text": "log line"})
        };
        out.push_str(&doc.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

fn parquet_file(first: i64, n: i64) -> Vec<u8> {
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("v", DataType::Int64, false),
        Field::new("price", DataType::Float64, true),
        Field::new("city", DataType::Utf8, true),
    ]));
    let batch = arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values((first..first + n).map(|i| format!("p{i}")))),
            Arc::new(Int64Array::from_iter_values(first..first + n)),
            Arc::new(Float64Array::from_iter((first..first + n).map(|i| (i % 5 != 0).then_some(i as f64 / 2.0)))),
            Arc::new(StringArray::from_iter((first..first + n).map(|i| (i % 7 != 0).then(|| format!("c{}", i % 3))))),
        ],
    )
    .unwrap();
    let mut out = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(700))
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

/// Every format, objects added during ingestion, a kill -9 in the middle, bad lines, SHOW
/// SOURCES progress, and a source whose bucket does not exist (retried, shown, no crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_source_ingests_json_csv_and_parquet_exactly_once() {
    let s3 = S3Server::start("landing").await;
    for o in 0..3 {
        s3.put(&format!("logs/2026/part-{o}.jsonl"), jsonl(o * 1000, 1000)).await;
    }
    // A bad line and an over-long line in their own object, between good lines.
    let mut mixed = jsonl(3000, 10);
    mixed.extend_from_slice(b"{not json\n");
    mixed.extend_from_slice(format!("{{\"pad\": \"{}\"}}\n", "x".repeat(5 * 1024 * 1024)).as_bytes());
    mixed.extend(jsonl(3010, 10));
    s3.put("logs/2026/mixed.jsonl", mixed).await;
    // Another prefix that must not be read.
    s3.put("logs/2026-old/skip.jsonl", jsonl(90_000, 5)).await;
    s3.put(
        "csv/people.csv",
        b"id,name,age,score\n1,Ada,36,9.5\n2,\"Lovelace, A.\",37,\n3,Bob,x,1\n4,Cy,40,2,extra\n".to_vec(),
    )
    .await;
    s3.put("pq/a.parquet", parquet_file(0, 2000)).await;

    let mut d = Deployment::dev_with(&[], &s3.env()).await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION logs; CREATE COLLECTION people; CREATE COLLECTION sales").await.unwrap();
    let create = |name: &str, prefix: &str, format: &str, into: &str| {
        format!(
            "CREATE SOURCE {name} FROM S3 (bucket = 'landing', prefix = '{prefix}', format = '{format}', \
             endpoint = '{}', region = 'us-east-1', poll_interval_ms = 300) INTO {into}",
            s3.endpoint()
        )
    };
    // Unordered: several objects at once (the ordered default is tested below).
    pg.batch_execute(&create("logs_src", "logs/2026/", "json", "logs").replace(") INTO", ", ordered = false) INTO"))
        .await
        .unwrap();
    pg.batch_execute(
        "CREATE COLLECTION logs_by_kind AS ROLLUP SELECT kind, count(*) AS n, sum(v) AS total FROM _input \
         GROUP BY kind FROM SOURCE logs_src",
    )
    .await
    .unwrap();
    pg.batch_execute(&create("people_src", "csv/", "csv", "people")).await.unwrap();
    pg.batch_execute(&create("sales_src", "pq/", "parquet", "sales")).await.unwrap();
    // Credentials are refused in SQL.
    let err = pg
        .batch_execute("CREATE SOURCE bad FROM S3 (bucket = 'landing', secret_access_key = 'x') INTO logs")
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("credentials"), "{err:?}");
    // A bucket that does not exist: the source keeps retrying and says why.
    pg.batch_execute(&create("missing_src", "x/", "json", "logs").replace("'landing'", "'no-such-bucket'"))
        .await
        .unwrap();

    // Objects keep arriving while the process is killed.
    wait_count(&pg, "SELECT count(*) FROM logs WHERE v < 1000", 1000, "first object").await;
    s3.put("logs/2026/part-3.jsonl", jsonl(4000, 1000)).await;
    d.proc("dev").kill9();
    s3.put("logs/2026/part-4.jsonl", jsonl(5000, 1000)).await;
    d.proc("dev").restart();
    basalt_cluster_tests::wait_http(&d.http("/healthz"), d.proc("dev")).await;
    let pg = d.pg().await;
    s3.put("logs/2026/part-5.jsonl", jsonl(6000, 1000)).await;

    let good: Vec<i64> = (0..3020).chain(4000..7000).collect();
    let n = good.len() as i64;
    let started = Instant::now();
    loop {
        let have: Vec<i64> =
            pg.query("SELECT v FROM logs ORDER BY v", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        if have.len() as i64 == n {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let missing: Vec<&i64> = good.iter().filter(|v| have.binary_search(v).is_err()).collect();
            let sources = pg.query("SHOW SOURCES", &[]).await.unwrap();
            let status: Vec<String> = sources.iter().map(|r| format!("{r:?}")).collect();
            panic!("{} of {n} lines; missing {missing:?}; SHOW SOURCES {status:#?}", have.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = pg.query_one("SELECT count(DISTINCT _id), sum(v) FROM logs", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (n, good.iter().sum::<i64>()));
    // The rollup saw each line once too.
    wait_rollup_by_kind(&pg, "logs", "logs_by_kind").await;
    // The bad and the over-long line are in the errors collection with object and line.
    let rows =
        pg.query("SELECT object, \"offset\", error FROM logs_src_errors ORDER BY \"offset\"", &[]).await.unwrap();
    let errors: Vec<(String, i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!((errors[0].0.as_str(), errors[0].1), ("logs/2026/mixed.jsonl", 10));
    assert!(errors[0].2.contains("json"), "{errors:?}");
    assert_eq!(errors[1].1, 11);
    assert!(errors[1].2.contains("bytes"), "{errors:?}");

    // CSV: typed cells, quoted commas, empty cells left out, a row with too many cells refused.
    wait_count(&pg, "SELECT count(*) FROM people", 3, "csv rows").await;
    let row = pg.query_one("SELECT name, age, score FROM people WHERE id = 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "Lovelace, A.");
    assert_eq!(row.get::<_, String>(1), "37", "age mixes numbers and text, so its SQL type is text");
    assert_eq!(row.get::<_, Option<f64>>(2), None);
    wait_count(&pg, "SELECT count(*) FROM people_src_errors", 1, "the csv row with too many cells").await;

    // Parquet: every row, typed, nulls left out.
    wait_count(&pg, "SELECT count(*) FROM sales", 2000, "parquet rows").await;
    let row = pg.query_one("SELECT sum(v), count(price), sum(price), count(city) FROM sales", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), (0..2000).sum::<i64>());
    assert_eq!(row.get::<_, i64>(1), 1600);
    assert_eq!(row.get::<_, f64>(2), (0..2000).filter(|i| i % 5 != 0).map(|i| i as f64 / 2.0).sum::<f64>());
    assert_eq!(row.get::<_, i64>(3), (0..2000).filter(|i| i % 7 != 0).count() as i64);

    // SHOW SOURCES: objects done out of found; the missing bucket retrying with its error.
    let started = Instant::now();
    loop {
        let rows = pg.query("SHOW SOURCES", &[]).await.unwrap();
        let logs: Vec<_> = rows.iter().filter(|r| r.get::<_, String>("source") == "commons.logs_src").collect();
        let missing: Vec<_> = rows.iter().filter(|r| r.get::<_, String>("source") == "commons.missing_src").collect();
        let done =
            logs.first().map(|r| (r.get::<_, Option<i64>>("objects_done"), r.get::<_, Option<i64>>("objects_total")));
        let missing_error = missing.iter().find_map(|r| r.get::<_, Option<String>>("last_error"));
        let states: Vec<String> = logs.iter().map(|r| r.get("state")).collect();
        if done == Some((Some(7), Some(7))) && missing_error.is_some() && states == ["done"] {
            assert_eq!(logs[0].get::<_, String>("location"), "s3://landing/logs/2026/");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "SHOW SOURCES: {done:?}, states {states:?}, missing bucket: {missing_error:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // `basalt load`: a one-off bulk load with progress, through the running deployment.
    s3.put("bulk/b.parquet", parquet_file(10_000, 3000)).await;
    let out = std::process::Command::new(basalt_cluster_tests::basalt_bin())
        .args(["load", "--url", &d.http(""), "--collection", "bulk", "--bucket", "landing", "--prefix", "bulk/"])
        .args(["--format", "parquet", "--endpoint", &s3.endpoint(), "--region", "us-east-1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("loaded 1 objects") && stdout.contains("3000 documents"), "{stdout}");
    let n: i64 = pg.query_one("SELECT count(*) FROM bulk", &[]).await.unwrap().get(0);
    assert_eq!(n, 3000);
    let rows = pg.query("SHOW SOURCES", &[]).await.unwrap();
    assert!(!rows.iter().any(|r| r.get::<_, String>("source").contains("load_")), "the load's source is dropped");
    // An empty prefix is an error, not a wait forever.
    let out = std::process::Command::new(basalt_cluster_tests::basalt_bin())
        .args(["load", "--url", &d.http(""), "--collection", "bulk", "--bucket", "landing", "--prefix", "none/"])
        .args(["--endpoint", &s3.endpoint(), "--region", "us-east-1", "--empty-timeout-s", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no objects"));
    // An object rewritten with new content is a new object (key + ETag).
    s3.put("csv/people.csv", b"id,name\n5,Eve\n".to_vec()).await;
    wait_count(&pg, "SELECT count(*) FROM people", 4, "the rewritten object").await;
}

/// An S3 source reads its objects one at a time in key order (the default), whichever of two
/// tailers owns it: a collection loaded from files sorted by a column holds that column
/// ascending in every shard on both leaves, and the leaves scan it in that order. An object
/// that is not a file of the source's format is one record in the errors collection, and the
/// objects after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_source_keeps_the_files_order_in_every_shard() {
    let s3 = S3Server::start("sorted").await;
    const OBJECTS: i64 = 6;
    const PER: i64 = 3000;
    for o in 0..OBJECTS {
        s3.put(&format!("in/part-{o:04}.parquet"), parquet_file(o * PER, PER)).await;
    }
    s3.put("in/part-0002-broken.parquet", b"this is not a parquet file".to_vec()).await;
    let mut d = Deployment::cluster_of(2, &s3.env()).await;
    d.add_tailer("tailer2").await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION lines WITH (shards = 4)").await.unwrap();
    pg.batch_execute(&format!(
        "CREATE SOURCE lines_src FROM S3 (bucket = 'sorted', prefix = 'in/', format = 'parquet', endpoint = '{}', \
         region = 'us-east-1', poll_interval_ms = 0) INTO lines",
        s3.endpoint()
    ))
    .await
    .unwrap();
    let n = OBJECTS * PER;
    wait_count(&pg, "SELECT count(*) FROM lines", n, "every row").await;
    let row = pg.query_one("SELECT count(DISTINCT _id), sum(v) FROM lines", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (n, (0..n).sum::<i64>()));
    let grouped = "SELECT v, count(*) FROM lines GROUP BY v HAVING count(*) > 0 ORDER BY v";
    let started = Instant::now();
    loop {
        let rows = pg.query(&format!("EXPLAIN ANALYZE {grouped}"), &[]).await.unwrap();
        let plan = rows.iter().map(|r| r.get::<_, String>(1)).collect::<Vec<_>>().join("\n");
        if plan.contains("ordered_by=v") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the leaves do not scan in v's order:\n{plan}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let groups = pg.query(grouped, &[]).await.unwrap();
    assert_eq!(groups.len() as i64, n);
    assert!(groups.iter().enumerate().all(|(i, r)| r.get::<_, i64>(0) == i as i64 && r.get::<_, i64>(1) == 1));
    wait_count(&pg, "SELECT count(*) FROM lines_src_errors", 1, "the broken object").await;
    let row = pg.query_one("SELECT object, \"offset\", error FROM lines_src_errors", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, i64>(1)), ("in/part-0002-broken.parquet", -1));
    assert!(row.get::<_, String>(2).contains("parquet"), "{:?}", row.get::<_, String>(2));
}

/// The issue's exactly-once check for S3: objects added while two tailer processes split them
/// and the tailers and the leaf are killed at random points; every line arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tailers_and_the_leaf_killed_while_objects_arrive_lose_and_duplicate_nothing() {
    let s3 = S3Server::start("stream").await;
    let mut d = Deployment::cluster_with(&s3.env()).await;
    d.add_tailer("tailer2").await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION events WITH (shards = 3)").await.unwrap();
    pg.batch_execute(&format!(
        "CREATE SOURCE events_src FROM S3 (bucket = 'stream', prefix = 'in/', endpoint = '{}', \
         region = 'us-east-1', poll_interval_ms = 200) INTO events",
        s3.endpoint()
    ))
    .await
    .unwrap();
    // A rollup makes duplicates visible (upserts by `_id` would hide them).
    pg.batch_execute(
        "CREATE COLLECTION events_by_kind AS ROLLUP SELECT kind, count(*) AS n, sum(v) AS total FROM _input \
         GROUP BY kind FROM SOURCE events_src",
    )
    .await
    .unwrap();
    drop(pg);
    const OBJECTS: i64 = 16;
    const PER: i64 = 1500;
    let uploader = {
        let s3 = s3.handle();
        tokio::spawn(async move {
            for o in 0..OBJECTS {
                s3.put(&format!("in/{o:03}.jsonl"), jsonl(o * PER, PER)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let victims = ["tailer", "leaf", "tailer2", "tailer", "leaf", "tailer2"];
    d.kill_in_turn(&victims, Duration::from_millis(300), Duration::from_millis(170)).await;
    uploader.await.unwrap();
    let pg = d.pg_when_ready().await;
    let n = OBJECTS * PER;
    wait_count(&pg, "SELECT count(*) FROM events", n, "every line").await;
    let row = pg.query_one("SELECT count(*), count(DISTINCT _id), sum(v) FROM events", &[]).await.unwrap();
    let (count, distinct, sum): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((count, distinct, sum), (n, n, (0..n).sum::<i64>()));
    wait_rollup_by_kind(&pg, "events", "events_by_kind").await;
}

/// An Avro object container file of records `first..first+n` (`_id`, `v`, an optional
/// `city`, a date), in blocks of `block` records.
fn avro_file(first: i64, n: i64, block: i64, codec: apache_avro::Codec) -> Vec<u8> {
    use apache_avro::types::{Record, Value};
    let schema = apache_avro::Schema::parse_str(
        r#"{"type": "record", "name": "Sale", "fields": [
            {"name": "_id", "type": "string"}, {"name": "v", "type": "long"},
            {"name": "city", "type": ["null", "string"]},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}}]}"#,
    )
    .unwrap();
    let mut w = apache_avro::Writer::with_codec(&schema, Vec::new(), codec);
    for i in first..first + n {
        let mut r = Record::new(&schema).unwrap();
        r.put("_id", format!("s{i}"));
        r.put("v", i);
        r.put(
            "city",
            match i % 4 {
                0 => Value::Union(0, Box::new(Value::Null)),
                k => Value::Union(1, Box::new(Value::String(format!("c{k}")))),
            },
        );
        r.put("day", Value::Date(20_000 + (i % 30) as i32));
        w.append(r).unwrap();
        if (i - first + 1) % block == 0 {
            w.flush().unwrap();
        }
    }
    w.into_inner().unwrap()
}

/// Avro object container files (deflate, snappy, uncompressed) are read block by block into
/// documents; a file whose second block is corrupt gives its first block's records and one
/// error entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_source_reads_avro_container_files() {
    let s3 = S3Server::start("landing").await;
    s3.put("avro/a.avro", avro_file(0, 3000, 500, apache_avro::Codec::Deflate(Default::default()))).await;
    s3.put("avro/b.avro", avro_file(3000, 1000, 300, apache_avro::Codec::Snappy)).await;
    let mut broken = avro_file(10_000, 10, 5, apache_avro::Codec::Null);
    // The last 16 bytes are the second block's sync marker.
    let len = broken.len();
    broken[len - 16..].fill(0xAB);
    s3.put("avro/c.avro", broken).await;
    let d = Deployment::dev_with(&[], &s3.env()).await;
    let pg = d.pg().await;
    pg.batch_execute("CREATE COLLECTION sales").await.unwrap();
    pg.batch_execute(&format!(
        "CREATE SOURCE sales_src FROM S3 (bucket = 'landing', prefix = 'avro/', format = 'avro', \
         endpoint = '{}', region = 'us-east-1', poll_interval_ms = 300) INTO sales",
        s3.endpoint()
    ))
    .await
    .unwrap();
    wait_count(&pg, "SELECT count(*) FROM sales", 4005, "avro records").await;
    wait_count(&pg, "SELECT count(*) FROM sales_src_errors", 1, "the corrupt block").await;
    let sum: i64 = pg.query_one("SELECT sum(v) FROM sales WHERE v < 10000", &[]).await.unwrap().get(0);
    assert_eq!(sum, (0..4000).sum::<i64>());
    let nulls: i64 = pg.query_one("SELECT count(*) FROM sales WHERE city IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(nulls, 1000 + 2);
    // Dates arrive as ISO text, usable as dates in SQL.
    let day: i64 = pg
        .query_one("SELECT count(*) FROM sales WHERE CAST(day AS DATE) = DATE '2024-10-29'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(day, (0..4000).filter(|i| i % 30 == 25).count() as i64);
    let error: String = pg.query_one("SELECT error FROM sales_src_errors", &[]).await.unwrap().get(0);
    assert!(error.contains("cannot be read"), "{error}");
}
