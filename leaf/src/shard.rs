//! One shard of one collection: the row store (fjall keyspace, document by `_id`), the column
//! store and the search index, kept in step by one writer at a time.
//!
//! Durability: a write batch is committed to fjall's journal with fsync (documents, the shard
//! sequence number and a shard log entry in one atomic batch) before it touches the in-memory
//! indexes and before it is acknowledged. In the background, the column store and search index
//! are flushed as immutable segments to the segment store (see `segments`), after which the log
//! up to the flushed sequence number is dropped. On open, a shard loads its segments and replays
//! the log; without a manifest it rebuilds from the row store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch};
use arrow::compute::and;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use basalt_common::api::{
    DocStatus, SCORE_COLUMN, SELECTED_COLUMN, ScanRequest, ShardWriteResult, SourcePosition, WriteOp,
};
use basalt_common::doc::{Doc, DocLimits, Kind, apply_patch, apply_patch_partial, patched_fields};
use basalt_common::filter::{AccessPath, Filter, choose_access_path, id_lookup, index_answerable};
use basalt_common::schema::{ColumnType, SchemaStats};
use basalt_common::sketch::Sketch;
use basalt_common::{BasaltError, Result};
use parking_lot::{Mutex, RwLock};
use prometheus::{HistogramVec, IntCounter, register_histogram_vec, register_int_counter};
use serde::{Deserialize, Serialize};

use crate::columns::{
    BLOCK_ROWS, Block, ColumnStore, Deletions, Overlay, Overlays, Snapshot, StatsDelta, StatsDeltaBuilder, apply_delta,
    ascending_across,
};
use crate::eval::{InSets, block_excluded, select};
use crate::rows::{Head, RowStore};
use crate::search::SearchIndex;
use crate::segments::{Manifest, ShardSegments};
use crate::store::SegmentStore;

pub type ShardKey = (u64, u32);

/// Documents at least this large are stored apart from the row store's tree.
const DOC_SEPARATION_BYTES: u32 = 4096;

/// Patch files a manifest may name before they are merged into one.
const MAX_PATCH_FILES: usize = 8;

/// Marks the in-memory manifest of a dropped shard.
const DROPPED: u32 = u32::MAX;

pub fn keyspace_name(key: ShardKey) -> String {
    format!("c{}_s{}", key.0, key.1)
}

fn store_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::internal(format!("row store: {e}"))
}

/// One entry of the shard log: what a committed batch changed, enough to replay it onto the
/// segments of an earlier sequence number (documents come from the row store).
#[derive(Debug, Default, Serialize, Deserialize)]
struct LogEntry {
    ids: Vec<String>,
    stats: StatsDelta,
}

fn log_prefix(key: ShardKey) -> Vec<u8> {
    format!("log/{}/", keyspace_name(key)).into_bytes()
}

