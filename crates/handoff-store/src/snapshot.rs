//! Sealed links persisted to object storage, and restored from it.
//!
//! Layout under the storage URL's path:
//! `links/<link>/part-<nnnnn>.arrows`: one Arrow IPC stream per committed partition (schema, the
//! stored frames byte for byte, end-of-stream), readable by any Arrow library; and
//! `links/<link>/manifest.json`, written last, so a link without a manifest was never complete.

use bytes::Bytes;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::link::{Link, LinkOptions, LinkState, LinkTokens};
use crate::memory::MemoryPolicy;
use crate::partition::Stored;
use crate::storage::{ObjectStorage, encode_stream, messages};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotManifest {
    pub link: String,
    pub rows: u64,
    pub bytes: u64,
    pub partitions: Vec<SnapshotPartition>,
    /// What the link was created with; `None` in snapshots written before this was recorded,
    /// which restore with the server's defaults.
    #[serde(default)]
    pub options: Option<SnapshotOptions>,
    /// Where the manifest was found: its partitions are beside it. Snapshots written before
    /// link directories were one segment (`links/team/snap/`) restore from where they are.
    #[serde(skip)]
    pub(crate) found_in: Option<Path>,
}

/// A link's creation options as a snapshot keeps them: tokens only as hashes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SnapshotOptions {
    pub tokens: LinkTokens,
    pub memory_limit: Option<u64>,
    /// `reject`, `wait` or `spill`.
    pub memory_policy: Option<String>,
    pub wait_timeout_ms: Option<u64>,
    pub ttl_seconds_after_seal: Option<u64>,
    pub ttl_seconds_after_read: Option<u64>,
}

impl SnapshotOptions {
    fn of(options: LinkOptions) -> Self {
        Self {
            tokens: options.tokens,
            memory_limit: options.memory_limit,
            memory_policy: options.policy.map(|p| p.label().to_string()),
            wait_timeout_ms: match options.policy {
                Some(MemoryPolicy::Wait { timeout }) => {
                    Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
                }
                _ => None,
            },
            ttl_seconds_after_seal: options.ttl_after_seal.map(|d| d.as_secs()),
            ttl_seconds_after_read: options.ttl_after_read.map(|d| d.as_secs()),
        }
    }

    pub(crate) fn to_options(&self) -> Result<LinkOptions> {
        let policy = match self.memory_policy.as_deref() {
            None => None,
            Some("reject") => Some(MemoryPolicy::Reject),
            Some("spill") => Some(MemoryPolicy::Spill),
            Some("wait") => Some(MemoryPolicy::Wait {
                timeout: std::time::Duration::from_millis(self.wait_timeout_ms.unwrap_or(60_000)),
            }),
            Some(other) => {
                return Err(StoreError::Storage(format!(
                    "the manifest names memory policy '{}', which this server does not know",
                    crate::error::echo(other)
                )));
            }
        };
        Ok(LinkOptions {
            tokens: self.tokens.clone(),
            memory_limit: self.memory_limit,
            policy,
            ttl_after_seal: self
                .ttl_seconds_after_seal
                .map(std::time::Duration::from_secs),
            ttl_after_read: self
                .ttl_seconds_after_read
                .map(std::time::Duration::from_secs),
        })
    }
}

/// What a restore brought back, and what it could not, each in a sentence.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub links: Vec<String>,
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotPartition {
    pub id: u64,
    pub rows: u64,
    pub object: String,
}

impl ObjectStorage {
    /// One path segment per link: `team/snap` is `links/team%2Fsnap/`. With a segment per
    /// name part, link `X/manifest.json` wrote its directory where link `X` keeps its manifest.
    fn link_dir(&self, link: &str) -> Path {
        self.path(&["links", link])
    }

