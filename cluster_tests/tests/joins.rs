//! Join order from leaf statistics: a filtered small dimension is joined to the fact collection
//! first, whatever order the query names the tables in, and the answer is the same as in the
//! query's order. Small build sides are built once and send their keys to the probe side's
//! leaves, which then send only matching rows.

use basalt_cluster_tests::Deployment;

/// The largest `output_rows` of any hash join in an `EXPLAIN ANALYZE` plan.
fn largest_join(plan: &str) -> f64 {
    plan.lines()
        .filter(|l| l.contains("HashJoinExec"))
        .filter_map(|l| {
            let value: String = l.split("output_rows=").nth(1)?.chars().take_while(|c| *c != ',').collect();
            let mut words = value.split_whitespace();
            let n: f64 = words.next()?.parse().ok()?;
            Some(n * if words.next() == Some("K") { 1e3 } else { 1.0 })
        })
        .fold(0.0, f64::max)
}

/// A metric's value on the plan lines that mention `node` (the largest, when several do).
fn metric(plan: &str, node: &str, name: &str) -> f64 {
    plan.lines()
        .filter(|l| l.contains(node))
        .filter_map(|l| {
            let value: String =
                l.split(&format!("{name}=")).nth(1)?.chars().take_while(|c| *c != ',' && *c != ']').collect();
            let mut words = value.split_whitespace();
            let n: f64 = words.next()?.parse().ok()?;
            Some(n * if words.next() == Some("K") { 1e3 } else { 1.0 })
        })
        .fold(0.0, f64::max)
}

async fn explain(pg: &tokio_postgres::Client, sql: &str) -> String {
    let rows = pg.query(&format!("EXPLAIN ANALYZE {sql}"), &[]).await.expect("explain");
    rows.iter().map(|r| r.get::<_, String>(1)).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_start_from_the_most_selective_input() {
    joins_in_order(Deployment::dev().await).await;
}

/// The same over RPC: statistics with sketches come from two leaf processes and merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_start_from_the_most_selective_input_on_two_leaves() {
    joins_in_order(Deployment::cluster_of(2, &[]).await).await;
}

