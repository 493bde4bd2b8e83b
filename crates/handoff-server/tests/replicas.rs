//! One link over three server replicas on 127.0.0.1 (`serve --peers`): writes land on each
//! partition's owner, the planner records and applies commits exactly once, seals every
//! replica, and finishes a recorded commit after a restart.

mod common;

use std::collections::BTreeMap;

use arrow_flight::{FlightClient, FlightDescriptor};
use common::*;
use futures::{StreamExt, TryStreamExt};
use handoff_client::{ClientError, HandoffClient};
use handoff_proto::placement::owner;
use handoff_server::{ReplicaConfig, ServerConfig};
use handoff_store::{ObjectStorage, StoreConfig};
use handoff_testkit::eventually;
use prost::Message;

const LINK: &str = "team/features";
const REPLICAS: u32 = 3;

struct Cluster {
    servers: Vec<Option<Fixture>>,
    peers: Vec<String>,
    /// Each replica's object storage (the planner's holds the commit records).
    dirs: Vec<tempfile::TempDir>,
    /// Every replica snapshots its part at the seal (`--snapshot-on-seal`).
    snapshots: bool,
}

fn config(peers: &[String], index: u32) -> ServerConfig {
    ServerConfig {
        replicas: Some(
            ReplicaConfig::new(peers.to_vec(), index, Some(ADMIN.into())).expect("replicas"),
        ),
        ..ServerConfig::default()
    }
}

fn storage(dir: &tempfile::TempDir) -> ObjectStorage {
    ObjectStorage::from_url(&format!("file://{}", dir.path().display())).expect("storage")
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with(false).await
    }

    async fn start_with(snapshots: bool) -> Self {
        Self::start_configured(snapshots, |_, config| config).await
    }

    /// Each replica's configuration passed through `adjust(index, config)` first.
    async fn start_configured(
        snapshots: bool,
        adjust: impl Fn(u32, ServerConfig) -> ServerConfig,
    ) -> Self {
        let mut listeners = Vec::new();
        for _ in 0..REPLICAS {
            listeners.push(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind"),
            );
        }
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| format!("grpc://{}", l.local_addr().expect("addr")))
            .collect();
        let dirs: Vec<_> = (0..REPLICAS)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let mut servers = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let store = StoreConfig {
                storage: Some(storage(&dirs[i])),
                snapshot_on_seal: snapshots,
                ..StoreConfig::default()
            };
            let config = adjust(i as u32, config(&peers, i as u32));
            servers.push(Some(Fixture::start_on(listener, config, store).await));
        }
        Self {
            servers,
            peers,
            dirs,
            snapshots,
        }
    }

    fn server(&self, i: usize) -> &Fixture {
        self.servers[i].as_ref().expect("running")
    }

    async fn client(&self, i: usize, token: &str) -> HandoffClient {
        self.server(i).client(token).await
    }

    /// Stop replica `i` (its memory goes with it) and start it again on the same address.
    async fn restart(&mut self, i: usize) {
        self.restart_restoring(i, false).await;
    }

    /// Like `restart`; with `restore`, the replica loads its snapshots first, as
    /// `serve --restore-from` does.
    async fn restart_restoring(&mut self, i: usize, restore: bool) {
        self.down(i).await;
        self.up(i, restore).await;
    }

    /// Stop replica `i`.
    async fn down(&mut self, i: usize) {
        self.servers[i].take().expect("running").stop().await;
    }

    /// Start replica `i` again on its address, restoring its snapshots with `restore`.
    async fn up(&mut self, i: usize, restore: bool) {
        let addr = self.peers[i].trim_start_matches("grpc://");
        let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
        let store = handoff_store::Store::new(StoreConfig {
            storage: Some(storage(&self.dirs[i])),
            snapshot_on_seal: self.snapshots,
            ..StoreConfig::default()
        });
        if restore {
            store
                .restore_all(&storage(&self.dirs[i]))
                .await
                .expect("restore");
        }
        self.servers[i] =
            Some(Fixture::start_with_store(listener, config(&self.peers, i as u32), store).await);
    }

    /// (partition, attempt, rows) of every published partition, by replica.
    fn published(&self, link: &str) -> BTreeMap<usize, Vec<(u64, u64, u64)>> {
        (0..REPLICAS as usize)
            .map(|i| {
                let parts = match self.server(i).store.link(link) {
                    Ok(link) => link
                        .snapshot()
                        .partitions
                        .iter()
                        .map(|p| (p.id, p.attempt, p.rows))
                        .collect(),
                    Err(_) => Vec::new(),
                };
                (i, parts)
            })
            .collect()
    }

    async fn stop(self) {
        for server in self.servers.into_iter().flatten() {
            server.stop().await;
        }
    }
}

/// Ten rows a partition, ids from partition * 100.
async fn stage(client: &mut HandoffClient, partition: u64, attempt: u64) {
    let rows = batch(partition as i64 * 100, 10);
    let outcome = client
        .put_partition(LINK, partition, attempt, stream_of(vec![rows]))
        .await
        .expect("put");
    assert_eq!((outcome.partition, outcome.rows), (partition, 10));
}

fn code(e: &ClientError) -> Option<tonic::Code> {
    e.code()
}

/// Rank `rank` of `world`, in batches of `batch_rows`.
fn shard(rank: u32, world: u32, batch_rows: u64) -> handoff_client::ReadShard {
    handoff_client::ReadShard {
        link: LINK.into(),
        rank,
        world_size: world,
        batch_rows,
        ..Default::default()
    }
}

