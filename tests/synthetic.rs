//! Synthetic checkpoints: written, loaded through the normal path, and run.

use performer::synthetic::{self, Rng, SyntheticShape, WeightDtype};
use performer::{Model, State};

fn small() -> SyntheticShape {
    SyntheticShape {
        name: "small".into(),
        dim: 64,
        depth: 2,
        heads: 2,
        dim_head: 32,
        ff_mult: 2,
        nb_features: 48,
        vocab: 256,
        max_seq_len: 32,
    }
}

#[test]
fn tiny_model_loads_and_steps() {
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(dir.path(), &shape, WeightDtype::F32, 7).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let c = model.config();
    assert_eq!(
        (
            c.dim,
            c.depth,
            c.heads,
            c.dim_head,
            c.nb_features,
            c.num_tokens,
            c.max_seq_len
        ),
        (256, 4, 4, 64, 128, 256, 1024)
    );
    assert!(c.causal);
    assert_eq!(model.parameter_count(), shape.parameter_count());
    let file = std::fs::metadata(dir.path().join("model.safetensors"))
        .unwrap()
        .len() as usize;
    let data = shape.file_bytes(WeightDtype::F32);
    assert!(file >= data && file < data + 64 * 1024, "{file} vs {data}");

    let mut state = State::new(&model);
    let mut rng = Rng::new(1);
    for t in rng.tokens(20, 256) {
        let logits = model.step(&mut state, t).unwrap();
        assert_eq!(logits.len(), 256);
        assert!(logits.iter().all(|x| x.is_finite()));
        // O(1) activations: logits neither vanish nor explode.
        let max = logits.iter().fold(0f32, |a, &b| a.max(b.abs()));
        assert!(max > 0.05 && max < 100.0, "max |logit| = {max}");
    }
    let mut fresh = State::new(&model);
    let prefill = model.prefill(&mut fresh, &[1, 2, 3]).unwrap();
    assert!(prefill.iter().all(|x| x.is_finite()));
}

#[test]
fn every_dtype_loads_and_agrees_roughly() {
    let shape = small();
    let mut outs = Vec::new();
    for dtype in [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16] {
        let dir = tempfile::tempdir().unwrap();
        synthetic::write(dir.path(), &shape, dtype, 3).unwrap();
        let model = Model::load(dir.path()).unwrap();
        let counts = model.dtype_counts();
        assert_eq!(counts.len(), 1, "{counts:?}");
        let mut state = State::new(&model);
        // Past max_seq_len too: the position tables extend by the formula.
        let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 256) as u32).collect();
        outs.push(model.prefill(&mut state, &tokens).unwrap().to_vec());
    }
    // The same seed gives the same values, rounded to each dtype.
    for o in &outs[1..] {
        let diff = o
            .iter()
            .zip(&outs[0])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 0.5, "max diff {diff}");
    }
}

#[test]
fn writing_is_deterministic_and_seeded() {
    let shape = small();
    let read = |seed: u64| {
        let dir = tempfile::tempdir().unwrap();
        synthetic::write(dir.path(), &shape, WeightDtype::Bf16, seed).unwrap();
        std::fs::read(dir.path().join("model.safetensors")).unwrap()
    };
    let a = read(5);
    assert_eq!(a, read(5));
    assert_ne!(a, read(6));
}

#[test]
fn named_shapes_and_sizes() {
    assert!(SyntheticShape::named("nope").is_none());
    let gpt2 = SyntheticShape::named("gpt2-small").unwrap();
    // 12 layers of 12·768² plus two 50257×768 tables, with biases and norms.
    assert_eq!(gpt2.parameter_count(), 162_264_145);
    let large = SyntheticShape::named("large").unwrap();
    assert!(large.parameter_count() > 350_000_000);
    // Larger than a 32 MiB L3 by far, even in bf16.
    assert!(large.file_bytes(WeightDtype::Bf16) > 700 << 20);
    let json: serde_json::Value =
        serde_json::from_str(&SyntheticShape::named("tiny").unwrap().config_json()).unwrap();
    assert_eq!(json["causal"], true);
    assert_eq!("bf16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
    assert!("f8".parse::<WeightDtype>().is_err());
}

#[test]
fn rng_normal_has_unit_variance() {
    let mut rng = Rng::new(11);
    let n = 200_000;
    let xs: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    let mean = xs.iter().sum::<f32>() / n as f32;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32;
    assert!(mean.abs() < 0.01, "{mean}");
    assert!((var - 1.0).abs() < 0.02, "{var}");
    assert!(rng.tokens(1000, 10).iter().all(|&t| t < 10));
}
