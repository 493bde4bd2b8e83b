//! Request decoding: descriptors (PATH and CMD, Flight SQL commands included), tickets and
//! actions from an admin, through the real Flight service (no network). Nothing may panic, and a
//! refusal is never INTERNAL or UNKNOWN: garbage is the client's error, with a sentence.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{Action, Criteria, FlightDescriptor, Ticket};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use futures::StreamExt;
use handoff_server::{AuthConfig, HandoffService, Metrics};
use handoff_store::{PutTarget, Store, StoreConfig};
use libfuzzer_sys::fuzz_target;
use tonic::{Code, Request, Status};

const TOKEN: &str = "fuzz-admin";

fuzz_target!(
    init: common::quiet_caught_panics(),
    |data: &[u8]| common::runtime().block_on(decode(data))
);

/// A fresh store per input, so that one input's actions (a delete, a replace) never change what
/// the next one meets: libFuzzer needs each run to depend on its input alone.
async fn service() -> HandoffService {
    let store = Store::new(StoreConfig {
        memory_limit: Some(64 << 20),
        ..StoreConfig::default()
    });
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..64)) as ArrayRef,
            Arc::new(StringArray::from_iter_values(
                (0..64).map(|i| format!("n{i}")),
            )),
        ],
    )
    .expect("batch");
    for link in ["l", "open"] {
        let mut writer = store.begin_put(link, PutTarget::Append, true).expect("put");
        for message in handoff_store::SchemaFrame::from_schema(schema.clone())
            .map(|s| vec![(s.header, Bytes::new())])
            .expect("schema")
            .into_iter()
            .chain(encode(&batch))
        {
            writer.push(message.0, message.1).await.expect("push");
        }
        writer.finish().await.expect("finish");
    }
    store.seal("l").expect("seal");
    let auth = AuthConfig {
        disabled: false,
        admin_tokens: vec![TOKEN.into()],
        writer_tokens: Vec::new(),
        reader_tokens: Vec::new(),
    };
    HandoffService::new(store, auth, Arc::new(Metrics::default()), 1 << 20).expect("service")
}

fn encode(batch: &RecordBatch) -> Vec<(Bytes, Bytes)> {
    let options = arrow_ipc::writer::IpcWriteOptions::default();
    let mut tracker = arrow_ipc::writer::DictionaryTracker::new(false);
    let (_, encoded) = arrow_ipc::writer::IpcDataGenerator::default()
        .encode(batch, &mut tracker, &options, &mut Default::default())
        .expect("encode");
    vec![(
        Bytes::from(encoded.ipc_message),
        Bytes::from(encoded.arrow_data),
    )]
}

fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    request
}

fn check(outcome: Result<(), Status>) {
    if let Err(status) = outcome {
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown),
            "{:?}: {}",
            status.code(),
            status.message()
        );
        assert!(!status.message().is_empty(), "a refusal without a sentence");
        // Errors quote client text briefly (docs/security.md): no echo of a whole input.
        assert!(
            status.message().len() < 2048,
            "{} bytes",
            status.message().len()
        );
    }
}

/// At most this many messages of a stream: a valid ticket may stream a whole link.
const DRAIN: usize = 16;

/// The first messages of a response stream; a stream that waits (for a seal, for more rows) is
/// left after `SETTLE`.
async fn drain<T>(
    stream: impl futures::Stream<Item = Result<T, Status>> + Unpin,
) -> Result<(), Status> {
    let mut stream = stream.take(DRAIN);
    loop {
        match tokio::time::timeout(common::SETTLE, stream.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) | Err(_) => return Ok(()),
        }
    }
}

async fn decode(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let service = service().await;
    let body = Bytes::copy_from_slice(rest);
    let outcome = match kind % 6 {
        0 => service
            .get_flight_info(request(FlightDescriptor::new_cmd(body)))
            .await
            .map(drop),
        1 => {
            let path = rest
                .split(|b| *b == b'/')
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>();
            service
                .get_flight_info(request(FlightDescriptor::new_path(path)))
                .await
                .map(drop)
        }
        2 => match service.do_get(request(Ticket::new(body))).await {
            Ok(response) => drain(response.into_inner()).await,
            Err(status) => Err(status),
        },
        3 => {
            let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            let kind = String::from_utf8_lossy(&rest[..split]).into_owned();
            let body = body.slice((split + 1).min(rest.len())..);
            match service.do_action(request(Action::new(kind, body))).await {
                Ok(response) => drain(response.into_inner()).await,
                Err(status) => Err(status),
            }
        }
        4 => service
            .get_schema(request(FlightDescriptor::new_cmd(body)))
            .await
            .map(drop),
        _ => match service
            .list_flights(request(Criteria { expression: body }))
            .await
        {
            Ok(response) => drain(response.into_inner()).await,
            Err(status) => Err(status),
        },
    };
    check(outcome);
}
