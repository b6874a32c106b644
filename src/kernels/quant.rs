//! Matrix-vector products over block-quantized weights ([`crate::quant`]), with their own
//! run-time instruction-set detection and a portable fallback.
//!
//! Two ways to compute `y = W x` when `W` is q8_0 or q4_0:
//!
//! - [`Method::Dequant`]: widen each block's codes to f32 in registers (q8_0: sign-extend and
//!   convert; q4_0: zero-extend the bytes and look each nibble up in a 16-entry table of
//!   `n − 8` with one permute), multiply-add with `x`, and scale the block's partial sum by its
//!   f16 scale. The products are exact, so the result matches "dequantize to f32, then
//!   multiply" up to the order of the f32 sum.
//! - [`Method::Int8`]: quantize `x` per block of 32 to int8 once per call (scale `max|x|/127`),
//!   then take integer dot products with AVX-512 VNNI `vpdpbusd` (unsigned × signed bytes, four
//!   products summed per 32-bit lane): q8_0 codes are made unsigned by adding 128 (an `xor`),
//!   q4_0 nibbles are unsigned already, and the offset (`128 · Σx` or `8 · Σx` per lane) is
//!   precomputed from the quantized activation. Fewer instructions per weight, but the
//!   activation's rounding (relative 1/254 per block) enters the result.
//!
//! [`Method::Portable`] is the scalar code, for CPUs without AVX-512. Every method has a
//! scalar twin: [`scalar_matvec`] (dequantized weights, f64 sums) and [`scalar_matvec_int8`]
//! (the same quantized activation, exact integer sums).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::quant::{QMatrix, QuantFormat, BLOCK};

/// How a quantized matrix-vector product is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Scalar code, any CPU.
    Portable,
    /// Codes widened to f32 in AVX-512 registers, f32 FMA (needs avx512f).
    Dequant,
    /// Activation quantized to int8 per block, AVX-512 VNNI integer dot products (needs
    /// avx512f, avx512bw, avx512vl, avx512vnni).
    Int8,
}

/// What this CPU supports, detected once.
fn features() -> (bool, bool) {
    static F: OnceLock<(bool, bool)> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let f = std::arch::is_x86_feature_detected!("avx512f");
            let vnni = f
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni");
            (f, vnni)
        }
        #[cfg(not(target_arch = "x86_64"))]
        (false, false)
    })
}

/// True when `method` can run on this CPU.
pub fn supported(method: Method) -> bool {
    let (f, vnni) = features();
    match method {
        Method::Portable => true,
        Method::Dequant => f,
        Method::Int8 => vnni,
    }
}

/// The method the model uses for `format` on this CPU: the one chosen with [`set_method`] if
/// any, else [`Method::Dequant`] where AVX-512 is available and [`Method::Portable`]
/// otherwise. [`Method::Int8`] measured faster here (docs/performance.md: 1.15× for q8_0 and
/// 1.5× for q4_0 on a cache-resident product, one thread), but its activation rounding gives up
/// the model's parity with the dequantized f32 reference (tests/quant.rs) and makes stepping
/// differ from prefill (which multiplies exact activations), so it is opt-in.
pub fn default_method(format: QuantFormat) -> Method {
    match CHOSEN[format_index(format)].load(Ordering::Relaxed) {
        1 => return Method::Portable,
        2 => return Method::Dequant,
        3 => return Method::Int8,
        _ => {}
    }
    if supported(Method::Dequant) {
        Method::Dequant
    } else {
        Method::Portable
    }
}

/// The process-wide choice per format (0: none), see [`set_method`].
static CHOSEN: [AtomicU8; 2] = [AtomicU8::new(0), AtomicU8::new(0)];

fn format_index(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q8_0 => 0,
        QuantFormat::Q4_0 => 1,
    }
}

/// Chooses, for the whole process, the method every model decodes `format` weights with
/// (`None`: back to the default of [`default_method`]). Returns false, changing nothing, when
/// the CPU does not support `method`. With [`Method::Int8`] the logits are no longer those of
/// the dequantized f32 model up to f32 rounding: each product's activation is rounded to int8
/// per block of 32 (relative error up to 1/254 of the block's largest value).
pub fn set_method(format: QuantFormat, method: Option<Method>) -> bool {
    let code = match method {
        None => 0,
        Some(m) if !supported(m) => return false,
        Some(Method::Portable) => 1,
        Some(Method::Dequant) => 2,
        Some(Method::Int8) => 3,
    };
    CHOSEN[format_index(format)].store(code, Ordering::Relaxed);
    true
}

