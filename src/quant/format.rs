//! The block-quantized formats `q8_0`, `q4_0` and `q4_1`: their blocks, quantizing and
//! widening a row, the zero-copy views the kernels read, and the validation at load.
//!
//! Every format cuts a weight row (a torch `Linear` weight `[out, in]` is row-major, so a row
//! runs along the input dimension) into blocks of [`BLOCK`] = 32 consecutive weights with one
//! f16 scale `d` per block (and, for `q4_1`, one f16 minimum `m`):
//!
//! - `q8_0`: `w = q · d` with `q` an int8 in `[-127, 127]`, `d = max|w| / 127`.
//! - `q4_0`: `w = (n − 8) · d` with `n` a 4-bit code in `[0, 15]`, `d = −m / 8` where `m` is
//!   the block's weight of largest magnitude (so `m` itself is exact, code 0).
//! - `q4_1`: `w = n · d + m` with `n` a 4-bit code in `[0, 15]`: sixteen levels placed on
//!   the block's own range instead of a range symmetric about zero, for two more bytes per
//!   block. `d` and `m` are chosen by a small least-squares search (`m` the block's minimum and
//!   `d = (max − min) / 15` is the first candidate; see `q4_1_block_params`). `n · d` is exact
//!   in f32 (4 × 11 significant bits), so `w` is one rounding of the exact `n · d + m`,
//!   whether computed with a fused multiply-add or not.
//!
//! In `model.safetensors` a quantized weight keeps its checkpoint name, with integer data, and
//! gains an F16 companion `<name>.scales` of shape `[out, in / 32]` (and `q4_1` a second one,
//! `<name>.mins`, of the same shape):
//!
//! | format | `<name>` | `<name>.scales` | `<name>.mins` |
//! |---|---|---|---|
//! | `q8_0` | I8 `[out, in]`, the codes `q` | F16 `[out, in/32]` | – |
//! | `q4_0` | U8 `[out, in/2]`: byte `j` of a block's 16 holds weight `j` in its low nibble and weight `j + 16` in its high nibble | F16 `[out, in/32]` | – |
//! | `q4_1` | U8 `[out, in/2]`, packed as `q4_0` | F16 `[out, in/32]` | F16 `[out, in/32]` |
//!
//! `config.json` records the format as `"weight_format": "q8_0"` (or `"q4_0"`, `"q4_1"`). Quantized are
//! the matrices decoding streams: the attention's q, k, v and output projections, the
//! feed-forward's `w1` and `w2` and the untied output layer `to_out`, when their input width is
//! a multiple of 32. Everything else stays in its float dtype: the token embedding (one row is
//! read per token, and when tied it is also the output layer, whose rounding the perplexity
//! would feel first), position tables, norms, biases (a few thousand values) and the FAVOR+
//! projection matrices (tiny, and every feature of every head goes through them).
//!
//! Loading stays zero-copy: the codes are bytes borrowed from the mapping, the scales an F16
//! [`Tensor`]. Dtypes, shapes, block counts and the finiteness of every scale are checked at
//! load ([`QuantTensor::load`]).

use std::fmt;
use std::str::FromStr;

use half::f16;

use super::packed::{PackedRows, PACKED_ROWS};
use crate::error::{Error, Result};
use crate::weights::{Dtype, RawTensor, Tensor, WeightFile};

/// Weights per block (along the input dimension).
pub const BLOCK: usize = 32;

/// The config key recording a quantized model's format.
pub const CONFIG_KEY: &str = "weight_format";

/// Suffix of the scale tensor that accompanies a quantized weight.
pub const SCALES_SUFFIX: &str = ".scales";

/// Suffix of the minimum tensor that accompanies a `q4_1` weight.
pub const MINS_SUFFIX: &str = ".mins";

/// A block-quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantFormat {
    /// int8 codes, one f16 scale per block of 32.
    Q8_0,
    /// 4-bit codes (offset 8), one f16 scale per block of 32.
    Q4_0,
    /// 4-bit codes, one f16 scale and one f16 minimum per block of 32.
    Q4_1,
}

