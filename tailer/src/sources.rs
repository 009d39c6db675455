//! Sources: Kafka partitions ingested with exactly-once effect.
//!
//! **Assignment.** Every tailer process renews a lease in the catalog each second
//! (`MetaApi::source_heartbeat`); the live members, sorted, split each source's partitions:
//! partition `p` of source `s` belongs to member `(p + s) mod n`. A member that stops renewing
//! loses its partitions to the others once its lease runs out.
//!
//! **Exactly once.** A partition worker reads a chunk of messages, routes the documents to
//! shards by `_id`, and sends *every* shard of the collection one write carrying the offsets of
//! its documents and the chunk's last offset ([`SourcePosition`]). A leaf commits documents and
//! position in one fsynced batch and skips offsets it already applied. A worker starts from the
//! lowest position over all shards, so after a crash or a takeover it resends what some shard
//! may lack, and no shard applies a record twice. Offsets are never committed to Kafka.
//!
//! **Back-pressure.** A worker has one chunk in flight and prepares the next meanwhile (reads,
//! decodes, transforms and routes it); it sends that one only once the leaves acknowledged the
//! first, so it reads at most one chunk ahead, and librdkafka's prefetch queue is bounded
//! (`queued.max.messages.kbytes`). S3 sources read objects one at a time in key order unless
//! they are not `ordered`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use basalt_common::api::{
    CollectionInfo, KafkaSource, Leaf, Meta, PartitionStatus, S3Source, ShardWrite, ShardWriteResult, SourceFormat,
    SourceInfo, SourceObject, SourcePosition, SourceSpec, StartAt, WriteOp,
};
use basalt_common::doc::{Doc, DocLimits, ID_FIELD, normalize_system_fields, now_micros, parse_doc, shard_for_id};
use basalt_common::{BasaltError, Result};
use object_store::ObjectStore;
use parking_lot::Mutex;
use prometheus::{
    GaugeVec, Histogram, HistogramVec, IntCounterVec, IntGaugeVec, register_gauge_vec, register_histogram_vec,
    register_int_counter_vec, register_int_gauge_vec,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

static SOURCE_DOCS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "basalt_source_documents_total",
        "Records read from sources, by source and result (ok, error)",
        &["source", "result"]
    )
    .ok()
});
static SOURCE_BYTES: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!("basalt_source_bytes_total", "Payload bytes read from sources", &["source"]).ok()
});
static SOURCE_NEWEST: LazyLock<Option<GaugeVec>> = LazyLock::new(|| {
    register_gauge_vec!(
        "basalt_source_newest_event_time_seconds",
        "_event_time (unix seconds) of the newest document a source made visible; data latency is time() minus this",
        &["source"]
    )
    .ok()
});
static SOURCE_LATENCY: LazyLock<Option<GaugeVec>> = LazyLock::new(|| {
    register_gauge_vec!(
        "basalt_source_data_latency_seconds",
        "When a source's last chunk became visible: that moment minus the newest _event_time in it",
        &["source"]
    )
    .ok()
});
static SOURCE_LAG: LazyLock<Option<IntGaugeVec>> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "basalt_source_lag_records",
        "Records in a source partition not yet ingested (high watermark minus next offset)",
        &["source", "partition"]
    )
    .ok()
});

/// Time from a Kafka record's timestamp (set by the producer, or the broker's log-append time)
/// to the tailer reading it: how much of the data latency is spent before Basalt.
static SOURCE_FETCH_DELAY: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "basalt_source_fetch_delay_seconds",
        "Time from a Kafka record's timestamp to the tailer reading it",
        &["source"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    )
    .ok()
});

/// The position of a partition that is an object read to its end.
pub const OBJECT_END: i64 = i64::MAX / 2;
/// Objects one tailer ingests at a time per source that is not `ordered`.
const OBJECT_WORKERS: usize = 2;
/// Records per chunk (one write per shard per chunk).
const CHUNK_RECORDS: usize = 2000;
/// Records per chunk from an object (a bulk load: fewer, larger commits).
const OBJECT_CHUNK_RECORDS: usize = 8192;
/// How long a worker waits for the first record of a chunk.
const FIRST_RECORD_WAIT: Duration = Duration::from_millis(10);
/// How often a tailer renews its lease and reconsiders its partitions.
const TICK: Duration = Duration::from_secs(1);
/// librdkafka's prefetch queue per consumer, in KiB.
const PREFETCH_KIB: &str = "16384";

fn kafka_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::unavailable(format!("kafka: {e}"))
}

struct Worker {
    /// The source as the worker started it: a change (a rollup added) restarts the worker.
    source: SourceInfo,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<PartitionStatus>>,
}

/// Runs the partitions of every source this tailer process owns.
pub struct SourceRunner {
    meta: Meta,
    leaf: Leaf,
    member: String,
    limits: DocLimits,
    workers: Mutex<HashMap<(u64, i32), Worker>>,
    /// Partition counts by source, with when they were read.
    partitions: Mutex<HashMap<u64, (i32, Instant)>>,
    /// S3 sources: the store per source id, and this member's listing state.
    stores: Mutex<HashMap<u64, Arc<dyn ObjectStore>>>,
    listings: Mutex<HashMap<u64, Listing>>,
    /// S3 sources whose listing is running (in a task of its own: a slow or unreachable
    /// bucket must not hold up the loop that renews this tailer's lease).
    listing_now: Mutex<HashSet<u64>>,
}

/// A source-level step (listing an S3 prefix, reading a topic's partitions): when it last ran,
/// whether it worked (a failure is a row in SHOW SOURCES), and the backoff after failures.
struct Listing {
    at: Instant,
    ok: bool,
    backoff: Duration,
    status: PartitionStatus,
}