fn log_key(key: ShardKey, seq: u64) -> Vec<u8> {
    let mut k = log_prefix(key);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence number at the end of a log key.
fn log_seq(key: &[u8]) -> Option<u64> {
    key.len().checked_sub(8).and_then(|at| key[at..].try_into().ok()).map(u64::from_be_bytes)
}

/// When a shard flushes its tail to a segment, and how segments merge.
#[derive(Debug, Clone)]
pub struct FlushPolicy {
    /// Flush once this many slots were written since the last flush.
    pub max_rows: u64,
    /// Flush writes older than this even when few.
    pub max_age: Duration,
    /// Merge search indexes when an idle shard (see `idle`) has more than this many.
    pub max_indexes: usize,
    /// Merge search indexes when a shard taking writes has more than this many: merges compete
    /// with ingest for the same cores, so a bulk load's indexes mostly wait for it to end.
    pub max_indexes_busy: usize,
    /// A merge takes up to this many adjacent indexes at once (tiered: a document is rewritten
    /// about log_width(n) times, not log_2(n) as with pairs).
    pub merge_width: usize,
    /// Rewrite a search index into one segment when it has more than this many (a sealed tail
    /// keeps the segments its commits made).
    pub max_index_segments: usize,
    /// A shard without writes for this long rewrites its multi-segment indexes into one
    /// segment each (searches get faster; the work waits for a quiet moment).
    pub idle: Duration,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        Self {
            max_rows: 64 * 1024,
            max_age: Duration::from_secs(10),
            max_indexes: 8,
            max_indexes_busy: 32,
            merge_width: 8,
            max_index_segments: 32,
            idle: Duration::from_secs(30),
        }
    }
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Maintenance {
    pub flushed: bool,
    pub blocks_merged: usize,
    pub indexes_merged: usize,
    pub patch_files_merged: usize,
    pub bytes_written: u64,
    /// Where a flush's time went (`refresh 3 ms, prebuild 40 ms, ...`), empty without one.
    pub flush_phases: String,
    /// The shard had taken no writes for [`FlushPolicy::idle`]: its idle-time merges were due
    /// in this pass.
    pub idle: bool,
}

impl Maintenance {
    /// Whether the pass flushed or merged anything.
    pub fn did_work(&self) -> bool {
        self.flushed || self.blocks_merged > 0 || self.indexes_merged > 0 || self.patch_files_merged > 0
    }
}

pub struct Shard {
    pub key: ShardKey,
    db: fjall::Database,
    rows: RowStore,
    meta: fjall::Keyspace,
    /// Serializes writers; holds the last durable sequence number.
    seq: Mutex<u64>,
    columns: RwLock<ColumnStore>,
    search: SearchIndex,
    limits: DocLimits,
    segments: ShardSegments,
    /// The manifest last written; its lock serializes flushes and merges.
    manifest: Mutex<Manifest>,
    last_flush: Mutex<Instant>,
    /// The sequence number maintenance last saw and when it changed (is the shard idle?).
    last_change: Mutex<(u64, Instant)>,
    /// How the shard was opened: "segments" or "row store".
    opened_from: &'static str,
    /// How far the shard applied each (source, partition); durable in `meta`.
    positions: Mutex<HashMap<(u64, i32), i64>>,
    /// Distinct-value sketches per column for the planner, and the live documents they saw.
    distinct: Mutex<Option<(u64, Arc<Sketches>)>>,
    /// The paths the shard scans in ascending order, and the column store's version they were
    /// checked at (see [`ColumnStore::version`]).
    ascending: Mutex<Option<(u64, Arc<Vec<String>>)>>,
}

/// A document patched field by field in one batch: its stored head, the fields loaded (those
/// stored inline, and the touched ones) with their current values, and the touched fields'
/// values before the batch.
struct Patching {
    head: Head,
    doc: Doc,
    before: BTreeMap<String, Option<serde_json::Value>>,
}

/// Time a shard write spends in each phase, by phase: waiting for the shard's writer or column
/// locks, preparing (reading old versions, validating, building the batch), the durable commit
/// (fsync), and updating the in-memory indexes.
static WRITE_PHASES: std::sync::LazyLock<Option<HistogramVec>> = std::sync::LazyLock::new(|| {
    register_histogram_vec!(
        "basalt_leaf_write_phase_seconds",
        "Time shard writes spend per phase",
        &["phase"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .ok()
});

/// Distinct-value sketches computed for the planner (each reads every live value of a shard).
static SKETCH_BUILDS: std::sync::LazyLock<Option<IntCounter>> = std::sync::LazyLock::new(|| {
    register_int_counter!(
        "basalt_leaf_sketch_builds_total",
        "Distinct-value sketches computed for join planning (every live value of a shard read once)"
    )
    .ok()
});

/// A write slower than this is logged with its phases.
const SLOW_WRITE: Duration = Duration::from_millis(250);

/// Where one operation's time went, phase by phase (a shard write: see [`WRITE_PHASES`]; a
/// flush: logged by maintenance).
struct Phases {
    started: Instant,
    last: Instant,
    spent: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Self {
        let now = Instant::now();
        Phases { started: now, last: now, spent: Vec::with_capacity(6) }
    }

    /// The time since the previous mark went to `phase`.
    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.spent.push((phase, now - self.last));
        self.last = now;
    }

    fn summary(&self) -> String {
        let phases: Vec<String> = self.spent.iter().map(|(p, d)| format!("{p} {} ms", d.as_millis())).collect();
        phases.join(", ")
    }

    /// Record a shard write's phases and log it when slow.
    fn finish_write(self, shard: ShardKey) {
        if let Some(h) = WRITE_PHASES.as_ref() {
            for (phase, d) in &self.spent {
                h.with_label_values(&[phase]).observe(d.as_secs_f64());
            }
        }
        let total = self.started.elapsed();
        if total >= SLOW_WRITE {
            tracing::info!(shard = %keyspace_name(shard), ms = total.as_millis() as u64, phases = %self.summary(), "slow shard write");
        }
    }
}

/// One id's state while a batch is applied.
enum Pending {
    /// Whole versions: the stored one (with its head) and the one after the batch.
    Whole { old: Option<(Doc, Head)>, new: Option<Arc<Doc>> },
    /// Field-level patches of a stored document.
    Fields(Patching),
}

impl Pending {
    fn changed(&self) -> bool {
        match self {
            Pending::Whole { old, new } => old.as_ref().map(|(doc, _)| doc) != new.as_deref(),
            Pending::Fields(p) => p.before.iter().any(|(name, before)| p.doc.get(name) != before.as_ref()),
        }
    }
}

impl Shard {
    /// Open a shard: load its segments and replay its log, or rebuild from the row store.
    pub fn open(
        db: &fjall::Database,
        meta: &fjall::Keyspace,
        store: &SegmentStore,
        key: ShardKey,
        limits: DocLimits,
    ) -> Result<Shard> {
        let started = Instant::now();
        // Large documents live in blob files beside the tree (key-value separation), so
        // compactions move only keys and pointers for them, not the documents again.
        // Every level LZ4-compressed (fjall leaves its first two levels plain): documents are
        // JSON whose field names repeat in every entry of a block.
        let docs_options = || {
            fjall::KeyspaceCreateOptions::default()
                .with_kv_separation(Some(
                    fjall::KvSeparationOptions::default().separation_threshold(DOC_SEPARATION_BYTES),
                ))
                .data_block_compression_policy(fjall::config::CompressionPolicy::all(fjall::CompressionType::Lz4))
        };
        let docs = db.keyspace(&keyspace_name(key), docs_options).map_err(store_err)?;
        let seq = match meta.get(seq_key(key)).map_err(store_err)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| store_err("bad sequence number"))?),
            None => 0,
        };
        let segments = ShardSegments::new(store.clone(), keyspace_name(key));
        let manifest = segments.load_manifest()?;
        if let Some(m) = &manifest
            && m.seq > seq
        {
            return Err(BasaltError::internal(format!(
                "segment store {} holds shard {} at sequence {} but the local log ends at {seq}: \
                 the data directory does not belong to this segment store",
                store.description(),
                keyspace_name(key),
                m.seq
            )));
        }
        let mut shard = Shard {
            key,
            db: db.clone(),
            rows: RowStore::new(docs),
            meta: meta.clone(),
            seq: Mutex::new(seq),
            columns: RwLock::new(ColumnStore::default()),
            search: SearchIndex::new(0, Vec::new())?,
            limits,
            segments,
            manifest: Mutex::new(Manifest::default()),
            last_flush: Mutex::new(Instant::now()),
            last_change: Mutex::new((0, Instant::now())),
            opened_from: "row store",
            positions: Mutex::new(load_positions(meta, key)?),
            distinct: Mutex::new(None),
            ascending: Mutex::new(None),
        };
        let how = match manifest {
            Some(m) => match shard.restore(&m) {
                Ok(replayed) => {
                    if let Err(e) = shard.segments.delete_unreferenced(&m) {
                        tracing::warn!(shard = %keyspace_name(key), error = %e, "could not delete unreferenced segment objects");
                    }
                    *shard.manifest.get_mut() = m;
                    shard.opened_from = "segments";
                    format!("segments and {replayed} replayed documents")
                }
                Err(e) => {
                    tracing::error!(shard = %keyspace_name(key), error = %e, "segments unreadable; rebuilding from the row store");
                    shard.columns = RwLock::new(ColumnStore::default());
                    shard.search = SearchIndex::new(0, Vec::new())?;
                    shard.rebuild()?;
                    "row store (segments unreadable)".to_string()
                }
            },
            None => {
                shard.rebuild()?;
                "row store".to_string()
            }
        };
        tracing::info!(
            shard = %keyspace_name(key),
            docs = shard.live_docs(),
            seq,
            from = %how,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard open"
        );
        Ok(shard)
    }

    /// Load the segments of `manifest` and replay the log after it. Returns the number of
    /// documents replayed.
    fn restore(&mut self, manifest: &Manifest) -> Result<usize> {
        let loaded = self.segments.load(manifest)?;
        let mut columns =
            ColumnStore::restore(loaded.blocks, loaded.deletions, manifest.stats.clone(), manifest.next_slot)?;
        for (slot, overlay) in loaded.patches {
            columns.restore_overlay(slot, overlay);
        }
        let search = SearchIndex::new(manifest.next_slot, loaded.indexes)?;
        // Replay: every id touched after the manifest gets its current version (or none).
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut stats = manifest.stats.clone();
        for item in self.meta.prefix(log_prefix(self.key)) {
            let (k, v) = item.into_inner().map_err(store_err)?;
            let Some(seq) = log_seq(&k) else { return Err(store_err("bad log key")) };
            if seq <= manifest.seq {
                continue;
            }
            let entry: LogEntry = serde_json::from_slice(&v).map_err(store_err)?;
            apply_delta(&mut stats, &entry.stats);
            for id in entry.ids {
                if seen.insert(id.clone()) {
                    order.push(id);
                }
            }
        }
        for id in &order {
            columns.remove(id);
            if let Some(doc) = self.get(id)? {
                let doc = Arc::new(doc);
                let slot = columns.append(id, doc.clone())?;
                search.add(id, slot, &doc)?;
            }
        }
        columns.set_stats(stats);
        search.refresh()?;
        self.columns = RwLock::new(columns);
        self.search = search;
        Ok(order.len())
    }

    fn rebuild(&self) -> Result<()> {
        let mut columns = self.columns.write();
        let mut delta = StatsDeltaBuilder::default();
        let mut n = 0u64;
        self.rows.for_each(|id, doc| {
            delta.add_doc(&doc, 1);
            let doc = Arc::new(doc);
            let slot = columns.append(&id, doc.clone())?;
            self.search.add(&id, slot, &doc)?;
            n += 1;
            if n.is_multiple_of(100_000) {
                tracing::info!(shard = %keyspace_name(self.key), docs = n, "rebuilding shard from the row store");
            }
            Ok(())
        })?;
        columns.apply_stats(&delta.build());
        self.search.refresh()?;
        Ok(())
    }

    /// The current version of a document from the row store.
    pub fn get(&self, id: &str) -> Result<Option<Doc>> {
        self.rows.get(id)
    }

    /// Apply a batch of operations: per-document validation, one durable commit, then the
    /// in-memory indexes. Operations on the same `_id` apply in order.
    ///
    /// An id that only gets patches in the batch is patched field by field: the row store
    /// reads and writes the document's head and the touched fields only, statistics change by
    /// the touched fields, the column store records an overlay on the document's slot and the
    /// search index a document of the new field values. Other ids get whole new versions.
    ///
    /// With a source position, operations at offsets this shard already applied for that
    /// partition are skipped (reported ok), and the position moves to `through` in the same
    /// commit as the operations: a source resent from an older offset applies nothing twice.
    pub fn apply(&self, ops: Vec<WriteOp>, position: Option<SourcePosition>) -> Result<ShardWriteResult> {
        let mut phases = Phases::new();
        let mut seq = self.seq.lock();
        phases.mark("wait");
        let (ops, kept, advance) = match &position {
            None => (ops, None, None),
            Some(p) => {
                if p.offsets.len() != ops.len() {
                    return Err(BasaltError::invalid(format!(
                        "a source write has {} operations but {} offsets",
                        ops.len(),
                        p.offsets.len()
                    )));
                }
                let known = self.positions.lock().get(&(p.stream, p.partition)).copied();
                let done = known.unwrap_or(-1);
                if let Some(first) = p.first
                    && done >= first
                    && done < p.through
                {
                    return Err(BasaltError::conflict(format!(
                        "source {} partition {}: the write aggregates offsets {first}..={} but this shard applied \
                         through {done}",
                        p.stream, p.partition, p.through
                    )));
                }
                let kept: Vec<bool> = p.offsets.iter().map(|o| *o > done).collect();
                let mut ids = Vec::new();
                let mut out = Vec::new();
                for (op, keep) in ops.into_iter().zip(&kept) {
                    if *keep {
                        out.push(op);
                    } else {
                        ids.push(op.id().to_string());
                    }
                }
                // A first position is recorded even at -1 (nothing applied yet): "no position"
                // means the shard never heard of the partition, and a source resuming treats
                // that differently.
                let advance = (known.is_none() || p.through > done).then_some((p.stream, p.partition, p.through));
                (out, Some((kept, ids)), advance)
            }
        };
        let result = self.apply_locked(&mut seq, ops, advance, &mut phases);
        drop(seq);
        phases.finish_write(self.key);
        let result = result?;
        let Some((kept, skipped_ids)) = kept else { return Ok(result) };
        // Statuses in input order: skipped operations were applied by an earlier write.
        let mut applied = result.statuses.into_iter();
        let mut skipped = skipped_ids.into_iter();
        let statuses = kept
            .into_iter()
            .map(|k| if k { applied.next() } else { skipped.next().map(DocStatus::ok) })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| BasaltError::internal("statuses do not match operations"))?;
        Ok(ShardWriteResult { statuses, seq: result.seq })
    }

    /// How far this shard applied each partition of a source.
    pub fn positions(&self, stream: u64) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> =
            self.positions.lock().iter().filter(|((s, _), _)| *s == stream).map(|((_, p), t)| (*p, *t)).collect();
        out.sort_unstable();
        out
    }

    fn apply_locked(
        &self,
        seq: &mut parking_lot::MutexGuard<'_, u64>,
        ops: Vec<WriteOp>,
        advance: Option<(u64, i32, i64)>,
        phases: &mut Phases,
    ) -> Result<ShardWriteResult> {
        let mut patch_only: HashMap<String, bool> = HashMap::new();
        for op in &ops {
            let only = patch_only.entry(op.id().to_string()).or_insert(true);
            *only &= matches!(op, WriteOp::Patch { .. });
        }
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut statuses = Vec::with_capacity(ops.len());
        for op in ops {
            let id = op.id().to_string();
            if id.is_empty() {
                statuses.push(DocStatus::error(None, BasaltError::invalid("document has no _id")));
                continue;
            }
            if !pending.contains_key(&id) {
                let entry = if patch_only.get(&id).copied().unwrap_or(false) {
                    match self.rows.head(&id)? {
                        Some(head) => {
                            Pending::Fields(Patching { doc: head.inline.clone(), head, before: BTreeMap::new() })
                        }
                        // A missing document: patches fail, merges create it (whole path).
                        None => Pending::Whole { old: None, new: None },
                    }
                } else {
                    let old = match self.rows.head(&id)? {
                        None => None,
                        Some(head) => Some((self.rows.assemble(&id, head.clone())?, head)),
                    };
                    Pending::Whole { new: old.as_ref().map(|(doc, _)| Arc::new(doc.clone())), old }
                };
                pending.insert(id.clone(), entry);
                order.push(id.clone());
            }
            let Some(entry) = pending.get_mut(&id) else { continue };
            let missing = || BasaltError::not_found(format!("document {id} does not exist"));
            let result = match (op, entry) {
                (WriteOp::Upsert { doc }, Pending::Whole { new, .. }) => {
                    *new = Some(doc);
                    Ok(())
                }
                (WriteOp::Delete { .. }, Pending::Whole { new, .. }) => {
                    *new = None;
                    Ok(())
                }
                (WriteOp::Patch { ops, .. }, Pending::Whole { new: Some(doc), .. }) => {
                    apply_patch(Arc::make_mut(doc), &ops, &self.limits)
                }
                (WriteOp::Patch { ops, .. } | WriteOp::Merge { ops, .. }, Pending::Fields(p)) => {
                    self.patch_fields(&id, p, &ops)
                }
                (WriteOp::Merge { ops, .. }, Pending::Whole { new, .. }) => {
                    let mut doc = new.as_deref().cloned().unwrap_or_else(|| {
                        let mut d = Doc::new();
                        d.insert(basalt_common::doc::ID_FIELD.into(), id.clone().into());
                        d.insert(basalt_common::doc::EVENT_TIME_FIELD.into(), basalt_common::doc::now_micros().into());
                        d
                    });
                    apply_patch(&mut doc, &ops, &self.limits).map(|()| *new = Some(Arc::new(doc)))
                }
                (WriteOp::Patch { .. }, Pending::Whole { new: None, .. }) => Err(missing()),
                (_, Pending::Fields(_)) => Err(BasaltError::internal("a whole write on the field-level path")),
            };
            statuses.push(match result {
                Ok(()) => DocStatus::ok(id),
                Err(e) => DocStatus::error(Some(id), e),
            });
        }
        let changed: Vec<String> =
            order.into_iter().filter(|id| pending.get(id).is_some_and(Pending::changed)).collect();
        let mut batch = self.db.batch().durability(Some(fjall::PersistMode::SyncAll));
        if let Some((stream, partition, through)) = advance {
            batch.insert(&self.meta, position_key(self.key, stream, partition), through.to_be_bytes());
        }
        if changed.is_empty() {
            if let Some((stream, partition, through)) = advance {
                batch.commit().map_err(store_err)?;
                self.positions.lock().insert((stream, partition), through);
            }
            return Ok(ShardWriteResult { statuses, seq: **seq });
        }
        let next = **seq + 1;
        let mut delta = StatsDeltaBuilder::default();
        for id in &changed {
            match &pending[id] {
                Pending::Whole { old, new } => {
                    if let Some((old, _)) = old {
                        delta.add_doc(old, -1);
                    }
                    let old_head = old.as_ref().map(|(_, head)| head);
                    match new {
                        Some(doc) => {
                            delta.add_doc(doc, 1);
                            self.rows.put(&mut batch, id, doc, old_head)?;
                        }
                        None => {
                            if let Some(head) = old_head {
                                self.rows.delete(&mut batch, id, head);
                            }
                        }
                    }
                }
                Pending::Fields(p) => {
                    for (name, before) in &p.before {
                        if let Some(v) = before {
                            delta.add_field(name, v, -1);
                        }
                        if let Some(v) = p.doc.get(name) {
                            delta.add_field(name, v, 1);
                        }
                    }
                    let touched: BTreeSet<String> = p.before.keys().cloned().collect();
                    self.rows.put_fields(&mut batch, id, &p.head, &p.doc, &touched)?;
                }
            }
        }
        let entry = LogEntry { ids: changed.clone(), stats: delta.build() };
        batch.insert(&self.meta, log_key(self.key, next), serde_json::to_vec(&entry).map_err(store_err)?);
        batch.insert(&self.meta, seq_key(self.key), next.to_be_bytes());
        phases.mark("prepare");
        batch.commit().map_err(store_err)?;
        phases.mark("commit");
        **seq = next;
        if let Some((stream, partition, through)) = advance {
            self.positions.lock().insert((stream, partition), through);
        }

        let mut columns = self.columns.write();
        phases.mark("wait");
        for id in changed {
            let mut whole = match pending.remove(&id) {
                Some(Pending::Whole { new, .. }) => new,
                Some(Pending::Fields(p)) => {
                    let Patching { mut doc, before, .. } = p;
                    let overlay: Overlay = before
                        .into_keys()
                        .map(|name| {
                            let value = doc.remove(&name);
                            (name, value)
                        })
                        .collect();
                    let fields: Doc = overlay.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect();
                    match columns.patch(&id, overlay) {
                        Some(slot) => {
                            self.search.add_patch(slot, fields)?;
                            continue;
                        }
                        // No live version in the column store (it always has one when the
                        // row store does): index the current document whole.
                        None => self.get(&id)?.map(Arc::new),
                    }
                }
                None => continue,
            };
            columns.remove(&id);
            if let Some(doc) = whole.take() {
                let slot = columns.append(&id, doc.clone())?;
                self.search.add(&id, slot, &doc)?;
            }
        }
        columns.apply_stats(&entry.stats);
        phases.mark("index");
        Ok(ShardWriteResult { statuses, seq: next })
    }

    /// Apply patch operations to a document being patched field by field: load the touched
    /// fields stored apart, remember their values before the batch, patch.
    fn patch_fields(&self, id: &str, p: &mut Patching, ops: &[basalt_common::doc::PatchOp]) -> Result<()> {
        for name in patched_fields(ops)? {
            if p.before.contains_key(&name) {
                continue;
            }
            if p.head.apart.contains_key(&name) && !p.doc.contains_key(&name) {
                let value = self.rows.apart_field(id, &name)?;
                p.doc.insert(name.clone(), value);
            }
            p.before.insert(name.clone(), p.doc.get(&name).cloned());
        }
        let outside = p.head.outside(&p.doc);
        apply_patch_partial(&mut p.doc, ops, &self.limits, outside)
    }

    pub fn stats(&self) -> SchemaStats {
        self.columns.read().stats().clone()
    }

    /// Statistics for planning: the integer and timestamp paths this shard scans in ascending
    /// order and, with `sketches`, distinct-value sketches per column, for planning joins. The
    /// sketches read every column value once, then stay until the live documents change by a
    /// tenth. The order is checked per block once, and across blocks again after any write
    /// (kept until the next one: planning a short query must not walk every block).
    pub fn planner_stats(&self, sketches: bool) -> Result<SchemaStats> {
        let (mut stats, version) = {
            let columns = self.columns.read();
            (columns.stats().clone(), columns.version())
        };
        let mut snapshot = None;
        let take_snapshot = || -> Result<Snapshot> {
            self.prebuild_tail()?;
            self.columns.write().snapshot()
        };
        if sketches {
            let live = self.live_docs() as u64;
            let cached = self.distinct.lock().clone();
            let sketches = match cached {
                Some((seen, sketches)) if seen.abs_diff(live) <= seen / 10 => sketches,
                _ => {
                    let taken = take_snapshot()?;
                    let sketches = Arc::new(distinct_sketches(&taken.blocks, &taken.deletions));
                    snapshot = Some(taken);
                    if let Some(c) = SKETCH_BUILDS.as_ref() {
                        c.inc();
                    }
                    *self.distinct.lock() = Some((live, sketches.clone()));
                    sketches
                }
            };
            stats.distinct = (*sketches).clone();
        }
        let cached = self.ascending.lock().clone();
        let ascending = match (cached, version) {
            (Some((seen, paths)), Some(now)) if seen == now => paths,
            _ => {
                let snapshot = match snapshot {
                    Some(s) => s,
                    None => take_snapshot()?,
                };
                let candidates = snapshot.stats.fields.keys().filter_map(|path| {
                    let ty = match snapshot.stats.pure_kind(path)? {
                        Kind::Int => ColumnType::Int64,
                        Kind::Timestamp => ColumnType::Timestamp,
                        _ => return None,
                    };
                    Some((path.clone(), ty))
                });
                let paths: Arc<Vec<String>> = Arc::new(
                    candidates
                        .filter(|(path, ty)| {
                            ascending_across(&snapshot.blocks, &snapshot.overlays, path, &ty.to_arrow())
                        })
                        .map(|(path, _)| path)
                        .collect(),
                );
                *self.ascending.lock() = version.map(|v| (v, paths.clone()));
                paths
            }
        };
        stats.ascending = ascending.iter().map(|path| (path.clone(), stats.doc_count)).collect();
        Ok(stats)
    }

    /// Flush and merge segments when the policy says so (always flush pending writes when
    /// `force`). Runs in the background; at most one pass per shard at a time.
    pub fn maintain(&self, policy: &FlushPolicy, force: bool) -> Result<Maintenance> {
        let mut manifest = self.manifest.lock();
        let mut report = Maintenance::default();
        if manifest.format == DROPPED {
            return Ok(report);
        }
        let seq_now = *self.seq.lock();
        let idle = {
            let mut last = self.last_change.lock();
            if last.0 != seq_now {
                *last = (seq_now, Instant::now());
            }
            last.1.elapsed() >= policy.idle
        };
        let slots_now = self.columns.read().next_slot();
        let pending = seq_now > manifest.seq;
        let due = force
            || slots_now.saturating_sub(manifest.next_slot) >= policy.max_rows
            || self.last_flush.lock().elapsed() >= policy.max_age;
        if pending && due {
            report.flush_phases = self.flush(&mut manifest)?;
            report.flushed = true;
            *self.last_flush.lock() = Instant::now();
        }
        self.compact(&mut manifest, policy, idle, &mut report)?;
        report.idle = idle;
        Ok(report)
    }

    /// Flush pending writes, merging nothing ([`crate::Leaf::shutdown`]): Some(whether there
    /// was anything to flush), or None when maintenance holds the shard (a merge under way).
    pub fn flush_for_shutdown(&self) -> Result<Option<bool>> {
        let Some(mut manifest) = self.manifest.try_lock_for(Duration::from_millis(100)) else {
            return Ok(None);
        };
        if manifest.format == DROPPED || *self.seq.lock() <= manifest.seq {
            return Ok(Some(false));
        }
        self.flush(&mut manifest)?;
        Ok(Some(true))
    }

    /// Seal the tails and write every block, index and the deletions not yet in the manifest,
    /// then the manifest, then drop the log it covers.
    fn flush(&self, manifest: &mut Manifest) -> Result<String> {
        let mut phases = Phases::new();
        // The expensive part of sealing, done before taking the writer lock so writes do not
        // stall behind it: commit the search tail (the seal then commits only what arrives
        // meanwhile) and build the column tail into a block (the seal concatenates).
        self.search.refresh()?;
        phases.mark("refresh");
        self.prebuild_tail()?;
        phases.mark("prebuild");
        let (seq, blocks, deletions, stats, next_slot, job, patches) = {
            let seq = self.seq.lock();
            let mut columns = self.columns.write();
            columns.seal_tail()?;
            let job = self.search.seal(columns.next_slot())?;
            (
                *seq,
                columns.sealed_blocks(),
                columns.deletions().clone(),
                columns.stats().clone(),
                columns.next_slot(),
                job,
                columns.take_dirty_overlays(),
            )
        };
        phases.mark("seal");
        let mut next = manifest.clone();
        next.generation += 1;
        next.seq = seq;
        next.next_slot = next_slot;
        next.stats = stats;
        let written = (|| -> Result<()> {
            if let Some(job) = job {
                self.search.finish_seal(job)?;
            }
            phases.mark("index");
            self.write_refs(manifest, &mut next, &blocks)?;
            next.deletions = Some(self.segments.put_deletions(next.generation, &deletions)?);
            if !patches.is_empty() {
                next.patches.push(self.segments.put_patches(next.generation, &patches)?);
            }
            self.segments.put_manifest(&next)
        })();
        if let Err(e) = written {
            // The overlays taken must go into the next flush's patch file.
            self.columns.write().mark_dirty(patches.iter().map(|(slot, _)| *slot));
            return Err(e);
        }
        self.truncate_log(seq)?;
        if let Err(e) = self.segments.delete_replaced(manifest, &next) {
            tracing::warn!(shard = %keyspace_name(self.key), error = %e, "could not delete replaced segment objects");
        }
        phases.mark("write");
        tracing::debug!(shard = %keyspace_name(self.key), seq, next_slot, "flushed");
        *manifest = next;
        Ok(phases.summary())
    }

    /// Set `next`'s block and index lists to the in-memory ones below `next.next_slot`, writing
    /// those `old` does not have (a block's slot range fixes its content; an index knows where
    /// it is stored).
    fn write_refs(&self, old: &Manifest, next: &mut Manifest, blocks: &[Arc<Block>]) -> Result<()> {
        let g = next.generation;
        next.blocks = Vec::new();
        for b in blocks.iter().filter(|b| b.base_slot + b.rows as u64 <= next.next_slot) {
            match old.blocks.iter().find(|r| r.base_slot == b.base_slot && r.rows == b.rows) {
                Some(r) => next.blocks.push(r.clone()),
                None => {
                    let r = self.segments.put_block(g, b)?;
                    // From now on the block is read from its file's pages, not the heap.
                    match self.segments.load_block(&r) {
                        Ok(mapped) => {
                            self.columns.write().replace_blocks(std::slice::from_ref(b), Arc::new(mapped));
                        }
                        Err(e) => {
                            tracing::warn!(shard = %keyspace_name(self.key), block = %r.path, error = %e, "stored block could not be mapped; it stays in memory");
                        }
                    }
                    next.blocks.push(r);
                }
            }
        }
        next.indexes = Vec::new();
        for ix in self.search.sealed().iter().filter(|ix| ix.end_slot <= next.next_slot) {
            let stored = ix.stored().and_then(|dir| old.indexes.iter().find(|r| r.dir == dir));
            match stored {
                Some(r) => next.indexes.push(r.clone()),
                None => {
                    let r = self.segments.put_index(g, ix)?;
                    match self.segments.map_index(&r, ix) {
                        Ok(mapped) => {
                            self.search.replace_sealed(ix, Arc::new(mapped));
                        }
                        Err(e) => {
                            tracing::warn!(shard = %keyspace_name(self.key), index = %r.dir, error = %e, "stored search index could not be mapped; it stays in memory");
                        }
                    }
                    next.indexes.push(r);
                }
            }
        }
        Ok(())
    }

    /// Merge short adjacent blocks and too many (or mostly dead) search indexes, among those
    /// the manifest already holds, then write a manifest naming the results.
    fn compact(
        &self,
        manifest: &mut Manifest,
        policy: &FlushPolicy,
        idle: bool,
        report: &mut Maintenance,
    ) -> Result<()> {
        let covered = manifest.next_slot;
        // Blocks: runs of adjacent sealed blocks that fit in one block together.
        let blocks: Vec<Arc<Block>> = self
            .columns
            .read()
            .sealed_blocks()
            .into_iter()
            .filter(|b| b.base_slot + b.rows as u64 <= covered)
            .collect();
        let mut runs: Vec<Vec<Arc<Block>>> = Vec::new();
        let mut run: Vec<Arc<Block>> = Vec::new();
        for b in blocks {
            if run.iter().map(|r| r.rows).sum::<usize>() + b.rows > BLOCK_ROWS {
                runs.push(std::mem::take(&mut run));
            }
            run.push(b);
        }
        runs.push(run);
        for run in runs.into_iter().filter(|r| r.len() > 1) {
            if let Some(merged) = Block::concat(&run)?
                && self.columns.write().replace_blocks(&run, Arc::new(merged))
            {
                report.blocks_merged += run.len();
            }
        }
        // Indexes: rewrite mostly-dead ones and ones of too many segments alone (on an idle
        // shard: any of several segments, one per pass), then merge the smallest adjacent pairs.
        let deletions: Deletions = self.columns.read().deletions().clone();
        let is_dead = |slot: u64| deletions.is_deleted(slot);
        let covered_indexes = || -> Vec<Arc<crate::search::Sealed>> {
            self.search.sealed().into_iter().filter(|ix| ix.end_slot <= covered).collect()
        };
        for ix in covered_indexes() {
            let live = (ix.end_slot - ix.base_slot).saturating_sub(deletions.count(ix.base_slot, ix.end_slot));
            let docs = ix.max_doc();
            // Patch documents of older slots count as live: only deletions make an index
            // worth rewriting alone.
            let segments = ix.segments();
            if (docs >= 1024 && docs > 2 * (live + ix.outside())) || segments > policy.max_index_segments.max(1) {
                self.search.merge(std::slice::from_ref(&ix), is_dead)?;
                report.indexes_merged += 1;
            }
        }
        if idle
            && report.indexes_merged == 0
            && let Some(ix) = covered_indexes().into_iter().find(|ix| ix.segments() > 1)
        {
            self.search.merge(std::slice::from_ref(&ix), is_dead)?;
            report.indexes_merged += 1;
        }
        // Too many indexes: merge the adjacent run of up to `merge_width` with the fewest
        // documents, until an idle shard has `max_indexes` (a busy one, `max_indexes_busy`).
        let target = policy.max_indexes.max(1);
        let cap = if idle { target } else { policy.max_indexes_busy.max(target) };
        loop {
            let indexes = covered_indexes();
            if indexes.len() <= cap {
                break;
            }
            // Down to `target` at most: a busy shard merges a whole run at once, so it is not
            // back over its cap at the next flush.
            let width = policy.merge_width.max(2).min(indexes.len() + 1 - target);
            let sizes: Vec<u64> = indexes.iter().map(|ix| ix.max_doc()).collect();
            let Some(i) = (0..=indexes.len() - width).min_by_key(|i| sizes[*i..*i + width].iter().sum::<u64>()) else {
                break;
            };
            self.search.merge(&indexes[i..i + width], is_dead)?;
            report.indexes_merged += width;
        }
        // Patch files: once there are many, one file of every live overlay replaces them. It
        // may hold overlays newer than the manifest; their ids are in the log after it, and
        // replay writes those documents whole, dropping the overlay.
        let patches = (manifest.patches.len() > MAX_PATCH_FILES).then(|| self.columns.read().overlays());
        if report.blocks_merged == 0 && report.indexes_merged == 0 && patches.is_none() {
            return Ok(());
        }
        let mut next = manifest.clone();
        next.generation += 1;
        if let Some(overlays) = patches {
            let entries: Vec<(u64, Arc<Overlay>)> = overlays.iter().map(|(slot, o)| (slot, o.clone())).collect();
            next.patches = vec![self.segments.put_patches(next.generation, &entries)?];
            report.patch_files_merged = manifest.patches.len();
        }
        let blocks = self.columns.read().sealed_blocks();
        self.write_refs(manifest, &mut next, &blocks)?;
        self.segments.put_manifest(&next)?;
        if let Err(e) = self.segments.delete_replaced(manifest, &next) {
            tracing::warn!(shard = %keyspace_name(self.key), error = %e, "could not delete replaced segment objects");
        }
        *manifest = next;
        Ok(())
    }

    /// Whether each sealed block and each sealed index is read from mapped segment files.
    #[cfg(test)]
    pub fn mapped_for_tests(&self) -> (Vec<bool>, Vec<bool>) {
        let blocks = self.columns.read().sealed_blocks().iter().map(|b| b.is_mapped()).collect();
        (blocks, self.search.sealed().iter().map(|ix| ix.is_mapped()).collect())
    }

    #[cfg(test)]
    pub fn index_segments_for_tests(&self) -> Vec<usize> {
        self.search.sealed().iter().map(|ix| ix.segments()).collect()
    }

    #[cfg(test)]
    pub fn search_slots_for_tests(&self, filter: &Filter) -> Vec<u64> {
        self.search.candidate_slots(&[filter], false).expect("search").into_iter().map(|(slot, _)| slot).collect()
    }

    #[cfg(test)]
    pub fn manifest_for_tests(&self) -> Manifest {
        self.manifest.lock().clone()
    }

    #[cfg(test)]
    pub fn opened_from_for_tests(&self) -> &'static str {
        self.opened_from
    }

    /// Drop log entries up to `seq` (a later replay would skip them anyway).
    fn truncate_log(&self, seq: u64) -> Result<()> {
        let mut batch = self.db.batch();
        for item in self.meta.prefix(log_prefix(self.key)) {
            let k = item.key().map_err(store_err)?;
            match log_seq(&k) {
                Some(s) if s > seq => break,
                _ => batch.remove(&self.meta, k.to_vec()),
            }
        }
        batch.commit().map_err(store_err)
    }

    /// Delete the shard's segments and log (the collection is being dropped); maintenance
    /// passes after this do nothing.
    pub fn destroy(&self) -> Result<()> {
        let mut manifest = self.manifest.lock();
        manifest.format = DROPPED;
        self.segments.delete_all()?;
        self.truncate_log(u64::MAX)?;
        let mut batch = self.db.batch();
        for item in self.meta.prefix(position_prefix(self.key)) {
            batch.remove(&self.meta, item.key().map_err(store_err)?.to_vec());
        }
        batch.commit().map_err(store_err)
    }

    /// Build the column tail's new documents into a block holding only a read lock (writers
    /// go on meanwhile), then add it under the write lock.
    fn prebuild_tail(&self) -> Result<()> {
        let (base, docs) = self.columns.read().unbuilt_tail();
        if !docs.is_empty() {
            let block = Block::build(base, &docs)?;
            self.columns.write().add_tail_block(block)?;
        }
        Ok(())
    }

    /// Run a scan, sending batches to `emit` until it returns false.
    pub fn scan(&self, req: &ScanRequest, mut emit: impl FnMut(RecordBatch) -> bool) -> Result<AccessPath> {
        let mut cursor = self.open_scan(req.clone())?;
        while let Some(batch) = cursor.next_batch()? {
            if !emit(batch) {
                break;
            }
        }
        Ok(cursor.access())
    }

    /// Open a scan: the snapshot it reads, the access path, and what the search index or the
    /// row store found; the batches are then computed one by one as the cursor is asked for
    /// them ([`ScanCursor::next_batch`]), on the consumer's thread.
    pub fn open_scan(&self, req: ScanRequest) -> Result<ScanCursor> {
        if req.limit == Some(0) {
            return Ok(ScanCursor::finished(req, AccessPath::ColumnScan, vec![]));
        }
        // The snapshot then only merges blocks under the writer-blocking lock.
        self.prebuild_tail()?;
        let snapshot = self.columns.write().snapshot()?;
        let access = self.access_path(&req, &snapshot.stats);
        let limit = req.limit;
        let Some(path) = req.ordered_by.clone() else { return self.cursor(req, snapshot, access, limit) };
        // Blocks and the rows the index finds come in slot order: in the promised order when
        // the column ascends down the blocks (it did when the query was planned; writes since
        // may have broken it). Row-store lookups come in the order of their ids.
        let ty = req.columns.iter().find(|(name, _)| *name == path).map(|(_, ty)| ty.to_arrow());
        let in_order = access != AccessPath::RowLookup
            && ty.is_some_and(|ty| ascending_across(&snapshot.blocks, &snapshot.overlays, &path, &ty));
        if in_order {
            return self.cursor(req, snapshot, access, limit);
        }
        // Otherwise every row the filters keep is sorted here, then limited.
        let (mut batches, mut bytes) = (Vec::new(), 0usize);
        let mut all = self.cursor(req, snapshot, access, None)?;
        while let Some(batch) = all.next_batch()? {
            bytes += batch.get_array_memory_size();
            batches.push(batch);
            if bytes > MAX_SORTED_SCAN_BYTES {
                return Err(BasaltError::limit(format!(
                    "a scan planned in the order of {path} found it out of order (written since) and would \
                     sort over {MAX_SORTED_SCAN_BYTES} bytes; run the query again"
                )));
            }
        }
        let sorted = sorted_rows(batches, &path, limit)?;
        Ok(ScanCursor::finished(all.req, access, sorted))
    }

    /// A cursor over one snapshot by `access`: the first `limit` rows in slot order.
    fn cursor(
        &self,
        req: ScanRequest,
        snapshot: Snapshot,
        access: AccessPath,
        limit: Option<usize>,
    ) -> Result<ScanCursor> {
        let out_type = |name: &str, ty: &ColumnType| match ty {
            ColumnType::Utf8 if req.text_codes.iter().any(|c| c == name) => {
                DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8))
            }
            ColumnType::Utf8 if req.text_views => DataType::Utf8View,
            other => other.to_arrow(),
        };
        let schema: SchemaRef = Arc::new(Schema::new(
            req.columns.iter().map(|(name, ty)| Field::new(name, out_type(name, ty), true)).collect::<Vec<_>>(),
        ));
        let wants_score = req.columns.iter().any(|(n, _)| n == SCORE_COLUMN);
        let mut scores: HashMap<u64, f32> = HashMap::new();
        let mut paths: Vec<&str> = schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| *n != SCORE_COLUMN && *n != SELECTED_COLUMN)
            .collect();
        req.filters.iter().for_each(|f| filter_paths(f, &mut paths));
        let paths: Vec<String> = paths.into_iter().map(str::to_string).collect();
        let every: Vec<usize> = (0..req.filters.len()).collect();
        let (work, checked) = match access {
            AccessPath::RowLookup => {
                let ids = id_lookup(&req.filters).unwrap_or_default();
                let mut docs = Vec::new();
                for id in &ids {
                    if let Some(doc) = self.get(id)? {
                        docs.push(Arc::new(doc));
                    }
                }
                let work = if docs.is_empty() {
                    vec![]
                } else {
                    vec![Work::Current(Box::new(Block::build(0, &docs)?.transient()))]
                };
                (work, every)
            }
            AccessPath::SearchIndex => {
                let (indexed, mut rest): (Vec<&Filter>, Vec<&Filter>) =
                    req.filters.iter().partition(|f| index_answerable(f, &snapshot.stats));
                let (indexed, broad) = self.without_broad_lists(indexed)?;
                let checked = broad.len();
                rest.extend(broad);
                let started = std::time::Instant::now();
                let hits = if snapshot.overlays.is_empty() {
                    self.search.matching_slots(&indexed, wants_score)?
                } else {
                    // With patches the index gives candidates; every filter is checked on the
                    // current values.
                    rest = req.filters.iter().collect();
                    self.search.candidate_slots(&indexed, wants_score)?
                };
                tracing::debug!(
                    searched = %indexed.iter().map(|f| short(f)).collect::<Vec<_>>().join(" AND "),
                    checked,
                    hits = hits.len(),
                    us = started.elapsed().as_micros() as u64,
                    "index search"
                );
                if wants_score {
                    scores = hits.iter().copied().collect();
                }
                let slots: Vec<u64> = hits.into_iter().map(|(slot, _)| slot).collect();
                let mut work = Vec::new();
                let mut i = 0;
                for block in &snapshot.blocks {
                    let end = block.base_slot + block.rows as u64;
                    let mut rows = Vec::new();
                    while i < slots.len() && slots[i] < end {
                        if slots[i] >= block.base_slot {
                            rows.push((slots[i] - block.base_slot) as u32);
                        }
                        i += 1;
                    }
                    if !rows.is_empty() {
                        work.push(Work::Stored(block.clone(), Some(rows)));
                    }
                }
                // The filters left to check, by position in the request.
                let checked = (0..req.filters.len())
                    .filter(|&i| rest.iter().any(|f| std::ptr::eq(*f, &req.filters[i])))
                    .collect();
                (work, checked)
            }
            AccessPath::ColumnScan => {
                (snapshot.blocks.iter().map(|block| Work::Stored(block.clone(), None)).collect(), every)
            }
        };
        Ok(ScanCursor {
            access,
            checked,
            paths,
            scores,
            sets: InSets::default(),
            work: work.into_iter(),
            remaining: limit.unwrap_or(usize::MAX),
            batcher: Batcher::new(schema),
            snapshot: Some(snapshot),
            req,
            epoch: crate::columns::ScanEpoch::begin(),
        })
    }

    /// How selective `filters` are here: live documents and the search index's count for the
    /// filters it can answer.
    pub fn estimate(&self, filters: &[Filter]) -> Result<basalt_common::api::Estimate> {
        let stats = self.stats();
        let indexed: Vec<&Filter> = filters.iter().filter(|f| index_answerable(f, &stats)).collect();
        let index_matches = if indexed.is_empty() { None } else { Some(self.search.count(&indexed)?) };
        Ok(basalt_common::api::Estimate { live_docs: self.live_docs() as u64, index_matches })
    }

    /// The index-answerable filters to search for, and those (`IN` lists matching many more
    /// documents than the most selective list, or long ones) better checked on the rows found:
    /// a union of many terms' postings is costly to intersect. SSB star q2.2 at SF 1: 1,600 parts' keys
    /// (48,000 rows) searched together with 400 suppliers' keys (1.2M rows) took 4x the column
    /// scan; the supplier list checked on the 48,000 rows costs next to nothing.
    pub(crate) fn without_broad_lists<'f>(
        &self,
        indexed: Vec<&'f Filter>,
    ) -> Result<(Vec<&'f Filter>, Vec<&'f Filter>)> {
        // With fewer than two lists there is nothing to choose between.
        if indexed.len() < 2 || indexed.iter().filter(|f| matches!(f, Filter::In { .. })).count() < 2 {
            return Ok((indexed, vec![]));
        }
        let crate::search::ListPostings { per_filter: postings, segments } = self.search.list_postings(&indexed)?;
        // The list to search is the cheapest to read: its postings, and a dictionary lookup
        // per key in every index segment.
        let segments = segments as u64;
        let cost = |f: &Filter, n: u64| {
            let keys = if let Filter::In { values, .. } = f { values.len() as u64 } else { 1 };
            n.saturating_add(keys.saturating_mul(segments).saturating_mul(LOOKUP_POSTINGS))
        };
        let Some((best, least)) = postings
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.map(|n| (i, n)))
            .min_by_key(|(i, n)| cost(indexed[*i], *n))
        else {
            return Ok((indexed, vec![]));
        };
        let (mut keep, mut broad) = (vec![], vec![]);
        for (i, (f, n)) in indexed.into_iter().zip(postings).enumerate() {
            // Filters other than lists (a term, a text search) stay: intersecting them is cheap.
            // Besides the most selective list, a list stays only when it is short and about as
            // selective: each of its keys is a dictionary lookup in every index.
            let long = matches!(f, Filter::In { values, .. } if values.len() > EXTRA_LIST_MAX_KEYS);
            match n {
                Some(n) if i != best && (long || n > least.saturating_mul(BROAD_LIST_FACTOR)) => broad.push(f),
                _ => keep.push(f),
            }
        }
        Ok((keep, broad))
    }

    /// The access path for a request: the aggregator's choice when this shard can serve it.
    pub fn access_path(&self, req: &ScanRequest, stats: &SchemaStats) -> AccessPath {
        let chosen = choose_access_path(&req.filters, req.hint, stats);
        if chosen == AccessPath::SearchIndex && !req.filters.iter().any(|f| index_answerable(f, stats)) {
            return AccessPath::ColumnScan;
        }
        // Past this many ids a scan is cheaper than as many lookups (and bounded in memory).
        if chosen == AccessPath::RowLookup && id_lookup(&req.filters).is_some_and(|ids| ids.len() > MAX_LOOKUP_IDS) {
            return AccessPath::ColumnScan;
        }
        chosen
    }

    /// Commit the search index if it has uncommitted writes.
    pub fn refresh_index(&self) -> Result<()> {
        self.search.refresh()
    }

    pub fn live_docs(&self) -> usize {
        self.columns.read().live_docs()
    }
}

