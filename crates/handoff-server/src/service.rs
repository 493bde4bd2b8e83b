//! The Flight service: protocol translation between gRPC and the store, plus auth.

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use arrow_ipc::writer::IpcWriteOptions;
use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt};
use handoff_proto as proto;
use handoff_store::{
    Chunk, Link, LinkOptions, LinkState, LinkTokens, MemoryPolicy, PutTarget, ReadMode,
    SchemaFrame, ShardSpec, Store, StoreError,
};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, AuthConfig, Principal};
use crate::encode::ChunkEncoder;
use crate::error::status_of;
use crate::metrics::Metrics;

/// How long a `wait` link's writes wait for memory when neither the link nor the server says.
const DEFAULT_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest TTL a link may ask for: ten years. Far longer would overflow the clock's
/// arithmetic, which once read as "already expired" and deleted the link at once.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// The longest a `wait` link's writer may wait for memory: a day.
const MAX_WAIT_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// A TTL from a request, checked against its range.
fn ttl(field: &str, seconds: u64) -> Result<Option<std::time::Duration>, Status> {
    match seconds {
        0 => Ok(None),
        s if s <= MAX_TTL_SECONDS => Ok(Some(std::time::Duration::from_secs(s))),
        s => Err(invalid(format!(
            "{field} {s} is out of range: use 0 (none) to {MAX_TTL_SECONDS} seconds (ten years)"
        ))),
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Handoff implementation of `FlightService`.
#[derive(Clone)]
pub struct HandoffService {
    pub(crate) store: Arc<Store>,
    pub(crate) auth: Arc<AuthConfig>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_flight_data_size: usize,
    /// Flight SQL shares the port: its commands and tickets are routed there.
    pub(crate) sql: crate::sql::SqlService,
    /// Where `import` may read from; nowhere unless the operator says.
    imports: Arc<crate::imports::ImportAllowlist>,
}

/// What a descriptor names.
enum Target {
    Link(String),
    Shard(proto::ReadShard),
}

/// Parquet streams an import reads and writes at once: one per core, at least 4 (so small
/// servers still overlap reads from object storage) and at most 16.
fn import_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .clamp(4, 16)
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

fn parse_descriptor(descriptor: &FlightDescriptor) -> Result<Target, Status> {
    match descriptor.r#type() {
        DescriptorType::Path => match descriptor.path.as_slice() {
            [link] => Ok(Target::Link(link.clone())),
            [link, rank, world] => {
                let rank = rank
                    .parse()
                    .map_err(|_| invalid(format!("rank '{rank}' in the path is not a number")))?;
                let world_size = world.parse().map_err(|_| {
                    invalid(format!("world_size '{world}' in the path is not a number"))
                })?;
                Ok(Target::Shard(proto::ReadShard {
                    link: link.clone(),
                    rank,
                    world_size,
                    ..Default::default()
                }))
            }
            other => Err(invalid(format!(
                "a PATH descriptor is [link] or [link, rank, world_size], got {} elements",
                other.len()
            ))),
        },
        DescriptorType::Cmd => proto::ReadShard::decode(descriptor.cmd.as_ref())
            .map(Target::Shard)
            .map_err(|e| invalid(format!("CMD descriptor is not a handoff.v1.ReadShard: {e}"))),
        DescriptorType::Unknown => Err(invalid("descriptor type is unknown; use PATH or CMD")),
    }
}

/// The reader's columns and filter, for the store to plan once the link's schema is known; planned
/// here already when it is, so a bad column or filter fails at GetFlightInfo.
fn shard_query(
    shard: &proto::ReadShard,
    link: &Link,
) -> Result<
    (
        Option<handoff_store::QueryPlanner>,
        Option<arrow_schema::SchemaRef>,
    ),
    Status,
> {
    if shard.columns.is_empty() && shard.filter.trim().is_empty() {
        return Ok((None, None));
    }
    let mut projected = None;
    if let Some(schema) = link.schema() {
        let query = handoff_query::plan_read(&schema.schema, &shard.columns, &shard.filter)
            .map_err(|e| invalid(e.to_string()))?;
        projected = Some(match &query.projection {
            Some(columns) => Arc::new(
                schema
                    .schema
                    .project(columns)
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            None => Arc::clone(&schema.schema),
        });
    }
    let planner = handoff_query::planner(shard.columns.clone(), shard.filter.clone());
    Ok((Some(planner), projected))
}

pub(crate) fn shard_spec(shard: &proto::ReadShard) -> (ShardSpec, ReadMode) {
    let spec = ShardSpec {
        rank: shard.rank,
        world_size: shard.world_size,
        epoch: shard.epoch,
        seed: shard.seed,
        batch_rows: shard.batch_rows,
        shuffle: shard.shuffle,
        drop_last: shard.drop_last,
        start_batch: shard.start_batch,
    };
    let mode = match shard.mode() {
        proto::ReadMode::Streaming => ReadMode::Streaming,
        proto::ReadMode::WaitForSeal => ReadMode::WaitForSeal,
    };
    (spec, mode)
}

/// Accepts a bare flatbuffer schema message or the encapsulated form of FlightInfo.schema.
fn strip_encapsulation(bytes: Bytes) -> Bytes {
    if bytes.len() >= 8 && bytes[..4] == [0xFF; 4] {
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        return bytes.slice(8..(8 + len).min(bytes.len()));
    }
    bytes
}

fn utf8_link(body: &Bytes, action: &str) -> Result<String, Status> {
    std::str::from_utf8(body)
        .map(|s| s.trim().to_string())
        .map_err(|_| invalid(format!("the body of '{action}' is the link name as UTF-8")))
}

fn json_result(value: &impl serde::Serialize) -> Result<arrow_flight::Result, Status> {
    let body = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(arrow_flight::Result { body: body.into() })
}

impl HandoffService {
    pub fn new(
        store: Arc<Store>,
        auth: AuthConfig,
        metrics: Arc<Metrics>,
        max_flight_data_size: usize,
    ) -> Result<Self, arrow_flight::error::FlightError> {
        let auth = Arc::new(auth);
        let sql = crate::sql::SqlService::new(
            Arc::clone(&store),
            Arc::clone(&auth),
            max_flight_data_size,
        )?;
        Ok(Self {
            store,
            auth,
            metrics,
            max_flight_data_size,
            sql,
            imports: Arc::default(),
        })
    }

    pub(crate) fn with_imports(mut self, imports: crate::imports::ImportAllowlist) -> Self {
        self.imports = Arc::new(imports);
        self
    }

    fn authorize(
        &self,
        md: &MetadataMap,
        access: Access,
        link: Option<&str>,
    ) -> Result<Principal, Status> {
        self.auth.authorize(md, &self.store, access, link)
    }

    fn link(&self, name: &str) -> Result<Arc<Link>, Status> {
        self.store.link(name).map_err(status_of)
    }

    fn schema_of(link: &Link) -> Result<SchemaFrame, Status> {
        match link.schema() {
            Some(s) => Ok(s),
            None => {
                SchemaFrame::from_schema(Arc::new(arrow_schema::Schema::empty())).map_err(status_of)
            }
        }
    }

    fn link_info(&self, link: &Link) -> Result<FlightInfo, Status> {
        let snapshot = link.snapshot();
        let schema = Self::schema_of(link)?;
        let endpoints = (0..snapshot.partitions.len() as u64).map(|i| {
            FlightEndpoint::new().with_ticket(Ticket::new(
                proto::Ticket::partition(link.name(), i, snapshot.generation).encode_to_vec(),
            ))
        });
        let mut info = FlightInfo::new()
            .try_with_schema(&schema.schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_descriptor(FlightDescriptor::new_path(vec![link.name().to_string()]))
            .with_total_records(snapshot.rows as i64)
            .with_total_bytes(snapshot.bytes as i64)
            .with_ordered(true);
        for endpoint in endpoints {
            info = info.with_endpoint(endpoint);
        }
        Ok(info)
    }

    fn shard_info(
        &self,
        link: &Link,
        shard: proto::ReadShard,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let (spec, _) = shard_spec(&shard);
        spec.validate().map_err(status_of)?;
        let (planner, projected) = shard_query(&shard, link)?;
        let snapshot = link.snapshot();
        // With a filter, the count is known only by reading.
        let filtered = !shard.filter.trim().is_empty();
        let (records, bytes) = if snapshot.state == LinkState::Sealed && !filtered {
            let rows = spec.rows_for_rank(snapshot.rows);
            let bytes = if snapshot.rows == 0 {
                0
            } else {
                (snapshot.bytes as u128 * rows as u128 / snapshot.rows as u128) as i64
            };
            (rows as i64, bytes)
        } else {
            (-1, -1)
        };
        let schema = match projected {
            Some(schema) => schema,
            None => Arc::clone(&Self::schema_of(link)?.schema),
        };
        let bytes = if planner.is_some() { -1 } else { bytes };
        FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))
            .map(|info| {
                info.with_descriptor(descriptor)
                    .with_endpoint(
                        FlightEndpoint::new()
                            .with_ticket(Ticket::new(proto::Ticket::shard(shard).encode_to_vec())),
                    )
                    .with_total_records(records)
                    .with_total_bytes(bytes)
                    .with_ordered(true)
            })
    }

    /// Authorize a ticket and start producing its FlightData. Shared by tonic's DoGet and the
    /// zero-copy DoGet path.
    pub fn ticket_stream(
        &self,
        md: &MetadataMap,
        ticket: &[u8],
    ) -> Result<BoxStream<'static, Result<FlightData, Status>>, Status> {
        if crate::sql::is_flight_sql(ticket) {
            let sql = self.sql.clone();
            let mut request = Request::new(Ticket::new(Bytes::copy_from_slice(ticket)));
            *request.metadata_mut() = md.clone();
            return Ok(stream::once(async move {
                match <crate::sql::SqlService as FlightService>::do_get(&sql, request).await {
                    Ok(response) => response.into_inner(),
                    Err(status) => stream::iter([Err(status)]).boxed(),
                }
            })
            .flatten()
            .boxed());
        }
        let ticket = proto::Ticket::decode(ticket).map_err(|e| {
            invalid(format!(
                "not a ticket issued by this server ({e}); get one from GetFlightInfo"
            ))
        })?;
        let chunks: BoxStream<'static, Result<Chunk, StoreError>> = match ticket.kind {
            Some(proto::ticket::Kind::Partition(p)) => {
                self.authorize(md, Access::Read, Some(&p.link))?;
                let link = self.link(&p.link)?;
                let (schema, partition) =
                    handoff_store::read_partition(&link, p.index, p.generation)
                        .map_err(status_of)?;
                // Fetch one frame ahead, so a spilled partition streams at the store's pace.
                let frames = stream::iter(0..partition.frame_rows().len())
                    .map(move |i| {
                        let partition = Arc::clone(&partition);
                        async move { partition.frame(i).await.map(Chunk::Frame) }
                    })
                    .buffered(2);
                stream::once(async { Ok(Chunk::Schema(schema)) })
                    .chain(frames)
                    .boxed()
            }
            Some(proto::ticket::Kind::Shard(shard)) => {
                self.authorize(md, Access::Read, Some(&shard.link))?;
                let link = self.link(&shard.link)?;
                let (spec, mode) = shard_spec(&shard);
                spec.validate().map_err(status_of)?;
                let (planner, _) = shard_query(&shard, &link)?;
                let rx = handoff_store::read_shard(
                    link,
                    spec,
                    mode,
                    planner,
                    self.store.read_memory().clone(),
                );
                stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                })
                .boxed()
            }
            None => return Err(invalid("empty ticket; get one from GetFlightInfo")),
        };
        let mut encoder = ChunkEncoder::new(self.max_flight_data_size);
        let metrics = Arc::clone(&self.metrics);
        Ok(chunks
            .flat_map(move |item| {
                let mut out = Vec::new();
                let result = match item {
                    Ok(chunk) => {
                        let rows = match &chunk {
                            Chunk::Frame(frame) => frame.rows,
                            Chunk::Batch(batch, _) => batch.num_rows() as u64,
                            Chunk::Schema(_) => 0,
                        };
                        metrics.served_rows.inc_by(rows);
                        encoder.encode(chunk, &mut out)
                    }
                    Err(e) => Err(status_of(e)),
                };
                let bytes: usize = out
                    .iter()
                    .map(|d| d.data_header.len() + d.data_body.len())
                    .sum();
                metrics.served_bytes.inc_by(bytes as u64);
                let (items, held): (Vec<Result<FlightData, Status>>, _) = match result {
                    Ok(held) => (out.into_iter().map(Ok).collect(), held),
                    Err(status) => (vec![Err(status)], Default::default()),
                };
                // The chunk's memory stays reserved until tonic has taken its last message.
                let release = stream::once(async move { drop::<handoff_store::Held>(held) })
                    .filter_map(|()| async { None });
                stream::iter(items).chain(release)
            })
            .boxed())
    }

    fn create(&self, md: &MetadataMap, body: &Bytes) -> Result<arrow_flight::Result, Status> {
        let req = proto::CreateLink::decode(body.as_ref()).map_err(|e| {
            invalid(format!(
                "the body of 'create' is a handoff.v1.CreateLink message: {e}"
            ))
        })?;
        let with_tokens = !req.writer_token.is_empty() || !req.reader_token.is_empty();
        let principal = self.authorize(
            md,
            if with_tokens {
                Access::Admin
            } else {
                Access::Write
            },
            Some(&req.link),
        )?;
        if !principal.may_create() {
            return Err(Status::permission_denied(
                "this token may not create links; use a server-wide writer or admin token",
            ));
        }
        let schema = if req.schema.is_empty() {
            None
        } else {
            Some(SchemaFrame::parse(strip_encapsulation(req.schema.clone())).map_err(status_of)?)
        };
        let tokens = LinkTokens::from_clear(&req.writer_token, &req.reader_token);
        let policy = match req.memory_policy() {
            proto::MemoryPolicy::Unspecified => None,
            proto::MemoryPolicy::Reject => Some(MemoryPolicy::Reject),
            proto::MemoryPolicy::Wait => Some(MemoryPolicy::Wait {
                timeout: match (req.wait_timeout_ms, self.store.default_policy()) {
                    (0, MemoryPolicy::Wait { timeout }) => timeout,
                    (0, _) => DEFAULT_WAIT_TIMEOUT,
                    (ms, _) if ms <= MAX_WAIT_TIMEOUT_MS => std::time::Duration::from_millis(ms),
                    (ms, _) => {
                        return Err(invalid(format!(
                            "wait_timeout_ms {ms} is out of range: use 0 (the server's) to {MAX_WAIT_TIMEOUT_MS} (a day)"
                        )));
                    }
                },
            }),
            proto::MemoryPolicy::Spill => {
                if self.store.storage().is_none() {
                    return Err(Status::failed_precondition(
                        "the spill policy needs object storage; start the server with --spill-url",
                    ));
                }
                Some(MemoryPolicy::Spill)
            }
        };
        let options = LinkOptions {
            tokens,
            memory_limit: (req.memory_limit > 0).then_some(req.memory_limit),
            policy,
            ttl_after_seal: ttl("ttl_seconds_after_seal", req.ttl_seconds_after_seal)?,
            ttl_after_read: ttl("ttl_seconds_after_read", req.ttl_seconds_after_read)?,
        };
        let link = self
            .store
            .create_link(&req.link, schema, options, req.exist_ok)
            .map_err(status_of)?;
        json_result(&link.stats())
    }

    fn stats_json(&self, link: &str) -> Result<arrow_flight::Result, Status> {
        let stats = self.store.stats(link).map_err(status_of)?;
        let mut value =
            serde_json::to_value(&stats).map_err(|e| Status::internal(e.to_string()))?;
        if let Some(map) = value.as_object_mut() {
            let memory = self.store.memory();
            map.insert("server_memory_used".into(), memory.used().into());
            map.insert("server_memory_limit".into(), memory.limit().into());
        }
        json_result(&value)
    }

    async fn action(
        &self,
        md: &MetadataMap,
        action: Action,
    ) -> Result<arrow_flight::Result, Status> {
        let body = action.body;
        match action.r#type.as_str() {
            proto::actions::CREATE => self.create(md, &body),
            proto::actions::COMMIT => {
                let req = proto::Commit::decode(body.as_ref()).map_err(|e| {
                    invalid(format!(
                        "the body of 'commit' is a handoff.v1.Commit message: {e}"
                    ))
                })?;
                self.authorize(md, Access::Write, Some(&req.link))?;
                if req.attempts.is_empty() && !req.replace {
                    return Err(invalid(
                        "commit names no partitions; list the winning (partition, attempt) pairs",
                    ));
                }
                let attempts: Vec<(u64, u64)> = req
                    .attempts
                    .iter()
                    .map(|a| (a.partition, a.attempt))
                    .collect();
                let outcomes = self
                    .store
                    .commit(&req.link, &attempts, req.replace)
                    .map_err(status_of)?;
                let rows: u64 = outcomes.iter().map(|o| o.rows).sum();
                json_result(&serde_json::json!({"committed": outcomes.len(), "rows": rows}))
            }
            proto::actions::ABORT => {
                let req = proto::Abort::decode(body.as_ref()).map_err(|e| {
                    invalid(format!(
                        "the body of 'abort' is a handoff.v1.Abort message: {e}"
                    ))
                })?;
                let principal = self.authorize(md, Access::Write, Some(&req.link))?;
                // An empty list drops every job's staged attempts, not just the caller's: that
                // is cleanup for an admin, never a writer's.
                if req.attempts.is_empty() && principal != Principal::Admin && !self.auth.disabled {
                    return Err(invalid(
                        "abort names no attempts; list the (partition, attempt) pairs your job staged (an empty list, dropping every job's, needs an admin token)",
                    ));
                }
                let attempts: Vec<(u64, u64)> = req
                    .attempts
                    .iter()
                    .map(|a| (a.partition, a.attempt))
                    .collect();
                let dropped = self.store.abort(&req.link, &attempts).map_err(status_of)?;
                json_result(&serde_json::json!({"dropped": dropped}))
            }
            proto::actions::SEAL => {
                let link = utf8_link(&body, "seal")?;
                self.authorize(md, Access::Write, Some(&link))?;
                self.store.seal(&link).map_err(status_of)?;
                if self.store.snapshot_on_seal() {
                    self.store.snapshot(&link).await.map_err(status_of)?;
                }
                self.stats_json(&link)
            }
            proto::actions::IMPORT => {
                let request = proto::Import::decode(body.as_ref()).map_err(|e| {
                    invalid(format!(
                        "the body of 'import' is a handoff.v1.Import message: {e}"
                    ))
                })?;
                // Import reads what the server can reach, under the server's credentials.
                let principal = self.authorize(md, Access::Admin, Some(&request.link))?;
                self.imports.check(&request.url)?;
                let outcome = handoff_query::import_parquet(
                    &self.store,
                    &request.link,
                    &request.url,
                    principal.may_create(),
                    import_parallelism(),
                    self.max_flight_data_size,
                )
                .await
                .map_err(|e| match e {
                    handoff_query::ImportError::Store(e) => status_of(e),
                    e @ handoff_query::ImportError::Memory(_) => {
                        Status::resource_exhausted(e.to_string())
                    }
                    handoff_query::ImportError::Invalid(m) => invalid(m),
                    handoff_query::ImportError::Read(m) => {
                        Status::failed_precondition(m.to_string())
                    }
                })?;
                self.metrics.ingested_bytes.inc_by(outcome.bytes);
                self.metrics.ingested_rows.inc_by(outcome.rows);
                let sealed = if request.seal {
                    self.store.seal(&request.link).map_err(status_of)?;
                    true
                } else {
                    false
                };
                json_result(&serde_json::json!({
                    "link": outcome.link, "files": outcome.files, "partitions": outcome.partitions,
                    "rows": outcome.rows, "bytes": outcome.bytes, "sealed": sealed,
                }))
            }
            proto::actions::SNAPSHOT => {
                let link = utf8_link(&body, "snapshot")?;
                self.authorize(md, Access::Admin, Some(&link))?;
                let manifest = self.store.snapshot(&link).await.map_err(status_of)?;
                let url = self
                    .store
                    .storage()
                    .map(|s| s.url().to_string())
                    .unwrap_or_default();
                json_result(&serde_json::json!({
                    "link": manifest.link, "rows": manifest.rows, "bytes": manifest.bytes,
                    "partitions": manifest.partitions.len(), "url": url,
                }))
            }
            proto::actions::DELETE => {
                // Not a writer's: a Spark job's token must not delete the link it feeds.
                let link = utf8_link(&body, "delete")?;
                self.authorize(md, Access::Admin, Some(&link))?;
                json_result(&self.store.delete(&link).map_err(status_of)?)
            }
            proto::actions::STATS => {
                let link = utf8_link(&body, "stats")?;
                self.authorize(md, Access::Inspect, Some(&link))?;
                self.stats_json(&link)
            }
            other => Err(invalid(format!(
                "unknown action '{other}'; ListActions names the supported ones"
            ))),
        }
    }

    fn record<T>(&self, method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.metrics.rpc(method, code);
        if let Err(status) = &result {
            tracing::debug!(method, code = ?status.code(), message = status.message(), "request refused");
        }
        result
    }

    async fn put(&self, request: Request<Streaming<FlightData>>) -> Result<PutResult, Status> {
        let md = request.metadata().clone();
        // The token is checked before any payload is read: the link it may write is named only
        // in the first message, but a caller without a valid token gets nothing read at all.
        self.auth.identify(&md, &self.store)?;
        let credit = request
            .extensions()
            .get::<crate::inflight::IncomingCredit>()
            .cloned();
        let mut input = request.into_inner();
        let first = input.message().await?.ok_or_else(|| {
            invalid("empty DoPut stream: send a schema message with a FlightDescriptor first")
        })?;
        let descriptor = first.flight_descriptor.clone().ok_or_else(|| {
            invalid("the first DoPut message carries no FlightDescriptor: use PATH [link] or CMD handoff.v1.PutPartition")
        })?;
        let (link, target) = match descriptor.r#type() {
            DescriptorType::Path => match descriptor.path.as_slice() {
                [link] => (link.clone(), PutTarget::Append),
                _ => return Err(invalid("DoPut takes a PATH descriptor of exactly [link]")),
            },
            DescriptorType::Cmd => {
                let put = proto::PutPartition::decode(descriptor.cmd.as_ref()).map_err(|e| {
                    invalid(format!(
                        "DoPut CMD descriptor is not a handoff.v1.PutPartition: {e}"
                    ))
                })?;
                (
                    put.link,
                    PutTarget::Staged {
                        partition: put.partition,
                        attempt: put.attempt,
                    },
                )
            }
            DescriptorType::Unknown => {
                return Err(invalid("descriptor type is unknown; use PATH or CMD"));
            }
        };
        let principal = self.authorize(&md, Access::Write, Some(&link))?;
        let mut writer = self
            .store
            .begin_put(&link, target, principal.may_create())
            .map_err(status_of)?;
        let mut next = Some(first);
        while let Some(data) = next {
            // The message's bytes were reserved on arrival; the frame the store keeps takes that
            // reservation over, so they are neither counted twice nor uncounted while it waits.
            let arrived = credit.as_ref().and_then(|c| c.take_next());
            if data.data_header.is_empty() && data.app_metadata.as_ref() == proto::ABORT_PUT {
                // Some clients (pyarrow) cannot cancel a DoPut: ending it would publish a
                // partial partition, so they send this marker instead.
                self.metrics.broken_puts.inc();
                return Err(Status::cancelled(
                    "the writer aborted this DoPut; nothing of it was kept",
                ));
            }
            if !(data.data_header.is_empty() && data.data_body.is_empty()) {
                writer
                    .push_arrived(data.data_header, data.data_body, arrived)
                    .await
                    .map_err(status_of)?;
            }
            next = match input.message().await {
                Ok(next) => next,
                Err(status) => {
                    self.metrics.broken_puts.inc();
                    tracing::warn!(link, code = ?status.code(), "DoPut stream broke; nothing was kept");
                    return Err(status);
                }
            };
        }
        let outcome = writer.finish().await.map_err(status_of)?;
        self.metrics.ingested_bytes.inc_by(outcome.bytes);
        self.metrics.ingested_rows.inc_by(outcome.rows);
        let metadata = serde_json::json!({
            "link": link,
            "partition": outcome.partition,
            "attempt": outcome.attempt,
            "rows": outcome.rows,
            "bytes": outcome.bytes,
            "committed": outcome.committed,
        });
        Ok(PutResult {
            app_metadata: serde_json::to_vec(&metadata).unwrap_or_default().into(),
        })
    }
}

