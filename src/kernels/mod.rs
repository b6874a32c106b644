//! Hot kernels: SIMD versions for the model and plain scalar twins the tests hold them against.
//!
//! Every `foo` has a `scalar::foo` computing the same thing one element at a time; the tests in
//! `tests/kernels.rs` compare them on random and edge inputs. Weight-reading kernels are generic
//! over [`Elem`] so f16 and bf16 weights are widened in registers, never copied to f32.

pub mod matmul;
pub mod quant;
pub mod scalar;
pub mod simd;

use rayon::prelude::*;
use wide::f32x16;

pub use simd::{Elem, LANES};

/// Below this many weight elements (64 KiB of f32) a matrix-vector product runs on the calling
/// thread. Above it the product is split into at least one row block per thread: during decode
/// the pool's workers are awake (products follow each other microseconds apart), so handing
/// one block to the other core costs about a microsecond, and even the 256×256 products of a
/// small model gain. Measured on the tiny shape with two threads: 3.6–3.9k tokens/s when only
/// products of 1 MiB and more were split (four blocks per thread), 5.7–5.9k with this
/// threshold and one block per thread (README "Performance").
pub const PAR_MIN_ELEMS: usize = 1 << 14;

/// Weight elements (1 MiB of f32) per parallel block that a large product aims at: products up
/// to `threads` × this get one block per thread (each extra block is one more hand-off);
/// larger ones get more, a multiple of the thread count up to four per thread, so a thread
/// slowed by the other work of a shared machine holds up less of the product (the split of
/// gpt2-small's products is the one measured before this threshold changed).
const BLOCK_ELEMS: usize = 1 << 18;

/// Dot product of a weight row and an f32 vector.
///
/// # Panics
/// Never for equal lengths; extra elements of the longer slice are ignored.
#[inline]
pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    let mut acc = [f32x16::ZERO; 4];
    let mut i = 0;
    while i + 4 * LANES <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let o = i + j * LANES;
            *a = T::load16(&w[o..]).mul_add(simd::load(&x[o..]), *a);
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        acc[0] = T::load16(&w[i..]).mul_add(simd::load(&x[i..]), acc[0]);
        i += LANES;
    }
    let mut sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])).reduce_add();
    for k in i..n {
        sum += w[k].to_f32() * x[k];
    }
    sum
}

/// Parallel blocks of a matrix-vector product are whole multiples of this many rows (each
/// thread's slice of the output then starts on a 32-byte boundary of it).
const MATVEC_ROWS: usize = 8;

/// `y = W x`, one row after another. Rows are read strictly in order as one sequential stream,
/// which the hardware prefetchers follow at full speed: measured here on a 512 MiB f32
/// matrix, one thread, 27 GB/s this way against 16 GB/s for the same products taken 8
/// interleaved rows at a time (8 short streams a few KiB apart, which sharing the loads of `x`
/// does not make up for); bf16 23 against 12 GB/s.
fn matvec_rows<T: Elem>(w: &[T], cols: usize, x: &[f32], y: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<half::bf16>() {
        // Same size and both Pod: the cast cannot fail, T is bf16.
        bf16_pairs::matvec_rows(bytemuck::cast_slice(w), cols, x, y);
        return;
    }
    for (r, out) in y.iter_mut().enumerate() {
        *out = dot(&w[r * cols..(r + 1) * cols], x);
    }
}

