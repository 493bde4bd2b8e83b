//! Producing what a reader asked for: whole partitions, or one rank's shard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arrow_array::{Array, BooleanArray, RecordBatch};
use arrow_schema::{Schema, SchemaRef};
use tokio::sync::{OnceCell, mpsc};

use crate::error::{Result, StoreError};
use crate::ipc::{Frame, SchemaFrame, guard_panic};
use crate::link::{Link, LinkSnapshot, LinkState, Overflow};
use crate::memory::{MemoryPolicy, MemoryPool, Reservation};
use crate::partition::{FrameSelection, Partition, Stored};
use crate::shard::{ShardSpec, ShuffleLayout, WindowOrder};

/// One item of a read stream. The first item is always the schema.
#[derive(Debug, Clone)]
pub enum Chunk {
    Schema(SchemaFrame),
    /// A stored frame, replayed byte for byte.
    Frame(Frame),
    /// Rows that had to be cut or mixed, to be encoded on the way out, with the memory they
    /// hold reserved until the chunk is dropped.
    Batch(RecordBatch, Held),
}

/// Memory reserved for a chunk; released when the chunk (and every clone of it) is dropped.
#[derive(Debug, Clone, Default)]
pub struct Held(
    /// Never read: held so that dropping the last chunk releases it.
    #[allow(dead_code)]
    Option<Arc<Reservation>>,
);

impl Held {
    fn of(reservation: Reservation) -> Self {
        Self((reservation.bytes() > 0).then(|| Arc::new(reservation)))
    }
}

/// What reads may take of the server's memory: every buffer a read builds beyond the stored
/// frames (fetched spilled frames, filtered copies, shuffle orders, the batches it sends) is
/// reserved here first. A read that cannot get its memory waits, within a bound; under the
/// spill policy it first moves finished partitions out; then it fails with the numbers.
#[derive(Debug, Clone)]
pub struct ReadMemory {
    pub(crate) pool: Arc<MemoryPool>,
    pub(crate) spiller: Option<Arc<dyn Overflow>>,
    /// See `StoreConfig::shuffle_window`.
    pub(crate) shuffle_window: Option<u64>,
    pub(crate) wait: Duration,
    /// Shuffle windows decoded since the server started (a metric of what shuffles cost).
    pub(crate) windows_built: Arc<AtomicU64>,
}

impl ReadMemory {
    pub fn shuffle_window(&self) -> Option<u64> {
        self.shuffle_window
    }

    /// Shuffle windows decoded so far: with ranks sharing epochs, one per window per epoch.
    pub fn shuffle_windows_built(&self) -> u64 {
        self.windows_built.load(Ordering::Relaxed)
    }

    /// Consecutive batches of one read as one batch (the reader asked for several batches per
    /// message), if the memory for the copy (`bytes`) is free now. Joining only saves per-message
    /// costs, so it never waits or spills for memory: without it, the parts come back to be sent
    /// one by one, as a read that did not ask would send them.
    pub fn try_join(
        &self,
        link: &Link,
        parts: Vec<(RecordBatch, Held)>,
        bytes: u64,
    ) -> Result<std::result::Result<(RecordBatch, Held), Vec<(RecordBatch, Held)>>> {
        let Some(schema) = parts.first().map(|(batch, _)| batch.schema()) else {
            return Ok(Err(parts));
        };
        let mut memory = self.pool.reservation(None);
        if memory.try_grow(bytes).is_err() {
            return Ok(Err(parts));
        }
        let joined =
            arrow_select::concat::concat_batches(&schema, parts.iter().map(|(batch, _)| batch))
                .map_err(|e| corrupt(link.name(), e))?;
        drop(parts);
        Ok(Ok((joined, Held::of(memory))))
    }

    async fn reserve(&self, link: &Link, bytes: u64, what: &'static str) -> Result<Reservation> {
        let mut reservation = self.pool.reservation(None);
        if bytes == 0 {
            return Ok(reservation);
        }
        let failed = |cause| StoreError::ReadMemory {
            what,
            needed: bytes,
            cause: Box::new(cause),
        };
        let first = match reservation.try_grow(bytes) {
            Ok(()) => return Ok(reservation),
            Err(e) => e,
        };
        // More than the whole limit never fits: say so now rather than after the wait.
        if self.pool.limit().is_some_and(|limit| bytes > limit) {
            return Err(failed(first));
        }
        if link.policy() == MemoryPolicy::Spill
            && let Some(spiller) = &self.spiller
        {
            spiller.make_room(None, bytes).await?;
        }
        reservation
            .grow(bytes, MemoryPolicy::Wait { timeout: self.wait })
            .await
            .map_err(failed)?;
        Ok(reservation)
    }
}

/// How a shard read treats a link that is not sealed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    #[default]
    WaitForSeal,
    Streaming,
}

/// A row predicate, planned elsewhere (the store does not parse queries).
pub trait RowFilter: Send + Sync {
    /// Columns of the link schema the predicate reads; `evaluate` gets exactly these, in order.
    fn columns(&self) -> &[usize];
    /// Which rows pass. Null counts as not passing.
    fn evaluate(&self, batch: &RecordBatch) -> std::result::Result<BooleanArray, String>;
    /// Equal for filters that pass the same rows (the filter text will do); readers share the
    /// selections of equal filters. The filter must be deterministic.
    fn key(&self) -> &str;
}

/// What a shard read keeps: some columns, and the rows that pass a filter. The filter is applied
/// before the shard plan, so the plan's guarantees (disjoint, complete, equal batch counts) hold
/// for the rows that pass.
#[derive(Clone, Default)]
pub struct ReadQuery {
    /// Columns of the link schema to send, in this order. `None`: all of them.
    pub projection: Option<Vec<usize>>,
    pub filter: Option<Arc<dyn RowFilter>>,
}

impl std::fmt::Debug for ReadQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadQuery")
            .field("projection", &self.projection)
            .field(
                "filter",
                &self.filter.as_ref().map(|p| p.columns().to_vec()),
            )
            .finish()
    }
}

impl ReadQuery {
    /// Stored frames can be replayed byte for byte only when every row and column is sent.
    fn is_everything(&self) -> bool {
        self.projection.is_none() && self.filter.is_none()
    }

    fn output_schema(&self, schema: &SchemaRef) -> Result<SchemaRef> {
        match &self.projection {
            None => Ok(Arc::clone(schema)),
            Some(columns) => schema
                .project(columns)
                .map(Arc::new)
                .map_err(|e| StoreError::InvalidArgument(e.to_string())),
        }
    }
}

/// Turns the link's schema into a [`ReadQuery`]; called once the schema is known, so a reader
/// may ask before the first write. The error is a sentence for the reader.
pub type QueryPlanner =
    Arc<dyn Fn(&SchemaRef) -> std::result::Result<ReadQuery, String> + Send + Sync>;

/// Rows produced per gathered batch when the reader did not ask for a batch size.
const GATHER_ROWS: u64 = 64 * 1024;
/// What gathering a batch keeps per row besides the rows: its position and its pick.
const INDEX_BYTES_PER_ROW: u64 = 8 + 16;
/// Chunks buffered ahead of a slow reader.
const READ_AHEAD: usize = 4;

