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

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use serde::Serialize;

use performer::error::{Error, Result};
use performer::synthetic::Rng;
use performer::weights::PageReport;
use performer::{Model, State};

/// Which attention a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// The constant-size streaming FAVOR+ state ([`State`]).
    Favor,
    /// Exact softmax attention over a growing key/value cache ([`performer::baseline`]).
    Softmax,
}

impl Attention {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Attention::Favor => "favor",
            Attention::Softmax => "softmax",
        }
    }
}

impl std::fmt::Display for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Attention {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "favor" | "favor+" | "performer" => Ok(Attention::Favor),
            "softmax" | "exact" => Ok(Attention::Softmax),
            other => Err(format!(
                "unknown attention `{other}` (expected favor or softmax)"
            )),
        }
    }
}

/// One sequence being decoded, whatever the attention.
pub trait Session<'m>: Send + Sync {
    /// Consumes one token (computing the logits, which are discarded).
    fn step(&mut self, token: u32) -> Result<()>;
    /// Consumes several tokens (logits after the last one only).
    fn prefill(&mut self, tokens: &[u32]) -> Result<()>;
    /// Bytes of per-sequence state held now (for a KV cache: grows with the depth).
    fn state_bytes(&self) -> usize;
    /// Bytes the state grows by per token consumed (0 for FAVOR+'s constant-size state).
    fn bytes_per_token(&self) -> usize;
    /// An independent copy at the same depth, so that every `tg` repetition starts from the
    /// same state. `None` where copying is not supported: then the repetitions run back to back
    /// on the session itself, the r-th starting at depth `K + r·N` (plus two warm-up tokens).
    fn fork(&self) -> Option<Box<dyn Session<'m> + 'm>>;
}

/// The FAVOR+ session: a [`State`] and the model it runs with.
struct FavorSession<'m> {
    model: &'m Model,
    state: State,
}

impl<'m> Session<'m> for FavorSession<'m> {
    fn step(&mut self, token: u32) -> Result<()> {
        let logits = self.model.step(&mut self.state, token)?;
        std::hint::black_box(logits);
        Ok(())
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        let logits = self.model.prefill(&mut self.state, tokens)?;
        std::hint::black_box(logits);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.state.size_bytes()
    }

    fn bytes_per_token(&self) -> usize {
        0
    }

    fn fork(&self) -> Option<Box<dyn Session<'m> + 'm>> {
        Some(Box::new(FavorSession {
            model: self.model,
            state: self.state.clone(),
        }))
    }
}

/// The exact-softmax baseline ([`performer::baseline::SoftmaxSession`]): a key/value cache that
/// grows with the depth.
struct SoftmaxBench<'m>(performer::baseline::SoftmaxSession<'m>);

impl<'m> Session<'m> for SoftmaxBench<'m> {
    fn step(&mut self, token: u32) -> Result<()> {
        std::hint::black_box(self.0.step(token)?);
        Ok(())
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        std::hint::black_box(self.0.prefill(tokens)?);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.0.size_bytes()
    }

    fn bytes_per_token(&self) -> usize {
        self.0.cache_bytes_per_token()
    }

    fn fork(&self) -> Option<Box<dyn Session<'m> + 'm>> {
        None
    }
}

/// A fresh session (depth 0) for `attention`. The one place that knows the attention kinds.
pub fn new_session(model: &Model, attention: Attention) -> Result<Box<dyn Session<'_> + '_>> {
    match attention {
        Attention::Favor => Ok(Box::new(FavorSession {
            model,
            state: State::new(model),
        })),
        Attention::Softmax => Ok(Box::new(SoftmaxBench(
            performer::baseline::SoftmaxSession::new(model),
        ))),
    }
}

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

/// Mean and sample standard deviation of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator; 0 for one sample).
    pub sd: f64,
    /// Number of samples.
    pub n: usize,
}

