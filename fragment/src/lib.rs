//! Distributed plan pieces shared by aggregators and leaves.
//!
//! - [`LeafScanExec`]: a scan of a collection's shards on the leaves (one partition per shard)
//!   with projection, exact filters, limit and access path pushed down.
//! - [`push_fragments`]: after DataFusion has planned a query, the operators that work shard by
//!   shard directly above a scan (filters, projections, partial aggregates, top-k sorts, local
//!   limits; everything when a collection has one shard) become a *fragment*: a
//!   [`LeafFragmentExec`] sends it, encoded with `datafusion-proto`, to the leaf of each shard, and
//!   only the fragment's result moves between the tiers. Final aggregation, the final merge and
//!   joins stay on the aggregator, except joins with a small build side, whose rows go to the
//!   leaves ([`broadcast`]).
//! - [`FragmentLeaf`]: wraps a storage leaf so it runs fragments: it decodes the plan with the
//!   scan bound to the local shard and executes it.

pub mod broadcast;
pub mod coded;
pub mod dates;
pub mod few;
pub mod filters;
pub mod keys;

use std::fmt;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, RecordBatchOptions};
use arrow::compute::SortOptions;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use basalt_common::api::{
    BatchStream, Estimate, FragmentRequest, Leaf, LeafApi, SELECTED_COLUMN, ScanRequest, ShardPosition, ShardWrite,
    ShardWriteResult,
};
use basalt_common::doc::ID_FIELD;
use basalt_common::filter::{AccessPath, Filter};
use basalt_common::schema::{ColumnType, SchemaStats};
use basalt_common::{BasaltError, ErrorCode, Result as BasaltResult};
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{ColumnStatistics, DataFusionError, Result, Statistics};
use datafusion::config::ConfigOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::expressions::DynamicFilterPhysicalExpr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::InputOrderMode;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::execution_plan::{
    Boundedness, ChildrenPropertiesMode, EmissionType, ReplaceChildrenOptions, SchedulingType,
};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::filter_pushdown::{
    ChildPushdownResult, FilterPushdownPhase, FilterPushdownPropagation, PushedDown,
};
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::limit::{GlobalLimitExec, LocalLimitExec};
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning, PlanProperties, displayable,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

pub fn to_df_error(e: BasaltError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Map a DataFusion error to a Basalt error with a fitting code.
pub fn from_df(e: DataFusionError) -> BasaltError {
    let root = e.find_root();
    if let DataFusionError::External(inner) = root
        && let Some(b) = inner.downcast_ref::<BasaltError>()
    {
        return b.clone();
    }
    let message = root.to_string();
    let code = match root {
        DataFusionError::SQL(..) => ErrorCode::Syntax,
        DataFusionError::Plan(m) if m.contains("not found") && m.contains("table") => ErrorCode::NotFound,
        DataFusionError::SchemaError(e, _) if matches!(**e, datafusion::common::SchemaError::FieldNotFound { .. }) => {
            ErrorCode::UndefinedColumn
        }
        DataFusionError::Plan(_) | DataFusionError::SchemaError(..) | DataFusionError::Execution(_) => {
            ErrorCode::InvalidInput
        }
        DataFusionError::ArrowError(..) => ErrorCode::InvalidInput,
        DataFusionError::NotImplemented(_) => ErrorCode::Unsupported,
        DataFusionError::ResourcesExhausted(_) => ErrorCode::OutOfMemory,
        _ => ErrorCode::Internal,
    };
    BasaltError::new(code, message)
}

/// The table schema of a collection's columns (every column nullable but `_id`), as clients
/// see it.
pub fn table_schema(columns: &[(String, ColumnType)]) -> SchemaRef {
    schema_of(columns, ColumnType::to_arrow)
}

fn schema_of(columns: &[(String, ColumnType)], arrow_type: impl Fn(&ColumnType) -> DataType) -> SchemaRef {
    Arc::new(Schema::new(
        columns.iter().map(|(name, ty)| Field::new(name, arrow_type(ty), name != ID_FIELD)).collect::<Vec<_>>(),
    ))
}

/// The type a column has inside query plans: text as `Utf8View` (grouping, joining and sorting
/// compare a string's first bytes inline instead of through offsets: TPC-H q1's grouping by two
/// one-letter columns), everything else as [`ColumnType::to_arrow`]. Leaves send `Utf8`; the
/// scan makes views of it ([`rewrap`]) and the session casts results back to `Utf8` for
/// clients.
pub fn plan_type(ty: &ColumnType) -> DataType {
    match ty {
        ColumnType::Utf8 => DataType::Utf8View,
        other => other.to_arrow(),
    }
}

/// The schema of a collection as query plans see it (see [`plan_type`]).
pub fn plan_schema(columns: &[(String, ColumnType)]) -> SchemaRef {
    schema_of(columns, plan_type)
}

/// What a scan asks of every shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanSpec {
    /// Columns fetched from leaves (at least one, even when the output has none).
    pub columns: Vec<(String, ColumnType)>,
    pub filters: Vec<Filter>,
    pub limit: Option<usize>,
    pub access: AccessPath,
    /// What the search index would match for the filters and the live documents, when the
    /// planner asked (shown by EXPLAIN).
    #[serde(default)]
    pub index_matches: Option<(u64, u64)>,
    /// The planner's estimate of what the scan returns, reported to DataFusion as statistics
    /// (join sides and broadcast of small ones).
    #[serde(default)]
    pub estimate: Option<ScanEstimate>,
    /// The access path was forced by an expert's hint (`SET basalt.access_path`): runtime
    /// filters do not change it.
    #[serde(default)]
    pub forced: bool,
    /// An output column every shard returns in ascending order (nulls last; see
    /// `ScanRequest::ordered_by`), declared to DataFusion as each partition's ordering: an
    /// aggregate grouped by it streams, a sort by it merges.
    #[serde(default)]
    pub ordered_by: Option<String>,
}

/// The largest share of a collection's documents for which the search index beats scanning the
/// column store. Measured on TPC-H SF 1 `lineitem` (docs/BENCHMARKS.md): the index wins at 14%
/// (0.028 s vs 0.038 s), the column store at 25% (0.032 s vs 0.042 s).
pub const INDEX_SELECTIVITY: f64 = 0.15;

/// Below this many documents every path is fast and the rule's choice stands.
pub const ESTIMATE_MIN_DOCS: u64 = 10_000;

/// The largest share of a scan's rows a runtime key list may match for the scan to find them
/// through the search index (its terms) instead of reading every block; the other filters are
/// then checked on the rows found. SSB star q1.3 at SF 1: 7 of 2,556 dates (0.3%).
pub const RUNTIME_INDEX_SELECTIVITY: f64 = 0.02;

/// The longest runtime key list the search index looks up: each key is a walk of the term
/// dictionary of every sealed index (about 40 per shard for 3M documents), and SSB star q2.2's
/// 1,600 part keys took longer that way than reading every block.
pub const RUNTIME_INDEX_MAX_KEYS: usize = 256;

/// Whether a scan planned to read every block should find the rows of its runtime key lists
/// through the search index instead: one list of at most [`RUNTIME_INDEX_MAX_KEYS`] keys matches
/// under [`RUNTIME_INDEX_SELECTIVITY`] of the rows, by the planner's distinct-value estimate of
/// its column (keys / distinct values).
/// The leaf still scans blocks when the index cannot answer the list (a float column, a
/// column of mixed types).
fn index_for_key_lists(spec: &ScanSpec, output: &Schema, lists: &[Filter]) -> bool {
    spec.key_list_estimate().is_some_and(|estimate| selective_key_list(estimate, output, lists))
}

#[cfg(test)]
impl ScanSpec {
    /// A column scan of `columns` with no filters, in the order of `ordered_by`.
    fn for_test(columns: &[(String, ColumnType)], ordered_by: Option<&str>) -> Self {
        ScanSpec {
            columns: columns.to_vec(),
            filters: vec![],
            limit: None,
            access: AccessPath::ColumnScan,
            index_matches: None,
            estimate: None,
            forced: false,
            ordered_by: ordered_by.map(str::to_string),
        }
    }
}

impl ScanSpec {
    /// The planner's estimate when runtime key lists may move this scan to the search index:
    /// a column scan the planner chose (not an expert) over enough rows.
    fn key_list_estimate(&self) -> Option<&ScanEstimate> {
        let estimate = self.estimate.as_ref()?;
        let eligible = !self.forced && self.access == AccessPath::ColumnScan && estimate.rows >= ESTIMATE_MIN_DOCS;
        eligible.then_some(estimate)
    }
}

/// Whether one of `lists` is short and selective enough for the index (see
/// [`index_for_key_lists`]).
fn selective_key_list(estimate: &ScanEstimate, output: &Schema, lists: &[Filter]) -> bool {
    lists.iter().any(|f| {
        let Filter::In { path, values } = f else { return false };
        values.len() <= RUNTIME_INDEX_MAX_KEYS
            && estimate
                .distinct_of(output, path)
                .is_some_and(|d| (values.len() as f64) < RUNTIME_INDEX_SELECTIVITY * d as f64)
    })
}

/// Estimated rows a scan returns (all shards) and distinct values per output column.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScanEstimate {
    pub rows: u64,
    pub distinct: Vec<Option<u64>>,
}

