//! Every SIMD kernel against its scalar twin on random and edge inputs: odd lengths, zeros,
//! huge and tiny magnitudes, and every weight dtype, at every instruction-set level this
//! machine supports (portable, AVX2+FMA, AVX-512).

mod common;

use common::TestRng;
use half::{bf16, f16};
use performer::kernels::{scalar, Elem, Isa, Kernels};

/// The kernels at every level this CPU runs, lowest first. The portable level is always there;
/// the levels below the detected one are all present (a CPU with AVX-512 also has AVX2), so a
/// machine with AVX-512 tests all three.
fn levels() -> Vec<Kernels> {
    let all = Kernels::all_supported();
    assert_eq!(all[0].isa(), Isa::Portable);
    assert_eq!(all.last().unwrap().isa(), Isa::detected());
    assert_eq!(
        all.len(),
        Isa::detected() as usize + 1,
        "a level below the best is missing"
    );
    all
}

/// Lengths around the 16-lane and 64-element unroll boundaries.
const LENGTHS: &[usize] = &[0, 1, 3, 15, 16, 17, 31, 63, 64, 65, 100, 257, 1031];

fn rel_err(a: f32, b: f32, scale: f32) -> f32 {
    (a - b).abs() / scale.max(f32::MIN_POSITIVE)
}

/// Dot products accumulate rounding proportional to Σ|w·x|; 1e-5 of that sum bounds f32
/// accumulation over ≤ 1031 terms with 4-way split accumulators (n·ε/4 ≈ 3e-5 worst case,
/// ~1e-6 typical).
fn check_dot<T: Elem>(k: Kernels, w: &[T], x: &[f32]) {
    let fast = k.dot(w, x);
    let slow = scalar::dot(w, x);
    let mag: f32 = w.iter().zip(x).map(|(a, b)| (a.to_f32() * b).abs()).sum();
    assert!(
        fast == slow || rel_err(fast, slow, mag) <= 1e-5 || (fast - slow).abs() <= 1e-30,
        "{} {} dot n={}: {fast} vs {slow}",
        k.isa(),
        T::NAME,
        w.len()
    );
}

#[test]
fn dot_matches_scalar_for_all_dtypes() {
    for k in levels() {
        dot_matches_scalar_at(k);
    }
}

fn dot_matches_scalar_at(k: Kernels) {
    let mut rng = TestRng(1);
    for &n in LENGTHS {
        for scale in [0.0, 1e-20, 1.0, 1e15] {
            let w = rng.vec(n, scale);
            let x = rng.vec(n, 1.0);
            check_dot(k, &w, &x);
        }
        // Half formats: tiny values reach f16 subnormals, large ones stay below f16's 65504.
        for scale in [0.0, 1e-6, 1.0, 3e4] {
            let w = rng.vec(n, scale);
            let x = rng.vec(n, 1.0);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            check_dot(k, &wh, &x);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            check_dot(k, &wb, &x);
        }
    }
}

#[test]
fn half_loads_widen_exactly() {
    // Widening f16/bf16 to f32 is exact: every lane must equal half's own conversion,
    // including subnormals, infinities and signed zeros.
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        6.1e-5,
        5.96e-8,
        f32::INFINITY,
        -1e-3,
    ];
    let mut vals = Vec::new();
    for i in 0..32 {
        vals.push(specials[i % specials.len()] * (1 + i / 9) as f32);
    }
    let h: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    let b: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
    for k in levels() {
        // Whole registers (32 = two) and a tail (odd lengths), at offsets 0 and 1.
        for (off, n) in [(0, 32), (1, 31), (0, 17), (3, 5)] {
            let mut out = vec![f32::NAN; n];
            k.widen(&h[off..off + n], &mut out);
            for i in 0..n {
                assert_eq!(
                    out[i].to_bits(),
                    h[off + i].to_f32().to_bits(),
                    "{} f16",
                    k.isa()
                );
            }
            k.widen(&b[off..off + n], &mut out);
            for i in 0..n {
                assert_eq!(
                    out[i].to_bits(),
                    b[off + i].to_f32().to_bits(),
                    "{} bf16",
                    k.isa()
                );
            }
            k.widen(&vals[off..off + n], &mut out);
            assert_eq!(out, vals[off..off + n]);
        }
    }
}

fn check_matvec<T: Elem>(
    k: Kernels,
    rows: usize,
    cols: usize,
    rng: &mut TestRng,
    conv: impl Fn(f32) -> T,
) {
    let w: Vec<T> = rng.vec(rows * cols, 1.0).into_iter().map(conv).collect();
    let x = rng.vec(cols, 1.0);
    let mut fast = vec![0.0; rows];
    let mut slow = vec![0.0; rows];
    k.matvec(&w, &x, &mut fast);
    scalar::matvec(&w, &x, &mut slow);
    for r in 0..rows {
        let mag: f32 = (0..cols)
            .map(|c| (w[r * cols + c].to_f32() * x[c]).abs())
            .sum();
        assert!(
            rel_err(fast[r], slow[r], mag) <= 1e-5,
            "{} {} matvec {rows}x{cols} row {r}: {} vs {}",
            k.isa(),
            T::NAME,
            fast[r],
            slow[r]
        );
    }
}

#[test]
fn matvec_matches_scalar_including_parallel_blocks() {
    let mut rng = TestRng(2);
    // Small (serial), odd shapes, and large enough to split across threads.
    for &(rows, cols) in &[
        (1, 1),
        (3, 17),
        (5, 64),
        (7, 100),
        (130, 77),
        (515, 300),
        (1024, 129),
        // Row counts around the 8- and 4-row groups.
        (8, 16),
        (9, 33),
        (12, 31),
        (15, 48),
        (23, 5),
        (1031, 257),
        (2100, 300),
    ] {
        for k in levels() {
            check_matvec::<f32>(k, rows, cols, &mut rng, |v| v);
            check_matvec::<f16>(k, rows, cols, &mut rng, f16::from_f32);
            check_matvec::<bf16>(k, rows, cols, &mut rng, bf16::from_f32);
        }
    }
}

