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
