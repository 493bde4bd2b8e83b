//! A Rust client for the Handoff Flight server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), handoff_client::ClientError> {
//! use futures::TryStreamExt;
//! let mut client = handoff_client::HandoffClient::connect("grpc://127.0.0.1:8815", Some("token".into())).await?;
//! let batches = client.read_shard(handoff_client::ReadShard {
//!     link: "features".into(), rank: 0, world_size: 2, batch_rows: 1024, ..Default::default()
//! }).await?.try_collect::<Vec<_>>().await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Action, FlightClient, FlightDescriptor, FlightInfo, Ticket};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use handoff_proto as proto;
pub use handoff_proto::{CreateLink, MemoryPolicy, ReadMode, ReadShard};

/// What went wrong, with the server's sentence where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint '{0}': use grpc://host:port, or grpc+tls://host:port for TLS")]
    Endpoint(String),
    #[error("cannot connect to {endpoint}: {detail}; {hint}")]
    Connect {
        endpoint: String,
        /// The transport error's chain of causes, which tonic's own message leaves out.
        detail: String,
        hint: &'static str,
        source: tonic::transport::Error,
    },
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("{}", status_text(.0))]
    Status(#[source] tonic::Status),
    #[error("{0}")]
    Flight(#[source] FlightError),
    #[error("unexpected reply from the server: {0}")]
    Protocol(String),
    #[error("unexpected reply from the server ({what}): {source}")]
    Reply {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read {name}={}: {source}", .path.display())]
    TlsFile {
        name: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The gRPC code, where the server answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// The server never gave this status: the transport failed under the call (refused, reset,
    /// or a connection that closed mid-request, which hyper reports as CANCELLED). tonic puts
    /// the transport's error under such a status as its source; a server's own status has none.
    pub fn from_transport(&self) -> bool {
        match self {
            ClientError::Status(status) => std::error::Error::source(status).is_some(),
            ClientError::Connect { .. } => true,
            _ => false,
        }
    }
}

impl From<FlightError> for ClientError {
    fn from(e: FlightError) -> Self {
        match e {
            FlightError::Tonic(status) => ClientError::Status(*status),
            other => ClientError::Flight(other),
        }
    }
}

impl From<ClientError> for FlightError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Status(s) => FlightError::Tonic(Box::new(s)),
            ClientError::Flight(f) => f,
            other => FlightError::ExternalError(Box::new(other)),
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The server's answer to a DoPut.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PutOutcome {
    pub link: String,
    pub partition: u64,
    pub attempt: u64,
    pub rows: u64,
    pub bytes: u64,
    pub committed: bool,
}

/// The `stats` action's JSON.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct LinkStats {
    pub link: String,
    pub state: String,
    pub partitions: u64,
    pub rows: u64,
    pub bytes: u64,
    pub staged_partitions: u64,
    pub staged_bytes: u64,
    /// Bytes of this link held in memory, staged and committed.
    pub memory_bytes: u64,
    /// Partitions and bytes the spill policy moved to object storage.
    #[serde(default)]
    pub spilled_partitions: u64,
    #[serde(default)]
    pub spilled_bytes: u64,
    pub schema: Vec<String>,
    #[serde(default)]
    pub server_memory_used: u64,
    #[serde(default)]
    pub server_memory_limit: Option<u64>,
    #[serde(default)]
    pub memory_limit: Option<u64>,
    #[serde(default)]
    pub memory_policy: String,
    /// Changes when the server restarts (its memory started over); empty from older servers.
    /// Over several replicas: each replica's, joined by commas.
    #[serde(default)]
    pub server_instance: String,
    /// Each replica's part, for a link over several replicas; empty for a single server.
    #[serde(default)]
    pub replicas: Vec<ReplicaPart>,
    /// Over replicas: committed partitions that a replica restarted since and no longer holds.
    #[serde(default)]
    pub lost: Vec<LostPart>,
}

/// Partitions one replica lost, in [`LinkStats::lost`].
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct LostPart {
    pub replica: u32,
    pub endpoint: String,
    pub partitions: Vec<u64>,
}

/// One replica's part of a link, in [`LinkStats::replicas`].
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ReplicaPart {
    pub replica: u32,
    pub endpoint: String,
    /// `open`, `sealed`, or `none` when no partition reached it.
    pub state: String,
    pub partitions: u64,
    pub rows: u64,
    pub bytes: u64,
    pub memory_bytes: u64,
}

/// The `topology` action's JSON: every replica's endpoint in index order (none for a single
/// server), and which one answered.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
pub struct Topology {
    pub replicas: Vec<String>,
    pub index: u32,
}

/// Client settings; the defaults match the server's.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub endpoint: String,
    pub token: Option<String>,
    pub max_message_bytes: usize,
    pub max_flight_data_size: usize,
    pub connect_timeout: Duration,
    /// For grpc+tls:// endpoints: the PEM CA that the server's certificate must chain to. None:
    /// the system's roots.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// For mutual TLS: this client's PEM certificate and key.
    pub tls_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry, when it differs from the endpoint's host
    /// (an address, a port-forward).
    pub tls_domain: Option<String>,
    /// How long a read over replicas waits for a replica that broke off mid-read (its pod
    /// restarting and restoring its snapshot) to answer again, before the read fails.
    pub resume_within: Duration,
}

