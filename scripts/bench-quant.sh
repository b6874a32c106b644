#!/bin/bash
# The quantized-weights comparison of docs/performance.md, in one run: synthetic gpt2-small,
# 2 threads, tg32 at depth 0 and pp512, f32 / bf16 / q8_0 / q4_0 back to back (each bench
# process probes the read bandwidth for its roofline column). Models are written once into
# $DIR (default /tmp/qbench) and reused.
set -e
B=${B:-target/release/performer}
DIR=${DIR:-/tmp/qbench}
for d in f32 bf16 q8_0 q4_0; do
  $B bench --shape gpt2-small --dtype $d --synthetic-dir "$DIR/$d" --tg 0 --pp 0 -r 1 \
    --bandwidth-mib 0 --no-progress >/dev/null 2>&1 || true
done
date -u
for d in f32 bf16 q8_0 q4_0; do
  $B bench --shape gpt2-small --dtype $d --synthetic-dir "$DIR/$d" --tg 32 --pp 512 --depths 0 \
    --threads 2 -r 3 --bandwidth-mib 512 --no-progress 2>"$DIR/$d.err" | tee "$DIR/$d.md"
done
date -u
