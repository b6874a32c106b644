#!/usr/bin/env bash
# Two stateless `performer serve` replicas behind HAProxy (round robin), sessions in Redis,
# everything on 127.0.0.1. Runs and checks four scenarios:
#   1. a session created through the proxy and continued alternately on both replicas gives
#      the text of one uninterrupted greedy generation;
#   2. a replica killed (SIGKILL) mid-stream: the session stays at its last committed version
#      and the retried request completes on the other replica;
#   3. Redis killed: 503 with Retry-After for session requests, a plain completion still
#      succeeds; Redis restarted (append-only file, fsync always): every session is there;
#   4. a load test through the proxy: aggregate tokens/s of one replica against two, each
#      with --threads 1 and pinned to one core (HAProxy and the load client on cores of their
#      own when there are four or more).
# Installs redis-server and haproxy from Debian's packages if missing. Exits non-zero on any
# failure; a trap stops everything it started.
#
# Usage: scripts/cluster-demo.sh   (environment: PERFORMER_BIN, MODEL, BASE_PORT,
#        LOAD_SECONDS, LOAD_CONCURRENCY, LOAD_TOKENS, LOAD_RUNS, MIN_RATIO)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${PERFORMER_BIN:-target/release/performer}
MODEL=${MODEL:-models/performer-byte}
BASE_PORT=${BASE_PORT:-17380}
REDIS_PORT=$BASE_PORT
PROXY_PORT=$((BASE_PORT + 1))
R1_PORT=$((BASE_PORT + 2))
R2_PORT=$((BASE_PORT + 3))
LOAD_SECONDS=${LOAD_SECONDS:-10}
# Streams per replica: the one-replica run has this many, the two-replica run twice as many
# (each replica sees the same load, so each batches as many rows).
LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-8}
LOAD_TOKENS=${LOAD_TOKENS:-64}
# Load-test runs per configuration (interleaved); the table shows each run and the median.
LOAD_RUNS=${LOAD_RUNS:-3}
# The issue's target for two replicas against one.
# Checked only with four cores or more (see scenario 4), or when MIN_RATIO is given.
MIN_RATIO_SET=${MIN_RATIO:+1}
MIN_RATIO=${MIN_RATIO:-1.7}
PROXY=http://127.0.0.1:$PROXY_PORT

say() { echo "cluster-demo: $*" >&2; }
fail() {
    say "FAIL: $*"
    exit 1
}
pass() { say "PASS: $*"; }

