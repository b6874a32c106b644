//! Fixed sinusoidal tables: the input position embedding and the rotary q/k rotation.
//!
//! performer-pytorch stores both tables as buffers (`pos_emb.emb`, `layer_pos_emb.emb`) for
//! positions below `max_seq_len`, computed by torch in f32. The runtime reads those rows for
//! exact parity and extends the tables past `max_seq_len` by the same formula evaluated in f64
//! (the angle `p · ω` loses precision in f32 at large `p`).

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
        let half = inv_freq.len();
        for (i, &w) in inv_freq.iter().enumerate() {
            // Reduced to [0, 2π) first: the f64 product is exact to ~1e-10 rad even at a
            // million positions, and sin/cos of huge arguments would take libm's slow
            // argument-reduction path on every decode step.
            let angle = pos as f64 * w;
            let turns = (angle / std::f64::consts::TAU).floor();
            let (sin, cos) = (turns.mul_add(-std::f64::consts::TAU, angle)).sin_cos();
            out[i] = sin as f32;
            out[half + i] = cos as f32;
        }
    }
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
