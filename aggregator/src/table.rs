//! A collection as a DataFusion table: its schema comes from the leaves' smart-schema
//! statistics; scans run on leaves, one partition per shard, with projection, exact filters
//! and limit pushed down.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use basalt_common::api::{CollectionInfo, Leaf};
use basalt_common::doc::ID_FIELD;
use basalt_common::filter::{AccessPath, Filter, choose_access_path};
use basalt_common::schema::{ColumnType, SchemaStats};
use basalt_fragment::{LeafScanExec, ScanSpec};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use crate::translate::translate;

pub use basalt_fragment::{table_schema, to_df_error};

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
        let output_columns: Vec<(String, ColumnType)> = indices.iter().map(|i| self.columns[*i].clone()).collect();
        let mut columns = output_columns.clone();
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
        let shards = (0..self.info.shards).collect();
        let (name, id) = (self.info.name.to_string(), self.info.id);
        Ok(Arc::new(LeafScanExec::new(name, id, shards, self.leaf.clone(), output_columns, spec)))
    }
}
