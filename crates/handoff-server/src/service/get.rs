//! Reads: FlightInfo for links and shards, and the tickets DoGet serves.

use super::*;

/// The reader's columns and filter, for the store to plan once the link's schema is known; planned
/// here already when it is, so a bad column or filter fails at GetFlightInfo.
pub(super) fn shard_query(
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

impl HandoffService {
    /// A link's FlightInfo: an endpoint per partition. Held while it is built and sent, so it
    /// is reserved in `held` first (see [`info_bytes`]), and refused past the budget.
    pub(super) fn link_info(
        &self,
        link: &Link,
        held: &mut handoff_store::Reservation,
    ) -> Result<FlightInfo, Status> {
        let snapshot = link.snapshot();
        held.try_grow(info_bytes(link.name(), snapshot.partitions.len() as u64))
            .map_err(status_of)?;
        let schema = Self::schema_of(link)?;
        // Each endpoint says which partition and attempt it is and its rows, so a writer that
        // publishes task by task can check what was published against what Spark says won.
        let endpoints = snapshot
            .partitions
            .iter()
            .enumerate()
            .map(|(i, partition)| {
                let about = serde_json::json!({
                    "partition": partition.id, "attempt": partition.attempt, "rows": partition.rows,
                });
                FlightEndpoint::new()
                    .with_ticket(Ticket::new(
                        proto::Ticket::partition(link.name(), i as u64, snapshot.generation)
                            .encode_to_vec(),
                    ))
                    .with_app_metadata(about.to_string())
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

    pub(super) fn shard_info(
        &self,
        link: &Link,
        shard: proto::ReadShard,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let (spec, mode) = shard_spec(&shard);
        spec.validate().map_err(status_of)?;
        batches_per_message(&shard, &spec, mode)?;
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
        if crate::sql::is_flight_sql(ticket)? {
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
        // A replica's part of a streaming read over replicas is read as a shard of this replica.
        let (part, kind) = match ticket.kind {
            Some(proto::ticket::Kind::ShardPart(shard)) => {
                (true, Some(proto::ticket::Kind::Shard(shard)))
            }
            kind => (false, kind),
        };
        let chunks: BoxStream<'static, Result<Chunk, StoreError>> = match kind {
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
                if !part {
                    self.whole_link_here("A shard read")?;
                } else if self.several().is_none() || shard.mode() != proto::ReadMode::Streaming {
                    return Err(invalid(
                        "a shard_part ticket is one replica's part of a streaming read over \
                         replicas; plan reads with GetFlightInfo",
                    ));
                }
                self.authorize(md, Access::Read, Some(&shard.link))?;
                let link = self.link(&shard.link)?;
                let (spec, mode) = shard_spec(&shard);
                spec.validate().map_err(status_of)?;
                let (planner, _) = shard_query(&shard, &link)?;
                let join = batches_per_message(&shard, &spec, mode)?;
                let batch_rows = spec.batch_rows;
                let memory = self.store.read_memory().clone();
                let rx = handoff_store::read_shard(
                    Arc::clone(&link),
                    spec,
                    mode,
                    planner,
                    memory.clone(),
                );
                let chunks = stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                })
                .boxed();
                self.joined(chunks, join, batch_rows, link, memory)
            }
            Some(proto::ticket::Kind::Ranges(ranges)) => {
                self.authorize(md, Access::Read, Some(&ranges.link))?;
                let link = self.link(&ranges.link)?;
                let base = ShardSpec {
                    rank: 0,
                    world_size: 1,
                    epoch: ranges.epoch,
                    seed: ranges.seed,
                    batch_rows: ranges.batch_rows,
                    shuffle: ranges.shuffle,
                    drop_last: false,
                    start_batch: 0,
                };
                let shard = proto::ReadShard {
                    link: ranges.link.clone(),
                    columns: ranges.columns.clone(),
                    filter: ranges.filter.clone(),
                    batches_per_message: ranges.batches_per_message,
                    ..Default::default()
                };
                let (planner, _) = shard_query(&shard, &link)?;
                let join = batches_per_message(&shard, &base, ReadMode::WaitForSeal)?;
                let list = ranges.ranges.iter().map(|r| (r.start, r.rows)).collect();
                let on_done = self.read_done_hook(&link, &ranges);
                let memory = self.store.read_memory().clone();
                let rx = handoff_store::read_ranges(
                    Arc::clone(&link),
                    list,
                    base,
                    planner,
                    memory.clone(),
                    on_done,
                )
                .map_err(status_of)?;
                let chunks = stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                })
                .boxed();
                self.joined(chunks, join, ranges.batch_rows, link, memory)
            }
            // (A part was turned into its shard above.)
            None | Some(proto::ticket::Kind::ShardPart(_)) => {
                return Err(invalid("empty ticket; get one from GetFlightInfo"));
            }
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
}

impl HandoffService {
    /// `chunks`, with whole batches of `batch_rows` joined `join` to a message (see [`Joiner`]).
    fn joined(
        &self,
        chunks: BoxStream<'static, Result<Chunk, StoreError>>,
        join: usize,
        batch_rows: u64,
        link: Arc<Link>,
        memory: handoff_store::ReadMemory,
    ) -> BoxStream<'static, Result<Chunk, StoreError>> {
        if join <= 1 {
            return chunks;
        }
        Joiner {
            input: chunks,
            per_message: join,
            batch_rows,
            max_bytes: self.max_flight_data_size,
            link,
            memory,
            pending: Vec::new(),
            pending_bytes: 0,
            queued: Default::default(),
            ended: false,
        }
        .into_stream()
    }
}

