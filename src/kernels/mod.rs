//! Hot kernels: SIMD versions for the model and plain scalar twins the tests hold them against.
//!
//! Every `foo` has a `scalar::foo` computing the same thing one element at a time; the tests in
//! `tests/kernels.rs` compare them on random and edge inputs at every instruction-set level the
//! machine supports. Weight-reading kernels are generic over [`Elem`] so f16 and bf16 weights
//! are widened in registers, never copied to f32.
//!
//! Each kernel is written once, generic over a [`simd::Lanes`] level, and chosen at run time
//! ([`isa`]): the free functions here use the process's level ([`isa::active`]); the same
//! kernels at an explicit level are methods of [`Kernels`].

pub mod isa;
pub mod matmul;
pub mod quant;
pub mod scalar;
pub mod simd;

use half::bf16;
use rayon::prelude::*;

pub use isa::{Isa, Kernels};
pub use simd::{Elem, LANES};

use simd::Lanes;

/// Below this many weight elements (64 KiB of f32) a matrix-vector product runs on the calling
/// thread. Above it the product is split into at least one row block per thread: during decode
/// the pool's workers are awake (products follow each other microseconds apart), so handing
/// one block to the other core costs about a microsecond, and even the 256×256 products of a
/// small model gain (docs/performance.md has the tiny-shape measurement behind the threshold).
pub const PAR_MIN_ELEMS: usize = 1 << 14;

/// Weight elements (1 MiB of f32) per parallel block that a large product aims at: products up
/// to `threads` × this get one block per thread (each extra block is one more hand-off);
/// larger ones get more, a multiple of the thread count up to four per thread, so a thread
/// slowed by the other work of a shared machine holds up less of the product (the split of
/// gpt2-small's products is the one measured before this threshold changed).
const BLOCK_ELEMS: usize = 1 << 18;

/// Parallel blocks of a matrix-vector product are whole multiples of this many rows (each
/// thread's slice of the output then starts on a 32-byte boundary of it).
const MATVEC_ROWS: usize = 8;

/// Rows per parallel block of a `rows × cols` matrix-vector product on `threads` threads:
/// multiples of 8 rows, one to four blocks per thread and a multiple of the thread count (about
/// `BLOCK_ELEMS` weights each); `None` when the product is too small to split (`PAR_MIN_ELEMS`, one thread, or a
/// single block).
pub fn matvec_block_rows(rows: usize, cols: usize, threads: usize) -> Option<usize> {
    let elems = rows.saturating_mul(cols);
    if elems < PAR_MIN_ELEMS || threads <= 1 {
        return None;
    }
    let blocks = elems
        .div_ceil(BLOCK_ELEMS)
        .next_multiple_of(threads)
        .clamp(threads, 4 * threads);
    let block = rows.div_ceil(blocks).next_multiple_of(MATVEC_ROWS);
    (block < rows).then_some(block)
}

