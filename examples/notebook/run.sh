#!/usr/bin/env bash
# The notebook story on this machine, end to end:
#   1. a Spark Connect client writes a link into a local `handoff serve`, and the torch loader
#      reads it back and trains (spark_connect_to_torch.py);
#   2. against a test API server (etcd + kube-apiserver, scripts/kube-up.sh) with the real
#      controller, the Python API creates a DataLink and follows its status (datalink.py). No
#      kubelet runs there, so the link goes as far as Provisioning.
# Needs the package installed (`pip install "./python[spark,torch,k8s]"` plus
# `pyspark[connect]`), Java 17 for Spark, and etcd + kube-apiserver (scripts/kube-apiserver.sh
# builds them once). HANDOFF_BIN overrides the installed `handoff` binary.
set -euo pipefail
cd "$(dirname "$0")/../.."

handoff=$(python3 -c 'from handoff.server import binary; print(binary())')
export JAVA_HOME=${JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}
export SPARK_LOCAL_IP=127.0.0.1
work=$(mktemp -d)
server="" controller=""
cleanup() {
  [ -n "$controller" ] && kill "$controller" 2>/dev/null
  [ -n "$server" ] && kill "$server" 2>/dev/null
  wait 2>/dev/null || true
  [ -f "$work/kube/pids" ] && bash scripts/kube-up.sh --down "$work/kube" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

echo "== 1. Spark Connect -> handoff serve -> torch"
export HANDOFF_WRITER_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export HANDOFF_READER_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
"$handoff" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --memory-limit 1GiB \
  >"$work/serve.out" 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
grpc=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$work/serve.out")
[ -n "$grpc" ] || { cat "$work/serve.log"; exit 1; }
HANDOFF_ENDPOINT=grpc://$grpc python3 examples/notebook/spark_connect_to_torch.py

echo "== 2. a DataLink from Python, on a test API server with the controller"
mkdir -p "$work/kube"
kubeconfig=$(bash scripts/kube-up.sh "$work/kube" | sed -n 's/^KUBECONFIG=//p')
export KUBECONFIG=$kubeconfig
python3 - "$handoff" <<'PY'
import subprocess, sys, time
import yaml
from kubernetes import client, config
api = config.new_client_from_config()
crd = yaml.safe_load(subprocess.run([sys.argv[1], "crd"], check=True, capture_output=True,
                                    text=True).stdout)
client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
client.CoreV1Api(api).create_namespace({"metadata": {"name": "notebook"}})
for _ in range(300):
    got = client.ApiextensionsV1Api(api).read_custom_resource_definition(crd["metadata"]["name"])
    if any(c.type == "Established" and c.status == "True" for c in got.status.conditions or []):
        break
    time.sleep(0.1)
PY
"$handoff" controller --namespace notebook --http-listen 127.0.0.1:0 --poll-interval 1s \
  >"$work/controller.log" 2>&1 &
controller=$!
DATALINK_NAMESPACE=notebook DATALINK_PHASE=Provisioning DATALINK_TIMEOUT=120 \
  python3 examples/notebook/datalink.py
echo "the notebook story ran end to end"
