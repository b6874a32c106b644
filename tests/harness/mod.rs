//! Shared by `tests/malformed.rs`, `tests/loader_fuzz.rs` and the cargo-fuzz target in `fuzz/`:
//! a tiny valid checkpoint, a raw safetensors writer, a deterministic mutator for loader
//! inputs, and [`exercise`], which runs the whole loading path on a model directory and checks
//! that every failure is a typed error of the kind loading can produce.
#![allow(dead_code)]

use std::path::Path;

use performer::config::Config;
use performer::weights::{names, WeightFile};
use performer::{Error, Model, State};
use serde_json::{json, Map, Value};

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        performer::sampling::splitmix64(&mut self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// Raw safetensors files.

/// One tensor of a raw file: name, dtype string, shape, bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn f32(name: &str, shape: &[u64], values: &[f32]) -> Self {
        RawTensor {
            name: name.into(),
            dtype: "F32".into(),
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Header length prefix + header + data, as the safetensors layout has it.
pub fn assemble(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// The header JSON of `tensors`, laid out back to back in list order, with optional
/// `__metadata__`, padded with spaces to a multiple of 8 bytes (as the reference writer does,
/// so that every tensor is aligned) unless `pad` is false.
pub fn header_for(tensors: &[RawTensor], metadata: Option<&Value>, pad: bool) -> String {
    // Sorted keys whatever serde_json's features (`preserve_order` keeps insertion order, and a
    // dependency of the workspace turns it on): the corpus's bytes do not depend on the build.
    let mut map = std::collections::BTreeMap::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), m.clone());
    }
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.data.len() as u64;
        map.insert(
            t.name.clone(),
            json!({"data_offsets": [offset, end], "dtype": t.dtype, "shape": t.shape}),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&map).unwrap();
    if pad {
        while !(8 + text.len()).is_multiple_of(8) {
            text.push(' ');
        }
    }
    text
}

/// A complete safetensors file holding `tensors` back to back.
pub fn file_for(tensors: &[RawTensor], pad: bool) -> Vec<u8> {
    let header = header_for(tensors, Some(&json!({"format": "pt"})), pad);
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.clone()).collect();
    assemble(&header, &data)
}

/// Splits a safetensors file into header text bytes and data; `None` when the length prefix
/// does not fit the file.
pub fn split(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    Some((bytes.get(8..end)?, &bytes[end..]))
}

// ---------------------------------------------------------------------------------------------
// The tiny model.

/// `config.json` of the tiny model: the smallest shape the runtime accepts (the byte tokenizer
/// needs 256 tokens; rotary needs even widths).
pub const TINY_CONFIG: &str = r#"{
  "num_tokens": 256,
  "max_seq_len": 4,
  "dim": 4,
  "depth": 1,
  "heads": 1,
  "dim_head": 2,
  "nb_features": 2,
  "ff_mult": 1,
  "causal": true
}
"#;

fn sinusoid(rows: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * dim];
    let half = dim / 2;
    for p in 0..rows {
        for i in 0..half {
            let inv = 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64);
            let a = p as f64 * inv;
            out[p * dim + i] = a.sin() as f32;
            out[p * dim + half + i] = a.cos() as f32;
        }
    }
    out
}

