//! `performer loadtest`: argument parsing for [`performer_cli::loadtest`].

use std::time::Duration;

use clap::Args;
use performer_cli::conversation;
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
    /// Conversations instead: this many turns each, every turn continued through
    /// `previous_response_id` and re-sent whole through chat completions, side by side
    /// (--max-tokens per reply; one run per --concurrency level).
    #[arg(long, default_value_t = 0)]
    turns: usize,
    /// With --turns: only the Responses API path (no chat completions re-sends).
    #[arg(long)]
    no_chat: bool,
    /// With --turns: re-send turns 1, 2 and every N-th only.
    #[arg(long, default_value_t = 1)]
    chat_every: usize,
    /// With --turns: write both time-to-first-token curves of the first level to this SVG.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

/// Runs the load test and prints the table.
pub fn run(a: LoadtestArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.turns > 0 {
        return conversations(a);
    }
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

fn conversations(a: LoadtestArgs) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    for (i, &c) in a.concurrency.iter().enumerate() {
        let opts = conversation::ConversationOptions {
            url: a.url.trim_end_matches('/').to_string(),
            api_key: a.api_key.clone(),
            turns: a.turns,
            concurrency: c,
            max_tokens: a.max_tokens,
            compare_chat: !a.no_chat,
            chat_every: a.chat_every,
            server_pid: a.server_pid,
        };
        let report = rt.block_on(conversation::run(opts))?;
        if let (0, Some(path)) = (i, &a.svg) {
            let title = format!(
                "{} turns of {} tokens, {c} conversation(s) at once",
                a.turns, a.max_tokens
            );
            conversation::svg(&report, &title, path)?;
        }
        crate::out::print_stdout(&conversation::markdown(&report))?;
        if report.failed > 0 {
            return Err(format!("{} requests failed", report.failed).into());
        }
    }
    Ok(())
}
