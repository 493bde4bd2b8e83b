#!/usr/bin/env bash
# Builds the project's container images without a registry or a Docker engine, and imports them
# into a containerd (the node of scripts/kube-node.sh):
#
#   handoff.local/handoff:e2e  the `handoff` binary (server and controller) and exactly the shared
#                              libraries it links, on an empty (scratch) image, user 65532;
#                              entrypoint /usr/local/bin/handoff, as the root Dockerfile's image
#   handoff.local/pause:e2e    the pod sandbox: catatonit -P
#   handoff.local/host:e2e     an empty merged-/usr skeleton for test pods that mount this
#                              machine's /usr and Python read-only (hostPath), so that the test's
#                              Spark and torch pods need no image of their own
#
#   scripts/images.sh [--binary PATH] --containerd-socket SOCK
#   scripts/images.sh [--binary PATH] --out DIR     # only write the docker archives into DIR
#
# The binary defaults to target/debug/handoff (the test build), copied without debug info.
# The root Dockerfile is the image for users with a registry (distroless, `--profile dist`); this
# script builds the same contents another way, with buildah (from Debian), for the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "images.sh: $*" >&2; }
die() { log "$*"; exit 1; }

binary=target/debug/handoff
socket=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --containerd-socket) socket=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "$socket" ] || [ -n "$out" ] || die "give --containerd-socket SOCK (import) or --out DIR (archives only)"
[ -x "$binary" ] || die "no binary at $binary: build it first (cargo build -p handoff-cli), or pass --binary"
for tool in buildah catatonit; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "installing $tool"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$tool" >&2
  fi
done

work=$(mktemp -d)
trap 'buildah "${store[@]}" rm --all >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# A throwaway store: nothing of buildah's lingers, and vfs works wherever overlay mounts don't.
store=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
[ -n "$out" ] || out=$work/archives
mkdir -p "$out"

# Copies FILE and every library it links (as ldd resolves them, the loader included) into the
# container's filesystem at the same paths.
copy_with_libs() {
  local ctr=$1 file=$2 dest=$3 lib
  buildah "${store[@]}" copy --quiet "$ctr" "$file" "$dest" >/dev/null
  for lib in $(ldd "$file" 2>/dev/null | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | sort -u); do
    buildah "${store[@]}" copy --quiet "$ctr" "$(readlink -f "$lib")" "$lib" >/dev/null
  done
}

archive() { # archive NAME: commits the working container as NAME and writes a docker archive
  local ctr=$1 name=$2 file=$out/${2//[\/:]/_}.tar
  buildah "${store[@]}" commit --quiet "$ctr" "$name" >/dev/null
  rm -f "$file"
  buildah "${store[@]}" push --quiet "$name" "docker-archive:$file:$name" >/dev/null
  echo "$file"
}

start=$(date +%s)
archives=()

# handoff: the binary without debug info (the test build's is mostly DWARF).
objcopy --strip-debug "$binary" "$work/handoff"
ctr=$(buildah "${store[@]}" from --quiet scratch)
copy_with_libs "$ctr" "$work/handoff" /usr/local/bin/handoff
buildah "${store[@]}" config --user 65532:65532 --entrypoint '["/usr/local/bin/handoff"]' \
  --cmd serve --port 8815 --port 8816 "$ctr"
archives+=("$(archive "$ctr" handoff.local/handoff:e2e)")

# pause: catatonit reaps the pod's zombies and waits (Debian's is static).
ctr=$(buildah "${store[@]}" from --quiet scratch)
copy_with_libs "$ctr" "$(command -v catatonit)" /catatonit
buildah "${store[@]}" config --entrypoint '["/catatonit", "-P"]' "$ctr"
archives+=("$(archive "$ctr" handoff.local/pause:e2e)")

# host: mount points and merged-/usr links only; the pod mounts the rest from the machine.
mkdir -p "$work/host"/{usr,root,tmp,etc,proc,sys,dev,opt,work}
for link in bin sbin lib lib64; do ln -s "usr/$link" "$work/host/$link"; done
# A name for uid 0: the JVM's user lookup (Hadoop's login in Spark) fails without one.
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/host/etc/passwd"
echo 'root:x:0:' >"$work/host/etc/group"
ctr=$(buildah "${store[@]}" from --quiet scratch)
buildah "${store[@]}" copy --quiet "$ctr" "$work/host" / >/dev/null
archives+=("$(archive "$ctr" handoff.local/host:e2e)")

if [ -n "$socket" ]; then
  for file in "${archives[@]}"; do
    ctr -a "$socket" -n k8s.io images import "$file" >/dev/null ||
      die "importing $file into containerd at $socket failed"
  done
  log "built and imported $(basename -a "${archives[@]}" | tr '\n' ' ')in $(( $(date +%s) - start )) s"
else
  log "wrote ${archives[*]} in $(( $(date +%s) - start )) s"
fi
