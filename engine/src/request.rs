//! What a caller asks the engine for and what streams back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::Error;
use performer::constraint::Grammar;
use performer::sampling::SamplingParams;

/// Most top alternatives a request may ask for per token.
pub const MAX_LOGPROBS: usize = 5;

/// Where a completion's context lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A fresh state, dropped afterwards.
    Stateless,
    /// An existing session of the tenant: the prompt is appended to it and the session keeps
    /// what was returned.
    Session(String),
    /// A new session created from the prompt (usually with `max_tokens` 0).
    NewSession,
}

/// One completion request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// Who asks (sessions belong to a tenant; `""` when there is no authentication).
    pub tenant: String,
    /// Prompt token ids (may be empty for a session that already holds context).
    pub prompt: Vec<u32>,
    /// Most tokens to sample per choice.
    pub max_tokens: usize,
    /// Sampling parameters; choice `i` samples with seed `seed + i`.
    pub sampling: SamplingParams,
    /// Stop strings (non-empty).
    pub stop: Vec<String>,
    /// Top alternatives to report per token (`None`: no logprobs; at most
    /// [`MAX_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Choices: the prompt is ingested once and its state forked `n` times.
    pub n: usize,
    /// Where the context lives.
    pub target: Target,
    /// A grammar every choice's text must match ([`crate::constraint`]), compiled for the
    /// engine's model beforehand (so that an invalid one is refused before submission). Its
    /// mask applies to this request's logits rows only; a choice whose grammar is complete
    /// finishes with [`FinishReason::Stop`] and its session keeps the whole text.
    pub constraint: Option<Grammar>,
}

impl CompletionRequest {
    /// A stateless request for `prompt` with the given sampling, one choice, no stops.
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        CompletionRequest {
            tenant: String::new(),
            prompt,
            max_tokens,
            sampling,
            stop: Vec::new(),
            logprobs: None,
            n: 1,
            target: Target::Stateless,
            constraint: None,
        }
    }
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string was generated (and not returned), or the request's grammar is complete.
    Stop,
    /// `max_tokens` were sampled.
    Length,
}

impl FinishReason {
    /// The OpenAI name: `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The log-probability of one sampled token and its most likely alternatives (log-softmax of
/// the model's logits, before temperature and penalties).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The sampled token id.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens, most likely first, with their log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens ingested (once, whatever `n`).
    pub prompt_tokens: usize,
    /// Tokens returned to the caller over all choices.
    pub completion_tokens: usize,
    /// Prompt tokens not ingested because the prefix cache held a state that had consumed
    /// them (counted in `prompt_tokens` too; OpenAI's `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
}

/// A session's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Its id.
    pub id: String,
    /// Tokens its state has consumed.
    pub position: usize,
    /// Bytes of its state in memory.
    pub state_bytes: usize,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Last use, seconds since the Unix epoch.
    pub last_used: u64,
}

/// What streams back to the caller's sink.
#[derive(Debug)]
pub enum Event {
    /// Text of one choice (a whole number of UTF-8 characters; may be empty when only
    /// logprobs are new), with the logprobs of the tokens it covers if asked for.
    Text {
        /// The choice index.
        choice: usize,
        /// The text.
        text: String,
        /// Per token, when the request asked for logprobs.
        logprobs: Vec<TokenLogprob>,
    },
    /// One choice ended.
    Finished {
        /// The choice index.
        choice: usize,
        /// Why.
        reason: FinishReason,
    },
    /// The request is complete (always the last event of a successful request).
    Done {
        /// Token counts.
        usage: Usage,
        /// The session the request ran on or created.
        session: Option<SessionInfo>,
    },
    /// The request failed; no more events follow.
    Failed(Error),
}

/// Receives a request's events on the engine's thread; returning `false` cancels the request
/// (as does a dropped receiver on the caller's side of a channel). It must not block.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Cancels a submitted request: the engine drops it within one tick and frees its slots.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Asks the engine to drop the request.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Computes a token's logprob entry from raw logits.
pub(crate) fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: best.into_iter().map(|(i, l)| (i, lp(l))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax_and_sorted() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let e = token_logprob(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        // f32 rounding of a log of a few terms: well under 1e-6.
        assert!((e.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = e.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "ties keep the lower id first");
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }
}
