//! The `spill` memory policy: finished partitions, least recently used first, move to object
//! storage when a write would not fit, and reads fetch them back frame by frame.
//!
//! A spilled partition is one Arrow IPC stream object (the snapshot format), written under
//! `spill/<server instance>/<link>/`. Only the small frame headers and the body offsets stay in
//! memory, so reading a spilled partition back never needs the whole object in memory. The object
//! is removed when the last holder of the partition lets go (delete, TTL, or the end of the last
//! read), and the whole instance prefix is removed when the server shuts down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::path::Path;
use parking_lot::RwLock;

use crate::error::Result;
use crate::link::{Link, Overflow};
use crate::memory::MemoryPolicy;
use crate::partition::{Partition, now_ms};
use crate::storage::{ObjectStorage, SpillStream, SpilledPartition};

/// Frees memory by spilling, for every writer of the store.
#[derive(Debug)]
pub(crate) struct Spiller {
    storage: ObjectStorage,
    instance: String,
    links: Arc<RwLock<BTreeMap<String, Arc<Link>>>>,
    /// One spill at a time, so two writers never upload the same partition.
    running: tokio::sync::Mutex<()>,
    sequence: AtomicU64,
    spilled_bytes_total: AtomicU64,
}

impl Spiller {
    pub(crate) fn new(
        storage: ObjectStorage,
        links: Arc<RwLock<BTreeMap<String, Arc<Link>>>>,
    ) -> Self {
        let instance = format!("{}-{}", std::process::id(), now_ms());
        Self {
            storage,
            instance,
            links,
            running: tokio::sync::Mutex::new(()),
            sequence: AtomicU64::new(0),
            spilled_bytes_total: AtomicU64::new(0),
        }
    }

    /// Bytes moved to object storage since the server started.
    pub(crate) fn spilled_bytes_total(&self) -> u64 {
        self.spilled_bytes_total.load(Ordering::Relaxed)
    }

    fn instance_dir(&self) -> Path {
        self.storage.path(&["spill", &self.instance])
    }

    /// A new object's path for a partition of `link`.
    fn object_path(&self, link: &str, name: impl FnOnce(u64) -> String) -> Path {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        link.split('/')
            .fold(self.instance_dir(), |path, part| path.join(part))
            .join(name(sequence))
    }

    /// Upload one resident partition and swap its frames for their locations. Returns the bytes
    /// freed (0 if it was no longer resident).
    async fn spill(&self, partition: &Arc<Partition>) -> Result<u64> {
        let Some(frames) = partition.resident_frames() else {
            return Ok(0);
        };
        let link = partition.link_name();
        let (id, attempt) = (partition.id, partition.attempt);
        let path = self.object_path(link, |sequence| {
            format!("p{id}-a{attempt}-{sequence}.arrows")
        });
        let spilled =
            SpilledPartition::write(&self.storage, path, &partition.schema.header, &frames).await?;
        let freed = partition.swap_to_spilled(Arc::new(spilled));
        self.spilled_bytes_total.fetch_add(freed, Ordering::Relaxed);
        tracing::debug!(link = %link, partition = id, bytes = freed, "spilled");
        Ok(freed)
    }

    /// Remove everything this server instance spilled; for shutdown.
    pub(crate) async fn remove_all(&self) -> Result<usize> {
        self.storage.remove_prefix(&self.instance_dir()).await
    }
}

impl Overflow for Spiller {
    /// Least recently used partitions first, one spill at a time.
    fn make_room<'a>(
        &'a self,
        only: Option<&'a Arc<Link>>,
        needed: u64,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let _running = self.running.lock().await;
            let mut candidates: Vec<Arc<Partition>> = match only {
                Some(link) => link.spillable(),
                None => self
                    .links
                    .read()
                    .values()
                    .filter(|l| l.policy() == MemoryPolicy::Spill)
                    .flat_map(|l| l.spillable())
                    .collect(),
            };
            candidates.sort_by_key(|p| p.last_used_ms());
            let mut freed = 0;
            for partition in candidates {
                if freed >= needed {
                    break;
                }
                freed += self.spill(&partition).await?;
            }
            Ok(freed)
        })
    }

    /// When nothing finished is left to move out, a partition larger than memory goes out as it
    /// arrives instead of failing.
    fn stream<'a>(
        &'a self,
        link: &'a str,
        schema_header: &'a Bytes,
    ) -> BoxFuture<'a, Result<SpillStream>> {
        Box::pin(async move {
            let path = self.object_path(link, |sequence| format!("w{sequence}.arrows"));
            tracing::debug!(link, %path, "a partition being written spills as it arrives");
            SpillStream::start(&self.storage, path, schema_header).await
        })
    }

    fn streamed(&self, bytes: u64) {
        self.spilled_bytes_total.fetch_add(bytes, Ordering::Relaxed);
    }
}
