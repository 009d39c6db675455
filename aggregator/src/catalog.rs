//! Workspaces and collections as DataFusion schemas and tables. Names and collection metadata
//! come from a snapshot of the metadata store refreshed before each statement; a table's
//! schema comes from the leaves' statistics, fetched for every table a statement names at once
//! before it is planned ([`BasaltCatalog::prefetch`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use basalt_common::api::{CollectionInfo, CollectionName, Leaf, Meta};
use basalt_common::filter::AccessPath;
use basalt_common::schema::SchemaStats;
use basalt_common::{ErrorCode, Result as BResult};
use datafusion::catalog::{CatalogProvider, SchemaProvider, TableProvider};
use datafusion::common::{DataFusionError, Result};
use parking_lot::{Mutex, RwLock};

use crate::table::{CollectionTable, to_df_error};

pub const CATALOG: &str = "basalt";

/// Workspace -> collection names and each collection's metadata, as of the last refresh, and
/// the statistics fetched for the statement being planned.
#[derive(Debug, Default)]
pub struct Names {
    names: RwLock<BTreeMap<String, Vec<String>>>,
    infos: RwLock<HashMap<CollectionName, CollectionInfo>>,
    /// Planner statistics by collection id and whether they carry sketches, fetched for one
    /// statement by [`BasaltCatalog::prefetch`] and dropped when its planning ends.
    prefetched: Mutex<HashMap<(u64, bool), SchemaStats>>,
}

/// Per-session planning options the engine sets before each statement.
#[derive(Debug)]
pub struct PlanOptions {
    /// Forced access path (`SET basalt.access_path`).
    pub hint: Option<AccessPath>,
    /// The statement reads `score()`: tables expose `_score`.
    pub with_score: bool,
    /// Per-shard work runs on the leaves as plan fragments (`SET basalt.fragments = off` runs
    /// it on the aggregator, for comparison).
    pub fragments: bool,
    /// Inner joins are ordered from leaf statistics (`SET basalt.join_order = off` keeps the
    /// order the query names them in, for comparison).
    pub join_order: bool,
    /// Hash joins with a small build side run on the leaves with the build side's rows sent
    /// to them (`SET basalt.broadcast = off` joins on the aggregator, for comparison).
    pub broadcast: bool,
    /// The statement names more than one table: tables carry the leaves' distinct-value
    /// sketches for join planning (a one-table statement never reads them, and computing them
    /// reads every value of a collection that changed by a tenth).
    pub planner_stats: bool,
    /// What the planning statement's hints (`/*+ ... */`) change for it alone; set before each
    /// statement is planned.
    pub statement: basalt_sql::Hints,
}

impl PlanOptions {
    /// Whether per-shard work runs on the leaves for the statement being planned.
    pub fn fragments(&self) -> bool {
        self.statement.fragments.unwrap_or(self.fragments)
    }

    /// Whether inner joins are reordered for the statement being planned.
    pub fn join_order(&self) -> bool {
        self.statement.join_order.unwrap_or(self.join_order)
    }

    /// Whether small build sides are broadcast to the leaves for the statement being planned.
    pub fn broadcast(&self) -> bool {
        self.statement.broadcast.unwrap_or(self.broadcast)
    }

    /// The forced access path for one collection: its own hint, else the statement's
    /// `Set(basalt.access_path ...)`, else the session's.
    pub fn access_path(&self, collection: &CollectionName) -> Option<AccessPath> {
        match self.statement.access_paths.iter().find(|(c, _)| c == collection) {
            Some((_, path)) => Some(*path),
            None => self.statement.access_path.unwrap_or(self.hint),
        }
    }
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            hint: None,
            with_score: false,
            fragments: true,
            join_order: true,
            broadcast: true,
            planner_stats: true,
            statement: basalt_sql::Hints::default(),
        }
    }
}

/// The last physical optimizer pass: per-shard work above leaf scans becomes fragments that
/// run on the leaves (`basalt_fragment::push_fragments`).
#[derive(Debug)]
pub struct PushFragments {
    pub options: Arc<RwLock<PlanOptions>>,
}

