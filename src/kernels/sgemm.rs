//! `y = x · Wᵀ` for many rows at once (prefill chunks; batches larger than the few-rows
//! kernels take): the weight products of the compute-bound paths, at the kernels' level.
//!
//! A packed-panel matrix product in the manner of BLIS, written once over [`Lanes`]. Per block
//! of [`KC`] columns (the depth `k`):
//! - `x`'s rows are packed `MR` at a time as `[k][MR]` (a micro-panel the kernel reads one
//!   broadcast per row and step);
//! - `W`'s rows are packed `NR = 16·NV` at a time as `[k][NR]`, widened from any [`Elem`] on
//!   the way (a `KC × NR` panel of at most 32 KiB, which stays in L1 while every micro-panel
//!   of `x` passes over it);
//! - the micro-kernel keeps an `MR × NR` tile of `y` in registers for the whole block: per step
//!   `NV` loads of `W`, `MR` broadcasts of `x` and `MR · NV` multiply-adds.
//!
//! The tile per level ([`Lanes::GEMM_TILE`]) fills its register file: AVX-512 12 × 32 (24 of
//! 32 zmm accumulating), AVX2 6 × 16 (12 of 16 ymm), portable 4 × 16.
//!
//! The products are split across the rayon pool by columns of `y` (rows of `W`): each task
//! packs only its own rows of `W`, and writes its columns into its own buffer, copied into `y`
//! after (no two tasks write one slice). Each output is `Σ_k x_k · w_k` in `k` order within a
//! block of [`KC`], the blocks' sums added in order: the twin is [`super::scalar::linear`]
//! (f64 sums), and `tests/kernels.rs` holds every level to it.

use std::cell::Cell;
use std::ops::Range;

use rayon::prelude::*;

use super::simd::{Elem, Lanes, LANES};
use super::Kernels;
use crate::quant::{dequantize_row, QMatrix, BLOCK};

/// Depth of one packed block: a panel of `W` (`KC × 32` floats at AVX-512) fills the 32 KiB L1
/// data cache, and `x`'s packed block (`rows × KC`) sits in L2.
pub const KC: usize = 256;

/// Work (multiply-adds) below which a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 20;

/// The register tile of the micro-kernel at a level: `rows` rows of `x` times `vectors` 16-lane
/// vectors of `W`'s rows (`16 · vectors` outputs) per pass over a block.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmTile {
    /// Rows of `x` (MR).
    pub rows: usize,
    /// 16-lane vectors of outputs (NV; NR = 16 · NV).
    pub vectors: usize,
}

thread_local! {
    /// The packed `x` of the products this thread starts (a prefill chunk's is a few hundred
    /// KiB to a few MiB: allocated per call, it would be mapped and faulted in again).
    static PACKED_X: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// A task's packed panel of `W` and its staging rows.
    static PACKED_W: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The rows of `W` a product packs, each widened to f32 as the matrix-vector kernels read it:
/// a float matrix of any [`Elem`] ([`ElemRows`]) or a quantized one ([`QMatrix`], widened as
/// [`QMatrix::dequantize_rows`] does, so the products are those of the dequantized model).
pub trait WeightRows: Copy + Send + Sync {
    /// Rows `range` as rows of their own.
    fn row_range(self, range: Range<usize>) -> Self;
    /// Row `j`'s columns `k0 .. k0 + kc` as f32: the row itself when it is f32, otherwise
    /// widened into `buf` (`kc` long). `k0` and `kc` are whole blocks of 32 for a quantized
    /// matrix (the products' packing depth [`KC`] is; a quantized row's blocks).
    fn row_f32<'s, S: Lanes>(
        &'s self,
        s: S,
        j: usize,
        k0: usize,
        kc: usize,
        buf: &'s mut [f32],
    ) -> &'s [f32];
}

/// The most rows of `W` in one packed panel (`NR` of the widest tile, AVX-512's 2 × 16).
const MAX_NR: usize = 32;

/// The zero rows that pad a panel past the last row of `W`.
static ZERO_ROW: [f32; KC] = [0.0; KC];

