//! The `spill` memory policy: finished partitions, least recently used first, move to object
//! storage when a write would not fit, and reads fetch them back frame by frame.
//!
//! A spilled partition is one Arrow IPC stream object (the snapshot format), written under
//! `spill/<server instance>/<link>/`. Only the small frame headers and the body offsets stay in
//! memory, so reading a spilled partition back never needs the whole object in memory. The object
//! is removed when the last holder of the partition lets go (delete, TTL, or the end of the last
//! read), and the whole instance prefix is removed when the server shuts down.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use object_store::path::Path;
use parking_lot::RwLock;

use crate::error::{Result, StoreError};
use crate::ipc::Frame;
use crate::link::{Link, Partition};
use crate::memory::MemoryPolicy;
use crate::snapshot::{ObjectStorage, encapsulate, encode_stream};

/// The IPC end-of-stream marker.
const END_OF_STREAM: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];

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
        let instance = format!("{}-{}", std::process::id(), crate::link::now_ms());
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

    /// Spill least recently used partitions until `needed` bytes were freed, from `only` this link
    /// (its own quota is short) or from every link whose policy is `spill`. Returns the bytes
    /// freed; 0 means nothing was left to spill.
    pub(crate) async fn make_room(&self, only: Option<&Arc<Link>>, needed: u64) -> Result<u64> {
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
    }

    /// Upload one resident partition and swap its frames for their locations. Returns the bytes
    /// freed (0 if it was no longer resident).
    async fn spill(&self, partition: &Arc<Partition>) -> Result<u64> {
        let Some(frames) = partition.resident_frames() else {
            return Ok(0);
        };
        let link = partition.link_name();
        let mut path = self.instance_dir();
        for part in link.split('/') {
            path = path.join(part);
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let path = path.join(format!(
            "p{}-a{}-{sequence}.arrows",
            partition.id, partition.attempt
        ));
        let encoded = encode_stream(&partition.schema.header, &frames);
        self.storage.put(&path, encoded.parts).await?;
        let spilled = SpilledPartition {
            storage: self.storage.clone(),
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
        };
        let freed = partition.swap_to_spilled(Arc::new(spilled));
        self.spilled_bytes_total.fetch_add(freed, Ordering::Relaxed);
        tracing::debug!(link = %link, partition = partition.id, bytes = freed, "spilled");
        Ok(freed)
    }

    /// Start streaming a partition that is still being written to object storage: under
    /// `spill`, when nothing finished is left to move out, a partition larger than memory goes
    /// out as it arrives instead of failing.
    pub(crate) async fn stream(&self, link: &str, schema_header: &Bytes) -> Result<SpillStream> {
        let mut path = self.instance_dir();
        for part in link.split('/') {
            path = path.join(part);
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let path = path.join(format!("w{sequence}.arrows"));
        let mut upload = self.storage.upload(&path).await?;
        let head = encapsulate(schema_header);
        let offset = head.len() as u64;
        upload.put(head);
        tracing::debug!(link, %path, "a partition being written spills as it arrives");
        Ok(SpillStream {
            storage: self.storage.clone(),
            path,
            upload: Some(upload),
            offset,
            frames: Vec::new(),
            buffers: None,
        })
    }

    /// Count a finished stream's bytes as spilled.
    pub(crate) fn streamed(&self, bytes: u64) {
        self.spilled_bytes_total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Remove everything this server instance spilled; for shutdown.
    pub(crate) async fn remove_all(&self) -> Result<usize> {
        self.storage.remove_prefix(&self.instance_dir()).await
    }
}

/// A partition still being written, going to one object as its frames arrive, in the format of a
/// spilled partition. A frame stays in memory only until the part holding it is uploaded: at
/// most about two parts ([`crate::snapshot::UPLOAD_PART_BYTES`] each) per stream.
pub(crate) struct SpillStream {
    storage: ObjectStorage,
    path: Path,
    /// `None` once finished or aborted.
    upload: Option<object_store::WriteMultipart>,
    offset: u64,
    frames: Vec<SpilledFrame>,
    /// The upload's part buffers, counted once the partition's earlier frames are out.
    buffers: Option<crate::memory::Reservation>,
}

impl SpillStream {
    /// Count the upload's buffers (two parts) against the budget, if they fit now. Best effort:
    /// the stream exists because memory ran out, and its earlier frames free theirs only as
    /// their parts upload.
    pub(crate) fn count_buffers(&mut self, mut memory: crate::memory::Reservation) {
        if memory
            .try_grow(2 * crate::snapshot::UPLOAD_PART_BYTES as u64)
            .is_ok()
        {
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
            .map_err(|e| StoreError::Storage(format!("uploading {}: {e}", self.path)))
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
