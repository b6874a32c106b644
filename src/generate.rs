//! The generation loop as an iterator of text pieces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::constraint::{Constraint, Grammar, GrammarMatcher};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::state::State;
use crate::tokenizer::{TextStream, Tokenizer};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How many tokens to sample at most (0 generates nothing).
    pub max_tokens: usize,
    /// Generation ends at the first occurrence of any of these. The stop string, and anything
    /// generated after it, is neither emitted nor left in the state: see [`StopMatcher`] for
    /// the exact rule.
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
    /// What the generated text must match (a JSON schema, any JSON object, a Lark grammar or
    /// a regex; runtime feature `constraints`, see [`crate::constraint`]). Each token is
    /// sampled among those the grammar allows, and generation ends when the grammar is
    /// complete (it accepts and allows nothing more). An invalid constraint is an
    /// [`Error::InvalidConstraint`] from [`Generation::new`], before the prompt is ingested.
    /// A `max_tokens` reached first cuts the text, which may then not match.
    pub constraint: Option<Constraint>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            decode_threads: None,
            decode_pool: None,
            constraint: None,
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

/// What the caller of [`StopMatcher::push`] does with the state before stepping the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// Nothing to do (no checkpoint is needed, or the one held stays).
    Keep,
    /// Fork the state now, before stepping the token, and hold the fork as the checkpoint
    /// (replacing none: a matcher asks for one only when none is held).
    Take,
    /// Drop the held checkpoint: everything up to this token is emitted text.
    Release,
}

/// What the caller does after [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopAction {
    /// No stop string was completed: apply the [`Checkpoint`] instruction, then step the
    /// token into the state as usual, emit the text, and sample the next token.
    Step(Checkpoint),
    /// A stop string was completed; generation ends. Do not step the pushed token. If
    /// `restore`, replace the state by the held checkpoint; then step each token of `replay`
    /// (in order, as decoding steps). The state then holds exactly the prompt and the tokens
    /// whose text was returned.
    Stop {
        /// Replace the state by the checkpoint taken on [`Checkpoint::Take`].
        restore: bool,
        /// Tokens to step after the restore (possibly none).
        replay: Vec<u32>,
    },
}

/// The result of [`StopMatcher::push`]: text that is final (never part of a stop string) and
/// what to do with the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Text to emit now (possibly empty): whole UTF-8 characters, known not to be part of a
    /// stop string.
    pub text: String,
    /// What to do with the state.
    pub action: StopAction,
}

