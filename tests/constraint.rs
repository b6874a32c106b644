//! Constrained decoding (runtime features `constraints` and `hf-tokenizer`): every output of
//! the shipped byte model at temperature 1.0 parses and validates against its JSON schema;
//! Lark grammars and regexes hold; bad constraints are typed errors before any token; the state
//! after a constrained generation is the state of its tokens generated unconstrained; and a
//! `tokenizer.json` model gets its trie from its tokenizer.

#[path = "common/bpe_model.rs"]
mod bpe_model;
mod common;

use performer::constraint::{Constraint, Grammar, TokenMask};
use performer::tokenizer::Tokenizer;
use performer::{Error, GenerateOptions, Generation, Model, Sampler, SamplingParams, State};
use serde_json::Value;

fn byte_model() -> Model {
    Model::load(common::workspace_root().join("models/performer-byte")).expect("shipped model")
}

/// The five schemas of the validity target (`tests/fixtures/schemas/`).
const SCHEMAS: &[&str] = &["person", "items", "nested", "pattern", "bounds"];

fn schema(name: &str) -> Value {
    let path = common::fixture("schemas").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Pure temperature-1.0 sampling: no top-k or top-p narrowing the model's distribution.
fn t1(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed,
        ..SamplingParams::default()
    }
}

/// Generates with `constraint`; returns the text and the number of sampled tokens.
fn run(
    model: &Model,
    prompt: &str,
    constraint: Constraint,
    seed: u64,
    max_tokens: usize,
) -> (String, usize) {
    let mut state = State::new(model);
    let tokens = model.tokenizer().encode(prompt).unwrap();
    let options = GenerateOptions {
        max_tokens,
        sampling: t1(seed),
        constraint: Some(constraint),
        ..GenerateOptions::default()
    };
    let mut g = Generation::new(model, &mut state, &tokens, options).unwrap();
    let text: String = g.by_ref().collect::<Result<_, _>>().unwrap();
    let n = g.stats().generated_tokens;
    (text, n)
}

/// `count` generations per schema at temperature 1.0: each parses with serde_json and is valid
/// against its schema (jsonschema), and each ended because the grammar was complete, well
/// before the token limit.
fn schemas_validate(count: u64) {
    let model = byte_model();
    // Prompt plus output stay inside the model's 512 positions.
    let max_tokens = 480;
    for name in SCHEMAS {
        let schema = schema(name);
        let validator = jsonschema::validator_for(&schema).expect("the test schema is valid");
        for seed in 0..count {
            let (text, n) = run(
                &model,
                "Data: ",
                Constraint::JsonSchema(schema.clone()),
                seed,
                max_tokens,
            );
            assert!(
                n < max_tokens,
                "{name} seed {seed}: hit the token limit: {text}"
            );
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name} seed {seed}: not JSON ({e}): {text}"));
            if let Err(e) = validator.validate(&value) {
                panic!("{name} seed {seed}: invalid against the schema ({e}): {text}");
            }
        }
    }
}

#[test]
fn schemas_validate_20_each() {
    schemas_validate(20);
}

/// The issue's full count: 200 per schema (1000 generations); slow, run with `--ignored`.
#[test]
#[ignore]
fn schemas_validate_200_each() {
    schemas_validate(200);
}

#[test]
fn lark_and_regex_hold() {
    let model = byte_model();
    for seed in 0..10 {
        let lark = r#"
            start: answer " because " reason
            answer: "yes" | "no"
            reason: /[a-z]{1,10}/
        "#;
        let (text, _) = run(&model, "Q: ", Constraint::Lark(lark.into()), seed, 100);
        let (answer, reason) = text.split_once(" because ").expect(&text);
        assert!(answer == "yes" || answer == "no", "{text}");
        assert!(
            (1..=10).contains(&reason.len()) && reason.bytes().all(|b| b.is_ascii_lowercase()),
            "{text}"
        );

        let (text, _) = run(
            &model,
            "Id: ",
            Constraint::Regex("[A-C]{3}-[0-9]{2}".into()),
            seed,
            100,
        );
        let b = text.as_bytes();
        assert_eq!(b.len(), 6, "{text}");
        assert!(b[..3].iter().all(|c| (b'A'..=b'C').contains(c)), "{text}");
        assert_eq!(b[3], b'-');
        assert!(b[4..].iter().all(u8::is_ascii_digit), "{text}");
    }
}

