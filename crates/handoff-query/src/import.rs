//! Fill a link from Parquet files that already sit in object storage, through DataFusion's
//! listing table. Each of DataFusion's output partitions becomes one link partition, written in
//! parallel through the same path as a DoPut, so the link's memory budget and policy apply. All
//! partitions are staged and committed together: an import that fails leaves nothing behind.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::{StreamExt, TryStreamExt};
use handoff_store::link::PutTarget;
use handoff_store::{ObjectStorage, Store, StoreError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Invalid(String),
    #[error("reading the Parquet files: {0}")]
    Read(String),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    let invalid = |why: String| {
        ImportError::Invalid(format!(
            "'{url}' is not a file or object storage URL ({why}); use s3://bucket/path/*.parquet or file:///dir"
        ))
    };
    let Some(star) = url.find(['*', '?', '[']) else {
        return ListingTableUrl::parse(url).map_err(|e| invalid(e.strip_backtrace()));
    };
    let cut = url[..star].rfind('/').map(|i| i + 1).unwrap_or(0);
    let (prefix, pattern) = url.split_at(cut);
    let prefix = url::Url::parse(prefix).map_err(|e| invalid(e.to_string()))?;
    let pattern = glob::Pattern::new(pattern).map_err(|e| invalid(e.to_string()))?;
    ListingTableUrl::try_new(prefix, Some(pattern)).map_err(|e| invalid(e.strip_backtrace()))
}

fn read_error(e: impl std::fmt::Display) -> ImportError {
    ImportError::Read(e.to_string())
}

/// Staged partition ids of one import: far above what appends use, and distinct per import.
fn partition_base() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (1 << 62) | ((nanos & ((1 << 40) - 1)) << 16)
}

/// Import `url` (a Parquet file, a directory, or a glob such as `s3://bucket/path/*.parquet`)
/// into `link`, creating it when `create`. `parallelism` partitions are read and written at once.
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
    // Keep the files' own types: readers expect Utf8 where Spark wrote strings, not views.
    let config = SessionConfig::new()
        .with_target_partitions(parallelism.max(1))
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        .set_bool("datafusion.execution.parquet.binary_as_string", false);
    let ctx = SessionContext::new_with_config(config);
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
    let options = ListingOptions::new(Arc::new(
        ParquetFormat::default().with_force_view_types(false),
    ))
    .with_file_extension(".parquet");
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(options)
        .infer_schema(&ctx.state())
        .await
        .map_err(read_error)?;
    let table = ListingTable::try_new(config).map_err(read_error)?;
    let frame = ctx.read_table(Arc::new(table)).map_err(read_error)?;
    let streams = frame
        .execute_stream_partitioned()
        .await
        .map_err(read_error)?;
    let base = partition_base();
    let staged_ids: Vec<(u64, u64)> = (0..streams.len() as u64).map(|i| (base + i, 0)).collect();
    let writes = streams.into_iter().enumerate().map(|(i, batches)| {
        let store = Arc::clone(store);
        let link = link.to_string();
        async move {
            let target = PutTarget::Staged {
                partition: base + i as u64,
                attempt: 0,
            };
            let mut writer = store.begin_put(&link, target, create)?;
            let schema = batches.schema();
            let mut data = FlightDataEncoderBuilder::new()
                .with_max_flight_data_size(max_flight_data_size)
                .with_schema(schema)
                .build(batches.map_err(|e| FlightError::ExternalError(Box::new(e))));
            while let Some(message) = data.next().await {
                let message = message.map_err(read_error)?;
                writer.push(message.data_header, message.data_body).await?;
            }
            let outcome = writer.finish()?;
            Ok::<_, ImportError>((base + i as u64, outcome.rows))
        }
    });
    let staged = futures::future::join_all(writes).await;
    let attempts: Vec<(u64, u64)> = staged
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|(_, rows)| *rows > 0)
        .map(|(partition, _)| (*partition, 0))
        .collect();
    if let Some(failed) = staged.into_iter().find_map(Result::err) {
        let _ = store.abort(link, &staged_ids);
        return Err(failed);
    }
    let committed = store.commit(link, &attempts, false)?;
    // Empty partitions were staged (every stream announces its schema) but not committed.
    let empty: Vec<(u64, u64)> = staged_ids
        .into_iter()
        .filter(|a| !attempts.contains(a))
        .collect();
    let _ = store.abort(link, &empty);
    Ok(ImportOutcome {
        link: link.to_string(),
        files,
        partitions: committed.len() as u64,
        rows: committed.iter().map(|o| o.rows).sum(),
        bytes: committed.iter().map(|o| o.bytes).sum(),
    })
}
