//! Build-side key sets: the keys of a hash join's build side, collected as they stream into
//! the join and handed to the scan of its probe side, which has the leaves drop rows without a
//! match before sending them.
//!
//! DataFusion's own runtime filter carries the keys only for small build sides (an `IN` list of
//! literal expressions, up to `RUNTIME_IN_LIST_MAX` keys in the engine); for larger ones it
//! checks rows against the join's hash table, which cannot leave the aggregator. A
//! [`KeySinkExec`] above the build side collects its integer keys instead (8 bytes each, up to
//! [`KEY_SET_MAX`]); the probe scan's leaves check them with the integer-set membership they use
//! for `IN` lists (a bitmap over the keys' span), so TPC-H q4 at SF 1 has `lineitem` send the
//! 145,000 rows of its 57,000 orders instead of 3.79M.
//!
//! One plan may run several times (a prepared statement): a set belongs to one run, told apart
//! by the run's `TaskContext`, and a scan uses only the set of its own run, complete.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{JoinSide, JoinType};
use datafusion::common::{NullEquality, Result};
use datafusion::config::ConfigOptions;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::joins::utils::build_join_schema;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::Stream;

use crate::LeafScanExec;

/// The most keys a set holds; a larger build side sends no set (the join's own filter, bounds
/// only, applies). 32 MB of keys, and as a bitmap at most the keys' span in bits. TPC-H q3 at
/// SF 10 has 1.45M orders on its build side: under a limit of 1M keys `lineitem` sent 32M rows.
pub const KEY_SET_MAX: usize = 1 << 22;

/// A set is applied only when it keeps at most this share of the probe column's distinct
/// values (by the planner's estimate): checking every row costs about as much as the join's
/// probe saves when most rows match.
pub const KEY_SET_SELECTIVITY: f64 = 0.5;

/// The keys one run of a plan collected from a join's build side.
struct Run {
    context: Arc<TaskContext>,
    keys: Vec<i64>,
    /// Partitions of the build side: the set is complete when this many ended.
    partitions: usize,
    /// Build partitions whose stream ended.
    done: usize,
    /// More than [`KEY_SET_MAX`] keys: no set.
    overflow: bool,
}

/// Shared by a [`KeySinkExec`] and the probe scans of its join.
#[derive(Default)]
pub struct KeySet {
    run: Mutex<Option<Run>>,
    /// Woken when a build partition ends.
    ended: tokio::sync::Notify,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet").finish_non_exhaustive()
    }
}

impl KeySet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A build partition of this run (of `partitions`) starts: a set of an earlier run is
    /// dropped.
    fn start(&self, context: &Arc<TaskContext>, partitions: usize) {
        let mut run = self.lock();
        if !run.as_ref().is_some_and(|r| Arc::ptr_eq(&r.context, context)) {
            *run = Some(Run { context: context.clone(), keys: vec![], partitions, done: 0, overflow: false });
        }
    }

    /// A build partition of this run ended with these keys (None: over the limit).
    fn finish(&self, context: &Arc<TaskContext>, keys: Option<Vec<i64>>) {
        let mut guard = self.lock();
        let Some(run) = guard.as_mut().filter(|r| Arc::ptr_eq(&r.context, context)) else { return };
        run.done += 1;
        match keys {
            Some(keys) if !run.overflow && run.keys.len() + keys.len() <= KEY_SET_MAX => run.keys.extend(keys),
            _ => {
                run.overflow = true;
                run.keys = vec![];
            }
        }
        drop(guard);
        self.ended.notify_waiters();
    }

    /// Whether every build partition of this run ended (the set is complete or over the limit).
    fn ended(&self, context: &Arc<TaskContext>) -> bool {
        self.lock().as_ref().is_some_and(|r| Arc::ptr_eq(&r.context, context) && (r.overflow || r.done >= r.partitions))
    }

    /// Resolves when every build partition of this run ended; the caller bounds the wait.
    ///
    /// A probe scan waits for its sets before it calls a leaf (holding nothing a build side
    /// needs): a partitioned join probes partition `i` once build partition `i` is in, and
    /// operators that start their inputs as soon as they start (`CoalescePartitionsExec`,
    /// `SortPreservingMergeExec`) start a probe scan below them before any build side is in.
    pub async fn wait_ended(&self, context: &Arc<TaskContext>) {
        loop {
            let notified = self.ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.ended(context) {
                return;
            }
            notified.await;
        }
    }

    /// The complete set of this run, sorted and without duplicates; None while a build
    /// partition is still running, over the limit, or for another run.
    pub fn keys(&self, context: &Arc<TaskContext>) -> Option<Vec<i64>> {
        let mut guard = self.lock();
        let run = guard.as_mut().filter(|r| Arc::ptr_eq(&r.context, context))?;
        if run.overflow || run.done < run.partitions {
            return None;
        }
        run.keys.sort_unstable();
        run.keys.dedup();
        Some(run.keys.clone())
    }
}