impl QuantFormat {
    /// The config / command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
        }
    }

    /// Every format, in the order of their names' documentation.
    pub const ALL: [QuantFormat; 3] = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1];

    /// True when blocks carry a minimum besides their scale (`q4_1`).
    pub fn has_mins(self) -> bool {
        self == QuantFormat::Q4_1
    }

    /// The safetensors dtype of the codes.
    pub fn data_dtype(self) -> safetensors::Dtype {
        match self {
            QuantFormat::Q8_0 => safetensors::Dtype::I8,
            QuantFormat::Q4_0 | QuantFormat::Q4_1 => safetensors::Dtype::U8,
        }
    }

    /// The safetensors dtype name of the codes, as a file's header spells it ("I8", "U8").
    pub fn data_dtype_name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "I8",
            QuantFormat::Q4_0 | QuantFormat::Q4_1 => "U8",
        }
    }

    /// Bytes of codes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => BLOCK,
            QuantFormat::Q4_0 | QuantFormat::Q4_1 => BLOCK / 2,
        }
    }

    /// Bytes of codes for a row of `cols` weights (`cols` a multiple of [`BLOCK`]).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }

    /// Bytes of f16 metadata per block: the scale, and the minimum if the format has one.
    pub fn block_meta_bytes(self) -> usize {
        if self.has_mins() {
            4
        } else {
            2
        }
    }

    /// Bytes stored per weight, codes, scales and minimums together (34/32, 18/32 and 20/32).
    pub fn bytes_per_weight(self) -> f64 {
        (self.block_bytes() + self.block_meta_bytes()) as f64 / BLOCK as f64
    }

    /// True when `dtype` (a safetensors dtype name) is the codes' dtype of some format: I8
    /// (`q8_0`) or U8 (`q4_0`, `q4_1`).
    pub fn is_code_dtype(dtype: &str) -> bool {
        Self::ALL.iter().any(|f| f.data_dtype_name() == dtype)
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantFormat::Q8_0),
            "q4_0" => Ok(QuantFormat::Q4_0),
            "q4_1" => Ok(QuantFormat::Q4_1),
            other => Err(format!(
                "unknown weight format `{other}` (supported: q8_0, q4_0, q4_1)"
            )),
        }
    }
}

fn invalid(name: &str, message: impl Into<String>) -> Error {
    Error::InvalidQuantized {
        name: name.to_string(),
        message: message.into(),
    }
}

/// Quantizes one row (`src.len()` a multiple of [`BLOCK`]) into `codes`
/// ([`QuantFormat::row_bytes`] bytes), `scales` (`src.len() / 32`) and, for `q4_1`, `mins`
/// (`src.len() / 32`; empty for the other formats). `name` only labels the error: a
/// non-finite weight, or a block whose scale or minimum exceeds f16's range (|w| above about
/// 8.3e6 for q8_0, 5.2e5 for q4_0, 6.5e4 for q4_1). Blocks so small that their scale rounds to
/// zero in f16 become all-zero blocks (for q4_1: every weight its minimum).
pub fn quantize_row(
    format: QuantFormat,
    name: &str,
    src: &[f32],
    codes: &mut [u8],
    scales: &mut [f16],
    mins: &mut [f16],
) -> Result<()> {
    assert!(
        src.len().is_multiple_of(BLOCK),
        "quantize_row: partial block"
    );
    assert_eq!(
        codes.len(),
        format.row_bytes(src.len()),
        "quantize_row: codes"
    );
    assert_eq!(scales.len(), src.len() / BLOCK, "quantize_row: scales");
    let mins_len = if format.has_mins() { scales.len() } else { 0 };
    assert_eq!(mins.len(), mins_len, "quantize_row: mins");
    let bb = format.block_bytes();
    for (b, block) in src.chunks_exact(BLOCK).enumerate() {
        if let Some(i) = block.iter().position(|v| !v.is_finite()) {
            return Err(invalid(
                name,
                format!("element {} is not finite", b * BLOCK + i),
            ));
        }
        let out = &mut codes[b * bb..(b + 1) * bb];
        let range_error = |what: &str, v: f32| {
            invalid(
                name,
                format!("block {b}: {what} {v:e} exceeds the f16 range of the {format} format"),
            )
        };
        if format == QuantFormat::Q4_1 {
            let (d16, m16) = q4_1_block_params(block).map_err(|(what, v)| range_error(what, v))?;
            scales[b] = d16;
            mins[b] = m16;
            let (d, m) = (d16.to_f32(), m16.to_f32());
            let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
            pack_nibbles(block, out, |v| q4_1_code(v, m, inv));
            continue;
        }
        // The element of largest magnitude, with its sign (the first one on ties).
        let m = block
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = match format {
            QuantFormat::Q8_0 => m.abs() / 127.0,
            _ => m / -8.0,
        };
        let d16 = f16::from_f32(d);
        if !d16.is_finite() {
            return Err(range_error("scale", d));
        }
        scales[b] = d16;
        // Codes from the stored (rounded) scale, so that q · d is as close to w as it can be.
        let d = d16.to_f32();
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        match format {
            QuantFormat::Q8_0 => {
                for (o, &v) in out.iter_mut().zip(block) {
                    *o = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                }
            }
            _ => {
                pack_nibbles(block, out, |v| {
                    ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8
                });
            }
        }
    }
    Ok(())
}

