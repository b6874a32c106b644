//! The model: config plus weights laid over the mapping, and the forward passes.
//!
//! [`Model::step`] advances one sequence by one token using its constant-size [`State`];
//! [`Model::prefill`] ingests a prompt; [`Model::forward_reference`] is the plain full-sequence
//! pass (scalar kernels, attention evaluated from its definition) that the tests hold the
//! streaming path against.

use std::path::Path;

use rayon::prelude::*;

use crate::attention::favor::{self, HeadState};
use crate::attention::local;
use crate::attention::rotary::{self, Sinusoid};
use crate::attention::{FeatureKind, FeatureMap};
use crate::config::{Config, PositionKind};
use crate::error::{Error, Result};
use crate::kernels::quant::QuantMethod;
use crate::kernels::{self, scalar};
use crate::quant::{QuantFormat, QuantTensor};
use crate::state::State;
use crate::weights::names::{self, BlockNames};
use crate::weights::{Dtype, Tensor, WeightFile};
use crate::with_view;

/// One row's q, k, v (all heads) and its attention output.
pub(crate) struct RowQkv<'a> {
    pub q: &'a mut [f32],
    pub k: &'a mut [f32],
    pub v: &'a [f32],
    pub att: &'a mut [f32],
}

/// A state's local-head ring buffers, and the index of a layer's first local head in them.
pub(crate) struct LocalBuffers<'a> {
    pub keys: &'a mut [f32],
    pub values: &'a mut [f32],
    pub scores: &'a mut [f32],
    pub first_head: usize,
}

/// LayerNorm epsilon of `torch.nn.LayerNorm`'s default.
pub const LAYER_NORM_EPS: f32 = 1e-5;

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
    /// default, [`QuantMethod::Dequant`], whose logits match the dequantized f32 model.
    /// Ignored for a float model.
    pub quant_kernel: Option<QuantMethod>,
}

/// A linear layer's weight: a float tensor, or block-quantized codes and scales
/// ([`crate::quant`]).
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    Float(Tensor),
    Quant(QuantTensor),
}

