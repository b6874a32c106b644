//! Synthetic causal `PerformerLM` checkpoints with random weights, for benchmarks and tests.
//!
//! [`write()`] lays out a model directory exactly as a performer-pytorch checkpoint: `config.json`
//! with the `PerformerLM` keyword arguments (`"causal": true`) and `model.safetensors` with the
//! checkpoint's tensor names, written by the `safetensors` crate. It loads through the normal
//! memory-mapped path ([`crate::Model::load`]).
//!
//! Weights are seeded pseudo-random numbers scaled so activations stay O(1): every `Linear`
//! weight and bias ~ N(0, 1/fan_in) (standard deviation `1/sqrt(fan_in)`), the token embedding
//! ~ N(0, 1), projection-matrix rows ~ N(0, 1), LayerNorm gain 1 and bias 0, and the two
//! sinusoid tables computed by performer-pytorch's formula. The normal deviates are
//! Irwin–Hall approximations (four 16-bit uniforms from one xorshift-multiply step, rescaled to
//! unit variance, bounded by ±3.46): generating is a few nanoseconds per element and runs in
//! parallel, so even the `large` shape (≈405M parameters) is written in seconds. Every tensor,
//! the buffers included, is stored in the chosen dtype (as `model.to(dtype)` does).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use performer::synthetic::{self, SyntheticShape, WeightDtype};
//! let dir = tempfile::tempdir()?;
//! let shape = SyntheticShape::named("tiny").unwrap();
//! synthetic::write(dir.path(), &shape, WeightDtype::F32, 1)?;
//! let model = performer::Model::load(dir.path())?;
//! let mut state = performer::State::new(&model);
//! assert_eq!(model.step(&mut state, 7)?.len(), 256);
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::weights::OwnedTensor;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};

/// Hyperparameters of a synthetic model (a subset of `PerformerLM`'s keyword arguments; the
/// others keep performer-pytorch's defaults: rotary positions, LayerNorm, untied output, no
/// biases on q/k/v/out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyntheticShape {
    /// Short name (`tiny`, `gpt2-small`, `large`, or anything for a custom shape).
    pub name: String,
    /// Model width.
    pub dim: usize,
    /// Layers.
    pub depth: usize,
    /// Heads per layer.
    pub heads: usize,
    /// Head width.
    pub dim_head: usize,
    /// Feed-forward expansion.
    pub ff_mult: usize,
    /// Random features per head.
    pub nb_features: usize,
    /// Vocabulary size (`num_tokens`).
    pub vocab: usize,
    /// Rows of the position tables.
    pub max_seq_len: usize,
}

/// The named shapes, smallest first.
pub const SHAPE_NAMES: &[&str] = &["tiny", "gpt2-small", "large"];

impl SyntheticShape {
    /// A named shape:
    ///
    /// | name | dim | depth | heads × dim_head | ff_mult | nb_features | vocab | parameters |
    /// |---|---|---|---|---|---|---|---|
    /// | `tiny` | 256 | 4 | 4 × 64 | 4 | 128 | 256 | 3.3M |
    /// | `gpt2-small` | 768 | 12 | 12 × 64 | 4 | 256 | 50257 | 162M |
    /// | `large` | 1024 | 24 | 16 × 64 | 4 | 256 | 50257 | 405M |
    ///
    /// `large` is 810 MB in bf16 (weights read per token ≈ 708 MB), far beyond a 32 MiB L3.
    pub fn named(name: &str) -> Option<Self> {
        let (dim, depth, heads, dim_head, ff_mult, nb_features, vocab, max_seq_len) = match name {
            "tiny" => (256, 4, 4, 64, 4, 128, 256, 1024),
            "gpt2-small" => (768, 12, 12, 64, 4, 256, 50257, 1024),
            "large" => (1024, 24, 16, 64, 4, 256, 50257, 1024),
            _ => return None,
        };
        Some(SyntheticShape {
            name: name.to_string(),
            dim,
            depth,
            heads,
            dim_head,
            ff_mult,
            nb_features,
            vocab,
            max_seq_len,
        })
    }

