//! What a `performer bench` run reports ([`Report`]: rows, fills, skipped depths) and its three
//! forms: a markdown table, JSON and an SVG plot against depth.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use performer::error::{Error, Result};
use performer::weights::PageReport;
use performer::Model;

use super::measure::Stats;
use super::models::Attention;

/// The shortest exact spelling of a count: `0`, `100`, `4k`, `1M`.
pub fn format_count(n: usize) -> String {
    if n > 0 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n > 0 && n.is_multiple_of(1 << 10) {
        format!("{}k", n >> 10)
    } else {
        n.to_string()
    }
}

/// Bytes in binary units: `512 B`, `3.2 KiB`, `1.5 MiB`, `2.00 GiB`.
pub fn format_bytes(b: u64) -> String {
    const KI: f64 = 1024.0;
    let x = b as f64;
    if x < KI {
        format!("{b} B")
    } else if x < KI * KI {
        format!("{:.1} KiB", x / KI)
    } else if x < KI * KI * KI {
        format!("{:.1} MiB", x / (KI * KI))
    } else {
        format!("{:.2} GiB", x / (KI * KI * KI))
    }
}

/// The model under test, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Display name.
    pub name: String,
    /// The dominant weight dtype, lower case.
    pub dtype: String,
    /// Learned parameters.
    pub parameters: usize,
    /// Bytes of weights one decode step reads.
    pub weight_bytes_per_token: usize,
    /// Size of `model.safetensors`.
    pub file_bytes: usize,
    /// The kernels' instruction-set level (`portable`, `avx2` or `avx512`: the best the CPU
    /// runs, or the lower one `PERFORMER_ISA` asks for).
    pub kernels: String,
    /// How the products over quantized weights run (`dequant`, `int8 (maddubs)`, …; `None`
    /// for a float model).
    pub quant_kernel: Option<String>,
    /// Whether decoding's one-row quantized products read rows packed four at a time
    /// (`performer::Model::use_packed_rows`; false for a float model and with
    /// `--no-packed-rows`).
    pub packed_rows: bool,
    /// The level of the `gemm` crate's matrix products (the FAVOR+ chunk's attention products
    /// in prefill; the weight products run at `kernels`): its own choice, which
    /// `PERFORMER_ISA` does not lower.
    pub gemm: String,
}

impl ModelInfo {
    /// Describes a loaded model under `name`.
    pub fn of(model: &Model, name: &str) -> Self {
        let dtype = model
            .dtype_counts()
            .into_iter()
            .map(|(d, n)| (d.to_string().to_ascii_lowercase(), n))
            .chain(
                model
                    .quantized_counts()
                    .into_iter()
                    .map(|(f, n)| (f.to_string(), n)),
            )
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d)
            .unwrap_or_else(|| "?".into());
        ModelInfo {
            name: name.to_string(),
            dtype,
            parameters: model.parameter_count(),
            weight_bytes_per_token: model.weight_bytes_per_token(),
            file_bytes: model.weights().file_size(),
            kernels: performer::kernels::isa::active().isa().name().to_string(),
            quant_kernel: model.quant_method().map(|m| {
                performer::kernels::quant::QuantKernels::active(m)
                    .describe()
                    .to_string()
            }),
            packed_rows: model.packed_bytes() > 0,
            gemm: performer::kernels::matmul::gemm_level().name().to_string(),
        }
    }

    /// The table's `kernels` cell: the level, the quantized method where there is one, and
    /// gemm's level (the FAVOR+ chunk's attention products; the weight products run at the
    /// kernels' level) where it differs from the kernels' (`avx2`, `avx2, q: int8 (maddubs)`,
    /// `avx2, q: int8 (maddubs) packed`, `avx2, gemm: avx512`).
    pub fn kernels_label(&self) -> String {
        let mut label = self.kernels.clone();
        if let Some(q) = &self.quant_kernel {
            label.push_str(&format!(", q: {q}"));
            if self.packed_rows {
                label.push_str(" packed");
            }
        }
        if self.gemm != self.kernels {
            label.push_str(&format!(", gemm: {}", self.gemm));
        }
        label
    }
}

/// `pp` or `tg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TestKind {
    /// Prompt processing (prefill).
    Pp,
    /// Token generation (single steps).
    Tg,
}

/// One result row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Attention kind.
    pub attention: Attention,
    /// `pp` or `tg`.
    pub test: TestKind,
    /// Tokens processed per repetition.
    pub tokens: usize,
    /// Context depth the test starts at.
    pub depth: usize,
    /// Threads of the pool.
    pub threads: usize,
    /// Tokens per second over the repetitions.
    pub tokens_per_s: Stats,
    /// Per-repetition tokens per second.
    pub samples: Vec<f64>,
    /// Process-wide peak RSS during the group (see the module docs).
    pub peak_rss_bytes: Option<u64>,
    /// Per-sequence state bytes at the test's depth.
    pub state_bytes: usize,
    /// Fraction of the memory roofline, weight bytes only (`tg` only).
    pub roofline: Option<f64>,
    /// Bytes of attention state a decode token reads plus writes, averaged over the test's
    /// tokens (`tg` only, else 0; see `Session::state_traffic_bytes`).
    pub state_traffic_bytes: usize,
    /// Fraction of the memory roofline counting the weight bytes and the state traffic
    /// (`tg` only).
    pub roofline_with_state: Option<f64>,
}

