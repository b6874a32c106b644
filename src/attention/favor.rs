//! The exact streaming FAVOR+ state of one head, and the quadratic-time reference it must match.
//!
//! Per head the state keeps `M` (running max of the key projections `u`), `A = Σ e_j v_jᵀ`,
//! `a = Σ e_j` with `e_j = exp(u_j − diag_j − M)`, and `s = Σ v_j`; the token count `n` is the
//! sequence position. Then `S = r (A + ε 1 sᵀ)`, `z = r (a + ε n 1)` and the output is
//! `φ(q)ᵀ S / (φ(q)·z + δ Σ φ(q))`: exactly performer-pytorch's attention on the prefix.

use super::features::{kernel_fn_f64, project_f64, FeatureKind, FeatureMap};
use crate::kernels;
use half::bf16;

/// The Kahan compensations of one head's `A`, `a`, `s`, in bf16 (see
/// [`kernels::kahan_scale_axpy`]).
pub struct Compensation<'s> {
    /// Of `A`, m×d.
    pub a_mat: &'s mut [bf16],
    /// Of `a`, m.
    pub a_vec: &'s mut [bf16],
    /// Of `s`, d.
    pub v_sum: &'s mut [bf16],
}

/// Mutable views of one head's state and scratch.
pub struct HeadState<'s> {
    /// `A`, m×d row-major.
    pub a_mat: &'s mut [f32],
    /// `a`, m.
    pub a_vec: &'s mut [f32],
    /// `s`, d.
    pub v_sum: &'s mut [f32],
    /// Kahan compensations of `A`, `a`, `s`.
    pub comp: Compensation<'s>,
    /// `M`.
    pub max: &'s mut f32,
    /// Scratch for the key features, m.
    pub key_feat: &'s mut [f32],
    /// Scratch for the query features, m.
    pub query_feat: &'s mut [f32],
}

/// One token's query, key and value for one head (after rotary).
#[derive(Debug, Clone, Copy)]
pub struct Token<'a> {
    /// Query, d.
    pub q: &'a [f32],
    /// Key, d.
    pub k: &'a [f32],
    /// Value, d.
    pub v: &'a [f32],
    /// Tokens in the state once this one is added (the `n` of the closed form).
    pub n: usize,
}

/// Adds the token's key and value to the head's state, then reads out its query into
/// `out[..d]`. `delta` is δ.
pub fn step(map: &FeatureMap<'_>, delta: f32, st: HeadState<'_>, tok: Token<'_>, out: &mut [f32]) {
    map.project(tok.k, st.key_feat);
    map.project(tok.q, st.query_feat);
    step_projected(map, delta, st, tok, out);
}

