//! Matrix-vector products over block-quantized weights ([`crate::quant`]), dispatched per
//! instruction-set level as the float kernels are ([`super::isa`]: `portable`, `avx2`,
//! `avx512`, lowered by `PERFORMER_ISA`).
//!
//! Two methods compute `y = W x` when `W` is q8_0, q4_0 or q4_1 ([`QuantMethod`]):
//!
//! - [`QuantMethod::Dequant`] (the default): widen each block's codes to f32 in registers and
//!   multiply-add with `x`, then scale the block's partial sum by its f16 scale. The products
//!   are exact, so the result matches "dequantize to f32, then multiply" up to the order of
//!   the f32 sum. AVX-512: q8_0 codes sign-extended and converted 16 at a time; q4_0/q4_1
//!   nibbles looked up in a 16-entry f32 table with one `vpermps`. AVX2: codes sign-extended
//!   8 at a time (q4 nibbles unpacked to bytes, `− 8` for q4_0, first). q4_1 multiplies its
//!   codes `0 … 15` the same way and adds `m · Σx` per block, with `Σx` of each block taken
//!   once per product (each weight is `n · d + m` with `n · d` exact).
//! - [`QuantMethod::Int8`]: quantize `x` per block of 32 to int8 once per product (scale
//!   `max|x|/127`, ties rounded to even; decoding's stacked q/k/v products share one), then
//!   take exact integer dot products per block, converted to f32 and multiplied by the product
//!   of the two scales. AVX-512 with VNNI: `vpdpbusd` (unsigned × signed bytes, four products
//!   summed per 32-bit lane): for q8_0 the activation made unsigned (`x + 128`, once per
//!   product) against the signed codes, from the offset `−128 · Σw` that one more `vpdpbusd`
//!   takes per weight block for every activation sharing it; q4 nibbles are unsigned already
//!   (q4_0's offset `−8 · Σx`, precomputed per activation). AVX2 (and AVX-512 without VNNI): `vpmaddubsw` + `vpmaddwd`, llama.cpp's
//!   technique; its i16 pair sums saturate, so q8_0 takes the sign trick (the weight's
//!   magnitude unsigned, the activation carrying the weight's sign: pairs ≤ 2 · 128 · 127)
//!   instead of the offset. Where the CPU has AVX-VNNI (`avxvnni`), the AVX2 level uses
//!   `vpdpbusd` on 256-bit registers. Portable: the integer sums in scalar code. Fewer
//!   instructions per weight, but the activation's rounding (relative 1/254 per block) enters
//!   the result, so it is opt-in, chosen per model ([`crate::LoadOptions::quant_kernel`]).
//!
//! The VNNI extensions are detected at run time on top of the level ([`QuantKernels::new`]).
//! Every level and method has a scalar twin: [`scalar_matvec`] (dequantized weights, f64 sums)
//! and [`scalar_matvec_int8`] (the same quantized activation, exact integer sums).
//!
//! The level's code runs inside `#[target_feature]` entry points (the private `entry`
//! module): the row loops and every intrinsic are inlined there, with no closure around an
//! intrinsic (a closure is compiled without the entry point's features).

use std::cell::RefCell;
use std::fmt;

use rayon::prelude::*;

use super::isa::{self, Isa, Kernels};
use crate::quant::{PackedView, QMatrix, QuantFormat, BLOCK};
use crate::Error;

use activation::block_sums;
pub use activation::Activation;

mod activation;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// How a quantized matrix-vector product is computed (at any kernel level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuantMethod {
    /// Codes widened to f32, exact products with `x`, f32 sums: the dequantized f32 model up
    /// to the order of the sums (the reference the int8 method is measured against).
    Dequant,
    /// `x` quantized to int8 per block of 32, exact integer dot products (VNNI, or
    /// `vpmaddubsw` on AVX2). The default: 1.3–2.5× the dequantizing kernels' speed at every
    /// SIMD level, and the activation's rounding (half a step of 1/127 of each block's
    /// largest value) moves the shipped model's stepped bits per byte by about 0.02%, far
    /// less than quantizing the weights does (docs/quantized-weights.md).
    #[default]
    Int8,
}