/// Start reading one rank's shard. Errors arrive in the stream; the producer stops when the
/// receiver is dropped.
pub fn read_shard(
    link: Arc<Link>,
    spec: ShardSpec,
    mode: ReadMode,
    planner: Option<QueryPlanner>,
    memory: ReadMemory,
) -> mpsc::Receiver<Result<Chunk>> {
    read_shard_rows(link, spec, mode, planner, memory, None)
}

/// [`read_shard`], stopping once `rows` rows were sent: a range read needs a few batches, and
/// the reader would otherwise build (and drop) the batches it reads ahead.
fn read_shard_rows(
    link: Arc<Link>,
    spec: ShardSpec,
    mode: ReadMode,
    planner: Option<QueryPlanner>,
    memory: ReadMemory,
    rows: Option<u64>,
) -> mpsc::Receiver<Result<Chunk>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        let mut out = Out {
            tx,
            rows_left: rows,
            sent_schema: false,
            gone: false,
        };
        // A panic must reach the reader as an error, not as a stream that just ends short.
        let task = std::panic::AssertUnwindSafe(shard_task(
            &link, &spec, mode, planner, &memory, &mut out,
        ));
        let outcome = match futures::FutureExt::catch_unwind(task).await {
            Ok(outcome) => outcome,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                Err(StoreError::Corrupt {
                    link: link.name().to_string(),
                    detail: format!("the read failed inside the server ({what}); please report it"),
                })
            }
        };
        match outcome {
            // A whole shard was delivered: count it towards the link's read TTL.
            Ok(()) if !out.gone && link.state() == LinkState::Sealed => {
                link.finish_read(spec.world_size, spec.epoch, spec.rank)
            }
            Ok(()) => {}
            Err(e) => {
                let _ = out.tx.send(Err(e)).await;
            }
        }
    });
    rx
}

/// The most ranges one [`read_ranges`] serves: a rank's part of a replica in a plan of at most
/// 2^24 batches.
pub const MAX_RANGES: usize = 1 << 24;

