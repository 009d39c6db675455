//! Statement execution. A [`Session`] (one per client connection) turns each SQL statement into
//! either a result stream planned by DataFusion or a Basalt command (DDL, DESCRIBE, field-level
//! writes through the tailer).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, RecordBatch, StringArray, UInt64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use basalt_common::api::{CollectionName, Leaf, Meta, Tailer, WriteInput, WriteRequest, WriteResponse};
use basalt_common::doc::{ID_FIELD, PatchKind, PatchOp, sql_path_to_pointer};
use basalt_common::filter::AccessPath;
use basalt_common::{BasaltError, Result};
use basalt_sql::BasaltStatement;
use basalt_sql::sqlparser::ast::{Expr, Set, Statement};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use futures::TryStreamExt;
use parking_lot::RwLock;

use crate::catalog::{BasaltCatalog, CATALOG, PlanOptions};
use crate::udf::{approx_distinct_merge_udaf, search_udf};

/// Rows sent to the tailer per write call when a statement writes many documents.
const WRITE_CHUNK_DOCS: usize = 5_000;

pub enum Output {
    Rows(SendableRecordBatchStream),
    /// A command tag (`INSERT`, `UPDATE`, ...) and the rows it affected.
    Command {
        tag: &'static str,
        rows: usize,
    },
}

/// What a prepared statement takes and returns, for the extended query protocol.
#[derive(Debug, Clone, Default)]
pub struct Described {
    pub params: Vec<Option<DataType>>,
    pub output: Option<SchemaRef>,
}

/// Add one to a labelled counter (registered once per process; absent if registering failed).
pub(crate) fn count(counter: &Option<prometheus::IntCounterVec>, label: &str) {
    if let Some(c) = counter {
        c.with_label_values(&[label]).inc();
    }
}

impl Described {
    /// A query plan's parameter types (`$1`, `$2`, ...) and result schema.
    pub fn of_plan(plan: &LogicalPlan) -> Result<Self> {
        let types = plan.get_parameter_types().map_err(from_df)?;
        let params = (1..=types.len()).map(|i| types.get(&format!("${i}")).cloned().flatten()).collect();
        Ok(Self { params, output: Some(Arc::new(plan.schema().as_arrow().clone())) })
    }
}

/// The tiers an aggregator talks to.
pub struct Engine {
    pub meta: Meta,
    pub tailer: Tailer,
    pub leaf: Leaf,
}

/// Build-side keys a hash join sends to the leaves as a list (DataFusion's default is 150).
pub(crate) const RUNTIME_IN_LIST_MAX: usize = 4096;

/// Bytes of build-side key columns (every row, duplicates too) up to which a hash join makes
/// its list (DataFusion's default is 128 KiB). A semi join's build side repeats keys: TPC-H
/// q17 at SF 10 builds 30,000 rows per partition over 1,000 distinct parts (240 KB), and
/// without the list its probe side sent all 60M `lineitem` rows to the aggregator.
pub(crate) const RUNTIME_IN_LIST_BUILD_BYTES: usize = 1 << 20;

impl Engine {
    pub fn new(meta: Meta, tailer: Tailer, leaf: Leaf) -> Arc<Self> {
        Arc::new(Self { meta, tailer, leaf })
    }

