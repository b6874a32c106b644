//! A whole decode step and a 64-token prefill of the synthetic `tiny` model (f32 and bf16).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use performer::synthetic::{self, SyntheticShape, WeightDtype};
use performer::{Model, State};

fn decode(c: &mut Criterion) {
    let shape = SyntheticShape::named("tiny").expect("tiny is a named shape");
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let dir = tempfile::tempdir().expect("temporary directory");
        synthetic::write(dir.path(), &shape, dtype, 1).expect("write the synthetic model");
        let model = Model::load(dir.path()).expect("load the synthetic model");
        let mut g = c.benchmark_group(format!("tiny_{dtype}"));
        g.measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500))
            .sample_size(20);

        // One step at a fixed depth: start each batch from a state that has seen 64 tokens.
        let mut warm = State::new(&model);
        let prompt: Vec<u32> = (0..64).map(|i| (i * 37 % 256) as u32).collect();
        model.prefill(&mut warm, &prompt).expect("prefill");
        g.throughput(Throughput::Elements(1));
        g.bench_function("decode_step", |b| {
            let mut state = warm.clone();
            let mut t = 0u32;
            b.iter(|| {
                t = (t + 1) % 256;
                black_box(model.step(&mut state, black_box(t)).expect("step")[0])
            })
        });

        g.throughput(Throughput::Elements(prompt.len() as u64));
        g.bench_function("prefill_64", |b| {
            let mut state = State::new(&model);
            b.iter(|| {
                state.reset();
                black_box(
                    model
                        .prefill(&mut state, black_box(&prompt))
                        .expect("prefill")[0],
                )
            })
        });
        g.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
