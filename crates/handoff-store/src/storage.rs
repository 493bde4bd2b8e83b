//! Object storage and the one object format the store writes: a partition as an Arrow IPC
//! stream (schema, the stored frames byte for byte, end-of-stream), readable by any Arrow
//! library. Spill and snapshot both build on this; it knows frames but not partitions or links.

use std::any::Any;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Result, StoreError};
use crate::ipc::Frame;
use crate::memory::Reservation;

const CONTINUATION: [u8; 4] = [0xFF; 4];

/// The IPC end-of-stream marker.
const END_OF_STREAM: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];

/// Part size of uploads in parts: S3's smallest.
pub(crate) const UPLOAD_PART_BYTES: usize = 5 << 20;

/// An object store and the path prefix inside it.
#[derive(Debug, Clone)]
pub struct ObjectStorage {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// For `file://`: the directory named by the URL. What we write below it is kept private
    /// (files 0600, directories 0700): spilled partitions and snapshots are tenants' data.
    local_root: Option<std::path::PathBuf>,
    /// Objects that never change once written, already read and decoded (shared by clones).
    pub(crate) decoded: DecodedCache,
}

/// Decoded objects by path, each used only while a listing shows the object unchanged (one
/// deleted and written again under the same name has a new modification time and tag). For
/// objects that are written once and then only read or removed.
#[derive(Default, Clone)]
pub(crate) struct DecodedCache(Arc<Mutex<HashMap<Path, (ObjectMeta, Arc<dyn Any + Send + Sync>)>>>);

impl std::fmt::Debug for DecodedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodedCache({} objects)", self.len())
    }
}

impl DecodedCache {
    /// The decoded object, if `listed` is what was decoded.
    pub(crate) fn get<T: Any + Send + Sync>(&self, listed: &ObjectMeta) -> Option<Arc<T>> {
        let cache = self.0.lock().ok()?;
        let (seen, value) = cache.get(&listed.location)?;
        if seen != listed {
            return None;
        }
        Arc::clone(value).downcast::<T>().ok()
    }

    pub(crate) fn put<T: Any + Send + Sync>(&self, listed: &ObjectMeta, value: Arc<T>) {
        if let Ok(mut cache) = self.0.lock() {
            cache.insert(listed.location.clone(), (listed.clone(), value));
        }
    }

    /// Drop what is under `dir` and not in `listed` (removed since).
    pub(crate) fn retain_under(&self, dir: &Path, listed: &[&ObjectMeta]) {
        let listed: std::collections::HashSet<&Path> = listed.iter().map(|m| &m.location).collect();
        if let Ok(mut cache) = self.0.lock() {
            cache.retain(|path, _| !path.prefix_matches(dir) || listed.contains(path));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().map_or(0, |cache| cache.len())
    }
}

fn storage_error(url: &str, source: object_store::Error) -> StoreError {
    StoreError::ObjectStore {
        url: url.to_string(),
        source,
    }
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
            decoded: Default::default(),
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
        builder
            .create(root)
            .map_err(|source| StoreError::StorageFile {
                url: self.url.clone(),
                path: root.clone(),
                source,
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
                std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode)).map_err(
                    |source| StoreError::StorageFile {
                        url: self.url.clone(),
                        path: at.to_path_buf(),
                        source,
                    },
                )
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

    /// Write `body` at `path` only if nothing is there yet (a conditional write); `false` when
    /// an object already exists. The one place two writers racing for a name is settled.
    pub(crate) async fn put_new(&self, path: &Path, body: Bytes) -> Result<bool> {
        let opts = object_store::PutOptions::from(object_store::PutMode::Create);
        match self.store.put_opts(path, body.into(), opts).await {
            Ok(_) => {
                self.restrict(path)?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(storage_error(&self.url, e)),
        }
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

    pub(crate) async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
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
        let objects = self.list(prefix).await?;
        for meta in &objects {
            self.delete(&meta.location).await?;
        }
        Ok(objects.len())
    }

    pub(crate) async fn get(&self, path: &Path) -> Result<Bytes> {
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

    /// Every object under `prefix`.
    pub(crate) async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        self.store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| storage_error(&self.url, e))
    }
}

/// Where one spilled frame's body sits inside its object.
#[derive(Debug)]
struct SpilledFrame {
    header: Bytes,
    body: Range<u64>,
    rows: u64,
}

/// A partition's frames after they moved to object storage.
#[derive(Debug)]
pub(crate) struct SpilledPartition {
    storage: ObjectStorage,
    pub(crate) path: Path,
    frames: Vec<SpilledFrame>,
}

impl SpilledPartition {
    /// Write `frames` as one object at `path`; only their headers and body offsets stay.
    pub(crate) async fn write(
        storage: &ObjectStorage,
        path: Path,
        schema_header: &Bytes,
        frames: &[Frame],
    ) -> Result<Self> {
        let encoded = encode_stream(schema_header, frames);
        storage.put(&path, encoded.parts).await?;
        Ok(Self {
            storage: storage.clone(),
            path,
            frames: frames
                .iter()
                .zip(encoded.bodies)
                .map(|(frame, body)| SpilledFrame {
                    // A copy: the received header shares its allocation with the body, which
                    // must be freed.
                    header: Bytes::copy_from_slice(&frame.header),
                    body,
                    rows: frame.rows,
                })
                .collect(),
        })
    }

