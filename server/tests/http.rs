//! The server in-process on an ephemeral 127.0.0.1 port, driven by a real HTTP client: every
//! route and error case, SSE streaming, cancellation on disconnect, 429, 409, tenants, and a
//! restart that serves the sessions again.

mod common;
use common::{assert_error, generate_text, root, shipped, sse_data, tiny, Server};

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use performer::generate::{GenerateOptions, Generation};
use performer::{Model, SamplingParams, State};
use performer_engine::{DiskStore, Engine, EngineConfig, SessionStore};
use performer_server::{Metrics, ServerOptions};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

impl Server {
    async fn start(
        model: Arc<Model>,
        cfg: EngineConfig,
        dir: Option<&Path>,
        keys: Option<Vec<String>>,
    ) -> Server {
        let store = dir.map(|d| Box::new(DiskStore::open(d).unwrap()) as Box<dyn SessionStore>);
        let metrics = Arc::new(Metrics::new());
        let engine = Arc::new(
            Engine::start_with_observer(model, cfg, store, Some(metrics.clone())).unwrap(),
        );
        let options = ServerOptions {
            model_id: "performer-byte".into(),
            api_keys: keys,
            max_body_bytes: 64 << 10,
            grace: Duration::from_secs(2),
            ..ServerOptions::default()
        };
        Server::serve(engine, metrics, options).await
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        threads: 2,
        max_tokens: 1 << 20,
        ..EngineConfig::default()
    }
}

