//! The decode step: one token through every layer at the state's position, top to bottom.
//!
//! embed → for each layer (norm → q, k, v → rotary → attention: global heads through a
//! [`GlobalAttention`], local heads over their rings → out projection → residual; norm →
//! feed-forward → residual) → final norm → logits.

use super::attend::{Favor, GlobalAttention, RowQkv};
use super::layers::{shift_features, split_qkv, Linear};
use super::Model;
use crate::attention::rotary;
use crate::error::{Error, Result};
use crate::kernels;
use crate::state::State;
use crate::with_view;

impl Model {
    /// Consumes one token and returns the logits for the next one.
    pub fn step<'s>(&self, state: &'s mut State, token: u32) -> Result<&'s [f32]> {
        state.check_fits(&self.state_shape)?;
        self.check_tokens(state.pos, &[token])?;
        self.forward_token(state, token, true, &mut Favor::default())?;
        Ok(&state.mem.logits)
    }

    /// Runs one token through every layer at position `st.pos`, the global heads attending
    /// through `attn`, and advances the state by one; with `want_logits`, computes the logits
    /// into the state. The caller has checked the token and the state's shape.
    pub(crate) fn forward_token(
        &self,
        st: &mut State,
        token: u32,
        want_logits: bool,
        attn: &mut impl GlobalAttention,
    ) -> Result<()> {
        let c = &self.config;
        let (heads, d, dim, hidden) = (c.heads, c.dim_head, c.dim, c.ff_hidden());
        let pos = st.pos;
        let (mem, s) = (&mut st.mem, &mut st.scratch);

        // The token's embedding plus its position's.
        self.token_emb.row(token as usize).to_f32_into(&mut s.h);
        self.positions.add_input(pos, &mut s.h, &mut s.tmp);
        let rotary = self.positions.rotary();
        if let Some(r) = rotary {
            r.row(pos, &mut s.rot);
        }

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention branch: norm, token shift, the q, k, v projections in one call.
            layer.attn_norm.apply(&s.h, &mut s.xn);
            if c.shift_tokens {
                shift_features(&mut s.xn, &mut mem.shift_prev, (2 * l) * dim);
            }
            let qkv = [&layer.to_q, &layer.to_k, &layer.to_v];
            Linear::forward_stacked(&qkv, &s.xn, &mut s.qkv);
            // Rotary positions on the global heads' queries and keys.
            if rotary.is_some() {
                let (q, k, _) = split_qkv(&mut s.qkv);
                for hd in 0..heads - layer.local_heads {
                    rotary::rotate(&mut q[hd * d..(hd + 1) * d], &s.rot);
                    rotary::rotate(&mut k[hd * d..(hd + 1) * d], &s.rot);
                }
            }
            // Global heads, then local heads, each into its columns of `att`.
            attn.token(self, l, pos, mem, s);
            let (q, k, v) = split_qkv(&mut s.qkv);
            let row = RowQkv {
                q,
                k,
                v,
                att: &mut s.att,
            };
            self.attend_local(l, pos, mem, &mut s.scores, row);
            layer.attn_out.forward(&s.att, &mut s.tmp);
            kernels::axpy(layer.attn_norm.gain(), &s.tmp, &mut s.h);

            // Feed-forward branch: norm, token shift, GELU (gated with `ff_glu`), residual.
            layer.ff_norm.apply(&s.h, &mut s.xn);
            if c.shift_tokens {
                shift_features(&mut s.xn, &mut mem.shift_prev, (2 * l + 1) * dim);
            }
            layer.w1.forward(&s.xn, &mut s.hidden);
            kernels::gelu(&mut s.hidden[..hidden]);
            if c.ff_glu {
                let (x, gate) = s.hidden.split_at_mut(hidden);
                for (a, g) in x.iter_mut().zip(gate.iter()) {
                    *a *= g;
                }
            }
            layer.w2.forward(&s.hidden[..hidden], &mut s.tmp);
            kernels::axpy(layer.ff_norm.gain(), &s.tmp, &mut s.h);
        }
        st.pos += 1;
        st.has_logits = false;
        if !want_logits {
            return Ok(());
        }

        // Final norm and logits (the output layer, or the tied token embedding).
        let (s, logits) = (&mut st.scratch, &mut st.mem.logits);
        self.norm.forward(&s.h, &mut s.xn);
        match &self.to_out {
            Some(out) => out.forward(&s.xn, logits),
            None => with_view!(self.token_emb.view(), |w| kernels::matvec(w, &s.xn, logits)),
        }
        if logits.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFiniteLogits { position: pos });
        }
        st.has_logits = true;
        Ok(())
    }
}