/// The 4-bit layout of q4_0 and q4_1: byte `j` of a block's 16 holds the code of weight `j`
/// in its low nibble and that of weight `j + 16` in its high nibble (`code` gives 0..=15).
fn pack_nibbles(block: &[f32], out: &mut [u8], code: impl Fn(f32) -> u8) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = code(block[j]) | (code(block[j + BLOCK / 2]) << 4);
    }
}

/// A q4_1 code: `round((v − m) / d)` clamped to `[0, 15]` (`inv = 1/d`, 0 for `d = 0`).
/// Clamped first, so the rounding is of a value in `[0, 15]`: `+ 0.5` then truncation (a
/// plain add; `f32::round` is a libm call on baseline x86-64, and the search below calls this
/// 21 times per weight).
#[inline]
fn q4_1_code(v: f32, m: f32, inv: f32) -> u8 {
    (((v - m) * inv).clamp(0.0, 15.0) + 0.5) as u8
}

/// Scale and minimum (f16) of one q4_1 block: the pair with the smallest squared error over
/// the block among the plain `(range/15, min)` and, for 20 trial scales around it, the
/// least-squares fit of `n·d + m` to the block given the codes `n` that scale assigns (the
/// search llama.cpp's k-quants use, unweighted). Every candidate is rounded to f16 before its
/// error is measured, so the error is that of the stored block. Errors name the value out of
/// f16's range: ("minimum", min) or ("scale", range / 15).
fn q4_1_block_params(block: &[f32]) -> std::result::Result<(f16, f16), (&'static str, f32)> {
    let lo = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let hi = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let m16 = f16::from_f32(lo);
    if !m16.is_finite() {
        return Err(("minimum", lo));
    }
    // The range from the stored minimum (which may have rounded up past `lo`).
    let d = (hi - m16.to_f32()).max(0.0) / 15.0;
    let d16 = f16::from_f32(d);
    if !d16.is_finite() {
        return Err(("scale", d));
    }
    let error = |d16: f16, m16: f16| -> f64 {
        let (d, m) = (d16.to_f32(), m16.to_f32());
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        block
            .iter()
            .map(|&v| {
                let e = (q4_1_code(v, m, inv) as f32 * d + m - v) as f64;
                e * e
            })
            .sum()
    };
    let mut best = (error(d16, m16), d16, m16);
    if hi <= lo {
        return Ok((best.1, best.2));
    }
    let n = block.len() as f64;
    for step in -10..=10 {
        if step == 0 {
            continue;
        }
        // Codes from a trial scale spanning the range in 15 + step/10 steps.
        let inv = (15.0 + step as f32 / 10.0) / (hi - lo);
        let (mut sn, mut sw, mut snn, mut snw) = (0f64, 0f64, 0f64, 0f64);
        for &v in block {
            let c = q4_1_code(v, lo, inv) as f64;
            let v = v as f64;
            sn += c;
            sw += v;
            snn += c * c;
            snw += c * v;
        }
        let det = n * snn - sn * sn;
        if det <= 0.0 {
            continue;
        }
        let d = (n * snw - sn * sw) / det;
        let m = (sw - d * sn) / n;
        let (d16, m16) = (f16::from_f64(d), f16::from_f64(m));
        if d <= 0.0 || !d16.is_finite() || !m16.is_finite() {
            continue;
        }
        let e = error(d16, m16);
        if e < best.0 {
            best = (e, d16, m16);
        }
    }
    Ok((best.1, best.2))
}

