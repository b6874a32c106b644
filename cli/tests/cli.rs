//! The `performer` binary end to end: output, files and one-line errors with exit codes.

// The runtime's test helpers and fixtures, shared from the workspace root.
#[path = "../../tests/common/mod.rs"]
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
    // `generate` on the fixture with "Hello", 16 tokens, seed 5, plus `extra` options.
    let hello = |extra: &[&str]| {
        let base = [
            "generate",
            "--model",
            &m,
            "--prompt",
            "Hello",
            "--max-tokens",
            "16",
            "--seed",
            "5",
        ];
        performer(&[&base[..], extra].concat())
    };
    let out = hello(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("generation: 16 tokens"), "{stderr}");
    assert!(stderr.contains("tokens/s"));
    let again = hello(&[]);
    assert_eq!(out.stdout, again.stdout, "same seed, same text");
    // Weights copied to huge pages and decoding on two threads: the same text.
    let copied = hello(&["--huge-pages", "--decode-threads", "2"]);
    assert!(copied.status.success());
    assert_eq!(out.stdout, copied.stdout, "huge pages, two decode threads");
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
    assert!(
        s.contains("chat template: default (stop: [\"\\nuser:\"])"),
        "{s}"
    );
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
fn serve_refuses_a_bad_session_store_before_listening() {
    let m = model_dir();
    let out = performer(&[
        "serve",
        "--model",
        &m,
        "--port",
        "0",
        "--session-store",
        "http://127.0.0.1:1/0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("redis://"), "{stderr}");
    // A directory and a shared store exclude each other (a usage error).
    let out = performer(&[
        "serve",
        "--model",
        &m,
        "--session-dir",
        "/tmp/never-created",
        "--session-store",
        "redis://127.0.0.1:1/0",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_bad_flag_value_is_a_usage_error() {
    let m = model_dir();
    let gen = ["generate", "--model", &m, "--prompt", "x"];
    let logits = [
        "logits",
        "--model",
        &m,
        "--tokens",
        "1",
        "--out",
        "/tmp/never.npy",
    ];
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "abc").unwrap();
    let ppl = [
        "perplexity",
        "--model",
        &m,
        "--file",
        text.to_str().unwrap(),
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        ([&gen[..], &["--temperature=-1"]].concat(), "--temperature"),
        (
            [&gen[..], &["--temperature", "nan"]].concat(),
            "--temperature",
        ),
        (
            [&gen[..], &["--temperature", "inf"]].concat(),
            "--temperature",
        ),
        ([&gen[..], &["--top-p", "0"]].concat(), "--top-p"),
        ([&gen[..], &["--top-p", "1.5"]].concat(), "--top-p"),
        ([&gen[..], &["--top-k=-1"]].concat(), "--top-k"),
        (
            [&gen[..], &["--repeat-penalty", "0"]].concat(),
            "--repeat-penalty",
        ),
        (
            [&gen[..], &["--repeat-penalty=-1"]].concat(),
            "--repeat-penalty",
        ),
        ([&gen[..], &["--stop", ""]].concat(), "--stop"),
        (
            [&gen[..], &["--decode-threads", "0"]].concat(),
            "--decode-threads",
        ),
        (
            [&gen[..], &["--decode-threads", "20000"]].concat(),
            "--decode-threads",
        ),
        ([&gen[..], &["--max-tokens=-3"]].concat(), "--max-tokens"),
        ([&["--threads", "0"][..], &gen[..]].concat(), "--threads"),
        ([&["--threads", "1000"][..], &gen[..]].concat(), "--threads"),
        (
            [&["--threads", "20000"][..], &gen[..]].concat(),
            "--threads",
        ),
        ([&logits[..], &["--kernel-eps=-1"]].concat(), "--kernel-eps"),
        (
            [&logits[..], &["--kernel-eps", "NaN"]].concat(),
            "--kernel-eps",
        ),
        (
            [&logits[..], &["--denominator-eps", "inf"]].concat(),
            "--denominator-eps",
        ),
        (
            [&logits[..], &["--denominator-eps=-1e-6"]].concat(),
            "--denominator-eps",
        ),
        ([&ppl[..], &["--window", "1"]].concat(), "--window"),
        (vec!["bench", "--shape", "tiny", "-r", "0"], "--repetitions"),
        (
            vec!["bench", "--shape", "tiny", "--threads", "0"],
            "--threads",
        ),
    ];
    for (args, flag) in cases {
        let out = performer(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        // Clap names the flag (a value that looks like a flag, `-1`, is named as such).
        assert!(
            stderr.contains(flag) || stderr.contains("unexpected argument"),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // The thread bound is stated.
    let out = performer(&["--threads", "1000", "info"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at most 1024"), "{stderr}");
}

#[test]
fn save_state_then_load_state_continues_the_text() {
    let m = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("s.pfstate");
    let snap = snap.to_str().unwrap();
    let greedy = ["--temperature", "0"];
    let first = performer(
        &[
            &[
                "generate",
                "--model",
                &m,
                "--prompt",
                "Hi",
                "--max-tokens",
                "10",
            ][..],
            &greedy,
            &["--save-state", snap],
        ]
        .concat(),
    );
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = performer(
        &[
            &[
                "generate",
                "--model",
                &m,
                "--load-state",
                snap,
                "--max-tokens",
                "10",
            ][..],
            &greedy,
        ]
        .concat(),
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let straight = performer(
        &[
            &[
                "generate",
                "--model",
                &m,
                "--prompt",
                "Hi",
                "--max-tokens",
                "20",
            ][..],
            &greedy,
        ]
        .concat(),
    );
    // Stdout is exactly the generated text (no newline added off a terminal): the two
    // halves splice into the straight run.
    let mut joined = first.stdout.clone();
    joined.extend(&second.stdout);
    assert_eq!(joined, straight.stdout);
    // A snapshot from another model is refused with one line.
    let other = fixture("default_b").to_string_lossy().into_owned();
    let bad = performer(&["generate", "--model", &other, "--load-state", snap]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn perplexity_prints_text_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog ".repeat(20),
    )
    .unwrap();
    let t = text.to_str().unwrap();
    let out = performer(&["perplexity", "--model", &model_dir(), "--file", t, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 880);
    assert_eq!(v["scored"], 879);
    let bpb = v["bits_per_byte"].as_f64().unwrap();
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!((bpb - nll / std::f64::consts::LN_2).abs() < 1e-9);
    let plain = performer(&[
        "perplexity",
        "--model",
        &model_dir(),
        "--file",
        t,
        "--window",
        "128",
    ]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("bits per byte"));
    let missing = performer(&[
        "perplexity",
        "--model",
        &model_dir(),
        "--file",
        "/nonexistent",
    ]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn perplexity_by_position_table_json_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    // 3000 bytes: positions 1..=2999 fill 0–511 (511), 512–2k (1536) and part of 2k–8k (952).
    let body: String = "To be, or not to be, that is the question. "
        .repeat(80)
        .chars()
        .take(3000)
        .collect();
    std::fs::write(&text, &body).unwrap();
    let t = text.to_str().unwrap();
    let m = model_dir();
    let json = performer(&[
        "perplexity",
        "--model",
        &m,
        "--file",
        t,
        "--by-position",
        "--json",
    ]);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows = v["by_position"].as_array().expect("by_position array");
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        ["0–511", "512–2k", "2k–8k"],
        "empty buckets left out"
    );
    let scored: Vec<u64> = rows.iter().map(|r| r["scored"].as_u64().unwrap()).collect();
    assert_eq!(scored, [511, 1536, 952]);
    assert_eq!(rows[2]["start"], 2048);
    assert_eq!(rows[2]["end"], 8192);
    assert_eq!(rows[2]["max_position"], 2999);
    // The buckets' bits, weighted by their counts, are the whole file's (f64 sums in another
    // order: 1e-9 relative).
    let bits: f64 = rows
        .iter()
        .map(|r| r["bits_per_byte"].as_f64().unwrap() * r["scored"].as_f64().unwrap())
        .sum();
    let whole = v["bits_per_byte"].as_f64().unwrap();
    assert!(
        (bits / 2999.0 - whole).abs() < 1e-9 * whole,
        "{bits} vs {whole}"
    );
    for r in rows {
        let (nll, bpb) = (
            r["mean_nll"].as_f64().unwrap(),
            r["bits_per_byte"].as_f64().unwrap(),
        );
        assert!((bpb - nll / std::f64::consts::LN_2).abs() < 1e-12);
    }

    // Markdown table and plot, with a second curve read from the JSON above.
    let earlier = tmp.path().join("earlier.json");
    std::fs::write(&earlier, &json.stdout).unwrap();
    let svg = tmp.path().join("curve.svg");
    let table = performer(&[
        "perplexity",
        "--model",
        &m,
        "--file",
        t,
        "--by-position",
        "--window",
        "1000",
        "--plot",
        svg.to_str().unwrap(),
        "--plot-with",
        earlier.to_str().unwrap(),
    ]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let out = String::from_utf8_lossy(&table.stdout);
    assert!(
        out.contains("| positions | bytes scored | bits per byte |"),
        "{out}"
    );
    // Windows of 1000: contexts 1..=999 and 1000 for each window's first token.
    assert!(out.contains("| 0–511 | 1533 |"), "{out}");
    assert!(out.contains("| 512–2k | 1466 |"), "{out}");
    assert!(!out.contains("2k–8k"), "{out}");
    let doc = std::fs::read_to_string(&svg).unwrap();
    let xml = roxmltree::Document::parse(&doc).expect("the SVG is well-formed XML");
    assert_eq!(xml.root_element().tag_name().name(), "svg");
    let texts: Vec<&str> = xml
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    assert!(
        texts.iter().any(|t| t.contains("bits per byte")),
        "{texts:?}"
    );
    // Both curves are in the legend: this run's model and the earlier one, under the same
    // directory name, so it appears twice.
    assert_eq!(
        texts.iter().filter(|t| t.contains(m.as_str())).count(),
        2,
        "{texts:?}"
    );
    assert!(
        xml.descendants()
            .filter(|n| n.has_tag_name("circle"))
            .count()
            >= 5
    );

    // Usage errors: --plot needs --by-position; a bad --plot-with file is a one-line error.
    let usage = performer(&["perplexity", "--model", &m, "--file", t, "--plot", "x.svg"]);
    assert_eq!(usage.status.code(), Some(2));
    let bad = performer(&[
        "perplexity",
        "--model",
        &m,
        "--file",
        t,
        "--by-position",
        "--plot",
        svg.to_str().unwrap(),
        "--plot-with",
        t,
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );
}

#[test]
fn runtime_input_edge_cases_through_the_cli() {
    let m = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    // A prompt file that is not UTF-8 is bytes to a byte-level model: accepted.
    let bad_utf8 = tmp.path().join("p.bin");
    std::fs::write(&bad_utf8, [0xFFu8, 0xFE, b'a', 0xC3]).unwrap();
    let out = performer(&[
        "generate",
        "--model",
        &m,
        "--prompt-file",
        bad_utf8.to_str().unwrap(),
        "--max-tokens",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::str::from_utf8(&out.stdout).is_ok(),
        "output is always valid UTF-8"
    );
    // max_tokens 0: nothing generated, still a success.
    let out = performer(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "x",
        "--max-tokens",
        "0",
    ]);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"", "nothing generated, nothing printed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("generation: 0 tokens"));
    // top-k 0 disables top-k in the CLI (documented); a negative value is a usage error.
    let out = performer(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "x",
        "--max-tokens",
        "3",
        "--top-k",
        "0",
    ]);
    assert!(out.status.success());
    assert_eq!(
        performer(&["generate", "--model", &m, "--prompt", "x", "--top-k=-1"])
            .status
            .code(),
        Some(2)
    );

    // A broken model (NaN in the output bias) is reported on first use, one line, exit 1.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        fixture("default_a").join("config.json"),
        broken.join("config.json"),
    )
    .unwrap();
    let mut bytes = std::fs::read(fixture("default_a").join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["to_out.bias"]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(broken.join("model.safetensors"), bytes).unwrap();
    let out = performer(&[
        "generate",
        "--model",
        broken.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("non-finite logits"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1);
}

#[test]
fn info_infers_from_the_weights_alone() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("opt_relu_glu").join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let out = performer(&["info", "--model", tmp.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("no config.json"), "{s}");
    assert!(s.contains("cannot be inferred"), "{s}");
    for line in [
        "dim                    32           (inferred)",
        "heads                  2            (inferred)",
        "dim_head               16           (inferred)",
        "nb_features            24           (inferred)",
        "ff_glu                 true         (inferred)",
        "ff_mult                2            (inferred)",
        "qkv_bias               true         (inferred)",
        "attn_out_bias          true         (inferred)",
    ] {
        assert!(s.contains(line), "missing {line:?} in\n{s}");
    }
    // A config that contradicts the tensors names both values.
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"num_tokens": 256, "max_seq_len": 64, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "causal": true, "ff_glu": false}"#,
    )
    .unwrap();
    let out = performer(&["info", "--model", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("ff_glu") && e.contains("false") && e.contains("true"),
        "{e}"
    );
}

#[test]
fn bench_prints_json_and_runs_both_attentions() {
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

    let out = performer(&[
        "bench",
        "--shape",
        "tiny",
        "--attention",
        "favor,softmax",
        "--pp",
        "0",
        "--tg",
        "2",
        "-r",
        "1",
        "--bandwidth-mib",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| softmax | tg2 | 0 |"), "{table}");
    assert!(table.contains("| favor | tg2 | 0 |"), "{table}");
    let out = performer(&["bench", "--shape", "tiny", "--attention", "linear"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bench_batch_prints_one_row_per_depth_and_batch_size() {
    let out = performer(&[
        "bench",
        "--shape",
        "tiny",
        "--batch",
        "1,3",
        "--depths",
        "0,16",
        "--tg",
        "2",
        "-r",
        "1",
        "--bandwidth-mib",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.starts_with("| synthetic tiny"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    // Columns: model, threads, depth, B, aggregate, per sequence, step ms, × B=1, states,
    // kernels.
    let points: Vec<(&str, &str)> = rows.iter().map(|r| (r[3], r[4])).collect();
    assert_eq!(
        points,
        [("0", "1"), ("0", "3"), ("16", "1"), ("16", "3")],
        "{table}"
    );
    for r in &rows {
        let aggregate: f64 = r[5].split(' ').next().unwrap().parse().unwrap();
        assert!(aggregate.is_finite() && aggregate > 0.0, "{table}");
    }
    // B = 1 is its own reference; the states' memory comes with its unit.
    assert_eq!(rows[0][8], "1.00", "{table}");
    assert!(
        rows[1][9].ends_with("MiB") || rows[1][9].ends_with("KiB"),
        "{table}"
    );
    // The kernel level the process ran (a float model: no quantized method).
    let level = performer::kernels::isa::active().isa().name();
    assert!(rows.iter().all(|r| r[10] == level), "{table}");
}

#[test]
fn a_bench_with_nothing_to_measure_is_refused_before_any_model_is_written() {
    // A zero batch size, and every pp/tg size 0: one-line errors (exit code 1) naming the
    // option, with no table printed and no synthetic model written to --synthetic-dir.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("synthetic");
    let d = dir.to_str().unwrap();
    for (args, option) in [
        (&["--batch", "0,4"][..], "batch"),
        (&["--batch", "2", "--tg", "0"][..], "at least one step"),
        (&["--pp", "0", "--tg", "0"][..], "nothing to measure"),
    ] {
        let mut all = vec!["bench", "--shape", "tiny", "--synthetic-dir", d];
        all.extend_from_slice(args);
        let out = performer(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(option), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!dir.join("model.safetensors").exists(), "{args:?}");
    }
}

/// Runs `performer` and fails (killing it) if it has not ended within `secs`: a regression
/// to an unbounded read must fail the test, not hang it.
fn performer_within(args: &[&str], secs: u64) -> std::process::Output {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_performer"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run performer");
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= secs {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("{args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_quietly_with_success() {
    use std::process::Stdio;
    let m = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the quick brown fox ".repeat(10)).unwrap();
    let t = text.to_str().unwrap();
    for args in [
        vec!["info", "--model", &m],
        vec!["perplexity", "--model", &m, "--file", t],
        vec!["perplexity", "--model", &m, "--file", t, "--json"],
        // Enough text to outlast the pipe's buffer whatever the timing.
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--max-tokens",
            "100000",
        ],
        vec![
            "bench",
            "--shape",
            "tiny",
            "--pp",
            "0",
            "--tg",
            "1",
            "-r",
            "1",
            "--bandwidth-mib",
            "0",
        ],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_performer"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the program (still loading its model) writes.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("error"),
            "{args:?}: {stderr}"
        );
    }
}

/// The names in `dir`, sorted.
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs `performer args` under `ulimit -f blocks` (512-byte blocks in POSIX sh).
fn performer_with_file_limit(blocks: usize, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -f {blocks}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_performer"))
        .args(args)
        .output()
        .expect("run sh")
}

#[test]
fn a_failed_save_leaves_the_old_state_intact() {
    let m = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim.pfstate");
    let v = victim.to_str().unwrap();
    let save = |prompt: &str| {
        [
            "generate",
            "--model",
            &m,
            "--prompt",
            prompt,
            "--max-tokens",
            "4",
            "--save-state",
            v,
        ]
        .map(String::from)
    };
    let out = performer(&save("Hello").each_ref().map(String::as_str));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let good = std::fs::read(&victim).unwrap();
    assert!(good.len() > 4 * 1024, "the limit below must cut the write");
    // A limit of 4 KiB (8 blocks): the new snapshot cannot be written whole.
    let args = save("Other");
    let out = performer_with_file_limit(8, &args.each_ref().map(String::as_str));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("victim.pfstate"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("File too large"), "{stderr}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        good,
        "old state byte-identical"
    );
    assert_eq!(names(tmp.path()), ["victim.pfstate"], "no temporary left");
    // It still loads.
    let out = performer(&[
        "generate",
        "--model",
        &m,
        "--load-state",
        v,
        "--max-tokens",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same for `logits --out`.
    let npy = tmp.path().join("l.npy");
    let n = npy.to_str().unwrap();
    let logits =
        |tokens: &str| ["logits", "--model", &m, "--tokens", tokens, "--out", n].map(String::from);
    assert!(performer(&logits("1").each_ref().map(String::as_str))
        .status
        .success());
    let good = std::fs::read(&npy).unwrap();
    let many = vec!["7"; 64].join(",");
    let args = logits(&many);
    let out = performer_with_file_limit(8, &args.each_ref().map(String::as_str));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&npy).unwrap(), good);
    assert_eq!(names(tmp.path()), ["l.npy", "victim.pfstate"]);
}

#[test]
fn an_unwritable_save_path_is_refused_before_generating() {
    let m = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nodir").join("x.pfstate");
    // A generation this long would take minutes: the refusal must come first.
    let out = performer_within(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--max-tokens",
            "100000000",
            "--save-state",
            missing.to_str().unwrap(),
        ],
        60,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nodir"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing generated");
    let out = performer(&[
        "logits",
        "--model",
        &m,
        "--tokens",
        "1",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a directory"));
}

#[test]
fn endless_inputs_are_refused_not_read() {
    let m = model_dir();
    let out = performer_within(
        &["generate", "--model", &m, "--load-state", "/dev/zero"],
        60,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("invalid state snapshot"), "{stderr}");
    let out = performer_within(
        &["generate", "--model", &m, "--prompt-file", "/dev/zero"],
        60,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/dev/zero") && stderr.contains("not a regular file"),
        "{stderr}"
    );
    // A directory as prompt file or text file is named as one.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    for args in [
        vec!["generate", "--model", &m, "--prompt-file", d],
        vec!["perplexity", "--model", &m, "--file", d],
        vec!["generate", "--model", &m, "--load-state", d],
    ] {
        let out = performer_within(&args, 60);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(d) && stderr.contains("is a directory"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_stop_string_is_not_in_the_saved_state() {
    let m = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("s.pfstate");
    let snap = snap.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let base = ["generate", "--model", &m, "--temperature", "0"];
        performer(&[&base[..], extra].concat())
    };
    let straight = gen(&["--prompt", "Hi", "--max-tokens", "40"]);
    assert!(straight.status.success());
    let text = String::from_utf8(straight.stdout.clone()).unwrap();
    // The first two ASCII letters or digits in a row after the start: a stop string whose
    // first occurrence is there.
    let b = text.as_bytes();
    let at = (1..b.len() - 1)
        .find(|&i| b[i].is_ascii_alphanumeric() && b[i + 1].is_ascii_alphanumeric())
        .expect("two ASCII alphanumerics in a row in the greedy text");
    let stop = &text[at..at + 2];
    let first = gen(&[
        "--prompt",
        "Hi",
        "--max-tokens",
        "40",
        "--stop",
        stop,
        "--save-state",
        snap,
    ]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(first.stdout, &b[..at], "text up to the stop string");
    let second = gen(&["--load-state", snap, "--max-tokens", "10"]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // The continuation starts with the stop string itself: the state ended before it.
    let mut joined = first.stdout.clone();
    joined.extend(&second.stdout);
    assert!(
        straight.stdout.starts_with(&joined),
        "{:?} + {:?} vs {:?}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&second.stdout),
        text
    );
    assert!(second.stdout.starts_with(stop.as_bytes()));
}

#[test]
fn errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixture("default_a").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fixture("default_a").join("config.json")).unwrap();
    let d = dir.to_str().unwrap();
    let config_path = dir.join("config.json");
    let cp = config_path.to_str().unwrap();
    let run_all = |expect: &str| {
        for args in [
            vec!["info", "--model", d],
            vec![
                "generate",
                "--model",
                d,
                "--prompt",
                "x",
                "--max-tokens",
                "1",
            ],
            vec![
                "logits",
                "--model",
                d,
                "--tokens",
                "1",
                "--out",
                "/tmp/never.npy",
            ],
            vec!["perplexity", "--model", d, "--file", cp],
            vec!["bench", "--model", d, "--pp", "0", "--tg", "1", "-r", "1"],
        ] {
            let out = performer(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                out.stdout.is_empty(),
                "{args:?}: nothing on stdout before failing"
            );
            assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
            assert!(
                stderr.contains(expect),
                "{args:?}: {expect:?} not in {stderr}"
            );
        }
    };
    // Not JSON, a duplicate key, an unknown key: the path of config.json, and the key.
    std::fs::write(&config_path, "{ not json").unwrap();
    run_all(cp);
    let dup = config.replacen('{', "{\"dim\": 32, ", 1);
    std::fs::write(&config_path, &dup).unwrap();
    run_all("duplicate key `dim`");
    run_all(cp);
    std::fs::write(&config_path, config.replacen('{', "{\"dimm\": 3, ", 1)).unwrap();
    run_all(cp);
    // A UTF-8 byte order mark is accepted.
    std::fs::write(&config_path, format!("\u{feff}{config}")).unwrap();
    let out = performer(&["info", "--model", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The model path is a file; model.safetensors is a directory: the same message everywhere.
    let file = config_path.to_str().unwrap();
    for args in [
        vec!["info", "--model", file],
        vec!["generate", "--model", file, "--prompt", "x"],
        vec![
            "logits",
            "--model",
            file,
            "--tokens",
            "1",
            "--out",
            "/tmp/never.npy",
        ],
        vec!["perplexity", "--model", file, "--file", file],
        vec!["bench", "--model", file],
    ] {
        let out = performer(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr.contains(file) && stderr.contains("not a directory"),
            "{args:?}: {stderr}"
        );
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    run_all("model.safetensors: is a directory");
}

#[test]
fn long_prompts_show_progress_on_a_terminal_only() {
    let m = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tmp.path().join("p.txt");
    // 6000 bytes: several prefill row blocks, so the bar is drawn after the first.
    std::fs::write(&prompt, "a long prompt ".repeat(430)).unwrap();
    let p = prompt.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt-file",
        p,
        "--max-tokens",
        "2",
    ];
    // Off a terminal: stderr holds the statistics line only.
    let out = performer(&args);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("prompt: 6020 tokens"), "{stderr}");
    // On a terminal (util-linux `script` gives the command a pseudo-terminal): a bar.
    let command = std::iter::once(env!("CARGO_BIN_EXE_performer"))
        .chain(args)
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("util-linux `script` runs the command on a pseudo-terminal");
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("prompt ") && shown.contains("/6020 tokens"),
        "{shown}"
    );
}

#[test]
fn generate_with_a_constraint_and_bad_constraints_exit_2() {
    let shipped = common::workspace_root().join("models/performer-byte");
    let shipped = shipped.to_string_lossy();
    let schema = fixture("schemas").join("person.json");
    let schema = schema.to_string_lossy();
    let base = [
        "generate",
        "--model",
        &*shipped,
        "--prompt",
        "Data: ",
        "--max-tokens",
        "400",
    ];
    let out = performer(
        &[
            &base[..],
            &["--temperature", "1", "--json-schema", &*schema],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(v["name"].is_string() && v["age"].is_u64(), "{v}");
    assert!(
        ["red", "green", "blue"].contains(&v["color"].as_str().unwrap()),
        "{v}"
    );
    let out = performer(&[&base[..], &["--regex", "[0-9]{3}"]].concat());
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 3);
    assert!(out.stdout.iter().all(u8::is_ascii_digit));

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let unsupported = write(
        "u.json",
        r#"{"type": "object", "unevaluatedProperties": false}"#,
    );
    let not_json = write("n.json", "{type: object");
    let bad_type = write("t.json", r#"{"type": 5}"#);
    let bad_lark = write("g.lark", "start: (");
    let cases: [(&[&str], &str); 6] = [
        (&["--json-schema", &unsupported], "unevaluatedProperties"),
        (&["--json-schema", &not_json], "not JSON"),
        (&["--json-schema", &bad_type], "invalid JSON schema"),
        (&["--grammar", &bad_lark], "invalid Lark grammar"),
        (&["--regex", "[a-"], "invalid regex"),
        (&["--json", "--regex", "a"], "cannot be used with"),
    ];
    for (args, named) in cases {
        let out = performer(&[&base[..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "nothing generated: {args:?}");
    }
    // bench --json-schema with a schema that is not JSON: refused before any model work.
    let out = performer(&["bench", "--model", &*shipped, "--json-schema", &not_json]);
    assert_eq!(out.status.code(), Some(2));
}