/// [`ClientConfig::resume_within`] by default: a pod's restart and snapshot restore.
pub const DEFAULT_RESUME_WITHIN: Duration = Duration::from_secs(60);

impl ClientConfig {
    pub fn new(endpoint: impl Into<String>, token: Option<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            token,
            max_message_bytes: proto::DEFAULT_MAX_MESSAGE_BYTES,
            max_flight_data_size: proto::TARGET_FLIGHT_DATA_BYTES,
            connect_timeout: Duration::from_secs(10),
            tls_ca_pem: None,
            tls_identity: None,
            tls_domain: None,
            resume_within: DEFAULT_RESUME_WITHIN,
        }
    }

    /// TLS settings from the environment, as every Handoff client reads them:
    /// `HANDOFF_TLS_CA` (a PEM file) or `HANDOFF_TLS_CA_PEM` (the PEM itself, as the controller
    /// injects it from the link's Secret), and for mutual TLS `HANDOFF_TLS_CLIENT_CERT` and
    /// `HANDOFF_TLS_CLIENT_KEY` (PEM files).
    pub fn with_env_tls(mut self) -> Result<Self> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let read = |name: &'static str, path: std::ffi::OsString| {
            std::fs::read(&path).map_err(|source| ClientError::TlsFile {
                name,
                path: path.into(),
                source,
            })
        };
        if let Some(path) = var("HANDOFF_TLS_CA") {
            self.tls_ca_pem = Some(read("HANDOFF_TLS_CA", path)?);
        } else if let Some(pem) = var("HANDOFF_TLS_CA_PEM") {
            self.tls_ca_pem = Some(pem.into_encoded_bytes());
        }
        match (
            var("HANDOFF_TLS_CLIENT_CERT"),
            var("HANDOFF_TLS_CLIENT_KEY"),
        ) {
            (Some(cert), Some(key)) => {
                self.tls_identity = Some((
                    read("HANDOFF_TLS_CLIENT_CERT", cert)?,
                    read("HANDOFF_TLS_CLIENT_KEY", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::Tls(
                    "set both HANDOFF_TLS_CLIENT_CERT and HANDOFF_TLS_CLIENT_KEY, or neither"
                        .into(),
                ));
            }
        }
        Ok(self)
    }
}

/// The server's code and sentence; for a call that never reached a handler (the connection
/// failed), the transport's causes and what to check.
fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(": ");
        text.push_str(&causes(source));
        text.push_str(
            "; the connection failed: is the server there, and does the endpoint's scheme match it (grpc+tls:// for a server started with --tls-cert)?",
        );
    }
    text
}

