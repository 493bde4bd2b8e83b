//! A read over three replicas of the real `handoff serve` binary, with one replica SIGKILLed in
//! the middle of the read: started again restoring its snapshot, the Rust client's read goes on
//! from the first row that replica had not sent and yields exactly what an undisturbed read
//! does; started again without its snapshot, the read fails with DATA_LOSS saying what is lost.
//! A replica already down when a read starts is waited for the same way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, BinaryArray, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use futures::StreamExt;
use handoff_client::{ClientError, HandoffClient, ReadShard};

const REPLICAS: usize = 3;
const ADMIN: &str = "admin-token-for-the-restart-test";
const READER: &str = "reader-token-for-the-restart-test";
const LINK: &str = "restart/features";
const PARTITIONS: i64 = 24;
const ROWS: i64 = 3000;
const BATCH_ROWS: u64 = 500;

struct Replicas {
    children: Vec<Option<Child>>,
    endpoints: Vec<String>,
    dir: tempfile::TempDir,
    starts: usize,
    /// The start number of each replica's current process (its log's name).
    last_start: Vec<usize>,
}

fn free_port() -> u16 {
    // Bound and released: the server takes it a moment later (a race other processes rarely win).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl Replicas {
    fn start() -> Self {
        let endpoints = (0..REPLICAS)
            .map(|_| format!("grpc://127.0.0.1:{}", free_port()))
            .collect();
        let mut replicas = Self {
            children: (0..REPLICAS).map(|_| None).collect(),
            endpoints,
            dir: tempfile::tempdir().expect("tempdir"),
            starts: 0,
            last_start: vec![0; REPLICAS],
        };
        for i in 0..REPLICAS {
            std::fs::create_dir_all(replicas.spill(i)).expect("spill dir");
            replicas.launch(i, false);
        }
        replicas
    }

    /// Replica `i`'s `handoff_served_rows_total`, from its /metrics (the address its last
    /// start printed).
    fn served_rows(&self, i: usize) -> u64 {
        use std::io::{Read, Write};
        let log = self
            .dir
            .path()
            .join(format!("replica-{i}-{}.log", self.last_start[i]));
        let text = std::fs::read_to_string(log).expect("log");
        let http = text
            .lines()
            .find_map(|l| l.strip_prefix("handoff listening grpc="))
            .and_then(|rest| rest.split(" http=").nth(1))
            .expect("the readiness line names the HTTP address")
            .trim()
            .to_string();
        let mut stream = std::net::TcpStream::connect(&http).expect("connect to /metrics");
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").expect("request");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply");
        reply
            .lines()
            .find_map(|l| l.strip_prefix("handoff_served_rows_total "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .expect("handoff_served_rows_total in /metrics") as u64
    }

    fn spill(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("spill-{i}"))
    }

    /// Start replica `i` (again), restoring its snapshots with `restore`, and wait until it
    /// prints its readiness line.
    fn launch(&mut self, i: usize, restore: bool) {
        self.starts += 1;
        self.last_start[i] = self.starts;
        let log = self
            .dir
            .path()
            .join(format!("replica-{i}-{}.log", self.starts));
        let spill = format!("file://{}", self.spill(i).display());
        let mut command = Command::new(env!("CARGO_BIN_EXE_handoff"));
        command.args([
            "serve",
            "--peers",
            &self.endpoints.join(","),
            "--replica-index",
            &i.to_string(),
            "--token",
            ADMIN,
            "--reader-token",
            READER,
            "--listen",
            self.endpoints[i].trim_start_matches("grpc://"),
            "--http-listen",
            "127.0.0.1:0",
            "--spill-url",
            &spill,
            "--snapshot-on-seal",
        ]);
        if restore {
            command.args(["--restore-from", &spill]);
        }
        let out = std::fs::File::create(&log).expect("log");
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn handoff serve");
        self.children[i] = Some(child);
        wait_ready(&log, self.children[i].as_mut().expect("child"));
    }

    /// SIGKILL replica `i`: no drain, its memory gone, as when its node loses the pod.
    fn crash(&mut self, i: usize) {
        let mut child = self.children[i].take().expect("running");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_ready(log: &Path, child: &mut Child) {
    let deadline = Instant::now() + handoff_testkit::patience();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.starts_with("handoff listening grpc="))
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("handoff serve exited with {status} before it was ready:\n{text}");
        }
        assert!(Instant::now() < deadline, "not ready in time:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Partition `p`: ids from p * ROWS, each with 1 KiB of padding made from its partition, so
/// that a replica's part (about 24 MiB) is more than the transport holds in flight (the
/// client's HTTP/2 windows are 16 MiB).
fn partition(p: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("pad", DataType::Binary, false),
    ]));
    let ids = Int64Array::from_iter_values(p * ROWS..(p + 1) * ROWS);
    let pad = vec![vec![p as u8; 1024]; ROWS as usize];
    let pad = BinaryArray::from_iter_values(pad.iter());
    RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(pad)]).expect("batch")
}

/// The ids of a batch, checking that its padding belongs to them.
fn ids(batch: &RecordBatch) -> Vec<i64> {
    assert_eq!(
        batch.num_rows() as u64,
        BATCH_ROWS,
        "every batch is batch_rows"
    );
    let id = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("ids");
    let pad = batch
        .column(1)
        .as_any()
        .downcast_ref::<BinaryArray>()
        .expect("pad");
    (0..id.len())
        .map(|i| {
            assert_eq!(pad.value(i), vec![(id.value(i) / ROWS) as u8; 1024]);
            id.value(i)
        })
        .collect()
}

