//! The attention state's kernels: the FAVOR+ decode step's fused compensated update and
//! readout, the weighted sums of value rows, and the compensated (Kahan) scale-and-add. Rows of
//! a width up to 128 stay in registers. Generic over the level ([`Lanes`]).

use half::bf16;

use super::elementwise::axpy_k;
use super::simd::{Lanes, LANES};

/// `kernel::<V>(args)` for a row width of `V` registers, `V` in 1..=8 (the widths the
/// register-blocked kernels below hold in registers; callers check the range).
macro_rules! by_vectors {
    ($vecs:expr, $kernel:ident($($arg:expr),*)) => {
        match $vecs {
            1 => $kernel::<_, 1>($($arg),*),
            2 => $kernel::<_, 2>($($arg),*),
            3 => $kernel::<_, 3>($($arg),*),
            4 => $kernel::<_, 4>($($arg),*),
            5 => $kernel::<_, 5>($($arg),*),
            6 => $kernel::<_, 6>($($arg),*),
            7 => $kernel::<_, 7>($($arg),*),
            _ => $kernel::<_, 8>($($arg),*),
        }
    };
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn kahan_update_readout_k<S: Lanes>(
    l: S,
    b: f32,
    a: &[f32],
    x: &[f32],
    w: &[f32],
    s: &mut [f32],
    c: &mut [bf16],
    out: &mut [f32],
) {
    const MAX_VECS: usize = 8;
    let d = x.len();
    let m = a.len().min(w.len());
    assert!(s.len() >= m * d && c.len() >= m * d && out.len() >= d);
    if d == 0 || !d.is_multiple_of(LANES) || d / LANES > MAX_VECS {
        for f in 0..m {
            let r = f * d..(f + 1) * d;
            kahan_scale_axpy_k(l, b, a[f], x, &mut s[r.clone()], &mut c[r.clone()]);
            axpy_k(l, w[f], &s[r], out);
        }
        return;
    }
    by_vectors!(d / LANES, update_readout_regs(l, b, a, x, w, s, c, out));
}

/// [`Kernels::kahan_update_readout`] for `d = V · 16`: `x` and the output held in `2V`
/// registers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update_readout_regs<S: Lanes, const V: usize>(
    l: S,
    b: f32,
    a: &[f32],
    x: &[f32],
    w: &[f32],
    s: &mut [f32],
    c: &mut [bf16],
    out: &mut [f32],
) {
    let d = V * LANES;
    let bv = l.splat(b);
    let (mut xs, mut acc) = ([l.zero(); V], [l.zero(); V]);
    for j in 0..V {
        xs[j] = l.load(&x[j * LANES..]);
        acc[j] = l.load(&out[j * LANES..]);
    }
    for (f, (&af, &wf)) in a.iter().zip(w).enumerate() {
        let (av, wv) = (l.splat(af), l.splat(wf));
        let (row_s, row_c) = (&mut s[f * d..(f + 1) * d], &mut c[f * d..(f + 1) * d]);
        for j in 0..V {
            let o = j * LANES;
            let (mut sv, mut cv) = (l.load(&row_s[o..]), l.load_bf16(&row_c[o..]));
            if b != 1.0 {
                sv = l.mul(sv, bv);
                cv = l.mul(cv, bv);
            }
            let y = l.mul_sub(xs[j], av, cv);
            let t = l.add(sv, y);
            l.store_bf16(&mut row_c[o..], l.sub(l.sub(t, sv), y));
            l.store(&mut row_s[o..], t);
            acc[j] = l.mul_add(t, wv, acc[j]);
        }
    }
    for (j, v) in acc.iter().enumerate() {
        l.store(&mut out[j * LANES..], *v);
    }
}

#[inline(always)]
pub(super) fn vecmat_k<S: Lanes>(s: S, p: &[f32], w: &[f32], out: &mut [f32]) {
    let d = out.len();
    assert!(
        w.len() >= p.len() * d,
        "vecmat: W has fewer than p.len() rows"
    );
    if d == 0 || !d.is_multiple_of(LANES) || d / LANES > 8 {
        // axpy_rows_k takes the same fallback for these widths: its row loop, from zero.
        out.fill(0.0);
        axpy_rows_k(s, p, w, out);
        return;
    }
    by_vectors!(d / LANES, vecmat_regs(s, p, w, out));
}

