//! Arrow Flight SQL on the aggregator (default port 50051): for result sets too large to want row
//! by row over pgwire, from ADBC (`adbc-driver-flightsql`), pyarrow and JDBC/ODBC Flight SQL
//! drivers.
//!
//! Statements run in a fresh [`Session`](crate::engine::Session) each, like HTTP requests. A
//! statement or prepared-statement handle is the SQL text (and bound parameters) as JSON, so any
//! aggregator can serve any ticket. A query is planned once: at `CreatePreparedStatement` (ADBC
//! prepares every statement it runs) or `GetFlightInfo` (its schema is the answer's), and that
//! plan, with its session, is kept for a while ([`Planned`]): the `GetFlightInfo` and `DoGet`
//! that follow on the same aggregator use it, and `DoGet` streams record batches as the leaves
//! produce them; a call elsewhere, later, with parameters bound or for the same handle again
//! plans from the handle's SQL. Statements that return no rows (DDL, writes) run at `GetFlightInfo`
//! and their ticket carries the command tag and row count.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandPreparedStatementUpdate, CommandStatementQuery, CommandStatementUpdate,
    DoPutPreparedStatementResult, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use basalt_common::{BasaltError, ErrorCode};
use basalt_sql::BasaltStatement;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use futures::{Stream, TryStreamExt};
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Engine, Output, Session, from_df};

/// Largest gRPC message in either direction (a batch of results or of parameters).
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What a statement handle or ticket carries.
#[derive(Serialize, Deserialize, Default)]
struct Handle {
    #[serde(default)]
    sql: String,
    /// Bound parameters ($1, $2, ...), as JSON values.
    #[serde(default)]
    params: Vec<Value>,
    /// A statement that already ran at GetFlightInfo: its command tag and row count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    done: Option<(String, u64)>,
    /// The key of the plan GetFlightInfo kept on the aggregator that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    planned: Option<String>,
}

impl Handle {
    fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    fn decode(bytes: &[u8]) -> Result<Self, Status> {
        serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("bad statement handle: {e}")))
    }

    fn scalars(&self) -> Vec<ScalarValue> {
        self.params.iter().map(crate::http::param).collect()
    }
}

/// A Basalt error as a gRPC status (the SQLSTATE in the message, as clients show it).
fn status(e: BasaltError) -> Status {
    let message = format!("{} (SQLSTATE {})", e.message, e.code.sqlstate());
    match e.code {
        ErrorCode::InvalidInput | ErrorCode::Syntax | ErrorCode::UndefinedColumn => Status::invalid_argument(message),
        ErrorCode::NotFound => Status::not_found(message),
        ErrorCode::AlreadyExists => Status::already_exists(message),
        ErrorCode::LimitExceeded => Status::resource_exhausted(message),
        ErrorCode::Unsupported => Status::unimplemented(message),
        ErrorCode::Unavailable => Status::unavailable(message),
        ErrorCode::Conflict => Status::aborted(message),
        ErrorCode::Canceled => Status::cancelled(message),
        ErrorCode::OutOfMemory => Status::resource_exhausted(message),
        ErrorCode::Internal => Status::internal(message),
    }
}

fn command_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("command", DataType::Utf8, false),
        Field::new("rows", DataType::Int64, false),
    ]))
}

fn command_batch(tag: &str, rows: u64) -> Result<RecordBatch, Status> {
    RecordBatch::try_new(
        command_schema(),
        vec![
            Arc::new(StringArray::from(vec![tag.to_string()])) as ArrayRef,
            Arc::new(Int64Array::from(vec![i64::try_from(rows).unwrap_or(i64::MAX)])),
        ],
    )
    .map_err(|e| Status::internal(e.to_string()))
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let message: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(message.0)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How many plans GetFlightInfo keeps for their DoGet, and for how long. A client that never
/// calls DoGet leaves its plan until one of these bounds drops it.
const PLANNED_MAX: usize = 256;
const PLANNED_TTL: Duration = Duration::from_secs(60);

/// A query planned at GetFlightInfo, with the session that planned it (its catalog and the
/// statement's hints), for the DoGet that runs it.
struct Planned {
    session: Session,
    plan: LogicalPlan,
    /// What the plan answers: a ticket runs it only if its own statement is this one.
    sql: String,
    params: Vec<Value>,
    at: Instant,
}

static PLANS: LazyLock<Option<prometheus::IntCounterVec>> = LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "basalt_flight_plans_total",
        "Flight SQL DoGet queries by whether they ran the plan GetFlightInfo made (reused) or planned again",
        &["plan"]
    )
    .ok()
});