/// The tensors of the tiny model (names and layout as performer-pytorch's `save_model`
/// writes them), with deterministic small random weights.
pub fn tiny_tensors() -> Vec<RawTensor> {
    let mut rng = Rng(0x7157_0001);
    let mut r = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..n).map(|_| offset + scale * rng.uniform()).collect()
    };
    let l = "performer.net.layers.0";
    let mut t = vec![
        RawTensor::f32("token_emb.weight", &[256, 4], &r(1024, 0.5, 0.0)),
        RawTensor::f32("pos_emb.emb", &[4, 4], &sinusoid(4, 4)),
        RawTensor::f32("layer_pos_emb.emb", &[4, 2], &sinusoid(4, 2)),
        RawTensor::f32(&format!("{l}.0.norm.weight"), &[4], &r(4, 0.1, 1.0)),
        RawTensor::f32(&format!("{l}.0.norm.bias"), &[4], &r(4, 0.1, 0.0)),
        RawTensor::f32(&format!("{l}.0.fn.to_q.weight"), &[2, 4], &r(8, 0.5, 0.0)),
        RawTensor::f32(&format!("{l}.0.fn.to_k.weight"), &[2, 4], &r(8, 0.5, 0.0)),
        RawTensor::f32(&format!("{l}.0.fn.to_v.weight"), &[2, 4], &r(8, 0.5, 0.0)),
        RawTensor::f32(&format!("{l}.0.fn.to_out.weight"), &[4, 2], &r(8, 0.5, 0.0)),
        RawTensor::f32(
            &format!("{l}.0.fn.fast_attention.projection_matrix"),
            &[2, 2],
            &r(4, 1.0, 0.0),
        ),
        RawTensor::f32(&format!("{l}.1.norm.weight"), &[4], &r(4, 0.1, 1.0)),
        RawTensor::f32(&format!("{l}.1.norm.bias"), &[4], &r(4, 0.1, 0.0)),
        RawTensor::f32(&format!("{l}.1.fn.fn.w1.weight"), &[4, 4], &r(16, 0.5, 0.0)),
        RawTensor::f32(&format!("{l}.1.fn.fn.w1.bias"), &[4], &r(4, 0.1, 0.0)),
        RawTensor::f32(&format!("{l}.1.fn.fn.w2.weight"), &[4, 4], &r(16, 0.5, 0.0)),
        RawTensor::f32(&format!("{l}.1.fn.fn.w2.bias"), &[4], &r(4, 0.1, 0.0)),
        RawTensor::f32("norm.weight", &[4], &r(4, 0.1, 1.0)),
        RawTensor::f32("norm.bias", &[4], &r(4, 0.1, 0.0)),
        RawTensor::f32("to_out.weight", &[256, 4], &r(1024, 1.0, 0.0)),
        RawTensor::f32("to_out.bias", &[256], &r(256, 0.1, 0.0)),
    ];
    t.push(RawTensor {
        name: "performer.proj_updater.calls_since_last_redraw".into(),
        dtype: "I64".into(),
        shape: vec![],
        data: 0i64.to_le_bytes().to_vec(),
    });
    t
}

/// The tiny model's `model.safetensors`.
pub fn tiny_file() -> Vec<u8> {
    file_for(&tiny_tensors(), true)
}

/// The tiny model with `edit` applied to its tensor list.
pub fn tiny_with(edit: impl FnOnce(&mut Vec<RawTensor>)) -> Vec<u8> {
    let mut t = tiny_tensors();
    edit(&mut t);
    file_for(&t, true)
}

/// The tensor of that name in a list (panics when absent: test-side helper).
pub fn find<'a>(tensors: &'a mut [RawTensor], name: &str) -> &'a mut RawTensor {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

// ---------------------------------------------------------------------------------------------
// Running the loader.

/// What [`exercise`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `WeightFile::open` succeeded.
    pub opened: bool,
    /// `Model::load` succeeded.
    pub loaded: bool,
    /// The first step produced finite logits.
    pub stepped: bool,
}

/// Errors that loading may legitimately produce.
pub fn is_load_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Io { .. }
            | Error::Config(_)
            | Error::UnknownConfigKey { .. }
            | Error::Unsupported { .. }
            | Error::ConfigMismatch { .. }
            | Error::MalformedWeights { .. }
            | Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::UnsupportedDtype { .. }
            | Error::NonFiniteWeight { .. }
            | Error::InvalidQuantized { .. }
    )
}

fn check_load_error(stage: &str, e: &Error) {
    // Display must not panic either.
    let text = e.to_string();
    assert!(!text.is_empty());
    assert!(is_load_error(e), "{stage}: unexpected error kind {e:?}");
}

