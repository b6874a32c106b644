#!/usr/bin/env bash
# The default build on older CPUs, emulated with qemu-user (Debian: apt-get install qemu-user):
# `performer info` must name the level each CPU model gets, and the kernel, golden and decoder
# tests must pass there (Nehalem: no AVX, the portable level; Haswell: AVX2+FMA+F16C, no
# AVX-512). Run from the repository root after `cargo test --release --no-run`.
#
#   scripts/qemu_levels.sh
set -euo pipefail
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 2; }
# qemu warns on every start about host CPUID bits it does not emulate; keep the rest of stderr.
qemu() { qemu-x86_64 "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }
newest() { ls -t target/release/deps/"$1"-* | grep -v '\.d$' | head -1; }
tests=("$(newest kernels)" "$(newest golden)" "$(newest decoder)")
for pair in Nehalem:portable Haswell:avx2; do
    cpu=${pair%%:*} want=${pair##*:}
    line=$(PERFORMER_ISA= qemu -cpu "$cpu" target/release/performer info --model models/performer-byte | grep '^kernels:')
    echo "$cpu: $line"
    [[ $line == "kernels: $want "* ]] || { echo "expected $want on $cpu" >&2; exit 1; }
    for t in "${tests[@]}"; do
        echo "$cpu: $(basename "$t")"
        qemu -cpu "$cpu" "$t" -q
    done
done
