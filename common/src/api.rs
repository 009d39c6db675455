//! Messages between tiers and the traits each tier serves. A transport (in-process or RPC)
//! implements these traits; callers never know which one they hold.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::doc::{Doc, PatchOp};
use crate::error::{BasaltError, Result};
use crate::filter::{AccessPath, Filter};
use crate::schema::{ColumnType, SchemaStats};

pub const DEFAULT_WORKSPACE: &str = "commons";
/// Requested as a scan column, the search relevance of each row (null without a text search).
pub const SCORE_COLUMN: &str = "_score";
/// Requested as a scan column (`Boolean`, last), which rows the scan's filters select: a block
/// keeping at least half of its rows then goes out whole, not copied, and the reader skips the
/// rows marked false itself; other blocks go out filtered, every row marked true. For a
/// reader in the leaf's process that handles it (`basalt_fragment::coded`); never with a
/// limit.
pub const SELECTED_COLUMN: &str = "_basalt_selected";
pub const DEFAULT_SHARDS: u32 = 2;
pub const SHARDS_MAX: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CollectionName {
    pub workspace: String,
    pub name: String,
}

impl CollectionName {
    pub fn new(workspace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { workspace: workspace.into(), name: name.into() }
    }

    /// Parse `collection` or `workspace.collection`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('.').collect();
        let (ws, name) = match parts.as_slice() {
            [name] => (DEFAULT_WORKSPACE, *name),
            [ws, name] => (*ws, *name),
            _ => return Err(BasaltError::invalid(format!("bad collection name {s:?}"))),
        };
        validate_identifier(ws)?;
        validate_identifier(name)?;
        Ok(Self::new(ws, name))
    }
}

impl std::fmt::Display for CollectionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.workspace, self.name)
    }
}

/// Workspace and collection names: 1-128 ASCII letters, digits, `_` or `-`, not starting with `_`.
pub fn validate_identifier(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(BasaltError::invalid(format!(
            "bad name {s:?}: use 1-128 letters, digits, '_' or '-', not starting with '_'"
        )))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionInfo {
    /// Never reused: a dropped and re-created collection gets a new id.
    pub id: u64,
    pub name: CollectionName,
    pub shards: u32,
    pub created_at_us: i64,
}

/// A write as a client sends it, before validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum WriteInput {
    Upsert {
        doc: Value,
    },
    /// A document given as raw bytes (SQL string literals, files): parsed by the tailer.
    UpsertRaw {
        json: String,
    },
    Patch {
        id: String,
        ops: Vec<PatchOp>,
        /// Create the document (`_id` and the ingest time only) when it does not exist, then
        /// patch it: counters and aggregates that start at zero.
        #[serde(default)]
        upsert: bool,
    },
    Delete {
        id: String,
    },
    /// An item the front end could not even read as a write; reported back per document.
    Invalid {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteRequest {
    pub collection: CollectionName,
    pub inputs: Vec<WriteInput>,
}

/// A validated write for one shard. Upserts carry normalized documents.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum WriteOp {
    /// Shared, so a writer that may have to send it again (a source retrying a leaf) keeps a
    /// reference instead of a copy, and the leaf indexes the same allocation.
    Upsert {
        #[serde(with = "shared_doc")]
        doc: std::sync::Arc<Doc>,
    },
    Patch {
        id: String,
        ops: Vec<PatchOp>,
    },
    /// [`WriteOp::Patch`] that creates a missing document first (`_id` and `_event_time`).
    Merge {
        id: String,
        ops: Vec<PatchOp>,
    },
    Delete {
        id: String,
    },
}

/// Serde for an `Arc<Doc>` as the document itself (without serde's `rc` feature, which would
/// rebuild every crate that uses serde).
mod shared_doc {
    use super::Doc;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(doc: &Arc<Doc>, s: S) -> Result<S::Ok, S::Error> {
        doc.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Doc>, D::Error> {
        Doc::deserialize(d).map(Arc::new)
    }
}

impl WriteOp {
    pub fn id(&self) -> &str {
        match self {
            WriteOp::Upsert { doc } => doc.get(crate::doc::ID_FIELD).and_then(Value::as_str).unwrap_or(""),
            WriteOp::Patch { id, .. } | WriteOp::Merge { id, .. } | WriteOp::Delete { id } => id,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardWrite {
    pub collection_id: u64,
    pub shard: u32,
    pub ops: Vec<WriteOp>,
    /// Set for writes from an ordered source (a Kafka partition): the leaf applies each record
    /// at most once and records how far the source got in the same commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<SourcePosition>,
}

/// Where the operations of a [`ShardWrite`] come from in one partition of a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// The source's id (never reused).
    pub stream: u64,
    pub partition: i32,
    /// The offset of each operation, ascending.
    pub offsets: Vec<i64>,
    /// Every record of the partition up to this offset has been routed: the ones for this
    /// shard are in `ops` (or were in an earlier write).
    pub through: i64,
    /// Set when the operations aggregate records (rollups): the first offset they include. Such
    /// a write applies whole or not at all, so a shard whose position lies in
    /// `first..through` (it has part of the records) refuses it with a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<i64>,
}

/// How far a shard has applied one partition of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPosition {
    pub shard: u32,
    pub partition: i32,
    pub through: i64,
}

/// Where a source starts in a partition no shard has a position for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// One JSON object per Kafka message, or per line of an object (JSON lines).
    Json,
    /// Objects: comma-separated values with a header line.
    Csv,
    /// Objects: Apache Parquet.
    Parquet,
    /// Kafka: one Avro datum of the source's schema per message (see [`AvroFraming`]).
    Avro,
}

/// How an Avro message frames its datum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AvroFraming {
    /// The datum alone.
    #[default]
    Bare,
    /// Confluent wire format: a zero byte and a 4-byte schema id, then the datum.
    Confluent,
    /// Avro single-object encoding: `C3 01` and the schema's Rabin fingerprint, then the datum.
    SingleObject,
}

/// A Kafka topic to ingest. Credentials are not part of it: they come from the tailer's
/// environment or config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KafkaSource {
    pub brokers: String,
    pub topic: String,
    pub format: SourceFormat,
    /// Names of the cells of a CSV message (format csv: a message is one row, no header).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    pub start: StartAt,
    /// Use the message key as `_id` when the document has none.
    pub key_as_id: bool,
    /// Format avro: the writer schema (Avro JSON), how messages frame it, and the schema id
    /// Confluent-framed messages must carry (unchecked when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    #[serde(default)]
    pub framing: AvroFraming,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_id: Option<u32>,
    /// `SELECT ... FROM _input [WHERE ...]` applied to every record on the way in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
}

