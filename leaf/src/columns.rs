//! The column store of a shard: immutable Arrow blocks of up to [`BLOCK_ROWS`] rows with min/max
//! per column, a mutable tail of recent documents, and a deletion bitmap over row slots.
//!
//! A row slot is the position of one document version; an upsert deletes the old slot and
//! appends a new one. A patch keeps the slot and records an overlay: the new values of the
//! top-level fields it touched. Scans apply overlays to the columns they read (see
//! [`Block::overlaid`]), so a patch costs the size of the fields it changed, not of the
//! document. Blocks keep the column types their own documents need; scans cast to the
//! collection-wide type.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray, StringBuilder, new_null_array};
use arrow::array::{RecordBatch, RecordBatchOptions};
use arrow::compute::{CastOptions, can_cast_types, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::writer::FileWriter;
use basalt_common::Result;
pub use basalt_common::arrays::{build_array, build_arrays, build_from_values};
use basalt_common::doc::Doc;
use basalt_common::doc::Kind;
use basalt_common::filter::Scalar;
use basalt_common::schema::SchemaStats;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const BLOCK_ROWS: usize = 8192;

/// A text column as codes into its distinct values (in order of first appearance). Codes of
/// null rows are 0 and mean nothing; the column's null buffer says which rows are null.
#[derive(Debug)]
pub struct TextDictionary {
    pub values: StringArray,
    pub codes: Vec<u16>,
    pub nulls: Option<arrow::buffer::NullBuffer>,
}

impl TextDictionary {
    /// The most distinct values a block's dictionary holds.
    pub const MAX_VALUES: usize = 4096;

    /// Codes for `column`, or `None` when it has more than `max` distinct values.
    fn build(column: &StringArray, max: usize) -> Option<TextDictionary> {
        let mut index: HashMap<&str, u16> = HashMap::new();
        let mut values = StringBuilder::new();
        let mut codes = Vec::with_capacity(column.len());
        for i in 0..column.len() {
            if column.is_null(i) {
                codes.push(0);
                continue;
            }
            let v = column.value(i);
            let code = match index.get(v) {
                Some(c) => *c,
                None => {
                    if index.len() >= max {
                        return None;
                    }
                    let c = u16::try_from(index.len()).ok()?;
                    index.insert(v, c);
                    values.append_value(v);
                    c
                }
            };
            codes.push(code);
        }
        let dictionary = TextDictionary { values: values.finish(), codes, nulls: column.nulls().cloned() };
        filter_cache_changed(dictionary.bytes() as i64);
        Some(dictionary)
    }

    /// The bytes the dictionary takes.
    pub fn bytes(&self) -> usize {
        self.values.get_buffer_memory_size()
            + self.codes.len() * 2
            + self.nulls.as_ref().map_or(0, |n| n.buffer().len())
    }

    /// One result per row from one result per distinct value (`None`: unknown): a row takes
    /// its value's result, and a null row stays null.
    pub fn per_row(&self, per_value: &arrow::array::BooleanArray) -> arrow::array::BooleanArray {
        // Codes index `values`, which `per_value` has one entry for; a shorter `per_value` (a
        // caller's mistake) reads as false rather than out of bounds.
        let truth: Vec<bool> = (0..self.values.len()).map(|i| i < per_value.len() && per_value.value(i)).collect();
        let codes = &self.codes;
        let values = arrow::buffer::BooleanBuffer::collect_bool(codes.len(), |i| truth[usize::from(codes[i])]);
        let nulls = if per_value.null_count() > 0 {
            let known: Vec<bool> =
                (0..self.values.len()).map(|i| i < per_value.len() && per_value.is_valid(i)).collect();
            let valid = arrow::buffer::BooleanBuffer::collect_bool(codes.len(), |i| known[usize::from(codes[i])]);
            let valid = arrow::buffer::NullBuffer::new(valid);
            arrow::buffer::NullBuffer::union(Some(&valid), self.nulls.as_ref())
        } else {
            self.nulls.clone()
        };
        arrow::array::BooleanArray::new(values, nulls)
    }
}

impl Drop for TextDictionary {
    fn drop(&mut self) {
        filter_cache_changed(-(self.bytes() as i64));
    }
}

/// An integer, timestamp or date column of one block as unsigned offsets from its smallest
/// value, in the fewest bytes that hold its range (SSB's `lo_discount` in one byte, a year of
/// `lo_orderdate` keys in two). Filters compare these instead of the stored 8-byte values: a
/// comparison reads an eighth of the memory and tests 32 rows per AVX2 instruction instead of
/// four. Offsets of null rows mean nothing (the column's null buffer says which rows are null).
#[derive(Debug)]
pub struct Offsets {
    /// The column's smallest non-null value; a row's value is `base + offset`.
    pub base: i64,
    pub values: OffsetValues,
}

/// Bytes the blocks of this process keep derived from their columns for filters: narrow
/// offsets ([`Block::offsets`]), text dictionaries ([`Block::text_dictionary`]) and text parsed
/// as dates ([`Block::column_as_date`]).
static FILTER_CACHE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The most bytes of those the process keeps (`--filter-cache-max-bytes`, see
/// [`set_filter_cache_max_bytes`]). A block that would build one past it first makes room
/// ([`make_room`]: blocks not read lately drop what they keep, down to seven eighths of the
/// budget); when nothing can go (every piece read by the running scan, or held by one), it
/// builds its pieces for the scan asking and drops them after (text parsed as dates, the
/// same).
static FILTER_CACHE_MAX_BYTES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_FILTER_CACHE_MAX_BYTES);

/// The smallest default budget: 1 GiB.
pub const DEFAULT_FILTER_CACHE_MAX_BYTES: u64 = 1 << 30;

/// The default budget: an eighth of the memory the process may use (the machine's, or its
/// cgroup's limit when lower, as in a Kubernetes pod), at least
/// [`DEFAULT_FILTER_CACHE_MAX_BYTES`]. TPC-H at SF 10 (87M rows) keeps 2.06 GB with every query
/// run once; a budget that runs out mid-suite parses the same dates again on every query
/// (q12 4.6 s instead of 0.3 s).
pub fn default_filter_cache_max_bytes() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|text| text.trim().parse::<u64>().ok());
    let usable = match (machine, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (m, c) => m.or(c).unwrap_or(0),
    };
    (usable / 8).max(DEFAULT_FILTER_CACHE_MAX_BYTES)
}

/// Set the process's budget for what blocks keep for filters (the leaf's
/// `--filter-cache-max-bytes`).
pub fn set_filter_cache_max_bytes(bytes: u64) {
    FILTER_CACHE_MAX_BYTES.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

static FILTER_CACHE_GAUGE: std::sync::LazyLock<Option<prometheus::IntGauge>> = std::sync::LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "basalt_leaf_filter_cache_bytes",
        "Bytes blocks keep for filters: narrow offsets, text dictionaries, text parsed as dates \
         (limit: --filter-cache-max-bytes)"
    )
    .ok()
});

fn filter_cache_changed(delta: i64) {
    let now = if delta >= 0 {
        FILTER_CACHE_BYTES.fetch_add(delta as u64, std::sync::atomic::Ordering::Relaxed) + delta as u64
    } else {
        FILTER_CACHE_BYTES
            .fetch_sub(delta.unsigned_abs(), std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(delta.unsigned_abs())
    };
    if let Some(g) = FILTER_CACHE_GAUGE.as_ref() {
        g.set(i64::try_from(now).unwrap_or(i64::MAX));
    }
}

static FILTER_CACHE_EVICTIONS: std::sync::LazyLock<Option<prometheus::IntCounter>> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "basalt_leaf_filter_cache_evictions_total",
        "Blocks that dropped what they kept for filters to make room within --filter-cache-max-bytes"
    )
    .ok()
});

/// The blocks keeping something for filters, for [`make_room`]: a clock over them (the hand
/// passes a block read since its last pass, clearing its mark, and empties one that was not).
struct Clock {
    blocks: Vec<std::sync::Weak<BlockCache>>,
    hand: usize,
}

static CLOCK: std::sync::LazyLock<parking_lot::Mutex<Clock>> =
    std::sync::LazyLock::new(|| parking_lot::Mutex::new(Clock { blocks: Vec::new(), hand: 0 }));

/// Scans begun in this process: a scan's number (see [`ScanEpoch`]) is the count when it began,
/// and a block read records the count when read.
static SCANS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// The scan this thread works for now (0: none), for [`make_room`].
    static CURRENT_SCAN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A scan's place in time for the filter cache: room for what its blocks build is made only
/// from blocks not read since it began. Without this, a scan whose blocks need more than the
/// budget evicted its own earlier blocks' pieces (the clock turns into first-in first-out), so
/// every run rebuilt everything: SSB flat q2.2 at SF 10 with 256 MB (the query needs 430 MB)
/// took 1.71 s, against 0.13 s with room. Now the blocks past the budget build theirs for the
/// scan only and the ones before keep theirs for the next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanEpoch(u64);

impl ScanEpoch {
    pub fn begin() -> Self {
        Self(SCANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
    }

    /// Run `f` as part of this scan: what blocks build in it makes room only from blocks not
    /// read since the scan began.
    pub fn enter<R>(self, f: impl FnOnce() -> R) -> R {
        /// Puts back the scan the thread worked for before, also when `f` unwinds.
        struct Restore(u64);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT_SCAN.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT_SCAN.with(|c| c.replace(self.0)));
        f()
    }
}

