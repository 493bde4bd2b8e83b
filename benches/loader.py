#!/usr/bin/env python3
"""The torch loader against a raw pyarrow DoGet of the same shard, on one warm server (issue 18).

Writes one sealed link of `--rows` rows: six float32 columns and a 16-float embedding as Spark
sends it (a list column whose rows all have 16 values). Then, per round, reads the whole shard
(rank 0 of 1, `--batch-rows`) four ways, in turn:

- raw: pyarrow.flight do_get of the shard ticket, one batch per message, reading every chunk
  (no conversion): what a pyarrow user of the shard writes;
- raw joined: the same with the ticket the loader sends (`batches_per_message`), the loader's
  own wire stream, read with no conversion;
- loader: iterating `HandoffDataset` (its prefetch thread, every batch made into tensors);
- loader 1/msg: the same with `batches_per_message=1`, as the loader read before joining.

It prints rows/s of each, round by round, and the loader's share of both raw rates (medians over
rounds). The target is >= 90 % of raw.

Usage:
  PYTHONPATH=python python3 benches/loader.py --bin target/release/handoff [--rows 2000000]
      [--batch-rows 1024] [--rounds 5] [--per-message 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from benchkit import serve
from handoff import HandoffClient
from handoff._proto import handoff_pb2 as pb
from handoff.client import ShardRequest
from handoff.torch import DEFAULT_BATCHES_PER_MESSAGE, HandoffDataset

EMBEDDING = 16


def table(start: int, count: int) -> pa.Table:
    rng = np.random.default_rng(start)
    columns = {f"f{i}": pa.array(rng.random(count, dtype=np.float32)) for i in range(6)}
    values = pa.array(rng.random(count * EMBEDDING, dtype=np.float32))
    offsets = pa.array(np.arange(0, (count + 1) * EMBEDDING, EMBEDDING, dtype=np.int32))
    columns["embedding"] = pa.ListArray.from_arrays(offsets, values)
    return pa.table(columns)


def raw(endpoint: str, request: ShardRequest) -> int:
    client = flight.FlightClient(endpoint)
    try:
        ticket = flight.Ticket(pb.Ticket(shard=request.message()).SerializeToString())
        reader = client.do_get(ticket)
        rows = 0
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return rows
            if chunk.data is not None:
                rows += chunk.data.num_rows
    finally:
        client.close()


def loader(endpoint: str, link: str, batch_rows: int, per_message: int) -> int:
    ds = HandoffDataset(link, batch_size=batch_rows, rank=0, world_size=1, endpoint=endpoint,
                        wait_link=0, batches_per_message=per_message)
    return sum(len(batch["f0"]) for batch in ds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/handoff")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-message", type=int, default=DEFAULT_BATCHES_PER_MESSAGE,
                        help="the loader's batches_per_message")
    args = parser.parse_args()
    proc, endpoint, _ = serve(args.bin)
    try:
        link = "bench/loader"
        with HandoffClient(endpoint) as client:
            step = 250_000
            for start in range(0, args.rows, step):
                client.put(link, table(start, min(step, args.rows - start)))
            client.seal(link)
        one = ShardRequest(link, batch_rows=args.batch_rows)
        joined = ShardRequest(link, batch_rows=args.batch_rows,
                              batches_per_message=args.per_message)
        ways = {
            "raw": lambda: raw(endpoint, one),
            "raw joined": lambda: raw(endpoint, joined),
            "loader": lambda: loader(endpoint, link, args.batch_rows, args.per_message),
            "loader 1/msg": lambda: loader(endpoint, link, args.batch_rows, 1),
        }
        for way in ways.values():  # warm
            way()
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.rounds):
            for name, way in ways.items():
                started = time.perf_counter()
                rows = way()
                rates[name].append(rows / (time.perf_counter() - started))
                assert rows >= args.rows, (name, rows)  # the last batch is padded whole
            print(f"round {r}: " + ", ".join(f"{name} {rates[name][-1] / 1e6:.2f}"
                                              for name in ways) + " M rows/s", flush=True)
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(", ".join(f"{name} {median[name] / 1e6:.2f}" for name in ways)
              + f" M rows/s (medians of {args.rounds}; rows {args.rows}, batch_rows "
              f"{args.batch_rows}, batches_per_message {args.per_message})")
        ratio = [statistics.median(l / r for l, r in zip(rates["loader"], rates[peer]))
                 for peer in ("raw", "raw joined")]
        old = statistics.median(l / r for l, r in zip(rates["loader 1/msg"], rates["raw"]))
        print(f"loader / raw DoGet: {100 * ratio[0]:.1f} %; loader / raw DoGet of its own "
              f"joined stream: {100 * ratio[1]:.1f} %; one batch per message: loader / raw "
              f"{100 * old:.1f} %")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
