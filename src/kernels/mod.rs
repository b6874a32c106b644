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
pub mod sgemm;
pub mod simd;
#[cfg(target_arch = "x86_64")]
pub mod x86;

mod elementwise;
mod favor;
mod matvec;

use half::bf16;
use rayon::prelude::*;

pub use isa::{Isa, Kernels};
pub use matvec::AlignedBuf;
#[doc(hidden)]
pub use simd::{Elem, LANES};

use elementwise::{
    add_bias_k, axpy_k, exp_shifted_k, gelu_k, layer_norm_k, max_k, narrow_bf16_k, scale_k,
    softmax_k, sum_k, widen_k,
};
use favor::{axpy_rows_k, kahan_scale_axpy_k, kahan_update_readout_k, vecmat_k};
use matvec::{dot_k, matvec_batch_k, matvec_rows_k};
use sgemm::{pack_panel_k, sgemm_task_k, OutColumns, WeightRows};

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
                    let s = unsafe { x86::Avx512::new_unchecked() };
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
                    let s = unsafe { x86::Avx2::new_unchecked() };
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

    /// One task of [`sgemm::linear_rows`]: its columns of `y = x · wᵀ` from `x` packed, with
    /// its panel buffer.
    fn sgemm_task<R: WeightRows>(
        xp: &[f32],
        rows: usize,
        k: usize,
        w: R,
        y: OutColumns,
        wp: &mut [f32]
    ) => sgemm_task_k;

    /// Columns `0 .. kc` of `rows` transposed into `dst` as `[kc][rows.len()]`: the packing
    /// of [`sgemm`]'s panels ([`simd::Lanes::pack_panel`]), exposed so that every level is
    /// tested against [`scalar::pack_panel`].
    ///
    /// # Panics
    /// When a row is shorter than `kc` or `dst` shorter than `kc · rows.len()`.
    #[doc(hidden)]
    pub fn pack_panel(rows: &[&[f32]], kc: usize, dst: &mut [f32]) => pack_panel_k;

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