/// Stop strings for streamed generation, with the state rollback that keeps the rule below.
/// It holds back text that may be the start of a stop string until it is known not to be,
/// and tells the caller when to checkpoint (fork) the state so that a completed stop string
/// can be taken out of it again. [`Generation`] uses it; a batched engine uses it per
/// sequence with its own states.
///
/// **The rule:** when generation stops at a stop string, the text returned is everything
/// before the stop string, and the state has consumed exactly the prompt followed by the
/// generated tokens of that text: neither the stop string nor anything generated after it.
/// A continuation from that state (or from a snapshot of it) therefore continues the
/// returned text itself, as if the stop string had never been sampled. Precisely, the state
/// holds the generated tokens whose bytes come before the first byte of the stop string, and
/// the returned text is their decoding: for valid UTF-8 exactly the text, and bytes that are
/// not valid UTF-8 are in the state and come out as U+FFFD, as everywhere. (A token that
/// carries no text, from a vocabulary larger than the bytes, is kept when it comes before
/// the stop string.)
///
/// Cost: one fork of the state ([`crate::State::fork`], a copy of a few megabytes at most)
/// each time held-back text begins, and on a stop at most as many re-steps as the
/// held-back text has tokens (usually none: the state is restored to the fork taken just
/// before the stop string began). With no stop strings nothing is forked.
///
/// Protocol, per sampled token:
///
/// ```no_run
/// use performer::generate::{Checkpoint, StopAction, StopMatcher};
/// use performer::{Model, State};
/// # fn sample(_: &[f32]) -> u32 { 0 }
/// let model = Model::load("models/performer-byte")?;
/// let mut state = State::new(&model);
/// model.prefill(&mut state, &[72, 105])?;
/// let mut stops = StopMatcher::new(vec!["\n\n".into()])?; // or with_tokenizer(…, model.tokenizer(), …)
/// let mut checkpoint: Option<State> = None;
/// let mut out = String::new();
/// for _ in 0..100 {
///     let token = sample(state.logits().unwrap());
///     let pushed = stops.push(token)?;
///     out.push_str(&pushed.text);
///     match pushed.action {
///         StopAction::Step(c) => {
///             match c {
///                 Checkpoint::Take => checkpoint = Some(state.fork()),
///                 Checkpoint::Release => checkpoint = None,
///                 Checkpoint::Keep => {}
///             }
///             model.step(&mut state, token)?;
///         }
///         StopAction::Stop { restore, replay } => {
///             if restore {
///                 state = checkpoint.take().unwrap();
///             }
///             for t in replay {
///                 model.step(&mut state, t)?;
///             }
///             break;
///         }
///     }
/// }
/// out.push_str(&stops.finish()?); // at the token limit: the held-back text, and the state
///                                // has consumed every token
/// # Ok::<(), performer::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    decoder: TextStream,
    /// Decoded text not yet emitted (a possible stop-string prefix).
    pending: String,
    /// Bytes emitted since the checkpoint.
    base: usize,
    /// Tokens since the checkpoint: (token, offset in the text since the checkpoint at which
    /// its byte's character begins).
    since: Vec<(u32, usize)>,
    /// Whether the caller holds a checkpoint.
    holding: bool,
    /// Whether any stop string has a non-ASCII character.
    multibyte: bool,
}

impl StopMatcher {
    /// A matcher for these stop strings over byte-level tokens (none: every token's text is
    /// emitted at once and no checkpoint is ever asked for). An empty stop string is an
    /// [`Error::InvalidParameter`].
    pub fn new(stops: Vec<String>) -> Result<Self> {
        Self::with_tokenizer(stops, &Tokenizer::default(), &[])
    }

