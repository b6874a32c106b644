//! Feature maps φ: the positive softmax kernel (FAVOR+) and generalized elementwise kernels.
//!
//! Notation of `../shared/favor-math.md`: `d` = head width, `m` = features, `W` the m×d
//! projection from the checkpoint, `c = d^(−1/4)`, `r = m^(−1/2)`.

use crate::config::KernelFn;
use crate::kernels::{self, Elem};
use crate::weights::View;
use crate::with_view;

/// performer-pytorch's `kernel_epsilon` of `generalized_kernel`, a constant of the library.
pub const GENERALIZED_KERNEL_EPS: f32 = 0.001;

/// Which feature map a model's global heads use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeatureKind {
    /// `φ(x) = r · (exp(c·Wx − c²|x|²/2 − M) + ε)`.
    Softmax {
        /// ε (`kernel_eps`).
        eps: f32,
    },
    /// `φ(x) = f(c·Wx) + 0.001`.
    Generalized(KernelFn),
    /// `no_projection`: `φ(q) = softmax(q)` over the head dim, `φ(k) = exp(k)`; `m = d`.
    NoProjection,
}

/// Features per tile of [`FeatureMap::projection_t`]: two 16-lane vectors of outputs, with
/// their even and odd partial sums, are eight ymm registers at AVX2 and four zmm at AVX-512.
pub const PROJECTION_TILE: usize = 32;

/// The projection `W` (`m × d`) transposed into tiles: tile `t` holds `Wᵀ` for features
/// `t·T .. min((t+1)·T, m)` (`T` = [`PROJECTION_TILE`]) as a row-major `d × width` block, at
/// offset `t·T·d`. One token's features are then `d` scaled rows added per tile, kept in
/// registers ([`kernels::vecmat`]), instead of a horizontal sum per feature; the tiles are a
/// few KiB, so batched decode takes every vector through one tile while it sits in L1.
pub fn transposed_tiles(projection: &View<'_>, m: usize, d: usize) -> Vec<f32> {
    let w = projection.to_vec();
    assert!(w.len() >= m * d, "projection: fewer than m·d values");
    let mut out = vec![0f32; m * d];
    for t0 in (0..m).step_by(PROJECTION_TILE) {
        let width = PROJECTION_TILE.min(m - t0);
        let tile = &mut out[t0 * d..(t0 + width) * d];
        for j in 0..d {
            for f in 0..width {
                tile[j * width + f] = w[(t0 + f) * d + j];
            }
        }
    }
    out
}

/// The feature map of one layer: a kind plus the layer's projection matrix.
#[derive(Debug, Clone, Copy)]
pub struct FeatureMap<'w> {
    /// The kind.
    pub kind: FeatureKind,
    /// The m×d projection matrix.
    pub projection: View<'w>,
    /// The same matrix transposed, in f32, in tiles of [`PROJECTION_TILE`] features
    /// ([`transposed_tiles`]): what stepping and batched decode project with.
    pub projection_t: &'w [f32],
    /// Features `m`.
    pub m: usize,
    /// Head width `d`.
    pub d: usize,
}

