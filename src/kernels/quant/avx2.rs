//! The AVX2 level's quantized kernels, on 256-bit registers: dequantizing rows (codes widened
//! to f32, FMA), int8 rows by `vpmaddubsw` + `vpmaddwd` (or AVX-VNNI `vpdpbusd` on ymm,
//! `VNNI`), and the widening of rows to f32 for the matrix-product paths.
//!
//! Every function is `#[inline(always)]` and `unsafe`: compiled only inside the
//! `#[target_feature]` entry points of `super::entry` (the AVX2 level's, and the AVX-512
//! level's where AVX-512 has no better code), never as calls of their own, so the intrinsics
//! inline into the entry point. Their safety contract: the entry point's features are
//! available (AVX2, FMA, F16C; `avxvnni` where `VNNI` is `AVX_VNNI`, `avx512vl` and
//! `avx512vnni` where it is `AVX512VL_VNNI`) and the slices are as long as
//! each function says.

use super::activation::{
    check_packed, check_rows, check_rows_batch, int8_rows_by_tiles, Activation, RowTiles,
};
use crate::quant::packed::{PackedView, PACKED_ROWS};
use crate::quant::{QMatrix, QuantFormat, BLOCK};
use half::f16;
use std::arch::x86_64::*;

/// The int8 kernels' `VNNI` parameter: `vpmaddubsw` + `vpmaddwd`.
pub(super) const NO_VNNI: u8 = 0;
/// The int8 kernels' `VNNI` parameter: AVX-VNNI `vpdpbusd` (VEX), where the CPU has it.
pub(super) const AVX_VNNI: u8 = 1;
/// The int8 kernels' `VNNI` parameter: the same `vpdpbusd` on 256-bit registers by its
/// AVX-512 VL + VNNI encoding (EVEX). Only the tests take it: it runs the AVX-VNNI code path,
/// instruction for instruction but the encoding, on AVX-512 VNNI CPUs without AVX-VNNI.
pub(super) const AVX512VL_VNNI: u8 = 2;

/// `vpdpbusd` on 256-bit registers in the encoding `VNNI` names (never `NO_VNNI`).
#[inline(always)]
unsafe fn dpbusd<const VNNI: u8>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    if VNNI == AVX512VL_VNNI {
        _mm256_dpbusd_epi32(acc, a, b)
    } else {
        _mm256_dpbusd_avx_epi32(acc, a, b)
    }
}

/// The scales of blocks `b0..b0 + 8` widened to f32 (fewer at the end of the row, the rest
/// 0): one `vcvtph2ps` per 8 blocks. Needs `b0 < scales.len()`.
#[inline(always)]
unsafe fn widen8(scales: &[f16], b0: usize) -> __m256 {
    let n = scales.len() - b0;
    let p = scales.as_ptr().add(b0).cast::<u16>();
    let halves = if n >= 8 {
        _mm_loadu_si128(p.cast())
    } else {
        // The row's last group: copied, so that nothing past the row is read.
        let mut buf = [0u16; 8];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        _mm_loadu_si128(buf.as_ptr().cast())
    };
    _mm256_cvtph_ps(halves)
}

/// `v[b0..b0 + 8]` (fewer at the end, the rest 0). Needs `b0 < v.len()`.
#[inline(always)]
unsafe fn load8(v: &[f32], b0: usize) -> __m256 {
    let n = v.len() - b0;
    if n >= 8 {
        _mm256_loadu_ps(v.as_ptr().add(b0))
    } else {
        let mut buf = [0f32; 8];
        std::ptr::copy_nonoverlapping(v.as_ptr().add(b0), buf.as_mut_ptr(), n);
        _mm256_loadu_ps(buf.as_ptr())
    }
}

/// Per activation, the combined scales of blocks `b..b + 8` of a row (fewer at its end, the
/// rest 0): the row's weight scales, widened, times the activation's, in f32 as the twin
/// multiplies them. Needs `b < scales.len()` and a scale per block of the row in every
/// activation.
#[inline(always)]
unsafe fn combined_scales<const A: usize>(
    scales: &[f16],
    acts: [&Activation; A],
    b: usize,
) -> [__m256; A] {
    let ws = widen8(scales, b);
    let mut sc = [_mm256_setzero_ps(); A];
    for (s, act) in sc.iter_mut().zip(acts) {
        *s = _mm256_mul_ps(ws, load8(&act.scales, b));
    }
    sc
}

/// [`combined_scales`] of a whole group: blocks `b..b + 8`, all in the row (`b + 8 ≤
/// scales.len()`, and as many scales in every activation). Nothing but loads and multiplies,
/// so the kernels' loops call no `memcpy` (around which the accumulators were spilled to the
/// stack); the row's last, partial group is [`combined_scales`]'s, taken before the loop.
#[inline(always)]
unsafe fn combined_scales_full<const A: usize>(
    scales: &[f16],
    acts: [&Activation; A],
    b: usize,
) -> [__m256; A] {
    debug_assert!(b + 8 <= scales.len());
    let ws = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(b).cast()));
    let mut sc = [_mm256_setzero_ps(); A];
    for (s, act) in sc.iter_mut().zip(acts) {
        debug_assert!(b + 8 <= act.scales.len());
        *s = _mm256_mul_ps(ws, _mm256_loadu_ps(act.scales.as_ptr().add(b)));
    }
    sc
}