/// Generates, from one list of kernel signatures: for each x86 level a module of
/// `#[target_feature]` entry points that run the generic body with that level's token (the
/// body and the intrinsics it calls are all `#[inline(always)]`, so they compile inside the
/// entry point with its instructions; a closure or a library helper such as
/// `std::array::from_fn` around an intrinsic is compiled without the level's features and
/// calls it out of line, which `scripts/check_inline_intrinsics.sh` catches in CI); the [`Kernels`] method that picks the entry point of its
/// level; and, for public kernels, the free function at the process's level.
macro_rules! kernels {
    ($(
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $(<$g:ident: $b:ident>)? ($($arg:ident: $ty:ty),* $(,)?)
            $(-> $ret:ty)? => $body:ident;
    )*) => {
        #[cfg(target_arch = "x86_64")]
        mod avx512_entry {
            use super::*;
            $(
                #[target_feature(enable = "avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2")]
                #[allow(clippy::too_many_arguments)]
                pub(super) unsafe fn $name $(<$g: $b>)? ($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: callers hold a `Kernels` of this level, which exists only when
                    // the CPU has the token's features (the same list as this function's).
                    let s = unsafe { simd::Avx512::new_unchecked() };
                    super::$body(s, $($arg),*)
                }
            )*
        }

        #[cfg(target_arch = "x86_64")]
        mod avx2_entry {
            use super::*;
            $(
                #[target_feature(enable = "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2")]
                #[allow(clippy::too_many_arguments)]
                pub(super) unsafe fn $name $(<$g: $b>)? ($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: as for the AVX-512 entry points, with the AVX2 token.
                    let s = unsafe { simd::Avx2::new_unchecked() };
                    super::$body(s, $($arg),*)
                }
            )*
        }

        impl Kernels {
            $(
                $(#[$attr])*
                #[allow(clippy::too_many_arguments)]
                #[inline]
                $vis fn $name $(<$g: $b>)? (self, $($arg: $ty),*) $(-> $ret)? {
                    match self.isa() {
                        // SAFETY: `self` holds a level only when the CPU supports it
                        // (`Kernels::new`, `isa::active`): the entry point's features exist.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => unsafe { avx512_entry::$name($($arg),*) },
                        // SAFETY: as above.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe { avx2_entry::$name($($arg),*) },
                        _ => $body(simd::Portable, $($arg),*),
                    }
                }
            )*
        }
    };
}

/// The free functions: each kernel at the process's level ([`isa::active`]).
macro_rules! at_active_level {
    ($(
        $(#[$attr:meta])*
        pub fn $name:ident $(<$g:ident: $b:ident>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;
    )*) => {$(
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        #[inline]
        pub fn $name $(<$g: $b>)? ($($arg: $ty),*) $(-> $ret)? {
            isa::active().$name($($arg),*)
        }
    )*};
}

at_active_level! {
    /// Dot product of a weight row and an f32 vector ([`Kernels::dot`]).
    pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32;
    /// `y = W x` on the calling thread only ([`Kernels::matvec_serial`]).
    pub fn matvec_serial<T: Elem>(w: &[T], x: &[f32], y: &mut [f32]);
    /// `y = W x`, large products split across the rayon pool ([`Kernels::matvec`]).
    pub fn matvec<T: Elem>(w: &[T], x: &[f32], y: &mut [f32]);
    /// `y = X Wᵀ` for a few input rows, on the calling thread ([`Kernels::matvec_batch`]).
    pub fn matvec_batch<T: Elem>(w: &[T], x: &[f32], inputs: usize, y: &mut [f32]);
    /// `y += a · x` ([`Kernels::axpy`]).
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]);
    /// `x *= a` ([`Kernels::scale`]).
    pub fn scale(a: f32, x: &mut [f32]);
    /// Maximum of a slice ([`Kernels::max`]).
    pub fn max(x: &[f32]) -> f32;
    /// Sum of a slice ([`Kernels::sum`]).
    pub fn sum(x: &[f32]) -> f32;
    /// `x[i] = exp(x[i] - shift)` in place ([`Kernels::exp_shifted`]).
    pub fn exp_shifted(x: &mut [f32], shift: f32);
    /// Exact (erf) GELU in place ([`Kernels::gelu`]).
    pub fn gelu(x: &mut [f32]);
    /// LayerNorm ([`Kernels::layer_norm`]).
    pub fn layer_norm<T: Elem>(x: &[f32], gamma: &[T], beta: &[T], eps: f32, out: &mut [f32]);
    /// Numerically stable softmax in place ([`Kernels::softmax`]).
    pub fn softmax(x: &mut [f32]);
    /// `y += b` ([`Kernels::add_bias`]).
    pub fn add_bias<T: Elem>(b: &[T], y: &mut [f32]);
    /// Widens weights to f32 ([`Kernels::widen`]).
    pub fn widen<T: Elem>(src: &[T], dst: &mut [f32]);
    /// Narrows to bf16, rounding to nearest even ([`Kernels::narrow_bf16`]).
    pub fn narrow_bf16(src: &[f32], dst: &mut [bf16]);
    /// The FAVOR+ decode step's fused state update and readout ([`Kernels::kahan_update_readout`]).
    pub fn kahan_update_readout(
        b: f32,
        a: &[f32],
        x: &[f32],
        w: &[f32],
        s: &mut [f32],
        c: &mut [bf16],
        out: &mut [f32],
    );
    /// `out = pᵀ W` ([`Kernels::vecmat`]).
    pub fn vecmat(p: &[f32], w: &[f32], out: &mut [f32]);
    /// `out += Σ_j p_j · W_j`, row after row as repeated [`axpy`] ([`Kernels::axpy_rows`]).
    pub fn axpy_rows(p: &[f32], w: &[f32], out: &mut [f32]);
    /// Compensated `s = b · s + a · x` ([`Kernels::kahan_scale_axpy`]).
    pub fn kahan_scale_axpy(b: f32, a: f32, x: &[f32], s: &mut [f32], c: &mut [bf16]);
}

kernels! {
    /// Dot product of a weight row and an f32 vector.
    ///
    /// # Panics
    /// Never for equal lengths; extra elements of the longer slice are ignored.
    pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 => dot_k;

    /// `y = W x` over the rows of `w` (`cols` wide) on this thread.
    fn matvec_rows<T: Elem>(w: &[T], cols: usize, x: &[f32], y: &mut [f32]) => matvec_rows_k;

    /// `y = X Wᵀ` for `inputs` input rows of `cols` columns and `y.len() / inputs` weight rows.
    fn matvec_batch_rows<T: Elem>(w: &[T], cols: usize, inputs: usize, x: &[f32], y: &mut [f32])
        => matvec_batch_k;

    /// `y += a · x`.
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) => axpy_k;

    /// `x *= a`.
    pub fn scale(a: f32, x: &mut [f32]) => scale_k;

    /// Maximum of a slice (`-inf` for an empty one; NaN propagates as a non-maximum).
    pub fn max(x: &[f32]) -> f32 => max_k;

    /// Sum of a slice (four accumulators, so a long sum runs at the read bandwidth).
    pub fn sum(x: &[f32]) -> f32 => sum_k;

    /// `x[i] = exp(x[i] - shift)` in place. The vector `exp` reduces the range by ln 2 and
    /// evaluates a degree-6 polynomial, about 2 ulp on [-87, 88]; inputs below -87.3 give
    /// exactly 0 (no denormals), above 88.7 give +inf, NaN stays NaN.
    pub fn exp_shifted(x: &mut [f32], shift: f32) => exp_shifted_k;

    /// Exact (erf) GELU in place: `x · Φ(x)`, as `torch.nn.GELU()`; the vector error function
    /// is Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7).
    pub fn gelu(x: &mut [f32]) => gelu_k;

    /// LayerNorm over the whole vector: `(x − mean) / sqrt(var + eps) · gamma + beta`, biased
    /// variance, as `torch.nn.LayerNorm`.
    pub fn layer_norm<T: Elem>(x: &[f32], gamma: &[T], beta: &[T], eps: f32, out: &mut [f32])
        => layer_norm_k;

    /// Numerically stable softmax in place.
    pub fn softmax(x: &mut [f32]) => softmax_k;

    /// `y += b` for a bias vector stored in any weight dtype.
    pub fn add_bias<T: Elem>(b: &[T], y: &mut [f32]) => add_bias_k;

    /// `dst[i] = src[i]` widened to f32 (exact), over the shorter of the two.
    pub fn widen<T: Elem>(src: &[T], dst: &mut [f32]) => widen_k;

    /// `dst[i] = src[i]` narrowed to bf16, rounded to nearest even exactly as
    /// `half::bf16::from_f32` (NaN stays NaN), over the shorter of the two: the store of the
    /// state's Kahan compensations, exposed as a kernel so that every level of it is tested.
    pub fn narrow_bf16(src: &[f32], dst: &mut [bf16]) => narrow_bf16_k;

    /// A FAVOR+ decode step's one pass over a head's `m × d` state (`d = x.len()`,
    /// `m = a.len()`): row `f` of `s` becomes `b · s_f + a_f · x` exactly as
    /// [`Kernels::kahan_scale_axpy`] computes it (compensation in `c`), and then
    /// `out += w_f · s_f` with the new row, as [`Kernels::axpy`] would. Bit-identical to those
    /// two calls per row; for `d` a multiple of 16 up to 128 the output and `x` stay in
    /// registers across all rows instead of a call pair per 64-float row.
    pub fn kahan_update_readout(
        b: f32,
        a: &[f32],
        x: &[f32],
        w: &[f32],
        s: &mut [f32],
        c: &mut [bf16],
        out: &mut [f32],
    ) => kahan_update_readout_k;

    /// `out = pᵀ W = Σ_j p_j · W_j` for a row-major `W` of `p.len()` rows of width `out.len()`
    /// (attention's weighted sum of value rows). For widths that are a multiple of 16 up to
    /// 128 the output stays in registers, with two accumulator sets so consecutive rows do not
    /// wait on each other's FMA.
    pub fn vecmat(p: &[f32], w: &[f32], out: &mut [f32]) => vecmat_k;

    /// `out += Σ_j p_j · W_j` for a row-major `W` of `p.len()` rows of width `out.len()`,
    /// each row added exactly as [`Kernels::axpy`] adds it, in row order: bit for bit the same
    /// as `p.len()` calls of `axpy` (local attention's weighted sum of value rows, whose
    /// results must not change), but for widths that are a multiple of 16 up to 128 the output
    /// stays in registers instead of a call, a load and a store per row.
    ///
    /// # Panics
    /// When `W` has fewer than `p.len()` rows.
    pub fn axpy_rows(p: &[f32], w: &[f32], out: &mut [f32]) => axpy_rows_k;

    /// Compensated (Kahan) `s = b · s + a · x`, keeping in `c` the low-order bits each
    /// addition lost, so that rounding does not accumulate over millions of additions (the
    /// true sum is `s − c`). `b` rescales sum and compensation alike.
    ///
    /// The compensation is kept in bf16, rounded to nearest: it is at most half an ulp of
    /// `s`, so its 8 bits carry the sum to ~2⁻³³ relative per addition instead of f32's 2⁻²⁴,
    /// and the state's memory traffic (the bound of batched decode) is 3/4 of an f32 pair's.
    pub fn kahan_scale_axpy(b: f32, a: f32, x: &[f32], s: &mut [f32], c: &mut [bf16])
        => kahan_scale_axpy_k;
}

