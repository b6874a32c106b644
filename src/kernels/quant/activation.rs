//! The int8 method's quantized activation and the row slicing every quantized kernel shares:
//! the leaf the per-level kernel files build on (it imports none of them).

use half::f16;

use crate::quant::packed::{PackedView, PACKED_ROWS};
use crate::quant::{QMatrix, QuantFormat, BLOCK};

pub(super) use crate::kernels::simd::ROUNDING;

/// One row's codes, scales and (q4_1) minimums.
pub(super) type RowParts<'a> = (&'a [u8], &'a [f16], &'a [f16]);

/// The rows of `m`, each sliced by its strides, for writing `y` (`y.len() == m.rows`,
/// asserted); `None`, with `y` zeroed, for rows of no weights. `QMatrix::new` guarantees the
/// lengths; a matrix built field by field is held to them here, once per product, so that no
/// row is skipped (the kernels take each row's slices as their bounds). Slicing as it goes
/// saves [`QMatrix::row`]'s per-row offsets and bounds checks (3–9% of a 3072 × 768 int8
/// product).
#[inline(always)]
pub(super) fn check_rows<'a>(
    m: QMatrix<'a>,
    y: &mut [f32],
) -> Option<impl Iterator<Item = RowParts<'a>> + 'a> {
    // `widen_rows` passes no outputs.
    assert!(
        y.is_empty() || y.len() == m.rows,
        "quantized matvec: y length"
    );
    if m.cols == 0 {
        // Rows of no weights: empty sums (and no zero-sized chunks below).
        y.fill(0.0);
        return None;
    }
    let (rb, sb) = (m.format.row_bytes(m.cols), m.cols / BLOCK);
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
    let mins = m.mins[..mins_needed]
        .chunks_exact(sb)
        .chain(std::iter::repeat(&[][..]));
    Some(
        m.codes
            .chunks_exact(rb)
            .zip(m.scales.chunks_exact(sb))
            .zip(mins)
            .take(m.rows)
            .map(|((c, s), mi)| (c, s, mi)),
    )
}

/// Most rows in one tile of [`RowTiles`].
pub(super) const MAX_TILE: usize = 32;

/// Code bytes of one tile of [`RowTiles`]: with the code bytes of a group of four
/// activations (four times the row's width) it stays within a 32 KiB L1 data cache.
const TILE_BYTES: usize = 12 * 1024;

/// Rows of a product against more than four activations, a tile at a time: each group of
/// four activations passes over a tile of rows while the tile's codes sit in L1, instead of
/// every activation passing over one row (their codes, 3 KiB or more each at 768 columns,
/// then miss L1 for every row: 16 activations of gpt2-small's width ran 16% slower per weight
/// than four).
pub(super) struct RowTiles<'a, I> {
    rows: I,
    buf: [RowParts<'a>; MAX_TILE],
    tile: usize,
    next_row: usize,
}

impl<'a, I: Iterator<Item = RowParts<'a>>> RowTiles<'a, I> {
    /// Tiles of [`check_rows_batch`]'s rows of `m`, sized for `activations` inputs (one row per
    /// tile for four or fewer: their codes fit L1 beside any row).
    #[inline(always)]
    pub(super) fn new(rows: I, m: QMatrix<'_>, activations: usize) -> Self {
        let tile = if activations > 4 {
            (TILE_BYTES / m.format.row_bytes(m.cols).max(1)).clamp(1, MAX_TILE)
        } else {
            1
        };
        RowTiles {
            rows,
            buf: [(&[][..], &[][..], &[][..]); MAX_TILE],
            tile,
            next_row: 0,
        }
    }

    /// The next tile: the index of its first row and its rows; `None` after the last.
    #[inline(always)]
    pub(super) fn next_tile(&mut self) -> Option<(usize, &[RowParts<'a>])> {
        let mut n = 0;
        while n < self.tile {
            match self.rows.next() {
                Some(row) => {
                    self.buf[n] = row;
                    n += 1;
                }
                None => break,
            }
        }
        let r0 = self.next_row;
        self.next_row += n;
        (n > 0).then(|| (r0, &self.buf[..n]))
    }
}

