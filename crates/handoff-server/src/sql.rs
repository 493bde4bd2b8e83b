//! Flight SQL on the data port. Every sealed link the caller may read is a table named after it,
//! in catalog `handoff`, schema `public`. Statements are planned and run by DataFusion over the
//! links' committed data, and they use the same tokens as reads of the links themselves.
//!
//! Statement and prepared-statement handles are the SQL text itself, so the server keeps no
//! per-query state: DoGet plans the statement again. Prepared statements take no parameters.
//!
//! Over several replicas the planner (replica 0) answers: a link is a table once every replica
//! has sealed it and none lost a part, and each other replica's part is scanned over Flight
//! (a `ReadRanges` of all its rows, with the query's columns only).

use std::pin::Pin;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc,
    Ticket,
};
use arrow_schema::SchemaRef;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use handoff_store::{LinkState, Store};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::auth::{Access, AuthConfig};
use crate::replicas::Whole;

pub const CATALOG: &str = "handoff";
pub const SCHEMA: &str = "public";
const TYPE_URL_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// Whether a descriptor command or ticket is a Flight SQL message (a protobuf `Any` of the
/// Flight SQL package) rather than one of ours; INVALID_ARGUMENT for a Flight SQL message that
/// does not decode.
pub fn is_flight_sql(bytes: &[u8]) -> Result<bool, Status> {
    let Ok(any) = Any::decode(bytes) else {
        return Ok(false);
    };
    if !any.type_url.starts_with(TYPE_URL_PREFIX) {
        return Ok(false);
    }
    // arrow-flight's dispatch answers INTERNAL for a command that does not decode; it is the
    // client's mistake (found by the `decode` fuzz target).
    arrow_flight::sql::Command::try_from(any)
        .map(|_| true)
        .map_err(|e| {
            Status::invalid_argument(format!(
                "the Flight SQL command does not decode: {}",
                handoff_store::echo(&e.to_string())
            ))
        })
}

/// Flight SQL action types, routed here from DoAction.
pub fn is_flight_sql_action(kind: &str) -> bool {
    matches!(
        kind,
        "CreatePreparedStatement"
            | "ClosePreparedStatement"
            | "CreatePreparedSubstraitPlan"
            | "BeginTransaction"
            | "EndTransaction"
            | "BeginSavepoint"
            | "EndSavepoint"
            | "CancelQuery"
    )
}

#[derive(Clone)]
pub struct SqlService {
    store: Arc<Store>,
    auth: Arc<AuthConfig>,
    info: Arc<SqlInfoData>,
    max_flight_data_size: usize,
    /// The links' other replicas; `None` on a single server.
    whole: Option<Whole>,
}

type FlightDataStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

fn sql_info() -> Result<SqlInfoData, FlightError> {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "handoff");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, false);
    builder.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    builder.append(SqlInfo::FlightSqlServerCancel, false);
    builder.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
    builder.append(SqlInfo::FlightSqlServerTransactionTimeout, 0i32);
    builder.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    builder.build()
}

/// The SQL text a statement or prepared-statement handle carries.
fn handle_sql(handle: &[u8]) -> Result<String, Status> {
    String::from_utf8(handle.to_vec())
        .map_err(|_| Status::invalid_argument("not a statement handle from this server"))
}

