//! `performer info`: a model's config (each value's origin), sizes and the kernels' level.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use performer::config::{Config, Origin};
use performer::weights::{names, WeightFile};
use performer::{Model, State};

use super::shared::{default_model_dir, name_config, CliResult};
use crate::out::stdout_error;

#[derive(Args)]
pub struct InfoArgs {
    /// Model directory; default: the model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    quant: crate::args::QuantKernelArgs,
}

pub fn run(a: InfoArgs) -> CliResult {
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
    let mut model = Model::from_parts(config.clone(), file).map_err(|e| name_config(e, &dir))?;
    if let Some(method) = a.quant.quant_kernel {
        model.use_quant_method(method);
    }
    model.use_packed_rows(!a.quant.no_packed_rows);
    let template = performer::chat::ChatTemplate::load(&dir)?;
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
        "chat template: {} (stop: {:?}){}",
        template.origin().name(),
        template.stop_strings(),
        if template.origin() == performer::chat::TemplateOrigin::Default {
            " — none in the model directory: one `role: content` line per message, `assistant: ` to reply"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "kernels: {isa} (best this CPU runs: {}; {} can force a lower level)",
        performer::kernels::Isa::detected(),
        performer::kernels::isa::ISA_ENV
    );
    let _ = writeln!(
        o,
        "attention's chunk products (prefill): {} (the gemm crate's own choice; {} does not lower it; the weight products follow the kernels)",
        performer::kernels::matmul::gemm_level(),
        performer::kernels::isa::ISA_ENV
    );
    if let Some(method) = model.quant_method() {
        let k = performer::kernels::quant::QuantKernels::active(method);
        let _ = writeln!(
            o,
            "quantized kernel: {} (--quant-kernel dequant|int8)",
            k.describe()
        );
        let packed = model.packed_bytes();
        let _ = if packed > 0 {
            writeln!(
                o,
                "packed rows: yes, {:.1} MiB beside the mapping (decoding's one-row products read the rows four at a time; --no-packed-rows keeps only the mapping)",
                packed as f64 / (1u64 << 20) as f64
            )
        } else {
            writeln!(
                o,
                "packed rows: no ({})",
                if a.quant.no_packed_rows {
                    "--no-packed-rows"
                } else {
                    "this method and level read the mapped rows"
                }
            )
        };
    }
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