impl Weight {
    /// Loads `name` of logical shape `[out, inp]`: float, or quantized in the config's
    /// `weight_format` (a quantized tensor in another format, or in a model whose config names
    /// none, is an error).
    fn load(
        file: &WeightFile,
        name: &str,
        out: usize,
        inp: usize,
        format: Option<QuantFormat>,
    ) -> Result<Self> {
        let resolved = names::resolve(file, name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let raw = file.raw(&resolved)?;
        if !QuantFormat::is_code_dtype(raw.dtype()) {
            return Ok(Weight::Float(load_tensor(file, name, &[out, inp])?));
        }
        // The formats whose codes have this dtype, for the messages.
        let found = QuantFormat::ALL
            .iter()
            .filter(|f| f.data_dtype_name() == raw.dtype())
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(" or ");
        match format {
            Some(f) if f.data_dtype_name() == raw.dtype() => Ok(Weight::Quant(QuantTensor::load(
                file, &resolved, out, inp, f,
            )?)),
            Some(f) => Err(Error::InvalidQuantized {
                name: resolved.to_string(),
                message: format!(
                    "holds {} codes ({found}) but config.json says weight_format {f}",
                    raw.dtype()
                ),
            }),
            None => Err(Error::InvalidQuantized {
                name: resolved.to_string(),
                message: format!(
                    "holds {} codes ({found}) but config.json names no weight_format",
                    raw.dtype()
                ),
            }),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Weight::Float(t) => t.shape()[0],
            Weight::Quant(q) => q.shape()[0],
        }
    }
}

/// `y = x Wᵀ` for a few rows of `x` (batched decode): [`kernels::matvec_batch`] on blocks of
/// weight rows split across the pool as single-stream decoding splits them, so the weights are
/// read from memory once for all rows and each loaded weight vector feeds several rows'
/// multiply-adds. Each output element is bit for bit what single-stream decoding computes.
/// `weight` is `[out, cols]`, `x` is `rows × cols`, `y` at least `rows × out`.
pub(crate) fn few_rows_product(weight: &Tensor, out: usize, x: &[f32], rows: usize, y: &mut [f32]) {
    let cols = x.len() / rows.max(1);
    let y = &mut y[..rows * out];
    let Some(block) = kernels::matvec_block_rows(out, cols, rayon::current_num_threads()) else {
        with_view!(weight.view(), |w| kernels::matvec_batch(w, x, rows, y));
        return;
    };
    // Block `b` of weight rows `b·block..` leaves its `rows × len` outputs at `rows · b·block`
    // of one buffer (this thread's, reused: every element is written before it is read);
    // then each row of `y` gathers its columns from the blocks, rows in parallel.
    let mut blocks = FEW_ROWS_BLOCKS.take();
    blocks.resize(rows * out, 0.0);
    blocks
        .par_chunks_mut(rows * block)
        .enumerate()
        .for_each(|(b, buf)| {
            let (r0, r1) = (b * block, ((b + 1) * block).min(out));
            with_view!(weight.view(), |w| kernels::matvec_batch(
                &w[r0 * cols..r1 * cols],
                x,
                rows,
                buf
            ));
        });
    let gather = |(r, yr): (usize, &mut [f32])| {
        for (b, buf) in blocks.chunks(rows * block).enumerate() {
            let len = buf.len() / rows;
            yr[b * block..b * block + len].copy_from_slice(&buf[r * len..(r + 1) * len]);
        }
    };
    // In parallel only when the copy outweighs a hand-off to the pool (a few microseconds):
    // gpt2-small's 16 × 50257 logits, not the shipped model's 16 × 256-wide outputs.
    if rows * out >= GATHER_PAR_MIN {
        y.par_chunks_mut(out).enumerate().for_each(gather);
    } else {
        y.chunks_mut(out).enumerate().for_each(gather);
    }
    FEW_ROWS_BLOCKS.set(blocks);
}

/// Output elements from which [`few_rows_product`] gathers its rows in parallel (256 KiB).
const GATHER_PAR_MIN: usize = 1 << 16;

std::thread_local! {
    /// [`few_rows_product`]'s block-major buffer, kept between calls on the calling thread.
    static FEW_ROWS_BLOCKS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A linear layer: `y = W x (+ b)` with `W` of shape `[out, in]`.
/// Row counts up to which [`Linear::forward_rows`] uses the decode kernel on cached weight
/// tiles instead of a general matrix product (whose packing dominates at a few rows).
pub(crate) const FEW_ROWS: usize = 64;

#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Weight,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    fn load(
        file: &WeightFile,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        format: Option<QuantFormat>,
    ) -> Result<Self> {
        let weight = Weight::load(file, &format!("{prefix}.weight"), out, inp, format)?;
        let bias = if bias {
            Some(load_tensor(file, &format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub(crate) fn forward(&self, x: &[f32], y: &mut [f32]) {
        Linear::forward_stacked(&[self], x, y);
    }

    /// Output features.
    fn out_features(&self) -> usize {
        self.weight.rows()
    }

    /// `y = [L₀ x; L₁ x; …]` for linears sharing their input `x`, their outputs stacked in `y`,
    /// as one parallel region: decoding's q, k and v projections cost one fork-join instead of
    /// three, and the threads split the stacked rows evenly.
    pub(crate) fn forward_stacked(linears: &[&Linear], x: &[f32], y: &mut [f32]) {
        let cols = x.len();
        let rows: usize = linears.iter().map(|l| l.out_features()).sum();
        assert_eq!(y.len(), rows, "stacked linear: output length");
        // Rows g0.. of the stack (y is that block of the output); `act` is `x` quantized once
        // for every quantized linear whose kernel takes it so.
        let run = |g0: usize, y: &mut [f32], act: Option<&kernels::quant::Activation>| {
            let mut off = 0;
            for lin in linears {
                let out = lin.out_features();
                let (a, b) = (g0.max(off), (g0 + y.len()).min(off + out));
                if a < b {
                    let ys = &mut y[a - g0..b - g0];
                    let (r0, r1) = (a - off, b - off);
                    match &lin.weight {
                        Weight::Float(t) => with_view!(t.view(), |w| kernels::matvec_serial(
                            &w[r0 * cols..r1 * cols],
                            x,
                            ys
                        )),
                        Weight::Quant(q) => q.kernels().matvec_serial_prepared(
                            q.matrix().row_range(r0..r1),
                            x,
                            act,
                            ys,
                        ),
                    }
                    if let Some(bias) = &lin.bias {
                        with_view!(bias.view(), |bv| kernels::add_bias(&bv[r0..r1], ys));
                    }
                }
                off += out;
            }
        };
        let all = |y: &mut [f32], act: Option<&kernels::quant::Activation>| {
            match kernels::matvec_block_rows(rows, cols, rayon::current_num_threads()) {
                None => run(0, y, act),
                Some(block) => y
                    .par_chunks_mut(block)
                    .enumerate()
                    .for_each(|(b, yb)| run(b * block, yb, act)),
            }
        };
        let quantizes_x = linears.iter().any(|l| match &l.weight {
            Weight::Quant(q) => q.method().quantizes_activation(),
            Weight::Float(_) => false,
        });
        if quantizes_x {
            kernels::quant::with_activation(x, |act| all(y, Some(act)));
        } else {
            all(y, None);
        }
    }

    /// [`Linear::forward_rows`] for a few rows (batched decode): [`few_rows_product`], then
    /// the bias.
    fn forward_few_rows(&self, weight: &Tensor, x: &[f32], rows: usize, y: &mut [f32]) {
        let out = self.out_features();
        few_rows_product(weight, out, x, rows, y);
        let y = &mut y[..rows * out];
        if let Some(b) = &self.bias {
            for r in 0..rows {
                with_view!(b.view(), |b| kernels::add_bias(
                    b,
                    &mut y[r * out..(r + 1) * out]
                ));
            }
        }
    }

    /// `y = x Wᵀ (+ b)` for `rows` rows of `x` at once.
    pub(crate) fn forward_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let out = self.weight.rows();
        match &self.weight {
            Weight::Float(t) if rows <= FEW_ROWS => {
                self.forward_few_rows(t, x, rows, y);
                return;
            }
            Weight::Float(t) => with_view!(t.view(), |w| kernels::matmul::linear(
                x,
                rows,
                w,
                out,
                &mut y[..rows * out]
            )),
            Weight::Quant(q) => q
                .kernels()
                .linear(x, rows, q.matrix(), &mut y[..rows * out]),
        }
        if let Some(b) = &self.bias {
            for r in 0..rows {
                with_view!(b.view(), |b| kernels::add_bias(
                    b,
                    &mut y[r * out..(r + 1) * out]
                ));
            }
        }
    }

    fn forward_scalar(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; self.weight.rows()];
        match &self.weight {
            Weight::Float(t) => with_view!(t.view(), |w| scalar::matvec(w, x, &mut y)),
            // The reference for quantized weights: dequantized to f32, then the scalar product.
            Weight::Quant(q) => scalar::matvec(&q.dequantize(), x, &mut y),
        }
        if let Some(b) = &self.bias {
            for (o, i) in y.iter_mut().zip(0..) {
                *o += b.view().get(i);
            }
        }
        y
    }

    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        let float = match &self.weight {
            Weight::Float(t) => Some(t),
            Weight::Quant(_) => None,
        };
        float.into_iter().chain(self.bias.iter())
    }

    fn quantized(&self) -> Option<&QuantTensor> {
        match &self.weight {
            Weight::Quant(q) => Some(q),
            Weight::Float(_) => None,
        }
    }
}

/// The query, key and value thirds of a stacked projection output.
pub(crate) fn split_qkv(qkv: &mut [f32]) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let inner = qkv.len() / 3;
    let (q, rest) = qkv.split_at_mut(inner);
    let (k, v) = rest.split_at_mut(inner);
    (q, k, v)
}

