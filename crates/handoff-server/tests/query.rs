//! Read-time columns and filters on shard reads: the shard rules hold on the rows that pass.

mod common;

use std::collections::BTreeSet;

use arrow_array::Int64Array;
use common::{Fixture, READER, WRITER, batch, collect, stream_of};
use handoff_client::{ReadMode, ReadShard};

const ROWS: i64 = 9_000;

async fn features(server: &Fixture, link: &str) {
    let mut writer = server.client(WRITER).await;
    // Several partitions of several frames, so the filter crosses frame and partition edges.
    for part in 0..3 {
        let start = part * ROWS / 3;
        let batches = (0..3)
            .map(|f| batch(start + f * ROWS / 9, (ROWS / 9) as usize))
            .collect();
        writer.put(link, stream_of(batches)).await.expect("put");
    }
    writer.seal(link).await.expect("seal");
}

fn only_ids(batches: &[arrow_array::RecordBatch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            assert_eq!(b.num_columns(), 2, "only the asked-for columns");
            assert_eq!(b.schema().field(0).name(), "x");
            assert_eq!(b.schema().field(1).name(), "id");
            let ids = b
                .column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("id");
            ids.values().to_vec()
        })
        .collect()
}

#[tokio::test]
async fn ranks_split_the_filtered_rows_disjoint_complete_and_in_equal_batches() {
    let server = Fixture::start().await;
    features(&server, "q").await;
    let passing: BTreeSet<i64> = (0..ROWS).filter(|i| i % 3 == 0 && *i < 7_000).collect();
    for shuffle in [false, true] {
        let world = 4u32;
        let mut seen = Vec::new();
        let mut counts = Vec::new();
        for rank in 0..world {
            let mut reader = server.client(READER).await;
            let shard = ReadShard {
                link: "q".into(),
                rank,
                world_size: world,
                batch_rows: 100,
                shuffle,
                seed: 5,
                drop_last: true,
                columns: vec!["x".into(), "id".into()],
                filter: "id % 3 = 0 AND id < 7000".into(),
                mode: ReadMode::WaitForSeal as i32,
                ..Default::default()
            };
            let info = reader.shard_info(&shard).await.expect("info");
            let schema = info.try_decode_schema().expect("schema");
            assert_eq!(
                schema.fields().len(),
                2,
                "FlightInfo has the projected schema"
            );
            let batches = collect(reader.read_shard(shard).await.expect("read")).await;
            assert!(batches.iter().all(|b| b.num_rows() == 100));
            counts.push(batches.len());
            let ids = only_ids(&batches);
            for (b, id) in batches.iter().zip(ids.chunks(100)) {
                let x = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow_array::Float32Array>()
                    .expect("x");
                assert!(
                    id.iter()
                        .zip(x.values())
                        .all(|(i, x)| *i as f32 * 0.5 == *x),
                    "rows stay whole"
                );
            }
            seen.extend(ids);
        }
        assert!(
            counts.windows(2).all(|w| w[0] == w[1]),
            "equal batch counts: {counts:?}"
        );
        let unique: BTreeSet<i64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "disjoint (shuffle={shuffle})");
        assert!(unique.is_subset(&passing), "only passing rows");
        // drop_last keeps whole batches: at most world*batch-1 passing rows are left out.
        assert!(passing.len() - unique.len() < (world as usize) * 100);
        assert_eq!(seen.len(), counts.iter().sum::<usize>() * 100);
        if !shuffle {
            assert!(
                seen.windows(2).take(50).all(|w| w[0] < w[1]),
                "unshuffled keeps order"
            );
        }
    }
    // Without drop_last, every passing row is read exactly once (the tail pads by wrapping).
    let mut reader = server.client(READER).await;
    let shard = ReadShard {
        link: "q".into(),
        rank: 0,
        world_size: 1,
        columns: vec!["x".into(), "id".into()],
        filter: "id % 3 = 0 AND id < 7000".into(),
        ..Default::default()
    };
    let ids = only_ids(&collect(reader.read_shard(shard).await.expect("read")).await);
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), passing);
    assert_eq!(ids.len(), passing.len());
    server.stop().await;
}

