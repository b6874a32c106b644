//! `performer quantize`: a copy of a model with block-quantized linear weights.

use std::path::{Path, PathBuf};

use clap::Args;

use super::shared::{default_model_dir, CliResult};

#[derive(Args)]
pub struct QuantizeArgs {
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

pub fn run(a: QuantizeArgs) -> CliResult {
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
