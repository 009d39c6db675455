//! Rollups: a source's records grouped at ingest into a collection of their own.
//!
//! Each chunk of records runs through the rollup's query (DataFusion, over the same `_input`
//! batch transformations use) with `approx_distinct(x)` replaced by `array_agg(DISTINCT x)`,
//! which gives one partial aggregate per group and chunk. Each partial becomes a merge on the
//! group's document (created when missing): keys are set, counts and sums incremented, minima
//! and maxima kept, distinct values merged into a sketch ([`basalt_common::sketch`]). All of these
//! commute, so late and out-of-order records land in the group their keys (such as
//! `date_trunc('minute', _event_time)`) name, and the result equals the same `GROUP BY` over all
//! records, in whatever chunks they came.
//!
//! A group's `_id` is a hash of its key values, so every tailer computes the same one.

use std::collections::BTreeSet;

use basalt_common::api::{CollectionName, RollupInfo};
use basalt_common::doc::{Doc, EVENT_TIME_FIELD, PatchKind, PatchOp};
use basalt_common::sketch::{Sketch, value_key};
use basalt_common::{BasaltError, Result};
use basalt_sql::RollupColumn;
use datafusion::sql::sqlparser::ast::{
    DuplicateTreatment, Expr, FunctionArguments, GroupByExpr, ObjectName, SelectItem, SetExpr, Statement,
};
use serde_json::Value;

use basalt_common::schema::ColumnType;

use crate::transform::{chunk_columns, named_paths, objects, query};

pub struct Rollup {
    pub collection: CollectionName,
    /// The partial query run per chunk.
    sql: String,
    paths: BTreeSet<String>,
    columns: Vec<(String, RollupColumn)>,
}

/// One group's contribution from a chunk: its document `_id` and the merge operations.
pub type GroupMerge = (String, Vec<PatchOp>);

fn pointer(name: &str) -> String {
    format!("/{}", name.replace('~', "~0").replace('/', "~1"))
}

impl Rollup {
    pub fn new(info: &RollupInfo) -> Result<Rollup> {
        let plan = basalt_sql::check_rollup(&info.sql)?;
        let mut query = plan.query;
        let SetExpr::Select(select) = query.body.as_mut() else {
            return Err(BasaltError::invalid("rollup: expected a plain SELECT"));
        };
        // `GROUP BY minute` names the select item `... AS minute`, not an input field: spell
        // the expression out, so an input field of that name cannot take its place.
        let aliases: std::collections::HashMap<String, Expr> = select
            .projection
            .iter()
            .filter_map(|item| match item {
                SelectItem::ExprWithAlias { expr, alias } => Some((alias.value.clone(), expr.clone())),
                _ => None,
            })
            .collect();
        if let GroupByExpr::Expressions(exprs, _) = &mut select.group_by {
            for e in exprs.iter_mut() {
                if let Expr::Identifier(id) = e
                    && let Some(aliased) = aliases.get(&id.value)
                {
                    *e = aliased.clone();
                }
            }
        }
        for (item, (_, role)) in select.projection.iter_mut().zip(&plan.columns) {
            if *role != RollupColumn::ApproxDistinct {
                continue;
            }
            if let SelectItem::ExprWithAlias { expr: Expr::Function(f), .. } = item {
                f.name = ObjectName::from(vec![datafusion::sql::sqlparser::ast::Ident::new("array_agg")]);
                if let FunctionArguments::List(list) = &mut f.args {
                    list.duplicate_treatment = Some(DuplicateTreatment::Distinct);
                }
            }
        }
        let paths = named_paths(&query);
        let sql = Statement::Query(query).to_string();
        Ok(Rollup { collection: info.collection.clone(), sql, paths, columns: plan.columns })
    }

