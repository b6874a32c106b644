//! Per-sequence run state: the constant-size FAVOR+ state of every layer and head, the bounded
//! windows of local heads and token shifts, plus the scratch buffers of one decode step.
//!
//! A state's size is fixed when it is created and never grows, however many tokens it has
//! consumed: that is the point of a Performer.
//!
//! A [`State`] is built from a [`StateShape`] (the dimensions of a model's config) and knows
//! its own layout: `Memory` holds what a snapshot saves and gives per-head views of it
//! (`Memory::favor_heads`, `Memory::local_ring`), so the index arithmetic over layers and
//! heads lives here alone; `Scratch` holds what every step overwrites.

use rayon::prelude::*;

use crate::attention::favor::{Compensation, HeadState64, HeadStateRef};
use crate::config::Config;
use crate::error::{Error, Result};
use half::bf16;

/// Dimensions a state is made for; a state only runs with a model of the same shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateShape {
    pub(crate) global_heads: Vec<usize>,
    pub(crate) local_heads: Vec<usize>,
    pub(crate) window: usize,
    pub(crate) m: usize,
    pub(crate) d: usize,
    pub(crate) dim: usize,
    pub(crate) inner: usize,
    pub(crate) hidden: usize,
    /// Width of the first feed-forward product: `hidden`, doubled with `ff_glu`.
    pub(crate) ff_in: usize,
    pub(crate) vocab: usize,
    pub(crate) shift: bool,
}

impl StateShape {
    /// The shape of the states of a model with this config.
    pub fn of(c: &Config) -> Self {
        StateShape {
            global_heads: c.local_attn_heads.iter().map(|l| c.heads - l).collect(),
            local_heads: c.local_attn_heads.clone(),
            window: c.local_window_size,
            m: c.feature_count(),
            d: c.dim_head,
            dim: c.dim,
            inner: c.inner_dim(),
            hidden: c.ff_hidden(),
            ff_in: c.ff_hidden() * if c.ff_glu { 2 } else { 1 },
            vocab: c.num_tokens,
            shift: c.shift_tokens,
        }
    }
}

/// Precision of the accumulated FAVOR+ state (`A`, `a`, `s`, `M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 sums, SIMD: the default, measured to drift below 1e-3 over a million tokens
    /// (docs/numerical-stability.md).
    #[default]
    F32,
    /// f64 sums, scalar: twice the state memory and slower; the reference for drift
    /// measurements. Prefill runs token by token; batched decode and snapshots need F32.
    F64,
}

/// The f64 accumulators of a [`Precision::F64`] state.
#[derive(Debug, Clone)]
pub(crate) struct Acc64 {
    pub a_mat: Vec<f64>,
    pub a_vec: Vec<f64>,
    pub v_sum: Vec<f64>,
    pub max: Vec<f64>,
}

/// Number of buffers in [`Memory::buffers`].
pub(crate) const MEMORY_BUFFERS: usize = 11;

/// One buffer of a state's memory, in its element type (the Kahan compensations are bf16).
#[derive(Clone, Copy)]
pub(crate) enum Buffer<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Buffer<'_> {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Buffer::F32(b) => b.len(),
            Buffer::Bf16(b) => b.len(),
        }
    }

    /// Whether the elements are bf16.
    pub(crate) fn is_bf16(&self) -> bool {
        matches!(self, Buffer::Bf16(_))
    }

    /// Bytes of the elements.
    pub(crate) fn bytes(&self) -> usize {
        self.len() * if self.is_bf16() { 2 } else { 4 }
    }
}

/// [`Buffer`], mutably.
pub(crate) enum BufferMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
}

impl BufferMut<'_> {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            BufferMut::F32(b) => b.len(),
            BufferMut::Bf16(b) => b.len(),
        }
    }

    /// Whether the elements are bf16.
    pub(crate) fn is_bf16(&self) -> bool {
        matches!(self, BufferMut::Bf16(_))
    }
}

fn prefix_sums(v: &[usize]) -> Vec<usize> {
    let mut out = vec![0];
    for &x in v {
        out.push(out.last().copied().unwrap_or(0) + x);
    }
    out
}

/// Where each layer's heads sit in the memory's buffers.
#[derive(Debug, Clone)]
struct Layout {
    /// Prefix sums of global heads per layer (index into the FAVOR+ buffers).
    favor_start: Vec<usize>,
    /// Prefix sums of local heads per layer (index into the rings).
    local_start: Vec<usize>,
    m: usize,
    d: usize,
    /// Elements of one local head's key (or value) ring: `2w × d`.
    ring: usize,
}

