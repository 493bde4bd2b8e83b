#!/usr/bin/env bash
# Every test of the project: Rust unit and integration tests, then the Python suite (pyarrow
# interop, the handoff package with real PySpark and torch) against the real `handoff` binary.
# Installs what it needs: protoc, promtool, Java 17 for Spark, the Python requirements (torch is ~3 GB,
# cached by pip in ~/.cache/pip), s3s-fs and Kubernetes 1.20 (built once into
# ~/.cache/handoff-tools), etcd, and containerd with what a single-node cluster needs.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Phase timings, printed at the end (and on failure), so CI's time stays visible per phase.
PHASES=()
phase_start=$(date +%s)
phase() { # phase NAME: closes the current phase under NAME
  local now; now=$(date +%s)
  PHASES+=("$(printf '%-28s %5ss' "$1" $((now - phase_start)))")
  phase_start=$now
}
report() {
  local rc=$?
  # Stop a background build still running (its make may finish on its own; it only caches).
  if [ -n "${kube_build:-}" ]; then kill "$kube_build" 2>/dev/null || true; fi
  echo "== scripts/test.sh timings (exit $rc) ==" >&2
  local p; for p in "${PHASES[@]}"; do echo "  $p" >&2; done
}
trap report EXIT

# protoc checks that the checked-in protobuf code is fresh.
if ! command -v protoc >/dev/null 2>&1; then
  echo "installing protobuf-compiler" >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq protobuf-compiler >/dev/null
fi

# promtool lints the server's and the controller's /metrics (crates/handoff-controller/tests/monitoring.rs).
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus (for promtool)" >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# PySpark needs a JVM.
if [ -z "${JAVA_HOME:-}" ] && ! command -v java >/dev/null 2>&1; then
  echo "installing openjdk-17-jre-headless" >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
if [ -z "${JAVA_HOME:-}" ] && [ -d /usr/lib/jvm/java-17-openjdk-amd64 ]; then
  export JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64
fi

# The single-node cluster of tests/python/test_cluster.py (scripts/kube-node.sh) runs on these.
node_packages=()
for p in containerd runc containernetworking-plugins iptables conntrack buildah catatonit dnsmasq-base; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || node_packages+=("$p")
done
if [ "${#node_packages[@]}" -gt 0 ]; then
  echo "installing ${node_packages[*]} (for the single-node cluster)" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
    "${node_packages[@]}" >/dev/null
fi

# A real Kubernetes 1.20 from Debian's source package, built once into ~/.cache/handoff-tools:
# the API server (and etcd) for the controller tests, and the kubelet, controller manager,
# scheduler and kube-proxy for the single-node cluster. Cold, that is a Go build of ~10 min: it
# runs in the background, beside pip's downloads and the cargo build, and is awaited before the
# tests. It is started after every apt call of this script, which would otherwise contend for
# apt's lock.
kube_log=$(mktemp)
bash scripts/kube-apiserver.sh --node >"$kube_log" 2>&1 &
kube_build=$!
await_kube() {
  if ! wait "$kube_build"; then
    echo "scripts/kube-apiserver.sh --node failed:" >&2
    cat "$kube_log" >&2
    exit 1
  fi
}

python3 -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
phase "system and pip packages"

# A real S3 server for the snapshot tests; built once and cached outside the checkout.
S3S_ROOT="$HOME/.cache/handoff-tools/s3s-fs"
if [ ! -x "$S3S_ROOT/bin/s3s-fs" ]; then
  echo "building s3s-fs (once) into $S3S_ROOT" >&2
  cargo install -q s3s-fs@0.14.1 --features binary --root "$S3S_ROOT"
fi
export S3S_FS_BIN="$S3S_ROOT/bin/s3s-fs"
phase "tool: s3s-fs"

cargo build --workspace --all-targets
phase "build: workspace"
await_kube
phase "tool: kubernetes (rest of its build)"
cargo test --workspace
phase "tests: rust"
# The package is tested from the checkout, not from whatever copy pip installed earlier.
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" HANDOFF_BIN="$PWD/target/debug/handoff" \
  python3 -m pytest -q tests/python
phase "tests: python"
# Every fuzz target for a bounded time (HANDOFF_FUZZ_SECONDS each; 0 skips); long runs are
# `bash scripts/fuzz.sh --seconds N`.
if [ "${HANDOFF_FUZZ_SECONDS:-30}" != 0 ]; then
  bash scripts/fuzz.sh --seconds "${HANDOFF_FUZZ_SECONDS:-30}"
fi
phase "fuzz: every target"
