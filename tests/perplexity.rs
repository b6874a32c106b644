//! Perplexity against a direct token-by-token computation.

mod common;

use common::{fixture, TestRng};
use performer::perplexity::{evaluate, nll, PerplexityOptions};
use performer::{Model, State};

fn direct(model: &Model, bytes: &[u8], window: Option<usize>) -> (usize, f64) {
    let mut state = State::new(model);
    let (mut scored, mut total) = (0, 0f64);
    let mut prev: Option<Vec<f32>> = None;
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(w) = window {
            if i % w == 0 {
                // PyTorch's windows: the previous window's logits score this token.
                state.reset();
            }
        }
        if let Some(p) = &prev {
            total += nll(p, b as u32);
            scored += 1;
        }
        prev = Some(model.step(&mut state, b as u32).unwrap().to_vec());
    }
    (scored, total / scored as f64)
}

#[test]
fn streaming_perplexity_matches_direct_scoring() {
    let model = Model::load(fixture("default_b")).unwrap();
    let mut rng = TestRng(61);
    // Longer than one 4096-token read block, so block and window boundaries both occur.
    let bytes: Vec<u8> = (0..5000).map(|_| (rng.next_u64() % 256) as u8).collect();
    for window in [None, Some(100), Some(64)] {
        let opts = PerplexityOptions {
            max_tokens: None,
            window,
        };
        let mut calls = 0;
        let r = evaluate(&model, &bytes[..], opts, |_| calls += 1).unwrap();
        let (scored, mean) = direct(&model, &bytes, window);
        assert_eq!(r.tokens, 5000);
        assert_eq!(r.scored, scored);
        assert_eq!(calls, 2);
        // Chunked and stepped logits agree to ~1e-6 relative; the mean NLL inherits that.
        assert!(
            (r.mean_nll - mean).abs() < 1e-5 * mean,
            "{window:?}: {} vs {mean}",
            r.mean_nll
        );
        assert!((r.bits_per_byte - mean / std::f64::consts::LN_2).abs() < 1e-4);
        assert!((r.perplexity - mean.exp()).abs() < 1e-3 * mean.exp());
    }
    let capped = evaluate(
        &model,
        &bytes[..],
        PerplexityOptions {
            max_tokens: Some(300),
            window: None,
        },
        |_| {},
    )
    .unwrap();
    assert_eq!((capped.tokens, capped.scored), (300, 299));
}

#[test]
fn perplexity_input_errors() {
    let model = Model::load(fixture("default_a")).unwrap();
    assert!(evaluate(&model, &b""[..], PerplexityOptions::default(), |_| {}).is_err());
    assert!(evaluate(&model, &b"x"[..], PerplexityOptions::default(), |_| {}).is_err());
    let w1 = PerplexityOptions {
        max_tokens: None,
        window: Some(1),
    };
    assert!(evaluate(&model, &b"abc"[..], w1, |_| {}).is_err());
}
