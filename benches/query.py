"""Query measurements for docs/benchmarks.md, each a ratio against a peer in the same run:

1. reading 2 of 8 columns against reading all 8, through ReadShard;
2. Flight SQL `count(*)` and a filtered aggregate over 1M rows, through the ADBC driver;
3. `import` of Parquet files against pyarrow's `read_table` of the same files.

Usage: PYTHONPATH=python:benches python3 benches/query.py [--bin target/release/handoff] [--rows 1000000] [--reps 5]
Needs pyarrow, adbc-driver-flightsql and the handoff package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import adbc_driver_flightsql.dbapi as flightsql

from benchkit import serve
from handoff import HandoffClient
from handoff.client import ShardRequest


def median_seconds(fn, reps: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/release/handoff")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    # The Parquet files for `import`, which the server reads only from prefixes it is told.
    files = tempfile.TemporaryDirectory()
    server, location, _ = serve(args.bin, "--import-allow", f"file://{files.name}/")
    try:
        rng = np.random.default_rng(1)
        table = pa.table({f"c{i}": rng.random(args.rows) for i in range(8)})
        client = HandoffClient(location)
        for batch in table.to_batches(max_chunksize=65_536):
            client.put("bench", pa.Table.from_batches([batch]))
        client.seal("bench")

        def read(columns):
            def run():
                rows = sum(b.num_rows for b in client.read_shard(
                    ShardRequest(link="bench", columns=columns)))
                assert rows == args.rows
            return run

        full = median_seconds(read(()), args.reps)
        two = median_seconds(read(("c0", "c1")), args.reps)
        print(f"read 8 of 8 columns: {full * 1000:.1f} ms; 2 of 8: {two * 1000:.1f} ms; "
              f"ratio {two / full:.2f} (bytes ratio 0.25)")

        with flightsql.connect(location) as conn, conn.cursor() as cur:
            def sql(query):
                def run():
                    cur.execute(query)
                    cur.fetchall()
                return run
            count = median_seconds(sql("SELECT count(*) FROM bench"), args.reps)
            agg = median_seconds(sql("SELECT count(*), avg(c1) FROM bench WHERE c0 > 0.5"),
                                 args.reps)
        print(f"Flight SQL count(*) over {args.rows} rows: {count * 1000:.1f} ms; "
              f"filtered count+avg: {agg * 1000:.1f} ms")

        with files as tmp:
            for i, part in enumerate(table.to_batches(max_chunksize=args.rows // 8)):
                pq.write_table(pa.Table.from_batches([part]), Path(tmp) / f"part-{i}.parquet")
            url = f"file://{tmp}/*.parquet"
            counter = iter(range(1_000_000))

            def imported():
                reply = client.import_parquet(f"imported-{next(counter)}", url)
                assert reply["rows"] == args.rows, json.dumps(reply)

            def pyarrow_read():
                assert pq.read_table(tmp).num_rows == args.rows

            ours = median_seconds(imported, args.reps)
            theirs = median_seconds(pyarrow_read, args.reps)
        print(f"import of 8 Parquet files ({args.rows} rows x 8 float64): {ours * 1000:.1f} ms; "
              f"pyarrow read_table: {theirs * 1000:.1f} ms; ratio {ours / theirs:.2f}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
