//! The parallel paths: chunked prefill (many positions of one sequence) and batched decode (one
//! position of many sequences). Both run every layer on a block of rows so the dense products
//! become matrix products; they differ only in how rows attend.

use rayon::prelude::*;

use super::attend::{Favor, GlobalAttention, Qkv, RowQkv};
use super::layers::{few_rows_product, shift_features, FEW_ROWS};
use super::Model;
use crate::attention::favor;
use crate::attention::rotary;
use crate::error::{Error, Result};
use crate::kernels::{self, AlignedBuf};
use crate::state::State;
use crate::with_view;

pub use super::attend::DEFAULT_CHUNK;

/// Rows the projections and feed-forward of a prefill run on at once (several attention
/// chunks): a general matrix product packs its operands once per call, so more rows per call
/// spread that cost and reach a higher FLOP rate (docs/performance.md), while attention still
/// goes chunk by chunk.
pub const PROJECTION_ROWS: usize = 1024;

/// Scratch the row block of a prefill may take (its activations), bounding the row count for
/// wide models.
const ROW_BLOCK_BYTES: usize = 64 << 20;

/// How a block of rows attends.
trait RowAttention {
    /// Position of row `r`.
    fn position(&self, r: usize) -> usize;
    /// `shift_tokens`: swaps features of the rows' block inputs with their predecessors'.
    fn shift(&mut self, offset: usize, xn: &mut [f32], dim: usize);
    /// Attention of every row: `q`, `k` are rotated/scaled in place; writes `att`.
    fn attend(
        &mut self,
        model: &Model,
        layer: usize,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        att: &mut [f32],
    );
}

/// Rows are consecutive positions of one sequence.
struct Chunk<'s, G> {
    state: &'s mut State,
    p0: usize,
    global: &'s mut G,
}

impl<G: GlobalAttention> RowAttention for Chunk<'_, G> {
    fn position(&self, r: usize) -> usize {
        self.p0 + r
    }

    fn shift(&mut self, offset: usize, xn: &mut [f32], dim: usize) {
        // Each row takes its predecessor's features; the carried slot ends with the last row's.
        for row in xn.chunks_mut(dim) {
            shift_features(row, &mut self.state.mem.shift_prev, offset);
        }
    }

    fn attend(
        &mut self,
        model: &Model,
        l: usize,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        att: &mut [f32],
    ) {
        let c = &model.config;
        let (heads, d) = (c.heads, c.dim_head);
        let inner = heads * d;
        let rows = q.len() / inner;
        let layer = &model.layers[l];
        let gh = heads - layer.local_heads;
        if let Some(rot) = model.positions.rotary() {
            let mut row = vec![0f32; d];
            for r in 0..rows {
                rot.row(self.p0 + r, &mut row);
                for hd in 0..gh {
                    let o = r * inner + hd * d;
                    rotary::rotate(&mut q[o..o + d], &row);
                    rotary::rotate(&mut k[o..o + d], &row);
                }
            }
        }
        let st = &mut *self.state;
        if gh > 0 {
            let qkv = Qkv { q, k, v };
            self.global.rows(model, l, &mut st.mem, self.p0, qkv, att);
        }
        if layer.local_heads > 0 {
            let rows_iter = q
                .chunks_mut(inner)
                .zip(k.chunks_mut(inner))
                .zip(v.chunks(inner))
                .zip(att.chunks_mut(inner));
            for (r, (((q, k), v), att)) in rows_iter.enumerate() {
                let row = RowQkv { q, k, v, att };
                model.attend_local(l, self.p0 + r, &mut st.mem, &mut st.scratch.scores, row);
            }
        }
    }
}

std::thread_local! {
    /// [`Model::step_batch`]'s logits of all rows, kept between ticks on the calling thread.
    static STEP_LOGITS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Rows are independent sequences, one token each.
struct Batch<'a, 's> {
    states: &'a mut [&'s mut State],
}

impl RowAttention for Batch<'_, '_> {
    fn position(&self, r: usize) -> usize {
        self.states[r].pos
    }

