//! Uncorrelated scalar subqueries run beside the rest of their statement.
//!
//! DataFusion's `ScalarSubqueryExec` runs a statement's scalar subqueries to the end before it
//! starts the main input. TPC-H q11 computes the same three-way join twice, once for the total
//! (the subquery, 30 ms at SF 10) and once per part (the main input, 50 ms), and only the
//! `HAVING` filter at the top reads the total: the main input's joins and aggregation waited
//! for nothing. Here ([`SubqueriesBeside`], a physical optimizer pass) the subqueries start when
//! the statement starts, and a [`GateExec`] goes under each operator that reads a subquery's
//! value: it runs its input (holding up to [`GATE_BYTES_MAX`] of its batches) and passes them
//! on once the subqueries have answered. Operators under the gates never see the values, so
//! nothing reads one before it exists; an operator that would read one without naming it
//! among its expressions fails with DataFusion's own error, it does not read a wrong value.
//!
//! Runs after [`crate::shared::ShareCommonAggregates`]; subqueries that read an aggregation
//! shared with the main input (TPC-H q15) stay as planned: the subquery could wait for the main
//! input to compute it while a full gate waited for the subquery.
//!
//! A subquery's error ends the statement as soon as it happens; a main input that ends first
//! still waits for the subqueries (their errors, e.g. more than one row, are the statement's).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::ScalarSubqueryResults;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::scalar_subquery::{ScalarSubqueryExec, ScalarSubqueryLink};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, Stream, StreamExt};

/// Most bytes of batches a gate holds while its subqueries run; past them it stops reading its
/// input until they answer.
pub const GATE_BYTES_MAX: usize = 64 << 20;

/// The subqueries' run: done, or the error that ended it.
type Run = Shared<BoxFuture<'static, std::result::Result<(), Arc<DataFusionError>>>>;

/// One statement's run of its subqueries, shared by the node that starts it and the gates
/// that wait for it.
#[derive(Debug, Default)]
struct Started {
    run: Mutex<Option<Run>>,
}

impl Started {
    fn get(&self) -> Option<Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn start(&self, start: impl FnOnce() -> Run) -> Run {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(start).clone()
    }

