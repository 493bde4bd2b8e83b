//! Sealed links persisted to object storage, and restored from it.
//!
//! Layout under the storage URL's path:
//! `links/<link>/part-<nnnnn>.arrows`: one Arrow IPC stream per committed partition (schema, the
//! stored frames byte for byte, end-of-stream), readable by any Arrow library; and
//! `links/<link>/manifest.json`, written last, so a link without a manifest was never complete.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::ipc::Frame;
use crate::link::{LinkOptions, LinkState, LinkTokens, PutTarget, Stored};
use crate::memory::MemoryPolicy;
use crate::{Link, Store};

const CONTINUATION: [u8; 4] = [0xFF; 4];

/// An object store and the path prefix inside it.
#[derive(Debug, Clone)]
pub struct ObjectStorage {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// For `file://`: the directory named by the URL. What we write below it is kept private
    /// (files 0600, directories 0700): spilled partitions and snapshots are tenants' data.
    local_root: Option<std::path::PathBuf>,
}

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

    fn to_options(&self) -> Result<LinkOptions> {
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
                    crate::echo(other)
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

fn storage_error(url: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("{url}: {e}"))
}

impl ObjectStorage {
    /// `file:///path`, `s3://bucket/prefix` (credentials, endpoint and allow-http from the
    /// standard `AWS_*` variables), `gs://`, `az://`, `memory:///`.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| {
            StoreError::InvalidArgument(format!(
                "'{url}' is not a storage URL ({e}); use file:///path or s3://bucket/prefix"
            ))
        })?;
        let options: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let (store, prefix) =
            object_store::parse_url_opts(&parsed, options).map_err(|e| storage_error(url, e))?;
        Ok(Self {
            url: url.to_string(),
            store: Arc::from(store),
            prefix,
            local_root: (parsed.scheme() == "file")
                .then(|| parsed.to_file_path().ok())
                .flatten(),
        })
    }

    /// Create a `file://` storage's directory, private (0700), if it does not exist yet. An
    /// existing directory keeps its mode: it may be shared, like `/tmp`.
    pub fn prepare(&self) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(root).map_err(|e| {
            StoreError::InvalidArgument(format!(
                "cannot create the storage directory {}: {e}",
                root.display()
            ))
        })
    }

    /// Make what we just wrote at `path` private: the file 0600, and every directory between
    /// it and the storage's own directory 0700.
    fn restrict(&self, path: &Path) -> Result<()> {
        #[cfg(unix)]
        if let Some(root) = &self.local_root {
            use std::os::unix::fs::PermissionsExt;
            let file = std::path::Path::new("/").join(path.as_ref());
            let set = |at: &std::path::Path, mode: u32| {
                std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| storage_error(&self.url, format!("{}: {e}", at.display())))
            };
            set(&file, 0o600)?;
            for dir in file.ancestors().skip(1) {
                if dir == root.as_path() || !dir.starts_with(root) {
                    break;
                }
                set(dir, 0o700)?;
            }
        }
        Ok(())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn object_store(&self) -> &Arc<dyn object_store::ObjectStore> {
        &self.store
    }

    /// One path segment per link: `team/snap` is `links/team%2Fsnap/`. With a segment per
    /// name part, link `X/manifest.json` wrote its directory where link `X` keeps its manifest.
    fn link_dir(&self, link: &str) -> Path {
        self.prefix.clone().join("links").join(link)
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
                Stored::Spilled(spilled) if spilled.storage().url == self.url => {
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
        let body =
            serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Storage(e.to_string()))?;
        let manifest_path = dir.clone().join("manifest.json");
        self.store
            .put(&manifest_path, PutPayload::from(body))
            .await
            .map_err(|e| storage_error(&self.url, e))?;
        self.restrict(&manifest_path)?;
        tracing::info!(link = link.name(), url = %self.url, rows = manifest.rows, "snapshot written");
        // A snapshot of the same link in the older layout would restore as a second copy.
        if let Some(old) = self.old_link_dir(link.name()) {
            let _ = self.remove_prefix(&old).await;
        }
        Ok(manifest)
    }

    /// Where the older layout, one segment per name part, kept a namespaced link.
    fn old_link_dir(&self, link: &str) -> Option<Path> {
        link.contains('/').then(|| {
            link.split('/')
                .fold(self.prefix.clone().join("links"), |path, part| {
                    path.join(part)
                })
        })
    }

    /// Every snapshot under this storage that has a readable manifest; a manifest that cannot
    /// be read or parsed is logged and listed in `skipped`, and the others still count.
    pub async fn manifests(&self) -> Result<Vec<SnapshotManifest>> {
        Ok(self.manifests_and_skipped().await?.0)
    }

    async fn manifests_and_skipped(&self) -> Result<(Vec<SnapshotManifest>, Vec<String>)> {
        let objects: Vec<_> = self
            .store
            .list(Some(&self.prefix.clone().join("links")))
            .try_collect()
            .await
            .map_err(|e| storage_error(&self.url, e))?;
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
                        meta.location, self.url
                    );
                    tracing::error!("skipped {what}");
                    skipped.push(what);
                }
            }
        }
        Ok((manifests, skipped))
    }

    /// A path under this storage's prefix.
    pub(crate) fn path(&self, parts: &[&str]) -> Path {
        parts
            .iter()
            .fold(self.prefix.clone(), |path, part| path.join(*part))
    }

    pub(crate) async fn put(&self, path: &Path, parts: Vec<Bytes>) -> Result<()> {
        let payload: PutPayload = parts.into_iter().collect();
        self.store
            .put(path, payload)
            .await
            .map_err(|e| storage_error(&self.url, e))?;
        self.restrict(path)
    }

    pub(crate) async fn get_range(
        &self,
        path: &Path,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        self.store
            .get_range(path, range)
            .await
            .map_err(|e| storage_error(&self.url, e))
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.store
            .copy(from, to)
            .await
            .map_err(|e| storage_error(&self.url, e))
    }

    /// Start writing one object in parts, for data larger than memory.
    pub(crate) async fn upload(&self, path: &Path) -> Result<object_store::WriteMultipart> {
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(|e| storage_error(&self.url, e))?;
        Ok(object_store::WriteMultipart::new_with_chunk_size(
            upload,
            UPLOAD_PART_BYTES,
        ))
    }

    /// Complete an object written with [`Self::upload`].
    pub(crate) async fn finish_upload(
        &self,
        path: &Path,
        upload: object_store::WriteMultipart,
    ) -> Result<()> {
        upload
            .finish()
            .await
            .map_err(|e| storage_error(&self.url, e))?;
        self.restrict(path)
    }

    pub(crate) async fn delete(&self, path: &Path) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_error(&self.url, e)),
        }
    }

    /// Delete every object under `prefix`; returns how many there were.
    pub(crate) async fn remove_prefix(&self, prefix: &Path) -> Result<usize> {
        let objects: Vec<_> = self
            .store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| storage_error(&self.url, e))?;
        for meta in &objects {
            self.delete(&meta.location).await?;
        }
        Ok(objects.len())
    }

    async fn get(&self, path: &Path) -> Result<Bytes> {
        let result = self
            .store
            .get(path)
            .await
            .map_err(|e| storage_error(&self.url, e))?;
        result
            .bytes()
            .await
            .map_err(|e| storage_error(&self.url, e))
    }

    /// Load one snapshot into the store as a sealed link.
    pub async fn restore(&self, store: &Store, manifest: &SnapshotManifest) -> Result<()> {
        let dir = manifest
            .found_in
            .clone()
            .unwrap_or_else(|| self.link_dir(&manifest.link));
        let options = match &manifest.options {
            Some(options) => options.to_options()?,
            None => LinkOptions::default(),
        };
        store.create_link(&manifest.link, None, options, false)?;
        for partition in &manifest.partitions {
            let data = self
                .get(&dir.clone().join(partition.object.as_str()))
                .await?;
            let mut writer = store.begin_put(&manifest.link, PutTarget::Append, false)?;
            for (header, body) in messages(&data)? {
                writer.push(header, body).await?;
            }
            let outcome = writer.finish().await?;
            if outcome.rows != partition.rows {
                return Err(StoreError::Storage(format!(
                    "{}: {} holds {} rows, its manifest says {}",
                    self.url, partition.object, outcome.rows, partition.rows
                )));
            }
        }
        store.seal(&manifest.link)?;
        Ok(())
    }

    /// Restore every snapshot that is whole. One that is broken or incomplete (a manifest that
    /// does not parse, a part missing or short) is logged, left out whole (never half a link),
    /// and named in the report; the others still load. Fails only when the storage cannot be
    /// listed at all.
    pub async fn restore_all(&self, store: &Store) -> Result<Restored> {
        let (manifests, mut skipped) = self.manifests_and_skipped().await?;
        let mut links = Vec::new();
        for manifest in manifests {
            match self.restore(store, &manifest).await {
                Ok(()) => {
                    tracing::info!(link = %manifest.link, rows = manifest.rows, url = %self.url, "restored");
                    links.push(manifest.link);
                }
                Err(e) => {
                    // A link this restore created is dropped again; one that existed is not ours.
                    if !matches!(e, StoreError::LinkExists(_)) {
                        let _ = store.delete(&manifest.link);
                    }
                    let what = format!(
                        "link '{}' ({} rows) from {}: {e}",
                        manifest.link, manifest.rows, self.url
                    );
                    tracing::error!("skipped {what}");
                    skipped.push(what);
                }
            }
        }
        Ok(Restored { links, skipped })
    }

    /// Remove a link's snapshot objects (in either layout).
    pub async fn remove(&self, link: &str) -> Result<usize> {
        let mut removed = self.remove_prefix(&self.link_dir(link)).await?;
        if let Some(old) = self.old_link_dir(link) {
            removed += self.remove_prefix(&old).await?;
        }
        Ok(removed)
    }
}

