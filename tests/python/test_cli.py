"""The `handoff` command line and the HTTP endpoints, against the real binary."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.flight as flight
import pyarrow.parquet as pq

from conftest import eventually, handoff_bin, patience, ready_line, rpc_count


def run(server, *args, token=None, check=True):
    env = dict(os.environ, HANDOFF_ENDPOINT=server.location, HANDOFF_TOKEN=(token or server.admin_token).decode())
    proc = subprocess.run([str(handoff_bin()), *args], env=env, capture_output=True, text=True,
                          timeout=patience(120))
    if check:
        assert proc.returncode == 0, f"{args} failed: {proc.stderr}"
    return proc


def table(start, n):
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                     "x": pa.array([i * 0.5 for i in range(start, start + n)], pa.float64()),
                     "s": pa.array([f"r{i}" for i in range(start, start + n)])})


def test_put_every_format_then_get_all_and_shards(server, tmp_path):
    pq.write_table(table(0, 1000), tmp_path / "a.parquet")
    pacsv.write_csv(table(1000, 1000), tmp_path / "b.csv")
    feather.write_feather(table(2000, 1000), tmp_path / "c.arrow", compression="uncompressed")
    for name in ["a.parquet", "b.csv", "c.arrow"]:
        out = run(server, "put", "--link", "cli/t", str(tmp_path / name), "-q").stdout
        assert "put 1000 rows" in out
    assert "sealed" in run(server, "seal", "cli/t").stdout
    ls = run(server, "ls").stdout
    assert re.search(r"cli/t\s+sealed\s+3000", ls), ls
    stat = run(server, "stat", "cli/t", "--json").stdout
    assert '"rows": 3000' in stat and '"partitions": 3' in stat

    run(server, "get", "--link", "cli/t", "--out", str(tmp_path / "all.parquet"), "-q")
    assert sorted(pq.read_table(tmp_path / "all.parquet")["id"].to_pylist()) == list(range(3000))

    seen = []
    for rank in range(3):
        out = tmp_path / f"r{rank}.csv"
        run(server, "get", "--link", "cli/t", "--rank", str(rank), "--world-size", "3", "--batch-rows", "100",
            "--drop-last", "--shuffle", "--out", str(out), "-q")
        ids = pacsv.read_csv(out)["id"].to_pylist()
        assert len(ids) == 1000
        seen += ids
    assert sorted(seen) == list(range(3000))

    assert "deleted" in run(server, "rm", "cli/t").stdout
    missing = run(server, "stat", "cli/t", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_cli_errors_name_the_fix(server, tmp_path):
    bad = run(server, "ls", token=b"wrong", check=False)
    assert bad.returncode == 1 and "invalid bearer token" in bad.stderr
    (tmp_path / "x.bin").write_bytes(b"nothing known")
    unknown = run(server, "put", "--link", "l", str(tmp_path / "x.bin"), check=False)
    assert unknown.returncode == 1 and "--format" in unknown.stderr
    env = dict(os.environ, HANDOFF_ENDPOINT="grpc://127.0.0.1:1")
    down = subprocess.run([str(handoff_bin()), "ls"], env=env, capture_output=True, text=True,
                          timeout=patience(60))
    assert down.returncode == 1 and "is `handoff serve` running there?" in down.stderr
    noauth = subprocess.run([str(handoff_bin()), "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
                            env={k: v for k, v in os.environ.items() if not k.startswith("HANDOFF_")},
                            capture_output=True, text=True, timeout=patience(60))
    assert noauth.returncode == 1 and "--no-auth" in noauth.stderr


def http_get(server, path):
    try:
        with urllib.request.urlopen(f"{server.http_url}{path}", timeout=patience(30)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_ready_and_metrics(server):
    assert http_get(server, "/healthz")[0] == 200
    assert http_get(server, "/readyz") == (200, "ready\n")
    status, text = http_get(server, "/metrics")
    assert status == 200
    assert "handoff_memory_used_bytes" in text and "handoff_rpcs_total" in text


def readyz(http):
    """/readyz's status, or None once the server closed its HTTP port."""
    try:
        with urllib.request.urlopen(f"http://{http}/readyz", timeout=patience(5)) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None  # already closed


def test_sigterm_drains_then_stops(tmp_path):
    # --drain-timeout 3 is the behaviour under test: not scaled.
    proc = subprocess.Popen([str(handoff_bin()), "serve", "--no-auth", "--listen", "127.0.0.1:0",
                             "--http-listen", "127.0.0.1:0", "--drain-timeout", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        m = re.match(r"handoff listening grpc=(\S+) http=(\S+)", ready_line(proc))
        assert m, "no readiness line"
        grpc, http = m.groups()
        client = flight.connect(f"grpc://{grpc}")
        writer, _ = client.do_put(flight.FlightDescriptor.for_path("d"), table(0, 10).schema)
        writer.write_table(table(0, 10))
        writer.close()
        # A reader waiting for a seal that never comes keeps a call in flight.
        info = client.get_flight_info(flight.FlightDescriptor.for_path("d", "0", "1"))
        errors = []

        def read():
            try:
                flight.connect(f"grpc://{grpc}").do_get(info.endpoints[0].ticket).read_all()
            except Exception as e:  # the drain timeout closes it
                errors.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # The server counts a DoGet when its stream starts: from then on the call is in flight.
        eventually("the reader's DoGet is in flight on the server",
                   lambda: rpc_count(f"http://{http}", "do_get") >= 1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        eventually("SIGTERM makes /readyz answer 503 (or closes the HTTP port)",
                   lambda: readyz(http) in (503, None))
        assert proc.poll() is None, "still draining the in-flight call"
        assert proc.wait(timeout=patience(60)) == 0
        # Not scaled: at least the drain timeout, and well under the default of 30 s.
        assert 2.5 <= time.monotonic() - started < 30
        reader.join(timeout=patience(30))
    finally:
        if proc.poll() is None:
            proc.kill()
