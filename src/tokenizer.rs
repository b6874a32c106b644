//! Tokenizers and UTF-8-safe streaming decoding.
//!
//! [`Tokenizer`] is what a model's `config.json` asks for (the `tokenizer` key): the
//! byte-level tokenizer (the default), or, with the runtime's `hf-tokenizer` cargo feature, a
//! Hugging Face `tokenizer.json` file in the model directory. [`TextStream`] turns generated
//! token ids into text one token at a time without ever emitting part of a character.

use std::path::Path;
#[cfg(feature = "hf-tokenizer")]
use std::sync::Arc;

use crate::config::TokenizerKind;
use crate::error::{Error, Result};

/// A model's tokenizer: text to token ids and back.
///
/// ```
/// use performer::tokenizer::Tokenizer;
/// let t = Tokenizer::Byte(Default::default());
/// let ids = t.encode("né")?;
/// assert_eq!(ids, [110, 195, 169]);
/// assert_eq!(t.decode(&ids)?, "né");
/// # Ok::<(), performer::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Tokenizer {
    /// One token per byte ([`ByteTokenizer`]).
    Byte(ByteTokenizer),
    /// A Hugging Face `tokenizer.json` (feature `hf-tokenizer`).
    #[cfg(feature = "hf-tokenizer")]
    HuggingFace(Arc<tokenizers::Tokenizer>),
}

impl Default for Tokenizer {
    fn default() -> Self {
        Tokenizer::Byte(ByteTokenizer)
    }
}

/// A text split into tokens, with where each token's text ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokenized {
    /// The token ids.
    pub ids: Vec<u32>,
    /// `ends[i]`: the byte offset in the text where token `i`'s text ends (non-decreasing;
    /// tokens a tokenizer adds, such as a beginning-of-sequence token, cover no bytes).
    pub ends: Vec<usize>,
}

impl Tokenized {
    /// Bytes of text that tokens `from..to` stand for (`ends[to − 1] − ends[from − 1]`, the
    /// text before token `from` excluded).
    pub fn bytes_between(&self, from: usize, to: usize) -> usize {
        let end = |i: usize| if i == 0 { 0 } else { self.ends[i - 1] };
        end(to).saturating_sub(end(from))
    }
}

impl Tokenizer {
    /// The tokenizer a config asks for; a `tokenizer.json` file is read from `dir`.
    ///
    /// Without the `hf-tokenizer` feature a `tokenizer.json` model is an
    /// [`Error::Unsupported`] naming the feature.
    pub fn load(kind: &TokenizerKind, dir: &Path) -> Result<Self> {
        match kind {
            TokenizerKind::Byte => Ok(Tokenizer::Byte(ByteTokenizer)),
            TokenizerKind::File(name) => Self::load_file(&dir.join(name)),
        }
    }

