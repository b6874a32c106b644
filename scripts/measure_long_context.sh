#!/usr/bin/env bash
# Every issue-11 figure of models/performer-byte/MODEL_CARD.md, measured with the runtime, for the
# new model (models/performer-byte) and the old one (a copy of the previously shipped directory).
#   scripts/measure_long_context.sh OLD_MODEL_DIR OUT_DIR
# Needs target/release/performer (cargo build --release) and /usr/share/dict/words (wamerican).
set -euo pipefail
OLD=$1; OUT=$2; NEW=models/performer-byte
P="nice -n 5 target/release/performer --threads 1"
mkdir -p "$OUT"
# `need FILE`: true when FILE is still to be measured (a rerun keeps finished measurements)
need() { [ ! -s "$1" ]; }
for m in new old; do
  dir=$NEW; [ $m = old ] && dir=$OLD
  need "$OUT/$m-stream.json" && $P perplexity --model "$dir" --file $NEW/heldout.txt --by-position --json > "$OUT/$m-stream.json"
  need "$OUT/$m-w512.json" && $P perplexity --model "$dir" --file $NEW/heldout.txt --window 512 --by-position --json > "$OUT/$m-w512.json"
  # the whole held-out split (252,866 bytes; written by `scripts/train_long_context.py heldsplit`) as one stream
  need "$OUT/$m-split.json" && $P perplexity --model "$dir" --file data/heldsplit.txt --by-position --json > "$OUT/$m-split.json"
  for s in 1 2 3; do
    { printf 'ROMEO.\n'; $P generate --model "$dir" --prompt $'ROMEO.\n' --max-tokens 4000 --temperature 0.8 --seed $s 2> "$OUT/$m-seed$s.err"; } > "$OUT/$m-seed$s.txt"
    python3 scripts/dict_share.py "$OUT/$m-seed$s.txt" --last 1000 > "$OUT/$m-seed$s-last1000.json"
    python3 scripts/dict_share.py "$OUT/$m-seed$s.txt" --first 507 > "$OUT/$m-seed$s-first500.json"
  done
done
# the plot: new model's curve, old model's curve from its JSON (legend names set here)
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
for f in ("stream", "split"):
    v = json.load(open(f"{o}/old-{f}.json")); v["model"] = "old model (512-byte windows)"
    json.dump(v, open(f"{o}/old-{f}-named.json", "w"))
PY
$P perplexity --model $NEW --file $NEW/heldout.txt --by-position --plot $NEW/by-position.svg --plot-with "$OUT/old-stream-named.json" > /dev/null
$P perplexity --model $NEW --file data/heldsplit.txt --by-position --plot docs/long-context.svg --plot-with "$OUT/old-split-named.json" > /dev/null
# decode speed, one thread, old and new alternating (3 rounds)
for r in 1 2 3; do
  for m in new old; do
    dir=$NEW; [ $m = old ] && dir=$OLD
    $P bench --model "$dir" --threads 1 --depths 0,4k --tg 256 --pp 512 -r 3 --no-progress --json > "$OUT/$m-bench$r.json"
  done
done
