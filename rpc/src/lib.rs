//! The RPC layer between tiers: Arrow Flight over gRPC (tonic). A process serves the tier traits
//! it hosts; [`Client`] implements the same traits against a remote process, so callers cannot
//! tell a remote tier from a local one.
//!
//! Wire format: scans and plan fragments are `DoGet` with a JSON ticket (`{"scan": ScanRequest}`
//! or `{"fragment": FragmentRequest}`), answered by Arrow IPC record batches. Every other call is `DoAction` with a JSON body; the single result is the JSON
//! value, or `{"err": BasaltError}` on failure, so error codes survive the hop. Transport failures
//! become `unavailable` errors.
//!
//! Invariants: this crate is the only one that knows tonic and arrow-flight.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse,
    PollInfo, PutResult, SchemaResult, Ticket,
};
use async_trait::async_trait;
use basalt_common::api::{
    BatchStream, CollectionInfo, CollectionName, Estimate, FragmentRequest, Leaf, LeafApi, Meta, MetaApi,
    PartitionStatus, ScanRequest, ShardPosition, ShardWrite, ShardWriteResult, SourceInfo, SourceSpec, Tailer,
    TailerApi, WriteRequest, WriteResponse,
};
use basalt_common::filter::Filter;
use basalt_common::schema::SchemaStats;
use basalt_common::{BasaltError, Result};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use prometheus::{HistogramVec, register_histogram_vec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

/// Largest gRPC message either side accepts (scan batches are split well below this).
const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The tier traits one process serves.
#[derive(Clone, Default)]
pub struct Services {
    pub leaf: Option<Leaf>,
    pub meta: Option<Meta>,
    pub tailer: Option<Tailer>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Err(BasaltError),
}

/// What a `DoGet` ticket asks a leaf for.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LeafTicket {
    Scan(ScanRequest),
    Fragment(FragmentRequest),
}

#[derive(Serialize, Deserialize)]
struct Stats {
    collection_id: u64,
    shards: Vec<u32>,
    /// `leaf.planner_stats` only.
    #[serde(default)]
    sketches: bool,
}

#[derive(Serialize, Deserialize)]
struct EstimateArgs {
    collection_id: u64,
    shards: Vec<u32>,
    filters: Vec<Filter>,
}

#[derive(Serialize, Deserialize)]
struct CreateWorkspace {
    name: String,
    if_not_exists: bool,
}

#[derive(Serialize, Deserialize)]
struct CreateCollection {
    name: CollectionName,
    shards: u32,
    if_not_exists: bool,
}

#[derive(Serialize, Deserialize)]
struct DropCollection {
    name: CollectionName,
    if_exists: bool,
}

#[derive(Serialize, Deserialize)]
struct Positions {
    collection_id: u64,
    shards: Vec<u32>,
    stream: u64,
}

#[derive(Serialize, Deserialize)]
struct CreateSource {
    name: CollectionName,
    collection: CollectionName,
    spec: SourceSpec,
    if_not_exists: bool,
}

#[derive(Serialize, Deserialize)]
struct CreateRollup {
    name: CollectionName,
    shards: u32,
    source: CollectionName,
    sql: String,
    if_not_exists: bool,
}

#[derive(Serialize, Deserialize)]
struct SourceObjects {
    source_id: u64,
    found: Vec<basalt_common::api::FoundObject>,
}

