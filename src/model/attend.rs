//! How a layer's heads attend, one interface for the decode step and the row path.
//!
//! A layer's first heads are global; they attend through a [`GlobalAttention`]: [`Favor`], the
//! Performer's own (the streaming FAVOR+ state), or exact softmax over a key/value cache (the
//! benchmark baseline, [`crate::baseline`]). Its last `local_heads` heads attend by windowed
//! softmax over the state's rings ([`Model::attend_local`]), one row at a time.

use rayon::prelude::*;

use super::layers::split_qkv;
use super::Model;
use crate::attention::favor::{self, HeadStateRef};
use crate::attention::local;
use crate::kernels;
use crate::state::{Memory, Scratch};

/// Prompt tokens per FAVOR+ chunk of [`Model::prefill`]. A chunk of `T` tokens costs each token
/// `2·T·(m + d)` FLOPs in its masked `T × T` intra-chunk products besides the fixed `4·m·d` of
/// the inter-chunk readout and state update, so a shorter chunk does less work, until its
/// products get too small to run at a good FLOP rate. Of 32, 64, 128 and 256, 64 prefilled
/// the small and tiny shapes fastest (docs/performance.md).
pub const DEFAULT_CHUNK: usize = 64;

/// The queries, keys and values of a block of rows, `rows × inner` each (all heads; the global
/// heads' already rotated).
#[derive(Clone, Copy)]
pub(crate) struct Qkv<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// How the global (non-local) heads of a layer attend.
pub(crate) trait GlobalAttention {
    /// One token at position `pos` (the decode step): its rotated q, k, v are in `s.qkv`;
    /// writes the global heads' columns of `s.att` and leaves the other scratch free to use.
    fn token(&mut self, model: &Model, layer: usize, pos: usize, mem: &mut Memory, s: &mut Scratch);

    /// Rows at positions `p0..p0 + rows` of one sequence (a prefill chunk), into the global
    /// heads' columns of `att` (`rows × inner`).
    fn rows(
        &mut self,
        model: &Model,
        layer: usize,
        mem: &mut Memory,
        p0: usize,
        qkv: Qkv<'_>,
        att: &mut [f32],
    );
}

/// FAVOR+ from the state's running sums: the per-token recurrence for a step, the chunkwise
/// form `chunk` rows at a time for a block of rows.
pub(crate) struct Favor {
    pub(crate) chunk: usize,
}