async fn joins_in_order(d: Deployment) {
    let pg = d.pg().await;
    pg.batch_execute(
        "CREATE WORKSPACE j;
         CREATE COLLECTION j.facts WITH (shards = 2);
         CREATE COLLECTION j.dim_a;
         CREATE COLLECTION j.dim_b;
         INSERT INTO j.facts SELECT 'f' || value AS _id, value % 50 AS a, value % 200 AS b,
             CAST(value AS DOUBLE) AS amount FROM generate_series(1, 20000);
         INSERT INTO j.dim_a SELECT 'a' || value AS _id, value AS id, 'n' || value AS name FROM generate_series(0, 49);
         INSERT INTO j.dim_b SELECT 'b' || value AS _id, value AS id, value % 3 AS kind FROM generate_series(0, 199)",
    )
    .await
    .expect("load");
    // In the order written, facts join dim_b first (20,000 rows) and the selective dim_a last.
    let sql = "SELECT count(*), sum(f.amount) FROM j.facts f, j.dim_b b, j.dim_a a
               WHERE f.b = b.id AND f.a = a.id AND a.name = 'n7' AND b.kind = 1";
    let want: Vec<f64> = (1..=20000).filter(|v| v % 50 == 7 && (v % 200) % 3 == 1).map(|v| v as f64).collect();
    let answer = |rows: Vec<tokio_postgres::Row>| (rows[0].get::<_, i64>(0), rows[0].get::<_, f64>(1));
    let expected = (want.len() as i64, want.iter().sum::<f64>());
    assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), expected);

    // Statements over one collection never ask the leaves for distinct sketches; joins do.
    let sketch_builds = || async {
        let text = reqwest::get(d.http("/metrics")).await.expect("metrics").text().await.expect("metrics body");
        text.lines()
            .find_map(|l| l.strip_prefix("basalt_leaf_sketch_builds_total "))
            .map_or(0.0, |v| v.trim().parse::<f64>().expect("counter"))
    };
    // (In dev the leaf's counters are on the same /metrics; leaf processes keep their own.)
    if d.leaf_addrs.is_empty() {
        let before = sketch_builds().await;
        pg.batch_execute("INSERT INTO j.facts SELECT 'g' || value AS _id, 1 AS a FROM generate_series(1, 5000)")
            .await
            .expect("grow facts by a tenth");
        pg.query("SELECT count(*) FROM j.facts WHERE a = 1", &[]).await.expect("one table");
        assert_eq!(sketch_builds().await, before, "a one-collection statement computed sketches");
        pg.batch_execute("DELETE FROM j.facts WHERE _id LIKE 'g%'").await.expect("shrink facts back");
    }
    // The join order shows in the aggregator's join metrics: these small dimensions would
    // otherwise be broadcast and the joins run on the leaves (`fragments.rs`).
    pg.batch_execute("SET basalt.broadcast = off").await.expect("set");
    let ordered = explain(&pg, sql).await;
    assert!(largest_join(&ordered) <= 400.0, "dim_a (one row) joins the facts first:\n{ordered}");
    // The small dimensions are built once (no repartitioning of the facts), and the one key
    // of dim_a reaches the leaves as a runtime filter: 400 of the 20,000 facts leave them.
    assert!(ordered.contains("mode=CollectLeft"), "{ordered}");
    assert!(metric(&ordered, "collection=j.facts", "runtime_key_lists") >= 1.0, "{ordered}");
    assert!(metric(&ordered, "collection=j.facts", "rows_from_leaves") <= 400.0, "{ordered}");

    // In the written order the dimensions' keys still reach the facts' leaves first.
    pg.batch_execute("SET basalt.join_order = off").await.expect("set");
    assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), expected);
    let written = explain(&pg, sql).await;
    assert!(metric(&written, "collection=j.facts", "rows_from_leaves") <= 400.0, "{written}");
    // Without runtime filters either, the order as written joins all facts with dim_b first.
    pg.batch_execute("SET datafusion.optimizer.enable_join_dynamic_filter_pushdown = false").await.expect("set");
    assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), expected);
    let written = explain(&pg, sql).await;
    assert!(largest_join(&written) >= 6000.0, "the order as written joins facts and dim_b first:\n{written}");
    assert!(metric(&written, "collection=j.facts", "rows_from_leaves") >= 20000.0, "{written}");
    let shown = pg.query("SHOW basalt.join_order", &[]).await.expect("show");
    assert_eq!(shown[0].get::<_, String>(0), "off");
    assert!(pg.batch_execute("SET basalt.join_order = sometimes").await.is_err());

    // Above a decorrelated EXISTS the join conditions reach the joins as filters, not keys:
    // they are still reordered (still without runtime filters, so the order shows).
    pg.batch_execute("SET basalt.join_order = on").await.expect("set");
    let exists = format!("{sql} AND EXISTS (SELECT 1 FROM j.dim_b b2 WHERE b2.id = f.b)");
    assert_eq!(answer(pg.query(&exists, &[]).await.expect("query")), expected);
    let plan = explain(&pg, &exists).await;
    assert!(largest_join(&plan) <= 400.0, "dim_a joins the facts first under an EXISTS:\n{plan}");
}