#[derive(Serialize, Deserialize)]
struct ObjectDone {
    source_id: u64,
    number: i32,
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    member: String,
    report: Vec<PartitionStatus>,
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| BasaltError::invalid(format!("rpc body: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| BasaltError::internal(format!("rpc encode: {e}")))
}

fn missing(service: &str) -> BasaltError {
    BasaltError::unavailable(format!("this process does not serve the {service} tier"))
}

impl Services {
    async fn dispatch(&self, action: &str, body: &[u8]) -> Result<Vec<u8>> {
        let leaf = || self.leaf.as_ref().ok_or_else(|| missing("leaf"));
        let meta = || self.meta.as_ref().ok_or_else(|| missing("meta"));
        match action {
            "leaf.apply" => encode(&leaf()?.apply(decode(body)?).await?),
            "leaf.stats" => {
                let s: Stats = decode(body)?;
                encode(&leaf()?.stats(s.collection_id, s.shards).await?)
            }
            "leaf.planner_stats" => {
                let s: Stats = decode(body)?;
                encode(&leaf()?.planner_stats(s.collection_id, s.shards, s.sketches).await?)
            }
            "leaf.estimate" => {
                let a: EstimateArgs = decode(body)?;
                encode(&leaf()?.estimate(a.collection_id, a.shards, a.filters).await?)
            }
            "leaf.drop_collection" => encode(&leaf()?.drop_collection(decode(body)?).await?),
            "leaf.positions" => {
                let a: Positions = decode(body)?;
                encode(&leaf()?.positions(a.collection_id, a.shards, a.stream).await?)
            }
            "meta.create_source" => {
                let a: CreateSource = decode(body)?;
                encode(&meta()?.create_source(a.name, a.collection, a.spec, a.if_not_exists).await?)
            }
            "meta.drop_source" => {
                let a: DropCollection = decode(body)?;
                encode(&meta()?.drop_source(a.name, a.if_exists).await?)
            }
            "meta.list_sources" => encode(&meta()?.list_sources().await?),
            "meta.create_rollup" => {
                let a: CreateRollup = decode(body)?;
                encode(&meta()?.create_rollup(a.name, a.shards, a.source, a.sql, a.if_not_exists).await?)
            }
            "meta.source_heartbeat" => {
                let a: Heartbeat = decode(body)?;
                encode(&meta()?.source_heartbeat(a.member, a.report).await?)
            }
            "meta.source_status" => encode(&meta()?.source_status().await?),
            "meta.source_objects" => {
                let a: SourceObjects = decode(body)?;
                encode(&meta()?.source_objects(a.source_id, a.found).await?)
            }
            "meta.source_object_done" => {
                let a: ObjectDone = decode(body)?;
                encode(&meta()?.source_object_done(a.source_id, a.number).await?)
            }
            "meta.create_workspace" => {
                let a: CreateWorkspace = decode(body)?;
                encode(&meta()?.create_workspace(a.name, a.if_not_exists).await?)
            }
            "meta.list_workspaces" => encode(&meta()?.list_workspaces().await?),
            "meta.create_collection" => {
                let a: CreateCollection = decode(body)?;
                encode(&meta()?.create_collection(a.name, a.shards, a.if_not_exists).await?)
            }
            "meta.drop_collection" => {
                let a: DropCollection = decode(body)?;
                encode(&meta()?.drop_collection(a.name, a.if_exists).await?)
            }
            "meta.get_collection" => encode(&meta()?.get_collection(decode(body)?).await?),
            "meta.list_collections" => encode(&meta()?.list_collections(decode(body)?).await?),
            "tailer.write" => {
                let tailer = self.tailer.as_ref().ok_or_else(|| missing("tailer"))?;
                encode(&tailer.write(decode(body)?).await?)
            }
            other => Err(BasaltError::invalid(format!("{UNKNOWN_ACTION} {other:?}"))),
        }
    }
}

type Stream<T> = BoxStream<'static, std::result::Result<T, Status>>;

fn unimplemented<T>(what: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!("{what} is not part of basalt's rpc")))
}

#[async_trait]
impl FlightService for Services {
    type HandshakeStream = Stream<HandshakeResponse>;
    type ListFlightsStream = Stream<FlightInfo>;
    type DoGetStream = Stream<FlightData>;
    type DoPutStream = Stream<PutResult>;
    type DoExchangeStream = Stream<FlightData>;
    type DoActionStream = Stream<arrow_flight::Result>;
    type ListActionsStream = Stream<ActionType>;

