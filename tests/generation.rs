//! Sampling, UTF-8-safe streaming and the generation loop.

mod common;

use common::{fixture, TestRng};
use performer::sampling::{Sampler, SamplingParams};
use performer::tokenizer::Utf8Stream;
use performer::{Error, GenerateOptions, Generation, Model, State};

fn model() -> Model {
    Model::load(fixture("default_a")).unwrap()
}

fn run(model: &Model, prompt: &str, options: GenerateOptions) -> (String, Vec<u32>) {
    let mut state = State::new(model);
    let prompt: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let mut g = Generation::new(model, &mut state, &prompt, options).unwrap();
    let text: String = g.by_ref().map(|p| p.unwrap()).collect();
    (text, g.tokens()[prompt.len()..].to_vec())
}

#[test]
fn decoding_in_a_pool_of_its_own_changes_nothing() {
    let m = model();
    let opts = |decode_threads| GenerateOptions {
        max_tokens: 30,
        sampling: SamplingParams {
            temperature: 0.8,
            seed: 5,
            ..SamplingParams::default()
        },
        decode_threads,
        ..GenerateOptions::default()
    };
    let (text, tokens) = run(&m, "The ", opts(None));
    for n in [1, 2, 3] {
        assert_eq!(
            run(&m, "The ", opts(Some(n))),
            (text.clone(), tokens.clone())
        );
    }
    let mut state = State::new(&m);
    assert!(matches!(
        Generation::new(&m, &mut state, &[1, 2], opts(Some(0))),
        Err(Error::InvalidParameter { .. })
    ));
    // One caller-owned pool shared by several generations, one after another and at once.
    let pool = std::sync::Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap(),
    );
    let shared = || GenerateOptions {
        decode_pool: Some(pool.clone()),
        ..opts(None)
    };
    for _ in 0..2 {
        assert_eq!(run(&m, "The ", shared()), (text.clone(), tokens.clone()));
    }
    let together: Vec<(String, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| run(&m, "The ", shared())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(together
        .iter()
        .all(|r| *r == (text.clone(), tokens.clone())));
    // Both ways of choosing the decode threads at once is an error, not a silent choice.
    let both = GenerateOptions {
        decode_threads: Some(2),
        ..shared()
    };
    assert!(matches!(
        Generation::new(&m, &mut state, &[1, 2], both),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn same_seed_same_text_other_seed_other_text() {
    let m = model();
    let opts = |seed| GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams {
            temperature: 1.0,
            seed,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    let (a, ta) = run(&m, "abc", opts(7));
    let (b, tb) = run(&m, "abc", opts(7));
    let (_, tc) = run(&m, "abc", opts(8));
    assert_eq!(a, b);
    assert_eq!(ta, tb);
    assert_eq!(ta.len(), 40);
    assert_ne!(ta, tc);
}

#[test]
fn greedy_picks_the_argmax_and_top_k_1_is_greedy() {
    let m = model();
    let greedy = GenerateOptions {
        max_tokens: 20,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let (_, tokens) = run(&m, "xyz", greedy.clone());
    // Check each greedy choice against the argmax of a fresh stream.
    let mut state = State::new(&m);
    let mut logits = m.prefill(&mut state, &[120, 121, 122]).unwrap().to_vec();
    for &t in &tokens {
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(t as usize, best);
        logits = m.step(&mut state, t).unwrap().to_vec();
    }
    let top1 = GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.5,
            top_k: Some(1),
            seed: 99,
            ..SamplingParams::default()
        },
        ..greedy
    };
    assert_eq!(run(&m, "xyz", top1).1, tokens);
}

#[test]
fn max_tokens_zero_generates_nothing_and_stop_strings_cut() {
    let m = model();
    let (text, tokens) = run(
        &m,
        "hi",
        GenerateOptions {
            max_tokens: 0,
            ..GenerateOptions::default()
        },
    );
    assert!(text.is_empty() && tokens.is_empty());

    // Find a greedy continuation, then stop at a piece of it.
    let greedy = GenerateOptions {
        max_tokens: 60,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let (_, full_tokens) = run(&m, "hi", greedy.clone());
    let full = String::from_utf8_lossy(&full_tokens.iter().map(|&t| t as u8).collect::<Vec<u8>>())
        .into_owned();
    let chars: Vec<char> = full.chars().collect();
    assert!(
        chars.len() >= 12,
        "60 bytes decode to at least 15 characters"
    );
    {
        let stop: String = chars[8..11].iter().collect();
        let (cut, _) = run(
            &m,
            "hi",
            GenerateOptions {
                stop: vec![stop.clone()],
                ..greedy
            },
        );
        let at = full.find(&stop).unwrap();
        assert_eq!(cut, full[..at]);
    }
}

#[test]
fn utf8_stream_never_splits_characters_and_matches_lossy_decoding() {
    let mut rng = TestRng(21);
    let samples: Vec<Vec<u8>> = vec![
        "héllo wörld — ✓ 🎉".as_bytes().to_vec(),
        vec![0xF0, 0x9F, 0x8E],       // truncated emoji
        vec![0xC3, 0x28, 0xA0, 0xA1], // invalid continuation
        vec![0xE2, 0x82, 0xAC, 0xFF, b'a'],
    ];
    let random: Vec<Vec<u8>> = (0..200)
        .map(|_| {
            (0..rng.next_u64() % 40)
                .map(|_| rng.next_u64() as u8)
                .collect()
        })
        .collect();
    for bytes in samples.iter().chain(&random) {
        let mut s = Utf8Stream::default();
        let mut out = String::new();
        for &b in bytes {
            let piece = s.push(b);
            out.push_str(&piece);
        }
        out.push_str(&s.finish());
        assert_eq!(out, String::from_utf8_lossy(bytes), "{bytes:?}");
    }
}

#[test]
fn generation_pieces_are_whole_characters() {
    // Every piece is a &str by construction; check that multi-byte output from random sampling
    // decodes the same piecewise as whole.
    let m = model();
    let mut state = State::new(&m);
    let opts = GenerateOptions {
        max_tokens: 200,
        sampling: SamplingParams {
            temperature: 2.0,
            top_k: None,
            top_p: None,
            seed: 3,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    let mut g = Generation::new(&m, &mut state, &[104, 105], opts).unwrap();
    let pieces: Vec<String> = g.by_ref().map(|p| p.unwrap()).collect();
    let bytes: Vec<u8> = g.tokens()[2..].iter().map(|&t| t as u8).collect();
    assert_eq!(pieces.concat(), String::from_utf8_lossy(&bytes));
}

#[test]
fn invalid_sampling_parameters_are_errors() {
    let bad = [
        SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_k: Some(0),
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: Some(0.0),
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: Some(1.5),
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: -2.0,
            ..SamplingParams::default()
        },
    ];
    for p in bad {
        assert!(matches!(
            Sampler::new(p),
            Err(Error::InvalidParameter { .. })
        ));
    }
    let m = model();
    let mut state = State::new(&m);
    let empty = Generation::new(&m, &mut state, &[], GenerateOptions::default());
    assert!(matches!(empty, Err(Error::EmptyInput(_))));
    let stop = GenerateOptions {
        stop: vec![String::new()],
        ..GenerateOptions::default()
    };
    assert!(Generation::new(&m, &mut state, &[1], stop).is_err());
}

#[test]
fn sampler_rejects_non_finite_logits_and_applies_penalty() {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    assert!(matches!(
        s.sample(&[0.0, f32::NAN, 1.0], &[]),
        Err(Error::NonFiniteLogits { .. })
    ));
    assert_eq!(s.sample(&[0.0, 2.0, 1.9], &[]).unwrap(), 1);
    let mut p = Sampler::new(SamplingParams {
        repetition_penalty: 1.2,
        ..SamplingParams::greedy()
    })
    .unwrap();
    // 2.0 / 1.2 < 1.9: the repeated token loses.
    assert_eq!(p.sample(&[0.0, 2.0, 1.9], &[1]).unwrap(), 2);
    // top-p keeps only the dominant token.
    let mut tp = Sampler::new(SamplingParams {
        temperature: 1.0,
        top_k: None,
        top_p: Some(0.5),
        ..SamplingParams::default()
    })
    .unwrap();
    for _ in 0..50 {
        assert_eq!(tp.sample(&[10.0, 0.0, 0.0, 0.0], &[]).unwrap(), 0);
    }
}

#[test]
fn continuing_a_generation_on_the_same_state() {
    let m = model();
    let mut state = State::new(&m);
    let opts = GenerateOptions {
        max_tokens: 5,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let first: Vec<u32> = {
        let mut g = Generation::new(&m, &mut state, &[65, 66], opts.clone()).unwrap();
        g.by_ref().for_each(|p| drop(p.unwrap()));
        g.tokens().to_vec()
    };
    assert_eq!(state.position(), 7);
    // An empty prompt continues from the state's logits.
    let mut g = Generation::new(&m, &mut state, &[], opts).unwrap();
    g.by_ref().for_each(|p| drop(p.unwrap()));
    let mut all = first.clone();
    all.extend_from_slice(g.tokens());
    let (_, straight) = run(
        &m,
        "AB",
        GenerateOptions {
            max_tokens: 10,
            sampling: SamplingParams::greedy(),
            ..GenerateOptions::default()
        },
    );
    assert_eq!(&all[2..], &straight[..]);
}

#[test]
fn a_stop_string_is_not_left_in_the_state() {
    let m = model();
    let prompt: Vec<u32> = "hi".bytes().map(u32::from).collect();
    let greedy = GenerateOptions {
        max_tokens: 60,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let (full, full_tokens) = run(&m, "hi", greedy.clone());
    let chars: Vec<char> = full.chars().collect();
    assert!(
        chars.len() >= 16,
        "60 bytes decode to at least 15 characters"
    );
    // Stops of one to three characters at several places, and one never completed (its
    // first two characters held back, then released).
    let mut stops: Vec<Vec<String>> = (3..13)
        .map(|i| vec![chars[i..i + 1 + i % 3].iter().collect()])
        .collect();
    let never: String = chars[4..6]
        .iter()
        .chain(['\u{1}', '\u{2}'].iter())
        .collect();
    stops.push(vec![never.clone()]);
    stops.push(vec![never, chars[9..11].iter().collect()]);
    for stop in stops {
        let mut state = State::new(&m);
        let options = GenerateOptions {
            stop: stop.clone(),
            ..greedy.clone()
        };
        let mut g = Generation::new(&m, &mut state, &prompt, options).unwrap();
        let cut: String = g.by_ref().map(|p| p.unwrap()).collect();
        let kept = g.tokens()[prompt.len()..].to_vec();
        drop(g);
        let at = stop.iter().filter_map(|s| full.find(s.as_str())).min();
        let Some(at) = at else {
            // Never completed: the whole text, every token kept.
            assert_eq!(cut, full, "{stop:?}");
            assert_eq!(kept, full_tokens, "{stop:?}");
            continue;
        };
        assert_eq!(cut, full[..at], "{stop:?}");
        // The kept tokens: the generated ones whose bytes come before the stop string; the
        // returned text is their decoding, and one more token would add to it.
        let k = kept.len();
        assert_eq!(kept, full_tokens[..k], "{stop:?}");
        let bytes = |t: &[u32]| t.iter().map(|&t| t as u8).collect::<Vec<u8>>();
        assert_eq!(String::from_utf8_lossy(&bytes(&kept)), cut, "{stop:?}");
        assert_ne!(
            String::from_utf8_lossy(&bytes(&full_tokens[..k + 1])),
            cut,
            "{stop:?}: the next token begins the stop string"
        );
        // Bit-identical to a fresh state given the prompt the same way (prefill), then
        // stepped through the kept tokens.
        let mut fresh = State::new(&m);
        m.prefill(&mut fresh, &prompt).unwrap();
        for &t in &kept {
            m.step(&mut fresh, t).unwrap();
        }
        assert_eq!(
            state.to_bytes(&m).unwrap(),
            fresh.to_bytes(&m).unwrap(),
            "{stop:?}"
        );
        // Continuing from it splices exactly: the greedy text goes on where the cut was.
        let more = GenerateOptions {
            max_tokens: (full_tokens.len() - k).min(12),
            ..greedy.clone()
        };
        let mut g = Generation::new(&m, &mut state, &[], more.clone()).unwrap();
        g.by_ref().for_each(|p| drop(p.unwrap()));
        assert_eq!(g.tokens(), &full_tokens[k..k + more.max_tokens], "{stop:?}");
    }
}

#[test]
fn the_stop_matcher_asks_for_checkpoints_and_rollbacks() {
    use performer::generate::{Checkpoint, StopAction, StopMatcher};
    let step = |c| StopAction::Step(c);
    let push_all = |m: &mut StopMatcher, s: &str| -> Vec<(String, StopAction)> {
        s.bytes()
            .map(|b| {
                let p = m.push(b as u32).unwrap();
                (p.text, p.action)
            })
            .collect()
    };
    // A prefix held back, then released when it turns out not to be the stop string.
    let mut m = StopMatcher::new(vec!["abc".into()]).unwrap();
    assert_eq!(
        push_all(&mut m, "xabx"),
        [
            ("x".into(), step(Checkpoint::Keep)),
            ("".into(), step(Checkpoint::Take)),
            ("".into(), step(Checkpoint::Keep)),
            ("abx".into(), step(Checkpoint::Release)),
        ]
    );
    // Completed right after the checkpoint: restore it, nothing to replay.
    assert_eq!(
        push_all(&mut m, "abc").pop().unwrap(),
        (
            "".into(),
            StopAction::Stop {
                restore: true,
                replay: vec![]
            }
        )
    );
    // "ab" emitted while "a" was held: the checkpoint is before the first "a", and the
    // returned "ab" is replayed onto it.
    let mut m = StopMatcher::new(vec!["abc".into()]).unwrap();
    let got = push_all(&mut m, "ababc");
    let text: String = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(text, "ab");
    assert_eq!(
        got.last().unwrap().1,
        StopAction::Stop {
            restore: true,
            replay: vec![b'a' as u32, b'b' as u32]
        }
    );
    // A one-character stop with nothing held: the state is right as it is.
    let mut m = StopMatcher::new(vec!["z".into()]).unwrap();
    assert_eq!(
        push_all(&mut m, "yz").pop().unwrap(),
        (
            "".into(),
            StopAction::Stop {
                restore: false,
                replay: vec![]
            }
        )
    );
    // A multi-byte character: its first byte already needs a checkpoint.
    let mut m = StopMatcher::new(vec!["é".into()]).unwrap();
    let got = push_all(&mut m, "aé");
    assert_eq!(got[1].1, step(Checkpoint::Take));
    assert_eq!(
        got[2].1,
        StopAction::Stop {
            restore: true,
            replay: vec![]
        }
    );
    // An ASCII stop: a partial character cannot begin it, so none is held for one.
    let mut m = StopMatcher::new(vec!["b".into()]).unwrap();
    let got = push_all(&mut m, "é");
    assert_eq!(got[0], ("".into(), step(Checkpoint::Keep)));
    assert_eq!(got[1], ("é".into(), step(Checkpoint::Keep)));
    // No stop strings: text passes straight through, no checkpoints.
    let mut m = StopMatcher::new(vec![]).unwrap();
    assert!(push_all(&mut m, "abc")
        .iter()
        .all(|(_, a)| *a == step(Checkpoint::Keep)));
    assert!(StopMatcher::new(vec![String::new()]).is_err());
}

#[test]
fn prefill_progress_counts_up_and_changes_nothing() {
    let m = model();
    let prompt: Vec<u32> = (0..1500u32).map(|i| (i * 7 + 3) % 256).collect();
    let mut plain = State::new(&m);
    m.prefill(&mut plain, &prompt).unwrap();
    let mut watched = State::new(&m);
    let mut seen = Vec::new();
    m.prefill_with_progress(&mut watched, &prompt, &mut |n| seen.push(n))
        .unwrap();
    assert_eq!(
        plain.to_bytes(&m).unwrap(),
        watched.to_bytes(&m).unwrap(),
        "bit-identical to prefill"
    );
    assert!(seen.len() >= 2, "several row blocks report: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&prompt.len()));
    // Through a generation: the same reports, and the same text as without them.
    let opts = GenerateOptions {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let mut again = Vec::new();
    let mut state = State::new(&m);
    let text: String = Generation::with_progress(&m, &mut state, &prompt, opts.clone(), &mut |n| {
        again.push(n)
    })
    .unwrap()
    .map(|p| p.unwrap())
    .collect();
    assert_eq!(again, seen);
    let mut state = State::new(&m);
    let plain_text: String = Generation::new(&m, &mut state, &prompt, opts)
        .unwrap()
        .map(|p| p.unwrap())
        .collect();
    assert_eq!(text, plain_text);
}

#[test]
fn the_stop_rule_holds_on_random_streams() {
    use performer::generate::{Checkpoint, StopAction, StopMatcher};
    // Bytes from a small alphabet with valid and broken multi-byte sequences, so that stops
    // are often completed, often only begun, and partial characters are frequent.
    let alphabet = [b'a', b'b', b'\n', 0xC3, 0xA9, 0xE2, 0x80, 0xFF];
    let stop_sets: [&[&str]; 6] = [
        &["ab"],
        &["\n\n"],
        &["é"],
        &["b\u{FFFD}"],
        &["aab", "ba"],
        &["é\n", "bb"],
    ];
    let mut rng = TestRng(99);
    let mut stopped = 0;
    for round in 0..600 {
        let stops: Vec<String> = stop_sets[round % stop_sets.len()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let stream: Vec<u32> = rng
            .tokens(40, alphabet.len() as u32)
            .into_iter()
            .map(|i| alphabet[i as usize] as u32)
            .collect();
        // The "state" is the list of consumed tokens; a checkpoint is a copy of it.
        let mut state: Vec<u32> = Vec::new();
        let mut checkpoint: Option<Vec<u32>> = None;
        let mut m = StopMatcher::new(stops.clone()).unwrap();
        let mut text = String::new();
        let mut stop_hit = false;
        for &t in &stream {
            let p = m.push(t).unwrap();
            text.push_str(&p.text);
            match p.action {
                StopAction::Step(c) => {
                    match c {
                        Checkpoint::Take => {
                            assert!(checkpoint.is_none());
                            checkpoint = Some(state.clone());
                        }
                        Checkpoint::Release => {
                            assert!(checkpoint.take().is_some());
                        }
                        Checkpoint::Keep => {}
                    }
                    state.push(t);
                }
                StopAction::Stop { restore, replay } => {
                    if restore {
                        state = checkpoint.take().expect("a checkpoint to restore");
                    }
                    state.extend(replay);
                    stop_hit = true;
                    break;
                }
            }
        }
        if !stop_hit {
            text.push_str(&m.finish().unwrap());
        }
        let bytes: Vec<u8> = state.iter().map(|&t| t as u8).collect();
        // The state is a prefix of the stream and decodes to exactly the returned text.
        assert_eq!(state, stream[..state.len()], "{stops:?} {stream:?}");
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            text,
            "{stops:?} {stream:?}"
        );
        if stop_hit {
            // The returned text holds no stop string.
            assert!(stops.iter().all(|s| !text.contains(s.as_str())));
            stopped += 1;
            // The stop string follows the returned text in the stream's decoding.
            let all: Vec<u8> = stream.iter().map(|&t| t as u8).collect();
            let all = String::from_utf8_lossy(&all);
            assert!(all.starts_with(&text), "{stops:?} {stream:?}");
            assert!(
                stops
                    .iter()
                    .any(|s| all[text.len()..].starts_with(s.as_str())),
                "{stops:?} {stream:?}"
            );
        } else {
            assert_eq!(state, stream, "no stop: every token consumed");
        }
    }
    assert!(
        stopped > 100,
        "the streams exercise stops: {stopped} of 600"
    );
}