    /// Reads a Hugging Face `tokenizer.json` file.
    #[cfg(feature = "hf-tokenizer")]
    pub fn load_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let t = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer::HuggingFace(Arc::new(t)))
    }

    /// Reads a Hugging Face `tokenizer.json` file: without the `hf-tokenizer` feature, an
    /// [`Error::Unsupported`].
    #[cfg(not(feature = "hf-tokenizer"))]
    pub fn load_file(path: &Path) -> Result<Self> {
        Err(Error::Unsupported {
            option: "tokenizer".into(),
            reason: format!(
                "{} is a Hugging Face tokenizer file, which needs the runtime built with its \
                 `hf-tokenizer` cargo feature",
                path.display()
            ),
        })
    }

    /// Whether this is the byte-level tokenizer (one token per byte, any bytes).
    pub fn is_byte_level(&self) -> bool {
        matches!(self, Tokenizer::Byte(_))
    }

    /// `"byte"` or `"tokenizer.json"` (Hugging Face).
    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Byte(_) => "byte",
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(_) => "tokenizer.json",
        }
    }

    /// The number of token ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte(_) => 256,
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids of a text. A Hugging Face tokenizer applies its post-processor (special
    /// tokens such as a beginning-of-sequence token, if its file defines them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenize(text)?.ids)
    }

    /// Token ids of a text without the post-processor's special tokens (no
    /// beginning-of-sequence token is added): for text that continues a context, such as a
    /// rendered chat template (which writes its special tokens itself, as Hugging Face's
    /// `apply_chat_template` expects). Special tokens written in the text are still matched.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Byte(b) => Ok(b.encode(text)),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => Ok(t
                .encode(text, false)
                .map_err(|e| Error::Tokenizer(format!("encoding: {e}")))?
                .get_ids()
                .to_vec()),
        }
    }

    /// Token ids of raw bytes: the byte tokenizer takes any bytes; other tokenizers need
    /// UTF-8 text ([`Error::InvalidParameter`] `text` otherwise).
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Byte(b) => Ok(b.encode_bytes(bytes)),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(_) => self.encode(std::str::from_utf8(bytes).map_err(|e| {
                Error::invalid(
                    "text",
                    format!("this model's tokenizer needs UTF-8 text: {e}"),
                )
            })?),
        }
    }

    /// Token ids of a text with the byte offset where each token's text ends.
    pub fn tokenize(&self, text: &str) -> Result<Tokenized> {
        match self {
            Tokenizer::Byte(b) => Ok(Tokenized {
                ids: b.encode(text),
                ends: (1..=text.len()).collect(),
            }),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => {
                let enc = t
                    .encode(text, true)
                    .map_err(|e| Error::Tokenizer(format!("encoding: {e}")))?;
                let mut end = 0;
                let ends = enc
                    .get_offsets()
                    .iter()
                    .map(|&(_, e)| {
                        end = end.max(e);
                        end
                    })
                    .collect();
                Ok(Tokenized {
                    ids: enc.get_ids().to_vec(),
                    ends,
                })
            }
        }
    }

    /// The text of token ids. Ids the tokenizer does not know (a model's vocabulary may be
    /// larger) and special tokens carry no text; bytes that are not UTF-8 become U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Byte(b) => {
                let bytes: Vec<u8> = tokens.iter().filter_map(|&t| b.token_byte(t)).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => t
                .decode(tokens, true)
                .map_err(|e| Error::Tokenizer(format!("decoding: {e}"))),
        }
    }

    /// A streaming decoder for tokens that follow `context` (for example the prompt: some
    /// tokenizers write a token differently at the start of a text). Its pieces, concatenated,
    /// are the text the tokens add to `context`.
    #[cfg_attr(not(feature = "hf-tokenizer"), allow(unused_variables))]
    pub fn stream(&self, context: &[u32]) -> TextStream {
        match self {
            Tokenizer::Byte(_) => TextStream(Inner::Byte(Utf8Stream::default())),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => {
                // A few tokens of context are enough for a decoder to know it is not at the
                // start; context whose text ends in an incomplete character is not used.
                let tail = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
                let (ids, read) = match t.decode(tail, true) {
                    Ok(s) if !s.ends_with(char::REPLACEMENT_CHARACTER) => (tail.to_vec(), s.len()),
                    _ => (Vec::new(), 0),
                };
                TextStream(Inner::Hf {
                    tokenizer: t.clone(),
                    read: ids.len(),
                    read_text_len: read,
                    ids,
                })
            }
        }
    }
}

/// Tokens of context a streaming decoder keeps before the text it emits.
#[cfg(feature = "hf-tokenizer")]
const CONTEXT_TOKENS: usize = 4;

/// Decodes generated tokens one at a time into text pieces of whole characters. Made by
/// [`Tokenizer::stream`].
///
/// A byte-level model's bytes go through a [`Utf8Stream`]. For a Hugging Face tokenizer the
/// stream decodes the tokens since the last emitted piece together with the few before them,
/// and emits the new text once it does not end in an incomplete character (U+FFFD), so a
/// character split over several byte-level BPE tokens comes out whole, and a decoder that
/// writes a token differently at the start of a text (SentencePiece's `▁`) sees its context.
#[derive(Debug, Clone)]
pub struct TextStream(Inner);

#[derive(Debug, Clone)]
enum Inner {
    Byte(Utf8Stream),
    #[cfg(feature = "hf-tokenizer")]
    Hf {
        tokenizer: Arc<tokenizers::Tokenizer>,
        /// The decoding window: context, then tokens whose text is not emitted yet.
        ids: Vec<u32>,
        /// `ids[..read]` is context (text already emitted, or the prompt's).
        read: usize,
        /// The length of the text of `ids[..read]`.
        read_text_len: usize,
    },
}

