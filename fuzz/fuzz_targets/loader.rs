//! libFuzzer target for the model loader.
//!
//! Input layout: byte 0 picks where `config.json` comes from, the rest is `model.safetensors`:
//!
//! | byte 0 % 4 | config.json | model.safetensors |
//! |---|---|---|
//! | 0 | the tiny model's config (tests/harness) | bytes 1.. |
//! | 1 | tests/fixtures/default_a/config.json | bytes 1.. |
//! | 2 | none (the directory has no config.json) | bytes 1.. |
//! | 3 | bytes 3..3+n, n = u16 LE at bytes 1..3 | the bytes after that |
//!
//! Each input is written into a per-process scratch directory and run through
//! `harness::exercise`: `WeightFile::open`, every tensor view, shape inference, config
//! resolution, `Model::load`, `Model::from_parts` and a few decode steps. A panic, abort,
//! out-of-bounds access or an error of a kind loading should not produce is a crash.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};

#[path = "../../tests/harness/mod.rs"]
mod harness;

const DEFAULT_A_CONFIG: &str = include_str!("../../tests/fixtures/default_a/config.json");

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("performer-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// Splits an input into (mode, config, weights); `None` for inputs too short to mean anything.
fn decode(data: &[u8]) -> Option<(u8, Option<&[u8]>, &[u8])> {
    let (&mode, rest) = data.split_first()?;
    Some(match mode % 4 {
        0 => (mode, Some(harness::TINY_CONFIG.as_bytes()), rest),
        1 => (mode, Some(DEFAULT_A_CONFIG.as_bytes()), rest),
        2 => (mode, None, rest),
        _ => {
            let n = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            let rest = &rest[2..];
            let n = n.min(rest.len());
            (mode, Some(&rest[..n]), &rest[n..])
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((_, config, weights)) = decode(data) else {
        return;
    };
    let dir = scratch();
    harness::write_dir(dir, config, weights);
    harness::exercise(dir);
});

// Half of the mutations are libFuzzer's own byte-level ones; the other half are the
// structure-aware mutations of `tests/harness` (header JSON edits of dtypes, shapes, offsets
// and names; header-length edits; non-finite data; config JSON edits), which reach states that
// byte flips of a JSON header rarely do.
fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = harness::Rng(u64::from(seed) | (u64::from(seed) << 32));
    if rng.one_in(2) {
        return fuzzer_mutate(data, size, max_size);
    }
    let Some((mode, config, weights)) = decode(&data[..size]) else {
        return fuzzer_mutate(data, size, max_size);
    };
    let mut weights = weights.to_vec();
    let mut config = config.map(<[u8]>::to_vec);
    let mut mode = mode;
    match rng.below(8) {
        0 => {
            // Switch to an explicit config (mode 3), starting from the tiny one.
            mode = 3;
            let mut c = config.unwrap_or_else(|| harness::TINY_CONFIG.as_bytes().to_vec());
            harness::mutate_config(&mut rng, &mut c);
            config = Some(c);
        }
        1 if mode % 4 == 3 => {
            if let Some(c) = config.as_mut() {
                harness::mutate_config(&mut rng, c);
            }
        }
        _ => {
            for _ in 0..1 + rng.below(3) {
                harness::mutate_weights(&mut rng, &mut weights);
            }
        }
    }
    let mut out = vec![mode];
    if mode % 4 == 3 {
        let c = config.unwrap_or_default();
        let n = c.len().min(u16::MAX as usize);
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&c[..n]);
    }
    out.extend_from_slice(&weights);
    if out.len() > max_size {
        return fuzzer_mutate(data, size, max_size);
    }
    data[..out.len()].copy_from_slice(&out);
    out.len()
});