    async fn handshake(
        &self,
        _r: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("handshake")
    }
    async fn list_flights(
        &self,
        _r: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("list_flights")
    }
    async fn get_flight_info(
        &self,
        _r: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        unimplemented("get_flight_info")
    }
    async fn poll_flight_info(&self, _r: Request<FlightDescriptor>) -> std::result::Result<Response<PollInfo>, Status> {
        unimplemented("poll_flight_info")
    }
    async fn get_schema(&self, _r: Request<FlightDescriptor>) -> std::result::Result<Response<SchemaResult>, Status> {
        unimplemented("get_schema")
    }
    async fn do_put(
        &self,
        _r: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        unimplemented("do_put")
    }
    async fn do_exchange(
        &self,
        _r: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("do_exchange")
    }
    async fn list_actions(&self, _r: Request<Empty>) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        unimplemented("list_actions")
    }

    async fn do_get(&self, request: Request<Ticket>) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let started = Instant::now();
        let leaf = self.leaf.clone().ok_or_else(|| error_status(missing("leaf")))?;
        let ticket: LeafTicket = decode(&request.into_inner().ticket).map_err(error_status)?;
        let (call, batches) = match ticket {
            LeafTicket::Scan(scan) => ("leaf.scan", leaf.scan(scan).await),
            LeafTicket::Fragment(fragment) => ("leaf.execute", leaf.execute(fragment).await),
        };
        served(call, started);
        let batches = batches.map_err(error_status)?;
        let batches = batches.map_err(|e| FlightError::Tonic(Box::new(error_status(e))));
        let stream = FlightDataEncoderBuilder::new().build(batches).map_err(|e| match e {
            FlightError::Tonic(status) => *status,
            other => Status::internal(other.to_string()),
        });
        Ok(Response::new(stream.boxed()))
    }

    async fn do_action(&self, request: Request<Action>) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let started = Instant::now();
        let reply = self.dispatch(&action.r#type, &action.body).await;
        served(action_label(&action.r#type, &reply), started);
        let reply = match reply {
            Ok(body) => body,
            Err(e) => encode(&Reply::Err(e)).map_err(error_status)?,
        };
        let result = arrow_flight::Result { body: reply.into() };
        Ok(Response::new(futures::stream::once(async move { Ok(result) }).boxed()))
    }
}

/// Calls this process served, by call, and how long each took until its answer (for a scan or a
/// fragment: until its stream was ready, the batches follow).
static CALLS: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!(
        "basalt_rpc_served_seconds",
        "RPC calls served from other tiers by call: time until the answer (scans: until the stream starts)",
        &["call"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
    )
    .ok()
});

fn served(call: &str, started: Instant) {
    if let Some(h) = CALLS.as_ref() {
        h.with_label_values(&[call]).observe(started.elapsed().as_secs_f64());
    }
}

/// How [`Services::dispatch`] starts its error for an action it does not know.
const UNKNOWN_ACTION: &str = "unknown rpc action";

/// The metric label of an action: its name, or `unknown` for a name [`Services::dispatch`]
/// rejected (a caller controls the name; the label set stays bounded).
fn action_label<'a>(name: &'a str, reply: &Result<Vec<u8>>) -> &'a str {
    match reply {
        Err(e) if e.code == basalt_common::ErrorCode::InvalidInput && e.message.starts_with(UNKNOWN_ACTION) => {
            "unknown"
        }
        _ => name,
    }
}

/// A Basalt error carried in a gRPC status (scan errors) as JSON in the message.
fn error_status(e: BasaltError) -> Status {
    Status::aborted(serde_json::to_string(&e).unwrap_or_else(|_| e.message.clone()))
}

fn status_error(s: Status) -> BasaltError {
    if s.code() == tonic::Code::Aborted
        && let Ok(e) = serde_json::from_str::<BasaltError>(s.message())
    {
        return e;
    }
    BasaltError::unavailable(format!("rpc: {}: {}", s.code(), s.message()))
}

/// Serve `services` on `listener` until it fails.
///
/// Accepted connections set `TCP_NODELAY` (tonic leaves Nagle's algorithm on): a response's
/// last small frame otherwise waits for the client's delayed ACK, 40 ms or more per call.
pub async fn serve(listener: tokio::net::TcpListener, services: Services) -> std::io::Result<()> {
    let svc = FlightServiceServer::new(services)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .map_err(std::io::Error::other)
}

