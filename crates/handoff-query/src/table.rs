//! A link as a DataFusion table: its committed partitions, in memory or spilled, scanned frame by
//! frame. Projection is pushed into the IPC decoder, so untouched columns are never decoded, and
//! filters are applied as each frame is decoded (DataFusion re-checks them: `Inexact`).
//! A link over several replicas adds the other replicas' parts ([`RemotePart`]), each scanned
//! as one more stream, with the projection pushed to the replica that holds it.

use std::fmt;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use futures::StreamExt;
use futures::stream::BoxStream;
use handoff_store::Partition;
use handoff_store::{Link, MemoryPool, StoreError};

/// Rows of a link that another process holds: another replica's part of a link over several.
/// The server implements it over Flight; this crate only scans it.
pub trait RemotePart: fmt::Debug + Send + Sync {
    /// Its committed rows.
    fn rows(&self) -> u64;

    /// Its rows with `columns` only, in that order (every column when `None`), in batches of
    /// about `batch_rows`.
    fn scan(
        &self,
        columns: Option<Vec<String>>,
        batch_rows: usize,
    ) -> BoxStream<'static, Result<RecordBatch>>;
}

/// One link's committed data at the moment the table was made.
#[derive(Debug)]
pub struct LinkTable {
    name: String,
    schema: SchemaRef,
    partitions: Vec<Arc<Partition>>,
    /// The server's budget, for aligning stored frames in place before scanning them.
    memory: Option<Arc<MemoryPool>>,
    /// Other replicas' parts of the link.
    remote: Vec<Arc<dyn RemotePart>>,
}

impl LinkTable {
    /// Scans align the stored frames they read once, in place, with memory from `pool` when it
    /// is free (else each decode copies a misaligned frame for a moment).
    pub fn with_memory(mut self, pool: Arc<MemoryPool>) -> Self {
        self.memory = Some(pool);
        self
    }

    /// The link as it is now; `None` while nothing was written (no schema yet).
    pub fn new(link: &Link) -> Option<Self> {
        let snapshot = link.snapshot();
        let schema = snapshot.schema.as_ref().map(|s| Arc::clone(&s.schema))?;
        Some(Self {
            name: link.name().to_string(),
            schema,
            partitions: snapshot.partitions.clone(),
            memory: None,
            remote: Vec::new(),
        })
    }

