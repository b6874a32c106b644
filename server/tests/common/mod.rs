//! The in-process server of the HTTP tests: an engine served on an ephemeral 127.0.0.1 port,
//! driven by a real HTTP client.
#![allow(dead_code)]

use std::sync::Arc;

use performer_engine::Engine;
use performer_server::{App, Metrics, ServerOptions};
use reqwest::Client;
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