    /// Persist a sealed link. Returns its manifest.
    pub async fn snapshot(&self, link: &Link) -> Result<SnapshotManifest> {
        let snapshot = link.snapshot();
        if snapshot.state != LinkState::Sealed {
            return Err(StoreError::InvalidArgument(format!(
                "link '{}' is {}; seal it before a snapshot, so the snapshot is complete",
                link.name(),
                snapshot.state
            )));
        }
        let dir = self.link_dir(link.name());
        let mut partitions = Vec::with_capacity(snapshot.partitions.len());
        for (index, partition) in snapshot.partitions.iter().enumerate() {
            let object = format!("part-{index:05}.arrows");
            let target = dir.clone().join(object.as_str());
            match partition.stored() {
                // A spilled partition already is an object in this format: copy it server-side.
                Stored::Spilled(spilled) if spilled.storage().url() == self.url() => {
                    self.copy(&spilled.path, &target).await?
                }
                Stored::Spilled(spilled) => {
                    let mut frames = Vec::with_capacity(partition.frame_rows().len());
                    for i in 0..partition.frame_rows().len() {
                        frames.push(spilled.frame(i).await?);
                    }
                    let encoded = encode_stream(&partition.schema.header, &frames);
                    self.put(&target, encoded.parts).await?
                }
                Stored::Resident(frames) => {
                    let encoded = encode_stream(&partition.schema.header, &frames);
                    self.put(&target, encoded.parts).await?
                }
            }
            partitions.push(SnapshotPartition {
                id: partition.id,
                rows: partition.rows,
                object,
            });
        }
        let manifest = SnapshotManifest {
            link: link.name().to_string(),
            rows: snapshot.rows,
            bytes: snapshot.bytes,
            partitions,
            options: Some(SnapshotOptions::of(link.options())),
            found_in: None,
        };
        let body = serde_json::to_vec_pretty(&manifest).map_err(StoreError::Manifest)?;
        let manifest_path = dir.clone().join("manifest.json");
        self.put(&manifest_path, vec![Bytes::from(body)]).await?;
        tracing::info!(link = link.name(), url = %self.url(), rows = manifest.rows, "snapshot written");
        // A snapshot of the same link in the older layout would restore as a second copy.
        if let Some(old) = self.old_link_dir(link.name()) {
            let _ = self.remove_prefix(&old).await;
        }
        Ok(manifest)
    }

    /// Remove a link's snapshot, in either layout; returns the objects removed. The manifest
    /// goes first, so a removal cut short leaves parts no restore reads, never a link that
    /// restores short. Only the link's own directory is touched: in the older layout, link
    /// `team`'s directory also held `team/snap`'s.
    pub async fn remove_snapshot(&self, link: &str) -> Result<usize> {
        let mut removed = 0;
        let dirs = std::iter::once(self.link_dir(link)).chain(self.old_link_dir(link));
        for dir in dirs {
            let depth = dir.parts().count() + 1;
            let mut objects: Vec<Path> = self
                .list(&dir)
                .await?
                .into_iter()
                .map(|m| m.location)
                .filter(|p| p.parts().count() == depth)
                .collect();
            objects.sort_by_key(|p| p.filename() != Some("manifest.json"));
            for object in &objects {
                self.delete(object).await?;
            }
            removed += objects.len();
        }
        Ok(removed)
    }

    /// Where the older layout, one segment per name part, kept a namespaced link.
    fn old_link_dir(&self, link: &str) -> Option<Path> {
        link.contains('/').then(|| {
            link.split('/')
                .fold(self.path(&["links"]), |path, part| path.join(part))
        })
    }

    /// Every snapshot under this storage that has a readable manifest; a manifest that cannot
    /// be read or parsed is logged and listed in `skipped`, and the others still count.
    pub async fn manifests(&self) -> Result<Vec<SnapshotManifest>> {
        Ok(self.manifests_and_skipped().await?.0)
    }

    pub(crate) async fn manifests_and_skipped(
        &self,
    ) -> Result<(Vec<SnapshotManifest>, Vec<String>)> {
        let objects = self.list(&self.path(&["links"])).await?;
        let mut manifests = Vec::new();
        let mut skipped = Vec::new();
        for meta in objects
            .iter()
            .filter(|m| m.location.filename() == Some("manifest.json"))
        {
            let parsed = match self.get(&meta.location).await {
                Ok(body) => serde_json::from_slice::<SnapshotManifest>(&body)
                    .map_err(|e| format!("its manifest is not valid JSON of a snapshot ({e})")),
                Err(e) => Err(format!("its manifest cannot be read ({e})")),
            };
            match parsed {
                Ok(mut manifest) => {
                    let mut dir = meta.location.parts().collect::<Vec<_>>();
                    dir.pop();
                    manifest.found_in = Some(Path::from_iter(dir));
                    manifests.push(manifest);
                }
                Err(why) => {
                    let what = format!(
                        "the snapshot at {} under {}: {why}",
                        meta.location,
                        self.url()
                    );
                    tracing::error!("skipped {what}");
                    skipped.push(what);
                }
            }
        }
        Ok((manifests, skipped))
    }

    /// Remove a link's snapshot objects (in either layout).
    pub async fn remove(&self, link: &str) -> Result<usize> {
        let mut removed = self.remove_prefix(&self.link_dir(link)).await?;
        if let Some(old) = self.old_link_dir(link) {
            removed += self.remove_prefix(&old).await?;
        }
        Ok(removed)
    }

    /// The (header, body) messages of one snapshotted partition, as stored.
    pub(crate) async fn partition_messages(
        &self,
        manifest: &SnapshotManifest,
        partition: &SnapshotPartition,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let dir = manifest
            .found_in
            .clone()
            .unwrap_or_else(|| self.link_dir(&manifest.link));
        let data = self.get(&dir.join(partition.object.as_str())).await?;
        messages(&data)
    }
}
