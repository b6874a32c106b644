//! Chunked prefill and batched decode against stepping one token at a time.

mod common;

use common::{fixture, max_diff, TestRng};
use performer::{Model, State};

const FIXTURES: &[&str] = &[
    "default_a",
    "default_b",
    "opt_relu_glu",
    "opt_rezero_shift",
    "opt_noproj",
    "opt_local",
    "opt_gelu_kernel",
];

fn scale_of(rows: &[Vec<f32>]) -> f32 {
    rows.iter().flatten().fold(1f32, |a, &b| a.max(b.abs()))
}

/// The chunkwise form regroups the same sums (matrix products instead of per-token rank-1
/// updates), so results agree to f32 rounding: 1e-5 × max(1, max |logit|), measured ≈ 1e-6.
#[test]
fn chunked_prefill_leaves_the_state_stepping_leaves() {
    let mut rng = TestRng(41);
    for name in FIXTURES {
        let model = Model::load(fixture(name)).unwrap();
        // Option fixtures stop at max_seq_len 64 only for absolute positions; these are rotary.
        for len in [1usize, 5, 63, 300] {
            let prompt = rng.tokens(len, 256);
            let after = rng.tokens(5, 256);
            let mut stepped = State::new(&model);
            let mut want = Vec::new();
            for &t in &prompt {
                want = model.step(&mut stepped, t).unwrap().to_vec();
            }
            let want_after: Vec<Vec<f32>> = after
                .iter()
                .map(|&t| model.step(&mut stepped, t).unwrap().to_vec())
                .collect();
            let scale = scale_of(&want_after).max(scale_of(std::slice::from_ref(&want)));
            for chunk in [1usize, 2, 7, 64, 256] {
                let mut st = State::new(&model);
                let got = model
                    .prefill_chunked(&mut st, &prompt, chunk)
                    .unwrap()
                    .to_vec();
                assert_eq!(st.position(), len);
                let d = max_diff(&got, &want);
                assert!(d <= 1e-5 * scale, "{name} len={len} chunk={chunk}: {d}");
                for (i, &t) in after.iter().enumerate() {
                    let got = model.step(&mut st, t).unwrap();
                    let d = max_diff(got, &want_after[i]);
                    assert!(
                        d <= 1e-5 * scale,
                        "{name} len={len} chunk={chunk}: continuation {i}: {d}"
                    );
                }
            }
        }
    }
}

/// Prompts longer than one row block (the projections run on up to 1024 rows, attention goes
/// chunk by chunk inside): every position's logits and the state left agree with stepping, for
/// chunk sizes that divide the block and one that does not (300: blocks of 900 rows).
#[test]
fn prefill_spanning_several_row_blocks() {
    let mut rng = TestRng(43);
    for name in ["default_b", "opt_local", "opt_rezero_shift"] {
        let model = Model::load(fixture(name)).unwrap();
        let prompt = rng.tokens(2500, 256);
        let next = rng.tokens(1, 256)[0];
        let mut stepped = State::new(&model);
        let want: Vec<Vec<f32>> = prompt
            .iter()
            .map(|&t| model.step(&mut stepped, t).unwrap().to_vec())
            .collect();
        let want_next = model.step(&mut stepped, next).unwrap().to_vec();
        let scale = scale_of(&want).max(scale_of(std::slice::from_ref(&want_next)));
        for chunk in [7usize, 256, 300] {
            let mut st = State::new(&model);
            let all = model.prefill_all_logits(&mut st, &prompt, chunk).unwrap();
            let vocab = model.vocab_size();
            for (t, row) in all.chunks(vocab).enumerate() {
                let d = max_diff(row, &want[t]);
                assert!(d <= 1e-5 * scale, "{name} chunk={chunk} position {t}: {d}");
            }
            let d = max_diff(model.step(&mut st, next).unwrap(), &want_next);
            assert!(d <= 1e-5 * scale, "{name} chunk={chunk} continuation: {d}");
        }
    }
}

#[test]
fn chunked_prefill_continues_an_existing_state() {
    let model = Model::load(fixture("default_b")).unwrap();
    let mut rng = TestRng(42);
    let (a, b) = (rng.tokens(37, 256), rng.tokens(29, 256));
    let mut chunked = State::new(&model);
    model.prefill_chunked(&mut chunked, &a, 16).unwrap();
    let got = model
        .prefill_chunked(&mut chunked, &b, 16)
        .unwrap()
        .to_vec();
    let mut stepped = State::new(&model);
    let mut want = Vec::new();
    for &t in a.iter().chain(&b) {
        want = model.step(&mut stepped, t).unwrap().to_vec();
    }
    assert!(max_diff(&got, &want) <= 1e-5 * scale_of(&[want.clone()]));
}

