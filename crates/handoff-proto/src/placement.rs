//! Placement of a link's partitions over server replicas, part of the protocol: the servers
//! and every client (in any language, docs/scale-out.md) compute the same owner.
//!
//! Rendezvous hashing of (link, partition): every replica gets a score, SHA-256 of the link
//! name, the partition id and the replica index, and the highest wins. A task's retries name
//! the same (link, partition), so they land where its first attempt did; growing from N to N+1
//! replicas moves only the partitions the new replica wins (about 1 in N+1).

use sha2::{Digest, Sha256};

/// The most replicas a link may be spread over.
pub const MAX_REPLICAS: u32 = 1024;

/// The replica, of `replicas`, that holds `partition` of `link`.
pub fn owner(link: &str, partition: u64, replicas: u32) -> u32 {
    let score = |replica: u32| {
        let mut hash = Sha256::new();
        hash.update(link.as_bytes());
        hash.update([0]);
        hash.update(partition.to_le_bytes());
        hash.update(replica.to_le_bytes());
        let digest = hash.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    };
    // Ties (2^-64) go to the lower index, so every caller agrees. Callers refuse more than
    // MAX_REPLICAS; the bound here keeps the loop short whatever they pass.
    (0..replicas.clamp(1, MAX_REPLICAS))
        .max_by_key(|&replica| (score(replica), std::cmp::Reverse(replica)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_stable_and_spread() {
        // Pinned: the formula is part of the protocol; a change would misroute retries.
        assert_eq!(owner("features", 0, 3), owner("features", 0, 3));
        let mut counts = [0u32; 4];
        for p in 0..4000 {
            counts[owner("features", p, 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        // Growing 4 -> 5 moves only what the new replica wins.
        let moved = (0..4000)
            .filter(|&p| owner("features", p, 4) != owner("features", p, 5))
            .filter(|&p| owner("features", p, 5) != 4)
            .count();
        assert_eq!(moved, 0);
        assert_eq!(owner("x", 9, 1), 0);
        assert_eq!(owner("x", 9, 0), 0);
    }

    #[test]
    fn the_placement_is_pinned() {
        // A client in another language computes the same from docs/scale-out.md.
        let got: Vec<u32> = (0..8).map(|p| owner("demo/features", p, 3)).collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [u32; 8] = [0, 1, 1, 0, 2, 2, 0, 0];
}
