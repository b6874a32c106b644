//! `performer info` names the kernels' instruction-set level; `PERFORMER_ISA` lowers it, and
//! an invalid value is a one-line error.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::Command;

use performer::kernels::Isa;

fn info(isa_env: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_performer"));
    cmd.args(["info", "--model"])
        .arg(common::fixture("default_a"))
        .env_remove("PERFORMER_ISA");
    if let Some(v) = isa_env {
        cmd.env("PERFORMER_ISA", v);
    }
    cmd.output().expect("run performer")
}

#[test]
fn info_prints_the_kernel_level() {
    let best = Isa::detected();
    let out = info(None);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains(&format!("kernels: {best} (best this CPU runs: {best};")),
        "{s}"
    );
    // Every level up to the best can be forced; asking for more than the CPU has gives the best.
    for isa in Isa::ALL {
        let out = info(Some(isa.name()));
        assert!(out.status.success());
        let s = String::from_utf8_lossy(&out.stdout);
        let expect = isa.min(best);
        assert!(s.contains(&format!("kernels: {expect} ")), "{isa}: {s}");
    }
    let out = info(Some("sse9"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("PERFORMER_ISA"), "{err}");
}

#[test]
fn quant_kernel_is_a_per_command_choice_that_follows_the_level() {
    use performer::kernels::quant::{QuantKernels, QuantMethod};
    use performer::kernels::Kernels;
    let tmp = tempfile::tempdir().unwrap();
    let q8 = tmp.path().join("q8_0");
    performer::quant::quantize_dir(
        &common::fixture("default_a"),
        &q8,
        performer::quant::QuantFormat::Q8_0,
        |_, _| {},
    )
    .unwrap();
    let run = |args: &[&str], isa: &str| {
        Command::new(env!("CARGO_BIN_EXE_performer"))
            .args(args)
            .env("PERFORMER_ISA", isa)
            .output()
            .expect("run performer")
    };
    let m = q8.to_string_lossy().into_owned();
    let best = Isa::detected();
    for isa in Isa::ALL {
        let level = Kernels::new(isa.min(best)).unwrap();
        for method in QuantMethod::ALL {
            let out = run(
                &["info", "--model", &m, "--quant-kernel", method.name()],
                isa.name(),
            );
            assert!(out.status.success(), "{out:?}");
            let s = String::from_utf8_lossy(&out.stdout);
            // The level PERFORMER_ISA forces is the quantized kernels' level too (int8 on
            // this level: VNNI where the CPU has the level's extension, else `vpmaddubsw`, or
            // scalar at the portable level).
            let want = QuantKernels::new(level, method).describe();
            assert!(
                s.contains(&format!("quantized kernel: {want} ")),
                "{isa} {method}: {s}"
            );
            // Rows packed at load where that level's method takes them, unless refused.
            let packs =
                QuantKernels::new(level, method).takes_packed(performer::quant::QuantFormat::Q8_0);
            assert_eq!(
                s.contains("packed rows: yes, "),
                packs,
                "{isa} {method}: {s}"
            );
            let out = run(
                &[
                    "info",
                    "--model",
                    &m,
                    "--quant-kernel",
                    method.name(),
                    "--no-packed-rows",
                ],
                isa.name(),
            );
            assert!(out.status.success(), "{out:?}");
            let s = String::from_utf8_lossy(&out.stdout);
            assert!(
                s.contains("packed rows: no (--no-packed-rows)"),
                "{isa} {method}: {s}"
            );
        }
        // The flag reaches the products of a command that computes: both methods decode.
        let out = run(
            &[
                "generate",
                "--model",
                &m,
                "--prompt",
                "Hi",
                "--max-tokens",
                "4",
                "--seed",
                "1",
                "--quant-kernel",
                "int8",
            ],
            isa.name(),
        );
        assert!(out.status.success(), "{isa}: {out:?}");
    }
    // A float model ignores the choice; an unknown value is a usage error naming the flag.
    let out = run(
        &["info", "--model", &model_dir(), "--quant-kernel", "int8"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("quantized kernel"));
    let out = run(&["info", "--model", &m, "--quant-kernel", "fast"], "");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--quant-kernel") && err.contains("dequant or int8"),
        "{err}"
    );
}

fn model_dir() -> String {
    common::fixture("default_a").to_string_lossy().into_owned()
}
