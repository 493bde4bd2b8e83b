//! Requests a careless or hostile client can send with a valid token (or none). Each is refused
//! with the right code and a sentence that fits in a reply, and the server goes on serving: every
//! test ends by reading the link back whole.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, Int32Array, NullArray, RecordBatch, RecordBatchOptions};
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{ActionClosePreparedStatementRequest, ProstMessageExt};
use arrow_flight::{Action, Criteria, Empty, FlightData, FlightDescriptor};
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use arrow_schema::{DataType, Field, Schema};
use common::{Fixture, READER, WRITER, batch, link_ids, stream_of};
use futures::StreamExt;
use handoff_client::{ClientError, CreateLink, HandoffClient, ReadShard};
use prost::Message;
use tonic::Code;

/// A link of 100 rows, sealed, that every test reads back at the end.
async fn served(server: &Fixture) {
    let mut w = server.client(WRITER).await;
    w.put("l", stream_of(vec![batch(0, 100)]))
        .await
        .expect("put");
    w.seal("l").await.expect("seal");
}

async fn still_serving(server: &Fixture) {
    let mut admin = server.admin().await;
    assert_eq!(
        link_ids(&mut admin, "l").await,
        (0..100).collect::<Vec<_>>()
    );
}

fn code(e: &ClientError) -> Option<Code> {
    e.code()
}

/// The refusal of a shard read, whether it comes at DoGet or in its stream.
async fn read_refusal(client: &mut HandoffClient, shard: ReadShard) -> ClientError {
    match client.read_shard(shard).await {
        Err(e) => e,
        Ok(mut stream) => loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break ClientError::from(e),
                None => panic!("the read was not refused"),
            }
        },
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    request
}

/// The FlightData a writer sends for `batch` (schema first), under a PATH descriptor.
fn flight_data(link: &str, batch: &RecordBatch) -> Vec<FlightData> {
    let generator = IpcDataGenerator::default();
    let options = IpcWriteOptions::default();
    let mut tracker = DictionaryTracker::new(false);
    let schema =
        generator.schema_to_bytes_with_dictionary_tracker(&batch.schema(), &mut tracker, &options);
    let (_, data) = generator
        .encode(
            batch,
            &mut tracker,
            &options,
            &mut IpcWriteContext::default(),
        )
        .expect("encode");
    vec![
        FlightData {
            flight_descriptor: Some(FlightDescriptor::new_path(vec![link.to_string()])),
            data_header: schema.ipc_message.into(),
            ..Default::default()
        },
        FlightData {
            data_header: data.ipc_message.into(),
            data_body: data.arrow_data.into(),
            ..Default::default()
        },
    ]
}

async fn raw_put(
    server: &Fixture,
    token: &str,
    messages: Vec<FlightData>,
) -> Result<(), tonic::Status> {
    put_on(server.channel().await, token, messages).await
}

/// One DoPut on `channel` (a connection the caller keeps), its results read to the end.
async fn put_on(
    channel: tonic::transport::Channel,
    token: &str,
    messages: Vec<FlightData>,
) -> Result<(), tonic::Status> {
    let mut client = FlightServiceClient::new(channel);
    let request = with_token(futures::stream::iter(messages), Some(token));
    let mut results = client.do_put(request).await?.into_inner();
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

/// The three numbers that each took the release binary down, and their neighbours.
#[tokio::test]
async fn read_sizes_past_their_meaning_are_refused_with_the_range() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut reader = server.client(READER).await;
    for (world_size, batch_rows, shuffle) in [
        (1, 1_000_000_000_000, false),
        (1, 1 << 40, true),
        (2, (1 << 63) + 1, false),
        (u32::MAX, 1, false),
    ] {
        let shard = ReadShard {
            link: "l".into(),
            rank: 0,
            world_size,
            batch_rows,
            shuffle,
            ..Default::default()
        };
        let err = reader
            .shard_info(&shard)
            .await
            .expect_err("refused at GetFlightInfo");
        assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
        let err = read_refusal(&mut reader, shard).await;
        assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains("out of range"), "{err}");
    }
    let shard = ReadShard {
        link: "l".into(),
        rank: 0,
        world_size: 2,
        batch_rows: 10,
        start_batch: u64::MAX,
        ..Default::default()
    };
    let err = read_refusal(&mut reader, shard).await;
    assert!(err.to_string().contains("past the end"), "{err}");
    still_serving(&server).await;
    server.stop().await;
}

