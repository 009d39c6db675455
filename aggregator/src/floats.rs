//! Comparisons of floating-point values with exact numeric literals compare as floats.
//!
//! Numeric literals are exact decimals here (`parse_float_as_decimal`, as in PostgreSQL), and
//! DataFusion's type coercion then compares a `double precision` value with one by casting
//! every value to `Decimal128(30, 15)`: `l_discount BETWEEN 0.05 AND 0.07` became
//! `CAST(l_discount AS DECIMAL(30, 15)) >= 0.05 AND ...`, a cast per row that no leaf evaluates,
//! so the scan sent every row its other filters kept to be cast and filtered above it.
//! PostgreSQL and DuckDB compare `double precision` with `numeric` as doubles (the literal is
//! cast, once); this rule does the same for filters: `CAST(x AS DECIMAL(p, s)) op literal`, `x`
//! a Float64, becomes `x op literal::double`, which leaves evaluate.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result, ScalarValue};
use datafusion::logical_expr::expr::Between;
use datafusion::logical_expr::{BinaryExpr, Cast, Expr, ExprSchemable, LogicalPlan, Operator};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

#[derive(Debug, Default)]
pub struct FloatComparisons;

impl OptimizerRule for FloatComparisons {
    fn name(&self) -> &str {
        "basalt_float_comparisons"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(&self, plan: LogicalPlan, _config: &dyn OptimizerConfig) -> Result<Transformed<LogicalPlan>> {
        // Only filters: a predicate stays a boolean, so no schema above changes (a projected
        // expression would change its column's name).
        let LogicalPlan::Filter(mut filter) = plan else { return Ok(Transformed::no(plan)) };
        let schema = filter.input.schema().clone();
        let rewritten = filter.predicate.clone().transform_up(|e| compare_as_floats(e, &schema))?;
        if !rewritten.transformed {
            return Ok(Transformed::no(LogicalPlan::Filter(filter)));
        }
        filter.predicate = rewritten.data;
        Ok(Transformed::yes(LogicalPlan::Filter(filter)))
    }
}

/// `e` rewritten when it compares a float cast to a decimal with decimal literals.
fn compare_as_floats(e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) if is_comparison(op) => {
            if let (Some(x), Some(v)) = (float_cast(&left, schema), decimal_as_f64(&right)) {
                return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(Box::new(x), op, Box::new(v)))));
            }
            if let (Some(v), Some(x)) = (decimal_as_f64(&left), float_cast(&right, schema)) {
                return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(Box::new(v), op, Box::new(x)))));
            }
            Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr { left, op, right })))
        }
        Expr::Between(b) => {
            if let (Some(x), Some(low), Some(high)) =
                (float_cast(&b.expr, schema), decimal_as_f64(&b.low), decimal_as_f64(&b.high))
            {
                return Ok(Transformed::yes(Expr::Between(Between::new(
                    Box::new(x),
                    b.negated,
                    Box::new(low),
                    Box::new(high),
                ))));
            }
            Ok(Transformed::no(Expr::Between(b)))
        }
        other => Ok(Transformed::no(other)),
    }
}

fn is_comparison(op: Operator) -> bool {
    matches!(op, Operator::Eq | Operator::NotEq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq)
}

/// The Float64 expression under `CAST(... AS DECIMAL(p, s))`.
fn float_cast(e: &Expr, schema: &DFSchema) -> Option<Expr> {
    let Expr::Cast(Cast { expr, field }) = e else { return None };
    if !matches!(field.data_type(), DataType::Decimal128(..) | DataType::Decimal256(..)) {
        return None;
    }
    matches!(expr.get_type(schema), Ok(DataType::Float64)).then(|| expr.as_ref().clone())
}

/// A non-null decimal literal as the nearest double.
fn decimal_as_f64(e: &Expr) -> Option<Expr> {
    let Expr::Literal(v @ ScalarValue::Decimal128(Some(_), _, _), _) = e else { return None };
    // The decimal's text parsed: the double nearest to the exact value.
    let x: f64 = v.to_string().parse().ok()?;
    x.is_finite().then(|| Expr::Literal(ScalarValue::Float64(Some(x)), None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::{cast, col, lit};

    fn schema() -> DFSchema {
        DFSchema::try_from(Schema::new(vec![
            Field::new("d", DataType::Float64, true),
            Field::new("n", DataType::Int64, true),
        ]))
        .unwrap()
    }

    fn dec(v: i128, s: i8) -> Expr {
        lit(ScalarValue::Decimal128(Some(v), 30, s))
    }

    fn rewrite(e: Expr) -> Expr {
        e.transform_up(|e| compare_as_floats(e, &schema())).unwrap().data
    }

    #[test]
    fn floats_compared_with_decimals_compare_as_floats() {
        let as_dec = |e: Expr| cast(e, DataType::Decimal128(30, 15));
        assert_eq!(rewrite(as_dec(col("d")).gt_eq(dec(50_000_000_000_000, 15))), col("d").gt_eq(lit(0.05f64)));
        assert_eq!(rewrite(dec(-15, 1).lt(as_dec(col("d")))), lit(-1.5f64).lt(col("d")));
        assert_eq!(
            rewrite(as_dec(col("d")).between(dec(5, 2), dec(7, 2))),
            col("d").between(lit(0.05f64), lit(0.07f64))
        );
        // Not a float under the cast, not a literal, not a comparison, a null literal: kept.
        for kept in [
            as_dec(col("n")).gt(dec(5, 2)),
            as_dec(col("d")).gt(as_dec(col("d"))),
            as_dec(col("d")) + dec(5, 2),
            as_dec(col("d")).eq(lit(ScalarValue::Decimal128(None, 30, 15))),
            cast(col("d"), DataType::Int64).gt(lit(3i64)),
        ] {
            assert_eq!(rewrite(kept.clone()), kept);
        }
    }
}
