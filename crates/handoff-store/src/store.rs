//! The store: every link of one server, and the policies that span links (memory, spill,
//! snapshots, expiry). The top of the crate's layers.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::{Result, StoreError, echo};
use crate::incoming::IncomingMemory;
use crate::ipc::SchemaFrame;
use crate::link::{
    Expiry, Link, LinkOptions, LinkStats, Overflow, PartitionWriter, PutOutcome, PutTarget,
    check_append_id, check_staged_id,
};
use crate::memory::{MemoryPolicy, MemoryPool};
use crate::partition::now_ms;
use crate::read::ReadMemory;
use crate::snapshot::{Restored, SnapshotManifest};
use crate::spill::Spiller;
use crate::storage::ObjectStorage;

#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    /// Bytes the whole store may hold, staged and committed; `None` is unlimited.
    pub memory_limit: Option<u64>,
    /// What writes do at a limit, for links that do not choose.
    pub default_policy: MemoryPolicy,
    /// Where snapshots and spilled partitions go.
    pub storage: Option<ObjectStorage>,
    /// Snapshot every link when it is sealed.
    pub snapshot_on_seal: bool,
    /// The most a shuffled epoch holds decoded at once (see [`crate::shard::ShuffleLayout`]); links
    /// that weigh less get a full shuffle. `None`: a quarter of `memory_limit`, or no windows
    /// without a limit.
    pub shuffle_window: Option<u64>,
    /// How long a read waits for memory before it fails with RESOURCE_EXHAUSTED. `None`: 30 s.
    pub read_memory_wait: Option<std::time::Duration>,
}

/// All links of one server.
#[derive(Debug)]
pub struct Store {
    links: Arc<RwLock<BTreeMap<String, Arc<Link>>>>,
    memory: Arc<MemoryPool>,
    spiller: Option<Arc<Spiller>>,
    default_policy: MemoryPolicy,
    storage: Option<ObjectStorage>,
    snapshot_on_seal: bool,
    read_memory: ReadMemory,
    /// Random, new with every store: a client that sees it change knows the server's memory
    /// started over (a restarted pod), whatever the link names say.
    instance: String,
}

fn new_instance_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness: the start time still tells one process from the next.
        bytes = (now_ms() ^ u64::from(std::process::id()) << 40).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Link names look like `features` or `team/features`.
pub fn validate_link_name(name: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    let parts: Vec<&str> = name.split('/').collect();
    if name.len() > 253 || parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
        return Err(StoreError::InvalidLinkName(echo(name)));
    }
    Ok(())
}

impl Store {
    pub fn new(config: StoreConfig) -> Arc<Self> {
        let links = Arc::new(RwLock::new(BTreeMap::new()));
        let spiller = config
            .storage
            .clone()
            .map(|storage| Arc::new(Spiller::new(storage, Arc::clone(&links))));
        let memory = MemoryPool::new(config.memory_limit);
        let read_memory = ReadMemory {
            pool: Arc::clone(&memory),
            spiller: spiller.clone().map(|s| s as Arc<dyn Overflow>),
            shuffle_window: config
                .shuffle_window
                .or(config.memory_limit.map(|limit| limit / 4)),
            wait: config
                .read_memory_wait
                .unwrap_or(std::time::Duration::from_secs(30)),
            windows_built: Default::default(),
        };
        Arc::new(Self {
            spiller,
            links,
            memory,
            read_memory,
            default_policy: config.default_policy,
            storage: config.storage,
            snapshot_on_seal: config.snapshot_on_seal,
            instance: new_instance_id(),
        })
    }