    /// `heads · dim_head`.
    pub fn inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }

    /// The feed-forward hidden width.
    pub fn ff_hidden(&self) -> usize {
        self.ff_mult * self.dim
    }

    /// Every tensor of the checkpoint with its shape and how it is initialised.
    fn tensors(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (dim, inner, hidden) = (self.dim, self.inner_dim(), self.ff_hidden());
        let linear = |fan_in: usize| Init::Normal(1.0 / (fan_in as f32).sqrt());
        let mut t = vec![
            (
                "token_emb.weight".into(),
                vec![self.vocab, dim],
                Init::Normal(1.0),
            ),
            (
                "pos_emb.emb".into(),
                vec![self.max_seq_len, dim],
                Init::Sinusoid,
            ),
            (
                "layer_pos_emb.emb".into(),
                vec![self.max_seq_len, self.dim_head],
                Init::Sinusoid,
            ),
        ];
        for l in 0..self.depth {
            let a = format!("performer.net.layers.{l}.0");
            let f = format!("performer.net.layers.{l}.1");
            t.push((format!("{a}.norm.weight"), vec![dim], Init::Const(1.0)));
            t.push((format!("{a}.norm.bias"), vec![dim], Init::Const(0.0)));
            t.push((
                format!("{a}.fn.fast_attention.projection_matrix"),
                vec![self.nb_features, self.dim_head],
                Init::Normal(1.0),
            ));
            for p in ["to_q", "to_k", "to_v"] {
                t.push((format!("{a}.fn.{p}.weight"), vec![inner, dim], linear(dim)));
            }
            t.push((
                format!("{a}.fn.to_out.weight"),
                vec![dim, inner],
                linear(inner),
            ));
            t.push((format!("{f}.norm.weight"), vec![dim], Init::Const(1.0)));
            t.push((format!("{f}.norm.bias"), vec![dim], Init::Const(0.0)));
            t.push((
                format!("{f}.fn.fn.w1.weight"),
                vec![hidden, dim],
                linear(dim),
            ));
            t.push((format!("{f}.fn.fn.w1.bias"), vec![hidden], linear(dim)));
            t.push((
                format!("{f}.fn.fn.w2.weight"),
                vec![dim, hidden],
                linear(hidden),
            ));
            t.push((format!("{f}.fn.fn.w2.bias"), vec![dim], linear(hidden)));
        }
        t.push(("norm.weight".into(), vec![dim], Init::Const(1.0)));
        t.push(("norm.bias".into(), vec![dim], Init::Const(0.0)));
        t.push(("to_out.weight".into(), vec![self.vocab, dim], linear(dim)));
        t.push(("to_out.bias".into(), vec![self.vocab], linear(dim)));
        t
    }

    /// Learned parameters (what [`crate::Model::parameter_count`] reports: everything but the
    /// projection matrices and sinusoid tables).
    pub fn parameter_count(&self) -> usize {
        self.tensors()
            .iter()
            .filter(|(_, _, init)| !matches!(init, Init::Sinusoid))
            .filter(|(n, _, _)| !n.ends_with("projection_matrix"))
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }

    /// Elements stored in the file (parameters plus buffers).
    pub fn stored_elements(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }

    /// Approximate size of `model.safetensors` in `dtype` (tensor data; the header adds a few KB).
    pub fn file_bytes(&self, dtype: WeightDtype) -> usize {
        self.tensors()
            .iter()
            .map(|(name, s, _)| {
                let n = s.iter().product::<usize>();
                match dtype.quant_format() {
                    Some(f) if crate::quant::is_quantized_name(name, s) => {
                        (n as f64 * f.bytes_per_weight()) as usize
                    }
                    _ => n * dtype.size(),
                }
            })
            .sum()
    }

    /// `config.json`: the `PerformerLM` keyword arguments.
    pub fn config_json(&self) -> String {
        let v = serde_json::json!({
            "num_tokens": self.vocab,
            "max_seq_len": self.max_seq_len,
            "dim": self.dim,
            "depth": self.depth,
            "heads": self.heads,
            "dim_head": self.dim_head,
            "nb_features": self.nb_features,
            "ff_mult": self.ff_mult,
            "causal": true,
        });
        serde_json::to_string_pretty(&v).expect("a JSON object serializes")
    }
}

