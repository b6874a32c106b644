//! The `performer` command line: parses arguments, calls the library, and turns errors into
//! one-line messages and exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench_cmd;
use performer::config::{Config, Origin};
use performer::weights::{names, WeightFile};
use performer::{GenerateOptions, Generation, LoadOptions, Model, SamplingParams, State};

/// The model shipped in `models/`.
const DEFAULT_MODEL: &str = "models/performer-byte";

#[derive(Parser)]
#[command(
    name = "performer",
    version,
    about = "Streaming CPU inference for causal Performer (FAVOR+) language models"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Print a model's config, parameters, dtypes and per-sequence state size.
    Info(InfoArgs),
    /// Write the logits after each of the given tokens to a .npy file.
    Logits(LogitsArgs),
    /// Score a text file: tokens, mean NLL, perplexity and bits per byte.
    Perplexity(PerplexityArgs),
    /// Measure prefill and generation throughput by context depth (llama-bench style).
    Bench(bench_cmd::BenchArgs),
    /// Write a copy of a model with block-quantized linear weights (q8_0 or q4_0).
    Quantize(QuantizeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// The float model directory; default: the model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The format: q8_0 (int8, f16 scale per 32) or q4_0 (4-bit, f16 scale per 32).
    #[arg(long)]
    to: performer::quant::QuantFormat,
    /// The directory to write (must not exist; written atomically).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text file to score (read as bytes, streamed).
    #[arg(long)]
    file: PathBuf,
    /// Score at most this many tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Reset the context every N tokens (e.g. the training context); default: one stream.
    #[arg(long)]
    window: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (config.json + model.safetensors); default: the model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override the softmax feature map's ε (config key kernel_eps).
    #[arg(long)]
    kernel_eps: Option<f32>,
    /// Override the causal denominator's δ (config key denominator_eps).
    #[arg(long)]
    denominator_eps: Option<f32>,
    /// Copy the weights into huge-page memory instead of mapping the file: for a model file
    /// the page cache holds in small pages (just written or copied; `bench` shows the share on
    /// 2 MiB pages). Reads the whole file at load and keeps a private copy.
    #[arg(long)]
    huge_pages: bool,
}

