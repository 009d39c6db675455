//! Segments on S3 (the `moto_server` S3 API server): a dev deployment flushes its segments to a
//! bucket, is killed with -9, and comes back from the bucket's segments plus its log.

use std::time::{Duration, Instant};

use basalt_cluster_tests::{Deployment, S3Server};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_on_s3_survive_kill_9() {
    let s3 = S3Server::start("basalt-segments").await;
    let mut d = Deployment::dev_with(
        &["--segment-store", "s3://basalt-segments/run1", "--flush-interval-ms", "200"],
        &s3.env(),
    )
    .await;
    let client = reqwest::Client::new();
    let r = client.post(d.http("/v1/collections")).json(&json!({"name": "s3c", "shards": 2})).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let write = |docs: Vec<Value>| {
        let (client, url) = (client.clone(), d.http("/v1/collections/s3c/docs"));
        async move {
            let r = client.post(url).json(&json!({"data": docs})).send().await.unwrap();
            assert!(r.status().is_success());
            let body: Value = r.json().await.unwrap();
            assert!(body["data"].as_array().unwrap().iter().all(|s| s["status"] == "ok"), "{body}");
        }
    };
    for batch in 0..10 {
        write((0..200).map(|i| json!({"_id": format!("d{}", batch * 200 + i), "v": i, "text": "granite"})).collect())
            .await;
    }
    // Wait until both shards have a manifest in the bucket.
    let started = Instant::now();
    loop {
        let keys = s3.list("run1/").await;
        if keys.iter().filter(|k| k.ends_with("/manifest.json")).count() == 2 {
            assert!(keys.iter().any(|k| k.contains("/blocks/")) && keys.iter().any(|k| k.contains("/index/")));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no manifests in the bucket: {keys:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More writes, some of them only in the log when the process dies.
    write((0..2000).step_by(3).map(|i| json!({"_id": format!("d{i}"), "v": 1000, "text": "basalt rock"})).collect())
        .await;
    d.proc("dev").kill9();
    d.proc("dev").restart();
    let started = Instant::now();
    while client.get(d.http("/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "dev did not restart:\n{}", d.proc("dev").log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.proc("dev").log().contains("from=segments"), "restart did not load segments");
    let pg = d.pg().await;
    let row = pg.query_one("SELECT count(*), count(DISTINCT _id), sum(v) FROM s3c", &[]).await.unwrap();
    let (count, distinct, sum): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let rewritten = (0..2000).step_by(3).count() as i64;
    let expected_sum: i64 = (0..2000).filter(|i| i % 3 != 0).map(|i| i % 200).sum::<i64>() + rewritten * 1000;
    assert_eq!((count, distinct, sum), (2000, 2000, expected_sum));
    let hits: i64 = pg.query_one("SELECT count(*) FROM s3c WHERE search(text, 'rock')", &[]).await.unwrap().get(0);
    assert_eq!(hits, rewritten);
    // Segments are read through local copies of the bucket's objects, written through on
    // every put. Without them (a new disk), a restart downloads what the manifests name.
    let cache = d.dir().join("data").join("leaf").join("segment-cache");
    let cached = |what: &str| {
        let mut n = 0;
        let mut dirs = vec![cache.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.to_string_lossy().contains(what) {
                    n += 1;
                }
            }
        }
        n
    };
    assert!(cached("/blocks/") > 0 && cached("/index/") > 0, "no local copies in {}", cache.display());
    drop(pg);
    d.proc("dev").kill9();
    std::fs::remove_dir_all(&cache).unwrap();
    d.proc("dev").restart();
    let started = Instant::now();
    while client.get(d.http("/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "dev did not restart:\n{}", d.proc("dev").log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pg = d.pg().await;
    let row = pg.query_one("SELECT count(*), count(DISTINCT _id), sum(v) FROM s3c", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (2000, 2000, expected_sum));
    let hits: i64 = pg.query_one("SELECT count(*) FROM s3c WHERE search(text, 'rock')", &[]).await.unwrap().get(0);
    assert_eq!(hits, rewritten);
    assert!(cached("/blocks/") > 0 && cached("/index/") > 0, "the restart did not fill the cache again");
    let log = d.proc("dev").log();
    assert!(!log.contains("segments unreadable"), "a shard fell back to its row store:\n{}", d.proc("dev").log_tail());
    assert_eq!(log.matches("from=segments").count(), 4, "both shards of both restarts load segments");
    drop(s3);
}
