//! The model: config plus weights laid over the mapping, and the forward passes.
//!
//! [`Model::step`] advances one sequence by one token using its constant-size [`State`];
//! [`Model::prefill`] ingests a prompt; [`Model::forward_reference`] is the plain full-sequence
//! pass (scalar kernels, attention evaluated from its definition) that the tests hold the
//! streaming path against.

use std::path::Path;

use rayon::prelude::*;

use crate::attention::favor::{self, HeadState};
use crate::attention::rotary::{self, Sinusoid};
use crate::attention::{FeatureKind, FeatureMap};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::{self, scalar};
use crate::state::State;
use crate::weights::names::{self, BlockNames};
use crate::weights::{Dtype, Tensor, WeightFile};
use crate::with_view;

/// The per-head slices the decode step zips together.
type HeadItem<'a> = (
    (
        (
            (
                (((&'a mut [f32], &'a mut [f32]), &'a mut [f32]), &'a mut f32),
                &'a mut [f32],
            ),
            &'a mut [f32],
        ),
        &'a mut [f32],
    ),
    usize,
);

/// LayerNorm epsilon of `torch.nn.LayerNorm`'s default.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// Options applied on top of `config.json` when loading.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Overrides `kernel_eps` (ε of the softmax feature map).
    pub kernel_eps: Option<f32>,
    /// Overrides `denominator_eps` (δ of the causal denominator).
    pub denominator_eps: Option<f32>,
}

/// A linear layer: `y = W x (+ b)` with `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(file: &WeightFile, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = load_tensor(file, &format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(load_tensor(file, &format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub(crate) fn forward(&self, x: &[f32], y: &mut [f32]) {
        with_view!(self.weight.view(), |w| kernels::matvec(w, x, y));
        if let Some(b) = &self.bias {
            with_view!(b.view(), |b| kernels::add_bias(b, y));
        }
    }

    fn forward_scalar(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; self.weight.shape()[0]];
        with_view!(self.weight.view(), |w| scalar::matvec(w, x, &mut y));
        if let Some(b) = &self.bias {
            for (o, i) in y.iter_mut().zip(0..) {
                *o += b.view().get(i);
            }
        }
        y
    }

    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.weight).chain(self.bias.iter())
    }
}

/// `torch.nn.LayerNorm` with affine parameters.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
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

/// One block: FAVOR+ self-attention and a feed-forward network, each pre-normed with a
/// residual connection.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    attn_norm: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    attn_out: Linear,
    projection: Tensor,
    ff_norm: LayerNorm,
    w1: Linear,
    w2: Linear,
}

impl Layer {
    fn load(file: &WeightFile, c: &Config, layer: usize) -> Result<Self> {
        let n = BlockNames::for_config(c, layer);
        let (dim, inner) = (c.dim, c.inner_dim());
        Ok(Layer {
            attn_norm: LayerNorm::load(file, &format!("{}.norm", n.attn_branch), dim)?,
            to_q: Linear::load(file, &format!("{}.to_q", n.attn), inner, dim, c.qkv_bias)?,
            to_k: Linear::load(file, &format!("{}.to_k", n.attn), inner, dim, c.qkv_bias)?,
            to_v: Linear::load(file, &format!("{}.to_v", n.attn), inner, dim, c.qkv_bias)?,
            attn_out: Linear::load(
                file,
                &format!("{}.to_out", n.attn),
                dim,
                inner,
                c.attn_out_bias,
            )?,
            projection: load_tensor(
                file,
                &format!("{}.fast_attention.projection_matrix", n.attn),
                &[c.nb_features, c.dim_head],
            )?,
            ff_norm: LayerNorm::load(file, &format!("{}.norm", n.ff_branch), dim)?,
            w1: Linear::load(file, &format!("{}.w1", n.ff), c.ff_hidden(), dim, true)?,
            w2: Linear::load(file, &format!("{}.w2", n.ff), dim, c.ff_hidden(), true)?,
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
}

fn load_tensor(file: &WeightFile, name: &str, shape: &[usize]) -> Result<Tensor> {
    let resolved = names::resolve(file, name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })?;
    let t = file.tensor(&resolved)?;
    t.expect_shape(shape)?;
    Ok(t)
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
    config: Config,
    file: WeightFile,
    token_emb: Tensor,
    input_pos: Sinusoid,
    rotary: Sinusoid,
    layers: Vec<Layer>,
    norm: LayerNorm,
    to_out: Linear,
}

impl Model {
    /// Loads `DIR/config.json` and `DIR/model.safetensors`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(dir, LoadOptions::default())
    }

    /// Loads a model directory with runtime overrides.
    pub fn load_with(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let file = WeightFile::open(dir.join("model.safetensors"))?;
        let inferred = names::infer(&file);
        let mut config = Config::from_json(&text, &inferred)?;
        if let Some(e) = options.kernel_eps {
            config.kernel_eps = e;
        }
        if let Some(e) = options.denominator_eps {
            config.denominator_eps = e;
        }
        Self::from_parts(config, file)
    }

    /// Builds a model from a resolved config and an opened weights file, checking every
    /// tensor's presence, dtype and shape.
    pub fn from_parts(config: Config, file: WeightFile) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let token_emb = load_tensor(&file, "token_emb.weight", &[c.num_tokens, c.dim])?;
        let input_pos = Sinusoid::new(
            c.dim,
            Some(load_tensor(&file, "pos_emb.emb", &[c.max_seq_len, c.dim])?),
        );
        let rotary = Sinusoid::new(
            c.dim_head,
            Some(load_tensor(
                &file,
                "layer_pos_emb.emb",
                &[c.max_seq_len, c.dim_head],
            )?),
        );
        let layers = (0..c.depth)
            .map(|l| Layer::load(&file, c, l))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::load(&file, "norm", c.dim)?;
        let to_out = Linear::load(&file, "to_out", c.num_tokens, c.dim, true)?;
        Ok(Model {
            config,
            file,
            token_emb,
            input_pos,
            rotary,
            layers,
            norm,
            to_out,
        })
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

    /// Every tensor the forward pass reads.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.token_emb)
            .chain(self.layers.iter().flat_map(|l| l.tensors()))
            .chain(self.norm.tensors())
            .chain(self.to_out.tensors())
    }

