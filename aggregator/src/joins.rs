//! Join order from leaf statistics.
//!
//! DataFusion joins tables in the order the query names them (the FROM list, with WHERE
//! equalities turned into join keys). This rule takes each tree of inner equi-joins, estimates
//! every input's rows (the collection's document count, times the selectivity of the filters
//! pushed into its scan, from the distinct-value sketches leaves keep per column) and searches
//! every join order of up to ten inputs for the one with the least estimated cost: rows sent
//! by the leaves plus rows of every join, where a scan probed by a join with few build keys
//! sends only the rows they match ([`cheapest_order`]). Larger trees join greedily, the
//! smallest estimated join first. The smaller side of each join is the build (left) side. A
//! tree whose inputs cannot all be estimated, or that would need a cross product, keeps the
//! query's order.

use std::sync::Arc;

use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, NullEquality, Result};
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{
    BinaryExpr, Expr, JoinConstraint, JoinType, LogicalPlan, LogicalPlanBuilder, Operator, TableScan,
};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

use crate::table::CollectionTable;

/// Selectivity of a predicate the estimator knows nothing about.
const UNKNOWN_SELECTIVITY: f64 = 0.25;
/// Selectivity of one range comparison (`a < 3`).
const RANGE_SELECTIVITY: f64 = 1.0 / 3.0;
/// Selectivity of a pattern match (`LIKE '%x%'`).
const LIKE_SELECTIVITY: f64 = 0.1;
/// Most inputs one tree is reordered over (the greedy search is quadratic per step).
const MAX_INPUTS: usize = 16;

#[derive(Debug)]
pub struct ReorderJoins {
    pub options: Arc<parking_lot::RwLock<crate::catalog::PlanOptions>>,
}

impl OptimizerRule for ReorderJoins {
    fn name(&self) -> &str {
        "basalt_reorder_joins"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        None
    }

    fn rewrite(&self, plan: LogicalPlan, _config: &dyn OptimizerConfig) -> Result<Transformed<LogicalPlan>> {
        if !self.options.read().join_order() {
            return Ok(Transformed::no(plan));
        }
        rewrite(plan)
    }
}

pub(crate) fn is_reorderable(plan: &LogicalPlan) -> bool {
    matches!(plan, LogicalPlan::Join(j) if j.join_type == JoinType::Inner
        && j.join_constraint == JoinConstraint::On
        && j.null_equality == NullEquality::NullEqualsNothing
        && !j.null_aware)
}

fn rewrite(plan: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
    if !is_reorderable(&plan) {
        return plan.map_children(rewrite);
    }
    let mut tree = Tree::default();
    tree.flatten(plan.clone());
    let mut changed = false;
    let mut inputs = Vec::with_capacity(tree.inputs.len());
    for input in std::mem::take(&mut tree.inputs) {
        let t = rewrite(input)?;
        changed |= t.transformed;
        inputs.push(t.data);
    }
    tree.inputs = inputs;
    match tree.reorder(plan.schema().columns())? {
        Some(new) if new != plan => Ok(Transformed::yes(new)),
        // The written order, with the rewritten inputs back in their places.
        _ if changed => Ok(Transformed::yes(rebuild(plan, &mut tree.inputs.into_iter(), &mut 0))),
        _ => Ok(Transformed::no(plan)),
    }
}

/// A tree of inner joins: its inputs, equi-join pairs and other join conditions.
#[derive(Default)]
pub(crate) struct Tree {
    pub(crate) inputs: Vec<LogicalPlan>,
    pub(crate) on: Vec<(Expr, Expr)>,
    pub(crate) filters: Vec<Expr>,
}

/// Inputs joined so far: a bit per tree input, the plan and its estimated rows.
struct Part {
    inputs: u64,
    plan: LogicalPlan,
    rows: f64,
}

/// One side of an equi-join pair: the input it reads, its expression, its distinct values.
pub(crate) type Side = (usize, Expr, f64);

/// An equi-join pair with the input each side reads and that side's distinct values.
pub(crate) struct Edge {
    pub(crate) sides: [Side; 2],
    /// Both sides are 64-bit integers: a build side's keys can reach the probe scan as a key
    /// set (see `basalt_fragment::keys`).
    pub(crate) integers: bool,
    /// The class of columns equal to each other this pair belongs to (see [`equal_columns`]):
    /// a join needs one pair per class between its sides.
    pub(crate) class: Option<usize>,
}

