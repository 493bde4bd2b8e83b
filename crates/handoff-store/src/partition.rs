//! A partition: the frames of one write attempt, immutable once finished, resident in memory
//! or spilled to object storage. Below links: it knows nothing of commit or state.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow_array::BooleanArray;
use parking_lot::RwLock;
use tokio::sync::OnceCell;

use crate::error::{Result, StoreError};
use crate::ipc::{Frame, SchemaFrame};
use crate::memory::{MemoryPool, Reservation};
use crate::storage::SpilledPartition;

/// Wall-clock milliseconds since the epoch; 0 if the clock is before it.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One partition attempt: the frames one writer sent, immutable once finished. Its frames live
/// in memory, or in object storage after a spill.
#[derive(Debug)]
pub struct Partition {
    pub id: u64,
    pub attempt: u64,
    pub schema: SchemaFrame,
    pub rows: u64,
    pub bytes: u64,
    link: Arc<str>,
    /// Rows of each frame, known without fetching a spilled one.
    frame_rows: Vec<u64>,
    /// Bytes of each frame, header and body.
    frame_bytes: Vec<u64>,
    data: RwLock<Data>,
    last_used_ms: AtomicU64,
    /// Which rows pass recent filters, shared by every reader that uses the same one.
    selections: parking_lot::Mutex<VecDeque<(Arc<str>, SelectionCell)>>,
}

/// The rows of one frame that pass a filter.
#[derive(Debug, Clone)]
pub(crate) struct FrameSelection {
    pub rows: u64,
    /// `None` when every row passes.
    pub passed: Option<BooleanArray>,
}

pub(crate) type SelectionCell = Arc<OnceCell<Arc<[FrameSelection]>>>;

/// Filters whose selections a partition keeps. A selection costs one bit per row; ranks of one
/// job share a filter, and a few jobs may read one link at once.
const CACHED_FILTERS: usize = 4;

#[derive(Debug)]
enum Data {
    /// Each frame's body holds its own reservation (see [`Frame::owned`]).
    Resident {
        frames: Arc<[Frame]>,
    },
    Spilled(Arc<SpilledPartition>),
}

/// Where a partition's frames are right now.
pub(crate) enum Stored {
    Resident(Arc<[Frame]>),
    Spilled(Arc<SpilledPartition>),
}

impl Partition {
    pub(crate) fn new(link: Arc<str>, schema: SchemaFrame, frames: Vec<Frame>) -> Self {
        Self {
            id: 0,
            attempt: 0,
            rows: frames.iter().map(|f| f.rows).sum(),
            bytes: frames.iter().map(Frame::bytes).sum(),
            frame_rows: frames.iter().map(|f| f.rows).collect(),
            frame_bytes: frames.iter().map(Frame::bytes).collect(),
            schema,
            link,
            data: RwLock::new(Data::Resident {
                frames: frames.into(),
            }),
            last_used_ms: AtomicU64::new(now_ms()),
            selections: parking_lot::Mutex::new(VecDeque::new()),
        }
    }

    /// This partition as the link files it: under `id`, written by `attempt`.
    pub(crate) fn numbered(self, id: u64, attempt: u64) -> Self {
        Self {
            id,
            attempt,
            ..self
        }
    }

    /// The selection of `filter` (its text) over this partition's frames: computed by the first
    /// reader that asks, and awaited by the others, so W ranks evaluate a filter once, not W
    /// times, and agree on the result.
    pub(crate) fn selection_cell(&self, filter: &str) -> SelectionCell {
        let mut cached = self.selections.lock();
        if let Some((_, cell)) = cached.iter().find(|(key, _)| &**key == filter) {
            return Arc::clone(cell);
        }
        if cached.len() >= CACHED_FILTERS {
            cached.pop_front();
        }
        let cell = SelectionCell::default();
        cached.push_back((Arc::from(filter), Arc::clone(&cell)));
        cell
    }

    pub fn link_name(&self) -> &str {
        &self.link
    }

    pub fn frame_rows(&self) -> &[u64] {
        &self.frame_rows
    }

