//! The PostgreSQL wire protocol (pgwire): simple and extended query protocol, typed parameters,
//! result types from the plan, rows streamed as they are produced, SQLSTATE errors.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use basalt_common::{BasaltError, ErrorCode};
use basalt_sql::BasaltStatement;
use datafusion::common::ScalarValue;
use futures::sink::Sink;
use futures::{StreamExt, stream};
use pgwire::api::ConnectionManager;
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type};
use pgwire::messages::PgWireFrontendMessage;
use pgwire::messages::cancel::CancelRequest;

use crate::limits::Canceler;
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::data::DataRow;
use tokio::net::TcpListener;

use crate::engine::{Described, Engine, Output, Session};

pub fn pg_error(e: BasaltError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".to_string(), e.code.sqlstate().to_string(), e.message)))
}

/// The PostgreSQL type a column of this Arrow type is sent as.
pub fn pg_type(dt: &DataType) -> Type {
    match dt {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Decimal128(_, _) => Type::NUMERIC,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Type::TEXT,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Type::BYTEA,
        DataType::Date32 => Type::DATE,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::List(f) | DataType::LargeList(f) => match f.data_type() {
            DataType::Boolean => Type::BOOL_ARRAY,
            DataType::Int64 => Type::INT8_ARRAY,
            DataType::Float64 => Type::FLOAT8_ARRAY,
            _ => Type::TEXT_ARRAY,
        },
        _ => Type::TEXT,
    }
}

fn fields(schema: &arrow::datatypes::Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let ty = pg_type(f.data_type());
            // Types without a binary encoder here are always sent as text.
            let fmt = if ty == Type::TEXT { FieldFormat::Text } else { format.format_for(i) };
            FieldInfo::new(f.name().clone(), None, None, ty, fmt)
        })
        .collect()
}

fn micros(dt: &DataType, a: &dyn Array, i: usize) -> Option<i64> {
    match dt {
        DataType::Timestamp(TimeUnit::Second, _) => {
            a.as_primitive::<TimestampSecondType>().value(i).checked_mul(1_000_000)
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            a.as_primitive::<TimestampMillisecondType>().value(i).checked_mul(1000)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => Some(a.as_primitive::<TimestampMicrosecondType>().value(i)),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            Some(a.as_primitive::<TimestampNanosecondType>().value(i) / 1000)
        }
        _ => None,
    }
}

/// Floats in text form as PostgreSQL prints them: shortest round-trip digits, `5` not `5.0`.
fn float_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{v}")
    }
}

/// A list value as a Postgres array of the element type [`pg_type`] names (text or binary;
/// pgwire quotes elements in the `{...}` text form).
fn encode_list(enc: &mut DataRowEncoder, a: &dyn Array, row: usize) -> PgWireResult<()> {
    let items = match a.data_type() {
        DataType::List(_) => a.as_list::<i32>().value(row),
        DataType::LargeList(_) => a.as_list::<i64>().value(row),
        _ => return enc.encode_field(&None::<i64>),
    };
    let items = items.as_ref();
    let valid = |i: usize| !items.is_null(i);
    match items.data_type() {
        DataType::Boolean => {
            let b = items.as_boolean();
            enc.encode_field(&(0..b.len()).map(|i| valid(i).then(|| b.value(i))).collect::<Vec<_>>())
        }
        DataType::Int64 => {
            let v = items.as_primitive::<Int64Type>();
            enc.encode_field(&(0..v.len()).map(|i| valid(i).then(|| v.value(i))).collect::<Vec<_>>())
        }
        DataType::Float64 => {
            let v = items.as_primitive::<Float64Type>();
            enc.encode_field(&(0..v.len()).map(|i| valid(i).then(|| v.value(i))).collect::<Vec<_>>())
        }
        _ => {
            let text = cast(items, &DataType::Utf8).map_err(|e| pg_error(BasaltError::from(e)))?;
            let text = text.as_string::<i32>();
            enc.encode_field(&text.iter().map(|v| v.map(str::to_string)).collect::<Vec<_>>())
        }
    }
}

