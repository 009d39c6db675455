use super::*;
use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use basalt_common::api::WriteOp;
use basalt_common::doc::{PatchKind, PatchOp, validate_value};
use basalt_common::filter::{AccessPath, CmpOp, Filter, Scalar};
use basalt_common::schema::ColumnType;
use futures::StreamExt;
use serde_json::json;

fn upsert(v: serde_json::Value) -> WriteOp {
    WriteOp::Upsert { doc: validate_value(v, &DocLimits::default()).unwrap() }
}

async fn scan(leaf: &Leaf, filters: Vec<Filter>, cols: &[(&str, ColumnType)]) -> RecordBatch {
    let req = ScanRequest {
        collection_id: 1,
        shard: 0,
        columns: cols.iter().map(|(n, t)| (n.to_string(), t.clone())).collect(),
        filters,
        limit: None,
        hint: None,
    };
    let schema = Arc::new(arrow::datatypes::Schema::new(
        req.columns.iter().map(|(n, t)| arrow::datatypes::Field::new(n, t.to_arrow(), true)).collect::<Vec<_>>(),
    ));
    let batches: Vec<RecordBatch> = leaf.scan(req).await.unwrap().map(|b| b.unwrap()).collect().await;
    concat_batches(&schema, &batches).unwrap()
}

fn strings(b: &RecordBatch, col: usize) -> Vec<String> {
    let mut v: Vec<String> = b.column(col).as_string::<i32>().iter().map(|s| s.unwrap_or("NULL").to_string()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn writes_survive_restart_and_all_access_paths_agree() {
    let dir = tempfile::tempdir().unwrap();
    let config = LeafConfig { data_dir: dir.path().to_path_buf(), limits: DocLimits::default() };
    {
        let leaf = Leaf::open(&config).unwrap();
        let ops = (0..100)
            .map(|i| upsert(json!({"_id": format!("d{i}"), "n": i, "kind": if i % 10 == 0 { "rare" } else { "common" }, "text": format!("word{i} shared")})))
            .collect();
        let r = leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops }).await.unwrap();
        assert_eq!(r.seq, 1);
        assert!(r.statuses.iter().all(|s| s.is_ok()));
        let patch = WriteOp::Patch {
            id: "d1".into(),
            ops: vec![PatchOp { op: PatchKind::Replace, path: "/kind".into(), value: Some(json!("rare")) }],
        };
        let bad = WriteOp::Patch {
            id: "d2".into(),
            ops: vec![PatchOp { op: PatchKind::Replace, path: "/nope".into(), value: Some(json!(1)) }],
        };
        let missing = WriteOp::Patch { id: "zz".into(), ops: vec![] };
        let r = leaf
            .apply(ShardWrite {
                collection_id: 1,
                shard: 0,
                ops: vec![patch, bad, missing, WriteOp::Delete { id: "d0".into() }],
            })
            .await
            .unwrap();
        assert_eq!(r.statuses.iter().map(|s| s.is_ok()).collect::<Vec<_>>(), vec![true, false, false, true]);
    }
    // Reopen: everything rebuilt from the row store.
    let leaf = Leaf::open(&config).unwrap();
    assert_eq!(leaf.live_docs(1), 99);
    let rare = Filter::Cmp { path: "kind".into(), op: CmpOp::Eq, value: Scalar::Str("rare".into()) };
    let cols = [("_id", ColumnType::Utf8), ("kind", ColumnType::Utf8)];
    let expected: Vec<String> =
        ["d1", "d10", "d20", "d30", "d40", "d50", "d60", "d70", "d80", "d90"].iter().map(|s| s.to_string()).collect();
    // Search index (term), column scan (forced) and row lookup must agree.
    let by_index = scan(&leaf, vec![rare.clone()], &cols).await;
    assert_eq!(strings(&by_index, 0), expected);
    let shard = leaf.shard((1, 0)).unwrap();
    let req = |filters: Vec<Filter>, hint| ScanRequest {
        collection_id: 1,
        shard: 0,
        columns: vec![],
        filters,
        limit: None,
        hint,
    };
    assert_eq!(shard.access_path(&req(vec![rare.clone()], None), &shard.stats()), AccessPath::SearchIndex);
    assert_eq!(
        shard.access_path(&req(vec![rare.clone()], Some(AccessPath::ColumnScan)), &shard.stats()),
        AccessPath::ColumnScan
    );
    let mut forced = Vec::new();
    shard
        .scan(
            &ScanRequest {
                collection_id: 1,
                shard: 0,
                columns: vec![("_id".into(), ColumnType::Utf8)],
                filters: vec![rare.clone()],
                limit: None,
                hint: Some(AccessPath::ColumnScan),
            },
            |b| {
                forced.push(b);
                true
            },
        )
        .unwrap();
    let schema = forced[0].schema();
    assert_eq!(strings(&concat_batches(&schema, &forced).unwrap(), 0), expected);
    let lookup = Filter::In { path: "_id".into(), values: vec![Scalar::Str("d0".into()), Scalar::Str("d5".into())] };
    let got = scan(&leaf, vec![lookup], &cols).await;
    assert_eq!(strings(&got, 0), vec!["d5".to_string()]);
    // Full text.
    let text = Filter::Search { path: "text".into(), query: "WORD7".into() };
    assert_eq!(strings(&scan(&leaf, vec![text], &cols).await, 0), vec!["d7".to_string()]);
    // Range on an int column, with a missing-field row excluded.
    let range = Filter::Cmp { path: "n".into(), op: CmpOp::GtEq, value: Scalar::Int(95) };
    assert_eq!(scan(&leaf, vec![range], &cols).await.num_rows(), 5);
    // Stats reflect the delete and the patch.
    let stats = leaf.stats(1, vec![0]).await.unwrap();
    assert_eq!(stats.doc_count, 99);
    // Limit stops early.
    let mut req = req(vec![], None);
    req.columns = vec![("_id".into(), ColumnType::Utf8)];
    req.limit = Some(7);
    let n: usize =
        leaf.scan(req).await.unwrap().map(|b| b.unwrap().num_rows()).fold(0, |a, b| async move { a + b }).await;
    assert_eq!(n, 7);
    // Drop removes the data for good.
    leaf.drop_collection(1).await.unwrap();
    assert_eq!(leaf.live_docs(1), 0);
    drop(shard);
    drop(leaf);
    let leaf = Leaf::open(&config).unwrap();
    assert_eq!(leaf.live_docs(1), 0);
    let empty = scan(&leaf, vec![], &cols).await;
    assert_eq!(empty.num_rows(), 0);
}