/// The batched product against (1) the single-row kernel at the same level, which it must
/// equal bit for bit (batched decode then gives exactly single-stream decoding's products),
/// and (2) the scalar twin, within the matvec tolerance of `check_matvec` (f32 rounding of a
/// split-accumulator sum against an f64 one: 1e-5 of Σ|w·x|).
fn check_matvec_batch<T: Elem>(k: Kernels, w: &[T], x: &[f32], inputs: usize) {
    let cols = x.len() / inputs;
    let out = w.len() / cols; // callers pass at least one column
    let mut fast = vec![f32::NAN; inputs * out];
    let mut slow = vec![f32::NAN; inputs * out];
    k.matvec_batch(w, x, inputs, &mut fast);
    scalar::matvec_batch(w, x, inputs, &mut slow);
    for i in 0..inputs {
        let xi = &x[i * cols..(i + 1) * cols];
        let mut one = vec![f32::NAN; out];
        k.matvec_serial(w, xi, &mut one);
        for o in 0..out {
            let (got, want) = (fast[i * out + o], one[o]);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{} {} batch {inputs}x{out}x{cols} input {i} row {o}: {got} vs single row {want}",
                k.isa(),
                T::NAME,
            );
            let mag: f32 = (0..cols)
                .map(|c| (w[o * cols + c].to_f32() * xi[c]).abs())
                .sum();
            let sl = slow[i * out + o];
            assert!(
                got == sl
                    || (got.is_nan() && sl.is_nan())
                    || rel_err(got, sl, mag) <= 1e-5
                    || (got - sl).abs() <= 1e-30,
                "{} {} batch {inputs}x{out}x{cols} input {i} row {o}: {got} vs scalar {sl}",
                k.isa(),
                T::NAME,
            );
        }
    }
}

#[test]
fn matvec_batch_equals_single_rows_and_scalar() {
    for k in levels() {
        eprintln!("level {}", k.isa());
        matvec_batch_equals_single_rows_and_scalar_at(k);
    }
}

fn matvec_batch_equals_single_rows_and_scalar_at(k: Kernels) {
    let mut rng = TestRng(31);
    // Inputs on both sides of the packed register tiles (from 8) and around every tile edge
    // (1–3 weight rows, 1–2 inputs), and columns around the 16-lane, 64-column and tail
    // boundaries.
    for &inputs in &[1usize, 2, 3, 4, 5, 7, 8, 9, 16] {
        for &out in &[1usize, 2, 3, 4, 5, 7, 8, 17] {
            for &cols in &[0usize, 1, 15, 16, 17, 63, 64, 65, 100, 129, 257] {
                // Zeros, tiny (products below f32's normal range), plain, and huge ones.
                for scale in [0.0, 1e-20, 1.0, 1e15] {
                    let w = rng.vec(out * cols, scale);
                    let x = rng.vec(inputs * cols, 1.0);
                    if cols == 0 {
                        // No columns: every output is an empty sum.
                        let mut y = vec![f32::NAN; inputs * out];
                        k.matvec_batch(&w, &x, inputs, &mut y);
                        assert!(y.iter().all(|&v| v == 0.0), "{} cols 0", k.isa());
                        continue;
                    }
                    check_matvec_batch(k, &w, &x, inputs);
                    if scale == 1.0 || scale == 0.0 {
                        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                        check_matvec_batch(k, &wh, &x, inputs);
                        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                        check_matvec_batch(k, &wb, &x, inputs);
                    }
                }
            }
        }
    }
    // Weights of several packed blocks (96 KiB of f32 each: 93 rows of 257 columns, 8 of
    // 3072), so that a block is multiplied while the next one is prefetched.
    for &(inputs, out, cols) in &[(9usize, 200usize, 257usize), (16, 20, 3072), (8, 95, 100)] {
        let w = rng.vec(out * cols, 1.0);
        let x = rng.vec(inputs * cols, 1.0);
        check_matvec_batch(k, &w, &x, inputs);
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        check_matvec_batch(k, &wh, &x, inputs);
    }
    // Rows wider than a tile's L1 share, whose columns go in chunks with the accumulators
    // saved in between (AVX-512: 3 rows × over 1024 columns; AVX2: 2 × 1536; portable: 1 ×
    // 3072), with edge tiles (7 and 4 rows, 17 and 9 inputs), 16-column remainder blocks and
    // tail columns (3089 = 48·64 + 17, 6200 = 96·64 + 56), huge values and a NaN.
    for &(inputs, out, cols) in &[(17usize, 7usize, 3089usize), (9, 4, 6200), (8, 5, 1100)] {
        for scale in [1.0, 1e15] {
            let w = rng.vec(out * cols, scale);
            let mut x = rng.vec(inputs * cols, 1.0);
            check_matvec_batch(k, &w, &x, inputs);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            check_matvec_batch(k, &wh, &x, inputs);
            x[2 * cols + cols / 2] = f32::NAN;
            check_matvec_batch(k, &w, &x, inputs);
        }
    }
    // Input rows read in place (on cache lines, width a multiple of 16) and copied to aligned
    // rows first (one element off a line, or a width that is not a multiple of 16): both
    // paths, bit for bit the single-row kernel.
    for &(inputs, out, cols) in &[
        (16usize, 7usize, 768usize),
        (9, 5, 3136),
        (8, 3, 64),
        (8, 4, 100),
    ] {
        let w = rng.vec(out * cols, 1.0);
        let x = rng.vec(inputs * cols, 1.0);
        let mut aligned = performer::kernels::AlignedBuf::zeroed(inputs * cols);
        aligned.copy_from_slice(&x);
        assert_eq!(aligned.as_ptr().align_offset(64), 0);
        check_matvec_batch(k, &w, &aligned, inputs);
        let mut off = performer::kernels::AlignedBuf::zeroed(inputs * cols + 1);
        off[1..].copy_from_slice(&x);
        check_matvec_batch(k, &w, &off[1..], inputs);
    }
    // Non-finite values stay where they are: a NaN or infinity in one input row poisons only
    // that row's outputs, in the same way as the single-row kernel.
    let (inputs, out, cols) = (4, 5, 70);
    let w = rng.vec(out * cols, 1.0);
    let mut x = rng.vec(inputs * cols, 1.0);
    x[cols + 3] = f32::NAN;
    x[3 * cols + 69] = f32::INFINITY;
    check_matvec_batch(k, &w, &x, inputs);
    let mut y = vec![0f32; inputs * out];
    k.matvec_batch(&w, &x, inputs, &mut y);
    assert!(y[..out].iter().all(|v| v.is_finite()));
    assert!(y[out..2 * out].iter().all(|v| v.is_nan()));
    assert!(y[2 * out..3 * out].iter().all(|v| v.is_finite()));
}

