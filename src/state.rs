//! Per-sequence run state: the constant-size FAVOR+ state of every layer and head, the bounded
//! windows of local heads and token shifts, plus the scratch buffers of one decode step.
//!
//! A state's size is fixed when it is created and never grows, however many tokens it has
//! consumed: that is the point of a Performer.

use crate::error::{Error, Result};
use crate::model::Model;
use half::bf16;

/// Dimensions a state was created for; a state only runs with a model of the same shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateShape {
    pub global_heads: Vec<usize>,
    pub local_heads: Vec<usize>,
    pub window: usize,
    pub m: usize,
    pub d: usize,
    pub dim: usize,
    pub inner: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub shift: bool,
}

impl StateShape {
    pub(crate) fn of(c: &crate::config::Config) -> Self {
        StateShape {
            global_heads: c.local_attn_heads.iter().map(|l| c.heads - l).collect(),
            local_heads: c.local_attn_heads.clone(),
            window: c.local_window_size,
            m: c.feature_count(),
            d: c.dim_head,
            dim: c.dim,
            inner: c.inner_dim(),
            hidden: c.ff_hidden(),
            vocab: c.num_tokens,
            shift: c.shift_tokens,
        }
    }
}

/// Precision of the accumulated FAVOR+ state (`A`, `a`, `s`, `M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 sums, SIMD: the default, measured to drift below 1e-3 over a million tokens (see
    /// the README).
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

/// Number of buffers in [`State::memory`].
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

/// The state of one sequence: per layer and global head `A` (m×d), `a` (m), `M`, `s` (d); per
/// local head a ring of the last `2w` keys and values; per layer the previous position's
/// shifted features (`shift_tokens`); the token count `n` (= [`State::position`]); and
/// fixed-size scratch.
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
    /// Prefix sums of global heads per layer (index into the FAVOR buffers).
    pub(crate) favor_start: Vec<usize>,
    /// Prefix sums of local heads per layer.
    pub(crate) local_start: Vec<usize>,
    pub(crate) pos: usize,
    pub(crate) a_mat: Vec<f32>,
    pub(crate) a_vec: Vec<f32>,
    pub(crate) v_sum: Vec<f32>,
    pub(crate) max: Vec<f32>,
    /// Kahan compensations of `a_mat`, `a_vec`, `v_sum`: without them f32 rounding of a
    /// million additions drifts the logits by ~2e-3 (measured on the shipped model). In bf16:
    /// a compensation is under half an ulp of its sum, so 8 bits of it still carry the sum to
    /// ~2⁻³³ per addition, and batched decode, bound by the states' memory traffic, moves a
    /// quarter fewer bytes (docs/numerical-stability.md).
    pub(crate) a_mat_c: Vec<bf16>,
    pub(crate) a_vec_c: Vec<bf16>,
    pub(crate) v_sum_c: Vec<bf16>,
    pub(crate) local_keys: Vec<f32>,
    pub(crate) local_values: Vec<f32>,
    /// Per layer, attention then feed-forward: the previous position's block input.
    pub(crate) shift_prev: Vec<f32>,
    // Scratch: overwritten by every step.
    pub(crate) h: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    /// Query, key and value of the current token, stacked (one projection call fills all three).
    pub(crate) qkv: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) hidden: Vec<f32>,
    pub(crate) rot: Vec<f32>,
    pub(crate) key_feat: Vec<f32>,
    pub(crate) query_feat: Vec<f32>,
    pub(crate) scores: Vec<f32>,
    pub(crate) logits: Vec<f32>,
    pub(crate) has_logits: bool,
    /// Present for [`Precision::F64`] states, which leave the f32 FAVOR+ buffers empty.
    pub(crate) acc64: Option<Box<Acc64>>,
}

impl State {
    /// A fresh state of the given accumulator precision.
    pub fn with_precision(model: &Model, precision: Precision) -> Self {
        let mut st = State::new(model);
        if precision == Precision::F64 {
            let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect();
            st.acc64 = Some(Box::new(Acc64 {
                a_mat: widen(&st.a_mat),
                a_vec: widen(&st.a_vec),
                v_sum: widen(&st.v_sum),
                max: widen(&st.max),
            }));
            for b in [&mut st.a_mat, &mut st.a_vec, &mut st.v_sum, &mut st.max] {
                *b = Vec::new();
            }
            for b in [&mut st.a_mat_c, &mut st.a_vec_c, &mut st.v_sum_c] {
                *b = Vec::new();
            }
        }
        st
    }

