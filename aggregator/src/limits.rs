//! Per-statement limits: a memory pool whose limit a session sets (`SET basalt.memory_limit`),
//! and a guard that stops a statement when its timeout passes (`SET statement_timeout`) or its
//! client cancels it (the pgwire cancel request), also while its result is being streamed.
//! Stopping drops the plan's streams, which stops the scans on the leaves.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use basalt_common::{BasaltError, ErrorCode, Result};
use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{MemoryPool, MemoryReservation};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::watch;

/// Memory one statement may hold in operators (hash tables, sorts) unless the session says
/// otherwise.
pub const DEFAULT_MEMORY_LIMIT: usize = 4 << 30;

/// A session's memory pool: operators reserve from it and fail with a clear error past the
/// limit (statements of a session run one at a time, so this is the statement's limit).
#[derive(Debug)]
pub struct SessionPool {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl SessionPool {
    pub fn new(limit: usize) -> Self {
        Self { limit: AtomicUsize::new(limit), used: AtomicUsize::new(0) }
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }
}

impl std::fmt::Display for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "session pool: {} of {}", human_bytes(self.reserved()), human_bytes(self.limit()))
    }
}

impl MemoryPool for SessionPool {
    fn name(&self) -> &str {
        "basalt_session"
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(shrink)));
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> datafusion::common::Result<()> {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| u.checked_add(additional).filter(|n| *n <= limit))
            .map(|_| ())
            .map_err(|used| {
                DataFusionError::External(Box::new(BasaltError::new(
                    ErrorCode::OutOfMemory,
                    format!(
                        "the statement needs more than its memory limit of {} ({} reserving {} more with {} in use; \
                         SET basalt.memory_limit to change it)",
                        human_bytes(limit),
                        reservation.consumer().name(),
                        human_bytes(additional),
                        human_bytes(used)
                    ),
                )))
            })
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// A setting's number and its unit (lower case, may be empty): `'5s'` -> (5, "s").
fn number_and_unit(text: &str, what: &str) -> Result<(f64, String)> {
    let t = text.trim().trim_matches('\'').trim().to_ascii_lowercase();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| BasaltError::invalid(format!("invalid {what} {text:?}")))?;
    Ok((n, unit.trim().to_string()))
}

/// `statement_timeout` values as Postgres takes them: milliseconds, or a number with a unit
/// (`ms`, `s`, `min`, `h`); 0 turns the timeout off.
pub fn parse_duration(text: &str) -> Result<Option<Duration>> {
    let (n, unit) = number_and_unit(text, "duration")?;
    let ms = match unit.as_str() {
        "" | "ms" => n,
        "s" => n * 1000.0,
        "min" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        other => return Err(BasaltError::invalid(format!("unknown duration unit {other:?} (ms, s, min, h)"))),
    };
    Ok((ms > 0.0).then(|| Duration::from_micros((ms * 1000.0) as u64)))
}

/// Memory sizes: bytes, or a number with kB, MB, GB.
pub fn parse_bytes(text: &str) -> Result<usize> {
    let (n, unit) = number_and_unit(text, "size")?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" => 1024.0,
        "mb" => 1024.0 * 1024.0,
        "gb" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(BasaltError::invalid(format!("unknown size unit {other:?} (kB, MB, GB)"))),
    };
    Ok((n * scale) as usize)
}

/// Cancellation of a session's running statement: a counter bumped by each cancel request.
#[derive(Debug, Clone)]
pub struct Canceler {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for Canceler {
    fn default() -> Self {
        Self { tx: Arc::new(watch::channel(0).0) }
    }
}

impl Canceler {
    pub fn cancel(&self) {
        self.tx.send_modify(|n| *n += 1);
    }

