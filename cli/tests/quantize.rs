//! `performer quantize` end to end: the directory it writes, `info` and `generate` on it, and
//! its refusals as one-line errors.

use std::process::Command;

use performer::synthetic::{self, SyntheticShape, WeightDtype};

fn performer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_performer"))
        .args(args)
        .output()
        .expect("run performer")
}

#[test]
fn quantize_then_info_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let float = tmp.path().join("float");
    synthetic::write(
        &float,
        &SyntheticShape::named("tiny").unwrap(),
        WeightDtype::F16,
        2,
    )
    .unwrap();
    let f = float.to_str().unwrap();
    for format in ["q8_0", "q4_0", "q4_1"] {
        let out = tmp.path().join(format);
        let o = out.to_str().unwrap();
        let r = performer(&["quantize", "--model", f, "--to", format, "--out", o]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(String::from_utf8_lossy(&r.stderr).contains(&format!("wrote {o} ({format}")));
        let info = performer(&["info", "--model", o]);
        assert!(info.status.success());
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(
            text.contains(&format!("weight_format          {format}")),
            "{text}"
        );
        assert!(text.contains(&format!("quantized ({format}")), "{text}");
        assert!(text.contains("in 25 tensors"), "{text}");
        let g = performer(&[
            "generate",
            "--model",
            o,
            "--prompt",
            "Hi",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ]);
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
        // Quantizing again is refused with one line and exit code 1, and writes nothing.
        let again = tmp.path().join(format!("again-{format}"));
        let r = performer(&[
            "quantize",
            "--model",
            o,
            "--to",
            "q4_0",
            "--out",
            again.to_str().unwrap(),
        ]);
        assert_eq!(r.status.code(), Some(1));
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("already quantized"), "{err}");
        assert!(!again.exists());
    }
    // An unknown format is a usage error (exit code 2).
    let r = performer(&[
        "quantize",
        "--model",
        f,
        "--to",
        "q5_1",
        "--out",
        "/nonexistent/x",
    ]);
    assert_eq!(r.status.code(), Some(2));
}
