//! Aggregates computed below joins with large, unfiltered inputs (eager aggregation).
//!
//! TPC-H q10 sums `lineitem` joined with `orders` (one quarter's orders) per customer, grouped
//! by the customer's key, name, address, comment and nation. Planned as written, all 1.5M
//! customers (260 MB of text at SF 10) come up from the leaves, a hash table is built on them,
//! and 1.15M joined rows are grouped by seven columns, four of them text. Summing the joined
//! `orders` and `lineitem` rows per `o_custkey` first leaves 381,000 groups; the customers then
//! travel as the probe side of a join whose 381,000 keys reach their scan as a key set, and the
//! final grouping reads 381,000 rows: q10 at SF 10 on two leaves 1.05 -> 0.55 s.
//!
//! The rewrite: an aggregate of `sum`, `min`, `max` and (with GROUP BY) `count` over a tree of
//! inner equi-joins whose inputs split into an *aggregated side* S (every aggregate argument reads only S) and the
//! *other side* C, with
//! - C's inputs plain scans with no filter (moving them above the aggregate then loses no
//!   filtering: an unfiltered input cannot make S smaller through the join);
//! - every join condition and group expression within S or within C, except the equi pairs
//!   between them, whose S side is a column (as are the group expressions over S);
//! - the groups of S's key columns (those group expressions and S's side of the pairs) at most
//!   half of S's estimated rows ([`MAX_GROUP_FRACTION`]), and no more than C's rows,
//!
//! becomes `Aggregate(G, f(partial)) <- Join(C, Aggregate(keys, f(args) AS partial) <- S)`.
//! It is exact: each C row joins the rows of S with its keys' values either way, and `sum`,
//! `min` and `max` of partial results over those rows are the function over the rows, the sum
//! of partial counts their count. Off with the join order (`SET basalt.join_order = off`).

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Result};
use datafusion::logical_expr::expr::{AggregateFunction, AggregateFunctionParams};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Aggregate, BinaryExpr, Expr, JoinType, LogicalPlan, LogicalPlanBuilder, Operator};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

use crate::joins::{Edge, Tree, estimate_rows, is_reorderable, join_estimate};

/// An equi pair: the input of each side (a bit each) and the two sides' expressions.
type Pair = (u64, u64, Expr, Expr);

/// Most groups of the aggregated side's keys, as a fraction of its estimated rows, for the
/// rewrite to pay.
pub const MAX_GROUP_FRACTION: f64 = 0.5;
/// Most join inputs searched (every split of them is tried).
const MAX_INPUTS: usize = 10;
/// Names of the partial results the aggregated side computes.
const PARTIAL: &str = "__basalt_eager_";

#[derive(Debug)]
pub struct EagerAggregates {
    pub options: Arc<parking_lot::RwLock<crate::catalog::PlanOptions>>,
}

impl OptimizerRule for EagerAggregates {
    fn name(&self) -> &str {
        "basalt_eager_aggregates"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        None
    }

    fn rewrite(&self, plan: LogicalPlan, _config: &dyn OptimizerConfig) -> Result<Transformed<LogicalPlan>> {
        if !self.options.read().join_order() {
            return Ok(Transformed::no(plan));
        }
        plan.transform_down(|node| {
            Ok(match rewrite(&node)? {
                // The aggregate below is not searched again: one split per aggregate.
                Some(new) => Transformed::new(new, true, TreeNodeRecursion::Jump),
                None => Transformed::no(node),
            })
        })
    }
}

/// The aggregate functions the rewrite knows: `sum`, `min` and `max` merge their partial
/// results with themselves, `count` with `sum` (see [`merge_function`]).
fn mergeable(e: &Expr) -> Option<&AggregateFunction> {
    match e {
        Expr::AggregateFunction(f)
            if matches!(f.func.name(), "sum" | "min" | "max" | "count")
                && matches!(&f.params, AggregateFunctionParams { args, distinct: false, filter: None, order_by, .. }
                    if args.len() == 1 && order_by.is_empty()) =>
        {
            Some(f)
        }
        Expr::Alias(a) => mergeable(&a.expr),
        _ => None,
    }
}