fn encode_batch(batch: &RecordBatch, schema: &Arc<Vec<FieldInfo>>) -> Vec<PgWireResult<DataRow>> {
    let options = FormatOptions::default();
    let formatters: Vec<Option<ArrayFormatter>> =
        batch.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok()).collect();
    let text: Vec<bool> = schema.iter().map(|f| f.format() == FieldFormat::Text).collect();
    let mut rows = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let mut enc = DataRowEncoder::new(schema.clone());
        let mut result = Ok(());
        for (col_idx, col) in batch.columns().iter().enumerate() {
            let a = col.as_ref();
            // A NullArray has no validity buffer: `is_null` says false for its rows.
            let r = if a.is_null(row) || *a.data_type() == DataType::Null {
                enc.encode_field(&None::<i64>)
            } else {
                match a.data_type() {
                    DataType::Boolean => enc.encode_field(&a.as_boolean().value(row)),
                    DataType::Int8 => enc.encode_field(&i16::from(a.as_primitive::<Int8Type>().value(row))),
                    DataType::Int16 => enc.encode_field(&a.as_primitive::<Int16Type>().value(row)),
                    DataType::UInt8 => enc.encode_field(&i16::from(a.as_primitive::<UInt8Type>().value(row))),
                    DataType::Int32 => enc.encode_field(&a.as_primitive::<Int32Type>().value(row)),
                    DataType::UInt16 => enc.encode_field(&i32::from(a.as_primitive::<UInt16Type>().value(row))),
                    DataType::Int64 => enc.encode_field(&a.as_primitive::<Int64Type>().value(row)),
                    DataType::UInt32 => enc.encode_field(&i64::from(a.as_primitive::<UInt32Type>().value(row))),
                    DataType::UInt64 => match i64::try_from(a.as_primitive::<UInt64Type>().value(row)) {
                        Ok(v) => enc.encode_field(&v),
                        Err(_) => Err(pg_error(BasaltError::invalid("unsigned value out of bigint range"))),
                    },
                    DataType::Float32 => {
                        let v = a.as_primitive::<Float32Type>().value(row);
                        if text[col_idx] { enc.encode_field(&float_text(f64::from(v))) } else { enc.encode_field(&v) }
                    }
                    DataType::Float64 => {
                        let v = a.as_primitive::<Float64Type>().value(row);
                        if text[col_idx] { enc.encode_field(&float_text(v)) } else { enc.encode_field(&v) }
                    }
                    DataType::Decimal128(_, scale) => {
                        let v = a.as_primitive::<arrow::datatypes::Decimal128Type>().value(row);
                        match rust_decimal::Decimal::try_from_i128_with_scale(v, (*scale).max(0) as u32) {
                            Ok(d) => enc.encode_field(&d),
                            Err(e) => Err(pg_error(BasaltError::invalid(format!("decimal out of range: {e}")))),
                        }
                    }
                    DataType::Utf8 => enc.encode_field(&a.as_string::<i32>().value(row)),
                    DataType::LargeUtf8 => enc.encode_field(&a.as_string::<i64>().value(row)),
                    DataType::Utf8View => enc.encode_field(&a.as_string_view().value(row)),
                    DataType::Binary => enc.encode_field(&a.as_binary::<i32>().value(row)),
                    DataType::Date32 => match a.as_primitive::<Date32Type>().value_as_date(row) {
                        Some(d) => enc.encode_field(&d),
                        None => enc.encode_field(&None::<i64>),
                    },
                    dt @ DataType::Timestamp(_, tz) => {
                        let t = micros(dt, a, row).and_then(chrono::DateTime::from_timestamp_micros);
                        match (t, tz) {
                            (Some(t), Some(_)) => enc.encode_field(&t),
                            (Some(t), None) => enc.encode_field(&t.naive_utc()),
                            (None, _) => enc.encode_field(&None::<i64>),
                        }
                    }
                    DataType::List(_) | DataType::LargeList(_) => encode_list(&mut enc, a, row),
                    _ => {
                        let text = formatters[col_idx].as_ref().map(|f| f.value(row).to_string()).unwrap_or_default();
                        enc.encode_field(&text)
                    }
                }
            };
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        rows.push(result.map(|()| enc.take_row()));
    }
    rows
}

