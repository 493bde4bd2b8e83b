#!/usr/bin/env bash
# Runs the whole suite (scripts/test.sh, the README's test command) while `stress-ng --cpu N`
# keeps every core busy, RUNS times in a row, and prints each run's time and result.
#
#   bash scripts/stress-test.sh [--runs N] [--cpu N] [--logs DIR]
#
# The suite must pass here with its default waits: this is how we check that no test depends on
# an idle machine. HANDOFF_TEST_TIMEOUT_SCALE is passed through untouched (unset means 1).
# Exits non-zero if any run failed; each run's output is kept in DIR (default a new temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
cpu=$(nproc)
logs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --cpu) cpu=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stress-test.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$runs$cpu" in *[!0-9]*) echo "stress-test.sh: --runs and --cpu take whole numbers" >&2; exit 2 ;; esac
[ -n "$logs" ] || logs=$(mktemp -d -t handoff-stress.XXXXXX)
mkdir -p "$logs"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v stress-ng >/dev/null 2>&1; then
  echo "stress-test.sh: installing stress-ng" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends stress-ng >/dev/null
fi

# The hog runs for the whole script and goes with it, however the script ends.
stress-ng --cpu "$cpu" --quiet >"$logs/stress-ng.log" 2>&1 &
hog=$!
trap 'kill "$hog" 2>/dev/null || true; wait "$hog" 2>/dev/null || true' EXIT
echo "stress-test.sh: stress-ng --cpu $cpu (pid $hog); logs in $logs" >&2

failed=0
summary=()
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  if bash scripts/test.sh >"$logs/run-$i.log" 2>&1; then result=pass; else result="FAIL (exit $?)"; failed=$((failed + 1)); fi
  line=$(printf 'run %d/%d: %-16s %5ss  %s' "$i" "$runs" "$result" "$(( $(date +%s) - start ))" "$logs/run-$i.log")
  summary+=("$line")
  echo "stress-test.sh: $line" >&2
  # The failing test's lines, so the summary alone says what broke.
  if [ "$result" != pass ]; then
    grep -E "panicked at|FAILED|^FAILED|failed|Error" "$logs/run-$i.log" | head -20 >&2 || true
  fi
done

echo "== stress-test.sh: $((runs - failed))/$runs runs green under stress-ng --cpu $cpu ==" >&2
for line in "${summary[@]}"; do echo "  $line" >&2; done
[ "$failed" = 0 ]