thread_local! {
    /// Per-thread scratch: one row's scales in f32 (times the activation's for Int8), and the
    /// quantized activation.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    row_scales: Vec<f32>,
    act: Activation,
}

/// An activation quantized per block of 32 to int8, as [`Method::Int8`] uses it.
#[derive(Debug, Default, Clone)]
pub struct Activation {
    /// The codes, `round(x / d)` in [-127, 127].
    pub codes: Vec<i8>,
    /// Per block, `d = max|x| / 127` (0 for an all-zero block).
    pub scales: Vec<f32>,
    /// Per group of 4 codes, their sum (the offsets' correction).
    pub sums4: Vec<i32>,
    /// The q4_0 layout: per pair of blocks, codes `[b₀ 0..16, b₁ 0..16, b₀ 16..32, b₁ 16..32]`
    /// (the order the nibble unpacking produces), and its sums per 4.
    pub codes_q4: Vec<i8>,
    /// Sums per 4 of `codes_q4`.
    pub sums4_q4: Vec<i32>,
    /// `−128 · sums4`: the q8_0 kernel's accumulator start (the offset of its unsigned codes).
    pub offset_q8: Vec<i32>,
    /// `−8 · sums4_q4`: the q4_0 kernel's accumulator start.
    pub offset_q4: Vec<i32>,
}

impl Activation {
    /// Quantizes `x` (length a multiple of 32).
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(x.len().is_multiple_of(BLOCK), "activation: partial block");
        let blocks = x.len() / BLOCK;
        self.codes.clear();
        self.scales.clear();
        for block in x.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            self.scales.push(d);
            self.codes.extend(
                block
                    .iter()
                    .map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8),
            );
        }
        self.sums4.clear();
        self.sums4.extend(
            self.codes
                .chunks_exact(4)
                .map(|c| c.iter().map(|&v| v as i32).sum::<i32>()),
        );
        self.codes_q4.clear();
        let mut b = 0;
        while b < blocks {
            let b1 = (b + 1).min(blocks - 1);
            let (c0, c1) = (&self.codes[b * BLOCK..], &self.codes[b1 * BLOCK..]);
            let half = BLOCK / 2;
            if b + 1 < blocks {
                self.codes_q4.extend_from_slice(&c0[..half]);
                self.codes_q4.extend_from_slice(&c1[..half]);
                self.codes_q4.extend_from_slice(&c0[half..BLOCK]);
                self.codes_q4.extend_from_slice(&c1[half..BLOCK]);
            } else {
                // A last unpaired block keeps its natural order (handled 256 bits wide).
                self.codes_q4.extend_from_slice(&c0[..BLOCK]);
            }
            b += 2;
        }
        self.sums4_q4.clear();
        self.sums4_q4.extend(
            self.codes_q4
                .chunks_exact(4)
                .map(|c| c.iter().map(|&v| v as i32).sum::<i32>()),
        );
        self.offset_q8.clear();
        self.offset_q8.extend(self.sums4.iter().map(|&v| -128 * v));
        self.offset_q4.clear();
        self.offset_q4.extend(self.sums4_q4.iter().map(|&v| -8 * v));
    }
}

/// Scalar twin of [`Method::Dequant`] and [`Method::Portable`]: every weight dequantized to
/// f32, products summed in f64.
pub fn scalar_matvec(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), m.cols, "quantized matvec: x length");
    assert_eq!(y.len(), m.rows, "quantized matvec: y length");
    let mut w = vec![0f32; m.cols];
    for (r, out) in y.iter_mut().enumerate() {
        m.dequantize_rows(r..r + 1, &mut w);
        *out = w
            .iter()
            .zip(x)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum::<f64>() as f32;
    }
}

