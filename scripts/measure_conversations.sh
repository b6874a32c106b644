#!/usr/bin/env bash
# The README's conversation figures: a 50-turn conversation on the gpt2-small shape (random
# weights, f32), 64 tokens per reply, every turn continued through `previous_response_id` and
# re-sent whole through chat completions side by side (`performer loadtest --turns`), then 16
# conversations at once. Writes the tables and docs/conversation-ttft.svg.
# Usage: scripts/measure_conversations.sh [PERFORMER_BINARY] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release/performer}"
OUT="${2:-target/conversations}"
TURNS="${TURNS:-50}"
mkdir -p "$OUT"
if [[ ! -f "$OUT/gpt2-small/model.safetensors" ]]; then
    "$BIN" bench --shape gpt2-small --synthetic-dir "$OUT/gpt2-small" --tg 1 --pp 0 -r 1 \
        --bandwidth-mib 0 --no-progress >/dev/null
fi
"$BIN" serve --model "$OUT/gpt2-small" --host 127.0.0.1 --port 0 --threads 2 \
    2>"$OUT/serve.log" &
PID=$!
trap 'kill "$PID" 2>/dev/null || true' EXIT
BASE=""
for _ in $(seq 1 600); do
    BASE="$(grep -o 'http://127.0.0.1:[0-9]*' "$OUT/serve.log" || true)"
    [[ -n "$BASE" ]] && break
    sleep 0.1
done
[[ -n "$BASE" ]] || { cat "$OUT/serve.log"; exit 1; }
"$BIN" loadtest --url "$BASE" --turns "$TURNS" --max-tokens 64 --concurrency 1 --chat-every 5 \
    --server-pid "$PID" --svg docs/conversation-ttft.svg | tee "$OUT/turns-c1.md"
"$BIN" loadtest --url "$BASE" --turns 8 --max-tokens 64 --concurrency 16 --chat-every 4 \
    --server-pid "$PID" | tee "$OUT/turns-c16.md"
kill -TERM "$PID"
wait "$PID"
trap - EXIT
