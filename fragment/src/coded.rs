//! Partial aggregates grouped by text columns alone, run by a leaf over codes instead of
//! strings.
//!
//! A column-store block keeps its text columns' distinct values as a dictionary for filters
//! (`Block::text_dictionary`: up to 4096 values, a `u16` code per row). A partial aggregate on
//! a leaf grouped by such columns (TPC-H q1's `l_returnflag, l_linestatus`, q12's
//! `l_shipmode`) otherwise makes a string view per row and hashes and compares them
//! (`GroupValuesColumn`): a third of q1's CPU. Here the scan returns those columns as codes
//! (`ScanRequest::text_codes`, `Dictionary(UInt32, Utf8)`), each block's few values are mapped
//! to the group columns' values once, and a row finds its group by a table lookup on its
//! codes. The accumulators are DataFusion's own (`GroupsAccumulator`), fed group indices, and
//! the output is the partial aggregate's: the same schema, the same states, so the aggregator
//! cannot tell. Only on the leaf, after the fragment is decoded ([`coded_aggregates`]).

use std::fmt;
use std::sync::Arc;

use arrow::array::BooleanArray;
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Schema, SchemaRef, UInt32Type};
use basalt_common::api::SELECTED_COLUMN;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::projection::ProjectionExpr;
use datafusion::physical_expr::utils::collect_columns;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{
    Boundedness, ChildrenPropertiesMode, EmissionType, PlanProperties, ReplaceChildrenOptions,
};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, InputOrderMode, Partitioning,
};
use futures::{StreamExt, TryStreamExt};

use crate::LeafScanExec;
use crate::few::{FEW_GROUPS, Few, Kind, NO_GROUP};

/// foldhash: strings and code tuples are hashed per row on the fallback path.
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// Rows per output batch.
const OUTPUT_BATCH_ROWS: usize = 8192;

/// Groups held before they are sent on and the aggregate starts afresh (a text column of many
/// distinct values, each row its own code: DataFusion's partial aggregate would likewise emit
/// early or pass rows through).
const EARLY_EMIT_GROUPS: usize = 1 << 20;

/// Rows read before choosing how to aggregate: codes when the group columns' blocks have
/// dictionaries (their values, summed over the batches, are under half the rows), else the
/// partial aggregate as planned over the same rows as text (a column of many values: each row
/// its own code would cost a string hash and copy per row where DataFusion's grouping hashes
/// views in vectors; TPC-H `GROUP BY o_comment` 2.4 s planned, 8.0 s over codes).
const DECIDE_ROWS: usize = 1 << 16;

/// A row's local group when the scan did not select it (see [`CodedAggregateExec::selection`]).
const NOT_SELECTED: u32 = u32::MAX - 1;

/// Above this many combinations of one batch's codes, rows find their group by hashing their
/// value ids instead of a table indexed by the codes.
const DENSE_TABLE_MAX: usize = 1 << 16;

/// Every partial aggregate in `plan` (a fragment decoded on its leaf) that groups by text
/// columns of the leaf's scan alone, through projections and filters that pass them on
/// untouched, becomes a [`CodedAggregateExec`] over a scan returning those columns as codes.
/// Left as planned otherwise: grouping sets, other group keys, DISTINCT or ordered
/// aggregates, an accumulator without a grouped form, an aggregate streaming over its input's
/// order (few groups held at once already), or a group column read by anything else.
pub fn coded_aggregates(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    Ok(plan
        .transform_up(|node| {
            let Some(aggregate) = node.downcast_ref::<AggregateExec>() else { return Ok(Transformed::no(node)) };
            match coded(aggregate)? {
                Some(coded) => Ok(Transformed::yes(Arc::new(coded) as Arc<dyn ExecutionPlan>)),
                None => Ok(Transformed::no(node)),
            }
        })?
        .data)
}

fn coded(aggregate: &AggregateExec) -> Result<Option<CodedAggregateExec>> {
    let group = aggregate.group_expr();
    if *aggregate.mode() != AggregateMode::Partial
        || !group.is_single()
        || group.expr().is_empty()
        || aggregate.limit_options().is_some()
        || !aggregate.dynamic_expressions_produced().is_empty()
        || *aggregate.input_order_mode() != InputOrderMode::Linear
    {
        return Ok(None);
    }
    let aggregates = aggregate.aggr_expr();
    if aggregates.iter().any(|a| a.is_distinct() || !a.order_bys().is_empty() || !a.groups_accumulator_supported()) {
        return Ok(None);
    }
    let mut keys = Vec::with_capacity(group.expr().len());
    for (expr, _) in group.expr() {
        let Some(column) = expr.downcast_ref::<Column>() else { return Ok(None) };
        keys.push(column.index());
    }
    // The aggregates' arguments and filters must not read a group column: they would see codes.
    let mut read = Vec::new();
    for a in aggregates {
        a.expressions().iter().for_each(|e| read.extend(collect_columns(e).into_iter().map(|c| c.index())));
    }
    for f in aggregate.filter_expr().iter().flatten() {
        read.extend(collect_columns(f).into_iter().map(|c| c.index()));
    }
    if read.iter().any(|i| keys.contains(i)) {
        return Ok(None);
    }
    // Down to the scan: which of its columns the keys are, and the operators in between.
    let mut chain: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
    let mut node = aggregate.input().clone();
    let mut tracked = keys.clone();
    let scan = loop {
        if node.is::<LeafScanExec>() {
            break node.clone();
        }
        let next = if let Some(projection) = node.downcast_ref::<ProjectionExec>() {
            let exprs = projection.expr();
            let mut below = Vec::with_capacity(tracked.len());
            for &i in &tracked {
                let Some(column) = exprs.get(i).and_then(|e| e.expr.downcast_ref::<Column>()) else { return Ok(None) };
                below.push(column.index());
            }
            let others_read = exprs
                .iter()
                .enumerate()
                .filter(|(i, _)| !tracked.contains(i))
                .flat_map(|(_, e)| collect_columns(&e.expr))
                .any(|c| below.contains(&c.index()));
            if others_read {
                return Ok(None);
            }
            tracked = below;
            projection.input().clone()
        } else if let Some(filter) = node.downcast_ref::<FilterExec>() {
            if let Some(projection) = filter.projection().as_deref() {
                let mut below = Vec::with_capacity(tracked.len());
                for &i in &tracked {
                    let Some(&j) = projection.get(i) else { return Ok(None) };
                    below.push(j);
                }
                tracked = below;
            }
            if collect_columns(filter.predicate()).iter().any(|c| tracked.contains(&c.index())) {
                return Ok(None);
            }
            filter.input().clone()
        } else if node.name() == "CoalesceBatchesExec" || node.name() == "CooperativeExec" {
            let [child] = node.children()[..] else { return Ok(None) };
            child.clone()
        } else {
            return Ok(None);
        };
        chain.push(node.clone());
        node = next;
    };
    let Some(scan) = scan.downcast_ref::<LeafScanExec>() else { return Ok(None) };
    let output = scan.schema();
    let mut names = Vec::with_capacity(tracked.len());
    for &i in &tracked {
        let Some(field) = output.fields().get(i) else { return Ok(None) };
        if !matches!(field.data_type(), DataType::Utf8View | DataType::Utf8) {
            return Ok(None);
        }
        names.push(field.name().clone());
    }
    let Some(scan) = scan.with_text_codes(&names) else { return Ok(None) };
    // Blocks keeping most rows come whole with their selection, when every aggregate is added
    // a group at a time and everything computed over the rows is total (see `marked`).
    let (scan, marked) = match marked(aggregate, &chain).then(|| scan.with_selection()).flatten() {
        Some(scan) => (scan, true),
        None => (scan, false),
    };
    let mut input: Arc<dyn ExecutionPlan> = Arc::new(scan);
    for node in chain.into_iter().rev() {
        input = match node.downcast_ref::<ProjectionExec>() {
            // (Its `replace_children` keeps the output schema it was planned with.)
            Some(projection) => {
                let mut exprs = projection.expr().to_vec();
                if marked {
                    let at = input.schema().index_of(SELECTED_COLUMN)?;
                    let selected: Arc<dyn PhysicalExpr> = Arc::new(Column::new(SELECTED_COLUMN, at));
                    exprs.push(ProjectionExpr { expr: selected, alias: SELECTED_COLUMN.to_string() });
                }
                Arc::new(ProjectionExec::try_new(exprs, input)?)
            }
            None => {
                node.replace_children(vec![input], ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))?
            }
        };
    }
    for &k in &keys {
        if !matches!(input.schema().field(k).data_type(), DataType::Dictionary(..)) {
            tracing::debug!(column = k, "a group column did not reach the aggregate as codes");
            return Ok(None);
        }
    }
    let selection = if marked { Some(input.schema().index_of(SELECTED_COLUMN)?) } else { None };
    let mut exec = CodedAggregateExec::new(aggregate, input, keys);
    exec.selection = selection;
    Ok(Some(exec))
}

