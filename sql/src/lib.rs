//! Basalt's SQL surface: splits a SQL string into statements, recognizes Basalt's own commands
//! (workspaces, collections, DESCRIBE, field-level UPDATE), and rewrites nested field paths
//! (`address.city`) into the flattened column names the column store exposes.
//!
//! Invariants: this crate only parses and rewrites; it never plans or executes, and it knows no
//! wire protocol.

use std::collections::HashSet;
use std::ops::ControlFlow;

use basalt_common::api::{
    AvroFraming, CollectionName, DEFAULT_SHARDS, DEFAULT_WORKSPACE, KafkaSource, S3Source, SourceFormat, SourceSpec,
    StartAt,
};
use basalt_common::{BasaltError, Result};
use sqlparser::ast::{
    AssignmentTarget, Expr, FromTable, Ident, ObjectName, ObjectNamePart, Query, Statement, TableFactor, TableObject,
    Visit, Visitor, visit_expressions_mut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

pub use sqlparser;

pub mod hints;
pub use hints::{Hints, statement_hints};

/// Statement nesting limit for the parser (guards the stack against hostile SQL).
const RECURSION_LIMIT: usize = 64;
/// SQL text size limit.
pub const SQL_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum BasaltStatement {
    CreateWorkspace {
        name: String,
        if_not_exists: bool,
    },
    CreateCollection {
        name: CollectionName,
        shards: u32,
        if_not_exists: bool,
    },
    DropCollection {
        name: CollectionName,
        if_exists: bool,
    },
    ShowCollections {
        workspace: Option<String>,
    },
    ShowWorkspaces,
    Describe {
        name: CollectionName,
    },
    /// `INSERT INTO c <query>`: each row becomes a document (a single text column is parsed as
    /// JSON; otherwise columns become fields).
    Insert {
        name: CollectionName,
        source: Box<Query>,
    },
    /// `UPDATE c SET path = expr, ... [WHERE ...]`: field-level patches.
    Update {
        name: CollectionName,
        alias: Option<String>,
        assignments: Vec<(String, Expr)>,
        selection: Option<Expr>,
    },
    Delete {
        name: CollectionName,
        alias: Option<String>,
        selection: Option<Expr>,
    },
    /// `CREATE SOURCE [IF NOT EXISTS] name FROM KAFKA (option = value, ...) INTO collection`.
    CreateSource {
        name: CollectionName,
        collection: CollectionName,
        spec: SourceSpec,
        if_not_exists: bool,
    },
    DropSource {
        name: CollectionName,
        if_exists: bool,
    },
    ShowSources,
    /// `CREATE COLLECTION name [WITH (shards = n)] AS ROLLUP SELECT ... FROM _input [WHERE ...]
    /// GROUP BY ... FROM SOURCE source`: `sql` is the checked query.
    CreateRollup {
        name: CollectionName,
        shards: u32,
        source: CollectionName,
        sql: String,
        if_not_exists: bool,
    },
    /// Anything else goes to the query engine as it is (after path rewriting).
    Query(Box<Statement>),
}

fn err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::new(basalt_common::ErrorCode::Syntax, format!("sql: {e}"))
}

fn is_word(tok: &Token, word: &str) -> bool {
    matches!(tok, Token::Word(w) if w.value.eq_ignore_ascii_case(word))
}

/// Parse a SQL string into statements.
pub fn parse(sql: &str) -> Result<Vec<BasaltStatement>> {
    if sql.len() > SQL_BYTES_MAX {
        return Err(BasaltError::limit(format!("sql text is over {SQL_BYTES_MAX} bytes")));
    }
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).with_recursion_limit(RECURSION_LIMIT).try_with_sql(sql).map_err(err)?;
    let mut out = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        if parser.peek_token().token == Token::EOF {
            break;
        }
        out.push(parse_one(&mut parser)?);
        if !parser.consume_token(&Token::SemiColon) && parser.peek_token().token != Token::EOF {
            return Err(err(format!("expected end of statement, found {}", parser.peek_token().token)));
        }
    }
    Ok(out)
}

/// Consume `IF NOT EXISTS` if it comes next.
fn if_not_exists(p: &mut Parser) -> bool {
    use sqlparser::keywords::Keyword;
    p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS])
}

/// Consume `IF EXISTS` if it comes next.
fn if_exists(p: &mut Parser) -> bool {
    use sqlparser::keywords::Keyword;
    p.parse_keywords(&[Keyword::IF, Keyword::EXISTS])
}

/// `(key = value, ...)` with string, number, boolean or bare-word values, keys lowercased.
fn parse_options(p: &mut Parser) -> Result<Vec<(String, String)>> {
    p.expect_token(&Token::LParen).map_err(err)?;
    let mut out = Vec::new();
    loop {
        let key = p.parse_identifier().map_err(err)?.value.to_lowercase();
        p.expect_token(&Token::Eq).map_err(err)?;
        let value = match p.next_token().token {
            Token::SingleQuotedString(s) => s,
            Token::Number(n, _) => n,
            Token::Word(w) => w.value,
            other => return Err(err(format!("option {key}: expected a value, found {other}"))),
        };
        if out.iter().any(|(k, _)| *k == key) {
            return Err(err(format!("option {key} given twice")));
        }
        out.push((key, value));
        if !p.consume_token(&Token::Comma) {
            break;
        }
    }
    p.expect_token(&Token::RParen).map_err(err)?;
    Ok(out)
}

