//! Model configuration: performer-pytorch's `PerformerLM` keyword arguments plus runtime keys.
//!
//! `config.json` holds the constructor arguments under their performer-pytorch names. A missing
//! key takes performer-pytorch 1.1.4's default, or, where the tensor shapes determine it, the
//! value the weights imply ([`Origin::Inferred`]). Unknown keys are an error, and so is an option
//! the runtime does not implement: never a silently wrong answer.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, Result};

mod json;

/// Where a resolved config value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Written in `config.json`.
    Config,
    /// Absent from `config.json`; determined by the tensor shapes.
    Inferred,
    /// Absent from `config.json`; performer-pytorch 1.1.4's (or the runtime's) default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Config => "config",
            Origin::Inferred => "inferred",
            Origin::Default => "default",
        })
    }
}

/// The elementwise kernel of generalized attention (`kernel_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFn {
    /// `torch.nn.ReLU()`, performer-pytorch's default.
    Relu,
    /// `torch.nn.GELU()` (exact, erf-based).
    Gelu,
}

impl KernelFn {
    fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "relu" => Ok(KernelFn::Relu),
            "gelu" => Ok(KernelFn::Gelu),
            other => Err(Error::Unsupported {
                option: "kernel_fn".into(),
                reason: format!("`{other}` is not one of the supported kernels: relu, gelu"),
            }),
        }
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            KernelFn::Relu => "relu",
            KernelFn::Gelu => "gelu",
        }
    }
}

/// How token ids map to text (the `tokenizer` key; see [`crate::tokenizer::Tokenizer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per byte, vocabulary 256 (`"byte"`, the default).
    Byte,
    /// A Hugging Face tokenizer file in the model directory (a file name ending in `.json`,
    /// e.g. `"tokenizer.json"`), read with the runtime's `hf-tokenizer` feature.
    File(String),
}

impl TokenizerKind {
    /// `"byte"` or the file name.
    pub fn name(&self) -> &str {
        match self {
            TokenizerKind::Byte => "byte",
            TokenizerKind::File(f) => f,
        }
    }
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    /// Fixed sinusoidal embedding added to the input plus rotary q/k (performer-pytorch default).
    Rotary,
    /// A learned absolute embedding table of `max_seq_len` rows.
    Absolute,
    /// An axial (factorized) learned embedding.
    Axial,
}

/// The fully resolved configuration of a causal `PerformerLM`.
///
/// Field names and meanings are those of performer-pytorch 1.1.4. Training-only arguments
/// (dropouts, `feature_redraw_interval`, `auto_check_redraw`, `ff_chunks`) are accepted in
/// `config.json` and have no effect on inference.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub num_tokens: usize,
    /// Longest sequence the checkpoint's position tables cover.
    pub max_seq_len: usize,
    /// Model width.
    pub dim: usize,
    /// Number of layers.
    pub depth: usize,
    /// Attention heads per layer (global FAVOR+ heads plus local heads).
    pub heads: usize,
    /// Width of one head (`dim_head`, default 64, not `dim / heads`).
    pub dim_head: usize,
    /// Number of random features `m` (default `int(dim_head · ln dim_head)`).
    pub nb_features: usize,
    /// Local (windowed softmax) heads per layer.
    pub local_attn_heads: Vec<usize>,
    /// Window of the local heads.
    pub local_window_size: usize,
    /// Must be true: the runtime decodes causally.
    pub causal: bool,
    /// Feed-forward expansion factor.
    pub ff_mult: usize,
    /// Gated feed-forward (GEGLU).
    pub ff_glu: bool,
    /// Generalized attention with `kernel_fn` instead of the softmax kernel.
    pub generalized_attention: bool,
    /// The generalized-attention kernel.
    pub kernel_fn: KernelFn,
    /// ScaleNorm instead of LayerNorm in the blocks.
    pub use_scalenorm: bool,
    /// ReZero instead of a pre-norm in the blocks.
    pub use_rezero: bool,
    /// Logits use the token embedding transposed.
    pub tie_embed: bool,
    /// Rotary q/k positions (plus the fixed sinusoidal input embedding).
    pub rotary_position_emb: bool,
    /// Axial learned position embedding (when not rotary).
    pub axial_position_emb: bool,
    /// Shape of the axial embedding.
    pub axial_position_shape: Option<(usize, usize)>,
    /// Half the features of each block input come from the previous position.
    pub shift_tokens: bool,
    /// Biases on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    /// Softmax/exp feature maps without a random projection.
    pub no_projection: bool,
    /// ε of the softmax feature map (runtime key, default 1e-4).
    pub kernel_eps: f32,
    /// δ of the causal denominator (runtime key, default 1e-6).
    pub denominator_eps: f32,
    /// Tokenizer (runtime key, default byte-level).
    pub tokenizer: TokenizerKind,
    /// The block-quantized format of the linear weights (runtime key `weight_format`,
    /// written by `performer quantize`; `None`: every weight is a float tensor).
    pub weight_format: Option<crate::quant::format::QuantFormat>,
    /// Where each key's value came from, for `performer info`.
    pub origins: BTreeMap<&'static str, Origin>,
}

