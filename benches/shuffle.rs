//! Criterion: one shuffled epoch read by W ranks at once, W = 1, 2, 4, 8, straight from the store.
//! The ranks of an epoch share one decoded layout, so the time per epoch (and the bytes per
//! second over the whole link) should stay flat in W; the W = 1 run is the peer each ratio is
//! taken against. Peak memory per W is measured from /proc by `benches/shuffle_memory.py`.
//! `cargo bench -p handoff-server --bench shuffle`

mod data;

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use data::{batch, encode};
use handoff_store::{Chunk, PutTarget, ReadMode, ShardSpec, Store, StoreConfig, read_shard};

const PARTITIONS: usize = 8;
const FRAMES_PER_PARTITION: usize = 4;
const ROWS_PER_FRAME: usize = 8192;
const BATCH_ROWS: u64 = 1024;

async fn sealed_store() -> (Arc<Store>, u64) {
    let store = Store::new(StoreConfig::default());
    let batches: Vec<_> = (0..FRAMES_PER_PARTITION)
        .map(|_| batch(ROWS_PER_FRAME))
        .collect();
    let frames = encode(&batches);
    for _ in 0..PARTITIONS {
        let mut writer = store.begin_put("s", PutTarget::Append, true).expect("put");
        for f in &frames {
            writer
                .push(f.data_header.clone(), f.data_body.clone())
                .await
                .expect("push");
        }
        writer.finish().await.expect("finish");
    }
    let stats = store.seal("s").expect("seal");
    (store, stats.bytes)
}

/// Every rank of one epoch, concurrently; returns the rows read.
async fn epoch(store: &Arc<Store>, world: u32, epoch: u64) -> u64 {
    let link = store.link("s").expect("link");
    let ranks = (0..world).map(|rank| {
        let spec = ShardSpec {
            rank,
            world_size: world,
            epoch,
            seed: 7,
            batch_rows: BATCH_ROWS,
            shuffle: true,
            drop_last: true,
            start_batch: 0,
        };
        let mut rx = read_shard(
            Arc::clone(&link),
            spec,
            ReadMode::WaitForSeal,
            None,
            store.read_memory().clone(),
        );
        tokio::spawn(async move {
            let mut rows = 0;
            while let Some(chunk) = rx.recv().await {
                if let Chunk::Batch(b, _) = chunk.expect("chunk") {
                    rows += b.num_rows() as u64;
                }
            }
            rows
        })
    });
    let mut rows = 0;
    for rank in ranks.collect::<Vec<_>>() {
        rows += rank.await.expect("rank");
    }
    rows
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (store, bytes) = runtime.block_on(sealed_store());
    let total = (PARTITIONS * FRAMES_PER_PARTITION * ROWS_PER_FRAME) as u64;
    let mut group = c.benchmark_group("shared_shuffle");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    let mut next_epoch = 0u64;
    for world in [1u32, 2, 4, 8] {
        group.bench_with_input(BenchmarkId::new("ranks", world), &world, |b, &world| {
            b.iter(|| {
                // A new epoch each time: nothing decoded by the last one is reused.
                next_epoch += 1;
                let rows = runtime.block_on(epoch(&store, world, next_epoch));
                assert_eq!(
                    rows,
                    total / (world as u64 * BATCH_ROWS) * world as u64 * BATCH_ROWS
                );
            })
        });
    }
    group.finish();
}

criterion_group!(shuffle, benches);
criterion_main!(shuffle);
