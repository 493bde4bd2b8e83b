"""Mixed load against one server under a memory budget, measured from /proc (issue 13).

Writers, readers (half of them shuffled), Flight SQL aggregations and Parquet imports run at
once for a fixed time against `handoff serve --memory-limit`, under each memory policy. Then:

- the server's peak resident memory (VmHWM) must stay within 1.1 x budget + 150 MiB;
- the only errors allowed are the policy's own: RESOURCE_EXHAUSTED under `reject`, wait
  timeouts under `wait` (and, for reads, RESOURCE_EXHAUSTED after their memory wait);
- every read of a sealed link returns exactly the rows its rank plan promises: the ranks of one
  epoch together read every committed row once (`drop_last`, so whole rounds only).

Usage:
  PYTHONPATH=python python3 benches/mixed_load.py --bin target/debug/handoff \\
      [--policy reject|wait|spill|all] [--seconds 60] [--writers 16] [--readers 64] \\
      [--limit-mib 512]
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from handoff import HandoffClient
from handoff.client import HandoffError, ShardRequest
from benchkit import serve, status_kib

MiB = 1 << 20
WIDTH = 126  # float32 values per row besides the int64 id: 512-byte rows
WORLD = 4
BATCH_ROWS = 512


def table(first: int, rows: int) -> pa.Table:
    ids = np.arange(first, first + rows, dtype=np.int64)
    emb = (ids[:, None] + np.arange(WIDTH)[None, :]).astype(np.float32)
    return pa.table({
        "id": pa.array(ids),
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), WIDTH),
    })


def allowed(policy: str, error: Exception) -> bool:
    """The policy's own refusals, which a client under load is expected to see."""
    text = str(error)
    if policy == "reject" and "memory limit reached" in text:
        return True
    if policy == "wait" and "waited" in text:
        return True
    # Reads wait a bound for memory under every policy, then refuse with the numbers.
    return "this read needs" in text


def discard(client: HandoffClient, link: str) -> None:
    """Delete what a refused write left, if anything."""
    try:
        client.delete(link)
    except HandoffError:
        pass


class Run:
    def __init__(self, location: str, policy: str, seed: int):
        self.location = location
        self.policy = policy
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.sealed: dict[str, int] = {}  # link -> committed rows (ids 0..rows)
        self.reading: collections.Counter = collections.Counter()
        self.counts: collections.Counter = collections.Counter()
        self.unexpected: list[str] = []
        self.stop = threading.Event()

    def note(self, what: str, error: Exception | None = None) -> None:
        with self.lock:
            self.counts[what] += 1
            if error is not None and not allowed(self.policy, error):
                self.unexpected.append(f"{what}: {error}")

    def pick(self) -> str | None:
        with self.lock:
            if not self.sealed:
                return None
            link = self.random.choice(sorted(self.sealed))
            self.reading[link] += 1
            return link

    def done_reading(self, link: str) -> None:
        with self.lock:
            self.reading[link] -= 1

    def writer(self, w: int) -> None:
        client = HandoffClient(self.location)
        n = 0
        while not self.stop.is_set():
            link = f"w{w}-{n}"
            n += 1
            rows = 0
            try:
                for _ in range(self.random.randint(1, 4)):
                    # Frames of 256 KiB to 8 MiB: large frames are part of the load.
                    frame = self.random.choice([512, 2048, 16384])
                    part = table(rows, frame * self.random.randint(1, 4))
                    client.put(link, pa.Table.from_batches(part.to_batches(max_chunksize=frame)))
                    rows += part.num_rows
                client.seal(link)
                with self.lock:
                    self.sealed[link] = rows
                self.note("write")
            except HandoffError as e:
                self.note("write refused", e)
                discard(client, link)
            self.retire()

    def retire(self) -> None:
        """Keep a few sealed links: delete the oldest that nobody is reading."""
        with self.lock:
            extra = len(self.sealed) - 24
            victims = [l for l in self.sealed if self.reading[l] == 0][:max(0, extra)]
            for link in victims:
                del self.sealed[link]
        client = HandoffClient(self.location)
        for link in victims:
            try:
                client.delete(link)
            except HandoffError as e:
                self.note("delete failed", e)

    def reader(self, r: int) -> None:
        client = HandoffClient(self.location)
        while not self.stop.is_set():
            link = self.pick()
            if link is None:
                time.sleep(0.05)
                continue
            try:
                rows = self.sealed_rows(link)
                shuffle = r % 2 == 0
                seed = self.random.randint(0, 3)
                got = []
                for rank in range(WORLD):
                    request = ShardRequest(link, rank=rank, world_size=WORLD, batch_rows=BATCH_ROWS,
                                           shuffle=shuffle, drop_last=True, seed=seed)
                    got.extend(b.column(0).to_numpy() for b in client.read_shard(request))
                ids = np.sort(np.concatenate(got)) if got else np.array([], dtype=np.int64)
                kept = rows // (WORLD * BATCH_ROWS) * WORLD * BATCH_ROWS
                if len(ids) != kept or len(np.unique(ids)) != kept or (kept and ids[-1] >= rows):
                    with self.lock:
                        self.unexpected.append(f"{link}: read {len(ids)} rows, expected {kept}")
                self.note("shuffled read" if shuffle else "read")
            except HandoffError as e:
                self.note("read refused", e)
            finally:
                self.done_reading(link)

    def sealed_rows(self, link: str) -> int:
        with self.lock:
            return self.sealed[link]

    def sql(self) -> None:
        import adbc_driver_flightsql.dbapi as flightsql
        warnings.filterwarnings("ignore", message="Cannot disable autocommit")
        with flightsql.connect(self.location) as conn:
            while not self.stop.is_set():
                link = self.pick()
                if link is None:
                    time.sleep(0.05)
                    continue
                try:
                    with conn.cursor() as cur:
                        cur.execute(f'SELECT count(*), sum(id), max(id) FROM "{link}"')
                        count, _, _ = cur.fetchone()
                    if count != self.sealed_rows(link):
                        with self.lock:
                            self.unexpected.append(f"SQL count of {link}: {count}")
                    self.note("sql")
                except Exception as e:  # the driver's own error types
                    self.note("sql refused", e)
                finally:
                    self.done_reading(link)

    def importer(self, parquet: Path) -> None:
        client = HandoffClient(self.location)
        rows = pq.read_metadata(parquet).num_rows
        n = 0
        while not self.stop.is_set():
            link = f"imp-{n}"
            n += 1
            try:
                client.import_parquet(link, parquet.as_uri(), seal=True)
                with self.lock:
                    self.sealed[link] = rows
                self.note("import")
            except HandoffError as e:
                self.note("import refused", e)
                discard(client, link)
            time.sleep(0.5)


