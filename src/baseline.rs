//! **Benchmark and accuracy reference, not a Performer.** The same weights run with exact
//! causal softmax attention (`softmax(q·kᵀ/√d)·v`, same rotary) over a key/value cache that
//! grows with every token, so that a comparison isolates the attention: this is what a
//! softmax transformer's decoder pays per token at depth `n`.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::matmul::{gemm_f32, MatRef};
use crate::model::attend::{GlobalAttention, Qkv, DEFAULT_CHUNK};
use crate::model::layers::split_qkv;
use crate::model::Model;
use crate::state::{Memory, Scratch, State};

/// One sequence decoded with exact softmax attention over a growing key/value cache.
pub struct SoftmaxSession<'m> {
    model: &'m Model,
    state: State,
    /// Per layer and global head: rotated keys, `[position][d]` (each head's cache contiguous,
    /// so scoring a query is one matrix-vector product over it).
    keys: Vec<Vec<Vec<f32>>>,
    /// Per layer and global head: values, same layout.
    values: Vec<Vec<Vec<f32>>>,
    scores: Vec<Vec<f32>>,
}

/// Exact causal softmax attention of one query over `n` cached keys and values (row `j` of
/// `keys`/`values` at `j · stride + offset`, width `d`), into `out`. `scores` is scratch of at
/// least `n`.
pub fn attend_head(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let n = keys.len() / stride;
    let scale = (d as f32).powf(-0.5);
    let scores = &mut scores[..n];
    let contiguous = stride == d && offset == 0;
    if contiguous {
        // The decoder's layout: the same matrix-vector kernel as the weights, then the
        // probability-weighted sum of value rows with the output in registers.
        kernels::matvec_serial(&keys[..n * d], q, scores);
        kernels::scale(scale, scores);
    } else {
        for (j, s) in scores.iter_mut().enumerate() {
            let k = &keys[j * stride + offset..j * stride + offset + d];
            *s = kernels::dot::<f32>(k, q) * scale;
        }
    }
    kernels::softmax(scores);
    if contiguous {
        kernels::vecmat(scores, &values[..n * d], out);
        return;
    }
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        kernels::axpy(
            p,
            &values[j * stride + offset..j * stride + offset + d],
            out,
        );
    }
}

impl<'m> SoftmaxSession<'m> {
    /// An empty session.
    pub fn new(model: &'m Model) -> Self {
        let c = model.config();
        let heads = c.heads;
        SoftmaxSession {
            model,
            state: State::new(model),
            keys: vec![vec![Vec::new(); heads]; c.depth],
            values: vec![vec![Vec::new(); heads]; c.depth],
            scores: vec![Vec::new(); heads],
        }
    }

    /// Tokens consumed.
    pub fn position(&self) -> usize {
        self.state.position()
    }

    /// Bytes of the key/value cache (grows by `2 · depth · heads · d · 4` per token) plus the
    /// fixed scratch.
    pub fn size_bytes(&self) -> usize {
        let cache: usize = self
            .keys
            .iter()
            .chain(&self.values)
            .flatten()
            .map(|v| v.len() * 4)
            .sum();
        cache + self.state.size_bytes()
    }

    /// Bytes the key/value caches grow by per token (keys and values of every global head of
    /// every layer, f32).
    pub fn cache_bytes_per_token(&self) -> usize {
        let heads: usize = self.keys.iter().map(|layer| layer.len()).sum();
        2 * 4 * heads * self.model.config().dim_head
    }

    /// Makes room in the caches for `tokens` more positions, e.g. before a long fill: an
    /// [`Error::OutOfMemory`] instead of an abort when the allocator refuses, with the session
    /// unchanged. [`SoftmaxSession::step`] and [`SoftmaxSession::prefill`] call it themselves.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        let d = self.model.config().dim_head;
        let bytes = tokens.saturating_mul(self.cache_bytes_per_token());
        let oom = || Error::OutOfMemory {
            what: "the softmax key/value cache",
            bytes,
        };
        let elems = tokens.checked_mul(d).ok_or_else(oom)?;
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()).flatten() {
            cache.try_reserve(elems).map_err(|_| oom())?;
        }
        let n = self.state.pos.saturating_add(tokens);
        for s in &mut self.scores {
            s.try_reserve(n.saturating_sub(s.len()))
                .map_err(|_| oom())?;
        }
        Ok(())
    }

    /// Consumes one token and returns the logits for the next.
    pub fn step(&mut self, token: u32) -> Result<&[f32]> {
        let model = self.model;
        model.check_tokens(self.state.pos, &[token])?;
        self.reserve(1)?;
        let mut caches = Caches {
            keys: &mut self.keys,
            values: &mut self.values,
            scores: &mut self.scores,
        };
        model.forward_token(&mut self.state, token, true, &mut caches)?;
        Ok(&self.state.mem.logits)
    }

    /// Consumes a prompt in chunks, as [`Model::prefill`] does: matrix products for the
    /// projections, and per head the scores of a block of rows against the cache, a masked
    /// softmax per row and the weighted sum of values as matrix products too, so the result
    /// equals stepping up to the rounding of those products. Returns the logits after the last
    /// token.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.prefill_chunked(tokens, DEFAULT_CHUNK)
    }

    /// [`SoftmaxSession::prefill`] in chunks of `chunk` tokens.
    pub fn prefill_chunked(&mut self, tokens: &[u32], chunk: usize) -> Result<&[f32]> {
        self.model.check_tokens(self.state.pos, tokens)?;
        self.reserve(tokens.len())?;
        let mut caches = Caches {
            keys: &mut self.keys,
            values: &mut self.values,
            scores: &mut self.scores,
        };
        self.model.run_chunks(
            &mut self.state,
            tokens,
            chunk,
            None,
            &mut caches,
            &mut |_| {},
        )?;
        Ok(&self.state.mem.logits)
    }
}

