//! Single-thread loop over one quantized matrix-vector product (3072 × 768, gpt2-small's
//! feed-forward width, L2/L3-resident), for interleaved A/B runs of the kernel methods at the
//! process's level (`PERFORMER_ISA=avx2` or `portable` forces a lower one):
//!
//! An optional fourth argument B multiplies B inputs at once (`QuantKernels::linear`, the
//! batched-decode path) and reports weights × inputs per second. The method `int8-packed` runs
//! the int8 product over the rows packed four at a time (`PackedRows`, what a loaded model's
//! decoding reads). `ROWS` and `COLS` in the environment change the shape.
//!
//! ```text
//! cargo build --release --example quant_matvec
//! for i in 1 2 3; do for f in q8_0 q4_0 q4_1; do for m in dequant int8; do
//!   target/release/examples/quant_matvec $f $m 300; done; done; done
//! ```

use performer::kernels::quant::{with_activation, QuantKernels, QuantMethod};
use performer::quant::{OwnedQMatrix, PackedRows, QuantFormat};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: quant_matvec q8_0|q4_0|q4_1 dequant|int8|int8-packed ITERATIONS [B]";
    let (format, method, iters, batch) = match &args[..] {
        [_, f, m, i] => (f, m, i, 1usize),
        [_, f, m, i, b] => (f, m, i, b.parse()?),
        _ => return Err(usage.into()),
    };
    let format: QuantFormat = format.parse()?;
    let packed = method == "int8-packed";
    let method = if packed { "int8" } else { method.as_str() };
    let kernels = QuantKernels::active(QuantMethod::parse(method)?);
    if packed && (batch != 1 || !kernels.takes_packed(format)) {
        return Err(format!("{format} packed rows: one input, at a level that takes them").into());
    }
    let iters: usize = iters.parse()?;
    let dim = |name: &str, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(match std::env::var(name) {
            Ok(v) => v.parse()?,
            Err(_) => default,
        })
    };
    let (rows, cols) = (dim("ROWS", 3072)?, dim("COLS", 768)?);
    let mut rng = performer::synthetic::Rng::new(1);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
    let q = OwnedQMatrix::quantize(format, "w", &w, rows, cols)?;
    let m = q.matrix();
    let x: Vec<f32> = (0..cols * batch).map(|_| rng.normal()).collect();
    let mut y = vec![0f32; rows * batch];
    let rows_packed = PackedRows::pack(m);
    let start = std::time::Instant::now();
    for _ in 0..iters {
        if packed {
            let p = rows_packed.view();
            let (yp, rest) = y.split_at_mut(p.groups * 4);
            with_activation(&x, |act| {
                kernels.int8_packed(p, act, yp);
                // Rows past the last group of four, as a model's products take them.
                let r0 = yp.len();
                kernels.matvec_serial_prepared(m.row_range(r0..rows), &x, Some(act), rest);
            });
        } else if batch == 1 {
            kernels.matvec_serial(m, &x, &mut y);
        } else {
            kernels.linear(&x, batch, m, &mut y);
        }
        std::hint::black_box(&y);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{format} {} {}{} B={batch}: {:.1} µs per product, {:.2} G weights/s",
        kernels.kernels().isa(),
        kernels.describe(),
        if packed { " packed" } else { "" },
        secs / iters as f64 * 1e6,
        (rows * cols * iters * batch) as f64 / secs / 1e9
    );
    Ok(())
}
