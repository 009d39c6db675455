//! Ingest transformations: `SELECT ... FROM _input [WHERE ...]` run by DataFusion over each chunk
//! of source records, so any scalar SQL function can compute fields, `_id` and `_event_time`,
//! rename (`AS`), drop (leave out) and cast them, and `WHERE` can drop records.
//!
//! The chunk becomes one Arrow batch with a column per field path (the column types smart
//! schemas would give, see `basalt_common::arrays`) plus the record's offset; paths the query
//! names but no record in the chunk has are null columns, so a field missing from one chunk
//! does not fail it. Output rows become documents again (`a.b` names nest). If the chunk fails
//! as a whole (a cast that fails on one record), every record runs alone, so only the bad ones
//! fail.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use basalt_common::arrays::build_array;
use basalt_common::doc::{Doc, insert_path, visit_kinds};
use basalt_common::schema::{ColumnType, SchemaStats};
use basalt_common::{BasaltError, Result};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Expr, Ident, Query, SelectItem, SetExpr, Statement, Visit, Visitor};

/// The column that carries each record's offset through the query.
const OFFSET_COLUMN: &str = "__basalt_offset";

pub(crate) fn transform_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::invalid(format!("transform: {e}"))
}

pub struct Transform {
    /// The query with the offset column added to its projection.
    sql: String,
    /// Column paths the query names (made null columns when a chunk lacks them).
    paths: BTreeSet<String>,
}

struct Names<'a>(&'a mut BTreeSet<String>);

impl Visitor for Names<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &Expr) -> std::ops::ControlFlow<()> {
        match expr {
            Expr::Identifier(id) => {
                self.0.insert(id.value.clone());
            }
            Expr::CompoundIdentifier(parts) => {
                // `_input.a` names column `a`; after path rewriting nested paths are one identifier.
                let names: Vec<&str> = parts.iter().map(|p| p.value.as_str()).collect();
                let names = if names.first() == Some(&basalt_sql::TRANSFORM_INPUT) { &names[1..] } else { &names[..] };
                self.0.insert(names.join("."));
            }
            _ => {}
        }
        std::ops::ControlFlow::Continue(())
    }
}

impl Transform {
    pub fn new(sql: &str) -> Result<Transform> {
        let mut query = basalt_sql::check_transform(sql)?;
        let paths = named_paths(&query);
        let SetExpr::Select(select) = query.body.as_mut() else {
            return Err(transform_err("expected a plain SELECT"));
        };
        select.projection.push(SelectItem::UnnamedExpr(Expr::Identifier(Ident::with_quote('"', OFFSET_COLUMN))));
        let sql = Statement::Query(query).to_string();
        Ok(Transform { sql, paths })
    }

    /// Transform `(offset, document)` records; returns, per output row, the offset it came from
    /// and its document (records a WHERE drops have no row), and the records that failed with
    /// their error.
    pub async fn apply(&self, records: Vec<(i64, Doc)>) -> (Vec<(i64, Doc)>, Vec<(i64, BasaltError)>) {
        let docs: Vec<&Doc> = records.iter().map(|(_, d)| d).collect();
        let columns = chunk_columns(&docs);
        match self.run(&records, &columns).await {
            Ok(rows) => (rows, Vec::new()),
            Err(_) if records.len() > 1 => {
                // Find the records that fail: each alone.
                let (mut rows, mut failed) = (Vec::new(), Vec::new());
                for record in &records {
                    // Alone, with its own types: a value of another type fails only its record.
                    match self.run(std::slice::from_ref(record), &chunk_columns(&[&record.1])).await {
                        Ok(r) => rows.extend(r),
                        Err(e) => failed.push((record.0, e)),
                    }
                }
                (rows, failed)
            }
            Err(e) => (Vec::new(), records.iter().map(|(o, _)| (*o, e.clone())).collect()),
        }
    }

    async fn run(&self, records: &[(i64, Doc)], columns: &[(String, ColumnType)]) -> Result<Vec<(i64, Doc)>> {
        let docs: Vec<&Doc> = records.iter().map(|(_, d)| d).collect();
        let offsets: Vec<i64> = records.iter().map(|(o, _)| *o).collect();
        let mut out = Vec::new();
        for batch in query(&self.sql, &self.paths, columns, &docs, Some(&offsets)).await? {
            out.extend(rows(&batch)?);
        }
        Ok(out)
    }
}

/// The paths a query names (`_input.a` names `a`).
pub(crate) fn named_paths(query: &Query) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    let _ = query.visit(&mut Names(&mut paths));
    paths
}

/// The column types of records (what smart schemas would give).
pub(crate) fn chunk_columns(docs: &[&Doc]) -> Vec<(String, ColumnType)> {
    let mut stats = SchemaStats::default();
    for doc in docs {
        visit_kinds(doc, &mut |p, k| stats.add(p, k, 1));
    }
    stats.columns()
}

