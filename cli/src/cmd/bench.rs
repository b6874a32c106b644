//! `performer bench`: argument parsing and output for [`performer_cli::bench`]; the measuring is
//! in the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use performer::synthetic::{self, SyntheticShape, WeightDtype};
use performer::Model;
use performer_cli::bench::{self, Attention, BenchOptions};

#[derive(Args)]
#[command(after_help = "Examples:
  performer bench --shape tiny --depths 0,1k,4k,16k --tg 128 --pp 512 --repetitions 3
  performer bench --shape gpt2-small --dtype bf16 --depths 0,4k --tg 32 --pp 256 --plot out.svg
  performer bench --model models/performer-byte --threads 1,2 --json
  performer bench --shape gpt2-small --batch 1,4,16,64 --depths 0,4k --tg 16 --threads 2")]
pub struct BenchArgs {
    /// Model directory (config.json + model.safetensors).
    #[arg(long, conflicts_with = "shape")]
    model: Option<PathBuf>,
    /// Load the weights into huge-page memory instead of mapping the file (see `generate
    /// --huge-pages`).
    #[arg(long)]
    huge_pages: bool,
    /// A synthetic random model instead: tiny, gpt2-small or large (written to a temporary
    /// directory, or to --synthetic-dir).
    #[arg(long)]
    shape: Option<String>,
    /// Stored dtype of the synthetic model: f32, f16, bf16, or q8_0 / q4_0 / q4_1 (linear
    /// weights quantized from f32, the rest f32).
    #[arg(long, default_value = "f32", requires = "shape")]
    dtype: WeightDtype,
    #[command(flatten)]
    quant: crate::args::QuantKernelArgs,
    /// Keep (and reuse) the synthetic model in this directory.
    #[arg(long, requires = "shape")]
    synthetic_dir: Option<PathBuf>,
    /// Attention kinds, comma-separated: favor, softmax.
    #[arg(long, value_delimiter = ',', default_value = "favor")]
    attention: Vec<Attention>,
    /// Context depths for tg, comma-separated, with k (1024) / M (1048576) suffixes.
    #[arg(long, value_delimiter = ',', value_parser = bench::parse_count, default_value = "0")]
    depths: Vec<usize>,
    /// Prefill sizes (comma-separated; 0 skips pp).
    #[arg(long, value_delimiter = ',', value_parser = bench::parse_count, default_value = "512")]
    pp: Vec<usize>,
    /// Generation sizes (comma-separated; 0 skips tg).
    #[arg(long, value_delimiter = ',', value_parser = bench::parse_count, default_value = "128")]
    tg: Vec<usize>,
    /// Thread counts, comma-separated (default: all cores; each at most 4 × the cores and
    /// 1024).
    #[arg(long, value_delimiter = ',', value_parser = crate::args::threads)]
    threads: Vec<usize>,
    /// Timed repetitions of each test (at least 1).
    #[arg(long, short = 'r', default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repetitions: u32,
    /// Seed of the random tokens and the synthetic weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Buffer of the startup read-bandwidth probe, in MiB (0 skips the probe and the roofline).
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Batched decode instead: aggregate tokens/s of B sequences stepped together, for each
    /// comma-separated B, at each of --depths (first --tg and --threads; llama-batched-bench
    /// style).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Constrained decode instead: tokens/s of generations constrained by this JSON schema
    /// beside the same generations unconstrained (temperature 1, the first --tg tokens per
    /// side, the first --threads). With --batch B (the first): the serving engine's batched
    /// decode, B unconstrained streams beside B constrained ones or B unconstrained twins.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
    /// Also write an SVG plot of tokens/s and memory against depth.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar (it is only shown when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

/// Writes (or reuses) the synthetic model and returns its directory, keeping a temporary
/// directory alive in `_tmp`.
fn synthetic_model(
    a: &BenchArgs,
    name: &str,
    tmp: &mut Option<tempfile::TempDir>,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let shape = SyntheticShape::named(name).ok_or_else(|| {
        format!(
            "unknown shape `{name}` (expected one of: {})",
            synthetic::SHAPE_NAMES.join(", ")
        )
    })?;
    let dir = match &a.synthetic_dir {
        Some(d) => d.clone(),
        None => {
            let t = tempfile::Builder::new()
                .prefix("performer-synthetic-")
                .tempdir()?;
            let p = t.path().to_path_buf();
            *tmp = Some(t);
            p
        }
    };
    let stamp = format!("shape={name} dtype={} seed={}\n", a.dtype, a.seed);
    let stamp_path = dir.join("synthetic.txt");
    let reuse = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
        && dir.join("model.safetensors").is_file();
    if !reuse {
        let start = std::time::Instant::now();
        synthetic::write(&dir, &shape, a.dtype, a.seed)?;
        // Load it the way a checkpoint on disk is loaded (2 MiB folios), not from the small
        // folios the writes left in the page cache.
        performer_cli::page_cache::drop_from_page_cache(&dir.join("model.safetensors"))?;
        performer::fsutil::write_atomic(&stamp_path, |w| w.write_all(stamp.as_bytes()))?;
        eprintln!(
            "wrote synthetic {name} ({:.1}M parameters, {}) to {} in {:.1} s",
            shape.parameter_count() as f64 / 1e6,
            bench::format_bytes(shape.file_bytes(a.dtype) as u64),
            dir.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(dir)
}

pub fn run(a: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(p) = &a.plot {
        performer::fsutil::check_writable_dir(p)?;
    }
    // The options first: a run with nothing to measure is refused before a synthetic model is
    // written or a model loaded.
    let threads = a
        .threads
        .first()
        .copied()
        .unwrap_or_else(bench::default_threads);
    let batch_options = (!a.batch.is_empty()).then(|| performer_cli::bench::batch::BatchOptions {
        batches: a.batch.clone(),
        depths: a.depths.clone(),
        tg: a.tg.first().copied().unwrap_or(32),
        repetitions: a.repetitions as usize,
        threads,
        seed: a.seed,
    });
    let options = BenchOptions {
        attentions: a.attention.clone(),
        pp: a.pp.clone(),
        tg: a.tg.clone(),
        depths: a.depths.clone(),
        threads: if a.threads.is_empty() {
            vec![bench::default_threads()]
        } else {
            a.threads.clone()
        },
        repetitions: a.repetitions as usize,
        seed: a.seed,
        bandwidth_bytes: a.bandwidth_mib << 20,
        bandwidth_passes: 5,
        progress: !a.no_progress && std::io::stderr().is_terminal(),
        memory_budget: None,
    };
    match &batch_options {
        Some(b) => b.validate()?,
        None => options.validate()?,
    }
    // A schema that is unreadable or not JSON is refused before any model work.
    let constraint = crate::constraint_args::ConstraintArgs {
        json_schema: a.json_schema.clone(),
        ..Default::default()
    }
    .constraint()?;
    let mut tmp = None;
    let (dir, name) = match (&a.model, &a.shape) {
        (Some(m), _) => {
            let name = m
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| m.display().to_string());
            (m.clone(), name)
        }
        (None, Some(s)) => (synthetic_model(&a, s, &mut tmp)?, format!("synthetic {s}")),
        (None, None) => return Err("give a model with --model DIR or --shape NAME".into()),
    };
    let model = Model::load_with(
        &dir,
        performer::LoadOptions {
            huge_pages: a.huge_pages,
            quant_kernel: a.quant.quant_kernel,
            no_packed_rows: a.quant.no_packed_rows,
            ..Default::default()
        },
    )
    .map_err(|e| super::shared::name_config(e, &dir))?;
    let kernels = bench::ModelInfo::of(&model, &name).kernels_label();
    if let Some(constraint) = constraint {
        let o = performer_cli::constrained_bench::ConstrainedOptions {
            constraint,
            tokens: a.tg.first().copied().unwrap_or(128),
            repetitions: a.repetitions as usize,
            seed: a.seed,
            prompt: "Data: ".into(),
        };
        if let Some(&batch) = a.batch.first() {
            let model = std::sync::Arc::new(model);
            let r = performer_cli::constrained_bench::mixed(&model, &o, batch, threads)
                .map_err(crate::constraint_args::usage_if_invalid)?;
            let text = if a.json {
                format!(
                    "{}\n",
                    performer_cli::constrained_bench::mixed_json(&name, &kernels, &o, batch, &r)
                )
            } else {
                performer_cli::constrained_bench::mixed_markdown(&name, &kernels, &o, batch, &r)
            };
            crate::out::print_stdout(&text)?;
            return Ok(());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
        let r = pool
            .install(|| performer_cli::constrained_bench::run(&model, &o))
            .map_err(crate::constraint_args::usage_if_invalid)?;
        let text = if a.json {
            format!(
                "{}\n",
                performer_cli::constrained_bench::json(&name, &kernels, &o, &r)
            )
        } else {
            performer_cli::constrained_bench::markdown(&name, &kernels, &o, &r)
        };
        crate::out::print_stdout(&text)?;
        return Ok(());
    }
    if let Some(opts) = &batch_options {
        let rows = performer_cli::bench::batch::run(&model, opts)?;
        crate::out::print_stdout(&performer_cli::bench::batch::markdown(
            &name, &kernels, threads, &rows,
        ))?;
        return Ok(());
    }
    let report = bench::run(&model, &name, &options)?;
    let text = if a.json {
        format!("{}\n", bench::json(&report))
    } else {
        bench::markdown(&report)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(crate::out::stdout_error)?;
    if let Some(p) = &a.plot {
        bench::plot_svg(&report, p)?;
        eprintln!("wrote {}", p.display());
    }
    drop(model);
    drop(tmp);
    Ok(())
}
