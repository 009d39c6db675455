//! Point lookups by `_id` without the general planner, like TiDB's `Point_Get` or CockroachDB's
//! fast path: `SELECT <columns or *> FROM c WHERE _id = <literal or $n>` (or `_id IN (...)`)
//! goes straight to the row store of the one shard that owns each id. Planning such a statement
//! with DataFusion costs more than the lookup itself, and a feature store issues little else.
//!
//! Only the exact shape is taken: the statement must print back as the canonical
//! `SELECT .. FROM .. WHERE ..` built from its parts (so no other clause is present), every
//! projected item must be a plain column of the collection, and every id a string. Anything else
//! (including names that do not resolve, so errors stay DataFusion's) goes the general way.
//! The result has exactly the schema the general plan would have.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use basalt_common::api::{CollectionName, DEFAULT_WORKSPACE, Leaf, Meta, ScanRequest};
use basalt_common::doc::{ID_FIELD, shard_for_id};
use basalt_common::filter::{AccessPath, CmpOp, Filter, Scalar};
use basalt_common::{ErrorCode, Result};
use basalt_sql::sqlparser::ast::{
    BinaryOperator, Expr, ObjectNamePart, SelectItem, SetExpr, Statement, TableFactor, Value, ValueWithSpan,
};
use datafusion::common::ScalarValue;
use futures::TryStreamExt;

use crate::table::table_schema;

static SERVED: std::sync::LazyLock<Option<prometheus::IntCounter>> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "basalt_point_lookups_total",
        "Queries answered by the point-lookup fast path (no general planning)"
    )
    .ok()
});

/// How many queries the fast path answered in this process.
pub fn served() -> u64 {
    SERVED.as_ref().map_or(0, |c| c.get())
}

/// A statement of the point-lookup shape.
#[derive(Debug, PartialEq)]
pub struct PointLookup {
    pub collection: CollectionName,
    pub items: Vec<Item>,
    pub ids: Vec<IdRef>,
}

#[derive(Debug, PartialEq)]
pub enum Item {
    All,
    Column { name: String, alias: Option<String> },
}

#[derive(Debug, PartialEq)]
pub enum IdRef {
    Literal(String),
    /// `$n`, 1-based.
    Param(usize),
}

fn id_ref(e: &Expr) -> Option<IdRef> {
    match e {
        Expr::Value(ValueWithSpan { value: Value::SingleQuotedString(s), .. }) => Some(IdRef::Literal(s.clone())),
        Expr::Value(ValueWithSpan { value: Value::Placeholder(p), .. }) => {
            p.strip_prefix('$').and_then(|n| n.parse().ok()).filter(|n| *n >= 1).map(IdRef::Param)
        }
        _ => None,
    }
}

fn is_id(e: &Expr) -> bool {
    matches!(e, Expr::Identifier(i) if i.value == ID_FIELD)
}

/// Recognize the point-lookup shape.
pub fn match_point_lookup(stmt: &Statement) -> Option<PointLookup> {
    let Statement::Query(query) = stmt else { return None };
    let SetExpr::Select(select) = query.body.as_ref() else { return None };
    let [from] = select.from.as_slice() else { return None };
    let selection = select.selection.as_ref()?;
    // No clause beyond these three: the statement prints exactly as they do.
    let items: Vec<String> = select.projection.iter().map(ToString::to_string).collect();
    let canonical = format!("SELECT {} FROM {from} WHERE {selection}", items.join(", "));
    if stmt.to_string() != canonical || !from.joins.is_empty() {
        return None;
    }
    let TableFactor::Table { name, alias: None, .. } = &from.relation else { return None };
    let parts: Vec<&str> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(i.value.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let collection = match parts.as_slice() {
        [c] => CollectionName::new(DEFAULT_WORKSPACE, *c),
        [ws, c] => CollectionName::new(*ws, *c),
        _ => return None,
    };
    let items = select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::Wildcard(_) if item.to_string() == "*" => Some(Item::All),
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(Item::Column { name: i.value.clone(), alias: None }),
            SelectItem::ExprWithAlias { expr: Expr::Identifier(i), alias } => {
                Some(Item::Column { name: i.value.clone(), alias: Some(alias.value.clone()) })
            }
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let ids = match selection {
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } if is_id(left) => vec![id_ref(right)?],
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } if is_id(right) => vec![id_ref(left)?],
        Expr::InList { expr, list, negated: false } if is_id(expr) && !list.is_empty() => {
            list.iter().map(id_ref).collect::<Option<Vec<_>>>()?
        }
        _ => return None,
    };
    Some(PointLookup { collection, items, ids })
}

