//! A complete aggregation that a statement reads in two places runs once.
//!
//! DataFusion plans a common table expression at every place that names it: TPC-H q15's
//! `revenue0` (a scan and aggregation of a quarter of `lineitem`) ran once for the scalar
//! subquery (`max(total_revenue)`) and again for the join, one after the other. The last
//! physical optimizer pass ([`ShareCommonAggregates`]) finds aggregations whose subtrees print
//! the same (operators, expressions, filters, schema) and puts both behind one
//! [`SharedExec`]: the first reader of a partition runs it and keeps its batches, the other
//! replays them. PostgreSQL materializes a CTE that is referenced twice the same way.
//!
//! Only what gives the same rows wherever it runs is shared: subtrees with runtime filters from
//! a join above them (`runtime_filters`, `key_sets`), key sinks (they feed other scans) or
//! volatile functions are left alone. What is kept counts against the statement's memory pool;
//! a partition's results over [`SHARED_BYTES_MAX`] or over what the pool grants are not kept:
//! each reader then runs the subtree itself, as before.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result};
use datafusion::config::ConfigOptions;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, displayable};
use futures::{StreamExt, TryStreamExt};

/// Most bytes of one partition's results a shared subtree keeps for its other readers.
pub const SHARED_BYTES_MAX: usize = 64 << 20;

/// Names in a subtree's text that make it unsafe to share (see the module).
const NOT_SHARED: [&str; 7] =
    ["runtime_filters=", "key_sets=", "KeySinkExec", "DynamicFilter", "random(", "uuid(", "now("];

#[derive(Debug, Default)]
pub struct ShareCommonAggregates;

/// Whether `node` is a complete aggregation (a candidate to share).
fn is_candidate(node: &Arc<dyn ExecutionPlan>) -> bool {
    node.downcast_ref::<AggregateExec>()
        .is_some_and(|a| !matches!(a.mode(), AggregateMode::Partial | AggregateMode::PartialReduce))
}

/// The text that identifies a candidate subtree, or None when it must not be shared.
fn fingerprint(node: &Arc<dyn ExecutionPlan>) -> Option<String> {
    let text = format!("{}\n{:?}", displayable(node.as_ref()).indent(true), node.schema());
    (!NOT_SHARED.iter().any(|n| text.contains(n))).then_some(text)
}

/// A node's identity within one plan (the same `Arc` in both passes below).
fn identity(node: &Arc<dyn ExecutionPlan>) -> *const () {
    Arc::as_ptr(node) as *const ()
}

