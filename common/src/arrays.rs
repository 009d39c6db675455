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

/// Build one column of `ty` from the value at `path` in each document. Values that do not fit
/// the type become null (the type rules make that rare: only for deleted versions).
pub fn build_array<D: std::ops::Deref<Target = Doc>>(path: &str, ty: &ColumnType, docs: &[D]) -> Result<ArrayRef> {
    let values = docs.iter().map(|d| get_path(d, path));
    Ok(build_from_values(ty, values, docs.len()))
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
