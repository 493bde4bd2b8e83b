//! Criterion: the spill policy's upload and readback against raw `object_store` put and get of
//! the same bytes, on local files. `cargo bench -p handoff-server --bench spill`

mod data;

use std::sync::Arc;

use arrow_flight::FlightData;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use data::{batch, encode};
use handoff_store::{ObjectStorage, PutTarget, Store, StoreConfig};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

const PARTITIONS: usize = 4;
const FRAMES_PER_PARTITION: usize = 4;

async fn filled_store(url: &str, frames: &[FlightData]) -> Arc<Store> {
    let store = Store::new(StoreConfig {
        storage: Some(ObjectStorage::from_url(url).expect("storage")),
        ..Default::default()
    });
    for p in 0..PARTITIONS {
        let mut writer = store.begin_put("b", PutTarget::Append, true).expect("put");
        let part = &frames[1 + p * FRAMES_PER_PARTITION..1 + (p + 1) * FRAMES_PER_PARTITION];
        for f in std::iter::once(&frames[0]).chain(part) {
            writer
                .push(f.data_header.clone(), f.data_body.clone())
                .await
                .expect("push");
        }
        writer.finish().await.expect("finish");
    }
    store
}

/// The bytes of one partition's objects, as the raw comparison puts them.
fn raw_parts(frames: &[FlightData], p: usize) -> Vec<Bytes> {
    let part = &frames[1 + p * FRAMES_PER_PARTITION..1 + (p + 1) * FRAMES_PER_PARTITION];
    std::iter::once(frames[0].data_header.clone())
        .chain(
            part.iter()
                .flat_map(|f| [f.data_header.clone(), f.data_body.clone()]),
        )
        .collect()
}

fn benches(c: &mut Criterion) {
    let batches: Vec<_> = (0..PARTITIONS * FRAMES_PER_PARTITION)
        .map(|_| batch(8192))
        .collect();
    let frames = encode(&batches);
    let bytes: u64 = frames[1..]
        .iter()
        .map(|f| (f.data_header.len() + f.data_body.len()) as u64)
        .sum();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let raw = LocalFileSystem::new_with_prefix(dir.path()).expect("local");

    let mut group = c.benchmark_group("spill");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    // Both sides write fresh objects into an emptied directory each iteration, so neither pays
    // for overwriting or is helped by a warm page cache of its own earlier files.
    let clear = |sub: &str| {
        let _ = std::fs::remove_dir_all(dir.path().join(sub));
    };
    group.bench_function("handoff_spill", |b| {
        b.iter_batched(
            || {
                clear("spill");
                runtime.block_on(filled_store(&url, &frames))
            },
            |store| {
                let freed = runtime.block_on(store.spill_link("b")).expect("spill");
                assert!(freed >= bytes);
                store
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("object_store_put", |b| {
        b.iter_batched(
            || clear("raw"),
            |()| {
                runtime.block_on(async {
                    for p in 0..PARTITIONS {
                        let payload: PutPayload = raw_parts(&frames, p).into_iter().collect();
                        raw.put(&Path::from(format!("raw/p{p}.arrows")), payload)
                            .await
                            .expect("put");
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    let store = runtime.block_on(async {
        let store = filled_store(&url, &frames).await;
        store.spill_link("b").await.expect("spill");
        store
    });
    let partitions = store.link("b").expect("link").snapshot().partitions;
    let mut group = c.benchmark_group("readback");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    group.bench_function("handoff_spilled_frames", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut read = 0;
                for partition in &partitions {
                    for i in 0..partition.frame_rows().len() {
                        let frame = partition.frame(i).await.expect("frame");
                        read += frame.bytes();
                    }
                }
                assert_eq!(read, bytes);
            })
        })
    });
    group.bench_function("object_store_get", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut read = 0;
                for p in 0..PARTITIONS {
                    let object = raw
                        .get(&Path::from(format!("raw/p{p}.arrows")))
                        .await
                        .expect("get");
                    read += object.bytes().await.expect("bytes").len() as u64;
                }
                assert!(read >= bytes);
            })
        })
    });
    group.finish();
    runtime.block_on(async { store.delete("b").expect("delete") });
}

criterion_group!(spill, benches);
criterion_main!(spill);
