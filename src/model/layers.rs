//! The building blocks of a layer, free of any model or state: a linear layer's weight (float
//! or block-quantized) and its products for one row, a few rows and many rows; the block
//! norms; the position embeddings; and one block's tensors ([`Layer`]). The forward passes in
//! `step.rs`, `rows.rs` and `reference.rs` put them together.

use rayon::prelude::*;

use crate::attention::features::transposed_tiles;
use crate::attention::rotary::Sinusoid;
use crate::config::{Config, PositionKind};
use crate::error::{Error, Result};
use crate::kernels::{self, scalar};
use crate::quant::format::{QuantFormat, QuantTensor};
use crate::weights::names::{self, BlockNames};
use crate::weights::{Tensor, WeightFile};
use crate::with_view;

/// LayerNorm epsilon of `torch.nn.LayerNorm`'s default.
pub const LAYER_NORM_EPS: f32 = 1e-5;

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

/// Row counts up to which [`Linear::forward_rows`] uses the decode kernel on cached weight
/// tiles ([`few_rows_product`]) instead of a general matrix product (whose packing dominates
/// at a few rows).
pub(crate) const FEW_ROWS: usize = 64;

/// A linear layer: `y = W x (+ b)` with `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Weight,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
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
                        Weight::Quant(q) => q.matvec_rows_prepared(r0..r1, x, act, ys),
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

    pub(crate) fn forward_scalar(&self, x: &[f32]) -> Vec<f32> {
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

    pub(crate) fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        let float = match &self.weight {
            Weight::Float(t) => Some(t),
            Weight::Quant(_) => None,
        };
        float.into_iter().chain(self.bias.iter())
    }

    pub(crate) fn quantized(&self) -> Option<&QuantTensor> {
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
    pub(crate) fn load(file: &WeightFile, prefix: &str, dim: usize) -> Result<Self> {
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

    pub(crate) fn forward_scalar(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        let (g, b) = (self.weight.view().to_vec(), self.bias.view().to_vec());
        scalar::layer_norm(x, &g, &b, LAYER_NORM_EPS, &mut out);
        out
    }

    pub(crate) fn tensors(&self) -> impl Iterator<Item = &Tensor> {
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

    pub(crate) fn apply_scalar(&self, x: &[f32]) -> Vec<f32> {
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

    pub(crate) fn tensors(&self) -> Box<dyn Iterator<Item = &Tensor> + '_> {
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
    pub(crate) fn load(file: &WeightFile, c: &Config) -> Result<Self> {
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

    pub(crate) fn tensors(&self) -> Vec<&Tensor> {
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
    /// `projection` transposed into f32 tiles ([`crate::attention::features::transposed_tiles`]).
    pub(crate) projection_t: Vec<f32>,
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
    pub(crate) fn load(file: &WeightFile, c: &Config, layer: usize) -> Result<Self> {
        let n = BlockNames::for_config(c, layer);
        let (dim, inner) = (c.dim, c.inner_dim());
        let local_heads = c.local_attn_heads[layer];
        let ff_in = c.ff_hidden() * if c.ff_glu { 2 } else { 1 };
        let q = c.weight_format;
        let projection = load_tensor(
            file,
            &format!("{}.fast_attention.projection_matrix", n.attn),
            &[c.nb_features, c.dim_head],
        )?;
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
            projection_t: transposed_tiles(&projection.view(), c.nb_features, c.dim_head),
            projection,
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

    pub(crate) fn tensors(&self) -> impl Iterator<Item = &Tensor> {
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

    pub(crate) fn quantized(&self) -> impl Iterator<Item = &QuantTensor> {
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

/// Loads `name` (under any of the names [`names::resolve`] accepts) and checks its shape.
pub(crate) fn load_tensor(file: &WeightFile, name: &str, shape: &[usize]) -> Result<Tensor> {
    let resolved = names::resolve(file, name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })?;
    let t = file.tensor(&resolved)?;
    t.expect_shape(shape)?;
    Ok(t)
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
    use std::path::Path;

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