/// The ids of each batch of a shard, read through replica `via`'s client.
async fn batch_ids(
    cluster: &Cluster,
    via: usize,
    shard: handoff_client::ReadShard,
) -> Vec<Vec<i64>> {
    let batch_rows = shard.batch_rows as usize;
    let mut client = cluster.client(via % REPLICAS as usize, READER).await;
    let mut batches = client.shard_batches(shard).await.expect("plan");
    let mut got = Vec::new();
    while let Some(b) = batches.next().await {
        let b = b.expect("batch");
        assert_eq!(b.num_rows(), batch_rows, "every batch exactly batch_rows");
        got.push(ids(&b));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_land_on_owners_and_commit_exactly_once_over_three_replicas() {
    let cluster = Cluster::start().await;
    // A client of replica 1: its writes go to each partition's owner, commits to replica 0.
    let mut writer = cluster.client(1, WRITER).await;
    let topology = writer.topology().await.expect("topology");
    assert_eq!(
        (topology.replicas.clone(), topology.index),
        (cluster.peers.clone(), 1)
    );
    let partitions = 12u64;
    for p in 0..partitions {
        stage(&mut writer, p, 0).await;
        // Task retries: every third partition runs twice; the second attempt wins.
        if p % 3 == 0 {
            stage(&mut writer, p, 1).await;
        }
    }
    let winners: Vec<(u64, u64)> = (0..partitions)
        .map(|p| (p, u64::from(p % 3 == 0)))
        .collect();
    let committed = writer.commit(LINK, &winners).await.expect("commit");
    assert_eq!(committed["committed"], partitions);
    assert_eq!(committed["rows"], partitions * 10);
    // The driver retries a commit whose answer it lost: nothing is published twice.
    let again = writer.commit(LINK, &winners).await.expect("commit again");
    assert_eq!(again["already"], partitions, "{again}");
    assert_eq!(again["rows"], 0, "{again}");
    let published = cluster.published(LINK);
    for (replica, parts) in &published {
        for (partition, attempt, rows) in parts {
            assert_eq!(
                owner(LINK, *partition, REPLICAS) as usize,
                *replica,
                "partition {partition} published away from its owner"
            );
            assert_eq!(*attempt, u64::from(partition % 3 == 0));
            assert_eq!(*rows, 10);
        }
    }
    let total: usize = published.values().map(Vec::len).sum();
    assert_eq!(total, partitions as usize, "{published:?}");
    assert!(
        published.values().filter(|p| !p.is_empty()).count() >= 2,
        "12 partitions spread over replicas: {published:?}"
    );

    // An overwrite: the link then holds exactly these attempts on every replica, also on one
    // that got none of them.
    let only = (100..200u64)
        .find(|p| owner(LINK, *p, REPLICAS) == 1)
        .expect("a partition of replica 1");
    stage(&mut writer, only, 0).await;
    let replaced = writer
        .commit_with(LINK, &[(only, 0)], true)
        .await
        .expect("replace");
    assert_eq!(replaced["rows"], 10, "{replaced}");
    let after = cluster.published(LINK);
    assert_eq!(after[&1], vec![(only, 0, 10)], "{after:?}");
    assert!(after[&0].is_empty() && after[&2].is_empty(), "{after:?}");
    // Back to the twelve, as a job that overwrites again would.
    for p in 0..partitions {
        stage(&mut writer, p, 2).await;
    }
    let rewritten: Vec<(u64, u64)> = (0..partitions).map(|p| (p, 2)).collect();
    writer
        .commit_with(LINK, &rewritten, true)
        .await
        .expect("replace");
    let published = cluster.published(LINK);
    assert_eq!(published.values().flatten().count(), partitions as usize);

    let stats = writer.seal(LINK).await.expect("seal");
    assert_eq!(
        (stats.state.as_str(), stats.rows),
        ("sealed", partitions * 10)
    );
    assert_eq!(stats.replicas.len(), REPLICAS as usize);
    for part in &stats.replicas {
        let held = &published[&(part.replica as usize)];
        assert_eq!(part.state, "sealed", "{part:?}");
        assert_eq!(part.partitions, held.len() as u64, "{part:?}");
        assert_eq!(part.rows, held.len() as u64 * 10, "{part:?}");
        assert_eq!(part.endpoint, cluster.peers[part.replica as usize]);
    }
    assert_eq!(writer.stats(LINK).await.expect("stats"), stats);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_over_three_replicas_are_disjoint_complete_and_equal() {
    let cluster = Cluster::start().await;
    let mut writer = cluster.client(0, WRITER).await;
    // Uneven parts: partition p has 5 + p rows, so each replica ends with a partial batch.
    let mut all = Vec::new();
    let mut winners = Vec::new();
    for p in 0..12u64 {
        let rows = 5 + p as usize;
        let data = batch(p as i64 * 100, rows);
        all.extend(ids(&data));
        writer
            .put_partition(LINK, p, 0, stream_of(vec![data]))
            .await
            .expect("put");
        winners.push((p, 0));
    }
    writer.commit(LINK, &winners).await.expect("commit");
    // Before the seal there is no plan: the counts are not final.
    let mut reader = cluster.client(1, READER).await;
    let err = reader
        .shard_batches(shard(0, 1, 7))
        .await
        .err()
        .expect("not sealed");
    assert_eq!(code(&err), Some(tonic::Code::Unavailable), "{err}");
    writer.seal(LINK).await.expect("seal");
    // The plan names every replica that holds rows, at its own endpoint.
    let info = cluster
        .client(0, READER)
        .await
        .shard_info(&shard(0, 1, 7))
        .await
        .expect("plan");
    let locations: Vec<String> = info
        .endpoint
        .iter()
        .map(|e| e.location[0].uri.clone())
        .collect();
    assert_eq!(locations, cluster.peers, "{info:?}");
    assert_eq!(info.total_records as usize, all.len().div_ceil(7) * 7);
    let order = |shuffle: bool, epoch: u64| {
        let shard = handoff_client::ReadShard {
            shuffle,
            epoch,
            drop_last: true,
            ..shard(0, 1, 7)
        };
        batch_ids(&cluster, 2, shard)
    };
    let plain = order(false, 0).await;
    let (one, two) = (order(true, 1).await, order(true, 2).await);
    assert!(plain != one && one != two, "shuffled per epoch");
    assert_eq!(order(true, 1).await, one, "the same epoch, the same order");
    all.sort_unstable();
    let total = all.len() as u64;
    let batch_rows = 7u64;
    for world in [1u32, 2, 3, 7] {
        for shuffle in [false, true] {
            for drop_last in [false, true] {
                let mut per_rank = Vec::new();
                for rank in 0..world {
                    // Each rank asks a different replica; the plan is the planner's.
                    let shard = handoff_client::ReadShard {
                        shuffle,
                        drop_last,
                        seed: 11,
                        epoch: 2,
                        ..shard(rank, world, batch_rows)
                    };
                    per_rank.push(batch_ids(&cluster, rank as usize, shard).await);
                }
                let what = format!("world {world} shuffle {shuffle} drop_last {drop_last}");
                let counts: Vec<usize> = per_rank.iter().map(Vec::len).collect();
                assert!(
                    counts.windows(2).all(|w| w[0] == w[1]),
                    "{what}: {counts:?}"
                );
                let per_round = batch_rows * u64::from(world);
                let expected = if drop_last {
                    total / per_round
                } else {
                    total.div_ceil(per_round)
                };
                assert_eq!(counts[0] as u64, expected, "{what}");
                let mut read: Vec<i64> = per_rank.into_iter().flatten().flatten().collect();
                read.sort_unstable();
                let mut distinct = read.clone();
                distinct.dedup();
                if drop_last {
                    assert_eq!(distinct.len(), read.len(), "{what}: a row twice");
                    assert!(
                        distinct.iter().all(|id| all.binary_search(id).is_ok()),
                        "{what}"
                    );
                } else {
                    // Every row at least once; only the padding repeats rows.
                    assert_eq!(distinct, all, "{what}");
                    assert_eq!(read.len() as u64, expected * per_round, "{what}");
                }
            }
        }
    }
    // A filter: each replica counts what passes of its part, and the plan runs over those rows
    // only, with the same promises.
    let passing: Vec<i64> = all.iter().copied().filter(|id| id % 3 == 0).collect();
    let filtered = |rank: u32, world: u32, shuffle: bool| handoff_client::ReadShard {
        shuffle,
        seed: 5,
        filter: "id % 3 = 0".into(),
        ..shard(rank, world, batch_rows)
    };
    let info = cluster
        .client(1, READER)
        .await
        .shard_info(&filtered(0, 1, false))
        .await
        .expect("plan");
    assert_eq!(
        info.total_records as usize,
        passing.len().div_ceil(7) * 7,
        "the count over replicas is exact"
    );
    for world in [1u32, 2, 3, 7] {
        for shuffle in [false, true] {
            let mut per_rank = Vec::new();
            for rank in 0..world {
                per_rank
                    .push(batch_ids(&cluster, rank as usize, filtered(rank, world, shuffle)).await);
            }
            let what = format!("filtered, world {world} shuffle {shuffle}");
            let counts: Vec<usize> = per_rank.iter().map(Vec::len).collect();
            assert!(
                counts.windows(2).all(|w| w[0] == w[1]),
                "{what}: {counts:?}"
            );
            let per_round = batch_rows * u64::from(world);
            assert_eq!(
                counts[0] as u64,
                (passing.len() as u64).div_ceil(per_round),
                "{what}"
            );
            let mut read: Vec<i64> = per_rank.into_iter().flatten().flatten().collect();
            read.sort_unstable();
            read.dedup();
            assert_eq!(read, passing, "{what}");
        }
    }
    let err = cluster
        .client(2, READER)
        .await
        .shard_batches(handoff_client::ReadShard {
            filter: "no_such_column > 1".into(),
            ..shard(0, 1, batch_rows)
        })
        .await
        .err()
        .expect("a bad filter");
    assert_eq!(code(&err), Some(tonic::Code::InvalidArgument), "{err}");
    cluster.stop().await;
}

/// Every rank's ids of one unshuffled epoch over the cluster.
async fn epoch_ids(cluster: &Cluster, world: u32) -> Vec<i64> {
    let mut read = Vec::new();
    for rank in 0..world {
        let shard = handoff_client::ReadShard {
            drop_last: true,
            ..shard(rank, world, 4)
        };
        read.extend(batch_ids(cluster, rank as usize, shard).await.concat());
    }
    read.sort_unstable();
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_after_the_seal_restores_its_part_from_its_snapshot() {
    let mut cluster = Cluster::start_with(true).await;
    let mut writer = cluster.client(0, WRITER).await;
    for p in 0..12u64 {
        stage(&mut writer, p, 0).await;
    }
    let winners: Vec<(u64, u64)> = (0..12).map(|p| (p, 0)).collect();
    writer.commit(LINK, &winners).await.expect("commit");
    let sealed = writer.seal(LINK).await.expect("seal");
    let before = epoch_ids(&cluster, 2).await;
    assert_eq!(before.len(), 120);
    let victim = (1..REPLICAS as usize)
        .max_by_key(|r| sealed.replicas[*r].rows)
        .expect("a replica with rows");
    assert!(sealed.replicas[victim].rows > 0);
    cluster.restart_restoring(victim, true).await;
    let mut reader = cluster.client(0, READER).await;
    let stats = reader.stats(LINK).await.expect("stats");
    assert_eq!((stats.state.as_str(), stats.rows), ("sealed", 120));
    assert_eq!(stats.replicas[victim], sealed.replicas[victim]);
    assert_ne!(
        stats.server_instance, sealed.server_instance,
        "a replica restarted"
    );
    assert_eq!(epoch_ids(&cluster, 2).await, before);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_lost_before_the_seal_says_which_partitions_and_blocks_the_seal() {
    let mut cluster = Cluster::start().await;
    let mut writer = cluster.client(0, WRITER).await;
    for p in 0..12u64 {
        stage(&mut writer, p, 0).await;
    }
    let winners: Vec<(u64, u64)> = (0..12).map(|p| (p, 0)).collect();
    writer.commit(LINK, &winners).await.expect("commit");
    let victim = 2u32;
    let gone: Vec<u64> = (0..12)
        .filter(|p| owner(LINK, *p, REPLICAS) == victim)
        .collect();
    assert!(!gone.is_empty());
    cluster.restart(victim as usize).await;
    let stats: serde_json::Value = serde_json::from_slice(
        &cluster
            .client(0, ADMIN)
            .await
            .raw_action("stats", LINK.as_bytes().to_vec())
            .await
            .expect("stats"),
    )
    .expect("json");
    assert_eq!(stats["lost"][0]["replica"], victim, "{stats}");
    assert_eq!(
        stats["lost"][0]["partitions"],
        serde_json::json!(gone),
        "{stats}"
    );
    let err = writer.seal(LINK).await.expect_err("lost partitions");
    assert_eq!(code(&err), Some(tonic::Code::DataLoss), "{err}");
    assert!(err.to_string().contains(&format!("{gone:?}")), "{err}");
    // A whole-link read is refused too, rather than served without them.
    let err = writer.flight_info(LINK).await.expect_err("lost partitions");
    assert_eq!(code(&err), Some(tonic::Code::DataLoss), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{gone:?}").replace(' ', "")),
        "{err}"
    );
    // The job writes them again: then nothing is missing and the link seals whole.
    let mut writer = cluster.client(1, WRITER).await;
    for &p in &gone {
        stage(&mut writer, p, 1).await;
    }
    let again: Vec<(u64, u64)> = gone.iter().map(|&p| (p, 1)).collect();
    writer.commit(LINK, &again).await.expect("commit again");
    let sealed = writer.seal(LINK).await.expect("seal");
    assert_eq!(sealed.rows, 120);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_careless_or_hostile_client_is_refused_with_where_to_go() {
    let cluster = Cluster::start().await;
    let mut admin = cluster.client(0, ADMIN).await;
    create(&mut admin, LINK).await;
    // The link exists on every replica, so each can take its partitions.
    for i in 0..REPLICAS as usize {
        assert!(cluster.server(i).store.link(LINK).is_ok(), "replica {i}");
    }
    // A plain Flight client writing a partition to a replica that does not own it.
    let partition = (0..64)
        .find(|p| owner(LINK, *p, REPLICAS) == 2)
        .expect("a partition of replica 2");
    let mut plain = FlightClient::new(cluster.server(0).channel().await);
    plain
        .add_header("authorization", &format!("Bearer {WRITER}"))
        .expect("header");
    let put = handoff_proto::PutPartition {
        link: LINK.into(),
        partition,
        attempt: 0,
    };
    let data = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_cmd(put.encode_to_vec())))
        .build(futures::stream::iter([Ok(batch(0, 5))]));
    let refused = match plain.do_put(data).await {
        Ok(mut results) => results.next().await.expect("a reply").expect_err("refused"),
        Err(e) => e,
    };
    let text = refused.to_string();
    match &refused {
        arrow_flight::error::FlightError::Tonic(status) => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{text}")
        }
        other => panic!("not a gRPC status: {other}"),
    }
    assert!(
        text.contains(&format!("replica 2 ({})", cluster.peers[2])),
        "{text}"
    );
    assert_eq!(cluster.published(LINK).values().flatten().count(), 0);

    // Commits and seals go to the planner; another replica says where it is.
    let mut at_one = cluster.client(1, WRITER).await;
    let body = handoff_proto::Commit {
        link: LINK.into(),
        attempts: vec![handoff_proto::PartitionAttempt {
            partition,
            attempt: 0,
        }],
        ..Default::default()
    };
    let err = at_one
        .raw_action("commit", body.encode_to_vec())
        .await
        .expect_err("not the planner");
    assert_eq!(code(&err), Some(tonic::Code::FailedPrecondition));
    assert!(err.to_string().contains(&cluster.peers[0]), "{err}");
    // `apply` is replica to replica: a writer cannot skip the planner's record.
    assert_eq!(
        refusal(&mut at_one, "apply", body.encode_to_vec()).await,
        tonic::Code::PermissionDenied,
        "admin only"
    );
    // So is `unapply`, and each replica takes back only its own partitions.
    assert_eq!(
        refusal(&mut at_one, "unapply", body.encode_to_vec()).await,
        tonic::Code::PermissionDenied,
        "admin only"
    );
    assert_eq!(
        refusal(
            &mut cluster.client(1, ADMIN).await,
            "unapply",
            body.encode_to_vec()
        )
        .await,
        tonic::Code::FailedPrecondition,
        "replica 2's partition"
    );
    // `import-part` is the planner's: a writer may not make a replica read files.
    let share = handoff_proto::ImportPart {
        link: LINK.into(),
        files: vec!["file:///etc/passwd".into()],
        schema: Default::default(),
    };
    assert_eq!(
        refusal(&mut at_one, "import-part", share.encode_to_vec()).await,
        tonic::Code::PermissionDenied,
        "admin only"
    );
    // Even the planner's share is checked against the replica's own allowlist (import is off).
    assert_eq!(
        refusal(
            &mut cluster.client(1, ADMIN).await,
            "import-part",
            share.encode_to_vec()
        )
        .await,
        tonic::Code::PermissionDenied,
        "import is off here"
    );
    // A commit naming an attempt nobody staged is refused before anything is recorded.
    let err = admin
        .commit(LINK, &[(partition, 0)])
        .await
        .expect_err("not staged");
    assert_eq!(code(&err), Some(tonic::Code::FailedPrecondition), "{err}");
    let records = storage(&cluster.dirs[0])
        .pending_commits()
        .await
        .expect("records");
    assert!(records.is_empty(), "{records:?}");
    // A shard ticket reads one server: a replica alone must not answer with part of a link.
    let err = admin
        .read_shard(shard(0, 1, 0))
        .await
        .expect_err("part of a link");
    assert_eq!(code(&err), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains(&cluster.peers[0]), "{err}");
    // `read-done` is replica to planner, and its numbers are checked.
    let done = |world_size, rank, replica| {
        handoff_proto::ReadDone {
            link: LINK.into(),
            world_size,
            epoch: 0,
            rank,
            replica,
        }
        .encode_to_vec()
    };
    assert_eq!(
        refusal(&mut at_one, "read-done", done(1, 0, 1)).await,
        tonic::Code::PermissionDenied,
        "admin only"
    );
    let mut admin_at_one = cluster.client(1, ADMIN).await;
    assert_eq!(
        refusal(&mut admin_at_one, "read-done", done(1, 0, 1)).await,
        tonic::Code::FailedPrecondition,
        "not the planner"
    );
    for (world, rank, replica) in [(0, 0, 0), (2, 2, 0), (u32::MAX, 0, 0), (2, 0, 3)] {
        let err = admin
            .raw_action("read-done", done(world, rank, replica))
            .await
            .expect_err("out of range");
        assert_eq!(code(&err), Some(tonic::Code::InvalidArgument), "{err}");
    }
    assert_eq!(
        refusal(&mut admin, "read-done", vec![0xff; 7]).await,
        tonic::Code::InvalidArgument,
        "not a ReadDone"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_planner_finishes_a_recorded_commit() {
    let mut cluster = Cluster::start().await;
    let mut writer = cluster.client(0, WRITER).await;
    // Partitions of replicas 1 and 2: their staged data outlives the planner.
    let elsewhere: Vec<u64> = (0..40)
        .filter(|p| owner(LINK, *p, REPLICAS) != 0)
        .take(6)
        .collect();
    for &p in &elsewhere {
        stage(&mut writer, p, 0).await;
    }
    // The planner recorded the decision, then died before applying it.
    let winners: Vec<(u64, u64)> = elsewhere.iter().map(|&p| (p, 0)).collect();
    storage(&cluster.dirs[0])
        .record_commit(LINK, false, &winners, REPLICAS)
        .await
        .expect("record");
    assert_eq!(cluster.published(LINK).values().flatten().count(), 0);
    cluster.restart(0).await;
    let published = eventually("the recorded commit finished", || async {
        let published = cluster.published(LINK);
        (published.values().flatten().count() == elsewhere.len()).then_some(published)
    })
    .await;
    for (replica, parts) in &published {
        for (partition, attempt, _) in parts {
            assert_eq!(owner(LINK, *partition, REPLICAS) as usize, *replica);
            assert_eq!(*attempt, 0);
        }
    }
    eventually("the record marked applied", || async {
        storage(&cluster.dirs[0])
            .pending_commits()
            .await
            .expect("records")
            .is_empty()
            .then_some(())
    })
    .await;
    let mut writer = cluster.client(0, WRITER).await;
    let stats = writer.seal(LINK).await.expect("seal");
    assert_eq!(stats.rows, elsewhere.len() as u64 * 10);

    // A record from before owners' instances were kept, whose partition died with the
    // planner, cannot be judged: it stays recorded, the start says so, and the seal is refused
    // with the reason (never applied by halves in silence).
    let lost = "team/lost";
    storage(&cluster.dirs[0])
        .record_commit(lost, false, &[(0, 0)], REPLICAS)
        .await
        .expect("record");
    cluster.restart(0).await;
    let err = eventually("the seal refused", || async {
        let mut admin = cluster.client(0, ADMIN).await;
        match admin.seal(lost).await {
            Err(e) if e.to_string().contains("is recorded but cannot be applied") => Some(e),
            _ => None,
        }
    })
    .await;
    assert_eq!(code(&err), Some(tonic::Code::FailedPrecondition), "{err}");
    cluster.stop().await;
}

/// Runs `query` with Flight SQL at replica `at`, as `token`.
async fn sql(
    cluster: &Cluster,
    at: usize,
    token: &str,
    query: &str,
) -> Result<Vec<arrow_array::RecordBatch>, arrow_flight::error::FlightError> {
    let mut sql =
        arrow_flight::sql::client::FlightSqlServiceClient::new(cluster.server(at).channel().await);
    sql.set_header("authorization", format!("Bearer {token}"));
    let info = sql.execute(query.to_string(), None).await?;
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    sql.do_get(ticket).await?.try_collect().await
}

/// The refusal of `SELECT count(*)` over the link at replica `at`.
async fn count_refused(cluster: &Cluster, at: usize) -> tonic::Status {
    let query = format!("SELECT count(*) FROM \"{LINK}\"");
    status_of(sql(cluster, at, READER, &query).await.expect_err("refused"))
}

fn status_of(e: arrow_flight::error::FlightError) -> tonic::Status {
    match e {
        arrow_flight::error::FlightError::Tonic(status) => *status,
        other => panic!("not a gRPC status: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_link_reads_listings_and_flight_sql_span_every_replica() {
    let cluster = Cluster::start().await;
    let mut writer = cluster.client(2, WRITER).await;
    let winners: Vec<(u64, u64)> = (0..9).map(|p| (p, 0)).collect();
    for &(p, a) in &winners {
        stage(&mut writer, p, a).await;
    }
    writer.commit(LINK, &winners).await.expect("commit");
    // Before the seal a query would see part of the link on some replicas: not a table yet.
    let err = count_refused(&cluster, 0).await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    writer.seal(LINK).await.expect("seal");
    let held = cluster.published(LINK);
    assert!(
        held.values().all(|parts| !parts.is_empty()),
        "9 partitions reach every replica: {held:?}"
    );

    // The whole link's FlightInfo, asked at replica 1 (the client goes to the planner): every
    // partition once, each located at its owner.
    let mut reader = cluster.client(1, READER).await;
    let info = reader.flight_info(LINK).await.expect("info");
    assert_eq!(info.total_records, 90);
    let mut located = BTreeMap::new();
    for endpoint in &info.endpoint {
        let about: serde_json::Value =
            serde_json::from_slice(&endpoint.app_metadata).expect("about");
        let partition = about["partition"].as_u64().expect("partition");
        let at = endpoint.location[0].uri.clone();
        assert_eq!(
            at,
            cluster.peers[owner(LINK, partition, REPLICAS) as usize],
            "partition {partition}"
        );
        assert_eq!(about["replica"], owner(LINK, partition, REPLICAS));
        located.insert(partition, at);
    }
    assert_eq!(located.len(), 9);
    // A whole-link read follows the locations: every row once.
    let (_, streams) = reader.read_link(LINK).await.expect("read");
    let mut all = Vec::new();
    for mut stream in streams {
        while let Some(b) = stream.next().await {
            all.extend(ids(&b.expect("batch")));
        }
    }
    all.sort_unstable();
    let expected: Vec<i64> = (0..9).flat_map(|p| p * 100..p * 100 + 10).collect();
    assert_eq!(all, expected);
    // The listing names the link once, whole.
    let listed = reader.list().await.expect("list");
    let ours: Vec<_> = listed
        .iter()
        .filter(|i| {
            i.flight_descriptor
                .as_ref()
                .is_some_and(|d| d.path == [LINK])
        })
        .collect();
    assert_eq!(ours.len(), 1);
    assert_eq!((ours[0].total_records, ours[0].endpoint.len()), (90, 9));
    // Asked of another replica directly, these say where to go.
    let mut direct = FlightClient::new(cluster.server(2).channel().await);
    direct
        .add_header("authorization", &format!("Bearer {READER}"))
        .expect("header");
    let err = direct
        .get_flight_info(FlightDescriptor::new_path(vec![LINK.into()]))
        .await
        .expect_err("not the planner");
    let err = status_of(err);
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(&cluster.peers[0]), "{err}");

    // Flight SQL at the planner: sums, filters, projections and counts over every replica.
    let batches = sql(
        &cluster,
        0,
        READER,
        &format!(
            "SELECT count(*) AS n, sum(id) AS s, min(name) AS first FROM \"{LINK}\" WHERE x >= 0"
        ),
    )
    .await
    .expect("query");
    let row = &batches[0];
    let n = row
        .column(0)
        .as_any()
        .downcast_ref::<arrow_array::Int64Array>()
        .expect("n");
    let total = row
        .column(1)
        .as_any()
        .downcast_ref::<arrow_array::Int64Array>()
        .expect("s");
    assert_eq!(
        (n.value(0), total.value(0)),
        (90, expected.iter().sum::<i64>())
    );
    let batches = sql(
        &cluster,
        0,
        READER,
        &format!("SELECT id FROM \"{LINK}\" WHERE id % 100 = 9 ORDER BY id"),
    )
    .await
    .expect("query");
    let nines: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            let id = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow_array::Int64Array>();
            id.expect("id").values().to_vec()
        })
        .collect();
    assert_eq!(nines, (0..9).map(|p| p * 100 + 9).collect::<Vec<_>>());
    // Another replica sends SQL to the planner.
    let err = count_refused(&cluster, 1).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(&cluster.peers[0]), "{err}");
    cluster.stop().await;
}

/// Every message of one endpoint, read directly at the replica it is located at, as a reader.
async fn read_endpoint(
    cluster: &Cluster,
    endpoint: &arrow_flight::FlightEndpoint,
) -> Vec<arrow_array::RecordBatch> {
    let at = cluster
        .peers
        .iter()
        .position(|p| endpoint.location.iter().any(|l| &l.uri == p))
        .expect("located at a replica");
    let mut direct = FlightClient::new(cluster.server(at).channel().await);
    direct
        .add_header("authorization", &format!("Bearer {READER}"))
        .expect("header");
    direct
        .do_get(endpoint.ticket.clone().expect("ticket"))
        .await
        .expect("read")
        .try_collect()
        .await
        .expect("every message")
}

/// The code of an action that must be refused (the message is printed on a mismatch).
async fn refusal(client: &mut HandoffClient, action: &str, body: Vec<u8>) -> tonic::Code {
    let err = client.raw_action(action, body).await.expect_err("refused");
    println!("{action}: {err}");
    code(&err).unwrap_or(tonic::Code::Unknown)
}

/// Create `link` (with no options) through the planner, on every replica.
async fn create(admin: &mut HandoffClient, link: &str) {
    admin
        .create(handoff_client::CreateLink {
            link: link.into(),
            ..Default::default()
        })
        .await
        .expect("create");
}

/// Ten rows into `partition` of `link` (staged as attempt 0), at its owner.
async fn stage_in(client: &mut HandoffClient, link: &str, partition: u64) {
    client
        .put_partition(link, partition, 0, stream_of(vec![batch(0, 10)]))
        .await
        .expect("put");
}

/// A partition id that `replica` owns in `link`, from `from` up.
fn owned_by(link: &str, replica: u32, from: u64) -> u64 {
    (from..from + 1000)
        .find(|p| owner(link, *p, REPLICAS) == replica)
        .expect("a partition of that replica")
}

/// Whether any replica still holds a part of `link`.
fn held_anywhere(cluster: &Cluster, link: &str) -> Vec<usize> {
    (0..REPLICAS as usize)
        .filter(|i| cluster.server(*i).store.link(link).is_ok())
        .collect()
}

async fn gone_everywhere(cluster: &Cluster, link: &str) {
    eventually(&format!("{link} gone from every replica"), || async {
        held_anywhere(cluster, link).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttls_and_the_idle_timeout_expire_the_whole_link_on_every_replica() {
    let idle = std::time::Duration::from_secs(2);
    let cluster = Cluster::start_configured(false, |_, config| ServerConfig {
        idle_timeout: Some(idle),
        ..config
    })
    .await;
    let mut admin = cluster.client(0, ADMIN).await;
    let mut writer = cluster.client(2, WRITER).await;

    // Idle: writes go on at replica 1 only. Replica 2's part (one committed partition) and the
    // planner's (none) sit unwritten for longer than the timeout, and are kept: the link is
    // written. Before, replica 2 dropped its part on its own, and the seal then went through
    // without that partition.
    let busy = "team/busy";
    create(&mut admin, busy).await;
    let early = owned_by(busy, 2, 0);
    stage_in(&mut writer, busy, early).await;
    writer.commit(busy, &[(early, 0)]).await.expect("commit");
    let started = std::time::Instant::now();
    let mut next = 1000;
    while started.elapsed() < idle * 2 {
        next = owned_by(busy, 1, next + 1);
        stage_in(&mut writer, busy, next).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(held_anywhere(&cluster, busy), vec![0, 1, 2]);
    assert_eq!(
        cluster
            .server(2)
            .store
            .stats(busy)
            .expect("kept")
            .partitions,
        1,
        "replica 2 keeps its committed partition while the link is written elsewhere"
    );
    // Then nobody writes: the planner deletes the link on every replica, staged parts too.
    gone_everywhere(&cluster, busy).await;

    // TTL after seal: the whole link goes, from every replica.
    let sealed = "team/sealed";
    admin
        .create(handoff_client::CreateLink {
            link: sealed.into(),
            ttl_seconds_after_seal: 1,
            ..Default::default()
        })
        .await
        .expect("create");
    let parts: Vec<(u64, u64)> = (0..REPLICAS).map(|r| (owned_by(sealed, r, 0), 0)).collect();
    for (p, _) in &parts {
        stage_in(&mut writer, sealed, *p).await;
    }
    writer.commit(sealed, &parts).await.expect("commit");
    writer.seal(sealed).await.expect("seal");
    gone_everywhere(&cluster, sealed).await;

    // TTL after read: it starts when every rank has read every part it was planned, at
    // whichever replicas hold them; a rank that read only some of its shard does not count.
    let read = "team/read";
    admin
        .create(handoff_client::CreateLink {
            link: read.into(),
            ttl_seconds_after_read: 1,
            ..Default::default()
        })
        .await
        .expect("create");
    let parts: Vec<(u64, u64)> = (0..REPLICAS)
        .flat_map(|r| [(owned_by(read, r, 0), 0), (owned_by(read, r, 100), 0)])
        .collect();
    for (p, _) in &parts {
        stage_in(&mut writer, read, *p).await;
    }
    writer.commit(read, &parts).await.expect("commit");
    writer.seal(read).await.expect("seal");
    let world = 2;
    let rank_shard = |rank| handoff_client::ReadShard {
        link: read.into(),
        rank,
        world_size: world,
        batch_rows: 4,
        ..Default::default()
    };
    let mut reader = cluster.client(1, READER).await;
    // Rank 1 reads one of its parts whole and not the others; rank 0 reads all of its shard.
    let plan = reader.shard_info(&rank_shard(1)).await.expect("plan");
    assert!(
        plan.endpoint.len() >= 2,
        "rank 1 reads from several replicas"
    );
    let part = read_endpoint(&cluster, &plan.endpoint[0]).await;
    assert!(!part.is_empty());
    let mut rank0 = reader.shard_batches(rank_shard(0)).await.expect("plan");
    let mut rows = 0;
    while let Some(b) = rank0.next().await {
        rows += b.expect("batch").num_rows();
    }
    assert_eq!(
        rows, 32,
        "rank 0 of 2: 60 rows in batches of 4, padded to 8 batches"
    );
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        held_anywhere(&cluster, read),
        vec![0, 1, 2],
        "one rank of two read its shard: the read TTL has not started"
    );
    let mut rank1 = reader.shard_batches(rank_shard(1)).await.expect("plan");
    while let Some(b) = rank1.next().await {
        b.expect("batch");
    }
    gone_everywhere(&cluster, read).await;
    let gone = admin.stats(read).await.expect_err("deleted");
    assert_eq!(code(&gone), Some(tonic::Code::NotFound), "{gone}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_are_committed_by_the_planner_and_their_loss_is_reported() {
    let mut cluster = Cluster::start().await;
    // Plain appends (PATH descriptors) at every replica: each is staged there under an id it
    // owns and committed by the planner, so it is in a commit record.
    let mut ids = BTreeMap::<usize, Vec<u64>>::new();
    for (at, count) in [(0usize, 1usize), (1, 1), (2, 3)] {
        let mut client = cluster.client(at, WRITER).await;
        for n in 0..count {
            let put = client
                .put(LINK, stream_of(vec![batch(n as i64 * 10, 10)]))
                .await
                .expect("append");
            assert!(put.committed && put.rows == 10, "{put:?}");
            assert!(put.partition >= handoff_store::APPEND_IDS_FROM, "{put:?}");
            assert_eq!(owner(LINK, put.partition, REPLICAS) as usize, at);
            ids.entry(at).or_default().push(put.partition);
        }
    }
    let records = storage(&cluster.dirs[0])
        .pending_commits()
        .await
        .expect("records");
    assert!(records.is_empty(), "every append applied: {records:?}");
    let mut admin = cluster.client(0, ADMIN).await;
    assert_eq!(admin.stats(LINK).await.expect("stats").rows, 50);

    // Replica 2 restarts without a snapshot: its three appends are reported lost, by id, and
    // the seal is refused with what to do.
    cluster.restart(2).await;
    let stats: serde_json::Value = serde_json::from_slice(
        &admin
            .raw_action("stats", LINK.as_bytes().to_vec())
            .await
            .expect("stats"),
    )
    .expect("json");
    let mut lost = ids[&2].clone();
    lost.sort_unstable();
    assert_eq!(stats["lost"][0]["replica"], 2, "{stats}");
    assert_eq!(
        stats["lost"][0]["partitions"],
        serde_json::json!(lost),
        "{stats}"
    );
    let err = admin.seal(LINK).await.expect_err("lost appends");
    assert_eq!(code(&err), Some(tonic::Code::DataLoss), "{err}");
    assert!(err.to_string().contains("they were 3 appends"), "{err}");
    assert!(
        err.to_string()
            .contains("delete the link and write it again"),
        "{err}"
    );

    // An append while the planner is down is refused, and not published.
    let other = "team/other";
    create(&mut admin, other).await;
    cluster.down(0).await;
    let mut at_one = cluster.client(1, WRITER).await;
    let err = at_one
        .put(other, stream_of(vec![batch(0, 10)]))
        .await
        .expect_err("no planner");
    assert_eq!(code(&err), Some(tonic::Code::Unavailable), "{err}");
    assert!(err.to_string().contains("did not commit it"), "{err}");
    assert_eq!(cluster.server(1).store.stats(other).expect("stats").rows, 0);
    cluster.up(0, false).await;
    // A commit the planner recorded and could not apply is applied by the seal.
    let mut writer = cluster.client(0, WRITER).await;
    let late = owned_by(other, 1, 0);
    stage_in(&mut writer, other, late).await;
    storage(&cluster.dirs[0])
        .record_commit(other, false, &[(late, 0)], REPLICAS)
        .await
        .expect("record");
    let sealed = writer
        .seal(other)
        .await
        .expect("seal applies the record first");
    assert_eq!(sealed.rows, 10);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_planner_died_with_its_attempts_is_taken_back_and_the_job_commits_again() {
    let mut cluster = Cluster::start().await;
    let mut writer = cluster.client(1, WRITER).await;
    // Partitions on every replica, the planner's among them.
    let partitions: Vec<u64> = (0..12).collect();
    assert!(partitions.iter().any(|p| owner(LINK, *p, REPLICAS) == 0));
    for &p in &partitions {
        stage(&mut writer, p, 0).await;
    }
    // The planner checked every part, recorded the decision and applied it on replicas 1
    // and 2, then was killed before its own apply: its staged attempts died with it.
    let winners: Vec<(u64, u64)> = partitions.iter().map(|&p| (p, 0)).collect();
    let mut instances = BTreeMap::new();
    for i in 0..REPLICAS {
        instances.insert(i, cluster.server(i as usize).store.instance().to_string());
    }
    let record = storage(&cluster.dirs[0])
        .record_commit_checked(LINK, false, &winners, REPLICAS, instances)
        .await
        .expect("record");
    for replica in [1u32, 2] {
        let part: Vec<(u64, u64)> = winners
            .iter()
            .filter(|(p, _)| owner(LINK, *p, REPLICAS) == replica)
            .copied()
            .collect();
        let body = handoff_proto::Commit {
            link: LINK.into(),
            attempts: handoff_proto::PartitionAttempt::list(&part),
            ..Default::default()
        };
        let mut admin = cluster.client(replica as usize, ADMIN).await;
        admin
            .raw_action("apply", body.encode_to_vec())
            .await
            .expect("apply");
    }
    let half: usize = cluster.published(LINK).values().map(Vec::len).sum();
    assert!(
        half > 0 && half < partitions.len(),
        "half published: {half}"
    );
    cluster.restart(0).await;
    // The restarted planner abandons it: what replicas 1 and 2 published is taken back, so
    // nothing of the commit is published; the record is settled.
    eventually("the half-applied commit taken back", || async {
        let pending = storage(&cluster.dirs[0])
            .pending_commits()
            .await
            .expect("records");
        let published: usize = cluster.published(LINK).values().map(Vec::len).sum();
        (pending.is_empty() && published == 0).then_some(())
    })
    .await;
    // The marker says why, under the link's commit records (its name is escaped there).
    let marker = format!("{:020}.abandoned", record.seq);
    let dir = std::fs::read_dir(cluster.dirs[0].path().join("commits"))
        .expect("commits")
        .map(|entry| entry.expect("entry").path())
        .find(|dir| dir.join(&marker).exists())
        .expect("abandoned marker");
    let why = std::fs::read_to_string(dir.join(&marker)).expect("marker");
    assert!(why.contains("replica 0: partitions"), "{why}");
    // The job runs again (new attempts) and commits: exactly once, and the link seals whole.
    for &p in &partitions {
        stage(&mut writer, p, 1).await;
    }
    let again: Vec<(u64, u64)> = partitions.iter().map(|&p| (p, 1)).collect();
    let committed = writer.commit(LINK, &again).await.expect("commit again");
    assert_eq!(committed["rows"], partitions.len() * 10, "{committed}");
    let sealed = writer.seal(LINK).await.expect("seal");
    assert_eq!(sealed.rows, partitions.len() as u64 * 10);
    let published = cluster.published(LINK);
    assert_eq!(published.values().flatten().count(), partitions.len());
    assert!(
        published
            .values()
            .flatten()
            .all(|(_, attempt, _)| *attempt == 1)
    );
    cluster.stop().await;
}

/// `files` Parquet files of 1,000 rows each, ids from 0 in file order.
fn parquet_files(files: i64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in 0..files {
        let file = std::fs::File::create(dir.path().join(format!("part-{f}.parquet")))
            .expect("create file");
        let mut writer =
            datafusion::parquet::arrow::ArrowWriter::try_new(file, schema(), None).expect("writer");
        writer.write(&batch(f * 1000, 1000)).expect("write");
        writer.close().expect("close");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_spreads_its_files_over_every_replica_and_commits_them_at_once() {
    // Imports may read the tests' temporary files, except at replica 2 in the second cluster.
    let allow = |off: Option<u32>| {
        move |i: u32, config: ServerConfig| ServerConfig {
            import_allow: if Some(i) == off {
                Vec::new()
            } else {
                vec![format!("file://{}", std::env::temp_dir().display())]
            },
            ..config
        }
    };
    let files = parquet_files(6);
    let glob = format!("file://{}/*.parquet", files.path().display());
    let cluster = Cluster::start_configured(false, allow(None)).await;
    // Asked at replica 1, planned at replica 0: every replica reads a share of the files.
    let mut admin = cluster.client(1, ADMIN).await;
    let reply = admin
        .import("team/imported", &glob, true)
        .await
        .expect("import");
    assert_eq!(
        (&reply["files"], &reply["rows"], &reply["sealed"]),
        (
            &serde_json::json!(6),
            &serde_json::json!(6000),
            &serde_json::json!(true)
        ),
        "{reply}"
    );
    let stats = admin.stats("team/imported").await.expect("stats");
    assert_eq!((stats.state.as_str(), stats.rows), ("sealed", 6000));
    // Six files of one size: two to each replica, each partition at its owner.
    for part in &stats.replicas {
        assert_eq!(part.rows, 2000, "{part:?}");
    }
    for (replica, parts) in cluster.published("team/imported") {
        for (partition, attempt, _) in parts {
            assert_eq!(
                owner("team/imported", partition, REPLICAS) as usize,
                replica
            );
            assert_eq!(attempt, 0);
        }
    }
    let mut reader = cluster.client(2, READER).await;
    let mut ids = link_ids(&mut reader, "team/imported").await;
    ids.sort_unstable();
    assert_eq!(ids, (0..6000).collect::<Vec<i64>>(), "every row once");
    // A URL outside what the server may read is refused before anything is read.
    let err = admin
        .import("team/other", "file:///etc/*.parquet", false)
        .await
        .expect_err("not allowed");
    assert_eq!(code(&err), Some(tonic::Code::PermissionDenied), "{err}");
    cluster.stop().await;

    // One replica cannot import its share: nothing is committed, nothing stays staged.
    let cluster = Cluster::start_configured(false, allow(Some(2))).await;
    let mut admin = cluster.client(0, ADMIN).await;
    let err = admin
        .import("team/half", &glob, true)
        .await
        .expect_err("replica 2 refuses its share");
    assert_eq!(code(&err), Some(tonic::Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("replica 2"), "{err}");
    for i in 0..REPLICAS as usize {
        let stats = cluster.server(i).store.stats("team/half").expect("created");
        assert_eq!((stats.rows, stats.staged_partitions), (0, 0), "replica {i}");
    }
    let records = storage(&cluster.dirs[0])
        .pending_commits()
        .await
        .expect("records");
    assert!(records.is_empty(), "{records:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streaming_read_over_replicas_reads_each_row_as_it_commits() {
    let cluster = Cluster::start().await;
    let mut admin = cluster.client(0, ADMIN).await;
    create(&mut admin, LINK).await;
    let (world, b) = (2u32, 4u64);
    let streaming = |rank, drop_last| handoff_client::ReadShard {
        link: LINK.into(),
        rank,
        world_size: world,
        batch_rows: b,
        drop_last,
        mode: handoff_client::ReadMode::Streaming as i32,
        ..Default::default()
    };
    // Every rank starts reading before any row is written, from replica 1.
    let mut readers = Vec::new();
    for rank in 0..world {
        for drop_last in [false, true] {
            let mut client = cluster.client(1, READER).await;
            let shard = streaming(rank, drop_last);
            readers.push((
                drop_last,
                tokio::spawn(async move {
                    let mut batches = client.shard_batches(shard).await.expect("plan");
                    let mut got = Vec::new();
                    while let Some(batch) = batches.next().await {
                        got.push(ids(&batch.expect("batch")));
                    }
                    got
                }),
            ));
        }
    }
    // Two commits of 12 partitions of 10 rows, over every replica, then the seal.
    let mut writer = cluster.client(2, WRITER).await;
    for round in 0..2u64 {
        let partitions: Vec<u64> = (round * 6..round * 6 + 6).collect();
        for &p in &partitions {
            stage(&mut writer, p, 0).await;
        }
        let winners: Vec<(u64, u64)> = partitions.iter().map(|&p| (p, 0)).collect();
        writer.commit(LINK, &winners).await.expect("commit");
    }
    writer.seal(LINK).await.expect("seal");
    let all: std::collections::BTreeSet<i64> = (0..12)
        .flat_map(|p: i64| (p * 100..p * 100 + 10).collect::<Vec<_>>())
        .collect();
    let (mut padded, mut dropped) = (Vec::new(), Vec::new());
    for (drop_last, reader) in readers {
        let batches = reader.await.expect("reader");
        assert!(
            batches.iter().all(|x| x.len() == b as usize),
            "exactly batch_rows"
        );
        if drop_last {
            dropped.push(batches);
        } else {
            padded.push(batches);
        }
    }
    // Equal batch counts across ranks; every row at least once (padding repeats a few).
    assert_eq!(padded[0].len(), padded[1].len());
    let seen: std::collections::BTreeSet<i64> =
        padded.iter().flatten().flatten().copied().collect();
    assert_eq!(seen, all, "every row is read");
    let total: usize = padded.iter().flatten().map(Vec::len).sum();
    assert!(
        total < all.len() + REPLICAS as usize * (world as usize * b as usize),
        "padding at most a round per replica: {total} rows for {}",
        all.len()
    );
    // With drop_last: equal counts, no row twice.
    assert_eq!(dropped[0].len(), dropped[1].len());
    let rows: Vec<i64> = dropped.iter().flatten().flatten().copied().collect();
    let unique: std::collections::BTreeSet<i64> = rows.iter().copied().collect();
    assert_eq!(rows.len(), unique.len(), "no row twice with drop_last");
    assert!(unique.is_subset(&all));
    // A streaming read over replicas starts at the beginning.
    let mut resumed = streaming(0, false);
    resumed.start_batch = 1;
    let err = admin.shard_info(&resumed).await.expect_err("no resume");
    assert_eq!(code(&err), Some(tonic::Code::InvalidArgument), "{err}");
    // A shard_part ticket is a streaming part only.
    let part = handoff_proto::Ticket {
        kind: Some(handoff_proto::ticket::Kind::ShardPart(
            handoff_proto::ReadShard {
                link: LINK.into(),
                world_size: 1,
                batch_rows: 4,
                ..Default::default()
            },
        )),
    };
    let mut direct = FlightClient::new(cluster.server(1).channel().await);
    direct
        .add_header("authorization", &format!("Bearer {READER}"))
        .expect("header");
    let err = match direct
        .do_get(arrow_flight::Ticket::new(part.encode_to_vec()))
        .await
    {
        Ok(mut stream) => stream
            .next()
            .await
            .expect("an answer")
            .expect_err("refused"),
        Err(e) => e,
    };
    assert_eq!(status_of(err).code(), tonic::Code::InvalidArgument);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joined_messages_over_replicas_give_the_same_batches_in_fewer_messages() {
    let cluster = Cluster::start().await;
    let mut writer = cluster.client(1, WRITER).await;
    let winners: Vec<(u64, u64)> = (0..12).map(|p| (p, 0)).collect();
    for &(p, _) in &winners {
        stage(&mut writer, p, 0).await;
    }
    writer.commit(LINK, &winners).await.expect("commit");
    writer.seal(LINK).await.expect("seal");
    for rank in 0..2 {
        let alone = handoff_client::ReadShard {
            shuffle: true,
            seed: 5,
            ..shard(rank, 2, 4)
        };
        let joined = handoff_client::ReadShard {
            batches_per_message: 4,
            ..alone.clone()
        };
        assert_eq!(
            batch_ids(&cluster, 2, joined.clone()).await,
            batch_ids(&cluster, 2, alone).await,
            "rank {rank}: the same batches, joined or not"
        );
        // Each replica's stream joins whole batches: fewer, larger messages.
        let mut client = cluster.client(0, READER).await;
        let plan = client.shard_info(&joined).await.expect("plan");
        let messages = read_endpoint(&cluster, &plan.endpoint[0]).await;
        assert!(
            messages.iter().any(|m| m.num_rows() > 4),
            "some message joins batches: {:?}",
            messages.iter().map(|m| m.num_rows()).collect::<Vec<_>>()
        );
    }
    cluster.stop().await;
}
