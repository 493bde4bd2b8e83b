//! The Handoff store: links, partitions, two-phase commit, seal, shard plans and memory
//! accounting. It knows Arrow IPC but nothing of gRPC; the server translates.
//!
//! Modules layer without cycles, each using only those below it (a test holds this):
//! - `error`; `memory` and `shard`; `ipc` (frames) and `replicas` (placement and the shard plan
//!   over several servers);
//! - `storage`: object storage and the stream format of a stored partition;
//! - `commits`: the commit record of a link over several replicas;
//! - `partition`, then `link` (commit, seal, writers);
//! - `read` and `incoming`, which take memory for requests;
//! - `spill` and `snapshot`, which use links and are never used by them;
//! - `store`: every link of a server.
//!
//! Each public type has one path: the crate root.

mod commits;
mod error;
mod incoming;
mod ipc;
mod link;
mod memory;
mod partition;
mod read;
mod replicas;
mod shard;
mod snapshot;
mod spill;
mod storage;
mod store;

pub use commits::{AppliedCommit, CommitRecord};
pub use error::{Result, StoreError, echo, head};
pub use incoming::IncomingMemory;
pub use ipc::{Frame, SchemaFrame};
pub use link::{
    APPEND_IDS_FROM, Expiry, Link, LinkOptions, LinkSnapshot, LinkState, LinkStats, LinkTokens,
    PartitionWriter, PutOutcome, PutTarget, TokenHash, random_append_id,
};
pub use memory::{MemoryPolicy, MemoryPool, Reservation};
pub use partition::Partition;
pub use read::{
    Chunk, Held, MAX_RANGES, QueryPlanner, ReadMemory, ReadMode, ReadQuery, RowFilter,
    read_partition, read_ranges, read_shard, selected_rows,
};
pub use replicas::{ReplicaLayout, Segment};
pub use shard::{MAX_WORLD_SIZE, ShardSpec};
pub use snapshot::{Restored, SnapshotManifest, SnapshotOptions};
pub use storage::ObjectStorage;
pub use store::{Store, StoreConfig, validate_link_name};

#[cfg(test)]
mod layers {
    //! The module layering above, checked: a module names only modules of lower layers
    //! (tests inside a module may reach higher, to build a store).

    const LAYERS: &[(&str, u8, &str)] = &[
        ("error", 0, include_str!("error.rs")),
        ("memory", 1, include_str!("memory.rs")),
        ("shard", 1, include_str!("shard.rs")),
        ("ipc", 2, include_str!("ipc.rs")),
        ("replicas", 2, include_str!("replicas.rs")),
        ("storage", 3, include_str!("storage.rs")),
        ("commits", 4, include_str!("commits.rs")),
        ("partition", 4, include_str!("partition.rs")),
        ("link", 5, include_str!("link.rs")),
        ("read", 6, include_str!("read.rs")),
        ("incoming", 6, include_str!("incoming.rs")),
        ("spill", 7, include_str!("spill.rs")),
        ("snapshot", 7, include_str!("snapshot.rs")),
        ("store", 8, include_str!("store.rs")),
    ];

    fn layer(module: &str) -> Option<u8> {
        LAYERS
            .iter()
            .find(|(m, ..)| *m == module)
            .map(|(_, l, _)| *l)
    }

    #[test]
    fn modules_use_only_lower_layers() {
        let mut wrong = Vec::new();
        for (module, level, source) in LAYERS {
            let code = source.split("#[cfg(test)]").next().unwrap_or_default();
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                match layer(&name) {
                    Some(used) if used < *level => {}
                    Some(_) => wrong.push(format!("{module} uses {name}")),
                    // Root re-exports would hide which layer a name comes from.
                    None => wrong.push(format!("{module} uses crate::{name}; name its module")),
                }
            }
        }
        assert!(wrong.is_empty(), "layering broken: {wrong:?}");
    }
}