    fn shift(&mut self, offset: usize, xn: &mut [f32], dim: usize) {
        for (row, st) in xn.chunks_mut(dim).zip(self.states.iter_mut()) {
            shift_features(row, &mut st.mem.shift_prev, offset);
        }
    }

    fn attend(
        &mut self,
        model: &Model,
        l: usize,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        att: &mut [f32],
    ) {
        let c = &model.config;
        let (heads, d, m) = (c.heads, c.dim_head, c.feature_count());
        let inner = heads * d;
        let layer = &model.layers[l];
        let gh = heads - layer.local_heads;
        let map = model.feature_map(l);
        let rows = self.states.len();
        // Every row's and global head's key and query projected in one batched product (the
        // projection read once, in register tiles), bit for bit what each head's own
        // `project` gives: per row and head, m key features then m query features. The
        // rotary positions are applied on the way (a few thousand multiplies: serial).
        let vectors = rows * gh * 2;
        let mut inputs = AlignedBuf::zeroed(vectors * d);
        let rotary = model.positions.rotary();
        for (((x, st), q), k) in inputs
            .chunks_exact_mut((gh * 2 * d).max(1))
            .zip(self.states.iter_mut())
            .zip(q.chunks_mut(inner))
            .zip(k.chunks_mut(inner))
        {
            let rot = &mut st.scratch.rot;
            if let Some(r) = rotary {
                r.row(st.pos, rot);
            }
            for hd in 0..gh {
                let (q, k) = (&mut q[hd * d..(hd + 1) * d], &mut k[hd * d..(hd + 1) * d]);
                if rotary.is_some() {
                    rotary::rotate(q, rot);
                    rotary::rotate(k, rot);
                }
                x[2 * hd * d..(2 * hd + 1) * d].copy_from_slice(k);
                x[(2 * hd + 1) * d..(2 * hd + 2) * d].copy_from_slice(q);
            }
        }
        let mut feats = vec![0f32; vectors * m];
        let per = vectors.div_ceil(rayon::current_num_threads()).max(1);
        feats
            .par_chunks_mut(per * m)
            .zip(inputs.par_chunks(per * d))
            .for_each(|(u, x)| map.project_batch(x, x.len() / d, u));
        self.states
            .par_iter_mut()
            .zip(q.par_chunks_mut(inner))
            .zip(k.par_chunks_mut(inner))
            .zip(v.par_chunks(inner))
            .zip(att.par_chunks_mut(inner))
            .zip(feats.par_chunks_mut((gh * 2 * m).max(1)))
            .for_each(|(((((st, q), k), v), att), feats)| {
                let pos = st.pos;
                let st = &mut **st;
                let heads = st.mem.favor_heads(l).heads();
                for ((hd, head), feats) in heads.enumerate().zip(feats.chunks_exact_mut(2 * m)) {
                    let r = hd * d..(hd + 1) * d;
                    let (key_feat, query_feat) = feats.split_at_mut(m);
                    favor::step_projected(
                        &map,
                        c.denominator_eps,
                        head.with_scratch(key_feat, query_feat),
                        favor::Token {
                            q: &q[r.clone()],
                            k: &k[r.clone()],
                            v: &v[r.clone()],
                            n: pos + 1,
                        },
                        &mut att[r],
                    );
                }
                let row = RowQkv { q, k, v, att };
                model.attend_local(l, pos, &mut st.mem, &mut st.scratch.scores, row);
            });
    }
}

