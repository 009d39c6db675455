//! A collection as a DataFusion table: its schema comes from the leaves' smart-schema
//! statistics; scans run on leaves, one partition per shard, with projection, exact filters
//! and limit pushed down.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use basalt_common::api::{CollectionInfo, Leaf};
use basalt_common::doc::EVENT_TIME_FIELD;
use basalt_common::filter::{AccessPath, Filter, choose_access_path};
use basalt_common::schema::{ColumnType, SchemaStats};
use basalt_fragment::{LeafScanExec, ScanEstimate, ScanSpec};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, DataFusionError, Result};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use crate::translate::translate;

pub use basalt_fragment::{plan_schema, table_schema, to_df_error};

pub use basalt_fragment::{ESTIMATE_MIN_DOCS, INDEX_SELECTIVITY};

/// Text search needs the index (the column store's fallback tokenizes every value).
fn contains_search_filter(filters: &[Filter]) -> bool {
    filters.iter().any(basalt_common::filter::contains_search)
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
        let schema = plan_schema(&columns);
        Self { info, stats, columns, schema, leaf, hint }
    }

    /// The collection's statistics as the leaves reported them (with distinct-value sketches).
    pub fn stats(&self) -> &SchemaStats {
        &self.stats
    }

    /// What a scan with these filters returns: documents times the filters' selectivity (see
    /// [`crate::joins::filter_selectivity`]), capped by the limit; distinct values per column.
    fn estimate(&self, columns: &[(String, ColumnType)], filters: &[Expr], limit: Option<usize>) -> ScanEstimate {
        let distinct_of = |c: &Column| self.stats.distinct_values(&c.name).map(|d| d as f64);
        let mut rows = self.stats.doc_count as f64;
        for f in filters {
            rows *= crate::joins::filter_selectivity(f, &distinct_of);
        }
        if let Some(n) = limit {
            rows = rows.min(n as f64);
        }
        let rows = rows.ceil() as u64;
        let distinct = columns.iter().map(|(name, _)| self.stats.distinct_values(name).map(|d| d.min(rows))).collect();
        ScanEstimate { rows, distinct }
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
        // A scan with no columns (count(*)) still needs rows: fetch the narrowest column every
        // document has, `_event_time` (8 bytes a row; a row counts whatever its value), and drop
        // it. Fetching and filtering `_id` strings made `count(*) WHERE ...` 2x slower.
        if columns.is_empty() {
            columns.push((EVENT_TIME_FIELD.to_string(), ColumnType::Timestamp));
        }
        let exprs = filters;
        let filters = filters
            .iter()
            .map(|f| {
                translate(f, &self.schema).ok_or_else(|| {
                    DataFusionError::Internal(format!("filter {f} was accepted for pushdown but does not translate"))
                })
            })
            .collect::<Result<Vec<Filter>>>()?;
        let mut access = choose_access_path(&filters, self.hint, &self.stats);
        let mut index_matches = None;
        // The index pays off for selective filters only: ask the leaves how many documents it
        // would find (posting counts, no documents read) unless an expert forced the path.
        if access == AccessPath::SearchIndex && self.hint.is_none() {
            let shards = (0..self.info.shards).collect();
            let estimate = self.leaf.estimate(self.info.id, shards, filters.clone()).await.map_err(to_df_error)?;
            if let Some(matches) = estimate.index_matches {
                index_matches = Some((matches, estimate.live_docs));
                let broad = matches as f64 > INDEX_SELECTIVITY * estimate.live_docs as f64;
                if broad && estimate.live_docs >= ESTIMATE_MIN_DOCS && !contains_search_filter(&filters) {
                    access = AccessPath::ColumnScan;
                }
            }
        }
        let estimate = Some(self.estimate(&output_columns, exprs, limit));
        // The first integer or timestamp column every shard holds in ascending order.
        let ordered_by = output_columns
            .iter()
            .find(|(name, ty)| {
                matches!(ty, ColumnType::Int64 | ColumnType::Timestamp) && self.stats.ascending_everywhere(name)
            })
            .map(|(name, _)| name.clone());
        let spec = ScanSpec {
            columns,
            filters,
            limit,
            access,
            index_matches,
            estimate,
            forced: self.hint.is_some(),
            ordered_by,
        };
        let shards = (0..self.info.shards).collect();
        let (name, id) = (self.info.name.to_string(), self.info.id);
        Ok(Arc::new(LeafScanExec::new(name, id, shards, self.leaf.clone(), output_columns, spec)))
    }
}
