//! What `performer bench` measures: the attention kinds ([`Attention`]) and the sessions that
//! run them on a model ([`Session`]), FAVOR+ on a [`State`] and the exact-softmax baseline.

use std::str::FromStr;

use serde::Serialize;

use performer::error::Result;
use performer::{Model, State};

/// Which attention a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// The constant-size streaming FAVOR+ state ([`State`]).
    Favor,
    /// Exact softmax attention over a growing key/value cache ([`performer::baseline`]).
    Softmax,
}

impl Attention {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Attention::Favor => "favor",
            Attention::Softmax => "softmax",
        }
    }
}

impl std::fmt::Display for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Attention {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "favor" | "favor+" | "performer" => Ok(Attention::Favor),
            "softmax" | "exact" => Ok(Attention::Softmax),
            other => Err(format!(
                "unknown attention `{other}` (expected favor or softmax)"
            )),
        }
    }
}

/// One sequence being decoded, whatever the attention.
pub trait Session<'m>: Send + Sync {
    /// Consumes one token (computing the logits, which are discarded).
    fn step(&mut self, token: u32) -> Result<()>;
    /// Consumes several tokens (logits after the last one only).
    fn prefill(&mut self, tokens: &[u32]) -> Result<()>;
    /// Bytes of per-sequence state held now (for a KV cache: grows with the depth).
    fn state_bytes(&self) -> usize;
    /// Bytes the state grows by per token consumed (0 for FAVOR+'s constant-size state).
    fn bytes_per_token(&self) -> usize;
    /// Bytes of attention state the next decode token moves through memory: FAVOR+ reads
    /// and rewrites its whole state (twice [`State::attention_bytes`]), the softmax baseline
    /// reads its key/value cache once. With the weights, what a token's decode must move.
    fn state_traffic_bytes(&self) -> usize;
    /// An independent copy at the same depth, so that every `tg` repetition starts from the
    /// same state. `None` where copying is not supported: then the repetitions run back to back
    /// on the session itself, the r-th starting at depth `K + r·N` (plus two warm-up tokens).
    fn fork(&self) -> Option<Box<dyn Session<'m> + 'm>>;
}

/// The FAVOR+ session: a [`State`] and the model it runs with.
struct FavorSession<'m> {
    model: &'m Model,
    state: State,
}

impl<'m> Session<'m> for FavorSession<'m> {
    fn step(&mut self, token: u32) -> Result<()> {
        let logits = self.model.step(&mut self.state, token)?;
        std::hint::black_box(logits);
        Ok(())
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        let logits = self.model.prefill(&mut self.state, tokens)?;
        std::hint::black_box(logits);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.state.size_bytes()
    }

    fn bytes_per_token(&self) -> usize {
        0
    }

    fn state_traffic_bytes(&self) -> usize {
        2 * self.state.attention_bytes()
    }

    fn fork(&self) -> Option<Box<dyn Session<'m> + 'm>> {
        Some(Box::new(FavorSession {
            model: self.model,
            state: self.state.clone(),
        }))
    }
}

/// The exact-softmax baseline ([`performer::baseline::SoftmaxSession`]): a key/value cache that
/// grows with the depth.
struct SoftmaxBench<'m>(performer::baseline::SoftmaxSession<'m>);

impl<'m> Session<'m> for SoftmaxBench<'m> {
    fn step(&mut self, token: u32) -> Result<()> {
        std::hint::black_box(self.0.step(token)?);
        Ok(())
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        std::hint::black_box(self.0.prefill(tokens)?);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.0.size_bytes()
    }

    fn bytes_per_token(&self) -> usize {
        self.0.cache_bytes_per_token()
    }

    fn state_traffic_bytes(&self) -> usize {
        self.0.cache_bytes_per_token() * self.0.position()
    }

    fn fork(&self) -> Option<Box<dyn Session<'m> + 'm>> {
        None
    }
}

/// A fresh session (depth 0) for `attention`. The one place that knows the attention kinds.
pub fn new_session(model: &Model, attention: Attention) -> Result<Box<dyn Session<'_> + '_>> {
    match attention {
        Attention::Favor => Ok(Box::new(FavorSession {
            model,
            state: State::new(model),
        })),
        Attention::Softmax => Ok(Box::new(SoftmaxBench(
            performer::baseline::SoftmaxSession::new(model),
        ))),
    }
}