impl Kernels {
    /// `y = W x` on the calling thread only (a block of rows of a larger product).
    pub fn matvec_serial<T: Elem>(self, w: &[T], x: &[f32], y: &mut [f32]) {
        assert_eq!(
            w.len(),
            y.len() * x.len(),
            "matvec: weight is not [rows, cols]"
        );
        self.matvec_rows(w, x.len(), x, y);
    }

    /// `y = X Wᵀ` on the calling thread for `inputs` input rows `x` (`inputs × cols`, row
    /// major) and a row-major `w` of shape `[out, cols]`: `y` is `inputs × out`, and
    /// `y[i·out + o]` is bit for bit what [`Kernels::matvec_serial`] gives for row `o` of `w`
    /// and input row `i` (the same split accumulators, added in the same order). The weights
    /// are read once for all inputs: each tile of a few weight rows is multiplied by every
    /// input row while it sits in registers and L1, several outputs at once ([`simd::BatchTile`]
    /// of the level), so that each loaded weight vector feeds several multiply-adds. This is
    /// batched decode's product: a few rows, where a general matrix product's packing costs
    /// more than it saves.
    ///
    /// # Panics
    /// When the lengths do not fit those shapes (`x.len() = inputs · cols`,
    /// `y.len() = inputs · out`, `w.len() = out · cols`).
    pub fn matvec_batch<T: Elem>(self, w: &[T], x: &[f32], inputs: usize, y: &mut [f32]) {
        if inputs == 0 {
            assert!(
                x.is_empty() && y.is_empty(),
                "matvec_batch: no inputs but data"
            );
            return;
        }
        assert!(
            x.len().is_multiple_of(inputs) && y.len().is_multiple_of(inputs),
            "matvec_batch: x or y is not {inputs} rows"
        );
        let (cols, out) = (x.len() / inputs, y.len() / inputs);
        assert_eq!(
            w.len(),
            out * cols,
            "matvec_batch: weight is not [out, cols]"
        );
        if out == 0 {
            return;
        }
        self.matvec_batch_rows(w, cols, inputs, x, y);
    }

    /// `y = W x` for a row-major `W` of shape `[y.len(), x.len()]` (a torch `Linear` weight).
    ///
    /// Large matrices are split into row blocks across the rayon pool.
    pub fn matvec<T: Elem>(self, w: &[T], x: &[f32], y: &mut [f32]) {
        let (rows, cols) = (y.len(), x.len());
        assert_eq!(w.len(), rows * cols, "matvec: weight is not [rows, cols]");
        let Some(block) = matvec_block_rows(rows, cols, rayon::current_num_threads()) else {
            self.matvec_rows(w, cols, x, y);
            return;
        };
        y.par_chunks_mut(block)
            .enumerate()
            .for_each(|(b, y_block)| {
                let start = b * block;
                self.matvec_rows(
                    &w[start * cols..(start + y_block.len()) * cols],
                    cols,
                    x,
                    y_block,
                );
            });
    }
}

// The generic kernel bodies. Every one is `#[inline(always)]`: compiled into the dispatching
// method's per-level `#[target_feature]` function, never as a call of its own.

#[inline(always)]
fn dot_k<S: Lanes, T: Elem>(s: S, w: &[T], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    let mut acc = [s.zero(); 4];
    let mut i = 0;
    while i + 4 * LANES <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let o = i + j * LANES;
            *a = s.mul_add(s.load_elem(&w[o..]), s.load(&x[o..]), *a);
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        acc[0] = s.mul_add(s.load_elem(&w[i..]), s.load(&x[i..]), acc[0]);
        i += LANES;
    }
    let mut sum = s.reduce_add(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])));
    for k in i..n {
        sum += w[k].to_f32() * x[k];
    }
    sum
}

/// `y = W x`, one row after another. Rows are read strictly in order as one sequential stream,
/// which the hardware prefetchers follow at full speed; taking several interleaved rows at a
/// time (short streams a few KiB apart) read a memory-resident matrix markedly slower, which
/// sharing the loads of `x` did not make up for (docs/performance.md).
#[inline(always)]
fn matvec_rows_k<S: Lanes, T: Elem>(s: S, w: &[T], cols: usize, x: &[f32], y: &mut [f32]) {
    // Same size and both Pod: the cast cannot fail when T is bf16.
    if T::KIND == simd::ElemKind::Bf16 && s.bf16_matvec_rows(bytemuck::cast_slice(w), cols, x, y) {
        return;
    }
    for (r, out) in y.iter_mut().enumerate() {
        *out = dot_k(s, &w[r * cols..(r + 1) * cols], x);
    }
}

/// Weight rows per tile of the batched product when it runs the single-row kernel once per
/// input row (few inputs, or bf16 weights at a level with its own bf16 row kernel): 16 rows
/// of gpt2-small's widest input (3072) are 192 KiB of f32, inside L2, read from memory once
/// and reused for every input row.
const BATCH_ROW_TILE: usize = 16;

/// Input rows from which the batched product packs weight blocks and runs register tiles.
/// Below it, the copy into the block buffer costs more than the tiles save: measured on
/// gpt2-small at B=4 (2 threads, depth 0), 57 t/s with the single-row kernel on cached tiles
/// against 42 t/s packed.
const BATCH_TILED_INPUTS: usize = 8;

/// Bytes of f32 weights per block of the batched product: a block that stays in L2 (1–2 MiB
/// per core here) beside the inputs while every input row passes over it.
const BATCH_PACK_BYTES: usize = 96 << 10;