/// The function that merges `f`'s partial results: itself, or `sum` for a `count`.
fn merge_function(f: &AggregateFunction) -> Arc<datafusion::logical_expr::AggregateUDF> {
    match f.func.name() {
        "count" => datafusion::functions_aggregate::sum::sum_udaf(),
        _ => f.func.clone(),
    }
}

/// A plain scan of a collection with no filter and no limit (through aliases and projections
/// of columns).
fn unfiltered_scan(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::TableScan(s) => s.filters.is_empty() && s.fetch.is_none(),
        LogicalPlan::SubqueryAlias(a) => unfiltered_scan(&a.input),
        LogicalPlan::Projection(p) => p.expr.iter().all(|e| matches!(e, Expr::Column(_))) && unfiltered_scan(&p.input),
        _ => false,
    }
}

/// `plan` below projections of columns alone (they only narrow what the joins return).
fn through_columns(plan: &LogicalPlan) -> &LogicalPlan {
    match plan {
        LogicalPlan::Projection(p) if p.expr.iter().all(|e| matches!(e, Expr::Column(_))) => through_columns(&p.input),
        _ => plan,
    }
}

/// The inputs, equi pairs and filters of a tree of inner joins, through projections of columns
/// between them (the optimizer puts them there to narrow each join's output).
fn flatten(tree: &mut Tree, plan: &LogicalPlan) {
    let inner = through_columns(plan);
    match inner {
        LogicalPlan::Join(j) if is_reorderable(inner) => {
            flatten(tree, &j.left);
            flatten(tree, &j.right);
            tree.on.extend(j.on.iter().cloned());
            if let Some(f) = &j.filter {
                tree.filters.extend(datafusion::logical_expr::utils::split_conjunction_owned(f.clone()));
            }
        }
        _ => tree.inputs.push(plan.clone()),
    }
}

/// Whether the inputs in `mask` are connected by the pairs in `edges`.
fn connected(mask: u64, edges: &[Edge]) -> bool {
    let mut reached = mask & mask.wrapping_neg();
    loop {
        let mut next = reached;
        for e in edges {
            let [a, b] = &e.sides;
            let (ba, bb) = (1u64 << a.0, 1u64 << b.0);
            if (ba | bb) & !mask == 0 && (next & (ba | bb)) != 0 {
                next |= ba | bb;
            }
        }
        if next == reached {
            return reached == mask;
        }
        reached = next;
    }
}

/// Estimated rows of joining the inputs in `mask` (greedily, the smallest join first).
fn joined_rows(mask: u64, rows: &[f64], edges: &[Edge]) -> Option<f64> {
    let first = mask.trailing_zeros() as usize;
    let (mut have, mut est) = (1u64 << first, rows[first]);
    while have != mask {
        let (i, r) = (0..rows.len())
            .filter(|i| mask & !have & (1 << i) != 0)
            .filter_map(|i| join_estimate((have, est), (1 << i, rows[i]), edges).map(|r| (i, r)))
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        have |= 1 << i;
        est = r;
    }
    Some(est)
}

