//! Which rows each rank reads: the shard plan.
//!
//! Rows are numbered in commit order (partitions in the order they committed, rows in the order
//! they were written). With `batch_rows = B > 0` that sequence, or its shuffle, is cut into global
//! batches of B rows, and global batch `g` goes to rank `g % world_size`. Every rank gets the same
//! number of batches:
//! - `drop_last`: `floor(N / (W*B))` each; the last `N mod (W*B)` positions are not read.
//! - otherwise (the default, as torch's `DistributedSampler`): `ceil(N / (W*B))` each, and positions
//!   past the end wrap around to the start, so a few rows are read twice.
//!
//! Because the layout only ever appends, a streaming reader can hand out batch `g` as soon as
//! `(g+1)*B` rows are committed, and the result equals a read after the seal.
//!
//! With `batch_rows = 0` the rank gets a contiguous range of near-equal size (sizes differ by at
//! most one row) in the stored batching: every row exactly once, but no equal-batch promise.
//!
//! Shuffle is a full permutation of all rows (Fisher-Yates driven by splitmix64 seeded from
//! `(seed, epoch)`), so it mixes rows across partitions, for links that fit the shuffle window.
//! Larger links are shuffled in windows: see [`ShuffleLayout`]. Either way the order costs 4
//! bytes per row of a window and one pass to build, and the ranks of an epoch share it.

use crate::error::{Result, StoreError};

/// The read-side knobs of one rank's shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub rank: u32,
    pub world_size: u32,
    pub epoch: u64,
    pub seed: u64,
    pub batch_rows: u64,
    pub shuffle: bool,
    pub drop_last: bool,
    pub start_batch: u64,
}

/// The largest `world_size` a read may name: far past any training job, and small enough that
/// `world_size * batch_rows` and the row positions built from it stay well inside `u64`.
pub const MAX_WORLD_SIZE: u32 = 1 << 20;
/// The largest `batch_rows` a read may ask for (16,777,216 rows).
pub const MAX_BATCH_ROWS: u64 = 1 << 24;

