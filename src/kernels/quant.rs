//! Matrix-vector products over block-quantized weights ([`crate::quant`]), with their own
//! run-time instruction-set detection and a portable fallback.
//!
//! Two ways to compute `y = W x` when `W` is q8_0, q4_0 or q4_1:
//!
//! - [`Method::Dequant`]: widen each block's codes to f32 in registers (q8_0: sign-extend and
//!   convert; q4_0: zero-extend the bytes and look each nibble up in a 16-entry table of
//!   `n − 8` with one permute), multiply-add with `x`, and scale the block's partial sum by its
//!   f16 scale. The products are exact, so the result matches "dequantize to f32, then
//!   multiply" up to the order of the f32 sum. q4_1 multiplies its codes `0 … 15` the same
//!   way and adds `m · Σx` per block, with `Σx` of each block taken once per product: the
//!   dequantized product up to f32 rounding (each weight is `n · d + m` with `n · d` exact).
//! - [`Method::Int8`]: quantize `x` per block of 32 to int8 once per product (scale `max|x|/127`,
//!   ties rounded to even; decoding's stacked q/k/v products share one), then take integer dot
//!   products with AVX-512 VNNI `vpdpbusd` (unsigned × signed bytes, four
//!   products summed per 32-bit lane): q8_0 codes are made unsigned by adding 128 (an `xor`),
//!   q4_0 nibbles are unsigned already, and the offset (`128 · Σx` or `8 · Σx` per lane) is
//!   precomputed from the quantized activation; q4_1 adds `m · Σx` per block, with `Σx` of each
//!   block precomputed too. Fewer instructions per weight, but the activation's rounding
//!   (relative 1/254 per block) enters the result.
//!
//! [`Method::Portable`] is the scalar code, for CPUs without AVX-512. Every method has a
//! scalar twin: [`scalar_matvec`] (dequantized weights, f64 sums) and [`scalar_matvec_int8`]
//! (the same quantized activation, exact integer sums).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::quant::{QMatrix, QRow, QuantFormat, BLOCK};

/// How a quantized matrix-vector product is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Scalar code, any CPU.
    Portable,
    /// Codes widened to f32 in AVX-512 registers, f32 FMA (needs avx512f, avx512bw,
    /// avx512vl).
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
            // The dequantizing kernels load their scales with AVX-512BW masked loads.
            let f = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl");
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
static CHOSEN: [AtomicU8; 3] = [AtomicU8::new(0), AtomicU8::new(0), AtomicU8::new(0)];

fn format_index(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q8_0 => 0,
        QuantFormat::Q4_0 => 1,
        QuantFormat::Q4_1 => 2,
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
    /// Per-thread scratch: the quantized activation of the product this thread started.
    static ACTIVATION: RefCell<Activation> = RefCell::new(Activation::default());
}

/// An activation quantized per block of 32 to int8, as [`Method::Int8`] uses it.
#[derive(Debug, Default, Clone)]
pub struct Activation {
    /// The codes, `round(x / d)` (ties to even) in [-127, 127].
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
    /// Per block, `d · Σ codes` in f32: the block's `Σx` as the int8 kernels see it, which
    /// q4_1's minimums multiply.
    pub block_sums: Vec<f32>,
}