/// `torch.nn.LayerNorm` with affine parameters.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl LayerNorm {
    fn load(file: &WeightFile, prefix: &str, dim: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: load_tensor(file, &format!("{prefix}.weight"), &[dim])?,
            bias: load_tensor(file, &format!("{prefix}.bias"), &[dim])?,
        })
    }

    pub(crate) fn forward(&self, x: &[f32], out: &mut [f32]) {
        match (self.weight.view(), self.bias.view()) {
            (crate::weights::View::F32(g), crate::weights::View::F32(b)) => {
                kernels::layer_norm(x, g, b, LAYER_NORM_EPS, out)
            }
            (crate::weights::View::F16(g), crate::weights::View::F16(b)) => {
                kernels::layer_norm(x, g, b, LAYER_NORM_EPS, out)
            }
            (crate::weights::View::BF16(g), crate::weights::View::BF16(b)) => {
                kernels::layer_norm(x, g, b, LAYER_NORM_EPS, out)
            }
            // Mixed dtypes between gain and bias (no writer we know makes them): widen both
            // dim-sized vectors.
            (g, b) => kernels::layer_norm(x, &g.to_vec(), &b.to_vec(), LAYER_NORM_EPS, out),
        }
    }

    fn forward_scalar(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        let (g, b) = (self.weight.view().to_vec(), self.bias.view().to_vec());
        scalar::layer_norm(x, &g, &b, LAYER_NORM_EPS, &mut out);
        out
    }

    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.weight, &self.bias].into_iter()
    }
}

/// The pre-norm of a block: LayerNorm (default), ScaleNorm (`use_scalenorm`) or none with a
/// ReZero gain on the branch output (`use_rezero`).
#[derive(Debug, Clone)]
pub(crate) enum BlockNorm {
    Layer(LayerNorm),
    /// `x / max(|x|, 1e-5) · g`, `g` of shape [1].
    Scale(Tensor),
    /// No norm; the branch output is multiplied by the scalar `g`.
    ReZero(Tensor),
}

/// ScaleNorm's lower clamp of the norm.
const SCALE_NORM_EPS: f32 = 1e-5;

impl BlockNorm {
    fn load(file: &WeightFile, c: &Config, branch: &str, dim: usize) -> Result<Self> {
        Ok(if c.use_scalenorm {
            BlockNorm::Scale(load_tensor(file, &format!("{branch}.g"), &[1])?)
        } else if c.use_rezero {
            BlockNorm::ReZero(load_tensor(file, &format!("{branch}.g"), &[])?)
        } else {
            BlockNorm::Layer(LayerNorm::load(file, &format!("{branch}.norm"), dim)?)
        })
    }

    pub(crate) fn apply(&self, x: &[f32], out: &mut [f32]) {
        match self {
            BlockNorm::Layer(ln) => ln.forward(x, out),
            BlockNorm::Scale(g) => {
                let norm = kernels::dot::<f32>(x, x).sqrt().max(SCALE_NORM_EPS);
                let f = g.view().get(0) / norm;
                for (o, v) in out.iter_mut().zip(x) {
                    *o = v * f;
                }
            }
            BlockNorm::ReZero(_) => out.copy_from_slice(x),
        }
    }

    fn apply_scalar(&self, x: &[f32]) -> Vec<f32> {
        match self {
            BlockNorm::Layer(ln) => ln.forward_scalar(x),
            BlockNorm::Scale(g) => {
                let norm = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                let f = g.view().get(0) as f64 / norm.max(SCALE_NORM_EPS as f64);
                x.iter().map(|&v| (v as f64 * f) as f32).collect()
            }
            BlockNorm::ReZero(_) => x.to_vec(),
        }
    }

    /// The factor on the branch output: ReZero's `g`, else 1.
    pub(crate) fn gain(&self) -> f32 {
        match self {
            BlockNorm::ReZero(g) => g.view().get(0),
            _ => 1.0,
        }
    }

    fn tensors(&self) -> Box<dyn Iterator<Item = &Tensor> + '_> {
        match self {
            BlockNorm::Layer(ln) => Box::new(ln.tensors()),
            BlockNorm::Scale(g) | BlockNorm::ReZero(g) => Box::new(std::iter::once(g)),
        }
    }
}

