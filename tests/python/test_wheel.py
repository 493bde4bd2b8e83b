"""`pip install ./python` builds a wheel that carries the `handoff` binary (issue 18).

The wheel is built as pip builds it (maturin through PEP 517, with build isolation), installed
into a fresh virtualenv, and used from there: `handoff` is on the venv's PATH, `python -m
handoff` runs it, and `handoff.server.LocalServer` serves a link that the installed client
writes and the installed loader reads.

Users get the `dist` profile (python/pyproject.toml); here the wheel is built with the dev
profile into the test build's target directory, so it reuses that build instead of compiling the
server a second time. docs/benchmarks.md measures the dist build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile

import pytest

from conftest import REPO, handoff_bin, patience


def run(*args, env=None, timeout=600.0, cwd=None) -> str:
    done = subprocess.run(list(map(str, args)), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=patience(timeout))
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_carries_the_binary_into_a_fresh_virtualenv(tmp_path):
    wheels = tmp_path / "wheels"
    # The test build (`cargo build --workspace --all-targets`) turns on tokio's `test-util` through
    # dev-dependencies; asking for it here too keeps every dependency's features, and so its build,
    # the same, where a plain `-p handoff-cli` build would compile 13 crates again (~5 min cold).
    env = dict(os.environ, MATURIN_PEP517_ARGS="--profile dev --features tokio/test-util")
    env.pop("PYTHONPATH", None)
    env.pop("HANDOFF_BIN", None)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
        "-w", wheels, REPO / "python", env=env, timeout=1800)
    [wheel] = wheels.glob("handoff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ["handoff/__init__.py", "handoff/_proto/handoff_pb2.py", "handoff/torch.py",
                     "pyspark_handoff/__init__.py", "handoff-0.1.0.data/scripts/handoff"]:
        assert expected in names, f"{expected} is missing from {wheel.name}: {sorted(names)}"
    assert not [n for n in names if n.startswith(("build/", "tests/"))], sorted(names)

    # A fresh virtualenv; its dependencies come from the index (pip's cache) like a user's.
    home = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, "numpy",
        env=env)
    installed = home / "bin" / "handoff"
    assert installed.is_file() and os.access(installed, os.X_OK)
    clean = {k: v for k, v in env.items() if not k.startswith(("HANDOFF_", "VIRTUAL_ENV"))}
    clean["PATH"] = f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    assert "serve" in run("handoff", "--help", env=clean, cwd=tmp_path)
    assert "serve" in run(python, "-m", "handoff", "--help", env=clean, cwd=tmp_path)

    # The installed package finds the installed binary, serves, writes and reads back.
    script = """
import pyarrow as pa
import handoff
from handoff import HandoffClient
from handoff.client import ShardRequest
from handoff.server import LocalServer, binary
assert handoff.__file__.startswith(%(venv)r), handoff.__file__
assert binary() == %(bin)r, binary()
with LocalServer(memory_limit="256MiB") as server:
    with HandoffClient(server.endpoint, server.token) as client:
        client.put("wheel/demo", pa.table({"x": list(range(1000))}))
        client.seal("wheel/demo")
        got = [b for b in client.read_shard(ShardRequest("wheel/demo", batch_rows=100))]
        assert sum(b.num_rows for b in got) == 1000, [b.num_rows for b in got]
print("ok")
""" % {"venv": str(home), "bin": str(installed)}
    # Run from an empty directory: the checkout's python/ must not be what gets imported.
    assert run(python, "-c", script, env=clean, cwd=tmp_path).strip() == "ok"


def test_local_server_and_binary_say_what_is_wrong(monkeypatch, tmp_path):
    from handoff.server import LocalServer, binary
    built = str(handoff_bin())
    monkeypatch.setenv("HANDOFF_BIN", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="is not an executable file; fix or unset it"):
        binary()
    monkeypatch.setenv("HANDOFF_BIN", built)
    with pytest.raises(RuntimeError, match="exited with code 2: error: unexpected argument"):
        LocalServer(args=["--no-such-flag"]).start()
    monkeypatch.delenv("HANDOFF_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("sysconfig.get_path", lambda *a, **k: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install ./python"):
        binary()