impl Model {
    /// Runs every layer on `rows` rows of `h` (`rows × dim`, embeddings in, residual stream
    /// out).
    fn forward_rows(&self, h: &mut [f32], rows: usize, attn: &mut impl RowAttention) {
        let c = &self.config;
        let (dim, inner, hidden) = (c.dim, c.inner_dim(), c.ff_hidden());
        let ff_in = hidden * if c.ff_glu { 2 } else { 1 };
        // The products' inputs on cache lines, read in place by the batched product.
        let mut xn = AlignedBuf::zeroed(rows * dim);
        let mut q = vec![0f32; rows * inner];
        let mut k = vec![0f32; rows * inner];
        let mut v = vec![0f32; rows * inner];
        let mut att = AlignedBuf::zeroed(rows * inner);
        let mut hid = vec![0f32; rows * ff_in];
        let mut tmp = vec![0f32; rows * dim];
        let mut packed = AlignedBuf::zeroed(rows * hidden);
        for (l, layer) in self.layers.iter().enumerate() {
            for (x, o) in h.chunks(dim).zip(xn.chunks_mut(dim)) {
                layer.attn_norm.apply(x, o);
            }
            if c.shift_tokens {
                attn.shift(2 * l * dim, &mut xn, dim);
            }
            if rows <= FEW_ROWS {
                // Batched decode: the three products in one parallel region, so that a thread
                // done with its share of one takes blocks of the next instead of waiting.
                rayon::join(
                    || layer.to_q.forward_rows(&xn, rows, &mut q),
                    || {
                        rayon::join(
                            || layer.to_k.forward_rows(&xn, rows, &mut k),
                            || layer.to_v.forward_rows(&xn, rows, &mut v),
                        )
                    },
                );
            } else {
                layer.to_q.forward_rows(&xn, rows, &mut q);
                layer.to_k.forward_rows(&xn, rows, &mut k);
                layer.to_v.forward_rows(&xn, rows, &mut v);
            }
            attn.attend(self, l, &mut q, &mut k, &v, &mut att);
            layer.attn_out.forward_rows(&att, rows, &mut tmp);
            // Row by row, as stepping adds it: a row's last `dim % 16` elements then take the
            // same (scalar) path, so batched and stepped residuals stay bit for bit equal.
            for (t, h) in tmp.chunks(dim).zip(h.chunks_mut(dim)) {
                kernels::axpy(layer.attn_norm.gain(), t, h);
            }

            for (x, o) in h.chunks(dim).zip(xn.chunks_mut(dim)) {
                layer.ff_norm.apply(x, o);
            }
            if c.shift_tokens {
                attn.shift((2 * l + 1) * dim, &mut xn, dim);
            }
            layer.w1.forward_rows(&xn, rows, &mut hid);
            for (row, p) in hid.chunks_mut(ff_in).zip(packed.chunks_mut(hidden)) {
                kernels::gelu(&mut row[..hidden]);
                if c.ff_glu {
                    let (x, gate) = row.split_at(hidden);
                    for ((o, a), g) in p.iter_mut().zip(x).zip(gate) {
                        *o = a * g;
                    }
                } else {
                    p.copy_from_slice(&row[..hidden]);
                }
            }
            layer.w2.forward_rows(&packed, rows, &mut tmp);
            for (t, h) in tmp.chunks(dim).zip(h.chunks_mut(dim)) {
                kernels::axpy(layer.ff_norm.gain(), t, h);
            }
        }
    }

    fn embed_rows(&self, tokens: &[u32], attn: &impl RowAttention) -> Vec<f32> {
        let dim = self.config.dim;
        let mut h = vec![0f32; tokens.len() * dim];
        let mut tmp = vec![0f32; dim];
        for (r, (&t, row)) in tokens.iter().zip(h.chunks_mut(dim)).enumerate() {
            self.token_emb.row(t as usize).to_f32_into(row);
            self.positions.add_input(attn.position(r), row, &mut tmp);
        }
        h
    }

    /// Final norm and logits of the rows of `h` into `logits` (`rows × vocab`).
    fn logits_rows(&self, h: &[f32], rows: usize, logits: &mut [f32]) {
        let dim = self.config.dim;
        let mut xn = AlignedBuf::zeroed(rows * dim);
        for (x, o) in h.chunks(dim).zip(xn.chunks_mut(dim)) {
            self.norm.forward(x, o);
        }
        match &self.to_out {
            Some(out) => out.forward_rows(&xn, rows, logits),
            // Tied embedding: the decode kernel for a few rows, as for any output layer.
            None if rows <= FEW_ROWS => {
                few_rows_product(&self.token_emb, self.config.num_tokens, &xn, rows, logits)
            }
            None => with_view!(self.token_emb.view(), |w| kernels::matmul::linear(
                &xn,
                rows,
                w,
                self.config.num_tokens,
                logits
            )),
        }
    }

