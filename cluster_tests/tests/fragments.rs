//! Plan fragments across two leaf processes: an aggregate's answer moves from the leaves as
//! partial results (a few hundred bytes), not as the rows it reads; a killed leaf fails the
//! query with a clear error, the aggregator stays up, and after the restart nothing is lost.

use std::time::Duration;

use basalt_cluster_tests::Deployment;

/// The sum of a counter over the lines of an `EXPLAIN ANALYZE` plan (DataFusion prints counts
/// as `123`, `12.34 K`, `1.2 M`).
fn metric(plan: &str, name: &str) -> f64 {
    let mut total = 0.0;
    for part in plan.split(&format!("{name}=")).skip(1) {
        let value: String = part.chars().take_while(|c| *c != ',' && *c != ']').collect();
        let mut words = value.split_whitespace();
        let number: f64 = words.next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{name}={value}"));
        let scale = match words.next() {
            Some("K") => 1e3,
            Some("M") => 1e6,
            Some("B") => 1e9,
            _ => 1.0,
        };
        total += number * scale;
    }
    total
}

async fn explain_analyze(pg: &tokio_postgres::Client, sql: &str) -> String {
    let rows = pg.query(&format!("EXPLAIN ANALYZE {sql}"), &[]).await.expect("explain analyze");
    rows.iter().map(|r| r.get::<_, String>(1)).collect::<Vec<_>>().join("\n")
}