/// Zero columns or only Null columns, declaring 2^40 rows in a few bytes: the first shuffled
/// read of such a link once killed the server.
#[tokio::test]
async fn rows_that_no_buffer_holds_are_refused_at_the_write() {
    let server = Fixture::start().await;
    served(&server).await;
    let options = RecordBatchOptions::new().with_row_count(Some(1 << 40));
    let empty = RecordBatch::try_new_with_options(Arc::new(Schema::empty()), vec![], &options)
        .expect("batch");
    let nulls: ArrayRef = Arc::new(NullArray::new(1 << 20));
    let null_only = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("n", DataType::Null, true)])),
        vec![nulls],
    )
    .expect("batch");
    for (link, batch) in [("zero", empty), ("nulls", null_only)] {
        let err = raw_put(&server, WRITER, flight_data(link, &batch))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let mut admin = server.admin().await;
        let rows = admin.stats(link).await.map(|s| s.rows).unwrap_or(0);
        assert_eq!(rows, 0, "nothing of {link} was kept");
    }
    still_serving(&server).await;
    server.stop().await;
}

/// A frame of a metadata version we do not read is refused, not stored to fail later reads.
#[tokio::test]
async fn future_ipc_metadata_is_refused() {
    let server = Fixture::start().await;
    served(&server).await;
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)])),
        vec![Arc::new(Int32Array::from(vec![1, 2, 3]))],
    )
    .expect("batch");
    let mut messages = flight_data("future", &batch);
    let header = messages[1].data_header.to_vec();
    let message = arrow_ipc::root_as_message(&header).expect("message");
    let at =
        message._tab.loc() + message._tab.vtable().get(arrow_ipc::Message::VT_VERSION) as usize;
    let mut patched = header.clone();
    patched[at..at + 2].copy_from_slice(&99i16.to_le_bytes());
    messages[1].data_header = patched.into();
    let err = raw_put(&server, WRITER, messages)
        .await
        .expect_err("refused");
    assert!(
        err.message().contains("newer than this server reads"),
        "{err}"
    );
    still_serving(&server).await;
    server.stop().await;
}

fn or_chain(terms: usize) -> String {
    (0..terms)
        .map(|i| format!("id = {i}"))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// About 1,000 ORs (10 KB) overflowed the stack, as a shard filter and as SQL, and aborted the
/// process; so did 2,300 `IN (1)`s. Now the text is measured before it is parsed into a tree.
#[tokio::test]
async fn deep_filters_and_sql_are_refused_and_the_allowed_depth_runs() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut reader = server.client(READER).await;
    let shard = |filter: String| ReadShard {
        link: "l".into(),
        rank: 0,
        world_size: 1,
        batch_rows: 10,
        filter,
        ..Default::default()
    };
    let err = read_refusal(&mut reader, shard(or_chain(1000))).await;
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("the limit is 256"), "{err}");
    // 100 terms: 199 operators, inside the limit, planned and evaluated here on a test thread.
    let mut rows = 0;
    let mut stream = reader.read_shard(shard(or_chain(100))).await.expect("read");
    while let Some(batch) = stream.next().await {
        rows += batch.expect("batch").num_rows();
    }
    assert_eq!(rows, 100);
    // No operator a reader would name, yet one level each: 2,300 `IN (1)` in 16 KB aborted the
    // server (the `filter` fuzz target found it).
    let in_chain = format!("id{}", " IN (1)".repeat(2300));
    let err = read_refusal(&mut reader, shard(in_chain.clone())).await;
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    assert!(
        err.to_string().contains("operators; the limit is 256"),
        "{err}"
    );

    let mut sql = arrow_flight::sql::client::FlightSqlServiceClient::new(server.channel().await);
    sql.set_header("authorization", format!("Bearer {READER}"));
    let err = sql
        .execute(
            format!("SELECT count(*) FROM l WHERE {}", or_chain(1000)),
            None,
        )
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("the limit is 256"), "{err}");
    let err = sql
        .execute(format!("SELECT count(*) FROM l WHERE {in_chain}"), None)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("the limit is 256"), "{err}");
    let info = sql
        .execute(
            format!("SELECT count(*) FROM l WHERE {}", or_chain(50)),
            None,
        )
        .await
        .expect("planned");
    assert_eq!(info.endpoint.len(), 1);
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn ttls_past_their_range_are_refused_not_expired_at_once() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut admin = server.admin().await;
    for (seal, read) in [(u64::MAX, 0), (0, 1 << 62), (10 * 365 * 24 * 3600 + 1, 0)] {
        let err = admin
            .create(CreateLink {
                link: "forever".into(),
                ttl_seconds_after_seal: seal,
                ttl_seconds_after_read: read,
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains("ten years"), "{err}");
    }
    still_serving(&server).await;
    server.stop().await;
}

