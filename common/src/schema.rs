//! Smart schemas: per field path, the kinds seen and how many documents hold each, and the rule
//! that maps a set of kinds to one queryable column type.
//!
//! Type rules (documented in docs/SQL.md):
//! - one scalar kind maps to its type (bool, int64, float64, utf8, timestamp);
//! - int and float together widen to float64;
//! - any other mix maps to utf8: strings as they are, other values as JSON text;
//! - arrays of one scalar type map to a list of it, other arrays to JSON text;
//! - objects are not columns themselves: their leaves are (`address.city`);
//! - nulls do not take part in the choice.

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, Field, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::doc::{EVENT_TIME_FIELD, ID_FIELD, Kind};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Boolean,
    Int64,
    Float64,
    Utf8,
    Timestamp,
    List(Box<ColumnType>),
}

pub const TIMEZONE: &str = "UTC";

impl ColumnType {
    pub fn to_arrow(&self) -> DataType {
        match self {
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some(TIMEZONE.into())),
            ColumnType::List(inner) => DataType::List(std::sync::Arc::new(Field::new("item", inner.to_arrow(), true))),
        }
    }

    pub fn from_arrow(dt: &DataType) -> Option<ColumnType> {
        Some(match dt {
            DataType::Boolean => ColumnType::Boolean,
            DataType::Int64 => ColumnType::Int64,
            DataType::Float64 => ColumnType::Float64,
            DataType::Utf8 => ColumnType::Utf8,
            DataType::Timestamp(TimeUnit::Microsecond, _) => ColumnType::Timestamp,
            DataType::List(f) => ColumnType::List(Box::new(ColumnType::from_arrow(f.data_type())?)),
            _ => return None,
        })
    }

    fn scalar(kind: Kind) -> Option<ColumnType> {
        match kind {
            Kind::Bool => Some(ColumnType::Boolean),
            Kind::Int => Some(ColumnType::Int64),
            Kind::Float => Some(ColumnType::Float64),
            Kind::String => Some(ColumnType::Utf8),
            Kind::Timestamp => Some(ColumnType::Timestamp),
            Kind::Null | Kind::Object | Kind::Array => None,
        }
    }
}

/// Unify scalar kinds (no arrays, objects or nulls) into one column type.
fn unify_scalars(kinds: &[Kind]) -> Option<ColumnType> {
    match kinds {
        [] => None,
        [one] => ColumnType::scalar(*one),
        [Kind::Int, Kind::Float] => Some(ColumnType::Float64),
        _ => Some(ColumnType::Utf8),
    }
}

/// Statistics of one collection (or shard, or block): documents, and per path the number of
/// documents that hold each kind there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchemaStats {
    pub doc_count: u64,
    pub fields: BTreeMap<String, BTreeMap<Kind, u64>>,
    /// Approximate distinct values per column, for join planning: filled by
    /// `LeafApi::planner_stats` only (never part of a shard's own, durable statistics).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub distinct: BTreeMap<String, crate::sketch::Sketch>,
    /// Per path, the documents of the shards that hold it ascending and never null in the order
    /// they scan it (see `LeafApi::planner_stats`; planner-only like `distinct`). A path whose
    /// count is the collection's document count is ascending in every shard.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ascending: BTreeMap<String, u64>,
}