/// One partition as an Arrow IPC stream, in parts that share the frames' bytes.
pub(crate) struct EncodedStream {
    pub parts: Vec<Bytes>,
    /// Where each frame's body lies in the concatenated stream.
    pub bodies: Vec<std::ops::Range<u64>>,
}

/// Schema, the frames byte for byte, end-of-stream.
/// Part size of uploads in parts: S3's smallest.
pub(crate) const UPLOAD_PART_BYTES: usize = 5 << 20;

pub(crate) fn encode_stream(schema_header: &Bytes, frames: &[Frame]) -> EncodedStream {
    let mut parts = Vec::with_capacity(2 * frames.len() + 2);
    let mut bodies = Vec::with_capacity(frames.len());
    let mut offset = 0u64;
    let mut push = |parts: &mut Vec<Bytes>, bytes: Bytes| {
        offset += bytes.len() as u64;
        parts.push(bytes);
        offset
    };
    push(&mut parts, encapsulate(schema_header));
    for frame in frames {
        let start = push(&mut parts, encapsulate(&frame.header));
        let end = if frame.body.is_empty() {
            start
        } else {
            push(&mut parts, frame.body.clone())
        };
        bodies.push(start..end);
    }
    push(
        &mut parts,
        Bytes::from_static(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]),
    );
    EncodedStream { parts, bodies }
}