/// `create(exist_ok)` on a name someone else holds answered OK and dropped the caller's tokens.
#[tokio::test]
async fn exist_ok_does_not_hide_a_link_set_up_otherwise() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut admin = server.admin().await;
    let create = |writer: &str, memory_limit: u64| CreateLink {
        link: "owned".into(),
        writer_token: writer.into(),
        memory_limit,
        exist_ok: true,
        ..Default::default()
    };
    admin
        .create(create("first-writer", 1 << 20))
        .await
        .expect("create");
    admin
        .create(create("first-writer", 1 << 20))
        .await
        .expect("the same again is fine");
    admin
        .create(create("", 0))
        .await
        .expect("asking for nothing in particular is fine");
    let err = admin
        .create(create("second-writer", 1 << 20))
        .await
        .expect_err("other tokens");
    assert_eq!(code(&err), Some(Code::AlreadyExists), "{err}");
    assert!(err.to_string().contains("another writer token"), "{err}");
    assert!(
        !err.to_string().contains("first-writer"),
        "tokens are never echoed: {err}"
    );
    let err = admin
        .create(create("first-writer", 2 << 20))
        .await
        .expect_err("another quota");
    assert!(
        err.to_string().contains("memory limit of 1048576 bytes"),
        "{err}"
    );
    still_serving(&server).await;
    server.stop().await;
}

/// Delete, snapshot and import are an admin's: a Spark job's writer token must not delete the
/// link it feeds.
#[tokio::test]
async fn delete_snapshot_and_import_need_an_admin_token() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut writer = server.client(WRITER).await;
    let errors = [
        writer.delete("l").await.expect_err("delete"),
        writer.snapshot("l").await.expect_err("snapshot"),
        writer
            .import("l2", "file:///etc/passwd", true)
            .await
            .expect_err("import"),
    ];
    for err in errors {
        assert_eq!(code(&err), Some(Code::PermissionDenied), "{err}");
        assert!(err.to_string().contains("admin token"), "{err}");
    }
    still_serving(&server).await;
    server.stop().await;
}

/// Every call but health needs a valid token, and DoPut checks it before reading anything: a
/// stream that never sends its first message is refused at once instead of being waited on.
#[tokio::test]
async fn calls_without_a_valid_token_are_refused_before_any_payload() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut client = FlightServiceClient::new(server.channel().await);
    let never = futures::stream::pending::<FlightData>();
    let refused = handoff_testkit::within(
        "DoPut to refuse a bad token without waiting for a message",
        client.do_put(with_token(never, Some("not-a-token"))),
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");

    let err = client
        .list_actions(with_token(Empty {}, None))
        .await
        .expect_err("ListActions");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = client
        .list_flights(with_token(Criteria::default(), None))
        .await
        .expect_err("ListFlights");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let close = ActionClosePreparedStatementRequest {
        prepared_statement_handle: "SELECT 1".into(),
    };
    let action = Action::new("ClosePreparedStatement", close.as_any().encode_to_vec());
    let err = client
        .do_action(with_token(action.clone(), None))
        .await
        .expect_err("ClosePreparedStatement");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let mut results = client
        .do_action(with_token(action, Some(READER)))
        .await
        .expect("with a token it answers")
        .into_inner();
    while let Some(result) = results.next().await {
        result.expect("result");
    }
    assert!(
        client
            .list_actions(with_token(Empty {}, Some(READER)))
            .await
            .is_ok()
    );
    still_serving(&server).await;
    server.stop().await;
}

