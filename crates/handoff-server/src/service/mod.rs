//! The Flight service: protocol translation between gRPC and the store, plus auth. Split by
//! call: `get` (FlightInfo and tickets), `put` (DoPut), `actions` (DoAction), and
//! `replicated` (the actions of a link over several replicas).

mod actions;
mod get;
mod put;
mod replicated;

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
    /// The other replicas of this server's links (`serve --peers`); `None`: one server.
    pub(crate) replicas: Option<Arc<crate::replicas::ReplicaConfig>>,
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

/// An import's failure as a status: what the user can fix is INVALID_ARGUMENT, unreadable
/// files FAILED_PRECONDITION, memory RESOURCE_EXHAUSTED.
fn import_status(e: handoff_query::ImportError) -> Status {
    match e {
        handoff_query::ImportError::Store(e) => status_of(e),
        e @ handoff_query::ImportError::Memory(_) => Status::resource_exhausted(e.to_string()),
        handoff_query::ImportError::Invalid(m) => invalid(m),
        e @ handoff_query::ImportError::InvalidUrl { .. } => invalid(e.to_string()),
        handoff_query::ImportError::Read(m) => Status::failed_precondition(m.to_string()),
    }
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

/// An action's body, decoded as the message `name` of our protocol.
fn body_of<M: Message + Default>(body: &Bytes, action: &str, name: &str) -> Result<M, Status> {
    M::decode(body.as_ref()).map_err(|e| {
        invalid(format!(
            "the body of '{action}' is a handoff.v1.{name} message: {e}"
        ))
    })
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
            replicas: None,
        })
    }

    pub(crate) fn with_replicas(
        mut self,
        replicas: Option<crate::replicas::ReplicaConfig>,
    ) -> Self {
        self.replicas = replicas.map(Arc::new);
        let whole = self
            .several()
            .map(|r| crate::replicas::Whole::new(Arc::clone(&self.store), r));
        self.sql = self.sql.with_whole(whole);
        self
    }

    /// Refuse a shard read by its ticket alone on a server with replicas: it would see only
    /// this replica's part.
    pub(crate) fn whole_link_here(&self, what: &str) -> Result<(), Status> {
        match &self.replicas {
            Some(r) if r.count() > 1 => Err(Status::failed_precondition(format!(
                "{what} by its ticket alone would read only this replica's part of a link over \
                 {} replicas: plan it with GetFlightInfo at replica 0 ({}), whose endpoints name \
                 every replica to read (handoff's clients do this)",
                r.count(),
                r.url(0)
            ))),
            _ => Ok(()),
        }
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
        let result = async {
            let principal = self.auth.identify(request.metadata(), &self.store)?;
            let prefix = String::from_utf8_lossy(&request.get_ref().expression).to_string();
            // The listing is reserved until the last of it is sent.
            let mut held = self.store.memory().reservation(None);
            let infos = match self.several() {
                Some(replicas) => {
                    self.list_over_replicas(&replicas, &principal, &prefix, &mut held)
                        .await?
                }
                None => self
                    .store
                    .list()
                    .into_iter()
                    .filter(|link| principal.sees(link.name()) && link.name().starts_with(&prefix))
                    .map(|link| self.link_info(&link, &mut held))
                    .collect::<Result<Vec<_>, Status>>()?,
            };
            let release = stream::once(async move { drop(held) }).filter_map(|()| async { None });
            Ok(Response::new(
                stream::iter(infos.into_iter().map(Ok))
                    .chain(release)
                    .boxed(),
            ))
        }
        .await;
        self.record("list_flights", result)
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let sql = request.get_ref().r#type() == DescriptorType::Cmd
            && match crate::sql::is_flight_sql(&request.get_ref().cmd) {
                Ok(sql) => sql,
                Err(status) => return self.record("get_flight_info", Err(status)),
            };
        if sql {
            let result =
                <crate::sql::SqlService as FlightService>::get_flight_info(&self.sql, request)
                    .await;
            return self.record("get_flight_info", result);
        }
        if let Some(replicas) = self.several()
            && let Ok(Target::Shard(shard)) = parse_descriptor(request.get_ref())
        {
            let result = async {
                self.authorize(request.metadata(), Access::Read, Some(&shard.link))?;
                let descriptor = request.get_ref().clone();
                self.shard_info_over_replicas(&replicas, shard, descriptor)
                    .await
                    .map(Response::new)
            }
            .await;
            return self.record("get_flight_info", result);
        }
        let result = async {
            let descriptor = request.get_ref().clone();
            match parse_descriptor(&descriptor)? {
                Target::Link(name) => {
                    self.authorize(request.metadata(), Access::Inspect, Some(&name))?;
                    let mut held = self.store.memory().reservation(None);
                    if let Some(replicas) = self.several() {
                        return Ok(Response::new(
                            self.link_info_over_replicas(&replicas, &name, &mut held)
                                .await?,
                        ));
                    }
                    let link = self.link(&name)?;
                    Ok(Response::new(self.link_info(&link, &mut held)?))
                }
                Target::Shard(shard) => {
                    self.authorize(request.metadata(), Access::Read, Some(&shard.link))?;
                    let link = self.link(&shard.link)?;
                    Ok(Response::new(self.shard_info(&link, shard, descriptor)?))
                }
            }
        }
        .await;
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
            (
                proto::actions::TOPOLOGY,
                "The replicas of this server's links as JSON: {\"replicas\": [endpoint, ...], \"index\": i}",
            ),
            (
                proto::actions::APPLY,
                "Replica to replica (admin): publish this replica's part of a recorded commit. Body: handoff.v1.Commit",
            ),
            (
                proto::actions::SEAL_REPLICA,
                "Replica to replica (admin): seal this replica's part of a link. Body: the link name (UTF-8)",
            ),
            (
                proto::actions::PARTS,
                "Replica to replica (admin): this replica's FlightInfo of links. Body: handoff.v1.ListParts; answer: handoff.v1.Parts",
            ),
            (
                proto::actions::COUNT,
                "Replica to replica (admin): rows of this replica's part that pass a filter, as JSON {\"rows\": n}. Body: handoff.v1.CountRows",
            ),
            (
                proto::actions::READ_DONE,
                "Replica to planner (admin): a replica served its whole part of a rank's read, for the read TTL. Body: handoff.v1.ReadDone",
            ),
            (
                proto::actions::IMPORT_PART,
                "Planner to replica (admin): stage this replica's share of an import's Parquet files. Body: handoff.v1.ImportPart",
            ),
            (
                proto::actions::UNAPPLY,
                "Replica to replica (admin): take back this replica's published part of a commit the planner abandons. Body: handoff.v1.Commit",
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