impl Activation {
    /// Quantizes `x` (length a multiple of 32).
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(x.len().is_multiple_of(BLOCK), "activation: partial block");
        #[cfg(target_arch = "x86_64")]
        if features().0 {
            // SAFETY: avx512f (with bw and vl) was detected at run time.
            unsafe { self.quantize_avx512(x) };
            return;
        }
        self.quantize_body(x);
    }

    /// [`Activation::quantize`] compiled for AVX-512, where the loops vectorize 16 wide (the
    /// baseline x86-64 build gave 7% of a q4_0 decode to this function). The same IEEE
    /// operations as the baseline body (no contraction), so the same codes.
    ///
    /// # Safety
    /// avx512f is available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_avx512(&mut self, x: &[f32]) {
        self.quantize_body(x);
    }

    #[inline(always)]
    fn quantize_body(&mut self, x: &[f32]) {
        let (n, blocks) = (x.len(), x.len() / BLOCK);
        // Every buffer is resized and written in place (no per-element pushes): this runs once
        // per product of a decode step.
        self.codes.resize(n, 0);
        self.scales.resize(blocks, 0.0);
        for ((block, codes), scale) in x
            .chunks_exact(BLOCK)
            .zip(self.codes.chunks_exact_mut(BLOCK))
            .zip(&mut self.scales)
        {
            // max |x| over 16 lanes, then across them: the same maximum as a left fold (NaN
            // is skipped either way), without its chain of 32 dependent `max`es.
            let mut lanes = [0f32; 16];
            for part in block.chunks_exact(16) {
                for (m, v) in lanes.iter_mut().zip(part) {
                    *m = m.max(v.abs());
                }
            }
            let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            *scale = d;
            // Round to nearest, ties to even, by the 1.5·2²³ trick: plain adds that vectorize
            // on any x86-64 (`f32::round` is a libm call there, 5% of a q4_0 decode).
            const MAGIC: f32 = 12_582_912.0;
            for (c, &v) in codes.iter_mut().zip(block) {
                *c = ((v * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
            }
        }
        // The q4_0 layout: per pair of blocks, the halves interleaved; a last unpaired block
        // keeps its natural order (the kernel takes it 256 bits wide).
        self.codes_q4.resize(n, 0);
        let half = BLOCK / 2;
        let mut b = 0;
        while b + 2 <= blocks {
            let (src, dst) = (
                &self.codes[b * BLOCK..(b + 2) * BLOCK],
                &mut self.codes_q4[b * BLOCK..(b + 2) * BLOCK],
            );
            dst[..half].copy_from_slice(&src[..half]);
            dst[half..BLOCK].copy_from_slice(&src[BLOCK..BLOCK + half]);
            dst[BLOCK..BLOCK + half].copy_from_slice(&src[half..BLOCK]);
            dst[BLOCK + half..].copy_from_slice(&src[BLOCK + half..]);
            b += 2;
        }
        if b < blocks {
            self.codes_q4[b * BLOCK..].copy_from_slice(&self.codes[b * BLOCK..]);
        }
        let sums = |codes: &[i8], out: &mut Vec<i32>| {
            out.resize(codes.len() / 4, 0);
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(4)) {
                *o = c[0] as i32 + c[1] as i32 + c[2] as i32 + c[3] as i32;
            }
        };
        sums(&self.codes, &mut self.sums4);
        sums(&self.codes_q4, &mut self.sums4_q4);
        let scaled = |sums: &[i32], k: i32, out: &mut Vec<i32>| {
            out.resize(sums.len(), 0);
            for (o, &v) in out.iter_mut().zip(sums) {
                *o = k * v;
            }
        };
        scaled(&self.sums4, -128, &mut self.offset_q8);
        scaled(&self.sums4_q4, -8, &mut self.offset_q4);
        self.block_sums.resize(blocks, 0.0);
        for ((o, sums), &d) in self
            .block_sums
            .iter_mut()
            .zip(self.sums4.chunks_exact(BLOCK / 4))
            .zip(&self.scales)
        {
            *o = sums.iter().sum::<i32>() as f32 * d;
        }
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
        let row = m.row(r);
        let (codes, scales) = (row.codes, row.scales);
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
                QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                    let offset = if m.format == QuantFormat::Q4_0 { 8 } else { 0 };
                    c.iter()
                        .enumerate()
                        .map(|(j, &byte)| {
                            ((byte & 0xF) as i64 - offset) * xq[j] as i64
                                + ((byte >> 4) as i64 - offset) * xq[j + BLOCK / 2] as i64
                        })
                        .sum()
                }
            };
            // The kernel multiplies the two scales in f32 first; so does the twin.
            sum += dot as f64 * (s.to_f32() * act.scales[b]) as f64;
            if m.format.has_mins() {
                sum += row.mins[b].to_f32() as f64 * act.block_sums[b] as f64;
            }
        }
        *out = sum as f32;
    }
}

/// `y = W x` for a quantized `W`, on the calling thread, by `method` (which must be
/// [`supported`]; an unsupported one runs [`Method::Portable`]).
pub fn matvec_serial_with(method: Method, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), m.cols, "quantized matvec: x length");
    assert_eq!(y.len(), m.rows, "quantized matvec: y length");
    match usable(method) {
        Method::Int8 => with_activation(x, |act| int8_rows(m, act, y)),
        method => float_rows(method, m, x, y),
    }
}

