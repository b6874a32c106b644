//! A bounded, deterministic property test of the loader on stable Rust (the long-running
//! counterpart is the cargo-fuzz target in `fuzz/`).
//!
//! Real checkpoints (the tiny model of `tests/harness`, several golden fixtures and q8_0 / q4_0 /
//! q4_1 copies of one) and their
//! `config.json` are mutated — bit flips, byte overwrites, truncation, extension, edits of the
//! header length, structure-aware edits of the header JSON (dtypes, shapes, offsets, names,
//! metadata), non-finite values written over the data, and edits of the config text — and each
//! result goes through `harness::exercise`: open, view every tensor, infer, resolve the config,
//! load, step. A panic fails the test; every error must be one of the kinds loading produces.
//!
//! Environment knobs (defaults keep CI fast):
//! - `PERFORMER_FUZZ_CASES`: rounds (default 150; a round is 8 cases of the tiny model and
//!   1 of each fixture),
//! - `PERFORMER_FUZZ_SECONDS`: run until this many seconds have passed instead (the long run),
//! - `PERFORMER_FUZZ_SEED`: the generator's seed (default fixed).

mod common;
mod harness;

use std::time::{Duration, Instant};

use harness::{exercise, mutate_config, mutate_weights, write_dir, Outcome, Rng};

struct Seed {
    name: &'static str,
    config: Vec<u8>,
    weights: Vec<u8>,
}

fn seeds() -> Vec<Seed> {
    let mut s = vec![Seed {
        name: "tiny",
        config: harness::TINY_CONFIG.as_bytes().to_vec(),
        weights: harness::tiny_file(),
    }];
    for name in ["default_a", "default_a_f16", "default_a_bf16", "default_b"] {
        let dir = common::fixture(name);
        s.push(Seed {
            name,
            config: std::fs::read(dir.join("config.json")).unwrap(),
            weights: std::fs::read(dir.join("model.safetensors")).unwrap(),
        });
    }
    // Quantized copies of a fixture: I8 / U8 codes and F16 scale (and minimum) tensors under
    // hostile edits.
    let tmp = tempfile::tempdir().unwrap();
    for (name, format) in [
        ("default_a_q8_0", performer::quant::QuantFormat::Q8_0),
        ("default_a_q4_0", performer::quant::QuantFormat::Q4_0),
        ("default_a_q4_1", performer::quant::QuantFormat::Q4_1),
    ] {
        let dir = tmp.path().join(name);
        performer::quant::quantize_dir(&common::fixture("default_a"), &dir, format, |_, _| {})
            .unwrap();
        s.push(Seed {
            name,
            config: std::fs::read(dir.join("config.json")).unwrap(),
            weights: std::fs::read(dir.join("model.safetensors")).unwrap(),
        });
    }
    s
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

#[derive(Debug, Default)]
struct Tally {
    cases: u64,
    opened: u64,
    loaded: u64,
    stepped: u64,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        self.cases += 1;
        self.opened += o.opened as u64;
        self.loaded += o.loaded as u64;
        self.stepped += o.stepped as u64;
    }
}

/// One mutated case from `seed`: 1–4 stacked mutations of the weights, sometimes of the config,
/// sometimes no config at all.
fn run_case(rng: &mut Rng, seed: &Seed, dir: &std::path::Path) -> Outcome {
    let mut weights = seed.weights.clone();
    let mut config = seed.config.clone();
    let which = rng.below(8);
    if which < 6 {
        for _ in 0..1 + rng.below(4) {
            mutate_weights(rng, &mut weights);
        }
    }
    if which >= 5 {
        for _ in 0..1 + rng.below(3) {
            mutate_config(rng, &mut config);
        }
    }
    let no_config = rng.one_in(16);
    write_dir(dir, (!no_config).then_some(&config[..]), &weights);
    exercise(dir)
}

#[test]
fn mutated_checkpoints_never_panic() {
    let cases = env_u64("PERFORMER_FUZZ_CASES").unwrap_or(150);
    let deadline = env_u64("PERFORMER_FUZZ_SECONDS").map(Duration::from_secs);
    let mut rng = Rng(env_u64("PERFORMER_FUZZ_SEED").unwrap_or(0x5EED_F022));
    let seeds = seeds();
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut tallies: Vec<Tally> = seeds.iter().map(|_| Tally::default()).collect();

    // The unmutated seeds load and run.
    for seed in &seeds {
        write_dir(tmp.path(), Some(&seed.config), &seed.weights);
        let o = exercise(tmp.path());
        assert!(o.loaded && o.stepped, "{}: {o:?}", seed.name);
    }

    let mut round = 0u64;
    loop {
        for (seed, tally) in seeds.iter().zip(tallies.iter_mut()) {
            // The tiny model is ~20× cheaper than the fixtures: give it more cases.
            let n = if seed.name == "tiny" { 8 } else { 1 };
            for _ in 0..n {
                tally.add(run_case(&mut rng, seed, tmp.path()));
            }
        }
        round += 1;
        let done = match deadline {
            Some(d) => start.elapsed() >= d,
            None => round >= cases,
        };
        if done {
            break;
        }
    }
    let total: u64 = tallies.iter().map(|t| t.cases).sum();
    let secs = start.elapsed().as_secs_f64();
    for (seed, t) in seeds.iter().zip(&tallies) {
        eprintln!("{:>16}: {t:?}", seed.name);
    }
    eprintln!(
        "loader_fuzz: {total} cases in {secs:.1} s ({:.0}/s), no panics",
        total as f64 / secs
    );
    // The mutations are not all fatal: some cases still load and run.
    assert!(tallies.iter().map(|t| t.loaded).sum::<u64>() > 0);
}

/// Writes the cargo-fuzz seed corpus, `fuzz/seeds/loader/` (run after changing the harness):
/// `cargo test --test loader_fuzz -- --ignored write_fuzz_seeds`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/loader");
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = harness::tiny_file();
    let with_mode = |mode: u8, rest: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(rest);
        v
    };
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("tiny".into(), with_mode(0, &tiny)),
        ("tiny_no_config".into(), with_mode(2, &tiny)),
        (
            "tiny_unpadded".into(),
            with_mode(0, &harness::file_for(&harness::tiny_tensors(), false)),
        ),
    ];
    let cfg = harness::TINY_CONFIG.as_bytes();
    let mut custom = vec![3];
    custom.extend_from_slice(&(cfg.len() as u16).to_le_bytes());
    custom.extend_from_slice(cfg);
    custom.extend_from_slice(&tiny);
    files.push(("tiny_custom_config".into(), custom));
    for entry in std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed/weights"),
    )
    .unwrap()
    {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        files.push((
            format!("malformed_{name}"),
            with_mode(0, &std::fs::read(&p).unwrap()),
        ));
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