/// A 100 KB link name came back whole in the error, which then overflowed gRPC's metadata limit.
#[tokio::test]
async fn errors_quote_long_input_briefly() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut admin = server.admin().await;
    let name = "n".repeat(100_000);
    let err = admin.stats(&name).await.expect_err("no such link");
    assert_eq!(code(&err), Some(Code::NotFound), "{err}");
    assert!(
        err.to_string().len() < 1000,
        "{} bytes",
        err.to_string().len()
    );
    assert!(err.to_string().contains("100000 bytes in all"), "{err}");
    let err = admin
        .put(&name, stream_of(vec![batch(0, 1)]))
        .await
        .expect_err("bad name");
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    assert!(
        err.to_string().len() < 1000,
        "{} bytes",
        err.to_string().len()
    );
    let filter = format!("name = '{}'", "x".repeat(200_000));
    let mut reader = server.client(READER).await;
    let err = read_refusal(
        &mut reader,
        ReadShard {
            link: "l".into(),
            world_size: 1,
            filter,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    assert!(
        err.to_string().len() < 1000,
        "{} bytes",
        err.to_string().len()
    );
    still_serving(&server).await;
    server.stop().await;
}

/// After a replacing commit, a partition ticket issued before it read the new data silently.
#[tokio::test]
async fn a_ticket_from_before_a_replace_is_aborted() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut w = server.client(WRITER).await;
    w.put_partition("ow", 0, 0, stream_of(vec![batch(0, 10)]))
        .await
        .expect("stage");
    w.commit("ow", &[(0, 0)]).await.expect("commit");
    let old = w.flight_info("ow").await.expect("info");
    let ticket = old.endpoint[0].ticket.clone().expect("ticket");
    w.put_partition("ow", 1, 0, stream_of(vec![batch(100, 5)]))
        .await
        .expect("stage");
    w.commit_with("ow", &[(1, 0)], true).await.expect("replace");
    let mut reader = server.client(READER).await;
    let err = match reader.do_get(ticket).await {
        Err(e) => e,
        Ok(mut stream) => match stream.next().await {
            Some(Ok(_)) => panic!("the stale ticket read data"),
            Some(Err(e)) => ClientError::from(e),
            None => panic!("the stale ticket read nothing and no error"),
        },
    };
    assert_eq!(code(&err), Some(Code::Aborted), "{err}");
    let fresh = w.flight_info("ow").await.expect("info");
    assert_eq!(fresh.total_records, 5);
    still_serving(&server).await;
    server.stop().await;
}

/// Appends number their partitions above every id a writer may stage, so a task that stages
/// after an append never finds its id taken; ids at or above 2^63 cannot be staged.
#[tokio::test]
async fn appends_and_staged_partitions_never_share_an_id() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut w = server.client(WRITER).await;
    let appended = w
        .put("mix", stream_of(vec![batch(0, 10)]))
        .await
        .expect("append");
    assert_eq!(appended.partition, handoff_store::APPEND_IDS_FROM);
    let staged = w
        .put_partition("mix", 0, 0, stream_of(vec![batch(10, 10)]))
        .await
        .expect("a task stages id 0 after the append");
    assert!(!staged.committed);
    w.commit("mix", &[(0, 0)]).await.expect("and commits it");
    let err = w
        .put_partition("mix", u64::MAX, 0, stream_of(vec![batch(20, 1)]))
        .await
        .expect_err("reserved id");
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    assert_eq!(w.stats("mix").await.expect("stats").rows, 20);
    still_serving(&server).await;
    server.stop().await;
}

/// Idle connections cannot use up the file descriptors: past `max_connections` new ones are
/// closed at once, and the server takes them again when old ones go.
#[tokio::test]
async fn connections_past_the_cap_are_closed_until_others_close() {
    let config = handoff_server::ServerConfig {
        max_connections: 2,
        ..Default::default()
    };
    let server = Fixture::start_with(config, handoff_store::StoreConfig::default()).await;
    let addr = server.endpoint.trim_start_matches("grpc://").to_string();
    let idle = [
        tokio::net::TcpStream::connect(&addr).await.expect("idle 1"),
        tokio::net::TcpStream::connect(&addr).await.expect("idle 2"),
    ];
    let endpoint = server.endpoint.clone();
    let answers = || async {
        let mut client = HandoffClient::connect(&endpoint, Some(WRITER.into()))
            .await
            .ok()?;
        client.list().await.ok()
    };
    handoff_testkit::eventually("a third connection to be refused", || async {
        answers().await.is_none().then_some(())
    })
    .await;
    drop(idle);
    handoff_testkit::eventually("the server to take connections again", || async {
        answers().await.map(|_| ())
    })
    .await;
    server.stop().await;
}

