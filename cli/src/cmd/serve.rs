//! `performer serve`: the HTTP server (see the `performer-server` crate).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use performer_engine::EngineConfig;
use performer_server::{load_api_keys, ServeConfig, ServerOptions};

/// Arguments of `performer serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Model directory (config.json + model.safetensors); default: the model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    quant: crate::args::QuantKernelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most generations stepped together per tick.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Most requests waiting for a slot; beyond, 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Longest prompt, in tokens.
    #[arg(long, default_value_t = 1 << 20)]
    max_prompt_tokens: usize,
    /// Prompt tokens ingested between two decode ticks (whole attention chunks of 64, at
    /// least two): the longest every other stream waits for a new prompt. Larger pieces
    /// prefill faster (longer matrix products) and stall the other streams longer
    /// (docs/serving.md).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Most prompt tokens one tenant (API key) may have waiting to be ingested; beyond, 429.
    /// Prompts are ingested in turns, so one tenant's long prompts cannot hold up another's.
    #[arg(long, default_value_t = 1 << 21)]
    max_tenant_prompt_tokens: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 1 << 16)]
    max_tokens: usize,
    /// Bytes of session states kept in memory (suffixes KiB, MiB, GiB); beyond, the least
    /// recently used go to --session-dir.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    max_session_memory: usize,
    /// Bytes of the prefix-state cache (suffixes as above; 0 disables it): states at slice
    /// boundaries of recent prompts, one state per cached prefix whatever its length, from
    /// which a later prompt of the same tenant with the same head resumes (output unchanged).
    /// Least recently used entries go first.
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    prefix_cache_memory: usize,
    /// Directory where sessions spill and persist across restarts (default: memory only).
    #[arg(long, conflicts_with = "session_store")]
    session_dir: Option<PathBuf>,
    /// Keep sessions in a Redis (or Valkey) shared by every replica, redis://HOST:PORT/DB:
    /// any replica serves any session; this replica's memory is only a cache, checked against
    /// the stored version before every request and written through (compare-and-set, 409 on a
    /// conflict) before a request completes. While Redis is unreachable, session requests get
    /// 503 with Retry-After and stateless completions keep working.
    #[arg(long, value_name = "URL")]
    session_store: Option<String>,
    /// Drop sessions idle for this many seconds (default: never).
    #[arg(long)]
    session_ttl: Option<u64>,
    /// File with one API key per line; each key is a tenant. Without it, no authentication.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Largest request body (JSON), with suffixes as above.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    max_body: usize,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    grace: u64,
    /// Seconds a client may take to send a request's header; then its connection is closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout: u64,
    /// Seconds a client may take to send a request's body after its header; then the request
    /// fails and the connection is closed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout: u64,
    /// Most connections open at once; past it new connections get 503 and are closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
}

/// `1048576`, `512KiB`, `256MiB`, `1GiB`.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (e.g. 256MiB)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(a: ServeArgs, threads: Option<usize>, model_dir: PathBuf) -> Result<(), String> {
    let api_keys = a.api_key_file.as_deref().map(load_api_keys).transpose()?;
    let engine = EngineConfig {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        max_prompt_tokens: a.max_prompt_tokens,
        prefill_chunk: a.prefill_chunk,
        max_tokens: a.max_tokens,
        max_session_memory: a.max_session_memory,
        prefix_cache_memory: a.prefix_cache_memory,
        max_tenant_prompt_tokens: a.max_tenant_prompt_tokens,
        session_ttl: a.session_ttl.map(Duration::from_secs),
        threads: threads.unwrap_or(EngineConfig::default().threads),
        ..EngineConfig::default()
    };
    performer_server::run(ServeConfig {
        model_dir: a.model.unwrap_or(model_dir),
        quant_kernel: a.quant.quant_kernel,
        no_packed_rows: a.quant.no_packed_rows,
        host: a.host,
        port: a.port,
        engine,
        session_dir: a.session_dir,
        session_store: a.session_store,
        options: ServerOptions {
            api_keys,
            max_body_bytes: a.max_body,
            grace: Duration::from_secs(a.grace),
            header_timeout: Duration::from_secs(a.header_timeout),
            body_timeout: Duration::from_secs(a.body_timeout),
            max_connections: a.max_connections as usize,
            ..ServerOptions::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("42"), Ok(42));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn the_prefix_cache_default_is_the_engines() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: super::ServeArgs,
        }
        let cli = Cli::try_parse_from(["serve"]).unwrap();
        assert_eq!(
            cli.serve.prefix_cache_memory,
            performer_engine::DEFAULT_PREFIX_CACHE_MEMORY
        );
    }
}
