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