/// The combined scales of the group starting at `b`: from [`combined_scales_full`] while the
/// group is whole, else `last` (the row's partial last group, computed once before the loop).
#[inline(always)]
unsafe fn group_scales<const A: usize>(
    scales: &[f16],
    acts: [&Activation; A],
    b: usize,
    last: [__m256; A],
) -> [__m256; A] {
    if b + 8 <= scales.len() {
        combined_scales_full(scales, acts, b)
    } else {
        last
    }
}

/// The combined scales of a row's partial last group (blocks `n / 8 · 8 ..`), zero when the
/// row has none: computed before a kernel's loop, where no accumulator is live yet.
#[inline(always)]
unsafe fn last_group_scales<const A: usize>(scales: &[f16], acts: [&Activation; A]) -> [__m256; A] {
    let b = scales.len() / 8 * 8;
    if b < scales.len() {
        combined_scales(scales, acts, b)
    } else {
        [_mm256_setzero_ps(); A]
    }
}

/// Lane `i` (< 8) of `v` in every lane: a block's scale, kept in a register.
#[inline(always)]
unsafe fn lane(v: __m256, i: usize) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(i as i32))
}

/// The sum of the 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Block `b`'s 16 bytes of 4-bit codes as bytes `0 … 15` minus `bias`: the low nibbles
/// (elements 0–15) and the high ones (16–31).
#[inline(always)]
unsafe fn nibbles128(c: *const u8, b: usize, bias: __m128i) -> (__m128i, __m128i) {
    let v = _mm_loadu_si128(c.add(b * BLOCK / 2).cast());
    let low = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(v, low);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
    (_mm_sub_epi8(lo, bias), _mm_sub_epi8(hi, bias))
}

/// Block `b`'s 4-bit codes as 32 bytes `0 … 15` in element order: the low nibbles (elements
/// 0–15) in the low half, the high ones (16–31) in the high half.
#[inline(always)]
unsafe fn nibbles(c: *const u8, b: usize) -> __m256i {
    let (lo, hi) = nibbles128(c, b, _mm_setzero_si128());
    _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
}

/// `Σ_b d_b · partial!(b)` over a row's `n` blocks, blocks alternating between two
/// accumulators, two per iteration so that both stay in registers; `scale!(b0)` gives the
/// combined scales of blocks `b0..b0 + 8` and `partial!(b)` block `b`'s 8 partial sums in f32.
macro_rules! blocks {
    ($n:expr, $scale:ident, $partial:ident) => {{
        let n = $n;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut sc = _mm256_setzero_ps();
        // The lane indices of the pair's two scales, `b % 8` and the next, kept in registers
        // and stepped by 2 (a broadcast of each index from a general register would add two
        // shuffles per pair).
        let (first, two) = (_mm256_setzero_si256(), _mm256_set1_epi32(2));
        let (mut i0, mut i1) = (first, _mm256_set1_epi32(1));
        let mut b = 0;
        while b + 2 <= n {
            // `b` is even, so a pair never straddles two groups of 8 scales.
            if b % 8 == 0 {
                sc = $scale!(b);
                i0 = first;
                i1 = _mm256_set1_epi32(1);
            }
            let (t0, t1) = ($partial!(b), $partial!(b + 1));
            acc0 = _mm256_fmadd_ps(t0, _mm256_permutevar8x32_ps(sc, i0), acc0);
            acc1 = _mm256_fmadd_ps(t1, _mm256_permutevar8x32_ps(sc, i1), acc1);
            i0 = _mm256_add_epi32(i0, two);
            i1 = _mm256_add_epi32(i1, two);
            b += 2;
        }
        if b < n {
            if b % 8 == 0 {
                sc = $scale!(b);
            }
            acc0 = _mm256_fmadd_ps($partial!(b), lane(sc, b % 8), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }};
}

/// One q8_0 row, codes sign-extended and converted to f32, exact products with `x`.
/// Needs `codes.len() ≥ 32·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
#[inline(always)]
unsafe fn q8_dequant_row(codes: &[u8], scales: &[f16], x: &[f32]) -> f32 {
    let n = scales.len();
    debug_assert!(codes.len() >= n * BLOCK && x.len() >= n * BLOCK);
    let (c, xp) = (codes.as_ptr(), x.as_ptr());
    macro_rules! scale {
        ($b:expr) => {
            widen8(scales, $b)
        };
    }
    macro_rules! partial {
        ($b:expr) => {{
            let (p, xb) = (c.add($b * BLOCK), xp.add($b * BLOCK));
            // Codes `o..o + 8` in f32 (a macro, not a closure: a closure would be compiled
            // without the entry point's target features).
            macro_rules! w {
                ($o:expr) => {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add($o).cast())))
                };
            }
            let t0 = _mm256_mul_ps(w!(0), _mm256_loadu_ps(xb));
            let t1 = _mm256_mul_ps(w!(8), _mm256_loadu_ps(xb.add(8)));
            let t0 = _mm256_fmadd_ps(w!(16), _mm256_loadu_ps(xb.add(16)), t0);
            let t1 = _mm256_fmadd_ps(w!(24), _mm256_loadu_ps(xb.add(24)), t1);
            _mm256_add_ps(t0, t1)
        }};
    }
    blocks!(n, scale, partial)
}

