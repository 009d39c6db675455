//! Postgres-tool compatibility: `pg_catalog`, the catalog functions and the SQL forms that psql,
//! psycopg, SQLAlchemy and pandas send, through `datafusion-pg-catalog` (the emulation the
//! DataFusion community keeps for these tools), plus `version()` and the `SHOW` settings
//! clients read when they connect.
//!
//! The emulation is set up in a session the first time a statement names the catalog: it
//! loads Postgres' static catalog tables, which plain queries and HTTP requests (a session
//! each) should not pay for.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use basalt_common::{BasaltError, Result};
use basalt_sql::BasaltStatement;
use basalt_sql::sqlparser::ast::Statement;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::prelude::SessionContext;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

/// The server version clients see (SQLAlchemy and others parse it to pick features).
pub const SERVER_VERSION: &str = "16.0";

static PARSER: LazyLock<PostgresCompatibilityParser> = LazyLock::new(PostgresCompatibilityParser::new);

/// Whether a SQL text reaches for the Postgres catalog or its functions. Only then do
/// statements go through the emulation's parser and rewrite rules (written for tools'
/// catalog queries; a user's query is planned as written).
pub fn names_the_catalog(sql: &str) -> bool {
    // Without lowering a copy of the text: every statement passes here, INSERTs of megabytes too.
    ["pg_", "information_schema", "current_schema", "current_database", "current_user", "session_user", "::reg"]
        .iter()
        .any(|needle| sql.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes())))
}

/// Statements of a catalog query, parsed and rewritten by the emulation; `None` when the text
/// is not plain queries (Basalt's own statements, writes), which Basalt's parser then takes.
pub fn parse_catalog_query(sql: &str) -> Option<Vec<BasaltStatement>> {
    let mut statements = PARSER.parse(sql).ok()?;
    if statements.is_empty() || !statements.iter().all(|s| matches!(s, Statement::Query(_))) {
        return None;
    }
    for s in &mut statements {
        like_escapes_to_backslash(s);
        conditions_into_subqueries(s);
        arrays_of_reloptions(s);
        vector_columns_to_arrays(s);
        // Again, now that subqueries under CASE stand in the projection: the emulation answers
        // correlated ones there with NULL (what Basalt has: no defaults, identities, collations).
        *s = PARSER.rewrite(s.clone());
    }
    Some(statements.into_iter().map(|s| BasaltStatement::Query(Box::new(s))).collect())
}

/// An expression from SQL text the rewrites build (None if it does not parse).
fn expr(text: &str) -> Option<basalt_sql::sqlparser::ast::Expr> {
    use basalt_sql::sqlparser::dialect::PostgreSqlDialect;
    use basalt_sql::sqlparser::parser::Parser;
    Parser::new(&PostgreSqlDialect {}).try_with_sql(text).and_then(|mut p| p.parse_expr()).ok()
}

