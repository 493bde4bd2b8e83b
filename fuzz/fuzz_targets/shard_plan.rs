//! The shard plan: any numbers a client may send either are refused by `validate`, or give a plan
//! whose arithmetic cannot overflow (overflow checks are on in fuzz builds) and whose batches
//! belong to the rank that asked, with equal counts on every rank.

#![no_main]

use handoff_store::ShardSpec;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    rank: u32,
    world_size: u32,
    batch_rows: u64,
    start_batch: u64,
    rows: u64,
    epoch: u64,
    seed: u64,
    shuffle: bool,
    drop_last: bool,
    /// Fold the numbers into small ranges, so plans that run (not only refusals) are explored.
    small: bool,
}

fuzz_target!(|input: Input| plan(input));

fn plan(input: Input) {
    let mut spec = ShardSpec {
        rank: input.rank,
        world_size: input.world_size,
        epoch: input.epoch,
        seed: input.seed,
        batch_rows: input.batch_rows,
        shuffle: input.shuffle,
        drop_last: input.drop_last,
        start_batch: input.start_batch,
    };
    let mut rows = input.rows;
    if input.small {
        spec.world_size %= 9;
        spec.rank %= 10;
        spec.batch_rows %= 65;
        spec.start_batch %= 6;
        rows %= 5000;
    }
    if spec.validate().is_err() {
        return;
    }
    // Links hold fewer than 2^63 rows (the store counts in u64 with room to spare).
    rows &= (1 << 62) - 1;
    let (start, end) = spec.contiguous_range(rows);
    assert!(
        start <= end && end <= rows,
        "range {start}..{end} of {rows}"
    );
    let batches = spec.batches_per_rank(rows);
    let world = u64::from(spec.world_size);
    if spec.batch_rows == 0 {
        return;
    }
    // Every rank gets the same number of batches.
    for other in [0, spec.world_size - 1] {
        let peer = ShardSpec {
            rank: other,
            ..spec.clone()
        };
        assert_eq!(peer.batches_per_rank(rows), batches);
    }
    let picks = [0, 1, batches / 2, batches.saturating_sub(1)];
    for k in picks.into_iter().filter(|k| *k < batches) {
        let global = spec
            .global_batch(k)
            .expect("a batch the plan counts has a place");
        assert_eq!(
            global % world,
            u64::from(spec.rank),
            "batch {k} is another rank's"
        );
        let first = spec.batch_start(k).expect("and a first row");
        if spec.drop_last {
            assert!(
                first + spec.batch_rows <= rows,
                "drop_last read past the end: batch {k} at {first} of {rows}"
            );
        }
        let _ = spec.streamable(k, rows);
    }
    if rows > 0 && !spec.drop_last {
        // Without drop_last every row is read: the rounds cover them all.
        assert!(
            (batches + spec.start_batch).saturating_mul(world * spec.batch_rows) >= rows,
            "{batches} batches of {} on {world} ranks leave rows unread",
            spec.batch_rows
        );
    }
}