async fn answer(pg: &tokio_postgres::Client, sql: &str) -> Vec<(i64, i64, f64)> {
    let rows = pg.query(sql, &[]).await.expect("query");
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_move_little_data_and_lookup_joins_do_not_scan() {
    let mut d = Deployment::cluster_of(2, &[]).await;
    let pg = d.pg().await;
    pg.batch_execute(
        "CREATE WORKSPACE f; CREATE COLLECTION f.events WITH (shards = 4);
         INSERT INTO f.events SELECT 'e' || value AS _id, value % 10 AS store, CAST(value AS DOUBLE) AS amount,
             repeat('x', 40) AS note FROM generate_series(1, 40000)",
    )
    .await
    .expect("load");
    let sql = "SELECT store, count(*), sum(amount) FROM f.events GROUP BY store ORDER BY store";
    let want: Vec<(i64, i64, f64)> = (0..10)
        .map(|s| {
            let values: Vec<i64> = (1..=40000).filter(|v| v % 10 == s).collect();
            (s, values.len() as i64, values.iter().sum::<i64>() as f64)
        })
        .collect();
    assert_eq!(answer(&pg, sql).await, want);

    let pushed = explain_analyze(&pg, sql).await;
    assert!(pushed.contains("LeafFragmentExec"), "{pushed}");
    let (rows_pushed, bytes_pushed) = (metric(&pushed, "rows_from_leaves"), metric(&pushed, "bytes_from_leaves"));
    // Four shards send at most one partial row per store each.
    assert!(rows_pushed <= 40.0, "{rows_pushed} rows moved\n{pushed}");

    pg.batch_execute("SET basalt.fragments = off").await.unwrap();
    assert_eq!(answer(&pg, sql).await, want);
    let pulled = explain_analyze(&pg, sql).await;
    assert!(!pulled.contains("LeafFragmentExec"), "{pulled}");
    let (rows_pulled, bytes_pulled) = (metric(&pulled, "rows_from_leaves"), metric(&pulled, "bytes_from_leaves"));
    assert_eq!(rows_pulled, 40000.0, "{pulled}");
    assert!(bytes_pushed * 100.0 < bytes_pulled, "fragments moved {bytes_pushed} bytes, scans {bytes_pulled}");
    println!("rows moved: {rows_pushed} vs {rows_pulled}; bytes moved: {bytes_pushed} vs {bytes_pulled}");
    pg.batch_execute("SET basalt.fragments = on").await.unwrap();

    // The feature-store pattern: a few events joined to their users by `_id`. The join's build
    // side (the filtered events) becomes a runtime filter on the users scan, which turns into
    // row-store lookups: the users collection is not scanned.
    pg.batch_execute(
        "CREATE COLLECTION f.users WITH (shards = 4);
         INSERT INTO f.users SELECT 'u' || value AS _id, value % 3 AS tier FROM generate_series(1, 30000);
         CREATE COLLECTION f.clicks WITH (shards = 2);
         INSERT INTO f.clicks SELECT 'c' || value AS _id, 'u' || (value * 7) AS user_id FROM generate_series(1, 4000)",
    )
    .await
    .expect("load users and clicks");
    let join = "SELECT c._id, u.tier FROM f.clicks c JOIN f.users u ON c.user_id = u._id \
                WHERE c._id IN ('c1', 'c2', 'c3', 'c4000') ORDER BY c._id";
    let rows = pg.query(join, &[]).await.expect("lookup join");
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // c4000's user u28000 exists; every user id is 7 * n.
    assert_eq!(
        got,
        vec![("c1".into(), 7 % 3), ("c2".into(), 14 % 3), ("c3".into(), 21 % 3), ("c4000".into(), 28000 % 3)]
    );
    let plan = explain_analyze(&pg, join).await;
    let users_scan =
        plan.lines().find(|l| l.contains("collection=f.users")).unwrap_or_else(|| panic!("no users scan in\n{plan}"));
    assert!(users_scan.contains("runtime_filters=1"), "{users_scan}");
    assert!(metric(users_scan, "runtime_id_lookups") >= 1.0, "{users_scan}");
    assert!(metric(users_scan, "rows_from_leaves") <= 4.0, "{users_scan}");

    // A leaf dies: the query fails with a clear error and the aggregator keeps serving.
    d.proc("leaf2").kill9();
    let err = pg.query(sql, &[]).await.expect_err("a query over a dead leaf fails");
    let db = err.as_db_error().expect("a database error, not a dropped connection");
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert_eq!(pg.query_one("SELECT 1", &[]).await.unwrap().get::<_, i64>(0), 1);

    // Back again: every acknowledged document is there.
    d.proc("leaf2").restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match pg.query(sql, &[]).await {
            Ok(rows) if rows.len() == 10 => break,
            other => {
                assert!(std::time::Instant::now() < deadline, "leaf2 did not come back: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(answer(&pg, sql).await, want);
}

/// A column every shard holds in ascending order (keys written in order, as a time series or
/// a sorted bulk load writes them) is the order the leaves scan in, and their partial
/// aggregates grouped by it stream (`fragment::tests`). Once a write breaks the order, plans
/// stop asking for it and answers stay the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_in_key_order_aggregate_as_streams() {
    scans_in_key_order(Deployment::dev().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_in_key_order_aggregate_as_streams_on_two_leaves() {
    scans_in_key_order(Deployment::cluster_of(2, &[]).await).await;
}

async fn scans_in_key_order(d: Deployment) {
    let pg = d.pg().await;
    pg.batch_execute("CREATE WORKSPACE o; CREATE COLLECTION o.lines WITH (shards = 2)").await.expect("create");
    // Statements of one batch each, one after another: a shard gets its rows in key order.
    for start in (0..20000).step_by(5000) {
        let insert = format!(
            "INSERT INTO o.lines SELECT 'l' || value AS _id, value / 4 AS k, (value * 7919) % 100 AS q
                 FROM generate_series({start}, {})",
            start + 4999
        );
        pg.batch_execute(&insert).await.expect("load");
    }
    let grouped = "SELECT k, count(*), CAST(sum(q) AS DOUBLE) FROM o.lines GROUP BY k HAVING sum(q) > 300 ORDER BY k";
    let want = |extra: &[(i64, i64)]| -> Vec<(i64, i64, f64)> {
        let mut groups = std::collections::BTreeMap::<i64, (i64, i64)>::new();
        let rows = (0..20000i64).map(|v| (v / 4, (v * 7919) % 100)).chain(extra.iter().copied());
        for (k, q) in rows {
            let g = groups.entry(k).or_default();
            *g = (g.0 + 1, g.1 + q);
        }
        groups.into_iter().filter(|(_, (_, s))| *s > 300).map(|(k, (n, s))| (k, n, s as f64)).collect()
    };
    assert_eq!(answer(&pg, grouped).await, want(&[]));
    let plan = explain_analyze(&pg, grouped).await;
    assert!(plan.contains("ordered_by=k"), "the leaves scan in key order:\n{plan}");
    // The final aggregate merges the shards' sorted partial groups and streams too.
    assert!(final_aggregate(&plan).contains("ordering_mode=Sorted"), "{plan}");
    let first = "SELECT k, q FROM o.lines ORDER BY k, q LIMIT 3";
    let keys = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>();
    assert_eq!(keys(pg.query(first, &[]).await.expect("query")), vec![0, 0, 0]);

    // A late row with a small key (and a key of its own) breaks the order on its shard.
    pg.batch_execute("INSERT INTO o.lines SELECT 'late' AS _id, 2 AS k, 99 AS q UNION ALL SELECT 'later', -1, 301")
        .await
        .expect("late rows");
    assert_eq!(answer(&pg, grouped).await, want(&[(2, 99), (-1, 301)]));
    let plan = explain_analyze(&pg, grouped).await;
    assert!(!plan.contains("ordered_by=k"), "{plan}");
    assert!(!final_aggregate(&plan).contains("ordering_mode"), "{plan}");
    assert_eq!(keys(pg.query(first, &[]).await.expect("query")), vec![-1, 0, 0]);
}

/// The line of a plan showing its final aggregate (on the aggregator).
fn final_aggregate(plan: &str) -> &str {
    plan.lines()
        .find(|line| line.contains("AggregateExec: mode=Final"))
        .unwrap_or_else(|| panic!("no final aggregate in\n{plan}"))
}

/// What blocks keep for filters (narrow offsets of integers, dictionaries of text with few
/// values, text parsed as dates) stays within the process's budget: with the default budget
/// the leaf keeps all three (the gauge counts their bytes); with none (`--filter-cache-max-bytes
/// 0`, here through `BASALT_FILTER_CACHE_MAX_BYTES`) it keeps nothing and compares the stored
/// values; the answers are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_caches_stay_within_their_budget() {
    // discount, quantity, day key, kind, (month, day) of the shipped date
    type Row = (i64, i64, i64, i64, (i64, i64));
    let rows: Vec<Row> =
        (0..40_000i64).map(|v| (v % 11, 1 + v % 50, 19_920_101 + v % 2_557, v % 5, (1 + v % 9, 10 + v % 10))).collect();
    let kept: Vec<_> = rows
        .iter()
        .filter(|(d, q, day, kind, month_day)| {
            (1..=3).contains(d) && *q < 25 && *day >= 19_921_000 && (1..=2).contains(kind) && *month_day >= (3, 1)
        })
        .collect();
    let want = (kept.len() as i64, kept.iter().map(|(_, q, ..)| q).sum::<i64>());
    assert!(want.0 > 100, "the test's filter keeps some rows: {want:?}");
    for budget in [None, Some("0")] {
        let env: Vec<(String, String)> =
            budget.map(|b| vec![("BASALT_FILTER_CACHE_MAX_BYTES".to_string(), b.to_string())]).unwrap_or_default();
        let d = Deployment::dev_with(&[], &env).await;
        let pg = d.pg().await;
        // 20,000 documents per shard: two sealed blocks of 8,192 each and a tail.
        pg.batch_execute(
            "CREATE COLLECTION o WITH (shards = 2);
             INSERT INTO o SELECT 'k' || value AS _id, value % 11 AS discount, 1 + value % 50 AS qty,
                 19920101 + value % 2557 AS day, 'kind' || (value % 5) AS kind,
                 '1995-0' || (1 + value % 9) || '-' || (10 + value % 10) AS shipped
                 FROM generate_series(0, 39999)",
        )
        .await
        .expect("load");
        let sql = "SELECT count(*), CAST(sum(qty) AS BIGINT) FROM o WHERE discount BETWEEN 1 AND 3 AND qty < 25 \
                   AND day >= 19921000 AND kind IN ('kind1', 'kind2') AND shipped >= DATE '1995-03-01'";
        for _ in 0..2 {
            let row = pg.query_one(sql, &[]).await.expect("query");
            assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), want, "budget {budget:?}");
        }
        let text = reqwest::get(d.http("/metrics")).await.expect("metrics").text().await.expect("metrics body");
        let bytes = text
            .lines()
            .find_map(|l| l.strip_prefix("basalt_leaf_filter_cache_bytes "))
            .map_or(0.0, |v| v.trim().parse::<f64>().expect("gauge"));
        match budget {
            // Two shards' four sealed blocks: three one- or two-byte offsets, the kinds' codes
            // (two bytes a row) and the parsed dates (four bytes a row) at least.
            None => assert!(bytes >= 4.0 * 8192.0 * (3.0 + 2.0 + 4.0), "kept for filters: {bytes} bytes"),
            Some(_) => assert_eq!(bytes, 0.0, "kept for filters past a budget of none"),
        }
    }
}

/// A common table expression read in two places (TPC-H q15's shape: the scalar subquery's
/// `max` and the join) is aggregated once: EXPLAIN shows both readers behind a `SharedExec`,
/// EXPLAIN ANALYZE as many replays as computations; the answer equals the test's own, on dev
/// and on two leaf processes. A CTE that calls a volatile function is not shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cte_read_twice_is_aggregated_once() {
    // (supplier, price, day) per row; revenue per supplier over days below 50.
    let rows: Vec<(i64, i64, i64)> = (0..30_000i64).map(|v| (v % 7, v % 13, v % 100)).collect();
    let mut revenue = std::collections::BTreeMap::<i64, i64>::new();
    for (s, p, d) in &rows {
        if *d < 50 {
            *revenue.entry(*s).or_default() += p;
        }
    }
    let top = revenue.values().copied().max().expect("some revenue");
    let want: Vec<(i64, i64)> = revenue.iter().filter(|(_, r)| **r == top).map(|(s, r)| (*s, *r)).collect();
    let sql = "WITH rev AS (SELECT s, CAST(sum(p) AS BIGINT) AS total FROM li WHERE d < 50 GROUP BY s)
               SELECT s, total FROM rev WHERE total = (SELECT max(total) FROM rev) ORDER BY s";
    for two_leaves in [false, true] {
        let d = if two_leaves { Deployment::cluster_of(2, &[]).await } else { Deployment::dev().await };
        let pg = d.pg().await;
        pg.batch_execute(
            "CREATE COLLECTION li WITH (shards = 2);
             INSERT INTO li SELECT 'r' || value AS _id, value % 7 AS s, value % 13 AS p, value % 100 AS d
                 FROM generate_series(0, 29999)",
        )
        .await
        .expect("load");
        let got: Vec<(i64, i64)> =
            pg.query(sql, &[]).await.expect("query").iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(got, want, "two leaves: {two_leaves}");
        let plan = explain_analyze(&pg, sql).await;
        let shared: Vec<&str> = plan.lines().filter(|l| l.contains("SharedExec: readers=2")).collect();
        assert_eq!(shared.len(), 2, "{plan}");
        let metric = |name: &str| -> u64 {
            shared
                .iter()
                .filter_map(|l| l.split(&format!("{name}=")).nth(1))
                .map(|v| v.split(|c: char| !c.is_ascii_digit()).next().unwrap_or("0").parse::<u64>().unwrap_or(0))
                .sum()
        };
        assert!(metric("computed") >= 1 && metric("computed") == metric("replayed"), "{plan}");
        // A volatile function inside the aggregation: each place computes its own (one above
        // it, as `sum(p) + random()`, would still share the aggregation below it).
        let volatile = "WITH rev AS (SELECT s, sum(p * random()) AS total FROM li GROUP BY s)
                        SELECT count(*) FROM rev WHERE total <= (SELECT max(total) FROM rev)";
        let plan = explain_analyze(&pg, volatile).await;
        assert!(!plan.contains("SharedExec"), "{plan}");
        drop(d);
    }
}

/// A join with a small build side (a filtered dimension) runs on the leaf processes with the
/// build side's rows sent to them: what moves back is the partial aggregates, not the matching
/// fact rows. Same answers with the broadcast off, and for a build side with no rows. In
/// `basalt dev` (leaves in the process, no bytes to save) the join stays on the aggregator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_dimensions_are_broadcast_to_the_leaves() {
    // facts: (item = v % 1000, amount = v); items: (item, category 'c' || item % 10).
    let mut want = std::collections::BTreeMap::<String, (i64, i64)>::new();
    for v in 0..40_000i64 {
        let category = format!("c{}", (v % 1000) % 10);
        if category == "c1" || category == "c2" {
            let entry = want.entry(category).or_default();
            entry.0 += 1;
            entry.1 += v;
        }
    }
    let want: Vec<(String, i64, i64)> = want.into_iter().map(|(c, (n, s))| (c, n, s)).collect();
    let sql = "SELECT i.category, count(*), CAST(sum(f.amount) AS BIGINT) FROM facts f JOIN items i ON f.item = i.item
               WHERE i.category IN ('c1', 'c2') GROUP BY i.category ORDER BY i.category";
    for two_leaves in [false, true] {
        let d = if two_leaves { Deployment::cluster_of(2, &[]).await } else { Deployment::dev().await };
        let pg = d.pg().await;
        pg.batch_execute(
            "CREATE COLLECTION facts WITH (shards = 2);
             INSERT INTO facts SELECT 'f' || value AS _id, value % 1000 AS item, value AS amount
                 FROM generate_series(0, 39999);
             CREATE COLLECTION items WITH (shards = 2);
             INSERT INTO items SELECT 'i' || value AS _id, value AS item, 'c' || (value % 10) AS category
                 FROM generate_series(0, 999)",
        )
        .await
        .expect("load");
        let answer = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, i64, i64)> {
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
        };
        assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), want, "two leaves: {two_leaves}");
        let plan = explain_analyze(&pg, sql).await;
        let facts = plan.lines().find(|l| l.contains("collection=commons.facts")).unwrap_or_else(|| panic!("{plan}"));
        if !two_leaves {
            assert!(!plan.contains("broadcast_builds"), "{plan}");
            assert_eq!(metric(facts, "rows_from_leaves"), 8000.0, "{plan}");
            continue;
        }
        assert!(facts.contains("broadcast_builds=1") && facts.contains("HashJoinExec"), "{plan}");
        // Two shards, each sends one partial row per category; the 200 items went the other way.
        assert!(metric(facts, "rows_from_leaves") <= 4.0, "{plan}");
        assert_eq!(metric(facts, "broadcast_rows"), 200.0, "{plan}");

        pg.batch_execute("SET basalt.broadcast = off").await.expect("set");
        assert_eq!(answer(pg.query(sql, &[]).await.expect("query")), want);
        let plan = explain_analyze(&pg, sql).await;
        let facts = plan.lines().find(|l| l.contains("collection=commons.facts")).unwrap_or_else(|| panic!("{plan}"));
        assert!(!plan.contains("broadcast_builds"), "{plan}");
        // The items' keys filter the facts on the leaves: the matching fifth of them moves.
        assert_eq!(metric(facts, "rows_from_leaves"), 8000.0, "{plan}");
        pg.batch_execute("SET basalt.broadcast = on").await.expect("set");

        // No item matches: nothing is sent, nothing returned.
        let none = "SELECT count(*) FROM facts f JOIN items i ON f.item = i.item WHERE i.category = 'none'";
        assert_eq!(pg.query_one(none, &[]).await.expect("query").get::<_, i64>(0), 0);
        drop(d);
    }
}