#[test]
fn axpy_rows_equals_repeated_axpy_and_scalar() {
    for k in levels() {
        let mut rng = TestRng(41);
        // Widths held in registers (16..=128 by 16) and the fallback (odd, 0, 144).
        for d in [0usize, 1, 7, 16, 17, 32, 48, 64, 100, 128, 144] {
            for rows in [0usize, 1, 2, 3, 31, 257] {
                for scale in [0.0, 1e-20, 1.0, 1e15] {
                    let p = rng.vec(rows, 1.0);
                    let w = rng.vec(rows * d, scale);
                    let start = rng.vec(d, scale);
                    let mut fast = start.clone();
                    k.axpy_rows(&p, &w, &mut fast);
                    let mut each = start.clone();
                    let mut slow = start.clone();
                    for (j, &pj) in p.iter().enumerate() {
                        k.axpy(pj, &w[j * d..(j + 1) * d], &mut each);
                        scalar::axpy(pj, &w[j * d..(j + 1) * d], &mut slow);
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&fast),
                        bits(&each),
                        "{} d={d} rows={rows}: not the same as axpy row by row",
                        k.isa()
                    );
                    // Against the unfused scalar twin: each step rounds once more there, so
                    // they differ by f32 rounding of each partial sum (rows · ε relative to
                    // the sum of magnitudes, ≤ 258 · 6e-8 ≈ 1.6e-5 here; 1e-4 bounds it).
                    for i in 0..d {
                        let mag: f32 = start[i].abs()
                            + p.iter()
                                .enumerate()
                                .map(|(j, pj)| (pj * w[j * d + i]).abs())
                                .sum::<f32>();
                        assert!(
                            rel_err(fast[i], slow[i], mag) <= 1e-4
                                || (fast[i] - slow[i]).abs() <= 1e-30,
                            "{} d={d} rows={rows}: {} vs {}",
                            k.isa(),
                            fast[i],
                            slow[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matvec_batch_rejects_shapes_that_do_not_fit() {
    let k = Kernels::all_supported()[0];
    let w = vec![0f32; 12];
    let x = vec![0f32; 8];
    let run = |inputs: usize, y_len: usize| {
        let (w, x) = (w.clone(), x.clone());
        std::panic::catch_unwind(move || {
            let mut y = vec![0f32; y_len];
            k.matvec_batch(&w, &x, inputs, &mut y);
        })
        .is_ok()
    };
    assert!(run(2, 6), "2 inputs of 4 columns, 3 weight rows");
    assert!(!run(3, 6), "8 floats are not 3 rows");
    assert!(!run(2, 8), "4 outputs per row need 16 weights");
    assert!(!run(0, 6), "no inputs but data");
}

#[test]
fn matvec_blocks_cover_the_rows_one_to_four_per_thread() {
    use performer::kernels::{matvec_block_rows, PAR_MIN_ELEMS};
    // Too small, one thread, or a single block: no split.
    assert_eq!(matvec_block_rows(1, PAR_MIN_ELEMS - 1, 2), None);
    assert_eq!(matvec_block_rows(4096, 4096, 1), None);
    assert_eq!(matvec_block_rows(8, 4096, 2), None);
    for threads in [2usize, 3, 4, 16] {
        for &(rows, cols) in &[
            (128, 128),
            (256, 256),
            (768, 256),
            (1024, 256),
            (256, 1024),
            (2304, 768),
            (50257, 768),
            (9, 1 << 14),
            (100_000, 1),
        ] {
            let Some(block) = matvec_block_rows(rows, cols, threads) else {
                assert!(rows * cols < PAR_MIN_ELEMS || rows <= 8, "{rows}x{cols}");
                continue;
            };
            assert_eq!(
                block % 8,
                0,
                "{rows}x{cols} t{threads}: whole groups of 8 rows"
            );
            assert!(block < rows);
            let blocks = rows.div_ceil(block);
            // Rounding blocks up to 8 rows can leave fewer than `threads` of them for a
            // matrix of few rows, never more than four per thread.
            assert!(blocks <= 4 * threads, "{rows}x{cols} t{threads}: {blocks}");
            if rows % (8 * threads) == 0 && rows >= 8 * threads * 4 {
                assert_eq!(blocks % threads, 0, "{rows}x{cols} t{threads}: {blocks}");
            }
            if rows >= 8 * threads * 4 {
                assert!(blocks >= threads, "{rows}x{cols} t{threads}: {blocks}");
            }
        }
    }
    // Large products get more than one block per thread, small ones exactly one, and the
    // count is a multiple of the threads (three blocks on two threads would leave one thread
    // a third of the product idle).
    assert_eq!(matvec_block_rows(256, 256, 2), Some(128));
    assert_eq!(matvec_block_rows(1024, 256, 2), Some(512));
    assert_eq!(matvec_block_rows(768, 768, 2), Some(192)); // 590k weights: 4 blocks
    assert_eq!(matvec_block_rows(3072, 768, 2), Some(384)); // 2.4M: 8 blocks (at most 4 each)
    assert_eq!(matvec_block_rows(50257, 768, 2), Some(6288));
    assert_eq!(matvec_block_rows(3072, 768, 3), Some(344)); // 9 blocks, 3 per thread
}

#[test]
fn matvec_split_across_threads_is_bit_identical() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        matvec_split_across_threads_is_bit_identical_at(k);
    }
}

fn matvec_split_across_threads_is_bit_identical_at(k: Kernels) {
    let mut rng = TestRng(21);
    // Around the split threshold and up to several blocks per thread: every row is one dot
    // product computed the same way in whichever block it lands, so thread counts agree
    // exactly, f32 and bf16 (which has its own row kernel) alike.
    for &(rows, cols) in &[(128, 128), (127, 129), (300, 300), (4100, 300)] {
        let w = rng.vec(rows * cols, 1.0);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = rng.vec(cols, 1.0);
        let mut outs = Vec::new();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (mut y, mut yb) = (vec![0f32; rows], vec![0f32; rows]);
            pool.install(|| {
                k.matvec(&w, &x, &mut y);
                k.matvec(&wb, &x, &mut yb);
            });
            outs.push((y, yb));
        }
        assert_eq!(outs[0], outs[1], "{rows}x{cols}");
        assert_eq!(outs[0], outs[2], "{rows}x{cols}");
    }
}

#[test]
fn axpy_matches_scalar() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        axpy_matches_scalar_at(k);
    }
}

fn axpy_matches_scalar_at(k: Kernels) {
    let mut rng = TestRng(3);
    for &n in LENGTHS {
        let x = rng.vec(n, 3.0);
        let y0 = rng.vec(n, 1e3);
        let (mut a, mut b) = (y0.clone(), y0);
        k.axpy(0.37, &x, &mut a);
        scalar::axpy(0.37, &x, &mut b);
        // One fused multiply-add versus a multiply then add: at most 1 ulp apart.
        for i in 0..n {
            assert!(
                (a[i] - b[i]).abs() <= b[i].abs() * 2e-7 + 1e-6,
                "axpy {n} {i}"
            );
        }
    }
}

#[test]
fn exp_matches_std_and_handles_extremes() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        exp_matches_std_and_handles_extremes_at(k);
    }
}