std::thread_local! {
    /// The batched product's block of weight rows, widened to f32.
    static BATCH_PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The batched product's input rows, copied to 64-byte-aligned rows.
    static BATCH_INPUTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Elements from the start of `buf` to its first 64-byte boundary (a cache line, and a
/// 512-bit vector): at most 15 (`min` only guards `align_offset`'s documented right to give
/// up, which would leave the part merely unaligned).
fn line_offset(buf: &[f32]) -> usize {
    buf.as_ptr().align_offset(LINE).min(LANES - 1)
}

/// `len` elements of `buf` starting on a 64-byte boundary, `buf` grown as needed.
fn aligned_part(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + LANES {
        buf.resize(len + LANES, 0.0);
    }
    let off = line_offset(buf);
    &mut buf[off..off + len]
}

/// A zeroed f32 buffer whose first element sits on a 64-byte boundary: rows of a width that
/// is a multiple of 16 then each start on a cache line, and [`Kernels::matvec_batch`] reads
/// them where they are instead of copying them to aligned rows. Derefs to the `len`
/// elements.
pub struct AlignedBuf {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0f32; len + LANES - 1];
        let off = line_offset(&buf);
        AlignedBuf { buf, off, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// `y = X Wᵀ` ([`Kernels::matvec_batch`]) for `inputs` input rows of `cols` columns.
///
/// The weights go block by block ([`BATCH_PACK_BYTES`]): register tiles of the level's
/// [`simd::BatchTile`] shape multiply a block with every input row from cache while the next
/// block is prefetched. f16 and bf16 blocks are first widened into a per-thread f32 buffer
/// (widening in every tile converted each weight once per input row; widening is exact, so the
/// products are those of the single-row kernel); f32 blocks are used where they lie (copying
/// them too cost ~10% more CPU time at B=16 on gpt2-small). Without the prefetch, the loads
/// of the first input row waited on memory with only a few rows' streams in flight. Fewer than [`BATCH_TILED_INPUTS`] inputs, and bf16 weights at a
/// level with its own bf16 row kernel, go through the single-row kernel on cached tiles of
/// weight rows instead (bf16 so that they too stay bit-identical to it).
#[inline(always)]
fn matvec_batch_k<S: Lanes, T: Elem>(
    s: S,
    w: &[T],
    cols: usize,
    inputs: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let out = y.len() / inputs.max(1);
    if cols == 0 {
        // Empty sums, as the single-row kernel gives them.
        y.fill(0.0);
        return;
    }
    if inputs == 1 {
        // One input: nothing to reuse a block for; the single-row kernel streams the weights.
        matvec_rows_k(s, w, cols, x, y);
        return;
    }
    if inputs < BATCH_TILED_INPUTS || (T::KIND == simd::ElemKind::Bf16 && S::BF16_MATVEC) {
        for t0 in (0..out).step_by(BATCH_ROW_TILE) {
            let t1 = (t0 + BATCH_ROW_TILE).min(out);
            for i in 0..inputs {
                matvec_rows_k(
                    s,
                    &w[t0 * cols..t1 * cols],
                    cols,
                    &x[i * cols..(i + 1) * cols],
                    &mut y[i * out + t0..i * out + t1],
                );
            }
        }
        return;
    }
    let tile = S::BATCH_TILE;
    let per = (BATCH_PACK_BYTES / 4 / cols.max(1)).max(tile.rows) / tile.rows * tile.rows;
    let mut buf = BATCH_PACK.take();
    let mut xbuf = BATCH_INPUTS.take();
    // Rows already on cache lines (the model's activation buffers, `AlignedBuf`) are read in
    // place; others are copied to aligned rows first.
    let in_place = cols.is_multiple_of(LANES) && x.as_ptr().align_offset(LINE) == 0;
    let xstride = cols.next_multiple_of(LANES);
    let xs: &[f32] = if in_place {
        x
    } else {
        let xs = aligned_part(&mut xbuf, inputs * xstride);
        for (dst, src) in xs.chunks_exact_mut(xstride).zip(x.chunks_exact(cols)) {
            dst[..cols].copy_from_slice(src);
        }
        xs
    };
    let pack = aligned_part(&mut buf, per * cols);
    let mut p0 = 0;
    while p0 < out {
        let p1 = (p0 + per).min(out);
        let src = &w[p0 * cols..p1 * cols];
        let packed: &[f32] = match T::as_f32(src) {
            Some(f) => f,
            None => {
                widen_k(s, src, &mut pack[..src.len()]);
                &pack[..src.len()]
            }
        };
        // The next block's weights, fetched into cache while this one is multiplied.
        let next = &w[p1 * cols..(p1 + per).min(out) * cols];
        let block = Block {
            w: packed,
            cols,
            rows: p1 - p0,
            first: p0,
            out,
            next: bytemuck::cast_slice(next),
            xstride,
        };
        match (tile.rows, tile.inputs, tile.split) {
            (3, 2, 4) => batch_tiles::<S, 3, 2, 4>(s, block, inputs, xs, y),
            (2, 2, 1) => batch_tiles::<S, 2, 2, 1>(s, block, inputs, xs, y),
            (1, 2, 1) => batch_tiles::<S, 1, 2, 1>(s, block, inputs, xs, y),
            _ => batch_tiles::<S, 1, 1, 4>(s, block, inputs, xs, y),
        }
        p0 = p1;
    }
    BATCH_PACK.set(buf);
    BATCH_INPUTS.set(xbuf);
}

/// A block of weight rows (widened, `rows × cols`) of a batched product: rows
/// `first..first + rows` of a weight with `out` rows, `out` also being the row stride of `y`.
#[derive(Clone, Copy)]
struct Block<'a> {
    w: &'a [f32],
    cols: usize,
    rows: usize,
    first: usize,
    out: usize,
    /// The raw bytes of the next block, to prefetch a share of in every tile.
    next: &'a [u8],
    /// Row stride of the inputs `x` (at least `cols`).
    xstride: usize,
}

/// Bytes of a cache line (the prefetch granule).
const LINE: usize = 64;

/// Bytes of a register tile's weight rows, per column chunk, that stay in L1 while every input
/// row passes over them. Rows wider than this (gpt2-small's FF output: 3 rows × 3072 columns
/// = 36 KiB against Zen 4's 32 KiB L1) were reloaded from L2 for every input row, at ~45
/// GFLOP/s per core against ~68 for 768-column rows; split into column chunks, with the
/// accumulators kept in memory between chunks, they run like the narrow ones.
const BATCH_TILE_L1_BYTES: usize = 12 << 10;

/// A block's products in `R × C` register tiles (weight rows × input rows), the edges in
/// `R × 1`, `1 × C` and `1 × 1` tiles. Weight tiles outside, input rows inside: a tile of `R`
/// weight rows is reused from L1 for every input row. When the tile's rows are wider than
/// [`BATCH_TILE_L1_BYTES`], the columns go in chunks (whole 64-column blocks): every input
/// row passes over one chunk of the tile before the next chunk, each tile's accumulators
/// saved between chunks. An accumulator sees the same multiply-adds in the same order either
/// way, so the results are bit for bit the same.
#[inline(always)]
fn batch_tiles<S: Lanes, const R: usize, const C: usize, const J: usize>(
    s: S,
    b: Block<'_>,
    inputs: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let blocks = b.cols / (4 * LANES);
    let per_chunk = (BATCH_TILE_L1_BYTES / (R * 4 * 4 * LANES)).max(1);
    let chunks = blocks.div_ceil(per_chunk).max(1);
    // Every tile prefetches its share of the next block's lines, spread over its columns.
    let tiles = (b.rows / R + b.rows % R) * (inputs / C + inputs % C) * chunks;
    let share = b.next.len().div_ceil(LINE).div_ceil(tiles.max(1)) * LINE;
    let mut pf = 0;
    if chunks == 1 {
        // Whole rows: the tiles' sums start and end in registers. (One loop over both cases,
        // like the chunked one below, measured 5–12% slower on 768-column rows.)
        let span = Span { k: 0..blocks };
        macro_rules! whole {
            ($r:expr, $c:expr, $o:expr, $i:expr) => {{
                batch_tile::<S, $r, $c, J, true, true>(
                    s,
                    b,
                    $o,
                    x,
                    $i,
                    y,
                    pf..pf + share,
                    &span,
                    &mut [],
                );
                pf += share;
            }};
        }
        let mut o = 0;
        while o + R <= b.rows {
            let mut i = 0;
            while i + C <= inputs {
                whole!(R, C, o, i);
                i += C;
            }
            while i < inputs {
                whole!(R, 1, o, i);
                i += 1;
            }
            o += R;
        }
        while o < b.rows {
            let mut i = 0;
            while i + C <= inputs {
                whole!(1, C, o, i);
                i += C;
            }
            while i < inputs {
                whole!(1, 1, o, i);
                i += 1;
            }
            o += 1;
        }
        return;
    }
    // Column chunks: `R·C·4` saved accumulators per tile of input rows.
    let groups = inputs / C + inputs % C;
    let mut saved = vec![s.zero(); groups * R * C * 4];
    let mut o = 0;
    while o < b.rows {
        let rows = if o + R <= b.rows { R } else { 1 };
        for chunk in 0..chunks {
            let span = Span {
                k: chunk * per_chunk..((chunk + 1) * per_chunk).min(blocks),
            };
            let (first, last) = (chunk == 0, chunk + 1 == chunks);
            let mut i = 0;
            for slot in saved.chunks_exact_mut(R * C * 4) {
                let cols = if i + C <= inputs { C } else { 1 };
                let range = pf..pf + share;
                macro_rules! tile {
                    ($r:expr, $c:expr) => {
                        match (first, last) {
                            (true, _) => batch_tile::<S, $r, $c, J, true, false>(
                                s, b, o, x, i, y, range, &span, slot,
                            ),
                            (false, false) => batch_tile::<S, $r, $c, J, false, false>(
                                s, b, o, x, i, y, range, &span, slot,
                            ),
                            (false, true) => batch_tile::<S, $r, $c, J, false, true>(
                                s, b, o, x, i, y, range, &span, slot,
                            ),
                        }
                    };
                }
                match (rows == R, cols == C) {
                    (true, true) => tile!(R, C),
                    (true, false) => tile!(R, 1),
                    (false, true) => tile!(1, C),
                    (false, false) => tile!(1, 1),
                }
                i += cols;
                pf += share;
            }
        }
        o += rows;
    }
}

/// The 64-column blocks a [`batch_tile`] call covers.
struct Span {
    k: std::ops::Range<usize>,
}

/// One register tile: the outputs of block rows `o0..o0 + R` and input rows `i0..i0 + C`,
/// each exactly as [`dot_k`] computes it. `dot_k` keeps four accumulators, accumulator `j`
/// taking lanes `64k + 16j ..` of every 64-column block `k` in order, then the 16-column
/// remainder blocks into accumulator 0, then `(a₀ + a₁) + (a₂ + a₃)` reduced, then the last
/// columns one by one. The accumulators never meet before the end, so they may run in
/// separate passes over the columns, `J` at a time, and over the 64-column blocks of `span`
/// only, resumed from `saved` unless `FIRST` and saved to it unless `LAST` (`R·C·4` vectors,
/// row-major by weight row, input row, accumulator): the same values, fewer live registers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn batch_tile<
    S: Lanes,
    const R: usize,
    const C: usize,
    const J: usize,
    const FIRST: bool,
    const LAST: bool,
>(
    s: S,
    b: Block<'_>,
    o0: usize,
    x: &[f32],
    i0: usize,
    y: &mut [f32],
    prefetch: std::ops::Range<usize>,
    span: &Span,
    saved: &mut [S::V],
) {
    let n = b.cols;
    // Lines of `prefetch` per 64-column step, so that they are all asked for by the end.
    let steps = span.k.len().max(1);
    let per_step = prefetch.len().div_ceil(LINE).div_ceil(steps);
    let mut pf = prefetch.start;
    let wr: [&[f32]; R] = std::array::from_fn(|r| &b.w[(o0 + r) * n..(o0 + r + 1) * n]);
    let xr: [&[f32]; C] = std::array::from_fn(|c| &x[(i0 + c) * b.xstride..][..n]);
    let main = n / (4 * LANES) * (4 * LANES);
    // The 64-column blocks as arrays, all `main / 64` long: indexing them needs no bounds
    // checks in the loop (with slices, ~20 compare-and-branch pairs per 24 multiply-adds).
    let w64: [&[[f32; 4 * LANES]]; R] =
        std::array::from_fn(|r| &wr[r][..main].as_chunks().0[span.k.clone()]);
    let x64: [&[[f32; 4 * LANES]]; C] =
        std::array::from_fn(|c| &xr[c][..main].as_chunks().0[span.k.clone()]);
    let blocks = span.k.len();
    let pf_end = prefetch.end.min(b.next.len());
    let mut sums = [[[s.zero(); 4]; C]; R];
    if !FIRST {
        for r in 0..R {
            for c in 0..C {
                for j in 0..4 {
                    sums[r][c][j] = saved[(r * C + c) * 4 + j];
                }
            }
        }
    }
    for p in 0..4 / J {
        let mut acc = [[[s.zero(); J]; C]; R];
        for r in 0..R {
            for c in 0..C {
                for jj in 0..J {
                    acc[r][c][jj] = sums[r][c][p * J + jj];
                }
            }
        }
        for k in 0..blocks {
            if p == 0 {
                for _ in 0..per_step {
                    if pf < pf_end {
                        s.prefetch(b.next, pf);
                    }
                    pf += LINE;
                }
            }
            for (jj, _) in [(); J].iter().enumerate() {
                let o = (p * J + jj) * LANES;
                let mut xv = [s.zero(); C];
                for c in 0..C {
                    xv[c] = s.load(&x64[c][k][o..o + LANES]);
                }
                for r in 0..R {
                    let wv = s.load(&w64[r][k][o..o + LANES]);
                    for c in 0..C {
                        acc[r][c][jj] = s.mul_add(wv, xv[c], acc[r][c][jj]);
                    }
                }
            }
        }
        let mut i = main;
        if p == 0 && LAST {
            // dot_k's 16-column remainder blocks, into accumulator 0 (pass 0's first).
            while i + LANES <= n {
                let mut xv = [s.zero(); C];
                for c in 0..C {
                    xv[c] = s.load(&xr[c][i..]);
                }
                for r in 0..R {
                    let wv = s.load(&wr[r][i..]);
                    for c in 0..C {
                        acc[r][c][0] = s.mul_add(wv, xv[c], acc[r][c][0]);
                    }
                }
                i += LANES;
            }
        }
        for r in 0..R {
            for c in 0..C {
                for jj in 0..J {
                    sums[r][c][p * J + jj] = acc[r][c][jj];
                }
            }
        }
    }
    if !LAST {
        for r in 0..R {
            for c in 0..C {
                for j in 0..4 {
                    saved[(r * C + c) * 4 + j] = sums[r][c][j];
                }
            }
        }
        return;
    }
    let tail = n / LANES * LANES;
    for r in 0..R {
        for c in 0..C {
            let a = sums[r][c];
            let mut sum = s.reduce_add(s.add(s.add(a[0], a[1]), s.add(a[2], a[3])));
            for k in tail..n {
                sum += wr[r][k] * xr[c][k];
            }
            y[(i0 + c) * b.out + b.first + o0 + r] = sum;
        }
    }
}

/// bf16 rows without the widening shuffle, the AVX-512 level's specialisation of
/// `matvec_rows`: a bf16 is the high half of an f32, so one 512-bit load of 32 weights yields
/// the even-indexed ones as f32 by a 16-bit left shift of each 32-bit lane and the odd-indexed
/// ones by masking the low half off. Paired with `x`'s even and odd elements (deinterleaved
/// once per call), that is a load, two integer ops and two FMAs per 32 weights instead of two
/// zero-extending shuffles, two shifts and two FMAs. Products are exact either way; only the
/// order of the sum changes.
#[cfg(target_arch = "x86_64")]
/// bf16 rows at the AVX2 level, the same technique as [`bf16_pairs`] with 256-bit registers:
/// one load of 16 bf16 gives the 8 even weights (`<< 16`) and the 8 odd ones (`& 0xFFFF0000`)
/// as f32, multiplied with `x` deinterleaved once per product (8 even then 8 odd elements per
/// 16-column block). Three instructions widen 16 weights instead of six (two zero-extending
/// loads and two shifts), and each weight byte is loaded once.
#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16_pairs_avx2 {
    use super::simd::Avx2;
    use half::bf16;
    use std::arch::x86_64::__m256;
    use std::cell::RefCell;

    thread_local! {
        /// `x` deinterleaved per 16-column block: 8 even then 8 odd elements.
        static SPLIT_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    #[inline(always)]
    pub(crate) fn matvec_rows(t: Avx2, w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) {
        assert!(w.len() >= y.len() * cols && x.len() >= cols);
        let blocks = cols / 16;
        // Taken out of the thread-local and put back, not borrowed in a closure: the row loop
        // must stay in this function, which is inlined into the target-feature entry point.
        let mut split = SPLIT_X.take();
        split.clear();
        for b in 0..blocks {
            let xb = &x[16 * b..16 * b + 16];
            split.extend(xb.iter().step_by(2));
            split.extend(xb.iter().skip(1).step_by(2));
        }
        for (r, out) in y.iter_mut().enumerate() {
            *out = dot_row(t, &w[r * cols..(r + 1) * cols], &split, x);
        }
        SPLIT_X.set(split);
    }

    /// One 16-weight block `b` into the (even, odd) accumulator pair `acc`.
    ///
    /// # Safety
    /// Weights `16b..16b + 16` must lie behind `w` and floats `16b..16b + 16` behind `xs`.
    #[inline(always)]
    unsafe fn block(t: Avx2, w: *const bf16, xs: *const f32, b: usize, acc: &mut [__m256; 2]) {
        let (avx, avx2, fma) = (t.avx, t.avx2, t.fma);
        // SAFETY: the caller guarantees that weights 16b..16b+16 (32 bytes) lie behind `w` and
        // floats 16b..16b+16 behind `xs` (this function's contract); unaligned loads, the
        // token proves AVX.
        let (v, xe, xo) = unsafe {
            (
                avx._mm256_loadu_si256(w.add(16 * b).cast()),
                avx._mm256_loadu_ps(xs.add(16 * b)),
                avx._mm256_loadu_ps(xs.add(16 * b + 8)),
            )
        };
        let even = avx._mm256_castsi256_ps(avx2._mm256_slli_epi32::<16>(v));
        let high = avx._mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        let odd = avx._mm256_castsi256_ps(avx2._mm256_and_si256(v, high));
        acc[0] = fma._mm256_fmadd_ps(even, xe, acc[0]);
        acc[1] = fma._mm256_fmadd_ps(odd, xo, acc[1]);
    }

    /// Dot product of one row (`cols = w.len()`) with `x`, `split` the deinterleaved `x` of
    /// `cols / 16` blocks.
    #[inline(always)]
    fn dot_row(t: Avx2, w: &[bf16], split: &[f32], x: &[f32]) -> f32 {
        let (avx, sse) = (t.avx, t.sse);
        let cols = w.len();
        let blocks = cols / 16;
        assert!(split.len() >= blocks * 16 && x.len() >= cols);
        let (base, xs) = (w.as_ptr(), split.as_ptr());
        // Four blocks per iteration into eight accumulators: FMA latency times the two FMA
        // ports is about ten in flight, and no FMA waits on the previous one's result.
        let zero = avx._mm256_setzero_ps();
        let mut acc = [[zero; 2]; 4];
        let mut b = 0;
        // SAFETY (each `block` call): b + j < blocks, so weights 16(b+j).. lie in `w` and
        // floats 16(b+j).. in `split` (asserted above).
        while b + 4 <= blocks {
            for (j, pair) in acc.iter_mut().enumerate() {
                unsafe { block(t, base, xs, b + j, pair) };
            }
            b += 4;
        }
        while b < blocks {
            unsafe { block(t, base, xs, b, &mut acc[0]) };
            b += 1;
        }
        let p0 = avx._mm256_add_ps(acc[0][0], acc[0][1]);
        let p1 = avx._mm256_add_ps(acc[1][0], acc[1][1]);
        let p2 = avx._mm256_add_ps(acc[2][0], acc[2][1]);
        let p3 = avx._mm256_add_ps(acc[3][0], acc[3][1]);
        let sum = avx._mm256_add_ps(avx._mm256_add_ps(p0, p1), avx._mm256_add_ps(p2, p3));
        let h = sse._mm_add_ps(
            avx._mm256_castps256_ps128(sum),
            avx._mm256_extractf128_ps::<1>(sum),
        );
        let h = sse._mm_add_ps(h, sse._mm_movehl_ps(h, h));
        let h = sse._mm_add_ss(h, sse._mm_shuffle_ps::<1>(h, h));
        let mut s = sse._mm_cvtss_f32(h);
        for k in blocks * 16..cols {
            s += w[k].to_f32() * x[k];
        }
        s
    }
}

pub(crate) mod bf16_pairs {
    use super::simd::Avx512;
    use half::bf16;
    use std::arch::x86_64::__m512;
    use std::cell::RefCell;

    thread_local! {
        /// `x` deinterleaved per 32-column block: 16 even then 16 odd elements.
        static SPLIT_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    #[inline(always)]
    pub(crate) fn matvec_rows(t: Avx512, w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) {
        assert!(w.len() >= y.len() * cols && x.len() >= cols);
        let blocks = cols / 32;
        // Taken out of the thread-local and put back, not borrowed in a closure: the row loop
        // must stay in this function, which is inlined into the target-feature entry point.
        let mut split = SPLIT_X.take();
        split.clear();
        for b in 0..blocks {
            let xb = &x[32 * b..32 * b + 32];
            split.extend(xb.iter().step_by(2));
            split.extend(xb.iter().skip(1).step_by(2));
        }
        for (r, out) in y.iter_mut().enumerate() {
            *out = dot_row(t, &w[r * cols..(r + 1) * cols], &split, x);
        }
        SPLIT_X.set(split);
    }

    /// Block `b` (32 weights) into the (even, odd) accumulator pair `pair`.
    ///
    /// # Safety
    /// Weights `32b..32b + 32` must lie behind `w` and floats `32b..32b + 32` behind `xs`.
    #[inline(always)]
    unsafe fn block(t: Avx512, w: *const bf16, xs: *const f32, b: usize, pair: &mut [__m512]) {
        let f = t.avx512f;
        let high = f._mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        // SAFETY: the caller guarantees that weights 32b..32b+32 (64 bytes) lie behind `w` and
        // floats 32b..32b+32 behind `xs` (this function's contract); unaligned loads, the
        // token proves AVX-512F.
        let (v, xe, xo) = unsafe {
            (
                f._mm512_loadu_si512(w.add(32 * b).cast()),
                f._mm512_loadu_ps(xs.add(32 * b)),
                f._mm512_loadu_ps(xs.add(32 * b + 16)),
            )
        };
        let even = f._mm512_castsi512_ps(f._mm512_slli_epi32::<16>(v));
        let odd = f._mm512_castsi512_ps(f._mm512_and_si512(v, high));
        pair[0] = f._mm512_fmadd_ps(even, xe, pair[0]);
        pair[1] = f._mm512_fmadd_ps(odd, xo, pair[1]);
    }

    /// Dot product of one row (`cols = w.len()`) with `x`, `split` the deinterleaved `x` of
    /// `cols / 32` blocks.
    #[inline(always)]
    fn dot_row(t: Avx512, w: &[bf16], split: &[f32], x: &[f32]) -> f32 {
        let f = t.avx512f;
        let cols = w.len();
        let blocks = cols / 32;
        assert!(split.len() >= blocks * 32 && x.len() >= cols);
        let (base, xs) = (w.as_ptr(), split.as_ptr());
        // Two blocks per iteration into four accumulators: no FMA waits on the previous one.
        let mut acc: [__m512; 4] = [f._mm512_setzero_ps(); 4];
        let mut b = 0;
        // SAFETY (each `block` call): b < blocks, so weights 32b..32b+32 lie in `w` and
        // floats 32b..32b+32 in `split` (asserted above).
        while b + 2 <= blocks {
            let (first, second) = acc.split_at_mut(2);
            unsafe {
                block(t, base, xs, b, first);
                block(t, base, xs, b + 1, second);
            }
            b += 2;
        }
        if b < blocks {
            unsafe { block(t, base, xs, b, &mut acc[..2]) };
        }
        let sum = f._mm512_add_ps(
            f._mm512_add_ps(acc[0], acc[1]),
            f._mm512_add_ps(acc[2], acc[3]),
        );
        let mut s = f._mm512_reduce_add_ps(sum);
        for k in blocks * 32..cols {
            s += w[k].to_f32() * x[k];
        }
        s
    }
}

#[inline(always)]
fn axpy_k<S: Lanes>(s: S, a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = s.splat(a);
    let mut i = 0;
    while i + LANES <= n {
        let r = s.mul_add(s.load(&x[i..]), av, s.load(&y[i..]));
        s.store(&mut y[i..], r);
        i += LANES;
    }
    for k in i..n {
        y[k] += a * x[k];
    }
}

#[inline(always)]
fn scale_k<S: Lanes>(s: S, a: f32, x: &mut [f32]) {
    let av = s.splat(a);
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let v = s.mul(s.load(c), av);
        s.store(c, v);
    }
    for v in chunks.into_remainder() {
        *v *= a;
    }
}

#[inline(always)]
fn max_k<S: Lanes>(s: S, x: &[f32]) -> f32 {
    let mut m = s.splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i + LANES <= x.len() {
        m = s.max(m, s.load(&x[i..]));
        i += LANES;
    }
    let mut out = s.to_array(m).into_iter().fold(f32::NEG_INFINITY, f32::max);
    for &v in &x[i..] {
        out = out.max(v);
    }
    out
}

#[inline(always)]
fn sum_k<S: Lanes>(s: S, x: &[f32]) -> f32 {
    let mut acc = [s.zero(); 4];
    let mut blocks = x.chunks_exact(4 * LANES);
    for b in &mut blocks {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = s.add(*a, s.load(&b[j * LANES..]));
        }
    }
    let rest = blocks.remainder();
    let mut i = 0;
    while i + LANES <= rest.len() {
        acc[0] = s.add(acc[0], s.load(&rest[i..]));
        i += LANES;
    }
    let mut total = s.reduce_add(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])));
    for &v in &rest[i..] {
        total += v;
    }
    total
}