    /// The merges of a chunk of `(offset, document)` records, and the records the query fails
    /// on (found by running each alone, then the chunk again without them).
    pub async fn apply(&self, records: &[(i64, &Doc)]) -> (Vec<GroupMerge>, Vec<(i64, BasaltError)>) {
        let docs: Vec<&Doc> = records.iter().map(|(_, d)| *d).collect();
        let columns = chunk_columns(&docs);
        match self.run(records, &columns).await {
            Ok(merges) => (merges, Vec::new()),
            Err(e) if records.len() <= 1 => (Vec::new(), records.iter().map(|(o, _)| (*o, e.clone())).collect()),
            Err(_) => {
                let mut good = Vec::new();
                let mut failed = Vec::new();
                for record in records {
                    // Alone, with its own types: a value of another type fails only its record.
                    match self.run(std::slice::from_ref(record), &chunk_columns(&[record.1])).await {
                        Ok(_) => good.push(*record),
                        Err(e) => failed.push((record.0, e)),
                    }
                }
                let docs: Vec<&Doc> = good.iter().map(|(_, d)| *d).collect();
                match self.run(&good, &chunk_columns(&docs)).await {
                    Ok(merges) => (merges, failed),
                    // Fails only together (a sum that overflows): all of them fail.
                    Err(e) => {
                        failed.extend(good.iter().map(|(o, _)| (*o, e.clone())));
                        (Vec::new(), failed)
                    }
                }
            }
        }
    }