/// Rows `j0 .. j0 + n` (`n ≤ nr`) of `w`, columns `k0 .. k0 + kc`, packed as `[kc][nr]` into
/// `dst` (`kc · nr` long), the missing rows zero; rows that are not f32 are widened into
/// `staging` (`nr · kc` long) first.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_w<S: Lanes, R: WeightRows>(
    s: S,
    w: &R,
    j0: usize,
    n: usize,
    k0: usize,
    kc: usize,
    dst: &mut [f32],
    staging: &mut [f32],
) {
    let nr = dst.len() / kc;
    assert!(
        nr <= MAX_NR && n <= nr && kc <= KC,
        "sgemm: panel too large"
    );
    let mut rows: [&[f32]; MAX_NR] = [&ZERO_ROW[..kc]; MAX_NR];
    for ((j, row), buf) in rows
        .iter_mut()
        .enumerate()
        .take(n)
        .zip(staging.chunks_mut(kc))
    {
        *row = w.row_f32(s, j0 + j, k0, kc, buf);
    }
    s.pack_panel(&rows[..nr], kc, dst);
}

/// A row-major float matrix of any [`Elem`], `cols` wide, as [`WeightRows`].
#[derive(Debug, Clone, Copy)]
pub struct ElemRows<'a, T> {
    w: &'a [T],
    cols: usize,
}

impl<'a, T: Elem> ElemRows<'a, T> {
    /// The rows of `w`, `cols` wide (a partial last row is never read).
    pub fn new(w: &'a [T], cols: usize) -> Self {
        ElemRows { w, cols }
    }
}

impl<T: Elem> WeightRows for ElemRows<'_, T> {
    #[inline(always)]
    fn row_range(self, range: Range<usize>) -> Self {
        ElemRows {
            w: &self.w[range.start * self.cols..range.end * self.cols],
            cols: self.cols,
        }
    }
    #[inline(always)]
    fn row_f32<'s, S: Lanes>(
        &'s self,
        s: S,
        j: usize,
        k0: usize,
        kc: usize,
        buf: &'s mut [f32],
    ) -> &'s [f32] {
        let at = j * self.cols + k0;
        let src = &self.w[at..at + kc];
        if let Some(row) = T::as_f32(src) {
            return row;
        }
        // Widened exactly (bf16 and f16 are subsets of f32), 16 at a time.
        let buf = &mut buf[..kc];
        let mut chunks = buf.chunks_exact_mut(LANES);
        for (d, w) in (&mut chunks).zip(src.chunks_exact(LANES)) {
            s.store(d, s.load_elem(w));
        }
        let done = kc - chunks.into_remainder().len();
        for (d, &v) in buf[done..].iter_mut().zip(&src[done..]) {
            *d = v.to_f32();
        }
        buf
    }
}

impl WeightRows for QMatrix<'_> {
    #[inline(always)]
    fn row_range(self, range: Range<usize>) -> Self {
        QMatrix::row_range(&self, range)
    }
    #[inline(always)]
    fn row_f32<'s, S: Lanes>(
        &'s self,
        _s: S,
        j: usize,
        k0: usize,
        kc: usize,
        buf: &'s mut [f32],
    ) -> &'s [f32] {
        let row = self.row(j);
        let (b0, blocks) = (k0 / BLOCK, kc / BLOCK);
        let bb = self.format.block_bytes();
        let mins = if self.format.has_mins() {
            &row.mins[b0..b0 + blocks]
        } else {
            &[][..]
        };
        dequantize_row(
            self.format,
            &row.codes[b0 * bb..(b0 + blocks) * bb],
            &row.scales[b0..b0 + blocks],
            mins,
            &mut buf[..kc],
        );
        &buf[..kc]
    }
}

