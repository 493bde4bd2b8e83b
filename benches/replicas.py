"""Aggregate read throughput of one link over 1, 2, 3 ... server replicas, each replica in its
own network namespace and capped at a share of a core (cgroup v1 `cpu.cfs_quota_us`), so that
on a small machine the servers, not the readers, are the bottleneck. Reports each replica
count's rate and its ratio to one replica under the same cap (issue 17).

    sudo python3 benches/replicas.py --bin target/dist/handoff [--replicas 1,2,3] [--cpu 0.25]
    sudo python3 benches/replicas.py --what import ...

`--what import` times a Parquet import at replica 0 instead (`import`, files spread over the
replicas by size, each replica decoding its share under its own cap), against one replica.
`--what streaming` times a streaming read: the ranks (`handoff get --streaming`) start before the
first write, partitions are written and committed one by one, and the time runs until every rank
has read the seal; ingest and reads share the caps.
`--what plan` times one rank's plan at the planner against the number of commits the link was
written in (`--commits`, one partition each, as Spark tasks commit): the first plan after the
planner restarts reads every applied commit record from object storage, later ones keep them.

Needs root (namespaces, a bridge, cgroups). The readers are `handoff get` processes, one per
rank, in the root namespace and not capped; they read every rank's shard at once, as the ranks
of one epoch do. Without root it says so and stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from benchkit import cpu_seconds, wide_rows  # noqa: E402

BRIDGE = "hbench0"
SUBNET = "10.88.0"
CGROUP = Path("/sys/fs/cgroup/cpu")
PORT = 8815


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def quiet(*args: str) -> None:
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Replicas:
    """n `handoff serve --peers` processes, replica i in namespace hb<i> at 10.88.0.<10+i>."""

    def __init__(self, binary: str, n: int, cpu: float, tmp: Path, extra=()):
        self.n = n
        self.addrs = [f"{SUBNET}.{10 + i}" for i in range(n)]
        self.peers = [f"grpc://{a}:{PORT}" for a in self.addrs]
        self.procs: list[subprocess.Popen] = []
        quiet("ip", "link", "add", BRIDGE, "type", "bridge")
        quiet("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, addr in enumerate(self.addrs):
            ns, veth = f"hb{i}", f"hbv{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            group = CGROUP / f"handoff-bench-r{i}"
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(str(int(cpu * 100000)))
            spill = tmp / f"r{i}"
            spill.mkdir()
            log = open(tmp / f"r{i}.log", "w")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, binary, "serve", "--no-auth",
                 "--listen", f"{addr}:{PORT}", "--http-listen", "127.0.0.1:0",
                 "--spill-url", f"file://{spill}", "--peers", ",".join(self.peers),
                 "--replica-index", str(i), *extra],
                stdout=subprocess.PIPE, stderr=log, text=True,
                env=dict(os.environ, RUST_LOG="warn"))
            # The cap holds from here on: loading and reading both run under it.
            (group / "cgroup.procs").write_text(str(proc.pid))
            line = proc.stdout.readline()
            if not line.startswith("handoff listening"):
                raise RuntimeError(f"replica {i} did not start: {line!r}; see {tmp}/r{i}.log")
            self.procs.append(proc)

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def restart_planner(self, tmp: Path) -> None:
        """SIGTERM replica 0 and start it again, restoring its snapshots: a planner with
        nothing in memory but what it restored."""
        proc = self.procs[0]
        proc.terminate()
        proc.wait(timeout=60)
        command = proc.args + ["--restore-from", f"file://{tmp / 'r0'}"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                stderr=open(tmp / "r0-again.log", "w"), text=True,
                                env=dict(os.environ, RUST_LOG="warn"))
        (CGROUP / "handoff-bench-r0" / "cgroup.procs").write_text(str(proc.pid))
        line = proc.stdout.readline()
        if not line.startswith("handoff listening"):
            raise RuntimeError(f"replica 0 did not start again: {line!r}; see {tmp}/r0-again.log")
        self.procs[0] = proc

    def planner_cpu(self) -> float:
        return cpu_seconds(self.procs[0].pid)

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for i in range(self.n):
            quiet("ip", "netns", "delete", f"hb{i}")
            group = CGROUP / f"handoff-bench-r{i}"
            if group.exists():
                quiet("rmdir", str(group))
        quiet("ip", "link", "delete", BRIDGE)


def load(endpoint: str, link: str, partitions: int, rows: int) -> int:
    from handoff.client import HandoffClient

    with HandoffClient(endpoint) as client:
        for p in range(partitions):
            client.put_partition(link, p, 0, wide_rows(p * rows, rows))
        client.commit(link, [(p, 0) for p in range(partitions)])
        return client.seal(link)["bytes"]


def figures(size: int, times: list, cpus: list) -> tuple:
    """MB/s and server CPU seconds per GiB, from the rounds' medians."""
    return (size / statistics.median(times) / 1e6,
            statistics.median(cpus) / (size / 2**30))


