//! `x NOT IN (SELECT ...)` over an uncorrelated subquery with few rows, answered as a list.
//!
//! DataFusion plans `NOT IN` with a subquery as a null-aware anti join (a NULL among the
//! subquery's values makes every comparison unknown), which it can only build on the outer side:
//! TPC-H q16 hashed the 118,000 rows of `part` joined with `partsupp` into one partition to probe
//! the 4 suppliers with complaints, and the aggregation after it started on one thread. The
//! subquery runs first instead, and when it returns at most [`MAX_VALUES`] rows its values
//! replace it: `x NOT IN (v1, v2, ...)` has the same meaning in SQL (with a NULL among the
//! values it is never true; with no values it is always true) and is a filter the leaves apply.
//!
//! The subquery reads the collections a moment before the rest of the statement, as every scan
//! of a statement takes its own snapshot.

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::expr::{InList, InSubquery};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Subquery};
use datafusion::prelude::SessionContext;

/// The most values a subquery may return to become a list (the runtime list limit).
pub const MAX_VALUES: usize = crate::engine::RUNTIME_IN_LIST_MAX;

/// `plan` with each uncorrelated `NOT IN` subquery of at most [`MAX_VALUES`] rows replaced by
/// the list of its values; subqueries with more rows, with parameters or correlated stay.
pub async fn inline_not_in(ctx: &SessionContext, plan: LogicalPlan) -> Result<LogicalPlan> {
    let mut found: Vec<Subquery> = Vec::new();
    plan.apply_with_subqueries(|node| {
        for e in node.expressions() {
            e.apply(|e| {
                if let Expr::InSubquery(InSubquery { subquery, negated: true, .. }) = e
                    && subquery.outer_ref_columns.is_empty()
                    && !found.contains(subquery)
                {
                    found.push(subquery.clone());
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if found.is_empty() {
        return Ok(plan);
    }
    let mut lists: Vec<(Subquery, Vec<ScalarValue>)> = Vec::new();
    for subquery in found {
        let inner = subquery.subquery.as_ref();
        if inner.schema().fields().len() != 1 || !inner.get_parameter_types()?.is_empty() {
            continue;
        }
        let limited = LogicalPlanBuilder::from(inner.clone()).limit(0, Some(MAX_VALUES + 1))?.build()?;
        let batches = ctx.execute_logical_plan(limited).await?.collect().await?;
        if batches.iter().map(|b| b.num_rows()).sum::<usize>() > MAX_VALUES {
            continue;
        }
        let mut values = Vec::new();
        for batch in &batches {
            let column = batch.column(0);
            for row in 0..batch.num_rows() {
                values.push(ScalarValue::try_from_array(column, row)?);
            }
        }
        // In one order whatever order the shards answered in (a plan that reads the same each
        // time), each value once.
        values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        values.dedup();
        lists.push((subquery, values));
    }
    if lists.is_empty() {
        return Ok(plan);
    }
    plan.transform_up_with_subqueries(|node| {
        node.map_expressions(|e| {
            e.transform_up(|e| match e {
                Expr::InSubquery(InSubquery { expr, subquery, negated: true }) => {
                    match lists.iter().find(|(s, _)| *s == subquery) {
                        Some((_, values)) => {
                            let list = values.iter().cloned().map(|v| Expr::Literal(v, None)).collect();
                            Ok(Transformed::yes(Expr::InList(InList::new(expr, list, true))))
                        }
                        None => Ok(Transformed::no(Expr::InSubquery(InSubquery { expr, subquery, negated: true }))),
                    }
                }
                e => Ok(Transformed::no(e)),
            })
        })
    })
    .map(|t| t.data)
}
