//! The prefix-state cache over HTTP: `usage.prompt_tokens_details.cached_tokens` on
//! `/v1/completions` (JSON and the streamed usage chunk), the text unchanged by a hit, and the
//! cache's hits, misses, tokens, entries and bytes in `/metrics`.

mod common;
use common::{generate_text, sse_data, tiny, Server};

use std::sync::Arc;

use performer::Model;
use performer_engine::{Engine, EngineConfig};
use performer_server::{Metrics, ServerOptions};
use serde_json::{json, Value};

async fn start(model: Arc<Model>, prefix_cache_memory: usize) -> Server {
    let cfg = EngineConfig {
        threads: 2,
        prefill_chunk: 256,
        prefix_cache_memory,
        ..EngineConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let engine =
        Arc::new(Engine::start_with_observer(model, cfg, None, Some(metrics.clone())).unwrap());
    Server::serve(engine, metrics, ServerOptions::default()).await
}

/// The value of a metric (a line `NAME VALUE`) in a metrics text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// ASCII text of `n` bytes (one token each for the byte-level tokenizer).
fn text(seed: u64, n: usize) -> String {
    let mut s = seed;
    (0..n)
        .map(|_| (b'a' + (performer::sampling::splitmix64(&mut s) % 26) as u8) as char)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tokens_are_reported_and_counted() {
    let (_dir, model) = tiny();
    let s = start(model.clone(), 256 << 20).await;
    let head = text(1, 520);
    let complete = |prompt: String| {
        let s = &s;
        async move {
            s.post_json(
                "/v1/completions",
                json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
            )
            .await
        }
    };
    // Slices end at 256, 512 and the prompt's end: the second prompt resumes at 512.
    let first = format!("{head}{}", text(2, 80));
    let v = complete(first.clone()).await;
    assert_eq!(v["usage"]["prompt_tokens"], 600, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(v["choices"][0]["text"], generate_text(&model, &first, 12));
    let second = format!("{head}{}", text(3, 100));
    let v = complete(second.clone()).await;
    assert_eq!(v["usage"]["prompt_tokens"], 620);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 512);
    assert_eq!(v["usage"]["total_tokens"], 632);
    assert_eq!(
        v["choices"][0]["text"],
        generate_text(&model, &second, 12),
        "a resumed prompt continues as the whole prompt does"
    );

    // Streamed: the usage chunk reports it too.
    let third = format!("{head}{}", text(4, 90));
    let r = s
        .post(
            "/v1/completions",
            json!({"prompt": third, "max_tokens": 12, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
        )
        .await;
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], 610, "{usage}");
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 512);
    let streamed: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .filter_map(|c| c["text"].as_str())
        .collect();
    assert_eq!(streamed, generate_text(&model, &third, 12));

    let m = s.metrics().await;
    assert_eq!(metric(&m, "performer_prefix_cache_hits_total"), 2, "{m}");
    assert_eq!(metric(&m, "performer_prefix_cache_misses_total"), 1);
    assert_eq!(metric(&m, "performer_prefix_cache_tokens_total"), 1024);
    // The first prompt left 256, 512 and 600; each later one its own end.
    assert_eq!(metric(&m, "performer_prefix_cache_entries"), 5);
    let stats = s.engine.stats().prefix_cache;
    assert_eq!(
        metric(&m, "performer_prefix_cache_bytes"),
        stats.bytes as u64
    );
    let state = performer::State::new(&model).size_bytes();
    assert!(
        stats.bytes > 5 * state && stats.bytes <= stats.budget,
        "{stats:?}"
    );
    // Only the tokens past the cached heads were ingested.
    assert_eq!(
        metric(&m, "performer_prompt_tokens_total"),
        600 + (620 - 512) + (610 - 512)
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_cache_reports_zero_cached_tokens() {
    let (_dir, model) = tiny();
    let s = start(model, 0).await;
    let prompt = text(5, 600);
    for _ in 0..2 {
        let v = s
            .post_json(
                "/v1/completions",
                json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
            )
            .await;
        assert_eq!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "{v}"
        );
    }
    let m = s.metrics().await;
    assert_eq!(metric(&m, "performer_prefix_cache_hits_total"), 0);
    assert_eq!(metric(&m, "performer_prefix_cache_misses_total"), 0);
    assert_eq!(metric(&m, "performer_prefix_cache_entries"), 0);
    assert_eq!(metric(&m, "performer_prefix_cache_bytes"), 0);
    assert_eq!(metric(&m, "performer_prompt_tokens_total"), 1200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_responses_report_the_cached_head_of_a_shared_system_prompt() {
    let (_dir, model) = tiny();
    let s = start(model.clone(), 256 << 20).await;
    // A long system prompt shared by every request: its rendered head (the template's
    // plain role lines) ends past the 256- and 512-token slice boundaries.
    let system = text(7, 600);
    let chat = |question: String| {
        let (s, system) = (&s, system.clone());
        async move {
            s.post_json(
                "/v1/chat/completions",
                json!({"messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": question}],
                       "max_tokens": 4, "temperature": 0}),
            )
            .await
        }
    };
    let v = chat("one".into()).await;
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{v}"
    );
    let v = chat("two".into()).await;
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 512,
        "{v}"
    );
    // The Responses API: instructions render as the same system head.
    let respond = |input: &str| {
        let (s, system, input) = (&s, system.clone(), input.to_string());
        async move {
            s.post_json(
                "/v1/responses",
                json!({"instructions": system, "input": input, "max_output_tokens": 4,
                       "temperature": 0, "store": false}),
            )
            .await
        }
    };
    let v = respond("three").await;
    let cached = v["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(cached, 512, "{v}");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > cached);
}
