"""The Spark sink (`handoff.spark`) against real PySpark and a real `handoff serve`.

One local SparkSession per module (`local[2,4]`: 2 threads, 4 attempts per task, so task retries
happen in local mode). Its JVM gets HANDOFF_ENDPOINT / HANDOFF_TOKEN (the module server, writer
token), so jobs that pass no endpoint or token exercise the environment fallback, and PYTHONPATH
with the package sources, which lays `pyspark_handoff` out as a regular install does (an editable
install's import hook is invisible to the `pkgutil.iter_modules` scan Spark registers with).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

pyspark = pytest.importorskip("pyspark")
from pyspark import TaskContext  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

import handoff.spark as handoff_spark  # noqa: E402
from conftest import (REPO, STOP_TIMEOUT_S, make_certs, patience, serve_tls,  # noqa: E402
                      start_plain_location, stop_process)
from handoff import HandoffClient, HandoffError, TlsSettings  # noqa: E402
from handoff.client import ShardRequest  # noqa: E402
from handoff.spark import HandoffTarget, HandoffWriter, register, write  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas")

JAVA_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"
SPARK_ENV_KEYS = ("JAVA_HOME", "SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON",
                  "PYTHONPATH", "HANDOFF_ENDPOINT", "HANDOFF_TOKEN", "HANDOFF_LINK")


def spark_env(base: dict) -> dict:
    env = dict(base)
    if "JAVA_HOME" not in env and Path(JAVA_HOME).exists():
        env["JAVA_HOME"] = JAVA_HOME
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["PYSPARK_PYTHON"] = env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "python"), base.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def spark(server):
    saved = {k: os.environ.get(k) for k in SPARK_ENV_KEYS}
    os.environ.update(spark_env(dict(os.environ)))
    os.environ["HANDOFF_ENDPOINT"] = server.location
    os.environ["HANDOFF_TOKEN"] = server.writer_token.decode()
    os.environ.pop("HANDOFF_LINK", None)
    session = (SparkSession.builder.master("local[2,4]")
               .appName("handoff-test-spark")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "4")
               # Small Arrow batches, so a partition is many batches and a failure can land mid-stream.
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "100")
               .getOrCreate())
    session.sparkContext.setLogLevel("FATAL")
    register(session)
    try:
        yield session
    finally:
        session.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def hc(server):
    with HandoffClient(server.location, server.admin_token.decode()) as c:
        yield c


def without_handoff_variables(env) -> dict:
    return {k: v for k, v in env.items() if not k.startswith("HANDOFF_")}


def fresh_link(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def ids_in(client: HandoffClient, link: str) -> list:
    return sorted(client.read_all(link).column("id").to_pylist())


def numbers(spark, start: int, end: int, partitions: int = 4):
    return spark.range(start, end, numPartitions=partitions).selectExpr("id", "id * 2 AS twice")


def save(df, link: str, mode: str = "append", **options) -> None:
    writer = df.write.format("handoff").option("link", link).mode(mode)
    for key, value in options.items():
        writer = writer.option(key, value)
    writer.save()


# --- options and the commit protocol, without Spark ---------------------------------------------


def test_options_fall_back_to_environment_and_are_validated(monkeypatch):
    monkeypatch.setenv("HANDOFF_LINK", "env-link")
    monkeypatch.setenv("HANDOFF_ENDPOINT", "10.0.0.1:8815")
    monkeypatch.setenv("HANDOFF_TOKEN", "env-token")
    from_env = HandoffTarget.from_options({})
    assert from_env == HandoffTarget(link="env-link", endpoint="grpc://10.0.0.1:8815",
                                     token="env-token", seal=True, commit="job")
    explicit = HandoffTarget.from_options({"link": "l", "endpoint": "grpc://h:1", "token": "t",
                                           "seal": "FALSE", "commit": "task"})
    assert explicit == HandoffTarget(link="l", endpoint="grpc://h:1", token="t", seal=False,
                                     commit="task")

    monkeypatch.delenv("HANDOFF_LINK")
    with pytest.raises(ValueError, match="option `link`.*HANDOFF_LINK"):
        HandoffTarget.from_options({"endpoint": "grpc://h:1"})
    with pytest.raises(ValueError, match="option `seal`"):
        HandoffTarget.from_options({"link": "l", "seal": "maybe"})
    with pytest.raises(ValueError, match="option `commit`"):
        HandoffTarget.from_options({"link": "l", "commit": "stage"})


class FakeTaskContext:
    """Stands in for pyspark's TaskContext: the attempt that `stage_task_output` sees next."""

    current = None

    @classmethod
    def get(cls):
        return cls.current

    def __init__(self, partition: int, attempt: int):
        self._partition, self._attempt = partition, attempt

    def partitionId(self) -> int:
        return self._partition

    def taskAttemptId(self) -> int:
        return self._attempt


