//! Exact evaluation of pushed-down filters on column blocks, with SQL three-valued logic, and
//! block pruning by min/max.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::kernels::boolean::{and_kleene, is_not_null, is_null, not, or_kleene};
use arrow::compute::kernels::cmp;
use arrow::datatypes::DataType;
use basalt_common::Result;
use basalt_common::filter::{CmpOp, Filter, Scalar};
use basalt_common::schema::TIMEZONE;
use basalt_common::text::{matches, tokenize};

use crate::columns::Block;

fn scalar_type(s: &Scalar) -> DataType {
    match s {
        Scalar::Bool(_) => DataType::Boolean,
        Scalar::Int(_) => DataType::Int64,
        Scalar::Float(_) => DataType::Float64,
        Scalar::Str(_) => DataType::Utf8,
        Scalar::Timestamp(_) => DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some(TIMEZONE.into())),
        Scalar::Date(_) => DataType::Date32,
    }
}

/// The column a comparison with `value` reads: the column as the literal's type, or for a date
/// literal the column's text parsed as dates (cached in the block).
fn column_for(block: &Block, path: &str, value: &Scalar) -> Result<ArrayRef> {
    match value {
        Scalar::Date(_) => block.column_as_date(path),
        other => block.column_as(path, &scalar_type(other)),
    }
}

fn scalar_array(s: &Scalar) -> ArrayRef {
    match s {
        Scalar::Bool(b) => Arc::new(BooleanArray::from(vec![*b])),
        Scalar::Int(i) => Arc::new(Int64Array::from(vec![*i])),
        Scalar::Float(f) => Arc::new(Float64Array::from(vec![*f])),
        Scalar::Str(s) => Arc::new(StringArray::from(vec![s.as_str()])),
        Scalar::Timestamp(t) => Arc::new(TimestampMicrosecondArray::from(vec![*t]).with_timezone(TIMEZONE)),
        Scalar::Date(d) => Arc::new(Date32Array::from(vec![*d])),
    }
}

fn compare(col: &ArrayRef, op: CmpOp, value: &Scalar) -> Result<BooleanArray> {
    compare_with(col, op, &arrow::array::Scalar::new(scalar_array(value)))
}

fn compare_with(col: &ArrayRef, op: CmpOp, rhs: &dyn arrow::array::Datum) -> Result<BooleanArray> {
    Ok(match op {
        CmpOp::Eq => cmp::eq(col, rhs)?,
        CmpOp::NotEq => cmp::neq(col, rhs)?,
        CmpOp::Lt => cmp::lt(col, rhs)?,
        CmpOp::LtEq => cmp::lt_eq(col, rhs)?,
        CmpOp::Gt => cmp::gt(col, rhs)?,
        CmpOp::GtEq => cmp::gt_eq(col, rhs)?,
    })
}

/// Membership in a set of integers: a bitmap over the values' span when it is at most
/// [`BITMAP_SPAN`] wide, else binary search in the sorted values (kept in both cases: a block's
/// min/max is checked against them).
struct IntSet {
    sorted: Vec<i64>,
    bitmap: Option<(i64, Vec<u64>)>,
}

/// The widest span of values kept as a bitmap (8 MiB of bits). A runtime key list of TPC-H's
/// order keys spans the table's keys (60M at SF 10); binary search in its 227,000 keys (SF 1,
/// q5) was a quarter of the process's CPU.
const BITMAP_SPAN: u64 = 1 << 26;

impl IntSet {
    fn new(mut values: Vec<i64>) -> IntSet {
        values.sort_unstable();
        values.dedup();
        let (Some(&min), Some(&max)) = (values.first(), values.last()) else {
            return IntSet { sorted: values, bitmap: None };
        };
        let span = max.abs_diff(min);
        // A bitmap only pays when it is not much sparser than the list itself.
        if span >= BITMAP_SPAN || span / 64 > (values.len() as u64).saturating_mul(64) {
            return IntSet { sorted: values, bitmap: None };
        }
        let mut bits = vec![0u64; (span / 64 + 1) as usize];
        for &v in &values {
            let at = v.abs_diff(min);
            bits[(at / 64) as usize] |= 1 << (at % 64);
        }
        IntSet { sorted: values, bitmap: Some((min, bits)) }
    }

    #[inline]
    fn contains(&self, v: i64) -> bool {
        match &self.bitmap {
            Some((min, bits)) => {
                // A value under the minimum wraps past the bitmap's end: one bounds check.
                let at = (v as u64).wrapping_sub(*min as u64);
                bits.get((at / 64) as usize).is_some_and(|w| w & (1 << (at % 64)) != 0)
            }
            None => self.sorted.binary_search(&v).is_ok(),
        }
    }

    /// The share of the integers in `lo..=hi` that are in the set (1 when the range is
    /// unknown or empty): how selective a key list is on a block of dense keys.
    fn share_of(&self, range: Option<(i64, i64)>) -> f64 {
        let Some((lo, hi)) = range.filter(|(lo, hi)| lo <= hi) else { return 1.0 };
        let from = self.sorted.partition_point(|v| *v < lo);
        let to = self.sorted.partition_point(|v| *v <= hi);
        let width = hi.abs_diff(lo).saturating_add(1) as f64;
        ((to - from) as f64 / width).min(1.0)
    }

    /// Whether some value lies in `lo..=hi`.
    fn any_between(&self, lo: i64, hi: i64) -> bool {
        let at = self.sorted.partition_point(|v| *v < lo);
        self.sorted.get(at).is_some_and(|v| *v <= hi)
    }
}

/// `IN` over a column with a membership test per value: nulls stay null, the rest compare.
fn membership<T: arrow::datatypes::ArrowPrimitiveType>(
    col: &ArrayRef,
    contains: impl Fn(T::Native) -> bool,
) -> BooleanArray {
    let col = col.as_primitive::<T>();
    let raw = col.values();
    // 64 results packed per word (collecting an iterator of bools pushes bit by bit).
    let values = arrow::buffer::BooleanBuffer::collect_bool(raw.len(), |i| contains(raw[i]));
    BooleanArray::new(values, arrow::array::Array::nulls(col).cloned())
}

/// A long `IN` list prepared for membership tests, by the kind of its values.
enum Prepared {
    Ints(IntSet),
    Timestamps(IntSet),
    /// Days since the epoch, compared with the column's text parsed as dates.
    Dates(IntSet),
    /// A hash set for membership, the sorted values for a block's min/max.
    Strs(std::collections::HashSet<String>, Vec<String>),
    /// Short, mixed or float lists: value by value.
    ValueByValue,
}

impl Prepared {
    fn new(values: &[Scalar]) -> Prepared {
        fn ints(values: &[Scalar], want: fn(&Scalar) -> Option<i64>) -> Option<IntSet> {
            values.iter().map(want).collect::<Option<Vec<i64>>>().map(IntSet::new)
        }
        if values.len() < 8 {
            return Prepared::ValueByValue;
        }
        let prepared = match values.first() {
            Some(Scalar::Int(_)) => {
                ints(values, |v| if let Scalar::Int(i) = v { Some(*i) } else { None }).map(Prepared::Ints)
            }
            Some(Scalar::Timestamp(_)) => {
                ints(values, |v| if let Scalar::Timestamp(t) = v { Some(*t) } else { None }).map(Prepared::Timestamps)
            }
            Some(Scalar::Date(_)) => {
                ints(values, |v| if let Scalar::Date(d) = v { Some(i64::from(*d)) } else { None }).map(Prepared::Dates)
            }
            Some(Scalar::Str(_)) => values
                .iter()
                .map(|v| if let Scalar::Str(s) = v { Some(s.clone()) } else { None })
                .collect::<Option<Vec<String>>>()
                .map(|mut sorted| {
                    sorted.sort_unstable();
                    sorted.dedup();
                    Prepared::Strs(sorted.iter().cloned().collect(), sorted)
                }),
            // Floats (equality with -0.0 and NaN) and booleans: value by value.
            _ => None,
        };
        prepared.unwrap_or(Prepared::ValueByValue)
    }
}

impl Prepared {
    /// The block's column at `path` as this list's values compare with it: as integers, as
    /// timestamps, its text parsed as dates, or as text; None for a list checked value by value.
    fn column(&self, path: &str, block: &Block) -> Result<Option<ArrayRef>> {
        Ok(Some(match self {
            Prepared::Ints(_) => block.column_as(path, &DataType::Int64)?,
            Prepared::Timestamps(_) => block.column_as(path, &scalar_type(&Scalar::Timestamp(0)))?,
            Prepared::Dates(_) => block.column_as_date(path)?,
            Prepared::Strs(..) => block.column_as(path, &DataType::Utf8)?,
            Prepared::ValueByValue => return Ok(None),
        }))
    }
}