impl Default for Favor {
    fn default() -> Self {
        Favor {
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl GlobalAttention for Favor {
    fn token(&mut self, model: &Model, l: usize, pos: usize, mem: &mut Memory, s: &mut Scratch) {
        let c = &model.config;
        let (d, m) = (c.dim_head, c.feature_count());
        let map = model.feature_map(l);
        let delta = c.denominator_eps;
        let (q, k, v) = split_qkv(&mut s.qkv);
        let (q, k, v) = (&*q, &*k, &*v);
        let token = |hd: usize| {
            let r = hd * d..(hd + 1) * d;
            favor::Token {
                q: &q[r.clone()],
                k: &k[r.clone()],
                v: &v[r],
                n: pos + 1,
            }
        };
        if mem.acc64.is_some() {
            let (kf, qf) = (&mut s.key_feat[..m], &mut s.query_feat[..m]);
            for (hd, (head, out)) in mem.favor_heads64(l).zip(s.att.chunks_mut(d)).enumerate() {
                let head = head.with_scratch(&mut *kf, &mut *qf);
                favor::step_f64(&map, delta, head, token(hd), out);
            }
            return;
        }
        let heads = mem.favor_heads(l);
        let gh = heads.len();
        let att = &mut s.att[..gh * d];
        let run = |(hd, ((head, (kf, qf)), out)): (usize, Head<'_>)| {
            favor::step(&map, delta, head.with_scratch(kf, qf), token(hd), out)
        };
        let (kf, qf) = (&mut s.key_feat, &mut s.query_feat);
        // Each head's step touches its m×d state about five times (feature maps, compensated
        // update, readout): from 4k state elements per layer that outweighs handing heads to
        // the pool's awake workers (tiny models, 4 × 128 × 64, gain too: see PAR_MIN_ELEMS).
        if gh > 1 && gh * m * d >= kernels::PAR_MIN_ELEMS / 4 {
            let scratch = kf.par_chunks_mut(m).zip(qf.par_chunks_mut(m));
            let heads = heads.par_heads().zip(scratch).zip(att.par_chunks_mut(d));
            heads.enumerate().for_each(run);
        } else {
            let scratch = kf.chunks_mut(m).zip(qf.chunks_mut(m));
            let heads = heads.heads().zip(scratch).zip(att.chunks_mut(d));
            heads.enumerate().for_each(run);
        }
    }

    fn rows(
        &mut self,
        model: &Model,
        l: usize,
        mem: &mut Memory,
        p0: usize,
        qkv: Qkv<'_>,
        att: &mut [f32],
    ) {
        let inner = model.config.inner_dim();
        let rows = qkv.q.len() / inner;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + self.chunk).min(rows);
            let span = r0 * inner..r1 * inner;
            let chunk = Qkv {
                q: &qkv.q[span.clone()],
                k: &qkv.k[span.clone()],
                v: &qkv.v[span.clone()],
            };
            favor_chunk(model, l, mem, p0 + r0, chunk, &mut att[span]);
            r0 = r1;
        }
    }
}

/// One head's state, feature scratch and output columns in the step.
type Head<'a> = (
    (HeadStateRef<'a>, (&'a mut [f32], &'a mut [f32])),
    &'a mut [f32],
);

/// One FAVOR+ chunk of rows at positions `p0..` for the global heads of layer `l`, heads in
/// parallel.
fn favor_chunk(
    model: &Model,
    l: usize,
    mem: &mut Memory,
    p0: usize,
    Qkv { q, k, v }: Qkv<'_>,
    att: &mut [f32],
) {
    let c = &model.config;
    let (heads, d) = (c.heads, c.dim_head);
    let inner = heads * d;
    let rows = q.len() / inner;
    let map = model.feature_map(l);
    // Head `hd`'s columns of every row, contiguous.
    let gather = |x: &[f32], hd: usize| -> Vec<f32> {
        let mut cols = Vec::with_capacity(rows * d);
        for r in 0..rows {
            cols.extend_from_slice(&x[r * inner + hd * d..r * inner + (hd + 1) * d]);
        }
        cols
    };
    let outs: Vec<Vec<f32>> = mem
        .favor_heads(l)
        .par_heads()
        .enumerate()
        .map(|(hd, head)| {
            let mut out = vec![0f32; rows * d];
            let rows = favor::Rows {
                q: &gather(q, hd),
                k: &gather(k, hd),
                v: &gather(v, hd),
                n0: p0,
            };
            favor::chunk(&map, c.denominator_eps, head, rows, &mut out);
            out
        })
        .collect();
    for (hd, out) in outs.iter().enumerate() {
        for r in 0..rows {
            att[r * inner + hd * d..r * inner + (hd + 1) * d]
                .copy_from_slice(&out[r * d..(r + 1) * d]);
        }
    }
}

/// One row's q, k, v (all heads) and its attention output.
pub(crate) struct RowQkv<'a> {
    pub q: &'a mut [f32],
    pub k: &'a mut [f32],
    pub v: &'a [f32],
    pub att: &'a mut [f32],
}

impl Model {
    /// Runs the local heads of layer `l`, if any, for one row at position `pos`: each adds the
    /// row's key and value to its ring in `mem` and writes its columns of `row.att`. `scores`
    /// is scratch of `2w`.
    pub(crate) fn attend_local(
        &self,
        l: usize,
        pos: usize,
        mem: &mut Memory,
        scores: &mut [f32],
        row: RowQkv<'_>,
    ) {
        let c = &self.config;
        let (heads, d) = (c.heads, c.dim_head);
        let layer = &self.layers[l];
        let Some(inv_freq) = &layer.local_inv_freq else {
            return;
        };
        let rot = local::rotation(&inv_freq[..d / 2], pos);
        for hd in heads - layer.local_heads..heads {
            let r = hd * d..(hd + 1) * d;
            let ring = mem.local_ring(l, hd);
            local::step(
                c.local_window_size,
                &rot,
                pos,
                local::LocalHeadState {
                    keys: ring.keys,
                    values: ring.values,
                    scores: &mut *scores,
                },
                &mut row.q[r.clone()],
                &mut row.k[r.clone()],
                &row.v[r.clone()],
                &mut row.att[r],
            );
        }
    }
}