/// Classes of columns the equi pairs make equal (`a = b AND b = c`: a, b and c), of three
/// columns or more, each column from a different input (a class two columns of one input
/// join could not be enforced by one pair per join).
fn equal_columns(on: &[(Expr, Expr)], input_of: impl Fn(&Expr) -> Option<usize>) -> Vec<Vec<Expr>> {
    let mut classes: Vec<Vec<Expr>> = Vec::new();
    for (a, b) in on {
        if !matches!((a, b), (Expr::Column(_), Expr::Column(_))) {
            continue;
        }
        let ia = classes.iter().position(|c| c.contains(a));
        let ib = classes.iter().position(|c| c.contains(b));
        match (ia, ib) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                let moved = classes[y.max(x)].clone();
                classes[y.min(x)].extend(moved);
                classes.remove(y.max(x));
            }
            (Some(x), None) => classes[x].push(b.clone()),
            (None, Some(y)) => classes[y].push(a.clone()),
            (None, None) => classes.push(vec![a.clone(), b.clone()]),
        }
    }
    classes.retain(|c| {
        let inputs: Vec<Option<usize>> = c.iter().map(&input_of).collect();
        c.len() >= 3
            && inputs.iter().all(Option::is_some)
            && inputs.iter().enumerate().all(|(i, x)| !inputs[..i].contains(x))
    });
    classes
}

/// The pairs `classes` imply that `on` does not state, between columns of one type: TPC-H q5
/// says `c_nationkey = s_nationkey AND s_nationkey = n_nationkey`, so `customer` can join
/// `nation` (and be read through the keys of the nations in ASIA) before `supplier`.
fn implied_pairs(
    on: &[(Expr, Expr)],
    classes: &[Vec<Expr>],
    input_of: impl Fn(&Expr) -> Option<usize>,
    type_of: impl Fn(usize, &Expr) -> Option<datafusion::arrow::datatypes::DataType>,
) -> Vec<(Expr, Expr)> {
    let stated = |a: &Expr, b: &Expr| on.iter().any(|(x, y)| (x == a && y == b) || (x == b && y == a));
    let mut out = Vec::new();
    for class in classes {
        for (i, a) in class.iter().enumerate() {
            for b in &class[i + 1..] {
                let (Some(ia), Some(ib)) = (input_of(a), input_of(b)) else { continue };
                let same_type = type_of(ia, a).is_some_and(|t| type_of(ib, b).as_ref() == Some(&t));
                if same_type && !stated(a, b) {
                    out.push((a.clone(), b.clone()));
                }
            }
        }
    }
    out
}

impl Edge {
    /// The pair's sides as (the side in part `a`, the side in part `b`) when it connects them.
    pub(crate) fn between(&self, a: u64, b: u64) -> Option<(&Side, &Side)> {
        let [x, y] = &self.sides;
        let (bx, by) = (1u64 << x.0, 1u64 << y.0);
        if a & bx != 0 && b & by != 0 {
            Some((x, y))
        } else if a & by != 0 && b & bx != 0 {
            Some((y, x))
        } else {
            None
        }
    }
}

impl Tree {
    pub(crate) fn flatten(&mut self, plan: LogicalPlan) {
        if self.inputs.len() < MAX_INPUTS
            && is_reorderable(&plan)
            && let LogicalPlan::Join(j) = plan
        {
            self.flatten(Arc::unwrap_or_clone(j.left));
            self.flatten(Arc::unwrap_or_clone(j.right));
            self.on.extend(j.on);
            if let Some(f) = j.filter {
                self.filters.extend(split_conjunction_owned(f));
            }
            return;
        }
        self.inputs.push(plan);
    }

    /// The input whose schema holds every column `expr` reads (None: several or none).
    pub(crate) fn input_of(&self, expr: &Expr) -> Option<usize> {
        let cols = expr.column_refs();
        let mut found = None;
        for (i, input) in self.inputs.iter().enumerate() {
            if !cols.is_empty() && cols.iter().all(|c| input.schema().has_column(c)) {
                if found.is_some() {
                    return None;
                }
                found = Some(i);
            }
        }
        found
    }

    /// The inputs an expression reads, a bit per input (the first input holding each column);
    /// None when no input holds one of its columns.
    pub(crate) fn inputs_of(&self, expr: &Expr) -> Option<u64> {
        let mut mask = 0u64;
        for c in expr.column_refs() {
            let i = self.inputs.iter().position(|p| p.schema().has_column(c))?;
            mask |= 1 << i;
        }
        Some(mask)
    }

