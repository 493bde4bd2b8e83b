"""Shuffled reads by W ranks: the server's CPU per epoch and its peak resident memory, from /proc.

For each binary given (for example today's build and an older one, as a peer in the same run),
starts `handoff serve --memory-limit`, writes one link of 1 KiB rows, seals it, and reads one
shuffled epoch with W = 2, 4 and 8 concurrent ranks (a fresh seed each time, so no epoch is
shared across runs). Between runs the process's peak (VmHWM) is reset through
/proc/<pid>/clear_refs, so each figure is that run's own peak. Server CPU is utime + stime from
/proc/<pid>/stat. Every run checks that the ranks together read every row exactly once.

Usage:
  PYTHONPATH=python python3 benches/shuffle_memory.py --bin target/debug/handoff \
      [--peer /path/to/older/handoff] [--link-mib 200] [--limit-mib 1024] [--ranks 2,4,8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from handoff import HandoffClient
from handoff.client import ShardRequest
from benchkit import cpu_seconds, reset_peak, run_ranks, serve, status_kib, wide_rows

MiB = 1 << 20
ROWS_PER_BATCH = 4096


def batch(start: int) -> pa.RecordBatch:
    return wide_rows(start, ROWS_PER_BATCH)


def write_link(location: str, link_mib: int) -> int:
    client = flight.connect(location)
    rows = link_mib * MiB // 1024 // ROWS_PER_BATCH * ROWS_PER_BATCH
    b = batch(0)
    for first in range(0, rows, 8 * ROWS_PER_BATCH):  # 32 MiB partitions
        writer, _ = client.do_put(flight.FlightDescriptor.for_path("s"), b.schema)
        for k in range(first, min(rows, first + 8 * ROWS_PER_BATCH), ROWS_PER_BATCH):
            writer.write_batch(batch(k))
        writer.close()
    list(client.do_action(flight.Action("seal", b"s")))
    return rows


def read_epoch(location: str, world: int, seed: int, rows: int) -> None:
    def rank(r: int) -> np.ndarray:
        request = ShardRequest("s", rank=r, world_size=world, batch_rows=1024, shuffle=True,
                               drop_last=True, seed=seed)
        return np.concatenate([b.column(0).to_numpy()
                               for b in HandoffClient(location).read_shard(request)])

    got = run_ranks(world, rank)
    every = np.sort(np.concatenate(list(got.values())))
    kept = rows // (world * 1024) * world * 1024
    assert len(every) == kept and len(np.unique(every)) == kept, "rows lost or repeated"


def measure(binary: str, link_mib: int, limit_mib: int, ranks: list[int]) -> list[dict]:
    with tempfile.TemporaryDirectory() as spill:
        proc, location, _ = serve(binary, "--memory-limit", f"{limit_mib}MiB",
                                  "--spill-url", f"file://{spill}")
        try:
            rows = write_link(location, link_mib)
            written_rss = status_kib(proc.pid, "VmRSS") * 1024
            out = []
            for i, world in enumerate(ranks):
                reset_peak(proc.pid)
                time.sleep(0.2)
                cpu = cpu_seconds(proc.pid)
                start = time.perf_counter()
                read_epoch(location, world, seed=100 + i, rows=rows)
                out.append({
                    "world": world,
                    "seconds": time.perf_counter() - start,
                    "cpu": cpu_seconds(proc.pid) - cpu,
                    "peak": status_kib(proc.pid, "VmHWM") * 1024,
                    "written_rss": written_rss,
                    "link": rows * 1024,
                })
            return out
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/handoff")
    parser.add_argument("--peer", help="another handoff binary to compare against")
    parser.add_argument("--link-mib", type=int, default=200)
    parser.add_argument("--limit-mib", type=int, default=1024)
    parser.add_argument("--ranks", default="2,4,8")
    args = parser.parse_args()
    ranks = [int(w) for w in args.ranks.split(",")]
    binaries = [("this build", args.bin)] + ([("peer", args.peer)] if args.peer else [])
    print(f"link {args.link_mib} MiB of 1 KiB rows, --memory-limit {args.limit_mib}MiB, "
          f"one shuffled epoch, batch_rows 1024")
    print("| binary | ranks | server CPU s | wall s | peak RSS MiB | peak / link bytes | peak / RSS after write |")
    print("|---|---|---|---|---|---|---|")
    for name, binary in binaries:
        for r in measure(binary, args.link_mib, args.limit_mib, ranks):
            print(f"| {name} | {r['world']} | {r['cpu']:.2f} | {r['seconds']:.2f} | "
                  f"{r['peak'] / MiB:.0f} | {r['peak'] / r['link']:.2f}x | "
                  f"{r['peak'] / r['written_rss']:.2f}x |")


if __name__ == "__main__":
    main()
