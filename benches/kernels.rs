//! Micro-benchmarks of the hot kernels: matrix-vector products per weight dtype (throughput in
//! weight bytes), dot, exp, GELU, LayerNorm, one FAVOR+ head step (feature maps, state update
//! and readout), and prefill's many-rows product against the `gemm` crate.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use half::{bf16, f16};
use performer::attention::favor::{self, HeadState, Token};
use performer::attention::{transposed_tiles, FeatureKind, FeatureMap};
use performer::kernels::{self, Elem};
use performer::synthetic::Rng;
use performer::weights::View;

fn quick<M: criterion::measurement::Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal()).collect()
}

fn matvec_case<T: Elem>(c: &mut Criterion, name: &str, conv: impl Fn(f32) -> T) {
    // 768² and 3072×768 (gpt2-small's attention and feed-forward, in cache), 50257×768 (its
    // output layer, far beyond L3: a DRAM-bound read).
    for (rows, cols) in [(768usize, 768usize), (3072, 768), (50257, 768)] {
        let w: Vec<T> = randn(rows * cols, 1).into_iter().map(&conv).collect();
        let x = randn(cols, 2);
        let mut y = vec![0f32; rows];
        let mut g = c.benchmark_group(format!("matvec_{name}"));
        quick(&mut g);
        g.throughput(Throughput::Bytes(
            (rows * cols * std::mem::size_of::<T>()) as u64,
        ));
        g.bench_function(format!("{rows}x{cols}"), |b| {
            b.iter(|| {
                kernels::matvec(black_box(&w[..]), black_box(&x[..]), &mut y);
                black_box(y[0])
            })
        });
        g.finish();
    }
}

fn matvec(c: &mut Criterion) {
    matvec_case::<f32>(c, "f32", |x| x);
    matvec_case::<f16>(c, "f16", f16::from_f32);
    matvec_case::<bf16>(c, "bf16", bf16::from_f32);
}

/// Quantized matrix-vector products, every level and method this CPU runs side by side on
/// the same matrices (gpt2-small's shapes, as `matvec` above), throughput in stored bytes
/// (codes, scales and minimums): `cargo bench --bench kernels -- quant_matvec`.
fn quant_matvec(c: &mut Criterion) {
    use performer::kernels::quant::{QuantKernels, QuantMethod};
    use performer::kernels::Kernels;
    use performer::quant::{OwnedQMatrix, QuantFormat};
    for format in QuantFormat::ALL {
        for (rows, cols) in [(768usize, 768usize), (3072, 768), (50257, 768)] {
            let w = randn(rows * cols, 1);
            let q = OwnedQMatrix::quantize(format, "w", &w, rows, cols)
                .expect("finite weights of unit scale quantize");
            let m = q.matrix();
            let x = randn(cols, 2);
            let mut y = vec![0f32; rows];
            let mut g = c.benchmark_group(format!("quant_matvec_{format}_{rows}x{cols}"));
            quick(&mut g);
            g.throughput(Throughput::Bytes(q.bytes() as u64));
            for k in Kernels::all_supported() {
                for method in QuantMethod::ALL {
                    let qk = QuantKernels::new(k, method);
                    let mut variants = vec![qk];
                    if qk.uses_vnni() {
                        variants.push(qk.without_vnni());
                    }
                    for qk in variants {
                        let name = format!("{}/{}", k.isa(), qk.describe()).replace(' ', "_");
                        g.bench_function(name, |b| {
                            b.iter(|| {
                                qk.matvec(black_box(m), black_box(&x[..]), &mut y);
                                black_box(y[0])
                            })
                        });
                    }
                }
            }
            g.finish();
        }
    }
}

fn elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    quick(&mut g);
    let n = 768;
    let (a, b) = (randn(n, 3), randn(n, 4));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("dot_768", |bch| {
        bch.iter(|| kernels::dot::<f32>(black_box(&a), black_box(&b)))
    });

    let n = 4096;
    let src = randn(n, 5);
    let mut buf = src.clone();
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("exp_4096", |bch| {
        bch.iter(|| {
            buf.copy_from_slice(&src);
            kernels::exp_shifted(black_box(&mut buf), 1.0);
            black_box(buf[0])
        })
    });

    let n = 3072;
    let src = randn(n, 6);
    let mut buf = src.clone();
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("gelu_3072", |bch| {
        bch.iter(|| {
            buf.copy_from_slice(&src);
            kernels::gelu(black_box(&mut buf));
            black_box(buf[0])
        })
    });

    // One head's state pass of a decode step (m = 256 features, d = 64): compensated update
    // and readout, in elements of the state.
    let (m, d) = (256, 64);
    let (a, w, v) = (randn(m, 12), randn(m, 13), randn(d, 14));
    let (mut s, mut comp, mut out) = (randn(m * d, 15), vec![bf16::ZERO; m * d], vec![0f32; d]);
    g.throughput(Throughput::Elements((m * d) as u64));
    g.bench_function("kahan_update_readout_256x64", |bch| {
        bch.iter(|| {
            out.fill(0.0);
            kernels::kahan_update_readout(1.0, black_box(&a), &v, &w, &mut s, &mut comp, &mut out);
            black_box(out[0])
        })
    });

    // The softmax baseline's weighted sum of 4096 cached value rows of width 64.
    let (rows, d) = (4096, 64);
    let (p, vals) = (randn(rows, 16), randn(rows * d, 17));
    let mut out = vec![0f32; d];
    g.throughput(Throughput::Bytes((rows * d * 4) as u64));
    g.bench_function("vecmat_4096x64", |bch| {
        bch.iter(|| {
            kernels::vecmat(black_box(&p), black_box(&vals), &mut out);
            black_box(out[0])
        })
    });

    let n = 768;
    let x = randn(n, 7);
    let (gamma, beta) = (vec![1f32; n], vec![0f32; n]);
    let mut out = vec![0f32; n];
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("layer_norm_768", |bch| {
        bch.iter(|| {
            kernels::layer_norm(black_box(&x), &gamma, &beta, 1e-5, &mut out);
            black_box(out[0])
        })
    });
    g.finish();
}