/// Whether the scan under `aggregate` may send blocks whole with their selection
/// ([`SELECTED_COLUMN`]): every aggregate is one [`Kind`] adds a group at a time (unselected
/// rows in no group) without a filter of its own, and the operators in between are
/// projections whose expressions, like the aggregates' arguments, cannot fail on the rows the
/// filters would have dropped (columns, literals and float arithmetic: an integer overflow or
/// a cast of text there would be an error the query should not see).
fn marked(aggregate: &AggregateExec, chain: &[Arc<dyn ExecutionPlan>]) -> bool {
    let aggregates = aggregate.aggr_expr();
    if aggregates.iter().any(|a| Kind::of(a).is_none()) || aggregate.filter_expr().iter().any(Option::is_some) {
        return false;
    }
    let input = aggregate.input().schema();
    if !aggregates.iter().flat_map(|a| a.expressions()).all(|e| total(&e, &input)) {
        return false;
    }
    chain.iter().all(|node| match node.downcast_ref::<ProjectionExec>() {
        Some(projection) => {
            let below = projection.input().schema();
            projection.expr().iter().all(|p| total(&p.expr, &below))
        }
        None => node.name() == "CoalesceBatchesExec" || node.name() == "CooperativeExec",
    })
}

/// Whether `expr` is computed without error on any row: columns, literals, and `+ - * /` of
/// floats (a float division by zero is infinite, not an error).
fn total(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> bool {
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, Literal};
    if expr.downcast_ref::<Column>().is_some() || expr.downcast_ref::<Literal>().is_some() {
        return true;
    }
    expr.downcast_ref::<BinaryExpr>().is_some_and(|b| {
        matches!(b.op(), Operator::Plus | Operator::Minus | Operator::Multiply | Operator::Divide)
            && b.data_type(schema).is_ok_and(|t| t == DataType::Float64)
            && total(b.left(), schema)
            && total(b.right(), schema)
    })
}

/// A partial aggregate grouped by text columns that arrive as codes (see the module).
#[derive(Debug)]
pub struct CodedAggregateExec {
    input: Arc<dyn ExecutionPlan>,
    /// The group columns: indexes into the input, names as shown.
    keys: Vec<(usize, String)>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    /// The partial aggregate's output schema.
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
    /// Groups held before they are sent on ([`EARLY_EMIT_GROUPS`]).
    early_emit: usize,
    /// Rows read before choosing ([`DECIDE_ROWS`]).
    decide_rows: usize,
    /// The partial aggregate as planned: it runs instead when the first rows show many
    /// values (see [`DECIDE_ROWS`]).
    original: Arc<dyn ExecutionPlan>,
    /// The input's [`SELECTED_COLUMN`], when its scan marks which rows its filters select
    /// instead of dropping the others (see [`marked`]).
    selection: Option<usize>,
}

impl CodedAggregateExec {
    fn new(aggregate: &AggregateExec, input: Arc<dyn ExecutionPlan>, keys: Vec<usize>) -> Self {
        let schema = aggregate.schema();
        let names = aggregate.group_expr().expr().iter().map(|(_, name)| name.clone());
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            input,
            keys: keys.into_iter().zip(names).collect(),
            aggregates: aggregate.aggr_expr().to_vec(),
            filters: aggregate.filter_expr().to_vec(),
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
            early_emit: EARLY_EMIT_GROUPS,
            decide_rows: DECIDE_ROWS,
            original: Arc::new(aggregate.clone()),
            selection: None,
        }
    }
}

impl DisplayAs for CodedAggregateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let keys: Vec<&str> = self.keys.iter().map(|(_, n)| n.as_str()).collect();
        let aggregates: Vec<&str> = self.aggregates.iter().map(|a| a.name()).collect();
        write!(f, "CodedAggregateExec: gby=[{}], aggr=[{}]", keys.join(", "), aggregates.join(", "))?;
        if self.selection.is_some() {
            write!(f, ", rows=marked")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for CodedAggregateExec {
    fn name(&self) -> &'static str {
        "CodedAggregateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[Arc<dyn ExecutionPlan>; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Internal("CodedAggregateExec takes one input".into()))?;
        Ok(Arc::new(Self {
            input,
            keys: self.keys.clone(),
            aggregates: self.aggregates.clone(),
            filters: self.filters.clone(),
            schema: self.schema.clone(),
            properties: self.properties.clone(),
            metrics: ExecutionPlanMetricsSet::new(),
            early_emit: self.early_emit,
            decide_rows: self.decide_rows,
            original: self.original.clone(),
            selection: self.selection,
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let mut input = self.input.execute(partition, context.clone())?;
        let spec = Arc::new(Spec {
            keys: self.keys.iter().map(|(i, _)| *i).collect(),
            aggregates: self.aggregates.clone(),
            filters: self.filters.clone(),
            schema: self.schema.clone(),
            early_emit: self.early_emit,
            few_group_batches: MetricBuilder::new(&self.metrics).counter("few_group_batches", partition),
            selection: self.selection,
        });
        let reservation =
            MemoryConsumer::new(format!("CodedAggregateExec[{partition}]")).register(context.memory_pool());
        let groups_made = MetricBuilder::new(&self.metrics).counter("groups", partition);
        let planned = MetricBuilder::new(&self.metrics).counter("ran_as_planned", partition);
        let (original, decide_rows) = (self.original.clone(), self.decide_rows);
        let chosen = async move {
            let mut first = Vec::new();
            let (mut rows, mut values) = (0usize, vec![0usize; spec.keys.len()]);
            while rows < decide_rows {
                let Some(batch) = input.next().await else { break };
                let batch = batch?;
                rows += batch.num_rows();
                for (seen, &k) in values.iter_mut().zip(&spec.keys) {
                    *seen += batch.column(k).as_any_dictionary_opt().map_or(batch.num_rows(), |d| d.values().len());
                }
                first.push(batch);
            }
            if values.iter().any(|v| 2 * v > rows.max(1)) {
                planned.add(1);
                return as_planned(original, first, input, &spec.keys, spec.selection, context);
            }
            let mut groups = Groups::new(&spec)?;
            for batch in &first {
                groups.update(batch)?;
            }
            reservation.try_resize(groups.size())?;
            Ok(coded_stream(spec, input, groups, reservation, groups_made))
        };
        let stream = futures::stream::once(chosen).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream)))
    }
}

