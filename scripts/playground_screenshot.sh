#!/usr/bin/env bash
# Loads the playground in headless Chromium (Debian's `chromium`), submits a prompt through the
# page's form (DevTools protocol, scripts/playground_check.py), waits for the streamed text,
# checks it reached the page, and saves a screenshot. Usage: scripts/playground_screenshot.sh [OUT.png] [PERFORMER_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/playground.png}"
BIN="${2:-}"
if [[ -z "$BIN" ]]; then
    cargo build --quiet -p performer-cli --bin performer
    BIN=target/debug/performer
fi
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill "$SERVER_PID"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" serve --model models/performer-byte --host 127.0.0.1 --port 0 2>"$WORK/server.log" &
SERVER_PID=$!
BASE=""
for _ in $(seq 1 300); do
    BASE="$(grep -o 'http://127.0.0.1:[0-9]*' "$WORK/server.log" || true)"
    [[ -n "$BASE" ]] && break
    sleep 0.1
done
[[ -n "$BASE" ]] || { cat "$WORK/server.log"; exit 1; }

mkdir -p "$(dirname "$OUT")"
python3 scripts/playground_check.py chromium "$BASE/" "$OUT" "$WORK/profile"
echo "playground: a prompt submitted through the page streamed its text; screenshot in $OUT"