/// Whether products over `format` by its [`default_method`] take `x` quantized
/// ([`Method::Int8`]), so that several products sharing one `x` can quantize it once
/// ([`with_activation`], [`matvec_serial_prepared`]).
pub fn needs_activation(format: QuantFormat) -> bool {
    usable(default_method(format)) == Method::Int8
}

/// Runs `f` with `x` quantized ([`Activation::quantize`]) into this thread's scratch. The
/// scratch is taken out of its cell for the call, so `f` may run parallel work that quantizes
/// on this thread too.
pub fn with_activation<R>(x: &[f32], f: impl FnOnce(&Activation) -> R) -> R {
    let mut act = ACTIVATION.take();
    act.quantize(x);
    let r = f(&act);
    ACTIVATION.set(act);
    r
}

/// [`matvec_serial`] given, when [`needs_activation`], the activation already quantized from
/// `x` (by [`with_activation`]); decoding's stacked q/k/v products and their row blocks share
/// one instead of each quantizing `x` again (7–12% of a q4_0 decode).
pub fn matvec_serial_prepared(m: QMatrix<'_>, x: &[f32], act: Option<&Activation>, y: &mut [f32]) {
    match (usable(default_method(m.format)), act) {
        (Method::Int8, Some(act)) => {
            assert_eq!(x.len(), m.cols, "quantized matvec: x length");
            assert_eq!(y.len(), m.rows, "quantized matvec: y length");
            int8_rows(m, act, y)
        }
        _ => matvec_serial(m, x, y),
    }
}

/// `method` if this CPU supports it, else [`Method::Portable`].
fn usable(method: Method) -> Method {
    if supported(method) {
        method
    } else {
        Method::Portable
    }
}

/// Sets `y[r] = f(row r of m)` for every row (`y.len() == m.rows`), slicing the rows by
/// their strides as it goes: [`QMatrix::row`]'s per-row offsets and bounds checks, and a match
/// on the format per row, cost 3–9% of a 3072 × 768 int8 product (one 24-block row takes
/// ~20 ns there).
#[inline(always)]
fn for_each_row(m: QMatrix<'_>, y: &mut [f32], mut f: impl FnMut(QRow<'_>) -> f32) {
    debug_assert_eq!(y.len(), m.rows);
    if m.cols == 0 {
        // Rows of no weights: empty sums (and no zero-sized chunks below).
        y.fill(0.0);
        return;
    }
    let (rb, sb) = (m.format.row_bytes(m.cols), m.cols / BLOCK);
    // `QMatrix::new` guarantees these; a matrix built field by field is held to them here,
    // once per product, so that no row is skipped (the kernels take each row's slices as
    // their bounds).
    let mins_needed = if m.format.has_mins() { m.rows * sb } else { 0 };
    assert!(
        m.codes.len() >= m.rows * rb
            && m.scales.len() >= m.rows * sb
            && m.mins.len() >= mins_needed,
        "quantized matvec: a {}x{} {} matrix needs {} code bytes, {} scales and {} minimums",
        m.rows,
        m.cols,
        m.format,
        m.rows * rb,
        m.rows * sb,
        mins_needed
    );
    // Formats without minimums give every row an empty slice.
    let mins = m.mins.chunks_exact(sb).chain(std::iter::repeat(&[][..]));
    let rows = m.codes.chunks_exact(rb).zip(m.scales.chunks_exact(sb));
    for ((out, (codes, scales)), mins) in y.iter_mut().zip(rows).zip(mins) {
        *out = f(QRow {
            codes,
            scales,
            mins,
        });
    }
}

/// The sums of `x` per block of 32 (in order, f32): what q4_1's minimums multiply.
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(BLOCK)
        .map(|b| b.iter().fold(0f32, |s, &v| s + v))
        .collect()
}