/// An `IN` list whose postings exceed the most selective list's this many times is checked on
/// the rows the index finds instead of searched ([`Shard::without_broad_lists`]).
const BROAD_LIST_FACTOR: u64 = 8;

/// What a term lookup in one index segment costs, in postings read: about a microsecond each
/// on SSB star q3.3 at SF 1 (1,180 customer keys in 8 segments, 24,000 rows: 8-12 ms), where
/// the 75 supplier keys' 22,500 rows take one.
const LOOKUP_POSTINGS: u64 = 8;

/// Lists other than the most selective one with more keys than this are checked on the rows
/// the index finds: SSB star q3.3 searched 1,180 customer keys (47,000 rows) next to 75
/// supplier keys (45,000 rows).
const EXTRA_LIST_MAX_KEYS: usize = 64;

/// The most ids one scan looks up in the row store; more are found by scanning.
const MAX_LOOKUP_IDS: usize = 100_000;

fn load_positions(meta: &fjall::Keyspace, key: ShardKey) -> Result<HashMap<(u64, i32), i64>> {
    let prefix = position_prefix(key);
    let mut out = HashMap::new();
    for item in meta.prefix(&prefix) {
        let (k, v) = item.into_inner().map_err(store_err)?;
        let rest = &k[prefix.len()..];
        let (Ok(stream), Ok(partition), Ok(through)) = (
            rest.get(..8).unwrap_or_default().try_into().map(u64::from_be_bytes),
            rest.get(8..12).unwrap_or_default().try_into().map(i32::from_be_bytes),
            v.as_ref().try_into().map(i64::from_be_bytes),
        ) else {
            return Err(store_err("bad source position entry"));
        };
        out.insert((stream, partition), through);
    }
    Ok(out)
}

