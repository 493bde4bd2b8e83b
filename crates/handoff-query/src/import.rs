//! Fill a link from Parquet files that already sit in object storage, through DataFusion's
//! listing table. Each of DataFusion's output partitions becomes one link partition, written in
//! parallel through the same path as a DoPut, so the link's memory budget and policy apply. All
//! partitions are staged and committed together: an import that fails leaves nothing behind.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_schema::SchemaRef;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::{StreamExt, TryStreamExt};
use handoff_store::PutTarget;
use handoff_store::{ObjectStorage, Store, StoreError};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::task::JoinSet;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "'{url}' is not a file or object storage URL ({source}); use s3://bucket/path/*.parquet or file:///dir"
    )]
    InvalidUrl {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the Parquet files: {0}")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "the import did not fit in memory: {0}. An import holds every row until it commits; \
         give the link the spill policy (serve --memory-policy spill --spill-url URL) to import more than the budget"
    )]
    Memory(StoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImportError {
    /// Memory errors under `reject` and `wait` get the import's own way out.
    fn explained(self) -> Self {
        match self {
            ImportError::Store(
                e @ (StoreError::MemoryExhausted { .. } | StoreError::MemoryWaitTimeout { .. }),
            ) => ImportError::Memory(e),
            other => other,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImportOutcome {
    pub link: String,
    pub files: u64,
    pub partitions: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// DataFusion expands globs only in local paths; object storage URLs are split here into the
/// listing prefix and a pattern for the rest (`s3://bucket/path/` + `*.parquet`).
fn listing_url(url: &str) -> Result<ListingTableUrl, ImportError> {
    let invalid = |source: Box<dyn std::error::Error + Send + Sync>| ImportError::InvalidUrl {
        url: handoff_store::echo(url),
        source,
    };
    let Some(star) = url.find(['*', '?', '[']) else {
        return ListingTableUrl::parse(url).map_err(|e| invalid(e.into()));
    };
    let cut = url[..star].rfind('/').map(|i| i + 1).unwrap_or(0);
    let (prefix, pattern) = url.split_at(cut);
    let prefix = url::Url::parse(prefix).map_err(|e| invalid(e.into()))?;
    let pattern = glob::Pattern::new(pattern).map_err(|e| invalid(e.into()))?;
    ListingTableUrl::try_new(prefix, Some(pattern)).map_err(|e| invalid(e.into()))
}

fn read_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ImportError {
    ImportError::Read(e.into())
}

/// Largest partition an import writes. Smaller partitions let the spill policy move finished
/// ones while the import goes on, and give readers more endpoints.
const MAX_PARTITION_BYTES: u64 = 64 << 20;

/// Staged partition ids of one import: far above what appends use, distinct per import, and in
/// file order, because commits publish partitions by id. Stream `s` writes ids
/// `base + s * STREAM_STRIDE + n`.
const STREAM_STRIDE: u64 = 1 << 24;

fn partition_base() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (1 << 62) | ((nanos & ((1 << 28) - 1)) << 32)
}

/// How large one partition may grow. Every stream holds one unfinished partition, which cannot
/// spill; together they take at most half of the tightest limit, so finished partitions are left
/// to move and the import fits the budget.
fn partition_cap(store: &Store, link: &str, streams: usize) -> u64 {
    let link_limit = store.link(link).ok().and_then(|l| l.stats().memory_limit);
    [store.memory().limit(), link_limit]
        .into_iter()
        .flatten()
        .map(|limit| limit / (2 * streams.max(1) as u64))
        .fold(MAX_PARTITION_BYTES, u64::min)
        .max(1)
}

/// The attempts an import staged and has not committed. They are dropped when the last holder
/// goes away, so a failed or cancelled import (a client that hangs up) leaves nothing staged.
struct StagedAttempts {
    store: Arc<Store>,
    link: String,
    /// (partition, rows, bytes) of every staged attempt not yet committed.
    attempts: Mutex<Vec<(u64, u64, u64)>>,
}

impl StagedAttempts {
    fn record(&self, partition: u64, rows: u64, bytes: u64) {
        self.attempts.lock().push((partition, rows, bytes));
    }
}

impl Drop for StagedAttempts {
    fn drop(&mut self) {
        let staged: Vec<(u64, u64)> = self
            .attempts
            .get_mut()
            .iter()
            .map(|(p, _, _)| (*p, 0))
            .collect();
        if !staged.is_empty() {
            let _ = self.store.abort(&self.link, &staged);
        }
    }
}

/// One of DataFusion's output streams, written as a run of staged partitions of at most `cap`
/// bytes each.
struct StreamWrite {
    store: Arc<Store>,
    staged: Arc<StagedAttempts>,
    create: bool,
    first_id: u64,
    cap: u64,
    max_flight_data_size: usize,
    owns: Option<Owns>,
}

/// Which partition ids this server may stage: over replicas, only those it owns (the
/// placement hashes each id to one replica).
pub type Owns = Arc<dyn Fn(u64) -> bool + Send + Sync>;

impl StreamWrite {
    /// The first id from `id` up that this server may stage, within the stream's stride.
    fn next_id(&self, mut id: u64) -> Result<u64, ImportError> {
        loop {
            if id - self.first_id >= STREAM_STRIDE {
                return Err(ImportError::Invalid(format!(
                    "the import would need more than {STREAM_STRIDE} partition ids per stream; raise the memory limit"
                )));
            }
            match &self.owns {
                Some(owns) if !owns(id) => id += 1,
                _ => return Ok(id),
            }
        }
    }
}

impl StreamWrite {
    async fn run(self, batches: SendableRecordBatchStream) -> Result<(), ImportError> {
        let link = self.staged.link.clone();
        let mut data = FlightDataEncoderBuilder::new()
            .with_max_flight_data_size(self.max_flight_data_size)
            .with_schema(batches.schema())
            .build(batches.map_err(|e| FlightError::ExternalError(Box::new(e))));
        // The encoder sends the schema first; every partition starts with it.
        let schema = data
            .next()
            .await
            .ok_or_else(|| read_error("the Parquet scan ended before its schema"))?
            .map_err(read_error)?;
        let mut id = self.next_id(self.first_id)?;
        let begin = |id: u64| {
            let target = PutTarget::Staged {
                partition: id,
                attempt: 0,
            };
            self.store.begin_put(&link, target, self.create)
        };
        let mut writer = begin(id)?;
        writer
            .push(schema.data_header.clone(), schema.data_body.clone())
            .await?;
        while let Some(message) = data.next().await {
            let message = message.map_err(read_error)?;
            if writer.bytes() >= self.cap {
                let next = self.next_id(id + 1)?;
                let done = std::mem::replace(&mut writer, begin(next)?);
                let finished = done.finish().await?;
                self.staged.record(id, finished.rows, finished.bytes);
                id = next;
                writer
                    .push(schema.data_header.clone(), schema.data_body.clone())
                    .await?;
            }
            writer.push(message.data_header, message.data_body).await?;
        }
        let finished = writer.finish().await?;
        self.staged.record(id, finished.rows, finished.bytes);
        Ok(())
    }
}

/// The Parquet files under a URL (a file, a directory, or a glob), with their sizes, and the
/// schema they make together: what a planner needs to split an import over replicas.
#[derive(Debug, Clone)]
pub struct ParquetListing {
    /// Each file's full URL and size in bytes, in path order.
    pub files: Vec<(String, u64)>,
    pub schema: SchemaRef,
}

fn parquet_session(parallelism: usize) -> SessionContext {
    // Keep the files' own types: readers expect Utf8 where Spark wrote strings, not views.
    let config = SessionConfig::new()
        .with_target_partitions(parallelism.max(1))
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        .set_bool("datafusion.execution.parquet.binary_as_string", false);
    SessionContext::new_with_config(config)
}

fn parquet_options() -> ListingOptions {
    ListingOptions::new(Arc::new(
        ParquetFormat::default().with_force_view_types(false),
    ))
    .with_file_extension(".parquet")
}

/// List the Parquet files at `url` and infer their schema (from their footers only).
pub async fn list_parquet(url: &str) -> Result<ParquetListing, ImportError> {
    let table_url = listing_url(url)?;
    let store_url = table_url.object_store();
    let objects = ObjectStorage::from_url(store_url.as_str())?;
    let ctx = parquet_session(1);
    ctx.register_object_store(store_url.as_ref(), Arc::clone(objects.object_store()));
    let mut files: Vec<(String, u64)> = table_url
        .list_all_files(&ctx.state(), objects.object_store().as_ref(), ".parquet")
        .await
        .map_err(read_error)?
        .map_ok(|meta| {
            let base = store_url.as_str().trim_end_matches('/');
            (format!("{base}/{}", meta.location), meta.size)
        })
        .try_collect()
        .await
        .map_err(read_error)?;
    if files.is_empty() {
        return Err(ImportError::Invalid(format!(
            "no .parquet files at '{}'; check the path, the glob and the credentials",
            handoff_store::echo(url)
        )));
    }
    files.sort();
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(parquet_options())
        .infer_schema(&ctx.state())
        .await
        .map_err(read_error)?;
    let schema = config
        .file_schema
        .clone()
        .ok_or_else(|| read_error("the Parquet files' schema could not be inferred"))?;
    Ok(ParquetListing { files, schema })
}

/// What [`stage_parquet`] staged and left for a planner to commit: `(partition, rows, bytes)`
/// of each attempt (attempt 0) with rows.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StagedImport {
    pub link: String,
    pub files: u64,
    pub attempts: Vec<(u64, u64, u64)>,
}

/// Stage these Parquet files (full URLs, all in one object store) into `link`, read as
/// `schema`, under partition ids that `owns` accepts, for a planner to commit with the other
/// replicas' parts. Nothing is committed; on failure nothing stays staged.
pub async fn stage_parquet(
    store: &Arc<Store>,
    link: &str,
    files: &[String],
    schema: SchemaRef,
    parallelism: usize,
    max_flight_data_size: usize,
    owns: Owns,
) -> Result<StagedImport, ImportError> {
    let Some(first) = files.first() else {
        return Ok(StagedImport {
            link: link.to_string(),
            files: 0,
            attempts: Vec::new(),
        });
    };
    let urls = files
        .iter()
        .map(|f| listing_url(f))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(other) = urls
        .iter()
        .find(|u| u.object_store() != urls[0].object_store())
    {
        return Err(ImportError::Invalid(format!(
            "the files of one import are in one object store: {} and {} are not",
            handoff_store::echo(first),
            handoff_store::echo(other.as_str())
        )));
    }
    let store_url = urls[0].object_store();
    let objects = ObjectStorage::from_url(store_url.as_str())?;
    let ctx = parquet_session(parallelism);
    ctx.register_object_store(store_url.as_ref(), Arc::clone(objects.object_store()));
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(parquet_options())
        .with_schema(schema);
    let staged = stage_table(
        store,
        link,
        &ctx,
        config,
        false,
        max_flight_data_size,
        Some(owns),
    )
    .await?;
    let attempts = staged.attempts.lock().clone();
    // Those with rows stay staged for the planner's commit; empty ones go with `staged`.
    staged.attempts.lock().retain(|(_, rows, _)| *rows == 0);
    drop(staged);
    Ok(StagedImport {
        link: link.to_string(),
        files: files.len() as u64,
        attempts: attempts
            .into_iter()
            .filter(|(_, rows, _)| *rows > 0)
            .collect(),
    })
}

/// Run the scan of `config` and stage every stream's output; the staged attempts are dropped
/// when the returned holder is, unless taken out of it.
async fn stage_table(
    store: &Arc<Store>,
    link: &str,
    ctx: &SessionContext,
    config: ListingTableConfig,
    create: bool,
    max_flight_data_size: usize,
    owns: Option<Owns>,
) -> Result<Arc<StagedAttempts>, ImportError> {
    let table = ListingTable::try_new(config).map_err(read_error)?;
    let frame = ctx.read_table(Arc::new(table)).map_err(read_error)?;
    let streams = frame
        .execute_stream_partitioned()
        .await
        .map_err(read_error)?;
    let cap = partition_cap(store, link, streams.len());
    let base = partition_base();
    let staged = Arc::new(StagedAttempts {
        store: Arc::clone(store),
        link: link.to_string(),
        attempts: Mutex::new(Vec::new()),
    });
    // A plain Parquet scan's streams decode on whoever polls them: each gets its own task, or
    // one thread would decode every file. Dropping the set (a cancelled import) stops them.
    let mut tasks = JoinSet::new();
    for (s, batches) in streams.into_iter().enumerate() {
        let write = StreamWrite {
            store: Arc::clone(store),
            staged: Arc::clone(&staged),
            create,
            first_id: base + s as u64 * STREAM_STRIDE,
            cap,
            max_flight_data_size,
            owns: owns.clone(),
        };
        tasks.spawn(write.run(batches));
    }
    while let Some(done) = tasks.join_next().await {
        let failed = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => ImportError::Read(format!("an import task failed: {e}").into()),
        };
        // The other streams stop; their staged partitions are dropped with `staged`.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        return Err(failed.explained());
    }
    Ok(staged)
}

/// Import `url` (a Parquet file, a directory, or a glob such as `s3://bucket/path/*.parquet`)
/// into `link`, creating it when `create`. `parallelism` streams are read and written at once,
/// each on its own task.
pub async fn import_parquet(
    store: &Arc<Store>,
    link: &str,
    url: &str,
    create: bool,
    parallelism: usize,
    max_flight_data_size: usize,
) -> Result<ImportOutcome, ImportError> {
    let table_url = listing_url(url)?;
    let store_url = table_url.object_store();
    let objects = ObjectStorage::from_url(store_url.as_str())?;
    let ctx = parquet_session(parallelism);
    ctx.register_object_store(store_url.as_ref(), Arc::clone(objects.object_store()));
    let files = table_url
        .list_all_files(&ctx.state(), objects.object_store().as_ref(), ".parquet")
        .await
        .map_err(read_error)?
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .map_err(read_error)?;
    if files == 0 {
        return Err(ImportError::Invalid(format!(
            "no .parquet files at '{url}'; check the path, the glob and the credentials"
        )));
    }
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(parquet_options())
        .infer_schema(&ctx.state())
        .await
        .map_err(read_error)?;
    let staged = stage_table(
        store,
        link,
        &ctx,
        config,
        create,
        max_flight_data_size,
        None,
    )
    .await?;
    let mut written = staged.attempts.lock().clone();
    written.sort_unstable();
    // Empty partitions (a stream announces its schema even without rows) are not committed.
    let attempts: Vec<(u64, u64)> = written
        .iter()
        .filter(|(_, rows, _)| *rows > 0)
        .map(|(partition, _, _)| (*partition, 0))
        .collect();
    let committed = store.commit(link, &attempts, false)?;
    staged.attempts.lock().retain(|(_, rows, _)| *rows == 0);
    drop(staged);
    Ok(ImportOutcome {
        link: link.to_string(),
        files,
        partitions: committed.len() as u64,
        rows: committed.iter().map(|o| o.rows).sum(),
        bytes: committed.iter().map(|o| o.bytes).sum(),
    })
}