impl PhysicalOptimizerRule for ShareCommonAggregates {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        use std::collections::HashMap;
        let mut candidates = vec![];
        plan.apply(|node| {
            if is_candidate(node) {
                candidates.push(node.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        // Most plans have one complete aggregation or none: nothing to print.
        if candidates.len() < 2 {
            return Ok(plan);
        }
        let texts: HashMap<*const (), String> =
            candidates.iter().filter_map(|n| fingerprint(n).map(|f| (identity(n), f))).collect();
        // Counted per place: one node may stand in two places of the tree.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for text in candidates.iter().filter_map(|n| texts.get(&identity(n))) {
            *seen.entry(text.as_str()).or_default() += 1;
        }
        seen.retain(|_, n| *n > 1);
        if seen.is_empty() {
            return Ok(plan);
        }
        let mut states: HashMap<&str, Arc<SharedState>> = HashMap::new();
        plan.transform_down(|node| {
            let Some((text, readers)) =
                texts.get(&identity(&node)).and_then(|t| seen.get_key_value(t.as_str())).map(|(t, n)| (*t, *n))
            else {
                return Ok(Transformed::no(node));
            };
            let partitions = node.properties().partitioning.partition_count();
            let state = states.entry(text).or_insert_with(|| Arc::new(SharedState::new(partitions))).clone();
            let shared = Arc::new(SharedExec { input: node, state, readers, metrics: ExecutionPlanMetricsSet::new() });
            // Below a shared subtree nothing more is shared: it runs once.
            Ok(Transformed::new(shared as Arc<dyn ExecutionPlan>, true, TreeNodeRecursion::Jump))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "basalt_share_common_aggregates"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Per partition: the results once computed (None: over the size limit, each reader runs it).
#[derive(Debug)]
struct SharedState {
    partitions: Vec<tokio::sync::OnceCell<Option<Arc<KeptBatches>>>>,
}

/// A partition's batches and the memory reserved for them (released when the plan is dropped).
#[derive(Debug)]
struct KeptBatches {
    batches: Vec<RecordBatch>,
    _reservation: MemoryReservation,
}

impl SharedState {
    fn new(partitions: usize) -> Self {
        Self { partitions: (0..partitions).map(|_| tokio::sync::OnceCell::new()).collect() }
    }
}

/// One of the places that read a shared subtree (see the module).
#[derive(Debug)]
pub struct SharedExec {
    input: Arc<dyn ExecutionPlan>,
    state: Arc<SharedState>,
    /// How many places read the subtree.
    readers: usize,
    metrics: ExecutionPlanMetricsSet,
}

impl DisplayAs for SharedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SharedExec: readers={}", self.readers)
    }
}

impl ExecutionPlan for SharedExec {
    fn name(&self) -> &'static str {
        "SharedExec"
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
            .map_err(|_| DataFusionError::Internal("SharedExec takes one input".into()))?;
        // A new input is another subtree: it is not shared with the old one's readers.
        let partitions = input.properties().partitioning.partition_count();
        Ok(Arc::new(SharedExec {
            input,
            state: Arc::new(SharedState::new(partitions)),
            readers: 1,
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let schema = self.input.schema();
        let input = self.input.clone();
        let state = self.state.clone();
        let computed = MetricBuilder::new(&self.metrics).counter("computed", partition);
        let replayed = MetricBuilder::new(&self.metrics).counter("replayed", partition);
        if partition >= state.partitions.len() {
            return Err(DataFusionError::Internal(format!("SharedExec has no partition {partition}")));
        }
        // Whoever polls first runs the subtree within its own stream (dropping the statement
        // stops it; a reader dropped mid-way leaves the run to the next); the others wait for
        // its batches. Nothing runs until polled.
        let stream = futures::stream::once(async move {
            let cell = &state.partitions[partition];
            let mut ran = false;
            let kept = cell
                .get_or_try_init(|| {
                    ran = true;
                    collect_bounded(input.clone(), partition, context.clone())
                })
                .await?
                .clone();
            let out: SendableRecordBatchStream = match kept {
                Some(batches) => {
                    if ran {
                        computed.add(1);
                    } else {
                        replayed.add(1);
                    }
                    let schema = input.schema();
                    let batches = batches.batches.clone();
                    Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter(batches.into_iter().map(Ok))))
                }
                None => {
                    computed.add(1);
                    input.execute(partition, context)?
                }
            };
            Ok::<_, DataFusionError>(out)
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream.boxed())))
    }
}

/// A partition's batches, or None when they take more than [`SHARED_BYTES_MAX`] or than the
/// statement's memory pool grants (what is kept counts against the statement's memory limit
/// until the statement ends).
async fn collect_bounded(
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    context: Arc<TaskContext>,
) -> Result<Option<Arc<KeptBatches>>> {
    let reservation = MemoryConsumer::new(format!("SharedExec[{partition}]")).register(context.memory_pool());
    let mut stream = input.execute(partition, context)?;
    let (mut batches, mut bytes) = (vec![], 0usize);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let size = batch.get_array_memory_size();
        bytes += size;
        if bytes > SHARED_BYTES_MAX || reservation.try_grow(size).is_err() {
            return Ok(None);
        }
        batches.push(batch);
    }
    Ok(Some(Arc::new(KeptBatches { batches, _reservation: reservation })))
}
