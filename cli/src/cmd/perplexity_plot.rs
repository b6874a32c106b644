//! `performer perplexity --by-position`: the position buckets of [`performer::perplexity`] as a
//! markdown table, as JSON, and as an SVG curve of bits per byte against position (log x axis).

use std::path::Path;

use performer::perplexity::{BucketStats, PositionBuckets};

/// One curve of the plot: a name and its non-empty buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// The legend entry.
    pub name: String,
    /// The non-empty buckets, in position order.
    pub points: Vec<Point>,
}

/// One bucket of a curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// First position of the bucket.
    pub start: usize,
    /// One past the last position the bucket scored (its end, or less if the text ended).
    pub end: usize,
    /// The bucket's bits per byte.
    pub bits_per_byte: f64,
}

impl Curve {
    /// The non-empty buckets of a report.
    pub fn from_buckets(name: &str, b: &PositionBuckets) -> Self {
        Curve {
            name: name.to_string(),
            points: b
                .non_empty()
                .map(|s| Point {
                    start: s.start,
                    end: s
                        .end
                        .map_or(s.max_position + 1, |e| e.min(s.max_position + 1)),
                    bits_per_byte: s.bits_per_byte(),
                })
                .collect(),
        }
    }

    /// A curve read back from `perplexity --by-position --json` output.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let name = v["model"].as_str().unwrap_or("other").to_string();
        let rows = v["by_position"]
            .as_array()
            .ok_or("no `by_position` array (run perplexity with --by-position --json)")?;
        let mut points = Vec::new();
        for r in rows {
            let get = |k: &str| {
                r[k].as_f64()
                    .ok_or_else(|| format!("by_position entry without a number `{k}`"))
            };
            let start = get("start")? as usize;
            let last = get("max_position")? as usize;
            points.push(Point {
                start,
                end: r["end"]
                    .as_f64()
                    .map_or(last + 1, |e| (e as usize).min(last + 1)),
                bits_per_byte: get("bits_per_byte")?,
            });
        }
        if points.is_empty() {
            return Err("`by_position` is empty".into());
        }
        Ok(Curve { name, points })
    }
}

/// The markdown table: one row per non-empty bucket.
pub fn markdown(b: &PositionBuckets) -> String {
    let mut s = String::from("| positions | bytes scored | bits per byte |\n|---|---:|---:|\n");
    for st in b.non_empty() {
        s += &format!(
            "| {} | {} | {:.4} |\n",
            st.label(),
            st.bytes,
            st.bits_per_byte()
        );
    }
    s
}

/// The JSON array of non-empty buckets.
pub fn json(b: &PositionBuckets) -> serde_json::Value {
    let row = |s: &BucketStats| {
        serde_json::json!({
            "label": s.label(),
            "start": s.start,
            "end": s.end,
            "max_position": s.max_position,
            "scored": s.scored,
            "bytes": s.bytes,
            "mean_nll": s.mean_nll(),
            "bits_per_byte": s.bits_per_byte(),
        })
    };
    serde_json::Value::Array(b.non_empty().map(row).collect())
}

/// Writes the curves to an SVG: bits per byte against position (tokens of context) on a log x
/// axis. Each bucket is a horizontal bar over the positions it covers, with a marker at its
/// geometric middle; the markers are joined. Text uses the Hack font embedded in the binary.
/// The file is written atomically (temporary file, fsync, rename): an existing plot is
/// replaced whole or left as it was.
pub fn plot_svg(curves: &[Curve], title: &str, path: &Path) -> Result<(), String> {
    let mut svg = String::new();
    plot_inner(curves, title, &mut svg).map_err(|e| format!("{}: {e}", path.display()))?;
    performer::fsutil::write_atomic(path, |w| w.write_all(svg.as_bytes()))
        .map_err(|e| e.to_string())
}

fn plot_inner(
    curves: &[Curve],
    title: &str,
    svg: &mut String,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;

    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::HACK_REGULAR,
    )
    .map_err(|_| "the embedded font does not parse")?;

    let pts = curves.iter().flat_map(|c| c.points.iter());
    let x_max = pts.clone().map(|p| p.end).max().unwrap_or(2).max(2) as f64;
    let (lo, hi) = pts.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| {
        (l.min(p.bits_per_byte), h.max(p.bits_per_byte))
    });
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        let pad = ((hi - lo) * 0.15).max(0.05);
        ((lo - pad).max(0.0), hi + pad)
    } else {
        (0.0, 8.0)
    };
    // Positions of a bucket on the log axis: position 0 is never scored, start at 1.
    let x0 = |p: &Point| (p.start.max(1)) as f64;
    let x1 = |p: &Point| (p.end.max(p.start.max(1) + 1)) as f64;

    let root = SVGBackend::with_string(svg, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((1f64..x_max).log_scale(), lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("position (tokens of context, log scale)")
        .y_desc("bits per byte")
        .x_label_formatter(&|x: &f64| {
            let x = x.round() as u64;
            if x >= 1024 && x.is_multiple_of(1024) {
                format!("{}k", x / 1024)
            } else {
                x.to_string()
            }
        })
        .draw()?;
    for (i, c) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mids: Vec<(f64, f64)> = c
            .points
            .iter()
            .map(|p| ((x0(p) * x1(p)).sqrt(), p.bits_per_byte))
            .collect();
        chart
            .draw_series(LineSeries::new(mids.clone(), color.stroke_width(2)))?
            .label(c.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(mids.iter().map(|&m| Circle::new(m, 4, color.filled())))?;
        for p in &c.points {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x0(p), p.bits_per_byte), (x1(p), p.bits_per_byte)],
                color.stroke_width(1),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
