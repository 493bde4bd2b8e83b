"""One link over three server replicas (`handoff serve --peers ... --replica-index I`), against
the real binary: the placement formula, the refusals a client that does not route gets, and the
Python client's routing (partitions to their owners, the planner's actions to replica 0), also
under the Spark sink, and shard reads over replicas (planned at replica 0, read from every replica
at once) through the client and the torch loader, streaming reads over replicas, whole-link
reads and Flight SQL at replica 0.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from itertools import count
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import READY_RE, REPO, STOP_TIMEOUT_S, eventually, handoff_bin, options, patience
from handoff import HandoffClient, HandoffError
from handoff.client import ServerUnavailable
from handoff._proto import pb
from handoff.client import ShardRequest, TlsSettings, owner

REPLICAS = 3


def free_port() -> int:
    # Bound and released: the server takes it a moment later (a race other processes rarely win).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, procs, endpoints, logs, admin, writer, reader, commands, spills):
        self.procs, self.endpoints, self.logs = procs, endpoints, logs
        self.admin, self.writer, self.reader = admin, writer, reader
        self.commands, self.spills = commands, spills

    def launch(self, i: int, extra=()) -> None:
        """Start replica `i` (again) with its command and `extra`, logging to a new file."""
        self.logs[i] = self.logs[i].with_name(f"replica-{i}-{time.monotonic_ns()}.log")
        with open(self.logs[i], "wb") as log:
            # stdout and stderr to a file: a pipe nobody reads would stall the server.
            self.procs[i] = subprocess.Popen([*self.commands[i], *extra], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        def ready():
            for proc in self.procs:
                assert proc.poll() is None, f"a replica exited early\n{self.log_tails()}"
            return all(any(READY_RE.match(line) for line in log.read_text(errors="replace")
                           .splitlines()) for log in self.logs)

        eventually("every replica printed its readiness line", ready, timeout=60, interval=0.1)

    def crash(self, i: int) -> None:
        """SIGKILL replica `i`, as a pod's node losing it does: no drain, its memory gone."""
        self.procs[i].kill()
        self.procs[i].wait()

    def log_tails(self, n: int = 30) -> str:
        return "\n".join(f"--- replica {i}:\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-n:]) for i, log in enumerate(self.logs))


@contextmanager
def replicas(scheme: str = "grpc", extra=()):
    """Three replicas of the real binary on 127.0.0.1, every one given `extra` args."""
    binary = handoff_bin()
    if not binary.exists():
        pytest.fail(f"handoff binary not found at {binary}: build it or set HANDOFF_BIN", pytrace=False)
    admin, writer, reader = (secrets.token_hex(16) for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="handoff-replicas-") as tmp:
        ports = [free_port() for _ in range(REPLICAS)]
        endpoints = [f"{scheme}://127.0.0.1:{p}" for p in ports]
        spills = [Path(tmp) / f"spill-{i}" for i in range(REPLICAS)]
        commands = [[str(binary), "serve", "--peers", ",".join(endpoints),
                     "--replica-index", str(i), "--token", admin, "--writer-token", writer,
                     "--reader-token", reader,
                     "--listen", f"127.0.0.1:{port}", "--http-listen", "127.0.0.1:0",
                     "--spill-url", spills[i].as_uri(), *extra] for i, port in enumerate(ports)]
        procs = [None] * REPLICAS
        logs = [Path(tmp) / f"replica-{i}.log" for i in range(REPLICAS)]
        running = Cluster(procs, endpoints, logs, admin, writer, reader, commands, spills)
        try:
            for i in range(REPLICAS):
                spills[i].mkdir()
                running.launch(i)
            running.wait_ready()
            yield running
        finally:
            procs = [proc for proc in procs if proc is not None]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = []
            for proc in procs:
                try:
                    codes.append(proc.wait(timeout=STOP_TIMEOUT_S))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes.append(proc.wait())
            tails = "\n".join(log.read_text(errors="replace")[-2000:] for log in logs if log.exists())
        assert codes == [0] * len(procs), f"replicas exited with {codes} after SIGTERM\n{tails}"


@pytest.fixture(scope="module")
def cluster():
    with replicas() as running:
        yield running


def fresh_link(prefix: str) -> str:
    return f"replicas/{prefix}-{secrets.token_hex(4)}"


def rows_of(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + n), pa.int64())})


def partition_owned_by(link: str, replica: int) -> int:
    return next(p for p in range(1000) if owner(link, p, REPLICAS) == replica)


