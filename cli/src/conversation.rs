//! `performer loadtest --turns N`: multi-turn conversations against a running server, each turn
//! sent twice, side by side: continued from the stored state through the Responses API
//! (`previous_response_id`, only the new message ingested), and re-sent whole through chat
//! completions (the whole history ingested again). Per turn: the time to first token of both
//! (medians over the conversations), the tokens each ingested, the state bytes of the stored
//! response, and whether both replies are the same text.
//!
//! Replies are greedy and held to exactly `max_tokens` bytes by a grammar (`[a-z ]`), so that
//! a random-weights model writes text (not ids past its byte range, which carry none) and
//! every turn adds the same number of tokens to the conversation in both paths. Each
//! conversation keeps only its latest response, as a chat client does: the one before is
//! deleted once the next is stored.
//!
//! The re-send measures its time to first token and stops there (`max_tokens` 1): the history
//! it sends holds the replies of the Responses path, which greedy decoding makes the replies
//! the re-sends would write (`server/tests/chat.rs` checks it whole); its first piece of text
//! must equal theirs. With `chat_every` > 1 only turns 1, 2 and every `chat_every`-th are
//! re-sent (the others' cost is the same curve, sampled).

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::loadtest::process_rss;

/// What to run.
#[derive(Debug, Clone)]
pub struct ConversationOptions {
    /// Server base URL.
    pub url: String,
    /// Bearer key, if the server wants one.
    pub api_key: Option<String>,
    /// Turns per conversation.
    pub turns: usize,
    /// Conversations at once.
    pub concurrency: usize,
    /// Tokens (bytes) per reply.
    pub max_tokens: usize,
    /// Also re-send each turn whole through chat completions.
    pub compare_chat: bool,
    /// Re-send turns 1, 2 and every this-many-th only (1: every turn).
    pub chat_every: usize,
    /// Server process id, for its RSS after every turn.
    pub server_pid: Option<u32>,
}

/// One turn over all conversations (medians).
#[derive(Debug, Clone, Default)]
pub struct TurnReport {
    /// 1-based.
    pub turn: usize,
    /// Time to first token through `previous_response_id`, ms.
    pub responses_ttft_ms: f64,
    /// Tokens it ingested (`usage.input_tokens`).
    pub responses_input_tokens: f64,
    /// Time to first token of the whole conversation re-sent through chat completions, ms.
    pub chat_ttft_ms: f64,
    /// Tokens it ingested (`usage.prompt_tokens`).
    pub chat_prompt_tokens: f64,
    /// Bytes of the stored response's state (the first conversation's).
    pub state_bytes: u64,
}

/// The run's results.
#[derive(Debug, Clone, Default)]
pub struct ConversationReport {
    /// Conversations at once.
    pub concurrency: usize,
    /// Per turn.
    pub turns: Vec<TurnReport>,
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (HTTP error, error event, broken stream).
    pub failed: usize,
    /// Turns whose re-send began with another text than the continued reply (greedy: none).
    pub mismatched: usize,
    /// Server RSS at the end and its peak, bytes.
    pub rss: Option<(u64, u64)>,
}

struct Client {
    http: reqwest::Client,
    opts: ConversationOptions,
}

/// One turn of one conversation.
#[derive(Default, Clone)]
struct Turn {
    r_ttft: f64,
    r_input: f64,
    c_ttft: f64,
    c_prompt: f64,
    state_bytes: u64,
    same: bool,
}

/// A streamed request's result: time to first text, the text, the final JSON that carries
/// the usage, and the response id (Responses API).
struct Streamed {
    ttft_ms: f64,
    text: String,
    usage: Value,
    id: Option<String>,
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