impl SourceRunner {
    /// Start the runner's loop on the current tokio runtime.
    pub fn spawn(meta: Meta, leaf: Leaf, limits: DocLimits) -> Arc<SourceRunner> {
        let member = format!("tailer-{}", uuid::Uuid::new_v4().simple());
        let runner = Arc::new(SourceRunner {
            meta,
            leaf,
            member,
            limits,
            workers: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
            stores: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            listing_now: Mutex::new(HashSet::new()),
        });
        let r = runner.clone();
        tokio::spawn(async move {
            tracing::info!(member = %r.member, "source runner started");
            loop {
                if let Err(e) = r.tick().await {
                    tracing::warn!(error = %e, "source assignment round failed");
                }
                tokio::time::sleep(TICK).await;
            }
        });
        runner
    }

    pub fn member(&self) -> &str {
        &self.member
    }

    async fn tick(self: &Arc<Self>) -> Result<()> {
        let mut report: Vec<PartitionStatus> = self.workers.lock().values().map(|w| w.status.lock().clone()).collect();
        report.extend(self.listings.lock().values().filter(|l| !l.ok).map(|l| l.status.clone()));
        let live = self.meta.source_heartbeat(self.member.clone(), report).await?;
        let sources = self.meta.list_sources().await?;
        let mut wanted = HashSet::new();
        let ids: HashSet<u64> = sources.iter().map(|s| s.id).collect();
        self.listings.lock().retain(|id, _| ids.contains(id));
        self.stores.lock().retain(|id, _| ids.contains(id));
        for source in sources {
            let kafka = match &source.spec {
                SourceSpec::Kafka(kafka) => kafka,
                SourceSpec::S3(s3) => {
                    if let Err(e) = self.tick_s3(&source, s3, &live, &mut wanted).await {
                        tracing::warn!(source = %source.name, error = %e, "s3 source round failed");
                    }
                    continue;
                }
            };
            // A broker that cannot be reached is asked again after a backoff (the metadata call
            // blocks this loop, which also renews the lease) and shown in SHOW SOURCES.
            let waiting = self.listings.lock().get(&source.id).is_some_and(|l| !l.ok && l.at.elapsed() < l.backoff);
            if waiting {
                continue;
            }
            let count = match self.partition_count(source.id, kafka).await {
                Ok(n) => {
                    self.listings.lock().remove(&source.id);
                    n
                }
                Err(e) => {
                    tracing::warn!(source = %source.name, error = %e, "cannot read the topic's partitions; retrying");
                    let mut listings = self.listings.lock();
                    let backoff =
                        listings.get(&source.id).map_or(TICK * 2, |l| (l.backoff * 2).min(Duration::from_secs(30)));
                    let status = self.listing_status(&source, "retrying", Some(e.message));
                    listings.insert(source.id, Listing { at: Instant::now(), ok: false, backoff, status });
                    continue;
                }
            };
            let n = live.len().max(1) as u64;
            for p in 0..count {
                let owner = live.get(((p as u64 + source.id) % n) as usize);
                if owner.is_some_and(|o| *o == self.member) {
                    wanted.insert((source.id, p));
                    self.start(&source, p, None);
                }
            }
        }
        let mut workers = self.workers.lock();
        workers.retain(|key, w| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(source_id = key.0, partition = key.1, "partition released");
                w.stop.store(true, Ordering::Release);
            }
            keep
        });
        Ok(())
    }

    /// An S3 source: list the prefix when due (one member does, the one the source id picks),
    /// then work on this member's share of the objects not done yet, a few at a time.
    async fn tick_s3(
        self: &Arc<Self>,
        source: &SourceInfo,
        s3: &S3Source,
        live: &[String],
        wanted: &mut HashSet<(u64, i32)>,
    ) -> Result<()> {
        let existing = self.stores.lock().get(&source.id).cloned();
        let store = match existing {
            Some(s) => s,
            None => {
                let s = crate::objects::store(s3)?;
                self.stores.lock().insert(source.id, s.clone());
                s
            }
        };
        let n = live.len().max(1) as u64;
        let lister = live.get((source.id % n) as usize).is_some_and(|m| *m == self.member);
        let due = match self.listings.lock().get(&source.id) {
            None => true,
            Some(l) if !l.ok => l.at.elapsed() >= l.backoff,
            Some(_) if s3.poll_interval_ms == 0 => false,
            Some(l) => l.at.elapsed() >= Duration::from_millis(s3.poll_interval_ms),
        };
        if lister && due && self.listing_now.lock().insert(source.id) {
            let (runner, source, s3) = (self.clone(), source.clone(), s3.clone());
            tokio::spawn(async move {
                runner.list_objects(&source, &s3, store.as_ref()).await;
                runner.listing_now.lock().remove(&source.id);
            });
        }
        let objects = self.meta.source_objects(source.id, Vec::new()).await?;
        // Ordered: the lister takes the first object not done (objects are numbered in key
        // order as listed); one at a time, so every shard gets the documents in file order.
        let mine: Vec<&SourceObject> = if s3.ordered {
            if lister { objects.iter().filter(|o| !o.done).take(1).collect() } else { Vec::new() }
        } else {
            objects
                .iter()
                .filter(|o| {
                    !o.done && live.get(((o.number as u64 + source.id) % n) as usize).is_some_and(|m| *m == self.member)
                })
                .take(OBJECT_WORKERS)
                .collect()
        };
        for object in mine {
            wanted.insert((source.id, object.number));
            self.start(source, object.number, Some(object.clone()));
        }
        Ok(())
    }

    /// List an S3 source's prefix and hand what it finds to the catalog; failures are retried
    /// with backoff and shown in SHOW SOURCES.
    async fn list_objects(&self, source: &SourceInfo, s3: &S3Source, store: &dyn ObjectStore) {
        let listed = match crate::objects::list(store, s3).await {
            Ok(found) => self.meta.source_objects(source.id, found).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let mut listings = self.listings.lock();
        let listing = match listed {
            Ok(()) => {
                let status = self.listing_status(source, "running", None);
                Listing { at: Instant::now(), ok: true, backoff: TICK, status }
            }
            Err(e) => {
                tracing::warn!(source = %source.name, error = %e, "cannot list the bucket; retrying");
                let backoff = listings.get(&source.id).map_or(TICK, |l| (l.backoff * 2).min(Duration::from_secs(30)));
                let status = self.listing_status(source, "retrying", Some(e.message));
                Listing { at: Instant::now(), ok: false, backoff, status }
            }
        };
        listings.insert(source.id, listing);
    }

    /// The row SHOW SOURCES shows for a source's listing (partition -1).
    fn listing_status(&self, source: &SourceInfo, state: &str, error: Option<String>) -> PartitionStatus {
        PartitionStatus {
            source_id: source.id,
            partition: -1,
            member: self.member.clone(),
            state: state.into(),
            next_offset: -1,
            high_watermark: -1,
            documents: 0,
            errors: 0,
            last_error: error,
            bytes: 0,
            object: None,
        }
    }

    async fn partition_count(&self, source_id: u64, kafka: &KafkaSource) -> Result<i32> {
        if let Some((n, at)) = self.partitions.lock().get(&source_id)
            && at.elapsed() < Duration::from_secs(30)
        {
            return Ok(*n);
        }
        let kafka = kafka.clone();
        let n = tokio::task::spawn_blocking(move || -> Result<i32> {
            let consumer: BaseConsumer = client_config(&kafka, source_id).create().map_err(kafka_err)?;
            let md = consumer.fetch_metadata(Some(&kafka.topic), Duration::from_secs(3)).map_err(kafka_err)?;
            let topic = md.topics().first().ok_or_else(|| kafka_err("no metadata for the topic"))?;
            if let Some(e) = topic.error() {
                return Err(kafka_err(format!("topic {}: {e:?}", kafka.topic)));
            }
            Ok(topic.partitions().len() as i32)
        })
        .await
        .map_err(|e| BasaltError::internal(format!("metadata task: {e}")))??;
        self.partitions.lock().insert(source_id, (n, Instant::now()));
        Ok(n)
    }

    /// Start the worker for a partition (an object's number for S3 sources).
    fn start(&self, source: &SourceInfo, partition: i32, object: Option<SourceObject>) {
        let mut workers = self.workers.lock();
        if let Some(w) = workers.get(&(source.id, partition)) {
            if w.source == *source {
                return;
            }
            // Changed (a rollup added or dropped): a new worker resumes from the positions of
            // every collection it now feeds. Until the old one notices, both may write; the
            // leaves' positions keep that harmless.
            tracing::info!(source = %source.name, partition, "source changed; restarting its worker");
            w.stop.store(true, Ordering::Release);
            workers.remove(&(source.id, partition));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(PartitionStatus {
            source_id: source.id,
            partition,
            member: self.member.clone(),
            state: "starting".into(),
            next_offset: -1,
            high_watermark: -1,
            documents: 0,
            errors: 0,
            last_error: None,
            bytes: 0,
            object: object.as_ref().map(|o| o.key.clone()),
        }));
        let ctx = PartitionWorker {
            source: source.clone(),
            partition,
            meta: self.meta.clone(),
            leaf: self.leaf.clone(),
            limits: self.limits.clone(),
            stop: stop.clone(),
            status: status.clone(),
            rt: tokio::runtime::Handle::current(),
            transform: None,
            avro: None,
            rollups: Vec::new(),
            store: self.stores.lock().get(&source.id).cloned(),
            object,
        };
        let mut ctx = ctx;
        let prepared = (|| -> Result<()> {
            if let Some(sql) = source.spec.transform() {
                ctx.transform = Some(crate::transform::Transform::new(sql)?);
            }
            if let SourceSpec::Kafka(k) = &source.spec
                && k.format == SourceFormat::Avro
            {
                let schema =
                    k.schema.as_deref().ok_or_else(|| BasaltError::invalid("an avro source without a schema"))?;
                ctx.avro = Some(crate::avro::AvroDecoder::new(schema, k.framing, k.schema_id)?);
            }
            for rollup in &source.rollups {
                ctx.rollups.push(crate::rollup::Rollup::new(rollup)?);
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            // Checked when created; a catalog edited by hand gets here.
            tracing::error!(source = %source.name, error = %e, "bad transform, rollup or schema; the source does not run");
            let mut s = status.lock();
            s.state = "failed".into();
            s.last_error = Some(e.message);
            drop(s);
            workers.insert((source.id, partition), Worker { source: source.clone(), stop, status });
            return;
        }
        let spawned =
            std::thread::Builder::new().name(format!("source-{}-{partition}", source.id)).spawn(move || ctx.run());
        match spawned {
            Ok(_) => {
                tracing::info!(source = %source.name, partition, "partition taken");
                workers.insert((source.id, partition), Worker { source: source.clone(), stop, status });
            }
            Err(e) => tracing::error!(source = %source.name, partition, error = %e, "cannot start a source worker"),
        }
    }
}

fn client_config(kafka: &KafkaSource, source_id: u64) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("basalt-source-{source_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", PREFETCH_KIB)
        // The broker answers a fetch when data arrives or after this long: it bounds how stale
        // an idle partition's first new record can be (librdkafka's default is 500 ms).
        .set("fetch.wait.max.ms", "10")
        .set("socket.timeout.ms", "10000");
    // Credentials and other client settings come from the environment, never from SQL:
    // BASALT_KAFKA_<NAME> sets librdkafka's <name> (underscores become dots), e.g.
    // BASALT_KAFKA_SASL_USERNAME.
    for (k, v) in std::env::vars() {
        if let Some(name) = k.strip_prefix("BASALT_KAFKA_") {
            c.set(name.to_lowercase().replace('_', "."), v);
        }
    }
    c
}

/// A record's key and payload as read, kept for the errors collection.
type KeyAndPayload = (Option<Vec<u8>>, Option<Vec<u8>>);

/// One partition of one source, worked on by its own thread.
struct PartitionWorker {
    source: SourceInfo,
    partition: i32,
    meta: Meta,
    leaf: Leaf,
    limits: DocLimits,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<PartitionStatus>>,
    rt: tokio::runtime::Handle,
    transform: Option<crate::transform::Transform>,
    /// Avro sources: the decoder of the source's schema.
    avro: Option<crate::avro::AvroDecoder>,
    rollups: Vec<crate::rollup::Rollup>,
    /// S3 sources: the bucket and the object this worker ingests.
    store: Option<Arc<dyn ObjectStore>>,
    object: Option<SourceObject>,
}

/// A chunk's writes on their way to the leaves, with what the worker reports once they land.
struct InFlight<'scope> {
    handle: std::thread::ScopedJoinHandle<'scope, Result<Vec<ShardWriteResult>>>,
    first: i64,
    through: i64,
    report: Report,
}

