use super::*;
use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use basalt_common::api::WriteOp;
use basalt_common::doc::{Doc, PatchKind, PatchOp, apply_patch, validate_value};
use basalt_common::filter::{AccessPath, CmpOp, Filter, Scalar};
use basalt_common::schema::ColumnType;
use futures::StreamExt;
use serde_json::json;

fn upsert(v: serde_json::Value) -> WriteOp {
    WriteOp::Upsert { doc: validate_value(v, &DocLimits::default()).unwrap().into() }
}

async fn scan(leaf: &Leaf, filters: Vec<Filter>, cols: &[(&str, ColumnType)]) -> RecordBatch {
    let req = ScanRequest {
        collection_id: 1,
        shard: 0,
        columns: cols.iter().map(|(n, t)| (n.to_string(), t.clone())).collect(),
        filters,
        limit: None,
        hint: None,
        ordered_by: None,
        text_views: false,
        text_codes: vec![],
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
    let config = LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
    {
        let leaf = Leaf::open(&config).unwrap();
        let ops = (0..100)
            .map(|i| upsert(json!({"_id": format!("d{i}"), "n": i, "kind": if i % 10 == 0 { "rare" } else { "common" }, "text": format!("word{i} shared")})))
            .collect();
        let r = leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
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
                position: None,
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
        ordered_by: None,
        text_views: false,
        text_codes: vec![],
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
                ordered_by: None,
                text_views: false,
                text_codes: vec![],
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

/// Everything a query can observe of collection 1, for comparing before and after a restart.
async fn observe(leaf: &Leaf) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>, SchemaStats) {
    let cols = [("_id", ColumnType::Utf8), ("v", ColumnType::Utf8)];
    let all: Vec<String> = {
        let b = scan(leaf, vec![], &cols).await;
        let mut rows: Vec<String> = (0..b.num_rows())
            .map(|i| format!("{}={}", b.column(0).as_string::<i32>().value(i), b.column(1).as_string::<i32>().value(i)))
            .collect();
        rows.sort();
        rows
    };
    let term = Filter::Cmp { path: "g".into(), op: CmpOp::Eq, value: Scalar::Str("g3".into()) };
    let text = Filter::Search { path: "text".into(), query: "blue".into() };
    let range = Filter::Cmp { path: "n".into(), op: CmpOp::Lt, value: Scalar::Int(50) };
    let by_term = strings(&scan(leaf, vec![term], &cols).await, 0);
    let by_text = strings(&scan(leaf, vec![text], &cols).await, 0);
    let by_range = strings(&scan(leaf, vec![range], &cols).await, 0);
    (all, by_term, by_text, by_range, leaf.stats(1, vec![0]).await.unwrap())
}

fn gen_doc(i: usize, version: usize) -> WriteOp {
    upsert(json!({
        "_id": format!("d{i}"),
        "n": i,
        "g": format!("g{}", i % 7),
        "v": format!("v{version}"),
        "text": if (i + version).is_multiple_of(5) { "blue sky" } else { "red sea" },
    }))
}

#[tokio::test]
async fn restart_loads_segments_and_replays_the_log_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let never = FlushPolicy {
        max_rows: u64::MAX,
        max_age: std::time::Duration::from_secs(3600),
        max_indexes: 4,
        max_indexes_busy: 4,
        ..FlushPolicy::default()
    };
    let config = LeafConfig { data_dir: dir.path().to_path_buf(), flush: never, ..Default::default() };
    let write = |leaf: &Leaf, ops: Vec<WriteOp>| {
        let leaf = leaf.clone();
        async move {
            let r = leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
            assert!(r.statuses.iter().all(|s| s.is_ok()));
        }
    };
    let before;
    {
        let leaf = Leaf::open(&config).unwrap();
        // Ten flushes of small batches: more indexes than the policy allows, short blocks.
        for round in 0..10 {
            write(&leaf, (round * 30..round * 30 + 30).map(|i| gen_doc(i, 0)).collect()).await;
            // Updates and deletes of documents in earlier segments.
            if round > 0 {
                write(&leaf, (0..round * 30).step_by(11).map(|i| gen_doc(i, round)).collect()).await;
                write(&leaf, vec![WriteOp::Delete { id: format!("d{}", round * 3) }]).await;
            }
            assert_eq!(leaf.maintain_all(true), 0);
        }
        let shard = leaf.shard((1, 0)).unwrap();
        let manifest = shard.manifest_for_tests();
        assert!(manifest.indexes.len() <= 4, "indexes were merged: {}", manifest.indexes.len());
        assert_eq!(manifest.blocks.len(), 1, "short blocks were merged into one");
        // Once stored, blocks and indexes are read from their files, not held in the heap.
        let (blocks, indexes) = shard.mapped_for_tests();
        assert_eq!((blocks.len(), indexes.len()), (manifest.blocks.len(), manifest.indexes.len()));
        assert!(blocks.iter().chain(&indexes).all(|m| *m), "{blocks:?} {indexes:?}");
        // Writes after the last flush live only in the log.
        write(&leaf, (300..340).map(|i| gen_doc(i, 0)).collect()).await;
        write(&leaf, (0..300).step_by(13).map(|i| gen_doc(i, 99)).collect()).await;
        write(&leaf, vec![WriteOp::Delete { id: "d1".into() }, WriteOp::Delete { id: "d301".into() }]).await;
        before = observe(&leaf).await;
        assert_eq!(before.0.len(), 340 - 2 - 9);
        // Every object in the store is named by the manifest: merges left no garbage.
        let store =
            SegmentStore::open(dir.path().join("segments").to_str().unwrap(), &dir.path().join("segment-cache"))
                .unwrap();
        let mut listed: Vec<String> = store.list("c1_s0").unwrap();
        listed.sort();
        let mut named: Vec<String> = manifest.objects().into_iter().map(|o| format!("c1_s0/{o}")).collect();
        named.sort();
        assert_eq!(listed, named);
    }
    let leaf = Leaf::open(&config).unwrap();
    let shard = leaf.shard((1, 0)).unwrap();
    assert_eq!(shard.opened_from_for_tests(), "segments");
    let (blocks, indexes) = shard.mapped_for_tests();
    assert!(!blocks.is_empty() && !indexes.is_empty() && blocks.iter().chain(&indexes).all(|m| *m));
    let after = observe(&leaf).await;
    assert_eq!(after, before);
    // The replayed writes flush like any others, and a second restart agrees again.
    assert_eq!(leaf.maintain_all(true), 0);
    drop(shard);
    drop(leaf);
    let leaf = Leaf::open(&config).unwrap();
    assert_eq!(observe(&leaf).await, before);
}

#[tokio::test]
async fn unreadable_segments_fall_back_to_the_row_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
    let before;
    {
        let leaf = Leaf::open(&config).unwrap();
        let ops = (0..50).map(|i| gen_doc(i, 0)).collect();
        leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
        assert_eq!(leaf.maintain_all(true), 0);
        before = observe(&leaf).await;
    }
    let blocks = dir.path().join("segments/c1_s0/blocks");
    for f in std::fs::read_dir(&blocks).unwrap() {
        std::fs::write(f.unwrap().path(), b"not arrow").unwrap();
    }
    let leaf = Leaf::open(&config).unwrap();
    assert_eq!(leaf.shard((1, 0)).unwrap().opened_from_for_tests(), "row store");
    assert_eq!(observe(&leaf).await, before);
}