static PREPARED: LazyLock<Option<prometheus::IntCounterVec>> = LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "basalt_flight_prepared_plans_total",
        "Flight SQL GetFlightInfo calls for a prepared statement by whether they used the plan \
         CreatePreparedStatement made (reused) or planned again",
        &["plan"]
    )
    .ok()
});

pub struct FlightSql {
    engine: Arc<Engine>,
    planned: parking_lot::Mutex<HashMap<String, Planned>>,
}

impl FlightSql {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine, planned: Default::default() }
    }

    /// Keep `handle`'s plan for the calls that follow; its key goes into the handle.
    fn keep(&self, handle: &Handle, session: Session, plan: LogicalPlan) -> String {
        let planned =
            Planned { session, plan, sql: handle.sql.clone(), params: handle.params.clone(), at: Instant::now() };
        let key = uuid::Uuid::new_v4().simple().to_string();
        let mut kept = self.planned.lock();
        kept.retain(|_, p| p.at.elapsed() < PLANNED_TTL);
        while kept.len() >= PLANNED_MAX {
            let Some(oldest) = kept.iter().min_by_key(|(_, p)| p.at).map(|(k, _)| k.clone()) else { break };
            kept.remove(&oldest);
        }
        kept.insert(key.clone(), planned);
        key
    }

    /// The plan kept for a ticket, once: a second DoGet of the ticket plans again.
    fn take(&self, handle: &Handle) -> Option<(Session, LogicalPlan)> {
        let key = handle.planned.as_ref()?;
        let planned = self.planned.lock().remove(key)?;
        (planned.at.elapsed() < PLANNED_TTL && planned.sql == handle.sql && planned.params == handle.params)
            .then_some((planned.session, planned.plan))
    }

    fn one_statement(session: &Session, sql: &str) -> Result<BasaltStatement, Status> {
        let mut statements = session.parse(sql).map_err(status)?;
        if statements.len() != 1 {
            return Err(Status::invalid_argument(format!(
                "a Flight SQL statement is one SQL statement, not {}",
                statements.len()
            )));
        }
        statements.pop().ok_or_else(|| Status::invalid_argument("empty statement"))
    }

    /// Plan a query for its schema (it runs at DoGet), or run a statement that returns no rows
    /// now; either way a FlightInfo with one endpoint whose ticket runs or replays it.
    async fn flight_info(&self, mut handle: Handle, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        // The plan CreatePreparedStatement made, if it is this handle's.
        if let Some((session, plan)) = self.take(&handle) {
            crate::engine::count(&PREPARED, "reused");
            let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
            handle.planned = Some(self.keep(&handle, session, plan));
            return Self::info(handle, &schema, descriptor);
        }
        if handle.planned.take().is_some() {
            crate::engine::count(&PREPARED, "planned");
        }
        let session = self.engine.session();
        let stmt = Self::one_statement(&session, &handle.sql)?;
        let (described, plan) = session.prepare(&stmt, &handle.scalars()).await.map_err(status)?;
        let schema = match (plan, described.output) {
            (Some(plan), Some(schema)) => {
                handle.planned = Some(self.keep(&handle, session, plan));
                schema
            }
            (_, Some(schema)) => schema,
            (_, None) => {
                handle.done = Some(run_to_end(&session, stmt, &handle.scalars()).await?);
                command_schema()
            }
        };
        Self::info(handle, &schema, descriptor)
    }

    /// A FlightInfo with one endpoint whose ticket is `handle`.
    fn info(handle: Handle, schema: &Schema, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        let ticket = TicketStatementQuery { statement_handle: handle.encode() };
        let endpoint = FlightEndpoint::new().with_ticket(Ticket { ticket: ticket.as_any().encode_to_vec().into() });
        FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(e.to_string()))
            .map(|info| info.with_endpoint(endpoint).with_descriptor(descriptor).with_total_records(-1))
    }

    /// Run a handle's statement for DoGet, streaming its batches.
    async fn run(&self, handle: Handle) -> Result<BoxStream<arrow_flight::FlightData>, Status> {
        let (schema, batches): (SchemaRef, BoxStream<RecordBatch>) = match &handle.done {
            Some((tag, rows)) => {
                let batch = command_batch(tag, *rows)?;
                (batch.schema(), Box::pin(futures::stream::iter([Ok(batch)])))
            }
            None => {
                let output = match self.take(&handle) {
                    Some((session, plan)) => {
                        crate::engine::count(&PLANS, "reused");
                        session.execute_plan(plan).await
                    }
                    None => {
                        crate::engine::count(&PLANS, "planned");
                        let session = self.engine.session();
                        let stmt = Self::one_statement(&session, &handle.sql)?;
                        session.execute(stmt, &handle.scalars()).await
                    }
                };
                match output.map_err(status)? {
                    Output::Rows(stream) => {
                        (stream.schema(), Box::pin(stream.map_err(|e| status(from_df(e)))) as BoxStream<RecordBatch>)
                    }
                    Output::Command { tag, rows } => {
                        let batch = command_batch(tag, rows as u64)?;
                        (batch.schema(), Box::pin(futures::stream::iter([Ok(batch)])))
                    }
                }
            }
        };
        let flight = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_max_flight_data_size(4 * 1024 * 1024)
            .build(batches.map_err(|s| FlightError::Tonic(Box::new(s))))
            .map_err(|e| match e {
                FlightError::Tonic(s) => *s,
                other => Status::internal(other.to_string()),
            });
        Ok(Box::pin(flight))
    }

    async fn update(&self, handle: Handle) -> Result<i64, Status> {
        let session = self.engine.session();
        let stmt = Self::one_statement(&session, &handle.sql)?;
        let (_, rows) = run_to_end(&session, stmt, &handle.scalars()).await?;
        Ok(i64::try_from(rows).unwrap_or(i64::MAX))
    }
}