    fn reset(&self) {
        *self.run.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The physical optimizer pass: each `ScalarSubqueryExec` whose main input names the
/// subqueries' values in some operator becomes a [`BesideExec`] with gates under those
/// operators. Left as planned when no operator names them.
#[derive(Debug, Default)]
pub struct SubqueriesBeside;

/// Whether `node`'s own expressions read a scalar subquery's value.
fn reads_subquery(node: &Arc<dyn ExecutionPlan>) -> Result<bool> {
    let mut found = false;
    node.apply_expressions(&mut |e| {
        e.apply(|e| {
            found |= e.downcast_ref::<ScalarSubqueryExpr>().is_some();
            Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
        })
    })?;
    Ok(found)
}

impl PhysicalOptimizerRule for SubqueriesBeside {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(exec) = node.downcast_ref::<ScalarSubqueryExec>() else { return Ok(Transformed::no(node)) };
            // A subquery reading an aggregation shared with the main input may wait for the
            // main input to compute it, while a full gate waits for the subquery.
            let mut shared = false;
            for s in exec.subqueries() {
                s.plan.apply(|n| {
                    shared |= n.is::<crate::shared::SharedExec>();
                    Ok(if shared { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
                })?;
            }
            if shared {
                return Ok(Transformed::no(node));
            }
            let started = Arc::new(Started::default());
            let mut gates = 0;
            let input = exec
                .input()
                .clone()
                .transform_down(|n| {
                    if n.is::<GateExec>() || !reads_subquery(&n)? {
                        return Ok(Transformed::no(n));
                    }
                    let children: Vec<Arc<dyn ExecutionPlan>> = n
                        .children()
                        .into_iter()
                        .map(|c| {
                            gates += 1;
                            Arc::new(GateExec::new(c.clone(), started.clone())) as Arc<dyn ExecutionPlan>
                        })
                        .collect();
                    Ok(Transformed::yes(
                        n.replace_children(children, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))?,
                    ))
                })?
                .data;
            if gates == 0 {
                return Ok(Transformed::no(node));
            }
            let beside = BesideExec {
                properties: exec.properties().clone(),
                input,
                subqueries: exec.subqueries().to_vec(),
                results: exec.results().clone(),
                started,
                metrics: ExecutionPlanMetricsSet::new(),
            };
            Ok(Transformed::yes(Arc::new(beside) as Arc<dyn ExecutionPlan>))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "basalt_subqueries_beside"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `ScalarSubqueryExec` with its subqueries started at once (see the module): its first
/// child is the main input, with gates, the others the subqueries.
pub struct BesideExec {
    input: Arc<dyn ExecutionPlan>,
    subqueries: Vec<ScalarSubqueryLink>,
    results: ScalarSubqueryResults,
    started: Arc<Started>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl fmt::Debug for BesideExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BesideExec: subqueries={}", self.subqueries.len())
    }
}

impl DisplayAs for BesideExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ScalarSubqueriesBesideExec: subqueries={}", self.subqueries.len())
    }
}

impl ExecutionPlan for BesideExec {
    fn name(&self) -> &'static str {
        "ScalarSubqueriesBesideExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        std::iter::once(&self.input).chain(self.subqueries.iter().map(|s| &s.plan)).collect()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        std::iter::once(true).chain(self.subqueries.iter().map(|_| false)).collect()
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false; self.subqueries.len() + 1]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != self.subqueries.len() + 1 {
            return Err(DataFusionError::Internal("ScalarSubqueriesBesideExec: wrong number of children".into()));
        }
        let input = children.remove(0);
        let subqueries =
            self.subqueries.iter().zip(children).map(|(s, plan)| ScalarSubqueryLink { plan, index: s.index }).collect();
        Ok(Arc::new(BesideExec {
            properties: input.properties().clone(),
            input,
            subqueries,
            results: self.results.clone(),
            started: self.started.clone(),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        // A plan run again runs its subqueries again (the gates share `started`).
        self.results.clear();
        self.started.reset();
        Ok(self)
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let (subqueries, results, ctx) = (self.subqueries.clone(), self.results.clone(), context.clone());
        let elapsed = MetricBuilder::new(&self.metrics).subset_time("subqueries_time", partition);
        let run = self.started.start(move || {
            let task = SpawnedTask::spawn(async move {
                let _timer = elapsed.timer();
                run_subqueries(subqueries, results, ctx).await
            });
            async move {
                match task.join().await {
                    Ok(result) => result.map_err(Arc::new),
                    Err(e) => {
                        Err(Arc::new(DataFusionError::Execution(format!("a scalar subquery's task failed: {e}"))))
                    }
                }
            }
            .boxed()
            .shared()
        });
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(BesideStream { schema: self.input.schema(), input, run: Some(run), ended: false }))
    }
}

/// Runs each subquery, at the same time, and keeps its value for the expressions that read it.
async fn run_subqueries(
    subqueries: Vec<ScalarSubqueryLink>,
    results: ScalarSubqueryResults,
    context: Arc<TaskContext>,
) -> Result<()> {
    let runs = subqueries.into_iter().map(|s| {
        let (results, context) = (results.clone(), context.clone());
        async move { results.set(s.index, scalar_of(s.plan, context).await?) }
    });
    futures::future::try_join_all(runs).await.map(|_| ())
}

/// A subquery's one value: NULL of its type without rows, an error with more than one.
async fn scalar_of(plan: Arc<dyn ExecutionPlan>, context: Arc<TaskContext>) -> Result<ScalarValue> {
    let schema = plan.schema();
    if schema.fields().len() != 1 {
        return Err(DataFusionError::Internal(format!(
            "a scalar subquery returns {} columns, not one",
            schema.fields().len()
        )));
    }
    let mut stream = datafusion::physical_plan::execute_stream(plan, context)?;
    let mut value = None;
    while let Some(batch) = stream.next().await.transpose()? {
        if batch.num_rows() == 0 {
            continue;
        }
        if value.is_some() || batch.num_rows() > 1 {
            return Err(DataFusionError::Execution("Scalar subquery returned more than one row".into()));
        }
        value = Some(ScalarValue::try_from_array(batch.column(0), 0)?);
    }
    match value {
        Some(v) => Ok(v),
        None => ScalarValue::try_from(schema.field(0).data_type()),
    }
}

/// The main input's batches; a subquery's error as soon as it happens; the end once both the
/// input and the subqueries have ended.
struct BesideStream {
    schema: SchemaRef,
    input: SendableRecordBatchStream,
    run: Option<Run>,
    ended: bool,
}

impl Stream for BesideStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(run) = self.run.as_mut() {
            match run.poll_unpin(cx) {
                Poll::Ready(Err(e)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(DataFusionError::Shared(e))));
                }
                Poll::Ready(Ok(())) => self.run = None,
                Poll::Pending => {}
            }
        }
        match self.input.poll_next_unpin(cx) {
            // Waits for the subqueries (woken by their run, polled above).
            Poll::Ready(None) if self.run.is_some() => Poll::Pending,
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl RecordBatchStream for BesideStream {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// Runs its input while the statement's subqueries run and passes its batches on once they
/// have answered (see the module).
pub struct GateExec {
    input: Arc<dyn ExecutionPlan>,
    started: Arc<Started>,
    metrics: ExecutionPlanMetricsSet,
}

impl GateExec {
    fn new(input: Arc<dyn ExecutionPlan>, started: Arc<Started>) -> Self {
        Self { input, started, metrics: ExecutionPlanMetricsSet::new() }
    }
}

impl fmt::Debug for GateExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubqueryGateExec")
    }
}