impl FeatureMap<'_> {
    /// `c = d^(−1/4)`, the data normalizer.
    pub fn c(&self) -> f32 {
        (self.d as f32).powf(-0.25)
    }

    /// The overall factor of φ: `r = m^(−1/2)` for softmax features, 1 for generalized ones.
    pub fn r(&self) -> f32 {
        match self.kind {
            FeatureKind::Softmax { .. } => (self.m as f32).powf(-0.5),
            FeatureKind::Generalized(_) | FeatureKind::NoProjection => 1.0,
        }
    }

    /// The additive ε inside φ that the state keeps separate (0 for generalized kernels,
    /// whose constant is folded into the features).
    pub fn eps(&self) -> f32 {
        match self.kind {
            FeatureKind::Softmax { eps } => eps,
            FeatureKind::Generalized(_) | FeatureKind::NoProjection => 0.0,
        }
    }

    /// `u = c · W x` into `u[..m]` (a plain copy of `x` without a projection): per tile of
    /// [`PROJECTION_TILE`] features, `Σ_j x_j · Wᵀ_j` in registers ([`transposed_tiles`]).
    pub fn project(&self, x: &[f32], u: &mut [f32]) {
        self.project_batch(&x[..self.d], 1, u);
    }

    /// [`FeatureMap::project`] of `count` vectors at once: `x` holds `count × d` values (row
    /// major), `u` receives `count × m`. Each row is bit for bit what `project` gives it (the
    /// same [`kernels::vecmat`] per vector and tile), while each tile of the projection is
    /// read once for all rows: batched decode projects every row's and head's query and key
    /// in one call.
    pub fn project_batch(&self, x: &[f32], count: usize, u: &mut [f32]) {
        let (m, d) = (self.m, self.d);
        let (x, u) = (&x[..count * d], &mut u[..count * m]);
        if self.kind == FeatureKind::NoProjection {
            for (u, x) in u.chunks_exact_mut(m).zip(x.chunks_exact(d)) {
                u.copy_from_slice(&x[..m]);
            }
            return;
        }
        assert!(
            self.projection_t.len() >= m * d,
            "feature map: transposed projection of fewer than m·d values"
        );
        for t0 in (0..m).step_by(PROJECTION_TILE) {
            let width = PROJECTION_TILE.min(m - t0);
            let tile = &self.projection_t[t0 * d..(t0 + width) * d];
            for (u, x) in u.chunks_exact_mut(m).zip(x.chunks_exact(d)) {
                kernels::vecmat(x, tile, &mut u[t0..t0 + width]);
            }
        }
        kernels::scale(self.c(), u);
    }

    /// `c² · |x|² / 2`, the softmax kernel's norm term.
    pub fn diag(&self, x: &[f32]) -> f32 {
        let c = self.c();
        kernels::dot::<f32>(x, x) * c * c * 0.5
    }

    /// Query features without the outer factor `r` and ε: for the softmax kernel
    /// `exp(u − diag − max u)`, for generalized kernels `f(u) + 0.001`, without a projection
    /// `softmax(q)`. Written to `u[..m]`.
    pub fn query(&self, q: &[f32], u: &mut [f32]) {
        self.project(q, u);
        self.query_from_projection(q, u);
    }

    /// [`FeatureMap::query`] when `u[..m]` already holds [`FeatureMap::project`]`(q)`.
    pub fn query_from_projection(&self, q: &[f32], u: &mut [f32]) {
        let u = &mut u[..self.m];
        match self.kind {
            FeatureKind::Softmax { .. } => {
                let shift = self.diag(q) + kernels::max(u);
                kernels::exp_shifted(u, shift);
            }
            FeatureKind::Generalized(f) => apply_kernel_fn(f, u),
            FeatureKind::NoProjection => kernels::softmax(u),
        }
    }
}

/// `u = f(u) + 0.001` for a generalized kernel.
pub fn apply_kernel_fn(f: KernelFn, u: &mut [f32]) {
    match f {
        KernelFn::Relu => {
            for v in u.iter_mut() {
                *v = v.max(0.0);
            }
        }
        KernelFn::Gelu => kernels::gelu(u),
    }
    for v in u.iter_mut() {
        *v += GENERALIZED_KERNEL_EPS;
    }
}

/// The same kernel function in f64 for the reference path.
pub fn kernel_fn_f64(f: KernelFn, x: f64) -> f64 {
    match f {
        KernelFn::Relu => x.max(0.0),
        KernelFn::Gelu => 0.5 * x * (1.0 + kernels::scalar::erf(x / std::f64::consts::SQRT_2)),
    }
}

/// `c · W x` in f64 for the reference path (`x` itself without a projection).
pub fn project_f64(map: &FeatureMap<'_>, x: &[f32]) -> Vec<f64> {
    if map.kind == FeatureKind::NoProjection {
        return x[..map.m].iter().map(|&v| v as f64).collect();
    }
    let c = (map.d as f64).powf(-0.25);
    (0..map.m)
        .map(|f| {
            let row = map.projection.slice(f * map.d..(f + 1) * map.d);
            let s: f64 = with_view!(row, |w| w
                .iter()
                .zip(x)
                .map(|(a, b)| a.to_f32() as f64 * *b as f64)
                .sum());
            c * s
        })
        .collect()
}