/// Run `sql` over `docs` as `_input`: a column per chunk column and per path the query names,
/// plus each record's offset when given. A named path the chunk lacks is a null column of type
/// Null; if the query cannot take that (`sum`), Int64, then Utf8.
pub(crate) async fn query(
    sql: &str,
    paths: &BTreeSet<String>,
    columns: &[(String, ColumnType)],
    docs: &[&Doc],
    offsets: Option<&[i64]>,
) -> Result<Vec<RecordBatch>> {
    let have: BTreeSet<&str> = columns.iter().map(|(p, _)| p.as_str()).collect();
    let missing: Vec<&String> = paths.iter().filter(|p| !have.contains(p.as_str()) && *p != OFFSET_COLUMN).collect();
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (path, ty) in columns {
        arrays.push(build_array(path, ty, docs)?);
        fields.push(Field::new(path, ty.to_arrow(), true));
    }
    if let Some(offsets) = offsets {
        fields.push(Field::new(OFFSET_COLUMN, DataType::Int64, false));
        arrays.push(Arc::new(Int64Array::from_iter_values(offsets.iter().copied())));
    }
    let tries: &[DataType] =
        if missing.is_empty() { &[DataType::Null] } else { &[DataType::Null, DataType::Int64, DataType::Utf8] };
    let mut last = None;
    for ty in tries {
        let mut fields = fields.clone();
        let mut arrays = arrays.clone();
        for path in &missing {
            fields.push(Field::new(*path, ty.clone(), true));
            arrays.push(new_null_array(ty, docs.len()));
        }
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(docs.len()));
        let batch = RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &options)?;
        match run_sql(sql, batch).await {
            Ok(out) => return Ok(out),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| BasaltError::internal("query was not run")))
}

/// Run a query over one `_input` batch.
async fn run_sql(sql: &str, batch: RecordBatch) -> Result<Vec<RecordBatch>> {
    let ctx = SessionContext::new();
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).map_err(transform_err)?;
    ctx.register_table(basalt_sql::TRANSFORM_INPUT, Arc::new(table)).map_err(transform_err)?;
    ctx.sql(sql).await.map_err(transform_err)?.collect().await.map_err(transform_err)
}

/// Output rows as documents with their offsets; `a.b` names nest.
fn rows(batch: &RecordBatch) -> Result<Vec<(i64, Doc)>> {
    let offset_at = batch.schema().index_of(OFFSET_COLUMN).map_err(transform_err)?;
    let offsets = arrow::compute::cast(batch.column(offset_at), &DataType::Int64)?;
    let offsets = offsets.as_primitive::<Int64Type>();
    Ok(objects(batch, Some(offset_at))?
        .into_iter()
        .enumerate()
        .map(|(row, object)| {
            let mut doc = Doc::new();
            for (k, v) in object {
                insert_path(&mut doc, &k, v);
            }
            (offsets.value(row), doc)
        })
        .collect())
}

/// Rows as JSON objects (null columns left out), without column `skip`; timestamps become
/// RFC 3339 text in UTC (what a document's `_event_time` may hold).
pub(crate) fn objects(
    batch: &RecordBatch,
    skip: Option<usize>,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let schema = batch.schema();
    let mut fields = Vec::new();
    let mut arrays = Vec::new();
    for (i, f) in schema.fields().iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
        let array = match f.data_type() {
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => arrow::compute::cast(
                batch.column(i),
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("+00:00".into())),
            )?,
            _ => batch.column(i).clone(),
        };
        fields.push(Field::new(f.name(), array.data_type().clone(), true));
        arrays.push(array);
    }
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    let plain = RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &options)?;
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    writer.write(&plain)?;
    writer.finish()?;
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Ok(vec![serde_json::Map::new(); batch.num_rows()]);
    }
    serde_json::from_slice(&bytes).map_err(transform_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> Doc {
        v.as_object().cloned().unwrap()
    }

    #[tokio::test]
    async fn computes_renames_drops_casts_and_filters() {
        let t = Transform::new(
            "SELECT concat(user, '-', CAST(n AS VARCHAR)) AS _id, CAST(n AS DOUBLE) * 1.5 AS score, \
             upper(address.city) AS city, to_timestamp(ts) AS _event_time, missing AS gone \
             FROM _input WHERE n > 1",
        )
        .unwrap();
        let records = vec![
            (10, doc(json!({"user": "ada", "n": 1, "ts": 1, "address": {"city": "london"}, "secret": "x"}))),
            (11, doc(json!({"user": "bob", "n": 2, "ts": 1_700_000_000, "address": {"city": "paris"}}))),
            (12, doc(json!({"user": "cy", "n": 3, "ts": 1_700_000_001}))),
        ];
        let (rows, failed) = t.apply(records).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(rows.len(), 2, "the WHERE drops offset 10");
        assert_eq!(rows[0].0, 11);
        let bob = &rows[0].1;
        assert_eq!(bob["_id"], json!("bob-2"));
        assert_eq!(bob["score"], json!(3.0));
        assert_eq!(bob["city"], json!("PARIS"));
        let t = bob["_event_time"].as_str().unwrap();
        assert_eq!(basalt_common::doc::parse_event_time(&json!(t)).unwrap(), 1_700_000_000_000_000, "{t}");
        assert!(!bob.contains_key("secret") && !bob.contains_key("user"), "fields left out are dropped: {bob:?}");
        assert!(bob.get("gone").is_none_or(|v| v.is_null()));
        assert_eq!(rows[1].1.get("city"), None, "a missing path is null (and left out)");
    }

    #[tokio::test]
    async fn a_failing_record_fails_alone() {
        let t = Transform::new("SELECT CAST(v AS BIGINT) AS v FROM _input").unwrap();
        let records =
            vec![(1, doc(json!({"v": "7"}))), (2, doc(json!({"v": "not a number"}))), (3, doc(json!({"v": "9"})))];
        let (rows, failed) = t.apply(records).await;
        assert_eq!(
            rows.iter().map(|(o, d)| (*o, d["v"].clone())).collect::<Vec<_>>(),
            vec![(1, json!(7)), (3, json!(9))]
        );
        assert_eq!(failed.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![2]);
        assert!(failed[0].1.message.contains("transform"), "{}", failed[0].1.message);
    }
}