    async fn run(&self, records: &[(i64, &Doc)], columns: &[(String, ColumnType)]) -> Result<Vec<GroupMerge>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let docs: Vec<&Doc> = records.iter().map(|(_, d)| *d).collect();
        let mut out = Vec::new();
        for batch in query(&self.sql, &self.paths, columns, &docs, None).await? {
            for row in objects(&batch, None)? {
                out.push(self.merge(row)?);
            }
        }
        Ok(out)
    }

    fn merge(&self, mut row: serde_json::Map<String, Value>) -> Result<GroupMerge> {
        let mut keys = Vec::new();
        let mut ops = Vec::new();
        let op = |op, name: &str, value| PatchOp { op, path: pointer(name), value: Some(value) };
        for (name, role) in &self.columns {
            let value = row.remove(name).unwrap_or(Value::Null);
            match role {
                RollupColumn::Key => {
                    keys.push(value.clone());
                    if !(name == EVENT_TIME_FIELD && value.is_null()) {
                        ops.push(op(PatchKind::Add, name, value));
                    }
                }
                RollupColumn::Count => ops.push(op(PatchKind::Increment, name, value)),
                RollupColumn::Sum if !value.is_null() => ops.push(op(PatchKind::Increment, name, value)),
                RollupColumn::Min if !value.is_null() => ops.push(op(PatchKind::Min, name, value)),
                RollupColumn::Max if !value.is_null() => ops.push(op(PatchKind::Max, name, value)),
                RollupColumn::ApproxDistinct => {
                    let mut sketch = Sketch::default();
                    if let Value::Array(values) = &value {
                        for key in values.iter().filter_map(value_key) {
                            sketch.add_key(&key);
                        }
                    }
                    ops.push(op(PatchKind::SketchMerge, name, Value::String(sketch.encode())));
                }
                RollupColumn::Sum | RollupColumn::Min | RollupColumn::Max => {}
            }
        }
        let text = serde_json::to_string(&keys).map_err(|e| BasaltError::internal(format!("group key: {e}")))?;
        Ok((format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes())), ops))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use basalt_common::doc::{DocLimits, apply_patch};
    use serde_json::json;

    use super::*;

    fn rollup(sql: &str) -> Rollup {
        Rollup::new(&RollupInfo { collection: CollectionName::new("commons", "r"), sql: sql.into() }).unwrap()
    }

    /// Apply merges the way a leaf does (create, then patch).
    fn fold(state: &mut BTreeMap<String, Doc>, merges: Vec<GroupMerge>) {
        for (id, ops) in merges {
            let doc = state.entry(id).or_default();
            apply_patch(doc, &ops, &DocLimits::default()).unwrap();
        }
    }

    #[tokio::test]
    async fn chunks_in_any_order_and_grouping_give_the_same_groups() {
        let r = rollup(
            "SELECT who, date_trunc('minute', _event_time) AS minute, count(*) AS n, sum(price) AS spend, \
             min(price) AS low, max(price) AS high, approx_distinct(page) AS pages, count(price) AS priced \
             FROM _input WHERE kind = 'click' GROUP BY who, minute",
        );
        let mut records = Vec::new();
        for i in 0..400i64 {
            let mut d = json!({
                "who": format!("u{}", i % 7),
                "kind": if i % 5 == 0 { "view" } else { "click" },
                "page": format!("p{}", i % 13),
                // Event times spread over 3 minutes, not in offset order.
                "_event_time": 1_700_000_000_000_000i64 + ((i * 7919) % 180) * 1_000_000,
            });
            if i % 11 != 0 {
                d["price"] = json!(i % 17);
            }
            records.push((i, d.as_object().cloned().unwrap()));
        }
        let refs: Vec<(i64, &Doc)> = records.iter().map(|(o, d)| (*o, d)).collect();
        let mut whole = BTreeMap::new();
        let (merges, failed) = r.apply(&refs).await;
        assert!(failed.is_empty(), "{:?}", failed.first());
        fold(&mut whole, merges);
        // Reversed, in chunks of 37.
        let mut chunked = BTreeMap::new();
        let reversed: Vec<(i64, &Doc)> = refs.iter().rev().copied().collect();
        for chunk in reversed.chunks(37) {
            fold(&mut chunked, r.apply(chunk).await.0);
        }
        assert_eq!(whole, chunked);
        // Against a direct computation.
        // (who, minute) -> (count, sum, min, max, pages, priced)
        type Expected = (i64, i64, i64, i64, BTreeSet<String>, i64);
        let mut expected: BTreeMap<(String, i64), Expected> = BTreeMap::new();
        for (_, d) in &records {
            if d["kind"] != "click" {
                continue;
            }
            let minute = d["_event_time"].as_i64().unwrap() / 60_000_000;
            let e = expected.entry((d["who"].as_str().unwrap().to_string(), minute)).or_insert((
                0,
                0,
                i64::MAX,
                i64::MIN,
                BTreeSet::new(),
                0,
            ));
            e.0 += 1;
            if let Some(p) = d.get("price").and_then(|p| p.as_i64()) {
                e.1 += p;
                e.2 = e.2.min(p);
                e.3 = e.3.max(p);
                e.5 += 1;
            }
            e.4.insert(d["page"].as_str().unwrap().to_string());
        }
        assert_eq!(whole.len(), expected.len());
        for doc in whole.values() {
            let minute = chrono_minute(doc["minute"].as_str().unwrap());
            let e = &expected[&(doc["who"].as_str().unwrap().to_string(), minute)];
            assert_eq!(doc["n"], json!(e.0));
            assert_eq!(doc["spend"], json!(e.1));
            assert_eq!((doc["low"].clone(), doc["high"].clone()), (json!(e.2), json!(e.3)));
            assert_eq!(doc["pages"]["estimate"], json!(e.4.len()));
            assert_eq!(doc["priced"], json!(e.5));
        }
    }

    fn chrono_minute(rfc3339: &str) -> i64 {
        basalt_common::doc::parse_event_time(&json!(rfc3339)).unwrap() / 60_000_000
    }

    #[tokio::test]
    async fn a_record_the_query_fails_on_fails_alone() {
        let r = rollup("SELECT k, sum(CAST(v AS BIGINT)) AS s FROM _input GROUP BY k");
        let docs: Vec<Doc> = [json!({"k": "a", "v": 1}), json!({"k": "a", "v": "x"}), json!({"k": "a", "v": 2})]
            .into_iter()
            .map(|v| v.as_object().cloned().unwrap())
            .collect();
        let refs: Vec<(i64, &Doc)> = docs.iter().enumerate().map(|(i, d)| (i as i64, d)).collect();
        let (merges, failed) = r.apply(&refs).await;
        assert_eq!(failed.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![1]);
        let mut state = BTreeMap::new();
        fold(&mut state, merges);
        assert_eq!(state.values().next().unwrap()["s"], json!(3));
    }
}
