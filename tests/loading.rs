//! Config resolution and loader errors: every bad input is a typed error, never a panic.

mod common;

use std::path::Path;

use common::fixture;
use performer::config::{Config, Inferred, Origin};
use performer::weights::{names, PageReport, WeightFile};
use performer::{Error, LoadOptions, Model, State};

const BASE: &str = r#""num_tokens": 256, "max_seq_len": 128, "dim": 64, "depth": 2, "heads": 2, "dim_head": 32, "causal": true"#;

fn cfg(extra: &str) -> performer::Result<Config> {
    let sep = if extra.is_empty() { "" } else { ", " };
    Config::from_json(&format!("{{{BASE}{sep}{extra}}}"), &Inferred::default())
}

#[test]
fn defaults_follow_performer_pytorch() {
    let c = cfg("").unwrap();
    assert_eq!(c.nb_features, 110);
    assert_eq!(c.ff_mult, 4);
    assert!(c.rotary_position_emb && !c.ff_glu && !c.qkv_bias && !c.tie_embed);
    assert_eq!(c.kernel_eps, 1e-4);
    assert_eq!(c.denominator_eps, 1e-6);
    assert_eq!(c.origin("nb_features"), Some(Origin::Default));
    assert_eq!(c.origin("dim"), Some(Origin::Config));
    let c = Config::from_json(
        r#"{"num_tokens": 256, "max_seq_len": 8, "dim": 128, "depth": 1, "heads": 2, "causal": true}"#,
        &Inferred::default(),
    )
    .unwrap();
    assert_eq!((c.dim_head, c.nb_features), (64, 266));
    // Training-only keys are accepted.
    cfg(r#""emb_dropout": 0.1, "ff_dropout": 0.0, "feature_redraw_interval": null, "auto_check_redraw": true, "ff_chunks": 2, "reversible": false"#).unwrap();
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    match cfg(r#""dimm": 3"#) {
        Err(Error::UnknownConfigKey { key }) => assert_eq!(key, "dimm"),
        other => panic!("{other:?}"),
    }
    for (extra, needle) in [
        (r#""dim_head": "big""#, "dim_head"),
        (r#""ff_glu": 1"#, "ff_glu"),
        (r#""kernel_eps": -1"#, "kernel_eps"),
        (r#""kernel_fn": 3"#, "kernel_fn"),
    ] {
        let e = cfg(extra).unwrap_err().to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }
    assert!(matches!(
        Config::from_json("[1, 2]", &Inferred::default()),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Config::from_json("{not json", &Inferred::default()),
        Err(Error::Config(_))
    ));
    let e = Config::from_json(r#"{"dim": 64}"#, &Inferred::default()).unwrap_err();
    assert!(e.to_string().contains("num_tokens"), "{e}");
}

#[test]
fn unsupported_options_are_errors_naming_the_option() {
    for (extra, option) in [
        (r#""causal": false"#, "causal"),
        (r#""reversible": true"#, "reversible"),
        (r#""cross_attend": true"#, "cross_attend"),
        (
            r#""kernel_fn": "sigmoid", "generalized_attention": true"#,
            "kernel_fn",
        ),
        (r#""tokenizer": "bpe""#, "tokenizer"),
    ] {
        let json = format!("{{{}, {extra}}}", BASE.replace(r#", "causal": true"#, ""));
        let json = if extra.contains("causal") {
            json
        } else {
            json.replacen('{', r#"{"causal": true, "#, 1)
        };
        match Config::from_json(&json, &Inferred::default()) {
            Err(Error::Unsupported { option: o, .. }) => assert_eq!(o, option),
            other => panic!("{extra}: {other:?}"),
        }
    }
}

#[test]
fn config_contradicting_the_weights_names_both_values() {
    let file = WeightFile::open(fixture("default_a").join("model.safetensors")).unwrap();
    let inferred = names::infer(&file);
    assert_eq!(inferred.dim, Some(64));
    assert_eq!(inferred.nb_features, Some(110));
    assert_eq!(inferred.heads, Some(2));
    let json = format!("{{{}}}", BASE.replace(r#""dim": 64"#, r#""dim": 48"#));
    match Config::from_json(&json, &inferred) {
        Err(Error::ConfigMismatch {
            key,
            config,
            weights,
        }) => {
            assert_eq!(
                (key.as_str(), config.as_str(), weights.as_str()),
                ("dim", "48", "64")
            );
        }
        other => panic!("{other:?}"),
    }
    // Everything a save_model file determines is inferred without a config.
    let c = Config::from_inferred(&inferred).unwrap();
    assert_eq!(
        (c.num_tokens, c.dim, c.depth, c.heads, c.dim_head),
        (256, 64, 2, 2, 32)
    );
    assert_eq!(c.max_seq_len, 128);
    assert_eq!(c.origin("heads"), Some(Origin::Inferred));
}

/// Writes a safetensors file from a header JSON string and a data section.
fn write_raw(dir: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

/// The error of opening the directory's weights, which the huge-page copy must report alike.
fn open_err(dir: &Path) -> Error {
    let path = dir.join("model.safetensors");
    let mapped = WeightFile::open(&path).unwrap_err();
    let copied = WeightFile::open_huge_pages(&path).unwrap_err();
    assert_eq!(
        std::mem::discriminant(&mapped),
        std::mem::discriminant(&copied),
        "{mapped} / {copied}"
    );
    mapped
}

#[test]
fn huge_page_copy_runs_the_same_model() {
    for name in [
        "default_a",
        "default_a_f16",
        "default_a_bf16",
        "opt_relu_glu",
    ] {
        let mapped = Model::load(fixture(name)).unwrap();
        let copied = Model::load_with(
            fixture(name),
            LoadOptions {
                huge_pages: true,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let (mut a, mut b) = (State::new(&mapped), State::new(&copied));
        for t in [1u32, 50, 200, 7] {
            // The same bytes through the same kernels: bit-identical.
            assert_eq!(
                mapped.step(&mut a, t).unwrap(),
                copied.step(&mut b, t).unwrap(),
                "{name}"
            );
        }
        assert_eq!(mapped.fingerprint(), copied.fingerprint());
    }
    assert!(matches!(
        WeightFile::open_huge_pages("/nonexistent/model.safetensors"),
        Err(Error::Io { .. })
    ));
}

#[test]
fn page_report_parses_smaps_entries_inside_the_range() {
    // Three entries of one mapping at 0x10000..0x40000 (the kernel splits a mapping when parts
    // differ), one entry before it and one after it, which must not count; the range's end
    // need not be page-aligned (a file's length).
    let smaps = "\
0000f000-00010000 r--p 00000000 fd:00 1 /other
Rss:                   4 kB
FilePmdMapped:         0 kB
00010000-00020000 r--p 00000000 fd:00 2 /m.safetensors
Size:                 64 kB
Rss:                  64 kB
FilePmdMapped:         0 kB
VmFlags: rd mr mw me hg
00020000-00030000 r--p 00010000 fd:00 2 /m.safetensors
Rss:                  32 kB
FilePmdMapped:        32 kB
00030000-00040000 r--p 00000000 00:00 0
Rss:                  16 kB
AnonHugePages:         8 kB
00040000-00050000 rw-p 00000000 00:00 0 [heap]
Rss:                  64 kB
AnonHugePages:        64 kB
";
    let r = PageReport::from_smaps(smaps, 0x10000..0x40000);
    assert_eq!(r.resident_bytes, (64 + 32 + 16) * 1024);
    assert_eq!(r.huge_page_bytes, (32 + 8) * 1024);
    assert!((r.huge_fraction() - 40.0 / 112.0).abs() < 1e-12);
    assert_eq!(PageReport::from_smaps(smaps, 0x10000..0x3ff01), r);
    // An anonymous mapping merged with its neighbours into one entry (same permissions):
    // their pages cannot be told apart, so the entry counts at most the overlap.
    let merged = "\
00008000-00050000 r--p 00000000 00:00 0
Rss:                 288 kB
AnonHugePages:       288 kB
";
    let r = PageReport::from_smaps(merged, 0x10000..0x20000);
    assert_eq!(
        (r.resident_bytes, r.huge_page_bytes),
        (64 * 1024, 64 * 1024)
    );
    let sparse = "\
00008000-00050000 r--p 00000000 00:00 0
Rss:                  16 kB
AnonHugePages:         0 kB
";
    let r = PageReport::from_smaps(sparse, 0x10000..0x20000);
    assert_eq!((r.resident_bytes, r.huge_page_bytes), (16 * 1024, 0));
    // An unmapped range, an empty or garbled file: nothing resident, no division by zero.
    for (text, range) in [
        (smaps, 0x60000..0x70000),
        ("", 0..usize::MAX),
        ("zz-yy nonsense\nRss: lots kB\n", 0..usize::MAX),
    ] {
        let r = PageReport::from_smaps(text, range);
        assert_eq!(r, PageReport::default());
        assert_eq!(r.huge_fraction(), 0.0);
    }
}

#[cfg(target_os = "linux")]
#[test]
fn page_report_counts_the_weights_once_read() {
    // Whether the kernel uses 2 MiB pages depends on it and the file system, so only the
    // accounting is checked: a fully read mapping is resident, the huge share within it.
    for huge_pages in [false, true] {
        let path = fixture("default_a").join("model.safetensors");
        let file = if huge_pages {
            WeightFile::open_huge_pages(&path)
        } else {
            WeightFile::open(&path)
        }
        .unwrap();
        let checksum = file.bytes().iter().fold(0u8, |a, &b| a.wrapping_add(b));
        std::hint::black_box(checksum);
        let r = file
            .page_report()
            .expect("/proc/self/smaps is readable on Linux");
        let size = file.file_size() as u64;
        assert!(
            r.resident_bytes >= size && r.resident_bytes < size + (2 << 20),
            "{huge_pages}: {r:?} for {size} bytes"
        );
        assert!(r.huge_page_bytes <= r.resident_bytes, "{r:?}");
    }
}

#[test]
fn malformed_containers_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("model.safetensors"), b"").unwrap();
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    std::fs::write(d.join("model.safetensors"), b"\x05\x00").unwrap();
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    // Header length larger than the file.
    let mut b = 1_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(d.join("model.safetensors"), b).unwrap();
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    // Header not JSON.
    write_raw(d, "not json at all", &[]);
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    // Offsets outside the data.
    write_raw(
        d,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 4],
    );
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    // Byte count not matching dtype × shape.
    write_raw(
        d,
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    // Overlapping offsets.
    write_raw(
        d,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 12],
    );
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    // Unknown dtype string.
    write_raw(
        d,
        r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#,
        &[0; 1],
    );
    assert!(matches!(open_err(d), Error::MalformedWeights { .. }));
    // A valid container with an integer tensor: asking for it as a weight is a dtype error.
    write_raw(
        d,
        r#"{"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let f = WeightFile::open(d.join("model.safetensors")).unwrap();
    assert!(matches!(f.tensor("a"), Err(Error::UnsupportedDtype { .. })));
    assert!(matches!(f.tensor("b"), Err(Error::MissingTensor { .. })));
}

/// Copies a fixture directory so a test can damage its files.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

#[test]
fn model_directory_errors() {
    assert!(matches!(
        Model::load("/nonexistent/model"),
        Err(Error::Io { .. })
    ));
    let tmp = copy_fixture("default_a");
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    assert!(matches!(Model::load(tmp.path()), Err(Error::Io { .. })));

    // Truncated weights.
    let tmp = copy_fixture("default_a");
    let p = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(
        Model::load(tmp.path()),
        Err(Error::MalformedWeights { .. })
    ));

    // A config asking for a bigger model than the weights hold.
    let tmp = copy_fixture("default_a");
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"num_tokens": 512, "max_seq_len": 128, "dim": 64, "depth": 2, "heads": 2, "dim_head": 32, "causal": true}"#,
    )
    .unwrap();
    assert!(matches!(
        Model::load(tmp.path()),
        Err(Error::ConfigMismatch { .. })
    ));

    // A config with more layers than the weights hold.
    let tmp = copy_fixture("default_a");
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"num_tokens": 256, "max_seq_len": 128, "dim": 64, "depth": 3, "heads": 2, "dim_head": 32, "causal": true}"#,
    )
    .unwrap();
    assert!(matches!(
        Model::load(tmp.path()),
        Err(Error::ConfigMismatch { .. })
    ));
}

/// Rewrites one tensor's shape in a safetensors header (same byte count), keeping the data.
fn reshape_tensor(path: &Path, name: &str, shape: serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header[name]["shape"] = shape;
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let tmp = copy_fixture("default_a");
    reshape_tensor(
        &tmp.path().join("model.safetensors"),
        "performer.net.layers.1.1.fn.fn.w2.bias",
        serde_json::json!([8, 8]),
    );
    match Model::load(tmp.path()) {
        Err(Error::ShapeMismatch {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "performer.net.layers.1.1.fn.fn.w2.bias");
            assert_eq!((expected, found), (vec![64], vec![8, 8]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sizes_a_config_alone_could_blow_up_are_errors() {
    // Found by the loader fuzzer: a huge depth used to size a per-layer list, and a huge
    // ff_mult overflowed dim · ff_mult, before anything checked them.
    let huge_depth = r#"{"num_tokens": 256, "max_seq_len": 8, "dim": 8, "depth": 18446744073709551608, "heads": 2, "dim_head": 4, "causal": true}"#;
    assert!(matches!(
        Config::from_json(huge_depth, &Inferred::default()),
        Err(Error::Config(_))
    ));
    let huge_ff = r#"{"num_tokens": 256, "max_seq_len": 8, "dim": 8, "depth": 1, "heads": 2, "dim_head": 4, "causal": true, "ff_mult": 4611686018427387904}"#;
    assert!(matches!(
        Config::from_json(huge_ff, &Inferred::default()),
        Err(Error::Config(_))
    ));
    let huge_window = r#"{"num_tokens": 256, "max_seq_len": 8, "dim": 8, "depth": 1, "heads": 2, "dim_head": 4, "causal": true, "local_attn_heads": 1, "local_window_size": 1000000000000}"#;
    assert!(matches!(
        Config::from_json(huge_window, &Inferred::default()),
        Err(Error::Config(_))
    ));
}

#[test]
fn duplicate_keys_are_named_and_a_bom_is_accepted() {
    let e = cfg(r#""dim": 32"#).unwrap_err();
    match &e {
        Error::Config(m) => assert!(m.contains("duplicate key `dim`"), "{m}"),
        other => panic!("{other:?}"),
    }
    let with_bom = format!("\u{feff}{{{BASE}}}");
    assert_eq!(
        Config::from_json(&with_bom, &Inferred::default())
            .unwrap()
            .dim,
        64
    );
    // The top level must still be an object.
    let e = Config::from_json("[1, 2]", &Inferred::default()).unwrap_err();
    assert!(e.to_string().contains("JSON object"), "{e}");
}

#[test]
fn model_paths_of_the_wrong_kind_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    // A file where the model directory should be.
    let file = tmp.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let e = Model::load(&file).unwrap_err().to_string();
    assert!(e.contains("not a directory") && e.contains("/f"), "{e}");
    let e = Model::load(tmp.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    // A directory where model.safetensors should be.
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixture("default_a").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    let e = Model::load(&dir).unwrap_err().to_string();
    assert!(e.contains("model.safetensors: is a directory"), "{e}");
    let e = WeightFile::open(dir.join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");
    // A device is not a weights file.
    let e = WeightFile::open("/dev/zero").unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn epsilon_overrides_must_be_finite_and_non_negative() {
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        for options in [
            LoadOptions {
                kernel_eps: Some(bad),
                ..Default::default()
            },
            LoadOptions {
                denominator_eps: Some(bad),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(
                    Model::load_with(fixture("default_a"), options),
                    Err(Error::InvalidParameter { .. })
                ),
                "{bad}"
            );
        }
    }
    let ok = LoadOptions {
        kernel_eps: Some(0.0),
        denominator_eps: Some(1e-3),
        ..Default::default()
    };
    assert!(Model::load_with(fixture("default_a"), ok).is_ok());
}