fn exp_matches_std_and_handles_extremes_at(k: Kernels) {
    let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0443).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        88.0,
        88.7,
        88.8,
        1e30,
        -87.0,
        -87.3,
        -87.4,
        -100.0,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ]);
    let mut fast = xs.clone();
    k.exp_shifted(&mut fast, 0.0);
    for (i, &x) in xs.iter().enumerate() {
        let want = x.exp();
        let got = fast[i];
        if x < -87.33655 {
            // Flushed to zero instead of a denormal: below 1.2e-38 either way.
            assert_eq!(got, 0.0, "exp({x})");
        } else if want.is_infinite() {
            assert_eq!(got, f32::INFINITY, "exp({x})");
        } else {
            // 4 ulp: the polynomial's ~2 ulp plus the two-factor 2^n scaling.
            assert!(
                (got - want).abs() <= want * 4.0 * f32::EPSILON,
                "exp({x}) = {got}, want {want}"
            );
        }
    }
    let mut nan = [f32::NAN; 17];
    k.exp_shifted(&mut nan, 0.0);
    assert!(nan.iter().all(|v| v.is_nan()));
    // Shift is applied before exp: exp(x − s) for a tail of odd length.
    let mut v = vec![1.0f32; 19];
    k.exp_shifted(&mut v, 1.0);
    assert!(v.iter().all(|&e| (e - 1.0).abs() < 1e-7));
}

#[test]
fn gelu_matches_exact_erf_gelu() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        gelu_matches_exact_erf_gelu_at(k);
    }
}

fn gelu_matches_exact_erf_gelu_at(k: Kernels) {
    let mut xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.01).collect();
    xs.extend([
        0.0, -0.0, 1e-20, -1e-20, 30.0, -30.0, 1e6, -1e6, 1e30, -1e30,
    ]);
    for &n in &[xs.len(), 17, 1] {
        let mut fast = xs[..n].to_vec();
        let mut slow = xs[..n].to_vec();
        k.gelu(&mut fast);
        scalar::gelu(&mut slow);
        for i in 0..n {
            // The vector erf has absolute error ≤ 1.5e-7 (A&S 7.1.26), so GELU's error is
            // ≤ 0.75e-7·|x| plus f32 rounding of the result: 2 ulp with fused multiply-adds
            // (measured ≤ 1.9 here); the portable level rounds each of the erf polynomial's
            // multiply-adds twice (unfused), measured ≤ 2.3 ulp on this grid, so 4 there.
            let ulps = if k.isa() == Isa::Portable { 4.0 } else { 2.0 };
            let tol = 1e-7 * xs[i].abs() + ulps * f32::EPSILON * slow[i].abs() + 1e-30;
            assert!(
                (fast[i] - slow[i]).abs() <= tol,
                "gelu({}) = {}, want {}",
                xs[i],
                fast[i],
                slow[i]
            );
        }
    }
    // The scalar erf itself against known values.
    assert!((scalar::erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-15);
    assert!((scalar::erf(3.5) - 0.999_999_256_901_627_7).abs() < 1e-15);
    assert!((scalar::erf(-1.0) + 0.842_700_792_949_714_9).abs() < 1e-15);
}

#[test]
fn layer_norm_matches_scalar() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        layer_norm_matches_scalar_at(k);
    }
}