/// The deepest model the runtime accepts (a bound on what a config alone can make it allocate).
pub const MAX_DEPTH: usize = 1 << 16;

/// Every key `config.json` may hold. performer-pytorch's constructor arguments first.
pub const KNOWN_KEYS: &[&str] = &[
    "num_tokens",
    "max_seq_len",
    "dim",
    "depth",
    "heads",
    "dim_head",
    "local_attn_heads",
    "local_window_size",
    "causal",
    "ff_mult",
    "nb_features",
    "feature_redraw_interval",
    "reversible",
    "ff_chunks",
    "ff_glu",
    "emb_dropout",
    "ff_dropout",
    "attn_dropout",
    "generalized_attention",
    "kernel_fn",
    "use_scalenorm",
    "use_rezero",
    "cross_attend",
    "no_projection",
    "tie_embed",
    "rotary_position_emb",
    "axial_position_emb",
    "axial_position_shape",
    "auto_check_redraw",
    "qkv_bias",
    "attn_out_bias",
    "shift_tokens",
    // runtime keys
    "kernel_eps",
    "denominator_eps",
    "tokenizer",
    "weight_format",
];

/// Facts the tensor shapes determine, used to fill keys `config.json` leaves out and to catch
/// contradictions. Each is `None` when the checkpoint does not determine it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inferred {
    /// Rows of `token_emb.weight`.
    pub num_tokens: Option<usize>,
    /// Columns of `token_emb.weight`.
    pub dim: Option<usize>,
    /// Number of `performer.net.layers.{L}` blocks.
    pub depth: Option<usize>,
    /// Columns of the first projection matrix (or width of the rotary table).
    pub dim_head: Option<usize>,
    /// Rows of the first projection matrix.
    pub nb_features: Option<usize>,
    /// Rows of `to_q.weight` divided by `dim_head`.
    pub heads: Option<usize>,
    /// Rows of the position table.
    pub max_seq_len: Option<usize>,
    /// `layer_pos_emb.emb` is present.
    pub rotary_position_emb: Option<bool>,
    /// `pos_emb.weights.0` is present.
    pub axial_position_emb: Option<bool>,
    /// `to_out.weight` is absent.
    pub tie_embed: Option<bool>,
    /// `to_q.bias` is present.
    pub qkv_bias: Option<bool>,
    /// The attention `to_out.bias` is present.
    pub attn_out_bias: Option<bool>,
    /// `w1` has twice the rows `w2` has columns.
    pub ff_glu: Option<bool>,
    /// Columns of `w2` divided by `dim`.
    pub ff_mult: Option<usize>,
    /// Blocks carry a ScaleNorm gain of shape `[1]`.
    pub use_scalenorm: Option<bool>,
    /// Blocks carry a scalar ReZero gain.
    pub use_rezero: Option<bool>,
    /// Blocks nest one module deeper (`PreShiftTokens`).
    pub shift_tokens: Option<bool>,
}