/// Run a point lookup, or `None` when it must go through the general planner instead.
pub async fn run(
    lookup: &PointLookup,
    params: &[ScalarValue],
    meta: &Meta,
    leaf: &Leaf,
) -> Result<Option<(SchemaRef, Vec<RecordBatch>)>> {
    let mut ids = Vec::with_capacity(lookup.ids.len());
    for id in &lookup.ids {
        ids.push(match id {
            IdRef::Literal(s) => s.clone(),
            IdRef::Param(n) => match params.get(n - 1) {
                Some(ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s))) => {
                    s.clone()
                }
                _ => return Ok(None),
            },
        });
    }
    let info = match meta.get_collection(lookup.collection.clone()).await {
        Ok(info) => info,
        Err(e) if e.code == ErrorCode::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let stats = leaf.stats(info.id, (0..info.shards).collect()).await?;
    let columns = stats.columns();
    let table = table_schema(&columns);
    // Output fields, each pointing at a scanned column.
    let mut scanned: Vec<usize> = Vec::new();
    let mut fields = Vec::new();
    let mut sources = Vec::new();
    let mut scan_column = |i: usize| match scanned.iter().position(|s| *s == i) {
        Some(at) => at,
        None => {
            scanned.push(i);
            scanned.len() - 1
        }
    };
    for item in &lookup.items {
        match item {
            Item::All => {
                for (i, f) in table.fields().iter().enumerate() {
                    fields.push(f.as_ref().clone());
                    sources.push(scan_column(i));
                }
            }
            Item::Column { name, alias } => {
                let Ok(i) = table.index_of(name) else { return Ok(None) };
                let f = table.field(i);
                fields.push(Field::new(alias.as_deref().unwrap_or(name), f.data_type().clone(), f.is_nullable()));
                sources.push(scan_column(i));
            }
        }
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let scan_columns: Vec<_> = scanned.iter().map(|i| columns[*i].clone()).collect();
    // Each id once, grouped by the shard that owns it.
    let mut seen = HashSet::new();
    let mut by_shard: BTreeMap<u32, Vec<Scalar>> = BTreeMap::new();
    for id in ids.into_iter().filter(|id| seen.insert(id.clone())) {
        by_shard.entry(shard_for_id(&id, info.shards)).or_default().push(Scalar::Str(id));
    }
    let mut out = Vec::new();
    for (shard, mut values) in by_shard {
        let filter = match values.len() {
            1 => Filter::Cmp { path: ID_FIELD.into(), op: CmpOp::Eq, value: values.remove(0) },
            _ => Filter::In { path: ID_FIELD.into(), values },
        };
        let request = ScanRequest {
            collection_id: info.id,
            shard,
            columns: scan_columns.clone(),
            filters: vec![filter],
            limit: None,
            hint: Some(AccessPath::RowLookup),
            ordered_by: None,
            text_views: false,
            text_codes: vec![],
        };
        let batches: Vec<RecordBatch> = leaf.scan(request).await?.try_collect().await?;
        for b in batches {
            let arrays: Vec<ArrayRef> = sources.iter().map(|s| b.column(*s).clone()).collect();
            out.push(RecordBatch::try_new(schema.clone(), arrays)?);
        }
    }
    if let Some(c) = SERVED.as_ref() {
        c.inc();
    }
    Ok(Some((schema, out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> Statement {
        match basalt_sql::parse(sql).unwrap().pop().unwrap() {
            basalt_sql::BasaltStatement::Query(q) => *q,
            other => panic!("not a query: {other:?}"),
        }
    }

    #[test]
    fn recognizes_only_the_point_lookup_shape() {
        let got = match_point_lookup(&parse("SELECT * FROM users WHERE _id = 'u1'")).unwrap();
        assert_eq!(got.collection, CollectionName::new("commons", "users"));
        assert_eq!((got.items, got.ids), (vec![Item::All], vec![IdRef::Literal("u1".into())]));
        let got = match_point_lookup(&parse("SELECT name, address.city AS c FROM ws.u WHERE $1 = _id")).unwrap();
        assert_eq!(got.collection, CollectionName::new("ws", "u"));
        assert_eq!(
            got.items,
            vec![
                Item::Column { name: "name".into(), alias: None },
                Item::Column { name: "address.city".into(), alias: Some("c".into()) }
            ]
        );
        assert_eq!(got.ids, vec![IdRef::Param(1)]);
        let got = match_point_lookup(&parse("SELECT _id FROM u WHERE _id IN ('a', $2)")).unwrap();
        assert_eq!(got.ids, vec![IdRef::Literal("a".into()), IdRef::Param(2)]);
        for sql in [
            "SELECT * FROM u WHERE _id = 'a' LIMIT 1",
            "SELECT * FROM u WHERE _id = 'a' ORDER BY name",
            "SELECT DISTINCT name FROM u WHERE _id = 'a'",
            "SELECT count(*) FROM u WHERE _id = 'a'",
            "SELECT upper(name) FROM u WHERE _id = 'a'",
            "SELECT * FROM u WHERE _id = 'a' AND age > 3",
            "SELECT * FROM u WHERE _id = 1",
            "SELECT * FROM u WHERE _id NOT IN ('a')",
            "SELECT * FROM u, v WHERE _id = 'a'",
            "SELECT * FROM u AS x WHERE _id = 'a'",
            "SELECT * FROM u WHERE name = 'a'",
            "SELECT * FROM u",
            "WITH x AS (SELECT 1) SELECT * FROM u WHERE _id = 'a'",
            "SELECT * FROM u WHERE _id = 'a' UNION SELECT * FROM u WHERE _id = 'b'",
            "SELECT * FROM c.ws.u WHERE _id = 'a'",
        ] {
            assert_eq!(match_point_lookup(&parse(sql)), None, "{sql}");
        }
    }
}
