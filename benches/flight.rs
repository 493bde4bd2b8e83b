//! Criterion: DoPut and DoGet through a real in-process server and our client, and the store's
//! ingest validation alone. `cargo bench -p handoff-server --bench flight`

mod data;

use arrow_array::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use data::{batch, encode};
use futures::TryStreamExt;
use handoff_store::{PutTarget, Store, StoreConfig};

fn benches(c: &mut Criterion) {
    let batches: Vec<RecordBatch> = (0..16).map(|_| batch(8192)).collect();
    let bytes: u64 = batches
        .iter()
        .map(|b| b.get_array_memory_size() as u64)
        .sum();

    let frames = encode(&batches);
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Bytes(bytes));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    group.bench_function("ingest_validate", |b| {
        let store = Store::new(StoreConfig::default());
        let target = PutTarget::Staged {
            partition: 0,
            attempt: 0,
        };
        b.iter(|| {
            runtime.block_on(async {
                let mut writer = store.begin_put("bench", target, true).expect("put");
                for f in &frames {
                    let (header, body) = (f.data_header.clone(), f.data_body.clone());
                    writer.push(header, body).await.expect("push");
                }
            })
        })
    });
    group.finish();

    let (endpoint, store) = data::start_server(&runtime);
    let mut client = runtime
        .block_on(handoff_client::HandoffClient::connect(&endpoint, None))
        .expect("connect");
    let mut group = c.benchmark_group("flight");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    group.bench_function("do_put", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let stream = futures::stream::iter(batches.clone().into_iter().map(Ok));
                client.put("put", stream).await.expect("put");
                client.delete("put").await.expect("delete");
            })
        })
    });
    runtime.block_on(async {
        client
            .put(
                "get",
                futures::stream::iter(batches.clone().into_iter().map(Ok)),
            )
            .await
            .expect("put");
        client.seal("get").await.expect("seal");
    });
    group.bench_function("do_get", |b| {
        b.iter(|| {
            runtime.block_on(async {
                for stream in client.read_link("get").await.expect("read").1 {
                    let _: Vec<RecordBatch> = stream.try_collect().await.expect("batches");
                }
            })
        })
    });
    group.finish();
    drop(store);
}

criterion_group!(flight, benches);
criterion_main!(flight);
