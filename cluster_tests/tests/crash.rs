//! kill -9 the leaf and the tailer mid-stream, several times: every acknowledged document must
//! be present exactly once, with the value it was acknowledged with.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use basalt_cluster_tests::Deployment;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const BATCH_DOCS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let mut d = Deployment::cluster().await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let r = client.post(d.http("/v1/collections")).json(&json!({"name": "crash", "shards": 4})).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    // id -> value of every acknowledged document (a retried batch may rewrite a value).
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pending: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let (url, acked_w, stop_w, client_w, pending_w) =
        (d.http("/v1/collections/crash/docs"), acked.clone(), stop.clone(), client.clone(), pending.clone());
    let writer = tokio::spawn(async move {
        let (mut batch_no, mut failures) = (0u64, 0u64);
        while !stop_w.load(Ordering::Relaxed) {
            let mut docs: Vec<Value> = (0..BATCH_DOCS)
                .map(|i| {
                    let n = batch_no * BATCH_DOCS + i;
                    json!({"_id": format!("d{n}"), "v": n * 7 + batch_no, "payload": {"text": format!("document {n}"), "tags": ["x", "y"]}})
                })
                .collect();
            // Rewrite some earlier documents too (most of them already flushed to segments).
            if batch_no > 0 {
                for i in 0..20 {
                    let n = (batch_no * 37 + i * 101) % (batch_no * BATCH_DOCS);
                    docs.push(json!({"_id": format!("d{n}"), "v": 1_000_000 * batch_no + n, "payload": {"text": "rewritten"}}));
                }
            }
            let ok = match client_w.post(&url).json(&json!({"data": docs})).send().await {
                Ok(r) if r.status().is_success() => {
                    let body: Value = r.json().await.unwrap();
                    body["data"].as_array().unwrap().iter().all(|s| s["status"] == "ok")
                }
                _ => false,
            };
            if ok {
                pending_w.lock().await.clear();
                let mut a = acked_w.lock().await;
                for doc in &docs {
                    a.insert(doc["_id"].as_str().unwrap().to_string(), doc["v"].as_u64().unwrap());
                }
                batch_no += 1;
            } else {
                // Not acknowledged: retry the same batch (same ids, same values) after a pause.
                // Until it is, its values may or may not have landed.
                let mut p = pending_w.lock().await;
                for doc in &docs {
                    p.insert(doc["_id"].as_str().unwrap().to_string(), doc["v"].as_u64().unwrap());
                }
                failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        (batch_no, failures)
    });

    let victims = ["leaf", "tailer", "leaf", "tailer", "leaf", "both"];
    for (round, victim) in victims.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300 + 97 * round as u64)).await;
        match *victim {
            "both" => {
                d.proc("leaf").kill9();
                d.proc("tailer").kill9();
                tokio::time::sleep(Duration::from_millis(200)).await;
                d.proc("leaf").restart();
                d.proc("tailer").restart();
            }
            name => {
                d.proc(name).kill9();
                tokio::time::sleep(Duration::from_millis(100)).await;
                d.proc(name).restart();
            }
        }
    }
    // Let the writer get acknowledgements after the last restart.
    let before = acked.lock().await.len();
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if acked.lock().await.len() >= before + 2 * BATCH_DOCS as usize {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (batches, failures) = writer.await.unwrap();
    let acked = acked.lock().await.clone();
    let pending = pending.lock().await.clone();
    assert!(batches >= 5, "writer made too little progress: {batches} batches acknowledged");
    assert!(failures > 0, "the kills should have failed some writes");
    assert!(acked.len() as u64 >= 2 * BATCH_DOCS, "the writer recovered after the last restart");

    let pg = d.pg().await;
    let row = pg.query_one("SELECT count(*), count(DISTINCT _id) FROM crash", &[]).await.unwrap();
    let (count, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(count, distinct, "a document is present more than once");
    let rows = pg.query("SELECT _id, v FROM crash", &[]).await.unwrap();
    let present: BTreeMap<String, i64> = rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect();
    let mut missing = 0;
    for (id, v) in &acked {
        match present.get(id) {
            None => missing += 1,
            Some(got) => {
                let unacked = pending.get(id).is_some_and(|p| *p == *got as u64);
                assert!(*got as u64 == *v || unacked, "document {id} has value {got}, acknowledged {v}")
            }
        }
    }
    assert_eq!(missing, 0, "{missing} acknowledged documents are missing");
    // Nothing beyond what was sent: unacknowledged batches may have landed, but only whole ids
    // the writer produced.
    assert!(present.keys().all(|id| id.starts_with('d')));
    // The leaf flushed segments while it was being killed (and recovered from them).
    let manifests = std::fs::read_dir(d.dir.path().join("segments"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("manifest.json").exists())
        .count();
    assert!(manifests > 0, "no shard flushed a segment");
    println!(
        "acknowledged {} documents in {batches} batches with {failures} failed attempts; present {}",
        acked.len(),
        present.len()
    );
}