impl ShardSpec {
    /// Checks every number a client sent against what it can mean. After this, the arithmetic of
    /// the plan cannot overflow for any link of fewer than 2^63 rows.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.world_size > MAX_WORLD_SIZE {
            return Err(StoreError::InvalidArgument(format!(
                "world_size {} is out of range: it must be 1 to {MAX_WORLD_SIZE}",
                self.world_size
            )));
        }
        if self.rank >= self.world_size {
            return Err(StoreError::InvalidArgument(format!(
                "rank {} is out of range for world_size {}; ranks count from 0",
                self.rank, self.world_size
            )));
        }
        if self.batch_rows > MAX_BATCH_ROWS {
            return Err(StoreError::InvalidArgument(format!(
                "batch_rows {} is out of range: it must be 0 (the stored batching) to {MAX_BATCH_ROWS}",
                self.batch_rows
            )));
        }
        if self.batch_rows == 0 && self.start_batch > 0 {
            return Err(StoreError::InvalidArgument(
                "start_batch needs batch_rows > 0: without re-batching there are no batch numbers to resume from".into(),
            ));
        }
        // The first row position this read would name must exist as a number.
        if self
            .start_batch
            .checked_mul(self.round_rows())
            .and_then(|rows| rows.checked_add(self.round_rows()))
            .is_none_or(|rows| rows > i64::MAX as u64)
        {
            return Err(StoreError::InvalidArgument(format!(
                "start_batch {} is past the end of any link at world_size {} and batch_rows {}",
                self.start_batch, self.world_size, self.batch_rows
            )));
        }
        Ok(())
    }

    /// Rows in one round of batches, one batch per rank (at most 2^44 once validated).
    fn round_rows(&self) -> u64 {
        self.batch_rows * u64::from(self.world_size)
    }

    /// Batches each rank reads in total, for a sealed link of `total_rows` rows.
    pub fn batches_per_rank(&self, total_rows: u64) -> u64 {
        if self.batch_rows == 0 || total_rows == 0 {
            return 0;
        }
        let per_round = self.round_rows();
        if self.drop_last {
            total_rows / per_round
        } else {
            total_rows.div_ceil(per_round)
        }
    }

    /// Rows this rank reads in total (after `start_batch`), for a sealed link.
    pub fn rows_for_rank(&self, total_rows: u64) -> u64 {
        if self.batch_rows == 0 {
            let (start, end) = self.contiguous_range(total_rows);
            return end - start;
        }
        self.batches_per_rank(total_rows)
            .saturating_sub(self.start_batch)
            .saturating_mul(self.batch_rows)
    }

    /// The global batch number of this rank's `k`-th batch.
    pub fn global_batch(&self, k: u64) -> Option<u64> {
        k.checked_mul(u64::from(self.world_size))?
            .checked_add(u64::from(self.rank))
    }

    /// The first row position of this rank's `k`-th batch; `None` past any possible link.
    pub fn batch_start(&self, k: u64) -> Option<u64> {
        self.global_batch(k)?.checked_mul(self.batch_rows)
    }

    /// Whether a streaming read may hand out this rank's `k`-th batch once `committed` rows are
    /// committed, so that the result equals a read after the seal. With `drop_last` the whole
    /// round must be there: otherwise a rank whose batch is complete could take one more batch
    /// than the others, which the seal then drops for them, and ranks would disagree on the count
    /// (DDP hangs on that).
    pub fn streamable(&self, k: u64, committed: u64) -> bool {
        let end = if self.drop_last {
            k.checked_add(1)
                .and_then(|round| round.checked_mul(self.round_rows()))
        } else {
            self.batch_start(k)
                .and_then(|start| start.checked_add(self.batch_rows))
        };
        end.is_some_and(|end| end <= committed)
    }

    /// For `batch_rows == 0`: this rank's half-open range of row positions.
    pub fn contiguous_range(&self, total_rows: u64) -> (u64, u64) {
        let world = u64::from(self.world_size);
        let rank = u64::from(self.rank);
        let base = total_rows / world;
        let extra = total_rows % world;
        // rank * base <= total_rows, so neither sum overflows.
        let start = rank * base + rank.min(extra);
        let len = base + u64::from(rank < extra);
        (start, start + len)
    }
}

/// splitmix64: tiny, fast, and stable forever, unlike library RNGs whose streams may change.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (Lemire's multiply-shift; the bias is far below anything training sees).
    fn below(&mut self, bound: u64) -> u64 {
        ((self.next() as u128 * bound as u128) >> 64) as u64
    }
}

/// The row order of one epoch over a link that fits a window: a permutation of `0..n`, the same
/// for every rank. Reads build it as u32 orders (`WindowOrder`); tests hold those to this.
#[cfg(test)]
pub fn permutation(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n).collect();
    fisher_yates(&mut order, window_rng(seed, epoch, 0));
    order
}

/// The generator of window `w`'s row order; window 0 of a one-window epoch is the whole-link
/// order that [`permutation`] gives.
fn window_rng(seed: u64, epoch: u64, window: u64) -> SplitMix64 {
    SplitMix64(
        seed ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93)
            ^ 0x5EED
            ^ window.wrapping_mul(0xA076_1D64_78BD_642F),
    )
}

/// Shuffles the global order of batches over replicas (`replicas`) for (seed, epoch): its own
/// stream (no window is numbered u64::MAX), apart from every row order.
pub fn shuffle_batches<T>(order: &mut [T], seed: u64, epoch: u64) {
    fisher_yates(order, window_rng(seed, epoch, u64::MAX));
}

fn fisher_yates<T>(order: &mut [T], mut rng: SplitMix64) {
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
}