/// The value of the `performer_prompt_tokens_total` counter in a metrics text.
fn prompt_tokens_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("performer_prompt_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no performer_prompt_tokens_total in {metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_health_models_metrics_and_errors() {
    let model = shipped();
    let s = Server::start(model.clone(), config(), None, None).await;
    let h: Value = s
        .http
        .get(s.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h, json!({"status": "ok"}));
    let m: Value = s
        .http
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "performer-byte");
    let page = s.http.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("performer playground"));

    // Non-streaming, greedy: the text of `performer generate`; unknown fields ignored.
    let want = generate_text(&model, "The sea", 20);
    let r = s
        .post(
            "/v1/completions",
            json!({"prompt": "The sea", "max_tokens": 20, "temperature": 0,
            "model": "whatever", "user": "x", "frequency_penalty": 0}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "performer-byte");
    assert!(v["created"].as_u64().unwrap() > 0);
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    assert_eq!(v["usage"]["completion_tokens"], 20);
    assert_eq!(v["usage"]["total_tokens"], 27);

    // Streaming with include_usage: chunks, a usage chunk with no choices, then [DONE].
    let r = s
        .post(
            "/v1/completions",
            json!({"prompt": "The sea", "max_tokens": 20, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .filter_map(|c| c["text"].as_str())
        .collect();
    assert_eq!(text, want);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 20);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));

    // Stop strings, n, logprobs.
    let stop = want[5..8].to_string();
    let v: Value = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "The sea", "max_tokens": 20,
        "temperature": 0, "stop": [stop]}),
        )
        .await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["text"], &want[..want.find(&stop).unwrap()]);
    let prompt_before = prompt_tokens_total(&s.metrics().await);
    // A prompt not sent before (the prefix cache would resume a repeated one whole).
    let v: Value = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "A storm", "max_tokens": 8,
        "n": 3, "seed": 5, "logprobs": 2}),
        )
        .await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert_eq!(
        v["usage"]["prompt_tokens"], 7,
        "one prefill for all choices"
    );
    // The counter of ingested prompt tokens proves it: 7 more, not 3 × 7.
    assert_eq!(
        prompt_tokens_total(&s.metrics().await) - prompt_before,
        7,
        "one prefill for all choices"
    );
    let lp = &v["choices"][1]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 8);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);

    // Errors: malformed JSON, wrong types, out-of-range values, caps, unknown routes.
    let r = s
        .http
        .post(s.url("/v1/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "invalid_json").await;
    assert_error(
        s.post("/v1/completions", json!({"prompt": 5})).await,
        StatusCode::BAD_REQUEST,
        "invalid_type",
    )
    .await;
    assert_error(
        s.post(
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": "many"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_type",
    )
    .await;
    assert_error(
        s.post("/v1/completions", json!({"prompt": "x", "temperature": -1}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    )
    .await;
    assert_error(
        s.post("/v1/completions", json!({"prompt": "x", "logprobs": 9}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    )
    .await;
    // top_p outside (0, 1] on either side (1 itself means no nucleus cut, and is served).
    for top_p in [0.0, 1.5] {
        assert_error(
            s.post("/v1/completions", json!({"prompt": "x", "top_p": top_p}))
                .await,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        )
        .await;
    }
    let ok = s
        .post(
            "/v1/completions",
            json!({"prompt": "x", "top_p": 1.0, "max_tokens": 1}),
        )
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_error(
        s.post("/v1/completions", json!({"prompt": ""})).await,
        StatusCode::BAD_REQUEST,
        "empty_input",
    )
    .await;
    assert_error(
        s.post(
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 2_000_000}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    )
    .await;
    assert_error(
        s.post("/v1/completions", json!({"prompt": "x".repeat(70_000)}))
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;
    assert_error(
        s.http.get(s.url("/v2/nothing")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "unknown_route",
    )
    .await;
    // Still serving after all that.
    assert_eq!(
        s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2}))
            .await
            .status(),
        200
    );

    let metrics = s.metrics().await;
    for name in [
        "performer_http_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "performer_http_requests_total{route=\"/v1/completions\",status=\"400\"}",
        "performer_running_generations",
        "performer_queued_requests",
        "performer_sessions_in_memory",
        "performer_sessions_on_disk",
        "performer_session_memory_bytes",
        "performer_session_disk_bytes",
        "performer_prompt_tokens_total",
        "performer_generated_tokens_total",
        "performer_time_to_first_token_seconds_bucket",
        "performer_inter_token_latency_seconds_bucket",
        "performer_batch_size_bucket",
        "performer_rejected_requests_total{reason=\"invalid\"}",
        "performer_rejected_requests_total{reason=\"too_large\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_tenant_isolation() {
    let keys = Some(vec!["key-a".to_string(), "key-b".to_string()]);
    let s = Server::start(shipped(), config(), None, keys).await;
    assert_eq!(
        s.http.get(s.url("/health")).send().await.unwrap().status(),
        200
    );
    assert_eq!(s.http.get(s.url("/")).send().await.unwrap().status(), 200);
    let r = s.http.get(s.url("/v1/models")).send().await.unwrap();
    assert_error(r, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
    let r = s
        .http
        .get(s.url("/v1/models"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
    let r = s.post("/v1/completions", json!({"prompt": "x"})).await;
    assert_error(r, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
    assert_eq!(
        s.http
            .get(s.url("/v1/models"))
            .bearer_auth("key-a")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let r = s
        .http
        .post(s.url("/v1/sessions"))
        .bearer_auth("key-a")
        .json(&json!({"prompt": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = |req: reqwest::RequestBuilder| req.bearer_auth("key-a");
    let b = |req: reqwest::RequestBuilder| req.bearer_auth("key-b");
    assert_eq!(
        a(s.http.get(s.url(&format!("/v1/sessions/{id}"))))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for req in [
        b(s.http.get(s.url(&format!("/v1/sessions/{id}")))),
        b(s.http.get(s.url(&format!("/v1/sessions/{id}/state")))),
        b(s.http.post(s.url(&format!("/v1/sessions/{id}/fork")))),
        b(s.http.delete(s.url(&format!("/v1/sessions/{id}")))),
        b(s.http
            .post(s.url(&format!("/v1/sessions/{id}/completions")))
            .json(&json!({"prompt": "x"}))),
    ] {
        assert_error(
            req.send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "session_not_found",
        )
        .await;
    }
    // Uploading over another tenant's id is refused the same way.
    let snap = a(s.http.get(s.url(&format!("/v1/sessions/{id}/state"))))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r = b(s.http.put(s.url(&format!("/v1/sessions/{id}/state"))))
        .body(snap)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "session_not_found").await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_api() {
    let model = shipped();
    let s = Server::start(model.clone(), config(), None, None).await;
    let r = s
        .post("/v1/sessions", json!({"prompt": "Once upon a time"}))
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["position"], 16);
    let state_bytes = v["state_bytes"].as_u64().unwrap();
    assert!(state_bytes > 0);
    let empty = s.http.post(s.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(empty.status(), 201, "the body is optional");

    let v: Value = s
        .http
        .get(s.url(&format!("/v1/sessions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["position"], 16);
    assert_eq!(v["state_bytes"], state_bytes);
    assert!(v["created"].as_u64().unwrap() > 0 && v["last_used"].as_u64().unwrap() > 0);

    // Fork, then continue both: the same greedy text, the text of one whole generation.
    let r = s
        .http
        .post(s.url(&format!("/v1/sessions/{id}/fork")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let fork = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(fork, id);
    let want = generate_text(&model, "Once upon a time there", 12);
    for sid in [&id, &fork] {
        let v: Value = s
            .post_json(
                &format!("/v1/sessions/{sid}/completions"),
                json!({"prompt": " there", "max_tokens": 12, "temperature": 0}),
            )
            .await;
        assert_eq!(v["choices"][0]["text"], want.as_str());
    }
    // An empty prompt continues from the session's context.
    let r = s
        .post(
            &format!("/v1/sessions/{id}/completions"),
            json!({"max_tokens": 3, "temperature": 0, "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(sse_data(&r.text().await.unwrap()).last().unwrap(), "[DONE]");
    let v: Value = s
        .http
        .get(s.url(&format!("/v1/sessions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["position"], 16 + 6 + 12 + 3);

    // Download, upload as a new session (201) and over an existing one (200).
    let r = s
        .http
        .get(s.url(&format!("/v1/sessions/{id}/state")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let snap = r.bytes().await.unwrap().to_vec();
    assert_eq!(State::from_bytes(&model, &snap).unwrap().position(), 37);
    let r = s
        .http
        .put(s.url("/v1/sessions/my-copy/state"))
        .body(snap.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = s
        .http
        .put(s.url("/v1/sessions/my-copy/state"))
        .body(snap.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["position"], 37);

    // Bad uploads name the reason, and the server keeps serving.
    let mut corrupt = snap.clone();
    corrupt[200] ^= 0xFF;
    let v = assert_error(
        s.http
            .put(s.url("/v1/sessions/bad/state"))
            .body(corrupt)
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_snapshot",
    )
    .await;
    assert!(v["error"]["message"].as_str().unwrap().contains("checksum"));
    let mut version = snap.clone();
    version[8] = 7;
    let v = assert_error(
        s.http
            .put(s.url("/v1/sessions/bad/state"))
            .body(version)
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_snapshot",
    )
    .await;
    assert!(v["error"]["message"].as_str().unwrap().contains("version"));
    let other = Model::load(root().join("tests/fixtures/default_a")).unwrap();
    let mut st = State::new(&other);
    other.prefill(&mut st, &[1, 2, 3]).unwrap();
    let v = assert_error(
        s.http
            .put(s.url("/v1/sessions/bad/state"))
            .body(st.to_bytes(&other).unwrap())
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "snapshot_model_mismatch",
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("another model"));
    assert_error(
        s.http
            .put(s.url("/v1/sessions/bad/state"))
            .body("junk")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_snapshot",
    )
    .await;
    assert_error(
        s.http.get(s.url("/v1/sessions/bad")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "session_not_found",
    )
    .await;

    // Delete: 204, then 404.
    let r = s
        .http
        .delete(s.url(&format!("/v1/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_error(
        s.http
            .get(s.url(&format!("/v1/sessions/{id}")))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "session_not_found",
    )
    .await;
    assert_error(
        s.post(
            &format!("/v1/sessions/{id}/completions"),
            json!({"prompt": "x"}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "session_not_found",
    )
    .await;
    s.shutdown().await;
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_queue_full_and_cancel_on_disconnect() {
    let (_dir, model) = tiny();
    let cfg = EngineConfig {
        max_batch: 1,
        max_queue: 1,
        ..config()
    };
    let s = Server::start(model, cfg, None, None).await;
    let id = s
        .post("/v1/sessions", json!({"prompt": "a"}))
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A long streaming generation on the session: a second request on it is 409.
    let mut long = s
        .post(
            &format!("/v1/sessions/{id}/completions"),
            json!({"prompt": "b", "max_tokens": 1_000_000, "stream": true}),
        )
        .await;
    assert_eq!(long.status(), 200);
    assert!(
        long.chunk().await.unwrap().is_some(),
        "the stream has started"
    );
    assert_error(
        s.post(
            &format!("/v1/sessions/{id}/completions"),
            json!({"prompt": "c"}),
        )
        .await,
        StatusCode::CONFLICT,
        "session_busy",
    )
    .await;
    assert_error(
        s.http
            .get(s.url(&format!("/v1/sessions/{id}/state")))
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
        "session_busy",
    )
    .await;
    // One slot running, one queued: the next is 429 with Retry-After.
    let queued = tokio::spawn({
        let (http, url) = (s.http.clone(), s.url("/v1/completions"));
        async move {
            http.post(url)
                .json(&json!({"prompt": "q", "max_tokens": 2}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    wait_until("the queued request", || s.engine.stats().inflight == 2).await;
    let r = s.post("/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(r, StatusCode::TOO_MANY_REQUESTS, "queue_full").await;
    // The client goes away: its generation is cancelled and its slot frees at once.
    drop(long);
    assert_eq!(
        queued.await.unwrap(),
        200,
        "the queued request ran once the slot was free"
    );
    wait_until("the slots to free", || s.engine.stats().inflight == 0).await;
    let r = s
        .post(
            &format!("/v1/sessions/{id}/completions"),
            json!({"prompt": "c", "max_tokens": 2}),
        )
        .await;
    assert_eq!(r.status(), 200, "the session is free again");
    let metrics = s.metrics().await;
    assert!(metrics.contains("performer_rejected_requests_total{reason=\"queue_full\"} 1"));
    // Both 409s count: the busy completion and the busy state download.
    assert!(
        metrics.contains("performer_rejected_requests_total{reason=\"session_busy\"} 2"),
        "{metrics}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_sessions_again() {
    let model = shipped();
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(model.clone(), config(), Some(dir.path()), None).await;
    let id = s
        .post("/v1/sessions", json!({"prompt": "Once upon a time"}))
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let written = s.shutdown().await;
    assert_eq!(written, 1);

    let s = Server::start(model.clone(), config(), Some(dir.path()), None).await;
    let v: Value = s
        .http
        .get(s.url(&format!("/v1/sessions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["position"], 16);
    let v: Value = s
        .post_json(
            &format!("/v1/sessions/{id}/completions"),
            json!({"prompt": " there", "max_tokens": 12, "temperature": 0}),
        )
        .await;
    assert_eq!(
        v["choices"][0]["text"],
        generate_text(&model, "Once upon a time there", 12).as_str()
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_streams_a_grace_period_then_ends_them() {
    let (_dir, model) = tiny();
    let s = Server::start(model, config(), None, None).await;
    let mut r = s
        .post(
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 1_000_000, "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    let start = Instant::now();
    let engine = s.engine.clone();
    let base = s.base.clone();
    let stopping = tokio::spawn(s.shutdown());
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(c)) = r.chunk().await {
            rest.extend_from_slice(&c);
        }
        rest
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = Client::new().get(format!("{base}/health")).send().await;
    assert!(fresh.is_err(), "the port no longer accepts connections");
    let rest = reader.await.unwrap();
    stopping.await.unwrap();
    let waited = start.elapsed();
    // The grace period is 2 s; the stream ran through it, then ended with an error chunk.
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("shutting_down"),
        "the stream ends with the reason"
    );
    assert_eq!(engine.stats().inflight, 0);
    assert!(matches!(
        engine.submit(
            performer_engine::CompletionRequest::new(vec![1], 1, SamplingParams::greedy()),
            Box::new(|_| true)
        ),
        Err(performer_engine::Error::ShuttingDown)
    ));
}

#[path = "../../tests/common/bpe_model.rs"]
mod bpe_model;

/// Greedy text of the library's own generation (`Generation`, the CLI's path) for token ids.
fn generate_ids(model: &Model, ids: &[u32], max_tokens: usize, stop: Vec<String>) -> String {
    let mut state = State::new(model);
    let options = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop,
        ..GenerateOptions::default()
    };
    Generation::new(model, &mut state, ids, options)
        .unwrap()
        .collect::<performer::Result<String>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_json_model_is_served_with_its_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    bpe_model::write_bpe_model(dir.path());
    let model = Arc::new(Model::load(dir.path()).unwrap());
    assert!(!model.tokenizer().is_byte_level());
    let prompt = "ROMEO:\nBut soft, what light";
    let ids = model.tokenizer().encode(prompt).unwrap();
    assert!(
        ids.len() < prompt.len(),
        "BPE merges: fewer tokens than bytes"
    );
    let s = Server::start(model.clone(), config(), None, None).await;

    // Without stops: the prompt is encoded by the BPE, usage counts its tokens, and the text
    // is `performer generate`'s.
    let free = generate_ids(&model, &ids, 24, Vec::new());
    let v: Value = s
        .post_json(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1}),
        )
        .await;
    assert_eq!(v["choices"][0]["text"], free.as_str(), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 24);
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 24, "one logprob entry per generated token");
    // Tokens that are whole characters by themselves spell the text.
    if tokens.iter().all(|t| !t.starts_with('<')) {
        assert_eq!(tokens.concat(), free);
    }
    // Always: each token is the tokenizer's spelling of the greedy token alone, `<id>` for a
    // piece of a character.
    let mut state = State::new(&model);
    let mut sampler = performer::Sampler::new(SamplingParams::greedy()).unwrap();
    let mut logits = model.prefill(&mut state, &ids).unwrap().to_vec();
    let mut spelled = Vec::new();
    for _ in 0..24 {
        let t = sampler.sample(&logits, &[]).unwrap();
        spelled.push(match model.tokenizer().decode(&[t]) {
            Ok(s) if !s.is_empty() && !s.contains('\u{FFFD}') => s,
            _ => format!("<{t}>"),
        });
        logits = model.step(&mut state, t).unwrap().to_vec();
    }
    assert_eq!(tokens, spelled);

    // A stop string from inside that text (its second to fourth characters): the text before
    // it, streamed and not, as the library's `Generation` returns it.
    let chars: Vec<char> = free.chars().collect();
    assert!(chars.len() >= 4, "{free:?}");
    let stop: String = chars[1..4].iter().collect();
    let expected = generate_ids(&model, &ids, 24, vec![stop.clone()]);
    assert_eq!(expected, free[..free.find(&stop).unwrap()]);
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": stop});
    let v: Value = s.post_json("/v1/completions", body.clone()).await;
    assert_eq!(v["choices"][0]["text"], expected.as_str(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let text = s
        .post("/v1/completions", streamed)
        .await
        .text()
        .await
        .unwrap();
    let pieces: String = sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["text"].as_str().map(str::to_string)
        })
        .collect();
    assert_eq!(pieces, expected);

    // Sessions encode with the tokenizer too: a session of the prompt continues as the
    // stateless completion does.
    let v: Value = s.post_json("/v1/sessions", json!({"prompt": prompt})).await;
    assert_eq!(v["position"], ids.len());
    let id = v["id"].as_str().unwrap().to_string();
    let v: Value = s
        .post_json(
            &format!("/v1/sessions/{id}/completions"),
            json!({"prompt": "", "max_tokens": 24, "temperature": 0}),
        )
        .await;
    assert_eq!(v["choices"][0]["text"], free.as_str(), "{v}");

    // Every refusal is counted by its reason, whichever route refused it.
    let missing = s
        .http
        .post(s.url("/v1/sessions/sess-0/fork"))
        .send()
        .await
        .unwrap();
    assert_error(missing, StatusCode::NOT_FOUND, "session_not_found").await;
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("performer_rejected_requests_total{reason=\"not_found\"} 1"),
        "{metrics}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_session_memory_gives_507_and_keeps_no_trace() {
    let model = shipped();
    let one = State::new(&model).size_bytes();
    let cfg = EngineConfig {
        max_session_memory: one * 3 / 2,
        ..config()
    };
    let s = Server::start(model, cfg, None, None).await;
    let r = s.post("/v1/sessions", json!({"prompt": "kept"})).await;
    assert_eq!(r.status(), 201);
    let kept = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..3 {
        let r = s.post("/v1/sessions", json!({"prompt": "refused"})).await;
        let v = assert_error(r, StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage").await;
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(!msg.contains(&kept), "{msg}");
    }
    let r = s
        .http
        .post(s.url(&format!("/v1/sessions/{kept}/fork")))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage").await;
    let list: Value = s
        .http
        .get(s.url("/v1/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    // What was kept still downloads.
    let r = s
        .http
        .get(s.url(&format!("/v1/sessions/{kept}/state")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(s
        .metrics()
        .await
        .contains("reason=\"insufficient_storage\""));
    s.shutdown().await;
}

/// A server of the shipped model with these HTTP settings.
async fn start_with(options: ServerOptions) -> Server {
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(
        Engine::start_with_observer(shipped(), config(), None, Some(metrics.clone())).unwrap(),
    );
    Server::serve(engine, metrics, options).await
}

/// Sends `bytes` on a new raw connection to `s`.
async fn raw(s: &Server, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = s.base.trim_start_matches("http://");
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(bytes).await.unwrap();
    c
}

/// What the server sends until it closes the connection; `None` if it is still open after
/// `limit`.
async fn until_closed(c: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|_| String::from_utf8_lossy(&got).into_owned())
}

const PARTIAL_HEADER: &[u8] = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-ty";
const PARTIAL_BODY: &[u8] = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n\
content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\": \"a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_by_the_header_and_body_timeouts() {
    let s = start_with(ServerOptions {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    })
    .await;
    // Far above the 0.3 s timeouts: only a connection that is never closed fails this.
    let limit = Duration::from_secs(20);
    let mut head = raw(&s, PARTIAL_HEADER).await;
    let mut body = raw(&s, PARTIAL_BODY).await;
    until_closed(&mut head, limit)
        .await
        .expect("a partial header is closed");
    let answer = until_closed(&mut body, limit)
        .await
        .expect("a partial body is closed");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_body"), "{answer}");
    // Complete requests are served as before.
    let r = s.http.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .post("/v1/completions", json!({"prompt": "a", "max_tokens": 2}))
        .await;
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_get_503() {
    let s = start_with(ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    })
    .await;
    // Two idle connections hold both slots (accepted in order, before the third).
    let a = raw(&s, b"").await;
    let _b = raw(&s, b"").await;
    let mut third = raw(&s, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let answer = until_closed(&mut third, Duration::from_secs(20))
        .await
        .expect("the third connection is closed");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    // A slot frees when a connection closes.
    drop(a);
    let mut served = false;
    for _ in 0..200 {
        let r = Client::new().get(s.url("/health")).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a freed slot serves again");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_while_clients_hold_half_sent_requests() {
    let (dir, model) = tiny();
    let store = DiskStore::open(dir.path().join("sessions")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(
        Engine::start_with_observer(
            model,
            config(),
            Some(Box::new(store)),
            Some(metrics.clone()),
        )
        .unwrap(),
    );
    let s = Server::serve(
        engine,
        metrics,
        ServerOptions {
            grace: Duration::from_millis(500),
            // Far longer than the test: only the shutdown may close these connections.
            header_timeout: Duration::from_secs(600),
            body_timeout: Duration::from_secs(600),
            ..ServerOptions::default()
        },
    )
    .await;
    // Sessions present: they are written at shutdown.
    for _ in 0..3 {
        let r = s.post("/v1/sessions", json!({"prompt": "kept"})).await;
        assert_eq!(r.status(), 201);
    }
    let mut head = raw(&s, PARTIAL_HEADER).await;
    let mut body = raw(&s, PARTIAL_BODY).await;
    let written = tokio::time::timeout(Duration::from_secs(30), s.shutdown())
        .await
        .expect("shutdown does not wait for half-sent requests");
    assert_eq!(written, 3);
    assert!(until_closed(&mut head, Duration::from_secs(5))
        .await
        .is_some());
    assert!(until_closed(&mut body, Duration::from_secs(5))
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_capped_by_the_snapshot_size_and_by_a_global_budget() {
    let model = shipped();
    let mut st = State::new(&model);
    model
        .prefill(&mut st, b"Once".map(u32::from).as_slice())
        .unwrap();
    let snap = st.to_bytes(&model).unwrap();
    let s = start_with(ServerOptions {
        // Room for one upload of a snapshot at a time.
        max_upload_total: snap.len() * 3 / 2,
        ..ServerOptions::default()
    })
    .await;
    let put = |id: &str, body: Vec<u8>| {
        s.http
            .put(s.url(&format!("/v1/sessions/{id}/state")))
            .body(body)
            .send()
    };
    assert_eq!(put("fits", snap.clone()).await.unwrap().status(), 201);
    // Past twice the snapshot size: refused, whether the length is declared or streamed.
    // The server answers 413 as soon as the body passes the cap and closes the connection
    // (RFC 9110 allows it): a client still writing its body may see the connection closed
    // under it (EPIPE/reset) instead of reading the 413. Either is a refusal; what matters is
    // that no such session exists afterwards.
    async fn refused(r: reqwest::Result<reqwest::Response>) {
        match r {
            Ok(r) => {
                assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
            }
            Err(e) => assert!(e.is_request() || e.is_body(), "{e:?}"),
        }
    }
    let huge = vec![0u8; snap.len() * 2 + 1];
    refused(put("huge", huge.clone()).await).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        huge.chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let r = s
        .http
        .put(s.url("/v1/sessions/streamed/state"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await;
    refused(r).await;
    for id in ["huge", "streamed"] {
        let r = s
            .http
            .get(s.url(&format!("/v1/sessions/{id}")))
            .send()
            .await
            .unwrap();
        assert_error(r, StatusCode::NOT_FOUND, "session_not_found").await;
    }
    // An upload in progress (its body half sent) holds the budget: another gets 503.
    let head = format!(
        "PUT /v1/sessions/slow/state HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        snap.len()
    );
    let mut partial = head.into_bytes();
    partial.extend_from_slice(&snap[..snap.len() / 2]);
    let slow = raw(&s, &partial).await;
    // The second upload declares its length and sends no body yet: the refusal comes from the
    // declared length, before any body byte is read (a client writing its body meanwhile may
    // see the connection closed under it instead of the 503).
    let second = format!(
        "PUT /v1/sessions/second/state HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        snap.len()
    );
    let mut busy = false;
    for _ in 0..200 {
        use tokio::io::AsyncReadExt;
        let mut c = raw(&s, second.as_bytes()).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the reply is in, or it is clear none comes (the upload was admitted and waits
        // for its body: the slow upload's header had not been read yet).
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let reply = String::from_utf8_lossy(&got);
        if reply.starts_with("HTTP/1.1 503") {
            assert!(reply.contains("uploads_busy"), "{reply}");
            busy = true;
            break;
        }
        assert!(reply.is_empty(), "{reply}");
    }
    assert!(busy, "a second upload while the budget is held gets 503");
    // The budget comes back when the slow client goes away.
    drop(slow);
    let mut done = false;
    for _ in 0..200 {
        // Until the server has seen the slow client go, it may answer 503 before reading the
        // body and close the connection mid-upload: a send error here is that race, retried.
        if put("third", snap.clone())
            .await
            .is_ok_and(|r| r.status() == 201)
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(done);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_a_405_has_the_error_shape() {
    let keys = Some(vec!["key-a".to_string()]);
    let s = Server::start(shipped(), config(), None, keys).await;
    for value in [
        "bearer key-a",
        "BEARER key-a",
        "Bearer  key-a ",
        "bEaReR key-a",
    ] {
        let r = s
            .http
            .get(s.url("/v1/models"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{value:?}");
    }
    for value in ["Basic key-a", "key-a", "Bearer", "Bearerkey-a"] {
        let r = s
            .http
            .get(s.url("/v1/models"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_error(r, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
    }
    for (method, path) in [
        (reqwest::Method::DELETE, "/health"),
        (reqwest::Method::GET, "/v1/completions"),
        (reqwest::Method::PATCH, "/v1/sessions"),
    ] {
        let r = s
            .http
            .request(method, s.url(path))
            .bearer_auth("key-a")
            .send()
            .await
            .unwrap();
        assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    }
    s.shutdown().await;
}

/// The text `performer generate` makes of `prompt` with these sampling parameters.
fn generate_with(
    model: &Model,
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingParams,
) -> String {
    use performer::generate::{GenerateOptions, Generation};
    let mut state = State::new(model);
    let options = GenerateOptions {
        max_tokens,
        sampling,
        ..GenerateOptions::default()
    };
    let tokens: Vec<u32> = prompt.bytes().map(u32::from).collect();
    Generation::new(model, &mut state, &tokens, options)
        .unwrap()
        .collect::<performer::Result<String>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_and_repetition_penalty_reach_the_sampler() {
    let model = shipped();
    let s = Server::start(model.clone(), config(), None, None).await;
    let prompt = "the the the the the";
    let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    // top_k 1 at temperature 1 is greedy whatever the seed.
    let greedy = generate_text(&model, prompt, 32);
    for seed in [1, 2, 3] {
        let v = s
            .post_json(
                "/v1/completions",
                json!({"prompt": prompt, "max_tokens": 32, "temperature": 1.0, "top_k": 1, "seed": seed}),
            )
            .await;
        assert_eq!(text(v), greedy, "seed {seed}");
    }
    // A strong repetition penalty under greedy decoding: what the library makes of it, and
    // not the unpenalized text.
    let penalized = generate_with(
        &model,
        prompt,
        32,
        SamplingParams {
            repetition_penalty: 5.0,
            ..SamplingParams::greedy()
        },
    );
    assert_ne!(penalized, greedy, "the penalty changes this text");
    let v = s
        .post_json(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 32, "temperature": 0, "repetition_penalty": 5.0}),
        )
        .await;
    assert_eq!(text(v), penalized);
    s.shutdown().await;
}

fn schema(name: &str) -> Value {
    let path = root().join(format!("tests/fixtures/schemas/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Structured output: `response_format` (json_schema, json_object) and `grammar` on
/// `/v1/completions` and a session's completions; every choice validates; bad constraints are
/// 400s naming the problem; a token limit first is "length"; constrained and unconstrained
/// requests run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output() {
    let model = shipped();
    let s = Server::start(model.clone(), config(), None, None).await;
    for name in ["person", "items", "nested", "pattern", "bounds"] {
        let schema = schema(name);
        let validator = jsonschema::validator_for(&schema).unwrap();
        let format = json!({"type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": true}});
        let v = s
            .post_json(
                "/v1/completions",
                json!({"prompt": "Data: ", "max_tokens": 480, "temperature": 1.0, "n": 4,
                    "seed": 3, "response_format": format}),
            )
            .await;
        for c in v["choices"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            assert_eq!(c["finish_reason"], "stop", "{name}: {text}");
            let value: Value = serde_json::from_str(text).unwrap();
            assert!(validator.is_valid(&value), "{name}: {text}");
        }
    }
    // Any object: keys are unbounded strings (this model may fill them with prose until the
    // limit); a choice that ends is an object, one cut at the limit begins as one.
    let v = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "{", "max_tokens": 100, "temperature": 1.0, "n": 4, "seed": 1,
                "response_format": {"type": "json_object"}}),
        )
        .await;
    for c in v["choices"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        match c["finish_reason"].as_str().unwrap() {
            "stop" => assert!(serde_json::from_str::<Value>(text).unwrap().is_object()),
            _ => assert!(text.starts_with('{'), "{text}"),
        }
    }
    let v = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Q: ", "max_tokens": 20, "grammar": "start: (\"yes\" | \"no\") \"!\"",
                "response_format": {"type": "text"}}),
        )
        .await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text == "yes!" || text == "no!", "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // The token limit before the grammar completes: "length", and the text is cut. One
    // token (the shipped model's tokens are bytes): the shortest JSON object, `{}`, takes two,
    // so the grammar cannot complete (with three, a sampled `{}` ended it as "stop").
    let v = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Data: ", "max_tokens": 1, "temperature": 1.0,
                "response_format": {"type": "json_object"}}),
        )
        .await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 1);

    // Bad constraints: 400s naming the problem, before anything is generated.
    let bad = [
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": 5}}}}),
            "invalid_constraint",
            "JSON schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "unevaluatedProperties": false}}}}),
            "invalid_constraint",
            "unevaluatedProperties",
        ),
        (
            json!({"grammar": "start: nope"}),
            "invalid_constraint",
            "nope",
        ),
        (json!({"grammar": "start: ("}), "invalid_constraint", "Lark"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "invalid_parameter",
            "schema",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "grammar": "start: \"a\""}),
            "invalid_parameter",
            "grammar",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "invalid_type",
            "yaml",
        ),
    ];
    for (extra, code, named) in bad {
        let mut body = json!({"prompt": "x", "max_tokens": 5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = assert_error(
            s.post("/v1/completions", body).await,
            StatusCode::BAD_REQUEST,
            code,
        )
        .await;
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{message}");
    }

    // Side by side in the engine's ticks: the unconstrained request's text is unchanged.
    let want = generate_text(&model, "The sea", 40);
    let plain = s.post_json(
        "/v1/completions",
        json!({"prompt": "The sea", "max_tokens": 40, "temperature": 0}),
    );
    let constrained = s.post_json(
        "/v1/completions",
        json!({"prompt": "Data: ", "max_tokens": 480, "temperature": 1.0, "n": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p",
            "schema": schema("person")}}}),
    );
    let (plain, constrained) = tokio::join!(plain, constrained);
    assert_eq!(plain["choices"][0]["text"], want.as_str());
    for c in constrained["choices"].as_array().unwrap() {
        serde_json::from_str::<Value>(c["text"].as_str().unwrap()).unwrap();
    }

    // A session: a constrained completion leaves it at exactly the returned text, its state
    // bit-identical to the same tokens generated unconstrained. Greedy, with a grammar that
    // allows what greedy decoding picks (12 printable ASCII characters or newlines): the same tokens
    // both ways, one finishing because the grammar is complete, the other at the limit.
    let want = generate_text(&model, "Once upon a time", 12);
    assert!(
        want.bytes()
            .all(|b| b == b'\n' || (0x20..0x7f).contains(&b))
            && want.len() == 12,
        "{want:?}"
    );
    let mut states = Vec::new();
    for (extra, reason) in [
        (
            json!({"grammar": "start: /[\\n -~]{12}/", "max_tokens": 100}),
            "stop",
        ),
        (json!({"max_tokens": 12}), "length"),
    ] {
        let r = s
            .post("/v1/sessions", json!({"prompt": "Once upon a time"}))
            .await;
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut body = json!({"temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = s
            .post_json(&format!("/v1/sessions/{id}/completions"), body)
            .await;
        assert_eq!(v["choices"][0]["text"], want.as_str());
        assert_eq!(v["choices"][0]["finish_reason"], reason);
        let snap = s
            .http
            .get(s.url(&format!("/v1/sessions/{id}/state")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        assert_eq!(
            State::from_bytes(&model, &snap).unwrap().position(),
            16 + 12
        );
        states.push(snap);
    }
    assert!(states[0] == states[1], "the session states differ");
}