fn kafka_source(options: Vec<(String, String)>) -> Result<SourceSpec> {
    let mut brokers = None;
    let mut topic = None;
    let mut format = SourceFormat::Json;
    let mut start = StartAt::Earliest;
    let mut key_as_id = false;
    let mut columns = Vec::new();
    let (mut schema, mut framing, mut schema_id) = (None, AvroFraming::Bare, None);
    for (key, value) in options {
        match key.as_str() {
            "brokers" => brokers = Some(value),
            "schema" => schema = Some(value),
            "framing" => {
                framing = match value.to_lowercase().as_str() {
                    "bare" => AvroFraming::Bare,
                    "confluent" => AvroFraming::Confluent,
                    "single_object" => AvroFraming::SingleObject,
                    other => {
                        return Err(err(format!(
                            "framing must be 'bare', 'confluent' or 'single_object', got {other:?}"
                        )));
                    }
                }
            }
            "schema_id" => {
                schema_id = Some(
                    value
                        .trim()
                        .parse::<u32>()
                        .map_err(|_| err(format!("schema_id must be a number, got {value:?}")))?,
                )
            }
            "topic" => topic = Some(value),
            "format" => {
                format = match value.to_lowercase().as_str() {
                    "json" => SourceFormat::Json,
                    "csv" => SourceFormat::Csv,
                    "avro" => SourceFormat::Avro,
                    other => {
                        return Err(BasaltError::unsupported(format!(
                            "kafka format {other:?} (json, csv and avro are supported)"
                        )));
                    }
                }
            }
            "columns" => columns = csv_columns(&value)?,
            "start" => {
                start = match value.to_lowercase().as_str() {
                    "earliest" => StartAt::Earliest,
                    "latest" => StartAt::Latest,
                    other => return Err(err(format!("start must be 'earliest' or 'latest', got {other:?}"))),
                }
            }
            "key_as_id" => {
                key_as_id = match value.to_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    other => return Err(err(format!("key_as_id must be true or false, got {other:?}"))),
                }
            }
            "username" | "password" | "sasl_username" | "sasl_password" => {
                return Err(err("credentials do not belong in SQL: set BASALT_KAFKA_SASL_USERNAME and \
                                 BASALT_KAFKA_SASL_PASSWORD in the tailer's environment"));
            }
            other => return Err(err(format!("unknown kafka option {other:?}"))),
        }
    }
    let brokers = brokers.ok_or_else(|| err("a kafka source needs brokers = '...'"))?;
    let topic = topic.ok_or_else(|| err("a kafka source needs topic = '...'"))?;
    let spec =
        KafkaSource { brokers, topic, format, columns, start, key_as_id, schema, framing, schema_id, transform: None };
    check_kafka_source(&spec)?;
    Ok(SourceSpec::Kafka(spec))
}

/// The column list of a CSV Kafka source: `'id, name, price'`.
pub fn csv_columns(list: &str) -> Result<Vec<String>> {
    csv_column_names(list.split(',').map(str::to_string).collect())
}

