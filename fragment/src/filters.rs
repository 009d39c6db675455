//! Literal and operator conversions into the leaf filter language, shared by the planner's
//! filter pushdown (aggregator `translate`) and runtime (dynamic) filters: the bounds and key
//! lists a hash join learns from its build side, applied by the scan of its probe side.

use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, TimeUnit};
use basalt_common::filter::{CmpOp, Filter, Scalar};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CaseExpr, Column, InListExpr, Literal};
use datafusion::physical_expr_common::physical_expr::snapshot_physical_expr_opt;

/// The type of a column leaves can filter on (`_score` is computed by the scan, not stored).
pub fn column_type<'a>(schema: &'a Schema, name: &str) -> Option<&'a DataType> {
    if name == basalt_common::api::SCORE_COLUMN {
        return None;
    }
    schema.field_with_name(name).ok().map(|f| f.data_type())
}

pub fn cmp_op(op: Operator) -> Option<CmpOp> {
    Some(match op {
        Operator::Eq => CmpOp::Eq,
        Operator::NotEq => CmpOp::NotEq,
        Operator::Lt => CmpOp::Lt,
        Operator::LtEq => CmpOp::LtEq,
        Operator::Gt => CmpOp::Gt,
        Operator::GtEq => CmpOp::GtEq,
        _ => return None,
    })
}

/// The operator with its sides swapped (`3 < a` is `a > 3`).
pub fn flip(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::LtEq => CmpOp::GtEq,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::GtEq => CmpOp::LtEq,
        other => other,
    }
}