/// One q4_0 row (`MINS` false: codes `n − 8`) or the codes part of a q4_1 row (`MINS` true:
/// codes `n`), widened to f32, exact products with `x`. Needs `codes.len() ≥ 16·n`,
/// `x.len() ≥ 32·n` for `n = scales.len()`.
#[inline(always)]
unsafe fn q4_dequant_row<const MINS: bool>(codes: &[u8], scales: &[f16], x: &[f32]) -> f32 {
    let n = scales.len();
    debug_assert!(codes.len() >= n * BLOCK / 2 && x.len() >= n * BLOCK);
    let (c, xp) = (codes.as_ptr(), x.as_ptr());
    let eight = _mm_set1_epi8(if MINS { 0 } else { 8 });
    macro_rules! scale {
        ($b:expr) => {
            widen8(scales, $b)
        };
    }
    macro_rules! partial {
        ($b:expr) => {{
            // Signed bytes −8 … 7 (q4_0) or 0 … 15 (q4_1), in element order.
            let (lo, hi) = nibbles128(c, $b, eight);
            let xb = xp.add($b * BLOCK);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
            let w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            let w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
            let t0 = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            let t1 = _mm256_mul_ps(w1, _mm256_loadu_ps(xb.add(8)));
            let t0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb.add(16)), t0);
            let t1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb.add(24)), t1);
            _mm256_add_ps(t0, t1)
        }};
    }
    blocks!(n, scale, partial)
}

/// `Σ_b mins[b] · sums[b]`, 8 blocks at a time: q4_1's minimums against the blocks' sums of
/// `x` (exact, for the dequantizing method; of the quantized activation, for int8). Needs
/// `sums.len() ≥ mins.len()`.
#[inline(always)]
unsafe fn mins_dot(mins: &[f16], sums: &[f32]) -> f32 {
    let n = mins.len();
    let sums = &sums[..n];
    let mut acc = _mm256_setzero_ps();
    let mut b0 = 0;
    while b0 < n {
        acc = _mm256_fmadd_ps(widen8(mins, b0), load8(sums, b0), acc);
        b0 += 8;
    }
    hsum(acc)
}

/// Every row of `m` by the dequantizing kernels into `y`; `xsum` holds `x`'s block sums for
/// q4_1. Needs `x.len() == m.cols`, and for q4_1 `xsum.len() == m.cols / 32`; `y.len()` is
/// checked.
#[inline(always)]
pub(super) unsafe fn dequant_rows(m: QMatrix<'_>, x: &[f32], xsum: &[f32], y: &mut [f32]) {
    let Some(rows) = check_rows(m, y) else {
        return;
    };
    match m.format {
        QuantFormat::Q8_0 => {
            for (out, (codes, scales, _)) in y.iter_mut().zip(rows) {
                *out = q8_dequant_row(codes, scales, x);
            }
        }
        QuantFormat::Q4_0 => {
            for (out, (codes, scales, _)) in y.iter_mut().zip(rows) {
                *out = q4_dequant_row::<false>(codes, scales, x);
            }
        }
        QuantFormat::Q4_1 => {
            for (out, (codes, scales, mins)) in y.iter_mut().zip(rows) {
                *out = q4_dequant_row::<true>(codes, scales, x) + mins_dot(mins, xsum);
            }
        }
    }
}