/// A join in partitioned mode (both sides hashed into partitions, as DataFusion plans a join
/// whose build side it cannot size) still sends its keys to the probe side's leaves: the scan
/// waits until every partition's build side is in, then applies the union of their key lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_join_sends_all_partitions_keys_to_the_leaves() {
    let d = Deployment::dev().await;
    let pg = d.pg().await;
    pg.batch_execute(
        "CREATE WORKSPACE p;
         CREATE COLLECTION p.facts WITH (shards = 2);
         CREATE COLLECTION p.dim WITH (shards = 2);
         INSERT INTO p.facts SELECT 'f' || value AS _id, value % 500 AS k, CAST(value AS DOUBLE) AS amount
             FROM generate_series(1, 20000);
         INSERT INTO p.dim SELECT 'd' || value AS _id, value AS id, value % 50 AS grp FROM generate_series(0, 499);
         SET datafusion.optimizer.hash_join_single_partition_threshold = 0;
         SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0",
    )
    .await
    .expect("load");
    // Ten dimension keys (7, 57, ..., 457), spread over both hash partitions.
    let sql = "SELECT count(*), sum(f.amount) FROM p.facts f JOIN p.dim d ON f.k = d.id WHERE d.grp = 7";
    let want: Vec<f64> = (1..=20000).filter(|v| (v % 500) % 50 == 7).map(|v| v as f64).collect();
    let rows = pg.query(sql, &[]).await.expect("query");
    assert_eq!((rows[0].get::<_, i64>(0), rows[0].get::<_, f64>(1)), (want.len() as i64, want.iter().sum::<f64>()));
    let plan = explain(&pg, sql).await;
    assert!(plan.contains("mode=Partitioned"), "{plan}");
    assert!(metric(&plan, "collection=p.facts", "runtime_key_lists") >= 1.0, "{plan}");
    assert!(metric(&plan, "collection=p.facts", "rows_from_leaves") <= want.len() as f64, "{plan}");
}

/// A join whose build side has a few keys out of many distinct values on the probe side finds
/// the probe side's rows through the search index (its terms for the keys) instead of reading
/// every block, with the same answer; an expert's forced path stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selective_key_list_is_found_through_the_index() {
    let d = Deployment::dev().await;
    let pg = d.pg().await;
    pg.batch_execute(
        "CREATE WORKSPACE x;
         CREATE COLLECTION x.facts WITH (shards = 2);
         CREATE COLLECTION x.dim;
         INSERT INTO x.facts SELECT 'f' || value AS _id, value % 1000 AS k, value % 7 AS q, CAST(value AS DOUBLE) AS amount
             FROM generate_series(1, 30000);
         INSERT INTO x.dim SELECT 'd' || value AS _id, value AS id, value % 200 AS grp FROM generate_series(0, 999);",
    )
    .await
    .expect("load");
    // Five dimension keys (3, 203, ..., 803) of the facts' 1,000; `q < 3` is checked on the rows
    // the index finds.
    let sql = "SELECT count(*), sum(f.amount) FROM x.facts f JOIN x.dim d ON f.k = d.id WHERE d.grp = 3 AND f.q < 3";
    let want: Vec<f64> = (1..=30000).filter(|v| (v % 1000) % 200 == 3 && v % 7 < 3).map(|v| v as f64).collect();
    let answer = |rows: Vec<tokio_postgres::Row>| (rows[0].get::<_, i64>(0), rows[0].get::<_, f64>(1));
    let expected = (want.len() as i64, want.iter().sum::<f64>());
    assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), expected);
    let plan = explain(&pg, sql).await;
    assert!(plan.contains("collection=x.facts shards=2 access_path=column_scan"), "{plan}");
    assert!(metric(&plan, "collection=x.facts", "runtime_index_scans") >= 1.0, "{plan}");
    assert!(metric(&plan, "collection=x.facts", "rows_from_leaves") <= want.len() as f64, "{plan}");

    pg.batch_execute("SET basalt.access_path = column_scan").await.expect("hint");
    assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), expected);
    let forced = explain(&pg, sql).await;
    assert_eq!(metric(&forced, "collection=x.facts", "runtime_index_scans"), 0.0, "{forced}");
    assert!(metric(&forced, "collection=x.facts", "runtime_key_lists") >= 1.0, "{forced}");
}