/// Import reads with the server's reach, so it is off until the operator names prefixes, and
/// then reads only under them: a link token (or an admin's typo) cannot read the server's files.
#[tokio::test]
async fn import_reads_only_under_the_allowed_prefixes() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut admin = server.admin().await;
    let err = admin
        .import("stolen", "file:///etc/passwd", true)
        .await
        .expect_err("off");
    assert_eq!(code(&err), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("--import-allow"), "{err}");
    server.stop().await;

    let allowed = tempfile::tempdir().expect("tempdir");
    let config = handoff_server::ServerConfig {
        import_allow: vec![format!("file://{}/", allowed.path().display())],
        ..Default::default()
    };
    let server = Fixture::start_with(config, handoff_store::StoreConfig::default()).await;
    served(&server).await;
    let mut admin = server.admin().await;
    for url in [
        "file:///etc/passwd".to_string(),
        format!("file://{}/../../etc/passwd", allowed.path().display()),
        "s3://bucket/x.parquet".to_string(),
    ] {
        let err = admin.import("stolen", &url, true).await.expect_err(&url);
        assert_eq!(code(&err), Some(Code::PermissionDenied), "{url}: {err}");
    }
    assert_eq!(
        admin.stats("stolen").await.map(|s| s.rows).unwrap_or(0),
        0,
        "nothing was read"
    );
    still_serving(&server).await;
    server.stop().await;
}

/// Object storage in a temporary directory, and store configs over it.
struct Storage {
    dir: tempfile::TempDir,
    url: String,
}

impl Storage {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        Self { dir, url }
    }

    fn storage(&self) -> handoff_store::ObjectStorage {
        handoff_store::ObjectStorage::from_url(&self.url).expect("storage")
    }

    fn config(&self) -> handoff_store::StoreConfig {
        handoff_store::StoreConfig {
            storage: Some(self.storage()),
            ..Default::default()
        }
    }

    async fn server(&self) -> Fixture {
        Fixture::start_with(handoff_server::ServerConfig::default(), self.config()).await
    }
}

/// Link `X/manifest.json` once wrote its snapshot directory where link `X` keeps its manifest.
/// Each link is one path segment now; both snapshots restore whole, and storage errors do not
/// show the server's paths.
#[tokio::test]
async fn snapshot_names_cannot_collide() {
    let at = Storage::new();
    let server = at.server().await;
    let mut admin = server.admin().await;
    for (link, rows) in [
        ("X", 10),
        ("X/manifest.json", 20),
        ("X/part-00000.arrows", 30),
    ] {
        admin
            .put(link, stream_of(vec![batch(0, rows)]))
            .await
            .expect("put");
        admin.seal(link).await.expect("seal");
        admin.snapshot(link).await.expect("snapshot");
    }
    server.stop().await;

    let restored = handoff_store::Store::new(at.config());
    let mut links = restored
        .restore_all(&at.storage())
        .await
        .expect("restore")
        .links;
    links.sort();
    assert_eq!(links, ["X", "X/manifest.json", "X/part-00000.arrows"]);
    for (link, rows) in [
        ("X", 10),
        ("X/manifest.json", 20),
        ("X/part-00000.arrows", 30),
    ] {
        assert_eq!(restored.stats(link).expect("stats").rows, rows, "{link}");
    }

    // Storage that fails: the client hears that it failed, not where the server keeps files.
    std::fs::remove_dir_all(at.dir.path()).expect("remove");
    std::fs::write(at.dir.path(), b"not a directory").expect("a file where the directory was");
    let server = at.server().await;
    let mut admin = server.admin().await;
    admin
        .put("y", stream_of(vec![batch(0, 5)]))
        .await
        .expect("put");
    admin.seal("y").await.expect("seal");
    let err = admin.snapshot("y").await.expect_err("storage fails");
    assert_eq!(code(&err), Some(Code::Unavailable), "{err}");
    let shown = at.dir.path().display().to_string();
    assert!(!err.to_string().contains(&shown), "{err}");
    server.stop().await;
}

