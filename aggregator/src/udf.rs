//! `search(field, 'query')`: full-text match. Leaves answer it from the search index when it is
//! pushed down; this implementation evaluates the same semantics where it is not (for example
//! on a joined or computed value).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use basalt_common::text::{matches, tokenize};
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};

pub const SEARCH: &str = "search";

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SearchUdf {
    signature: Signature,
}

pub fn search_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(SearchUdf { signature: Signature::any(2, Volatility::Immutable) })
}

impl ScalarUDFImpl for SearchUdf {
    fn name(&self) -> &str {
        SEARCH
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let [field, query] = args.args.as_slice() else {
            return exec_err!("search(field, query) takes two arguments");
        };
        let field: ArrayRef = cast(&field.to_array(n)?, &DataType::Utf8)?;
        let query: ArrayRef = cast(&query.to_array(n)?, &DataType::Utf8)?;
        let (field, query) = (field.as_string::<i32>(), query.as_string::<i32>());
        let mut cache: Option<(String, Vec<String>)> = None;
        let out: BooleanArray = (0..n)
            .map(|i| {
                if field.is_null(i) || query.is_null(i) {
                    return Some(false);
                }
                let q = query.value(i);
                if cache.as_ref().is_none_or(|(cq, _)| cq != q) {
                    cache = Some((q.to_string(), tokenize(q)));
                }
                let tokens = cache.as_ref().map(|c| c.1.as_slice()).unwrap_or_default();
                Some(matches(field.value(i), tokens))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// `approx_distinct_merge(sketch)`: the distinct count of the union of rollup sketches
/// (`<field>.sketch` of a rollup's `approx_distinct` field), for re-aggregating groups, e.g.
/// distinct users per hour from a per-minute rollup.
pub fn approx_distinct_merge_udaf() -> datafusion::logical_expr::AggregateUDF {
    datafusion::logical_expr::AggregateUDF::from(SketchMerge {
        signature: Signature::uniform(
            1,
            vec![DataType::Utf8, DataType::Utf8View, DataType::LargeUtf8],
            Volatility::Immutable,
        ),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SketchMerge {
    signature: Signature,
}

impl datafusion::logical_expr::AggregateUDFImpl for SketchMerge {
    fn name(&self) -> &str {
        "approx_distinct_merge"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn accumulator(
        &self,
        _args: datafusion::logical_expr::function::AccumulatorArgs,
    ) -> Result<Box<dyn datafusion::logical_expr::Accumulator>> {
        Ok(Box::new(SketchAccumulator(basalt_common::sketch::Sketch::default())))
    }

    fn state_fields(
        &self,
        args: datafusion::logical_expr::function::StateFieldsArgs,
    ) -> Result<Vec<arrow::datatypes::FieldRef>> {
        Ok(vec![Arc::new(arrow::datatypes::Field::new(format!("{}_sketch", args.name), DataType::Utf8, true))])
    }
}

#[derive(Debug)]
struct SketchAccumulator(basalt_common::sketch::Sketch);

impl SketchAccumulator {
    fn merge_texts(&mut self, array: &ArrayRef) -> Result<()> {
        let array = cast(array, &DataType::Utf8)?;
        for text in array.as_string::<i32>().iter().flatten() {
            match basalt_common::sketch::Sketch::decode(text) {
                Ok(s) => self.0.merge(&s),
                Err(e) => return exec_err!("approx_distinct_merge: {e}"),
            }
        }
        Ok(())
    }
}

impl datafusion::logical_expr::Accumulator for SketchAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        values.first().map_or(Ok(()), |a| self.merge_texts(a))
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        states.first().map_or(Ok(()), |a| self.merge_texts(a))
    }

    fn state(&mut self) -> Result<Vec<datafusion::scalar::ScalarValue>> {
        Ok(vec![datafusion::scalar::ScalarValue::Utf8(Some(self.0.encode()))])
    }

    fn evaluate(&mut self) -> Result<datafusion::scalar::ScalarValue> {
        Ok(datafusion::scalar::ScalarValue::Int64(Some(self.0.estimate() as i64)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + 4096
    }
}