/// A small deterministic generator (xorshift) so the test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn big_text(k: usize) -> String {
    format!("big{k} {}", "filler words ".repeat(200))
}

fn patched_doc(i: usize, rng: &mut Rng) -> serde_json::Value {
    json!({
        "_id": format!("d{i}"),
        "n": rng.below(10),
        "kind": format!("k{}", rng.below(3)),
        "text": format!("word{} shared", rng.below(5)),
        "blob": big_text(rng.below(4)),
        "o": {"x": rng.below(3), "y": "why"},
        "tags": ["a", "b"],
    })
}

fn random_patch(rng: &mut Rng) -> Vec<PatchOp> {
    let op = |op, path: &str, value: Option<serde_json::Value>| PatchOp { op, path: path.into(), value };
    let mut ops = Vec::new();
    for _ in 0..1 + rng.below(2) {
        ops.push(match rng.below(11) {
            0 => op(PatchKind::Replace, "/n", Some(json!(rng.below(10)))),
            1 => op(PatchKind::Increment, "/n", Some(json!(1))),
            2 => op(PatchKind::Replace, "/n", Some(json!(format!("{}", rng.below(10))))),
            3 => op(PatchKind::Replace, "/kind", Some(json!(format!("k{}", rng.below(4))))),
            4 => op(PatchKind::Replace, "/text", Some(json!(format!("word{} fresh", rng.below(6))))),
            5 => op(PatchKind::Replace, "/blob", Some(json!(big_text(rng.below(6))))),
            6 => op(PatchKind::Replace, "/blob", Some(json!(format!("small{}", rng.below(3))))),
            7 => op(PatchKind::Add, "/o/x", Some(json!(rng.below(4)))),
            8 => op(PatchKind::Remove, "/o/y", None),
            9 => op(PatchKind::Add, "/tags/-", Some(json!(format!("t{}", rng.below(3))))),
            _ => op(PatchKind::Add, "/extra", Some(json!({"deep": rng.below(3)}))),
        });
    }
    ops
}

/// Rows, per-filter results under every access path and statistics of collection 1, for
/// comparing two leaves.
async fn observe_all(leaf: &Leaf) -> (Vec<String>, Vec<Vec<String>>, SchemaStats) {
    let stats = leaf.stats(1, vec![0]).await.unwrap();
    let columns: Vec<(String, ColumnType)> = stats.columns();
    let shard = leaf.shard((1, 0)).unwrap();
    let run = |filters: Vec<Filter>, hint: Option<AccessPath>, columns: Vec<(String, ColumnType)>| {
        let mut batches = Vec::new();
        let req = ScanRequest {
            collection_id: 1,
            shard: 0,
            columns,
            filters,
            limit: None,
            hint,
            ordered_by: None,
            text_views: false,
            text_codes: vec![],
        };
        shard
            .scan(&req, |b| {
                batches.push(b);
                true
            })
            .unwrap();
        let mut rows = Vec::new();
        for b in batches {
            let options = arrow::util::display::FormatOptions::default().with_null("NULL");
            // Timestamps as integers (display needs a timezone database for "UTC").
            let columns: Vec<arrow::array::ArrayRef> = b
                .columns()
                .iter()
                .map(|c| match c.data_type() {
                    arrow::datatypes::DataType::Timestamp(..) => {
                        arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).unwrap()
                    }
                    _ => c.clone(),
                })
                .collect();
            let formatters: Vec<_> = columns
                .iter()
                .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
                .collect();
            for r in 0..b.num_rows() {
                rows.push(formatters.iter().map(|f| f.value(r).to_string()).collect::<Vec<_>>().join("|"));
            }
        }
        rows.sort();
        rows
    };
    let all = run(vec![], None, columns.clone());
    let s = |v: &str| Scalar::Str(v.into());
    let filters = vec![
        Filter::Cmp { path: "kind".into(), op: CmpOp::Eq, value: s("k1") },
        Filter::Cmp { path: "n".into(), op: CmpOp::Eq, value: Scalar::Int(3) },
        Filter::Cmp { path: "n".into(), op: CmpOp::Gt, value: Scalar::Int(5) },
        Filter::Search { path: "text".into(), query: "word3".into() },
        Filter::Search { path: "blob".into(), query: "big2".into() },
        Filter::Cmp { path: "o.x".into(), op: CmpOp::Eq, value: Scalar::Int(2) },
        Filter::IsNull("o.y".into()),
        Filter::In { path: "tags".into(), values: vec![s("t1")] },
        Filter::And(vec![
            Filter::Cmp { path: "kind".into(), op: CmpOp::Eq, value: s("k1") },
            Filter::Search { path: "text".into(), query: "word3".into() },
        ]),
        Filter::Or(vec![
            Filter::Cmp { path: "n".into(), op: CmpOp::Eq, value: Scalar::Int(3) },
            Filter::Cmp { path: "kind".into(), op: CmpOp::Eq, value: s("k2") },
        ]),
    ];
    let mut results = Vec::new();
    for f in filters {
        let ids = vec![("_id".to_string(), ColumnType::Utf8)];
        let plain = run(vec![f.clone()], None, ids.clone());
        for hint in [AccessPath::ColumnScan, AccessPath::SearchIndex] {
            assert_eq!(run(vec![f.clone()], Some(hint), ids.clone()), plain, "{f} via {hint:?}");
        }
        results.push(plain);
    }
    (all, results, stats)
}

