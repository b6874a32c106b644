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
    /// Their median.
    pub median_ratio: f64,
    /// Time to compile the constraint for the model (median of the repetitions), seconds.
    pub compile_s: f64,
    /// Generations per side and repetition (the constrained documents completed).
    pub documents: usize,
}

/// One generation from `prompt` with seed `o.seed + i`: constrained, or (with `max_tokens`)
/// unconstrained for that many tokens; returns (tokens, decode time).
fn one(
    model: &Model,
    prompt: &[u32],
    o: &ConstrainedOptions,
    i: usize,
    max_tokens: Option<usize>,
) -> Result<(usize, Duration)> {
    let mut state = State::new(model);
    let options = GenerateOptions {
        max_tokens: max_tokens.unwrap_or(o.tokens),
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: o.seed.wrapping_add(i as u64),
            ..SamplingParams::default()
        },
        constraint: max_tokens.is_none().then(|| o.constraint.clone()),
        ..GenerateOptions::default()
    };
    let mut g = Generation::new(model, &mut state, prompt, options)?;
    let start = Instant::now();
    for piece in g.by_ref() {
        piece?;
    }
    let time = start.elapsed();
    Ok((g.stats().generated_tokens, time))
}

/// Measures both sides `repetitions` times. The sides alternate document by document (the
/// constrained document, then its unconstrained twin, or the other way round), so that both
/// see the same load from anything else on the machine.
pub fn run(model: &Model, o: &ConstrainedOptions) -> Result<ConstrainedReport> {
    if o.tokens == 0 || o.repetitions == 0 {
        return Err(performer::Error::invalid(
            "tokens",
            "give at least one token and one repetition",
        ));
    }
    let prompt = model.tokenizer().encode(&o.prompt)?;
    // Same seeds, same documents: an untimed constrained run (also a warm-up) fixes the
    // lengths the unconstrained side follows.
    let mut lengths = Vec::new();
    let mut total = 0;
    while total < o.tokens {
        let n = one(model, &prompt, o, lengths.len(), None)?.0;
        if n == 0 {
            break;
        }
        total += n;
        lengths.push(n);
    }
    let mut compile = Vec::new();
    let (mut con, mut unc, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..o.repetitions {
        let t = Instant::now();
        Grammar::compile(&o.constraint, model.tokenizer(), model.vocab_size())?;
        compile.push(t.elapsed().as_secs_f64());
        let (mut c, mut u) = ((0, Duration::ZERO), (0, Duration::ZERO));
        for (i, &n) in lengths.iter().enumerate() {
            let add = |acc: &mut (usize, Duration), (k, t): (usize, Duration)| {
                acc.0 += k;
                acc.1 += t;
            };
            if (rep + i).is_multiple_of(2) {
                add(&mut c, one(model, &prompt, o, i, None)?);
                add(&mut u, one(model, &prompt, o, i, Some(n))?);
            } else {
                add(&mut u, one(model, &prompt, o, i, Some(n))?);
                add(&mut c, one(model, &prompt, o, i, None)?);
            }
        }
        let c_tps = c.0 as f64 / c.1.as_secs_f64().max(1e-12);
        let u_tps = u.0 as f64 / u.1.as_secs_f64().max(1e-12);
        con.push(c_tps);
        unc.push(u_tps);
        ratio.push(c_tps / u_tps);
    }
    Ok(ConstrainedReport {
        unconstrained: Stats::of(&unc),
        constrained: Stats::of(&con),
        median_ratio: crate::bench::median(&ratio),
        ratio: Stats::of(&ratio),
        compile_s: crate::bench::median(&compile),
        documents: lengths.len(),
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
         | constrained / unconstrained | {:.3} ± {:.3} (median {:.3}) |\n",
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
        r.median_ratio,
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
        "ratio_median": r.median_ratio,
    })
    .to_string()
}

/// `bench --json-schema FILE --batch B`: the serving engine's batched decode with `B`
/// unconstrained streams beside `B` other streams, either constrained (the JSON schema) or
/// unconstrained twins of the same lengths; the unconstrained streams' decode speed on the two
/// sides, measured side by side.
///
/// Each other stream is a chain of requests, one after another until the measured streams
/// end: on the constrained side documents of the schema (each ends when its value is
/// complete), on the unconstrained side requests of the same seeds that sample as many tokens
/// as those documents have (their lengths are measured first, untimed), so that both sides
/// step the same rows in every tick and ingest the same prompts between them.
#[derive(Debug, Clone)]
pub struct MixedReport {
    /// Tokens/s of the measured streams (summed over them) beside unconstrained twins.
    pub beside_unconstrained: Stats,
    /// The same beside constrained streams.
    pub beside_constrained: Stats,
    /// Beside constrained / beside unconstrained, per repetition.
    pub ratio: Stats,
    /// Medians of the two sides and their ratio.
    pub medians: (f64, f64, f64),
    /// Most rows stepped in one tick (2 × B when the two kinds share ticks).
    pub max_batch: usize,
    /// Documents the constrained side completed per repetition (median).
    pub documents: f64,
}

#[derive(Default)]
struct MaxBatch(std::sync::atomic::AtomicUsize);

impl performer_engine::Observer for MaxBatch {
    fn batch(&self, rows: usize) {
        self.0.fetch_max(rows, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Documents per chain whose lengths are measured (chains that need more wrap around).
const CHAIN_DOCS: usize = 32;

/// Runs [`MixedReport`]'s measurement with `batch` streams of each kind and `threads` decode
/// threads; `o.tokens` tokens per measured stream.
pub fn mixed(
    model: &std::sync::Arc<Model>,
    o: &ConstrainedOptions,
    batch: usize,
    threads: usize,
) -> Result<MixedReport> {
    use performer_engine::{CompletionRequest, Engine, EngineConfig, Event};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};

    if o.tokens == 0 || o.repetitions == 0 || batch == 0 {
        return Err(performer::Error::invalid(
            "tokens",
            "give at least one token, one repetition and a batch of one",
        ));
    }
    let grammar = Grammar::compile(&o.constraint, model.tokenizer(), model.vocab_size())?;
    let prompt = model.tokenizer().encode(&o.prompt)?;
    let observer = Arc::new(MaxBatch::default());
    let engine = Engine::start_with_observer(
        model.clone(),
        EngineConfig {
            threads,
            max_batch: 2 * batch,
            ..EngineConfig::default()
        },
        None,
        Some(observer.clone()),
    )
    .map_err(|e| performer::Error::invalid("engine", e.to_string()))?;
    let engine = Arc::new(engine);
    let sampling = |seed: u64| SamplingParams {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed,
        ..SamplingParams::default()
    };
    let doc_seed = |chain: usize, k: usize| {
        o.seed
            .wrapping_add(1_000_000)
            .wrapping_add((chain * CHAIN_DOCS + k % CHAIN_DOCS) as u64)
    };
    let engine_err =
        |e: performer_engine::Error| performer::Error::invalid("engine", e.to_string());
    // The documents' lengths, untimed (also the warm-up).
    let mut lengths = vec![vec![0usize; CHAIN_DOCS]; batch];
    for (chain, l) in lengths.iter_mut().enumerate() {
        for (k, len) in l.iter_mut().enumerate() {
            let mut r =
                CompletionRequest::new(prompt.clone(), o.tokens, sampling(doc_seed(chain, k)));
            r.constraint = Some(grammar.clone());
            *len = engine
                .complete(r)
                .map_err(engine_err)?
                .usage
                .completion_tokens;
        }
    }
    let lengths = Arc::new(lengths);
    // One side: the measured streams' summed tokens/s, and the documents completed.
    let side = |constrained: bool| -> Result<(f64, usize)> {
        let stop = Arc::new(AtomicBool::new(false));
        let docs = Arc::new(AtomicUsize::new(0));
        let mut chains = Vec::new();
        for chain in 0..batch {
            let (engine, stop, docs, grammar, lengths, prompt) = (
                engine.clone(),
                stop.clone(),
                docs.clone(),
                grammar.clone(),
                lengths.clone(),
                prompt.clone(),
            );
            let seeds: Vec<u64> = (0..CHAIN_DOCS).map(|k| doc_seed(chain, k)).collect();
            let max = o.tokens;
            chains.push(std::thread::spawn(
                move || -> std::result::Result<(), String> {
                    let mut k = 0;
                    while !stop.load(Ordering::Acquire) {
                        let seed = seeds[k % CHAIN_DOCS];
                        let mut r = CompletionRequest::new(prompt.clone(), max, sampling(seed));
                        if constrained {
                            r.constraint = Some(grammar.clone());
                        } else {
                            r.max_tokens = lengths[chain][k % CHAIN_DOCS];
                        }
                        engine.complete(r).map_err(|e| e.to_string())?;
                        docs.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                    }
                    Ok(())
                },
            ));
        }
        // The measured streams start once every chain has its first request in.
        std::thread::sleep(Duration::from_millis(20));
        let (tx, rx) = mpsc::channel();
        for i in 0..batch {
            let tx = tx.clone();
            let r = CompletionRequest::new(prompt.clone(), o.tokens, sampling(o.seed + i as u64));
            engine
                .submit(
                    r,
                    Box::new(move |e| {
                        let now = Instant::now();
                        tx.send((i, matches!(e, Event::Done { .. }), now, e))
                            .is_ok()
                    }),
                )
                .map_err(engine_err)?;
        }
        drop(tx);
        let mut first = vec![None; batch];
        let mut last = vec![None; batch];
        let mut failed = None;
        for (i, done, at, e) in rx {
            match e {
                Event::Text { .. } if first[i].is_none() => first[i] = Some(at),
                Event::Failed(e) => failed = Some(e.to_string()),
                _ => {}
            }
            if done {
                last[i] = Some(at);
            }
        }
        stop.store(true, Ordering::Release);
        for c in chains {
            c.join()
                .map_err(|_| performer::Error::invalid("engine", "a chain panicked"))?
                .map_err(|e| performer::Error::invalid("engine", e))?;
        }
        if let Some(e) = failed {
            return Err(performer::Error::invalid("engine", e));
        }
        // Tokens after the first, over the time from the first to the end, summed.
        let mut tps = 0.0;
        for (f, l) in first.iter().zip(&last) {
            let (Some(f), Some(l)) = (f, l) else {
                return Err(performer::Error::invalid(
                    "engine",
                    "a stream returned no text",
                ));
            };
            tps += (o.tokens - 1) as f64 / l.duration_since(*f).as_secs_f64().max(1e-12);
        }
        Ok((tps, docs.load(Ordering::Relaxed)))
    };
    let (mut plain, mut con, mut ratio, mut documents) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..o.repetitions {
        let (u, c) = if rep.is_multiple_of(2) {
            let u = side(false)?;
            (u, side(true)?)
        } else {
            let c = side(true)?;
            (side(false)?, c)
        };
        plain.push(u.0);
        con.push(c.0);
        ratio.push(c.0 / u.0);
        documents.push(c.1 as f64);
    }
    let (mu, mc) = (crate::bench::median(&plain), crate::bench::median(&con));
    Ok(MixedReport {
        beside_unconstrained: Stats::of(&plain),
        beside_constrained: Stats::of(&con),
        ratio: Stats::of(&ratio),
        medians: (mu, mc, mc / mu),
        max_batch: observer.0.load(Ordering::Relaxed),
        documents: crate::bench::median(&documents),
    })
}

/// [`mixed`]'s report as a markdown table.
pub fn mixed_markdown(
    name: &str,
    kernels: &str,
    o: &ConstrainedOptions,
    batch: usize,
    r: &MixedReport,
) -> String {
    format!(
        "model: {name} | kernels: {kernels} | engine: {batch} unconstrained streams of {} tokens \
         beside {batch} others, {} repetitions, {:.0} documents per repetition (median), most \
         rows in one tick {}\n\n\
         | unconstrained streams beside | tokens/s (sum) | median |\n|---|---|---|\n\
         | unconstrained twins | {:.1} ± {:.1} | {:.1} |\n\
         | JSON-schema streams | {:.1} ± {:.1} | {:.1} |\n\
         | ratio | {:.3} ± {:.3} | {:.3} |\n",
        o.tokens,
        o.repetitions,
        r.documents,
        r.max_batch,
        r.beside_unconstrained.mean,
        r.beside_unconstrained.sd,
        r.medians.0,
        r.beside_constrained.mean,
        r.beside_constrained.sd,
        r.medians.1,
        r.ratio.mean,
        r.ratio.sd,
        r.medians.2,
    )
}

/// [`mixed`]'s report as JSON.
pub fn mixed_json(
    name: &str,
    kernels: &str,
    o: &ConstrainedOptions,
    batch: usize,
    r: &MixedReport,
) -> String {
    serde_json::json!({
        "model": name,
        "kernels": kernels,
        "batch": batch,
        "tokens": o.tokens,
        "repetitions": o.repetitions,
        "documents_median": r.documents,
        "max_batch": r.max_batch,
        "beside_unconstrained_tokens_per_s": r.beside_unconstrained.mean,
        "beside_unconstrained_median": r.medians.0,
        "beside_constrained_tokens_per_s": r.beside_constrained.mean,
        "beside_constrained_median": r.medians.1,
        "ratio": r.ratio.mean,
        "ratio_stddev": r.ratio.sd,
        "ratio_of_medians": r.medians.2,
    })
    .to_string()
}