/// CSV cell names, trimmed: none empty, none twice.
pub fn csv_column_names(names: Vec<String>) -> Result<Vec<String>> {
    let columns: Vec<String> = names.iter().map(|c| c.trim().to_string()).collect();
    if columns.iter().any(String::is_empty) {
        return Err(err(format!("columns must be a list of non-empty names, got {names:?}")));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = columns.iter().find(|c| !seen.insert(c.as_str())) {
        return Err(err(format!("column {dup:?} is named twice")));
    }
    Ok(columns)
}

/// What a Kafka source needs for its format: csv names its columns (messages have no header).
pub fn check_kafka_source(spec: &KafkaSource) -> Result<()> {
    match spec.format {
        SourceFormat::Json if !spec.columns.is_empty() => Err(err("columns = '...' is for format = 'csv'")),
        SourceFormat::Json => Ok(()),
        SourceFormat::Csv if spec.columns.is_empty() => {
            Err(err("a csv kafka source needs columns = 'a, b, ...' (a message is one row without a header)"))
        }
        SourceFormat::Csv => Ok(()),
        SourceFormat::Parquet => {
            Err(BasaltError::unsupported("kafka format parquet (json, csv and avro are supported)"))
        }
        SourceFormat::Avro => match &spec.schema {
            None => Err(err("an avro kafka source needs schema = '<Avro schema JSON>' (the writer schema)")),
            Some(text) => parse_avro_schema(text).map(|_| ()),
        },
    }?;
    let avro_only = spec.schema.is_some() || spec.schema_id.is_some() || spec.framing != AvroFraming::Bare;
    if avro_only && spec.format != SourceFormat::Avro {
        return Err(err("schema, framing and schema_id are for format = 'avro'"));
    }
    if spec.schema_id.is_some() && spec.framing != AvroFraming::Confluent {
        return Err(err("schema_id is checked in framing = 'confluent' only"));
    }
    Ok(())
}

/// An Avro writer schema: valid, and a record (each message is one document).
pub fn parse_avro_schema(text: &str) -> Result<apache_avro::Schema> {
    let schema = apache_avro::Schema::parse_str(text).map_err(|e| err(format!("avro schema: {e}")))?;
    match schema {
        apache_avro::Schema::Record(_) => Ok(schema),
        _ => Err(err("the avro schema must be a record (each message is one document)")),
    }
}

/// Default listing interval of an S3 source.
pub const S3_POLL_INTERVAL_MS: u64 = 10_000;

pub fn s3_source(options: Vec<(String, String)>) -> Result<SourceSpec> {
    let mut spec = S3Source {
        bucket: String::new(),
        prefix: String::new(),
        format: SourceFormat::Json,
        endpoint: None,
        region: None,
        poll_interval_ms: S3_POLL_INTERVAL_MS,
        ordered: true,
        transform: None,
    };
    let mut bucket = None;
    for (key, value) in options {
        match key.as_str() {
            "bucket" => bucket = Some(value),
            "prefix" => spec.prefix = value,
            "format" => {
                spec.format = match value.to_lowercase().as_str() {
                    "json" | "jsonl" | "ndjson" => SourceFormat::Json,
                    "csv" => SourceFormat::Csv,
                    "parquet" => SourceFormat::Parquet,
                    "avro" => SourceFormat::Avro,
                    other => return Err(err(format!("s3 format must be json, csv or parquet, got {other:?}"))),
                }
            }
            "endpoint" => spec.endpoint = Some(value),
            "region" => spec.region = Some(value),
            "poll_interval_ms" => {
                spec.poll_interval_ms =
                    value.parse().map_err(|_| err(format!("poll_interval_ms must be a number, got {value:?}")))?;
            }
            "ordered" => {
                spec.ordered = match value.to_lowercase().as_str() {
                    "true" | "on" | "1" => true,
                    "false" | "off" | "0" => false,
                    _ => return Err(err(format!("ordered must be true or false, got {value:?}"))),
                };
            }
            "access_key_id" | "secret_access_key" | "session_token" | "password" => {
                return Err(err("credentials do not belong in SQL: set AWS_ACCESS_KEY_ID and \
                                 AWS_SECRET_ACCESS_KEY in the tailer's environment"));
            }
            other => return Err(err(format!("unknown s3 option {other:?}"))),
        }
    }
    spec.bucket = bucket.ok_or_else(|| err("an s3 source needs bucket = '...'"))?;
    Ok(SourceSpec::S3(spec))
}

/// The table an ingest transformation reads: the records of one chunk.
pub const TRANSFORM_INPUT: &str = "_input";

/// Check an ingest transformation: one `SELECT ... FROM _input [WHERE ...]`, without grouping,
/// joins, set operations or other tables. Returns the statement with paths rewritten.
pub fn check_transform(sql: &str) -> Result<Box<Query>> {
    let bad = |m: &str| BasaltError::invalid(format!("transform: {m}"));
    let mut statements = parse(sql)?;
    let (Some(BasaltStatement::Query(stmt)), true) = (statements.pop(), statements.is_empty()) else {
        return Err(bad("expected one SELECT ... FROM _input"));
    };
    let Statement::Query(query) = *stmt else { return Err(bad("expected one SELECT ... FROM _input")) };
    let sqlparser::ast::SetExpr::Select(select) = query.body.as_ref() else {
        return Err(bad("expected a plain SELECT (no UNION, VALUES or nesting)"));
    };
    let [from] = select.from.as_slice() else { return Err(bad("read from _input only")) };
    let TableFactor::Table { name, .. } = &from.relation else { return Err(bad("read from _input only")) };
    if !from.joins.is_empty() || name.to_string() != TRANSFORM_INPUT {
        return Err(bad("read from _input only (no joins, no other tables)"));
    }
    let grouped = !matches!(&select.group_by, sqlparser::ast::GroupByExpr::Expressions(e, _) if e.is_empty());
    if grouped || select.having.is_some() || query.order_by.is_some() || query.limit_clause.is_some() {
        return Err(bad("no GROUP BY, HAVING, ORDER BY or LIMIT (use a rollup to aggregate)"));
    }
    Ok(query)
}

/// What a rollup's select item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollupColumn {
    /// A grouping key: its value is set on the group's document.
    Key,
    /// `count(*)` or `count(x)`: incremented.
    Count,
    /// `sum(x)`: incremented.
    Sum,
    Min,
    Max,
    /// `approx_distinct(x)` (or `approx_count_distinct`): a mergeable sketch.
    ApproxDistinct,
}

/// A checked rollup query and the name and role of each select item, in order.
#[derive(Debug, Clone)]
pub struct RollupPlan {
    pub query: Box<Query>,
    pub columns: Vec<(String, RollupColumn)>,
}

/// Aggregate functions: the ones a rollup maintains, and others it must refuse.
const ROLLUP_AGGREGATES: &[&str] = &["count", "sum", "min", "max", "approx_distinct", "approx_count_distinct"];
const OTHER_AGGREGATES: &[&str] = &[
    "avg",
    "mean",
    "median",
    "array_agg",
    "string_agg",
    "stddev",
    "stddev_samp",
    "stddev_pop",
    "variance",
    "var",
    "var_samp",
    "var_pop",
    "first_value",
    "last_value",
    "nth_value",
    "bool_and",
    "bool_or",
    "bit_and",
    "bit_or",
    "bit_xor",
    "corr",
    "covar",
    "covar_samp",
    "covar_pop",
    "approx_median",
    "approx_percentile_cont",
    "approx_percentile_cont_with_weight",
    "grouping",
    "regr_slope",
    "regr_intercept",
    "regr_count",
    "regr_r2",
];

struct FindAggregate(Option<String>);