/// Every cause of an error, outermost first: tonic's transport errors say only "transport
/// error", and the cause (refused, a bad certificate, a wrong name) is what a user acts on.
fn causes(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[derive(Debug)]
pub struct HandoffClient {
    flight: FlightClient,
    max_flight_data_size: usize,
    config: ClientConfig,
    /// The server's replicas, once asked; a single server has none.
    topology: Option<Topology>,
    /// Clients of the other replicas, by index, as writes and the planner's calls need them.
    peers: std::collections::HashMap<u32, HandoffClient>,
}

/// The URL tonic connects to, and whether it is TLS.
fn http_url(endpoint: &str) -> Result<(String, bool)> {
    if let Some(rest) = endpoint.strip_prefix("grpc+tls://") {
        return Ok((format!("https://{rest}"), true));
    }
    if endpoint.starts_with("https://") {
        return Ok((endpoint.to_string(), true));
    }
    plain_url(endpoint).map(|url| (url, false))
}

fn plain_url(endpoint: &str) -> Result<String> {
    if let Some(rest) = endpoint
        .strip_prefix("grpc://")
        .or_else(|| endpoint.strip_prefix("grpc+tcp://"))
    {
        return Ok(format!("http://{rest}"));
    }
    if endpoint.starts_with("http://") {
        return Ok(endpoint.to_string());
    }
    if !endpoint.contains("://") && endpoint.contains(':') {
        return Ok(format!("http://{endpoint}"));
    }
    Err(ClientError::Endpoint(endpoint.to_string()))
}

impl HandoffClient {
    pub async fn connect(endpoint: &str, token: Option<String>) -> Result<Self> {
        Self::connect_with(ClientConfig::new(endpoint, token)).await
    }

    pub async fn connect_with(config: ClientConfig) -> Result<Self> {
        let (url, tls) = http_url(&config.endpoint)?;
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|_| ClientError::Endpoint(config.endpoint.clone()))?;
        if tls {
            let mut tls = ClientTlsConfig::new();
            tls = match &config.tls_ca_pem {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &config.tls_identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &config.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                ClientError::Tls(format!("cannot use the TLS CA or identity: {}", causes(&e)))
            })?;
        } else if config.tls_ca_pem.is_some() || config.tls_identity.is_some() {
            // A CA meant for TLS with a plain endpoint: the token would cross in clear.
            return Err(ClientError::Tls(format!(
                "a TLS CA or client certificate is set, but the endpoint '{}' is plain text: use grpc+tls://, or unset HANDOFF_TLS_CA",
                config.endpoint
            )));
        }
        let channel: Channel = endpoint
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(16 << 20)
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: config.endpoint.clone(),
                detail: causes(&source),
                hint: if tls {
                    "is `handoff serve --tls-cert` running there, and does its certificate name this host and chain to the CA given (HANDOFF_TLS_CA)?"
                } else {
                    "is `handoff serve` running there? (A server started with --tls-cert needs grpc+tls://.)"
                },
                source,
            })?;
        let inner = FlightServiceClient::new(channel)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
        let mut flight = FlightClient::new_from_inner(inner);
        if let Some(token) = config.token.as_ref().filter(|t| !t.is_empty()) {
            flight
                .add_header("authorization", &format!("Bearer {token}"))
                .map_err(|_| {
                    ClientError::Protocol("the token is not a valid header value".into())
                })?;
        }
        Ok(Self {
            flight,
            max_flight_data_size: config.max_flight_data_size,
            config,
            topology: None,
            peers: std::collections::HashMap::new(),
        })
    }

    /// The replicas, asked once. A server from before replicas has no `topology` action: it is
    /// a single server.
    async fn known_topology(&mut self) -> Result<&Topology> {
        if self.topology.is_none() {
            let topology = match self.topology().await {
                Ok(topology) => topology,
                Err(e) if e.code() == Some(tonic::Code::InvalidArgument) => Topology::default(),
                Err(e) => return Err(e),
            };
            let count = topology.replicas.len();
            if count > proto::placement::MAX_REPLICAS as usize
                || (count > 0 && topology.index as usize >= count)
            {
                return Err(ClientError::Protocol(format!(
                    "the server lists {count} replicas and calls itself replica {}",
                    topology.index
                )));
            }
            self.topology = Some(topology);
        }
        Ok(self.topology.get_or_insert_with(Topology::default))
    }

    /// The client for replica `replica`: this one, or a connection to it made on first use
    /// with this client's settings.
    async fn replica(&mut self, replica: u32) -> Result<&mut HandoffClient> {
        let topology = self.known_topology().await?;
        if topology.replicas.len() <= 1 || topology.index == replica {
            return Ok(self);
        }
        let Some(endpoint) = topology.replicas.get(replica as usize).cloned() else {
            return Err(ClientError::Protocol(format!("no replica {replica}")));
        };
        if !self.peers.contains_key(&replica) {
            let mut config = self.config.clone();
            config.endpoint = endpoint;
            let mut peer = Box::pin(Self::connect_with(config)).await?;
            peer.topology = self.topology.clone();
            self.peers.insert(replica, peer);
        }
        self.peers
            .get_mut(&replica)
            .ok_or_else(|| ClientError::Protocol(format!("no client of replica {replica}")))
    }

    /// The replica that holds `partition` of `link`: 0 for a single server.
    async fn owner_of(&mut self, link: &str, partition: u64) -> Result<u32> {
        let topology = self.known_topology().await?;
        Ok(match topology.replicas.len() {
            0 | 1 => topology.index,
            n => proto::placement::owner(link, partition, n as u32),
        })
    }

    /// A planner's action (create, commit, abort, seal, delete, stats), sent to replica 0.
    async fn planner_action<T: for<'de> Deserialize<'de>>(
        &mut self,
        kind: &str,
        body: impl Into<Bytes>,
    ) -> Result<T> {
        let body = body.into();
        let planner = self.replica(0).await?;
        planner.json_action(kind, body).await
    }

    async fn put_with(
        &mut self,
        descriptor: FlightDescriptor,
        schema: Option<SchemaRef>,
        batches: impl Stream<Item = Result<RecordBatch>> + Send + 'static,
    ) -> Result<PutOutcome> {
        let mut builder = FlightDataEncoderBuilder::new()
            .with_max_flight_data_size(self.max_flight_data_size)
            .with_flight_descriptor(Some(descriptor));
        if let Some(schema) = schema {
            // Announce the schema even when there are no batches, so an empty partition commits.
            builder = builder.with_schema(schema);
        }
        // arrow-flight ends the request cleanly when the input fails, and a clean end commits
        // the partition: a broken input would publish part of it. Send the abort marker
        // instead, so the server keeps nothing, and report the input's error.
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None::<FlightError>));
        let seen = std::sync::Arc::clone(&failed);
        let data =
            builder
                .build(batches.map_err(FlightError::from))
                .scan(false, move |aborted, item| {
                    let next = match item {
                        _ if *aborted => None,
                        Ok(data) => Some(Ok(data)),
                        Err(e) => {
                            *aborted = true;
                            if let Ok(mut slot) = seen.lock() {
                                *slot = Some(e);
                            }
                            Some(Ok(arrow_flight::FlightData {
                                app_metadata: Bytes::from_static(proto::ABORT_PUT),
                                ..Default::default()
                            }))
                        }
                    };
                    futures::future::ready(next)
                });
        let input_error = || failed.lock().ok().and_then(|mut slot| slot.take());
        let mut results = match self.flight.do_put(data).await {
            Ok(results) => results,
            Err(e) => return Err(input_error().unwrap_or(e).into()),
        };
        let mut outcome = None;
        while let Some(result) = results.next().await {
            let result = match result {
                Ok(result) => result,
                Err(e) => return Err(input_error().unwrap_or(e).into()),
            };
            outcome = Some(
                serde_json::from_slice(&result.app_metadata).map_err(|source| {
                    ClientError::Reply {
                        what: "PutResult metadata".into(),
                        source,
                    }
                })?,
            );
        }
        if let Some(e) = input_error() {
            return Err(e.into());
        }
        outcome.ok_or_else(|| ClientError::Protocol("DoPut returned no PutResult".into()))
    }

    /// Append one partition; it commits when the stream ends cleanly.
    pub async fn put(
        &mut self,
        link: &str,
        batches: impl Stream<Item = Result<RecordBatch>> + Send + 'static,
    ) -> Result<PutOutcome> {
        self.put_with(
            FlightDescriptor::new_path(vec![link.to_string()]),
            None,
            batches,
        )
        .await
    }

    /// Like [`put`](Self::put), with the schema announced up front, so an empty input still
    /// commits an (empty) partition.
    pub async fn put_with_schema(
        &mut self,
        link: &str,
        schema: SchemaRef,
        batches: impl Stream<Item = Result<RecordBatch>> + Send + 'static,
    ) -> Result<PutOutcome> {
        self.put_with(
            FlightDescriptor::new_path(vec![link.to_string()]),
            Some(schema),
            batches,
        )
        .await
    }

    /// Stage one attempt of one partition for a later [`commit`](Self::commit).
    pub async fn put_partition(
        &mut self,
        link: &str,
        partition: u64,
        attempt: u64,
        batches: impl Stream<Item = Result<RecordBatch>> + Send + 'static,
    ) -> Result<PutOutcome> {
        let cmd = proto::PutPartition {
            link: link.to_string(),
            partition,
            attempt,
        };
        // Each partition is written where it lives; a retry lands where its first attempt did.
        let owner = self.owner_of(link, partition).await?;
        self.replica(owner)
            .await?
            .put_with(
                FlightDescriptor::new_cmd(cmd.encode_to_vec()),
                None,
                batches,
            )
            .await
    }

    /// Call an action this client has no method for; its last reply body.
    pub async fn raw_action(&mut self, kind: &str, body: impl Into<Bytes>) -> Result<Bytes> {
        self.action(kind, body).await
    }

    /// The replicas serving this server's links; one server answers with none.
    pub async fn topology(&mut self) -> Result<Topology> {
        self.json_action(proto::actions::TOPOLOGY, Bytes::new())
            .await
    }

    async fn action(&mut self, kind: &str, body: impl Into<Bytes>) -> Result<Bytes> {
        let mut results = self
            .flight
            .do_action(Action::new(kind, body.into()))
            .await?;
        let mut last = Bytes::new();
        while let Some(body) = results.next().await {
            last = body?;
        }
        Ok(last)
    }

    async fn json_action<T: for<'de> Deserialize<'de>>(
        &mut self,
        kind: &str,
        body: impl Into<Bytes>,
    ) -> Result<T> {
        let body = self.action(kind, body).await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Reply {
            what: format!("'{kind}' action"),
            source,
        })
    }

    pub async fn create(&mut self, request: CreateLink) -> Result<LinkStats> {
        let mut stats: serde_json::Value = self
            .planner_action(proto::actions::CREATE, request.encode_to_vec())
            .await?;
        stats
            .as_object_mut()
            .map(|m| m.entry("server_memory_used").or_insert(0.into()));
        serde_json::from_value(stats).map_err(|source| ClientError::Reply {
            what: "stats".into(),
            source,
        })
    }

    /// Publish exactly these (partition, attempt) pairs.
    pub async fn commit(
        &mut self,
        link: &str,
        attempts: &[(u64, u64)],
    ) -> Result<serde_json::Value> {
        self.commit_with(link, attempts, false).await
    }

    /// Like `commit`; with `replace`, the link afterwards holds exactly these attempts.
    pub async fn commit_with(
        &mut self,
        link: &str,
        attempts: &[(u64, u64)],
        replace: bool,
    ) -> Result<serde_json::Value> {
        let commit = proto::Commit {
            replace,
            check_only: false,
            link: link.to_string(),
            attempts: proto::PartitionAttempt::list(attempts),
        };
        self.planner_action(proto::actions::COMMIT, commit.encode_to_vec())
            .await
    }

    /// Drop staged attempts; all of the link's when `attempts` is empty.
    pub async fn abort(
        &mut self,
        link: &str,
        attempts: &[(u64, u64)],
    ) -> Result<serde_json::Value> {
        let abort = proto::Abort {
            link: link.to_string(),
            attempts: proto::PartitionAttempt::list(attempts),
        };
        self.planner_action(proto::actions::ABORT, abort.encode_to_vec())
            .await
    }

    pub async fn seal(&mut self, link: &str) -> Result<LinkStats> {
        self.planner_action(proto::actions::SEAL, link.to_string())
            .await
    }

    pub async fn delete(&mut self, link: &str) -> Result<serde_json::Value> {
        self.planner_action(proto::actions::DELETE, link.to_string())
            .await
    }

    /// Persist a sealed link to the server's object storage.
    pub async fn snapshot(&mut self, link: &str) -> Result<serde_json::Value> {
        self.json_action(proto::actions::SNAPSHOT, link.to_string())
            .await
    }

    /// Fill `link` from Parquet in the server's reach (`s3://bucket/path/*.parquet`,
    /// `file:///dir`), all files or none; optionally seal it after.
    pub async fn import(&mut self, link: &str, url: &str, seal: bool) -> Result<serde_json::Value> {
        let request = proto::Import {
            link: link.to_string(),
            url: url.to_string(),
            seal,
        };
        self.planner_action(proto::actions::IMPORT, request.encode_to_vec())
            .await
    }

    pub async fn stats(&mut self, link: &str) -> Result<LinkStats> {
        self.planner_action(proto::actions::STATS, link.to_string())
            .await
    }

    /// Every link this token may see, whole (over replicas, as replica 0 lists them).
    pub async fn list(&mut self) -> Result<Vec<FlightInfo>> {
        let planner = self.replica(0).await?;
        Ok(planner
            .flight
            .list_flights(Bytes::new())
            .await?
            .try_collect()
            .await?)
    }

    /// A link's FlightInfo: one endpoint per committed partition, located at the replica that
    /// holds it over replicas (replica 0 answers).
    pub async fn flight_info(&mut self, link: &str) -> Result<FlightInfo> {
        let planner = self.replica(0).await?;
        Ok(planner
            .flight
            .get_flight_info(FlightDescriptor::new_path(vec![link.to_string()]))
            .await?)
    }

    pub async fn schema(&mut self, link: &str) -> Result<SchemaRef> {
        Ok(std::sync::Arc::new(
            self.flight
                .get_schema(FlightDescriptor::new_path(vec![link.to_string()]))
                .await?,
        ))
    }

    pub async fn do_get(&mut self, ticket: Ticket) -> Result<FlightRecordBatchStream> {
        Ok(self.flight.do_get(ticket).await?)
    }

    /// Every committed row of the link, partition by partition, each read where its endpoint
    /// points (over replicas, at the replica that holds it).
    pub async fn read_link(
        &mut self,
        link: &str,
    ) -> Result<(FlightInfo, Vec<FlightRecordBatchStream>)> {
        let info = self.flight_info(link).await?;
        let mut streams = Vec::with_capacity(info.endpoint.len());
        for endpoint in &info.endpoint {
            let (client, ticket) = self.endpoint_client(endpoint).await?;
            streams.push(client.flight.do_get(ticket).await?);
        }
        Ok((info, streams))
    }

    /// The client of the replica an endpoint is located at (this one's, without a location),
    /// and its ticket.
    async fn endpoint_client(
        &mut self,
        endpoint: &arrow_flight::FlightEndpoint,
    ) -> Result<(&mut HandoffClient, Ticket)> {
        let ticket = endpoint
            .ticket
            .clone()
            .ok_or_else(|| ClientError::Protocol("endpoint without ticket".into()))?;
        let Some(location) = endpoint.location.first().map(|l| l.uri.clone()) else {
            return Ok((self, ticket));
        };
        let topology = self.known_topology().await?;
        let replica = topology
            .replicas
            .iter()
            .position(|r| *r == location)
            .ok_or_else(|| {
                ClientError::Protocol(format!("an endpoint at {location}, not a replica"))
            })?;
        Ok((self.replica(replica as u32).await?, ticket))
    }

    /// The FlightInfo of one rank's shard: its schema and, for a sealed link, its row count.
    /// Over replicas it is replica 0's plan (see [`Self::shard_batches`]).
    pub async fn shard_info(&mut self, shard: &ReadShard) -> Result<FlightInfo> {
        let planner = self.replica(0).await?;
        Ok(planner
            .flight
            .get_flight_info(FlightDescriptor::new_cmd(shard.encode_to_vec()))
            .await?)
    }

    /// One rank's shard.
    pub async fn read_shard(&mut self, shard: ReadShard) -> Result<FlightRecordBatchStream> {
        let ticket = Ticket::new(proto::Ticket::shard(shard).encode_to_vec());
        Ok(self.flight.do_get(ticket).await?)
    }

    /// One rank's shard as record batches, from one server or from every replica that holds
    /// its rows. Over replicas the read is planned at replica 0 and each replica's endpoint is
    /// read at once (HTTP/2 flow control bounds how far each runs ahead); batches come in plan
    /// order, each exactly `batch_rows` rows, as from one server.
    pub async fn shard_batches(
        &mut self,
        shard: ReadShard,
    ) -> Result<futures::stream::BoxStream<'static, Result<RecordBatch>>> {
        let topology = self.known_topology().await?.clone();
        if topology.replicas.len() <= 1 {
            let stream = self.read_shard(shard).await?;
            return Ok(stream.map_err(ClientError::from).boxed());
        }
        let info = self.plan_over_replicas(&shard).await?;
        // A streaming read: every replica's part at once, batches as they come.
        if serde_json::from_slice::<serde_json::Value>(&info.app_metadata)
            .is_ok_and(|about| about["streaming"] == true)
        {
            let mut streams = Vec::with_capacity(info.endpoint.len());
            for endpoint in &info.endpoint {
                let (client, ticket) = self.endpoint_client(endpoint).await?;
                let at = client.config.endpoint.clone();
                streams.push(client.do_get(ticket).await?.map_err(move |e| {
                    let e = ClientError::from(e);
                    if !broke_off(&e) {
                        return e;
                    }
                    // Its position in a replica's part is not a row count until the seal.
                    ClientError::Status(tonic::Status::unavailable(format!(
                        "the replica at {at} broke off this streaming read ({e}); a streaming \
                         read cannot go on where it broke: read the link again once it is sealed"
                    )))
                }));
            }
            return Ok(futures::stream::select_all(streams).boxed());
        }
        let plan: Plan =
            serde_json::from_slice(&info.app_metadata).map_err(|source| ClientError::Reply {
                what: "the plan of a read over replicas".into(),
                source,
            })?;
        let mut streams = Vec::with_capacity(info.endpoint.len());
        for endpoint in &info.endpoint {
            streams.push(self.open_part(endpoint).await?);
        }
        let reader = PlanReader {
            pending: vec![None; streams.len()],
            streams,
            batches: plan.batches.into_iter(),
        };
        Ok(futures::stream::unfold(reader, |mut reader| async move {
            reader.next().await.map(|item| (item, reader))
        })
        .boxed())
    }

    /// One endpoint of a sealed read over replicas. A replica down when the read reaches it
    /// (a pod restarting) is waited for, as one that breaks off mid-read is, for up to
    /// `resume_within`.
    async fn open_part(&mut self, endpoint: &arrow_flight::FlightEndpoint) -> Result<PartStream> {
        let resume_within = self.config.resume_within;
        let mut patience = Patience::new(resume_within);
        loop {
            let opened = match self.endpoint_client(endpoint).await {
                Ok((client, ticket)) => PartStream::open(client, ticket, resume_within).await,
                Err(e) => Err(e),
            };
            let e = match opened {
                Err(e) if broke_off(&e) => e,
                opened => return opened,
            };
            if !patience.wait().await {
                let at = endpoint.location.first().map_or("", |l| l.uri.as_str());
                return Err(ClientError::Status(tonic::Status::unavailable(format!(
                    "the replica at {at} holds rows of this shard and did not answer within \
                     {resume_within:?} ({e}); once it is back, read the shard again"
                ))));
            }
        }
    }

    /// The planner's FlightInfo of a read over replicas. The planner asks every replica for its
    /// part, so a replica restarting makes it answer UNAVAILABLE for a moment; that (and a
    /// planner restarting) is waited for, for up to `resume_within`, like a replica that
    /// breaks off mid-read.
    async fn plan_over_replicas(&mut self, shard: &ReadShard) -> Result<FlightInfo> {
        let mut patience = Patience::new(self.config.resume_within);
        loop {
            match self.shard_info(shard).await {
                Err(e) if broke_off(&e) => {
                    if !patience.wait().await {
                        return Err(ClientError::Status(tonic::Status::unavailable(format!(
                            "the planner could not plan this read within {:?}: {e}",
                            self.config.resume_within
                        ))));
                    }
                }
                planned => return planned,
            }
        }
    }
}