def run_attempt(writer: HandoffWriter, partition: int, attempt: int, batches):
    FakeTaskContext.current = FakeTaskContext(partition, attempt)
    return writer.write(iter(batches))


def test_job_commit_publishes_the_winning_copy_and_abort_drops_only_its_own(server, hc, monkeypatch):
    monkeypatch.setattr(handoff_spark, "TaskContext", FakeTaskContext)
    link = fresh_link("speculative")
    target = HandoffTarget(link=link, endpoint=server.location, token=server.writer_token.decode(),
                           seal=False)
    batch = pa.record_batch([pa.array(range(50), pa.int64())], names=["id"])

    writer = HandoffWriter(target, overwrite=False)
    original = run_attempt(writer, 0, 7, [batch, batch])
    speculative = run_attempt(writer, 0, 9, [batch, batch])
    other = run_attempt(writer, 1, 8, [batch])
    assert (original.rows, speculative.rows, other.rows) == (100, 100, 50)
    assert original.partition == speculative.partition == writer.base
    # Spark hands the driver one message per partition: the copy that finished first.
    writer.commit([speculative, other])
    stats = hc.stats(link)
    assert (stats["rows"], stats["partitions"], stats["staged_partitions"]) == (150, 2, 0)
    assert stats["state"] == "open"

    failed_job = HandoffWriter(target, overwrite=False)
    staged = run_attempt(failed_job, 0, 21, [batch])
    hc.put_partition(link, 12345, 1, batch)  # another writer's staged attempt: not ours to drop
    failed_job.abort([staged, None])
    assert hc.stats(link)["staged_partitions"] == 1
    failed_job.abort([None])  # nothing of ours staged: must not become "abort everything"
    assert hc.stats(link)["staged_partitions"] == 1


def test_task_commit_lets_one_attempt_win_and_leaves_nothing_staged(server, hc, monkeypatch):
    monkeypatch.setattr(handoff_spark, "TaskContext", FakeTaskContext)
    link = fresh_link("task-race")
    target = HandoffTarget(link=link, endpoint=server.location, token=server.writer_token.decode(),
                           commit="task")
    writer = HandoffWriter(target, overwrite=False)
    batch = pa.record_batch([pa.array(range(40), pa.int64())], names=["id"])
    outcome = {}

    def slow_original():
        yield batch
        # A speculative copy stages and commits the same partition while this one is streaming.
        outcome["speculative"] = run_attempt(writer, 3, 2, [batch, batch])
        yield batch

    original = run_attempt(writer, 3, 1, slow_original())
    retry_after_commit = run_attempt(writer, 3, 5, [batch])
    assert outcome["speculative"].rows == 80
    # Each reports the rows it read, so the driver can check them against what was published.
    assert original.rows == 80 and retry_after_commit.rows == 40
    stats = hc.stats(link)
    assert (stats["rows"], stats["partitions"], stats["staged_partitions"]) == (80, 1, 0)

    assert hc.published(link) == {writer.base + 3: (2, 80)}
    # A successful attempt that read other rows than were published: said, and not sealed.
    with pytest.raises(HandoffError, match=r"partition \d+: Spark's successful attempt 5 read 40 rows, "
                                           "the link holds 80 .published by attempt 2."):
        writer.commit([retry_after_commit])
    assert hc.stats(link)["state"] == "open"
    writer.commit([outcome["speculative"]])  # the tasks published; the driver checks and seals
    stats = hc.stats(link)
    assert (stats["rows"], stats["state"]) == (80, "sealed")