/// Batched decode groups the dense products and the feature projections of all rows and
/// heads, each output computed in the single-row dot product's order, and runs the same
/// per-sequence attention; so its logits are bit for bit those of stepping each sequence
/// alone, for every option fixture (rotary and axial positions, local heads, ReLU/GELU
/// kernels, no projection, a tied embedding, bf16 and f16 weights).
/// Nine rows, so that the register-tiled product runs (from 8 rows) with edge tiles.
#[test]
fn batched_decode_matches_stepping_each_alone() {
    let mut rng = TestRng(43);
    // Also a tied embedding (logits through the same few-rows kernel), axial positions and
    // half-precision weights.
    let more = [
        "opt_scalenorm_tie",
        "opt_axial",
        "default_a_bf16",
        "default_a_f16",
    ];
    for name in FIXTURES.iter().chain(&more) {
        let model = Model::load(fixture(name)).unwrap();
        let prompts: Vec<Vec<u32>> = [1usize, 4, 17, 9, 30, 2, 7, 12, 5]
            .iter()
            .map(|&n| rng.tokens(n, 256))
            .collect();
        let mut alone: Vec<State> = prompts
            .iter()
            .map(|p| {
                let mut s = State::new(&model);
                model.prefill(&mut s, p).unwrap();
                s
            })
            .collect();
        let mut batched: Vec<State> = alone.clone();
        for _ in 0..6 {
            let tokens = rng.tokens(prompts.len(), 256);
            let want: Vec<Vec<f32>> = alone
                .iter_mut()
                .zip(&tokens)
                .map(|(s, &t)| model.step(s, t).unwrap().to_vec())
                .collect();
            let mut refs: Vec<&mut State> = batched.iter_mut().collect();
            model.step_batch(&mut refs, &tokens).unwrap();
            for ((s, w), a) in batched.iter().zip(&want).zip(&alone) {
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
                assert!(
                    bits(s.logits().unwrap()) == bits(w),
                    "{name}: batched logits differ from stepping alone (max diff {})",
                    max_diff(s.logits().unwrap(), w)
                );
                assert_eq!(s.position(), a.position());
            }
        }
    }
}

#[test]
fn batch_and_chunk_arguments_are_checked() {
    let model = Model::load(fixture("default_a")).unwrap();
    let mut a = State::new(&model);
    let mut b = State::new(&model);
    assert!(model.step_batch(&mut [&mut a, &mut b], &[1]).is_err());
    assert!(model.step_batch(&mut [&mut a, &mut b], &[1, 999]).is_err());
    assert_eq!((a.position(), b.position()), (0, 0));
    assert!(model.prefill_chunked(&mut a, &[1, 2], 0).is_err());
    assert!(model.prefill_chunked(&mut a, &[], 4).is_err());
    model.step_batch(&mut [], &[]).unwrap();
}

/// A server ingests long prompts in pieces between decode ticks
/// ([`Model::prefill_slice_end`]); the pieces must leave bit for bit what one prefill of the
/// whole prompt leaves, at every length around the row blocks' ends (1024 tokens here) and
/// the few-rows threshold (64), for any piece size, f32 and quantized weights: same logits,
/// same continuation.
#[test]
fn prefill_in_server_slices_is_bit_for_bit_one_prefill() {
    let dir = std::env::temp_dir().join(format!("performer-slices-q8-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    performer::quant::quantize_dir(
        &fixture("default_a"),
        &dir,
        performer::quant::QuantFormat::Q8_0,
        |_, _| {},
    )
    .unwrap();
    let mut models: Vec<(String, Model)> = ["default_a", "opt_local", "opt_rezero_shift"]
        .iter()
        .map(|n| (n.to_string(), Model::load(fixture(n)).unwrap()))
        .collect();
    models.push(("default_a q8_0".into(), Model::load(&dir).unwrap()));
    let mut rng = TestRng(77);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // The logits a prefilled state holds, then those of stepping `after` from it.
    let logits_and_continuation = |model: &Model, st: &mut State, after: &[u32]| {
        std::iter::once(st.logits().unwrap().to_vec())
            .chain(after.iter().map(|&t| model.step(st, t).unwrap().to_vec()))
            .collect::<Vec<Vec<f32>>>()
    };
    for (name, model) in &models {
        assert_eq!(
            model.prefill_block_tokens(),
            1024,
            "{name}: the lengths below assume it"
        );
        for len in [
            1usize, 64, 65, 100, 256, 300, 321, 1024, 1025, 1088, 1089, 1100, 1300, 2113,
        ] {
            let prompt = rng.tokens(len, 256);
            let after = rng.tokens(3, 256);
            let mut whole = State::new(model);
            model.prefill(&mut whole, &prompt).unwrap();
            let want = logits_and_continuation(model, &mut whole, &after);
            // 64 and 100: two chunks (a piece of one would take the few-rows product);
            // 192: three chunks, whose last piece of a row block would end 64 short of it.
            for max in [1usize, 64, 100, 192, 256, 300, 1024, 5000] {
                let mut st = State::new(model);
                let (mut done, mut pieces) = (0, 0);
                while done < len {
                    let end = model.prefill_slice_end(done, len, max);
                    assert!(
                        end > done && end - done <= max.max(128) + 64,
                        "{name} {len} {max}"
                    );
                    model.prefill(&mut st, &prompt[done..end]).unwrap();
                    (done, pieces) = (end, pieces + 1);
                }
                assert_eq!(model.prefill_slice_end(len, len, max), len);
                let got = logits_and_continuation(model, &mut st, &after);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        bits(g),
                        bits(w),
                        "{name} len {len} max {max} ({pieces} pieces): logits {i} differ"
                    );
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