/// `Constraint::Json` is any object (its keys are unbounded strings, into which this model
/// writes prose, so the grammar is checked token by token): `{` first, then a key or `}`, and
/// complete after the object closes.
#[test]
fn json_object_grammar() {
    let model = byte_model();
    let g = Grammar::compile(&Constraint::Json, model.tokenizer(), model.vocab_size()).unwrap();
    let allowed = |m: &mut performer::constraint::GrammarMatcher| -> Vec<u8> {
        let mask = m.mask().unwrap().expect("not complete").clone();
        (0..=255u8).filter(|&b| mask.allows(u32::from(b))).collect()
    };
    let mut m = g.matcher().unwrap();
    assert_eq!(allowed(&mut m), b"{");
    m.commit(u32::from(b'{')).unwrap();
    assert_eq!(allowed(&mut m), b"\"}");
    for &b in br#""k":[1,{"x":null}]"# {
        m.commit(u32::from(b)).unwrap();
        assert!(!m.is_complete());
    }
    assert_eq!(allowed(&mut m), b",}");
    m.commit(u32::from(b'}')).unwrap();
    assert!(m.is_complete() && m.mask().unwrap().is_none());
    assert!(matches!(
        m.commit(u32::from(b' ')),
        Err(Error::InvalidConstraint { .. })
    ));
    // A token the grammar does not allow is refused.
    let mut m = g.matcher().unwrap();
    assert!(matches!(
        m.commit(u32::from(b'[')),
        Err(Error::InvalidConstraint { .. })
    ));
}

#[test]
fn bad_constraints_are_typed_errors_before_any_token() {
    let model = byte_model();
    let cases = [
        (
            Constraint::JsonSchema(serde_json::json!({"type": 5})),
            "JSON schema",
            "type",
        ),
        (
            Constraint::JsonSchema(
                serde_json::json!({"type": "object", "unevaluatedProperties": false}),
            ),
            "JSON schema",
            "unevaluatedProperties",
        ),
        (Constraint::Lark("start: (".into()), "Lark grammar", ""),
        (
            Constraint::Lark("start: undefined_rule".into()),
            "Lark grammar",
            "undefined_rule",
        ),
        (Constraint::Regex("[a-".into()), "regex", ""),
    ];
    for (c, kind, named) in cases {
        let mut state = State::new(&model);
        let options = GenerateOptions {
            constraint: Some(c.clone()),
            ..GenerateOptions::default()
        };
        match Generation::new(&model, &mut state, &[65, 66], options) {
            Err(Error::InvalidConstraint { kind: k, message }) => {
                assert_eq!(k, kind, "{c:?}: {message}");
                assert!(message.contains(named), "{c:?}: {message}");
                assert!(!message.contains('\n'), "one line: {message}");
            }
            Err(e) => panic!("{c:?}: expected InvalidConstraint, got {e}"),
            Ok(_) => panic!("{c:?}: accepted"),
        }
        assert_eq!(state.position(), 0, "the prompt was not ingested");
        assert_eq!(
            Grammar::compile(&c, model.tokenizer(), model.vocab_size())
                .unwrap_err()
                .to_string(),
            {
                let mut s = State::new(&model);
                let options = GenerateOptions {
                    constraint: Some(c.clone()),
                    ..GenerateOptions::default()
                };
                Generation::new(&model, &mut s, &[65], options)
                    .err()
                    .unwrap()
                    .to_string()
            }
        );
    }
}

#[test]
fn token_limit_cuts_the_output() {
    let model = byte_model();
    let (text, n) = run(
        &model,
        "Data: ",
        Constraint::JsonSchema(schema("person")),
        3,
        5,
    );
    assert_eq!(n, 5);
    assert_eq!(text.len(), 5, "byte tokens: one byte each: {text}");
    assert!(text.starts_with('{'), "{text}");
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "cut short: {text}"
    );
}

/// A constrained generation leaves the state at exactly the returned text, bit-identical to
/// ingesting the same tokens unconstrained (one decode step per token, as generation does).
#[test]
fn state_after_constrained_generation_is_the_unconstrained_one() {
    let model = byte_model();
    let prompt: Vec<u32> = "Data: ".bytes().map(u32::from).collect();
    for seed in 0..3 {
        let mut state = State::new(&model);
        let options = GenerateOptions {
            max_tokens: 480,
            sampling: t1(seed),
            constraint: Some(Constraint::JsonSchema(schema("nested"))),
            ..GenerateOptions::default()
        };
        let mut g = Generation::new(&model, &mut state, &prompt, options).unwrap();
        let text: String = g.by_ref().collect::<Result<_, _>>().unwrap();
        let tokens = g.tokens().to_vec();
        drop(g);
        assert_eq!(&tokens[..prompt.len()], &prompt[..]);
        let generated = &tokens[prompt.len()..];
        assert_eq!(model.tokenizer().decode(generated).unwrap(), text);
        assert_eq!(state.position(), tokens.len());

        let mut plain = State::new(&model);
        model.prefill(&mut plain, &prompt).unwrap();
        for &t in generated {
            model.step(&mut plain, t).unwrap();
        }
        assert_eq!(
            state.to_bytes(&model).unwrap(),
            plain.to_bytes(&model).unwrap(),
            "seed {seed}"
        );

        // A continuation on the same state goes on after the returned text.
        let more = GenerateOptions {
            max_tokens: 4,
            sampling: t1(seed),
            constraint: Some(Constraint::Regex("[0-9]+".into())),
            ..GenerateOptions::default()
        };
        let text2: String = Generation::new(&model, &mut state, &[], more)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(text2.bytes().all(|b| b.is_ascii_digit()) && !text2.is_empty());
        assert_eq!(state.position(), tokens.len() + text2.len());
    }
}