/// [`step`] when the scratch already holds the projections: `st.key_feat[..m]` =
/// [`FeatureMap::project`]`(k)` and `st.query_feat[..m]` = `project(q)` (batched decode
/// computes them for all rows and heads at once with [`FeatureMap::project_batch`]).
pub fn step_projected(
    map: &FeatureMap<'_>,
    delta: f32,
    st: HeadState<'_>,
    tok: Token<'_>,
    out: &mut [f32],
) {
    let Token { q, k, v, n } = tok;
    let (m, d) = (map.m, map.d);
    let (q, k, v, out) = (&q[..d], &k[..d], &v[..d], &mut out[..d]);
    let ek = &mut st.key_feat[..m];

    // Key features, rescaling the state when the running max grows.
    let mut rescale = 1.0f32;
    match map.kind {
        FeatureKind::Softmax { .. } => {
            let mk = kernels::max(ek);
            if mk > *st.max {
                // exp(−inf) = 0 on the first token: the state is empty then anyway.
                rescale = (*st.max - mk).exp();
                *st.max = mk;
            }
            kernels::exp_shifted(ek, map.diag(k) + *st.max);
        }
        FeatureKind::Generalized(f) => super::features::apply_kernel_fn(f, ek),
        FeatureKind::NoProjection => {
            // φ(k) = exp(k) with no stabiliser in performer-pytorch; keeping a running max is
            // exact because the common factor exp(M) cancels, except against δ (see below).
            let mk = kernels::max(ek);
            if mk > *st.max {
                rescale = (*st.max - mk).exp();
                *st.max = mk;
            }
            kernels::exp_shifted(ek, *st.max);
        }
    }

    // Query features w = φ(q) / r without ε: ε and r are applied in closed form below.
    let w = &mut st.query_feat[..m];
    map.query_from_projection(q, w);
    let (r, eps) = (map.r(), map.eps());
    // φ(q)_f = r (w_f + ε)
    for x in w.iter_mut() {
        *x = r * (*x + eps);
    }
    let phi_sum = kernels::sum(w);

    // One pass over A: update row f (compensated), then accumulate its contribution to φ(q)ᵀA.
    out.fill(0.0);
    kernels::kahan_update_readout(rescale, ek, v, w, st.a_mat, st.comp.a_mat, out);
    kernels::kahan_scale_axpy(rescale, 1.0, ek, st.a_vec, st.comp.a_vec);
    kernels::kahan_scale_axpy(1.0, 1.0, v, st.v_sum, st.comp.v_sum);

    // num = r (φᵀA + ε Σφ s);  den = r (φ·a + ε n Σφ) + δ Σφ
    let num_eps = eps * phi_sum;
    // Without a projection the state is exp(−M) times performer-pytorch's, so δ scales alike.
    let delta = match map.kind {
        FeatureKind::NoProjection => (delta as f64 * (-(*st.max as f64)).exp()) as f32,
        _ => delta,
    };
    let den = r * (kernels::dot::<f32>(w, st.a_vec) + eps * n as f32 * phi_sum) + delta * phi_sum;
    let inv = 1.0 / den;
    for (o, s) in out.iter_mut().zip(st.v_sum.iter()) {
        *o = r * (*o + num_eps * s) * inv;
    }
}

/// The definition, evaluated directly in f64: for each query position `t`, every key `j ≤ t`
/// gets features computed with the stabiliser `M_t` of the prefix (quadratic time). Rows of
/// `q`, `k`, `v` are positions; returns the outputs row by row.
pub fn reference(
    map: &FeatureMap<'_>,
    delta: f32,
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    use rayon::prelude::*;
    let (m, d) = (map.m, map.d);
    let c = (d as f64).powf(-0.25);
    let r = match map.kind {
        FeatureKind::Softmax { .. } => (m as f64).powf(-0.5),
        FeatureKind::Generalized(_) | FeatureKind::NoProjection => 1.0,
    };
    let diag = |x: &[f32]| x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() * c * c / 2.0;
    let uk: Vec<Vec<f64>> = k.iter().map(|x| project_f64(map, x)).collect();
    let key_max: Vec<f64> = uk
        .iter()
        .map(|u| u.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
        .collect();
    let key_diag: Vec<f64> = k.iter().map(|x| diag(x)).collect();

    (0..q.len())
        .into_par_iter()
        .map(|t| {
            let uq = project_f64(map, &q[t]);
            let phi_q: Vec<f64> = match map.kind {
                FeatureKind::Softmax { eps } => {
                    let mq = uq.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let dq = diag(&q[t]);
                    uq.iter()
                        .map(|u| r * ((u - dq - mq).exp() + eps as f64))
                        .collect()
                }
                FeatureKind::Generalized(f) => uq
                    .iter()
                    .map(|&u| kernel_fn_f64(f, u) + super::features::GENERALIZED_KERNEL_EPS as f64)
                    .collect(),
                FeatureKind::NoProjection => {
                    let mq = uq.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = uq.iter().map(|u| (u - mq).exp()).collect();
                    let s: f64 = e.iter().sum();
                    e.iter().map(|x| x / s).collect()
                }
            };
            let m_t = key_max[..=t]
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            let mut num = vec![0f64; d];
            let mut den = 0f64;
            for j in 0..=t {
                let weight: f64 = (0..m)
                    .map(|f| {
                        let phi_k = match map.kind {
                            FeatureKind::Softmax { eps } => {
                                r * ((uk[j][f] - key_diag[j] - m_t).exp() + eps as f64)
                            }
                            FeatureKind::Generalized(g) => {
                                kernel_fn_f64(g, uk[j][f])
                                    + super::features::GENERALIZED_KERNEL_EPS as f64
                            }
                            // performer-pytorch's exp(k), unstabilised (f64 has the range).
                            FeatureKind::NoProjection => uk[j][f].exp(),
                        };
                        phi_q[f] * phi_k
                    })
                    .sum();
                for (n, &x) in num.iter_mut().zip(&v[j]) {
                    *n += weight * x as f64;
                }
                den += weight;
            }
            den += delta as f64 * phi_q.iter().sum::<f64>();
            num.iter().map(|x| (x / den) as f32).collect()
        })
        .collect()
}

/// One head's state without per-token scratch, for the chunked path.
pub struct HeadStateRef<'s> {
    /// `A`, m×d.
    pub a_mat: &'s mut [f32],
    /// `a`, m.
    pub a_vec: &'s mut [f32],
    /// `s`, d.
    pub v_sum: &'s mut [f32],
    /// Kahan compensations of `A`, `a`, `s`.
    pub comp: Compensation<'s>,
    /// `M`.
    pub max: &'s mut f32,
}