impl Row {
    /// `pp512`, `tg128`.
    pub fn test_name(&self) -> String {
        match self.test {
            TestKind::Pp => format!("pp{}", self.tokens),
            TestKind::Tg => format!("tg{}", self.tokens),
        }
    }
}

/// How long bringing a state to a depth took (outside every timed test).
#[derive(Debug, Clone, Serialize)]
pub struct Fill {
    /// Attention kind.
    pub attention: Attention,
    /// Depth reached.
    pub depth: usize,
    /// Tokens prefilled for this depth (from the previous depth).
    pub tokens: usize,
    /// Seconds those took.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The model.
    pub model: ModelInfo,
    /// Measured read bandwidth, bytes/s (None when the probe was skipped).
    pub read_bandwidth: Option<f64>,
    /// Buffer size of the probe.
    pub bandwidth_probe_bytes: usize,
    /// Threads of the probe.
    pub bandwidth_probe_threads: usize,
    /// Repetitions per test.
    pub repetitions: usize,
    /// Whether the peak-RSS mark could be reset before each group.
    pub peak_rss_reset: bool,
    /// The rows, in run order.
    pub rows: Vec<Row>,
    /// Depth fills.
    pub fills: Vec<Fill>,
    /// The weights' residency after the tests, and how much of it sits on 2 MiB pages
    /// (None where `/proc/self/smaps` is not available).
    pub weight_pages: Option<PageReport>,
    /// Depths not measured because the state would not fit in memory there.
    pub skipped: Vec<Skipped>,
}

/// A depth left out because its state would not fit (see [`BenchOptions::memory_budget`]).
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Attention kind.
    pub attention: Attention,
    /// The depth.
    pub depth: usize,
    /// Bytes the state would have grown by to reach it and run the repetitions there.
    pub needed_bytes: u64,
    /// The budget it was held against.
    pub budget_bytes: u64,
}

/// The report as a markdown table with a header and the fill times below it.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let m = &r.model;
    let _ = writeln!(
        s,
        "model: {} ({:.1}M parameters, {}, file {}, weights read per token {})",
        m.name,
        m.parameters as f64 / 1e6,
        m.dtype,
        format_bytes(m.file_bytes as u64),
        format_bytes(m.weight_bytes_per_token as u64)
    );
    match r.read_bandwidth {
        Some(bw) => {
            let _ = writeln!(
                s,
                "read bandwidth: {:.1} GB/s (streaming read of {}, {} threads, median of passes before and after the tests)",
                bw / 1e9,
                format_bytes(r.bandwidth_probe_bytes as u64),
                r.bandwidth_probe_threads
            );
        }
        None => {
            let _ = writeln!(s, "read bandwidth: not measured");
        }
    }
    if let Some(p) = r.weight_pages {
        let _ = writeln!(
            s,
            "weights in memory: {}, {:.0}% of it on 2 MiB pages",
            format_bytes(p.resident_bytes),
            p.huge_fraction() * 100.0
        );
    }
    let _ = writeln!(
        s,
        "repetitions: {}; t/s = mean ± sd; peak RSS is process-wide{}\n",
        r.repetitions,
        if r.peak_rss_reset {
            " (reset before each row)"
        } else {
            " (cumulative: could not be reset)"
        }
    );
    let _ = writeln!(
        s,
        "| model | dtype | attention | test | depth | threads | t/s | peak RSS | state/seq | roofline | +state | kernels |"
    );
    let _ = writeln!(s, "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} | {} | {} | {} | {} |",
            m.name,
            m.dtype,
            row.attention,
            row.test_name(),
            format_count(row.depth),
            row.threads,
            row.tokens_per_s.mean,
            row.tokens_per_s.sd,
            row.peak_rss_bytes
                .map_or_else(|| "-".to_string(), format_bytes),
            format_bytes(row.state_bytes as u64),
            percent(row.roofline),
            percent(row.roofline_with_state),
            m.kernels_label(),
        );
    }
    for k in &r.skipped {
        let _ = writeln!(
            s,
            "\nskipped: {} at depth {}: its state would grow by {}, more than the {} it may take",
            k.attention,
            format_count(k.depth),
            format_bytes(k.needed_bytes),
            format_bytes(k.budget_bytes)
        );
    }
    if !r.fills.is_empty() {
        let _ = writeln!(
            s,
            "\ndepth fills (prefill of random tokens, not timed in tg):"
        );
        for f in &r.fills {
            let _ = writeln!(
                s,
                "- {} to depth {}: {} tokens in {:.2} s ({:.1} tokens/s, {} threads)",
                f.attention,
                format_count(f.depth),
                f.tokens,
                f.seconds,
                f.tokens as f64 / f.seconds.max(1e-12),
                f.threads
            );
        }
    }
    s
}

