//! The streaming decoder against itself and the reference: stepping one token at a time,
//! prefill, and the full-sequence reference must agree; the state never grows.

mod common;

use common::{fixture, max_diff, TestRng};
use performer::{Error, LoadOptions, Model, State};

fn load(name: &str, eps0: bool) -> Model {
    let opts = if eps0 {
        LoadOptions {
            kernel_eps: Some(0.0),
            denominator_eps: Some(0.0),
            huge_pages: false,
            quant_kernel: None,
            no_packed_rows: false,
        }
    } else {
        LoadOptions::default()
    };
    Model::load_with(fixture(name), opts).unwrap()
}

/// Step, prefill and the reference agree within 1e-5 × max(1, max |logit|): the three differ
/// only in summation order and precision (the reference sums in f64), so the gap is f32
/// rounding, measured ≈ 1e-6 relative.
#[test]
fn step_prefill_and_reference_agree() {
    let mut rng = TestRng(11);
    for name in [
        "default_a",
        "default_b",
        "opt_relu_glu",
        "opt_scalenorm_tie",
        "opt_rezero_shift",
        "opt_noproj",
        "opt_local",
        "opt_axial",
        "opt_gelu_kernel",
    ] {
        for eps0 in [false, true] {
            let model = load(name, eps0);
            // Option fixtures have max_seq_len 64; 40 spans several local windows (w = 16).
            for len in [1usize, 2, 37, 40] {
                let tokens = rng.tokens(len, 256);
                let reference = model.forward_reference(&tokens).unwrap();
                let mut state = State::new(&model);
                let scale = reference
                    .iter()
                    .flatten()
                    .fold(1f32, |a, &b| a.max(b.abs()));
                for (t, &tok) in tokens.iter().enumerate() {
                    let logits = model.step(&mut state, tok).unwrap();
                    let d = max_diff(logits, &reference[t]);
                    assert!(d <= 1e-5 * scale, "{name} eps0={eps0} len={len} t={t}: {d}");
                }
                let stepped = state.logits().unwrap().to_vec();
                let mut fresh = State::new(&model);
                let prefilled = model.prefill(&mut fresh, &tokens).unwrap().to_vec();
                assert_eq!(fresh.position(), len);
                // Chunked prefill regroups the same sums: f32 rounding, same bound.
                let d = max_diff(&prefilled, &stepped);
                assert!(
                    d <= 1e-5 * scale,
                    "{name}: prefill differs from stepping by {d}"
                );
            }
        }
    }
}

#[test]
fn prefill_leaves_the_state_stepping_leaves() {
    let model = load("default_b", false);
    let mut rng = TestRng(12);
    let prompt = rng.tokens(29, 256);
    let continuation = rng.tokens(9, 256);
    let mut a = State::new(&model);
    let mut b = State::new(&model);
    model.prefill(&mut a, &prompt).unwrap();
    for &t in &prompt {
        model.step(&mut b, t).unwrap();
    }
    for &t in &continuation {
        let la = model.step(&mut a, t).unwrap().to_vec();
        let lb = model.step(&mut b, t).unwrap().to_vec();
        // Chunked prefill regroups the same sums: f32 rounding (1e-5 relative).
        let scale = lb.iter().fold(1f32, |m, &x| m.max(x.abs()));
        assert!(max_diff(&la, &lb) <= 1e-5 * scale);
    }
}

#[test]
fn state_size_is_constant_over_ten_thousand_tokens() {
    let model = load("default_a", false);
    let mut rng = TestRng(13);
    let mut state = State::new(&model);
    let at_start = state.size_bytes();
    model.prefill(&mut state, &rng.tokens(10, 256)).unwrap();
    let after_10 = state.size_bytes();
    // Past max_seq_len (128): rotary models run without a length limit.
    model.prefill(&mut state, &rng.tokens(9_990, 256)).unwrap();
    assert_eq!(state.position(), 10_000);
    assert_eq!(after_10, at_start);
    assert_eq!(state.size_bytes(), after_10);
    assert!(state.logits().unwrap().iter().all(|v| v.is_finite()));
    // A, a, s and M in f32, the Kahan compensations of A, a, s in bf16, per layer and head:
    // depth 2 × heads 2 × ((110·32 + 110 + 32 + 1) · 4 + (110·32 + 110 + 32) · 2) bytes.
    assert_eq!(
        state.attention_bytes(),
        2 * 2 * ((110 * 32 + 110 + 32 + 1) * 4 + (110 * 32 + 110 + 32) * 2)
    );
}

#[test]
fn reset_returns_to_a_fresh_state() {
    let model = load("default_a", false);
    let tokens = [5u32, 200, 31, 7];
    let mut state = State::new(&model);
    let first = model.prefill(&mut state, &tokens).unwrap().to_vec();
    model.prefill(&mut state, &[1, 2, 3]).unwrap();
    state.reset();
    assert_eq!(state.position(), 0);
    assert!(state.logits().is_none());
    assert_eq!(model.prefill(&mut state, &tokens).unwrap(), &first[..]);
}

