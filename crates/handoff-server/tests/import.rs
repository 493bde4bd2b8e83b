//! Parquet import within a memory budget, against a real server and real files: under `spill` an
//! import larger than the budget completes, under `wait` it waits for memory that is freed, and
//! under `reject` (or a wait that runs out) it fails with the reason and leaves nothing behind.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use datafusion::parquet::arrow::ArrowWriter;
use handoff_server::ServerConfig;
use handoff_store::{MemoryPolicy, ObjectStorage, StoreConfig};
use tonic::Code;

const FILES: i64 = 8;
/// About 1 MiB of Arrow data per file.
const ROWS_PER_FILE: i64 = 25_000;
const LIMIT: u64 = 2 << 20;

/// `FILES` Parquet files with ids `0..FILES * ROWS_PER_FILE`.
fn parquet_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in 0..FILES {
        let file = std::fs::File::create(dir.path().join(format!("part-{f}.parquet")))
            .expect("create file");
        let mut writer = ArrowWriter::try_new(file, schema(), None).expect("writer");
        writer
            .write(&batch(f * ROWS_PER_FILE, ROWS_PER_FILE as usize))
            .expect("write");
        writer.close().expect("close");
    }
    dir
}

fn glob(dir: &Path) -> String {
    format!("file://{}/*.parquet", dir.display())
}

async fn server(policy: MemoryPolicy, spill_dir: Option<&Path>) -> Fixture {
    let storage = spill_dir
        .map(|d| ObjectStorage::from_url(&format!("file://{}", d.display())).expect("storage"));
    Fixture::start_with(
        ServerConfig {
            // The tests' Parquet files are under the system's temporary directory.
            import_allow: vec![format!("file://{}", std::env::temp_dir().display())],
            ..ServerConfig::default()
        },
        StoreConfig {
            memory_limit: Some(LIMIT),
            default_policy: policy,
            storage,
            ..Default::default()
        },
    )
    .await
}

async fn sorted_ids(server: &Fixture, link: &str) -> Vec<i64> {
    let mut reader = server.client(READER).await;
    let mut ids = link_ids(&mut reader, link).await;
    ids.sort_unstable();
    ids
}

#[tokio::test]
async fn an_import_four_times_the_budget_spills_and_keeps_every_row() {
    let files = parquet_files();
    let spill = tempfile::tempdir().expect("tempdir");
    let server = server(MemoryPolicy::Spill, Some(spill.path())).await;
    let mut w = server.client(ADMIN).await;
    let reply = w
        .import("imported", &glob(files.path()), true)
        .await
        .expect("import spills");
    let n = FILES * ROWS_PER_FILE;
    assert_eq!(reply["rows"], n, "{reply}");
    assert_eq!(reply["files"], FILES, "{reply}");
    assert_eq!(reply["sealed"], true, "{reply}");
    let stats = w.stats("imported").await.expect("stats");
    assert!(
        stats.bytes > 3 * LIMIT,
        "wrote well over the budget: {stats:?}"
    );
    assert!(stats.spilled_partitions > 0, "{stats:?}");
    assert!(server.store.memory().peak() <= LIMIT);
    assert_eq!(
        sorted_ids(&server, "imported").await,
        (0..n).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test]
async fn an_import_over_a_reject_budget_fails_clearly_and_leaves_nothing() {
    let files = parquet_files();
    let server = server(MemoryPolicy::Reject, None).await;
    let mut w = server.client(ADMIN).await;
    let err = w
        .import("imported", &glob(files.path()), true)
        .await
        .expect_err("over the budget");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(
        err.to_string().contains("spill"),
        "names the way out: {err}"
    );
    let stats = w.stats("imported").await.expect("stats");
    assert_eq!((stats.rows, stats.staged_partitions), (0, 0), "{stats:?}");
    assert_eq!(
        server.store.memory().used(),
        0,
        "nothing held after a failed import"
    );
    assert!(server.store.memory().peak() <= LIMIT);

    // The server is intact: an import that fits goes through.
    let one = format!("file://{}/part-3.parquet", files.path().display());
    let reply = w
        .import("imported", &one, true)
        .await
        .expect("import one file");
    assert_eq!(reply["rows"], ROWS_PER_FILE, "{reply}");
    assert_eq!(
        sorted_ids(&server, "imported").await,
        (3 * ROWS_PER_FILE..4 * ROWS_PER_FILE).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test]
async fn an_import_under_wait_goes_on_when_memory_is_freed_and_times_out_when_not() {
    let files = parquet_files();
    let server = server(
        MemoryPolicy::Wait {
            timeout: Duration::from_secs(20),
        },
        None,
    )
    .await;
    let mut w = server.client(ADMIN).await;
    // Another link holds most of the budget; one more file does not fit beside it.
    w.put("other", stream_of(vec![batch(0, 30_000)]))
        .await
        .expect("put other");
    let one = format!("file://{}/part-[1].parquet", files.path().display());
    let import = {
        let mut w = server.client(ADMIN).await;
        tokio::spawn(async move { w.import("imported", &one, true).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!import.is_finished(), "the import waits for memory");
    server
        .client(ADMIN)
        .await
        .delete("other")
        .await
        .expect("delete");
    let reply = import
        .await
        .expect("task")
        .expect("import after the delete");
    assert_eq!(reply["rows"], ROWS_PER_FILE, "{reply}");
    assert_eq!(
        sorted_ids(&server, "imported").await,
        (ROWS_PER_FILE..2 * ROWS_PER_FILE).collect::<Vec<_>>()
    );
    assert!(server.store.memory().peak() <= LIMIT);
    server.stop().await;

    // With nothing freed, the wait ends with the reason, and the import leaves nothing.
    let server = server_with_wait(Duration::from_millis(300)).await;
    let mut w = server.client(ADMIN).await;
    let err = w
        .import("imported", &glob(files.path()), true)
        .await
        .expect_err("wait runs out");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("waited"), "{err}");
    assert_eq!(server.store.memory().used(), 0);
    server.stop().await;
}

async fn server_with_wait(timeout: Duration) -> Fixture {
    server(MemoryPolicy::Wait { timeout }, None).await
}
