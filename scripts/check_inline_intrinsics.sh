#!/usr/bin/env bash
# Fails when a release binary holds an out-of-line copy of a SIMD intrinsic (a `core::arch`
# intrinsic or a pulp wrapper of one). Such a copy exists only when some caller was compiled
# without the kernel level's target features (a closure, `std::array::from_fn`, a helper
# without `#[inline(always)]`) and calls the one-instruction function once per vector
# operation. Only the release profile is checked: in incremental builds (256 codegen units) rustc
# does not copy `#[inline]` intrinsics into every unit, so some stay calls there by design.
#
#   bash scripts/check_inline_intrinsics.sh target/release/performer
set -euo pipefail
bin=${1:?usage: check_inline_intrinsics.sh BINARY}
command -v nm >/dev/null || { echo "check_inline_intrinsics: nm (binutils) is missing" >&2; exit 1; }
found=$(nm --demangle --defined-only "$bin" | cut -d' ' -f3- \
    | grep -E '(core_arch::x86|pulp::x86).*::_mm[a-z0-9_]*$' || true)
if [ -n "$found" ]; then
    echo "check_inline_intrinsics: intrinsics compiled out of line in $bin:" >&2
    echo "$found" >&2
    exit 1
fi
echo "check_inline_intrinsics: no out-of-line intrinsics in $bin"
