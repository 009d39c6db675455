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

/// A local group number no group has: rows whose argument is null, rows a scan did not select.
pub const NO_GROUP: u8 = u8::MAX;

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

    /// Per local group of `few`, the partial state of this aggregate over `few`'s rows with
    /// argument `values`. `None` when `values` is not of the type the state layout was chosen
    /// for (the caller adds row by row then).
    pub fn states(self, values: &ArrayRef, few: &mut Few) -> Option<Vec<ArrayRef>> {
        if values.len() != few.local.len() {
            return None;
        }
        let (counts, sums) = match self {
            Self::SumF64 | Self::AvgF64 if values.data_type() == &DataType::Float64 => few.sums(values, true)?,
            Self::SumI64 if values.data_type() == &DataType::Int64 => few.sums(values, true)?,
            Self::Count => few.sums(values, false)?,
            _ => return None,
        };
        let seen = || NullBuffer::from(counts.iter().map(|c| *c > 0).collect::<Vec<bool>>());
        Some(match (self, sums) {
            (Self::Count, _) => vec![Arc::new(Int64Array::from_iter_values(counts.iter().map(|c| *c as i64)))],
            (Self::SumF64, Sums::F64(sums)) => vec![Arc::new(Float64Array::new(sums.into(), Some(seen())))],
            (Self::AvgF64, Sums::F64(sums)) => {
                let sums = Arc::new(Float64Array::new(sums.into(), Some(seen())));
                vec![Arc::new(UInt64Array::from(counts)), sums]
            }
            (Self::SumI64, Sums::I64(sums)) => vec![Arc::new(Int64Array::new(sums.into(), Some(seen())))],
            _ => return None,
        })
    }
}

/// Where an argument's values and nulls (and their offset) are, its length, and whether it
/// was summed.
type Key = (usize, (usize, usize), usize, bool);

/// Per local group, sums of one argument.
#[derive(Clone)]
enum Sums {
    None,
    F64(Vec<f64>),
    I64(Vec<i64>),
}

/// A batch's rows in a few groups, and the counts and sums taken of them so far: aggregates
/// of the same argument (TPC-H q1's `sum(l_quantity)` and `avg(l_quantity)`) take them once.
pub struct Few {
    /// Each row's local group.
    local: Vec<u8>,
    /// Each local group's index among the aggregate's groups.
    groups: Vec<usize>,
    /// Rows per local group.
    rows: Option<Vec<u64>>,
    /// Per argument taken (the addresses of its values and nulls, and its length): its
    /// non-null values per local group and their sums. The argument is kept, so no other
    /// array of the batch can take its place in memory.
    taken: Vec<(Key, ArrayRef, Vec<u64>, Sums)>,
}

impl Few {
    /// `local[row]`: the row's local group, below `groups.len()`, or [`NO_GROUP`];
    /// `groups[l]`: local group `l`'s index. `None` with more than [`FEW_GROUPS`] groups.
    pub fn new(local: Vec<u8>, groups: Vec<usize>) -> Option<Self> {
        (groups.len() <= FEW_GROUPS).then_some(Self { local, groups, rows: None, taken: Vec::new() })
    }

    /// Each local group's index among the aggregate's groups.
    pub fn groups(&self) -> &[usize] {
        &self.groups
    }

    /// Each row's local group.
    pub fn locals(&self) -> &[u8] {
        &self.local
    }