/// A broken or incomplete snapshot is logged, named and skipped whole; the good ones still
/// load. One bad manifest once failed the whole restore, so a server restart lost every link.
#[tokio::test]
async fn a_bad_snapshot_is_skipped_and_named_and_the_good_ones_load() {
    let at = Storage::new();
    let server = at.server().await;
    let mut admin = server.admin().await;
    for link in ["good", "garbled", "short"] {
        for part in 0..2 {
            admin
                .put(link, stream_of(vec![batch(part * 10, 10)]))
                .await
                .expect("put");
        }
        admin.seal(link).await.expect("seal");
        admin.snapshot(link).await.expect("snapshot");
    }
    server.stop().await;
    let links = at.dir.path().join("links");
    std::fs::write(links.join("garbled/manifest.json"), b"{ not json").expect("garble");
    std::fs::remove_file(links.join("short/part-00001.arrows")).expect("lose a part");

    let restored = handoff_store::Store::new(at.config());
    let report = restored
        .restore_all(&at.storage())
        .await
        .expect("the restore goes on");
    assert_eq!(report.links, ["good"]);
    assert_eq!(restored.stats("good").expect("good").rows, 20);
    assert_eq!(report.skipped.len(), 2, "{:?}", report.skipped);
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.contains("garbled") && s.contains("not valid JSON")),
        "{:?}",
        report.skipped
    );
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.contains("link 'short' (20 rows)")),
        "{:?}",
        report.skipped
    );
    assert!(restored.stats("short").is_err(), "never half a link");
}

/// A restored link is the link that was snapshotted: its own tokens (kept only as hashes, in
/// memory and in the manifest), quota, policy and TTLs.
#[tokio::test]
async fn restore_brings_back_what_a_link_was_created_with() {
    let at = Storage::new();
    let server = at.server().await;
    let mut admin = server.admin().await;
    admin
        .create(CreateLink {
            link: "team/owned".into(),
            writer_token: "link-writer-secret".into(),
            reader_token: "link-reader-secret".into(),
            memory_limit: 64 << 20,
            memory_policy: handoff_client::MemoryPolicy::Wait as i32,
            wait_timeout_ms: 5_000,
            ttl_seconds_after_read: 3_600,
            ..Default::default()
        })
        .await
        .expect("create");
    let mut writer = server.client("link-writer-secret").await;
    writer
        .put("team/owned", stream_of(vec![batch(0, 50)]))
        .await
        .expect("the link's own writer writes");
    writer.seal("team/owned").await.expect("seal");
    admin.snapshot("team/owned").await.expect("snapshot");
    let before = server.store.link("team/owned").expect("link").options();
    server.stop().await;

    let manifest = std::fs::read_to_string(at.dir.path().join("links/team%2Fowned/manifest.json"))
        .expect("manifest");
    assert!(!manifest.contains("link-writer-secret") && !manifest.contains("link-reader-secret"));
    assert!(
        manifest.contains(&String::from(handoff_store::TokenHash::of(
            "link-reader-secret"
        )))
    );

    // A new server restores it; the link's reader token still reads, and nothing else changed.
    let server = at.server().await;
    let report = server
        .store
        .restore_all(&at.storage())
        .await
        .expect("restore");
    assert_eq!(report.links, ["team/owned"]);
    let after = server.store.link("team/owned").expect("link").options();
    assert_eq!(after.tokens, before.tokens);
    assert_eq!(after.memory_limit, Some(64 << 20));
    assert_eq!(after.policy, before.policy);
    assert_eq!(after.ttl_after_read, before.ttl_after_read);
    let mut reader = server.client("link-reader-secret").await;
    assert_eq!(link_ids(&mut reader, "team/owned").await.len(), 50);
    server.stop().await;
}

/// A message is reserved from its declared length before the server buffers it: one larger than
/// the whole budget is refused with the numbers, one larger than what is free is refused under
/// `reject`, and nothing of either stays counted.
#[tokio::test]
async fn messages_are_reserved_before_they_are_buffered() {
    let limit = 4 << 20;
    let server = Fixture::start_with(
        handoff_server::ServerConfig::default(),
        handoff_store::StoreConfig {
            memory_limit: Some(limit),
            ..Default::default()
        },
    )
    .await;
    served(&server).await;
    let base = server.store.memory().used();
    // About 6 MB in one message.
    let big = common::batch(0, 150_000);
    let err = raw_put(&server, common::ADMIN, flight_data("mem", &big))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message()
            .contains("larger than the server's whole memory limit of 4194304 bytes"),
        "{err}"
    );
    handoff_testkit::eventually("the refused message is released", || {
        let used = server.store.memory().used();
        async move { (used == base).then_some(()) }
    })
    .await;

    // 3 MB fits the budget, but not beside the 2 MB already held.
    raw_put(
        &server,
        common::ADMIN,
        flight_data("mem", &common::batch(0, 50_000)),
    )
    .await
    .expect("2 MB fit");
    let err = raw_put(
        &server,
        common::ADMIN,
        flight_data("mem", &common::batch(0, 75_000)),
    )
    .await
    .expect_err("refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("memory limit reached"), "{err}");
    let stored = base + server.store.stats("mem").expect("stats").bytes;
    handoff_testkit::eventually("only the stored link stays counted", || {
        let used = server.store.memory().used();
        async move { (used == stored).then_some(()) }
    })
    .await;
    still_serving(&server).await;
    server.stop().await;
}

