"""Snapshots against a real S3 server (s3s-fs, which checks SigV4 signatures)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import STOP_TIMEOUT_S, eventually, handoff_bin, patience, start_plain, start_plain_location

ACCESS_KEY = "handoff-test"


def s3s_fs_bin() -> Path:
    path = os.environ.get("S3S_FS_BIN") or shutil.which("s3s-fs") or \
        str(Path.home() / ".cache/handoff-tools/s3s-fs/bin/s3s-fs")
    if not Path(path).exists():
        pytest.fail("s3s-fs not found: `cargo install s3s-fs@0.14.1 --features binary --root "
                    "~/.cache/handoff-tools/s3s-fs` (scripts/test.sh does this) or set S3S_FS_BIN", pytrace=False)
    return Path(path)


@pytest.fixture()
def s3(tmp_path):
    root = tmp_path / "s3"
    (root / "bucket").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = secrets.token_hex(16)
    proc = subprocess.Popen([str(s3s_fs_bin()), "--host", "127.0.0.1", "--port", str(port),
                             "--access-key", ACCESS_KEY, "--secret-key", secret, str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting():
        assert proc.poll() is None, f"s3s-fs exited with {proc.returncode} (is port {port} taken?)"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=patience(1)).close()
            return True
        except OSError:
            return False

    try:
        eventually("s3s-fs accepts connections", accepting, interval=0.1)
        yield {"port": port, "secret": secret, "root": root}
    finally:
        proc.terminate()
        proc.wait(timeout=patience(30))


def env_for(s3, secret=None):
    return dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=secret or s3["secret"],
                AWS_ENDPOINT=f"http://127.0.0.1:{s3['port']}", AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1")


def start(env, *args):
    return start_plain(*args, env=env)


def sample():
    n = 30_000
    return pa.table({"id": pa.array(range(n), pa.int64()),
                     "emb": pa.FixedSizeListArray.from_arrays(pa.array([i * 0.25 for i in range(n * 4)], pa.float32()), 4),
                     "split": ["train" if i % 5 else "test" for i in range(n)]})


def test_snapshot_to_s3_survives_sigkill(s3):
    url = "s3://bucket/handoff"
    table = sample()
    proc, client = start(env_for(s3), "--spill-url", url, "--snapshot-on-seal")
    try:
        writer, _ = client.do_put(flight.FlightDescriptor.for_path("team/feats"), table.schema)
        writer.write_table(table, max_chunksize=4_000)
        writer.close()
        list(client.do_action(flight.Action("seal", b"team/feats")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    objects = sorted(p.relative_to(s3["root"]).as_posix() for p in s3["root"].rglob("*") if p.is_file())
    # One path segment per link, so no link's files can land in another's directory.
    assert "bucket/handoff/links/team%2Ffeats/manifest.json" in objects, objects

    proc, client = start(env_for(s3), "--restore-from", url)
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_path("team/feats"))
        restored = pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints])
        assert restored.equals(table)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0


def test_wrong_secret_fails_clearly(s3):
    url = "s3://bucket/handoff"
    proc, client = start(env_for(s3, secret="wrong-secret"), "--spill-url", url)
    try:
        writer, _ = client.do_put(flight.FlightDescriptor.for_path("l"), sample().schema)
        writer.write_table(sample())
        writer.close()
        list(client.do_action(flight.Action("seal", b"l")))
        with pytest.raises(flight.FlightError) as err:
            list(client.do_action(flight.Action("snapshot", b"l")))
        assert "object storage failed" in str(err.value), str(err.value)
        # The link itself is untouched.
        stats = list(client.do_action(flight.Action("stats", b"l")))[0].body.to_pybytes()
        assert b'"rows":30000' in stats
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)

    proc, client = start(env_for(s3, secret="wrong-secret"), "--restore-from", url)
    assert client is None and proc.returncode == 1
    assert "restoring from s3://bucket/handoff failed" in proc.stderr.read()


def create_link(link: str, *, policy: int = 0, ttl_after_seal: int = 0) -> bytes:
    """A CreateLink message (fields 1, 7 and 9 of proto/handoff.proto), hand-encoded."""
    from test_interop import _str, _uint
    return _str(1, link) + _uint(7, policy) + _uint(9, ttl_after_seal)


MEMORY_POLICY_SPILL = 3


def feature_partition(first: int, rows: int = 4000) -> pa.Table:
    ids = pa.array(range(first, first + rows), pa.int64())
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array([float(i % 997) for i in range(rows * 64)], pa.float32()), 64)
    return pa.table({"id": ids, "emb": emb})


def spilled_objects(s3) -> list[str]:
    return sorted(p.name for p in (s3["root"] / "bucket").rglob("*.arrows") if "spill" in p.parts)


def test_spill_to_s3_reads_back_and_delete_and_ttl_remove_objects(s3):
    proc, client = start(env_for(s3), "--spill-url", "s3://bucket/handoff", "--memory-limit", "4MiB",
                         "--memory-policy", "spill")
    try:
        def fill(link, partitions=12):
            tables = [feature_partition(p * 4000) for p in range(partitions)]
            for table in tables:
                writer, _ = client.do_put(flight.FlightDescriptor.for_path(link), table.schema)
                writer.write_table(table, max_chunksize=1000)
                writer.close()
            return pa.concat_tables(tables)

        expected = fill("kept")
        stats = json.loads(list(client.do_action(flight.Action("stats", b"kept")))[0].body.to_pybytes())
        assert stats["spilled_partitions"] >= 8 and stats["server_memory_used"] <= 4 << 20, stats
        assert len(spilled_objects(s3)) == stats["spilled_partitions"]
        list(client.do_action(flight.Action("seal", b"kept")))
        info = client.get_flight_info(flight.FlightDescriptor.for_path("kept"))
        assert pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints]).equals(expected)

        list(client.do_action(flight.Action("delete", b"kept")))
        # Spilled objects are removed in the background once their last holder lets go.
        eventually("delete removes the spilled objects from the bucket", lambda: not spilled_objects(s3))

        # A link with a TTL after seal (1 s, not scaled: the behaviour under test): its spilled
        # objects go when it expires.
        list(client.do_action(flight.Action("create", create_link("brief", policy=MEMORY_POLICY_SPILL,
                                                                        ttl_after_seal=1))))
        fill("brief")
        assert spilled_objects(s3)
        list(client.do_action(flight.Action("seal", b"brief")))
        eventually("the TTL removes the spilled objects from the bucket", lambda: not spilled_objects(s3))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0


def test_spill_with_a_wrong_secret_fails_the_write_and_keeps_earlier_data(s3):
    proc, client = start(env_for(s3, secret="wrong-secret"), "--spill-url", "s3://bucket/handoff",
                         "--memory-limit", "4MiB", "--memory-policy", "spill")
    try:
        written = 0
        with pytest.raises(pa.ArrowException) as err:
            for p in range(12):
                table = feature_partition(p * 4000)
                writer, _ = client.do_put(flight.FlightDescriptor.for_path("l"), table.schema)
                writer.write_table(table)
                writer.close()
                written += table.num_rows
        assert "object storage failed" in str(err.value), str(err.value)
        stats = json.loads(list(client.do_action(flight.Action("stats", b"l")))[0].body.to_pybytes())
        assert stats["rows"] == written and written > 0 and stats["spilled_partitions"] == 0, stats
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)


def test_import_parquet_from_s3_fills_a_link_all_or_nothing(s3, tmp_path):
    """`handoff import` / DoAction import reads Parquet from the real S3 server in parallel."""
    import pyarrow.parquet as pq
    from handoff import HandoffClient, LinkNotFound

    table = sample()
    data = s3["root"] / "bucket" / "warehouse" / "features"
    data.mkdir(parents=True)
    for i, part in enumerate(table.to_batches(max_chunksize=7_500)):
        pq.write_table(pa.Table.from_batches([part]), data / f"part-{i:03d}.parquet")
    (data / "_SUCCESS").write_text("")  # what Spark leaves beside its files; not Parquet
    proc, location = start_plain_location("--import-allow", "s3://bucket/warehouse/", env=env_for(s3))
    try:
        client = HandoffClient(location)
        out = subprocess.run([str(handoff_bin()), "import", "--endpoint", location, "--link",
                              "imported", "s3://bucket/warehouse/features/*.parquet", "--seal",
                              "--json"], capture_output=True, text=True, env=env_for(s3),
                             timeout=patience(120))
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert (reply["files"], reply["rows"], reply["sealed"]) == (4, table.num_rows, True)
        got = client.read_all("imported").sort_by("id")
        assert got.equals(table.select(got.column_names)), "every row, every column"

        # A glob that matches nothing, and a file that is not Parquet: refused, nothing kept.
        out = subprocess.run([str(handoff_bin()), "import", "--endpoint", location, "--link",
                              "none", "s3://bucket/warehouse/nothing/*.parquet"],
                             capture_output=True, text=True, timeout=patience(60))
        assert out.returncode == 1 and "no .parquet files" in out.stderr, out.stderr
        # Outside --import-allow: refused before anything is read.
        out = subprocess.run([str(handoff_bin()), "import", "--endpoint", location, "--link",
                              "elsewhere", "s3://bucket/private/*.parquet"],
                             capture_output=True, text=True, timeout=patience(60))
        assert out.returncode == 1 and "not allowed" in out.stderr, out.stderr
        (data / "part-999.parquet").write_bytes(b"not parquet at all")
        with pytest.raises(Exception, match="(?i)parquet"):
            client.import_parquet("broken", "s3://bucket/warehouse/features/*.parquet")
        try:
            assert client.stats("broken")["rows"] == 0, "a failed import leaves nothing"
        except LinkNotFound:
            pass
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)