WORK=$(mktemp -d -t performer-cluster-XXXXXX)
declare -A PID=()
cleanup() {
    local rc=$?
    for name in "${!PID[@]}"; do
        kill "${PID[$name]}" 2>/dev/null || true
    done
    for name in "${!PID[@]}"; do
        wait "${PID[$name]}" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        say "logs in $WORK (kept after a failure)"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- what it needs -------------------------------------------------------------------------
if ! command -v redis-server >/dev/null || ! command -v haproxy >/dev/null; then
    say "installing redis-server and haproxy (Debian packages)"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server haproxy >/dev/null
    elif command -v sudo >/dev/null; then
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server haproxy >/dev/null
    else
        fail "redis-server and haproxy are missing and this user cannot install them"
    fi
fi
for tool in curl jq redis-cli; do
    command -v "$tool" >/dev/null || fail "$tool is needed"
done
if [ ! -x "$BIN" ]; then
    say "building $BIN"
    cargo build --release -p performer-cli >&2
fi
CORES=$(nproc)
# With four cores or more, HAProxy and the load client get cores of their own (2 and 3), so
# that the replicas' cores (0 and 1) serve only the replicas; with fewer, they share them.
PROXY_PIN=()
CLIENT_PIN=()
if [ "$CORES" -ge 4 ] && command -v taskset >/dev/null; then
    PROXY_PIN=(taskset -c 2)
    CLIENT_PIN=(taskset -c 3)
fi

# --- the processes -------------------------------------------------------------------------
start_redis() {
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK" \
        --appendonly yes --appendfsync always --save "" \
        --daemonize no --logfile "$WORK/redis.log" &
    PID[redis]=$!
    for _ in $(seq 200); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    fail "redis-server did not start (see $WORK/redis.log)"
}

# start_replica N: replica N (1 or 2) on its port, pinned to core N-1 when there are two.
start_replica() {
    local n=$1 port
    port=$([ "$n" = 1 ] && echo "$R1_PORT" || echo "$R2_PORT")
    local pin=()
    if [ "$CORES" -ge 2 ] && command -v taskset >/dev/null; then
        pin=(taskset -c $((n - 1)))
    fi
    "${pin[@]}" "$BIN" serve --model "$MODEL" --host 127.0.0.1 --port "$port" --threads 1 \
        --session-store "redis://127.0.0.1:$REDIS_PORT/0" --grace 1 \
        >>"$WORK/replica$n.log" 2>&1 &
    PID[r$n]=$!
    for _ in $(seq 400); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
        sleep 0.05
    done
    fail "replica $n did not start (see $WORK/replica$n.log)"
}

stop() {
    local name=$1 signal=${2:-TERM}
    if [ -n "${PID[$name]:-}" ]; then
        kill -"$signal" "${PID[$name]}" 2>/dev/null || true
        wait "${PID[$name]}" 2>/dev/null || true
        unset "PID[$name]"
    fi
}

start_haproxy() {
    cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 2048
defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    # A connection refused by a dead replica is retried on the other one.
    retries 3
    option redispatch 1
frontend proxy
    bind 127.0.0.1:$PROXY_PORT
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    http-response set-header X-Served-By %s
    server r1 127.0.0.1:$R1_PORT check inter 300ms fall 2 rise 2
    server r2 127.0.0.1:$R2_PORT check inter 300ms fall 2 rise 2
EOF
    "${PROXY_PIN[@]}" haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
    PID[haproxy]=$!
    for _ in $(seq 200); do
        curl -sf "$PROXY/health" >/dev/null && return 0
        sleep 0.05
    done
    fail "haproxy did not start (see $WORK/haproxy.log)"
}

# wait_backends N: until N replicas answer health checks through the proxy (round robin:
# 2N requests see N distinct servers).
wait_backends() {
    local want=$1
    for _ in $(seq 100); do
        local seen
        seen=$(for _ in $(seq $((2 * want))); do
            curl -s -o /dev/null -D - "$PROXY/health" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-served-by" {print $2}'
        done | sort -u | wc -l)
        [ "$seen" -eq "$want" ] && return 0
        sleep 0.2
    done
    fail "the proxy does not see $want replicas"
}

# --- helpers -------------------------------------------------------------------------------
# post PATH JSON: body to $WORK/body, headers to $WORK/headers; prints the status.
post() {
    curl -s -o "$WORK/body" -D "$WORK/headers" -w '%{http_code}' \
        -H 'content-type: application/json' -d "$2" "$PROXY$1"
}
served_by() { tr -d '\r' <"$WORK/headers" | awk -F': ' 'tolower($1)=="x-served-by" {print $2}'; }
greedy() { "$BIN" generate --model "$MODEL" --prompt "$1" --max-tokens "$2" --temperature 0 2>/dev/null; }
# The text of an SSE body (error chunks make it fail).
sse_text() {
    grep '^data: ' "$1" | sed 's/^data: //' | grep -v '^\[DONE\]$' |
        jq -j 'if .error then error(.error.message) else (.choices[0].text // "") end'
}

# --- start ---------------------------------------------------------------------------------
start_redis
start_replica 1
start_replica 2
start_haproxy
wait_backends 2
say "redis :$REDIS_PORT, replicas :$R1_PORT :$R2_PORT, haproxy $PROXY (round robin)"

# --- 1: one session, both replicas ----------------------------------------------------------
PROMPT="Once upon a time"
[ "$(post /v1/sessions "$(jq -nc --arg p "$PROMPT" '{prompt: $p}')")" = 201 ] || fail "create: $(cat "$WORK/body")"
SID=$(jq -r .id "$WORK/body")
TEXT=""
SERVERS=""
for i in 1 2 3 4 5 6; do
    stream=$([ $((i % 2)) = 0 ] && echo true || echo false)
    code=$(post "/v1/sessions/$SID/completions" "{\"max_tokens\": 8, \"temperature\": 0, \"stream\": $stream}")
    [ "$code" = 200 ] || fail "continuation $i: HTTP $code $(cat "$WORK/body")"
    SERVERS+="$(served_by) "
    if [ "$stream" = true ]; then
        grep -q '^data: \[DONE\]' "$WORK/body" || fail "continuation $i: no [DONE]"
        TEXT+=$(sse_text "$WORK/body")
    else
        TEXT+=$(jq -j '.choices[0].text' "$WORK/body")
    fi
done
WANT=$(greedy "$PROMPT" 48)
[ "$(echo "$SERVERS" | tr ' ' '\n' | sort -u | grep -c .)" = 2 ] || fail "served by $SERVERS (want both)"
[ "$TEXT" = "$WANT" ] || fail "alternating text differs:
  got:  $(printf %q "$TEXT")
  want: $(printf %q "$WANT")"
pass "1. session continued on $SERVERS= one greedy generation of 48 tokens"

# --- 2: a replica killed mid-stream ---------------------------------------------------------
killed=""
for attempt in 1 2 3; do
    [ "$(post /v1/sessions "$(jq -nc --arg p "$PROMPT" '{prompt: $p}')")" = 201 ] || fail "create: $(cat "$WORK/body")"
    KID=$(jq -r .id "$WORK/body")
    before=$(curl -s "$PROXY/v1/sessions/$KID" | jq .position)
    : >"$WORK/stream"
    curl -sN -D "$WORK/stream.headers" -H 'content-type: application/json' \
        -d '{"max_tokens": 480, "temperature": 0, "stream": true}' \
        "$PROXY/v1/sessions/$KID/completions" >"$WORK/stream" 2>/dev/null &
    CURL=$!
    for _ in $(seq 2000); do
        grep -q '^data: {' "$WORK/stream" 2>/dev/null && break
        sleep 0.005
    done
    victim=$(tr -d '\r' <"$WORK/stream.headers" | awk -F': ' 'tolower($1)=="x-served-by" {print $2}')
    [ -n "$victim" ] || fail "the stream did not start"
    stop "$victim" KILL
    wait "$CURL" || true
    if grep -q '^data: \[DONE\]' "$WORK/stream"; then
        say "the stream ended before the kill (attempt $attempt); again"
        start_replica "${victim#r}"
        wait_backends 2
        continue
    fi
    killed=$victim
    break
done
[ -n "$killed" ] || fail "could not kill a replica mid-stream in 3 attempts"
got=$(grep -c '^data: {' "$WORK/stream" || true)
after=$(curl -s "$PROXY/v1/sessions/$KID" | jq .position)
[ "$after" = "$before" ] || fail "after the kill the session is at $after, its last commit was $before"
code=$(post "/v1/sessions/$KID/completions" '{"max_tokens": 16, "temperature": 0}')
[ "$code" = 200 ] || fail "retry: HTTP $code $(cat "$WORK/body")"
other=$(served_by)
[ "$other" != "$killed" ] || fail "the retry was served by the killed replica"
[ "$(jq -j '.choices[0].text' "$WORK/body")" = "$(greedy "$PROMPT" 16)" ] || fail "the retry's text differs"
pass "2. $killed killed after $got chunks: session still at position $before, retry completed on $other"
start_replica "${killed#r}"
wait_backends 2

# --- 3: Redis down and back -------------------------------------------------------------------
count_before=$(curl -s "$PROXY/v1/sessions" | jq '.data | length')
stop redis KILL
code=$(post "/v1/sessions/$SID/completions" '{"max_tokens": 8, "temperature": 0}')
[ "$code" = 503 ] || fail "session request with Redis down: HTTP $code (want 503)"
retry=$(tr -d '\r' <"$WORK/headers" | awk -F': ' 'tolower($1)=="retry-after" {print $2}')
[ -n "$retry" ] || fail "the 503 has no Retry-After"
[ "$(jq -r .error.code "$WORK/body")" = store_unavailable ] || fail "503 body: $(cat "$WORK/body")"
code=$(post /v1/sessions '{"prompt": "x"}')
[ "$code" = 503 ] || fail "session creation with Redis down: HTTP $code (want 503)"
code=$(post /v1/completions "$(jq -nc --arg p "$PROMPT" '{prompt: $p, max_tokens: 8, temperature: 0}')")
[ "$code" = 200 ] || fail "stateless completion with Redis down: HTTP $code"
[ "$(jq -j '.choices[0].text' "$WORK/body")" = "$(greedy "$PROMPT" 8)" ] || fail "stateless text differs"
start_redis
count_after=$(curl -s "$PROXY/v1/sessions" | jq '.data | length')
[ "$count_after" = "$count_before" ] || fail "$count_before sessions before Redis stopped, $count_after after"
code=$(post "/v1/sessions/$SID/completions" '{"max_tokens": 8, "temperature": 0}')
[ "$code" = 200 ] || fail "after Redis came back: HTTP $code $(cat "$WORK/body")"
TEXT+=$(jq -j '.choices[0].text' "$WORK/body")
[ "$TEXT" = "$(greedy "$PROMPT" 56)" ] || fail "the session continued wrongly after Redis came back"
pass "3. Redis down: 503 (Retry-After: $retry) for sessions, stateless 200; back: $count_after sessions, session continues exactly"

# --- 4: load, one replica against two ---------------------------------------------------------
# CPU seconds (user + system) a process has used so far (0 when it is not running).
cpu() {
    local ticks
    ticks=$(awk '{print $14 + $15}' "/proc/${1:-0}/stat" 2>/dev/null || echo 0)
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz}'
}
# load N: one load-test run through the proxy with N streams; prints its aggregate tokens/s.
load() {
    local h r1 r2 client
    h=$(cpu "${PID[haproxy]}") r1=$(cpu "${PID[r1]:-}") r2=$(cpu "${PID[r2]:-}")
    client=$({ TIMEFORMAT='%U %S'; time "${CLIENT_PIN[@]}" "$BIN" loadtest --url "$PROXY" --concurrency "$1" \
        --duration "$LOAD_SECONDS" --max-tokens "$LOAD_TOKENS" --prompt "$PROMPT" >"$WORK/load.md"; } 2>&1 |
        tail -1 | awk '{printf "%.1f", $1 + $2}')
    cat "$WORK/load.md" >&2
    say "CPU seconds in this run: replica 1 $(awk -v a="$r1" -v b="$(cpu "${PID[r1]:-}")" 'BEGIN {printf "%.1f", b - a}'), replica 2 $(awk -v a="$r2" -v b="$(cpu "${PID[r2]:-}")" 'BEGIN {printf "%.1f", (b > a) ? b - a : 0}'), haproxy $(awk -v a="$h" -v b="$(cpu "${PID[haproxy]}")" 'BEGIN {printf "%.1f", b - a}'), load client $client (of $((CORES * LOAD_SECONDS)) available)"
    local errors
    errors=$(awk -F'|' 'NR==3 {gsub(/ /, "", $4); print $4}' "$WORK/load.md")
    [ "$errors" = 0 ] || fail "the load test had $errors errors"
    awk -F'|' 'NR==3 {gsub(/ /, "", $5); print $5}' "$WORK/load.md"
}
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
# Interleaved, side by side: one replica (r2 stopped), two, one, two, ...
one_runs=""
two_runs=""
for _ in $(seq "$LOAD_RUNS"); do
    stop r2
    wait_backends 1
    one_runs+="$(load "$LOAD_CONCURRENCY") "
    start_replica 2
    wait_backends 2
    two_runs+="$(load $((2 * LOAD_CONCURRENCY))) "
