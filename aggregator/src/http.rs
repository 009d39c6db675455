//! The HTTP JSON API: queries, document writes (forwarded to the tailer), collection schema and
//! stats, Prometheus metrics. Errors are `{"error": {"code", "message"}}` with a fitting status.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use basalt_common::api::{CollectionName, WriteInput, WriteRequest};
use basalt_common::doc::PatchOp;
use basalt_common::{BasaltError, ErrorCode};
use datafusion::common::ScalarValue;
use futures::TryStreamExt;
use prometheus::{HistogramVec, register_histogram_vec};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{Engine, Output, batches_to_json, from_df};

/// Request body limit; larger bodies get 413.
pub const BODY_BYTES_MAX: usize = 10 * 1024 * 1024;

static LATENCY: LazyLock<Option<HistogramVec>> = LazyLock::new(|| {
    register_histogram_vec!("basalt_http_request_seconds", "HTTP API request latency", &["route", "status"]).ok()
});

pub struct ApiError(BasaltError);

impl From<BasaltError> for ApiError {
    fn from(e: BasaltError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({"error": {"code": self.0.code.as_str(), "message": self.0.message}})))
            .into_response()
    }
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError(BasaltError::invalid(format!("bad request body: {e}"))))
}

fn collection(c: &str) -> Result<CollectionName, ApiError> {
    Ok(CollectionName::parse(c)?)
}

#[derive(Deserialize)]
struct QueryBody {
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
    /// Stop the statement after this long (`statement_timeout`); 0 or absent: no timeout.
    #[serde(default)]
    timeout_ms: u64,
}