impl ScanEstimate {
    /// The estimated distinct values of output column `name`, when known.
    fn distinct_of(&self, output: &Schema, name: &str) -> Option<u64> {
        self.distinct.get(output.index_of(name).ok()?).copied().flatten()
    }
}

/// Bytes of a batch's data as it crosses the tiers (the sliced buffers, as Arrow IPC sends them).
fn batch_bytes(batch: &RecordBatch) -> usize {
    batch.columns().iter().map(|c| c.to_data().get_slice_memory_size().unwrap_or(0)).sum()
}

/// Rows and bytes that arrived from leaves, for `EXPLAIN ANALYZE`.
#[derive(Debug, Clone)]
struct Moved {
    output_rows: Count,
    rows: Count,
    bytes: Count,
}

impl Moved {
    fn new(metrics: &ExecutionPlanMetricsSet, partition: usize) -> Self {
        Self {
            output_rows: MetricBuilder::new(metrics).output_rows(partition),
            rows: MetricBuilder::new(metrics).counter("rows_from_leaves", partition),
            bytes: MetricBuilder::new(metrics).counter("bytes_from_leaves", partition),
        }
    }

    fn record(&self, batch: &RecordBatch) {
        self.output_rows.add(batch.num_rows());
        self.rows.add(batch.num_rows());
        self.bytes.add(batch_bytes(batch));
    }
}

/// The batches a leaf call returns, counted as moved and re-wrapped under the planned schema.
fn from_leaf(
    call: impl std::future::Future<Output = BasaltResult<BatchStream>> + Send + 'static,
    schema: SchemaRef,
    moved: Moved,
) -> SendableRecordBatchStream {
    let out = schema.clone();
    let stream = futures::stream::once(call).try_flatten().map_err(to_df_error).and_then(move |batch: RecordBatch| {
        moved.record(&batch);
        let batch = rewrap(&out, batch);
        async move { batch }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}

/// Re-wrap a batch under the planned schema (nullability and metadata as planned, text as
/// views of the leaf's strings); a schema with no fields keeps only the row count.
fn rewrap(schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch> {
    let columns = if schema.fields().is_empty() {
        vec![]
    } else {
        schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, column)| match (field.data_type(), column.data_type()) {
                (DataType::Utf8View, DataType::Utf8) => Ok(basalt_common::arrays::text_views(column)?),
                _ => Ok(column.clone()),
            })
            .collect::<Result<Vec<_>>>()?
    };
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &options)?)
}

/// A fragment's output as it leaves the leaf: text views become plain `Utf8` (compact: a view
/// may point into a whole block's strings, which Arrow IPC would send whole); the receiving
/// scan makes views again ([`rewrap`]).
fn text_for_wire(batch: RecordBatch) -> BasaltResult<RecordBatch> {
    if !batch.schema().fields().iter().any(|f| f.data_type() == &DataType::Utf8View) {
        return Ok(batch);
    }
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if field.data_type() == &DataType::Utf8View {
            fields.push(field.as_ref().clone().with_data_type(DataType::Utf8));
            columns.push(arrow::compute::cast(column, &DataType::Utf8)?);
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    Ok(RecordBatch::try_new_with_options(schema, columns, &options)?)
}

/// Scans one collection on the leaves; partition `i` is shard `shards[i]` (all shards on an
/// aggregator; the one local shard when a leaf runs a fragment).
#[derive(Debug)]
pub struct LeafScanExec {
    collection: String,
    collection_id: u64,
    shards: Vec<u32>,
    leaf: Leaf,
    /// The columns the plan sees (may be none, for `count(*)`).
    output_columns: Vec<(String, ColumnType)>,
    output: SchemaRef,
    spec: ScanSpec,
    /// Filters whose value the query learns while it runs (a hash join's build-side keys and
    /// bounds); applied, relaxed into leaf filters, when the scan starts.
    dynamic: Vec<Arc<dyn PhysicalExpr>>,
    /// Expression ids of the `dynamic` filters to wait for before the scan starts: those of
    /// hash joins in partitioned mode (see [`awaited_filters`], set by `push_fragments`).
    awaited: Vec<u64>,
    /// Key sets of joins above whose build side has more keys than their runtime filter lists
    /// (see [`keys`]), read with the runtime filters.
    probe_keys: Vec<keys::ProbeKeys>,
    /// Ask for text as views of the blocks' strings (`ScanRequest::text_views`): only when the
    /// leaf runs in this process (a fragment on its leaf), never over the wire.
    text_views: bool,
    /// Text columns asked for as codes (`ScanRequest::text_codes`, see [`coded`]): only with
    /// `text_views`, for a partial aggregate on the leaf.
    text_codes: Vec<String>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl LeafScanExec {
    pub fn new(
        collection: String,
        collection_id: u64,
        shards: Vec<u32>,
        leaf: Leaf,
        output_columns: Vec<(String, ColumnType)>,
        spec: ScanSpec,
    ) -> Self {
        let output = plan_schema(&output_columns);
        let properties = Self::properties_for(&output, shards.len(), None);
        Self {
            collection,
            collection_id,
            shards,
            leaf,
            output_columns,
            output,
            spec,
            dynamic: vec![],
            awaited: vec![],
            probe_keys: vec![],
            text_views: false,
            text_codes: vec![],
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    fn properties_for(output: &SchemaRef, partitions: usize, ordered_by: Option<&str>) -> Arc<PlanProperties> {
        let ordering = ordered_by.and_then(|name| {
            let column = Column::new_with_schema(name, output).ok()?;
            let options = SortOptions { descending: false, nulls_first: false };
            Some(vec![PhysicalSortExpr::new(Arc::new(column), options)])
        });
        Arc::new(
            PlanProperties::new(
                EquivalenceProperties::new_with_orderings(output.clone(), ordering),
                Partitioning::UnknownPartitioning(partitions),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )
            // Batches come from a leaf's scan (in process), which yields the worker between
            // batches, or through tonic streams (remote), which take from the task budget: no
            // CooperativeExec needed.
            .with_scheduling_type(SchedulingType::Cooperative),
        )
    }

    /// The scan as a leaf runs it in a fragment: in the order of `spec.ordered_by`, declared to
    /// DataFusion, so the fragment's operators over it (a partial aggregate grouped by that
    /// column) stream. The aggregator's plan does not rely on the order: there DataFusion would
    /// keep it through order-preserving repartitions, which merge their inputs and cost more
    /// than they save (TPC-H q3 at SF 1: 30 -> 44 ms).
    fn in_order(mut self) -> Self {
        if let Some(name) = self.spec.ordered_by.as_deref() {
            self.properties = Self::properties_for(&self.output, self.shards.len(), Some(name));
        }
        self
    }

    /// The scan as a leaf runs it in a fragment, reading its own shard in process: text comes
    /// as views of the stored strings (`ScanRequest::text_views`; TPC-H q1 filtered its two
    /// one-letter text columns' bytes and offsets, then made views of the copies).
    fn with_text_views(mut self) -> Self {
        self.text_views = true;
        self
    }

    /// The same scan returning the text columns `names` as codes into each block's distinct
    /// values (`Dictionary(UInt32, Utf8)`, see [`coded`]); None unless the scan runs in its
    /// leaf's process (`text_views`) and each name is a text column it outputs.
    fn with_text_codes(&self, names: &[String]) -> Option<Self> {
        if !self.text_views || names.is_empty() {
            return None;
        }
        let mut fields: Vec<Field> = self.output.fields().iter().map(|f| f.as_ref().clone()).collect();
        for name in names {
            let i = self.output.index_of(name).ok()?;
            if !matches!(self.spec.columns.get(i), Some((n, ColumnType::Utf8)) if n == name) {
                return None;
            }
            let codes = DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8));
            fields[i] = fields[i].clone().with_data_type(codes);
        }
        let mut scan = self.with_dynamic(self.dynamic.clone());
        scan.output = Arc::new(Schema::new_with_metadata(fields, self.output.metadata().clone()));
        let ordered = if self.declares_order() { self.spec.ordered_by.as_deref() } else { None };
        scan.properties = Self::properties_for(&scan.output, self.shards.len(), ordered);
        scan.text_codes = names.to_vec();
        Some(scan)
    }

    /// The same scan with [`SELECTED_COLUMN`] last: blocks keeping most of their rows come
    /// whole, marked (see [`coded`]). None unless the scan runs in its leaf's process, has
    /// filters and no limit, and outputs no column of that name.
    fn with_selection(&self) -> Option<Self> {
        if !self.text_views
            || self.spec.limit.is_some()
            || (self.spec.filters.is_empty() && self.dynamic.is_empty() && self.probe_keys.is_empty())
            || self.output.index_of(SELECTED_COLUMN).is_ok()
        {
            return None;
        }
        let mut scan = self.with_dynamic(self.dynamic.clone());
        scan.output_columns.push((SELECTED_COLUMN.to_string(), ColumnType::Boolean));
        scan.spec.columns.push((SELECTED_COLUMN.to_string(), ColumnType::Boolean));
        let mut fields: Vec<Field> = self.output.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(SELECTED_COLUMN, DataType::Boolean, false));
        scan.output = Arc::new(Schema::new_with_metadata(fields, self.output.metadata().clone()));
        let ordered = if self.declares_order() { self.spec.ordered_by.as_deref() } else { None };
        scan.properties = Self::properties_for(&scan.output, self.shards.len(), ordered);
        Some(scan)
    }

    /// Whether the scan declared an order (see [`LeafScanExec::in_order`]), which its rows must
    /// then come in.
    fn declares_order(&self) -> bool {
        !self.properties.equivalence_properties().oeq_class().is_empty()
    }

    /// The same scan with these runtime filters.
    fn with_dynamic(&self, dynamic: Vec<Arc<dyn PhysicalExpr>>) -> Self {
        let mut scan = LeafScanExec::new(
            self.collection.clone(),
            self.collection_id,
            self.shards.clone(),
            self.leaf.clone(),
            self.output_columns.clone(),
            self.spec.clone(),
        );
        scan.dynamic = dynamic;
        scan.properties = self.properties.clone();
        scan.awaited = self.awaited.clone();
        scan.probe_keys = self.probe_keys.clone();
        scan.text_views = self.text_views;
        scan.text_codes = self.text_codes.clone();
        scan
    }

    /// The runtime filters' values, as leaf filters (see [`filters::dynamic_to_leaf`]), read
    /// when the returned future runs: the scan's start. Filters that pin `_id`s turn the scan
    /// into row-store lookups; key lists on other columns are checked by the leaves before rows
    /// leave them (and skip blocks whose min/max exclude every key). Bounds alone are dropped:
    /// on keys spread over the whole table they exclude nothing and cost a comparison per row.
    ///
    /// A hash join probes only after its build side is complete, but a partitioned join probes
    /// partition `i` once that partition's build side is in, and its filter covers every
    /// partition's keys only when all of them are: read earlier, it is still the placeholder
    /// `true` and the scan sends every row. So the filters in `awaited` are waited for first
    /// (at most [`RUNTIME_FILTER_WAIT`]).
    ///
    /// A join whose build side has too many keys for its filter's list, or whose filter could
    /// not reach this scan, may have left them in a key set (see [`keys`]): the scan waits for
    /// the sets of this run (`context`) to be complete (see [`keys::KeySet::wait_ended`]), and
    /// a set becomes the list when it keeps under [`keys::KEY_SET_SELECTIVITY`] of the
    /// column's distinct values.
    fn runtime_filters_later(
        &self,
        context: Arc<TaskContext>,
    ) -> impl std::future::Future<Output = Result<Vec<Filter>>> + Send + 'static {
        let (dynamic, output, awaited) = (self.dynamic.clone(), self.output.clone(), self.awaited.clone());
        let (probes, estimate) = (self.probe_keys.clone(), self.spec.estimate.clone());
        async move {
            let incomplete = futures::future::join_all(
                dynamic
                    .iter()
                    .filter(|e| e.expression_id().is_some_and(|id| awaited.contains(&id)))
                    .filter_map(|e| e.downcast_ref::<DynamicFilterPhysicalExpr>())
                    .map(DynamicFilterPhysicalExpr::wait_complete),
            );
            if !awaited.is_empty() && tokio::time::timeout(RUNTIME_FILTER_WAIT, incomplete).await.is_err() {
                tracing::debug!("runtime filters still incomplete; the scan goes on without what is missing");
            }
            let sets = futures::future::join_all(probes.iter().map(|p| p.set.wait_ended(&context)));
            if !probes.is_empty() && tokio::time::timeout(RUNTIME_FILTER_WAIT, sets).await.is_err() {
                tracing::debug!("key sets still incomplete; the scan goes on without them");
            }
            let mut out = vec![];
            for expr in &dynamic {
                out.extend(filters::dynamic_to_leaf(expr, &output)?);
            }
            tracing::debug!(filters = ?out, "runtime filters");
            if basalt_common::filter::id_lookup(&out).is_none() {
                out = key_lists(out);
                for probe in &probes {
                    if out.iter().any(|f| matches!(f, Filter::In { path, .. } if path == &probe.column)) {
                        continue;
                    }
                    let Some(keys) = probe.set.keys(&context) else { continue };
                    let distinct = estimate.as_ref().and_then(|e| e.distinct_of(&output, &probe.column));
                    if distinct.is_some_and(|d| keys.len() as f64 > keys::KEY_SET_SELECTIVITY * d as f64) {
                        continue;
                    }
                    let values = keys.into_iter().map(basalt_common::filter::Scalar::Int).collect();
                    out.push(Filter::In { path: probe.column.clone(), values });
                }
            }
            Ok(out)
        }
    }

    /// The scan with runtime filters added (see [`LeafScanExec::runtime_filters_later`]): when
    /// they pin `_id`s it looks documents up; a selective key list is found through the search
    /// index ([`index_for_key_lists`]).
    fn with_extra_filters(mut self, extra: Vec<Filter>) -> Self {
        if basalt_common::filter::id_lookup(&extra).is_some() {
            self.spec.filters.extend(extra);
            self.spec.access = AccessPath::RowLookup;
        } else {
            let extra = key_lists(extra);
            if index_for_key_lists(&self.spec, &self.output, &extra) {
                self.spec.access = AccessPath::SearchIndex;
            }
            self.spec.filters.extend(extra);
        }
        self
    }

    fn shard(&self, partition: usize) -> Result<u32> {
        self.shards.get(partition).copied().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "{}: no partition {partition} (shards {:?})",
                self.collection, self.shards
            ))
        })
    }
}