/// The weights of one quantized row, widened exactly for `q8_0` and `q4_0` (`q · d` has at
/// most 19 significant bits) and with one rounding for `q4_1` (`n · d + m`, the product
/// exact). `mins` is empty except for `q4_1`.
pub fn dequantize_row(
    format: QuantFormat,
    codes: &[u8],
    scales: &[f16],
    mins: &[f16],
    out: &mut [f32],
) {
    let bb = format.block_bytes();
    assert_eq!(out.len(), scales.len() * BLOCK, "dequantize_row: length");
    assert!(codes.len() >= scales.len() * bb, "dequantize_row: codes");
    assert!(
        !format.has_mins() || mins.len() >= scales.len(),
        "dequantize_row: mins"
    );
    for (b, (o, &s)) in out.chunks_exact_mut(BLOCK).zip(scales).enumerate() {
        let d = s.to_f32();
        let c = &codes[b * bb..(b + 1) * bb];
        match format {
            QuantFormat::Q8_0 => {
                for (o, &q) in o.iter_mut().zip(c) {
                    *o = (q as i8) as f32 * d;
                }
            }
            QuantFormat::Q4_0 => {
                for (j, &byte) in c.iter().enumerate() {
                    o[j] = ((byte & 0xF) as f32 - 8.0) * d;
                    o[j + BLOCK / 2] = ((byte >> 4) as f32 - 8.0) * d;
                }
            }
            QuantFormat::Q4_1 => {
                let m = mins[b].to_f32();
                for (j, &byte) in c.iter().enumerate() {
                    o[j] = (byte & 0xF) as f32 * d + m;
                    o[j + BLOCK / 2] = (byte >> 4) as f32 * d + m;
                }
            }
        }
    }
}

/// A borrowed quantized matrix: `rows × cols` weights as codes, per-block scales and, for
/// `q4_1`, per-block minimums.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    /// The format.
    pub format: QuantFormat,
    /// Codes, row-major, [`QuantFormat::row_bytes`] per row.
    pub codes: &'a [u8],
    /// Scales, row-major, `cols / 32` per row.
    pub scales: &'a [f16],
    /// Minimums, laid out as `scales` (`q4_1`); empty for the other formats.
    pub mins: &'a [f16],
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of [`BLOCK`]).
    pub cols: usize,
}

/// One row of a [`QMatrix`]: its codes, scales and (`q4_1`) minimums.
#[derive(Debug, Clone, Copy)]
pub struct QRow<'a> {
    /// [`QuantFormat::row_bytes`] bytes of codes.
    pub codes: &'a [u8],
    /// One scale per block.
    pub scales: &'a [f16],
    /// One minimum per block (`q4_1`), else empty.
    pub mins: &'a [f16],
}

impl<'a> QMatrix<'a> {
    /// A matrix over `codes`, `scales` and `mins` (empty unless the format
    /// [has them](QuantFormat::has_mins)); `None` when their lengths do not fit `rows × cols`
    /// or `cols` is not a multiple of 32.
    ///
    /// ```
    /// use half::f16;
    /// use performer::quant::{quantize_row, QMatrix, QuantFormat};
    ///
    /// let row: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
    /// let (mut codes, mut scales, mut mins) = (vec![0u8; 32], vec![f16::ZERO; 2], vec![f16::ZERO; 2]);
    /// quantize_row(QuantFormat::Q4_1, "w", &row, &mut codes, &mut scales, &mut mins)?;
    /// let m = QMatrix::new(QuantFormat::Q4_1, &codes, &scales, &mins, 1, 64).unwrap();
    /// let mut y = [0f32];
    /// performer::kernels::quant::matvec(m, &[1.0; 64], &mut y);
    /// assert!((y[0] - row.iter().sum::<f32>()).abs() < 1.0);
    /// # Ok::<(), performer::Error>(())
    /// ```
    pub fn new(
        format: QuantFormat,
        codes: &'a [u8],
        scales: &'a [f16],
        mins: &'a [f16],
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        let blocks = rows.checked_mul(cols / BLOCK)?;
        (cols.is_multiple_of(BLOCK)
            && codes.len() == rows.checked_mul(format.row_bytes(cols))?
            && scales.len() == blocks
            && mins.len() == if format.has_mins() { blocks } else { 0 })
        .then_some(QMatrix {
            format,
            codes,
            scales,
            mins,
            rows,
            cols,
        })
    }

