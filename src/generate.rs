//! The generation loop as an iterator of text pieces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::state::State;
use crate::tokenizer::TextStream;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How many tokens to sample at most (0 generates nothing).
    pub max_tokens: usize,
    /// Generation ends at the first occurrence of any of these; the stop string itself is not
    /// emitted.
    pub stop: Vec<String>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Threads for the decoding steps, in a rayon pool of their own; `None` decodes in the
    /// calling pool (the prompt is always ingested there). For a decode thread count other
    /// than the prompt's. The pool is built per generation (thread start-up: tens of
    /// microseconds); a server starting many generations passes [`Self::decode_pool`] instead.
    pub decode_threads: Option<usize>,
    /// A pool, shared and kept by the caller, to decode in (e.g. one pool for all the
    /// sequences of a server, sized to leave cores to other work). Setting both this and
    /// `decode_threads` is an [`Error::InvalidParameter`].
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use performer::{GenerateOptions, Generation, Model, State};
    /// let model = Model::load("models/performer-byte")?;
    /// let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap());
    /// for prompt in ["The sea", "A road"] {
    ///     let mut state = State::new(&model);
    ///     let options = GenerateOptions { decode_pool: Some(pool.clone()), ..Default::default() };
    ///     let tokens: Vec<u32> = prompt.bytes().map(u32::from).collect();
    ///     let text: String = Generation::new(&model, &mut state, &tokens, options)?
    ///         .collect::<Result<_, _>>()?;
    ///     println!("{text}");
    /// }
    /// # Ok::<(), performer::Error>(())
    /// ```
    pub decode_pool: Option<Arc<rayon::ThreadPool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            decode_threads: None,
            decode_pool: None,
        }
    }
}

/// Timing of a generation, excluding sampling and tokenization.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationStats {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Time spent ingesting the prompt.
    pub prompt_time: Duration,
    /// Tokens sampled.
    pub generated_tokens: usize,
    /// Time spent in decode steps.
    pub decode_time: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-12)
    }

    /// Generated tokens per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.decode_time.as_secs_f64().max(1e-12)
    }
}

/// A running generation: iterate it for text pieces, each a whole number of UTF-8 characters.
///
/// The state ends up having consumed the prompt and every generated token, so a later
/// generation on the same state continues the text.
///
/// ```no_run
/// use performer::{generate::{Generation, GenerateOptions}, Model, State};
/// let model = Model::load("models/performer-byte")?;
/// let mut state = State::new(&model);
/// let prompt: Vec<u32> = "The sea".bytes().map(u32::from).collect();
/// for piece in Generation::new(&model, &mut state, &prompt, GenerateOptions::default())? {
///     print!("{}", piece?);
/// }
/// # Ok::<(), performer::Error>(())
/// ```
pub struct Generation<'a> {
    model: &'a Model,
    state: &'a mut State,
    sampler: Sampler,
    decoder: TextStream<'a>,
    history: Vec<u32>,
    pending: String,
    stop: Vec<String>,
    max_tokens: usize,
    done: bool,
    stats: GenerationStats,
    decode_pool: Option<Arc<rayon::ThreadPool>>,
}

impl<'a> Generation<'a> {
    /// Ingests `prompt` and prepares to sample. An empty prompt is allowed only when the state
    /// already holds logits (continuing a previous generation or a restored session).
    pub fn new(
        model: &'a Model,
        state: &'a mut State,
        prompt: &[u32],
        options: GenerateOptions,
    ) -> Result<Self> {
        let sampler = Sampler::new(options.sampling)?;
        if options.stop.iter().any(String::is_empty) {
            return Err(Error::invalid("stop", "stop strings must not be empty"));
        }
        let decode_pool = match (options.decode_threads, options.decode_pool) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "decode_threads",
                    "give decode_threads or decode_pool, not both",
                ))
            }
            (None, pool) => pool,
            (Some(0), None) => return Err(Error::invalid("decode_threads", "must be at least 1")),
            (Some(n), None) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| {
                        Error::invalid("decode_threads", format!("cannot start {n}: {e}"))
                    })?,
            )),
        };
        let start = Instant::now();
        if prompt.is_empty() {
            if state.logits().is_none() {
                return Err(Error::EmptyInput(
                    "the prompt is empty and the state holds no context to continue from",
                ));
            }
        } else {
            model.prefill(state, prompt)?;
        }
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            prompt_time: start.elapsed(),
            ..Default::default()
        };
        Ok(Generation {
            model,
            state,
            sampler,
            decoder: model.tokenizer().stream(prompt),
            history: prompt.to_vec(),
            pending: String::new(),
            stop: options.stop,
            max_tokens: options.max_tokens,
            done: false,
            stats,
            decode_pool,
        })
    }

    /// Timing so far.
    pub fn stats(&self) -> GenerationStats {
        self.stats
    }

    /// Token ids of the prompt and everything generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop
    /// string: text that must wait until it is known not to start a stop string.
    fn held_back(&self) -> usize {
        let p = &self.pending;
        let mut hold = 0;
        for s in &self.stop {
            for (i, _) in p.char_indices() {
                let suffix = &p[i..];
                if suffix.len() < s.len() && s.starts_with(suffix) {
                    hold = hold.max(suffix.len());
                    break;
                }
            }
        }
        hold
    }

    fn next_piece(&mut self) -> Result<Option<String>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.stats.generated_tokens >= self.max_tokens {
                self.done = true;
                let mut rest = std::mem::take(&mut self.pending);
                rest.push_str(&self.decoder.finish()?);
                return Ok((!rest.is_empty()).then_some(rest));
            }
            let logits = self.state.logits().ok_or(Error::EmptyInput(
                "the state holds no logits to sample from",
            ))?;
            let token = self.sampler.sample(logits, &self.history)?;
            self.history.push(token);
            self.stats.generated_tokens += 1;
            let t = Instant::now();
            let (model, state) = (self.model, &mut *self.state);
            match &self.decode_pool {
                Some(pool) => pool.install(|| model.step(state, token).map(|_| ())),
                None => model.step(state, token).map(|_| ()),
            }?;
            self.stats.decode_time += t.elapsed();

            let text = self.decoder.push(token)?;
            self.pending.push_str(&text);
            if let Some(idx) = self
                .stop
                .iter()
                .filter_map(|s| self.pending.find(s.as_str()))
                .min()
            {
                self.done = true;
                let out: String = self.pending[..idx].to_string();
                self.pending.clear();
                return Ok((!out.is_empty()).then_some(out));
            }
            let emit = self.pending.len() - self.held_back();
            if emit > 0 {
                let rest = self.pending.split_off(emit);
                return Ok(Some(std::mem::replace(&mut self.pending, rest)));
            }
        }
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_piece() {
            Ok(piece) => piece.map(Ok),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
