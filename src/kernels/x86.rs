//! The x86 levels of [`super::simd::Lanes`]: [`Avx2`] (two `__m256` halves per 16-lane vector;
//! AVX2, FMA, F16C) and [`Avx512`] (one `__m512`), as pulp tokens, and their bf16 row kernels
//! ([`super::simd::Lanes::bf16_matvec_rows`]). Every method is `#[inline(always)]` and holds no
//! closure around an intrinsic: it compiles inside the level's `#[target_feature]` entry points
//! of [`super`] (`scripts/check_inline_intrinsics.sh` checks the release binary).

use super::sgemm::GemmTile;
use super::simd::{sealed, BatchTile, Lanes, LANES};
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

/// Eight set lanes then eight clear ones: 8 lanes from `8 − w` on set the first `w`.
static FIRST_LANES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// [`Lanes::pack_panel`] at both x86 levels: each 8 rows × 8 columns block is loaded as
/// eight rows, transposed in registers (`vunpck*ps`, `vshufps`, `vperm2f128`) and stored as
/// eight 8-wide pieces of `[k][n]`; 256-bit registers at AVX-512 too, since its 16 × 16
/// transposition takes more shuffles per element. A last block of fewer than 8 rows is
/// transposed with zero rows in place of the missing ones and stores only its own lanes;
/// columns past the last whole 8 are packed one value at a time.
#[inline(always)]
fn pack_panel_8x8(avx: pulp::core_arch::x86::Avx, rows: &[&[f32]], kc: usize, dst: &mut [f32]) {
    let n = rows.len();
    let dst = &mut dst[..kc * n];
    let whole = kc / 8 * 8;
    for (jb, block) in rows.chunks(8).enumerate() {
        let width = block.len();
        // Lanes `0 .. width` set: the stores of a last block narrower than 8.
        let mask = {
            let first = &FIRST_LANES[8 - width.min(8)..][..8];
            // SAFETY: 8 i32 inside `first` (sliced above), unaligned load; the token proves
            // AVX.
            unsafe { avx._mm256_loadu_si256(first.as_ptr().cast()) }
        };
        let block: [&[f32]; 8] =
            std::array::from_fn(|i| block.get(i).map_or(&[][..], |r| &r[..whole]));
        for kb in (0..whole).step_by(8) {
            let mut r = [avx._mm256_setzero_ps(); 8];
            for (r, row) in r.iter_mut().zip(&block).take(width) {
                let row = &row[kb..kb + 8];
                // SAFETY: 8 f32 inside `row` (sliced above), unaligned load; the token
                // proves AVX.
                *r = unsafe { avx._mm256_loadu_ps(row.as_ptr()) };
            }
            // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
            let t0 = avx._mm256_unpacklo_ps(r[0], r[1]);
            let t1 = avx._mm256_unpackhi_ps(r[0], r[1]);
            let t2 = avx._mm256_unpacklo_ps(r[2], r[3]);
            let t3 = avx._mm256_unpackhi_ps(r[2], r[3]);
            let t4 = avx._mm256_unpacklo_ps(r[4], r[5]);
            let t5 = avx._mm256_unpackhi_ps(r[4], r[5]);
            let t6 = avx._mm256_unpacklo_ps(r[6], r[7]);
            let t7 = avx._mm256_unpackhi_ps(r[6], r[7]);
            let u0 = avx._mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = avx._mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = avx._mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = avx._mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = avx._mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = avx._mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = avx._mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = avx._mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                avx._mm256_permute2f128_ps::<0x20>(u0, u4),
                avx._mm256_permute2f128_ps::<0x20>(u1, u5),
                avx._mm256_permute2f128_ps::<0x20>(u2, u6),
                avx._mm256_permute2f128_ps::<0x20>(u3, u7),
                avx._mm256_permute2f128_ps::<0x31>(u0, u4),
                avx._mm256_permute2f128_ps::<0x31>(u1, u5),
                avx._mm256_permute2f128_ps::<0x31>(u2, u6),
                avx._mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (i, &col) in cols.iter().enumerate() {
                let at = (kb + i) * n + jb * 8;
                if width == 8 {
                    let out = &mut dst[at..at + 8];
                    // SAFETY: 8 f32 inside `out` (sliced above), unaligned store; the token
                    // proves AVX.
                    unsafe { avx._mm256_storeu_ps(out.as_mut_ptr(), col) };
                } else {
                    let out = &mut dst[at..at + width];
                    // SAFETY: the mask's first `width` lanes are set (`width < 8`), so the
                    // store writes `out`'s `width` f32 (sliced above) and touches nothing
                    // past them; the token proves AVX.
                    unsafe { avx._mm256_maskstore_ps(out.as_mut_ptr(), mask, col) };
                }
            }
        }
    }
    for (j, row) in rows.iter().enumerate() {
        for (k, &v) in row[whole..kc].iter().enumerate() {
            dst[(whole + k) * n + j] = v;
        }
    }
}

