//! Constrained decoding (structured output): a grammar's token mask applied to the logits
//! before sampling, so that every generated text matches a JSON schema, is a JSON object,
//! matches a Lark grammar or a regular expression.
//!
//! The grammar engine is [llguidance](https://crates.io/crates/llguidance) (the one llama.cpp
//! and vLLM use), behind the runtime's `constraints` cargo feature; without it, compiling a
//! constraint is an [`Error::Unsupported`] naming the feature. Its token trie is built from the
//! model's tokenizer: the byte tokenizer (one token per byte) or a `tokenizer.json` (feature
//! `hf-tokenizer`), with one extra end-of-text id past the model's vocabulary that stands for
//! "the grammar may end here" (none of our models has an end-of-text token of its own).
//!
//! Per generated token: [`GrammarMatcher::mask`] gives the allowed tokens (or `None` when the
//! grammar is complete: it accepts and allows nothing more, and generation ends there),
//! [`crate::Sampler::sample_masked`] samples among them, and [`GrammarMatcher::commit`]
//! advances the grammar. [`crate::Generation`] and the serving engine do this when a
//! constraint is given; the mask touches only the logits row of the sequence it belongs to.
//!
//! ```no_run
//! use performer::constraint::Constraint;
//! use performer::{GenerateOptions, Generation, Model, State};
//! let model = Model::load("models/performer-byte")?;
//! let mut state = State::new(&model);
//! let schema = serde_json::json!({
//!     "type": "object",
//!     "properties": {"name": {"type": "string", "maxLength": 12}},
//!     "required": ["name"]
//! });
//! let options = GenerateOptions {
//!     constraint: Some(Constraint::JsonSchema(schema)),
//!     ..Default::default()
//! };
//! let prompt: Vec<u32> = "Name: ".bytes().map(u32::from).collect();
//! let text: String = Generation::new(&model, &mut state, &prompt, options)?
//!     .collect::<Result<_, _>>()?;
//! let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
//! # Ok::<(), performer::Error>(())
//! ```

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What the generated text must match.
///
/// JSON output is compact (no whitespace between tokens) unless a schema says otherwise in
/// llguidance's `x-guidance` key (docs/structured-output.md).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Constraint {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    Json,
    /// A JSON value valid against this JSON Schema (the subset llguidance implements; any
    /// other keyword is an [`Error::InvalidConstraint`] naming it).
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect (its rule `start` is the whole output).
    Lark(String),
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
}

impl Constraint {
    /// `"JSON schema"`, `"Lark grammar"` or `"regex"`: how errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::Json | Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Lark(_) => "Lark grammar",
            Constraint::Regex(_) => "regex",
        }
    }
}

/// A set of token ids: the tokens a grammar allows next (bit `i` of the words is token `i`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
    len: usize,
}

impl TokenMask {
    /// A mask of `len` ids, none allowed.
    pub fn new(len: usize) -> Self {
        TokenMask {
            words: vec![0; len.div_ceil(32)],
            len,
        }
    }

    /// How many ids the mask covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask covers no ids.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether token `id` is allowed (ids past the mask are not).
    #[inline]
    pub fn allows(&self, id: u32) -> bool {
        (id as usize) < self.len && self.words[id as usize / 32] >> (id % 32) & 1 == 1
    }

    /// Allows or disallows token `id` (ids past the mask are ignored).
    pub fn set(&mut self, id: u32, allowed: bool) {
        if (id as usize) < self.len {
            let (w, b) = (id as usize / 32, id % 32);
            if allowed {
                self.words[w] |= 1 << b;
            } else {
                self.words[w] &= !(1 << b);
            }
        }
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Replaces the mask by the first `len` bits of `words` (bits past `len` cleared).
    #[cfg_attr(not(feature = "constraints"), allow(dead_code))]
    fn assign(&mut self, words: &[u32], len: usize) {
        self.len = len;
        self.words.clear();
        self.words.resize(len.div_ceil(32), 0);
        let n = self.words.len().min(words.len());
        self.words[..n].copy_from_slice(&words[..n]);
        if !len.is_multiple_of(32) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u32 << (len % 32)) - 1;
            }
        }
    }
}

/// A [`Constraint`] compiled for one model's tokenizer and vocabulary. Compiling checks the
/// schema or grammar (an [`Error::InvalidConstraint`] names the problem); cloning shares the
/// compiled grammar. Each generation starts its own [`GrammarMatcher`].
#[derive(Clone)]
pub struct Grammar {
    inner: Arc<imp::Compiled>,
    kind: &'static str,
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammar").field("kind", &self.kind).finish()
    }
}