/// A probe scan's link to the key set of a join above it: rows whose `column` value is not in
/// the set cannot match.
#[derive(Debug, Clone)]
pub struct ProbeKeys {
    pub column: String,
    pub set: Arc<KeySet>,
}

/// Passes its input through and collects the integer join keys in column `key` of every batch
/// into a [`KeySet`].
#[derive(Debug)]
pub struct KeySinkExec {
    input: Arc<dyn ExecutionPlan>,
    key: usize,
    set: Arc<KeySet>,
    metrics: ExecutionPlanMetricsSet,
}

impl KeySinkExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, key: usize) -> Self {
        Self { input, key, set: Arc::default(), metrics: ExecutionPlanMetricsSet::new() }
    }

    pub fn set(&self) -> &Arc<KeySet> {
        &self.set
    }
}

impl DisplayAs for KeySinkExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let name = self.input.schema().fields().get(self.key).map(|f| f.name().clone()).unwrap_or_default();
        write!(f, "KeySinkExec: key={name}")
    }
}

impl ExecutionPlan for KeySinkExec {
    fn name(&self) -> &'static str {
        "KeySinkExec"
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
            .map_err(|_| datafusion::common::DataFusionError::Internal("KeySinkExec takes one input".into()))?;
        // The scans below the join keep their link to this set: same set, new input.
        Ok(Arc::new(KeySinkExec { set: self.set.clone(), ..KeySinkExec::new(input, self.key) }))
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<datafusion::physical_plan::statistics::ChildStats> {
        vec![datafusion::physical_plan::statistics::ChildStats::At(partition)]
    }

    /// Its input's: it passes every row on (a broadcast join reads the build side's estimate
    /// through it).
    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<datafusion::common::Statistics>],
        _args: &datafusion::physical_plan::statistics::StatisticsArgs,
    ) -> Result<Arc<datafusion::common::Statistics>> {
        Ok(input_stats
            .first()
            .cloned()
            .unwrap_or_else(|| Arc::new(datafusion::common::Statistics::new_unknown(&self.schema()))))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context.clone())?;
        self.set.start(&context, self.input.properties().partitioning.partition_count());
        let keys = MetricBuilder::new(&self.metrics).counter("build_keys", partition);
        Ok(Box::pin(KeySinkStream {
            input,
            key: self.key,
            set: self.set.clone(),
            context,
            keys: Some(vec![]),
            counted: keys,
            finished: false,
        }))
    }
}

struct KeySinkStream {
    input: SendableRecordBatchStream,
    key: usize,
    set: Arc<KeySet>,
    context: Arc<TaskContext>,
    /// None once over [`KEY_SET_MAX`] (or a batch had no integer key column).
    keys: Option<Vec<i64>>,
    counted: datafusion::physical_plan::metrics::Count,
    finished: bool,
}

