//! Shared helpers for the engine's integration tests: where the workspace's fixtures and the
//! shipped model are.
#![allow(dead_code)]

use std::path::PathBuf;

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
