//! Translation of DataFusion filter expressions into the leaf filter language. A filter that
//! translates is evaluated completely by leaves (`Exact`); one that does not stays in DataFusion.

use arrow::datatypes::Schema;
use basalt_common::filter::{CmpOp, Filter};
use basalt_fragment::filters::{cmp_op, column_type, flip, scalar_for_column};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

/// Translate one filter, or None when leaves cannot evaluate it exactly.
pub fn translate(expr: &Expr, schema: &Schema) -> Option<Filter> {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => {
            Some(Filter::And(vec![translate(left, schema)?, translate(right, schema)?]))
        }
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Or, right }) => {
            Some(Filter::Or(vec![translate(left, schema)?, translate(right, schema)?]))
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (path, lit, op) = match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), Expr::Literal(v, _)) => (c.name.as_str(), v, cmp_op(*op)?),
                (Expr::Literal(v, _), Expr::Column(c)) => (c.name.as_str(), v, flip(cmp_op(*op)?)),
                _ => return None,
            };
            let value = scalar_for_column(lit, column_type(schema, path)?)?;
            Some(Filter::Cmp { path: path.to_string(), op, value })
        }
        Expr::Not(inner) => Some(Filter::Not(Box::new(translate(inner, schema)?))),
        Expr::IsNull(inner) => match inner.as_ref() {
            Expr::Column(c) if column_type(schema, &c.name).is_some() => Some(Filter::IsNull(c.name.clone())),
            _ => None,
        },
        Expr::IsNotNull(inner) => match inner.as_ref() {
            Expr::Column(c) if column_type(schema, &c.name).is_some() => Some(Filter::IsNotNull(c.name.clone())),
            _ => None,
        },
        Expr::InList(list) => {
            let Expr::Column(c) = list.expr.as_ref() else { return None };
            let ty = column_type(schema, &c.name)?;
            let values = list
                .list
                .iter()
                .map(|e| match e {
                    Expr::Literal(v, _) => scalar_for_column(v, ty),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let f = Filter::In { path: c.name.clone(), values };
            Some(if list.negated { Filter::Not(Box::new(f)) } else { f })
        }
        Expr::Between(b) => {
            let Expr::Column(c) = b.expr.as_ref() else { return None };
            let ty = column_type(schema, &c.name)?;
            let lit = |e: &Expr| match e {
                Expr::Literal(v, _) => scalar_for_column(v, ty),
                _ => None,
            };
            let range = Filter::And(vec![
                Filter::Cmp { path: c.name.clone(), op: CmpOp::GtEq, value: lit(&b.low)? },
                Filter::Cmp { path: c.name.clone(), op: CmpOp::LtEq, value: lit(&b.high)? },
            ]);
            Some(if b.negated { Filter::Not(Box::new(range)) } else { range })
        }
        Expr::ScalarFunction(f) if f.name() == crate::udf::SEARCH => match f.args.as_slice() {
            [
                Expr::Column(c),
                Expr::Literal(
                    ScalarValue::Utf8(Some(q)) | ScalarValue::Utf8View(Some(q)) | ScalarValue::LargeUtf8(Some(q)),
                    _,
                ),
            ] => {
                column_type(schema, &c.name)?;
                Some(Filter::Search { path: c.name.clone(), query: q.clone() })
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field};
    use datafusion::logical_expr::{col, lit};

    #[test]
    fn translates_pushable_filters_only() {
        let schema = Schema::new(vec![
            Field::new("age", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
        ]);
        let f = translate(&col("age").gt(lit(30i64)).and(col("name").eq(lit("ada"))), &schema).unwrap();
        assert_eq!(f.to_string(), "(age > 30 AND name = 'ada')");
        assert_eq!(translate(&lit(3i64).lt(col("age")), &schema).unwrap().to_string(), "age > 3");
        assert_eq!(translate(&col("score").gt_eq(lit(2i64)), &schema).unwrap().to_string(), "score >= 2");
        assert!(translate(&(col("age") + lit(1i64)).gt(lit(3i64)), &schema).is_none());
        assert!(translate(&col("age").eq(lit("x")), &schema).is_none());
        assert!(translate(&col("missing").eq(lit(1i64)), &schema).is_none());
        assert_eq!(
            translate(&col("name").in_list(vec![lit("a"), lit("b")], true), &schema).unwrap().to_string(),
            "NOT name IN ('a', 'b')"
        );
    }
}
