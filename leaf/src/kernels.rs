//! Comparisons of integer columns with constants (or with another column), ANDed into a row selection 64 rows at a
//! time: one word per 64 rows, no boolean array per filter and no pass to combine them.
//!
//! With AVX2 (checked at run time) an integer word's 64 values are compared 32, 16, 8 or 4 per
//! instruction and the answers `movemask`ed to bits ([`Lanes`]); otherwise a portable loop
//! compares them. Floats and pairs of columns use the portable loop compiled twice, for
//! baseline x86-64 and with AVX2. Arrow's comparison kernels build their result bit by bit in scalar code: on
//! SSB q1.1 (four comparisons over 6M rows) they were 63% of the process's CPU.

use basalt_common::filter::CmpOp;

/// `acc[w] &= (values[64w + j] op r for j in 0..64)` for every word the values cover. Words
/// already zero are skipped: rows an earlier filter dropped are not compared again.
pub fn and_compare<T: Lanes>(acc: &mut [u64], values: &[T], op: CmpOp, r: T) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut chunks = values.chunks_exact(64);
            for (word, chunk) in acc.iter_mut().zip(&mut chunks) {
                if *word != 0 {
                    // SAFETY: AVX2 is present (checked above) and the chunk holds 64 values.
                    *word &= unsafe { T::word_avx2(chunk, op, r) };
                }
            }
            let done = values.len() - chunks.remainder().len();
            if let Some(rest) = acc.get_mut(done / 64..) {
                and_compare_any(rest, chunks.remainder(), op, r);
            }
            return;
        }
    }
    and_compare_any(acc, values, op, r);
}

/// The types [`and_compare`] compares a word at a time with AVX2: unsigned values of 1, 2 or 4
/// bytes (offsets, see [`and_compare_offsets`]) and signed ones of 4 or 8 (dates, integers).
/// The portable loop's packing of a byte per row into bits cost more than the comparisons
/// (64-bit multiplies AVX2 does not have): SSB q1.1's filter over 819,200 rows of one-byte
/// offsets took 521 us that way, 163 us in words.
pub trait Lanes: Copy + Ord + 'static {
    /// The bits of the 64 rows at `values[0..64]`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and `values` holds at least 64 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn word_avx2(values: &[Self], op: CmpOp, r: Self) -> u64;
}

macro_rules! lanes {
    ($($t:ty => $word:path),* $(,)?) => {$(
        impl Lanes for $t {
            #[cfg(target_arch = "x86_64")]
            unsafe fn word_avx2(values: &[$t], op: CmpOp, r: $t) -> u64 {
                // SAFETY: forwarded from the caller (AVX2 present, 64 values).
                unsafe { $word(values.as_ptr(), op, r) }
            }
        }
    )*};
}

lanes!(u8 => simd::word_u8, u16 => simd::word_u16, u32 => simd::word_u32, i32 => simd::word_i32, i64 => simd::word_i64);

#[inline(always)]
fn and_compare_any<T: Copy + Ord>(acc: &mut [u64], values: &[T], op: CmpOp, r: T) {
    match op {
        CmpOp::Eq => and_words(acc, values, |v| v == r),
        CmpOp::NotEq => and_words(acc, values, |v| v != r),
        CmpOp::Lt => and_words(acc, values, |v| v < r),
        CmpOp::LtEq => and_words(acc, values, |v| v <= r),
        CmpOp::Gt => and_words(acc, values, |v| v > r),
        CmpOp::GtEq => and_words(acc, values, |v| v >= r),
    }
}

