//! The filter language aggregators push to leaves, and the rule that picks an access path.
//!
//! A leaf evaluates every pushed filter completely (it is `Exact` for the planner), so the
//! aggregator never evaluates it again.

use serde::{Deserialize, Serialize};

use crate::doc::{ID_FIELD, Kind};
use crate::schema::{ColumnType, SchemaStats};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Microseconds since the epoch, UTC.
    Timestamp(i64),
    /// Days since 1970-01-01. A comparison with a date compares the column's text parsed as a
    /// date, as SQL `CAST(column AS DATE)` does (a value that is not a date is an error).
    Date(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

impl CmpOp {
    /// Whether `ordering` (left against right) satisfies the comparison.
    pub fn holds(self, ordering: std::cmp::Ordering) -> bool {
        match self {
            CmpOp::Eq => ordering.is_eq(),
            CmpOp::NotEq => ordering.is_ne(),
            CmpOp::Lt => ordering.is_lt(),
            CmpOp::LtEq => ordering.is_le(),
            CmpOp::Gt => ordering.is_gt(),
            CmpOp::GtEq => ordering.is_ge(),
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::NotEq => "!=",
            CmpOp::Lt => "<",
            CmpOp::LtEq => "<=",
            CmpOp::Gt => ">",
            CmpOp::GtEq => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Cmp {
        path: String,
        op: CmpOp,
        value: Scalar,
    },
    /// `CAST(left AS DATE) op CAST(right AS DATE)`: two text fields of the same document
    /// parsed as dates, as SQL's cast does (a value that is not a date is an error). Null on
    /// either side is unknown.
    CmpDates {
        left: String,
        op: CmpOp,
        right: String,
    },
    /// `left op right`: two fields of the same document, both read as `ty` (as a scan returns
    /// them to SQL); null on either side is unknown. Text compares byte by byte, floats in
    /// IEEE total order (as Arrow's kernels do).
    CmpFields {
        left: String,
        op: CmpOp,
        right: String,
        ty: ColumnType,
    },
    In {
        path: String,
        /// On the wire a long list of integers (a join's key set, up to a million keys) is
        /// one string of delta-encoded varints rather than a JSON object per value (see
        /// [`in_values`]).
        #[serde(with = "in_values")]
        values: Vec<Scalar>,
    },
    IsNull(String),
    IsNotNull(String),
    /// Full-text match of `query` against the string values at `path`.
    Search {
        path: String,
        query: String,
    },
    /// SQL `path LIKE pattern`, case-sensitive, over the values as text: `%` matches any run
    /// of characters. Patterns with `_` or a backslash (an escape) are not pushed to leaves.
    Like {
        path: String,
        pattern: String,
    },
}

/// Whether leaves evaluate `LIKE pattern` ([`Filter::Like`]): `%` wildcards and literal text.
pub fn like_pushable(pattern: &str) -> bool {
    !pattern.contains(['_', '\\'])
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Scalar::Timestamp(t) => write!(f, "timestamp_us({t})"),
            Scalar::Date(d) => match chrono::NaiveDate::from_epoch_days(*d) {
                Some(day) => write!(f, "DATE '{day}'"),
                None => write!(f, "date_days({d})"),
            },
        }
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |f: &mut std::fmt::Formatter<'_>, items: &[Filter], sep: &str| {
            write!(f, "(")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    write!(f, " {sep} ")?;
                }
                write!(f, "{item}")?;
            }
            write!(f, ")")
        };
        match self {
            Filter::And(items) => join(f, items, "AND"),
            Filter::Or(items) => join(f, items, "OR"),
            Filter::Not(inner) => write!(f, "NOT {inner}"),
            Filter::Cmp { path, op, value: value @ Scalar::Date(_) } => {
                write!(f, "CAST({path} AS DATE) {} {value}", op.symbol())
            }
            Filter::Cmp { path, op, value } => write!(f, "{path} {} {value}", op.symbol()),
            Filter::CmpDates { left, op, right } => {
                write!(f, "CAST({left} AS DATE) {} CAST({right} AS DATE)", op.symbol())
            }
            Filter::CmpFields { left, op, right, .. } => write!(f, "{left} {} {right}", op.symbol()),
            Filter::In { path, values } => {
                if matches!(values.first(), Some(Scalar::Date(_))) {
                    write!(f, "CAST({path} AS DATE) IN (")?;
                } else {
                    write!(f, "{path} IN (")?;
                }
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                write!(f, ")")
            }
            Filter::IsNull(p) => write!(f, "{p} IS NULL"),
            Filter::IsNotNull(p) => write!(f, "{p} IS NOT NULL"),
            Filter::Search { path, query } => write!(f, "search({path}, '{}')", query.replace('\'', "''")),
            Filter::Like { path, pattern } => write!(f, "{path} LIKE '{}'", pattern.replace('\'', "''")),
        }
    }
}

