#!/usr/bin/env bash
# Run the cargo-fuzz targets (fuzz/fuzz_targets: ingest, decode, shard_plan, filter), each for a
# bounded time, and report executions per target. A crash fails the script and leaves its input
# under fuzz/artifacts/<target>/; replay it with
#   cargo fuzz run --dev --sanitizer none --target-dir ~/.cache/handoff-tools/fuzz-target <target> <file>
#
#   bash scripts/fuzz.sh                    # every target, 60 s each
#   bash scripts/fuzz.sh --seconds 600 ingest
#
# Each target starts from the committed seeds (fuzz/corpus/<target>, never written) and a working
# corpus in ~/.cache/handoff-tools/fuzz-corpus/<target> that it grows, so a later run starts where
# the last one stopped. Builds go to ~/.cache/handoff-tools/fuzz-target: coverage-instrumented,
# the dev profile (dependencies optimised, overflow checks and debug assertions on; a release
# build's link-time optimisation took over half an hour on 2 cores), and no sanitizer (the
# workspace forbids unsafe code). Installs cargo-fuzz into ~/.cargo/bin if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(ingest decode shard_plan filter)

cache=${HANDOFF_TOOLS_CACHE:-$HOME/.cache/handoff-tools}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
flags=(--dev --sanitizer none --target-dir "$cache/fuzz-target")
echo "fuzz.sh: building ${targets[*]}" >&2
for target in "${targets[@]}"; do
  cargo fuzz build "${flags[@]}" "$target"
done

status=0
summary=()
for target in "${targets[@]}"; do
  work=$cache/fuzz-corpus/$target
  mkdir -p "$work" "fuzz/artifacts/$target"
  log=$(mktemp)
  echo "fuzz.sh: $target for ${seconds}s" >&2
  if cargo fuzz run "${flags[@]}" "$target" "$work" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -max_len=65536 -timeout=20 -rss_limit_mb=3072 \
      -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
    tail -60 "$log" >&2
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "$work" -type f | wc -l)
  summary+=("$(printf '%-11s %-6s %10s executions in %ss, working corpus %s inputs' \
    "$target" "$result" "${runs:-?}" "$seconds" "$corpus")")
  rm -f "$log"
done
printf '%s\n' "${summary[@]}"
exit $status