/// Scalar twin of [`Method::Int8`]: `x` quantized by [`Activation::quantize`], exact integer
/// dot products per block, combined in f64 with the product of the two scales.
pub fn scalar_matvec_int8(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), m.cols, "quantized matvec: x length");
    assert_eq!(y.len(), m.rows, "quantized matvec: y length");
    let mut act = Activation::default();
    act.quantize(x);
    let bb = m.format.block_bytes();
    for (r, out) in y.iter_mut().enumerate() {
        let (codes, scales) = m.row(r);
        let mut sum = 0f64;
        for (b, s) in scales.iter().enumerate() {
            let c = &codes[b * bb..(b + 1) * bb];
            let xq = &act.codes[b * BLOCK..(b + 1) * BLOCK];
            let dot: i64 = match m.format {
                QuantFormat::Q8_0 => c
                    .iter()
                    .zip(xq)
                    .map(|(&w, &v)| (w as i8) as i64 * v as i64)
                    .sum(),
                QuantFormat::Q4_0 => c
                    .iter()
                    .enumerate()
                    .map(|(j, &byte)| {
                        ((byte & 0xF) as i64 - 8) * xq[j] as i64
                            + ((byte >> 4) as i64 - 8) * xq[j + BLOCK / 2] as i64
                    })
                    .sum(),
            };
            // The kernel multiplies the two scales in f32 first; so does the twin.
            sum += dot as f64 * (s.to_f32() * act.scales[b]) as f64;
        }
        *out = sum as f32;
    }
}