fn position_prefix(key: ShardKey) -> Vec<u8> {
    format!("pos/{}/", keyspace_name(key)).into_bytes()
}

/// Where a shard records how far it applied one partition of a source.
fn position_key(key: ShardKey, stream: u64, partition: i32) -> Vec<u8> {
    let mut k = position_prefix(key);
    k.extend_from_slice(&stream.to_be_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn seq_key(key: ShardKey) -> Vec<u8> {
    format!("seq/{}", keyspace_name(key)).into_bytes()
}

/// Rows per batch a scan aims for: small batches (index hits, selective filters) are gathered
/// up to this before they go to the consumer, so a scan with hits in many blocks sends a few
/// batches, not one per block.
const SCAN_BATCH_ROWS: usize = 8192;

/// The most a scan sorts in memory when a column it was planned to return in order is out of
/// order on this shard (see [`Shard::scan`]).
const MAX_SORTED_SCAN_BYTES: usize = 1 << 30;

/// The rows of `batches` in ascending order of column `path` (nulls last), the first `limit`
/// of them, in batches of [`SCAN_BATCH_ROWS`].
fn sorted_rows(batches: Vec<RecordBatch>, path: &str, limit: Option<usize>) -> Result<Vec<RecordBatch>> {
    let Some(schema) = batches.first().map(|b| b.schema()) else { return Ok(vec![]) };
    let all = arrow::compute::concat_batches(&schema, &batches)?;
    let column = all.column_by_name(path).ok_or_else(|| BasaltError::internal(format!("no column {path}")))?;
    let options = arrow::compute::SortOptions { descending: false, nulls_first: false };
    let order = arrow::compute::sort_to_indices(column, Some(options), limit)?;
    let sorted = arrow::compute::take_record_batch(&all, &order)?;
    Ok((0..sorted.num_rows())
        .step_by(SCAN_BATCH_ROWS)
        .map(|at| sorted.slice(at, SCAN_BATCH_ROWS.min(sorted.num_rows() - at)))
        .collect())
}

/// What a scan has left to read, in slot order.
enum Work {
    /// A stored block of the snapshot: all its rows, or these.
    Stored(Arc<Block>, Option<Vec<u32>>),
    /// Documents read from the row store: current by definition, so no deletion check.
    Current(Box<Block>),
}

/// An open scan ([`Shard::open_scan`]): each [`ScanCursor::next_batch`] filters and projects
/// the next blocks on the caller's thread, so the operators above read a block's columns while
/// they are still in that core's cache. (A scan on a thread of its own, sending batches to
/// the fragment's aggregate on another, ran TPC-H q1 at 112 ms or 165 ms depending on whether
/// the scheduler put the two threads on one core or two, changing every few seconds.)
pub struct ScanCursor {
    /// The request, owned: the filters' `IN` lists are prepared by address (`sets`).
    req: ScanRequest,
    access: AccessPath,
    /// Let go when the scan ends (`None`: nothing more to read).
    snapshot: Option<Snapshot>,
    /// The filters checked on each block's rows, by position in `req.filters`.
    checked: Vec<usize>,
    /// The columns read (the output's and the filters'): the ones a patch overlay must cover.
    paths: Vec<String>,
    scores: HashMap<u64, f32>,
    sets: InSets,
    work: std::vec::IntoIter<Work>,
    remaining: usize,
    /// Its schema is the scan's output schema.
    batcher: Batcher,
    /// Blocks read since it began keep their filter pieces while it builds its own.
    epoch: crate::columns::ScanEpoch,
}

impl ScanCursor {
    /// A cursor with nothing to read: these batches, then the end.
    fn finished(req: ScanRequest, access: AccessPath, batches: Vec<RecordBatch>) -> Self {
        let schema: SchemaRef = batches.first().map(|b| b.schema()).unwrap_or_else(|| Arc::new(Schema::empty()));
        let mut batcher = Batcher::new(schema);
        batcher.ready.extend(batches);
        ScanCursor {
            req,
            access,
            snapshot: None,
            checked: vec![],
            paths: vec![],
            scores: HashMap::new(),
            sets: InSets::default(),
            work: Vec::new().into_iter(),
            remaining: 0,
            batcher,
            epoch: crate::columns::ScanEpoch::begin(),
        }
    }

    /// The access path this scan reads by.
    pub fn access(&self) -> AccessPath {
        self.access
    }

    /// The next batch of rows, or `None` once the scan is over.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        let epoch = self.epoch;
        epoch.enter(|| self.next_batch_in_scan())
    }

    fn next_batch_in_scan(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if let Some(batch) = self.batcher.ready.pop_front() {
                return Ok(Some(batch));
            }
            if self.snapshot.is_none() {
                return Ok(None);
            }
            match self.work.next() {
                Some(work) if self.remaining > 0 => self.read(work)?,
                // The end: what is pending goes out, and the snapshot is let go.
                _ => {
                    self.batcher.flush()?;
                    self.snapshot = None;
                }
            }
        }
    }

    fn read(&mut self, work: Work) -> Result<()> {
        let Some(snapshot) = &self.snapshot else { return Ok(()) };
        let filters: Vec<&Filter> = self.checked.iter().filter_map(|&i| self.req.filters.get(i)).collect();
        let batch = match work {
            Work::Stored(block, rows) => {
                let overlays: &Overlays = &snapshot.overlays;
                let patched = !overlays.is_empty()
                    && overlays.range(block.base_slot, block.base_slot + block.rows as u64).next().is_some();
                if rows.is_none() && !patched && block_excluded(&self.req.filters, &block, &self.sets) {
                    return Ok(());
                }
                let view = if patched {
                    let paths: Vec<&str> = self.paths.iter().map(String::as_str).collect();
                    block.overlaid(overlays, &paths, &snapshot.stats)?
                } else {
                    None
                };
                let block = view.as_ref().unwrap_or(&block);
                project_filter(
                    block,
                    rows,
                    &filters,
                    &self.batcher.schema,
                    Some(&snapshot.deletions),
                    &self.scores,
                    &self.sets,
                )?
            }
            Work::Current(block) => {
                project_filter(&block, None, &filters, &self.batcher.schema, None, &self.scores, &self.sets)?
            }
        };
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = if batch.num_rows() > self.remaining { batch.slice(0, self.remaining) } else { batch };
        self.remaining -= batch.num_rows();
        self.batcher.push(batch)
    }
}