impl Stats {
    /// Statistics of `xs` (all zero for an empty slice).
    pub fn of(xs: &[f64]) -> Self {
        let n = xs.len();
        if n == 0 {
            return Stats {
                mean: 0.0,
                sd: 0.0,
                n: 0,
            };
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Stats { mean, sd, n }
    }
}

/// Median of a non-empty slice (mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Sums a slice with four SIMD accumulators at the kernels' level (a read-bandwidth-bound loop).
fn sum_stream(x: &[f32]) -> f32 {
    performer::kernels::sum(x)
}

/// Measures the sustained read bandwidth in bytes per second: `threads` threads each stream
/// over their share of a `bytes`-sized buffer (written first, so its pages are real), `passes`
/// times; the median pass counts. Use a buffer far larger than the last-level cache (1 GiB) for
/// the DRAM figure.
pub fn measure_read_bandwidth(bytes: usize, passes: usize, threads: usize) -> f64 {
    median(&read_bandwidth_passes(bytes, passes, threads))
}

/// Every pass of [`measure_read_bandwidth`], bytes per second.
fn read_bandwidth_passes(bytes: usize, passes: usize, threads: usize) -> Vec<f64> {
    let threads = threads.max(1);
    let per = (bytes / 4 / threads).max(64).next_multiple_of(64);
    let mut buf = vec![0f32; per * threads];
    std::thread::scope(|s| {
        for (i, c) in buf.chunks_mut(per).enumerate() {
            s.spawn(move || c.fill(1.0 + i as f32));
        }
    });
    let total = (buf.len() * 4) as f64;
    let mut rates = Vec::with_capacity(passes.max(1));
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(per)
                .map(|c| s.spawn(move || sum_stream(std::hint::black_box(c))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        rates.push(total / secs.max(1e-9));
    }
    rates
}

/// A `kB` field of `/proc/self/status` in bytes, where `/proc` has it.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Memory the kernel reports available for new allocations without swapping
/// (`MemAvailable` of `/proc/meminfo`), where it has it.
pub fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The process's peak resident set (`VmHWM`) in bytes, where `/proc` has it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM")
}

/// The process's current resident set (`VmRSS`) in bytes, where `/proc` has it.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS")
}

/// Resets the peak-RSS mark to the current RSS (Linux ≥ 4.0); false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
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
        }
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
    /// Fraction of the memory roofline (`tg` only).
    pub roofline: Option<f64>,
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

struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(show: bool, total: u64) -> Self {
        let bar = if show && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} reps [{elapsed_precise}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        Progress { bar }
    }
}

fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid("threads", format!("cannot start {threads} threads: {e}")))
}

