//! Shared helpers for the engine's integration tests: where the workspace's fixtures and the
//! shipped model are, byte tokens, and the greedy reference text.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use performer::generate::{GenerateOptions, Generation};
use performer::{Model, SamplingParams, State};

/// The workspace root (where `tests/fixtures` and `models/` are).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("tests/fixtures").is_dir())
        .unwrap_or(&manifest)
        .to_path_buf()
}

/// Path of a fixture directory.
pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(name)
}

/// The shipped byte-level model.
pub fn shipped() -> Arc<Model> {
    Arc::new(Model::load(workspace_root().join("models/performer-byte")).unwrap())
}

/// The byte tokens of `s`.
pub fn toks(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

/// What `performer generate` prints for the same greedy request: the reference text.
pub fn generate_text(model: &Model, prompt: &str, max_tokens: usize) -> String {
    let mut state = State::new(model);
    let options = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    Generation::new(model, &mut state, &toks(prompt), options)
        .unwrap()
        .collect::<performer::Result<String>>()
        .unwrap()
}
