//! Matrix-vector products over weight rows of any stored dtype: the single-row dot product,
//! rows in one sequential stream, and the batched few-rows product with its register tiles.
//! Generic over the level ([`Lanes`]); [`super::Kernels`] dispatches to them.

use super::elementwise::widen_k;
use super::simd::{self, Elem, Lanes, LANES};

// Every body is `#[inline(always)]`: compiled into the dispatching method's per-level
// `#[target_feature]` function, never as a call of its own.

#[inline(always)]
pub(super) fn dot_k<S: Lanes, T: Elem>(s: S, w: &[T], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    let mut acc = [s.zero(); 4];
    let mut i = 0;
    while i + 4 * LANES <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let o = i + j * LANES;
            *a = s.mul_add(s.load_elem(&w[o..]), s.load(&x[o..]), *a);
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        acc[0] = s.mul_add(s.load_elem(&w[i..]), s.load(&x[i..]), acc[0]);
        i += LANES;
    }
    let mut sum = s.reduce_add(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])));
    for k in i..n {
        sum += w[k].to_f32() * x[k];
    }
    sum
}

/// `y = W x`, one row after another. Rows are read strictly in order as one sequential stream,
/// which the hardware prefetchers follow at full speed; taking several interleaved rows at a
/// time (short streams a few KiB apart) read a memory-resident matrix markedly slower, which
/// sharing the loads of `x` did not make up for (docs/performance.md).
#[inline(always)]
pub(super) fn matvec_rows_k<S: Lanes, T: Elem>(
    s: S,
    w: &[T],
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    // Same size and both Pod: the cast cannot fail when T is bf16.
    if T::KIND == simd::ElemKind::Bf16 && s.bf16_matvec_rows(bytemuck::cast_slice(w), cols, x, y) {
        return;
    }
    for (r, out) in y.iter_mut().enumerate() {
        *out = dot_k(s, &w[r * cols..(r + 1) * cols], x);
    }
}

/// Weight rows per tile of the batched product when it runs the single-row kernel once per
/// input row (few inputs, or bf16 weights at a level with its own bf16 row kernel): 16 rows
/// of gpt2-small's widest input (3072) are 192 KiB of f32, inside L2, read from memory once
/// and reused for every input row.
const BATCH_ROW_TILE: usize = 16;

/// Input rows from which the batched product packs weight blocks and runs register tiles.
/// Below it, the copy into the block buffer costs more than the tiles save: measured on
/// gpt2-small at B=4 (2 threads, depth 0), 57 t/s with the single-row kernel on cached tiles
/// against 42 t/s packed.
const BATCH_TILED_INPUTS: usize = 8;

/// Bytes of f32 weights per block of the batched product: a block that stays in L2 (1–2 MiB
/// per core here) beside the inputs while every input row passes over it.
const BATCH_PACK_BYTES: usize = 96 << 10;