/// The `IN` lists of one scan's filters, each prepared (sorted, as a bitmap or a hash set)
/// the first time a block needs it and reused for every later block. A runtime key list of
/// 8,167 keys was sorted again for each of a scan's blocks: 40% of the process's CPU in SSB
/// star q2.1.
///
/// Keyed by the list's address, so an `InSets` must not outlive the filters it served (a scan
/// creates one and drops it when it ends).
#[derive(Default)]
pub struct InSets {
    prepared: std::cell::RefCell<std::collections::HashMap<ListKey, Arc<Prepared>>>,
    /// Per list, the rows it was checked on and the rows it kept, over the blocks so far.
    kept: std::cell::RefCell<std::collections::HashMap<ListKey, (u64, u64)>>,
}

/// A list's address and length.
type ListKey = (usize, usize);

fn list_key(values: &[Scalar]) -> ListKey {
    (values.as_ptr() as usize, values.len())
}

impl InSets {
    fn get(&self, values: &[Scalar]) -> Arc<Prepared> {
        self.prepared.borrow_mut().entry(list_key(values)).or_insert_with(|| Arc::new(Prepared::new(values))).clone()
    }

    /// The share of rows the list kept in earlier blocks, once it was checked on some.
    fn kept_share(&self, key: ListKey) -> Option<f64> {
        let (checked, kept) = self.kept.borrow().get(&key).copied()?;
        (checked > 0).then(|| kept as f64 / checked as f64)
    }

    fn record(&self, key: ListKey, checked: u64, kept: u64) {
        let mut map = self.kept.borrow_mut();
        let entry = map.entry(key).or_default();
        entry.0 += checked;
        entry.1 += kept;
    }
}

/// `path IN (values)` with one membership test per row when the list is long and of one kind
/// (a join's runtime key list has up to 4,096 values; a comparison per value and row would
/// cost as many passes). None: evaluate value by value.
fn in_set(path: &str, values: &[Scalar], block: &Block, sets: &InSets) -> Result<Option<BooleanArray>> {
    let prepared = sets.get(values);
    let Some(col) = prepared.column(path, block)? else { return Ok(None) };
    let out = match prepared.as_ref() {
        Prepared::Ints(set) => membership::<arrow::datatypes::Int64Type>(&col, |x| set.contains(x)),
        Prepared::Timestamps(set) => {
            membership::<arrow::datatypes::TimestampMicrosecondType>(&col, |x| set.contains(x))
        }
        Prepared::Dates(set) => membership::<arrow::datatypes::Date32Type>(&col, |x| set.contains(i64::from(x))),
        Prepared::Strs(set, _) => col.as_string::<i32>().iter().map(|v| v.map(|x| set.contains(x))).collect(),
        Prepared::ValueByValue => return Ok(None),
    };
    Ok(Some(out))
}

/// `path IN (texts)` through the block's dictionary of the column (see
/// [`Block::text_dictionary`]): one membership test per distinct value. None when the list
/// holds anything but text or the column has no dictionary.
fn in_dictionary(path: &str, values: &[Scalar], block: &Block, sets: &InSets) -> Option<BooleanArray> {
    if values.is_empty() || !values.iter().all(|v| matches!(v, Scalar::Str(_))) {
        return None;
    }
    let dict = block.text_dictionary(path)?;
    let prepared = sets.get(values);
    let listed = |x: &str| match prepared.as_ref() {
        Prepared::Strs(set, _) => set.contains(x),
        _ => values.iter().any(|v| matches!(v, Scalar::Str(s) if s == x)),
    };
    // Dictionary values are never null (null rows have no value).
    let per_value: BooleanArray = dict.values.iter().map(|v| Some(v.is_some_and(listed))).collect();
    Some(dict.per_row(&per_value))
}

/// Evaluate a filter over every row of a block. Null means unknown (SQL semantics).
pub fn eval(filter: &Filter, block: &Block) -> Result<BooleanArray> {
    eval_with(filter, block, &InSets::default())
}

/// [`eval`] reusing the prepared `IN` lists of `sets`.
pub fn eval_with(filter: &Filter, block: &Block, sets: &InSets) -> Result<BooleanArray> {
    match filter {
        Filter::And(items) => fold(items, block, true, sets),
        Filter::Or(items) => fold(items, block, false, sets),
        Filter::Not(inner) => Ok(not(&eval_with(inner, block, sets)?)?),
        Filter::Cmp { path, op, value } => {
            if let Scalar::Str(_) = value
                && let Some(dict) = block.text_dictionary(path)
            {
                let distinct: ArrayRef = Arc::new(dict.values.clone());
                return Ok(dict.per_row(&compare(&distinct, *op, value)?));
            }
            let col = column_for(block, path, value)?;
            compare(&col, *op, value)
        }
        Filter::CmpDates { left, op, right } => {
            compare_with(&block.column_as_date(left)?, *op, &block.column_as_date(right)?)
        }
        Filter::CmpFields { left, op, right, ty } => {
            let ty = ty.to_arrow();
            compare_with(&block.column_as(left, &ty)?, *op, &block.column_as(right, &ty)?)
        }
        Filter::In { path, values } => {
            if let Some(m) = in_dictionary(path, values, block, sets) {
                return Ok(m);
            }
            if let Some(m) = in_set(path, values, block, sets)? {
                return Ok(m);
            }
            let mut acc: Option<BooleanArray> = None;
            for v in values {
                let col = column_for(block, path, v)?;
                let m = compare(&col, CmpOp::Eq, v)?;
                acc = Some(match acc {
                    None => m,
                    Some(a) => or_kleene(&a, &m)?,
                });
            }
            Ok(acc.unwrap_or_else(|| BooleanArray::from(vec![false; block.rows])))
        }
        Filter::IsNull(path) => Ok(match block.columns.get(path) {
            None => BooleanArray::from(vec![true; block.rows]),
            Some(a) => is_null(a)?,
        }),
        Filter::IsNotNull(path) => Ok(match block.columns.get(path) {
            None => BooleanArray::from(vec![false; block.rows]),
            Some(a) => is_not_null(a)?,
        }),
        Filter::Search { path, query } => {
            let col = block.column_as(path, &DataType::Utf8)?;
            Ok(text_match(col.as_string::<i32>(), query))
        }
        Filter::Like { path, pattern } => {
            let col = block.column_as(path, &DataType::Utf8)?;
            let like = Like::new(pattern);
            Ok(col.as_string::<i32>().iter().map(|v| v.map(|v| like.matches(v))).collect())
        }
    }
}

/// A `LIKE` pattern of literal parts between `%`s (see `basalt_common::filter::like_pushable`),
/// matched without a regular expression: the first part at the start, the last at the end,
/// each part between found after the one before (the leftmost match leaves the most room for
/// the rest). DataFusion compiled a regex per batch for `'%special%requests%'` (TPC-H q13).
struct Like<'p> {
    first: &'p [u8],
    middle: Vec<memchr::memmem::Finder<'p>>,
    /// None when the pattern has no `%` (the whole value must equal `first`).
    last: Option<&'p [u8]>,
}