/// Vectorized `exp` (see [`Kernels::exp_shifted`]).
#[inline(always)]
fn exp16<S: Lanes>(s: S, x: S::V) -> S::V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LOW: f32 = -87.33655;
    const HIGH: f32 = 88.72283;
    let too_small = s.lt(x, s.splat(LOW));
    let too_big = s.gt(x, s.splat(HIGH));
    let xc = s.min(s.max(x, s.splat(LOW)), s.splat(HIGH));
    let n = s.round(s.mul(xc, s.splat(LOG2E)));
    let r = s.neg_mul_add(n, s.splat(LN2_HI), xc);
    let r = s.neg_mul_add(n, s.splat(LN2_LO), r);
    // exp(r) on |r| <= ln2/2, Taylor coefficients refined (Cephes expf).
    let mut p = s.splat(1.987_569_1e-4);
    p = s.mul_add(p, r, s.splat(1.398_199_9e-3));
    p = s.mul_add(p, r, s.splat(8.333_452e-3));
    p = s.mul_add(p, r, s.splat(4.166_579_6e-2));
    p = s.mul_add(p, r, s.splat(1.666_666_5e-1));
    p = s.mul_add(p, r, s.splat(0.5));
    let r2 = s.mul(r, r);
    let e = s.mul_add(p, r2, s.add(r, s.splat(1.0)));
    // 2^n with n in [-126, 128] here, as two factors inside the normal range.
    let out = s.ldexp(e, n);
    let out = s.select(too_small, s.zero(), out);
    let out = s.select(too_big, s.splat(f32::INFINITY), out);
    // NaN inputs: the comparisons are false and the clamp replaced them; restore NaN.
    s.select(s.is_nan(x), x, out)
}

