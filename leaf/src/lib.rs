//! The leaf tier: owns shards and their converged index (row store, column store, search index)
//! and serves [`LeafApi`].
//!
//! Invariants: this crate is the only one that knows tantivy and fjall. It never parses SQL and
//! never talks to a client; it only answers shard writes, scans and statistics.

pub mod columns;
pub mod eval;
pub mod kernels;
pub mod rows;
pub mod search;
pub mod segments;
pub mod shard;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use basalt_common::api::{BatchStream, LeafApi, ScanRequest, ShardPosition, ShardWrite, ShardWriteResult};
use basalt_common::doc::DocLimits;
use basalt_common::schema::SchemaStats;
use basalt_common::{BasaltError, Result};
use futures::StreamExt;
use parking_lot::RwLock;
use prometheus::{
    IntCounter, IntCounterVec, IntGauge, register_int_counter, register_int_counter_vec, register_int_gauge,
};

pub use crate::shard::FlushPolicy;
use crate::shard::{Shard, ShardKey, keyspace_name};
pub use crate::store::SegmentStore;

// Registration fails only if a metric of the same name exists; then the leaf just does not count.
static WRITES: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!("basalt_leaf_write_ops_total", "Document operations applied by leaves", &["result"]).ok()
});
static SCANS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!("basalt_leaf_scans_total", "Shard scans by access path", &["access_path"]).ok()
});
/// Scans returning text columns as codes (`ScanRequest::text_codes`: partial aggregates grouped
/// by text, on the leaf).
static CODED_SCANS: LazyLock<Option<IntCounter>> = LazyLock::new(|| {
    register_int_counter!("basalt_leaf_coded_scans_total", "Shard scans returning text columns as codes").ok()
});
/// 1 once a maintenance pass found every shard idle (no writes for [`FlushPolicy::idle`]) with
/// nothing to flush or merge: what a load left behind is sealed and merged, and queries run
/// without merges beside them (benchmarks wait for it).
static MAINTENANCE_SETTLED: LazyLock<Option<IntGauge>> = LazyLock::new(|| {
    register_int_gauge!(
        "basalt_leaf_maintenance_settled",
        "1 when the last maintenance pass found every shard idle with nothing to flush or merge"
    )
    .ok()
});

static SEGMENT_OPS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "basalt_leaf_segment_ops_total",
        "Segment maintenance: flushes, blocks and indexes merged, failed passes",
        &["op"]
    )
    .ok()
});

/// How often the maintenance thread looks for shards to flush or merge: a quarter of the flush
/// age, within these bounds.
const MAINTENANCE_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(20);
const MAINTENANCE_INTERVAL_MAX: std::time::Duration = std::time::Duration::from_millis(1000);

/// How often the background thread commits search indexes that have new writes.
const INDEX_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct LeafConfig {
    /// Row store and write-ahead log (fjall).
    pub data_dir: PathBuf,
    /// Where immutable segments go: `s3://bucket/prefix`, `file:///dir` or a directory;
    /// `None` means `<data_dir>/segments`.
    pub segment_store: Option<String>,
    pub flush: FlushPolicy,
    pub limits: DocLimits,
    /// Flush and merge on a background thread every `flush.max_age / 4` (the default). Off,
    /// only [`Leaf::maintain_all`] does: tests of the merge policy's timing need that.
    pub background_maintenance: bool,
}

impl Default for LeafConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./basalt-data"),
            segment_store: None,
            flush: FlushPolicy::default(),
            limits: DocLimits::default(),
            background_maintenance: true,
        }
    }
}

/// What [`Leaf::shutdown`] did: shards flushed, skipped because a merge held them, failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    pub flushed: usize,
    pub busy: usize,
    pub failed: usize,
}

/// Handle to a leaf; cheap to clone.
#[derive(Clone)]
pub struct Leaf(Arc<LeafInner>);

pub struct LeafInner {
    db: fjall::Database,
    meta: fjall::Keyspace,
    shards: RwLock<HashMap<ShardKey, Arc<Shard>>>,
    /// Serializes shard creation and removal.
    lifecycle: parking_lot::Mutex<()>,
    limits: DocLimits,
    store: SegmentStore,
    flush: FlushPolicy,
    /// Set by [`Leaf::shutdown`]: background maintenance starts nothing new.
    stopping: std::sync::atomic::AtomicBool,
    /// See [`Leaf::settled`].
    settled: std::sync::atomic::AtomicBool,
}

fn store_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::internal(format!("leaf store: {e}"))
}