fn layer_norm_matches_scalar_at(k: Kernels) {
    let mut rng = TestRng(4);
    for &n in &[1usize, 7, 16, 33, 64, 768, 1001] {
        for scale in [1e-3f32, 1.0, 1e4] {
            let x: Vec<f32> = rng.vec(n, scale).iter().map(|v| v + 0.5 * scale).collect();
            let g = rng.vec(n, 2.0);
            let b = rng.vec(n, 1.0);
            let (mut fast, mut slow) = (vec![0.0; n], vec![0.0; n]);
            k.layer_norm(&x, &g, &b, 1e-5, &mut fast);
            scalar::layer_norm(&x, &g, &b, 1e-5, &mut slow);
            for i in 0..n {
                // Normalized values are O(1)·|g|: f32 mean/variance rounding gives ~1e-6.
                assert!(
                    (fast[i] - slow[i]).abs() <= 1e-5 * (1.0 + g[i].abs()),
                    "layer_norm n={n} scale={scale} i={i}: {} vs {}",
                    fast[i],
                    slow[i]
                );
            }
            let gh: Vec<bf16> = g.iter().map(|&v| bf16::from_f32(v)).collect();
            let bh: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
            k.layer_norm(&x, &gh, &bh, 1e-5, &mut fast);
            scalar::layer_norm(&x, &gh, &bh, 1e-5, &mut slow);
            for i in 0..n {
                assert!((fast[i] - slow[i]).abs() <= 1e-5 * (1.0 + g[i].abs()));
            }
        }
    }
    // A constant vector normalizes to the bias (variance 0, eps keeps it finite).
    let mut out = vec![0.0; 5];
    k.layer_norm(&[3.0; 5], &[1.0f32; 5], &[0.25f32; 5], 1e-5, &mut out);
    assert!(out.iter().all(|&v| v == 0.25));
}

#[test]
fn softmax_max_sum_match_scalar() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        softmax_max_sum_match_scalar_at(k);
    }
}

fn softmax_max_sum_match_scalar_at(k: Kernels) {
    let mut rng = TestRng(5);
    for &n in &[1usize, 2, 15, 16, 17, 256, 50257] {
        for scale in [0.0f32, 1.0, 80.0, 1e4] {
            let x = rng.vec(n, scale);
            let (mut fast, mut slow) = (x.clone(), x.clone());
            k.softmax(&mut fast);
            scalar::softmax(&mut slow);
            for i in 0..n {
                assert!(
                    (fast[i] - slow[i]).abs() <= 1e-6 + 1e-5 * slow[i],
                    "softmax {n} {i}"
                );
            }
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(k.max(&x), m);
            let s: f64 = x.iter().map(|&v| v as f64).sum();
            let mag: f64 = x.iter().map(|&v| v.abs() as f64).sum();
            assert!((k.sum(&x) as f64 - s).abs() <= 1e-6 * mag + 1e-30);
        }
    }
    assert_eq!(k.max(&[]), f32::NEG_INFINITY);
}

#[test]
fn vecmat_matches_scalar() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        vecmat_matches_scalar_at(k);
    }
}

fn vecmat_matches_scalar_at(k: Kernels) {
    let mut rng = TestRng(10);
    // Register widths (16…128, odd and even row counts) and the fallback (odd, > 128, 0).
    for &(rows, d) in &[
        (0, 64),
        (1, 16),
        (2, 64),
        (7, 64),
        (300, 128),
        (33, 48),
        (5, 17),
        (9, 144),
        (3, 0),
    ] {
        let p = rng.vec(rows, 1.0);
        for mag in [1.0f32, 1e-20, 1e15] {
            let w: Vec<f32> = rng.vec(rows * d, mag);
            let (mut fast, mut slow) = (vec![f32::NAN; d], vec![0f32; d]);
            k.vecmat(&p, &w, &mut fast);
            scalar::vecmat(&p, &w, &mut slow);
            for i in 0..d {
                // f32 sums of `rows` products ≤ mag in another order than the f64 twin.
                let tol = 1e-6 * mag * (1.0 + rows as f32);
                assert!(
                    (fast[i] - slow[i]).abs() <= tol,
                    "{rows}x{d} {mag}: col {i}"
                );
            }
        }
    }
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

#[test]
fn narrow_bf16_rounds_like_half_at_every_level() {
    let mut rng = TestRng(21);
    // Ties to even both ways (0x3F80_8000 stays, 0x3F81_8000 rounds up), just below and above
    // a tie, the carry into the exponent and into infinity, denormals, signed zeros, infinities
    // and NaNs (quiet, signalling, negative, payload only in the low half).
    let edges: Vec<f32> = [
        0x3F80_8000u32,
        0x3F81_8000,
        0x3F80_7FFF,
        0x3F80_8001,
        0x3FFF_FFFF,
        0x7F7F_FFFF,
        0xFF7F_FFFF,
        0x0000_0001,
        0x8000_8000,
        0x0001_8000,
        0x0000_0000,
        0x8000_0000,
        0x7F80_0000,
        0xFF80_0000,
        0x7FC0_0000,
        0x7F80_0001,
        0xFFC1_2345,
        0x7FBF_FFFF,
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    for k in levels() {
        for &n in LENGTHS {
            for mag in [0.0f32, 1e-40, 1e-30, 1.0, 1e30, 3e38] {
                let mut x = rng.vec(n, mag);
                for (i, v) in x.iter_mut().enumerate() {
                    if i % 3 == 0 {
                        *v = edges[(i / 3 + n) % edges.len()];
                    }
                }
                let (mut fast, mut slow) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
                k.narrow_bf16(&x, &mut fast);
                scalar::narrow_bf16(&x, &mut slow);
                // Bit for bit: one rounding rule at every level.
                let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "{} n={n} mag={mag}", k.isa());
            }
        }
    }
}

#[test]
fn fused_state_update_and_readout() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        fused_state_update_and_readout_at(k);
    }
}

