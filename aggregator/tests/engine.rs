//! The engine against a real leaf, tailer and catalog in one process: the issue's example
//! session, statement by statement.

use std::sync::Arc;

use arrow::util::pretty::pretty_format_batches;
use basalt_aggregator::engine::{Engine, Output, Session};
use basalt_common::api::{Leaf, Meta, Tailer};
use futures::TryStreamExt;

async fn setup(dir: &std::path::Path) -> Session {
    let meta: Meta = Arc::new(basalt_meta::LocalMeta::open(&dir.join("meta")).unwrap());
    let storage: Leaf = Arc::new(
        basalt_leaf::Leaf::open(&basalt_leaf::LeafConfig { data_dir: dir.join("leaf"), ..Default::default() }).unwrap(),
    );
    let leaf: Leaf = Arc::new(basalt_fragment::FragmentLeaf::new(storage));
    let tailer: Tailer = Arc::new(basalt_tailer::Tailer::new(meta.clone(), leaf.clone(), Default::default()));
    Engine::new(meta, tailer, leaf).session()
}

async fn run(s: &Session, sql: &str) -> String {
    match s.execute_sql(sql, &[]).await {
        Err(e) => format!("ERROR {}: {}", e.code.as_str(), e.message),
        Ok(mut outs) => match outs.pop() {
            Some(Output::Rows(stream)) => {
                let batches: Vec<_> = stream.try_collect().await.unwrap();
                pretty_format_batches(&batches).unwrap().to_string()
            }
            Some(Output::Command { tag, rows }) => format!("{tag} {rows}"),
            None => String::new(),
        },
    }
}

/// Whether some table row has exactly these cells (trimmed), in order.
fn has_row(table: &str, cells: &[&str]) -> bool {
    table.lines().any(|line| {
        let got: Vec<&str> = line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        got == cells
    })
}

#[tokio::test]
async fn example_session_from_the_issue() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path()).await;
    assert_eq!(run(&s, "CREATE COLLECTION users").await, "CREATE COLLECTION 0");
    let insert = r#"INSERT INTO users VALUES ('{"_id": "u1", "name": "Ada", "age": 36, "address": {"city": "London"}, "tags": ["a","b"]}'), ('{"_id": "u2", "name": "Bob", "age": "unknown"}'), ('{"_id": "u3", "name": "Cy", "age": 25.5}')"#;
    assert_eq!(run(&s, insert).await, "INSERT 3");
    let out = run(&s, "SELECT name, address.city FROM users WHERE name = 'Ada'").await;
    assert!(has_row(&out, &["Ada", "London"]), "{out}");
    let out = run(&s, "UPDATE users SET address.city = 'Paris' WHERE _id = 'u1'").await;
    assert_eq!(out, "UPDATE 1");
    let out = run(&s, "SELECT address.city, tags[1] AS first_tag FROM users WHERE _id = 'u1'").await;
    assert!(has_row(&out, &["Paris", "a"]), "{out}");
    let out = run(&s, "DESCRIBE users").await;
    assert!(has_row(&out, &["age", "float", "1", "3", "Utf8"]), "{out}");
    assert!(has_row(&out, &["age", "int", "1", "3", "Utf8"]), "{out}");
    assert!(has_row(&out, &["address.city", "string", "1", "3", "Utf8"]), "{out}");
    assert!(has_row(&out, &["tags[*]", "string", "1", "3"]), "{out}");
    let out = run(&s, "SELECT _id FROM users WHERE search(name, 'ada')").await;
    assert!(out.contains("u1") && !out.contains("u2"), "{out}");
    let out = run(&s, "EXPLAIN SELECT * FROM users WHERE _id = 'u1'").await;
    assert!(out.contains("access_path=row_lookup"), "{out}");
    let out = run(&s, "EXPLAIN SELECT * FROM users WHERE search(name, 'ada')").await;
    assert!(out.contains("access_path=search_index"), "{out}");
    let out = run(&s, "EXPLAIN SELECT count(*) FROM users WHERE _event_time > now() - interval '1 hour'").await;
    assert!(out.contains("access_path=column_scan"), "{out}");
    assert_eq!(run(&s, "DELETE FROM users WHERE _id = 'u1'").await, "DELETE 1");
    let out = run(&s, "SELECT count(*) AS n FROM users").await;
    assert!(has_row(&out, &["2"]), "{out}");
    // Errors are clear and typed.
    assert!(run(&s, "SELEC 1").await.starts_with("ERROR syntax_error"));
    assert!(
        run(&s, "SELECT * FROM nope").await.starts_with("ERROR not_found"),
        "{}",
        run(&s, "SELECT * FROM nope").await
    );
    let out = run(&s, r#"INSERT INTO users VALUES ('{"_id": "ok1"}'), ('not json'), ('[1]')"#).await;
    assert!(out.starts_with("ERROR invalid_input: 2 of 3 documents failed (1 written)"), "{out}");
    let out = run(&s, "SELECT _id FROM users WHERE _id = 'ok1'").await;
    assert!(out.contains("ok1"), "{out}");
    assert!(run(&s, "INSERT INTO nope VALUES ('{}')").await.starts_with("ERROR not_found"));
}