impl<'p> Like<'p> {
    fn new(pattern: &'p str) -> Like<'p> {
        let mut parts: Vec<&[u8]> = pattern.as_bytes().split(|b| *b == b'%').collect();
        let first = parts.remove(0);
        let last = parts.pop();
        Like { first, middle: parts.into_iter().map(memchr::memmem::Finder::new).collect(), last }
    }

    fn matches(&self, value: &str) -> bool {
        let value = value.as_bytes();
        let Some(last) = self.last else { return value == self.first };
        if !value.starts_with(self.first) || value.len() < self.first.len() + last.len() || !value.ends_with(last) {
            return false;
        }
        let (mut at, end) = (self.first.len(), value.len() - last.len());
        for part in &self.middle {
            match part.find(&value[at..end]) {
                Some(i) => at += i + part.needle().len(),
                None => return false,
            }
        }
        true
    }
}

/// The rows of a block for which every filter is true (unknown counts as false, as for a
/// `WHERE` clause). Comparisons of integer, date and timestamp columns with constants are
/// ANDed into the selection 64 rows at a time ([`crate::kernels::and_compare`]: no boolean
/// array per filter, rows already dropped are not compared); the other filters are evaluated
/// with [`eval_with`] and combined.
///
/// Integer, date and timestamp `IN` lists (a join's runtime keys) come next, the one that
/// keeps the smallest share of the block's key range first, each looked up only for the rows
/// still selected ([`and_members`]). SSB star q4.1 evaluated its three key lists over every
/// row of `lineorder` and combined the results: half of the query's CPU.
pub fn select(filters: &[&Filter], block: &Block, sets: &InSets) -> Result<arrow::buffer::BooleanBuffer> {
    let mut acc = vec![u64::MAX; block.rows.div_ceil(64)];
    let mut rest = Vec::new();
    let mut lists = Vec::new();
    let mut pairs = Vec::new();
    for f in filters {
        if matches!(f, Filter::CmpFields { .. }) {
            pairs.push(*f);
            continue;
        }
        if select_compare(f, block, &mut acc)? {
            continue;
        }
        match member_list(f, block, sets)? {
            Some(list) => lists.push(list),
            None => rest.push(*f),
        }
    }
    // The list keeping the fewest rows first, so the others look up only what it keeps: by
    // the shares earlier blocks kept (keys of a date dimension are dense in no range), else
    // by the estimate from the block's min/max.
    for list in &mut lists {
        list.share = sets.kept_share(list.key).unwrap_or(list.share);
    }
    lists.sort_by(|a, b| a.share.total_cmp(&b.share));
    let selected = |acc: &[u64]| acc.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
    let mut left = selected(&acc);
    for list in &lists {
        if left == 0 {
            break;
        }
        list.and_into(&mut acc)?;
        let kept = selected(&acc);
        sets.record(list.key, left, kept);
        left = kept;
    }
    // Two fields of each row compared: after the lists, on the rows they left.
    for f in pairs {
        if left == 0 {
            break;
        }
        if let Filter::CmpFields { left: l, op, right: r, ty } = f
            && !select_compare_fields(block, l, *op, r, ty, &mut acc)?
        {
            rest.push(f);
        }
        left = selected(&acc);
    }
    if !rest.is_empty() {
        let m = fold(rest, block, true, sets)?;
        check_rows(m.len(), block)?;
        and_into(&mut acc, m.values());
        if let Some(nulls) = arrow::array::Array::nulls(&m) {
            and_into(&mut acc, nulls.inner());
        }
    }
    Ok(arrow::buffer::BooleanBuffer::new(arrow::buffer::Buffer::from_vec(acc), 0, block.rows))
}

/// A column or result must cover every row of its block: a shorter one would leave the
/// rows past its end selected.
fn check_rows(len: usize, block: &Block) -> Result<()> {
    if len != block.rows {
        return Err(basalt_common::BasaltError::internal(format!(
            "a filter over a block of {} rows gave {len} results",
            block.rows
        )));
    }
    Ok(())
}

/// `acc &= bits`, word by word.
fn and_into(acc: &mut [u64], bits: &arrow::buffer::BooleanBuffer) {
    for (a, b) in acc.iter_mut().zip(bits.bit_chunks().iter_padded()) {
        *a &= b;
    }
}

/// ANDs a comparison of an integer-valued or float column with a constant into `acc` when the block
/// holds the column in the constant's type (or, for a date, as text parsed to dates); false
/// when the filter is of another kind (left to [`eval_with`]).
fn select_compare(filter: &Filter, block: &Block, acc: &mut [u64]) -> Result<bool> {
    use arrow::datatypes::{Date32Type, Int64Type, TimestampMicrosecondType};
    if let Filter::CmpDates { left, op, right } = filter {
        return select_compare_dates(block, left, *op, right, acc);
    }
    let Filter::Cmp { path, op, value } = filter else { return Ok(false) };
    let column = match value {
        Scalar::Date(_) => block.column_as_date(path)?,
        Scalar::Int(_) | Scalar::Timestamp(_) | Scalar::Float(_) => match block.columns.get(path) {
            // An absent column is all null: no row passes.
            None => {
                acc.fill(0);
                return Ok(true);
            }
            Some(c) if *c.data_type() == scalar_type(value) => c.clone(),
            Some(_) => return Ok(false),
        },
        _ => return Ok(false),
    };
    check_rows(column.len(), block)?;
    let offsets = match value {
        Scalar::Int(_) | Scalar::Timestamp(_) => block.offsets(path, false),
        Scalar::Date(_) => block.offsets(path, true),
        _ => None,
    };
    match (value, offsets) {
        (Scalar::Int(r) | Scalar::Timestamp(r), Some(o)) if o.len() == column.len() => {
            crate::kernels::and_compare_offsets(acc, &o, *op, *r)
        }
        (Scalar::Date(r), Some(o)) if o.len() == column.len() => {
            crate::kernels::and_compare_offsets(acc, &o, *op, i64::from(*r))
        }
        (Scalar::Int(r), _) => crate::kernels::and_compare(acc, column.as_primitive::<Int64Type>().values(), *op, *r),
        (Scalar::Timestamp(r), _) => {
            crate::kernels::and_compare(acc, column.as_primitive::<TimestampMicrosecondType>().values(), *op, *r)
        }
        (Scalar::Date(r), _) => crate::kernels::and_compare(acc, column.as_primitive::<Date32Type>().values(), *op, *r),
        (Scalar::Float(r), _) => crate::kernels::and_compare_floats(
            acc,
            column.as_primitive::<arrow::datatypes::Float64Type>().values(),
            *op,
            *r,
        ),
        _ => return Ok(false),
    }
    if let Some(nulls) = arrow::array::Array::nulls(&column) {
        and_into(acc, nulls.inner());
    }
    Ok(true)
}

/// An integer-valued `IN` list over one block's column, prepared for [`select`].
struct MemberList {
    key: ListKey,
    prepared: Arc<Prepared>,
    column: ArrayRef,
    /// The column as narrow offsets (see [`Block::offsets`]), looked up instead of `column`.
    offsets: Option<Arc<crate::columns::Offsets>>,
    /// The estimated share of the block's rows it keeps (see [`IntSet::share_of`]).
    share: f64,
}

/// The `IN` list of `filter` as a [`MemberList`] when its values are integers, timestamps or
/// dates in a prepared set; None for any other filter (left to [`eval_with`]).
fn member_list(filter: &Filter, block: &Block, sets: &InSets) -> Result<Option<MemberList>> {
    let Filter::In { path, values } = filter else { return Ok(None) };
    let prepared = sets.get(values);
    let range = || match block.min_max.get(path).map(|mm| (&mm.min, &mm.max)) {
        Some((Scalar::Int(lo), Scalar::Int(hi))) | Some((Scalar::Timestamp(lo), Scalar::Timestamp(hi))) => {
            Some((*lo, *hi))
        }
        _ => None,
    };
    let share = match prepared.as_ref() {
        Prepared::Ints(set) | Prepared::Timestamps(set) => set.share_of(range()),
        // A text column parsed as dates has no min/max of its dates.
        Prepared::Dates(_) => 1.0,
        Prepared::Strs(..) | Prepared::ValueByValue => return Ok(None),
    };
    let Some(column) = prepared.column(path, block)? else { return Ok(None) };
    check_rows(column.len(), block)?;
    // Offsets of the very column the list compares with: the stored one when its type is the
    // list's (not a cast), or the text parsed as dates.
    let stored = block.columns.get(path).is_some_and(|c| c.data_type() == column.data_type());
    let offsets = match prepared.as_ref() {
        Prepared::Ints(_) | Prepared::Timestamps(_) if stored => block.offsets(path, false),
        Prepared::Dates(_) => block.offsets(path, true),
        _ => None,
    }
    .filter(|o| o.len() == column.len());
    Ok(Some(MemberList { key: list_key(values), prepared, column, offsets, share }))
}

impl MemberList {
    fn and_into(&self, acc: &mut [u64]) -> Result<()> {
        use arrow::datatypes::{Date32Type, Int64Type, TimestampMicrosecondType};
        let column = &self.column;
        match (self.prepared.as_ref(), self.offsets.as_deref()) {
            (Prepared::Ints(set) | Prepared::Timestamps(set), Some(o)) => {
                and_member_offsets(acc, o, |v| set.contains(v))
            }
            (Prepared::Dates(set), Some(o)) => and_member_offsets(acc, o, |v| set.contains(v)),
            (Prepared::Ints(set), None) => {
                and_members(acc, column.as_primitive::<Int64Type>().values(), |v| set.contains(v))
            }
            (Prepared::Timestamps(set), None) => {
                and_members(acc, column.as_primitive::<TimestampMicrosecondType>().values(), |v| set.contains(v))
            }
            (Prepared::Dates(set), None) => {
                and_members(acc, column.as_primitive::<Date32Type>().values(), |v| set.contains(i64::from(v)))
            }
            (Prepared::Strs(..) | Prepared::ValueByValue, _) => {
                return Err(basalt_common::BasaltError::internal("a member list of text or mixed values"));
            }
        }
        // A null is never in a list.
        if let Some(nulls) = arrow::array::Array::nulls(column) {
            and_into(acc, nulls.inner());
        }
        Ok(())
    }
}

/// `acc[w] &= (contains(values[64w + j]) for j in 0..64)`, looking values up only for the rows
/// still selected: a word no row of which is left is skipped, a partly selected one visits its
/// set bits. Bits past the values' end are cleared.
/// [`and_members`] over a column's offsets: a row's value is the base plus its offset.
fn and_member_offsets(acc: &mut [u64], offsets: &crate::columns::Offsets, contains: impl Fn(i64) -> bool) {
    use crate::columns::OffsetValues;
    let base = offsets.base;
    match &offsets.values {
        OffsetValues::U8(v) => and_members(acc, v, |o| contains(base.wrapping_add(i64::from(o)))),
        OffsetValues::U16(v) => and_members(acc, v, |o| contains(base.wrapping_add(i64::from(o)))),
        OffsetValues::U32(v) => and_members(acc, v, |o| contains(base.wrapping_add(i64::from(o)))),
    }
}

fn and_members<T: Copy>(acc: &mut [u64], values: &[T], contains: impl Fn(T) -> bool) {
    for (w, word) in acc.iter_mut().enumerate() {
        if *word == 0 {
            continue;
        }
        let chunk = values.get(w * 64..).unwrap_or_default();
        let chunk = &chunk[..chunk.len().min(64)];
        let mut out = 0u64;
        if *word == u64::MAX && chunk.len() == 64 {
            for (j, v) in chunk.iter().enumerate() {
                out |= u64::from(contains(*v)) << j;
            }
        } else {
            let mut left = *word;
            while left != 0 {
                let j = left.trailing_zeros() as usize;
                // Without a branch on the answer: a key list keeps rows unpredictably.
                out |= u64::from(chunk.get(j).is_some_and(|v| contains(*v))) << j;
                left &= left - 1;
            }
        }
        *word &= out;
    }
}

/// [`select_compare`] for two text fields of each row parsed as dates (kept with the block).
fn select_compare_dates(block: &Block, left: &str, op: CmpOp, right: &str, acc: &mut [u64]) -> Result<bool> {
    use arrow::datatypes::Date32Type;
    let (l, r) = (block.column_as_date(left)?, block.column_as_date(right)?);
    check_rows(l.len(), block)?;
    check_rows(r.len(), block)?;
    crate::kernels::and_compare_columns(
        acc,
        l.as_primitive::<Date32Type>().values(),
        op,
        r.as_primitive::<Date32Type>().values(),
    );
    for column in [&l, &r] {
        if let Some(nulls) = arrow::array::Array::nulls(column) {
            and_into(acc, nulls.inner());
        }
    }
    Ok(true)
}

/// `acc[w] &= (keep(64w + j) for j in 0..64)`, calling `keep` only for the rows still selected
/// among the first `rows` (bits past them are cleared).
fn and_selected(acc: &mut [u64], rows: usize, keep: impl Fn(usize) -> bool) {
    for (w, word) in acc.iter_mut().enumerate() {
        let past = rows.saturating_sub(w * 64);
        let mut left = if past >= 64 { *word } else { *word & ((1u64 << past) - 1) };
        let mut out = 0u64;
        while left != 0 {
            let j = left.trailing_zeros() as usize;
            out |= u64::from(keep(w * 64 + j)) << j;
            left &= left - 1;
        }
        *word &= out;
    }
}

/// ANDs `left op right` of two fields of each row, both read as `ty`, into `acc` (a null on
/// either side drops the row); only the rows still selected are compared. False for a type
/// without a row-by-row comparison here (left to [`eval_with`]).
fn select_compare_fields(
    block: &Block,
    left: &str,
    op: CmpOp,
    right: &str,
    ty: &basalt_common::schema::ColumnType,
    acc: &mut [u64],
) -> Result<bool> {
    use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
    let dt = ty.to_arrow();
    if !matches!(dt, DataType::Int64 | DataType::Float64 | DataType::Utf8 | DataType::Timestamp(..) | DataType::Boolean)
    {
        return Ok(false);
    }
    let (l, r) = (block.column_as(left, &dt)?, block.column_as(right, &dt)?);
    check_rows(l.len(), block)?;
    check_rows(r.len(), block)?;
    for column in [&l, &r] {
        if let Some(nulls) = arrow::array::Array::nulls(column) {
            and_into(acc, nulls.inner());
        }
    }
    match dt {
        DataType::Int64 => crate::kernels::and_compare_columns(
            acc,
            l.as_primitive::<Int64Type>().values(),
            op,
            r.as_primitive::<Int64Type>().values(),
        ),
        DataType::Timestamp(..) => crate::kernels::and_compare_columns(
            acc,
            l.as_primitive::<TimestampMicrosecondType>().values(),
            op,
            r.as_primitive::<TimestampMicrosecondType>().values(),
        ),
        DataType::Float64 => {
            let (lv, rv) =
                (l.as_primitive::<arrow::datatypes::Float64Type>(), r.as_primitive::<arrow::datatypes::Float64Type>());
            let (lv, rv) = (lv.values(), rv.values());
            and_selected(acc, block.rows, |i| op.holds(lv[i].total_cmp(&rv[i])));
        }
        DataType::Boolean => {
            let (lv, rv) = (l.as_boolean(), r.as_boolean());
            and_selected(acc, block.rows, |i| op.holds(lv.value(i).cmp(&rv.value(i))));
        }
        _ => match (block.text_as_ordered_dates(left), block.text_as_ordered_dates(right)) {
            // Dates written YYYY-MM-DD order as their text: the parsed days are compared
            // vectorized (TPC-H q12's two text comparisons were a third of its leaves' CPU in
            // memcmp). Null rows are already dropped above.
            (Some(ld), Some(rd)) => {
                use arrow::datatypes::Date32Type;
                check_rows(ld.len(), block)?;
                check_rows(rd.len(), block)?;
                crate::kernels::and_compare_columns(
                    acc,
                    ld.as_primitive::<Date32Type>().values(),
                    op,
                    rd.as_primitive::<Date32Type>().values(),
                );
            }
            _ => {
                let (lv, rv) = (l.as_string::<i32>(), r.as_string::<i32>());
                and_selected(acc, block.rows, |i| op.holds(lv.value(i).as_bytes().cmp(rv.value(i).as_bytes())));
            }
        },
    }
    Ok(true)
}

fn fold<'a>(
    items: impl IntoIterator<Item = &'a Filter>,
    block: &Block,
    conjunction: bool,
    sets: &InSets,
) -> Result<BooleanArray> {
    let mut acc: Option<BooleanArray> = None;
    for item in items {
        let m = eval_with(item, block, sets)?;
        acc = Some(match acc {
            None => m,
            Some(a) if conjunction => and_kleene(&a, &m)?,
            Some(a) => or_kleene(&a, &m)?,
        });
    }
    // The empty conjunction is true, the empty disjunction false.
    Ok(acc.unwrap_or_else(|| BooleanArray::from(vec![conjunction; block.rows])))
}