/// Runs every test of `opts` on `model` (named `name` in the report).
pub fn run(model: &Model, name: &str, opts: &BenchOptions) -> Result<Report> {
    opts.validate()?;
    // Fail before any measurement if an attention kind is not available.
    for &a in &opts.attentions {
        new_session(model, a)?;
    }
    let vocab = model.vocab_size();
    let mut rng = Rng::new(opts.seed);
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
    // Depth fills run on the measuring pool with the most threads, not a pool of their own: a
    // fresh pool's threads would bring their own allocator arenas and gemm buffers, and the
    // peak RSS of later rows would count that scratch as if depth cost memory.
    let (fill_threads, fill_pool) = pools
        .iter()
        .max_by_key(|(t, _)| *t)
        .map(|(t, p)| (*t, p))
        .ok_or_else(|| Error::invalid("threads", "at least one thread count is needed"))?;

    let groups = opts.attentions.len() * pools.len() * (pp.len() + depths.len() * tg.len());
    let progress = Progress::new(opts.progress, (groups * reps) as u64);
    let info = ModelInfo::of(model, name);
    let mut rows = Vec::new();
    let mut fills = Vec::new();
    let mut skipped = Vec::new();

    for &attention in &opts.attentions {
        // pp: a fresh state per repetition.
        for &n in &pp {
            for (threads, pool) in &pools {
                progress
                    .bar
                    .set_message(format!("{attention} pp{n} t{threads}"));
                let row = pool.install(|| -> Result<Row> {
                    let mut warm = new_session(model, attention)?;
                    warm.prefill(&rng.tokens(n.min(8), vocab))?;
                    reset_peak_rss();
                    let mut samples = Vec::with_capacity(reps);
                    let mut state_bytes = 0;
                    for _ in 0..reps {
                        let tokens = rng.tokens(n, vocab);
                        let mut s = new_session(model, attention)?;
                        let start = Instant::now();
                        s.prefill(&tokens)?;
                        let secs = start.elapsed().as_secs_f64();
                        samples.push(n as f64 / secs.max(1e-12));
                        state_bytes = s.state_bytes();
                        progress.bar.inc(1);
                    }
                    Ok(Row {
                        attention,
                        test: TestKind::Pp,
                        tokens: n,
                        depth: 0,
                        threads: *threads,
                        tokens_per_s: Stats::of(&samples),
                        samples,
                        peak_rss_bytes: peak_rss_bytes(),
                        state_bytes,
                        roofline: None,
                    })
                })?;
                rows.push(row);
            }
        }
        if tg.is_empty() {
            continue;
        }
        // tg: one session extended through the depths in ascending order.
        let mut base = new_session(model, attention)?;
        let mut at = 0usize;
        let fill = |base: &mut Box<dyn Session<'_> + '_>,
                    from: usize,
                    depth: usize,
                    rng: &mut Rng|
         -> Result<Fill> {
            let todo = depth - from;
            let start = Instant::now();
            fill_pool.install(|| -> Result<()> {
                const CHUNK: usize = 4096;
                let mut done = 0;
                while done < todo {
                    let k = CHUNK.min(todo - done);
                    base.prefill(&rng.tokens(k, vocab))?;
                    done += k;
                    progress.bar.set_message(format!(
                        "{attention} fill {}/{}",
                        format_count(from + done),
                        format_count(depth)
                    ));
                }
                Ok(())
            })?;
            Ok(Fill {
                attention,
                depth,
                tokens: todo,
                seconds: start.elapsed().as_secs_f64(),
                threads: fill_threads,
            })
        };
        if base.fork().is_some() {
            // Forkable sessions: keep a copy at every depth, then interleave the depths
            // repetition by repetition, so that a machine's drifting speed (shared cores,
            // clocks) falls on every depth alike and the depth columns compare side by side.
            let mut at_depth = Vec::with_capacity(depths.len());
            for &depth in &depths {
                if depth > at {
                    fills.push(fill(&mut base, at, depth, &mut rng)?);
                    at = depth;
                }
                at_depth.push(base.fork().expect("forkable"));
            }
            let mut tg_rows = Vec::new();
            for &n in &tg {
                for (threads, pool) in &pools {
                    progress
                        .bar
                        .set_message(format!("{attention} tg{n} t{threads}, depths interleaved"));
                    pool.install(|| -> Result<()> {
                        // The warm-up ingests its tokens as a (two-token) prompt and then
                        // steps, as every real generation does: at depth 0 too the prefill
                        // path's one-time per-thread buffers (gemm's 1 MiB L2 slab per thread)
                        // then exist, as they do after a depth fill.
                        let warm_tokens = rng.tokens(2, vocab);
                        for snapshot in &at_depth {
                            let mut warm = snapshot.fork().expect("forkable");
                            warm.prefill(&warm_tokens)?;
                            for &t in &warm_tokens {
                                warm.step(t)?;
                            }
                        }
                        let mut samples = vec![Vec::with_capacity(reps); depths.len()];
                        let mut peaks: Vec<Option<u64>> = vec![None; depths.len()];
                        let mut state_bytes = vec![0; depths.len()];
                        for rep in 0..reps {
                            let tokens = rng.tokens(n, vocab);
                            for i in depth_visit_order(rep, at_depth.len()) {
                                let mut s = at_depth[i].fork().expect("forkable");
                                reset_peak_rss();
                                let start = Instant::now();
                                for &t in &tokens {
                                    s.step(t)?;
                                }
                                let secs = start.elapsed().as_secs_f64();
                                samples[i].push(n as f64 / secs.max(1e-12));
                                peaks[i] = peaks[i].max(peak_rss_bytes());
                                state_bytes[i] = state_bytes[i].max(s.state_bytes());
                                progress.bar.inc(1);
                            }
                        }
                        for (i, &depth) in depths.iter().enumerate() {
                            let stats = Stats::of(&samples[i]);
                            tg_rows.push(Row {
                                attention,
                                test: TestKind::Tg,
                                tokens: n,
                                depth,
                                threads: *threads,
                                tokens_per_s: stats,
                                samples: std::mem::take(&mut samples[i]),
                                peak_rss_bytes: peaks[i],
                                state_bytes: state_bytes[i],
                                roofline: None,
                            });
                        }
                        Ok(())
                    })?;
                }
            }
            // Rows by depth, then as generated (tg size, threads): the table reads like the
            // sequential path's.
            tg_rows.sort_by_key(|r| r.depth);
            rows.extend(tg_rows);
            continue;
        }
        // Tokens one depth's tests add on top of the depth (warm-up and repetitions, per tg
        // size and thread count).
        let per_depth: usize = pools.len() * tg.iter().map(|&n| 2 + reps * n).sum::<usize>();
        let grow = base.bytes_per_token() as u64;
        // Bytes the state grows by from position `at` to `depth` and that depth's tests.
        let needed =
            |depth: usize, at: usize| grow.saturating_mul((depth.max(at) - at + per_depth) as u64);
        for (i, &depth) in depths.iter().enumerate() {
            let budget = opts
                .memory_budget
                .or_else(|| available_memory_bytes().map(|b| b / 10 * 8));
            if let Some(budget) = budget.filter(|&b| needed(depth, at) > b) {
                // This depth and every larger one would not fit: reported, not attempted.
                skipped.extend(depths[i..].iter().map(|&depth| Skipped {
                    attention,
                    depth,
                    needed_bytes: needed(depth, at),
                    budget_bytes: budget,
                }));
                break;
            }
            // A session that cannot fork has moved past earlier depths by its repetitions.
            if depth > at {
                fills.push(fill(&mut base, at, depth, &mut rng)?);
                at = depth;
            }
            for &n in &tg {
                for (threads, pool) in &pools {
                    progress.bar.set_message(format!(
                        "{attention} tg{n} @ d{} t{threads}",
                        format_count(depth)
                    ));
                    let row = pool.install(|| -> Result<Row> {
                        let warm_tokens = rng.tokens(2, vocab);
                        for &t in &warm_tokens {
                            base.step(t)?;
                        }
                        at += warm_tokens.len();
                        reset_peak_rss();
                        let mut samples = Vec::with_capacity(reps);
                        let mut state_bytes = base.state_bytes();
                        for _ in 0..reps {
                            let tokens = rng.tokens(n, vocab);
                            let start = Instant::now();
                            for &t in &tokens {
                                base.step(t)?;
                            }
                            let secs = start.elapsed().as_secs_f64();
                            at += n;
                            samples.push(n as f64 / secs.max(1e-12));
                            state_bytes = state_bytes.max(base.state_bytes());
                            progress.bar.inc(1);
                        }
                        let stats = Stats::of(&samples);
                        Ok(Row {
                            attention,
                            test: TestKind::Tg,
                            tokens: n,
                            depth,
                            threads: *threads,
                            tokens_per_s: stats,
                            samples,
                            peak_rss_bytes: peak_rss_bytes(),
                            state_bytes,
                            roofline: None,
                        })
                    })?;
                    rows.push(row);
                }
            }
        }
    }
    progress.bar.finish_and_clear();
    let weight_pages = model.weights().page_report();
    bandwidth_passes.extend(probe(opts.bandwidth_passes / 2));
    let read_bandwidth = (!bandwidth_passes.is_empty()).then(|| median(&bandwidth_passes));
    for row in rows.iter_mut().filter(|r| r.test == TestKind::Tg) {
        row.roofline = read_bandwidth
            .map(|bw| info.weight_bytes_per_token as f64 * row.tokens_per_s.mean / bw);
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

/// The order in which repetition `rep` visits `n` interleaved depths: ascending on even
/// repetitions, descending on odd ones. The state stepped second in a pair runs at a
/// different speed than the first (faster when both are the same state, slower when it is a
/// different one whose data the other's has just pushed out of the caches): a fixed order would
/// charge that to the deeper states. Alternating balances it, as an A/B alternates its runs.
pub fn depth_visit_order(rep: usize, n: usize) -> impl Iterator<Item = usize> {
    let descending = rep % 2 == 1;
    (0..n).map(move |i| if descending { n - 1 - i } else { i })
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
        "| model | dtype | attention | test | depth | threads | t/s | peak RSS | state/seq | roofline |"
    );
    let _ = writeln!(s, "|---|---|---|---|--:|--:|--:|--:|--:|--:|");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} | {} | {} |",
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
            row.roofline
                .map_or_else(|| "-".to_string(), |f| format!("{:.0}%", f * 100.0)),
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