    /// Estimated distinct values of `e` over input `i` of `rows` rows (at most `rows`, at
    /// least 1; `rows` when the leaves' sketches do not tell).
    pub(crate) fn distinct_of(&self, i: usize, e: &Expr, rows: f64) -> f64 {
        let d = match e {
            Expr::Column(c) => distinct(&self.inputs[i], c),
            _ => None,
        };
        d.unwrap_or(rows).min(rows).max(1.0)
    }

    fn reorder(&self, output: Vec<Column>) -> Result<Option<LogicalPlan>> {
        let n = self.inputs.len();
        if !(3..=MAX_INPUTS).contains(&n) {
            return Ok(None);
        }
        let Some(rows) = self.inputs.iter().map(estimate_rows).collect::<Option<Vec<f64>>>() else {
            return Ok(None);
        };
        // Equalities between two inputs in the join filters are join keys too: a filter pushed
        // into the joins after DataFusion extracted equi-join keys (above a decorrelated
        // `EXISTS`, the conditions arrive that way) would otherwise leave the tree unconnected.
        let mut on = self.on.clone();
        let mut rest = Vec::with_capacity(self.filters.len());
        for f in &self.filters {
            match f {
                Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) if matches!((self.input_of(left), self.input_of(right)), (Some(a), Some(b)) if a != b) =>
                {
                    on.push((left.as_ref().clone(), right.as_ref().clone()));
                }
                _ => rest.push(f.clone()),
            }
        }
        let type_of = |i: usize, e: &Expr| {
            datafusion::logical_expr::ExprSchemable::get_type(e, self.inputs[i].schema().as_ref()).ok()
        };
        let classes = equal_columns(&on, |e| self.input_of(e));
        on.extend(implied_pairs(&on, &classes, |e| self.input_of(e), type_of));
        let mut edges = Vec::with_capacity(on.len());
        for (a, b) in &on {
            let (Some(ia), Some(ib)) = (self.input_of(a), self.input_of(b)) else { return Ok(None) };
            if ia == ib {
                return Ok(None);
            }
            let ndv = |i: usize, e: &Expr| self.distinct_of(i, e, rows[i]);
            let int64 = |i: usize, e: &Expr| type_of(i, e) == Some(datafusion::arrow::datatypes::DataType::Int64);
            edges.push(Edge {
                sides: [(ia, a.clone(), ndv(ia, a)), (ib, b.clone(), ndv(ib, b))],
                integers: int64(ia, a) && int64(ib, b),
                class: classes.iter().position(|c| c.contains(a) && c.contains(b)),
            });
        }
        let mut filters: Vec<(u64, Expr)> = Vec::with_capacity(rest.len());
        for f in &rest {
            let Some(mask) = self.inputs_of(f) else { return Ok(None) };
            filters.push((mask, f.clone()));
        }
        let mut filters: Vec<Option<(u64, Expr)>> = filters.into_iter().map(Some).collect();
        let mut parts: Vec<Part> = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, p)| Part { inputs: 1 << i, plan: p.clone(), rows: rows[i] })
            .collect();
        if n <= DP_MAX_INPUTS {
            let Some(order) = cheapest_order(&rows, &edges) else { return Ok(None) };
            if tracing::enabled!(tracing::Level::DEBUG) {
                let names: Vec<String> = self.inputs.iter().map(input_name).collect();
                let edges: Vec<String> = edges
                    .iter()
                    .map(|e| {
                        let [a, b] = &e.sides;
                        format!("{}={} ({:.0}/{:.0}{})", a.1, b.1, a.2, b.2, if e.integers { " int" } else { "" })
                    })
                    .collect();
                tracing::debug!(inputs = ?names.iter().zip(&rows).collect::<Vec<_>>(), ?edges, order = %order.show(&names), "join order");
            }
            let mut leaves: Vec<Option<Part>> = parts.into_iter().map(Some).collect();
            parts = vec![order.build(&mut leaves, &edges, &mut filters)?];
        }
        while parts.len() > 1 {
            // The connected pair with the smallest estimated join.
            let mut best: Option<(usize, usize, f64)> = None;
            for i in 0..parts.len() {
                for j in i + 1..parts.len() {
                    let Some(est) =
                        join_estimate((parts[i].inputs, parts[i].rows), (parts[j].inputs, parts[j].rows), &edges)
                    else {
                        continue;
                    };
                    if best.is_none_or(|(_, _, b)| est < b) {
                        best = Some((i, j, est));
                    }
                }
            }
            let Some((i, j, est)) = best else { return Ok(None) };
            let b = parts.swap_remove(j);
            let a = parts.swap_remove(i);
            parts.push(join(a, b, est, &edges, &mut filters)?);
        }
        let Some(Part { plan, .. }) = parts.pop() else { return Ok(None) };
        let plan = match conjunction(filters.into_iter().flatten().map(|(_, f)| f)) {
            Some(f) => LogicalPlanBuilder::from(plan).filter(f)?.build()?,
            None => plan,
        };
        if plan.schema().columns() == output {
            return Ok(Some(plan));
        }
        let project = LogicalPlanBuilder::from(plan).project(output.into_iter().map(Expr::Column))?.build()?;
        Ok(Some(project))
    }
}

