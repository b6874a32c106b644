//! Prometheus metrics: the engine's observations, HTTP requests by route and status, and
//! gauges read from the engine at scrape time.

use std::time::Duration;

use performer_engine::{EngineStats, Observer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route.
    pub route: String,
    /// The HTTP status.
    pub status: u16,
}

/// Labels of the rejection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// Why: `queue_full`, `session_busy`, `unauthorized`, `too_large`, `invalid`.
    pub reason: String,
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Rejected requests by reason.
    pub rejected: Family<RejectLabels, Counter>,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    batch: Histogram,
    running: Gauge,
    queued: Gauge,
    sessions_memory: Gauge,
    sessions_disk: Gauge,
    session_memory_bytes: Gauge,
    session_disk_bytes: Gauge,
    prefix_hits: Counter,
    prefix_misses: Counter,
    prefix_cached_tokens: Counter,
    prefix_bytes: Gauge,
    prefix_entries: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("performer");
        let m = Metrics {
            requests: Family::default(),
            rejected: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            ttft: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            itl: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            batch: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            running: Gauge::default(),
            queued: Gauge::default(),
            sessions_memory: Gauge::default(),
            sessions_disk: Gauge::default(),
            session_memory_bytes: Gauge::default(),
            session_disk_bytes: Gauge::default(),
            prefix_hits: Counter::default(),
            prefix_misses: Counter::default(),
            prefix_cached_tokens: Counter::default(),
            prefix_bytes: Gauge::default(),
            prefix_entries: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests rejected (queue full, busy session, auth, size, invalid)",
            m.rejected.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens ingested",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens sampled",
            m.generated_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from submission to the first sampled token",
            m.ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of one choice",
            m.itl.clone(),
        );
        registry.register(
            "batch_size",
            "Generations stepped together per tick",
            m.batch.clone(),
        );
        registry.register(
            "running_generations",
            "Generations being prefilled or decoded",
            m.running.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a batch slot",
            m.queued.clone(),
        );
        registry.register(
            "sessions_in_memory",
            "Sessions whose state is in memory",
            m.sessions_memory.clone(),
        );
        registry.register(
            "sessions_on_disk",
            "Sessions only in the session directory",
            m.sessions_disk.clone(),
        );
        registry.register(
            "session_memory_bytes",
            "Bytes of session states in memory",
            m.session_memory_bytes.clone(),
        );
        registry.register(
            "session_disk_bytes",
            "Bytes (in memory) of the sessions on disk",
            m.session_disk_bytes.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Prompts that resumed from a state of the prefix cache",
            m.prefix_hits.clone(),
        );
        registry.register(
            "prefix_cache_misses",
            "Prompts looked up in the prefix cache without a state to resume from",
            m.prefix_misses.clone(),
        );
        registry.register(
            "prefix_cache_tokens",
            "Prompt tokens not ingested because the prefix cache held them",
            m.prefix_cached_tokens.clone(),
        );
        registry.register(
            "prefix_cache_bytes",
            "Bytes of the prefix cache's states and prefixes",
            m.prefix_bytes.clone(),
        );
        registry.register(
            "prefix_cache_entries",
            "States in the prefix cache",
            m.prefix_entries.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a rejected request.
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&RejectLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The text exposition, after reading the engine's gauges.
    pub fn render(&self, stats: &EngineStats) -> String {
        self.running.set(stats.running as i64);
        self.queued.set(stats.queued as i64);
        self.sessions_memory.set(stats.sessions.in_memory as i64);
        self.sessions_disk.set(stats.sessions.on_disk as i64);
        self.session_memory_bytes
            .set(stats.sessions.memory_bytes as i64);
        self.session_disk_bytes
            .set(stats.sessions.disk_bytes as i64);
        self.prefix_bytes.set(stats.prefix_cache.bytes as i64);
        self.prefix_entries.set(stats.prefix_cache.entries as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Observer for Metrics {
    fn batch(&self, rows: usize) {
        self.batch.observe(rows as f64);
    }
    fn first_token(&self, latency: Duration) {
        self.ttft.observe(latency.as_secs_f64());
    }
    fn inter_token(&self, gap: Duration) {
        self.itl.observe(gap.as_secs_f64());
    }
    fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.inc_by(n as u64);
    }
    fn generated_tokens(&self, n: usize) {
        self.generated_tokens.inc_by(n as u64);
    }
    fn prefix_lookup(&self, cached_tokens: usize) {
        if cached_tokens > 0 {
            self.prefix_hits.inc();
            self.prefix_cached_tokens.inc_by(cached_tokens as u64);
        } else {
            self.prefix_misses.inc();
        }
    }
}