/// A sequence's memory: everything a snapshot saves besides the position. Per layer and global
/// head `A` (m×d), `a` (m), `s` (d), `M` and the compensations of `A`, `a`, `s`; per local
/// head a ring of the last `2w` keys and values; per layer the previous position's shifted
/// features; and the logits after the last token.
#[derive(Debug, Clone)]
pub(crate) struct Memory {
    layout: Layout,
    pub(crate) a_mat: Vec<f32>,
    pub(crate) a_vec: Vec<f32>,
    pub(crate) v_sum: Vec<f32>,
    pub(crate) max: Vec<f32>,
    /// Kahan compensations of `a_mat`, `a_vec`, `v_sum`: without them f32 rounding of a
    /// million additions drifts the logits measurably (docs/numerical-stability.md). In bf16:
    /// a compensation is under half an ulp of its sum, so 8 bits of it still carry the sum to
    /// ~2⁻³³ per addition, and batched decode, bound by the states' memory traffic, moves a
    /// quarter fewer bytes.
    pub(crate) a_mat_c: Vec<bf16>,
    pub(crate) a_vec_c: Vec<bf16>,
    pub(crate) v_sum_c: Vec<bf16>,
    pub(crate) local_keys: Vec<f32>,
    pub(crate) local_values: Vec<f32>,
    /// Per layer, attention then feed-forward: the previous position's block input.
    pub(crate) shift_prev: Vec<f32>,
    pub(crate) logits: Vec<f32>,
    /// Present for [`Precision::F64`] states, which leave the f32 FAVOR+ buffers empty.
    pub(crate) acc64: Option<Box<Acc64>>,
}

/// The FAVOR+ state of one layer's global heads, split into per-head views by
/// [`FavorHeads::heads`] and [`FavorHeads::par_heads`].
pub(crate) struct FavorHeads<'s> {
    a_mat: &'s mut [f32],
    a_mat_c: &'s mut [bf16],
    a_vec: &'s mut [f32],
    a_vec_c: &'s mut [bf16],
    v_sum: &'s mut [f32],
    v_sum_c: &'s mut [bf16],
    max: &'s mut [f32],
    m: usize,
    d: usize,
}

/// One head's slices as [`FavorHeads`]' zipped chunk iterators yield them.
type HeadParts<'s> = (
    (
        (
            (&'s mut [f32], &'s mut [bf16]),
            (&'s mut [f32], &'s mut [bf16]),
        ),
        (&'s mut [f32], &'s mut [bf16]),
    ),
    &'s mut f32,
);

fn head_of(parts: HeadParts<'_>) -> HeadStateRef<'_> {
    let ((((a_mat, a_mat_c), (a_vec, a_vec_c)), (v_sum, v_sum_c)), max) = parts;
    HeadStateRef {
        a_mat,
        a_vec,
        v_sum,
        comp: Compensation {
            a_mat: a_mat_c,
            a_vec: a_vec_c,
            v_sum: v_sum_c,
        },
        max,
    }
}

impl<'s> FavorHeads<'s> {
    /// Number of global heads.
    pub(crate) fn len(&self) -> usize {
        self.max.len()
    }

    /// Each head's state, in head order.
    pub(crate) fn heads(self) -> impl Iterator<Item = HeadStateRef<'s>> {
        let (m, d) = (self.m, self.d);
        self.a_mat
            .chunks_mut(m * d)
            .zip(self.a_mat_c.chunks_mut(m * d))
            .zip(self.a_vec.chunks_mut(m).zip(self.a_vec_c.chunks_mut(m)))
            .zip(self.v_sum.chunks_mut(d).zip(self.v_sum_c.chunks_mut(d)))
            .zip(self.max.iter_mut())
            .map(head_of)
    }

    /// [`FavorHeads::heads`] as a parallel iterator.
    pub(crate) fn par_heads(self) -> impl IndexedParallelIterator<Item = HeadStateRef<'s>> {
        let (m, d) = (self.m, self.d);
        self.a_mat
            .par_chunks_mut(m * d)
            .zip(self.a_mat_c.par_chunks_mut(m * d))
            .zip(
                self.a_vec
                    .par_chunks_mut(m)
                    .zip(self.a_vec_c.par_chunks_mut(m)),
            )
            .zip(
                self.v_sum
                    .par_chunks_mut(d)
                    .zip(self.v_sum_c.par_chunks_mut(d)),
            )
            .zip(self.max.par_iter_mut())
            .map(head_of)
    }
}

