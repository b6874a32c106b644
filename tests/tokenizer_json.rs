//! Models with a Hugging Face `tokenizer.json` (feature `hf-tokenizer`): encoding, UTF-8-safe
//! streaming decoding, generation and perplexity with a byte-level BPE tokenizer trained on the
//! Shakespeare corpus and a random-weight model of its vocabulary.

#[path = "common/bpe_model.rs"]
mod bpe_model;

use bpe_model::{bpe_tokenizer_file, write_bpe_model, write_model_with, BPE_VOCAB};
use performer::perplexity::{evaluate, PerplexityOptions};
use performer::synthetic::Rng;
use performer::tokenizer::Tokenizer;
use performer::{Error, GenerateOptions, Generation, Model, SamplingParams, State};

fn tokenizer() -> Tokenizer {
    Tokenizer::load_file(&bpe_tokenizer_file()).expect("load tokenizer.json")
}

/// Shakespeare, and text far from it: accents, a dash, CJK and an emoji (4-byte UTF-8, which a
/// byte-level BPE trained on English splits into single-byte tokens).
const TEXTS: &[&str] = &[
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
    "Café au lait — naïve façade, 東京, emoji 🎭🗡️ and \t tabs \r\n done.",
    "",
    " ",
];

#[test]
fn encode_decode_round_trip() {
    let t = tokenizer();
    assert_eq!(t.name(), "tokenizer.json");
    assert_eq!(t.vocab_size(), BPE_VOCAB);
    for text in TEXTS {
        let ids = t.encode(text).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < BPE_VOCAB));
        assert_eq!(t.decode(&ids).unwrap(), *text, "{ids:?}");
        let tokenized = t.tokenize(text).unwrap();
        assert_eq!(tokenized.ids, ids);
        assert_eq!(tokenized.ends.last().copied().unwrap_or(0), text.len());
        assert!(tokenized.ends.windows(2).all(|w| w[0] <= w[1]));
    }
    // BPE merges: English text takes far fewer tokens than bytes.
    let ids = t.encode(TEXTS[0]).unwrap();
    assert!(ids.len() * 2 < TEXTS[0].len(), "{} tokens", ids.len());
    // Bytes that are not UTF-8 cannot be tokenized by a text tokenizer: a typed error.
    match t.encode_bytes(b"ok \xff") {
        Err(Error::InvalidParameter { name: "text", .. }) => {}
        other => panic!("expected an invalid-text error, got {other:?}"),
    }
}

/// Feeds `ids` one by one through a stream after `context`; returns the pieces (the last one
/// from `finish`).
fn stream_pieces(t: &Tokenizer, context: &[u32], ids: &[u32]) -> Vec<String> {
    let mut s = t.stream(context);
    let mut pieces: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
    pieces.push(s.finish().unwrap());
    pieces
}

#[test]
fn streaming_emits_whole_characters_that_concatenate_to_the_decode() {
    let t = tokenizer();
    for text in TEXTS {
        let ids = t.encode(text).unwrap();
        let pieces = stream_pieces(&t, &[], &ids);
        assert_eq!(pieces.concat(), *text);
        // None of these texts holds U+FFFD: a piece with one would be half a character.
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        // After any prefix of the tokens as context, the stream gives exactly the rest.
        for k in 0..ids.len() {
            let before = t.decode(&ids[..k]).unwrap();
            if before.ends_with('\u{FFFD}') {
                continue; // the context ends inside a character: not a text prefix
            }
            let rest = stream_pieces(&t, &ids[..k], &ids[k..]).concat();
            assert_eq!(format!("{before}{rest}"), *text, "context of {k} tokens");
        }
    }
    // The emoji is split over byte tokens: some pushes return nothing (the stream waits for
    // the rest of the character) and the character comes out whole in one piece.
    let ids = t.encode("🎭").unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let pieces = stream_pieces(&t, &[], &ids);
    assert!(pieces[..ids.len() - 1].iter().all(String::is_empty));
    assert_eq!(pieces[ids.len() - 1], "🎭");
}

