//! `performer logits`: the logits after each given token, as a `.npy` file.

use std::path::PathBuf;

use clap::Args;
use performer::State;

use super::shared::{CliResult, ModelArgs};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Output .npy file, float32 [tokens, num_tokens].
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: LogitsArgs) -> CliResult {
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
