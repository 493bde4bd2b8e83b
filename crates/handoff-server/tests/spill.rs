//! The spill policy against a real server and real files: memory stays under the limit, every
//! row reads back through every read path, and spilled objects go away with their link.

mod common;

use std::path::Path;

use common::*;
use handoff_client::{CreateLink, MemoryPolicy, ReadShard};
use handoff_server::ServerConfig;
use handoff_store::{ObjectStorage, StoreConfig};
use tonic::Code;

/// Rows per partition; one partition of `batch` is about 420 KB.
const ROWS: i64 = 10_000;

fn spill_config(dir: &Path, limit: u64) -> StoreConfig {
    StoreConfig {
        memory_limit: Some(limit),
        default_policy: handoff_store::MemoryPolicy::Spill,
        storage: Some(storage(dir)),
        ..Default::default()
    }
}

/// A server with `limit` bytes and the spill policy, spilling into a fresh directory.
async fn spilling_server(limit: u64) -> (tempfile::TempDir, Fixture) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        Fixture::start_with(ServerConfig::default(), spill_config(dir.path(), limit)).await;
    (dir, server)
}

fn storage(dir: &Path) -> ObjectStorage {
    ObjectStorage::from_url(&format!("file://{}", dir.display())).expect("storage")
}

/// Files under `dir/sub`, recursively.
fn files_under(dir: &Path, sub: &str) -> usize {
    fn walk(path: &Path) -> usize {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let p = e.path();
                        if p.is_dir() { walk(&p) } else { 1 }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join(sub))
}

/// Everything under `path` is for the server alone: files 0600, directories 0700.
fn assert_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(path).expect("read dir").flatten() {
        let p = entry.path();
        let mode = entry.metadata().expect("metadata").permissions().mode() & 0o777;
        if p.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            assert_private(&p);
        } else {
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    handoff_testkit::eventually(what, || {
        let done = done();
        async move { done.then_some(()) }
    })
    .await
}

async fn shard_ids(client: &mut handoff_client::HandoffClient, shard: ReadShard) -> Vec<i64> {
    let stream = client.read_shard(shard).await.expect("read shard");
    collect(stream).await.iter().flat_map(ids).collect()
}

