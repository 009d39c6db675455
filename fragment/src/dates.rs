//! `date_part` of a date stored as text.
//!
//! JSON has no date type, so dates arrive as text (`"1995-03-15"`), and `extract(year FROM
//! o_orderdate)` plans as `date_part('YEAR', CAST(o_orderdate AS Timestamp(ns)))`: Arrow parses
//! each string as a timestamp and then splits it into calendar fields again through `chrono`,
//! about 60 ns a row (TPC-H q9 spent 19 ms of its 110 ms there, on 319K rows). The aggregator's
//! rewrite (`basalt_aggregator`'s `TextDateParts`) replaces that pair with
//! [`date_part_text_udf`], which means exactly the same thing: when every string of a batch is a
//! plain `YYYY-MM-DD` date it reads the fields from the digits (a few ns a row); otherwise it
//! casts and calls Arrow's `date_part` as before, with the same results and errors.
//!
//! Leaves know the function too (it is in the context fragments decode with), so a fragment that
//! computes it still runs on the leaves.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int32Array};
use arrow::buffer::NullBuffer;
use arrow::compute::{CastOptions, DatePart, cast_with_options, date_part};
use arrow::datatypes::{DataType, Field, FieldRef, TimeUnit};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

pub const DATE_PART_TEXT: &str = "basalt_date_part_text";

/// The calendar fields the fast path reads (DataFusion returns `Int32` for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextDatePart {
    Year,
    Quarter,
    Month,
    Day,
}

impl TextDatePart {
    /// The part `date_part`'s first argument names, for the names this handles (as DataFusion
    /// reads them: quotes trimmed, any case).
    pub fn parse(part: &str) -> Option<Self> {
        let part = part.trim_matches(|c| c == '\'' || c == '"').to_ascii_lowercase();
        Some(match part.as_str() {
            "year" | "years" => Self::Year,
            "quarter" | "qtr" => Self::Quarter,
            "month" | "months" => Self::Month,
            "day" | "days" => Self::Day,
            _ => return None,
        })
    }

    fn arrow(self) -> DatePart {
        match self {
            Self::Year => DatePart::Year,
            Self::Quarter => DatePart::Quarter,
            Self::Month => DatePart::Month,
            Self::Day => DatePart::Day,
        }
    }

    fn of(self, (year, month, day): (i32, i32, i32)) -> i32 {
        match self {
            Self::Year => year,
            Self::Quarter => (month - 1) / 3 + 1,
            Self::Month => month,
            Self::Day => day,
        }
    }
}

/// `date_part(part, CAST(text AS Timestamp(ns)))` as one function: see the module.
pub fn date_part_text_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(DatePartText { signature: Signature::any(2, Volatility::Immutable) })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct DatePartText {
    signature: Signature,
}

impl ScalarUDFImpl for DatePartText {
    fn name(&self) -> &str {
        DATE_PART_TEXT
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int32)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let nullable = args.arg_fields.get(1).is_none_or(|f| f.is_nullable());
        Ok(Arc::new(Field::new(self.name(), DataType::Int32, nullable)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [part, value] = args.args.as_slice() else {
            return exec_err!("{DATE_PART_TEXT} takes two arguments");
        };
        let part = match part {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(p)) | ScalarValue::Utf8View(Some(p))) => {
                TextDatePart::parse(p)
            }
            _ => None,
        };
        let Some(part) = part else {
            return exec_err!("{DATE_PART_TEXT}: the part must be year, quarter, month or day");
        };
        let scalar = matches!(value, ColumnarValue::Scalar(_));
        let array = value.to_array(args.number_rows)?;
        let out = date_part_of_text(&array, part)?;
        Ok(if scalar {
            ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?)
        } else {
            ColumnarValue::Array(out)
        })
    }
}

/// `part` of each value read as a timestamp: from the digits when every value is a plain date,
/// else through Arrow's cast (errors as a `CAST` reports them) and `date_part`.
pub fn date_part_of_text(array: &ArrayRef, part: TextDatePart) -> Result<ArrayRef> {
    let nulls = array.logical_nulls();
    let fast = match array.data_type() {
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            fields_of_dates(array.len(), nulls.as_ref(), part, |i| a.value(i).as_bytes().try_into().ok())
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            fields_of_dates(array.len(), nulls.as_ref(), part, |i| a.value(i).as_bytes().try_into().ok())
        }
        DataType::Utf8View => {
            // Ten bytes are inline in the view (length in its low 4 bytes, then the text).
            let views = array.as_string_view().views();
            fields_of_dates(array.len(), nulls.as_ref(), part, |i| {
                let view = views[i].to_le_bytes();
                let len = u32::from_le_bytes([view[0], view[1], view[2], view[3]]);
                if len != 10 {
                    return None;
                }
                view[4..14].try_into().ok()
            })
        }
        _ => None,
    };
    if let Some(out) = fast {
        return Ok(Arc::new(out));
    }
    let options = CastOptions { safe: false, ..Default::default() };
    let timestamps = cast_with_options(array, &DataType::Timestamp(TimeUnit::Nanosecond, None), &options)?;
    Ok(date_part(&timestamps, part.arrow())?)
}