/// The partial aggregate as planned, over `first` and then the rest of `input`, their group
/// columns as text again.
fn as_planned(
    original: Arc<dyn ExecutionPlan>,
    first: Vec<RecordBatch>,
    input: SendableRecordBatchStream,
    keys: &[usize],
    selection: Option<usize>,
    context: Arc<TaskContext>,
) -> Result<SendableRecordBatchStream> {
    let Some(text_schema) = original.children().first().map(|c| c.schema()) else {
        return Err(DataFusionError::Internal("a partial aggregate without its input".into()));
    };
    let (keys, schema) = (keys.to_vec(), text_schema.clone());
    let as_text = move |batch: Result<RecordBatch>| -> Result<RecordBatch> {
        let batch = match selection {
            // The rows selected, without the selection.
            Some(s) => {
                let batch = batch?;
                let selected = batch.column(s).as_boolean_opt().cloned().ok_or_else(not_boolean)?;
                let mut batch = arrow::compute::filter_record_batch(&batch, &selected)?;
                batch.remove_column(s);
                batch
            }
            None => batch?,
        };
        let mut columns = batch.columns().to_vec();
        for &k in &keys {
            columns[k] = arrow::compute::cast(&columns[k], schema.field(k).data_type())?;
        }
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    };
    let rows = futures::stream::iter(first.into_iter().map(Ok)).chain(input).map(as_text);
    let replay = Arc::new(Replay::new(Box::pin(RecordBatchStreamAdapter::new(text_schema, rows))));
    let plan =
        original.replace_children(vec![replay], ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))?;
    plan.execute(0, context)
}

/// The coded aggregate's output: groups until the input ends, or (a partial aggregate may
/// emit a group more than once: the final aggregate merges them) until there are
/// `early_emit` of them.
fn coded_stream(
    spec: Arc<Spec>,
    input: SendableRecordBatchStream,
    groups: Groups,
    reservation: datafusion::execution::memory_pool::MemoryReservation,
    groups_made: datafusion::physical_plan::metrics::Count,
) -> SendableRecordBatchStream {
    let schema = spec.schema.clone();
    let stream = futures::stream::unfold(Some((input, groups, reservation)), move |state| {
        let (spec, groups_made) = (spec.clone(), groups_made.clone());
        async move {
            let (mut input, mut groups, reservation) = state?;
            let step = async {
                while let Some(batch) = input.next().await {
                    groups.update(&batch?)?;
                    reservation.try_resize(groups.size())?;
                    if groups.len() >= spec.early_emit {
                        return Ok(false);
                    }
                }
                Ok::<_, DataFusionError>(true)
            };
            match step.await {
                Ok(ended) => {
                    groups_made.add(groups.len());
                    // Emitted early: the next groups start afresh.
                    let fresh = match (!ended).then(|| Groups::new(&spec)).transpose() {
                        Ok(fresh) => fresh,
                        Err(e) => return Some((Err(e), None)),
                    };
                    let out = groups.emit(&spec.schema);
                    reservation.free();
                    Some((out, fresh.map(|groups| (input, groups, reservation))))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    })
    .map(|r| match r {
        Ok(batches) => futures::stream::iter(batches.into_iter().map(Ok)).boxed(),
        Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
    })
    .flatten();
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}

/// A stream already started, as a plan's one partition (the rows a coded aggregate read
/// before it chose to run the partial aggregate as planned).
struct Replay {
    stream: std::sync::Mutex<Option<SendableRecordBatchStream>>,
    properties: Arc<PlanProperties>,
}

impl Replay {
    fn new(stream: SendableRecordBatchStream) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(stream.schema()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self { stream: std::sync::Mutex::new(Some(stream)), properties }
    }
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Replay")
    }
}

impl DisplayAs for Replay {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("Replay")
    }
}

impl ExecutionPlan for Replay {
    fn name(&self) -> &'static str {
        "Replay"
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

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() { Ok(self) } else { Err(DataFusionError::Internal("Replay has no inputs".into())) }
    }

    fn execute(&self, _partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let taken = self.stream.lock().map_err(|_| DataFusionError::Internal("a replay's lock".into()))?.take();
        taken.ok_or_else(|| DataFusionError::Internal("a replay runs once".into()))
    }
}

/// What a [`CodedAggregateExec`]'s stream needs to make groups afresh.
struct Spec {
    keys: Vec<usize>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    schema: SchemaRef,
    early_emit: usize,
    /// Batches whose aggregates were added a group at a time ([`crate::few`]).
    few_group_batches: datafusion::physical_plan::metrics::Count,
    /// The input's selection column (see [`CodedAggregateExec::selection`]).
    selection: Option<usize>,
}

/// The distinct values a group column has seen, each with an id.
#[derive(Default)]
struct Values {
    ids: HashMap<String, u32>,
    values: Vec<Option<String>>,
    null: Option<u32>,
    bytes: usize,
}

impl Values {
    fn id(&mut self, value: Option<&str>) -> u32 {
        let next = self.values.len() as u32;
        match value {
            None => *self.null.get_or_insert_with(|| {
                self.values.push(None);
                next
            }),
            Some(v) => {
                if let Some(id) = self.ids.get(v) {
                    return *id;
                }
                self.ids.insert(v.to_string(), next);
                self.values.push(Some(v.to_string()));
                self.bytes += 2 * v.len() + 64;
                next
            }
        }
    }
}

/// The groups found so far and their accumulators.
struct Groups {
    keys: Vec<usize>,
    values: Vec<Values>,
    /// Value ids of a group's columns -> the group's index.
    index: HashMap<Box<[u32]>, u32>,
    /// Per group column, each group's value id.
    members: Vec<Vec<u32>>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    arguments: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    /// Per aggregate, its kind when a batch of few groups can be added a group at a time
    /// ([`crate::few`]).
    kinds: Vec<Option<Kind>>,
    few_group_batches: datafusion::physical_plan::metrics::Count,
    selection: Option<usize>,
    indices: Vec<usize>,
}