    /// This store's instance id: 16 hex digits, new in every process.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn default_policy(&self) -> MemoryPolicy {
        self.default_policy
    }

    pub fn memory(&self) -> &Arc<MemoryPool> {
        &self.memory
    }

    /// Memory for messages still arriving, under the server's default policy.
    pub fn incoming_memory(&self) -> IncomingMemory {
        IncomingMemory {
            pool: Arc::clone(&self.memory),
            spiller: self.spiller.clone().map(|s| s as Arc<dyn Overflow>),
            policy: self.default_policy,
        }
    }

    /// What reads may take of the server's memory, and how they wait for it.
    pub fn read_memory(&self) -> &ReadMemory {
        &self.read_memory
    }

    /// Declare a link, optionally with its schema and its own tokens.
    pub fn create_link(
        &self,
        name: &str,
        schema: Option<SchemaFrame>,
        options: LinkOptions,
        exist_ok: bool,
    ) -> Result<Arc<Link>> {
        validate_link_name(name)?;
        let mut links = self.links.write();
        if let Some(existing) = links.get(name) {
            if !exist_ok {
                return Err(StoreError::LinkExists(name.to_string()));
            }
            // exist_ok answers OK only if the link is what the caller asked for: otherwise
            // anyone who knows a name could squat it, and the caller's tokens and quota would
            // silently not apply.
            if let Some(detail) = existing.differs_from(&options) {
                return Err(StoreError::LinkExistsOtherwise {
                    link: name.to_string(),
                    detail,
                });
            }
            return Ok(Arc::clone(existing));
        }
        let link = Arc::new(Link::new(
            name.to_string(),
            schema,
            options,
            self.default_policy,
        ));
        links.insert(name.to_string(), Arc::clone(&link));
        tracing::info!(link = name, "link created");
        Ok(link)
    }

    pub fn link(&self, name: &str) -> Result<Arc<Link>> {
        self.links
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::UnknownLink(echo(name)))
    }

    pub fn list(&self) -> Vec<Arc<Link>> {
        self.links.read().values().cloned().collect()
    }

    /// Begin one DoPut stream. With `create`, an unknown link is created on first write.
    pub fn begin_put(
        &self,
        name: &str,
        target: PutTarget,
        create: bool,
    ) -> Result<PartitionWriter> {
        // Refused before any data is received.
        match target {
            PutTarget::Staged { partition, .. } => check_staged_id(partition)?,
            PutTarget::StagedAppend { partition } => check_append_id(partition)?,
            PutTarget::Append => {}
        }
        let link = match self.link(name) {
            Ok(link) => link,
            Err(StoreError::UnknownLink(_)) if create => {
                self.create_link(name, None, LinkOptions::default(), true)?
            }
            Err(e) => return Err(e),
        };
        link.check_writable()?;
        let reservation = self.memory.reservation(link.quota());
        Ok(PartitionWriter::new(
            link,
            target,
            reservation,
            self.spiller.clone().map(|s| s as Arc<dyn Overflow>),
        ))
    }

    pub fn commit(
        &self,
        name: &str,
        attempts: &[(u64, u64)],
        replace: bool,
    ) -> Result<Vec<PutOutcome>> {
        self.link(name)?.commit(attempts, replace)
    }

    pub fn abort(&self, name: &str, attempts: &[(u64, u64)]) -> Result<usize> {
        Ok(self.link(name)?.abort(attempts))
    }

    pub fn seal(&self, name: &str) -> Result<LinkStats> {
        let stats = self.link(name)?.seal()?;
        tracing::info!(
            link = name,
            rows = stats.rows,
            partitions = stats.partitions,
            "link sealed"
        );
        Ok(stats)
    }

    /// Remove the link; its memory is freed once the last in-flight reader lets go.
    pub fn delete(&self, name: &str) -> Result<LinkStats> {
        let link = self
            .links
            .write()
            .remove(name)
            .ok_or_else(|| StoreError::UnknownLink(echo(name)))?;
        let stats = link.stats();
        link.mark_deleted();
        tracing::info!(link = name, rows = stats.rows, "link deleted");
        Ok(stats)
    }

    /// Remove the snapshot of a link that was deleted or expired, when snapshots are this
    /// server's own durability (`snapshot_on_seal`): otherwise the next restart would bring the
    /// link back. Snapshots a user took on a server without it are theirs to keep.
    pub async fn forget_snapshot(&self, name: &str) -> Result<usize> {
        match &self.storage {
            Some(storage) if self.snapshot_on_seal => storage.remove_snapshot(name).await,
            _ => Ok(0),
        }
    }

    pub fn storage(&self) -> Option<&ObjectStorage> {
        self.storage.as_ref()
    }

    pub fn snapshot_on_seal(&self) -> bool {
        self.snapshot_on_seal && self.storage.is_some()
    }

    /// Persist a sealed link to the configured object storage.
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotManifest> {
        let storage = self.storage.as_ref().ok_or_else(|| {
            StoreError::InvalidArgument(
                "this server has no object storage; start it with --spill-url".into(),
            )
        })?;
        let link = self.link(name)?;
        storage.snapshot(&link).await
    }

    /// The links whose TTL passed, or that sat open and unwritten for `idle_timeout`, and why;
    /// nothing is deleted. (The planner of links over replicas decides for the whole link.)
    pub fn due(&self, idle_timeout: Option<std::time::Duration>) -> Vec<(String, Expiry)> {
        let now = now_ms();
        self.list()
            .iter()
            .filter_map(|l| {
                l.expiry(now, idle_timeout)
                    .map(|why| (l.name().to_string(), why))
            })
            .collect()
    }

    /// Delete every link whose TTL after seal passed, or that sat open and unwritten for
    /// `idle_timeout`. Returns what was dropped and why.
    pub fn expire(&self, idle_timeout: Option<std::time::Duration>) -> Vec<(String, Expiry)> {
        let due = self.due(idle_timeout);
        for (name, why) in &due {
            if self.delete(name).is_ok() {
                tracing::info!(link = %name, reason = why.label(), "link expired and was deleted");
            }
        }
        due
    }

    /// Move every finished partition of a link to object storage now, whatever its policy.
    /// Returns the bytes freed. For operators who know a link will not be read for a while.
    pub async fn spill_link(&self, name: &str) -> Result<u64> {
        let spiller = self.spiller.as_ref().ok_or_else(|| {
            StoreError::InvalidArgument(
                "this server has no object storage; start it with --spill-url".into(),
            )
        })?;
        spiller.make_room(Some(&self.link(name)?), u64::MAX).await
    }

    /// Bytes moved to object storage by the spill policy since the server started.
    pub fn spilled_bytes_total(&self) -> u64 {
        self.spiller.as_ref().map_or(0, |s| s.spilled_bytes_total())
    }

    /// Drop every link and remove what this server spilled; for shutdown. Snapshots stay.
    pub async fn close(&self) -> Result<usize> {
        let links: Vec<Arc<Link>> = std::mem::take(&mut *self.links.write())
            .into_values()
            .collect();
        for link in &links {
            link.mark_deleted();
        }
        match &self.spiller {
            Some(spiller) => spiller.remove_all().await,
            None => Ok(0),
        }
    }

    pub fn stats(&self, name: &str) -> Result<LinkStats> {
        Ok(self.link(name)?.stats())
    }

    /// Load one snapshot as a sealed link.
    pub async fn restore(
        &self,
        storage: &ObjectStorage,
        manifest: &SnapshotManifest,
    ) -> Result<()> {
        let options = match &manifest.options {
            Some(options) => options.to_options()?,
            None => LinkOptions::default(),
        };
        self.create_link(&manifest.link, None, options, false)?;
        for partition in &manifest.partitions {
            let mut writer = self.begin_put(&manifest.link, PutTarget::Append, false)?;
            for (header, body) in storage.partition_messages(manifest, partition).await? {
                writer.push(header, body).await?;
            }
            let outcome = writer.finish().await?;
            if outcome.rows != partition.rows {
                return Err(StoreError::Storage(format!(
                    "{}: {} holds {} rows, its manifest says {}",
                    storage.url(),
                    partition.object,
                    outcome.rows,
                    partition.rows
                )));
            }
        }
        self.seal(&manifest.link)?;
        Ok(())
    }

    /// Restore every snapshot in `storage` that is whole. One that is broken or incomplete (a
    /// manifest that does not parse, a part missing or short) is logged, left out whole (never
    /// half a link), and named in the report; the others still load. Fails only when the
    /// storage cannot be listed at all.
    pub async fn restore_all(&self, storage: &ObjectStorage) -> Result<Restored> {
        let (manifests, mut skipped) = storage.manifests_and_skipped().await?;
        let mut links = Vec::new();
        for manifest in manifests {
            match self.restore(storage, &manifest).await {
                Ok(()) => {
                    tracing::info!(link = %manifest.link, rows = manifest.rows, url = %storage.url(), "restored");
                    links.push(manifest.link);
                }
                Err(e) => {
                    // A link this restore created is dropped again; one that existed is not ours.
                    if !matches!(e, StoreError::LinkExists(_)) {
                        let _ = self.delete(&manifest.link);
                    }
                    let what = format!(
                        "link '{}' ({} rows) from {}: {e}",
                        manifest.link,
                        manifest.rows,
                        storage.url()
                    );
                    tracing::error!("skipped {what}");
                    skipped.push(what);
                }
            }
        }
        Ok(Restored { links, skipped })
    }
}