/// How positions enter: performer-pytorch's three position embeddings.
#[derive(Debug, Clone)]
pub(crate) enum Positions {
    /// Fixed sinusoid added to the input, rotary q/k in the global heads.
    Rotary { input: Sinusoid, layer: Sinusoid },
    /// A learned table `pos_emb.emb.weight` [max_seq_len, dim].
    Absolute(Tensor),
    /// Two learned tables summed: position `i·b + j` gets `rows[i] + cols[j]`.
    Axial {
        rows: Tensor,
        cols: Tensor,
        b: usize,
    },
}

impl Positions {
    fn load(file: &WeightFile, c: &Config) -> Result<Self> {
        Ok(match c.position_kind() {
            PositionKind::Rotary => Positions::Rotary {
                input: Sinusoid::new(
                    c.dim,
                    Some(load_tensor(file, "pos_emb.emb", &[c.max_seq_len, c.dim])?),
                ),
                layer: Sinusoid::new(
                    c.dim_head,
                    Some(load_tensor(
                        file,
                        "layer_pos_emb.emb",
                        &[c.max_seq_len, c.dim_head],
                    )?),
                ),
            },
            PositionKind::Absolute => Positions::Absolute(load_tensor(
                file,
                "pos_emb.emb.weight",
                &[c.max_seq_len, c.dim],
            )?),
            PositionKind::Axial => {
                let (a, b) = c
                    .axial_position_shape
                    .unwrap_or((c.max_seq_len.div_ceil(64), 64));
                Positions::Axial {
                    rows: load_tensor(file, "pos_emb.weights.0", &[1, a, 1, c.dim])?,
                    cols: load_tensor(file, "pos_emb.weights.1", &[1, 1, b, c.dim])?,
                    b,
                }
            }
        })
    }

    /// Adds the input position embedding of `pos` to `h` (`tmp` is scratch of width dim).
    pub(crate) fn add_input(&self, pos: usize, h: &mut [f32], tmp: &mut [f32]) {
        let dim = h.len();
        match self {
            Positions::Rotary { input, .. } => input.row(pos, tmp),
            Positions::Absolute(t) => t.row(pos).to_f32_into(tmp),
            Positions::Axial { rows, cols, b } => {
                let (i, j) = (pos / b, pos % b);
                rows.view().slice(i * dim..(i + 1) * dim).to_f32_into(tmp);
                let c = cols.view().slice(j * dim..(j + 1) * dim);
                for (k, t) in tmp.iter_mut().enumerate() {
                    *t += c.get(k);
                }
            }
        }
        kernels::axpy(1.0, &tmp[..dim], h);
    }

    /// The rotary table of the global heads, if the model uses one.
    pub(crate) fn rotary(&self) -> Option<&Sinusoid> {
        match self {
            Positions::Rotary { layer, .. } => Some(layer),
            _ => None,
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Positions::Rotary { .. } => Vec::new(),
            Positions::Absolute(t) => vec![t],
            Positions::Axial { rows, cols, .. } => vec![rows, cols],
        }
    }
}

/// One block: FAVOR+ self-attention and a feed-forward network, each pre-normed with a
/// residual connection.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) attn_norm: BlockNorm,
    pub(crate) to_q: Linear,
    pub(crate) to_k: Linear,
    pub(crate) to_v: Linear,
    pub(crate) attn_out: Linear,
    pub(crate) projection: Tensor,
    /// Number of local (windowed softmax) heads: the last heads of the layer.
    pub(crate) local_heads: usize,
    /// The local heads' rotary frequencies (`d/2` floats of the checkpoint's `inv_freq`
    /// buffer, widened once at load).
    pub(crate) local_inv_freq: Option<Vec<f32>>,
    pub(crate) ff_norm: BlockNorm,
    pub(crate) w1: Linear,
    pub(crate) w2: Linear,
}

impl Layer {
    fn load(file: &WeightFile, c: &Config, layer: usize) -> Result<Self> {
        let n = BlockNames::for_config(c, layer);
        let (dim, inner) = (c.dim, c.inner_dim());
        let local_heads = c.local_attn_heads[layer];
        let ff_in = c.ff_hidden() * if c.ff_glu { 2 } else { 1 };
        let q = c.weight_format;
        Ok(Layer {
            attn_norm: BlockNorm::load(file, c, &n.attn_branch, dim)?,
            to_q: Linear::load(file, &format!("{}.to_q", n.attn), inner, dim, c.qkv_bias, q)?,
            to_k: Linear::load(file, &format!("{}.to_k", n.attn), inner, dim, c.qkv_bias, q)?,
            to_v: Linear::load(file, &format!("{}.to_v", n.attn), inner, dim, c.qkv_bias, q)?,
            attn_out: Linear::load(
                file,
                &format!("{}.to_out", n.attn),
                dim,
                inner,
                c.attn_out_bias,
                q,
            )?,
            projection: load_tensor(
                file,
                &format!("{}.fast_attention.projection_matrix", n.attn),
                &[c.nb_features, c.dim_head],
            )?,
            local_heads,
            local_inv_freq: if local_heads > 0 {
                Some(
                    load_tensor(
                        file,
                        &format!("{}.local_attn.rel_pos.inv_freq", n.attn),
                        &[c.dim_head / 2],
                    )?
                    .view()
                    .to_vec(),
                )
            } else {
                None
            },
            ff_norm: BlockNorm::load(file, c, &n.ff_branch, dim)?,
            w1: Linear::load(file, &format!("{}.w1", n.ff), ff_in, dim, true, q)?,
            w2: Linear::load(file, &format!("{}.w2", n.ff), dim, c.ff_hidden(), true, q)?,
        })
    }

    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.attn_norm
            .tensors()
            .chain(self.to_q.tensors())
            .chain(self.to_k.tensors())
            .chain(self.to_v.tensors())
            .chain(self.attn_out.tensors())
            .chain(self.ff_norm.tensors())
            .chain(self.w1.tensors())
            .chain(self.w2.tensors())
    }

    fn quantized(&self) -> impl Iterator<Item = &QuantTensor> {
        [
            &self.to_q,
            &self.to_k,
            &self.to_v,
            &self.attn_out,
            &self.w1,
            &self.w2,
        ]
        .into_iter()
        .filter_map(Linear::quantized)
    }
}

