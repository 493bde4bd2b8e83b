//! A link spread over several server replicas (issue 17): which rows of which replica each
//! rank reads. Pure planning, no I/O: the server and the clients
//! compute the same answers from the same inputs.
//!
//! Which replica holds a partition is part of the protocol: `handoff_proto::placement`.
//!
//! **The shard plan over replicas.** Each replica numbers its own committed rows (in its own
//! commit order, or its own shuffle of them) and cuts them into whole batches of `batch_rows`.
//! The global batch sequence is those whole batches, then the *tail*: the rows left over at
//! each replica (fewer than a batch each), concatenated in replica order and cut into batches.
//! Only tail batches, and the global end where it wraps around, take rows from more than one
//! replica: at most `replicas` batches of the whole link. Global batch `g` goes to rank
//! `g % world_size`, and the counts, the padding (wrap-around to the start) and `drop_last` are
//! those of [`ShardSpec`] over the total rows, so every guarantee of one server holds over the
//! union: every row exactly once, equal batch counts of exactly `batch_rows`.
//!
//! Without shuffle the whole batches are interleaved across replicas (the first batch of each,
//! then the second of each, ...), so the ranks of a round read from every replica at once. With
//! shuffle the order of the whole batches is a permutation over (seed, epoch), and each replica
//! shuffles its own rows (its [`ShardSpec`] with the same seed and epoch): a batch mixes rows of
//! one replica, not of the whole link, which is the price of reading each batch from one place.

use handoff_proto::placement::MAX_REPLICAS;

use crate::error::{Result, StoreError};
use crate::shard::{ShardSpec, shuffle_batches};

/// The most global batches one layout plans: its order takes 16 bytes a batch, 256 MiB here,
/// which the caller reserves ([`ReplicaLayout::bytes_for`]) before building it.
pub const MAX_LAYOUT_BATCHES: u64 = 1 << 24;

/// Rows `start..start + rows` of one replica's order (its commit order, or its shuffle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub replica: u32,
    pub start: u64,
    pub rows: u64,
}

/// One global batch: a whole batch of one replica, or a batch of the tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    Whole { replica: u32, index: u64 },
    Tail { index: u64 },
}

/// The global batch order of a sealed link over its replicas, for one epoch.
#[derive(Debug, Clone)]
pub struct ReplicaLayout {
    batch_rows: u64,
    total: u64,
    /// The tail's rows in replica order: (replica, first row in that replica, rows).
    tail: Vec<Segment>,
    tail_rows: u64,
    /// Every whole batch (whole batches of a replica, then whole batches of the tail) in global
    /// order; a partial last tail batch follows them.
    order: Vec<Batch>,
}

impl ReplicaLayout {
    /// The layout for replicas holding `rows[r]` committed rows each, read with `spec`'s
    /// `batch_rows`, `shuffle`, `seed` and `epoch` (its rank and world size do not matter here).
    pub fn new(rows: &[u64], spec: &ShardSpec) -> Result<Self> {
        if rows.is_empty() || rows.len() > MAX_REPLICAS as usize {
            return Err(StoreError::InvalidArgument(format!(
                "a link is served by 1 to {MAX_REPLICAS} replicas, not {}",
                rows.len()
            )));
        }
        // The checks of one server's reads: batch_rows and world_size in range.
        spec.validate()?;
        if spec.batch_rows == 0 {
            return Err(StoreError::InvalidArgument(
                "a read over several replicas needs batch_rows > 0: batches are what ranks split"
                    .into(),
            ));
        }
        let total = rows
            .iter()
            .try_fold(0u64, |sum, &n| sum.checked_add(n))
            .filter(|&total| total <= i64::MAX as u64)
            .ok_or_else(|| {
                StoreError::InvalidArgument(format!(
                    "the replicas' row counts {rows:?} add up past 2^63"
                ))
            })?;
        let b = spec.batch_rows;
        if total / b > MAX_LAYOUT_BATCHES {
            return Err(StoreError::InvalidArgument(format!(
                "{total} rows in batches of {b} are {} batches, more than the {MAX_LAYOUT_BATCHES} \
                 a read over several replicas plans; ask for larger batches (batch_rows)",
                total / b
            )));
        }
        let mut tail = Vec::new();
        for (replica, &n) in (0u32..).zip(rows) {
            if n % b > 0 {
                tail.push(Segment {
                    replica,
                    start: n - n % b,
                    rows: n % b,
                });
            }
        }
        let tail_rows: u64 = tail.iter().map(|piece| piece.rows).sum();
        // One allocation of at most MAX_LAYOUT_BATCHES entries, checked above.
        let mut order: Vec<Batch> = Vec::with_capacity((total / b) as usize);
        // Round by round, the replicas that still have a whole batch: each visit yields one, so
        // the work is the number of batches whatever the replicas' sizes.
        let mut active: Vec<u32> = (0u32..)
            .zip(rows)
            .filter(|(_, n)| **n >= b)
            .map(|(r, _)| r)
            .collect();
        let mut round = 0u64;
        while !active.is_empty() {
            order.extend(active.iter().map(|&replica| Batch::Whole {
                replica,
                index: round,
            }));
            round += 1;
            active.retain(|&r| rows[r as usize] / b > round);
        }
        order.extend((0..tail_rows / b).map(|index| Batch::Tail { index }));
        if spec.shuffle {
            shuffle_batches(&mut order, spec.seed, spec.epoch);
        }
        Ok(Self {
            batch_rows: b,
            total,
            tail,
            tail_rows,
            order,
        })
    }