/// One global head's f64 accumulators (a [`Precision::F64`] state).
pub(crate) struct Head64<'s> {
    a_mat: &'s mut [f64],
    a_vec: &'s mut [f64],
    v_sum: &'s mut [f64],
    max: &'s mut f64,
}

impl<'s> Head64<'s> {
    /// The head's state with `m`-wide feature scratch, for [`crate::attention::favor::step_f64`].
    pub(crate) fn with_scratch(
        self,
        key_feat: &'s mut [f32],
        query_feat: &'s mut [f32],
    ) -> HeadState64<'s> {
        HeadState64 {
            a_mat: self.a_mat,
            a_vec: self.a_vec,
            v_sum: self.v_sum,
            max: self.max,
            key_feat,
            query_feat,
        }
    }
}

/// One local head's rings of rotated keys and values, `2w × d` each.
pub(crate) struct Ring<'s> {
    pub keys: &'s mut [f32],
    pub values: &'s mut [f32],
}

impl Memory {
    fn new(s: &StateShape) -> Self {
        let favor_start = prefix_sums(&s.global_heads);
        let local_start = prefix_sums(&s.local_heads);
        let (global, local) = (
            favor_start[favor_start.len() - 1],
            local_start[local_start.len() - 1],
        );
        let depth = s.global_heads.len();
        let ring = if local > 0 { 2 * s.window * s.d } else { 0 };
        Memory {
            layout: Layout {
                favor_start,
                local_start,
                m: s.m,
                d: s.d,
                ring,
            },
            a_mat: vec![0.0; global * s.m * s.d],
            a_vec: vec![0.0; global * s.m],
            v_sum: vec![0.0; global * s.d],
            max: vec![f32::NEG_INFINITY; global],
            a_mat_c: vec![bf16::ZERO; global * s.m * s.d],
            a_vec_c: vec![bf16::ZERO; global * s.m],
            v_sum_c: vec![bf16::ZERO; global * s.d],
            local_keys: vec![0.0; local * ring],
            local_values: vec![0.0; local * ring],
            shift_prev: if s.shift {
                vec![0.0; depth * 2 * s.dim]
            } else {
                Vec::new()
            },
            logits: vec![0.0; s.vocab],
            acc64: None,
        }
    }

    /// Global heads of layer `l` and the index of its first one in the FAVOR+ buffers.
    fn favor_range(&self, l: usize) -> std::ops::Range<usize> {
        self.layout.favor_start[l]..self.layout.favor_start[l + 1]
    }