fn fused_state_update_and_readout_at(k: Kernels) {
    let mut rng = TestRng(9);
    // d: register path (16, 64, 128) and the per-row fallback (odd, 144 > 128, 0); m odd too.
    for &(m, d) in &[
        (1, 16),
        (7, 64),
        (33, 128),
        (5, 17),
        (3, 144),
        (4, 0),
        (0, 64),
    ] {
        let (a, w, x) = (rng.vec(m, 2.0), rng.vec(m, 1.0), rng.vec(d, 3.0));
        for b in [1.0f32, 0.5] {
            let s0 = rng.vec(m * d, 50.0);
            let c0: Vec<bf16> = to_bf16(&rng.vec(m * d, 1e-6));
            let out0 = rng.vec(d, 1.0);
            let (mut s1, mut c1, mut o1) = (s0.clone(), c0.clone(), out0.clone());
            k.kahan_update_readout(b, &a, &x, &w, &mut s1, &mut c1, &mut o1);
            // Bit-identical to the unfused pair of kernels, row by row.
            let (mut s2, mut c2, mut o2) = (s0.clone(), c0.clone(), out0.clone());
            for f in 0..m {
                let r = f * d..(f + 1) * d;
                k.kahan_scale_axpy(b, a[f], &x, &mut s2[r.clone()], &mut c2[r.clone()]);
                k.axpy(w[f], &s2[r], &mut o2);
            }
            assert_eq!((&s1, &c1, &o1), (&s2, &c2, &o2), "m={m} d={d} b={b}");
            // And within f32 rounding of the f64 twin: |out| sums m terms of size ≤ ~100.
            let (mut s3, mut c3, mut o3) = (s0.clone(), c0.clone(), out0.clone());
            scalar::kahan_update_readout(b, &a, &x, &w, &mut s3, &mut c3, &mut o3);
            for i in 0..d {
                let tol = 1e-5 * (1.0 + 100.0 * m as f32);
                assert!((o1[i] - o3[i]).abs() <= tol, "m={m} d={d} out[{i}]");
            }
            for i in 0..m * d {
                let got = s1[i] as f64 - c1[i].to_f64();
                assert!((got - s3[i] as f64).abs() <= 1e-6 * (1.0 + s3[i].abs() as f64));
            }
        }
    }
}

#[test]
fn compensated_sums_match_f64_and_do_not_drift() {
    for k in levels() {
        // Shown with a failure of this level.
        eprintln!("level {}", k.isa());
        compensated_sums_match_f64_and_do_not_drift_at(k);
    }
}

fn compensated_sums_match_f64_and_do_not_drift_at(k: Kernels) {
    let mut rng = TestRng(6);
    // Against the f64 twin on odd lengths, with and without rescaling.
    for &n in LENGTHS {
        let x = rng.vec(n, 3.0);
        let (mut s1, mut c1) = (rng.vec(n, 100.0), vec![bf16::ZERO; n]);
        let (mut s2, mut c2) = (s1.clone(), vec![bf16::ZERO; n]);
        for (b, a) in [(1.0, 0.5), (0.25, -1.5), (1.0, 1e-3)] {
            k.kahan_scale_axpy(b, a, &x, &mut s1, &mut c1);
            scalar::kahan_scale_axpy(b, a, &x, &mut s2, &mut c2);
        }
        for i in 0..n {
            // s − c is the compensated value: within a few ulp of the f64 result.
            let got = s1[i] as f64 - c1[i].to_f64();
            assert!(
                (got - s2[i] as f64).abs() <= 1e-6 * (1.0 + s2[i].abs() as f64),
                "{n} {i}"
            );
        }
    }
    // A million additions of 1e-3 to 1: plain f32 drifts by ~5%; compensated stays within
    // 1e-6. The compensation is kept in bf16, so each addition loses up to 2⁻⁹ of it (≤ 2⁻³³
    // of the sum); with a constant addend those roundings repeat in one direction and add up
    // to 5.5e-7 here (8 ulp of f32 at 1001), the worst case. Kept in f32 it would be exact.
    let (mut plain, mut s, mut c) = ([1.0f32; 16], [1.0f32; 16], [bf16::ZERO; 16]);
    let x = [1e-3f32; 16];
    for _ in 0..1_000_000 {
        k.axpy(1.0, &x, &mut plain);
        k.kahan_scale_axpy(1.0, 1.0, &x, &mut s, &mut c);
    }
    let exact = 1.0 + 1e6 * 1e-3f32 as f64;
    assert!(
        (plain[0] as f64 - exact).abs() / exact > 1e-3,
        "plain f32 should drift here"
    );
    let drift = (s[0] as f64 - exact).abs() / exact;
    assert!(drift < 1e-6, "compensated: {} (drift {drift:e})", s[0]);
    // Addends of varying size, as a state's are: those roundings are not biased, so their
    // error is a random walk of √N steps of up to 2⁻⁹ · ulp/2, ~6e-8 relative at one σ here
    // (measured: at most 4.7e-8 over the 16 lanes, against 5.5e-5 for plain f32). Bound: 3σ.
    let mut rng = TestRng(7);
    let (mut s, mut c, mut exact) = ([1.0f32; 16], [bf16::ZERO; 16], [1.0f64; 16]);
    let mut plain = [1.0f32; 16];
    for _ in 0..1_000_000 {
        let x: Vec<f32> = rng.vec(16, 1e-3).iter().map(|v| v.abs()).collect();
        k.axpy(1.0, &x, &mut plain);
        k.kahan_scale_axpy(1.0, 1.0, &x, &mut s, &mut c);
        for (e, &v) in exact.iter_mut().zip(&x) {
            *e += v as f64;
        }
    }
    let drift = (0..16)
        .map(|i| (s[i] as f64 - c[i].to_f64() - exact[i]).abs() / exact[i])
        .fold(0.0, f64::max);
    let plain_drift = (0..16)
        .map(|i| (plain[i] as f64 - exact[i]).abs() / exact[i])
        .fold(0.0, f64::max);
    assert!(
        plain_drift > 1e-5,
        "plain f32 should drift here: {plain_drift:e}"
    );
    assert!(drift < 2e-7, "compensated, random addends: drift {drift:e}");
}

