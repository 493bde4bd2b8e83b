//! End-to-end tests of the Flight protocol against a real in-process server.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightData, FlightDescriptor};
use common::*;
use futures::StreamExt;
use handoff_client::{ReadMode, ReadShard};
use handoff_server::ServerConfig;
use handoff_store::StoreConfig;
use tonic::Code;

fn code(err: handoff_client::ClientError) -> Code {
    err.code()
        .unwrap_or_else(|| panic!("expected a gRPC status, got {err}"))
}

/// 5 partitions of uneven sizes, 1003 rows in all, ids 0..1003.
async fn fill(client: &mut handoff_client::HandoffClient, link: &str) -> usize {
    let sizes = [100usize, 1, 400, 250, 252];
    let mut start = 0i64;
    for size in sizes {
        // Two batches per partition, so shards cross frame boundaries.
        let half = size / 2;
        let batches = vec![batch(start, half), batch(start + half as i64, size - half)];
        client.put(link, stream_of(batches)).await.expect("put");
        start += size as i64;
    }
    start as usize
}

#[tokio::test]
async fn put_seal_and_read_every_row_once() {
    let server = Fixture::start().await;
    let mut client = server.admin().await;
    let n = fill(&mut client, "ns/features").await;
    let stats = client.seal("ns/features").await.expect("seal");
    assert_eq!(
        (stats.rows, stats.partitions, stats.state.as_str()),
        (n as u64, 5, "sealed")
    );

    let (info, streams) = client.read_link("ns/features").await.expect("read");
    assert_eq!(info.total_records, n as i64);
    assert!(info.total_bytes > 0);
    assert_eq!(info.endpoint.len(), 5);
    assert_eq!(
        info.clone()
            .try_decode_schema()
            .expect("schema")
            .fields()
            .len(),
        4
    );
    let mut all = Vec::new();
    for stream in streams {
        for b in collect(stream).await {
            all.extend(ids(&b));
        }
    }
    assert_eq!(all, (0..n as i64).collect::<Vec<_>>());
    let listed = client.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn both_doget_paths_return_identical_data() {
    for zero_copy_get in [true, false] {
        let server = Fixture::start_with(
            ServerConfig {
                zero_copy_get,
                ..Default::default()
            },
            StoreConfig::default(),
        )
        .await;
        let mut client = server.admin().await;
        let n = fill(&mut client, "l").await;
        client.seal("l").await.expect("seal");
        let mut got = Vec::new();
        for rank in 0..2 {
            let shard = ReadShard {
                link: "l".into(),
                rank,
                world_size: 2,
                batch_rows: 7,
                ..Default::default()
            };
            for b in collect(client.read_shard(shard).await.expect("shard")).await {
                got.extend(ids(&b));
            }
        }
        got.sort_unstable();
        got.dedup();
        assert_eq!(
            got,
            (0..n as i64).collect::<Vec<_>>(),
            "zero_copy_get={zero_copy_get}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn two_phase_commit_publishes_exactly_the_winning_attempts() {
    let server = Fixture::start().await;
    let mut w = server.client(WRITER).await;
    // Partition 0 has a failed first attempt and a winning second; partition 1 a speculative twin.
    w.put_partition("tpc", 0, 0, stream_of(vec![batch(0, 10)]))
        .await
        .expect("stage 0/0");
    w.put_partition("tpc", 0, 1, stream_of(vec![batch(0, 10)]))
        .await
        .expect("stage 0/1");
    w.put_partition("tpc", 1, 0, stream_of(vec![batch(10, 5)]))
        .await
        .expect("stage 1/0");
    w.put_partition("tpc", 1, 1, stream_of(vec![batch(10, 5)]))
        .await
        .expect("stage 1/1");
    let before = w.stats("tpc").await.expect("stats");
    assert_eq!(
        (before.rows, before.staged_partitions),
        (0, 4),
        "staged data is invisible"
    );

    w.commit("tpc", &[(0, 1), (1, 0)]).await.expect("commit");
    let after = w.stats("tpc").await.expect("stats");
    assert_eq!(
        (after.rows, after.partitions, after.staged_partitions),
        (15, 2, 0)
    );

    // The same partition again, by any attempt, is an error and changes nothing.
    let again = w.commit("tpc", &[(0, 0)]).await.expect_err("second commit");
    assert_eq!(code(again), Code::AlreadyExists);
    let restage = w
        .put_partition("tpc", 1, 2, stream_of(vec![batch(10, 5)]))
        .await
        .expect_err("restage");
    assert_eq!(code(restage), Code::AlreadyExists);
    // Unknown attempts fail the whole commit atomically.
    w.put_partition("tpc", 2, 0, stream_of(vec![batch(15, 5)]))
        .await
        .expect("stage 2/0");
    let partial = w
        .commit("tpc", &[(2, 0), (3, 0)])
        .await
        .expect_err("unknown attempt");
    assert_eq!(code(partial), Code::FailedPrecondition);
    assert_eq!(w.stats("tpc").await.expect("stats").rows, 15);
    let err = w
        .abort("tpc", &[])
        .await
        .expect_err("a writer names its attempts");
    assert_eq!(code(err), Code::InvalidArgument);
    let mut admin = server.admin().await;
    admin
        .abort("tpc", &[])
        .await
        .expect("an admin may drop every job's");
    assert_eq!(w.stats("tpc").await.expect("stats").staged_partitions, 0);

    w.seal("tpc").await.expect("seal");
    let mut r = server.client(READER).await;
    let mut got = link_ids(&mut r, "tpc").await;
    got.sort_unstable();
    assert_eq!(got, (0..15).collect::<Vec<_>>());
    assert_memory_is_only(&server, "tpc", "aborted data freed");
    server.stop().await;
}

#[tokio::test]
async fn a_broken_stream_leaves_nothing_and_frees_its_memory() {
    let server = Fixture::start().await;
    let endpoint = server.endpoint.clone();
    // The writer runs on its own runtime; shutting that runtime down closes its socket for real,
    // as a killed Spark executor would.
    let writer_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    writer_runtime.spawn(async move {
        let mut client = handoff_client::HandoffClient::connect(&endpoint, Some(ADMIN.into()))
            .await
            .expect("connect");
        // Ten batches, then a stream that never ends.
        let batches = futures::stream::iter((0..10).map(|i| Ok(batch(i * 1000, 1000))))
            .chain(futures::stream::pending());
        let _ = client.put_partition("broken", 0, 0, batches).await;
    });
    let memory = server.store.memory();
    handoff_testkit::eventually("the writer's data to arrive", || async {
        (memory.used() != 0).then_some(())
    })
    .await;
    writer_runtime.shutdown_background();
    handoff_testkit::eventually("the broken stream's memory to be freed", || async {
        (memory.used() == 0).then_some(())
    })
    .await;
    let stats = server.store.stats("broken").expect("link exists");
    assert_eq!(
        (stats.staged_partitions, stats.partitions, stats.rows),
        (0, 0, 0)
    );
    server.stop().await;
}

async fn read_rank(client: &mut handoff_client::HandoffClient, shard: ReadShard) -> Vec<Vec<i64>> {
    collect(client.read_shard(shard).await.expect("shard"))
        .await
        .iter()
        .map(ids)
        .collect()
}

/// A batch cut from a partition stored as one large frame shares the frame's buffers; it still
/// travels as one message, so a reader gets exactly `batch_rows` rows per batch.
#[tokio::test]
async fn batches_cut_from_a_large_partition_arrive_whole() {
    let server = Fixture::start().await;
    let mut client = server.admin().await;
    client
        .put("big", stream_of(vec![batch(0, 400_000)]))
        .await
        .expect("put");
    client.seal("big").await.expect("seal");
    let shard = ReadShard {
        link: "big".into(),
        rank: 0,
        world_size: 1,
        batch_rows: 1000,
        ..Default::default()
    };
    let batches = read_rank(&mut client, shard).await;
    assert_eq!(batches.len(), 400);
    assert!(batches.iter().all(|b| b.len() == 1000));
    assert_eq!(batches.concat(), (0..400_000).collect::<Vec<i64>>());
    server.stop().await;
}

/// `batches_per_message`: consecutive whole batches share a message, and cutting each message
/// at `batch_rows` gives exactly the batches a one-by-one read gets, shuffled or not, on both
/// DoGet paths; within the message size; never for streaming reads; bounded.
#[tokio::test]
async fn joined_messages_cut_back_into_the_same_batches() {
    for (zero_copy_get, max_flight_data_size) in [(true, 8 << 20), (false, 8 << 20), (true, 2048)] {
        let server = Fixture::start_with(
            ServerConfig {
                zero_copy_get,
                max_flight_data_size,
                ..Default::default()
            },
            StoreConfig::default(),
        )
        .await;
        let mut client = server.admin().await;
        fill(&mut client, "j").await;
        client.seal("j").await.expect("seal");
        let b = 16usize;
        for (world, shuffle) in [(1u32, false), (3, false), (3, true)] {
            for rank in 0..world {
                let shard = |batches_per_message| ReadShard {
                    link: "j".into(),
                    rank,
                    world_size: world,
                    batch_rows: b as u64,
                    shuffle,
                    seed: 7,
                    batches_per_message,
                    ..Default::default()
                };
                let alone = read_rank(&mut client, shard(0)).await;
                assert!(alone.iter().all(|x| x.len() == b));
                let joined = read_rank(&mut client, shard(5)).await;
                assert!(joined.iter().all(|m| m.len() % b == 0 && m.len() <= 5 * b));
                let most = joined.iter().map(|m| m.len() / b).max().unwrap_or(0);
                if max_flight_data_size > 4096 {
                    assert_eq!(joined.len(), alone.len().div_ceil(5), "5 batches a message");
                } else {
                    // About 650 bytes a batch: 3 fit in 2 KiB.
                    assert!((2..5).contains(&most), "{most} batches in a 2 KiB message");
                }
                let cut: Vec<Vec<i64>> = joined
                    .iter()
                    .flat_map(|m| m.chunks(b).map(<[i64]>::to_vec))
                    .collect();
                assert_eq!(cut, alone, "world {world} rank {rank} shuffle {shuffle}");
            }
        }
        // A streaming read sends each batch as it comes.
        let streaming = ReadShard {
            link: "j".into(),
            rank: 0,
            world_size: 1,
            batch_rows: b as u64,
            mode: ReadMode::Streaming as i32,
            batches_per_message: 5,
            ..Default::default()
        };
        assert!(
            read_rank(&mut client, streaming)
                .await
                .iter()
                .all(|x| x.len() == b)
        );
        // Bounded: refused at GetFlightInfo and at DoGet, saying what fits.
        let hostile = ReadShard {
            link: "j".into(),
            rank: 0,
            world_size: 1,
            batch_rows: b as u64,
            batches_per_message: u32::MAX,
            ..Default::default()
        };
        let err = client.shard_info(&hostile).await.expect_err("refused");
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains("0 to 64"), "{err}");
        let Err(err) = client.read_shard(hostile).await else {
            panic!("batches_per_message past 64 was not refused at DoGet");
        };
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
        server.stop().await;
    }
}

#[tokio::test]
async fn shards_are_disjoint_complete_and_equal() {
    let server = Fixture::start().await;
    let mut client = server.admin().await;
    let n = fill(&mut client, "s").await as i64;
    client.seal("s").await.expect("seal");
    let b = 16usize;
    for world in [1u32, 2, 3, 7] {
        for shuffle in [false, true] {
            for drop_last in [false, true] {
                let mut per_rank = Vec::new();
                for rank in 0..world {
                    let shard = ReadShard {
                        link: "s".into(),
                        rank,
                        world_size: world,
                        batch_rows: b as u64,
                        shuffle,
                        drop_last,
                        seed: 42,
                        ..Default::default()
                    };
                    let info = client.shard_info(&shard).await.expect("info");
                    let batches = read_rank(&mut client, shard).await;
                    assert!(
                        batches.iter().all(|x| x.len() == b),
                        "every batch has exactly batch_rows rows"
                    );
                    assert_eq!(info.total_records as usize, batches.len() * b);
                    per_rank.push(batches);
                }
                let counts: Vec<usize> = per_rank.iter().map(Vec::len).collect();
                assert!(
                    counts.iter().all(|c| *c == counts[0]),
                    "equal batch counts {counts:?}"
                );
                let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
                for id in per_rank.iter().flatten().flatten() {
                    *seen.entry(*id).or_default() += 1;
                }
                let read = counts[0] * b * world as usize;
                let span = b * world as usize;
                if drop_last {
                    assert!(
                        seen.values().all(|c| *c == 1),
                        "no row twice with drop_last"
                    );
                    assert_eq!(seen.len(), read);
                    assert!((n as usize) - read < span);
                } else {
                    assert_eq!(seen.len(), n as usize, "every row read with padding");
                    assert!(read - (n as usize) < span);
                    assert_eq!(
                        seen.values().filter(|c| **c == 2).count(),
                        read - n as usize
                    );
                }
                assert!(seen.keys().all(|id| (0..n).contains(id)));
                if shuffle {
                    let first = &per_rank[0][0];
                    assert!(
                        first.windows(2).any(|w| w[1] != w[0] + 1),
                        "shuffled rows are not in order"
                    );
                    let partitions: std::collections::BTreeSet<i64> = first
                        .iter()
                        .map(|id| {
                            if *id < 100 {
                                0
                            } else if *id < 501 {
                                2
                            } else if *id < 751 {
                                3
                            } else {
                                4
                            }
                        })
                        .collect();
                    assert!(partitions.len() > 1, "a shuffled batch mixes partitions");
                }
            }
        }
        // Without re-batching: contiguous ranges, every row exactly once.
        let mut all = Vec::new();
        for rank in 0..world {
            let shard = ReadShard {
                link: "s".into(),
                rank,
                world_size: world,
                ..Default::default()
            };
            all.extend(read_rank(&mut client, shard).await.into_iter().flatten());
        }
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }
    // Epochs reshuffle, the same (seed, epoch) repeats.
    let shard = |epoch| ReadShard {
        link: "s".into(),
        rank: 0,
        world_size: 2,
        batch_rows: 16,
        shuffle: true,
        seed: 1,
        epoch,
        ..Default::default()
    };
    let e0 = read_rank(&mut client, shard(0)).await;
    assert_eq!(e0, read_rank(&mut client, shard(0)).await);
    assert_ne!(e0, read_rank(&mut client, shard(1)).await);
    server.stop().await;
}

#[tokio::test]
async fn start_batch_resumes_mid_epoch() {
    let server = Fixture::start().await;
    let mut client = server.admin().await;
    fill(&mut client, "r").await;
    client.seal("r").await.expect("seal");
    for shuffle in [false, true] {
        let shard = ReadShard {
            link: "r".into(),
            rank: 1,
            world_size: 3,
            batch_rows: 10,
            shuffle,
            seed: 9,
            epoch: 3,
            ..Default::default()
        };
        let full = read_rank(&mut client, shard.clone()).await;
        for k in [0usize, 1, 17, full.len()] {
            let rest = read_rank(
                &mut client,
                ReadShard {
                    start_batch: k as u64,
                    ..shard.clone()
                },
            )
            .await;
            assert_eq!(rest, full[k..].to_vec(), "resume at {k}, shuffle={shuffle}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn streaming_reads_start_before_the_seal() {
    let server = Fixture::start().await;
    let mut writer = server.admin().await;
    writer
        .put("live", stream_of(vec![batch(0, 1)]))
        .await
        .expect("first put");
    let mut readers = Vec::new();
    for rank in 0..2u32 {
        let mut client = server.admin().await;
        readers.push(tokio::spawn(async move {
            let shard = ReadShard {
                link: "live".into(),
                rank,
                world_size: 2,
                batch_rows: 50,
                mode: ReadMode::Streaming as i32,
                ..Default::default()
            };
            let mut stream = client.read_shard(shard).await.expect("shard");
            let mut got = Vec::new();
            let mut first_at = None;
            while let Some(b) = stream.next().await {
                let b = b.expect("batch");
                first_at.get_or_insert_with(std::time::Instant::now);
                got.push(ids(&b));
            }
            (got, first_at)
        }));
    }
    for i in 0..6 {
        writer
            .put("live", stream_of(vec![batch(1 + i * 100, 100)]))
            .await
            .expect("put");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sealed_at = std::time::Instant::now();
    writer.seal("live").await.expect("seal");
    let mut all = Vec::new();
    for reader in readers {
        let (batches, first_at) = reader.await.expect("reader");
        assert!(
            first_at.expect("got data") < sealed_at,
            "rows flowed before the seal"
        );
        assert!(batches.iter().all(|b| b.len() == 50));
        assert_eq!(batches.len(), 7, "601 rows / (2*50) rounded up");
        all.extend(batches.into_iter().flatten());
    }
    // The streamed shards equal a sealed read of the same layout.
    let mut sealed = Vec::new();
    for rank in 0..2 {
        let shard = ReadShard {
            link: "live".into(),
            rank,
            world_size: 2,
            batch_rows: 50,
            ..Default::default()
        };
        sealed.extend(read_rank(&mut writer, shard).await.into_iter().flatten());
    }
    assert_eq!(all, sealed);
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_loses_nothing() {
    let server = Fixture::start().await;
    let mut admin = server.admin().await;
    admin
        .put("e", stream_of(vec![batch(0, 10)]))
        .await
        .expect("put");

    // Wrong schema.
    let other = arrow_array::RecordBatch::try_from_iter(vec![(
        "id",
        std::sync::Arc::new(arrow_array::StringArray::from(vec!["a"])) as _,
    )])
    .expect("batch");
    let err = admin
        .put("e", stream_of(vec![other]))
        .await
        .expect_err("schema");
    assert_eq!(code(err), Code::InvalidArgument);
    // Unknown link.
    let err = admin.stats("nope").await.expect_err("unknown");
    assert_eq!(code(err), Code::NotFound);
    let err = admin.flight_info("nope").await.expect_err("unknown");
    assert_eq!(code(err), Code::NotFound);
    // Tokens.
    let err = server
        .client("wrong")
        .await
        .stats("e")
        .await
        .expect_err("bad token");
    assert_eq!(code(err), Code::Unauthenticated);
    let mut anonymous = handoff_client::HandoffClient::connect(&server.endpoint, None)
        .await
        .expect("connect");
    assert_eq!(
        code(anonymous.stats("e").await.expect_err("no token")),
        Code::Unauthenticated
    );
    let err = server
        .client(READER)
        .await
        .put("e", stream_of(vec![batch(10, 1)]))
        .await
        .expect_err("reader writes");
    assert_eq!(code(err), Code::PermissionDenied);
    let err = server
        .client(WRITER)
        .await
        .read_link("e")
        .await
        .expect_err("writer reads");
    assert_eq!(code(err), Code::PermissionDenied);
    // Per-link tokens see only their link.
    admin
        .create(handoff_client::CreateLink {
            link: "own".into(),
            writer_token: "own-w".into(),
            reader_token: "own-r".into(),
            ..Default::default()
        })
        .await
        .expect("create");
    let mut own = server.client("own-w").await;
    own.put("own", stream_of(vec![batch(0, 3)]))
        .await
        .expect("own writer writes its link");
    assert_eq!(
        code(
            own.put("e", stream_of(vec![batch(0, 3)]))
                .await
                .expect_err("other link")
        ),
        Code::PermissionDenied
    );

    // Garbage frames, by a raw Flight client.
    let channel = server.channel().await;
    let mut raw = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
    let garbage = vec![FlightData {
        flight_descriptor: Some(FlightDescriptor::new_path(vec!["e".into()])),
        data_header: bytes::Bytes::from_static(b"\x01\x02garbage-not-flatbuffers\xff\xff\xff"),
        data_body: bytes::Bytes::from_static(b"body"),
        ..Default::default()
    }];
    let mut request = tonic::Request::new(futures::stream::iter(garbage));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN}").parse().expect("header"),
    );
    let status = match raw.do_put(request).await {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .next()
            .await
            .expect("an answer")
            .expect_err("garbage refused"),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut request =
        tonic::Request::new(arrow_flight::Ticket::new(b"\xff\xfe not a ticket".to_vec()));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN}").parse().expect("header"),
    );
    let status = match raw.do_get(request).await {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .next()
            .await
            .expect("an answer")
            .expect_err("bad ticket"),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut request = tonic::Request::new(futures::stream::iter(Vec::<FlightData>::new()));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN}").parse().expect("header"),
    );
    let status = raw.do_exchange(request).await.expect_err("exchange");
    assert_eq!(status.code(), Code::Unimplemented);

    // Sealed links take no writes.
    admin.seal("e").await.expect("seal");
    assert_eq!(
        code(
            admin
                .put("e", stream_of(vec![batch(10, 1)]))
                .await
                .expect_err("sealed")
        ),
        Code::FailedPrecondition
    );

    // Nothing committed was lost along the way.
    let stats = admin.stats("e").await.expect("stats");
    assert_eq!((stats.rows, stats.partitions), (10, 1));
    let got = link_ids(&mut admin, "e").await;
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused_and_large_ones_work() {
    let config = ServerConfig {
        max_message_bytes: 64 << 20,
        max_flight_data_size: 8 << 20,
        ..Default::default()
    };
    let server = Fixture::start_with(config, StoreConfig::default()).await;
    let mut admin = server.admin().await;
    // One ~48 MiB batch: the client splits it below the message limit.
    let big = batch(0, 1_200_000);
    assert!(big.get_array_memory_size() > 40 << 20);
    admin
        .put("big", stream_of(vec![big]))
        .await
        .expect("large put");
    admin.seal("big").await.expect("seal");
    let mut rows = 0;
    for stream in admin.read_link("big").await.expect("read").1 {
        rows += collect(stream)
            .await
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>();
    }
    assert_eq!(rows, 1_200_000);

    // A single message over the limit, from a client that does not split.
    let channel = server.channel().await;
    let mut raw = FlightServiceClient::new(channel).max_encoding_message_size(usize::MAX);
    let huge = FlightData {
        flight_descriptor: Some(FlightDescriptor::new_path(vec!["huge".into()])),
        data_header: bytes::Bytes::from_static(b"x"),
        data_body: bytes::Bytes::from(vec![0u8; 80 << 20]),
        ..Default::default()
    };
    let mut request = tonic::Request::new(futures::stream::iter(vec![huge]));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN}").parse().expect("header"),
    );
    let status = match raw.do_put(request).await {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .next()
            .await
            .expect("an answer")
            .expect_err("too large"),
    };
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        server.store.link("huge").is_err() || server.store.stats("huge").expect("stats").rows == 0
    );
    // The server is still fine.
    assert_eq!(admin.stats("big").await.expect("stats").rows, 1_200_000);
    server.stop().await;
}

#[tokio::test]
async fn memory_limit_rejects_with_numbers_and_keeps_earlier_data() {
    let server = Fixture::start_with(
        ServerConfig::default(),
        StoreConfig {
            memory_limit: Some(1 << 20),
            ..Default::default()
        },
    )
    .await;
    let mut admin = server.admin().await;
    admin
        .put("m", stream_of(vec![batch(0, 1000)]))
        .await
        .expect("fits");
    let err = admin
        .put("m", stream_of(vec![batch(1000, 100_000)]))
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(err.to_string().contains("limit"), "{err}");
    let stats = admin.stats("m").await.expect("stats");
    assert_eq!((stats.rows, stats.staged_partitions), (1000, 0));
    common::assert_memory_is_only(&server, "m", "the refused write released its memory");
    server.stop().await;
}

fn wait_config(limit: u64, timeout: Duration) -> StoreConfig {
    StoreConfig {
        memory_limit: Some(limit),
        default_policy: handoff_store::MemoryPolicy::Wait { timeout },
        ..Default::default()
    }
}

#[tokio::test]
async fn wait_policy_stalls_the_writer_until_a_reader_frees_memory() {
    let server = Fixture::start_with(
        ServerConfig::default(),
        wait_config(2 << 20, Duration::from_secs(30)),
    )
    .await;
    let mut admin = server.admin().await;
    admin
        .put(
            "a",
            stream_of((0..4).map(|i| batch(i * 10_000, 10_000)).collect()),
        )
        .await
        .expect("fits");
    admin.seal("a").await.expect("seal");
    let held = server.store.memory().used();
    assert!(
        held > 1 << 20,
        "the first link holds most of the budget ({held})"
    );

    let mut writer = server.admin().await;
    let put = tokio::spawn(async move {
        writer
            .put(
                "b",
                stream_of(
                    (0..4)
                        .map(|i| batch(100_000 + i * 10_000, 10_000))
                        .collect(),
                ),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!put.is_finished(), "the writer stalls at the limit");
    assert!(
        server.store.memory().used() <= 2 << 20,
        "never over the budget"
    );

    // A reader drains the first link, then deletes it; the stalled writer resumes.
    let mut rows = 0;
    for stream in admin.read_link("a").await.expect("read").1 {
        rows += collect(stream)
            .await
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>();
    }
    assert_eq!(rows, 40_000);
    admin.delete("a").await.expect("delete");
    let outcome = handoff_testkit::within("the stalled writer to resume", put)
        .await
        .expect("task")
        .expect("put");
    assert_eq!(outcome.rows, 40_000);
    admin.seal("b").await.expect("seal");
    let got = link_ids(&mut admin, "b").await;
    assert_eq!(got, (100_000..140_000).collect::<Vec<_>>());
    assert!(server.store.memory().peak() <= 2 << 20);
    server.stop().await;
}

#[tokio::test]
async fn wait_policy_times_out_with_a_clear_error() {
    let server = Fixture::start_with(
        ServerConfig::default(),
        wait_config(1 << 20, Duration::from_millis(300)),
    )
    .await;
    let mut admin = server.admin().await;
    admin
        .put("a", stream_of(vec![batch(0, 10_000)]))
        .await
        .expect("fits");
    let err = admin
        .put(
            "b",
            stream_of((0..4).map(|i| batch(i * 10_000, 10_000)).collect()),
        )
        .await
        .expect_err("times out");
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(err.to_string().contains("waited"), "{err}");
    assert_eq!(
        server.store.stats("a").expect("stats").rows,
        10_000,
        "earlier data intact"
    );
    assert_memory_is_only(&server, "a", "the failed write released its memory");
    server.stop().await;
}

#[tokio::test]
async fn a_link_quota_limits_only_that_link() {
    let server = Fixture::start().await;
    let mut admin = server.admin().await;
    let created = admin
        .create(handoff_client::CreateLink {
            link: "q".into(),
            memory_limit: 100_000,
            memory_policy: handoff_client::MemoryPolicy::Reject as i32,
            ..Default::default()
        })
        .await
        .expect("create");
    assert_eq!(
        (created.memory_limit, created.memory_policy.as_str()),
        (Some(100_000), "reject")
    );
    admin
        .put("q", stream_of(vec![batch(0, 1000)]))
        .await
        .expect("fits the quota");
    let err = admin
        .put("q", stream_of(vec![batch(1000, 10_000)]))
        .await
        .expect_err("over the quota");
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(err.to_string().contains("link 'q'"), "{err}");
    admin
        .put("other", stream_of(vec![batch(0, 10_000)]))
        .await
        .expect("other links are not limited");
    assert_eq!(admin.stats("q").await.expect("stats").rows, 1000);
    server.stop().await;
}

#[tokio::test]
async fn snapshot_on_seal_then_restore_in_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let storage = || Some(handoff_store::ObjectStorage::from_url(&url).expect("storage"));
    let config = StoreConfig {
        storage: storage(),
        snapshot_on_seal: true,
        ..Default::default()
    };
    let server = Fixture::start_with(ServerConfig::default(), config).await;
    let mut admin = server.admin().await;
    let n = fill(&mut admin, "team/snap").await;
    assert_eq!(
        code(admin.snapshot("team/snap").await.expect_err("open link")),
        Code::InvalidArgument
    );
    admin
        .seal("team/snap")
        .await
        .expect("seal writes the snapshot");
    server.stop().await;

    let restored = handoff_store::Store::new(StoreConfig {
        storage: storage(),
        ..Default::default()
    });
    let links = restored
        .restore_all(&storage().expect("storage"))
        .await
        .expect("restore")
        .links;
    assert_eq!(links, vec!["team/snap".to_string()]);
    let stats = restored.stats("team/snap").expect("stats");
    assert_eq!(
        (stats.rows, stats.partitions, stats.state),
        (n as u64, 5, handoff_store::LinkState::Sealed)
    );
    let snapshot = restored.link("team/snap").expect("link").snapshot();
    let schema = snapshot.schema.expect("schema").schema;
    let mut got = Vec::new();
    for partition in &snapshot.partitions {
        for i in 0..partition.frame_rows().len() {
            let frame = partition.frame(i).await.expect("frame");
            got.extend(ids(&frame.decode(&schema).expect("decode")));
        }
    }
    assert_eq!(got, (0..n as i64).collect::<Vec<_>>());
}

/// With snapshots as the server's durability, a deleted or expired link does not come back on
/// the next start; links sharing a name's first part keep theirs. The instance id tells the two
/// servers apart.
#[tokio::test]
async fn deleted_and_expired_links_are_not_restored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let storage = || Some(handoff_store::ObjectStorage::from_url(&url).expect("storage"));
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let store = || StoreConfig {
        storage: storage(),
        snapshot_on_seal: true,
        ..Default::default()
    };
    let server = Fixture::start_with(config.clone(), store()).await;
    let mut admin = server.admin().await;
    for link in ["team", "team/kept", "gone"] {
        fill(&mut admin, link).await;
        admin.seal(link).await.expect("seal");
    }
    admin
        .create(handoff_client::CreateLink {
            link: "expiring".into(),
            ttl_seconds_after_seal: 1,
            ..Default::default()
        })
        .await
        .expect("create");
    fill(&mut admin, "expiring").await;
    admin.seal("expiring").await.expect("seal");
    let first = admin.stats("gone").await.expect("stats").server_instance;
    assert_eq!(first.len(), 16, "{first}");
    admin.delete("gone").await.expect("delete");
    admin.delete("team").await.expect("delete");
    wait_until_gone(&mut admin, "expiring").await;
    // The expiry loop removes the snapshot just after the link.
    let snapshots = storage().expect("storage");
    handoff_testkit::eventually("the expired link's snapshot to go", || async {
        let links: Vec<String> = snapshots
            .manifests()
            .await
            .ok()?
            .into_iter()
            .map(|m| m.link)
            .collect();
        (links == ["team/kept"]).then_some(())
    })
    .await;
    server.stop().await;

    let restarted = Fixture::start_with(config, store()).await;
    let restored = restarted
        .store
        .restore_all(&storage().expect("storage"))
        .await
        .expect("restore");
    assert_eq!(restored.links, ["team/kept"]);
    assert!(restored.skipped.is_empty(), "{:?}", restored.skipped);
    let mut admin = restarted.admin().await;
    let stats = admin.stats("team/kept").await.expect("stats");
    assert_ne!(
        stats.server_instance, first,
        "a new process, a new instance"
    );
    restarted.stop().await;
}

async fn wait_until_gone(client: &mut handoff_client::HandoffClient, link: &str) {
    let client = tokio::sync::Mutex::new(client);
    handoff_testkit::eventually(&format!("link '{link}' to be dropped"), || async {
        let result = client.lock().await.stats(link).await;
        matches!(result, Err(e) if e.code() == Some(Code::NotFound)).then_some(())
    })
    .await
}

#[tokio::test]
async fn links_expire_after_their_ttl_or_when_idle() {
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let server = Fixture::start_with(config, StoreConfig::default()).await;
    let mut admin = server.admin().await;
    admin
        .create(handoff_client::CreateLink {
            link: "ttl".into(),
            ttl_seconds_after_seal: 1,
            ..Default::default()
        })
        .await
        .expect("create");
    admin
        .put("ttl", stream_of(vec![batch(0, 100)]))
        .await
        .expect("put");
    admin
        .put("kept", stream_of(vec![batch(0, 100)]))
        .await
        .expect("put");
    admin
        .seal("kept")
        .await
        .expect("sealed links are never idle");
    admin
        .put("idle", stream_of(vec![batch(0, 100)]))
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        admin
            .stats("ttl")
            .await
            .expect("open links have no TTL yet")
            .rows,
        100
    );
    admin.seal("ttl").await.expect("seal");
    wait_until_gone(&mut admin, "ttl").await;
    wait_until_gone(&mut admin, "idle").await;
    assert_eq!(admin.stats("kept").await.expect("kept").rows, 100);
    assert_memory_is_only(&server, "kept", "expired links freed memory");
    server.stop().await;
}