def run(binary: str, policy: str, seconds: float, writers: int, readers: int,
        limit_mib: int, sql: bool = True, imports: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        parquet = Path(tmp) / "import.parquet"
        pq.write_table(table(0, 20_000), parquet)  # about 10 MiB of Arrow data
        proc, location, http = serve(
            binary, "--memory-limit", f"{limit_mib}MiB", "--memory-policy", policy,
            "--memory-wait-timeout", "20", "--spill-url", f"file://{tmp}/spill",
            "--import-allow", f"file://{tmp}/")
        state = Run(location, policy, seed=1)
        threads = [threading.Thread(target=state.writer, args=(w,)) for w in range(writers)]
        threads += [threading.Thread(target=state.reader, args=(r,)) for r in range(readers)]
        if sql:
            threads.append(threading.Thread(target=state.sql))
        if imports:
            threads.append(threading.Thread(target=state.importer, args=(parquet,)))
        idle = status_kib(proc.pid, "VmRSS") * 1024
        # The highest anonymous (heap) and file-backed (code, mapped files) resident memory seen,
        # sampled: VmHWM counts both, and a debug binary's code pages are not data.
        highs = {"RssAnon": 0, "RssFile": 0}

        def sample() -> None:
            while not state.stop.is_set():
                for key in highs:
                    highs[key] = max(highs[key], status_kib(proc.pid, key) * 1024)
                time.sleep(0.1)

        threads.append(threading.Thread(target=sample))
        try:
            for t in threads:
                t.start()
            time.sleep(seconds)
            state.stop.set()
            for t in threads:
                t.join(timeout=120)
            peak = status_kib(proc.pid, "VmHWM") * 1024
            metrics = urllib.request.urlopen(f"http://{http}/metrics", timeout=10).read()
            pool_peak = int(re.search(rb"handoff_memory_peak_bytes (\d+)", metrics).group(1))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        bound = 1.1 * limit_mib * MiB + 150 * MiB
        return {"policy": policy, "peak": peak, "bound": bound, "pool_peak": pool_peak, "idle": idle,
                "anon": highs["RssAnon"], "file": highs["RssFile"],
                "counts": dict(state.counts),
                "unexpected": state.unexpected}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/handoff")
    parser.add_argument("--policy", default="all")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--readers", type=int, default=64)
    parser.add_argument("--limit-mib", type=int, default=512)
    parser.add_argument("--no-sql", action="store_true", help="leave out the SQL client")
    parser.add_argument("--no-import", action="store_true", help="leave out the importer")
    args = parser.parse_args()
    policies = ["reject", "wait", "spill"] if args.policy == "all" else [args.policy]
    failed = False
    print("| policy | idle RSS MiB | peak RSS MiB | bound MiB | budget pool peak MiB | "
          "sampled peak anon / file MiB | operations | unexpected errors |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in policies:
        r = run(args.bin, policy, args.seconds, args.writers, args.readers, args.limit_mib,
                sql=not args.no_sql, imports=not args.no_import)
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
        print(f"| {policy} | {r['idle'] / MiB:.0f} | {r['peak'] / MiB:.0f} | {r['bound'] / MiB:.0f} | "
              f"{r['pool_peak'] / MiB:.0f} | {r['anon'] / MiB:.0f} / {r['file'] / MiB:.0f} | {ops} | "
              f"{len(r['unexpected'])} |")
        for line in r["unexpected"][:10]:
            print(f"    {line[:300]}")
        failed |= r["peak"] > r["bound"] or bool(r["unexpected"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
