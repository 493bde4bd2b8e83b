//! The controller's one error type.

use crate::resources::InvalidSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    InvalidSpec(#[from] InvalidSpec),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("handoff server at {endpoint}: {source}")]
    Server {
        endpoint: String,
        #[source]
        source: handoff_client::ClientError,
    },
    #[error("{kind} {name} does not have the shape the controller expects: {why}")]
    Workload {
        kind: &'static str,
        name: String,
        why: String,
    },
    #[error("encode: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// A bounded label for `handoff_controller_reconcile_errors_total{error=...}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(status)) if status.code == 403 => "forbidden",
            Error::Kube(_) => "kube",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Server { .. } => "server",
            Error::Workload { .. } => "workload",
            Error::Serialize(_) => "serialize",
            Error::Config(_) => "config",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
