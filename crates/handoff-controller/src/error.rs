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
    /// The server took longer than the controller waits for one call: busy or restarting, like
    /// an unreachable one, so it is retried as one (never backed off past the poll interval).
    #[error("handoff server at {endpoint} did not answer {call} in {} s", .waited.as_secs())]
    ServerTimeout {
        endpoint: String,
        call: &'static str,
        waited: std::time::Duration,
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
            Error::Server { .. } | Error::ServerTimeout { .. } => "server",
            Error::Workload { .. } => "workload",
            Error::Serialize(_) => "serialize",
            Error::Config(_) => "config",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "y").with_code(code),
        )))
    }

    #[test]
    fn metric_labels_are_bounded_and_see_through_the_finalizer() {
        assert_eq!(api(409).metric_label(), "conflict");
        assert_eq!(api(403).metric_label(), "forbidden");
        assert_eq!(api(500).metric_label(), "kube");
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
            api(409),
        )));
        assert_eq!(wrapped.metric_label(), "conflict");
        let invalid = Error::InvalidSpec(InvalidSpec("no".into()));
        assert_eq!(invalid.metric_label(), "invalid_spec");
        // A slow server is retried like an unreachable one, not backed off for minutes.
        let slow = Error::ServerTimeout {
            endpoint: "grpc://x:1".into(),
            call: "stats",
            waited: std::time::Duration::from_secs(10),
        };
        assert_eq!(slow.metric_label(), "server");
        assert_eq!(
            slow.to_string(),
            "handoff server at grpc://x:1 did not answer stats in 10 s"
        );
    }
}