/// HTTP/2 accepts a connection's window of data before any handler reads it, so a connection
/// that writes holds its window from the budget while it is open: many stalled writers cannot
/// add up to more than the budget. When the window is not free, the write is refused saying so.
#[tokio::test]
async fn a_writing_connection_holds_its_window_until_it_closes() {
    let limit = 64 << 20;
    let window = u64::from(handoff_server::h2_window_for(Some(limit)));
    let server = Fixture::start_with(
        handoff_server::ServerConfig::default(),
        handoff_store::StoreConfig {
            memory_limit: Some(limit),
            ..Default::default()
        },
    )
    .await;
    served(&server).await;
    // Once earlier connections have closed, only links hold memory.
    let store = Arc::clone(&server.store);
    let base = handoff_testkit::eventually("earlier connections gave their windows back", || {
        let links: u64 = store.list().iter().map(|l| l.stats().bytes).sum();
        let used = store.memory().used();
        async move { (used == links).then_some(used) }
    })
    .await;
    let channel = server.channel().await;
    put_on(
        channel.clone(),
        common::ADMIN,
        flight_data("win", &common::batch(0, 1000)),
    )
    .await
    .expect("put");
    let stored = server.store.stats("win").expect("stats").bytes;
    assert_eq!(server.store.memory().used(), base + stored + window);
    // A second write on the same connection shares the window.
    put_on(
        channel.clone(),
        common::ADMIN,
        flight_data("win", &common::batch(1000, 1000)),
    )
    .await
    .expect("put");
    let stored = server.store.stats("win").expect("stats").bytes;
    assert_eq!(server.store.memory().used(), base + stored + window);
    drop(channel);
    handoff_testkit::eventually("a closed connection gives its window back", || {
        let used = server.store.memory().used();
        async move { (used == base + stored).then_some(()) }
    })
    .await;

    // Fill the budget to less than a window from full: the next writing connection is refused.
    let mut fill = server.store.memory().reservation(None);
    fill.try_grow(limit - server.store.memory().used() - window / 2)
        .expect("fill");
    let err = raw_put(
        &server,
        common::ADMIN,
        flight_data("win", &common::batch(0, 10)),
    )
    .await
    .expect_err("refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("HTTP/2 window"), "{err}");
    drop(fill);
    raw_put(
        &server,
        common::ADMIN,
        flight_data("win2", &common::batch(0, 10)),
    )
    .await
    .expect("fits once memory is free");
    still_serving(&server).await;
    server.stop().await;
}

/// A connection that never says anything gives its place back: the gRPC port closes it once its
/// first-byte timeout passes, while a client that speaks is served as before.
#[tokio::test]
async fn a_silent_connection_is_closed() {
    let config = handoff_server::ServerConfig {
        grpc_timeouts: handoff_server::ConnTimeouts {
            first_byte: Duration::from_millis(300),
            ..handoff_server::ConnTimeouts::GRPC
        },
        ..Default::default()
    };
    let server = Fixture::start_with(config, handoff_store::StoreConfig::default()).await;
    served(&server).await;
    let addr = server.endpoint.trim_start_matches("grpc://").to_string();
    let mut silent = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // The server's HTTP/2 preface may come first.
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the silent connection is still open after 10 s"
    );
    still_serving(&server).await;
    server.stop().await;
}