/// `y = x · Wᵀ` at the level of `kernels`: `x` is `rows × k` row-major (`k = x.len() / rows`),
/// `W` has `out` rows of `k` columns, `y` is `rows × out` row-major. Split across the rayon
/// pool when large, by columns of `y`.
///
/// # Panics
/// When `y` is shorter than `rows × out`, or (reading them) `W` holds fewer rows or columns.
pub fn linear_rows<R: WeightRows>(
    kernels: Kernels,
    x: &[f32],
    rows: usize,
    w: R,
    out: usize,
    y: &mut [f32],
) {
    product(kernels, x, rows, w, out, y, true)
}

/// [`linear`] on the calling thread only: for products that are themselves one of many run
/// in parallel (the FAVOR+ chunk's per-head projections), where splitting each again would
/// only add hand-offs.
pub fn linear_serial<T: Elem>(
    kernels: Kernels,
    x: &[f32],
    rows: usize,
    w: &[T],
    out: usize,
    y: &mut [f32],
) {
    product(kernels, x, rows, float_rows(x, rows, w, out), out, y, false)
}

/// `w` as the `out` rows of `k = x.len() / rows` columns the product over `x` reads.
///
/// # Panics
/// When `w` holds fewer than `out × k` weights.
fn float_rows<'a, T: Elem>(x: &[f32], rows: usize, w: &'a [T], out: usize) -> ElemRows<'a, T> {
    let k = x.len().checked_div(rows).unwrap_or(0);
    assert!(w.len() >= out * k, "sgemm: W is smaller than out × k");
    ElemRows::new(w, k)
}

/// [`linear_rows`], split across the pool only when `parallel`.
fn product<R: WeightRows>(
    kernels: Kernels,
    x: &[f32],
    rows: usize,
    w: R,
    out: usize,
    y: &mut [f32],
    parallel: bool,
) {
    if rows == 0 || out == 0 {
        return;
    }
    let k = x.len() / rows;
    let (x, y) = (&x[..rows * k], &mut y[..rows * out]);
    if k == 0 {
        y.fill(0.0);
        return;
    }
    let shape = tile(kernels);
    let nr = LANES * shape.vectors;
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let tasks = if threads > 1 && rows * out * k >= PAR_MIN_MACS {
        // Two tasks per thread, whole panels each: a thread slowed by the machine's other
        // work holds up half as much.
        (2 * threads).min(out.div_ceil(nr))
    } else {
        1
    };
    let mut xp = PACKED_X.take();
    pack_x(kernels, shape.rows, x, rows, k, &mut xp, tasks > 1);
    let ptr = y.as_mut_ptr();
    if tasks <= 1 {
        // SAFETY: `y` (`rows × out`, sliced above) is borrowed mutably for this whole block
        // and reached only through this view.
        let y = unsafe { OutColumns::new(ptr, out, rows, 0, out) };
        run_task(kernels, shape, &xp, rows, k, w, y);
    } else {
        let per = out.div_ceil(tasks).next_multiple_of(nr);
        let ptr = SendPtr(ptr);
        let xp = &xp;
        (0..out.div_ceil(per)).into_par_iter().for_each(|t| {
            let (j0, cols) = (t * per, per.min(out - t * per));
            // SAFETY: `y` is borrowed mutably until the tasks have joined; task `t` alone
            // reaches its columns `j0 .. j0 + cols` (disjoint from every other task's) of its
            // `rows` rows of `out`.
            let y = unsafe { OutColumns::new(ptr.get(), out, rows, j0, cols) };
            run_task(kernels, shape, xp, rows, k, w.row_range(j0..j0 + cols), y);
        });
    }
    PACKED_X.set(xp);
}

/// `y = x · Wᵀ` for a float `W` (`out × k`, row-major): [`linear_rows`] over [`ElemRows`].
pub fn linear<T: Elem>(
    kernels: Kernels,
    x: &[f32],
    rows: usize,
    w: &[T],
    out: usize,
    y: &mut [f32],
) {
    linear_rows(kernels, x, rows, float_rows(x, rows, w, out), out, y)
}

/// The output pointer, shared with the tasks (each reaches only its own columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint columns through it (`linear_rows`), and it does not
// outlive the borrow of `y` it came from.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Columns `j0 .. j0 + cols` of the `rows` rows of a row-major output of row stride `ldc`:
/// what one task writes.
pub(super) struct OutColumns {
    ptr: *mut f32,
    ldc: usize,
    rows: usize,
    j0: usize,
    cols: usize,
}