/// [`Method::Portable`] or [`Method::Dequant`] rows (`method` supported).
fn float_rows(method: Method, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    match method {
        // SAFETY (each call below): `supported(Dequant)` checked avx512f/bw/vl at run time;
        // `codes` holds `scales.len()` blocks of the format, `x` `32·scales.len()` values
        // and, for q4_1, `mins` and `xsum` as many entries as `scales` (the callers' asserts,
        // `block_sums` of that `x`, and QMatrix's invariant, which `for_each_row` slices by).
        #[cfg(target_arch = "x86_64")]
        Method::Dequant => match m.format {
            QuantFormat::Q8_0 => for_each_row(m, y, |row| unsafe {
                avx512::q8_dequant_row(row.codes, row.scales, x)
            }),
            QuantFormat::Q4_0 => for_each_row(m, y, |row| unsafe {
                avx512::q4_dequant_row(row.codes, row.scales, x)
            }),
            QuantFormat::Q4_1 => {
                let xsum = block_sums(x);
                for_each_row(m, y, |row| unsafe {
                    avx512::q4_1_dequant_row(row.codes, row.scales, row.mins, &xsum, x)
                })
            }
        },
        _ => for_each_row(m, y, |row| portable_row(m.format, row, x)),
    }
}

/// [`Method::Int8`] rows (supported) against an activation quantized from `x` once for the
/// whole product.
fn int8_rows(m: QMatrix<'_>, act: &Activation, y: &mut [f32]) {
    assert_eq!(
        act.scales.len(),
        m.cols / BLOCK,
        "quantized matvec: activation length"
    );
    // SAFETY (each call below): `supported(Int8)` checked avx512f/bw/vl/vnni at run time
    // (callers pass Int8 only then); `act` was quantized from an `x` of `32·blocks` values
    // (asserted above: codes, scales, block sums and offsets in both layouts), `codes` holds
    // `blocks` blocks, `scales` `blocks` scales and, for q4_1, `mins` `blocks` minimums
    // (QMatrix's invariant, which `for_each_row` slices by).
    #[cfg(target_arch = "x86_64")]
    match m.format {
        QuantFormat::Q8_0 => for_each_row(m, y, |row| unsafe {
            avx512::q8_int8_row(row.codes, row.scales, act)
        }),
        QuantFormat::Q4_0 => for_each_row(m, y, |row| unsafe {
            avx512::q4_int8_row::<false>(row.codes, row.scales, &[], act)
        }),
        QuantFormat::Q4_1 => for_each_row(m, y, |row| unsafe {
            avx512::q4_int8_row::<true>(row.codes, row.scales, row.mins, act)
        }),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (act, y);
        unreachable!("Method::Int8 is never supported off x86-64");
    }
}

/// `y = W x` on the calling thread with [`default_method`].
pub fn matvec_serial(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    matvec_serial_with(default_method(m.format), m, x, y)
}

/// `y = W x` with `method`, split into row blocks across the rayon pool as
/// [`super::matvec`] splits float products.
pub fn matvec_with(method: Method, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), m.cols, "quantized matvec: x length");
    assert_eq!(y.len(), m.rows, "quantized matvec: y length");
    let Some(block) = super::matvec_block_rows(m.rows, m.cols, rayon::current_num_threads()) else {
        matvec_serial_with(method, m, x, y);
        return;
    };
    match usable(method) {
        // The activation is quantized once here and shared by every block (quantizing it per
        // block cost 12–17% of a q4_0 decode).
        Method::Int8 => with_activation(x, |act| {
            y.par_chunks_mut(block).enumerate().for_each(|(b, yb)| {
                let r0 = b * block;
                int8_rows(m.row_range(r0..r0 + yb.len()), act, yb)
            })
        }),
        method => y.par_chunks_mut(block).enumerate().for_each(|(b, yb)| {
            let r0 = b * block;
            float_rows(method, m.row_range(r0..r0 + yb.len()), x, yb)
        }),
    }
}

/// `y = W x` with [`default_method`], parallel over row blocks.
pub fn matvec(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    matvec_with(default_method(m.format), m, x, y)
}

