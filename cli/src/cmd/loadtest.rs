//! `performer loadtest`: argument parsing for [`performer_cli::loadtest`].

use std::time::Duration;

use clap::Args;
use performer_cli::loadtest::{self, LoadOptions};

/// Arguments of `performer loadtest`.
#[derive(Args)]
#[command(after_help = "Example:
  performer loadtest --url http://127.0.0.1:8080 --concurrency 1,4,16,64 --duration 10 --server-pid $(pgrep -n performer)")]
pub struct LoadtestArgs {
    /// Base URL of a running `performer serve`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// The prompt of every request.
    #[arg(long, default_value = "The sea")]
    prompt: String,
    /// Bearer API key.
    #[arg(long)]
    api_key: Option<String>,
    /// Run on sessions pre-filled with this many tokens (each worker forks one base session).
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// The server's process id, to report its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// Runs the load test and prints the table.
pub fn run(a: LoadtestArgs) -> Result<(), Box<dyn std::error::Error>> {
    let opts = LoadOptions {
        url: a.url.trim_end_matches('/').to_string(),
        concurrency: a.concurrency,
        duration: Duration::from_secs_f64(a.duration),
        max_tokens: a.max_tokens,
        prompt: a.prompt,
        api_key: a.api_key,
        depth: a.depth,
        server_pid: a.server_pid,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let reports = rt.block_on(loadtest::run(opts))?;
    crate::out::print_stdout(&loadtest::markdown(&reports))
}
