//! Fixed sinusoidal tables: the input position embedding and the rotary q/k rotation.
//!
//! performer-pytorch stores both tables as buffers (`pos_emb.emb`, `layer_pos_emb.emb`) for
//! positions below `max_seq_len`, computed by torch in f32. The runtime reads those rows for
//! exact parity and extends the tables past `max_seq_len` by the same formula evaluated in f64
//! (the angle `p · ω` loses precision in f32 at large `p`).

use wide::f64x4;

use crate::weights::Tensor;

/// A sinusoid table of width `dim`: row `p` is `[sin(p·ω_0), …, sin(p·ω_{dim/2−1}), cos(p·ω_0), …]`
/// with `ω_i = 10000^(−2i/dim)`.
#[derive(Debug, Clone)]
pub struct Sinusoid {
    dim: usize,
    table: Option<Tensor>,
    /// `ω_i` in f64, computed once: past the table every decode step needs a row.
    inv_freq: Vec<f64>,
}

impl Sinusoid {
    /// A table of width `dim` backed by the checkpoint's buffer where it has one.
    pub fn new(dim: usize, table: Option<Tensor>) -> Self {
        Sinusoid {
            dim,
            table,
            inv_freq: Self::inv_freq(dim),
        }
    }

    /// torch: `inv_freq = 1 / 10000^(arange(0, dim, 2) / dim)`.
    fn inv_freq(dim: usize) -> Vec<f64> {
        (0..dim / 2)
            .map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64))
            .collect()
    }

    /// Writes row `pos` into `out[..dim]`.
    pub fn row(&self, pos: usize, out: &mut [f32]) {
        if let Some(t) = &self.table {
            if pos < t.shape()[0] {
                t.row(pos).to_f32_into(&mut out[..self.dim]);
                return;
            }
        }
        Self::angles(&self.inv_freq, pos, out);
    }

    /// The formula, in f64 then rounded.
    pub fn formula(dim: usize, pos: usize, out: &mut [f32]) {
        Self::angles(&Self::inv_freq(dim), pos, out);
    }

    fn angles(inv_freq: &[f64], pos: usize, out: &mut [f32]) {
        // Every decode step past the table needs a row (dim/2 angles for the rotary q/k and
        // for the input embedding), so four angles go through one f64x4 sin/cos: as accurate
        // as libm's (both are ~1 ulp in f64, far below the f32 rounding of the result) and
        // a fraction of its time: past the table every step pays for the row, a cost depth 0
        // does not have, so it is on the path that decoding at depth 1M measures
        // (docs/performance.md).
        let half = inv_freq.len();
        let (sin_out, cos_out) = out[..2 * half].split_at_mut(half);
        let p = pos as f64;
        let blocks = half / 4;
        for b in 0..blocks {
            let w = f64x4::from(<[f64; 4]>::try_from(&inv_freq[4 * b..4 * b + 4]).unwrap());
            let (sin, cos) = reduce_angle_x4(f64x4::splat(p) * w).sin_cos();
            for (lane, (s, c)) in sin.to_array().into_iter().zip(cos.to_array()).enumerate() {
                sin_out[4 * b + lane] = s as f32;
                cos_out[4 * b + lane] = c as f32;
            }
        }
        for i in 4 * blocks..half {
            let (s, c) = reduce_angle(p * inv_freq[i]).sin_cos();
            sin_out[i] = s as f32;
            cos_out[i] = c as f32;
        }
    }

    /// The scalar twin of the row formula (libm's sin/cos on each reduced angle), kept as
    /// the reference for the vectorized [`Sinusoid::formula`].
    pub fn formula_scalar(dim: usize, pos: usize, out: &mut [f32]) {
        let inv_freq = Self::inv_freq(dim);
        let half = inv_freq.len();
        for (i, &w) in inv_freq.iter().enumerate() {
            let (s, c) = reduce_angle(pos as f64 * w).sin_cos();
            out[i] = s as f32;
            out[half + i] = c as f32;
        }
    }
}

/// `angle` reduced to `[−π, π)`. The f64 product `pos · ω` is exact to ~1e-10 rad even at ten
/// million positions; sin/cos of huge arguments would otherwise take libm's slow argument
/// reduction (and lose the vector sin/cos's accuracy) on every decode step.
fn reduce_angle(angle: f64) -> f64 {
    use std::f64::consts::{PI, TAU};
    let turns = ((angle + PI) / TAU).floor();
    turns.mul_add(-TAU, angle)
}

/// [`reduce_angle`] on four lanes, bit-identical to it.
///
/// `angle − turns·τ` must round once, as the scalar twin's fused multiply-add does: at 1e15
/// rad two roundings lose the whole angle. `wide` fuses only when the build enables FMA, and
/// the default x86-64 target does not, so the product is taken exactly as a sum `p + e`
/// (Dekker's product of Veltkamp halves, plain f64 operations); `angle − p` is then exact
/// (Sterbenz: the two are within a factor of two, or `p` is 0), and subtracting `e` is the one
/// rounding.
fn reduce_angle_x4(angle: f64x4) -> f64x4 {
    use std::f64::consts::{PI, TAU};
    let turns = ((angle + f64x4::splat(PI)) / f64x4::splat(TAU)).floor();
    let tau = f64x4::splat(TAU);
    let (p, e) = two_product(turns, tau);
    (angle - p) - e
}

/// Veltkamp's split of `a` into 26-bit halves, `hi + lo = a` exactly.
fn split(a: f64x4) -> (f64x4, f64x4) {
    let t = f64x4::splat(134_217_729.0) * a; // 2^27 + 1
    let hi = t - (t - a);
    (hi, a - hi)
}

/// Dekker's exact product: `p = fl(a·b)` and `e` with `p + e = a·b` exactly (no overflow here:
/// |a| ≤ 2^52 turns, b = τ).
fn two_product(a: f64x4, b: f64x4) -> (f64x4, f64x4) {
    let p = a * b;
    let (ah, al) = split(a);
    let (bh, bl) = split(b);
    let e = ((ah * bh - p) + ah * bl + al * bh) + al * bl;
    (p, e)
}

/// Rotates interleaved pairs `(2i, 2i+1)` of `x` by the angles of a sinusoid row
/// (`sin` in the first half of `row`, `cos` in the second), as performer-pytorch's
/// `apply_rotary_pos_emb`.
pub fn rotate(x: &mut [f32], row: &[f32]) {
    let half = x.len() / 2;
    let (sin, cos) = row.split_at(half);
    for i in 0..half {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * cos[i] - b * sin[i];
        x[2 * i + 1] = b * cos[i] + a * sin[i];
    }
}