/// A build side with more keys than a runtime key list carries (5,000 here; lists stop at
/// 4,096) still reaches the probe side's leaves: its keys are collected as they stream into the
/// join (a key set), and the leaves send only the facts with a matching key. Built once or in
/// hash partitions, in one process or on two leaves, the answer is the join's; a prepared
/// statement run again after the data changed uses the keys of its new run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_build_side_sends_its_key_set_to_the_leaves() {
    large_key_sets(Deployment::dev().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_build_side_sends_its_key_set_to_two_leaves() {
    large_key_sets(Deployment::cluster_of(2, &[]).await).await;
}

async fn large_key_sets(d: Deployment) {
    let pg = d.pg().await;
    pg.batch_execute(
        "CREATE WORKSPACE k;
         CREATE COLLECTION k.facts WITH (shards = 2);
         CREATE COLLECTION k.dim WITH (shards = 2);
         INSERT INTO k.facts SELECT 'f' || value AS _id, value % 20000 AS k, CAST(value AS DOUBLE) AS amount
             FROM generate_series(1, 40000);
         INSERT INTO k.dim SELECT 'd' || value AS _id, value AS id, value % 4 AS grp FROM generate_series(0, 19999);",
    )
    .await
    .expect("load");
    let sql = "SELECT count(*), sum(f.amount) FROM k.facts f JOIN k.dim d ON f.k = d.id WHERE d.grp = 1";
    let expected = |n: i64| {
        let want: Vec<f64> = (1..=n).filter(|v| (v % 20000) % 4 == 1).map(|v| v as f64).collect();
        (want.len() as i64, want.iter().sum::<f64>())
    };
    let answer = |rows: Vec<tokio_postgres::Row>| (rows[0].get::<_, i64>(0), rows[0].get::<_, f64>(1));
    for partitioned in [false, true] {
        if partitioned {
            pg.batch_execute(
                "SET datafusion.optimizer.hash_join_single_partition_threshold = 0;
                 SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0",
            )
            .await
            .expect("partitioned joins");
        }
        assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), expected(40000));
        let plan = explain(&pg, sql).await;
        let mode = if partitioned { "mode=Partitioned" } else { "mode=CollectLeft" };
        assert!(plan.contains(mode) && plan.contains("KeySinkExec: key=id"), "{plan}");
        assert!(metric(&plan, "KeySinkExec", "build_keys") >= 5000.0, "{plan}");
        assert!(metric(&plan, "collection=k.facts", "runtime_key_lists") >= 1.0, "{plan}");
        assert!(metric(&plan, "collection=k.facts", "rows_from_leaves") <= 10000.0, "{plan}");
    }

    // One prepared statement, run before and after the facts grow: each run reads its own keys.
    let prepared = pg.prepare(sql).await.expect("prepare");
    assert_eq!(answer(pg.query(&prepared, &[]).await.expect("first run")), expected(40000));
    pg.batch_execute(
        "INSERT INTO k.facts SELECT 'f' || value AS _id, value % 20000 AS k, CAST(value AS DOUBLE) AS amount
             FROM generate_series(40001, 50000)",
    )
    .await
    .expect("grow");
    assert_eq!(answer(pg.query(&prepared, &[]).await.expect("second run")), expected(50000));

    // Keys that would keep most of the probe column's values are not sent: checking them would
    // cost about what the join saves.
    let broad = "SELECT count(*) FROM k.facts f JOIN k.dim d ON f.k = d.id WHERE d.grp <> 1";
    let rows = pg.query(broad, &[]).await.expect("broad");
    assert_eq!(rows[0].get::<_, i64>(0), 50000 - expected(50000).0);
    let plan = explain(&pg, broad).await;
    assert!(metric(&plan, "collection=k.facts", "rows_from_leaves") >= 50000.0, "{plan}");
}

