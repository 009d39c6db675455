//! SSB q1.1's filter on `lineorder` (`lo_discount BETWEEN 1 AND 3 AND lo_quantity < 25`) over
//! 8,192-row blocks of 8-byte integers, as a leaf selects rows:
//! - `basalt_offsets`: `eval::select` on stored blocks, which compare one-byte offsets (see
//!   `columns::Offsets`) with AVX2 words;
//! - `basalt_eight_bytes`: the same on blocks made for one scan (no offsets), the 8-byte kernel;
//! - `arrow_kernels`: Arrow's comparison kernels and `and` (what DataFusion's filter runs).
//!
//! 100 blocks (819,200 rows); values as SSB's generator draws them (discount 0-10, quantity
//! 1-50). Each iteration selects every block; the rows kept are checked equal across the three.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array};
use arrow::compute::kernels::cmp::{gt_eq, lt, lt_eq};
use basalt_common::filter::{CmpOp, Filter, Scalar};
use basalt_leaf::columns::Block;
use basalt_leaf::eval::{InSets, select};
use criterion::{Criterion, criterion_group, criterion_main};

const BLOCKS: u64 = 100;
const ROWS: usize = 8_192;

fn columns(b: u64) -> HashMap<String, ArrayRef> {
    // A fixed mix (no RNG dependency): Weyl sequences over the generator's ranges.
    let at = |i: usize, k: u64, m: u64| ((b * ROWS as u64 + i as u64) * k) % m;
    let discount: Int64Array = (0..ROWS).map(|i| at(i, 2_654_435_761, 11) as i64).collect();
    let quantity: Int64Array = (0..ROWS).map(|i| 1 + at(i, 40_503, 50) as i64).collect();
    HashMap::from([
        ("lo_discount".to_string(), Arc::new(discount) as ArrayRef),
        ("lo_quantity".to_string(), Arc::new(quantity) as ArrayRef),
    ])
}

fn blocks(transient: bool) -> Vec<Block> {
    (0..BLOCKS)
        .map(|b| {
            let block = Block::new(b * ROWS as u64, ROWS, columns(b), HashMap::new());
            if transient { block.transient() } else { block }
        })
        .collect()
}

fn kept(blocks: &[Block], filters: &[&Filter]) -> usize {
    let sets = InSets::default();
    blocks.iter().map(|b| select(filters, b, &sets).expect("select").count_set_bits()).sum()
}

fn arrow_kept(blocks: &[Block]) -> usize {
    let scalar = |v: i64| Int64Array::new_scalar(v);
    blocks
        .iter()
        .map(|b| {
            let (d, q) = (&b.columns["lo_discount"], &b.columns["lo_quantity"]);
            let m: BooleanArray = arrow::compute::and(
                &arrow::compute::and(&gt_eq(d, &scalar(1)).expect("cmp"), &lt_eq(d, &scalar(3)).expect("cmp"))
                    .expect("and"),
                &lt(q, &scalar(25)).expect("cmp"),
            )
            .expect("and");
            m.true_count()
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let cmp = |path: &str, op, v| Filter::Cmp { path: path.into(), op, value: Scalar::Int(v) };
    let filters =
        [cmp("lo_discount", CmpOp::GtEq, 1), cmp("lo_discount", CmpOp::LtEq, 3), cmp("lo_quantity", CmpOp::Lt, 25)];
    let refs: Vec<&Filter> = filters.iter().collect();
    let (stored, transient) = (blocks(false), blocks(true));
    let want = arrow_kept(&stored);
    assert_eq!(kept(&stored, &refs), want, "offsets keep Arrow's rows");
    assert_eq!(kept(&transient, &refs), want, "8-byte kernel keeps Arrow's rows");
    let mut group = c.benchmark_group("ssb_q1_1_filter_819200_rows");
    group.bench_function("basalt_offsets", |b| b.iter(|| kept(&stored, &refs)));
    group.bench_function("basalt_eight_bytes", |b| b.iter(|| kept(&transient, &refs)));
    group.bench_function("arrow_kernels", |b| b.iter(|| arrow_kept(&stored)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
