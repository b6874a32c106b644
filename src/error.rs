//! One typed error for the whole library.
//!
//! The library never panics on bad input: malformed files, inconsistent configs, out-of-range
//! token ids and invalid sampling parameters all come back as an [`Error`]. Only the CLI turns
//! errors into messages and exit codes.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened, read, mapped or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// `config.json` is not valid JSON or a value has the wrong type.
    #[error("config: {0}")]
    Config(String),

    /// `config.json` holds a key that neither performer-pytorch nor the runtime knows.
    #[error("config: unknown key `{key}`")]
    UnknownConfigKey {
        /// The offending key.
        key: String,
    },

    /// The config (or the checkpoint) asks for a feature this runtime does not implement.
    #[error("unsupported option `{option}`: {reason}")]
    Unsupported {
        /// The option's performer-pytorch name.
        option: String,
        /// Why it is not supported.
        reason: String,
    },

    /// A config value contradicts what the weights say.
    #[error("config `{key}` = {config} contradicts the weights, which imply {weights}")]
    ConfigMismatch {
        /// The config key.
        key: String,
        /// The value in `config.json`.
        config: String,
        /// The value the tensor shapes imply.
        weights: String,
    },

    /// The safetensors container itself is malformed (header, offsets, sizes).
    #[error("{}: malformed safetensors file: {message}", path.display())]
    MalformedWeights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A tensor the model needs is not in the weights file.
    #[error("tensor `{name}` is missing from the weights file")]
    MissingTensor {
        /// The tensor's checkpoint name.
        name: String,
    },

    /// A tensor has a shape other than the config implies.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor's checkpoint name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// A tensor has a dtype the runtime cannot compute with.
    #[error("tensor `{name}`: unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    UnsupportedDtype {
        /// The tensor's checkpoint name.
        name: String,
        /// The dtype in the file.
        dtype: String,
    },

    /// A tensor holds NaN or infinite values.
    #[error("tensor `{name}` holds a non-finite value (NaN or infinity) at element {index}")]
    NonFiniteWeight {
        /// The tensor's checkpoint name.
        name: String,
        /// The flat index of the first non-finite element.
        index: usize,
    },

    /// A block-quantized weight ([`crate::quant`]) is inconsistent: its dtype, shape, scale
    /// tensor or block count disagrees with the format, or its scales are not finite; or a
    /// tensor cannot be quantized (non-finite values, a block scale beyond f16's range).
    #[error("tensor `{name}`: {message}")]
    InvalidQuantized {
        /// The tensor's checkpoint name.
        name: String,
        /// What is wrong.
        message: String,
    },

    /// A token id is outside the model's vocabulary.
    #[error("token id {token} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },

    /// An operation that needs at least one token got none.
    #[error("empty input: {0}")]
    EmptyInput(&'static str),

    /// The model cannot run at this position (absolute position embeddings end at `max_seq_len`).
    #[error("position {position} is beyond this model's max_seq_len {max_seq_len} (its {kind} position embedding is undefined there)")]
    PositionOutOfRange {
        /// The zero-based position that was asked for.
        position: usize,
        /// The model's `max_seq_len`.
        max_seq_len: usize,
        /// Which embedding ends there.
        kind: &'static str,
    },

    /// A sampling or generation parameter is out of its valid range.
    #[error("invalid parameter `{name}`: {message}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },

    /// The model produced NaN or infinite logits (a broken or overflowing checkpoint).
    #[error("the model produced non-finite logits at position {position}")]
    NonFiniteLogits {
        /// The position whose logits were non-finite.
        position: usize,
    },

    /// A generation constraint ([`crate::constraint::Constraint`]) cannot be used: a JSON
    /// schema, Lark grammar or regex that does not compile, a JSON schema keyword llguidance
    /// does not implement, or a grammar this model's tokens cannot produce. Raised before any
    /// token is generated (except the last case, found while decoding).
    #[error("invalid {kind}: {message}")]
    InvalidConstraint {
        /// `"JSON schema"`, `"Lark grammar"`, `"regex"` or `"constraint"`.
        kind: &'static str,
        /// What is wrong (an unsupported schema keyword is named).
        message: String,
    },

    /// A chat template (the `chat` module, with the `chat` feature) cannot be read or compiled, fails while rendering
    /// (its `raise_exception`, say), or cannot continue a conversation from a stored state.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A tokenizer file could not be parsed, or a text could not be encoded or decoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A state snapshot is truncated, corrupted, or of an unknown format version.
    #[error("invalid state snapshot: {0}")]
    InvalidSnapshot(String),

    /// A state was used with a model of another shape.
    #[error("state does not fit this model: {0}")]
    StateMismatch(String),

    /// Memory for a growing buffer could not be had.
    #[error("cannot allocate {bytes} more bytes for {what}")]
    OutOfMemory {
        /// What was to grow.
        what: &'static str,
        /// The bytes asked for (saturated at `usize::MAX`).
        bytes: usize,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path` ([`Error::Io`]).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A parameter outside its domain ([`Error::InvalidParameter`]); `name` is the parameter.
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name,
            message: message.into(),
        }
    }
}
