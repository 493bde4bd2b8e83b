//! The controller's Prometheus metrics, and its `/metrics`, `/healthz`, `/readyz` endpoint.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

pub struct Metrics {
    registry: Registry,
    reconciliations: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    /// Set once the controller's watches run; `/readyz` answers 200 from then on.
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("handoff_controller");
        let reconciliations = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms to about 16 s: a reconcile is a handful of API calls and one Flight call.
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "reconciliations",
            "DataLink reconciliations run",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long one reconciliation took",
            duration.clone(),
        );
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciliations.inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, error: &'static str) {
        self.failures.get_or_create(&ErrorLabels { error }).inc();
    }

    /// Reconciliations so far; tests wait on it.
    pub fn reconciliations(&self) -> u64 {
        self.reconciliations.get()
    }

    pub fn errors(&self, error: &'static str) -> u64 {
        self.failures.get_or_create(&ErrorLabels { error }).get()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// `/metrics` for a scraper that sent `accept`, with its content type: OpenMetrics if it
    /// asks for it (Prometheus does), else the Prometheus text format (curl, `promtool check
    /// metrics`).
    pub fn exposition(&self, accept: Option<&str>) -> (&'static str, String) {
        handoff_metrics::exposition(self.render(), accept)
    }
}

/// Serve `/metrics`, `/healthz` (the process is alive) and `/readyz` (the watches run) until
/// `shutdown` completes.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(
                |State(m): State<Arc<Metrics>>, headers: axum::http::HeaderMap| async move {
                    let accept = headers.get(axum::http::header::ACCEPT);
                    let (content_type, text) = m.exposition(accept.and_then(|a| a.to_str().ok()));
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
        .with_state(metrics);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn metrics_health_and_readiness_are_served_separately() {
        let metrics = Arc::new(Metrics::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(listener, Arc::clone(&metrics), async move {
            let _ = stopped.await;
        }));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(
            get(addr, "/readyz").await.starts_with("HTTP/1.1 503"),
            "not ready before the watches run"
        );
        metrics.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));

        metrics.reconciled(Duration::from_millis(3));
        metrics.failed("conflict");
        let text = get(addr, "/metrics").await;
        assert!(
            text.contains("handoff_controller_reconciliations_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"handoff_controller_reconcile_errors_total{error="conflict"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("handoff_controller_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        // curl gets the Prometheus text format; Prometheus, which asks for it, OpenMetrics.
        assert!(text.contains(handoff_metrics::TEXT_CONTENT_TYPE), "{text}");
        let counter = "# TYPE handoff_controller_reconciliations_total counter\n";
        assert!(text.contains(counter), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        let (kind, text) = metrics.exposition(Some("application/openmetrics-text;version=1.0.0"));
        assert_eq!(kind, handoff_metrics::OPENMETRICS_CONTENT_TYPE);
        let counter = "# TYPE handoff_controller_reconciliations counter\n";
        assert!(
            text.contains(counter) && text.ends_with("# EOF\n"),
            "{text}"
        );
        let _ = stop.send(());
        server.await.expect("task").expect("served");
    }
}
