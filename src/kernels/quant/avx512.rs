//! The AVX-512 level's quantized kernels: dequantizing rows in 512-bit registers, and the
//! int8 rows by AVX-512 VNNI `vpdpbusd`. Called only from the level's `#[target_feature]`
//! entry points (`super::entry`), whose features are a superset of each function's.

use super::activation::{check_rows, check_rows_batch, int8_rows_by_tiles, Activation, RowTiles};
use crate::quant::{QMatrix, QuantFormat, BLOCK};
use half::f16;
use std::arch::x86_64::*;

/// Every row of `m` by its dequantizing kernel into `y`; `xsum` holds `x`'s block sums for q4_1
/// (unused otherwise).
///
/// # Safety
/// avx512f/bw/vl are available; `x.len() == m.cols`, `y.len() == m.rows`, and for q4_1
/// `xsum.len() == m.cols / 32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dequant_rows(m: QMatrix<'_>, x: &[f32], xsum: &[f32], y: &mut [f32]) {
    let Some(rows) = check_rows(m, y) else {
        return;
    };
    // SAFETY (each call): the features above; `check_rows` sliced each row to `cols / 32`
    // blocks of codes, scales and (q4_1) minimums, `x` has `cols` values and `xsum` a sum per
    // block (the caller's contract).
    match m.format {
        QuantFormat::Q8_0 => {
            for (out, (codes, scales, _)) in y.iter_mut().zip(rows) {
                *out = q8_dequant_row(codes, scales, x);
            }
        }
        QuantFormat::Q4_0 => {
            for (out, (codes, scales, _)) in y.iter_mut().zip(rows) {
                *out = q4_dequant_row(codes, scales, x);
            }
        }
        QuantFormat::Q4_1 => {
            for (out, (codes, scales, mins)) in y.iter_mut().zip(rows) {
                *out = q4_1_dequant_row(codes, scales, mins, xsum, x);
            }
        }
    }
}

/// Every row of `m` against every activation by VNNI: `y[i · rows + r]` is row `r` times
/// `acts[i]`. A row's codes stay in L1 while the activations pass over them.
///
/// # Safety
/// avx512f/bw/vl/vnni are available; every activation was quantized from an `x` of `m.cols`
/// values; `y.len() == acts.len() · m.rows`.
///
/// q4_0 and q4_1 rows take the 256-bit kernel of [`super::avx2`] with `vpdpbusd` in its
/// AVX-512 VL encoding: a pair of blocks fills a 256-bit register, and for one activation
/// that ran 15–18% (q4_0) and up to 17% (q4_1) faster per product than a 512-bit kernel
/// holding two pairs, level with it for 16 (docs/performance.md). Both give the same sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn int8_rows(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32]) {
    use super::avx2::{q4_int8_rows, AVX512VL_VNNI};
    // SAFETY (each call): the features above; the row holds `cols / 32` blocks
    // (`check_rows_batch`) and every activation was quantized from `cols` values.
    macro_rules! row {
        ($format:expr, $codes:expr, $scales:expr, $mins:expr, $acts:expr, $a:literal) => {
            match $format {
                QuantFormat::Q8_0 => q8_int8_rows::<$a>($codes, $scales, $acts),
                QuantFormat::Q4_0 => {
                    q4_int8_rows::<false, AVX512VL_VNNI, $a>($codes, $scales, &[], $acts)
                }
                QuantFormat::Q4_1 => {
                    q4_int8_rows::<true, AVX512VL_VNNI, $a>($codes, $scales, $mins, $acts)
                }
            }
        };
    }
    int8_rows_by_tiles!(m, acts, y, row)
}

/// The scales of blocks `b0..b0 + 16` (fewer at the end, the rest 0) widened to f32 with
/// one `vcvtph2ps`: the kernels widen their row's scales 16 at a time as they go, instead
/// of a pass over every scale of the matrix before it (10% of a q4_0 decode).
///
/// # Safety
/// avx512f/bw/vl are available; `b0 < scales.len()` (`f16` is two bytes, `repr(transparent)`
/// over `u16`: sixteen of them are 256 bits).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn widen16(scales: &[f16], b0: usize) -> __m512 {
    // A masked load: the lanes past the row's last scale are neither read nor faulted on.
    let halves =
        _mm256_maskz_loadu_epi16(lanes16(scales.len() - b0), scales.as_ptr().add(b0).cast());
    _mm512_cvtph_ps(halves)
}

