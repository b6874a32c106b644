//! Element-wise kernels and reductions: axpy, scale, max, sum, exp, GELU, LayerNorm, softmax,
//! bias, widening and bf16 narrowing. Generic over the level ([`Lanes`]).

use half::bf16;

use super::simd::{Elem, Lanes, LANES};

#[inline(always)]
pub(super) fn axpy_k<S: Lanes>(s: S, a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = s.splat(a);
    let mut i = 0;
    while i + LANES <= n {
        let r = s.mul_add(s.load(&x[i..]), av, s.load(&y[i..]));
        s.store(&mut y[i..], r);
        i += LANES;
    }
    for k in i..n {
        y[k] += a * x[k];
    }
}

#[inline(always)]
pub(super) fn scale_k<S: Lanes>(s: S, a: f32, x: &mut [f32]) {
    let av = s.splat(a);
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let v = s.mul(s.load(c), av);
        s.store(c, v);
    }
    for v in chunks.into_remainder() {
        *v *= a;
    }
}

#[inline(always)]
pub(super) fn max_k<S: Lanes>(s: S, x: &[f32]) -> f32 {
    let mut m = s.splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i + LANES <= x.len() {
        m = s.max(m, s.load(&x[i..]));
        i += LANES;
    }
    let mut out = s.to_array(m).into_iter().fold(f32::NEG_INFINITY, f32::max);
    for &v in &x[i..] {
        out = out.max(v);
    }
    out
}

#[inline(always)]
pub(super) fn sum_k<S: Lanes>(s: S, x: &[f32]) -> f32 {
    let mut acc = [s.zero(); 4];
    let mut blocks = x.chunks_exact(4 * LANES);
    for b in &mut blocks {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = s.add(*a, s.load(&b[j * LANES..]));
        }
    }
    let rest = blocks.remainder();
    let mut i = 0;
    while i + LANES <= rest.len() {
        acc[0] = s.add(acc[0], s.load(&rest[i..]));
        i += LANES;
    }
    let mut total = s.reduce_add(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])));
    for &v in &rest[i..] {
        total += v;
    }
    total
}

/// Vectorized `exp` (see [`Kernels::exp_shifted`]).
#[inline(always)]
fn exp16<S: Lanes>(s: S, x: S::V) -> S::V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LOW: f32 = -87.33655;
    const HIGH: f32 = 88.72283;
    let too_small = s.lt(x, s.splat(LOW));
    let too_big = s.gt(x, s.splat(HIGH));
    let xc = s.min(s.max(x, s.splat(LOW)), s.splat(HIGH));
    let n = s.round(s.mul(xc, s.splat(LOG2E)));
    let r = s.neg_mul_add(n, s.splat(LN2_HI), xc);
    let r = s.neg_mul_add(n, s.splat(LN2_LO), r);
    // exp(r) on |r| <= ln2/2, Taylor coefficients refined (Cephes expf).
    let mut p = s.splat(1.987_569_1e-4);
    p = s.mul_add(p, r, s.splat(1.398_199_9e-3));
    p = s.mul_add(p, r, s.splat(8.333_452e-3));
    p = s.mul_add(p, r, s.splat(4.166_579_6e-2));
    p = s.mul_add(p, r, s.splat(1.666_666_5e-1));
    p = s.mul_add(p, r, s.splat(0.5));
    let r2 = s.mul(r, r);
    let e = s.mul_add(p, r2, s.add(r, s.splat(1.0)));
    // 2^n with n in [-126, 128] here, as two factors inside the normal range.
    let out = s.ldexp(e, n);
    let out = s.select(too_small, s.zero(), out);
    let out = s.select(too_big, s.splat(f32::INFINITY), out);
    // NaN inputs: the comparisons are false and the clamp replaced them; restore NaN.
    s.select(s.is_nan(x), x, out)
}

#[inline(always)]
pub(super) fn exp_shifted_k<S: Lanes>(s: S, x: &mut [f32], shift: f32) {
    let sv = s.splat(shift);
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let v = exp16(s, s.sub(s.load(c), sv));
        s.store(c, v);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let v = exp16(s, s.sub(s.load_partial(tail), sv));
        s.store_partial(tail, v);
    }
}

