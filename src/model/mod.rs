//! The model: config plus weights laid over the mapping, and the forward passes.
//!
//! Read in this order:
//! - this file: the [`Model`] struct, loading a model directory, and its public accessors;
//! - `layers.rs`: the building blocks (linear layers, norms, positions), which know no model
//!   and no state;
//! - `step.rs`: the decode step, one token through every layer ([`Model::step`]);
//! - `attend.rs`: how heads attend, one interface for the step and the row path;
//! - [`rows`]: the same layers on a block of rows, for chunked prefill ([`Model::prefill`])
//!   and batched decode ([`Model::step_batch`]);
//! - `reference.rs`: the plain full-sequence pass ([`Model::forward_reference`]: scalar
//!   kernels, attention evaluated from its definition) that the tests hold the streaming path
//!   against.

use std::path::Path;

use crate::attention::{FeatureKind, FeatureMap};
use crate::config::{Config, PositionKind};
use crate::error::{Error, Result};
use crate::kernels::quant::QuantMethod;
use crate::quant::format::{QuantFormat, QuantTensor};
use crate::state::{Precision, State, StateShape};
use crate::weights::names;
use crate::weights::{Dtype, Tensor, WeightFile};

pub(crate) mod attend;
pub(crate) mod layers;
mod reference;
pub mod rows;
mod step;

pub use layers::LAYER_NORM_EPS;
use layers::{load_tensor, Layer, LayerNorm, Linear, Positions, Weight};

/// Options applied on top of `config.json` when loading.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Overrides `kernel_eps` (ε of the softmax feature map); finite and at least 0, else
    /// [`Error::InvalidParameter`].
    pub kernel_eps: Option<f32>,
    /// Overrides `denominator_eps` (δ of the causal denominator); finite and at least 0.
    pub denominator_eps: Option<f32>,
    /// Copy the weights into huge-page memory instead of mapping the file
    /// ([`WeightFile::open_huge_pages`]), at the cost of reading the whole file at load and a
    /// private copy of it in memory. The default mapping already gets 2 MiB pages when the
    /// file is read from disk; the copy is for a file the page cache holds in small pages (just
    /// written or copied), which [`WeightFile::page_report`] shows.
    pub huge_pages: bool,
    /// How the products over quantized weights are computed ([`QuantMethod`]); `None` is the
    /// default, [`QuantMethod::Int8`]. [`QuantMethod::Dequant`] gives the logits of the
    /// dequantized f32 model instead, more slowly.
    /// Ignored for a float model.
    pub quant_kernel: Option<QuantMethod>,
    /// Keep quantized weights in the mapped row-major layout only: no copy with their rows
    /// packed four at a time ([`Model::use_packed_rows`]). Saves the quantized weights' size
    /// in memory; decoding's one-row products run slower. Ignored for a float model.
    pub no_packed_rows: bool,
}

/// Largest `config.json` read (a config is a few hundred bytes; the cap keeps a device or
/// a huge file from being read without bound).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The two files of a model directory, `DIR/config.json` and `DIR/model.safetensors`, after
/// checking that `dir` is a directory. The error names the path: a missing directory, or a
/// path that is a file, gets the same message from every caller.
pub fn model_files(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok((dir.join("config.json"), dir.join("model.safetensors"))),
        Ok(_) => Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory: a model is a directory holding config.json and model.safetensors",
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        )),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Reads `config.json` as UTF-8 text: a regular file of at most `MAX_CONFIG_BYTES`, errors
/// naming the path.
pub fn read_config_text(path: &Path) -> Result<String> {
    let bytes = crate::fsutil::read_regular_file(path, MAX_CONFIG_BYTES)?;
    String::from_utf8(bytes).map_err(|_| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8 text"),
        )
    })
}

/// A loaded causal `PerformerLM`: immutable and shareable across threads.
///
/// ```no_run
/// use performer::{Model, State};
/// let model = Model::load("models/performer-byte")?;
/// let mut state = State::new(&model);
/// let logits = model.prefill(&mut state, b"Once upon a time".map(u32::from).as_slice())?;
/// println!("{} logits", logits.len());
/// # Ok::<(), performer::Error>(())
/// ```
#[derive(Debug)]
pub struct Model {
    pub(crate) config: Config,
    pub(crate) file: WeightFile,
    pub(crate) token_emb: Tensor,
    pub(crate) positions: Positions,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: LayerNorm,
    /// `None` with `tie_embed`: the logits use the token embedding.
    pub(crate) to_out: Option<Linear>,
    /// Hash of the architecture and the weights file, computed on first use.
    pub(crate) fingerprint: std::sync::OnceLock<u64>,
    /// The shape every state of this model has.
    pub(crate) state_shape: StateShape,
    /// The tokenizer `config.json` names.
    pub(crate) tokenizer: crate::tokenizer::Tokenizer,
}

