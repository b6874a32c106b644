#!/usr/bin/env bash
# The prefix cache's figures (docs/serving.md, README "Serving"): a random gpt2-small-shaped
# model behind `performer serve`, a 4,096-token shared head followed by a 32-token question,
# cold against warm time to first token (scripts/prefix_cache_ttft.py), first with the default
# cache, then with --prefix-cache-memory 0 as the control.
# Usage: scripts/measure_prefix_cache.sh [OUT_DIR] (builds the release binary; REPS=5).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/prefix-cache}"
REPS="${REPS:-5}"
THREADS="${THREADS:-2}"
mkdir -p "$OUT"
BIN=target/release/performer
cargo build --release --quiet -p performer-cli --bin performer
if [[ ! -f "$OUT/gpt2-small/model.safetensors" ]]; then
    # `bench` writes the synthetic model to --synthetic-dir (and keeps it); one short run.
    "$BIN" bench --shape gpt2-small --synthetic-dir "$OUT/gpt2-small" --pp 0 --tg 1 -r 1 \
        --threads "$THREADS" >/dev/null
fi

run() { # name reps [extra serve args...]
    local name=$1 reps=$2
    shift 2
    "$BIN" serve --model "$OUT/gpt2-small" --host 127.0.0.1 --port 0 --threads "$THREADS" "$@" \
        2>"$OUT/serve-$name.log" &
    local pid=$! base=""
    for _ in $(seq 1 600); do
        base="$(grep -o 'http://127.0.0.1:[0-9]*' "$OUT/serve-$name.log" || true)"
        [[ -n "$base" ]] && break
        sleep 0.1
    done
    echo "## $name ($*)"
    python3 scripts/prefix_cache_ttft.py "$base" --head 4096 --question 32 --reps "$reps" \
        | tee "$OUT/ttft-$name.md"
    kill -TERM "$pid"
    wait "$pid" || true
}
run cache "$REPS"
run no-cache 2 --prefix-cache-memory 0
