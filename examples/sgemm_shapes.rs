//! Times the many-rows weight product (`kernels::sgemm`) against the `gemm` crate on the
//! small model's prefill shapes: `cargo run --release --example sgemm_shapes`.
use performer::kernels::{matmul, sgemm, Kernels};
use std::time::Instant;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn main() {
    let shapes = [
        (256usize, 768usize, 2304usize),
        (256, 768, 768),
        (256, 768, 3072),
        (256, 3072, 768),
    ];
    for &(m, k, n) in &shapes {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let mut y = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let mut report = |name: &str, f: &mut dyn FnMut(&mut [f32])| {
            let t: Vec<f64> = (0..15)
                .map(|_| {
                    let t0 = Instant::now();
                    f(&mut y);
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            let med = median(t);
            println!(
                "{m}x{k}x{n} {name}: {:.3} ms, {:.1} GFLOP/s",
                med * 1e3,
                flops / med / 1e9
            );
        };
        for level in Kernels::all_supported() {
            report(level.isa().name(), &mut |y| {
                sgemm::linear(level, &x, m, &w, n, y)
            });
        }
        report("gemm crate", &mut |y| {
            matmul::gemm_f32(
                matmul::MatRef::row_major(&x, m, k),
                matmul::MatRef::row_major(&w, n, k).t(),
                y,
                n,
                false,
            )
        });
    }
}