/// bf16 rows without the widening shuffle: a bf16 is the high half of an f32, so one 512-bit
/// load of 32 weights yields the even-indexed ones as f32 by a 16-bit left shift of each 32-bit
/// lane and the odd-indexed ones by masking the low half off. Paired with `x`'s even and odd
/// elements (deinterleaved once per call), that is a load, two integer ops and two FMAs per 32
/// weights instead of two zero-extending shuffles, two shifts and two FMAs. Products are exact
/// either way; only the order of the sum changes.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod bf16_pairs {
    use half::bf16;
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_and_si512, _mm512_castsi512_ps, _mm512_fmadd_ps,
        _mm512_loadu_ps, _mm512_loadu_si512, _mm512_reduce_add_ps, _mm512_set1_epi32,
        _mm512_setzero_ps, _mm512_slli_epi32,
    };
    use std::cell::RefCell;

    thread_local! {
        /// `x` deinterleaved per 32-column block: 16 even then 16 odd elements.
        static SPLIT_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn matvec_rows(w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) {
        assert!(w.len() >= y.len() * cols && x.len() >= cols);
        let blocks = cols / 32;
        SPLIT_X.with_borrow_mut(|split| {
            split.clear();
            for b in 0..blocks {
                let xb = &x[32 * b..32 * b + 32];
                split.extend(xb.iter().step_by(2));
                split.extend(xb.iter().skip(1).step_by(2));
            }
            for (r, out) in y.iter_mut().enumerate() {
                // SAFETY: row r of `w` exists (assert above), `split` holds 32·blocks values,
                // and the build enables avx512f (cfg on the module).
                *out = unsafe { dot_row(&w[r * cols..(r + 1) * cols], split, x) };
            }
        })
    }

    /// Dot product of one row with `x`.
    ///
    /// # Safety
    /// `w.len() = cols`, `split` the deinterleaved `x` of `cols / 32` blocks, `x` at least
    /// `cols`; avx512f is enabled.
    #[inline(always)]
    unsafe fn dot_row(w: &[bf16], split: &[f32], x: &[f32]) -> f32 {
        let cols = w.len();
        let blocks = cols / 32;
        debug_assert!(split.len() >= blocks * 32 && x.len() >= cols);
        let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        let (base, xs) = (w.as_ptr(), split.as_ptr());
        // Block `b` (32 weights) into an (even, odd) accumulator pair.
        let block = |b: usize, pair: &mut [__m512]| {
            let v = _mm512_loadu_si512(base.add(32 * b).cast());
            let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            pair[0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xs.add(32 * b)), pair[0]);
            pair[1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xs.add(32 * b + 16)), pair[1]);
        };
        // Two blocks per iteration into four accumulators: no FMA waits on the previous one.
        let mut acc: [__m512; 4] = [_mm512_setzero_ps(); 4];
        let mut b = 0;
        while b + 2 <= blocks {
            let (first, second) = acc.split_at_mut(2);
            block(b, first);
            block(b + 1, second);
            b += 2;
        }
        if b < blocks {
            block(b, &mut acc[..2]);
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut s = _mm512_reduce_add_ps(sum);
        for k in blocks * 32..cols {
            s += w[k].to_f32() * x[k];
        }
        s
    }
}

/// `y = W x` on the calling thread only (a block of rows of a larger product).
pub fn matvec_serial<T: Elem>(w: &[T], x: &[f32], y: &mut [f32]) {
    assert_eq!(
        w.len(),
        y.len() * x.len(),
        "matvec: weight is not [rows, cols]"
    );
    matvec_rows(w, x.len(), x, y);
}

/// Rows per parallel block of a `rows × cols` matrix-vector product on `threads` threads:
/// multiples of 8 rows, one to four blocks per thread and a multiple of the thread count (about
/// [`BLOCK_ELEMS`] weights each); `None` when the product is too small to split ([`PAR_MIN_ELEMS`], one thread, or a
/// single block).
pub fn matvec_block_rows(rows: usize, cols: usize, threads: usize) -> Option<usize> {
    let elems = rows.saturating_mul(cols);
    if elems < PAR_MIN_ELEMS || threads <= 1 {
        return None;
    }
    let blocks = elems
        .div_ceil(BLOCK_ELEMS)
        .next_multiple_of(threads)
        .clamp(threads, 4 * threads);
    let block = rows.div_ceil(blocks).next_multiple_of(MATVEC_ROWS);
    (block < rows).then_some(block)
}

/// `y = W x` for a row-major `W` of shape `[y.len(), x.len()]` (a torch `Linear` weight).
///
/// Large matrices are split into row blocks across the rayon pool.
pub fn matvec<T: Elem>(w: &[T], x: &[f32], y: &mut [f32]) {
    let (rows, cols) = (y.len(), x.len());
    assert_eq!(w.len(), rows * cols, "matvec: weight is not [rows, cols]");
    let Some(block) = matvec_block_rows(rows, cols, rayon::current_num_threads()) else {
        matvec_rows(w, cols, x, y);
        return;
    };
    y.par_chunks_mut(block)
        .enumerate()
        .for_each(|(b, y_block)| {
            let start = b * block;
            matvec_rows(
                &w[start * cols..(start + y_block.len()) * cols],
                cols,
                x,
                y_block,
            );
        });
}

/// `y += a · x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = f32x16::splat(a);
    let mut i = 0;
    while i + LANES <= n {
        let r = simd::load(&x[i..]).mul_add(av, simd::load(&y[i..]));
        simd::store(&mut y[i..], r);
        i += LANES;
    }
    for k in i..n {
        y[k] += a * x[k];
    }
}