/// Runs every loading entry point on `dir` (holding `model.safetensors` and possibly
/// `config.json`): `WeightFile::open`, every tensor view, shape inference, config resolution
/// with and without `config.json`, `Model::load`, `Model::from_parts`, and on success a few
/// decode steps. Panics (failing the test or the fuzz run) when an error is of a kind loading
/// should never produce, or when a successful step returns non-finite or wrongly sized logits.
pub fn exercise(dir: &Path) -> Outcome {
    let mut outcome = Outcome::default();
    let weights = dir.join("model.safetensors");
    match WeightFile::open(&weights) {
        Ok(file) => {
            outcome.opened = true;
            let _ = file.file_size();
            let names: Vec<String> = file.entries().map(|(n, _)| n.to_string()).collect();
            for name in &names {
                match file.tensor(name) {
                    Ok(t) => {
                        let v = t.view();
                        assert_eq!(v.len(), t.numel(), "{name}: view length");
                        assert_eq!(
                            v.len() * t.dtype().size(),
                            file.entries().find(|(n, _)| n == name).unwrap().1.bytes
                        );
                        let _ = v.first_non_finite();
                        if let Some(x) = v.len().checked_sub(1) {
                            let _ = v.get(x);
                        }
                    }
                    Err(e) => check_load_error("tensor", &e),
                }
            }
            let inferred = names::infer(&file);
            if let Ok(text) = std::fs::read_to_string(dir.join("config.json")) {
                if let Err(e) = Config::from_json(&text, &inferred) {
                    check_load_error("config", &e);
                }
            }
            match Config::from_inferred(&inferred) {
                Ok(config) => match Model::from_parts(config, file) {
                    Ok(model) => {
                        run_model(&model);
                    }
                    Err(e) => check_load_error("from_parts", &e),
                },
                Err(e) => check_load_error("from_inferred", &e),
            }
        }
        Err(e) => check_load_error("open", &e),
    }
    match Model::load(dir) {
        Ok(model) => {
            outcome.loaded = true;
            outcome.stepped = run_model(&model);
        }
        Err(e) => check_load_error("load", &e),
    }
    outcome
}

/// A few decode steps; true when the first produced finite logits.
fn run_model(model: &Model) -> bool {
    let _ = model.parameter_count();
    let _ = model.weight_bytes_per_token();
    let _ = model.dtype_counts();
    for t in model.tensors() {
        let _ = t.view().first_non_finite();
    }
    let vocab = model.vocab_size();
    let mut state = State::new(model);
    let mut first = false;
    for (i, token) in [0u32, 1, (vocab - 1) as u32].into_iter().enumerate() {
        match model.step(&mut state, token) {
            Ok(logits) => {
                assert_eq!(logits.len(), vocab);
                assert!(logits.iter().all(|x| x.is_finite()));
                first |= i == 0;
            }
            Err(Error::NonFiniteLogits { .. }) => {}
            Err(e) => panic!("step: unexpected error {e:?}"),
        }
    }
    // Out-of-range ids stay typed errors.
    match model.step(&mut state, vocab as u32) {
        Err(Error::TokenOutOfRange { .. }) => {}
        other => panic!("step with an out-of-range id: {other:?}"),
    }
    first
}

/// Writes a model directory's files (`config` `None`: no `config.json`).
pub fn write_dir(dir: &Path, config: Option<&[u8]>, weights: &[u8]) {
    let c = dir.join("config.json");
    match config {
        Some(text) => std::fs::write(&c, text).unwrap(),
        None => {
            let _ = std::fs::remove_file(&c);
        }
    }
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The mutator.

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F64",
    "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "C64", "Q4", "", "f32",
];

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    255,
    256,
    4096,
    65535,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 62,
    u64::MAX / 2,
    u64::MAX - 7,
    u64::MAX,
];

fn interesting(rng: &mut Rng) -> u64 {
    if rng.one_in(3) {
        rng.next_u64() >> rng.below(64)
    } else {
        *rng.pick(INTERESTING)
    }
}

/// An arbitrary JSON value, biased to the kinds a loader might mishandle.
fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => json!(null),
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1.5),
        4 => json!("x"),
        5 => json!([]),
        6 => json!({}),
        7 => json!(-0.0),
        8 => json!(1e300),
        9 => json!([1, 2, 3]),
        _ => json!(interesting(rng)),
    }
}

