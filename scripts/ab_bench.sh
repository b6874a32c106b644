#!/usr/bin/env bash
# Interleaved A/B of two `performer` binaries on the same bench arguments, for a shared, noisy
# machine: the runs alternate A, B, A, B, … so drift falls on both alike, and the medians of the
# runs' mean tokens/s (all rows of a run pooled) are compared.
#
#   scripts/ab_bench.sh RUNS OLD_BINARY NEW_BINARY -- BENCH_ARGS…
#   scripts/ab_bench.sh 5 /tmp/performer-old target/release/performer -- --shape tiny --pp 0 --tg 256 -r 3 --threads 1
#
# AB_BEFORE_EACH, if set, is a shell command run before every run, e.g. to drop a kept
# synthetic model from the page cache so that each binary maps it fresh from disk:
#   AB_BEFORE_EACH='scripts/drop_page_cache.py /tmp/syn/model.safetensors' scripts/ab_bench.sh …
set -euo pipefail
if [[ $# -lt 4 || $4 != "--" ]]; then
    echo "usage: $0 RUNS OLD_BINARY NEW_BINARY -- BENCH_ARGS..." >&2
    exit 2
fi
runs=$1 a=$2 b=$3
shift 4
means() {
    "$1" bench "${@:2}" --bandwidth-mib 0 --no-progress --json 2>/dev/null |
        python3 -c "import json,sys; print(' '.join(str(r['tokens_per_s']['mean']) for r in json.load(sys.stdin)['rows']))"
}
ra=() rb=()
before() { if [[ -n ${AB_BEFORE_EACH:-} ]]; then eval "$AB_BEFORE_EACH"; fi; }
for _ in $(seq "$runs"); do
    before
    ra+=($(means "$a" "$@"))
    before
    rb+=($(means "$b" "$@"))
done
python3 - "${ra[*]}" "${rb[*]}" <<'PY'
import statistics as st, sys
a = [float(x) for x in sys.argv[1].split()]
b = [float(x) for x in sys.argv[2].split()]
ma, mb = st.median(a), st.median(b)
print(f"A median {ma:.2f} t/s (n={len(a)})  B median {mb:.2f} t/s (n={len(b)})  B/A {mb / ma:.3f}")
PY
