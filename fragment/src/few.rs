//! Partial sums, averages and counts of a batch whose rows fall in a few groups, computed a
//! group at a time instead of a row at a time.
//!
//! DataFusion's grouped accumulators add each row's value into its group's slot
//! (`sums[group] += value`). With a handful of groups (TPC-H q1: four, for 60 million rows)
//! consecutive rows keep hitting the same slots, and each add waits for the previous add to the
//! same slot to reach memory: q1's seven sums and averages took half of its CPU that way. Here
//! a batch's rows carry a small local group number (`u8`), and each group's sum is a masked sum
//! over the whole batch in eight independent lanes, which the compiler vectorizes. The result
//! is one partial state per group, in the accumulator's own state layout, merged into it with
//! `merge_batch`: the accumulator ends with the state it would have had, up to the order in
//! which floating-point values were added.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, UInt64Array};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

/// At most this many groups in a batch for the group-at-a-time path: its cost grows with the
/// groups (a pass over the batch per group and argument) where adding row by row does not.
pub const FEW_GROUPS: usize = 8;

/// A local group number no row has: rows whose argument is null.
const NO_GROUP: u8 = u8::MAX;

/// An aggregate whose partial state this module computes, by its state layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `sum` of `Float64`: state `[sum: Float64]`.
    SumF64,
    /// `sum` of `Int64`: state `[sum: Int64]`, wrapping as DataFusion's does.
    SumI64,
    /// `avg` of `Float64`: state `[count: UInt64, sum: Float64]`.
    AvgF64,
    /// `count` of anything: state `[count: Int64]`.
    Count,
}

impl Kind {
    /// The kind of `aggregate`, when its function and state layout are one of the above.
    /// (DISTINCT, ordered and filtered aggregates are left to the caller to exclude.)
    pub fn of(aggregate: &AggregateFunctionExpr) -> Option<Self> {
        if aggregate.is_distinct() || aggregate.expressions().len() != 1 {
            return None;
        }
        let states = aggregate.state_fields().ok()?;
        let types: Vec<&DataType> = states.iter().map(|f| f.data_type()).collect();
        match (aggregate.fun().name(), types.as_slice()) {
            ("sum", [DataType::Float64]) => Some(Self::SumF64),
            ("sum", [DataType::Int64]) => Some(Self::SumI64),
            ("avg", [DataType::UInt64, DataType::Float64]) => Some(Self::AvgF64),
            ("count", [DataType::Int64]) => Some(Self::Count),
            _ => None,
        }
    }

    /// Per local group `0..groups`, the partial state of this aggregate over the rows of
    /// `local` (each row's local group) with argument `values`. `None` when `values` is not of
    /// the type the state layout was chosen for (the caller adds row by row then).
    pub fn states(self, values: &ArrayRef, local: &[u8], groups: usize) -> Option<Vec<ArrayRef>> {
        if values.len() != local.len() || groups > FEW_GROUPS {
            return None;
        }
        let typed = match self {
            Self::SumF64 | Self::AvgF64 => values.data_type() == &DataType::Float64,
            Self::SumI64 => values.data_type() == &DataType::Int64,
            Self::Count => true,
        };
        if !typed {
            return None;
        }
        // Null arguments belong to no group.
        let masked;
        let local = match values.logical_nulls().filter(|n| n.null_count() > 0) {
            Some(nulls) => {
                masked = without_nulls(local, &nulls);
                &masked[..]
            }
            None => local,
        };
        let counts: Vec<u64> = (0..groups).map(|g| count_of(local, g as u8)).collect();
        let seen = || NullBuffer::from(counts.iter().map(|c| *c > 0).collect::<Vec<bool>>());
        Some(match self {
            Self::Count => vec![Arc::new(Int64Array::from_iter_values(counts.iter().map(|c| *c as i64)))],
            Self::SumF64 | Self::AvgF64 => {
                let data = values.as_primitive::<Float64Type>().values();
                let sums: Vec<f64> = (0..groups).map(|g| sum_f64(local, data, g as u8)).collect();
                let sums: ArrayRef = Arc::new(Float64Array::new(sums.into(), Some(seen())));
                match self {
                    Self::AvgF64 => vec![Arc::new(UInt64Array::from(counts)), sums],
                    _ => vec![sums],
                }
            }
            Self::SumI64 => {
                let data = values.as_primitive::<Int64Type>().values();
                let sums: Vec<i64> = (0..groups).map(|g| sum_i64(local, data, g as u8)).collect();
                vec![Arc::new(Int64Array::new(sums.into(), Some(seen())))]
            }
        })
    }
}