/// Gathers a scan's small batches up to [`SCAN_BATCH_ROWS`] rows; what is ready to go out
/// waits in `ready`, in order.
struct Batcher {
    schema: SchemaRef,
    pending: Vec<RecordBatch>,
    rows: usize,
    ready: std::collections::VecDeque<RecordBatch>,
}

impl Batcher {
    fn new(schema: SchemaRef) -> Self {
        Batcher { schema, pending: Vec::new(), rows: 0, ready: Default::default() }
    }

    /// Queue a batch. A batch of at least half the target (a block a broad filter kept most
    /// of) goes out as it is, after what is pending: gathering it would copy every column once
    /// more for nothing.
    fn push(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() >= SCAN_BATCH_ROWS / 2 {
            self.flush()?;
            self.ready.push_back(batch);
            return Ok(());
        }
        self.rows += batch.num_rows();
        self.pending.push(batch);
        if self.rows >= SCAN_BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let batch = match self.pending.len() {
            0 => return Ok(()),
            1 => self.pending.remove(0),
            _ => arrow::compute::concat_batches(&self.schema, &self.pending)?,
        };
        self.pending.clear();
        self.rows = 0;
        self.ready.push_back(batch);
        Ok(())
    }
}

/// Every path a filter reads.
fn filter_paths<'a>(f: &'a Filter, out: &mut Vec<&'a str>) {
    match f {
        Filter::And(items) | Filter::Or(items) => items.iter().for_each(|i| filter_paths(i, out)),
        Filter::Not(inner) => filter_paths(inner, out),
        Filter::Cmp { path, .. }
        | Filter::In { path, .. }
        | Filter::Search { path, .. }
        | Filter::Like { path, .. } => out.push(path),
        Filter::IsNull(path) | Filter::IsNotNull(path) => out.push(path),
        Filter::CmpDates { left, right, .. } | Filter::CmpFields { left, right, .. } => {
            out.extend([left.as_str(), right.as_str()])
        }
    }
}