#[tonic::async_trait]
impl FlightService for HandoffService {
    type HandshakeStream = Boxed<HandshakeResponse>;
    type ListFlightsStream = Boxed<FlightInfo>;
    type DoGetStream = Boxed<FlightData>;
    type DoPutStream = Boxed<PutResult>;
    type DoExchangeStream = Boxed<FlightData>;
    type DoActionStream = Boxed<arrow_flight::Result>;
    type ListActionsStream = Boxed<ActionType>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let mut md = request.metadata().clone();
        if crate::auth::token_of(&md).is_none() && !self.auth.disabled {
            // Clients that put the token in the handshake payload instead of a header.
            let mut input = request.into_inner();
            if let Some(first) = input.message().await? {
                let token = String::from_utf8(first.payload.to_vec()).unwrap_or_default();
                if let Ok(value) = format!("Bearer {token}").parse() {
                    md.insert("authorization", value);
                }
            }
        }
        let result = self.auth.identify(&md, &self.store).map(|_| ());
        let result = self.record("handshake", result);
        result?;
        let mut response = Response::new(
            stream::iter([Ok(HandshakeResponse {
                protocol_version: 0,
                payload: Bytes::from_static(b"ok"),
            })])
            .boxed(),
        );
        if let Some(token) = crate::auth::token_of(&md)
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let result = (|| {
            let principal = self.auth.identify(request.metadata(), &self.store)?;
            let prefix = String::from_utf8_lossy(&request.get_ref().expression).to_string();
            let mut infos = Vec::new();
            for link in self.store.list() {
                if principal.sees(link.name()) && link.name().starts_with(&prefix) {
                    infos.push(Ok(self.link_info(&link)?));
                }
            }
            Ok(Response::new(stream::iter(infos).boxed()))
        })();
        self.record("list_flights", result)
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        if request.get_ref().r#type() == DescriptorType::Cmd
            && crate::sql::is_flight_sql(&request.get_ref().cmd)
        {
            let result =
                <crate::sql::SqlService as FlightService>::get_flight_info(&self.sql, request)
                    .await;
            return self.record("get_flight_info", result);
        }
        let result = (|| {
            let descriptor = request.get_ref().clone();
            match parse_descriptor(&descriptor)? {
                Target::Link(name) => {
                    self.authorize(request.metadata(), Access::Inspect, Some(&name))?;
                    let link = self.link(&name)?;
                    Ok(Response::new(self.link_info(&link)?))
                }
                Target::Shard(shard) => {
                    self.authorize(request.metadata(), Access::Read, Some(&shard.link))?;
                    let link = self.link(&shard.link)?;
                    Ok(Response::new(self.shard_info(&link, shard, descriptor)?))
                }
            }
        })();
        self.record("get_flight_info", result)
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        self.record(
            "poll_flight_info",
            Err(Status::unimplemented(
                "PollFlightInfo is not supported; use GetFlightInfo",
            )),
        )
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let result = (|| {
            let name = match parse_descriptor(request.get_ref())? {
                Target::Link(name) => name,
                Target::Shard(shard) => shard.link,
            };
            self.authorize(request.metadata(), Access::Inspect, Some(&name))?;
            let link = self.link(&name)?;
            let schema = Self::schema_of(&link)?;
            let options = IpcWriteOptions::default();
            let result: SchemaResult = SchemaAsIpc::new(&schema.schema, &options)
                .try_into()
                .map_err(|e: arrow_schema::ArrowError| Status::internal(e.to_string()))?;
            Ok(Response::new(result))
        })();
        self.record("get_schema", result)
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let result = self
            .ticket_stream(request.metadata(), &request.get_ref().ticket)
            .map(Response::new);
        self.record("do_get", result)
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let result = self
            .put(request)
            .await
            .map(|r| Response::new(stream::iter([Ok(r)]).boxed()));
        self.record("do_put", result)
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.record(
            "do_exchange",
            Err(Status::unimplemented(
                "DoExchange is not supported; use DoPut to write and DoGet to read",
            )),
        )
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        if crate::sql::is_flight_sql_action(&request.get_ref().r#type) {
            let result =
                <crate::sql::SqlService as FlightService>::do_action(&self.sql, request).await;
            return self.record("do_action", result);
        }
        let (md, _, action) = request.into_parts();
        let result = self
            .action(&md, action)
            .await
            .map(|r| Response::new(stream::iter([Ok(r)]).boxed()));
        self.record("do_action", result)
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.record(
            "list_actions",
            self.auth
                .identify(request.metadata(), &self.store)
                .map(|_| ()),
        )?;
        let actions = [
            (
                proto::actions::CREATE,
                "Create a link. Body: handoff.v1.CreateLink",
            ),
            (
                proto::actions::COMMIT,
                "Publish staged partition attempts atomically. Body: handoff.v1.Commit",
            ),
            (
                proto::actions::ABORT,
                "Drop staged attempts. Body: handoff.v1.Abort",
            ),
            (
                proto::actions::SEAL,
                "Seal a link: no more writes. Body: the link name (UTF-8)",
            ),
            (
                proto::actions::DELETE,
                "Delete a link and free its memory. Body: the link name (UTF-8)",
            ),
            (
                proto::actions::SNAPSHOT,
                "Persist a sealed link to the server's object storage. Body: the link name (UTF-8)",
            ),
            (
                proto::actions::STATS,
                "Link statistics as JSON. Body: the link name (UTF-8)",
            ),
            (
                proto::actions::IMPORT,
                "Fill a link from Parquet in object storage, all or nothing. Body: handoff.v1.Import",
            ),
        ];
        let items: Vec<Result<ActionType, Status>> = actions
            .iter()
            .map(|(t, d)| {
                Ok(ActionType {
                    r#type: t.to_string(),
                    description: d.to_string(),
                })
            })
            .collect();
        Ok(Response::new(stream::iter(items).boxed()))
    }
}