/// [`and_compare`] over a column stored as offsets from a base (see
/// [`crate::columns::Offsets`]): `base + offset op r` is `offset op (r - base)`, and a constant
/// outside the offsets' range decides every row at once.
pub fn and_compare_offsets(acc: &mut [u64], offsets: &crate::columns::Offsets, op: CmpOp, r: i64) {
    use crate::columns::OffsetValues;
    let d = i128::from(r) - i128::from(offsets.base);
    let max = match &offsets.values {
        OffsetValues::U8(_) => i128::from(u8::MAX),
        OffsetValues::U16(_) => i128::from(u16::MAX),
        OffsetValues::U32(_) => i128::from(u32::MAX),
    };
    // Every offset lies in 0..=max: beyond either end the answer is the same for all rows.
    let all = if d < 0 {
        Some(op.holds(std::cmp::Ordering::Greater))
    } else if d > max {
        Some(op.holds(std::cmp::Ordering::Less))
    } else {
        None
    };
    match all {
        Some(true) => {}
        Some(false) => {
            let words = offsets.len().div_ceil(64).min(acc.len());
            acc[..words].fill(0);
        }
        // In range: `d` fits the offsets' type (checked against `max` just above).
        None => match &offsets.values {
            OffsetValues::U8(v) => and_compare(acc, v, op, d as u8),
            OffsetValues::U16(v) => and_compare(acc, v, op, d as u16),
            OffsetValues::U32(v) => and_compare(acc, v, op, d as u32),
        },
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use basalt_common::filter::CmpOp;
    use std::arch::x86_64::*;

    /// The answer bits of a vector's lanes compared with `r` (all lanes biased to signed
    /// order), from `eq` (lanes equal) and `gt(a, b)` (lanes of a greater): `<` is `r > v`,
    /// `>=` its complement, and so on.
    macro_rules! answer {
        ($op:expr, $v:expr, $r:expr, $eq:ident, $gt:ident, $bits:expr) => {{
            let (v, r) = ($v, $r);
            match $op {
                CmpOp::Eq => $bits($eq(v, r)),
                CmpOp::NotEq => !$bits($eq(v, r)),
                CmpOp::Lt => $bits($gt(r, v)),
                CmpOp::GtEq => !$bits($gt(r, v)),
                CmpOp::Gt => $bits($gt(v, r)),
                CmpOp::LtEq => !$bits($gt(v, r)),
            }
        }};
    }

    /// 64 one-byte values at `p` compared with `r`: two vectors of 32.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn word_u8(p: *const u8, op: CmpOp, r: u8) -> u64 {
        let bias = _mm256_set1_epi8(i8::MIN);
        let rv = _mm256_xor_si256(_mm256_set1_epi8(r as i8), bias);
        let bits = |m: __m256i| _mm256_movemask_epi8(m) as u32;
        let mut word = 0u64;
        for half in 0..2 {
            // SAFETY: the caller passes 64 readable values; this reads 32 at 0 or 32.
            let v = _mm256_xor_si256(unsafe { _mm256_loadu_si256(p.add(32 * half).cast()) }, bias);
            let b: u32 = answer!(op, v, rv, _mm256_cmpeq_epi8, _mm256_cmpgt_epi8, bits);
            word |= u64::from(b) << (32 * half);
        }
        word
    }

    /// 64 two-byte values at `p` compared with `r`: pairs of 16-lane answers packed to bytes
    /// (`packs` interleaves the halves of its two inputs; the permute puts rows back in order).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn word_u16(p: *const u16, op: CmpOp, r: u16) -> u64 {
        let bias = _mm256_set1_epi16(i16::MIN);
        let rv = _mm256_xor_si256(_mm256_set1_epi16(r as i16), bias);
        let mut word = 0u64;
        for quarter in 0..2 {
            // SAFETY: the caller passes 64 readable values; this reads 32 at 0 or 32.
            let (a, b) = unsafe {
                (_mm256_loadu_si256(p.add(32 * quarter).cast()), _mm256_loadu_si256(p.add(32 * quarter + 16).cast()))
            };
            let (a, b) = (_mm256_xor_si256(a, bias), _mm256_xor_si256(b, bias));
            // Lanes all ones where the comparison holds (the complement taken after packing).
            let (ma, mb, negate) = match op {
                CmpOp::Eq => (_mm256_cmpeq_epi16(a, rv), _mm256_cmpeq_epi16(b, rv), false),
                CmpOp::NotEq => (_mm256_cmpeq_epi16(a, rv), _mm256_cmpeq_epi16(b, rv), true),
                CmpOp::Lt => (_mm256_cmpgt_epi16(rv, a), _mm256_cmpgt_epi16(rv, b), false),
                CmpOp::GtEq => (_mm256_cmpgt_epi16(rv, a), _mm256_cmpgt_epi16(rv, b), true),
                CmpOp::Gt => (_mm256_cmpgt_epi16(a, rv), _mm256_cmpgt_epi16(b, rv), false),
                CmpOp::LtEq => (_mm256_cmpgt_epi16(a, rv), _mm256_cmpgt_epi16(b, rv), true),
            };
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(ma, mb));
            let bits = _mm256_movemask_epi8(packed) as u32;
            word |= u64::from(if negate { !bits } else { bits }) << (32 * quarter);
        }
        word
    }

    /// 64 eight-byte signed values at `p` compared with `r`: sixteen vectors of 4.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn word_i64(p: *const i64, op: CmpOp, r: i64) -> u64 {
        let rv = _mm256_set1_epi64x(r);
        let bits = |m: __m256i| (_mm256_movemask_pd(_mm256_castsi256_pd(m)) as u8) & 0xF;
        let mut word = 0u64;
        for sixteenth in 0..16 {
            // SAFETY: the caller passes 64 readable values; this reads 4 at 4 * sixteenth.
            let v = unsafe { _mm256_loadu_si256(p.add(4 * sixteenth).cast()) };
            let b: u8 = answer!(op, v, rv, _mm256_cmpeq_epi64, _mm256_cmpgt_epi64, bits);
            word |= u64::from(b & 0xF) << (4 * sixteenth);
        }
        word
    }

    /// 64 four-byte unsigned values at `p` compared with `r`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn word_u32(p: *const u32, op: CmpOp, r: u32) -> u64 {
        // SAFETY: forwarded from the caller; u32 and i32 have one layout.
        unsafe { word_32(p.cast(), op, r as i32, i32::MIN) }
    }

    /// 64 four-byte signed values at `p` compared with `r`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn word_i32(p: *const i32, op: CmpOp, r: i32) -> u64 {
        // SAFETY: forwarded from the caller.
        unsafe { word_32(p, op, r, 0) }
    }

    /// 64 four-byte values at `p` compared with `r`, each flipped by `bias` first (`i32::MIN`
    /// orders unsigned values as signed ones): eight vectors of 8.
    #[target_feature(enable = "avx2")]
    unsafe fn word_32(p: *const i32, op: CmpOp, r: i32, bias: i32) -> u64 {
        let bias = _mm256_set1_epi32(bias);
        let rv = _mm256_xor_si256(_mm256_set1_epi32(r), bias);
        let bits = |m: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(m)) as u8;
        let mut word = 0u64;
        for eighth in 0..8 {
            // SAFETY: the caller passes 64 readable values; this reads 8 at 8 * eighth.
            let v = _mm256_xor_si256(unsafe { _mm256_loadu_si256(p.add(8 * eighth).cast()) }, bias);
            let b: u8 = answer!(op, v, rv, _mm256_cmpeq_epi32, _mm256_cmpgt_epi32, bits);
            word |= u64::from(b) << (8 * eighth);
        }
        word
    }
}