/// Put `cache` on the clock (once: until the clock empties it).
fn on_clock(cache: &Arc<BlockCache>) {
    if cache.registered.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let mut clock = CLOCK.lock();
    // Blocks dropped since (merged away, or made for one scan) leave dead entries: cleared
    // now and then, so the clock holds about as many entries as blocks keep something.
    if clock.blocks.len() >= 1024 && clock.blocks.len().is_power_of_two() {
        clock.blocks.retain(|b| b.strong_count() > 0);
        clock.hand = 0;
    }
    clock.blocks.push(Arc::downgrade(cache));
}

/// Make room within the filter budget: the clock's hand goes round the blocks keeping
/// something; a block read since the hand last passed it keeps it (its mark is cleared), one
/// that was not drops everything it keeps (the pieces a running scan still holds go when it
/// ends), until the process keeps seven eighths of the budget or less. Blocks read since the
/// current scan began (see [`ScanEpoch`]) are passed over. At most two turns; returns whether
/// the process is then within its budget. Another thread making room already: returns false
/// at once (the caller keeps nothing this time).
fn make_room() -> bool {
    use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
    let scan = CURRENT_SCAN.with(|c| c.get());
    // A walk for this scan or a later one found every block read since: so would this one
    // (blocks read later, or put on the clock later, are read since this scan began too).
    if scan != 0 && scan <= NO_ROOM_UP_TO.load(Relaxed) {
        return false;
    }
    let Some(mut clock) = CLOCK.try_lock() else { return false };
    let max = FILTER_CACHE_MAX_BYTES.load(Relaxed);
    let target = max - max / 8;
    let mut steps = clock.blocks.len().saturating_mul(2);
    while FILTER_CACHE_BYTES.load(Relaxed) > target && steps > 0 && !clock.blocks.is_empty() {
        steps -= 1;
        if clock.hand >= clock.blocks.len() {
            clock.hand = 0;
        }
        let at = clock.hand;
        clock.hand += 1;
        let Some(cache) = clock.blocks[at].upgrade() else { continue };
        if scan != 0 && cache.read_at.load(Relaxed) >= scan {
            continue;
        }
        if cache.used.swap(false, AcqRel) {
            continue;
        }
        let dropped = {
            // Everything built goes; the notes that a column has no dictionary or offsets stay
            // (they take no budget, and finding out again would cost a pass over the column).
            let mut derived = cache.derived.lock();
            let old = std::mem::take(&mut *derived);
            derived.dictionaries =
                old.dictionaries.iter().filter(|(_, d)| d.is_none()).map(|(k, _)| (k.clone(), None)).collect();
            for (kept, was) in derived.offsets.iter_mut().zip(&old.offsets) {
                *kept = was.iter().filter(|(_, o)| o.is_none()).map(|(k, _)| (k.clone(), None)).collect();
            }
            // Off the clock while its lock is held: a piece kept after this puts the block back
            // on (`on_clock` after the insert), one kept before went with the rest.
            cache.registered.store(false, Release);
            old
        };
        // Left in place (dropped below with the dead entries): moving the last entry here, as
        // `swap_remove` would, puts the newest block under the hand next.
        clock.blocks[at] = std::sync::Weak::new();
        drop(dropped);
        if let Some(c) = FILTER_CACHE_EVICTIONS.as_ref() {
            c.inc();
        }
    }
    // Drop the entries of blocks emptied or gone, keeping the order and the hand's place.
    let hand = clock.hand.min(clock.blocks.len());
    let before_hand = clock.blocks[..hand].iter().filter(|b| b.strong_count() > 0).count();
    clock.blocks.retain(|b| b.strong_count() > 0);
    clock.hand = before_hand;
    // Two turns leave only blocks read since this scan began: it makes no room (it would
    // otherwise walk the whole clock for each block it reads; SSB star at SF 10 with a 160 MB
    // budget: 3,700 blocks a leaf, each walking a clock of about as many).
    let full = filter_cache_full();
    if full && scan != 0 {
        NO_ROOM_UP_TO.fetch_max(scan, Relaxed);
    }
    !full
}

/// The latest scan (see [`ScanEpoch`]) for which [`make_room`] found only blocks read since it
/// began.
static NO_ROOM_UP_TO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether the process keeps more for filters than its budget allows.
fn filter_cache_full() -> bool {
    FILTER_CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
        > FILTER_CACHE_MAX_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `bytes` more stay within the budget.
fn filter_cache_fits(bytes: usize) -> bool {
    FILTER_CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed).saturating_add(bytes as u64)
        <= FILTER_CACHE_MAX_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Bytes kept for filters by the blocks of this process now (the gauge
/// `basalt_leaf_filter_cache_bytes`).
pub fn filter_cache_bytes() -> u64 {
    FILTER_CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// What a block keeps derived from its columns for filters, counted against the budget: in
/// one place so that [`make_room`] can drop all of it.
#[derive(Debug, Default)]
struct Derived {
    /// Text columns parsed as dates, kept after the first query that compares them with a date
    /// (`CAST(col AS DATE) < DATE '...'`): blocks never change, so neither does the parse.
    dates: HashMap<String, ParsedDates>,
    /// Text columns that do not parse as dates (a text comparison asked: see
    /// [`Block::text_as_ordered_dates`]).
    undated: std::collections::HashSet<String>,
    /// Text columns with few distinct values as codes into their distinct values (see
    /// [`Block::text_dictionary`]); `None` for a column with too many.
    dictionaries: HashMap<String, Option<Arc<TextDictionary>>>,
    /// Integer, timestamp and date columns as narrow offsets (see [`Block::offsets`]).
    /// Per path: of the stored column, and of its text read as dates.
    offsets: [HashMap<String, Option<Arc<Offsets>>>; 2],
}

#[derive(Debug, Default)]
struct BlockCache {
    derived: parking_lot::Mutex<Derived>,
    /// Read since the clock's hand last passed (see [`make_room`]).
    used: std::sync::atomic::AtomicBool,
    /// On the clock.
    registered: std::sync::atomic::AtomicBool,
    /// [`SCANS`] when last read: a scan begun before then does not evict the block.
    read_at: std::sync::atomic::AtomicU64,
}

impl BlockCache {
    /// Mark the block as read (the clock keeps what it holds one more turn).
    fn touch(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.used.load(Relaxed) {
            self.used.store(true, Relaxed);
        }
        let now = SCANS.load(Relaxed);
        if self.read_at.load(Relaxed) != now {
            self.read_at.store(now, Relaxed);
        }
    }
}

/// Text parsed as dates that a block keeps, counted against the filter budget while kept.
#[derive(Debug)]
struct ParsedDates(ArrayRef, Canonical);

/// Whether every value of a text column is a date written `YYYY-MM-DD` (ten characters,
/// digits and two dashes): such text orders as its dates do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Canonical {
    Yes,
    No,
}

impl Canonical {
    fn of(text: &ArrayRef) -> Self {
        let Some(text) = text.as_string_opt::<i32>() else { return Self::No };
        let plain = |v: &str| {
            v.len() == 10
                && v.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() })
        };
        if text.iter().flatten().all(plain) { Self::Yes } else { Self::No }
    }
}

impl ParsedDates {
    fn new(dates: ArrayRef, canonical: Canonical) -> Self {
        filter_cache_changed(dates.get_buffer_memory_size() as i64);
        Self(dates, canonical)
    }
}

impl Drop for ParsedDates {
    fn drop(&mut self) {
        filter_cache_changed(-(self.0.get_buffer_memory_size() as i64));
    }
}

impl Drop for Offsets {
    fn drop(&mut self) {
        filter_cache_changed(-(self.bytes() as i64));
    }
}

#[derive(Debug)]
pub enum OffsetValues {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Offsets {
    /// Offsets for `values` (nulls ignored for the range), or None when the range needs as many
    /// bytes as the values take already or the column has no non-null value.
    fn build(column: &dyn Array, known: Option<&MinMax>) -> Option<Offsets> {
        use arrow::compute::{max, min};
        use arrow::datatypes::{Date32Type, Int64Type, TimestampMicrosecondType};
        use std::borrow::Cow;
        // The range of the non-null values: the block's own minimum and maximum when it has them
        // (kept with the block), else arrow's kernels. A loop asking `is_valid` of each row
        // through `dyn Array` was a third of SSB star q2.2's CPU when its blocks built their
        // offsets on every run (a budget smaller than the query's pieces), the kernels' two
        // passes (64-bit compares emulated on SSE2) a fifth.
        let known = match known {
            Some(MinMax { min: Scalar::Int(lo), max: Scalar::Int(hi) })
            | Some(MinMax { min: Scalar::Timestamp(lo), max: Scalar::Timestamp(hi) }) => Some((*lo, *hi)),
            _ => None,
        };
        let (values, width, range): (Cow<[i64]>, usize, _) = match column.data_type() {
            DataType::Int64 => {
                let a = column.as_primitive_opt::<Int64Type>()?;
                (Cow::Borrowed(a.values().as_ref()), 8, known.or_else(|| min(a).zip(max(a))))
            }
            DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, _) => {
                let a = column.as_primitive_opt::<TimestampMicrosecondType>()?;
                (Cow::Borrowed(a.values().as_ref()), 8, known.or_else(|| min(a).zip(max(a))))
            }
            DataType::Date32 => {
                let a = column.as_primitive_opt::<Date32Type>()?;
                let range = min(a).zip(max(a)).map(|(lo, hi)| (i64::from(lo), i64::from(hi)));
                (Cow::Owned(a.values().iter().map(|d| i64::from(*d)).collect()), 4, range)
            }
            _ => return None,
        };
        let (base, max) = range?;
        let span = i128::from(max) - i128::from(base);
        // Wrapping: a null row's stored value may lie outside the range; its offset is unused.
        let offset = |v: &i64| v.wrapping_sub(base) as u64;
        let values = if span <= i128::from(u8::MAX) {
            OffsetValues::U8(values.iter().map(|v| offset(v) as u8).collect())
        } else if span <= i128::from(u16::MAX) {
            OffsetValues::U16(values.iter().map(|v| offset(v) as u16).collect())
        } else if span <= i128::from(u32::MAX) && width > 4 {
            OffsetValues::U32(values.iter().map(|v| offset(v) as u32).collect())
        } else {
            return None;
        };
        let offsets = Offsets { base, values };
        filter_cache_changed(offsets.bytes() as i64);
        Some(offsets)
    }

