//! Ingest: a sequence of IPC messages from a hostile writer, against the link's schema, then
//! reads of whatever was accepted. No message may panic the store, and every frame the store
//! accepted must decode and read back.

#![no_main]

#[path = "common.rs"]
mod common;

use bytes::Bytes;
use handoff_store::{Chunk, PutTarget, ReadMode, SchemaFrame, ShardSpec, Store, StoreConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: common::quiet_caught_panics(),
    |data: &[u8]| common::runtime().block_on(ingest(data))
);

async fn ingest(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let schema = common::schema();
    let store = Store::new(StoreConfig {
        memory_limit: Some(64 << 20),
        ..StoreConfig::default()
    });
    let target = if mode & 2 == 0 {
        PutTarget::Append
    } else {
        PutTarget::Staged {
            partition: 7,
            attempt: 1,
        }
    };
    let Ok(mut writer) = store.begin_put("fuzz", target, true) else {
        panic!("a fresh store refused a put");
    };
    // Bit 0 clear: the schema comes first, as from a real client, so the fuzzer spends its
    // effort on record batches; set: the fuzzer's first message must be a schema itself.
    if mode & 1 == 0 {
        let header = SchemaFrame::from_schema(schema.clone())
            .expect("the schema encodes")
            .header;
        writer
            .push(header, Bytes::new())
            .await
            .expect("our schema is accepted");
    }
    for (header, body) in common::messages(data) {
        if writer.push(header, body).await.is_err() {
            return; // DoPut fails the stream at its first refused message
        }
    }
    if writer.finish().await.is_err() {
        return;
    }
    if let PutTarget::Staged { partition, attempt } = target {
        store
            .commit("fuzz", &[(partition, attempt)], false)
            .expect("a staged partition commits");
    }
    store.seal("fuzz").expect("seal");
    let link = store.link("fuzz").expect("the link");
    let Some(schema) = link.schema().map(|s| s.schema) else {
        return;
    };
    let specs = [
        (0, 1, 0, false, false),
        (0, 2, 7, true, false),
        (1, 2, 5, false, true),
    ];
    for (rank, world_size, batch_rows, shuffle, drop_last) in specs {
        let spec = ShardSpec {
            rank,
            world_size,
            epoch: 1,
            seed: 3,
            batch_rows,
            shuffle,
            drop_last,
            start_batch: 0,
        };
        let mut chunks = handoff_store::read_shard(
            link.clone(),
            spec,
            ReadMode::WaitForSeal,
            None,
            store.read_memory().clone(),
        );
        while let Ok(Some(chunk)) = tokio::time::timeout(common::SETTLE, chunks.recv()).await {
            match chunk {
                Ok(Chunk::Frame(frame)) => {
                    frame
                        .decode(&schema)
                        .expect("a frame the store accepted decodes");
                }
                Ok(_) => {}
                Err(e) => {
                    let text = e.to_string();
                    // A caught panic in the read path says "please report it".
                    assert!(!text.contains("please report it"), "{text}");
                    break;
                }
            }
        }
    }
}
