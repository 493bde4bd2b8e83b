#!/usr/bin/env bash
# Starts a real etcd + kube-apiserver on 127.0.0.1 for tests, detached, and returns once the
# apiserver is ready.
#
#   scripts/kube-up.sh DIR          start; last stdout line is KUBECONFIG=DIR/kubeconfig
#   scripts/kube-up.sh --down DIR   stop the processes listed in DIR/pids (apiserver, then etcd)
#   scripts/kube-up.sh --restart-apiserver DIR
#                                   stop and start only the apiserver, same port, same etcd data
#
# Ports are picked free on 127.0.0.1 each start, so parallel runs with different DIRs don't
# collide. Everything lives in DIR: etcd data (DIR/etcd, wiped on every start, so each start is
# a fresh cluster), a self-signed CA (ca.crt) and serving cert for IP:127.0.0.1, the service
# account key pair, the admin token (DIR/token, user "admin" in group system:masters, also in
# DIR/kubeconfig), logs (etcd.log, kube-apiserver.log), DIR/pids and DIR/env (ports, server URL).
# Certs and the token are kept across restarts of the same DIR. Only the apiserver runs: there is
# no controller-manager or scheduler (no token controller, garbage collector, pods scheduling).
# The kube-apiserver binary comes from scripts/kube-apiserver.sh (built once, cached).
#
# KUBE_UP_ADDRESS (default 127.0.0.1) is the address the API server binds and advertises;
# scripts/kube-node.sh sets it to its bridge's address so that pods reach the API server through
# the `kubernetes` Service, whose endpoint the API server then keeps (lease reconciler).
set -euo pipefail

ADDRESS=${KUBE_UP_ADDRESS:-127.0.0.1}
if [ "$ADDRESS" = 127.0.0.1 ]; then RECONCILER=none; else RECONCILER=lease; fi

log() { echo "kube-up.sh: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { die "usage: $0 DIR | $0 --down DIR | $0 --restart-apiserver DIR"; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Waits are generous (a loaded 2-core machine starts an API server slowly) and scale with
# HANDOFF_TEST_TIMEOUT_SCALE, like every other wait of the test suite (crates/handoff-testkit).
wait_s() { awk -v base="$1" -v scale="${HANDOFF_TEST_TIMEOUT_SCALE:-1}" \
  'BEGIN { if (scale + 0 <= 0) scale = 1; printf "%d", base * scale + 0.5 }'; }
READY_S=$(wait_s 180)
STOP_S=$(wait_s 30)
# Seconds since the epoch, for deadlines that hold however long each poll takes.
now_s() { date +%s; }

# Sends SIGTERM, waits up to $STOP_S s, then SIGKILL. The processes are not our children, so poll.
stop_pid() {
  local pid=$1 name=$2 deadline
  alive "$pid" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$(( $(now_s) + STOP_S ))
  while [ "$(now_s)" -lt "$deadline" ]; do
    alive "$pid" || return 0
    # A zombie (when the caller is our parent and hasn't reaped it) counts as stopped.
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
    sleep 0.1
  done
  log "$name (pid $pid) did not stop in $STOP_S s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do alive "$pid" || return 0; sleep 0.1; done
}

down() {
  local dir=$1 apiserver_pid="" etcd_pid="" key val
  [ -f "$dir/pids" ] || { log "no $dir/pids; nothing to stop"; return 0; }
  while IFS='=' read -r key val; do
    case "$key" in
      kube-apiserver) apiserver_pid=$val ;;
      etcd) etcd_pid=$val ;;
    esac
  done <"$dir/pids"
  stop_pid "$apiserver_pid" kube-apiserver
  stop_pid "$etcd_pid" etcd
  rm -f "$dir/pids"
}

# Prints N distinct free TCP ports on 127.0.0.1 (held open together while choosing).
free_ports() {
  local n=$1
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$n" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
  else
    local ports=() p
    while [ "${#ports[@]}" -lt "$n" ]; do
      p=$(( 20000 + RANDOM % 30000 ))
      case " ${ports[*]} " in *" $p "*) continue ;; esac
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then ports+=("$p"); fi
    done
    echo "${ports[*]}"
  fi
}

