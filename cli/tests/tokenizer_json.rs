//! `performer generate`, `perplexity` and `info` on a model with a Hugging Face
//! `tokenizer.json` (the Shakespeare BPE fixture beside a random model of its vocabulary).

#[path = "../../tests/common/bpe_model.rs"]
mod bpe_model;

use std::process::Command;

use performer::perplexity::{evaluate, PerplexityOptions};
use performer::{GenerateOptions, Generation, Model, SamplingParams, State};

fn performer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_performer"))
        .args(args)
        .output()
        .expect("run performer")
}

#[test]
fn generate_perplexity_and_info_use_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    bpe_model::write_bpe_model(dir.path());
    let m = dir.path().to_str().unwrap();

    let info = performer(&["info", "--model", m]);
    assert!(info.status.success());
    let stdout = String::from_utf8_lossy(&info.stdout);
    let line = stdout.lines().find(|l| l.contains(" tokenizer ")).unwrap();
    assert!(
        line.contains("tokenizer.json") && line.contains("(config)"),
        "{line}"
    );

    // Greedy text from the binary equals the library's, prompt encoded by the BPE.
    let prompt = "ROMEO:\nBut soft, what light";
    let out = performer(&[
        "generate",
        "--model",
        m,
        "--prompt",
        prompt,
        "--max-tokens",
        "40",
        "--temperature",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = Model::load(dir.path()).unwrap();
    let ids = model.tokenizer().encode(prompt).unwrap();
    let mut state = State::new(&model);
    let options = GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let text: String = Generation::new(&model, &mut state, &ids, options)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), text);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("prompt: {} tokens", ids.len())),
        "{stderr}"
    );
    assert!(
        ids.len() < prompt.len(),
        "BPE merges: fewer tokens than bytes"
    );

    // Perplexity: tokens by the tokenizer, bits per byte over the text's bytes.
    let text = "KING HENRY:\nOnce more unto the breach, dear friends, once more;\nCafé 🎭\n";
    let file = dir.path().join("text.txt");
    std::fs::write(&file, text).unwrap();
    let out = performer(&[
        "perplexity",
        "--model",
        m,
        "--file",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = evaluate(
        &model,
        text.as_bytes(),
        PerplexityOptions::default(),
        |_| {},
    )
    .unwrap();
    let tokenized = model.tokenizer().tokenize(text).unwrap();
    assert_eq!(json["tokens"], tokenized.ids.len());
    assert_eq!(json["scored"], tokenized.ids.len() - 1);
    assert_eq!(json["bytes"], text.len() - tokenized.ends[0]);
    assert_eq!(
        json["bits_per_byte"].as_f64().unwrap(),
        expected.bits_per_byte
    );

    // Text that is not UTF-8 cannot be tokenized: a one-line error, exit code 1.
    std::fs::write(&file, b"abc \xff\xfe").unwrap();
    for args in [
        vec!["perplexity", "--model", m, "--file", file.to_str().unwrap()],
        vec![
            "generate",
            "--model",
            m,
            "--prompt-file",
            file.to_str().unwrap(),
        ],
    ] {
        let out = performer(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("error: ") && stderr.contains("UTF-8"),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