pub(crate) fn param(v: &Value) -> ScalarValue {
    match v {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(Some(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ScalarValue::Int64(Some(i)),
            None => ScalarValue::Float64(n.as_f64()),
        },
        Value::String(s) => ScalarValue::Utf8(Some(s.clone())),
        other => ScalarValue::Utf8(Some(other.to_string())),
    }
}

async fn query(State(engine): State<Arc<Engine>>, body: Bytes) -> ApiResult {
    let started = Instant::now();
    let body: QueryBody = parse_body(&body)?;
    let params: Vec<ScalarValue> = body.params.iter().map(param).collect();
    let session = engine.session();
    if body.timeout_ms > 0 {
        session.set_timeout(Some(std::time::Duration::from_millis(body.timeout_ms)));
    }
    let mut outputs = session.execute_sql(&body.sql, &params).await?;
    let Some(last) = outputs.pop() else {
        return Err(ApiError(BasaltError::invalid("empty query")));
    };
    let mut result = match last {
        Output::Command { tag, rows } => json!({"command": tag, "row_count": rows}),
        Output::Rows(stream) => {
            let schema = stream.schema();
            let batches: Vec<_> = stream.try_collect().await.map_err(from_df)?;
            let columns: Vec<Value> = schema
                .fields()
                .iter()
                .map(|f| json!({"name": f.name(), "type": crate::pg::pg_type(f.data_type()).name()}))
                .collect();
            let objects = batches_to_json(&batches)?;
            let rows: Vec<Value> = objects
                .into_iter()
                .map(|mut o| {
                    Value::Array(schema.fields().iter().map(|f| o.remove(f.name()).unwrap_or(Value::Null)).collect())
                })
                .collect();
            json!({"columns": columns, "row_count": rows.len(), "rows": rows})
        }
    };
    result["timing"] = json!({"elapsed_ms": started.elapsed().as_secs_f64() * 1000.0});
    Ok(axum::Json(result))
}

#[derive(Deserialize)]
struct DocsBody {
    data: Vec<Value>,
}

#[derive(Deserialize)]
struct PatchItem {
    #[serde(rename = "_id")]
    id: String,
    patch: Vec<PatchOp>,
    /// Create the document first when it does not exist.
    #[serde(default)]
    upsert: bool,
}

#[derive(Deserialize)]
struct DeleteItem {
    #[serde(rename = "_id")]
    id: String,
}

async fn write(engine: &Engine, c: &str, inputs: Vec<WriteInput>) -> ApiResult {
    let started = Instant::now();
    let resp = engine.tailer.write(WriteRequest { collection: collection(c)?, inputs }).await?;
    Ok(axum::Json(json!({
        "data": resp.statuses,
        "last_offset": resp.last_offset,
        "timing": {"elapsed_ms": started.elapsed().as_secs_f64() * 1000.0},
    })))
}

async fn add_docs(State(engine): State<Arc<Engine>>, Path(c): Path<String>, body: Bytes) -> ApiResult {
    let body: DocsBody = parse_body(&body)?;
    write(&engine, &c, body.data.into_iter().map(|doc| WriteInput::Upsert { doc }).collect()).await
}

/// Items that do not parse as patches get a per-document error.
async fn patch_docs(State(engine): State<Arc<Engine>>, Path(c): Path<String>, body: Bytes) -> ApiResult {
    let body: DocsBody = parse_body(&body)?;
    let mut inputs = Vec::with_capacity(body.data.len());
    for item in body.data {
        match serde_json::from_value::<PatchItem>(item) {
            Ok(p) => inputs.push(WriteInput::Patch { id: p.id, ops: p.patch, upsert: p.upsert }),
            Err(e) => inputs.push(WriteInput::Invalid { message: format!("bad patch item: {e}") }),
        }
    }
    write(&engine, &c, inputs).await
}

async fn delete_docs(State(engine): State<Arc<Engine>>, Path(c): Path<String>, body: Bytes) -> ApiResult {
    let body: DocsBody = parse_body(&body)?;
    let inputs = body
        .data
        .into_iter()
        .map(|item| match serde_json::from_value::<DeleteItem>(item) {
            Ok(d) => WriteInput::Delete { id: d.id },
            Err(e) => WriteInput::Invalid { message: format!("bad delete item: {e}") },
        })
        .collect();
    write(&engine, &c, inputs).await
}

async fn get_collection(State(engine): State<Arc<Engine>>, Path(c): Path<String>) -> ApiResult {
    let info = engine.meta.get_collection(collection(&c)?).await?;
    let stats = engine.leaf.stats(info.id, (0..info.shards).collect()).await?;
    let fields: Vec<Value> = stats
        .fields
        .iter()
        .map(|(path, kinds)| {
            let kinds: serde_json::Map<String, Value> = kinds.iter().map(|(k, n)| (k.name().to_string(), json!(n))).collect();
            json!({"path": path, "types": kinds, "column_type": stats.column_type(path).map(|t| t.to_arrow().to_string())})
        })
        .collect();
    Ok(axum::Json(json!({
        "workspace": info.name.workspace,
        "name": info.name.name,
        "id": info.id,
        "shards": info.shards,
        "created_at_us": info.created_at_us,
        "stats": {"documents": stats.doc_count, "fields": fields},
    })))
}

#[derive(Deserialize)]
struct CreateBody {
    name: String,
    #[serde(default)]
    shards: Option<u32>,
}

async fn list_collections(State(engine): State<Arc<Engine>>) -> ApiResult {
    let infos = engine.meta.list_collections(None).await?;
    Ok(axum::Json(json!({"data": infos})))
}

async fn create_collection(State(engine): State<Arc<Engine>>, body: Bytes) -> ApiResult {
    let body: CreateBody = parse_body(&body)?;
    let info = engine
        .meta
        .create_collection(collection(&body.name)?, body.shards.unwrap_or(basalt_common::api::DEFAULT_SHARDS), false)
        .await?;
    Ok(axum::Json(json!({"data": info})))
}

async fn drop_collection(State(engine): State<Arc<Engine>>, Path(c): Path<String>) -> ApiResult {
    let dropped = engine.meta.drop_collection(collection(&c)?, false).await?;
    if let Some(info) = &dropped {
        engine.leaf.drop_collection(info.id).await?;
    }
    Ok(axum::Json(json!({"data": dropped})))
}

/// `POST /v1/sources`: `{"name": "...", "collection": "...", "kafka": {"brokers": "...",
/// "topic": "...", "format": "json", "start": "earliest", "key_as_id": false}}` (format "avro"
/// with "schema", "framing" and "schema_id"), or with `"s3":
/// {"bucket": "...", "prefix": "...", "format": "json" | "csv" | "parquet" | "avro", "endpoint": "...",
/// "region": "...", "poll_interval_ms": 10000}`; either with `"transform": "SELECT ..."`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSourceBody {
    name: String,
    collection: String,
    #[serde(default)]
    kafka: Option<KafkaBody>,
    #[serde(default)]
    s3: Option<S3Body>,
    #[serde(default)]
    if_not_exists: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaBody {
    brokers: String,
    topic: String,
    #[serde(default = "json_format")]
    format: basalt_common::api::SourceFormat,
    /// Cell names of a csv source (a list, or one comma-separated string).
    #[serde(default)]
    columns: Option<CsvColumns>,
    #[serde(default = "earliest")]
    start: basalt_common::api::StartAt,
    #[serde(default)]
    key_as_id: bool,
    /// Format avro: the writer schema (Avro JSON, as text or as a JSON value), the framing
    /// (`bare`, `confluent`, `single_object`) and the expected Confluent schema id.
    #[serde(default)]
    schema: Option<serde_json::Value>,
    #[serde(default)]
    framing: basalt_common::api::AvroFraming,
    #[serde(default)]
    schema_id: Option<u32>,
    /// `SELECT ... FROM _input [WHERE ...]`.
    #[serde(default)]
    transform: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CsvColumns {
    List(Vec<String>),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Body {
    bucket: String,
    #[serde(default)]
    prefix: String,
    #[serde(default = "json_format")]
    format: basalt_common::api::SourceFormat,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default = "poll_interval")]
    poll_interval_ms: u64,
    #[serde(default = "basalt_common::api::default_true")]
    ordered: bool,
    #[serde(default)]
    transform: Option<String>,
}

fn json_format() -> basalt_common::api::SourceFormat {
    basalt_common::api::SourceFormat::Json
}

fn earliest() -> basalt_common::api::StartAt {
    basalt_common::api::StartAt::Earliest
}

fn poll_interval() -> u64 {
    basalt_sql::S3_POLL_INTERVAL_MS
}

async fn create_source(State(engine): State<Arc<Engine>>, body: Bytes) -> ApiResult {
    use basalt_common::api::{KafkaSource, S3Source, SourceSpec};
    let body: CreateSourceBody = parse_body(&body)?;
    let spec = match (body.kafka, body.s3) {
        (Some(k), None) => {
            let columns = match k.columns {
                None => Vec::new(),
                Some(CsvColumns::Text(list)) => basalt_sql::csv_columns(&list)?,
                Some(CsvColumns::List(names)) => basalt_sql::csv_column_names(names)?,
            };
            let spec = KafkaSource {
                brokers: k.brokers,
                topic: k.topic,
                format: k.format,
                columns,
                start: k.start,
                key_as_id: k.key_as_id,
                schema: k.schema.map(|v| match v {
                    serde_json::Value::String(text) => text,
                    other => other.to_string(),
                }),
                framing: k.framing,
                schema_id: k.schema_id,
                transform: k.transform,
            };
            basalt_sql::check_kafka_source(&spec)?;
            SourceSpec::Kafka(spec)
        }
        (None, Some(s)) => SourceSpec::S3(S3Source {
            bucket: s.bucket,
            prefix: s.prefix,
            format: s.format,
            endpoint: s.endpoint,
            region: s.region,
            poll_interval_ms: s.poll_interval_ms,
            ordered: s.ordered,
            transform: s.transform,
        }),
        _ => return Err(BasaltError::invalid("a source needs exactly one of \"kafka\" and \"s3\"").into()),
    };
    if let Some(t) = spec.transform() {
        basalt_sql::check_transform(t)?;
    }
    let info = engine
        .meta
        .create_source(collection(&body.name)?, collection(&body.collection)?, spec, body.if_not_exists)
        .await?;
    Ok(axum::Json(json!({"data": info})))
}

/// `POST /v1/rollups`: `{"name": "...", "source": "...", "sql": "SELECT ... FROM _input GROUP BY
/// ...", "shards": 4}` creates collection `name` maintained by the source's records.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRollupBody {
    name: String,
    source: String,
    sql: String,
    #[serde(default)]
    shards: Option<u32>,
    #[serde(default)]
    if_not_exists: bool,
}