/// The body of a level's `int8_rows`: every row of `$m` against every activation of `$acts`,
/// `$y[i · rows + r]` row `r` times `acts[i]`, by [`RowTiles`]: four activations at a time
/// share each weight block's load and unpacking (batched decode), the rest one at a time.
/// `$row!(format, codes, scales, mins, acts, A)` is the level's row kernel for `A` (4 or 1)
/// activations, `acts` a `[&Activation; A]`, returning `[f32; A]`, each sum the same whatever
/// `A`. A macro, not a function taking the kernel: the kernels must inline into the level's
/// `#[target_feature]` entry point. `$y.len()` and the activations' lengths are checked.
macro_rules! int8_rows_by_tiles {
    ($m:expr, $acts:expr, $y:expr, $row:ident) => {{
        let (m, acts, y): (QMatrix<'_>, &[Activation], &mut [f32]) = ($m, $acts, $y);
        let rows_n = m.rows;
        if let Some(rows) = check_rows_batch(m, acts, y) {
            let groups = acts.len() / 4;
            let mut tiles = RowTiles::new(rows, m, acts.len());
            while let Some((r0, tile)) = tiles.next_tile() {
                for g in 0..groups {
                    let four = [
                        &acts[4 * g],
                        &acts[4 * g + 1],
                        &acts[4 * g + 2],
                        &acts[4 * g + 3],
                    ];
                    for (k, &(codes, scales, mins)) in tile.iter().enumerate() {
                        let v = $row!(m.format, codes, scales, mins, four, 4);
                        for (a, o) in v.into_iter().enumerate() {
                            y[(4 * g + a) * rows_n + r0 + k] = o;
                        }
                    }
                }
                for (i, act) in acts.iter().enumerate().skip(4 * groups) {
                    for (k, &(codes, scales, mins)) in tile.iter().enumerate() {
                        let [v] = $row!(m.format, codes, scales, mins, [act], 1);
                        y[i * rows_n + r0 + k] = v;
                    }
                }
            }
        }
    }};
}
pub(super) use int8_rows_by_tiles;

/// [`check_rows`] for `acts.len()` inputs: `y` holds `acts.len() × m.rows` outputs and every
/// activation was quantized from `m.cols` values (asserted).
#[inline(always)]
pub(super) fn check_rows_batch<'a>(
    m: QMatrix<'a>,
    acts: &[Activation],
    y: &mut [f32],
) -> Option<impl Iterator<Item = RowParts<'a>> + 'a> {
    assert_eq!(y.len(), acts.len() * m.rows, "quantized matvec: y length");
    for act in acts {
        check_activation(act, m.cols);
    }
    if acts.is_empty() {
        return None;
    }
    if m.cols == 0 {
        y.fill(0.0);
        return None;
    }
    check_rows(m, &mut [])
}

/// Holds a product over the packed groups `p` (`PackedRows`) to the lengths the kernels read
/// by pointer: `y` has a value per packed row, the codes, scales and minimums cover every
/// group, and `act` was quantized from `p.cols` values.
#[inline(always)]
pub(super) fn check_packed(p: PackedView<'_>, act: &Activation, y: &[f32]) {
    let blocks = p.cols / BLOCK;
    assert_eq!(y.len(), p.groups * PACKED_ROWS, "packed matvec: y length");
    let rows = p.groups * PACKED_ROWS;
    assert!(
        p.codes.len() >= rows * p.format.row_bytes(p.cols)
            && p.scales.len() >= rows * blocks
            && p.mins.len()
                >= if p.format.has_mins() {
                    rows * blocks
                } else {
                    0
                },
        "packed matvec: {} groups of {} columns need more codes or scales",
        p.groups,
        p.cols
    );
    check_activation(act, p.cols);
}

/// Asserts that `act` was quantized from `cols` values: every buffer the int8 kernels read by
/// pointer has that activation's length.
#[inline(always)]
fn check_activation(act: &Activation, cols: usize) {
    let blocks = cols / BLOCK;
    assert!(
        act.scales.len() == blocks
            && act.codes.len() == cols
            && act.codes_u8.len() == cols
            && act.offset_q4y.len() == 8 * blocks.div_ceil(2)
            && act.codes_q4.len() == cols
            && act.block_sums.len() == blocks,
        "quantized matvec: activation length"
    );
}

