//! The exact-softmax baseline (a benchmark and accuracy reference).

mod common;

use common::{fixture, max_diff, TestRng};

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| m.max(v.abs()))
}

#[test]
fn chunked_prefill_equals_stepping() {
    // Local heads, token shift, axial positions and the default shapes cover every branch of
    // the chunk path; the rotary models also run 300 tokens through the default 256-token
    // chunks (the axial one stops at its max_seq_len of 64).
    let cases = [
        ("default_b", 300, 256),
        ("default_b", 61, 7),
        ("opt_local", 300, 256),
        ("opt_local", 50, 1),
        ("opt_rezero_shift", 300, 256),
        ("opt_rezero_shift", 63, 2),
        ("opt_axial", 63, 16),
    ];
    for (name, n, chunk) in cases {
        let model = Model::load(fixture(name)).unwrap();
        let mut rng = TestRng(7);
        let tokens = rng.tokens(n, model.vocab_size() as u32);
        let next = rng.tokens(1, model.vocab_size() as u32)[0];
        let mut chunked = SoftmaxSession::new(&model);
        let a = chunked.prefill_chunked(&tokens, chunk).unwrap().to_vec();
        let mut stepped = SoftmaxSession::new(&model);
        let mut b = Vec::new();
        for &t in &tokens {
            b = stepped.step(t).unwrap().to_vec();
        }
        assert_eq!(chunked.position(), n);
        assert_eq!(chunked.size_bytes(), stepped.size_bytes(), "{name}");
        // The projections run through gemm instead of the matrix-vector kernel: a different
        // summation order, f32 rounding amplified through the layers — the bound of the FAVOR+
        // chunked-prefill tests.
        let tol = 1e-5 * max_abs(&b).max(1.0);
        assert!(
            max_diff(&a, &b) <= tol,
            "{name}/{chunk}: {}",
            max_diff(&a, &b)
        );
        // The caches they leave continue alike.
        let a = chunked.step(next).unwrap().to_vec();
        let b = stepped.step(next).unwrap().to_vec();
        assert!(max_diff(&a, &b) <= tol, "{name} next: {}", max_diff(&a, &b));
    }
}

#[test]
fn prefill_rejects_bad_input_without_change() {
    let model = Model::load(fixture("default_a")).unwrap();
    let mut s = SoftmaxSession::new(&model);
    assert!(s.prefill(&[]).is_err());
    assert!(s.prefill(&[1, 2, 100_000]).is_err());
    assert!(s.prefill_chunked(&[1, 2], 0).is_err());
    assert_eq!(s.position(), 0);
    let before = s.size_bytes();
    s.prefill(&[1, 2, 3]).unwrap();
    assert!(s.size_bytes() > before);
}

#[test]
fn a_cache_that_cannot_grow_is_an_error_not_an_abort() {
    let model = Model::load(fixture("default_a")).unwrap();
    let mut s = SoftmaxSession::new(&model);
    let logits = s.prefill(&[1, 2, 3]).unwrap().to_vec();
    let (pos, size) = (s.position(), s.size_bytes());
    // No allocator can give a cache for this many positions (elements overflow isize).
    for tokens in [usize::MAX / 2, usize::MAX / 64, 1 << 58] {
        match s.reserve(tokens) {
            Err(performer::Error::OutOfMemory { what, bytes }) => {
                assert!(what.contains("key/value cache"));
                assert!(bytes >= tokens, "{bytes} for {tokens} tokens");
            }
            other => panic!("{tokens} tokens: {other:?}"),
        }
        assert_eq!((s.position(), s.size_bytes()), (pos, size));
    }
    // Still usable, and a reasonable reservation is fine: it changes no result.
    s.reserve(1000).unwrap();
    let mut fresh = SoftmaxSession::new(&model);
    fresh.prefill(&[1, 2, 3]).unwrap();
    assert_eq!(fresh.step(9).unwrap(), s.step(9).unwrap());
    assert_eq!(logits.len(), model.vocab_size());
}
use performer::baseline::{attend_head, SoftmaxSession};
use performer::{LoadOptions, Model, State};

#[test]
fn attend_head_matches_f64_softmax_attention() {
    let mut rng = TestRng(51);
    // One head: the contiguous (decoder) layout; several: keys interleaved by head.
    for &(n, d, heads) in &[
        (1usize, 8usize, 1usize),
        (33, 17, 1),
        (257, 64, 1),
        (5, 16, 3),
        (300, 64, 2),
    ] {
        let w = d * heads;
        let keys = rng.vec(n * w, 2.0);
        let values = rng.vec(n * w, 1.0);
        for hd in 0..heads {
            let q = rng.vec(d, 2.0);
            let mut scores = vec![0.0; n];
            let mut out = vec![0.0; d];
            attend_head(&q, &keys, &values, w, hd * d, &mut scores, &mut out);
            let s: Vec<f64> = (0..n)
                .map(|j| {
                    (0..d)
                        .map(|i| q[i] as f64 * keys[j * w + hd * d + i] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let tot: f64 = e.iter().sum();
            for i in 0..d {
                let want: f64 = (0..n)
                    .map(|j| e[j] / tot * values[j * w + hd * d + i] as f64)
                    .sum();
                // f32 scores and weights over ≤ 300 keys: 1e-5 absolute on O(1) outputs.
                assert!((out[i] as f64 - want).abs() < 1e-5, "n={n} d={d}");
            }
        }
    }
}

#[test]
fn first_position_equals_favor_and_the_cache_grows() {
    // With one key, both attentions return its value exactly (FAVOR+ with ε = δ = 0).
    let model = Model::load_with(
        fixture("default_a"),
        LoadOptions {
            kernel_eps: Some(0.0),
            denominator_eps: Some(0.0),
            huge_pages: false,
            quant_kernel: None,
            no_packed_rows: false,
        },
    )
    .unwrap();
    let mut favor = State::new(&model);
    let mut soft = SoftmaxSession::new(&model);
    let a = model.step(&mut favor, 42).unwrap().to_vec();
    let b = soft.step(42).unwrap().to_vec();
    let scale = a.iter().fold(1f32, |m, &x| m.max(x.abs()));
    // Same kernels except the attention's arithmetic: f32 rounding.
    assert!(max_diff(&a, &b) <= 1e-5 * scale);
    let size1 = soft.size_bytes();
    let mut rng = TestRng(52);
    let tokens = rng.tokens(99, 256);
    let last = soft.prefill(&tokens).unwrap().to_vec();
    assert_eq!(soft.position(), 100);
    assert!(
        soft.size_bytes() > size1,
        "the softmax cache grows with the context"
    );
    // The chunked prefill leaves what stepping leaves (see the test below for the bound).
    let mut again = SoftmaxSession::new(&model);
    again.step(42).unwrap();
    let mut l = Vec::new();
    for &t in &tokens {
        l = again.step(t).unwrap().to_vec();
    }
    assert!(max_diff(&l, &last) <= 1e-5 * scale.max(max_abs(&l)));
    // FAVOR+ approximates softmax attention: different, but the same order of magnitude.
    let f = model.prefill(&mut favor, &tokens).unwrap();
    assert_ne!(f, &last[..]);
}
