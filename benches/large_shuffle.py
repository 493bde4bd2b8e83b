"""A shuffled read of a spilled link many times the memory budget, measured from /proc (issue 13).

Starts `handoff serve --memory-limit L --memory-policy spill`, writes one link of 1 KiB rows
`--times` x L large (finished partitions spill as the budget fills), seals it, and reads two
shuffled epochs with `--ranks` concurrent ranks. Then it checks every shard guarantee:

- the ranks of one epoch read disjoint rows, and together every row (whole rounds, drop_last);
- every rank gets the same number of batches, each of exactly batch_rows;
- the two epochs give different orders, and a rank that reads its epoch again gets the same one.

With `--skewed`, the whole link is one DoPut: one partition `--times` x the budget, which under
`spill` goes to object storage as it arrives. It reports the peak while writing too, and the
server's peak resident memory during the reads (VmHWM, reset after the write)
against the bound 1.1 x budget + 150 MiB, and the server's CPU and wall time per epoch.

Usage:
  PYTHONPATH=python python3 benches/large_shuffle.py --bin target/release/handoff \
      [--limit-mib 512] [--times 10] [--ranks 2] [--batch-rows 1024] [--skewed]
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
from benchkit import WIDTH, cpu_seconds, reset_peak, run_ranks, serve, status_kib, wide_rows

MiB = 1 << 20
ROWS_PER_FRAME = 1024  # 1 MiB frames
FRAMES_PER_PARTITION = 16  # 16 MiB partitions: a task's output, spilled whole


def frame(start: int) -> pa.RecordBatch:
    return wide_rows(start, ROWS_PER_FRAME)


def write_link(location: str, total_mib: int, skewed: bool = False) -> int:
    """Partitions of FRAMES_PER_PARTITION frames, or with `skewed` the whole link in one DoPut
    (a skewed Spark partition: it streams to object storage as it arrives)."""
    client = flight.connect(location)
    rows = total_mib * MiB // 1024 // ROWS_PER_FRAME * ROWS_PER_FRAME
    schema = frame(0).schema
    per_partition = rows if skewed else FRAMES_PER_PARTITION * ROWS_PER_FRAME
    for first in range(0, rows, per_partition):
        writer, _ = client.do_put(flight.FlightDescriptor.for_path("big"), schema)
        for k in range(first, min(rows, first + per_partition), ROWS_PER_FRAME):
            writer.write_batch(frame(k))
        writer.close()
    list(client.do_action(flight.Action("seal", b"big")))
    return rows


def read_rank(location: str, rank: int, world: int, epoch: int, batch_rows: int) -> list[np.ndarray]:
    request = ShardRequest("big", rank=rank, world_size=world, batch_rows=batch_rows,
                           shuffle=True, drop_last=True, seed=7, epoch=epoch)
    out = []
    for b in HandoffClient(location).read_shard(request):
        ids = b.column(0).to_numpy()
        emb = b.column(1).values.to_numpy().reshape(-1, WIDTH)
        # Shuffled rows still carry their own values.
        assert np.array_equal(emb[:, 0], ids.astype(np.float32)), "a row was torn apart"
        out.append(ids.copy())
    return out


def read_epoch(location: str, world: int, epoch: int, batch_rows: int) -> dict[int, list]:
    return run_ranks(world, lambda r: read_rank(location, r, world, epoch, batch_rows))


def check_epoch(got: dict[int, list], rows: int, world: int, batch_rows: int) -> np.ndarray:
    counts = {r: len(batches) for r, batches in got.items()}
    assert len(set(counts.values())) == 1, f"ranks got different batch counts: {counts}"
    sizes = {len(b) for batches in got.values() for b in batches}
    assert sizes <= {batch_rows}, f"batches of {sizes} rows, not {batch_rows}"
    every = np.concatenate([np.concatenate(got[r]) for r in sorted(got)])
    kept = rows // (world * batch_rows) * world * batch_rows
    assert len(every) == kept, f"{len(every)} rows read, {kept} expected"
    assert len(np.unique(every)) == kept, "a row was read twice"
    return every


def run(binary: str, limit_mib: int = 512, times: int = 10, world: int = 2,
        batch_rows: int = 1024, skewed: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as spill:
        proc, location, _ = serve(binary, "--memory-limit", f"{limit_mib}MiB",
                                  "--memory-policy", "spill", "--spill-url", f"file://{spill}")
        try:
            start = time.perf_counter()
            rows = write_link(location, limit_mib * times, skewed)
            write_s = time.perf_counter() - start
            write_peak = status_kib(proc.pid, "VmHWM") * 1024
            reset_peak(proc.pid)
            time.sleep(0.2)
            epochs = []
            orders = []
            for epoch in (0, 1):
                cpu = cpu_seconds(proc.pid)
                start = time.perf_counter()
                got = read_epoch(location, world, epoch, batch_rows)
                epochs.append({"cpu": cpu_seconds(proc.pid) - cpu,
                               "seconds": time.perf_counter() - start})
                orders.append(check_epoch(got, rows, world, batch_rows))
            assert not np.array_equal(orders[0], orders[1]), "two epochs gave the same order"
            assert not np.array_equal(np.sort(orders[0]), orders[0]), "epoch 0 was not shuffled"
            again = np.concatenate(read_rank(location, 0, world, 1, batch_rows))
            assert np.array_equal(again, orders[1][:len(again)]), \
                "rank 0 read epoch 1 again in another order"
            peak = status_kib(proc.pid, "VmHWM") * 1024
            return {
                "rows": rows,
                "link": rows * 1024,
                "write_s": write_s,
                "epochs": epochs,
                "peak": peak,
                "write_peak": write_peak,
                "bound": 1.1 * limit_mib * MiB + 150 * MiB,
                "anon": status_kib(proc.pid, "RssAnon") * 1024,
                "file": status_kib(proc.pid, "RssFile") * 1024,
            }
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/handoff")
    parser.add_argument("--limit-mib", type=int, default=512)
    parser.add_argument("--times", type=int, default=10, help="link size as a multiple of the budget")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=1024)
    parser.add_argument("--skewed", action="store_true",
                        help="write the whole link as one partition (one DoPut)")
    args = parser.parse_args()
    r = run(args.bin, args.limit_mib, args.times, args.ranks, args.batch_rows, args.skewed)
    shape = "one partition" if args.skewed else f"{FRAMES_PER_PARTITION} MiB partitions"
    print(f"link {r['link'] / MiB:.0f} MiB ({r['rows']} rows of 1 KiB, {shape}) under "
          f"--memory-limit {args.limit_mib}MiB --memory-policy spill; written in "
          f"{r['write_s']:.1f} s, peak RSS while writing {r['write_peak'] / MiB:.0f} MiB")
    print("| epoch | ranks | server CPU s | wall s |")
    print("|---|---|---|---|")
    for i, e in enumerate(r["epochs"]):
        print(f"| {i} | {args.ranks} | {e['cpu']:.1f} | {e['seconds']:.1f} |")
    verdict = "within" if r["peak"] <= r["bound"] else "OVER"
    print(f"peak RSS during the reads {r['peak'] / MiB:.0f} MiB, {verdict} the bound "
          f"{r['bound'] / MiB:.0f} MiB (1.1 x budget + 150 MiB)")


if __name__ == "__main__":
    main()
