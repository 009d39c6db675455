//! `date_part(part, CAST(text AS Timestamp(ns)))`, what `extract(year FROM d)` plans as for a
//! date stored as text, becomes `basalt_date_part_text(part, text)`: the same meaning, with the
//! calendar fields of plain `YYYY-MM-DD` strings read from their digits instead of parsed as
//! timestamps and split again (see [`basalt_fragment::dates`]). Names are kept, so no schema
//! above changes.

use std::sync::Arc;

use basalt_fragment::dates::{TextDatePart, date_part_text_udf};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{Cast, Expr, ExprSchemable, LogicalPlan, ScalarUDF};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

#[derive(Debug)]
pub struct TextDateParts {
    udf: Arc<ScalarUDF>,
}

impl Default for TextDateParts {
    fn default() -> Self {
        Self { udf: Arc::new(date_part_text_udf()) }
    }
}

impl OptimizerRule for TextDateParts {
    fn name(&self) -> &str {
        "basalt_text_date_parts"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(&self, plan: LogicalPlan, _config: &dyn OptimizerConfig) -> Result<Transformed<LogicalPlan>> {
        if plan.inputs().is_empty() {
            return Ok(Transformed::no(plan));
        }
        // The schema the node's expressions read.
        let schema = merge_schema(&plan.inputs());
        let names = NamePreserver::new(&plan);
        plan.map_expressions(|e| {
            let name = names.save(&e);
            let rewritten = e.transform_up(|e| self.rewrite_expr(e, &schema))?;
            Ok(if rewritten.transformed { Transformed::yes(name.restore(rewritten.data)) } else { rewritten })
        })
    }
}

impl TextDateParts {
    fn rewrite_expr(&self, e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
        let Expr::ScalarFunction(f) = &e else { return Ok(Transformed::no(e)) };
        let [part, value] = f.args.as_slice() else { return Ok(Transformed::no(e)) };
        if f.func.name() != "date_part" {
            return Ok(Transformed::no(e));
        }
        let named = match part {
            Expr::Literal(ScalarValue::Utf8(Some(p)) | ScalarValue::Utf8View(Some(p)), _) => TextDatePart::parse(p),
            _ => None,
        };
        let Expr::Cast(Cast { expr, field }) = value else { return Ok(Transformed::no(e)) };
        let text = matches!(expr.get_type(schema), Ok(DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8));
        if named.is_none() || !text || field.data_type() != &DataType::Timestamp(TimeUnit::Nanosecond, None) {
            return Ok(Transformed::no(e));
        }
        let args = vec![part.clone(), (**expr).clone()];
        Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(self.udf.clone(), args))))
    }
}