/// One window's row order. Windows under 2^32 rows (all of them, in practice) take 4 bytes a row.
#[derive(Debug)]
pub enum WindowOrder {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl WindowOrder {
    /// The order of window `window` of `rows` rows in epoch (`seed`, `epoch`).
    pub fn new(rows: u64, seed: u64, epoch: u64, window: usize) -> Self {
        let rng = window_rng(seed, epoch, window as u64);
        match u32::try_from(rows) {
            Ok(rows) => {
                let mut order: Vec<u32> = (0..rows).collect();
                fisher_yates(&mut order, rng);
                WindowOrder::Narrow(order)
            }
            Err(_) => {
                let mut order: Vec<u64> = (0..rows).collect();
                fisher_yates(&mut order, rng);
                WindowOrder::Wide(order)
            }
        }
    }

    /// Bytes the order of a window of `rows` rows takes.
    pub fn bytes_for(rows: u64) -> u64 {
        if rows <= u64::from(u32::MAX) {
            rows.saturating_mul(4)
        } else {
            rows.saturating_mul(8)
        }
    }

    /// The window row at position `i` of the window.
    pub fn get(&self, i: u64) -> u64 {
        match self {
            WindowOrder::Narrow(order) => u64::from(order[i as usize]),
            WindowOrder::Wide(order) => order[i as usize],
        }
    }
}

/// How one shuffled epoch orders a link's rows with bounded memory.
///
/// A link whose frames weigh at most the window size (or any link, without one) is one window:
/// a full permutation of every row, in commit order, as [`permutation`] gives. A larger link is
/// read in windows: the frames are put in a seeded random order, cut into consecutive windows
/// of at most the window size, and each window's rows are fully permuted. Mixing is then
/// complete inside a window and at frame granularity across windows, and a reader needs only the
/// windows its batches touch. Everything is a function of the frames, the window size, the seed
/// and the epoch, so every rank (and a resumed read) computes the same layout.
#[derive(Debug)]
pub struct ShuffleLayout {
    /// Each window's frames, by their position in commit order, in the order they are read.
    windows: Vec<Vec<usize>>,
    /// Row position where each window starts, then the total.
    starts: Vec<u64>,
}

impl ShuffleLayout {
    /// `frame_rows` (each above 0) and `frame_weight` are per frame, in commit order; a frame's weight is what
    /// holding it decoded costs (its bytes plus its share of the order).
    pub fn new(
        frame_rows: &[u64],
        frame_weight: &[u64],
        window: Option<u64>,
        seed: u64,
        epoch: u64,
    ) -> Self {
        let total_weight = frame_weight
            .iter()
            .fold(0u64, |sum, w| sum.saturating_add(*w));
        let windows = match window {
            Some(limit) if total_weight > limit && frame_rows.len() > 1 => {
                let mut frames: Vec<usize> = (0..frame_rows.len()).collect();
                // A stream of its own, so the frame order is unrelated to any window's row order.
                fisher_yates(
                    &mut frames,
                    SplitMix64(window_rng(seed, epoch, 0).0 ^ 0xF4A3_E5C1_0B7D_2A69),
                );
                let mut windows: Vec<Vec<usize>> = Vec::new();
                let mut weight = 0u64;
                for f in frames {
                    match windows.last_mut() {
                        Some(last) if weight.saturating_add(frame_weight[f]) <= limit => {
                            weight += frame_weight[f];
                            last.push(f);
                        }
                        _ => {
                            weight = frame_weight[f];
                            windows.push(vec![f]);
                        }
                    }
                }
                windows
            }
            _ => vec![(0..frame_rows.len()).collect()],
        };
        let mut starts = Vec::with_capacity(windows.len() + 1);
        let mut at = 0u64;
        for w in &windows {
            starts.push(at);
            at += w.iter().map(|f| frame_rows[*f]).sum::<u64>();
        }
        starts.push(at);
        Self { windows, starts }
    }

    #[cfg(test)]
    pub fn windows(&self) -> usize {
        self.windows.len()
    }

    /// The frames of window `w`, in the order its rows are numbered.
    pub fn frames(&self, w: usize) -> &[usize] {
        &self.windows[w]
    }

    /// The first row position of window `w`.
    pub fn start(&self, w: usize) -> u64 {
        self.starts[w]
    }