    pub fn session(self: &Arc<Self>) -> Session {
        let options = Arc::new(RwLock::new(PlanOptions::default()));
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, basalt_common::api::DEFAULT_WORKSPACE)
            .with_information_schema(true)
            .with_create_default_catalog_and_schema(false);
        // Field names are case-sensitive JSON keys: keep identifiers as written.
        config.options_mut().sql_parser.enable_ident_normalization = false;
        // Numeric literals are exact, as in PostgreSQL: `0.06 + 0.01` is 0.07, not 0.0699...
        config.options_mut().sql_parser.parse_float_as_decimal = true;
        // EXPLAIN shows the plan that runs (with leaf access paths), not the logical plan.
        config.options_mut().explain.physical_plan_only = true;
        // A hash join whose build side has up to this many keys hands them to the probe side's
        // scan as a list, which the leaves apply before sending rows (see `LeafScanExec`).
        config.options_mut().optimizer.hash_join_inlist_pushdown_max_distinct_values = RUNTIME_IN_LIST_MAX;
        config.options_mut().optimizer.hash_join_inlist_pushdown_max_size = RUNTIME_IN_LIST_BUILD_BYTES;
        // Two passes of the logical optimizer, not three: the 22 TPC-H and 26 SSB queries plan
        // the same (a third pass changed none of them) and planning, most of a short query's
        // time, takes about half a millisecond less.
        config.options_mut().optimizer.max_passes = 2;
        let pool = Arc::new(crate::limits::SessionPool::new(crate::limits::DEFAULT_MEMORY_LIMIT));
        let runtime = match datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(pool.clone())
            .build_arc()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the session runtime; statements run without a memory limit");
                Default::default()
            }
        };
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(crate::catalog::PushFragments { options: options.clone() }))
            .with_physical_optimizer_rule(Arc::new(crate::limits::YieldInAmplifiers))
            .with_physical_optimizer_rule(Arc::new(crate::shared::ShareCommonAggregates))
            .with_optimizer_rules(optimizer_rules(options.clone()))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let catalog = Arc::new(BasaltCatalog::new(self.meta.clone(), self.leaf.clone(), options.clone()));
        ctx.register_catalog(CATALOG, catalog.clone());
        ctx.register_udf(search_udf());
        ctx.register_udaf(approx_distinct_merge_udaf());
        crate::compat::register_functions(&ctx);
        Session {
            engine: self.clone(),
            ctx,
            catalog,
            options,
            pg_catalog: std::sync::OnceLock::new(),
            pool,
            canceler: crate::limits::Canceler::default(),
            timeout: RwLock::new(None),
            plans: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// DataFusion's logical optimizer rules, with join ordering from leaf statistics right after
/// filters are pushed into scans (the estimates read the scans' filters), then aggregates below
/// joins where that pays (see [`crate::eager`]), and comparisons of
/// floats with decimals as floats right before (see [`crate::floats`]); calendar fields of dates
/// stored as text last (see [`crate::textdates`]).
fn optimizer_rules(
    options: Arc<RwLock<PlanOptions>>,
) -> Vec<Arc<dyn datafusion::optimizer::OptimizerRule + Send + Sync>> {
    let mut rules = datafusion::optimizer::Optimizer::new().rules;
    let at = rules.iter().position(|r| r.name() == "push_down_filter").map_or(rules.len(), |i| i + 1);
    rules.insert(at, Arc::new(crate::joins::ReorderJoins { options: options.clone() }));
    // Aggregates below joins once the joins are ordered (it estimates the joins' sides).
    rules.insert(at + 1, Arc::new(crate::eager::EagerAggregates { options }));
    // Float-with-decimal comparisons as floats before filters are pushed into scans (so the
    // scans get them), after literals are folded (`0.06 - 0.01`).
    let at = rules.iter().position(|r| r.name() == "push_down_filter").unwrap_or(0);
    rules.insert(at, Arc::new(crate::floats::FloatComparisons));
    // Last: after simplification, so the rewritten calls are the final ones.
    rules.push(Arc::new(crate::textdates::TextDateParts::default()));
    rules
}

pub struct Session {
    engine: Arc<Engine>,
    ctx: SessionContext,
    catalog: Arc<BasaltCatalog>,
    options: Arc<RwLock<PlanOptions>>,
    /// Set once `pg_catalog` is installed (on the first statement that names it).
    pg_catalog: std::sync::OnceLock<()>,
    /// Memory the session's statement may hold (`SET basalt.memory_limit`).
    pool: Arc<crate::limits::SessionPool>,
    /// Stops the running statement (the pgwire cancel request).
    canceler: crate::limits::Canceler,
    /// `SET statement_timeout`.
    timeout: RwLock<Option<std::time::Duration>>,
    /// Statements planned so far (see [`Session::plans_made`]).
    plans: std::sync::atomic::AtomicU64,
}

pub use basalt_fragment::from_df;

fn command(tag: &'static str, rows: usize) -> Output {
    Output::Command { tag, rows }
}

fn rows_output(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Output> {
    let stream = MemoryStream::try_new(batches, schema, None).map_err(from_df)?;
    Ok(Output::Rows(Box::pin(stream)))
}

/// `SELECT <items> FROM ws.c [alias] [WHERE selection]`, built as text and parsed back so the
/// statement is exactly what a user could have written.
fn select_query(
    name: &CollectionName,
    alias: Option<&str>,
    items: &[String],
    selection: Option<&Expr>,
) -> Result<Statement> {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut sql = format!("SELECT {} FROM {}.{}", items.join(", "), quote(&name.workspace), quote(&name.name));
    if let Some(a) = alias {
        sql.push_str(&format!(" AS {}", quote(a)));
    }
    if let Some(sel) = selection {
        sql.push_str(&format!(" WHERE {sel}"));
    }
    match basalt_sql::parse(&sql)?.pop() {
        Some(BasaltStatement::Query(q)) => Ok(*q),
        _ => Err(BasaltError::internal(format!("generated query did not parse as a query: {sql}"))),
    }
}

impl Session {
    /// Run every statement of a SQL string.
    /// The statements of a SQL text. A text that names the Postgres catalog (a tool's catalog
    /// query) first gets `pg_catalog` installed and goes through its parser's rewrites.
    pub fn parse(&self, sql: &str) -> Result<Vec<BasaltStatement>> {
        if sql.len() <= basalt_sql::SQL_BYTES_MAX && crate::compat::names_the_catalog(sql) {
            if self.pg_catalog.get().is_none() {
                crate::compat::setup(&self.ctx, CATALOG)?;
                let _ = self.pg_catalog.set(());
            }
            if let Some(statements) = crate::compat::parse_catalog_query(sql) {
                return Ok(statements);
            }
        }
        basalt_sql::parse(sql)
    }

    pub async fn execute_sql(&self, sql: &str, params: &[ScalarValue]) -> Result<Vec<Output>> {
        let statements = self.parse(sql)?;
        let mut out = Vec::with_capacity(statements.len());
        for stmt in statements {
            out.push(self.execute(stmt, params).await?);
        }
        Ok(out)
    }

    async fn plan(&self, stmt: Statement, params: &[ScalarValue]) -> Result<LogicalPlan> {
        self.plans.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.catalog.refresh().await?;
        let with_score = basalt_sql::uses_score(&stmt);
        let statement = basalt_sql::statement_hints(&stmt)?;
        let state = self.ctx.state();
        let stmt = DfStatement::Statement(Box::new(stmt));
        let references = state.resolve_table_references(&stmt).map_err(from_df)?;
        let tables = references.len();
        {
            // Hints hold for this statement's planning (logical and physical); the next
            // statement's planning replaces them.
            let mut options = self.options.write();
            options.with_score = with_score;
            options.planner_stats = tables > 1;
            options.statement = statement;
        }
        let collections: Vec<CollectionName> = {
            let defaults = &state.config_options().catalog;
            references
                .into_iter()
                .map(|r| r.resolve(&defaults.default_catalog, &defaults.default_schema))
                .filter(|r| &*r.catalog == CATALOG)
                .map(|r| CollectionName::new(&*r.schema, &*r.table))
                .collect()
        };
        self.catalog.prefetch(&collections, tables > 1).await;
        let plan = state.statement_to_plan(stmt).await;
        self.catalog.end_prefetch();
        let plan = plan.map_err(from_df)?;
        let options = datafusion::execution::context::SQLOptions::new().with_allow_ddl(false).with_allow_dml(false);
        options.verify_plan(&plan).map_err(from_df)?;
        let plan = text_for_clients(plan)?;
        self.bind(plan, params)
    }

    /// How many statements this session has planned: a plan kept from an earlier call runs as
    /// planned only while this has not moved (planning sets the statement's hints on the session,
    /// which its physical planning reads).
    pub fn plans_made(&self) -> u64 {
        self.plans.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A plan with its parameters (`$1`, `$2`, ...) given values, cast to the types the plan
    /// inferred for them.
    pub fn bind(&self, plan: LogicalPlan, params: &[ScalarValue]) -> Result<LogicalPlan> {
        if params.is_empty() {
            return Ok(plan);
        }
        let types = plan.get_parameter_types().map_err(from_df)?;
        let mut values = Vec::with_capacity(params.len());
        for (i, v) in params.iter().enumerate() {
            let want = types.get(&format!("${}", i + 1)).cloned().flatten();
            values.push(match want {
                Some(t) if v.data_type() != t && !v.is_null() => v.cast_to(&t).map_err(|e| {
                    BasaltError::invalid(format!("parameter ${} cannot be used as {t}: {}", i + 1, e.find_root()))
                })?,
                Some(t) if v.is_null() => ScalarValue::try_from(&t).map_err(from_df)?,
                _ => v.clone(),
            });
        }
        plan.with_param_values(ParamValues::List(values.into_iter().map(Into::into).collect())).map_err(from_df)
    }

    async fn query(&self, stmt: Statement, params: &[ScalarValue]) -> Result<SendableRecordBatchStream> {
        let plan = self.plan(stmt, params).await?;
        self.run_plan(plan).await
    }

    /// The logical plan of a statement that would run as a general query (not a point lookup,
    /// a session command or a write), with its parameters bound: what
    /// [`Session::execute_plan`] runs later in this session. `None` for other statements.
    /// Planning applies the statement's hints to the session until its next statement.
    pub async fn plan_query(&self, stmt: &BasaltStatement, params: &[ScalarValue]) -> Result<Option<LogicalPlan>> {
        let BasaltStatement::Query(q) = stmt else { return Ok(None) };
        if !matches!(**q, Statement::Query(_)) || crate::fastpath::match_point_lookup(q).is_some() {
            return Ok(None);
        }
        Ok(Some(self.plan((**q).clone(), params).await?))
    }

    /// What a statement takes and returns (as [`Session::describe`]) and, for a general query,
    /// its plan with `params` bound (as [`Session::plan_query`]), planned once for both.
    pub async fn prepare(
        &self,
        stmt: &BasaltStatement,
        params: &[ScalarValue],
    ) -> Result<(Described, Option<LogicalPlan>)> {
        match self.plan_query(stmt, params).await? {
            Some(plan) => Ok((Described::of_plan(&plan)?, Some(plan))),
            None => Ok((self.describe(stmt).await?, None)),
        }
    }

    /// Run a plan from [`Session::plan_query`] within the session's timeout, stoppable by a
    /// cancel.
    pub async fn execute_plan(&self, plan: LogicalPlan) -> Result<Output> {
        let stop = self.canceler.stop_signal(*self.timeout.read());
        let stream = stop.run(Box::pin(self.run_plan(plan))).await?;
        Ok(Output::Rows(stop.guard(stream)))
    }

    async fn run_plan(&self, plan: LogicalPlan) -> Result<SendableRecordBatchStream> {
        let plan = crate::subqueries::inline_not_in(&self.ctx, plan).await.map_err(from_df)?;
        let df = self.ctx.execute_logical_plan(plan).await.map_err(from_df)?;
        let task = Arc::new(df.task_ctx());
        let physical = in_one_ordered_stream(df.create_physical_plan().await.map_err(from_df)?);
        datafusion::physical_plan::execute_stream(physical, task).map_err(from_df)
    }

    async fn collect(&self, stmt: Statement, params: &[ScalarValue]) -> Result<Vec<RecordBatch>> {
        self.query(stmt, params).await?.try_collect().await.map_err(from_df)
    }

    /// Parameter and result types of a statement, without running it.
    pub async fn describe(&self, stmt: &BasaltStatement) -> Result<Described> {
        if let BasaltStatement::Query(q) = stmt
            && let Statement::ShowVariable { variable } = &**q
            && let Some((name, value)) = self.show(variable)
        {
            let (schema, _) = crate::compat::setting_batch(&name, value)?;
            return Ok(Described { params: vec![], output: Some(schema) });
        }
        let planned = match stmt {
            BasaltStatement::Query(q) => Some(((**q).clone(), true)),
            BasaltStatement::Insert { source, .. } => Some((Statement::Query(source.clone()), false)),
            BasaltStatement::Update { .. } | BasaltStatement::Delete { .. } => Some((self.write_query(stmt)?, false)),
            _ => None,
        };
        let mut described = Described::default();
        if let Some((s, returns_rows)) = planned {
            if !returns_rows_statement(&s) {
                return Ok(described);
            }
            let plan = self.plan(s, &[]).await?;
            described = Described::of_plan(&plan)?;
            if !returns_rows {
                described.output = None;
            }
        } else if let Some(schema) = command_schema(stmt) {
            described.output = Some(schema);
        }
        Ok(described)
    }

    /// The SELECT an UPDATE or DELETE runs to find its documents (and new values).
    fn write_query(&self, stmt: &BasaltStatement) -> Result<Statement> {
        let id = ID_FIELD.to_string();
        match stmt {
            BasaltStatement::Update { name, alias, assignments, selection } => {
                let mut items = vec![id];
                for (i, (_, e)) in assignments.iter().enumerate() {
                    items.push(format!("({e}) AS v{i}"));
                }
                select_query(name, alias.as_deref(), &items, selection.as_ref())
            }
            BasaltStatement::Delete { name, alias, selection } => {
                select_query(name, alias.as_deref(), &[id], selection.as_ref())
            }
            _ => Err(BasaltError::internal("not a write statement")),
        }
    }

    /// `statement_timeout` for the session's next statements.
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) {
        *self.timeout.write() = timeout;
    }

    /// What cancels this session's running statement.
    pub fn canceler(&self) -> crate::limits::Canceler {
        self.canceler.clone()
    }

    /// Run a statement within the session's timeout, stoppable by a cancel, while it plans
    /// and while its result streams.
    pub async fn execute(&self, stmt: BasaltStatement, params: &[ScalarValue]) -> Result<Output> {
        let stop = self.canceler.stop_signal(*self.timeout.read());
        // Boxed: planning futures are large, and select! would hold this one on the stack.
        match stop.run(Box::pin(self.execute_unguarded(stmt, params))).await? {
            Output::Rows(stream) => Ok(Output::Rows(stop.guard(stream))),
            command => Ok(command),
        }
    }

    async fn execute_unguarded(&self, stmt: BasaltStatement, params: &[ScalarValue]) -> Result<Output> {
        let engine = &self.engine;
        match stmt {
            BasaltStatement::CreateWorkspace { name, if_not_exists } => {
                engine.meta.create_workspace(name, if_not_exists).await?;
                Ok(command("CREATE WORKSPACE", 0))
            }
            BasaltStatement::CreateCollection { name, shards, if_not_exists } => {
                engine.meta.create_collection(name, shards, if_not_exists).await?;
                Ok(command("CREATE COLLECTION", 0))
            }
            BasaltStatement::DropCollection { name, if_exists } => {
                if let Some(info) = engine.meta.drop_collection(name, if_exists).await? {
                    engine.leaf.drop_collection(info.id).await?;
                }
                Ok(command("DROP COLLECTION", 0))
            }
            BasaltStatement::ShowWorkspaces => {
                let names = engine.meta.list_workspaces().await?;
                let schema = show_workspaces_schema();
                let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(names)) as ArrayRef])?;
                rows_output(schema, vec![batch])
            }
            BasaltStatement::ShowCollections { workspace } => self.show_collections(workspace).await,
            BasaltStatement::CreateSource { name, collection, spec, if_not_exists } => {
                engine.meta.create_source(name, collection, spec, if_not_exists).await?;
                Ok(command("CREATE SOURCE", 0))
            }
            BasaltStatement::DropSource { name, if_exists } => {
                engine.meta.drop_source(name, if_exists).await?;
                Ok(command("DROP SOURCE", 0))
            }
            BasaltStatement::ShowSources => self.show_sources().await,
            BasaltStatement::CreateRollup { name, shards, source, sql, if_not_exists } => {
                engine.meta.create_rollup(name, shards, source, sql, if_not_exists).await?;
                Ok(command("CREATE COLLECTION", 0))
            }
            BasaltStatement::Describe { name } => self.describe_collection(name).await,
            BasaltStatement::Insert { name, source } => {
                let batches = self.collect(Statement::Query(source), params).await?;
                let inputs = batches_to_documents(&batches)?;
                let written = self.write(name, inputs).await?;
                Ok(command("INSERT", written))
            }
            BasaltStatement::Update { ref name, ref assignments, .. } => {
                let pointers = assignments.iter().map(|(p, _)| sql_path_to_pointer(p)).collect::<Result<Vec<_>>>()?;
                let name = name.clone();
                let batches = self.collect(self.write_query(&stmt)?, params).await?;
                let mut inputs = Vec::new();
                for row in batches_to_json(&batches)? {
                    let Some(id) = row.get(ID_FIELD).and_then(|v| v.as_str()).map(str::to_string) else { continue };
                    let ops = pointers
                        .iter()
                        .enumerate()
                        .map(|(i, path)| PatchOp {
                            op: PatchKind::Add,
                            path: path.clone(),
                            value: Some(row.get(&format!("v{i}")).cloned().unwrap_or(serde_json::Value::Null)),
                        })
                        .collect();
                    inputs.push(WriteInput::Patch { id, ops, upsert: false });
                }
                let written = self.write(name, inputs).await?;
                Ok(command("UPDATE", written))
            }
            BasaltStatement::Delete { ref name, .. } => {
                let name = name.clone();
                let batches = self.collect(self.write_query(&stmt)?, params).await?;
                let mut inputs = Vec::new();
                for b in &batches {
                    let ids = cast(b.column(0), &DataType::Utf8)?;
                    for id in ids.as_string::<i32>().iter().flatten() {
                        inputs.push(WriteInput::Delete { id: id.to_string() });
                    }
                }
                let written = self.write(name, inputs).await?;
                Ok(command("DELETE", written))
            }
            BasaltStatement::Query(stmt) => self.execute_query(*stmt, params).await,
        }
    }

    async fn execute_query(&self, stmt: Statement, params: &[ScalarValue]) -> Result<Output> {
        match &stmt {
            Statement::StartTransaction { .. } => return Ok(command("BEGIN", 0)),
            Statement::Commit { .. } => return Ok(command("COMMIT", 0)),
            Statement::Rollback { savepoint: Some(_), .. } => return Ok(command("ROLLBACK TO", 0)),
            Statement::Rollback { .. } => return Ok(command("ROLLBACK", 0)),
            // Statements apply one by one (no multi-statement transactions); savepoints, which
            // drivers wrap their own catalog queries in, are accepted like BEGIN and COMMIT.
            Statement::Savepoint { .. } => return Ok(command("SAVEPOINT", 0)),
            Statement::ReleaseSavepoint { .. } => return Ok(command("RELEASE", 0)),
            Statement::Set(set) => return self.set(set),
            Statement::ShowVariable { variable } => {
                if let Some((name, value)) = self.show(variable) {
                    let (schema, batch) = crate::compat::setting_batch(&name, value)?;
                    return rows_output(schema, vec![batch]);
                }
            }
            _ => {}
        }
        // A statement with hints is planned (the fast path would skip what they ask for).
        let hint = self.options.read().hint;
        if hint.is_none_or(|h| h == AccessPath::RowLookup)
            && let Some(lookup) = crate::fastpath::match_point_lookup(&stmt)
            && basalt_sql::statement_hints(&stmt)?.is_empty()
            && let Some((schema, batches)) =
                crate::fastpath::run(&lookup, params, &self.engine.meta, &self.engine.leaf).await?
        {
            return rows_output(schema, batches);
        }
        Ok(Output::Rows(self.query(stmt, params).await?))
    }

    /// `SET basalt.access_path = 'row_lookup' | 'search_index' | 'column_scan' | 'auto'` forces
    /// an access path where it can apply (an expert hint, per session); `SET basalt.fragments =
    /// off` keeps per-shard work on the aggregator instead of the leaves. Other client settings
    /// (DateStyle, client_encoding, ...) are accepted and ignored.
    /// `SHOW name`: the setting's name and value, from the session or the Postgres settings
    /// clients read.
    fn show(&self, variable: &[basalt_sql::sqlparser::ast::Ident]) -> Option<(String, String)> {
        let name = variable.iter().map(|i| i.value.to_lowercase()).collect::<Vec<_>>().join(" ");
        let dotted = name.replace(' ', ".");
        match self.setting(&dotted) {
            Some(value) => Some((dotted, value)),
            None => crate::compat::setting(&name).map(|value| (name, value)),
        }
    }

    /// The session's own settings, for `SHOW`.
    fn setting(&self, name: &str) -> Option<String> {
        match name {
            "statement_timeout" => {
                Some(self.timeout.read().map_or("0".to_string(), |t| format!("{}ms", t.as_millis())))
            }
            "basalt.memory_limit" => Some(crate::limits::human_bytes(self.pool.limit())),
            "basalt.access_path" => Some(self.options.read().hint.map_or("auto", AccessPath::name).to_string()),
            "basalt.fragments" => Some(if self.options.read().fragments { "on" } else { "off" }.to_string()),
            "basalt.join_order" => Some(if self.options.read().join_order { "on" } else { "off" }.to_string()),
            "basalt.broadcast" => Some(if self.options.read().broadcast { "on" } else { "off" }.to_string()),
            _ => None,
        }
    }

    fn set(&self, set: &Set) -> Result<Output> {
        if let Set::SingleAssignment { variable, values, .. } = set {
            let name = variable.to_string().to_lowercase();
            let text = values.first().map(|v| v.to_string()).unwrap_or_default();
            let value = text.trim_matches('\'');
            if name == "statement_timeout" {
                *self.timeout.write() = crate::limits::parse_duration(value)?;
                return Ok(command("SET", 0));
            }
            if name == "basalt.memory_limit" {
                let limit = crate::limits::parse_bytes(value)?;
                if limit < 1 << 20 {
                    return Err(BasaltError::invalid("basalt.memory_limit must be at least 1MB"));
                }
                self.pool.set_limit(limit);
                return Ok(command("SET", 0));
            }
            if name.starts_with("datafusion.") {
                let state = self.ctx.state_ref();
                state.write().config_mut().options_mut().set(&name, value).map_err(from_df)?;
                return Ok(command("SET", 0));
            }
            if name == "basalt.fragments" || name == "basalt.join_order" || name == "basalt.broadcast" {
                let on = basalt_sql::hints::parse_on_off(&name, value)?;
                let mut options = self.options.write();
                match name.as_str() {
                    "basalt.fragments" => options.fragments = on,
                    "basalt.join_order" => options.join_order = on,
                    _ => options.broadcast = on,
                }
                return Ok(command("SET", 0));
            }
            if name == "basalt.access_path" || name == "basalt_access_path" {
                self.options.write().hint = basalt_sql::hints::parse_access_path(value)?;
            }
        }
        Ok(command("SET", 0))
    }

    async fn write(&self, name: CollectionName, inputs: Vec<WriteInput>) -> Result<usize> {
        let total = inputs.len();
        let mut ok = 0usize;
        let mut failures: Vec<String> = Vec::new();
        let mut position = 0usize;
        let mut inputs = inputs.into_iter().peekable();
        while inputs.peek().is_some() {
            let chunk: Vec<WriteInput> = inputs.by_ref().take(WRITE_CHUNK_DOCS).collect();
            let n = chunk.len();
            let resp: WriteResponse =
                self.engine.tailer.write(WriteRequest { collection: name.clone(), inputs: chunk }).await?;
            for (i, s) in resp.statuses.iter().enumerate() {
                match &s.error {
                    None => ok += 1,
                    Some(e) if failures.len() < 5 => {
                        failures.push(format!("document {}: {}", position + i + 1, e.message))
                    }
                    Some(_) => {}
                }
            }
            position += n;
        }
        if ok < total {
            let failed = total - ok;
            return Err(BasaltError::invalid(format!(
                "{failed} of {total} documents failed ({ok} written): {}",
                failures.join("; ")
            )));
        }
        Ok(ok)
    }

    async fn show_collections(&self, workspace: Option<String>) -> Result<Output> {
        let infos = self.engine.meta.list_collections(workspace).await?;
        let mut docs = Vec::with_capacity(infos.len());
        for info in &infos {
            docs.push(self.engine.leaf.stats(info.id, (0..info.shards).collect()).await?.doc_count);
        }
        let schema = show_collections_schema();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(infos.iter().map(|i| i.name.workspace.as_str()))) as ArrayRef,
                Arc::new(StringArray::from_iter_values(infos.iter().map(|i| i.name.name.as_str()))),
                Arc::new(UInt64Array::from_iter_values(infos.iter().map(|i| u64::from(i.shards)))),
                Arc::new(UInt64Array::from(docs)),
            ],
        )?;
        rows_output(schema, vec![batch])
    }

    /// One row per source partition a tailer reports (a source no tailer works on yet: one
    /// row with the state `unassigned`).
    async fn show_sources(&self) -> Result<Output> {
        use arrow::array::{Int32Array, Int64Array};
        use basalt_common::api::{PartitionStatus, SourceInfo, SourceSpec};
        let sources = self.engine.meta.list_sources().await?;
        let mut status = self.engine.meta.source_status().await?;
        status.sort_by_key(|s| (s.source_id, s.partition));
        // One row per partition (Kafka) or object being read (S3), one per source without any.
        // (source, partition or object being read, (objects done, objects found) for S3)
        type Row<'a> = (&'a SourceInfo, Option<&'a PartitionStatus>, Option<(i64, i64)>);
        let mut rows: Vec<Row> = Vec::new();
        for src in &sources {
            let (objects, done) = match &src.spec {
                SourceSpec::S3(_) => {
                    let objects = self.engine.meta.source_objects(src.id, Vec::new()).await?;
                    let done: HashSet<i32> = objects.iter().filter(|o| o.done).map(|o| o.number).collect();
                    (Some((done.len() as i64, objects.len() as i64)), done)
                }
                SourceSpec::Kafka(_) => (None, HashSet::new()),
            };
            // Tailers report once a second; the catalog knows at once when an object is done.
            let mine: Vec<_> = status
                .iter()
                .filter(|s| s.source_id == src.id && s.state != "done" && !done.contains(&s.partition))
                .collect();
            if mine.is_empty() {
                rows.push((src, None, objects));
            }
            rows.extend(mine.into_iter().map(|s| (src, Some(s), objects)));
        }
        let schema = show_sources_schema();
        let known = |v: i64| (v >= 0).then_some(v);
        // A source no tailer reports on: S3 objects all done, or waiting for one.
        let idle = |objects: Option<(i64, i64)>| match objects {
            Some((done, total)) if done == total && total > 0 => "done",
            Some(_) => "waiting",
            None => "unassigned",
        };
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|(s, _, _)| s.name.to_string()))) as ArrayRef,
                Arc::new(StringArray::from_iter_values(rows.iter().map(|(s, _, _)| match s.spec {
                    SourceSpec::Kafka(_) => "kafka",
                    SourceSpec::S3(_) => "s3",
                }))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|(s, _, _)| s.spec.location()))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|(s, _, _)| s.collection.to_string()))),
                Arc::new(StringArray::from_iter(rows.iter().map(|(s, _, _)| {
                    let names: Vec<String> = s.rollups.iter().map(|r| r.collection.to_string()).collect();
                    (!names.is_empty()).then(|| names.join(", "))
                }))),
                Arc::new(Int32Array::from_iter(rows.iter().map(|(_, st, _)| st.map(|st| st.partition)))),
                Arc::new(StringArray::from_iter(rows.iter().map(|(_, st, _)| st.and_then(|st| st.object.as_deref())))),
                Arc::new(StringArray::from_iter(rows.iter().map(|(_, st, _)| st.map(|st| st.member.as_str())))),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|(_, st, o)| st.map_or(idle(*o), |st| st.state.as_str())),
                )),
                Arc::new(Int64Array::from_iter(rows.iter().map(|(_, st, _)| st.and_then(|st| known(st.next_offset))))),
                Arc::new(Int64Array::from_iter(rows.iter().map(|(_, st, _)| {
                    st.and_then(|st| {
                        (st.high_watermark >= 0 && st.next_offset >= 0)
                            .then(|| (st.high_watermark - st.next_offset).max(0))
                    })
                }))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|(_, st, _)| st.map_or(0, |st| st.documents)))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|(_, st, _)| st.map_or(0, |st| st.errors)))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|(_, st, _)| st.map_or(0, |st| st.bytes)))),
                Arc::new(Int64Array::from_iter(rows.iter().map(|(_, _, o)| o.map(|o| o.0)))),
                Arc::new(Int64Array::from_iter(rows.iter().map(|(_, _, o)| o.map(|o| o.1)))),
                Arc::new(StringArray::from_iter(
                    rows.iter().map(|(_, st, _)| st.and_then(|st| st.last_error.as_deref())),
                )),
            ],
        )?;
        rows_output(schema, vec![batch])
    }

    async fn describe_collection(&self, name: CollectionName) -> Result<Output> {
        let info = self.engine.meta.get_collection(name).await?;
        let stats = self.engine.leaf.stats(info.id, (0..info.shards).collect()).await?;
        let (mut paths, mut kinds, mut counts, mut columns) = (vec![], vec![], vec![], vec![]);
        for (path, by_kind) in &stats.fields {
            let column = stats.column_type(path).map(|t| t.to_arrow().to_string());
            for (kind, n) in by_kind {
                paths.push(path.clone());
                kinds.push(kind.name());
                counts.push(*n);
                columns.push(column.clone());
            }
        }
        let total = vec![stats.doc_count; paths.len()];
        let schema = describe_schema();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(paths)) as ArrayRef,
                Arc::new(StringArray::from(kinds)),
                Arc::new(UInt64Array::from(counts)),
                Arc::new(UInt64Array::from(total)),
                Arc::new(StringArray::from(columns)),
            ],
        )?;
        rows_output(schema, vec![batch])
    }
}