/// Rows of a query with the schema they came with, rows sorted (to compare result sets).
async fn rows_with_schema(s: &Session, sql: &str, params: &[datafusion::common::ScalarValue]) -> (String, Vec<String>) {
    let mut outs = s.execute_sql(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let Some(Output::Rows(stream)) = outs.pop() else { panic!("{sql}: no rows") };
    let schema = stream.schema();
    let batches: Vec<_> = stream.try_collect().await.unwrap();
    let fields: Vec<String> =
        schema.fields().iter().map(|f| format!("{}:{}:{}", f.name(), f.data_type(), f.is_nullable())).collect();
    let text = pretty_format_batches(&batches).unwrap().to_string();
    let mut rows: Vec<String> = text.lines().skip(3).filter(|l| l.starts_with('|')).map(str::to_string).collect();
    rows.sort();
    (fields.join(","), rows)
}

#[tokio::test]
async fn point_lookups_answer_exactly_like_the_general_plan() {
    use datafusion::common::ScalarValue;
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path()).await;
    run(&s, "CREATE COLLECTION p WITH (shards = 3)").await;
    let mut values = Vec::new();
    for i in 0..60 {
        let doc = match i % 4 {
            0 => format!(r#"{{"_id": "k{i}", "n": {i}, "s": "v{i}", "o": {{"x": {i}.5}}, "t": ["a", "b"]}}"#),
            1 => format!(r#"{{"_id": "k{i}", "n": "text {i}", "flag": true}}"#),
            2 => format!(r#"{{"_id": "k{i}", "o": {{"x": 1, "y": "deep"}}}}"#),
            _ => format!(r#"{{"_id": "k{i}", "n": null}}"#),
        };
        values.push(format!("('{doc}')"));
    }
    assert_eq!(run(&s, &format!("INSERT INTO p VALUES {}", values.join(", "))).await, "INSERT 60");
    let cases = [
        "SELECT * FROM p WHERE _id = 'k0'",
        "SELECT * FROM commons.p WHERE _id = 'k1'",
        "SELECT n, o.x AS ox, _id FROM p WHERE _id = 'k2'",
        "SELECT n, n AS again FROM p WHERE 'k4' = _id",
        "SELECT * FROM p WHERE _id = 'missing'",
        "SELECT _id, s FROM p WHERE _id IN ('k0', 'k1', 'k0', 'k7', 'nope', 'k8')",
        "SELECT t, flag, o.y FROM p WHERE _id IN ('k9', 'k10', 'k11')",
    ];
    for sql in cases {
        let before = basalt_aggregator::fastpath::served();
        let fast = rows_with_schema(&s, sql, &[]).await;
        assert_eq!(basalt_aggregator::fastpath::served(), before + 1, "{sql} took the fast path");
        // The same question in a shape the fast path does not take.
        let general = rows_with_schema(&s, &format!("{sql} AND TRUE"), &[]).await;
        assert_eq!(basalt_aggregator::fastpath::served(), before + 1, "{sql} AND TRUE took the general plan");
        assert_eq!(fast, general, "{sql}");
    }
    // Parameters, as pgwire passes them.
    let params = [ScalarValue::Utf8(Some("k5".into())), ScalarValue::Utf8(Some("k6".into()))];
    let fast = rows_with_schema(&s, "SELECT * FROM p WHERE _id IN ($1, $2)", &params).await;
    let general = rows_with_schema(&s, "SELECT * FROM p WHERE _id IN ($1, $2) AND TRUE", &params).await;
    assert_eq!(fast.1.len(), 2);
    assert_eq!(fast, general);
    // Names that do not resolve keep the general plan's errors.
    assert!(run(&s, "SELECT nope FROM p WHERE _id = 'k0'").await.starts_with("ERROR undefined_column"));
    assert!(run(&s, "SELECT * FROM nope WHERE _id = 'k0'").await.starts_with("ERROR not_found"));
}

/// A leaf that counts planner-statistics calls and how many were in flight at once (each takes
/// 30 ms, as a slow round trip to a leaf process would).
struct CountingLeaf {
    inner: Leaf,
    calls: std::sync::atomic::AtomicUsize,
    in_flight: std::sync::atomic::AtomicUsize,
    most_in_flight: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl basalt_common::api::LeafApi for CountingLeaf {
    async fn apply(
        &self,
        w: basalt_common::api::ShardWrite,
    ) -> basalt_common::Result<basalt_common::api::ShardWriteResult> {
        self.inner.apply(w).await
    }
    async fn scan(&self, r: basalt_common::api::ScanRequest) -> basalt_common::Result<basalt_common::api::BatchStream> {
        self.inner.scan(r).await
    }
    async fn execute(
        &self,
        r: basalt_common::api::FragmentRequest,
    ) -> basalt_common::Result<basalt_common::api::BatchStream> {
        self.inner.execute(r).await
    }
    async fn stats(&self, id: u64, shards: Vec<u32>) -> basalt_common::Result<basalt_common::schema::SchemaStats> {
        self.inner.stats(id, shards).await
    }
    async fn planner_stats(
        &self,
        id: u64,
        shards: Vec<u32>,
        sketches: bool,
    ) -> basalt_common::Result<basalt_common::schema::SchemaStats> {
        use std::sync::atomic::Ordering::SeqCst;
        self.calls.fetch_add(1, SeqCst);
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.most_in_flight.fetch_max(now, SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        self.in_flight.fetch_sub(1, SeqCst);
        self.inner.planner_stats(id, shards, sketches).await
    }
    async fn estimate(
        &self,
        id: u64,
        shards: Vec<u32>,
        filters: Vec<basalt_common::filter::Filter>,
    ) -> basalt_common::Result<basalt_common::api::Estimate> {
        self.inner.estimate(id, shards, filters).await
    }
    async fn drop_collection(&self, id: u64) -> basalt_common::Result<()> {
        self.inner.drop_collection(id).await
    }
    async fn positions(
        &self,
        id: u64,
        shards: Vec<u32>,
        stream: u64,
    ) -> basalt_common::Result<Vec<basalt_common::api::ShardPosition>> {
        self.inner.positions(id, shards, stream).await
    }
}

#[tokio::test]
async fn a_statement_fetches_its_tables_statistics_at_once_and_fresh() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let meta: Meta = Arc::new(basalt_meta::LocalMeta::open(&dir.path().join("meta")).unwrap());
    let storage: Leaf = Arc::new(
        basalt_leaf::Leaf::open(&basalt_leaf::LeafConfig { data_dir: dir.path().join("leaf"), ..Default::default() })
            .unwrap(),
    );
    let counting = Arc::new(CountingLeaf {
        inner: Arc::new(basalt_fragment::FragmentLeaf::new(storage)),
        calls: Default::default(),
        in_flight: Default::default(),
        most_in_flight: Default::default(),
    });
    let leaf: Leaf = counting.clone();
    let tailer: Tailer = Arc::new(basalt_tailer::Tailer::new(meta.clone(), leaf.clone(), Default::default()));
    let s = Engine::new(meta, tailer, leaf).session();
    for (name, k) in [("a", 1), ("b", 1), ("c", 1)] {
        assert_eq!(run(&s, &format!("CREATE COLLECTION {name}")).await, "CREATE COLLECTION 0");
        let insert = format!(r#"INSERT INTO {name} VALUES ('{{"_id": "{name}1", "k": {k}}}')"#);
        assert_eq!(run(&s, &insert).await, "INSERT 1");
    }
    let join = "WITH x AS (SELECT k FROM a) SELECT count(*) AS n FROM x JOIN b ON x.k = b.k JOIN c ON b.k = c.k \
                JOIN a AS a2 ON a2.k = c.k";
    counting.calls.store(0, SeqCst);
    let out = run(&s, join).await;
    assert!(has_row(&out, &["1"]), "{out}");
    // Three collections (one named twice, and a CTE that is none): three calls, all in flight
    // together.
    assert_eq!(counting.calls.load(SeqCst), 3);
    assert_eq!(counting.most_in_flight.load(SeqCst), 3);
    // The next statement sees a collection dropped and created again (a new id), not what the
    // last one fetched.
    assert_eq!(run(&s, "DROP COLLECTION b").await, "DROP COLLECTION 0");
    assert_eq!(run(&s, "CREATE COLLECTION b").await, "CREATE COLLECTION 0");
    assert_eq!(run(&s, r#"INSERT INTO b VALUES ('{"_id": "b2", "k": 1, "extra": "new"}')"#).await, "INSERT 1");
    let out = run(&s, "SELECT b.extra FROM a JOIN b ON a.k = b.k").await;
    assert!(has_row(&out, &["new"]), "{out}");
    let out = run(&s, "SELECT count(*) AS n FROM b").await;
    assert!(has_row(&out, &["1"]), "{out}");
}
