//! Single-thread loop over one quantized matrix-vector product (3072 × 768, gpt2-small's
//! feed-forward width, L2/L3-resident), for interleaved A/B runs of the kernel methods:
//!
//! ```text
//! cargo build --release --example quant_matvec
//! for i in 1 2 3; do for f in q8_0 q4_0; do for m in dequant int8; do
//!   target/release/examples/quant_matvec $f $m 300; done; done; done
//! ```

use performer::kernels::quant::{matvec_serial_with, supported, Method};
use performer::quant::{quantize_row, QMatrix, QuantFormat, BLOCK};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: quant_matvec q8_0|q4_0 portable|dequant|int8 ITERATIONS";
    let [_, format, method, iters] = &args[..] else {
        return Err(usage.into());
    };
    let format: QuantFormat = format.parse()?;
    let method = match method.as_str() {
        "portable" => Method::Portable,
        "dequant" => Method::Dequant,
        "int8" => Method::Int8,
        _ => return Err(usage.into()),
    };
    if !supported(method) {
        return Err(format!("{method:?} is not supported on this CPU").into());
    }
    let iters: usize = iters.parse()?;
    let (rows, cols) = (3072usize, 768usize);
    let mut rng = performer::synthetic::Rng::new(1);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
    let rb = format.row_bytes(cols);
    let mut codes = vec![0u8; rows * rb];
    let mut scales = vec![half::f16::ZERO; rows * cols / BLOCK];
    for r in 0..rows {
        quantize_row(
            format,
            "w",
            &w[r * cols..(r + 1) * cols],
            &mut codes[r * rb..(r + 1) * rb],
            &mut scales[r * cols / BLOCK..(r + 1) * cols / BLOCK],
        )?;
    }
    let m = QMatrix::new(format, &codes, &scales, rows, cols).ok_or("inconsistent sizes")?;
    let x: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
    let mut y = vec![0f32; rows];
    let start = std::time::Instant::now();
    for _ in 0..iters {
        matvec_serial_with(method, m, &x, &mut y);
        std::hint::black_box(&y);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{format} {method:?}: {:.1} µs per product, {:.2} G weights/s",
        secs / iters as f64 * 1e6,
        (rows * cols * iters) as f64 / secs / 1e9
    );
    Ok(())
}
