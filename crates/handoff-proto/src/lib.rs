//! Messages of the Handoff Flight protocol.
//!
//! The code in `gen/` is generated from `proto/handoff.proto` and checked in, so that building
//! Handoff needs no `protoc`. `tests/regen.rs` fails when it is stale; regenerate with
//! `HANDOFF_REGEN=1 cargo test -p handoff-proto --test regen`.

#[allow(clippy::all, missing_docs)]
mod generated {
    include!("gen/handoff.v1.rs");
}

pub use generated::*;

pub mod placement;

/// The largest gRPC message either side accepts by default. Stored frames are replayed as they
/// were written, so readers must accept whatever writers were allowed to send: both ends use this.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// What the encoders aim for per FlightData message; well under [`DEFAULT_MAX_MESSAGE_BYTES`], so a
/// batch that overshoots the target (one very wide row) still fits.
pub const TARGET_FLIGHT_DATA_BYTES: usize = 8 * 1024 * 1024;

/// The most batches a read may ask to share one message (`ReadShard.batches_per_message`): past a
/// few dozen the per-message costs are already negligible, and the bound keeps what a server
/// buffers per read small.
pub const MAX_BATCHES_PER_MESSAGE: u32 = 64;

/// Names of the DoAction types the server understands.
pub mod actions {
    pub const CREATE: &str = "create";
    pub const COMMIT: &str = "commit";
    pub const ABORT: &str = "abort";
    pub const SEAL: &str = "seal";
    pub const DELETE: &str = "delete";
    pub const STATS: &str = "stats";
    pub const SNAPSHOT: &str = "snapshot";
    pub const IMPORT: &str = "import";
    /// The replicas serving this server's links: `{"replicas": [endpoint, ...], "index": i}`;
    /// an empty list for a single server.
    pub const TOPOLOGY: &str = "topology";
    /// Replica to replica: publish this replica's part of a recorded commit, idempotently.
    pub const APPLY: &str = "apply";
    /// Replica to replica: seal this replica's part of a link.
    pub const SEAL_REPLICA: &str = "seal-replica";
    /// Replica to replica: this replica's FlightInfo of links (a `ListParts` in, `Parts` out).
    pub const PARTS: &str = "parts";
    /// Replica to replica: rows of this replica's part that pass a filter (`CountRows` in,
    /// `{"rows": n}` out).
    pub const COUNT: &str = "count";
    /// Replica to planner: a replica served its whole part of a rank's read (`ReadDone` in),
    /// for the read TTL.
    pub const READ_DONE: &str = "read-done";
    /// Replica to replica: take back this replica's published part of a recorded commit that
    /// the planner abandons (`Commit` in, `{"reverted": n}` out).
    pub const UNAPPLY: &str = "unapply";
    /// Planner to replica: stage this replica's share of an import's Parquet files
    /// (`ImportPart` in, `{"files", "attempts"}` out); the planner commits them all.
    pub const IMPORT_PART: &str = "import-part";
}

impl CreateLink {
    /// A link with no options of its own, kept as it is where it exists (`exist_ok`).
    pub fn keeping(link: &str) -> Self {
        Self {
            link: link.to_string(),
            exist_ok: true,
            ..Default::default()
        }
    }
}

impl PartitionAttempt {
    /// The message form of (partition, attempt) pairs.
    pub fn list(pairs: &[(u64, u64)]) -> Vec<Self> {
        pairs
            .iter()
            .map(|&(partition, attempt)| Self { partition, attempt })
            .collect()
    }

    /// The (partition, attempt) pairs of a message's list.
    pub fn pairs(list: &[Self]) -> Vec<(u64, u64)> {
        list.iter().map(|a| (a.partition, a.attempt)).collect()
    }
}

impl Ticket {
    pub fn shard(shard: ReadShard) -> Self {
        Self {
            kind: Some(ticket::Kind::Shard(shard)),
        }
    }

    pub fn partition(link: impl Into<String>, index: u64, generation: u64) -> Self {
        Self {
            kind: Some(ticket::Kind::Partition(ReadPartition {
                link: link.into(),
                index,
                generation,
            })),
        }
    }
}

impl ReadRanges {
    /// The rest of this read after its first `rows` rows: what a reader asks again of a
    /// replica that broke off after sending them (it restarted and restored its snapshot, so
    /// its order is the same).
    pub fn skipping(&self, rows: u64) -> Self {
        let mut left = rows;
        let mut ranges = Vec::with_capacity(self.ranges.len());
        for range in &self.ranges {
            if left >= range.rows {
                left -= range.rows;
                continue;
            }
            ranges.push(RowRange {
                start: range.start.saturating_add(left),
                rows: range.rows - left,
            });
            left = 0;
        }
        Self {
            ranges,
            ..self.clone()
        }
    }

    /// Rows this read sends, in all.
    pub fn rows(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| r.rows)
            .fold(0, u64::saturating_add)
    }
}

/// DoPut `app_metadata` of a message without data that abandons the stream: the server keeps
/// nothing of it and ends the call with CANCELLED. For clients that cannot cancel a call.
pub const ABORT_PUT: &[u8] = b"handoff.abort";

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[(u64, u64)]) -> ReadRanges {
        ReadRanges {
            link: "l".into(),
            ranges: list
                .iter()
                .map(|&(start, rows)| RowRange { start, rows })
                .collect(),
            batch_rows: 4,
            ..Default::default()
        }
    }

    #[test]
    fn skipping_drops_whole_ranges_then_the_head_of_the_next() {
        let read = ranges(&[(0, 8), (20, 4), (40, 8)]);
        assert_eq!(read.rows(), 20);
        assert_eq!(read.skipping(0), read);
        assert_eq!(read.skipping(3), ranges(&[(3, 5), (20, 4), (40, 8)]));
        assert_eq!(read.skipping(8), ranges(&[(20, 4), (40, 8)]));
        assert_eq!(read.skipping(13), ranges(&[(41, 7)]));
        assert_eq!(read.skipping(20), ranges(&[]));
        // More than it holds (a hostile or confused count): nothing left, no overflow.
        assert_eq!(read.skipping(u64::MAX), ranges(&[]));
        let huge = ranges(&[(u64::MAX - 1, 1), (0, u64::MAX)]);
        assert_eq!(huge.rows(), u64::MAX);
        assert_eq!(huge.skipping(2).ranges[0].start, 1);
    }
}