    /// A future that resolves with the reason once the deadline passes or a cancel arrives
    /// after this call.
    pub fn stop_signal(&self, timeout: Option<Duration>) -> StopSignal {
        let mut rx = self.tx.subscribe();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let fut = async move {
            // The receiver has seen the count at subscription: only later cancels count.
            let canceled = async {
                match rx.changed().await {
                    Ok(()) => BasaltError::new(ErrorCode::Canceled, "canceling statement due to user request"),
                    Err(_) => std::future::pending().await,
                }
            };
            match deadline {
                Some(d) => tokio::select! {
                    e = canceled => e,
                    _ = tokio::time::sleep_until(d) => {
                        BasaltError::new(ErrorCode::Canceled, "canceling statement due to statement timeout")
                    }
                },
                None => canceled.await,
            }
        };
        StopSignal(fut.boxed().shared())
    }
}

/// Resolves with the reason a statement must stop; cheap to clone (planning and the result
/// stream watch the same signal).
#[derive(Clone)]
pub struct StopSignal(futures::future::Shared<futures::future::BoxFuture<'static, BasaltError>>);

impl StopSignal {
    /// Run `fut`, or stop with the signal's error.
    pub async fn run<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            r = fut => r,
            e = self.0.clone() => Err(e),
        }
    }

    /// Wrap a result stream: it ends with the signal's error when the signal fires.
    pub fn guard(&self, inner: SendableRecordBatchStream) -> SendableRecordBatchStream {
        Box::pin(Guarded { schema: inner.schema(), inner: Some(inner), stop: self.0.clone() })
    }
}

struct Guarded {
    schema: SchemaRef,
    inner: Option<SendableRecordBatchStream>,
    stop: futures::future::Shared<futures::future::BoxFuture<'static, BasaltError>>,
}

impl Stream for Guarded {
    type Item = datafusion::common::Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.inner.is_none() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(e) = self.stop.poll_unpin(cx) {
            // Dropping the plan's stream stops its work on this tier and on the leaves.
            self.inner = None;
            return Poll::Ready(Some(Err(DataFusionError::External(Box::new(e)))));
        }
        let next = match self.inner.as_mut() {
            Some(inner) => inner.poll_next_unpin(cx),
            None => Poll::Ready(None),
        };
        if matches!(next, Poll::Ready(None)) {
            self.inner = None;
        }
        next
    }
}