/// `x *= a`.
#[inline]
pub fn scale(a: f32, x: &mut [f32]) {
    for v in x.iter_mut() {
        *v *= a;
    }
}

/// Maximum of a slice (`-inf` for an empty one; NaN propagates as a non-maximum).
pub fn max(x: &[f32]) -> f32 {
    let mut m = f32x16::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i + LANES <= x.len() {
        m = m.max(simd::load(&x[i..]));
        i += LANES;
    }
    let mut out = m.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max);
    for &v in &x[i..] {
        out = out.max(v);
    }
    out
}

/// Sum of a slice.
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = f32x16::ZERO;
    let mut i = 0;
    while i + LANES <= x.len() {
        acc += simd::load(&x[i..]);
        i += LANES;
    }
    let mut s = acc.reduce_add();
    for &v in &x[i..] {
        s += v;
    }
    s
}

/// Vectorized `exp`: range reduction by ln 2 and a degree-6 polynomial, about 2 ulp on
/// [-87, 88]. Inputs below -87.3 give exactly 0 (no denormals), above 88.7 give +inf, NaN stays
/// NaN.
#[inline(always)]
pub fn exp16(x: f32x16) -> f32x16 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let too_small = x.simd_lt(f32x16::splat(-87.33655));
    let too_big = x.simd_gt(f32x16::splat(88.72283));
    let xc = x
        .fast_max(f32x16::splat(-87.33655))
        .fast_min(f32x16::splat(88.72283));
    let n = (xc * f32x16::splat(LOG2E)).round();
    let r = n.mul_neg_add(f32x16::splat(LN2_HI), xc);
    let r = n.mul_neg_add(f32x16::splat(LN2_LO), r);
    // exp(r) on |r| <= ln2/2, Taylor coefficients refined (Cephes expf).
    let mut p = f32x16::splat(1.987_569_1e-4);
    p = p.mul_add(r, f32x16::splat(1.398_199_9e-3));
    p = p.mul_add(r, f32x16::splat(8.333_452e-3));
    p = p.mul_add(r, f32x16::splat(4.166_579_6e-2));
    p = p.mul_add(r, f32x16::splat(1.666_666_5e-1));
    p = p.mul_add(r, f32x16::splat(0.5));
    let r2 = r * r;
    let e = p.mul_add(r2, r + f32x16::ONE);
    // 2^n by building the exponent bits; n is in [-126, 128] here, so split it in two factors
    // to stay inside the normal range at both ends.
    let ni = n.round_int();
    let half = ni >> 1;
    let rest = ni - half;
    let bias = wide::i32x16::splat(127);
    let p1: f32x16 = bytemuck::cast((half + bias) << 23);
    let p2: f32x16 = bytemuck::cast((rest + bias) << 23);
    let out = e * p1 * p2;
    let out = too_small.select(f32x16::ZERO, out);
    let out = too_big.select(f32x16::splat(f32::INFINITY), out);
    // NaN inputs: the comparisons are false and the clamp may have replaced them; restore NaN.
    x.is_nan().select(x, out)
}

/// `x[i] = exp(x[i] - shift)` in place.
pub fn exp_shifted(x: &mut [f32], shift: f32) {
    let sv = f32x16::splat(shift);
    let mut i = 0;
    while i + LANES <= x.len() {
        let v = exp16(simd::load(&x[i..]) - sv);
        simd::store(&mut x[i..], v);
        i += LANES;
    }
    let n = x.len();
    if i < n {
        let mut tail = [0f32; LANES];
        tail[..n - i].copy_from_slice(&x[i..]);
        let v = exp16(f32x16::from(tail) - sv).to_array();
        x[i..].copy_from_slice(&v[..n - i]);
    }
}

/// Vectorized error function (Abramowitz & Stegun 7.1.26, absolute error ≤ 1.5e-7).
#[inline(always)]
pub fn erf16(x: f32x16) -> f32x16 {
    let a = x.abs();
    let t = f32x16::ONE / f32x16::splat(0.327_591_1).mul_add(a, f32x16::ONE);
    let mut p = f32x16::splat(1.061_405_4);
    p = p.mul_add(t, f32x16::splat(-1.453_152));
    p = p.mul_add(t, f32x16::splat(1.421_413_8));
    p = p.mul_add(t, f32x16::splat(-0.284_496_74));
    p = p.mul_add(t, f32x16::splat(0.254_829_6));
    let y = f32x16::ONE - p * t * exp16(-(a * a));
    x.is_sign_negative().select(-y, y)
}