/// [`and_compare`] for floats in IEEE total order (as Arrow's comparison kernels order them:
/// -0.0 before 0.0, NaN after infinity): each value compared through its total-order key.
pub fn and_compare_floats(acc: &mut [u64], values: &[f64], op: CmpOp, r: f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { and_compare_floats_avx2(acc, values, op, r) };
            return;
        }
    }
    and_compare_floats_any(acc, values, op, r);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn and_compare_floats_avx2(acc: &mut [u64], values: &[f64], op: CmpOp, r: f64) {
    and_compare_floats_any(acc, values, op, r);
}

/// The integer that orders as `x` does in IEEE total order (what `f64::total_cmp` compares).
#[inline(always)]
pub fn total_key(x: f64) -> i64 {
    let bits = x.to_bits() as i64;
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
}

#[inline(always)]
fn and_compare_floats_any(acc: &mut [u64], values: &[f64], op: CmpOp, r: f64) {
    let r = total_key(r);
    match op {
        CmpOp::Eq => and_words(acc, values, |v| total_key(v) == r),
        CmpOp::NotEq => and_words(acc, values, |v| total_key(v) != r),
        CmpOp::Lt => and_words(acc, values, |v| total_key(v) < r),
        CmpOp::LtEq => and_words(acc, values, |v| total_key(v) <= r),
        CmpOp::Gt => and_words(acc, values, |v| total_key(v) > r),
        CmpOp::GtEq => and_words(acc, values, |v| total_key(v) >= r),
    }
}

