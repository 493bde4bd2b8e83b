//! Criterion: the query paths against their peers in the same run, through a real in-process
//! server. `cargo bench -p handoff-server --bench query`
//!
//! - `shard_read`: 2 of 8 float64 columns against all 8, 1M rows; and four ranks reading 2
//!   columns with and without a filter.
//! - `flight_sql`: `count(*)` and a filtered aggregate over the same 1M rows.
//! - `import`: 8 Parquet files into a link, against arrow-rs reading the same files on the same
//!   two threads (decode only, nothing kept).

#[allow(dead_code)]
mod data;

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch};
use arrow_flight::sql::client::FlightSqlServiceClient;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use futures::TryStreamExt;
use handoff_client::{HandoffClient, ReadShard};

const ROWS: usize = 1 << 20;
const COLUMNS: usize = 8;
const FILES: usize = 8;

/// `rows` rows of 8 float64 columns `c0..c7` of pseudo-random values in [0, 1).
fn wide(rows: usize, seed: u64) -> RecordBatch {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let columns = (0..COLUMNS).map(|c| {
        let values = (0..rows).map(|_| {
            // xorshift: cheap, deterministic, and not compressible by Parquet.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        });
        (
            format!("c{c}"),
            Arc::new(Float64Array::from_iter_values(values)) as ArrayRef,
        )
    });
    RecordBatch::try_from_iter(columns.collect::<Vec<_>>()).expect("batch")
}

fn write_parquet(dir: &Path, batches: &[RecordBatch]) {
    for (f, part) in batches.chunks(batches.len() / FILES).enumerate() {
        let file = std::fs::File::create(dir.join(format!("part-{f}.parquet"))).expect("file");
        let mut writer = ArrowWriter::try_new(file, part[0].schema(), None).expect("writer");
        for b in part {
            writer.write(b).expect("write");
        }
        writer.close().expect("close");
    }
}

/// Decode every file with arrow-rs, two files at a time, keeping nothing.
fn read_parquet(dir: &Path) -> usize {
    let files: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    let rows = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for half in files.chunks(files.len().div_ceil(2)) {
            let rows = &rows;
            s.spawn(move || {
                for path in half {
                    let file = std::fs::File::open(path).expect("open");
                    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                        .expect("reader")
                        .build()
                        .expect("build");
                    for b in reader {
                        rows.fetch_add(
                            b.expect("batch").num_rows(),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                }
            });
        }
    });
    rows.into_inner()
}

/// Rows of one shard read, every batch received.
async fn rows_read(client: &mut HandoffClient, shard: ReadShard) -> usize {
    let read: Vec<RecordBatch> = client
        .read_shard(shard)
        .await
        .expect("read")
        .try_collect()
        .await
        .expect("batches");
    read.iter().map(|b| b.num_rows()).sum()
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let batches: Vec<RecordBatch> = (0..16).map(|i| wide(ROWS / 16, i)).collect();
    let bytes: u64 = batches
        .iter()
        .map(|b| b.get_array_memory_size() as u64)
        .sum();

    let (endpoint, store) = data::start_server(&runtime);
    let mut client = runtime
        .block_on(HandoffClient::connect(&endpoint, None))
        .expect("connect");
    runtime.block_on(async {
        let stream = futures::stream::iter(batches.clone().into_iter().map(Ok));
        client.put("wide", stream).await.expect("put");
        client.seal("wide").await.expect("seal");
    });

    let mut group = c.benchmark_group("shard_read");
    group.sample_size(10);
    for columns in [COLUMNS, 2] {
        group.throughput(Throughput::Bytes(bytes * columns as u64 / COLUMNS as u64));
        let names: Vec<String> = (0..columns).map(|c| format!("c{c}")).collect();
        group.bench_function(format!("{columns}_of_{COLUMNS}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let shard = ReadShard {
                        link: "wide".into(),
                        world_size: 1,
                        columns: names.clone(),
                        ..Default::default()
                    };
                    assert_eq!(rows_read(&mut client, shard).await, ROWS);
                })
            })
        });
    }
    // Four ranks split the link, with and without a filter. The first rank to reach a partition
    // evaluates the filter, the others reuse its selection.
    group.throughput(Throughput::Bytes(bytes * 2 / COLUMNS as u64));
    for (name, filter) in [
        ("2_of_8_4_ranks", ""),
        ("2_of_8_4_ranks_filtered", "c0 > 0.5"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut rows = 0;
                    for rank in 0..4 {
                        let shard = ReadShard {
                            link: "wide".into(),
                            rank,
                            world_size: 4,
                            columns: vec!["c0".into(), "c1".into()],
                            filter: filter.into(),
                            ..Default::default()
                        };
                        rows += rows_read(&mut client, shard).await;
                    }
                    assert!(rows >= ROWS / 3, "{rows}");
                })
            })
        });
    }
    group.finish();

    let mut sql = runtime.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(endpoint.replace("grpc://", "http://"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
        FlightSqlServiceClient::new(channel)
    });
    let mut group = c.benchmark_group("flight_sql");
    group.sample_size(10);
    for (name, query, columns) in [
        ("count", "SELECT count(*) FROM wide", 0),
        (
            "filtered_avg",
            "SELECT count(*), avg(c1) FROM wide WHERE c0 > 0.5",
            2,
        ),
    ] {
        group.throughput(Throughput::Bytes(bytes * columns / COLUMNS as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let info = sql.execute(query.into(), None).await.expect("execute");
                    for endpoint in info.endpoint {
                        let ticket = endpoint.ticket.expect("ticket");
                        let _: Vec<RecordBatch> = sql
                            .do_get(ticket)
                            .await
                            .expect("do_get")
                            .try_collect()
                            .await
                            .expect("result");
                    }
                })
            })
        });
    }
    group.finish();

    let dir = tempfile::tempdir().expect("tempdir");
    write_parquet(dir.path(), &batches);
    let url = format!("file://{}/*.parquet", dir.path().display());
    let mut group = c.benchmark_group("import");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("handoff_import", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let reply = client
                    .import("imported", &url, false)
                    .await
                    .expect("import");
                assert_eq!(reply["rows"], ROWS as u64);
                client.delete("imported").await.expect("delete");
            })
        })
    });
    group.bench_function("arrow_rs_read", |b| {
        b.iter(|| assert_eq!(read_parquet(dir.path()), ROWS))
    });
    group.finish();
    drop(store);
}

criterion_group!(query, benches);
criterion_main!(query);