impl datafusion::physical_optimizer::PhysicalOptimizerRule for PushFragments {
    fn optimize(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        config: &datafusion::config::ConfigOptions,
    ) -> datafusion::common::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        // Key sets first: a probe scan that then moves into a fragment keeps its link.
        let plan = basalt_fragment::keys::share_build_keys(plan, config)?;
        if !self.options.read().fragments() {
            return Ok(plan);
        }
        let broadcast = self.options.read().broadcast();
        basalt_fragment::push_fragments(plan, broadcast)
    }

    fn name(&self) -> &str {
        "basalt_push_fragments"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[derive(Debug)]
pub struct BasaltCatalog {
    names: Arc<Names>,
    meta: Meta,
    leaf: Leaf,
    options: Arc<RwLock<PlanOptions>>,
    /// Schemas a session adds (`pg_catalog`); never workspaces.
    extra: RwLock<BTreeMap<String, Arc<dyn SchemaProvider>>>,
}

impl BasaltCatalog {
    pub fn new(meta: Meta, leaf: Leaf, options: Arc<RwLock<PlanOptions>>) -> Self {
        Self { names: Arc::new(Names::default()), meta, leaf, options, extra: RwLock::new(BTreeMap::new()) }
    }

    pub async fn refresh(&self) -> BResult<()> {
        let (workspaces, collections) =
            futures::future::try_join(self.meta.list_workspaces(), self.meta.list_collections(None)).await?;
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ws in workspaces {
            map.entry(ws).or_default();
        }
        let mut infos = HashMap::with_capacity(collections.len());
        for c in collections {
            map.entry(c.name.workspace.clone()).or_default().push(c.name.name.clone());
            infos.insert(c.name.clone(), c);
        }
        *self.names.names.write() = map;
        *self.names.infos.write() = infos;
        Ok(())
    }

    /// Fetch the planner statistics of the named collections from the leaves all at once:
    /// DataFusion resolves a statement's tables one after another, and with leaf processes
    /// each is a round trip (TPC-H q2 names five collections). Names that are not collections
    /// (CTEs, `pg_catalog`) are skipped; a failed fetch is left for [`SchemaProvider::table`]
    /// to retry and report.
    pub async fn prefetch(&self, tables: &[CollectionName], sketches: bool) {
        let wanted: Vec<CollectionInfo> = {
            let infos = self.names.infos.read();
            let mut ids = std::collections::HashSet::new();
            tables.iter().filter_map(|t| infos.get(t)).filter(|i| ids.insert(i.id)).cloned().collect()
        };
        let calls = wanted.iter().map(|info| self.leaf.planner_stats(info.id, (0..info.shards).collect(), sketches));
        let fetched = futures::future::join_all(calls).await;
        let mut prefetched = self.names.prefetched.lock();
        prefetched.clear();
        for (info, stats) in wanted.iter().zip(fetched) {
            if let Ok(stats) = stats {
                prefetched.insert((info.id, sketches), stats);
            }
        }
    }

    /// Drop what [`BasaltCatalog::prefetch`] fetched and the refresh's metadata: outside a
    /// statement's planning a table is looked up afresh.
    pub fn end_prefetch(&self) {
        self.names.prefetched.lock().clear();
        self.names.infos.write().clear();
    }
}

impl CatalogProvider for BasaltCatalog {
    fn schema_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.names.names.read().keys().cloned().collect();
        names.extend(self.extra.read().keys().cloned());
        names
    }

    fn register_schema(&self, name: &str, schema: Arc<dyn SchemaProvider>) -> Result<Option<Arc<dyn SchemaProvider>>> {
        if self.names.names.read().contains_key(name) {
            return Err(DataFusionError::Plan(format!("{name} is a workspace")));
        }
        Ok(self.extra.write().insert(name.to_string(), schema))
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if let Some(extra) = self.extra.read().get(name) {
            return Some(extra.clone());
        }
        self.names.names.read().contains_key(name).then(|| {
            Arc::new(Workspace {
                name: name.to_string(),
                names: self.names.clone(),
                meta: self.meta.clone(),
                leaf: self.leaf.clone(),
                options: self.options.clone(),
            }) as Arc<dyn SchemaProvider>
        })
    }
}

#[derive(Debug)]
struct Workspace {
    name: String,
    names: Arc<Names>,
    meta: Meta,
    leaf: Leaf,
    options: Arc<RwLock<PlanOptions>>,
}

#[async_trait]
impl SchemaProvider for Workspace {
    fn table_names(&self) -> Vec<String> {
        self.names.names.read().get(&self.name).cloned().unwrap_or_default()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let collection = CollectionName::new(&self.name, name);
        let known = self.names.infos.read().get(&collection).cloned();
        let info = match known {
            Some(info) => info,
            None => match self.meta.get_collection(collection.clone()).await {
                Ok(info) => info,
                Err(e) if e.code == ErrorCode::NotFound => return Ok(None),
                Err(e) => return Err(to_df_error(e)),
            },
        };
        let (hint, with_score, planner_stats) = {
            let o = self.options.read();
            (o.access_path(&collection), o.with_score, o.planner_stats)
        };
        // Sketches for statements that join (see `Options::planner_stats`).
        let prefetched = self.names.prefetched.lock().get(&(info.id, planner_stats)).cloned();
        let stats = match prefetched {
            Some(stats) => stats,
            None => {
                let shards = (0..info.shards).collect();
                self.leaf.planner_stats(info.id, shards, planner_stats).await.map_err(to_df_error)?
            }
        };
        Ok(Some(Arc::new(CollectionTable::new(info, stats, self.leaf.clone(), hint, with_score))))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.names.names.read().get(&self.name).is_some_and(|v| v.iter().any(|n| n == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_hints_override_the_session_for_one_statement() {
        let mut options = PlanOptions { hint: Some(AccessPath::RowLookup), ..PlanOptions::default() };
        options.statement = basalt_sql::Hints {
            access_paths: vec![(CollectionName::new("commons", "a"), AccessPath::SearchIndex)],
            access_path: Some(Some(AccessPath::ColumnScan)),
            fragments: Some(false),
            join_order: None,
            broadcast: Some(false),
        };
        // A collection's own hint, then the statement's setting, then the session's.
        assert_eq!(options.access_path(&CollectionName::new("commons", "a")), Some(AccessPath::SearchIndex));
        assert_eq!(options.access_path(&CollectionName::new("commons", "b")), Some(AccessPath::ColumnScan));
        assert!(!options.fragments());
        assert!(options.join_order());
        assert!(!options.broadcast() && options.broadcast);
        // `Set(basalt.access_path auto)` clears the session's path for the statement.
        options.statement = basalt_sql::Hints { access_path: Some(None), ..Default::default() };
        assert_eq!(options.access_path(&CollectionName::new("commons", "b")), None);
        assert!(options.fragments());
        // The next statement without hints sees the session's settings again.
        options.statement = basalt_sql::Hints::default();
        assert_eq!(options.access_path(&CollectionName::new("commons", "a")), Some(AccessPath::RowLookup));
    }
}