/// Field-level patches (overlays on slots, fields stored apart, patch documents in the search
/// index, patch files in segments) must answer every query exactly like the same documents
/// written whole, through flushes, patch-file merges and restarts.
#[tokio::test]
async fn patches_answer_exactly_like_whole_writes() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let never = FlushPolicy {
        max_rows: u64::MAX,
        max_age: std::time::Duration::from_secs(3600),
        max_indexes: 4,
        max_indexes_busy: 4,
        ..FlushPolicy::default()
    };
    let config = |dir: &tempfile::TempDir| LeafConfig {
        data_dir: dir.path().to_path_buf(),
        flush: never.clone(),
        ..Default::default()
    };
    let mut a = Leaf::open(&config(&dir_a)).unwrap();
    let b = Leaf::open(&config(&dir_b)).unwrap();
    let write = |leaf: &Leaf, ops: Vec<WriteOp>| {
        let leaf = leaf.clone();
        async move { leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap() }
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut model: std::collections::BTreeMap<String, Doc> = std::collections::BTreeMap::new();
    let limits = DocLimits::default();
    for i in 0..60 {
        let doc = validate_value(patched_doc(i, &mut rng), &limits).unwrap();
        model.insert(format!("d{i}"), doc);
    }
    let initial: Vec<WriteOp> = model.values().map(|d| WriteOp::Upsert { doc: d.clone().into() }).collect();
    write(&a, initial.clone()).await;
    write(&b, initial).await;
    for round in 0..24 {
        // A: field-level patches (some ids twice in a batch, some failing); B: the resulting
        // documents written whole.
        let mut ops_a = Vec::new();
        let mut expect_ok = Vec::new();
        let mut touched = std::collections::BTreeSet::new();
        for _ in 0..25 {
            let id = format!("d{}", rng.below(70)); // some ids do not exist
            let ops = random_patch(&mut rng);
            let ok = match model.get_mut(&id) {
                Some(doc) => apply_patch(doc, &ops, &limits).is_ok(),
                None => false,
            };
            expect_ok.push(ok);
            touched.insert(id.clone());
            ops_a.push(WriteOp::Patch { id, ops });
        }
        // Whole writes mixed in: a patched id also upserted in the same batch, a delete, a new doc.
        if round % 3 == 1 {
            let id = format!("d{}", rng.below(60));
            if let Some(doc) = model.get(&id) {
                let mut doc = doc.clone();
                doc.insert("kind".into(), json!("k9"));
                model.insert(id.clone(), doc.clone());
                ops_a.push(WriteOp::Upsert { doc: doc.into() });
                expect_ok.push(true);
                touched.insert(id);
            }
            let gone = format!("d{}", rng.below(60));
            model.remove(&gone);
            ops_a.push(WriteOp::Delete { id: gone.clone() });
            expect_ok.push(true);
            touched.insert(gone);
        }
        let r = write(&a, ops_a).await;
        assert_eq!(r.statuses.iter().map(|s| s.is_ok()).collect::<Vec<_>>(), expect_ok, "round {round}");
        let ops_b: Vec<WriteOp> = touched
            .iter()
            .map(|id| match model.get(id) {
                Some(doc) => WriteOp::Upsert { doc: doc.clone().into() },
                None => WriteOp::Delete { id: id.clone() },
            })
            .collect();
        write(&b, ops_b).await;
        if round % 2 == 0 {
            a.maintain_all(true);
        }
        if round % 7 == 6 {
            drop(a);
            a = Leaf::open(&config(&dir_a)).unwrap();
        }
        let ((rows_a, found_a, stats_a), (rows_b, found_b, stats_b)) = (observe_all(&a).await, observe_all(&b).await);
        assert_eq!(stats_a, stats_b, "statistics, round {round}");
        assert_eq!(found_a, found_b, "filter results, round {round}");
        if let Some(i) = (0..rows_a.len().max(rows_b.len())).find(|i| rows_a.get(*i) != rows_b.get(*i)) {
            let short = |r: Option<&String>| r.map(|r| r.replace(&"filler words ".repeat(200), "…"));
            panic!("round {round}: row {i} differs: {:?} vs {:?}", short(rows_a.get(i)), short(rows_b.get(i)));
        }
    }
    let manifest = a.shard((1, 0)).unwrap().manifest_for_tests();
    assert!(!manifest.patches.is_empty() && manifest.patches.len() <= 9, "patch files: {:?}", manifest.patches);
    // The row store answers lookups with the assembled documents.
    for (id, doc) in &model {
        let got = a.shard((1, 0)).unwrap().get(id).unwrap();
        assert_eq!(got.as_ref(), Some(doc), "{id}");
    }
}

/// A source write resent from an older offset (after a crash or a takeover) applies nothing
/// twice, also after a restart; the position moves even when a shard gets no documents.
#[tokio::test]
async fn source_positions_make_resent_records_apply_once() {
    use basalt_common::api::SourcePosition;
    let dir = tempfile::tempdir().unwrap();
    let config = LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
    let inc = |id: &str| WriteOp::Patch {
        id: id.into(),
        ops: vec![PatchOp { op: PatchKind::Increment, path: "/n".into(), value: Some(json!(1)) }],
    };
    let write = |ops: Vec<WriteOp>, offsets: Vec<i64>, through: i64| ShardWrite {
        collection_id: 1,
        shard: 0,
        ops,
        position: Some(SourcePosition { stream: 7, partition: 2, offsets, through, first: None }),
    };
    {
        let leaf = Leaf::open(&config).unwrap();
        // A first position of -1 (nothing yet, as an empty topic or a new object starts) is
        // recorded: a shard that has it differs from one that never heard of the partition.
        leaf.apply(write(vec![], vec![], -1)).await.unwrap();
        assert_eq!(
            leaf.positions(1, vec![0], 7).await.unwrap(),
            vec![basalt_common::api::ShardPosition { shard: 0, partition: 2, through: -1 }]
        );
        leaf.apply(write(vec![upsert(json!({"_id": "a", "n": 0}))], vec![10], 10)).await.unwrap();
        leaf.apply(write(vec![inc("a"), inc("a")], vec![11, 12], 12)).await.unwrap();
        // Resent from offset 11 with one more record: only offset 13 applies.
        let r = leaf.apply(write(vec![inc("a"), inc("a"), inc("a")], vec![11, 12, 13], 13)).await.unwrap();
        assert!(r.statuses.iter().all(|s| s.is_ok()), "skipped records report ok");
        // No documents for this shard, but the partition moved on.
        leaf.apply(write(vec![], vec![], 20)).await.unwrap();
        let bad = leaf.apply(write(vec![inc("a")], vec![], 21)).await;
        assert!(bad.is_err(), "offsets must match operations");
    }
    let leaf = Leaf::open(&config).unwrap();
    assert_eq!(
        leaf.positions(1, vec![0, 1], 7).await.unwrap(),
        vec![basalt_common::api::ShardPosition { shard: 0, partition: 2, through: 20 }]
    );
    leaf.apply(write(vec![inc("a")], vec![15], 20)).await.unwrap();
    let shard = leaf.shard((1, 0)).unwrap();
    assert_eq!(shard.get("a").unwrap().unwrap()["n"], json!(3));
    // Aggregated writes (rollups) apply whole or not at all: one that includes offsets this
    // shard has (through 20) and offsets it lacks is refused; wholly applied ones are skipped.
    let aggregated = |first: i64, through: i64| ShardWrite {
        collection_id: 1,
        shard: 0,
        ops: vec![inc("a")],
        position: Some(SourcePosition { stream: 7, partition: 2, offsets: vec![through], through, first: Some(first) }),
    };
    let straddle = leaf.apply(aggregated(18, 25)).await.unwrap_err();
    assert_eq!(straddle.code, basalt_common::ErrorCode::Conflict, "{straddle}");
    leaf.apply(aggregated(15, 20)).await.unwrap();
    leaf.apply(aggregated(21, 25)).await.unwrap();
    assert_eq!(shard.get("a").unwrap().unwrap()["n"], json!(4));
    assert_eq!(leaf.positions(1, vec![0], 7).await.unwrap()[0].through, 25);
    leaf.drop_collection(1).await.unwrap();
    assert!(leaf.positions(1, vec![0], 7).await.unwrap().is_empty());
}