# --- Spark jobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["data_source", "write_helper", "commit_task"])
def test_task_failing_mid_stream_is_retried_exactly_once(spark, tmp_path, route):
    """With commit=task, Spark ends the failing attempt's input early without an error, and that
    attempt publishes what it had: the driver finds the short partition and fails the job,
    naming it, instead of sealing a link with rows missing."""
    # A server of its own, so the bytes it holds beyond the link's are exactly the in-flight ones.
    proc, location = start_plain_location(env=without_handoff_variables(os.environ))
    assert location, "handoff serve --no-auth did not start"
    try:
        client = HandoffClient(location)
        link = fresh_link("retry")
        client.create(link)
        marker = tmp_path / "in-flight.json"
        rows, partitions, failing = 4000, 4, 3
        # These loops run in Spark's Python workers, which cannot import conftest (`eventually`):
        # their limits are computed here. Both are best effort: on timeout the task goes on, and
        # the assertions below tell whether the failure hit mid-stream.
        others_staged_s, in_flight_s = patience(60), patience(30)

        def fail_first_attempt_mid_stream(batches):
            context = TaskContext.get()
            fail = context.partitionId() == failing and context.attemptNumber() == 0
            probe = HandoffClient(location)
            if fail:  # let the other partitions finish, so only our stream can be in flight
                deadline = time.monotonic() + others_staged_s
                while (probe.stats(link)["staged_partitions"] < partitions - 1
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
            for index, batch in enumerate(batches):
                # Batches of ~200 KB get past Spark's 64 KB socket buffers to our writer at once.
                yield batch.append_column("pad", pa.array(["x" * 2000] * batch.num_rows))
                if fail and index == 3:
                    deadline = time.monotonic() + in_flight_s
                    in_flight = 0
                    while in_flight <= 0 and time.monotonic() < deadline:
                        stats = probe.stats(link)
                        in_flight = stats["server_memory_used"] - stats["memory_bytes"]
                        time.sleep(0.02)
                    marker.write_text(json.dumps({"in_flight_bytes": in_flight}))
                    raise RuntimeError("injected failure while the partition is streaming")

        df = spark.range(0, rows, numPartitions=partitions).mapInArrow(
            fail_first_attempt_mid_stream, "id long, pad string")
        if route == "commit_task":
            with pytest.raises(Exception, match=r"commit=task: link .* does not hold what Spark"):
                save(df, link, endpoint=location, commit="task")
            assert client.stats(link)["state"] == "open", "not sealed with rows missing"
            held = client.published(link)
            assert sum(r for _, r in held.values()) < rows, "the short partition is there"
            return
        if route == "data_source":
            save(df, link, endpoint=location)
        else:
            assert write(df, link=link, endpoint=location) == rows

        assert json.loads(marker.read_text())["in_flight_bytes"] > 0, \
            "the failure did not hit while the writer was streaming"
        assert ids_in(client, link) == list(range(rows))
        stats = client.stats(link)
        assert (stats["state"], stats["partitions"], stats["staged_partitions"]) == ("sealed", partitions, 0)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=STOP_TIMEOUT_S)


def test_append_twice_then_overwrite(spark, hc):
    link = fresh_link("modes")
    save(numbers(spark, 0, 1000), link, seal="false")
    save(numbers(spark, 1000, 1500, partitions=3), link, seal="false")
    stats = hc.stats(link)
    assert stats["state"] == "open"
    assert ids_in(hc, link) == list(range(1500))
    table = hc.read_all(link)
    assert table.column("twice").to_pylist() == [2 * i for i in table.column("id").to_pylist()]

    save(numbers(spark, 5000, 5300, partitions=2), link, mode="overwrite")
    assert ids_in(hc, link) == list(range(5000, 5300))
    assert hc.stats(link)["state"] == "sealed"

    with pytest.raises(Exception, match="is sealed"):
        save(numbers(spark, 0, 10), link)


def test_the_sink_writes_over_tls_with_the_ca_from_the_driver(spark, tmp_path):
    # The CA file exists only on the driver (option `tls_ca`): the tasks get its PEM inside the
    # pickled target, as executors on other machines would.
    pki = make_certs(tmp_path / "pki")
    proc, address, token = serve_tls(pki)
    try:
        endpoint = f"grpc+tls://{address}"
        link = fresh_link("tls")
        save(numbers(spark, 0, 500), link, endpoint=endpoint, token=token,
             tls_ca=str(pki / "ca.crt"))
        with HandoffClient(endpoint, token,
                           tls=TlsSettings(root_certs=(pki / "ca.crt").read_bytes())) as client:
            assert ids_in(client, link) == list(range(500))
            assert client.stats(link)["state"] == "sealed"
        # Without the CA the driver's check fails first, naming TLS and the CA.
        with pytest.raises(Exception, match="HANDOFF_TLS_CA"):
            save(numbers(spark, 0, 10), fresh_link("tls"), endpoint=endpoint, token=token)
    finally:
        stop_process(proc)


def test_empty_jobs_still_create_seal_and_overwrite(spark, hc):
    empty_new = fresh_link("empty")
    save(numbers(spark, 0, 0), empty_new)
    stats = hc.stats(empty_new)
    assert (stats["state"], stats["rows"]) == ("sealed", 0)

    emptied = fresh_link("emptied")
    save(numbers(spark, 0, 100), emptied, seal="false")
    save(numbers(spark, 0, 0), emptied, mode="overwrite")
    stats = hc.stats(emptied)
    assert (stats["state"], stats["rows"]) == ("sealed", 0)


