//! The thin layer between kernels and the instruction set: loading 16 weights of any stored
//! dtype as an `f32x16` register.
//!
//! `wide` picks its vector width at compile time, so the instruction set is chosen by the build
//! (`.cargo/config.toml` sets `target-cpu=native`; see the README's "CPU features" section). The
//! f16 path uses the hardware conversion instruction when the build enables it and a portable
//! conversion otherwise; bf16 widening is a shift the compiler vectorizes.

use half::{bf16, f16};
use wide::f32x16;

/// Lanes in one SIMD register of f32.
pub const LANES: usize = 16;

/// A weight element type the kernels read directly from the mapped file.
pub trait Elem: Copy + Send + Sync + bytemuck::Pod + 'static {
    /// The safetensors name of the dtype.
    const NAME: &'static str;
    /// Widens one element to f32.
    fn to_f32(self) -> f32;
    /// Widens 16 elements, `s[..16]`, to one register. `s` must hold at least 16 elements.
    fn load16(s: &[Self]) -> f32x16;
    /// The slice itself when the type is f32 (no conversion needed).
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

impl Elem for f32 {
    const NAME: &'static str = "F32";
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn load16(s: &[Self]) -> f32x16 {
        let arr: [f32; 16] = s[..16]
            .try_into()
            .expect("caller passes at least 16 elements");
        f32x16::from(arr)
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "BF16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn load16(s: &[Self]) -> f32x16 {
        let s = &s[..16];
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            use std::arch::x86_64::{
                __m256i, _mm256_loadu_si256, _mm512_castsi512_ps, _mm512_cvtepu16_epi32,
                _mm512_slli_epi32,
            };
            // SAFETY: `s` holds exactly 16 bf16 values (32 bytes), read unaligned; the build
            // enables avx512f (cfg above). Zero-extending to 32 bits and shifting left by 16 is
            // exactly bf16 → f32. `__m512` and `f32x16` are both 16 f32 lanes in 64 bytes
            // (wide stores an `__m512` when avx512f is enabled), so the transmute is a no-op.
            unsafe {
                let h = _mm256_loadu_si256(s.as_ptr() as *const __m256i);
                let wide = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                std::mem::transmute::<std::arch::x86_64::__m512, f32x16>(_mm512_castsi512_ps(wide))
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        {
            let mut out = [0f32; 16];
            for (o, x) in out.iter_mut().zip(s) {
                *o = f32::from_bits((x.to_bits() as u32) << 16);
            }
            f32x16::from(out)
        }
    }
}

impl Elem for f16 {
    const NAME: &'static str = "F16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn load16(s: &[Self]) -> f32x16 {
        let s = &s[..16];
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            use std::arch::x86_64::{__m256i, __m512, _mm256_loadu_si256, _mm512_cvtph_ps};
            // SAFETY: `s` holds exactly 16 f16 values (32 bytes), read unaligned; the build
            // enables avx512f (cfg above). `__m512` and `f32x16` are both 16 f32 lanes in 64
            // bytes (wide stores an `__m512` when avx512f is enabled): the transmute is a no-op.
            unsafe {
                let h = _mm256_loadu_si256(s.as_ptr() as *const __m256i);
                std::mem::transmute::<__m512, f32x16>(_mm512_cvtph_ps(h))
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        {
            let mut out = [0f32; 16];
            #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
            {
                use std::arch::x86_64::{
                    __m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128,
                };
                // SAFETY: two loads of 8 f16 values (16 bytes each) inside `s[..16]`, two
                // stores of 8 f32 values inside `out`; the build enables f16c (cfg above).
                unsafe {
                    for half_idx in 0..2 {
                        let h = _mm_loadu_si128(s.as_ptr().add(8 * half_idx) as *const __m128i);
                        _mm256_storeu_ps(out.as_mut_ptr().add(8 * half_idx), _mm256_cvtph_ps(h));
                    }
                }
            }
            #[cfg(not(all(target_arch = "x86_64", target_feature = "f16c")))]
            for (o, x) in out.iter_mut().zip(s) {
                *o = x.to_f32();
            }
            f32x16::from(out)
        }
    }
}

/// Loads 16 f32 values from `s[..16]`.
#[inline(always)]
pub fn load(s: &[f32]) -> f32x16 {
    f32::load16(s)
}

/// Stores a register into `out[..16]`.
#[inline(always)]
pub fn store(out: &mut [f32], v: f32x16) {
    out[..16].copy_from_slice(&v.to_array());
}