/// One q8_0 row against `A` activations (one, or four in batched decode): per block the
/// exact integer dot product in 8 lanes, converted to f32 and multiplied by the two scales'
/// product (in f32, as the twin). The weight block is loaded, and its unsigned form made,
/// once for all `A`; each activation's terms go into the same two accumulators (even and odd
/// blocks) and the same final sum whatever `A`, so a batched product equals the
/// one-activation one bit for bit.
///
/// Without `VNNI`, `vpmaddubsw` (unsigned × signed bytes, pairs summed to saturating i16) then
/// `vpmaddwd` by ones: the weight's magnitude `|w|` is the unsigned side and the activation
/// takes the weight's sign, so a pair is at most 2 · 128 · 127 < 2¹⁵ and never saturates (a
/// code of −128, which a file may hold, has magnitude 128 as an unsigned byte; the activation's
/// codes are within ±127, so negating them cannot overflow). With `VNNI`, AVX-VNNI
/// `vpdpbusd` on the activation made unsigned (`x + 128`, [`Activation::codes_u8`]) and the
/// weight's signed codes, from `−128 · Σw` per lane, which one more `vpdpbusd` takes once per
/// block for all `A` (32-bit sums, no saturation). Needs `codes.len() ≥ 32·n`, every
/// activation quantized from `32·n` values, `n = scales.len()`.
#[inline(always)]
unsafe fn q8_int8_rows<const VNNI: u8, const A: usize>(
    codes: &[u8],
    scales: &[f16],
    acts: [&Activation; A],
) -> [f32; A] {
    let n = scales.len();
    debug_assert!(codes.len() >= n * BLOCK);
    let c = codes.as_ptr();
    let ones = _mm256_set1_epi16(1);
    // 128 as the unsigned operand: `vpdpbusd(0, 128, w)` is `128 · Σw` per lane.
    let bias = _mm256_set1_epi8(-128);
    let zero = _mm256_setzero_si256();
    // Several activations: each block's combined scale made as it is used, the weight's
    // scale spread once for all and times the activation's (`A` more multiplies), so that
    // the `A` vectors of combined scales are not held across the group: with them, the
    // accumulators and the operands, 4 activations overflowed the 16 registers and spilled
    // in every block. The same f32 products either way: lane `i` of a group's combined
    // scales is `w_{b+i} · x_{b+i}`.
    let spread = A > 1;
    let last = if spread {
        [_mm256_setzero_ps(); A]
    } else {
        last_group_scales(scales, acts)
    };
    let full = n / 8 * 8;
    let last_ws = if spread && full < n {
        widen8(scales, full)
    } else {
        _mm256_setzero_ps()
    };
    let mut ws = _mm256_setzero_ps();
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); A], [_mm256_setzero_ps(); A]);
    let mut sc = [_mm256_setzero_ps(); A];
    let mut b = 0;
    // Block `b` into `acc`; `b % 8 == 0` starts a group of scales.
    macro_rules! block {
        ($acc:ident) => {{
            if b % 8 == 0 {
                if spread {
                    ws = if b + 8 <= n {
                        _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(b).cast()))
                    } else {
                        last_ws
                    };
                } else {
                    sc = group_scales(scales, acts, b, last);
                }
            }
            let w = _mm256_loadu_si256(c.add(b * BLOCK).cast());
            // VNNI: the offset −128·Σw; without: the weight's magnitude.
            let u = if VNNI != NO_VNNI {
                _mm256_sub_epi32(zero, dpbusd::<VNNI>(zero, bias, w))
            } else {
                _mm256_sign_epi8(w, w)
            };
            let wsb = if spread {
                lane(ws, b % 8)
            } else {
                _mm256_setzero_ps()
            };
            for a in 0..A {
                let act = acts[a];
                debug_assert!(act.codes.len() >= n * BLOCK && act.codes_u8.len() >= n * BLOCK);
                debug_assert!(act.scales.len() >= n);
                let dot = if VNNI != NO_VNNI {
                    let x = _mm256_loadu_si256(act.codes_u8.as_ptr().add(b * BLOCK).cast());
                    dpbusd::<VNNI>(u, x, w)
                } else {
                    let x = _mm256_loadu_si256(act.codes.as_ptr().add(b * BLOCK).cast());
                    _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, w)), ones)
                };
                let s = if spread {
                    _mm256_mul_ps(wsb, _mm256_set1_ps(*act.scales.get_unchecked(b)))
                } else {
                    lane(sc[a], b % 8)
                };
                $acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, $acc[a]);
            }
            b += 1;
        }};
    }
    while b < n {
        block!(acc0);
        if b == n {
            break;
        }
        block!(acc1);
    }
    sums(acc0, acc1)
}

/// `hsum(acc0[a] + acc1[a])` for each activation: the kernels' final sums.
#[inline(always)]
unsafe fn sums<const A: usize>(acc0: [__m256; A], acc1: [__m256; A]) -> [f32; A] {
    let mut out = [0f32; A];
    for a in 0..A {
        out[a] = hsum(_mm256_add_ps(acc0[a], acc1[a]));
    }
    out
}

/// [`sums`] of four rows' accumulators at once: the same additions, lane for lane and in the
/// same grouping as [`hsum`] (the halves added, then lanes 0 + 2 and 1 + 3, then those two),
/// so the same bits, in 16 shuffles and adds where four rows by [`sums`] take 28.
#[inline(always)]
unsafe fn sums4(acc0: [__m256; 4], acc1: [__m256; 4]) -> [f32; 4] {
    let v = [
        _mm256_add_ps(acc0[0], acc1[0]),
        _mm256_add_ps(acc0[1], acc1[1]),
        _mm256_add_ps(acc0[2], acc1[2]),
        _mm256_add_ps(acc0[3], acc1[3]),
    ];
    // Row r's halves added: rows 0 and 1 (low, high 128 bits), rows 2 and 3.
    let s01 = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
        _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
    );
    let s23 = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
        _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
    );
    // Per 128 bits, [s₀ + s₂, s₁ + s₃] of row 0 (1) then of row 2 (3).
    let c = _mm256_add_ps(
        _mm256_shuffle_ps::<0b01_00_01_00>(s01, s23),
        _mm256_shuffle_ps::<0b11_10_11_10>(s01, s23),
    );
    let f = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(c, c),
        _mm256_shuffle_ps::<0b11_01_11_01>(c, c),
    );
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), f);
    [out[0], out[4], out[1], out[5]]
}