/// Select rows of a block (all, or the given row numbers), drop deleted ones, apply filters,
/// and project to the requested columns and types. With row numbers (index hits), the block is
/// first narrowed to those rows, so the work is proportional to the hits, not the block.
/// A distinct-value sketch per column path.
type Sketches = BTreeMap<String, Sketch>;

/// A distinct-value sketch per scalar column over the live rows of `blocks`.
fn distinct_sketches(blocks: &[Arc<Block>], deletions: &Deletions) -> Sketches {
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Float64Type, Int64Type, TimestampMicrosecondType};
    let mut out = Sketches::new();
    for block in blocks {
        let start = block.base_slot;
        let any_deleted = deletions.any_in(start, start + block.rows as u64);
        let live = |i: usize| !any_deleted || !deletions.is_deleted(start + i as u64);
        for (path, array) in &block.columns {
            let sketch = match out.get_mut(path) {
                Some(s) => s,
                None => out.entry(path.clone()).or_default(),
            };
            let valid = |i: usize| array.is_valid(i) && live(i);
            match array.data_type() {
                DataType::Int64 => {
                    let a = array.as_primitive::<Int64Type>();
                    (0..a.len()).filter(|i| valid(*i)).for_each(|i| sketch.add_bytes(&a.value(i).to_le_bytes()));
                }
                DataType::Timestamp(_, _) => {
                    let a = array.as_primitive::<TimestampMicrosecondType>();
                    (0..a.len()).filter(|i| valid(*i)).for_each(|i| sketch.add_bytes(&a.value(i).to_le_bytes()));
                }
                DataType::Float64 => {
                    let a = array.as_primitive::<Float64Type>();
                    // An integral float counts as the integer (a block of only integers holds
                    // the same field as Int64).
                    (0..a.len()).filter(|i| valid(*i)).for_each(|i| {
                        let v = a.value(i);
                        if v.fract() == 0.0 && v.abs() < 9.0e15 {
                            sketch.add_bytes(&(v as i64).to_le_bytes());
                        } else {
                            sketch.add_bytes(&v.to_le_bytes());
                        }
                    });
                }
                DataType::Utf8 => {
                    let a = array.as_string::<i32>();
                    (0..a.len()).filter(|i| valid(*i)).for_each(|i| sketch.add_bytes(a.value(i).as_bytes()));
                }
                DataType::Boolean => {
                    let a = array.as_boolean();
                    (0..a.len()).filter(|i| valid(*i)).for_each(|i| sketch.add_bytes(&[u8::from(a.value(i))]));
                }
                _ => {}
            }
        }
    }
    out
}

