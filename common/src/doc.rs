//! Documents: validation against limits, the system fields `_id` and `_event_time`, field paths,
//! value kinds, JSON-pointer patches and routing to shards.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{BasaltError, Result};

pub type Doc = Map<String, Value>;

pub const ID_FIELD: &str = "_id";
pub const EVENT_TIME_FIELD: &str = "_event_time";

/// Limits on what a client may send. Every field has a finite default.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocLimits {
    pub doc_size_bytes_max: usize,
    pub depth_max: usize,
    pub fields_max: usize,
    pub id_length_max: usize,
}

impl Default for DocLimits {
    fn default() -> Self {
        Self { doc_size_bytes_max: 4 * 1024 * 1024, depth_max: 32, fields_max: 10_000, id_length_max: 512 }
    }
}

/// The type of one JSON value as smart schemas track it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Null,
    Bool,
    Int,
    Float,
    String,
    Timestamp,
    Object,
    Array,
}

impl Kind {
    pub fn of(value: &Value) -> Kind {
        match value {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Bool,
            Value::Number(n) => {
                if n.is_i64() {
                    Kind::Int
                } else {
                    Kind::Float
                }
            }
            Value::String(_) => Kind::String,
            Value::Array(_) => Kind::Array,
            Value::Object(_) => Kind::Object,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::String => "string",
            Kind::Timestamp => "timestamp",
            Kind::Object => "object",
            Kind::Array => "array",
        }
    }
}

/// Parse one document from raw bytes (wire or file input) and validate it.
pub fn parse_doc(bytes: &[u8], limits: &DocLimits) -> Result<Doc> {
    if bytes.len() > limits.doc_size_bytes_max {
        return Err(BasaltError::limit(format!(
            "document is {} bytes, over the limit of {} bytes",
            bytes.len(),
            limits.doc_size_bytes_max
        )));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|e| BasaltError::invalid(format!("document is not valid utf-8: {e}")))?;
    let value: Value = serde_json::from_str(text).map_err(|e| BasaltError::invalid(format!("malformed json: {e}")))?;
    validate_value(value, limits)
}

/// Validate an already parsed value as a document: an object within the limits.
pub fn validate_value(value: Value, limits: &DocLimits) -> Result<Doc> {
    validate_with(value, limits, Outside::default())
}

/// The part of a document a partial version (some top-level fields only) does not hold: its
/// serialized bytes and its field count, so limits apply to the whole document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outside {
    pub bytes: usize,
    pub fields: usize,
}

fn validate_with(value: Value, limits: &DocLimits, outside: Outside) -> Result<Doc> {
    let Value::Object(doc) = value else {
        return Err(BasaltError::invalid(format!("a document must be a json object, got {}", Kind::of(&value).name())));
    };
    check_with(&doc, limits, outside)?;
    Ok(doc)
}

/// [`validate_value`] for a document already built as an object (rows of CSV or Parquet
/// objects): the same limits, and the caller keeps the document whatever the outcome.
pub fn check_doc(doc: &Doc, limits: &DocLimits) -> Result<()> {
    check_with(doc, limits, Outside::default())
}

fn check_with(doc: &Doc, limits: &DocLimits, outside: Outside) -> Result<()> {
    let mut fields = outside.fields;
    check_depth(doc, 1, limits, &mut fields)?;
    // Serialized size is checked on the canonical form so every input path shares one rule;
    // counted, not written out, and given up on as soon as it is over the limit.
    let mut counter = SizeCounter { bytes: outside.bytes, max: limits.doc_size_bytes_max };
    if serde_json::to_writer(&mut counter, doc).is_err() {
        return Err(BasaltError::limit(format!(
            "document is {} bytes or more, over the limit of {} bytes",
            counter.bytes, limits.doc_size_bytes_max
        )));
    }
    Ok(())
}

/// Counts bytes written; fails once they pass `max`.
struct SizeCounter {
    bytes: usize,
    max: usize,
}