impl ModelArgs {
    fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_dir)
    }

    fn load(&self) -> performer::Result<Model> {
        Model::load_with(
            self.dir(),
            LoadOptions {
                kernel_eps: self.kernel_eps,
                denominator_eps: self.denominator_eps,
                huge_pages: self.huge_pages,
            },
        )
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Threads for decoding, in a pool of their own (the prompt uses --threads). Default:
    /// --threads.
    #[arg(long)]
    decode_threads: Option<usize>,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file (bytes, need not be UTF-8).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold in (0, 1]; 1 disables it.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Repetition penalty (1 disables it).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop at this string (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Continue from a state saved by --save-state (the prompt, if any, is appended).
    #[arg(long)]
    load_state: Option<PathBuf>,
    /// Save the state after generation (prompt and generated text) to this file.
    #[arg(long)]
    save_state: Option<PathBuf>,
}

#[derive(Args)]
struct InfoArgs {
    /// Model directory; default: the model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Output .npy file, float32 [tokens, num_tokens].
    #[arg(long)]
    out: PathBuf,
}

fn default_model_dir() -> PathBuf {
    let local = PathBuf::from(DEFAULT_MODEL);
    if local.is_dir() {
        return local;
    }
    // A binary run from the source tree (`cargo run` in a subdirectory): the workspace root's model.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_MODEL)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Info(a) => info(a),
        Command::Logits(a) => logits(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Quantize(a) => quantize(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn generate(a: GenerateArgs) -> CliResult {
    let prompt: Vec<u32> = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.bytes().map(u32::from).collect(),
        (None, Some(f)) => std::fs::read(f)
            .map_err(|e| format!("{}: {e}", f.display()))?
            .into_iter()
            .map(u32::from)
            .collect(),
        (None, None) if a.load_state.is_some() => Vec::new(),
        (None, None) => return Err("give a prompt with --prompt TEXT or --prompt-file FILE".into()),
    };
    let model = a.model.load()?;
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
        ..GenerateOptions::default()
    };
    let mut generation = Generation::new(&model, &mut state, &prompt, options)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for piece in generation.by_ref() {
        out.write_all(piece?.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
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

fn quantize(a: QuantizeArgs) -> CliResult {
    use std::io::IsTerminal;
    let src = a.model.unwrap_or_else(default_model_dir);
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {percent}% of the weights, eta {eta}")
            .map_err(|e| e.to_string())?,
    );
    performer::quant::quantize_dir(&src, &a.out, a.to, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).map_or(0, |m| m.len());
    eprintln!(
        "wrote {} ({}, model.safetensors {} bytes, was {})",
        a.out.display(),
        a.to,
        size(&a.out),
        size(&src)
    );
    Ok(())
}

fn info(a: InfoArgs) -> CliResult {
    let dir = a.model.unwrap_or_else(default_model_dir);
    let weights_path = dir.join("model.safetensors");
    let file = WeightFile::open(&weights_path)?;
    let inferred = names::infer(&file);
    let config_path = dir.join("config.json");
    let (config, from_config) = if config_path.exists() {
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        (Config::from_json(&text, &inferred), true)
    } else {
        (Config::from_inferred(&inferred), false)
    };
    println!("model: {}", dir.display());
    if !from_config {
        println!("no config.json: values below come from the tensor shapes where they determine them, else performer-pytorch's defaults");
        println!("cannot be inferred from shapes: causal (assumed true), generalized_attention, kernel_fn, no_projection, local_window_size, kernel_eps, denominator_eps");
    }
    let config = config?;
    println!("config:  (config = from config.json, inferred = from tensor shapes, default = performer-pytorch 1.1.4 default)");
    print_config(&config);
    let model = Model::from_parts(config, file)?;
    let state = State::new(&model);
    println!("parameters: {}", model.parameter_count());
    let dtypes: Vec<String> = model
        .dtype_counts()
        .iter()
        .map(|(d, n)| format!("{d} ({n} elements)"))
        .collect();
    println!("dtypes: {}", dtypes.join(", "));
    if let Some(f) = model.config().weight_format {
        let q: Vec<String> = model
            .quantized_counts()
            .iter()
            .map(|(f, n)| format!("{f} ({n} weights)"))
            .collect();
        println!(
            "quantized ({f}, {:.3} bytes per weight with scales): {} in {} tensors; embeddings, norms, biases and projection matrices in the dtypes above",
            f.bytes_per_weight(),
            q.join(", "),
            model.quantized().count()
        );
    }
    println!(
        "file: {} ({} bytes)",
        weights_path.display(),
        model.weights().file_size()
    );
    println!(
        "weight bytes read per token: {}",
        model.weight_bytes_per_token()
    );
    println!(
        "state per sequence: {} bytes ({} of attention state A, a, s, M; constant in the sequence length)",
        state.size_bytes(),
        state.attention_bytes()
    );
    Ok(())
}

fn print_config(c: &Config) {
    let mark = |k: &str| {
        c.origin(k)
            .map(|o: Origin| o.to_string())
            .unwrap_or_default()
    };
    let rows: Vec<(&str, String)> = vec![
        ("num_tokens", c.num_tokens.to_string()),
        ("max_seq_len", c.max_seq_len.to_string()),
        ("dim", c.dim.to_string()),
        ("depth", c.depth.to_string()),
        ("heads", c.heads.to_string()),
        ("dim_head", c.dim_head.to_string()),
        ("nb_features", c.nb_features.to_string()),
        ("causal", c.causal.to_string()),
        ("ff_mult", c.ff_mult.to_string()),
        ("ff_glu", c.ff_glu.to_string()),
        ("generalized_attention", c.generalized_attention.to_string()),
        ("kernel_fn", c.kernel_fn.name().to_string()),
        ("use_scalenorm", c.use_scalenorm.to_string()),
        ("use_rezero", c.use_rezero.to_string()),
        ("tie_embed", c.tie_embed.to_string()),
        ("rotary_position_emb", c.rotary_position_emb.to_string()),
        ("axial_position_emb", c.axial_position_emb.to_string()),
        (
            "axial_position_shape",
            format!("{:?}", c.axial_position_shape),
        ),
        ("local_attn_heads", format!("{:?}", c.local_attn_heads)),
        ("local_window_size", c.local_window_size.to_string()),
        ("shift_tokens", c.shift_tokens.to_string()),
        ("qkv_bias", c.qkv_bias.to_string()),
        ("attn_out_bias", c.attn_out_bias.to_string()),
        ("no_projection", c.no_projection.to_string()),
        ("kernel_eps", c.kernel_eps.to_string()),
        ("denominator_eps", c.denominator_eps.to_string()),
        ("tokenizer", "byte".to_string()),
        (
            "weight_format",
            c.weight_format.map_or("none".into(), |f| f.to_string()),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<22} {v:<12} ({})", mark(k));
    }
}

fn logits(a: LogitsArgs) -> CliResult {
    let model = a.model.load()?;
    let mut state = State::new(&model);
    let vocab = model.vocab_size();
    let mut all = Vec::with_capacity(a.tokens.len() * vocab);
    for &t in &a.tokens {
        all.extend_from_slice(model.step(&mut state, t)?);
    }
    performer_cli::npy::write_f32(&a.out, &[a.tokens.len(), vocab], &all)?;
    eprintln!(
        "wrote {} × {} logits to {}",
        a.tokens.len(),
        vocab,
        a.out.display()
    );
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> CliResult {
    use std::io::IsTerminal;
    let model = a.model.load()?;
    let file = std::fs::File::open(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let total = a.max_tokens.map_or(total, |n| total.min(n as u64));
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {per_sec} eta {eta}")
            .map_err(|e| e.to_string())?,
    );
    let options = performer::perplexity::PerplexityOptions {
        max_tokens: a.max_tokens,
        window: a.window,
    };
    let start = std::time::Instant::now();
    let r = performer::perplexity::evaluate(&model, std::io::BufReader::new(file), options, |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "file": a.file.display().to_string(),
                "tokens": r.tokens,
                "scored": r.scored,
                "mean_nll": r.mean_nll,
                "perplexity": r.perplexity,
                "bits_per_byte": r.bits_per_byte,
                "window": a.window,
                "seconds": secs,
            })
        );
    } else {
        println!("tokens: {} ({} scored)", r.tokens, r.scored);
        println!("mean NLL: {:.6} nats", r.mean_nll);
        println!("perplexity: {:.4}", r.perplexity);
        println!("bits per byte: {:.6}", r.bits_per_byte);
        eprintln!("{:.1} tokens/s", r.tokens as f64 / secs.max(1e-9));
    }
    Ok(())
}