/// The stored element type of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// The linear weights quantized to q8_0 ([`crate::quant`]) from f32, the rest f32.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// The linear weights quantized to q4_0 from f32, the rest f32.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// The linear weights quantized to q4_1 from f32, the rest f32.
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl WeightDtype {
    /// Bytes per float element (for the quantized dtypes: of the f32 tensors they keep and
    /// are made from).
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 | WeightDtype::Q8_0 | WeightDtype::Q4_0 | WeightDtype::Q4_1 => 4,
            WeightDtype::F16 | WeightDtype::Bf16 => 2,
        }
    }

    /// The block-quantized format, for `q8_0`, `q4_0` and `q4_1`.
    pub fn quant_format(self) -> Option<crate::quant::QuantFormat> {
        match self {
            WeightDtype::Q8_0 => Some(crate::quant::QuantFormat::Q8_0),
            WeightDtype::Q4_0 => Some(crate::quant::QuantFormat::Q4_0),
            WeightDtype::Q4_1 => Some(crate::quant::QuantFormat::Q4_1),
            _ => None,
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            WeightDtype::F32 | WeightDtype::Q8_0 | WeightDtype::Q4_0 | WeightDtype::Q4_1 => {
                safetensors::Dtype::F32
            }
            WeightDtype::F16 => safetensors::Dtype::F16,
            WeightDtype::Bf16 => safetensors::Dtype::BF16,
        }
    }

    fn put(self, x: f32, out: &mut [u8]) {
        match self {
            WeightDtype::F32 | WeightDtype::Q8_0 | WeightDtype::Q4_0 | WeightDtype::Q4_1 => {
                out.copy_from_slice(&x.to_le_bytes())
            }
            WeightDtype::F16 => out.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            WeightDtype::Bf16 => out.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
        }
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Q8_0 => "q8_0",
            WeightDtype::Q4_0 => "q4_0",
            WeightDtype::Q4_1 => "q4_1",
        })
    }
}

impl FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "f16" | "float16" | "half" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            "q8_0" => Ok(WeightDtype::Q8_0),
            "q4_0" => Ok(WeightDtype::Q4_0),
            "q4_1" => Ok(WeightDtype::Q4_1),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, f16, bf16, q8_0, q4_0 or q4_1)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(0, σ²), σ given.
    Normal(f32),
    Const(f32),
    /// Row p = [sin(p·ω_i)…, cos(p·ω_i)…], ω_i = 10000^(−2i/width).
    Sinusoid,
}

/// splitmix64 of a value: seeds the per-chunk generators.
fn splitmix(mut z: u64) -> u64 {
    crate::sampling::splitmix64(&mut z)
}

/// A small, fast generator (xorshift64* ), good enough for random weights and tokens.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Rng(splitmix(seed) | 1)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`; multiply-shift, bias below 2⁻³²·n).
    #[inline]
    pub fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * n as u64) >> 32) as u32
    }

    /// Approximately standard normal: the Irwin–Hall sum of four 16-bit uniforms, rescaled.
    #[inline]
    pub fn normal(&mut self) -> f32 {
        let r = self.next_u64();
        let s = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        // Sum of 4 U(0,1): mean 2, variance 1/3.
        (s as f32 * (1.0 / 65536.0) - 2.0) * 1.732_050_8
    }

    /// `n` random token ids below `vocab`.
    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        let vocab = u32::try_from(vocab).unwrap_or(u32::MAX).max(1);
        (0..n).map(|_| self.below(vocab)).collect()
    }
}

/// Elements generated per parallel chunk; each chunk has its own seed, so the output does not
/// depend on the thread count.
const CHUNK: usize = 1 << 16;