impl Groups {
    fn new(spec: &Spec) -> Result<Self> {
        Ok(Self {
            keys: spec.keys.clone(),
            values: spec.keys.iter().map(|_| Values::default()).collect(),
            index: HashMap::new(),
            members: spec.keys.iter().map(|_| Vec::new()).collect(),
            accumulators: spec.aggregates.iter().map(|a| a.create_groups_accumulator()).collect::<Result<_>>()?,
            arguments: spec.aggregates.iter().map(|a| a.expressions()).collect(),
            filters: spec.filters.clone(),
            kinds: spec
                .aggregates
                .iter()
                .zip(&spec.filters)
                .map(|(a, f)| f.is_none().then(|| Kind::of(a)).flatten())
                .collect(),
            few_group_batches: spec.few_group_batches.clone(),
            selection: spec.selection,
            indices: Vec::new(),
        })
    }

    fn len(&self) -> usize {
        self.members.first().map_or(0, Vec::len)
    }

    /// Memory held: the values, the index, the members and the accumulators' states.
    fn size(&self) -> usize {
        let values: usize = self.values.iter().map(|v| v.bytes).sum();
        let index = self.index.capacity() * (self.keys.len() * 4 + 32);
        let members = self.members.iter().map(|m| m.capacity() * 4).sum::<usize>();
        values + index + members + self.accumulators.iter().map(|a| a.size()).sum::<usize>()
    }

    /// The group of value ids `ids`, made when new.
    fn group(&mut self, ids: &[u32]) -> u32 {
        if let Some(g) = self.index.get(ids) {
            return *g;
        }
        let g = self.len() as u32;
        self.index.insert(ids.into(), g);
        for (members, id) in self.members.iter_mut().zip(ids) {
            members.push(*id);
        }
        g
    }

    fn update(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        // The rows the scan's filters selected, unless all were.
        let selected: Option<BooleanArray> = match self.selection {
            Some(s) => {
                let marks = batch.column(s).as_boolean_opt().ok_or_else(not_boolean)?;
                match marks.true_count() {
                    0 => return Ok(()),
                    n if n == rows => None,
                    _ => Some(marks.clone()),
                }
            }
            None => None,
        };
        // Per group column: the batch's codes, and each code's value id (the last slot: a null
        // code).
        let mut codes: Vec<&UInt32Array> = Vec::with_capacity(self.keys.len());
        let mut to_id: Vec<Vec<u32>> = Vec::with_capacity(self.keys.len());
        for (c, &k) in self.keys.iter().enumerate() {
            let column = batch.column(k);
            let dictionary = column
                .as_dictionary_opt::<UInt32Type>()
                .ok_or_else(|| DataFusionError::Internal(format!("a coded group column is {}", column.data_type())))?;
            let values = text_of(dictionary.values())?;
            let values = values.as_string::<i32>();
            let mut ids: Vec<u32> =
                (0..values.len()).map(|i| self.values[c].id(values.is_valid(i).then(|| values.value(i)))).collect();
            ids.push(self.values[c].id(None));
            codes.push(dictionary.keys());
            to_id.push(ids);
        }
        // A row's slot in each column: its code, or the null slot.
        let slot = |c: usize, row: usize| -> usize {
            let keys = codes[c];
            if keys.is_null(row) { to_id[c].len() - 1 } else { keys.value(row) as usize }
        };
        let mut indices = std::mem::take(&mut self.indices);
        indices.clear();
        indices.reserve(rows);
        let combinations = to_id.iter().try_fold(1usize, |n, ids| n.checked_mul(ids.len()));
        let mut ids = vec![0u32; self.keys.len()];
        // With few groups in the batch: each row's local group (`u8`) and the local groups'
        // indices.
        let mut few: Option<Few> = None;
        let dense = combinations.filter(|n| *n <= DENSE_TABLE_MAX.min(2 * rows.max(1024)));
        if let (Some(marks), None) = (&selected, dense) {
            return self.update(&arrow::compute::filter_record_batch(batch, marks)?);
        }
        match dense {
            // Not larger than the batch needs (the table is filled anew per batch).
            Some(n) => {
                // Each row's codes' combination, a column at a time (a pass the compiler
                // vectorizes), then a table from combinations to groups, filled as rows meet it.
                let mut places = vec![0usize; rows];
                for (c, column) in to_id.iter().enumerate() {
                    let (keys, size, null_slot) = (codes[c], column.len(), column.len() - 1);
                    let pairs = places.iter_mut().zip(keys.values().iter());
                    match keys.nulls().filter(|nulls| nulls.null_count() > 0) {
                        None => pairs.for_each(|(at, code)| *at = *at * size + *code as usize),
                        Some(nulls) => pairs.enumerate().for_each(|(row, (at, code))| {
                            *at = *at * size + if nulls.is_null(row) { null_slot } else { *code as usize }
                        }),
                    }
                }
                // Each row's local group: the rank of its combination among those the batch
                // met, and the row that met each first.
                // Rows not selected go to one more slot, never a group's (few and far between:
                // their bits are visited, not each row's).
                let mut table = vec![u32::MAX; n + 1];
                table[n] = NOT_SELECTED;
                if let Some(marks) = &selected {
                    for row in (!marks.values()).set_indices() {
                        places[row] = n;
                    }
                }
                let mut first_rows: Vec<usize> = Vec::new();
                let mut local: Vec<u32> = Vec::with_capacity(rows);
                for (row, &at) in places.iter().enumerate() {
                    let l = match table[at] {
                        u32::MAX => {
                            let l = first_rows.len() as u32;
                            table[at] = l;
                            first_rows.push(row);
                            l
                        }
                        l => l,
                    };
                    local.push(l);
                }
                // The local groups' groups, made in the order rows met them.
                let mut groups: Vec<usize> = Vec::with_capacity(first_rows.len());
                for &row in &first_rows {
                    for (c, id) in ids.iter_mut().enumerate() {
                        *id = to_id[c][slot(c, row)];
                    }
                    groups.push(self.group(&ids) as usize);
                }
                if groups.len() <= FEW_GROUPS && self.kinds.iter().any(Option::is_some) {
                    // (Rows not selected: in no group.)
                    few = Few::new(local.iter().map(|l| (*l).min(NO_GROUP as u32) as u8).collect(), groups.clone());
                    self.few_group_batches.add(1);
                }
                // Row by row indices, only if some aggregate adds row by row (never with rows
                // not selected: those batches are filtered first, below).
                if selected.is_none() && (few.is_none() || self.kinds.iter().any(Option::is_none)) {
                    indices.extend(local.iter().map(|l| groups[*l as usize]));
                }
            }
            None => {
                for row in 0..rows {
                    for (c, id) in ids.iter_mut().enumerate() {
                        *id = to_id[c][slot(c, row)];
                    }
                    indices.push(self.group(&ids) as usize);
                }
            }
        }
        let total = self.len();
        if let Some(marks) = &selected {
            // Every aggregate a group at a time, or the selected rows row by row.
            let states = match few.as_mut() {
                Some(few) => self.states_of(batch, few)?,
                None => None,
            };
            let (Some(states), Some(few)) = (states, &few) else {
                return self.update(&arrow::compute::filter_record_batch(batch, marks)?);
            };
            for (accumulator, states) in self.accumulators.iter_mut().zip(states) {
                accumulator.merge_batch(&states, few.groups(), total)?;
            }
            return Ok(());
        }
        let aggregates = self.accumulators.iter_mut().zip(&self.arguments).zip(&self.filters).zip(&self.kinds);
        for (((accumulator, arguments), filter), kind) in aggregates {
            let values = arguments
                .iter()
                .map(|e| e.evaluate(batch).and_then(|v| v.into_array(rows)))
                .collect::<Result<Vec<_>>>()?;
            if let (Some(kind), Some(few), [argument]) = (kind, &mut few, &values[..])
                && let Some(states) = kind.states(argument, few)
            {
                accumulator.merge_batch(&states, few.groups(), total)?;
                continue;
            }
            if indices.len() != rows
                && let Some(few) = &few
            {
                // An argument of another type than its kind's (states above were None).
                indices.clear();
                indices.extend(few.locals().iter().map(|l| few.groups()[*l as usize]));
            }
            let filter = match filter {
                Some(f) => {
                    let kept = f.evaluate(batch)?.into_array(rows)?;
                    Some(
                        kept.as_boolean_opt()
                            .cloned()
                            .ok_or_else(|| DataFusionError::Internal("an aggregate's filter is not boolean".into()))?,
                    )
                }
                None => None,
            };
            accumulator.update_batch(&values, &indices, filter.as_ref(), total)?;
        }
        self.indices = indices;
        Ok(())
    }