/// `search()` semantics without the index: every query token occurs in the value.
pub fn text_match(values: &StringArray, query: &str) -> BooleanArray {
    let wanted = tokenize(query);
    values.iter().map(|v| Some(v.is_some_and(|text| matches(text, &wanted)))).collect()
}

/// Whether min/max (or the absence of a column) proves no row of the block can pass a
/// top-level conjunct.
/// Long `IN` lists are checked through `sets` (a binary search in the sorted keys instead of a
/// comparison per key and block).
pub fn block_excluded(filters: &[Filter], block: &Block, sets: &InSets) -> bool {
    filters.iter().any(|f| excluded(f, block, sets))
}

fn excluded(filter: &Filter, block: &Block, sets: &InSets) -> bool {
    match filter {
        Filter::And(items) => items.iter().any(|f| excluded(f, block, sets)),
        Filter::Or(items) => !items.is_empty() && items.iter().all(|f| excluded(f, block, sets)),
        Filter::Cmp { path, op, value } => {
            if !block.columns.contains_key(path) {
                return true; // all null: a comparison is never true
            }
            let Some(mm) = block.min_max.get(path) else { return false };
            let (Some(lo), Some(hi)) = (order(&mm.min, value), order(&mm.max, value)) else {
                return false;
            };
            use std::cmp::Ordering::*;
            match op {
                CmpOp::Eq => lo == Greater || hi == Less,
                CmpOp::Lt => lo != Less,
                CmpOp::LtEq => lo == Greater,
                CmpOp::Gt => hi != Greater,
                CmpOp::GtEq => hi == Less,
                CmpOp::NotEq => lo == Equal && hi == Equal,
            }
        }
        Filter::In { path, values } => {
            if values.is_empty() {
                return false;
            }
            if !block.columns.contains_key(path) {
                return true;
            }
            let Some(mm) = block.min_max.get(path) else { return false };
            match (sets.get(values).as_ref(), &mm.min, &mm.max) {
                (Prepared::Ints(set), Scalar::Int(lo), Scalar::Int(hi))
                | (Prepared::Timestamps(set), Scalar::Timestamp(lo), Scalar::Timestamp(hi)) => {
                    return !set.any_between(*lo, *hi);
                }
                (Prepared::Strs(_, sorted), Scalar::Str(lo), Scalar::Str(hi)) => {
                    let at = sorted.partition_point(|v| v.as_str() < lo.as_str());
                    return sorted.get(at).is_none_or(|v| v.as_str() > hi.as_str());
                }
                // Statistics of another type than the list's are not comparable with it.
                (Prepared::Ints(_) | Prepared::Timestamps(_) | Prepared::Strs(..), _, _) => return false,
                _ => {}
            }
            use std::cmp::Ordering::*;
            // Excluded when every value is outside the block's range (or not comparable with it,
            // which `excluded` of an equality treats the same way: not excluded).
            values.iter().all(|v| match (order(&mm.min, v), order(&mm.max, v)) {
                (Some(lo), Some(hi)) => lo == Greater || hi == Less,
                _ => false,
            })
        }
        Filter::IsNotNull(path) | Filter::Search { path, .. } | Filter::Like { path, .. } => {
            !block.columns.contains_key(path)
        }
        // Null on either side is never true.
        Filter::CmpDates { left, right, .. } | Filter::CmpFields { left, right, .. } => {
            !block.columns.contains_key(left) || !block.columns.contains_key(right)
        }
        _ => false,
    }
}