#[test]
fn scale_and_bias_match_scalar() {
    let mut rng = TestRng(11);
    for k in levels() {
        for &n in LENGTHS {
            for mag in [0.0f32, 1e-30, 1.0, 1e30] {
                let x = rng.vec(n, mag);
                let (mut fast, mut slow) = (x.clone(), x.clone());
                k.scale(-0.37, &mut fast);
                scalar::scale(-0.37, &mut slow);
                // One multiplication per element at every level: exactly equal.
                assert_eq!(fast, slow, "{} scale n={n} mag={mag}", k.isa());
                let b = rng.vec(n, 3.0);
                let bh: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
                let bb: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
                // One exact widening and one addition per element: exactly equal.
                let (mut fast, mut slow) = (x.clone(), x.clone());
                k.add_bias(&b, &mut fast);
                scalar::add_bias(&b, &mut slow);
                assert_eq!(fast, slow, "{} add_bias f32 n={n}", k.isa());
                k.add_bias(&bh, &mut fast);
                scalar::add_bias(&bh, &mut slow);
                assert_eq!(fast, slow, "{} add_bias f16 n={n}", k.isa());
                k.add_bias(&bb, &mut fast);
                scalar::add_bias(&bb, &mut slow);
                assert_eq!(fast, slow, "{} add_bias bf16 n={n}", k.isa());
            }
        }
    }
}

#[test]
fn levels_follow_the_cpu_features() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        let avx512 = avx2
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512cd")
            && has!("avx512dq")
            && has!("avx512vl");
        assert_eq!(Isa::Avx2.is_supported(), avx2);
        assert_eq!(Isa::Avx512.is_supported(), avx512);
        assert_eq!(Kernels::new(Isa::Avx512).is_some(), avx512);
    }
    assert!(Isa::Portable.is_supported());
    assert_eq!(
        Kernels::new(Isa::Portable).map(Kernels::isa),
        Some(Isa::Portable)
    );
    // Names round-trip; `scalar` is accepted for the portable level; anything else is an error.
    for isa in Isa::ALL {
        assert_eq!(Isa::parse(isa.name()).unwrap(), isa);
        assert_eq!(Isa::parse(&isa.name().to_uppercase()).unwrap(), isa);
    }
    assert_eq!(Isa::parse("scalar").unwrap(), Isa::Portable);
    for bad in ["", "avx", "sse2", "avx-512", "native"] {
        assert!(
            matches!(
                Isa::parse(bad),
                Err(performer::Error::InvalidParameter { .. })
            ),
            "{bad:?}"
        );
    }
}

/// The feature maps' projection through the transposed tiles against an f64 twin: feature
/// counts around the 32-feature tile and the 16-lane vector (a partial last tile, widths the
/// kernel takes by its scalar fallback), head widths odd and even, and zero, huge and tiny
/// inputs; a batch of vectors gives each one bit for bit what projecting it alone gives.
#[test]
fn feature_projection_matches_its_f64_twin_and_batches_bit_for_bit() {
    use performer::attention::{transposed_tiles, FeatureKind, FeatureMap};
    use performer::weights::View;
    let mut rng = TestRng(41);
    for (m, d) in [
        (1, 8),
        (5, 3),
        (31, 16),
        (32, 64),
        (33, 64),
        (37, 17),
        (64, 63),
        (266, 64),
    ] {
        let w = rng.vec(m * d, 1.0);
        let w_t = transposed_tiles(&View::F32(&w), m, d);
        let map = FeatureMap {
            kind: FeatureKind::Softmax { eps: 1e-4 },
            projection: View::F32(&w),
            projection_t: &w_t,
            m,
            d,
        };
        let c = (d as f64).powf(-0.25);
        for scale in [0.0f32, 1.0, 1e-30, 1e15] {
            let count = 3;
            let x = rng.vec(count * d, scale);
            let mut batch = vec![f32::NAN; count * m];
            map.project_batch(&x, count, &mut batch);
            for (i, xi) in x.chunks_exact(d).enumerate() {
                let mut one = vec![f32::NAN; m];
                map.project(xi, &mut one);
                assert!(
                    one.iter()
                        .zip(&batch[i * m..(i + 1) * m])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "m {m} d {d} scale {scale}: batched differs from single"
                );
                for f in 0..m {
                    let row = &w[f * d..(f + 1) * d];
                    let want: f64 = c * row
                        .iter()
                        .zip(xi)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>();
                    let mag: f64 = c * row
                        .iter()
                        .zip(xi)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum::<f64>();
                    // f32 sums of d products (two partial sums, then the scale by c): within
                    // d·ε of Σ|c·w·x|, 1e-5 for d ≤ 64 with room; a subnormal floor for the
                    // tiny inputs, whose products round to zero or subnormals in f32.
                    assert!(
                        (one[f] as f64 - want).abs() <= 1e-5 * mag + 1e-37,
                        "m {m} d {d} scale {scale} feature {f}: {} vs {want}",
                        one[f]
                    );
                }
            }
        }
    }
}

/// The many-rows product `y = x · Wᵀ` ([`sgemm::linear`]) against its scalar twin
/// ([`scalar::linear`], f64 sums) at every level, every weight dtype, on shapes around the
/// register tiles (12 × 32, 6 × 16, 4 × 16), across the packing depth (256) and large enough
/// to split across threads.
///
/// Tolerance: a sum of `k` products in f32, in any order and with or without fused
/// multiply-adds, is within `γ_k · Σ|x·w|` of the exact one (`γ_k = k·u / (1 − k·u)`,
/// `u = 2⁻²⁴`); the twin's f64 sum adds at most one rounding to f32. Products below f32's
/// normal range lose their relative precision, so `k` subnormal steps (2⁻¹⁴⁹ each) are allowed
/// on top.
#[test]
fn sgemm_matches_scalar_at_every_level() {
    use performer::kernels::sgemm;
    let shapes: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (2, 32, 3),
        (13, 37, 33),
        (12, 256, 32),
        (7, 257, 17),
        (37, 300, 65),
        (25, 520, 70),
        (66, 64, 97),
        (64, 512, 64),
        (130, 96, 200),
    ];
    let mut rng = TestRng(61);
    for k in levels() {
        for &(rows, depth, out) in shapes {
            for (xs, ws) in [
                (1.0, 1.0),
                (0.0, 1.0),
                (1e15, 1e15),
                (1e-20, 1e-18),
                (1.0, 3e4),
            ] {
                let x = rng.vec(rows * depth, xs);
                let w = rng.vec(out * depth, ws);
                let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                check_sgemm(k, &x, rows, &w, out);
                check_sgemm(k, &x, rows, &wb, out);
                // f16 tops out at 65504 (1e15 would be infinite; tiny values flush towards
                // its subnormals, which the twin sees widened the same way).
                if ws <= 3e4 {
                    check_sgemm(k, &x, rows, &wh, out);
                }
            }
        }
        // An empty product leaves its outputs zero; no rows or no outputs touch nothing.
        let mut y = vec![f32::NAN; 6];
        sgemm::linear::<f32>(k, &[], 3, &[], 2, &mut y);
        assert_eq!(y, [0.0; 6], "{} k = 0", k.isa());
        sgemm::linear::<f32>(k, &[], 0, &[], 2, &mut y[..0]);
    }
}