fn to_response(output: Output, format: &Format) -> Response {
    match output {
        Output::Command { tag: "BEGIN", .. } => Response::TransactionStart(Tag::new("BEGIN")),
        Output::Command { tag: tag @ ("COMMIT" | "ROLLBACK"), .. } => Response::TransactionEnd(Tag::new(tag)),
        // Rolling back to a savepoint stays in the transaction.
        Output::Command { tag: "ROLLBACK TO", .. } => Response::Execution(Tag::new("ROLLBACK")),
        Output::Command { tag: "INSERT", rows } => Response::Execution(Tag::new("INSERT").with_oid(0).with_rows(rows)),
        Output::Command { tag: tag @ ("UPDATE" | "DELETE"), rows } => {
            Response::Execution(Tag::new(tag).with_rows(rows))
        }
        Output::Command { tag, .. } => Response::Execution(Tag::new(tag)),
        Output::Rows(stream) => {
            let schema = Arc::new(fields(&stream.schema(), format));
            let row_schema = schema.clone();
            let rows = stream
                .map(move |batch| match batch {
                    Ok(b) => encode_batch(&b, &row_schema),
                    Err(e) => vec![Err(pg_error(crate::engine::from_df(e)))],
                })
                .flat_map(stream::iter);
            Response::Query(QueryResponse::new(schema, rows))
        }
    }
}

/// The running connections' cancelers by (pid, secret key), for cancel requests that arrive
/// while a result streams (pgwire itself stops only the statement's planning and execution
/// call, through its `ConnectionManager`).
#[derive(Default)]
pub struct Cancelers(parking_lot::Mutex<HashMap<(i32, bytes::Bytes), Canceler>>);

/// Removes a connection's canceler when the connection ends.
struct CancelerGuard {
    key: (i32, bytes::Bytes),
    cancelers: Arc<Cancelers>,
}

impl Drop for CancelerGuard {
    fn drop(&mut self) {
        self.cancelers.0.lock().remove(&self.key);
    }
}

/// A cancel request: pgwire's own (a statement still executing) and the session's (a result
/// still streaming).
struct CancelRequests {
    connections: Arc<ConnectionManager>,
    cancelers: Arc<Cancelers>,
}

#[async_trait]
impl CancelHandler for CancelRequests {
    async fn on_cancel_request(&self, request: CancelRequest) {
        let key = (request.pid, request.secret_key.to_bytes());
        let canceler = self.cancelers.0.lock().get(&key).cloned();
        if let Some(canceler) = canceler {
            canceler.cancel();
        }
        self.connections.cancel(request.pid, &request.secret_key).await;
    }
}

/// One client connection: its own session (settings, hints) over the shared engine.
pub struct Connection {
    session: Arc<Session>,
    parser: Arc<Parser>,
    connections: Arc<ConnectionManager>,
    cancelers: Arc<Cancelers>,
}

impl Connection {
    pub fn new(engine: &Arc<Engine>, connections: Arc<ConnectionManager>, cancelers: Arc<Cancelers>) -> Self {
        let session = Arc::new(engine.session());
        Self { parser: Arc::new(Parser { session: session.clone() }), session, connections, cancelers }
    }

    fn handler(&self) -> Arc<Connection> {
        Arc::new(Connection {
            session: self.session.clone(),
            parser: self.parser.clone(),
            connections: self.connections.clone(),
            cancelers: self.cancelers.clone(),
        })
    }
}

