"""Short runs of the benchmark scripts that no other test runs, so that they keep working: each
runs whole, as docs/benchmarks.md tells a reader to, against the test binary, with small sizes.
What they measure is not asserted (a debug build on a busy machine), only that they run to the
end and print their result lines. (benches/mixed_load.py and benches/large_shuffle.py run short
in test_memory.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import handoff_bin, patience

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "python"), str(REPO / "benches"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(REPO / "benches" / script),
                           "--bin", str(handoff_bin()), *args],
                          env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=patience(180))
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_query_bench_runs():
    out = run_bench("query.py", "--rows", "20000", "--reps", "1")
    for line in ("read 8 of 8 columns", "Flight SQL count(*)", "import of 8 Parquet files"):
        assert line in out, out


def test_loader_bench_runs():
    out = run_bench("loader.py", "--rows", "20000", "--rounds", "1")
    assert "loader / raw DoGet:" in out, out


def test_shuffle_memory_bench_runs():
    out = run_bench("shuffle_memory.py", "--link-mib", "4", "--limit-mib", "64", "--ranks", "2")
    assert "| this build | 2 |" in out, out


def test_replicas_bench_runs():
    """Namespaces, a bridge and CPU quotas need root; the bench says so and exits 2 without."""
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/cpu").is_dir():
        import pytest

        pytest.skip("benches/replicas.py needs root and cgroup v1's cpu controller")
    out = run_bench("replicas.py", "--replicas", "1,2", "--partitions", "4", "--rows", "256",
                    "--world", "2", "--rounds", "1", "--cpu", "0.5")
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [line[0] for line in lines[-2:]] == ["1", "2"], out
