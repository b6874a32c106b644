//! Quantized rows repacked four at a time, so that a kernel taking four rows per pass over one
//! activation still reads one sequential stream.
//!
//! A matrix-vector product over the row-major layout ([`QMatrix`]) reads a row after another:
//! one sequential stream, which the hardware prefetchers serve well, but every row pays the
//! loads of the activation's codes, the loop's bookkeeping and a horizontal sum on its own.
//! Four rows per pass share those, and in the row-major layout they are four streams a row
//! apart, which the prefetchers serve worse (a kernel taking four adjacent row-major rows ran
//! faster in cache and slower in decode). [`PackedRows`] lays the four rows' codes side by side
//! at the granularity the kernels load them, so the four-row kernels read one stream again.
//! llama.cpp repacks its `q4_0` weights for its x86 CPU kernels likewise.
//!
//! The layout of a group of four rows `r = 0..4` of `n` blocks (`n = cols / 32`), in order:
//! - `q4_0` and `q4_1` codes: for each pair of blocks `p` (blocks `2p`, `2p + 1`), the 32
//!   bytes of each row (as the row-major layout has them for that pair); then, for an odd `n`,
//!   the last block's 16 bytes of each row.
//! - `q8_0` codes: for each block, the 32 bytes of each row.
//! - Scales (and `q4_1`'s minimums, laid out alike): for each whole group of 8 blocks, the 8
//!   scales of each row; then the remaining `n % 8` scales of each row.
//!
//! A group holds exactly its four rows' bytes (no padding), so a group of a matrix of `rows`
//! rows is `4 · row_bytes` bytes of codes and `4 · n` scales. Rows past the last whole group
//! are not packed: the kernels take them from the row-major layout.

use half::f16;

use super::format::{QMatrix, QuantFormat, BLOCK};

/// Rows per group of [`PackedRows`].
pub const PACKED_ROWS: usize = 4;

/// Bytes of codes laid side by side per row: a pair of blocks for q4 (one 256-bit load), a
/// block for q8_0.
const UNIT: usize = 32;

/// Blocks per group of scales: the kernels widen 8 scales at a time.
const SCALE_GROUP: usize = 8;

/// The whole groups of four rows of a quantized matrix, repacked (see the module docs): an
/// owned copy made at load, beside the row-major matrix it was made from.
#[derive(Debug, Clone)]
pub struct PackedRows {
    format: QuantFormat,
    groups: usize,
    cols: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    mins: Vec<f16>,
}

/// A borrowed run of groups of [`PackedRows`].
#[derive(Debug, Clone, Copy)]
pub struct PackedView<'a> {
    /// The format.
    pub format: QuantFormat,
    /// Groups of [`PACKED_ROWS`] rows.
    pub groups: usize,
    /// Columns (a multiple of [`BLOCK`]).
    pub cols: usize,
    /// Codes, `4 · row_bytes` per group, laid out as the module docs say.
    pub codes: &'a [u8],
    /// Scales, `4 · cols / 32` per group.
    pub scales: &'a [f16],
    /// `q4_1`'s minimums, laid out as `scales`; empty for the other formats.
    pub mins: &'a [f16],
}

impl PackedRows {
    /// The whole groups of four rows of `m`, repacked (`m.rows / 4` groups; none for fewer
    /// than four rows).
    ///
    /// ```
    /// use performer::quant::{OwnedQMatrix, PackedRows, QuantFormat};
    ///
    /// let w: Vec<f32> = (0..6 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let q = OwnedQMatrix::quantize(QuantFormat::Q4_0, "w", &w, 6, 64)?;
    /// let packed = PackedRows::pack(q.matrix());
    /// assert_eq!(packed.view().groups, 1);
    /// assert_eq!(packed.row(2).codes, q.matrix().row(2).codes);
    /// # Ok::<(), performer::Error>(())
    /// ```
    pub fn pack(m: QMatrix<'_>) -> PackedRows {
        let groups = m.rows / PACKED_ROWS;
        let n = m.cols / BLOCK;
        let rb = m.format.row_bytes(m.cols);
        let mut codes = Vec::with_capacity(groups * PACKED_ROWS * rb);
        let mut scales = Vec::with_capacity(groups * PACKED_ROWS * n);
        let mut mins = Vec::with_capacity(if m.format.has_mins() {
            groups * PACKED_ROWS * n
        } else {
            0
        });
        for g in 0..groups {
            let rows: Vec<_> = (0..PACKED_ROWS)
                .map(|r| m.row(g * PACKED_ROWS + r))
                .collect();
            interleave(rows.iter().map(|r| r.codes), UNIT, &mut codes);
            interleave(rows.iter().map(|r| r.scales), SCALE_GROUP, &mut scales);
            if m.format.has_mins() {
                interleave(rows.iter().map(|r| r.mins), SCALE_GROUP, &mut mins);
            }
        }
        PackedRows {
            format: m.format,
            groups,
            cols: m.cols,
            codes,
            scales,
            mins,
        }
    }