/// A client that speaks HTTP/2 and keeps its connection busy with pings, but never calls, gives
/// its place back after `no_calls`; clients that call are served as before.
#[tokio::test]
async fn a_connection_that_only_pings_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let no_calls = Duration::from_millis(600);
    let config = handoff_server::ServerConfig {
        grpc_timeouts: handoff_server::ConnTimeouts {
            no_calls: Some(no_calls),
            ..handoff_server::ConnTimeouts::GRPC
        },
        ..Default::default()
    };
    let server = Fixture::start_with(config, handoff_store::StoreConfig::default()).await;
    let addr = server.endpoint.trim_start_matches("grpc://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    let opened = std::time::Instant::now();
    // The client preface and an empty SETTINGS frame, then a PING every 100 ms.
    write
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let pinger = tokio::spawn(async move {
        let ping = *b"\x00\x00\x08\x06\x00\x00\x00\x00\x00handoff!";
        while write.write_all(&ping).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut buf = [0u8; 256];
    let mut answered = 0usize;
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answered += n,
            }
        }
    })
    .await;
    pinger.abort();
    assert!(
        closed.is_ok(),
        "a connection that only pings is open after 20 s"
    );
    assert!(
        answered > 0,
        "the server spoke HTTP/2 (settings, ping acks) before closing"
    );
    assert!(
        opened.elapsed() >= no_calls,
        "closed after {:?}, before no_calls",
        opened.elapsed()
    );
    // A client that calls keeps being served, its connection reopened as needed.
    served(&server).await;
    tokio::time::sleep(no_calls * 2).await;
    still_serving(&server).await;
    server.stop().await;
}

/// Found by the `decode` fuzz target: a Flight SQL command that does not decode (its query is
/// not UTF-8) was answered INTERNAL by arrow-flight's dispatch; it is the client's mistake.
#[tokio::test]
async fn a_flight_sql_command_that_does_not_decode_is_invalid_argument() {
    let server = Fixture::start().await;
    served(&server).await;
    let mut client = FlightServiceClient::new(server.channel().await);
    let any = |value: Vec<u8>| {
        prost_types_any(
            "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery",
            value,
        )
    };
    // CommandStatementQuery { query: b"SELECT \xae" }: field 1, not UTF-8.
    let bad = any(vec![
        0x0a, 0x08, b'S', b'E', b'L', b'E', b'C', b'T', b' ', 0xae,
    ]);
    let status = client
        .get_flight_info(with_token(
            FlightDescriptor::new_cmd(bad.clone()),
            Some(common::ADMIN),
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("does not decode"), "{status}");
    let status = client
        .do_get(with_token(
            arrow_flight::Ticket::new(bad),
            Some(common::ADMIN),
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    still_serving(&server).await;
    server.stop().await;
}

/// A protobuf `Any`, encoded by hand: field 1 the type URL, field 2 the value.
fn prost_types_any(type_url: &str, value: Vec<u8>) -> bytes::Bytes {
    let mut out = Vec::new();
    for (tag, bytes) in [(0x0a_u8, type_url.as_bytes()), (0x12, value.as_slice())] {
        out.push(tag);
        let mut len = bytes.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            out.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(bytes);
    }
    out.into()
}

/// A link's FlightInfo holds an endpoint per partition while it is built and sent, so it is
/// reserved like data: a listing that does not fit beside what is stored is refused with the
/// numbers, rather than held beyond the budget, and nothing of it stays counted.
#[tokio::test]
async fn listings_of_many_partitions_are_reserved_in_the_budget() {
    let limit: u64 = 1 << 20;
    let server = Fixture::start_with(
        handoff_server::ServerConfig::default(),
        handoff_store::StoreConfig {
            memory_limit: Some(limit),
            ..Default::default()
        },
    )
    .await;
    let mut admin = server.admin().await;
    admin
        .put("few", stream_of(vec![batch(0, 1)]))
        .await
        .expect("put");
    // One-row partitions until the budget is nearly full: each stores less than a listing
    // of it takes beside the others.
    let mut partitions = 0;
    while server.store.memory().used() < limit / 100 * 85 {
        admin
            .put("many", stream_of(vec![batch(partitions, 1)]))
            .await
            .expect("one row");
        partitions += 1;
    }
    let stored = server.store.memory().used();
    let err = admin.flight_info("many").await.expect_err("too large");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("memory limit"), "{err}");
    let err = admin.list().await.expect_err("too large");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    // A small listing still fits, and the refused ones left nothing counted.
    let few = admin.flight_info("few").await.expect("one partition");
    assert_eq!(few.endpoint.len(), 1);
    handoff_testkit::eventually("the listings are released", || {
        let used = server.store.memory().used();
        async move { (used == stored).then_some(()) }
    })
    .await;
    assert!(partitions > 100, "{partitions} partitions");
    server.stop().await;
}
