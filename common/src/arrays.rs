//! Arrow arrays from JSON documents: one column per field path, in the column type smart
//! schemas give it. Shared by the leaf's column store and the tailer's ingest transformations.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, StringBuilder, TimestampMicrosecondBuilder,
};
use serde_json::Value;

use crate::Result;
use crate::doc::{Doc, get_path};
use crate::schema::{ColumnType, TIMEZONE};

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Views of a text array's strings, sharing its value buffer (one view per row, no string
/// copied; arrow's own conversion goes through a builder and its null bookkeeping per row, 16%
/// of TPC-H q1's CPU).
pub fn text_views(column: &ArrayRef) -> std::result::Result<ArrayRef, arrow::error::ArrowError> {
    use arrow::array::{Array, AsArray, builder::make_view};
    use arrow::datatypes::DataType;
    let strings = column.as_string::<i32>();
    let values = strings.values();
    if values.len() >= u32::MAX as usize {
        return arrow::compute::cast(column, &DataType::Utf8View);
    }
    let bytes = values.as_slice();
    let views: Vec<u128> = strings
        .offsets()
        .windows(2)
        .map(|w| {
            let (start, end) = (w[0] as usize, w[1] as usize);
            make_view(&bytes[start..end], 0, start as u32)
        })
        .collect();
    Ok(views_of(strings, views, strings.nulls().cloned()))
}

/// A view array over `strings`' value buffer.
///
/// Every view must be made by `make_view` from one whole string of `strings` at that string's
/// offset in buffer 0 (what `text_views` and `text_views_of` do), and `nulls` must have one
/// entry per view.
fn views_of(
    strings: &arrow::array::StringArray,
    views: Vec<u128>,
    nulls: Option<arrow::buffer::NullBuffer>,
) -> ArrayRef {
    // SAFETY: per the contract above, each view holds one whole string of a valid `StringArray`
    // (valid UTF-8, in bounds of buffer 0, which is that array's value buffer).
    let array =
        unsafe { arrow::array::StringViewArray::new_unchecked(views.into(), vec![strings.values().clone()], nulls) };
    Arc::new(array)
}

/// [`text_views`] of the rows `keep` holds true for (all rows without it): the views are made
/// for those rows only, as `arrow::compute::filter` of the whole array's views would give them.
pub fn text_views_of(
    column: &ArrayRef,
    keep: Option<&arrow::array::BooleanArray>,
) -> std::result::Result<ArrayRef, arrow::error::ArrowError> {
    use arrow::array::{Array, AsArray, builder::make_view};
    use arrow::buffer::NullBuffer;
    let Some(keep) = keep else { return text_views(column) };
    let strings = column.as_string::<i32>();
    let values = strings.values();
    if values.len() >= u32::MAX as usize || keep.len() != strings.len() {
        return arrow::compute::filter(&text_views(column)?, keep);
    }
    let kept = match keep.nulls() {
        Some(nulls) => keep.values() & nulls.inner(),
        None => keep.values().clone(),
    };
    let count = kept.count_set_bits();
    if count * 2 > kept.len() {
        // Most rows kept: views of all (a pass over the offsets) and Arrow's filter are faster
        // than finding each kept row (TPC-H q1 keeps 98%: 107 -> 122 ms the other way).
        return arrow::compute::filter(&text_views(column)?, keep);
    }
    let (bytes, offsets) = (values.as_slice(), strings.offsets());
    let mut views: Vec<u128> = Vec::with_capacity(count);
    views.extend(kept.set_indices().map(|i| {
        let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
        make_view(&bytes[start..end], 0, start as u32)
    }));
    let nulls = strings.nulls().map(|n| NullBuffer::from_iter(kept.set_indices().map(|i| n.is_valid(i))));
    Ok(views_of(strings, views, nulls))
}