async fn create_rollup(State(engine): State<Arc<Engine>>, body: Bytes) -> ApiResult {
    let body: CreateRollupBody = parse_body(&body)?;
    let plan = basalt_sql::check_rollup(&body.sql)?;
    let sql = plan.query.to_string();
    let shards = body.shards.unwrap_or(basalt_common::api::DEFAULT_SHARDS);
    let info = engine
        .meta
        .create_rollup(collection(&body.name)?, shards, collection(&body.source)?, sql, body.if_not_exists)
        .await?;
    Ok(axum::Json(json!({"data": info})))
}

/// `GET /v1/sources`: every source with the partitions tailers report on.
async fn list_sources(State(engine): State<Arc<Engine>>) -> ApiResult {
    let sources = engine.meta.list_sources().await?;
    let status = engine.meta.source_status().await?;
    let mut data = Vec::new();
    for s in &sources {
        let partitions: Vec<&basalt_common::api::PartitionStatus> =
            status.iter().filter(|p| p.source_id == s.id).collect();
        let mut entry = json!({"source": s, "partitions": partitions});
        if matches!(s.spec, basalt_common::api::SourceSpec::S3(_)) {
            // Progress of the objects found so far (a bulk load's progress bar reads this).
            let objects = engine.meta.source_objects(s.id, Vec::new()).await?;
            let done = objects.iter().filter(|o| o.done);
            entry["objects"] = json!({
                "found": objects.len(),
                "done": done.clone().count(),
                "bytes_found": objects.iter().map(|o| o.size).sum::<u64>(),
                "bytes_done": done.map(|o| o.size).sum::<u64>(),
            });
        }
        data.push(entry);
    }
    Ok(axum::Json(json!({"data": data})))
}