fn load_tensor(file: &WeightFile, name: &str, shape: &[usize]) -> Result<Tensor> {
    let resolved = names::resolve(file, name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })?;
    let t = file.tensor(&resolved)?;
    t.expect_shape(shape)?;
    Ok(t)
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
    pub(crate) state_shape: crate::state::StateShape,
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
        let mut model = Self::from_parts(config, file)?;
        if let Some(method) = options.quant_kernel {
            model.use_quant_method(method);
        }
        Ok(model)
    }

    /// Builds a model from a resolved config and an opened weights file, checking every
    /// tensor's presence, dtype and shape. A tokenizer file the config names is read from the
    /// weights file's directory.
    pub fn from_parts(config: Config, file: WeightFile) -> Result<Self> {
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
        let state_shape = crate::state::StateShape::of(c);
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
            let weights = crate::snapshot::hash64(self.file.bytes());
            crate::snapshot::hash64(text.as_bytes()) ^ weights.rotate_left(17)
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
    /// [`LoadOptions::quant_kernel`] it was loaded with, else [`QuantMethod::Dequant`].
    pub fn quant_method(&self) -> Option<QuantMethod> {
        self.quantized().next().map(QuantTensor::method)
    }

    /// Sets the method of every quantized product of this model (what
    /// [`LoadOptions::quant_kernel`] does at load; for a model built by [`Model::from_parts`]).
    pub fn use_quant_method(&mut self, method: QuantMethod) {
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
        for lin in layers.chain(self.to_out.as_mut()) {
            if let Weight::Quant(q) = &mut lin.weight {
                q.use_method(method);
            }
        }
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

    /// Consumes one token and returns the logits for the next one.
    pub fn step<'s>(&self, state: &'s mut State, token: u32) -> Result<&'s [f32]> {
        state.check_fits(self)?;
        self.check_tokens(state.pos, &[token])?;
        self.forward_token(state, token, true)?;
        Ok(&state.logits)
    }

    /// Consumes a prompt and returns the logits after its last token, in chunks of
    /// [`crate::parallel::DEFAULT_CHUNK`] tokens (see [`Model::prefill_chunked`]). All ids (and,
    /// for absolute positions, the length) are checked before the state changes.
    pub fn prefill<'s>(&self, state: &'s mut State, tokens: &[u32]) -> Result<&'s [f32]> {
        if state.acc64.is_some() {
            // f64 accumulators have no chunked path: step, checking everything first.
            state.check_fits(self)?;
            let Some((&last, body)) = tokens.split_last() else {
                return Err(Error::EmptyInput("prefill needs at least one token"));
            };
            self.check_tokens(state.pos, tokens)?;
            for &t in body {
                self.forward_token(state, t, false)?;
            }
            self.forward_token(state, last, true)?;
            return Ok(&state.logits);
        }
        self.prefill_chunked(state, tokens, crate::parallel::DEFAULT_CHUNK)
    }

    /// Runs one token through every layer at position `state.pos`: embed → for each layer
    /// (norm → q, k, v → rotary → FAVOR+ state update and readout, local heads → out
    /// projection → residual → norm → feed-forward → residual) → final norm → logits.
    pub(crate) fn forward_token(
        &self,
        st: &mut State,
        token: u32,
        want_logits: bool,
    ) -> Result<()> {
        self.forward_token_with(st, token, want_logits, |model, st, l| {
            model.attend_favor(st, l)
        })
    }

    /// One token through every layer with `attend(model, state, layer)` filling `st.att` from
    /// the rotated `st.q`, `st.k` and `st.v` of the layer's global heads.
    pub(crate) fn forward_token_with(
        &self,
        st: &mut State,
        token: u32,
        want_logits: bool,
        mut attend: impl FnMut(&Model, &mut State, usize),
    ) -> Result<()> {
        let c = &self.config;
        let pos = st.pos;
        let (heads, d, dim) = (c.heads, c.dim_head, c.dim);

        self.token_emb.row(token as usize).to_f32_into(&mut st.h);
        self.positions.add_input(pos, &mut st.h, &mut st.tmp);
        let rotary = self.positions.rotary();
        if let Some(r) = rotary {
            r.row(pos, &mut st.rot);
        }

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention branch.
            layer.attn_norm.apply(&st.h, &mut st.xn);
            if c.shift_tokens {
                shift_features(&mut st.xn, &mut st.shift_prev, (2 * l) * dim);
            }
            Linear::forward_stacked(
                &[&layer.to_q, &layer.to_k, &layer.to_v],
                &st.xn,
                &mut st.qkv,
            );
            let gh = heads - layer.local_heads;
            if rotary.is_some() {
                let (q, k, _) = split_qkv(&mut st.qkv);
                for hd in 0..gh {
                    rotary::rotate(&mut q[hd * d..(hd + 1) * d], &st.rot);
                    rotary::rotate(&mut k[hd * d..(hd + 1) * d], &st.rot);
                }
            }
            attend(self, st, l);
            self.attend_local(st, l);
            layer.attn_out.forward(&st.att, &mut st.tmp);
            kernels::axpy(layer.attn_norm.gain(), &st.tmp, &mut st.h);

            // Feed-forward branch.
            layer.ff_norm.apply(&st.h, &mut st.xn);
            if c.shift_tokens {
                shift_features(&mut st.xn, &mut st.shift_prev, (2 * l + 1) * dim);
            }
            layer.w1.forward(&st.xn, &mut st.hidden);
            let hidden = c.ff_hidden();
            kernels::gelu(&mut st.hidden[..hidden]);
            if c.ff_glu {
                let (x, gate) = st.hidden.split_at_mut(hidden);
                for (a, g) in x.iter_mut().zip(gate.iter()) {
                    *a *= g;
                }
            }
            layer.w2.forward(&st.hidden[..hidden], &mut st.tmp);
            kernels::axpy(layer.ff_norm.gain(), &st.tmp, &mut st.h);
        }
        st.pos += 1;
        st.has_logits = false;
        if want_logits {
            self.norm.forward(&st.h, &mut st.xn);
            match &self.to_out {
                Some(out) => out.forward(&st.xn, &mut st.logits),
                None => with_view!(self.token_emb.view(), |w| kernels::matvec(
                    w,
                    &st.xn,
                    &mut st.logits
                )),
            }
            if st.logits.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFiniteLogits { position: pos });
            }
            st.has_logits = true;
        }
        Ok(())
    }

    /// FAVOR+ for the global heads of layer `l`: state update and readout, heads in parallel
    /// when the work is large enough.
    fn attend_favor(&self, st: &mut State, l: usize) {
        let c = &self.config;
        let pos = st.pos;
        let (heads, d, m) = (c.heads, c.dim_head, c.feature_count());
        let gh = heads - self.layers[l].local_heads;
        let map = self.feature_map(l);
        let delta = c.denominator_eps;
        let n = pos + 1;
        let (h0, h1) = (st.favor_start[l], st.favor_start[l + 1]);
        let (q, k, v) = split_qkv(&mut st.qkv);
        let (q, k, v) = (&*q, &*k, &*v);
        if let Some(acc) = &mut st.acc64 {
            for (i, hd) in (0..gh).enumerate() {
                let g = h0 + i;
                let r = hd * d..(hd + 1) * d;
                favor::step_f64(
                    &map,
                    delta,
                    favor::HeadState64 {
                        a_mat: &mut acc.a_mat[g * m * d..(g + 1) * m * d],
                        a_vec: &mut acc.a_vec[g * m..(g + 1) * m],
                        v_sum: &mut acc.v_sum[g * d..(g + 1) * d],
                        max: &mut acc.max[g],
                        key_feat: &mut st.key_feat[..m],
                        query_feat: &mut st.query_feat[..m],
                    },
                    favor::Token {
                        q: &q[r.clone()],
                        k: &k[r.clone()],
                        v: &v[r.clone()],
                        n,
                    },
                    &mut st.att[r],
                );
            }
            return;
        }
        let (md, hm, hd_) = (h0 * m * d..h1 * m * d, h0 * m..h1 * m, h0 * d..h1 * d);
        let run = |head: HeadState<'_>, out: &mut [f32], hd: usize| {
            let r = hd * d..(hd + 1) * d;
            let tok = favor::Token {
                q: &q[r.clone()],
                k: &k[r.clone()],
                v: &v[r],
                n,
            };
            favor::step(&map, delta, head, tok, out)
        };
        // Per head: (A, A's compensation), (a, …), (s, …), M, scratch, output.
        let a_mat = (&mut st.a_mat[md.clone()], &mut st.a_mat_c[md]);
        let a_vec = (&mut st.a_vec[hm.clone()], &mut st.a_vec_c[hm]);
        let v_sum = (&mut st.v_sum[hd_.clone()], &mut st.v_sum_c[hd_]);
        let max = &mut st.max[h0..h1];
        let att = &mut st.att[..gh * d];
        let head =
            |a_mat, a_mat_c, a_vec, a_vec_c, v_sum, v_sum_c, max, key_feat, query_feat| HeadState {
                a_mat,
                a_vec,
                v_sum,
                comp: favor::Compensation {
                    a_mat: a_mat_c,
                    a_vec: a_vec_c,
                    v_sum: v_sum_c,
                },
                max,
                key_feat,
                query_feat,
            };
        // Each head's step touches its m×d state about five times (feature maps, compensated
        // update, readout): from 4k state elements per layer that outweighs handing heads to
        // the pool's awake workers (tiny models, 4 × 128 × 64, gain too: see PAR_MIN_ELEMS).
        if gh > 1 && gh * m * d >= kernels::PAR_MIN_ELEMS / 4 {
            a_mat
                .0
                .par_chunks_mut(m * d)
                .zip(a_mat.1.par_chunks_mut(m * d))
                .zip(a_vec.0.par_chunks_mut(m).zip(a_vec.1.par_chunks_mut(m)))
                .zip(v_sum.0.par_chunks_mut(d).zip(v_sum.1.par_chunks_mut(d)))
                .zip(max.par_iter_mut())
                .zip(st.key_feat.par_chunks_mut(m))
                .zip(st.query_feat.par_chunks_mut(m))
                .zip(att.par_chunks_mut(d))
                .enumerate()
                .for_each(|(hd, item)| {
                    let (((((((am, amc), (av, avc)), (vs, vsc)), mx), kf), qf), out) = item;
                    run(head(am, amc, av, avc, vs, vsc, mx, kf, qf), out, hd)
                });
        } else {
            a_mat
                .0
                .chunks_mut(m * d)
                .zip(a_mat.1.chunks_mut(m * d))
                .zip(a_vec.0.chunks_mut(m).zip(a_vec.1.chunks_mut(m)))
                .zip(v_sum.0.chunks_mut(d).zip(v_sum.1.chunks_mut(d)))
                .zip(max.iter_mut())
                .zip(st.key_feat.chunks_mut(m))
                .zip(st.query_feat.chunks_mut(m))
                .zip(att.chunks_mut(d))
                .enumerate()
                .for_each(|(hd, item)| {
                    let (((((((am, amc), (av, avc)), (vs, vsc)), mx), kf), qf), out) = item;
                    run(head(am, amc, av, avc, vs, vsc, mx, kf, qf), out, hd)
                });
        }
    }

    /// The local (windowed softmax) heads of layer `l`, if any.
    fn attend_local(&self, st: &mut State, l: usize) {
        let local = LocalBuffers {
            keys: &mut st.local_keys,
            values: &mut st.local_values,
            scores: &mut st.scores,
            first_head: st.local_start[l],
        };
        let (q, k, v) = split_qkv(&mut st.qkv);
        let row = RowQkv {
            q,
            k,
            v,
            att: &mut st.att,
        };
        self.local_heads_row(l, st.pos, local, row);
    }

    /// Runs the local heads of layer `l` for one row at position `pos`.
    pub(crate) fn local_heads_row(
        &self,
        l: usize,
        pos: usize,
        bufs: LocalBuffers<'_>,
        row: RowQkv<'_>,
    ) {
        let c = &self.config;
        let (heads, d) = (c.heads, c.dim_head);
        let layer = &self.layers[l];
        let Some(inv_freq) = &layer.local_inv_freq else {
            return;
        };
        let ring = 2 * c.local_window_size * d;
        let rot = local::rotation(&inv_freq[..d / 2], pos);
        for (i, hd) in (heads - layer.local_heads..heads).enumerate() {
            let r = hd * d..(hd + 1) * d;
            let slot = (bufs.first_head + i) * ring..(bufs.first_head + i + 1) * ring;
            local::step(
                c.local_window_size,
                &rot,
                pos,
                local::LocalHeadState {
                    keys: &mut bufs.keys[slot.clone()],
                    values: &mut bufs.values[slot],
                    scores: bufs.scores,
                },
                &mut row.q[r.clone()],
                &mut row.k[r.clone()],
                &row.v[r.clone()],
                &mut row.att[r],
            );
        }
    }

    /// The plain full-sequence forward: scalar kernels for every product and the attention
    /// evaluated from its definition in f64 (quadratic in the length), parallel over positions.
    /// Returns the logits at every position. A test reference, not a fast path.
    pub fn forward_reference(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            return Err(Error::EmptyInput(
                "the reference forward needs at least one token",
            ));
        }
        self.check_tokens(0, tokens)?;
        let c = &self.config;
        let (d, dim) = (c.dim_head, c.dim);
        let mut h: Vec<Vec<f32>> = tokens
            .par_iter()
            .enumerate()
            .map(|(p, &t)| {
                let mut x = self.token_emb.row(t as usize).to_vec();
                let mut tmp = vec![0.0; dim];
                self.positions.add_input(p, &mut x, &mut tmp);
                x
            })
            .collect();
        // Token shift over a whole sequence: features [dim/2, 2·(dim/2)) from the previous
        // position, zeros at position 0.
        let shift = |xs: &mut Vec<Vec<f32>>| {
            if !c.shift_tokens {
                return;
            }
            let seg = dim / 2..2 * (dim / 2);
            for p in (0..xs.len()).rev() {
                let prev: Vec<f32> = if p == 0 {
                    vec![0.0; seg.len()]
                } else {
                    xs[p - 1][seg.clone()].to_vec()
                };
                xs[p][seg.clone()].copy_from_slice(&prev);
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let mut xn: Vec<Vec<f32>> = h
                .par_iter()
                .map(|x| layer.attn_norm.apply_scalar(x))
                .collect();
            shift(&mut xn);
            let qkv: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = xn
                .par_iter()
                .enumerate()
                .map(|(p, xn)| {
                    let mut q = layer.to_q.forward_scalar(xn);
                    let mut k = layer.to_k.forward_scalar(xn);
                    let v = layer.to_v.forward_scalar(xn);
                    if let Some(r) = self.positions.rotary() {
                        let mut rot = vec![0.0; d];
                        r.row(p, &mut rot);
                        for hd in 0..c.heads - layer.local_heads {
                            rotary::rotate(&mut q[hd * d..(hd + 1) * d], &rot);
                            rotary::rotate(&mut k[hd * d..(hd + 1) * d], &rot);
                        }
                    }
                    (q, k, v)
                })
                .collect();
            let map = self.feature_map(l);
            let mut att = vec![vec![0f32; c.inner_dim()]; tokens.len()];
            let gh = c.heads - layer.local_heads;
            for hd in 0..c.heads {
                let r = hd * d..(hd + 1) * d;
                let pick = |i: usize| -> Vec<Vec<f32>> {
                    qkv.iter()
                        .map(|t| [&t.0, &t.1, &t.2][i][r.clone()].to_vec())
                        .collect()
                };
                let out = if hd < gh {
                    favor::reference(&map, c.denominator_eps, &pick(0), &pick(1), &pick(2))
                } else {
                    let inv_freq = layer.local_inv_freq.clone().unwrap_or_default();
                    local::reference(c.local_window_size, &inv_freq, &pick(0), &pick(1), &pick(2))
                };
                for (a, o) in att.iter_mut().zip(out) {
                    a[r.clone()].copy_from_slice(&o);
                }
            }
            let attn_gain = layer.attn_norm.gain();
            h = h
                .into_par_iter()
                .zip(att.par_iter())
                .map(|(mut x, a)| {
                    let o = layer.attn_out.forward_scalar(a);
                    for (xi, oi) in x.iter_mut().zip(&o) {
                        *xi += attn_gain * oi;
                    }
                    x
                })
                .collect();
            let mut xn: Vec<Vec<f32>> = h
                .par_iter()
                .map(|x| layer.ff_norm.apply_scalar(x))
                .collect();
            shift(&mut xn);
            let hidden = c.ff_hidden();
            let ff_gain = layer.ff_norm.gain();
            h = h
                .into_par_iter()
                .zip(xn.par_iter())
                .map(|(mut x, xn)| {
                    let mut hid = layer.w1.forward_scalar(xn);
                    scalar::gelu(&mut hid[..hidden]);
                    if c.ff_glu {
                        let (a, g) = hid.split_at_mut(hidden);
                        for (ai, gi) in a.iter_mut().zip(g.iter()) {
                            *ai *= gi;
                        }
                    }
                    let f = layer.w2.forward_scalar(&hid[..hidden]);
                    for (xi, fi) in x.iter_mut().zip(&f) {
                        *xi += ff_gain * fi;
                    }
                    x
                })
                .collect();
        }
        let tied = |x: &[f32]| -> Vec<f32> {
            let mut y = vec![0.0; c.num_tokens];
            with_view!(self.token_emb.view(), |w| scalar::matvec(w, x, &mut y));
            y
        };
        Ok(h.par_iter()
            .map(|x| {
                let xn = self.norm.forward_scalar(x);
                match &self.to_out {
                    Some(out) => out.forward_scalar(&xn),
                    None => tied(&xn),
                }
            })
            .collect())
    }
}