    /// Number of learned parameters (buffers such as projection matrices and sinusoid tables
    /// are not parameters).
    pub fn parameter_count(&self) -> usize {
        self.tensors().map(Tensor::numel).sum()
    }

    /// Bytes of weights read per decoded token (all parameters but the embedding table, of
    /// which one row is read, plus the projection matrices).
    pub fn weight_bytes_per_token(&self) -> usize {
        let all: usize = self
            .tensors()
            .map(|t| t.numel() * t.dtype().size())
            .sum::<usize>()
            + self
                .layers
                .iter()
                .map(|l| l.projection.numel() * l.projection.dtype().size())
                .sum::<usize>();
        let emb = self.token_emb.numel() * self.token_emb.dtype().size();
        all - emb + self.config.dim * self.token_emb.dtype().size()
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
            kind: if c.generalized_attention {
                FeatureKind::Generalized(c.kernel_fn)
            } else {
                FeatureKind::Softmax { eps: c.kernel_eps }
            },
            projection: self.layers[layer].projection.view(),
            m: c.nb_features,
            d: c.dim_head,
        }
    }

    fn check_token(&self, token: u32) -> Result<()> {
        if token as usize >= self.config.num_tokens {
            return Err(Error::TokenOutOfRange {
                token,
                vocab: self.config.num_tokens,
            });
        }
        Ok(())
    }

    /// Consumes one token and returns the logits for the next one.
    pub fn step<'s>(&self, state: &'s mut State, token: u32) -> Result<&'s [f32]> {
        state.check_fits(self)?;
        self.check_token(token)?;
        self.forward_token(state, token, true)?;
        Ok(&state.logits)
    }

    /// Consumes a prompt and returns the logits after its last token. All ids are checked
    /// before the state changes.
    pub fn prefill<'s>(&self, state: &'s mut State, tokens: &[u32]) -> Result<&'s [f32]> {
        state.check_fits(self)?;
        let Some((&last, body)) = tokens.split_last() else {
            return Err(Error::EmptyInput("prefill needs at least one token"));
        };
        for &t in tokens {
            self.check_token(t)?;
        }
        for &t in body {
            self.forward_token(state, t, false)?;
        }
        self.forward_token(state, last, true)?;
        Ok(&state.logits)
    }

    /// Runs one token through every layer at position `state.pos`.
    fn forward_token(&self, st: &mut State, token: u32, want_logits: bool) -> Result<()> {
        let c = &self.config;
        let pos = st.pos;
        let (heads, d, m) = (c.heads, c.dim_head, c.nb_features);

        self.token_emb.row(token as usize).to_f32_into(&mut st.h);
        self.input_pos.row(pos, &mut st.tmp);
        kernels::axpy(1.0, &st.tmp, &mut st.h);
        self.rotary.row(pos, &mut st.rot);

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention branch.
            layer.attn_norm.forward(&st.h, &mut st.xn);
            layer.to_q.forward(&st.xn, &mut st.q);
            layer.to_k.forward(&st.xn, &mut st.k);
            layer.to_v.forward(&st.xn, &mut st.v);
            for hd in 0..heads {
                rotary::rotate(&mut st.q[hd * d..(hd + 1) * d], &st.rot);
                rotary::rotate(&mut st.k[hd * d..(hd + 1) * d], &st.rot);
            }
            let map = self.feature_map(l);
            let delta = c.denominator_eps;
            let n = pos + 1;
            let hm = heads * m;
            let a_mat = &mut st.a_mat[l * hm * d..(l + 1) * hm * d];
            let a_vec = &mut st.a_vec[l * hm..(l + 1) * hm];
            let v_sum = &mut st.v_sum[l * heads * d..(l + 1) * heads * d];
            let max = &mut st.max[l * heads..(l + 1) * heads];
            let run = |item: HeadItem<'_>, q: &[f32], k: &[f32], v: &[f32]| {
                let (((((((a_mat, a_vec), v_sum), max), key_feat), query_feat), out), hd) = item;
                let r = hd * d..(hd + 1) * d;
                let head = HeadState {
                    a_mat,
                    a_vec,
                    v_sum,
                    max,
                    key_feat,
                    query_feat,
                };
                let tok = favor::Token {
                    q: &q[r.clone()],
                    k: &k[r.clone()],
                    v: &v[r],
                    n,
                };
                favor::step(&map, delta, head, tok, out)
            };
            let (q, k, v) = (&st.q[..], &st.k[..], &st.v[..]);
            if heads > 1 && heads * m * d >= kernels::PAR_MIN_ELEMS {
                a_mat
                    .par_chunks_mut(m * d)
                    .zip(a_vec.par_chunks_mut(m))
                    .zip(v_sum.par_chunks_mut(d))
                    .zip(max.par_iter_mut())
                    .zip(st.key_feat.par_chunks_mut(m))
                    .zip(st.query_feat.par_chunks_mut(m))
                    .zip(st.att.par_chunks_mut(d))
                    .zip(0..heads)
                    .for_each(|x| run(x, q, k, v));
            } else {
                a_mat
                    .chunks_mut(m * d)
                    .zip(a_vec.chunks_mut(m))
                    .zip(v_sum.chunks_mut(d))
                    .zip(max.iter_mut())
                    .zip(st.key_feat.chunks_mut(m))
                    .zip(st.query_feat.chunks_mut(m))
                    .zip(st.att.chunks_mut(d))
                    .zip(0..heads)
                    .for_each(|x| run(x, q, k, v));
            }
            layer.attn_out.forward(&st.att, &mut st.tmp);
            kernels::axpy(1.0, &st.tmp, &mut st.h);

            // Feed-forward branch.
            layer.ff_norm.forward(&st.h, &mut st.xn);
            layer.w1.forward(&st.xn, &mut st.hidden);
            kernels::gelu(&mut st.hidden);
            layer.w2.forward(&st.hidden, &mut st.tmp);
            kernels::axpy(1.0, &st.tmp, &mut st.h);
        }
        st.pos += 1;
        st.has_logits = false;
        if want_logits {
            self.norm.forward(&st.h, &mut st.xn);
            self.to_out.forward(&st.xn, &mut st.logits);
            if st.logits.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFiniteLogits { position: pos });
            }
            st.has_logits = true;
        }
        Ok(())
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
        for &t in tokens {
            self.check_token(t)?;
        }
        let c = &self.config;
        let (d, dim) = (c.dim_head, c.dim);
        let mut h: Vec<Vec<f32>> = tokens
            .par_iter()
            .enumerate()
            .map(|(p, &t)| {
                let mut x = self.token_emb.row(t as usize).to_vec();
                let mut pe = vec![0.0; dim];
                self.input_pos.row(p, &mut pe);
                for (a, b) in x.iter_mut().zip(&pe) {
                    *a += b;
                }
                x
            })
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = h
                .par_iter()
                .enumerate()
                .map(|(p, x)| {
                    let xn = layer.attn_norm.forward_scalar(x);
                    let mut q = layer.to_q.forward_scalar(&xn);
                    let mut k = layer.to_k.forward_scalar(&xn);
                    let v = layer.to_v.forward_scalar(&xn);
                    let mut rot = vec![0.0; d];
                    self.rotary.row(p, &mut rot);
                    for hd in 0..c.heads {
                        rotary::rotate(&mut q[hd * d..(hd + 1) * d], &rot);
                        rotary::rotate(&mut k[hd * d..(hd + 1) * d], &rot);
                    }
                    (q, k, v)
                })
                .collect();
            let map = self.feature_map(l);
            let mut att = vec![vec![0f32; c.inner_dim()]; tokens.len()];
            for hd in 0..c.heads {
                let r = hd * d..(hd + 1) * d;
                let pick = |i: usize| -> Vec<Vec<f32>> {
                    qkv.iter()
                        .map(|t| [&t.0, &t.1, &t.2][i][r.clone()].to_vec())
                        .collect()
                };
                let out = favor::reference(&map, c.denominator_eps, &pick(0), &pick(1), &pick(2));
                for (a, o) in att.iter_mut().zip(out) {
                    a[r.clone()].copy_from_slice(&o);
                }
            }
            h = h
                .into_par_iter()
                .zip(att.par_iter())
                .map(|(mut x, a)| {
                    let o = layer.attn_out.forward_scalar(a);
                    for (xi, oi) in x.iter_mut().zip(&o) {
                        *xi += oi;
                    }
                    let xn = layer.ff_norm.forward_scalar(&x);
                    let mut hid = layer.w1.forward_scalar(&xn);
                    scalar::gelu(&mut hid);
                    let f = layer.w2.forward_scalar(&hid);
                    for (xi, fi) in x.iter_mut().zip(&f) {
                        *xi += fi;
                    }
                    x
                })
                .collect();
        }
        Ok(h.par_iter()
            .map(|x| self.to_out.forward_scalar(&self.norm.forward_scalar(x)))
            .collect())
    }
}
