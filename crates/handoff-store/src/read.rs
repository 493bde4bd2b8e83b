//! Producing what a reader asked for: whole partitions, or one rank's shard.

use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch};
use arrow_schema::{Schema, SchemaRef};
use tokio::sync::mpsc;

use crate::error::{Result, StoreError};
use crate::ipc::{Frame, SchemaFrame, guard_panic};
use crate::link::{FrameSelection, Link, LinkSnapshot, LinkState, Partition};
use crate::shard::{ShardSpec, permutation};

/// One item of a read stream. The first item is always the schema.
#[derive(Debug, Clone)]
pub enum Chunk {
    Schema(SchemaFrame),
    /// A stored frame, replayed byte for byte.
    Frame(Frame),
    /// Rows that had to be cut or mixed, to be encoded on the way out.
    Batch(RecordBatch),
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
/// Chunks buffered ahead of a slow reader.
const READ_AHEAD: usize = 4;

/// Start reading one rank's shard. Errors arrive in the stream; the producer stops when the
/// receiver is dropped.
pub fn read_shard(
    link: Arc<Link>,
    spec: ShardSpec,
    mode: ReadMode,
    planner: Option<QueryPlanner>,
) -> mpsc::Receiver<Result<Chunk>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        let mut out = Out {
            tx,
            sent_schema: false,
            gone: false,
        };
        // A panic must reach the reader as an error, not as a stream that just ends short.
        let task = std::panic::AssertUnwindSafe(shard_task(&link, &spec, mode, planner, &mut out));
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

struct Out {
    tx: mpsc::Sender<Result<Chunk>>,
    sent_schema: bool,
    /// The reader went away before the end.
    gone: bool,
}

impl Out {
    /// Returns false once the reader has gone away.
    async fn send(&mut self, chunk: Chunk) -> bool {
        self.gone = self.tx.send(Ok(chunk)).await.is_err();
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
                let mut rows = RowSource::new(link.name(), schema, query.clone())?;
                if spec.batch_rows == 0 {
                    return contiguous(spec, &index, &mut rows, out).await;
                }
                if spec.shuffle {
                    return shuffled(spec, &index, &mut rows, out).await;
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
    if spec.shuffle {
        let order = permutation(index.total, spec.seed, spec.epoch);
        for chunk in order[start as usize..end as usize].chunks(GATHER_ROWS as usize) {
            let batch = rows.gather(index, chunk).await?;
            if !out.send(Chunk::Batch(batch)).await {
                return Ok(());
            }
        }
        return Ok(());
    }
    let mut pos = start;
    while pos < end {
        let f = index.locate(pos);
        let (fs, fe) = (index.starts[f], index.starts[f] + index.frames[f].rows);
        let take_end = fe.min(end);
        let chunk = if pos == fs && take_end == fe && rows.query.is_everything() {
            Chunk::Frame(index.fetch(f).await?)
        } else {
            Chunk::Batch(
                rows.decoded(index, f)
                    .await?
                    .slice((pos - fs) as usize, (take_end - pos) as usize),
            )
        };
        if !out.send(chunk).await {
            return Ok(());
        }
        pos = take_end;
    }
    Ok(())
}

async fn shuffled(
    spec: &ShardSpec,
    index: &FrameIndex,
    rows: &mut RowSource,
    out: &mut Out,
) -> Result<()> {
    let n = index.total;
    let order = permutation(n, spec.seed, spec.epoch);
    let b = spec.batch_rows;
    let mut picked = Vec::with_capacity(b as usize);
    for k in spec.start_batch..spec.batches_per_rank(n) {
        let start = spec.batch_start(k).ok_or_else(|| past_the_end(spec))?;
        picked.clear();
        picked.extend((start..start + b).map(|p| order[(p % n) as usize]));
        let batch = rows.gather(index, &picked).await?;
        if !out.send(Chunk::Batch(batch)).await {
            return Ok(());
        }
    }
    Ok(())
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

/// Decodes frames on demand (only the asked-for columns, only the passing rows) and keeps them
/// for the rest of the read.
struct RowSource {
    link: String,
    /// The link's schema, which frames are encoded with.
    stored: SchemaRef,
    /// What the reader gets.
    schema: SchemaRef,
    query: ReadQuery,
    decoded: std::collections::HashMap<usize, RecordBatch>,
}

impl RowSource {
    fn new(link: &str, stored: SchemaRef, query: ReadQuery) -> Result<Self> {
        Ok(Self {
            link: link.to_string(),
            schema: query.output_schema(&stored)?,
            stored,
            query,
            decoded: Default::default(),
        })
    }

    async fn decoded(&mut self, index: &FrameIndex, f: usize) -> Result<&RecordBatch> {
        if !self.decoded.contains_key(&f) {
            let frame = index.fetch(f).await?;
            let mut batch = frame
                .decode_columns(&self.stored, self.query.projection.as_deref())
                .map_err(|e| corrupt(&self.link, e))?;
            if let Some(selection) = &index.frames[f].selection {
                batch = arrow_select::filter::filter_record_batch(&batch, selection)
                    .map_err(|e| corrupt(&self.link, e))?;
            }
            self.decoded.insert(f, batch);
        }
        Ok(&self.decoded[&f])
    }

    /// `len` rows from position `start`, wrapping past the end to the beginning.
    async fn range_wrapping(&mut self, index: &FrameIndex, start: u64, len: u64) -> Result<Chunk> {
        let n = index.total;
        let mut pieces = Vec::new();
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
            // Sequential reads never return to earlier frames, except after wrapping.
            self.decoded.retain(|k, _| *k + 1 >= f);
            pieces.push(
                self.decoded(index, f)
                    .await?
                    .slice((pos - fs) as usize, take as usize),
            );
            left -= take;
            pos = (pos + take) % n;
        }
        if pieces.len() == 1 {
            return Ok(Chunk::Batch(pieces.remove(0)));
        }
        let batch = arrow_select::concat::concat_batches(&self.schema, &pieces).map_err(|e| {
            StoreError::Corrupt {
                link: self.link.clone(),
                detail: e.to_string(),
            }
        })?;
        Ok(Chunk::Batch(batch))
    }

    /// The given rows, in the given order.
    async fn gather(&mut self, index: &FrameIndex, rows: &[u64]) -> Result<RecordBatch> {
        let mut slots: Vec<usize> = Vec::new();
        let mut slot_of = std::collections::HashMap::new();
        let mut picks = Vec::with_capacity(rows.len());
        for &row in rows {
            let f = index.locate(row);
            let slot = *slot_of.entry(f).or_insert_with(|| {
                slots.push(f);
                slots.len() - 1
            });
            picks.push((slot, (row - index.starts[f]) as usize));
        }
        for &f in &slots {
            self.decoded(index, f).await?;
        }
        let batches: Vec<&RecordBatch> = slots.iter().map(|f| &self.decoded[f]).collect();
        let link = self.link.clone();
        guard_panic(|| {
            arrow_select::interleave::interleave_record_batch(&batches, &picks).map_err(|e| {
                StoreError::Corrupt {
                    link,
                    detail: e.to_string(),
                }
            })
        })
    }
}

/// One committed partition by its position in commit order, with the link schema.
/// One committed partition, by its position in commit order, if the link is still at the
/// `generation` the caller's ticket was issued for.
pub fn read_partition(
    link: &Link,
    index: u64,
    generation: u64,
) -> Result<(SchemaFrame, Arc<crate::link::Partition>)> {
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
            writer.finish().expect("finish");
        }
        store.seal("l").expect("seal");
        store.link("l").expect("link")
    }

    async fn read_ids(mut chunks: mpsc::Receiver<Result<Chunk>>) -> Vec<i64> {
        let mut ids = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            if let Chunk::Batch(batch) = chunk.expect("chunk") {
                let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
                ids.extend(column.expect("ids").values().iter().copied());
            }
        }
        ids
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
}