/// A merge creates a missing document before patching it (counters that start at zero), and
/// patches an existing one field by field; a failing merge creates nothing.
#[tokio::test]
async fn merges_create_missing_documents() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::open(&LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
    let op = |op, path: &str, v: serde_json::Value| PatchOp { op, path: path.into(), value: Some(v) };
    let merge = |id: &str, ops: Vec<PatchOp>| WriteOp::Merge { id: id.into(), ops };
    let write = |ops: Vec<WriteOp>| ShardWrite { collection_id: 1, shard: 0, ops, position: None };
    let counts = |v: i64| {
        vec![
            op(PatchKind::Increment, "/clicks", json!(1)),
            op(PatchKind::Max, "/top", json!(v)),
            op(PatchKind::Min, "/low", json!(v)),
        ]
    };
    let r =
        leaf.apply(write(vec![merge("g1", counts(5)), merge("g1", counts(9)), merge("g2", counts(1))])).await.unwrap();
    assert!(r.statuses.iter().all(|s| s.is_ok()));
    let r = leaf.apply(write(vec![merge("g1", counts(2))])).await.unwrap();
    assert!(r.statuses.iter().all(|s| s.is_ok()));
    let bad = leaf.apply(write(vec![merge("g3", vec![op(PatchKind::Increment, "/x", json!("a"))])])).await.unwrap();
    assert!(!bad.statuses[0].is_ok());
    let plain = leaf.apply(write(vec![WriteOp::Patch { id: "g4".into(), ops: counts(1) }])).await.unwrap();
    assert!(!plain.statuses[0].is_ok(), "a plain patch of a missing document fails");
    let shard = leaf.shard((1, 0)).unwrap();
    let g1 = shard.get("g1").unwrap().unwrap();
    assert_eq!((&g1["clicks"], &g1["top"], &g1["low"]), (&json!(3), &json!(9), &json!(2)));
    assert!(g1["_event_time"].is_i64());
    assert!(shard.get("g3").unwrap().is_none() && shard.get("g4").unwrap().is_none());
    assert_eq!(leaf.stats(1, vec![0]).await.unwrap().doc_count, 2);
    // Scans see the merged values (the second write was a field-level overlay).
    let got = scan(&leaf, vec![], &[("_id", ColumnType::Utf8), ("clicks", ColumnType::Int64)]).await;
    let mut rows: Vec<(String, i64)> = (0..got.num_rows())
        .map(|i| {
            (
                got.column(0).as_string::<i32>().value(i).to_string(),
                got.column(1).as_primitive::<arrow::datatypes::Int64Type>().value(i),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(rows, vec![("g1".to_string(), 3), ("g2".to_string(), 1)]);
}

/// A flush keeps the segments the tail's commits made; an idle shard's maintenance rewrites
/// such an index into one segment, and searches find the same documents before and after.
#[tokio::test]
async fn idle_shards_merge_multi_segment_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let policy = FlushPolicy {
        max_rows: u64::MAX,
        max_age: std::time::Duration::from_secs(3600),
        idle: std::time::Duration::from_millis(300),
        ..FlushPolicy::default()
    };
    // No background maintenance: on a loaded machine its passes made the shard idle between
    // this test's steps and merged early.
    let config = LeafConfig {
        data_dir: dir.path().to_path_buf(),
        flush: policy,
        background_maintenance: false,
        ..Default::default()
    };
    let leaf = Leaf::open(&config).unwrap();
    for round in 0..3 {
        let ops = (round * 20..round * 20 + 20).map(|i| gen_doc(i, 0)).collect();
        leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
        leaf.shard((1, 0)).unwrap().refresh_index().unwrap();
    }
    let shard = leaf.shard((1, 0)).unwrap();
    let blue = |shard: &Shard| {
        let filter = Filter::Search { path: "text".into(), query: "blue".into() };
        let mut slots = shard.search_slots_for_tests(&filter);
        slots.sort_unstable();
        slots
    };
    let before = blue(&shard);
    assert_eq!(before.len(), 12);
    // The flush seals three commits' segments as they are (the pass that flushes does not
    // count as idle: the shard changed since the last one).
    assert_eq!(leaf.maintain_all(true), 0);
    assert_eq!(shard.index_segments_for_tests(), vec![3]);
    assert_eq!(blue(&shard), before);
    assert!(!leaf.settled(), "the pass flushed");
    // Nothing written for longer than `idle`: the index becomes one segment, in a new manifest.
    let generation = shard.manifest_for_tests().generation;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(leaf.maintain_all(false), 0);
    assert_eq!(shard.index_segments_for_tests(), vec![1]);
    assert!(shard.manifest_for_tests().generation > generation);
    assert_eq!(blue(&shard), before);
    assert!(!leaf.settled(), "the pass merged");
    // The next pass finds nothing to do: settled, until a write comes.
    assert_eq!(leaf.maintain_all(false), 0);
    assert!(leaf.settled());
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops: vec![gen_doc(100, 0)], position: None }).await.unwrap();
    assert_eq!(leaf.maintain_all(false), 0);
    assert!(!leaf.settled(), "a shard that just took a write is not idle");
}

