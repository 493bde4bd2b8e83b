//! The Handoff Arrow Flight server: the tonic service, auth, health and metrics endpoints.

pub mod auth;
mod conn;
pub mod encode;
pub mod error;
mod imports;
mod inflight;
pub mod metrics;
mod panic;
pub mod raw;
pub mod replicas;
pub mod service;
mod sql;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow_flight::flight_service_server::FlightServiceServer;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use handoff_store::Store;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::server::NamedService;

pub use auth::AuthConfig;
pub use conn::ConnTimeouts;
pub use error::{ServerError, status_of};
pub use metrics::Metrics;
pub use raw::FlightRouter;
pub use replicas::ReplicaConfig;
pub use service::HandoffService;

/// HTTP/2 tuning that halved DoPut CPU in our measurements: large frames, large windows.
const H2_MAX_FRAME: u32 = 1 << 20;
pub const H2_WINDOW: u32 = 16 << 20;

/// The HTTP/2 window for a server with `memory_limit`: the default, or less, so that 128
/// writing connections' windows together stay within the budget (each holds its window from the
/// budget: 4 MiB at 512 MiB; at least HTTP/2's own default of 64 KiB).
pub fn h2_window_for(memory_limit: Option<u64>) -> u32 {
    memory_limit.map_or(H2_WINDOW, |limit| {
        u32::try_from((limit / 128).clamp(H2_MIN_WINDOW, u64::from(H2_WINDOW))).unwrap_or(H2_WINDOW)
    })
}

/// HTTP/2's initial window (RFC 9113, 6.9.2).
const H2_MIN_WINDOW: u64 = 65_535;

/// Far more than one link's writers and readers need (an executor or a rank holds one or two),
/// and far below the open-files limit of a container (usually 1M; 20k on small machines).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Calls in flight on one connection: Spark and torch clients multiplex a handful.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 pings on a quiet connection, and how long an answer may take before it is closed:
/// a peer that vanished (a killed pod, a cut network) frees its connection within a minute.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub auth: AuthConfig,
    /// Largest gRPC message accepted (DoPut frames) and sent.
    pub max_message_bytes: usize,
    /// Target size of FlightData messages the server encodes itself.
    pub max_flight_data_size: usize,
    /// Send DoGet bodies below tonic's codec, without copying them.
    pub zero_copy_get: bool,
    /// How long SIGTERM waits for in-flight calls before closing them.
    pub drain_timeout: Duration,
    /// Drop open links that nobody wrote to for this long.
    pub idle_timeout: Option<Duration>,
    /// Open connections per port; further ones are closed at once.
    pub max_connections: usize,
    /// Concurrent calls (HTTP/2 streams) per connection.
    pub max_concurrent_streams: u32,
    /// URL prefixes `import` may read under, with the server's own credentials. Empty: import
    /// is off. `file://` is allowed only under a `file://` prefix named here.
    pub import_allow: Vec<String>,
    /// HTTP/2 receive window of each stream and connection. Data a client sends within it is
    /// buffered by the HTTP/2 layer whether or not a handler reads it, so a stalled writer (the
    /// `wait` policy) holds up to this much outside the memory budget.
    pub h2_window: u32,
    /// How long a gRPC connection may stay silent after accept (and, if set, between bytes).
    pub grpc_timeouts: conn::ConnTimeouts,
    /// TLS on the Flight port; `None`: plain text.
    pub tls: Option<TlsConfig>,
    /// The replicas of this server's links (`serve --peers`); `None`: a single server.
    pub replicas: Option<ReplicaConfig>,
}

/// TLS for the Flight port, in PEM: the server's certificate chain and key, and, for mutual TLS,
/// the CA that every client's certificate must chain to.
#[derive(Clone)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// A TLS handshake longer than this is a stalled or hostile client; its connection is closed.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsConfig {
    fn server_config(&self) -> Result<tonic::transport::ServerTlsConfig, ServerError> {
        for (what, pem) in [("certificate", &self.cert_pem), ("key", &self.key_pem)] {
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(ServerError::Config(format!(
                    "the TLS {what} is not PEM (no -----BEGIN line): give a PEM file"
                )));
            }
        }
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        Ok(tls)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            auth: AuthConfig::default(),
            max_message_bytes: handoff_proto::DEFAULT_MAX_MESSAGE_BYTES,
            max_flight_data_size: handoff_proto::TARGET_FLIGHT_DATA_BYTES,
            zero_copy_get: true,
            drain_timeout: Duration::from_secs(30),
            idle_timeout: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            h2_window: H2_WINDOW,
            grpc_timeouts: conn::ConnTimeouts::GRPC,
            import_allow: Vec::new(),
            tls: None,
            replicas: None,
        }
    }
}

struct HttpState {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
}

fn http_router(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<HttpState>>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(
                |State(s): State<Arc<HttpState>>, headers: axum::http::HeaderMap| async move {
                    let accept = headers.get(axum::http::header::ACCEPT);
                    let accept = accept.and_then(|a| a.to_str().ok());
                    let (content_type, text) = s.metrics.exposition(&s.store, accept);
                    (
                        [
                            (axum::http::header::CONTENT_TYPE, content_type),
                            (axum::http::header::VARY, "accept"),
                        ],
                        text,
                    )
                },
            ),
        )
        .with_state(state)
}

