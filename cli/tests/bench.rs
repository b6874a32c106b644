//! The benchmark runner: parsing, statistics, formatting, the bandwidth probe and a whole
//! (tiny) run with its SVG.

use performer::synthetic::{self, SyntheticShape, WeightDtype};
use performer::weights::PageReport;
use performer::{Model, State};
use performer_cli::bench::{
    self, Attention, BenchOptions, Fill, ModelInfo, Report, Row, Stats, TestKind,
};

#[test]
fn counts_parse_with_suffixes() {
    assert_eq!(bench::parse_count("0"), Ok(0));
    assert_eq!(bench::parse_count("512"), Ok(512));
    assert_eq!(bench::parse_count("1k"), Ok(1024));
    assert_eq!(bench::parse_count(" 4K "), Ok(4096));
    assert_eq!(bench::parse_count("1M"), Ok(1 << 20));
    assert_eq!(bench::parse_count("2m"), Ok(2 << 20));
    for bad in ["", "k", "1.5k", "-3", "abc", "4kk", "99999999999999999999G"] {
        assert!(bench::parse_count(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        bench::parse_counts("0,1k,4k,16k,64k,256k,1M"),
        Ok(vec![0, 1024, 4096, 16384, 65536, 262144, 1 << 20])
    );
    assert!(bench::parse_counts("1k,x").is_err());
    for n in [
        0,
        1,
        100,
        1000,
        1024,
        4096,
        1536,
        1 << 20,
        3 << 20,
        (1 << 20) + 1024,
    ] {
        let s = bench::format_count(n);
        assert_eq!(bench::parse_count(&s), Ok(n), "{s}");
    }
    assert_eq!(bench::format_count(16384), "16k");
    assert_eq!(bench::format_count(1 << 20), "1M");
    assert_eq!(bench::format_bytes(512), "512 B");
    assert_eq!(bench::format_bytes(1536), "1.5 KiB");
    assert_eq!(bench::format_bytes(3 << 30), "3.00 GiB");
    assert_eq!("favor".parse::<Attention>(), Ok(Attention::Favor));
    assert_eq!("Softmax".parse::<Attention>(), Ok(Attention::Softmax));
    assert!("linear".parse::<Attention>().is_err());
}

#[test]
fn statistics() {
    let s = Stats::of(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(s.n, 4);
    assert!((s.mean - 2.5).abs() < 1e-12);
    assert!((s.sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    let one = Stats::of(&[7.0]);
    assert_eq!((one.mean, one.sd, one.n), (7.0, 0.0, 1));
    assert_eq!(Stats::of(&[]).n, 0);
    assert_eq!(bench::median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(bench::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
}

fn sample_report() -> Report {
    let row = |test, tokens, depth, mean, roofline: Option<f64>| Row {
        attention: Attention::Favor,
        test,
        tokens,
        depth,
        threads: 2,
        tokens_per_s: Stats {
            mean,
            sd: 1.5,
            n: 3,
        },
        samples: vec![mean - 1.5, mean, mean + 1.5],
        peak_rss_bytes: Some(30 << 20),
        state_bytes: 540 << 10,
        roofline,
        state_traffic_bytes: if test == TestKind::Tg { 1 << 20 } else { 0 },
        roofline_with_state: roofline.map(|f| f * 7.0 / 6.0),
    };
    Report {
        model: ModelInfo {
            name: "synthetic tiny".into(),
            dtype: "bf16".into(),
            parameters: 3_300_000,
            weight_bytes_per_token: 6 << 20,
            file_bytes: 7 << 20,
            kernels: "avx2".into(),
            quant_kernel: Some("int8 (maddubs)".into()),
            packed_rows: false,
            gemm: "avx2".into(),
        },
        read_bandwidth: Some(30e9),
        bandwidth_probe_bytes: 1 << 30,
        bandwidth_probe_threads: 2,
        repetitions: 3,
        peak_rss_reset: true,
        rows: vec![
            row(TestKind::Pp, 512, 0, 2500.0, None),
            row(TestKind::Tg, 128, 0, 2000.0, Some(0.42)),
            row(TestKind::Tg, 128, 4096, 1990.0, Some(0.41)),
        ],
        fills: vec![Fill {
            attention: Attention::Favor,
            depth: 4096,
            tokens: 4096,
            seconds: 2.0,
            threads: 2,
        }],
        weight_pages: Some(PageReport {
            resident_bytes: 6 << 20,
            huge_page_bytes: 3 << 20,
        }),
        skipped: vec![],
    }
}

#[test]
fn interleaved_depths_alternate_their_order() {
    let order = |rep, n| bench::depth_visit_order(rep, n).collect::<Vec<_>>();
    assert_eq!(order(0, 3), [0, 1, 2]);
    assert_eq!(order(1, 3), [2, 1, 0]);
    assert_eq!(order(2, 3), [0, 1, 2]);
    assert_eq!(order(5, 1), [0]);
    assert!(order(0, 0).is_empty());
    // Over an even number of repetitions every depth is visited first and last equally often.
    for n in 2..6 {
        let firsts: Vec<usize> = (0..4).map(|r| order(r, n)[0]).collect();
        assert_eq!(firsts.iter().filter(|&&i| i == 0).count(), 2);
        assert_eq!(firsts.iter().filter(|&&i| i == n - 1).count(), 2);
        for r in 0..4 {
            let mut seen = order(r, n);
            seen.sort_unstable();
            assert_eq!(
                seen,
                (0..n).collect::<Vec<_>>(),
                "each depth once per repetition"
            );
        }
    }
}

#[test]
fn markdown_table() {
    let md = bench::markdown(&sample_report());
    assert!(md.contains("read bandwidth: 30.0 GB/s"), "{md}");
    assert!(
        md.contains("weights in memory: 6.0 MiB, 50% of it on 2 MiB pages"),
        "{md}"
    );
    assert!(md.contains(
        "| model | dtype | attention | test | depth | threads | t/s | peak RSS | state/seq | roofline | +state | kernels |"
    ));
    assert!(
        md.contains("| synthetic tiny | bf16 | favor | pp512 | 0 | 2 | 2500.00 ± 1.50 | 30.0 MiB | 540.0 KiB | - | - | avx2, q: int8 (maddubs) |"),
        "{md}"
    );
    assert!(
        md.contains("| favor | tg128 | 4k | 2 | 1990.00 ± 1.50 |"),
        "{md}"
    );
    assert!(md.contains("| 41% | 48% |"), "{md}");
    assert!(
        md.contains("favor to depth 4k: 4096 tokens in 2.00 s (2048.0 tokens/s"),
        "{md}"
    );
    // Header, separator and one line per row, all with the same number of cells.
    let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(table.len(), 2 + 3);
    assert!(table.iter().all(|l| l.matches('|').count() == 13));
}

#[test]
fn the_kernels_cell_names_gemms_level_where_it_differs() {
    // PERFORMER_ISA=avx2 on an AVX-512 CPU: the gemm crate keeps its own AVX-512 products.
    let mut model = sample_report().model;
    assert_eq!(model.kernels_label(), "avx2, q: int8 (maddubs)");
    model.gemm = "avx512".into();
    assert_eq!(
        model.kernels_label(),
        "avx2, q: int8 (maddubs), gemm: avx512"
    );
    model.packed_rows = true;
    assert_eq!(
        model.kernels_label(),
        "avx2, q: int8 (maddubs) packed, gemm: avx512"
    );
    model.quant_kernel = None;
    model.packed_rows = false;
    assert_eq!(model.kernels_label(), "avx2, gemm: avx512");
}

#[test]
fn json_report() {
    let v: serde_json::Value = serde_json::from_str(&bench::json(&sample_report())).unwrap();
    assert_eq!(v["model"]["name"], "synthetic tiny");
    assert_eq!(v["model"]["kernels"], "avx2");
    assert_eq!(v["model"]["quant_kernel"], "int8 (maddubs)");
    assert_eq!(v["model"]["packed_rows"], false);
    assert_eq!(v["model"]["gemm"], "avx2");
    assert_eq!(v["rows"].as_array().unwrap().len(), 3);
    assert_eq!(v["rows"][1]["test"], "tg");
    assert_eq!(v["rows"][1]["attention"], "favor");
    assert_eq!(v["rows"][2]["depth"], 4096);
    assert_eq!(v["rows"][0]["tokens_per_s"]["mean"], 2500.0);
    assert_eq!(v["rows"][0]["roofline"], serde_json::Value::Null);
    assert_eq!(v["rows"][1]["state_traffic_bytes"], 1 << 20);
    assert!(v["rows"][1]["roofline_with_state"].as_f64().unwrap() > 0.42);
    assert_eq!(v["fills"][0]["seconds"], 2.0);
    assert_eq!(v["weight_pages"]["huge_page_bytes"], 3 << 20);
}

#[test]
fn bandwidth_probe_and_rss() {
    let bw = bench::measure_read_bandwidth(4 << 20, 3, 2);
    assert!(bw.is_finite() && bw > 1e8, "{bw}");
    if cfg!(target_os = "linux") {
        assert!(bench::peak_rss_bytes().unwrap() > 1 << 20);
    }
}

/// A one-layer, two-head model of width 32 (heads 16 wide, 16 features), written to `dir`.
fn micro_model(dir: &std::path::Path) -> Model {
    let shape = SyntheticShape {
        name: "micro".into(),
        dim: 32,
        depth: 1,
        heads: 2,
        dim_head: 16,
        ff_mult: 2,
        nb_features: 16,
        vocab: 256,
        max_seq_len: 16,
    };
    synthetic::write(dir, &shape, WeightDtype::F32, 1).unwrap();
    Model::load(dir).unwrap()
}

#[test]
fn favor_and_softmax_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let model = micro_model(dir.path());
    let opts = BenchOptions {
        attentions: vec![Attention::Favor, Attention::Softmax],
        pp: vec![4],
        tg: vec![3],
        depths: vec![0, 40],
        threads: vec![1],
        repetitions: 2,
        bandwidth_bytes: 0,
        progress: false,
        ..BenchOptions::default()
    };
    let report = bench::run(&model, "micro", &opts).unwrap();
    assert_eq!(report.rows.len(), 2 * 3);
    assert!(report.skipped.is_empty());
    assert!(report.read_bandwidth.is_none());
    let tg = |a: Attention, depth: usize| {
        report
            .rows
            .iter()
            .find(|r| r.attention == a && r.test == TestKind::Tg && r.depth == depth)
            .unwrap()
    };
    // FAVOR+'s state is constant (up to scratch capacity); the softmax cache grows by
    // 2 (k, v) · heads · dim_head · 4 bytes per token and layer.
    let (f0, f40) = (
        tg(Attention::Favor, 0).state_bytes,
        tg(Attention::Favor, 40).state_bytes,
    );
    assert!(f40 <= f0 + f0 / 16, "{f0} -> {f40}");
    let (s0, s40) = (
        tg(Attention::Softmax, 0).state_bytes,
        tg(Attention::Softmax, 40).state_bytes,
    );
    assert!(s40 >= s0 + 40 * 2 * 2 * 16 * 4, "{s0} -> {s40}");
    assert!(tg(Attention::Softmax, 40).roofline.is_none());
    assert!(tg(Attention::Softmax, 40).roofline_with_state.is_none());
    // A FAVOR+ token reads and rewrites the whole state at every depth. A softmax token reads
    // its cache, its own entry included: at depth 40, after 2 warm-up tokens, the first
    // repetition's tokens read 43 to 45 entries (mean 44), the second's 46 to 48 (mean 47).
    let favor_traffic = 2 * State::new(&model).attention_bytes();
    assert_eq!(tg(Attention::Favor, 0).state_traffic_bytes, favor_traffic);
    assert_eq!(tg(Attention::Favor, 40).state_traffic_bytes, favor_traffic);
    let per_token = performer::baseline::SoftmaxSession::new(&model).cache_bytes_per_token();
    assert_eq!(
        tg(Attention::Softmax, 40).state_traffic_bytes,
        (45.5 * per_token as f64).round() as usize
    );
    // FAVOR+ interleaves its depths repetition by repetition; the rows still come per
    // attention as pp, then tg by ascending depth, each with every repetition.
    let order: Vec<_> = report
        .rows
        .iter()
        .map(|r| (r.attention, r.test, r.depth, r.samples.len()))
        .collect();
    assert_eq!(
        order,
        [
            (Attention::Favor, TestKind::Pp, 0, 2),
            (Attention::Favor, TestKind::Tg, 0, 2),
            (Attention::Favor, TestKind::Tg, 40, 2),
            (Attention::Softmax, TestKind::Pp, 0, 2),
            (Attention::Softmax, TestKind::Tg, 0, 2),
            (Attention::Softmax, TestKind::Tg, 40, 2),
        ]
    );
    // The softmax session cannot fork: its first depth's repetitions (2 warm-up + 2 × 3
    // tokens) count towards the next fill.
    let fill = |a: Attention| {
        report
            .fills
            .iter()
            .find(|f| f.attention == a)
            .unwrap()
            .tokens
    };
    assert_eq!(fill(Attention::Favor), 40);
    assert_eq!(fill(Attention::Softmax), 40 - 8);

    let mut s = bench::new_session(&model, Attention::Favor).unwrap();
    s.prefill(&[1, 2, 3]).unwrap();
    s.step(4).unwrap();
    let fork = s.fork().unwrap();
    // A copy holds the same state; its scratch may have less spare capacity.
    assert!(fork.state_bytes() <= s.state_bytes());
    assert!(fork.state_bytes() + fork.state_bytes() / 16 >= s.state_bytes());
    let soft = bench::new_session(&model, Attention::Softmax).unwrap();
    assert!(soft.fork().is_none());
}

#[test]
fn depths_whose_cache_would_not_fit_are_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = micro_model(dir.path());
    let per_token = performer::baseline::SoftmaxSession::new(&model).cache_bytes_per_token();
    // 1 layer × 2 heads × 16 wide, keys and values in f32.
    assert_eq!(per_token, 2 * 4 * 2 * 16);
    let opts = BenchOptions {
        attentions: vec![Attention::Favor, Attention::Softmax],
        pp: vec![0],
        tg: vec![3],
        depths: vec![0, 40, 5000, 1 << 40],
        threads: vec![1],
        repetitions: 2,
        bandwidth_bytes: 0,
        progress: false,
        // Room for depth 40 and its repetitions, not for 5000.
        memory_budget: Some(per_token as u64 * 1000),
        ..BenchOptions::default()
    };
    // FAVOR+ would have to fill 2^40 tokens: only the softmax kind runs here.
    let opts = BenchOptions {
        attentions: vec![Attention::Softmax],
        ..opts
    };
    let report = bench::run(&model, "micro", &opts).unwrap();
    let depths: Vec<usize> = report.rows.iter().map(|r| r.depth).collect();
    assert_eq!(depths, [0, 40]);
    let skipped: Vec<(usize, u64)> = report
        .skipped
        .iter()
        .map(|k| (k.depth, k.needed_bytes))
        .collect();
    // From the position after depth 40's tests (40 + 2 warm-up + 2 × 3 tokens = 48) to the
    // depth, plus that depth's own 8 tokens.
    let at = 48u64;
    assert_eq!(
        skipped,
        [
            (5000, (5000 - at + 8) * per_token as u64),
            (1 << 40, ((1u64 << 40) - at + 8) * per_token as u64)
        ]
    );
    assert!(report
        .skipped
        .iter()
        .all(|k| k.attention == Attention::Softmax && k.budget_bytes == per_token as u64 * 1000));
    let md = bench::markdown(&report);
    assert!(
        md.contains("skipped: softmax at depth 5000: its state would grow by"),
        "{md}"
    );

    // Without a budget the kernel's available memory is the limit: no machine holds a
    // 2^40-token cache, and asking must not try to build one.
    #[cfg(target_os = "linux")]
    {
        assert!(bench::available_memory_bytes().is_some_and(|b| b > 0));
        let opts = BenchOptions {
            depths: vec![0, 1 << 40],
            memory_budget: None,
            ..opts
        };
        let report = bench::run(&model, "micro", &opts).unwrap();
        assert_eq!(report.rows.len(), 1);
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].depth, 1 << 40);
    }
}

#[test]
fn tiny_run_with_plot() {
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(dir.path(), &shape, WeightDtype::Bf16, 1).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let opts = BenchOptions {
        attentions: vec![Attention::Favor],
        pp: vec![8],
        tg: vec![4],
        depths: vec![16, 0],
        threads: vec![1, 2],
        repetitions: 2,
        seed: 3,
        bandwidth_bytes: 4 << 20,
        bandwidth_passes: 2,
        progress: false,
        memory_budget: None,
    };
    let report = bench::run(&model, "synthetic tiny", &opts).unwrap();
    // pp8 per thread count, then tg4 at depths 0 and 16 per thread count.
    assert_eq!(report.rows.len(), 2 + 2 * 2);
    let tg: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.test == TestKind::Tg)
        .collect();
    assert_eq!(
        tg.iter().map(|r| (r.depth, r.threads)).collect::<Vec<_>>(),
        [(0, 1), (0, 2), (16, 1), (16, 2)]
    );
    for r in &report.rows {
        assert_eq!(r.samples.len(), 2);
        assert!(r.tokens_per_s.mean > 0.0);
        assert!(r.state_bytes > 0);
        assert_eq!(r.roofline.is_some(), r.test == TestKind::Tg);
        assert_eq!(r.roofline_with_state.is_some(), r.test == TestKind::Tg);
        if let (Some(w), Some(ws)) = (r.roofline, r.roofline_with_state) {
            // The state's traffic adds to the weights' bytes in the same proportion (both in
            // f64, the same operations in another order: rounding far below 1e-9).
            let bytes = report.model.weight_bytes_per_token as f64;
            let want = w * (bytes + r.state_traffic_bytes as f64) / bytes;
            assert!(
                ws > w && (ws - want).abs() <= 1e-9 * want,
                "{w} {ws} {want}"
            );
        }
    }
    // The FAVOR+ state does not grow with the depth (up to scratch capacity).
    assert!(tg[3].state_bytes <= tg[0].state_bytes + tg[0].state_bytes / 16);
    assert_eq!(report.fills.len(), 1);
    assert_eq!((report.fills[0].depth, report.fills[0].tokens), (16, 16));
    assert_eq!(report.model.dtype, "bf16");

    let svg = dir.path().join("plot.svg");
    bench::plot_svg(&report, &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.len() > 1000 && text.starts_with("<svg"),
        "{}",
        text.len()
    );
    assert!(text.contains("tokens/s") && text.contains("favor tg4 2t"));
}

/// `bench --json-schema` on the shipped model, alone and in the engine beside other streams:
/// both sides decode, the constrained side completes documents, and in the engine the
/// measured streams step in the same ticks as the chains beside them (at least three of the
/// four rows in one tick).
#[test]
fn constrained_bench_runs_both_sides() {
    use performer::constraint::Constraint;
    use performer_cli::constrained_bench::{self, ConstrainedOptions};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::sync::Arc::new(Model::load(root.join("models/performer-byte")).unwrap());
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/schemas/person.json")).unwrap(),
    )
    .unwrap();
    let o = ConstrainedOptions {
        constraint: Constraint::JsonSchema(schema),
        tokens: 48,
        repetitions: 2,
        seed: 3,
        prompt: "Data: ".into(),
    };
    let r = constrained_bench::run(&model, &o).unwrap();
    assert!(r.documents >= 1);
    assert!(r.constrained.mean > 0.0 && r.unconstrained.mean > 0.0);
    assert!(r.median_ratio.is_finite() && r.median_ratio > 0.0);
    let json: serde_json::Value =
        serde_json::from_str(&constrained_bench::json("m", "k", &o, &r)).unwrap();
    assert_eq!(json["documents"], r.documents);
    let m = constrained_bench::mixed(&model, &o, 2, 2).unwrap();
    assert!(m.beside_constrained.mean > 0.0 && m.beside_unconstrained.mean > 0.0);
    assert!(
        m.documents >= 1.0,
        "the constrained chains completed documents"
    );
    assert!(
        (3..=4).contains(&m.max_batch),
        "two streams beside two others: {} rows in one tick",
        m.max_batch
    );
    assert!(constrained_bench::mixed_markdown("m", "k", &o, 2, &m).contains("| ratio |"));
}