/// Objects under a prefix of an S3 bucket. Credentials come from the tailer's environment
/// (`AWS_ACCESS_KEY_ID`, ...), never from SQL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct S3Source {
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    pub format: SourceFormat,
    /// The S3 API endpoint (another service than AWS), e.g. `http://127.0.0.1:9000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// How often the prefix is listed for new objects; 0: list once (a one-off load).
    pub poll_interval_ms: u64,
    /// Objects are ingested one at a time, in key order, by one tailer (the default), so the
    /// documents reach every shard in the order of the files (a load of files sorted by a
    /// column keeps it ascending in every shard: leaves aggregate, merge and join on it in
    /// order). `false`: each tailer reads up to two of the objects it owns at once, objects
    /// spread over the tailers, in no particular order.
    #[serde(default = "default_true")]
    pub ordered: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
}

/// `#[serde(default = ...)]` for options that are on unless turned off.
pub fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SourceSpec {
    Kafka(KafkaSource),
    S3(S3Source),
}

impl SourceSpec {
    pub fn transform(&self) -> Option<&str> {
        match self {
            SourceSpec::Kafka(k) => k.transform.as_deref(),
            SourceSpec::S3(s) => s.transform.as_deref(),
        }
    }

    pub fn set_transform(&mut self, sql: Option<String>) {
        match self {
            SourceSpec::Kafka(k) => k.transform = sql,
            SourceSpec::S3(s) => s.transform = sql,
        }
    }

    /// Where the source reads: the topic, or `s3://bucket/prefix`.
    pub fn location(&self) -> String {
        match self {
            SourceSpec::Kafka(k) => k.topic.clone(),
            SourceSpec::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix),
        }
    }
}

/// An object an S3 source found: ingested once per (key, ETag). Its number is the "partition"
/// its records' positions are kept under (record = line or row index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceObject {
    pub number: i32,
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub done: bool,
}

/// An object seen in a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoundObject {
    pub key: String,
    pub etag: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Never reused (shares the id sequence of collections).
    pub id: u64,
    pub name: CollectionName,
    pub collection: CollectionName,
    pub spec: SourceSpec,
    pub created_at_us: i64,
    /// Where records that fail to decode go (`<source>_errors`, created with the source and
    /// kept when it is dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<CollectionName>,
    /// Collections that aggregate this source's records at ingest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollups: Vec<RollupInfo>,
}