/// `plan` with the inputs `Tree::flatten` found in it replaced, in the same order: it descends
/// into exactly the joins `flatten` descended into (`taken` counts the inputs so far).
fn rebuild(plan: LogicalPlan, inputs: &mut std::vec::IntoIter<LogicalPlan>, taken: &mut usize) -> LogicalPlan {
    if *taken < MAX_INPUTS
        && is_reorderable(&plan)
        && let LogicalPlan::Join(mut j) = plan
    {
        j.left = Arc::new(rebuild(Arc::unwrap_or_clone(j.left), inputs, taken));
        j.right = Arc::new(rebuild(Arc::unwrap_or_clone(j.right), inputs, taken));
        return LogicalPlan::Join(j);
    }
    *taken += 1;
    inputs.next().unwrap_or(plan)
}

/// Estimated rows of joining two parts on the equi pairs between them: each pair keeps
/// `1 / max(distinct on either side)` of the cross product; the most selective pair counts.
/// None when no pair connects them.
pub(crate) fn join_estimate(a: (u64, f64), b: (u64, f64), edges: &[Edge]) -> Option<f64> {
    let ((ma, ra), (mb, rb)) = (a, b);
    edges
        .iter()
        .filter_map(|e| e.between(ma, mb))
        .map(|((_, _, da), (_, _, db))| ra * rb / da.min(ra).max(db.min(rb)).max(1.0))
        .reduce(f64::min)
}

/// Two parts joined on the equi pairs between them, the smaller on the build (left) side, with
/// the filters that first become applicable (all their inputs joined) as the join's filter.
fn join(a: Part, b: Part, est: f64, edges: &[Edge], filters: &mut [Option<(u64, Expr)>]) -> Result<Part> {
    let (left, right) = if a.rows <= b.rows { (a, b) } else { (b, a) };
    // One pair per class of equal columns: the others hold already on each side.
    let mut classes = Vec::new();
    let (lkeys, rkeys): (Vec<Expr>, Vec<Expr>) = edges
        .iter()
        .filter_map(|e| e.between(left.inputs, right.inputs).map(|sides| (sides, e.class)))
        .filter(|(_, class)| match class {
            Some(c) if classes.contains(c) => false,
            Some(c) => {
                classes.push(*c);
                true
            }
            None => true,
        })
        .map(|((l, r), _)| (l.1.clone(), r.1.clone()))
        .unzip();
    let both = left.inputs | right.inputs;
    let now = filters.iter_mut().filter(|f| f.as_ref().is_some_and(|(m, _)| m & !both == 0)).filter_map(Option::take);
    let filter = conjunction(now.map(|(_, f)| f));
    let plan = LogicalPlanBuilder::from(left.plan)
        .join_with_expr_keys(right.plan, JoinType::Inner, (lkeys, rkeys), filter)?
        .build()?;
    Ok(Part { inputs: both, plan, rows: est.max(1.0) })
}

/// Most inputs whose join order is searched exhaustively ([`cheapest_order`]; 3^n splits).
/// Larger trees join greedily, the smallest estimated join first.
const DP_MAX_INPUTS: usize = 10;

/// A join order: an input, or two orders joined.
enum Order {
    Input(usize),
    Join(Box<Order>, Box<Order>, f64),
}