    /// Fetch one frame's body with a ranged read.
    pub(crate) async fn frame(&self, index: usize) -> Result<Frame> {
        let spilled = self.frames.get(index).ok_or_else(|| {
            StoreError::Storage(format!(
                "frame {index} is past the end of spilled object {}",
                self.path
            ))
        })?;
        let body = if spilled.body.is_empty() {
            Bytes::new()
        } else {
            // Aligned, so that decoding it does not copy it again.
            crate::ipc::aligned(
                self.storage
                    .get_range(&self.path, spilled.body.clone())
                    .await?,
            )
        };
        Ok(Frame {
            header: spilled.header.clone(),
            body,
            rows: spilled.rows,
        })
    }

    pub(crate) fn storage(&self) -> &ObjectStorage {
        &self.storage
    }
}

impl Drop for SpilledPartition {
    fn drop(&mut self) {
        // The last holder let go: nobody can read this object any more.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (storage, path) = (self.storage.clone(), self.path.clone());
        runtime.spawn(async move {
            if let Err(e) = storage.delete(&path).await {
                tracing::warn!(%path, error = %e, "could not remove a spilled object");
            }
        });
    }
}

/// A partition still being written, going to one object as its frames arrive, in the format of a
/// spilled partition. A frame stays in memory only until the part holding it is uploaded: at
/// most about two parts ([`UPLOAD_PART_BYTES`] each) per stream.
pub(crate) struct SpillStream {
    storage: ObjectStorage,
    path: Path,
    /// `None` once finished or aborted.
    upload: Option<object_store::WriteMultipart>,
    offset: u64,
    frames: Vec<SpilledFrame>,
    /// The upload's part buffers, counted once the partition's earlier frames are out.
    buffers: Option<Reservation>,
}

impl SpillStream {
    /// Begin the object at `path` with the partition's schema.
    pub(crate) async fn start(
        storage: &ObjectStorage,
        path: Path,
        schema_header: &Bytes,
    ) -> Result<Self> {
        let mut upload = storage.upload(&path).await?;
        let head = encapsulate(schema_header);
        let offset = head.len() as u64;
        upload.put(head);
        Ok(Self {
            storage: storage.clone(),
            path,
            upload: Some(upload),
            offset,
            frames: Vec::new(),
            buffers: None,
        })
    }

