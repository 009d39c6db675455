//! Broadcast joins: a hash join whose build side is small (a filtered dimension) runs on the
//! leaves, inside the fragment of its probe side's scan, with the build side's rows sent to
//! every leaf, so that what leaves the leaves is what the operators above the join make of it
//! (partial aggregates, for a star join) instead of the probe side's rows.
//!
//! `push_fragments` turns a `HashJoinExec` in `CollectLeft` mode (DataFusion's choice for a
//! small build side, one hash table for every probe partition) whose probe side is a leaf scan
//! or a fragment into a [`LeafFragmentExec`](crate::LeafFragmentExec) with a [`BuildSlotExec`]
//! in the build side's place; the build side's plan becomes a child of the fragment exec, which
//! runs it on the aggregator when the query starts, once for all shards ([`prepare`]). Its rows
//! then fill the slot (a `MemorySourceConfig`, which `datafusion-proto` encodes as Arrow IPC),
//! its keys fill the join's runtime filter as a key list (so the leaves' scans skip rows
//! without a match, as they do when the join runs on the aggregator), and the encoded
//! fragment goes to the leaf of each shard.
//!
//! Only joins whose output rows each come from one probe row and the build side as a whole can
//! run shard by shard: inner joins and probe-side semi joins. Only leaves in other processes
//! receive build sides (`LeafApi::in_process`): in one process there are no bytes to save. A build side that turns out larger
//! than [`BROADCAST_MAX_BYTES`] runs the join on the aggregator, as planned before.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, JoinType, NullEquality, Result, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, DynamicFilterPhysicalExpr, in_list, lit};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr, PhysicalExprRef};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};

/// Most bytes of build-side rows one fragment sends to each leaf (all its joins together); a
/// fragment whose build sides turn out larger runs as planned before the broadcast.
pub const BROADCAST_MAX_BYTES: usize = 16 << 20;

/// Most rows the planner may expect of a build side for its join to be broadcast.
pub const BROADCAST_MAX_ROWS: usize = 200_000;

/// Stands for a broadcast build side inside a fragment until its rows are known.
#[derive(Debug)]
pub struct BuildSlotExec {
    index: usize,
    properties: Arc<PlanProperties>,
}

impl BuildSlotExec {
    pub fn new(index: usize, schema: SchemaRef) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self { index, properties }
    }
}

impl DisplayAs for BuildSlotExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "BroadcastBuild: build={}", self.index)
    }
}

impl ExecutionPlan for BuildSlotExec {
    fn name(&self) -> &'static str {
        "BroadcastBuild"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, _partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        Err(DataFusionError::Internal("a broadcast build side is filled in before its fragment runs".into()))
    }
}

/// One broadcast join's build side, as the aggregator runs it.
#[derive(Debug, Clone)]
pub struct Build {
    /// The build side's plan (a child of the fragment exec on the aggregator).
    pub plan: Arc<dyn ExecutionPlan>,
    /// The join's keys on the build side and on the probe side, pairwise.
    on_left: Vec<PhysicalExprRef>,
    on_right: Vec<PhysicalExprRef>,
    /// The join's runtime filter, which the probe side's scan reads.
    filter: Option<Arc<DynamicFilterPhysicalExpr>>,
    probe_schema: SchemaRef,
}

impl Build {
    pub fn with_plan(&self, plan: Arc<dyn ExecutionPlan>) -> Self {
        Self { plan, ..self.clone() }
    }
}