    /// Rows `range` as a matrix of their own.
    pub fn row_range(&self, range: std::ops::Range<usize>) -> QMatrix<'a> {
        let (rb, sb) = (self.format.row_bytes(self.cols), self.cols / BLOCK);
        let mins = if self.format.has_mins() {
            &self.mins[range.start * sb..range.end * sb]
        } else {
            self.mins
        };
        QMatrix {
            codes: &self.codes[range.start * rb..range.end * rb],
            scales: &self.scales[range.start * sb..range.end * sb],
            mins,
            rows: range.len(),
            ..*self
        }
    }

    /// Row `r`'s codes, scales and minimums.
    pub fn row(&self, r: usize) -> QRow<'a> {
        let (rb, sb) = (self.format.row_bytes(self.cols), self.cols / BLOCK);
        QRow {
            codes: &self.codes[r * rb..(r + 1) * rb],
            scales: &self.scales[r * sb..(r + 1) * sb],
            mins: if self.format.has_mins() {
                &self.mins[r * sb..(r + 1) * sb]
            } else {
                self.mins
            },
        }
    }

    /// Widens rows `range` into `out` (`range.len() × cols`).
    pub fn dequantize_rows(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        for (r, o) in range.zip(out.chunks_exact_mut(self.cols)) {
            let row = self.row(r);
            dequantize_row(self.format, row.codes, row.scales, row.mins, o);
        }
    }
}

/// An owned quantized matrix: what quantizing a float matrix row by row produces, in the
/// layout [`QMatrix`] borrows.
///
/// ```
/// use performer::quant::{OwnedQMatrix, QuantFormat};
///
/// let w: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
/// let q = OwnedQMatrix::quantize(QuantFormat::Q8_0, "w", &w, 2, 64)?;
/// let mut y = [0f32; 2];
/// performer::kernels::quant::matvec(q.matrix(), &[1.0; 64], &mut y);
/// let exact: f32 = w[..64].iter().sum();
/// assert!((y[0] - exact).abs() < 0.05);
/// # Ok::<(), performer::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct OwnedQMatrix {
    /// The format.
    pub format: QuantFormat,
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of [`BLOCK`]).
    pub cols: usize,
    /// Codes, [`QuantFormat::row_bytes`] per row.
    pub codes: Vec<u8>,
    /// Scales, `cols / 32` per row.
    pub scales: Vec<f16>,
    /// Minimums as `scales` for `q4_1`, else empty.
    pub mins: Vec<f16>,
}

impl OwnedQMatrix {
    /// Quantizes the row-major `rows × cols` matrix `w`. `name` labels errors: a width that
    /// is not a multiple of 32, a length that is not `rows × cols`, and what
    /// [`quantize_row`] refuses.
    pub fn quantize(
        format: QuantFormat,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        if rows.checked_mul(cols) != Some(w.len()) {
            return Err(invalid(
                name,
                format!("{} weights are not {rows} × {cols}", w.len()),
            ));
        }
        Self::quantize_with(
            format,
            name,
            rows,
            cols,
            |r, row| row.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            |_| {},
        )
    }

    /// Quantizes a `rows × cols` matrix whose row `r` `row(r, out)` writes into `out` (`cols`
    /// values); `progress(r)` is called after every 256th row with the rows done.
    pub fn quantize_with(
        format: QuantFormat,
        name: &str,
        rows: usize,
        cols: usize,
        mut row: impl FnMut(usize, &mut [f32]),
        mut progress: impl FnMut(usize),
    ) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(invalid(
                name,
                format!("input width {cols} is not a multiple of the block size {BLOCK}"),
            ));
        }
        let (rb, sb) = (format.row_bytes(cols), cols / BLOCK);
        let mut q = OwnedQMatrix {
            format,
            rows,
            cols,
            codes: vec![0u8; rows * rb],
            scales: vec![f16::ZERO; rows * sb],
            mins: vec![f16::ZERO; if format.has_mins() { rows * sb } else { 0 }],
        };
        let mut values = vec![0f32; cols];
        for r in 0..rows {
            row(r, &mut values);
            let mins = if format.has_mins() {
                &mut q.mins[r * sb..(r + 1) * sb]
            } else {
                &mut []
            };
            quantize_row(
                format,
                name,
                &values,
                &mut q.codes[r * rb..(r + 1) * rb],
                &mut q.scales[r * sb..(r + 1) * sb],
                mins,
            )?;
            if r % 256 == 255 {
                progress(r + 1);
            }
        }
        Ok(q)
    }

    /// The borrowed view the kernels take.
    pub fn matrix(&self) -> QMatrix<'_> {
        QMatrix {
            format: self.format,
            codes: &self.codes,
            scales: &self.scales,
            mins: &self.mins,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Bytes stored: codes, scales and minimums.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * (self.scales.len() + self.mins.len())
    }
}