    /// Count the upload's buffers (two parts) against the budget, if they fit now. Best effort:
    /// the stream exists because memory ran out, and its earlier frames free theirs only as
    /// their parts upload.
    pub(crate) fn count_buffers(&mut self, mut memory: Reservation) {
        if memory.try_grow(2 * UPLOAD_PART_BYTES as u64).is_ok() {
            self.buffers = Some(memory);
        }
    }

    pub(crate) async fn push(&mut self, frame: &Frame) -> Result<()> {
        let Some(upload) = self.upload.as_mut() else {
            return Err(StoreError::Storage(format!(
                "{} was already finished",
                self.path
            )));
        };
        let head = encapsulate(&frame.header);
        self.offset += head.len() as u64;
        upload.put(head);
        let start = self.offset;
        if !frame.body.is_empty() {
            self.offset += frame.body.len() as u64;
            upload.put(frame.body.clone());
        }
        self.frames.push(SpilledFrame {
            header: Bytes::copy_from_slice(&frame.header),
            body: start..self.offset,
            rows: frame.rows,
        });
        // One part uploading while the next fills: memory stays bounded whatever the size.
        upload
            .wait_for_capacity(1)
            .await
            .map_err(|e| storage_error(self.storage.url(), e))
    }

    /// Complete the object; the partition is then spilled like any other.
    pub(crate) async fn finish(mut self) -> Result<SpilledPartition> {
        let Some(mut upload) = self.upload.take() else {
            return Err(StoreError::Storage(format!(
                "{} was already finished",
                self.path
            )));
        };
        upload.put(Bytes::from_static(END_OF_STREAM));
        self.storage.finish_upload(&self.path, upload).await?;
        Ok(SpilledPartition {
            storage: self.storage.clone(),
            path: self.path.clone(),
            frames: std::mem::take(&mut self.frames),
        })
    }
}

impl Drop for SpillStream {
    fn drop(&mut self) {
        // A write that broke or was refused: nothing of it may stay in object storage.
        let Some(upload) = self.upload.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (storage, path) = (self.storage.clone(), self.path.clone());
        runtime.spawn(async move {
            let _ = upload.abort().await;
            let _ = storage.delete(&path).await;
        });
    }
}

/// One partition as an Arrow IPC stream, in parts that share the frames' bytes.
pub(crate) struct EncodedStream {
    pub parts: Vec<Bytes>,
    /// Where each frame's body lies in the concatenated stream.
    pub bodies: Vec<std::ops::Range<u64>>,
}

/// Schema, the frames byte for byte, end-of-stream.
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
    push(&mut parts, Bytes::from_static(END_OF_STREAM));
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

/// Split an IPC stream into (header, body) pairs, zero-copy slices of `data`. Lengths come
/// from the object, so every one is bounded by what is there before it is used.
pub(crate) fn messages(data: &Bytes) -> Result<Vec<(Bytes, Bytes)>> {
    let bad = |what: &str| {
        StoreError::Storage(format!(
            "snapshot object is not an Arrow IPC stream: {what}"
        ))
    };
    let take = |pos: usize, len: usize, what: &str| {
        pos.checked_add(len)
            .filter(|end| *end <= data.len())
            .map(|end| (data.slice(pos..end), end))
            .ok_or_else(|| bad(what))
    };
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let (mut word, mut next) = take(pos, 4, "truncated")?;
        if word[..] == CONTINUATION {
            (word, next) = take(next, 4, "truncated length")?;
        }
        pos = next;
        let len = i32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        if len == 0 {
            return Ok(out);
        }
        let len = usize::try_from(len).map_err(|_| bad("negative length"))?;
        let (header, next) = take(pos, len, "truncated header")?;
        let message = arrow_ipc::root_as_message(&header).map_err(|e| bad(&e.to_string()))?;
        let body_len =
            usize::try_from(message.bodyLength()).map_err(|_| bad("negative body length"))?;
        let (body, next) = take(next, body_len, "truncated body")?;
        pos = next;
        out.push((header, body));
    }
}