    /// The memory a layout of `total_rows` in batches of `batch_rows` takes, to reserve first.
    pub fn bytes_for(total_rows: u64, batch_rows: u64) -> u64 {
        (total_rows / batch_rows.max(1)).saturating_mul(std::mem::size_of::<Batch>() as u64)
    }

    /// The rows of global batch `g` (`g` below `ceil(total / batch_rows)`), as segments.
    fn batch(&self, g: u64) -> Vec<Segment> {
        let b = self.batch_rows;
        match self.order.get(g as usize) {
            Some(Batch::Whole { replica, index }) => vec![Segment {
                replica: *replica,
                start: index * b,
                rows: b,
            }],
            Some(Batch::Tail { index }) => self.tail_rows_at(index * b, b),
            // The partial last batch: the tail's leftover.
            None => {
                let start = (self.tail_rows / b) * b;
                self.tail_rows_at(start, self.tail_rows - start)
            }
        }
    }

    /// Tail rows `start..start + rows` as segments of their replicas.
    fn tail_rows_at(&self, start: u64, rows: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let (mut at, end) = (0u64, start + rows);
        for piece in &self.tail {
            let (from, to) = (at.max(start), (at + piece.rows).min(end));
            if from < to {
                out.push(Segment {
                    replica: piece.replica,
                    start: piece.start + (from - at),
                    rows: to - from,
                });
            }
            at += piece.rows;
        }
        out
    }

    /// Global positions `start..start + rows` (below the total) as segments: position `p` is row
    /// `p % batch_rows` of global batch `p / batch_rows`.
    fn positions(&self, start: u64, rows: u64, out: &mut Vec<Segment>) {
        let b = self.batch_rows;
        let mut p = start;
        let end = start + rows;
        while p < end {
            let g = p / b;
            let within = p % b;
            let take = (b - within).min(end - p);
            let mut skip = within;
            let mut left = take;
            for seg in self.batch(g) {
                if left == 0 {
                    break;
                }
                if skip >= seg.rows {
                    skip -= seg.rows;
                    continue;
                }
                let n = (seg.rows - skip).min(left);
                push(
                    out,
                    Segment {
                        replica: seg.replica,
                        start: seg.start + skip,
                        rows: n,
                    },
                );
                skip = 0;
                left -= n;
            }
            p += take;
        }
    }

    /// The rank's `k`-th batch (counting from 0, before `spec.start_batch` is applied) as
    /// segments: exactly `batch_rows` rows, the end wrapping around to the start as on one server.
    /// `None` past the rank's last batch, and for a spec out of range or with another
    /// `batch_rows` than the layout was built with.
    pub fn rank_batch(&self, spec: &ShardSpec, k: u64) -> Option<Vec<Segment>> {
        // A rank and world from a client: in range before any arithmetic on them.
        if spec.validate().is_err() || spec.batch_rows != self.batch_rows {
            return None;
        }
        if k >= spec.batches_per_rank(self.total) {
            return None;
        }
        let start = spec.batch_start(k)?;
        let mut out = Vec::new();
        let mut left = self.batch_rows;
        let mut p = start % self.total;
        while left > 0 {
            let n = left.min(self.total - p);
            self.positions(p, n, &mut out);
            left -= n;
            p = 0;
        }
        Some(out)
    }

    /// Every batch of the rank, from `spec.start_batch`.
    pub fn rank_batches<'a>(
        &'a self,
        spec: &'a ShardSpec,
    ) -> impl Iterator<Item = Vec<Segment>> + 'a {
        (spec.start_batch..spec.batches_per_rank(self.total))
            .map_while(move |k| self.rank_batch(spec, k))
    }
}

