//! Scalar twins of the SIMD kernels: the plain definitions, one element at a time, accumulating
//! in f64 where it makes them a sharper reference.

use super::Elem;
use half::bf16;

/// Dot product, accumulated in f64.
pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(a, b)| a.to_f32() as f64 * *b as f64)
        .sum::<f64>() as f32
}

/// `y = W x`, row by row.
pub fn matvec<T: Elem>(w: &[T], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    for (r, out) in y.iter_mut().enumerate() {
        *out = dot(&w[r * cols..(r + 1) * cols], x);
    }
}

/// `y = X Wᵀ` for `inputs` input rows: `y[i·out + o] = dot(w_o, x_i)`, input row by input row.
pub fn matvec_batch<T: Elem>(w: &[T], x: &[f32], inputs: usize, y: &mut [f32]) {
    if inputs == 0 {
        return;
    }
    let (cols, out) = (x.len() / inputs, y.len() / inputs);
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    for (xi, yi) in x.chunks(cols.max(1)).zip(y.chunks_mut(out.max(1))) {
        matvec(&w[..out * cols], xi, yi);
    }
}

/// `y += a · x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `x[i] = exp(x[i] − shift)` with the standard library's `exp`.
pub fn exp_shifted(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
    }
}

/// The error function in f64: Taylor series below 3, continued fraction for erfc above.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/√π Σ (−1)^n a^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let a2 = a * a;
        for n in 1..200 {
            term *= -a2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(−a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + 2/(a + …)))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Exact GELU `x · Φ(x)` in f64.
pub fn gelu(x: &mut [f32]) {
    for v in x.iter_mut() {
        let xf = *v as f64;
        *v = (0.5 * xf * (1.0 + erf(xf / std::f64::consts::SQRT_2))) as f32;
    }
}

/// LayerNorm in f64.
pub fn layer_norm<T: Elem>(x: &[f32], gamma: &[T], beta: &[T], eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for i in 0..x.len() {
        out[i] = ((x[i] as f64 - mean) * inv * gamma[i].to_f32() as f64 + beta[i].to_f32() as f64)
            as f32;
    }
}

/// Softmax in f64.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    for (o, v) in x.iter_mut().zip(e) {
        *o = (v / s) as f32;
    }
}

/// `y = x · Wᵀ` row by row, f64 accumulation.
pub fn linear<T: Elem>(x: &[f32], rows: usize, w: &[T], out: usize, y: &mut [f32]) {
    let inp = x.len() / rows.max(1);
    for r in 0..rows {
        matvec(
            w,
            &x[r * inp..(r + 1) * inp],
            &mut y[r * out..(r + 1) * out],
        );
    }
}

/// `dst[k · n + j] = rows[j][k]` for `k < kc`, `n = rows.len()`: the rows transposed into a
/// packed panel `[kc][n]` (the twin of [`super::Kernels::pack_panel`]).
///
/// # Panics
/// When a row is shorter than `kc` or `dst` shorter than `kc · n`.
pub fn pack_panel(rows: &[&[f32]], kc: usize, dst: &mut [f32]) {
    let n = rows.len();
    for (j, row) in rows.iter().enumerate() {
        for (k, &v) in row[..kc].iter().enumerate() {
            dst[k * n + j] = v;
        }
    }
}

/// `dst[i] = bf16(src[i])` by `half`'s conversion (round to nearest even).
pub fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(x);
    }
}

/// `s = b · s + a · x` in f64 (the compensated sum's reference; `c` is left at zero).
pub fn kahan_scale_axpy(b: f32, a: f32, x: &[f32], s: &mut [f32], c: &mut [bf16]) {
    for ((sk, ck), &xk) in s.iter_mut().zip(c.iter_mut()).zip(x) {
        let exact = b as f64 * (*sk as f64 - ck.to_f64()) + a as f64 * xk as f64;
        *sk = exact as f32;
        *ck = bf16::ZERO;
    }
}

/// The decode step's pass over a head's state in f64: `s_f = b · s_f + a_f · x` (compensation
/// folded in and left at zero), then `out += w_f · s_f`.
pub fn kahan_update_readout(
    b: f32,
    a: &[f32],
    x: &[f32],
    w: &[f32],
    s: &mut [f32],
    c: &mut [bf16],
    out: &mut [f32],
) {
    let d = x.len();
    let mut acc: Vec<f64> = out.iter().map(|&o| o as f64).collect();
    for (f, (&af, &wf)) in a.iter().zip(w).enumerate() {
        let r = f * d..(f + 1) * d;
        kahan_scale_axpy(b, af, x, &mut s[r.clone()], &mut c[r.clone()]);
        for (o, &v) in acc.iter_mut().zip(&s[r]) {
            *o += wf as f64 * v as f64;
        }
    }
    for (o, v) in out.iter_mut().zip(acc) {
        *o = v as f32;
    }
}

/// `out = pᵀ W` in f64, row by row.
pub fn vecmat(p: &[f32], w: &[f32], out: &mut [f32]) {
    let d = out.len();
    let mut acc = vec![0f64; d];
    for (j, &pj) in p.iter().enumerate() {
        for (a, &x) in acc.iter_mut().zip(&w[j * d..(j + 1) * d]) {
            *a += pj as f64 * x as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32;
    }
}

/// `x *= a`.
pub fn scale(a: f32, x: &mut [f32]) {
    for v in x.iter_mut() {
        *v *= a;
    }
}

/// `y += b`, the bias widened to f32.
pub fn add_bias<T: Elem>(b: &[T], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(b) {
        *o += v.to_f32();
    }
}