impl TextStream {
    /// Adds a token and returns the text it completes (often empty, never part of a
    /// character).
    pub fn push(&mut self, token: u32) -> Result<String> {
        match &mut self.0 {
            // Ids past the byte range (a larger vocabulary) carry no text.
            Inner::Byte(s) => Ok(u8::try_from(token).map(|b| s.push(b)).unwrap_or_default()),
            #[cfg(feature = "hf-tokenizer")]
            Inner::Hf {
                tokenizer,
                ids,
                read,
                read_text_len,
            } => {
                ids.push(token);
                let text = decode_hf(tokenizer, ids)?;
                if text.len() <= *read_text_len
                    || text.ends_with(char::REPLACEMENT_CHARACTER)
                    || !text.is_char_boundary(*read_text_len)
                {
                    return Ok(String::new());
                }
                let piece = text[*read_text_len..].to_string();
                // The emitted tokens become the context of the next window.
                ids.drain(..*read);
                *read = ids.len();
                *read_text_len = decode_hf(tokenizer, ids)?.len();
                Ok(piece)
            }
        }
    }

    /// The text still held back at the end (an incomplete character, as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        match &mut self.0 {
            Inner::Byte(s) => Ok(s.finish()),
            #[cfg(feature = "hf-tokenizer")]
            Inner::Hf {
                tokenizer,
                ids,
                read,
                read_text_len,
            } => {
                let text = decode_hf(tokenizer, ids)?;
                let piece = text.get(*read_text_len..).unwrap_or_default().to_string();
                // Everything is emitted: the whole window is context from now on.
                *read = ids.len();
                *read_text_len = text.len();
                Ok(piece)
            }
        }
    }
}

impl TextStream {
    /// Whether nothing is pending: every token pushed so far came out as text.
    pub fn is_empty(&self) -> bool {
        match &self.0 {
            Inner::Byte(s) => s.is_empty(),
            #[cfg(feature = "hf-tokenizer")]
            Inner::Hf { ids, read, .. } => *read == ids.len(),
        }
    }

    /// Whether the tokens are bytes (a token's text is at most its one byte).
    pub fn is_byte_level(&self) -> bool {
        matches!(self.0, Inner::Byte(_))
    }

    /// Drops pending tokens and context: the next token starts a new text.
    pub fn reset(&mut self) {
        match &mut self.0 {
            Inner::Byte(s) => *s = Utf8Stream::default(),
            #[cfg(feature = "hf-tokenizer")]
            Inner::Hf {
                ids,
                read,
                read_text_len,
                ..
            } => {
                ids.clear();
                (*read, *read_text_len) = (0, 0);
            }
        }
    }
}

#[cfg(feature = "hf-tokenizer")]
fn decode_hf(t: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String> {
    t.decode(ids, true)
        .map_err(|e| Error::Tokenizer(format!("decoding: {e}")))
}

/// The byte-level tokenizer: token id = byte value, vocabulary 256.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Token ids of a string's UTF-8 bytes.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_bytes(text.as_bytes())
    }

    /// Token ids of raw bytes (a prompt file need not be valid UTF-8).
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        bytes.iter().map(|&b| b as u32).collect()
    }

    /// The byte of a token id, or `None` for ids outside 0..256.
    pub fn token_byte(&self, token: u32) -> Option<u8> {
        u8::try_from(token).ok()
    }
}

/// Turns a stream of bytes into text without ever emitting half a character.
///
/// Complete characters are returned as soon as their last byte arrives; an incomplete sequence
/// waits for more bytes; invalid bytes become U+FFFD, as `String::from_utf8_lossy` does.
///
/// ```
/// use performer::tokenizer::Utf8Stream;
/// let mut s = Utf8Stream::default();
/// assert_eq!(s.push(0xC3), ""); // first half of "é"
/// assert_eq!(s.push(0xA9), "é");
/// assert_eq!(s.finish(), "");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds one byte and returns the text it completes (often empty).
    pub fn push(&mut self, byte: u8) -> String {
        self.pending.push(byte);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("checked valid prefix"),
                    );
                    match e.error_len() {
                        // An incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whether no partial character is pending (every byte pushed so far came out as text).
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Flushes a trailing incomplete sequence as U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