impl Visitor for FindAggregate {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let name = f.name.to_string().to_lowercase();
            if ROLLUP_AGGREGATES.contains(&name.as_str()) || OTHER_AGGREGATES.contains(&name.as_str()) {
                self.0 = Some(name);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}

/// Check a rollup: `SELECT keys..., aggregates... FROM _input [WHERE ...] GROUP BY ...` where
/// every aggregate is `count`, `sum`, `min`, `max` or `approx_distinct` over a scalar
/// expression, is a select item of its own and has a name; every other item is a grouping key.
/// Names are top-level fields of the rollup's documents.
pub fn check_rollup(sql: &str) -> Result<RollupPlan> {
    use sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments, SelectItem};
    let bad = |m: String| BasaltError::invalid(format!("rollup: {m}"));
    let mut statements = parse(sql)?;
    let (Some(BasaltStatement::Query(stmt)), true) = (statements.pop(), statements.is_empty()) else {
        return Err(bad("expected one SELECT ... FROM _input GROUP BY ...".into()));
    };
    let Statement::Query(query) = *stmt else { return Err(bad("expected one SELECT ... FROM _input".into())) };
    let sqlparser::ast::SetExpr::Select(select) = query.body.as_ref() else {
        return Err(bad("expected a plain SELECT (no UNION, VALUES or nesting)".into()));
    };
    let [from] = select.from.as_slice() else { return Err(bad("read from _input only".into())) };
    let TableFactor::Table { name, .. } = &from.relation else { return Err(bad("read from _input only".into())) };
    if !from.joins.is_empty() || name.to_string() != TRANSFORM_INPUT {
        return Err(bad("read from _input only (no joins, no other tables)".into()));
    }
    let grouped =
        matches!(&select.group_by, sqlparser::ast::GroupByExpr::Expressions(e, m) if !e.is_empty() && m.is_empty());
    if !grouped {
        return Err(bad("needs GROUP BY with one or more expressions".into()));
    }
    if select.having.is_some() || query.order_by.is_some() || query.limit_clause.is_some() || select.distinct.is_some()
    {
        return Err(bad("no HAVING, DISTINCT, ORDER BY or LIMIT: the rollup keeps every group".into()));
    }
    let mut columns = Vec::new();
    let mut names = HashSet::new();
    for item in &select.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
            _ => return Err(bad("name each select item (no *)".into())),
        };
        let role = match expr {
            Expr::Function(f) if ROLLUP_AGGREGATES.contains(&f.name.to_string().to_lowercase().as_str()) => {
                let fname = f.name.to_string().to_lowercase();
                let FunctionArguments::List(list) = &f.args else {
                    return Err(bad(format!("{fname} needs an argument")));
                };
                if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                    return Err(bad(format!(
                        "{fname}(DISTINCT ...) cannot be maintained incrementally; use approx_distinct(...)"
                    )));
                }
                if f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
                    return Err(bad(format!("{fname} with FILTER, OVER or WITHIN GROUP")));
                }
                let star = matches!(list.args.as_slice(), [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]);
                let one = match list.args.as_slice() {
                    [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => Some(e),
                    _ => None,
                };
                if !(one.is_some() || star && fname == "count") {
                    return Err(bad(format!("{fname} takes one expression")));
                }
                if let Some(e) = one {
                    let mut find = FindAggregate(None);
                    let _ = e.visit(&mut find);
                    if let Some(inner) = find.0 {
                        return Err(bad(format!("{inner} inside {fname}")));
                    }
                }
                match fname.as_str() {
                    "count" => RollupColumn::Count,
                    "sum" => RollupColumn::Sum,
                    "min" => RollupColumn::Min,
                    "max" => RollupColumn::Max,
                    _ => RollupColumn::ApproxDistinct,
                }
            }
            other => {
                let mut find = FindAggregate(None);
                let _ = other.visit(&mut find);
                if let Some(f) = find.0 {
                    return Err(bad(format!(
                        "{f} is not maintained incrementally here: aggregates are count, sum, min, max and \
                         approx_distinct, each a select item of its own (avg: keep sum and count)"
                    )));
                }
                RollupColumn::Key
            }
        };
        let name = match (alias, expr) {
            (Some(a), _) => a,
            (None, Expr::Identifier(id)) if role == RollupColumn::Key => id.value.clone(),
            _ => return Err(bad(format!("name {expr} with AS"))),
        };
        if name == basalt_common::doc::ID_FIELD || name.contains('.') || name.is_empty() {
            return Err(bad(format!("{name:?} cannot name a rollup field (no _id, no dots)")));
        }
        if !names.insert(name.clone()) {
            return Err(bad(format!("two select items are named {name}")));
        }
        columns.push((name, role));
    }
    if !columns.iter().any(|(_, r)| *r == RollupColumn::Key) {
        return Err(bad("select at least one grouping key".into()));
    }
    if !columns.iter().any(|(_, r)| *r != RollupColumn::Key) {
        return Err(bad("select at least one aggregate".into()));
    }
    Ok(RollupPlan { query, columns })
}