fn generate(shape: &[usize], init: Init, dtype: WeightDtype, seed: u64) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let size = dtype.size();
    let mut data = vec![0u8; numel * size];
    match init {
        Init::Normal(sd) => {
            data.par_chunks_mut(CHUNK * size)
                .enumerate()
                .for_each(|(c, bytes)| {
                    let mut rng = Rng::new(seed ^ splitmix(c as u64));
                    for out in bytes.chunks_exact_mut(size) {
                        dtype.put(rng.normal() * sd, out);
                    }
                });
        }
        Init::Const(v) => {
            let mut one = vec![0u8; size];
            dtype.put(v, &mut one);
            for out in data.chunks_exact_mut(size) {
                out.copy_from_slice(&one);
            }
        }
        Init::Sinusoid => {
            let width = shape[1];
            let half = width / 2;
            data.par_chunks_mut(width * size)
                .enumerate()
                .for_each(|(pos, row)| {
                    for i in 0..half {
                        let inv_freq = 1.0 / 10000f64.powf((2 * i) as f64 / width as f64);
                        let angle = pos as f64 * inv_freq;
                        dtype.put(angle.sin() as f32, &mut row[i * size..(i + 1) * size]);
                        dtype.put(
                            angle.cos() as f32,
                            &mut row[(half + i) * size..(half + i + 1) * size],
                        );
                    }
                });
        }
    }
    data
}

/// Writes `dir/config.json` and `dir/model.safetensors` of a random model (creating `dir`),
/// each atomically: the config through [`crate::fsutil::write_atomic`], f32 weights through
/// [`crate::weights::write_aligned`] (every tensor on a 64-byte boundary), half-precision ones
/// through `safetensors::serialize_to_file`, which also writes a temporary file and renames it.
/// The same shape, dtype and seed always give the same bytes.
pub fn write(dir: &Path, shape: &SyntheticShape, dtype: WeightDtype, seed: u64) -> Result<()> {
    if let Some(format) = dtype.quant_format() {
        return write_quantized(dir, shape, format, seed);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let specs = shape.tensors();
    let tensors: Vec<(String, OwnedTensor)> = specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, dims, init))| {
            let data = generate(&dims, init, dtype, splitmix(seed ^ splitmix(i as u64 + 1)));
            let owned = OwnedTensor {
                dtype: dtype.safetensors(),
                shape: dims,
                data,
            };
            (name, owned)
        })
        .collect();
    let path = dir.join("model.safetensors");
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert(
        "synthetic".to_string(),
        format!("shape={} dtype={dtype} seed={seed}", shape.name),
    );
    if dtype == WeightDtype::F32 {
        crate::weights::write_aligned(&path, tensors.iter().map(|(n, t)| (n, t)), &metadata)?;
    } else {
        // Half-precision weights reach the batched product widened into an aligned buffer,
        // so their alignment in the file buys it nothing; and single-stream bf16 decoding
        // measured slower from a 64-byte-aligned file than from this writer's
        // (docs/performance.md). They keep the safetensors crate's layout.
        let metadata: std::collections::HashMap<String, String> = metadata.into_iter().collect();
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            &path,
        )
        .map_err(|e| Error::io(&path, std::io::Error::other(e.to_string())))?;
    }
    let config = dir.join("config.json");
    crate::fsutil::write_atomic(&config, |w| w.write_all(shape.config_json().as_bytes()))?;
    Ok(())
}

/// [`write`] for a quantized dtype: the f32 model (the same bytes [`write`] makes for f32)
/// written to `dir/.float`, quantized into `dir`, and removed.
fn write_quantized(
    dir: &Path,
    shape: &SyntheticShape,
    format: crate::quant::QuantFormat,
    seed: u64,
) -> Result<()> {
    let float = dir.join(".float");
    write(&float, shape, WeightDtype::F32, seed)?;
    let tensors = crate::quant::quantize_file(
        &crate::weights::WeightFile::open(float.join("model.safetensors"))?,
        format,
        |_, _| {},
    )?;
    let path = dir.join("model.safetensors");
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert(
        "synthetic".to_string(),
        format!("shape={} dtype={format} seed={seed}", shape.name),
    );
    crate::weights::write_aligned(&path, tensors.iter().map(|(n, t)| (n, t)), &metadata)?;
    std::fs::remove_dir_all(&float).map_err(|e| Error::io(&float, e))?;
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&shape.config_json()).expect("config_json is an object");
    config.insert(crate::quant::CONFIG_KEY.into(), format.name().into());
    let text = serde_json::to_string_pretty(&config).expect("a JSON object serializes");
    crate::fsutil::write_atomic(dir.join("config.json"), |w| w.write_all(text.as_bytes()))?;
    Ok(())
}