/// Vectorized error function (Abramowitz & Stegun 7.1.26, absolute error ≤ 1.5e-7).
#[inline(always)]
fn erf16<S: Lanes>(s: S, x: S::V) -> S::V {
    let one = s.splat(1.0);
    let a = s.abs(x);
    let t = s.div(one, s.mul_add(s.splat(0.327_591_1), a, one));
    let mut p = s.splat(1.061_405_4);
    p = s.mul_add(p, t, s.splat(-1.453_152));
    p = s.mul_add(p, t, s.splat(1.421_413_8));
    p = s.mul_add(p, t, s.splat(-0.284_496_74));
    p = s.mul_add(p, t, s.splat(0.254_829_6));
    let y = s.sub(
        one,
        s.mul(s.mul(p, t), exp16(s, s.neg_mul_add(a, a, s.zero()))),
    );
    s.flip_sign(y, x)
}

/// `x · Φ(x)` on one vector.
#[inline(always)]
fn gelu16<S: Lanes>(s: S, v: S::V) -> S::V {
    let inv_sqrt2 = s.splat(std::f32::consts::FRAC_1_SQRT_2);
    let phi = s.add(s.splat(1.0), erf16(s, s.mul(v, inv_sqrt2)));
    s.mul(s.mul(s.splat(0.5), v), phi)
}

#[inline(always)]
pub(super) fn gelu_k<S: Lanes>(s: S, x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let v = gelu16(s, s.load(c));
        s.store(c, v);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let v = gelu16(s, s.load_partial(tail));
        s.store_partial(tail, v);
    }
}

#[inline(always)]
pub(super) fn layer_norm_k<S: Lanes, T: Elem>(
    s: S,
    x: &[f32],
    gamma: &[T],
    beta: &[T],
    eps: f32,
    out: &mut [f32],
) {
    let n = x.len();
    let mean = sum_k(s, x) / n as f32;
    let mv = s.splat(mean);
    let mut acc = s.zero();
    let mut i = 0;
    while i + LANES <= n {
        let d = s.sub(s.load(&x[i..]), mv);
        acc = s.mul_add(d, d, acc);
        i += LANES;
    }
    let mut var = s.reduce_add(acc);
    for &v in &x[i..] {
        var += (v - mean) * (v - mean);
    }
    let inv = 1.0 / (var / n as f32 + eps).sqrt();
    let iv = s.splat(inv);
    let mut i = 0;
    while i + LANES <= n {
        let v = s.mul(s.sub(s.load(&x[i..]), mv), iv);
        let r = s.mul_add(v, s.load_elem(&gamma[i..]), s.load_elem(&beta[i..]));
        s.store(&mut out[i..], r);
        i += LANES;
    }
    for k in i..n {
        out[k] = (x[k] - mean) * inv * gamma[k].to_f32() + beta[k].to_f32();
    }
}

#[inline(always)]
pub(super) fn softmax_k<S: Lanes>(s: S, x: &mut [f32]) {
    let m = max_k(s, x);
    exp_shifted_k(s, x, m);
    let total = sum_k(s, x);
    scale_k(s, 1.0 / total, x);
}

#[inline(always)]
pub(super) fn add_bias_k<S: Lanes, T: Elem>(s: S, b: &[T], y: &mut [f32]) {
    let n = b.len().min(y.len());
    let mut i = 0;
    while i + LANES <= n {
        let r = s.add(s.load(&y[i..]), s.load_elem(&b[i..]));
        s.store(&mut y[i..], r);
        i += LANES;
    }
    for k in i..n {
        y[k] += b[k].to_f32();
    }
}

#[inline(always)]
pub(super) fn widen_k<S: Lanes, T: Elem>(s: S, src: &[T], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + LANES <= n {
        s.store(&mut dst[i..], s.load_elem(&src[i..]));
        i += LANES;
    }
    for k in i..n {
        dst[k] = src[k].to_f32();
    }
}

#[inline(always)]
pub(super) fn narrow_bf16_k<S: Lanes>(s: S, src: &[f32], dst: &mut [bf16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + LANES <= n {
        s.store_bf16(&mut dst[i..], s.load(&src[i..]));
        i += LANES;
    }
    for k in i..n {
        dst[k] = bf16::from_f32(src[k]);
    }
}
