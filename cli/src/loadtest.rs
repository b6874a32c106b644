//! `performer loadtest`: concurrent streaming completions against a running server, measuring
//! aggregate generated tokens/s, time to first token, inter-token latency, errors and the
//! server's resident memory.
//!
//! Each of C workers sends streaming requests back to back for a fixed duration. Time to first
//! token runs from sending the request to the first chunk carrying a token (requests ask for
//! `logprobs: 0`, so every token's chunk counts, with or without text); inter-token latency
//! is the gap between consecutive such chunks (one token each, but for text held back by
//! UTF-8 or stop strings, which merges tokens). Tokens are counted from the usage chunk.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Server base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Concurrency levels.
    pub concurrency: Vec<usize>,
    /// How long each level runs.
    pub duration: Duration,
    /// Tokens per request.
    pub max_tokens: usize,
    /// The prompt.
    pub prompt: String,
    /// Bearer key, if the server wants one.
    pub api_key: Option<String>,
    /// With a depth: every worker runs on its own fork of a session pre-filled with this many
    /// tokens.
    pub depth: usize,
    /// Server process id, for its RSS.
    pub server_pid: Option<u32>,
}

/// One level's results.
#[derive(Debug, Clone, Default)]
pub struct LevelReport {
    /// Concurrent workers.
    pub concurrency: usize,
    /// Requests completed.
    pub requests: usize,
    /// Requests that failed (HTTP error, error chunk, broken stream).
    pub errors: usize,
    /// Generated tokens per second over the level.
    pub tokens_per_s: f64,
    /// Time to first token, p50 and p99, in ms.
    pub ttft_ms: (f64, f64),
    /// Inter-token latency, p50 and p99, in ms.
    pub itl_ms: (f64, f64),
    /// Server RSS after the level and its peak so far, in bytes.
    pub rss: Option<(u64, u64)>,
}

#[derive(Default)]
struct Worker {
    requests: usize,
    errors: usize,
    tokens: usize,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    xs[i]
}

/// VmRSS and VmHWM of a process, in bytes.
pub fn process_rss(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

struct Client {
    http: reqwest::Client,
    opts: LoadOptions,
}

impl Client {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}{path}", self.opts.url));
        match &self.opts.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn new_session(&self, body: Value, path: &str) -> Result<String, String> {
        let r = self
            .req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("{path}: {}", r.status()));
        }
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        v["id"].as_str().map(String::from).ok_or("no id".into())
    }

    /// One streaming request; adds its measurements to `w`.
    async fn one(&self, path: &str, w: &mut Worker) {
        let body = json!({
            "prompt": self.opts.prompt, "max_tokens": self.opts.max_tokens,
            "temperature": 0.8, "top_k": 40, "stream": true, "logprobs": 0,
            "stream_options": {"include_usage": true},
        });
        let start = Instant::now();
        let resp = self
            .req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await;
        let mut resp = match resp {
            Ok(r) if r.status().is_success() => r,
            _ => {
                w.errors += 1;
                return;
            }
        };
        let mut buf = String::new();
        let mut last: Option<Instant> = None;
        let mut tokens = None;
        let mut failed = false;
        let mut done = false;
        while let Ok(Some(bytes)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(i) = buf.find("\n\n") {
                let event: String = buf.drain(..i + 2).collect();
                let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    failed = true;
                    continue;
                };
                if v.get("error").is_some() {
                    failed = true;
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = Some(n as usize);
                }
                // A chunk carries tokens when it has text or logprobs (asked for with
                // `logprobs: 0`, so that tokens without text, e.g. ids past the bytes of a
                // large vocabulary, are timed too).
                let has_text = v["choices"].as_array().is_some_and(|c| {
                    c.iter().any(|c| {
                        c["text"].as_str().is_some_and(|t| !t.is_empty())
                            || !c["logprobs"].is_null()
                    })
                });
                if has_text {
                    let now = Instant::now();
                    match last {
                        None => w.ttft.push((now - start).as_secs_f64() * 1e3),
                        Some(t) => w.itl.push((now - t).as_secs_f64() * 1e3),
                    }
                    last = Some(now);
                }
            }
        }
        match (failed, done, tokens) {
            (false, true, Some(n)) => {
                w.requests += 1;
                w.tokens += n;
            }
            _ => w.errors += 1,
        }
    }
}

/// Runs every level in turn.
pub async fn run(opts: LoadOptions) -> Result<Vec<LevelReport>, String> {
    let client = std::sync::Arc::new(Client {
        http: reqwest::Client::new(),
        opts: opts.clone(),
    });
    let base = if opts.depth > 0 {
        // Printable pseudo-random bytes as the pre-fill.
        let mut s = 0x1234_5678u64;
        let text: String = (0..opts.depth)
            .map(|_| (b' ' + (performer::sampling::splitmix64(&mut s) % 95) as u8) as char)
            .collect();
        Some(
            client
                .new_session(json!({"prompt": text}), "/v1/sessions")
                .await?,
        )
    } else {
        None
    };
    let mut reports = Vec::new();
    for &c in &opts.concurrency {
        let deadline = Instant::now() + opts.duration;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..c {
            let client = client.clone();
            let base = base.clone();
            tasks.push(tokio::spawn(async move {
                let mut w = Worker::default();
                let path = match &base {
                    Some(b) => match client
                        .new_session(json!({}), &format!("/v1/sessions/{b}/fork"))
                        .await
                    {
                        Ok(id) => format!("/v1/sessions/{id}/completions"),
                        Err(_) => {
                            w.errors += 1;
                            return w;
                        }
                    },
                    None => "/v1/completions".to_string(),
                };
                while Instant::now() < deadline {
                    client.one(&path, &mut w).await;
                }
                w
            }));
        }
        let mut all = Worker::default();
        for t in tasks {
            let w = t.await.map_err(|e| e.to_string())?;
            all.requests += w.requests;
            all.errors += w.errors;
            all.tokens += w.tokens;
            all.ttft.extend(w.ttft);
            all.itl.extend(w.itl);
        }
        let secs = start.elapsed().as_secs_f64();
        reports.push(LevelReport {
            concurrency: c,
            requests: all.requests,
            errors: all.errors,
            tokens_per_s: all.tokens as f64 / secs,
            ttft_ms: (
                percentile(&mut all.ttft, 0.5),
                percentile(&mut all.ttft, 0.99),
            ),
            itl_ms: (
                percentile(&mut all.itl, 0.5),
                percentile(&mut all.itl, 0.99),
            ),
            rss: opts.server_pid.and_then(process_rss),
        });
    }
    Ok(reports)
}

/// The markdown table.
pub fn markdown(reports: &[LevelReport]) -> String {
    let mut out = String::from(
        "| concurrency | requests | errors | aggregate t/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | server RSS (peak) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let rss = r.rss.map_or("–".into(), |(now, peak)| {
            format!(
                "{:.1} MiB ({:.1})",
                now as f64 / 1048576.0,
                peak as f64 / 1048576.0
            )
        });
        out += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {rss} |\n",
            r.concurrency,
            r.requests,
            r.errors,
            r.tokens_per_s,
            r.ttft_ms.0,
            r.ttft_ms.1,
            r.itl_ms.0,
            r.itl_ms.1
        );
    }
    out
}