/// A chunk ready to send: its writes and what the worker reports once they land.
struct Prepared {
    writes: Vec<ShardWrite>,
    report: Report,
}

/// What a worker reports of a chunk once its writes land.
struct Report {
    /// How many of the writes are to the source's collection (the rest are its rollups').
    own: usize,
    bad: u64,
    last_error: Option<String>,
    newest_us: Option<i64>,
    bytes: u64,
}

/// What a worker reads: a Kafka partition or one object.
enum Input {
    Kafka { consumer: Box<BaseConsumer>, topic: String, fetch_delay: Option<Histogram> },
    Object(Box<crate::objects::Prefetch>),
}

enum Next {
    Record(RawRecord),
    /// Nothing more for now (Kafka).
    Idle,
    /// The end of the object.
    End,
}

/// A record as read: offset (or line/row index), key, payload, and the error when it could not
/// even be read as a record (a CSV row with too many cells).
struct RawRecord {
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    /// Already a document (CSV and Parquet rows): validated, not parsed.
    doc: Option<Doc>,
    error: Option<BasaltError>,
}

impl Input {
    fn next(&mut self, wait: Duration, status: &Mutex<PartitionStatus>) -> Result<Next> {
        match self {
            Input::Kafka { consumer, fetch_delay, .. } => Ok(match consumer.poll(wait) {
                None => Next::Idle,
                Some(Err(e)) => {
                    let mut s = status.lock();
                    s.last_error = Some(format!("kafka: {e}"));
                    s.state = "retrying".into();
                    Next::Idle
                }
                Some(Ok(msg)) => {
                    if let (Some(h), Some(ms)) = (fetch_delay, msg.timestamp().to_millis()) {
                        let now_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64);
                        h.observe((now_ms - ms).max(0) as f64 / 1000.0);
                    }
                    Next::Record(RawRecord {
                        offset: msg.offset(),
                        key: msg.key().map(<[u8]>::to_vec),
                        payload: msg.payload().map(<[u8]>::to_vec),
                        doc: None,
                        error: None,
                    })
                }
            }),
            Input::Object(reader) => Ok(match reader.next_record()? {
                None => Next::End,
                Some(r) => Next::Record(RawRecord {
                    offset: r.index,
                    key: None,
                    payload: (r.doc.is_none()).then_some(r.payload),
                    doc: r.doc,
                    error: r.error,
                }),
            }),
        }
    }
}