impl Lanes for Avx2 {
    // 16 ymm registers, two per 16-lane vector: 3 × 2 outputs, one accumulator each per
    // pass (12), the rest for the loaded weights and inputs (the compiler reloads some): the
    // fastest of the tiles measured against each other (docs/performance.md).
    const BATCH_TILE: BatchTile = BatchTile {
        rows: 3,
        inputs: 2,
        split: 1,
    };
    // 16 ymm registers: 6 × 16 outputs accumulating (12), one 16-lane vector of weights (2)
    // and one broadcast.
    const GEMM_TILE: GemmTile = GemmTile {
        rows: 6,
        vectors: 1,
    };
    const BF16_MATVEC: bool = true;
    #[inline(always)]
    fn bf16_matvec_rows(self, w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) -> bool {
        bf16_pairs::matvec_rows(self, w, cols, x, y);
        true
    }
    #[inline(always)]
    fn prefetch(self, bytes: &[u8], at: usize) {
        prefetch_l2(bytes, at);
    }
    #[inline(always)]
    fn pack_panel(self, rows: &[&[f32]], kc: usize, dst: &mut [f32]) {
        pack_panel_8x8(self.avx, rows, kc, dst);
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
        let packed = avx2._mm256_packus_epi32(self.narrow_bf16_8(v[0]), self.narrow_bf16_8(v[1]));
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
    // 32 zmm registers: 12 × 32 outputs accumulating (24), two weight vectors and the
    // broadcast (folded into the multiply-add as a memory operand).
    const GEMM_TILE: GemmTile = GemmTile {
        rows: 12,
        vectors: 2,
    };
    const BF16_MATVEC: bool = true;
    #[inline(always)]
    fn prefetch(self, bytes: &[u8], at: usize) {
        prefetch_l2(bytes, at);
    }
    #[inline(always)]
    fn pack_panel(self, rows: &[&[f32]], kc: usize, dst: &mut [f32]) {
        pack_panel_8x8(self.avx, rows, kc, dst);
    }
    type V = __m512;
    type M = __mmask16;
    #[inline(always)]
    fn bf16_matvec_rows(self, w: &[bf16], cols: usize, x: &[f32], y: &mut [f32]) -> bool {
        bf16_pairs::matvec_rows(self, w, cols, x, y);
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

/// bf16 rows without the widening shuffle, at both x86 levels: a bf16 is the high half of an
/// f32, so one load of `2L` weights (`L` lanes of 32 bits) yields the even-indexed ones as f32
/// by a 16-bit left shift of each lane and the odd-indexed ones by masking the low half off.
/// Paired with `x`'s even and odd elements (deinterleaved once per call, per block of `2L`
/// columns), that is a load, two integer ops and two FMAs per `2L` weights instead of two
/// zero-extending shuffles, two shifts and two FMAs, and each weight byte is loaded once.
/// Products are exact either way; only the order of the sum changes. The level supplies its
/// registers ([`PairLanes`]); the row loop and its order of additions are the same for both.
mod bf16_pairs {
    use super::{Avx2, Avx512};
    use half::bf16;
    use std::arch::x86_64::{__m256, __m512};
    use std::cell::RefCell;

    thread_local! {
        /// `x` deinterleaved per block of `2L` columns: `L` even then `L` odd elements.
        static SPLIT_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// One level's registers for the pair kernel: `L` f32 lanes.
    pub(super) trait PairLanes: Copy {
        /// A register of `L` f32.
        type V: Copy;
        /// f32 lanes per register.
        const L: usize;
        /// Blocks of `2L` weights per iteration of the row loop, each into its own (even, odd)
        /// pair of accumulators: enough FMAs in flight that none waits on the previous one.
        const UNROLL: usize;
        fn zero(self) -> Self::V;
        fn add(self, a: Self::V, b: Self::V) -> Self::V;
        fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// The even- and odd-indexed weights of the `2L` bf16 at `w`, as f32.
        ///
        /// # Safety
        /// `2L` bf16 lie behind `w`.
        unsafe fn widen_pair(self, w: *const bf16) -> (Self::V, Self::V);
        /// `L` f32 from `x`.
        ///
        /// # Safety
        /// `L` f32 lie behind `x`.
        unsafe fn load(self, x: *const f32) -> Self::V;
        /// The sum of the lanes.
        fn reduce(self, v: Self::V) -> f32;
    }

    impl PairLanes for Avx2 {
        type V = __m256;
        const L: usize = 8;
        const UNROLL: usize = 4;
        #[inline(always)]
        fn zero(self) -> __m256 {
            self.avx._mm256_setzero_ps()
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            self.avx._mm256_add_ps(a, b)
        }
        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            self.fma._mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn widen_pair(self, w: *const bf16) -> (__m256, __m256) {
            let (avx, avx2) = (self.avx, self.avx2);
            // SAFETY: 16 bf16 (32 bytes) lie behind `w` (the caller's contract); an unaligned
            // load, the token proves AVX.
            let v = unsafe { avx._mm256_loadu_si256(w.cast()) };
            let high = avx._mm256_set1_epi32(0xFFFF_0000_u32 as i32);
            (
                avx._mm256_castsi256_ps(avx2._mm256_slli_epi32::<16>(v)),
                avx._mm256_castsi256_ps(avx2._mm256_and_si256(v, high)),
            )
        }
        #[inline(always)]
        unsafe fn load(self, x: *const f32) -> __m256 {
            // SAFETY: 8 f32 lie behind `x` (the caller's contract).
            unsafe { self.avx._mm256_loadu_ps(x) }
        }
        #[inline(always)]
        fn reduce(self, v: __m256) -> f32 {
            let (avx, sse) = (self.avx, self.sse);
            let h = sse._mm_add_ps(
                avx._mm256_castps256_ps128(v),
                avx._mm256_extractf128_ps::<1>(v),
            );
            let h = sse._mm_add_ps(h, sse._mm_movehl_ps(h, h));
            let h = sse._mm_add_ss(h, sse._mm_shuffle_ps::<1>(h, h));
            sse._mm_cvtss_f32(h)
        }
    }

    impl PairLanes for Avx512 {
        type V = __m512;
        const L: usize = 16;
        const UNROLL: usize = 2;
        #[inline(always)]
        fn zero(self) -> __m512 {
            self.avx512f._mm512_setzero_ps()
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            self.avx512f._mm512_add_ps(a, b)
        }
        #[inline(always)]
        fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            self.avx512f._mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn widen_pair(self, w: *const bf16) -> (__m512, __m512) {
            let f = self.avx512f;
            // SAFETY: 32 bf16 (64 bytes) lie behind `w` (the caller's contract); an unaligned
            // load, the token proves AVX-512F.
            let v = unsafe { f._mm512_loadu_si512(w.cast()) };
            let high = f._mm512_set1_epi32(0xFFFF_0000_u32 as i32);
            (
                f._mm512_castsi512_ps(f._mm512_slli_epi32::<16>(v)),
                f._mm512_castsi512_ps(f._mm512_and_si512(v, high)),
            )
        }
        #[inline(always)]
        unsafe fn load(self, x: *const f32) -> __m512 {
            // SAFETY: 16 f32 lie behind `x` (the caller's contract).
            unsafe { self.avx512f._mm512_loadu_ps(x) }
        }
        #[inline(always)]
        fn reduce(self, v: __m512) -> f32 {
            self.avx512f._mm512_reduce_add_ps(v)
        }
    }

    /// `y = W x` for bf16 rows of `cols` weights.
    #[inline(always)]
    pub(crate) fn matvec_rows<T: PairLanes>(
        t: T,
        w: &[bf16],
        cols: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        assert!(w.len() >= y.len() * cols && x.len() >= cols);
        let block = 2 * T::L;
        // Taken out of the thread-local and put back, not borrowed in a closure: the row loop
        // must stay in this function, which is inlined into the target-feature entry point.
        let mut split = SPLIT_X.take();
        split.clear();
        for xb in x[..cols].chunks_exact(block) {
            split.extend(xb.iter().step_by(2));
            split.extend(xb.iter().skip(1).step_by(2));
        }
        for (r, out) in y.iter_mut().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            *out = match T::UNROLL {
                2 => dot_row::<T, 2>(t, row, &split, x),
                _ => dot_row::<T, 4>(t, row, &split, x),
            };
        }
        SPLIT_X.set(split);
    }

    /// Block `b` (`2L` weights) into the (even, odd) accumulator pair `pair`.
    ///
    /// # Safety
    /// Weights `2Lb..2L(b + 1)` must lie behind `w` and floats `2Lb..2L(b + 1)` behind `xs`.
    #[inline(always)]
    unsafe fn block<T: PairLanes>(
        t: T,
        w: *const bf16,
        xs: *const f32,
        b: usize,
        pair: &mut [T::V; 2],
    ) {
        let o = 2 * T::L * b;
        // SAFETY: the caller's contract covers the block's weights and its even and odd floats.
        let ((even, odd), xe, xo) = unsafe {
            (
                t.widen_pair(w.add(o)),
                t.load(xs.add(o)),
                t.load(xs.add(o + T::L)),
            )
        };
        pair[0] = t.mul_add(even, xe, pair[0]);
        pair[1] = t.mul_add(odd, xo, pair[1]);
    }

    /// Dot product of one row (`cols = w.len()`) with `x`, `split` the deinterleaved `x` of
    /// `cols / 2L` blocks; `U` (= `T::UNROLL`, 2 or 4) blocks per iteration.
    #[inline(always)]
    fn dot_row<T: PairLanes, const U: usize>(t: T, w: &[bf16], split: &[f32], x: &[f32]) -> f32 {
        let cols = w.len();
        let blocks = cols / (2 * T::L);
        assert!(split.len() >= blocks * 2 * T::L && x.len() >= cols);
        let (base, xs) = (w.as_ptr(), split.as_ptr());
        let mut acc = [[t.zero(); 2]; U];
        let mut b = 0;
        // SAFETY (each `block` call): b + j < blocks, so the block's weights lie in `w` and its
        // floats in `split` (asserted above).
        while b + U <= blocks {
            for (j, pair) in acc.iter_mut().enumerate() {
                unsafe { block(t, base, xs, b + j, pair) };
            }
            b += U;
        }
        while b < blocks {
            unsafe { block(t, base, xs, b, &mut acc[0]) };
            b += 1;
        }
        // Each pair's sum, then the pairs in a tree: ((p0 + p1) + (p2 + p3)) for four.
        let mut p = [t.zero(); U];
        for (pj, pair) in p.iter_mut().zip(&acc) {
            *pj = t.add(pair[0], pair[1]);
        }
        let mut width = U;
        while width > 1 {
            width /= 2;
            for j in 0..width {
                p[j] = t.add(p[2 * j], p[2 * j + 1]);
            }
        }
        let mut s = t.reduce(p[0]);
        for k in blocks * 2 * T::L..cols {
            s += w[k].to_f32() * x[k];
        }
        s
    }
}
