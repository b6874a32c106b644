//! Shared helpers for the integration tests: fixture paths and expected-logit files.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// The workspace root (where `tests/fixtures` and `models/` are), also for the tests of the
/// member crates that include this module.
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

/// A [T, V] matrix of expected logits.
pub struct Logits {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.cols..(t + 1) * self.cols]
    }

    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0f32, |a, &b| a.max(b.abs()))
    }
}

/// The tensors of an `expected*.safetensors` file.
pub struct Expected {
    pub tokens: Vec<u32>,
    pub logits: HashMap<String, Logits>,
}

pub fn load_expected(fixture_name: &str, file: &str) -> Expected {
    let bytes = std::fs::read(fixture(fixture_name).join(file)).expect("read expected file");
    let st = SafeTensors::deserialize(&bytes).expect("parse expected file");
    let mut tokens = Vec::new();
    let mut logits = HashMap::new();
    for (name, view) in st.tensors() {
        match view.dtype() {
            Dtype::I64 => {
                tokens = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                    .collect();
            }
            Dtype::F32 => {
                let data: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let shape = view.shape();
                logits.insert(
                    name,
                    Logits {
                        rows: shape[0],
                        cols: shape[1],
                        data,
                    },
                );
            }
            other => panic!("unexpected dtype {other:?}"),
        }
    }
    Expected { tokens, logits }
}

/// Largest absolute difference between two slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// A small deterministic generator for test inputs (SplitMix64).
pub struct TestRng(pub u64);

impl TestRng {
    pub fn next_u64(&mut self) -> u64 {
        performer::sampling::splitmix64(&mut self.0)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    pub fn tokens(&mut self, n: usize, vocab: u32) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }
}
