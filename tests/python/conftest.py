"""Fixtures for the pyarrow interop suite: one `handoff serve` subprocess per test module.

The binary comes from $HANDOFF_BIN (default: <repo>/target/debug/handoff). The server is started
with random admin/writer/reader tokens on ephemeral ports; readiness is the single stdout line
`handoff listening grpc=HOST:PORT http=HOST:PORT`.

Waiting: every timeout in this suite (subprocesses, process exits, thread joins, Flight call
deadlines, polling) goes through `patience(seconds)` or `eventually(...)` below. The numbers in the
tests are generous for a busy 2-core machine (2-4x slower than an idle one);
HANDOFF_TEST_TIMEOUT_SCALE multiplies all of them for slower machines still. Numbers that are
behaviour of the server under test (`--drain-timeout 3`, a TTL of 1 s) are not scaled, unless the
test needs them to outlast the machine's slowness.
"""

from __future__ import annotations

import math
import os
import queue
import re
import secrets
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.flight as flight
import pytest

# --- waiting ------------------------------------------------------------------------------------


def _timeout_scale() -> float:
    raw = os.environ.get("HANDOFF_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise pytest.UsageError(
            f"HANDOFF_TEST_TIMEOUT_SCALE={raw!r}: must be a positive, finite number; it multiplies "
            "every timeout of the Python tests (e.g. 2 doubles them; unset means 1)")
    return scale


# How much more patient than the stated defaults the tests are: HANDOFF_TEST_TIMEOUT_SCALE (a
# positive number, default 1).
TIMEOUT_SCALE = _timeout_scale()


def patience(seconds: float) -> float:
    """The time to allow for something that takes well under `seconds` on a busy machine:
    `seconds` times HANDOFF_TEST_TIMEOUT_SCALE. Every timeout of the tests goes through here."""
    return seconds * TIMEOUT_SCALE


def eventually(what: str, predicate, timeout: float = 60.0, interval: float = 0.05):
    """Call `predicate` every `interval` seconds until it returns something truthy, and return that;
    fail with "timed out after N s waiting until {what}" once `patience(timeout)` seconds passed.

    For state that another thread or process changes asynchronously: poll it instead of sleeping
    and asserting once. Exceptions from `predicate` propagate (catch the expected ones inside).
    It raises AssertionError, so it works the same in helper threads."""
    __tracebackhide__ = True
    limit = patience(timeout)
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            last = "" if value is None or value is False else f" (last value: {value!r})"
            raise AssertionError(f"timed out after {limit:g} s waiting until {what}{last}")
        time.sleep(interval)


# --- servers ------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
READY_RE = re.compile(r"^handoff listening grpc=(\S+):(\d+) http=(\S+):(\d+)\s*$")
# Readiness (a debug build, small restores included) takes seconds at most.
READY_TIMEOUT_S = patience(60.0)
# On SIGTERM the server drains in-flight calls for up to --drain-timeout (default 30 s, a server
# setting, not scaled); then it needs a moment to stop.
SERVER_DRAIN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = SERVER_DRAIN_TIMEOUT_S + patience(30.0)


def handoff_bin() -> Path:
    return Path(os.environ.get("HANDOFF_BIN", REPO / "target" / "debug" / "handoff"))


@dataclass
class Server:
    proc: subprocess.Popen
    grpc_host: str
    grpc_port: int
    http_host: str
    http_port: int
    admin_token: bytes
    writer_token: bytes
    reader_token: bytes
    log_path: Path

    @property
    def location(self) -> str:
        return f"grpc://{self.grpc_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    def client(self) -> flight.FlightClient:
        return flight.FlightClient(self.location)

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])


def options(token: bytes | None, timeout: float = 120.0) -> flight.FlightCallOptions:
    """Call options with `authorization: Bearer <token>` (no header when token is None) and a
    deadline of `patience(timeout)` seconds."""
    headers = [] if token is None else [(b"authorization", b"Bearer " + token)]
    return flight.FlightCallOptions(timeout=patience(timeout), headers=headers)


