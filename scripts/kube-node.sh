#!/usr/bin/env bash
# Starts a real single-node Kubernetes (1.20) on this machine for tests, detached, and returns
# once the node is Ready; `--down` stops it and removes everything it set up.
#
#   scripts/kube-node.sh DIR          start; last stdout line is KUBECONFIG=DIR/kubeconfig
#   scripts/kube-node.sh --down DIR   stop it: pods, kubelet, kube-proxy, scheduler, controller
#                                     manager, containerd, API server, etcd; then its mounts,
#                                     network namespaces, iptables rules, route and bridge
#
# What runs, all on configuration written into DIR (logs there too, one per component):
#   - etcd and kube-apiserver, by scripts/kube-up.sh, bound to the bridge's address so that pods
#     reach the API server through the `kubernetes` Service;
#   - kube-controller-manager (service-account tokens, garbage collector, Deployments, ...) and
#     kube-scheduler;
#   - containerd (CRI) with runc, the bridge CNI on $BRIDGE ($POD_CIDR), and the kubelet;
#   - kube-proxy in iptables mode, so ClusterIP Services route as in any cluster.
# The Kubernetes binaries are built once from Debian's source by scripts/kube-apiserver.sh --node
# and cached in ~/.cache/handoff-tools; the Debian packages (containerd, runc, CNI plugins,
# iptables, conntrack) are installed if missing. Images come from scripts/images.sh, which
# imports them into this node's containerd: there is no registry.
#
# Settings this machine needs (it runs in a sandbox without CAP_SYS_RESOURCE, with cgroups v1):
# containerd restricts OOM score adjustments, the kubelet and kube-proxy leave their own score
# alone, the cgroup driver is cgroupfs. Debian has no CoreDNS: dnsmasq on the bridge answers
# for cluster.local from the API's Services and Endpoints instead (see "cluster DNS" below).
# Test traffic stays on the machine: the service range is routed to the bridge, and pods may not
# forward out through the uplink.
#
# Only one node runs at a time on a machine (the bridge and its addresses are fixed). Starts are
# serialized by a lock, and $OWNER names the DIR of the node that holds the bridge: a start waits
# (bounded) for a live node to be taken down, and takes down a dead one's leftovers itself, so a
# test run killed mid-way does not fail every later run on this machine.
# A node that cannot start fails with the reason and the log lines that show it; it never
# pretends to be up.
set -euo pipefail

BRIDGE=handoff0
POD_CIDR=10.244.0.0/24
GATEWAY=10.244.0.1
SERVICE_CIDR=10.0.0.0/24
NODE=handoff-node
TAG=handoff-kube-node # iptables comment on the rules we add, for --down
# Machine-wide, like the bridge; /tmp goes away on reboot, as the bridge does.
LOCK=${HANDOFF_KUBE_NODE_LOCK:-/tmp/handoff-kube-node.lock}
OWNER=${HANDOFF_KUBE_NODE_OWNER:-/tmp/handoff-kube-node.owner}

HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "kube-node.sh: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { die "usage: $0 DIR | $0 --down DIR"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
now_s() { date +%s; }
wait_s() { awk -v base="$1" -v scale="${HANDOFF_TEST_TIMEOUT_SCALE:-1}" \
  'BEGIN { if (scale + 0 <= 0) scale = 1; printf "%d", base * scale + 0.5 }'; }