fn mutate_tensor_info(rng: &mut Rng, info: &mut Value) {
    let Some(obj) = info.as_object_mut() else {
        *info = odd_value(rng);
        return;
    };
    match rng.below(10) {
        0 | 1 => {
            obj.insert("dtype".into(), json!(rng.pick(DTYPES)));
        }
        2..=4 => {
            let mut shape: Vec<Value> = obj
                .get("shape")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            match rng.below(6) {
                0 => shape.push(json!(interesting(rng))),
                1 => {
                    shape.pop();
                }
                2 => shape.clear(),
                3 => shape.reverse(),
                _ => {
                    if !shape.is_empty() {
                        let i = rng.below(shape.len());
                        shape[i] = json!(interesting(rng));
                    } else {
                        shape.push(json!(0));
                    }
                }
            }
            obj.insert("shape".into(), Value::Array(shape));
        }
        5..=7 => {
            let mut offs: Vec<u64> = obj
                .get("data_offsets")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            offs.resize(2, 0);
            let i = rng.below(2);
            offs[i] = match rng.below(4) {
                0 => interesting(rng),
                1 => offs[i].wrapping_add(1 + rng.below(16) as u64),
                2 => offs[i].saturating_sub(1 + rng.below(16) as u64),
                _ => offs[1 - i],
            };
            if rng.one_in(8) {
                offs.swap(0, 1);
            }
            obj.insert("data_offsets".into(), json!(offs));
        }
        8 => {
            let keys: Vec<String> = obj.keys().cloned().collect();
            if let Some(k) = keys.get(rng.below(keys.len().max(1))) {
                if rng.one_in(2) {
                    obj.remove(k);
                } else {
                    obj.insert(k.clone(), odd_value(rng));
                }
            }
        }
        _ => {
            obj.insert("extra".into(), odd_value(rng));
        }
    }
}

/// Renames a tensor the way a different checkpoint layout might: another layer index, the
/// `proj_updater` alias, a typo.
fn rename(rng: &mut Rng, name: &str) -> String {
    match rng.below(5) {
        0 => name.replacen("performer.net.layers", names::ALIAS_LAYERS, 1),
        1 => {
            let n = *rng.pick(&["1", "2", "7", "4294967296", "18446744073709551615", "-1"]);
            name.replacen(".0.", &format!(".{n}."), 1)
        }
        2 => format!("{name}x"),
        3 => name.replacen(".fn.", ".fn.fn.", 1),
        _ => name[..rng.below(name.len() + 1)].to_string(),
    }
}

fn mutate_header_json(rng: &mut Rng, header: &mut Map<String, Value>) {
    let keys: Vec<String> = header.keys().cloned().collect();
    if keys.is_empty() {
        header.insert("a".into(), odd_value(rng));
        return;
    }
    let key = keys[rng.below(keys.len())].clone();
    match rng.below(10) {
        0..=5 => {
            if let Some(v) = header.get_mut(&key) {
                mutate_tensor_info(rng, v);
            }
        }
        6 => {
            header.remove(&key);
        }
        7 => {
            if let Some(v) = header.remove(&key) {
                header.insert(rename(rng, &key), v);
            }
        }
        8 => {
            if let Some(v) = header.get(&key).cloned() {
                header.insert(rename(rng, &key), v);
            }
        }
        _ => {
            header.insert("__metadata__".into(), odd_value(rng));
        }
    }
}