    /// Every aggregate's partial states over `few`'s groups, or None if one cannot be added
    /// a group at a time.
    fn states_of(&self, batch: &RecordBatch, few: &mut Few) -> Result<Option<Vec<Vec<ArrayRef>>>> {
        let mut all = Vec::with_capacity(self.accumulators.len());
        for ((arguments, filter), kind) in self.arguments.iter().zip(&self.filters).zip(&self.kinds) {
            let (Some(kind), None, [argument]) = (kind, filter, &arguments[..]) else { return Ok(None) };
            let values = argument.evaluate(batch)?.into_array(batch.num_rows())?;
            match kind.states(&values, few) {
                Some(states) => all.push(states),
                None => return Ok(None),
            }
        }
        Ok(Some(all))
    }

    /// The groups and their states, as the partial aggregate's output batches.
    fn emit(mut self, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
        if self.len() == 0 {
            return Ok(vec![]);
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for (c, members) in self.members.iter().enumerate() {
            let values = &self.values[c].values;
            let text: StringArray = members.iter().map(|id| values[*id as usize].as_deref()).collect();
            let text: ArrayRef = Arc::new(text);
            let target = schema.field(c).data_type();
            columns.push(if text.data_type() == target { text } else { arrow::compute::cast(&text, target)? });
        }
        for accumulator in &mut self.accumulators {
            columns.extend(accumulator.state(EmitTo::All)?);
        }
        let all = RecordBatch::try_new(schema.clone(), columns)?;
        Ok((0..all.num_rows())
            .step_by(OUTPUT_BATCH_ROWS)
            .map(|start| all.slice(start, OUTPUT_BATCH_ROWS.min(all.num_rows() - start)))
            .collect())
    }
}

fn not_boolean() -> DataFusionError {
    DataFusionError::Internal("a coded aggregate's selection column is not boolean".into())
}

/// A dictionary's values as `Utf8`.
fn text_of(values: &ArrayRef) -> Result<ArrayRef> {
    Ok(match values.data_type() {
        DataType::Utf8 => values.clone(),
        _ => arrow::compute::cast(values, &DataType::Utf8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NoLeaf, ScanSpec};
    use arrow::array::{DictionaryArray, Int64Array, StringViewArray};
    use arrow::datatypes::{Field, Schema};
    use basalt_common::schema::ColumnType;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::functions_aggregate::{count::count_udaf, sum::sum_udaf};
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_plan::aggregates::PhysicalGroupBy;
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::SessionContext;

    /// `udaf(of)` over rows of `schema`, named `alias`.
    fn aggregate_of(
        udaf: Arc<datafusion::logical_expr::AggregateUDF>,
        schema: &SchemaRef,
        of: Arc<dyn PhysicalExpr>,
        alias: &str,
    ) -> Arc<AggregateFunctionExpr> {
        Arc::new(AggregateExprBuilder::new(udaf, vec![of]).schema(schema.clone()).alias(alias).build().unwrap())
    }

    /// Batches' rows as printed, sorted (with the table's closing line).
    fn printed_rows(batches: Vec<RecordBatch>) -> Vec<String> {
        let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&[all]).unwrap().to_string();
        let mut lines: Vec<String> = text.lines().skip(3).map(str::to_string).collect();
        lines.sort();
        lines
    }

    fn scan(on_leaf: bool) -> Arc<dyn ExecutionPlan> {
        let columns =
            vec![("flag".into(), ColumnType::Utf8), ("n".into(), ColumnType::Int64), ("q".into(), ColumnType::Int64)];
        let spec = ScanSpec::for_test(&columns, None);
        let scan = LeafScanExec::new("c".into(), 7, vec![0], Arc::new(NoLeaf), columns, spec);
        Arc::new(if on_leaf { scan.with_text_views() } else { scan })
    }

    /// A partial aggregate over `input` grouped by `group`, with `sum(of)` and `count(*)`
    /// (`count(of)` with `counting`).
    fn partial(input: Arc<dyn ExecutionPlan>, group: &[&str], of: &str, counting: &str) -> Arc<dyn ExecutionPlan> {
        let schema = input.schema();
        let column = |name: &str| Arc::new(Column::new_with_schema(name, &schema).unwrap()) as Arc<dyn PhysicalExpr>;
        let group = PhysicalGroupBy::new_single(group.iter().map(|g| (column(g), g.to_string())).collect());
        let sum = AggregateExprBuilder::new(sum_udaf(), vec![column(of)]).schema(schema.clone()).alias("s");
        let count = AggregateExprBuilder::new(count_udaf(), vec![column(counting)]).schema(schema.clone()).alias("c");
        let aggregates = vec![Arc::new(sum.build().unwrap()), Arc::new(count.build().unwrap())];
        let filter = Arc::new(Column::new_with_schema("n", &schema).unwrap()) as Arc<dyn PhysicalExpr>;
        let over_one = Arc::new(datafusion::physical_expr::expressions::BinaryExpr::new(
            filter,
            datafusion::logical_expr::Operator::Gt,
            Arc::new(datafusion::physical_expr::expressions::Literal::new(1i64.into())),
        ));
        Arc::new(
            AggregateExec::try_new(
                AggregateMode::Partial,
                group,
                aggregates,
                vec![None, Some(over_one)],
                input,
                schema,
            )
            .unwrap(),
        )
    }

    #[test]
    fn only_leaf_aggregates_grouped_by_text_alone_group_codes() {
        let planned = partial(scan(true), &["flag"], "q", "q");
        let rewritten = coded_aggregates(planned.clone()).unwrap();
        let coded = rewritten.downcast_ref::<CodedAggregateExec>().expect("a coded aggregate");
        assert_eq!(coded.schema(), planned.schema(), "the partial aggregate's output");
        let codes = coded.input.schema().field(0).data_type().clone();
        assert_eq!(codes, DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8)));
        // Through a projection that passes the column on (TPC-H q1 computes a common
        // subexpression below its aggregate).
        let leaf_scan = scan(true);
        let schema = leaf_scan.schema();
        let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = ["q", "flag", "n"]
            .iter()
            .map(|c| (Arc::new(Column::new_with_schema(c, &schema).unwrap()) as Arc<dyn PhysicalExpr>, c.to_string()))
            .collect();
        let projected = Arc::new(ProjectionExec::try_new(exprs, leaf_scan).unwrap());
        let planned = partial(projected, &["flag"], "q", "q");
        let rewritten = coded_aggregates(planned.clone()).unwrap();
        let coded = rewritten.downcast_ref::<CodedAggregateExec>().expect("a coded aggregate over the projection");
        assert_eq!(coded.schema(), planned.schema());
        assert!(matches!(coded.input.schema().field(1).data_type(), DataType::Dictionary(..)));
        assert!(coded.selection.is_none(), "a scan without filters keeps every row");
        // A filtered scan marks its selection when every aggregate is added a group at a time
        // (sum and count) and what is computed is total; a filtered count (`partial` filters
        // its count) or integer arithmetic keeps the scan filtering.
        let filtered = |filters: bool| {
            let columns = vec![
                ("flag".into(), ColumnType::Utf8),
                ("n".into(), ColumnType::Int64),
                ("q".into(), ColumnType::Float64),
            ];
            let mut spec = ScanSpec::for_test(&columns, None);
            if filters {
                spec.filters = vec![basalt_common::filter::Filter::Cmp {
                    path: "n".into(),
                    op: basalt_common::filter::CmpOp::Gt,
                    value: basalt_common::filter::Scalar::Int(0),
                }];
            }
            Arc::new(LeafScanExec::new("c".into(), 7, vec![0], Arc::new(NoLeaf), columns, spec).with_text_views())
                as Arc<dyn ExecutionPlan>
        };
        let schema = filtered(true).schema();
        let col = |name: &str| Arc::new(Column::new_with_schema(name, &schema).unwrap()) as Arc<dyn PhysicalExpr>;
        let plan_with = |input: Arc<dyn ExecutionPlan>, of: Arc<dyn PhysicalExpr>| {
            let schema = input.schema();
            let group = PhysicalGroupBy::new_single(vec![(col("flag"), "flag".to_string())]);
            let sum =
                AggregateExprBuilder::new(sum_udaf(), vec![of]).schema(schema.clone()).alias("s").build().unwrap();
            Arc::new(
                AggregateExec::try_new(AggregateMode::Partial, group, vec![Arc::new(sum)], vec![None], input, schema)
                    .unwrap(),
            ) as Arc<dyn ExecutionPlan>
        };
        let times = |l: Arc<dyn PhysicalExpr>, r: Arc<dyn PhysicalExpr>| {
            Arc::new(datafusion::physical_expr::expressions::BinaryExpr::new(
                l,
                datafusion::logical_expr::Operator::Multiply,
                r,
            )) as Arc<dyn PhysicalExpr>
        };
        for (plan, marks) in [
            (plan_with(filtered(true), col("q")), true),
            (plan_with(filtered(true), times(col("q"), col("q"))), true),
            (plan_with(filtered(true), times(col("n"), col("n"))), false),
            (plan_with(filtered(false), col("q")), false),
            (partial(filtered(true), &["flag"], "q", "q"), false),
        ] {
            let rewritten = coded_aggregates(plan.clone()).unwrap();
            let coded = rewritten.downcast_ref::<CodedAggregateExec>().expect("a coded aggregate");
            assert_eq!(coded.schema(), plan.schema());
            assert_eq!(coded.selection.is_some(), marks, "{}", displayable(plan.as_ref()).indent(true));
            if marks {
                let input = coded.input.schema();
                assert_eq!(coded.selection, Some(input.fields().len() - 1));
                assert_eq!(input.field(input.fields().len() - 1).name(), SELECTED_COLUMN);
            }
        }
        // Grouped by an integer too, an aggregate reading the group column, on the aggregator.
        for plan in [
            partial(scan(true), &["flag", "n"], "q", "q"),
            partial(scan(true), &["flag"], "q", "flag"),
            partial(scan(false), &["flag"], "q", "q"),
        ] {
            assert!(coded_aggregates(plan).unwrap().is::<AggregateExec>());
        }
    }