    /// POSTs a streaming request and reads its events: `responses` picks the event shape.
    async fn stream(&self, path: &str, body: Value, responses: bool) -> Result<Streamed, String> {
        let start = Instant::now();
        let mut resp = self
            .req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("{path}: {status}: {body}"));
        }
        let mut buf = String::new();
        let mut out = Streamed {
            ttft_ms: f64::NAN,
            text: String::new(),
            usage: Value::Null,
            id: None,
        };
        let mut done = false;
        while let Some(bytes) = resp.chunk().await.map_err(|e| e.to_string())? {
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
                let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
                let piece = if responses {
                    match v["type"].as_str().unwrap_or("") {
                        "response.output_text.delta" => v["delta"].as_str().map(String::from),
                        "response.completed" | "response.incomplete" => {
                            out.usage = v["response"]["usage"].clone();
                            out.id = v["response"]["id"].as_str().map(String::from);
                            done = true;
                            None
                        }
                        "response.failed" | "error" => return Err(format!("{path}: {v}")),
                        _ => None,
                    }
                } else {
                    if v.get("error").is_some() {
                        return Err(format!("{path}: {v}"));
                    }
                    if !v["usage"].is_null() {
                        out.usage = v["usage"].clone();
                    }
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(String::from)
                };
                if let Some(p) = piece.filter(|p| !p.is_empty()) {
                    if out.text.is_empty() {
                        out.ttft_ms = start.elapsed().as_secs_f64() * 1e3;
                    }
                    out.text.push_str(&p);
                }
            }
        }
        if !done {
            return Err(format!("{path}: the stream ended early"));
        }
        Ok(out)
    }

    /// One conversation; per turn its measurements, or the first error.
    async fn conversation(&self, which: usize, failed: &mut usize) -> Vec<Option<Turn>> {
        let o = &self.opts;
        let grammar = format!("start: /[a-z ]{{{}}}/", o.max_tokens);
        let mut prev: Option<String> = None;
        let mut history: Vec<Value> = Vec::new();
        let mut turns = Vec::with_capacity(o.turns);
        for k in 1..=o.turns {
            let question = format!("Conversation {which}, question {k}: what happens next?");
            let mut body = json!({
                "input": question, "max_output_tokens": o.max_tokens, "temperature": 0,
                "stream": true, "grammar": grammar,
            });
            if let Some(p) = &prev {
                body["previous_response_id"] = json!(p);
            }
            let r = match self.stream("/v1/responses", body, true).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("performer loadtest: {e}");
                    *failed += 1;
                    turns.push(None);
                    break;
                }
            };
            let mut t = Turn {
                r_ttft: r.ttft_ms,
                r_input: r.usage["input_tokens"].as_f64().unwrap_or(f64::NAN),
                ..Turn::default()
            };
            let id = r.id.clone().unwrap_or_default();
            if which == 0 {
                let v: Option<Value> = match self
                    .req(reqwest::Method::GET, &format!("/v1/sessions/{id}"))
                    .send()
                    .await
                {
                    Ok(resp) => resp.json().await.ok(),
                    Err(_) => None,
                };
                t.state_bytes = v.and_then(|v| v["state_bytes"].as_u64()).unwrap_or(0);
            }
            if let Some(p) = prev.replace(id) {
                let ok = self
                    .req(reqwest::Method::DELETE, &format!("/v1/responses/{p}"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if !ok {
                    *failed += 1;
                }
            }
            history.push(json!({"role": "user", "content": question}));
            let sampled = k <= 2 || k % o.chat_every.max(1) == 0;
            if o.compare_chat && sampled {
                let body = json!({
                    "messages": history, "max_tokens": 1, "temperature": 0,
                    "stream": true, "stream_options": {"include_usage": true},
                    "grammar": grammar,
                });
                match self.stream("/v1/chat/completions", body, false).await {
                    Ok(c) => {
                        t.c_ttft = c.ttft_ms;
                        t.c_prompt = c.usage["prompt_tokens"].as_f64().unwrap_or(f64::NAN);
                        t.same = !c.text.is_empty() && r.text.starts_with(&c.text);
                    }
                    Err(e) => {
                        eprintln!("performer loadtest: {e}");
                        *failed += 1;
                    }
                }
            } else {
                t.same = true;
                t.c_ttft = f64::NAN;
                t.c_prompt = f64::NAN;
            }
            history.push(json!({"role": "assistant", "content": r.text}));
            turns.push(Some(t));
        }
        if let Some(p) = prev {
            let _ = self
                .req(reqwest::Method::DELETE, &format!("/v1/responses/{p}"))
                .send()
                .await;
        }
        turns
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Runs `concurrency` conversations of `turns` turns at once.
pub async fn run(opts: ConversationOptions) -> Result<ConversationReport, String> {
    if opts.turns == 0 || opts.concurrency == 0 || opts.max_tokens == 0 {
        return Err("turns, concurrency and max tokens must be at least 1".into());
    }
    let client = std::sync::Arc::new(Client {
        http: reqwest::Client::new(),
        opts: opts.clone(),
    });
    let mut tasks = Vec::new();
    for which in 0..opts.concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut failed = 0;
            let turns = client.conversation(which, &mut failed).await;
            (turns, failed)
        }));
    }
    let mut per_turn: Vec<Vec<Turn>> = vec![Vec::new(); opts.turns];
    let mut report = ConversationReport {
        concurrency: opts.concurrency,
        ..ConversationReport::default()
    };
    let chat_every = opts.chat_every.max(1);
    for t in tasks {
        let (turns, failed) = t.await.map_err(|e| e.to_string())?;
        report.failed += failed;
        report.requests += turns.len();
        if opts.compare_chat {
            report.requests += (1..=turns.len())
                .filter(|&k| k <= 2 || k % chat_every == 0)
                .count();
        }
        for (k, t) in turns.into_iter().enumerate() {
            if let Some(t) = t {
                report.mismatched += usize::from(!t.same);
                per_turn[k].push(t);
            }
        }
    }
    report.rss = opts.server_pid.and_then(process_rss);
    for (k, ts) in per_turn.into_iter().enumerate() {
        report.turns.push(TurnReport {
            turn: k + 1,
            responses_ttft_ms: median(ts.iter().map(|t| t.r_ttft).collect()),
            responses_input_tokens: median(ts.iter().map(|t| t.r_input).collect()),
            chat_ttft_ms: median(ts.iter().map(|t| t.c_ttft).collect()),
            chat_prompt_tokens: median(ts.iter().map(|t| t.c_prompt).collect()),
            state_bytes: ts.iter().map(|t| t.state_bytes).max().unwrap_or(0),
        });
    }
    Ok(report)
}

