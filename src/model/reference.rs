//! The full-sequence reference: every position at once, scalar kernels for every product and
//! the attention evaluated from its definition in f64 (quadratic in the length). The tests
//! hold the streaming step and the row path against it.

use rayon::prelude::*;

use super::Model;
use crate::attention::favor;
use crate::attention::local;
use crate::attention::rotary;
use crate::error::{Error, Result};
use crate::kernels::scalar;
use crate::with_view;

impl Model {
    /// The plain full-sequence forward: scalar kernels for every product and the attention
    /// evaluated from its definition in f64 (quadratic in the length), parallel over positions.
    /// Returns the logits at every position. A test reference, not a fast path.
    pub fn forward_reference(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            return Err(Error::EmptyInput(
                "the reference forward needs at least one token",
            ));
        }
        self.check_tokens(0, tokens)?;
        let c = &self.config;
        let (d, dim) = (c.dim_head, c.dim);
        let mut h: Vec<Vec<f32>> = tokens
            .par_iter()
            .enumerate()
            .map(|(p, &t)| {
                let mut x = self.token_emb.row(t as usize).to_vec();
                let mut tmp = vec![0.0; dim];
                self.positions.add_input(p, &mut x, &mut tmp);
                x
            })
            .collect();
        // Token shift over a whole sequence: features [dim/2, 2·(dim/2)) from the previous
        // position, zeros at position 0.
        let shift = |xs: &mut Vec<Vec<f32>>| {
            if !c.shift_tokens {
                return;
            }
            let seg = dim / 2..2 * (dim / 2);
            for p in (0..xs.len()).rev() {
                let prev: Vec<f32> = if p == 0 {
                    vec![0.0; seg.len()]
                } else {
                    xs[p - 1][seg.clone()].to_vec()
                };
                xs[p][seg.clone()].copy_from_slice(&prev);
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let mut xn: Vec<Vec<f32>> = h
                .par_iter()
                .map(|x| layer.attn_norm.apply_scalar(x))
                .collect();
            shift(&mut xn);
            let qkv: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = xn
                .par_iter()
                .enumerate()
                .map(|(p, xn)| {
                    let mut q = layer.to_q.forward_scalar(xn);
                    let mut k = layer.to_k.forward_scalar(xn);
                    let v = layer.to_v.forward_scalar(xn);
                    if let Some(r) = self.positions.rotary() {
                        let mut rot = vec![0.0; d];
                        r.row(p, &mut rot);
                        for hd in 0..c.heads - layer.local_heads {
                            rotary::rotate(&mut q[hd * d..(hd + 1) * d], &rot);
                            rotary::rotate(&mut k[hd * d..(hd + 1) * d], &rot);
                        }
                    }
                    (q, k, v)
                })
                .collect();
            let map = self.feature_map(l);
            let mut att = vec![vec![0f32; c.inner_dim()]; tokens.len()];
            let gh = c.heads - layer.local_heads;
            for hd in 0..c.heads {
                let r = hd * d..(hd + 1) * d;
                let pick = |i: usize| -> Vec<Vec<f32>> {
                    qkv.iter()
                        .map(|t| [&t.0, &t.1, &t.2][i][r.clone()].to_vec())
                        .collect()
                };
                let out = if hd < gh {
                    favor::reference(&map, c.denominator_eps, &pick(0), &pick(1), &pick(2))
                } else {
                    let inv_freq = layer.local_inv_freq.clone().unwrap_or_default();
                    local::reference(c.local_window_size, &inv_freq, &pick(0), &pick(1), &pick(2))
                };
                for (a, o) in att.iter_mut().zip(out) {
                    a[r.clone()].copy_from_slice(&o);
                }
            }
            let attn_gain = layer.attn_norm.gain();
            h = h
                .into_par_iter()
                .zip(att.par_iter())
                .map(|(mut x, a)| {
                    let o = layer.attn_out.forward_scalar(a);
                    for (xi, oi) in x.iter_mut().zip(&o) {
                        *xi += attn_gain * oi;
                    }
                    x
                })
                .collect();
            let mut xn: Vec<Vec<f32>> = h
                .par_iter()
                .map(|x| layer.ff_norm.apply_scalar(x))
                .collect();
            shift(&mut xn);
            let hidden = c.ff_hidden();
            let ff_gain = layer.ff_norm.gain();
            h = h
                .into_par_iter()
                .zip(xn.par_iter())
                .map(|(mut x, xn)| {
                    let mut hid = layer.w1.forward_scalar(xn);
                    scalar::gelu(&mut hid[..hidden]);
                    if c.ff_glu {
                        let (a, g) = hid.split_at_mut(hidden);
                        for (ai, gi) in a.iter_mut().zip(g.iter()) {
                            *ai *= gi;
                        }
                    }
                    let f = layer.w2.forward_scalar(&hid[..hidden]);
                    for (xi, fi) in x.iter_mut().zip(&f) {
                        *xi += ff_gain * fi;
                    }
                    x
                })
                .collect();
        }
        let tied = |x: &[f32]| -> Vec<f32> {
            let mut y = vec![0.0; c.num_tokens];
            with_view!(self.token_emb.view(), |w| scalar::matvec(w, x, &mut y));
            y
        };
        Ok(h.par_iter()
            .map(|x| {
                let xn = self.norm.forward_scalar(x);
                match &self.to_out {
                    Some(out) => out.forward_scalar(&xn),
                    None => tied(&xn),
                }
            })
            .collect())
    }
}