impl<'s> HeadStateRef<'s> {
    /// The head's state with `m`-wide scratch for the key and query features, for [`step`].
    pub fn with_scratch(self, key_feat: &'s mut [f32], query_feat: &'s mut [f32]) -> HeadState<'s> {
        let HeadStateRef {
            a_mat,
            a_vec,
            v_sum,
            comp,
            max,
        } = self;
        HeadState {
            a_mat,
            a_vec,
            v_sum,
            comp,
            max,
            key_feat,
            query_feat,
        }
    }
}

/// `T` consecutive tokens' queries, keys and values for one head, `T × d` row-major each.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Tokens in the state before the first row.
    pub n0: usize,
}

/// The chunkwise form over `T` consecutive tokens of one head: the inter-chunk term from the
/// carried state, a masked intra-chunk product, then the state update, with matrix products for
/// the dense parts. `q`, `k`, `v`, `out` are `T × d` row-major; `n0` is the number of tokens
/// before the chunk.
///
/// Each key `j` gets features `E_j = exp(u_j − diag_j − M_j)` with the running max `M_j` at its
/// own position (so every factor below is `exp` of a non-positive number: no overflow), and a
/// query at `t` weighs it by `exp(M_j − M_t)`: exactly the rescaling the streaming step does.
pub fn chunk(
    map: &FeatureMap<'_>,
    delta: f32,
    st: HeadStateRef<'_>,
    rows: Rows<'_>,
    out: &mut [f32],
) {
    // The heads of a chunk run in parallel (`model::attend`), so each product here runs on
    // its head's thread.
    use crate::kernels::matmul::{gemm_f32_serial as gemm_f32, MatRef};
    let Rows { q, k, v, n0 } = rows;
    let (m, d) = (map.m, map.d);
    let t_len = q.len() / d;
    if t_len == 0 {
        return;
    }
    let (r, eps) = (map.r(), map.eps());
    let tracks_max = !matches!(map.kind, FeatureKind::Generalized(_));

    // Projections of every key and query at once: U = c · X Wᵀ (a plain copy without one).
    let project_all = |x: &[f32]| -> Vec<f32> {
        let mut u = vec![0f32; t_len * m];
        if map.kind == FeatureKind::NoProjection {
            u.copy_from_slice(&x[..t_len * d]);
        } else {
            crate::with_view!(map.projection, |w| crate::kernels::sgemm::linear_serial(
                crate::kernels::isa::active(),
                &x[..t_len * d],
                t_len,
                w,
                m,
                &mut u
            ));
            kernels::scale(map.c(), &mut u);
        }
        u
    };

    // Key features and running maxima.
    let mut ek = project_all(k);
    let mut run_max = vec![0f32; t_len];
    let mut cur = *st.max;
    for t in 0..t_len {
        let kt = &k[t * d..(t + 1) * d];
        let e = &mut ek[t * m..(t + 1) * m];
        match map.kind {
            FeatureKind::Softmax { .. } => {
                cur = cur.max(kernels::max(e));
                kernels::exp_shifted(e, map.diag(kt) + cur);
            }
            FeatureKind::NoProjection => {
                cur = cur.max(kernels::max(e));
                kernels::exp_shifted(e, cur);
            }
            FeatureKind::Generalized(f) => super::features::apply_kernel_fn(f, e),
        }
        run_max[t] = cur;
    }
    // exp(M_a − M_b) with M_b ≥ M_a; 1 when no max is tracked; 0 from an empty state.
    let factor = |from: f32, to: f32| if tracks_max { (from - to).exp() } else { 1.0 };

    // Query features w_t = r (φ + ε).
    let mut wq = project_all(q);
    for t in 0..t_len {
        let w = &mut wq[t * m..(t + 1) * m];
        match map.kind {
            FeatureKind::Softmax { .. } => {
                let shift = map.diag(&q[t * d..(t + 1) * d]) + kernels::max(w);
                kernels::exp_shifted(w, shift);
            }
            FeatureKind::Generalized(f) => super::features::apply_kernel_fn(f, w),
            FeatureKind::NoProjection => kernels::softmax(w),
        }
        for x in w.iter_mut() {
            *x = r * (*x + eps);
        }
    }

    // Inter-chunk: C = Wq A_prev, wa = Wq a_prev, each scaled by exp(M_prev − M_t).
    let wq_m = MatRef::row_major(&wq, t_len, m);
    gemm_f32(wq_m, MatRef::row_major(st.a_mat, m, d), out, d, false);
    let mut wa: Vec<f32> = (0..t_len)
        .map(|t| kernels::dot::<f32>(&wq[t * m..(t + 1) * m], st.a_vec))
        .collect();
    for t in 0..t_len {
        let f = factor(*st.max, run_max[t]);
        kernels::scale(f, &mut out[t * d..(t + 1) * d]);
        wa[t] *= f;
    }

    // Intra-chunk: G = Wq Ekᵀ, masked causally and weighted by exp(M_j − M_t).
    let mut g = vec![0f32; t_len * t_len];
    gemm_f32(
        wq_m,
        MatRef::row_major(&ek, t_len, m).t(),
        &mut g,
        t_len,
        false,
    );
    // Weights exp(M_j − M_t) of a row, vectorized; all exactly 1 while the running maximum
    // stays put over the chunk (the common case once a sequence has warmed up).
    let flat = !tracks_max || run_max[0] == run_max[t_len - 1];
    let mut weight = vec![0f32; if flat { 0 } else { t_len }];
    for t in 0..t_len {
        let row = &mut g[t * t_len..(t + 1) * t_len];
        let (seen, future) = row.split_at_mut(t + 1);
        future.fill(0.0);
        if !flat {
            let w = &mut weight[..t + 1];
            w.copy_from_slice(&run_max[..t + 1]);
            kernels::exp_shifted(w, run_max[t]);
            for (x, f) in seen.iter_mut().zip(w.iter()) {
                *x *= f;
            }
        }
        wa[t] += kernels::sum(row);
    }
    gemm_f32(
        MatRef::row_major(&g, t_len, t_len),
        MatRef::row_major(&v[..t_len * d], t_len, d),
        out,
        d,
        true,
    );

    // Readout with the closed-form ε and δ terms; s_t is a running (compensated) prefix sum.
    for t in 0..t_len {
        kernels::kahan_scale_axpy(1.0, 1.0, &v[t * d..(t + 1) * d], st.v_sum, st.comp.v_sum);
        let s = &*st.v_sum;
        let w = &wq[t * m..(t + 1) * m];
        let phi_sum = kernels::sum(w);
        let n = (n0 + t + 1) as f32;
        let delta_t = match map.kind {
            FeatureKind::NoProjection => (delta as f64 * (-(run_max[t] as f64)).exp()) as f32,
            _ => delta,
        };
        let den = r * (wa[t] + eps * n * phi_sum) + delta_t * phi_sum;
        let inv = 1.0 / den;
        let num_eps = eps * phi_sum;
        for (o, sv) in out[t * d..(t + 1) * d].iter_mut().zip(s) {
            *o = r * (*o + num_eps * sv) * inv;
        }
    }

    // State update to the end of the chunk: the chunk's sum ΔA = Σ_j exp(M_j − M_end) E_j v_jᵀ
    // as one product, then one compensated rescale-and-add into the carried state.
    let end = run_max[t_len - 1];
    let sc = factor(*st.max, end);
    for t in 0..t_len {
        let f = factor(run_max[t], end);
        kernels::scale(f, &mut ek[t * m..(t + 1) * m]);
    }
    let mut delta_a = vec![0f32; m * d];
    gemm_f32(
        MatRef::row_major(&ek, t_len, m).t(),
        MatRef::row_major(&v[..t_len * d], t_len, d),
        &mut delta_a,
        d,
        false,
    );
    kernels::kahan_scale_axpy(sc, 1.0, &delta_a, st.a_mat, st.comp.a_mat);
    let mut delta_a_vec = vec![0f32; m];
    for t in 0..t_len {
        kernels::axpy(1.0, &ek[t * m..(t + 1) * m], &mut delta_a_vec);
    }
    kernels::kahan_scale_axpy(sc, 1.0, &delta_a_vec, st.a_vec, st.comp.a_vec);
    if tracks_max {
        *st.max = end;
    }
}