/// The mask of the first `min(n, 16)` lanes.
#[inline]
fn lanes16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// Per activation, the combined scales of blocks `b..b + 16` of a row (fewer at its end, the
/// rest 0): the row's weight scales, widened, times the activation's, in f32 as the twin
/// multiplies them.
///
/// # Safety
/// avx512f/bw/vl are available; `b < scales.len()` and every activation has a scale per block
/// of the row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn combined_scales<const A: usize>(
    scales: &[f16],
    acts: [&Activation; A],
    b: usize,
) -> [__m512; A] {
    let ws = widen16(scales, b);
    let mut sc = [_mm512_setzero_ps(); A];
    for (s, act) in sc.iter_mut().zip(acts) {
        let xs = _mm512_maskz_loadu_ps(lanes16(scales.len() - b), act.scales.as_ptr().add(b));
        *s = _mm512_mul_ps(ws, xs);
    }
    sc
}

/// Lane `i` of `v` in every lane (the scale of one block, kept in a register: reading it
/// back from a stored array stalled on store forwarding).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn lane(v: __m512, i: usize) -> __m512 {
    _mm512_permutexvar_ps(_mm512_set1_epi32(i as i32), v)
}

/// The block loop of the q8_0/q4_0 dequantizing kernels: `Σ_b d_b · partial!(b)` with
/// blocks alternating between two accumulators (even blocks in the first). Two blocks per
/// iteration, so the accumulators are registers: indexed by `b & 1` in a one-block loop
/// they lived on the stack, a store and a reload in every block's dependency chain. The
/// same sums in the same order as that loop, so bit for bit its results.
macro_rules! dequant_blocks {
    ($n:expr, $scales:expr, $partial:ident) => {{
        let (n, scales) = ($n, $scales);
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut sc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 2 <= n {
            // `b` is even, so a pair never straddles two groups of 16 scales.
            if b % 16 == 0 {
                sc = widen16(scales, b);
            }
            let (t0, t1) = ($partial!(b), $partial!(b + 1));
            acc0 = _mm512_fmadd_ps(t0, lane(sc, b % 16), acc0);
            acc1 = _mm512_fmadd_ps(t1, lane(sc, (b + 1) % 16), acc1);
            b += 2;
        }
        if b < n {
            if b % 16 == 0 {
                sc = widen16(scales, b);
            }
            acc0 = _mm512_fmadd_ps($partial!(b), lane(sc, b % 16), acc0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }};
}

/// One q8_0 row, codes widened to f32.
///
/// # Safety
/// avx512f/bw/vl are available; `codes.len() ≥ 32·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn q8_dequant_row(codes: &[u8], scales: &[f16], x: &[f32]) -> f32 {
    let n = scales.len();
    debug_assert!(codes.len() >= n * BLOCK && x.len() >= n * BLOCK);
    let (c, xp) = (codes.as_ptr(), x.as_ptr());
    // Block b's exact products with x, summed over its 32 weights.
    macro_rules! partial {
        ($b:expr) => {{
            let b = $b;
            let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                c.add(b * BLOCK).cast(),
            )));
            let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                c.add(b * BLOCK + 16).cast(),
            )));
            let t = _mm512_mul_ps(w0, _mm512_loadu_ps(xp.add(b * BLOCK)));
            _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(b * BLOCK + 16)), t)
        }};
    }
    dequant_blocks!(n, scales, partial)
}

/// One q4_0 row, nibbles looked up as `n − 8` in f32.
///
/// # Safety
/// avx512f/bw/vl are available; `codes.len() ≥ 16·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn q4_dequant_row(codes: &[u8], scales: &[f16], x: &[f32]) -> f32 {
    let table = _mm512_setr_ps(
        -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
    );
    nibble_row(codes, scales, x, table)
}