/// Whether `join` may run shard by shard with its whole build side on every leaf: returns the
/// build side to send and the join with a [`BuildSlotExec`] numbered `index` in its place and
/// `probe` (the probe side's fragment or scan) as its probe side.
pub fn broadcastable(
    join: &HashJoinExec,
    probe: Arc<dyn ExecutionPlan>,
    index: usize,
) -> Result<Option<(Build, Arc<dyn ExecutionPlan>)>> {
    if *join.partition_mode() != PartitionMode::CollectLeft
        || !matches!(join.join_type(), JoinType::Inner | JoinType::RightSemi)
        || join.null_equality() != NullEquality::NullEqualsNothing
        || join.on().is_empty()
        || join.fetch().is_some()
    {
        return Ok(None);
    }
    let statistics = datafusion::physical_plan::statistics::StatisticsContext::new()
        .compute(join.left().as_ref(), &datafusion::physical_plan::statistics::StatisticsArgs::new())?;
    let rows = statistics.num_rows;
    if rows.get_value().is_none_or(|r| *r > BROADCAST_MAX_ROWS) {
        return Ok(None);
    }
    let build = Build {
        plan: join.left().clone(),
        on_left: join.on().iter().map(|(l, _)| l.clone()).collect(),
        on_right: join.on().iter().map(|(_, r)| r.clone()).collect(),
        filter: join
            .dynamic_expressions_produced()
            .into_iter()
            .find_map(|e| Arc::downcast::<DynamicFilterPhysicalExpr>(e as Arc<dyn std::any::Any + Send + Sync>).ok()),
        probe_schema: join.right().schema(),
    };
    let slot = Arc::new(BuildSlotExec::new(index, join.left().schema())) as Arc<dyn ExecutionPlan>;
    let joined = join.builder().with_new_children(vec![slot, probe])?.build_exec()?;
    Ok(Some((build, joined)))
}

/// What a fragment with broadcast joins sends once its build sides have run.
#[derive(Debug)]
pub enum Prepared {
    /// The encoded fragment, build rows inside, and the memory it holds.
    Plan { encoded: Arc<Vec<u8>>, rows: usize, bytes: usize, _reservation: MemoryReservation },
    /// A build side is empty: no shard has a row to return.
    Empty,
    /// The build sides are over [`BROADCAST_MAX_BYTES`]: the join runs on the aggregator.
    TooLarge,
}

/// Run the build sides (together), fill the joins' runtime filters with their keys and
/// encode the fragment with their rows in the slots (`encode`).
pub async fn prepare(
    builds: &[Build],
    template: &Arc<dyn ExecutionPlan>,
    context: Arc<TaskContext>,
    encode: impl FnOnce(Arc<dyn ExecutionPlan>) -> Result<Vec<u8>>,
) -> Result<Prepared> {
    prepare_within(builds, template, context, encode, BROADCAST_MAX_BYTES).await
}

async fn prepare_within(
    builds: &[Build],
    template: &Arc<dyn ExecutionPlan>,
    context: Arc<TaskContext>,
    encode: impl FnOnce(Arc<dyn ExecutionPlan>) -> Result<Vec<u8>>,
    max_bytes: usize,
) -> Result<Prepared> {
    let collected = futures::future::try_join_all(
        builds.iter().map(|b| datafusion::physical_plan::collect(b.plan.clone(), context.clone())),
    )
    .await?;
    let reservation = MemoryConsumer::new("broadcast build sides").register(context.memory_pool());
    let mut compacted = Vec::with_capacity(collected.len());
    let (mut rows, mut bytes) = (0, 0);
    for batches in collected {
        let mut out = Vec::with_capacity(batches.len());
        for batch in batches.into_iter().filter(|b| b.num_rows() > 0) {
            let batch = compact(batch)?;
            rows += batch.num_rows();
            bytes += batch.get_array_memory_size();
            out.push(batch);
        }
        if bytes > max_bytes {
            return Ok(Prepared::TooLarge);
        }
        reservation.try_grow(out.iter().map(RecordBatch::get_array_memory_size).sum())?;
        compacted.push(out);
    }
    if compacted.iter().any(Vec::is_empty) {
        return Ok(Prepared::Empty);
    }
    let max_keys = context.session_config().options().optimizer.hash_join_inlist_pushdown_max_distinct_values;
    for (build, batches) in builds.iter().zip(&compacted) {
        fill_filter(build, batches, max_keys)?;
    }
    let filled = template
        .clone()
        .transform_up(|node| {
            let Some(slot) = node.downcast_ref::<BuildSlotExec>() else { return Ok(Transformed::no(node)) };
            let batches = compacted
                .get(slot.index)
                .ok_or_else(|| DataFusionError::Internal(format!("no broadcast build {}", slot.index)))?;
            let exec = MemorySourceConfig::try_new_exec(std::slice::from_ref(batches), node.schema(), None)?;
            Ok(Transformed::yes(exec as Arc<dyn ExecutionPlan>))
        })?
        .data;
    let encoded = encode(filled)?;
    reservation.try_resize(encoded.len())?;
    Ok(Prepared::Plan { encoded: Arc::new(encoded), rows, bytes, _reservation: reservation })
}