/// The text column `name` of a block's kept rows as codes into its distinct values
/// (`ScanRequest::text_codes`): the block's dictionary when it has one (built once and kept,
/// as for filters), else each row its own code.
fn text_codes(block: &Block, name: &str, predicate: Option<&arrow::compute::FilterPredicate>) -> Result<ArrayRef> {
    use arrow::array::{DictionaryArray, UInt32Array};
    let kept = |column: ArrayRef| -> Result<ArrayRef> {
        Ok(match predicate {
            Some(p) => p.filter(&column)?,
            None => column,
        })
    };
    let dictionary = if block.is_transient() { None } else { block.text_dictionary(name) };
    let (keys, values): (UInt32Array, ArrayRef) = match dictionary {
        Some(d) => {
            let keys: ArrayRef =
                Arc::new(UInt32Array::new(d.codes.iter().map(|c| u32::from(*c)).collect(), d.nulls.clone()));
            let keys = arrow::array::AsArray::as_primitive::<arrow::datatypes::UInt32Type>(&kept(keys)?).clone();
            (keys, Arc::new(d.values.clone()))
        }
        None => {
            let text = kept(block.column_as(name, &DataType::Utf8)?)?;
            let rows = u32::try_from(text.len()).map_err(|_| BasaltError::internal("a block over 4G rows"))?;
            (UInt32Array::new((0..rows).collect(), text.logical_nulls()), text)
        }
    };
    Ok(Arc::new(DictionaryArray::<arrow::datatypes::UInt32Type>::try_new(keys, values)?))
}

