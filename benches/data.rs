//! Bench data shared by the criterion benches: wide rows, encoded as Flight would carry them.

use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_flight::{FlightData, SchemaAsIpc};
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};

pub fn batch(rows: usize) -> RecordBatch {
    let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 128);
    for i in 0..rows {
        emb.values().append_slice(&[i as f32; 128]);
        emb.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(0..rows as i64)),
        Arc::new(Float64Array::from_iter_values((0..rows).map(|i| i as f64))),
        Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("item-{i:011}")),
        )),
        Arc::new(emb.finish()),
    ];
    RecordBatch::try_from_iter(["id", "x", "name", "emb"].into_iter().zip(columns)).expect("batch")
}

pub fn encode(batches: &[RecordBatch]) -> Vec<FlightData> {
    let options = IpcWriteOptions::default();
    let mut out = vec![FlightData::from(SchemaAsIpc::new(
        &batches[0].schema(),
        &options,
    ))];
    let (generator, mut tracker, mut context) = (
        IpcDataGenerator::default(),
        DictionaryTracker::new(false),
        IpcWriteContext::default(),
    );
    for b in batches {
        let (_, encoded) = generator
            .encode(b, &mut tracker, &options, &mut context)
            .expect("encode");
        out.push(FlightData {
            data_header: encoded.ipc_message.into(),
            data_body: encoded.arrow_data.into(),
            ..Default::default()
        });
    }
    out
}

/// A server without auth on 127.0.0.1:0, running on `runtime` until the bench ends.
#[allow(dead_code)] // not every bench serves
pub fn start_server(runtime: &tokio::runtime::Runtime) -> (String, Arc<handoff_store::Store>) {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("grpc://{}", listener.local_addr().expect("addr"));
        let store = handoff_store::Store::new(handoff_store::StoreConfig::default());
        let config = handoff_server::ServerConfig {
            auth: handoff_server::AuthConfig::disabled(),
            ..Default::default()
        };
        tokio::spawn(handoff_server::serve(
            Arc::clone(&store),
            config,
            listener,
            None,
            std::future::pending(),
        ));
        (endpoint, store)
    })
}