#[tokio::test]
async fn spill_keeps_memory_under_the_limit_and_every_read_path_sees_every_row() {
    let limit = 1 << 20;
    let (dir, server) = spilling_server(limit).await;
    let mut admin = server.admin().await;
    // A link that chose `reject` is never spilled to make room for others.
    admin
        .create(CreateLink {
            link: "keep".into(),
            memory_policy: MemoryPolicy::Reject as i32,
            ..Default::default()
        })
        .await
        .expect("create");
    admin
        .put("keep", stream_of(vec![batch(0, 1000)]))
        .await
        .expect("put keep");

    let partitions = 30;
    for p in 0..partitions {
        let batches = vec![batch(p * ROWS, 4000), batch(p * ROWS + 4000, 6000)];
        admin
            .put("big", stream_of(batches))
            .await
            .expect("put spills");
        assert!(server.store.memory().used() <= limit);
    }
    let n = partitions * ROWS;
    let stats = admin.stats("big").await.expect("stats");
    assert!(stats.bytes > 10 * limit, "wrote 10x the limit: {stats:?}");
    assert!(stats.spilled_partitions >= 20, "{stats:?}");
    assert_eq!(stats.memory_bytes + stats.spilled_bytes, stats.bytes);
    assert!(server.store.memory().peak() <= limit);
    assert_eq!(admin.stats("keep").await.expect("stats").spilled_bytes, 0);
    assert!(files_under(dir.path(), "spill") >= 20);
    assert_private(&dir.path().join("spill"));
    let metrics = handoff_server::Metrics::default().render(&server.store);
    let gauge = format!("handoff_spilled_bytes {}", stats.spilled_bytes);
    assert!(metrics.contains(&gauge), "{gauge} in\n{metrics}");
    assert!(
        metrics.contains("handoff_spilled_written_bytes_total "),
        "{metrics}"
    );

    admin.seal("big").await.expect("seal");
    // Whole partitions, through FlightInfo tickets, in commit order.
    assert_eq!(
        link_ids(&mut admin, "big").await,
        (0..n).collect::<Vec<_>>()
    );
    // Shards: frame-aligned, cut, and shuffled (gathered) reads, over two ranks.
    for (batch_rows, shuffle) in [(0, false), (3000, false), (4096, true)] {
        let mut all = Vec::new();
        for rank in 0..2 {
            all.extend(
                shard_ids(
                    &mut admin,
                    ReadShard {
                        link: "big".into(),
                        rank,
                        world_size: 2,
                        batch_rows,
                        shuffle,
                        drop_last: true,
                        seed: 7,
                        ..Default::default()
                    },
                )
                .await,
            );
        }
        all.sort_unstable();
        let kept = if batch_rows == 0 {
            n
        } else {
            n / (2 * batch_rows as i64) * 2 * batch_rows as i64
        };
        assert_eq!(all.len() as i64, kept, "batch_rows={batch_rows}");
        all.dedup();
        assert_eq!(
            all.len() as i64,
            kept,
            "no row twice, batch_rows={batch_rows}"
        );
    }

    // A snapshot copies spilled objects; a new store restores every row from it.
    admin.snapshot("big").await.expect("snapshot");
    assert_private(&dir.path().join("links"));
    let restored = handoff_store::Store::new(StoreConfig {
        storage: Some(storage(dir.path())),
        ..Default::default()
    });
    restored
        .restore_all(&storage(dir.path()))
        .await
        .expect("restore");
    assert_eq!(restored.stats("big").expect("stats").rows, n as u64);

    // Deleting the link removes its spilled objects; its snapshot stays.
    admin.delete("big").await.expect("delete");
    eventually("spilled objects are removed", || {
        files_under(dir.path(), "spill") == 0
    })
    .await;
    assert!(files_under(dir.path(), "links/big") > 0, "snapshot kept");
    assert_eq!(admin.stats("keep").await.expect("stats").rows, 1000);
    server.stop().await;
}