/// A q4 block's integer sums in 8 i32 lanes, from `init` (q4_0's offset `−8 · Σx`, zero for
/// q4_1): the unsigned codes `w` against the activation bytes `x`, and `w2` against `x2`
/// where given (a pair's high nibbles). `vpmaddubsw` pairs (added as i16: a lane is at most
/// 4 · 15 · 127, far from saturating), widened by `vpmaddwd`; with `VNNI`, `vpdpbusd` into the
/// offset. The row-major and the packed kernels both take their sums here.
#[inline(always)]
unsafe fn q4_dot<const MINS: bool, const VNNI: u8>(
    init: __m256i,
    w: __m256i,
    x: __m256i,
    w2x2: Option<(__m256i, __m256i)>,
) -> __m256i {
    if VNNI != NO_VNNI {
        let d = dpbusd::<VNNI>(init, w, x);
        match w2x2 {
            Some((w2, x2)) => dpbusd::<VNNI>(d, w2, x2),
            None => d,
        }
    } else {
        let p = _mm256_maddubs_epi16(w, x);
        let p = match w2x2 {
            Some((w2, x2)) => _mm256_add_epi16(p, _mm256_maddubs_epi16(w2, x2)),
            None => p,
        };
        let d = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
        if MINS {
            d
        } else {
            _mm256_add_epi32(d, init)
        }
    }
}

/// One q4_0 row (`MINS` false) or q4_1 row (`MINS` true) against `A` activations (one, or four
/// in batched decode), two blocks per 256-bit step: the pair's 32 code bytes split (once for
/// all `A`) into low nibbles (elements 0–15 of both blocks) and high ones (16–31), each the
/// unsigned side of `vpmaddubsw` against the activation's pair layout (`codes_q4`), the two
/// i16 results added (a lane is at most 4 · 15 · 127, far from saturating) and widened by
/// `vpmaddwd`: lanes 0–3 hold the first block's sum, 4–7 the second's. With `VNNI`, two
/// AVX-VNNI `vpdpbusd` into one i32 accumulator instead. q4_0 starts from the offset
/// `−8 · Σx` per lane (`offset_q4y`), q4_1 adds `Σ_b m_b · Σx_b` once per row. Pairs
/// alternate between two accumulators per activation and an unpaired last block, taken in
/// element order, goes into the first: the same sums whatever `A`. Needs `codes.len() ≥
/// 16·n` (and `mins.len() ≥ n` with `MINS`), every activation quantized from `32·n` values,
/// `n = scales.len()`.
#[inline(always)]
pub(super) unsafe fn q4_int8_rows<const MINS: bool, const VNNI: u8, const A: usize>(
    codes: &[u8],
    scales: &[f16],
    mins: &[f16],
    acts: [&Activation; A],
) -> [f32; A] {
    let n = scales.len();
    debug_assert!(codes.len() >= n * BLOCK / 2);
    let c = codes.as_ptr();
    let low = _mm256_set1_epi8(0x0F);
    // The integer sums of `w` (and `w2` against the next 32 bytes) against activation `act`'s
    // pair layout at block `b`, from its offset, in 8 i32 lanes.
    macro_rules! dot {
        ($act:expr, $b:expr, $w:expr, $w2:expr) => {{
            let (act, e): (&Activation, usize) = ($act, $b * BLOCK);
            debug_assert!(act.codes_q4.len() >= n * BLOCK);
            debug_assert!(act.offset_q4y.len() >= n.div_ceil(2) * 8);
            let xq = act.codes_q4.as_ptr();
            let init = if MINS {
                _mm256_setzero_si256()
            } else {
                _mm256_loadu_si256(act.offset_q4y.as_ptr().add($b * 4).cast())
            };
            let x = _mm256_loadu_si256(xq.add(e).cast());
            let w2x2 = match $w2 {
                Some(w2) => Some((w2, _mm256_loadu_si256(xq.add(e + 32).cast()))),
                None => None,
            };
            q4_dot::<MINS, VNNI>(init, $w, x, w2x2)
        }};
    }
    // Lanes 0–3 take the pair's first combined scale, 4–7 its second: `pick` plus `b % 8`,
    // stepped by 2 in a register.
    let pick = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let two = _mm256_set1_epi32(2);
    let last = last_group_scales(scales, acts);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); A], [_mm256_setzero_ps(); A]);
    let mut sc = [_mm256_setzero_ps(); A];
    let mut idx = pick;
    let mut b = 0;
    // The pair at `b` (even, so it never straddles two groups of 8 scales) into `acc`.
    macro_rules! pair {
        ($acc:ident) => {{
            if b % 8 == 0 {
                sc = group_scales(scales, acts, b, last);
                idx = pick;
            }
            let v = _mm256_loadu_si256(c.add(b * BLOCK / 2).cast());
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            let s_idx = idx;
            for a in 0..A {
                let d = dot!(acts[a], b, lo, Some(hi));
                let s = _mm256_permutevar8x32_ps(sc[a], s_idx);
                $acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, $acc[a]);
            }
            idx = _mm256_add_epi32(idx, two);
            b += 2;
        }};
    }
    while b + 2 <= n {
        pair!(acc0);
        if b + 2 > n {
            break;
        }
        pair!(acc1);
    }
    if b < n {
        // The unpaired last block, in element order (as `codes_q4` keeps it).
        if b % 8 == 0 {
            sc = group_scales(scales, acts, b, last);
        }
        let w = nibbles(c, b);
        for a in 0..A {
            let d = dot!(acts[a], b, w, None::<__m256i>);
            acc0[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), lane(sc[a], b % 8), acc0[a]);
        }
    }
    let mut total = sums(acc0, acc1);
    if MINS {
        for a in 0..A {
            total[a] += mins_dot(&mins[..n], &acts[a].block_sums);
        }
    }
    total
}

