"""Fixtures for the pyarrow interop suite: one `handoff serve` subprocess per test module.

The binary comes from $HANDOFF_BIN (default: <repo>/target/debug/handoff). The server is started
with random admin/writer/reader tokens on ephemeral ports; readiness is the single stdout line
`handoff listening grpc=HOST:PORT http=HOST:PORT`.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.flight as flight
import pytest

REPO = Path(__file__).resolve().parents[2]
READY_RE = re.compile(r"^handoff listening grpc=(\S+):(\d+) http=(\S+):(\d+)\s*$")
READY_TIMEOUT_S = 30.0
# The server drains in-flight calls for up to 30 s on SIGTERM; allow a little more.
STOP_TIMEOUT_S = 45.0


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
    """Call options with `authorization: Bearer <token>` (no header when token is None)."""
    headers = [] if token is None else [(b"authorization", b"Bearer " + token)]
    return flight.FlightCallOptions(timeout=timeout, headers=headers)


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
                f"handoff did not print its readiness line within {READY_TIMEOUT_S} s; "
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
                f"handoff did not exit within {STOP_TIMEOUT_S} s of SIGTERM\n{server.log_tail()}",
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


def start_plain_location(*args, env=None):
    """`handoff serve --no-auth` on free ports with extra flags; returns (process, grpc location, or
    None if it exited before becoming ready)."""
    proc = subprocess.Popen([str(handoff_bin()), "serve", "--no-auth", "--listen", "127.0.0.1:0",
                             "--http-listen", "127.0.0.1:0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    m = re.match(r"handoff listening grpc=(\S+)", line)
    if not m:
        proc.wait(timeout=30)
        return proc, None
    return proc, f"grpc://{m.group(1)}"


def start_plain(*args, env=None):
    """Like `start_plain_location`, with a connected client in place of the location."""
    proc, location = start_plain_location(*args, env=env)
    return proc, (flight.connect(location) if location else None)