/// A query that ran out of the server's memory is RESOURCE_EXHAUSTED; other failures of a
/// planned query are the query's.
fn query_failed(e: &datafusion::error::DataFusionError) -> Status {
    if handoff_query::memory::is_out_of_memory(e) {
        Status::resource_exhausted(e.find_root().strip_backtrace())
    } else {
        Status::invalid_argument(e.strip_backtrace())
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl SqlService {
    pub fn new(
        store: Arc<Store>,
        auth: Arc<AuthConfig>,
        max_flight_data_size: usize,
    ) -> Result<Self, FlightError> {
        Ok(Self {
            store,
            auth,
            info: Arc::new(sql_info()?),
            max_flight_data_size,
            whole: None,
        })
    }

    /// Over several replicas: tables span every replica's part.
    pub fn with_whole(mut self, whole: Option<Whole>) -> Self {
        self.whole = whole;
        self
    }

    /// The links this caller may query: sealed, and readable with its token. Over replicas, the
    /// second list says why a link sealed here is not a table (yet), one sentence each.
    async fn tables(
        &self,
        metadata: &MetadataMap,
    ) -> Result<(Vec<handoff_query::LinkTable>, Vec<String>), Status> {
        let principal = self.auth.identify(metadata, &self.store)?;
        let links = self
            .store
            .list()
            .into_iter()
            .filter(|link| link.state() == LinkState::Sealed)
            .filter(|link| principal.may(Access::Read, Some(link.name())));
        let Some(whole) = &self.whole else {
            let tables = links
                .filter_map(|link| {
                    handoff_query::LinkTable::new(&link)
                        .map(|table| table.with_memory(Arc::clone(self.store.memory())))
                })
                .collect();
            return Ok((tables, Vec::new()));
        };
        let replicas = whole.replicas();
        if !replicas.is_planner() {
            return Err(replicas.planner_only("Flight SQL over replicas"));
        }
        // Every link at once: a statement waits for the slowest replica, not for the sum.
        let built = futures::future::join_all(links.map(|link| async move {
            let name = link.name().to_string();
            (name.clone(), self.table_over_replicas(whole, link).await)
        }))
        .await;
        let (mut tables, mut why_not) = (Vec::new(), Vec::new());
        for (name, table) in built {
            match table {
                Ok(Some(table)) => tables.push(table),
                Ok(None) => {}
                Err(status) => why_not.push(format!(
                    "'{}' is not queryable now: {}",
                    handoff_store::echo(&name),
                    status.message()
                )),
            }
        }
        Ok((tables, why_not))
    }

    /// A link over every replica as one table: this replica's part, scanned here, and the
    /// others', scanned at their replicas. `None` while no replica has its schema (no rows).
    async fn table_over_replicas(
        &self,
        whole: &Whole,
        link: Arc<handoff_store::Link>,
    ) -> Result<Option<handoff_query::LinkTable>, Status> {
        let replicas = whole.replicas();
        let rows = whole.sealed_rows(link.name()).await?;
        let schema = match link.schema() {
            Some(frame) if !frame.schema.fields().is_empty() => frame.schema,
            // The planner got no rows; a replica that did knows the schema.
            _ => match rows.iter().position(|r| *r > 0) {
                Some(replica) => replicas
                    .client(replica as u32)
                    .await?
                    .schema(link.name())
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!(
                            "the schema from replica {}: {e}",
                            replicas.url(replica as u32)
                        ))
                    })?,
                None => return Ok(None),
            },
        };
        let remote = rows
            .iter()
            .enumerate()
            .filter(|(replica, rows)| *replica as u32 != replicas.index() && **rows > 0)
            .map(|(replica, rows)| {
                Arc::new(ReplicaPart {
                    replicas: Arc::clone(replicas),
                    replica: replica as u32,
                    link: link.name().to_string(),
                    rows: *rows,
                    memory: Arc::clone(self.store.memory()),
                }) as Arc<dyn handoff_query::RemotePart>
            })
            .collect();
        Ok(Some(
            handoff_query::LinkTable::over_replicas(link.name(), schema, Some(&link), remote)
                .with_memory(Arc::clone(self.store.memory())),
        ))
    }

    async fn plan(
        &self,
        metadata: &MetadataMap,
        sql: &str,
    ) -> Result<datafusion::dataframe::DataFrame, Status> {
        // Measured before DataFusion parses it: a deep expression would overflow the stack.
        handoff_query::limits::check_expression("SQL", sql, handoff_query::limits::MAX_SQL_BYTES)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (tables, why_not) = self.tables(metadata).await?;
        let names: Vec<String> = tables.iter().map(|t| t.name().to_string()).collect();
        let ctx = handoff_query::session(tables, CATALOG, SCHEMA, Arc::clone(self.store.memory()))
            .map_err(internal)?;
        // Links are written through Flight, not SQL: no DDL, DML or SET.
        let read_only = datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        ctx.sql_with_options(sql, read_only).await.map_err(|e| {
            let message = e.strip_backtrace();
            if message.contains("not supported") {
                return Status::invalid_argument(format!(
                    "{message}: SQL on Handoff is read-only; write links with DoPut (handoff put, the Spark sink)"
                ));
            }
            let tables = if names.is_empty() {
                "none: seal a link you may read first".to_string()
            } else {
                names.join(", ")
            };
            let not_yet = why_not
                .iter()
                .map(|why| format!("; {why}"))
                .collect::<String>();
            Status::invalid_argument(format!(
                "{message}; the tables you may query are the sealed links you may read: \
                 {tables}{not_yet}"
            ))
        })
    }

    async fn execute(&self, metadata: &MetadataMap, sql: &str) -> Result<FlightDataStream, Status> {
        let frame = self.plan(metadata, sql).await?;
        let schema = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame
            .execute_stream()
            .await
            .map_err(|e| query_failed(&e))?
            .map_err(|e| FlightError::Tonic(Box::new(query_failed(&e))));
        Ok(self.encode(schema, batches))
    }

    fn encode(
        &self,
        schema: SchemaRef,
        batches: impl Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
    ) -> FlightDataStream {
        FlightDataEncoderBuilder::new()
            .with_max_flight_data_size(self.max_flight_data_size)
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from)
            .boxed()
    }

    fn one_batch(&self, batch: RecordBatch) -> FlightDataStream {
        let schema = batch.schema();
        self.encode(schema, stream::iter([Ok(batch)]))
    }

    fn info(
        &self,
        schema: &arrow_schema::Schema,
        descriptor: FlightDescriptor,
        ticket: Any,
    ) -> Result<Response<FlightInfo>, Status> {
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(internal)?
            .with_descriptor(descriptor)
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket.encode_to_vec())));
        Ok(Response::new(info))
    }

    async fn tables_batch(
        &self,
        metadata: &MetadataMap,
        query: CommandGetTables,
    ) -> Result<RecordBatch, Status> {
        let (tables, _) = self.tables(metadata).await?;
        let mut builder = query.into_builder();
        for table in &tables {
            builder
                .append(
                    CATALOG,
                    SCHEMA,
                    table.name(),
                    "TABLE",
                    &table.arrow_schema(),
                )
                .map_err(internal)?;
        }
        builder.build().map_err(internal)
    }
}