    pub fn rows(&self, w: usize) -> u64 {
        self.starts[w + 1] - self.starts[w]
    }

    /// The window that holds row position `position` (below the total).
    pub fn window_of(&self, position: u64) -> usize {
        self.starts[..self.windows.len()].partition_point(|s| *s <= position) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: u32, world: u32, b: u64, drop_last: bool) -> ShardSpec {
        ShardSpec {
            rank,
            world_size: world,
            epoch: 0,
            seed: 0,
            batch_rows: b,
            shuffle: false,
            drop_last,
            start_batch: 0,
        }
    }

    #[test]
    fn permutation_is_a_permutation_and_depends_on_seed_and_epoch() {
        let p = permutation(1000, 7, 0);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(p, permutation(1000, 7, 0));
        assert_ne!(p, permutation(1000, 7, 1));
        assert_ne!(p, permutation(1000, 8, 0));
        assert_ne!(p, sorted);
    }

    #[test]
    fn batch_counts_are_equal_across_ranks() {
        for n in [0u64, 1, 9, 10, 11, 99, 1000] {
            for w in [1u32, 2, 3, 7] {
                for drop_last in [false, true] {
                    let counts: Vec<u64> = (0..w)
                        .map(|r| spec(r, w, 4, drop_last).batches_per_rank(n))
                        .collect();
                    assert!(counts.iter().all(|c| *c == counts[0]), "n={n} w={w}");
                    let covered = counts[0] * 4 * w as u64;
                    if drop_last {
                        assert!(covered <= n && n - covered < 4 * w as u64);
                    } else {
                        assert!(covered >= n && covered - n < 4 * w as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn contiguous_ranges_tile_the_rows() {
        for n in [0u64, 1, 5, 6, 7, 100] {
            for w in [1u32, 2, 3, 7] {
                let mut next = 0;
                for r in 0..w {
                    let (s, e) = spec(r, w, 0, false).contiguous_range(n);
                    assert_eq!(s, next);
                    assert!(e - s <= n / w as u64 + 1);
                    next = e;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(spec(3, 3, 1, false).validate().is_err());
        assert!(spec(0, 0, 1, false).validate().is_err());
        let mut s = spec(0, 1, 0, false);
        s.start_batch = 2;
        assert!(s.validate().is_err());
    }

    /// The numbers a hostile reader sent us: each is refused with the allowed range, none panics.
    #[test]
    fn numbers_past_their_meaning_are_refused() {
        for (world, b, start) in [
            (2, 1_000_000_000_000, 0),                 // batch_rows 10^12
            (2, 1 << 40, 0),                           // batch_rows 2^40
            (2, (1 << 63) + 1, 0), // batch_rows 2^63+1, world 2: overflowed to 0
            (u32::MAX, 1, 0),      // world past MAX_WORLD_SIZE
            (MAX_WORLD_SIZE, MAX_BATCH_ROWS, 1 << 30), // the first row is past 2^63
            (1, 1, u64::MAX),
        ] {
            let mut s = spec(0, world, b, false);
            s.start_batch = start;
            let err = s.validate().expect_err("refused");
            assert!(
                err.to_string().contains("range") || err.to_string().contains("past the end"),
                "{err}"
            );
        }
        let mut s = spec(MAX_WORLD_SIZE - 1, MAX_WORLD_SIZE, MAX_BATCH_ROWS, true);
        s.validate().expect("the largest plan is valid");
        s.start_batch = 100;
        s.validate().expect("resuming inside range is valid");
        assert_eq!(s.batches_per_rank(u64::MAX), u64::MAX / (1 << 44));
        assert!(s.rows_for_rank(u64::MAX) > 0);
        assert!(!s.streamable(u64::MAX, u64::MAX));
    }

    /// Streaming with drop_last hands out a batch only when its whole round is committed, so the
    /// ranks' counts before the seal never exceed what the seal gives each.
    #[test]
    fn streaming_with_drop_last_keeps_counts_equal() {
        let (w, b) = (2u32, 10u64);
        for committed in 0..100u64 {
            for drop_last in [false, true] {
                let counts: Vec<u64> = (0..w)
                    .map(|r| {
                        let s = spec(r, w, b, drop_last);
                        (0..).take_while(|k| s.streamable(*k, committed)).count() as u64
                    })
                    .collect();
                if drop_last {
                    assert!(
                        counts.iter().all(|c| *c == counts[0]),
                        "{committed}: {counts:?}"
                    );
                    assert_eq!(counts[0], spec(0, w, b, true).batches_per_rank(committed));
                } else {
                    assert!(counts[0] - counts[1] <= 1, "{committed}: {counts:?}");
                }
            }
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// The row (in commit order) at each position of a windowed epoch, as a reader maps it.
        fn windowed_order(layout: &ShuffleLayout, rows: &[u64], seed: u64, epoch: u64) -> Vec<u64> {
            let mut first = vec![0u64; rows.len()];
            for f in 1..rows.len() {
                first[f] = first[f - 1] + rows[f - 1];
            }
            let mut order = Vec::new();
            for w in 0..layout.windows() {
                let window_rows: Vec<u64> = layout
                    .frames(w)
                    .iter()
                    .flat_map(|f| first[*f]..first[*f] + rows[*f])
                    .collect();
                let within = WindowOrder::new(layout.rows(w), seed, epoch, w);
                order.extend((0..layout.rows(w)).map(|i| window_rows[within.get(i) as usize]));
            }
            order
        }

        /// Every position each rank reads, batch by batch, as the plan gives them.
        fn positions(spec: &ShardSpec, n: u64) -> Vec<Vec<u64>> {
            let order = spec.shuffle.then(|| permutation(n, spec.seed, spec.epoch));
            (spec.start_batch..spec.batches_per_rank(n))
                .map(|k| {
                    let start = spec.batch_start(k).expect("in range");
                    (start..start + spec.batch_rows)
                        .map(|p| p % n)
                        .map(|p| order.as_ref().map_or(p, |o| o[p as usize]))
                        .collect()
                })
                .collect()
        }

        fn spec(
            rank: u32,
            world: u32,
            b: u64,
            drop_last: bool,
            shuffle: bool,
            start: u64,
        ) -> ShardSpec {
            ShardSpec {
                rank,
                world_size: world,
                epoch: 3,
                seed: 11,
                batch_rows: b,
                shuffle,
                drop_last,
                start_batch: start,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Equal batch counts; with drop_last, disjoint; without, every row at least once
            /// and repeats only from the wrap-around of the last round. Shuffled or not.
            #[test]
            fn shards_are_equal_disjoint_and_complete(
                n in 1u64..3000, world in 1u32..9, b in 1u64..64,
                drop_last: bool, shuffle: bool, start in 0u64..4,
            ) {
                let ranks: Vec<Vec<Vec<u64>>> = (0..world)
                    .map(|r| positions(&spec(r, world, b, drop_last, shuffle, start), n))
                    .collect();
                let counts: Vec<usize> = ranks.iter().map(Vec::len).collect();
                prop_assert!(counts.iter().all(|c| *c == counts[0]), "counts {:?}", counts);
                prop_assert!(ranks.iter().flatten().all(|batch| batch.len() as u64 == b));
                let mut seen = vec![0u32; n as usize];
                for p in ranks.iter().flatten().flatten() {
                    seen[*p as usize] += 1;
                }
                let read: u64 = seen.iter().map(|s| u64::from(*s)).sum();
                let round = b * u64::from(world);
                if drop_last {
                    prop_assert!(seen.iter().all(|s| *s <= 1), "a row read twice");
                    let full = n / round;
                    prop_assert_eq!(read, full.saturating_sub(start) * round);
                } else if start == 0 {
                    prop_assert!(seen.iter().all(|s| *s >= 1), "a row never read");
                    prop_assert!(read - n < round, "more repeats than one round's wrap");
                }
            }

            /// A windowed epoch orders every row exactly once, its windows keep to the window
            /// size (a frame heavier than the window is a window alone), the layout is the same
            /// on every call, and a link that fits is one window in the whole-link order.
            #[test]
            fn windowed_orders_are_permutations_within_the_window(
                rows in proptest::collection::vec(1u64..50, 1..40),
                row_bytes in 1u64..20, window in proptest::option::of(1u64..4000),
                seed: u64, epoch in 0u64..4,
            ) {
                let weight: Vec<u64> = rows.iter().map(|r| r * row_bytes + 64).collect();
                let layout = ShuffleLayout::new(&rows, &weight, window, seed, epoch);
                let order = windowed_order(&layout, &rows, seed, epoch);
                let n: u64 = rows.iter().sum();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
                prop_assert_eq!(&order, &windowed_order(&ShuffleLayout::new(&rows, &weight, window, seed, epoch), &rows, seed, epoch));
                let total: u64 = weight.iter().sum();
                if window.is_none_or(|w| total <= w) {
                    prop_assert_eq!(layout.windows(), 1);
                    prop_assert_eq!(order, permutation(n, seed, epoch));
                } else if let Some(limit) = window {
                    for w in 0..layout.windows() {
                        let frames = layout.frames(w);
                        let used: u64 = frames.iter().map(|f| weight[*f]).sum();
                        prop_assert!(frames.len() == 1 || used <= limit, "window {} weighs {}", w, used);
                        prop_assert_eq!(layout.window_of(layout.start(w)), w);
                    }
                }
            }

            /// A rank's plan is the same on every call: deterministic in (seed, epoch).
            #[test]
            fn plans_are_deterministic(n in 1u64..2000, world in 1u32..5, b in 1u64..32, rank_seed: u32) {
                let rank = rank_seed % world;
                let s = spec(rank, world, b, false, true, 0);
                prop_assert_eq!(positions(&s, n), positions(&s, n));
            }

            /// Contiguous ranges (batch_rows 0) tile the rows exactly, sizes within one.
            #[test]
            fn contiguous_ranges_tile(n in 0u64..100_000, world in 1u32..1000) {
                let mut next = 0;
                for r in 0..world {
                    let (s, e) = spec(r, world, 0, false, false, 0).contiguous_range(n);
                    prop_assert_eq!(s, next);
                    prop_assert!(e - s <= n / u64::from(world) + 1);
                    next = e;
                }
                prop_assert_eq!(next, n);
            }

            /// Streaming never hands a rank more batches than the sealed plan gives it, and
            /// with drop_last all ranks hold the same count at every moment.
            #[test]
            fn streaming_never_overtakes_the_seal(
                committed in 0u64..2000, more in 0u64..500, world in 1u32..6, b in 1u64..40, drop_last: bool,
            ) {
                let total = committed + more;
                let streamed: Vec<u64> = (0..world)
                    .map(|r| {
                        let s = spec(r, world, b, drop_last, false, 0);
                        (0..).take_while(|k| s.streamable(*k, committed)).count() as u64
                    })
                    .collect();
                let sealed = spec(0, world, b, drop_last, false, 0).batches_per_rank(total);
                prop_assert!(streamed.iter().all(|c| *c <= sealed), "{:?} > {}", streamed, sealed);
                if drop_last {
                    prop_assert!(streamed.iter().all(|c| *c == streamed[0]), "{:?}", streamed);
                }
            }

            /// Any numbers a client sends either validate, and then plan without overflow, or
            /// are refused.
            #[test]
            fn any_numbers_validate_or_are_refused(
                world: u32, b: u64, start: u64, rank: u32, n: u64,
            ) {
                let s = spec(rank, world, b, false, false, start);
                if s.validate().is_ok() {
                    let _ = s.batches_per_rank(n);
                    let _ = s.rows_for_rank(n);
                    let _ = s.batch_start(start);
                    let _ = s.streamable(start, n);
                }
            }
        }
    }
}