def test_write_helper_appends_and_overwrites(spark, hc):
    link = fresh_link("helper")
    assert write(numbers(spark, 0, 700), link=link, seal=False) == 700
    assert write(numbers(spark, 700, 1000), link=link, seal=False) == 300
    assert hc.stats(link)["state"] == "open"
    assert ids_in(hc, link) == list(range(1000))
    assert write(numbers(spark, 0, 10), link=link, mode="overwrite") == 10
    assert ids_in(hc, link) == list(range(10))
    assert hc.stats(link)["state"] == "sealed"
    with pytest.raises(ValueError, match="mode"):
        write(numbers(spark, 0, 10), link=link, mode="ignore")


def test_task_commit_streams_rows_to_a_reader_before_the_job_ends(spark, server, hc):
    link = fresh_link("pipelined")
    hc.create(link)
    rows, batch_rows = 800, 50
    received = []  # (wall clock, ids)
    errors = []

    def read():
        try:
            with HandoffClient(server.location, server.reader_token.decode()) as reader:
                request = ShardRequest(link, batch_rows=batch_rows, streaming=True)
                for batch in reader.read_shard(request):
                    received.append((time.time(), batch.column("id").to_pylist()))
        except Exception as e:  # surfaced by the assertions below
            errors.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def slow(batches):
        time.sleep(1.5)  # two waves of two tasks: the first wave commits long before the job ends
        yield from batches

    df = spark.range(0, rows, numPartitions=4).mapInArrow(slow, "id long")
    save(df, link, commit="task")
    job_done = time.time()
    reader.join(timeout=patience(60))

    assert not errors, errors
    assert not reader.is_alive(), "the streaming reader did not finish at the seal"
    assert received, "the reader received nothing"
    assert received[0][0] < job_done - 0.5, "rows arrived only when the job ended"
    assert sorted(i for _, ids in received for i in ids) == list(range(rows))
    assert hc.stats(link)["state"] == "sealed"


def test_unreachable_endpoint_fails_the_job(spark):
    with pytest.raises(Exception, match="cannot reach the handoff server"):
        save(numbers(spark, 0, 10), fresh_link("unreachable"), endpoint="grpc://127.0.0.1:9")


def test_missing_link_is_named(spark):
    assert "HANDOFF_LINK" not in os.environ
    with pytest.raises(Exception, match="option `link`"):
        numbers(spark, 0, 10).write.format("handoff").mode("append").save()


def test_bad_token_is_reported(spark):
    with pytest.raises(Exception, match="refused the token.*invalid bearer token"):
        save(numbers(spark, 0, 10), fresh_link("badtoken"), token="not-a-token")


def test_invalid_options_and_modes_are_refused(spark):
    df = numbers(spark, 0, 10)
    with pytest.raises(Exception, match="option `commit`"):
        save(df, fresh_link("bad"), commit="sometimes")
    with pytest.raises(Exception, match="`task` cannot overwrite"):
        save(df, fresh_link("bad"), mode="overwrite", commit="task")
    # Spark itself refuses its default ErrorIfExists mode for every Python data source.
    with pytest.raises(Exception, match="UNSUPPORTED_DATA_SOURCE_SAVE_MODE"):
        df.write.format("handoff").option("link", fresh_link("bad")).save()


def test_format_is_known_without_register(spark, hc):
    """The `pyspark_handoff` module registers `handoff` statically: a session that never called
    `register` (new sessions do not inherit registrations) can still write."""
    unregistered = spark.newSession()
    link = fresh_link("static")
    unregistered.range(0, 300, numPartitions=2).write.format("handoff") \
        .option("link", link).mode("append").save()
    assert ids_in(hc, link) == list(range(300))


def test_scala_job_writes_through_the_same_format(server, hc, tmp_path):
    """A JVM job (spark-shell, Scala) finds the Python data source the same way."""
    shell = Path(pyspark.__file__).parent / "bin" / "spark-shell"
    link = fresh_link("scala")
    script = tmp_path / "write.scala"
    script.write_text(
        'spark.range(0, 500, 1, 3).selectExpr("id", "id * 2 AS twice")'
        f'.write.format("handoff").option("link", "{link}")'
        f'.option("endpoint", "{server.location}").option("token", "{server.writer_token.decode()}")'
        '.mode("append").save()\n'
        'println("HANDOFF_SCALA_WRITE_DONE")\n'
        "System.exit(0)\n")
    env = spark_env(without_handoff_variables(os.environ))
    done = subprocess.run(
        [str(shell), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
         "-i", str(script)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=patience(300))
    assert "HANDOFF_SCALA_WRITE_DONE" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert ids_in(hc, link) == list(range(500))
    assert hc.stats(link)["state"] == "sealed"