/// The per-turn table and a summary line (TTFT of the last turn over turn 2, both paths).
pub fn markdown(r: &ConversationReport) -> String {
    let mut out = String::from(
        "| turn | responses TTFT ms | tokens ingested | chat completions TTFT ms | tokens ingested | stored state bytes |\n\
         |---|---|---|---|---|---|\n",
    );
    let num = |x: f64, digits: usize| {
        if x.is_finite() {
            format!("{x:.digits$}")
        } else {
            "–".into()
        }
    };
    for t in &r.turns {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            t.turn,
            num(t.responses_ttft_ms, 1),
            num(t.responses_input_tokens, 0),
            num(t.chat_ttft_ms, 1),
            num(t.chat_prompt_tokens, 0),
            t.state_bytes
        );
    }
    if let (Some(second), Some(last)) = (r.turns.get(1), r.turns.last()) {
        out += &format!(
            "\n{} conversations at once, {} requests, {} failed, {} re-sends whose text differs. \
             TTFT of turn {} / turn 2: responses {:.2}x, chat completions {:.2}x.\n",
            r.concurrency,
            r.requests,
            r.failed,
            r.mismatched,
            last.turn,
            last.responses_ttft_ms / second.responses_ttft_ms,
            last.chat_ttft_ms / second.chat_ttft_ms,
        );
    }
    if let Some((now, peak)) = r.rss {
        out += &format!(
            "Server RSS at the end {:.1} MiB (peak {:.1} MiB).\n",
            now as f64 / 1048576.0,
            peak as f64 / 1048576.0
        );
    }
    out
}

/// Both TTFT curves by turn, as an SVG file.
pub fn svg(r: &ConversationReport, title: &str, path: &Path) -> Result<(), String> {
    let mut s = String::new();
    plot(r, title, &mut s).map_err(|e| e.to_string())?;
    performer::fsutil::write_atomic(path, |w| std::io::Write::write_all(w, s.as_bytes()))
        .map_err(|e| e.to_string())
}

fn plot(
    r: &ConversationReport,
    title: &str,
    svg: &mut String,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::HACK_REGULAR,
    )
    .map_err(|_| "the embedded font does not parse")?;
    let series = [
        (
            "previous_response_id (new message only)",
            r.turns
                .iter()
                .map(|t| (t.turn as f64, t.responses_ttft_ms))
                .collect::<Vec<_>>(),
        ),
        (
            "chat completions (whole conversation)",
            r.turns
                .iter()
                .map(|t| (t.turn as f64, t.chat_ttft_ms))
                .collect::<Vec<_>>(),
        ),
    ];
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .filter(|y| y.is_finite())
        .fold(1e-3f64, f64::max)
        * 1.15;
    let x_max = r.turns.len().max(2) as f64;
    let root = SVGBackend::with_string(svg, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(1f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("turn")
        .y_desc("time to first token, ms (median)")
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled())))?;
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