    /// The accumulator precision.
    pub fn precision(&self) -> Precision {
        if self.acc64.is_some() {
            Precision::F64
        } else {
            Precision::F32
        }
    }

    /// A fresh state (position 0) sized for `model`.
    pub fn new(model: &Model) -> Self {
        let s = model.state_shape.clone();
        let favor_start = prefix_sums(&s.global_heads);
        let local_start = prefix_sums(&s.local_heads);
        let (global, local) = (
            favor_start[favor_start.len() - 1],
            local_start[local_start.len() - 1],
        );
        let depth = s.global_heads.len();
        let heads = s.inner / s.d.max(1);
        let ring = if local > 0 { 2 * s.window * s.d } else { 0 };
        let glu_hidden = model.config().ff_hidden() * if model.config().ff_glu { 2 } else { 1 };
        State {
            favor_start,
            local_start,
            pos: 0,
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
            h: vec![0.0; s.dim],
            xn: vec![0.0; s.dim],
            tmp: vec![0.0; s.dim],
            qkv: vec![0.0; 3 * s.inner],
            att: vec![0.0; s.inner],
            hidden: vec![0.0; glu_hidden],
            rot: vec![0.0; s.d],
            key_feat: vec![0.0; heads * s.m],
            query_feat: vec![0.0; heads * s.m],
            scores: vec![0.0; if local > 0 { 2 * s.window } else { 0 }],
            logits: vec![0.0; s.vocab],
            has_logits: false,
            acc64: None,
            shape: s,
        }
    }

    /// Back to position 0, keeping the allocations.
    pub fn reset(&mut self) {
        self.pos = 0;
        for buf in self.memory_mut() {
            match buf {
                BufferMut::F32(b) => b.fill(0.0),
                BufferMut::Bf16(b) => b.fill(bf16::ZERO),
            }
        }
        self.max.fill(f32::NEG_INFINITY);
        if let Some(acc) = &mut self.acc64 {
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
        self.has_logits.then_some(&self.logits[..])
    }

    /// Bytes held by this state, attention state and scratch together. Fixed at creation.
    pub fn size_bytes(&self) -> usize {
        let scratch = [
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
        ];
        let scratch_bytes: usize = scratch.iter().map(|v| v.len()).sum::<usize>() * 4;
        let memory_bytes: usize = self.memory().iter().map(Buffer::bytes).sum();
        memory_bytes
            + scratch_bytes
            + self.acc64_bytes()
            + std::mem::size_of::<Self>()
            + (self.favor_start.len() + self.local_start.len()) * 8
    }

    /// Bytes of the sequence's memory proper: FAVOR+ state (A, a, s, M and the compensations of
    /// A, a, s), local-head windows and token shifts. Everything else is per-step scratch.
    pub fn attention_bytes(&self) -> usize {
        // Every memory buffer but the last, the logits.
        self.memory()[..MEMORY_BUFFERS - 1]
            .iter()
            .map(Buffer::bytes)
            .sum::<usize>()
            + self.acc64_bytes()
    }

    /// Bytes of the f64 accumulators of a [`Precision::F64`] state (0 for f32 states).
    fn acc64_bytes(&self) -> usize {
        self.acc64.as_ref().map_or(0, |a| {
            (a.a_mat.len() + a.a_vec.len() + a.v_sum.len() + a.max.len())
                * std::mem::size_of::<f64>()
        })
    }

    /// The buffers that make up the sequence's memory (everything a snapshot saves besides
    /// the position), in snapshot order; the last is the logits.
    pub(crate) fn memory(&self) -> [Buffer<'_>; MEMORY_BUFFERS] {
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

    /// [`State::memory`], mutably.
    pub(crate) fn memory_mut(&mut self) -> [BufferMut<'_>; MEMORY_BUFFERS] {
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

    pub(crate) fn check_fits(&self, model: &Model) -> Result<()> {
        if model.state_shape != self.shape {
            return Err(Error::StateMismatch(format!(
                "state made for {:?}, model is {:?}",
                self.shape, model.state_shape
            )));
        }
        Ok(())
    }
}