/// Exact (erf) GELU in place: `x · Φ(x)`, as `torch.nn.GELU()`.
pub fn gelu(x: &mut [f32]) {
    let half = f32x16::splat(0.5);
    let inv_sqrt2 = f32x16::splat(std::f32::consts::FRAC_1_SQRT_2);
    let apply = |v: f32x16| half * v * (f32x16::ONE + erf16(v * inv_sqrt2));
    let mut i = 0;
    while i + LANES <= x.len() {
        let v = apply(simd::load(&x[i..]));
        simd::store(&mut x[i..], v);
        i += LANES;
    }
    let n = x.len();
    if i < n {
        let mut tail = [0f32; LANES];
        tail[..n - i].copy_from_slice(&x[i..]);
        let v = apply(f32x16::from(tail)).to_array();
        x[i..].copy_from_slice(&v[..n - i]);
    }
}

/// LayerNorm over the whole vector: `(x − mean) / sqrt(var + eps) · gamma + beta`, biased
/// variance, as `torch.nn.LayerNorm`.
pub fn layer_norm<T: Elem>(x: &[f32], gamma: &[T], beta: &[T], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let mean = sum(x) / n as f32;
    let mv = f32x16::splat(mean);
    let mut acc = f32x16::ZERO;
    let mut i = 0;
    while i + LANES <= n {
        let d = simd::load(&x[i..]) - mv;
        acc = d.mul_add(d, acc);
        i += LANES;
    }
    let mut var = acc.reduce_add();
    for &v in &x[i..] {
        var += (v - mean) * (v - mean);
    }
    let inv = 1.0 / (var / n as f32 + eps).sqrt();
    let iv = f32x16::splat(inv);
    let mut i = 0;
    while i + LANES <= n {
        let v = (simd::load(&x[i..]) - mv) * iv;
        let r = v.mul_add(T::load16(&gamma[i..]), T::load16(&beta[i..]));
        simd::store(&mut out[i..], r);
        i += LANES;
    }
    for k in i..n {
        out[k] = (x[k] - mean) * inv * gamma[k].to_f32() + beta[k].to_f32();
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let m = max(x);
    exp_shifted(x, m);
    let s = sum(x);
    scale(1.0 / s, x);
}

/// `y += b` for a bias vector stored in any weight dtype.
pub fn add_bias<T: Elem>(b: &[T], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(b) {
        *o += v.to_f32();
    }
}

/// `kernel::<V>(args)` for a row width of `V` registers, `V` in 1..=8 (the widths the
/// register-blocked kernels below hold in registers; callers check the range).
macro_rules! by_vectors {
    ($vecs:expr, $kernel:ident($($arg:expr),*)) => {
        match $vecs {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            _ => $kernel::<8>($($arg),*),
        }
    };
}

/// A FAVOR+ decode step's one pass over a head's `m × d` state (`d = x.len()`, `m = a.len()`):
/// row `f` of `s` becomes `b · s_f + a_f · x` exactly as [`kahan_scale_axpy`] computes it
/// (compensation in `c`), and then `out += w_f · s_f` with the new row, as [`axpy`] would.
/// Bit-identical to those two calls per row; for `d` a multiple of 16 up to 128 the output
/// and `x` stay in registers across all rows instead of a call pair per 64-float row.
pub fn kahan_update_readout(
    b: f32,
    a: &[f32],
    x: &[f32],
    w: &[f32],
    s: &mut [f32],
    c: &mut [f32],
    out: &mut [f32],
) {
    const MAX_VECS: usize = 8;
    let d = x.len();
    let m = a.len().min(w.len());
    assert!(s.len() >= m * d && c.len() >= m * d && out.len() >= d);
    if d == 0 || !d.is_multiple_of(LANES) || d / LANES > MAX_VECS {
        for f in 0..m {
            let r = f * d..(f + 1) * d;
            kahan_scale_axpy(b, a[f], x, &mut s[r.clone()], &mut c[r.clone()]);
            axpy(w[f], &s[r], out);
        }
        return;
    }
    by_vectors!(d / LANES, update_readout_regs(b, a, x, w, s, c, out));
}

/// [`kahan_update_readout`] for `d = V · 16`: `x` and the output held in `2V` registers.
#[inline(always)]
fn update_readout_regs<const V: usize>(
    b: f32,
    a: &[f32],
    x: &[f32],
    w: &[f32],
    s: &mut [f32],
    c: &mut [f32],
    out: &mut [f32],
) {
    let d = V * LANES;
    let bv = f32x16::splat(b);
    let xs: [f32x16; V] = std::array::from_fn(|j| simd::load(&x[j * LANES..]));
    let mut acc: [f32x16; V] = std::array::from_fn(|j| simd::load(&out[j * LANES..]));
    for (f, (&af, &wf)) in a.iter().zip(w).enumerate() {
        let (av, wv) = (f32x16::splat(af), f32x16::splat(wf));
        let (row_s, row_c) = (&mut s[f * d..(f + 1) * d], &mut c[f * d..(f + 1) * d]);
        for j in 0..V {
            let o = j * LANES;
            let (mut sv, mut cv) = (simd::load(&row_s[o..]), simd::load(&row_c[o..]));
            if b != 1.0 {
                sv *= bv;
                cv *= bv;
            }
            let y = xs[j].mul_sub(av, cv);
            let t = sv + y;
            simd::store(&mut row_c[o..], (t - sv) - y);
            simd::store(&mut row_s[o..], t);
            acc[j] = t.mul_add(wv, acc[j]);
        }
    }
    for (j, v) in acc.iter().enumerate() {
        simd::store(&mut out[j * LANES..], *v);
    }
}

/// `out = pᵀ W = Σ_j p_j · W_j` for a row-major `W` of `p.len()` rows of width `out.len()`
/// (attention's weighted sum of value rows). For widths that are a multiple of 16 up to 128
/// the output stays in registers, with two accumulator sets so consecutive rows do not wait on
/// each other's FMA.
pub fn vecmat(p: &[f32], w: &[f32], out: &mut [f32]) {
    let d = out.len();
    assert!(
        w.len() >= p.len() * d,
        "vecmat: W has fewer than p.len() rows"
    );
    if d == 0 || !d.is_multiple_of(LANES) || d / LANES > 8 {
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            axpy(pj, &w[j * d..(j + 1) * d], out);
        }
        return;
    }
    by_vectors!(d / LANES, vecmat_regs(p, w, out));
}