    /// Per local group: the count of `values`' non-null values and, when `summed`, their sum.
    fn sums(&mut self, values: &ArrayRef, summed: bool) -> Option<(Vec<u64>, Sums)> {
        let nulls = values.logical_nulls().filter(|n| n.null_count() > 0);
        let data = match values.data_type() {
            DataType::Float64 => values.as_primitive::<Float64Type>().values().as_ptr() as usize,
            DataType::Int64 => values.as_primitive::<Int64Type>().values().as_ptr() as usize,
            _ if !summed => 0,
            _ => return None,
        };
        let data = if summed { data } else { 0 };
        // An argument is known by where its values and nulls are (the same column read by two
        // aggregates is the same array).
        let nulls_at = nulls.as_ref().map_or((0, 0), |n| (n.buffer().as_ptr() as usize, n.offset()));
        let key = (data, nulls_at, values.len(), summed);
        let known = key.0 != 0 || key.1.0 != 0;
        if let Some((.., counts, sums)) = self.taken.iter().find(|(k, ..)| known && *k == key) {
            return Some((counts.clone(), sums.clone()));
        }
        // Null arguments belong to no group.
        let masked;
        let local = match &nulls {
            Some(nulls) => {
                masked = without_nulls(&self.local, nulls);
                &masked[..]
            }
            None => &self.local[..],
        };
        let groups = self.groups.len();
        let counts = match (&nulls, &self.rows) {
            (None, Some(rows)) => rows.clone(),
            _ => {
                let counts: Vec<u64> = (0..groups).map(|g| count_of(local, g as u8)).collect();
                if nulls.is_none() {
                    self.rows = Some(counts.clone());
                }
                counts
            }
        };
        let sums = match values.data_type() {
            DataType::Float64 if summed => {
                let data = values.as_primitive::<Float64Type>().values();
                Sums::F64((0..groups).map(|g| sum_f64(local, data, g as u8)).collect())
            }
            DataType::Int64 if summed => {
                let data = values.as_primitive::<Int64Type>().values();
                Sums::I64((0..groups).map(|g| sum_i64(local, data, g as u8)).collect())
            }
            _ => Sums::None,
        };
        if known {
            self.taken.push((key, values.clone(), counts.clone(), sums.clone()));
        }
        Some((counts, sums))
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
    with_avx2!(sum_f64_avx2, sum_any, local, values, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_f64_avx2(local: &[u8], values: &[f64], g: u8) -> f64 {
    sum_any(local, values, g)
}

/// Wrapping sum of the values of group `g`'s rows, in eight lanes.
fn sum_i64(local: &[u8], values: &[i64], g: u8) -> i64 {
    with_avx2!(sum_i64_avx2, sum_any, local, values, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_i64_avx2(local: &[u8], values: &[i64], g: u8) -> i64 {
    sum_any(local, values, g)
}

/// A value summed in lanes: `f64` adds, `i64` adds wrapping (as DataFusion's sum does).
trait Summed: Copy {
    const ZERO: Self;
    /// The value when `keep` is all ones, zero when it is zero, without a branch (the rows'
    /// groups interleave) and without multiplying (a NaN or infinity outside the group would
    /// make NaN).
    fn masked(self, keep: u64) -> Self;
    fn plus(self, other: Self) -> Self;
}

impl Summed for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn masked(self, keep: u64) -> Self {
        f64::from_bits(self.to_bits() & keep)
    }
    #[inline(always)]
    fn plus(self, other: Self) -> Self {
        self + other
    }
}

impl Summed for i64 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn masked(self, keep: u64) -> Self {
        self & keep as i64
    }
    #[inline(always)]
    fn plus(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
}

#[inline(always)]
fn sum_any<T: Summed>(local: &[u8], values: &[T], g: u8) -> T {
    let mut lanes = [T::ZERO; 8];
    let (mut ls, mut vs) = (local.chunks_exact(8), values.chunks_exact(8));
    for (l, v) in (&mut ls).zip(&mut vs) {
        for j in 0..8 {
            lanes[j] = lanes[j].plus(v[j].masked(0u64.wrapping_sub(u64::from(l[j] == g))));
        }
    }
    let mut sum = lanes.iter().fold(T::ZERO, |s, x| s.plus(*x));
    for (l, v) in ls.remainder().iter().zip(vs.remainder()) {
        if *l == g {
            sum = sum.plus(*v);
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
        let mut few = Few::new(local.clone(), vec![10, 11, 12]).unwrap();
        let avg = Kind::AvgF64.states(&values, &mut few).unwrap();
        assert_eq!(avg[0].as_primitive::<arrow::datatypes::UInt64Type>().values().to_vec(), vec![2, 1, 0]);
        let sums = avg[1].as_primitive::<Float64Type>();
        assert_eq!((sums.value(0), sums.value(1)), (4.0, 4.0));
        // A group whose every argument is null has no sum (as DataFusion's state: null).
        assert!(sums.is_null(2));
        let count = Kind::Count.states(&values, &mut few).unwrap();
        assert_eq!(count[0].as_primitive::<Int64Type>().values().to_vec(), vec![2, 1, 0]);
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(5), Some(6), None, Some(-1), Some(9)]));
        let sum = Kind::SumI64.states(&ints, &mut few).unwrap();
        assert_eq!(sum[0].as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), vec![Some(5), Some(5), Some(9)]);
        // The same argument again: the same sums; another of the same length: its own.
        let again = Kind::SumF64.states(&values, &mut few).unwrap();
        assert_eq!(again[0].as_primitive::<Float64Type>().iter().collect::<Vec<_>>(), vec![Some(4.0), Some(4.0), None]);
        let other: ArrayRef = Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0, 4.0, 5.0]));
        let sum = Kind::SumF64.states(&other, &mut few).unwrap();
        assert_eq!(sum[0].as_primitive::<Float64Type>().values().to_vec(), vec![4.0, 6.0, 5.0]);
        assert_eq!(Kind::Count.states(&other, &mut few).unwrap()[0].as_primitive::<Int64Type>().value(0), 2);
        // Not the layout's type, or too many groups: left to the row-by-row path.
        let narrow: ArrayRef = Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5]));
        assert!(Kind::SumI64.states(&narrow, &mut few).is_none());
        assert!(Few::new(vec![0u8; 5], (0..=FEW_GROUPS).collect()).is_none());
        // count takes any type.
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, None, Some("b"), Some("c")]));
        let count = Kind::Count.states(&text, &mut few).unwrap();
        assert_eq!(count[0].as_primitive::<Int64Type>().values().to_vec(), vec![1, 1, 1]);
    }
}