/// Pauses between tries, 0.1 s doubling to 2 s, for up to a deadline.
struct Patience {
    deadline: tokio::time::Instant,
    pause: Duration,
}

impl Patience {
    fn new(within: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            // `within` is the user's (ClientConfig::resume_within): Duration::MAX would overflow
            // an Instant, and means "wait as long as it takes" (a century will do).
            deadline: now
                .checked_add(within)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600)),
            pause: Duration::from_millis(100),
        }
    }

    /// Pause before the next try; false (at once) once the deadline has passed.
    async fn wait(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause.min(self.deadline - now)).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
        true
    }
}

/// The plan of a read over replicas, from its FlightInfo's `app_metadata`: for each batch, its
/// pieces as (endpoint, rows) pairs, flattened.
#[derive(Deserialize)]
struct Plan {
    batches: Vec<Vec<u64>>,
}

/// Takes each planned batch's pieces off the endpoints' streams, in plan order.
struct PlanReader {
    streams: Vec<PartStream>,
    /// Rows read from each stream and not used yet.
    pending: Vec<Option<RecordBatch>>,
    batches: std::vec::IntoIter<Vec<u64>>,
}

impl PlanReader {
    async fn next(&mut self) -> Option<Result<RecordBatch>> {
        let pieces = self.batches.next()?;
        let mut parts = Vec::with_capacity(pieces.len() / 2);
        for piece in pieces.chunks(2) {
            let &[endpoint, rows] = piece else {
                return Some(Err(ClientError::Protocol(
                    "a plan piece without rows".into(),
                )));
            };
            match self.take(endpoint as usize, rows as usize).await {
                Ok(part) => parts.push(part),
                Err(e) => return Some(Err(e)),
            }
        }
        match parts.len() {
            1 => parts.pop().map(Ok),
            _ => {
                let schema = parts.first()?.schema();
                Some(
                    arrow_select::concat::concat_batches(&schema, &parts)
                        .map_err(|e| ClientError::Flight(FlightError::Arrow(e))),
                )
            }
        }
    }