impl QuantMethod {
    /// Both methods, the exact one first.
    pub const ALL: [QuantMethod; 2] = [QuantMethod::Dequant, QuantMethod::Int8];

    /// The name `--quant-kernel` accepts and `performer bench` prints.
    pub fn name(self) -> &'static str {
        match self {
            QuantMethod::Dequant => "dequant",
            QuantMethod::Int8 => "int8",
        }
    }

    /// Parses a method name (`dequant` or `int8`, case-insensitive).
    pub fn parse(s: &str) -> Result<QuantMethod, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "dequant" => Ok(QuantMethod::Dequant),
            "int8" => Ok(QuantMethod::Int8),
            other => Err(Error::invalid(
                "quant_kernel",
                format!("{other:?}: expected dequant or int8"),
            )),
        }
    }

    /// Whether the method's products take `x` quantized, so that several products sharing one
    /// `x` can quantize it once ([`with_activation`], [`QuantKernels::matvec_serial_prepared`]).
    pub fn quantizes_activation(self) -> bool {
        self == QuantMethod::Int8
    }
}

impl fmt::Display for QuantMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        QuantMethod::parse(s)
    }
}

/// Whether the int8 method at `isa` has its VNNI instructions on this CPU: AVX-512 VNNI at the
/// AVX-512 level, AVX-VNNI (`vpdpbusd` on 256-bit registers) at the AVX2 level.
pub fn vnni_available(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512vnni"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => std::arch::is_x86_feature_detected!("avxvnni"),
        _ => false,
    }
}

/// The quantized kernels at one supported level by one method: the level's [`Kernels`], the
/// [`QuantMethod`], and whether the int8 method uses VNNI there (detected by [`Self::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantKernels {
    kernels: Kernels,
    method: QuantMethod,
    /// Invariant: true only for `Int8` where [`vnni_available`] holds for the level, or
    /// where `evex` is.
    vnni: bool,
    /// Invariant: true only for `Int8` at the AVX2 level with `vnni`, on a CPU with AVX-512
    /// VL and VNNI ([`Self::avx2_vnni_by_avx512`]).
    evex: bool,
}

impl QuantKernels {
    /// `method` at the level of `kernels`, with VNNI wherever the CPU has it.
    pub fn new(kernels: Kernels, method: QuantMethod) -> Self {
        let vnni = method == QuantMethod::Int8 && vnni_available(kernels.isa());
        QuantKernels {
            kernels,
            method,
            vnni,
            evex: false,
        }
    }