    /// Over the same rows, as codes (two blocks' dictionaries, one with each row its own code,
    /// nulls as null codes and as null values) and as text, the coded aggregate's output equals
    /// DataFusion's partial aggregate's.
    #[tokio::test]
    async fn coded_groups_equal_datafusion_groups() {
        let flags: Vec<Option<&str>> = (0..3000)
            .map(|i| if i % 13 == 0 { None } else { Some(["A", "N", "R", "long flag value"][i % 4]) })
            .collect();
        let n: Vec<i64> = (0..3000).map(|i| i % 5).collect();
        let q: Vec<i64> = (0..3000).map(|i| i * 7 % 101).collect();
        let text_schema = Arc::new(Schema::new(vec![
            Field::new("flag", DataType::Utf8View, true),
            Field::new("n", DataType::Int64, true),
            Field::new("q", DataType::Int64, true),
        ]));
        let codes = DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8));
        let coded_schema = Arc::new(Schema::new(vec![
            Field::new("flag", codes, true),
            Field::new("n", DataType::Int64, true),
            Field::new("q", DataType::Int64, true),
        ]));
        // Identity codes for the second batch only in the first plan, for every batch in the
        // second (a column of many values: the aggregate runs as planned).
        let (mut text, mut coded, mut identity) = (vec![], vec![], vec![]);
        for (part, (start, end)) in [(0, 1000), (1000, 1200), (1200, 3000)].into_iter().enumerate() {
            let rows = start..end;
            let ints = |v: &[i64]| Arc::new(Int64Array::from(v[rows.clone()].to_vec())) as ArrayRef;
            let strings = StringViewArray::from(flags[rows.clone()].to_vec());
            text.push(RecordBatch::try_new(text_schema.clone(), vec![Arc::new(strings), ints(&n), ints(&q)]).unwrap());
            // Each row its own code (a block without a dictionary).
            let values = StringArray::from(flags[rows.clone()].to_vec());
            let keys = UInt32Array::from((0..values.len() as u32).collect::<Vec<_>>());
            let own: ArrayRef = Arc::new(DictionaryArray::<UInt32Type>::try_new(keys, Arc::new(values)).unwrap());
            identity.push(RecordBatch::try_new(coded_schema.clone(), vec![own.clone(), ints(&n), ints(&q)]).unwrap());
            let dictionary: ArrayRef = if part == 1 {
                own
            } else {
                // Codes into the block's distinct values, nulls as null codes.
                let values = StringArray::from(vec!["R", "long flag value", "A", "N", "unused"]);
                let keys: UInt32Array = flags[rows.clone()]
                    .iter()
                    .map(|f| f.map(|f| ["R", "long flag value", "A", "N"].iter().position(|v| *v == f).unwrap() as u32))
                    .collect();
                Arc::new(DictionaryArray::<UInt32Type>::try_new(keys, Arc::new(values)).unwrap())
            };
            coded.push(RecordBatch::try_new(coded_schema.clone(), vec![dictionary, ints(&n), ints(&q)]).unwrap());
        }
        let ctx = SessionContext::new().task_ctx();
        let text_source = MemorySourceConfig::try_new_exec(&[text], text_schema, None).unwrap();
        let planned = partial(text_source, &["flag"], "q", "n");
        let aggregate = planned.downcast_ref::<AggregateExec>().unwrap();
        let coded_source = MemorySourceConfig::try_new_exec(&[coded], coded_schema.clone(), None).unwrap();
        let exec: Arc<dyn ExecutionPlan> = Arc::new(CodedAggregateExec::new(aggregate, coded_source, vec![0]));
        let sorted = |batches: Vec<RecordBatch>| {
            let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
            let mut rows: Vec<String> = (0..all.num_rows())
                .map(|i| {
                    let row = all.slice(i, 1);
                    arrow::util::pretty::pretty_format_batches(&[row])
                        .unwrap()
                        .to_string()
                        .lines()
                        .nth(3)
                        .unwrap()
                        .to_string()
                })
                .collect();
            rows.sort();
            rows
        };
        let identity_source = MemorySourceConfig::try_new_exec(&[identity], coded_schema.clone(), None).unwrap();
        let many: Arc<dyn ExecutionPlan> = Arc::new(CodedAggregateExec::new(aggregate, identity_source, vec![0]));
        let want = sorted(datafusion::physical_plan::collect(planned.clone(), ctx.clone()).await.unwrap());
        let got = sorted(datafusion::physical_plan::collect(exec.clone(), ctx.clone()).await.unwrap());
        assert_eq!(want.len(), 5, "four flags and null: {want:?}");
        assert_eq!(got, want);
        let as_planned = |plan: &Arc<dyn ExecutionPlan>| {
            plan.metrics().and_then(|m| m.sum_by_name("ran_as_planned")).map_or(0, |v| v.as_usize())
        };
        assert_eq!(as_planned(&exec), 0, "grouped over codes");
        assert_eq!(sorted(datafusion::physical_plan::collect(many.clone(), ctx.clone()).await.unwrap()), want);
        assert_eq!(as_planned(&many), 1, "each row its own code: run as planned");
        // Emitting every two groups: groups come more than once, their states add up to the same.
        let mut early = CodedAggregateExec::new(aggregate, exec.children()[0].clone(), vec![0]);
        (early.early_emit, early.decide_rows) = (2, 1);
        let merged = |batches: Vec<RecordBatch>| {
            let mut groups = std::collections::BTreeMap::<Option<String>, (i64, i64)>::new();
            for b in &batches {
                let flags = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                let flags = flags.as_string::<i32>();
                let sums = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
                let counts = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
                for i in 0..b.num_rows() {
                    let g = groups.entry(flags.is_valid(i).then(|| flags.value(i).to_string())).or_default();
                    *g = (g.0 + sums.value(i), g.1 + counts.value(i));
                }
            }
            (batches.iter().map(RecordBatch::num_rows).sum::<usize>(), groups)
        };
        let (rows, want) = merged(datafusion::physical_plan::collect(planned, ctx.clone()).await.unwrap());
        assert_eq!(rows, 5);
        let (rows, got) = merged(datafusion::physical_plan::collect(Arc::new(early), ctx).await.unwrap());
        assert!(rows > 5, "groups emitted early come again: {rows} rows");
        assert_eq!(got, want);
    }

    /// Batches of few groups add sums, averages and counts a group at a time: the states equal
    /// DataFusion's row-at-a-time ones (values in quarters, so float sums are exact in any
    /// order), beside aggregates that stay row at a time (`min`, a filtered sum). With more
    /// groups than [`FEW_GROUPS`] in a batch, rows are added one at a time.
    #[tokio::test]
    async fn few_groups_give_the_same_states_a_group_at_a_time() {
        use datafusion::functions_aggregate::{average::avg_udaf, min_max::min_udaf};
        for distinct in [4usize, FEW_GROUPS + 3] {
            let names: Vec<String> = (0..distinct).map(|i| format!("flag {i}")).collect();
            let rows = 5000;
            let flags: Vec<Option<&str>> =
                (0..rows).map(|i| if i % 17 == 0 { None } else { Some(names[i * 7 % distinct].as_str()) }).collect();
            let f: Vec<Option<f64>> =
                (0..rows).map(|i| (i % 11 != 0).then_some((i % 97) as f64 * 0.25 - 3.0)).collect();
            let n: Vec<Option<i64>> = (0..rows).map(|i| (i % 23 != 0).then(|| (i as i64 * 31) % 1000 - 400)).collect();
            let field = |name: &str, t: DataType| Field::new(name, t, true);
            let codes = DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8));
            let text_schema = Arc::new(Schema::new(vec![
                field("flag", DataType::Utf8View),
                field("f", DataType::Float64),
                field("n", DataType::Int64),
            ]));
            let coded_schema = Arc::new(Schema::new(vec![
                field("flag", codes),
                field("f", DataType::Float64),
                field("n", DataType::Int64),
            ]));
            let (mut text, mut coded) = (vec![], vec![]);
            for (start, end) in [(0, 2048), (2048, 4096), (4096, rows)] {
                let r = start..end;
                let floats: ArrayRef = Arc::new(arrow::array::Float64Array::from(f[r.clone()].to_vec()));
                let ints: ArrayRef = Arc::new(Int64Array::from(n[r.clone()].to_vec()));
                let views: ArrayRef = Arc::new(StringViewArray::from(flags[r.clone()].to_vec()));
                text.push(
                    RecordBatch::try_new(text_schema.clone(), vec![views, floats.clone(), ints.clone()]).unwrap(),
                );
                let keys: UInt32Array = flags[r.clone()]
                    .iter()
                    .map(|v| v.map(|v| names.iter().position(|name| name == v).unwrap() as u32))
                    .collect();
                let values = StringArray::from(names.clone());
                let dictionary: ArrayRef =
                    Arc::new(DictionaryArray::<UInt32Type>::try_new(keys, Arc::new(values)).unwrap());
                coded.push(RecordBatch::try_new(coded_schema.clone(), vec![dictionary, floats, ints]).unwrap());
            }
            let text_source = MemorySourceConfig::try_new_exec(&[text], text_schema.clone(), None).unwrap();
            let column =
                |name: &str| Arc::new(Column::new_with_schema(name, &text_schema).unwrap()) as Arc<dyn PhysicalExpr>;
            let aggregate = |udaf, of: &str, alias: &str| aggregate_of(udaf, &text_schema, column(of), alias);
            let aggregates = vec![
                aggregate(sum_udaf(), "f", "sum_f"),
                aggregate(avg_udaf(), "f", "avg_f"),
                aggregate(count_udaf(), "f", "count_f"),
                aggregate(min_udaf(), "f", "min_f"),
                aggregate(sum_udaf(), "n", "sum_n"),
                aggregate(sum_udaf(), "n", "filtered_sum_n"),
            ];
            let kinds: Vec<Option<Kind>> = aggregates.iter().map(|a| Kind::of(a)).collect();
            assert_eq!(
                kinds,
                vec![
                    Some(Kind::SumF64),
                    Some(Kind::AvgF64),
                    Some(Kind::Count),
                    None,
                    Some(Kind::SumI64),
                    Some(Kind::SumI64)
                ]
            );
            let positive = Arc::new(datafusion::physical_expr::expressions::BinaryExpr::new(
                column("n"),
                datafusion::logical_expr::Operator::Gt,
                Arc::new(datafusion::physical_expr::expressions::Literal::new(0i64.into())),
            ));
            let planned: Arc<dyn ExecutionPlan> = Arc::new(
                AggregateExec::try_new(
                    AggregateMode::Partial,
                    PhysicalGroupBy::new_single(vec![(column("flag"), "flag".into())]),
                    aggregates,
                    vec![None, None, None, None, None, Some(positive)],
                    text_source,
                    text_schema.clone(),
                )
                .unwrap(),
            );
            let coded_source = MemorySourceConfig::try_new_exec(&[coded], coded_schema, None).unwrap();
            let exec: Arc<dyn ExecutionPlan> = Arc::new(CodedAggregateExec::new(
                planned.downcast_ref::<AggregateExec>().unwrap(),
                coded_source,
                vec![0],
            ));
            let ctx = SessionContext::new().task_ctx();
            let sorted = printed_rows;
            let want = sorted(datafusion::physical_plan::collect(planned, ctx.clone()).await.unwrap());
            let got = sorted(datafusion::physical_plan::collect(exec.clone(), ctx).await.unwrap());
            assert_eq!(want.len(), distinct + 2, "the groups, null and the closing line: {want:?}");
            assert_eq!(got, want);
            let few = exec.metrics().and_then(|m| m.sum_by_name("few_group_batches")).map_or(0, |v| v.as_usize());
            // Five groups with null: every batch; eleven and null: none.
            assert_eq!(few, if distinct < FEW_GROUPS { 3 } else { 0 }, "{distinct} groups");
        }
    }

    /// A scan marking its selection instead of filtering: the coded aggregate skips the rows
    /// not selected, a group at a time and on each fallback (more groups than [`FEW_GROUPS`],
    /// an aggregate added row by row, the aggregate as planned over many values), and its
    /// states equal DataFusion's over the selected rows alone.
    #[tokio::test]
    async fn marked_rows_not_selected_are_skipped() {
        use datafusion::functions_aggregate::{average::avg_udaf, min_max::min_udaf};
        let ctx = SessionContext::new().task_ctx();
        for (distinct, with_min, identity) in
            [(4usize, false, false), (FEW_GROUPS + 3, false, false), (4, true, false), (4, false, true)]
        {
            let names: Vec<String> = (0..distinct).map(|i| format!("flag {i}")).collect();
            let rows = 5000;
            let flags: Vec<Option<&str>> =
                (0..rows).map(|i| if i % 17 == 0 { None } else { Some(names[i * 7 % distinct].as_str()) }).collect();
            let f: Vec<Option<f64>> =
                (0..rows).map(|i| (i % 11 != 0).then_some((i % 97) as f64 * 0.25 - 3.0)).collect();
            // Batch 2 all selected, batch 3 none, the others every third row not.
            let selected: Vec<bool> =
                (0..rows).map(|i| (2048..4096).contains(&i) || (i < 2048 && i % 3 != 0)).collect();
            let field = |name: &str, t: DataType| Field::new(name, t, true);
            let codes = DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8));
            let text_schema =
                Arc::new(Schema::new(vec![field("flag", DataType::Utf8View), field("f", DataType::Float64)]));
            let coded_schema = Arc::new(Schema::new(vec![
                field("flag", codes),
                field("f", DataType::Float64),
                Field::new(SELECTED_COLUMN, DataType::Boolean, false),
            ]));
            let (mut text, mut coded) = (vec![], vec![]);
            for (start, end) in [(0, 2048), (2048, 4096), (4096, rows)] {
                let r = start..end;
                let kept: Vec<usize> = r.clone().filter(|i| selected[*i]).collect();
                let views = StringViewArray::from(kept.iter().map(|i| flags[*i]).collect::<Vec<_>>());
                let floats = arrow::array::Float64Array::from(kept.iter().map(|i| f[*i]).collect::<Vec<_>>());
                text.push(RecordBatch::try_new(text_schema.clone(), vec![Arc::new(views), Arc::new(floats)]).unwrap());
                let (keys, values): (UInt32Array, StringArray) = if identity {
                    ((0..(end - start) as u32).map(Some).collect(), flags[r.clone()].iter().copied().collect())
                } else {
                    let keys = flags[r.clone()]
                        .iter()
                        .map(|v| v.map(|v| names.iter().position(|name| name == v).unwrap() as u32))
                        .collect();
                    (keys, StringArray::from(names.clone()))
                };
                let dictionary: ArrayRef =
                    Arc::new(DictionaryArray::<UInt32Type>::try_new(keys, Arc::new(values)).unwrap());
                let floats: ArrayRef = Arc::new(arrow::array::Float64Array::from(f[r.clone()].to_vec()));
                let marks: ArrayRef = Arc::new(BooleanArray::from(selected[r.clone()].to_vec()));
                coded.push(RecordBatch::try_new(coded_schema.clone(), vec![dictionary, floats, marks]).unwrap());
            }
            let column =
                |name: &str| Arc::new(Column::new_with_schema(name, &text_schema).unwrap()) as Arc<dyn PhysicalExpr>;
            let aggregate = |udaf, of: &str, alias: &str| aggregate_of(udaf, &text_schema, column(of), alias);
            let mut aggregates = vec![
                aggregate(sum_udaf(), "f", "sum_f"),
                aggregate(avg_udaf(), "f", "avg_f"),
                aggregate(count_udaf(), "f", "count_f"),
            ];
            if with_min {
                aggregates.push(aggregate(min_udaf(), "f", "min_f"));
            }
            let filters = vec![None; aggregates.len()];
            let text_source = MemorySourceConfig::try_new_exec(&[text], text_schema.clone(), None).unwrap();
            let group = PhysicalGroupBy::new_single(vec![(column("flag"), "flag".into())]);
            let planned: Arc<dyn ExecutionPlan> = Arc::new(
                AggregateExec::try_new(
                    AggregateMode::Partial,
                    group,
                    aggregates,
                    filters,
                    text_source,
                    text_schema.clone(),
                )
                .unwrap(),
            );
            let coded_source = MemorySourceConfig::try_new_exec(&[coded], coded_schema, None).unwrap();
            let mut exec =
                CodedAggregateExec::new(planned.downcast_ref::<AggregateExec>().unwrap(), coded_source, vec![0]);
            exec.selection = Some(2);
            let exec: Arc<dyn ExecutionPlan> = Arc::new(exec);
            let sorted = printed_rows;
            let want = sorted(datafusion::physical_plan::collect(planned, ctx.clone()).await.unwrap());
            let got = sorted(datafusion::physical_plan::collect(exec.clone(), ctx.clone()).await.unwrap());
            assert_eq!(want.len(), distinct + 2, "the groups, null and the closing line: {want:?}");
            assert_eq!(got, want, "{distinct} groups, min: {with_min}, identity codes: {identity}");
            let metric = |name: &str| exec.metrics().and_then(|m| m.sum_by_name(name)).map_or(0, |v| v.as_usize());
            assert_eq!(metric("ran_as_planned"), usize::from(identity));
        }
    }
}