def parquet_files(directory: Path, files: int, rows: int) -> int:
    """`files` Parquet files of `rows` 1 KiB rows each (uncompressed, so that decoding, not
    decompression, is the work); returns the bytes of Arrow data they hold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir()
    size = 0
    for f in range(files):
        batch = wide_rows(f * rows, rows)
        size += batch.nbytes
        pq.write_table(pa.Table.from_batches([batch]), directory / f"part-{f:04}.parquet", compression="none")
    return size


def import_seconds(endpoint: str, link: str, url: str) -> float:
    """One import of every file at replica 0, committed; the wall seconds."""
    from handoff.client import HandoffClient

    with HandoffClient(endpoint) as client:
        started = time.perf_counter()
        client.import_parquet(link, url)
        elapsed = time.perf_counter() - started
        client.delete(link)
    return elapsed


def plan_ms(endpoint: str, link: str, world: int, batch_rows: int, calls: int = 20) -> float:
    """Median milliseconds of one rank's GetFlightInfo at replica 0: what planning costs."""
    import pyarrow.flight as flight
    from handoff._proto import handoff_pb2 as pb

    client = flight.connect(endpoint)
    shard = pb.ReadShard(link=link, rank=0, world_size=world, batch_rows=batch_rows)
    descriptor = flight.FlightDescriptor.for_command(shard.SerializeToString())
    took = []
    for _ in range(calls):
        started = time.perf_counter()
        client.get_flight_info(descriptor)
        took.append((time.perf_counter() - started) * 1000)
    client.close()
    return statistics.median(took)


def read(binary: str, endpoint: str, link: str, world: int, batch_rows: int, tmp: Path) -> float:
    """Every rank's shard at once, each by one `handoff get`; returns the wall seconds."""
    started = time.perf_counter()
    procs = [subprocess.Popen(
        [binary, "get", "--link", link, "--endpoint", endpoint, "--rank", str(r), "--world-size", str(world),
         "--batch-rows", str(batch_rows), "--quiet", "--format", "arrow",
         "--out", str(tmp / f"rank{r}.arrow")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for r, proc in enumerate(procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"rank {r}: {err.strip()}")
    elapsed = time.perf_counter() - started
    for r in range(world):
        (tmp / f"rank{r}.arrow").unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/dist/handoff")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure")
    parser.add_argument("--cpu", type=float, default=0.25, help="cores each replica may use")
    parser.add_argument("--partitions", type=int, default=24)
    parser.add_argument("--rows", type=int, default=8192, help="1 KiB rows per partition")
    parser.add_argument("--world", type=int, default=4, help="ranks reading at once")
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--what", choices=["read", "import", "streaming", "plan"],
                        default="read")
    parser.add_argument("--commits", default="10,100,1000",
                        help="plan: commit counts to measure")
    parser.add_argument("--writers", type=int, default=4,
                        help="streaming: tasks writing and committing at once")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not CGROUP.is_dir():
        print("needs root, iproute2 and cgroup v1's cpu controller; nothing measured")
        return 2
    binary = str(Path(args.bin).resolve())
    counts = [int(n) for n in args.replicas.split(",")]
    if args.what == "import":
        return bench_import(binary, counts, args)
    if args.what == "streaming":
        return bench_streaming(binary, counts, args)
    if args.what == "plan":
        return bench_plan(binary, max(counts), args)
    print(f"{args.partitions} partitions x {args.rows} rows of 1 KiB, {args.world} ranks, "
          f"batch_rows {args.batch_rows}, each replica capped at {args.cpu} core, "
          f"{args.rounds} rounds (median)")
    print(f"{'replicas':>8} {'MB/s':>8} {'x one':>6} {'server CPU s/GiB':>17} {'plan ms':>8}")
    base = None
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="handoff-replicas-") as tmp:
            tmp = Path(tmp)
            replicas = Replicas(binary, n, args.cpu, tmp)
            try:
                size = load(replicas.peers[0], "bench/features", args.partitions, args.rows)
                times, cpus = [], []
                for _ in range(args.rounds):
                    before = replicas.cpu()
                    times.append(read(binary, replicas.peers[0], "bench/features", args.world,
                                      args.batch_rows, tmp))
                    cpus.append(replicas.cpu() - before)
                planning = plan_ms(replicas.peers[0], "bench/features", args.world,
                                   args.batch_rows)
            finally:
                replicas.close()
        rate, cpu_per_gib = figures(size, times, cpus)
        base = base or rate
        print(f"{n:>8} {rate:>8.0f} {rate / base:>6.2f} {cpu_per_gib:>17.2f} {planning:>8.2f}",
              flush=True)
    return 0


