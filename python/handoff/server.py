"""The `handoff` binary the wheel installs, and a local `handoff serve` for notebooks and scripts.

    from handoff.server import LocalServer
    with LocalServer(memory_limit="2GiB") as server:
        client = HandoffClient(server.endpoint, server.token)

The server runs as its own process, never as a thread of this one: DataLoader workers forked
from a process that runs a gRPC server hang (see `handoff.torch`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import threading
import time
from typing import List, Optional, Sequence

__all__ = ["binary", "LocalServer"]

_LISTENING = re.compile(r"handoff listening grpc=(\S+) http=(\S+)")


def binary() -> str:
    """The `handoff` executable: $HANDOFF_BIN, else the one installed with this package (the
    scripts directory of its environment, or the user's), else the first on PATH."""
    named = os.environ.get("HANDOFF_BIN", "").strip()
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            raise FileNotFoundError(f"HANDOFF_BIN={named!r} is not an executable file; fix or "
                                    "unset it")
        return named
    candidates = [sysconfig.get_path("scripts")]
    try:
        candidates.append(sysconfig.get_path("scripts", f"{os.name}_user"))
    except KeyError:
        pass
    for directory in candidates:
        path = os.path.join(directory, "handoff")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("handoff")
    if found:
        return found
    raise FileNotFoundError(
        "no `handoff` binary: `pip install ./python` builds one into the environment (it needs a "
        "Rust toolchain), or set HANDOFF_BIN to a binary you built")


class LocalServer:
    """`handoff serve` on 127.0.0.1 with free ports, stopped (drained by SIGTERM) on exit.

    Arguments:
        memory_limit: the server's memory budget, e.g. "2GiB".
        memory_policy: reject, wait or spill (spill needs `spill_url`).
        spill_url: where spilled partitions and snapshots go, e.g. "file:///tmp/handoff".
        token: the bearer token clients present; default a fresh random one (see `.token`).
        args: further `handoff serve` flags.
        start_timeout: seconds to wait for the server to listen.
    """

    def __init__(self, *, memory_limit: Optional[str] = None,
                 memory_policy: Optional[str] = None, spill_url: Optional[str] = None,
                 token: Optional[str] = None, args: Sequence[str] = (),
                 start_timeout: float = 30.0):
        self.token = token or secrets.token_hex(16)
        self._args: List[str] = ["serve", "--listen", "127.0.0.1:0",
                                 "--http-listen", "127.0.0.1:0"]
        if memory_limit:
            self._args += ["--memory-limit", memory_limit]
        if memory_policy:
            self._args += ["--memory-policy", memory_policy]
        if spill_url:
            self._args += ["--spill-url", spill_url]
        self._args += list(args)
        self._start_timeout = start_timeout
        self._proc: Optional[subprocess.Popen] = None
        self.endpoint = ""
        self.http = ""
        self.log = None

    def start(self) -> "LocalServer":
        if self._proc is not None:
            return self
        # The log goes to a file (a pipe nobody reads would stall the server once full); its
        # last line is the reason when the server does not start.
        self.log = tempfile.NamedTemporaryFile(prefix="handoff-serve-", suffix=".log",
                                               delete=False)
        proc = subprocess.Popen([binary(), *self._args], stdout=subprocess.PIPE,
                                stderr=self.log, text=True,
                                env=dict(os.environ, HANDOFF_TOKEN=self.token))
        line: List[str] = []

        def read() -> None:
            line.append(proc.stdout.readline())
            for _ in proc.stdout:  # keep the pipe drained
                pass

        threading.Thread(target=read, daemon=True, name="handoff-serve-stdout").start()
        deadline = time.monotonic() + self._start_timeout
        while not line and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        match = _LISTENING.match(line[0]) if line else None
        if match is None:
            exited = proc.poll()
            proc.kill()
            proc.wait()
            with open(self.log.name, errors="replace") as f:
                log = [text for text in f.read().splitlines() if text.strip()]
            what = (f"exited with code {exited}" if exited is not None
                    else f"did not listen within {self._start_timeout:g} s")
            # clap ends with a hint line; the error is the first line.
            why = log[0] if log else "no output"
            raise RuntimeError(f"handoff serve {what}: {why} (log: {self.log.name})")
        self._proc = proc
        self.endpoint = f"grpc://{match.group(1)}"
        self.http = f"http://{match.group(2)}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, which drains reads in flight, then SIGKILL after `timeout` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