/// Every row of a simple-query answer as text (NULL as `None`).
async fn rows_of(pg: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = pg.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// A partial aggregate on a leaf grouped by text columns alone runs over codes into each
/// block's distinct values (`fragment::coded`): the same answers as the test's own and as the
/// aggregator's plain plan (`SET basalt.fragments = off`), with nulls in a group column, a
/// column with too many values for a block dictionary (each row its own code), a FILTER
/// clause, rows deleted and rows updated since their blocks were written (overlaid blocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_groups_aggregate_over_codes() {
    let rows: Vec<(i64, &str, Option<&str>, i64)> = (0..40_000i64)
        .map(|v| {
            let flag = ["A", "N", "R"][(v % 3) as usize];
            let status = if v % 17 == 0 { None } else { Some(["F", "O"][(v % 2) as usize]) };
            (v, flag, status, v % 50)
        })
        .collect();
    let mut want = std::collections::BTreeMap::<(String, Option<String>), (i64, i64, i64)>::new();
    for (_, flag, status, qty) in rows.iter().filter(|r| r.3 < 40) {
        let g = want.entry((flag.to_string(), status.map(str::to_string))).or_default();
        *g = (g.0 + 1, g.1 + qty, g.2 + i64::from(*qty > 10));
    }
    // Nulls sort last, as in the query.
    let mut want: Vec<Vec<Option<String>>> = want
        .into_iter()
        .map(|((flag, status), (n, q, over))| {
            vec![Some(flag), status, Some(n.to_string()), Some(q.to_string()), Some(over.to_string())]
        })
        .collect();
    want.sort_by(|a, b| (&a[0], a[1].is_none(), &a[1]).cmp(&(&b[0], b[1].is_none(), &b[1])));
    let grouped = "SELECT flag, status, count(*), CAST(sum(qty) AS BIGINT), count(*) FILTER (WHERE qty > 10) \
                   FROM g.items WHERE qty < 40 GROUP BY flag, status ORDER BY flag, status";
    let by_name = "SELECT name, count(*), CAST(sum(qty) AS BIGINT), avg(price) FROM g.items \
                   GROUP BY name HAVING count(*) > 4 ORDER BY name";
    let one = "SELECT status, count(*), min(qty), max(price) FROM g.items GROUP BY status ORDER BY status";
    for two_leaves in [false, true] {
        let d = if two_leaves { Deployment::cluster_of(2, &[]).await } else { Deployment::dev().await };
        let pg = d.pg().await;
        pg.batch_execute(
            "CREATE WORKSPACE g; CREATE COLLECTION g.items WITH (shards = 2);
             INSERT INTO g.items SELECT 'i' || value AS _id,
                 CASE value % 3 WHEN 0 THEN 'A' WHEN 1 THEN 'N' ELSE 'R' END AS flag,
                 CASE WHEN value % 17 = 0 THEN NULL WHEN value % 2 = 0 THEN 'F' ELSE 'O' END AS status,
                 'n' || (value % 9000) AS name, value % 50 AS qty, value * 1.5 AS price
                 FROM generate_series(0, 39999)",
        )
        .await
        .expect("load");
        // (In dev the leaf's counters are on the same /metrics; leaf processes keep their own.)
        let urls: Vec<String> = if two_leaves {
            d.leaf_http.iter().map(|a| format!("http://{a}/metrics")).collect()
        } else {
            vec![d.http("/metrics")]
        };
        let coded_scans = || async {
            let mut total = 0.0;
            for url in &urls {
                let text = reqwest::get(url).await.expect("metrics").text().await.expect("metrics body");
                total += text
                    .lines()
                    .find_map(|l| l.strip_prefix("basalt_leaf_coded_scans_total "))
                    .map_or(0.0, |v| v.trim().parse::<f64>().expect("counter"));
            }
            total
        };
        let before = coded_scans().await;
        assert_eq!(rows_of(&pg, grouped).await, want, "two leaves: {two_leaves}");
        assert!(coded_scans().await >= before + 2.0, "both shards' scans returned codes");
        // A common subexpression puts a projection between the scan and the aggregate.
        let shared = "SELECT flag, CAST(sum(qty * 2) AS BIGINT), CAST(sum(qty * 2 + 1) AS BIGINT) FROM g.items \
                      GROUP BY flag ORDER BY flag";
        let before = coded_scans().await;
        let doubled: Vec<Vec<Option<String>>> = ["A", "N", "R"]
            .iter()
            .map(|f| {
                let qty: Vec<i64> = rows.iter().filter(|r| r.1 == *f).map(|r| r.3).collect();
                let twice: i64 = qty.iter().map(|q| q * 2).sum();
                vec![Some(f.to_string()), Some(twice.to_string()), Some((twice + qty.len() as i64).to_string())]
            })
            .collect();
        assert_eq!(rows_of(&pg, shared).await, doubled);
        assert!(coded_scans().await >= before + 2.0, "through the projection too");
        pg.batch_execute(
            "DELETE FROM g.items WHERE qty = 7;
             UPDATE g.items SET flag = 'X', status = 'O' WHERE qty = 9",
        )
        .await
        .expect("change rows");
        for sql in [grouped, by_name, one] {
            let coded = rows_of(&pg, sql).await;
            pg.batch_execute("SET basalt.fragments = off").await.expect("set");
            let plain = rows_of(&pg, sql).await;
            pg.batch_execute("SET basalt.fragments = on").await.expect("set");
            assert!(!plain.is_empty(), "{sql}");
            assert_eq!(coded, plain, "{sql} on two leaves: {two_leaves}");
        }
        let groups = rows_of(&pg, grouped).await;
        assert!(groups.iter().any(|r| r[0].as_deref() == Some("X")), "updated rows group under their new flag");
    }
}