/// The batch with text views holding only their own strings (a view may point into a whole
/// block of a leaf, which Arrow IPC would send whole).
fn compact(batch: RecordBatch) -> Result<RecordBatch> {
    if !batch.columns().iter().any(|c| matches!(c.data_type(), DataType::Utf8View | DataType::BinaryView)) {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .map(|c| -> ArrayRef {
            match c.data_type() {
                DataType::Utf8View => Arc::new(c.as_string_view().gc()),
                DataType::BinaryView => Arc::new(c.as_binary_view().gc()),
                _ => c.clone(),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// The join's runtime filter from its build side's keys: `key IN (...)` for each key with at
/// most `max_keys` distinct values (what the scan of the probe side applies on the leaves),
/// then marked complete. A key with more values adds nothing: the join on the leaf drops
/// the rows without a match.
fn fill_filter(build: &Build, batches: &[RecordBatch], max_keys: usize) -> Result<()> {
    let Some(filter) = &build.filter else { return Ok(()) };
    let mut conjuncts: Vec<Arc<dyn PhysicalExpr>> = vec![];
    'keys: for (left, right) in build.on_left.iter().zip(&build.on_right) {
        let mut seen = HashSet::new();
        for batch in batches {
            let values = left.evaluate(batch)?.into_array(batch.num_rows())?;
            for i in 0..values.len() {
                if values.is_null(i) {
                    continue;
                }
                seen.insert(ScalarValue::try_from_array(&values, i)?);
                if seen.len() > max_keys {
                    continue 'keys;
                }
            }
        }
        if seen.is_empty() {
            continue;
        }
        let list = seen.into_iter().map(lit).collect();
        conjuncts.push(in_list(right.clone(), list, &false, &build.probe_schema)?);
    }
    if let Some(expr) = conjuncts.into_iter().reduce(|a, b| Arc::new(BinaryExpr::new(a, Operator::And, b))) {
        filter.update(expr)?;
    }
    filter.mark_complete();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::col;
    use datafusion::physical_plan::joins::utils::JoinOn;
    use datafusion::prelude::SessionContext;

    fn batch(keys: Vec<i64>) -> RecordBatch {
        let names: Vec<String> = keys.iter().map(|k| format!("n{k}")).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(keys)), Arc::new(StringArray::from(names))])
            .unwrap()
    }

    /// A join of `build` (k, name) with a probe side (fk, amount) of `probe` rows, in
    /// `CollectLeft` mode, as DataFusion plans a small build side.
    fn join(build: Vec<RecordBatch>, probe: RecordBatch) -> HashJoinExec {
        let schema = build.first().map(|b| b.schema()).unwrap_or_else(|| batch(vec![]).schema());
        let left = MemorySourceConfig::try_new_exec(&[build], schema.clone(), None).unwrap();
        let right = MemorySourceConfig::try_new_exec(&[vec![probe.clone()]], probe.schema(), None).unwrap();
        let on: JoinOn = vec![(col("k", &schema).unwrap(), col("fk", &probe.schema()).unwrap())];
        let join = HashJoinExec::try_new(
            left,
            right,
            on.clone(),
            None,
            &JoinType::Inner,
            None,
            PartitionMode::CollectLeft,
            NullEquality::NullEqualsNothing,
            false,
        )
        .unwrap();
        let filter = Arc::new(DynamicFilterPhysicalExpr::new(on.iter().map(|(_, r)| r.clone()).collect(), lit(true)));
        join.with_dynamic_filter_expr(filter).unwrap()
    }

    fn probe() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("fk", DataType::Int64, false),
            Field::new("amount", DataType::Int64, false),
        ]));
        let fk: Vec<i64> = (0..100).map(|v| v % 10).collect();
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(fk)), Arc::new(Int64Array::from_iter(0..100))])
            .unwrap()
    }

    #[tokio::test]
    async fn build_rows_fill_the_slot_and_the_runtime_filter() {
        let ctx = SessionContext::new().task_ctx();
        let probe = probe();
        let planned = join(vec![batch(vec![3, 7]), batch(vec![3])], probe.clone());
        let probe_exec = planned.right().clone();
        let (build, template) = broadcastable(&planned, probe_exec.clone(), 0).unwrap().expect("broadcastable");
        assert!(template.children()[0].is::<BuildSlotExec>());
        // The fragment as it reaches the leaf: the slot holds the rows; it joins them as the
        // planned join does.
        let mut sent = None;
        let prepared = prepare(&[build], &template, ctx.clone(), |plan| {
            sent = Some(plan);
            Ok(vec![1, 2, 3])
        })
        .await
        .unwrap();
        let Prepared::Plan { encoded, rows, .. } = prepared else { panic!("{prepared:?}") };
        assert_eq!((encoded.as_slice(), rows), (&[1u8, 2, 3][..], 3));
        // The runtime filter the probe side's scan reads: the distinct build keys.
        let produced = planned.dynamic_expressions_produced();
        let filter = produced[0].downcast_ref::<DynamicFilterPhysicalExpr>().unwrap().current().unwrap();
        let list = filter.downcast_ref::<datafusion::physical_expr::expressions::InListExpr>().expect("a key list");
        let mut keys: Vec<String> = list.list().iter().map(|e| e.to_string()).collect();
        keys.sort();
        assert_eq!(keys, vec!["3", "7"]);
        let sent = sent.expect("encoded");
        assert!(!sent.children()[0].is::<BuildSlotExec>());
        let count = |plan: Arc<dyn ExecutionPlan>| {
            let ctx = ctx.clone();
            async move {
                let batches = datafusion::physical_plan::collect(plan, ctx).await.unwrap();
                batches.iter().map(RecordBatch::num_rows).sum::<usize>()
            }
        };
        // Keys 3 (twice on the build side) and 7 match 10 probe rows each.
        assert_eq!(count(sent).await, 30);
        assert_eq!(count(planned.builder().build_exec().unwrap()).await, 30);
    }

    #[tokio::test]
    async fn an_empty_or_large_build_side_is_not_sent() {
        let ctx = SessionContext::new().task_ctx();
        let never = |_: Arc<dyn ExecutionPlan>| -> Result<Vec<u8>> { panic!("nothing to encode") };
        let empty = join(vec![], probe());
        let (build, template) = broadcastable(&empty, empty.right().clone(), 0).unwrap().unwrap();
        let prepared = prepare(&[build], &template, ctx.clone(), never).await.unwrap();
        assert!(matches!(prepared, Prepared::Empty), "{prepared:?}");

        let large = join(vec![batch((0..1000).collect())], probe());
        let (build, template) = broadcastable(&large, large.right().clone(), 0).unwrap().unwrap();
        let prepared = prepare_within(&[build], &template, ctx, never, 1024).await.unwrap();
        assert!(matches!(prepared, Prepared::TooLarge), "{prepared:?}");
    }

    #[test]
    fn only_small_inner_and_semi_joins_are_broadcast() {
        let planned = join(vec![batch(vec![1])], probe());
        for (join_type, yes) in [
            (JoinType::Inner, true),
            (JoinType::RightSemi, true),
            (JoinType::Left, false),
            (JoinType::RightAnti, false),
            (JoinType::LeftSemi, false),
        ] {
            let j = planned.builder().with_type(join_type).build().unwrap();
            assert_eq!(broadcastable(&j, j.right().clone(), 0).unwrap().is_some(), yes, "{join_type}");
        }
        let partitioned = planned.builder().with_partition_mode(PartitionMode::Partitioned).build().unwrap();
        assert!(broadcastable(&partitioned, partitioned.right().clone(), 0).unwrap().is_none());
    }
}