#[inline(always)]
fn vecmat_regs<S: Lanes, const V: usize>(s: S, p: &[f32], w: &[f32], out: &mut [f32]) {
    let d = V * LANES;
    let mut even = [s.zero(); V];
    let mut odd = [s.zero(); V];
    let mut pairs = p.chunks_exact(2);
    let mut j = 0;
    for pair in &mut pairs {
        let (p0, p1) = (s.splat(pair[0]), s.splat(pair[1]));
        for v in 0..V {
            even[v] = s.mul_add(s.load(&w[j * d + v * LANES..]), p0, even[v]);
            odd[v] = s.mul_add(s.load(&w[(j + 1) * d + v * LANES..]), p1, odd[v]);
        }
        j += 2;
    }
    if let [last] = pairs.remainder() {
        let pl = s.splat(*last);
        for v in 0..V {
            even[v] = s.mul_add(s.load(&w[j * d + v * LANES..]), pl, even[v]);
        }
    }
    for v in 0..V {
        s.store(&mut out[v * LANES..], s.add(even[v], odd[v]));
    }
}

#[inline(always)]
pub(super) fn axpy_rows_k<S: Lanes>(s: S, p: &[f32], w: &[f32], out: &mut [f32]) {
    let d = out.len();
    assert!(
        w.len() >= p.len() * d,
        "axpy_rows: W has fewer than p.len() rows"
    );
    if d == 0 || !d.is_multiple_of(LANES) || d / LANES > 8 {
        for (j, &pj) in p.iter().enumerate() {
            axpy_k(s, pj, &w[j * d..(j + 1) * d], out);
        }
        return;
    }
    by_vectors!(d / LANES, axpy_rows_regs(s, p, w, out));
}

#[inline(always)]
fn axpy_rows_regs<S: Lanes, const V: usize>(s: S, p: &[f32], w: &[f32], out: &mut [f32]) {
    let d = V * LANES;
    let mut acc = [s.zero(); V];
    for (v, acc) in acc.iter_mut().enumerate() {
        *acc = s.load(&out[v * LANES..]);
    }
    for (j, &pj) in p.iter().enumerate() {
        let a = s.splat(pj);
        for (v, acc) in acc.iter_mut().enumerate() {
            // axpy_k's operation and operand order: x · a + y.
            *acc = s.mul_add(s.load(&w[j * d + v * LANES..]), a, *acc);
        }
    }
    for (v, acc) in acc.iter().enumerate() {
        s.store(&mut out[v * LANES..], *acc);
    }
}

#[inline(always)]
pub(super) fn kahan_scale_axpy_k<S: Lanes>(
    l: S,
    b: f32,
    a: f32,
    x: &[f32],
    s: &mut [f32],
    c: &mut [bf16],
) {
    let n = x.len().min(s.len()).min(c.len());
    let (av, bv) = (l.splat(a), l.splat(b));
    let mut i = 0;
    while i + LANES <= n {
        let (mut sv, mut cv) = (l.load(&s[i..]), l.load_bf16(&c[i..]));
        if b != 1.0 {
            sv = l.mul(sv, bv);
            cv = l.mul(cv, bv);
        }
        let y = l.mul_sub(l.load(&x[i..]), av, cv);
        let t = l.add(sv, y);
        l.store_bf16(&mut c[i..], l.sub(l.sub(t, sv), y));
        l.store(&mut s[i..], t);
        i += LANES;
    }
    for k in i..n {
        let (mut sk, mut ck) = (s[k], c[k].to_f32());
        if b != 1.0 {
            sk *= b;
            ck *= b;
        }
        let y = a * x[k] - ck;
        let t = sk + y;
        c[k] = bf16::from_f32((t - sk) - y);
        s[k] = t;
    }
}