/// Rows `start..start + rows` of this link's order, range after range: its commit order, or
/// its shuffle for `base`'s seed and epoch (its one-rank read, `world_size` 1). This is what one
/// replica serves of a read planned over several replicas (issue 17): the planner's ranges are
/// in this replica's own order. The link must be sealed, and every range within its rows.
pub fn read_ranges(
    link: Arc<Link>,
    ranges: Vec<(u64, u64)>,
    base: ShardSpec,
    planner: Option<QueryPlanner>,
    memory: ReadMemory,
    on_done: Option<Box<dyn FnOnce() + Send>>,
) -> Result<mpsc::Receiver<Result<Chunk>>> {
    let snapshot = link.snapshot();
    if snapshot.state != LinkState::Sealed {
        return Err(StoreError::InvalidArgument(format!(
            "link '{}' is {}; ranges are read from a sealed link",
            link.name(),
            snapshot.state
        )));
    }
    if base.batch_rows == 0 {
        return Err(StoreError::InvalidArgument(
            "a range read needs batch_rows > 0".into(),
        ));
    }
    if ranges.len() > MAX_RANGES {
        return Err(StoreError::InvalidArgument(format!(
            "{} ranges in one read; at most {MAX_RANGES}",
            ranges.len()
        )));
    }
    for &(start, rows) in &ranges {
        let end = start.checked_add(rows);
        if rows == 0 || end.is_none_or(|end| end > snapshot.rows) {
            return Err(StoreError::InvalidArgument(format!(
                "range {start}+{rows} is not within the {} rows of link '{}'",
                snapshot.rows,
                link.name()
            )));
        }
    }
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        match ranges_task(&link, ranges, base, planner, memory, &tx).await {
            // Every range was handed over: the part of a rank's read (its read TTL) is done.
            Ok(true) => {
                if let Some(done) = on_done {
                    done()
                }
            }
            Ok(false) => {}
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    Ok(rx)
}

/// How many committed rows of a sealed link pass `planner`'s filter (every row without one):
/// the count a planner needs from each replica to plan a filtered read over several (issue
/// 17). The selections are computed once per partition and shared with the shard reads that
/// follow, so counting first costs no second evaluation.
pub async fn selected_rows(link: &Link, planner: Option<QueryPlanner>) -> Result<u64> {
    let snapshot = link.snapshot();
    if snapshot.state != LinkState::Sealed {
        return Err(StoreError::InvalidArgument(format!(
            "link '{}' is {}; rows are counted on a sealed link",
            link.name(),
            snapshot.state
        )));
    }
    let Some(schema) = &snapshot.schema else {
        return Ok(0);
    };
    let query = match &planner {
        Some(plan) => plan(&schema.schema).map_err(StoreError::InvalidArgument)?,
        None => ReadQuery::default(),
    };
    // Summed here rather than through a FrameIndex: a count needs no per-frame list.
    let mut total = 0u64;
    for partition in &snapshot.partitions {
        let rows: u64 = match &query.filter {
            None => partition.frame_rows().iter().sum(),
            Some(filter) => partition
                .selection_cell(filter.key())
                .get_or_try_init(|| select(partition, filter.as_ref(), &schema.schema, link.name()))
                .await?
                .iter()
                .map(|s| s.rows)
                .sum(),
        };
        total = total.saturating_add(rows);
    }
    Ok(total)
}

async fn ranges_task(
    link: &Arc<Link>,
    ranges: Vec<(u64, u64)>,
    base: ShardSpec,
    planner: Option<QueryPlanner>,
    memory: ReadMemory,
    tx: &mpsc::Sender<Result<Chunk>>,
) -> Result<bool> {
    let mut sent_schema = false;
    for (start, rows) in ranges {
        let batch_rows = base.batch_rows;
        let spec = ShardSpec {
            rank: 0,
            world_size: 1,
            drop_last: false,
            start_batch: start / batch_rows,
            ..base.clone()
        };
        let (mut skip, mut left) = (start % batch_rows, rows);
        let mut inner = read_shard_rows(
            Arc::clone(link),
            spec,
            ReadMode::WaitForSeal,
            planner.clone(),
            memory.clone(),
            Some(skip + rows),
        );
        while left > 0 {
            let chunk = match inner.recv().await {
                Some(item) => item?,
                None => {
                    return Err(StoreError::Corrupt {
                        link: link.name().to_string(),
                        detail: format!("a range read ended {left} rows short"),
                    });
                }
            };
            let n = match &chunk {
                Chunk::Schema(_) if sent_schema => continue,
                Chunk::Schema(_) => {
                    sent_schema = true;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Ok(false);
                    }
                    continue;
                }
                Chunk::Frame(frame) => frame.rows,
                Chunk::Batch(batch, _) => batch.num_rows() as u64,
            };
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(left);
            let out = if skip == 0 && take == n {
                chunk
            } else {
                // Only a range's ends cut a chunk; a stored frame is decoded to be cut.
                let (batch, held) = match chunk {
                    Chunk::Batch(batch, held) => (batch, held),
                    Chunk::Frame(frame) => {
                        let schema = link.schema().ok_or_else(|| StoreError::Corrupt {
                            link: link.name().to_string(),
                            detail: "a frame of a link without a schema".into(),
                        })?;
                        (frame.decode(&schema.schema)?, Held::default())
                    }
                    Chunk::Schema(_) => continue,
                };
                Chunk::Batch(batch.slice(skip as usize, take as usize), held)
            };
            skip = 0;
            left -= take;
            if tx.send(Ok(out)).await.is_err() {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

struct Out {
    tx: mpsc::Sender<Result<Chunk>>,
    /// Rows still wanted, when the reader wants only so many.
    rows_left: Option<u64>,
    sent_schema: bool,
    /// The reader went away before the end.
    gone: bool,
}

impl Out {
    /// Returns false once the reader has gone away.
    async fn send(&mut self, chunk: Chunk) -> bool {
        let rows = match &chunk {
            Chunk::Schema(_) => 0,
            Chunk::Frame(frame) => frame.rows,
            Chunk::Batch(batch, _) => batch.num_rows() as u64,
        };
        self.gone = self.tx.send(Ok(chunk)).await.is_err();
        if let Some(left) = self.rows_left.as_mut() {
            *left = left.saturating_sub(rows);
            // Enough: stop as a reader that went away would stop the read.
            if *left == 0 {
                self.gone = true;
            }
        }
        !self.gone
    }

    async fn schema(&mut self, snapshot: &LinkSnapshot, query: &ReadQuery) -> Result<bool> {
        if self.sent_schema {
            return Ok(true);
        }
        let schema = match &snapshot.schema {
            Some(s) if query.projection.is_some() => {
                SchemaFrame::from_schema(query.output_schema(&s.schema)?)?
            }
            Some(s) => s.clone(),
            None if snapshot.state == LinkState::Sealed => {
                SchemaFrame::from_schema(Arc::new(Schema::empty()))?
            }
            None => return Ok(true),
        };
        self.sent_schema = true;
        Ok(self.send(Chunk::Schema(schema)).await)
    }
}

async fn shard_task(
    link: &Arc<Link>,
    spec: &ShardSpec,
    mode: ReadMode,
    planner: Option<QueryPlanner>,
    memory: &ReadMemory,
    out: &mut Out,
) -> Result<()> {
    spec.validate()?;
    if mode == ReadMode::Streaming && spec.shuffle {
        return Err(StoreError::InvalidArgument(
            "shuffle needs the whole link: read with wait-for-seal mode, or turn shuffle off to stream".into(),
        ));
    }
    if mode == ReadMode::Streaming && spec.batch_rows == 0 {
        return Err(StoreError::InvalidArgument(
            "streaming reads need batch_rows > 0, so that ranks can split rows before the total is known".into(),
        ));
    }
    let mut changes = link.subscribe();
    let mut index = FrameIndex::default();
    let mut query: Option<ReadQuery> = None;
    let mut next_k = spec.start_batch;
    loop {
        changes.mark_unchanged();
        let snapshot = link.snapshot();
        match snapshot.state {
            LinkState::Deleted => return Err(StoreError::Deleted(link.name().to_string())),
            LinkState::Open if mode == ReadMode::WaitForSeal => {}
            state => {
                if query.is_none()
                    && let Some(schema) = &snapshot.schema
                {
                    query = Some(match &planner {
                        Some(plan) => plan(&schema.schema).map_err(StoreError::InvalidArgument)?,
                        None => ReadQuery::default(),
                    });
                }
                let everything = ReadQuery::default();
                let query_now = query.as_ref().unwrap_or(&everything);
                if !out.schema(&snapshot, query_now).await? {
                    return Ok(());
                }
                let sealed = state == LinkState::Sealed;
                let (Some(schema), Some(query)) = (
                    snapshot.schema.as_ref().map(|s| Arc::clone(&s.schema)),
                    query.as_ref(),
                ) else {
                    if sealed {
                        return Ok(());
                    }
                    wait(&mut changes, link).await?;
                    continue;
                };
                index.extend(&snapshot, &schema, query, link.name()).await?;
                let mut rows = RowSource::new(link, schema, query.clone(), memory)?;
                if spec.shuffle {
                    let mut shuffler = Shuffler::new(link, spec, &index, query, memory);
                    if spec.batch_rows == 0 {
                        return contiguous_shuffled(spec, &index, &rows, &mut shuffler, out).await;
                    }
                    return shuffled(spec, &index, &rows, &mut shuffler, out).await;
                }
                if spec.batch_rows == 0 {
                    return contiguous(spec, &index, &mut rows, out).await;
                }
                // Unshuffled batches: hand out every batch whose rows are all committed.
                let b = spec.batch_rows;
                let last = if sealed {
                    Some(spec.batches_per_rank(index.total))
                } else {
                    None
                };
                loop {
                    if let Some(last) = last {
                        if next_k >= last {
                            return Ok(());
                        }
                    } else if !spec.streamable(next_k, index.total) {
                        break;
                    }
                    let start = spec.batch_start(next_k).ok_or_else(|| past_the_end(spec))?;
                    let chunk = rows.range_wrapping(&index, start, b).await?;
                    if !out.send(chunk).await {
                        return Ok(());
                    }
                    next_k += 1;
                }
            }
        }
        wait(&mut changes, link).await?;
    }
}

/// Only reachable if validation missed a case: a plan position that is not a number.
fn past_the_end(spec: &ShardSpec) -> StoreError {
    StoreError::InvalidArgument(format!(
        "start_batch {} is past the end of any link at world_size {} and batch_rows {}",
        spec.start_batch, spec.world_size, spec.batch_rows
    ))
}

async fn wait(changes: &mut tokio::sync::watch::Receiver<u64>, link: &Link) -> Result<()> {
    changes
        .changed()
        .await
        .map_err(|_| StoreError::Deleted(link.name().to_string()))
}

async fn contiguous(
    spec: &ShardSpec,
    index: &FrameIndex,
    rows: &mut RowSource,
    out: &mut Out,
) -> Result<()> {
    let (start, end) = spec.contiguous_range(index.total);
    let mut pos = start;
    while pos < end {
        let f = index.locate(pos);
        let (fs, fe) = (index.starts[f], index.starts[f] + index.frames[f].rows);
        let take_end = fe.min(end);
        let chunk = if pos == fs && take_end == fe && rows.query.is_everything() {
            Chunk::Frame(index.fetch(f).await?)
        } else {
            // A slice shares the decoded frame, which holds its own reservation; the slice
            // holds a share of it until sent.
            rows.keep_from(f);
            let (batch, held) = rows.decoded(index, f).await?;
            Chunk::Batch(
                batch.slice((pos - fs) as usize, (take_end - pos) as usize),
                held,
            )
        };
        if !out.send(chunk).await {
            return Ok(());
        }
        pos = take_end;
    }
    Ok(())
}

/// `batch_rows == 0` with shuffle: this rank's contiguous range of the epoch's order.
async fn contiguous_shuffled(
    spec: &ShardSpec,
    index: &FrameIndex,
    rows: &RowSource,
    shuffler: &mut Shuffler,
    out: &mut Out,
) -> Result<()> {
    let (start, end) = spec.contiguous_range(index.total);
    let mut pos = start;
    while pos < end {
        let next = end.min(pos + GATHER_ROWS);
        let (batch, held) = shuffler.gather(index, rows, pos..next).await?;
        if !out.send(Chunk::Batch(batch, held)).await {
            return Ok(());
        }
        pos = next;
    }
    Ok(())
}

async fn shuffled(
    spec: &ShardSpec,
    index: &FrameIndex,
    rows: &RowSource,
    shuffler: &mut Shuffler,
    out: &mut Out,
) -> Result<()> {
    let n = index.total;
    let b = spec.batch_rows;
    for k in spec.start_batch..spec.batches_per_rank(n) {
        let start = spec.batch_start(k).ok_or_else(|| past_the_end(spec))?;
        let (batch, held) = shuffler
            .gather(index, rows, (start..start + b).map(|p| p % n))
            .await?;
        if !out.send(Chunk::Batch(batch, held)).await {
            return Ok(());
        }
    }
    Ok(())
}

/// One shuffled epoch of a link, shared by every rank that reads it (same link contents,
/// query, seed and epoch): the layout, and the windows some rank is reading, each decoded once
/// and dropped when the last rank holding it moves on. So W ranks cost one decode of each
/// frame and one order, not W.
struct SharedEpoch {
    layout: ShuffleLayout,
    windows: parking_lot::Mutex<HashMap<usize, Weak<WindowCell>>>,
}

type WindowCell = OnceCell<Window>;

/// One window of an epoch, decoded: its frames' rows (only the read's columns and the rows that
/// pass its filter) and their order.
struct Window {
    batches: Vec<RecordBatch>,
    /// Row of the window where each batch starts.
    starts: Vec<u64>,
    /// Bytes per row of each batch, for reserving what a gather copies out of it.
    row_bytes: Vec<u64>,
    order: WindowOrder,
    _memory: Reservation,
}

/// One rank's view of a shared epoch: the windows its current batch uses.
struct Shuffler {
    link: Arc<Link>,
    shared: Arc<SharedEpoch>,
    seed: u64,
    epoch: u64,
    held: Vec<(usize, Arc<WindowCell>)>,
    memory: ReadMemory,
}

impl Shuffler {
    fn new(
        link: &Arc<Link>,
        spec: &ShardSpec,
        index: &FrameIndex,
        query: &ReadQuery,
        memory: &ReadMemory,
    ) -> Self {
        let key = format!(
            "shuffle/{}/{}/{}/{:?}/{}",
            index.generation.unwrap_or(0),
            spec.seed,
            spec.epoch,
            query.projection,
            query.filter.as_ref().map_or("", |f| f.key()),
        );
        let shared = link.shared_read(&key, || {
            let rows: Vec<u64> = index.frames.iter().map(|f| f.rows).collect();
            let weight: Vec<u64> = index.frames.iter().map(FrameRef::weight).collect();
            SharedEpoch {
                layout: ShuffleLayout::new(
                    &rows,
                    &weight,
                    memory.shuffle_window,
                    spec.seed,
                    spec.epoch,
                ),
                windows: Default::default(),
            }
        });
        Self {
            link: Arc::clone(link),
            shared,
            seed: spec.seed,
            epoch: spec.epoch,
            held: Vec::new(),
            memory: memory.clone(),
        }
    }

    /// Window `w`, from this rank's holdings, another rank's, or decoded now.
    async fn window(
        &mut self,
        w: usize,
        index: &FrameIndex,
        rows: &RowSource,
    ) -> Result<Arc<WindowCell>> {
        if let Some((_, cell)) = self.held.iter().find(|(held, _)| *held == w) {
            return Ok(Arc::clone(cell));
        }
        let cell = {
            let mut windows = self.shared.windows.lock();
            windows.retain(|_, cell| cell.strong_count() > 0);
            match windows.get(&w).and_then(Weak::upgrade) {
                Some(cell) => cell,
                None => {
                    let cell = Arc::new(WindowCell::new());
                    windows.insert(w, Arc::downgrade(&cell));
                    cell
                }
            }
        };
        cell.get_or_try_init(|| self.load(w, index, rows)).await?;
        self.held.push((w, Arc::clone(&cell)));
        Ok(cell)
    }

    async fn load(&self, w: usize, index: &FrameIndex, rows: &RowSource) -> Result<Window> {
        let layout = &self.shared.layout;
        let frames = layout.frames(w);
        // Frames received at offsets arrow cannot use in place are copied once into aligned
        // memory and kept so: otherwise each window would hold a copy of them.
        let mut partitions: Vec<&Arc<Partition>> = Vec::new();
        for &f in frames {
            let partition = &index.frames[f].partition;
            if !partitions.iter().any(|p| Arc::ptr_eq(p, partition)) {
                partitions.push(partition);
            }
        }
        for partition in partitions {
            let misaligned = partition.misaligned_bytes();
            if misaligned > 0 {
                let memory = self
                    .memory
                    .reserve(&self.link, misaligned, "aligning stored frames")
                    .await?;
                partition.realign(memory);
            }
        }
        // Reserved before anything is fetched or decoded: the order, and every frame whose
        // decoded rows are not the stored bytes themselves.
        let needed = frames
            .iter()
            .fold(WindowOrder::bytes_for(layout.rows(w)), |sum, f| {
                sum.saturating_add(rows.decode_cost(index, *f).0)
            });
        let memory = self
            .memory
            .reserve(&self.link, needed, "a window of a shuffled epoch")
            .await?;
        let mut batches = Vec::with_capacity(frames.len());
        let mut starts = Vec::with_capacity(frames.len());
        let mut row_bytes = Vec::with_capacity(frames.len());
        let mut at = 0u64;
        for &f in frames {
            starts.push(at);
            at += index.frames[f].rows;
            row_bytes.push(index.frames[f].row_bytes());
            batches.push(rows.decode_reserved(index, f).await?);
        }
        let order = WindowOrder::new(layout.rows(w), self.seed, self.epoch, w);
        self.memory.windows_built.fetch_add(1, Ordering::Relaxed);
        Ok(Window {
            batches,
            starts,
            row_bytes,
            order,
            _memory: memory,
        })
    }

    /// The rows at these positions of the epoch's order, as one batch with its reservation.
    /// Positions run through windows in order (a batch wraps to the start only at the end of
    /// an epoch), so each window is cut in one piece and let go before the next is taken: a
    /// rank holds one window at a time, whatever the batch size.
    async fn gather(
        &mut self,
        index: &FrameIndex,
        rows: &RowSource,
        positions: impl Iterator<Item = u64>,
    ) -> Result<(RecordBatch, Held)> {
        let layout = Arc::clone(&self.shared);
        let layout = &layout.layout;
        // The window the batch starts in comes first: it is what the batch cannot do without.
        let mut positions = positions.peekable();
        if let Some(&first) = positions.peek() {
            let w = layout.window_of(first);
            self.held.retain(|(held, _)| *held == w);
            self.window(w, index, rows).await?;
        }
        // The batch's row positions and picks: up to 2^24 rows of them, so they are reserved too.
        let rows_wanted = positions.size_hint().1.unwrap_or(usize::MAX) as u64;
        let _index = self
            .memory
            .reserve(
                &self.link,
                rows_wanted.saturating_mul(INDEX_BYTES_PER_ROW),
                "a shuffled batch's row index",
            )
            .await?;
        let mut runs: Vec<(usize, Vec<u64>)> = Vec::new();
        for p in positions {
            let w = layout.window_of(p);
            let at = p - layout.start(w);
            match runs.last_mut() {
                Some((last, run)) if *last == w => run.push(at),
                _ => runs.push((w, vec![at])),
            }
        }
        let mut pieces: Vec<(RecordBatch, Reservation)> = Vec::with_capacity(runs.len());
        for (w, run) in &runs {
            self.held.retain(|(held, _)| held == w);
            let cell = self.window(*w, index, rows).await?;
            let window = cell
                .get()
                .ok_or_else(|| corrupt(self.link.name(), "a shuffle window was not built"))?;
            pieces.push(self.cut(window, run).await?);
        }
        if pieces.len() == 1 {
            let (batch, memory) = pieces.remove(0);
            return Ok((batch, Held::of(memory)));
        }
        let bytes = pieces.iter().map(|(_, r)| r.bytes()).sum();
        let memory = self
            .memory
            .reserve(&self.link, bytes, "a shuffled batch")
            .await?;
        let batches: Vec<RecordBatch> = pieces.into_iter().map(|(batch, _)| batch).collect();
        let batch = arrow_select::concat::concat_batches(&rows.schema, &batches)
            .map_err(|e| corrupt(self.link.name(), e))?;
        Ok((batch, Held::of(memory)))
    }

    /// The rows at positions `run` of one window, in that order.
    async fn cut(&self, window: &Window, run: &[u64]) -> Result<(RecordBatch, Reservation)> {
        let mut slots: Vec<usize> = Vec::new();
        let mut slot_of: HashMap<usize, usize> = HashMap::new();
        let mut picks = Vec::with_capacity(run.len());
        let mut bytes = 0u64;
        for &i in run {
            let r = window.order.get(i);
            let b = window.starts.partition_point(|s| *s <= r) - 1;
            let slot = *slot_of.entry(b).or_insert_with(|| {
                slots.push(b);
                slots.len() - 1
            });
            bytes = bytes.saturating_add(window.row_bytes[b]);
            picks.push((slot, (r - window.starts[b]) as usize));
        }
        let memory = self
            .memory
            .reserve(&self.link, bytes, "a shuffled batch")
            .await?;
        let batches: Vec<&RecordBatch> = slots.iter().map(|b| &window.batches[*b]).collect();
        let link = self.link.name().to_string();
        let batch = guard_panic(|| {
            arrow_select::interleave::interleave_record_batch(&batches, &picks)
                .map_err(|e| corrupt(&link, e))
        })?;
        Ok((batch, memory))
    }
}

/// Where one frame is: its partition (in memory or spilled) and its position there.
struct FrameRef {
    partition: Arc<Partition>,
    index: usize,
    /// Rows that pass the filter (all rows without one).
    rows: u64,
    /// Which of the frame's rows pass, when there is a filter.
    selection: Option<BooleanArray>,
}

impl FrameRef {
    /// The frame's stored bytes, header and body.
    fn stored_bytes(&self) -> u64 {
        self.partition.frame_bytes()[self.index]
    }

    /// Stored bytes per row, rounded up: what a row costs when copied out.
    fn row_bytes(&self) -> u64 {
        let rows = self.partition.frame_rows()[self.index].max(1);
        self.stored_bytes().div_ceil(rows)
    }

    /// The stored bytes of the rows that pass.
    fn passing_bytes(&self) -> u64 {
        self.row_bytes().saturating_mul(self.rows)
    }

    /// What holding this frame in a shuffle window may cost: its passing rows (fetched or
    /// copied) and their share of the window's order. A function of the link alone, so every
    /// rank lays out the same windows.
    fn weight(&self) -> u64 {
        self.passing_bytes()
            .saturating_add(WindowOrder::bytes_for(self.rows))
    }
}

/// Which rows of each frame of `partition` pass `filter`. Only the filter's columns are decoded.
async fn select(
    partition: &Partition,
    filter: &dyn RowFilter,
    schema: &SchemaRef,
    link: &str,
) -> Result<Arc<[FrameSelection]>> {
    let mut selections = Vec::with_capacity(partition.frame_rows().len());
    for (index, &rows) in partition.frame_rows().iter().enumerate() {
        if rows == 0 {
            selections.push(FrameSelection { rows, passed: None });
            continue;
        }
        let frame = partition.frame(index).await?;
        let columns = frame
            .decode_columns(schema, Some(filter.columns()))
            .map_err(|e| corrupt(link, e))?;
        let passed = filter
            .evaluate(&columns)
            .map_err(|e| StoreError::InvalidArgument(format!("the filter failed: {e}")))?;
        // Null counts as not passing, for the count and for the cut alike.
        let passed = if passed.null_count() > 0 {
            arrow_select::filter::prep_null_mask_filter(&passed)
        } else {
            passed
        };
        let kept = passed.true_count() as u64;
        selections.push(FrameSelection {
            rows: kept,
            passed: (kept < rows).then_some(passed),
        });
    }
    Ok(selections.into())
}

/// All committed frames of a link in commit order, with the first row number of each.
#[derive(Default)]
struct FrameIndex {
    frames: Vec<FrameRef>,
    starts: Vec<u64>,
    total: u64,
    partitions_seen: usize,
    generation: Option<u64>,
}

impl FrameIndex {
    /// Commits append, so new partitions are simply added at the end, unless a replacing commit
    /// swapped the contents, which ends the read.
    /// With a filter, each new partition's selection (the rows that pass, counted) is taken from
    /// the partition, computed there by the first reader; the shard plan then runs over those
    /// rows only.
    async fn extend(
        &mut self,
        snapshot: &LinkSnapshot,
        schema: &SchemaRef,
        query: &ReadQuery,
        link: &str,
    ) -> Result<()> {
        if *self.generation.get_or_insert(snapshot.generation) != snapshot.generation {
            return Err(StoreError::Replaced(snapshot.name.clone()));
        }
        for partition in &snapshot.partitions[self.partitions_seen.min(snapshot.partitions.len())..]
        {
            let selections = match &query.filter {
                None => None,
                Some(filter) => Some(
                    partition
                        .selection_cell(filter.key())
                        .get_or_try_init(|| select(partition, filter.as_ref(), schema, link))
                        .await?
                        .clone(),
                ),
            };
            for (index, &rows) in partition.frame_rows().iter().enumerate() {
                let (rows, selection) = match &selections {
                    None => (rows, None),
                    Some(s) => (s[index].rows, s[index].passed.clone()),
                };
                if rows == 0 {
                    continue;
                }
                self.starts.push(self.total);
                self.total += rows;
                self.frames.push(FrameRef {
                    partition: Arc::clone(partition),
                    index,
                    rows,
                    selection,
                });
            }
        }
        self.partitions_seen = snapshot.partitions.len();
        Ok(())
    }

    /// The frame's bytes, fetched from object storage if its partition was spilled.
    async fn fetch(&self, f: usize) -> Result<Frame> {
        let at = &self.frames[f];
        at.partition.frame(at.index).await
    }

    fn locate(&self, row: u64) -> usize {
        self.starts.partition_point(|s| *s <= row) - 1
    }
}

fn corrupt(link: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        link: link.to_string(),
        detail: e.to_string(),
    }
}

/// Decodes frames on demand (only the asked-for columns, only the passing rows); sequential
/// reads keep the frames they are cutting, with their memory reserved.
struct RowSource {
    link: Arc<Link>,
    /// The link's schema, which frames are encoded with.
    stored: SchemaRef,
    /// What the reader gets.
    schema: SchemaRef,
    query: ReadQuery,
    memory: ReadMemory,
    decoded: HashMap<usize, (RecordBatch, Held)>,
}

impl RowSource {
    fn new(
        link: &Arc<Link>,
        stored: SchemaRef,
        query: ReadQuery,
        memory: &ReadMemory,
    ) -> Result<Self> {
        Ok(Self {
            link: Arc::clone(link),
            schema: query.output_schema(&stored)?,
            stored,
            query,
            memory: memory.clone(),
            decoded: Default::default(),
        })
    }

    /// Bytes that frame `f`, decoded, holds beyond the stored frame, and bytes that decoding it
    /// needs for a moment. A spilled frame is fetched, an unaligned one copied, and a filter
    /// copies the rows that pass (and then lets the fetched frame go). Projection and decoding
    /// of a resident aligned frame share its memory, which its body keeps reserved.
    fn decode_cost(&self, index: &FrameIndex, f: usize) -> (u64, u64) {
        let at = &index.frames[f];
        let shared = match at.partition.stored() {
            Stored::Resident(frames) => frames.get(at.index).is_some_and(Frame::is_aligned),
            Stored::Spilled(_) => false,
        };
        let fetched = if shared { 0 } else { at.stored_bytes() };
        if at.selection.is_some() {
            (at.passing_bytes(), fetched)
        } else {
            (fetched, 0)
        }
    }

    /// Frame `f`, decoded, with its passing moment's memory reserved here; what the result
    /// holds must already be reserved by the caller.
    async fn decode_reserved(&self, index: &FrameIndex, f: usize) -> Result<RecordBatch> {
        let (_, transient) = self.decode_cost(index, f);
        let _moment = self
            .memory
            .reserve(&self.link, transient, "a fetched frame")
            .await?;
        self.decode(index, f).await
    }

    /// Frame `f`, decoded: its memory must already be reserved by the caller.
    async fn decode(&self, index: &FrameIndex, f: usize) -> Result<RecordBatch> {
        let frame = index.fetch(f).await?;
        let link = self.link.name();
        let mut batch = frame
            .decode_columns(&self.stored, self.query.projection.as_deref())
            .map_err(|e| corrupt(link, e))?;
        if let Some(selection) = &index.frames[f].selection {
            batch = arrow_select::filter::filter_record_batch(&batch, selection)
                .map_err(|e| corrupt(link, e))?;
        }
        Ok(batch)
    }

    /// Let go of decoded frames before `f`: sequential reads never return to them (a wrapping
    /// read only at its very end), so the cache holds a frame or two, not the whole shard.
    fn keep_from(&mut self, f: usize) {
        self.decoded.retain(|k, _| *k >= f);
    }

    /// Frame `f` decoded and kept, with what it holds.
    async fn decoded(&mut self, index: &FrameIndex, f: usize) -> Result<(RecordBatch, Held)> {
        if let Some((batch, held)) = self.decoded.get(&f) {
            return Ok((batch.clone(), held.clone()));
        }
        let memory = self
            .memory
            .reserve(&self.link, self.decode_cost(index, f).0, "a decoded frame")
            .await?;
        let batch = self.decode_reserved(index, f).await?;
        let held = Held::of(memory);
        self.decoded.insert(f, (batch.clone(), held.clone()));
        Ok((batch, held))
    }

    /// `len` rows from position `start`, wrapping past the end to the beginning.
    async fn range_wrapping(&mut self, index: &FrameIndex, start: u64, len: u64) -> Result<Chunk> {
        let n = index.total;
        let mut pieces = Vec::new();
        let mut copied = 0u64;
        let (mut pos, mut left) = (start % n, len);
        while left > 0 {
            let f = index.locate(pos);
            let (fs, fe) = (index.starts[f], index.starts[f] + index.frames[f].rows);
            let take = (fe - pos).min(left);
            if pieces.is_empty()
                && pos == fs
                && take == index.frames[f].rows
                && take == len
                && self.query.is_everything()
            {
                // The stored batch is exactly this batch: replay it without decoding.
                return Ok(Chunk::Frame(index.fetch(f).await?));
            }
            self.keep_from(f.saturating_sub(1));
            let (batch, held) = self.decoded(index, f).await?;
            pieces.push((batch.slice((pos - fs) as usize, take as usize), held));
            copied = copied.saturating_add(index.frames[f].row_bytes().saturating_mul(take));
            left -= take;
            pos = (pos + take) % n;
        }
        if pieces.len() == 1 {
            let (batch, held) = pieces.remove(0);
            return Ok(Chunk::Batch(batch, held));
        }
        let memory = self
            .memory
            .reserve(&self.link, copied, "a re-batched batch")
            .await?;
        let batches: Vec<RecordBatch> = pieces.into_iter().map(|(batch, _)| batch).collect();
        let batch = arrow_select::concat::concat_batches(&self.schema, &batches)
            .map_err(|e| corrupt(self.link.name(), e))?;
        Ok(Chunk::Batch(batch, Held::of(memory)))
    }
}

/// One committed partition by its position in commit order, with the link schema.
/// One committed partition, by its position in commit order, if the link is still at the
/// `generation` the caller's ticket was issued for.
pub fn read_partition(
    link: &Link,
    index: u64,
    generation: u64,
) -> Result<(SchemaFrame, Arc<Partition>)> {
    let snapshot = link.snapshot();
    if snapshot.state == LinkState::Deleted {
        return Err(StoreError::Deleted(link.name().to_string()));
    }
    // A replacing commit renumbers the partitions: an older ticket would read the new data.
    if snapshot.generation != generation {
        return Err(StoreError::Replaced(link.name().to_string()));
    }
    let partition = usize::try_from(index)
        .ok()
        .and_then(|i| snapshot.partitions.get(i))
        .cloned()
        .ok_or_else(|| {
            StoreError::InvalidArgument(format!(
                "link '{}' has {} committed partitions, and position {index} is not one of them; ask GetFlightInfo for fresh tickets",
                link.name(),
                snapshot.partitions.len(),
            ))
        })?;
    let schema = snapshot
        .schema
        .ok_or_else(|| StoreError::InvalidArgument("link has no schema yet".into()))?;
    Ok((schema, partition))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arrow_array::Int64Array;
    use arrow_ipc::writer::{
        DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions,
    };
    use arrow_schema::{DataType, Field};
    use bytes::Bytes;

    use super::*;
    use crate::link::PutTarget;
    use crate::{Store, StoreConfig};

    /// `id % 2 = 0`, counting the frames it is evaluated on.
    struct EvenIds {
        columns: Vec<usize>,
        frames: AtomicUsize,
    }

    impl RowFilter for EvenIds {
        fn columns(&self) -> &[usize] {
            &self.columns
        }

        fn evaluate(&self, batch: &RecordBatch) -> std::result::Result<BooleanArray, String> {
            self.frames.fetch_add(1, Ordering::SeqCst);
            let ids = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or("not int64")?;
            Ok(ids.iter().map(|id| id.map(|id| id % 2 == 0)).collect())
        }

        fn key(&self) -> &str {
            "id % 2 = 0"
        }
    }

    /// A sealed link of `partitions` x `frames` frames of 100 ids each, counting up from 0.
    async fn sealed_link(store: &Store, partitions: i64, frames: i64) -> Arc<Link> {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let options = IpcWriteOptions::default();
        let generator = IpcDataGenerator::default();
        let mut tracker = DictionaryTracker::new(false);
        let mut context = IpcWriteContext::default();
        let encoded_schema =
            generator.schema_to_bytes_with_dictionary_tracker(&schema, &mut tracker, &options);
        let mut next = 0i64;
        for _ in 0..partitions {
            let mut writer = store
                .begin_put("l", PutTarget::Append, true)
                .expect("begin");
            writer
                .push(
                    Bytes::from(encoded_schema.ipc_message.clone()),
                    Bytes::new(),
                )
                .await
                .expect("schema");
            for _ in 0..frames {
                let ids = Int64Array::from_iter_values(next..next + 100);
                next += 100;
                let batch =
                    RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(ids)]).expect("batch");
                let (_, data) = generator
                    .encode(&batch, &mut tracker, &options, &mut context)
                    .expect("encode");
                writer
                    .push(Bytes::from(data.ipc_message), Bytes::from(data.arrow_data))
                    .await
                    .expect("frame");
            }
            writer.finish().await.expect("finish");
        }
        store.seal("l").expect("seal");
        store.link("l").expect("link")
    }

    async fn read_ids(mut chunks: mpsc::Receiver<Result<Chunk>>) -> Vec<i64> {
        let mut ids = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            if let Chunk::Batch(batch, _) = chunk.expect("chunk") {
                let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
                ids.extend(column.expect("ids").values().iter().copied());
            }
        }
        ids
    }

    fn shuffled(rank: u32, world_size: u32, epoch: u64, batch_rows: u64) -> ShardSpec {
        ShardSpec {
            rank,
            world_size,
            epoch,
            seed: 5,
            batch_rows,
            shuffle: true,
            drop_last: true,
            start_batch: 0,
        }
    }

    /// The ids of the first batch of a stream.
    async fn first_batch(chunks: &mut mpsc::Receiver<Result<Chunk>>) -> Vec<i64> {
        while let Some(chunk) = chunks.recv().await {
            if let Chunk::Batch(batch, _) = chunk.expect("chunk") {
                let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
                return column.expect("ids").values().to_vec();
            }
        }
        panic!("the stream ended before its first batch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranks_of_an_epoch_share_one_decoded_shuffle() {
        let store = Store::new(StoreConfig::default());
        let link = sealed_link(&store, 3, 4).await;
        let memory = store.read_memory().clone();
        let world = 4;
        for epoch in 0..2 {
            let mut streams: Vec<_> = (0..world)
                .map(|rank| {
                    read_shard(
                        Arc::clone(&link),
                        shuffled(rank, world, epoch, 25),
                        ReadMode::WaitForSeal,
                        None,
                        memory.clone(),
                    )
                })
                .collect();
            // Every rank is now inside the epoch's one window, and it was built once.
            let mut ids = Vec::new();
            for stream in &mut streams {
                ids.extend(first_batch(stream).await);
            }
            assert_eq!(memory.shuffle_windows_built(), epoch + 1);
            for stream in streams {
                ids.extend(read_ids(stream).await);
            }
            assert_eq!(
                memory.shuffle_windows_built(),
                epoch + 1,
                "one build per epoch"
            );
            ids.sort_unstable();
            assert_eq!(ids, (0..1200).collect::<Vec<_>>());
        }
        // Every window and batch let its memory go.
        assert_eq!(
            store.memory().used(),
            12 * link.snapshot().partitions[0].frame_bytes()[0]
        );
    }

    /// Joining is an optimisation: with the memory free it copies the parts into one batch and
    /// holds the copy's bytes; without, it gives the parts back untouched, never waiting.
    #[tokio::test]
    async fn try_join_joins_within_the_budget_and_otherwise_gives_the_parts_back() {
        let store = Store::new(StoreConfig {
            memory_limit: Some(10_000),
            ..Default::default()
        });
        let link = store
            .create_link("j", None, crate::LinkOptions::default(), false)
            .expect("link");
        let memory = store.read_memory().clone();
        let part = |start: i64| {
            let ids = Int64Array::from_iter_values(start..start + 100);
            let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
            (
                RecordBatch::try_new(schema, vec![Arc::new(ids)]).expect("batch"),
                Held::default(),
            )
        };
        let parts = vec![part(0), part(100), part(200)];
        let (joined, held) = memory
            .try_join(&link, parts, 2_400)
            .expect("no error")
            .expect("joined within the budget");
        assert_eq!(joined.num_rows(), 300);
        let ids = joined
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("ids");
        assert!(ids.values().iter().copied().eq(0..300));
        assert_eq!(memory.pool.used(), 2_400, "the copy's bytes are held");
        drop(held);
        assert_eq!(memory.pool.used(), 0);
        let started = std::time::Instant::now();
        let back = memory
            .try_join(&link, vec![part(0), part(100)], 20_000)
            .expect("no error")
            .expect_err("past the budget: the parts come back");
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].0.num_rows(), 100);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "it did not wait"
        );
        assert_eq!(memory.pool.used(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_larger_than_the_window_shuffles_in_windows() {
        let store = Store::new(StoreConfig {
            // About three frames of 100 rows a window.
            shuffle_window: Some(4500),
            ..Default::default()
        });
        let link = sealed_link(&store, 3, 4).await;
        let memory = store.read_memory().clone();
        let world = 2;
        let read_epoch = |epoch| {
            let reads = (0..world).map(|rank| {
                read_ids(read_shard(
                    Arc::clone(&link),
                    shuffled(rank, world, epoch, 50),
                    ReadMode::WaitForSeal,
                    None,
                    memory.clone(),
                ))
            });
            futures::future::join_all(reads)
        };
        let first = read_epoch(0).await;
        assert!(
            memory.shuffle_windows_built() >= 4,
            "12 frames in windows of 3"
        );
        let mut all: Vec<i64> = first.iter().flatten().copied().collect();
        assert_ne!(all, (0..1200).collect::<Vec<_>>(), "shuffled");
        all.sort_unstable();
        assert_eq!(all, (0..1200).collect::<Vec<_>>(), "every row once");
        // Deterministic in (seed, epoch), and another epoch is another order.
        assert_eq!(read_epoch(0).await, first);
        let second = read_epoch(1).await;
        assert_ne!(second, first);
        let mut all: Vec<i64> = second.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_read_that_cannot_get_memory_fails_with_the_numbers() {
        let store = Store::new(StoreConfig::default());
        let link = sealed_link(&store, 1, 2).await;
        // A pool already full: the order of a shuffled epoch (4 bytes a row) does not fit.
        let pool = MemoryPool::new(Some(100));
        let memory = ReadMemory {
            pool: Arc::clone(&pool),
            spiller: None,
            shuffle_window: None,
            wait: Duration::from_millis(50),
            windows_built: Default::default(),
        };
        let mut chunks = read_shard(
            link,
            shuffled(0, 1, 0, 10),
            ReadMode::WaitForSeal,
            None,
            memory,
        );
        let mut error = None;
        while let Some(chunk) = chunks.recv().await {
            if let Err(e) = chunk {
                error = Some(e);
            }
        }
        let error = error.expect("refused");
        assert!(
            matches!(error, StoreError::ReadMemory { needed: 800, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("--memory-limit"), "{error}");
        assert_eq!(pool.used(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranks_share_one_evaluation_of_a_filter_per_frame() {
        let store = Store::new(StoreConfig::default());
        let link = sealed_link(&store, 3, 4).await;
        let filter = Arc::new(EvenIds {
            columns: vec![0],
            frames: AtomicUsize::new(0),
        });
        let shared: Arc<dyn RowFilter> = filter.clone();
        let planner: QueryPlanner = Arc::new(move |_: &SchemaRef| {
            Ok(ReadQuery {
                projection: None,
                filter: Some(Arc::clone(&shared)),
            })
        });
        let world = 4;
        for epoch in 0..2 {
            let reads = (0..world).map(|rank| {
                let spec = ShardSpec {
                    rank,
                    world_size: world,
                    epoch,
                    seed: 1,
                    batch_rows: 25,
                    shuffle: true,
                    drop_last: true,
                    start_batch: 0,
                };
                read_ids(read_shard(
                    Arc::clone(&link),
                    spec,
                    ReadMode::WaitForSeal,
                    Some(Arc::clone(&planner)),
                    store.read_memory().clone(),
                ))
            });
            let mut ids: Vec<i64> = futures::future::join_all(reads)
                .await
                .into_iter()
                .flatten()
                .collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..1200).step_by(2).collect::<Vec<_>>());
        }
        // 12 frames, evaluated once for four ranks and two epochs.
        assert_eq!(filter.frames.load(Ordering::SeqCst), 12);
    }

    /// Passes the ids whose hash, salted, falls below `percent` of 100: a random selection that
    /// is the same on every evaluation.
    struct Selected {
        columns: Vec<usize>,
        salt: u64,
        percent: u64,
        key: String,
    }

    impl Selected {
        fn passes(&self, id: i64) -> bool {
            let hash = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.salt;
            hash % 100 < self.percent
        }
    }

    impl RowFilter for Selected {
        fn columns(&self) -> &[usize] {
            &self.columns
        }

        fn evaluate(&self, batch: &RecordBatch) -> std::result::Result<BooleanArray, String> {
            let ids = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or("not int64")?;
            Ok(ids.iter().map(|id| id.map(|id| self.passes(id))).collect())
        }

        fn key(&self) -> &str {
            &self.key
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// The shard plan over a filter's selection keeps its promises: equal batch counts of
        /// exactly `batch_rows`, only selected rows; with drop_last each at most once, and
        /// without it every selected row at least once, repeats only from the last round's wrap.
        #[test]
        fn filtered_shards_are_equal_disjoint_and_complete(
            partitions in 1i64..4, frames in 1i64..4, world in 1u32..5, batch_rows in 1u64..40,
            drop_last: bool, shuffle: bool, start in 0u64..3, salt: u64, percent in 0u64..=100,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let (ranks, selected) = runtime.block_on(async {
                let store = Store::new(StoreConfig::default());
                let link = sealed_link(&store, partitions, frames).await;
                let filter = Arc::new(Selected {
                    columns: vec![0],
                    salt,
                    percent,
                    key: format!("selected {salt} {percent}"),
                });
                let selected: Vec<i64> = (0..partitions * frames * 100)
                    .filter(|id| filter.passes(*id))
                    .collect();
                let shared: Arc<dyn RowFilter> = filter;
                let planner: QueryPlanner = Arc::new(move |_: &SchemaRef| {
                    Ok(ReadQuery { projection: None, filter: Some(Arc::clone(&shared)) })
                });
                let mut ranks = Vec::new();
                for rank in 0..world {
                    let spec = ShardSpec {
                        rank, world_size: world, epoch: 1, seed: 9, batch_rows, shuffle,
                        drop_last, start_batch: start,
                    };
                    let mut chunks = read_shard(
                        Arc::clone(&link), spec, ReadMode::WaitForSeal,
                        Some(Arc::clone(&planner)), store.read_memory().clone(),
                    );
                    let mut batches = Vec::new();
                    while let Some(chunk) = chunks.recv().await {
                        if let Chunk::Batch(batch, _) = chunk.expect("chunk") {
                            let ids = batch.column(0).as_any().downcast_ref::<Int64Array>();
                            batches.push(ids.expect("ids").values().to_vec());
                        }
                    }
                    ranks.push(batches);
                }
                (ranks, selected)
            });
            let counts: Vec<usize> = ranks.iter().map(Vec::len).collect();
            proptest::prop_assert!(counts.iter().all(|c| *c == counts[0]), "counts {:?}", counts);
            proptest::prop_assert!(ranks.iter().flatten().all(|b| b.len() as u64 == batch_rows));
            let n = selected.len() as u64;
            let mut seen = std::collections::HashMap::<i64, u64>::new();
            for id in ranks.iter().flatten().flatten() {
                *seen.entry(*id).or_default() += 1;
            }
            proptest::prop_assert!(seen.keys().all(|id| selected.binary_search(id).is_ok()), "an unselected row was read");
            let read: u64 = seen.values().sum();
            let round = batch_rows * u64::from(world);
            if drop_last {
                proptest::prop_assert!(seen.values().all(|c| *c == 1), "a row read twice");
                proptest::prop_assert_eq!(read, (n / round).saturating_sub(start) * round);
            } else if start == 0 {
                proptest::prop_assert_eq!(seen.len() as u64, n, "a selected row never read");
                proptest::prop_assert!(read - n < round.max(1), "more repeats than one round's wrap");
            }
        }
    }
}
