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

use libfuzzer_sys::fuzz_target;

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

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (config, weights): (Option<&[u8]>, &[u8]) = match mode % 4 {
        0 => (Some(harness::TINY_CONFIG.as_bytes()), rest),
        1 => (Some(DEFAULT_A_CONFIG.as_bytes()), rest),
        2 => (None, rest),
        _ => {
            if rest.len() < 2 {
                return;
            }
            let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let rest = &rest[2..];
            let n = n.min(rest.len());
            (Some(&rest[..n]), &rest[n..])
        }
    };
    let dir = scratch();
    harness::write_dir(dir, config, weights);
    harness::exercise(dir);
});
