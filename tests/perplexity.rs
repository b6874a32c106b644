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

#[test]
fn position_buckets_boundaries_and_accounting() {
    use performer::perplexity::{PositionBuckets, POSITION_BUCKETS};
    // Each bucket's first and last position, and the next one.
    let cases = [
        (0, 0),
        (1, 0),
        (511, 0),
        (512, 1),
        (2047, 1),
        (2048, 2),
        (8191, 2),
        (8192, 3),
        (32767, 3),
        (32768, 4),
        (131071, 4),
        (131072, 5),
        (usize::MAX, 5),
    ];
    for (pos, bucket) in cases {
        assert_eq!(PositionBuckets::bucket_of(pos), bucket, "position {pos}");
    }
    assert_eq!(POSITION_BUCKETS.len(), 6);

    // A hand-computed case: NLLs in nats, so bucket bpb = mean / ln 2.
    let ln2 = std::f64::consts::LN_2;
    let mut b = PositionBuckets::new();
    b.add(1, 1.0, 1);
    b.add(511, 3.0, 1);
    // A token of two bytes (another tokenizer): its bits count over both.
    b.add(512, 4.0 * ln2, 2);
    b.add(200_000, 0.5, 1);
    assert_eq!(b.scored(), 4);
    let ne: Vec<_> = b.non_empty().collect();
    assert_eq!(ne.len(), 3, "the empty buckets are left out");
    assert_eq!(
        ne.iter().map(|s| s.label()).collect::<Vec<_>>(),
        ["0–511", "512–2k", "128k+"]
    );
    assert_eq!(
        (ne[0].scored, ne[0].nll_sum, ne[0].max_position),
        (2, 4.0, 511)
    );
    // Sums of a few exact doubles: the division by ln 2 is the only rounding.
    assert!((ne[0].bits_per_byte() - 2.0 / ln2).abs() < 1e-12);
    assert!((ne[1].bits_per_byte() - 2.0).abs() < 1e-12);
    assert_eq!((ne[1].scored, ne[1].bytes), (1, 2));
    assert_eq!((ne[2].start, ne[2].end, ne[2].scored), (131072, None, 1));
    assert_eq!(
        b.all().iter().map(|s| s.label()).collect::<Vec<_>>(),
        ["0–511", "512–2k", "2k–8k", "8k–32k", "32k–128k", "128k+"]
    );
}

#[test]
fn by_position_matches_direct_scoring_in_streams_and_windows() {
    use performer::perplexity::PositionBuckets;
    let model = Model::load(fixture("default_b")).unwrap();
    let mut rng = TestRng(7);
    // 5000 tokens: positions 1..4999 reach the 2k–8k bucket and cross a 4096-token read block.
    let bytes: Vec<u8> = (0..5000).map(|_| (rng.next_u64() % 256) as u8).collect();
    for window in [None, Some(700)] {
        // Direct: step token by token, keep every NLL with its context length.
        let mut state = State::new(&model);
        let mut expect = PositionBuckets::new();
        let mut prev: Option<Vec<f32>> = None;
        let mut context = 0usize;
        for (i, &b) in bytes.iter().enumerate() {
            if window.is_some_and(|w| i % w == 0) {
                state.reset();
            }
            if let Some(p) = &prev {
                expect.add(context, nll(p, b as u32), 1);
            }
            prev = Some(model.step(&mut state, b as u32).unwrap().to_vec());
            context = if window.is_some_and(|w| i % w == 0) {
                1
            } else {
                context + 1
            };
        }
        let opts = PerplexityOptions {
            max_tokens: None,
            window,
        };
        let r = evaluate(&model, &bytes[..], opts, |_| {}).unwrap();
        let (got, want) = (r.by_position.all(), expect.all());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(
                (g.scored, g.bytes, g.max_position),
                (w.scored, w.bytes, w.max_position),
                "{window:?} {}",
                g.label()
            );
            // Chunked and stepped logits agree to ~1e-6 relative (as in the test above).
            assert!(
                (g.nll_sum - w.nll_sum).abs() <= 1e-5 * w.nll_sum.abs().max(1.0),
                "{window:?} {}: {} vs {}",
                g.label(),
                g.nll_sum,
                w.nll_sum
            );
        }
        assert_eq!(r.by_position.scored(), r.scored);
        let total: f64 = got.iter().map(|s| s.nll_sum).sum();
        // The same NLLs summed in another order.
        assert!((total / r.scored as f64 - r.mean_nll).abs() < 1e-9 * r.mean_nll);
        let counts: Vec<usize> = got.iter().map(|s| s.scored).collect();
        match window {
            // Positions 1..=511, 512..=2047, 2048..=4999.
            None => assert_eq!(counts, [511, 1536, 2952, 0, 0, 0]),
            // 7 windows of 700 and one of 100: per full window positions 1..=511 (511) and
            // 512..=699 plus the next window's first token at 700 (189), except the last
            // window's 99 tokens all below 512.
            Some(_) => assert_eq!(counts, [7 * 511 + 99, 7 * 189, 0, 0, 0, 0]),
        }
    }
}