/// The longest a scan waits for a partitioned hash join's runtime filter to be complete; past
/// it the scan reads the filter as it is (a safety net: every partition's build side runs
/// concurrently, so the wait ends when the slowest build side does).
const RUNTIME_FILTER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Expression ids of the runtime filters that partitioned hash joins in `plan` produce. Only
/// those are worth waiting for: a join in `CollectLeft` mode completes its one filter before it
/// probes, and a top-k filter completes only when its own input, possibly this scan, ends.
pub fn awaited_filters(plan: &Arc<dyn ExecutionPlan>) -> Vec<u64> {
    let mut ids = vec![];
    let _ = plan.apply(|node| {
        if let Some(join) = node.downcast_ref::<HashJoinExec>()
            && *join.partition_mode() == PartitionMode::Partitioned
        {
            ids.extend(node.dynamic_expressions_produced().iter().filter_map(|e| e.expression_id()));
        }
        Ok(TreeNodeRecursion::Continue)
    });
    ids
}

/// The key lists among runtime filters (a join's filter is its bounds and, when the build side
/// is small, its keys: `a >= 1 AND a <= 9 AND a IN (1, 4, 9)`).
///
/// A partitioned join's filter is one such conjunction per partition, or-ed (see
/// `filters::relax`): when every branch has a key list on the same column, their union is
/// the key list.
fn key_lists(filters: Vec<Filter>) -> Vec<Filter> {
    let mut out = vec![];
    for f in filters {
        match f {
            Filter::In { .. } => out.push(f),
            Filter::And(parts) => out.extend(key_lists(parts)),
            Filter::Or(branches) => out.extend(union_of_key_lists(branches)),
            _ => {}
        }
    }
    out
}

/// The union of the branches' key lists when each branch has exactly one, all on one column.
fn union_of_key_lists(branches: Vec<Filter>) -> Option<Filter> {
    let mut column: Option<String> = None;
    let mut union = vec![];
    for branch in branches {
        let [Filter::In { path, values }] = <[Filter; 1]>::try_from(key_lists(vec![branch])).ok()? else {
            return None;
        };
        if column.get_or_insert_with(|| path.clone()) != &path {
            return None;
        }
        union.extend(values);
    }
    Some(Filter::In { path: column?, values: union })
}

impl DisplayAs for LeafScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LeafScanExec: collection={} shards={} access_path={}",
            self.collection,
            self.shards.len(),
            self.spec.access.name()
        )?;
        let names: Vec<&str> = self.output.fields().iter().map(|f| f.name().as_str()).collect();
        write!(f, " projection=[{}]", names.join(", "))?;
        if !self.spec.filters.is_empty() {
            let filters: Vec<String> = self.spec.filters.iter().map(|f| f.to_string()).collect();
            write!(f, " filters=[{}]", filters.join(" AND "))?;
        }
        if let Some(limit) = self.spec.limit {
            write!(f, " limit={limit}")?;
        }
        if let Some(column) = &self.spec.ordered_by {
            write!(f, " ordered_by={column}")?;
        }
        if let Some((matches, live)) = self.spec.index_matches {
            write!(f, " index_matches={matches}/{live}")?;
        }
        if !self.dynamic.is_empty() {
            write!(f, " runtime_filters={}", self.dynamic.len())?;
        }
        if !self.probe_keys.is_empty() {
            let columns: Vec<&str> = self.probe_keys.iter().map(|p| p.column.as_str()).collect();
            write!(f, " key_sets=[{}]", columns.join(", "))?;
        }
        Ok(())
    }
}