/// `part` of every non-null value, if each is ten bytes (`text(i)`) of a plain date.
fn fields_of_dates(
    len: usize,
    nulls: Option<&NullBuffer>,
    part: TextDatePart,
    text: impl Fn(usize) -> Option<[u8; 10]>,
) -> Option<Int32Array> {
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        if nulls.is_some_and(|n| n.is_null(i)) {
            out.push(0);
            continue;
        }
        out.push(part.of(plain_date(&text(i)?)?));
    }
    Some(Int32Array::new(out.into(), nulls.cloned()))
}

/// Year, month and day of exactly `YYYY-MM-DD`, a real calendar date whose midnight a
/// nanosecond timestamp holds (years 1678 to 2261); `None` for anything else.
#[inline]
fn plain_date(s: &[u8]) -> Option<(i32, i32, i32)> {
    let &[y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] = s else { return None };
    let d = [y0, y1, y2, y3, m0, m1, d0, d1].map(|c| c.wrapping_sub(b'0'));
    if d.iter().fold(0, |acc, &x| acc | u8::from(x > 9)) != 0 {
        return None;
    }
    let d = d.map(i32::from);
    let year = d[0] * 1000 + d[1] * 100 + d[2] * 10 + d[3];
    let month = d[4] * 10 + d[5];
    let day = d[6] * 10 + d[7];
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    ((1678..=2261).contains(&year) && (1..=days).contains(&day)).then_some((year, month, day))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{StringArray, StringViewArray};

    const PARTS: [TextDatePart; 4] =
        [TextDatePart::Year, TextDatePart::Quarter, TextDatePart::Month, TextDatePart::Day];

    /// What `date_part(part, CAST(text AS Timestamp(ns)))` gives, through Arrow only.
    fn general(array: &ArrayRef, part: TextDatePart) -> Result<ArrayRef> {
        let options = CastOptions { safe: false, ..Default::default() };
        let timestamps = cast_with_options(array, &DataType::Timestamp(TimeUnit::Nanosecond, None), &options)?;
        Ok(date_part(&timestamps, part.arrow())?)
    }

    fn same_as_general(values: Vec<Option<&str>>) {
        let arrays: [ArrayRef; 2] =
            [Arc::new(StringArray::from(values.clone())), Arc::new(StringViewArray::from(values.clone()))];
        for array in arrays {
            for part in PARTS {
                match (date_part_of_text(&array, part), general(&array, part)) {
                    (Ok(a), Ok(b)) => assert_eq!(&a, &b, "{values:?} {part:?}"),
                    (Err(_), Err(_)) => {}
                    (a, b) => panic!("{values:?} {part:?}: {a:?} vs {b:?}"),
                }
            }
        }
    }

    #[test]
    fn plain_dates_read_from_digits_equal_the_cast() {
        // Every day of a leap year and of a common year, around the ends of the range, nulls.
        let mut days = vec![];
        for year in [1678, 1900, 1970, 1995, 2000, 2024, 2261] {
            for month in 1..=12 {
                for day in 1..=31 {
                    let s = format!("{year:04}-{month:02}-{day:02}");
                    if plain_date(s.as_bytes()).is_some() {
                        days.push(s);
                    }
                }
            }
        }
        assert_eq!(days.len(), 366 * 2 + 365 * 5, "leap years: 2000 and 2024 (not 1678, 1900 or 2261)");
        let mut values: Vec<Option<&str>> = days.iter().map(|s| Some(s.as_str())).collect();
        values.insert(3, None);
        same_as_general(values.clone());
        let fast = date_part_of_text(&(Arc::new(StringArray::from(values)) as ArrayRef), TextDatePart::Year).unwrap();
        assert_eq!(fast.null_count(), 1);
    }

    #[test]
    fn other_text_takes_the_cast_with_its_results_and_errors() {
        // Times, offsets (which move the day in UTC) and spaces: the cast's answers.
        same_as_general(vec![Some("1995-03-15"), Some("1995-12-31T23:30:00-05:00")]);
        same_as_general(vec![Some("1995-03-15 10:11:12"), None]);
        same_as_general(vec![Some(" 1995-03-15")]);
        // Not dates: the cast's error.
        for bad in ["1995-02-29", "1995-13-01", "1995-00-10", "1995-04-31", "19950315", "abcd-ef-gh", ""] {
            let array: ArrayRef = Arc::new(StringArray::from(vec![Some("1995-03-15"), Some(bad)]));
            assert!(plain_date(bad.as_bytes()).is_none(), "{bad}");
            assert!(date_part_of_text(&array, TextDatePart::Year).is_err(), "{bad}");
            same_as_general(vec![Some(bad)]);
        }
        // Outside what a nanosecond timestamp holds: the cast decides.
        same_as_general(vec![Some("1600-01-01")]);
        same_as_general(vec![Some("2300-01-01")]);
    }

    #[test]
    fn parts_are_named_as_date_part_names_them() {
        assert_eq!(TextDatePart::parse("YEAR"), Some(TextDatePart::Year));
        assert_eq!(TextDatePart::parse("'month'"), Some(TextDatePart::Month));
        assert_eq!(TextDatePart::parse("qtr"), Some(TextDatePart::Quarter));
        assert_eq!(TextDatePart::parse("hour"), None);
        assert_eq!(TextDatePart::parse("epoch"), None);
    }
}