#[async_trait]
impl SimpleQueryHandler for Connection {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = self.session.parse(query).map_err(pg_error)?;
        let mut responses = Vec::with_capacity(statements.len());
        for stmt in statements {
            match self.session.execute(stmt, &[]).await {
                Ok(out) => responses.push(to_response(out, &Format::UnifiedText)),
                Err(e) => {
                    responses.push(Response::Error(Box::new(ErrorInfo::new(
                        "ERROR".into(),
                        e.code.sqlstate().into(),
                        e.message,
                    ))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

/// A prepared statement: the parsed statement and what it takes and returns.
#[derive(Debug, Clone)]
pub struct Prepared {
    stmt: BasaltStatement,
    param_types: Vec<Type>,
    described: Described,
    /// The query's plan from Parse, for the Execute that follows (see [`KeptPlan`]).
    kept: Arc<parking_lot::Mutex<Option<KeptPlan>>>,
    /// A query that plans in general (not a point lookup or a command).
    planned: bool,
}

/// A query's logical plan made at Parse (for its Describe), run by the first Execute if the
/// session planned nothing else in between and it is recent; later executions plan again.
/// Drivers using the extended protocol (JDBC, asyncpg, psycopg with parameters) send Parse,
/// Bind and Execute together, so their statements plan once instead of twice.
#[derive(Debug)]
struct KeptPlan {
    plan: datafusion::logical_expr::LogicalPlan,
    /// [`Session::plans_made`] right after it was planned.
    plans_made: u64,
    at: std::time::Instant,
}

/// How long a plan from Parse waits for its Execute.
const KEPT_PLAN_TTL: std::time::Duration = std::time::Duration::from_secs(10);

static PARSE_PLANS: std::sync::LazyLock<Option<prometheus::IntCounterVec>> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "basalt_pg_parse_plans_total",
        "pgwire Executes of a query by whether they ran the plan made at Parse (reused) or planned again",
        &["plan"]
    )
    .ok()
});

pub struct Parser {
    session: Arc<Session>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(&self, _client: &C, sql: &str, types: &[Option<Type>]) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.session.parse(sql).map_err(pg_error)?;
        if statements.len() > 1 {
            return Err(pg_error(BasaltError::new(
                ErrorCode::Syntax,
                "cannot insert multiple commands into a prepared statement",
            )));
        }
        let Some(stmt) = statements.pop() else { return Ok(None) };
        let (described, plan) = self.session.prepare(&stmt, &[]).await.map_err(pg_error)?;
        let plans_made = self.session.plans_made();
        let kept = plan.map(|plan| KeptPlan { plan, plans_made, at: std::time::Instant::now() });
        let n = described.params.len().max(types.len());
        let param_types = (0..n)
            .map(|i| {
                types
                    .get(i)
                    .cloned()
                    .flatten()
                    .filter(|t| *t != Type::UNKNOWN)
                    .or_else(|| described.params.get(i).cloned().flatten().map(|dt| pg_type(&dt)))
                    .unwrap_or(Type::TEXT)
            })
            .collect();
        let planned = kept.is_some();
        Ok(Some(Prepared { stmt, param_types, described, kept: Arc::new(parking_lot::Mutex::new(kept)), planned }))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(stmt.param_types.clone())
    }

    fn get_result_schema(&self, stmt: &Prepared, format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        Ok(match &stmt.described.output {
            Some(schema) => fields(schema, format.unwrap_or(&Format::UnifiedBinary)),
            None => vec![],
        })
    }
}

fn decode_param(portal: &Portal<Prepared>, i: usize, ty: &Type) -> PgWireResult<ScalarValue> {
    Ok(match *ty {
        Type::BOOL => ScalarValue::Boolean(portal.parameter::<bool>(i, ty)?),
        Type::INT2 => ScalarValue::Int64(portal.parameter::<i16>(i, ty)?.map(i64::from)),
        Type::INT4 => ScalarValue::Int64(portal.parameter::<i32>(i, ty)?.map(i64::from)),
        Type::INT8 => ScalarValue::Int64(portal.parameter::<i64>(i, ty)?),
        Type::FLOAT4 => ScalarValue::Float64(portal.parameter::<f32>(i, ty)?.map(f64::from)),
        Type::FLOAT8 => ScalarValue::Float64(portal.parameter::<f64>(i, ty)?),
        Type::NUMERIC => {
            let d = portal.parameter::<rust_decimal::Decimal>(i, ty)?;
            ScalarValue::Float64(d.and_then(|d| d.to_string().parse().ok()))
        }
        Type::TIMESTAMPTZ => ScalarValue::TimestampMicrosecond(
            portal.parameter::<chrono::DateTime<chrono::FixedOffset>>(i, ty)?.map(|t| t.timestamp_micros()),
            Some("UTC".into()),
        ),
        Type::TIMESTAMP => ScalarValue::TimestampMicrosecond(
            portal.parameter::<chrono::NaiveDateTime>(i, ty)?.map(|t| t.and_utc().timestamp_micros()),
            None,
        ),
        Type::JSON | Type::JSONB => {
            ScalarValue::Utf8(portal.parameter::<serde_json::Value>(i, ty)?.map(|v| v.to_string()))
        }
        _ => ScalarValue::Utf8(portal.parameter::<String>(i, &Type::TEXT)?),
    })
}

#[async_trait]
impl ExtendedQueryHandler for Connection {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(&self, _client: &mut C, portal: &Portal<Prepared>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let mut params = Vec::with_capacity(portal.parameter_len());
        for i in 0..portal.parameter_len() {
            let ty = portal
                .statement
                .parameter_types
                .get(i)
                .cloned()
                .flatten()
                .filter(|t| *t != Type::UNKNOWN)
                .or_else(|| prepared.param_types.get(i).cloned())
                .unwrap_or(Type::TEXT);
            params.push(decode_param(portal, i, &ty)?);
        }
        // A query (not a point lookup or a command) has a plan from Parse, which runs if it
        // still holds; the statement's later executions plan again.
        let kept = prepared
            .kept
            .lock()
            .take()
            .filter(|k| k.plans_made == self.session.plans_made() && k.at.elapsed() < KEPT_PLAN_TTL);
        let out = match kept {
            Some(k) => {
                crate::engine::count(&PARSE_PLANS, "reused");
                let plan = self.session.bind(k.plan, &params).map_err(pg_error)?;
                self.session.execute_plan(plan).await
            }
            None => {
                if prepared.planned {
                    crate::engine::count(&PARSE_PLANS, "planned");
                }
                self.session.execute(prepared.stmt.clone(), &params).await
            }
        };
        Ok(to_response(out.map_err(pg_error)?, &portal.result_column_format))
    }
}

#[async_trait]
impl NoopStartupHandler for Connection {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }

    async fn post_startup<C>(&self, client: &mut C, _message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, secret) = client.pid_and_secret_key();
        let key = (pid, secret.to_bytes());
        self.cancelers.0.lock().insert(key.clone(), self.session.canceler());
        client.session_extensions().insert(CancelerGuard { key, cancelers: self.cancelers.clone() });
        Ok(())
    }
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.handler()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(CancelRequests { connections: self.connections.clone(), cancelers: self.cancelers.clone() })
    }
}

/// Serve the PostgreSQL wire protocol until the listener fails.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    let connections = Arc::new(ConnectionManager::new());
    let cancelers = Arc::new(Cancelers::default());
    loop {
        let (socket, peer) = listener.accept().await?;
        let engine = engine.clone();
        let (connections, cancelers) = (connections.clone(), cancelers.clone());
        tokio::spawn(async move {
            let handlers = Arc::new(Connection::new(&engine, connections, cancelers));
            if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                tracing::debug!(%peer, error = %e, "pg connection ended with an error");
            }
        });
    }
}