/// One row by the portable method: each block's exact products summed in f32, times the scale
/// (q4_1: each dequantized weight times `x`, summed in f32).
fn portable_row(format: QuantFormat, row: QRow<'_>, x: &[f32]) -> f32 {
    let (codes, scales) = (row.codes, row.scales);
    let bb = format.block_bytes();
    let mut sum = 0f32;
    for (b, d) in scales.iter().enumerate() {
        let d = d.to_f32();
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
            QuantFormat::Q4_1 => {
                let m = row.mins[b].to_f32();
                for (j, &byte) in c.iter().enumerate() {
                    part += ((byte & 0xF) as f32 * d + m) * xb[j];
                    part += ((byte >> 4) as f32 * d + m) * xb[j + BLOCK / 2];
                }
                sum += part;
                continue;
            }
        }
        sum += part * d;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, BLOCK};
    use half::f16;
    use std::arch::x86_64::*;

    /// The scales of blocks `b0..b0 + 16` (fewer at the end, the rest 0) widened to f32 with
    /// one `vcvtph2ps`: the kernels widen their row's scales 16 at a time as they go, instead
    /// of a pass over every scale of the matrix before it (10% of a q4_0 decode).
    ///
    /// # Safety
    /// avx512f/bw/vl are available; `b0 < scales.len()` (`f16` is two bytes, `repr(transparent)`
    /// over `u16`: sixteen of them are 256 bits).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn widen16(scales: &[f16], b0: usize) -> __m512 {
        // A masked load: the lanes past the row's last scale are neither read nor faulted on.
        let halves =
            _mm256_maskz_loadu_epi16(lanes16(scales.len() - b0), scales.as_ptr().add(b0).cast());
        _mm512_cvtph_ps(halves)
    }

    /// The mask of the first `min(n, 16)` lanes.
    #[inline]
    fn lanes16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            (1u16 << n) - 1
        }
    }

    /// Lane `i` of `v` in every lane (the scale of one block, kept in a register: reading it
    /// back from a stored array stalled on store forwarding).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn lane(v: __m512, i: usize) -> __m512 {
        _mm512_permutexvar_ps(_mm512_set1_epi32(i as i32), v)
    }

    /// [`widen16`] times the activation's scales of the same blocks, in f32 (the product the
    /// twin forms): the int8 kernels' combined per-block scales, 16 at a time.
    ///
    /// # Safety
    /// avx512f/bw/vl are available; `b0 < scales.len()` and `act_scales.len() ≥ scales.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn widen16_times(scales: &[f16], act_scales: &[f32], b0: usize) -> __m512 {
        let a = _mm512_maskz_loadu_ps(lanes16(scales.len() - b0), act_scales.as_ptr().add(b0));
        _mm512_mul_ps(widen16(scales, b0), a)
    }

    /// The block loop of the q8_0/q4_0 dequantizing kernels: `Σ_b d_b · partial!(b)` with
    /// blocks alternating between two accumulators (even blocks in the first). Two blocks per
    /// iteration, so the accumulators are registers: indexed by `b & 1` in a one-block loop
    /// they lived on the stack, a store and a reload in every block's dependency chain. The
    /// same sums in the same order as that loop, so bit for bit its results.
    macro_rules! dequant_blocks {
        ($n:expr, $scales:expr, $partial:ident) => {{
            let (n, scales) = ($n, $scales);
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut sc = _mm512_setzero_ps();
            let mut b = 0;
            while b + 2 <= n {
                // `b` is even, so a pair never straddles two groups of 16 scales.
                if b % 16 == 0 {
                    sc = widen16(scales, b);
                }
                let (t0, t1) = ($partial!(b), $partial!(b + 1));
                acc0 = _mm512_fmadd_ps(t0, lane(sc, b % 16), acc0);
                acc1 = _mm512_fmadd_ps(t1, lane(sc, (b + 1) % 16), acc1);
                b += 2;
            }
            if b < n {
                if b % 16 == 0 {
                    sc = widen16(scales, b);
                }
                acc0 = _mm512_fmadd_ps($partial!(b), lane(sc, b % 16), acc0);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }};
    }

    /// One q8_0 row, codes widened to f32.
    ///
    /// # Safety
    /// avx512f/bw/vl are available; `codes.len() ≥ 32·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn q8_dequant_row(codes: &[u8], scales: &[f16], x: &[f32]) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK && x.len() >= n * BLOCK);
        let (c, xp) = (codes.as_ptr(), x.as_ptr());
        // Block b's exact products with x, summed over its 32 weights.
        macro_rules! partial {
            ($b:expr) => {{
                let b = $b;
                let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    c.add(b * BLOCK).cast(),
                )));
                let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    c.add(b * BLOCK + 16).cast(),
                )));
                let t = _mm512_mul_ps(w0, _mm512_loadu_ps(xp.add(b * BLOCK)));
                _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(b * BLOCK + 16)), t)
            }};
        }
        dequant_blocks!(n, scales, partial)
    }

    /// One q4_0 row, nibbles looked up as `n − 8` in f32.
    ///
    /// # Safety
    /// avx512f/bw/vl are available; `codes.len() ≥ 16·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn q4_dequant_row(codes: &[u8], scales: &[f16], x: &[f32]) -> f32 {
        let table = _mm512_setr_ps(
            -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
        );
        nibble_row(codes, scales, x, table)
    }

    /// One q4_1 row as `Σ_b d_b · Σ n·x + Σ_b m_b · xsum_b`: the codes `0 … 15` multiplied
    /// as q4_0's are (three f32 operations per block instead of the four that forming each
    /// weight `n·d + m` takes), and the minimums against the blocks' sums of `x`, taken once
    /// per product by the caller, 16 blocks at a time.
    ///
    /// # Safety
    /// avx512f/bw/vl are available; `codes.len() ≥ 16·n`, `mins.len() ≥ n`, `xsum.len() ≥ n`,
    /// `x.len() ≥ 32·n` for `n = scales.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn q4_1_dequant_row(
        codes: &[u8],
        scales: &[f16],
        mins: &[f16],
        xsum: &[f32],
        x: &[f32],
    ) -> f32 {
        let table = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        nibble_row(codes, scales, x, table) + mins_dot(&mins[..scales.len()], xsum)
    }

    /// `Σ_b d_b · Σ_j table[n_j]·x_j` over a row of 4-bit codes: each nibble looked up in
    /// `table` (its 16 code values in f32) with one `vpermps`, which reads only the low 4 bits
    /// of each index, multiplied with `x` exactly, the block's sum scaled once. The q4_0
    /// (`n − 8`) and q4_1 (`n`) rows differ only in the table.
    ///
    /// # Safety
    /// avx512f/bw/vl are available; `codes.len() ≥ 16·n`, `x.len() ≥ 32·n` for `n = scales.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn nibble_row(codes: &[u8], scales: &[f16], x: &[f32], table: __m512) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK / 2 && x.len() >= n * BLOCK);
        let (c, xp) = (codes.as_ptr(), x.as_ptr());
        // Block b's exact products with x, summed over its 32 weights.
        macro_rules! partial {
            ($b:expr) => {{
                let b = $b;
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(c.add(b * BLOCK / 2).cast()));
                let w0 = _mm512_permutexvar_ps(v, table);
                let w1 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table);
                let t = _mm512_mul_ps(w0, _mm512_loadu_ps(xp.add(b * BLOCK)));
                _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(b * BLOCK + 16)), t)
            }};
        }
        dequant_blocks!(n, scales, partial)
    }

    /// `Σ_b mins[b] · sums[b]` over the `n = mins.len()` blocks, 16 at a time: q4_1's
    /// minimums against the blocks' sums of x (exact, for `Dequant`; of the quantized
    /// activation, for `Int8`).
    ///
    /// # Safety
    /// avx512f/bw/vl are available; `sums.len() ≥ mins.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn mins_dot(mins: &[f16], sums: &[f32]) -> f32 {
        let n = mins.len();
        let sums = &sums[..n];
        let mut acc = _mm512_setzero_ps();
        for b0 in (0..n).step_by(16) {
            let s = _mm512_maskz_loadu_ps(lanes16(n - b0), sums.as_ptr().add(b0));
            acc = _mm512_fmadd_ps(widen16(mins, b0), s, acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// One q8_0 row by VNNI: `Σ_b s_b · Σ (q + 128)·x − 128·Σx` per block, 256 bits a block,
    /// `s_b` the weight scale `scales[b]` times the activation's (in f32, as the twin does).
    ///
    /// # Safety
    /// avx512f/bw/vl/vnni are available; `codes.len() ≥ 32·n` for `n = scales.len()`, and `act`
    /// quantized from an `x` of `32·n` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q8_int8_row(codes: &[u8], scales: &[f16], act: &Activation) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK && act.codes.len() >= n * BLOCK);
        debug_assert!(act.offset_q8.len() >= n * 8);
        let (c, xq, off) = (codes.as_ptr(), act.codes.as_ptr(), act.offset_q8.as_ptr());
        let flip = _mm256_set1_epi8(-128);
        // Block b's integer dot product, converted: −128 · Σx per lane, then + Σ (q + 128) · x.
        macro_rules! dot {
            ($b:expr) => {{
                let b = $b;
                let w = _mm256_xor_si256(_mm256_loadu_si256(c.add(b * BLOCK).cast()), flip);
                let x = _mm256_loadu_si256(xq.add(b * BLOCK).cast());
                let init = _mm256_loadu_si256(off.add(b * 8).cast());
                _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(init, w, x))
            }};
        }
        // Even blocks into `acc0`, odd ones into `acc1`, two per iteration so that both stay
        // in registers (as `dequant_blocks!` does).
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut sc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 2 <= n {
            if b % 16 == 0 {
                sc = widen16_times(scales, &act.scales, b);
            }
            let (d0, d1) = (dot!(b), dot!(b + 1));
            acc0 = _mm256_fmadd_ps(d0, _mm512_castps512_ps256(lane(sc, b % 16)), acc0);
            acc1 = _mm256_fmadd_ps(d1, _mm512_castps512_ps256(lane(sc, (b + 1) % 16)), acc1);
            b += 2;
        }
        if b < n {
            if b % 16 == 0 {
                sc = widen16_times(scales, &act.scales, b);
            }
            acc0 = _mm256_fmadd_ps(dot!(b), _mm512_castps512_ps256(lane(sc, b % 16)), acc0);
        }
        let s = _mm256_add_ps(acc0, acc1);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// One q4_0 row (`MINS` false) or q4_1 row (`MINS` true) by VNNI, two blocks per 512-bit
    /// register: nibbles unpacked to `[b₀ lo, b₁ lo, b₀ hi, b₁ hi]`, against the activation in
    /// that layout; each block's weight scale `scales[b]` times the activation's (in f32, as
    /// the twin does). q4_0 preloads the offset −8·Σx in the accumulator; q4_1 starts from 0
    /// and adds `Σ_b mins[b] · block_sums[b]`, 16 blocks at a time.
    ///
    /// # Safety
    /// avx512f/bw/vl/vnni are available; `codes.len() ≥ 16·n` and, with `MINS`,
    /// `mins.len() ≥ n` for `n = scales.len()`, and `act` quantized from an `x` of `32·n`
    /// values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4_int8_row<const MINS: bool>(
        codes: &[u8],
        scales: &[f16],
        mins: &[f16],
        act: &Activation,
    ) -> f32 {
        let n = scales.len();
        debug_assert!(codes.len() >= n * BLOCK / 2 && act.codes_q4.len() >= n * BLOCK);
        debug_assert!(act.offset_q4.len() >= n * 8 && act.block_sums.len() >= n);
        debug_assert!(!MINS || mins.len() >= n);
        let (c, xq, off) = (
            codes.as_ptr(),
            act.codes_q4.as_ptr(),
            act.offset_q4.as_ptr(),
        );
        let low = _mm256_set1_epi8(0x0F);
        // Lanes 0–3 and 8–11 belong to the first block of a pair, 4–7 and 12–15 to the second.
        let pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
        let two = _mm512_set1_epi32(2);
        let mut acc = _mm512_setzero_ps();
        let (mut sc, mut idx) = (_mm512_setzero_ps(), pick);
        let mut b = 0;
        while b + 2 <= n {
            // `b` is even, so a pair never straddles two groups of 16.
            if b % 16 == 0 {
                sc = widen16_times(scales, &act.scales, b);
                idx = pick;
            }
            let v = _mm256_loadu_si256(c.add(b * BLOCK / 2).cast());
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let x = _mm512_loadu_si512(xq.add(b * BLOCK).cast());
            let init = if MINS {
                _mm512_setzero_si512()
            } else {
                _mm512_loadu_si512(off.add(b * 8).cast())
            };
            let dot = _mm512_dpbusd_epi32(init, w, x);
            // The pair's two combined scales, lanes b % 16 and the next, spread as `pick` says
            // (`idx` = `pick` + b % 16, stepped by 2 in a register).
            let s = _mm512_permutexvar_ps(idx, sc);
            idx = _mm512_add_epi32(idx, two);
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
            let init = if MINS {
                _mm256_setzero_si256()
            } else {
                _mm256_loadu_si256(off.add(b * 8).cast())
            };
            let dot = _mm256_dpbusd_epi32(init, w, x);
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), dot);
            let scale = scales[b].to_f32() * *act.scales.get_unchecked(b);
            total += lanes.iter().sum::<i32>() as f32 * scale;
        }
        if MINS {
            total += mins_dot(&mins[..n], &act.block_sums);
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