def raw_action(endpoint: str, token: str, kind: str, body: bytes):
    with flight.FlightClient(endpoint) as client:
        results = client.do_action(flight.Action(kind, body), options(token.encode(), timeout=60))
        return [r.body.to_pybytes() for r in results]


def test_owner_reproduces_the_pinned_placement():
    # Pinned by the Rust tests (handoff_proto::placement) and docs/scale-out.md.
    assert [owner("demo/features", p, 3) for p in range(8)] == [0, 1, 1, 0, 2, 2, 0, 0]
    assert owner("x", 9, 1) == owner("x", 9, 0) == 0  # clamped to at least one replica
    assert owner("x", 2**64 - 1, 3) in range(3)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="64-bit"):
            owner("x", bad, 3)


def test_every_replica_answers_the_topology(cluster):
    for i, endpoint in enumerate(cluster.endpoints):
        answer = json.loads(b"".join(raw_action(endpoint, cluster.writer, "topology", b"")))
        assert answer == {"replicas": cluster.endpoints, "index": i}
        with HandoffClient(endpoint, cluster.writer) as client:
            assert client.topology() == (cluster.endpoints, i)


def test_a_client_that_does_not_route_is_told_the_owner(cluster):
    link = fresh_link("raw")
    with HandoffClient(cluster.endpoints[0], cluster.admin) as routed:
        routed.create(link)
    partition = partition_owned_by(link, 2)
    command = pb.PutPartition(link=link, partition=partition, attempt=1).SerializeToString()
    data = rows_of(10)
    with flight.FlightClient(cluster.endpoints[0]) as raw:
        # pyarrow has no Flight error for FAILED_PRECONDITION: it raises ArrowInvalid.
        with pytest.raises(pa.ArrowException) as refused:
            writer, _ = raw.do_put(flight.FlightDescriptor.for_command(command), data.schema,
                                   options(cluster.writer.encode(), timeout=60))
            writer.write_table(data)
            writer.close()
    message = str(refused.value)
    assert "precondition" in message.lower(), message
    assert f"partition {partition} of link '{link}' belongs to replica 2 ({cluster.endpoints[2]})" \
        in message, message
    assert "not to this replica 0" in message, message

    with HandoffClient(cluster.endpoints[1], cluster.writer) as client:
        # Refused before any data was taken: nothing staged anywhere.
        assert client.stats(link)["staged_partitions"] == 0
        # An append names no partition: the replica it reached keeps it.
        assert client.put(link, rows_of(7)) == 7
        stats = client.stats(link)
    assert stats["rows"] == 7
    assert [r["rows"] for r in stats["replicas"]] == [0, 7, 0]