impl Grammar {
    /// Compiles `constraint` for a model with `tokenizer` and `vocab_size` logits per step
    /// ([`crate::Model::tokenizer`], [`crate::Model::vocab_size`]). The token trie of a
    /// tokenizer is built once per process and reused.
    pub fn compile(
        constraint: &Constraint,
        tokenizer: &Tokenizer,
        vocab_size: usize,
    ) -> Result<Self> {
        Ok(Grammar {
            inner: Arc::new(imp::Compiled::new(constraint, tokenizer, vocab_size)?),
            kind: constraint.kind(),
        })
    }

    /// A matcher at the start of the output.
    pub fn matcher(&self) -> Result<GrammarMatcher> {
        Ok(GrammarMatcher {
            inner: self.inner.matcher()?,
            mask: TokenMask::new(self.inner.vocab_size()),
            complete: false,
            prepared: None,
        })
    }
}

/// One generation's position in a [`Grammar`]: gives the allowed tokens and takes the
/// sampled ones.
///
/// The mask depends only on the tokens committed, not on the logits, so it can be computed
/// ahead ([`Self::prepare`]) on another thread while the model steps the last token.
pub struct GrammarMatcher {
    inner: imp::Matcher,
    mask: TokenMask,
    complete: bool,
    /// The outcome of a mask computed ahead for the current position (`mask` holds it when
    /// `Ok(true)`); taken by the next [`Self::mask`], dropped by [`Self::commit`].
    prepared: Option<Result<bool>>,
}

impl fmt::Debug for GrammarMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarMatcher")
            .field("complete", &self.complete)
            .finish()
    }
}

impl GrammarMatcher {
    /// The tokens allowed next, or `None` when the grammar is complete: what was committed
    /// matches it and nothing may follow (generation ends). A grammar that is not complete
    /// but allows none of the model's tokens (a regex needing a character the tokenizer
    /// cannot produce) is an [`Error::InvalidConstraint`].
    pub fn mask(&mut self) -> Result<Option<&TokenMask>> {
        if self.complete {
            return Ok(None);
        }
        let more = match self.prepared.take() {
            Some(outcome) => outcome?,
            None => self.inner.mask(&mut self.mask)?,
        };
        match more {
            true => Ok(Some(&self.mask)),
            false => {
                self.complete = true;
                Ok(None)
            }
        }
    }

    /// Computes the mask for the current position now, for the next [`Self::mask`] to return
    /// (its error too, if it has one): what [`Self::mask`] would compute then, so the output
    /// does not change. [`crate::Generation`] and the serving engine call it on another
    /// thread of the decode pool while the model steps the token just committed. Nothing
    /// happens when the grammar is complete or the mask is computed already.
    pub fn prepare(&mut self) {
        if !self.complete && self.prepared.is_none() {
            self.prepared = Some(self.inner.mask(&mut self.mask));
        }
    }

    /// Advances the grammar by a sampled token (one the last [`Self::mask`] allowed; another
    /// is an [`Error::InvalidConstraint`]).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.prepared = None;
        if self.complete {
            return Err(Error::InvalidConstraint {
                kind: "constraint",
                message: format!("token {token} given after the grammar was complete"),
            });
        }
        self.complete = self.inner.commit(token)?;
        Ok(())
    }

    /// Whether the grammar is complete (see [`Self::mask`]).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Whether what was committed so far is a whole match (the grammar could end here).
    pub fn is_accepting(&mut self) -> Result<bool> {
        if self.complete {
            return Ok(true);
        }
        self.inner.is_accepting()
    }
}

#[cfg(feature = "constraints")]
mod imp {
    //! The llguidance side: token tries per tokenizer, grammar compilation, masks.

    #[cfg(feature = "hf-tokenizer")]
    use std::sync::Weak;
    use std::sync::{Arc, Mutex, OnceLock};

    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
    use llguidance::{ParserFactory, TokenParser};
    use serde_json::Value;

    use super::{Constraint, TokenMask};
    use crate::error::{Error, Result};
    use crate::tokenizer::Tokenizer;

    /// The bytes of the end-of-text id appended past the vocabulary (llguidance's marker of a
    /// special token, 0xFF, then a name no grammar uses).
    const EOS_BYTES: &[u8] = b"\xFF<|performer_end|>";

    /// Which tokenizer a factory was built for: the byte tokenizer, or a `tokenizer.json`
    /// (by the address of its shared instance, checked alive through the weak reference).
    enum Source {
        Byte,
        #[cfg(feature = "hf-tokenizer")]
        Hf(Weak<tokenizers::Tokenizer>),
    }

    struct CacheEntry {
        source: Source,
        vocab: usize,
        factory: Arc<ParserFactory>,
    }

    /// Token tries and grammar factories built so far (one per tokenizer and vocabulary size;
    /// a `tokenizer.json` trie takes milliseconds to build, a grammar compiles in less).
    static CACHE: OnceLock<Mutex<Vec<CacheEntry>>> = OnceLock::new();