impl SchemaStats {
    pub fn add(&mut self, path: &str, kind: Kind, delta: i64) {
        // Look up before inserting: the path is almost always there, and a new key allocates.
        let kinds = match self.fields.get_mut(path) {
            Some(kinds) => kinds,
            None if delta <= 0 => return,
            None => self.fields.entry(path.to_string()).or_default(),
        };
        let count = kinds.entry(kind).or_insert(0);
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            kinds.remove(&kind);
            if kinds.is_empty() {
                self.fields.remove(path);
            }
        }
    }

    pub fn merge(&mut self, other: &SchemaStats) {
        self.doc_count += other.doc_count;
        for (path, docs) in &other.ascending {
            *self.ascending.entry(path.clone()).or_insert(0) += docs;
        }
        for (path, sketch) in &other.distinct {
            match self.distinct.get_mut(path) {
                Some(mine) => mine.merge(sketch),
                None => {
                    self.distinct.insert(path.clone(), sketch.clone());
                }
            }
        }
        for (path, kinds) in &other.fields {
            let mine = self.fields.entry(path.clone()).or_default();
            for (kind, n) in kinds {
                *mine.entry(*kind).or_insert(0) += n;
            }
        }
    }

    /// Estimated distinct non-null values at `path`, when the leaves computed it.
    pub fn distinct_values(&self, path: &str) -> Option<u64> {
        self.distinct.get(path).map(|s| s.estimate())
    }

    /// Whether every shard reported `path` ascending (and never null) in scan order.
    pub fn ascending_everywhere(&self, path: &str) -> bool {
        self.doc_count > 0 && self.ascending.get(path) == Some(&self.doc_count)
    }

    /// The one non-null kind seen at `path`, if exactly one.
    pub fn pure_kind(&self, path: &str) -> Option<Kind> {
        let mut kinds = self.fields.get(path)?.keys().filter(|k| **k != Kind::Null);
        match (kinds.next(), kinds.next()) {
            (Some(one), None) => Some(*one),
            _ => None,
        }
    }

    fn non_null_kinds(&self, path: &str) -> Vec<Kind> {
        self.fields.get(path).map(|k| k.keys().copied().filter(|k| *k != Kind::Null).collect()).unwrap_or_default()
    }

    /// The column type of one path, or None when the path is not a column (objects only, or
    /// inside an array).
    pub fn column_type(&self, path: &str) -> Option<ColumnType> {
        if path == ID_FIELD {
            return Some(ColumnType::Utf8);
        }
        if path == EVENT_TIME_FIELD {
            return Some(ColumnType::Timestamp);
        }
        if path.contains("[*]") || !self.fields.contains_key(path) {
            return None;
        }
        let kinds = self.non_null_kinds(path);
        match kinds.as_slice() {
            [] => Some(ColumnType::Utf8),
            [Kind::Object] => None,
            [Kind::Array] => {
                let elem_path = format!("{path}[*]");
                let elems = self.non_null_kinds(&elem_path);
                let scalar = elems.iter().all(|k| !matches!(k, Kind::Object | Kind::Array));
                match (scalar, unify_scalars(&elems)) {
                    (true, Some(t)) => Some(ColumnType::List(Box::new(t))),
                    (true, None) => Some(ColumnType::List(Box::new(ColumnType::Utf8))),
                    _ => Some(ColumnType::Utf8),
                }
            }
            _ if kinds.iter().any(|k| matches!(k, Kind::Object | Kind::Array)) => Some(ColumnType::Utf8),
            _ => unify_scalars(&kinds),
        }
    }

    /// Every column of the collection, `_id` and `_event_time` first, then paths in order.
    pub fn columns(&self) -> Vec<(String, ColumnType)> {
        let mut out =
            vec![(ID_FIELD.to_string(), ColumnType::Utf8), (EVENT_TIME_FIELD.to_string(), ColumnType::Timestamp)];
        for path in self.fields.keys() {
            if path == ID_FIELD || path == EVENT_TIME_FIELD {
                continue;
            }
            if let Some(t) = self.column_type(path) {
                out.push((path.clone(), t));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{DocLimits, validate_value, visit_kinds};
    use serde_json::json;

    fn stats(docs: &[serde_json::Value]) -> SchemaStats {
        let mut s = SchemaStats::default();
        for d in docs {
            let d = validate_value(d.clone(), &DocLimits::default()).unwrap();
            s.doc_count += 1;
            visit_kinds(&d, &mut |p, k| s.add(p, k, 1));
        }
        s
    }

    #[test]
    fn column_types_follow_the_rules() {
        let s = stats(&[
            json!({"a": 1, "b": 1, "c": 1, "o": {"x": true}, "t": ["a"], "m": [{"k": 1}], "n": null}),
            json!({"a": 2, "b": 1.5, "c": "s", "o": {"x": false}, "t": ["b", "c"], "m": [1]}),
        ]);
        assert_eq!(s.column_type("a"), Some(ColumnType::Int64));
        assert_eq!(s.column_type("b"), Some(ColumnType::Float64));
        assert_eq!(s.column_type("c"), Some(ColumnType::Utf8));
        assert_eq!(s.column_type("o"), None);
        assert_eq!(s.column_type("o.x"), Some(ColumnType::Boolean));
        assert_eq!(s.column_type("t"), Some(ColumnType::List(Box::new(ColumnType::Utf8))));
        assert_eq!(s.column_type("m"), Some(ColumnType::Utf8));
        assert_eq!(s.column_type("n"), Some(ColumnType::Utf8));
        assert_eq!(s.fields["a"][&Kind::Int], 2);
    }

    #[test]
    fn removing_counts_drops_empty_paths() {
        let mut s = stats(&[json!({"a": 1})]);
        s.add("a", Kind::Int, -1);
        assert!(!s.fields.contains_key("a"));
        assert_eq!(s.column_type("a"), None);
    }
}