/// Byte-level and structure-aware mutations of a safetensors file.
pub fn mutate_weights(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let header_end = split(bytes)
        .map(|(h, _)| 8 + h.len())
        .unwrap_or(bytes.len());
    match rng.below(12) {
        // A bit flip, mostly in the header.
        0 => {
            if !bytes.is_empty() {
                let i = if rng.one_in(4) {
                    rng.below(bytes.len())
                } else {
                    rng.below(header_end.clamp(1, bytes.len()))
                };
                bytes[i] ^= 1 << rng.below(8);
            }
        }
        // A byte overwritten with a JSON-significant or extreme byte.
        1 => {
            if !bytes.is_empty() {
                let i = rng.below(header_end.clamp(1, bytes.len()));
                bytes[i] = *rng.pick(b"\0\xff\x80\"[]{},:0123456789-.eE \\");
            }
        }
        // Truncation.
        2 => {
            let n = rng.below(bytes.len() + 1);
            bytes.truncate(n);
        }
        // Extension.
        3 => {
            let n = 1 + rng.below(64);
            bytes.extend((0..n).map(|_| rng.next_u64() as u8));
        }
        // The header length field.
        4 => {
            if bytes.len() >= 8 {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                let len = bytes.len() as u64;
                let v = match rng.below(6) {
                    0 => n.wrapping_add(1 + rng.below(8) as u64),
                    1 => n.wrapping_sub(1 + rng.below(8) as u64),
                    2 => len,
                    3 => len - 8,
                    4 => len - 7,
                    _ => interesting(rng),
                };
                bytes[..8].copy_from_slice(&v.to_le_bytes());
            }
        }
        // Non-finite floats over data.
        5 => {
            if bytes.len() > header_end + 4 {
                let i = header_end + rng.below(bytes.len() - header_end - 3);
                let v: [u8; 4] = *rng.pick(&[
                    f32::NAN.to_le_bytes(),
                    f32::INFINITY.to_le_bytes(),
                    f32::NEG_INFINITY.to_le_bytes(),
                    f32::MAX.to_le_bytes(),
                    [0x00, 0x7c, 0x00, 0x7c], // f16 inf, inf
                    [0x80, 0x7f, 0xc0, 0x7f], // bf16 inf, nan
                ]);
                bytes[i..i + 4].copy_from_slice(&v);
            }
        }
        // Structure-aware header edits.
        _ => {
            let Some((h, data)) = split(bytes) else {
                bytes.truncate(rng.below(bytes.len() + 1));
                return;
            };
            let Ok(Value::Object(mut header)) = serde_json::from_slice::<Value>(h) else {
                let i = rng.below(bytes.len().max(1));
                if let Some(b) = bytes.get_mut(i) {
                    *b = rng.next_u64() as u8;
                }
                return;
            };
            let data = data.to_vec();
            for _ in 0..1 + rng.below(3) {
                mutate_header_json(rng, &mut header);
            }
            let mut text = serde_json::to_string(&Value::Object(header)).unwrap();
            if rng.one_in(2) {
                while !(8 + text.len()).is_multiple_of(8) {
                    text.push(' ');
                }
            }
            *bytes = assemble(&text, &data);
        }
    }
}

/// Mutations of `config.json` text.
pub fn mutate_config(rng: &mut Rng, text: &mut Vec<u8>) {
    match rng.below(8) {
        0 => {
            if !text.is_empty() {
                let i = rng.below(text.len());
                text[i] = *rng.pick(b"\0\xff\"[]{},:0123456789-.eE \\");
            }
        }
        1 => {
            let n = rng.below(text.len() + 1);
            text.truncate(n);
        }
        _ => {
            let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(text) else {
                *text = rng
                    .pick(&[&b"[]"[..], b"null", b"1", b"\"x\"", b"{}", b"{"])
                    .to_vec();
                return;
            };
            let keys: Vec<String> = map.keys().cloned().collect();
            match rng.below(5) {
                0 if !keys.is_empty() => {
                    map.remove(&keys[rng.below(keys.len())]);
                }
                1 => {
                    let key = rng.pick(performer::config::KNOWN_KEYS);
                    map.insert((*key).into(), odd_value(rng));
                }
                2 => {
                    map.insert("not_a_key".into(), json!(1));
                }
                _ if !keys.is_empty() => {
                    let k = keys[rng.below(keys.len())].clone();
                    let v = match map[&k] {
                        Value::Number(ref n) => match rng.below(4) {
                            0 => json!(n.as_u64().unwrap_or(1).saturating_mul(2)),
                            1 => json!(n.as_u64().unwrap_or(1).saturating_sub(1)),
                            _ => json!(interesting(rng)),
                        },
                        Value::Bool(b) => json!(!b),
                        _ => odd_value(rng),
                    };
                    map.insert(k, v);
                }
                _ => {}
            }
            *text = serde_json::to_vec(&Value::Object(map)).unwrap();
            if rng.one_in(8) {
                // Raw text serde_json would never write.
                let extra: &[u8] = rng.pick::<&[u8]>(&[
                    br#", "kernel_eps": NaN}"#,
                    br#", "dim": 1e400}"#,
                    br#", "dim": 4, "dim": 8}"#,
                    br#", "depth": 100000000000000}"#,
                ]);
                if text.ends_with(b"}") && text.len() > 2 {
                    text.pop();
                    text.extend_from_slice(extra);
                }
            }
        }
    }
}
