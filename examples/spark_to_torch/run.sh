#!/usr/bin/env bash
# The demo: a local Spark job writes ~1M feature rows through the handoff sink into an embedded
# `handoff serve`, then two torch ranks (torchrun, gloo) train on their shards for 2 epochs.
# Installs what it needs: the handoff Python package with pyspark and torch (~3 GB, cached by pip);
# the package's wheel carries the `handoff` binary, which pip builds with cargo (the `dist`
# profile). Needs Java 17 and a Rust toolchain.
#
# HANDOFF_DEMO_TLS=1 runs it over TLS: `handoff certs` makes a CA and a server certificate, the
# server gets --tls-cert/--tls-key, and Spark and torch connect to grpc+tls:// trusting
# HANDOFF_TLS_CA. HANDOFF_BIN=path uses that binary instead of the installed one.
set -euo pipefail
cd "$(dirname "$0")/../.."

started=$(date +%s)
echo "installing ./python[spark,torch]: pip builds the handoff binary (minutes, the first time)"
pip() { python3 -m pip -q --disable-pip-version-check "$@"; }
# The dependencies (torch is most of it) download while cargo builds the wheel: one waits on the
# network, the other on the CPU. The list is the package's own, read from its pyproject.toml
# (tomllib: Python >= 3.11; older ones install in one go).
if deps=$(python3 -c '
import tomllib
project = tomllib.load(open("python/pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["spark"] + extras["torch"]))' 2>/dev/null); then
  wheels=$(mktemp -d)
  mapfile -t deps <<<"$deps"
  pip install "${deps[@]}" &
  deps_pid=$!
  pip wheel --no-deps -w "$wheels" ./python
  wait "$deps_pid"
  # Forced: an older install of the same version must not stand in for this build.
  pip install --no-deps --force-reinstall "$(ls "$wheels"/handoff-*.whl)"
  rm -rf "$wheels"
else
  pip install "./python[spark,torch]"
fi
# The binary the package installed ($HANDOFF_BIN overrides it).
handoff=$(python3 -c 'from handoff.server import binary; print(binary())')
echo "installed in $(( $(date +%s) - started )) s: $handoff"

export JAVA_HOME=${JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}
export SPARK_LOCAL_IP=127.0.0.1
export PYSPARK_PYTHON=$(command -v python3) PYSPARK_DRIVER_PYTHON=$(command -v python3)

work=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
writer_token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
reader_token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
tls_args=() scheme=grpc
if [ "${HANDOFF_DEMO_TLS:-0}" = 1 ]; then
  "$handoff" certs "$work/pki" --name 127.0.0.1 >/dev/null
  tls_args=(--tls-cert "$work/pki/tls.crt" --tls-key "$work/pki/tls.key") scheme=grpc+tls
  export HANDOFF_TLS_CA=$work/pki/ca.crt
fi
# Writers may not read and readers may not write: Spark gets one token, torch the other.
HANDOFF_WRITER_TOKEN=$writer_token HANDOFF_READER_TOKEN=$reader_token \
  "$handoff" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --memory-limit 2GiB \
  --spill-url "file://$work/spill" "${tls_args[@]}" >"$work/serve.out" 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
grpc=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$work/serve.out")
[ -n "$grpc" ] || { cat "$work/serve.log"; exit 1; }
echo "handoff serve: $scheme://$grpc (memory limit 2GiB)"

export HANDOFF_ENDPOINT=$scheme://$grpc HANDOFF_LINK=demo/features
HANDOFF_TOKEN=$writer_token python3 examples/spark_to_torch/spark_job.py

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
HANDOFF_TOKEN=$reader_token OMP_NUM_THREADS=1 python3 -m torch.distributed.run \
  --nnodes 1 --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$port" \
  examples/spark_to_torch/train.py
