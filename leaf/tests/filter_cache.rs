//! The filter cache's budget makes room (its own test process: the budget is the process's,
//! and a small one would slow the other tests' filters).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use basalt_leaf::columns::{BLOCK_ROWS, Block, ScanEpoch, filter_cache_bytes, set_filter_cache_max_bytes};

/// A block of `BLOCK_ROWS` rows: `n` integers over a range of 60,000 (offsets of two bytes a
/// row), `kind` text of five values (a dictionary of two-byte codes), `day` dates as text.
fn block(i: u64) -> Block {
    let rows = BLOCK_ROWS as i64;
    let n: ArrayRef = Arc::new(Int64Array::from_iter_values((0..rows).map(|r| (r * 7) % 60_000)));
    let kind: ArrayRef = Arc::new(StringArray::from_iter_values((0..rows).map(|r| format!("kind-{}", r % 5))));
    let day: ArrayRef =
        Arc::new(StringArray::from_iter_values((0..rows).map(|r| format!("1996-{:02}-{:02}", r % 12 + 1, r % 28 + 1))));
    let columns = HashMap::from([("n".to_string(), n), ("kind".to_string(), kind), ("day".to_string(), day)]);
    Block::new(i * BLOCK_ROWS as u64, BLOCK_ROWS, columns, HashMap::new())
}

/// Whether both are the same kept piece.
fn same<T>(x: Option<Arc<T>>, y: Option<Arc<T>>) -> bool {
    matches!((x, y), (Some(x), Some(y)) if Arc::ptr_eq(&x, &y))
}

#[test]
fn blocks_not_read_lately_make_room_for_new_ones() {
    // A block keeps 16 KiB of offsets, 16 KiB of codes (and its values), 32 KiB of dates: a
    // budget of about six blocks' worth.
    let budget = 6 * 66 * 1024;
    set_filter_cache_max_bytes(budget);
    let blocks: Vec<Block> = (0..40).map(block).collect();
    for (i, b) in blocks.iter().enumerate() {
        // Each block builds what its filters need even though the blocks before it filled the
        // budget long ago (before eviction: none past the sixth block).
        assert!(b.offsets("n", false).is_some(), "block {i}: offsets");
        assert!(b.text_dictionary("kind").is_some(), "block {i}: dictionary");
        assert!(b.offsets("day", true).is_some(), "block {i}: dates as offsets");
        // The cache stays within the budget, give or take the piece just built.
        assert!(filter_cache_bytes() <= budget + 64 * 1024, "block {i}: {} bytes kept", filter_cache_bytes());
    }
    // A block read again keeps what it has: the last one still has its offsets (the same ones).
    let last = blocks.last().unwrap();
    let again = last.offsets("n", false).unwrap();
    assert!(Arc::ptr_eq(&again, &last.offsets("n", false).unwrap()));
    // The first block's were dropped and come back, built again, on its next read.
    assert!(blocks[0].text_dictionary("kind").is_some());
    // A column without a dictionary (more distinct values than half the rows) stays without one.
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values((0..BLOCK_ROWS).map(|r| format!("id-{r}"))));
    let unique = Block::new(0, BLOCK_ROWS, HashMap::from([("id".to_string(), ids)]), HashMap::new());
    assert!(unique.text_dictionary("id").is_none());
    // Pieces a running scan holds cannot go: past the budget a block then builds its pieces
    // for the scan asking and drops them after (each call builds anew) until room is made.
    drop(again);
    set_filter_cache_max_bytes(40 * 1024);
    let held: Vec<_> = blocks.iter().take(2).map(|b| b.offsets("n", false).unwrap()).collect();
    let fresh = block(100);
    let kept = |b: &Block| Arc::ptr_eq(&b.offsets("n", false).unwrap(), &b.offsets("n", false).unwrap());
    let before = filter_cache_bytes();
    assert!(!kept(&fresh));
    assert_eq!(filter_cache_bytes(), before);
    drop(held);
    assert!(kept(&fresh));
    // Dropping the blocks gives everything back.
    drop(blocks);
    drop(fresh);
    drop(unique);
    assert_eq!(filter_cache_bytes(), 0);

    // Within a scan whose blocks need more than the budget, the blocks it read keep their
    // pieces and the ones past the budget use theirs once (not: each block evicting the scan's
    // earliest, so that the next run rebuilt everything).
    set_filter_cache_max_bytes(budget);
    let blocks: Vec<Block> = (0..40).map(block).collect();
    let scan = |range: std::ops::Range<usize>| {
        let mut kept = Vec::new();
        let mut bytes = Vec::new();
        ScanEpoch::begin().enter(|| {
            for i in range {
                let b = &blocks[i];
                // Built for every block; kept when asking again gives the same piece.
                assert!(b.offsets("n", false).is_some() && b.text_dictionary("kind").is_some());
                let offsets = same(b.offsets("n", false), b.offsets("n", false));
                if offsets && same(b.text_dictionary("kind"), b.text_dictionary("kind")) {
                    kept.push(i);
                }
                bytes.push(filter_cache_bytes());
            }
        });
        (kept, bytes)
    };
    let (first, bytes) = scan(0..40);
    assert!((4..=12).contains(&first.len()), "{first:?}");
    assert_eq!(first, (0..first.len()).collect::<Vec<_>>());
    assert!(bytes.windows(2).all(|w| w[0] <= w[1]), "nothing evicted within the scan: {bytes:?}");
    assert!(filter_cache_bytes() <= budget + 64 * 1024);
    // The next run finds the same blocks' pieces and builds nothing new.
    let (second, bytes) = scan(0..40);
    assert_eq!(second, first);
    assert!(bytes.iter().all(|b| *b == bytes[0]), "{bytes:?}");
    // Another scan's blocks make room from blocks it has not read.
    let (other, _) = scan(20..40);
    assert!(!other.is_empty());
    assert!(other.iter().all(|i| *i >= 20));
    // Outside a scan (as above) any block not read since the hand passed may go.
    drop(blocks);
    assert_eq!(filter_cache_bytes(), 0);
}