impl ExecutionPlan for LeafScanExec {
    fn name(&self) -> &'static str {
        "LeafScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    /// The runtime filters: a hash join computes its filter only when a node below it shows it
    /// here.
    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for expr in &self.dynamic {
            if f(expr)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    /// The planner's estimate (inexact): rows, spread evenly over the shards, and distinct
    /// values per column. DataFusion puts the smaller side of a hash join on the build side
    /// and builds a small one once for all partitions instead of repartitioning both sides.
    fn partition_statistics(&self, partition: Option<usize>) -> Result<Arc<Statistics>> {
        let Some(estimate) = &self.spec.estimate else {
            return Ok(Arc::new(Statistics::new_unknown(&self.output)));
        };
        let rows = match partition {
            None => estimate.rows,
            Some(_) => estimate.rows.div_ceil(self.shards.len().max(1) as u64),
        };
        let rows = usize::try_from(rows).unwrap_or(usize::MAX);
        let columns = (0..self.output.fields().len())
            .map(|i| match estimate.distinct.get(i).copied().flatten() {
                Some(d) => ColumnStatistics::new_unknown()
                    .with_distinct_count(Precision::Inexact(usize::try_from(d).unwrap_or(usize::MAX).min(rows))),
                None => ColumnStatistics::new_unknown(),
            })
            .collect();
        Ok(Arc::new(Statistics {
            num_rows: Precision::Inexact(rows),
            total_byte_size: Precision::Absent,
            column_statistics: columns,
        }))
    }

    /// Accept dynamic filters (a join's build side, a top-k threshold) to apply when the scan
    /// starts; static filters were pushed down at planning time and stay where DataFusion put
    /// them.
    fn handle_child_pushdown_result(
        &self,
        _phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        let mut accepted = vec![];
        let verdicts = child_pushdown_result
            .parent_filters
            .into_iter()
            .map(|f| {
                // A join on `_id` looks its keys up in the row store; a join whose build side
                // has few keys (see `RUNTIME_IN_LIST_MAX` in the engine) has the leaves drop
                // rows without a match before sending them.
                if filters::is_dynamic(&f.filter) {
                    accepted.push(f.filter);
                    PushedDown::Yes
                } else {
                    PushedDown::No
                }
            })
            .collect();
        let mut propagation = FilterPushdownPropagation::with_parent_pushdown_result(verdicts);
        if !accepted.is_empty() {
            let scan = self.with_dynamic(self.dynamic.iter().cloned().chain(accepted).collect());
            propagation.updated_node = Some(Arc::new(scan) as Arc<dyn ExecutionPlan>);
        }
        Ok(propagation)
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let mut request = ScanRequest {
            collection_id: self.collection_id,
            shard: self.shard(partition)?,
            columns: self.spec.columns.clone(),
            filters: self.spec.filters.clone(),
            limit: self.spec.limit,
            hint: Some(self.spec.access),
            ordered_by: if self.declares_order() { self.spec.ordered_by.clone() } else { None },
            text_views: self.text_views,
            text_codes: self.text_codes.clone(),
        };
        let leaf = self.leaf.clone();
        let output = self.output.clone();
        let moved = Moved::new(&self.metrics, partition);
        let lookups = MetricBuilder::new(&self.metrics).counter("runtime_id_lookups", partition);
        let key_lists = MetricBuilder::new(&self.metrics).counter("runtime_key_lists", partition);
        let index_scans = MetricBuilder::new(&self.metrics).counter("runtime_index_scans", partition);
        let dynamic =
            (!self.dynamic.is_empty() || !self.probe_keys.is_empty()).then(|| self.runtime_filters_later(context));
        // A scan with nothing to wait for starts now: the build sides of a plan's joins (SSB
        // q3.3's date, customer and supplier scans) are otherwise read one after another, as
        // each join reaches its own, a round trip to the leaves each.
        let eager = dynamic.is_none();
        let (estimate, schema) = (self.spec.key_list_estimate().cloned(), self.output.clone());
        let collection = self.collection.clone();
        let call = async move {
            let extra = match dynamic {
                Some(read) => {
                    tracing::debug!(%collection, partition, "leaf scan waits for its runtime filters");
                    read.await.map_err(from_df)?
                }
                None => vec![],
            };
            if basalt_common::filter::id_lookup(&extra).is_some() {
                request.filters.extend(extra);
                request.hint = Some(AccessPath::RowLookup);
                lookups.add(1);
            } else if !extra.is_empty() {
                if estimate.as_ref().is_some_and(|e| selective_key_list(e, &schema, &extra)) {
                    request.hint = Some(AccessPath::SearchIndex);
                    index_scans.add(1);
                }
                request.filters.extend(extra);
                key_lists.add(1);
            }
            tracing::debug!(%collection, partition, "leaf scan starts");
            leaf.scan(request).await
        };
        Ok(if eager { from_leaf(started(call), output, moved) } else { from_leaf(call, output, moved) })
    }
}

/// `call` (a leaf opening a scan) started now, on a task of its own, so that the scans a plan
/// reaches one after another (the build sides of its joins) open together, a round trip to
/// the leaves for all; the batches are then read by the consumer itself, on its own thread.
/// Dropping the returned future stops the task.
fn started<T: Send + 'static>(
    call: impl std::future::Future<Output = BasaltResult<T>> + Send + 'static,
) -> impl std::future::Future<Output = BasaltResult<T>> + Send + 'static {
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(call));
    async move { (&mut task.0).await.map_err(|e| BasaltError::internal(format!("leaf scan task: {e}")))? }
}

/// A fragment of a plan that runs on the leaves: partition `i` is the fragment run by the leaf
/// of shard `i` over that shard alone.
#[derive(Debug)]
pub struct LeafFragmentExec {
    fragment: Arc<dyn ExecutionPlan>,
    /// The scan inside the fragment (a [`LeafScanExec`]): its shards are the partitions, its
    /// runtime filters are read when the fragment starts.
    scan: Arc<dyn ExecutionPlan>,
    encoded: Arc<Vec<u8>>,
    /// Build sides of the joins inside the fragment that are broadcast to the leaves (see
    /// [`broadcast`]); the fragment exec's children, run on the aggregator.
    builds: Vec<broadcast::Build>,
    /// With `builds`: the plan as it was before the broadcast, run when the build sides turn
    /// out too large to send.
    unbroadcast: Option<Arc<dyn ExecutionPlan>>,
    /// With `builds`: the fragment with their rows, once they have run (shared by the shards).
    prepared: Arc<tokio::sync::OnceCell<std::result::Result<broadcast::Prepared, Arc<DataFusionError>>>>,
    metrics: ExecutionPlanMetricsSet,
}

impl LeafFragmentExec {
    /// A fragment whose one leaf is a [`LeafScanExec`]; fails if the plan cannot be encoded, or
    /// decoded again with the functions a leaf knows (a Basalt-only function, for example).
    pub fn try_new(fragment: Arc<dyn ExecutionPlan>) -> Result<Self> {
        Self::try_new_with_builds(fragment, vec![], None)
    }

