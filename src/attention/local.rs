//! Local heads: exact softmax attention over a bounded window of recent keys, with the
//! semantics of the `local-attention` package (1.11.2) as performer-pytorch configures it
//! (`causal`, `look_backward = 1`, `look_forward = 0`, `exact_windowsize = False`).
//!
//! Positions are split into blocks of `w`; a query at `p` sees every key `j ≤ p` whose block is
//! the query's or the one before (`j / w ≥ p / w − 1`): between `w + 1` and `2w` keys once
//! `p ≥ w`. Queries are scaled by `d^(−1/2)` and both queries and keys get the package's own
//! rotary embedding (rotate-half pairing `(i, i + d/2)`, frequencies from the checkpoint's
//! `inv_freq`). Only relative positions matter to it, so the runtime rotates by absolute
//! positions and keeps the last `2w` rotated keys and values in a ring: bounded memory.

/// Rotates `x` by `pos · θ_i` with rotate-half pairing.
pub fn rotate_half(x: &mut [f32], inv_freq: &[f32], pos: usize) {
    rotate_half_by(x, &rotation(&inv_freq[..x.len() / 2], pos));
}

/// `(sin, cos)` of `pos · θ_i` for every frequency, computed in f64 and rounded to f32: the
/// rotation [`rotate_half`] applies. A layer's local heads rotate every query and key of a
/// position by the same table, so decoding computes it once per layer and position instead
/// of once per vector (the sines and cosines are the costly part).
pub fn rotation(inv_freq: &[f32], pos: usize) -> Vec<(f32, f32)> {
    inv_freq
        .iter()
        .map(|&f| {
            let angle = pos as f64 * f as f64;
            (angle.sin() as f32, angle.cos() as f32)
        })
        .collect()
}

/// Rotates `x` (rotate-half pairing) by a [`rotation`] table of `x.len() / 2` entries.
pub fn rotate_half_by(x: &mut [f32], rot: &[(f32, f32)]) {
    let half = x.len() / 2;
    let (lo, hi) = x.split_at_mut(half);
    for ((a, b), &(s, c)) in lo.iter_mut().zip(hi.iter_mut()).zip(rot) {
        let (x0, x1) = (*a, *b);
        *a = x0 * c - x1 * s;
        *b = x1 * c + x0 * s;
    }
}

/// First position a query at `pos` attends to.
pub fn window_start(pos: usize, window: usize) -> usize {
    (pos / window).saturating_sub(1) * window
}

/// Ring buffers of one local head: `2w` rotated keys and values of width `d`.
pub struct LocalHeadState<'s> {
    /// Keys, `2w × d`, slot `j mod 2w`.
    pub keys: &'s mut [f32],
    /// Values, `2w × d`.
    pub values: &'s mut [f32],
    /// Scratch for the scores, `2w`.
    pub scores: &'s mut [f32],
}

/// Adds the token at `pos` and writes the head's output for it into `out`. `q` and `k` are
/// modified (scaled and rotated by `rot`, the [`rotation`] of `pos`).
#[allow(clippy::too_many_arguments)]
pub fn step(
    window: usize,
    rot: &[(f32, f32)],
    pos: usize,
    st: LocalHeadState<'_>,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    out: &mut [f32],
) {
    let d = q.len();
    let ring = 2 * window;
    let scale = (d as f32).powf(-0.5);
    for x in q.iter_mut() {
        *x *= scale;
    }
    rotate_half_by(q, rot);
    rotate_half_by(k, rot);
    let slot = pos % ring;
    st.keys[slot * d..(slot + 1) * d].copy_from_slice(k);
    st.values[slot * d..(slot + 1) * d].copy_from_slice(v);
    let start = window_start(pos, window);
    let count = pos + 1 - start;
    let scores = &mut st.scores[..count];
    // The window's slots are at most two runs of the ring: `first` slots from `s0`, then the
    // rest from slot 0. Each run is one matrix-vector product (each score the same dot
    // product as taken one key at a time) and one weighted sum of value rows (added row by
    // row as one `axpy` per row would).
    let s0 = start % ring;
    let first = count.min(ring - s0);
    let (head, tail) = scores.split_at_mut(first);
    crate::kernels::matvec_serial(&st.keys[s0 * d..(s0 + first) * d], q, head);
    crate::kernels::matvec_serial(&st.keys[..tail.len() * d], q, tail);
    crate::kernels::softmax(scores);
    out.fill(0.0);
    let (head, tail) = scores.split_at(first);
    crate::kernels::axpy_rows(head, &st.values[s0 * d..(s0 + first) * d], out);
    crate::kernels::axpy_rows(tail, &st.values[..tail.len() * d], out);
}

