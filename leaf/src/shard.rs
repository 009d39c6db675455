//! One shard of one collection: the row store (fjall keyspace, document by `_id`), the column
//! store and the search index, kept in step by one writer at a time.
//!
//! Durability: a write batch is committed to fjall's journal with fsync (documents and the shard
//! sequence number in one atomic batch) before it touches the in-memory indexes and before it is
//! acknowledged. On open, the column store and search index are rebuilt from the row store.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch};
use arrow::compute::{and, filter_record_batch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use basalt_common::api::{DocStatus, SCORE_COLUMN, ScanRequest, ShardWriteResult, WriteOp};
use basalt_common::doc::{Doc, DocLimits, apply_patch};
use basalt_common::filter::{AccessPath, Filter, choose_access_path, id_lookup, index_answerable};
use basalt_common::schema::SchemaStats;
use basalt_common::{BasaltError, Result};
use parking_lot::{Mutex, RwLock};

use crate::columns::{Block, ColumnStore, Deletions};
use crate::eval::{block_excluded, eval_all};
use crate::search::SearchIndex;

pub type ShardKey = (u64, u32);

pub fn keyspace_name(key: ShardKey) -> String {
    format!("c{}_s{}", key.0, key.1)
}

fn store_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::internal(format!("row store: {e}"))
}

pub struct Shard {
    pub key: ShardKey,
    db: fjall::Database,
    docs: fjall::Keyspace,
    meta: fjall::Keyspace,
    /// Serializes writers; holds the last durable sequence number.
    seq: Mutex<u64>,
    columns: RwLock<ColumnStore>,
    search: SearchIndex,
    limits: DocLimits,
}

