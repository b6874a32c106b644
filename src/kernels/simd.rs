//! The thin layer between the kernels and the instruction set: one 16-lane f32 vector type per
//! level ([`Lanes`]), and loading 16 weights of any stored dtype into it.
//!
//! The kernels in [`super`] are written once, generic over [`Lanes`], and compiled once per
//! level inside that level's `#[target_feature]` context (see [`super::isa`]). Each level keeps
//! the same 16-lane shape, so the register blocking and the order of every sum are the same
//! code at every level; only the instructions differ:
//! - [`Avx512`]: one `__m512` per vector, mask registers for comparisons.
//! - [`Avx2`]: two `__m256` halves (AVX2, FMA, F16C).
//! - [`Portable`]: a `[f32; 16]` array the compiler vectorizes for the baseline (SSE2 on
//!   x86-64); `mul_add` is a multiply then an add (a fused one would be a libm call there).

use half::{bf16, f16};

/// Lanes in one SIMD vector of f32, at every level.
pub const LANES: usize = 16;

mod sealed {
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
        // Adding and subtracting 1.5·2^23 rounds to an integer (ties to even, the default
        // rounding mode) for |a| < 2^22; the sum is not reassociated (no fast-math in Rust).
        const MAGIC: f32 = 12_582_912.0;
        lanes(|i| (a[i] + MAGIC) - MAGIC)
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

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{sealed, BatchTile, Lanes, LANES};
    use half::{bf16, f16};
    use std::arch::x86_64::{__m128i, __m256, __m256i, __m512, __mmask16};

    // The two x86 levels as pulp tokens: a token is a zero-sized proof that the CPU has every
    // listed feature (pulp detects them once and caches the answer) and its fields call the
    // intrinsics of those features safely. The kernels' `#[target_feature]` entry points (the
    // `kernels!` macro in `super`) enable the same lists.
    pulp::simd_type! {
        /// AVX2 with FMA and F16C (x86-64-v3: Intel Haswell and AMD Zen onwards).
        pub struct Avx2 {
            pub sse: "sse",
            pub sse2: "sse2",
            pub sse3: "sse3",
            pub ssse3: "ssse3",
            pub sse4_1: "sse4.1",
            pub sse4_2: "sse4.2",
            pub popcnt: "popcnt",
            pub avx: "avx",
            pub avx2: "avx2",
            pub bmi1: "bmi1",
            pub bmi2: "bmi2",
            pub fma: "fma",
            pub lzcnt: "lzcnt",
            pub f16c: "f16c",
        }

        /// AVX-512 F, BW, CD, DQ and VL on top of [`Avx2`] (x86-64-v4: Intel Skylake-SP and
        /// AMD Zen 4 onwards).
        pub struct Avx512 {
            pub sse: "sse",
            pub sse2: "sse2",
            pub sse3: "sse3",
            pub ssse3: "ssse3",
            pub sse4_1: "sse4.1",
            pub sse4_2: "sse4.2",
            pub popcnt: "popcnt",
            pub avx: "avx",
            pub avx2: "avx2",
            pub bmi1: "bmi1",
            pub bmi2: "bmi2",
            pub fma: "fma",
            pub lzcnt: "lzcnt",
            pub f16c: "f16c",
            pub avx512f: "avx512f",
            pub avx512bw: "avx512bw",
            pub avx512cd: "avx512cd",
            pub avx512dq: "avx512dq",
            pub avx512vl: "avx512vl",
        }
    }

    impl sealed::Sealed for Avx2 {}
    impl sealed::Sealed for Avx512 {}

    /// Nearest, ties to even, no exception (`_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC`).
    const ROUND_NEAREST: i32 = 0x08;
    /// Comparison predicates (`_CMP_LT_OQ`, `_CMP_GT_OQ`, `_CMP_UNORD_Q`).
    const CMP_LT_OQ: i32 = 0x11;
    const CMP_GT_OQ: i32 = 0x1E;
    const CMP_UNORD_Q: i32 = 0x03;