    #[allow(unused_variables)]
    fn same_source(a: &Source, t: &Tokenizer) -> bool {
        match (a, t) {
            (Source::Byte, Tokenizer::Byte(_)) => true,
            #[cfg(feature = "hf-tokenizer")]
            (Source::Hf(w), Tokenizer::HuggingFace(t)) => {
                w.upgrade().is_some_and(|w| Arc::ptr_eq(&w, t))
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    fn alive(s: &Source) -> bool {
        match s {
            Source::Byte => true,
            #[cfg(feature = "hf-tokenizer")]
            Source::Hf(w) => w.strong_count() > 0,
        }
    }

    /// The bytes of every id below `vocab` (empty for ids without text: never allowed).
    fn token_bytes(tokenizer: &Tokenizer, vocab: usize) -> Result<(Vec<Vec<u8>>, bool)> {
        match tokenizer {
            Tokenizer::Byte(_) => Ok((
                (0..vocab)
                    .map(|i| if i < 256 { vec![i as u8] } else { Vec::new() })
                    .collect(),
                // Byte tokens: the greedy tokenization is the only one.
                true,
            )),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => {
                let json = t
                    .to_string(false)
                    .map_err(|e| Error::Tokenizer(format!("serializing tokenizer.json: {e}")))?;
                let value: Value = serde_json::from_str(&json)
                    .map_err(|e| Error::Tokenizer(format!("re-reading tokenizer.json: {e}")))?;
                let mut words = llguidance::token_bytes_from_tokenizer_json(&value)
                    .map_err(|e| Error::Tokenizer(format!("token bytes for llguidance: {e}")))?;
                words.resize(vocab, Vec::new());
                Ok((words, false))
            }
        }
    }

    fn factory(tokenizer: &Tokenizer, vocab: usize) -> Result<Arc<ParserFactory>> {
        let cache = CACHE.get_or_init(Default::default);
        {
            let mut entries = cache.lock().unwrap_or_else(|e| e.into_inner());
            entries.retain(|e| alive(&e.source));
            if let Some(e) = entries
                .iter()
                .find(|e| e.vocab == vocab && same_source(&e.source, tokenizer))
            {
                return Ok(e.factory.clone());
            }
        }
        let (mut words, canonical) = token_bytes(tokenizer, vocab)?;
        let eos = u32::try_from(vocab)
            .map_err(|_| Error::invalid("vocab_size", "too large for a token trie"))?;
        words.push(EOS_BYTES.to_vec());
        let info = TokRxInfo::new(eos + 1, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = if canonical {
            // The byte tokenizer's only tokenization is the greedy one; llguidance may then
            // force tokens.
            Arc::new(ByteEnv(trie))
        } else {
            Arc::new(ApproximateTokEnv::new(trie))
        };
        let mut f = ParserFactory::new_simple(&env).map_err(|e| Error::InvalidConstraint {
            kind: "constraint",
            message: format!("building the token trie: {e}"),
        })?;
        f.quiet();
        let f = Arc::new(f);
        let source = match tokenizer {
            Tokenizer::Byte(_) => Source::Byte,
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => Source::Hf(Arc::downgrade(t)),
        };
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(CacheEntry {
                source,
                vocab,
                factory: f.clone(),
            });
        Ok(f)
    }

    /// The byte tokenizer's environment: greedy tokenization is canonical.
    struct ByteEnv(TokTrie);

    impl llguidance::toktrie::TokenizerEnv for ByteEnv {
        fn tok_trie(&self) -> &TokTrie {
            &self.0
        }

        fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
            self.0.greedy_tokenize(s)
        }

        fn tokenize_is_canonical(&self) -> bool {
            true
        }
    }

    /// Names an unsupported schema keyword the way users write it; other messages as they are.
    fn describe(kind: &'static str, e: impl std::fmt::Display) -> Error {
        let text = format!("{e:#}");
        let message = match text.find("Unimplemented keys: ") {
            Some(at) => {
                let keys = text[at + "Unimplemented keys: ".len()..]
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim();
                format!("unsupported keyword {keys} (llguidance does not implement it)")
            }
            // One line: llguidance's messages may span several.
            None => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        };
        Error::InvalidConstraint { kind, message }
    }

    pub(super) struct Compiled {
        parser: TokenParser,
        vocab: usize,
    }

    impl Compiled {
        pub(super) fn new(c: &Constraint, tokenizer: &Tokenizer, vocab: usize) -> Result<Self> {
            if vocab == 0 {
                return Err(Error::invalid("vocab_size", "must be at least 1"));
            }
            let grammar = match c {
                Constraint::Json => TopLevelGrammar::from_json_schema(compact(
                    serde_json::json!({"type": "object"}),
                )),
                Constraint::JsonSchema(schema) => {
                    TopLevelGrammar::from_json_schema(compact(schema.clone()))
                }
                Constraint::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
                Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            };
            let f = factory(tokenizer, vocab)?;
            let parser = f
                .create_parser(grammar)
                .map_err(|e| describe(c.kind(), e))?;
            Ok(Compiled { parser, vocab })
        }

        pub(super) fn vocab_size(&self) -> usize {
            self.vocab
        }

        pub(super) fn matcher(&self) -> Result<Matcher> {
            let m = llguidance::Matcher::new(Ok(self.parser.clone()));
            if let Some(e) = m.get_error() {
                return Err(Error::InvalidConstraint {
                    kind: "constraint",
                    message: e,
                });
            }
            Ok(Matcher {
                m,
                vocab: self.vocab,
            })
        }
    }

    /// Compact JSON: no whitespace between tokens (a model could otherwise spend its tokens
    /// on whitespace), unless the schema sets llguidance's own `x-guidance` options.
    fn compact(mut schema: Value) -> Value {
        if let Value::Object(map) = &mut schema {
            map.entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
        }
        schema
    }

    pub(super) struct Matcher {
        m: llguidance::Matcher,
        vocab: usize,
    }

    fn runtime_err(e: impl std::fmt::Display) -> Error {
        Error::InvalidConstraint {
            kind: "constraint",
            message: e.to_string(),
        }
    }

    impl Matcher {
        /// Fills `mask` with the allowed model tokens; `false` when the grammar is complete.
        pub(super) fn mask(&mut self, mask: &mut TokenMask) -> Result<bool> {
            if self.m.is_stopped() {
                return self.stopped();
            }
            let vob = self.m.compute_mask().map_err(runtime_err)?;
            mask.assign(vob.as_slice(), self.vocab);
            if mask.count() > 0 {
                return Ok(true);
            }
            // Only the end-of-text id (or nothing) is allowed.
            if self.m.is_accepting().map_err(runtime_err)? {
                Ok(false)
            } else {
                Err(runtime_err(
                    "the grammar allows none of this model's tokens here (a character the \
                     tokenizer cannot produce?)",
                ))
            }
        }

        fn stopped(&self) -> Result<bool> {
            match self.m.get_error() {
                Some(e) => Err(runtime_err(e)),
                None => Ok(false),
            }
        }

        /// Takes a token; `true` when the grammar is then complete.
        pub(super) fn commit(&mut self, token: u32) -> Result<bool> {
            if token as usize >= self.vocab {
                return Err(Error::TokenOutOfRange {
                    token,
                    vocab: self.vocab,
                });
            }
            self.m.consume_token(token).map_err(runtime_err)?;
            if self.m.is_stopped() {
                self.stopped()?;
                return Ok(true);
            }
            Ok(false)
        }

        pub(super) fn is_accepting(&mut self) -> Result<bool> {
            self.m.is_accepting().map_err(runtime_err)
        }
    }
}

#[cfg(not(feature = "constraints"))]
mod imp {
    //! Without the `constraints` feature: compiling is an error, so nothing else is reachable.

    use super::{Constraint, TokenMask};
    use crate::error::{Error, Result};
    use crate::tokenizer::Tokenizer;

    pub(super) enum Compiled {}
    pub(super) enum Matcher {}

    impl Compiled {
        pub(super) fn new(c: &Constraint, _: &Tokenizer, _: usize) -> Result<Self> {
            Err(Error::Unsupported {
                option: "constraint".into(),
                reason: format!(
                    "a {} constraint needs the runtime built with its `constraints` cargo \
                     feature",
                    c.kind()
                ),
            })
        }

        pub(super) fn vocab_size(&self) -> usize {
            match *self {}
        }

        pub(super) fn matcher(&self) -> Result<Matcher> {
            match *self {}
        }
    }

    impl Matcher {
        pub(super) fn mask(&mut self, _: &mut TokenMask) -> Result<bool> {
            match *self {}
        }

        pub(super) fn commit(&mut self, _: u32) -> Result<bool> {
            match *self {}
        }

        pub(super) fn is_accepting(&mut self) -> Result<bool> {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits() {
        let mut m = TokenMask::new(70);
        assert_eq!(m.count(), 0);
        m.set(0, true);
        m.set(33, true);
        m.set(69, true);
        m.set(70, true); // past the end: ignored
        assert!(m.allows(0) && m.allows(33) && m.allows(69));
        assert!(!m.allows(1) && !m.allows(70) && !m.allows(u32::MAX));
        assert_eq!(m.count(), 3);
        m.set(33, false);
        assert_eq!(m.count(), 2);
        m.assign(&[u32::MAX, u32::MAX, u32::MAX], 40);
        assert_eq!(m.count(), 40, "bits past len are cleared");
    }
}