def stream_seconds(binary: str, endpoint: str, link: str, args, tmp: Path) -> tuple:
    """Every rank reads as the partitions commit (each written and committed by its own task,
    `--writers` at once) until the seal; returns the bytes and the wall seconds from the first
    write to the last rank's end."""
    from handoff.client import HandoffClient

    with HandoffClient(endpoint) as client:
        client.create(link)
        procs = [subprocess.Popen(
            [binary, "get", "--link", link, "--endpoint", endpoint, "--rank", str(r),
             "--world-size", str(args.world), "--batch-rows", str(args.batch_rows), "--streaming",
             "--quiet", "--format", "arrow", "--out", str(tmp / f"rank{r}.arrow")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for r in range(args.world)]
        batches = [wide_rows(p * args.rows, args.rows) for p in range(args.partitions)]

        def task(p: int) -> None:
            # One writer per task, as Spark's executors write and commit (commit=task).
            with HandoffClient(endpoint) as writer:
                writer.put_partition(link, p, 0, batches[p])
                writer.commit(link, [(p, 0)])

        started = time.perf_counter()
        with ThreadPoolExecutor(args.writers) as pool:
            list(pool.map(task, range(args.partitions)))
        size = client.seal(link)["bytes"]
        for r, proc in enumerate(procs):
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"rank {r}: {err.strip()}")
        elapsed = time.perf_counter() - started
        client.delete(link)
    for r in range(args.world):
        (tmp / f"rank{r}.arrow").unlink()
    return size, elapsed


def bench_streaming(binary: str, counts: list, args) -> int:
    print(f"streaming read of {args.partitions} partitions x {args.rows} rows of 1 KiB "
          f"({args.writers} writing at once), {args.world} ranks, batch_rows "
          f"{args.batch_rows}, each replica capped at {args.cpu} core, {args.rounds} rounds "
          f"(median)")
    print(f"{'replicas':>8} {'MB/s':>8} {'x one':>6} {'server CPU s/GiB':>17} {'planner cores':>11}")
    base = None
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="handoff-replicas-") as tmp:
            tmp = Path(tmp)
            replicas = Replicas(binary, n, args.cpu, tmp)
            try:
                times, cpus, planner = [], [], []
                for r in range(args.rounds):
                    before, planner_before = replicas.cpu(), replicas.planner_cpu()
                    size, took = stream_seconds(binary, replicas.peers[0], f"bench/stream-{r}",
                                                args, tmp)
                    times.append(took)
                    cpus.append(replicas.cpu() - before)
                    planner.append((replicas.planner_cpu() - planner_before) / took)
            finally:
                replicas.close()
        rate, cpu_per_gib = figures(size, times, cpus)
        base = base or rate
        print(f"{n:>8} {rate:>8.0f} {rate / base:>6.2f} {cpu_per_gib:>17.2f} "
              f"{statistics.median(planner):>11.2f}", flush=True)
    return 0


def bench_plan(binary: str, n: int, args) -> int:
    from handoff.client import HandoffClient

    print(f"one rank's plan at the planner of {n} replicas (each capped at {args.cpu} core), "
          f"against the commits the link was written in; 100 rows each, world {args.world}")
    print(f"{'commits':>8} {'first plan ms':>14} {'later plans ms':>15} {'first / later':>14}")
    for commits in [int(c) for c in args.commits.split(",")]:
        with tempfile.TemporaryDirectory(prefix="handoff-replicas-") as tmp:
            tmp = Path(tmp)
            replicas = Replicas(binary, n, args.cpu, tmp, ["--snapshot-on-seal"])
            try:
                link = "bench/commits"
                with HandoffClient(replicas.peers[0]) as client:
                    for p in range(commits):
                        client.put_partition(link, p, 0, wide_rows(p * 100, 100))
                        client.commit(link, [(p, 0)])
                    client.seal(link)
                replicas.restart_planner(tmp)
                first = plan_ms(replicas.peers[0], link, args.world, 100, calls=1)
                later = plan_ms(replicas.peers[0], link, args.world, 100)
            finally:
                replicas.close()
        print(f"{commits:>8} {first:>14.1f} {later:>15.1f} {first / later:>14.1f}", flush=True)
    return 0


def bench_import(binary: str, counts: list, args) -> int:
    print(f"import of {args.partitions} Parquet files x {args.rows} rows of 1 KiB, each replica "
          f"capped at {args.cpu} core, {args.rounds} rounds (median)")
    print(f"{'replicas':>8} {'MB/s':>8} {'x one':>6} {'server CPU s/GiB':>17}")
    base = None
    with tempfile.TemporaryDirectory(prefix="handoff-import-") as files:
        files = Path(files)
        os.chmod(files, 0o755)
        size = parquet_files(files / "data", args.partitions, args.rows)
        url = f"file://{files}/data/"
        for n in counts:
            with tempfile.TemporaryDirectory(prefix="handoff-replicas-") as tmp:
                tmp = Path(tmp)
                replicas = Replicas(binary, n, args.cpu, tmp, ["--import-allow", url])
                try:
                    times, cpus = [], []
                    for r in range(args.rounds):
                        before = replicas.cpu()
                        times.append(import_seconds(replicas.peers[0], f"bench/import-{r}", url))
                        cpus.append(replicas.cpu() - before)
                finally:
                    replicas.close()
            rate, cpu_per_gib = figures(size, times, cpus)
            base = base or rate
            print(f"{n:>8} {rate:>8.0f} {rate / base:>6.2f} {cpu_per_gib:>17.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