#[test]
fn stop_strings_still_apply() {
    let model = byte_model();
    let mut state = State::new(&model);
    let options = GenerateOptions {
        max_tokens: 100,
        sampling: t1(1),
        stop: vec!["-".into()],
        constraint: Some(Constraint::Regex("ab-cd".into())),
        ..GenerateOptions::default()
    };
    let text: String = Generation::new(&model, &mut state, &[65], options)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(text, "ab");
    assert_eq!(state.position(), 3, "the stop string is not in the state");
}

#[test]
fn masked_sampling_picks_allowed_tokens_only() {
    let mut mask = TokenMask::new(4);
    mask.set(1, true);
    mask.set(3, true);
    let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
    // Token 0 is the most likely but not allowed; among 1 and 3, 3 is better.
    assert_eq!(
        greedy
            .sample_masked(&[9.0, 1.0, 0.0, 2.0], &[], &mask)
            .unwrap(),
        3
    );
    let mut s = Sampler::new(t1(5)).unwrap();
    for _ in 0..200 {
        let t = s.sample_masked(&[9.0, 1.0, 0.0, 2.0], &[], &mask).unwrap();
        assert!(t == 1 || t == 3);
    }
    assert!(matches!(
        s.sample_masked(&[1.0, 2.0, 3.0, 4.0], &[], &TokenMask::new(4)),
        Err(Error::InvalidConstraint { .. })
    ));
    assert!(matches!(
        s.sample_masked(&[1.0, f32::NAN, 3.0, 4.0], &[], &mask),
        Err(Error::NonFiniteLogits { .. })
    ));
}

/// A `tokenizer.json` model (byte-level BPE, 1024 tokens, random weights): its trie comes from
/// the tokenizer's own token bytes, multi-byte tokens included, and outputs validate.
#[test]
fn tokenizer_json_model_validates() {
    let dir = tempfile::tempdir().unwrap();
    bpe_model::write_bpe_model(dir.path());
    let model = Model::load(dir.path()).unwrap();
    assert!(matches!(model.tokenizer(), Tokenizer::HuggingFace(_)));
    let schema = schema("person");
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut multi_byte = false;
    for seed in 0..10 {
        let mut state = State::new(&model);
        let prompt = model.tokenizer().encode("Data: ").unwrap();
        let options = GenerateOptions {
            max_tokens: 200,
            sampling: t1(seed),
            constraint: Some(Constraint::JsonSchema(schema.clone())),
            ..GenerateOptions::default()
        };
        let mut g = Generation::new(&model, &mut state, &prompt, options).unwrap();
        let text: String = g.by_ref().collect::<Result<_, _>>().unwrap();
        let generated = g.tokens()[prompt.len()..].to_vec();
        assert!(generated.len() < 200, "{text}");
        multi_byte |= generated.len() < text.len();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(validator.is_valid(&v), "{text}");
    }
    assert!(multi_byte, "some token held several bytes");
}

/// Masks computed ahead (`GrammarMatcher::prepare`, which `Generation` runs on another thread
/// while the model steps) are the masks computed when asked, and a generation's text is that
/// of the plain serial loop (mask, sample, commit, step), with or without a decode pool.
#[test]
fn masks_computed_ahead_change_nothing() {
    let model = byte_model();
    let constraint = Constraint::JsonSchema(schema("items"));
    let g = Grammar::compile(&constraint, model.tokenizer(), model.vocab_size()).unwrap();
    let prompt = model.tokenizer().encode("Data: ").unwrap();
    for seed in 0..4 {
        let mut state = State::new(&model);
        model.prefill(&mut state, &prompt).unwrap();
        let mut sampler = Sampler::new(t1(seed)).unwrap();
        let (mut asked, mut ahead) = (g.matcher().unwrap(), g.matcher().unwrap());
        let mut history = prompt.clone();
        let mut text = Vec::new();
        for _ in 0..300 {
            ahead.prepare();
            let prepared: Option<TokenMask> = ahead.mask().unwrap().cloned();
            let Some(mask) = asked.mask().unwrap() else {
                assert_eq!(prepared, None, "complete one way, not the other");
                break;
            };
            assert_eq!(
                Some(mask),
                prepared.as_ref(),
                "seed {seed}, at {}",
                text.len()
            );
            let token = sampler
                .sample_masked(state.logits().unwrap(), &history, mask)
                .unwrap();
            asked.commit(token).unwrap();
            ahead.commit(token).unwrap();
            history.push(token);
            text.push(token as u8);
            model.step(&mut state, token).unwrap();
        }
        assert!(asked.is_complete(), "seed {seed}: 300 tokens are enough");
        let want = String::from_utf8(text).unwrap();
        assert_eq!(run(&model, "Data: ", constraint.clone(), seed, 300).0, want);
        let mut state = State::new(&model);
        let options = GenerateOptions {
            max_tokens: 300,
            sampling: t1(seed),
            constraint: Some(constraint.clone()),
            decode_threads: Some(2),
            ..GenerateOptions::default()
        };
        let pooled: String = Generation::new(&model, &mut state, &prompt, options)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(pooled, want, "seed {seed}, a decode pool of 2");
    }
}