    /// A fragment with broadcast joins: `builds[i]` fills the fragment's
    /// [`broadcast::BuildSlotExec`] number `i`; `unbroadcast` runs instead when they are too
    /// large.
    fn try_new_with_builds(
        fragment: Arc<dyn ExecutionPlan>,
        builds: Vec<broadcast::Build>,
        unbroadcast: Option<Arc<dyn ExecutionPlan>>,
    ) -> Result<Self> {
        let mut scans = vec![];
        let mut slots = 0;
        let mut other_leaves = 0;
        fragment.apply(|node| {
            if node.is::<LeafScanExec>() {
                scans.push(node.clone());
            } else if node.is::<broadcast::BuildSlotExec>() {
                slots += 1;
            } else if node.children().is_empty() {
                other_leaves += 1;
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let scan = match (scans.pop(), scans.is_empty(), other_leaves) {
            (Some(scan), true, 0) if slots == builds.len() => scan,
            _ => return Err(DataFusionError::Internal("a fragment must read exactly one leaf scan".into())),
        };
        // With broadcast joins, check the fragment with empty build sides in the slots.
        let checked = if builds.is_empty() {
            fragment.clone()
        } else {
            fragment
                .clone()
                .transform_up(|node| {
                    if !node.is::<broadcast::BuildSlotExec>() {
                        return Ok(Transformed::no(node));
                    }
                    let empty = datafusion::datasource::memory::MemorySourceConfig::try_new_exec(
                        &[vec![]],
                        node.schema(),
                        None,
                    )?;
                    Ok(Transformed::yes(empty as Arc<dyn ExecutionPlan>))
                })?
                .data
        };
        let encoded = physical_plan_to_bytes_with_extension_codec(checked, &ScanCodec::checking())?;
        physical_plan_from_bytes_with_extension_codec(&encoded, &checking_context(), &ScanCodec::checking())?;
        Ok(Self {
            fragment,
            scan,
            encoded: Arc::new(encoded.to_vec()),
            builds,
            unbroadcast,
            prepared: Arc::default(),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    fn leaf_scan(&self) -> Result<&LeafScanExec> {
        self.scan
            .downcast_ref::<LeafScanExec>()
            .ok_or_else(|| DataFusionError::Internal("a fragment's scan is a LeafScanExec".into()))
    }

    /// The same fragment with its scan declaring the order its leaf scans in (see
    /// [`LeafScanExec::in_order`]; the leaf always does), so that the operators above the scan
    /// see it here as they do on the leaf: None when that leaves the fragment's output without
    /// an order, or when the fragment may run another plan (broadcast build sides too large to
    /// send: `unbroadcast`).
    fn ordered(&self) -> Result<Option<Self>> {
        if !self.builds.is_empty() || self.unbroadcast.is_some() {
            return Ok(None);
        }
        let fragment = self.fragment.clone().transform_up(|node| {
            let Some(scan) = node.downcast_ref::<LeafScanExec>() else { return Ok(Transformed::no(node)) };
            if scan.spec.ordered_by.is_none() || scan.declares_order() {
                return Ok(Transformed::no(node));
            }
            let ordered = scan.with_dynamic(scan.dynamic.clone()).in_order();
            Ok(Transformed::yes(Arc::new(ordered) as Arc<dyn ExecutionPlan>))
        })?;
        if !fragment.transformed || fragment.data.properties().output_ordering().is_none() {
            return Ok(None);
        }
        let fragment = fragment.data;
        let mut scan = None;
        fragment.apply(|node| {
            if node.is::<LeafScanExec>() {
                scan = Some(node.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let Some(scan) = scan else { return Ok(None) };
        Ok(Some(Self {
            fragment,
            scan,
            encoded: self.encoded.clone(),
            builds: vec![],
            unbroadcast: None,
            prepared: Arc::default(),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    /// The same fragment exec with new build-side plans, to run afresh.
    fn with_builds(&self, builds: Vec<broadcast::Build>) -> Self {
        Self {
            fragment: self.fragment.clone(),
            scan: self.scan.clone(),
            encoded: self.encoded.clone(),
            builds,
            unbroadcast: self.unbroadcast.clone(),
            prepared: Arc::default(),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for LeafFragmentExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        if let Ok(scan) = self.leaf_scan() {
            write!(f, "LeafFragmentExec: collection={} shards={}", scan.collection, scan.shards.len())?;
        }
        if !self.builds.is_empty() {
            // The build sides are this node's children, in slot order.
            write!(f, " broadcast_builds={}", self.builds.len())?;
        }
        write!(f, " fragment=[")?;
        // The fragment is a chain (a broadcast join's build side is a slot): print it top-down
        // on one line, following the probe side of joins.
        let mut node = Some(self.fragment.clone());
        let mut first = true;
        while let Some(n) = node {
            if !first {
                write!(f, " <- ")?;
            }
            first = false;
            write!(f, "{}", displayable(n.as_ref()).one_line().to_string().trim_end())?;
            let children = n.children();
            node = if n.is::<HashJoinExec>() { children.get(1) } else { children.first() }.map(|c| (*c).clone());
            if let Some(join) = n.downcast_ref::<HashJoinExec>()
                && let Some(slot) = join.left().downcast_ref::<broadcast::BuildSlotExec>()
            {
                write!(f, " [{}]", displayable(slot).one_line().to_string().trim_end())?;
            }
        }
        write!(f, "]")
    }
}

impl ExecutionPlan for LeafFragmentExec {
    fn name(&self) -> &'static str {
        "LeafFragmentExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.fragment.properties()
    }

    /// The build sides of broadcast joins (run here, before the fragment goes to the leaves).
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.builds.iter().map(|b| &b.plan).collect()
    }

    /// The build sides are collected whole, each into one hash table on every leaf.
    fn required_input_distribution(&self) -> Vec<datafusion::physical_plan::Distribution> {
        vec![datafusion::physical_plan::Distribution::UnspecifiedDistribution; self.builds.len()]
    }

    /// The runtime filters of the scan inside (see [`LeafScanExec::apply_expressions`]).
    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.scan.apply_expressions(f)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != self.builds.len() {
            return Err(DataFusionError::Internal(format!(
                "a fragment with {} broadcast build sides got {} children",
                self.builds.len(),
                children.len()
            )));
        }
        if children.iter().zip(&self.builds).all(|(c, b)| Arc::ptr_eq(c, &b.plan)) {
            return Ok(self);
        }
        let builds = self.builds.iter().zip(children).map(|(b, plan)| b.with_plan(plan)).collect();
        Ok(Arc::new(self.with_builds(builds)))
    }

    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(self.with_builds(self.builds.clone())))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let scan = self.leaf_scan()?;
        let mut request = FragmentRequest {
            collection_id: scan.collection_id,
            shard: scan.shard(partition)?,
            plan: vec![],
            filters: vec![],
        };
        let leaf = scan.leaf.clone();
        let schema = self.fragment.schema();
        let moved = Moved::new(&self.metrics, partition);
        let lookups = MetricBuilder::new(&self.metrics).counter("runtime_id_lookups", partition);
        let key_lists = MetricBuilder::new(&self.metrics).counter("runtime_key_lists", partition);
        let index_scans = MetricBuilder::new(&self.metrics).counter("runtime_index_scans", partition);
        let dynamic = (!scan.dynamic.is_empty() || !scan.probe_keys.is_empty())
            .then(|| scan.runtime_filters_later(context.clone()));
        let (estimate, output) = (scan.spec.key_list_estimate().cloned(), scan.output.clone());
        let encoded = self.encoded.clone();
        // With broadcast joins: their build sides run first (once, for every shard), and fill
        // the runtime filters read below.
        let broadcast = (!self.builds.is_empty()).then(|| {
            let (builds, template, prepared) = (self.builds.clone(), self.fragment.clone(), self.prepared.clone());
            let (unbroadcast, context) = (self.unbroadcast.clone(), context.clone());
            let rows = MetricBuilder::new(&self.metrics).counter("broadcast_rows", partition);
            let bytes = MetricBuilder::new(&self.metrics).counter("broadcast_bytes", partition);
            async move {
                let ready = prepared
                    .get_or_init(|| async {
                        broadcast::prepare(&builds, &template, context.clone(), |plan| {
                            Ok(physical_plan_to_bytes_with_extension_codec(plan, &ScanCodec::checking())?.to_vec())
                        })
                        .await
                        .map_err(Arc::new)
                    })
                    .await;
                match ready.as_ref().map_err(|e| DataFusionError::Shared(e.clone()))? {
                    broadcast::Prepared::Plan { encoded, rows: r, bytes: b, .. } => {
                        // Counted once, by the first shard.
                        if partition == 0 {
                            rows.add(*r);
                            bytes.add(*b);
                        }
                        Ok(Broadcast::Send(encoded.clone()))
                    }
                    broadcast::Prepared::Empty => Ok(Broadcast::Nothing),
                    broadcast::Prepared::TooLarge => {
                        let plan = unbroadcast.ok_or_else(|| {
                            DataFusionError::Internal("a broadcast fragment without its plan before".into())
                        })?;
                        tracing::debug!("broadcast build sides too large; the joins run on the aggregator");
                        Ok(Broadcast::Instead(plan.execute(partition, context)?))
                    }
                }
            }
        });
        let call = async move {
            request.plan = match broadcast {
                None => encoded.as_ref().clone(),
                Some(ready) => match ready.await.map_err(from_df)? {
                    Broadcast::Send(plan) => plan.as_ref().clone(),
                    Broadcast::Nothing => return Ok(futures::stream::empty().boxed()),
                    Broadcast::Instead(stream) => return Ok(stream.map_err(from_df).boxed()),
                },
            };
            if let Some(read) = dynamic {
                request.filters = read.await.map_err(from_df)?;
                if basalt_common::filter::id_lookup(&request.filters).is_some() {
                    lookups.add(1);
                } else if !request.filters.is_empty() {
                    key_lists.add(1);
                    // The leaf makes the same choice (`LeafScanExec::with_extra_filters`).
                    if estimate.as_ref().is_some_and(|e| selective_key_list(e, &output, &request.filters)) {
                        index_scans.add(1);
                    }
                }
            }
            leaf.execute(request).await
        };
        Ok(from_leaf(call, schema, moved))
    }
}

/// What a fragment with broadcast joins does once their build sides have run.
enum Broadcast {
    /// Send this plan (build rows inside) to the leaf.
    Send(Arc<Vec<u8>>),
    /// Nothing: a build side is empty.
    Nothing,
    /// The build sides were too large: the plan before the broadcast runs here.
    Instead(SendableRecordBatchStream),
}

/// Whether `node` maps each input partition to the same output partition on its own, so it
/// can run on the leaf that holds that partition's shard.
fn runs_per_partition(node: &Arc<dyn ExecutionPlan>) -> bool {
    let children = node.children();
    let [child] = children.as_slice() else { return false };
    let input = child.output_partitioning().partition_count();
    if node.output_partitioning().partition_count() != input {
        return false;
    }
    if node.is::<FilterExec>() || node.is::<ProjectionExec>() || node.is::<LocalLimitExec>() {
        return true;
    }
    // Merging one partition is passing it on.
    if node.is::<CoalescePartitionsExec>() || node.is::<SortPreservingMergeExec>() {
        return input == 1;
    }
    if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
        return *aggregate.mode() == AggregateMode::Partial || input == 1;
    }
    if let Some(sort) = node.downcast_ref::<SortExec>() {
        return sort.preserve_partitioning() || input == 1;
    }
    node.is::<GlobalLimitExec>() && input == 1
}

/// Turn the per-shard work directly above each leaf scan into fragments that run on the leaves.
/// A chain that cannot be encoded for a leaf stays on the aggregator (shorter chains are not
/// tried).
///
/// With `broadcast`, a hash join whose build side is small joins on the leaves, inside its
/// probe side's fragment (see [`broadcast`]).
pub fn push_fragments(plan: Arc<dyn ExecutionPlan>, broadcast: bool) -> Result<Arc<dyn ExecutionPlan>> {
    let recompute = || ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
    let awaited = awaited_filters(&plan);
    let pushed = plan.transform_up(|node| {
        if let Some(scan) = node.downcast_ref::<LeafScanExec>() {
            let own: Vec<u64> =
                scan.dynamic.iter().filter_map(|e| e.expression_id()).filter(|id| awaited.contains(id)).collect();
            if !own.is_empty() {
                let mut scan = scan.with_dynamic(scan.dynamic.clone());
                scan.awaited = own;
                return Ok(Transformed::yes(Arc::new(scan) as Arc<dyn ExecutionPlan>));
            }
        }
        if broadcast
            && let Some(join) = node.downcast_ref::<HashJoinExec>()
            && let Some(exec) = broadcast_join(join, &node)?
        {
            return Ok(Transformed::yes(exec));
        }
        let children = node.children();
        let [child] = children.as_slice() else { return Ok(Transformed::no(node)) };
        let child = (*child).clone();
        // A round-robin repartition straight above a scan only spreads per-partition work over
        // threads; that work now runs on the leaves, one shard each.
        let (node, child) = match child.downcast_ref::<RepartitionExec>() {
            Some(repartition)
                if matches!(repartition.partitioning(), Partitioning::RoundRobinBatch(_))
                    && repartition.input().is::<LeafScanExec>() =>
            {
                let scan = repartition.input().clone();
                let candidate = node.clone().replace_children(vec![scan.clone()], recompute())?;
                if !runs_per_partition(&candidate) {
                    return Ok(Transformed::no(node));
                }
                (candidate, scan)
            }
            _ => (node, child),
        };
        if !runs_per_partition(&node) {
            return Ok(Transformed::no(node));
        }
        let (fragment, builds, unbroadcast) = if child.is::<LeafScanExec>() {
            (node.clone(), vec![], None)
        } else if let Some(inner) = child.downcast_ref::<LeafFragmentExec>() {
            let fragment = node.clone().replace_children(vec![inner.fragment.clone()], recompute())?;
            let unbroadcast = match &inner.unbroadcast {
                Some(before) => Some(node.clone().replace_children(vec![before.clone()], recompute())?),
                None => None,
            };
            (fragment, inner.builds.clone(), unbroadcast)
        } else {
            return Ok(Transformed::no(node));
        };
        let fragment = without_inner_runtime_filters(fragment)?;
        match LeafFragmentExec::try_new_with_builds(fragment, builds, unbroadcast) {
            Ok(exec) => Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>)),
            Err(e) => {
                tracing::debug!(error = %e, operator = node.name(), "operator stays on the aggregator");
                Ok(Transformed::no(node))
            }
        }
    })?;
    ordered_final_aggregates(pushed.data)
}

/// A final aggregate over a fragment's partial aggregates grouped by the column its leaves
/// scan in order (TPC-H q18's `l_orderkey`: 15M groups at SF 10, hashed on the aggregator)
/// streams instead: the fragment declares its order on the aggregator too (see
/// [`LeafFragmentExec::ordered`]), the repartition under the final aggregate keeps it (merging
/// its inputs' sorted streams), and the aggregate emits each group as the next one begins,
/// holding a few groups instead of all of them. Left as planned when the aggregate would not
/// stream over the order.
fn ordered_final_aggregates(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let rewritten = plan.transform_up(|node| {
        let Some(aggregate) = node.downcast_ref::<AggregateExec>() else { return Ok(Transformed::no(node)) };
        let final_mode = matches!(aggregate.mode(), AggregateMode::FinalPartitioned | AggregateMode::Final);
        if !final_mode || *aggregate.input_order_mode() != InputOrderMode::Linear {
            return Ok(Transformed::no(node));
        }
        let input = aggregate.input();
        let ordered_input: Arc<dyn ExecutionPlan> = if let Some(repartition) = input.downcast_ref::<RepartitionExec>()
            && matches!(repartition.partitioning(), Partitioning::Hash(..))
            && let Some(fragment) = repartition.input().downcast_ref::<LeafFragmentExec>()
            && let Some(ordered) = fragment.ordered()?
        {
            Arc::new(
                RepartitionExec::try_new(Arc::new(ordered), repartition.partitioning().clone())?.with_preserve_order(),
            )
        } else if let Some(coalesce) = input.downcast_ref::<CoalescePartitionsExec>()
            && let Some(fragment) = coalesce.input().downcast_ref::<LeafFragmentExec>()
            && let Some(ordered) = fragment.ordered()?
            && let Some(ordering) = ordered.properties().output_ordering().cloned()
        {
            Arc::new(SortPreservingMergeExec::new(ordering, Arc::new(ordered)))
        } else {
            return Ok(Transformed::no(node));
        };
        let streaming = node
            .clone()
            .replace_children(vec![ordered_input], ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))?;
        match streaming.downcast_ref::<AggregateExec>() {
            Some(a) if *a.input_order_mode() != InputOrderMode::Linear => Ok(Transformed::yes(streaming)),
            _ => Ok(Transformed::no(node)),
        }
    })?;
    Ok(rewritten.data)
}

/// A hash join whose build side is broadcast to the leaves, inside the fragment of its probe
/// side (see [`broadcast`]); None when it does not qualify or cannot be sent.
fn broadcast_join(join: &HashJoinExec, node: &Arc<dyn ExecutionPlan>) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    // The probe side: a fragment or a scan, maybe spread over threads by a round-robin
    // repartition (the join then runs per shard on the leaves instead).
    let mut probe = join.right().clone();
    if let Some(repartition) = probe.downcast_ref::<RepartitionExec>()
        && matches!(repartition.partitioning(), Partitioning::RoundRobinBatch(_))
    {
        probe = repartition.input().clone();
    }
    let (inner, builds, before, scan) = if let Some(fragment) = probe.downcast_ref::<LeafFragmentExec>() {
        (fragment.fragment.clone(), fragment.builds.clone(), fragment.unbroadcast.clone(), fragment.leaf_scan()?)
    } else if let Some(scan) = probe.downcast_ref::<LeafScanExec>() {
        (probe.clone(), vec![], None, scan)
    } else {
        return Ok(None);
    };
    // Leaves in this process (`basalt dev`) receive nothing over a network: joining there
    // saves no bytes and builds a hash table per shard instead of one (TPC-H SF 10 in dev:
    // q11 52.4 ms broadcast, 46.8 ms not).
    if scan.leaf.in_process() {
        return Ok(None);
    }
    let Some((build, joined)) = broadcast::broadcastable(join, inner, builds.len())? else { return Ok(None) };
    // What runs instead when the build sides turn out too large: the join as planned, over
    // the probe side as it was before its own broadcasts.
    let unbroadcast = match before {
        Some(before) => node.clone().replace_children(
            vec![join.left().clone(), before],
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )?,
        None => node.clone(),
    };
    let builds = builds.into_iter().chain([build]).collect();
    match LeafFragmentExec::try_new_with_builds(without_inner_runtime_filters(joined)?, builds, Some(unbroadcast)) {
        Ok(exec) => Ok(Some(Arc::new(exec))),
        Err(e) => {
            tracing::debug!(error = %e, "the join stays on the aggregator");
            Ok(None)
        }
    }
}

/// A fragment's scan drops the runtime filters that operators inside the fragment produce (a
/// top-k threshold): those operators run on the leaf, so the aggregator's copies never fill them.
/// A broadcast join's filter stays: the aggregator fills it from the build side's rows.
fn without_inner_runtime_filters(fragment: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let mut produced = std::collections::HashSet::new();
    fragment.apply(|node| {
        let broadcast_join =
            node.downcast_ref::<HashJoinExec>().is_some_and(|join| join.left().is::<broadcast::BuildSlotExec>());
        if !node.is::<LeafScanExec>() && !broadcast_join {
            produced.extend(node.dynamic_expressions_produced().iter().filter_map(|e| e.expression_id()));
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if produced.is_empty() {
        return Ok(fragment);
    }
    let pruned = fragment.transform_up(|node| {
        let Some(scan) = node.downcast_ref::<LeafScanExec>() else { return Ok(Transformed::no(node)) };
        let keep: Vec<_> = scan
            .dynamic
            .iter()
            .filter(|e| e.expression_id().is_none_or(|id| !produced.contains(&id)))
            .cloned()
            .collect();
        if keep.len() == scan.dynamic.len() {
            return Ok(Transformed::no(node));
        }
        Ok(Transformed::yes(Arc::new(scan.with_dynamic(keep)) as Arc<dyn ExecutionPlan>))
    })?;
    Ok(pruned.data)
}

/// How a [`LeafScanExec`] travels inside an encoded fragment.
#[derive(Serialize, Deserialize)]
struct ScanNode {
    collection: String,
    collection_id: u64,
    output_columns: Vec<(String, ColumnType)>,
    spec: ScanSpec,
}

/// Encodes [`LeafScanExec`]; decodes it bound to one local shard.
#[derive(Debug)]
struct ScanCodec {
    leaf: Leaf,
    /// The shard a decoded scan reads and the collection it must belong to (`None` when only
    /// checking that a fragment decodes).
    target: Option<(u64, u32)>,
    /// Runtime filters for the decoded scan.
    extra: Vec<Filter>,
}

impl ScanCodec {
    fn checking() -> Self {
        Self { leaf: Arc::new(NoLeaf), target: None, extra: vec![] }
    }
}

impl PhysicalExtensionCodec for ScanCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        _ctx: &TaskContext,
        _proto: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !inputs.is_empty() {
            return Err(DataFusionError::Internal("a leaf scan has no inputs".into()));
        }
        let node: ScanNode =
            serde_json::from_slice(buf).map_err(|e| DataFusionError::Internal(format!("bad scan node: {e}")))?;
        let shard = match self.target {
            Some((collection_id, shard)) if collection_id == node.collection_id => shard,
            Some((collection_id, _)) => {
                return Err(DataFusionError::Internal(format!(
                    "fragment scans collection {} but was sent for collection {collection_id}",
                    node.collection_id
                )));
            }
            None => 0,
        };
        let scan = LeafScanExec::new(
            node.collection,
            node.collection_id,
            vec![shard],
            self.leaf.clone(),
            node.output_columns,
            node.spec,
        );
        // On the leaf that runs the fragment (not when the aggregator checks that it decodes).
        let scan = if self.target.is_some() { scan.in_order().with_text_views() } else { scan };
        Ok(Arc::new(scan.with_extra_filters(self.extra.clone())))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _proto: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let Some(scan) = node.downcast_ref::<LeafScanExec>() else {
            return Err(DataFusionError::NotImplemented(format!("{} cannot run on a leaf", node.name())));
        };
        let scan_node = ScanNode {
            collection: scan.collection.clone(),
            collection_id: scan.collection_id,
            output_columns: scan.output_columns.clone(),
            spec: scan.spec.clone(),
        };
        serde_json::to_writer(buf, &scan_node).map_err(|e| DataFusionError::Internal(format!("scan node: {e}")))
    }
}

/// The functions a leaf knows when it decodes a fragment (DataFusion's built-ins and Basalt's
/// [`dates::date_part_text_udf`]).
fn checking_context() -> Arc<TaskContext> {
    static CONTEXT: OnceLock<Arc<TaskContext>> = OnceLock::new();
    CONTEXT
        .get_or_init(|| {
            let ctx = SessionContext::new();
            ctx.register_udf(dates::date_part_text_udf());
            ctx.task_ctx()
        })
        .clone()
}

/// Stands in for a leaf while a fragment is only decoded, never run.
#[derive(Debug)]
struct NoLeaf;

#[async_trait]
impl LeafApi for NoLeaf {
    async fn apply(&self, _write: ShardWrite) -> BasaltResult<ShardWriteResult> {
        Err(BasaltError::internal("no leaf"))
    }
    async fn scan(&self, _request: ScanRequest) -> BasaltResult<BatchStream> {
        Err(BasaltError::internal("no leaf"))
    }
    async fn stats(&self, _collection_id: u64, _shards: Vec<u32>) -> BasaltResult<SchemaStats> {
        Err(BasaltError::internal("no leaf"))
    }
    async fn drop_collection(&self, _collection_id: u64) -> BasaltResult<()> {
        Err(BasaltError::internal("no leaf"))
    }
    async fn positions(
        &self,
        _collection_id: u64,
        _shards: Vec<u32>,
        _stream: u64,
    ) -> BasaltResult<Vec<ShardPosition>> {
        Err(BasaltError::internal("no leaf"))
    }
}

/// A storage leaf that also runs plan fragments over its shards. Everything else passes
/// through to the wrapped leaf.
pub struct FragmentLeaf {
    inner: Leaf,
    ctx: SessionContext,
}

/// Memory all fragments running on one leaf process may hold at once.
pub const LEAF_FRAGMENT_MEMORY: usize = 4 << 30;

impl FragmentLeaf {
    pub fn new(inner: Leaf) -> Self {
        let config = SessionConfig::new().with_target_partitions(1);
        let runtime = RuntimeEnvBuilder::new().with_memory_limit(LEAF_FRAGMENT_MEMORY, 1.0).build_arc();
        let ctx = match runtime {
            Ok(runtime) => SessionContext::new_with_config_rt(config, runtime),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the fragment runtime; fragments run without a memory limit");
                SessionContext::new_with_config(config)
            }
        };
        ctx.register_udf(dates::date_part_text_udf());
        Self { inner, ctx }
    }
}

impl fmt::Debug for FragmentLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FragmentLeaf")
    }
}

#[async_trait]
impl LeafApi for FragmentLeaf {
    async fn apply(&self, write: ShardWrite) -> BasaltResult<ShardWriteResult> {
        self.inner.apply(write).await
    }

    async fn scan(&self, request: ScanRequest) -> BasaltResult<BatchStream> {
        self.inner.scan(request).await
    }

    fn in_process(&self) -> bool {
        self.inner.in_process()
    }

    async fn execute(&self, request: FragmentRequest) -> BasaltResult<BatchStream> {
        let codec = ScanCodec {
            leaf: self.inner.clone(),
            target: Some((request.collection_id, request.shard)),
            extra: request.filters,
        };
        let task = self.ctx.task_ctx();
        let plan = physical_plan_from_bytes_with_extension_codec(&request.plan, &task, &codec)
            .map_err(|e| BasaltError::invalid(format!("cannot decode the plan fragment: {}", from_df(e).message)))?;
        let plan = coded::coded_aggregates(plan).map_err(from_df)?;
        let partitions = plan.output_partitioning().partition_count();
        if partitions != 1 {
            return Err(BasaltError::invalid(format!(
                "a fragment must have one partition on a leaf, not {partitions}"
            )));
        }
        let stream = plan.execute(0, task).map_err(from_df)?;
        Ok(stream.map_err(from_df).and_then(|batch| async move { text_for_wire(batch) }).boxed())
    }

    async fn stats(&self, collection_id: u64, shards: Vec<u32>) -> BasaltResult<SchemaStats> {
        self.inner.stats(collection_id, shards).await
    }

    async fn planner_stats(&self, collection_id: u64, shards: Vec<u32>, sketches: bool) -> BasaltResult<SchemaStats> {
        self.inner.planner_stats(collection_id, shards, sketches).await
    }

    async fn estimate(&self, collection_id: u64, shards: Vec<u32>, filters: Vec<Filter>) -> BasaltResult<Estimate> {
        self.inner.estimate(collection_id, shards, filters).await
    }

    async fn drop_collection(&self, collection_id: u64) -> BasaltResult<()> {
        self.inner.drop_collection(collection_id).await
    }

    async fn positions(&self, collection_id: u64, shards: Vec<u32>, stream: u64) -> BasaltResult<Vec<ShardPosition>> {
        self.inner.positions(collection_id, shards, stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_common::filter::{CmpOp, Scalar};

    fn keys(path: &str, values: &[i64]) -> Filter {
        Filter::In { path: path.into(), values: values.iter().map(|v| Scalar::Int(*v)).collect() }
    }

    fn bound(path: &str, op: CmpOp, v: i64) -> Filter {
        Filter::Cmp { path: path.into(), op, value: Scalar::Int(v) }
    }

    /// Text from leaves becomes views of the same strings under the planned schema, nulls,
    /// empty, inline (up to 12 bytes) and longer strings alike, also from a sliced array (whose
    /// offsets do not start at zero); other columns pass as they are.
    #[test]
    fn text_from_leaves_becomes_views_of_the_same_strings() {
        use arrow::array::{ArrayRef, AsArray, Int64Array, StringArray};
        let texts = StringArray::from(vec![
            Some("skipped by the slice"),
            Some(""),
            None,
            Some("A"),
            Some("twelve bytes"),
            Some("thirteen byte"),
            Some("a string well over twelve bytes, with ünïcödé"),
            None,
        ]);
        let sliced = texts.slice(1, 7);
        let numbers: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 6, 7]));
        let leaf_schema = table_schema(&[("t".into(), ColumnType::Utf8), ("n".into(), ColumnType::Int64)]);
        let planned = plan_schema(&[("t".into(), ColumnType::Utf8), ("n".into(), ColumnType::Int64)]);
        let batch =
            RecordBatch::try_new(leaf_schema, vec![Arc::new(sliced.clone()), numbers.clone()]).expect("leaf batch");
        let out = rewrap(&planned, batch).expect("rewrap");
        assert_eq!(out.schema().field(0).data_type(), &DataType::Utf8View);
        let views = out.column(0).as_string_view();
        views.to_data().validate_full().expect("valid views");
        assert_eq!(views.iter().collect::<Vec<_>>(), sliced.iter().collect::<Vec<_>>());
        assert_eq!(out.column(1), &numbers);
        // A fragment's output leaves the leaf as plain text, compact, and comes back as views.
        let kept = out.slice(2, 3);
        let wire = text_for_wire(kept.clone()).expect("wire");
        assert_eq!(wire.schema().field(0).data_type(), &DataType::Utf8);
        let text = wire.column(0).as_string::<i32>();
        assert_eq!(text.values().len(), "Atwelve bytesthirteen byte".len());
        assert_eq!(text.iter().collect::<Vec<_>>(), sliced.slice(2, 3).iter().collect::<Vec<_>>());
        let back = rewrap(&planned, wire).expect("rewrap");
        assert_eq!(
            back.column(0).as_string_view().iter().collect::<Vec<_>>(),
            kept.column(0).as_string_view().iter().collect::<Vec<_>>()
        );
        assert_eq!(back.column(1), kept.column(1));
    }

    /// A scan planned in a column's order declares it only where a leaf runs the fragment:
    /// there a partial aggregate grouped by the column streams, while the aggregator's plan does
    /// not rely on the order (and its scans do not ask leaves for it).
    #[test]
    fn fragments_stream_over_ordered_scans_on_leaves_only() {
        use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
        let columns = vec![("k".to_string(), ColumnType::Int64), ("q".to_string(), ColumnType::Int64)];
        let spec = ScanSpec::for_test(&columns, Some("k"));
        let scan = LeafScanExec::new("c".into(), 7, vec![0, 1], Arc::new(NoLeaf), columns, spec);
        assert!(!scan.declares_order());
        let scan: Arc<dyn ExecutionPlan> = Arc::new(scan);
        let schema = scan.schema();
        let k = Column::new_with_schema("k", &schema).unwrap();
        let group = PhysicalGroupBy::new_single(vec![(Arc::new(k) as Arc<dyn PhysicalExpr>, "k".to_string())]);
        let partial = AggregateExec::try_new(AggregateMode::Partial, group, vec![], vec![], scan, schema.clone());
        let partial: Arc<dyn ExecutionPlan> = Arc::new(partial.unwrap());
        let line = |p: &Arc<dyn ExecutionPlan>| displayable(p.as_ref()).one_line().to_string();
        assert!(!line(&partial).contains("ordering_mode"), "{}", line(&partial));
        let encoded = physical_plan_to_bytes_with_extension_codec(partial, &ScanCodec::checking()).unwrap();
        let on_leaf = ScanCodec { leaf: Arc::new(NoLeaf), target: Some((7, 1)), extra: vec![] };
        let decoded = physical_plan_from_bytes_with_extension_codec(&encoded, &checking_context(), &on_leaf).unwrap();
        assert!(line(&decoded).contains("ordering_mode=Sorted"), "{}", line(&decoded));
        let leaf_scan = decoded.children()[0].clone();
        assert!(leaf_scan.downcast_ref::<LeafScanExec>().unwrap().declares_order());
        let checked =
            physical_plan_from_bytes_with_extension_codec(&encoded, &checking_context(), &ScanCodec::checking())
                .unwrap();
        assert!(!line(&checked).contains("ordering_mode"));
    }

    /// A final aggregate over a fragment's partial aggregates grouped by the column the leaves
    /// scan in order merges the shards' sorted streams and streams; without that order it hashes.
    #[test]
    fn final_aggregates_stream_over_ordered_fragments() {
        use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
        let plan_for = |ordered_by: Option<&str>| -> Arc<dyn ExecutionPlan> {
            let columns = vec![("k".to_string(), ColumnType::Int64), ("q".to_string(), ColumnType::Int64)];
            let spec = ScanSpec::for_test(&columns, ordered_by);
            let scan: Arc<dyn ExecutionPlan> =
                Arc::new(LeafScanExec::new("c".into(), 7, vec![0, 1], Arc::new(NoLeaf), columns, spec));
            let schema = scan.schema();
            let k: Arc<dyn PhysicalExpr> = Arc::new(Column::new_with_schema("k", &schema).unwrap());
            let group = PhysicalGroupBy::new_single(vec![(k, "k".to_string())]);
            let partial =
                AggregateExec::try_new(AggregateMode::Partial, group.clone(), vec![], vec![], scan, schema.clone());
            let fragment = LeafFragmentExec::try_new(Arc::new(partial.unwrap())).unwrap();
            let fragment: Arc<dyn ExecutionPlan> = Arc::new(fragment);
            let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new_with_schema("k", &fragment.schema()).unwrap());
            let repartition = RepartitionExec::try_new(fragment, Partitioning::Hash(vec![key.clone()], 2)).unwrap();
            let group = PhysicalGroupBy::new_single(vec![(key, "k".to_string())]);
            let last = AggregateExec::try_new(
                AggregateMode::FinalPartitioned,
                group,
                vec![],
                vec![],
                Arc::new(repartition),
                schema,
            );
            Arc::new(last.unwrap())
        };
        let text = |p: &Arc<dyn ExecutionPlan>| displayable(p.as_ref()).indent(true).to_string();
        let planned = plan_for(Some("k"));
        assert!(!text(&planned).lines().next().unwrap().contains("ordering_mode"), "{}", text(&planned));
        let rewritten = ordered_final_aggregates(planned).unwrap();
        let shown = text(&rewritten);
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[0].contains("mode=FinalPartitioned") && lines[0].contains("ordering_mode=Sorted"), "{shown}");
        assert!(lines[1].contains("preserve_order=true"), "{shown}");
        // The fragment sent to the leaves is the one planned (the leaf declares the order itself).
        let fragment = rewritten.children()[0].children()[0].clone();
        assert!(fragment.downcast_ref::<LeafFragmentExec>().is_some(), "{shown}");
        let unordered = ordered_final_aggregates(plan_for(None)).unwrap();
        assert!(!text(&unordered).contains("ordering_mode"), "{}", text(&unordered));
        assert!(!text(&unordered).contains("preserve_order"), "{}", text(&unordered));
    }