#[inline(always)]
fn exp_shifted_k<S: Lanes>(s: S, x: &mut [f32], shift: f32) {
    let sv = s.splat(shift);
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let v = exp16(s, s.sub(s.load(c), sv));
        s.store(c, v);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let v = exp16(s, s.sub(s.load_partial(tail), sv));
        s.store_partial(tail, v);
    }
}

/// Vectorized error function (Abramowitz & Stegun 7.1.26, absolute error ≤ 1.5e-7).
#[inline(always)]
fn erf16<S: Lanes>(s: S, x: S::V) -> S::V {
    let one = s.splat(1.0);
    let a = s.abs(x);
    let t = s.div(one, s.mul_add(s.splat(0.327_591_1), a, one));
    let mut p = s.splat(1.061_405_4);
    p = s.mul_add(p, t, s.splat(-1.453_152));
    p = s.mul_add(p, t, s.splat(1.421_413_8));
    p = s.mul_add(p, t, s.splat(-0.284_496_74));
    p = s.mul_add(p, t, s.splat(0.254_829_6));
    let y = s.sub(
        one,
        s.mul(s.mul(p, t), exp16(s, s.neg_mul_add(a, a, s.zero()))),
    );
    s.flip_sign(y, x)
}

/// `x · Φ(x)` on one vector.
#[inline(always)]
fn gelu16<S: Lanes>(s: S, v: S::V) -> S::V {
    let inv_sqrt2 = s.splat(std::f32::consts::FRAC_1_SQRT_2);
    let phi = s.add(s.splat(1.0), erf16(s, s.mul(v, inv_sqrt2)));
    s.mul(s.mul(s.splat(0.5), v), phi)
}