fn parse_one(p: &mut Parser) -> Result<BasaltStatement> {
    let t0 = p.peek_nth_token(0).token;
    let t1 = p.peek_nth_token(1).token;
    if is_word(&t0, "create") && is_word(&t1, "source") {
        p.next_token();
        p.next_token();
        let if_not_exists = if_not_exists(p);
        let name = collection_name(&p.parse_object_name(false).map_err(err)?)?;
        p.expect_keyword(sqlparser::keywords::Keyword::FROM).map_err(err)?;
        let kind = p.parse_identifier().map_err(err)?.value.to_lowercase();
        let options = parse_options(p)?;
        let spec = match kind.as_str() {
            "kafka" => kafka_source(options)?,
            "s3" => s3_source(options)?,
            other => {
                return Err(BasaltError::unsupported(format!("source kind {other:?} (kafka and s3 are supported)")));
            }
        };
        p.expect_keyword(sqlparser::keywords::Keyword::INTO).map_err(err)?;
        let collection = collection_name(&p.parse_object_name(false).map_err(err)?)?;
        let mut spec = spec;
        if is_word(&p.peek_token().token, "transform") {
            p.next_token();
            let query = p.parse_query().map_err(err)?;
            let text = query.to_string();
            check_transform(&text)?;
            spec.set_transform(Some(text));
        }
        return Ok(BasaltStatement::CreateSource { name, collection, spec, if_not_exists });
    }
    if is_word(&t0, "drop") && is_word(&t1, "source") {
        p.next_token();
        p.next_token();
        let if_exists = if_exists(p);
        let name = collection_name(&p.parse_object_name(false).map_err(err)?)?;
        return Ok(BasaltStatement::DropSource { name, if_exists });
    }
    if is_word(&t0, "show") && is_word(&t1, "sources") {
        p.next_token();
        p.next_token();
        return Ok(BasaltStatement::ShowSources);
    }
    if is_word(&t0, "create") && (is_word(&t1, "workspace") || is_word(&t1, "collection")) {
        p.next_token();
        p.next_token();
        let if_not_exists = if_not_exists(p);
        let name = p.parse_object_name(false).map_err(err)?;
        if is_word(&t1, "workspace") {
            let name = single_ident(&name)?;
            return Ok(BasaltStatement::CreateWorkspace { name, if_not_exists });
        }
        let name = collection_name(&name)?;
        let mut shards = DEFAULT_SHARDS;
        if p.parse_keyword(sqlparser::keywords::Keyword::WITH) {
            p.expect_token(&Token::LParen).map_err(err)?;
            loop {
                let key = p.parse_identifier().map_err(err)?;
                p.expect_token(&Token::Eq).map_err(err)?;
                let value = p.parse_number_value().map_err(err)?;
                match key.value.to_lowercase().as_str() {
                    "shards" => {
                        shards = value
                            .to_string()
                            .parse()
                            .map_err(|_| err(format!("shards must be a positive integer, got {value}")))?;
                    }
                    other => return Err(err(format!("unknown collection option {other:?}"))),
                }
                if !p.consume_token(&Token::Comma) {
                    break;
                }
            }
            p.expect_token(&Token::RParen).map_err(err)?;
        }
        if p.parse_keyword(sqlparser::keywords::Keyword::AS) {
            if !is_word(&p.next_token().token, "rollup") {
                return Err(err("expected ROLLUP after AS (CREATE COLLECTION name AS ROLLUP SELECT ...)"));
            }
            let query = p.parse_query().map_err(err)?;
            p.expect_keyword(sqlparser::keywords::Keyword::FROM).map_err(err)?;
            if !is_word(&p.next_token().token, "source") {
                return Err(err("expected FROM SOURCE name after the rollup's query"));
            }
            let source = collection_name(&p.parse_object_name(false).map_err(err)?)?;
            let sql = query.to_string();
            check_rollup(&sql)?;
            return Ok(BasaltStatement::CreateRollup { name, shards, source, sql, if_not_exists });
        }
        return Ok(BasaltStatement::CreateCollection { name, shards, if_not_exists });
    }
    if is_word(&t0, "drop") && is_word(&t1, "collection") {
        p.next_token();
        p.next_token();
        let if_exists = if_exists(p);
        let name = collection_name(&p.parse_object_name(false).map_err(err)?)?;
        return Ok(BasaltStatement::DropCollection { name, if_exists });
    }
    if is_word(&t0, "show") && (is_word(&t1, "collections") || is_word(&t1, "workspaces")) {
        p.next_token();
        p.next_token();
        if is_word(&t1, "workspaces") {
            return Ok(BasaltStatement::ShowWorkspaces);
        }
        let workspace = if p.parse_keyword(sqlparser::keywords::Keyword::IN)
            || p.parse_keyword(sqlparser::keywords::Keyword::FROM)
        {
            Some(p.parse_identifier().map_err(err)?.value)
        } else {
            None
        };
        return Ok(BasaltStatement::ShowCollections { workspace });
    }
    if is_word(&t0, "describe") || (is_word(&t0, "desc") && matches!(t1, Token::Word(_))) {
        p.next_token();
        let _ = p.parse_keyword(sqlparser::keywords::Keyword::TABLE);
        let name = collection_name(&p.parse_object_name(false).map_err(err)?)?;
        return Ok(BasaltStatement::Describe { name });
    }
    let mut stmt = p.parse_statement().map_err(err)?;
    rewrite_paths(&mut stmt);
    rewrite_score(&mut stmt);
    Ok(match stmt {
        Statement::Insert(insert) => {
            let TableObject::TableName(table) = &insert.table else {
                return Err(err("INSERT INTO needs a collection name"));
            };
            if !insert.columns.is_empty() {
                return Err(BasaltError::unsupported(
                    "INSERT with a column list: insert JSON documents or SELECT named columns",
                ));
            }
            let source = insert.source.clone().ok_or_else(|| err("INSERT needs VALUES or a query"))?;
            BasaltStatement::Insert { name: collection_name(table)?, source }
        }
        Statement::Update(update) => {
            if update.from.is_some() || !update.table.joins.is_empty() {
                return Err(BasaltError::unsupported("UPDATE with FROM or joins"));
            }
            let (name, alias) = table_factor_name(&update.table.relation)?;
            let mut assignments = Vec::new();
            for a in update.assignments {
                let AssignmentTarget::ColumnName(target) = a.target else {
                    return Err(BasaltError::unsupported("UPDATE of a column tuple"));
                };
                let mut parts = idents(&target)?;
                if parts.len() > 1 && alias.as_deref().is_some_and(|al| al == parts[0]) {
                    parts.remove(0);
                }
                assignments.push((parts.join("."), a.value));
            }
            BasaltStatement::Update { name, alias, assignments, selection: update.selection }
        }
        Statement::Delete(delete) => {
            let tables = match &delete.from {
                FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
            };
            let [table] = tables.as_slice() else {
                return Err(BasaltError::unsupported("DELETE from several collections"));
            };
            if delete.using.is_some() || !table.joins.is_empty() {
                return Err(BasaltError::unsupported("DELETE with USING or joins"));
            }
            let (name, alias) = table_factor_name(&table.relation)?;
            BasaltStatement::Delete { name, alias, selection: delete.selection }
        }
        other => BasaltStatement::Query(Box::new(other)),
    })
}

