#!/usr/bin/env bash
# Run the fuzz targets (fuzz/fuzz_targets: ingest, decode, shard_plan, filter), each for a bounded
# time, and report executions per target. A crash fails the script and leaves its input under
# fuzz/artifacts/<target>/; replay it with `bash scripts/fuzz.sh --replay <target> <file>`.
#
#   bash scripts/fuzz.sh                      # every target, 60 s each
#   bash scripts/fuzz.sh --seconds 600 ingest
#
# Each target starts from the committed seeds (fuzz/corpus/<target>, never written) and a working
# corpus in ~/.cache/handoff-tools/fuzz-corpus/<target> that it grows, so a later run starts where
# the last one stopped. The targets are libFuzzer binaries, as cargo-fuzz builds them (the same
# coverage instrumentation; `cargo fuzz run <target>` works too), built here with the `fuzz`
# profile into ~/.cache/handoff-tools/fuzz-target: overflow checks and debug assertions on, no
# sanitizer (the workspace forbids unsafe code), and dependencies unoptimised but for libFuzzer
# and the decoders, so that a cold build stays short on a fresh CI machine (7 min; Cargo.toml's
# `profile.fuzz` says which, docs/benchmarks.md what it costs).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
replay=()
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --replay) replay=("$2" "$3"); shift 3 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(ingest decode shard_plan filter)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
[ ${#replay[@]} -eq 0 ] || targets=("${replay[0]}")

cache=${HANDOFF_TOOLS_CACHE:-$HOME/.cache/handoff-tools}
triple=$(rustc -vV | sed -n 's/^host: //p')
# What cargo-fuzz passes (cargo fuzz build --sanitizer none --debug-assertions).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "fuzz.sh: building ${targets[*]} (the first build takes a while)" >&2
bins=()
for target in "${targets[@]}"; do bins+=(--bin "$target"); done
cargo build --profile fuzz --target "$triple" --target-dir "$cache/fuzz-target" \
  -p handoff-fuzz "${bins[@]}"
bin_dir=$cache/fuzz-target/$triple/fuzz

if [ ${#replay[@]} -gt 0 ]; then
  exec "$bin_dir/${replay[0]}" "${replay[1]}"
fi

status=0
summary=()
for target in "${targets[@]}"; do
  work=$cache/fuzz-corpus/$target
  mkdir -p "$work" "fuzz/artifacts/$target"
  log=$(mktemp)
  echo "fuzz.sh: $target for ${seconds}s" >&2
  if "$bin_dir/$target" "$work" "fuzz/corpus/$target" \
      -max_total_time="$seconds" -max_len=65536 -timeout=20 -rss_limit_mb=3072 \
      -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 >"$log" 2>&1; then
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