/// The IPC stream prefix of one message: continuation, padded metadata length, metadata.
pub(crate) fn encapsulate(header: &Bytes) -> Bytes {
    let padded = header.len().div_ceil(8) * 8;
    let mut out = BytesMut::with_capacity(8 + padded);
    out.extend_from_slice(&CONTINUATION);
    out.extend_from_slice(&(padded as i32).to_le_bytes());
    out.extend_from_slice(header);
    out.resize(8 + padded, 0);
    out.freeze()
}

/// Split an IPC stream into (header, body) pairs, zero-copy slices of `data`.
fn messages(data: &Bytes) -> Result<Vec<(Bytes, Bytes)>> {
    let bad = |what: &str| {
        StoreError::Storage(format!(
            "snapshot object is not an Arrow IPC stream: {what}"
        ))
    };
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let word = data.get(pos..pos + 4).ok_or_else(|| bad("truncated"))?;
        if word == CONTINUATION {
            pos += 4;
        }
        let len_bytes = data
            .get(pos..pos + 4)
            .ok_or_else(|| bad("truncated length"))?;
        let len = i32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        pos += 4;
        if len == 0 {
            return Ok(out);
        }
        let len = usize::try_from(len).map_err(|_| bad("negative length"))?;
        let header = data
            .get(pos..pos + len)
            .map(|_| data.slice(pos..pos + len))
            .ok_or_else(|| bad("truncated header"))?;
        pos += len;
        let message = arrow_ipc::root_as_message(&header).map_err(|e| bad(&e.to_string()))?;
        let body_len =
            usize::try_from(message.bodyLength()).map_err(|_| bad("negative body length"))?;
        let body = data
            .get(pos..pos + body_len)
            .map(|_| data.slice(pos..pos + body_len))
            .ok_or_else(|| bad("truncated body"))?;
        pos += body_len;
        out.push((header, body));
    }
}