/// A collection maintained by a source's records grouped at ingest: `sql` is
/// `SELECT keys..., aggregates... FROM _input [WHERE ...] GROUP BY ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollupInfo {
    pub collection: CollectionName,
    pub sql: String,
}

/// What a tailer reports about one partition it ingests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub source_id: u64,
    pub partition: i32,
    /// The tailer process working on it.
    pub member: String,
    /// `running`, `starting` or `retrying`.
    pub state: String,
    /// Next offset to read.
    pub next_offset: i64,
    /// The partition's high watermark when last asked (-1: unknown).
    pub high_watermark: i64,
    pub documents: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// Payload bytes read (objects: of the object so far).
    #[serde(default)]
    pub bytes: u64,
    /// S3 sources: the object's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocStatus {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<BasaltError>,
}

impl DocStatus {
    pub fn ok(id: impl Into<String>) -> Self {
        Self { id: Some(id.into()), status: "ok".into(), error: None }
    }
    pub fn error(id: Option<String>, error: BasaltError) -> Self {
        Self { id, status: "error".into(), error: Some(error) }
    }
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardWriteResult {
    pub statuses: Vec<DocStatus>,
    /// The shard's log sequence number after this write (durable).
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteResponse {
    /// One status per input, in input order.
    pub statuses: Vec<DocStatus>,
    /// `shard:seq` pairs of the shards this write touched, comma-separated.
    pub last_offset: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanRequest {
    pub collection_id: u64,
    pub shard: u32,
    /// Output columns, in order, with the collection-wide type each must have.
    pub columns: Vec<(String, ColumnType)>,
    /// Conjunction of filters; the leaf applies all of them.
    pub filters: Vec<Filter>,
    pub limit: Option<usize>,
    pub hint: Option<AccessPath>,
    /// Rows must come in ascending order of this output column (nulls last), as the planner
    /// promised DataFusion from the leaves' statistics ([`SchemaStats::ascending`]); the limit
    /// then keeps the first rows in that order.
    ///
    /// [`SchemaStats::ascending`]: crate::schema::SchemaStats::ascending
    #[serde(default)]
    pub ordered_by: Option<String>,
    /// Text columns as `Utf8View`, views of the stored blocks' strings (no string copied, and
    /// the filter then moves 16-byte views instead of rebuilding offsets and copying bytes):
    /// for a reader in the leaf's own process. Over the wire text goes as `Utf8`, compact (a
    /// view array would carry its blocks' whole string buffers).
    #[serde(default)]
    pub text_views: bool,
    /// Text columns (of `columns`) returned as `Dictionary(UInt32, Utf8)`: codes into the
    /// distinct values of each block (`Block::text_dictionary`, kept for filters), so a
    /// grouping over them looks codes up instead of hashing and comparing strings; blocks
    /// without a dictionary give each row its own code. For a reader in the leaf's process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text_codes: Vec<String>,
}

pub type BatchStream = BoxStream<'static, Result<RecordBatch>>;

/// How many documents a scan's filters select, as far as the leaves can tell without reading
/// them: live documents, and how many the search index finds for the filters it can answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    pub live_docs: u64,
    /// Documents the search index matches for the index-answerable filters (an upper bound:
    /// versions replaced since the index last merged count too); None when no filter is.
    pub index_matches: Option<u64>,
}

impl Estimate {
    pub fn add(&mut self, other: Estimate) {
        self.live_docs += other.live_docs;
        self.index_matches = match (self.index_matches, other.index_matches) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
    }
}

/// A plan fragment to run on one shard: an encoded DataFusion physical plan (datafusion-proto)
/// whose only leaf is a scan of that shard. The aggregator sends the part of a query that works
/// shard by shard (filters, projections, partial aggregates, top-k) so only its result moves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FragmentRequest {
    pub collection_id: u64,
    pub shard: u32,
    #[serde(with = "base64_bytes")]
    pub plan: Vec<u8>,
    /// Filters for the fragment's scan known only once the query runs (a hash join's build-side
    /// keys and bounds), added to the scan's own.
    #[serde(default)]
    pub filters: Vec<Filter>,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// What a leaf serves: shard writes, scans and statistics.
#[async_trait]
pub trait LeafApi: Send + Sync + 'static {
    /// Apply a write to one shard; returns after it is durable.
    async fn apply(&self, write: ShardWrite) -> Result<ShardWriteResult>;
    async fn scan(&self, request: ScanRequest) -> Result<BatchStream>;
    /// Run a plan fragment over one shard. Leaf processes serve this through
    /// `basalt_fragment::FragmentLeaf`, which wraps the storage leaf (DataFusion stays out of
    /// the storage crate).
    async fn execute(&self, request: FragmentRequest) -> Result<BatchStream> {
        let _ = request;
        Err(BasaltError::unsupported("this leaf does not run plan fragments"))
    }
    /// Merged statistics of the given shards of one collection.
    async fn stats(&self, collection_id: u64, shards: Vec<u32>) -> Result<SchemaStats>;
    /// `stats` for planning: the paths each shard scans in ascending order and, with
    /// `sketches`, distinct-value sketches per column, for planning joins (reads every column
    /// once per shard, then cached; the plain statistics never pay for either).
    async fn planner_stats(&self, collection_id: u64, shards: Vec<u32>, sketches: bool) -> Result<SchemaStats> {
        let _ = sketches;
        self.stats(collection_id, shards).await
    }
    /// How selective `filters` are on the given shards (for the access-path choice).
    async fn estimate(&self, collection_id: u64, shards: Vec<u32>, filters: Vec<Filter>) -> Result<Estimate> {
        let _ = (collection_id, shards, filters);
        Err(BasaltError::unsupported("this leaf does not estimate"))
    }
    async fn drop_collection(&self, collection_id: u64) -> Result<()>;
    /// Whether the leaf runs in this process: what a call sends or returns crosses no network
    /// (a broadcast join saves nothing then; see `basalt_fragment::broadcast`).
    fn in_process(&self) -> bool {
        false
    }
    /// How far each of the given shards has applied each partition of a source.
    async fn positions(&self, collection_id: u64, shards: Vec<u32>, stream: u64) -> Result<Vec<ShardPosition>>;
}

/// What a tailer serves: validated, routed writes.
#[async_trait]
pub trait TailerApi: Send + Sync + 'static {
    async fn write(&self, request: WriteRequest) -> Result<WriteResponse>;
}