/// The inputs in `mask` joined on the pairs between them (the smaller estimate on the build
/// side, each next input the one whose join is estimated smallest), with the filters that read
/// only them.
fn join_inputs(
    tree: &Tree,
    mask: u64,
    rows: &[f64],
    (pairs, edges): (&[Pair], &[Edge]),
    filters: &[(u64, Expr)],
) -> Result<Option<(LogicalPlan, f64)>> {
    let first = mask.trailing_zeros() as usize;
    let (mut have, mut plan, mut est) = (1u64 << first, tree.inputs[first].clone(), rows[first]);
    while have != mask {
        let mut best: Option<(usize, f64)> = None;
        for i in (0..rows.len()).filter(|i| mask & !have & (1 << i) != 0) {
            if let Some(r) = join_estimate((have, est), (1 << i, rows[i]), edges)
                && best.is_none_or(|(_, b)| r < b)
            {
                best = Some((i, r));
            }
        }
        let Some((i, r)) = best else { return Ok(None) };
        let (mut lkeys, mut rkeys) = (Vec::new(), Vec::new());
        for (ma, mb, a, b) in pairs {
            if ma & have != 0 && *mb == 1 << i {
                lkeys.push(a.clone());
                rkeys.push(b.clone());
            } else if mb & have != 0 && *ma == 1 << i {
                lkeys.push(b.clone());
                rkeys.push(a.clone());
            }
        }
        let input = tree.inputs[i].clone();
        plan = if est <= rows[i] {
            LogicalPlanBuilder::from(plan).join_with_expr_keys(input, JoinType::Inner, (lkeys, rkeys), None)?.build()?
        } else {
            LogicalPlanBuilder::from(input).join_with_expr_keys(plan, JoinType::Inner, (rkeys, lkeys), None)?.build()?
        };
        have |= 1 << i;
        est = r;
    }
    let within: Vec<Expr> = filters.iter().filter(|(m, _)| m & !mask == 0).map(|(_, f)| f.clone()).collect();
    if let Some(f) = conjunction(within) {
        plan = LogicalPlanBuilder::from(plan).filter(f)?.build()?;
    }
    Ok(Some((plan, est)))
}

/// The equi pairs whose both sides lie in `mask`, as estimator edges (`join_estimate` reads
/// only the edges between the two parts it is given).
fn pair_edges(tree: &Tree, pairs: &[Pair], rows: &[f64], mask: u64) -> Vec<Edge> {
    pairs
        .iter()
        .filter(|(a, b, ..)| (a | b) & !mask == 0)
        .map(|(ma, mb, a, b)| {
            let (ia, ib) = (ma.trailing_zeros() as usize, mb.trailing_zeros() as usize);
            Edge {
                sides: [
                    (ia, a.clone(), tree.distinct_of(ia, a, rows[ia])),
                    (ib, b.clone(), tree.distinct_of(ib, b, rows[ib])),
                ],
                integers: false,
                class: None,
            }
        })
        .collect()
}

/// The chosen split: the aggregated side's inputs, its key columns and its estimated groups.
struct Split {
    side: u64,
    keys: Vec<Column>,
    groups: f64,
}