/// Order of a block statistic against a literal, when both have the same type.
fn order(stat: &Scalar, lit: &Scalar) -> Option<std::cmp::Ordering> {
    match (stat, lit) {
        (Scalar::Int(a), Scalar::Int(b)) => Some(a.cmp(b)),
        (Scalar::Float(a), Scalar::Float(b)) => a.partial_cmp(b),
        (Scalar::Str(a), Scalar::Str(b)) => Some(a.as_str().cmp(b.as_str())),
        (Scalar::Timestamp(a), Scalar::Timestamp(b)) => Some(a.cmp(b)),
        (Scalar::Bool(a), Scalar::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Array;
    use basalt_common::doc::Doc;
    use serde_json::json;

    fn block() -> Block {
        let docs: Vec<Arc<Doc>> = [
            json!({"_id": "a", "age": 36, "name": "Ada Lovelace"}),
            json!({"_id": "b", "age": 20, "name": "Bob"}),
            json!({"_id": "c", "name": "Cy"}),
        ]
        .into_iter()
        .map(|v| Arc::new(v.as_object().unwrap().clone()))
        .collect();
        Block::build(0, &docs).unwrap()
    }

    fn rows(f: &Filter) -> Vec<Option<bool>> {
        eval(f, &block()).unwrap().iter().collect()
    }

    /// Key lists are checked in the order of the shares of rows they kept in a scan's earlier
    /// blocks: `a` keeps 1 row in 4 but looks dense from the block's min/max (its keys are
    /// spread as a date dimension's are), `b` keeps 1 in 50. The answers are those of the
    /// filters checked one by one, whatever the order.
    #[test]
    fn key_lists_are_checked_most_selective_first_by_what_they_kept() {
        let block = |base: i64| {
            let docs: Vec<Arc<Doc>> = (base..base + 1000)
                .map(|i| {
                    let mut v = json!({"a": (i % 4) * 10_000 + i % 100, "b": i % 50});
                    if i % 7 == 0 {
                        v["b"] = json!(null);
                    }
                    Arc::new(v.as_object().unwrap().clone())
                })
                .collect();
            Block::build(base as u64, &docs).unwrap()
        };
        // 100 of a's 400 values (those with i % 4 == 0) over a span of 30,100: 0.3% dense.
        let a = Filter::In { path: "a".into(), values: (0..100).map(Scalar::Int).collect() };
        let b = Filter::In { path: "b".into(), values: std::iter::once(4).chain(100..120).map(Scalar::Int).collect() };
        let sets = InSets::default();
        for base in [0, 1000, 2000] {
            let block = block(base);
            let got: Vec<bool> = select(&[&a, &b], &block, &sets).unwrap().iter().collect();
            let want: Vec<bool> = (base..base + 1000).map(|i| i % 4 == 0 && i % 50 == 4 && i % 7 != 0).collect();
            assert_eq!(got, want);
            assert!(want.iter().any(|w| *w));
        }
        let share = |f: &Filter| {
            let Filter::In { values, .. } = f else { unreachable!() };
            sets.kept_share(list_key(values)).unwrap()
        };
        // `a` was estimated the more selective and checked first in the first block only; `b`
        // (1 in 50, nulls never kept) first after that.
        assert!((share(&b) - 0.0171).abs() < 0.002, "{}", share(&b));
        assert!(share(&a) > 0.2, "{}", share(&a));
        let checked = |f: &Filter| {
            let Filter::In { values, .. } = f else { unreachable!() };
            sets.kept.borrow()[&list_key(values)].0
        };
        // a: the first block's 1,000 rows and b's few in the others; b: 250 rows, then all.
        assert!(checked(&a) < 1100, "{}", checked(&a));
        assert!(checked(&b) > 2200, "{}", checked(&b));
    }

    /// `LIKE` with `%`s answers as arrow's `like` kernel (DataFusion's) does, nulls included,
    /// for anchored, open and empty parts, repeated and overlapping text and multi-byte text.
    #[test]
    fn like_patterns_match_as_arrow_like_does() {
        let values: Vec<Option<&str>> = vec![
            Some(""),
            Some("special requests"),
            Some("specialrequests"),
            Some("requests special"),
            Some("a special deal: requests pending"),
            Some("special"),
            Some("PROMO BRUSHED TIN"),
            Some("LARGE PROMO"),
            Some("aaa"),
            Some("aa"),
            Some("abab"),
            Some("über café"),
            None,
        ];
        let patterns = [
            "%special%requests%",
            "PROMO%",
            "%PROMO",
            "%BRASS",
            "special",
            "",
            "%",
            "%%",
            "a%a",
            "a%a%a",
            "ab%ab",
            "%ab%ab%",
            "%é",
            "ü%",
            "%special%",
            "special%requests",
        ];
        let array = arrow::array::StringArray::from(values.clone());
        for pattern in patterns {
            let like = Like::new(pattern);
            let ours: Vec<Option<bool>> = values.iter().map(|v| v.map(|v| like.matches(v))).collect();
            let theirs =
                arrow::compute::kernels::comparison::like(&array, &arrow::array::StringArray::new_scalar(pattern))
                    .unwrap();
            assert_eq!(ours, theirs.iter().collect::<Vec<_>>(), "{pattern}");
        }
        // Through a block: absent columns are null, NOT LIKE keeps the non-matching rows only.
        let f = Filter::Not(Box::new(Filter::Like { path: "name".into(), pattern: "%Love%".into() }));
        assert_eq!(eval(&f, &block()).unwrap().iter().collect::<Vec<_>>(), vec![Some(false), Some(true), Some(true)]);
        let absent = Filter::Like { path: "nope".into(), pattern: "%".into() };
        assert_eq!(eval(&absent, &block()).unwrap().iter().collect::<Vec<_>>(), vec![None, None, None]);
    }

    #[test]
    fn selection_keeps_the_rows_every_filter_holds_for() {
        // Integers with nulls and a float among them in one block, dates as text, timestamps,
        // a column absent from the block; 300 rows (not a multiple of 64).
        let docs: Vec<Arc<Doc>> = (0..300i64)
            .map(|i| {
                let mut v = json!({"t": format!("k{}", i % 5), "d": format!("1995-0{}-1{}", 1 + i % 9, i % 10)});
                if i % 11 != 3 {
                    v["q"] = json!((i * 37) % 50);
                }
                if i % 7 != 0 {
                    v["f"] = if i == 150 { json!(2.5) } else { json!(i % 4) };
                }
                if i % 13 != 5 {
                    v["x"] = json!([-0.0, 0.0, 0.05, 0.07, -2.5, 1e300, 0.06][(i % 7) as usize]);
                }
                // Ranges that fit two and four bytes of offsets, and one that fits none.
                if i % 17 != 4 {
                    v["h"] = json!(-30_000 + (i * 7_919) % 60_001);
                    v["w"] = json!(1_000_000 + i * 9_999_991);
                    v["big"] = json!((i - 150) << 40);
                }
                Arc::new(v.as_object().unwrap().clone())
            })
            .collect();
        let b = Block::build(0, &docs).unwrap();
        assert_eq!(b.columns["f"].data_type(), &DataType::Float64, "mixed column stays on the general path");
        let day = |s: &str| {
            let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
            Scalar::Date(d.signed_duration_since(chrono::NaiveDate::default()).num_days() as i32)
        };
        let cmp = |path: &str, op, value| Filter::Cmp { path: path.into(), op, value };
        let cases: Vec<Vec<Filter>> = vec![
            vec![cmp("q", CmpOp::Lt, Scalar::Int(25))],
            vec![cmp("q", CmpOp::GtEq, Scalar::Int(10)), cmp("q", CmpOp::LtEq, Scalar::Int(30))],
            vec![cmp("q", CmpOp::NotEq, Scalar::Int(0)), cmp("d", CmpOp::Lt, day("1995-05-01"))],
            vec![cmp("f", CmpOp::Eq, Scalar::Int(2)), cmp("q", CmpOp::Gt, Scalar::Int(5))],
            vec![cmp("t", CmpOp::Eq, Scalar::Str("k3".into())), cmp("q", CmpOp::Gt, Scalar::Int(5))],
            vec![cmp("missing", CmpOp::Eq, Scalar::Int(1))],
            // Floats (the kernel path when the block holds the column as floats).
            vec![cmp("x", CmpOp::GtEq, Scalar::Float(0.05)), cmp("x", CmpOp::LtEq, Scalar::Float(0.07))],
            vec![cmp("x", CmpOp::Eq, Scalar::Float(-0.0))],
            vec![cmp("x", CmpOp::Lt, Scalar::Float(0.0)), cmp("q", CmpOp::Gt, Scalar::Int(5))],
            vec![cmp("x", CmpOp::NotEq, Scalar::Float(0.06))],
            vec![cmp("f", CmpOp::Gt, Scalar::Float(1.5))],
            vec![Filter::Not(Box::new(cmp("q", CmpOp::Lt, Scalar::Int(25)))), cmp("d", CmpOp::GtEq, day("1995-03-01"))],
            vec![],
            // Offsets of one, two and four bytes, and a column kept at eight: constants below,
            // inside and above each column's range.
            vec![cmp("q", CmpOp::GtEq, Scalar::Int(-5))],
            vec![cmp("q", CmpOp::Lt, Scalar::Int(-5))],
            vec![cmp("q", CmpOp::NotEq, Scalar::Int(1_000))],
            vec![cmp("q", CmpOp::LtEq, Scalar::Int(1_000))],
            vec![cmp("q", CmpOp::Eq, Scalar::Int(i64::MIN))],
            vec![cmp("q", CmpOp::Gt, Scalar::Int(i64::MAX))],
            vec![cmp("h", CmpOp::Gt, Scalar::Int(-1)), cmp("h", CmpOp::LtEq, Scalar::Int(20_000))],
            vec![cmp("h", CmpOp::Eq, Scalar::Int(-30_000 + 7_919))],
            vec![cmp("h", CmpOp::Lt, Scalar::Int(-40_000))],
            vec![cmp("w", CmpOp::GtEq, Scalar::Int(1_500_000_000)), cmp("q", CmpOp::Lt, Scalar::Int(40))],
            vec![cmp("w", CmpOp::Gt, Scalar::Int(5_000_000_000))],
            vec![cmp("big", CmpOp::Lt, Scalar::Int(0)), cmp("d", CmpOp::Gt, day("1994-01-01"))],
            vec![cmp("d", CmpOp::Lt, day("1990-01-01"))],
            vec![cmp("d", CmpOp::NotEq, day("2030-01-01"))],
        ];
        // Integer and date `IN` lists (prepared sets), alone, after comparisons and together.
        let ints = |path: &str, values: Vec<i64>| Filter::In {
            path: path.into(),
            values: values.into_iter().map(Scalar::Int).collect(),
        };
        let days = |values: &[&str]| Filter::In { path: "d".into(), values: values.iter().map(|s| day(s)).collect() };
        let cases = cases.into_iter().chain(vec![
            vec![ints("q", (0..40).step_by(3).collect())],
            vec![ints("q", (0..40).step_by(3).collect()), cmp("q", CmpOp::Gt, Scalar::Int(20))],
            vec![ints("q", (0..50).step_by(2).collect()), ints("q", (0..50).step_by(3).collect())],
            vec![ints("f", (0..10).collect()), ints("q", (5..30).collect()), cmp("d", CmpOp::Lt, day("1995-07-01"))],
            vec![
                days(&[
                    "1995-01-10",
                    "1995-02-11",
                    "1995-03-12",
                    "1995-04-13",
                    "1995-05-14",
                    "1995-06-15",
                    "1995-07-16",
                    "1995-08-17",
                ]),
                ints("q", (0..25).collect()),
            ],
            vec![ints("missing", (0..10).collect())],
            vec![ints("q", (100..110).collect())],
            vec![ints("h", (0..300).map(|i| -30_000 + (i * 7_919) % 60_001).step_by(4).collect())],
            vec![
                ints("w", (0..300).map(|i| 1_000_000 + i * 9_999_991).step_by(3).collect()),
                ints("q", (0..30).collect()),
            ],
            vec![ints("big", (0..300).map(|i| (i - 150) << 40).step_by(5).collect())],
        ]);
        // The columns compared through offsets of the widths their ranges need.
        use crate::columns::OffsetValues;
        let width = |path: &str, as_date: bool| {
            b.offsets(path, as_date).map_or(0, |o| {
                assert_eq!(o.len(), 300);
                match o.values {
                    OffsetValues::U8(_) => 1,
                    OffsetValues::U16(_) => 2,
                    OffsetValues::U32(_) => 4,
                }
            })
        };
        assert_eq!(
            [width("q", false), width("d", true), width("h", false), width("w", false), width("big", false)],
            [1, 1, 2, 4, 0]
        );
        assert_eq!(width("t", false), 0, "text has no offsets");
        for filters in cases {
            let refs: Vec<&Filter> = filters.iter().collect();
            let sets = InSets::default();
            // The Kleene conjunction, as the general path evaluates it.
            let all = fold(refs.iter().copied(), &b, true, &sets).unwrap();
            let want = if all.null_count() > 0 { arrow::compute::prep_null_mask_filter(&all) } else { all };
            let got = select(&refs, &b, &sets).unwrap();
            assert_eq!(got.len(), 300);
            assert_eq!(&got, want.values(), "{filters:?}");
        }
        // A column shorter than its block is an error, not rows selected without a value.
        let mut short = std::collections::HashMap::new();
        short.insert("q".to_string(), Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef);
        let broken = Block::new(0, 100, short, std::collections::HashMap::new());
        let q = cmp("q", CmpOp::Gt, Scalar::Int(0));
        assert!(select(&[&q], &broken, &InSets::default()).is_err());
        // Text that is not a date is still an error on the fast path.
        let bad = Block::build(0, &[Arc::new(json!({"d": "soon"}).as_object().unwrap().clone())]).unwrap();
        let lt = cmp("d", CmpOp::Lt, day("1995-01-01"));
        assert!(select(&[&lt], &bad, &InSets::default()).is_err());
    }

    /// Two fields of a row compared as one type give Arrow's comparison kernel's answers (what
    /// DataFusion computes above the scan), null as false, through `select` alone, after a key
    /// list (only the rows it keeps compared) and through `eval`.
    #[test]
    fn two_fields_compare_as_arrow_compares_them() {
        use basalt_common::schema::ColumnType;
        let floats = [-0.0, 0.0, 1.5, -2.0, f64::NAN, 1e300, 3.0];
        let docs: Vec<Arc<Doc>> = (0..300i64)
            .map(|i| {
                let mut v = json!({"k": i % 13});
                if i % 11 != 3 {
                    v["a"] = json!(i % 17 - 8);
                    v["x"] = json!(floats[((i / 2) % 7) as usize]);
                    v["s"] = json!(format!("1995-0{}-1{}", 1 + i % 9, i % 10));
                    v["p"] = json!(i % 3 == 0);
                }
                if i % 7 != 0 {
                    v["b"] = json!((i * 5) % 19 - 9);
                    v["y"] = json!(floats[(i % 5) as usize]);
                    // Multi-byte text and a prefix of another value.
                    v["t"] = json!(["1995-0", "1995-05-15", "é", "1995-01-1"][(i % 4) as usize]);
                    v["q"] = json!(i % 5 == 0);
                }
                // A field holding integers in some rows and text in others, read as text.
                v["m"] = if i % 2 == 0 { json!(i) } else { json!(format!("{i}")) };
                // Never null (the selection's bits past the block's 300 rows stay set).
                v["u"] = json!(format!("u{}", i % 7));
                v["w"] = json!(format!("u{}", i % 5));
                Arc::new(v.as_object().unwrap().clone())
            })
            .collect();
        let b = Block::build(0, &docs).unwrap();
        let keys = Filter::In { path: "k".into(), values: [0, 2, 3, 5, 7, 8, 10, 12].map(Scalar::Int).to_vec() };
        let pairs = [
            ("a", "b", ColumnType::Int64),
            ("x", "y", ColumnType::Float64),
            ("s", "t", ColumnType::Utf8),
            ("p", "q", ColumnType::Boolean),
            ("m", "s", ColumnType::Utf8),
            ("u", "w", ColumnType::Utf8),
        ];
        for (l, r, ty) in pairs {
            // Ops whose answer keeps some rows and drops others.
            let mut selecting = 0;
            for op in [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq] {
                let f = Filter::CmpFields { left: l.into(), op, right: r.into(), ty: ty.clone() };
                let dt = ty.to_arrow();
                let arrow = compare_with(&b.column_as(l, &dt).unwrap(), op, &b.column_as(r, &dt).unwrap()).unwrap();
                let want: Vec<bool> = arrow.iter().map(|v| v == Some(true)).collect();
                selecting += usize::from(want.iter().any(|w| *w) && !want.iter().all(|w| *w));
                let got = select(&[&f], &b, &InSets::default()).unwrap();
                assert_eq!(got.iter().collect::<Vec<_>>(), want, "{f}");
                let general: Vec<bool> = eval(&f, &b).unwrap().iter().map(|v| v == Some(true)).collect();
                assert_eq!(general, want, "{f} (general path)");
                let listed: Vec<bool> = eval(&keys, &b).unwrap().iter().map(|v| v == Some(true)).collect();
                let both: Vec<bool> = want.iter().zip(&listed).map(|(w, k)| *w && *k).collect();
                let got = select(&[&f, &keys], &b, &InSets::default()).unwrap();
                assert_eq!(got.iter().collect::<Vec<_>>(), both, "{f} after a key list");
            }
            assert!(selecting >= 5, "{l} and {r}: comparisons that select some rows");
        }
        // A field absent from a block excludes it; present fields do not.
        let f = |r: &str| Filter::CmpFields { left: "a".into(), op: CmpOp::Lt, right: r.into(), ty: ColumnType::Int64 };
        assert!(block_excluded(&[f("nope")], &b, &InSets::default()));
        assert!(!block_excluded(&[f("b")], &b, &InSets::default()));
    }

    /// Two text fields compared as text: written `YYYY-MM-DD` they are compared as parsed
    /// days (same answers), otherwise (a date written `1995-1-05`, text that is no date) as
    /// text, where the two orders differ.
    #[test]
    fn text_fields_of_plain_dates_compare_as_their_text() {
        let build = |odd: Option<&str>| {
            let docs: Vec<Arc<Doc>> = (0..300i64)
                .map(|i| {
                    let mut v = json!({});
                    if i % 11 != 3 {
                        v["s"] = json!(format!("199{}-0{}-1{}", 4 + i % 3, 1 + i % 9, i % 10));
                    }
                    if i % 7 != 0 {
                        v["r"] = json!(format!("199{}-0{}-1{}", 4 + i % 2, 1 + (i * 7) % 9, (i * 3) % 10));
                    }
                    if i == 5
                        && let Some(odd) = odd
                    {
                        v["s"] = json!(odd);
                    }
                    Arc::new(v.as_object().unwrap().clone())
                })
                .collect();
            (Block::build(0, &docs).unwrap(), docs)
        };
        for odd in [None, Some("1995-1-05"), Some("soon")] {
            let (b, docs) = build(odd);
            assert_eq!(b.text_as_ordered_dates("s").is_some(), odd.is_none(), "{odd:?}");
            assert!(b.text_as_ordered_dates("r").is_some());
            for op in [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq] {
                let f = Filter::CmpFields {
                    left: "s".into(),
                    op,
                    right: "r".into(),
                    ty: basalt_common::schema::ColumnType::Utf8,
                };
                let want: Vec<bool> = docs
                    .iter()
                    .map(|d| match (d.get("s").and_then(|v| v.as_str()), d.get("r").and_then(|v| v.as_str())) {
                        (Some(x), Some(y)) => op.holds(x.cmp(y)),
                        _ => false,
                    })
                    .collect();
                let got = select(&[&f], &b, &InSets::default()).unwrap();
                assert_eq!(got.iter().collect::<Vec<_>>(), want, "{f} with {odd:?}");
            }
        }
        // Row 5 of the odd block: '1995-1-05' sorts after '1995-0x-1y' as text (and before as a
        // date); the text order is the answer.
        let (b, docs) = build(Some("1995-1-05"));
        let r5 = docs[5].get("r").and_then(|v| v.as_str()).unwrap().to_string();
        assert!(r5.starts_with("1995-0"), "{r5}");
        let f = Filter::CmpFields {
            left: "s".into(),
            op: CmpOp::Gt,
            right: "r".into(),
            ty: basalt_common::schema::ColumnType::Utf8,
        };
        assert!(select(&[&f], &b, &InSets::default()).unwrap().value(5));
    }

    #[test]
    fn text_fields_compare_with_each_other_as_dates_row_by_row() {
        // Dates as text with nulls on either side; 300 rows (not a multiple of 64).
        let docs: Vec<Arc<Doc>> = (0..300i64)
            .map(|i| {
                let mut v = json!({});
                if i % 11 != 3 {
                    v["s"] = json!(format!("1995-0{}-1{}", 1 + i % 9, i % 10));
                }
                if i % 7 != 0 {
                    v["r"] = json!(format!("1995-0{}-1{}", 1 + (i * 7) % 9, (i * 3) % 10));
                }
                Arc::new(v.as_object().unwrap().clone())
            })
            .collect();
        let b = Block::build(0, &docs).unwrap();
        for op in [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq] {
            let f = Filter::CmpDates { left: "s".into(), op, right: "r".into() };
            let want: Vec<bool> = docs
                .iter()
                .map(|d| match (d.get("s").and_then(|v| v.as_str()), d.get("r").and_then(|v| v.as_str())) {
                    // ISO dates order as their text does.
                    (Some(x), Some(y)) => op.holds(x.cmp(y)),
                    _ => false,
                })
                .collect();
            let got = select(&[&f], &b, &InSets::default()).unwrap();
            assert_eq!(got.iter().collect::<Vec<_>>(), want, "{f}");
            let general = eval(&f, &b).unwrap();
            let general: Vec<bool> = general.iter().map(|v| v == Some(true)).collect();
            assert_eq!(general, want, "{f} (general path)");
        }
        // A field absent from a block excludes it; present fields do not.
        let f = |r: &str| Filter::CmpDates { left: "s".into(), op: CmpOp::Lt, right: r.into() };
        assert!(block_excluded(&[f("nope")], &b, &InSets::default()));
        assert!(!block_excluded(&[f("r")], &b, &InSets::default()));
        // Text that is not a date is an error on either path.
        let bad =
            Block::build(0, &[Arc::new(json!({"s": "soon", "r": "1995-01-01"}).as_object().unwrap().clone())]).unwrap();
        assert!(select(&[&f("r")], &bad, &InSets::default()).is_err());
        assert!(eval(&f("r"), &bad).is_err());
    }

    #[test]
    fn text_with_few_values_compares_through_the_dictionary_as_row_by_row() {
        let modes = ["MAIL", "SHIP", "AIR", "REG AIR"];
        let docs: Vec<Arc<Doc>> = (0..200)
            .map(|i| {
                let mut v = json!({"n": format!("n{i}")});
                if i % 9 != 4 {
                    v["m"] = json!(modes[(i * 7 + i / 3) % modes.len()]);
                }
                Arc::new(v.as_object().unwrap().clone())
            })
            .collect();
        let b = Block::build(0, &docs).unwrap();
        let dict = b.text_dictionary("m").expect("4 distinct values of 200 rows");
        assert_eq!(dict.values.len(), 4);
        assert!(Arc::ptr_eq(&dict, &b.text_dictionary("m").unwrap()), "built once");
        // Too many distinct values (one per row), not text, or absent: no dictionary.
        assert!(b.text_dictionary("n").is_none() && b.text_dictionary("nope").is_none());
        let col = b.columns["m"].clone();
        let str_ = |s: &str| Scalar::Str(s.into());
        for op in [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq] {
            for lit in ["MAIL", "AIR", "B", "ZZZ"] {
                let f = Filter::Cmp { path: "m".into(), op, value: str_(lit) };
                let want = compare(&col, op, &str_(lit)).unwrap();
                assert_eq!(eval(&f, &b).unwrap(), want, "{op:?} {lit}");
            }
        }
        // Short and long lists (the long one goes through a hash set), with and without matches.
        let long: Vec<Scalar> = ["SHIP", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "MAIL"].map(str_).to_vec();
        for values in [vec![str_("MAIL"), str_("SHIP")], vec![str_("none")], long] {
            let f = Filter::In { path: "m".into(), values: values.clone() };
            let mut want: Option<BooleanArray> = None;
            for v in &values {
                let m = compare(&col, CmpOp::Eq, v).unwrap();
                want = Some(match want {
                    None => m,
                    Some(a) => or_kleene(&a, &m).unwrap(),
                });
            }
            assert_eq!(eval(&f, &b).unwrap(), want.unwrap(), "{values:?}");
        }
        // Null rows stay unknown, so NOT keeps them out too.
        let not_mail = Filter::Not(Box::new(Filter::Cmp { path: "m".into(), op: CmpOp::Eq, value: str_("MAIL") }));
        let got = eval(&not_mail, &b).unwrap();
        assert_eq!(got.null_count(), col.null_count());
        assert_eq!(got.null_count(), 22);
    }

    #[test]
    fn text_compares_with_dates_as_parsed_dates() {
        let docs: Vec<Arc<Doc>> = [json!({"d": "1995-03-15"}), json!({"d": "1994-12-31"}), json!({"x": 1})]
            .into_iter()
            .map(|v| Arc::new(v.as_object().unwrap().clone()))
            .collect();
        let b = Block::build(0, &docs).unwrap();
        let day = |s: &str| {
            let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
            Scalar::Date(d.signed_duration_since(chrono::NaiveDate::default()).num_days() as i32)
        };
        let lt = Filter::Cmp { path: "d".into(), op: CmpOp::Lt, value: day("1995-01-01") };
        assert_eq!(eval(&lt, &b).unwrap().iter().collect::<Vec<_>>(), vec![Some(false), Some(true), None]);
        // Parsed once: the second comparison reads the same dates.
        let first = b.column_as_date("d").unwrap();
        assert!(Arc::ptr_eq(&first, &b.column_as_date("d").unwrap()));
        let dates: Vec<Scalar> = (0..9).map(Scalar::Date).chain([day("1995-03-15")]).collect();
        let within = Filter::In { path: "d".into(), values: dates };
        assert_eq!(eval(&within, &b).unwrap().iter().collect::<Vec<_>>(), vec![Some(true), Some(false), None]);
        // Text that is not a date is an error, as `CAST('x' AS DATE)` is in SQL.
        let bad = Block::build(0, &[Arc::new(json!({"d": "soon"}).as_object().unwrap().clone())]).unwrap();
        let err = eval(&lt, &bad).unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn deletions_answer_range_questions_a_word_at_a_time() {
        let mut d = crate::columns::Deletions::default();
        assert!(!d.any_in(0, 1000));
        d.set(130);
        for (start, end, want) in
            [(0, 130, false), (0, 131, true), (130, 131, true), (131, 5000, false), (64, 200, true)]
        {
            assert_eq!(d.any_in(start, end), want, "{start}..{end}");
            assert_eq!(d.count(start, end) > 0, want, "{start}..{end}");
        }
    }

    #[test]
    fn long_in_lists_match_as_the_value_by_value_rule_does() {
        let ints = |extra: Vec<i64>| Filter::In {
            path: "age".into(),
            values: [vec![20], extra].concat().into_iter().map(Scalar::Int).collect(),
        };
        // 3 values (value by value) and 12 (hash set): the same answer, NULL for a missing age.
        assert_eq!(rows(&ints(vec![1, 2])), vec![Some(false), Some(true), None]);
        assert_eq!(rows(&ints((100..111).collect())), vec![Some(false), Some(true), None]);
        let names: Vec<Scalar> = ["Bob", "Cy"].iter().chain(&["x"; 8]).map(|s| Scalar::Str(s.to_string())).collect();
        assert_eq!(rows(&Filter::In { path: "name".into(), values: names }), vec![Some(false), Some(true), Some(true)]);
        // Mixed kinds fall back to value by value (each value compares in its own type: the
        // text '36' matches the number 36 read as text).
        let mut mixed: Vec<Scalar> = (0..9).map(Scalar::Int).collect();
        mixed.push(Scalar::Str("36".into()));
        assert_eq!(rows(&Filter::In { path: "age".into(), values: mixed }), vec![Some(true), Some(false), None]);
    }

    #[test]
    fn integer_sets_agree_with_a_plain_set_dense_or_sparse() {
        let plain = |values: &[i64], v: i64| values.contains(&v);
        // The widest bitmap: enough values that it is not much sparser than the list.
        let mut widest: Vec<i64> = (0..1 << 15).map(|i| 10 + i * 2047).collect();
        widest.extend([10, 12, 10 + BITMAP_SPAN as i64 - 1]);
        for (values, bitmap) in [
            (vec![-5, 0, 3, 63, 64, 65, 1000], true), // negative and word edges
            (vec![i64::MIN, -1, 7, i64::MAX], false), // span too wide: sorted
            (widest, true),                           // duplicates too
            (vec![0, BITMAP_SPAN as i64], false),     // just too wide
            (vec![0, 1 << 20], false),                // too sparse
        ] {
            let set = IntSet::new(values.clone());
            assert_eq!(set.bitmap.is_some(), bitmap, "{:?}", &values[..2]);
            for v in [i64::MIN, -6, -5, -1, 0, 1, 3, 62, 63, 64, 65, 66, 999, 1000, 1001, 10, 11, 12, i64::MAX]
                .into_iter()
                .chain(values.iter().copied())
                .chain([10 + BITMAP_SPAN as i64 - 1, BITMAP_SPAN as i64, BITMAP_SPAN as i64 + 1])
            {
                assert_eq!(set.contains(v), plain(&values, v), "{v} in {values:?}");
            }
        }
    }

    #[test]
    fn in_lists_skip_blocks_outside_every_value() {
        let b = block();
        let ages =
            |values: Vec<i64>| Filter::In { path: "age".into(), values: values.into_iter().map(Scalar::Int).collect() };
        // The block's ages are 36 and 20 (and a null).
        // A fresh `InSets` per check: they are keyed by the list's address, which the
        // temporaries here reuse.
        let excluded = |f: &Filter| excluded(f, &b, &InSets::default());
        assert!(excluded(&ages(vec![1, 2, 50, 60])));
        assert!(!excluded(&ages(vec![1, 25])), "25 is within the block's range");
        assert!(!excluded(&Filter::In { path: "age".into(), values: vec![Scalar::Str("x".into())] }));
        assert!(excluded(&Filter::In { path: "nope".into(), values: vec![Scalar::Int(1)] }));
        // Long lists are prepared (sorted keys searched for the block's range), with the same
        // answers: the range's ends count, statistics of another type never exclude.
        let long = |extra: i64| ages((0..10).chain(40..50).chain([extra]).collect());
        assert!(excluded(&long(0)));
        assert!(!excluded(&long(20)) && !excluded(&long(36)) && !excluded(&long(21)));
        let texts = |extra: &str| Filter::In {
            path: "name".into(),
            values: ["A", "Ab", "D", "Zed", "a", "b", "c", "d", extra]
                .iter()
                .map(|s| Scalar::Str(s.to_string()))
                .collect(),
        };
        // The block's names are "Ada Lovelace", "Bob" and "Cy".
        assert!(excluded(&texts("x")));
        assert!(!excluded(&texts("Bob")) && !excluded(&texts("Bz")));
        let floats = Filter::In { path: "age".into(), values: (0..10).map(|i| Scalar::Float(f64::from(i))).collect() };
        assert!(!excluded(&floats), "floats are not comparable with integer statistics");
    }

    #[test]
    fn evaluates_with_three_valued_logic() {
        let gt = Filter::Cmp { path: "age".into(), op: CmpOp::Gt, value: Scalar::Int(30) };
        assert_eq!(rows(&gt), vec![Some(true), Some(false), None]);
        assert_eq!(rows(&Filter::Not(Box::new(gt.clone()))), vec![Some(false), Some(true), None]);
        let or = Filter::Or(vec![gt.clone(), Filter::IsNull("age".into())]);
        assert_eq!(rows(&or), vec![Some(true), Some(false), Some(true)]);
        let search = Filter::Search { path: "name".into(), query: "LOVELACE ada".into() };
        assert_eq!(rows(&search), vec![Some(true), Some(false), Some(false)]);
        let missing = Filter::Cmp { path: "nope".into(), op: CmpOp::Eq, value: Scalar::Int(1) };
        assert_eq!(rows(&missing), vec![None, None, None]);
    }

    #[test]
    fn prunes_blocks_by_min_max() {
        let b = block();
        let cmp = |op, v| Filter::Cmp { path: "age".into(), op, value: Scalar::Int(v) };
        let sets = InSets::default();
        let block_excluded = |f: &[Filter]| block_excluded(f, &b, &sets);
        assert!(block_excluded(&[cmp(CmpOp::Gt, 36)]));
        assert!(!block_excluded(&[cmp(CmpOp::GtEq, 36)]));
        assert!(block_excluded(&[cmp(CmpOp::Lt, 20)]));
        assert!(block_excluded(&[cmp(CmpOp::Eq, 50)]));
        assert!(!block_excluded(&[cmp(CmpOp::Eq, 25)]));
        assert!(block_excluded(&[Filter::Cmp { path: "zz".into(), op: CmpOp::Eq, value: Scalar::Int(1) }]));
        assert!(!block_excluded(&[Filter::IsNull("zz".into())]));
    }

    /// A scan's `IN` lists are prepared once and answer every block as value-by-value
    /// evaluation does (ints, dates in text, strings; nulls stay unknown).
    #[test]
    fn in_lists_are_prepared_once_per_scan() {
        let blocks: Vec<Block> = (0..3)
            .map(|k| {
                let docs: Vec<Arc<Doc>> = (0..50)
                    .map(|i| {
                        let n = k * 50 + i;
                        let v = if n % 7 == 0 {
                            json!({"_id": n.to_string(), "name": format!("n{n}")})
                        } else {
                            json!({"_id": n.to_string(), "age": n, "name": format!("n{n}"), "d": format!("2024-01-{:02}", n % 28 + 1)})
                        };
                        Arc::new(v.as_object().unwrap().clone())
                    })
                    .collect();
                Block::build(k as u64 * 50, &docs).unwrap()
            })
            .collect();
        let ints = Filter::In { path: "age".into(), values: (0..150).step_by(3).map(Scalar::Int).collect() };
        let strs = Filter::In {
            path: "name".into(),
            values: (0..150).step_by(5).map(|i| Scalar::Str(format!("n{i}"))).collect(),
        };
        let dates = Filter::In {
            path: "d".into(),
            values: (1..=28).step_by(2).map(|d| Scalar::Date(19723 + d - 1)).collect(), // 2024-01-01 is day 19723
        };
        let filters = [&ints, &strs, &dates];
        let sets = InSets::default();
        for block in &blocks {
            for f in filters {
                let prepared: Vec<Option<bool>> = eval_with(f, block, &sets).unwrap().iter().collect();
                let Filter::In { path, values } = f else { unreachable!() };
                let one_by_one = Filter::Or(
                    values
                        .iter()
                        .map(|v| Filter::Cmp { path: path.clone(), op: CmpOp::Eq, value: v.clone() })
                        .collect(),
                );
                let want: Vec<Option<bool>> = eval(&one_by_one, block).unwrap().iter().collect();
                assert_eq!(prepared, want, "{f:?}");
                assert!(prepared.contains(&Some(true)) && prepared.contains(&Some(false)), "{f:?}");
            }
        }
        assert_eq!(sets.prepared.borrow().len(), 3, "one preparation per list, not per block");
    }
}