fn describe_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("field", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("occurrences", DataType::UInt64, false),
        Field::new("total", DataType::UInt64, false),
        Field::new("column_type", DataType::Utf8, true),
    ]))
}

/// What a Basalt command returns, for the extended protocol's Describe (the same schema its
/// execution produces).
fn command_schema(stmt: &BasaltStatement) -> Option<SchemaRef> {
    match stmt {
        BasaltStatement::Describe { .. } => Some(describe_schema()),
        BasaltStatement::ShowWorkspaces => Some(show_workspaces_schema()),
        BasaltStatement::ShowCollections { .. } => Some(show_collections_schema()),
        BasaltStatement::ShowSources => Some(show_sources_schema()),
        _ => None,
    }
}

fn show_workspaces_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("workspace", DataType::Utf8, false)]))
}

fn show_collections_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("workspace", DataType::Utf8, false),
        Field::new("collection", DataType::Utf8, false),
        Field::new("shards", DataType::UInt64, false),
        Field::new("documents", DataType::UInt64, false),
    ]))
}

fn show_sources_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("location", DataType::Utf8, false),
        Field::new("collection", DataType::Utf8, false),
        Field::new("rollups", DataType::Utf8, true),
        Field::new("partition", DataType::Int32, true),
        Field::new("object", DataType::Utf8, true),
        Field::new("tailer", DataType::Utf8, true),
        Field::new("state", DataType::Utf8, false),
        Field::new("next_offset", DataType::Int64, true),
        Field::new("lag", DataType::Int64, true),
        Field::new("documents", DataType::UInt64, false),
        Field::new("errors", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("objects_done", DataType::Int64, true),
        Field::new("objects_total", DataType::Int64, true),
        Field::new("last_error", DataType::Utf8, true),
    ]))
}

