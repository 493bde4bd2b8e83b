#!/usr/bin/env bash
# Quickstart: start `handoff serve`, put a Parquet file into a link, seal it, and read two ranks'
# shards back. Installs what it needs (pyarrow, to make the sample file).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q --disable-pip-version-check pyarrow numpy
cargo build -p handoff-cli
handoff=target/debug/handoff
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

python3 - "$work/features.parquet" <<'PY'
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
n = 100_000
rng = np.random.default_rng(0)
emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * 16, dtype=np.float32)), 16)
table = pa.table({"id": np.arange(n), "label": rng.integers(0, 2, n), "embedding": emb,
                  "split": np.where(rng.random(n) < 0.8, "train", "test")})
pq.write_table(table, sys.argv[1])
PY

export HANDOFF_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
$handoff serve --listen 127.0.0.1:8815 --http-listen 127.0.0.1:8816 > "$work/serve.out" &
server=$!
for _ in $(seq 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
cat "$work/serve.out"

$handoff put --link demo/features "$work/features.parquet" --seal
$handoff ls
$handoff stat demo/features
for rank in 0 1; do
  $handoff get --link demo/features --rank $rank --world-size 2 --batch-rows 1024 --shuffle \
    --out "$work/rank$rank.parquet"
done
python3 - "$work" <<'PY'
import sys, pyarrow.parquet as pq
ids = [set(pq.read_table(f"{sys.argv[1]}/rank{r}.parquet")["id"].to_pylist()) for r in (0, 1)]
print(f"rank 0: {len(ids[0])} rows, rank 1: {len(ids[1])} rows, overlap (padding to equal batches): {len(ids[0] & ids[1])}, "
      f"union: {len(ids[0] | ids[1])} of 100000")
PY
curl -sf http://127.0.0.1:8816/readyz
