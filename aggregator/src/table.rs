//! A collection as a DataFusion table: its schema comes from the leaves' smart-schema
//! statistics; scans run on leaves, one partition per shard, with projection, exact filters
//! and limit pushed down.

use std::fmt;
use std::sync::Arc;

use arrow::array::RecordBatchOptions;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use basalt_common::api::{CollectionInfo, Leaf, ScanRequest};
use basalt_common::doc::ID_FIELD;
use basalt_common::filter::{AccessPath, Filter, choose_access_path};
use basalt_common::schema::{ColumnType, SchemaStats};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType, SchedulingType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use futures::TryStreamExt;

use crate::translate::translate;

pub fn to_df_error(e: basalt_common::BasaltError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[derive(Debug)]
pub struct CollectionTable {
    info: CollectionInfo,
    stats: SchemaStats,
    columns: Vec<(String, ColumnType)>,
    schema: SchemaRef,
    leaf: Leaf,
    hint: Option<AccessPath>,
}

impl CollectionTable {
    pub fn new(
        info: CollectionInfo,
        stats: SchemaStats,
        leaf: Leaf,
        hint: Option<AccessPath>,
        with_score: bool,
    ) -> Self {
        let mut columns = stats.columns();
        if with_score {
            columns.push((basalt_common::api::SCORE_COLUMN.to_string(), ColumnType::Float64));
        }
        let schema = table_schema(&columns);
        Self { info, stats, columns, schema, leaf, hint }
    }
}

/// The table schema of a collection's columns (every column nullable but `_id`).
pub fn table_schema(columns: &[(String, ColumnType)]) -> SchemaRef {
    Arc::new(Schema::new(
        columns.iter().map(|(name, ty)| Field::new(name, ty.to_arrow(), name != ID_FIELD)).collect::<Vec<_>>(),
    ))
}

#[async_trait]
impl TableProvider for CollectionTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| match translate(f, &self.schema) {
                Some(_) => TableProviderFilterPushDown::Exact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.columns.len()).collect(),
        };
        let output: SchemaRef = Arc::new(self.schema.project(&indices)?);
        let mut columns: Vec<(String, ColumnType)> = indices.iter().map(|i| self.columns[*i].clone()).collect();
        // A scan with no columns (count(*)) still needs rows: fetch `_id` and drop it.
        if columns.is_empty() {
            columns.push((ID_FIELD.to_string(), ColumnType::Utf8));
        }
        let filters = filters
            .iter()
            .map(|f| {
                translate(f, &self.schema).ok_or_else(|| {
                    DataFusionError::Internal(format!("filter {f} was accepted for pushdown but does not translate"))
                })
            })
            .collect::<Result<Vec<Filter>>>()?;
        let access = choose_access_path(&filters, self.hint, &self.stats);
        let spec = ScanSpec { columns, filters, limit, access };
        Ok(Arc::new(LeafScanExec::new(self.info.clone(), self.leaf.clone(), output, spec)))
    }
}

/// What a scan asks of every shard.
#[derive(Debug, Clone)]
struct ScanSpec {
    /// Columns fetched from leaves (at least one, even when the output has none).
    columns: Vec<(String, ColumnType)>,
    filters: Vec<Filter>,
    limit: Option<usize>,
    access: AccessPath,
}

/// Scans one collection on the leaves; partition `i` is shard `i`.
#[derive(Debug)]
pub struct LeafScanExec {
    info: CollectionInfo,
    leaf: Leaf,
    output: SchemaRef,
    spec: ScanSpec,
    properties: Arc<PlanProperties>,
}

impl LeafScanExec {
    fn new(info: CollectionInfo, leaf: Leaf, output: SchemaRef, spec: ScanSpec) -> Self {
        let properties = Arc::new(
            PlanProperties::new(
                EquivalenceProperties::new(output.clone()),
                Partitioning::UnknownPartitioning(info.shards as usize),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )
            // Batches arrive through tokio channels (in process) or tonic streams (remote), both of
            // which consume the task budget: no CooperativeExec wrapper needed.
            .with_scheduling_type(SchedulingType::Cooperative),
        );
        Self { info, leaf, output, spec, properties }
    }
}

impl DisplayAs for LeafScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LeafScanExec: collection={} shards={} access_path={}",
            self.info.name,
            self.info.shards,
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

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let request = ScanRequest {
            collection_id: self.info.id,
            shard: partition as u32,
            columns: self.spec.columns.clone(),
            filters: self.spec.filters.clone(),
            limit: self.spec.limit,
            hint: Some(self.spec.access),
        };
        let leaf = self.leaf.clone();
        let output = self.output.clone();
        let drop_columns = output.fields().is_empty();
        let stream = futures::stream::once(async move { leaf.scan(request).await })
            .try_flatten()
            .map_err(to_df_error)
            .and_then(move |batch: RecordBatch| {
                let output = output.clone();
                async move {
                    // Re-wrap under the planned schema (nullability and metadata as planned).
                    let columns = if drop_columns { vec![] } else { batch.columns().to_vec() };
                    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                    Ok(RecordBatch::try_new_with_options(output, columns, &options)?)
                }
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.output.clone(), stream)))
    }
}
