//! The thin layer between the kernels and the instruction set: one 16-lane f32 vector type per
//! level ([`Lanes`]), and loading 16 weights of any stored dtype into it.
//!
//! The kernels in [`super`] are written once, generic over [`Lanes`], and compiled once per
//! level inside that level's `#[target_feature]` context (see [`super::isa`]). Each level keeps
//! the same 16-lane shape, so the register blocking and the order of every sum are the same
//! code at every level; only the instructions differ:
//! - [`Avx512`](super::x86::Avx512): one `__m512` per vector, mask registers for comparisons.
//! - [`Avx2`](super::x86::Avx2): two `__m256` halves (AVX2, FMA, F16C).
//! - [`Portable`]: a `[f32; 16]` array the compiler vectorizes for the baseline (SSE2 on
//!   x86-64); `mul_add` is a multiply then an add (a fused one would be a libm call there).

use half::{bf16, f16};

/// Lanes in one SIMD vector of f32, at every level.
pub const LANES: usize = 16;

/// 1.5·2²³: `(v + ROUNDING) − ROUNDING` rounds an f32 of magnitude below 2²² to the nearest
/// integer, ties to even (the default rounding mode): the portable level's `round` and the
/// int8 method's activation codes at every level.
pub(crate) const ROUNDING: f32 = 12_582_912.0;

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// The stored dtype of an [`Elem`], so a [`Lanes`] level picks its widening load at compile time.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    /// f32.
    F32,
    /// bf16.
    Bf16,
    /// f16.
    F16,
}

/// A weight element type the kernels read directly from the mapped file.
pub trait Elem: Copy + Send + Sync + bytemuck::Pod + 'static + sealed::Sealed {
    /// The safetensors name of the dtype.
    const NAME: &'static str;
    #[doc(hidden)]
    const KIND: ElemKind;
    /// Widens one element to f32.
    fn to_f32(self) -> f32;
    /// The slice itself when the type is f32 (no conversion needed).
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

impl sealed::Sealed for f32 {}
impl Elem for f32 {
    const NAME: &'static str = "F32";
    const KIND: ElemKind = ElemKind::F32;
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl sealed::Sealed for bf16 {}
impl Elem for bf16 {
    const NAME: &'static str = "BF16";
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl sealed::Sealed for f16 {}
impl Elem for f16 {
    const NAME: &'static str = "F16";
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// One instruction-set level's 16-lane f32 vector: the operations the kernels use, each the
/// same arithmetic at every level (IEEE single precision, round to nearest) except that
/// [`Portable`] does not fuse `mul_add`.
///
/// Every method is `#[inline(always)]`: the kernels built on them are inlined into the level's
/// `#[target_feature]` function, where the intrinsics compile to single instructions.
pub trait Lanes: Copy + Send + Sync + 'static + sealed::Sealed {
    /// A vector of 16 f32 lanes.
    type V: Copy;
    /// A lane mask.
    type M: Copy;
    /// Every lane `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Loads `s[..16]` (panics when `s` is shorter).
    fn load(self, s: &[f32]) -> Self::V;
    /// Stores into `out[..16]` (panics when `out` is shorter).
    fn store(self, out: &mut [f32], v: Self::V);
    /// Widens `s[..16]` bf16 to f32 (exact).
    fn load_bf16(self, s: &[bf16]) -> Self::V;
    /// Widens `s[..16]` f16 to f32 (exact).
    fn load_f16(self, s: &[f16]) -> Self::V;
    /// Narrows `v` to bf16 into `out[..16]` (panics when `out` is shorter), rounding to
    /// nearest with ties to even, exactly as `half::bf16::from_f32` does at every level
    /// (NaN stays NaN, quieted; overflow gives ±inf).
    fn store_bf16(self, out: &mut [bf16], v: Self::V);
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a − b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a / b`.
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c` (fused where the level has FMA).
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a · b − c` (fused where the level has FMA).
    fn mul_sub(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c − a · b` (fused where the level has FMA).
    fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise `if a > b { a } else { b }` (x86 `maxps`: `b` when either is NaN).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `if a < b { a } else { b }` (x86 `minps`: `b` when either is NaN).
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// `|a|`.
    fn abs(self, a: Self::V) -> Self::V;
    /// `y` with its sign flipped in the lanes where `x` has the sign bit set.
    fn flip_sign(self, y: Self::V, x: Self::V) -> Self::V;
    /// Rounds to the nearest integer, ties to even; exact for `|a| < 2^22` (all callers).
    fn round(self, a: Self::V) -> Self::V;
    /// `e · 2^n` for integer-valued `n` in [-126, 128], as two exact power-of-two factors
    /// `2^(n>>1) · 2^(n − n>>1)` so that neither leaves the normal range.
    fn ldexp(self, e: Self::V, n: Self::V) -> Self::V;
    /// Sum of the 16 lanes.
    fn reduce_add(self, a: Self::V) -> f32;
    /// The lanes as an array.
    fn to_array(self, a: Self::V) -> [f32; 16];
    /// Lanes where `a < b` (false for NaN).
    fn lt(self, a: Self::V, b: Self::V) -> Self::M;
    /// Lanes where `a > b` (false for NaN).
    fn gt(self, a: Self::V, b: Self::V) -> Self::M;
    /// Lanes that are NaN.
    fn is_nan(self, a: Self::V) -> Self::M;
    /// `if m { a } else { b }` per lane.
    fn select(self, m: Self::M, a: Self::V, b: Self::V) -> Self::V;

