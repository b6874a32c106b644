#!/usr/bin/env bash
# The default build on older CPUs, emulated with qemu-user (Debian: apt-get install qemu-user):
# `performer info` must name the level each CPU model gets, and the kernel, quantized-kernel,
# golden and decoder tests must pass there (Nehalem: no AVX, the portable level; Haswell:
# AVX2+FMA+F16C, no AVX-512 and no VNNI, so the int8 method runs `vpmaddubsw`). Run from the
# repository root after `cargo test --release --no-run` (or, for just these binaries,
# `cargo test --release -p performer --test kernels --test quant --test quant_method --test
# golden --test decoder --no-run && cargo build --release -p performer-cli`).
#
#   scripts/qemu_levels.sh
set -euo pipefail
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 2; }
# qemu warns on every start about host CPUID bits it does not emulate; keep the rest of stderr.
qemu() { qemu-x86_64 "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }
newest() { ls -t target/release/deps/"$1"-* | grep -v '\.d$' | head -1; }
tests=("$(newest kernels)" "$(newest golden)" "$(newest decoder)" "$(newest quant_method)")
# The quantized kernels against their twins at every level the emulated CPU has (the model
# and quantize_dir tests of that binary are slow under emulation and level-independent).
quant=("$(newest quant)" every_method_matches the_matrix_product_path widening_matches
    q8_0_codes_at_the_extremes rows_of_no_weights the_default_method_is_int8
    every_level_quantizes packed_rows_match_the_row_major)
for pair in Nehalem:portable Haswell:avx2; do
    cpu=${pair%%:*} want=${pair##*:}
    line=$(PERFORMER_ISA= qemu -cpu "$cpu" target/release/performer info --model models/performer-byte | grep '^kernels:')
    echo "$cpu: $line"
    [[ $line == "kernels: $want "* ]] || { echo "expected $want on $cpu" >&2; exit 1; }
    for t in "${tests[@]}"; do
        echo "$cpu: $(basename "$t")"
        qemu -cpu "$cpu" "$t" -q
    done
    echo "$cpu: $(basename "${quant[0]}") (kernel tests)"
    qemu -cpu "$cpu" "${quant[@]}" -q
done
