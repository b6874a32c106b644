//! Hostile quantized model files, in the style of tests/malformed.rs: one case per defect of
//! the codes, the scale tensors or the `weight_format` key, each asserting the exact
//! `performer::Error` variant and the tensor or key it names. Nothing may panic.

use std::path::Path;

use performer::quant::{self, QuantFormat, QuantTensor};
use performer::synthetic::{self, SyntheticShape, WeightDtype};
use performer::weights::WeightFile;
use performer::{Error, Model};
use safetensors::Dtype;

const TO_V: &str = "performer.net.layers.1.0.fn.to_v.weight";

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.data[..]).into()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A tiny model quantized in `format`: its config text and tensors.
fn quantized(tmp: &Path, format: QuantFormat) -> (String, Vec<Entry>) {
    let float = tmp.join("float");
    if !float.exists() {
        synthetic::write(
            &float,
            &SyntheticShape::named("tiny").unwrap(),
            WeightDtype::F16,
            9,
        )
        .unwrap();
    }
    let out = tmp.join(format.name());
    if !out.exists() {
        quant::quantize_dir(&float, &out, format, |_, _| {}).unwrap();
    }
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let entries = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Entry {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    (
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        entries,
    )
}

fn write(dir: &Path, config: &str, entries: &[Entry]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    safetensors::serialize_to_file(
        entries.iter().map(|e| (e.name.as_str(), e)),
        None,
        &dir.join("model.safetensors"),
    )
    .unwrap();
}

fn find<'a>(entries: &'a mut [Entry], name: &str) -> &'a mut Entry {
    entries.iter_mut().find(|e| e.name == name).unwrap()
}

/// Loads the `format` model after `edit` changed its config and tensors.
fn load_edited(
    format: QuantFormat,
    edit: impl FnOnce(&mut String, &mut Vec<Entry>),
) -> performer::Result<Model> {
    let tmp = tempfile::tempdir().unwrap();
    let (mut config, mut entries) = quantized(tmp.path(), format);
    edit(&mut config, &mut entries);
    let dir = tmp.path().join("case");
    write(&dir, &config, &entries);
    Model::load(&dir)
}

fn scales_of(name: &str) -> String {
    format!("{name}{}", quant::SCALES_SUFFIX)
}

fn mins_of(name: &str) -> String {
    format!("{name}{}", quant::MINS_SUFFIX)
}

#[test]
fn unedited_files_load() {
    for f in QuantFormat::ALL {
        let model = load_edited(f, |_, _| {}).unwrap();
        assert_eq!(model.config().weight_format, Some(f));
    }
}

#[test]
fn codes_of_the_other_format_are_refused() {
    let e = load_edited(QuantFormat::Q4_0, |c, _| {
        *c = c.replace("\"q4_0\"", "\"q8_0\"");
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { message, .. } if message.contains("q8_0")),
        "{e}"
    );
}

#[test]
fn q4_0_and_q4_1_files_are_told_apart() {
    // Same U8 codes: q4_0 codes labelled q4_1 lack the minimums, q4_1 codes labelled q4_0
    // carry minimums q4_0 would ignore. Both are refused, naming the tensor.
    let e = load_edited(QuantFormat::Q4_0, |c, _| {
        *c = c.replace("\"q4_0\"", "\"q4_1\"");
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { message, .. } if message.contains("minimum tensor")),
        "{e}"
    );
    let e = load_edited(QuantFormat::Q4_1, |c, _| {
        *c = c.replace("\"q4_1\"", "\"q4_0\"");
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { message, .. } if message.contains("q4_1")),
        "{e}"
    );
}

#[test]
fn minimums_are_checked_like_scales() {
    let e = load_edited(QuantFormat::Q4_1, |_, t| {
        t.retain(|e| e.name != mins_of(TO_V))
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { name, message } if name == TO_V && message.contains("minimum tensor")),
        "{e}"
    );
    let e = load_edited(QuantFormat::Q4_1, |_, t| {
        find(t, &mins_of(TO_V)).dtype = Dtype::BF16
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { name, .. } if *name == mins_of(TO_V)),
        "{e}"
    );
    let e = load_edited(QuantFormat::Q4_1, |_, t| {
        let m = find(t, &mins_of(TO_V));
        let (rows, blocks) = (m.shape[0], m.shape[1]);
        m.shape = vec![rows, blocks - 1];
        m.data.truncate(rows * (blocks - 1) * 2);
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { name, expected, .. } if *name == mins_of(TO_V) && expected == &vec![256, 8]),
        "{e}"
    );
    let e = load_edited(QuantFormat::Q4_1, |_, t| {
        find(t, &mins_of(TO_V)).data[6..8].copy_from_slice(&0x7E00u16.to_le_bytes());
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { name, message } if *name == mins_of(TO_V) && message.contains("minimum 3")),
        "{e}"
    );
}

#[test]
fn quantized_tensors_need_the_config_key() {
    let e = load_edited(QuantFormat::Q8_0, |c, _| {
        *c = c.replace("\"weight_format\": \"q8_0\"", "\"tokenizer\": \"byte\"");
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { message, .. } if message.contains("no weight_format")),
        "{e}"
    );
}

