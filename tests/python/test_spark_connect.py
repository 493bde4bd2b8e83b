"""The Spark sink from a Spark Connect client, against a real Spark Connect server and a real
`handoff serve`.

One Connect server per module: `spark-submit --class ...SparkConnectServer` in the foreground, on
a free port, master `local[2,3]` (2 threads, 3 attempts per task, so failed tasks are retried).
It runs as its own process with its own environment: no HANDOFF_* variables, and PYTHONPATH with
the package sources, standing for `handoff` installed in the Spark image. The test process is
only its client: this module starts no JVM in it, and the HANDOFF_* variables the tests set here
do not reach the server, where the data source's `writer()` and `commit()` run.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from shutil import copytree, ignore_patterns

import pytest

pyspark = pytest.importorskip("pyspark")
# The Spark Connect client's own requirements (pyspark[connect]; see requirements.txt).
for _module in ("grpc", "grpc_status", "google.rpc.status_pb2", "zstandard"):
    pytest.importorskip(_module)

from pyspark.errors import PySparkException  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

from conftest import REPO, eventually, make_certs, patience, serve_tls, stop_process  # noqa: E402
from handoff import HandoffClient, LinkNotFound, TlsSettings  # noqa: E402
from handoff.spark import HandoffTarget, register, write  # noqa: E402

JAVA_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"
SPARK_HOME = Path(pyspark.__file__).parent
CONNECT_SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
CONNECT_READY = re.compile(r"Spark Connect server started at: (\S+):(\d+)")
MAX_ATTEMPTS = 3


def connect_server_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HANDOFF_") and k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE")}
    if "JAVA_HOME" not in env and Path(JAVA_HOME).exists():
        env["JAVA_HOME"] = JAVA_HOME
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["PYSPARK_PYTHON"] = env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "python"), os.environ.get("PYTHONPATH")) if p)
    env["SPARK_CONNECT_MODE"] = "0"  # as sbin/start-connect-server.sh: this JVM is the server
    return env


@pytest.fixture(scope="module")
def connect_url(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("spark-connect") / "connect-server.log"
    conf = {
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": "0",  # the log line below names the port it took
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "4",
        # Small Arrow batches, so a partition is several batches and a failure lands mid-stream.
        "spark.sql.execution.arrow.maxRecordsPerBatch": "100",
    }
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--class", CONNECT_SERVER_CLASS,
           "--master", f"local[2,{MAX_ATTEMPTS}]", "--name", "handoff-test-connect"]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    with open(log_path, "wb") as log:
        # spark-submit execs the JVM, so proc is the server; its Python workers are its children.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=connect_server_env(), start_new_session=True)

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    def started():
        match = CONNECT_READY.search(log_path.read_text(errors="replace"))
        if match:
            return f"sc://{match.group(1)}:{match.group(2)}"
        assert proc.poll() is None, \
            f"the Spark Connect server exited with {proc.returncode}:\n{log_tail()}"
        return None

    try:
        yield eventually("the Spark Connect server is listening", started, timeout=180,
                         interval=0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=patience(60))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group, started above
            proc.wait()


@pytest.fixture(scope="module")
def spark(connect_url):
    """A Connect client session with the format registered the documented way."""
    session = SparkSession.builder.remote(connect_url).create()
    register(session)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def hc(server):
    with HandoffClient(server.location, server.admin_token.decode()) as c:
        yield c


@pytest.fixture
def client_env_elsewhere(monkeypatch):
    """The client's own HANDOFF_* variables point at nothing useful: only options count."""
    monkeypatch.setenv("HANDOFF_ENDPOINT", "grpc://127.0.0.1:9")
    monkeypatch.setenv("HANDOFF_TOKEN", "a-token-only-the-client-has")
    monkeypatch.setenv("HANDOFF_LINK", fresh_link("client-env"))
    return os.environ["HANDOFF_LINK"]