/// Serve Flight (and grpc.health.v1) on `grpc`, and `/healthz`, `/readyz`, `/metrics` on `http`,
/// until `shutdown` completes; then drain in-flight calls for up to `drain_timeout`.
pub async fn serve(
    store: Arc<Store>,
    config: ServerConfig,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    if !config.auth.is_configured() {
        return Err(ServerError::Config(
            "no tokens configured: give a token, or disable auth explicitly".into(),
        ));
    }
    if config.max_flight_data_size > config.max_message_bytes {
        return Err(ServerError::Config(format!(
            "max_flight_data_size {} exceeds max_message_bytes {}; readers would refuse the server's messages",
            config.max_flight_data_size, config.max_message_bytes
        )));
    }
    let metrics = Arc::new(Metrics::default());
    let service = HandoffService::new(
        Arc::clone(&store),
        config.auth.clone(),
        Arc::clone(&metrics),
        config.max_flight_data_size,
    )
    .map_err(|e| ServerError::Config(format!("cannot describe Flight SQL: {e}")))?
    .with_imports(imports::ImportAllowlist::new(&config.import_allow).map_err(ServerError::Config)?)
    .with_replicas(config.replicas.clone());
    // A planner that restarted finishes the commits it recorded and had not applied everywhere.
    let finishing = {
        let service = service.clone();
        tokio::spawn(async move {
            for what in service.finish_recorded_commits().await {
                // Said plainly on stderr too: a commit that is neither applied nor dropped, or
                // one that was abandoned.
                eprintln!("handoff: {what}");
            }
        })
    };
    let expiry_service = service.clone();
    let grpc_service = FlightServiceServer::new(service.clone())
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let incoming = store.memory().limit().map(|_| store.incoming_memory());
    // Under a budget the window is never larger than the budget's share for it, whatever the
    // configuration asked: each writing connection holds it (see `inflight`).
    let h2_window = match store.memory().limit() {
        Some(limit) => config.h2_window.min(h2_window_for(Some(limit))),
        None => config.h2_window,
    };
    let router = panic::CatchPanic::new(
        conn::CountCalls::new(inflight::ReserveIncoming::new(
            FlightRouter::new(grpc_service, service, config.zero_copy_get),
            incoming,
            h2_window,
        )),
        Arc::clone(&metrics),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(FlightRouter::NAME, tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    // Link lifecycle: the TTLs and the idle timeout, checked once a second. Over replicas the
    // planner decides for the whole link and deletes it everywhere; the others never expire
    // a part on their own (a part idle here may be a link written elsewhere).
    let reaper = {
        let (store, metrics, idle) = (
            Arc::clone(&store),
            Arc::clone(&metrics),
            config.idle_timeout,
        );
        let replicated = config.replicas.as_ref().filter(|r| r.count() > 1);
        let planner = replicated.is_none_or(|r| r.is_planner());
        let over_replicas = replicated.is_some();
        let service = expiry_service;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut retry_at = Default::default();
            loop {
                tick.tick().await;
                if !planner {
                    continue;
                }
                let expired = if over_replicas {
                    service.expire_over_replicas(idle, &mut retry_at).await
                } else {
                    let expired = store.expire(idle);
                    for (name, _) in &expired {
                        if let Err(e) = store.forget_snapshot(name).await {
                            tracing::error!(link = %name, error = %e, "expired, but its snapshot remains and comes back on restart");
                        }
                    }
                    expired
                };
                for (_, why) in expired {
                    metrics
                        .expired_links
                        .get_or_create(&metrics::ReasonLabels {
                            reason: why.label(),
                        })
                        .inc();
                }
            }
        })
    };
    let state = Arc::new(HttpState {
        store,
        metrics,
        ready: AtomicBool::new(true),
    });
    let (http_stop, http_stopped) = oneshot::channel::<()>();
    let http_cap =
        conn::ConnectionCap::new("http", config.max_connections, conn::ConnTimeouts::HTTP);
    let http_task = http.map(|listener| {
        let app = http_router(Arc::clone(&state));
        let listener = conn::CappedListener::new(listener, http_cap);
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_stopped.await;
                })
                .await
        })
    });

    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(grpc)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)));
    let incoming = conn::ConnectionCap::new("grpc", config.max_connections, config.grpc_timeouts)
        .limit(incoming);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.server_config()?)
            .map_err(|e| ServerError::Tls(Box::new(e)))?;
    }
    let grpc_future = builder
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(Some(H2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(H2_KEEPALIVE_TIMEOUT))
        .max_frame_size(H2_MAX_FRAME)
        .initial_stream_window_size(h2_window)
        .initial_connection_window_size(h2_window)
        .add_service(health_service)
        .add_service(router)
        // Builder socket options do not reach a listener we bound ourselves; without nodelay,
        // every small reply (FlightInfo, actions) waits out a delayed ACK, ~40 ms.
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = drain_rx.await;
        });
    tokio::pin!(grpc_future);
    tokio::pin!(shutdown);

    let outcome = tokio::select! {
        result = &mut grpc_future => result.map_err(ServerError::from),
        () = &mut shutdown => {
            tracing::info!(timeout = ?config.drain_timeout, "draining: not ready, finishing in-flight calls");
            state.ready.store(false, Ordering::Relaxed);
            health.set_service_status(FlightRouter::NAME, tonic_health::ServingStatus::NotServing).await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            let _ = drain_tx.send(());
            match tokio::time::timeout(config.drain_timeout, &mut grpc_future).await {
                Ok(result) => result.map_err(ServerError::from),
                Err(_) => {
                    tracing::warn!("drain timed out; closing the remaining calls");
                    Ok(())
                }
            }
        }
    };
    reaper.abort();
    finishing.abort();
    let _ = http_stop.send(());
    if let Some(task) = http_task
        && let Ok(Err(e)) = task.await
    {
        return Err(ServerError::Http(e));
    }
    tracing::info!("stopped");
    outcome
}