    pub fn frame_bytes(&self) -> &[u64] {
        &self.frame_bytes
    }

    pub fn is_spilled(&self) -> bool {
        matches!(*self.data.read(), Data::Spilled(_))
    }

    pub(crate) fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn stored(&self) -> Stored {
        match &*self.data.read() {
            Data::Resident { frames } => Stored::Resident(Arc::clone(frames)),
            Data::Spilled(spilled) => Stored::Spilled(Arc::clone(spilled)),
        }
    }

    pub(crate) fn resident_frames(&self) -> Option<Arc<[Frame]>> {
        match &*self.data.read() {
            Data::Resident { frames } => Some(Arc::clone(frames)),
            Data::Spilled(_) => None,
        }
    }

    /// Bytes of this partition's resident frames that decoding would copy (bodies received at
    /// an offset arrow cannot use in place).
    pub(crate) fn misaligned_bytes(&self) -> u64 {
        match &*self.data.read() {
            Data::Resident { frames } => frames
                .iter()
                .filter(|f| !f.is_aligned())
                .map(Frame::bytes)
                .sum(),
            Data::Spilled(_) => 0,
        }
    }

    /// Copy the misaligned frames into aligned memory paid for by `memory`, and keep the copies
    /// in place of the received bodies (freed once no reader holds them). Done once, by the
    /// first read that decodes the partition whole (a shuffle), so that later decodes share the
    /// stored memory; ingest stays copy-free.
    pub(crate) fn realign(&self, mut memory: Reservation) {
        let mut data = self.data.write();
        if let Data::Resident { frames } = &*data {
            let realigned: Vec<Frame> = frames
                .iter()
                .map(|f| {
                    if f.is_aligned() {
                        f.clone()
                    } else {
                        f.realigned(memory.split(f.bytes()))
                    }
                })
                .collect();
            *data = Data::Resident {
                frames: realigned.into(),
            };
        }
    }

    /// [`Self::realign`] with memory from `pool`, if it is free now; otherwise nothing (decoding
    /// then copies each misaligned frame for a moment). For scans that read the whole partition.
    pub fn realign_within(&self, pool: &Arc<MemoryPool>) {
        let bytes = self.misaligned_bytes();
        if bytes == 0 {
            return;
        }
        let mut memory = pool.reservation(None);
        if memory.try_grow(bytes).is_ok() {
            self.realign(memory);
        }
    }

    /// A partition whose frames went to object storage as they arrived.
    pub(crate) fn streamed(
        link: Arc<str>,
        schema: SchemaFrame,
        spilled: SpilledPartition,
        frame_rows: Vec<u64>,
        frame_bytes: Vec<u64>,
    ) -> Self {
        Self {
            id: 0,
            attempt: 0,
            rows: frame_rows.iter().sum(),
            bytes: frame_bytes.iter().sum(),
            frame_rows,
            frame_bytes,
            schema,
            link,
            data: RwLock::new(Data::Spilled(Arc::new(spilled))),
            last_used_ms: AtomicU64::new(now_ms()),
            selections: parking_lot::Mutex::new(VecDeque::new()),
        }
    }

    /// Replace the frames by their spilled copy and release their memory. Returns bytes freed.
    pub(crate) fn swap_to_spilled(&self, spilled: Arc<SpilledPartition>) -> u64 {
        let old = std::mem::replace(&mut *self.data.write(), Data::Spilled(spilled));
        match old {
            Data::Resident { .. } => self.bytes,
            Data::Spilled(_) => 0,
        }
    }

    /// One frame, from memory or fetched from object storage.
    pub async fn frame(&self, index: usize) -> Result<Frame> {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
        match self.stored() {
            Stored::Resident(frames) => frames.get(index).cloned().ok_or_else(|| {
                StoreError::InvalidArgument(format!(
                    "partition {} has {} frames, not {}",
                    self.id,
                    frames.len(),
                    index + 1
                ))
            }),
            Stored::Spilled(spilled) => spilled.frame(index).await,
        }
    }
}