done
one=$(median "$one_runs")
two=$(median "$two_runs")
ratio=$(awk -v a="$one" -v b="$two" 'BEGIN {printf "%.2f", b / a}')
echo "| replicas (--threads 1 each, pinned) | aggregate tokens/s, runs | median |"
echo "|---|---|---|"
echo "| 1 | ${one_runs% } | $one |"
echo "| 2 | ${two_runs% } | $two |"
echo "ratio of medians: $ratio ($LOAD_CONCURRENCY streams per replica, $LOAD_TOKENS tokens per request, ${LOAD_SECONDS} s per run, $CORES cores)"
if [ "$CORES" -ge 4 ] || [ -n "${MIN_RATIO_SET:-}" ]; then
    awk -v r="$ratio" -v m="$MIN_RATIO" 'BEGIN {exit !(r >= m)}' || fail "two replicas reach ${ratio}x of one, under $MIN_RATIO"
    pass "4. load: one replica $one tokens/s, two $two tokens/s (medians of $LOAD_RUNS), ${ratio}x"
else
    # Under four cores HAProxy and the load client share the replicas' two cores: two replicas
    # cannot each have a core of their own, so the ratio is reported, not checked (set
    # MIN_RATIO to check it anyway).
    pass "4. load: one replica $one tokens/s, two $two tokens/s (medians of $LOAD_RUNS), ${ratio}x (not checked against $MIN_RATIO: $CORES cores, replicas share them with the proxy and the client)"
fi
say "all scenarios passed"