/// One head of one layer: key and query feature maps, the state update and the readout.
fn favor_head(c: &mut Criterion) {
    let mut g = c.benchmark_group("favor_head_step");
    quick(&mut g);
    let d = 64;
    for m in [128usize, 256] {
        let projection = randn(m * d, 8);
        let projection_t = transposed_tiles(&View::F32(&projection), m, d);
        let map = FeatureMap {
            kind: FeatureKind::Softmax { eps: 1e-4 },
            projection: View::F32(&projection),
            projection_t: &projection_t,
            m,
            d,
        };
        let (q, k, v) = (randn(d, 9), randn(d, 10), randn(d, 11));
        let (mut a_mat, mut a_vec, mut v_sum) = (vec![0f32; m * d], vec![0f32; m], vec![0f32; d]);
        let (mut a_mat_c, mut a_vec_c, mut v_sum_c) = (
            vec![bf16::ZERO; m * d],
            vec![bf16::ZERO; m],
            vec![bf16::ZERO; d],
        );
        let mut max = f32::NEG_INFINITY;
        let (mut key_feat, mut query_feat, mut out) = (vec![0f32; m], vec![0f32; m], vec![0f32; d]);
        let mut n = 0usize;
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("m{m}_d{d}"), |b| {
            b.iter(|| {
                n += 1;
                let st = HeadState {
                    a_mat: &mut a_mat,
                    a_vec: &mut a_vec,
                    v_sum: &mut v_sum,
                    comp: favor::Compensation {
                        a_mat: &mut a_mat_c,
                        a_vec: &mut a_vec_c,
                        v_sum: &mut v_sum_c,
                    },
                    max: &mut max,
                    key_feat: &mut key_feat,
                    query_feat: &mut query_feat,
                };
                let tok = Token {
                    q: black_box(&q),
                    k: black_box(&k),
                    v: black_box(&v),
                    n,
                };
                favor::step(&map, 1e-6, st, tok, &mut out);
                black_box(out[0])
            })
        });
    }
    g.finish();
}

/// The many-rows weight product of prefill (`kernels::sgemm`), every level this CPU runs,
/// beside the `gemm` crate on the same operands: a 256-row chunk against gpt2-small's
/// feed-forward matrices (in cache), throughput in multiply-adds:
/// `cargo bench --bench kernels -- sgemm`.
fn sgemm(c: &mut Criterion) {
    use performer::kernels::matmul::{gemm_f32, MatRef};
    use performer::kernels::{sgemm, Kernels};
    let rows = 256;
    for (out, k) in [(3072usize, 768usize), (768, 3072)] {
        let x = randn(rows * k, 3);
        let w = randn(out * k, 4);
        let mut y = vec![0f32; rows * out];
        let mut g = c.benchmark_group(format!("sgemm_{rows}x{k}x{out}"));
        quick(&mut g);
        g.throughput(Throughput::Elements((rows * k * out) as u64));
        for level in Kernels::all_supported() {
            g.bench_function(level.isa().name(), |b| {
                b.iter(|| {
                    sgemm::linear(level, black_box(&x), rows, black_box(&w), out, &mut y);
                    black_box(y[0])
                })
            });
        }
        g.bench_function("gemm crate", |b| {
            b.iter(|| {
                gemm_f32(
                    MatRef::row_major(black_box(&x), rows, k),
                    MatRef::row_major(black_box(&w), out, k).t(),
                    &mut y,
                    out,
                    false,
                );
                black_box(y[0])
            })
        });
        g.finish();
    }
}

criterion_group!(
    benches,
    matvec,
    quant_matvec,
    elementwise,
    favor_head,
    sgemm
);
criterion_main!(benches);