    /// The FAVOR+ state of layer `l`'s global heads (an f32 state's).
    pub(crate) fn favor_heads(&mut self, l: usize) -> FavorHeads<'_> {
        let (m, d) = (self.layout.m, self.layout.d);
        let h = self.favor_range(l);
        let (md, hm, hd) = (
            h.start * m * d..h.end * m * d,
            h.start * m..h.end * m,
            h.start * d..h.end * d,
        );
        FavorHeads {
            a_mat: &mut self.a_mat[md.clone()],
            a_mat_c: &mut self.a_mat_c[md],
            a_vec: &mut self.a_vec[hm.clone()],
            a_vec_c: &mut self.a_vec_c[hm],
            v_sum: &mut self.v_sum[hd.clone()],
            v_sum_c: &mut self.v_sum_c[hd],
            max: &mut self.max[h],
            m,
            d,
        }
    }

    /// The f64 accumulators of layer `l`'s global heads, in head order (empty for an f32
    /// state).
    pub(crate) fn favor_heads64(&mut self, l: usize) -> impl Iterator<Item = Head64<'_>> {
        let (m, d) = (self.layout.m, self.layout.d);
        let h = self.favor_range(l);
        self.acc64.iter_mut().flat_map(move |acc| {
            acc.a_mat[h.start * m * d..h.end * m * d]
                .chunks_mut(m * d)
                .zip(acc.a_vec[h.start * m..h.end * m].chunks_mut(m))
                .zip(acc.v_sum[h.start * d..h.end * d].chunks_mut(d))
                .zip(&mut acc.max[h.clone()])
                .map(|(((a_mat, a_vec), v_sum), max)| Head64 {
                    a_mat,
                    a_vec,
                    v_sum,
                    max,
                })
        })
    }

    /// The rings of head `head` of layer `l`, which must be one of the layer's local heads
    /// (the last of its heads).
    pub(crate) fn local_ring(&mut self, l: usize, head: usize) -> Ring<'_> {
        let global = self.layout.favor_start[l + 1] - self.layout.favor_start[l];
        debug_assert!(head >= global, "head {head} of layer {l} is not local");
        let i = self.layout.local_start[l] + (head - global);
        debug_assert!(i < self.layout.local_start[l + 1]);
        let slot = i * self.layout.ring..(i + 1) * self.layout.ring;
        Ring {
            keys: &mut self.local_keys[slot.clone()],
            values: &mut self.local_values[slot],
        }
    }

    /// The buffers a snapshot saves besides the position, in snapshot order; the last is the
    /// logits.
    pub(crate) fn buffers(&self) -> [Buffer<'_>; MEMORY_BUFFERS] {
        use Buffer::{Bf16, F32};
        [
            F32(&self.a_mat),
            F32(&self.a_vec),
            F32(&self.v_sum),
            F32(&self.max),
            Bf16(&self.a_mat_c),
            Bf16(&self.a_vec_c),
            Bf16(&self.v_sum_c),
            F32(&self.local_keys),
            F32(&self.local_values),
            F32(&self.shift_prev),
            F32(&self.logits),
        ]
    }

    /// [`Memory::buffers`], mutably.
    pub(crate) fn buffers_mut(&mut self) -> [BufferMut<'_>; MEMORY_BUFFERS] {
        use BufferMut::{Bf16, F32};
        [
            F32(&mut self.a_mat),
            F32(&mut self.a_vec),
            F32(&mut self.v_sum),
            F32(&mut self.max),
            Bf16(&mut self.a_mat_c),
            Bf16(&mut self.a_vec_c),
            Bf16(&mut self.v_sum_c),
            F32(&mut self.local_keys),
            F32(&mut self.local_values),
            F32(&mut self.shift_prev),
            F32(&mut self.logits),
        ]
    }

    /// Bytes of the f64 accumulators of a [`Precision::F64`] state (0 for f32 states).
    fn acc64_bytes(&self) -> usize {
        self.acc64.as_ref().map_or(0, |a| {
            (a.a_mat.len() + a.a_vec.len() + a.v_sum.len() + a.max.len())
                * std::mem::size_of::<f64>()
        })
    }

    /// Bytes of the layout's index tables.
    fn layout_bytes(&self) -> usize {
        (self.layout.favor_start.len() + self.layout.local_start.len())
            * std::mem::size_of::<usize>()
    }
}

/// The buffers one token's pass overwrites: nothing in them outlives a step.
#[derive(Debug, Clone)]
pub(crate) struct Scratch {
    /// The residual stream, dim.
    pub(crate) h: Vec<f32>,
    /// A block's normed input, dim.
    pub(crate) xn: Vec<f32>,
    /// A branch's output before the residual add, dim.
    pub(crate) tmp: Vec<f32>,
    /// Query, key and value of the current token, stacked (one projection call fills all three).
    pub(crate) qkv: Vec<f32>,
    /// Every head's attention output, inner.
    pub(crate) att: Vec<f32>,
    /// The feed-forward's hidden layer (both halves with `ff_glu`).
    pub(crate) hidden: Vec<f32>,
    /// The rotary table row of the current position, d.
    pub(crate) rot: Vec<f32>,
    /// Per head, the key's and the query's features, m each.
    pub(crate) key_feat: Vec<f32>,
    pub(crate) query_feat: Vec<f32>,
    /// A local head's scores, 2w.
    pub(crate) scores: Vec<f32>,
}

impl Scratch {
    fn new(s: &StateShape, has_local: bool) -> Self {
        let heads = s.inner / s.d.max(1);
        Scratch {
            h: vec![0.0; s.dim],
            xn: vec![0.0; s.dim],
            tmp: vec![0.0; s.dim],
            qkv: vec![0.0; 3 * s.inner],
            att: vec![0.0; s.inner],
            hidden: vec![0.0; s.ff_in],
            rot: vec![0.0; s.d],
            key_feat: vec![0.0; heads * s.m],
            query_feat: vec![0.0; heads * s.m],
            scores: vec![0.0; if has_local { 2 * s.window } else { 0 }],
        }
    }

    fn bytes(&self) -> usize {
        [
            &self.h,
            &self.xn,
            &self.tmp,
            &self.qkv,
            &self.att,
            &self.hidden,
            &self.rot,
            &self.key_feat,
            &self.query_feat,
            &self.scores,
        ]
        .iter()
        .map(|v| v.len() * 4)
        .sum()
    }
}