impl KeySinkStream {
    fn collect(&mut self, batch: &RecordBatch) {
        let Some(keys) = self.keys.as_mut() else { return };
        let Some(column) = batch.columns().get(self.key) else {
            self.keys = None;
            return;
        };
        let Some(values) = column.as_primitive_opt::<Int64Type>() else {
            self.keys = None;
            return;
        };
        if keys.len() + values.len() > KEY_SET_MAX {
            self.keys = None;
            return;
        }
        // Null keys match nothing (the join compares with `NullEqualsNothing`).
        if values.null_count() == 0 {
            keys.extend_from_slice(values.values());
        } else {
            keys.extend(values.iter().flatten());
        }
        self.counted.add(values.len() - values.null_count());
    }
}

impl Stream for KeySinkStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.input.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(batch))) => self.collect(batch),
            Poll::Ready(None) if !self.finished => {
                self.finished = true;
                let keys = self.keys.take();
                self.set.finish(&self.context, keys);
            }
            // An error ends the query; the set stays incomplete and is never used.
            _ => {}
        }
        polled
    }
}

impl RecordBatchStream for KeySinkStream {
    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }
}

/// Puts a [`KeySinkExec`] above the build side of every hash join on one integer column whose
/// runtime filter reached a leaf scan, and links the scan to it (`LeafScanExec::probe_keys`).
/// Runs before [`crate::push_fragments`], so a scan that moves into a fragment keeps its link
/// (the aggregator reads the set when it sends the fragment).
///
/// Joins whose runtime filter cannot reach a scan get sets through
/// [`share_build_keys_through_operators`], unless runtime filters are off
/// (`datafusion.optimizer.enable_join_dynamic_filter_pushdown`).
pub fn share_build_keys(plan: Arc<dyn ExecutionPlan>, config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
    let through_operators = |plan| match config.optimizer.enable_join_dynamic_filter_pushdown {
        true => share_build_keys_through_operators(plan),
        false => Ok(plan),
    };
    // Runtime filter id -> the set of its join and the estimated keys of its build side.
    let mut sets: Vec<(u64, Arc<KeySet>, Option<usize>)> = vec![];
    let plan = plan
        .transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else { return Ok(Transformed::no(node)) };
            let ids: Vec<u64> = node.dynamic_expressions_produced().iter().filter_map(|e| e.expression_id()).collect();
            let [(left, _)] = join.on() else { return Ok(Transformed::no(node)) };
            let Some(left) = left.downcast_ref::<Column>() else { return Ok(Transformed::no(node)) };
            let field = join.left().schema().fields().get(left.index()).cloned();
            let integer = field.is_some_and(|f| f.data_type() == &DataType::Int64);
            if ids.is_empty() || !integer || join.null_equality() != NullEquality::NullEqualsNothing {
                return Ok(Transformed::no(node));
            }
            let sink = KeySinkExec::new(join.left().clone(), left.index());
            let keys = build_keys_estimate(join.left(), left.index());
            sets.extend(ids.iter().map(|id| (*id, sink.set().clone(), keys)));
            let right = join.right().clone();
            let options = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
            Ok(Transformed::yes(node.clone().replace_children(vec![Arc::new(sink), right], options)?))
        })?
        .data;
    if sets.is_empty() {
        return through_operators(plan);
    }
    let mut used: Vec<Arc<KeySet>> = vec![];
    let linked = plan.transform_up(|node| {
        let Some(scan) = node.downcast_ref::<LeafScanExec>() else { return Ok(Transformed::no(node)) };
        let probes: Vec<ProbeKeys> = scan
            .dynamic
            .iter()
            .filter_map(|expr| {
                let id = expr.expression_id()?;
                let (_, set, keys) = sets.iter().find(|(i, _, _)| *i == id)?;
                let [child] = expr.children()[..] else { return None };
                let column = child.downcast_ref::<Column>()?.name().to_string();
                let integer = scan.output.field_with_name(&column).ok()?.data_type() == &DataType::Int64;
                (integer && selective(*keys, scan, &column)).then(|| ProbeKeys { column, set: set.clone() })
            })
            .collect();
        if probes.is_empty() {
            return Ok(Transformed::no(node));
        }
        used.extend(probes.iter().map(|p| p.set.clone()));
        let mut linked = scan.with_dynamic(scan.dynamic.clone());
        linked.probe_keys = probes;
        Ok(Transformed::yes(Arc::new(linked) as Arc<dyn ExecutionPlan>))
    })?;
    // A sink no scan reads from (its filter went to another operator, or to a text column)
    // would collect keys for nothing.
    let pruned = linked.data.transform_up(|node| match node.downcast_ref::<KeySinkExec>() {
        Some(sink) if !used.iter().any(|u| Arc::ptr_eq(u, &sink.set)) => Ok(Transformed::yes(sink.input.clone())),
        _ => Ok(Transformed::no(node)),
    })?;
    through_operators(pruned.data)
}