    /// The next `rows` rows of one endpoint's stream.
    async fn take(&mut self, endpoint: usize, rows: usize) -> Result<RecordBatch> {
        let stream = self.streams.get_mut(endpoint).ok_or_else(|| {
            ClientError::Protocol(format!(
                "the plan names endpoint {endpoint}, which is not there"
            ))
        })?;
        let mut parts = Vec::new();
        let mut have = 0;
        while have < rows {
            let batch = match self.pending[endpoint].take() {
                Some(batch) => batch,
                None => stream.next().await.ok_or_else(|| {
                    ClientError::Protocol(format!(
                        "endpoint {endpoint} ended before its planned rows"
                    ))
                })??,
            };
            let want = rows - have;
            if batch.num_rows() > want {
                self.pending[endpoint] = Some(batch.slice(want, batch.num_rows() - want));
                parts.push(batch.slice(0, want));
                have = rows;
            } else {
                have += batch.num_rows();
                parts.push(batch);
            }
        }
        match parts.len() {
            1 => Ok(parts.remove(0)),
            _ => {
                let schema = parts[0].schema();
                arrow_select::concat::concat_batches(&schema, &parts)
                    .map_err(|e| ClientError::Flight(FlightError::Arrow(e)))
            }
        }
    }
}

/// One endpoint of a read over replicas. Its replica may break off mid-read: a pod restarted
/// and restoring its snapshot holds the same rows in the same order, so the read goes on from
/// the first row not received yet (its ranges, less those rows), for up to `resume_within`.
/// A replica back without its part (no snapshot) ends the read with DATA_LOSS saying so.
struct PartStream {
    /// A handle on the replica's connection (tonic reconnects it when the replica is back).
    flight: FlightClient,
    endpoint: String,
    /// The endpoint's ticket, when it is a ranges read (the only kind that can be resumed).
    ranges: Option<proto::ReadRanges>,
    stream: FlightRecordBatchStream,
    /// Rows received from this endpoint, over every attempt.
    received: u64,
    resume_within: Duration,
}