    /// All groups.
    pub fn view(&self) -> PackedView<'_> {
        PackedView {
            format: self.format,
            groups: self.groups,
            cols: self.cols,
            codes: &self.codes,
            scales: &self.scales,
            mins: &self.mins,
        }
    }

    /// The rows packed: `4 ·` the groups.
    pub fn rows(&self) -> usize {
        self.groups * PACKED_ROWS
    }

    /// Bytes held (codes and f16 metadata).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * (self.scales.len() + self.mins.len())
    }

    /// Row `r` (< [`Self::rows`]) gathered back into the row-major layout (the tests compare
    /// it with the matrix's row): the codes, scales and minimums as owned vectors.
    #[doc(hidden)]
    pub fn row(&self, r: usize) -> OwnedRow {
        let (g, k) = (r / PACKED_ROWS, r % PACKED_ROWS);
        let rb = self.format.row_bytes(self.cols) * PACKED_ROWS;
        let n = self.cols / BLOCK * PACKED_ROWS;
        let meta = |all: &[f16]| match all {
            [] => Vec::new(),
            all => gather(&all[g * n..(g + 1) * n], k, SCALE_GROUP),
        };
        OwnedRow {
            codes: gather(&self.codes[g * rb..(g + 1) * rb], k, UNIT),
            scales: meta(&self.scales),
            mins: meta(&self.mins),
        }
    }
}

/// One row of [`PackedRows`] gathered back ([`PackedRows::row`]).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedRow {
    /// Codes.
    pub codes: Vec<u8>,
    /// Scales.
    pub scales: Vec<f16>,
    /// Minimums (`q4_1`), else empty.
    pub mins: Vec<f16>,
}

/// Four rows of equal length (codes, scales or minimums) appended to `out` as the module docs
/// lay them out: `unit` values of each row in turn for every whole `unit`, then the rest of
/// each row.
fn interleave<'a, T: Copy + 'a>(
    rows: impl Iterator<Item = &'a [T]> + Clone,
    unit: usize,
    out: &mut Vec<T>,
) {
    let len = rows.clone().next().map_or(0, <[T]>::len);
    let whole = len / unit * unit;
    for o in (0..whole).step_by(unit) {
        for row in rows.clone() {
            out.extend_from_slice(&row[o..o + unit]);
        }
    }
    for row in rows {
        out.extend_from_slice(&row[whole..]);
    }
}

/// Row `k` of a group [`interleave`] laid out with `unit`: the inverse, for the tests.
fn gather<T: Copy>(group: &[T], k: usize, unit: usize) -> Vec<T> {
    let len = group.len() / PACKED_ROWS;
    let whole = len / unit * unit;
    let mut out = Vec::with_capacity(len);
    for o in (0..whole).step_by(unit) {
        let at = o * PACKED_ROWS + k * unit;
        out.extend_from_slice(&group[at..at + unit]);
    }
    let tail = len - whole;
    let at = whole * PACKED_ROWS + k * tail;
    out.extend_from_slice(&group[at..at + tail]);
    out
}

impl<'a> PackedView<'a> {
    /// Groups `range` as a view of their own.
    pub fn group_range(&self, range: std::ops::Range<usize>) -> PackedView<'a> {
        let rb = self.format.row_bytes(self.cols) * PACKED_ROWS;
        let sb = self.cols / BLOCK * PACKED_ROWS;
        PackedView {
            groups: range.len(),
            codes: &self.codes[range.start * rb..range.end * rb],
            scales: &self.scales[range.start * sb..range.end * sb],
            mins: if self.format.has_mins() {
                &self.mins[range.start * sb..range.end * sb]
            } else {
                self.mins
            },
            ..*self
        }
    }
}