/// A join on two keys, one of them a subquery's aggregate (TPC-H q2's shape): DataFusion's
/// runtime filter covers both keys and stops at the aggregate, so the integer key is followed
/// through the aggregate's group key and the join below it to the scan, which sends only the
/// rows of the parts the build side holds. Limits and computed group keys stop it: the answers
/// stay those of the query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_reach_scans_through_aggregates_and_two_key_joins() {
    keys_through_operators(Deployment::dev().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_reach_scans_through_aggregates_and_two_key_joins_on_two_leaves() {
    keys_through_operators(Deployment::cluster_of(2, &[]).await).await;
}

async fn keys_through_operators(d: Deployment) {
    let pg = d.pg().await;
    pg.batch_execute(
        "CREATE WORKSPACE x;
         CREATE COLLECTION x.parts WITH (shards = 2);
         CREATE COLLECTION x.offers WITH (shards = 2);
         INSERT INTO x.parts SELECT 'p' || value AS _id, value AS id, value % 50 AS size FROM generate_series(0, 19999);
         INSERT INTO x.offers SELECT 'o' || value AS _id, value % 20000 AS part, value % 97 AS supp,
             CAST((value * 7919) % 1009 AS DOUBLE) AS cost FROM generate_series(1, 80000);",
    )
    .await
    .expect("load");
    let offers: Vec<(i64, f64)> = (1..=80000i64).map(|v| (v % 20000, ((v * 7919) % 1009) as f64)).collect();
    let small = |part: i64| part % 50 == 3;

    // The cheapest offers of the small parts.
    let cheapest = "SELECT count(*), sum(o.cost) FROM x.parts p, x.offers o
        WHERE p.id = o.part AND p.size = 3
          AND o.cost = (SELECT min(o2.cost) FROM x.offers o2 WHERE o2.part = p.id)";
    let mut min = std::collections::HashMap::new();
    for (part, cost) in &offers {
        let m = min.entry(*part).or_insert(f64::MAX);
        *m = f64::min(*m, *cost);
    }
    let want: Vec<f64> = offers.iter().filter(|(p, c)| small(*p) && min[p] == *c).map(|(_, c)| *c).collect();
    let rows = pg.query(cheapest, &[]).await.expect("cheapest");
    assert_eq!((rows[0].get::<_, i64>(0), rows[0].get::<_, f64>(1)), (want.len() as i64, want.iter().sum::<f64>()));
    let plan = explain(&pg, cheapest).await;
    assert!(plan.contains("KeySinkExec"), "{plan}");
    // Without the set the subquery's scan sends all 80,000 offers to be aggregated.
    assert!(metric(&plan, "collection=x.offers", "rows_from_leaves") <= 1600.0, "{plan}");

    // The 30,000 most expensive offers (the larger join input: the probe side), then those of
    // small parts among them: dropping other parts' offers below the limit would let cheaper
    // offers of small parts in.
    let mut top = offers.clone();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let want: Vec<f64> = top[..30000].iter().filter(|(p, _)| small(*p)).map(|(_, c)| *c).collect();
    let limited = "SELECT count(*), sum(t.amount) FROM x.parts p
        JOIN (SELECT part, cost AS amount FROM x.offers ORDER BY cost DESC, part LIMIT 30000) t ON t.part = p.id
        WHERE p.size = 3";
    let rows = pg.query(limited, &[]).await.expect("limited");
    assert_eq!((rows[0].get::<_, i64>(0), rows[0].get::<_, f64>(1)), (want.len() as i64, want.iter().sum::<f64>()));

    // A join on two keys whose first key keeps every row (all 97 suppliers reach the build
    // side) and second keeps few (the 400 small parts): the second key's set reaches the scan
    // (TPC-H q9's join of `partsupp`).
    let two_keys = "SELECT count(*), sum(o.cost) FROM x.offers o,
          (SELECT o2.supp AS s, p.id AS pid FROM x.parts p, x.offers o2 WHERE p.id = o2.part AND p.size = 3) b
        WHERE o.supp = b.s AND o.part = b.pid";
    let mut pairs: std::collections::HashMap<(i64, i64), i64> = std::collections::HashMap::new();
    for (i, (part, _)) in offers.iter().enumerate() {
        if small(*part) {
            *pairs.entry((((i as i64) + 1) % 97, *part)).or_default() += 1;
        }
    }
    let (mut n, mut sum) = (0i64, 0f64);
    for (i, (part, cost)) in offers.iter().enumerate() {
        if let Some(times) = pairs.get(&((((i as i64) + 1) % 97), *part)) {
            n += times;
            sum += *cost * *times as f64;
        }
    }
    let rows = pg.query(two_keys, &[]).await.expect("two keys");
    assert_eq!((rows[0].get::<_, i64>(0), rows[0].get::<_, f64>(1)), (n, sum));
    let plan = explain(&pg, two_keys).await;
    assert!(metric(&plan, "collection=x.offers", "rows_from_leaves") <= 1600.0, "{plan}");

    // Groups keyed on a computed value: the build side's keys are values of `part % 997`, not
    // of `part`.
    let computed = "SELECT count(*), sum(t.n) FROM x.parts p
        JOIN (SELECT part % 997 AS g, count(*) AS n FROM x.offers GROUP BY part % 997) t ON t.g = p.id
        WHERE p.size = 3";
    let joined: Vec<i64> = (0..997).filter(|g| small(*g)).collect();
    let n = offers.iter().filter(|(p, _)| joined.contains(&(p % 997))).count() as i64;
    let rows = pg.query(computed, &[]).await.expect("computed");
    assert_eq!((rows[0].get::<_, i64>(0), rows[0].get::<_, i64>(1)), (joined.len() as i64, n));
}

/// TPC-H q10's shape: sums over orders and their lines grouped by the customer's key, name and
/// nation. The lines are summed per `o.cust` below the join with the (unfiltered) customers and
/// nations, and the answer is the query's: customers sharing a key each get their orders' sum,
/// two identical customers add up in one group, min and max merge, counts add up. A filtered other side, an
/// `avg`, or `SET basalt.join_order = off` keeps the plan as written, with the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_go_below_joins_with_large_unfiltered_inputs() {
    aggregates_below_joins(Deployment::dev().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_go_below_joins_with_large_unfiltered_inputs_on_two_leaves() {
    aggregates_below_joins(Deployment::cluster_of(2, &[]).await).await;
}

async fn aggregates_below_joins(d: Deployment) {
    let pg = d.pg().await;
    pg.batch_execute(
        "CREATE WORKSPACE e;
         CREATE COLLECTION e.customers WITH (shards = 2);
         CREATE COLLECTION e.nations;
         CREATE COLLECTION e.orders WITH (shards = 2);
         CREATE COLLECTION e.lines WITH (shards = 2);
         INSERT INTO e.customers SELECT 'c' || value AS _id,
             CASE WHEN value < 3000 THEN value % 2000 ELSE value - 3000 END AS id,
             'n' || CASE WHEN value < 3000 THEN value ELSE value - 3000 END AS name, value % 5 AS nation
             FROM generate_series(0, 3099);
         INSERT INTO e.nations SELECT 'n' || value AS _id, value AS id, 'nation' || value AS name FROM generate_series(0, 4);
         INSERT INTO e.orders SELECT 'o' || value AS _id, value AS id, value % 2500 AS cust, value % 100 AS day
             FROM generate_series(1, 20000);
         INSERT INTO e.lines SELECT 'l' || value AS _id, value % 20000 + 1 AS ord, CAST(value % 97 AS DOUBLE) AS amount,
             value % 3 AS flag FROM generate_series(1, 60000);",
    )
    .await
    .expect("load");
    // The answer, computed here: per customer key, the amounts of its orders' kept lines.
    let mut by_order: std::collections::HashMap<i64, Vec<f64>> = std::collections::HashMap::new();
    for v in 1..=60000i64 {
        if v % 3 == 0 {
            by_order.entry(v % 20000 + 1).or_default().push((v % 97) as f64);
        }
    }
    let mut by_cust: std::collections::HashMap<i64, Vec<f64>> = std::collections::HashMap::new();
    for o in 1..=20000i64 {
        if o % 100 < 30
            && let Some(amounts) = by_order.get(&o)
        {
            by_cust.entry(o % 2500).or_default().extend(amounts);
        }
    }
    let want = |nation_filter: Option<i64>| {
        // Per (key, name, nation): sum, min, max and count of the amounts.
        type Group = (f64, f64, f64, i64);
        let mut groups: std::collections::BTreeMap<(i64, String, String), Group> = Default::default();
        for v in 0..3100i64 {
            let (id, name) = if v < 3000 { (v % 2000, format!("n{v}")) } else { (v - 3000, format!("n{}", v - 3000)) };
            if nation_filter.is_some_and(|n| n != v % 5) {
                continue;
            }
            let Some(amounts) = by_cust.get(&id) else { continue };
            let g = groups.entry((id, name, format!("nation{}", v % 5))).or_insert((0.0, f64::MAX, f64::MIN, 0));
            g.0 += amounts.iter().sum::<f64>();
            g.1 = amounts.iter().copied().fold(g.1, f64::min);
            g.2 = amounts.iter().copied().fold(g.2, f64::max);
            g.3 += amounts.len() as i64;
        }
        groups
            .into_iter()
            .map(|((id, name, nation), (s, lo, hi, n))| (id, name, nation, s, lo, hi, n))
            .collect::<Vec<_>>()
    };
    let got = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, f64>(3),
                    r.get::<_, f64>(4),
                    r.get::<_, f64>(5),
                    r.get::<_, i64>(6),
                )
            })
            .collect::<Vec<_>>()
    };
    let sql = |extra: &str| {
        format!(
            "SELECT c.id, c.name, n.name, sum(l.amount), min(l.amount), max(l.amount), count(*)
             FROM e.customers c, e.orders o, e.lines l, e.nations n
             WHERE c.id = o.cust AND l.ord = o.id AND o.day < 30 AND l.flag = 0 AND c.nation = n.id {extra}
             GROUP BY c.id, c.name, n.name ORDER BY 1, 2, 3"
        )
    };
    let all = want(None);
    assert!(all.len() > 500 && all.iter().any(|g| g.0 == 5 && g.1 == "n5"), "the data has groups to check");
    let q = sql("");
    assert_eq!(got(pg.query(&q, &[]).await.expect("query")), all);
    let plan = explain(&pg, &q).await;
    assert!(plan.contains("gby=[o_custkey") || plan.contains("aggr=[sum(l.amount) as __basalt_eager_0"), "{plan}");
    // Only the lines' sums per customer key meet the customers: at most one row per key.
    assert!(metric(&plan, "__basalt_eager_0]", "output_rows") <= 2000.0, "{plan}");

    // A filtered input on the other side would stop reducing the sums' input: no rewrite.
    let one_nation = sql("AND n.name = 'nation3'");
    assert_eq!(got(pg.query(&one_nation, &[]).await.expect("query")), want(Some(3)));
    assert!(!explain(&pg, &one_nation).await.contains("__basalt_eager"));
    // Without groups a count over no rows is 0 (a sum of counts would be NULL): not rewritten.
    let none = "SELECT count(*), sum(l.amount) FROM e.customers c, e.orders o, e.lines l
                WHERE c.id = o.cust AND l.ord = o.id AND o.day < 0";
    let rows = pg.query(none, &[]).await.expect("no rows");
    assert_eq!((rows[0].get::<_, i64>(0), rows[0].get::<_, Option<f64>>(1)), (0, None));
    assert!(!explain(&pg, none).await.contains("__basalt_eager"));
    // `avg` is not merged from partial results here.
    let avg = "SELECT c.id, avg(l.amount) FROM e.customers c, e.orders o, e.lines l
               WHERE c.id = o.cust AND l.ord = o.id GROUP BY c.id";
    assert!(!explain(&pg, avg).await.contains("__basalt_eager"));
    // Off with the join order, with the same answer.
    pg.batch_execute("SET basalt.join_order = off").await.expect("set");
    assert_eq!(got(pg.query(&q, &[]).await.expect("query")), all);
    assert!(!explain(&pg, &q).await.contains("__basalt_eager"));
}