impl Config {
    /// Checks the values for consistency and for options the runtime does not implement.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("num_tokens", self.num_tokens),
            ("max_seq_len", self.max_seq_len),
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("dim_head", self.dim_head),
            ("nb_features", self.nb_features),
            ("ff_mult", self.ff_mult),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("`{key}` must be positive")));
        }
        if !self.causal {
            return Err(Error::Unsupported {
                option: "causal".into(),
                reason: "the runtime streams causal models only; set \"causal\": true for a model trained with causal=True".into(),
            });
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(Error::Config(format!(
                "dim {} must be divisible by heads {} (performer-pytorch asserts it)",
                self.dim, self.heads
            )));
        }
        if self.rotary_position_emb && !self.dim_head.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "rotary embeddings need an even dim_head, found {}",
                self.dim_head
            )));
        }
        if self.rotary_position_emb && !self.dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "the sinusoidal embedding needs an even dim, found {}",
                self.dim
            )));
        }
        if self.tokenizer == TokenizerKind::Byte && self.num_tokens < 256 {
            return Err(Error::Config(format!(
                "the byte-level tokenizer needs num_tokens ≥ 256, found {}",
                self.num_tokens
            )));
        }
        if let Some(&local) = self.local_attn_heads.iter().find(|&&n| n > self.heads) {
            return Err(Error::Config(format!(
                "local_attn_heads {local} exceeds heads {}",
                self.heads
            )));
        }
        // Sizes the state and scratch are allocated from: no product may overflow, and none may
        // ask for more than 2^40 elements (a config, not the weights, could otherwise size an
        // allocation the weights never back).
        const LIMIT: usize = 1 << 40;
        let local = self.local_attn_heads.iter().any(|&n| n > 0);
        let products = [
            ("heads · dim_head", self.heads.checked_mul(self.dim_head)),
            (
                "dim · ff_mult · 2",
                self.dim
                    .checked_mul(self.ff_mult)
                    .and_then(|x| x.checked_mul(2)),
            ),
            (
                "depth · heads · nb_features · dim_head",
                self.depth
                    .checked_mul(self.heads)
                    .and_then(|x| x.checked_mul(self.nb_features.max(self.dim_head)))
                    .and_then(|x| x.checked_mul(self.dim_head)),
            ),
            (
                "depth · heads · 2 · local_window_size · dim_head",
                if local {
                    self.depth
                        .checked_mul(self.heads)
                        .and_then(|x| x.checked_mul(self.local_window_size))
                        .and_then(|x| x.checked_mul(2 * self.dim_head))
                } else {
                    Some(0)
                },
            ),
        ];
        for (what, value) in products {
            if value.is_none_or(|v| v > LIMIT) {
                return Err(Error::Config(format!(
                    "{what} is too large (over 2^40 elements)"
                )));
            }
        }
        if self.local_attn_heads.iter().any(|&n| n > 0) && self.local_window_size == 0 {
            return Err(Error::Config("local_window_size must be positive".into()));
        }
        if self.local_attn_heads.iter().any(|&n| n > 0) && !self.dim_head.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "local heads' rotary embedding needs an even dim_head, found {}",
                self.dim_head
            )));
        }
        Ok(())
    }

    /// Width of the q/k/v projections: `heads · dim_head`.
    pub fn inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }

    /// Features per global head: `nb_features`, or `dim_head` without a projection.
    pub fn feature_count(&self) -> usize {
        if self.no_projection {
            self.dim_head
        } else {
            self.nb_features
        }
    }

    /// The position limit of the model: absolute and axial embeddings end at `max_seq_len`
    /// (axial also at the product of its shape); rotary models have none.
    pub fn max_positions(&self) -> Option<usize> {
        match self.position_kind() {
            PositionKind::Rotary => None,
            PositionKind::Absolute => Some(self.max_seq_len),
            PositionKind::Axial => {
                let (a, b) = self.axial_position_shape.unwrap_or((1, self.max_seq_len));
                Some(self.max_seq_len.min(a * b))
            }
        }
    }

    /// How positions enter the model.
    pub fn position_kind(&self) -> PositionKind {
        if self.rotary_position_emb {
            PositionKind::Rotary
        } else if self.axial_position_emb {
            PositionKind::Axial
        } else {
            PositionKind::Absolute
        }
    }

    /// Hidden width of the feed-forward block.
    pub fn ff_hidden(&self) -> usize {
        self.dim * self.ff_mult
    }

    /// The origin of a key's value (for keys that were resolved).
    pub fn origin(&self, key: &str) -> Option<Origin> {
        self.origins.get(key).copied()
    }
}