/// Build one column of `ty` from the value at `path` in each document. Values that do not fit
/// the type become null (the type rules make that rare: only for deleted versions).
pub fn build_array<D: std::ops::Deref<Target = Doc>>(path: &str, ty: &ColumnType, docs: &[D]) -> Result<ArrayRef> {
    let values = docs.iter().map(|d| get_path(d, path));
    Ok(build_from_values(ty, values, docs.len()))
}

/// Build several columns in one pass over the documents: [`build_array`] for each `(path, type)`,
/// without looking every path up in every document. A document's top-level fields and the
/// top-level paths are both walked in name order and matched like a merge (a map whose keys do
/// not come in order is looked up path by path instead); nested paths (`a.b`) are looked up.
pub fn build_arrays<D: std::ops::Deref<Target = Doc>>(columns: &[(String, ColumnType)], docs: &[D]) -> Vec<ArrayRef> {
    let mut top: Vec<usize> = (0..columns.len()).filter(|i| !columns[*i].0.contains('.')).collect();
    top.sort_by(|a, b| columns[*a].0.cmp(&columns[*b].0));
    let mut values: Vec<Vec<Option<&Value>>> = vec![Vec::with_capacity(docs.len()); columns.len()];
    for (row, doc) in docs.iter().enumerate() {
        let doc: &Doc = doc;
        let mut j = 0;
        let mut previous: Option<&str> = None;
        let mut ordered = true;
        for (key, value) in doc {
            if previous.is_some_and(|p| p > key.as_str()) {
                ordered = false;
                break;
            }
            previous = Some(key);
            while j < top.len() && columns[top[j]].0.as_str() < key.as_str() {
                j += 1;
            }
            if j < top.len() && columns[top[j]].0 == *key {
                values[top[j]].push(Some(value));
                j += 1;
            }
        }
        for (i, (path, _)) in columns.iter().enumerate() {
            let column = &mut values[i];
            if !ordered || path.contains('.') {
                column.truncate(row);
                column.push(get_path(doc, path));
            } else if column.len() == row {
                column.push(None);
            }
        }
    }
    columns.iter().zip(values).map(|((_, ty), values)| build_from_values(ty, values.into_iter(), docs.len())).collect()
}

pub fn build_from_values<'a>(ty: &ColumnType, values: impl Iterator<Item = Option<&'a Value>>, n: usize) -> ArrayRef {
    match ty {
        ColumnType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(n);
            values.for_each(|v| b.append_option(v.and_then(Value::as_bool)));
            Arc::new(b.finish())
        }
        ColumnType::Int64 => {
            let mut b = Int64Builder::with_capacity(n);
            values.for_each(|v| b.append_option(v.and_then(Value::as_i64)));
            Arc::new(b.finish())
        }
        ColumnType::Float64 => {
            let mut b = Float64Builder::with_capacity(n);
            values.for_each(|v| b.append_option(v.and_then(Value::as_f64)));
            Arc::new(b.finish())
        }
        ColumnType::Timestamp => {
            let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone(TIMEZONE);
            values.for_each(|v| b.append_option(v.and_then(Value::as_i64)));
            Arc::new(b.finish())
        }
        ColumnType::Utf8 => {
            let mut b = StringBuilder::with_capacity(n, n * 16);
            values.for_each(|v| match v {
                None | Some(Value::Null) => b.append_null(),
                Some(v) => b.append_value(value_text(v)),
            });
            Arc::new(b.finish())
        }
        ColumnType::List(inner) => build_list(inner, values, n),
    }
}