/// Shutdown flushes what is pending and merges nothing, however idle the shard; background
/// maintenance starts nothing afterwards; the leaf reopens with every document and nothing to
/// replay.
#[tokio::test]
async fn shutdown_flushes_without_merging() {
    let dir = tempfile::tempdir().unwrap();
    let policy = FlushPolicy {
        max_rows: u64::MAX,
        max_age: std::time::Duration::from_secs(3600),
        max_indexes: 1,
        idle: std::time::Duration::from_millis(100),
        ..FlushPolicy::default()
    };
    let config = LeafConfig {
        data_dir: dir.path().to_path_buf(),
        flush: policy.clone(),
        background_maintenance: false,
        ..Default::default()
    };
    let leaf = Leaf::open(&config).unwrap();
    let write = |from: usize| {
        let leaf = leaf.clone();
        async move {
            let ops = (from..from + 20).map(|i| gen_doc(i, 0)).collect();
            leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
            leaf.shard((1, 0)).unwrap().refresh_index().unwrap();
        }
    };
    for round in 0..3 {
        write(round * 20).await;
    }
    assert_eq!(leaf.maintain_all(true), 0);
    let shard = leaf.shard((1, 0)).unwrap();
    assert_eq!(shard.index_segments_for_tests(), vec![3]);
    write(60).await;
    write(80).await;
    let flushed = shard.manifest_for_tests();
    // An idle shard over `max_indexes` with a multi-segment index: maintenance would merge;
    // shutdown only seals the pending writes as one more index.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert_eq!(leaf.shutdown(), crate::ShutdownReport { flushed: 1, busy: 0, failed: 0 });
    assert_eq!(shard.index_segments_for_tests(), vec![3, 2]);
    let after = shard.manifest_for_tests();
    assert_eq!(after.generation, flushed.generation + 1);
    assert!(after.seq > flushed.seq);
    assert_eq!(leaf.shutdown(), crate::ShutdownReport::default());
    assert_eq!(leaf.maintain_all(false), 0);
    assert_eq!(shard.index_segments_for_tests(), vec![3, 2]);
    assert_eq!(shard.manifest_for_tests().generation, after.generation);
    drop(shard);
    drop(leaf);
    let leaf = Leaf::open(&config).unwrap();
    let shard = leaf.shard((1, 0)).unwrap();
    assert_eq!(shard.live_docs(), 100);
    assert_eq!(shard.manifest_for_tests().seq, after.seq);
    let filter = Filter::Search { path: "text".into(), query: "blue".into() };
    assert_eq!(shard.search_slots_for_tests(&filter).len(), 20);
}

#[tokio::test]
async fn planner_statistics_estimate_distinct_values_of_live_documents() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::open(&LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
    let doc = |i: usize, k: serde_json::Value| upsert(serde_json::json!({"_id": format!("d{i}"), "k": k, "n": i}));
    let ops = (0..3000).map(|i| doc(i, serde_json::json!(i % 37))).collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    leaf.maintain_all(true);
    let stats = leaf.planner_stats(1, vec![0], true).await.unwrap();
    assert_eq!(stats.distinct_values("k"), Some(37));
    let ids = stats.distinct_values("_id").unwrap();
    assert!((2900..=3100).contains(&ids), "{ids}");
    // The sketches are kept until a tenth of the documents changes; then they are read again,
    // and replaced versions do not count.
    let ops = (0..400).map(|i| doc(i, serde_json::json!(1000 + i))).collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    assert_eq!(leaf.planner_stats(1, vec![0], true).await.unwrap().distinct_values("k"), Some(37));
    let ops = (3000..3400).map(|i| doc(i, serde_json::json!(5.0))).collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    let k = leaf.planner_stats(1, vec![0], true).await.unwrap().distinct_values("k").unwrap();
    // 37 small integers (5.0 counts as 5) and 400 new values.
    assert!((425..=449).contains(&k), "{k}");
    // Statistics of several shards merge their sketches (the same values are not counted twice).
    let ops = (0..100).map(|i| doc(10_000 + i, serde_json::json!(i % 37))).collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 1, ops, position: None }).await.unwrap();
    let both = leaf.planner_stats(1, vec![0, 1], true).await.unwrap();
    assert_eq!(both.distinct_values("k"), Some(k));
    assert_eq!(both.doc_count, 3500);
    // Plain statistics (SHOW, describe, the point-lookup path) never carry or compute sketches.
    assert!(leaf.stats(1, vec![0, 1]).await.unwrap().distinct.is_empty());
}

/// A shard taking writes lets indexes wait up to `max_indexes_busy`, then merges a run of
/// `merge_width` at once; idle, it merges down to `max_indexes`. Searches find the same
/// documents throughout.
#[tokio::test]
async fn busy_shards_defer_index_merges_and_idle_ones_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let policy = FlushPolicy {
        max_rows: u64::MAX,
        max_age: std::time::Duration::from_secs(3600),
        max_indexes: 2,
        max_indexes_busy: 6,
        merge_width: 3,
        idle: std::time::Duration::from_millis(300),
        ..FlushPolicy::default()
    };
    let config = LeafConfig {
        data_dir: dir.path().to_path_buf(),
        flush: policy,
        background_maintenance: false,
        ..Default::default()
    };
    let leaf = Leaf::open(&config).unwrap();
    let blue = |shard: &Shard| {
        let filter = Filter::Search { path: "text".into(), query: "blue".into() };
        let mut slots = shard.search_slots_for_tests(&filter);
        slots.sort_unstable();
        slots
    };
    let mut counts = Vec::new();
    for round in 0..7 {
        let ops = (round * 20..round * 20 + 20).map(|i| gen_doc(i, 0)).collect();
        leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
        leaf.maintain_all(true);
        counts.push(leaf.shard((1, 0)).unwrap().index_segments_for_tests().len());
    }
    // Six wait; the seventh makes seven, over the cap: three merge into one.
    assert_eq!(counts, vec![1, 2, 3, 4, 5, 6, 5]);
    let shard = leaf.shard((1, 0)).unwrap();
    let before = blue(&shard);
    assert_eq!(before.len(), 7 * 4, "{before:?}");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    leaf.maintain_all(false);
    assert_eq!(shard.index_segments_for_tests().len(), 2);
    assert_eq!(blue(&shard), before);
    // The merged indexes' directories are gone with their files, not left empty.
    let index_dirs = |d: &std::path::Path| -> usize {
        let found = walk(d).into_iter().filter(|p| p.is_dir() && p.parent().is_some_and(|p| p.ends_with("index")));
        found.count()
    };
    assert_eq!(index_dirs(dir.path()), 2);
}