/// `acc[w] &= (left[64w + j] op right[64w + j] for j in 0..64)`: two columns of one block
/// compared row by row (`l_commitdate < l_receiptdate`), as [`and_compare`] does with a constant.
pub fn and_compare_columns<T: Copy + Ord>(acc: &mut [u64], left: &[T], op: CmpOp, right: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { and_compare_columns_avx2(acc, left, op, right) };
            return;
        }
    }
    and_compare_columns_any(acc, left, op, right);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn and_compare_columns_avx2<T: Copy + Ord>(acc: &mut [u64], left: &[T], op: CmpOp, right: &[T]) {
    and_compare_columns_any(acc, left, op, right);
}

#[inline(always)]
fn and_compare_columns_any<T: Copy + Ord>(acc: &mut [u64], left: &[T], op: CmpOp, right: &[T]) {
    match op {
        CmpOp::Eq => and_pairs(acc, left, right, |l, r| l == r),
        CmpOp::NotEq => and_pairs(acc, left, right, |l, r| l != r),
        CmpOp::Lt => and_pairs(acc, left, right, |l, r| l < r),
        CmpOp::LtEq => and_pairs(acc, left, right, |l, r| l <= r),
        CmpOp::Gt => and_pairs(acc, left, right, |l, r| l > r),
        CmpOp::GtEq => and_pairs(acc, left, right, |l, r| l >= r),
    }
}

/// [`and_words`] over pairs of values; rows past the shorter slice are left as they are.
#[inline(always)]
fn and_pairs<T: Copy>(acc: &mut [u64], left: &[T], right: &[T], f: impl Fn(T, T) -> bool) {
    let n = left.len().min(right.len());
    let (left, right) = (&left[..n], &right[..n]);
    let mut ls = left.chunks_exact(64);
    let mut rs = right.chunks_exact(64);
    for ((word, l), r) in acc.iter_mut().zip(&mut ls).zip(&mut rs) {
        if *word == 0 {
            continue;
        }
        let mut bytes = [0u8; 64];
        for ((b, x), y) in bytes.iter_mut().zip(l).zip(r) {
            *b = u8::from(f(*x, *y));
        }
        *word &= pack(&bytes);
    }
    let (lrest, rrest) = (ls.remainder(), rs.remainder());
    if let Some(word) = acc.get_mut(n / 64)
        && !lrest.is_empty()
    {
        let mut bits = 0u64;
        for (j, (x, y)) in lrest.iter().zip(rrest).enumerate() {
            bits |= u64::from(f(*x, *y)) << j;
        }
        *word &= bits;
    }
}

#[inline(always)]
fn and_words<T: Copy>(acc: &mut [u64], values: &[T], f: impl Fn(T) -> bool) {
    let mut chunks = values.chunks_exact(64);
    for (word, chunk) in acc.iter_mut().zip(&mut chunks) {
        if *word == 0 {
            continue;
        }
        // A byte per result first (this loop vectorizes), then 8 bytes to 8 bits at a time.
        let mut bytes = [0u8; 64];
        for (b, v) in bytes.iter_mut().zip(chunk) {
            *b = u8::from(f(*v));
        }
        *word &= pack(&bytes);
    }
    let rest = chunks.remainder();
    if let Some(word) = acc.get_mut(values.len() / 64)
        && !rest.is_empty()
    {
        let mut bits = 0u64;
        for (j, v) in rest.iter().enumerate() {
            bits |= u64::from(f(*v)) << j;
        }
        *word &= bits;
    }
}