/// The definition in f64, all positions at once: rows of `q`, `k`, `v` are positions.
pub fn reference(
    window: usize,
    inv_freq: &[f32],
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    let d = q.first().map_or(0, Vec::len);
    let half = d / 2;
    let rot = |x: &[f32], p: usize| -> Vec<f64> {
        let mut y: Vec<f64> = x.iter().map(|&a| a as f64).collect();
        for i in 0..half {
            let angle = p as f64 * inv_freq[i] as f64;
            let (a, b) = (y[i], y[half + i]);
            y[i] = a * angle.cos() - b * angle.sin();
            y[half + i] = b * angle.cos() + a * angle.sin();
        }
        y
    };
    let scale = (d as f64).powf(-0.5);
    let keys: Vec<Vec<f64>> = k.iter().enumerate().map(|(p, x)| rot(x, p)).collect();
    (0..q.len())
        .map(|t| {
            let qt: Vec<f64> = rot(&q[t], t).iter().map(|x| x * scale).collect();
            let js: Vec<usize> = (window_start(t, window)..=t).collect();
            let s: Vec<f64> = js
                .iter()
                .map(|&j| qt.iter().zip(&keys[j]).map(|(a, b)| a * b).sum())
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let tot: f64 = e.iter().sum();
            let mut o = vec![0f64; d];
            for (w, &j) in e.iter().zip(&js) {
                for (oi, &vi) in o.iter_mut().zip(&v[j]) {
                    *oi += w / tot * vi as f64;
                }
            }
            o.iter().map(|&x| x as f32).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation as it was computed per vector before the per-position table: each
    /// element's angle in f64, its sine and cosine rounded to f32, then the pair rotated.
    fn rotate_direct(x: &mut [f32], inv_freq: &[f32], pos: usize) {
        let half = x.len() / 2;
        for i in 0..half {
            let angle = pos as f64 * inv_freq[i] as f64;
            let (s, c) = (angle.sin() as f32, angle.cos() as f32);
            let (a, b) = (x[i], x[half + i]);
            x[i] = a * c - b * s;
            x[half + i] = b * c + a * s;
        }
    }

    #[test]
    fn table_rotation_is_bit_for_bit_the_direct_one() {
        // Even and odd widths (the odd one's last element is not rotated), positions from 0
        // to past a million (large angles), zeros, tiny and huge values.
        for d in [1usize, 2, 7, 64, 65] {
            let inv_freq: Vec<f32> = (0..d / 2)
                .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
                .collect();
            for pos in [0usize, 1, 255, 4097, 1 << 20, 3_000_017] {
                for scale in [0.0f32, 1e-30, 1.0, 1e30] {
                    let x: Vec<f32> = (0..d)
                        .map(|i| scale * ((i as f32 * 0.37).sin() - 0.2))
                        .collect();
                    let (mut a, mut b) = (x.clone(), x.clone());
                    rotate_direct(&mut a, &inv_freq, pos);
                    rotate_half_by(&mut b, &rotation(&inv_freq, pos));
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "d {d} pos {pos} scale {scale}");
                    let mut c = x.clone();
                    rotate_half(&mut c, &inv_freq, pos);
                    assert_eq!(bits(&a), bits(&c), "d {d} pos {pos} scale {scale}");
                }
            }
        }
    }
}