    /// The AVX2 level's VNNI kernels with `vpdpbusd` in its AVX-512 VL encoding instead of
    /// AVX-VNNI's, where the CPU has AVX-512 VL and VNNI; `None` elsewhere, or for another
    /// level or method. The same code as AVX-VNNI's but the encoding: the tests run it on
    /// AVX-512 machines, which have no AVX-VNNI (AMD Zen 4, Intel Xeon before Sapphire Rapids),
    /// nor do emulators (qemu's TCG lacks AVX-VNNI).
    #[doc(hidden)]
    pub fn avx2_vnni_by_avx512(self) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if self.kernels.isa() == Isa::Avx2
            && self.method == QuantMethod::Int8
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            return Some(QuantKernels {
                vnni: true,
                evex: true,
                ..self
            });
        }
        None
    }

    /// `method` at the process's level ([`isa::active`]).
    pub fn active(method: QuantMethod) -> Self {
        QuantKernels::new(isa::active(), method)
    }

    /// The same kernels without VNNI: the int8 method by `vpmaddubsw` (AVX2 and AVX-512
    /// levels) even on a CPU with VNNI, for tests and comparisons.
    pub fn without_vnni(self) -> Self {
        QuantKernels {
            vnni: false,
            evex: false,
            ..self
        }
    }

    /// The level.
    pub fn kernels(self) -> Kernels {
        self.kernels
    }

    /// The method.
    pub fn method(self) -> QuantMethod {
        self.method
    }

    /// Whether the int8 method runs on VNNI instructions.
    pub fn uses_vnni(self) -> bool {
        self.vnni
    }

    /// What the products run on, for reports: `dequant`, `int8 (vnni)`, `int8 (avx-vnni)`,
    /// `int8 (maddubs)` or `int8 (scalar)`.
    pub fn describe(self) -> &'static str {
        match (self.method, self.kernels.isa(), self.vnni) {
            (QuantMethod::Dequant, _, _) => "dequant",
            (QuantMethod::Int8, Isa::Portable, _) => "int8 (scalar)",
            (QuantMethod::Int8, Isa::Avx512, true) => "int8 (avx512-vnni)",
            (QuantMethod::Int8, _, true) if self.evex => "int8 (avx-vnni code, avx512vl encoding)",
            (QuantMethod::Int8, _, true) => "int8 (avx-vnni)",
            (QuantMethod::Int8, _, false) => "int8 (maddubs)",
        }
    }

    /// `x` quantized into `act` (the same codes at every level).
    pub fn quantize(self, x: &[f32], act: &mut Activation) {
        assert!(x.len().is_multiple_of(BLOCK), "activation: partial block");
        match self.kernels.isa() {
            // SAFETY: `self.kernels` holds a level only when the CPU supports it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { entry::avx512_quantize(act, x) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { entry::avx2_quantize(act, x) },
            _ => act.quantize_body(x),
        }
    }

    /// Rows by the dequantizing method (`xsum`: `x`'s block sums, for q4_1).
    fn dequant_rows(self, m: QMatrix<'_>, x: &[f32], xsum: &[f32], y: &mut [f32]) {
        // The kernels read `x` by pointer, block by block: its length is held here.
        assert_eq!(x.len(), m.cols, "quantized matvec: x length");
        match self.kernels.isa() {
            // SAFETY: the level is supported (`Kernels`'s invariant); `x` has `m.cols` values
            // (asserted above) and `xsum` its block sums (`block_sums`, empty and unread for
            // q8_0/q4_0); the entry point checks `y` and slices the rows.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { entry::avx512_dequant_rows(m, x, xsum, y) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { entry::avx2_dequant_rows(m, x, xsum, y) },
            _ => portable::dequant_rows(m, x, xsum, y),
        }
    }

    /// Rows by the int8 method against each activation (`y`: `acts.len()` rows of `m.rows`).
    fn int8_rows(self, m: QMatrix<'_>, acts: &[Activation], y: &mut [f32]) {
        match (self.kernels.isa(), self.vnni) {
            // SAFETY: the level is supported and `vnni` only where its VNNI extension was
            // detected (`Self::new`); the entry points check the lengths of `y` and of every
            // activation against `m`.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, true) => unsafe { entry::avx512_int8_rows_vnni(m, acts, y) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, false) => unsafe { entry::avx512_int8_rows(m, acts, y) },
            // SAFETY: as above; `evex` only where AVX-512 VL and VNNI were detected
            // (`Self::avx2_vnni_by_avx512`).
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true) if self.evex => unsafe {
                entry::avx2_int8_rows_vnni_evex(m, acts, y)
            },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true) => unsafe { entry::avx2_int8_rows_vnni(m, acts, y) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, false) => unsafe { entry::avx2_int8_rows(m, acts, y) },
            _ => portable::int8_rows(m, acts, y),
        }
    }

    /// Whether these kernels multiply by rows of `format` packed four at a time
    /// ([`PackedRows`](crate::quant::PackedRows)): the int8 method at the AVX2 and AVX-512
    /// levels, except q8_0 where AVX-512 VNNI takes it by a 512-bit kernel. Where they do,
    /// [`Self::int8_packed`] gives every packed row bit for bit what the row-major product
    /// gives it.
    pub fn takes_packed(self, format: QuantFormat) -> bool {
        self.method == QuantMethod::Int8
            && match (self.kernels.isa(), self.vnni) {
                (Isa::Avx512, true) => format != QuantFormat::Q8_0,
                (Isa::Avx512 | Isa::Avx2, _) => true,
                _ => false,
            }
    }

    /// `y = W x` for the packed rows `p` of `W` against `act`, `x` quantized
    /// ([`with_activation`]): one value per packed row, each bit for bit the row-major
    /// product's.
    ///
    /// # Panics
    /// Where [`Self::takes_packed`] is false for `p.format`, or on lengths that do not fit.
    pub fn int8_packed(self, p: PackedView<'_>, act: &Activation, y: &mut [f32]) {
        assert!(
            self.takes_packed(p.format),
            "packed {} rows at {}",
            p.format,
            self.describe()
        );
        match (self.kernels.isa(), self.vnni) {
            // SAFETY: the level is supported and `vnni` only where its VNNI extension was
            // detected (`Self::new`); the entry points check `y`'s, the codes' and the
            // activation's lengths against `p`.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, true) => unsafe { entry::avx512_int8_packed_vnni(p, act, y) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, false) => unsafe { entry::avx512_int8_packed(p, act, y) },
            // SAFETY: as above; `evex` only where AVX-512 VL and VNNI were detected.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true) if self.evex => unsafe {
                entry::avx2_int8_packed_vnni_evex(p, act, y)
            },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true) => unsafe { entry::avx2_int8_packed_vnni(p, act, y) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, false) => unsafe { entry::avx2_int8_packed(p, act, y) },
            _ => unreachable!("takes_packed holds only at the x86 levels"),
        }
    }

    /// Rows of `m` widened to f32 into `out` (`m.rows × m.cols`), bit for bit as
    /// [`QMatrix::dequantize_rows`].
    pub fn widen_rows(self, m: QMatrix<'_>, out: &mut [f32]) {
        match self.kernels.isa() {
            // SAFETY: the level is supported; the entry point checks `out` and slices the rows.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { entry::avx512_widen_rows(m, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { entry::avx2_widen_rows(m, out) },
            _ => {
                assert_eq!(out.len(), m.rows * m.cols, "quantized widen: output length");
                m.dequantize_rows(0..m.rows, out)
            }
        }
    }

    /// `y = W x` on the calling thread.
    pub fn matvec_serial(self, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), m.cols, "quantized matvec: x length");
        assert_eq!(y.len(), m.rows, "quantized matvec: y length");
        match self.method {
            QuantMethod::Int8 => with_activation_at(self, x, |act| {
                self.int8_rows(m, std::slice::from_ref(act), y)
            }),
            QuantMethod::Dequant => self.dequant_rows(m, x, &block_sums(m.format, x), y),
        }
    }

    /// `y = W x`, split into row blocks across the rayon pool as [`super::Kernels::matvec`]
    /// splits float products. The int8 method quantizes `x` once for every block.
    pub fn matvec(self, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), m.cols, "quantized matvec: x length");
        assert_eq!(y.len(), m.rows, "quantized matvec: y length");
        let Some(block) = super::matvec_block_rows(m.rows, m.cols, rayon::current_num_threads())
        else {
            self.matvec_serial(m, x, y);
            return;
        };
        match self.method {
            // The activation is quantized once here and shared by every block (quantizing it
            // per block cost 12–17% of a q4_0 decode).
            QuantMethod::Int8 => with_activation_at(self, x, |act| {
                y.par_chunks_mut(block).enumerate().for_each(|(b, yb)| {
                    let r0 = b * block;
                    self.int8_rows(
                        m.row_range(r0..r0 + yb.len()),
                        std::slice::from_ref(act),
                        yb,
                    )
                })
            }),
            QuantMethod::Dequant => {
                let xsum = block_sums(m.format, x);
                y.par_chunks_mut(block).enumerate().for_each(|(b, yb)| {
                    let r0 = b * block;
                    self.dequant_rows(m.row_range(r0..r0 + yb.len()), x, &xsum, yb)
                })
            }
        }
    }

    /// Whether this method's products take `x` quantized ([`QuantMethod::quantizes_activation`]).
    pub fn needs_activation(self) -> bool {
        self.method.quantizes_activation()
    }

    /// [`Self::matvec_serial`] given, for the int8 method, the activation already quantized
    /// from `x` (by [`with_activation`]): decoding's stacked q/k/v products and their row
    /// blocks share one instead of each quantizing `x` again (7–12% of a q4_0 decode). `act`
    /// is ignored by the dequantizing method; `None` quantizes here.
    pub fn matvec_serial_prepared(
        self,
        m: QMatrix<'_>,
        x: &[f32],
        act: Option<&Activation>,
        y: &mut [f32],
    ) {
        match (self.method, act) {
            (QuantMethod::Int8, Some(act)) => {
                assert_eq!(x.len(), m.cols, "quantized matvec: x length");
                assert_eq!(y.len(), m.rows, "quantized matvec: y length");
                self.int8_rows(m, std::slice::from_ref(act), y)
            }
            _ => self.matvec_serial(m, x, y),
        }
    }

    /// `y = x · Wᵀ` for `x` of shape `[rows, in]` and a quantized `W` of shape `[out, in]`;
    /// `y` is `[rows, out]`.
    ///
    /// - One row is a matrix-vector product ([`Self::matvec`]).
    /// - Up to [`FEW_ROWS`] rows (batched decode, short prefill chunks) read the weights once
    ///   for all rows, split across the pool in row blocks: the dequantizing method widens a
    ///   tile of weight rows into an f32 scratch in L1 and multiplies it with every input by
    ///   the float few-rows kernel ([`super::Kernels::matvec_batch`]), so the products are
    ///   those of the dequantized f32 model; the int8 method quantizes each input once and
    ///   takes each weight row against every input while the row sits in L1.
    /// - More rows (prefill) are [`super::sgemm::linear_rows`], by either method: the weights
    ///   widened as they are packed (compute-bound, the widening costs one pass over each
    ///   weight per task and call), the products exactly those of the dequantized f32 model.
    pub fn linear(self, x: &[f32], rows: usize, m: QMatrix<'_>, y: &mut [f32]) {
        let (inp, out) = (m.cols, m.rows);
        assert!(x.len() >= rows * inp, "quantized linear: x too short");
        assert!(y.len() >= rows * out, "quantized linear: y too short");
        if rows == 0 || out == 0 {
            return;
        }
        if inp == 0 {
            // Rows of no weights: empty sums, by every path.
            y[..rows * out].fill(0.0);
            return;
        }
        if rows == 1 {
            self.matvec(m, &x[..inp], &mut y[..out]);
            return;
        }
        if rows <= FEW_ROWS {
            self.few_rows(&x[..rows * inp], rows, m, &mut y[..rows * out]);
            return;
        }
        super::sgemm::linear_rows(self.kernels, &x[..rows * inp], rows, m, out, y);
    }

    /// [`Self::linear`] for `2 ..= FEW_ROWS` rows: per parallel block of weight rows, the
    /// block's outputs for every input into a block-major buffer, then gathered into `y`.
    fn few_rows(self, x: &[f32], rows: usize, m: QMatrix<'_>, y: &mut [f32]) {
        let (cols, out) = (m.cols, m.rows);
        let threads = rayon::current_num_threads();
        // Blocks as a matrix-vector product of the same weights splits them.
        let block = super::matvec_block_rows(out, cols, threads).unwrap_or(out);
        let mut buf = FEW_ROWS_BUF.take();
        buf.clear();
        buf.resize(rows * out, 0.0);
        let mut acts = ACTIVATIONS.take();
        if self.method == QuantMethod::Int8 {
            acts.resize_with(rows, Activation::default);
            for (act, xr) in acts.iter_mut().zip(x.chunks_exact(cols)) {
                self.quantize(xr, act);
            }
        }
        let acts_ref = &acts[..if self.method == QuantMethod::Int8 {
            rows
        } else {
            0
        }];
        // Block `b` of `len` weight rows fills `buf[b · block · rows ..][.. rows · len]` as
        // `rows × len`.
        let run = |b: usize, chunk: &mut [f32]| {
            let len = chunk.len() / rows;
            let mb = m.row_range(b * block..b * block + len);
            match self.method {
                QuantMethod::Int8 => self.int8_rows(mb, acts_ref, chunk),
                QuantMethod::Dequant => self.few_rows_dequant(mb, x, rows, chunk),
            }
        };
        if block < out {
            buf.par_chunks_mut(block * rows)
                .enumerate()
                .for_each(|(b, chunk)| run(b, chunk));
        } else {
            run(0, &mut buf);
        }
        for (r, yr) in y.chunks_exact_mut(out).enumerate() {
            for (b, chunk) in buf.chunks(block * rows).enumerate() {
                let len = chunk.len() / rows;
                yr[b * block..b * block + len].copy_from_slice(&chunk[r * len..(r + 1) * len]);
            }
        }
        FEW_ROWS_BUF.set(buf);
        ACTIVATIONS.set(acts);
    }

    /// The dequantizing few-rows product of the weight rows `m` (`out` is `rows × m.rows`):
    /// tiles of rows widened to f32, each multiplied with every input by the float kernel.
    fn few_rows_dequant(self, m: QMatrix<'_>, x: &[f32], rows: usize, out: &mut [f32]) {
        let (cols, n) = (m.cols, m.rows);
        // About 16 KiB of widened weights per tile: with the inputs' slices, it stays in L1.
        let tile = (4096 / cols).clamp(1, 64);
        WIDEN_TILE.with_borrow_mut(|scratch| {
            let mut res = vec![0f32; rows * tile];
            scratch.resize(tile * cols, 0.0);
            let mut t0 = 0;
            while t0 < n {
                let t = tile.min(n - t0);
                let w = &mut scratch[..t * cols];
                self.widen_rows(m.row_range(t0..t0 + t), w);
                let res = &mut res[..rows * t];
                self.kernels.matvec_batch(w, x, rows, res);
                for (i, r) in res.chunks_exact(t).enumerate() {
                    out[i * n + t0..i * n + t0 + t].copy_from_slice(r);
                }
                t0 += t;
            }
        });
    }
}