/// The distinct keys a join's build side is estimated to send, when the side is a leaf scan
/// (under operators that pass its rows on): the scan's estimate, from the statistics the leaves
/// keep, of the column's distinct values among the rows its filters keep. Above joins,
/// aggregates or filters the leaves did not apply, estimates are too rough to turn a set down
/// (TPC-H q20's semi join is estimated at all of `partsupp` and keeps 366 rows): None.
fn build_keys_estimate(build: &Arc<dyn ExecutionPlan>, key: usize) -> Option<usize> {
    let node: &dyn ExecutionPlan = build.as_ref();
    if let Some(scan) = node.downcast_ref::<LeafScanExec>() {
        let estimate = scan.spec.estimate.as_ref()?;
        let column = scan.output.fields().get(key)?.name();
        let distinct = estimate.distinct_of(&scan.output, column).unwrap_or(estimate.rows);
        return usize::try_from(distinct.min(estimate.rows)).ok();
    }
    let key = if let Some(projection) = node.downcast_ref::<ProjectionExec>() {
        projection.expr().get(key)?.expr.downcast_ref::<Column>()?.index()
    } else if passes_rows_on(node) {
        key
    } else {
        return None;
    };
    build_keys_estimate(build.children().first()?, key)
}

/// Operators that pass their input's rows on as they are, only regrouped into other batches or
/// partitions (with a fetch, `CoalescePartitionsExec` also stops early).
fn passes_rows_on(node: &dyn ExecutionPlan) -> bool {
    node.is::<CoalescePartitionsExec>()
        || node.is::<RepartitionExec>()
        || node.is::<CooperativeExec>()
        || node.is::<KeySinkExec>()
}

/// Whether a set of about `keys` keys may keep under [`KEY_SET_SELECTIVITY`] of the scan's
/// distinct values in `column` (true when either is not known). A scan waits for its sets
/// before it starts, so a set that will not be applied (an unfiltered dimension's keys) is
/// not linked: the scan would wait for the whole build side for nothing.
fn selective(keys: Option<usize>, scan: &LeafScanExec, column: &str) -> bool {
    let distinct = scan.spec.estimate.as_ref().and_then(|e| e.distinct_of(&scan.output, column));
    match (keys, distinct) {
        (Some(keys), Some(distinct)) => keys as f64 <= KEY_SET_SELECTIVITY * distinct as f64,
        _ => true,
    }
}