/// A quantized weight of a loaded model: codes borrowed from the mapping, F16 scales.
#[derive(Debug, Clone)]
pub struct QuantTensor {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    codes: RawTensor,
    scales: Tensor,
    /// `q4_1` only.
    mins: Option<Tensor>,
    /// How the model's products over this weight are computed ([`QuantTensor::method`]).
    method: crate::kernels::quant::QuantMethod,
    /// The rows packed four at a time for the one-row products, where the method's kernels
    /// take them ([`QuantTensor::packed`]); shared by the clones.
    packed: Option<std::sync::Arc<PackedRows>>,
    /// Whether [`Self::packed`] is wanted where the method's kernels take it
    /// ([`QuantTensor::use_packed_rows`]).
    packing: bool,
}

impl QuantTensor {
    /// Loads the quantized weight `name` (already resolved to an entry of `file`) of logical
    /// shape `[rows, cols]` in `format`, checking the codes' dtype and shape, the presence,
    /// dtype and shape of the scale tensor (and for `q4_1` the minimum tensor), and that every
    /// scale and minimum is finite.
    pub fn load(
        file: &WeightFile,
        name: &str,
        rows: usize,
        cols: usize,
        format: QuantFormat,
    ) -> Result<Self> {
        let codes = file.raw(name)?;
        if codes.dtype() != format.data_dtype_name() {
            return Err(invalid(
                name,
                format!(
                    "the {format} format stores {:?} codes, found {}",
                    format.data_dtype(),
                    codes.dtype()
                ),
            ));
        }
        if !cols.is_multiple_of(BLOCK) {
            return Err(invalid(
                name,
                format!("input width {cols} is not a multiple of the block size {BLOCK}"),
            ));
        }
        let stored = [rows, format.row_bytes(cols)];
        if codes.shape() != stored {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: stored.to_vec(),
                found: codes.shape().to_vec(),
            });
        }
        let companion = |suffix: &str, what: &str| -> Result<Tensor> {
            let companion_name = format!("{name}{suffix}");
            let t = file.tensor(&companion_name).map_err(|e| match e {
                Error::MissingTensor { .. } => invalid(
                    name,
                    format!("quantized weight without its {what} tensor `{companion_name}`"),
                ),
                other => other,
            })?;
            if t.dtype() != Dtype::F16 {
                return Err(invalid(
                    &companion_name,
                    format!("{what}s must be F16, found {}", t.dtype()),
                ));
            }
            t.expect_shape(&[rows, cols / BLOCK])?;
            if let Some(index) = t.view().first_non_finite() {
                return Err(invalid(
                    &companion_name,
                    format!("{what} {index} is not finite"),
                ));
            }
            Ok(t)
        };
        let scales = companion(SCALES_SUFFIX, "scale")?;
        let mins = if format.has_mins() {
            Some(companion(MINS_SUFFIX, "minimum")?)
        } else if file.contains(&format!("{name}{MINS_SUFFIX}")) {
            // A q4_1 file labelled q4_0 would load and decode wrongly without its minimums.
            return Err(invalid(
                name,
                format!("has a minimum tensor `{name}{MINS_SUFFIX}`, which the {format} format does not use (is the model q4_1?)"),
            ));
        } else {
            None
        };
        Ok(QuantTensor {
            format,
            rows,
            cols,
            codes,
            scales,
            mins,
            method: Default::default(),
            packed: None,
            packing: false,
        })
    }

    /// Makes [`Self::packed`] where `on` and the method's kernels take packed rows of this
    /// format at the process's level (the int8 method at the AVX2 and AVX-512 levels,
    /// [`QuantKernels::takes_packed`](crate::kernels::quant::QuantKernels::takes_packed)),
    /// else drops it. Packing copies the codes and scales once (the weight's size again in
    /// memory, beside the mapping) and makes the one-row products of decoding faster; the
    /// products' values are the same bit for bit either way. [`crate::Model`] packs at load
    /// unless [`crate::LoadOptions::no_packed_rows`] says not to.
    pub fn use_packed_rows(&mut self, on: bool) {
        self.packing = on;
        self.pack_for_method();
    }

    /// Makes or drops [`Self::packed`] for the method and [`Self::use_packed_rows`]' choice.
    fn pack_for_method(&mut self) {
        let wanted =
            self.packing && self.kernels().takes_packed(self.format) && self.rows >= PACKED_ROWS;
        self.packed = match (wanted, self.packed.take()) {
            (true, Some(p)) => Some(p),
            (true, None) => Some(std::sync::Arc::new(PackedRows::pack(self.matrix()))),
            (false, _) => None,
        };
    }

    /// The whole groups of four rows packed side by side ([`PackedRows`]), which the one-row
    /// products of [`Self::matvec_rows_prepared`] read instead of the mapped rows; `None`
    /// where the method's kernels take no packed rows.
    pub fn packed(&self) -> Option<&PackedRows> {
        self.packed.as_deref()
    }

    /// Rows `rows` of `W x` into `y`, `act` being `x` quantized for the int8 method (see
    /// [`QuantKernels::matvec_serial_prepared`](crate::kernels::quant::QuantKernels::matvec_serial_prepared)):
    /// the whole groups of four rows inside `rows` from [`Self::packed`] where it exists, the
    /// others from the mapped rows, every value bit for bit the same either way.
    pub fn matvec_rows_prepared(
        &self,
        rows: std::ops::Range<usize>,
        x: &[f32],
        act: Option<&crate::kernels::quant::Activation>,
        y: &mut [f32],
    ) {
        let (k, m) = (self.kernels(), self.matrix());
        assert_eq!(y.len(), rows.len(), "quantized matvec: y length");
        if let (Some(p), Some(act)) = (self.packed.as_deref(), act) {
            let (r0, r1) = (rows.start, rows.end);
            let g0 = r0.div_ceil(PACKED_ROWS);
            let g1 = (r1 / PACKED_ROWS).min(p.rows() / PACKED_ROWS);
            if g1 > g0 {
                let (a, b) = (g0 * PACKED_ROWS, g1 * PACKED_ROWS);
                let (head, rest) = y.split_at_mut(a - r0);
                let (mid, tail) = rest.split_at_mut(b - a);
                if r0 < a {
                    k.matvec_serial_prepared(m.row_range(r0..a), x, Some(act), head);
                }
                k.int8_packed(p.view().group_range(g0..g1), act, mid);
                if b < r1 {
                    k.matvec_serial_prepared(m.row_range(b..r1), x, Some(act), tail);
                }
                return;
            }
        }
        k.matvec_serial_prepared(m.row_range(rows), x, act, y)
    }

    /// The checkpoint name of the codes.
    pub fn name(&self) -> &str {
        self.codes.name()
    }

    /// The format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// The method the model's products over this weight use ([`QuantMethod::Int8`] unless
    /// the model was loaded with another, [`crate::LoadOptions::quant_kernel`]).
    ///
    /// [`QuantMethod::Int8`]: crate::kernels::quant::QuantMethod::Int8
    pub fn method(&self) -> crate::kernels::quant::QuantMethod {
        self.method
    }

    /// Chooses the method of this weight's products (the model sets it on every quantized
    /// weight at load).
    pub fn use_method(&mut self, method: crate::kernels::quant::QuantMethod) {
        self.method = method;
        self.pack_for_method();
    }

    /// The quantized kernels of this weight: its method at the process's level.
    pub fn kernels(&self) -> crate::kernels::quant::QuantKernels {
        crate::kernels::quant::QuantKernels::active(self.method)
    }

    /// The logical shape `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Weights (logical elements).
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes stored: codes, scales and minimums.
    pub fn bytes(&self) -> usize {
        self.codes.bytes().len()
            + 2 * self.scales.numel()
            + self.mins.as_ref().map_or(0, |m| 2 * m.numel())
    }

    /// True when codes, scales and minimums are borrowed from the file mapping.
    pub fn is_mapped(&self) -> bool {
        self.scales.is_mapped() && self.mins.as_ref().is_none_or(Tensor::is_mapped)
    }

    /// The matrix view the kernels take.
    pub fn matrix(&self) -> QMatrix<'_> {
        fn f16_view(t: &Tensor) -> &[f16] {
            match t.view() {
                crate::weights::View::F16(v) => v,
                _ => unreachable!("checked F16 at load"),
            }
        }
        QMatrix {
            format: self.format,
            codes: self.codes.bytes(),
            scales: f16_view(&self.scales),
            mins: self.mins.as_ref().map_or(&[][..], f16_view),
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Every weight widened to f32, row-major (for references and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.matrix().dequantize_rows(0..self.rows, &mut out);
        out
    }
}
