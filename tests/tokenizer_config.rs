//! The `tokenizer` key of `config.json`, with or without the runtime's `hf-tokenizer` feature
//! (`cargo test -p performer --test tokenizer_config` builds the runtime without it; the
//! workspace's `cargo test` with it, as the command line turns it on).

#[path = "common/bpe_model.rs"]
mod bpe_model;

use performer::config::{Config, Inferred, TokenizerKind};
use performer::{Error, Model};

fn parse(tokenizer: &str) -> performer::Result<Config> {
    Config::from_json(
        &format!(
            r#"{{"num_tokens": 1024, "max_seq_len": 64, "dim": 64, "depth": 1, "heads": 2, "causal": true, "tokenizer": {tokenizer}}}"#
        ),
        &Inferred::default(),
    )
}

#[test]
fn the_tokenizer_key_names_byte_or_a_json_file_in_the_model_directory() {
    assert_eq!(parse(r#""byte""#).unwrap().tokenizer, TokenizerKind::Byte);
    assert_eq!(parse("null").unwrap().tokenizer, TokenizerKind::Byte);
    let c = parse(r#""tokenizer.json""#).unwrap();
    assert_eq!(c.tokenizer, TokenizerKind::File("tokenizer.json".into()));
    assert_eq!(c.tokenizer.name(), "tokenizer.json");
    assert_eq!(
        parse(r#""my-bpe.json""#).unwrap().tokenizer,
        TokenizerKind::File("my-bpe.json".into())
    );
    // Anything else, and any path leaving the model directory, is refused by name.
    for bad in [
        r#""bpe""#,
        r#""../tokenizer.json""#,
        r#""/etc/tokenizer.json""#,
        r#""sub/tokenizer.json""#,
        r#""..\\tokenizer.json""#,
        r#"".json""#,
        "3",
        "true",
    ] {
        match parse(bad) {
            Err(Error::Unsupported { option, reason }) => {
                assert_eq!(option, "tokenizer");
                assert!(reason.contains("tokenizer.json"), "{reason}");
            }
            other => panic!("{bad}: expected an unsupported-tokenizer error, got {other:?}"),
        }
    }
}

#[test]
fn a_tokenizer_json_model_loads_only_with_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    bpe_model::write_bpe_model(dir.path());
    let result = Model::load(dir.path());
    if cfg!(feature = "hf-tokenizer") {
        assert_eq!(result.unwrap().tokenizer().name(), "tokenizer.json");
    } else {
        match result {
            Err(e @ Error::Unsupported { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("hf-tokenizer") && msg.contains("tokenizer.json"),
                    "{msg}"
                );
            }
            other => panic!("expected an unsupported-tokenizer error, got {other:?}"),
        }
    }
}
