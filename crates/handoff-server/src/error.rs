use handoff_store::StoreError;
use tonic::{Code, Status};

/// The gRPC code for each store refusal, with the store's sentence as the message.
pub fn status_of(err: StoreError) -> Status {
    let code = match &err {
        StoreError::UnknownLink(_) | StoreError::Deleted(_) => Code::NotFound,
        StoreError::LinkExists(_)
        | StoreError::LinkExistsOtherwise { .. }
        | StoreError::AlreadyCommitted { .. } => Code::AlreadyExists,
        StoreError::Sealed(_) | StoreError::NotStaged { .. } => Code::FailedPrecondition,
        StoreError::Replaced(_) => Code::Aborted,
        StoreError::InvalidLinkName(_)
        | StoreError::SchemaMismatch { .. }
        | StoreError::InvalidIpc(_)
        | StoreError::InvalidArgument(_) => Code::InvalidArgument,
        StoreError::Unsupported(_) => Code::Unimplemented,
        StoreError::MemoryExhausted { .. }
        | StoreError::MemoryWaitTimeout { .. }
        | StoreError::ReadMemory { .. }
        | StoreError::MessageTooLarge { .. } => Code::ResourceExhausted,
        StoreError::Corrupt { .. } => Code::DataLoss,
        // Another planner, or a record to repair: the commit is not published either way.
        StoreError::CommitRecord { .. } => Code::Aborted,
        StoreError::Storage(_)
        | StoreError::Manifest(_)
        | StoreError::ObjectStore { .. }
        | StoreError::StorageFile { .. } => {
            // The detail names the server's files, bucket layout or credentials' errors: for the
            // operator's log, not for a tenant.
            tracing::warn!(error = %err, "object storage failed");
            return Status::unavailable(
                "the server's object storage failed (spill or snapshot); its log has the details, and the call can be retried",
            );
        }
    };
    Status::new(code, err.to_string())
}

/// Errors of setting up and running the server (not of single requests, which are `Status`).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    #[error(
        "invalid TLS certificate or key: {0}; give the PEM certificate chain and its private key"
    )]
    Tls(#[source] Box<tonic::transport::Error>),
    #[error("invalid configuration: {0}")]
    Config(String),
}