fn table_factor_name(factor: &TableFactor) -> Result<(CollectionName, Option<String>)> {
    match factor {
        TableFactor::Table { name, alias, .. } => {
            Ok((collection_name(name)?, alias.as_ref().map(|a| a.name.value.clone())))
        }
        _ => Err(err("expected a collection name")),
    }
}

fn idents(name: &ObjectName) -> Result<Vec<String>> {
    name.0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(i) => Ok(i.value.clone()),
            other => Err(err(format!("unexpected name part {other}"))),
        })
        .collect()
}

fn single_ident(name: &ObjectName) -> Result<String> {
    match idents(name)?.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(err(format!("expected a simple name, got {name}"))),
    }
}

/// `c`, `ws.c`, or a path already flattened into one quoted identifier.
pub fn collection_name(name: &ObjectName) -> Result<CollectionName> {
    let parts = idents(name)?;
    match parts.as_slice() {
        [c] if c.contains('.') => CollectionName::parse(c),
        [c] => CollectionName::parse(&format!("{DEFAULT_WORKSPACE}.{c}")),
        [ws, c] => CollectionName::parse(&format!("{ws}.{c}")),
        _ => Err(err(format!("bad collection name {name}"))),
    }
}

/// Relation names and aliases in scope anywhere in a statement.
struct Relations(HashSet<String>);

impl Visitor for Relations {
    type Break = ();
    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        // `people`, `commons.people` and `basalt.commons.people` all name it in a column.
        let parts: Vec<&str> = relation
            .0
            .iter()
            .filter_map(|p| match p {
                ObjectNamePart::Identifier(i) => Some(i.value.as_str()),
                _ => None,
            })
            .collect();
        for start in 0..parts.len() {
            self.0.insert(parts[start..].join("."));
        }
        ControlFlow::Continue(())
    }
    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        let alias = match factor {
            TableFactor::Table { alias, .. }
            | TableFactor::Derived { alias, .. }
            | TableFactor::Function { alias, .. }
            | TableFactor::UNNEST { alias, .. } => alias.as_ref(),
            _ => None,
        };
        if let Some(a) = alias {
            self.0.insert(a.name.value.clone());
        }
        ControlFlow::Continue(())
    }
}