/// One q4_1 row as `Σ_b d_b · Σ n·x + Σ_b m_b · xsum_b`: the codes `0 … 15` multiplied
/// as q4_0's are (three f32 operations per block instead of the four that forming each
/// weight `n·d + m` takes), and the minimums against the blocks' sums of `x`, taken once
/// per product by the caller, 16 blocks at a time.
///
/// # Safety
/// avx512f/bw/vl are available; `codes.len() ≥ 16·n`, `mins.len() ≥ n`, `xsum.len() ≥ n`,
/// `x.len() ≥ 32·n` for `n = scales.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn q4_1_dequant_row(
    codes: &[u8],
    scales: &[f16],
    mins: &[f16],
    xsum: &[f32],
    x: &[f32],
) -> f32 {
    let table = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    nibble_row(codes, scales, x, table) + mins_dot(&mins[..scales.len()], xsum)
}

/// `Σ_b d_b · Σ_j table[n_j]·x_j` over a row of 4-bit codes: each nibble looked up in
/// `table` (its 16 code values in f32) with one `vpermps`, which reads only the low 4 bits
/// of each index, multiplied with `x` exactly, the block's sum scaled once. The q4_0
/// (`n − 8`) and q4_1 (`n`) rows differ only in the table.
///
/// # Safety
/// avx512f/bw/vl are available; `codes.len() ≥ 16·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn nibble_row(codes: &[u8], scales: &[f16], x: &[f32], table: __m512) -> f32 {
    let n = scales.len();
    debug_assert!(codes.len() >= n * BLOCK / 2 && x.len() >= n * BLOCK);
    let (c, xp) = (codes.as_ptr(), x.as_ptr());
    // Block b's exact products with x, summed over its 32 weights.
    macro_rules! partial {
        ($b:expr) => {{
            let b = $b;
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(c.add(b * BLOCK / 2).cast()));
            let w0 = _mm512_permutexvar_ps(v, table);
            let w1 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table);
            let t = _mm512_mul_ps(w0, _mm512_loadu_ps(xp.add(b * BLOCK)));
            _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(b * BLOCK + 16)), t)
        }};
    }
    dequant_blocks!(n, scales, partial)
}

/// `Σ_b mins[b] · sums[b]` over the `n = mins.len()` blocks, 16 at a time: q4_1's
/// minimums against the blocks' sums of x (exact, for `Dequant`; of the quantized
/// activation, for `Int8`).
///
/// # Safety
/// avx512f/bw/vl are available; `sums.len() ≥ mins.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn mins_dot(mins: &[f16], sums: &[f32]) -> f32 {
    let n = mins.len();
    let sums = &sums[..n];
    let mut acc = _mm512_setzero_ps();
    for b0 in (0..n).step_by(16) {
        let s = _mm512_maskz_loadu_ps(lanes16(n - b0), sums.as_ptr().add(b0));
        acc = _mm512_fmadd_ps(widen16(mins, b0), s, acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// One q8_0 row by VNNI against `A` activations: per block `s_b · Σ x·w`, two blocks per
/// 512-bit register (lanes 0–7 the even block of the pair, 8–15 the odd one; an unpaired last
/// block in 256 bits), `s_b` the weight scale `scales[b]` times the activation's (in f32, as the
/// twin does). `vpdpbusd` takes the activation unsigned (`x + 128`, [`Activation::codes_u8`])
/// against the weight's signed codes, from `−128 · Σw` per lane, which one more `vpdpbusd`
/// takes once per pair for all `A` (so per activation one `vpdpbusd` with its codes as the
/// memory operand: no offset to load): the exact integer `Σ x·w`, as the twin's. Each
/// activation's pairs alternate between two accumulators and its sum is the same whatever `A`,
/// so a batched product equals the one-activation one bit for bit.
///
/// # Safety
/// avx512f/bw/vl/vnni are available; `codes.len() ≥ 32·n` for `n = scales.len()`, and every
/// activation quantized from an `x` of `32·n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q8_int8_rows<const A: usize>(
    codes: &[u8],
    scales: &[f16],
    acts: [&Activation; A],
) -> [f32; A] {
    let n = scales.len();
    debug_assert!(codes.len() >= n * BLOCK);
    let c = codes.as_ptr();
    // 128 as the unsigned operand: `vpdpbusd(0, 128, w)` is `128 · Σw` per lane.
    let bias = _mm512_set1_epi8(-128);
    let zero = _mm512_setzero_si512();
    // The pair's two combined scales, lanes `b % 16` and the next, spread over the two
    // halves (`idx` = `pick` + b % 16, stepped by 2 in a register).
    let pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let two = _mm512_set1_epi32(2);
    let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); A], [_mm512_setzero_ps(); A]);
    let mut sc = [_mm512_setzero_ps(); A];
    let mut idx = pick;
    let mut b = 0;
    // One pair into `acc`, block `b` even: `b % 16 == 0` starts a group of scales.
    macro_rules! pair {
        ($acc:ident) => {{
            if b % 16 == 0 {
                sc = combined_scales(scales, acts, b);
                idx = pick;
            }
            let w = _mm512_loadu_si512(c.add(b * BLOCK).cast());
            let init = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, w));
            for a in 0..A {
                debug_assert!(acts[a].codes_u8.len() >= n * BLOCK);
                let x = _mm512_loadu_si512(acts[a].codes_u8.as_ptr().add(b * BLOCK).cast());
                let d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, x, w));
                $acc[a] = _mm512_fmadd_ps(d, _mm512_permutexvar_ps(idx, sc[a]), $acc[a]);
            }
            idx = _mm512_add_epi32(idx, two);
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
    let mut out = [0f32; A];
    for a in 0..A {
        out[a] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[a], acc1[a]));
    }
    if b < n {
        // The last, unpaired block: 256 bits, its sum added to the pairs' total.
        let w = _mm256_loadu_si256(c.add(b * BLOCK).cast());
        let zero = _mm256_setzero_si256();
        let init = _mm256_sub_epi32(
            zero,
            _mm256_dpbusd_epi32(zero, _mm512_castsi512_si256(bias), w),
        );
        for a in 0..A {
            let x = _mm256_loadu_si256(acts[a].codes_u8.as_ptr().add(b * BLOCK).cast());
            let dot = _mm256_dpbusd_epi32(init, x, w);
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), dot);
            let scale = scales[b].to_f32() * *acts[a].scales.get_unchecked(b);
            out[a] += lanes.iter().sum::<i32>() as f32 * scale;
        }
    }
    out
}