/// The sums of `x` per block of 32 (in order, f32): what q4_1's minimums multiply; empty for
/// the other formats.
pub(super) fn block_sums(format: QuantFormat, x: &[f32]) -> Vec<f32> {
    if !format.has_mins() {
        return Vec::new();
    }
    x.chunks_exact(BLOCK)
        .map(|b| b.iter().fold(0f32, |s, &v| s + v))
        .collect()
}

/// An activation quantized per block of 32 to int8, as [`QuantMethod::Int8`](super::QuantMethod::Int8) uses
/// it.
#[derive(Debug, Default, Clone)]
pub struct Activation {
    /// The codes, `round(x / d)` (ties to even) in [-127, 127].
    pub codes: Vec<i8>,
    /// Per block, `d = max|x| / 127` (0 for an all-zero block).
    pub scales: Vec<f32>,
    /// Per group of 4 codes, their sum ([`Activation::block_sums`] adds them up per block).
    pub sums4: Vec<i32>,
    /// The q4 int8 kernels' layout: per pair of blocks, codes `[b₀ 0..16, b₁ 0..16, b₀ 16..32,
    /// b₁ 16..32]` (the order their nibble unpacking produces).
    pub codes_q4: Vec<i8>,
    /// The codes plus 128 (their sign bit flipped), `1 ..= 255`: the unsigned side of the VNNI
    /// q8_0 kernels' `vpdpbusd`, against the weights' signed codes.
    pub codes_u8: Vec<u8>,
    /// The q4_0 kernels' offset `−8 · Σx`, 8 lanes per pair of blocks: lane `k` of a pair is
    /// `−8` times the sums of `codes_q4`'s groups of 4 `k` and `8 + k` (a 256-bit accumulator
    /// takes the low and high nibbles' products of both blocks); an unpaired last block has
    /// its groups `0 .. 8`. Pair (or last block) `b` starts at `4 · b`.
    pub offset_q4y: Vec<i32>,
    /// Per block, `d · Σ codes` in f32: the block's `Σx` as the int8 kernels see it, which
    /// q4_1's minimums multiply.
    pub block_sums: Vec<f32>,
}

impl Activation {
    /// The quantization, compiled into each level's entry point: the same IEEE operations at
    /// every level (no contraction), so the same codes. The portable level's, and the twin of
    /// the levels' own codes loops (`avx2::quantize`, `avx512::quantize`), which then finish
    /// with [`Activation::derive`].
    #[inline(always)]
    pub(super) fn quantize_body(&mut self, x: &[f32]) {
        self.resize_for(x.len());
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
            for (c, &v) in codes.iter_mut().zip(block) {
                *c = ((v * inv + ROUNDING) - ROUNDING).clamp(-127.0, 127.0) as i8;
            }
        }
        self.derive();
    }

    /// `codes` and `scales` sized for an `x` of `n` values (`n / 32` blocks; every buffer is
    /// resized and written in place, no per-element pushes: this runs once per product of a
    /// decode step).
    #[inline(always)]
    pub(super) fn resize_for(&mut self, n: usize) {
        self.codes.resize(n, 0);
        self.scales.resize(n / BLOCK, 0.0);
    }

    /// Everything else from `codes` and `scales`: the q4_0 layout, the sums per 4, the
    /// offsets and the block sums.
    #[inline(always)]
    pub(super) fn derive(&mut self) {
        let (n, blocks) = (self.codes.len(), self.scales.len());
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
        self.codes_u8.resize(n, 0);
        for (u, &c) in self.codes_u8.iter_mut().zip(&self.codes) {
            *u = c as u8 ^ 0x80;
        }
        self.offset_q4y.resize(8 * blocks.div_ceil(2), 0);
        for (dst, src) in self
            .offset_q4y
            .chunks_exact_mut(8)
            .zip(self.codes_q4.chunks(2 * BLOCK))
        {
            // `−8 ·` the sum of group of 4 `g`.
            let group =
                |g: usize| -8 * src[4 * g..4 * g + 4].iter().map(|&c| c as i32).sum::<i32>();
            for (k, d) in dst.iter_mut().enumerate() {
                *d = if src.len() == 2 * BLOCK {
                    group(k) + group(8 + k)
                } else {
                    group(k)
                };
            }
        }
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