/// A filter for a log line: lists cut after a few values.
fn short(f: &Filter) -> String {
    match f {
        Filter::In { path, values } if values.len() > 4 => format!("{path} IN ({} values)", values.len()),
        other => other.to_string(),
    }
}

fn project_filter(
    block: &Block,
    rows: Option<Vec<u32>>,
    filters: &[&Filter],
    schema: &SchemaRef,
    deletions: Option<&Deletions>,
    scores: &HashMap<u64, f32>,
    sets: &InSets,
) -> Result<RecordBatch> {
    let is_live = |slot: u64| deletions.is_none_or(|d| !d.is_deleted(slot));
    let narrowed;
    // Rows to keep before filters: None when every row of the block is live.
    let mut keep: Option<arrow::array::BooleanArray> = None;
    let mut filters = filters;
    let (block, slots): (&Block, Option<Vec<u64>>) = match rows {
        Some(rows) => {
            let mut live: Vec<u32> = rows
                .into_iter()
                .filter(|r| (*r as usize) < block.rows && is_live(block.base_slot + u64::from(*r)))
                .collect();
            if !filters.is_empty() && !live.is_empty() {
                // The filters first, on their own columns of these rows: the other columns
                // are taken only for the rows they keep (an index's rows checked against a
                // join's long key lists keep a few in a hundred).
                let mut paths = Vec::new();
                filters.iter().for_each(|f| filter_paths(f, &mut paths));
                let kept = select(filters, &block.take(&live, &paths)?, sets)?;
                live = live.iter().zip(kept.iter()).filter(|(_, k)| *k).map(|(r, _)| *r).collect();
                filters = &[];
            }
            let slots = live.iter().map(|r| block.base_slot + u64::from(*r)).collect();
            let paths: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            narrowed = block.take(&live, &paths)?;
            (&narrowed, Some(slots))
        }
        None => {
            let (start, end) = (block.base_slot, block.base_slot + block.rows as u64);
            if deletions.is_some_and(|d| d.any_in(start, end)) {
                keep = Some((start..end).map(|s| Some(is_live(s))).collect());
            }
            (block, None)
        }
    };
    if !filters.is_empty() {
        // Unknown (null) counts as false.
        let m = arrow::array::BooleanArray::new(select(filters, block, sets)?, None);
        keep = Some(match keep {
            Some(k) => and(&k, &m)?,
            None => m,
        });
    }
    // A reader that skips unselected rows itself gets a block keeping at least half of its
    // rows whole, with the selection (`SELECTED_COLUMN`): copying 98% of TPC-H q1's rows
    // column by column was a sixth of its leaves' time.
    let marks_selection = schema.fields().last().is_some_and(|f| f.name() == SELECTED_COLUMN);
    let selected = match keep.take() {
        Some(k) if marks_selection && slots.is_none() && 2 * k.true_count() >= k.len() => Some(k),
        other => {
            keep = other;
            None
        }
    };
    // The rows kept, prepared once for every column.
    let predicate = keep.as_ref().map(|keep| arrow::compute::FilterBuilder::new(keep).optimize().build());
    let rows = predicate.as_ref().map_or(block.rows, |p| p.count());
    let arrays: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            if marks_selection && f.name() == SELECTED_COLUMN {
                let all = || arrow::array::BooleanArray::new(arrow::buffer::BooleanBuffer::new_set(rows), None);
                return Ok(Arc::new(selected.clone().unwrap_or_else(all)) as ArrayRef);
            }
            let column = if f.name() == SCORE_COLUMN {
                let slot = |i: usize| slots.as_ref().map_or(block.base_slot + i as u64, |s| s[i]);
                let values: Float64Array =
                    (0..block.rows).map(|i| scores.get(&slot(i)).map(|v| f64::from(*v))).collect();
                Arc::new(values) as ArrayRef
            } else if matches!(f.data_type(), DataType::Dictionary(..)) {
                return text_codes(block, f.name(), predicate.as_ref());
            } else if f.data_type() == &DataType::Utf8View {
                // Views of the block's strings, made for the kept rows only (moving 16-byte
                // views instead of copying strings).
                let text = block.column_as(f.name(), &DataType::Utf8)?;
                return Ok(basalt_common::arrays::text_views_of(&text, keep.as_ref())?);
            } else {
                block.column_as(f.name(), f.data_type())?
            };
            Ok(match &predicate {
                Some(p) => p.filter(&column)?,
                None => column,
            })
        })
        .collect::<Result<_>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(RecordBatch::try_new_with_options(schema.clone(), arrays, &options)?)
}

#[cfg(test)]
mod batcher_tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::DataType;

    fn batch(schema: &SchemaRef, first: i64, rows: usize) -> RecordBatch {
        let values: Int64Array = (first..first + rows as i64).collect();
        RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).expect("batch")
    }

    #[test]
    fn small_batches_are_gathered_and_large_ones_pass_as_they_are() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let mut sink = Batcher::new(schema.clone());
        let mut next = 0i64;
        for rows in [100, 200, SCAN_BATCH_ROWS / 2, 50, SCAN_BATCH_ROWS - 100, 300, SCAN_BATCH_ROWS, 10] {
            sink.push(batch(&schema, next, rows)).expect("push");
            next += rows as i64;
        }
        sink.flush().expect("flush");
        let out: Vec<RecordBatch> = sink.ready.into_iter().collect();
        let sizes: Vec<usize> = out.iter().map(RecordBatch::num_rows).collect();
        // Pending small batches go out before a large one, so the order holds.
        assert_eq!(sizes, vec![300, SCAN_BATCH_ROWS / 2, 50, SCAN_BATCH_ROWS - 100, 300, SCAN_BATCH_ROWS, 10]);
        let all: Vec<i64> = out
            .iter()
            .flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().expect("ints").values().to_vec())
            .collect();
        assert_eq!(all, (0..next).collect::<Vec<_>>());
    }
}
