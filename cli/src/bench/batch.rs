//! `performer bench --batch`: aggregate decode throughput of B sequences stepped together
//! ([`performer::Model::step_batch`]) at a given context depth, in the manner of
//! llama-batched-bench.
//!
//! For each depth one state is prefilled with random tokens and cloned B times (a state's
//! size and cost do not depend on what it read, so clones time exactly like B separately
//! prefilled sequences); then `tg` batched steps are timed, `repetitions` times.

use std::time::Instant;

use performer::synthetic::Rng;
use performer::{Model, Result, State};

use super::{format_bytes, format_count, median, Stats};

/// One measured (depth, B) point.
#[derive(Debug, Clone)]
pub struct BatchRow {
    /// Context depth of every sequence when the timed steps start.
    pub depth: usize,
    /// Sequences stepped together.
    pub batch: usize,
    /// Aggregate generated tokens per second over the repetitions (mean, sd).
    pub tokens_per_s: Stats,
    /// Their median.
    pub median_tokens_per_s: f64,
    /// Median time of one batched step, in milliseconds.
    pub step_ms: f64,
    /// Bytes of the B states.
    pub state_bytes: usize,
}

/// Options of a batched run.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Context depths.
    pub depths: Vec<usize>,
    /// Timed steps per repetition.
    pub tg: usize,
    /// Repetitions.
    pub repetitions: usize,
    /// Threads of the pool the steps run in.
    pub threads: usize,
    /// Seed of the random tokens.
    pub seed: u64,
}

impl BatchOptions {
    /// Checks the options before anything is measured: at least one batch size, none of them
    /// 0, and at least one timed step and repetition.
    pub fn validate(&self) -> Result<()> {
        if self.batches.is_empty() || self.batches.contains(&0) {
            return Err(performer::Error::invalid(
                "batch",
                "batch sizes must be at least 1",
            ));
        }
        if self.tg == 0 || self.repetitions == 0 {
            return Err(performer::Error::invalid(
                "tg/repetitions",
                "a batched run needs at least one step and one repetition",
            ));
        }
        Ok(())
    }
}

/// Measures every (depth, B) point.
pub fn run(model: &Model, opts: &BatchOptions) -> Result<Vec<BatchRow>> {
    opts.validate()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| performer::Error::invalid("threads", e.to_string()))?;
    let vocab = model.vocab_size();
    let mut rng = Rng::new(opts.seed);
    let mut rows = Vec::new();
    for &depth in &opts.depths {
        let mut base = State::new(model);
        let prompt = rng.tokens(depth.max(1), vocab);
        pool.install(|| model.prefill(&mut base, &prompt))?;
        for &b in &opts.batches {
            let mut states: Vec<State> = (0..b).map(|_| base.fork()).collect();
            let mut per_rep = Vec::new();
            let mut steps = Vec::new();
            for rep in 0..=opts.repetitions {
                let tokens: Vec<Vec<u32>> = (0..opts.tg).map(|_| rng.tokens(b, vocab)).collect();
                let start = Instant::now();
                for t in &tokens {
                    let mut refs: Vec<&mut State> = states.iter_mut().collect();
                    pool.install(|| model.step_batch(&mut refs, t))?;
                }
                let secs = start.elapsed().as_secs_f64();
                if rep > 0 {
                    // Repetition 0 warms caches and pages up; it is not counted.
                    per_rep.push((b * opts.tg) as f64 / secs);
                    steps.push(secs * 1e3 / opts.tg as f64);
                }
            }
            rows.push(BatchRow {
                depth,
                batch: b,
                tokens_per_s: Stats::of(&per_rep),
                median_tokens_per_s: median(&per_rep),
                step_ms: median(&steps),
                state_bytes: states.iter().map(State::size_bytes).sum(),
            });
        }
    }
    Ok(rows)
}

/// The markdown table, with each B's speed-up over B = 1 at the same depth. `kernels` is the
/// last column ([`super::report::ModelInfo::kernels_label`]); the first five columns keep their
/// places (scripts read the aggregate from the fifth).
pub fn markdown(model_name: &str, kernels: &str, threads: usize, rows: &[BatchRow]) -> String {
    let mut out = String::from(
        "| model | threads | depth | B | aggregate t/s (median ± sd) | per sequence t/s | step ms | × B=1 | states | kernels |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let one = rows
            .iter()
            .find(|o| o.depth == r.depth && o.batch == 1)
            .map(|o| o.median_tokens_per_s);
        let ratio = one.map_or("–".to_string(), |o| {
            format!("{:.2}", r.median_tokens_per_s / o)
        });
        out += &format!(
            "| {model_name} | {threads} | {} | {} | {:.1} ± {:.1} | {:.1} | {:.3} | {ratio} | {} | {kernels} |\n",
            format_count(r.depth),
            r.batch,
            r.median_tokens_per_s,
            r.tokens_per_s.sd,
            r.median_tokens_per_s / r.batch as f64,
            r.step_ms,
            format_bytes(r.state_bytes as u64),
        );
    }
    out
}
