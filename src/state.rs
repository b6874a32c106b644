//! Per-sequence run state: the constant-size FAVOR+ state of every layer and head, plus the
//! scratch buffers of one decode step.
//!
//! A state's size is fixed when it is created and never grows, however many tokens it has
//! consumed: that is the point of a Performer.

use crate::error::{Error, Result};
use crate::model::Model;

/// Dimensions a state was created for; a state only runs with a model of the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StateShape {
    pub depth: usize,
    pub heads: usize,
    pub m: usize,
    pub d: usize,
    pub dim: usize,
    pub inner: usize,
    pub hidden: usize,
    pub vocab: usize,
}

impl StateShape {
    fn of(model: &Model) -> Self {
        let c = model.config();
        StateShape {
            depth: c.depth,
            heads: c.heads,
            m: c.nb_features,
            d: c.dim_head,
            dim: c.dim,
            inner: c.inner_dim(),
            hidden: c.ff_hidden(),
            vocab: c.num_tokens,
        }
    }
}

/// The state of one sequence: per layer and head `A` (m×d), `a` (m), `M`, `s` (d), and the
/// token count `n` (= [`State::position`]), plus fixed-size scratch.
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
    shape: StateShape,
    pub(crate) pos: usize,
    pub(crate) a_mat: Vec<f32>,
    pub(crate) a_vec: Vec<f32>,
    pub(crate) v_sum: Vec<f32>,
    pub(crate) max: Vec<f32>,
    // Scratch: overwritten by every step.
    pub(crate) h: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) hidden: Vec<f32>,
    pub(crate) rot: Vec<f32>,
    pub(crate) key_feat: Vec<f32>,
    pub(crate) query_feat: Vec<f32>,
    pub(crate) logits: Vec<f32>,
    pub(crate) has_logits: bool,
}

impl State {
    /// A fresh state (position 0) sized for `model`.
    pub fn new(model: &Model) -> Self {
        let s = StateShape::of(model);
        let per_layer_heads = s.depth * s.heads;
        State {
            shape: s,
            pos: 0,
            a_mat: vec![0.0; per_layer_heads * s.m * s.d],
            a_vec: vec![0.0; per_layer_heads * s.m],
            v_sum: vec![0.0; per_layer_heads * s.d],
            max: vec![f32::NEG_INFINITY; per_layer_heads],
            h: vec![0.0; s.dim],
            xn: vec![0.0; s.dim],
            tmp: vec![0.0; s.dim],
            q: vec![0.0; s.inner],
            k: vec![0.0; s.inner],
            v: vec![0.0; s.inner],
            att: vec![0.0; s.inner],
            hidden: vec![0.0; s.hidden],
            rot: vec![0.0; s.d],
            key_feat: vec![0.0; s.heads * s.m],
            query_feat: vec![0.0; s.heads * s.m],
            logits: vec![0.0; s.vocab],
            has_logits: false,
        }
    }

    /// Back to position 0, keeping the allocations.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.a_mat.fill(0.0);
        self.a_vec.fill(0.0);
        self.v_sum.fill(0.0);
        self.max.fill(f32::NEG_INFINITY);
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
        let floats = [
            &self.a_mat,
            &self.a_vec,
            &self.v_sum,
            &self.max,
            &self.h,
            &self.xn,
            &self.tmp,
            &self.q,
            &self.k,
            &self.v,
            &self.att,
            &self.hidden,
            &self.rot,
            &self.key_feat,
            &self.query_feat,
            &self.logits,
        ]
        .iter()
        .map(|v| v.capacity())
        .sum::<usize>();
        floats * std::mem::size_of::<f32>() + std::mem::size_of::<Self>()
    }

    /// Bytes of the attention state alone (A, a, s, M for every layer and head).
    pub fn attention_bytes(&self) -> usize {
        (self.a_mat.len() + self.a_vec.len() + self.v_sum.len() + self.max.len())
            * std::mem::size_of::<f32>()
    }

    pub(crate) fn check_fits(&self, model: &Model) -> Result<()> {
        let s = StateShape::of(model);
        if s != self.shape {
            return Err(Error::StateMismatch(format!(
                "state made for {:?}, model is {:?}",
                self.shape, s
            )));
        }
        Ok(())
    }
}