impl std::io::Write for SizeCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len();
        if self.bytes > self.max {
            return Err(std::io::Error::other("over the size limit"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn check_depth(obj: &Doc, depth: usize, limits: &DocLimits, fields: &mut usize) -> Result<()> {
    if depth > limits.depth_max {
        return Err(BasaltError::limit(format!("document nesting is deeper than the limit of {}", limits.depth_max)));
    }
    for value in obj.values() {
        *fields += 1;
        if *fields > limits.fields_max {
            return Err(BasaltError::limit(format!("document has more than {} fields", limits.fields_max)));
        }
        check_value_depth(value, depth, limits, fields)?;
    }
    Ok(())
}

fn check_value_depth(value: &Value, depth: usize, limits: &DocLimits, fields: &mut usize) -> Result<()> {
    match value {
        Value::Object(o) => check_depth(o, depth + 1, limits, fields),
        Value::Array(items) => {
            if depth + 1 > limits.depth_max {
                return Err(BasaltError::limit(format!(
                    "document nesting is deeper than the limit of {}",
                    limits.depth_max
                )));
            }
            for item in items {
                check_value_depth(item, depth + 1, limits, fields)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Fill in `_id` (generated when absent) and `_event_time` (microseconds since the epoch; from the
/// document when present, else `now_us`). Returns the id.
pub fn normalize_system_fields(doc: &mut Doc, now_us: i64, limits: &DocLimits) -> Result<String> {
    let id = match doc.get(ID_FIELD) {
        None | Some(Value::Null) => uuid::Uuid::new_v4().simple().to_string(),
        Some(Value::String(s)) if s.is_empty() => {
            return Err(BasaltError::invalid("_id must not be empty"));
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(other) => {
            return Err(BasaltError::invalid(format!(
                "_id must be a string or an integer, got {}",
                Kind::of(other).name()
            )));
        }
    };
    if id.len() > limits.id_length_max {
        return Err(BasaltError::limit(format!("_id is longer than {} bytes", limits.id_length_max)));
    }
    doc.insert(ID_FIELD.to_string(), Value::String(id.clone()));
    let event_time = match doc.get(EVENT_TIME_FIELD) {
        None | Some(Value::Null) => now_us,
        Some(v) => parse_event_time(v)?,
    };
    doc.insert(EVENT_TIME_FIELD.to_string(), Value::from(event_time));
    Ok(id)
}

/// `_event_time` accepts an RFC 3339 string or an integer of milliseconds since the epoch.
pub fn parse_event_time(value: &Value) -> Result<i64> {
    match value {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_micros())
            .map_err(|e| BasaltError::invalid(format!("_event_time is not rfc 3339: {e}"))),
        Value::Number(n) => n
            .as_i64()
            .and_then(|ms| ms.checked_mul(1000))
            .ok_or_else(|| BasaltError::invalid("_event_time must be integer milliseconds")),
        other => Err(BasaltError::invalid(format!(
            "_event_time must be a string or an integer, got {}",
            Kind::of(other).name()
        ))),
    }
}

pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// [`visit_kinds`] for one top-level field: what that field contributes to a document's paths.
pub fn visit_field_kinds(name: &str, value: &Value, f: &mut impl FnMut(&str, Kind)) {
    let mut seen = KindsSeen::new(is_path_syntax(name) || has_path_syntax(value));
    let mut path = name.to_string();
    visit_value(&mut path, value, false, &mut |p, kind, in_array| seen.report(p, kind, in_array, f));
}

/// How many fields a value counts for against [`DocLimits::fields_max`] as a top-level field
/// (itself and every object member inside it).
pub fn field_count(value: &Value) -> usize {
    fn inner(v: &Value) -> usize {
        match v {
            Value::Object(o) => o.values().map(|v| 1 + inner(v)).sum(),
            Value::Array(items) => items.iter().map(inner).sum(),
            _ => 0,
        }
    }
    1 + inner(value)
}

/// Visit every (path, kind) pair of a document once, for schema statistics. Objects report their
/// own path with kind `object` and then their children (`a.b`); arrays report `array` and their
/// elements under `path[*]`.
pub fn visit_kinds(doc: &Doc, f: &mut impl FnMut(&str, Kind)) {
    let ambiguous = doc.iter().any(|(k, v)| is_path_syntax(k) || has_path_syntax(v));
    let mut seen = KindsSeen::new(ambiguous);
    let mut path = String::new();
    for (k, v) in doc {
        path.clear();
        path.push_str(k);
        visit_value(&mut path, v, false, &mut |p, kind, in_array| seen.report(p, kind, in_array, f));
    }
}

/// Counts documents' (path, kind) pairs (as [`visit_kinds`] reports them) in runs: a document
/// with the same pairs in the same order as the one before it (rows of one table, the usual
/// case) costs one comparison per pair instead of a map update per pair. A run's counts go to
/// `flush` when a different document ends it, and at [`KindRuns::finish`].
#[derive(Default)]
pub struct KindRuns {
    run: Vec<(String, Kind)>,
    count: i64,
    next: Vec<(String, Kind)>,
}

impl KindRuns {
    pub fn add(&mut self, doc: &Doc, sign: i64, flush: &mut impl FnMut(&str, Kind, i64)) {
        let mut n = 0;
        let next = &mut self.next;
        visit_kinds(doc, &mut |p, k| {
            match next.get_mut(n) {
                Some((path, kind)) => {
                    path.clear();
                    path.push_str(p);
                    *kind = k;
                }
                None => next.push((p.to_string(), k)),
            }
            n += 1;
        });
        if self.next[..n] == self.run[..] {
            self.count += sign;
            return;
        }
        self.finish(flush);
        // The new run's pairs; the old run's strings are reused for the next document.
        self.next.truncate(n);
        std::mem::swap(&mut self.run, &mut self.next);
        self.count = sign;
    }

    pub fn finish(&mut self, flush: &mut impl FnMut(&str, Kind, i64)) {
        if self.count != 0 {
            for (path, kind) in &self.run {
                flush(path, *kind, self.count);
            }
        }
        self.count = 0;
    }
}

/// Reports each (path, kind) pair once. Outside arrays a path occurs once per document (object
/// keys are unique), so only paths under `[*]` are remembered and the common case allocates
/// nothing; unless a key itself contains `.` or `[` (`{"a.b": 1, "a": {"b": 2}}` has the path
/// `a.b` twice), then every path is.
struct KindsSeen {
    all: bool,
    seen: std::collections::HashSet<(String, Kind)>,
}

impl KindsSeen {
    fn new(all: bool) -> Self {
        KindsSeen { all, seen: std::collections::HashSet::new() }
    }

    fn report(&mut self, path: &str, kind: Kind, in_array: bool, f: &mut impl FnMut(&str, Kind)) {
        if !(in_array || self.all) || self.seen.insert((path.to_string(), kind)) {
            f(path, kind);
        }
    }
}

fn is_path_syntax(key: &str) -> bool {
    key.bytes().any(|b| b == b'.' || b == b'[')
}

/// Whether an object key inside `value` contains path syntax.
fn has_path_syntax(value: &Value) -> bool {
    match value {
        Value::Object(o) => o.iter().any(|(k, v)| is_path_syntax(k) || has_path_syntax(v)),
        Value::Array(items) => items.iter().any(has_path_syntax),
        _ => false,
    }
}

fn visit_value(path: &mut String, value: &Value, in_array: bool, f: &mut impl FnMut(&str, Kind, bool)) {
    let kind = if path == EVENT_TIME_FIELD { Kind::Timestamp } else { Kind::of(value) };
    f(path, kind, in_array);
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                visit_value(path, v, in_array, f);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            let len = path.len();
            path.push_str("[*]");
            for item in items {
                visit_value(path, item, true, f);
            }
            path.truncate(len);
        }
        _ => {}
    }
}

/// Set the value at a dotted path (`a.b.c`), creating objects on the way (a non-object in the
/// way is replaced): how a column named by a path becomes a document field.
pub fn insert_path(doc: &mut Doc, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            doc.insert(path.to_string(), value);
        }
        Some((head, rest)) => {
            let child = doc.entry(head.to_string()).or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                *child = Value::Object(Map::new());
            }
            if let Value::Object(m) = child {
                insert_path(m, rest, value);
            }
        }
    }
}

/// The value at a dotted path (`a.b.c`), not descending into arrays.
pub fn get_path<'a>(doc: &'a Doc, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur = doc.get(first)?;
    for part in parts {
        cur = cur.as_object()?.get(part)?;
    }
    Some(cur)
}

/// Shard that owns a document id. Every write path routes through this function.
pub fn shard_for_id(id: &str, shards: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % u64::from(shards.max(1))) as u32
}

/// One JSON-patch style operation on a document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PatchOp {
    pub op: PatchKind,
    /// JSON pointer (`/a/b`, `/tags/0`).
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PatchKind {
    Add,
    Replace,
    Remove,
    Increment,
    /// Set the value if the field is missing, null or smaller (numbers, or strings).
    Max,
    /// Set the value if the field is missing, null or larger.
    Min,
    /// Merge a distinct-count sketch (text, see [`crate::sketch`]) into the field, which becomes
    /// `{"estimate": n, "sketch": "..."}`.
    SketchMerge,
}

fn pointer_parts(pointer: &str) -> Result<Vec<String>> {
    if !pointer.starts_with('/') || pointer.len() < 2 {
        return Err(BasaltError::invalid(format!("patch path {pointer:?} must be a json pointer like /a/b")));
    }
    Ok(pointer[1..].split('/').map(|p| p.replace("~1", "/").replace("~0", "~")).collect())
}

/// Apply patch operations to a document in order. On error the document is left unchanged.
pub fn apply_patch(doc: &mut Doc, ops: &[PatchOp], limits: &DocLimits) -> Result<()> {
    apply_patch_partial(doc, ops, limits, Outside::default())
}

/// The top-level fields patch operations touch (the first segment of each path).
pub fn patched_fields(ops: &[PatchOp]) -> Result<std::collections::BTreeSet<String>> {
    ops.iter().map(|op| Ok(pointer_parts(&op.path)?.swap_remove(0))).collect()
}

/// [`apply_patch`] on a partial document: `doc` holds at least every top-level field the
/// operations touch (see [`patched_fields`]); `outside` is what the rest of the document adds to
/// its size and field count, so the limits hold for the whole document. The work is
/// proportional to `doc`, not to the fields left outside.
pub fn apply_patch_partial(doc: &mut Doc, ops: &[PatchOp], limits: &DocLimits, outside: Outside) -> Result<()> {
    // Work on a copy so a failing op leaves the document as it was.
    let mut work = Value::Object(doc.clone());
    ops.iter().try_for_each(|op| apply_one(&mut work, op))?;
    let Value::Object(patched) = work else {
        return Err(BasaltError::internal("patched document is not an object"));
    };
    let mut patched = validate_with(Value::Object(patched), limits, outside)?;
    if let Some(v) = patched.get(EVENT_TIME_FIELD).cloned() {
        let micros = match &v {
            Value::Number(n) if n.is_i64() => n.as_i64().unwrap_or_default(),
            other => parse_event_time(other)?,
        };
        patched.insert(EVENT_TIME_FIELD.to_string(), Value::from(micros));
    }
    *doc = patched;
    Ok(())
}

fn apply_one(root: &mut Value, op: &PatchOp) -> Result<()> {
    let parts = pointer_parts(&op.path)?;
    if parts[0] == ID_FIELD {
        return Err(BasaltError::invalid("_id cannot be patched"));
    }
    let (last, parents) = parts.split_last().ok_or_else(|| BasaltError::invalid("empty patch path"))?;
    let create = matches!(
        op.op,
        PatchKind::Add | PatchKind::Increment | PatchKind::Max | PatchKind::Min | PatchKind::SketchMerge
    );
    let mut cur = root;
    for part in parents {
        cur = match cur {
            Value::Object(o) => {
                if create && !o.contains_key(part) {
                    o.insert(part.clone(), Value::Object(Map::new()));
                }
                o.get_mut(part).ok_or_else(|| BasaltError::invalid(format!("patch path {} not found", op.path)))?
            }
            Value::Array(items) => {
                let idx = array_index(part, items.len(), &op.path)?;
                items.get_mut(idx).ok_or_else(|| BasaltError::invalid(format!("patch path {} not found", op.path)))?
            }
            _ => {
                return Err(BasaltError::invalid(format!("patch path {} goes through a scalar", op.path)));
            }
        };
    }
    let value =
        || op.value.clone().ok_or_else(|| BasaltError::invalid(format!("patch op on {} needs a value", op.path)));
    match cur {
        Value::Object(o) => match op.op {
            PatchKind::Add => {
                o.insert(last.clone(), value()?);
            }
            PatchKind::Replace => {
                let slot =
                    o.get_mut(last).ok_or_else(|| BasaltError::invalid(format!("patch path {} not found", op.path)))?;
                *slot = value()?;
            }
            PatchKind::Remove => {
                o.remove(last).ok_or_else(|| BasaltError::invalid(format!("patch path {} not found", op.path)))?;
            }
            PatchKind::Increment => {
                let by = value()?;
                let current = o.get(last).cloned().unwrap_or(Value::from(0));
                o.insert(last.clone(), increment(&current, &by, &op.path)?);
            }
            PatchKind::Max | PatchKind::Min => {
                let v = value()?;
                if extreme_replaces(o.get(last), &v, op.op, &op.path)? {
                    o.insert(last.clone(), v);
                }
            }
            PatchKind::SketchMerge => {
                let v = value()?;
                let text = v
                    .as_str()
                    .ok_or_else(|| BasaltError::invalid(format!("sketch_merge on {} needs text", op.path)))?;
                let merged = crate::sketch::merge_into(o.get(last), text)?;
                o.insert(last.clone(), merged);
            }
        },
        Value::Array(items) => {
            let len = items.len();
            match op.op {
                PatchKind::Add => {
                    if last == "-" {
                        items.push(value()?);
                    } else {
                        let idx = array_index(last, len + 1, &op.path)?;
                        items.insert(idx, value()?);
                    }
                }
                PatchKind::Replace => {
                    let idx = array_index(last, len, &op.path)?;
                    items[idx] = value()?;
                }
                PatchKind::Remove => {
                    let idx = array_index(last, len, &op.path)?;
                    items.remove(idx);
                }
                PatchKind::Increment => {
                    let idx = array_index(last, len, &op.path)?;
                    items[idx] = increment(&items[idx], &value()?, &op.path)?;
                }
                PatchKind::Max | PatchKind::Min => {
                    let idx = array_index(last, len, &op.path)?;
                    let v = value()?;
                    if extreme_replaces(Some(&items[idx]), &v, op.op, &op.path)? {
                        items[idx] = v;
                    }
                }
                PatchKind::SketchMerge => {
                    return Err(BasaltError::invalid(format!("sketch_merge on {}: not into an array", op.path)));
                }
            }
        }
        _ => {
            return Err(BasaltError::invalid(format!("patch path {} goes through a scalar", op.path)));
        }
    }
    Ok(())
}

fn array_index(part: &str, len: usize, path: &str) -> Result<usize> {
    let idx: usize =
        part.parse().map_err(|_| BasaltError::invalid(format!("patch path {path}: {part:?} is not an array index")))?;
    if idx >= len {
        return Err(BasaltError::invalid(format!("patch path {path}: index {idx} out of bounds")));
    }
    Ok(idx)
}

/// Whether a `max`/`min` patch with `new` replaces `current`.
fn extreme_replaces(current: Option<&Value>, new: &Value, kind: PatchKind, path: &str) -> Result<bool> {
    use std::cmp::Ordering;
    let Some(current) = current.filter(|c| !c.is_null()) else { return Ok(true) };
    let order = match (current, new) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => b.cmp(&a),
            _ => b.as_f64().partial_cmp(&a.as_f64()).unwrap_or(Ordering::Equal),
        },
        (Value::String(a), Value::String(b)) => b.as_str().cmp(a.as_str()),
        _ => {
            return Err(BasaltError::invalid(format!(
                "{} of {path} needs two numbers or two strings, found {} and {}",
                if kind == PatchKind::Max { "max" } else { "min" },
                Kind::of(current).name(),
                Kind::of(new).name()
            )));
        }
    };
    Ok(if kind == PatchKind::Max { order == Ordering::Greater } else { order == Ordering::Less })
}