async fn drop_source(State(engine): State<Arc<Engine>>, Path(name): Path<String>) -> ApiResult {
    let dropped = engine.meta.drop_source(collection(&name)?, false).await?;
    Ok(axum::Json(json!({"data": dropped})))
}

async fn metrics() -> Response {
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&prometheus::gather(), &mut out) {
        Ok(()) => ([("content-type", "text/plain; version=0.0.4")], out).into_response(),
        Err(e) => ApiError(BasaltError::internal(format!("metrics: {e}"))).into_response(),
    }
}

async fn fallback() -> ApiError {
    ApiError(BasaltError::new(ErrorCode::NotFound, "no such endpoint"))
}

async fn track(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let mut resp = next.run(req).await;
    // Body-limit and other extractor rejections arrive as plain text: make them JSON errors.
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE
        && resp.headers().get("content-type").is_none_or(|v| v != "application/json")
    {
        resp = ApiError(BasaltError::limit(format!("request body is over {BODY_BYTES_MAX} bytes"))).into_response();
    }
    if let Some(h) = LATENCY.as_ref() {
        h.with_label_values(&[route.as_str(), resp.status().as_str()]).observe(started.elapsed().as_secs_f64());
    }
    resp
}

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/query", post(query))
        .route("/v1/collections", get(list_collections).post(create_collection))
        .route("/v1/collections/{c}", get(get_collection).delete(drop_collection))
        .route("/v1/collections/{c}/docs", post(add_docs).patch(patch_docs).delete(delete_docs))
        .route("/v1/sources", get(list_sources).post(create_source))
        .route("/v1/sources/{name}", axum::routing::delete(drop_source))
        .route("/v1/rollups", post(create_rollup))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(fallback)
        .layer(axum::middleware::from_fn(track))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(engine)
}

/// `ok`, with the process id in `x-basalt-pid`: a check can tell this process from another
/// that took the address (tests start many deployments on loopback at once).
async fn healthz() -> impl IntoResponse {
    ([("x-basalt-pid", std::process::id().to_string())], "ok")
}

/// `/metrics` and `/healthz` only, for processes that serve no API (leaf, tailer).
pub async fn serve_ops(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let router = Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).fallback(fallback);
    axum::serve(listener, router).await
}

/// The HTTP API on `listener` until it fails. Accepted connections set `TCP_NODELAY` (axum
/// leaves Nagle's algorithm on, so a streamed response's small chunks can wait for ACKs).
pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(engine)).await
}
