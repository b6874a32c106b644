//! A model directory with a Hugging Face `tokenizer.json`: the BPE tokenizer trained on the
//! Shakespeare corpus (`tests/fixtures/bpe_shakespeare/`, made by
//! `scripts/make_bpe_tokenizer.py`) beside a random-weight model of a matching vocabulary
//! written by `performer::synthetic`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use performer::synthetic::{self, SyntheticShape, WeightDtype};

/// The tokenizer's vocabulary (1023 BPE tokens and `<|endoftext|>`).
pub const BPE_VOCAB: usize = 1024;

/// `tests/fixtures/bpe_shakespeare/tokenizer.json`.
pub fn bpe_tokenizer_file() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("tests/fixtures").is_dir())
        .unwrap_or(&manifest)
        .join("tests/fixtures/bpe_shakespeare/tokenizer.json")
}

/// A small random model (2 layers, width 64) with `vocab` tokens.
pub fn bpe_shape(vocab: usize) -> SyntheticShape {
    SyntheticShape {
        name: "bpe-test".into(),
        dim: 64,
        depth: 2,
        heads: 2,
        dim_head: 32,
        ff_mult: 2,
        nb_features: 16,
        vocab,
        max_seq_len: 256,
    }
}

/// Writes the model into `dir` with `config.json` naming `tokenizer.json`.
pub fn write_bpe_model(dir: &Path) {
    write_model_with(dir, BPE_VOCAB, "tokenizer.json");
}

/// Writes a random model of `vocab` tokens whose config's `tokenizer` key is `tokenizer`,
/// with the Shakespeare BPE file as `dir/tokenizer.json`.
pub fn write_model_with(dir: &Path, vocab: usize, tokenizer: &str) {
    synthetic::write(dir, &bpe_shape(vocab), WeightDtype::F32, 11).expect("write model");
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["tokenizer"] = serde_json::Value::String(tokenizer.into());
    std::fs::write(&config_path, config.to_string()).unwrap();
    std::fs::copy(bpe_tokenizer_file(), dir.join("tokenizer.json")).expect("copy tokenizer");
}