/// One head's state with f64 accumulators (see [`crate::state::Precision::F64`]).
pub struct HeadState64<'s> {
    /// `A`, m×d.
    pub a_mat: &'s mut [f64],
    /// `a`, m.
    pub a_vec: &'s mut [f64],
    /// `s`, d.
    pub v_sum: &'s mut [f64],
    /// `M`.
    pub max: &'s mut f64,
    /// Scratch for the key features, m.
    pub key_feat: &'s mut [f32],
    /// Scratch for the query features, m.
    pub query_feat: &'s mut [f32],
}

/// [`step`] with the running sums `A`, `a`, `s`, `M` and the readout in f64; features are
/// computed in f32 as in [`step`]. The reference for measuring the f32 state's drift.
pub fn step_f64(
    map: &FeatureMap<'_>,
    delta: f32,
    st: HeadState64<'_>,
    tok: Token<'_>,
    out: &mut [f32],
) {
    let Token { q, k, v, n } = tok;
    let (m, d) = (map.m, map.d);
    let (q, k, v, out) = (&q[..d], &k[..d], &v[..d], &mut out[..d]);
    let ek = &mut st.key_feat[..m];
    let mut rescale = 1.0f64;
    match map.kind {
        FeatureKind::Softmax { .. } | FeatureKind::NoProjection => {
            map.project(k, ek);
            let mk = kernels::max(ek) as f64;
            if mk > *st.max {
                rescale = (*st.max - mk).exp();
                *st.max = mk;
            }
            let diag = if matches!(map.kind, FeatureKind::Softmax { .. }) {
                map.diag(k) as f64
            } else {
                0.0
            };
            for e in ek.iter_mut() {
                *e = (*e as f64 - diag - *st.max).exp() as f32;
            }
        }
        FeatureKind::Generalized(f) => {
            map.project(k, ek);
            super::features::apply_kernel_fn(f, ek);
        }
    }
    let w = &mut st.query_feat[..m];
    map.query(q, w);
    let (r, eps) = (map.r() as f64, map.eps() as f64);
    let mut acc = vec![0f64; d];
    let mut phi_sum = 0f64;
    let mut wa = 0f64;
    for f in 0..m {
        let wf = r * (w[f] as f64 + eps);
        phi_sum += wf;
        let row = &mut st.a_mat[f * d..(f + 1) * d];
        let e = ek[f] as f64;
        for j in 0..d {
            row[j] = rescale * row[j] + e * v[j] as f64;
            acc[j] += wf * row[j];
        }
        st.a_vec[f] = rescale * st.a_vec[f] + e;
        wa += wf * st.a_vec[f];
    }
    for (s, &x) in st.v_sum.iter_mut().zip(v) {
        *s += x as f64;
    }
    let delta = match map.kind {
        FeatureKind::NoProjection => delta as f64 * (-*st.max).exp(),
        _ => delta as f64,
    };
    let den = r * (wa + eps * n as f64 * phi_sum) + delta * phi_sum;
    for j in 0..d {
        out[j] = (r * (acc[j] + eps * phi_sum * st.v_sum[j]) / den) as f32;
    }
}
