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
use basalt_common::arrays::build_arrays;
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
    let mut fields: Vec<Field> = columns.iter().map(|(path, ty)| Field::new(path, ty.to_arrow(), true)).collect();
    let mut arrays: Vec<ArrayRef> = build_arrays(columns, docs);
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
/// RFC 3339 text in UTC (what a document's `_event_time` may hold), dates `YYYY-MM-DD` text
/// (what a date in JSON or CSV input is, so a Parquet `DATE` column and a CSV one load alike).
///
/// Columns of the common types (integers, floats, booleans, strings, dates, timestamps,
/// decimals) become values directly; any other column (lists, structs, maps, binary,
/// dictionaries, ...) goes through Arrow's JSON writer on its own, so every type is written the
/// way `arrow_json` writes it. Values are the same either way: non-finite floats are null,
/// decimals are numbers, temporal values are the text Arrow's formatter gives.
pub(crate) fn objects(
    batch: &RecordBatch,
    skip: Option<usize>,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let schema = batch.schema();
    let n = batch.num_rows();
    // Columns in name order, so each row's map is built from sorted keys.
    let mut order: Vec<usize> = (0..schema.fields().len()).filter(|i| Some(*i) != skip).collect();
    order.sort_by(|a, b| schema.field(*a).name().cmp(schema.field(*b).name()));
    let mut columns = Vec::with_capacity(order.len());
    for i in order {
        let name = schema.field(i).name().clone();
        let array = match schema.field(i).data_type() {
            DataType::Timestamp(..) | DataType::Date64 => arrow::compute::cast(
                batch.column(i),
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("+00:00".into())),
            )?,
            _ => batch.column(i).clone(),
        };
        let values = match column_values(&array)? {
            Some(values) => values,
            None => column_values_by_json(&name, &array, n)?,
        };
        columns.push((name, values.into_iter()));
    }
    Ok((0..n)
        .map(|_| {
            columns.iter_mut().filter_map(|(name, values)| values.next().flatten().map(|v| (name.clone(), v))).collect()
        })
        .collect())
}

/// The values of a column of a common type, `None` for a value that is null; `Ok(None)` for a
/// type left to the JSON writer.
fn column_values(array: &ArrayRef) -> Result<Option<Vec<Option<serde_json::Value>>>> {
    use arrow::array::Array;
    use arrow::datatypes::{
        Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
    };
    use serde_json::Value;
    fn each<T>(array: &dyn arrow::array::Array, value: impl Fn(usize) -> Option<T>) -> Vec<Option<Value>>
    where
        Value: From<T>,
    {
        (0..array.len()).map(|i| if array.is_null(i) { None } else { value(i).map(Value::from) }).collect()
    }
    macro_rules! primitive {
        ($t:ty) => {{
            let p = array.as_primitive::<$t>();
            each(p, |i| Some(p.value(i)))
        }};
    }
    let a = array.as_ref();
    let finite = |f: f64| f.is_finite().then_some(f);
    Ok(Some(match array.data_type() {
        DataType::Null => vec![None; array.len()],
        DataType::Boolean => {
            let b = array.as_boolean();
            each(b, |i| Some(b.value(i)))
        }
        DataType::Int8 => primitive!(Int8Type),
        DataType::Int16 => primitive!(Int16Type),
        DataType::Int32 => primitive!(Int32Type),
        DataType::Int64 => primitive!(Int64Type),
        DataType::UInt8 => primitive!(UInt8Type),
        DataType::UInt16 => primitive!(UInt16Type),
        DataType::UInt32 => primitive!(UInt32Type),
        DataType::UInt64 => primitive!(UInt64Type),
        DataType::Float32 => {
            // The f32's shortest text read as a double (0.1f32 is 0.1, as the JSON writer has it).
            let p = array.as_primitive::<Float32Type>();
            each(p, |i| {
                let v = p.value(i);
                if v.is_finite() { v.to_string().parse::<f64>().ok() } else { None }
            })
        }
        DataType::Float64 => {
            let p = array.as_primitive::<Float64Type>();
            each(p, |i| finite(p.value(i)))
        }
        DataType::Utf8 => {
            let s = array.as_string::<i32>();
            each(s, |i| Some(s.value(i)))
        }
        DataType::LargeUtf8 => {
            let s = array.as_string::<i64>();
            each(s, |i| Some(s.value(i)))
        }
        DataType::Utf8View => {
            let s = array.as_string_view();
            each(s, |i| Some(s.value(i)))
        }
        DataType::Decimal32(..) | DataType::Decimal64(..) | DataType::Decimal128(..) | DataType::Decimal256(..) => {
            // What the JSON writer's text ("12.34") reads back as. For a Decimal128 of scale
            // 0 that fits an i64 that is the integer; of scale 1..=22 below 2^53, the double
            // nearest the decimal, which dividing two exactly representable numbers gives (IEEE
            // division rounds correctly). Anything else: the text, parsed.
            let direct = match array.data_type() {
                DataType::Decimal128(_, scale) if (0..=22).contains(scale) => {
                    let scale = i32::from(*scale);
                    Some((array.as_primitive::<arrow::datatypes::Decimal128Type>(), scale, 10f64.powi(scale)))
                }
                _ => None,
            };
            let f = formatter(a)?;
            (0..a.len())
                .map(|i| {
                    if a.is_null(i) {
                        return Ok(None);
                    }
                    if let Some((p, scale, divisor)) = direct {
                        let v = p.value(i);
                        if scale == 0
                            && let Ok(v) = i64::try_from(v)
                        {
                            return Ok(Some(Value::from(v)));
                        }
                        if scale > 0 && v.unsigned_abs() < (1u128 << 53) {
                            return Ok(finite(v as f64 / divisor).map(Value::from));
                        }
                    }
                    serde_json::from_str::<Value>(&f.value(i).to_string()).map(Some).map_err(transform_err)
                })
                .collect::<Result<_>>()?
        }
        d if d.is_temporal() => {
            let f = formatter(a)?;
            each(a, |i| Some(f.value(i).to_string()))
        }
        _ => return Ok(None),
    }))
}