/// A join input's name for a log line: the collection it scans, or its plan's first line.
fn input_name(plan: &LogicalPlan) -> String {
    let mut name = None;
    let _ = plan.apply(|p| {
        if let LogicalPlan::TableScan(scan) = p {
            name = Some(scan.table_name.to_string());
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    name.unwrap_or_else(|| plan.display().to_string())
}

impl Order {
    /// The order as nested pairs of input names, with each join's estimated rows.
    fn show(&self, names: &[String]) -> String {
        match self {
            Order::Input(i) => names.get(*i).cloned().unwrap_or_default(),
            Order::Join(a, b, rows) => format!("({} ⋈ {} ~{rows:.0})", a.show(names), b.show(names)),
        }
    }

    fn build(self, leaves: &mut [Option<Part>], edges: &[Edge], filters: &mut [Option<(u64, Expr)>]) -> Result<Part> {
        match self {
            Order::Input(i) => leaves
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| datafusion::common::DataFusionError::Internal(format!("join input {i} used twice"))),
            Order::Join(a, b, est) => {
                let a = a.build(leaves, edges, filters)?;
                let b = b.build(leaves, edges, filters)?;
                join(a, b, est, edges, filters)
            }
        }
    }
}

/// The join order (bushy trees included) with the least estimated cost, searched over every
/// connected split of every subset of the inputs. The cost of a plan is the rows its scans send
/// from the leaves plus the rows of every join it computes. A scan on the probe side of a join
/// whose build side has few keys (a runtime key list, see `RUNTIME_IN_LIST_MAX` in the engine)
/// sends only the rows those keys match: TPC-H q5 joins `supplier` (2,000 rows in ASIA) with
/// `lineitem` before `orders`, so `lineitem` sends a fifth of its rows, where joining the
/// smallest intermediate results first sent all of them. None when the inputs are not
/// connected.
fn cheapest_order(rows: &[f64], edges: &[Edge]) -> Option<Order> {
    let n = rows.len();
    let full = (1u64 << n) - 1;
    // Per subset: (cost, rows, the split that gave them).
    let mut best: Vec<Option<(f64, f64, u64)>> = vec![None; 1 << n];
    for (i, r) in rows.iter().enumerate() {
        best[1 << i] = Some((*r, *r, 0));
    }
    for mask in 1..=full {
        if mask.count_ones() < 2 {
            continue;
        }
        let low = mask & mask.wrapping_neg();
        // Each split once: the part holding the lowest input is `a`.
        let mut a = (mask - 1) & mask;
        while a > 0 {
            let b = mask & !a;
            if a & low != 0
                && let (Some((ca, ra, _)), Some((cb, rb, _))) = (best[a as usize], best[b as usize])
                && let Some(est) = join_estimate((a, ra), (b, rb), edges)
            {
                let ((build, build_rows, build_cost), (probe, probe_rows, probe_cost)) =
                    if ra <= rb { ((a, ra, ca), (b, rb, cb)) } else { ((b, rb, cb), (a, ra, ca)) };
                let probe_cost = match key_list_fraction(build, build_rows, probe, edges) {
                    Some(f) => probe_rows * f,
                    None => probe_cost,
                };
                let cost = build_cost + probe_cost + est;
                if best[mask as usize].is_none_or(|(c, _, _)| cost < c) {
                    best[mask as usize] = Some((cost, est.max(1.0), a));
                }
            }
            a = (a - 1) & mask;
        }
    }
    fn order(mask: u64, best: &[Option<(f64, f64, u64)>]) -> Option<Order> {
        if mask.count_ones() == 1 {
            return Some(Order::Input(mask.trailing_zeros() as usize));
        }
        let (_, rows, a) = best[mask as usize]?;
        Some(Order::Join(Box::new(order(a, best)?), Box::new(order(mask & !a, best)?), rows))
    }
    order(full, &best)
}

/// The fraction of a probe-side scan's rows it sends when the build side's keys reach it as a
/// runtime key list: the probe is one input, one equi pair connects the sides (a list is on
/// one column), and the build side has few enough keys. None otherwise.
fn key_list_fraction(build: u64, build_rows: f64, probe: u64, edges: &[Edge]) -> Option<f64> {
    use basalt_fragment::keys::{KEY_SET_MAX, KEY_SET_SELECTIVITY};
    if probe.count_ones() != 1 {
        return None;
    }
    let mut connecting = edges.iter().filter_map(|e| e.between(build, probe).map(|(b, p)| (b.2, p.2, e.integers)));
    let (build_ndv, probe_ndv, integers) = connecting.next()?;
    if connecting.next().is_some() {
        return None;
    }
    let keys = build_ndv.min(build_rows);
    let probe_ndv = probe_ndv.max(1.0);
    let list = keys <= crate::engine::RUNTIME_IN_LIST_MAX as f64
        && build_rows * 8.0 <= crate::engine::RUNTIME_IN_LIST_BUILD_BYTES as f64;
    // Integer keys past the list's size travel as a key set, applied when it keeps a small
    // enough share of the probe column's values: TPC-H q5 then reads `customer` through the
    // keys of the 5 nations in ASIA, `orders` through those 30,000 customers' keys and
    // `lineitem` through their 46,000 orders' (two leaf processes: 57 -> 37 ms).
    let set = integers && keys <= KEY_SET_MAX as f64 && keys <= KEY_SET_SELECTIVITY * probe_ndv;
    (list || set).then(|| (keys / probe_ndv).min(1.0))
}

/// `f` applied to the collection a scan reads (None for other tables).
fn with_table<R>(scan: &TableScan, f: impl FnOnce(&CollectionTable) -> Option<R>) -> Option<R> {
    let provider = source_as_provider(&scan.source).ok()?;
    f(provider.downcast_ref::<CollectionTable>()?)
}

/// Estimated rows a plan produces; None when it cannot tell.
pub fn estimate_rows(plan: &LogicalPlan) -> Option<f64> {
    Some(match plan {
        LogicalPlan::TableScan(scan) => {
            let mut rows = with_table(scan, |t| Some(t.stats().doc_count as f64))?;
            for f in &scan.filters {
                rows *= selectivity(f, plan);
            }
            match scan.fetch {
                Some(n) => rows.min(n as f64),
                None => rows,
            }
        }
        LogicalPlan::Filter(f) => estimate_rows(&f.input)? * selectivity(&f.predicate, &f.input),
        LogicalPlan::Projection(p) => estimate_rows(&p.input)?,
        LogicalPlan::SubqueryAlias(a) => estimate_rows(&a.input)?,
        LogicalPlan::Limit(l) => {
            let input = estimate_rows(&l.input)?;
            match l.get_fetch_type() {
                Ok(datafusion::logical_expr::logical_plan::FetchType::Literal(Some(n))) => input.min(n as f64),
                _ => input,
            }
        }
        LogicalPlan::Aggregate(a) => {
            let input = estimate_rows(&a.input)?;
            let mut groups = 1.0f64;
            for g in &a.group_expr {
                groups *= match g {
                    Expr::Column(c) => distinct(&a.input, c).unwrap_or(input),
                    _ => input,
                };
            }
            groups.min(input).max(1.0)
        }
        LogicalPlan::Join(j) => match j.join_type {
            JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => estimate_rows(&j.left)?,
            JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => estimate_rows(&j.right)?,
            _ => return None,
        },
        _ => return None,
    })
}

/// Estimated distinct values of a column of a plan's output (from the leaves' sketches).
fn distinct(plan: &LogicalPlan, col: &Column) -> Option<f64> {
    let idx = plan.schema().maybe_index_of_column(col)?;
    match plan {
        LogicalPlan::TableScan(scan) => {
            let field = scan.projected_schema.field(idx);
            with_table(scan, |t| t.stats().distinct_values(field.name()).map(|d| d as f64))
        }
        LogicalPlan::Filter(f) => distinct(&f.input, col),
        LogicalPlan::Limit(l) => distinct(&l.input, col),
        LogicalPlan::SubqueryAlias(a) => {
            let inner = a.input.schema().columns().into_iter().nth(idx)?;
            distinct(&a.input, &inner)
        }
        LogicalPlan::Projection(p) => match p.expr.get(idx)? {
            Expr::Column(c) => distinct(&p.input, c),
            Expr::Alias(a) => match a.expr.as_ref() {
                Expr::Column(c) => distinct(&p.input, c),
                _ => None,
            },
            _ => None,
        },
        LogicalPlan::Aggregate(a) => match a.group_expr.get(idx)? {
            Expr::Column(c) => distinct(&a.input, c),
            _ => None,
        },
        LogicalPlan::Join(j) => {
            if j.left.schema().has_column(col) {
                distinct(&j.left, col)
            } else {
                distinct(&j.right, col)
            }
        }
        _ => None,
    }
}

/// The column a comparison operand reads (through casts).
fn column_in(e: &Expr) -> Option<&Column> {
    match e {
        Expr::Column(c) => Some(c),
        Expr::Cast(c) => column_in(&c.expr),
        Expr::TryCast(c) => column_in(&c.expr),
        _ => None,
    }
}

/// Fraction of `plan`'s rows a predicate over them keeps (independence between conjuncts).
fn selectivity(expr: &Expr, plan: &LogicalPlan) -> f64 {
    filter_selectivity(expr, &|c| distinct(plan, c))
}

/// Fraction of rows a predicate keeps, given the distinct values of the columns it reads
/// (independence between conjuncts; constants where distinct counts do not help).
pub fn filter_selectivity(expr: &Expr, distinct_of: &dyn Fn(&Column) -> Option<f64>) -> f64 {
    let ndv = |e: &Expr| column_in(e).and_then(distinct_of).map(|d| d.max(1.0));
    let selectivity = |e: &Expr| filter_selectivity(e, distinct_of);
    let s = match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And => selectivity(left) * selectivity(right),
            Operator::Or => {
                let (a, b) = (selectivity(left), selectivity(right));
                a + b - a * b
            }
            Operator::Eq | Operator::NotEq => {
                let literal = matches!(left.as_ref(), Expr::Literal(..)) || matches!(right.as_ref(), Expr::Literal(..));
                let eq = match (literal, ndv(left).or_else(|| ndv(right))) {
                    (true, Some(d)) => 1.0 / d,
                    _ => UNKNOWN_SELECTIVITY,
                };
                if *op == Operator::Eq { eq } else { 1.0 - eq }
            }
            Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq => RANGE_SELECTIVITY,
            Operator::LikeMatch | Operator::ILikeMatch => LIKE_SELECTIVITY,
            Operator::NotLikeMatch | Operator::NotILikeMatch => 1.0 - LIKE_SELECTIVITY,
            _ => UNKNOWN_SELECTIVITY,
        },
        Expr::Not(inner) => 1.0 - selectivity(inner),
        Expr::Between(b) => {
            let s = RANGE_SELECTIVITY * RANGE_SELECTIVITY * 2.0;
            if b.negated { 1.0 - s } else { s }
        }
        Expr::InList(list) => {
            let s = match ndv(&list.expr) {
                Some(d) => (list.list.len() as f64 / d).min(1.0),
                None => UNKNOWN_SELECTIVITY,
            };
            if list.negated { 1.0 - s } else { s }
        }
        Expr::Like(l) => {
            if l.negated {
                1.0 - LIKE_SELECTIVITY
            } else {
                LIKE_SELECTIVITY
            }
        }
        Expr::IsNull(_) => 0.05,
        Expr::IsNotNull(_) => 0.95,
        _ => UNKNOWN_SELECTIVITY,
    };
    s.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::col;

    fn edge(a: usize, da: f64, b: usize, db: f64) -> Edge {
        Edge { sides: [(a, col(format!("c{a}")), da), (b, col(format!("c{b}")), db)], integers: false, class: None }
    }

    fn int_edge(a: usize, da: f64, b: usize, db: f64) -> Edge {
        Edge { integers: true, ..edge(a, da, b, db) }
    }

    fn shape(o: &Order) -> String {
        match o {
            Order::Input(i) => i.to_string(),
            Order::Join(a, b, _) => format!("({} {})", shape(a), shape(b)),
        }
    }

    /// TPC-H q5 at SF 1: region (ASIA) - nation - supplier - lineitem - orders (1994) -
    /// customer, and customer - supplier on the nation. Joining the smallest results first
    /// joins customer and orders, then lineitem, all of whose 6M rows the leaves send;
    /// `supplier` (2,000 keys in ASIA) joined with `lineitem` first cuts them to 1.2M.
    #[test]
    fn a_small_build_side_probes_the_largest_scan_first() {
        let rows = [1.0, 25.0, 10_000.0, 150_000.0, 227_000.0, 6_000_000.0];
        let (region, nation, supplier, customer, orders, lineitem) = (0, 1, 2, 3, 4, 5);
        let edges = [
            edge(region, 1.0, nation, 5.0),
            edge(nation, 25.0, supplier, 25.0),
            edge(supplier, 10_000.0, lineitem, 10_000.0),
            edge(lineitem, 1_500_000.0, orders, 227_000.0),
            edge(orders, 100_000.0, customer, 150_000.0),
            edge(customer, 25.0, supplier, 25.0),
        ];
        let order = cheapest_order(&rows, &edges).expect("connected");
        let s = shape(&order);
        assert!(s.contains("(((0 1) 2) 5)") || s.contains("(5 ((0 1) 2))"), "{s}");

        // Without a small build side the cheapest order is the smallest joins first.
        let rows = [1_000.0, 100_000.0, 1_000_000.0];
        let edges = [edge(0, 1_000.0, 1, 100_000.0), edge(1, 100_000.0, 2, 100_000.0)];
        let order = cheapest_order(&rows, &edges).expect("connected");
        assert_eq!(shape(&order), "((0 1) 2)");
        // Unconnected inputs have no order.
        assert!(cheapest_order(&[1.0, 2.0, 3.0], &[edge(0, 1.0, 1, 2.0)]).is_none());
    }

    #[test]
    fn a_key_list_needs_one_pair_few_keys_and_a_single_probe_input() {
        let edges = [edge(0, 2_000.0, 1, 10_000.0), edge(0, 25.0, 2, 25.0)];
        assert_eq!(key_list_fraction(0b001, 2_000.0, 0b010, &edges), Some(0.2));
        // The build side's rows cap its keys.
        assert_eq!(key_list_fraction(0b001, 500.0, 0b010, &edges), Some(0.05));
        assert_eq!(key_list_fraction(0b001, 20_000.0, 0b010, &[edge(0, 20_000.0, 1, 30_000.0)]), None);
        assert_eq!(key_list_fraction(0b001, 2_000.0, 0b110, &edges), None, "probe of two inputs");
        let two = [edge(0, 25.0, 1, 25.0), edge(0, 30.0, 1, 30.0)];
        assert_eq!(key_list_fraction(0b001, 25.0, 0b010, &two), None, "two pairs: a list of structs");
        // Integer keys past a list's size reach the probe as a key set, when it keeps at most
        // half the probe column's values.
        assert_eq!(key_list_fraction(0b001, 20_000.0, 0b010, &[int_edge(0, 20_000.0, 1, 40_000.0)]), Some(0.5));
        assert_eq!(key_list_fraction(0b001, 30_000.0, 0b010, &[int_edge(0, 30_000.0, 1, 40_000.0)]), None);
    }

    /// TPC-H q5 states `c_nationkey = s_nationkey AND s_nationkey = n_nationkey`: the implied
    /// `c_nationkey = n_nationkey` joins `customer` to the nations in ASIA first (a key list of
    /// 5 nations), then `orders` and `lineitem` through key sets, `supplier` last; a join
    /// takes one pair per class of equal columns.
    #[test]
    fn equal_columns_imply_the_pairs_not_stated() {
        let (c, s, n, o) = (col("c.nk"), col("s.nk"), col("n.nk"), col("o.ck"));
        let input = |e: &Expr| {
            ["c.nk", "s.nk", "n.nk", "o.ck", "c.ck", "c.x"].iter().position(|x| *e == col(*x)).map(|i| i.min(3))
        };
        let on = vec![(c.clone(), s.clone()), (s.clone(), n.clone()), (col("c.ck"), o.clone())];
        let classes = equal_columns(&on, |e| input(e).map(|i| if e == &col("c.ck") { 0 } else { i }));
        assert_eq!(classes, vec![vec![c.clone(), s.clone(), n.clone()]]);
        let any_type = |_: usize, _: &Expr| Some(datafusion::arrow::datatypes::DataType::Int64);
        assert_eq!(implied_pairs(&on, &classes, input, any_type), vec![(c.clone(), n.clone())]);
        // Two columns of one input in a class: no class.
        let on = vec![(c.clone(), s.clone()), (s.clone(), col("c.x"))];
        assert!(equal_columns(&on, |e| if e == &col("c.x") { Some(0) } else { input(e) }).is_empty());
        // Columns of different types imply nothing.
        let on = vec![(c.clone(), s.clone()), (s.clone(), n.clone())];
        let classes = equal_columns(&on, input);
        let types = |i: usize, _: &Expr| {
            Some(if i == 2 {
                datafusion::arrow::datatypes::DataType::Int32
            } else {
                datafusion::arrow::datatypes::DataType::Int64
            })
        };
        assert!(implied_pairs(&on, &classes, input, types).is_empty());

        // With the implied pair, q5's order at SF 1: region - nation - customer - orders -
        // lineitem - supplier.
        let rows = [1.0, 25.0, 10_000.0, 150_000.0, 166_667.0, 6_000_000.0];
        let (region, nation, supplier, customer, orders, lineitem) = (0, 1, 2, 3, 4, 5);
        let class = |e: Edge| Edge { class: Some(0), ..e };
        let edges = [
            int_edge(nation, 5.0, region, 1.0),
            class(int_edge(supplier, 25.0, nation, 25.0)),
            int_edge(lineitem, 9_706.0, supplier, 9_706.0),
            int_edge(orders, 166_667.0, lineitem, 1_494_403.0),
            int_edge(customer, 150_000.0, orders, 99_608.0),
            class(int_edge(customer, 25.0, supplier, 25.0)),
            class(int_edge(customer, 25.0, nation, 25.0)),
        ];
        // Joined in this order (left-deep, any nesting of each pair).
        let inputs = |o: &Order| shape(o).replace(['(', ')'], "");
        let order = cheapest_order(&rows, &edges).expect("connected");
        assert_eq!(inputs(&order), "0 1 3 4 5 2", "{}", shape(&order));
        // Without it, customer cannot meet nation before supplier.
        let order = cheapest_order(&rows, &edges[..6]).expect("connected");
        assert!(!inputs(&order).starts_with("0 1 3"), "{}", shape(&order));
    }
}