/// Appends the keys and values of the first `gh` (global) heads of every row of `k` and `v`
/// (rows of all `keys.len()` heads × `d`) to a layer's per-head caches.
fn append_rows(
    keys: &mut [Vec<f32>],
    values: &mut [Vec<f32>],
    k: &[f32],
    v: &[f32],
    gh: usize,
    d: usize,
) {
    let inner = keys.len() * d;
    for (k, v) in k.chunks(inner).zip(v.chunks(inner)) {
        for hd in 0..gh {
            keys[hd].extend_from_slice(&k[hd * d..(hd + 1) * d]);
            values[hd].extend_from_slice(&v[hd * d..(hd + 1) * d]);
        }
    }
}

/// Score elements per row block of a chunk (16 MiB): bounds the prefill's scratch at any depth.
const SCORE_BUDGET: usize = 1 << 22;

/// The key/value caches as the global attention of a step or a prefill chunk.
struct Caches<'a> {
    keys: &'a mut [Vec<Vec<f32>>],
    values: &'a mut [Vec<Vec<f32>>],
    /// Per global head, the scores of a step's query (scratch).
    scores: &'a mut [Vec<f32>],
}

impl GlobalAttention for Caches<'_> {
    fn token(&mut self, model: &Model, l: usize, pos: usize, _: &mut Memory, s: &mut Scratch) {
        let c = model.config();
        let (d, heads) = (c.dim_head, c.heads);
        let gh = heads - model.layers[l].local_heads;
        let (q, k, v) = split_qkv(&mut s.qkv);
        append_rows(&mut self.keys[l], &mut self.values[l], k, v, gh, d);
        let n = pos + 1;
        for s in self.scores.iter_mut() {
            s.resize(n, 0.0);
        }
        let (kc, vc) = (&self.keys[l], &self.values[l]);
        let q = &*q;
        let run = |(hd, (out, sc)): (usize, (&mut [f32], &mut Vec<f32>))| {
            attend_head(&q[hd * d..(hd + 1) * d], &kc[hd], &vc[hd], d, 0, sc, out)
        };
        let att = &mut s.att[..gh * d];
        if n * gh * d >= kernels::PAR_MIN_ELEMS / 4 {
            att.par_chunks_mut(d)
                .zip(self.scores.par_iter_mut())
                .enumerate()
                .for_each(run);
        } else {
            att.chunks_mut(d)
                .zip(self.scores.iter_mut())
                .enumerate()
                .for_each(run);
        }
    }

    fn rows(
        &mut self,
        model: &Model,
        l: usize,
        _: &mut Memory,
        p0: usize,
        Qkv { q, k, v }: Qkv<'_>,
        att: &mut [f32],
    ) {
        let c = model.config();
        let (d, inner) = (c.dim_head, c.heads * c.dim_head);
        let gh = c.heads - model.layers[l].local_heads;
        append_rows(&mut self.keys[l], &mut self.values[l], k, v, gh, d);
        // Per head, scores of a block of rows against every key they can see as one matrix
        // product, a masked softmax per row, and the weighted sum of values as a second
        // product: the cache streams through once per row block, not once per row.
        let (kc, vc) = (&self.keys[l], &self.values[l]);
        let rows = q.len() / inner;
        let total = p0 + rows;
        let scale = (d as f32).powf(-0.5);
        let block = (SCORE_BUDGET / total).clamp(1, rows);
        let mut scores = vec![0f32; block * total];
        for hd in 0..gh {
            for r0 in (0..rows).step_by(block) {
                let nr = block.min(rows - r0);
                // Keys visible to the block's last row.
                let n = p0 + r0 + nr;
                let qm = MatRef {
                    data: &q[r0 * inner + hd * d..],
                    rows: nr,
                    cols: d,
                    row_stride: inner,
                    col_stride: 1,
                };
                let kt = MatRef::row_major(&kc[hd][..n * d], n, d).t();
                let sc = &mut scores[..nr * n];
                gemm_f32(qm, kt, sc, n, false);
                sc.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
                    let (seen, masked) = row.split_at_mut(p0 + r0 + i + 1);
                    kernels::scale(scale, seen);
                    kernels::softmax(seen);
                    masked.fill(0.0);
                });
                let vm = MatRef::row_major(&vc[hd][..n * d], n, d);
                gemm_f32(
                    MatRef::row_major(sc, nr, n),
                    vm,
                    &mut att[r0 * inner + hd * d..],
                    inner,
                    false,
                );
            }
        }
    }
}
