#!/usr/bin/env bash
# The official `openai` Python client (installed from PyPI into a fresh venv) against
# `performer serve` on 127.0.0.1: streaming and non-streaming greedy completions must equal
# `performer generate`'s text for the same request; chat completions and the Responses API
# (server/tests/openai_client.py). Also checks that SIGTERM stops the server
# cleanly. Usage: scripts/test_openai_client.sh [PERFORMER_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${1:-}"
if [[ -z "$BIN" ]]; then
    cargo build --quiet -p performer-cli --bin performer
    BIN=target/debug/performer
fi
MODEL=models/performer-byte
PROMPT="The sea"
MAX_TOKENS=32

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check openai

"$BIN" generate --model "$MODEL" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" --temperature 0 \
    >"$WORK/expected.txt" 2>/dev/null

echo "test-key" >"$WORK/keys"
"$BIN" serve --model "$MODEL" --host 127.0.0.1 --port 0 --api-key-file "$WORK/keys" \
    --session-dir "$WORK/sessions" --grace 2 2>"$WORK/server.log" &
SERVER_PID=$!
BASE=""
for _ in $(seq 1 300); do
    BASE="$(grep -o 'http://127.0.0.1:[0-9]*' "$WORK/server.log" || true)"
    [[ -n "$BASE" ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
    sleep 0.1
done
[[ -n "$BASE" ]] || { echo "the server did not start"; cat "$WORK/server.log"; exit 1; }

"$WORK/venv/bin/python" server/tests/openai_client.py "$BASE" "$WORK/expected.txt" "$PROMPT" "$MAX_TOKENS"

kill -TERM "$SERVER_PID"
wait "$SERVER_PID"
SERVER_PID=""
# The stored responses of the conversations above are sessions: written out at the stop.
grep -q "wrote [0-9]* sessions" "$WORK/server.log"
echo "openai client test: passed"