/// How many batches the read asked to share a message, checked; 1 where joining does not apply.
pub(super) fn batches_per_message(
    shard: &proto::ReadShard,
    spec: &ShardSpec,
    mode: ReadMode,
) -> Result<usize, Status> {
    let asked = shard.batches_per_message;
    if asked > proto::MAX_BATCHES_PER_MESSAGE {
        return Err(invalid(format!(
            "batches_per_message {asked} is out of range: ask for 0 to {}",
            proto::MAX_BATCHES_PER_MESSAGE
        )));
    }
    // A streaming read sends each batch as soon as its rows are committed; holding it back for
    // the next ones would delay training.
    if mode == ReadMode::Streaming || spec.batch_rows == 0 {
        return Ok(1);
    }
    Ok(asked.max(1) as usize)
}

/// Joins whole batches of a shard, `per_message` at a time, into one message: a gRPC frame, an
/// IPC header, and on the reader's side a decode and a tensor per column, paid once for several
/// batches. Only batches of exactly `batch_rows` rows are joined, and only up to the message
/// size, so a reader that cuts each message at `batch_rows` gets exactly the batches it would
/// have got one by one. Anything else (the schema, a stored frame, a short batch) passes alone.
struct Joiner {
    input: BoxStream<'static, Result<Chunk, StoreError>>,
    per_message: usize,
    batch_rows: u64,
    max_bytes: usize,
    link: Arc<Link>,
    memory: handoff_store::ReadMemory,
    pending: Vec<(arrow_array::RecordBatch, handoff_store::Held)>,
    pending_bytes: usize,
    /// What goes out before anything more is read: batches that could not be joined, then
    /// what arrived after them. Empty whenever the input is read, so `flush` appends.
    queued: std::collections::VecDeque<Result<Chunk, StoreError>>,
    /// The input has ended (it must not be polled again).
    ended: bool,
}

impl Joiner {
    fn into_stream(self) -> BoxStream<'static, Result<Chunk, StoreError>> {
        stream::unfold(self, |mut joiner| async move {
            joiner.next().await.map(|item| (item, joiner))
        })
        .boxed()
    }

    async fn next(&mut self) -> Option<Result<Chunk, StoreError>> {
        loop {
            if let Some(item) = self.queued.pop_front() {
                return Some(item);
            }
            if self.ended {
                return self.flush();
            }
            let Some(item) = self.input.next().await else {
                self.ended = true;
                return self.flush();
            };
            match item {
                Ok(Chunk::Batch(batch, held)) if batch.num_rows() as u64 == self.batch_rows => {
                    let bytes = crate::encode::batch_bytes(&batch);
                    let fits = self.pending_bytes.saturating_add(bytes) <= self.max_bytes;
                    if !self.pending.is_empty() && !fits {
                        let out = self.flush();
                        self.pending_bytes = bytes;
                        self.pending.push((batch, held));
                        return out;
                    }
                    self.pending_bytes = self.pending_bytes.saturating_add(bytes);
                    self.pending.push((batch, held));
                    if self.pending.len() >= self.per_message {
                        return self.flush();
                    }
                }
                other if self.pending.is_empty() => return Some(other),
                other => {
                    let out = self.flush();
                    self.queued.push_back(other);
                    return out;
                }
            }
        }
    }

    /// The pending batches as one chunk (or, without memory to join them, the first of them,
    /// the rest queued, in order); None when there are none.
    fn flush(&mut self) -> Option<Result<Chunk, StoreError>> {
        let bytes = std::mem::take(&mut self.pending_bytes) as u64;
        let mut parts = std::mem::take(&mut self.pending);
        if parts.len() <= 1 {
            return parts
                .pop()
                .map(|(batch, held)| Ok(Chunk::Batch(batch, held)));
        }
        match self.memory.try_join(&self.link, parts, bytes) {
            Ok(Ok((batch, held))) => Some(Ok(Chunk::Batch(batch, held))),
            Ok(Err(parts)) => {
                let mut alone = parts
                    .into_iter()
                    .map(|(batch, held)| Ok(Chunk::Batch(batch, held)));
                let first = alone.next();
                self.queued.extend(alone);
                first
            }
            Err(e) => Some(Err(e)),
        }
    }
}

/// What a link's FlightInfo takes while it is held, per partition at most: the endpoint
/// itself, its ticket (which names the link) and its `app_metadata` (checked against the encoded
/// size in the tests).
pub(super) fn info_bytes(link: &str, partitions: u64) -> u64 {
    const ENDPOINT_BYTES: u64 = 256;
    partitions.saturating_mul(ENDPOINT_BYTES.saturating_add(link.len() as u64))
}
