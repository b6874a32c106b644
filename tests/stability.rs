//! Long-run stability: the f64-accumulator state as a reference for the f32 one, and (behind
//! `--ignored`) the million-token soak whose drift curve docs/numerical-stability.md reports.

mod common;

use common::{fixture, max_diff, TestRng};
use performer::{Error, Model, Precision, State};

fn rel(a: &[f32], b: &[f32]) -> f32 {
    max_diff(a, b) / b.iter().fold(1f32, |m, &x| m.max(x.abs()))
}

#[test]
fn f64_state_matches_f32_state_and_reference() {
    let mut rng = TestRng(71);
    for name in ["default_a", "opt_noproj", "opt_relu_glu", "opt_local"] {
        let model = Model::load(fixture(name)).unwrap();
        let tokens = rng.tokens(60, 256);
        let reference = model.forward_reference(&tokens).unwrap();
        let mut s32 = State::new(&model);
        let mut s64 = State::with_precision(&model, Precision::F64);
        assert_eq!(s64.precision(), Precision::F64);
        for (t, &tok) in tokens.iter().enumerate() {
            let a = model.step(&mut s32, tok).unwrap().to_vec();
            let b = model.step(&mut s64, tok).unwrap().to_vec();
            // Both agree with the f64 reference to f32 rounding of the projections.
            assert!(rel(&b, &reference[t]) <= 1e-5, "{name} t={t}");
            assert!(rel(&a, &b) <= 1e-5, "{name} t={t}");
        }
        // Prefill of an f64 state steps token by token: identical to stepping.
        let mut p64 = State::with_precision(&model, Precision::F64);
        let l = model.prefill(&mut p64, &tokens).unwrap().to_vec();
        assert_eq!(&l[..], s64.logits().unwrap());
        // The f64 state is a measurement tool: no snapshots, no batches, no chunks.
        assert!(s64.to_bytes(&model).is_err());
        assert!(matches!(
            model.step_batch(&mut [&mut s64], &[1]),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(model.prefill_chunked(&mut s64, &[1], 4).is_err());
        s64.reset();
        assert_eq!(s64.position(), 0);
    }
}

/// Streams `PERFORMER_SOAK_TOKENS` (default 1,000,000) random tokens through a model with an
/// f32 and an f64 state side by side and prints the drift curve: the maximum over each
/// interval of max|logits_f32 − logits_f64| / max(1, max|logits_f64|). Run with
/// `cargo test --release --test stability -- --ignored --nocapture` (tens of minutes).
fn soak(dir: &std::path::Path) {
    let n: usize = std::env::var("PERFORMER_SOAK_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let model = Model::load(dir).unwrap();
    let mut rng = TestRng(72);
    let mut s32 = State::new(&model);
    let mut s64 = State::with_precision(&model, Precision::F64);
    let size = s32.size_bytes();
    let mut worst = 0f32;
    let mut checkpoint = 1000;
    let start = std::time::Instant::now();
    println!(
        "{}: position, max relative drift so far, seconds",
        dir.display()
    );
    // Text-like input: mostly a small alphabet, sometimes any byte.
    for t in 0..n {
        let tok = if rng.next_u64().is_multiple_of(8) {
            (rng.next_u64() % 256) as u32
        } else {
            97 + (rng.next_u64() % 26) as u32
        };
        let a = model.step(&mut s32, tok).unwrap();
        assert!(a.iter().all(|x| x.is_finite()), "non-finite logits at {t}");
        let a = a.to_vec();
        let b = model.step(&mut s64, tok).unwrap();
        worst = worst.max(rel(&a, b));
        if t + 1 == checkpoint || t + 1 == n {
            println!(
                "{:>9} {:.3e} {:.0}",
                t + 1,
                worst,
                start.elapsed().as_secs_f64()
            );
            checkpoint *= 10;
        }
    }
    assert_eq!(s32.size_bytes(), size);
    assert!(worst <= 1e-3, "drift {worst} exceeds 1e-3");
}

#[test]
#[ignore = "soak test: a million tokens, tens of minutes in release mode"]
fn million_tokens_shipped_model() {
    soak(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/performer-byte"));
}

#[test]
#[ignore = "soak test: a million tokens, minutes in release mode"]
fn million_tokens_fixture_model() {
    soak(&fixture("default_b"));
}

/// A copy of a fixture with scaled weights: keys and queries ×`qk`, values ×`v`, so feature
/// projections reach hundreds and the running max `M` jumps often.
fn scaled_fixture(name: &str, qk: f32, v: f32) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(name).join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let factor = if name.ends_with("to_q.weight") || name.ends_with("to_k.weight") {
            qk
        } else if name.ends_with("to_v.weight") {
            v
        } else {
            1.0
        };
        let data: Vec<u8> = if view.dtype() == safetensors::Dtype::F32 {
            view.data()
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * factor).to_le_bytes())
                .collect()
        } else {
            view.data().to_vec()
        };
        owned.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    tmp
}

#[test]
fn large_activations_stay_finite_and_exact() {
    // Keys and queries ×8 make feature projections of O(100): the running max must keep exp
    // in range and the result must still match the f64 reference.
    let dir = scaled_fixture("default_a", 8.0, 5.0);
    let model = Model::load(dir.path()).unwrap();
    let mut rng = TestRng(73);
    let tokens = rng.tokens(80, 256);
    let reference = model.forward_reference(&tokens).unwrap();
    let mut s = State::new(&model);
    for (t, &tok) in tokens.iter().enumerate() {
        let l = model.step(&mut s, tok).unwrap();
        // Larger activations amplify f32 rounding of the projections: 1e-4 relative.
        assert!(
            rel(l, &reference[t]) <= 1e-4,
            "t={t}: {}",
            rel(l, &reference[t])
        );
    }
}

#[test]
#[ignore = "soak test: a million tokens with large activations, minutes in release mode"]
fn million_tokens_large_activations() {
    let dir = scaled_fixture("default_b", 8.0, 5.0);
    soak(dir.path());
}