# Starts kube-apiserver on $API_PORT against etcd on $ETCD_PORT and waits until it is ready;
# sets apiserver_pid.
start_apiserver() {
log "starting kube-apiserver on https://$ADDRESS:$API_PORT, log $DIR/kube-apiserver.log"
setsid nohup "$KUBE_APISERVER" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address="$ADDRESS" \
  --advertise-address="$ADDRESS" \
  --secure-port="$API_PORT" \
  --insecure-port=0 \
  --tls-cert-file="$DIR/server.crt" \
  --tls-private-key-file="$DIR/server.key" \
  --client-ca-file="$DIR/ca.crt" \
  --token-auth-file="$DIR/tokens.csv" \
  --authorization-mode=RBAC \
  --service-account-key-file="$DIR/sa.pub" \
  --service-account-signing-key-file="$DIR/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc \
  --api-audiences=https://kubernetes.default.svc \
  --service-cluster-ip-range=10.0.0.0/24 \
  --endpoint-reconciler-type="$RECONCILER" \
  --allow-privileged=true \
  --kubelet-preferred-address-types=InternalIP \
  --profiling=false \
  </dev/null >>"$DIR/kube-apiserver.log" 2>&1 &
apiserver_pid=$!
started_pids=("$apiserver_pid" ${etcd_pid:+"$etcd_pid"})

start=$(date +%s%N)
ready=0
deadline=$(( $(now_s) + READY_S ))
while [ "$(now_s)" -lt "$deadline" ]; do
  if ! alive "$apiserver_pid"; then
    log "kube-apiserver exited; last log lines:"
    tail -n 30 "$DIR/kube-apiserver.log" >&2 || true
    exit 1
  fi
  if [ "$(curl -sS --max-time 2 --cacert "$DIR/ca.crt" -H "Authorization: Bearer $TOKEN" \
        "https://$ADDRESS:$API_PORT/readyz" 2>/dev/null)" = ok ]; then
    ready=1
    break
  fi
  sleep 0.1
done
if [ "$ready" != 1 ]; then
  log "kube-apiserver not ready after $READY_S s (HANDOFF_TEST_TIMEOUT_SCALE raises it); last log lines:"
  tail -n 30 "$DIR/kube-apiserver.log" >&2 || true
  exit 1
fi
log "kube-apiserver ready in $(( ($(date +%s%N) - start) / 1000000 )) ms"
}

# Restart only the API server of a running DIR, on the same port and etcd: the cluster's state
# survives, as it does when a real control plane restarts.
restart_apiserver() {
  DIR=$(cd "$1" && pwd)
  # shellcheck disable=SC1091
  . "$DIR/env"
  API_PORT=$KUBE_API_PORT
  ETCD_PORT=${ETCD_ENDPOINT##*:}
  # The same address as at the start.
  ADDRESS=${KUBE_SERVER#https://}
  ADDRESS=${ADDRESS%:*}
  if [ "$ADDRESS" = 127.0.0.1 ]; then RECONCILER=none; else RECONCILER=lease; fi
  TOKEN=$(cat "$DIR/token")
  KUBE_APISERVER="$HOME/.cache/handoff-tools/kube-apiserver/bin/kube-apiserver"
  local old_pid="" etcd_pid="" key val
  while IFS='=' read -r key val; do
    case "$key" in
      kube-apiserver) old_pid=$val ;;
      etcd) etcd_pid=$val ;;
    esac
  done <"$DIR/pids"
  stop_pid "$old_pid" kube-apiserver
  start_apiserver
  printf 'kube-apiserver=%s\netcd=%s\n' "$apiserver_pid" "$etcd_pid" >"$DIR/pids"
}

[ $# -ge 1 ] || usage
if [ "$1" = --restart-apiserver ]; then
  [ $# -eq 2 ] || usage
  restart_apiserver "$2"
  exit 0
fi
if [ "$1" = --down ]; then
  [ $# -eq 2 ] || usage
  down "$2"
  exit 0
fi
[ $# -eq 1 ] || usage
case "$1" in -*) usage ;; esac

mkdir -p "$1"
DIR=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)

if [ -f "$DIR/pids" ]; then
  while IFS='=' read -r key val; do
    if alive "$val"; then die "$key (pid $val) from $DIR/pids is still running; run $0 --down $DIR first"; fi
  done <"$DIR/pids"
  rm -f "$DIR/pids"
fi

KUBE_APISERVER="$HOME/.cache/handoff-tools/kube-apiserver/bin/kube-apiserver"
if ! [ -x "$KUBE_APISERVER" ] || ! command -v etcd >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  KUBE_APISERVER=$("$HERE/kube-apiserver.sh" | tail -n1)
fi
ETCD=$(command -v etcd)

# --- certificates, keys, token (kept across restarts of the same DIR) ---
if ! [ -s "$DIR/ca.crt" ] || ! [ -s "$DIR/server.crt" ] || ! [ -s "$DIR/sa.key" ]; then
  log "generating CA, serving certificate and service-account keys in $DIR"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kube-up-ca" \
    -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$DIR/server.key" -out "$DIR/server.csr" 2>/dev/null
  cat >"$DIR/server.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$ADDRESS,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
EOF
  openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
    -CAcreateserial -days 3650 -extfile "$DIR/server.ext" -out "$DIR/server.crt" 2>/dev/null
  openssl genrsa -out "$DIR/sa.key" 2048 2>/dev/null
  openssl rsa -in "$DIR/sa.key" -pubout -out "$DIR/sa.pub" 2>/dev/null
  chmod 600 "$DIR/ca.key" "$DIR/server.key" "$DIR/sa.key"
fi
if ! [ -s "$DIR/token" ]; then
  (umask 077; openssl rand -hex 24 >"$DIR/token")
fi
TOKEN=$(cat "$DIR/token")
(umask 077; echo "$TOKEN,admin,admin,\"system:masters\"" >"$DIR/tokens.csv")

started_pids=()
cleanup_on_failure() {
  local pid
  for pid in "${started_pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# --- etcd (retried with new ports if a picked port got taken meanwhile) ---
etcd_pid=""
for attempt in 1 2 3; do
  read -r ETCD_PORT ETCD_PEER_PORT API_PORT < <(free_ports 3)
  rm -rf "$DIR/etcd"
  mkdir -p "$DIR/etcd"
  chmod 700 "$DIR/etcd"
  log "starting etcd on 127.0.0.1:$ETCD_PORT (peer $ETCD_PEER_PORT), log $DIR/etcd.log"
  # Debian's etcd reads ETCD_* variables too; keep the caller's environment out of it.
  env -u ETCD_DATA_DIR -u ETCD_NAME -u ETCD_LISTEN_CLIENT_URLS -u ETCD_ADVERTISE_CLIENT_URLS \
    setsid nohup "$ETCD" \
    --name kube-up \
    --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "kube-up=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-state new \
    --initial-cluster-token "kube-up-$ETCD_PEER_PORT" \
    </dev/null >"$DIR/etcd.log" 2>&1 &
  etcd_pid=$!
  started_pids=("$etcd_pid")
  ok=0
  deadline=$(( $(now_s) + READY_S / 3 ))
  while [ "$(now_s)" -lt "$deadline" ]; do
    if ! alive "$etcd_pid"; then break; fi
    if curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'; then
      ok=1
      break
    fi
    sleep 0.1
  done
  [ "$ok" = 1 ] && break
  log "etcd did not come up (attempt $attempt); last log lines:"
  tail -n 15 "$DIR/etcd.log" >&2 || true
  kill -KILL "$etcd_pid" 2>/dev/null || true
  etcd_pid=""
done
[ -n "$etcd_pid" ] || die "etcd failed to start"
trap cleanup_on_failure EXIT

# --- kube-apiserver ---
start_apiserver

CA_DATA=$(base64 -w0 <"$DIR/ca.crt")
cat >"$DIR/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kube-up
  cluster:
    server: https://$ADDRESS:$API_PORT
    certificate-authority-data: $CA_DATA
users:
- name: admin
  user:
    token: $TOKEN
contexts:
- name: kube-up
  context:
    cluster: kube-up
    user: admin
    namespace: default
current-context: kube-up
EOF
chmod 600 "$DIR/kubeconfig.tmp"
mv "$DIR/kubeconfig.tmp" "$DIR/kubeconfig"
cat >"$DIR/env" <<EOF
KUBE_SERVER=https://$ADDRESS:$API_PORT
KUBE_API_PORT=$API_PORT
ETCD_ENDPOINT=http://127.0.0.1:$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
EOF
printf 'kube-apiserver=%s\netcd=%s\n' "$apiserver_pid" "$etcd_pid" >"$DIR/pids"
trap - EXIT
echo "KUBECONFIG=$DIR/kubeconfig"