/// Input rows up to which [`QuantKernels::linear`] takes the few-rows product instead of
/// widening into a general matrix product (the float model's threshold for the same choice).
pub const FEW_ROWS: usize = 64;

thread_local! {
    /// Per-thread scratch: the quantized activation of the product this thread started.
    static ACTIVATION: RefCell<Activation> = RefCell::new(Activation::default());
    /// Per-thread scratch: the few-rows product's quantized inputs.
    static ACTIVATIONS: std::cell::Cell<Vec<Activation>> = const { std::cell::Cell::new(Vec::new()) };
    /// Per-thread scratch: the few-rows product's block-major outputs.
    static FEW_ROWS_BUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Per-thread scratch: a tile of widened weight rows.
    static WIDEN_TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The `#[target_feature]` entry points: each runs its level's code (`avx2`, `avx512`) with
/// the row loop and every intrinsic inlined. Callers must hold a [`Kernels`] of the level
/// (and, for the `_vnni` ones, have detected the VNNI extension).
#[cfg(target_arch = "x86_64")]
mod entry {
    use super::{avx2, avx512, Activation};
    use crate::quant::{PackedView, QMatrix};

    macro_rules! at_level {
        ($features:literal: $(
            $(#[$attr:meta])*
            fn $name:ident($($arg:ident: $ty:ty),*) => $body:expr;
        )*) => {$(
            $(#[$attr])*
            ///
            /// # Safety
            /// The CPU has the features this function enables.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name($($arg: $ty),*) {
                // The features are enabled here (the caller's contract); the bodies check the
                // lengths they rely on.
                $body
            }
        )*};
    }

    at_level! {
        "avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2":
        /// Dequantizing rows at the AVX-512 level.
        fn avx512_dequant_rows(m: QMatrix<'_>, x: &[f32], xsum: &[f32], y: &mut [f32])
            => avx512::dequant_rows(m, x, xsum, y);
        /// Int8 rows at the AVX-512 level without VNNI: the AVX2 code.
        fn avx512_int8_rows(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32])
            => avx2::int8_rows::<{ avx2::NO_VNNI }>(m, acts, y);
        /// Packed int8 rows at the AVX-512 level without VNNI: the AVX2 code.
        fn avx512_int8_packed(p: PackedView<'_>, act: &Activation, y: &mut [f32])
            => avx2::int8_packed::<{ avx2::NO_VNNI }>(p, act, y);
        /// Rows widened to f32 at the AVX-512 level (the AVX2 code).
        fn avx512_widen_rows(m: QMatrix<'_>, out: &mut [f32]) => avx2::widen_rows(m, out);
        /// The activation quantized at the AVX-512 level: the codes loop in 512-bit registers
        /// (`avx512::quantize`), the layouts and sums vectorized 16 wide by the compiler.
        fn avx512_quantize(act: &mut Activation, x: &[f32]) => avx512::quantize(act, x);
    }

    at_level! {
        "avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx512vnni,avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2":
        /// Int8 rows by AVX-512 VNNI.
        fn avx512_int8_rows_vnni(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32])
            => avx512::int8_rows(m, acts, y);
        /// Packed q4 int8 rows by AVX-512 VNNI: the 256-bit code `avx512::int8_rows` runs
        /// for q4 (q8_0 has a 512-bit kernel there and is not packed).
        fn avx512_int8_packed_vnni(p: PackedView<'_>, act: &Activation, y: &mut [f32])
            => avx2::int8_packed::<{ avx2::AVX512VL_VNNI }>(p, act, y);
    }

    at_level! {
        "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2":
        /// Dequantizing rows at the AVX2 level.
        fn avx2_dequant_rows(m: QMatrix<'_>, x: &[f32], xsum: &[f32], y: &mut [f32])
            => avx2::dequant_rows(m, x, xsum, y);
        /// Int8 rows by `vpmaddubsw` + `vpmaddwd`.
        fn avx2_int8_rows(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32])
            => avx2::int8_rows::<{ avx2::NO_VNNI }>(m, acts, y);
        /// Packed int8 rows by `vpmaddubsw` + `vpmaddwd`.
        fn avx2_int8_packed(p: PackedView<'_>, act: &Activation, y: &mut [f32])
            => avx2::int8_packed::<{ avx2::NO_VNNI }>(p, act, y);
        /// Rows widened to f32 at the AVX2 level.
        fn avx2_widen_rows(m: QMatrix<'_>, out: &mut [f32]) => avx2::widen_rows(m, out);
        /// The activation quantized at the AVX2 level: the codes loop in 256-bit registers
        /// (`avx2::quantize`), the layouts and sums vectorized 8 wide by the compiler.
        fn avx2_quantize(act: &mut Activation, x: &[f32]) => avx2::quantize(act, x);
    }

    at_level! {
        "avx,avx2,avxvnni,fma,f16c,bmi1,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2":
        /// Int8 rows by AVX-VNNI `vpdpbusd` on 256-bit registers.
        fn avx2_int8_rows_vnni(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32])
            => avx2::int8_rows::<{ avx2::AVX_VNNI }>(m, acts, y);
        /// Packed int8 rows by AVX-VNNI.
        fn avx2_int8_packed_vnni(p: PackedView<'_>, act: &Activation, y: &mut [f32])
            => avx2::int8_packed::<{ avx2::AVX_VNNI }>(p, act, y);
    }

    at_level! {
        "avx,avx2,avx512f,avx512vl,avx512vnni,fma,f16c,bmi1,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2":
        /// The AVX-VNNI int8 rows with `vpdpbusd` in its AVX-512 VL encoding: the tests' way to
        /// run that code on AVX-512 VNNI CPUs without AVX-VNNI.
        fn avx2_int8_rows_vnni_evex(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32])
            => avx2::int8_rows::<{ avx2::AVX512VL_VNNI }>(m, acts, y);
        /// Packed int8 rows by the AVX-VNNI code in the AVX-512 VL encoding.
        fn avx2_int8_packed_vnni_evex(p: PackedView<'_>, act: &Activation, y: &mut [f32])
            => avx2::int8_packed::<{ avx2::AVX512VL_VNNI }>(p, act, y);
    }
}

mod portable;

impl Activation {
    /// Quantizes `x` (length a multiple of 32) at the process's level (every level gives the
    /// same codes).
    pub fn quantize(&mut self, x: &[f32]) {
        QuantKernels::active(QuantMethod::Int8).quantize(x, self);
    }
}

/// Scalar twin of [`QuantMethod::Dequant`] (at every level): every weight dequantized to
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

/// Scalar twin of [`QuantMethod::Int8`] (at every level): `x` quantized by [`Activation::quantize`], exact integer
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
/// Runs `f` with `x` quantized (at the process's level) into this thread's scratch. The
/// scratch is taken out of its cell for the call, so `f` may run parallel work that quantizes
/// on this thread too.
pub fn with_activation<R>(x: &[f32], f: impl FnOnce(&Activation) -> R) -> R {
    with_activation_at(QuantKernels::active(QuantMethod::Int8), x, f)
}

/// [`with_activation`] at the level of `k`.
fn with_activation_at<R>(k: QuantKernels, x: &[f32], f: impl FnOnce(&Activation) -> R) -> R {
    let mut act = ACTIVATION.take();
    k.quantize(x, &mut act);
    let r = f(&act);
    ACTIVATION.set(act);
    r
}

/// `y = W x` by `method` at the process's level, on the calling thread.
pub fn matvec_serial_with(method: QuantMethod, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    QuantKernels::active(method).matvec_serial(m, x, y)
}

/// `y = W x` by `method` at the process's level, parallel over row blocks.
pub fn matvec_with(method: QuantMethod, m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    QuantKernels::active(method).matvec(m, x, y)
}

/// `y = W x` by the default method ([`QuantMethod::Dequant`]), on the calling thread.
pub fn matvec_serial(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    matvec_serial_with(QuantMethod::default(), m, x, y)
}

/// `y = W x` by the default method, parallel over row blocks.
pub fn matvec(m: QMatrix<'_>, x: &[f32], y: &mut [f32]) {
    matvec_with(QuantMethod::default(), m, x, y)
}

/// [`QuantKernels::matvec_serial_prepared`] at the process's level.
pub fn matvec_serial_prepared(
    method: QuantMethod,
    m: QMatrix<'_>,
    x: &[f32],
    act: Option<&Activation>,
    y: &mut [f32],
) {
    QuantKernels::active(method).matvec_serial_prepared(m, x, act, y)
}

/// [`QuantKernels::linear`] by `method` at the process's level.
pub fn linear_with(method: QuantMethod, x: &[f32], rows: usize, m: QMatrix<'_>, y: &mut [f32]) {
    QuantKernels::active(method).linear(x, rows, m, y)
}

/// [`QuantKernels::linear`] by the default method at the process's level.
pub fn linear(x: &[f32], rows: usize, m: QMatrix<'_>, y: &mut [f32]) {
    linear_with(QuantMethod::default(), x, rows, m, y)
}

/// Widens rows `r0..r0 + out.len() / cols` of `m` into `out` at the process's level, for the
/// matrix-product paths.
pub fn dequantize_rows(m: QMatrix<'_>, r0: usize, out: &mut [f32]) {
    let rows = out.len() / m.cols.max(1);
    QuantKernels::active(QuantMethod::Dequant)
        .widen_rows(m.row_range(r0..r0 + rows), &mut out[..rows * m.cols]);
}