fn shard() -> ReadShard {
    ReadShard {
        link: LINK.into(),
        world_size: 1,
        batch_rows: BATCH_ROWS,
        ..Default::default()
    }
}

/// Read three batches, crash replica `victim` and start it again (restoring with `restore`),
/// then read the rest: the ids of every batch, or the error that ended the read.
async fn crash_midway(
    replicas: &mut Replicas,
    victim: usize,
    restore: bool,
) -> (Vec<Vec<i64>>, Option<ClientError>) {
    let mut reader = HandoffClient::connect(&replicas.endpoints[0], Some(READER.into()))
        .await
        .expect("connect");
    let mut batches = reader.shard_batches(shard()).await.expect("plan");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(ids(&batches.next().await.expect("a batch").expect("batch")));
    }
    replicas.crash(victim);
    replicas.launch(victim, restore);
    while let Some(batch) = batches.next().await {
        match batch {
            Ok(batch) => got.push(ids(&batch)),
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_goes_on_over_a_replica_restarted_from_its_snapshot() {
    let mut replicas = Replicas::start();
    let mut admin = HandoffClient::connect(&replicas.endpoints[0], Some(ADMIN.into()))
        .await
        .expect("connect");
    for p in 0..PARTITIONS {
        let batches = futures::stream::iter([Ok(partition(p))]);
        admin
            .put_partition(LINK, p as u64, 0, batches)
            .await
            .expect("put");
    }
    let winners: Vec<(u64, u64)> = (0..PARTITIONS as u64).map(|p| (p, 0)).collect();
    admin.commit(LINK, &winners).await.expect("commit");
    let sealed = admin.seal(LINK).await.expect("seal");
    let victim = (1..REPLICAS)
        .max_by_key(|r| sealed.replicas[*r].rows)
        .expect("a replica");
    assert!(sealed.replicas[victim].rows > 4 * BATCH_ROWS, "{sealed:?}");

    let mut reader = HandoffClient::connect(&replicas.endpoints[0], Some(READER.into()))
        .await
        .expect("connect");
    let mut want = Vec::new();
    let mut undisturbed = reader.shard_batches(shard()).await.expect("plan");
    while let Some(batch) = undisturbed.next().await {
        want.push(ids(&batch.expect("batch")));
    }
    let mut every: Vec<i64> = want.concat();
    every.sort_unstable();
    assert_eq!(every, (0..PARTITIONS * ROWS).collect::<Vec<_>>());

    // Restored from its snapshot: the read goes on where that replica broke off.
    let (got, error) = crash_midway(&mut replicas, victim, true).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(got, want, "the same batches as an undisturbed read");
    // The restarted replica sent the rest: the read went on there, not from a buffer.
    let served = replicas.served_rows(victim);
    assert!(
        served > 0 && served < sealed.replicas[victim].rows,
        "served {served} of {}",
        sealed.replicas[victim].rows
    );
    let stats = admin.stats(LINK).await.expect("stats");
    assert_ne!(
        stats.server_instance, sealed.server_instance,
        "a replica restarted"
    );
    assert_eq!(stats.replicas[victim].rows, sealed.replicas[victim].rows);

    // Down when the read starts, and back from its snapshot a moment later: the read waits
    // for it and gives the same batches.
    replicas.crash(victim);
    let endpoint = replicas.endpoints[0].clone();
    let read = tokio::spawn(async move {
        let mut reader = HandoffClient::connect(&endpoint, Some(READER.into()))
            .await
            .expect("connect");
        let mut batches = reader.shard_batches(shard()).await?;
        let mut got = Vec::new();
        while let Some(batch) = batches.next().await {
            got.push(ids(&batch?));
        }
        Ok::<_, ClientError>(got)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    if read.is_finished() {
        panic!("the read did not wait for the replica: {:?}", read.await);
    }
    replicas.launch(victim, true);
    let got = read.await.expect("the read's task").expect("the read");
    assert_eq!(got, want, "the same batches as an undisturbed read");

    // Down for longer than the reader waits: it says which replica, and what to do.
    replicas.crash(victim);
    let mut config = handoff_client::ClientConfig::new(&replicas.endpoints[0], Some(READER.into()));
    config.resume_within = Duration::from_millis(300);
    let mut impatient = HandoffClient::connect_with(config).await.expect("connect");
    let error = match impatient.shard_batches(shard()).await {
        Ok(_) => panic!("a read with a replica down"),
        Err(e) => e,
    };
    assert_eq!(error.code(), Some(tonic::Code::Unavailable), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("the planner could not plan this read within 300ms")
            && text.contains(&format!("replica {} (", replicas.endpoints[victim]))
            && text.contains("is unreachable"),
        "{text}"
    );
    replicas.launch(victim, true);

    // Back without its part: the read says what is lost.
    let (got, error) = crash_midway(&mut replicas, victim, false).await;
    let error = error.expect("the read fails");
    assert_eq!(error.code(), Some(tonic::Code::DataLoss), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("came back without link 'restart/features'")
            && text.contains("rows of this rank's shard are lost"),
        "{text}"
    );
    assert!(got.len() < want.len());
}
