//! A llama-bench-like throughput runner: prompt processing (`pp N`) and token generation at a
//! given context depth (`tg N @ dK`), per attention kind and thread count.
//!
//! * `pp N`: prefill of N random tokens into a fresh state; tokens/s = N / time.
//! * `tg N @ dK`: a state is first brought to depth K by prefilling K random tokens (the
//!   *fill*, timed separately and reported, not part of the test), then N single-token steps are
//!   timed from a copy of that state. Each repetition starts from the same depth-K state.
//!   Depths are filled incrementally in ascending order, so the fill cost is that of the
//!   deepest depth only (for `tiny` one million tokens take minutes: see the fill lines of the
//!   report).
//!
//! Only the model calls are timed: no sampling or tokenization. Each (test, threads) group runs
//! one short untimed warm-up first (it faults in the mapped weights and wakes the pool).
//! Thread counts each get their own rayon pool and run inside [`rayon::ThreadPool::install`].
//!
//! Memory columns: *peak RSS* is the process-wide `VmHWM` of `/proc/self/status` after the
//! group, with the high-water mark reset (`/proc/self/clear_refs` ← 5) before it where the
//! kernel allows, so it is the peak during that group of everything in the process (the mapped
//! weights it touched included, and memory the allocator kept from earlier tests, such as the
//! freed scratch of the depth fills: the same for every depth, since the FAVOR+ depths are
//! measured interleaved after all fills); *state bytes* is the per-sequence state
//! ([`performer::State::size_bytes`] for FAVOR+, constant in the depth; the key/value cache plus
//! scratch for the softmax baseline, growing with it).
//!
//! *Roofline*: for `tg`, `weight_bytes_per_token × tokens/s ÷ read bandwidth`, the bandwidth
//! being measured by the command itself (a multi-threaded streaming read of a buffer far larger
//! than L3, half the passes before the tests and half after, the median of all). A model whose weights fit in cache can exceed 100%.
//!
//! # Running
//!
//! ```text
//! cargo build --release
//! target/release/performer bench --shape tiny --depths 0,1k,4k,16k --tg 128 --pp 512 -r 3
//! target/release/performer bench --shape gpt2-small --dtype bf16 --depths 0,4k --tg 32 \
//!     --pp 256 -r 3 --synthetic-dir /tmp/gpt2-bf16 --plot gpt2.svg
//! target/release/performer bench --model models/performer-byte --threads 1,2 --json
//! ```
//!
//! `--shape` writes a random model ([`performer::synthetic`]) to a temporary directory (or to
//! `--synthetic-dir`, reused on later runs with the same shape, dtype and seed).
//!
//! Depth fills cost one prefill token per token of depth (fill rates: docs/performance.md;
//! on two cores a 1M-token fill of `tiny` takes minutes). The softmax
//! baseline's fill is quadratic in the depth (`tiny` to 16k takes minutes) and its cache is
//! `2 · depth · layers · heads · dim_head · 4` bytes (`tiny` at 1M: 8 GiB), so keep its depths
//! to tens of thousands. It cannot fork, so its `tg` repetitions run back to back (see
//! [`Session::fork`]).
//!
//! # Adding an attention kind
//!
//! Implement [`Session`] for it and add its arm to [`new_session`]; nothing else in the runner
//! knows the kinds.

pub mod batch;
mod measure;
mod models;
mod report;

use performer::error::{Error, Result};
use performer::synthetic::Rng;
use performer::Model;

pub use measure::{
    available_memory_bytes, depth_visit_order, measure_read_bandwidth, median, peak_rss_bytes,
    reset_peak_rss, rss_bytes, Stats,
};
pub use models::{new_session, Attention, Session};
pub use report::{
    format_bytes, format_count, json, markdown, plot_svg, Fill, ModelInfo, Report, Row, Skipped,
    TestKind,
};

use measure::{build_pool, read_bandwidth_passes, Progress, Runner};

/// Parses a token count with an optional binary suffix: `512`, `4k` (4096), `1M` (1048576).
pub fn parse_count(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a count such as 512, 4k or 1M"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a comma-separated list of counts (`0,1k,4k`).
pub fn parse_counts(s: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_count)
        .collect()
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Attention kinds, each a separate set of rows.
    pub attentions: Vec<Attention>,
    /// Prefill sizes (`pp`); 0 entries are skipped.
    pub pp: Vec<usize>,
    /// Generation sizes (`tg`); 0 entries are skipped.
    pub tg: Vec<usize>,
    /// Depths for `tg`.
    pub depths: Vec<usize>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Timed repetitions per test.
    pub repetitions: usize,
    /// Seed of the random tokens.
    pub seed: u64,
    /// Buffer size of the bandwidth probe; 0 skips it (no roofline column).
    pub bandwidth_bytes: usize,
    /// Passes of the bandwidth probe (half before the tests, half after; median taken).
    pub bandwidth_passes: usize,
    /// Show a progress bar on stderr when it is a terminal.
    pub progress: bool,
    /// Bytes a growing state (the softmax baseline's cache) may add to reach a depth and run
    /// its repetitions there; a depth that would need more is skipped and reported in
    /// [`Report::skipped`], as are the larger ones. `None`: 80% of the memory the kernel
    /// reports available (`MemAvailable`) when the depth is reached; no limit where that is
    /// unknown.
    pub memory_budget: Option<u64>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            attentions: vec![Attention::Favor],
            pp: vec![512],
            tg: vec![128],
            depths: vec![0],
            threads: vec![default_threads()],
            repetitions: 5,
            seed: 42,
            bandwidth_bytes: 1 << 30,
            bandwidth_passes: 6,
            progress: true,
            memory_budget: None,
        }
    }
}

