//! What the commands share: the model directory and its flags ([`ModelArgs`]), the default
//! model, and how their errors are named. A flag every model-loading command takes goes into
//! [`ModelArgs`].

use std::path::{Path, PathBuf};

use clap::Args;
use performer::{LoadOptions, Model};

use crate::args;

/// The model shipped in `models/`.
pub const DEFAULT_MODEL: &str = "models/performer-byte";

/// What a command returns: errors become one line on stderr and exit code 1.
pub type CliResult = Result<(), Box<dyn std::error::Error>>;

/// The flags of every command that loads a model: the directory and the load options.
#[derive(Args)]
pub struct ModelArgs {
    /// Model directory (config.json + model.safetensors); default: the model in models/.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Override the softmax feature map's ε (config key kernel_eps; finite, ≥ 0).
    #[arg(long, value_parser = args::non_negative)]
    pub kernel_eps: Option<f32>,
    /// Override the causal denominator's δ (config key denominator_eps; finite, ≥ 0).
    #[arg(long, value_parser = args::non_negative)]
    pub denominator_eps: Option<f32>,
    /// Copy the weights into huge-page memory instead of mapping the file: for a model file
    /// the page cache holds in small pages (just written or copied; `bench` shows the share on
    /// 2 MiB pages). Reads the whole file at load and keeps a private copy.
    #[arg(long)]
    pub huge_pages: bool,
    #[command(flatten)]
    pub quant: args::QuantKernelArgs,
}

impl ModelArgs {
    /// The model directory: `--model`, else the default model.
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_dir)
    }

    /// Loads the model with the options given, errors of its config naming `config.json`.
    pub fn load(&self) -> Result<Model, Box<dyn std::error::Error>> {
        let dir = self.dir();
        Model::load_with(
            &dir,
            LoadOptions {
                kernel_eps: self.kernel_eps,
                denominator_eps: self.denominator_eps,
                huge_pages: self.huge_pages,
                quant_kernel: self.quant.quant_kernel,
                no_packed_rows: self.quant.no_packed_rows,
            },
        )
        .map_err(|e| name_config(e, &dir))
    }
}

/// The model in `models/`: in the working directory, else in the source tree's.
pub fn default_model_dir() -> PathBuf {
    let local = PathBuf::from(DEFAULT_MODEL);
    if local.is_dir() {
        return local;
    }
    // A binary run from the source tree (`cargo run` in a subdirectory): the workspace root's model.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_MODEL)
}

/// Config-file errors name the `config.json` they come from.
pub fn name_config(e: performer::Error, dir: &Path) -> Box<dyn std::error::Error> {
    use performer::Error as E;
    match e {
        E::Config(_)
        | E::UnknownConfigKey { .. }
        | E::ConfigMismatch { .. }
        | E::Unsupported { .. } => format!("{}: {e}", dir.join("config.json").display()).into(),
        e => Box::new(e),
    }
}
