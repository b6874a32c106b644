//! Quantizing a float model: which tensors are converted ([`is_quantized_name`]), a weights
//! file ([`quantize_file`]) and a whole model directory, written atomically ([`quantize_dir`]).

use std::path::Path;

use half::f16;

use super::format::{OwnedQMatrix, QuantFormat, BLOCK, CONFIG_KEY, MINS_SUFFIX, SCALES_SUFFIX};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::weights::{OwnedTensor, WeightFile};

/// True when the quantizer converts the entry `name` of shape `shape`: a 2-D linear weight of a
/// block (q, k, v, attention output, `w1`, `w2`) or the untied output layer, of an input width
/// that is a multiple of [`BLOCK`].
pub fn is_quantized_name(name: &str, shape: &[usize]) -> bool {
    const SUFFIXES: [&str; 6] = [
        ".to_q.weight",
        ".to_k.weight",
        ".to_v.weight",
        ".to_out.weight",
        ".w1.weight",
        ".w2.weight",
    ];
    let linear = name == "to_out.weight"
        || (name.starts_with("performer.") && SUFFIXES.iter().any(|s| name.ends_with(s)));
    linear && shape.len() == 2 && shape[1] > 0 && shape[1].is_multiple_of(BLOCK)
}

/// Quantizes the tensors of `file` in `format` ([`is_quantized_name`] decides which; every
/// other entry is copied unchanged). `progress(done, total)` is called with weight elements
/// processed so far. Refuses a file that already holds quantized weights.
pub fn quantize_file(
    file: &WeightFile,
    format: QuantFormat,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<(String, OwnedTensor)>> {
    if let Some((name, _)) = file.entries().find(|(n, e)| {
        n.ends_with(SCALES_SUFFIX)
            || n.ends_with(MINS_SUFFIX)
            || QuantFormat::is_code_dtype(&e.dtype)
    }) {
        return Err(Error::Unsupported {
            option: "quantize".into(),
            reason: format!(
                "`{name}` is already quantized; re-quantizing would compound the rounding (quantize the float model instead)"
            ),
        });
    }
    let total: usize = file
        .entries()
        .map(|(_, e)| e.shape.iter().product::<usize>())
        .sum();
    let mut done = 0;
    let mut out = Vec::new();
    let names: Vec<String> = file.entries().map(|(n, _)| n.to_string()).collect();
    for name in names {
        let raw = file.raw(&name)?;
        let shape = raw.shape().to_vec();
        let numel: usize = shape.iter().product();
        if is_quantized_name(&name, &shape) && file.tensor(&name).is_ok() {
            let t = file.tensor(&name)?;
            let (rows, cols) = (shape[0], shape[1]);
            let q = OwnedQMatrix::quantize_with(
                format,
                &name,
                rows,
                cols,
                |r, row| t.row(r).to_f32_into(row),
                |r| progress(done + r * cols, total),
            )?;
            let OwnedQMatrix {
                codes,
                scales,
                mins,
                ..
            } = q;
            // The F16 companions, `[rows, blocks]` each.
            let companion = |values: &[f16]| OwnedTensor {
                dtype: safetensors::Dtype::F16,
                shape: vec![rows, cols / BLOCK],
                data: bytemuck::cast_slice(values).to_vec(),
            };
            if format.has_mins() {
                out.push((format!("{name}{MINS_SUFFIX}"), companion(&mins)));
            }
            out.push((format!("{name}{SCALES_SUFFIX}"), companion(&scales)));
            out.push((
                name,
                OwnedTensor {
                    dtype: format.data_dtype(),
                    shape: vec![rows, format.row_bytes(cols)],
                    data: codes,
                },
            ));
        } else {
            let dtype = st_dtype(raw.dtype()).ok_or_else(|| Error::UnsupportedDtype {
                name: name.clone(),
                dtype: raw.dtype().to_string(),
            })?;
            out.push((
                name,
                OwnedTensor {
                    dtype,
                    shape,
                    data: raw.bytes().to_vec(),
                },
            ));
        }
        done += numel;
        progress(done, total);
    }
    Ok(out)
}

fn st_dtype(name: &str) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Some(match name {
        "F32" => D::F32,
        "F16" => D::F16,
        "BF16" => D::BF16,
        "F64" => D::F64,
        "I64" => D::I64,
        "I32" => D::I32,
        "I16" => D::I16,
        "I8" => D::I8,
        "U8" => D::U8,
        "BOOL" => D::BOOL,
        _ => return None,
    })
}

/// Files copied from the source model directory when present, besides `config.json` and
/// `model.safetensors` (which are rewritten) and the tokenizer file the config names.
pub const COPIED_FILES: &[&str] = &[
    "MODEL_CARD.md",
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

/// Writes a quantized copy of the model directory `src` to `dst`: `config.json` with
/// [`CONFIG_KEY`] set, `model.safetensors` with the quantized weights, the [`COPIED_FILES`]
/// present and the tokenizer file the config names. Atomic: everything is written into a temporary directory next to
/// `dst`, synced, and renamed to `dst` (which must not exist) only when complete; on error the
/// temporary directory is removed. Refuses a model whose config already names a format or
/// whose file holds quantized weights. `progress(done, total)` counts weight elements.
pub fn quantize_dir(
    src: &Path,
    dst: &Path,
    format: QuantFormat,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    // Check the source is a loadable model (config and weights) before anything else.
    Model::load(src)?;
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| Error::Config(format!("{}: invalid JSON: {e}", config_path.display())))?;
    if let Some(existing) = config.get(CONFIG_KEY) {
        return Err(Error::Unsupported {
            option: "quantize".into(),
            reason: format!(
                "the model is already quantized ({CONFIG_KEY} = {existing}); quantize the float model instead"
            ),
        });
    }
    if dst.exists() {
        return Err(Error::io(
            dst,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output directory already exists",
            ),
        ));
    }
    let file = WeightFile::open(src.join("model.safetensors"))?;
    let tensors = quantize_file(&file, format, progress)?;
    config.insert(CONFIG_KEY.into(), format.name().into());
    let config_text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Config(format!("cannot serialize config: {e}")))?;

    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let base = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{base}.tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let weights = tmp.join("model.safetensors");
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert(CONFIG_KEY.to_string(), format.name().to_string());
        crate::weights::write_aligned(&weights, tensors.iter().map(|(n, t)| (n, t)), &metadata)?;
        // Readable by all, as a model directory usually is, whatever the umask.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&weights, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::io(&weights, e))?;
        }
        crate::fsutil::write_atomic(tmp.join("config.json"), |w| {
            std::io::Write::write_all(w, config_text.as_bytes())
        })?;
        // The tokenizer file the config names (a file name in the model directory), if any.
        let named = config
            .get("tokenizer")
            .and_then(|v| v.as_str())
            .filter(|n| *n != "byte" && !COPIED_FILES.contains(n))
            .filter(|n| Path::new(n).file_name() == Some(std::ffi::OsStr::new(n)));
        for name in COPIED_FILES.iter().copied().chain(named) {
            let from = src.join(name);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(name)).map_err(|e| Error::io(&from, e))?;
            }
        }
        // Every file, then the directory, on disk before the rename makes them visible.
        for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
            let path = entry.map_err(|e| Error::io(&tmp, e))?.path();
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
        crate::fsutil::sync_dir(&tmp)?;
        std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))?;
        crate::fsutil::sync_dir(&parent)
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
