//! `performer perplexity`: a text file scored as one stream (or in windows), optionally by
//! position of context, as text, JSON or an SVG plot ([`super::perplexity_plot`]).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;

use super::perplexity_plot;
use super::shared::{CliResult, ModelArgs, DEFAULT_MODEL};
use crate::out::stdout_error;

#[derive(Args)]
pub struct PerplexityArgs {
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

pub fn run(a: PerplexityArgs) -> CliResult {
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