/// Every row of `m` against every activation: `y[i · rows + r]` is row `r` times `acts[i]`
/// (a row's codes stay in L1 while the activations pass over them). `y.len()` and the
/// activations' lengths are checked.
#[inline(always)]
pub(super) unsafe fn int8_rows<const VNNI: u8>(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32]) {
    macro_rules! row {
        ($format:expr, $codes:expr, $scales:expr, $mins:expr, $acts:expr, $a:literal) => {
            match $format {
                QuantFormat::Q8_0 => q8_int8_rows::<VNNI, $a>($codes, $scales, $acts),
                QuantFormat::Q4_0 => q4_int8_rows::<false, VNNI, $a>($codes, $scales, &[], $acts),
                QuantFormat::Q4_1 => q4_int8_rows::<true, VNNI, $a>($codes, $scales, $mins, $acts),
            }
        };
    }
    int8_rows_by_tiles!(m, acts, y, row)
}

/// Rows of `m` widened to f32 into `out` (`m.rows × m.cols`), exactly as
/// [`crate::quant::dequantize_row`] does (`n · d` and, for q4_1, `n · d + m` with `n · d`
/// exact, so one FMA rounds as the multiply and add do). `out.len()` is checked.
#[inline(always)]
pub(super) unsafe fn widen_rows(m: QMatrix<'_>, out: &mut [f32]) {
    assert_eq!(out.len(), m.rows * m.cols, "quantized widen: output length");
    let Some(rows) = check_rows(m, &mut []) else {
        return;
    };
    for ((codes, scales, mins), o) in rows.zip(out.chunks_exact_mut(m.cols)) {
        let (c, op) = (codes.as_ptr(), o.as_mut_ptr());
        for (b, &s) in scales.iter().enumerate() {
            let d = _mm256_set1_ps(s.to_f32());
            let ob = op.add(b * BLOCK);
            match m.format {
                QuantFormat::Q8_0 => {
                    for k in 0..4 {
                        let p = c.add(b * BLOCK + 8 * k);
                        let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())));
                        _mm256_storeu_ps(ob.add(8 * k), _mm256_mul_ps(w, d));
                    }
                }
                QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                    let q41 = m.format == QuantFormat::Q4_1;
                    let bias = _mm_set1_epi8(if q41 { 0 } else { 8 });
                    let (lo, hi) = nibbles128(c, b, bias);
                    let parts = [
                        lo,
                        _mm_unpackhi_epi64(lo, lo),
                        hi,
                        _mm_unpackhi_epi64(hi, hi),
                    ];
                    let min = _mm256_set1_ps(if q41 { mins[b].to_f32() } else { 0.0 });
                    for (k, part) in parts.into_iter().enumerate() {
                        let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part));
                        let v = if q41 {
                            _mm256_fmadd_ps(w, d, min)
                        } else {
                            _mm256_mul_ps(w, d)
                        };
                        _mm256_storeu_ps(ob.add(8 * k), v);
                    }
                }
            }
        }
    }
}

/// [`Activation::quantize_body`] with its codes loop in 256-bit registers, as
/// `avx512::quantize` does it in 512-bit ones: the same IEEE operations per element as the
/// portable loop, so the same codes and scales; NaN skipped by the maximum and coded 0.
///
/// # Safety
/// AVX2 is available (the module's contract).
#[inline(always)]
pub(super) unsafe fn quantize(act: &mut Activation, x: &[f32]) {
    act.resize_for(x.len());
    let rounding = _mm256_set1_ps(super::activation::ROUNDING);
    let (hi, lo) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    // Lane order after packing four vectors of 8 to bytes within 128-bit halves.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for ((block, codes), scale) in x
        .chunks_exact(BLOCK)
        .zip(act.codes.chunks_exact_mut(BLOCK))
        .zip(&mut act.scales)
    {
        // No closures (`array::from_fn`) around the intrinsics: they would compile outside
        // the entry point's features and be called out of line.
        let mut v = [_mm256_setzero_ps(); 4];
        for (i, vi) in v.iter_mut().enumerate() {
            // SAFETY: a block is 32 floats (`chunks_exact`); unaligned loads.
            *vi = unsafe { _mm256_loadu_ps(block.as_ptr().add(8 * i)) };
        }
        // `vmaxps` returns its second operand where the first is NaN: `max(|v|, m)` skips a
        // NaN as `f32::max` does. The maximum of the lanes is exact in any order.
        let mut m = _mm256_setzero_ps();
        for vi in v {
            m = _mm256_max_ps(_mm256_and_ps(vi, magnitude), m);
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        *scale = d;
        let inv = _mm256_set1_ps(inv);
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, &vi) in q.iter_mut().zip(&v) {
            let t = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(vi, inv), rounding), rounding);
            // `min(127, t)` and `max(−127, ·)` keep a NaN `t` (their second operand), which
            // `as i8` makes 0; every other `t` is an integer in ±127, converted exactly.
            let t = _mm256_max_ps(lo, _mm256_min_ps(hi, t));
            let number = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(t, t));
            *qi = _mm256_and_si256(_mm256_cvttps_epi32(t), number);
        }
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        // SAFETY: 32 codes, the block's.
        unsafe { _mm256_storeu_si256(codes.as_mut_ptr().cast(), bytes) };
    }
    act.derive();
}

