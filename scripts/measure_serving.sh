#!/usr/bin/env bash
# The README's "Serving" tables, in one run: batched decode (`bench --batch`) on the tiny and
# gpt2-small shapes and the shipped model, then `loadtest` against `performer serve` at
# concurrency 1/4/16/64 (depth 0 and sessions pre-filled to 4k), then 1,000 idle sessions with
# --max-session-memory 256MiB. Usage: scripts/measure_serving.sh [OUT_DIR] (release binary).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/serving}"
mkdir -p "$OUT"
BIN=target/release/performer
cargo build --release --quiet -p performer-cli --bin performer
SECS="${SECS:-5}"

for shape in tiny gpt2-small; do
    "$BIN" bench --shape "$shape" --synthetic-dir "$OUT/$shape" --batch 1,4,16,64 --depths 0,4k \
        --tg 16 -r 2 --threads 2 | tee "$OUT/bench-batch-$shape.md"
done
"$BIN" bench --model models/performer-byte --batch 1,16 --depths 0 --tg 64 -r 3 --threads 2 \
    | tee "$OUT/bench-batch-shipped.md"

serve_and_load() { # name model depth [extra serve args...]
    local name=$1 model=$2 depth=$3
    shift 3
    "$BIN" serve --model "$model" --host 127.0.0.1 --port 0 --threads 2 "$@" 2>"$OUT/serve-$name.log" &
    local pid=$! base=""
    for _ in $(seq 1 600); do
        base="$(grep -o 'http://127.0.0.1:[0-9]*' "$OUT/serve-$name.log" || true)"
        [[ -n "$base" ]] && break
        sleep 0.1
    done
    "$BIN" loadtest --url "$base" --concurrency 1,4,16,64 --duration "$SECS" --max-tokens 64 \
        --depth "$depth" --server-pid "$pid" | tee "$OUT/load-$name.md"
    kill -TERM "$pid"
    wait "$pid"
}
serve_and_load shipped-d0 models/performer-byte 0
serve_and_load shipped-d4k models/performer-byte 4096
serve_and_load tiny-d0 "$OUT/tiny" 0
serve_and_load gpt2-small-d0 "$OUT/gpt2-small" 0
serve_and_load gpt2-small-d4k "$OUT/gpt2-small" 4096 --max-session-memory 4GiB

# 1,000 idle sessions.
"$BIN" serve --model models/performer-byte --host 127.0.0.1 --port 0 --threads 2 \
    --max-session-memory 256MiB --session-dir "$OUT/sessions" 2>"$OUT/serve-idle.log" &
PID=$!
BASE=""
for _ in $(seq 1 600); do
    BASE="$(grep -o 'http://127.0.0.1:[0-9]*' "$OUT/serve-idle.log" || true)"
    [[ -n "$BASE" ]] && break
    sleep 0.1
done
python3 scripts/idle_sessions.py "$BASE" "$PID" 1000 | tee "$OUT/idle-sessions.txt"
kill -TERM "$PID"
wait "$PID"
rm -rf "$OUT/sessions"