#[test]
fn unknown_or_mistyped_formats_are_config_errors() {
    let e = load_edited(QuantFormat::Q8_0, |c, _| {
        *c = c.replace("\"q8_0\"", "\"q5_1\"")
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { option, .. } if option == "weight_format"),
        "{e}"
    );
    let e = load_edited(QuantFormat::Q8_0, |c, _| *c = c.replace("\"q8_0\"", "8")).unwrap_err();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("weight_format")),
        "{e}"
    );
}

#[test]
fn a_missing_scale_tensor_is_named() {
    for f in QuantFormat::ALL {
        let e = load_edited(f, |_, t| t.retain(|e| e.name != scales_of(TO_V))).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidQuantized { name, message } if name == TO_V && message.contains("scale tensor")),
            "{f}: {e}"
        );
    }
}

#[test]
fn scales_must_be_f16() {
    let e = load_edited(QuantFormat::Q8_0, |_, t| {
        let s = find(t, &scales_of(TO_V));
        s.dtype = Dtype::BF16;
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { name, .. } if *name == scales_of(TO_V)),
        "{e}"
    );
    let e = load_edited(QuantFormat::Q8_0, |_, t| {
        let s = find(t, &scales_of(TO_V));
        s.dtype = Dtype::F32;
        s.shape[1] /= 2;
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { name, message } if *name == scales_of(TO_V) && message.contains("F32")),
        "{e}"
    );
}

#[test]
fn a_wrong_block_count_is_a_shape_error() {
    for f in QuantFormat::ALL {
        // One block too few per row (the bytes follow the shape, so the container is valid).
        let e = load_edited(f, |_, t| {
            let s = find(t, &scales_of(TO_V));
            let (rows, blocks) = (s.shape[0], s.shape[1]);
            s.shape = vec![rows, blocks - 1];
            s.data.truncate(rows * (blocks - 1) * 2);
        })
        .unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { name, expected, .. } if *name == scales_of(TO_V) && expected == &vec![256, 8]),
            "{f}: {e}"
        );
    }
}

#[test]
fn codes_of_the_wrong_shape_are_named() {
    for f in QuantFormat::ALL {
        let e = load_edited(f, |_, t| {
            let c = find(t, TO_V);
            // Stored as if unpacked (q4_0) or packed (q8_0): the other format's width.
            let cols = match f {
                QuantFormat::Q8_0 => 128,
                QuantFormat::Q4_0 | QuantFormat::Q4_1 => 256,
            };
            c.data = vec![0; 256 * cols];
            c.shape = vec![256, cols];
        })
        .unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { name, .. } if name == TO_V),
            "{f}: {e}"
        );
        // One row too many.
        let e = load_edited(f, |_, t| {
            let c = find(t, TO_V);
            let width = c.shape[1];
            c.shape[0] += 1;
            c.data.extend(std::iter::repeat_n(0, width));
        })
        .unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { name, .. } if name == TO_V),
            "{f}: {e}"
        );
    }
}

#[test]
fn non_finite_scales_are_refused_at_load() {
    for bits in [0x7C00u16, 0xFC00, 0x7E00] {
        let e = load_edited(QuantFormat::Q4_0, |_, t| {
            let s = find(t, &scales_of(TO_V));
            s.data[10..12].copy_from_slice(&bits.to_le_bytes());
        })
        .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidQuantized { name, message } if *name == scales_of(TO_V) && message.contains("scale 5")),
            "{bits:#x}: {e}"
        );
    }
}

#[test]
fn other_integer_dtypes_stay_unsupported() {
    let e = load_edited(QuantFormat::Q8_0, |_, t| {
        let c = find(t, TO_V);
        c.dtype = Dtype::I16;
        c.shape[1] /= 2;
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedDtype { name, dtype } if name == TO_V && dtype == "I16"),
        "{e}"
    );
}

#[test]
fn widths_off_the_block_grid_are_refused() {
    // A direct load of a 40-wide I8 matrix (no model config could ask for it here).
    let tmp = tempfile::tempdir().unwrap();
    let entries = [
        Entry {
            name: "w".into(),
            dtype: Dtype::I8,
            shape: vec![2, 40],
            data: vec![1; 80],
        },
        Entry {
            name: "w.scales".into(),
            dtype: Dtype::F16,
            shape: vec![2, 1],
            data: vec![0; 4],
        },
    ];
    let path = tmp.path().join("m.safetensors");
    safetensors::serialize_to_file(entries.iter().map(|e| (e.name.as_str(), e)), None, &path)
        .unwrap();
    let file = WeightFile::open(&path).unwrap();
    let e = QuantTensor::load(&file, "w", 2, 40, QuantFormat::Q8_0).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { name, message } if name == "w" && message.contains("multiple of the block size")),
        "{e}"
    );
    let e = QuantTensor::load(&file, "w", 2, 40, QuantFormat::Q4_0).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidQuantized { message, .. } if message.contains("U8")),
        "{e}"
    );
}