/// The machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl BenchOptions {
    /// Checks the options before anything is measured (or a synthetic model written): at
    /// least one attention kind and thread count, no zero thread count or repetitions, and
    /// something to measure (a non-zero `pp` or `tg`).
    pub fn validate(&self) -> Result<()> {
        if !self.pp.iter().chain(&self.tg).any(|&n| n > 0) {
            return Err(Error::invalid(
                "pp/tg",
                "nothing to measure: every --pp and --tg size is 0",
            ));
        }
        if self.attentions.is_empty() {
            return Err(Error::invalid("attention", "give at least one"));
        }
        if self.threads.is_empty() || self.threads.contains(&0) {
            return Err(Error::invalid(
                "threads",
                "thread counts must be at least 1",
            ));
        }
        if self.repetitions == 0 {
            return Err(Error::invalid("repetitions", "must be at least 1"));
        }
        Ok(())
    }
}

/// Runs every test of `opts` on `model` (named `name` in the report): per attention kind the
/// `pp` tests, then the depth fills and the `tg` tests; the read bandwidth probed before and
/// after them gives the `tg` rows their roofline.
pub fn run(model: &Model, name: &str, opts: &BenchOptions) -> Result<Report> {
    opts.validate()?;
    // Fail before any measurement if an attention kind is not available.
    for &a in &opts.attentions {
        new_session(model, a)?;
    }
    let pp: Vec<usize> = opts.pp.iter().copied().filter(|&n| n > 0).collect();
    let tg: Vec<usize> = opts.tg.iter().copied().filter(|&n| n > 0).collect();
    let mut depths = opts.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    if depths.is_empty() {
        depths.push(0);
    }
    let reps = opts.repetitions;

    let probe_threads = default_threads();
    // The probe runs before and after the tests (half the passes each) and the median of all
    // passes counts: on a shared machine the bandwidth drifts too, and a single probe at the
    // start can land on an unusually quiet or busy moment.
    let probe = |passes: usize| {
        if opts.bandwidth_bytes > 0 {
            read_bandwidth_passes(opts.bandwidth_bytes, passes, probe_threads)
        } else {
            Vec::new()
        }
    };
    let mut bandwidth_passes = probe(opts.bandwidth_passes.div_ceil(2));
    // The probe's buffer is freed; forget its peak.
    let peak_rss_reset = reset_peak_rss();

    let pools: Vec<(usize, rayon::ThreadPool)> = opts
        .threads
        .iter()
        .map(|&t| build_pool(t).map(|p| (t, p)))
        .collect::<Result<_>>()?;
    let fill_pool = pools
        .iter()
        .max_by_key(|(t, _)| *t)
        .map(|(t, p)| (*t, p))
        .ok_or_else(|| Error::invalid("threads", "at least one thread count is needed"))?;
    let groups = opts.attentions.len() * pools.len() * (pp.len() + depths.len() * tg.len());
    let progress = Progress::new(opts.progress, (groups * reps) as u64);
    let mut runner = Runner {
        model,
        reps,
        pools: &pools,
        fill_pool,
        progress: &progress,
        rng: Rng::new(opts.seed),
    };
    let (mut rows, mut fills, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for &attention in &opts.attentions {
        for &n in &pp {
            for (threads, pool) in &pools {
                rows.push(runner.pp(attention, n, *threads, pool)?);
            }
        }
        if tg.is_empty() {
            continue;
        }
        let base = new_session(model, attention)?;
        rows.extend(if base.fork().is_some() {
            runner.tg_interleaved(attention, base, &depths, &tg, &mut fills)?
        } else {
            let budget = opts.memory_budget;
            runner.tg_sequential(
                attention,
                base,
                &depths,
                &tg,
                budget,
                &mut fills,
                &mut skipped,
            )?
        });
    }
    progress.bar.finish_and_clear();

    let info = ModelInfo::of(model, name);
    let weight_pages = model.weights().page_report();
    bandwidth_passes.extend(probe(opts.bandwidth_passes / 2));
    let read_bandwidth = (!bandwidth_passes.is_empty()).then(|| median(&bandwidth_passes));
    for row in rows.iter_mut().filter(|r| r.test == TestKind::Tg) {
        let weights = info.weight_bytes_per_token as f64;
        let t_s = row.tokens_per_s.mean;
        row.roofline = read_bandwidth.map(|bw| weights * t_s / bw);
        row.roofline_with_state =
            read_bandwidth.map(|bw| (weights + row.state_traffic_bytes as f64) * t_s / bw);
    }
    Ok(Report {
        model: info,
        read_bandwidth,
        bandwidth_probe_bytes: opts.bandwidth_bytes,
        bandwidth_probe_threads: probe_threads,
        repetitions: reps,
        peak_rss_reset,
        rows,
        fills,
        weight_pages,
        skipped,
    })
}