impl DisplayAs for GateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SubqueryGateExec")
    }
}

impl ExecutionPlan for GateExec {
    fn name(&self) -> &'static str {
        "SubqueryGateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[Arc<dyn ExecutionPlan>; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Internal("SubqueryGateExec takes one input".into()))?;
        Ok(Arc::new(GateExec::new(input, self.started.clone())))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(GateStream {
            schema: self.input.schema(),
            input,
            started: self.started.clone(),
            run: None,
            open: false,
            held: VecDeque::new(),
            held_bytes: 0,
            input_ended: false,
            held_before_open: MetricBuilder::new(&self.metrics).counter("batches_held", partition),
        }))
    }
}

struct GateStream {
    schema: SchemaRef,
    input: SendableRecordBatchStream,
    started: Arc<Started>,
    run: Option<Run>,
    /// The subqueries have answered.
    open: bool,
    held: VecDeque<Result<RecordBatch>>,
    held_bytes: usize,
    input_ended: bool,
    held_before_open: datafusion::physical_plan::metrics::Count,
}

impl GateStream {
    /// Reads the input into `held` until it would wait, ends, fails or fills the gate.
    fn read_ahead(&mut self, cx: &mut Context<'_>) {
        while !self.input_ended && self.held_bytes < GATE_BYTES_MAX {
            match self.input.poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => {
                    self.held_bytes += item.as_ref().map_or(0, RecordBatch::get_array_memory_size);
                    self.input_ended = item.is_err();
                    self.held.push_back(item);
                    self.held_before_open.add(1);
                }
                Poll::Ready(None) => self.input_ended = true,
                Poll::Pending => return,
            }
        }
    }
}

impl Stream for GateStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self.open {
            if self.run.is_none() {
                self.run = self.started.get();
            }
            let Some(run) = self.run.as_mut() else {
                self.open = true;
                self.input_ended = true;
                self.held.clear();
                return Poll::Ready(Some(Err(DataFusionError::Internal(
                    "a subquery gate ran before its statement started the subqueries".into(),
                ))));
            };
            match run.poll_unpin(cx) {
                Poll::Ready(Ok(())) => self.open = true,
                Poll::Ready(Err(e)) => {
                    (self.open, self.input_ended) = (true, true);
                    self.held.clear();
                    return Poll::Ready(Some(Err(DataFusionError::Shared(e))));
                }
                Poll::Pending => {
                    self.read_ahead(cx);
                    return Poll::Pending;
                }
            }
        }
        if let Some(item) = self.held.pop_front() {
            self.held_bytes -= item.as_ref().map_or(0, RecordBatch::get_array_memory_size);
            return Poll::Ready(Some(item));
        }
        if self.input_ended {
            return Poll::Ready(None);
        }
        self.input.poll_next_unpin(cx)
    }
}

impl RecordBatchStream for GateStream {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}