#[tokio::test]
async fn streaming_reads_filter_partitions_as_they_arrive() {
    let server = Fixture::start().await;
    let mut writer = server.client(WRITER).await;
    writer
        .put("s", stream_of(vec![batch(0, 1000)]))
        .await
        .expect("put");
    let mut reader = server.client(READER).await;
    let shard = ReadShard {
        link: "s".into(),
        rank: 0,
        world_size: 1,
        batch_rows: 50,
        columns: vec!["id".into()],
        filter: "name LIKE 'row-1%'".into(),
        mode: ReadMode::Streaming as i32,
        ..Default::default()
    };
    let stream = reader.read_shard(shard).await.expect("read");
    writer
        .put("s", stream_of(vec![batch(1000, 1000)]))
        .await
        .expect("put");
    writer.seal("s").await.expect("seal");
    let batches = collect(stream).await;
    let ids: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            assert_eq!(b.num_columns(), 1);
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("id")
                .values()
                .to_vec()
        })
        .collect();
    let expected: Vec<i64> = (0..2000)
        .filter(|i| format!("row-{i}").starts_with("row-1"))
        .collect();
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<_>>(),
        expected.iter().copied().collect()
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_columns_and_filters_are_refused_with_a_sentence() {
    let server = Fixture::start().await;
    features(&server, "bad").await;
    let mut reader = server.client(READER).await;
    for (columns, filter, expect) in [
        (vec!["nope"], "", "its columns are id, x, name, emb"),
        (vec![], "idd > 3", "idd"),
        (vec![], "x + 1", "true/false condition"),
        (vec![], "id = 1; DROP TABLE bad", "filter"),
    ] {
        let shard = ReadShard {
            link: "bad".into(),
            rank: 0,
            world_size: 1,
            columns: columns.into_iter().map(String::from).collect(),
            filter: filter.into(),
            ..Default::default()
        };
        let err = reader.shard_info(&shard).await.expect_err("refused");
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains(expect), "{err}");
        let message = match reader.read_shard(shard).await {
            Ok(stream) => {
                use futures::TryStreamExt;
                stream
                    .try_collect::<Vec<_>>()
                    .await
                    .expect_err("refused")
                    .to_string()
            }
            Err(e) => e.to_string(),
        };
        assert!(message.contains(expect), "{message}");
    }
    server.stop().await;
}

/// SQL reserves from the server's pool, so a query larger than the budget fails with
/// RESOURCE_EXHAUSTED instead of growing the process (an `array_agg` over a large `range()` took
/// 1.1 GiB under a 256 MiB limit), and gives its memory back.
#[tokio::test]
async fn sql_that_outgrows_the_budget_is_resource_exhausted() {
    use futures::TryStreamExt;

    let limit = 16 << 20;
    let server = Fixture::start_with(
        handoff_server::ServerConfig::default(),
        handoff_store::StoreConfig {
            memory_limit: Some(limit),
            ..Default::default()
        },
    )
    .await;
    let mut sql = arrow_flight::sql::client::FlightSqlServiceClient::new(server.channel().await);
    sql.set_header("authorization", format!("Bearer {READER}"));
    let run = |query: &'static str| {
        let mut sql = sql.clone();
        async move {
            let info = sql.execute(query.to_string(), None).await?;
            let ticket = info.endpoint[0].ticket.clone().expect("ticket");
            let batches: Vec<arrow_array::RecordBatch> =
                sql.do_get(ticket).await?.try_collect().await?;
            Ok::<_, arrow_flight::error::FlightError>(batches)
        }
    };
    let err = run("SELECT array_agg(value) FROM range(20000000)")
        .await
        .expect_err("over the budget");
    let status = match err {
        arrow_flight::error::FlightError::Tonic(status) => status,
        other => panic!("not a gRPC status: {other}"),
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("--memory-limit"), "{status}");
    assert!(
        server.store.memory().peak() <= limit,
        "never past the budget"
    );
    handoff_testkit::eventually("the query's memory to be given back", || async {
        (server.store.memory().used() == 0).then_some(())
    })
    .await;
    let small = run("SELECT count(*) FROM range(1000)")
        .await
        .expect("a small query runs");
    assert_eq!(small[0].num_rows(), 1);
    server.stop().await;
}