fn increment(current: &Value, by: &Value, path: &str) -> Result<Value> {
    match (current, by) {
        (Value::Number(a), Value::Number(b)) => {
            if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64())
                && let Some(sum) = a.checked_add(b)
            {
                return Ok(Value::from(sum));
            }
            match (a.as_f64(), b.as_f64()) {
                (Some(a), Some(b)) => Ok(serde_json::Number::from_f64(a + b).map(Value::Number).unwrap_or(Value::Null)),
                _ => Err(BasaltError::invalid(format!("increment of {path} overflowed"))),
            }
        }
        _ => Err(BasaltError::invalid(format!(
            "increment of {path} needs numbers, found {} and {}",
            Kind::of(current).name(),
            Kind::of(by).name()
        ))),
    }
}

/// Convert a dotted SQL path (`address.city`, `tags[1]`) to a JSON pointer (`/address/city`).
/// SQL array subscripts are 1-based; pointers are 0-based.
pub fn sql_path_to_pointer(path: &str) -> Result<String> {
    let mut out = String::new();
    for part in path.split('.') {
        let (name, subscripts) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() {
            return Err(BasaltError::invalid(format!("bad field path {path:?}")));
        }
        out.push('/');
        out.push_str(&name.replace('~', "~0").replace('/', "~1"));
        let mut rest = subscripts;
        while let Some(stripped) = rest.strip_prefix('[') {
            let end = stripped.find(']').ok_or_else(|| BasaltError::invalid(format!("bad field path {path:?}")))?;
            let idx: usize = stripped[..end]
                .trim()
                .parse()
                .map_err(|_| BasaltError::invalid(format!("bad array index in {path:?}")))?;
            if idx == 0 {
                return Err(BasaltError::invalid(format!("array indexes start at 1 in {path:?}")));
            }
            out.push('/');
            out.push_str(&(idx - 1).to_string());
            rest = &stripped[end + 1..];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_runs_count_what_visiting_each_document_counts() {
        use std::collections::BTreeMap;
        let shapes = [
            json!({"a": 1, "b": "x", "c": {"d": [1, "y"]}}),
            json!({"a": 2, "b": "z", "c": {"d": [3]}}),
            json!({"a": "text", "b": "z"}),
            json!({}),
            json!({"a.b": 1, "a": {"b": 2}}),
        ];
        let docs: Vec<(Doc, i64)> = [0, 0, 1, 1, 2, 0, 3, 3, 4, 4, 0, 2, 1]
            .iter()
            .enumerate()
            .map(|(i, s)| (shapes[*s].as_object().cloned().unwrap(), if i % 5 == 3 { -1 } else { 1 }))
            .collect();
        let mut want: BTreeMap<(String, Kind), i64> = BTreeMap::new();
        for (doc, sign) in &docs {
            visit_kinds(doc, &mut |p, k| *want.entry((p.to_string(), k)).or_default() += sign);
        }
        let mut got: BTreeMap<(String, Kind), i64> = BTreeMap::new();
        let mut runs = KindRuns::default();
        let mut add = |p: &str, k: Kind, n: i64| *got.entry((p.to_string(), k)).or_default() += n;
        for (doc, sign) in &docs {
            runs.add(doc, *sign, &mut add);
        }
        runs.finish(&mut add);
        want.retain(|_, n| *n != 0);
        got.retain(|_, n| *n != 0);
        assert_eq!(got, want);
        assert!(got.contains_key(&("c.d[*]".to_string(), Kind::Int)), "{got:?}");
    }
    use serde_json::json;

    fn limits() -> DocLimits {
        DocLimits::default()
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        let l = limits();
        assert!(parse_doc(b"{", &l).unwrap_err().message.contains("malformed json"));
        assert!(parse_doc(b"[1]", &l).unwrap_err().message.contains("must be a json object"));
        assert!(parse_doc(b"{\"a\": \"\xff\"}", &l).unwrap_err().message.contains("utf-8"));
        let deep = format!("{}1{}", "{\"a\":".repeat(40), "}".repeat(40));
        let err = parse_doc(deep.as_bytes(), &l).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::LimitExceeded);
        let small = DocLimits { doc_size_bytes_max: 10, ..l };
        assert_eq!(parse_doc(b"{\"a\": \"0123456789\"}", &small).unwrap_err().code, crate::ErrorCode::LimitExceeded);
    }

    #[test]
    fn normalizes_system_fields() {
        let mut d = validate_value(json!({"_id": 7, "_event_time": "2026-01-01T00:00:00Z"}), &limits()).unwrap();
        let id = normalize_system_fields(&mut d, 5, &limits()).unwrap();
        assert_eq!(id, "7");
        assert_eq!(d["_event_time"], json!(1_767_225_600_000_000i64));
        let mut d = Doc::new();
        let id = normalize_system_fields(&mut d, 5, &limits()).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(d["_event_time"], json!(5));
        let mut d = validate_value(json!({"_id": [1]}), &limits()).unwrap();
        assert!(normalize_system_fields(&mut d, 5, &limits()).is_err());
    }

    #[test]
    fn visits_nested_paths_once() {
        let d = validate_value(json!({"a": {"b": 1}, "t": ["x", "y", 3]}), &limits()).unwrap();
        let mut seen = vec![];
        visit_kinds(&d, &mut |p, k| seen.push(format!("{p}:{}", k.name())));
        seen.sort();
        assert_eq!(seen, ["a.b:int", "a:object", "t:array", "t[*]:int", "t[*]:string"]);

        // Objects inside arrays: each path once however many elements have it.
        let d = validate_value(json!({"f": [{"n": "a", "g": [1, 2]}, {"n": "b", "g": [3]}]}), &limits()).unwrap();
        let mut seen = vec![];
        visit_kinds(&d, &mut |p, k| seen.push(format!("{p}:{}", k.name())));
        seen.sort();
        assert_eq!(seen, ["f:array", "f[*].g:array", "f[*].g[*]:int", "f[*].n:string", "f[*]:object"]);

        // A key with a dot names the same path as a nested field: still reported once.
        let d = validate_value(json!({"a.b": 1, "a": {"b": 2}}), &limits()).unwrap();
        let mut seen = vec![];
        visit_kinds(&d, &mut |p, k| seen.push(format!("{p}:{}", k.name())));
        seen.sort();
        assert_eq!(seen, ["a.b:int", "a:object"]);
    }

    #[test]
    fn patches_apply_and_fail_atomically() {
        let l = limits();
        let mut d = validate_value(json!({"_id": "1", "a": {"b": 1}, "t": [1, 2]}), &l).unwrap();
        let ops = vec![
            PatchOp { op: PatchKind::Replace, path: "/a/b".into(), value: Some(json!(2)) },
            PatchOp { op: PatchKind::Increment, path: "/n".into(), value: Some(json!(3)) },
            PatchOp { op: PatchKind::Add, path: "/x/y".into(), value: Some(json!("z")) },
            PatchOp { op: PatchKind::Remove, path: "/t/0".into(), value: None },
        ];
        apply_patch(&mut d, &ops, &l).unwrap();
        assert_eq!(Value::Object(d.clone()), json!({"_id": "1", "a": {"b": 2}, "n": 3, "x": {"y": "z"}, "t": [2]}));
        let before = d.clone();
        let bad = vec![
            PatchOp { op: PatchKind::Replace, path: "/a/b".into(), value: Some(json!(9)) },
            PatchOp { op: PatchKind::Replace, path: "/missing".into(), value: Some(json!(1)) },
        ];
        assert!(apply_patch(&mut d, &bad, &l).unwrap_err().message.contains("not found"));
        assert_eq!(d, before);
        let id = vec![PatchOp { op: PatchKind::Add, path: "/_id".into(), value: Some(json!("2")) }];
        assert!(apply_patch(&mut d, &id, &l).is_err());
        assert_eq!(patched_fields(&ops).unwrap().into_iter().collect::<Vec<_>>(), ["a", "n", "t", "x"]);
        assert!(apply_patch(&mut d, &[PatchOp { op: PatchKind::Add, path: "nope".into(), value: None }], &l).is_err());
    }

    #[test]
    fn sql_paths_become_pointers() {
        assert_eq!(sql_path_to_pointer("address.city").unwrap(), "/address/city");
        assert_eq!(sql_path_to_pointer("tags[2]").unwrap(), "/tags/1");
        assert!(sql_path_to_pointer("tags[0]").is_err());
    }

    #[test]
    fn routing_is_stable_and_in_range() {
        for i in 0..100 {
            let id = format!("doc{i}");
            let s = shard_for_id(&id, 4);
            assert!(s < 4);
            assert_eq!(s, shard_for_id(&id, 4));
        }
    }

    #[test]
    fn partial_patches_check_limits_against_the_whole_document() {
        let l = DocLimits { doc_size_bytes_max: 100, fields_max: 5, ..limits() };
        let mut d = validate_value(json!({"_id": "1", "a": 1}), &l).unwrap();
        let set = |v: Value| vec![PatchOp { op: PatchKind::Add, path: "/b".into(), value: Some(v) }];
        // Fits alone, not with 80 bytes outside the partial document.
        let mut alone = d.clone();
        apply_patch_partial(&mut alone, &set(json!("x".repeat(40))), &l, Outside::default()).unwrap();
        let outside = Outside { bytes: 80, fields: 1 };
        let err = apply_patch_partial(&mut d, &set(json!("x".repeat(40))), &l, outside).unwrap_err();
        assert!(err.message.contains("over the limit"), "{}", err.message);
        assert_eq!(d.len(), 2, "a failed patch leaves the document as it was");
        let err = apply_patch_partial(&mut d, &set(json!({"p": 1, "q": 2})), &l, Outside { bytes: 0, fields: 2 })
            .unwrap_err();
        assert!(err.message.contains("more than 5 fields"), "{}", err.message);
        assert_eq!(field_count(&json!({"p": 1, "q": {"r": [{"s": 1}]}})), 5);
    }

    #[test]
    fn max_and_min_keep_the_extreme() {
        let l = limits();
        let mut d = validate_value(json!({"_id": "1", "hi": 5, "s": "m", "t": [1, 9]}), &l).unwrap();
        let op = |op, path: &str, v: Value| PatchOp { op, path: path.into(), value: Some(v) };
        let ops = vec![
            op(PatchKind::Max, "/hi", json!(3)),
            op(PatchKind::Max, "/lo", json!(2)),
            op(PatchKind::Min, "/lo", json!(1)),
            op(PatchKind::Min, "/s", json!("a")),
            op(PatchKind::Max, "/t/0", json!(4.5)),
            op(PatchKind::Max, "/new/deep", json!(7)),
        ];
        apply_patch(&mut d, &ops, &l).unwrap();
        assert_eq!((&d["hi"], &d["lo"], &d["s"], &d["t"]), (&json!(5), &json!(1), &json!("a"), &json!([4.5, 9])));
        assert_eq!(d["new"], json!({"deep": 7}));
        let err = apply_patch(&mut d, &[op(PatchKind::Max, "/hi", json!("x"))], &l).unwrap_err();
        assert!(err.message.contains("two numbers or two strings"), "{}", err.message);
    }
}