/// [`Activation::quantize_body`] with its codes loop in 512-bit registers: per block, `max|x|`
/// of its two halves and across the lanes, then `((v·inv + R) − R)` clamped to ±127, the same
/// IEEE operations per element as the portable loop (no contraction), so the same codes and
/// scales (`tests/quant.rs` holds every level to the portable quantization, field by field).
/// NaN follows `f32::max`, `f32::clamp` and `as i8`: skipped by the maximum, code 0.
///
/// # Safety
/// avx512f/bw/vl are available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
pub(super) unsafe fn quantize(act: &mut Activation, x: &[f32]) {
    act.resize_for(x.len());
    let rounding = _mm512_set1_ps(super::activation::ROUNDING);
    let (hi, lo) = (_mm512_set1_ps(127.0), _mm512_set1_ps(-127.0));
    for ((block, codes), scale) in x
        .chunks_exact(BLOCK)
        .zip(act.codes.chunks_exact_mut(BLOCK))
        .zip(&mut act.scales)
    {
        // SAFETY: a block is 32 floats and 32 codes (`chunks_exact`); unaligned loads and
        // stores.
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_ps(block.as_ptr()),
                _mm512_loadu_ps(block.as_ptr().add(16)),
            )
        };
        // `vmaxps` returns its second operand where the first is NaN: `max(|v|, m)` skips a
        // NaN as `f32::max` does. The maximum of the lanes is exact in any order.
        let m = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps());
        let m = _mm512_max_ps(_mm512_abs_ps(v1), m);
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        *scale = d;
        let inv = _mm512_set1_ps(inv);
        for (half, v) in [v0, v1].into_iter().enumerate() {
            let t = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, inv), rounding), rounding);
            // `min(127, t)` and `max(−127, ·)` keep a NaN `t` (their second operand), which
            // `as i8` makes 0; every other `t` is an integer in ±127, converted exactly.
            let t = _mm512_max_ps(lo, _mm512_min_ps(hi, t));
            let number = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t);
            let q = _mm512_cvtsepi32_epi8(_mm512_maskz_cvttps_epi32(number, t));
            // SAFETY: 16 codes at `16·half` of the block's 32.
            unsafe { _mm_storeu_si128(codes.as_mut_ptr().add(16 * half).cast(), q) };
        }
    }
    act.derive();
}