/// `LIKE p ESCAPE 'c'` with another escape character than the backslash (SQLAlchemy's
/// reflection uses `/`), which DataFusion does not take: the pattern is rewritten to backslash
/// escapes (`\` doubled first, then `c` turned into `\`).
fn like_escapes_to_backslash(statement: &mut Statement) {
    use basalt_sql::sqlparser::ast::{Expr, Value, visit_expressions_mut};
    let _ = visit_expressions_mut(statement, |e| {
        if let Expr::Like { pattern, escape_char, .. } | Expr::ILike { pattern, escape_char, .. } = e
            && let Some(escape) = escape_char
            && let Value::SingleQuotedString(c) = &escape.value
            && c != "\\"
            && c.chars().count() == 1
        {
            let text = format!("replace(replace(({pattern}), '\\', '\\\\'), '{}', '\\')", c.replace('\'', "''"));
            if let Some(rewritten) = expr(&text) {
                **pattern = rewritten;
                *escape_char = None;
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

/// `CASE WHEN c THEN (SELECT x FROM t WHERE w) [ELSE NULL] END` becomes
/// `(SELECT x FROM t WHERE (w) AND (c))`, the same answer for a subquery of at most one row
/// (none: NULL); DataFusion cannot plan a correlated subquery inside CASE.
fn conditions_into_subqueries(statement: &mut Statement) {
    use basalt_sql::sqlparser::ast::{BinaryOperator, Expr, SetExpr, Value, visit_expressions_mut};
    let _ = visit_expressions_mut(statement, |e| {
        if let Expr::Case { operand: None, conditions, else_result, .. } = e
            && conditions.len() == 1
            && else_result.as_deref().is_none_or(|r| matches!(r, Expr::Value(v) if v.value == Value::Null))
            && let Expr::Subquery(q) = &conditions[0].result
            && q.limit_clause.is_none()
            && matches!(q.body.as_ref(), SetExpr::Select(_))
        {
            let condition = conditions[0].condition.clone();
            let mut q = q.clone();
            if let SetExpr::Select(select) = q.body.as_mut() {
                let nested = |e: Expr| Expr::Nested(Box::new(e));
                select.selection = Some(match select.selection.take() {
                    Some(w) => Expr::BinaryOp {
                        left: Box::new(nested(w)),
                        op: BinaryOperator::And,
                        right: Box::new(nested(condition)),
                    },
                    None => condition,
                });
            }
            *e = Expr::Subquery(q);
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

/// `ARRAY(SELECT ... FROM unnest(t.reloptions) ...)` (psql's `\d+`): Basalt keeps no storage
/// options, so the array is NULL, as `reloptions` itself (DataFusion has no `ARRAY(subquery)`).
fn arrays_of_reloptions(statement: &mut Statement) {
    use basalt_sql::sqlparser::ast::{Expr, FunctionArguments, visit_expressions_mut};
    let _ = visit_expressions_mut(statement, |e| {
        if let Expr::Function(f) = e
            && f.name.to_string().eq_ignore_ascii_case("array")
            && let FunctionArguments::Subquery(q) = &f.args
            && q.to_string().to_ascii_lowercase().contains("reloptions")
            && let Some(null) = expr("CAST(NULL AS TEXT[])")
        {
            *e = null;
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

/// The emulation keeps `int2vector`/array catalog columns (`pg_index.indkey`,
/// `pg_constraint.conkey`, ...) as text ("1 2", "[1, 2]"); `unnest(c)` and
/// `generate_subscripts(c, 1)` over them become the same over the numbers the text holds.
fn vector_columns_to_arrays(statement: &mut Statement) {
    use basalt_sql::sqlparser::ast::{Expr, FunctionArg, FunctionArgExpr, FunctionArguments, visit_expressions_mut};
    const VECTORS: [&str; 7] = ["indkey", "indoption", "indclass", "indcollation", "conkey", "confkey", "stxkeys"];
    let _ = visit_expressions_mut(statement, |e| {
        // Catalog columns the emulation lacks, with the value they would have here.
        if let Expr::CompoundIdentifier(parts) = e
            && parts.len() >= 2
            && parts.last().is_some_and(|i| i.value.eq_ignore_ascii_case("reloptions"))
            && let Some(null) = expr("CAST(NULL AS TEXT[])")
        {
            *e = null;
            return std::ops::ControlFlow::<()>::Continue(());
        }
        let Expr::Function(f) = e else { return std::ops::ControlFlow::<()>::Continue(()) };
        let name = f.name.to_string().to_ascii_lowercase();
        let name = name.trim_start_matches("pg_catalog.");
        let FunctionArguments::List(list) = &f.args else { return std::ops::ControlFlow::Continue(()) };
        let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(column))) = list.args.first() else {
            return std::ops::ControlFlow::Continue(());
        };
        let last = match column {
            Expr::Identifier(i) => i.value.to_ascii_lowercase(),
            Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.to_ascii_lowercase()).unwrap_or_default(),
            _ => return std::ops::ControlFlow::Continue(()),
        };
        if !VECTORS.contains(&last.as_str()) {
            return std::ops::ControlFlow::Continue(());
        }
        let array = format!(
            "CAST(string_to_array(NULLIF(trim(regexp_replace(CAST({column} AS TEXT), '[^0-9-]+', ' ', 'g')), ''), ' ') \
             AS BIGINT[])"
        );
        let text = match (name, list.args.len()) {
            ("unnest", 1) => format!("unnest({array})"),
            ("generate_subscripts", 2) => {
                format!("unnest(range(1, CAST(coalesce(array_length({array}, 1), 0) AS BIGINT) + 1))")
            }
            _ => return std::ops::ControlFlow::Continue(()),
        };
        if let Some(rewritten) = expr(&text) {
            *e = rewritten;
        }
        std::ops::ControlFlow::Continue(())
    });
}

/// Install `pg_catalog` (tables over Basalt's catalog, Postgres' static tables) and the catalog
/// functions into a session.
pub fn setup(ctx: &SessionContext, catalog: &str) -> Result<()> {
    datafusion_pg_catalog::setup_pg_catalog(ctx, catalog, EmptyContextProvider)
        .map_err(|e| BasaltError::internal(format!("cannot set up pg_catalog: {e}")))?;
    ctx.register_udf(ScalarUDF::from(ToRegtype::new()));
    ctx.register_udf(ScalarUDF::from(JsonBuildObject::new()));
    // No sequences, no index expressions, no triggers; every collation is visible.
    ctx.register_udf(constant_udf("pg_get_serial_sequence", ScalarValue::Utf8(None)));
    ctx.register_udf(constant_udf("pg_get_indexdef", ScalarValue::Utf8(None)));
    ctx.register_udf(constant_udf("pg_get_triggerdef", ScalarValue::Utf8(None)));
    // Comments on columns and relations: Basalt keeps none.
    ctx.register_udf(constant_udf("col_description", ScalarValue::Utf8(None)));
    ctx.register_udf(constant_udf("pg_collation_is_visible", ScalarValue::Boolean(Some(true))));
    Ok(())
}

/// A catalog function whose answer never depends on its arguments here.
fn constant_udf(name: &'static str, value: ScalarValue) -> ScalarUDF {
    ScalarUDF::from(Constant { name, signature: Signature::variadic_any(Volatility::Stable), value })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: &'static str,
    signature: Signature,
    value: ScalarValue,
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(self.value.data_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

/// `current_setting(name [, missing_ok])`: the settings `SHOW` answers.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CurrentSetting {
    signature: Signature,
}

impl ScalarUDFImpl for CurrentSetting {
    fn name(&self) -> &str {
        "current_setting"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        let Some(first) = args.args.first() else {
            return Err(datafusion::common::DataFusionError::Plan("current_setting takes a setting name".into()));
        };
        let names = first.to_array(args.number_rows)?;
        let mut out = arrow::array::StringBuilder::new();
        for row in 0..args.number_rows {
            let name = scalar_text(&ScalarValue::try_from_array(&names, row)?);
            match name.map(|n| n.to_ascii_lowercase()) {
                Some(n) => match setting(&n) {
                    Some(v) => out.append_value(v),
                    None => {
                        return Err(datafusion::common::DataFusionError::Plan(format!(
                            "unrecognized configuration parameter \"{n}\""
                        )));
                    }
                },
                None => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `json_build_object(k1, v1, ...)`: a JSON object as text.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: Signature,
}

impl JsonBuildObject {
    fn new() -> Self {
        Self { signature: Signature::variadic_any(Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        if !args.args.len().is_multiple_of(2) {
            return Err(datafusion::common::DataFusionError::Plan(
                "json_build_object takes an even number of arguments".into(),
            ));
        }
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let mut out = arrow::array::StringBuilder::new();
        for row in 0..args.number_rows {
            let mut object = serde_json::Map::new();
            for pair in arrays.chunks(2) {
                let key = ScalarValue::try_from_array(&pair[0], row)?;
                let value = ScalarValue::try_from_array(&pair[1], row)?;
                object.insert(scalar_text(&key).unwrap_or_default(), scalar_json(&value));
            }
            out.append_value(serde_json::Value::Object(object).to_string());
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

fn scalar_text(v: &ScalarValue) -> Option<String> {
    (!v.is_null()).then(|| match v {
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => s.clone(),
        other => other.to_string(),
    })
}

/// A value as JSON (numbers, booleans, text; other types as their text).
pub(crate) fn scalar_json(v: &ScalarValue) -> serde_json::Value {
    use serde_json::Value;
    if v.is_null() {
        return Value::Null;
    }
    match v {
        ScalarValue::Boolean(Some(b)) => Value::Bool(*b),
        ScalarValue::Int8(_) | ScalarValue::Int16(_) | ScalarValue::Int32(_) | ScalarValue::Int64(_) => {
            v.to_string().parse::<i64>().map(Value::from).unwrap_or(Value::Null)
        }
        ScalarValue::UInt8(_) | ScalarValue::UInt16(_) | ScalarValue::UInt32(_) | ScalarValue::UInt64(_) => {
            v.to_string().parse::<u64>().map(Value::from).unwrap_or(Value::Null)
        }
        ScalarValue::Float32(Some(f)) => serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        ScalarValue::Float64(Some(f)) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        other => scalar_text(other).map_or(Value::Null, Value::String),
    }
}

/// Functions every session has (cheap): `version()` and `current_setting()`.
pub fn register_functions(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(Version::new()));
    ctx.register_udf(ScalarUDF::from(CurrentSetting { signature: Signature::variadic_any(Volatility::Stable) }));
}

/// `to_regtype(name)`: the oid of a built-in type by name, NULL for types Basalt does not have
/// (drivers probe for extension types such as `hstore` this way).
#[derive(Debug, PartialEq, Eq, Hash)]
struct ToRegtype {
    signature: Signature,
}

impl ToRegtype {
    fn new() -> Self {
        Self { signature: Signature::exact(vec![DataType::Utf8], Volatility::Stable) }
    }
}

fn type_oid(name: &str) -> Option<i32> {
    let name = name.trim().trim_start_matches("pg_catalog.").to_ascii_lowercase();
    Some(match name.as_str() {
        "bool" | "boolean" => 16,
        "bytea" => 17,
        "int8" | "bigint" => 20,
        "int2" | "smallint" => 21,
        "int4" | "integer" | "int" => 23,
        "text" => 25,
        "oid" => 26,
        "json" => 114,
        "float4" | "real" => 700,
        "float8" | "double precision" => 701,
        "varchar" | "character varying" => 1043,
        "date" => 1082,
        "timestamp" | "timestamp without time zone" => 1114,
        "timestamptz" | "timestamp with time zone" => 1184,
        "interval" => 1186,
        "numeric" | "decimal" => 1700,
        "uuid" => 2950,
        "jsonb" => 3802,
        _ => return None,
    })
}

impl ScalarUDFImpl for ToRegtype {
    fn name(&self) -> &str {
        "to_regtype"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Int32)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        use arrow::array::{AsArray, Int32Array};
        let [arg] = args.args.as_slice() else {
            return Err(datafusion::common::DataFusionError::Plan("to_regtype takes one argument".into()));
        };
        Ok(match arg {
            ColumnarValue::Scalar(v) => {
                let name = match v {
                    ScalarValue::Utf8(s) | ScalarValue::LargeUtf8(s) | ScalarValue::Utf8View(s) => s.as_deref(),
                    _ => None,
                };
                ColumnarValue::Scalar(ScalarValue::Int32(name.and_then(type_oid)))
            }
            ColumnarValue::Array(a) => {
                let a = arrow::compute::cast(a, &DataType::Utf8)?;
                let oids: Int32Array = a.as_string::<i32>().iter().map(|n| n.and_then(type_oid)).collect();
                ColumnarValue::Array(Arc::new(oids))
            }
        })
    }
}

/// `version()`: a Postgres-shaped version string (clients parse "PostgreSQL <major>.<minor>").
#[derive(Debug, PartialEq, Eq, Hash)]
struct Version {
    signature: Signature,
}

impl Version {
    fn new() -> Self {
        Self { signature: Signature::nullary(Volatility::Stable) }
    }
}

impl ScalarUDFImpl for Version {
    fn name(&self) -> &str {
        "version"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(version_string()))))
    }
}

pub fn version_string() -> String {
    format!("PostgreSQL {SERVER_VERSION} (Basalt {}) on x86_64-pc-linux-gnu, 64-bit", env!("CARGO_PKG_VERSION"))
}

/// The value of a Postgres setting clients ask for with `SHOW name` (lower-case name).
pub fn setting(name: &str) -> Option<String> {
    let value = match name {
        "server_version" => SERVER_VERSION,
        "server_version_num" => "160000",
        "standard_conforming_strings" => "on",
        "transaction_isolation" | "transaction isolation level" | "default_transaction_isolation" => "read committed",
        "transaction_read_only" | "default_transaction_read_only" => "off",
        "client_encoding" | "server_encoding" => "UTF8",
        "datestyle" => "ISO, MDY",
        "timezone" => "UTC",
        "integer_datetimes" => "on",
        "intervalstyle" => "postgres",
        "max_identifier_length" => "63",
        "search_path" => "\"$user\", public",
        "is_superuser" => "on",
        "lc_collate" | "lc_ctype" => "C",
        "application_name" => "",
        "default_table_access_method" => "heap",
        _ => return None,
    };
    Some(value.to_string())
}

/// A one-row, one-column result named after the setting.
pub fn setting_batch(name: &str, value: String) -> Result<(SchemaRef, RecordBatch)> {
    let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec![value])) as ArrayRef])?;
    Ok((schema, batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_catalog_queries_take_the_emulation() {
        assert!(names_the_catalog("SELECT c.relname FROM pg_catalog.pg_class c"));
        assert!(names_the_catalog("select current_schema()"));
        assert!(!names_the_catalog("SELECT count(*) FROM orders WHERE o_orderkey = 1"));
        assert!(parse_catalog_query("SELECT oid FROM pg_catalog.pg_class").is_some());
        assert!(parse_catalog_query("CREATE COLLECTION pg_things").is_none());
        assert!(parse_catalog_query("DELETE FROM pg_things").is_none());
        assert!(version_string().starts_with("PostgreSQL 16.0 "));
        assert_eq!(setting("standard_conforming_strings").as_deref(), Some("on"));
        assert_eq!(setting("no_such_setting"), None);
    }

    #[test]
    fn like_escapes_become_backslashes() {
        let statements = parse_catalog_query(
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname NOT LIKE 'pg/_%' ESCAPE '/'",
        )
        .unwrap();
        let BasaltStatement::Query(q) = &statements[0] else { panic!() };
        let text = q.to_string();
        assert!(text.contains(r"replace(replace(('pg/_%'), '\', '\\'), '/', '\')"), "{text}");
        assert!(!text.contains("ESCAPE"), "{text}");
    }
}