    /// A matcher over the tokens of `tokenizer` (a model's, [`Model::tokenizer`]) that follow
    /// `context` (the prompt; see [`Tokenizer::stream`]). With a tokenizer whose tokens hold
    /// several characters, a token whose text begins before the stop string is kept in the
    /// state even when the stop string begins inside its text.
    pub fn with_tokenizer(
        stops: Vec<String>,
        tokenizer: &Tokenizer,
        context: &[u32],
    ) -> Result<Self> {
        if stops.iter().any(String::is_empty) {
            return Err(Error::invalid("stop", "stop strings must not be empty"));
        }
        Ok(StopMatcher {
            multibyte: stops.iter().any(|s| !s.is_ascii()),
            stops,
            decoder: tokenizer.stream(context),
            pending: String::new(),
            base: 0,
            since: Vec::new(),
            holding: false,
        })
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop
    /// string: text that must wait until it is known not to start a stop string.
    fn held_back(&self) -> usize {
        let p = &self.pending;
        let mut hold = 0;
        for s in &self.stops {
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

    /// Takes a sampled token (not yet stepped into the state) and says what to emit and
    /// what to do with the state (see the type's docs for the protocol). An error is the
    /// tokenizer's (decoding).
    pub fn push(&mut self, token: u32) -> Result<Pushed> {
        // Ids without text (past the byte range, or special tokens) add nothing.
        let piece = self.decoder.push(token)?;
        self.pending.push_str(&piece);
        let clean = self.decoder.is_empty();
        if self.stops.is_empty() {
            return Ok(Pushed {
                text: std::mem::take(&mut self.pending),
                action: StopAction::Step(Checkpoint::Keep),
            });
        }
        // Where this token's own byte lands in the text: the decoder emits text in order,
        // and what a push emits belongs to earlier bytes except, when nothing is left
        // pending, its last character, which holds this byte. A byte still pending lands
        // at the end of the text so far, and so does a token without text.
        // (With multi-character tokens: where the text this push completed begins.)
        let end = self.base + self.pending.len();
        let own = if !clean || piece.is_empty() {
            end
        } else if self.decoder.is_byte_level() {
            end - self.pending.chars().last().map_or(0, char::len_utf8)
        } else {
            end - piece.len().min(self.pending.len())
        };
        self.since.push((token, own));
        if let Some(idx) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let cut = self.base + idx;
            // Starts are non-decreasing: the tokens to keep are a prefix.
            let keep = self.since.partition_point(|&(_, own)| own < cut);
            let stepped = self.since.len() - 1;
            let action = if self.holding && keep < stepped {
                StopAction::Stop {
                    restore: true,
                    replay: self.since[..keep].iter().map(|&(t, _)| t).collect(),
                }
            } else {
                // The state already holds the tokens to keep, and maybe the pushed one.
                StopAction::Stop {
                    restore: false,
                    replay: self.since[stepped..keep].iter().map(|&(t, _)| t).collect(),
                }
            };
            let text = self.pending[..idx].to_string();
            self.reset();
            return Ok(Pushed { text, action });
        }
        let hold = self.held_back();
        let text = self
            .pending
            .drain(..self.pending.len() - hold)
            .collect::<String>();
        self.base += text.len();
        // A partial character can only begin a stop string that is not all ASCII.
        let needed = hold > 0 || (!clean && self.multibyte);
        let checkpoint = match (needed, self.holding) {
            (true, true) => Checkpoint::Keep,
            (true, false) => {
                // The checkpoint is the state before this token, which is all `since` holds
                // (offsets were counted from it: nothing was pending before).
                self.holding = true;
                Checkpoint::Take
            }
            (false, holding) => {
                self.since.clear();
                self.base = 0;
                self.holding = false;
                if holding {
                    Checkpoint::Release
                } else {
                    Checkpoint::Keep
                }
            }
        };
        Ok(Pushed {
            text,
            action: StopAction::Step(checkpoint),
        })
    }

    /// How many of the pushed tokens, counted from the latest, have text that is still held
    /// back (not yet returned by [`StopMatcher::push`]): a caller that reports per-token data
    /// (log-probabilities) with the text sends it for the tokens before those. Zero when
    /// nothing is held back.
    pub fn held_tokens(&self) -> usize {
        if !self.holding {
            return 0;
        }
        // A token's character begins at `own`; characters are emitted whole, so the tokens
        // whose character begins at or after the emitted length are the held ones.
        self.since.len() - self.since.partition_point(|&(_, own)| own < self.base)
    }

    /// Ends the stream (the token limit was reached): returns the held-back text and any
    /// partial character (as U+FFFD). The state keeps every token stepped so far; a held
    /// checkpoint can be dropped. (A stop string that only the U+FFFD of a partial character
    /// at the very end would complete is not matched.)
    pub fn finish(&mut self) -> Result<String> {
        let mut rest = std::mem::take(&mut self.pending);
        rest.push_str(&self.decoder.finish()?);
        self.reset();
        Ok(rest)
    }

    fn reset(&mut self) {
        self.pending.clear();
        self.decoder.reset();
        self.since.clear();
        self.base = 0;
        self.holding = false;
    }
}

/// A running generation: iterate it for text pieces, each a whole number of UTF-8 characters.
///
/// The state ends up having consumed the prompt and every generated token whose text was
/// returned, so a later generation on the same state continues the text. When a stop string
/// ends the generation, the stop string and anything sampled with it are not in the state
/// (the rule is spelled out at [`StopMatcher`]).
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
    stops: StopMatcher,
    checkpoint: Option<State>,
    history: Vec<u32>,
    max_tokens: usize,
    done: bool,
    stats: GenerationStats,
    decode_pool: Option<Arc<rayon::ThreadPool>>,
    grammar: Option<GrammarMatcher>,
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
        Self::with_progress(model, state, prompt, options, &mut |_| {})
    }