std::thread_local! {
    /// The batched product's block of weight rows, widened to f32.
    static BATCH_PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The batched product's input rows, copied to 64-byte-aligned rows.
    static BATCH_INPUTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Elements from the start of `buf` to its first 64-byte boundary (a cache line, and a
/// 512-bit vector): at most 15 (`min` only guards `align_offset`'s documented right to give
/// up, which would leave the part merely unaligned).
fn line_offset(buf: &[f32]) -> usize {
    buf.as_ptr().align_offset(LINE).min(LANES - 1)
}

/// `len` elements of `buf` starting on a 64-byte boundary, `buf` grown as needed.
fn aligned_part(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + LANES {
        buf.resize(len + LANES, 0.0);
    }
    let off = line_offset(buf);
    &mut buf[off..off + len]
}

/// A zeroed f32 buffer whose first element sits on a 64-byte boundary: rows of a width that
/// is a multiple of 16 then each start on a cache line, and [`super::Kernels::matvec_batch`] reads
/// them where they are instead of copying them to aligned rows. Derefs to the `len`
/// elements.
pub struct AlignedBuf {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0f32; len + LANES - 1];
        let off = line_offset(&buf);
        AlignedBuf { buf, off, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// `y = X Wᵀ` ([`Kernels::matvec_batch`]) for `inputs` input rows of `cols` columns.
///
/// The weights go block by block ([`BATCH_PACK_BYTES`]): register tiles of the level's
/// [`simd::BatchTile`] shape multiply a block with every input row from cache while the next
/// block is prefetched. f16 and bf16 blocks are first widened into a per-thread f32 buffer
/// (widening in every tile converted each weight once per input row; widening is exact, so the
/// products are those of the single-row kernel); f32 blocks are used where they lie (copying
/// them too cost ~10% more CPU time at B=16 on gpt2-small). Without the prefetch, the loads
/// of the first input row waited on memory with only a few rows' streams in flight. Fewer than [`BATCH_TILED_INPUTS`] inputs, and bf16 weights at a
/// level with its own bf16 row kernel, go through the single-row kernel on cached tiles of
/// weight rows instead (bf16 so that they too stay bit-identical to it).
#[inline(always)]
pub(super) fn matvec_batch_k<S: Lanes, T: Elem>(
    s: S,
    w: &[T],
    cols: usize,
    inputs: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let out = y.len() / inputs.max(1);
    if cols == 0 {
        // Empty sums, as the single-row kernel gives them.
        y.fill(0.0);
        return;
    }
    if inputs == 1 {
        // One input: nothing to reuse a block for; the single-row kernel streams the weights.
        matvec_rows_k(s, w, cols, x, y);
        return;
    }
    if inputs < BATCH_TILED_INPUTS || (T::KIND == simd::ElemKind::Bf16 && S::BF16_MATVEC) {
        for t0 in (0..out).step_by(BATCH_ROW_TILE) {
            let t1 = (t0 + BATCH_ROW_TILE).min(out);
            for i in 0..inputs {
                matvec_rows_k(
                    s,
                    &w[t0 * cols..t1 * cols],
                    cols,
                    &x[i * cols..(i + 1) * cols],
                    &mut y[i * out + t0..i * out + t1],
                );
            }
        }
        return;
    }
    let tile = S::BATCH_TILE;
    let per = (BATCH_PACK_BYTES / 4 / cols.max(1)).max(tile.rows) / tile.rows * tile.rows;
    let mut buf = BATCH_PACK.take();
    let mut xbuf = BATCH_INPUTS.take();
    // Rows already on cache lines (the model's activation buffers, `AlignedBuf`) are read in
    // place; others are copied to aligned rows first.
    let in_place = cols.is_multiple_of(LANES) && x.as_ptr().align_offset(LINE) == 0;
    let xstride = cols.next_multiple_of(LANES);
    let xs: &[f32] = if in_place {
        x
    } else {
        let xs = aligned_part(&mut xbuf, inputs * xstride);
        for (dst, src) in xs.chunks_exact_mut(xstride).zip(x.chunks_exact(cols)) {
            dst[..cols].copy_from_slice(src);
        }
        xs
    };
    let pack = aligned_part(&mut buf, per * cols);
    let mut p0 = 0;
    while p0 < out {
        let p1 = (p0 + per).min(out);
        let src = &w[p0 * cols..p1 * cols];
        let packed: &[f32] = match T::as_f32(src) {
            Some(f) => f,
            None => {
                widen_k(s, src, &mut pack[..src.len()]);
                &pack[..src.len()]
            }
        };
        // The next block's weights, fetched into cache while this one is multiplied.
        let next = &w[p1 * cols..(p1 + per).min(out) * cols];
        let block = Block {
            w: packed,
            cols,
            rows: p1 - p0,
            first: p0,
            out,
            next: bytemuck::cast_slice(next),
            xstride,
        };
        match (tile.rows, tile.inputs, tile.split) {
            (3, 2, 4) => batch_tiles::<S, 3, 2, 4>(s, block, inputs, xs, y),
            (3, 2, 1) => batch_tiles::<S, 3, 2, 1>(s, block, inputs, xs, y),
            (1, 2, 1) => batch_tiles::<S, 1, 2, 1>(s, block, inputs, xs, y),
            _ => batch_tiles::<S, 1, 1, 4>(s, block, inputs, xs, y),
        }
        p0 = p1;
    }
    BATCH_PACK.set(buf);
    BATCH_INPUTS.set(xbuf);
}

/// A block of weight rows (widened, `rows × cols`) of a batched product: rows
/// `first..first + rows` of a weight with `out` rows, `out` also being the row stride of `y`.
#[derive(Clone, Copy)]
struct Block<'a> {
    w: &'a [f32],
    cols: usize,
    rows: usize,
    first: usize,
    out: usize,
    /// The raw bytes of the next block, to prefetch a share of in every tile.
    next: &'a [u8],
    /// Row stride of the inputs `x` (at least `cols`).
    xstride: usize,
}

/// Bytes of a cache line (the prefetch granule).
const LINE: usize = 64;

/// Bytes of a register tile's weight rows, per column chunk, that stay in L1 while every input
/// row passes over them. Rows wider than this (gpt2-small's FF output: 3 rows × 3072 columns
/// = 36 KiB against Zen 4's 32 KiB L1) were reloaded from L2 for every input row, at ~45
/// GFLOP/s per core against ~68 for 768-column rows; split into column chunks, with the
/// accumulators kept in memory between chunks, they run like the narrow ones.
const BATCH_TILE_L1_BYTES: usize = 12 << 10;

/// A block's products in `R × C` register tiles (weight rows × input rows), the edges in
/// `R × 1`, `1 × C` and `1 × 1` tiles. Weight tiles outside, input rows inside: a tile of `R`
/// weight rows is reused from L1 for every input row. When the tile's rows are wider than
/// [`BATCH_TILE_L1_BYTES`], the columns go in chunks (whole 64-column blocks): every input
/// row passes over one chunk of the tile before the next chunk, each tile's accumulators
/// saved between chunks. An accumulator sees the same multiply-adds in the same order either
/// way, so the results are bit for bit the same.
#[inline(always)]
fn batch_tiles<S: Lanes, const R: usize, const C: usize, const J: usize>(
    s: S,
    b: Block<'_>,
    inputs: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let blocks = b.cols / (4 * LANES);
    let per_chunk = (BATCH_TILE_L1_BYTES / (R * 4 * 4 * LANES)).max(1);
    let chunks = blocks.div_ceil(per_chunk).max(1);
    // Every tile prefetches its share of the next block's lines, spread over its columns.
    let tiles = (b.rows / R + b.rows % R) * (inputs / C + inputs % C) * chunks;
    let share = b.next.len().div_ceil(LINE).div_ceil(tiles.max(1)) * LINE;
    let mut pf = 0;
    if chunks == 1 {
        // Whole rows: the tiles' sums start and end in registers. (One loop over both cases,
        // like the chunked one below, measured 5–12% slower on 768-column rows.)
        let span = Span { k: 0..blocks };
        macro_rules! whole {
            ($r:expr, $c:expr, $o:expr, $i:expr) => {{
                batch_tile::<S, $r, $c, J, true, true>(
                    s,
                    b,
                    $o,
                    x,
                    $i,
                    y,
                    pf..pf + share,
                    &span,
                    &mut [],
                );
                pf += share;
            }};
        }
        let mut o = 0;
        while o + R <= b.rows {
            let mut i = 0;
            while i + C <= inputs {
                whole!(R, C, o, i);
                i += C;
            }
            while i < inputs {
                whole!(R, 1, o, i);
                i += 1;
            }
            o += R;
        }
        while o < b.rows {
            let mut i = 0;
            while i + C <= inputs {
                whole!(1, C, o, i);
                i += C;
            }
            while i < inputs {
                whole!(1, 1, o, i);
                i += 1;
            }
            o += 1;
        }
        return;
    }
    // Column chunks: `R·C·4` saved accumulators per tile of input rows.
    let groups = inputs / C + inputs % C;
    let mut saved = vec![s.zero(); groups * R * C * 4];
    let mut o = 0;
    while o < b.rows {
        let rows = if o + R <= b.rows { R } else { 1 };
        for chunk in 0..chunks {
            let span = Span {
                k: chunk * per_chunk..((chunk + 1) * per_chunk).min(blocks),
            };
            let (first, last) = (chunk == 0, chunk + 1 == chunks);
            let mut i = 0;
            for slot in saved.chunks_exact_mut(R * C * 4) {
                let cols = if i + C <= inputs { C } else { 1 };
                let range = pf..pf + share;
                macro_rules! tile {
                    ($r:expr, $c:expr) => {
                        match (first, last) {
                            (true, _) => batch_tile::<S, $r, $c, J, true, false>(
                                s, b, o, x, i, y, range, &span, slot,
                            ),
                            (false, false) => batch_tile::<S, $r, $c, J, false, false>(
                                s, b, o, x, i, y, range, &span, slot,
                            ),
                            (false, true) => batch_tile::<S, $r, $c, J, false, true>(
                                s, b, o, x, i, y, range, &span, slot,
                            ),
                        }
                    };
                }
                match (rows == R, cols == C) {
                    (true, true) => tile!(R, C),
                    (true, false) => tile!(R, 1),
                    (false, true) => tile!(1, C),
                    (false, false) => tile!(1, 1),
                }
                i += cols;
                pf += share;
            }
        }
        o += rows;
    }
}

/// The 64-column blocks a [`batch_tile`] call covers.
struct Span {
    k: std::ops::Range<usize>,
}

/// One register tile: the outputs of block rows `o0..o0 + R` and input rows `i0..i0 + C`,
/// each exactly as [`dot_k`] computes it. `dot_k` keeps four accumulators, accumulator `j`
/// taking lanes `64k + 16j ..` of every 64-column block `k` in order, then the 16-column
/// remainder blocks into accumulator 0, then `(a₀ + a₁) + (a₂ + a₃)` reduced, then the last
/// columns one by one. The accumulators never meet before the end, so they may run in
/// separate passes over the columns, `J` at a time, and over the 64-column blocks of `span`
/// only, resumed from `saved` unless `FIRST` and saved to it unless `LAST` (`R·C·4` vectors,
/// row-major by weight row, input row, accumulator): the same values, fewer live registers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn batch_tile<
    S: Lanes,
    const R: usize,
    const C: usize,
    const J: usize,
    const FIRST: bool,
    const LAST: bool,
>(
    s: S,
    b: Block<'_>,
    o0: usize,
    x: &[f32],
    i0: usize,
    y: &mut [f32],
    prefetch: std::ops::Range<usize>,
    span: &Span,
    saved: &mut [S::V],
) {
    let n = b.cols;
    // Lines of `prefetch` per 64-column step, so that they are all asked for by the end.
    let steps = span.k.len().max(1);
    let per_step = prefetch.len().div_ceil(LINE).div_ceil(steps);
    let mut pf = prefetch.start;
    let wr: [&[f32]; R] = std::array::from_fn(|r| &b.w[(o0 + r) * n..(o0 + r + 1) * n]);
    let xr: [&[f32]; C] = std::array::from_fn(|c| &x[(i0 + c) * b.xstride..][..n]);
    let main = n / (4 * LANES) * (4 * LANES);
    // The 64-column blocks as arrays, all `main / 64` long: indexing them needs no bounds
    // checks in the loop (with slices, ~20 compare-and-branch pairs per 24 multiply-adds).
    let w64: [&[[f32; 4 * LANES]]; R] =
        std::array::from_fn(|r| &wr[r][..main].as_chunks().0[span.k.clone()]);
    let x64: [&[[f32; 4 * LANES]]; C] =
        std::array::from_fn(|c| &xr[c][..main].as_chunks().0[span.k.clone()]);
    let blocks = span.k.len();
    let pf_end = prefetch.end.min(b.next.len());
    // Each pass's accumulators when it ends; every element is written by its pass before
    // anything reads it. Left uninitialized: a zeroed array of `R·C·4` vectors (1.5 KiB at
    // AVX2's 3 × 2 tile) was a `memset` call per tile, 2.6% of a 16-sequence decode.
    let mut sums = [[[const { std::mem::MaybeUninit::<S::V>::uninit() }; 4]; C]; R];
    for p in 0..4 / J {
        let mut acc = [[[s.zero(); J]; C]; R];
        if !FIRST {
            for r in 0..R {
                for c in 0..C {
                    for jj in 0..J {
                        acc[r][c][jj] = saved[(r * C + c) * 4 + p * J + jj];
                    }
                }
            }
        }
        for k in 0..blocks {
            if p == 0 {
                for _ in 0..per_step {
                    if pf < pf_end {
                        s.prefetch(b.next, pf);
                    }
                    pf += LINE;
                }
            }
            for (jj, _) in [(); J].iter().enumerate() {
                let o = (p * J + jj) * LANES;
                let mut xv = [s.zero(); C];
                for c in 0..C {
                    xv[c] = s.load(&x64[c][k][o..o + LANES]);
                }
                for r in 0..R {
                    let wv = s.load(&w64[r][k][o..o + LANES]);
                    for c in 0..C {
                        acc[r][c][jj] = s.mul_add(wv, xv[c], acc[r][c][jj]);
                    }
                }
            }
        }
        let mut i = main;
        if p == 0 && LAST {
            // dot_k's 16-column remainder blocks, into accumulator 0 (pass 0's first).
            while i + LANES <= n {
                let mut xv = [s.zero(); C];
                for c in 0..C {
                    xv[c] = s.load(&xr[c][i..]);
                }
                for r in 0..R {
                    let wv = s.load(&wr[r][i..]);
                    for c in 0..C {
                        acc[r][c][0] = s.mul_add(wv, xv[c], acc[r][c][0]);
                    }
                }
                i += LANES;
            }
        }
        for r in 0..R {
            for c in 0..C {
                for jj in 0..J {
                    sums[r][c][p * J + jj].write(acc[r][c][jj]);
                }
            }
        }
    }
    // The passes `p = 0 .. 4 / J` wrote every `sums[r][c][p·J + jj]`, `jj < J`: all four of
    // every (r, c), `J` dividing 4 (1, 2 or 4: `BatchTile::split`).
    const { assert!(4 % J == 0) };
    // SAFETY: `sums[r][c][j]` was written (above).
    let sum = |r: usize, c: usize, j: usize| unsafe { sums[r][c][j].assume_init() };
    if !LAST {
        for r in 0..R {
            for c in 0..C {
                for j in 0..4 {
                    saved[(r * C + c) * 4 + j] = sum(r, c, j);
                }
            }
        }
        return;
    }
    let tail = n / LANES * LANES;
    for r in 0..R {
        for c in 0..C {
            let a = [sum(r, c, 0), sum(r, c, 1), sum(r, c, 2), sum(r, c, 3)];
            let mut sum = s.reduce_add(s.add(s.add(a[0], a[1]), s.add(a[2], a[3])));
            for k in tail..n {
                sum += wr[r][k] * xr[c][k];
            }
            y[(i0 + c) * b.out + b.first + o0 + r] = sum;
        }
    }
}