fn returns_rows_statement(s: &Statement) -> bool {
    !matches!(
        s,
        Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. }
            | Statement::Set(_)
    )
}

/// Rows as JSON objects (arrow's JSON writer: lists become arrays, nulls are omitted).
pub fn batches_to_json(batches: &[RecordBatch]) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    let refs: Vec<&RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).collect();
    if refs.is_empty() {
        return Ok(vec![]);
    }
    writer.write_batches(&refs)?;
    writer.finish()?;
    serde_json::from_slice(&writer.into_inner()).map_err(|e| BasaltError::internal(format!("rows to json: {e}")))
}

/// Rows of an INSERT source as documents: one text column holds JSON documents; otherwise each
/// row's columns become fields (`a.b` names become nested objects).
fn batches_to_documents(batches: &[RecordBatch]) -> Result<Vec<WriteInput>> {
    let Some(first) = batches.first() else { return Ok(vec![]) };
    let schema = first.schema();
    let single_text = schema.fields().len() == 1
        && matches!(schema.field(0).data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    if single_text {
        let mut out = Vec::new();
        for b in batches {
            let col = cast(b.column(0), &DataType::Utf8)?;
            for v in col.as_string::<i32>().iter() {
                out.push(WriteInput::UpsertRaw { json: v.unwrap_or("null").to_string() });
            }
        }
        return Ok(out);
    }
    Ok(batches_to_json(batches)?
        .into_iter()
        .map(|row| {
            let mut doc = serde_json::Map::new();
            for (k, v) in row {
                basalt_common::doc::insert_path(&mut doc, &k, v);
            }
            WriteInput::Upsert { doc: serde_json::Value::Object(doc) }
        })
        .collect())
}

/// The plan whose one output stream is the statement's result. DataFusion may end a plan in
/// a round-robin split of one ordered stream: the cast of text for clients (see
/// [`text_for_clients`]) over a `SortPreservingMergeExec` was spread over two partitions
/// (`RepartitionExec: RoundRobinBatch(2)`) and `execute_stream` joins partitions in arrival
/// order, so TPC-H q16's 18,314 rows came back with their second and third batches swapped in
/// about 1 run in 30. The split (under projections only) is removed: the projection runs on
/// the one stream, in its order. Merging the partitions by the plan's ordering would not do:
/// through the cast DataFusion knows only a prefix of the order (`supplier_cnt`).
fn in_one_ordered_stream(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> Arc<dyn datafusion::physical_plan::ExecutionPlan> {
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::physical_plan::{
        ChildrenPropertiesMode, ExecutionPlan, ExecutionPlanProperties, Partitioning, ReplaceChildrenOptions,
    };
    fn unsplit(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
        if let Some(r) = plan.downcast_ref::<RepartitionExec>()
            && matches!(r.partitioning(), Partitioning::RoundRobinBatch(_))
            && r.input().output_partitioning().partition_count() == 1
        {
            return Some(r.input().clone());
        }
        let projection = plan.downcast_ref::<ProjectionExec>()?;
        let child = unsplit(projection.input())?;
        let options = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
        plan.clone().replace_children(vec![child], options).ok()
    }
    if plan.output_partitioning().partition_count() <= 1 {
        return plan;
    }
    unsplit(&plan).unwrap_or(plan)
}

/// A plan whose text results come out as `Utf8`: collections' text columns are `Utf8View`
/// inside plans (see `basalt_fragment::plan_type`), which clients, the wire encoders and
/// writes of query results do not need to know. Other plans are returned as they are.
fn text_for_clients(plan: LogicalPlan) -> Result<LogicalPlan> {
    use datafusion::logical_expr::{Expr, LogicalPlanBuilder, cast};
    let schema = plan.schema().clone();
    if !schema.fields().iter().any(|f| f.data_type() == &DataType::Utf8View) {
        return Ok(plan);
    }
    let exprs: Vec<Expr> = schema
        .iter()
        .map(|(qualifier, field)| {
            let column = Expr::Column(datafusion::common::Column::new(qualifier.cloned(), field.name()));
            if field.data_type() == &DataType::Utf8View {
                cast(column, DataType::Utf8).alias_qualified(qualifier.cloned(), field.name())
            } else {
                column
            }
        })
        .collect();
    LogicalPlanBuilder::from(plan).project(exprs).and_then(LogicalPlanBuilder::build).map_err(from_df)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{AsArray, Int64Array};
    use datafusion::arrow::datatypes::{Field, Int64Type, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
    use datafusion::physical_plan::expressions::col;
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::physical_plan::sorts::sort::SortExec;
    use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties, Partitioning};

    /// A sorted result that DataFusion split round-robin over two partitions (each in order)
    /// comes out as one stream in the result's order, not in the order the partitions' batches
    /// arrive.
    #[tokio::test]
    async fn an_ordered_plan_in_several_partitions_streams_in_its_order() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        // Twenty batches, in descending blocks so the sort has work to do.
        let batches: Vec<RecordBatch> = (0..20i64)
            .map(|b| {
                let values = Int64Array::from_iter_values((0..100).map(|i| (19 - b) * 100 + i));
                RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap()
            })
            .collect();
        let split = |project: bool| -> Arc<dyn ExecutionPlan> {
            let source =
                MemorySourceConfig::try_new_exec(std::slice::from_ref(&batches), schema.clone(), None).unwrap();
            let ordering = LexOrdering::new(vec![PhysicalSortExpr::new_default(col("n", &schema).unwrap())]).unwrap();
            let sorted: Arc<dyn ExecutionPlan> = Arc::new(SortExec::new(ordering, source));
            let split: Arc<dyn ExecutionPlan> = Arc::new(
                RepartitionExec::try_new(sorted, Partitioning::RoundRobinBatch(2)).unwrap().with_preserve_order(),
            );
            if !project {
                return split;
            }
            // The cast for clients: a projection over the split.
            let n = (col("n", &schema).unwrap(), "n".to_string());
            Arc::new(ProjectionExec::try_new(vec![n], split).unwrap())
        };
        let ctx = datafusion::prelude::SessionContext::new();
        let config = ctx.task_ctx().session_config().clone().with_batch_size(64);
        let task = Arc::new(datafusion::execution::TaskContext::default().with_session_config(config));
        // Plans are run once each (a repartition's state is per run).
        for round in 0..20 {
            let project = round % 2 == 0;
            assert_eq!(split(project).output_partitioning().partition_count(), 2);
            let plan = in_one_ordered_stream(split(project));
            assert_eq!(plan.output_partitioning().partition_count(), 1);
            let out = datafusion::physical_plan::collect(plan, task.clone()).await.unwrap();
            let values: Vec<i64> =
                out.iter().flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
            assert_eq!(values, (0..2000).collect::<Vec<i64>>());
        }
        // A plan in one partition, or of several partitions not split from one, is left as it is.
        let two: Arc<dyn ExecutionPlan> = MemorySourceConfig::try_new_exec(&[vec![], vec![]], schema, None).unwrap();
        assert!(Arc::ptr_eq(&in_one_ordered_stream(two.clone()), &two));
    }
}