    impl Avx2 {
        #[inline(always)]
        fn ldexp8(self, e: __m256, n: __m256) -> __m256 {
            let (avx, avx2) = (self.avx, self.avx2);
            let ni = avx._mm256_cvtps_epi32(n);
            let half = avx2._mm256_srai_epi32::<1>(ni);
            let rest = avx2._mm256_sub_epi32(ni, half);
            let bias = avx._mm256_set1_epi32(127);
            let p1 = avx2._mm256_slli_epi32::<23>(avx2._mm256_add_epi32(half, bias));
            let p2 = avx2._mm256_slli_epi32::<23>(avx2._mm256_add_epi32(rest, bias));
            avx._mm256_mul_ps(
                avx._mm256_mul_ps(e, avx._mm256_castsi256_ps(p1)),
                avx._mm256_castsi256_ps(p2),
            )
        }
    }

    impl Avx2 {
        /// Widens 8 bf16 (`s[..8]`) to f32, exact.
        #[inline(always)]
        fn load_bf16_8(self, s: &[bf16]) -> __m256 {
            let s = &s[..8];
            // SAFETY: 8 bf16 (16 bytes) inside `s` (checked above); unaligned load, the token
            // proves SSE2.
            let h = unsafe { self.sse2._mm_loadu_si128(s.as_ptr().cast()) };
            // bf16 is the high half of an f32: zero-extend and shift left by 16, exact.
            let w = self.avx2._mm256_cvtepu16_epi32(h);
            self.avx
                ._mm256_castsi256_ps(self.avx2._mm256_slli_epi32::<16>(w))
        }

        /// Widens 8 f16 (`s[..8]`) to f32, exact.
        #[inline(always)]
        fn load_f16_8(self, s: &[f16]) -> __m256 {
            let s = &s[..8];
            // SAFETY: 8 f16 (16 bytes) inside `s` (checked above), unaligned; `vcvtph2ps`
            // needs F16C, which this token proves (pulp wraps no F16C intrinsics, so this calls
            // `std::arch` directly).
            unsafe {
                let h = self.sse2._mm_loadu_si128(s.as_ptr().cast::<__m128i>());
                std::arch::x86_64::_mm256_cvtph_ps(h)
            }
        }

        /// The bf16 bits of 8 f32 lanes in the low half of each 32-bit lane, rounded to
        /// nearest even as `half::bf16::from_f32` (NaN quieted).
        #[inline(always)]
        fn narrow_bf16_8(self, x: __m256) -> __m256i {
            let (avx, avx2) = (self.avx, self.avx2);
            let bits = avx._mm256_castps_si256(x);
            let high = avx2._mm256_srli_epi32::<16>(bits);
            // Round to nearest even: add 0x7FFF plus the bit that survives as the last.
            let lsb = avx2._mm256_and_si256(high, avx._mm256_set1_epi32(1));
            let bias = avx2._mm256_add_epi32(lsb, avx._mm256_set1_epi32(0x7FFF));
            let rounded = avx2._mm256_srli_epi32::<16>(avx2._mm256_add_epi32(bits, bias));
            // NaN: the high half with the quiet bit set, as `half` does.
            let quiet = avx2._mm256_or_si256(high, avx._mm256_set1_epi32(0x40));
            let nan = avx._mm256_castps_si256(avx._mm256_cmp_ps::<CMP_UNORD_Q>(x, x));
            avx2._mm256_blendv_epi8(rounded, quiet, nan)
        }
    }

    /// `f` on both halves.
    #[inline(always)]
    fn both(a: [__m256; 2], b: [__m256; 2], f: impl Fn(__m256, __m256) -> __m256) -> [__m256; 2] {
        [f(a[0], b[0]), f(a[1], b[1])]
    }