/// Links key sets the runtime filters cannot carry: DataFusion builds a join's filter over all
/// of its keys, so the filter of a join on two columns stops at the first operator that
/// produces only one of them (TPC-H q2's semi join on `ps_partkey` and the subquery's
/// `min(ps_supplycost)` stops at the aggregate). For every join left without a set, each
/// integer key is followed down its probe side, through projections, filters, repartitions,
/// the group keys of aggregates and the kept side of joins, to the leaf scan that reads it
/// (see [`link_probe`]); each that arrives gets a [`KeySinkExec`] over its build side.
fn share_build_keys_through_operators(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let linked = plan.transform_up(|node| {
        let Some(join) = node.downcast_ref::<HashJoinExec>() else { return Ok(Transformed::no(node)) };
        // Probe rows without a matching key may be dropped only when the join never emits
        // unmatched probe rows; a null-aware anti join (NOT IN) also looks at null keys.
        let drops_unmatched_probe_rows = matches!(
            join.join_type(),
            JoinType::Inner
                | JoinType::Left
                | JoinType::LeftSemi
                | JoinType::LeftAnti
                | JoinType::LeftMark
                | JoinType::RightSemi
        );
        if !drops_unmatched_probe_rows
            || join.null_aware
            || join.null_equality() != NullEquality::NullEqualsNothing
            || join.left().is::<KeySinkExec>()
        {
            return Ok(Transformed::no(node));
        }
        let integer = |plan: &Arc<dyn ExecutionPlan>, index: usize| {
            plan.schema().fields().get(index).is_some_and(|f| f.data_type() == &DataType::Int64)
        };
        // Every key that arrives at a scan gets its set (a sink per key, one over the other):
        // the scan applies those that keep few enough of its column's values when they are
        // complete. TPC-H q9 joins `partsupp` on supplier and part: all 10,000 suppliers
        // reach the build side, but only the 10,660 green parts of 200,000, which keep 43,000
        // of `partsupp`'s 800,000 rows.
        let (mut build, mut probe) = (join.left().clone(), join.right().clone());
        let mut linked = false;
        for (left, right) in join.on() {
            let (Some(left), Some(right)) = (left.downcast_ref::<Column>(), right.downcast_ref::<Column>()) else {
                continue;
            };
            if !integer(join.left(), left.index()) || !integer(join.right(), right.index()) {
                continue;
            }
            let sink = KeySinkExec::new(build.clone(), left.index());
            let keys = build_keys_estimate(join.left(), left.index());
            let Some(linked_probe) = link_probe(&probe, right.index(), sink.set(), keys)? else { continue };
            (build, probe, linked) = (Arc::new(sink), linked_probe, true);
        }
        if !linked {
            return Ok(Transformed::no(node));
        }
        let options = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
        Ok(Transformed::yes(node.clone().replace_children(vec![build, probe], options)?))
    })?;
    Ok(linked.data)
}