#[test]
fn streaming_random_tokens_matches_the_lossy_decode() {
    // Random ids make invalid and truncated UTF-8 (U+FFFD in the decode); the pieces still
    // add up to exactly the decoded text, and no piece but the last ends in U+FFFD.
    let t = tokenizer();
    let mut rng = Rng::new(7);
    for _ in 0..50 {
        let ids = rng.tokens(40, BPE_VOCAB);
        let pieces = stream_pieces(&t, &[], &ids);
        assert_eq!(pieces.concat(), t.decode(&ids).unwrap(), "{ids:?}");
        let rest = &pieces[..pieces.len() - 1];
        assert!(rest.iter().all(|p| !p.ends_with('\u{FFFD}')), "{pieces:?}");
    }
}

#[test]
fn generate_and_score_with_a_tokenizer_json_model() {
    let dir = tempfile::tempdir().unwrap();
    write_bpe_model(dir.path());
    let model = Model::load(dir.path()).unwrap();
    assert_eq!(model.tokenizer().name(), "tokenizer.json");
    assert_eq!(
        model.config().tokenizer,
        performer::config::TokenizerKind::File("tokenizer.json".into())
    );
    let t = model.tokenizer();
    let prompt = t.encode("ROMEO:\nBut soft, what light").unwrap();
    let mut state = State::new(&model);
    let options = GenerateOptions {
        max_tokens: 60,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    let mut generation = Generation::new(&model, &mut state, &prompt, options).unwrap();
    let pieces: Vec<String> = generation.by_ref().map(Result::unwrap).collect();
    let tokens = generation.tokens().to_vec();
    drop(generation);
    assert_eq!(tokens.len(), prompt.len() + 60);
    // The streamed text is what the generated tokens decode to, in context of the prompt.
    let full = t.decode(&tokens).unwrap();
    let prompt_text = t.decode(&prompt).unwrap();
    assert_eq!(format!("{prompt_text}{}", pieces.concat()), full);
    assert_eq!(pieces.concat(), t.decode(&tokens[prompt.len()..]).unwrap());

    // A stop string in that text: generation ends before it; the state keeps the tokens
    // whose text begins before it (a BPE token may carry the stop string's first bytes).
    let greedy = |stop: Vec<String>| {
        let mut state = State::new(&model);
        let options = GenerateOptions {
            max_tokens: 60,
            stop,
            sampling: SamplingParams::greedy(),
            ..GenerateOptions::default()
        };
        let mut g = Generation::new(&model, &mut state, &prompt, options).unwrap();
        let text: String = g.by_ref().map(Result::unwrap).collect();
        let tokens = g.tokens().to_vec();
        drop(g);
        assert_eq!(state.position(), tokens.len());
        (text, tokens)
    };
    let (whole, _) = greedy(vec![]);
    let chars: Vec<char> = whole.chars().collect();
    assert!(chars.len() > 20, "{whole:?}");
    let stop: String = chars[12..15].iter().collect();
    let cut = whole.find(&stop).unwrap();
    let (text, tokens) = greedy(vec![stop.clone()]);
    assert_eq!(text, whole[..cut], "stop {stop:?}");
    let kept = t.decode(&tokens[prompt.len()..]).unwrap();
    assert!(
        kept.starts_with(&text) && kept.len() < cut + stop.len(),
        "{kept:?} {text:?}"
    );

    // Perplexity: token counts from the tokenizer, bits per byte over the text's bytes.
    let text = "HAMLET:\nTo be, or not to be, that is the question.\nCafé 🎭\n";
    let ids = t.encode(text).unwrap();
    let report = evaluate(
        &model,
        text.as_bytes(),
        PerplexityOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(report.tokens, ids.len());
    assert_eq!(report.scored, ids.len() - 1);
    let tokenized = t.tokenize(text).unwrap();
    let first_token_bytes = tokenized.ends[0];
    assert_eq!(report.bytes, text.len() - first_token_bytes);
    // The same sum from the model directly, token by token.
    let mut state = State::new(&model);
    let mut total = 0f64;
    for w in ids.windows(2) {
        let logits = model.step(&mut state, w[0]).unwrap();
        total += performer::perplexity::nll(logits, w[1]);
    }
    // Chunked prefill and single steps sum their terms in a different order: agreement to
    // 1e-4 relative (f32 logits, ~20 terms).
    let expected_bpb = total / std::f64::consts::LN_2 / report.bytes as f64;
    assert!(
        (report.bits_per_byte - expected_bpb).abs() <= 1e-4 * expected_bpb,
        "{} vs {expected_bpb}",
        report.bits_per_byte
    );
    // With windows and a token limit, the same accounting.
    let limited = evaluate(
        &model,
        text.as_bytes(),
        PerplexityOptions {
            max_tokens: Some(10),
            window: Some(4),
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(limited.tokens, 10);
    assert_eq!(limited.scored, 9);
    assert_eq!(limited.bytes, tokenized.ends[9] - tokenized.ends[0]);
    // A tokenizer.json model needs UTF-8 text.
    match evaluate(
        &model,
        &b"abc \xff def"[..],
        PerplexityOptions::default(),
        |_| {},
    ) {
        Err(Error::InvalidParameter { name: "text", .. }) => {}
        other => panic!("expected an invalid-text error, got {other:?}"),
    }
}

#[test]
fn tokenizer_file_errors_are_typed() {
    // A tokenizer larger than the model's vocabulary.
    let dir = tempfile::tempdir().unwrap();
    write_model_with(dir.path(), 512, "tokenizer.json");
    match Model::load(dir.path()) {
        Err(Error::Config(msg)) => {
            assert!(
                msg.contains("1024 tokens") && msg.contains("num_tokens 512"),
                "{msg}"
            )
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    // A vocabulary larger than the tokenizer's (padded) is fine.
    let dir = tempfile::tempdir().unwrap();
    write_model_with(dir.path(), 1100, "tokenizer.json");
    Model::load(dir.path()).unwrap();
    // The named file is missing: an I/O error naming it.
    let dir = tempfile::tempdir().unwrap();
    write_model_with(dir.path(), BPE_VOCAB, "other.json");
    match Model::load(dir.path()) {
        Err(Error::Io { path, source }) => {
            assert!(path.ends_with("other.json"), "{path:?}");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    // The file is not a tokenizer.
    let dir = tempfile::tempdir().unwrap();
    write_bpe_model(dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    match Model::load(dir.path()) {
        Err(e @ Error::Tokenizer(_)) => assert!(e.to_string().contains("tokenizer.json"), "{e}"),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

#[test]
fn streaming_after_context_keeps_the_spaces_a_sentencepiece_decoder_strips_at_the_start() {
    // A Metaspace (SentencePiece-style) tokenizer writes `▁word` as " word", except at the
    // start of a text, where the space is dropped. Tokens streamed after a prompt are decoded
    // in its context, so the first generated word keeps its space.
    let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
        "post_processor": null,
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
        "model": {"type": "WordLevel", "unk_token": "<unk>",
                  "vocab": {"<unk>": 0, "▁To": 1, "▁be,": 2, "▁or": 3, "▁not": 4, "▁to": 5, "▁be": 6}}}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let t = Tokenizer::load_file(&path).unwrap();
    let ids = t.encode("To be, or not to be").unwrap();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    assert_eq!(t.decode(&ids).unwrap(), "To be, or not to be");
    // Without context the first token is at the start of a text: no space.
    assert_eq!(stream_pieces(&t, &[], &ids[2..]).concat(), "or not to be");
    // After the prompt's tokens: exactly the text they add.
    assert_eq!(
        stream_pieces(&t, &ids[..2], &ids[2..]).concat(),
        " or not to be"
    );
    let pieces = stream_pieces(&t, &ids[..2], &ids[2..]);
    assert_eq!(pieces[..4], [" or", " not", " to", " be"]);
}