/// Run a statement to its end: its command tag and the rows it affected or returned.
async fn run_to_end(session: &Session, stmt: BasaltStatement, params: &[ScalarValue]) -> Result<(String, u64), Status> {
    match session.execute(stmt, params).await.map_err(status)? {
        Output::Command { tag, rows } => Ok((tag.to_string(), rows as u64)),
        Output::Rows(stream) => {
            let n = stream.try_fold(0u64, |n, b| async move { Ok(n + b.num_rows() as u64) }).await;
            Ok(("SELECT".to_string(), n.map_err(|e| status(from_df(e)))?))
        }
    }
}

static SQL_INFO: LazyLock<Option<SqlInfoData>> = LazyLock::new(|| {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Basalt");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    b.append(SqlInfo::FlightSqlServerReadOnly, false);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.build().ok()
});

/// FlightInfo for a metadata command: its ticket is the command itself, answered at DoGet.
fn metadata_info(
    command: impl ProstMessageExt,
    schema: &Schema,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket { ticket: command.as_any().encode_to_vec().into() });
    Ok(FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(e.to_string()))?
        .with_endpoint(endpoint)
        .with_descriptor(descriptor))
}

/// One batch as a DoGet answer.
fn one_batch(batch: Result<RecordBatch, FlightError>) -> <FlightSql as FlightService>::DoGetStream {
    let batch = batch.map_err(|e| FlightError::ExternalError(Box::new(e)));
    let stream = FlightDataEncoderBuilder::new()
        .build(futures::stream::iter([batch]))
        .map_err(|e| Status::internal(e.to_string()));
    Box::pin(stream)
}

/// Collections are tables and workspaces schemas (in the one catalog `basalt`).
const TABLE_TYPE: &str = "TABLE";

