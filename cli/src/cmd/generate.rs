//! `performer generate`: text from a prompt, streamed to stdout.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use performer::{GenerateOptions, Generation, SamplingParams, State};

use super::shared::{CliResult, ModelArgs};
use crate::args;
use crate::out::stdout_error;

/// The largest prompt file read (a prompt of 64 Mi byte tokens takes hours to ingest).
const MAX_PROMPT_BYTES: u64 = 64 << 20;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Threads for decoding, in a pool of their own (the prompt uses --threads). Default:
    /// --threads. Bounded like --threads.
    #[arg(long, value_parser = args::threads)]
    decode_threads: Option<usize>,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file (bytes, need not be UTF-8): a regular file of at most
    /// 64 MiB.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (finite, ≥ 0); 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8, value_parser = args::non_negative)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold in (0, 1]; 1 disables it.
    #[arg(long, default_value_t = 0.95, value_parser = args::probability)]
    top_p: f32,
    /// Repetition penalty (finite, > 0; 1 disables it).
    #[arg(long, default_value_t = 1.0, value_parser = args::positive)]
    repeat_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop at this string (repeatable, not empty); it is not printed, and not kept in a
    /// saved state.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    stop: Vec<String>,
    /// Continue from a state saved by --save-state (the prompt, if any, is appended).
    #[arg(long)]
    load_state: Option<PathBuf>,
    /// Save the state after generation (prompt and the printed text) to this file, atomically.
    #[arg(long)]
    save_state: Option<PathBuf>,
    #[command(flatten)]
    constraint: crate::constraint_args::ConstraintArgs,
}

pub fn run(a: GenerateArgs) -> CliResult {
    let prompt: Vec<u8> = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone().into_bytes(),
        (None, Some(f)) => performer::fsutil::read_regular_file(f, MAX_PROMPT_BYTES)?,
        (None, None) if a.load_state.is_some() => Vec::new(),
        (None, None) => return Err("give a prompt with --prompt TEXT or --prompt-file FILE".into()),
    };
    // Before any long work: a state that could not be saved is better refused now.
    if let Some(path) = &a.save_state {
        performer::fsutil::check_writable_dir(path)?;
    }
    let constraint = a.constraint.constraint()?;
    let model = a.model.load()?;
    let prompt = model.tokenizer().encode_bytes(&prompt)?;
    let mut state = match &a.load_state {
        Some(path) => State::load(&model, path)?,
        None => State::new(&model),
    };
    let options = GenerateOptions {
        max_tokens: a.max_tokens,
        stop: a.stop,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: (a.top_k > 0).then_some(a.top_k),
            top_p: (a.top_p != 1.0).then_some(a.top_p),
            repetition_penalty: a.repeat_penalty,
            seed: a.seed,
            ..SamplingParams::default()
        },
        decode_threads: a.decode_threads,
        constraint,
        ..GenerateOptions::default()
    };
    // A prompt that takes a while shows its progress, on a terminal only.
    let bar = if std::io::stderr().is_terminal() && prompt.len() >= 4096 {
        let bar = indicatif::ProgressBar::new(prompt.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "prompt {bar:40} {pos}/{len} tokens {per_sec} eta {eta}",
            )
            .map_err(|e| e.to_string())?,
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut generation =
        Generation::with_progress(&model, &mut state, &prompt, options, &mut |n| {
            bar.set_position(n as u64)
        })
        .map_err(crate::constraint_args::usage_if_invalid)?;
    bar.finish_and_clear();
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal();
    let mut out = stdout.lock();
    // Stdout carries exactly the generated text; if its reader goes away, the generation
    // ends quietly and no state is saved (it would hold text nobody read).
    for piece in generation.by_ref() {
        out.write_all(piece?.as_bytes()).map_err(stdout_error)?;
        out.flush().map_err(stdout_error)?;
    }
    if terminal {
        // Cosmetic, for a prompt that would follow the text on the same line.
        writeln!(out).map_err(stdout_error)?;
    }
    let s = generation.stats();
    drop(generation);
    if let Some(path) = &a.save_state {
        state.save(&model, path)?;
    }
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s",
        s.prompt_tokens,
        s.prompt_tokens_per_s(),
        s.generated_tokens,
        s.decode_tokens_per_s()
    );
    Ok(())
}