#[tokio::test]
async fn a_link_expires_after_every_rank_read_an_epoch() {
    let server = Fixture::start().await;
    let mut admin = server.admin().await;
    for link in ["read-once", "half-read"] {
        admin
            .create(handoff_client::CreateLink {
                link: link.into(),
                ttl_seconds_after_read: 1,
                ..Default::default()
            })
            .await
            .expect("create");
        admin
            .put(link, stream_of(vec![batch(0, 1000)]))
            .await
            .expect("put");
        admin.seal(link).await.expect("seal");
    }
    for rank in 0..2 {
        let shard = ReadShard {
            link: "read-once".into(),
            rank,
            world_size: 2,
            batch_rows: 100,
            ..Default::default()
        };
        assert_eq!(read_rank(&mut admin, shard).await.len(), 5);
    }
    // Only one of two ranks reads the other link; a read abandoned mid-way does not count.
    let shard = ReadShard {
        link: "half-read".into(),
        rank: 0,
        world_size: 2,
        batch_rows: 100,
        ..Default::default()
    };
    read_rank(&mut admin, shard).await;
    let mut abandoned = admin
        .read_shard(ReadShard {
            link: "half-read".into(),
            rank: 1,
            world_size: 2,
            batch_rows: 1,
            ..Default::default()
        })
        .await
        .expect("shard");
    abandoned.next().await.expect("one batch").expect("batch");
    drop(abandoned);
    wait_until_gone(&mut admin, "read-once").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        admin
            .stats("half-read")
            .await
            .expect("kept until every rank read")
            .rows,
        1000
    );
    server.stop().await;
}