impl Model {
    /// Loads `DIR/config.json` and `DIR/model.safetensors`.
    ///
    /// The weights file is memory-mapped: truncating or rewriting it in place while the model
    /// is loaded ends the process with `SIGBUS`. Replace a model by writing a new file and
    /// renaming it over the old one (the mapping keeps the old file).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(dir, LoadOptions::default())
    }

    /// Loads a model directory with runtime overrides.
    pub fn load_with(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let (config_path, weights) = model_files(dir.as_ref())?;
        let text = read_config_text(&config_path)?;
        let file = if options.huge_pages {
            WeightFile::open_huge_pages(weights)?
        } else {
            WeightFile::open(weights)?
        };
        let inferred = names::infer(&file);
        let mut config = Config::from_json(&text, &inferred)?;
        for (name, v) in [
            ("kernel_eps", options.kernel_eps),
            ("denominator_eps", options.denominator_eps),
        ] {
            if v.is_some_and(|e| !(e.is_finite() && e >= 0.0)) {
                return Err(Error::invalid(
                    name,
                    format!(
                        "must be finite and at least 0, got {}",
                        v.unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(e) = options.kernel_eps {
            config.kernel_eps = e;
        }
        if let Some(e) = options.denominator_eps {
            config.denominator_eps = e;
        }
        let mut model = Self::unpacked_from_parts(config, file)?;
        if let Some(method) = options.quant_kernel {
            model.use_quant_method(method);
        }
        model.use_packed_rows(!options.no_packed_rows);
        Ok(model)
    }

    /// Builds a model from a resolved config and an opened weights file, checking every
    /// tensor's presence, dtype and shape. A tokenizer file the config names is read from the
    /// weights file's directory.
    pub fn from_parts(config: Config, file: WeightFile) -> Result<Self> {
        let mut model = Self::unpacked_from_parts(config, file)?;
        model.use_packed_rows(true);
        Ok(model)
    }

    /// [`Model::from_parts`] before its quantized weights' rows are packed.
    fn unpacked_from_parts(config: Config, file: WeightFile) -> Result<Self> {
        config.validate()?;
        // An invalid PERFORMER_ISA is reported here (the kernels cannot fail; they ignore it).
        crate::kernels::isa::check_env()?;
        let c = &config;
        let dir = file.path().parent().unwrap_or(Path::new("."));
        let tokenizer = crate::tokenizer::Tokenizer::load(&c.tokenizer, dir)?;
        if tokenizer.vocab_size() > c.num_tokens {
            return Err(Error::Config(format!(
                "the tokenizer `{}` has {} tokens, more than num_tokens {}",
                c.tokenizer.name(),
                tokenizer.vocab_size(),
                c.num_tokens
            )));
        }
        let token_emb = load_tensor(&file, "token_emb.weight", &[c.num_tokens, c.dim])?;
        let positions = Positions::load(&file, c)?;
        let layers = (0..c.depth)
            .map(|l| Layer::load(&file, c, l))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::load(&file, "norm", c.dim)?;
        let state_shape = StateShape::of(c);
        let to_out = if c.tie_embed {
            None
        } else {
            Some(Linear::load(
                &file,
                "to_out",
                c.num_tokens,
                c.dim,
                true,
                c.weight_format,
            )?)
        };
        Ok(Model {
            config,
            file,
            token_emb,
            positions,
            layers,
            norm,
            to_out,
            fingerprint: std::sync::OnceLock::new(),
            state_shape,
            tokenizer,
        })
    }

    /// A hash identifying this model: its architecture (the config without the runtime
    /// epsilons) and every byte of its weights file. Computed once, on first use (it reads the
    /// whole file: about a second per few GB).
    pub fn fingerprint(&self) -> u64 {
        *self.fingerprint.get_or_init(|| {
            let mut arch = self.config.clone();
            arch.kernel_eps = 0.0;
            arch.denominator_eps = 0.0;
            arch.origins.clear();
            let text = format!("{arch:?}");
            let weights = crate::hash::hash64(self.file.bytes());
            crate::hash::hash64(text.as_bytes()) ^ weights.rotate_left(17)
        })
    }

    /// The tokenizer `config.json` names (byte-level by default).
    pub fn tokenizer(&self) -> &crate::tokenizer::Tokenizer {
        &self.tokenizer
    }

    /// The resolved config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The weights file.
    pub fn weights(&self) -> &WeightFile {
        &self.file
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.config.num_tokens
    }

    /// The method of this model's quantized products (`None` for a float model): the
    /// [`LoadOptions::quant_kernel`] it was loaded with, else [`QuantMethod::Int8`].
    pub fn quant_method(&self) -> Option<QuantMethod> {
        self.quantized().next().map(QuantTensor::method)
    }

    /// Sets the method of every quantized product of this model (what
    /// [`LoadOptions::quant_kernel`] does at load; for a model built by [`Model::from_parts`]).
    pub fn use_quant_method(&mut self, method: QuantMethod) {
        for q in self.quantized_mut() {
            q.use_method(method);
        }
    }

    /// Packs the rows of every quantized weight four at a time for decoding's one-row products
    /// where the method's kernels take them (`on`), or drops the packed copies (`!on`): see
    /// [`QuantTensor::use_packed_rows`]. [`Model::load`] packs unless
    /// [`LoadOptions::no_packed_rows`]; the logits are the same bit for bit either way.
    pub fn use_packed_rows(&mut self, on: bool) {
        for q in self.quantized_mut() {
            q.use_packed_rows(on);
        }
    }

    /// Bytes of the packed copies of the quantized weights' rows ([`Model::use_packed_rows`]):
    /// memory beside the mapping; 0 when there are none.
    pub fn packed_bytes(&self) -> usize {
        self.quantized()
            .filter_map(QuantTensor::packed)
            .map(|p| p.bytes())
            .sum()
    }

    /// Every block-quantized weight, mutably.
    fn quantized_mut(&mut self) -> impl Iterator<Item = &mut QuantTensor> {
        let layers = self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.to_q,
                &mut l.to_k,
                &mut l.to_v,
                &mut l.attn_out,
                &mut l.w1,
                &mut l.w2,
            ]
        });
        layers
            .chain(self.to_out.as_mut())
            .filter_map(|lin| match &mut lin.weight {
                Weight::Quant(q) => Some(q),
                Weight::Float(_) => None,
            })
    }

    /// Every block-quantized weight (empty for a float model).
    pub fn quantized(&self) -> impl Iterator<Item = &QuantTensor> {
        self.layers
            .iter()
            .flat_map(|l| l.quantized())
            .chain(self.to_out.iter().filter_map(Linear::quantized))
    }

    /// Weight counts per quantized format (empty for a float model).
    pub fn quantized_counts(&self) -> Vec<(QuantFormat, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        for q in self.quantized() {
            *counts.entry(q.format()).or_insert(0) += q.numel();
        }
        counts.into_iter().collect()
    }

    /// Every learned float tensor the forward pass reads (quantized weights are in
    /// [`Model::quantized`]).
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.token_emb)
            .chain(self.positions.tensors())
            .chain(self.layers.iter().flat_map(|l| l.tensors()))
            .chain(self.norm.tensors())
            .chain(self.to_out.iter().flat_map(|o| o.tensors()))
    }

    /// Number of learned parameters (buffers such as projection matrices and sinusoid tables
    /// are not parameters).
    pub fn parameter_count(&self) -> usize {
        self.tensors().map(Tensor::numel).sum::<usize>()
            + self.quantized().map(QuantTensor::numel).sum::<usize>()
    }

    /// Bytes of weights read per decoded token: every parameter but the embedding table (one
    /// row of it, unless the logits are tied to it) and but the position tables, plus the
    /// projection matrices.
    pub fn weight_bytes_per_token(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.dtype().size();
        let all: usize = self.tensors().map(bytes).sum::<usize>()
            + self.quantized().map(QuantTensor::bytes).sum::<usize>()
            + self
                .layers
                .iter()
                .map(|l| bytes(&l.projection))
                .sum::<usize>()
            - self
                .positions
                .tensors()
                .into_iter()
                .map(bytes)
                .sum::<usize>();
        if self.config.tie_embed {
            all
        } else {
            all - bytes(&self.token_emb) + self.config.dim * self.token_emb.dtype().size()
        }
    }

    /// Element counts per dtype over the parameters.
    pub fn dtype_counts(&self) -> Vec<(Dtype, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        for t in self.tensors() {
            *counts.entry(t.dtype()).or_insert(0) += t.numel();
        }
        counts.into_iter().collect()
    }

    pub(crate) fn feature_map(&self, layer: usize) -> FeatureMap<'_> {
        let c = &self.config;
        FeatureMap {
            kind: if c.no_projection {
                FeatureKind::NoProjection
            } else if c.generalized_attention {
                FeatureKind::Generalized(c.kernel_fn)
            } else {
                FeatureKind::Softmax { eps: c.kernel_eps }
            },
            projection: self.layers[layer].projection.view(),
            projection_t: &self.layers[layer].projection_t,
            m: c.feature_count(),
            d: c.dim_head,
        }
    }

    pub(crate) fn check_tokens(&self, start: usize, tokens: &[u32]) -> Result<()> {
        for &token in tokens {
            if token as usize >= self.config.num_tokens {
                return Err(Error::TokenOutOfRange {
                    token,
                    vocab: self.config.num_tokens,
                });
            }
        }
        if let Some(limit) = self.config.max_positions() {
            if start + tokens.len() > limit {
                return Err(Error::PositionOutOfRange {
                    position: limit.max(start),
                    max_seq_len: limit,
                    kind: match self.config.position_kind() {
                        PositionKind::Axial => "axial",
                        _ => "absolute",
                    },
                });
            }
        }
        Ok(())
    }

    /// The shape of this model's states.
    pub fn state_shape(&self) -> &StateShape {
        &self.state_shape
    }
}

impl State {
    /// A fresh state (position 0) sized for `model`, with f32 accumulators.
    pub fn new(model: &Model) -> Self {
        State::from_shape(&model.state_shape, Precision::F32)
    }

    /// A fresh state of the given accumulator precision.
    pub fn with_precision(model: &Model, precision: Precision) -> Self {
        State::from_shape(&model.state_shape, precision)
    }
}