/// A connection to a remote process; implements every tier trait (calls fail with
/// `unavailable` when the remote does not serve that tier). Connects lazily and reconnects.
#[derive(Clone)]
pub struct Client {
    inner: FlightServiceClient<Channel>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| BasaltError::invalid(format!("bad rpc address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let inner = FlightServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        Ok(Client { inner })
    }

    /// A `DoGet`: the leaf's Arrow IPC batches as a stream.
    async fn get(&self, ticket: &LeafTicket) -> Result<BatchStream> {
        let ticket = Ticket { ticket: encode(ticket)?.into() };
        let stream = self.inner.clone().do_get(ticket).await.map_err(status_error)?.into_inner();
        let batches = FlightRecordBatchStream::new_from_flight_data(
            stream.map_err(|s| FlightError::Tonic(Box::new(s))),
        )
        .map_err(|e| match e {
            FlightError::Tonic(s) => status_error(*s),
            other => BasaltError::internal(format!("rpc do_get: {other}")),
        });
        Ok(batches.boxed())
    }

    async fn call<A: Serialize, T: DeserializeOwned>(&self, action: &str, arg: &A) -> Result<T> {
        let request = Action { r#type: action.to_string(), body: encode(arg)?.into() };
        let mut stream = self.inner.clone().do_action(request).await.map_err(status_error)?.into_inner();
        let first = stream
            .message()
            .await
            .map_err(status_error)?
            .ok_or_else(|| BasaltError::unavailable(format!("rpc {action}: empty reply")))?;
        // Errors are `{"err": ...}`; results are the plain value.
        if let Ok(Reply::Err(e)) = serde_json::from_slice(&first.body) {
            return Err(e);
        }
        serde_json::from_slice(&first.body).map_err(|e| BasaltError::internal(format!("rpc {action} reply: {e}")))
    }
}

#[async_trait]
impl LeafApi for Client {
    async fn apply(&self, write: ShardWrite) -> Result<ShardWriteResult> {
        self.call("leaf.apply", &write).await
    }

    async fn scan(&self, request: ScanRequest) -> Result<BatchStream> {
        self.get(&LeafTicket::Scan(request)).await
    }

    async fn execute(&self, request: FragmentRequest) -> Result<BatchStream> {
        self.get(&LeafTicket::Fragment(request)).await
    }

    async fn stats(&self, collection_id: u64, shards: Vec<u32>) -> Result<SchemaStats> {
        self.call("leaf.stats", &Stats { collection_id, shards, sketches: false }).await
    }

    async fn planner_stats(&self, collection_id: u64, shards: Vec<u32>, sketches: bool) -> Result<SchemaStats> {
        self.call("leaf.planner_stats", &Stats { collection_id, shards, sketches }).await
    }

    async fn estimate(&self, collection_id: u64, shards: Vec<u32>, filters: Vec<Filter>) -> Result<Estimate> {
        self.call("leaf.estimate", &EstimateArgs { collection_id, shards, filters }).await
    }

    async fn drop_collection(&self, collection_id: u64) -> Result<()> {
        self.call("leaf.drop_collection", &collection_id).await
    }

    async fn positions(&self, collection_id: u64, shards: Vec<u32>, stream: u64) -> Result<Vec<ShardPosition>> {
        self.call("leaf.positions", &Positions { collection_id, shards, stream }).await
    }
}

#[async_trait]
impl MetaApi for Client {
    async fn create_workspace(&self, name: String, if_not_exists: bool) -> Result<()> {
        self.call("meta.create_workspace", &CreateWorkspace { name, if_not_exists }).await
    }
    async fn list_workspaces(&self) -> Result<Vec<String>> {
        self.call("meta.list_workspaces", &()).await
    }
    async fn create_collection(
        &self,
        name: CollectionName,
        shards: u32,
        if_not_exists: bool,
    ) -> Result<CollectionInfo> {
        self.call("meta.create_collection", &CreateCollection { name, shards, if_not_exists }).await
    }
    async fn drop_collection(&self, name: CollectionName, if_exists: bool) -> Result<Option<CollectionInfo>> {
        self.call("meta.drop_collection", &DropCollection { name, if_exists }).await
    }
    async fn get_collection(&self, name: CollectionName) -> Result<CollectionInfo> {
        self.call("meta.get_collection", &name).await
    }
    async fn list_collections(&self, workspace: Option<String>) -> Result<Vec<CollectionInfo>> {
        self.call("meta.list_collections", &workspace).await
    }
    async fn create_source(
        &self,
        name: CollectionName,
        collection: CollectionName,
        spec: SourceSpec,
        if_not_exists: bool,
    ) -> Result<SourceInfo> {
        self.call("meta.create_source", &CreateSource { name, collection, spec, if_not_exists }).await
    }
    async fn drop_source(&self, name: CollectionName, if_exists: bool) -> Result<Option<SourceInfo>> {
        self.call("meta.drop_source", &DropCollection { name, if_exists }).await
    }
    async fn list_sources(&self) -> Result<Vec<SourceInfo>> {
        self.call("meta.list_sources", &()).await
    }
    async fn create_rollup(
        &self,
        name: CollectionName,
        shards: u32,
        source: CollectionName,
        sql: String,
        if_not_exists: bool,
    ) -> Result<CollectionInfo> {
        self.call("meta.create_rollup", &CreateRollup { name, shards, source, sql, if_not_exists }).await
    }
    async fn source_heartbeat(&self, member: String, report: Vec<PartitionStatus>) -> Result<Vec<String>> {
        self.call("meta.source_heartbeat", &Heartbeat { member, report }).await
    }
    async fn source_status(&self) -> Result<Vec<PartitionStatus>> {
        self.call("meta.source_status", &()).await
    }
    async fn source_objects(
        &self,
        source_id: u64,
        found: Vec<basalt_common::api::FoundObject>,
    ) -> Result<Vec<basalt_common::api::SourceObject>> {
        self.call("meta.source_objects", &SourceObjects { source_id, found }).await
    }
    async fn source_object_done(&self, source_id: u64, number: i32) -> Result<()> {
        self.call("meta.source_object_done", &ObjectDone { source_id, number }).await
    }
}

#[async_trait]
impl TailerApi for Client {
    async fn write(&self, request: WriteRequest) -> Result<WriteResponse> {
        self.call("tailer.write", &request).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use basalt_common::ErrorCode;
    use basalt_common::api::WriteOp;
    use basalt_common::doc::{DocLimits, validate_value};
    use basalt_common::schema::ColumnType;
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn served_actions_are_labelled_by_name_and_unknown_ones_share_a_label() {
        let services = Services::default();
        // A known action this process does not serve still has its own label.
        let reply = services.dispatch("leaf.stats", b"{}").await;
        assert!(reply.is_err());
        assert_eq!(action_label("leaf.stats", &reply), "leaf.stats");
        let reply = services.dispatch("made.up", b"{}").await;
        assert_eq!(reply.as_ref().map_err(|e| e.code).err(), Some(ErrorCode::InvalidInput));
        assert_eq!(action_label("made.up", &reply), "unknown");
        assert_eq!(action_label("made.up", &Ok(vec![])), "made.up");
    }

    #[tokio::test]
    async fn remote_tiers_behave_like_local_ones() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = basalt_leaf::Leaf::open(&basalt_leaf::LeafConfig {
            data_dir: dir.path().join("leaf"),
            ..Default::default()
        })
        .unwrap();
        let meta: Meta = Arc::new(basalt_meta::LocalMeta::open(&dir.path().join("meta")).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Services { leaf: Some(Arc::new(leaf)), meta: Some(meta), tailer: None }));
        let client = Client::connect(addr).unwrap();
        let info = client.create_collection(CollectionName::new("commons", "c"), 1, false).await.unwrap();
        let err = client.create_collection(CollectionName::new("commons", "c"), 1, false).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::AlreadyExists);
        let doc = validate_value(json!({"_id": "a", "n": 1}), &DocLimits::default()).unwrap();
        let r = client
            .apply(ShardWrite {
                collection_id: info.id,
                shard: 0,
                ops: vec![WriteOp::Upsert { doc: doc.into() }],
                position: None,
            })
            .await
            .unwrap();
        assert_eq!(r.seq, 1);
        let stats = client.stats(info.id, vec![0]).await.unwrap();
        assert_eq!(stats.doc_count, 1);
        let req = ScanRequest {
            collection_id: info.id,
            shard: 0,
            columns: vec![("n".into(), ColumnType::Int64)],
            filters: vec![],
            limit: None,
            hint: None,
            ordered_by: None,
            text_views: false,
            text_codes: vec![],
        };
        let rows: usize =
            client.scan(req).await.unwrap().map(|b| b.unwrap().num_rows()).fold(0, |a, b| async move { a + b }).await;
        assert_eq!(rows, 1);
        let err =
            TailerApi::write(&client, WriteRequest { collection: CollectionName::new("commons", "c"), inputs: vec![] })
                .await
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        let down = Client::connect("127.0.0.1:1".parse().unwrap()).unwrap();
        assert_eq!(down.list_workspaces().await.unwrap_err().code, ErrorCode::Unavailable);
    }
}