/// Every path under `dir`, depth first.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// On the search index path, only the most selective `IN` list and short lists about as
/// selective are searched; broad or long lists are checked on the rows found, with the same
/// answer as scanning every block.
#[tokio::test]
async fn the_index_searches_the_selective_lists_and_checks_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::open(&LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
    let ops = (0..1000)
        .map(|i| {
            upsert(
                json!({"_id": format!("d{i}"), "a": i % 100, "b": i % 4, "c": i % 200, "k": "x", "d": i, "e": i % 50}),
            )
        })
        .collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    let ints =
        |path: &str, vs: &[i64]| Filter::In { path: path.into(), values: vs.iter().map(|v| Scalar::Int(*v)).collect() };
    let least = ints("c", &[1, 3, 5]); // 15 documents
    let close = ints("a", &[1, 3]); // 20: short and within 8x
    let broad = ints("b", &[1]); // 250
    let long = ints("c", &(0..70).map(|i| i * 2 + 1).collect::<Vec<_>>()); // 350 over 70 keys
    let term = Filter::Cmp { path: "k".into(), op: CmpOp::Eq, value: Scalar::Str("x".into()) };
    let shard = leaf.shard((1, 0)).unwrap();
    let (keep, checked) = shard.without_broad_lists(vec![&broad, &least, &long, &close, &term]).unwrap();
    assert_eq!(keep, vec![&least, &close, &term]);
    assert_eq!(checked, vec![&broad, &long]);
    let filters = vec![broad.clone(), least.clone(), long.clone(), close.clone(), term.clone()];
    let ids = |hint| {
        let mut out = Vec::new();
        let req = ScanRequest {
            collection_id: 1,
            shard: 0,
            columns: vec![("_id".into(), ColumnType::Utf8)],
            filters: filters.clone(),
            limit: None,
            hint: Some(hint),
            ordered_by: None,
            text_views: false,
            text_codes: vec![],
        };
        let path = shard.scan(&req, |b| {
            out.push(b);
            true
        });
        assert_eq!(path.unwrap(), hint);
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
            "_id",
            arrow::datatypes::DataType::Utf8,
            true,
        )]));
        strings(&concat_batches(&schema, &out).unwrap(), 0)
    };
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..1000)
            .filter(|i| [1, 3, 5].contains(&(i % 200)) && [1, 3].contains(&(i % 100)) && i % 4 == 1)
            .map(|i| format!("d{i}"))
            .collect();
        v.sort();
        v
    };
    assert!(!want.is_empty());
    assert_eq!(ids(AccessPath::SearchIndex), want);
    assert_eq!(ids(AccessPath::ColumnScan), want);
    // Each key is a dictionary lookup: 5 keys finding 100 documents are searched before 70
    // keys finding 70.
    let many = ints("d", &(0..70).collect::<Vec<_>>());
    let few = ints("e", &[7, 8, 9, 10, 11]);
    let (keep, checked) = shard.without_broad_lists(vec![&many, &few]).unwrap();
    assert_eq!((keep, checked), (vec![&few], vec![&many]));
}

/// A column that ascends down a shard's blocks is reported to the planner, and a scan asked for
/// rows in its order gets them in that order: as stored while the order holds, sorted on the
/// leaf (the limit after sorting) once later writes have broken it.
#[tokio::test]
async fn scans_asked_for_an_order_return_rows_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::open(&LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
    let write = |range: std::ops::Range<i64>, k: fn(i64) -> serde_json::Value| {
        let ops = range.map(|i| upsert(json!({"_id": format!("d{i}"), "k": k(i), "r": (i * 7919) % 1000}))).collect();
        leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None })
    };
    // Two sealed blocks and a tail, `k` ascending with repeats across all three; `r` not.
    write(0..3000, |i| json!(i / 3)).await.unwrap();
    leaf.maintain_all(true);
    write(3000..6000, |i| json!(i / 3)).await.unwrap();
    leaf.maintain_all(true);
    write(6000..6100, |i| json!(i / 3)).await.unwrap();
    let stats = leaf.planner_stats(1, vec![0], true).await.unwrap();
    assert!(stats.ascending_everywhere("k"), "{:?}", stats.ascending);
    assert!(!stats.ascending_everywhere("r"));
    let ordered = |limit: Option<usize>, filters: Vec<Filter>| {
        let req = ScanRequest {
            collection_id: 1,
            shard: 0,
            columns: vec![("k".into(), ColumnType::Int64), ("r".into(), ColumnType::Int64)],
            filters,
            limit,
            hint: None,
            ordered_by: Some("k".into()),
            text_views: false,
            text_codes: vec![],
        };
        let leaf = leaf.clone();
        async move {
            let batches: Vec<RecordBatch> = leaf.scan(req).await.unwrap().map(|b| b.unwrap()).collect().await;
            batches
                .iter()
                .flat_map(|b| {
                    let (k, r) = (b.column(0).as_primitive::<arrow::datatypes::Int64Type>(), b.column(1));
                    let r = r.as_primitive::<arrow::datatypes::Int64Type>();
                    (0..b.num_rows()).map(|i| (k.value(i), r.value(i))).collect::<Vec<_>>()
                })
                .collect::<Vec<(i64, i64)>>()
        }
    };
    let ascending = |rows: &[(i64, i64)]| rows.windows(2).all(|w| w[0].0 <= w[1].0);
    let all = ordered(None, vec![]).await;
    assert_eq!(all.len(), 6100);
    assert!(ascending(&all));
    // A late document with a small key, and a replaced one whose new version lands in the tail.
    write(9000..9001, |_| json!(5)).await.unwrap();
    write(10..11, |_| json!(1)).await.unwrap();
    assert!(!leaf.planner_stats(1, vec![0], true).await.unwrap().ascending_everywhere("k"));
    let all = ordered(None, vec![]).await;
    assert_eq!(all.len(), 6101);
    assert!(ascending(&all), "sorted on the leaf");
    let mut want: Vec<i64> = all.iter().map(|(k, _)| *k).collect();
    want.sort_unstable();
    assert_eq!(&want[..4], &[0, 0, 0, 1]);
    // The first rows in key order, not in slot order, with a filter.
    let r_small = Filter::Cmp { path: "r".into(), op: CmpOp::Lt, value: Scalar::Int(100) };
    let first = ordered(Some(5), vec![r_small.clone()]).await;
    let mut kept: Vec<(i64, i64)> = ordered(None, vec![]).await.into_iter().filter(|(_, r)| *r < 100).collect();
    kept.sort_by_key(|(k, _)| *k);
    assert_eq!(
        first.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        kept[..5].iter().map(|(k, _)| *k).collect::<Vec<_>>()
    );
    assert!(first.iter().any(|(k, _)| *k == 1 || *k == 5), "the late keys come first: {first:?}");
}