#[test]
fn bad_tokens_and_empty_input_are_errors_that_leave_the_state_alone() {
    let model = load("default_a", false);
    let mut state = State::new(&model);
    model.prefill(&mut state, &[1, 2]).unwrap();
    let before = state.logits().unwrap().to_vec();
    assert!(matches!(
        model.step(&mut state, 256),
        Err(Error::TokenOutOfRange {
            token: 256,
            vocab: 256
        })
    ));
    assert!(matches!(
        model.prefill(&mut state, &[3, 4, u32::MAX]),
        Err(Error::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        model.prefill(&mut state, &[]),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        model.forward_reference(&[]),
        Err(Error::EmptyInput(_))
    ));
    assert_eq!(state.position(), 2);
    assert_eq!(state.logits().unwrap(), &before[..]);
}

#[test]
fn a_state_only_runs_with_a_model_of_its_shape() {
    let a = load("default_a", false);
    let b = load("default_b", false);
    let mut state = State::new(&a);
    assert!(matches!(
        b.step(&mut state, 1),
        Err(Error::StateMismatch(_))
    ));
}

#[test]
fn model_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    assert_send_sync::<State>();
}

#[test]
fn absolute_and_axial_positions_end_at_max_seq_len_rotary_does_not() {
    for name in ["opt_scalenorm_tie", "opt_axial"] {
        let model = load(name, false);
        let mut state = State::new(&model);
        model.prefill(&mut state, &[7; 64]).unwrap();
        let before = state.logits().unwrap().to_vec();
        match model.step(&mut state, 7) {
            Err(Error::PositionOutOfRange {
                max_seq_len: 64, ..
            }) => {}
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(state.position(), 64);
        assert_eq!(state.logits().unwrap(), &before[..]);
        let mut fresh = State::new(&model);
        assert!(matches!(
            model.prefill(&mut fresh, &[7; 65]),
            Err(Error::PositionOutOfRange { .. })
        ));
        assert_eq!(
            fresh.position(),
            0,
            "{name}: a rejected prefill must not advance"
        );
    }
    // Rotary with local heads and token shift: no limit, bounded memory.
    for name in ["opt_local", "opt_rezero_shift", "opt_noproj"] {
        let model = load(name, false);
        let mut state = State::new(&model);
        let size = state.size_bytes();
        let mut rng = TestRng(14);
        model.prefill(&mut state, &rng.tokens(1000, 256)).unwrap();
        assert_eq!(state.size_bytes(), size);
        assert!(state.logits().unwrap().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn vector_rotary_rows_match_the_scalar_twin() {
    use performer::attention::rotary::Sinusoid;
    // Both reduce the angle the same way and evaluate sin/cos to ~1 ulp in f64 (wide's f64x4
    // polynomial vs libm), so after rounding to f32 they may differ by one f32 ulp at most
    // (≤ 6e-8 for values in [−1, 1]) where the f64 results straddle a rounding boundary.
    // Half-widths 1, 3, 4, 5, 32 cover no vector block, a block with no tail, and tails.
    for dim in [2usize, 6, 8, 10, 64] {
        let (mut fast, mut slow) = (vec![0f32; dim], vec![0f32; dim]);
        for pos in [
            0usize,
            1,
            2,
            7,
            1023,
            1024,
            65_537,
            1 << 20,
            10_000_019,
            usize::MAX >> 12,
        ] {
            Sinusoid::formula(dim, pos, &mut fast);
            Sinusoid::formula_scalar(dim, pos, &mut slow);
            for i in 0..dim {
                assert!(
                    (fast[i] - slow[i]).abs() <= 6e-8,
                    "dim {dim} pos {pos} i {i}: {} vs {}",
                    fast[i],
                    slow[i]
                );
                assert!(fast[i].abs() <= 1.0);
            }
        }
    }
}

#[test]
fn rotary_rows_past_the_table_match_the_unreduced_formula() {
    use performer::attention::rotary::Sinusoid;
    // The angle is reduced modulo 2π before sin/cos; the result must stay within f32 rounding
    // (6e-8) plus the reduction's f64 error (~1e-10 rad at a million positions) of the
    // direct f64 evaluation.
    let dim = 64;
    let mut out = vec![0f32; dim];
    for pos in [0usize, 1, 63, 1000, 123_457, 1 << 20, 10_000_019] {
        Sinusoid::formula(dim, pos, &mut out);
        for i in 0..dim / 2 {
            let w = 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64);
            let a = pos as f64 * w;
            assert!(
                (out[i] as f64 - a.sin()).abs() <= 2e-7,
                "sin pos {pos} i {i}"
            );
            assert!(
                (out[dim / 2 + i] as f64 - a.cos()).abs() <= 2e-7,
                "cos pos {pos} i {i}"
            );
        }
    }
}
