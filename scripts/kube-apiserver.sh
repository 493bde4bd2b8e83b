#!/usr/bin/env bash
# Builds a real kube-apiserver once, for tests, and prints its path as the last line on stdout
# (everything else goes to stderr). Cached in ~/.cache/handoff-tools/kube-apiserver/bin so later
# runs (and CI on the same machine) reuse it; also makes sure etcd is installed.
#
# With --node it also builds what a single-node cluster needs (scripts/kube-node.sh): kubelet,
# kube-controller-manager, kube-scheduler and kube-proxy, from the same source in the same `make`
# (the Go build cache in ~/.cache/go-build shares what they have in common), into
# ~/.cache/handoff-tools/kube-node/bin; the last stdout line is then that directory.
#
# Source: Debian bookworm's `kubernetes` source package (1.20.2, full tree with vendor/), built
# with Debian's Go 1.19 and no network (GOPROXY=off). Two vendored packages are replaced with
# Debian's newer copies: the vendored reflect2 1.0.1 crashes under Go >= 1.18 at the first
# custom-resource create (`fatal error: fault` in mapiterinit).
#
# All are built with GOFLAGS=-tags=providerless,dockerless: no cloud providers, no dockershim.
#
# Usage: scripts/kube-apiserver.sh          # -> ~/.cache/handoff-tools/kube-apiserver/bin/kube-apiserver
#        scripts/kube-apiserver.sh --node   # -> ~/.cache/handoff-tools/kube-node/bin
set -euo pipefail

node=0
case "${1:-}" in
  --node) node=1 ;;
  "") ;;
  *) echo "usage: $0 [--node]" >&2; exit 2 ;;
esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
log() { echo "kube-apiserver.sh: $*" >&2; }

ROOT="$HOME/.cache/handoff-tools/kube-apiserver"
BIN="$ROOT/bin/kube-apiserver"
NODE_BIN="$HOME/.cache/handoff-tools/kube-node/bin"
NODE_CMDS=(kubelet kube-controller-manager kube-scheduler kube-proxy)
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    as_root apt-get update -qq >&2
    apt_updated=1
  fi
}
# Installs the given packages if any of them is missing.
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_update
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

# etcd (Debian's etcd-server, 3.4) and openssl are needed at run time by scripts/kube-up.sh.
if ! command -v etcd >/dev/null 2>&1; then apt_install etcd-server; fi
if ! command -v openssl >/dev/null 2>&1; then apt_install openssl; fi

# What is missing from the cache: the API server, and with --node the node's binaries.
want=()
[ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1 || want+=(kube-apiserver)
if [ "$node" = 1 ]; then
  for cmd in "${NODE_CMDS[@]}"; do
    [ -x "$NODE_BIN/$cmd" ] && "$NODE_BIN/$cmd" --version >/dev/null 2>&1 || want+=("$cmd")
  done
fi
result() { if [ "$node" = 1 ]; then echo "$NODE_BIN"; else echo "$BIN"; fi; }
if [ "${#want[@]}" = 0 ]; then
  result
  exit 0
fi

log "building ${want[*]} (once: 5-10 min for the API server, 10-15 more for the node) into ~/.cache/handoff-tools"
start=$(date +%s)

# A deb-src entry with the same Signed-By as the machine's own entry (a different Signed-By for
# the same URI makes every apt call fail).
SRC_LIST=/etc/apt/sources.list.d/handoff-deb-src.sources
# shellcheck disable=SC2016 # $(IDENTIFIER) is apt's template syntax, not the shell's
if ! apt-get indextargets --format '$(IDENTIFIER)' 2>/dev/null | grep -qx 'Sources'; then
  if [ ! -e "$SRC_LIST" ]; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      log "adding $SRC_LIST"
      awk 'BEGIN{p=1} /^[[:space:]]*$/{exit} {print}' /etc/apt/sources.list.d/debian.sources \
        | sed -e 's/^Types:.*/Types: deb-src/' | as_root tee "$SRC_LIST" >/dev/null
    else
      log "adding deb-src lines to /etc/apt/sources.list.d/handoff-deb-src.list"
      SRC_LIST=/etc/apt/sources.list.d/handoff-deb-src.list
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | sed 's/^deb /deb-src /' \
        | as_root tee "$SRC_LIST" >/dev/null
    fi
    apt_updated=0
  fi
fi

apt_install dpkg-dev golang-1.19-go golang-github-modern-go-reflect2-dev \
  golang-github-json-iterator-go-dev rsync make
apt_update

SRC="$ROOT/src"
rm -rf "$SRC"
mkdir -p "$SRC"
log "fetching the Debian source package kubernetes into $SRC"
# Running as root, apt-get source would warn about the _apt sandbox; unpacking is what matters.
(cd "$SRC" && apt-get source -qq kubernetes >&2)
TREE=$(find "$SRC" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
if [ -z "$TREE" ] || ! [ -d "$TREE/vendor" ]; then log "no source tree with vendor/ under $SRC"; exit 1; fi

log "replacing vendored reflect2 and json-iterator with Debian's copies"
for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  [ -d "/usr/share/gocode/src/$pkg" ] || { log "missing /usr/share/gocode/src/$pkg"; exit 1; }
  rm -rf "${TREE:?}/vendor/$pkg"
  mkdir -p "$TREE/vendor/$pkg"
  rsync -a --exclude '.git' "/usr/share/gocode/src/$pkg/" "$TREE/vendor/$pkg/"
done

what=$(printf 'cmd/%s ' "${want[@]}")
log "make WHAT=\"${what% }\" (Go 1.19, offline)"
(
  cd "$TREE"
  export PATH="/usr/lib/go-1.19/bin:$PATH" GOPROXY=off GOFLAGS=-tags=providerless,dockerless
  make WHAT="${what% }" >&2
)
for cmd in "${want[@]}"; do
  built=$(find "$TREE/_output" -type f -name "$cmd" -perm -u+x | head -n1)
  [ -n "$built" ] || { log "build produced no $cmd under $TREE/_output"; exit 1; }
  if [ "$cmd" = kube-apiserver ]; then dest=$BIN; else dest=$NODE_BIN/$cmd; fi
  mkdir -p "$(dirname "$dest")"
  cp "$built" "$dest.tmp"
  mv "$dest.tmp" "$dest"
  "$dest" --version >&2
done
log "built in $(( $(date +%s) - start )) s; removing the source tree"
rm -rf "$SRC"
result