    /// A planned column scan finds a runtime key list's rows through the index when the list is
    /// short and matches few rows by the planner's distinct values; never when an expert forced
    /// the path, the planner chose another, or the collection is small.
    #[test]
    fn selective_short_key_lists_use_the_index() {
        use arrow::datatypes::DataType;
        let output = Schema::new(vec![Field::new("d", DataType::Int64, true), Field::new("p", DataType::Int64, true)]);
        let estimate = ScanEstimate { rows: 6_000_000, distinct: vec![Some(2_556), Some(200_000)] };
        let spec = ScanSpec { estimate: Some(estimate), ..ScanSpec::for_test(&[], None) };
        let seven: Vec<i64> = (0..7).collect();
        assert!(index_for_key_lists(&spec, &output, &[keys("d", &seven)]));
        // 365 of 2,556 dates (14%): scan.
        assert!(!index_for_key_lists(&spec, &output, &[keys("d", &(0..365).collect::<Vec<_>>())]));
        // 1,600 of 200,000 parts is selective but too many keys to look up.
        assert!(!index_for_key_lists(&spec, &output, &[keys("p", &(0..1_600).collect::<Vec<_>>())]));
        assert!(index_for_key_lists(&spec, &output, &[keys("d", &(0..365).collect::<Vec<_>>()), keys("p", &seven)]));
        // No distinct estimate for the column, a bound instead of a list: scan.
        assert!(!index_for_key_lists(&spec, &output, &[keys("x", &seven), bound("d", CmpOp::Lt, 3)]));
        let forced = ScanSpec { forced: true, ..spec.clone() };
        assert!(!index_for_key_lists(&forced, &output, &[keys("d", &seven)]));
        let indexed = ScanSpec { access: AccessPath::SearchIndex, ..spec.clone() };
        assert!(!index_for_key_lists(&indexed, &output, &[keys("d", &seven)]));
        let small = ScanSpec { estimate: Some(ScanEstimate { rows: 5_000, distinct: vec![Some(2_556)] }), ..spec };
        assert!(!index_for_key_lists(&small, &output, &[keys("d", &seven)]));
    }