impl OutColumns {
    /// # Safety
    /// `ptr` is valid for reads and writes of `rows × ldc` floats, `j0 + cols ≤ ldc`, and
    /// while the view lives nothing else reads or writes those columns of those rows.
    unsafe fn new(ptr: *mut f32, ldc: usize, rows: usize, j0: usize, cols: usize) -> Self {
        debug_assert!(j0 + cols <= ldc);
        OutColumns {
            ptr,
            ldc,
            rows,
            j0,
            cols,
        }
    }

    /// The view's columns.
    fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r`'s columns `j .. j + n` of the view.
    ///
    /// # Panics
    /// When they are outside the view.
    #[inline(always)]
    fn row(&mut self, r: usize, j: usize, n: usize) -> &mut [f32] {
        assert!(
            r < self.rows && j + n <= self.cols,
            "sgemm: outside the task's columns"
        );
        // SAFETY: inside the view (asserted), which `new`'s contract makes this task's alone;
        // `&mut self` keeps two of these slices from living at once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.ldc + self.j0 + j), n) }
    }
}

/// `x`'s rows packed `mr` at a time, each panel `[k][mr]` (rows past the end zero), panel `p`
/// at `p · mr · k`: block `k0 .. k0 + kc` of a panel is then `[kc][mr]` at `mr · k0`.
/// Panels in parallel when `parallel`.
fn pack_x(
    kernels: Kernels,
    mr: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    xp: &mut Vec<f32>,
    parallel: bool,
) {
    let panels = rows.div_ceil(mr);
    // Every element is written below: no need to zero what is already there.
    xp.resize(panels * mr * k, 0.0);
    xp.truncate(panels * mr * k);
    let pack = |p: usize, dst: &mut [f32]| {
        let r0 = p * mr;
        let mut k0 = 0;
        while k0 < k {
            // Depth blocks of `KC`, so that the missing rows can be `ZERO_ROW`s.
            let kc = KC.min(k - k0);
            let mut panel: [&[f32]; MAX_NR] = [&ZERO_ROW[..kc]; MAX_NR];
            for (r, row) in panel.iter_mut().enumerate().take(mr.min(rows - r0)) {
                let at = (r0 + r) * k + k0;
                *row = &x[at..at + kc];
            }
            kernels.pack_panel(&panel[..mr], kc, &mut dst[mr * k0..mr * (k0 + kc)]);
            k0 += kc;
        }
    };
    if parallel {
        xp.par_chunks_mut(mr * k)
            .enumerate()
            .for_each(|(p, dst)| pack(p, dst));
    } else {
        for (p, dst) in xp.chunks_mut(mr * k).enumerate() {
            pack(p, dst);
        }
    }
}

/// The body of [`Kernels::pack_panel`].
#[inline(always)]
pub(super) fn pack_panel_k<S: Lanes>(s: S, rows: &[&[f32]], kc: usize, dst: &mut [f32]) {
    s.pack_panel(rows, kc, dst);
}

/// The level's register tile.
fn tile(kernels: Kernels) -> GemmTile {
    match kernels.isa() {
        #[cfg(target_arch = "x86_64")]
        super::Isa::Avx512 => <super::x86::Avx512 as Lanes>::GEMM_TILE,
        #[cfg(target_arch = "x86_64")]
        super::Isa::Avx2 => <super::x86::Avx2 as Lanes>::GEMM_TILE,
        _ => <super::simd::Portable as Lanes>::GEMM_TILE,
    }
}

/// One task on this thread, with its panel buffer (sized by `shape`, the level's tile).
fn run_task<R: WeightRows>(
    kernels: Kernels,
    shape: GemmTile,
    xp: &[f32],
    rows: usize,
    k: usize,
    w: R,
    y: OutColumns,
) {
    let mut wp = PACKED_W.take();
    // The panel, then the staging rows of a dtype that is widened before it is packed.
    wp.resize(2 * LANES * shape.vectors * KC.min(k), 0.0);
    kernels.sgemm_task(xp, rows, k, w, y, &mut wp);
    PACKED_W.set(wp);
}

/// The body of [`Kernels::sgemm_task`]: the task's columns of `y` `= x · wᵀ` from `x` packed
/// by [`pack_x`], by the level's tile.
#[inline(always)]
pub(super) fn sgemm_task_k<S: Lanes, R: WeightRows>(
    s: S,
    xp: &[f32],
    rows: usize,
    k: usize,
    w: R,
    y: OutColumns,
    wp: &mut [f32],
) {
    match (S::GEMM_TILE.rows, S::GEMM_TILE.vectors) {
        (12, 2) => blocks::<S, R, 12, 2>(s, xp, rows, k, w, y, wp),
        (6, 1) => blocks::<S, R, 6, 1>(s, xp, rows, k, w, y, wp),
        _ => blocks::<S, R, 4, 1>(s, xp, rows, k, w, y, wp),
    }
}

/// The blocked loops for an `MR × 16·NV` tile.
#[inline(always)]
fn blocks<S: Lanes, R: WeightRows, const MR: usize, const NV: usize>(
    s: S,
    xp: &[f32],
    rows: usize,
    k: usize,
    w: R,
    mut y: OutColumns,
    wp: &mut [f32],
) {
    let nr = NV * LANES;
    let (wp, staging) = wp.split_at_mut(wp.len() / 2);
    let cols = y.cols();
    let panels = rows.div_ceil(MR);
    assert!(xp.len() >= panels * MR * k, "sgemm: packed x too short");
    // Panel by panel of W, each read once, block after block of its depth (its rows
    // stream from memory in order); every panel of x passes over each block while it sits
    // in L1, and the tile of y accumulates over the blocks.
    let mut j0 = 0;
    while j0 < cols {
        let n = nr.min(cols - j0);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let wp = &mut wp[..kc * nr];
            pack_w(s, &w, j0, n, k0, kc, wp, &mut staging[..kc * nr]);
            for p in 0..panels {
                let panel = &xp[p * MR * k + MR * k0..p * MR * k + MR * (k0 + kc)];
                micro::<S, MR, NV>(s, panel, wp, &mut y, p * MR, rows, j0, n, k0 == 0);
            }
            k0 += kc;
        }
        j0 += nr;
    }
}

/// The micro-kernel: the `MR × 16·NV` tile at rows `r0 .. min(r0 + MR, rows)` and columns
/// `j0 .. j0 + n` of the task's `y` set (`first`) or increased by the packed panels' product.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn micro<S: Lanes, const MR: usize, const NV: usize>(
    s: S,
    xp: &[f32],
    wp: &[f32],
    y: &mut OutColumns,
    r0: usize,
    rows: usize,
    j0: usize,
    n: usize,
    first: bool,
) {
    let mut acc = [[s.zero(); NV]; MR];
    for (xk, wk) in xp.chunks_exact(MR).zip(wp.chunks_exact(NV * LANES)) {
        let mut wv = [s.zero(); NV];
        for (v, wv) in wv.iter_mut().enumerate() {
            *wv = s.load(&wk[v * LANES..]);
        }
        for (acc, &xv) in acc.iter_mut().zip(xk) {
            let xv = s.splat(xv);
            for (a, &wv) in acc.iter_mut().zip(&wv) {
                *a = s.mul_add(xv, wv, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows - r0) {
        let row = y.row(r0 + r, j0, n);
        for (v, &a) in acc.iter().enumerate() {
            let lo = v * LANES;
            if lo >= n {
                break;
            }
            let out = &mut row[lo..];
            if out.len() >= LANES {
                let sum = if first { a } else { s.add(a, s.load(out)) };
                s.store(out, sum);
            } else {
                let sum = if first {
                    a
                } else {
                    s.add(a, s.load_partial(out))
                };
                s.store_partial(out, sum);
            }
        }
    }
}