def test_routing_client_writes_retries_commits_and_seals(cluster):
    # A name whose 12 partitions land on every replica (a random one misses one in ~2% of runs).
    link = next(name for name in (fresh_link("routed") for _ in count())
                if {owner(name, p, REPLICAS) for p in range(12)} == {0, 1, 2})
    # Connected to replica 1: create, commit, seal and stats must reach replica 0, and each
    # partition its owner, or the server refuses them.
    client = HandoffClient(cluster.endpoints[1], cluster.writer)
    try:
        client.create(link)
        winners, rows = [], {}
        for partition in range(12):
            n = 10 * (partition + 1)
            if partition % 3 == 0:
                # A task retry: the first attempt staged part of its rows and failed.
                client.put_partition(link, partition, 100 + partition, rows_of(n // 2))
            attempt = 200 + partition
            assert client.put_partition(link, partition, attempt, rows_of(n)) == n
            winners.append((partition, attempt))
            rows[partition] = n
        placed = [owner(link, p, REPLICAS) for p in range(12)]
        assert set(placed) == {0, 1, 2}, "the test wants partitions on every replica"
        # Only the owners that are not replica 1 needed a connection of their own.
        assert sorted(client._peers) == sorted({0} | set(placed) - {1})

        staged = client.stats(link)
        assert (staged["staged_partitions"], staged["partitions"]) == (12 + 4, 0)

        total = sum(rows.values())
        first = client.commit(link, winners)
        assert (first["committed"], first["rows"]) == (12, total), first
        # Committing the same decision again (a driver retrying its commit) changes nothing.
        again = client.commit(link, winners)
        assert (again["committed"], again["already"]) == (12, 12), again
        client.seal(link)

        stats = client.stats(link)
        assert (stats["state"], stats["rows"], stats["partitions"], stats["staged_partitions"]) \
            == ("sealed", total, 12, 0), stats
        for part in stats["replicas"]:
            mine = [p for p in range(12) if placed[p] == part["replica"]]
            assert part["endpoint"] == cluster.endpoints[part["replica"]]
            assert (part["state"], part["partitions"], part["rows"]) == \
                ("sealed", len(mine), sum(rows[p] for p in mine)), part
        assert [part["replica"] for part in stats["replicas"]] == [0, 1, 2]

        # The whole link, from replica 1: replica 0 lists every partition where it is held.
        assert client.published(link) == {p: (200 + p, rows[p]) for p in range(12)}
        assert link in client.links()
        with HandoffClient(cluster.endpoints[2], cluster.reader) as reader:
            table = reader.read_all(link)
        assert table.num_rows == total
        assert sorted(table.column("id").to_pylist()) == \
            sorted(i for n in rows.values() for i in range(n))
    finally:
        client.close()

    # Flight SQL through the real ADBC driver, at the planner: every replica's part counts.
    import adbc_driver_flightsql
    import adbc_driver_flightsql.dbapi as flightsql
    header = adbc_driver_flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value
    with flightsql.connect(cluster.endpoints[0],
                           db_kwargs={header: "Bearer " + cluster.reader}) as conn:
        with conn.cursor() as cur:
            cur.execute(f'SELECT count(*), sum(id) FROM "{link}"')
            assert cur.fetchone() == (total, sum(n * (n - 1) // 2 for n in rows.values()))

    # The CLI, given replica 2, routes its stat to the planner and prints every replica's part.
    out = subprocess.run([str(handoff_bin()), "stat", link, "--endpoint", cluster.endpoints[2],
                          "--token", cluster.writer], capture_output=True, text=True,
                         timeout=patience(60))
    assert out.returncode == 0, out.stderr
    for part in stats["replicas"]:
        line = (rf"^replica {part['replica']}\s+{part['rows']} rows in {part['partitions']} "
                rf"partitions?, .*, sealed \({re.escape(part['endpoint'])}\)$")
        assert re.search(line, out.stdout, re.M), (line, out.stdout)
    assert re.search(rf"^rows:\s+{total}$", out.stdout, re.M), out.stdout
    assert re.search(r"^state:\s+sealed$", out.stdout, re.M), out.stdout


def test_planner_actions_sent_elsewhere_are_refused(cluster):
    link = fresh_link("planner")
    partition = partition_owned_by(link, 2)
    with HandoffClient(cluster.endpoints[2], cluster.writer) as client:
        client.put_partition(link, partition, 1, rows_of(5))
    commit = pb.Commit(link=link, attempts=[pb.PartitionAttempt(partition=partition, attempt=1)])
    for kind, body in (("commit", commit.SerializeToString()), ("seal", link.encode())):
        with pytest.raises(pa.ArrowException) as refused:
            raw_action(cluster.endpoints[2], cluster.writer, kind, body)
        message = str(refused.value)
        assert "precondition" in message.lower(), message
        assert f"goes to the planner, replica 0 ({cluster.endpoints[0]})" in message, message
    with HandoffClient(cluster.endpoints[0], cluster.admin) as planner:
        stats = planner.stats(link)
        assert (stats["rows"], stats["staged_partitions"], stats["state"]) == (0, 1, "open")
        planner.abort(link)  # admin: every staged attempt, on every replica
        assert planner.stats(link)["staged_partitions"] == 0


def test_stats_schema_of_a_link_whose_rows_live_elsewhere(cluster):
    link = fresh_link("schema")
    partition = partition_owned_by(link, 2)
    with HandoffClient(cluster.endpoints[0], cluster.writer) as client:
        client.put_partition(link, partition, 1, rows_of(5))
        client.commit(link, [(partition, 1)])
        stats = client.seal(link)
    assert stats["rows"] == 5
    # As a single server reports it, though replica 0 holds none of the rows.
    assert stats["schema"] == ["id: Int64"], stats


def test_spark_sink_writes_over_replicas_exactly_once(cluster, tmp_path):
    """The Spark sink (the data source, pointed at replica 1, and the mapInArrow helper, at
    replica 2), with a task that fails mid-stream and is retried: each partition lands on its
    owner and the link holds every row once. Then the data source again with commit=task (each
    task commits its own partition at the planner, and the driver checks what was published
    with a whole-link read over the replicas).

    Spark runs in a process of its own: a JVM started here would outlive this test in the
    pytest process, with this test's environment, and test_spark.py's session would reuse it."""
    pytest.importorskip("pyspark")
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(
                   p for p in (str(REPO / "python"), os.environ.get("PYTHONPATH")) if p))
    java = "/usr/lib/jvm/java-17-openjdk-amd64"
    if "JAVA_HOME" not in env and Path(java).exists():
        env["JAVA_HOME"] = java
    for key in ("HANDOFF_ENDPOINT", "HANDOFF_TOKEN", "HANDOFF_LINK"):
        env.pop(key, None)
    data_source, helper, by_task = (fresh_link("spark"), fresh_link("spark-helper"),
                                    fresh_link("spark-task"))
    rows, partitions = 4000, 8
    done = subprocess.run(
        [sys.executable, "-c", SPARK_JOB, cluster.endpoints[1], cluster.endpoints[2],
         cluster.writer, data_source, helper, str(rows), str(partitions), str(tmp_path),
         by_task],
        env=env, capture_output=True, text=True, timeout=patience(300))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    assert "both failures injected" in done.stdout, done.stdout

    with HandoffClient(cluster.endpoints[1], cluster.writer) as client:
        for link in (data_source, helper, by_task):
            stats = client.stats(link)
            assert (stats["state"], stats["rows"], stats["partitions"],
                    stats["staged_partitions"]) == ("sealed", rows, partitions, 0), stats
            assert sum(part["rows"] for part in stats["replicas"]) == rows
            assert sum(part["partitions"] for part in stats["replicas"]) == partitions
            assert all(part["state"] == "sealed" for part in stats["replicas"]), stats
            # Partition ids are random per job (a high base + Spark's id), so which replica
            # holds how many is not known here; 8 miss a replica only rarely.
            # A whole-link read, from replica 1: every partition at its replica, every row once.
            with HandoffClient(cluster.endpoints[1], cluster.reader) as reader:
                ids = reader.read_all(link).column("id").to_pylist()
            assert sorted(ids) == list(range(rows)), link


# The Spark job of the test above: argv is the data source's endpoint, the helper's endpoint,
# the writer token, the two links, rows, partitions, a directory for the failure markers and
# the link written with commit=task.
SPARK_JOB = """
import sys
from pathlib import Path

from pyspark import TaskContext
from pyspark.sql import SparkSession

import handoff.spark

source_endpoint, helper_endpoint, token, data_source, helper = sys.argv[1:6]
rows, partitions, marker = int(sys.argv[6]), int(sys.argv[7]), Path(sys.argv[8]) / "failed-once"
by_task = sys.argv[9]


def failing_first_attempt(batches):
    # The first attempt of partition 5 fails after three batches, so Spark retries the task.
    context = TaskContext.get()
    fail = context.partitionId() == 5 and context.attemptNumber() == 0
    for index, batch in enumerate(batches):
        yield batch
        if fail and index == 2:
            marker.write_text("failed")
            raise RuntimeError("injected failure while the partition is streaming")


# local[2,4]: task retries happen in local mode.
spark = (SparkSession.builder.master("local[2,4]").appName("handoff-test-replicas")
         .config("spark.driver.host", "127.0.0.1")
         .config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.ui.enabled", "false")
         .config("spark.sql.execution.arrow.maxRecordsPerBatch", "100")
         .getOrCreate())
spark.sparkContext.setLogLevel("FATAL")
handoff.spark.register(spark)
df = spark.range(0, rows, numPartitions=partitions).mapInArrow(failing_first_attempt, "id long")
(df.write.format("handoff").option("link", data_source).option("endpoint", source_endpoint)
 .option("token", token).mode("append").save())
assert marker.exists(), "the injected failure did not happen"
# Spark 3.5's way, mapInArrow: the same routing inside the tasks.
marker.unlink()
assert handoff.spark.write(df, link=helper, endpoint=helper_endpoint, token=token) == rows
assert marker.exists(), "the injected failure did not happen"
# commit=task: each task commits at the planner; the driver checks with a whole-link read.
marker.unlink()
(df.write.format("handoff").option("link", by_task).option("endpoint", helper_endpoint)
 .option("token", token).option("commit", "task").mode("append").save())
assert marker.exists(), "the injected failure did not happen"
spark.stop()
print("both failures injected")
"""


# --- shard reads over replicas ------------------------------------------------------------------

SHARD_PARTS, SHARD_BATCH = 12, 7


def shard_table(partition: int, start: int) -> pa.Table:
    n = 6 + partition  # uneven parts; 138 rows in all, 19 batches of 7 and 5 rows over
    ids = pa.array(range(start, start + n), pa.int64())
    return pa.table({"id": ids, "half": pa.array([i / 2 for i in range(start, start + n)])})


def write_shard_link(client: HandoffClient, link: str, seal: bool = True) -> int:
    """12 partitions of 6..17 rows with unique ids, committed (and sealed); returns the rows."""
    start, attempts = 0, []
    for partition in range(SHARD_PARTS):
        start += client.put_partition(link, partition, 1, shard_table(partition, start))
        attempts.append((partition, 1))
    client.commit(link, attempts)
    if seal:
        client.seal(link)
    return start


@pytest.fixture(scope="module")
def shard_link(cluster):
    # A fixed name whose partitions land on every replica (the placement is deterministic).
    link = next(name for name in (f"replicas/shards-{i}" for i in count())
                if {owner(name, p, REPLICAS) for p in range(SHARD_PARTS)} == {0, 1, 2})
    with HandoffClient(cluster.endpoints[1], cluster.writer) as client:
        rows = write_shard_link(client, link)
        parts = [part["rows"] for part in client.stats(link)["replicas"]]
    assert sum(parts) == rows == 138 and all(parts), parts
    return link, rows


def batch_ids(batch) -> list:
    ids = batch.column(0).to_pylist() if isinstance(batch, pa.RecordBatch) else batch["id"].tolist()
    halves = (batch.column(1).to_pylist() if isinstance(batch, pa.RecordBatch)
              else batch["half"].tolist())
    assert halves == [i / 2 for i in ids], "columns cut at different rows"
    return ids


def read_ranks(clients, link: str, world: int, **kw) -> list:
    """Every rank's batches (as id lists), rank r through the client of replica r % 3."""
    return [[batch_ids(b) for b in clients[rank % REPLICAS].read_shard(ShardRequest(
        link, rank=rank, world_size=world, batch_rows=SHARD_BATCH, **kw))]
        for rank in range(world)]


def test_shard_reads_over_replicas(cluster, shard_link):
    link, rows = shard_link
    clients = [HandoffClient(e, cluster.reader) for e in cluster.endpoints]
    try:
        # The plan for one rank joins tail pieces of several replicas: the join is exercised.
        info = clients[2].shard_info(ShardRequest(link, batch_rows=SHARD_BATCH))
        plan = json.loads(info.app_metadata)["batches"]
        assert len(info.endpoints) == REPLICAS and any(len(pieces) > 2 for pieces in plan), plan

        for world in (1, 2, 3, 7):
            for shuffle in (False, True):
                for drop_last in (False, True):
                    case = dict(world=world, shuffle=shuffle, drop_last=drop_last)
                    ranks = read_ranks(clients, link, world, shuffle=shuffle, drop_last=drop_last,
                                       seed=5, epoch=1)
                    per_round = SHARD_BATCH * world
                    want = rows // per_round if drop_last else -(-rows // per_round)
                    assert [len(r) for r in ranks] == [want] * world, case
                    assert all(len(b) == SHARD_BATCH for r in ranks for b in r), case
                    ids = [i for r in ranks for b in r for i in b]
                    if drop_last:
                        assert len(set(ids)) == len(ids) == want * per_round, case
                    else:
                        # Only the padding repeats: every id at least once.
                        assert set(ids) == set(range(rows)), case
                        assert len(ids) == want * per_round, case
                    if not shuffle:
                        assert ranks == read_ranks(clients, link, world, drop_last=drop_last), case

        # A filter (and a projection): the plan runs over the rows that pass, on every replica.
        passing = [i for i in range(rows) if i % 4 == 1]
        for world in (1, 3):
            ranks = read_ranks(clients, link, world, shuffle=True, seed=2, columns=["id", "half"],
                               filter="id % 4 = 1")
            want = -(-len(passing) // (SHARD_BATCH * world))
            assert [len(r) for r in ranks] == [want] * world, world
            assert set(i for r in ranks for b in r for i in b) == set(passing), world

        # The same (seed, epoch) gives the same order from whichever replica; another epoch,
        # another order.
        shuffled = dict(shuffle=True, seed=5)
        first = read_ranks(clients, link, 2, epoch=3, **shuffled)
        assert read_ranks(clients[1:] + clients[:1], link, 2, epoch=3, **shuffled) == first
        assert read_ranks(clients, link, 2, epoch=4, **shuffled) != first

        # Resume: start_batch skips exactly the batches already read.
        whole = read_ranks(clients, link, 1, epoch=3, **shuffled)[0]
        resumed = [batch_ids(b) for b in clients[2].read_shard(ShardRequest(
            link, batch_rows=SHARD_BATCH, epoch=3, start_batch=5, **shuffled))]
        assert resumed == whole[5:]

        # Stopping early ends the stream threads.
        threads = threading.active_count()
        stream = clients[1].read_shard(ShardRequest(link, batch_rows=SHARD_BATCH))
        assert len(next(stream)) == SHARD_BATCH
        assert threading.active_count() > threads
        stream.close()
        assert threading.active_count() == threads

        # What planning over replicas refuses.
        for request, code in ((ShardRequest(link, batch_rows=0), "invalid_argument"),
                              (ShardRequest(link, batch_rows=7, filter="no_such > 3"),
                               "invalid_argument"),
                              (ShardRequest(link, batch_rows=7, streaming=True,
                                            shuffle=False, start_batch=1),
                               "invalid_argument")):
            with pytest.raises(HandoffError) as refused:
                next(clients[0].read_shard(request))
            assert refused.value.code == code, refused.value
    finally:
        for client in clients:
            client.close()


def test_a_streaming_read_over_replicas_reads_rows_as_they_commit(cluster):
    link = next(name for name in (f"replicas/stream-{i}" for i in count())
                if {owner(name, p, REPLICAS) for p in range(SHARD_PARTS)} == {0, 1, 2})
    with HandoffClient(cluster.endpoints[0], cluster.admin) as admin:
        admin.create(link)
    world = 2
    results, errors = [None] * world, []
    readers = [HandoffClient(cluster.endpoints[rank + 1], cluster.reader) for rank in range(world)]

    def read(rank: int) -> None:
        try:
            results[rank] = [batch_ids(b) for b in readers[rank].read_shard(ShardRequest(
                link, rank=rank, world_size=world, batch_rows=SHARD_BATCH, streaming=True,
                shuffle=False))]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # Every rank reads from before the first write until the seal.
    threads = [threading.Thread(target=read, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    try:
        with HandoffClient(cluster.endpoints[2], cluster.writer) as writer:
            rows = write_shard_link(writer, link)
        for thread in threads:
            thread.join(timeout=patience(60))
        assert not errors, errors
        assert not any(thread.is_alive() for thread in threads)
    finally:
        for reader in readers:
            reader.close()
    assert len(results[0]) == len(results[1]), [len(r) for r in results]
    assert all(len(b) == SHARD_BATCH for r in results for b in r)
    assert set(i for r in results for b in r for i in b) == set(range(rows))


def test_torch_ranks_over_replicas(cluster, shard_link):
    pytest.importorskip("torch")
    from handoff.torch import HandoffDataset

    link, rows = shard_link
    world = 3

    def dataset(rank: int) -> HandoffDataset:
        # Each rank given another replica, as pods behind a Service would be.
        return HandoffDataset(link, batch_size=SHARD_BATCH, shuffle=True, seed=11, rank=rank,
                              world_size=world, endpoint=cluster.endpoints[(rank + 1) % REPLICAS],
                              token=cluster.reader, wait_link=0)

    ranks = [dataset(rank) for rank in range(world)]
    for ds in ranks:
        ds.set_epoch(2)
    epoch = [[batch_ids(b) for b in ds] for ds in ranks]
    want = -(-rows // (SHARD_BATCH * world))
    assert [len(r) for r in epoch] == [want] * world
    assert all(len(b) == SHARD_BATCH for r in epoch for b in r)
    assert set(i for r in epoch for b in r for i in b) == set(range(rows))
    with HandoffClient(cluster.endpoints[0], cluster.reader) as client:
        assert epoch == read_ranks([client] * REPLICAS, link, world, shuffle=True, seed=11, epoch=2)
    # len() asks the planner, from a rank given replica 2.
    assert len(ranks[1]) == want
    # A resume mid-epoch yields the rest of that epoch.
    ranks[1].load_state_dict({"epoch": 2, "batches": 2})
    assert [batch_ids(b) for b in ranks[1]] == epoch[1][2:]


def test_a_read_over_replicas_waits_for_the_seal(cluster):
    link = fresh_link("seal-wait")
    with HandoffClient(cluster.endpoints[2], cluster.writer) as writer, \
            HandoffClient(cluster.endpoints[1], cluster.reader) as reader:
        rows = write_shard_link(writer, link, seal=False)
        request = ShardRequest(link, batch_rows=SHARD_BATCH)
        # Past its deadline, the read says what it waited for.
        started = time.monotonic()
        with pytest.raises(HandoffError, match=r"not sealed on every replica yet.*waited 0.3 s "
                           r"for the seal") as late:
            next(reader.read_shard(request, wait_seal=0.3))
        assert late.value.code == "unavailable" and time.monotonic() - started < patience(10)
        # Sealed while it waits: it goes on.
        sealer = threading.Timer(0.5, writer.seal, args=(link,))
        sealer.start()
        try:
            ids = [i for b in reader.read_shard(request) for i in batch_ids(b)]
        finally:
            sealer.join()
    assert sorted(set(ids)) == list(range(rows))


def test_a_read_over_replicas_goes_on_when_a_replica_restarts_from_its_snapshot():
    """A replica SIGKILLed in the middle of a rank's read, and started again restoring its
    snapshot: the read goes on from the first row that replica had not sent, and yields exactly
    what an undisturbed read does; a read that starts while the replica is down waits for it.
    Started again without its snapshot, the read fails with DATA_LOSS saying how many rows are
    lost."""
    with replicas(extra=("--snapshot-on-seal",)) as c:
        link = fresh_link("resume")
        # 1 KiB rows, about 8 MiB per replica: more than the transport and the read-ahead hold,
        # so the crash breaks the replica's stream.
        attempts = []
        with HandoffClient(c.endpoints[0], c.writer) as writer:
            for partition in range(24):
                ids = pa.array(range(partition * 1000, (partition + 1) * 1000), pa.int64())
                pad = pa.array([bytes([partition]) * 1024] * 1000, pa.binary())
                writer.put_partition(link, partition, 0, pa.table({"id": ids, "pad": pad}))
                attempts.append((partition, 0))
            writer.commit(link, attempts)
            sealed = writer.seal(link)
        held = [part["rows"] for part in sealed["replicas"]]
        victim = max((1, 2), key=lambda r: held[r])
        assert held[victim] > 4000, held
        request = ShardRequest(link, batch_rows=500, columns=["id"])
        with HandoffClient(c.endpoints[0], c.reader) as reader:
            want = [b.column(0).to_pylist() for b in reader.read_shard(request)]
        assert sorted(i for b in want for i in b) == list(range(24000))
        request = ShardRequest(link, batch_rows=500)

        class NarrowWindow(HandoffClient):
            """gRPC grows a connection's receive window with its bandwidth estimate (9 MB
            arrived ahead of the reader under load); kept at its 64 KiB start, a replica's 8 MB
            part cannot arrive whole before the crash, so the crash lands mid-stream."""

            def _channel_options(self):
                return super()._channel_options() + [("grpc.http2.bdp_probe", 0)]

        def crash_midway(reader: HandoffClient, restore: bool):
            batches = reader.read_shard(request)
            got = [next(batches) for _ in range(3)]
            c.crash(victim)
            c.launch(victim, ["--restore-from", c.spills[victim].as_uri()] if restore else [])
            c.wait_ready()
            return got, batches

        with NarrowWindow(c.endpoints[0], c.reader) as reader:
            got, rest = crash_midway(reader, restore=True)
            got.extend(rest)
        assert all(b.num_rows == 500 for b in got)
        assert [b.column(0).to_pylist() for b in got] == want
        assert all(b.column(1).to_pylist() == [bytes([i // 1000]) * 1024 for i in
                                               b.column(0).to_pylist()] for b in got)
        # The restarted replica sent the rest: the read did go on there, not from a buffer.
        assert 0 < served_rows(c, victim) < held[victim], held

        # Down when the read starts, and back from its snapshot a second later: the read waits
        # for it (the planner cannot plan without it) and yields the same batches.
        restore = ["--restore-from", c.spills[victim].as_uri()]
        c.crash(victim)
        relaunch = threading.Timer(1.0, c.launch, args=(victim, restore))
        started = time.monotonic()
        relaunch.start()
        try:
            with HandoffClient(c.endpoints[0], c.reader) as reader:
                waited = [b.column(0).to_pylist() for b in reader.read_shard(request)]
        finally:
            relaunch.join()
        c.wait_ready()
        assert waited == want and time.monotonic() - started >= 1.0

        # Down for longer than the reader waits: it says so, and what it was told.
        c.crash(victim)
        with HandoffClient(c.endpoints[0], c.reader, resume_within=0.3) as reader:
            with pytest.raises(HandoffError, match=r"the planner could not plan this read "
                               r"within 0.3 s: .*unreachable") as down:
                next(reader.read_shard(request))
        assert down.value.code == "unavailable"
        c.launch(victim, restore)
        c.wait_ready()

        with NarrowWindow(c.endpoints[0], c.reader) as reader:
            got, rest = crash_midway(reader, restore=False)
            with pytest.raises(HandoffError, match=r"broke off this read after \d+ of its \d+ "
                               r"rows and came back without link .* rows of this rank's shard "
                               r"are lost") as lost:
                got.extend(rest)
        assert lost.value.code == "data_loss"


def test_skipping_drops_the_rows_received_from_a_ranges_read():
    from handoff.client import _skipping

    read = pb.ReadRanges(link="l", batch_rows=4, ranges=[
        pb.RowRange(start=0, rows=8), pb.RowRange(start=20, rows=4), pb.RowRange(start=40, rows=8)])

    def pairs(rows):
        return [(r.start, r.rows) for r in _skipping(read, rows).ranges]

    assert pairs(0) == [(0, 8), (20, 4), (40, 8)]
    assert pairs(3) == [(3, 5), (20, 4), (40, 8)]
    assert pairs(8) == [(20, 4), (40, 8)]
    assert pairs(13) == [(41, 7)]
    assert pairs(20) == pairs(1 << 70) == []
    assert _skipping(read, 3).link == "l" and _skipping(read, 3).batch_rows == 4


def served_rows(c: Cluster, i: int) -> float:
    """`handoff_served_rows_total` of replica `i`, from its /metrics."""
    line = next(m for m in map(READY_RE.match, c.logs[i].read_text().splitlines()) if m)
    url = f"http://{line.group(3)}:{line.group(4)}/metrics"
    with urllib.request.urlopen(url, timeout=patience(30)) as r:
        for text in r.read().decode().splitlines():
            if text.startswith("handoff_served_rows_total "):
                return float(text.split()[1])
    raise AssertionError(f"handoff_served_rows_total is not in {url}")


def test_tls_replicas_verify_each_other_and_clients_route_over_tls(tmp_path):
    """`--peers grpc+tls://...` with `--peer-ca`: replicas call each other over TLS, verified
    against the CA, and the Python client routes writes and reads to each over TLS."""
    certs = tmp_path / "certs"
    made = subprocess.run([str(handoff_bin()), "certs", str(certs), "--name", "127.0.0.1"],
                          capture_output=True, text=True, timeout=patience(60))
    assert made.returncode == 0, made.stderr
    tls = ["--tls-cert", str(certs / "tls.crt"), "--tls-key", str(certs / "tls.key"),
           "--peer-ca", str(certs / "ca.crt")]
    settings = TlsSettings(root_certs=(certs / "ca.crt").read_bytes())
    with replicas("grpc+tls", tls) as running:
        link = next(name for name in (f"replicas/tls-{i}" for i in count())
                    if {owner(name, p, REPLICAS) for p in range(SHARD_PARTS)} == {0, 1, 2})
        with HandoffClient(running.endpoints[2], running.writer, tls=settings) as client:
            assert client.topology()[0] == running.endpoints
            rows = write_shard_link(client, link)
            parts = [part["rows"] for part in client.stats(link)["replicas"]]
        assert sum(parts) == rows and all(parts), parts
        with HandoffClient(running.endpoints[0], running.reader, tls=settings) as reader:
            got = [batch_ids(b) for rank in range(2) for b in reader.read_shard(ShardRequest(
                link, rank=rank, world_size=2, batch_rows=SHARD_BATCH))]
        assert set(i for batch in got for i in batch) == set(range(rows))
        # A replica that does not trust the others' CA cannot plan with them: it says so.
        wrong = tmp_path / "other"
        made = subprocess.run([str(handoff_bin()), "certs", str(wrong), "--name", "127.0.0.1"],
                              capture_output=True, text=True, timeout=patience(60))
        assert made.returncode == 0, made.stderr
    with replicas("grpc+tls", tls[:4] + ["--peer-ca", str(wrong / "ca.crt")]) as running:
        with HandoffClient(running.endpoints[0], running.admin, tls=settings) as client:
            with pytest.raises(HandoffError) as refused:
                client.create("replicas/untrusted")
        text = str(refused.value)
        assert re.search(r"replica grpc\+tls://127\.0\.0\.1:\d+ \(connect to\) is unreachable "
                         r"from this replica", text), text
        assert "--peer-ca" in text and refused.value.code == "unavailable", text
        assert not isinstance(refused.value, ServerUnavailable), "the server itself answered"