    /// Consumes a prompt and returns the logits after its last token, in chunks of
    /// [`DEFAULT_CHUNK`] tokens (see [`Model::prefill_chunked`]). All ids (and, for absolute
    /// positions, the length) are checked before the state changes.
    pub fn prefill<'s>(&self, state: &'s mut State, tokens: &[u32]) -> Result<&'s [f32]> {
        if state.is_f64() {
            // f64 accumulators have no chunked path: step, checking everything first.
            state.check_fits(&self.state_shape)?;
            let Some((&last, body)) = tokens.split_last() else {
                return Err(Error::EmptyInput("prefill needs at least one token"));
            };
            self.check_tokens(state.pos, tokens)?;
            for &t in body {
                self.forward_token(state, t, false, &mut Favor::default())?;
            }
            self.forward_token(state, last, true, &mut Favor::default())?;
            return Ok(&state.mem.logits);
        }
        self.prefill_chunked(state, tokens, DEFAULT_CHUNK)
    }

    /// Ingests a prompt in chunks of `chunk` tokens with the chunkwise FAVOR+ form and matrix
    /// products, leaving the state that stepping token by token leaves (up to float rounding).
    /// Returns the logits after the last token.
    pub fn prefill_chunked<'s>(
        &self,
        state: &'s mut State,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<&'s [f32]> {
        self.run_chunks(
            state,
            tokens,
            chunk,
            None,
            &mut Favor { chunk },
            &mut |_| {},
        )?;
        Ok(&state.mem.logits)
    }

    /// [`Model::prefill`] calling `progress(tokens ingested so far)` as it goes (after every
    /// row block of a few hundred tokens, or every token of an f64 state): for a progress bar
    /// on long prompts. The result is bit-identical to [`Model::prefill`].
    pub fn prefill_with_progress<'s>(
        &self,
        state: &'s mut State,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize),
    ) -> Result<&'s [f32]> {
        if state.is_f64() {
            let Some((&last, body)) = tokens.split_last() else {
                return Err(Error::EmptyInput("prefill needs at least one token"));
            };
            state.check_fits(&self.state_shape)?;
            self.check_tokens(state.pos, tokens)?;
            for (i, &t) in body.iter().enumerate() {
                self.forward_token(state, t, false, &mut Favor::default())?;
                progress(i + 1);
            }
            let out = self.prefill(state, &[last])?;
            progress(tokens.len());
            return Ok(out);
        }
        let chunk = DEFAULT_CHUNK;
        self.run_chunks(state, tokens, chunk, None, &mut Favor { chunk }, progress)?;
        Ok(&state.mem.logits)
    }

    /// Like [`Model::prefill_chunked`], but returns the logits after every token
    /// (`tokens.len() × vocab`, row `t` predicting token `t + 1`): the fast path for scoring
    /// text.
    pub fn prefill_all_logits(
        &self,
        state: &mut State,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<Vec<f32>> {
        let mut all = vec![0f32; tokens.len() * self.config.num_tokens];
        self.run_chunks(
            state,
            tokens,
            chunk,
            Some(&mut all),
            &mut Favor { chunk },
            &mut |_| {},
        )?;
        Ok(all)
    }

    /// Tokens [`Model::prefill`] processes per row block. Prefilling a prompt in slices whose
    /// lengths (all but the last) are multiples of this leaves exactly the state one prefill
    /// of the whole prompt leaves: a server can interleave long prompts with decoding without
    /// changing any result.
    pub fn prefill_block_tokens(&self) -> usize {
        self.prefill_row_block(DEFAULT_CHUNK)
    }

    /// Where the next slice of a prompt ends when a server ingests `len` prompt tokens piece by
    /// piece, `done` of them already in (0, or an end this function returned), each piece
    /// about `max` tokens: prefilling `prompt[done..end]` after each other leaves bit for bit
    /// the state and logits of one [`Model::prefill`] of the whole prompt.
    ///
    /// One prefill works in row blocks of [`Model::prefill_block_tokens`] tokens from its
    /// start, and in attention chunks of [`DEFAULT_CHUNK`] inside them; a row block of up to
    /// 64 rows takes the few-rows product instead of the general matrix product (whose
    /// per-row results do not depend on the row count: its inner blocking follows the
    /// inner dimension only). So the pieces are whole chunks, `max` rounded down to chunks
    /// but more than 64 tokens (two chunks of 64), never crossing a row block's end; and a
    /// short remainder of up to 64 tokens before the row block's end or the prompt's joins
    /// the piece before it, so that no piece takes the few-rows product where the whole
    /// prompt took the general one (a row block that is itself that short is one piece
    /// either way). The piece is then at most `max + 64` tokens, or 128.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("performer-doc-slice-{}", std::process::id()));
    /// # let shape = performer::synthetic::SyntheticShape::named("tiny").unwrap();
    /// # performer::synthetic::write(&dir, &shape, performer::synthetic::WeightDtype::F32, 1)?;
    /// # let model = performer::Model::load(&dir)?;
    /// let prompt: Vec<u32> = (0..1100).map(|i| i % 200).collect();
    /// let (mut sliced, mut whole) = (performer::State::new(&model), performer::State::new(&model));
    /// let mut done = 0;
    /// while done < prompt.len() {
    ///     let end = model.prefill_slice_end(done, prompt.len(), 256);
    ///     model.prefill(&mut sliced, &prompt[done..end])?;
    ///     done = end;
    /// }
    /// model.prefill(&mut whole, &prompt)?;
    /// assert_eq!(sliced.logits(), whole.logits());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), performer::Error>(())
    /// ```
    pub fn prefill_slice_end(&self, done: usize, len: usize, max: usize) -> usize {
        if done >= len {
            return len;
        }
        let block = self.prefill_block_tokens();
        // A piece of more than `FEW_ROWS` rows takes the general product.
        let fewest = FEW_ROWS / DEFAULT_CHUNK + 1;
        let chunks = (max / DEFAULT_CHUNK)
            .max(fewest)
            .min((block / DEFAULT_CHUNK).max(1));
        let stop = ((done / block + 1) * block).min(len);
        let end = (done + chunks * DEFAULT_CHUNK).min(stop);
        if stop - end <= FEW_ROWS {
            stop
        } else {
            end
        }
    }

    /// Rows of a prefill's row block for attention chunks of `chunk`: whole chunks, about
    /// [`PROJECTION_ROWS`], within [`ROW_BLOCK_BYTES`] of activations.
    fn prefill_row_block(&self, chunk: usize) -> usize {
        let c = &self.config;
        let ff_in = c.ff_hidden() * if c.ff_glu { 2 } else { 1 };
        // h, xn, tmp; q, k, v, att; hidden in and out.
        let row_bytes = 4 * (3 * c.dim + 4 * c.inner_dim() + ff_in + c.ff_hidden());
        let rows = PROJECTION_ROWS.min(ROW_BLOCK_BYTES / row_bytes.max(1));
        chunk * (rows / chunk).max(1)
    }

    /// Ingests `tokens` in row blocks of whole `chunk`s, the global heads attending through
    /// `global`; with `all_logits`, writes every position's logits there. `progress` is
    /// called with the number of tokens ingested so far after each row block.
    pub(crate) fn run_chunks(
        &self,
        state: &mut State,
        tokens: &[u32],
        chunk: usize,
        mut all_logits: Option<&mut [f32]>,
        global: &mut impl GlobalAttention,
        progress: &mut dyn FnMut(usize),
    ) -> Result<()> {
        state.check_fits(&self.state_shape)?;
        if state.is_f64() {
            return Err(Error::invalid(
                "precision",
                "the chunked path needs an f32 state (use prefill for f64 states)",
            ));
        }
        if tokens.is_empty() {
            return Err(Error::EmptyInput("prefill needs at least one token"));
        }
        if chunk == 0 {
            return Err(Error::invalid("chunk", "must be at least 1"));
        }
        self.check_tokens(state.pos, tokens)?;
        let (dim, vocab) = (self.config.dim, self.config.num_tokens);
        let block = self.prefill_row_block(chunk);
        let mut last_h = Vec::new();
        for (i, piece) in tokens.chunks(block).enumerate() {
            let p0 = state.pos;
            let mut attn = Chunk {
                state,
                p0,
                global: &mut *global,
            };
            let mut h = self.embed_rows(piece, &attn);
            self.forward_rows(&mut h, piece.len(), &mut attn);
            state.pos += piece.len();
            if let Some(all) = all_logits.as_deref_mut() {
                let out = &mut all[i * block * vocab..(i * block + piece.len()) * vocab];
                self.logits_rows(&h, piece.len(), out);
                if let Some(bad) = out
                    .chunks(vocab)
                    .position(|r| r.iter().any(|x| !x.is_finite()))
                {
                    state.has_logits = false;
                    return Err(Error::NonFiniteLogits { position: p0 + bad });
                }
            }
            last_h = h[(piece.len() - 1) * dim..].to_vec();
            progress((i * block + piece.len()).min(tokens.len()));
        }
        self.logits_rows(&last_h, 1, &mut state.mem.logits);
        state.has_logits = false;
        if state.mem.logits.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFiniteLogits {
                position: state.pos - 1,
            });
        }
        state.has_logits = true;
        Ok(())
    }

    /// Advances many independent sequences by one token each (`tokens[i]` for `states[i]`),
    /// turning their matrix-vector products into matrix products. Each state's logits are then
    /// in [`State::logits`]. All states and tokens are checked before any state changes.
    pub fn step_batch(&self, states: &mut [&mut State], tokens: &[u32]) -> Result<()> {
        if states.len() != tokens.len() {
            return Err(Error::invalid(
                "tokens",
                format!("{} tokens for {} states", tokens.len(), states.len()),
            ));
        }
        if states.is_empty() {
            return Ok(());
        }
        for (st, &t) in states.iter().zip(tokens) {
            st.check_fits(&self.state_shape)?;
            if st.is_f64() {
                return Err(Error::invalid(
                    "precision",
                    "batched decode needs f32 states",
                ));
            }
            self.check_tokens(st.pos, &[t])?;
        }
        let rows = states.len();
        let vocab = self.config.num_tokens;
        let mut attn = Batch { states };
        let mut h = self.embed_rows(tokens, &attn);
        self.forward_rows(&mut h, rows, &mut attn);
        // The logits buffer is this thread's, reused (every element is written), and the rows
        // go to their states in parallel: `rows × vocab` floats (megabytes on a 50k
        // vocabulary) zeroed and copied serially would leave the other cores idle meanwhile.
        let mut logits = STEP_LOGITS.take();
        logits.resize(rows * vocab, 0.0);
        self.logits_rows(&h, rows, &mut logits);
        let finite: Vec<bool> = attn
            .states
            .par_iter_mut()
            .zip(logits.par_chunks(vocab.max(1)))
            .map(|(st, row)| {
                st.mem.logits.copy_from_slice(row);
                st.has_logits = row.iter().all(|x| x.is_finite());
                st.has_logits
            })
            .collect();
        STEP_LOGITS.set(logits);
        let bad = attn
            .states
            .iter()
            .zip(&finite)
            .find(|(_, ok)| !**ok)
            .map(|(st, _)| st.pos);
        for st in attn.states.iter_mut() {
            st.pos += 1;
        }
        match bad {
            Some(position) => Err(Error::NonFiniteLogits { position }),
            None => Ok(()),
        }
    }
}