impl PartitionWorker {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Work until stopped; failures are reported and retried with backoff.
    fn run(self) {
        let mut backoff = Duration::from_millis(200);
        while !self.stopped() {
            match self.ingest() {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(source = %self.source.name, partition = self.partition, error = %e, "source partition failed; retrying");
                    {
                        let mut s = self.status.lock();
                        s.state = "retrying".into();
                        s.last_error = Some(e.message.clone());
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.stopped() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        tracing::info!(source = %self.source.name, partition = self.partition, "source worker stopped");
    }

    fn collection(&self) -> Result<CollectionInfo> {
        self.rt.block_on(self.meta.get_collection(self.source.collection.clone()))
    }

    fn position(&self, offsets: Vec<i64>, through: i64, first: Option<i64>) -> SourcePosition {
        SourcePosition { stream: self.source.id, partition: self.partition, offsets, through, first }
    }

    /// One write per shard of `info` carrying the partition position (shards without
    /// operations get an empty one, so every shard's position moves).
    fn shard_writes(
        &self,
        info: &CollectionInfo,
        mut per_shard: BTreeMap<u32, (Vec<WriteOp>, Vec<i64>)>,
        through: i64,
        first: Option<i64>,
    ) -> Vec<ShardWrite> {
        (0..info.shards)
            .map(|shard| {
                let (ops, offsets) = per_shard.remove(&shard).unwrap_or_default();
                ShardWrite {
                    collection_id: info.id,
                    shard,
                    ops,
                    position: Some(self.position(offsets, through, first)),
                }
            })
            .collect()
    }

    /// Apply writes to their shards concurrently, retried with backoff until all succeed or
    /// the worker is stopped. Writes here are idempotent (positions, or `_id`s that are
    /// record positions), so a retry after a partial failure is harmless. A conflict (another
    /// worker moved a rollup shard's position meanwhile) is returned: the worker resumes anew.
    fn apply_all(&self, writes: &[ShardWrite]) -> Result<Vec<ShardWriteResult>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let calls = writes.iter().cloned().map(|w| {
                let leaf = self.leaf.clone();
                async move { leaf.apply(w).await }
            });
            match self.rt.block_on(futures::future::join_all(calls)).into_iter().collect::<Result<Vec<_>>>() {
                Ok(results) => return Ok(results),
                Err(e) if self.stopped() || e.code == basalt_common::ErrorCode::Conflict => return Err(e),
                Err(e) => {
                    tracing::warn!(source = %self.source.name, partition = self.partition, error = %e, "leaf write failed; retrying");
                    self.status.lock().last_error = Some(e.message.clone());
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Where to start, over every shard of every collection the source feeds (its collection
    /// and its rollups): one past the lowest position. A shard without a position gets the
    /// lowest one of its collection's other shards, or, in a collection with none yet, the
    /// source's start (earliest or latest), written before any data. Also returns the higher
    /// positions: chunks end at each of them, so no aggregated write straddles a shard's
    /// position.
    fn resume(
        &self,
        targets: &[&CollectionInfo],
        start: &mut dyn FnMut() -> Result<i64>,
    ) -> Result<(i64, BTreeSet<i64>)> {
        let mut start_at = None;
        let mut known = Vec::new();
        let mut fill = Vec::new();
        for info in targets {
            let shards: Vec<u32> = (0..info.shards).collect();
            let positions = self.rt.block_on(self.leaf.positions(info.id, shards, self.source.id))?;
            let mine: BTreeMap<u32, i64> =
                positions.iter().filter(|p| p.partition == self.partition).map(|p| (p.shard, p.through)).collect();
            known.extend(mine.values().copied());
            if mine.len() == info.shards as usize {
                continue;
            }
            let through = match mine.values().min() {
                Some(min) => *min,
                None => match start_at {
                    Some(s) => s,
                    None => {
                        let s = start()?;
                        start_at = Some(s);
                        s
                    }
                },
            };
            known.push(through);
            let missing: Vec<u32> = (0..info.shards).filter(|s| !mine.contains_key(s)).collect();
            fill.extend(missing.into_iter().map(|shard| ShardWrite {
                collection_id: info.id,
                shard,
                ops: Vec::new(),
                position: Some(self.position(Vec::new(), through, None)),
            }));
        }
        if !fill.is_empty() {
            self.apply_all(&fill)?;
        }
        let low = known.iter().copied().min().ok_or_else(|| BasaltError::internal("no collection to resume"))?;
        Ok((low + 1, known.into_iter().filter(|p| *p > low).collect()))
    }

    fn ingest(&self) -> Result<()> {
        let info = self.collection()?;
        let rollups = self
            .rollups
            .iter()
            .map(|r| self.rt.block_on(self.meta.get_collection(r.collection.clone())))
            .collect::<Result<Vec<_>>>()?;
        let errors = match &self.source.errors {
            Some(name) => Some(self.rt.block_on(self.meta.get_collection(name.clone()))?),
            None => None,
        };
        let targets: Vec<&CollectionInfo> = std::iter::once(&info).chain(&rollups).collect();
        let (mut input, next, mut boundaries) = match &self.source.spec {
            SourceSpec::Kafka(kafka) => {
                let consumer: BaseConsumer = client_config(kafka, self.source.id).create().map_err(kafka_err)?;
                let mut start = || -> Result<i64> {
                    let (low, high) = consumer
                        .fetch_watermarks(&kafka.topic, self.partition, Duration::from_secs(10))
                        .map_err(kafka_err)?;
                    Ok(match kafka.start {
                        StartAt::Earliest => low - 1,
                        StartAt::Latest => high - 1,
                    })
                };
                let (next, boundaries) = self.resume(&targets, &mut start)?;
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&kafka.topic, self.partition, Offset::Offset(next)).map_err(kafka_err)?;
                consumer.assign(&tpl).map_err(kafka_err)?;
                let fetch_delay =
                    SOURCE_FETCH_DELAY.as_ref().map(|h| h.with_label_values(&[self.source.name.to_string()]));
                (
                    Input::Kafka { consumer: Box::new(consumer), topic: kafka.topic.clone(), fetch_delay },
                    next,
                    boundaries,
                )
            }
            SourceSpec::S3(s3) => {
                let (Some(object), Some(store)) = (&self.object, &self.store) else {
                    return Err(BasaltError::internal("an s3 worker without its object"));
                };
                let (next, boundaries) = self.resume(&targets, &mut || Ok(-1))?;
                if next > OBJECT_END {
                    return self.finish_object(&targets);
                }
                let opened = crate::objects::ObjectReader::open(
                    self.rt.clone(),
                    store.clone(),
                    &object.key,
                    object.size,
                    s3.format,
                    next,
                    self.limits.doc_size_bytes_max,
                );
                let reader = match opened {
                    Ok(reader) => reader,
                    // Not a file of the source's format (no Parquet footer, no Avro header, no
                    // CSV header line): one record in the errors collection says so, and the
                    // object is done; the objects after it (an ordered source waits for each)
                    // go on. Failures to reach the object are retried.
                    Err(e) if e.code == basalt_common::ErrorCode::InvalidInput => {
                        tracing::warn!(source = %self.source.name, object = %object.key, error = %e, "object cannot be read as its format; skipped");
                        let doc = self.error_record(-1, None, None, &e, now_micros());
                        self.record_errors(errors.as_ref(), vec![doc])?;
                        self.status.lock().last_error = Some(format!("{}: {}", object.key, e.message));
                        return self.finish_object(&targets);
                    }
                    Err(e) => return Err(e),
                };
                (Input::Object(Box::new(crate::objects::Prefetch::start(reader)?)), next, boundaries)
            }
        };
        {
            let mut s = self.status.lock();
            s.state = "running".into();
            s.next_offset = next;
            s.last_error = None;
        }
        let name = self.source.name.to_string();
        let partition_label = self.partition.to_string();
        let mut watermarks_at = Instant::now() - Duration::from_secs(60);
        // A record read past a chunk's end (a shard position) starts the next chunk.
        let mut held: Option<RawRecord> = None;
        let mut ended = false;
        std::thread::scope(|scope| -> Result<()> {
            let mut in_flight: Option<InFlight<'_>> = None;
            while !self.stopped() {
                // Gather a chunk: wait briefly for a first record, then take what is already
                // prefetched. No fixed delay: records that arrive while a chunk is being written
                // form the next one, so chunks grow with the load and latency stays one write.
                // A chunk never spans a position some shard is at (see `resume`).
                let mut chunk: Vec<RawRecord> = Vec::new();
                let mut cap: Option<i64> = None;
                let mut capped = false;
                let chunk_records =
                    if matches!(input, Input::Object(_)) { OBJECT_CHUNK_RECORDS } else { CHUNK_RECORDS };
                while chunk.len() < chunk_records && !ended {
                    if self.stopped() {
                        return Ok(());
                    }
                    let record = match held.take() {
                        Some(r) => r,
                        None => {
                            let wait = if chunk.is_empty() { FIRST_RECORD_WAIT } else { Duration::ZERO };
                            match input.next(wait, &self.status)? {
                                Next::Record(r) => r,
                                Next::Idle => break,
                                Next::End => {
                                    ended = true;
                                    break;
                                }
                            }
                        }
                    };
                    if chunk.is_empty() {
                        boundaries = boundaries.split_off(&record.offset);
                        cap = boundaries.first().copied();
                    }
                    if cap.is_some_and(|c| record.offset > c) {
                        held = Some(record);
                        capped = true;
                        break;
                    }
                    let at_cap = cap == Some(record.offset);
                    chunk.push(record);
                    if at_cap {
                        capped = true;
                        break;
                    }
                }
                match &input {
                    Input::Kafka { consumer, topic, .. } if watermarks_at.elapsed() > Duration::from_secs(2) => {
                        watermarks_at = Instant::now();
                        if let Ok((_, high)) = consumer.fetch_watermarks(topic, self.partition, Duration::from_secs(2))
                        {
                            let mut s = self.status.lock();
                            s.high_watermark = high;
                            if let Some(g) = SOURCE_LAG.as_ref() {
                                g.with_label_values(&[&name, &partition_label]).set((high - s.next_offset).max(0));
                            }
                        }
                    }
                    Input::Object(reader) => {
                        let mut s = self.status.lock();
                        s.bytes = reader.bytes_read();
                        // The object's rows: SHOW SOURCES' lag is the rows left in it.
                        s.high_watermark = reader.records().unwrap_or(-1);
                    }
                    Input::Kafka { .. } => {}
                }
                if chunk.is_empty() {
                    // Nothing new: the chunk in flight lands now (its counts, its position in
                    // SHOW SOURCES), not when the next record comes.
                    self.land(in_flight.take())?;
                    if ended {
                        return self.finish_object(&targets);
                    }
                    continue;
                }
                let (Some(first), Some(last)) = (chunk.first().map(|r| r.offset), chunk.last().map(|r| r.offset))
                else {
                    continue;
                };
                let through = match (capped, cap) {
                    (true, Some(c)) => c,
                    _ => last,
                };
                let Prepared { writes, report } =
                    self.prepare(chunk, first, through, &info, &rollups, errors.as_ref())?;
                // The chunk before must be applied on every shard before this one is sent (a
                // shard applies a partition's chunks in order); this one was read and decoded
                // while it was written.
                self.land(in_flight.take())?;
                let handle = scope.spawn(move || self.apply_all(&writes));
                in_flight = Some(InFlight { handle, first, through, report });
                boundaries = boundaries.split_off(&(through + 1));
                if ended && held.is_none() {
                    self.land(in_flight.take())?;
                    return self.finish_object(&targets);
                }
            }
            Ok(())
        })
    }

    /// Decode a chunk's records, run the source's transform and rollups over them, record the
    /// bad ones in the errors collection, and group the writes by shard (the source's
    /// collection's first, then its rollups').
    fn prepare(
        &self,
        chunk: Vec<RawRecord>,
        first: i64,
        through: i64,
        info: &CollectionInfo,
        rollups: &[CollectionInfo],
        errors: Option<&CollectionInfo>,
    ) -> Result<Prepared> {
        let name = &self.source.name;
        let now = now_micros();
        let mut bad = Vec::new();
        let mut bytes = 0u64;
        let mut last_error = None;
        let mut decoded = Vec::with_capacity(chunk.len());
        let keep_raw = self.transform.is_some() || !self.rollups.is_empty();
        let mut raw: HashMap<i64, KeyAndPayload> = HashMap::new();
        // `rollup`: the record failed in that rollup only (its errors document gets an `_id`
        // of its own).
        let mut fail =
            |offset: i64, key, payload, e: &BasaltError, rollup: Option<&str>, last_error: &mut Option<String>| {
                tracing::debug!(source = %name, partition = self.partition, offset, error = %e, "bad record");
                *last_error = Some(format!("offset {offset}: {}", e.message));
                let mut doc = self.error_record(offset, key, payload, e, now);
                if let Some(r) = rollup {
                    doc.insert(ID_FIELD.into(), format!("{}-{r}", self.position_id(offset)).into());
                }
                bad.push(doc);
            };
        for RawRecord { offset, key, mut payload, doc, error } in chunk {
            bytes += payload.as_ref().map_or(0, |p| p.len() as u64);
            let decoded_doc = match (error, doc) {
                (Some(e), _) => Err(e),
                (None, Some(mut doc)) => {
                    // A row that is a document already: checked in place, made text for the
                    // errors collection only when it fails (or transforms or rollups may).
                    let checked = basalt_common::doc::check_doc(&doc, &self.limits)
                        .and_then(|()| self.with_id(offset, None, &mut doc, now));
                    if checked.is_err() || keep_raw {
                        payload = Some(serde_json::to_vec(&doc).unwrap_or_default());
                    }
                    checked.map(|()| doc)
                }
                (None, None) => self.decode(offset, key.clone(), payload.clone(), now),
            };
            match decoded_doc {
                Ok(doc) => {
                    decoded.push((offset, doc));
                    if keep_raw {
                        raw.insert(offset, (key, payload));
                    }
                }
                Err(e) => fail(offset, key, payload, &e, None, &mut last_error),
            }
        }
        if let Some(t) = &self.transform {
            let (rows, failed) = self.rt.block_on(t.apply(decoded));
            for (offset, e) in failed {
                let (key, payload) = raw.get(&offset).cloned().unwrap_or_default();
                fail(offset, key, payload, &e, None, &mut last_error);
            }
            decoded = Vec::with_capacity(rows.len());
            for (offset, mut doc) in rows {
                // Output without `_id` gets the record's position: read again, same document.
                if doc.get(ID_FIELD).is_none_or(|v| v.is_null()) {
                    doc.insert(ID_FIELD.to_string(), self.position_id(offset).into());
                }
                match normalize_system_fields(&mut doc, now, &self.limits) {
                    Ok(_) => decoded.push((offset, doc)),
                    Err(e) => {
                        let (key, payload) = raw.get(&offset).cloned().unwrap_or_default();
                        fail(offset, key, payload, &e, None, &mut last_error);
                    }
                }
            }
        }
        // Rollups see the documents as the source's collection gets them.
        let mut rollup_writes = Vec::new();
        for (rollup, rinfo) in self.rollups.iter().zip(rollups) {
            let refs: Vec<(i64, &Doc)> = decoded.iter().map(|(o, d)| (*o, d)).collect();
            let (merges, failed) = self.rt.block_on(rollup.apply(&refs));
            for (offset, e) in failed {
                let (key, payload) = raw.get(&offset).cloned().unwrap_or_default();
                let e = BasaltError::new(e.code, format!("rollup {}: {}", rollup.collection, e.message));
                fail(offset, key, payload, &e, Some(&rollup.collection.name), &mut last_error);
            }
            let mut per_shard: BTreeMap<u32, (Vec<WriteOp>, Vec<i64>)> = BTreeMap::new();
            for (id, ops) in merges {
                let entry = per_shard.entry(shard_for_id(&id, rinfo.shards)).or_default();
                entry.0.push(WriteOp::Merge { id, ops });
                entry.1.push(through);
            }
            rollup_writes.extend(self.shard_writes(rinfo, per_shard, through, Some(first)));
        }
        let newest_us = decoded
            .iter()
            .filter_map(|(_, d)| d.get(basalt_common::doc::EVENT_TIME_FIELD).and_then(|v| v.as_i64()))
            .max();
        let mut per_shard: BTreeMap<u32, (Vec<WriteOp>, Vec<i64>)> = BTreeMap::new();
        for (offset, doc) in decoded {
            let op = WriteOp::Upsert { doc: doc.into() };
            let entry = per_shard.entry(shard_for_id(op.id(), info.shards)).or_default();
            entry.0.push(op);
            entry.1.push(offset);
        }
        // Bad records first: once the chunk's position is committed they are not read again.
        let bad_count = bad.len() as u64;
        if !bad.is_empty() {
            self.record_errors(errors, bad)?;
        }
        let mut writes = self.shard_writes(info, per_shard, through, None);
        let own = writes.len();
        writes.extend(rollup_writes);
        Ok(Prepared { writes, report: Report { own, bad: bad_count, last_error, newest_us, bytes } })
    }

    /// Wait for a chunk's writes and account for them (documents, errors, latency, status).
    fn land(&self, in_flight: Option<InFlight<'_>>) -> Result<()> {
        let Some(InFlight { handle, first, through, report }) = in_flight else {
            return Ok(());
        };
        let Report { own, bad, mut last_error, newest_us, bytes } = report;
        let results = handle.join().map_err(|_| BasaltError::internal("a leaf write thread panicked"))??;
        let name = self.source.name.to_string();
        let (ok, failed) = results[..own]
            .iter()
            .flat_map(|r| r.statuses.iter())
            .fold((0, 0), |(ok, failed), s| if s.is_ok() { (ok + 1, failed) } else { (ok, failed + 1) });
        let rollup_failed = results[own..].iter().flat_map(|r| r.statuses.iter()).filter(|s| !s.is_ok()).count();
        if rollup_failed > 0 {
            // A merge the leaf refused (a min over a field whose type changed); its group
            // misses this chunk's contribution.
            tracing::warn!(source = %name, partition = self.partition, rollup_failed, "rollup merges failed");
            last_error = Some(format!("{rollup_failed} rollup merges failed in offsets {first}..={through}"));
        }
        if let Some(newest) = newest_us {
            let visible_us = now_micros();
            if let Some(g) = SOURCE_NEWEST.as_ref() {
                let g = g.with_label_values(&[&name]);
                g.set(g.get().max(newest as f64 / 1e6));
            }
            if let Some(g) = SOURCE_LATENCY.as_ref() {
                g.with_label_values(&[&name]).set((visible_us - newest) as f64 / 1e6);
            }
        }
        if let Some(c) = SOURCE_DOCS.as_ref() {
            c.with_label_values(&[&name, "ok"]).inc_by(ok);
            c.with_label_values(&[&name, "error"]).inc_by(bad + failed);
        }
        if let Some(c) = SOURCE_BYTES.as_ref() {
            c.with_label_values(&[&name]).inc_by(bytes);
        }
        {
            let mut s = self.status.lock();
            s.state = "running".into();
            s.next_offset = through + 1;
            s.documents += ok;
            s.errors += bad + failed;
            if last_error.is_some() {
                s.last_error = last_error;
            }
        }
        Ok(())
    }

    /// The object is read to its end: every shard gets the end position, then the catalog
    /// marks the object done (a crash in between: the next worker finds the end everywhere
    /// and only marks it).
    fn finish_object(&self, targets: &[&CollectionInfo]) -> Result<()> {
        let writes: Vec<ShardWrite> =
            targets.iter().flat_map(|info| self.shard_writes(info, BTreeMap::new(), OBJECT_END, None)).collect();
        self.apply_all(&writes)?;
        self.rt.block_on(self.meta.source_object_done(self.source.id, self.partition))?;
        let mut s = self.status.lock();
        s.state = "done".into();
        tracing::info!(source = %self.source.name, object = ?self.object.as_ref().map(|o| &o.key), documents = s.documents, "object ingested");
        Ok(())
    }

    /// A document for the errors collection: where the record was, why it failed, and its
    /// payload (as text, at most 64 KiB). Its `_id` is the record's position, so writing it again
    /// changes nothing.
    fn error_record(
        &self,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        error: &BasaltError,
        now: i64,
    ) -> Doc {
        const PAYLOAD_MAX: usize = 64 * 1024;
        let text = |b: Vec<u8>| {
            let mut t = String::from_utf8_lossy(&b[..b.len().min(PAYLOAD_MAX)]).into_owned();
            if b.len() > PAYLOAD_MAX {
                t.push_str(" [truncated]");
            }
            t
        };
        let mut doc = Doc::new();
        doc.insert(ID_FIELD.into(), self.position_id(offset).into());
        doc.insert("source".into(), self.source.name.to_string().into());
        doc.insert("partition".into(), self.partition.into());
        // Objects: the key, and the line (JSON lines; CSV rows after the header) or row index.
        if let Some(object) = &self.object {
            doc.insert("object".into(), object.key.clone().into());
        }
        doc.insert("offset".into(), offset.into());
        doc.insert("error".into(), error.message.clone().into());
        doc.insert("code".into(), serde_json::to_value(error.code).unwrap_or_default());
        doc.insert("payload".into(), payload.map(text).into());
        doc.insert("key".into(), key.map(text).into());
        doc.insert(basalt_common::doc::EVENT_TIME_FIELD.into(), now.into());
        doc
    }

    /// Write bad records to the source's errors collection (retried until written).
    fn record_errors(&self, errors: Option<&CollectionInfo>, docs: Vec<Doc>) -> Result<()> {
        let Some(info) = errors else { return Ok(()) };
        let mut per_shard: BTreeMap<u32, Vec<WriteOp>> = BTreeMap::new();
        for doc in docs {
            let id = doc.get(ID_FIELD).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            per_shard.entry(shard_for_id(&id, info.shards)).or_default().push(WriteOp::Upsert { doc: doc.into() });
        }
        let writes: Vec<ShardWrite> = per_shard
            .into_iter()
            .map(|(shard, ops)| ShardWrite { collection_id: info.id, shard, ops, position: None })
            .collect();
        self.apply_all(&writes).map(|_| ())
    }

    /// The `_id` of a record at `offset` that has none of its own (also its errors document).
    fn position_id(&self, offset: i64) -> String {
        format!("{}-{}-{offset}", self.source.id, self.partition)
    }

    /// A message as an upsert: JSON object, within limits, `_id` from the key when the
    /// document has none and the source says so, else from the record's position (so a record
    /// read again gets the same `_id`, the same shard, and is recognized as applied).
    fn decode(&self, offset: i64, key: Option<Vec<u8>>, payload: Option<Vec<u8>>, now: i64) -> Result<Doc> {
        let payload = payload.ok_or_else(|| BasaltError::invalid("message has no value"))?;
        let mut doc = match &self.source.spec {
            SourceSpec::Kafka(KafkaSource { format: SourceFormat::Csv, columns, .. }) => {
                let doc = crate::objects::csv_message(columns, &payload, self.limits.doc_size_bytes_max)?;
                basalt_common::doc::check_doc(&doc, &self.limits)?;
                doc
            }
            SourceSpec::Kafka(KafkaSource { format: SourceFormat::Avro, .. }) => {
                if payload.len() > self.limits.doc_size_bytes_max {
                    return Err(BasaltError::invalid(format!(
                        "message of {} bytes is over the document size limit of {} bytes",
                        payload.len(),
                        self.limits.doc_size_bytes_max
                    )));
                }
                let decoder =
                    self.avro.as_ref().ok_or_else(|| BasaltError::internal("avro source without a decoder"))?;
                let doc = decoder.decode(&payload)?;
                basalt_common::doc::check_doc(&doc, &self.limits)?;
                doc
            }
            _ => parse_doc(&payload, &self.limits)?,
        };
        self.with_id(offset, key, &mut doc, now)?;
        Ok(doc)
    }

    /// `_id` from the key (when the source says so) or the record's position, system fields.
    fn with_id(&self, offset: i64, key: Option<Vec<u8>>, doc: &mut Doc, now: i64) -> Result<()> {
        let key_as_id = matches!(&self.source.spec, SourceSpec::Kafka(k) if k.key_as_id);
        if key_as_id
            && !doc.contains_key(ID_FIELD)
            && let Some(key) = key
        {
            let key = String::from_utf8(key).map_err(|_| BasaltError::invalid("message key is not utf-8"))?;
            doc.insert(ID_FIELD.to_string(), serde_json::Value::String(key));
        }
        if !doc.contains_key(ID_FIELD) {
            doc.insert(ID_FIELD.to_string(), serde_json::Value::String(self.position_id(offset)));
        }
        normalize_system_fields(doc, now, &self.limits)?;
        Ok(())
    }
}