/// The catalog: workspaces and collections. Local file now, openraft later.
#[async_trait]
pub trait MetaApi: Send + Sync + 'static {
    async fn create_workspace(&self, name: String, if_not_exists: bool) -> Result<()>;
    async fn list_workspaces(&self) -> Result<Vec<String>>;
    async fn create_collection(&self, name: CollectionName, shards: u32, if_not_exists: bool)
    -> Result<CollectionInfo>;
    /// Returns the dropped collection, or None when it did not exist and `if_exists` was set.
    async fn drop_collection(&self, name: CollectionName, if_exists: bool) -> Result<Option<CollectionInfo>>;
    async fn get_collection(&self, name: CollectionName) -> Result<CollectionInfo>;
    async fn list_collections(&self, workspace: Option<String>) -> Result<Vec<CollectionInfo>>;
    async fn create_source(
        &self,
        name: CollectionName,
        collection: CollectionName,
        spec: SourceSpec,
        if_not_exists: bool,
    ) -> Result<SourceInfo>;
    async fn drop_source(&self, name: CollectionName, if_exists: bool) -> Result<Option<SourceInfo>>;
    async fn list_sources(&self) -> Result<Vec<SourceInfo>>;
    /// Create collection `name` kept up to date by `source`'s records aggregated with `sql`.
    async fn create_rollup(
        &self,
        name: CollectionName,
        shards: u32,
        source: CollectionName,
        sql: String,
        if_not_exists: bool,
    ) -> Result<CollectionInfo>;
    /// A tailer's lease renewal with what it reports about its partitions; returns the live
    /// tailers (those heard from within the lease), sorted: sources' partitions are split
    /// among them.
    async fn source_heartbeat(&self, member: String, report: Vec<PartitionStatus>) -> Result<Vec<String>>;
    /// The latest reports of live tailers.
    async fn source_status(&self) -> Result<Vec<PartitionStatus>>;
    /// Record the objects an S3 source's listing found (new (key, ETag) pairs get the next
    /// number) and return all its objects, oldest first.
    async fn source_objects(&self, source_id: u64, found: Vec<FoundObject>) -> Result<Vec<SourceObject>>;
    /// Mark an object ingested (every shard has its end position).
    async fn source_object_done(&self, source_id: u64, number: i32) -> Result<()>;
}

macro_rules! opaque_debug {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for dyn $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(stringify!($t))
            }
        }
    )*};
}
opaque_debug!(LeafApi, TailerApi, MetaApi);

pub type Leaf = Arc<dyn LeafApi>;
pub type Tailer = Arc<dyn TailerApi>;
pub type Meta = Arc<dyn MetaApi>;