    /// How the batched matrix-vector kernel ([`super::Kernels::matvec_batch`]) blocks its
    /// registers at this level, from the size of the register file in 16-lane vectors.
    const BATCH_TILE: BatchTile;
    /// The register tile of the many-rows matrix product ([`super::sgemm`]) at this level.
    const GEMM_TILE: super::sgemm::GemmTile;
    /// Whether [`Lanes::bf16_matvec_rows`] is specialised at this level (its order of
    /// summation then differs from the generic dot product's).
    const BF16_MATVEC: bool = false;

    /// Asks the cache to fetch the line holding `bytes[at]` into L2 (a hint: nothing when `at`
    /// is out of bounds or the level has no prefetch instruction; never changes a value). L2,
    /// not L1: the batched product prefetches its next 96 KiB block, which is meant to sit in
    /// L2; asking for L1 (T0) measured 5–20% slower per product at B=16 on Zen 4, the loads
    /// after the prefetches waiting on it.
    #[inline(always)]
    fn prefetch(self, bytes: &[u8], at: usize) {
        let _ = (bytes, at);
    }

    /// A level's own whole-kernel specialisation of `y = W x` for bf16 rows (`cols` wide):
    /// `true` when it ran, `false` when the level has none and the generic kernel runs.
    #[inline(always)]
    fn bf16_matvec_rows(self, w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) -> bool {
        let _ = (w, cols, x, y);
        false
    }
    /// All lanes zero.
    #[inline(always)]
    fn zero(self) -> Self::V {
        self.splat(0.0)
    }
    /// Widens `s[..16]` of any weight dtype to f32.
    #[inline(always)]
    fn load_elem<T: Elem>(self, s: &[T]) -> Self::V {
        match T::KIND {
            ElemKind::F32 => self.load(bytemuck::cast_slice(s)),
            ElemKind::Bf16 => self.load_bf16(bytemuck::cast_slice(s)),
            ElemKind::F16 => self.load_f16(bytemuck::cast_slice(s)),
        }
    }
    /// Loads the first `min(s.len(), 16)` values, the other lanes zero.
    #[inline(always)]
    fn load_partial(self, s: &[f32]) -> Self::V {
        let mut tail = [0f32; LANES];
        let n = s.len().min(LANES);
        tail[..n].copy_from_slice(&s[..n]);
        self.load(&tail)
    }
    /// Stores the first `min(out.len(), 16)` lanes.
    #[inline(always)]
    fn store_partial(self, out: &mut [f32], v: Self::V) {
        let n = out.len().min(LANES);
        out[..n].copy_from_slice(&self.to_array(v)[..n]);
    }
    /// Columns `0 .. kc` of `rows` packed as `[kc][n]` into `dst`, `n = rows.len()`:
    /// `dst[k · n + j] = rows[j][k]` (the panels of [`super::sgemm`]). It moves values and
    /// computes nothing, so every level writes the same bits as its twin
    /// [`super::scalar::pack_panel`]; the x86 levels transpose 8 × 8 blocks in registers.
    ///
    /// # Panics
    /// When a row is shorter than `kc` or `dst` shorter than `kc · n`.
    #[inline(always)]
    fn pack_panel(self, rows: &[&[f32]], kc: usize, dst: &mut [f32]) {
        super::scalar::pack_panel(rows, kc, dst)
    }
}

/// A register tile of the batched matrix-vector kernel: `rows` weight rows times `inputs`
/// input rows of output elements at once, each output's four split accumulators (those of the
/// single-row dot product) `split` at a time per pass over the columns (1, 2 or 4), so that
/// `rows · inputs · split` accumulator vectors plus the loaded ones fit the register file.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchTile {
    /// Weight rows per tile.
    pub rows: usize,
    /// Input rows per tile.
    pub inputs: usize,
    /// Split accumulators per pass (4: one pass).
    pub split: usize,
}

/// The portable level: a plain array of 16 lanes, vectorized by the compiler for the target's
/// baseline (SSE2 on any x86-64).
#[derive(Debug, Clone, Copy, Default)]
pub struct Portable;

impl sealed::Sealed for Portable {}

#[inline(always)]
fn lanes(f: impl FnMut(usize) -> f32) -> [f32; 16] {
    std::array::from_fn(f)
}

impl Lanes for Portable {
    // SSE2's 16 registers hold four 16-lane vectors: one output, one accumulator per pass.
    const BATCH_TILE: BatchTile = BatchTile {
        rows: 1,
        inputs: 2,
        split: 1,
    };
    // Four 16-lane accumulators (16 SSE2 registers of 4 lanes) and one loaded vector.
    const GEMM_TILE: super::sgemm::GemmTile = super::sgemm::GemmTile {
        rows: 4,
        vectors: 1,
    };
    type V = [f32; 16];
    type M = [bool; 16];
    #[inline(always)]
    fn splat(self, x: f32) -> Self::V {
        [x; 16]
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> Self::V {
        s[..16].try_into().expect("16 lanes")
    }
    #[inline(always)]
    fn store(self, out: &mut [f32], v: Self::V) {
        out[..16].copy_from_slice(&v);
    }
    #[inline(always)]
    fn load_bf16(self, s: &[bf16]) -> Self::V {
        let s = &s[..16];
        lanes(|i| s[i].to_f32())
    }
    #[inline(always)]
    fn load_f16(self, s: &[f16]) -> Self::V {
        let s = &s[..16];
        lanes(|i| s[i].to_f32())
    }
    #[inline(always)]
    fn store_bf16(self, out: &mut [bf16], v: Self::V) {
        for (o, x) in out[..16].iter_mut().zip(v) {
            *o = bf16::from_f32(x);
        }
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        lanes(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        lanes(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        lanes(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn div(self, a: Self::V, b: Self::V) -> Self::V {
        lanes(|i| a[i] / b[i])
    }
    #[inline(always)]
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        lanes(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn mul_sub(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        lanes(|i| a[i] * b[i] - c[i])
    }
    #[inline(always)]
    fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        lanes(|i| c[i] - a[i] * b[i])
    }
    #[inline(always)]
    fn max(self, a: Self::V, b: Self::V) -> Self::V {
        lanes(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn min(self, a: Self::V, b: Self::V) -> Self::V {
        lanes(|i| if a[i] < b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn abs(self, a: Self::V) -> Self::V {
        lanes(|i| f32::from_bits(a[i].to_bits() & 0x7FFF_FFFF))
    }
    #[inline(always)]
    fn flip_sign(self, y: Self::V, x: Self::V) -> Self::V {
        lanes(|i| f32::from_bits(y[i].to_bits() ^ (x[i].to_bits() & 0x8000_0000)))
    }
    #[inline(always)]
    fn round(self, a: Self::V) -> Self::V {
        // The sum is not reassociated (no fast-math in Rust).
        lanes(|i| (a[i] + ROUNDING) - ROUNDING)
    }
    #[inline(always)]
    fn ldexp(self, e: Self::V, n: Self::V) -> Self::V {
        lanes(|i| {
            let ni = n[i] as i32;
            let half = ni >> 1;
            let rest = ni - half;
            let p1 = f32::from_bits(((half + 127) as u32) << 23);
            let p2 = f32::from_bits(((rest + 127) as u32) << 23);
            e[i] * p1 * p2
        })
    }
    #[inline(always)]
    fn reduce_add(self, a: Self::V) -> f32 {
        // Halving tree, the same shape as the AVX-512 reduction.
        let mut v = a;
        let mut w = LANES / 2;
        while w >= 1 {
            for i in 0..w {
                v[i] += v[i + w];
            }
            w /= 2;
        }
        v[0]
    }
    #[inline(always)]
    fn to_array(self, a: Self::V) -> [f32; 16] {
        a
    }
    #[inline(always)]
    fn lt(self, a: Self::V, b: Self::V) -> Self::M {
        std::array::from_fn(|i| a[i] < b[i])
    }
    #[inline(always)]
    fn gt(self, a: Self::V, b: Self::V) -> Self::M {
        std::array::from_fn(|i| a[i] > b[i])
    }
    #[inline(always)]
    fn is_nan(self, a: Self::V) -> Self::M {
        std::array::from_fn(|i| a[i].is_nan())
    }
    #[inline(always)]
    fn select(self, m: Self::M, a: Self::V, b: Self::V) -> Self::V {
        lanes(|i| if m[i] { a[i] } else { b[i] })
    }
}