/// `y = W x` for a quantized `W`, on the calling thread, by `method` (which must be
/// [`supported`]; an unsupported one runs [`Method::Portable`]).
pub fn matvec_serial_with(method: Method, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), m.cols, "quantized matvec: x length");
    assert_eq!(y.len(), m.rows, "quantized matvec: y length");
    let method = if supported(method) {
        method
    } else {
        Method::Portable
    };
    SCRATCH.with_borrow_mut(|s| {
        let Scratch { row_scales, act } = s;
        let blocks = m.cols / BLOCK;
        // All scales of these rows widened at once (one call instead of one per row).
        row_scales.resize(m.scales.len(), 0.0);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(m.scales, row_scales);
        if method == Method::Int8 {
            act.quantize(x);
        }
        for (r, out) in y.iter_mut().enumerate() {
            let (codes, _) = m.row(r);
            let row_scales = &mut row_scales[r * blocks..(r + 1) * blocks];
            *out = match method {
                Method::Portable => portable_row(m.format, codes, row_scales, x),
                #[cfg(target_arch = "x86_64")]
                Method::Dequant => {
                    // SAFETY: `supported(Dequant)` checked avx512f at run time; `codes` holds
                    // `blocks` blocks of the format and `row_scales`, `x` `blocks` scales and
                    // `32·blocks` values (the asserts above and QMatrix's invariant).
                    unsafe {
                        match m.format {
                            QuantFormat::Q8_0 => avx512::q8_dequant_row(codes, row_scales, x),
                            QuantFormat::Q4_0 => avx512::q4_dequant_row(codes, row_scales, x),
                        }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                Method::Int8 => {
                    for (s, d) in row_scales.iter_mut().zip(&act.scales) {
                        *s *= d;
                    }
                    // SAFETY: `supported(Int8)` checked avx512f/bw/vl/vnni at run time;
                    // `act` was quantized from `x` above (32·blocks codes, 8·blocks offsets in
                    // both layouts), `codes` holds `blocks` blocks, `row_scales` `blocks`.
                    unsafe {
                        match m.format {
                            QuantFormat::Q8_0 => avx512::q8_int8_row(codes, row_scales, act),
                            QuantFormat::Q4_0 => avx512::q4_int8_row(codes, row_scales, act),
                        }
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                _ => portable_row(m.format, codes, row_scales, x),
            };
        }
    })
}

/// `y = W x` on the calling thread with [`default_method`].
pub fn matvec_serial(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    matvec_serial_with(default_method(m.format), m, x, y)
}

/// `y = W x` with `method`, split into row blocks across the rayon pool as
/// [`super::matvec`] splits float products.
pub fn matvec_with(method: Method, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    assert_eq!(y.len(), m.rows, "quantized matvec: y length");
    match super::matvec_block_rows(m.rows, m.cols, rayon::current_num_threads()) {
        None => matvec_serial_with(method, m, x, y),
        Some(block) => y.par_chunks_mut(block).enumerate().for_each(|(b, yb)| {
            let r0 = b * block;
            matvec_serial_with(method, m.row_range(r0..r0 + yb.len()), x, yb)
        }),
    }
}

/// `y = W x` with [`default_method`], parallel over row blocks.
pub fn matvec(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    matvec_with(default_method(m.format), m, x, y)
}

/// One row by the portable method: each block's exact products summed in f32, times the scale.
fn portable_row(format: QuantFormat, codes: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let bb = format.block_bytes();
    let mut sum = 0f32;
    for (b, &d) in scales.iter().enumerate() {
        let c = &codes[b * bb..(b + 1) * bb];
        let xb = &x[b * BLOCK..(b + 1) * BLOCK];
        let mut part = 0f32;
        match format {
            QuantFormat::Q8_0 => {
                for (&q, &v) in c.iter().zip(xb) {
                    part += (q as i8) as f32 * v;
                }
            }
            QuantFormat::Q4_0 => {
                for (j, &byte) in c.iter().enumerate() {
                    part += ((byte & 0xF) as f32 - 8.0) * xb[j];
                    part += ((byte >> 4) as f32 - 8.0) * xb[j + BLOCK / 2];
                }
            }
        }
        sum += part * d;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, BLOCK};
    use std::arch::x86_64::*;

    /// One q8_0 row, codes widened to f32.
    ///
    /// # Safety
    /// avx512f is available; `codes.len() ≥ 32·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn q8_dequant_row(codes: &[u8], scales: &[f32], x: &[f32]) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK && x.len() >= n * BLOCK);
        let (c, xp) = (codes.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 2];
        for b in 0..n {
            let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                c.add(b * BLOCK).cast(),
            )));
            let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                c.add(b * BLOCK + 16).cast(),
            )));
            let t = _mm512_mul_ps(w0, _mm512_loadu_ps(xp.add(b * BLOCK)));
            let t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(b * BLOCK + 16)), t);
            acc[b & 1] = _mm512_fmadd_ps(t, _mm512_set1_ps(*scales.get_unchecked(b)), acc[b & 1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    /// One q4_0 row, nibbles looked up as `n − 8` in f32.
    ///
    /// # Safety
    /// avx512f is available; `codes.len() ≥ 16·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn q4_dequant_row(codes: &[u8], scales: &[f32], x: &[f32]) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK / 2 && x.len() >= n * BLOCK);
        let (c, xp) = (codes.as_ptr(), x.as_ptr());
        let table = _mm512_setr_ps(
            -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
        );
        let mut acc = [_mm512_setzero_ps(); 2];
        for b in 0..n {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(c.add(b * BLOCK / 2).cast()));
            // vpermps reads the low 4 bits of each index: the low nibble directly.
            let w0 = _mm512_permutexvar_ps(v, table);
            let w1 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table);
            let t = _mm512_mul_ps(w0, _mm512_loadu_ps(xp.add(b * BLOCK)));
            let t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(b * BLOCK + 16)), t);
            acc[b & 1] = _mm512_fmadd_ps(t, _mm512_set1_ps(*scales.get_unchecked(b)), acc[b & 1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    /// One q8_0 row by VNNI: `Σ_b s_b · Σ (q + 128)·x − 128·Σx` per block, 256 bits a block.
    /// `scales[b]` is the weight scale times the activation's.
    ///
    /// # Safety
    /// avx512f/bw/vl/vnni are available; `codes.len() ≥ 32·n` for `n = scales.len()`, and `act`
    /// quantized from an `x` of `32·n` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q8_int8_row(codes: &[u8], scales: &[f32], act: &Activation) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK && act.codes.len() >= n * BLOCK);
        debug_assert!(act.offset_q8.len() >= n * 8);
        let (c, xq, off) = (codes.as_ptr(), act.codes.as_ptr(), act.offset_q8.as_ptr());
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..n {
            let w = _mm256_xor_si256(_mm256_loadu_si256(c.add(b * BLOCK).cast()), flip);
            let x = _mm256_loadu_si256(xq.add(b * BLOCK).cast());
            // −128 · Σx per lane, then + Σ (q + 128) · x.
            let init = _mm256_loadu_si256(off.add(b * 8).cast());
            let dot = _mm256_dpbusd_epi32(init, w, x);
            acc[b & 1] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(dot),
                _mm256_set1_ps(*scales.get_unchecked(b)),
                acc[b & 1],
            );
        }
        let s = _mm256_add_ps(acc[0], acc[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// One q4_0 row by VNNI, two blocks per 512-bit register: nibbles unpacked to
    /// `[b₀ lo, b₁ lo, b₀ hi, b₁ hi]`, against the activation in that layout, offset −8·Σx
    /// preloaded in the accumulator. `scales[b]` is the weight scale times the activation's.
    ///
    /// # Safety
    /// avx512f/bw/vl/vnni are available; `codes.len() ≥ 16·n` for `n = scales.len()`, and
    /// `act` quantized from an `x` of `32·n` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4_int8_row(codes: &[u8], scales: &[f32], act: &Activation) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK / 2 && act.codes_q4.len() >= n * BLOCK);
        debug_assert!(act.offset_q4.len() >= n * 8);
        let (c, xq, off) = (
            codes.as_ptr(),
            act.codes_q4.as_ptr(),
            act.offset_q4.as_ptr(),
        );
        let low = _mm256_set1_epi8(0x0F);
        // Lanes 0–3 and 8–11 belong to the first block of a pair, 4–7 and 12–15 to the second.
        let pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 2 <= n {
            let v = _mm256_loadu_si256(c.add(b * BLOCK / 2).cast());
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let x = _mm512_loadu_si512(xq.add(b * BLOCK).cast());
            let init = _mm512_loadu_si512(off.add(b * 8).cast());
            let dot = _mm512_dpbusd_epi32(init, w, x);
            let pair = _mm512_castpd_ps(_mm512_set1_pd(
                (scales.as_ptr().add(b) as *const f64).read_unaligned(),
            ));
            let s = _mm512_permutexvar_ps(pick, pair);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc);
            b += 2;
        }
        let mut total = _mm512_reduce_add_ps(acc);
        if b < n {
            // The last, unpaired block: natural order, 256 bits.
            let v = _mm_loadu_si128(c.add(b * BLOCK / 2).cast());
            let lo = _mm_and_si128(v, _mm256_castsi256_si128(low));
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), _mm256_castsi256_si128(low));
            let w = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi);
            let x = _mm256_loadu_si256(xq.add(b * BLOCK).cast());
            let init = _mm256_loadu_si256(off.add(b * 8).cast());
            let dot = _mm256_dpbusd_epi32(init, w, x);
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), dot);
            total += lanes.iter().sum::<i32>() as f32 * *scales.get_unchecked(b);
        }
        total
    }
}