/// `plan` rewritten when it is an aggregate the module's rewrite applies to (None otherwise).
fn rewrite(plan: &LogicalPlan) -> Result<Option<LogicalPlan>> {
    let LogicalPlan::Aggregate(agg) = plan else { return Ok(None) };
    let joins = through_columns(&agg.input);
    let Some(functions) = agg.aggr_expr.iter().map(mergeable).collect::<Option<Vec<_>>>() else { return Ok(None) };
    if !is_reorderable(joins) || functions.is_empty() {
        return Ok(None);
    }
    // Without groups an empty input gives one row, where a count is 0 but a sum of counts
    // NULL; with groups every group has rows.
    let counts = functions.iter().any(|f| f.func.name() == "count");
    if agg.group_expr.iter().any(|g| matches!(g, Expr::GroupingSet(_))) || counts && agg.group_expr.is_empty() {
        return Ok(None);
    }
    let mut tree = Tree::default();
    flatten(&mut tree, joins);
    let n = tree.inputs.len();
    if !(2..=MAX_INPUTS).contains(&n) || tree.inputs.iter().any(|p| matches!(p, LogicalPlan::Aggregate(_))) {
        return Ok(None);
    }
    let Some(rows) = tree.inputs.iter().map(estimate_rows).collect::<Option<Vec<f64>>>() else { return Ok(None) };
    // Equi pairs (with the equalities between two inputs among the join filters), each side
    // reading one input; the other filters with the inputs they read.
    let pair = |a: &Expr, b: &Expr| match (tree.input_of(a), tree.input_of(b)) {
        (Some(x), Some(y)) if x != y => Some((1u64 << x, 1u64 << y, a.clone(), b.clone())),
        _ => None,
    };
    let Some(mut pairs) = tree.on.iter().map(|(a, b)| pair(a, b)).collect::<Option<Vec<Pair>>>() else {
        return Ok(None);
    };
    let mut filters: Vec<(u64, Expr)> = Vec::new();
    for f in &tree.filters {
        if let Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) = f
            && let Some(p) = pair(left, right)
        {
            pairs.push(p);
            continue;
        }
        let Some(mask) = tree.inputs_of(f) else { return Ok(None) };
        filters.push((mask, f.clone()));
    }
    let mut args = 0u64;
    for f in &functions {
        let Some(mask) = tree.inputs_of(&f.params.args[0]) else { return Ok(None) };
        args |= mask;
    }
    let mut groups = Vec::with_capacity(agg.group_expr.len());
    for g in &agg.group_expr {
        let Some(mask) = tree.inputs_of(g) else { return Ok(None) };
        groups.push((mask, g));
    }
    let full = (1u64 << n) - 1;
    let edges = pair_edges(&tree, &pairs, &rows, full);
    let mut best: Option<Split> = None;
    for side in 1..full {
        let other = full & !side;
        if side & args != args
            || !connected(side, &edges)
            || !connected(other, &edges)
            || (0..n).any(|i| other & (1 << i) != 0 && !unfiltered_scan(&tree.inputs[i]))
            || filters.iter().any(|(m, _)| m & side != 0 && m & other != 0)
        {
            continue;
        }
        // The aggregated side's key columns: its group expressions and its side of each pair.
        let mut keys: Vec<(usize, Column)> = Vec::new();
        let mut add = |e: &Expr| -> bool {
            let Expr::Column(c) = e else { return false };
            let Some(i) = tree.input_of(e) else { return false };
            if !keys.iter().any(|(_, k)| k == c) {
                keys.push((i, c.clone()));
            }
            true
        };
        let mut fits = true;
        for (mask, g) in &groups {
            if mask & side != 0 {
                fits &= mask & other == 0 && add(g);
            }
        }
        for (ma, mb, a, b) in &pairs {
            let crossing = (ma | mb) & side != 0 && (ma | mb) & other != 0;
            if crossing {
                fits &= add(if ma & side != 0 { a } else { b });
            }
        }
        if !fits || keys.is_empty() {
            continue;
        }
        let (Some(side_rows), Some(other_rows)) = (joined_rows(side, &rows, &edges), joined_rows(other, &rows, &edges))
        else {
            continue;
        };
        // Distinct combinations of the keys; of them, those `side_rows` rows are expected to hold.
        let combinations: f64 =
            keys.iter().map(|(i, c)| tree.distinct_of(*i, &Expr::Column(c.clone()), rows[*i])).product();
        // (`exp_m1`: with many combinations the ratio is tiny and `1 - exp` would round to 0.)
        let expected = (combinations * -(-side_rows / combinations).exp_m1()).min(side_rows);
        if expected <= MAX_GROUP_FRACTION * side_rows
            && expected <= other_rows
            && best.as_ref().is_none_or(|b| expected < b.groups)
        {
            best = Some(Split { side, keys: keys.into_iter().map(|(_, c)| c).collect(), groups: expected });
        }
    }
    let Some(split) = best else { return Ok(None) };
    build(agg, &functions, &tree, &rows, (&pairs, &edges), &filters, split)
}