/// A scan asking for text as views (`ScanRequest::text_views`) or as codes (`text_codes`)
/// returns the same strings as one asking for `Utf8`, by every access path, with filters, nulls, a field holding numbers in
/// some documents (read as text), a patched and a deleted document.
#[tokio::test]
async fn text_views_hold_the_strings_a_plain_scan_returns() {
    let dir = tempfile::tempdir().unwrap();
    let config = LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
    let leaf = Leaf::open(&config).unwrap();
    let ops = (0..300)
        .map(|i| {
            let mut v = json!({"_id": format!("d{i}"), "kind": if i % 10 == 0 { "rare" } else { "common" }, "n": i});
            match i % 4 {
                0 => {}
                1 => v["t"] = json!(i),
                2 => v["t"] = json!(format!("a longer text than twelve bytes, number {i}")),
                _ => v["t"] = json!(["x", "y", "z"][i % 3]),
            }
            upsert(v)
        })
        .collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    let patch = WriteOp::Patch {
        id: "d10".into(),
        ops: vec![PatchOp { op: PatchKind::Replace, path: "/t".into(), value: Some(json!("patched")) }],
    };
    let ops = vec![patch, WriteOp::Delete { id: "d20".into() }];
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    let cols = vec![("_id".to_string(), ColumnType::Utf8), ("t".to_string(), ColumnType::Utf8)];
    let rare = Filter::Cmp { path: "kind".into(), op: CmpOp::Eq, value: Scalar::Str("rare".into()) };
    let some = Filter::Cmp { path: "n".into(), op: CmpOp::Lt, value: Scalar::Int(250) };
    for (filters, hint) in [
        (vec![], Some(AccessPath::ColumnScan)),
        (vec![some.clone()], Some(AccessPath::ColumnScan)),
        (vec![rare.clone()], Some(AccessPath::SearchIndex)),
        (vec![rare, some], Some(AccessPath::ColumnScan)),
    ] {
        let mut answers = Vec::new();
        // Plain, as views, as codes (`ScanRequest::text_codes`).
        for (text_views, coded) in [(false, false), (true, false), (true, true)] {
            let req = ScanRequest {
                collection_id: 1,
                shard: 0,
                columns: cols.clone(),
                filters: filters.clone(),
                limit: None,
                hint,
                ordered_by: None,
                text_views,
                text_codes: if coded { vec!["t".to_string()] } else { vec![] },
            };
            let batches: Vec<RecordBatch> = leaf.scan(req).await.unwrap().map(|b| b.unwrap()).collect().await;
            let mut rows = Vec::new();
            for b in &batches {
                let want = match (text_views, coded) {
                    (_, true) => arrow::datatypes::DataType::Dictionary(
                        Box::new(arrow::datatypes::DataType::UInt32),
                        Box::new(arrow::datatypes::DataType::Utf8),
                    ),
                    (true, false) => arrow::datatypes::DataType::Utf8View,
                    (false, false) => arrow::datatypes::DataType::Utf8,
                };
                assert_eq!(b.column(1).data_type(), &want);
                let ids = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
                let texts = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
                for i in 0..b.num_rows() {
                    let t = texts.as_string::<i32>();
                    rows.push((
                        ids.as_string::<i32>().value(i).to_string(),
                        (!arrow::array::Array::is_null(t, i)).then(|| t.value(i).to_string()),
                    ));
                }
            }
            rows.sort();
            answers.push(rows);
        }
        assert!(!answers[0].is_empty(), "{filters:?}");
        assert_eq!(answers[0], answers[1], "{filters:?}");
        assert_eq!(answers[0], answers[2], "{filters:?}");
        assert!(answers[0].iter().any(|(_, t)| t.as_deref() == Some("patched")) || !filters.is_empty());
        assert!(answers[0].iter().all(|(id, _)| id != "d20"));
    }
}

/// A scan reads the blocks of the snapshot it opened, as its consumer asks for them: writes
/// between the open and the reads (new documents, deletes, patches) are not seen, by any access
/// path; a scan opened after them sees them.
#[tokio::test]
async fn a_scan_reads_the_snapshot_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::open(&LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
    let doc = |i: usize| {
        upsert(json!({"_id": format!("d{i}"), "n": i, "kind": if i.is_multiple_of(10) { "rare" } else { "common" }}))
    };
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops: (0..3000).map(doc).collect(), position: None })
        .await
        .unwrap();
    let rows = |batches: Vec<RecordBatch>| {
        let mut out: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(move |r| {
                    b.columns()
                        .iter()
                        .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap())
                        .collect::<Vec<_>>()
                        .join("|")
                })
            })
            .collect();
        out.sort();
        out
    };
    let cases = [
        (AccessPath::ColumnScan, Filter::Cmp { path: "n".into(), op: CmpOp::GtEq, value: Scalar::Int(5) }),
        (
            AccessPath::SearchIndex,
            Filter::Cmp { path: "kind".into(), op: CmpOp::Eq, value: Scalar::Str("rare".into()) },
        ),
        (
            AccessPath::RowLookup,
            Filter::In { path: "_id".into(), values: ["d5", "d1021", "d1022"].map(|s| Scalar::Str(s.into())).to_vec() },
        ),
    ];
    for (round, (hint, filter)) in cases.into_iter().enumerate() {
        leaf.shard((1, 0)).unwrap().refresh_index().unwrap();
        let req = ScanRequest {
            collection_id: 1,
            shard: 0,
            columns: vec![
                ("_id".into(), ColumnType::Utf8),
                ("n".into(), ColumnType::Int64),
                ("kind".into(), ColumnType::Utf8),
            ],
            filters: vec![filter],
            limit: None,
            hint: Some(hint),
            ordered_by: None,
            text_views: false,
            text_codes: vec![],
        };
        let read = |req: ScanRequest| {
            let leaf = leaf.clone();
            async move { rows(leaf.scan(req).await.unwrap().map(|b| b.unwrap()).collect().await) }
        };
        let before = read(req.clone()).await;
        assert!(!before.is_empty(), "{hint:?}");
        let opened = leaf.scan(req.clone()).await.unwrap();
        // A patch of a document the scan finds, a delete of another, new documents (enough
        // for a block of their own) that the filter would keep.
        let patched = format!("d{}", 1001 + 10 * round);
        let deleted = format!("d{}", 1002 + 10 * round);
        let mut ops = vec![
            WriteOp::Patch {
                id: patched.clone(),
                ops: vec![
                    PatchOp { op: PatchKind::Replace, path: "/n".into(), value: Some(json!(-1)) },
                    PatchOp { op: PatchKind::Replace, path: "/kind".into(), value: Some(json!("rare")) },
                ],
            },
            WriteOp::Delete { id: deleted.clone() },
        ];
        ops.extend((0..2000).map(|i| doc(10_000 * (round + 1) + i * 10)));
        leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
        leaf.shard((1, 0)).unwrap().refresh_index().unwrap();
        let during = rows(opened.map(|b| b.unwrap()).collect().await);
        assert_eq!(during, before, "{hint:?}: the scan saw writes made after it opened");
        let after = read(req).await;
        assert_ne!(after, before, "{hint:?}");
        assert!(!after.iter().any(|r| r.starts_with(&format!("{deleted}|"))), "{hint:?}");
        let patched_now = after.iter().any(|r| r.starts_with(&format!("{patched}|-1|rare")));
        assert_eq!(patched_now, hint != AccessPath::ColumnScan, "{hint:?}: {patched} as patched");
    }
}