    /// [`Generation::new`], calling `progress(tokens ingested)` while the prompt is ingested
    /// (see [`Model::prefill_with_progress`]): for a progress bar on long prompts.
    pub fn with_progress(
        model: &'a Model,
        state: &'a mut State,
        prompt: &[u32],
        options: GenerateOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        let sampler = Sampler::new(options.sampling)?;
        let stops = StopMatcher::with_tokenizer(options.stop, model.tokenizer(), prompt)?;
        let grammar = match &options.constraint {
            Some(c) => Some(Grammar::compile(c, model.tokenizer(), model.vocab_size())?.matcher()?),
            None => None,
        };
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
            model.prefill_with_progress(state, prompt, progress)?;
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
            stops,
            checkpoint: None,
            history: prompt.to_vec(),
            max_tokens: options.max_tokens,
            done: false,
            stats,
            decode_pool,
            grammar,
        })
    }

    /// Timing so far.
    pub fn stats(&self) -> GenerationStats {
        self.stats
    }

    /// Token ids of the prompt and everything generated so far; after a stop string, those
    /// the state holds (the stop string's tokens are dropped).
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// One decoding step of `token` in the decode pool (or the calling one). With `prepare`
    /// and a grammar that goes on, the grammar's next mask is computed meanwhile on another
    /// thread of the pool (`rayon::join`: on the same thread after the step when none is
    /// free), as it depends only on the tokens committed.
    fn step(&mut self, token: u32, prepare: bool) -> Result<()> {
        let t = Instant::now();
        let (model, state) = (self.model, &mut *self.state);
        let grammar = self
            .grammar
            .as_mut()
            .filter(|g| prepare && !g.is_complete());
        let run = || match grammar {
            Some(g) => rayon::join(|| model.step(state, token).map(|_| ()), || g.prepare()).0,
            None => model.step(state, token).map(|_| ()),
        };
        match &self.decode_pool {
            Some(pool) => pool.install(run),
            None => run(),
        }?;
        self.stats.decode_time += t.elapsed();
        Ok(())
    }

    fn next_piece(&mut self) -> Result<Option<String>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.stats.generated_tokens >= self.max_tokens {
                self.done = true;
                self.checkpoint = None;
                let rest = self.stops.finish()?;
                return Ok((!rest.is_empty()).then_some(rest));
            }
            let logits = self.state.logits().ok_or(Error::EmptyInput(
                "the state holds no logits to sample from",
            ))?;
            let token = match &mut self.grammar {
                None => self.sampler.sample(logits, &self.history)?,
                Some(g) => match g.mask()? {
                    Some(mask) => {
                        let token = self.sampler.sample_masked(logits, &self.history, mask)?;
                        g.commit(token)?;
                        token
                    }
                    // The grammar is complete: the state holds every returned token.
                    None => {
                        self.done = true;
                        self.checkpoint = None;
                        let rest = self.stops.finish()?;
                        return Ok((!rest.is_empty()).then_some(rest));
                    }
                },
            };
            self.stats.generated_tokens += 1;
            let pushed = self.stops.push(token)?;
            match pushed.action {
                StopAction::Step(c) => {
                    match c {
                        Checkpoint::Take => self.checkpoint = Some(self.state.fork()),
                        Checkpoint::Release => self.checkpoint = None,
                        Checkpoint::Keep => {}
                    }
                    self.history.push(token);
                    self.step(token, true)?;
                }
                StopAction::Stop { restore, replay } => {
                    self.done = true;
                    let consumed = self.state.position();
                    if restore {
                        let saved = self
                            .checkpoint
                            .take()
                            .ok_or(Error::invalid("stop", "internal: no checkpoint to restore"))?;
                        *self.state = saved;
                    }
                    let dropped = consumed - self.state.position();
                    self.history.truncate(self.history.len() - dropped);
                    for t in replay {
                        self.history.push(t);
                        self.step(t, false)?;
                    }
                    self.checkpoint = None;
                }
            }
            if !pushed.text.is_empty() {
                return Ok(Some(pushed.text));
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