fn check_sgemm<T: Elem>(k: Kernels, x: &[f32], rows: usize, w: &[T], out: usize) {
    use performer::kernels::sgemm;
    let depth = x.len() / rows;
    let mut fast = vec![f32::NAN; rows * out];
    sgemm::linear(k, x, rows, w, out, &mut fast);
    let mut slow = vec![0f32; rows * out];
    scalar::linear(x, rows, w, out, &mut slow);
    let u = 2f64.powi(-24);
    let gamma = depth as f64 * u / (1.0 - depth as f64 * u);
    for i in 0..rows {
        for j in 0..out {
            let mag: f64 = (0..depth)
                .map(|t| (x[i * depth + t] as f64 * w[j * depth + t].to_f32() as f64).abs())
                .sum();
            let (a, b) = (fast[i * out + j] as f64, slow[i * out + j] as f64);
            let bound = gamma * mag + u * b.abs() + depth as f64 * 2f64.powi(-149);
            assert!(
                (a - b).abs() <= bound,
                "{} {} {rows}x{depth}x{out} ({i}, {j}): {a} vs {b} (bound {bound})",
                k.isa(),
                T::NAME
            );
        }
    }
}

/// Packing a panel of the many-rows product ([`Kernels::pack_panel`]: rows transposed into
/// `[kc][n]`) writes exactly the bits of its twin [`scalar::pack_panel`] at every level: panel
/// widths that are and are not a multiple of the x86 levels' 8 × 8 blocks, depths around the
/// blocks, rows longer than `kc` (only `kc` read), and arbitrary bit patterns (NaN payloads,
/// infinities, subnormals, negative zero) that a transposition must carry unchanged.
#[test]
fn pack_panel_matches_scalar_at_every_level() {
    let mut rng = TestRng(64);
    for k in levels() {
        for n in [1, 3, 6, 8, 12, 16, 24, 32] {
            for kc in [0, 1, 7, 8, 9, 15, 16, 17, 64, 255, 256] {
                let rows: Vec<Vec<f32>> = (0..n)
                    .map(|_| {
                        (0..kc + 5)
                            .map(|_| f32::from_bits(rng.next_u64() as u32))
                            .collect()
                    })
                    .collect();
                let rows: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
                // A longer destination: what lies past `kc · n` is left alone.
                let mut fast = vec![f32::from_bits(0x7fc0_dead); kc * n + 3];
                let mut slow = fast.clone();
                k.pack_panel(&rows, kc, &mut fast);
                scalar::pack_panel(&rows, kc, &mut slow);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "{} n {n} kc {kc}", k.isa());
                if n > 0 && kc > 0 {
                    assert_eq!(
                        slow[(kc - 1) * n + n - 1].to_bits(),
                        rows[n - 1][kc - 1].to_bits()
                    );
                }
            }
        }
    }
}

/// Every output of the many-rows product is one sum in one order whatever task computes it:
/// the same bits on 1, 2 and 3 threads, and from [`sgemm::linear_serial`].
#[test]
fn sgemm_split_across_threads_is_bit_identical() {
    use performer::kernels::sgemm;
    let mut rng = TestRng(62);
    for k in levels() {
        for &(rows, depth, out) in &[(64, 512, 64), (100, 300, 333), (257, 768, 96)] {
            let x = rng.vec(rows * depth, 1.0);
            let w: Vec<bf16> = rng
                .vec(out * depth, 1.0)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let mut serial = vec![0f32; rows * out];
            sgemm::linear_serial(k, &x, rows, &w, out, &mut serial);
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![0f32; rows * out];
                pool.install(|| sgemm::linear(k, &x, rows, &w, out, &mut y));
                assert_eq!(y, serial, "{} {rows}x{depth}x{out} on {threads}", k.isa());
            }
        }
    }
}

/// Quantized rows packed for the many-rows product are widened as `dequantize_rows` widens
/// them: the product equals, bit for bit, the float product over the dequantized matrix.
#[test]
fn sgemm_of_quantized_rows_is_the_dequantized_product() {
    use performer::kernels::sgemm;
    use performer::quant::{OwnedQMatrix, QuantFormat};
    let mut rng = TestRng(63);
    for k in levels() {
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
            for &(rows, depth, out) in &[(5, 32, 3), (70, 288, 45), (65, 544, 130)] {
                let w = rng.vec(out * depth, 1.0);
                let q = OwnedQMatrix::quantize(format, "w", &w, out, depth).unwrap();
                let m = q.matrix();
                let mut wide = vec![0f32; out * depth];
                m.dequantize_rows(0..out, &mut wide);
                let x = rng.vec(rows * depth, 1.0);
                let (mut yq, mut yf) = (vec![0f32; rows * out], vec![0f32; rows * out]);
                sgemm::linear_rows(k, &x, rows, m, out, &mut yq);
                sgemm::linear(k, &x, rows, &wide, out, &mut yf);
                assert_eq!(yq, yf, "{} {format} {rows}x{depth}x{out}", k.isa());
            }
        }
    }
}