/// Rewrite compound identifiers that are not `relation.column` into one quoted identifier naming
/// a nested field path: `address.city` -> `"address.city"`, `u.address.city` -> `u."address.city"`.
pub fn rewrite_paths(stmt: &mut Statement) {
    let mut relations = Relations(HashSet::new());
    let _ = Visit::visit(&*stmt, &mut relations);
    let relations = relations.0;
    let _ = visit_expressions_mut(stmt, |expr| {
        if let Expr::CompoundIdentifier(parts) = expr {
            let quote = |v: String| Ident::with_quote('"', v);
            // The longest leading run of parts that names a relation (`u`, `commons.people`).
            let relation = (1..parts.len()).rev().find(|&k| {
                relations.contains(&parts[..k].iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join("."))
            });
            if let Some(k) = relation {
                if parts.len() > k + 1 {
                    let path = parts[k..].iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".");
                    let mut qualified = parts[..k].to_vec();
                    qualified.push(quote(path));
                    *expr = Expr::CompoundIdentifier(qualified);
                }
            } else {
                let path = parts.iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".");
                *expr = Expr::Identifier(quote(path));
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

/// The column a statement reads for `score()`: leaves fill it with the search relevance.
pub const SCORE_COLUMN: &str = "_score";

/// Replace `score()` with the `_score` column.
fn rewrite_score(stmt: &mut Statement) {
    let _ = visit_expressions_mut(stmt, |expr| {
        if let Expr::Function(f) = expr
            && f.name.to_string().eq_ignore_ascii_case("score")
            && matches!(&f.args, sqlparser::ast::FunctionArguments::List(l) if l.args.is_empty())
        {
            *expr = Expr::Identifier(Ident::with_quote('"', SCORE_COLUMN));
        }
        ControlFlow::<()>::Continue(())
    });
}

/// Whether a statement reads `score()` (after rewriting).
pub fn uses_score(stmt: &Statement) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(stmt, |expr| {
        if matches!(expr, Expr::Identifier(i) if i.value == SCORE_COLUMN) {
            found = true;
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> BasaltStatement {
        let mut v = parse(sql).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    #[test]
    fn parses_basalt_commands() {
        assert_eq!(
            one("CREATE COLLECTION users WITH (shards = 4)"),
            BasaltStatement::CreateCollection {
                name: CollectionName::new("commons", "users"),
                shards: 4,
                if_not_exists: false
            }
        );
        assert_eq!(
            one("create collection if not exists demo.events"),
            BasaltStatement::CreateCollection {
                name: CollectionName::new("demo", "events"),
                shards: DEFAULT_SHARDS,
                if_not_exists: true
            }
        );
        assert_eq!(
            one("CREATE WORKSPACE demo"),
            BasaltStatement::CreateWorkspace { name: "demo".into(), if_not_exists: false }
        );
        assert_eq!(
            one("DROP COLLECTION IF EXISTS x;"),
            BasaltStatement::DropCollection { name: CollectionName::new("commons", "x"), if_exists: true }
        );
        assert_eq!(
            one("SHOW COLLECTIONS IN demo"),
            BasaltStatement::ShowCollections { workspace: Some("demo".into()) }
        );
        assert_eq!(
            one("describe demo.events"),
            BasaltStatement::Describe { name: CollectionName::new("demo", "events") }
        );
        assert!(parse("CREATE COLLECTION x WITH (replicas = 2)").is_err());
        assert!(parse("CREATE COLLECTION _bad").is_err());
        let src = one("CREATE SOURCE s1 FROM KAFKA (brokers = '127.0.0.1:9092', topic = 'clicks', format = 'json', \
                       start = 'latest', key_as_id = true) INTO demo.events");
        let BasaltStatement::CreateSource { name, collection, spec, if_not_exists: false } = src else { panic!() };
        assert_eq!((name.to_string(), collection.to_string()), ("commons.s1".into(), "demo.events".into()));
        let SourceSpec::Kafka(k) = spec else { panic!("{spec:?}") };
        assert_eq!((k.topic.as_str(), k.start, k.key_as_id), ("clicks", StartAt::Latest, true));
        let s3 = one("CREATE SOURCE s2 FROM S3 (bucket = 'logs', prefix = '2026/', format = 'parquet', \
                      endpoint = 'http://127.0.0.1:9000', region = 'us-east-1', poll_interval_ms = 0) INTO events \
                      TRANSFORM SELECT v FROM _input");
        let BasaltStatement::CreateSource { spec: SourceSpec::S3(s), .. } = s3 else { panic!("{s3:?}") };
        assert_eq!((s.bucket.as_str(), s.prefix.as_str(), s.format), ("logs", "2026/", SourceFormat::Parquet));
        assert_eq!((s.endpoint.as_deref(), s.poll_interval_ms), (Some("http://127.0.0.1:9000"), 0));
        assert!(s.ordered, "objects are read in key order unless the source says otherwise");
        assert!(s.transform.is_some());
        let unordered = one("CREATE SOURCE s3 FROM S3 (bucket = 'logs', ordered = false) INTO events");
        let BasaltStatement::CreateSource { spec: SourceSpec::S3(s), .. } = unordered else { panic!("{unordered:?}") };
        assert!(!s.ordered);
        for bad in [
            "CREATE SOURCE x FROM S3 (bucket = 'b', ordered = 'sometimes') INTO c",
            "CREATE SOURCE x FROM S3 (prefix = 'a') INTO c",
            "CREATE SOURCE x FROM S3 (bucket = 'b', format = 'orc') INTO c",
            "CREATE SOURCE x FROM S3 (bucket = 'b', secret_access_key = 'k') INTO c",
            "CREATE SOURCE x FROM S3 (bucket = 'b', poll_interval_ms = soon) INTO c",
            "CREATE SOURCE x FROM FTP (bucket = 'b') INTO c",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            one("DROP SOURCE IF EXISTS s1"),
            BasaltStatement::DropSource { name: CollectionName::new("commons", "s1"), if_exists: true }
        );
        assert_eq!(one("SHOW SOURCES"), BasaltStatement::ShowSources);
        let t = one("CREATE SOURCE t FROM KAFKA (brokers = 'b', topic = 't') INTO c \
                     TRANSFORM SELECT concat(user, '-', n) AS _id, n * 2 AS n2 FROM _input WHERE n > 1");
        let BasaltStatement::CreateSource { spec: SourceSpec::Kafka(k), .. } = t else { panic!() };
        assert!(k.transform.unwrap().contains("FROM _input WHERE n > 1"));
        for bad in [
            "SELECT n FROM other",
            "SELECT n FROM _input JOIN x ON true",
            "SELECT count(*) FROM _input GROUP BY n",
            "SELECT n FROM _input ORDER BY n",
            "SELECT 1 UNION SELECT 2",
            "DELETE FROM _input",
        ] {
            assert!(check_transform(bad).is_err(), "{bad}");
        }
        for bad in [
            "CREATE SOURCE s FROM KAFKA (topic = 't') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', password = 'x') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'avro') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', topic = 'u') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't')",
            "CREATE SOURCE s FROM FTP (brokers = 'b') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'csv') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', columns = 'a') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'csv', columns = 'a,,b') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'csv', columns = 'a, a') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'avro', schema = '{') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'avro', schema = '\"long\"') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', schema = '{}') INTO c",
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'avro', schema = '...', framing = 'x') \
             INTO c",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let schema = r#"{"type": "record", "name": "r", "fields": [{"name": "n", "type": "long"}]}"#;
        let avro = one(&format!(
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'avro', schema = '{schema}', \
             framing = 'confluent', schema_id = '7') INTO c"
        ));
        let BasaltStatement::CreateSource { spec: SourceSpec::Kafka(k), .. } = avro else { panic!("{avro:?}") };
        assert_eq!((k.format, k.framing, k.schema_id), (SourceFormat::Avro, AvroFraming::Confluent, Some(7)));
        assert_eq!(k.schema.as_deref(), Some(schema));
        let no_id_check = format!(
            "CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'avro', schema = '{schema}', \
             schema_id = '7') INTO c"
        );
        assert!(parse(&no_id_check).unwrap_err().message.contains("confluent"));
        let csv =
            one("CREATE SOURCE s FROM KAFKA (brokers = 'b', topic = 't', format = 'csv', columns = ' _id, n ') INTO c");
        let BasaltStatement::CreateSource { spec: SourceSpec::Kafka(k), .. } = csv else { panic!("{csv:?}") };
        assert_eq!((k.format, k.columns), (SourceFormat::Csv, vec!["_id".to_string(), "n".to_string()]));
        assert_eq!(parse("select 1; select 2;;").unwrap().len(), 2);
        assert!(parse("SELEC 1").is_err());
    }

    #[test]
    fn parses_dml_into_field_level_operations() {
        match one("UPDATE users SET address.city = 'Paris', n = n + 1 WHERE _id = 'u1'") {
            BasaltStatement::Update { name, assignments, selection, .. } => {
                assert_eq!(name, CollectionName::new("commons", "users"));
                assert_eq!(assignments.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(), ["address.city", "n"]);
                assert_eq!(selection.unwrap().to_string(), "_id = 'u1'");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(one("INSERT INTO users VALUES ('{}')"), BasaltStatement::Insert { .. }));
        assert!(matches!(one("DELETE FROM users WHERE age > 3"), BasaltStatement::Delete { .. }));
    }

    #[test]
    fn rewrites_score_calls() {
        let BasaltStatement::Query(q) = one("SELECT _id, score() FROM t WHERE search(x, 'a') ORDER BY score() DESC")
        else {
            panic!()
        };
        assert_eq!(q.to_string(), "SELECT _id, \"_score\" FROM t WHERE search(x, 'a') ORDER BY \"_score\" DESC");
        assert!(uses_score(&q));
        let BasaltStatement::Query(q) = one("SELECT 1") else { panic!() };
        assert!(!uses_score(&q));
    }

    #[test]
    fn rewrites_nested_paths_but_not_qualified_columns() {
        let BasaltStatement::Query(q) =
            one("SELECT name, address.city, u.address.city, u.age, tags[1] FROM users u WHERE address.geo.lat > 1")
        else {
            panic!()
        };
        assert_eq!(
            q.to_string(),
            "SELECT name, \"address.city\", u.\"address.city\", u.age, tags[1] FROM users u WHERE \"address.geo.lat\" > 1"
        );
        // Columns qualified with a workspace-qualified collection (SQLAlchemy writes these).
        let BasaltStatement::Query(q) =
            one("SELECT commons.people._id, commons.people.address.city, people.age FROM commons.people")
        else {
            panic!()
        };
        assert_eq!(
            q.to_string(),
            "SELECT commons.people._id, commons.people.\"address.city\", people.age FROM commons.people"
        );
    }

    #[test]
    fn parses_and_checks_rollups() {
        let st = one("CREATE COLLECTION clicks_per_minute AS ROLLUP \
             SELECT user_id, date_trunc('minute', _event_time) AS minute, count(*) AS clicks, sum(price) AS spend, \
             max(price) AS top, approx_distinct(page.url) AS pages FROM _input WHERE kind = 'click' \
             GROUP BY user_id, minute FROM SOURCE clicks_src");
        let BasaltStatement::CreateRollup { name, source, sql, shards, .. } = st else { panic!("{st:?}") };
        assert_eq!(
            (name.name.as_str(), source.name.as_str(), shards),
            ("clicks_per_minute", "clicks_src", DEFAULT_SHARDS)
        );
        let plan = check_rollup(&sql).unwrap();
        let roles: Vec<(&str, RollupColumn)> = plan.columns.iter().map(|(n, r)| (n.as_str(), *r)).collect();
        assert_eq!(
            roles,
            vec![
                ("user_id", RollupColumn::Key),
                ("minute", RollupColumn::Key),
                ("clicks", RollupColumn::Count),
                ("spend", RollupColumn::Sum),
                ("top", RollupColumn::Max),
                ("pages", RollupColumn::ApproxDistinct),
            ]
        );
        for bad in [
            "SELECT a, count(*) AS n FROM _input",
            "SELECT a, avg(x) AS m FROM _input GROUP BY a",
            "SELECT a, sum(x) * 2 AS m FROM _input GROUP BY a",
            "SELECT a, count(DISTINCT x) AS m FROM _input GROUP BY a",
            "SELECT a, count(*) FROM _input GROUP BY a",
            "SELECT a, count(*) AS a FROM _input GROUP BY a",
            "SELECT a, count(*) AS n FROM other GROUP BY a",
            "SELECT a, count(*) AS n FROM _input GROUP BY a HAVING count(*) > 1",
            "SELECT a FROM _input GROUP BY a",
            "SELECT a AS _id, count(*) AS n FROM _input GROUP BY a",
            "SELECT *, count(*) AS n FROM _input GROUP BY a",
        ] {
            assert!(check_rollup(bad).is_err(), "{bad}");
        }
        assert!(parse("CREATE COLLECTION r AS ROLLUP SELECT a, count(*) AS n FROM _input GROUP BY a").is_err());
        assert!(parse("CREATE COLLECTION r AS SELECT 1").is_err());
    }
}