/// 64 bytes of 0 or 1 as 64 bits (byte `j` to bit `j`).
#[inline(always)]
fn pack(bytes: &[u8; 64]) -> u64 {
    let mut word = 0u64;
    for (k, eight) in bytes.chunks_exact(8).enumerate() {
        let mut le = [0u8; 8];
        le.copy_from_slice(eight);
        // Byte i of x (0 or 1) times 2^(56 - 7i) lands on bit 56 + i; no two products meet.
        let x = u64::from_le_bytes(le);
        word |= (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * k);
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference<T: Copy + Ord>(values: &[T], op: CmpOp, r: T) -> Vec<bool> {
        values
            .iter()
            .map(|v| match op {
                CmpOp::Eq => *v == r,
                CmpOp::NotEq => *v != r,
                CmpOp::Lt => *v < r,
                CmpOp::LtEq => *v <= r,
                CmpOp::Gt => *v > r,
                CmpOp::GtEq => *v >= r,
            })
            .collect()
    }

    #[test]
    fn words_hold_each_rows_comparison_anded_with_the_selection() {
        let ops = [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq];
        for n in [0usize, 1, 63, 64, 65, 200, 8192] {
            let values: Vec<i64> = (0..n as i64).map(|i| (i * 7919 + i / 5) % 13 - 6).collect();
            let narrow: Vec<i32> = values.iter().map(|v| *v as i32).collect();
            // A selection with some rows already dropped (every third word zero, others mixed).
            let start: Vec<u64> =
                (0..n.div_ceil(64)).map(|w| if w % 3 == 2 { 0 } else { 0xF0F0_FFFF_0000_FFFF ^ (w as u64) }).collect();
            let selected = |acc: &[u64], i: usize| acc[i / 64] & (1 << (i % 64)) != 0;
            for op in ops {
                for r in [-7i64, 0, 3, 6] {
                    let want = reference(&values, op, r);
                    let mut acc = start.clone();
                    and_compare(&mut acc, &values, op, r);
                    let mut acc32 = start.clone();
                    and_compare(&mut acc32, &narrow, op, r as i32);
                    let mut plain = start.clone();
                    and_compare_any(&mut plain, &values, op, r);
                    for (i, wanted) in want.iter().enumerate() {
                        let expect = selected(&start, i) && *wanted;
                        assert_eq!(selected(&acc, i), expect, "n={n} {op:?} {r} row {i}");
                        assert_eq!(selected(&acc32, i), expect, "i32 n={n} {op:?} {r} row {i}");
                    }
                    assert_eq!(acc, plain, "AVX2 and baseline agree");
                    assert_eq!(acc, acc32);
                }
            }
        }
    }

    /// Values of each width through the AVX2 words and the portable loop, over the whole range
    /// of the type (the bias to signed order) and lengths not a multiple of 64.
    #[test]
    fn words_agree_with_the_portable_loop() {
        fn check<T: Lanes + std::fmt::Debug>(values: &[T], constants: &[T]) {
            let ops = [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq];
            let start: Vec<u64> = (0..values.len().div_ceil(64))
                .map(|w| if w % 3 == 2 { 0 } else { 0xF0F0_FFFF_0000_FFFF ^ (w as u64) })
                .collect();
            for op in ops {
                for r in constants {
                    let mut fast = start.clone();
                    and_compare(&mut fast, values, op, *r);
                    let mut plain = start.clone();
                    and_compare_any(&mut plain, values, op, *r);
                    assert_eq!(fast, plain, "{op:?} {r:?} over {}", values.len());
                }
            }
        }
        for n in [0usize, 1, 63, 64, 65, 200, 8192] {
            let mix = |i: usize| (i * 7919 + i / 5) as u64;
            let bytes: Vec<u8> = (0..n).map(|i| mix(i) as u8).collect();
            check(&bytes, &[0, 1, 127, 128, 129, 200, 254, 255]);
            let shorts: Vec<u16> = (0..n).map(|i| (mix(i) * 37) as u16).collect();
            check(&shorts, &[0, 1, 255, 32_767, 32_768, 40_000, 65_535]);
            let words: Vec<u32> = (0..n).map(|i| (mix(i) * 2_654_435_761) as u32).collect();
            check(&words, &[0, 1, 65_536, i32::MAX as u32, 1 << 31, 3_000_000_000, u32::MAX]);
            // Every value equal to a constant somewhere: `=` and `<>` see matches.
            let same: Vec<u8> = (0..n).map(|i| (i % 3) as u8 + 127).collect();
            check(&same, &[127, 128, 129]);
            let longs: Vec<i64> =
                (0..n).map(|i| (mix(i) as i64).wrapping_mul(-0x61C8_8646_80B5_83EB) >> (i % 50)).collect();
            check(&longs, &[i64::MIN, -1, 0, 1, longs.first().copied().unwrap_or(7), i64::MAX]);
            let ints: Vec<i32> = longs.iter().map(|v| (*v >> 32) as i32).collect();
            check(&ints, &[i32::MIN, -1, 0, 1, ints.first().copied().unwrap_or(7), i32::MAX]);
        }
    }

    #[test]
    fn floats_compare_in_total_order_as_total_cmp_does() {
        let specials =
            [-0.0, 0.0, 0.05, 0.07, -2.5, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, -f64::NAN, 1e300, 5e-324];
        let ops = [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq];
        for n in [0usize, 1, 63, 64, 65, 200] {
            let values: Vec<f64> = (0..n).map(|i| specials[(i * 7 + i / 3) % specials.len()]).collect();
            let start: Vec<u64> =
                (0..n.div_ceil(64)).map(|w| if w % 3 == 2 { 0 } else { 0xF0F0_FFFF_0000_FFFF ^ (w as u64) }).collect();
            let selected = |acc: &[u64], i: usize| acc[i / 64] & (1 << (i % 64)) != 0;
            for op in ops {
                for r in specials {
                    let mut acc = start.clone();
                    and_compare_floats(&mut acc, &values, op, r);
                    let mut plain = start.clone();
                    and_compare_floats_any(&mut plain, &values, op, r);
                    assert_eq!(acc, plain, "AVX2 and baseline agree");
                    for (i, v) in values.iter().enumerate() {
                        let holds = op.holds(v.total_cmp(&r));
                        assert_eq!(selected(&acc, i), selected(&start, i) && holds, "{v} {op:?} {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn column_pairs_compare_row_by_row_anded_with_the_selection() {
        let ops = [CmpOp::Eq, CmpOp::NotEq, CmpOp::Lt, CmpOp::LtEq, CmpOp::Gt, CmpOp::GtEq];
        for n in [0usize, 1, 63, 64, 65, 200, 8192] {
            let left: Vec<i32> = (0..n as i32).map(|i| (i * 7919 + i / 5) % 13 - 6).collect();
            let right: Vec<i32> = (0..n as i32).map(|i| (i * 104_729) % 11 - 5).collect();
            let start: Vec<u64> =
                (0..n.div_ceil(64)).map(|w| if w % 3 == 2 { 0 } else { 0xF0F0_FFFF_0000_FFFF ^ (w as u64) }).collect();
            let selected = |acc: &[u64], i: usize| acc[i / 64] & (1 << (i % 64)) != 0;
            for op in ops {
                let mut acc = start.clone();
                and_compare_columns(&mut acc, &left, op, &right);
                let mut plain = start.clone();
                and_compare_columns_any(&mut plain, &left, op, &right);
                assert_eq!(acc, plain, "AVX2 and baseline agree");
                for i in 0..n {
                    let want = reference(&left[i..=i], op, right[i])[0];
                    assert_eq!(selected(&acc, i), selected(&start, i) && want, "n={n} {op:?} row {i}");
                }
            }
        }
    }
}
