//! The `performer` command line: the top-level arguments and the dispatch to one module per
//! command (`cmd/`), which parses its arguments and calls the library; errors become one-line
//! messages and exit codes here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod cmd;
mod constraint_args;
mod out;

use cmd::shared::default_model_dir;
use out::StdoutClosed;

#[derive(Parser)]
#[command(
    name = "performer",
    version,
    about = "Streaming CPU inference for causal Performer (FAVOR+) language models"
)]
struct Cli {
    /// Worker threads (default: all cores; at most 4 × the cores, and never over 1024).
    #[arg(long, global = true, value_parser = args::threads)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(cmd::generate::GenerateArgs),
    /// Print a model's config, parameters, dtypes and per-sequence state size.
    Info(cmd::info::InfoArgs),
    /// Write the logits after each of the given tokens to a .npy file.
    Logits(cmd::logits::LogitsArgs),
    /// Score a text file: tokens, mean NLL, perplexity and bits per byte.
    Perplexity(cmd::perplexity::PerplexityArgs),
    /// Measure prefill and generation throughput by context depth (llama-bench style).
    Bench(cmd::bench::BenchArgs),
    /// Serve the model over HTTP: OpenAI completions, sessions, metrics, a playground.
    Serve(cmd::serve::ServeArgs),
    /// Load-test a running server with concurrent streaming requests.
    Loadtest(cmd::loadtest::LoadtestArgs),
    /// Write a copy of a model with block-quantized linear weights (q8_0, q4_0 or q4_1).
    Quantize(cmd::quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    out::ignore_sigxfsz();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Logits(a) => cmd::logits::run(a),
        Command::Perplexity(a) => cmd::perplexity::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Loadtest(a) => cmd::loadtest::run(a),
        Command::Serve(a) => {
            cmd::serve::run(a, cli.threads, default_model_dir()).map_err(Into::into)
        }
        Command::Quantize(a) => cmd::quantize::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`| head`): end quietly, like cat and grep.
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        // A constraint that cannot be used is a usage error, like clap's.
        Err(e) if e.is::<constraint_args::UsageError>() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        // A constraint that cannot be used is a usage error, like clap's.
        Err(e) if e.is::<constraint_args::UsageError>() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