    /// The bytes the offsets take.
    pub fn bytes(&self) -> usize {
        match &self.values {
            OffsetValues::U8(v) => v.len(),
            OffsetValues::U16(v) => v.len() * 2,
            OffsetValues::U32(v) => v.len() * 4,
        }
    }

    pub fn len(&self) -> usize {
        match &self.values {
            OffsetValues::U8(v) => v.len(),
            OffsetValues::U16(v) => v.len(),
            OffsetValues::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Minimum and maximum of one column in one block (non-null values only).
#[derive(Debug, Clone, PartialEq)]
pub struct MinMax {
    pub min: Scalar,
    pub max: Scalar,
}

#[derive(Debug)]
pub struct Block {
    pub base_slot: u64,
    pub rows: usize,
    pub columns: HashMap<String, ArrayRef>,
    pub min_max: HashMap<String, MinMax>,
    /// What filters derived from the columns and the block keeps (within the process's
    /// budget; see [`make_room`]).
    cache: Arc<BlockCache>,
    /// Per column checked, whether it is never null and never decreases down the block.
    ascending: parking_lot::Mutex<HashMap<String, bool>>,
    /// Whether the columns point into a mapped segment file rather than the heap.
    mapped: bool,
    /// A block made for one scan (some rows of a stored block, its patched view, the tail):
    /// it builds no offsets, which would cost more than the one pass they would serve.
    transient: bool,
}

impl Block {
    pub fn new(
        base_slot: u64,
        rows: usize,
        columns: HashMap<String, ArrayRef>,
        min_max: HashMap<String, MinMax>,
    ) -> Block {
        Block {
            base_slot,
            rows,
            columns,
            min_max,
            cache: Default::default(),
            ascending: Default::default(),
            mapped: false,
            transient: false,
        }
    }

    /// After keeping something: the block is on the clock, marked as read.
    fn keep(&self) {
        self.cache.touch();
        on_clock(&self.cache);
    }

    /// This block marked as made for one scan (see [`Block::offsets`]).
    pub fn transient(mut self) -> Block {
        self.transient = true;
        self
    }

    /// Whether the block was made for one scan (nothing derived from it is kept).
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The text column at `path` as codes into its distinct values, built the first time a
    /// filter compares it with text and kept (blocks never change). `None` when the block holds
    /// no text column at `path` or it has more than [`TextDictionary::MAX_VALUES`] distinct
    /// values (or more than half as many as rows, where a lookup per value saves little).
    ///
    /// A comparison or `IN` list then costs one test per distinct value and a table lookup
    /// per row instead of a string comparison per row and value (TPC-H q12's `l_shipmode IN
    /// ('MAIL', 'SHIP')` over 6M rows was half of the query's CPU).
    pub fn text_dictionary(&self, path: &str) -> Option<Arc<TextDictionary>> {
        if let Some(d) = self.cache.derived.lock().dictionaries.get(path) {
            self.cache.touch();
            return d.clone();
        }
        let built = self
            .columns
            .get(path)
            .and_then(|a| a.as_string_opt::<i32>())
            .and_then(|a| TextDictionary::build(a, (self.rows / 2).min(TextDictionary::MAX_VALUES)))
            .map(Arc::new);
        // Over the process's budget with no room to make: for this scan only (see `offsets`).
        if built.is_some() && filter_cache_full() && !make_room() {
            return built;
        }
        self.cache.derived.lock().dictionaries.insert(path.to_string(), built.clone());
        self.keep();
        built
    }

    /// The integer or timestamp column stored at `path` (with `as_date`: its text parsed as
    /// dates, see [`Block::column_as_date`]) as offsets from its smallest value, built the first
    /// time a filter compares it and kept (blocks never change). `None` when the block holds no
    /// such column, its range needs as many bytes as its values, or the block is transient.
    pub fn offsets(&self, path: &str, as_date: bool) -> Option<Arc<Offsets>> {
        if self.transient {
            return None;
        }
        if let Some(o) = self.cache.derived.lock().offsets[usize::from(as_date)].get(path) {
            self.cache.touch();
            return o.clone();
        }
        let column = if as_date { self.column_as_date(path).ok() } else { self.columns.get(path).cloned() };
        let known = if as_date { None } else { self.min_max.get(path) };
        let built = column.and_then(|c| Offsets::build(c.as_ref(), known)).map(Arc::new);
        // Over the process's budget with no room to make: used by this scan and dropped (not
        // remembered either, so a later scan keeps them once there is room). Building them takes
        // one pass (the range is the block's kept minimum and maximum) and beats comparing
        // stored values: SSB star at SF 10 on two leaves with a 160 MB budget per leaf (most
        // queries need more) ran at 1.02x DuckDB evicting each run's earlier blocks for its later
        // ones, 0.63x keeping those and building these for the scan (0.48x with room).
        if built.is_some() && filter_cache_full() && !make_room() {
            return built;
        }
        self.cache.derived.lock().offsets[usize::from(as_date)].insert(path.to_string(), built.clone());
        self.keep();
        built
    }

    /// Whether the column at `path` is present, never null and never decreases down the
    /// block: checked the first time a scan or the planner asks, and kept (blocks never change).
    pub fn ascending(&self, path: &str) -> bool {
        if let Some(holds) = self.ascending.lock().get(path) {
            return *holds;
        }
        let holds = self.columns.get(path).is_some_and(is_ascending);
        self.ascending.lock().insert(path.to_string(), holds);
        holds
    }

    /// Whether the columns point into a mapped segment file rather than the heap.
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// The column at `path` as SQL `CAST(CAST(col AS TEXT) AS DATE)` computes it (Date32; a
    /// non-null value that is not a date is an error, as in SQL), parsed once per block.
    pub fn column_as_date(&self, path: &str) -> Result<ArrayRef> {
        self.parsed_dates(path).map(|(dates, _)| dates)
    }

    /// The text column at `path` as dates when every value is written `YYYY-MM-DD`, so that
    /// comparing the dates compares the text (TPC-H q12's `l_commitdate < l_receiptdate`);
    /// None otherwise (text that is not such dates, remembered).
    pub fn text_as_ordered_dates(&self, path: &str) -> Option<ArrayRef> {
        if self.cache.derived.lock().undated.contains(path) {
            return None;
        }
        match self.parsed_dates(path) {
            Ok((dates, Canonical::Yes)) => Some(dates),
            Ok((_, Canonical::No)) => None,
            Err(_) => {
                self.cache.derived.lock().undated.insert(path.to_string());
                None
            }
        }
    }

    fn parsed_dates(&self, path: &str) -> Result<(ArrayRef, Canonical)> {
        if let Some(a) = self.cache.derived.lock().dates.get(path) {
            self.cache.touch();
            return Ok((a.0.clone(), a.1));
        }
        let text = self.column_as(path, &DataType::Utf8)?;
        let options = CastOptions { safe: false, ..Default::default() };
        let dates = cast_with_options(&text, &DataType::Date32, &options)
            .map_err(|e| basalt_common::BasaltError::invalid(format!("{path}: {e}")))?;
        let canonical = Canonical::of(&text);
        // Kept within the process's budget (over it with no room to make, parsed again by the
        // next comparison).
        let bytes = dates.get_buffer_memory_size();
        if filter_cache_fits(bytes) || (make_room() && filter_cache_fits(bytes)) {
            self.cache.derived.lock().dates.insert(path.to_string(), ParsedDates::new(dates.clone(), canonical));
            self.keep();
        }
        Ok((dates, canonical))
    }

    /// Build a block from documents (slot `base_slot + i` for document `i`).
    pub fn build(base_slot: u64, docs: &[Arc<Doc>]) -> Result<Block> {
        let mut stats = SchemaStats::default();
        let mut runs = basalt_common::doc::KindRuns::default();
        for doc in docs {
            runs.add(doc, 1, &mut |p, k, n| stats.add(p, k, n));
        }
        runs.finish(&mut |p, k, n| stats.add(p, k, n));
        let mut columns = HashMap::new();
        let mut min_max = HashMap::new();
        let paths = stats.columns();
        let arrays = build_arrays(&paths, docs);
        for ((path, _), array) in paths.into_iter().zip(arrays) {
            if let Some(mm) = compute_min_max(&array) {
                min_max.insert(path.clone(), mm);
            }
            columns.insert(path, array);
        }
        Ok(Block::new(base_slot, docs.len(), columns, min_max))
    }

    /// The column at `path` as `ty` (cast when the block holds another type; nulls when absent).
    pub fn column_as(&self, path: &str, ty: &DataType) -> Result<ArrayRef> {
        match self.columns.get(path) {
            None => Ok(new_null_array(ty, self.rows)),
            Some(a) => cast_to(a, ty),
        }
    }

    /// A block of only the given rows (in that order) and only the named columns; statistics
    /// are not kept.
    pub fn take(&self, rows: &[u32], paths: &[&str]) -> Result<Block> {
        let indices = arrow::array::UInt32Array::from(rows.to_vec());
        let columns = paths
            .iter()
            .filter_map(|p| self.columns.get_key_value(*p))
            .map(|(path, array)| Ok((path.clone(), arrow::compute::take(array.as_ref(), &indices, None)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Block::new(self.base_slot, rows.len(), columns, HashMap::new()).transient())
    }
}

const BASE_SLOT_KEY: &str = "basalt.base_slot";
/// Schema metadata key of a block file's min/max per column (JSON), so opening the file does
/// not read every value to compute them. Left out when a bound is a string over
/// [`MAX_STORED_BOUND`] bytes or does not serialize (the reader then computes them).
const MIN_MAX_KEY: &str = "basalt.min_max";
const MAX_STORED_BOUND: usize = 1024;

/// Whether `array` has no nulls and each value is at least the one before it (false for a
/// type Arrow cannot compare).
fn is_ascending(array: &ArrayRef) -> bool {
    if array.null_count() > 0 {
        return false;
    }
    if array.len() < 2 {
        return true;
    }
    let (later, earlier) = (array.slice(1, array.len() - 1), array.slice(0, array.len() - 1));
    arrow::compute::kernels::cmp::lt(&later, &earlier).is_ok_and(|drops| drops.true_count() == 0)
}

/// Whether the rows of `blocks`, in order (the order a scan returns them in), hold `path`
/// ascending and never null, stored as `ty` in every block (a block holding another type would
/// be cast, which may reorder) and patched in none.
pub fn ascending_across(blocks: &[Arc<Block>], overlays: &Overlays, path: &str, ty: &DataType) -> bool {
    let mut last: Option<ArrayRef> = None;
    for block in blocks.iter().filter(|b| b.rows > 0) {
        let Some(column) = block.columns.get(path) else { return false };
        if column.data_type() != ty || column.is_empty() || !block.ascending(path) {
            return false;
        }
        if overlays.range(block.base_slot, block.base_slot + block.rows as u64).next().is_some() {
            return false;
        }
        let first = column.slice(0, 1);
        if let Some(before) = &last
            && !arrow::compute::kernels::cmp::lt(&first, before).is_ok_and(|drops| drops.true_count() == 0)
        {
            return false;
        }
        last = Some(column.slice(column.len() - 1, 1));
    }
    true
}

/// A block's min/max as stored in its file.
fn encode_min_max(min_max: &HashMap<String, MinMax>) -> Option<String> {
    let long = |s: &Scalar| matches!(s, Scalar::Str(t) if t.len() > MAX_STORED_BOUND);
    if min_max.values().any(|mm| long(&mm.min) || long(&mm.max)) {
        return None;
    }
    let entries: BTreeMap<&String, (&Scalar, &Scalar)> =
        min_max.iter().map(|(k, mm)| (k, (&mm.min, &mm.max))).collect();
    serde_json::to_string(&entries).ok()
}

fn decode_min_max(text: &str) -> Option<HashMap<String, MinMax>> {
    let entries: HashMap<String, (Scalar, Scalar)> = serde_json::from_str(text).ok()?;
    Some(entries.into_iter().map(|(k, (min, max))| (k, MinMax { min, max })).collect())
}

impl Block {
    /// The block as an Arrow IPC file (columns sorted by path, base slot in the metadata).
    pub fn to_ipc(&self) -> Result<Vec<u8>> {
        let mut names: Vec<&String> = self.columns.keys().collect();
        names.sort();
        let fields: Vec<Field> =
            names.iter().map(|n| Field::new(n.as_str(), self.columns[*n].data_type().clone(), true)).collect();
        let mut metadata = HashMap::from([(BASE_SLOT_KEY.to_string(), self.base_slot.to_string())]);
        if let Some(text) = encode_min_max(&self.min_max) {
            metadata.insert(MIN_MAX_KEY.to_string(), text);
        }
        let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
        let arrays: Vec<ArrayRef> = names.iter().map(|n| self.columns[*n].clone()).collect();
        let options = RecordBatchOptions::new().with_row_count(Some(self.rows));
        let batch = RecordBatch::try_new_with_options(schema.clone(), arrays, &options)?;
        let mut out = Vec::new();
        let mut writer = FileWriter::try_new(&mut out, &schema)?;
        writer.write(&batch)?;
        writer.finish()?;
        drop(writer);
        Ok(out)
    }

    /// Open a block file written by [`Block::to_ipc`] mapped into memory: the columns point
    /// into the file's pages (no copy; Arrow's writer aligns every buffer to 64 bytes), which
    /// the operating system keeps or drops as memory allows, instead of the process's heap
    /// holding every block. Min/max are the file's own (see [`Block::to_ipc`]), or computed
    /// (reading every value once) when the file has none.
    pub fn open_mapped(path: &std::path::Path) -> Result<Block> {
        let bad = |m: String| basalt_common::BasaltError::internal(format!("block file {}: {m}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        // SAFETY: segment files are never modified once written (their names carry the
        // manifest generation); they are only unlinked, which leaves a mapping valid.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(e.to_string()))?;
        if map.len() < 10 {
            return Err(bad("too short".into()));
        }
        let buffer = arrow::buffer::Buffer::from(bytes::Bytes::from_owner(map));
        let trailer = buffer.len() - 10;
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&buffer[trailer..]);
        let footer_len = arrow::ipc::reader::read_footer_length(tail)?;
        let footer_start = trailer.checked_sub(footer_len).ok_or_else(|| bad("footer past the start".into()))?;
        let footer =
            arrow::ipc::root_as_footer(&buffer[footer_start..trailer]).map_err(|e| bad(format!("footer: {e}")))?;
        let schema =
            Arc::new(arrow::ipc::convert::fb_to_schema(footer.schema().ok_or_else(|| bad("no schema".into()))?));
        let base_slot: u64 = schema
            .metadata()
            .get(BASE_SLOT_KEY)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("no base slot".into()))?;
        let decoder = arrow::ipc::reader::FileDecoder::new(schema.clone(), footer.version());
        let batches = footer.recordBatches().ok_or_else(|| bad("no record batches".into()))?;
        if batches.len() != 1 || footer.dictionaries().is_some_and(|d| !d.is_empty()) {
            return Err(bad("expected one record batch and no dictionaries".into()));
        }
        let block = batches.get(0);
        let start = usize::try_from(block.offset()).map_err(|e| bad(e.to_string()))?;
        let len = usize::try_from(block.bodyLength()).map_err(|e| bad(e.to_string()))?
            + usize::try_from(block.metaDataLength()).map_err(|e| bad(e.to_string()))?;
        if start.checked_add(len).is_none_or(|end| end > footer_start) {
            return Err(bad("record batch past the footer".into()));
        }
        let batch = decoder
            .read_record_batch(block, &buffer.slice_with_length(start, len))?
            .ok_or_else(|| bad("empty record batch".into()))?;
        let min_max = schema.metadata().get(MIN_MAX_KEY).and_then(|t| decode_min_max(t));
        let min_max_known = min_max.is_some();
        let mut min_max = min_max.unwrap_or_default();
        let mut columns = HashMap::new();
        for (field, array) in schema.fields().iter().zip(batch.columns()) {
            if !min_max_known && let Some(mm) = compute_min_max(array) {
                min_max.insert(field.name().clone(), mm);
            }
            columns.insert(field.name().clone(), array.clone());
        }
        let mut block = Block::new(base_slot, batch.num_rows(), columns, min_max);
        block.mapped = true;
        Ok(block)
    }

    /// Adjacent blocks concatenated into one, or `None` when a path has different types in
    /// different blocks (such blocks stay apart rather than lose the distinction).
    pub fn concat(parts: &[Arc<Block>]) -> Result<Option<Block>> {
        let Some(first) = parts.first() else { return Ok(None) };
        let mut types: HashMap<&String, &DataType> = HashMap::new();
        for part in parts {
            for (name, array) in &part.columns {
                if *types.entry(name).or_insert(array.data_type()) != array.data_type() {
                    return Ok(None);
                }
            }
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let mut columns = HashMap::new();
        let mut min_max = HashMap::new();
        for (name, ty) in types {
            let pieces: Vec<ArrayRef> = parts
                .iter()
                .map(|p| p.columns.get(name).cloned().unwrap_or_else(|| new_null_array(ty, p.rows)))
                .collect();
            let refs: Vec<&dyn Array> = pieces.iter().map(|a| a.as_ref()).collect();
            let array = arrow::compute::concat(&refs)?;
            if let Some(mm) = compute_min_max(&array) {
                min_max.insert(name.clone(), mm);
            }
            columns.insert(name.clone(), array);
        }
        Ok(Some(Block::new(first.base_slot, rows, columns, min_max)))
    }
}

/// Cast with null-on-failure semantics; lists and other non-castable values become JSON text.
pub fn cast_to(array: &ArrayRef, ty: &DataType) -> Result<ArrayRef> {
    if array.data_type() == ty {
        return Ok(array.clone());
    }
    if *ty == DataType::Utf8 && matches!(array.data_type(), DataType::List(_)) {
        return Ok(list_to_json_text(array));
    }
    if can_cast_types(array.data_type(), ty) {
        let options = CastOptions { safe: true, ..Default::default() };
        return Ok(cast_with_options(array, ty, &options)?);
    }
    Ok(new_null_array(ty, array.len()))
}

fn list_to_json_text(array: &ArrayRef) -> ArrayRef {
    use arrow::array::{AsArray, BooleanArray, Float64Array, Int64Array};
    let list = array.as_list::<i32>();
    let mut out = StringBuilder::new();
    for i in 0..list.len() {
        if list.is_null(i) {
            out.append_null();
            continue;
        }
        let values = list.value(i);
        let items: Vec<Value> = (0..values.len())
            .map(|j| {
                if values.is_null(j) {
                    return Value::Null;
                }
                let any = values.as_any();
                if let Some(a) = any.downcast_ref::<StringArray>() {
                    Value::from(a.value(j))
                } else if let Some(a) = any.downcast_ref::<Int64Array>() {
                    Value::from(a.value(j))
                } else if let Some(a) = any.downcast_ref::<Float64Array>() {
                    Value::from(a.value(j))
                } else if let Some(a) = any.downcast_ref::<BooleanArray>() {
                    Value::from(a.value(j))
                } else {
                    Value::Null
                }
            })
            .collect();
        out.append_value(Value::Array(items).to_string());
    }
    Arc::new(out.finish())
}

fn compute_min_max(array: &ArrayRef) -> Option<MinMax> {
    use arrow::array::{AsArray, BooleanArray};
    use arrow::compute::{max, max_boolean, max_string, min, min_boolean, min_string};
    use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
    let (lo, hi) = match array.data_type() {
        DataType::Int64 => {
            let a = array.as_primitive::<Int64Type>();
            (Scalar::Int(min(a)?), Scalar::Int(max(a)?))
        }
        DataType::Float64 => {
            let a = array.as_primitive::<Float64Type>();
            (Scalar::Float(min(a)?), Scalar::Float(max(a)?))
        }
        DataType::Timestamp(_, _) => {
            let a = array.as_primitive::<TimestampMicrosecondType>();
            (Scalar::Timestamp(min(a)?), Scalar::Timestamp(max(a)?))
        }
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            (Scalar::Str(min_string(a)?.to_string()), Scalar::Str(max_string(a)?.to_string()))
        }
        DataType::Boolean => {
            let a: &BooleanArray = array.as_boolean();
            (Scalar::Bool(min_boolean(a)?), Scalar::Bool(max_boolean(a)?))
        }
        _ => return None,
    };
    Some(MinMax { min: lo, max: hi })
}

/// Bitset of deleted slots.
#[derive(Debug, Clone, Default)]
pub struct Deletions {
    words: Vec<u64>,
}

impl Deletions {
    pub fn set(&mut self, slot: u64) {
        let w = (slot / 64) as usize;
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (slot % 64);
    }

    pub fn is_deleted(&self, slot: u64) -> bool {
        self.words.get((slot / 64) as usize).is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    /// The words covering `start..end`, each masked to the slots in the range (a range past
    /// the last word ends there: nothing beyond it is deleted).
    fn words_in(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        let first = start / 64;
        let last = end.div_ceil(64).min(self.words.len() as u64);
        (first..last).map(move |w| {
            let lo = start.saturating_sub(w * 64).min(64);
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            self.words[w as usize] & mask
        })
    }

    /// Whether any slot in `start..end` is deleted (a word at a time).
    pub fn any_in(&self, start: u64, end: u64) -> bool {
        start < end && self.words_in(start, end).any(|w| w != 0)
    }

    /// Deleted slots in `start..end`, a word at a time (maintenance counts each index's range
    /// every pass: slot by slot, millions of slots a shard cost an idle process 10 ms a second).
    pub fn count(&self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        self.words_in(start, end).map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Deletions> {
        if !bytes.len().is_multiple_of(8) {
            return Err(basalt_common::BasaltError::internal("deletion bitmap has a partial word"));
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(Deletions { words })
    }
}

/// New values of the top-level fields patches changed in one live slot (`None`: removed).
pub type Overlay = BTreeMap<String, Option<Value>>;

/// Overlays by slot, in chunks of [`BLOCK_ROWS`] slots so that copying on write (a patch while a
/// scan holds a snapshot) copies one chunk and the chunk index, not every overlay.
#[derive(Debug, Clone, Default)]
pub struct Overlays {
    chunks: BTreeMap<u64, Arc<BTreeMap<u64, Arc<Overlay>>>>,
}

impl Overlays {
    fn chunk(slot: u64) -> u64 {
        slot / BLOCK_ROWS as u64
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn get(&self, slot: u64) -> Option<&Arc<Overlay>> {
        self.chunks.get(&Self::chunk(slot))?.get(&slot)
    }

    /// Overlays of slots in `start..end`, in slot order.
    pub fn range(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &Arc<Overlay>)> {
        let chunks = (start < end).then(|| self.chunks.range(Self::chunk(start)..=Self::chunk(end - 1)));
        chunks.into_iter().flatten().flat_map(move |(_, c)| c.range(start..end).map(|(slot, o)| (*slot, o)))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Arc<Overlay>)> {
        self.chunks.values().flat_map(|c| c.iter().map(|(slot, o)| (*slot, o)))
    }

    /// The overlay of `slot` to change (created empty).
    fn entry(&mut self, slot: u64) -> &mut Overlay {
        let chunk = Arc::make_mut(self.chunks.entry(Self::chunk(slot)).or_default());
        Arc::make_mut(chunk.entry(slot).or_default())
    }

    fn insert(&mut self, slot: u64, overlay: Overlay) {
        *self.entry(slot) = overlay;
    }

    fn remove(&mut self, slot: u64) {
        let key = Self::chunk(slot);
        let Some(chunk) = self.chunks.get_mut(&key) else { return };
        if !chunk.contains_key(&slot) {
            return;
        }
        let chunk = Arc::make_mut(chunk);
        chunk.remove(&slot);
        if chunk.is_empty() {
            self.chunks.remove(&key);
        }
    }
}

/// Everything a scan needs, taken under a short read lock and used without it.
pub struct Snapshot {
    pub blocks: Vec<Arc<Block>>,
    pub deletions: Deletions,
    pub stats: SchemaStats,
    pub overlays: Arc<Overlays>,
}

/// The top-level field a column path belongs to.
pub fn top_field(path: &str) -> &str {
    path.split('.').next().unwrap_or(path)
}

/// The value at the rest of a dotted path inside a top-level field's value.
fn value_at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = value;
    for part in path.split('.').skip(1) {
        cur = cur.as_object()?.get(part)?;
    }
    Some(cur)
}

impl Block {
    /// The block with `overlays` applied to the columns at `paths` (as the collection-wide
    /// types in `stats`), or `None` when no overlay falls in the block. Other columns are left
    /// out; min/max are not kept.
    pub fn overlaid(&self, overlays: &Overlays, paths: &[&str], stats: &SchemaStats) -> Result<Option<Block>> {
        let end = self.base_slot + self.rows as u64;
        let patched: Vec<(usize, &Overlay)> = overlays
            .range(self.base_slot, end)
            .map(|(slot, o)| ((slot - self.base_slot) as usize, o.as_ref()))
            .collect();
        if patched.is_empty() {
            return Ok(None);
        }
        let mut columns = HashMap::new();
        for path in paths.iter().copied().collect::<BTreeSet<&str>>() {
            let top = top_field(path);
            let changed: Vec<(usize, Option<&Value>)> = patched
                .iter()
                .filter_map(|(row, o)| o.get(top).map(|v| (*row, v.as_ref().and_then(|v| value_at(v, path)))))
                .collect();
            if changed.is_empty() {
                if let Some(array) = self.columns.get(path) {
                    columns.insert(path.to_string(), array.clone());
                }
                continue;
            }
            let Some(ty) = stats.column_type(path) else { continue };
            let dt = ty.to_arrow();
            let base = self.column_as(path, &dt)?;
            let new = cast_to(&build_from_values(&ty, changed.iter().map(|(_, v)| *v), changed.len()), &dt)?;
            let mut indices: Vec<(usize, usize)> = (0..self.rows).map(|r| (0, r)).collect();
            for (i, (row, _)) in changed.iter().enumerate() {
                indices[*row] = (1, i);
            }
            let merged = arrow::compute::interleave(&[base.as_ref(), new.as_ref()], &indices)?;
            columns.insert(path.to_string(), merged);
        }
        Ok(Some(Block::new(self.base_slot, self.rows, columns, HashMap::new()).transient()))
    }
}

/// A change to schema statistics: documents and, per path and kind, how many documents more or
/// fewer hold it. Written to the shard log with each batch so a restart can replay it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsDelta {
    pub docs: i64,
    pub fields: Vec<(String, Kind, i64)>,
}

/// Accumulates a [`StatsDelta`] without allocating for paths already seen.
#[derive(Default)]
pub struct StatsDeltaBuilder {
    docs: i64,
    fields: HashMap<String, HashMap<Kind, i64>>,
    runs: basalt_common::doc::KindRuns,
}

fn add_kind(fields: &mut HashMap<String, HashMap<Kind, i64>>, path: &str, kind: Kind, n: i64) {
    let kinds = match fields.get_mut(path) {
        Some(kinds) => kinds,
        None => fields.entry(path.to_string()).or_default(),
    };
    *kinds.entry(kind).or_insert(0) += n;
}

impl StatsDeltaBuilder {
    /// What one top-level field adds to (`sign` 1) or takes from (-1) the statistics; the
    /// document count is unchanged (a patch).
    pub fn add_field(&mut self, name: &str, value: &Value, sign: i64) {
        let fields = &mut self.fields;
        basalt_common::doc::visit_field_kinds(name, value, &mut |p, k| add_kind(fields, p, k, sign));
    }

    pub fn add_doc(&mut self, doc: &Doc, sign: i64) {
        self.docs += sign;
        let fields = &mut self.fields;
        self.runs.add(doc, sign, &mut |p, k, n| add_kind(fields, p, k, n));
    }

    pub fn build(mut self) -> StatsDelta {
        let fields = &mut self.fields;
        self.runs.finish(&mut |p, k, n| add_kind(fields, p, k, n));
        let mut fields: Vec<(String, Kind, i64)> = self
            .fields
            .into_iter()
            .flat_map(|(p, kinds)| kinds.into_iter().filter(|(_, n)| *n != 0).map(move |(k, n)| (p.clone(), k, n)))
            .collect();
        fields.sort();
        StatsDelta { docs: self.docs, fields }
    }
}

pub fn apply_delta(stats: &mut SchemaStats, delta: &StatsDelta) {
    stats.doc_count = stats.doc_count.saturating_add_signed(delta.docs);
    for (path, kind, n) in &delta.fields {
        stats.add(path, *kind, *n);
    }
}

/// Where the id of a live slot is read back from: the `_id` column of the sealed block that
/// holds the slot, or the tail document.
struct IdSource<'a> {
    blocks: &'a [Arc<Block>],
    tail: &'a [Arc<Doc>],
    tail_base: u64,
}

impl<'a> IdSource<'a> {
    /// Over the sealed blocks and the tail documents, which end before `next_slot`.
    fn new(blocks: &'a [Arc<Block>], tail: &'a [Arc<Doc>], next_slot: u64) -> IdSource<'a> {
        IdSource { blocks, tail, tail_base: next_slot - tail.len() as u64 }
    }

    fn id(&self, slot: u64) -> Option<&str> {
        use arrow::array::AsArray;
        if slot >= self.tail_base {
            let doc = self.tail.get(usize::try_from(slot - self.tail_base).ok()?)?;
            return doc.get(basalt_common::doc::ID_FIELD)?.as_str();
        }
        let i = self.blocks.partition_point(|b| b.base_slot + b.rows as u64 <= slot);
        let block = self.blocks.get(i).filter(|b| b.base_slot <= slot)?;
        let col = block.columns.get(basalt_common::doc::ID_FIELD)?.as_string_opt::<i32>()?;
        let row = usize::try_from(slot - block.base_slot).ok()?;
        col.is_valid(row).then(|| col.value(row))
    }
}

/// The live slot of each document id, in 8 bytes per id (plus the hash table's control byte):
/// the ids are not copied into it but read back from the column store (see [`IdSource`]) to
/// compare on a lookup and to rehash when the table grows. A `HashMap<String, u64>` cost about
/// 60 bytes per document (the string, its allocation, the table), gigabytes at tens of millions.
#[derive(Default)]
struct IdIndex {
    table: hashbrown::HashTable<u64>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl IdIndex {
    fn with_capacity(n: usize) -> IdIndex {
        IdIndex { table: hashbrown::HashTable::with_capacity(n), hasher: Default::default() }
    }

    fn hash(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(id)
    }

    fn get(&self, id: &str, source: &IdSource) -> Option<u64> {
        self.table.find(self.hash(id), |slot| source.id(*slot) == Some(id)).copied()
    }

    /// Set the live slot of `id` (whose document at `slot` must already be in `source`).
    fn insert(&mut self, id: &str, slot: u64, source: &IdSource) {
        let hash = self.hash(id);
        let hasher = &self.hasher;
        let rehash = |s: &u64| {
            use std::hash::BuildHasher;
            hasher.hash_one(source.id(*s).unwrap_or_default())
        };
        match self.table.entry(hash, |s| source.id(*s) == Some(id), rehash) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = slot,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(slot);
            }
        }
    }

    fn remove(&mut self, id: &str, source: &IdSource) -> Option<u64> {
        let hash = self.hash(id);
        let entry = self.table.find_entry(hash, |s| source.id(*s) == Some(id)).ok()?;
        Some(entry.remove().0)
    }

    fn len(&self) -> usize {
        self.table.len()
    }
}

/// The in-memory column store and id index of one shard. Statistics are maintained by the
/// caller through [`ColumnStore::apply_stats`] (the same delta goes to the shard log).
#[derive(Default)]
pub struct ColumnStore {
    blocks: Vec<Arc<Block>>,
    tail: Vec<Arc<Doc>>,
    /// Blocks built from the tail for scans, covering `tail[..n]` in order. New documents get a
    /// block of their own at the next scan; a block at least half the size of the one before it
    /// is rebuilt together with it (a binary counter), so each document is built O(log n) times
    /// per block instead of once per scan that follows a write.
    tail_blocks: Vec<Arc<Block>>,
    next_slot: u64,
    deletions: Deletions,
    /// Live slot of each document id.
    ids: IdIndex,
    stats: SchemaStats,
    /// Overlays of live slots (copied on write while a scan holds a snapshot).
    overlays: Arc<Overlays>,
    /// Slots whose overlay changed since the last flush took them.
    dirty: BTreeSet<u64>,
}

impl ColumnStore {
    /// A store over persisted blocks (slots below `next_slot`), with the live slot of every id
    /// taken from the blocks' `_id` columns.
    pub fn restore(blocks: Vec<Arc<Block>>, deletions: Deletions, stats: SchemaStats, next_slot: u64) -> Result<Self> {
        use arrow::array::AsArray;
        let rows: usize = blocks.iter().map(|b| b.rows).sum();
        let mut ids = IdIndex::with_capacity(rows);
        let source = IdSource::new(&blocks, &[], next_slot);
        for block in &blocks {
            let Some(col) = block.columns.get(basalt_common::doc::ID_FIELD) else { continue };
            let Some(col) = col.as_string_opt::<i32>() else { continue };
            for (row, id) in col.iter().enumerate() {
                let slot = block.base_slot + row as u64;
                if let Some(id) = id
                    && !deletions.is_deleted(slot)
                {
                    ids.insert(id, slot, &source);
                }
            }
        }
        Ok(ColumnStore { blocks, next_slot, deletions, ids, stats, ..Default::default() })
    }

    /// Where the id of a live slot can be read back.
    fn id_source(&self) -> IdSource<'_> {
        IdSource::new(&self.blocks, &self.tail, self.next_slot)
    }

    /// Set the overlay of a slot (restoring persisted overlays; dead slots are skipped).
    pub fn restore_overlay(&mut self, slot: u64, overlay: Overlay) {
        if slot < self.next_slot && !self.deletions.is_deleted(slot) {
            Arc::make_mut(&mut self.overlays).insert(slot, overlay);
        }
    }

    /// Record a patch of the live version of `id`: the new values of the top-level fields it
    /// changed. Returns the slot, or `None` when `id` has no live version.
    pub fn patch(&mut self, id: &str, fields: Overlay) -> Option<u64> {
        let slot = self.ids.get(id, &self.id_source())?;
        Arc::make_mut(&mut self.overlays).entry(slot).extend(fields);
        self.dirty.insert(slot);
        Some(slot)
    }

    /// Overlays changed since the last call (for a flush to persist).
    pub fn take_dirty_overlays(&mut self) -> Vec<(u64, Arc<Overlay>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().filter_map(|slot| Some((slot, self.overlays.get(slot)?.clone()))).collect()
    }

    /// Mark overlays to be taken by the next flush again (the flush that took them failed).
    pub fn mark_dirty(&mut self, slots: impl Iterator<Item = u64>) {
        for slot in slots {
            if self.overlays.get(slot).is_some() {
                self.dirty.insert(slot);
            }
        }
    }

    /// Every overlay of a live slot.
    pub fn overlays(&self) -> Arc<Overlays> {
        self.overlays.clone()
    }

    pub fn stats(&self) -> &SchemaStats {
        &self.stats
    }

    /// Changes whenever a row is added (every write adds its documents' new versions at the
    /// next slots); None while any slot is patched in place, which changes values without
    /// adding rows.
    pub fn version(&self) -> Option<u64> {
        self.overlays.is_empty().then_some(self.next_slot)
    }

    pub fn set_stats(&mut self, stats: SchemaStats) {
        self.stats = stats;
    }

    pub fn apply_stats(&mut self, delta: &StatsDelta) {
        apply_delta(&mut self.stats, delta);
    }

    pub fn live_docs(&self) -> usize {
        self.ids.len()
    }

    pub fn next_slot(&self) -> u64 {
        self.next_slot
    }

    pub fn deletions(&self) -> &Deletions {
        &self.deletions
    }

    /// Remove the live version of `id`, if any.
    pub fn remove(&mut self, id: &str) {
        if let Some(slot) = self.ids.remove(id, &IdSource::new(&self.blocks, &self.tail, self.next_slot)) {
            self.deletions.set(slot);
            if self.overlays.get(slot).is_some() {
                Arc::make_mut(&mut self.overlays).remove(slot);
            }
            self.dirty.remove(&slot);
        }
    }

    /// Append a new live version; returns its slot.
    pub fn append(&mut self, id: &str, doc: Arc<Doc>) -> Result<u64> {
        if doc.get(basalt_common::doc::ID_FIELD).and_then(Value::as_str) != Some(id) {
            return Err(basalt_common::BasaltError::internal(format!("document appended as {id} has another _id")));
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.tail.push(doc);
        self.ids.insert(id, slot, &IdSource::new(&self.blocks, &self.tail, self.next_slot));
        if self.tail.len() >= BLOCK_ROWS {
            self.seal_tail()?;
        }
        Ok(slot)
    }

    /// Turn the tail (however short) into a sealed block.
    pub fn seal_tail(&mut self) -> Result<()> {
        if self.tail.is_empty() {
            return Ok(());
        }
        let base = self.next_slot - self.tail.len() as u64;
        // Blocks already built for the tail (see `prebuild_tail`) are concatenated; only the
        // documents after them are built here.
        let covered = self.tail_covered();
        let mut parts = self.tail_blocks.clone();
        if covered < self.tail.len() {
            parts.push(Arc::new(Block::build(base + covered as u64, &self.tail[covered..])?));
        }
        let block = match parts.as_slice() {
            [one] if one.base_slot == base => Arc::clone(one),
            _ => match Block::concat(&parts)? {
                Some(b) => Arc::new(b),
                None => Arc::new(Block::build(base, &self.tail)?),
            },
        };
        self.blocks.push(block);
        self.tail.clear();
        self.tail_blocks.clear();
        Ok(())
    }

    /// The tail documents no tail block covers yet, with the slot of the first (to build a
    /// block from without holding the store's lock; see [`ColumnStore::add_tail_block`]).
    pub fn unbuilt_tail(&self) -> (u64, Vec<Arc<Doc>>) {
        let covered = self.tail_covered();
        let tail_base = self.next_slot - self.tail.len() as u64;
        (tail_base + covered as u64, self.tail[covered.min(self.tail.len())..].to_vec())
    }

    /// Add a block built from [`ColumnStore::unbuilt_tail`] if it still continues the tail's
    /// blocks (the tail was not sealed or extended in a way that moved them meanwhile).
    pub fn add_tail_block(&mut self, block: Block) -> Result<()> {
        let covered = self.tail_covered();
        let tail_base = self.next_slot - self.tail.len() as u64;
        if block.rows > 0 && block.base_slot == tail_base + covered as u64 && covered + block.rows <= self.tail.len() {
            self.tail_blocks.push(Arc::new(block));
            self.merge_tail_blocks()?;
        }
        Ok(())
    }

    /// The sealed blocks, in slot order.
    pub fn sealed_blocks(&self) -> Vec<Arc<Block>> {
        self.blocks.clone()
    }

    /// Replace adjacent sealed blocks (identified by pointer) with one merged block.
    pub fn replace_blocks(&mut self, parts: &[Arc<Block>], merged: Arc<Block>) -> bool {
        let Some(first) = parts.first() else { return false };
        let Some(start) = self.blocks.iter().position(|b| Arc::ptr_eq(b, first)) else { return false };
        let end = start + parts.len();
        if end > self.blocks.len() || !self.blocks[start..end].iter().zip(parts).all(|(a, b)| Arc::ptr_eq(a, b)) {
            return false;
        }
        self.blocks.splice(start..end, [merged]);
        true
    }

    pub fn slot_of(&self, id: &str) -> Option<u64> {
        self.ids.get(id, &self.id_source())
    }

    /// Blocks to scan: sealed blocks plus the tail built into blocks (see `tail_blocks`).
    pub fn snapshot(&mut self) -> Result<Snapshot> {
        let covered = self.tail_covered();
        if covered < self.tail.len() {
            let tail_base = self.next_slot - self.tail.len() as u64;
            self.tail_blocks.push(Arc::new(Block::build(tail_base + covered as u64, &self.tail[covered..])?));
            self.merge_tail_blocks()?;
        }
        let mut blocks = self.blocks.clone();
        blocks.extend(self.tail_blocks.iter().cloned());
        Ok(Snapshot {
            blocks,
            deletions: self.deletions.clone(),
            stats: self.stats.clone(),
            overlays: self.overlays.clone(),
        })
    }

    /// Tail documents the tail blocks cover (a prefix of the tail).
    fn tail_covered(&self) -> usize {
        self.tail_blocks.iter().map(|b| b.rows).sum()
    }

    /// A block at least half the size of the one before it merges with it (a binary counter).
    fn merge_tail_blocks(&mut self) -> Result<()> {
        let tail_base = self.next_slot - self.tail.len() as u64;
        while let [.., before, last] = self.tail_blocks.as_slice()
            && last.rows * 2 >= before.rows
        {
            // Concatenating arrays is cheaper than building from the documents again;
            // blocks whose types for a path differ are built again together.
            let merged = match Block::concat(&[before.clone(), last.clone()])? {
                Some(b) => Arc::new(b),
                None => {
                    let start = (before.base_slot - tail_base) as usize;
                    let end = start + before.rows + last.rows;
                    Arc::new(Block::build(before.base_slot, &self.tail[start..end])?)
                }
            };
            self.tail_blocks.truncate(self.tail_blocks.len() - 2);
            self.tail_blocks.push(merged);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};
    use basalt_common::doc::Kind;
    use serde_json::json;

    /// A scan's number is the thread's while its work runs, nested scans included, and the one
    /// before comes back after, also when the work panics.
    #[test]
    fn scan_epochs_nest_and_unwind() {
        let current = || CURRENT_SCAN.with(|c| c.get());
        assert_eq!(current(), 0);
        let (a, b) = (ScanEpoch::begin(), ScanEpoch::begin());
        a.enter(|| {
            assert_eq!(current(), a.0);
            b.enter(|| assert_eq!(current(), b.0));
            assert_eq!(current(), a.0);
            let unwound = std::panic::catch_unwind(|| b.enter(|| panic!("in a scan")));
            assert!(unwound.is_err());
            assert_eq!(current(), a.0);
        });
        assert_eq!(current(), 0);
    }

    /// The range ignores what null rows store: a null's value far outside the others' range
    /// does not widen the offsets (its offset is unused).
    #[test]
    fn offsets_span_the_non_null_values() {
        let mut values = Int64Array::from(vec![Some(1_000), None, Some(1_200), Some(1_003), None]);
        // Nulls storing extreme values (arrow leaves what a null slot holds unspecified).
        let (_, buffer, nulls) = values.clone().into_parts();
        let mut raw = buffer.to_vec();
        raw[1] = i64::MIN;
        raw[4] = i64::MAX;
        values = Int64Array::new(raw.into(), nulls);
        let o = Offsets::build(&values, None).unwrap();
        assert_eq!(o.base, 1_000);
        let OffsetValues::U8(v) = &o.values else { panic!("{:?}", o.values) };
        assert_eq!((v[0], v[2], v[3]), (0, 200, 3));
        let days = arrow::array::Date32Array::from(vec![Some(10_000), None, Some(10_300)]);
        let o = Offsets::build(&days, None).unwrap();
        assert!(matches!(&o.values, OffsetValues::U16(v) if v[2] == 300));
        assert!(Offsets::build(&Int64Array::from(vec![None::<i64>, None]), None).is_none());
        // Four bytes of range for four-byte dates: nothing to gain.
        let wide = arrow::array::Date32Array::from(vec![i32::MIN, i32::MAX]);
        assert!(Offsets::build(&wide, None).is_none());
        // A block's kept minimum and maximum stand for the pass over the values.
        let known = MinMax { min: Scalar::Int(1_000), max: Scalar::Int(1_200) };
        let o = Offsets::build(&values, Some(&known)).unwrap();
        assert!(o.base == 1_000 && matches!(&o.values, OffsetValues::U8(v) if v[2] == 200));
    }

    #[test]
    fn deletions_count_word_by_word_like_slot_by_slot() {
        let mut d = Deletions::default();
        // A pseudo-random set over 1,000 slots, words full and empty included.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for slot in 0..1000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (128..192).contains(&slot) || (slot >= 320 && x.is_multiple_of(3)) {
                d.set(slot);
            }
        }
        let slow = |a: u64, b: u64| (a..b).filter(|s| d.is_deleted(*s)).count() as u64;
        for (a, b) in
            [(0, 0), (0, 1000), (5, 5), (128, 192), (127, 193), (63, 65), (300, 2000), (990, 1100), (2000, 3000)]
        {
            assert_eq!(d.count(a, b), slow(a, b), "{a}..{b}");
            assert_eq!(d.any_in(a, b), slow(a, b) > 0, "{a}..{b}");
        }
        for a in (0..1000).step_by(37) {
            for b in (a..1100).step_by(53) {
                assert_eq!(d.count(a, b), slow(a, b), "{a}..{b}");
            }
        }
    }

    fn doc(v: Value) -> Arc<Doc> {
        Arc::new(v.as_object().unwrap().clone())
    }

    #[test]
    fn builds_typed_columns_with_min_max() {
        let docs = vec![
            doc(json!({"_id": "a", "_event_time": 1, "n": 5, "s": "x", "o": {"c": "p"}, "t": [1, 2]})),
            doc(json!({"_id": "b", "_event_time": 2, "n": -3, "m": 1})),
            doc(json!({"_id": "c", "_event_time": 3, "m": "two"})),
        ];
        let b = Block::build(10, &docs).unwrap();
        assert_eq!(b.rows, 3);
        let n = b.columns["n"].as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(n.iter().collect::<Vec<_>>(), vec![Some(5), Some(-3), None]);
        assert_eq!(b.min_max["n"], MinMax { min: Scalar::Int(-3), max: Scalar::Int(5) });
        assert_eq!(b.columns["m"].as_string::<i32>().iter().collect::<Vec<_>>(), vec![None, Some("1"), Some("two")]);
        assert_eq!(b.columns["o.c"].as_string::<i32>().value(0), "p");
        let t = b.column_as("t", &DataType::Utf8).unwrap();
        assert_eq!(t.as_string::<i32>().value(0), "[1,2]");
        let missing = b.column_as("zz", &DataType::Int64).unwrap();
        assert_eq!(missing.null_count(), 3);
        assert_eq!(b.column_as("n", &DataType::Float64).unwrap().data_type(), &DataType::Float64);
    }

    #[test]
    fn tail_blocks_stay_few_and_cover_the_tail_in_order() {
        let mut store = ColumnStore::default();
        for i in 0..1000u64 {
            store.append(&format!("d{i}"), doc(json!({"_id": format!("d{i}"), "n": i}))).unwrap();
            // A scan after every write, as a real-time dashboard would.
            let snap = store.snapshot().unwrap();
            assert!(snap.blocks.len() <= 11, "{} tail blocks after {i} writes", snap.blocks.len());
            let mut next = 0u64;
            for b in &snap.blocks {
                assert_eq!(b.base_slot, next);
                let n = b.columns["n"].as_any().downcast_ref::<Int64Array>().unwrap();
                assert_eq!(n.value(0) as u64, next);
                next += b.rows as u64;
            }
            assert_eq!(next, i + 1);
        }
        store.seal_tail().unwrap();
        assert_eq!(store.snapshot().unwrap().blocks.len(), 1);
    }

    #[test]
    fn store_tracks_versions_and_seals_blocks() {
        let mut store = ColumnStore::default();
        let mut delta = StatsDeltaBuilder::default();
        for i in 0..(BLOCK_ROWS + 5) {
            let d = doc(json!({"_id": format!("d{i}"), "v": i}));
            delta.add_doc(&d, 1);
            store.append(&format!("d{i}"), d).unwrap();
        }
        let old = doc(json!({"_id": "d0", "v": 0}));
        delta.add_doc(&old, -1);
        store.remove("d0");
        let new = doc(json!({"_id": "d0", "v": "changed"}));
        delta.add_doc(&new, 1);
        store.append("d0", new).unwrap();
        store.apply_stats(&delta.build());
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.blocks.len(), 2);
        assert!(snap.deletions.is_deleted(0));
        assert_eq!(store.live_docs(), BLOCK_ROWS + 5);
        assert_eq!(snap.stats.fields["v"][&Kind::String], 1);
        assert_eq!(snap.stats.fields["v"][&Kind::Int], (BLOCK_ROWS + 4) as u64);
        assert_eq!(store.slot_of("d0"), Some((BLOCK_ROWS + 5) as u64));

        // Seal the short tail, persist every block, restore, and merge the two short blocks.
        store.append("e", doc(json!({"_id": "e", "v": 1.5}))).unwrap();
        store.seal_tail().unwrap();
        let blocks = store.sealed_blocks();
        assert_eq!(blocks.iter().map(|b| b.rows).collect::<Vec<_>>(), vec![BLOCK_ROWS, 7]);
        let dir = tempfile::tempdir().unwrap();
        let copies: Vec<Arc<Block>> = blocks
            .iter()
            .map(|b| {
                let file = dir.path().join(format!("{}.arrow", b.base_slot));
                std::fs::write(&file, b.to_ipc().unwrap()).unwrap();
                Arc::new(Block::open_mapped(&file).unwrap())
            })
            .collect();
        assert_eq!(copies[1].min_max, blocks[1].min_max);
        for (copy, block) in copies.iter().zip(&blocks) {
            assert_eq!(copy.rows, block.rows);
            assert_eq!(copy.columns.len(), block.columns.len());
            for (name, array) in &block.columns {
                assert_eq!(&copy.columns[name].to_data(), &array.to_data(), "column {name}");
            }
        }
        // Min/max come from the file's metadata, or are computed when it has none (a bound
        // too long to store, a float that JSON cannot hold).
        for extra in [json!("x".repeat(MAX_STORED_BOUND + 1)), json!(f64::MAX), json!(-0.5)] {
            let block =
                Block::build(0, &[doc(json!({"_id": "a", "v": extra})), doc(json!({"_id": "b", "v": 2}))]).unwrap();
            let file = dir.path().join("extra.arrow");
            std::fs::write(&file, block.to_ipc().unwrap()).unwrap();
            assert_eq!(Block::open_mapped(&file).unwrap().min_max, block.min_max, "{extra}");
        }
        // A damaged file is an error, never a crash.
        let bytes = blocks[1].to_ipc().unwrap();
        for (name, damaged) in [
            ("short", bytes[..6].to_vec()),
            ("cut", bytes[..bytes.len() - 1].to_vec()),
            ("no body", bytes[bytes.len() - 200..].to_vec()),
            ("zeros", vec![0u8; bytes.len()]),
        ] {
            let file = dir.path().join(name);
            std::fs::write(&file, &damaged).unwrap();
            assert!(Block::open_mapped(&file).is_err(), "{name}");
        }
        assert!(Block::open_mapped(&dir.path().join("missing")).is_err());
        assert_eq!(copies[1].base_slot, BLOCK_ROWS as u64);
        let deletions = Deletions::from_bytes(&store.deletions().to_bytes()).unwrap();
        let restored =
            ColumnStore::restore(copies.clone(), deletions, store.stats().clone(), store.next_slot()).unwrap();
        assert_eq!(restored.live_docs(), BLOCK_ROWS + 6);
        assert_eq!(restored.slot_of("d0"), Some((BLOCK_ROWS + 5) as u64));
        assert_eq!(restored.slot_of("d1"), Some(1));
        // "v" is int in the first block and text in the second: they stay apart.
        assert!(Block::concat(&copies).unwrap().is_none());
        let a = Arc::new(Block::build(0, &[doc(json!({"_id": "x", "n": 1}))]).unwrap());
        let b = Arc::new(Block::build(1, &[doc(json!({"_id": "y", "m": "s"}))]).unwrap());
        let merged = Block::concat(&[a, b]).unwrap().unwrap();
        assert_eq!((merged.base_slot, merged.rows), (0, 2));
        assert_eq!(merged.columns["n"].null_count(), 1);
        assert_eq!(merged.min_max["_id"], MinMax { min: Scalar::Str("x".into()), max: Scalar::Str("y".into()) });
    }

    #[test]
    fn the_id_index_finds_what_a_map_of_ids_finds() {
        // Ids across sealed blocks and the tail, upserted, removed and written again, through
        // several growths of the table; then restored from the blocks.
        let mut store = ColumnStore::default();
        let mut model: HashMap<String, u64> = HashMap::new();
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        for round in 0..30_000u64 {
            let id = format!("k{}", next() % 12_000);
            if next() % 5 == 0 {
                store.remove(&id);
                model.remove(&id);
            } else {
                store.remove(&id);
                let slot = store.append(&id, doc(json!({"_id": id, "n": round}))).unwrap();
                model.insert(id, slot);
            }
        }
        assert_eq!(store.live_docs(), model.len());
        for n in 0..12_500 {
            let id = format!("k{n}");
            assert_eq!(store.slot_of(&id), model.get(&id).copied(), "{id}");
        }
        assert!(store.append("x", doc(json!({"_id": "y"}))).is_err(), "the document must carry the id");
        store.seal_tail().unwrap();
        let restored = ColumnStore::restore(
            store.sealed_blocks(),
            store.deletions().clone(),
            SchemaStats::default(),
            store.next_slot(),
        )
        .unwrap();
        assert_eq!(restored.live_docs(), model.len());
        for (id, slot) in &model {
            assert_eq!(restored.slot_of(id), Some(*slot));
        }
        assert_eq!(restored.slot_of("k99999"), None);
    }

    #[test]
    fn overlays_copy_one_chunk_on_write_and_range_across_chunks() {
        let mut o = Overlays::default();
        let value = |v: i64| Overlay::from([("n".to_string(), Some(Value::from(v)))]);
        for slot in [3, 8191, 8192, 20_000] {
            o.insert(slot, value(slot as i64));
        }
        let snapshot = o.clone();
        o.entry(8192).insert("n".into(), None);
        o.remove(20_000);
        assert_eq!(snapshot.get(8192).unwrap()["n"], Some(Value::from(8192)), "the snapshot is unchanged");
        assert_eq!(o.get(8192).unwrap()["n"], None);
        assert!(Arc::ptr_eq(&o.chunks[&0], &snapshot.chunks[&0]), "untouched chunks are shared");
        assert_eq!(o.range(0, 8193).map(|(s, _)| s).collect::<Vec<_>>(), vec![3, 8191, 8192]);
        assert_eq!(o.range(8191, 8192).map(|(s, _)| s).collect::<Vec<_>>(), vec![8191]);
        assert_eq!(o.range(5, 5).count(), 0);
        assert_eq!(o.iter().count(), 3);
        assert_eq!(snapshot.range(10_000, 30_000).map(|(s, _)| s).collect::<Vec<_>>(), vec![20_000]);
    }
}
