//! Test fixture: a real server on 127.0.0.1:0, stopped through a oneshot.

#![allow(dead_code)]

use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
use arrow_array::{ArrayRef, Float32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use futures::TryStreamExt;
use handoff_client::HandoffClient;
use handoff_server::{AuthConfig, ServerConfig};
use handoff_store::{Store, StoreConfig};
use tokio::sync::oneshot;

pub const ADMIN: &str = "admin-token";
pub const WRITER: &str = "writer-token";
pub const READER: &str = "reader-token";

pub struct Fixture {
    pub endpoint: String,
    pub store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default(), StoreConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig, store_config: StoreConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::start_on(listener, config, store_config).await
    }

    /// On a listener bound before, for servers that must know each other's address first.
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        config: ServerConfig,
        store_config: StoreConfig,
    ) -> Self {
        Self::start_with_store(listener, config, Store::new(store_config)).await
    }

    /// With a store made before, e.g. restored from snapshots as `serve --restore-from` does.
    pub async fn start_with_store(
        listener: tokio::net::TcpListener,
        mut config: ServerConfig,
        store: Arc<Store>,
    ) -> Self {
        if !config.auth.is_configured() {
            config.auth = AuthConfig {
                disabled: false,
                admin_tokens: vec![ADMIN.into()],
                writer_tokens: vec![WRITER.into()],
                reader_tokens: vec![READER.into()],
            };
        }
        let addr = listener.local_addr().expect("addr");
        let scheme = if config.tls.is_some() {
            "grpc+tls"
        } else {
            "grpc"
        };
        let (tx, rx) = oneshot::channel::<()>();
        let server_store = Arc::clone(&store);
        let handle = tokio::spawn(async move {
            handoff_server::serve(server_store, config, listener, None, async move {
                let _ = rx.await;
            })
            .await
            .expect("server ran");
        });
        Self {
            endpoint: format!("{scheme}://{addr}"),
            store,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn client(&self, token: &str) -> HandoffClient {
        HandoffClient::connect(&self.endpoint, Some(token.to_string()))
            .await
            .expect("connect")
    }

    /// A plain gRPC channel to the server, for raw Flight and Flight SQL clients.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint.replace("grpc://", "http://"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn admin(&self) -> HandoffClient {
        self.client(ADMIN).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task");
        }
    }
}

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float32, true),
        Field::new("name", DataType::Utf8, true),
        Field::new(
            "emb",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), 4),
            true,
        ),
    ]))
}

/// Rows with ids `start..start+rows`; every column derives from the id, so content is checkable.
pub fn batch(start: i64, rows: usize) -> RecordBatch {
    let ids: Vec<i64> = (start..start + rows as i64).collect();
    let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 4);
    for id in &ids {
        for k in 0..4 {
            emb.values().append_value(*id as f32 + k as f32);
        }
        emb.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids.clone())),
        Arc::new(Float32Array::from(
            ids.iter().map(|i| *i as f32 * 0.5).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            ids.iter().map(|i| format!("row-{i}")).collect::<Vec<_>>(),
        )),
        Arc::new(emb.finish()),
    ];
    RecordBatch::try_new(schema(), columns).expect("batch")
}

pub fn stream_of(
    batches: Vec<RecordBatch>,
) -> impl futures::Stream<Item = Result<RecordBatch, handoff_client::ClientError>> + Send + 'static
{
    futures::stream::iter(batches.into_iter().map(Ok))
}

/// The ids of a batch, checking that the other columns still match them.
pub fn ids(batch: &RecordBatch) -> Vec<i64> {
    let id = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("id column");
    let name = batch
        .column(2)
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("name column");
    for (i, v) in id.iter().enumerate() {
        assert_eq!(
            name.value(i),
            format!("row-{}", v.expect("id")),
            "row content travelled with its id"
        );
    }
    id.values().to_vec()
}

pub async fn collect(stream: arrow_flight::decode::FlightRecordBatchStream) -> Vec<RecordBatch> {
    stream.try_collect().await.expect("read")
}

/// Every row id of a link, read through all of its FlightInfo endpoints.
pub async fn link_ids(client: &mut HandoffClient, link: &str) -> Vec<i64> {
    let mut got = Vec::new();
    for stream in client.read_link(link).await.expect("read").1 {
        for b in collect(stream).await {
            got.extend(ids(&b));
        }
    }
    got
}

/// Whether the server's memory holds nothing but `held` bytes and the HTTP/2 windows of open
/// connections that wrote (see [`assert_memory_is_only`]).
pub fn memory_is_only(server: &Fixture, held: u64) -> bool {
    let used = server.store.memory().used();
    let window = u64::from(handoff_server::h2_window_for(server.store.memory().limit()));
    used >= held && (used - held).is_multiple_of(window) && used - held <= 4 * window
}

/// The server holds exactly the committed bytes of `link`, beside the HTTP/2 window that each
/// open connection that wrote holds: nothing staged, nothing leaked.
pub fn assert_memory_is_only(server: &Fixture, link: &str, why: &str) {
    let held = server.store.stats(link).expect("stats").bytes;
    assert!(
        memory_is_only(server, held),
        "{why}: {} bytes used, {held} held by the link",
        server.store.memory().used()
    );
}