#[tokio::test]
async fn staged_attempts_spill_too_and_commit_exactly_once() {
    let limit = 1 << 20;
    let (dir, server) = spilling_server(limit).await;
    let mut w = server.client(WRITER).await;
    // Like a Spark job: every task stages, nothing commits until the driver does.
    let partitions = 12u64;
    for p in 0..partitions {
        let rows = vec![batch(p as i64 * ROWS, ROWS as usize)];
        w.put_partition("tpc", p, 0, stream_of(rows.clone()))
            .await
            .expect("stage");
        // A speculative twin of every other partition, which will lose.
        if p % 2 == 0 {
            w.put_partition("tpc", p, 1, stream_of(rows))
                .await
                .expect("stage twin");
        }
    }
    let staged = w.stats("tpc").await.expect("stats");
    assert_eq!((staged.rows, staged.staged_partitions), (0, 18));
    assert!(staged.spilled_partitions > 0, "{staged:?}");
    assert!(server.store.memory().peak() <= limit);

    let winners: Vec<(u64, u64)> = (0..partitions).map(|p| (p, 0)).collect();
    w.commit("tpc", &winners).await.expect("commit");
    w.seal("tpc").await.expect("seal");
    let mut r = server.client(READER).await;
    let mut got = link_ids(&mut r, "tpc").await;
    got.sort_unstable();
    assert_eq!(got, (0..partitions as i64 * ROWS).collect::<Vec<_>>());
    // The losing twins' spilled objects went away with them.
    let committed_spilled = w.stats("tpc").await.expect("stats").spilled_partitions as usize;
    eventually("losing attempts' objects are removed", || {
        files_under(dir.path(), "spill") == committed_spilled
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_message_larger_than_the_whole_budget_is_refused_and_earlier_data_stays() {
    let limit = 1 << 20;
    let (_dir, server) = spilling_server(limit).await;
    let mut admin = server.admin().await;
    admin
        .put("s", stream_of(vec![batch(0, 1000)]))
        .await
        .expect("fits");
    // A partition may outgrow memory (it streams out), but one message must fit in it.
    let err = admin
        .put("s", stream_of(vec![batch(1000, 30_000)]))
        .await
        .expect_err("a message larger than the budget");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(
        err.to_string()
            .contains("larger than the server's whole memory limit of 1048576 bytes"),
        "{err}"
    );
    let stats = admin.stats("s").await.expect("stats");
    assert_eq!((stats.rows, stats.staged_partitions), (1000, 0));
    admin.seal("s").await.expect("seal");
    assert_eq!(
        link_ids(&mut admin, "s").await,
        (0..1000).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_spilling_link_quota_spills_only_its_own_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Fixture::start_with(
        ServerConfig::default(),
        StoreConfig {
            storage: Some(storage(dir.path())),
            ..Default::default()
        },
    )
    .await;
    let mut admin = server.admin().await;
    for (link, policy) in [("a", MemoryPolicy::Spill), ("b", MemoryPolicy::Spill)] {
        admin
            .create(CreateLink {
                link: link.into(),
                memory_policy: policy as i32,
                memory_limit: if link == "a" { 1 << 20 } else { 0 },
                ..Default::default()
            })
            .await
            .expect("create");
    }
    admin
        .put("b", stream_of(vec![batch(0, ROWS as usize)]))
        .await
        .expect("put b");
    for p in 0..6 {
        admin
            .put("a", stream_of(vec![batch(p * ROWS, ROWS as usize)]))
            .await
            .expect("put a");
    }
    let a = admin.stats("a").await.expect("stats");
    assert!(
        a.spilled_partitions > 0 && a.memory_bytes <= 1 << 20,
        "{a:?}"
    );
    assert_eq!(admin.stats("b").await.expect("stats").spilled_partitions, 0);
    server.stop().await;
}

/// A Flight SQL query through arrow-flight's own client; the result as (count, sum) of ids.
async fn sql_count_and_sum(server: &Fixture, query: &str) -> (i64, i64) {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;
    let channel = server.channel().await;
    let mut sql = FlightSqlServiceClient::new(channel);
    sql.set_token(READER.into());
    let info = sql.execute(query.into(), None).await.expect("execute");
    let mut rows = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.expect("ticket");
        let batches: Vec<_> = sql
            .do_get(ticket)
            .await
            .expect("do_get")
            .try_collect()
            .await
            .expect("stream");
        rows.extend(batches);
    }
    let batch = &rows[0];
    let value = |i: usize| {
        batch
            .column(i)
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .expect("int64")
            .value(0)
    };
    (value(0), value(1))
}

#[tokio::test]
async fn a_spilled_link_answers_sql_and_filtered_column_reads() {
    let limit = 1 << 20;
    let (_dir, server) = spilling_server(limit).await;
    let mut w = server.client(WRITER).await;
    let partitions = 20;
    for p in 0..partitions {
        w.put("big", stream_of(vec![batch(p * ROWS, ROWS as usize)]))
            .await
            .expect("put spills");
    }
    w.seal("big").await.expect("seal");
    let stats = w.stats("big").await.expect("stats");
    assert!(stats.spilled_partitions >= 10, "{stats:?}");
    let n = partitions * ROWS;

    // SQL scans every partition, resident or spilled, and the memory stays within the limit.
    let (count, sum) = sql_count_and_sum(&server, "SELECT count(*), sum(id) FROM big").await;
    assert_eq!((count, sum), (n, n * (n - 1) / 2));
    let passing: Vec<i64> = (0..n).filter(|i| i % 7 == 0 && *i >= 55_555).collect();
    let (count, sum) = sql_count_and_sum(
        &server,
        "SELECT count(*), sum(id) FROM big WHERE id % 7 = 0 AND name >= 'row-55555' AND id >= 55555",
    )
    .await;
    // `name` compares as text: 'row-100000' < 'row-55555'.
    let by_sql: Vec<i64> = passing
        .iter()
        .copied()
        .filter(|i| format!("row-{i}").as_str() >= "row-55555")
        .collect();
    assert_eq!(
        (count, sum),
        (by_sql.len() as i64, by_sql.iter().sum::<i64>())
    );

    // A filtered read of two columns over two ranks returns exactly the passing rows.
    let mut r = server.client(READER).await;
    let mut seen = Vec::new();
    for rank in 0..2 {
        let shard = ReadShard {
            link: "big".into(),
            rank,
            world_size: 2,
            batch_rows: 1000,
            shuffle: true,
            seed: 3,
            columns: vec!["id".into(), "x".into()],
            filter: "id % 7 = 0 AND id >= 55555".into(),
            ..Default::default()
        };
        for b in collect(r.read_shard(shard).await.expect("read")).await {
            assert_eq!(b.num_columns(), 2);
            let id = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow_array::Int64Array>()
                .expect("id");
            let x = b
                .column(1)
                .as_any()
                .downcast_ref::<arrow_array::Float32Array>()
                .expect("x");
            assert!(
                id.values()
                    .iter()
                    .zip(x.values())
                    .all(|(i, x)| *i as f32 * 0.5 == *x)
            );
            seen.extend(id.values().iter().copied());
        }
    }
    // Without drop_last the last round wraps to the start, as DistributedSampler pads.
    assert_eq!(seen.len(), passing.len().div_ceil(2000) * 2000);
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, passing, "every passing row, spilled or not");
    assert!(server.store.memory().peak() <= limit);
    server.stop().await;
}

/// One partition four times the budget (a skewed Spark partition) lands under `spill`: once
/// nothing finished is left to move out, the partition goes to object storage as it arrives,
/// and reads back whole. A write that breaks while streaming leaves nothing behind.
#[tokio::test]
async fn a_partition_larger_than_memory_lands_and_reads_back() {
    let limit = 1 << 20;
    let (dir, server) = spilling_server(limit).await;
    let mut admin = server.admin().await;
    // Twelve frames of about 410 KB in one DoPut: over 4x the limit.
    let batches: Vec<_> = (0..12).map(|i| batch(i * ROWS, ROWS as usize)).collect();
    let outcome = admin
        .put("skewed", stream_of(batches))
        .await
        .expect("lands");
    assert_eq!(outcome.rows, 12 * ROWS as u64);
    let stats = admin.stats("skewed").await.expect("stats");
    assert!(stats.bytes > 4 * limit, "{stats:?}");
    assert_eq!(stats.spilled_bytes, stats.bytes, "{stats:?}");
    assert!(server.store.memory().peak() <= limit);
    assert_private(&dir.path().join("spill"));
    admin.seal("skewed").await.expect("seal");
    assert_eq!(
        link_ids(&mut admin, "skewed").await,
        (0..12 * ROWS).collect::<Vec<_>>()
    );
    // Shuffled over two ranks, in windows of a quarter of the limit.
    let mut all = Vec::new();
    for rank in 0..2 {
        all.extend(
            shard_ids(
                &mut admin,
                ReadShard {
                    link: "skewed".into(),
                    rank,
                    world_size: 2,
                    batch_rows: 1000,
                    shuffle: true,
                    drop_last: true,
                    ..Default::default()
                },
            )
            .await,
        );
    }
    assert_ne!(all, (0..12 * ROWS).collect::<Vec<_>>(), "shuffled");
    all.sort_unstable();
    assert_eq!(all, (0..12 * ROWS).collect::<Vec<_>>());
    admin.delete("skewed").await.expect("delete");
    eventually("the streamed object goes with its link", || {
        files_under(dir.path(), "spill") == 0
    })
    .await;

    // A write that streams and then breaks: nothing of it stays, in memory or in storage.
    let broken = futures::stream::iter((0..6).map(|i| Ok(batch(i * ROWS, ROWS as usize))).chain(
        std::iter::once(Err(handoff_client::ClientError::Status(
            tonic::Status::cancelled("the writer broke"),
        ))),
    ));
    let err = admin.put("broken", broken).await.expect_err("broken");
    assert!(err.to_string().contains("the writer broke"), "{err}");
    let stats = admin.stats("broken").await.expect("stats");
    assert_eq!(
        stats.rows, 0,
        "nothing of a broken write is kept: {stats:?}"
    );
    eventually("the broken stream's object is removed", || {
        files_under(dir.path(), "spill") == 0
    })
    .await;
    eventually("and its memory released", || {
        common::memory_is_only(&server, 0)
    })
    .await;
    server.stop().await;
}