fn build_list<'a>(inner: &ColumnType, values: impl Iterator<Item = Option<&'a Value>>, n: usize) -> ArrayRef {
    macro_rules! list {
        ($builder:expr, $conv:expr) => {{
            let mut b = ListBuilder::with_capacity($builder, n);
            for v in values {
                match v {
                    Some(Value::Array(items)) => {
                        for item in items {
                            b.values().append_option($conv(item));
                        }
                        b.append(true);
                    }
                    _ => b.append(false),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    match inner {
        ColumnType::Boolean => list!(BooleanBuilder::new(), Value::as_bool),
        ColumnType::Int64 => list!(Int64Builder::new(), Value::as_i64),
        ColumnType::Float64 => list!(Float64Builder::new(), Value::as_f64),
        _ => list!(StringBuilder::new(), |v: &Value| match v {
            Value::Null => None,
            other => Some(value_text(other)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Views made for the kept rows only are what filtering all the rows' views gives: short
    /// (inlined) and long strings, nulls in the text and in the mask, none kept, all kept.
    #[test]
    fn views_of_kept_rows_are_the_filtered_views() {
        use arrow::array::{Array, BooleanArray, StringArray, StringViewArray};
        let text: ArrayRef = Arc::new(StringArray::from(vec![
            Some("a"),
            None,
            Some("a string longer than twelve bytes"),
            Some(""),
            Some("exactly12byt"),
            None,
            Some("thirteen byte"),
            Some("z"),
        ]));
        let no_nulls: ArrayRef = Arc::new(StringArray::from(vec!["x", "yy", "a longer string of text", "w"]));
        let masks = |n: usize| -> Vec<BooleanArray> {
            vec![
                BooleanArray::from(vec![true; n]),
                BooleanArray::from(vec![false; n]),
                BooleanArray::from((0..n).map(|i| i % 2 == 0).collect::<Vec<_>>()),
                BooleanArray::from(
                    (0..n).map(|i| if i % 3 == 0 { None } else { Some(i % 2 == 1) }).collect::<Vec<_>>(),
                ),
            ]
        };
        for column in [&text, &no_nulls] {
            for keep in masks(column.len()) {
                let want = arrow::compute::filter(&text_views(column).unwrap(), &keep).unwrap();
                let got = text_views_of(column, Some(&keep)).unwrap();
                let (want, got) = (
                    want.as_any().downcast_ref::<StringViewArray>().unwrap(),
                    got.as_any().downcast_ref::<StringViewArray>().unwrap(),
                );
                assert_eq!(got.len(), want.len());
                assert_eq!(got.iter().collect::<Vec<_>>(), want.iter().collect::<Vec<_>>());
                assert_eq!(got.null_count(), want.null_count());
                got.to_data().validate_full().unwrap();
            }
            assert_eq!(&text_views_of(column, None).unwrap(), &text_views(column).unwrap());
        }
    }

    #[test]
    fn one_pass_builds_what_building_each_path_builds() {
        let docs: Vec<Doc> = [
            json!({"_id": "1", "a": 1, "b": "x", "c": {"d": 2.5, "e": [1, 2]}, "zz": true, "a.b": "literal dot"}),
            json!({"_id": "2", "b": 7, "c": 3}),
            json!({}),
            json!({"a": null, "aa": 5, "c": {"d": "text"}, "m": [{"k": 1}], "zz": false}),
        ]
        .into_iter()
        .map(|v| v.as_object().cloned().unwrap())
        .collect();
        let columns: Vec<(String, ColumnType)> = vec![
            ("zz".into(), ColumnType::Boolean),
            ("a".into(), ColumnType::Int64),
            ("b".into(), ColumnType::Utf8),
            ("c.d".into(), ColumnType::Float64),
            ("c".into(), ColumnType::Utf8),
            ("a.b".into(), ColumnType::Utf8),
            ("missing".into(), ColumnType::Int64),
            ("_id".into(), ColumnType::Utf8),
            ("c.e".into(), ColumnType::List(Box::new(ColumnType::Int64))),
            ("aa".into(), ColumnType::Float64),
        ];
        let refs: Vec<&Doc> = docs.iter().collect();
        let got = build_arrays(&columns, &refs);
        assert_eq!(got.len(), columns.len());
        for ((path, ty), got) in columns.iter().zip(&got) {
            let want = build_array(path, ty, &refs).unwrap();
            assert_eq!(got.to_data(), want.to_data(), "{path}");
        }
        assert_eq!(got[1].null_count(), 3, "a: only the first document's 1");
        assert!(build_arrays(&[], &refs).is_empty());
    }
}