impl Leaf {
    /// Open the leaf's store and every shard in it (rebuilding their in-memory indexes).
    pub fn open(config: &LeafConfig) -> Result<Leaf> {
        let dir: &Path = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(store_err)?;
        let db = open_database(&dir.join("rows"))?;
        let meta = db.keyspace("leaf_meta", fjall::KeyspaceCreateOptions::default).map_err(store_err)?;
        let location = match &config.segment_store {
            Some(l) => l.clone(),
            None => dir.join("segments").to_string_lossy().to_string(),
        };
        let store = SegmentStore::open(&location, &dir.join("segment-cache"))?;
        let leaf = LeafInner {
            db,
            meta,
            shards: RwLock::new(HashMap::new()),
            lifecycle: parking_lot::Mutex::new(()),
            limits: config.limits.clone(),
            store,
            flush: config.flush.clone(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            settled: std::sync::atomic::AtomicBool::new(false),
        };
        let mut keys = Vec::new();
        for item in leaf.meta.prefix("shard/") {
            let k = item.key().map_err(store_err)?;
            let text = String::from_utf8_lossy(&k).to_string();
            if let Some((c, s)) = text.trim_start_matches("shard/").split_once('/')
                && let (Ok(c), Ok(s)) = (c.parse(), s.parse())
            {
                keys.push((c, s));
            }
        }
        for key in keys {
            let shard = Shard::open(&leaf.db, &leaf.meta, &leaf.store, key, leaf.limits.clone())?;
            leaf.shards.write().insert(key, Arc::new(shard));
        }
        tracing::info!(dir = %dir.display(), segments = %location, shards = leaf.shards.read().len(), "leaf open");
        let leaf = Leaf(Arc::new(leaf));
        leaf.spawn_index_refresher();
        if config.background_maintenance {
            leaf.spawn_maintenance();
        }
        Ok(leaf)
    }

    /// Flush and merge segments in the background (see [`FlushPolicy`]). Failures are logged
    /// and retried on the next pass; the write-ahead log keeps everything until a flush lands.
    fn spawn_maintenance(&self) {
        let weak = Arc::downgrade(&self.0);
        let interval = (self.0.flush.max_age / 4).clamp(MAINTENANCE_INTERVAL_MIN, MAINTENANCE_INTERVAL_MAX);
        let spawned = std::thread::Builder::new().name("segment-maintenance".into()).spawn(move || {
            loop {
                std::thread::sleep(interval);
                let Some(inner) = weak.upgrade() else { return };
                if inner.stopping.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                Leaf(inner).maintain_all(false);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no background segment maintenance; data stays in the write-ahead log");
        }
    }

    /// One maintenance pass over every shard (`force` flushes all pending writes). Returns the
    /// number of shards that failed.
    pub fn maintain_all(&self, force: bool) -> usize {
        let shards: Vec<Arc<Shard>> = self.0.shards.read().values().cloned().collect();
        let mut failed = 0;
        let mut settled = true;
        for shard in shards {
            if self.0.stopping.load(std::sync::atomic::Ordering::Acquire) {
                return failed;
            }
            let started = std::time::Instant::now();
            match shard.maintain(&self.0.flush, force) {
                Ok(report) => {
                    if let Some(ops) = SEGMENT_OPS.as_ref() {
                        ops.with_label_values(&["flush"]).inc_by(u64::from(report.flushed));
                        ops.with_label_values(&["block_merge"]).inc_by(report.blocks_merged as u64);
                        ops.with_label_values(&["index_merge"]).inc_by(report.indexes_merged as u64);
                    }
                    settled &= report.idle && !report.did_work();
                    if report.did_work() {
                        tracing::info!(
                            shard = %keyspace_name(shard.key),
                            flushed = report.flushed,
                            blocks_merged = report.blocks_merged,
                            indexes_merged = report.indexes_merged,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            flush = %report.flush_phases,
                            "segment maintenance"
                        );
                    }
                }
                Err(e) => {
                    failed += 1;
                    settled = false;
                    if let Some(ops) = SEGMENT_OPS.as_ref() {
                        ops.with_label_values(&["failed"]).inc();
                    }
                    tracing::warn!(shard = %keyspace_name(shard.key), error = %e, "segment maintenance failed");
                }
            }
        }
        self.0.settled.store(settled, std::sync::atomic::Ordering::Release);
        if let Some(gauge) = MAINTENANCE_SETTLED.as_ref() {
            gauge.set(i64::from(settled));
        }
        failed
    }

    /// Whether the last maintenance pass found every shard idle (no writes for
    /// [`FlushPolicy::idle`]) with nothing to flush or merge (metric
    /// `basalt_leaf_maintenance_settled`): what was written is sealed and merged, and queries
    /// run without merges beside them.
    pub fn settled(&self) -> bool {
        self.0.settled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Before the process exits: background maintenance stops (a merge under way finishes or
    /// dies with the process; segment files are written before the manifest names them), and
    /// each shard flushes the writes its segments do not hold yet, merging nothing. Neither is
    /// needed for durability (the write-ahead log has every write); the flush makes the next
    /// start replay less. Merges at shutdown made `basalt dev` take over a minute to stop after
    /// SSB SF 10's load (index merges of 97-135 s per shard). A shard busy in a merge is skipped.
    pub fn shutdown(&self) -> ShutdownReport {
        self.0.stopping.store(true, std::sync::atomic::Ordering::Release);
        let shards: Vec<Arc<Shard>> = self.0.shards.read().values().cloned().collect();
        let mut report = ShutdownReport::default();
        for shard in shards {
            match shard.flush_for_shutdown() {
                Ok(Some(true)) => report.flushed += 1,
                Ok(Some(false)) => {}
                Ok(None) => {
                    report.busy += 1;
                    tracing::info!(shard = %keyspace_name(shard.key), "not flushed at shutdown: a merge is under way (its writes are in the log)");
                }
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(shard = %keyspace_name(shard.key), error = %e, "flush at shutdown failed (its writes are in the log)");
                }
            }
        }
        report
    }

    /// Commit search indexes in the background so a query rarely pays for a commit itself
    /// (a query still commits first if anything is uncommitted: read-your-writes). The thread
    /// holds only a weak handle and ends with the leaf.
    fn spawn_index_refresher(&self) {
        let weak = Arc::downgrade(&self.0);
        let spawned = std::thread::Builder::new().name("index-refresh".into()).spawn(move || {
            while let Some(inner) = weak.upgrade() {
                let shards: Vec<Arc<Shard>> = inner.shards.read().values().cloned().collect();
                drop(inner);
                for shard in shards {
                    if let Err(e) = shard.refresh_index() {
                        tracing::warn!(shard = %keyspace_name(shard.key), error = %e, "search index refresh failed");
                    }
                }
                std::thread::sleep(INDEX_REFRESH_INTERVAL);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no background index refresh; queries will commit");
        }
    }

    fn shard(&self, key: ShardKey) -> Option<Arc<Shard>> {
        self.0.shards.read().get(&key).cloned()
    }

    fn shard_or_create(&self, key: ShardKey) -> Result<Arc<Shard>> {
        if let Some(s) = self.shard(key) {
            return Ok(s);
        }
        let _guard = self.0.lifecycle.lock();
        if let Some(s) = self.shard(key) {
            return Ok(s);
        }
        let mut batch = self.0.db.batch().durability(Some(fjall::PersistMode::SyncAll));
        batch.insert(&self.0.meta, format!("shard/{}/{}", key.0, key.1).into_bytes(), Vec::<u8>::new());
        batch.commit().map_err(store_err)?;
        let shard = Arc::new(Shard::open(&self.0.db, &self.0.meta, &self.0.store, key, self.0.limits.clone())?);
        self.0.shards.write().insert(key, shard.clone());
        Ok(shard)
    }

    fn drop_collection_blocking(&self, collection_id: u64) -> Result<()> {
        let _guard = self.0.lifecycle.lock();
        let doomed: Vec<ShardKey> = self.0.shards.read().keys().filter(|k| k.0 == collection_id).copied().collect();
        for key in doomed {
            let shard = self.0.shards.write().remove(&key);
            if let Some(shard) = shard {
                shard.destroy()?;
            }
            let mut batch = self.0.db.batch().durability(Some(fjall::PersistMode::SyncAll));
            batch.remove(&self.0.meta, format!("shard/{}/{}", key.0, key.1).into_bytes());
            batch.remove(&self.0.meta, format!("seq/{}", keyspace_name(key)).into_bytes());
            batch.commit().map_err(store_err)?;
            let ks =
                self.0.db.keyspace(&keyspace_name(key), fjall::KeyspaceCreateOptions::default).map_err(store_err)?;
            self.0.db.delete_keyspace(ks).map_err(store_err)?;
            tracing::info!(shard = %keyspace_name(key), "shard dropped");
        }
        Ok(())
    }

    /// Live documents per shard, for tests and diagnostics.
    pub fn live_docs(&self, collection_id: u64) -> usize {
        self.0.shards.read().iter().filter(|(k, _)| k.0 == collection_id).map(|(_, s)| s.live_docs()).sum()
    }
}

/// Open the row store, waiting up to five seconds for a previous holder of its lock (a process
/// that is exiting, or a background thread of a leaf being dropped) to let go.
fn open_database(path: &Path) -> Result<fjall::Database> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match fjall::Database::builder(path).open() {
            Err(fjall::Error::Locked) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.map_err(store_err),
        }
    }
}

/// `f`'s result, or the error a panic in it (a bug) becomes: a scan that panics fails its
/// query; it must not look like a scan that ended, whose reader would take the rows sent so far
/// for the whole answer.
fn unpanicked<T>(collection: u64, shard: u32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(collection, shard, %what, "scan panicked");
        Err(BasaltError::internal(format!("scan of shard {shard} failed: {what}")))
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| BasaltError::internal(format!("leaf task failed: {e}")))?
}

#[async_trait]
impl LeafApi for Leaf {
    fn in_process(&self) -> bool {
        true
    }

    async fn apply(&self, write: ShardWrite) -> Result<ShardWriteResult> {
        let leaf = self.clone();
        let result = blocking(move || {
            let shard = leaf.shard_or_create((write.collection_id, write.shard))?;
            shard.apply(write.ops, write.position)
        })
        .await?;
        let ok = result.statuses.iter().filter(|s| s.is_ok()).count() as u64;
        if let Some(writes) = WRITES.as_ref() {
            writes.with_label_values(&["ok"]).inc_by(ok);
            writes.with_label_values(&["error"]).inc_by(result.statuses.len() as u64 - ok);
        }
        Ok(result)
    }

    async fn scan(&self, request: ScanRequest) -> Result<BatchStream> {
        let Some(shard) = self.shard((request.collection_id, request.shard)) else {
            return Ok(futures::stream::empty().boxed()); // never written: empty
        };
        let (collection, shard_no) = (request.collection_id, request.shard);
        if !request.text_codes.is_empty()
            && let Some(coded) = CODED_SCANS.as_ref()
        {
            coded.inc();
        }
        // Opening takes the snapshot and searches the index: off the async workers. The
        // blocks are then read as the consumer asks for them, on its thread.
        let cursor = blocking(move || unpanicked(collection, shard_no, || shard.open_scan(request))).await?;
        if let Some(scans) = SCANS.as_ref() {
            scans.with_label_values(&[cursor.access().name()]).inc();
        }
        let batches = futures::stream::unfold(Some(cursor), move |cursor| async move {
            let mut cursor = cursor?;
            // Each batch is work done inside a poll: the worker is given back between batches,
            // so a task waiting on it (woken here into a slot no other worker takes: the other
            // partition of a join whose build side just finished) runs now, or is taken by the
            // idle worker, instead of after the whole scan. SSB star q3.1 took 24 or 40 ms as
            // its two partitions ran together or one after the other, now 23-25 (yielding every
            // fourth batch: 26-36).
            tokio::task::yield_now().await;
            match unpanicked(collection, shard_no, || cursor.next_batch()) {
                Ok(Some(batch)) => Some((Ok(batch), Some(cursor))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(batches.boxed())
    }

    async fn stats(&self, collection_id: u64, shards: Vec<u32>) -> Result<SchemaStats> {
        let mut out = SchemaStats::default();
        for s in shards {
            if let Some(shard) = self.shard((collection_id, s)) {
                out.merge(&shard.stats());
            }
        }
        Ok(out)
    }

    async fn planner_stats(&self, collection_id: u64, shards: Vec<u32>, sketches: bool) -> Result<SchemaStats> {
        let shards: Vec<_> = shards.into_iter().filter_map(|s| self.shard((collection_id, s))).collect();
        // Distinct-value sketches read columns the first time (then they are cached): off the
        // async workers.
        tokio::task::spawn_blocking(move || {
            let mut out = SchemaStats::default();
            for shard in shards {
                out.merge(&shard.planner_stats(sketches)?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| BasaltError::internal(format!("statistics task: {e}")))?
    }

    async fn estimate(
        &self,
        collection_id: u64,
        shards: Vec<u32>,
        filters: Vec<basalt_common::filter::Filter>,
    ) -> Result<basalt_common::api::Estimate> {
        let shards: Vec<_> = shards.into_iter().filter_map(|s| self.shard((collection_id, s))).collect();
        blocking(move || {
            let mut out = basalt_common::api::Estimate::default();
            for shard in shards {
                out.add(shard.estimate(&filters)?);
            }
            Ok(out)
        })
        .await
    }

    async fn drop_collection(&self, collection_id: u64) -> Result<()> {
        let leaf = self.clone();
        blocking(move || leaf.drop_collection_blocking(collection_id)).await
    }

    async fn positions(&self, collection_id: u64, shards: Vec<u32>, stream: u64) -> Result<Vec<ShardPosition>> {
        let mut out = Vec::new();
        for s in shards {
            if let Some(shard) = self.shard((collection_id, s)) {
                out.extend(shard.positions(stream).into_iter().map(|(partition, through)| ShardPosition {
                    shard: s,
                    partition,
                    through,
                }));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