def rpc_count(http_url: str, method: str, code: str = "ok") -> int:
    """`handoff_rpcs_total` for one Flight method and result code, from the server's /metrics. The
    server counts a DoGet when it starts streaming, so a rise shows that a read reached it."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=patience(30)) as r:
        text = r.read().decode()
    total = 0
    for line in text.splitlines():
        if (line.startswith("handoff_rpcs_total{") and f'method="{method}"' in line
                and f'code="{code}"' in line):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _pump(stream, lines: "queue.Queue[str | None]") -> None:
    # Keeps draining stdout after readiness so the server never blocks on a full pipe.
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode("utf-8", "replace"))
    lines.put(None)


def _start(log_dir: Path) -> Server:
    binary = handoff_bin()
    if not binary.exists():
        pytest.fail(
            f"handoff binary not found at {binary}: build it (cargo build) or set HANDOFF_BIN",
            pytrace=False,
        )
    admin, writer, reader = (secrets.token_hex(16).encode() for _ in range(3))
    log_path = log_dir / "handoff-serve.log"
    log = open(log_path, "wb")
    cmd = [
        str(binary), "serve",
        "--listen", "127.0.0.1:0",
        "--http-listen", "127.0.0.1:0",
        "--token", admin.decode(),
        "--writer-token", writer.decode(),
        "--reader-token", reader.decode(),
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    log.close()
    lines: "queue.Queue[str | None]" = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()

    deadline = time.monotonic() + READY_TIMEOUT_S
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.wait()
            pytest.fail(
                f"handoff did not print its readiness line within {READY_TIMEOUT_S:g} s; "
                f"stdout so far: {seen!r}\nstderr:\n{log_path.read_text(errors='replace')[-4000:]}",
                pytrace=False,
            )
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line is None:
            rc = proc.wait()
            pytest.fail(
                f"handoff exited with {rc} before becoming ready; stdout: {seen!r}\n"
                f"stderr:\n{log_path.read_text(errors='replace')[-4000:]}",
                pytrace=False,
            )
        seen.append(line)
        m = READY_RE.match(line.strip())
        if m:
            return Server(
                proc=proc,
                grpc_host=m.group(1),
                grpc_port=int(m.group(2)),
                http_host=m.group(3),
                http_port=int(m.group(4)),
                admin_token=admin,
                writer_token=writer,
                reader_token=reader,
                log_path=log_path,
            )


def _stop(server: Server) -> None:
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(
                f"handoff did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM\n{server.log_tail()}",
                pytrace=False,
            )
    if proc.returncode != 0:
        pytest.fail(
            f"handoff exited with code {proc.returncode} after SIGTERM (expected 0)\n{server.log_tail()}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="handoff-pytest-") as tmp:
        srv = _start(Path(tmp))
        try:
            yield srv
        finally:
            _stop(srv)


@pytest.fixture(scope="module")
def client(server):
    c = server.client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def admin(server):
    return options(server.admin_token)


@pytest.fixture(scope="module")
def writer(server):
    return options(server.writer_token)


@pytest.fixture(scope="module")
def reader(server):
    return options(server.reader_token)


def ready_line(proc: subprocess.Popen) -> str:
    """The first line `proc` prints on its (text) stdout: the readiness line, or "" if it exited
    first. Fails, and kills `proc`, if neither happens within READY_TIMEOUT_S."""
    box: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: box.put(proc.stdout.readline()), daemon=True).start()
    try:
        return box.get(timeout=READY_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args[0]} printed nothing within {READY_TIMEOUT_S:g} s", pytrace=False)


def start_plain_location(*args, env=None):
    """`handoff serve --no-auth` on free ports with extra flags; returns (process, grpc location, or
    None if it exited before becoming ready)."""
    proc = subprocess.Popen([str(handoff_bin()), "serve", "--no-auth", "--listen", "127.0.0.1:0",
                             "--http-listen", "127.0.0.1:0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    m = re.match(r"handoff listening grpc=(\S+)", ready_line(proc))
    if not m:
        proc.wait(timeout=patience(30))
        return proc, None
    return proc, f"grpc://{m.group(1)}"


def start_plain(*args, env=None):
    """Like `start_plain_location`, with a connected client in place of the location."""
    proc, location = start_plain_location(*args, env=env)
    return proc, (flight.connect(location) if location else None)


# --- TLS ------------------------------------------------------------------------------------------


def make_certs(directory: Path, *extra: str) -> Path:
    """`handoff certs DIRECTORY`: ca.crt, tls.crt and tls.key (for localhost and 127.0.0.1)."""
    out = subprocess.run([str(handoff_bin()), "certs", str(directory), *extra],
                         capture_output=True, text=True, timeout=patience(30))
    assert out.returncode == 0, out.stderr
    assert "HANDOFF_TLS_CA" in out.stdout
    return directory


def serve_tls(pki: Path, *extra: str):
    """`handoff serve` with the certificate and key in `pki` and one admin token; returns
    (process, host:port, token)."""
    token = secrets.token_hex(16)
    # The log goes to a file: a pipe nobody reads would stall the server once full.
    log = tempfile.NamedTemporaryFile(prefix="handoff-tls-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(handoff_bin()), "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
         "--token", token, "--tls-cert", str(pki / "tls.crt"), "--tls-key", str(pki / "tls.key"),
         *extra],
        stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    m = re.match(r"handoff listening grpc=(\S+)", ready_line(proc))
    assert m, Path(log.name).read_text(errors="replace")[-4000:]
    return proc, m.group(1), token


def stop_process(proc):
    """SIGTERM, and a clean exit within a minute."""
    proc.terminate()
    assert proc.wait(timeout=patience(60)) == 0