#[inline(always)]
fn gelu_k<S: Lanes>(s: S, x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let v = gelu16(s, s.load(c));
        s.store(c, v);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let v = gelu16(s, s.load_partial(tail));
        s.store_partial(tail, v);
    }
}

#[inline(always)]
fn layer_norm_k<S: Lanes, T: Elem>(
    s: S,
    x: &[f32],
    gamma: &[T],
    beta: &[T],
    eps: f32,
    out: &mut [f32],
) {
    let n = x.len();
    let mean = sum_k(s, x) / n as f32;
    let mv = s.splat(mean);
    let mut acc = s.zero();
    let mut i = 0;
    while i + LANES <= n {
        let d = s.sub(s.load(&x[i..]), mv);
        acc = s.mul_add(d, d, acc);
        i += LANES;
    }
    let mut var = s.reduce_add(acc);
    for &v in &x[i..] {
        var += (v - mean) * (v - mean);
    }
    let inv = 1.0 / (var / n as f32 + eps).sqrt();
    let iv = s.splat(inv);
    let mut i = 0;
    while i + LANES <= n {
        let v = s.mul(s.sub(s.load(&x[i..]), mv), iv);
        let r = s.mul_add(v, s.load_elem(&gamma[i..]), s.load_elem(&beta[i..]));
        s.store(&mut out[i..], r);
        i += LANES;
    }
    for k in i..n {
        out[k] = (x[k] - mean) * inv * gamma[k].to_f32() + beta[k].to_f32();
    }
}