#[tonic::async_trait]
impl FlightSqlService for SqlService {
    type FlightService = SqlService;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let frame = self.plan(request.metadata(), &query.query).await?;
        let schema = frame.schema().as_arrow().clone();
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        self.info(&schema, request.into_inner(), ticket.as_any())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = handle_sql(&ticket.statement_handle)?;
        Ok(Response::new(self.execute(request.metadata(), &sql).await?))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let frame = self.plan(request.metadata(), &query.query).await?;
        let parameters = frame
            .logical_plan()
            .get_parameter_types()
            .map_err(internal)?;
        if !parameters.is_empty() {
            let mut names: Vec<&String> = parameters.keys().collect();
            names.sort();
            return Err(Status::invalid_argument(format!(
                "this server does not bind parameters ({names:?}); write the values into the SQL text"
            )));
        }
        let schema = frame.schema().as_arrow().clone();
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &Default::default())
            .try_into()
            .map_err(internal)?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        // Handles hold no server state, but every call but health needs a token.
        self.auth.identify(request.metadata(), &self.store)?;
        Ok(())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let sql = handle_sql(&query.prepared_statement_handle)?;
        let frame = self.plan(request.metadata(), &sql).await?;
        let schema = frame.schema().as_arrow().clone();
        self.info(&schema, request.into_inner(), query.as_any())
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = handle_sql(&query.prepared_statement_handle)?;
        Ok(Response::new(self.execute(request.metadata(), &sql).await?))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let batch = self.tables_batch(request.metadata(), query.clone()).await?;
        self.info(&batch.schema(), request.into_inner(), query.as_any())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let batch = self.tables_batch(request.metadata(), query).await?;
        Ok(Response::new(self.one_batch(batch)))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let schema = query.into_builder().schema();
        self.info(&schema, request.into_inner(), query.as_any())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(Response::new(
            self.one_batch(builder.build().map_err(internal)?),
        ))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let schema = query.clone().into_builder().schema();
        self.info(&schema, request.into_inner(), query.as_any())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        Ok(Response::new(
            self.one_batch(builder.build().map_err(internal)?),
        ))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let schema = query.into_builder().schema();
        self.info(&schema, request.into_inner(), query.as_any())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        Ok(Response::new(
            self.one_batch(builder.build().map_err(internal)?),
        ))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let schema = query.clone().into_builder(&self.info).schema();
        self.info(&schema, request.into_inner(), query.as_any())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.auth.identify(request.metadata(), &self.store)?;
        let batch = query.into_builder(&self.info).build().map_err(internal)?;
        Ok(Response::new(self.one_batch(batch)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Another replica's part of a link, for a query at the planner: all its rows, by a
/// `ReadRanges` ticket at that replica with the query's columns only.
#[derive(Debug)]
struct ReplicaPart {
    replicas: Arc<crate::replicas::ReplicaConfig>,
    replica: u32,
    link: String,
    rows: u64,
    /// The planner's budget: each batch that arrives is reserved in it until the next one
    /// does (what the operators downstream keep, they reserve themselves).
    memory: Arc<handoff_store::MemoryPool>,
}

impl handoff_query::RemotePart for ReplicaPart {
    fn rows(&self) -> u64 {
        self.rows
    }

    fn scan(
        &self,
        columns: Option<Vec<String>>,
        batch_rows: usize,
    ) -> futures::stream::BoxStream<'static, datafusion::error::Result<RecordBatch>> {
        use datafusion::error::DataFusionError;
        let ticket = handoff_proto::Ticket {
            kind: Some(handoff_proto::ticket::Kind::Ranges(
                handoff_proto::ReadRanges {
                    link: self.link.clone(),
                    ranges: vec![handoff_proto::RowRange {
                        start: 0,
                        rows: self.rows,
                    }],
                    batch_rows: batch_rows as u64,
                    shuffle: false,
                    seed: 0,
                    epoch: 0,
                    columns: columns.unwrap_or_default(),
                    filter: String::new(),
                    // No rank's read: it does not count towards the read TTL.
                    world_size: 0,
                    rank: 0,
                    batches_per_message: 0,
                },
            )),
        };
        let (replicas, replica) = (Arc::clone(&self.replicas), self.replica);
        let url = replicas.url(replica).to_string();
        let failed = move |e: handoff_client::ClientError| {
            DataFusionError::External(format!("reading the part of replica {url}: {e}").into())
        };
        let fail = failed.clone();
        let batches = stream::once(async move {
            let mut client = replicas
                .client(replica)
                .await
                .map_err(|status| DataFusionError::External(status.message().into()))?;
            let batches = client
                .do_get(Ticket::new(ticket.encode_to_vec()))
                .await
                .map_err(&fail)?;
            Ok::<_, DataFusionError>(batches.map_err(move |e| failed(e.into())))
        })
        .try_flatten();
        let memory = Arc::clone(&self.memory);
        batches
            .scan(None, move |held, batch| {
                let batch = batch.and_then(|batch: RecordBatch| {
                    *held = None;
                    let mut reservation = memory.reservation(None);
                    reservation
                        .try_grow(batch.get_array_memory_size() as u64)
                        .map_err(|e| DataFusionError::ResourcesExhausted(e.to_string()))?;
                    *held = Some(reservation);
                    Ok(batch)
                });
                futures::future::ready(Some(batch))
            })
            .boxed()
    }
}
