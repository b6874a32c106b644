#!/bin/bash
# The quantized-weights comparison of docs/performance.md, in one run: synthetic gpt2-small,
# 2 threads, tg32 at depth 0 and pp512, f32 / bf16 / q8_0 / q4_0 / q4_1 (each quantized one with
# both kernel methods) back to back (each bench
# process probes the read bandwidth for its roofline column). Models are written once into
# $DIR (default /tmp/qbench) and reused.
set -e
B=${B:-target/release/performer}
DIR=${DIR:-/tmp/qbench}
# Write every model first (a one-token run: bench refuses a run with nothing to measure).
for d in f32 bf16 q8_0 q4_0 q4_1; do
  $B bench --shape gpt2-small --dtype $d --synthetic-dir "$DIR/$d" --tg 1 --pp 0 -r 1 \
    --bandwidth-mib 0 --no-progress >/dev/null 2>&1 || true
done
date -u
# "q8_0" = the q8_0 model decoded with --quant-kernel dequant, "q8_0:int8" with int8 (the default).
for run in f32 bf16 q8_0 q8_0:int8 q4_0 q4_0:int8 q4_1 q4_1:int8; do
  d=${run%%:*}
  k=dequant
  [ "$run" != "$d" ] && k=${run#*:}
  $B bench --shape gpt2-small --dtype $d --synthetic-dir "$DIR/$d" --quant-kernel $k --tg 32 \
    --pp 512 --depths 0 --threads 2 -r 3 --bandwidth-mib 512 --no-progress \
    2>"$DIR/$run.err" | tee "$DIR/$run.md"
done
date -u
