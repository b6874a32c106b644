//! `performer bench --json-schema FILE`: decode speed with a JSON-schema constraint beside the
//! same decode unconstrained.
//!
//! Both sides run the whole generation loop ([`performer::Generation`]: sampling, the stop
//! rule, and on the constrained side the grammar's mask and matcher), from the same prompt
//! with the same seeds. A constrained generation ends when its JSON value is complete, so the
//! constrained side generates documents until it has `tokens` tokens; each unconstrained
//! generation then samples as many tokens as its constrained twin did, from the same
//! position, so both sides decode at the same depths. Prompt ingestion and grammar compiling
//! (both in [`performer::Generation::new`]) are outside the timed loop; compiling is reported
//! on its own.

use std::time::{Duration, Instant};

use performer::constraint::{Constraint, Grammar};
use performer::{GenerateOptions, Generation, Model, Result, SamplingParams, State};

use crate::bench::Stats;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ConstrainedOptions {
    /// The constraint (a JSON schema for `bench --json-schema`).
    pub constraint: Constraint,
    /// Tokens to generate per side and repetition (at least 1).
    pub tokens: usize,
    /// Timed repetitions (at least 1); the sides alternate which goes first.
    pub repetitions: usize,
    /// Seed of the first generation (then +1 per generation).
    pub seed: u64,
    /// The prompt text.
    pub prompt: String,
}

/// Decode tokens/s of each side over the repetitions.
#[derive(Debug, Clone)]
pub struct ConstrainedReport {
    /// Unconstrained decode, tokens/s.
    pub unconstrained: Stats,
    /// Constrained decode, tokens/s.
    pub constrained: Stats,
    /// Constrained / unconstrained, mean of the per-repetition ratios.
    pub ratio: Stats,
    /// Time to compile the constraint for the model (median of the repetitions), seconds.
    pub compile_s: f64,
    /// Generations per side and repetition (the constrained documents completed).
    pub documents: usize,
}

/// Runs one side: constrained generations until `o.tokens` tokens, or (with `lengths`)
/// unconstrained ones of those lengths; returns (tokens, decode time, lengths).
fn side(
    model: &Model,
    prompt: &[u32],
    o: &ConstrainedOptions,
    lengths: Option<&[usize]>,
) -> Result<(usize, Duration, Vec<usize>)> {
    let mut total = 0;
    let mut time = Duration::ZERO;
    let mut out = Vec::new();
    let mut i = 0;
    while total < o.tokens {
        let max_tokens = match lengths {
            Some(l) => match l.get(i) {
                Some(&n) => n,
                None => break,
            },
            None => o.tokens - total,
        };
        let mut state = State::new(model);
        let options = GenerateOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: None,
                top_p: None,
                seed: o.seed.wrapping_add(i as u64),
                ..SamplingParams::default()
            },
            constraint: lengths.is_none().then(|| o.constraint.clone()),
            ..GenerateOptions::default()
        };
        let mut g = Generation::new(model, &mut state, prompt, options)?;
        let start = Instant::now();
        for piece in g.by_ref() {
            piece?;
        }
        time += start.elapsed();
        let n = g.stats().generated_tokens;
        total += n;
        out.push(n);
        i += 1;
        if n == 0 {
            break;
        }
    }
    Ok((total, time, out))
}

/// Measures both sides `repetitions` times.
pub fn run(model: &Model, o: &ConstrainedOptions) -> Result<ConstrainedReport> {
    if o.tokens == 0 || o.repetitions == 0 {
        return Err(performer::Error::invalid(
            "tokens",
            "give at least one token and one repetition",
        ));
    }
    let prompt = model.tokenizer().encode(&o.prompt)?;
    let mut compile = Vec::new();
    let (mut con, mut unc, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let mut documents = 0;
    // Same seeds, same documents: an untimed constrained run (also a warm-up) fixes the
    // lengths the unconstrained side follows.
    let lengths = side(model, &prompt, o, None)?.2;
    for rep in 0..o.repetitions {
        let t = Instant::now();
        Grammar::compile(&o.constraint, model.tokenizer(), model.vocab_size())?;
        compile.push(t.elapsed().as_secs_f64());
        // The sides alternate which goes first.
        let (c, u) = if rep % 2 == 0 {
            let c = side(model, &prompt, o, None)?;
            (c, side(model, &prompt, o, Some(&lengths))?)
        } else {
            let u = side(model, &prompt, o, Some(&lengths))?;
            (side(model, &prompt, o, None)?, u)
        };
        documents = c.2.len();
        let c_tps = c.0 as f64 / c.1.as_secs_f64().max(1e-12);
        let u_tps = u.0 as f64 / u.1.as_secs_f64().max(1e-12);
        con.push(c_tps);
        unc.push(u_tps);
        ratio.push(c_tps / u_tps);
    }
    Ok(ConstrainedReport {
        unconstrained: Stats::of(&unc),
        constrained: Stats::of(&con),
        ratio: Stats::of(&ratio),
        compile_s: crate::bench::median(&compile),
        documents,
    })
}

/// The report as a markdown table; `kernels` is the model's kernel level and quantized method
/// (`bench::ModelInfo::kernels_label`).
pub fn markdown(
    name: &str,
    kernels: &str,
    o: &ConstrainedOptions,
    r: &ConstrainedReport,
) -> String {
    format!(
        "model: {name} | kernels: {kernels} | {} tokens per side, {} repetitions, {} documents per repetition, \
         compile {:.2} ms\n\n\
         | decode | tokens/s |\n|---|---|\n\
         | unconstrained | {:.1} ± {:.1} |\n\
         | JSON schema | {:.1} ± {:.1} |\n\
         | constrained / unconstrained | {:.3} ± {:.3} |\n",
        o.tokens,
        o.repetitions,
        r.documents,
        r.compile_s * 1e3,
        r.unconstrained.mean,
        r.unconstrained.sd,
        r.constrained.mean,
        r.constrained.sd,
        r.ratio.mean,
        r.ratio.sd,
    )
}

/// The report as JSON (`kernels` as in [`markdown`]).
pub fn json(name: &str, kernels: &str, o: &ConstrainedOptions, r: &ConstrainedReport) -> String {
    serde_json::json!({
        "model": name,
        "kernels": kernels,
        "tokens": o.tokens,
        "repetitions": o.repetitions,
        "documents": r.documents,
        "compile_ms": r.compile_s * 1e3,
        "unconstrained_tokens_per_s": r.unconstrained.mean,
        "unconstrained_stddev": r.unconstrained.sd,
        "constrained_tokens_per_s": r.constrained.mean,
        "constrained_stddev": r.constrained.sd,
        "ratio": r.ratio.mean,
        "ratio_stddev": r.ratio.sd,
    })
    .to_string()
}
