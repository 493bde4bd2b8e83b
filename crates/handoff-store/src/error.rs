use thiserror::Error;

/// Everything the store can refuse. Each variant maps to one gRPC code in the server.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("link '{0}' does not exist; list links with `handoff ls`")]
    UnknownLink(String),
    #[error("link '{0}' already exists")]
    LinkExists(String),
    #[error(
        "link '{link}' already exists with {detail}; create it under another name, or ask for what it has"
    )]
    LinkExistsOtherwise { link: String, detail: String },
    #[error(
        "invalid link name '{0}': use 1-253 characters of [A-Za-z0-9._-], optionally as 'namespace/name'"
    )]
    InvalidLinkName(String),
    #[error(
        "link '{0}' is sealed and takes no more writes; write to a new link or delete it first"
    )]
    Sealed(String),
    #[error("link '{0}' was deleted")]
    Deleted(String),
    #[error(
        "link '{0}' was overwritten (a replacing commit) while this read was running; read it again"
    )]
    Replaced(String),
    #[error("schema mismatch on link '{link}': {detail}")]
    SchemaMismatch { link: String, detail: String },
    #[error(
        "partition {partition} of link '{link}' is already committed (attempt {attempt}); a partition commits once"
    )]
    AlreadyCommitted {
        link: String,
        partition: u64,
        attempt: u64,
    },
    #[error(
        "partition {partition} attempt {attempt} of link '{link}' is not staged; stage it with DoPut(PutPartition) before committing"
    )]
    NotStaged {
        link: String,
        partition: u64,
        attempt: u64,
    },
    #[error("invalid Arrow IPC data: {0}")]
    InvalidIpc(String),
    #[error("unsupported Arrow data: {0}")]
    Unsupported(String),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error(
        "memory limit reached: {requested} more bytes would bring the {scope} to {would_use} of its {limit} byte limit; \
         seal and read or delete links to free memory, or raise the limit"
    )]
    MemoryExhausted {
        scope: String,
        requested: u64,
        would_use: u64,
        limit: u64,
    },
    #[error("waited {}s for memory and none was freed: {cause}", waited.as_secs_f64())]
    MemoryWaitTimeout {
        waited: std::time::Duration,
        #[source]
        cause: Box<StoreError>,
    },
    #[error(
        "this read needs {needed} bytes of server memory for {what}, and {cause}; retry later, \
         read with a smaller batch_rows, or start the server with a larger --memory-limit"
    )]
    ReadMemory {
        what: &'static str,
        needed: u64,
        #[source]
        cause: Box<StoreError>,
    },
    #[error(
        "a {bytes}-byte message is larger than the server's whole memory limit of {limit} bytes; \
         send smaller record batches (Spark: spark.sql.execution.arrow.maxRecordsPerBatch), or raise --memory-limit"
    )]
    MessageTooLarge { bytes: u64, limit: u64 },
    #[error("object storage failed: {0}")]
    Storage(String),
    /// An object store call failed; the cause is kept for the operator's log and for callers
    /// that match on it (not found, precondition, credentials).
    #[error("object storage failed: {url}: {source}")]
    ObjectStore {
        url: String,
        #[source]
        source: object_store::Error,
    },
    /// A local file or directory of a `file://` storage could not be created or made private.
    #[error("object storage failed: {url}: {path}: {source}")]
    StorageFile {
        url: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a snapshot manifest could not be encoded: {0}")]
    Manifest(#[source] serde_json::Error),
    #[error("stored data of link '{link}' could not be decoded: {detail}")]
    Corrupt { link: String, detail: String },
    /// A commit record (several replicas) could not be written or read.
    #[error("commit record of link '{link}': {detail}")]
    CommitRecord { link: String, detail: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Longest piece of a client's text that an error repeats back: a 100 KB name or a 1 MB filter
/// echoed whole would push the reply past gRPC's metadata limit, and the client would see that
/// instead of the refusal.
pub const ECHO_CHARS: usize = 120;

/// `text` as an error may quote it: whole when short, else its start and its length.
pub fn echo(text: &str) -> String {
    match head(text, ECHO_CHARS) {
        None => text.to_string(),
        Some(start) => format!("{start}… ({} bytes in all)", text.len()),
    }
}

/// The first `chars` characters of `text`, if it has more.
pub fn head(text: &str, chars: usize) -> Option<&str> {
    text.char_indices().nth(chars).map(|(cut, _)| &text[..cut])
}