/// The report as pretty-printed JSON.
pub fn json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("the report serializes")
}

/// Writes an SVG with two charts against depth: `tg` tokens/s (one line per attention kind,
/// tg size and thread count) and memory (state bytes per sequence and peak RSS, log scale).
/// Text uses the Hack font embedded in the binary (no system fonts needed). The file is
/// written atomically ([`performer::fsutil::write_atomic`]).
pub fn plot_svg(r: &Report, path: &Path) -> Result<()> {
    let mut svg = String::new();
    plot_inner(r, &mut svg).map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    performer::fsutil::write_atomic(path, |w| std::io::Write::write_all(w, svg.as_bytes()))
}

fn plot_inner(r: &Report, svg: &mut String) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;

    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::HACK_REGULAR,
    )
    .map_err(|_| "the embedded font does not parse")?;

    let tg: Vec<&Row> = r.rows.iter().filter(|x| x.test == TestKind::Tg).collect();
    let mut depths: Vec<usize> = tg.iter().map(|x| x.depth).collect();
    depths.sort_unstable();
    depths.dedup();
    if depths.is_empty() {
        depths.push(0);
    }
    let idx = |d: usize| depths.iter().position(|&x| x == d).unwrap_or(0) as i32;
    let x_max = (depths.len() as i32 - 1).max(1);
    let labels = depths.clone();
    let x_fmt = move |x: &i32| {
        usize::try_from(*x)
            .ok()
            .and_then(|i| labels.get(i))
            .map(|&d| format_count(d))
            .unwrap_or_default()
    };

    // Lines: (attention, tg size, threads).
    let mut keys: Vec<(Attention, usize, usize)> = tg
        .iter()
        .map(|x| (x.attention, x.tokens, x.threads))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let label = |k: &(Attention, usize, usize)| format!("{} tg{} {}t", k.0, k.1, k.2);

    let root = SVGBackend::with_string(svg, (960, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(380);

    let y_max = tg
        .iter()
        .map(|x| x.tokens_per_s.mean + x.tokens_per_s.sd)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            format!(
                "{} ({}): generation throughput",
                r.model.name, r.model.dtype
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0i32..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_labels(depths.len().max(2))
        .x_label_formatter(&x_fmt)
        .x_desc("context depth (tokens)")
        .y_desc("tokens/s")
        .draw()?;
    for (i, k) in keys.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(i32, f64)> = tg
            .iter()
            .filter(|x| (x.attention, x.tokens, x.threads) == *k)
            .map(|x| (idx(x.depth), x.tokens_per_s.mean))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label(k))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;

    // Memory: per attention, state bytes and peak RSS (max over the thread counts) by depth.
    let mut atts: Vec<Attention> = tg.iter().map(|x| x.attention).collect();
    atts.sort_unstable();
    atts.dedup();
    let mut series: Vec<(String, Vec<(i32, f64)>)> = Vec::new();
    for &a in &atts {
        let mut state = Vec::new();
        let mut rss = Vec::new();
        for &d in &depths {
            let at: Vec<&&Row> = tg
                .iter()
                .filter(|x| x.attention == a && x.depth == d)
                .collect();
            if let Some(sb) = at.iter().map(|x| x.state_bytes).max() {
                state.push((idx(d), sb as f64 / (1 << 20) as f64));
            }
            if let Some(p) = at.iter().filter_map(|x| x.peak_rss_bytes).max() {
                rss.push((idx(d), p as f64 / (1 << 20) as f64));
            }
        }
        series.push((format!("{a}: state per sequence"), state));
        if !rss.is_empty() {
            series.push((format!("{a}: peak RSS (process)"), rss));
        }
    }
    let vals = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1));
    let (lo, hi) = vals.fold((f64::INFINITY, 0.0f64), |(l, h), v| (l.min(v), h.max(v)));
    let (lo, hi) = if lo.is_finite() && lo > 0.0 {
        // Room above the lines for the legend.
        (lo / 2.0, hi * 8.0)
    } else {
        (1e-3, 1.0)
    };
    let mut chart = ChartBuilder::on(&lower)
        .caption("memory", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0i32..x_max, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(depths.len().max(2))
        .x_label_formatter(&x_fmt)
        .x_desc("context depth (tokens)")
        .y_desc("MiB (log)")
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// `51%`, or `-` for none.
fn percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "-".to_string(), |f| format!("{:.0}%", f * 100.0))
}
