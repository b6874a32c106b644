//! How `performer bench` measures: statistics of repeated timings, the memory read bandwidth
//! and the process's memory, and the tests themselves ([`Runner`]: `pp`, depth fills, `tg`
//! at interleaved depths or in place).

use std::io::IsTerminal;
use std::time::Instant;

use serde::Serialize;

use performer::error::{Error, Result};
use performer::synthetic::Rng;
use performer::Model;

use super::models::{new_session, Attention, Session};
use super::report::{format_count, Fill, Row, Skipped, TestKind};

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
pub(crate) fn read_bandwidth_passes(bytes: usize, passes: usize, threads: usize) -> Vec<f64> {
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

/// The progress bar on stderr (hidden when stderr is not a terminal or it is not wanted).
pub(crate) struct Progress {
    pub(crate) bar: indicatif::ProgressBar,
}

impl Progress {
    pub(crate) fn new(show: bool, total: u64) -> Self {
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

pub(crate) fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid("threads", format!("cannot start {threads} threads: {e}")))
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

/// What the tests of a run share: the model, the repetitions, the thread pools, the progress
/// bar and the random tokens (drawn in the order the tests run, so a seed gives the same
/// tokens to the same test).
pub(crate) struct Runner<'m> {
    pub model: &'m Model,
    pub reps: usize,
    /// One pool per thread count, with its count.
    pub pools: &'m [(usize, rayon::ThreadPool)],
    /// The measuring pool with the most threads, where depth fills run (not a pool of their
    /// own: a fresh pool's threads would bring their own allocator arenas and gemm buffers,
    /// and the peak RSS of later rows would count that scratch as if depth cost memory).
    pub fill_pool: (usize, &'m rayon::ThreadPool),
    pub progress: &'m Progress,
    pub rng: Rng,
}

/// A session of the model under test.
type Boxed<'m> = Box<dyn Session<'m> + 'm>;

impl<'m> Runner<'m> {
    /// `pp n` on one pool: a fresh session per repetition, after an untimed warm-up.
    pub fn pp(
        &mut self,
        attention: Attention,
        n: usize,
        threads: usize,
        pool: &rayon::ThreadPool,
    ) -> Result<Row> {
        let (model, reps, progress) = (self.model, self.reps, self.progress);
        let (rng, vocab) = (&mut self.rng, model.vocab_size());
        progress
            .bar
            .set_message(format!("{attention} pp{n} t{threads}"));
        pool.install(|| -> Result<Row> {
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
                threads,
                tokens_per_s: Stats::of(&samples),
                samples,
                peak_rss_bytes: peak_rss_bytes(),
                state_bytes,
                roofline: None,
                state_traffic_bytes: 0,
                roofline_with_state: None,
            })
        })
    }

    /// Brings `base` from depth `from` to `depth` by prefilling random tokens on the fill
    /// pool, in pieces (so the progress bar moves); the fill is timed and reported, not a test.
    fn fill(
        &mut self,
        base: &mut Boxed<'m>,
        attention: Attention,
        from: usize,
        depth: usize,
    ) -> Result<Fill> {
        let (progress, vocab, rng) = (self.progress, self.model.vocab_size(), &mut self.rng);
        let (fill_threads, fill_pool) = self.fill_pool;
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
    }

    /// `tg` for a session that can fork: a copy of it at every depth, then the depths
    /// interleaved repetition by repetition, so that a machine's drifting speed (shared cores,
    /// clocks) falls on every depth alike and the depth columns compare side by side. Rows by
    /// depth, then by tg size and threads.
    pub fn tg_interleaved(
        &mut self,
        attention: Attention,
        mut base: Boxed<'m>,
        depths: &[usize],
        tg: &[usize],
        fills: &mut Vec<Fill>,
    ) -> Result<Vec<Row>> {
        let mut at = 0;
        let mut at_depth = Vec::with_capacity(depths.len());
        for &depth in depths {
            if depth > at {
                fills.push(self.fill(&mut base, attention, at, depth)?);
                at = depth;
            }
            at_depth.push(base.fork().expect("forkable"));
        }
        let mut rows = Vec::new();
        for &n in tg {
            for (threads, pool) in self.pools {
                self.progress
                    .bar
                    .set_message(format!("{attention} tg{n} t{threads}, depths interleaved"));
                rows.extend(self.tg_at_depths(attention, n, *threads, pool, depths, &at_depth)?);
            }
        }
        rows.sort_by_key(|r| r.depth);
        Ok(rows)
    }

    /// `tg n` on one pool from each of the sessions `at_depth` (one per depth of `depths`).
    fn tg_at_depths(
        &mut self,
        attention: Attention,
        n: usize,
        threads: usize,
        pool: &rayon::ThreadPool,
        depths: &[usize],
        at_depth: &[Boxed<'m>],
    ) -> Result<Vec<Row>> {
        let (reps, progress) = (self.reps, self.progress);
        let (rng, vocab) = (&mut self.rng, self.model.vocab_size());
        pool.install(|| -> Result<Vec<Row>> {
            // The warm-up ingests its tokens as a (two-token) prompt and then steps, as every
            // real generation does: at depth 0 too the prefill path's one-time per-thread
            // buffers (gemm's L2 slab per thread) then exist, as they do after a depth fill.
            let warm_tokens = rng.tokens(2, vocab);
            for snapshot in at_depth {
                let mut warm = snapshot.fork().expect("forkable");
                warm.prefill(&warm_tokens)?;
                for &t in &warm_tokens {
                    warm.step(t)?;
                }
            }
            let mut samples = vec![Vec::with_capacity(reps); depths.len()];
            let mut peaks: Vec<Option<u64>> = vec![None; depths.len()];
            let mut state_bytes = vec![0; depths.len()];
            // A forkable session's state does not grow: its traffic at the start is every
            // token's.
            let traffic: Vec<usize> = at_depth.iter().map(|s| s.state_traffic_bytes()).collect();
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
            Ok(depths
                .iter()
                .enumerate()
                .map(|(i, &depth)| Row {
                    attention,
                    test: TestKind::Tg,
                    tokens: n,
                    depth,
                    threads,
                    tokens_per_s: Stats::of(&samples[i]),
                    samples: std::mem::take(&mut samples[i]),
                    peak_rss_bytes: peaks[i],
                    state_bytes: state_bytes[i],
                    roofline: None,
                    state_traffic_bytes: traffic[i],
                    roofline_with_state: None,
                })
                .collect())
        })
    }

    /// `tg` for a session that cannot fork (the softmax baseline): one session stepped
    /// through the depths in ascending order, each depth's tests run back to back on it. A
    /// depth whose growth would not fit in `memory_budget` (default: 80% of the memory the
    /// kernel reports available) is skipped with every larger one, and reported.
    #[allow(clippy::too_many_arguments)]
    pub fn tg_sequential(
        &mut self,
        attention: Attention,
        mut base: Boxed<'m>,
        depths: &[usize],
        tg: &[usize],
        memory_budget: Option<u64>,
        fills: &mut Vec<Fill>,
        skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Row>> {
        let reps = self.reps;
        // Tokens one depth's tests add on top of the depth (warm-up and repetitions, per tg
        // size and thread count).
        let per_depth: usize = self.pools.len() * tg.iter().map(|&n| 2 + reps * n).sum::<usize>();
        let grow = base.bytes_per_token() as u64;
        // Bytes the state grows by from position `at` to `depth` and that depth's tests.
        let needed =
            |depth: usize, at: usize| grow.saturating_mul((depth.max(at) - at + per_depth) as u64);
        let mut at = 0usize;
        let mut rows = Vec::new();
        for (i, &depth) in depths.iter().enumerate() {
            let budget = memory_budget.or_else(|| available_memory_bytes().map(|b| b / 10 * 8));
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
                fills.push(self.fill(&mut base, attention, at, depth)?);
                at = depth;
            }
            for &n in tg {
                for (threads, pool) in self.pools {
                    self.progress.bar.set_message(format!(
                        "{attention} tg{n} @ d{} t{threads}",
                        format_count(depth)
                    ));
                    rows.push(
                        self.tg_in_place(attention, &mut base, &mut at, n, *threads, depth, pool)?,
                    );
                }
            }
        }
        Ok(rows)
    }

    /// `tg n` at `depth` on one pool, stepping `base` itself (at position `at`) onwards.
    #[allow(clippy::too_many_arguments)]
    fn tg_in_place(
        &mut self,
        attention: Attention,
        base: &mut Boxed<'m>,
        at: &mut usize,
        n: usize,
        threads: usize,
        depth: usize,
        pool: &rayon::ThreadPool,
    ) -> Result<Row> {
        let (reps, progress) = (self.reps, self.progress);
        let (rng, vocab) = (&mut self.rng, self.model.vocab_size());
        pool.install(|| -> Result<Row> {
            let warm_tokens = rng.tokens(2, vocab);
            for &t in &warm_tokens {
                base.step(t)?;
            }
            *at += warm_tokens.len();
            reset_peak_rss();
            let mut samples = Vec::with_capacity(reps);
            let mut state_bytes = base.state_bytes();
            // A growing cache moves more bytes with every token: each repetition counts the
            // mean of its first and last token's traffic.
            let mut traffic = 0f64;
            for _ in 0..reps {
                let tokens = rng.tokens(n, vocab);
                // The first token reads the cache with its own entry, the last the whole.
                let first = base.state_traffic_bytes() + base.bytes_per_token();
                let start = Instant::now();
                for &t in &tokens {
                    base.step(t)?;
                }
                let secs = start.elapsed().as_secs_f64();
                *at += n;
                let last = base.state_traffic_bytes();
                traffic += (first + last) as f64 / 2.0 / reps as f64;
                samples.push(n as f64 / secs.max(1e-12));
                state_bytes = state_bytes.max(base.state_bytes());
                progress.bar.inc(1);
            }
            Ok(Row {
                attention,
                test: TestKind::Tg,
                tokens: n,
                depth,
                threads,
                tokens_per_s: Stats::of(&samples),
                samples,
                peak_rss_bytes: peak_rss_bytes(),
                state_bytes,
                roofline: None,
                state_traffic_bytes: traffic.round() as usize,
                roofline_with_state: None,
            })
        })
    }
}