/// Row `r`'s combined scales of the group of 8 blocks at `b` in a packed group's scales
/// (`PackedRows`' layout: 8 per row per whole group, the rest of each row after them) against
/// `act`'s, computed as [`combined_scales_full`] and [`combined_scales`] compute a row-major
/// row's, so the same bits. `last` holds every row's partial last group, made once before
/// the loop by [`packed_last_scales`].
#[inline(always)]
unsafe fn packed_scales(
    scales: &[f16],
    act: &Activation,
    n: usize,
    b: usize,
    last: [__m256; PACKED_ROWS],
) -> [__m256; PACKED_ROWS] {
    if b + 8 > n {
        return last;
    }
    debug_assert!(PACKED_ROWS * (b + 8) <= scales.len() && b + 8 <= act.scales.len());
    let a = _mm256_loadu_ps(act.scales.as_ptr().add(b));
    let mut sc = [_mm256_setzero_ps(); PACKED_ROWS];
    for (r, s) in sc.iter_mut().enumerate() {
        let p = scales.as_ptr().add(PACKED_ROWS * b + 8 * r);
        *s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), a);
    }
    sc
}

/// Every row's combined scales of a packed group's partial last group of 8 blocks (zero
/// when `n` is a multiple of 8): [`last_group_scales`] per row.
#[inline(always)]
unsafe fn packed_last_scales(scales: &[f16], act: &Activation, n: usize) -> [__m256; PACKED_ROWS] {
    let (full, rem) = (n / 8 * 8, n % 8);
    let mut last = [_mm256_setzero_ps(); PACKED_ROWS];
    if rem > 0 {
        let a = load8(&act.scales[..n], full);
        for (r, l) in last.iter_mut().enumerate() {
            let at = PACKED_ROWS * full + r * rem;
            *l = _mm256_mul_ps(widen8(&scales[at..at + rem], 0), a);
        }
    }
    last
}

/// [`mins_dot`] of row `r` of a packed group's minimums: the same multiply-adds in the same
/// order.
#[inline(always)]
unsafe fn packed_mins_dot(mins: &[f16], r: usize, n: usize, sums: &[f32]) -> f32 {
    let sums = &sums[..n];
    let (full, rem) = (n / 8 * 8, n % 8);
    let mut acc = _mm256_setzero_ps();
    let mut b0 = 0;
    while b0 < full {
        debug_assert!(PACKED_ROWS * (b0 + 8) <= mins.len());
        let p = mins.as_ptr().add(PACKED_ROWS * b0 + 8 * r);
        let m = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
        acc = _mm256_fmadd_ps(m, load8(sums, b0), acc);
        b0 += 8;
    }
    if rem > 0 {
        let at = PACKED_ROWS * full + r * rem;
        acc = _mm256_fmadd_ps(widen8(&mins[at..at + rem], 0), load8(sums, b0), acc);
    }
    hsum(acc)
}

/// [`q4_int8_rows`] for one activation over a group of four rows packed side by side
/// (`PackedRows`): the activation's codes, its offsets and the combined scales' bookkeeping
/// loaded once for the four rows, the codes read as one sequential stream. Each row's terms go
/// into its own two accumulators in [`q4_int8_rows`]' order (pairs alternating, an unpaired
/// last block into the first) and the same final sums, so every row's result is bit for bit
/// the row-major kernel's. Needs `codes.len() ≥ 4 · 16 · n`, `scales.len() ≥ 4 · n` (and
/// `mins` alike with `MINS`), `act` quantized from `32 · n` values.
#[inline(always)]
unsafe fn q4_int8_group<const MINS: bool, const VNNI: u8>(
    codes: &[u8],
    scales: &[f16],
    mins: &[f16],
    n: usize,
    act: &Activation,
) -> [f32; PACKED_ROWS] {
    const R: usize = PACKED_ROWS;
    debug_assert!(codes.len() >= R * n * BLOCK / 2 && scales.len() >= R * n);
    debug_assert!(act.codes_q4.len() >= n * BLOCK && act.offset_q4y.len() >= n.div_ceil(2) * 8);
    let (c, xq) = (codes.as_ptr(), act.codes_q4.as_ptr());
    let low = _mm256_set1_epi8(0x0F);
    let pick = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let two = _mm256_set1_epi32(2);
    let last = packed_last_scales(scales, act, n);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut sc = [_mm256_setzero_ps(); R];
    let mut idx = pick;
    let mut b = 0;
    macro_rules! offset {
        () => {
            if MINS {
                _mm256_setzero_si256()
            } else {
                _mm256_loadu_si256(act.offset_q4y.as_ptr().add(b * 4).cast())
            }
        };
    }
    // The pair at `b` (even) of the four rows into `acc`.
    macro_rules! pair {
        ($acc:ident) => {{
            if b % 8 == 0 {
                sc = packed_scales(scales, act, n, b, last);
                idx = pick;
            }
            let e = b * BLOCK;
            let x0 = _mm256_loadu_si256(xq.add(e).cast());
            let x1 = _mm256_loadu_si256(xq.add(e + 32).cast());
            let init = offset!();
            let p = c.add(b / 2 * R * 32);
            for r in 0..R {
                let v = _mm256_loadu_si256(p.add(32 * r).cast());
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                let d = q4_dot::<MINS, VNNI>(init, lo, x0, Some((hi, x1)));
                let s = _mm256_permutevar8x32_ps(sc[r], idx);
                $acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, $acc[r]);
            }
            idx = _mm256_add_epi32(idx, two);
            b += 2;
        }};
    }
    while b + 2 <= n {
        pair!(acc0);
        if b + 2 > n {
            break;
        }
        pair!(acc1);
    }
    if b < n {
        // The unpaired last block, each row's 16 bytes after the pairs, in element order.
        if b % 8 == 0 {
            sc = packed_scales(scales, act, n, b, last);
        }
        let x = _mm256_loadu_si256(xq.add(b * BLOCK).cast());
        let init = offset!();
        let p = c.add(b / 2 * R * 32);
        for r in 0..R {
            let w = nibbles(p.add(16 * r), 0);
            let d = q4_dot::<MINS, VNNI>(init, w, x, None);
            acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), lane(sc[r], b % 8), acc0[r]);
        }
    }
    let mut total = sums4(acc0, acc1);
    if MINS {
        for (r, t) in total.iter_mut().enumerate() {
            *t += packed_mins_dot(mins, r, n, &act.block_sums);
        }
    }
    total
}