/// How a leaf finds the rows of one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessPath {
    /// Fetch documents by `_id` from the row store.
    RowLookup,
    /// Ask the search index for the matching rows, then read their columns.
    SearchIndex,
    /// Scan the column store, skipping blocks by min/max.
    ColumnScan,
}

impl AccessPath {
    pub fn name(self) -> &'static str {
        match self {
            AccessPath::RowLookup => "row_lookup",
            AccessPath::SearchIndex => "search_index",
            AccessPath::ColumnScan => "column_scan",
        }
    }
}

/// The ids a conjunction of filters pins the scan to, if any conjunct is `_id = x`,
/// `_id IN (...)`, or a disjunction whose every branch pins ids (the union of theirs: a hash
/// join's runtime filter has one branch per partition). The list may hold more ids than match:
/// the scan still evaluates every filter on the documents it finds.
pub fn id_lookup(filters: &[Filter]) -> Option<Vec<String>> {
    let mut ids = pinned(filters)?;
    // Each document once, however often the filters name it.
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    Some(ids)
}

fn pinned(conjuncts: &[Filter]) -> Option<Vec<String>> {
    for f in conjuncts {
        let ids = match f {
            Filter::Cmp { path, op: CmpOp::Eq, value: Scalar::Str(s) } if path == ID_FIELD => Some(vec![s.clone()]),
            Filter::In { path, values } if path == ID_FIELD => values
                .iter()
                .map(|v| match v {
                    Scalar::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            Filter::And(inner) => pinned(inner),
            Filter::Or(branches) if !branches.is_empty() => branches
                .iter()
                .map(|b| pinned(std::slice::from_ref(b)))
                .collect::<Option<Vec<_>>>()
                .map(|lists| lists.concat()),
            _ => None,
        };
        if ids.is_some() {
            return ids;
        }
    }
    None
}

/// Longest string the search index keeps as an exact term. Longer values (paragraphs, payloads)
/// are only in the full-text index and the column store: equality with a longer literal scans,
/// and no shorter literal can equal them.
pub const MAX_TERM_BYTES: usize = 128;

/// Whether the search index can answer this filter exactly on its own: text search, and term
/// equality on fields that hold only the literal's kind (a mixed field's SQL value is JSON text,
/// which raw index terms do not match).
pub fn index_answerable(f: &Filter, stats: &SchemaStats) -> bool {
    // The kind a value is indexed as, when it is a term (a string short enough, an integer, a
    // boolean); the path's kind is looked up once per filter (an `IN` list may hold a join's
    // 150,000 keys).
    let term = |v: &Scalar| match v {
        Scalar::Str(s) if s.len() <= MAX_TERM_BYTES => Some(Kind::String),
        Scalar::Int(_) => Some(Kind::Int),
        Scalar::Bool(_) => Some(Kind::Bool),
        _ => None,
    };
    let terms_ok = |path: &str, values: &[Scalar]| {
        let kind = stats.pure_kind(path);
        values
            .iter()
            .all(|v| term(v).is_some_and(|want| (path == ID_FIELD && want == Kind::String) || kind == Some(want)))
    };
    match f {
        Filter::Search { path, .. } => text_indexed(path, stats),
        Filter::Cmp { path, op: CmpOp::Eq, value } => terms_ok(path, std::slice::from_ref(value)),
        Filter::In { path, values } => !values.is_empty() && terms_ok(path, values),
        Filter::And(items) | Filter::Or(items) => !items.is_empty() && items.iter().all(|i| index_answerable(i, stats)),
        _ => false,
    }
}

/// Whether the search index holds the full text of every value at `path`: it holds strings (and
/// arrays of strings) only, so a path where numbers or booleans occur is searched by scanning
/// (where `search()` reads them as text).
fn text_indexed(path: &str, stats: &SchemaStats) -> bool {
    let only = |p: &str, allowed: &[Kind]| {
        stats.fields.get(p).is_none_or(|kinds| kinds.keys().all(|k| *k == Kind::Null || allowed.contains(k)))
    };
    only(path, &[Kind::String]) || (only(path, &[Kind::Array]) && only(&format!("{path}[*]"), &[Kind::String]))
}

/// The access-path rule: `_id` pins use the row store; text search and term predicates use the
/// search index; everything else scans columns. A hint overrides the rule where it can apply.
pub fn choose_access_path(filters: &[Filter], hint: Option<AccessPath>, stats: &SchemaStats) -> AccessPath {
    let ids = id_lookup(filters).is_some();
    let indexable = filters.iter().any(|f| index_answerable(f, stats));
    match hint {
        Some(AccessPath::RowLookup) if ids => AccessPath::RowLookup,
        Some(AccessPath::SearchIndex) if indexable => AccessPath::SearchIndex,
        Some(AccessPath::ColumnScan) => AccessPath::ColumnScan,
        _ if ids => AccessPath::RowLookup,
        _ if indexable => AccessPath::SearchIndex,
        _ => AccessPath::ColumnScan,
    }
}

/// The values of [`Filter::In`] as serde sees them. A list of at least [`in_values::PACK_MIN`]
/// integers becomes the string `"i64:"` followed by the base64 of each value's difference from
/// the one before (zigzag varints; sorted keys take one or two bytes each): TPC-H q3 on two leaf
/// processes sends each lineitem shard 147,000 order keys, 2.2 MB of `{"int":n}` objects that
/// took 15% of the leaf's CPU to parse, 0.2 MB packed. Any other list is a JSON array of
/// scalars, and both forms are read.
pub mod in_values {
    use base64::Engine;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};

    use super::Scalar;

    /// Shorter integer lists stay readable arrays.
    pub const PACK_MIN: usize = 64;
    const TAG: &str = "i64:";

    pub fn serialize<S: Serializer>(values: &[Scalar], s: S) -> Result<S::Ok, S::Error> {
        if values.len() < PACK_MIN || !values.iter().all(|v| matches!(v, Scalar::Int(_))) {
            return values.serialize(s);
        }
        let mut bytes = Vec::with_capacity(values.len() * 2);
        let mut previous = 0i64;
        for v in values {
            let Scalar::Int(n) = v else { continue };
            let delta = n.wrapping_sub(previous);
            previous = *n;
            let mut z = ((delta << 1) ^ (delta >> 63)) as u64;
            while z >= 0x80 {
                bytes.push((z as u8) | 0x80);
                z >>= 7;
            }
            bytes.push(z as u8);
        }
        let mut text = String::with_capacity(TAG.len() + bytes.len().div_ceil(3) * 4);
        text.push_str(TAG);
        base64::engine::general_purpose::STANDARD_NO_PAD.encode_string(&bytes, &mut text);
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Scalar>, D::Error> {
        d.deserialize_any(Values)
    }

    /// Decodes the packed form; None if it is malformed.
    fn unpack(text: &str) -> Option<Vec<Scalar>> {
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(text.strip_prefix(TAG)?).ok()?;
        let mut out = Vec::with_capacity(bytes.len());
        let (mut previous, mut z, mut shift) = (0i64, 0u64, 0u32);
        for b in bytes {
            if shift > 63 {
                return None;
            }
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 != 0 {
                shift += 7;
                continue;
            }
            let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
            previous = previous.wrapping_add(delta);
            out.push(Scalar::Int(previous));
            (z, shift) = (0, 0);
        }
        (shift == 0).then_some(out)
    }

    struct Values;

    impl<'de> Visitor<'de> for Values {
        type Value = Vec<Scalar>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of scalars or a packed list of integers")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Scalar>, A::Error> {
            // A client controls the length: grow as elements arrive, not from its size hint.
            let mut out = Vec::new();
            while let Some(v) = seq.next_element::<Scalar>()? {
                out.push(v);
            }
            Ok(out)
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Vec<Scalar>, E> {
            unpack(text).ok_or_else(|| E::custom("malformed packed integer list"))
        }
    }
}

/// Whether a filter contains a text search (which only the search index can evaluate).
pub fn contains_search(f: &Filter) -> bool {
    match f {
        Filter::Search { .. } => true,
        Filter::And(items) | Filter::Or(items) => items.iter().any(contains_search),
        Filter::Not(inner) => contains_search(inner),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_integer_lists_travel_packed_and_come_back_equal() {
        let ints = |vs: Vec<i64>| Filter::In { path: "k".into(), values: vs.into_iter().map(Scalar::Int).collect() };
        let sorted: Vec<i64> = (0..10_000).map(|i| i * 3 + 7).collect();
        let mixed: Vec<i64> = (0..500)
            .map(|i: i64| if i % 2 == 0 { i64::MIN + i } else { i64::MAX - i * 7919 })
            .chain([0, -1, 1])
            .collect();
        for filter in [ints(sorted.clone()), ints(mixed), ints((0..63).collect()), ints(vec![])] {
            let text = serde_json::to_string(&filter).unwrap();
            assert_eq!(serde_json::from_str::<Filter>(&text).unwrap(), filter, "{}", &text[..text.len().min(80)]);
        }
        // Sorted keys three apart: one byte each, about 1.4 characters on the wire.
        let text = serde_json::to_string(&ints(sorted)).unwrap();
        assert!(text.contains("\"i64:") && text.len() < 14_000, "{}", text.len());
        // Short lists and lists with other scalars stay plain arrays; both forms are read.
        let short = serde_json::to_string(&ints(vec![1, 2])).unwrap();
        assert_eq!(short, r#"{"in":{"path":"k","values":[{"int":1},{"int":2}]}}"#);
        let strs: Vec<Scalar> = (0..100).map(|i| Scalar::Str(format!("s{i}"))).collect();
        let text = serde_json::to_string(&Filter::In { path: "k".into(), values: strs.clone() }).unwrap();
        assert!(text.contains(r#"{"str":"s99"}"#));
        // Malformed packed lists are errors, not panics: bad base64, a varint cut short, an
        // overlong varint, no tag.
        for bad in ["i64:!!", "i64:gA", "i64:gICAgICAgICAgIAB", "AAAA"] {
            let text = format!(r#"{{"in":{{"path":"k","values":"{bad}"}}}}"#);
            assert!(serde_json::from_str::<Filter>(&text).is_err(), "{bad}");
        }
    }

    use super::*;

    fn eq(path: &str, v: Scalar) -> Filter {
        Filter::Cmp { path: path.into(), op: CmpOp::Eq, value: v }
    }

    #[test]
    fn text_search_uses_the_index_only_where_it_holds_every_value() {
        let mut stats = SchemaStats::default();
        stats.add("name", Kind::String, 2);
        stats.add("name", Kind::Null, 1);
        stats.add("tags", Kind::Array, 1);
        stats.add("tags[*]", Kind::String, 2);
        stats.add("age", Kind::Int, 1);
        stats.add("mixed", Kind::String, 1);
        stats.add("mixed", Kind::Float, 1);
        stats.add("nums", Kind::Array, 1);
        stats.add("nums[*]", Kind::Int, 1);
        let search = |p: &str| Filter::Search { path: p.into(), query: "x".into() };
        let long = Filter::Cmp { path: "name".into(), op: CmpOp::Eq, value: Scalar::Str("x".repeat(129)) };
        assert!(!index_answerable(&long, &stats));
        let short = Filter::Cmp { path: "name".into(), op: CmpOp::Eq, value: Scalar::Str("x".repeat(128)) };
        assert!(index_answerable(&short, &stats));
        for (path, indexed) in
            [("name", true), ("tags", true), ("absent", true), ("age", false), ("mixed", false), ("nums", false)]
        {
            assert_eq!(index_answerable(&search(path), &stats), indexed, "{path}");
        }
    }

    #[test]
    fn id_lookups_name_each_document_once() {
        let ids = ["b", "a", "b"].iter().map(|s| Scalar::Str(s.to_string())).collect();
        let f = Filter::In { path: ID_FIELD.into(), values: ids };
        assert_eq!(id_lookup(&[f]), Some(vec!["b".to_string(), "a".to_string()]));
    }

    #[test]
    fn a_disjunction_pins_ids_only_when_every_branch_does() {
        let id = |s: &str| eq(ID_FIELD, Scalar::Str(s.into()));
        let other = Filter::Cmp { path: "n".into(), op: CmpOp::Gt, value: Scalar::Int(1) };
        let both = Filter::Or(vec![Filter::And(vec![other.clone(), id("a")]), id("b")]);
        assert_eq!(id_lookup(&[other.clone(), both]), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(id_lookup(&[Filter::Or(vec![id("a"), other])]), None);
        assert_eq!(id_lookup(&[Filter::Or(vec![])]), None);
    }

    #[test]
    fn picks_access_paths_by_rule() {
        let mut stats = SchemaStats::default();
        stats.add("name", Kind::String, 1);
        stats.add("age", Kind::Int, 1);
        stats.add("mixed", Kind::Int, 1);
        stats.add("mixed", Kind::String, 1);
        let stats = &stats;
        let id = eq("_id", Scalar::Str("u1".into()));
        let term = eq("name", Scalar::Str("ada".into()));
        let range = Filter::Cmp { path: "age".into(), op: CmpOp::Gt, value: Scalar::Int(30) };
        assert_eq!(choose_access_path(&[range.clone(), id.clone()], None, stats), AccessPath::RowLookup);
        assert_eq!(choose_access_path(&[range.clone(), term.clone()], None, stats), AccessPath::SearchIndex);
        assert_eq!(choose_access_path(std::slice::from_ref(&range), None, stats), AccessPath::ColumnScan);
        assert_eq!(
            choose_access_path(std::slice::from_ref(&term), Some(AccessPath::ColumnScan), stats),
            AccessPath::ColumnScan
        );
        assert_eq!(choose_access_path(&[range], Some(AccessPath::SearchIndex), stats), AccessPath::ColumnScan);
        let mixed = eq("mixed", Scalar::Str("1".into()));
        assert_eq!(choose_access_path(&[mixed], None, stats), AccessPath::ColumnScan);
        // An IN list is a set of terms when every value is of the path's one kind.
        let ages = |values: Vec<Scalar>| Filter::In { path: "age".into(), values };
        assert!(index_answerable(&ages((0..1000).map(Scalar::Int).collect()), stats));
        assert!(!index_answerable(&ages(vec![Scalar::Int(1), Scalar::Str("2".into())]), stats));
        assert!(!index_answerable(&ages(vec![]), stats));
        assert!(!index_answerable(&Filter::In { path: "mixed".into(), values: vec![Scalar::Int(1)] }, stats));
        assert!(!index_answerable(&Filter::In { path: "nope".into(), values: vec![Scalar::Int(1)] }, stats));
        let ids = Filter::In { path: "_id".into(), values: vec![Scalar::Str("a".into())] };
        assert!(index_answerable(&ids, stats));
        let mut nulls = SchemaStats::default();
        nulls.add("n", Kind::Null, 1);
        nulls.add("n", Kind::Int, 1);
        assert!(index_answerable(&Filter::In { path: "n".into(), values: vec![Scalar::Int(1)] }, &nulls));
        assert_eq!(
            id_lookup(&[Filter::In {
                path: "_id".into(),
                values: vec![Scalar::Str("a".into()), Scalar::Str("b".into())]
            }]),
            Some(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn displays_filters_readably() {
        let f = Filter::And(vec![eq("a.b", Scalar::Str("it's".into())), Filter::IsNull("c".into())]);
        assert_eq!(f.to_string(), "(a.b = 'it''s' AND c IS NULL)");
    }
}