#[inline(always)]
fn softmax_k<S: Lanes>(s: S, x: &mut [f32]) {
    let m = max_k(s, x);
    exp_shifted_k(s, x, m);
    let total = sum_k(s, x);
    scale_k(s, 1.0 / total, x);
}

#[inline(always)]
fn add_bias_k<S: Lanes, T: Elem>(s: S, b: &[T], y: &mut [f32]) {
    let n = b.len().min(y.len());
    let mut i = 0;
    while i + LANES <= n {
        let r = s.add(s.load(&y[i..]), s.load_elem(&b[i..]));
        s.store(&mut y[i..], r);
        i += LANES;
    }
    for k in i..n {
        y[k] += b[k].to_f32();
    }
}

#[inline(always)]
fn widen_k<S: Lanes, T: Elem>(s: S, src: &[T], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + LANES <= n {
        s.store(&mut dst[i..], s.load_elem(&src[i..]));
        i += LANES;
    }
    for k in i..n {
        dst[k] = src[k].to_f32();
    }
}

#[inline(always)]
fn narrow_bf16_k<S: Lanes>(s: S, src: &[f32], dst: &mut [bf16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + LANES <= n {
        s.store_bf16(&mut dst[i..], s.load(&src[i..]));
        i += LANES;
    }
    for k in i..n {
        dst[k] = bf16::from_f32(src[k]);
    }
}

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
fn kahan_update_readout_k<S: Lanes>(
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
fn vecmat_k<S: Lanes>(s: S, p: &[f32], w: &[f32], out: &mut [f32]) {
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
fn axpy_rows_k<S: Lanes>(s: S, p: &[f32], w: &[f32], out: &mut [f32]) {
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
fn kahan_scale_axpy_k<S: Lanes>(l: S, b: f32, a: f32, x: &[f32], s: &mut [f32], c: &mut [bf16]) {
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