/// `plan` with the leaf scan that produces its output column `index` linked to `set`, or None
/// when the column's values cannot be traced to a scan's integer column through operators that
/// keep a row's key as it is and may lose rows without changing the others: dropping the rows
/// whose key is not in the set below such an operator drops exactly the output rows with those
/// keys (a group of an aggregate keyed on the column, a row of an inner join). Limits, top-k
/// sorts, global aggregates and the padded side of outer joins are not such operators.
fn link_probe(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
    set: &Arc<KeySet>,
    keys: Option<usize>,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let node: &dyn ExecutionPlan = plan.as_ref();
    let (child, child_index): (usize, usize) = if let Some(scan) = node.downcast_ref::<LeafScanExec>() {
        let Some(field) = scan.output.fields().get(index) else { return Ok(None) };
        if field.data_type() != &DataType::Int64 || !selective(keys, scan, field.name()) {
            return Ok(None);
        }
        let mut linked = scan.with_dynamic(scan.dynamic.clone());
        linked.probe_keys.push(ProbeKeys { column: field.name().clone(), set: set.clone() });
        return Ok(Some(Arc::new(linked)));
    } else if let Some(projection) = node.downcast_ref::<ProjectionExec>() {
        let Some(column) = projection.expr().get(index).and_then(|e| e.expr.downcast_ref::<Column>()) else {
            return Ok(None);
        };
        (0, column.index())
    } else if let Some(filter) = node.downcast_ref::<FilterExec>() {
        match filter.projection() {
            Some(projection) => match projection.get(index) {
                Some(i) => (0, *i),
                None => return Ok(None),
            },
            None => (0, index),
        }
    } else if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
        let group = aggregate.group_expr();
        if group.has_grouping_set() || aggregate.limit_options().is_some() {
            return Ok(None);
        }
        let Some(column) = group.expr().get(index).and_then(|(e, _)| e.downcast_ref::<Column>()) else {
            return Ok(None);
        };
        (0, column.index())
    } else if let Some(join) = node.downcast_ref::<HashJoinExec>() {
        let (_, columns) = build_join_schema(&join.left().schema(), &join.right().schema(), join.join_type());
        let joined = match &join.projection {
            Some(projection) => match projection.get(index) {
                Some(i) => *i,
                None => return Ok(None),
            },
            None => index,
        };
        let Some(column) = columns.get(joined) else { return Ok(None) };
        // Rows of a side may be dropped when every output row they make carries their key:
        // both sides of an inner join, the kept side of an outer, semi or anti join.
        let droppable = match column.side {
            JoinSide::Left => matches!(
                join.join_type(),
                JoinType::Inner | JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark
            ),
            JoinSide::Right => matches!(
                join.join_type(),
                JoinType::Inner | JoinType::Right | JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark
            ),
            JoinSide::None => false,
        };
        if !droppable || join.null_aware {
            return Ok(None);
        }
        (if column.side == JoinSide::Left { 0 } else { 1 }, column.index)
    } else if passes_rows_on(node) || node.is::<SortExec>() || node.is::<SortPreservingMergeExec>() {
        // Rows pass through in another order or partition; with a fetch the rows dropped
        // would let others in.
        if plan.fetch().is_some() {
            return Ok(None);
        }
        (0, index)
    } else {
        return Ok(None);
    };
    let children = plan.children();
    let Some(input) = children.get(child) else { return Ok(None) };
    let Some(linked) = link_probe(input, child_index, set, keys)? else { return Ok(None) };
    let mut children: Vec<Arc<dyn ExecutionPlan>> = children.into_iter().cloned().collect();
    children[child] = linked;
    let options = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
    Ok(Some(plan.clone().replace_children(children, options)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_complete_when_every_build_partition_ended_in_the_same_run() {
        let set = KeySet::default();
        let (run, other) = (Arc::new(TaskContext::default()), Arc::new(TaskContext::default()));
        set.start(&run, 2);
        set.start(&run, 2);
        set.finish(&run, Some(vec![5, 3, 5]));
        assert_eq!(set.keys(&run), None, "one partition still runs");
        set.finish(&run, Some(vec![1, 3]));
        assert_eq!(set.keys(&run), Some(vec![1, 3, 5]));
        assert_eq!(set.keys(&other), None, "another run's scan");

        // A new run starts over; the old run's late partitions change nothing.
        set.start(&other, 2);
        set.finish(&run, Some(vec![9]));
        set.finish(&other, Some(vec![7]));
        set.finish(&other, Some(vec![]));
        assert_eq!(set.keys(&other), Some(vec![7]));
        assert_eq!(set.keys(&run), None);
    }

    /// A scan that waits for a set waits for its own run's last build partition, started
    /// before or after the wait began; an earlier run's partitions do not end the wait.
    #[tokio::test]
    async fn a_wait_ends_when_the_runs_last_build_partition_ends() {
        let set = Arc::new(KeySet::default());
        let (old, run) = (Arc::new(TaskContext::default()), Arc::new(TaskContext::default()));
        set.start(&old, 1);
        let waiting = tokio::spawn({
            let (set, run) = (set.clone(), run.clone());
            async move { set.wait_ended(&run).await }
        });
        set.finish(&old, Some(vec![1]));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "another run ended");
        set.start(&run, 2);
        set.finish(&run, Some(vec![4]));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one partition still runs");
        set.finish(&run, Some(vec![2]));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("wait ends").expect("task");
        assert_eq!(set.keys(&run), Some(vec![2, 4]));
        // Already ended: no wait.
        tokio::time::timeout(std::time::Duration::from_secs(5), set.wait_ended(&run)).await.expect("ended");
    }

    #[test]
    fn a_partition_over_the_limit_leaves_no_set() {
        let set = KeySet::default();
        let run = Arc::new(TaskContext::default());
        set.start(&run, 2);
        set.finish(&run, None);
        set.finish(&run, Some(vec![1]));
        assert_eq!(set.keys(&run), None);
        let set = KeySet::default();
        set.start(&run, 2);
        set.finish(&run, Some(vec![0; KEY_SET_MAX]));
        set.finish(&run, Some(vec![1]));
        assert_eq!(set.keys(&run), None, "together over the limit");
    }
}
