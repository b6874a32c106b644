//! The `performer` command line: parses arguments, calls the library, and turns errors into
//! one-line messages and exit codes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod args;
mod bench_cmd;
mod constraint_args;
mod loadtest_cmd;
mod out;
mod perplexity_plot;
mod serve_cmd;

use out::{stdout_error, StdoutClosed};
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
    /// Worker threads (default: all cores; at most 4 × the cores, and never over 1024).
    #[arg(long, global = true, value_parser = args::threads)]
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
    /// Serve the model over HTTP: OpenAI completions, sessions, metrics, a playground.
    Serve(serve_cmd::ServeArgs),
    /// Load-test a running server with concurrent streaming requests.
    Loadtest(loadtest_cmd::LoadtestArgs),
    /// Write a copy of a model with block-quantized linear weights (q8_0, q4_0 or q4_1).
    Quantize(QuantizeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// The float model directory; default: the model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The format: q8_0 (int8, f16 scale per 32), q4_0 (4-bit, f16 scale per 32) or q4_1
    /// (4-bit, f16 scale and minimum per 32).
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
    /// Reset the context every N tokens (e.g. the training context; at least 2); default: one
    /// stream.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    window: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also report bits per byte by position (tokens of context) in buckets 0–511, 512–2k,
    /// 2k–8k, 8k–32k, 32k–128k, 128k+ (empty ones left out): a markdown table, or
    /// `by_position` in the JSON.
    #[arg(long)]
    by_position: bool,
    /// Plot bits per byte against position (log x axis) to this SVG file.
    #[arg(long, requires = "by_position")]
    plot: Option<PathBuf>,
    /// Add the curve of an earlier `--by-position --json` output (e.g. another model) to the
    /// plot.
    #[arg(long, requires = "plot")]
    plot_with: Vec<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (config.json + model.safetensors); default: the model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override the softmax feature map's ε (config key kernel_eps; finite, ≥ 0).
    #[arg(long, value_parser = args::non_negative)]
    kernel_eps: Option<f32>,
    /// Override the causal denominator's δ (config key denominator_eps; finite, ≥ 0).
    #[arg(long, value_parser = args::non_negative)]
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

    fn load(&self) -> Result<Model, Box<dyn std::error::Error>> {
        let dir = self.dir();
        Model::load_with(
            &dir,
            LoadOptions {
                kernel_eps: self.kernel_eps,
                denominator_eps: self.denominator_eps,
                huge_pages: self.huge_pages,
            },
        )
        .map_err(|e| name_config(e, &dir))
    }
}