def fresh_link(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def ids_in(client: HandoffClient, link: str) -> list:
    return sorted(client.read_all(link).column("id").to_pylist())


def save(df, link: str, mode: str = "append", **options) -> None:
    writer = df.write.format("handoff").option("link", link).mode(mode)
    for key, value in options.items():
        writer = writer.option(key, value)
    writer.save()


def failure_text(excinfo) -> str:
    assert isinstance(excinfo.value, PySparkException), repr(excinfo.value)
    return str(excinfo.value)


def test_options_win_over_the_drivers_environment_and_the_source_is_kept(monkeypatch, tmp_path):
    # Without Spark: what the driver (the Connect server's) resolves from options and variables.
    monkeypatch.setenv("HANDOFF_LINK", "env-link")
    monkeypatch.setenv("HANDOFF_ENDPOINT", "grpc+tls://env-host:1")
    monkeypatch.setenv("HANDOFF_TOKEN", "env-token")
    monkeypatch.setenv("HANDOFF_TLS_CA_PEM", "-----BEGIN CERTIFICATE-----\nenv\n")
    pem = "-----BEGIN CERTIFICATE-----\noption\n"
    target = HandoffTarget.from_options({"link": "l", "endpoint": "grpc+tls://h:2", "token": "t",
                                         "tls_ca_pem": pem})
    assert (target.link, target.endpoint, target.token, target.tls.root_certs) == \
        ("l", "grpc+tls://h:2", "t", pem.encode())
    assert (target.endpoint_from, target.token_from) == ("option `endpoint`", "option `token`")

    from_env = HandoffTarget.from_options({})
    assert (from_env.link, from_env.endpoint, from_env.token) == \
        ("env-link", "grpc+tls://env-host:1", "env-token")
    assert from_env.tls.root_certs == b"-----BEGIN CERTIFICATE-----\nenv\n"
    assert from_env.endpoint_from.startswith("HANDOFF_ENDPOINT in the Spark driver's environment")
    assert from_env.token_from.startswith("HANDOFF_TOKEN in the Spark driver's environment")
    assert from_env == HandoffTarget.from_options({"link": "env-link"})  # sources do not compare

    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(pem)
    with pytest.raises(ValueError, match="`tls_ca`.*or `tls_ca_pem`.*not both"):
        HandoffTarget.from_options({"link": "l", "tls_ca": str(ca_file), "tls_ca_pem": pem})
    with pytest.raises(ValueError, match="`tls_ca_pem` is the CA's PEM text itself"):
        HandoffTarget.from_options({"link": "l", "tls_ca_pem": str(ca_file)})
    # A CA with a plain-text endpoint is refused here too, so the token never goes in clear.
    with pytest.raises(ValueError, match="plain"):
        HandoffTarget.from_options({"link": "l", "endpoint": "grpc://h:2", "tls_ca_pem": pem})


def test_connect_client_writes_a_link_exactly_once_with_options_only(
        spark, server, hc, client_env_elsewhere):
    link = fresh_link("connect")
    rows, partitions = 2000, 4
    df = spark.range(0, rows, numPartitions=partitions).selectExpr(
        "id", "id * 2 AS twice", "concat('row-', CAST(id AS STRING)) AS name",
        "array(CAST(id AS FLOAT), CAST(id AS FLOAT) / 2) AS emb")
    save(df, link, endpoint=server.location, token=server.writer_token.decode())

    table = hc.read_all(link).sort_by("id")
    assert table.column_names == ["id", "twice", "name", "emb"]
    assert table.to_pylist() == [
        {"id": i, "twice": 2 * i, "name": f"row-{i}", "emb": [float(i), i / 2]}
        for i in range(rows)]
    stats = hc.stats(link)
    assert (stats["state"], stats["rows"], stats["partitions"], stats["staged_partitions"]) == \
        ("sealed", rows, partitions, 0)
    with pytest.raises(LinkNotFound):  # the client's HANDOFF_LINK played no part
        hc.stats(client_env_elsewhere)


def test_a_connect_session_finds_the_installed_format_without_register(connect_url, server, hc):
    """With `handoff` in the server's Python, `pyspark_handoff` registers the format on the server
    for every session, as for classic sessions."""
    session = SparkSession.builder.remote(connect_url).create()
    link = fresh_link("connect-static")
    try:
        save(session.range(0, 300, numPartitions=2), link, endpoint=server.location,
             token=server.writer_token.decode())
    finally:
        session.stop()
    assert ids_in(hc, link) == list(range(300))
    assert hc.stats(link)["state"] == "sealed"


def metric(server, name: str) -> float:
    """One unlabelled counter or gauge from the server's /metrics."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=patience(30)) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


@pytest.mark.parametrize("route", ["data_source", "write_helper"])
def test_retried_tasks_are_written_exactly_once(spark, server, hc, tmp_path, route,
                                                client_env_elsewhere):
    link = fresh_link("connect-retry")
    hc.create(link)
    rows, partitions, failing = 4000, 4, 3
    location, admin = server.location, server.admin_token.decode()
    # Everything the server holds now belongs to earlier tests; beyond that and this link's own
    # bytes, what it holds during the job is in flight.
    held_before = hc.stats(link)["server_memory_used"]
    ingested_before = metric(server, "handoff_ingested_rows_total")
    broken_before = metric(server, "handoff_broken_puts_total")
    # The server is local, so its tasks can leave a mark here. These loops run in the Connect
    # server's Python workers, which cannot import conftest: their limits are computed here.
    marker = str(tmp_path / "failed.json")
    others_staged_s, in_flight_s = patience(60), patience(30)

    def fail_first_attempt_mid_stream(batches):
        import json
        import time

        import pyarrow as pa
        from pyspark import TaskContext

        from handoff import HandoffClient

        context = TaskContext.get()
        fail = context.partitionId() == failing and context.attemptNumber() == 0
        probe = HandoffClient(location, admin)
        if fail:  # let the other partitions finish, so that only this stream can be in flight
            deadline = time.monotonic() + others_staged_s
            while (probe.stats(link)["staged_partitions"] < partitions - 1
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        for index, batch in enumerate(batches):
            # Batches of ~200 KB get past Spark's socket buffers to the sink at once.
            yield batch.append_column("pad", pa.array(["x" * 2000] * batch.num_rows))
            if fail and index == 3:
                deadline = time.monotonic() + in_flight_s
                in_flight = 0
                while in_flight <= 0 and time.monotonic() < deadline:
                    stats = probe.stats(link)
                    in_flight = stats["server_memory_used"] - held_before - stats["memory_bytes"]
                    time.sleep(0.02)
                with open(marker, "w") as f:
                    json.dump({"attempt": context.taskAttemptId(), "in_flight_bytes": in_flight}, f)
                raise RuntimeError("injected failure of a first attempt, mid-stream")

    df = spark.range(0, rows, numPartitions=partitions).mapInArrow(
        fail_first_attempt_mid_stream, "id long, pad string")
    if route == "data_source":
        save(df, link, endpoint=server.location, token=server.writer_token.decode())
    else:
        # mapInArrow's tasks stage on the server's executors; the commit runs here, on the client.
        assert write(df, link=link, endpoint=server.location,
                     token=server.writer_token.decode()) == rows

    assert json.loads((tmp_path / "failed.json").read_text())["in_flight_bytes"] > 0, \
        "the failure did not hit while the failing attempt was streaming"
    # The failed attempt's rows reached the server: either its stream broke, or, as Spark ends
    # the sink's input cleanly when something before it in the task fails, it staged a cut-short
    # copy of the partition. Neither may show up.
    ingested = metric(server, "handoff_ingested_rows_total") - ingested_before
    broken = metric(server, "handoff_broken_puts_total") - broken_before
    assert ingested > rows or broken > 0, (ingested, broken)
    assert ids_in(hc, link) == list(range(rows))  # nothing lost, nothing twice
    stats = hc.stats(link)
    assert (stats["state"], stats["rows"], stats["partitions"], stats["staged_partitions"]) == \
        ("sealed", rows, partitions, 0)


def test_settings_come_from_options_not_from_the_client_environment(spark, server, hc, monkeypatch):
    # Right values, in the wrong place: the driver is the Connect server, which never sees them.
    link = fresh_link("connect-env")
    monkeypatch.setenv("HANDOFF_LINK", link)
    monkeypatch.setenv("HANDOFF_ENDPOINT", server.location)
    monkeypatch.setenv("HANDOFF_TOKEN", server.writer_token.decode())
    df = spark.range(0, 10, numPartitions=1)

    with pytest.raises(Exception) as no_link:
        df.write.format("handoff").mode("append").save()
    text = failure_text(no_link)
    assert "the handoff sink needs option `link`" in text
    assert "Connect server's: a client's environment does not reach it" in text

    # Nothing listens on the default endpoint here (grpc://127.0.0.1:8815).
    with pytest.raises(Exception) as no_endpoint:
        df.write.format("handoff").option("link", link).mode("append").save()
    text = failure_text(no_endpoint)
    assert "cannot reach the handoff server at grpc://127.0.0.1:8815" in text
    assert "neither option `endpoint` nor HANDOFF_ENDPOINT" in text
    assert 'pass .option("endpoint", "grpc://host:port")' in text

    with pytest.raises(Exception) as no_token:
        save(df, link, endpoint=server.location)
    text = failure_text(no_token)
    assert f"the handoff server at {server.location} refused a request without a token" in text
    assert "neither option `token` nor HANDOFF_TOKEN" in text

    with pytest.raises(LinkNotFound):  # the driver refused each before any task ran
        hc.stats(link)
    save(df, link, endpoint=server.location, token=server.writer_token.decode())
    assert ids_in(hc, link) == list(range(10))


def test_a_tls_ca_travels_as_an_option(spark, tmp_path):
    # `tls_ca` names a file on the driver, which a Connect client may not have; `tls_ca_pem`
    # carries the PEM itself in the plan.
    pki = make_certs(tmp_path / "pki")
    ca_pem = (pki / "ca.crt").read_text()
    proc, address, token = serve_tls(pki)
    try:
        endpoint = f"grpc+tls://{address}"
        link = fresh_link("connect-tls")
        save(spark.range(0, 500, numPartitions=2), link, endpoint=endpoint, token=token,
             tls_ca_pem=ca_pem)
        with HandoffClient(endpoint, token, tls=TlsSettings(root_certs=ca_pem.encode())) as client:
            assert ids_in(client, link) == list(range(500))
            assert client.stats(link)["state"] == "sealed"
        with pytest.raises(Exception) as path_given:
            save(spark.range(0, 10), fresh_link("connect-tls"), endpoint=endpoint, token=token,
                 tls_ca_pem=str(pki / "ca.crt"))
        assert "option `tls_ca_pem` is the CA's PEM text itself" in failure_text(path_given)
    finally:
        stop_process(proc)


def test_a_zipped_package_shipped_with_add_artifacts(connect_url, server, hc, tmp_path,
                                                      monkeypatch):
    """`spark.addArtifacts(zip, pyfile=True)` puts a package on the Python path of the session's
    driver-side planner and tasks. The server here already has `handoff`, so ship a renamed copy,
    `handoff_shipped`, that exists nowhere on the server: its data source can only load from the
    artifact. (The sink's modules import each other relatively, so the copy is complete.)"""
    source = tmp_path / "src"
    copytree(REPO / "python" / "handoff", source / "handoff_shipped",
             ignore=ignore_patterns("__pycache__"))
    archive = tmp_path / "handoff_shipped.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((source / "handoff_shipped").rglob("*.py")):
            z.write(path, path.relative_to(source).as_posix())
    monkeypatch.syspath_prepend(str(source))
    try:
        shipped = importlib.import_module("handoff_shipped.spark")
        options = {"endpoint": server.location, "token": server.writer_token.decode()}

        # Without the artifact the server cannot load the class that `register` pickled.
        bare = SparkSession.builder.remote(connect_url).create()
        try:
            shipped.register(bare)
            with pytest.raises(Exception) as missing:
                save(bare.range(0, 10), fresh_link("connect-bare"), **options)
            assert "No module named 'handoff_shipped'" in failure_text(missing)
        finally:
            bare.stop()

        session = SparkSession.builder.remote(connect_url).create()
        link = fresh_link("connect-artifact")
        try:
            session.addArtifacts(str(archive), pyfile=True)
            shipped.register(session)
            save(session.range(0, 700, numPartitions=3), link, **options)
        finally:
            session.stop()
        assert ids_in(hc, link) == list(range(700))
        stats = hc.stats(link)
        assert (stats["state"], stats["partitions"], stats["staged_partitions"]) == ("sealed", 3, 0)
    finally:
        for name in [m for m in sys.modules
                     if m == "handoff_shipped" or m.startswith("handoff_shipped.")]:
            del sys.modules[name]