    /// [`Lanes::prefetch`] of the AVX2 and AVX-512 levels: `prefetcht1` on the line holding
    /// `bytes[at]`, nothing when `at` is out of bounds.
    #[inline(always)]
    fn prefetch_l2(bytes: &[u8], at: usize) {
        if let Some(b) = bytes.get(at) {
            // SAFETY: a prefetch is only a hint and never faults; the address is that of a
            // live byte anyway. SSE (baseline on x86-64) provides the instruction.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    (b as *const u8).cast(),
                )
            };
        }
    }

    impl Lanes for Avx2 {
        // 16 ymm registers, two per 16-lane vector: 2 × 2 outputs, one accumulator each per
        // pass (8), two weight vectors (4) and one input vector (2).
        const BATCH_TILE: BatchTile = BatchTile {
            rows: 2,
            inputs: 2,
            split: 1,
        };
        const BF16_MATVEC: bool = true;
        #[inline(always)]
        fn bf16_matvec_rows(self, w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) -> bool {
            crate::kernels::bf16_pairs_avx2::matvec_rows(self, w, cols, x, y);
            true
        }
        #[inline(always)]
        fn prefetch(self, bytes: &[u8], at: usize) {
            prefetch_l2(bytes, at);
        }
        type V = [__m256; 2];
        type M = [__m256; 2];
        #[inline(always)]
        fn splat(self, x: f32) -> Self::V {
            let v = self.avx._mm256_set1_ps(x);
            [v, v]
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> Self::V {
            let s = &s[..LANES];
            // SAFETY: `s` holds 16 f32 (checked by the slice above): two unaligned 8-lane loads
            // inside it; the token proves AVX.
            unsafe {
                [
                    self.avx._mm256_loadu_ps(s.as_ptr()),
                    self.avx._mm256_loadu_ps(s.as_ptr().add(8)),
                ]
            }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32], v: Self::V) {
            let out = &mut out[..LANES];
            // SAFETY: `out` holds 16 f32 (checked by the slice above): two unaligned 8-lane
            // stores inside it; the token proves AVX.
            unsafe {
                self.avx._mm256_storeu_ps(out.as_mut_ptr(), v[0]);
                self.avx._mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
            }
        }
        #[inline(always)]
        fn load_bf16(self, s: &[bf16]) -> Self::V {
            let s = &s[..LANES];
            [self.load_bf16_8(&s[..8]), self.load_bf16_8(&s[8..])]
        }
        #[inline(always)]
        fn load_f16(self, s: &[f16]) -> Self::V {
            let s = &s[..LANES];
            [self.load_f16_8(&s[..8]), self.load_f16_8(&s[8..])]
        }
        #[inline(always)]
        fn store_bf16(self, out: &mut [bf16], v: Self::V) {
            let out = &mut out[..LANES];
            let (avx, avx2) = (self.avx, self.avx2);
            // Every lane is in 0..=0xFFFF, so the saturating pack is exact; it interleaves the
            // 128-bit halves ([lo 0-3, hi 0-3, lo 4-7, hi 4-7]), which the permute undoes.
            let packed =
                avx2._mm256_packus_epi32(self.narrow_bf16_8(v[0]), self.narrow_bf16_8(v[1]));
            let packed = avx2._mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
            // SAFETY: 16 bf16 (32 bytes) inside `out` (checked above), unaligned store; the
            // token proves AVX.
            unsafe { avx._mm256_storeu_si256(out.as_mut_ptr().cast::<__m256i>(), packed) }
        }
        #[inline(always)]
        fn add(self, a: Self::V, b: Self::V) -> Self::V {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_add_ps(x, y),
            )
        }
        #[inline(always)]
        fn sub(self, a: Self::V, b: Self::V) -> Self::V {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_sub_ps(x, y),
            )
        }
        #[inline(always)]
        fn mul(self, a: Self::V, b: Self::V) -> Self::V {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_mul_ps(x, y),
            )
        }
        #[inline(always)]
        fn div(self, a: Self::V, b: Self::V) -> Self::V {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_div_ps(x, y),
            )
        }
        #[inline(always)]
        fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            let f = self.fma;
            [
                f._mm256_fmadd_ps(a[0], b[0], c[0]),
                f._mm256_fmadd_ps(a[1], b[1], c[1]),
            ]
        }
        #[inline(always)]
        fn mul_sub(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            let f = self.fma;
            [
                f._mm256_fmsub_ps(a[0], b[0], c[0]),
                f._mm256_fmsub_ps(a[1], b[1], c[1]),
            ]
        }
        #[inline(always)]
        fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            let f = self.fma;
            [
                f._mm256_fnmadd_ps(a[0], b[0], c[0]),
                f._mm256_fnmadd_ps(a[1], b[1], c[1]),
            ]
        }
        #[inline(always)]
        fn max(self, a: Self::V, b: Self::V) -> Self::V {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_max_ps(x, y),
            )
        }
        #[inline(always)]
        fn min(self, a: Self::V, b: Self::V) -> Self::V {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_min_ps(x, y),
            )
        }
        #[inline(always)]
        fn abs(self, a: Self::V) -> Self::V {
            let sign = self.splat(-0.0);
            both(
                sign,
                a,
                #[inline(always)]
                |s, x| self.avx._mm256_andnot_ps(s, x),
            )
        }
        #[inline(always)]
        fn flip_sign(self, y: Self::V, x: Self::V) -> Self::V {
            let sign = self.avx._mm256_set1_ps(-0.0);
            both(
                y,
                x,
                #[inline(always)]
                |y, x| self.avx._mm256_xor_ps(y, self.avx._mm256_and_ps(x, sign)),
            )
        }
        #[inline(always)]
        fn round(self, a: Self::V) -> Self::V {
            [
                self.avx._mm256_round_ps::<ROUND_NEAREST>(a[0]),
                self.avx._mm256_round_ps::<ROUND_NEAREST>(a[1]),
            ]
        }
        #[inline(always)]
        fn ldexp(self, e: Self::V, n: Self::V) -> Self::V {
            [self.ldexp8(e[0], n[0]), self.ldexp8(e[1], n[1])]
        }
        #[inline(always)]
        fn reduce_add(self, a: Self::V) -> f32 {
            let (avx, sse) = (self.avx, self.sse);
            let v = avx._mm256_add_ps(a[0], a[1]);
            let s = sse._mm_add_ps(
                avx._mm256_castps256_ps128(v),
                avx._mm256_extractf128_ps::<1>(v),
            );
            let s = sse._mm_add_ps(s, sse._mm_movehl_ps(s, s));
            let s = sse._mm_add_ss(s, sse._mm_shuffle_ps::<1>(s, s));
            sse._mm_cvtss_f32(s)
        }
        #[inline(always)]
        fn to_array(self, a: Self::V) -> [f32; 16] {
            let mut out = [0f32; 16];
            self.store(&mut out, a);
            out
        }
        #[inline(always)]
        fn lt(self, a: Self::V, b: Self::V) -> Self::M {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_cmp_ps::<CMP_LT_OQ>(x, y),
            )
        }
        #[inline(always)]
        fn gt(self, a: Self::V, b: Self::V) -> Self::M {
            both(
                a,
                b,
                #[inline(always)]
                |x, y| self.avx._mm256_cmp_ps::<CMP_GT_OQ>(x, y),
            )
        }
        #[inline(always)]
        fn is_nan(self, a: Self::V) -> Self::M {
            both(
                a,
                a,
                #[inline(always)]
                |x, y| self.avx._mm256_cmp_ps::<CMP_UNORD_Q>(x, y),
            )
        }
        #[inline(always)]
        fn select(self, m: Self::M, a: Self::V, b: Self::V) -> Self::V {
            [
                self.avx._mm256_blendv_ps(b[0], a[0], m[0]),
                self.avx._mm256_blendv_ps(b[1], a[1], m[1]),
            ]
        }
    }

    impl Lanes for Avx512 {
        // 32 zmm registers: 3 × 2 outputs with all four accumulators in one pass (24), three
        // weight vectors and two input vectors. Measured on one thread (16 inputs, weights in
        // L2): 3 × 2 × 4 ~65 GFLOP/s, 2 × 3 × 4 ~62, 4 × 4 × 1 ~53, 4 × 3 × 2 ~42, the
        // single-row kernel per input ~38.
        const BATCH_TILE: BatchTile = BatchTile {
            rows: 3,
            inputs: 2,
            split: 4,
        };
        const BF16_MATVEC: bool = true;
        #[inline(always)]
        fn prefetch(self, bytes: &[u8], at: usize) {
            prefetch_l2(bytes, at);
        }
        type V = __m512;
        type M = __mmask16;
        #[inline(always)]
        fn bf16_matvec_rows(self, w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) -> bool {
            crate::kernels::bf16_pairs::matvec_rows(self, w, cols, x, y);
            true
        }
        #[inline(always)]
        fn splat(self, x: f32) -> Self::V {
            self.avx512f._mm512_set1_ps(x)
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> Self::V {
            let s = &s[..LANES];
            // SAFETY: `s` holds 16 f32 (checked by the slice above), unaligned load; the token
            // proves AVX-512F.
            unsafe { self.avx512f._mm512_loadu_ps(s.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32], v: Self::V) {
            let out = &mut out[..LANES];
            // SAFETY: `out` holds 16 f32 (checked by the slice above), unaligned store; the
            // token proves AVX-512F.
            unsafe { self.avx512f._mm512_storeu_ps(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_bf16(self, s: &[bf16]) -> Self::V {
            let s = &s[..LANES];
            // SAFETY: 16 bf16 (32 bytes) inside `s` (checked above), unaligned; the token
            // proves AVX.
            let h = unsafe { self.avx._mm256_loadu_si256(s.as_ptr().cast::<__m256i>()) };
            // Zero-extending to 32 bits and shifting left by 16 is exactly bf16 → f32.
            let f = self.avx512f;
            f._mm512_castsi512_ps(f._mm512_slli_epi32::<16>(f._mm512_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        fn load_f16(self, s: &[f16]) -> Self::V {
            let s = &s[..LANES];
            // SAFETY: 16 f16 (32 bytes) inside `s` (checked above), unaligned; the token
            // proves AVX.
            let h = unsafe { self.avx._mm256_loadu_si256(s.as_ptr().cast::<__m256i>()) };
            self.avx512f._mm512_cvtph_ps(h)
        }
        #[inline(always)]
        fn store_bf16(self, out: &mut [bf16], v: Self::V) {
            let out = &mut out[..LANES];
            let f = self.avx512f;
            let bits = f._mm512_castps_si512(v);
            let high = f._mm512_srli_epi32::<16>(bits);
            // Round to nearest even: add 0x7FFF plus the bit that survives as the last.
            let lsb = f._mm512_and_si512(high, f._mm512_set1_epi32(1));
            let bias = f._mm512_add_epi32(lsb, f._mm512_set1_epi32(0x7FFF));
            let rounded = f._mm512_srli_epi32::<16>(f._mm512_add_epi32(bits, bias));
            // NaN: the high half with the quiet bit set, as `half` does.
            let quiet = f._mm512_or_si512(high, f._mm512_set1_epi32(0x40));
            let nan = f._mm512_cmp_ps_mask::<CMP_UNORD_Q>(v, v);
            // Every lane is in 0..=0xFFFF: the truncating narrow is exact.
            let h = f._mm512_cvtepi32_epi16(f._mm512_mask_blend_epi32(nan, rounded, quiet));
            // SAFETY: 16 bf16 (32 bytes) inside `out` (checked above), unaligned store; the
            // token proves AVX.
            unsafe {
                self.avx
                    ._mm256_storeu_si256(out.as_mut_ptr().cast::<__m256i>(), h)
            }
        }
        #[inline(always)]
        fn add(self, a: Self::V, b: Self::V) -> Self::V {
            self.avx512f._mm512_add_ps(a, b)
        }
        #[inline(always)]
        fn sub(self, a: Self::V, b: Self::V) -> Self::V {
            self.avx512f._mm512_sub_ps(a, b)
        }
        #[inline(always)]
        fn mul(self, a: Self::V, b: Self::V) -> Self::V {
            self.avx512f._mm512_mul_ps(a, b)
        }
        #[inline(always)]
        fn div(self, a: Self::V, b: Self::V) -> Self::V {
            self.avx512f._mm512_div_ps(a, b)
        }
        #[inline(always)]
        fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            self.avx512f._mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        fn mul_sub(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            self.avx512f._mm512_fmsub_ps(a, b, c)
        }
        #[inline(always)]
        fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            self.avx512f._mm512_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        fn max(self, a: Self::V, b: Self::V) -> Self::V {
            self.avx512f._mm512_max_ps(a, b)
        }
        #[inline(always)]
        fn min(self, a: Self::V, b: Self::V) -> Self::V {
            self.avx512f._mm512_min_ps(a, b)
        }
        #[inline(always)]
        fn abs(self, a: Self::V) -> Self::V {
            self.avx512f._mm512_abs_ps(a)
        }
        #[inline(always)]
        fn flip_sign(self, y: Self::V, x: Self::V) -> Self::V {
            let f = self.avx512f;
            let sign = f._mm512_set1_epi32(i32::MIN);
            let xs = f._mm512_and_si512(f._mm512_castps_si512(x), sign);
            f._mm512_castsi512_ps(f._mm512_xor_si512(f._mm512_castps_si512(y), xs))
        }
        #[inline(always)]
        fn round(self, a: Self::V) -> Self::V {
            self.avx512f._mm512_roundscale_ps::<ROUND_NEAREST>(a)
        }
        #[inline(always)]
        fn ldexp(self, e: Self::V, n: Self::V) -> Self::V {
            let f = self.avx512f;
            let ni = f._mm512_cvtps_epi32(n);
            let half = f._mm512_srai_epi32::<1>(ni);
            let rest = f._mm512_sub_epi32(ni, half);
            let bias = f._mm512_set1_epi32(127);
            let p1 = f._mm512_slli_epi32::<23>(f._mm512_add_epi32(half, bias));
            let p2 = f._mm512_slli_epi32::<23>(f._mm512_add_epi32(rest, bias));
            f._mm512_mul_ps(
                f._mm512_mul_ps(e, f._mm512_castsi512_ps(p1)),
                f._mm512_castsi512_ps(p2),
            )
        }
        #[inline(always)]
        fn reduce_add(self, a: Self::V) -> f32 {
            self.avx512f._mm512_reduce_add_ps(a)
        }
        #[inline(always)]
        fn to_array(self, a: Self::V) -> [f32; 16] {
            let mut out = [0f32; 16];
            self.store(&mut out, a);
            out
        }
        #[inline(always)]
        fn lt(self, a: Self::V, b: Self::V) -> Self::M {
            self.avx512f._mm512_cmp_ps_mask::<CMP_LT_OQ>(a, b)
        }
        #[inline(always)]
        fn gt(self, a: Self::V, b: Self::V) -> Self::M {
            self.avx512f._mm512_cmp_ps_mask::<CMP_GT_OQ>(a, b)
        }
        #[inline(always)]
        fn is_nan(self, a: Self::V) -> Self::M {
            self.avx512f._mm512_cmp_ps_mask::<CMP_UNORD_Q>(a, a)
        }
        #[inline(always)]
        fn select(self, m: Self::M, a: Self::V, b: Self::V) -> Self::V {
            self.avx512f._mm512_mask_blend_ps(m, b, a)
        }
    }
}