/// `shift_tokens`: swaps features `[dim/2, 2·(dim/2))` of this position's block input with the
/// previous position's, kept in `prev[offset..]` (zeros before the first token).
pub(crate) fn shift_features(xn: &mut [f32], prev: &mut [f32], offset: usize) {
    let dim = xn.len();
    let seg = dim / 2..2 * (dim / 2);
    xn[seg.clone()].swap_with_slice(&mut prev[offset + seg.start..offset + seg.end]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// Linears of 200, 256 and 144 rows over 500 inputs (biases on the first and last), in
    /// `dtype`, written to a safetensors file.
    fn stacked_file(dir: &Path, dtype: safetensors::Dtype) -> WeightFile {
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let encode = |v: &[f32]| -> Vec<u8> {
            match dtype {
                safetensors::Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => v
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            }
        };
        let mut tensors = Vec::new();
        for (i, &(out, bias)) in [(200usize, true), (256, false), (144, true)]
            .iter()
            .enumerate()
        {
            let w: Vec<f32> = (0..out * 500).map(|_| next()).collect();
            tensors.push((format!("l{i}.weight"), vec![out, 500], encode(&w)));
            if bias {
                let b: Vec<f32> = (0..out).map(|_| next()).collect();
                tensors.push((format!("l{i}.bias"), vec![out], encode(&b)));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join("stack.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        WeightFile::open(&path).unwrap()
    }

    #[test]
    fn stacked_linears_match_each_alone_across_thread_blocks() {
        let dir = tempfile::tempdir().unwrap();
        for dtype in [safetensors::Dtype::F32, safetensors::Dtype::BF16] {
            let file = stacked_file(dir.path(), dtype);
            let lin: Vec<Linear> = [(200, true), (256, false), (144, true)]
                .iter()
                .enumerate()
                .map(|(i, &(out, bias))| {
                    Linear::load(&file, &format!("l{i}"), out, 500, bias, None)
                })
                .collect::<Result<_>>()
                .unwrap();
            let refs: Vec<&Linear> = lin.iter().collect();
            let x: Vec<f32> = (0..500)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let want: Vec<f32> = lin.iter().flat_map(|l| l.forward_scalar(&x)).collect();
            // 600 × 500 weights split into two blocks of 304 rows on two threads: they
            // straddle the 200- and 456-row boundaries; one thread runs the stack serially.
            assert_eq!(kernels::matvec_block_rows(600, 500, 2), Some(304));
            let mut outs = Vec::new();
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![0f32; 600];
                pool.install(|| Linear::forward_stacked(&refs, &x, &mut y));
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    // f32 sums of 500 products of magnitude ≤ 0.5 in a different order than the
                    // f64 scalar twin: a few ulps of the row's absolute sum (< 125).
                    assert!(
                        (a - b).abs() <= 1e-4,
                        "{dtype:?} t{threads} row {i}: {a} vs {b}"
                    );
                }
                outs.push(y);
            }
            // Every row's dot product is computed the same way whichever block it falls in, so
            // the split changes nothing: bit-identical.
            assert_eq!(outs[0], outs[1]);
        }
    }
}