#[inline(always)]
fn vecmat_regs<const V: usize>(p: &[f32], w: &[f32], out: &mut [f32]) {
    let d = V * LANES;
    let mut even = [f32x16::ZERO; V];
    let mut odd = [f32x16::ZERO; V];
    let mut pairs = p.chunks_exact(2);
    let mut j = 0;
    for pair in &mut pairs {
        let (p0, p1) = (f32x16::splat(pair[0]), f32x16::splat(pair[1]));
        for v in 0..V {
            even[v] = simd::load(&w[j * d + v * LANES..]).mul_add(p0, even[v]);
            odd[v] = simd::load(&w[(j + 1) * d + v * LANES..]).mul_add(p1, odd[v]);
        }
        j += 2;
    }
    if let [last] = pairs.remainder() {
        let pl = f32x16::splat(*last);
        for v in 0..V {
            even[v] = simd::load(&w[j * d + v * LANES..]).mul_add(pl, even[v]);
        }
    }
    for v in 0..V {
        simd::store(&mut out[v * LANES..], even[v] + odd[v]);
    }
}

/// Compensated (Kahan) `s = b · s + a · x`, keeping in `c` the low-order bits each addition
/// lost, so that rounding does not accumulate over millions of additions (the true sum is
/// `s − c`). `b` rescales sum and compensation alike.
#[inline]
pub fn kahan_scale_axpy(b: f32, a: f32, x: &[f32], s: &mut [f32], c: &mut [f32]) {
    let n = x.len().min(s.len()).min(c.len());
    let (av, bv) = (f32x16::splat(a), f32x16::splat(b));
    let mut i = 0;
    while i + LANES <= n {
        let (mut sv, mut cv) = (simd::load(&s[i..]), simd::load(&c[i..]));
        if b != 1.0 {
            sv *= bv;
            cv *= bv;
        }
        let y = simd::load(&x[i..]).mul_sub(av, cv);
        let t = sv + y;
        simd::store(&mut c[i..], (t - sv) - y);
        simd::store(&mut s[i..], t);
        i += LANES;
    }
    for k in i..n {
        let (mut sk, mut ck) = (s[k], c[k]);
        if b != 1.0 {
            sk *= b;
            ck *= b;
        }
        let y = a * x[k] - ck;
        let t = sk + y;
        c[k] = (t - sk) - y;
        s[k] = t;
    }
}