/// A literal as the leaf scalar of the column's type; None when the types do not line up
/// (DataFusion then keeps the filter).
pub fn scalar_for_column(v: &ScalarValue, ty: &DataType) -> Option<Scalar> {
    let int = || -> Option<i64> {
        Some(match v {
            ScalarValue::Int8(Some(x)) => i64::from(*x),
            ScalarValue::Int16(Some(x)) => i64::from(*x),
            ScalarValue::Int32(Some(x)) => i64::from(*x),
            ScalarValue::Int64(Some(x)) => *x,
            ScalarValue::UInt8(Some(x)) => i64::from(*x),
            ScalarValue::UInt16(Some(x)) => i64::from(*x),
            ScalarValue::UInt32(Some(x)) => i64::from(*x),
            ScalarValue::UInt64(Some(x)) => i64::try_from(*x).ok()?,
            _ => return None,
        })
    };
    match ty {
        DataType::Int64 => int().map(Scalar::Int),
        DataType::Float64 => match v {
            ScalarValue::Float64(Some(x)) => Some(Scalar::Float(*x)),
            ScalarValue::Float32(Some(x)) => Some(Scalar::Float(f64::from(*x))),
            _ => int().map(|i| Scalar::Float(i as f64)),
        },
        DataType::Utf8 | DataType::Utf8View => match v {
            ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => {
                Some(Scalar::Str(s.clone()))
            }
            _ => None,
        },
        DataType::Boolean => match v {
            ScalarValue::Boolean(Some(b)) => Some(Scalar::Bool(*b)),
            _ => None,
        },
        DataType::Timestamp(TimeUnit::Microsecond, _) => match v {
            ScalarValue::TimestampMicrosecond(Some(t), _) => Some(Scalar::Timestamp(*t)),
            ScalarValue::TimestampMillisecond(Some(t), _) => t.checked_mul(1000).map(Scalar::Timestamp),
            ScalarValue::TimestampSecond(Some(t), _) => t.checked_mul(1_000_000).map(Scalar::Timestamp),
            ScalarValue::TimestampNanosecond(Some(t), _) if t % 1000 == 0 => Some(Scalar::Timestamp(t / 1000)),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a filter pushed into a scan at planning time changes while the query runs (a hash
/// join's build-side bounds, a top-k threshold).
pub fn is_dynamic(expr: &Arc<dyn PhysicalExpr>) -> bool {
    snapshot_physical_expr_opt(Arc::clone(expr)).map(|t| t.transformed).unwrap_or(false)
}

/// Whether an expression reads the column `name`.
pub fn reads_column(expr: &Arc<dyn PhysicalExpr>, name: &str) -> bool {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut found = false;
    let _ = expr.apply(|e| {
        found |= e.downcast_ref::<Column>().is_some_and(|c| c.name() == name);
        Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    found
}

/// What a scan can apply of a dynamic filter right now: its current value, relaxed into the leaf
/// filter language (conjuncts that do not translate are dropped, so every row the filter keeps
/// is kept). None when nothing useful translates.
pub fn dynamic_to_leaf(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Result<Option<Filter>> {
    let current = snapshot_physical_expr_opt(Arc::clone(expr))?.data;
    Ok(relax(&current, schema))
}

/// A leaf filter every row satisfying `expr` satisfies (None: no such filter but `true`).
fn relax(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Option<Filter> {
    if let Some(binary) = expr.downcast_ref::<BinaryExpr>() {
        return match binary.op() {
            Operator::And => {
                let mut parts = vec![];
                for side in [binary.left(), binary.right()] {
                    match relax(side, schema) {
                        Some(Filter::And(inner)) => parts.extend(inner),
                        Some(f) => parts.push(f),
                        None => {}
                    }
                }
                match parts.len() {
                    0 => None,
                    1 => parts.pop(),
                    _ => Some(Filter::And(parts)),
                }
            }
            Operator::Or => Some(Filter::Or(vec![relax(binary.left(), schema)?, relax(binary.right(), schema)?])),
            op => {
                let op = cmp_op(*op)?;
                let (column, literal, op) = match (
                    binary.left().downcast_ref::<Column>(),
                    binary.right().downcast_ref::<Literal>(),
                    binary.left().downcast_ref::<Literal>(),
                    binary.right().downcast_ref::<Column>(),
                ) {
                    (Some(c), Some(l), _, _) => (c, l, op),
                    (_, _, Some(l), Some(c)) => (c, l, flip(op)),
                    _ => return None,
                };
                let value = scalar_for_column(literal.value(), column_type(schema, column.name())?)?;
                Some(Filter::Cmp { path: column.name().to_string(), op, value })
            }
        };
    }
    if let Some(list) = expr.downcast_ref::<InListExpr>() {
        let column = list.expr().downcast_ref::<Column>()?;
        if list.negated() {
            return None;
        }
        let ty = column_type(schema, column.name())?;
        let values = list
            .list()
            .iter()
            .map(|e| e.downcast_ref::<Literal>().and_then(|l| scalar_for_column(l.value(), ty)))
            .collect::<Option<Vec<_>>>()?;
        return Some(Filter::In { path: column.name().to_string(), values });
    }
    // A partitioned hash join's filter: `CASE hash(keys) % n WHEN i THEN <bounds of partition i>
    // ... ELSE false END`. Every row satisfies one branch, so it satisfies their disjunction.
    if let Some(case) = expr.downcast_ref::<CaseExpr>() {
        let mut branches = vec![];
        let thens = case.when_then_expr().iter().map(|(_, then)| then).chain(case.else_expr());
        for then in thens {
            if let Some(literal) = then.downcast_ref::<Literal>()
                && literal.value() == &ScalarValue::Boolean(Some(false))
            {
                continue;
            }
            branches.push(relax(then, schema)?);
        }
        return match branches.len() {
            // Every branch is false: no row passes. `_id IN ()` keeps none.
            0 => Some(Filter::In { path: basalt_common::doc::ID_FIELD.to_string(), values: vec![] }),
            1 => branches.pop(),
            _ => Some(Filter::Or(branches)),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;
    use datafusion::physical_expr::expressions::{DynamicFilterPhysicalExpr, col, in_list, lit};

    fn schema() -> Schema {
        Schema::new(vec![Field::new("_id", DataType::Utf8, false), Field::new("n", DataType::Int64, true)])
    }

    #[test]
    fn a_join_filter_becomes_bounds_and_keys() {
        let schema = schema();
        let id = col("_id", &schema).unwrap();
        let n = col("n", &schema).unwrap();
        let dynamic: Arc<dyn PhysicalExpr> = Arc::new(DynamicFilterPhysicalExpr::new(vec![id.clone()], lit(true)));
        assert!(is_dynamic(&dynamic));
        assert!(!is_dynamic(&lit(true)));
        // Before the build side is known the filter is `true`: nothing to apply.
        assert_eq!(dynamic_to_leaf(&dynamic, &schema).unwrap(), None);

        let keys = in_list(id.clone(), vec![lit("c1"), lit("c7")], &false, &schema).unwrap();
        let bounds: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(id.clone(), Operator::GtEq, lit("c1"))),
            Operator::And,
            Arc::new(BinaryExpr::new(id.clone(), Operator::LtEq, lit("c7"))),
        ));
        // A conjunct that does not translate (n + 1 > 3) is dropped, not the whole filter.
        let opaque: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(n.clone(), Operator::Plus, lit(1i64))),
            Operator::Gt,
            lit(3i64),
        ));
        let all: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(bounds, Operator::And, keys)),
            Operator::And,
            opaque.clone(),
        ));
        let updater = DynamicFilterPhysicalExpr::new(vec![id.clone()], lit(true));
        let dynamic = Arc::new(updater);
        dynamic.update(all).unwrap();
        let dynamic: Arc<dyn PhysicalExpr> = dynamic;
        let f = dynamic_to_leaf(&dynamic, &schema).unwrap().unwrap();
        assert_eq!(f.to_string(), "(_id >= 'c1' AND _id <= 'c7' AND _id IN ('c1', 'c7'))");
        assert_eq!(basalt_common::filter::id_lookup(&[f]), Some(vec!["c1".to_string(), "c7".to_string()]));

        // Partitioned: CASE over partitions becomes the disjunction of the branches; a branch
        // that does not translate makes the whole filter untranslatable.
        let case = |thens: Vec<Arc<dyn PhysicalExpr>>| -> Arc<dyn PhysicalExpr> {
            let whens = thens.into_iter().enumerate().map(|(i, t)| (lit(i as i64), t)).collect();
            Arc::new(CaseExpr::try_new(Some(n.clone()), whens, Some(lit(false))).unwrap())
        };
        let low: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(n.clone(), Operator::Lt, lit(5i64)));
        let high: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(lit(100i64), Operator::Lt, n.clone()));
        let f = relax(&case(vec![low.clone(), high]), &schema).unwrap();
        assert_eq!(f.to_string(), "(n < 5 OR n > 100)");
        assert_eq!(relax(&case(vec![low, opaque]), &schema), None);
    }
}