impl Shard {
    /// Open a shard and rebuild its in-memory indexes from the row store.
    pub fn open(db: &fjall::Database, meta: &fjall::Keyspace, key: ShardKey, limits: DocLimits) -> Result<Shard> {
        let docs = db.keyspace(&keyspace_name(key), fjall::KeyspaceCreateOptions::default).map_err(store_err)?;
        let seq = match meta.get(seq_key(key)).map_err(store_err)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| store_err("bad sequence number"))?),
            None => 0,
        };
        let shard = Shard {
            key,
            db: db.clone(),
            docs,
            meta: meta.clone(),
            seq: Mutex::new(seq),
            columns: RwLock::new(ColumnStore::default()),
            search: SearchIndex::new()?,
            limits,
        };
        shard.rebuild()?;
        Ok(shard)
    }

    fn rebuild(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let mut columns = self.columns.write();
        let mut n = 0u64;
        for item in self.docs.iter() {
            let (k, v) = item.into_inner().map_err(store_err)?;
            let id = String::from_utf8(k.to_vec()).map_err(store_err)?;
            let doc: Doc = serde_json::from_slice(&v).map_err(store_err)?;
            let doc = Arc::new(doc);
            let slot = columns.append(&id, doc.clone())?;
            self.search.upsert(&id, false, Some(slot), Some(&doc))?;
            n += 1;
            if n.is_multiple_of(100_000) {
                tracing::info!(shard = %keyspace_name(self.key), docs = n, "recovering shard");
            }
        }
        self.search.refresh()?;
        tracing::info!(shard = %keyspace_name(self.key), docs = n, seq = *self.seq.lock(), elapsed_ms = started.elapsed().as_millis() as u64, "shard open");
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Doc>> {
        match self.docs.get(id).map_err(store_err)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(store_err)?)),
        }
    }

    /// Apply a batch of operations: per-document validation, one durable commit, then the
    /// in-memory indexes. Operations on the same `_id` apply in order.
    pub fn apply(&self, ops: Vec<WriteOp>) -> Result<ShardWriteResult> {
        let mut seq = self.seq.lock();
        // id -> (version before this batch, version after)
        let mut touched: HashMap<String, (Option<Doc>, Option<Doc>)> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut statuses = Vec::with_capacity(ops.len());
        for op in ops {
            let id = op.id().to_string();
            if id.is_empty() {
                statuses.push(DocStatus::error(None, BasaltError::invalid("document has no _id")));
                continue;
            }
            if !touched.contains_key(&id) {
                let old = self.get(&id)?;
                touched.insert(id.clone(), (old.clone(), old));
                order.push(id.clone());
            }
            let Some(entry) = touched.get_mut(&id) else { continue };
            let status = match op {
                WriteOp::Upsert { doc } => {
                    entry.1 = Some(doc);
                    DocStatus::ok(id)
                }
                WriteOp::Delete { .. } => {
                    entry.1 = None;
                    DocStatus::ok(id)
                }
                WriteOp::Patch { ops, .. } => match entry.1.as_mut() {
                    None => DocStatus::error(
                        Some(id.clone()),
                        BasaltError::not_found(format!("document {id} does not exist")),
                    ),
                    Some(doc) => match apply_patch(doc, &ops, &self.limits) {
                        Ok(()) => DocStatus::ok(id),
                        Err(e) => DocStatus::error(Some(id), e),
                    },
                },
            };
            statuses.push(status);
        }
        let changed: Vec<String> =
            order.into_iter().filter(|id| touched.get(id).is_some_and(|(a, b)| a != b)).collect();
        if changed.is_empty() {
            return Ok(ShardWriteResult { statuses, seq: *seq });
        }
        let next = *seq + 1;
        let mut batch = self.db.batch().durability(Some(fjall::PersistMode::SyncAll));
        for id in &changed {
            match &touched[id].1 {
                Some(doc) => batch.insert(&self.docs, id.as_bytes(), serde_json::to_vec(doc).map_err(store_err)?),
                None => batch.remove(&self.docs, id.as_bytes()),
            }
        }
        batch.insert(&self.meta, seq_key(self.key), next.to_be_bytes());
        batch.commit().map_err(store_err)?;
        *seq = next;

        let mut columns = self.columns.write();
        for id in changed {
            let Some((old, new)) = touched.remove(&id) else { continue };
            columns.remove(&id, old.as_ref());
            let replaces = old.is_some();
            match new {
                Some(doc) => {
                    let doc = Arc::new(doc);
                    let slot = columns.append(&id, doc.clone())?;
                    self.search.upsert(&id, replaces, Some(slot), Some(&doc))?;
                }
                None => self.search.upsert(&id, replaces, None, None)?,
            }
        }
        Ok(ShardWriteResult { statuses, seq: next })
    }

    pub fn stats(&self) -> SchemaStats {
        self.columns.read().stats().clone()
    }

    /// Run a scan, sending batches to `emit` until it returns false.
    pub fn scan(&self, req: &ScanRequest, mut emit: impl FnMut(RecordBatch) -> bool) -> Result<AccessPath> {
        let schema: SchemaRef = Arc::new(Schema::new(
            req.columns.iter().map(|(name, ty)| Field::new(name, ty.to_arrow(), true)).collect::<Vec<_>>(),
        ));
        let mut remaining = req.limit.unwrap_or(usize::MAX);
        if remaining == 0 {
            return Ok(AccessPath::ColumnScan);
        }
        let snapshot = self.columns.write().snapshot()?;
        let access = self.access_path(req, &snapshot.stats);
        let wants_score = req.columns.iter().any(|(n, _)| n == SCORE_COLUMN);
        let mut scores: HashMap<u64, f32> = HashMap::new();
        let mut out =
            |block: &Block, rows: Option<Vec<u32>>, filters: &[&Filter], scores: &HashMap<u64, f32>| -> Result<bool> {
                let batch = project_filter(block, rows, filters, &schema, Some(&snapshot.deletions), scores)?;
                if batch.num_rows() == 0 {
                    return Ok(true);
                }
                let batch = if batch.num_rows() > remaining { batch.slice(0, remaining) } else { batch };
                remaining -= batch.num_rows();
                Ok(emit(batch) && remaining > 0)
            };
        let all: Vec<&Filter> = req.filters.iter().collect();
        match access {
            AccessPath::RowLookup => {
                let ids = id_lookup(&req.filters).unwrap_or_default();
                let mut docs = Vec::new();
                for id in ids.iter().take(100_000) {
                    if let Some(doc) = self.get(id)? {
                        docs.push(Arc::new(doc));
                    }
                }
                if !docs.is_empty() {
                    // Row-store documents are current by definition: no deletion check.
                    let block = Block::build(0, &docs)?;
                    let batch = project_filter(&block, None, &all, &schema, None, &scores)?;
                    let batch = if batch.num_rows() > remaining { batch.slice(0, remaining) } else { batch };
                    if batch.num_rows() > 0 {
                        emit(batch);
                    }
                }
            }
            AccessPath::SearchIndex => {
                let (indexed, rest): (Vec<&Filter>, Vec<&Filter>) =
                    req.filters.iter().partition(|f| index_answerable(f, &snapshot.stats));
                let hits = self.search.matching_slots(&indexed, wants_score)?;
                if wants_score {
                    scores = hits.iter().copied().collect();
                }
                let slots: Vec<u64> = hits.into_iter().map(|(slot, _)| slot).collect();
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
                    if !rows.is_empty() && !out(block, Some(rows), &rest, &scores)? {
                        break;
                    }
                }
            }
            AccessPath::ColumnScan => {
                for block in &snapshot.blocks {
                    if block_excluded(&req.filters, block) {
                        continue;
                    }
                    if !out(block, None, &all, &scores)? {
                        break;
                    }
                }
            }
        }
        Ok(access)
    }

    /// The access path for a request: the aggregator's choice when this shard can serve it.
    pub fn access_path(&self, req: &ScanRequest, stats: &SchemaStats) -> AccessPath {
        let chosen = choose_access_path(&req.filters, req.hint, stats);
        if chosen == AccessPath::SearchIndex && !req.filters.iter().any(|f| index_answerable(f, stats)) {
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

fn seq_key(key: ShardKey) -> Vec<u8> {
    format!("seq/{}", keyspace_name(key)).into_bytes()
}

/// Every path a filter reads.
fn filter_paths<'a>(f: &'a Filter, out: &mut Vec<&'a str>) {
    match f {
        Filter::And(items) | Filter::Or(items) => items.iter().for_each(|i| filter_paths(i, out)),
        Filter::Not(inner) => filter_paths(inner, out),
        Filter::Cmp { path, .. } | Filter::In { path, .. } | Filter::Search { path, .. } => out.push(path),
        Filter::IsNull(path) | Filter::IsNotNull(path) => out.push(path),
    }
}

/// Select rows of a block (all, or the given row numbers), drop deleted ones, apply filters,
/// and project to the requested columns and types. With row numbers (index hits), the block is
/// first narrowed to those rows, so the work is proportional to the hits, not the block.
fn project_filter(
    block: &Block,
    rows: Option<Vec<u32>>,
    filters: &[&Filter],
    schema: &SchemaRef,
    deletions: Option<&Deletions>,
    scores: &HashMap<u64, f32>,
) -> Result<RecordBatch> {
    let is_live = |slot: u64| deletions.is_none_or(|d| !d.is_deleted(slot));
    let narrowed;
    let (block, slots): (&Block, Vec<u64>) = match rows {
        Some(rows) => {
            let live: Vec<u32> = rows
                .into_iter()
                .filter(|r| (*r as usize) < block.rows && is_live(block.base_slot + u64::from(*r)))
                .collect();
            let slots = live.iter().map(|r| block.base_slot + u64::from(*r)).collect();
            let mut paths: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            filters.iter().for_each(|f| filter_paths(f, &mut paths));
            narrowed = block.take(&live, &paths)?;
            (&narrowed, slots)
        }
        None => (block, (0..block.rows as u64).map(|r| block.base_slot + r).collect()),
    };
    let mut keep = arrow::array::BooleanArray::from(slots.iter().map(|s| is_live(*s)).collect::<Vec<bool>>());
    if !filters.is_empty() {
        let m = eval_all(filters, block)?;
        // Unknown (null) counts as false.
        let m = if m.null_count() > 0 { arrow::compute::prep_null_mask_filter(&m) } else { m };
        keep = and(&keep, &m)?;
    }
    let arrays: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == SCORE_COLUMN {
                let values: Float64Array = slots.iter().map(|s| scores.get(s).map(|v| f64::from(*v))).collect();
                return Ok(Arc::new(values) as ArrayRef);
            }
            block.column_as(f.name(), f.data_type())
        })
        .collect::<Result<_>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(block.rows));
    let batch = RecordBatch::try_new_with_options(schema.clone(), arrays, &options)?;
    Ok(filter_record_batch(&batch, &keep)?)
}