impl RecordBatchStream for Guarded {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// The last physical optimizer pass: operators whose output can be far larger than their
/// input (joins, unnest) also spend the task's cooperative budget per batch they produce.
///
/// DataFusion's `EnsureCooperative` instruments only leaves and exchanges. A cross join of
/// four 5,000-row inputs consumes a handful of budget units reading them and then computes
/// 10^14 rows inside one `poll_next`: neither the statement timeout nor a cancel (both checked
/// between polls, see [`StopSignal::guard`]) could stop it, and the work went on after the
/// client had its error. Wrapped, the stream returns `Pending` every 128 batches.
#[derive(Debug, Default)]
pub struct YieldInAmplifiers;

impl YieldInAmplifiers {
    fn amplifies(plan: &dyn datafusion::physical_plan::ExecutionPlan) -> bool {
        use datafusion::physical_plan::joins::{
            CrossJoinExec, HashJoinExec, NestedLoopJoinExec, PiecewiseMergeJoinExec, SortMergeJoinExec,
            SymmetricHashJoinExec,
        };
        plan.downcast_ref::<CrossJoinExec>().is_some()
            || plan.downcast_ref::<HashJoinExec>().is_some()
            || plan.downcast_ref::<NestedLoopJoinExec>().is_some()
            || plan.downcast_ref::<SortMergeJoinExec>().is_some()
            || plan.downcast_ref::<SymmetricHashJoinExec>().is_some()
            || plan.downcast_ref::<PiecewiseMergeJoinExec>().is_some()
            || plan.downcast_ref::<datafusion::physical_plan::unnest::UnnestExec>().is_some()
    }
}

impl datafusion::physical_optimizer::PhysicalOptimizerRule for YieldInAmplifiers {
    fn optimize(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        _config: &datafusion::config::ConfigOptions,
    ) -> datafusion::common::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::physical_plan::coop::CooperativeExec;
        plan.transform_up(|node| {
            if Self::amplifies(node.as_ref()) {
                Ok(Transformed::yes(Arc::new(CooperativeExec::new(node)) as _))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "basalt_yield_in_amplifiers"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_sizes_like_postgres() {
        assert_eq!(parse_duration("5000").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("'2s'").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1min").unwrap(), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("0").unwrap(), None);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert_eq!(parse_bytes("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("'1GB'").unwrap(), 1 << 30);
        assert!(parse_bytes("lots").is_err());
    }

    #[tokio::test]
    async fn a_cancel_stops_only_statements_running_when_it_arrives() {
        let c = Canceler::default();
        c.cancel(); // before the statement: ignored
        let stop = c.stop_signal(None);
        let r = stop.run(async { Ok::<_, BasaltError>(1) }).await;
        assert_eq!(r.unwrap(), 1);
        let stop = c.stop_signal(None);
        let c2 = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c2.cancel();
        });
        let r = stop.run(async { futures::future::pending::<Result<()>>().await }).await;
        assert_eq!(r.unwrap_err().code, ErrorCode::Canceled);
        let stop = c.stop_signal(Some(Duration::from_millis(10)));
        let e = stop.run(async { futures::future::pending::<Result<()>>().await }).await.unwrap_err();
        assert!(e.message.contains("statement timeout"), "{e}");
    }

    /// A statement whose work is a cross join of small inputs stops at its timeout. Before the
    /// joins spent budget per batch, the partial aggregate of each partition (a task of its own)
    /// computed all of it in one poll: the client got its error but the tasks went on, holding
    /// the runtime's threads. The plan has the shape Basalt's leaf scans give: two partitions.
    #[test]
    fn a_timeout_stops_a_cross_join_of_small_inputs() {
        use arrow::array::Float64Array;
        use arrow::datatypes::{DataType, Field, Schema};
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let outcome = runtime.block_on(async {
                let state = datafusion::execution::SessionStateBuilder::new()
                    .with_config(datafusion::prelude::SessionConfig::new().with_target_partitions(2))
                    .with_default_features()
                    .with_physical_optimizer_rule(Arc::new(YieldInAmplifiers))
                    .build();
                let ctx = datafusion::prelude::SessionContext::new_with_state(state);
                let schema = Arc::new(Schema::new(vec![Field::new("price", DataType::Float64, false)]));
                let part = |from: usize| {
                    let prices = Float64Array::from_iter_values((from..from + 2500).map(|i| (i % 97) as f64));
                    vec![RecordBatch::try_new(schema.clone(), vec![Arc::new(prices)]).unwrap()]
                };
                let table =
                    datafusion::datasource::MemTable::try_new(schema.clone(), vec![part(0), part(2500)]).unwrap();
                ctx.register_table("t", Arc::new(table)).unwrap();
                let sql = "SELECT count(*) FROM t a, t b, t c, t d WHERE a.price + b.price + c.price = d.price";
                let plan = ctx.sql(sql).await.unwrap().create_physical_plan().await.unwrap();
                let stream = datafusion::physical_plan::execute_stream(plan, ctx.task_ctx()).unwrap();
                let stop = Canceler::default().stop_signal(Some(Duration::from_millis(200)));
                let result = datafusion::physical_plan::common::collect(stop.guard(stream)).await;
                // The runtime's threads are free again: a small task finishes promptly.
                let started = std::time::Instant::now();
                let free = tokio::time::timeout(Duration::from_secs(5), tokio::spawn(async { 1 })).await;
                (result.map(|_| ()).map_err(|e| e.to_string()), free.is_ok(), started.elapsed())
            });
            let _ = tx.send(outcome);
        });
        let (result, free, took) = rx.recv_timeout(Duration::from_secs(30)).expect("the statement did not stop");
        let error = result.expect_err("10^14 rows cannot finish in time");
        assert!(error.contains("statement timeout"), "{error}");
        assert!(free, "a task waited {took:?} for the runtime");
    }
}