/// The state of one sequence: its `Memory` (the constant-size attention state, local
/// windows, token shifts and logits), the token count `n` (= [`State::position`]), and
/// fixed-size `Scratch`.
///
/// ```
/// # fn main() -> performer::Result<()> {
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/default_a");
/// use performer::{Model, State};
/// let model = Model::load(dir)?;
/// let mut state = State::new(&model);
/// let before = state.size_bytes();
/// model.prefill(&mut state, &[72, 105, 33])?;
/// assert_eq!(state.position(), 3);
/// assert_eq!(state.size_bytes(), before);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct State {
    pub(crate) shape: StateShape,
    pub(crate) pos: usize,
    pub(crate) has_logits: bool,
    pub(crate) mem: Memory,
    pub(crate) scratch: Scratch,
}

impl State {
    /// A fresh state (position 0) of `shape` and accumulator precision `precision`.
    /// `State::new(&model)` is the usual way to make one.
    pub fn from_shape(shape: &StateShape, precision: Precision) -> Self {
        let mut mem = Memory::new(shape);
        let has_local = !mem.local_keys.is_empty();
        if precision == Precision::F64 {
            let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect();
            mem.acc64 = Some(Box::new(Acc64 {
                a_mat: widen(&mem.a_mat),
                a_vec: widen(&mem.a_vec),
                v_sum: widen(&mem.v_sum),
                max: widen(&mem.max),
            }));
            for b in [&mut mem.a_mat, &mut mem.a_vec, &mut mem.v_sum, &mut mem.max] {
                *b = Vec::new();
            }
            for b in [&mut mem.a_mat_c, &mut mem.a_vec_c, &mut mem.v_sum_c] {
                *b = Vec::new();
            }
        }
        State {
            shape: shape.clone(),
            pos: 0,
            has_logits: false,
            scratch: Scratch::new(shape, has_local),
            mem,
        }
    }

    /// The shape this state was made for.
    pub fn shape(&self) -> &StateShape {
        &self.shape
    }

    /// The accumulator precision.
    pub fn precision(&self) -> Precision {
        if self.mem.acc64.is_some() {
            Precision::F64
        } else {
            Precision::F32
        }
    }

    /// Back to position 0, keeping the allocations.
    pub fn reset(&mut self) {
        self.pos = 0;
        for buf in self.mem.buffers_mut() {
            match buf {
                BufferMut::F32(b) => b.fill(0.0),
                BufferMut::Bf16(b) => b.fill(bf16::ZERO),
            }
        }
        self.mem.max.fill(f32::NEG_INFINITY);
        if let Some(acc) = &mut self.mem.acc64 {
            acc.a_mat.fill(0.0);
            acc.a_vec.fill(0.0);
            acc.v_sum.fill(0.0);
            acc.max.fill(f64::NEG_INFINITY);
        }
        self.has_logits = false;
    }

    /// Number of tokens consumed.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The logits after the last consumed token, if the last call computed them.
    pub fn logits(&self) -> Option<&[f32]> {
        self.has_logits.then_some(&self.mem.logits[..])
    }

    /// Bytes held by this state, attention state and scratch together. Fixed at creation.
    pub fn size_bytes(&self) -> usize {
        let memory_bytes: usize = self.mem.buffers().iter().map(Buffer::bytes).sum();
        memory_bytes
            + self.scratch.bytes()
            + self.mem.acc64_bytes()
            + std::mem::size_of::<Self>()
            + self.mem.layout_bytes()
    }

    /// Bytes of the sequence's memory proper: FAVOR+ state (A, a, s, M and the compensations of
    /// A, a, s), local-head windows and token shifts. Everything else is per-step scratch.
    pub fn attention_bytes(&self) -> usize {
        // Every memory buffer but the last, the logits.
        self.mem.buffers()[..MEMORY_BUFFERS - 1]
            .iter()
            .map(Buffer::bytes)
            .sum::<usize>()
            + self.mem.acc64_bytes()
    }

    /// Whether the FAVOR+ sums are f64 ([`Precision::F64`]).
    pub(crate) fn is_f64(&self) -> bool {
        self.mem.acc64.is_some()
    }

    /// An error unless this state was made for `shape`.
    pub(crate) fn check_fits(&self, shape: &StateShape) -> Result<()> {
        if *shape != self.shape {
            return Err(Error::StateMismatch(format!(
                "state made for {:?}, model is {shape:?}",
                self.shape
            )));
        }
        Ok(())
    }
}