#[derive(Args)]
struct GenerateArgs {
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
    constraint: constraint_args::ConstraintArgs,
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

/// The largest prompt file read (a prompt of 64 Mi byte tokens takes hours to ingest).
const MAX_PROMPT_BYTES: u64 = 64 << 20;

/// Config-file errors name the `config.json` they come from.
fn name_config(e: performer::Error, dir: &Path) -> Box<dyn std::error::Error> {
    use performer::Error as E;
    match e {
        E::Config(_)
        | E::UnknownConfigKey { .. }
        | E::ConfigMismatch { .. }
        | E::Unsupported { .. } => format!("{}: {e}", dir.join("config.json").display()).into(),
        e => Box::new(e),
    }
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
        Command::Generate(a) => generate(a),
        Command::Info(a) => info(a),
        Command::Logits(a) => logits(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Loadtest(a) => loadtest_cmd::run(a).map_err(Into::into),
        Command::Serve(a) => {
            serve_cmd::run(a, cli.threads, default_model_dir()).map_err(Into::into)
        }
        Command::Quantize(a) => quantize(a),
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
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn generate(a: GenerateArgs) -> CliResult {
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
        .map_err(constraint_args::usage_if_invalid)?;
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
    // Everything is checked before anything is printed: a failure prints one line to stderr
    // and nothing to stdout.
    let dir = a.model.unwrap_or_else(default_model_dir);
    let (config_path, weights_path) = performer::model::model_files(&dir)?;
    let file = WeightFile::open(&weights_path)?;
    let inferred = names::infer(&file);
    let from_config = config_path.symlink_metadata().is_ok();
    let config = if from_config {
        let text = performer::model::read_config_text(&config_path)?;
        Config::from_json(&text, &inferred)
    } else {
        Config::from_inferred(&inferred)
    }
    .map_err(|e| name_config(e, &dir))?;
    let model = Model::from_parts(config.clone(), file).map_err(|e| name_config(e, &dir))?;
    let isa = performer::kernels::isa::check_env()?;
    let mut o = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(o, "model: {}", dir.display());
    if !from_config {
        let _ = writeln!(o, "no config.json: values below come from the tensor shapes where they determine them, else performer-pytorch's defaults");
        let _ = writeln!(o, "cannot be inferred from shapes: causal (assumed true), generalized_attention, kernel_fn, no_projection, local_window_size, kernel_eps, denominator_eps");
    }
    let _ = writeln!(o, "config:  (config = from config.json, inferred = from tensor shapes, default = performer-pytorch 1.1.4 default)");
    print_config(&mut o, &config);
    let state = State::new(&model);
    let _ = writeln!(o, "parameters: {}", model.parameter_count());
    let dtypes: Vec<String> = model
        .dtype_counts()
        .iter()
        .map(|(d, n)| format!("{d} ({n} elements)"))
        .collect();
    let _ = writeln!(o, "dtypes: {}", dtypes.join(", "));
    if let Some(f) = model.config().weight_format {
        let q: Vec<String> = model
            .quantized_counts()
            .iter()
            .map(|(f, n)| format!("{f} ({n} weights)"))
            .collect();
        let _ = writeln!(
            o,
            "quantized ({f}, {:.3} bytes per weight with {}): {} in {} tensors; embeddings, norms, biases and projection matrices in the dtypes above",
            f.bytes_per_weight(),
            if f.has_mins() {
                "scales and minimums"
            } else {
                "scales"
            },
            q.join(", "),
            model.quantized().count()
        );
    }
    let _ = writeln!(
        o,
        "file: {} ({} bytes)",
        weights_path.display(),
        model.weights().file_size()
    );
    let _ = writeln!(
        o,
        "weight bytes read per token: {}",
        model.weight_bytes_per_token()
    );
    let _ = writeln!(
        o,
        "state per sequence: {} bytes ({} of attention state A, a, s, M; constant in the sequence length)",
        state.size_bytes(),
        state.attention_bytes()
    );
    let _ = writeln!(
        o,
        "kernels: {isa} (best this CPU runs: {}; {} can force a lower level)",
        performer::kernels::Isa::detected(),
        performer::kernels::isa::ISA_ENV
    );
    let mut out = std::io::stdout().lock();
    out.write_all(o.as_bytes())
        .and_then(|()| out.flush())
        .map_err(stdout_error)?;
    Ok(())
}

fn print_config(o: &mut String, c: &Config) {
    use std::fmt::Write as _;
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
        ("tokenizer", c.tokenizer.name().to_string()),
        (
            "weight_format",
            c.weight_format.map_or("none".into(), |f| f.to_string()),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "  {k:<22} {v:<12} ({})", mark(k));
    }
}

fn logits(a: LogitsArgs) -> CliResult {
    performer::fsutil::check_writable_dir(&a.out)?;
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
    // Curves to compare are read first: a bad file fails before the scoring.
    let others = a
        .plot_with
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            perplexity_plot::Curve::from_json(&text).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let model = a.model.load()?;
    let file = std::fs::File::open(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(format!("{}: is a directory, expected a text file", a.file.display()).into());
    }
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
        window: a.window.map(|w| usize::try_from(w).unwrap_or(usize::MAX)),
    };
    let start = std::time::Instant::now();
    let r = performer::perplexity::evaluate(&model, std::io::BufReader::new(file), options, |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let model_name = a
        .model
        .model
        .as_deref()
        .unwrap_or(Path::new(DEFAULT_MODEL))
        .display()
        .to_string();
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut json = serde_json::json!({
            "file": a.file.display().to_string(),
            "tokens": r.tokens,
            "scored": r.scored,
            "bytes": r.bytes,
            "mean_nll": r.mean_nll,
            "perplexity": r.perplexity,
            "bits_per_byte": r.bits_per_byte,
            "window": a.window,
            "seconds": secs,
        });
        if a.by_position {
            json["model"] = model_name.clone().into();
            json["by_position"] = perplexity_plot::json(&r.by_position);
        }
        writeln!(out, "{json}")
            .and_then(|()| out.flush())
            .map_err(stdout_error)?;
    } else {
        let table = if a.by_position {
            format!("\n{}", perplexity_plot::markdown(&r.by_position))
        } else {
            String::new()
        };
        write!(
            out,
            "tokens: {} ({} scored)\nmean NLL: {:.6} nats\nperplexity: {:.4}\nbits per byte: {:.6}\n{table}",
            r.tokens, r.scored, r.mean_nll, r.perplexity, r.bits_per_byte
        )
        .and_then(|()| out.flush())
        .map_err(stdout_error)?;
        eprintln!("{:.1} tokens/s", r.tokens as f64 / secs.max(1e-9));
    }
    if let Some(p) = &a.plot {
        let mut curves = vec![perplexity_plot::Curve::from_buckets(
            &model_name,
            &r.by_position,
        )];
        curves.extend(others);
        let file_name = a.file.file_name().map_or_else(
            || a.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let how = a
            .window
            .map_or_else(|| "one stream".to_string(), |w| format!("windows of {w}"));
        perplexity_plot::plot_svg(
            &curves,
            &format!("bits per byte by position: {file_name}, {how}"),
            p,
        )?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