fn sql_info() -> Result<&'static SqlInfoData, Status> {
    SQL_INFO.as_ref().ok_or_else(|| Status::internal("server information is unavailable"))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        // No authentication yet (as on pgwire): every handshake is accepted.
        let response = HandshakeResponse { protocol_version: 0, payload: Default::default() };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(response)]))))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let handle = Handle { sql: query.query, ..Default::default() };
        Ok(Response::new(self.flight_info(handle, request.into_inner()).await?))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let handle = Handle::decode(&cmd.prepared_statement_handle)?;
        Ok(Response::new(self.flight_info(handle, request.into_inner()).await?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let handle = Handle::decode(&ticket.statement_handle)?;
        Ok(Response::new(self.run(handle).await?))
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let handle = Handle::decode(&cmd.prepared_statement_handle)?;
        Ok(Response::new(self.run(handle).await?))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(metadata_info(query, sql_info()?.schema().as_ref(), request.into_inner())?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Ok(Response::new(one_batch(query.into_builder(sql_info()?).build())))
    }

    async fn do_put_statement_update(
        &self,
        cmd: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.update(Handle { sql: cmd.query, ..Default::default() }).await
    }

    async fn do_put_prepared_statement_update(
        &self,
        cmd: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.update(Handle::decode(&cmd.prepared_statement_handle)?).await
    }

    /// Bind parameters: the first row of the batch the client sends becomes $1, $2, ...; the
    /// returned handle carries them.
    async fn do_put_prepared_statement_query(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let mut handle = Handle::decode(&cmd.prepared_statement_handle)?;
        let stream = request.into_inner().map_err(|s| FlightError::Tonic(Box::new(s)));
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(stream)
            .try_collect()
            .await
            .map_err(|e| Status::invalid_argument(format!("bad parameters: {e}")))?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows > 1 {
            return Err(Status::invalid_argument(format!("one parameter row per execution is supported, got {rows}")));
        }
        handle.params = match batches.iter().find(|b| b.num_rows() == 1) {
            Some(b) => b
                .columns()
                .iter()
                .map(|c| ScalarValue::try_from_array(c, 0).map(|v| crate::compat::scalar_json(&v)))
                .collect::<Result<_, _>>()
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            None => Vec::new(),
        };
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(handle.encode()) })
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let session = self.engine.session();
        let stmt = Self::one_statement(&session, &query.query)?;
        let mut handle = Handle { sql: query.query, ..Default::default() };
        let (described, plan) = session.prepare(&stmt, &[]).await.map_err(status)?;
        // Kept for the GetFlightInfo that runs the statement without parameters; with
        // parameters bound, it plans again with their values.
        if let Some(plan) = plan
            && described.params.is_empty()
        {
            handle.planned = Some(self.keep(&handle, session, plan));
        }
        let dataset = described.output.map(|s| s.as_ref().clone()).unwrap_or_else(Schema::empty);
        let params = Schema::new(
            described
                .params
                .iter()
                .enumerate()
                .map(|(i, t)| Field::new(format!("${}", i + 1), t.clone().unwrap_or(DataType::Utf8), true))
                .collect::<Vec<_>>(),
        );
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.encode(),
            dataset_schema: schema_bytes(&dataset)?,
            parameter_schema: schema_bytes(&params)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        // A plan kept for the statement and not used goes now; handles hold no other state.
        if let Ok(handle) = Handle::decode(&query.prepared_statement_handle)
            && let Some(key) = handle.planned
        {
            self.planned.lock().remove(&key);
        }
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Ok(Response::new(metadata_info(query, &schema, request.into_inner())?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        builder.append(crate::catalog::CATALOG);
        Ok(Response::new(one_batch(builder.build())))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(metadata_info(query, &schema, request.into_inner())?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for workspace in self.engine.meta.list_workspaces().await.map_err(status)? {
            builder.append(crate::catalog::CATALOG, workspace);
        }
        Ok(Response::new(one_batch(builder.build())))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(metadata_info(query, &schema, request.into_inner())?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let include_schema = query.include_schema;
        let mut builder = query.into_builder();
        for info in self.engine.meta.list_collections(None).await.map_err(status)? {
            // The table's Arrow schema (the columns the smart schema has seen), only if asked:
            // it costs a statistics call to every shard.
            let schema = if include_schema {
                let shards = (0..info.shards).collect();
                let stats = self.engine.leaf.stats(info.id, shards).await.map_err(status)?;
                crate::table::table_schema(&stats.columns())
            } else {
                Arc::new(Schema::empty())
            };
            builder
                .append(crate::catalog::CATALOG, &info.name.workspace, &info.name.name, TABLE_TYPE, &schema)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Response::new(one_batch(builder.build())))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Ok(Response::new(metadata_info(query, &schema, request.into_inner())?))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        builder.append(TABLE_TYPE);
        Ok(Response::new(one_batch(builder.build())))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Serve Flight SQL on `listener` until it fails.
///
/// Accepted connections set `TCP_NODELAY` (tonic leaves Nagle's algorithm on): a response's
/// last small frame otherwise waits for the client's delayed ACK, 40 ms or more per call.
pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    let svc = FlightServiceServer::new(FlightSql::new(engine))
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .map_err(std::io::Error::other)
}