# Sends SIGTERM, waits up to 20 s, then SIGKILL.
stop_pid() {
  local pid=$1 name=$2 deadline
  alive "$pid" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$(( $(now_s) + 20 ))
  while [ "$(now_s)" -lt "$deadline" ]; do
    alive "$pid" || return 0
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
    sleep 0.1
  done
  log "$name (pid $pid) did not stop; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

pid_of() { sed -n "s/^$1=//p" "$DIR/node-pids" 2>/dev/null | tail -n1; }

down() {
  DIR=$(cd "$1" && pwd)
  local sock=$DIR/containerd/containerd.sock pid
  # The kubelet first, so it does not restart what we stop next.
  stop_pid "$(pid_of kubelet)" kubelet
  # Every container of this node: their processes, then their shims.
  if [ -S "$sock" ] && alive "$(pid_of containerd)"; then
    for task in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
    done
    sleep 1
  fi
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $sock" || true); do
    # A shim's children are the containers; kill both.
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  stop_pid "$(pid_of kube-proxy)" kube-proxy
  stop_pid "$(pid_of dns-sync)" dns-sync
  stop_pid "$(pid_of dnsmasq)" dnsmasq
  stop_pid "$(pid_of kube-scheduler)" kube-scheduler
  stop_pid "$(pid_of kube-controller-manager)" kube-controller-manager
  stop_pid "$(pid_of containerd)" containerd
  bash "$HERE/kube-up.sh" --down "$DIR" || true
  rm -f "$DIR/node-pids"

  # Mounts under DIR (pod volumes, container root filesystems, shm), deepest first.
  { awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts || true; } | sort -r |
    while read -r m; do as_root umount -l "$m" 2>/dev/null || true; done
  # The pods' network namespaces (containerd names them cni-<uuid>; only this node makes them).
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ { print $1 }'); do
    as_root ip netns delete "$ns" 2>/dev/null || true
  done
  # kube-proxy's, the kubelet's and the CNI plugins' iptables chains, and our own rules.
  local table
  for table in filter nat mangle; do
    if as_root iptables-save -t "$table" 2>/dev/null | grep -qE "KUBE-|CNI-|$TAG"; then
      as_root iptables-save -t "$table" | grep -vE "KUBE-|CNI-|$TAG" | as_root iptables-restore -T "$table" 2>/dev/null ||
        log "could not clean iptables table $table"
    fi
  done
  # The kubelet's pod cgroups (empty once their processes are gone), deepest first.
  { find /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/kubepods.slice -depth -type d 2>/dev/null || true; } |
    while read -r cg; do as_root rmdir "$cg" 2>/dev/null || true; done
  as_root ip route del "$SERVICE_CIDR" dev "$BRIDGE" 2>/dev/null || true
  as_root ip link del "$BRIDGE" 2>/dev/null || true
  # Container images and root filesystems are large; logs and configuration stay for reading.
  rm -rf "$DIR/containerd/root" "$DIR/containerd/state" "$DIR/kubelet/root" "$DIR/cni/ipam"
  if [ "$(cat "$OWNER" 2>/dev/null)" = "$DIR" ]; then rm -f "$OWNER"; fi
}

# True while any process of the node in DIR runs (pids from DIR/node-pids whose command line
# names DIR, so a reused pid does not count).
node_alive() {
  local dir=$1 key val
  [ -f "$dir/node-pids" ] || return 1
  while IFS='=' read -r key val; do
    alive "$val" && tr '\0' ' ' <"/proc/$val/cmdline" 2>/dev/null | grep -qF "$dir" && return 0
  done <"$dir/node-pids"
  return 1
}

# Waits (bounded) until no other node holds the bridge; a dead node's leftovers are taken down.
claim_bridge() {
  local owner deadline wait_total scratch
  wait_total=$(wait_s 1200)
  deadline=$(( $(now_s) + wait_total ))
  while :; do
    owner=$(cat "$OWNER" 2>/dev/null || true)
    if [ -n "$owner" ] && [ "$owner" != "$DIR" ] && node_alive "$owner"; then
      [ "$(now_s)" -lt "$deadline" ] ||
        die "the node in $owner is still running after $wait_total s; run $0 --down $owner (or wait for its tests)"
      log "waiting for the node in $owner to be taken down (at most $wait_total s)"
      sleep 5
      continue
    fi
    if [ -z "$owner" ] && pgrep -f -- "--hostname-override=$NODE" >/dev/null; then
      # A node without an owner record: started by an older version of this script.
      [ "$(now_s)" -lt "$deadline" ] ||
        die "a kubelet for $NODE runs without $OWNER after $wait_total s; stop it with $0 --down on its DIR"
      log "waiting for the running kubelet of $NODE to stop (at most $wait_total s)"
      sleep 5
      continue
    fi
    break
  done
  if [ -n "$owner" ] && [ "$owner" != "$DIR" ] && [ -d "$owner" ]; then
    log "taking down the leftovers of a node that is no longer running ($owner)"
    down "$owner" >/dev/null 2>&1 || true
  elif ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "taking down a leftover bridge $BRIDGE and its rules (no node runs)"
    scratch=$(mktemp -d)
    down "$scratch" >/dev/null 2>&1 || true
    rm -rf "$scratch"
  fi
  DIR=$START_DIR
  ip link show "$BRIDGE" >/dev/null 2>&1 &&
    die "bridge $BRIDGE is still there after taking down the node that left it; remove it: ip link del $BRIDGE"
  echo "$DIR" >"$OWNER"
}

[ $# -ge 1 ] || usage
if [ "$1" = --down ]; then
  [ $# -eq 2 ] || usage
  down "$2"
  exit 0
fi
[ $# -eq 1 ] || usage
case "$1" in -*) usage ;; esac
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
START_DIR=$DIR
# One start at a time; flock -o keeps the lock out of the node's processes, which outlive us.
if [ -z "${HANDOFF_KUBE_NODE_LOCKED:-}" ]; then
  exec env HANDOFF_KUBE_NODE_LOCKED=1 flock -w "$(wait_s 2400)" -o "$LOCK" bash "$0" "$DIR"
fi

# --- what this machine must have -----------------------------------------------------------
[ "$(id -u)" = 0 ] || command -v sudo >/dev/null || die "needs root (or sudo): containerd, the kubelet and iptables do"
if [ -f "$DIR/node-pids" ]; then
  while IFS='=' read -r key val; do
    alive "$val" && die "$key (pid $val) from $DIR/node-pids is still running; run $0 --down $DIR first"
  done <"$DIR/node-pids"
fi
claim_bridge
[ -d /sys/fs/cgroup/memory ] || [ -f /sys/fs/cgroup/cgroup.controllers ] ||
  die "no memory cgroup under /sys/fs/cgroup: the kubelet cannot run pods here"
grep -qw overlay /proc/filesystems || as_root modprobe overlay 2>/dev/null ||
  die "the kernel has no overlay filesystem: containerd's overlayfs snapshotter cannot run"

missing=()
for p in containerd runc containernetworking-plugins iptables conntrack dnsmasq-base; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
BIN=$(bash "$HERE/kube-apiserver.sh" --node | tail -n1)
for cmd in kubelet kube-controller-manager kube-scheduler kube-proxy; do
  [ -x "$BIN/$cmd" ] || die "missing $BIN/$cmd after scripts/kube-apiserver.sh --node"
done

read -r KUBELET_PORT KUBELET_HEALTHZ PROXY_HEALTHZ PROXY_METRICS < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

started=()
on_failure() {
  local rc=$?
  [ "$rc" = 0 ] && return 0
  log "start failed; taking down what started (logs stay in $DIR)"
  down "$DIR" >/dev/null 2>&1 || true
  exit "$rc"
}
trap on_failure EXIT
record() { echo "$1=$2" >>"$DIR/node-pids"; }
: >"$DIR/node-pids"

# --- network: the bridge the pods join, kept on this machine --------------------------------
log "bridge $BRIDGE $GATEWAY (pods $POD_CIDR, services $SERVICE_CIDR)"
as_root ip link add "$BRIDGE" type bridge
as_root ip addr add "$GATEWAY/${POD_CIDR#*/}" dev "$BRIDGE"
as_root ip link set "$BRIDGE" up
as_root ip route replace "$SERVICE_CIDR" dev "$BRIDGE"
as_root sysctl -qw net.ipv4.ip_forward=1
# Bridged pod-to-pod traffic must pass iptables for Services whose endpoint shares the bridge.
if ! [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
  as_root modprobe br_netfilter 2>/dev/null || die "no br_netfilter: Services cannot route between pods on one bridge"
fi
as_root sysctl -qw net.bridge.bridge-nf-call-iptables=1
uplinks=$(ip -o route show default | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1) }' | sort -u)
for dev in $uplinks; do
  as_root iptables -I FORWARD -s "$POD_CIDR" -o "$dev" -m comment --comment "$TAG" -j DROP
done

# --- etcd and the API server ---------------------------------------------------------------
KUBECONFIG_LINE=$(KUBE_UP_ADDRESS=$GATEWAY bash "$HERE/kube-up.sh" "$DIR" | tail -n1)
[ "${KUBECONFIG_LINE#KUBECONFIG=}" != "$KUBECONFIG_LINE" ] || die "scripts/kube-up.sh did not start"
KUBECONFIG=$DIR/kubeconfig
export KUBECONFIG
for key in kube-apiserver etcd; do record "$key" "$(sed -n "s/^$key=//p" "$DIR/pids")"; done

# --- containerd ------------------------------------------------------------------------------
mkdir -p "$DIR/containerd" "$DIR/cni/net.d" "$DIR/cni/ipam" "$DIR/kubelet/root" "$DIR/kubelet/pki"
cat >"$DIR/containerd/config.toml" <<EOF
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$DIR/containerd/containerd.sock"
[ttrpc]
  address = "$DIR/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  # scripts/images.sh builds it from catatonit; nothing is pulled.
  sandbox_image = "handoff.local/pause:e2e"
  # No CAP_SYS_RESOURCE here: never ask for a negative OOM score.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
EOF
cat >"$DIR/cni/net.d/10-handoff.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "handoff",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$DIR/cni/ipam",
        "ranges": [[{ "subnet": "$POD_CIDR", "gateway": "$GATEWAY" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
log "starting containerd, log $DIR/containerd.log"
setsid nohup containerd --config "$DIR/containerd/config.toml" </dev/null >"$DIR/containerd.log" 2>&1 &
record containerd $!
containerd_pid=$!
for _ in $(seq 1 300); do
  alive "$containerd_pid" || { tail -n 30 "$DIR/containerd.log" >&2; die "containerd exited"; }
  ctr -a "$DIR/containerd/containerd.sock" version >/dev/null 2>&1 && break
  sleep 0.1
done
ctr -a "$DIR/containerd/containerd.sock" version >/dev/null 2>&1 || die "containerd did not answer in 30 s"

# --- control plane: controller manager and scheduler ----------------------------------------
log "starting kube-controller-manager and kube-scheduler"
setsid nohup "$BIN/kube-controller-manager" \
  --kubeconfig="$KUBECONFIG" \
  --leader-elect=false \
  --port=0 --secure-port=0 \
  --service-account-private-key-file="$DIR/sa.key" \
  --root-ca-file="$DIR/ca.crt" \
  --use-service-account-credentials=false \
  --controllers='*' \
  --concurrent-gc-syncs=5 \
  </dev/null >"$DIR/kube-controller-manager.log" 2>&1 &
record kube-controller-manager $!
setsid nohup "$BIN/kube-scheduler" \
  --kubeconfig="$KUBECONFIG" \
  --leader-elect=false \
  --port=0 --secure-port=0 \
  </dev/null >"$DIR/kube-scheduler.log" 2>&1 &
record kube-scheduler $!

# --- kube-proxy ------------------------------------------------------------------------------
cat >"$DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $KUBECONFIG
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE
bindAddress: $GATEWAY
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ
metricsBindAddress: 127.0.0.1:$PROXY_METRICS
# No CAP_SYS_RESOURCE: keep the OOM score; leave the conntrack sysctls as they are.
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  syncPeriod: 5s
  minSyncPeriod: 0s
EOF
log "starting kube-proxy (iptables), log $DIR/kube-proxy.log"
setsid nohup "$BIN/kube-proxy" --config="$DIR/kube-proxy.yaml" \
  </dev/null >"$DIR/kube-proxy.log" 2>&1 &
record kube-proxy $!

# --- cluster DNS -----------------------------------------------------------------------------
# Debian has no CoreDNS, so this stands in for it (a test double, said plainly): dnsmasq on the
# bridge answers for cluster.local from a hosts file, and a loop keeps that file to what cluster
# DNS would answer from the API: each Service's ClusterIP as <svc>.<ns>.svc.cluster.local, and
# each endpoint whose pod has a hostname (a StatefulSet's pods under their headless Service) as
# <hostname>.<svc>.<ns>.svc.cluster.local. Every other name gets no answer: test traffic stays
# on this machine. dnsmasq rereads the file on SIGHUP, dropping records that went away (a pod
# restarted elsewhere), which its watched hosts directories would keep.
mkdir -p "$DIR/dns"
: >"$DIR/dns/cluster.hosts"
log "starting dnsmasq on $GATEWAY:53 for cluster.local, log $DIR/dnsmasq.log"
setsid nohup dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
  --listen-address="$GATEWAY" --bind-interfaces --addn-hosts="$DIR/dns/cluster.hosts" \
  --local=/cluster.local/ --no-negcache --user=root --pid-file="$DIR/dns/dnsmasq.pid" \
  --log-facility="$DIR/dnsmasq.log" </dev/null >>"$DIR/dnsmasq.log" 2>&1 &
record dnsmasq $!
cat >"$DIR/dns/sync.sh" <<'EOF'
# Keeps DIR/dns/cluster.hosts to the API's Services and Endpoints; SIGHUPs dnsmasq on a change.
DIR=$1 DNSMASQ=$2
template='{{range .items}}{{$ns := .metadata.namespace}}{{$svc := .metadata.name}}'\
'{{if eq .kind "Service"}}{{if and .spec.clusterIP (ne .spec.clusterIP "None")}}'\
'{{.spec.clusterIP}} {{$svc}}.{{$ns}}.svc.cluster.local{{"\n"}}{{end}}'\
'{{else}}{{range .subsets}}{{range .addresses}}{{if .hostname}}'\
'{{.ip}} {{.hostname}}.{{$svc}}.{{$ns}}.svc.cluster.local{{"\n"}}'\
'{{end}}{{end}}{{end}}{{end}}{{end}}'
last=""
while kill -0 "$DNSMASQ" 2>/dev/null; do
  if now=$(kubectl get services,endpoints --all-namespaces -o go-template="$template" 2>/dev/null) &&
    [ "$now" != "$last" ]; then
    printf '%s\n' "$now" >"$DIR/dns/cluster.hosts.new"
    mv "$DIR/dns/cluster.hosts.new" "$DIR/dns/cluster.hosts"
    kill -HUP "$DNSMASQ" 2>/dev/null || true
    last=$now
  fi
  sleep 1
done
EOF
setsid nohup bash "$DIR/dns/sync.sh" "$DIR" "$(pid_of dnsmasq)" </dev/null >>"$DIR/dns-sync.log" 2>&1 &
record dns-sync $!

# --- kubelet ---------------------------------------------------------------------------------
cat >"$DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
failSwapOn: false
# No CAP_SYS_RESOURCE here.
oomScoreAdj: 0
# Cluster DNS is the dnsmasq above; pods get none of this machine's resolvers.
clusterDNS:
- $GATEWAY
clusterDomain: cluster.local
resolvConf: ""
# The test machine's disk is shared with builds: never evict or garbage-collect images for it.
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 30
serializeImagePulls: false
volumePluginDir: $DIR/kubelet/volume-plugins
EOF
log "starting kubelet, log $DIR/kubelet.log"
setsid nohup "$BIN/kubelet" \
  --config="$DIR/kubelet/config.yaml" \
  --kubeconfig="$KUBECONFIG" \
  --container-runtime=remote \
  --container-runtime-endpoint="unix://$DIR/containerd/containerd.sock" \
  --root-dir="$DIR/kubelet/root" \
  --cert-dir="$DIR/kubelet/pki" \
  --hostname-override="$NODE" \
  --node-ip="$GATEWAY" \
  --oom-score-adj=0 \
  </dev/null >"$DIR/kubelet.log" 2>&1 &
record kubelet $!

# --- Ready in bounded time -------------------------------------------------------------------
READY_S=$(wait_s 180)
deadline=$(( $(now_s) + READY_S ))
start=$(now_s)
ready=""
while [ "$(now_s)" -lt "$deadline" ]; do
  while IFS='=' read -r key val; do
    alive "$val" || { log "$key exited; last lines of $DIR/$key.log:"; tail -n 30 "$DIR/$key.log" >&2; exit 1; }
  done <"$DIR/node-pids"
  ready=$(kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
  [ "$ready" = True ] && break
  sleep 1
done
if [ "$ready" != True ]; then
  why=$(kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}' 2>/dev/null || true)
  log "node $NODE not Ready after $READY_S s (HANDOFF_TEST_TIMEOUT_SCALE raises it): ${why:-not registered}"
  log "last lines of $DIR/kubelet.log:"
  tail -n 40 "$DIR/kubelet.log" >&2
  exit 1
fi
log "node $NODE Ready in $(( $(now_s) - start )) s"
cat >>"$DIR/env" <<EOF
NODE_NAME=$NODE
NODE_ADDRESS=$GATEWAY
POD_CIDR=$POD_CIDR
SERVICE_CIDR=$SERVICE_CIDR
CONTAINERD_SOCKET=$DIR/containerd/containerd.sock
EOF
trap - EXIT
echo "KUBECONFIG=$KUBECONFIG"
