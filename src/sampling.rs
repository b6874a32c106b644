//! Logits processing and sampling: repetition penalty, temperature, top-k, top-p and a seeded
//! random number generator, so the same seed gives the same text.

use crate::constraint::TokenMask;
use crate::error::{Error, Result};

/// Sampling parameters. `temperature == 0` is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 0 picks the most likely token (ties go to the lowest id).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (`None`: all).
    pub top_p: Option<f32>,
    /// CTRL-style penalty on tokens seen in the last `penalty_window` tokens: positive logits
    /// are divided by it, negative ones multiplied. 1 disables it.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub penalty_window: usize,
    /// Seed of the random number generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            repetition_penalty: 1.0,
            penalty_window: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            ..Self::default()
        }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("must be a finite number ≥ 0, got {}", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid(
                "top_k",
                "must be ≥ 1 (leave it unset to disable)",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(
                    "top_p",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::invalid(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            ));
        }
        Ok(())
    }
}

/// One step of SplitMix64: advances `state` and returns the next 64 random bits. The one
/// implementation behind [`Rng`], the synthetic models' seeding and the tests' generators.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: tiny, fast, and its stream is fixed forever, so a seed reproduces the same text
/// across versions of this crate and its dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Turns logits into token ids.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler; invalid parameters are an error.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            rng: Rng::new(params.seed),
            params,
            candidates: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the tokens so far (`history`, for the
    /// repetition penalty). Non-finite logits are an error.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        self.sample_among(logits, history, None)
    }

    /// [`Self::sample`] among the tokens `mask` allows (a grammar's, see
    /// [`crate::constraint`]): the others are dropped before the penalty, top-k and top-p, so
    /// those act on the allowed tokens only. A mask allowing none of the logits' tokens is an
    /// [`Error::InvalidConstraint`].
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        history: &[u32],
        mask: &TokenMask,
    ) -> Result<u32> {
        self.sample_among(logits, history, Some(mask))
    }

    fn sample_among(
        &mut self,
        logits: &[f32],
        history: &[u32],
        mask: Option<&TokenMask>,
    ) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::EmptyInput("no logits to sample from"));
        }
        if logits.iter().any(|l| !l.is_finite()) {
            return Err(Error::NonFiniteLogits {
                position: history.len(),
            });
        }
        let p = &self.params;
        self.candidates.clear();
        match mask {
            None => self
                .candidates
                .extend(logits.iter().zip(0u32..).map(|(&l, i)| (l, i))),
            Some(m) => self.candidates.extend(
                logits
                    .iter()
                    .zip(0u32..)
                    .filter(|&(_, i)| m.allows(i))
                    .map(|(&l, i)| (l, i)),
            ),
        }
        if self.candidates.is_empty() {
            return Err(Error::InvalidConstraint {
                kind: "constraint",
                message: "the grammar allows none of the model's tokens".into(),
            });
        }
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.penalty_window);
            let mut seen = vec![false; logits.len()];
            for &t in &history[start..] {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, i) in self.candidates.iter_mut() {
                if seen[*i as usize] {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        // Most likely first; ties go to the lower id so greedy decoding is deterministic.
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.temperature == 0.0 {
            let best = self
                .candidates
                .iter()
                .min_by(|a, b| by_logit(a, b))
                .expect("non-empty");
            return Ok(best.1);
        }
        let keep = p.top_k.unwrap_or(usize::MAX).min(self.candidates.len());
        if keep < self.candidates.len() {
            self.candidates.select_nth_unstable_by(keep - 1, by_logit);
            self.candidates.truncate(keep);
        }
        self.candidates.sort_unstable_by(by_logit);
        let max = self.candidates[0].0;
        let inv_t = 1.0 / p.temperature as f64;
        let weights: Vec<f64> = self
            .candidates
            .iter()
            .map(|(l, _)| ((*l - max) as f64 * inv_t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut cut = weights.len();
        if let Some(top_p) = p.top_p {
            let mut acc = 0.0;
            for (i, w) in weights.iter().enumerate() {
                acc += w / total;
                if acc >= top_p as f64 {
                    cut = i + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = weights[..cut].iter().sum();
        let mut u = self.rng.next_f64() * kept_total;
        for (w, (_, id)) in weights[..cut].iter().zip(&self.candidates) {
            if u < *w {
                return Ok(*id);
            }
            u -= w;
        }
        Ok(self.candidates[cut - 1].1)
    }
}
