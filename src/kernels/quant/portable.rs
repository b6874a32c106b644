//! The portable level: scalar code, any CPU.

use super::activation::{check_rows, check_rows_batch, Activation};
use crate::quant::{QMatrix, QRow, QuantFormat, BLOCK};

/// Every row of `m` by [`portable_row`] into `y`.
pub(super) fn dequant_rows(m: QMatrix<'_>, x: &[f32], _xsum: &[f32], y: &mut [f32]) {
    let Some(rows) = check_rows(m, y) else {
        return;
    };
    for (out, (codes, scales, mins)) in y.iter_mut().zip(rows) {
        *out = portable_row(
            m.format,
            QRow {
                codes,
                scales,
                mins,
            },
            x,
        );
    }
}

/// Every row of `m` against every activation (`y[i · rows + r]`): exact integer sums per
/// block, scaled in f32 by the two scales' product (as the other levels).
pub(super) fn int8_rows(m: QMatrix<'_>, acts: &[Activation], y: &mut [f32]) {
    let rows_n = m.rows;
    let Some(rows) = check_rows_batch(m, acts, y) else {
        return;
    };
    let bb = m.format.block_bytes();
    for (r, (codes, scales, mins)) in rows.enumerate() {
        for (i, act) in acts.iter().enumerate() {
            let mut sum = 0f32;
            for (b, s) in scales.iter().enumerate() {
                let c = &codes[b * bb..(b + 1) * bb];
                let xq = &act.codes[b * BLOCK..(b + 1) * BLOCK];
                let dot: i32 = match m.format {
                    QuantFormat::Q8_0 => c
                        .iter()
                        .zip(xq)
                        .map(|(&w, &v)| (w as i8) as i32 * v as i32)
                        .sum(),
                    QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                        let offset = if m.format == QuantFormat::Q4_0 { 8 } else { 0 };
                        c.iter()
                            .zip(xq.iter().zip(&xq[BLOCK / 2..]))
                            .map(|(&byte, (&lo, &hi))| {
                                ((byte & 0xF) as i32 - offset) * lo as i32
                                    + ((byte >> 4) as i32 - offset) * hi as i32
                            })
                            .sum()
                    }
                };
                sum += dot as f32 * (s.to_f32() * act.scales[b]);
                if m.format.has_mins() {
                    sum += mins[b].to_f32() * act.block_sums[b];
                }
            }
            y[i * rows_n + r] = sum;
        }
    }
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
