"""What the benchmark scripts read of a server process from /proc: memory is measured by the
kernel, never taken from the server's own counters."""

from __future__ import annotations

import os
from pathlib import Path

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
