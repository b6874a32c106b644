//! The `performer` binary end to end: output, files and one-line errors with exit codes.

mod common;

use std::process::Command;

use common::fixture;

fn performer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_performer"))
        .args(args)
        .output()
        .expect("run performer")
}

fn model_dir() -> String {
    fixture("default_a").to_string_lossy().into_owned()
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let m = model_dir();
    let out = performer(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello",
        "--max-tokens",
        "16",
        "--seed",
        "5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("generation: 16 tokens"), "{stderr}");
    assert!(stderr.contains("tokens/s"));
    let again = performer(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello",
        "--max-tokens",
        "16",
        "--seed",
        "5",
    ]);
    assert_eq!(out.stdout, again.stdout, "same seed, same text");
    let greedy = performer(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert!(greedy.status.success());
}

#[test]
fn logits_writes_an_npy_array() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("l.npy");
    let out = performer(&[
        "logits",
        "--model",
        &model_dir(),
        "--tokens",
        "1,2,3",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'shape': (3, 256)"), "{header}");
    assert_eq!((10 + header_len) % 64, 0);
    assert_eq!(bytes.len(), 10 + header_len + 3 * 256 * 4);
}

#[test]
fn info_marks_config_default_and_inferred_values() {
    let out = performer(&["info", "--model", &model_dir()]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("nb_features            110          (inferred)"),
        "{s}"
    );
    assert!(s.contains("(default)") && s.contains("(config)"));
    assert!(s.contains("parameters: 132608"));
    assert!(s.contains("state per sequence"));
}

#[test]
fn errors_are_one_line_with_nonzero_exit() {
    let m = model_dir();
    for args in [
        vec![
            "logits",
            "--model",
            &m,
            "--tokens",
            "1,999",
            "--out",
            "/tmp/never.npy",
        ],
        vec!["generate", "--model", "/nonexistent", "--prompt", "x"],
        vec!["generate", "--model", &m, "--prompt", ""],
        vec!["generate", "--model", &m, "--prompt", "x", "--top-p", "0"],
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--temperature=-1",
        ],
    ] {
        let out = performer(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
    // Usage errors come from clap with exit code 2.
    assert_eq!(performer(&["generate", "--bogus"]).status.code(), Some(2));
}

#[test]
fn bench_prints_json_and_rejects_softmax() {
    let out = performer(&[
        "bench",
        "--shape",
        "tiny",
        "--dtype",
        "bf16",
        "--pp",
        "4",
        "--tg",
        "2",
        "--depths",
        "0,8",
        "-r",
        "1",
        "--threads",
        "1",
        "--bandwidth-mib",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["rows"].as_array().unwrap().len(), 3);
    assert_eq!(v["model"]["name"], "synthetic tiny");

    let out = performer(&["bench", "--shape", "tiny", "--attention", "favor,softmax"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("softmax baseline not available"),
        "{stderr}"
    );
}
