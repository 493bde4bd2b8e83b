#!/usr/bin/env python3
"""The torch loader against a raw pyarrow DoGet of the same shard, on one warm server (issue 18).

Writes one sealed link of `--rows` rows: six float32 columns and a 16-float embedding as Spark
sends it (a list column whose rows all have 16 values). Then, per round, reads the whole shard
(rank 0 of 1, `--batch-rows`) twice, in turn:

- raw: pyarrow.flight do_get of the shard ticket, reading every chunk (no conversion);
- loader: iterating `HandoffDataset` (its prefetch thread, and every batch made into tensors).

It prints rows/s of each, round by round, and the loader's share of the raw rate (median over
rounds). The target is >= 90 %.

Usage:
  PYTHONPATH=python python3 benches/loader.py --bin target/release/handoff [--rows 2000000]
      [--batch-rows 1024] [--rounds 5]
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
from handoff.torch import HandoffDataset

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


def loader(endpoint: str, link: str, batch_rows: int) -> int:
    ds = HandoffDataset(link, batch_size=batch_rows, rank=0, world_size=1, endpoint=endpoint,
                        wait_link=0)
    return sum(len(batch["f0"]) for batch in ds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/handoff")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    proc, endpoint, _ = serve(args.bin)
    try:
        link = "bench/loader"
        with HandoffClient(endpoint) as client:
            step = 250_000
            for start in range(0, args.rows, step):
                client.put(link, table(start, min(step, args.rows - start)))
            client.seal(link)
        request = ShardRequest(link, batch_rows=args.batch_rows)
        raw(endpoint, request)  # warm
        loader(endpoint, link, args.batch_rows)
        ratios = []
        for r in range(args.rounds):
            started = time.perf_counter()
            rows = raw(endpoint, request)
            raw_rate = rows / (time.perf_counter() - started)
            started = time.perf_counter()
            got = loader(endpoint, link, args.batch_rows)
            loader_rate = got / (time.perf_counter() - started)
            assert rows == got >= args.rows, (rows, got)  # the last batch is padded whole
            ratios.append(loader_rate / raw_rate)
            print(f"round {r}: raw {raw_rate / 1e6:.2f} M rows/s, loader "
                  f"{loader_rate / 1e6:.2f} M rows/s, {100 * ratios[-1]:.1f} %", flush=True)
        print(f"loader / raw DoGet, median of {args.rounds}: {100 * statistics.median(ratios):.1f} %"
              f" (rows {args.rows}, batch_rows {args.batch_rows})")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