/// Appends `seg`, merged into the last segment when it continues it.
fn push(out: &mut Vec<Segment>, seg: Segment) {
    if let Some(last) = out.last_mut()
        && last.replica == seg.replica
        && last.start + last.rows == seg.start
    {
        last.rows += seg.rows;
        return;
    }
    out.push(seg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn spec(rank: u32, world: u32, batch_rows: u64, shuffle: bool, drop_last: bool) -> ShardSpec {
        ShardSpec {
            rank,
            world_size: world,
            epoch: 3,
            seed: 7,
            batch_rows,
            shuffle,
            drop_last,
            start_batch: 0,
        }
    }

    #[test]
    fn refuses_what_it_cannot_plan() {
        let s = spec(0, 1, 4, false, false);
        assert!(ReplicaLayout::new(&[], &s).is_err());
        assert!(ReplicaLayout::new(&[u64::MAX, 1], &s).is_err());
        assert!(ReplicaLayout::new(&[1], &spec(0, 1, 0, false, false)).is_err());
        let many = vec![1u64; MAX_REPLICAS as usize + 1];
        assert!(ReplicaLayout::new(&many, &s).is_err());
        // A hostile batch_rows cannot make the plan huge: refused before anything is allocated.
        let tiny = spec(0, 1, 1, true, false);
        let err = ReplicaLayout::new(&[1 << 40, 1 << 40], &tiny).expect_err("too many batches");
        assert!(err.to_string().contains("larger batches"), "{err}");
        assert_eq!(ReplicaLayout::bytes_for(1 << 20, 1 << 10), (1 << 10) * 16);
    }

    #[test]
    fn whole_batches_interleave_and_only_the_tail_mixes() {
        let s = spec(0, 1, 4, false, false);
        let layout = ReplicaLayout::new(&[9, 4, 6], &s).expect("layout");
        let batches: Vec<Vec<Segment>> = layout.rank_batches(&s).collect();
        let seg = |replica, start, rows| Segment {
            replica,
            start,
            rows,
        };
        assert_eq!(
            batches,
            vec![
                vec![seg(0, 0, 4)],
                vec![seg(1, 0, 4)],
                vec![seg(2, 0, 4)],
                vec![seg(0, 4, 4)],
                // The tail: replica 0's last row, replica 2's last two; then the wrap-around.
                vec![seg(0, 8, 1), seg(2, 4, 2), seg(0, 0, 1)],
            ]
        );
    }

    #[test]
    fn shuffle_permutes_whole_batches_per_epoch() {
        let order = |epoch| {
            let s = ShardSpec {
                epoch,
                ..spec(0, 1, 10, true, false)
            };
            let layout = ReplicaLayout::new(&[500, 500, 500], &s).expect("layout");
            layout.rank_batches(&s).collect::<Vec<_>>()
        };
        let (a, b) = (order(0), order(1));
        assert_ne!(a, b, "epochs shuffle differently");
        assert_eq!(a, order(0), "and the same epoch the same way");
        // Not the unshuffled interleaving.
        let plain = spec(0, 1, 10, false, false);
        let layout = ReplicaLayout::new(&[500, 500, 500], &plain).expect("layout");
        assert_ne!(a, layout.rank_batches(&plain).collect::<Vec<_>>());
    }

    fn check(rows: Vec<u64>, batch_rows: u64, world: u32, shuffle: bool, drop_last: bool) {
        let total: u64 = rows.iter().sum();
        let probe = spec(0, world, batch_rows, shuffle, drop_last);
        let layout = ReplicaLayout::new(&rows, &probe).expect("layout");
        let per_rank = probe.batches_per_rank(total);
        let mut seen: HashMap<(u32, u64), u64> = HashMap::new();
        let mut mixed = 0;
        for rank in 0..world {
            let s = spec(rank, world, batch_rows, shuffle, drop_last);
            let batches: Vec<Vec<Segment>> = layout.rank_batches(&s).collect();
            assert_eq!(batches.len() as u64, per_rank, "equal batch counts");
            for (k, batch) in (0u64..).zip(batches) {
                assert_eq!(batch.iter().map(|s| s.rows).sum::<u64>(), batch_rows);
                // Padding past the end may mix; before it, only the tail does.
                let g = k * u64::from(world) + u64::from(rank);
                if (g + 1) * batch_rows <= total {
                    mixed += u64::from(batch.len() > 1);
                }
                for seg in batch {
                    assert!(
                        seg.start + seg.rows <= rows[seg.replica as usize],
                        "{seg:?}"
                    );
                    for r in seg.start..seg.start + seg.rows {
                        *seen.entry((seg.replica, r)).or_default() += 1;
                    }
                }
            }
        }
        let read = per_rank * u64::from(world) * batch_rows;
        assert_eq!(seen.values().sum::<u64>(), read);
        if drop_last {
            assert!(seen.values().all(|&n| n == 1), "a row twice with drop_last");
            assert_eq!(read, total - total % (u64::from(world) * batch_rows));
        } else if total > 0 {
            // Complete; only the wrap-around reads rows twice, and only as many as it pads.
            assert_eq!(seen.len() as u64, total, "every row read");
            let twice: u64 = seen.values().map(|&n| n - 1).sum();
            assert_eq!(twice, read - total);
        }
        // Rows of several replicas share a batch only where the tail's pieces meet.
        assert!(mixed < rows.len() as u64, "{mixed} mixed batches");
    }

    #[test]
    fn worlds_1_2_3_and_7_over_three_replicas() {
        for world in [1, 2, 3, 7] {
            for (shuffle, drop_last) in [(false, false), (true, false), (false, true), (true, true)]
            {
                check(vec![1000, 777, 1234], 16, world, shuffle, drop_last);
                check(vec![0, 5, 0], 4, world, shuffle, drop_last);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn every_row_once_and_equal_counts(
            rows in proptest::collection::vec(0u64..300, 1..6),
            batch_rows in 1u64..40,
            world in 1u32..9,
            shuffle: bool,
            drop_last: bool,
        ) {
            check(rows, batch_rows, world, shuffle, drop_last);
        }
    }
}