    #[test]
    fn a_partitioned_join_filter_gives_the_union_of_its_partitions_key_lists() {
        // What `filters::relax` makes of `CASE hash(k) % 2 WHEN 0 THEN .. WHEN 1 THEN .. END`.
        let branch = |lo, hi, values: &[i64]| {
            Filter::And(vec![bound("k", CmpOp::GtEq, lo), bound("k", CmpOp::LtEq, hi), keys("k", values)])
        };
        let filter = Filter::Or(vec![branch(1, 9, &[1, 9]), branch(4, 4, &[4])]);
        assert_eq!(key_lists(vec![filter]), vec![keys("k", &[1, 9, 4])]);
        // Bounds alone go, and so does an `Or` with a branch that has no key list (that
        // partition's keys were too many to list) or lists on different columns.
        let no_list = Filter::And(vec![bound("k", CmpOp::GtEq, 1), bound("k", CmpOp::LtEq, 9)]);
        assert_eq!(key_lists(vec![Filter::Or(vec![branch(1, 9, &[1, 9]), no_list.clone()])]), vec![]);
        assert_eq!(key_lists(vec![Filter::Or(vec![keys("k", &[1]), keys("j", &[2])])]), vec![]);
        assert_eq!(key_lists(vec![no_list, keys("j", &[3])]), vec![keys("j", &[3])]);
    }
}
