"""What the benchmark scripts share: starting `handoff serve`, and reading the server process
from /proc (memory is measured by the kernel, never taken from the server's own counters)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pyarrow as pa

T = TypeVar("T")
WIDTH = 254  # float32 values per row besides the int64 id: 1 KiB rows

TICKS = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """A field of /proc/<pid>/status in KiB, e.g. VmHWM (peak resident), RssAnon, RssFile."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """utime + stime. Fields after the command name (which may hold spaces): 14 and 15."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current resident size, so the next peak is one phase's own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def serve(binary: str, *args: str) -> tuple[subprocess.Popen, str, str]:
    """`handoff serve --no-auth` on free local ports with `args`; returns the process and its
    gRPC and HTTP locations."""
    proc = subprocess.Popen(
        [binary, "serve", "--no-auth", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, RUST_LOG="warn"))
    line = proc.stdout.readline()
    m = re.match(r"handoff listening grpc=(\S+) http=(\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"{binary} did not start: {line!r}")
    return proc, f"grpc://{m.group(1)}", m.group(2)


def wide_rows(start: int, count: int) -> pa.RecordBatch:
    """`count` rows of 1 KiB with ids from `start`; each row's embedding is derived from its id,
    so a reader can tell that a row travelled whole."""
    ids = np.arange(start, start + count, dtype=np.int64)
    emb = (ids[:, None] + np.arange(WIDTH)[None, :]).astype(np.float32)
    return pa.record_batch({
        "id": pa.array(ids),
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), WIDTH),
    })


def run_ranks(world: int, read: Callable[[int], T]) -> dict[int, T]:
    """`read(rank)` for every rank at once, on threads, as the ranks of one epoch read; the
    first error is raised."""
    got: dict[int, T] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            got[r] = read(r)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return got