    /// A link over several replicas: this replica's part (`local`, which may hold no rows, and
    /// then no schema) and the others'. `schema` is the link's.
    pub fn over_replicas(
        name: &str,
        schema: SchemaRef,
        local: Option<&Link>,
        remote: Vec<Arc<dyn RemotePart>>,
    ) -> Self {
        let partitions = local
            .map(|link| link.snapshot().partitions.clone())
            .unwrap_or_default();
        Self {
            name: name.to_string(),
            schema,
            partitions,
            memory: None,
            remote,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn arrow_schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    pub fn rows(&self) -> u64 {
        let local: u64 = self
            .partitions
            .iter()
            .flat_map(|p| p.frame_rows().iter())
            .sum();
        self.remote
            .iter()
            .map(|part| part.rows())
            .fold(local, u64::saturating_add)
    }
}

fn external(e: StoreError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[async_trait]
impl TableProvider for LinkTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projected = match projection {
            Some(columns) => Arc::new(self.schema.project(columns)?),
            None => Arc::clone(&self.schema),
        };
        // Inexact pushdown keeps the filters' columns in the projection, so they evaluate on it.
        let filter = match conjunction(filters.iter().cloned()) {
            Some(expr) => {
                let df_schema = DFSchema::try_from(projected.as_ref().clone())?;
                Some(state.create_physical_expr(expr, &df_schema)?)
            }
            None => None,
        };
        let frames: Vec<(Arc<Partition>, usize)> = self
            .partitions
            .iter()
            .flat_map(|p| {
                p.frame_rows()
                    .iter()
                    .enumerate()
                    .filter(|(_, rows)| **rows > 0)
                    .map(move |(i, _)| (Arc::clone(p), i))
            })
            .collect();
        // Contiguous runs of frames, one per target partition, so scans use every core.
        let groups = state
            .config()
            .target_partitions()
            .max(1)
            .min(frames.len().max(1));
        let per_group = frames.len().div_ceil(groups).max(1);
        let streams: Vec<Arc<dyn PartitionStream>> = frames
            .chunks(per_group)
            .map(|chunk| {
                Arc::new(FrameScan {
                    link: self.name.clone(),
                    stored: Arc::clone(&self.schema),
                    schema: Arc::clone(&projected),
                    projection: projection.cloned(),
                    filter: filter.clone(),
                    frames: chunk.to_vec(),
                    memory: self.memory.clone(),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        let mut streams = streams;
        let batch_rows = state.config().batch_size().max(1);
        for part in self.remote.iter().filter(|part| part.rows() > 0) {
            streams.push(Arc::new(RemoteScan {
                link: self.name.clone(),
                part: Arc::clone(part),
                stored: Arc::clone(&self.schema),
                schema: Arc::clone(&projected),
                filter: filter.clone(),
                batch_rows,
            }) as Arc<dyn PartitionStream>);
        }
        let streams = if streams.is_empty() {
            vec![Arc::new(FrameScan {
                link: self.name.clone(),
                stored: Arc::clone(&self.schema),
                schema: Arc::clone(&projected),
                projection: projection.cloned(),
                filter,
                frames: Vec::new(),
                memory: None,
            }) as Arc<dyn PartitionStream>]
        } else {
            streams
        };
        Ok(Arc::new(StreamingTableExec::try_new(
            projected,
            streams,
            None,
            Vec::new(),
            false,
            limit,
        )?))
    }
}

/// One scan partition: some frames, decoded one at a time.
struct FrameScan {
    link: String,
    stored: SchemaRef,
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    filter: Option<Arc<dyn PhysicalExpr>>,
    frames: Vec<(Arc<Partition>, usize)>,
    memory: Option<Arc<MemoryPool>>,
}

impl fmt::Debug for FrameScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameScan")
            .field("link", &self.link)
            .field("frames", &self.frames.len())
            .field("projection", &self.projection)
            .finish()
    }
}

/// The rows of `batch` that pass `filter` (all without one).
fn keep(filter: &Option<Arc<dyn PhysicalExpr>>, batch: RecordBatch) -> Result<RecordBatch> {
    let Some(filter) = filter else {
        return Ok(batch);
    };
    let mask = filter.evaluate(&batch)?.into_array(batch.num_rows())?;
    let mask = mask
        .as_any()
        .downcast_ref::<arrow_array::BooleanArray>()
        .ok_or_else(|| DataFusionError::Internal("filter is not boolean".into()))?;
    Ok(datafusion::arrow::compute::filter_record_batch(
        &batch, mask,
    )?)
}

impl PartitionStream for FrameScan {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let stored = Arc::clone(&self.stored);
        let projection = self.projection.clone();
        let filter = self.filter.clone();
        let frames = self.frames.clone();
        let memory = self.memory.clone();
        let batches = futures::stream::iter(frames)
            .then(move |(partition, index)| {
                let (stored, projection, filter) =
                    (Arc::clone(&stored), projection.clone(), filter.clone());
                if let Some(pool) = &memory
                    && index == 0
                {
                    partition.realign_within(pool);
                }
                async move {
                    // A spilled frame comes back by a ranged GET; one frame is held at a time.
                    let frame = partition.frame(index).await.map_err(external)?;
                    let batch = frame
                        .decode_columns(&stored, projection.as_deref())
                        .map_err(external)?;
                    keep(&filter, batch)
                }
            })
            .filter(|batch| futures::future::ready(!matches!(batch, Ok(b) if b.num_rows() == 0)));
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            batches,
        ))
    }
}

/// One other replica's part, as one scan partition: fetched with the projection, then filtered
/// here (the replica gets no filter: DataFusion checks it here anyway).
struct RemoteScan {
    link: String,
    part: Arc<dyn RemotePart>,
    /// The link's schema, and the projected one this scan yields.
    stored: SchemaRef,
    schema: SchemaRef,
    filter: Option<Arc<dyn PhysicalExpr>>,
    batch_rows: usize,
}

impl fmt::Debug for RemoteScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteScan")
            .field("link", &self.link)
            .field("part", &self.part)
            .finish()
    }
}

impl PartitionStream for RemoteScan {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        // No columns asked (count(*)): the narrowest ask is one column, of which only the row
        // count is kept.
        let asked = match (names.is_empty(), self.stored.fields().first()) {
            (true, Some(first)) => Some(vec![first.name().clone()]),
            (true, None) => None,
            (false, _) => Some(names),
        };
        let filter = self.filter.clone();
        let out = Arc::clone(&schema);
        let batches = self
            .part
            .scan(asked, self.batch_rows)
            .map(move |batch| {
                let batch = batch?;
                // The replica's batch, as this table's schema says: same columns, same order.
                let columns = out
                    .fields()
                    .iter()
                    .map(|field| {
                        batch.column_by_name(field.name()).cloned().ok_or_else(|| {
                            DataFusionError::Execution(format!(
                                "a replica's part of a link came without column '{}'",
                                field.name()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let options =
                    arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                let batch = RecordBatch::try_new_with_options(Arc::clone(&out), columns, &options)?;
                keep(&filter, batch)
            })
            .filter(|batch| futures::future::ready(!matches!(batch, Ok(b) if b.num_rows() == 0)));
        Box::pin(RecordBatchStreamAdapter::new(schema, batches))
    }
}