/// [`q8_int8_rows`] for one activation over a group of four rows packed side by side
/// (`PackedRows`), each row's sums in that kernel's order (blocks alternating between two
/// accumulators), so the same bits. Needs `codes.len() ≥ 4 · 32 · n`, `scales.len() ≥ 4 · n`,
/// `act` quantized from `32 · n` values.
#[inline(always)]
unsafe fn q8_int8_group<const VNNI: u8>(
    codes: &[u8],
    scales: &[f16],
    n: usize,
    act: &Activation,
) -> [f32; PACKED_ROWS] {
    const R: usize = PACKED_ROWS;
    debug_assert!(codes.len() >= R * n * BLOCK && scales.len() >= R * n);
    debug_assert!(act.codes.len() >= n * BLOCK && act.codes_u8.len() >= n * BLOCK);
    let c = codes.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let bias = _mm256_set1_epi8(-128);
    let zero = _mm256_setzero_si256();
    let last = packed_last_scales(scales, act, n);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut sc = [_mm256_setzero_ps(); R];
    let mut b = 0;
    macro_rules! block {
        ($acc:ident) => {{
            if b % 8 == 0 {
                sc = packed_scales(scales, act, n, b, last);
            }
            let x = if VNNI != NO_VNNI {
                _mm256_loadu_si256(act.codes_u8.as_ptr().add(b * BLOCK).cast())
            } else {
                _mm256_loadu_si256(act.codes.as_ptr().add(b * BLOCK).cast())
            };
            let p = c.add(b * R * BLOCK);
            for r in 0..R {
                let w = _mm256_loadu_si256(p.add(BLOCK * r).cast());
                let dot = if VNNI != NO_VNNI {
                    let u = _mm256_sub_epi32(zero, dpbusd::<VNNI>(zero, bias, w));
                    dpbusd::<VNNI>(u, x, w)
                } else {
                    let u = _mm256_sign_epi8(w, w);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, w)), ones)
                };
                $acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), lane(sc[r], b % 8), $acc[r]);
            }
            b += 1;
        }};
    }
    while b < n {
        block!(acc0);
        if b == n {
            break;
        }
        block!(acc1);
    }
    sums4(acc0, acc1)
}

/// Every row of the packed groups `p` against one activation into `y` (`4 ·` the groups).
/// `y.len()` and the activation's lengths are checked.
#[inline(always)]
pub(super) unsafe fn int8_packed<const VNNI: u8>(
    p: PackedView<'_>,
    act: &Activation,
    y: &mut [f32],
) {
    let n = p.cols / BLOCK;
    check_packed(p, act, y);
    let (gc, gs) = (PACKED_ROWS * p.format.row_bytes(p.cols), PACKED_ROWS * n);
    for (g, out) in y.chunks_exact_mut(PACKED_ROWS).enumerate() {
        let codes = &p.codes[g * gc..(g + 1) * gc];
        let scales = &p.scales[g * gs..(g + 1) * gs];
        let v = match p.format {
            QuantFormat::Q8_0 => q8_int8_group::<VNNI>(codes, scales, n, act),
            QuantFormat::Q4_0 => q4_int8_group::<false, VNNI>(codes, scales, &[], n, act),
            QuantFormat::Q4_1 => {
                let mins = &p.mins[g * gs..(g + 1) * gs];
                q4_int8_group::<true, VNNI>(codes, scales, mins, n, act)
            }
        };
        out.copy_from_slice(&v);
    }
}