/// Arrow's text for the values of `array`, as the JSON writer formats decimals and temporal types.
fn formatter(array: &dyn arrow::array::Array) -> Result<arrow::util::display::ArrayFormatter<'_>> {
    let options = arrow::util::display::FormatOptions::new().with_display_error(true);
    Ok(arrow::util::display::ArrayFormatter::try_new(array, &options)?)
}

/// A column's values through Arrow's JSON writer (types without a direct conversion).
fn column_values_by_json(name: &str, array: &ArrayRef, n: usize) -> Result<Vec<Option<serde_json::Value>>> {
    let field = Field::new(name, array.data_type().clone(), true);
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
    let one = RecordBatch::try_new_with_options(Arc::new(Schema::new(vec![field])), vec![array.clone()], &options)?;
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    writer.write(&one)?;
    writer.finish()?;
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Ok(vec![None; n]);
    }
    let rows: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(&bytes).map_err(transform_err)?;
    Ok(rows.into_iter().map(|mut row| row.remove(name).filter(|v| !v.is_null())).collect())
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

    #[test]
    fn direct_conversion_gives_what_the_json_writer_gives() {
        use arrow::array::{
            BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array, Int32Array, StringArray,
            StringViewArray, TimestampMillisecondArray, UInt64Array,
        };
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("b", Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]))),
            ("i32", Arc::new(Int32Array::from(vec![Some(-7), Some(i32::MAX), None]))),
            ("i64", Arc::new(Int64Array::from(vec![None, Some(i64::MIN), Some(3)]))),
            ("u64", Arc::new(UInt64Array::from(vec![Some(u64::MAX), Some(0), None]))),
            ("f32", Arc::new(Float32Array::from(vec![Some(0.1), Some(f32::NAN), Some(-2.5)]))),
            ("f64", Arc::new(Float64Array::from(vec![Some(12.34), Some(f64::INFINITY), Some(1e300)]))),
            ("s", Arc::new(StringArray::from(vec![Some("a \"quoted\" line\n"), None, Some("")]))),
            ("sv", Arc::new(StringViewArray::from(vec![Some("a longer string than twelve bytes"), Some("x"), None]))),
            ("d", Arc::new(Date32Array::from(vec![Some(0), Some(9_500), None]))),
            (
                "ts",
                Arc::new(
                    TimestampMillisecondArray::from(vec![Some(1_700_000_000_123), None, Some(-1)])
                        .with_timezone("+02:00"),
                ),
            ),
            (
                "price",
                Arc::new(
                    Decimal128Array::from(vec![Some(1234), Some(-5), Some(9_007_199_254_740_993)])
                        .with_precision_and_scale(38, 2)
                        .unwrap(),
                ),
            ),
            (
                "whole",
                Arc::new(
                    Decimal128Array::from(vec![Some(42), None, Some(i128::from(i64::MAX) + 1)])
                        .with_precision_and_scale(38, 0)
                        .unwrap(),
                ),
            ),
            ("list", {
                let mut b = arrow::array::ListBuilder::new(arrow::array::Int64Builder::new());
                b.values().append_value(1);
                b.values().append_value(2);
                b.append(true);
                b.append(false);
                b.append(true);
                Arc::new(b.finish())
            }),
        ];
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let got = objects(&batch, None).unwrap();
        // The old conversion: the whole batch through the JSON writer (dates and timestamps
        // cast the same way first); keys holding null are left out in both.
        let schema = batch.schema();
        for (i, f) in schema.fields().iter().enumerate() {
            let array = match f.data_type() {
                DataType::Timestamp(..) => arrow::compute::cast(
                    batch.column(i),
                    &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("+00:00".into())),
                )
                .unwrap(),
                _ => batch.column(i).clone(),
            };
            let want = column_values_by_json(f.name(), &array, batch.num_rows()).unwrap();
            for (row, want) in want.into_iter().enumerate() {
                assert_eq!(got[row].get(f.name()), want.as_ref(), "column {} row {row}", f.name());
            }
        }
        assert_eq!(got[0]["price"], json!(12.34));
        assert_eq!(got[2]["whole"], json!(9_223_372_036_854_775_808u64));
        assert_eq!(got[0]["d"], json!("1970-01-01"));
        assert_eq!(got[1]["d"], json!("1996-01-05"));
        assert_eq!(got[0]["ts"], json!("2023-11-14T22:13:20.123Z"));
        assert!(!got[1].contains_key("f32"), "NaN is left out like null: {:?}", got[1]);
        assert_eq!(objects(&batch, Some(0)).unwrap()[0].get("b"), None, "the skipped column");
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