/// A scan's blocks are read inside its consumer's polls, and the worker is given back between
/// batches: a task woken meanwhile (the other partition of a join whose build side just
/// finished) runs before the next batch, not after the whole scan.
#[tokio::test(flavor = "current_thread")]
async fn a_scan_gives_the_worker_back_between_batches() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::open(&LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
    let total = 3 * crate::columns::BLOCK_ROWS;
    let ops = (0..total).map(|i| upsert(json!({"_id": format!("d{i}"), "n": i}))).collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    let req = ScanRequest {
        collection_id: 1,
        shard: 0,
        columns: vec![("n".into(), ColumnType::Int64)],
        filters: vec![],
        limit: None,
        hint: None,
        ordered_by: None,
        text_views: false,
        text_codes: vec![],
    };
    let mut batches = leaf.scan(req).await.unwrap();
    let mut rows = batches.next().await.unwrap().unwrap().num_rows();
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let ran = ran.clone();
        async move { ran.store(true, std::sync::atomic::Ordering::SeqCst) }
    });
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    rows += batches.next().await.unwrap().unwrap().num_rows();
    assert!(ran.load(std::sync::atomic::Ordering::SeqCst), "a batch was read without giving the worker back");
    while let Some(batch) = batches.next().await {
        rows += batch.unwrap().num_rows();
    }
    assert_eq!(rows, total);
}

/// Asked for [`basalt_common::api::SELECTED_COLUMN`], a scan sends a block keeping at least
/// half of its rows whole with the selection, and other blocks filtered and all marked: the
/// rows marked are exactly the rows a plain scan returns, with deletes and patches, by the
/// column scan and the index.
#[tokio::test]
async fn a_scan_marks_its_selection_when_asked() {
    use basalt_common::api::SELECTED_COLUMN;
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::open(&LeafConfig { data_dir: dir.path().to_path_buf(), ..Default::default() }).unwrap();
    let ops = (0..3000)
        .map(|i| upsert(json!({"_id": format!("d{i}"), "n": i, "kind": if i % 10 == 0 { "rare" } else { "common" }})))
        .collect();
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    let patch = WriteOp::Patch {
        id: "d500".into(),
        ops: vec![PatchOp { op: PatchKind::Replace, path: "/n".into(), value: Some(json!(-1)) }],
    };
    let ops = vec![patch, WriteOp::Delete { id: "d700".into() }];
    leaf.apply(ShardWrite { collection_id: 1, shard: 0, ops, position: None }).await.unwrap();
    let most = Filter::Cmp { path: "n".into(), op: CmpOp::GtEq, value: Scalar::Int(100) };
    let few = Filter::Cmp { path: "n".into(), op: CmpOp::Lt, value: Scalar::Int(250) };
    let rare = Filter::Cmp { path: "kind".into(), op: CmpOp::Eq, value: Scalar::Str("rare".into()) };
    for (filters, hint, whole) in [
        (vec![most.clone()], AccessPath::ColumnScan, true),
        (vec![few], AccessPath::ColumnScan, false),
        (vec![rare.clone()], AccessPath::SearchIndex, false),
        (vec![rare, most], AccessPath::ColumnScan, false),
    ] {
        let scan = |marked: bool| {
            let mut columns = vec![("_id".to_string(), ColumnType::Utf8)];
            if marked {
                columns.push((SELECTED_COLUMN.to_string(), ColumnType::Boolean));
            }
            ScanRequest {
                collection_id: 1,
                shard: 0,
                columns,
                filters: filters.clone(),
                limit: None,
                hint: Some(hint),
                ordered_by: None,
                text_views: true,
                text_codes: vec![],
            }
        };
        let ids = |batches: &[RecordBatch], marked: bool| {
            let mut ids = Vec::new();
            for b in batches {
                let id = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
                for i in 0..b.num_rows() {
                    if !marked || b.column(1).as_boolean().value(i) {
                        ids.push(id.as_string::<i32>().value(i).to_string());
                    }
                }
            }
            ids.sort();
            ids
        };
        let plain: Vec<RecordBatch> = leaf.scan(scan(false)).await.unwrap().map(|b| b.unwrap()).collect().await;
        let marked: Vec<RecordBatch> = leaf.scan(scan(true)).await.unwrap().map(|b| b.unwrap()).collect().await;
        let want = ids(&plain, false);
        assert!(!want.is_empty() && !want.contains(&"d700".to_string()), "{filters:?}");
        assert_eq!(ids(&marked, true), want, "{filters:?}");
        let sent: usize = marked.iter().map(RecordBatch::num_rows).sum();
        if whole {
            // Blocks went whole: rows not selected came too (d0..d99, d500 patched to -1).
            assert!(sent > want.len(), "{sent} rows sent for {} selected", want.len());
            assert!(want.len() == 3000 - 100 - 2, "{}", want.len());
        } else {
            assert_eq!(sent, want.len(), "{filters:?}: filtered, every row marked");
        }
    }
}