impl PartStream {
    async fn open(
        client: &mut HandoffClient,
        ticket: Ticket,
        resume_within: Duration,
    ) -> Result<Self> {
        let ranges = match proto::Ticket::decode(ticket.ticket.clone()) {
            Ok(proto::Ticket {
                kind: Some(proto::ticket::Kind::Ranges(ranges)),
            }) => Some(ranges),
            _ => None,
        };
        let mut flight = FlightClient::new_from_inner(client.flight.inner().clone());
        *flight.metadata_mut() = client.flight.metadata().clone();
        let stream = flight.do_get(ticket).await?;
        Ok(Self {
            flight,
            endpoint: client.config.endpoint.clone(),
            ranges,
            stream,
            received: 0,
            resume_within,
        })
    }

    async fn next(&mut self) -> Option<Result<RecordBatch>> {
        loop {
            match self.stream.next().await? {
                Ok(batch) => {
                    self.received = self.received.saturating_add(batch.num_rows() as u64);
                    return Some(Ok(batch));
                }
                Err(e) => {
                    let e = ClientError::from(e);
                    let Some(ranges) = self.ranges.clone().filter(|_| broke_off(&e)) else {
                        return Some(Err(e));
                    };
                    if self.received >= ranges.rows() {
                        // Every row arrived; only the stream's end did not.
                        return None;
                    }
                    if let Err(e) = self.resume(&ranges).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// Ask the replica again for the rows not received yet, until it answers or
    /// `resume_within` passes.
    async fn resume(&mut self, ranges: &proto::ReadRanges) -> Result<()> {
        let rest = ranges.skipping(self.received);
        let ticket = Ticket::new(
            proto::Ticket {
                kind: Some(proto::ticket::Kind::Ranges(rest.clone())),
            }
            .encode_to_vec(),
        );
        let mut patience = Patience::new(self.resume_within);
        loop {
            let e = match self
                .flight
                .do_get(ticket.clone())
                .await
                .map_err(ClientError::from)
            {
                Ok(stream) => {
                    self.stream = stream;
                    return Ok(());
                }
                Err(e) => e,
            };
            if e.code() == Some(tonic::Code::NotFound) {
                return Err(ClientError::Status(tonic::Status::data_loss(format!(
                    "the replica at {} broke off this read after {} of its {} rows and came \
                     back without link '{}' (it restarted with no snapshot to restore): the \
                     other {} rows of this rank's shard are lost; write the link again, or \
                     run its replicas with --snapshot-on-seal and --restore-from ({})",
                    self.endpoint,
                    self.received,
                    ranges.rows(),
                    ranges.link,
                    rest.rows(),
                    e
                ))));
            }
            if !broke_off(&e) {
                return Err(e);
            }
            if !patience.wait().await {
                return Err(ClientError::Status(tonic::Status::unavailable(format!(
                    "the replica at {} broke off this read after {} of its {} rows and did not \
                     answer again within {:?} ({e}); once it is back, read the shard again \
                     (or resume it from the batch reached)",
                    self.endpoint,
                    self.received,
                    ranges.rows(),
                    self.resume_within
                ))));
            }
        }
    }
}

/// A call that ended because its connection did (or never got one), not because the server
/// refused: the server went away (UNAVAILABLE), or the transport failed under the call.
fn broke_off(e: &ClientError) -> bool {
    e.code() == Some(tonic::Code::Unavailable) || e.from_transport()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn patience_takes_any_duration_and_ends_at_its_deadline() {
        // The user's duration: the largest one must not overflow the deadline.
        let mut forever = Patience::new(Duration::MAX);
        assert!(forever.deadline > tokio::time::Instant::now() + Duration::from_secs(3600));
        let mut none = Patience::new(Duration::ZERO);
        assert!(!none.wait().await);
        assert!(forever.wait().await);
    }
}