/// `local` with the rows `nulls` marks null moved to no group.
fn without_nulls(local: &[u8], nulls: &NullBuffer) -> Vec<u8> {
    local.iter().zip(nulls.iter()).map(|(g, valid)| if valid { *g } else { NO_GROUP }).collect()
}

/// Runs `$portable` compiled with AVX2 when the CPU has it (checked at run time), else as
/// compiled for baseline x86-64: the masked loops below vectorize four lanes wide with AVX2.
macro_rules! with_avx2 {
    ($avx2:ident, $portable:ident, $($arg:expr),*) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
        }
        $portable($($arg),*)
    }};
}

/// Rows of group `g`.
fn count_of(local: &[u8], g: u8) -> u64 {
    with_avx2!(count_of_avx2, count_of_any, local, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn count_of_avx2(local: &[u8], g: u8) -> u64 {
    count_of_any(local, g)
}

#[inline(always)]
fn count_of_any(local: &[u8], g: u8) -> u64 {
    // In pieces of at most 255 rows so the per-lane counts fit a byte and vectorize widely.
    local.chunks(255).map(|piece| piece.iter().fold(0u8, |n, l| n + u8::from(*l == g)) as u64).sum()
}

/// Sum of the values of group `g`'s rows, in eight lanes.
fn sum_f64(local: &[u8], values: &[f64], g: u8) -> f64 {
    with_avx2!(sum_f64_avx2, sum_f64_any, local, values, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_f64_avx2(local: &[u8], values: &[f64], g: u8) -> f64 {
    sum_f64_any(local, values, g)
}

/// All ones for a row of group `g`, else zero: the value's bits masked, without a branch (the
/// rows' groups interleave) and without multiplying (a NaN or infinity outside the group would
/// make NaN).
#[inline(always)]
fn keep(l: u8, g: u8) -> u64 {
    0u64.wrapping_sub(u64::from(l == g))
}

#[inline(always)]
fn sum_f64_any(local: &[u8], values: &[f64], g: u8) -> f64 {
    let mut lanes = [0f64; 8];
    let (mut ls, mut vs) = (local.chunks_exact(8), values.chunks_exact(8));
    for (l, v) in (&mut ls).zip(&mut vs) {
        for j in 0..8 {
            lanes[j] += f64::from_bits(v[j].to_bits() & keep(l[j], g));
        }
    }
    let mut sum: f64 = lanes.iter().sum();
    for (l, v) in ls.remainder().iter().zip(vs.remainder()) {
        if *l == g {
            sum += v;
        }
    }
    sum
}

/// Wrapping sum of the values of group `g`'s rows, in eight lanes.
fn sum_i64(local: &[u8], values: &[i64], g: u8) -> i64 {
    with_avx2!(sum_i64_avx2, sum_i64_any, local, values, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_i64_avx2(local: &[u8], values: &[i64], g: u8) -> i64 {
    sum_i64_any(local, values, g)
}

#[inline(always)]
fn sum_i64_any(local: &[u8], values: &[i64], g: u8) -> i64 {
    let mut lanes = [0i64; 8];
    let (mut ls, mut vs) = (local.chunks_exact(8), values.chunks_exact(8));
    for (l, v) in (&mut ls).zip(&mut vs) {
        for j in 0..8 {
            lanes[j] = lanes[j].wrapping_add(v[j] & keep(l[j], g) as i64);
        }
    }
    let mut sum = lanes.iter().fold(0i64, |s, x| s.wrapping_add(*x));
    for (l, v) in ls.remainder().iter().zip(vs.remainder()) {
        if *l == g {
            sum = sum.wrapping_add(*v);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};

    #[test]
    fn masked_sums_and_counts_match_row_by_row() {
        // 1000 rows (a remainder past the lanes), four groups, one never seen.
        let local: Vec<u8> = (0..1003u32).map(|i| [0u8, 1, 3, 1, 0][(i % 5) as usize]).collect();
        let floats: Vec<f64> = (0..1003).map(|i| i as f64 * 0.5 - 100.0).collect();
        let ints: Vec<i64> = (0..1003).map(|i| if i == 7 { i64::MAX } else { i * 3 - 50 }).collect();
        for g in 0..4u8 {
            let rows: Vec<usize> = (0..local.len()).filter(|r| local[*r] == g).collect();
            assert_eq!(count_of(&local, g), rows.len() as u64);
            let expected: f64 = rows.iter().map(|r| floats[*r]).sum();
            assert!((sum_f64(&local, &floats, g) - expected).abs() < 1e-6, "group {g}");
            let expected = rows.iter().fold(0i64, |s, r| s.wrapping_add(ints[*r]));
            assert_eq!(sum_i64(&local, &ints, g), expected, "group {g}");
        }
        // A NaN or infinity outside a group stays out of its sum (masked, not multiplied).
        let mut odd = floats.clone();
        (odd[2], odd[7]) = (f64::NAN, f64::INFINITY);
        assert_eq!((local[2], local[7]), (3, 3));
        assert_eq!(sum_f64(&local, &odd, 0), sum_f64(&local, &floats, 0));
        assert!(sum_f64(&local, &odd, 3).is_nan());
        // More than 255 rows of one group: the byte counts per piece must not overflow.
        assert_eq!(count_of(&[2u8; 70_000], 2), 70_000);
        assert_eq!(count_of(&[2u8; 70_000], 0), 0);
    }

    #[test]
    fn states_have_the_accumulators_layout_with_nulls_in_no_group() {
        let local = vec![0u8, 1, 0, 1, 2];
        let values: ArrayRef = Arc::new(Float64Array::from(vec![Some(1.5), None, Some(2.5), Some(4.0), None]));
        let avg = Kind::AvgF64.states(&values, &local, 3).unwrap();
        assert_eq!(avg[0].as_primitive::<arrow::datatypes::UInt64Type>().values().to_vec(), vec![2, 1, 0]);
        let sums = avg[1].as_primitive::<Float64Type>();
        assert_eq!((sums.value(0), sums.value(1)), (4.0, 4.0));
        // A group whose every argument is null has no sum (as DataFusion's state: null).
        assert!(sums.is_null(2));
        let count = Kind::Count.states(&values, &local, 3).unwrap();
        assert_eq!(count[0].as_primitive::<Int64Type>().values().to_vec(), vec![2, 1, 0]);
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(5), Some(6), None, Some(-1), Some(9)]));
        let sum = Kind::SumI64.states(&ints, &local, 3).unwrap();
        assert_eq!(sum[0].as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), vec![Some(5), Some(5), Some(9)]);
        // Not the layout's type, or too many groups: left to the row-by-row path.
        let narrow: ArrayRef = Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5]));
        assert!(Kind::SumI64.states(&narrow, &local, 3).is_none());
        assert!(Kind::SumF64.states(&values, &[0u8; 5], FEW_GROUPS + 1).is_none());
        // count takes any type.
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, None, Some("b"), Some("c")]));
        let count = Kind::Count.states(&text, &local, 3).unwrap();
        assert_eq!(count[0].as_primitive::<Int64Type>().values().to_vec(), vec![1, 1, 1]);
    }
}