/// Widens rows `r0..r0 + out.len() / cols` of `m` into `out`, for the matrix-product paths.
pub fn dequantize_rows(m: QMatrix<'_>, r0: usize, out: &mut [f32]) {
    let rows = out.len() / m.cols.max(1);
    m.dequantize_rows(r0..r0 + rows, out);
}

/// Rows of a quantized matrix widened per block for the matrix-product path.
const WIDEN_ROWS: usize = 128;

/// `y = x · Wᵀ` for `x` of shape `[rows, in]` and a quantized `W` of shape `[out, in]`; `y` is
/// `[rows, out]`. One row is a matrix-vector product ([`matvec`]); more rows widen `W` 128
/// rows at a time into an f32 scratch block and multiply it on the `gemm` path, as
/// half-precision weights are: prefill and batched decode are compute-bound, the widening
/// costs one pass over each weight per call (amortized over all rows), and the products are
/// then exactly those of the dequantized f32 model.
pub fn linear(x: &[f32], rows: usize, m: QMatrix<'_>, y: &mut [f32]) {
    let (inp, out) = (m.cols, m.rows);
    assert!(x.len() >= rows * inp, "quantized linear: x too short");
    assert!(y.len() >= rows * out, "quantized linear: y too short");
    if rows == 0 || out == 0 {
        return;
    }
    if rows == 1 {
        matvec(m, &x[..inp], &mut y[..out]);
        return;
    }
    use super::matmul::{gemm_f32, MatRef};
    let xm = MatRef::row_major(&x[..rows * inp], rows, inp);
    let mut block = vec![0f32; WIDEN_ROWS.min(out) * inp];
    let mut o = 0;
    while o < out {
        let nb = WIDEN_ROWS.min(out - o);
        let dst = &mut block[..nb * inp];
        // Widening in parallel: for a 128-row block of a 768-wide matrix it is ~100k weights.
        dst.par_chunks_mut(inp)
            .enumerate()
            .for_each(|(i, row)| m.dequantize_rows(o + i..o + i + 1, row));
        let bm = MatRef::row_major(dst, nb, inp).t();
        gemm_f32(xm, bm, &mut y[o..], out, false);
        o += nb;
    }
}