/// The rewritten plan for `split` (None when its schema would differ from the aggregate's).
fn build(
    agg: &Aggregate,
    functions: &[&AggregateFunction],
    tree: &Tree,
    rows: &[f64],
    (pairs, edges): (&[Pair], &[Edge]),
    filters: &[(u64, Expr)],
    split: Split,
) -> Result<Option<LogicalPlan>> {
    let full = (1u64 << tree.inputs.len()) - 1;
    let other = full & !split.side;
    let Some((side_plan, _)) = join_inputs(tree, split.side, rows, (pairs, edges), filters)? else { return Ok(None) };
    let Some((other_plan, other_rows)) = join_inputs(tree, other, rows, (pairs, edges), filters)? else {
        return Ok(None);
    };
    let mut partial = Vec::with_capacity(agg.aggr_expr.len());
    let mut merge = Vec::with_capacity(agg.aggr_expr.len());
    let group_len = agg.group_expr.len();
    for (k, f) in functions.iter().enumerate() {
        let name = format!("{PARTIAL}{k}");
        let call = |func, arg: Expr| {
            Expr::AggregateFunction(AggregateFunction::new_udf(func, vec![arg], false, None, vec![], None))
        };
        partial.push(call(f.func.clone(), f.params.args[0].clone()).alias(&name));
        let output = agg.schema.field(group_len + k).name().clone();
        merge.push(call(merge_function(f), Expr::Column(Column::from_name(name))).alias(output));
    }
    let keys: Vec<Expr> = split.keys.iter().cloned().map(Expr::Column).collect();
    let pre = LogicalPlanBuilder::from(side_plan).aggregate(keys, partial)?.build()?;
    let (mut lkeys, mut rkeys) = (Vec::new(), Vec::new());
    for (ma, mb, a, b) in pairs {
        if ma & other != 0 && mb & split.side != 0 {
            lkeys.push(a.clone());
            rkeys.push(b.clone());
        } else if mb & other != 0 && ma & split.side != 0 {
            lkeys.push(b.clone());
            rkeys.push(a.clone());
        }
    }
    // The smaller estimate on the build (left) side: its keys then reach the other's scans.
    let joined = if split.groups <= other_rows {
        LogicalPlanBuilder::from(pre).join_with_expr_keys(other_plan, JoinType::Inner, (rkeys, lkeys), None)?
    } else {
        LogicalPlanBuilder::from(other_plan).join_with_expr_keys(pre, JoinType::Inner, (lkeys, rkeys), None)?
    };
    let new = joined.aggregate(agg.group_expr.clone(), merge)?.build()?;
    let same = new.schema().fields().len() == agg.schema.fields().len()
        && new
            .schema()
            .iter()
            .zip(agg.schema.iter())
            .all(|((qa, fa), (qb, fb))| qa == qb && fa.name() == fb.name() && fa.data_type() == fb.data_type());
    if !same {
        return Ok(None);
    }
    tracing::debug!(groups = split.groups, plan = %new.display_indent(), "aggregate below joins");
    Ok(Some(new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::functions_aggregate::expr_fn::{avg, count, max, sum};
    use datafusion::logical_expr::col;

    fn edge(a: usize, b: usize) -> Edge {
        Edge { sides: [(a, col(format!("c{a}")), 1.0), (b, col(format!("c{b}")), 1.0)], integers: false, class: None }
    }

    #[test]
    fn sides_must_be_connected_within_themselves() {
        // 0 - 1 - 2, and 3 joined to 0.
        let edges = [edge(0, 1), edge(1, 2), edge(3, 0)];
        assert!(connected(0b0111, &edges));
        assert!(connected(0b1011, &edges));
        assert!(!connected(0b0101, &edges), "0 and 2 meet only through 1");
        assert!(!connected(0b1100, &edges));
        assert!(connected(0b0100, &edges), "one input");
    }

    #[test]
    fn only_functions_that_merge_their_own_partials() {
        assert!(mergeable(&sum(col("a"))).is_some());
        assert!(mergeable(&max(col("a")).alias("m")).is_some());
        let counted = count(col("a"));
        let f = mergeable(&counted).expect("a count merges as a sum");
        assert_eq!(merge_function(f).name(), "sum");
        assert!(mergeable(&avg(col("a"))).is_none());
        let distinct = Expr::AggregateFunction(AggregateFunction::new_udf(
            datafusion::functions_aggregate::sum::sum_udaf(),
            vec![col("a")],
            true,
            None,
            vec![],
            None,
        ));
        assert!(mergeable(&distinct).is_none());
    }
}