#[tokio::test]
async fn a_replacing_commit_overwrites_the_link_in_one_step() {
    let server = Fixture::start().await;
    let mut w = server.client(WRITER).await;
    w.put_partition("ow", 0, 0, stream_of(vec![batch(0, 10)]))
        .await
        .expect("stage");
    w.commit("ow", &[(0, 0)]).await.expect("commit");
    // The overwrite stages under fresh ids; the old rows stay visible until the commit.
    w.put_partition("ow", 7, 0, stream_of(vec![batch(100, 5)]))
        .await
        .expect("stage");
    assert_eq!(w.stats("ow").await.expect("stats").rows, 10);
    w.commit_with("ow", &[(7, 0)], true).await.expect("replace");
    let stats = w.stats("ow").await.expect("stats");
    assert_eq!((stats.rows, stats.partitions), (5, 1));
    assert_memory_is_only(&server, "ow", "replaced rows are freed");
    // Replacing with nothing empties the link; a plain empty commit is refused.
    assert_eq!(
        code(w.commit("ow", &[]).await.expect_err("empty")),
        Code::InvalidArgument
    );
    w.commit_with("ow", &[], true).await.expect("empty replace");
    assert_eq!(w.stats("ow").await.expect("stats").rows, 0);
    w.put_partition("ow", 8, 0, stream_of(vec![batch(200, 3)]))
        .await
        .expect("stage");
    w.commit("ow", &[(8, 0)]).await.expect("commit");
    w.seal("ow").await.expect("seal");
    let mut r = server.client(READER).await;
    assert_eq!(link_ids(&mut r, "ow").await, vec![200, 201, 202]);
    server.stop().await;
}
