//! Prometheus metrics of the data plane.

use std::sync::atomic::AtomicU64;

use handoff_store::{LinkState, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub rpcs: Family<RpcLabels, Counter>,
    pub ingested_bytes: Counter,
    pub ingested_rows: Counter,
    pub served_bytes: Counter,
    pub served_rows: Counter,
    pub broken_puts: Counter,
    /// Calls that hit a bug (a panic) and were answered INTERNAL.
    pub panics: Counter,
    pub expired_links: Family<ReasonLabels, Counter>,
    memory_used: Gauge<u64, AtomicU64>,
    memory_limit: Gauge<u64, AtomicU64>,
    memory_peak: Gauge<u64, AtomicU64>,
    staged: Gauge<u64, AtomicU64>,
    spilled: Gauge<u64, AtomicU64>,
    spilled_total: Counter<u64, AtomicU64>,
    shuffle_windows: Counter<u64, AtomicU64>,
    links: Family<StateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("handoff");
        let m = Self {
            rpcs: Family::default(),
            ingested_bytes: Counter::default(),
            ingested_rows: Counter::default(),
            served_bytes: Counter::default(),
            served_rows: Counter::default(),
            broken_puts: Counter::default(),
            panics: Counter::default(),
            expired_links: Family::default(),
            memory_used: Gauge::default(),
            memory_limit: Gauge::default(),
            memory_peak: Gauge::default(),
            staged: Gauge::default(),
            spilled: Gauge::default(),
            spilled_total: Counter::default(),
            shuffle_windows: Counter::default(),
            links: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rpcs",
            "Flight calls by method and result code",
            m.rpcs.clone(),
        );
        registry.register(
            "ingested_bytes",
            "Arrow IPC bytes accepted by DoPut",
            m.ingested_bytes.clone(),
        );
        registry.register(
            "ingested_rows",
            "Rows accepted by DoPut",
            m.ingested_rows.clone(),
        );
        registry.register(
            "served_bytes",
            "Arrow IPC bytes sent by DoGet",
            m.served_bytes.clone(),
        );
        registry.register("served_rows", "Rows sent by DoGet", m.served_rows.clone());
        registry.register(
            "broken_puts",
            "DoPut streams that ended in an error and left nothing",
            m.broken_puts.clone(),
        );
        registry.register(
            "panics",
            "Calls that hit a server bug and were answered INTERNAL; the server went on",
            m.panics.clone(),
        );
        registry.register(
            "memory_used_bytes",
            "Bytes held, staged and committed",
            m.memory_used.clone(),
        );
        registry.register(
            "memory_limit_bytes",
            "The memory limit (0: none)",
            m.memory_limit.clone(),
        );
        registry.register(
            "memory_peak_bytes",
            "The most bytes held at once",
            m.memory_peak.clone(),
        );
        registry.register(
            "staged_bytes",
            "Bytes held by staged, uncommitted partition attempts",
            m.staged.clone(),
        );
        registry.register(
            "spilled_bytes",
            "Bytes of links' data held in object storage by the spill policy",
            m.spilled.clone(),
        );
        registry.register(
            "spilled_written_bytes",
            "Bytes moved to object storage by the spill policy since the server started",
            m.spilled_total.clone(),
        );
        registry.register(
            "shuffle_windows_built",
            "Shuffle windows decoded; ranks of one epoch share them, so about one per window per epoch",
            m.shuffle_windows.clone(),
        );
        registry.register(
            "expired_links",
            "Links deleted by their TTL after seal or by the idle timeout",
            m.expired_links.clone(),
        );
        registry.register("links", "Links by state", m.links.clone());
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn rpc(&self, method: &'static str, code: tonic::Code) {
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// `/metrics` for a scraper that sent `accept`, with its content type: OpenMetrics if it
    /// asks for it (Prometheus does), else the Prometheus text format (curl, `promtool check
    /// metrics`).
    pub fn exposition(&self, store: &Store, accept: Option<&str>) -> (&'static str, String) {
        handoff_metrics::exposition(self.render(store), accept)
    }

    /// The OpenMetrics text, with gauges read fresh from the store.
    pub fn render(&self, store: &Store) -> String {
        let memory = store.memory();
        self.memory_used.set(memory.used());
        self.memory_limit.set(memory.limit().unwrap_or(0));
        self.memory_peak.set(memory.peak());
        let (mut open, mut sealed, mut staged, mut spilled) = (0, 0, 0, 0);
        for link in store.list() {
            staged += link.staged_bytes();
            spilled += link.spilled_bytes();
            match link.state() {
                LinkState::Open => open += 1,
                LinkState::Sealed => sealed += 1,
                LinkState::Deleted => {}
            }
        }
        self.staged.set(staged);
        self.spilled.set(spilled);
        let total = store.spilled_bytes_total();
        self.spilled_total
            .inc_by(total.saturating_sub(self.spilled_total.get()));
        let built = store.read_memory().shuffle_windows_built();
        self.shuffle_windows
            .inc_by(built.saturating_sub(self.shuffle_windows.get()));
        self.links
            .get_or_create(&StateLabels { state: "open" })
            .set(open);
        self.links
            .get_or_create(&StateLabels { state: "sealed" })
            .set(sealed);
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_curl_the_text_format() {
        let (metrics, store) = (Metrics::default(), Store::new(Default::default()));
        metrics.rpc("do_get", tonic::Code::Ok);
        // What Prometheus sends.
        let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
            version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (kind, text) = metrics.exposition(&store, Some(accept));
        assert_eq!(kind, handoff_metrics::OPENMETRICS_CONTENT_TYPE);
        assert!(text.contains("# TYPE handoff_rpcs counter\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        for accept in [None, Some("*/*")] {
            let (kind, text) = metrics.exposition(&store, accept);
            assert_eq!(kind, handoff_metrics::TEXT_CONTENT_TYPE);
            assert!(
                text.contains("# TYPE handoff_rpcs_total counter\n"),
                "{text}"
            );
            let sample = r#"handoff_rpcs_total{method="do_get",code="ok"} 1"#;
            assert!(text.contains(sample), "{text}");
            assert!(!text.contains("# EOF"), "{text}");
        }
    }
}
