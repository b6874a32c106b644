//! What the server's tests share: the in-process server (an engine served on an ephemeral
//! 127.0.0.1 port, driven by a real HTTP client), the models they serve, a reference greedy
//! generation, and readers of SSE bodies and error responses.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use performer::generate::{GenerateOptions, Generation};
use performer::{Model, SamplingParams, State};

use performer_engine::Engine;
use performer_server::{App, Metrics, ServerOptions};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;

/// A running server and a client for it.
pub struct Server {
    pub base: String,
    pub engine: Arc<Engine>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<usize, String>>,
    pub http: Client,
}

impl Server {
    /// Serves `engine` (started with `metrics` as its observer) with `options`.
    pub async fn serve(engine: Arc<Engine>, metrics: Arc<Metrics>, options: ServerOptions) -> Self {
        let app = App::new(engine.clone(), metrics, options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(performer_server::serve(listener, app, async {
            let _ = rx.await;
        }));
        Server {
            base,
            engine,
            stop: Some(tx),
            task,
            http: Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs `body` and parses the response as JSON, whatever its status.
    pub async fn post_json(&self, path: &str, body: Value) -> Value {
        self.post(path, body).await.json().await.unwrap()
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let r = self.http.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// Stops the server; the number of sessions it wrote out.
    pub async fn shutdown(mut self) -> usize {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap()
    }
}

/// The workspace root (where `models/` and `tests/fixtures` are).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped byte-level model.
pub fn shipped() -> Arc<Model> {
    Arc::new(Model::load(root().join("models/performer-byte")).unwrap())
}

/// A synthetic tiny model (rotary positions: no length limit; another fingerprint than the
/// shipped model's), with the directory that holds it.
pub fn tiny() -> (tempfile::TempDir, Arc<Model>) {
    use performer::synthetic::{self, SyntheticShape, WeightDtype};
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(dir.path(), &shape, WeightDtype::F32, 1).unwrap();
    let model = Arc::new(Model::load(dir.path()).unwrap());
    (dir, model)
}

/// The greedy continuation of `prompt` (bytes as tokens) by the runtime alone, the reference
/// the served text must equal.
pub fn generate_text(model: &Model, prompt: &str, max_tokens: usize) -> String {
    let mut state = State::new(model);
    let options = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let tokens: Vec<u32> = prompt.bytes().map(u32::from).collect();
    Generation::new(model, &mut state, &tokens, options)
        .unwrap()
        .collect::<performer::Result<String>>()
        .unwrap()
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data:")))
        .map(|d| d.trim().to_string())
        .collect()
}

/// Asserts an error response in the OpenAI shape with this status and code; its body.
pub async fn assert_error(resp: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(resp.status(), status);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(v["error"]["type"].is_string());
    v
}
