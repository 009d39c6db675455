//! Translation of DataFusion filter expressions into the leaf filter language. A filter that
//! translates is evaluated completely by leaves (`Exact`); one that does not stays in DataFusion.

use arrow::datatypes::{DataType, Schema};
use basalt_common::filter::{CmpOp, Filter, Scalar};
use basalt_fragment::filters::{cmp_op, column_type, flip, scalar_for_column};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{BinaryExpr, Cast, Expr, Operator};

/// What a filter compares: a column, or a text column cast to a date (`l_shipdate < DATE
/// '1995-01-01'` on a text column is `CAST(l_shipdate AS DATE) < ...` after type coercion;
/// leaves parse each block's text once and keep the dates).
enum Operand<'a> {
    Column(&'a str, &'a DataType),
    TextAsDate(&'a str),
}

impl<'a> Operand<'a> {
    fn of(e: &'a Expr, schema: &'a Schema) -> Option<Operand<'a>> {
        match e {
            Expr::Column(c) => Some(Operand::Column(c.name.as_str(), column_type(schema, &c.name)?)),
            Expr::Cast(Cast { expr, field }) if field.data_type() == &DataType::Date32 => match expr.as_ref() {
                Expr::Column(c)
                    if matches!(column_type(schema, &c.name), Some(DataType::Utf8 | DataType::Utf8View)) =>
                {
                    Some(Operand::TextAsDate(c.name.as_str()))
                }
                _ => None,
            },
            _ => None,
        }
    }

    fn path(&self) -> &'a str {
        match self {
            Operand::Column(p, _) | Operand::TextAsDate(p) => p,
        }
    }

    /// A literal as the leaf scalar this operand compares with.
    fn scalar(&self, e: &Expr) -> Option<Scalar> {
        let Expr::Literal(v, _) = e else { return None };
        match self {
            Operand::Column(_, ty) => scalar_for_column(v, ty),
            Operand::TextAsDate(_) => match v {
                ScalarValue::Date32(Some(d)) => Some(Scalar::Date(*d)),
                _ => None,
            },
        }
    }
}

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
            let op = cmp_op(*op)?;
            let (operand, value, op) = match (Operand::of(left, schema), Operand::of(right, schema)) {
                (Some(o), None) => (o, right.as_ref(), op),
                (None, Some(o)) => (o, left.as_ref(), flip(op)),
                // Text read as dates: leaves keep each block's parsed dates (DataFusion would
                // parse both columns on every query: 5.4x slower on TPC-H SF 1 lineitem).
                (Some(Operand::TextAsDate(l)), Some(Operand::TextAsDate(r))) => {
                    return Some(Filter::CmpDates { left: l.to_string(), op, right: r.to_string() });
                }
                // Two fields of one type (`l_commitdate < l_receiptdate` on text): leaves compare
                // only the rows their other filters keep, and neither field needs to leave the
                // scan (in DataFusion above the scan both were taken for every row a join's key
                // list kept, then filtered again).
                (Some(Operand::Column(l, lt)), Some(Operand::Column(r, rt))) if lt == rt => {
                    use basalt_common::schema::ColumnType;
                    // Text reaches SQL as views of the leaves' strings; leaves compare the bytes.
                    let ty = match lt {
                        DataType::Utf8View => ColumnType::Utf8,
                        other => ColumnType::from_arrow(other).filter(|t| !matches!(t, ColumnType::List(_)))?,
                    };
                    return Some(Filter::CmpFields { left: l.to_string(), op, right: r.to_string(), ty });
                }
                _ => return None,
            };
            Some(Filter::Cmp { path: operand.path().to_string(), op, value: operand.scalar(value)? })
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
            let operand = Operand::of(&list.expr, schema)?;
            let values = list.list.iter().map(|e| operand.scalar(e)).collect::<Option<Vec<_>>>()?;
            let f = Filter::In { path: operand.path().to_string(), values };
            Some(if list.negated { Filter::Not(Box::new(f)) } else { f })
        }
        Expr::Between(b) => {
            let operand = Operand::of(&b.expr, schema)?;
            let path = operand.path().to_string();
            let range = Filter::And(vec![
                Filter::Cmp { path: path.clone(), op: CmpOp::GtEq, value: operand.scalar(&b.low)? },
                Filter::Cmp { path, op: CmpOp::LtEq, value: operand.scalar(&b.high)? },
            ]);
            Some(if b.negated { Filter::Not(Box::new(range)) } else { range })
        }
        // Case-sensitive LIKE of a text column with literal text and `%`s (TPC-H's patterns):
        // leaves match each block's text without a regular expression.
        Expr::Like(like) if !like.case_insensitive && like.escape_char.is_none() => {
            let Expr::Column(c) = like.expr.as_ref() else { return None };
            if !matches!(column_type(schema, &c.name), Some(DataType::Utf8 | DataType::Utf8View)) {
                return None;
            }
            let pattern = match like.pattern.as_ref() {
                Expr::Literal(
                    ScalarValue::Utf8(Some(p)) | ScalarValue::Utf8View(Some(p)) | ScalarValue::LargeUtf8(Some(p)),
                    _,
                ) if basalt_common::filter::like_pushable(p) => p.clone(),
                _ => return None,
            };
            let f = Filter::Like { path: c.name.clone(), pattern };
            Some(if like.negated { Filter::Not(Box::new(f)) } else { f })
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
        // LIKE with `%` only; `_`, escapes, ILIKE and a non-text column stay in DataFusion.
        assert_eq!(translate(&col("name").like(lit("%a%b%")), &schema).unwrap().to_string(), "name LIKE '%a%b%'");
        assert_eq!(translate(&col("name").not_like(lit("x%")), &schema).unwrap().to_string(), "NOT name LIKE 'x%'");
        assert!(translate(&col("name").like(lit("a_c")), &schema).is_none());
        assert!(translate(&col("name").like(lit("50\\%")), &schema).is_none());
        assert!(translate(&col("name").ilike(lit("%a%")), &schema).is_none());
        assert!(translate(&col("age").like(lit("1%")), &schema).is_none());
    }

    #[test]
    fn comparisons_of_two_fields_are_pushed() {
        use basalt_common::schema::ColumnType;
        use datafusion::logical_expr::cast;
        let schema = Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("x", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("t", DataType::Utf8, true),
        ]);
        let dates = cast(col("s"), DataType::Date32).lt(cast(col("t"), DataType::Date32));
        let f = translate(&dates, &schema).unwrap();
        assert_eq!(f, Filter::CmpDates { left: "s".into(), op: CmpOp::Lt, right: "t".into() });
        assert_eq!(f.to_string(), "CAST(s AS DATE) < CAST(t AS DATE)");
        // Other pairs of one type are compared as that type.
        let ints = translate(&col("a").lt(col("b")), &schema).unwrap();
        assert_eq!(
            ints,
            Filter::CmpFields { left: "a".into(), op: CmpOp::Lt, right: "b".into(), ty: ColumnType::Int64 }
        );
        assert_eq!(ints.to_string(), "a < b");
        let texts = translate(&col("s").gt_eq(col("t")), &schema).unwrap();
        assert_eq!(
            texts,
            Filter::CmpFields { left: "s".into(), op: CmpOp::GtEq, right: "t".into(), ty: ColumnType::Utf8 }
        );
        let views =
            Schema::new(vec![Field::new("v", DataType::Utf8View, true), Field::new("w", DataType::Utf8View, true)]);
        let f = translate(&col("v").lt(col("w")), &views).unwrap();
        assert_eq!(f, Filter::CmpFields { left: "v".into(), op: CmpOp::Lt, right: "w".into(), ty: ColumnType::Utf8 });
        // Different types (DataFusion would cast one side) stay in DataFusion.
        assert!(translate(&col("a").lt(col("x")), &schema).is_none());
        assert!(translate(&col("a").lt(col("s")), &schema).is_none());
        assert!(translate(&cast(col("s"), DataType::Date32).lt(col("a")), &schema).is_none());
    }

    #[test]
    fn text_compared_with_a_date_is_pushed_as_a_date_comparison() {
        use datafusion::logical_expr::cast;
        let schema = Schema::new(vec![Field::new("day", DataType::Utf8, true), Field::new("n", DataType::Int64, true)]);
        let date = |d: i32| lit(ScalarValue::Date32(Some(d)));
        let f = translate(&cast(col("day"), DataType::Date32).lt(date(9131)), &schema).unwrap();
        assert_eq!(f, Filter::Cmp { path: "day".into(), op: CmpOp::Lt, value: Scalar::Date(9131) });
        assert_eq!(f.to_string(), "CAST(day AS DATE) < DATE '1995-01-01'");
        let flipped = translate(&date(9131).lt(cast(col("day"), DataType::Date32)), &schema).unwrap();
        assert_eq!(flipped.to_string(), "CAST(day AS DATE) > DATE '1995-01-01'");
        let between = cast(col("day"), DataType::Date32).between(date(0), date(1));
        assert_eq!(
            translate(&between, &schema).unwrap().to_string(),
            "(CAST(day AS DATE) >= DATE '1970-01-01' AND CAST(day AS DATE) <= DATE '1970-01-02')"
        );
        // Only text columns, only date literals, only casts to DATE.
        assert!(translate(&cast(col("n"), DataType::Date32).lt(date(1)), &schema).is_none());
        assert!(translate(&cast(col("day"), DataType::Date32).lt(lit("1995-01-01")), &schema).is_none());
        assert!(translate(&cast(col("day"), DataType::Int64).lt(lit(1i64)), &schema).is_none());
        // A text column against an integer column stays in DataFusion.
        assert!(translate(&col("day").eq(col("n")), &schema).is_none());
    }
}
