//! `performer serve`: an HTTP layer (axum, tokio) over [`performer_engine::Engine`].
//!
//! Routes: `GET /health`, `GET /` (playground), `GET /metrics`, and behind Bearer auth
//! `GET /v1/models`, `POST /v1/completions` (OpenAI Completions, with server-sent events),
//! `POST /v1/chat/completions` (the model's chat template), the Responses API under
//! `/v1/responses` (stored responses are sessions) and the sessions API under `/v1/sessions`. The engine knows nothing of HTTP: events reach the
//! async side through a channel sink, and dropping a response cancels its generation.

mod chat;
mod completions;
mod error;
mod listener;
mod metrics;
mod openai;
mod redis_store;
mod responses;
mod sessions;
mod sse;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use performer::chat::ChatTemplate;
use performer::Model;
use performer_engine::{DiskStore, Engine, EngineConfig, SessionStore};

pub use error::ApiError;
pub use metrics::Metrics;
pub use redis_store::{RedisStore, Staged};

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id in `/v1/models` and responses (the model directory's name).
    pub model_id: String,
    /// API keys, one per tenant; `None` serves without authentication.
    pub api_keys: Option<Vec<String>>,
    /// Largest JSON body, in bytes.
    pub max_body_bytes: usize,
    /// Largest uploaded snapshot, in bytes; the server also caps it at
    /// [`UPLOAD_SNAPSHOTS`] times the model's snapshot size, whichever is smaller.
    pub max_upload_bytes: usize,
    /// Most bytes of snapshots being uploaded at once, over all uploads; past it an upload gets
    /// 503 `uploads_busy` with Retry-After.
    pub max_upload_total: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub grace: Duration,
    /// Longest wait for a request's complete header; then the connection is closed.
    pub header_timeout: Duration,
    /// Longest time from a request's header to the end of its body; then the request fails
    /// and the connection is closed.
    pub body_timeout: Duration,
    /// Most connections open at once; past it new ones get 503 and are closed.
    pub max_connections: usize,
    /// How chat completions and responses render conversations (the model directory's
    /// template, [`ChatTemplate::load`]; the default: [`ChatTemplate::plain`]).
    pub chat_template: Arc<ChatTemplate>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "performer".into(),
            api_keys: None,
            max_body_bytes: 1 << 20,
            max_upload_bytes: 256 << 20,
            max_upload_total: 128 << 20,
            grace: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_connections: 1024,
            chat_template: Arc::new(ChatTemplate::plain()),
        }
    }
}

/// What the handlers share.
pub struct App {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The metrics (also the engine's observer).
    pub metrics: Arc<Metrics>,
    /// The settings.
    pub options: ServerOptions,
    /// API key → tenant id.
    tenants: Option<HashMap<String, String>>,
    /// Largest upload accepted, in bytes.
    pub(crate) upload_cap: usize,
    /// Bytes of uploads in progress, as permits of `options.max_upload_total`.
    pub(crate) uploading: Arc<tokio::sync::Semaphore>,
}

/// An upload may be this many times the model's snapshot size (a snapshot of a state with
/// logits, the largest there is).
pub const UPLOAD_SNAPSHOTS: usize = 2;

/// Bytes of the largest snapshot of `model` (a state holding logits); `None` if the model
/// cannot step.
fn snapshot_size(model: &Model) -> Option<usize> {
    let mut state = performer::State::new(model);
    model.prefill(&mut state, &[0]).ok()?;
    state.to_bytes(model).ok().map(|b| b.len())
}

impl App {
    /// The shared state for `engine` (started with `metrics` as its observer).
    pub fn new(engine: Arc<Engine>, metrics: Arc<Metrics>, options: ServerOptions) -> Arc<App> {
        let tenants = options.api_keys.as_ref().map(|keys| {
            keys.iter()
                .map(|k| {
                    // Sessions on disk carry a hash of the key, never the key itself.
                    let id = performer::snapshot::hash64(k.as_bytes());
                    (k.clone(), format!("tenant-{id:016x}"))
                })
                .collect()
        });
        let upload_cap = snapshot_size(engine.model()).map_or(options.max_upload_bytes, |n| {
            options
                .max_upload_bytes
                .min(n.saturating_mul(UPLOAD_SNAPSHOTS))
        });
        let uploading = Arc::new(tokio::sync::Semaphore::new(options.max_upload_total.clamp(
            1,
            tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
        )));
        Arc::new(App {
            engine,
            metrics,
            options,
            tenants,
            upload_cap,
            uploading,
        })
    }
}

/// The tenant of an authenticated request (`""` without authentication).
#[derive(Debug, Clone)]
pub(crate) struct Tenant(pub(crate) String);

/// Reads an API key file: one key per line; blank lines and lines starting with `#` are
/// skipped.
pub fn load_api_keys(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if keys.is_empty() {
        return Err(format!("{}: no API keys in the file", path.display()));
    }
    Ok(keys)
}

async fn auth(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let tenant = match &app.tenants {
        None => String::new(),
        Some(map) => {
            let key = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token);
            match key.and_then(|k| map.get(k)) {
                Some(t) => t.clone(),
                None => {
                    return ApiError {
                        status: StatusCode::UNAUTHORIZED,
                        kind: "invalid_request_error",
                        code: "invalid_api_key",
                        message: "a valid `Authorization: Bearer <key>` header is required".into(),
                    }
                    .into_response();
                }
            }
        }
    };
    req.extensions_mut().insert(Tenant(tenant));
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110, 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn count_requests(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    if let Some(error::Rejected(reason)) = resp.extensions().get::<error::Rejected>() {
        app.metrics.reject(reason);
    }
    app.metrics
        .requests
        .get_or_create(&metrics::RequestLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": app.options.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "performer",
            "chat_template": {
                "origin": app.options.chat_template.origin().name(),
                "source": app.options.chat_template.source(),
                "stop": app.options.chat_template.stop_strings(),
            },
        }]
    }))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let body = app.metrics.render(&app.engine.stats());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn playground() -> Html<&'static str> {
    Html(include_str!("playground.html"))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found_error",
        code: "unknown_route",
        message: "no such route".into(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        code: "method_not_allowed",
        message: "this route does not take that method".into(),
    }
}

/// Every route, with auth on `/v1/*` and request counting on all.
pub fn router(app: Arc<App>) -> Router {
    let body = DefaultBodyLimit::max(app.options.max_body_bytes);
    let v1 = Router::new()
        .route("/models", get(models))
        .route("/completions", post(completions::stateless).layer(body))
        .route("/chat/completions", post(chat::completions).layer(body))
        .route("/responses", post(responses::create).layer(body))
        .route(
            "/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route(
            "/sessions",
            post(sessions::create).layer(body).get(sessions::list),
        )
        .route(
            "/sessions/{id}",
            get(sessions::info).delete(sessions::delete),
        )
        .route(
            "/sessions/{id}/completions",
            post(sessions::complete).layer(body),
        )
        .route("/sessions/{id}/fork", post(sessions::fork))
        .route(
            "/sessions/{id}/state",
            get(sessions::download).put(sessions::upload),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), auth))
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .method_not_allowed_fallback(method_not_allowed)
        .nest("/v1", v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// Serves `app` on `listener` until `shutdown` resolves; then closes the port, lets
/// requests run for the grace period (new ones on open connections get 503), stops the engine,
/// writes its sessions out and closes the connections: those still open a second after that
/// (a client that never finishes sending its request) are closed regardless. Returns how many
/// sessions were written, or an error naming the sessions that could not be.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<usize, String> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let engine = app.engine.clone();
    let grace = app.options.grace;
    let limits = listener::Limits {
        header_timeout: app.options.header_timeout,
        body_timeout: app.options.body_timeout,
        max_connections: app.options.max_connections.clamp(1, u32::MAX as usize),
        drain: Duration::from_secs(1),
    };
    let stopping = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        let written = tokio::task::spawn_blocking(move || engine.shutdown(grace))
            .await
            .map_err(|e| format!("shutdown task: {e}"))
            .and_then(|r| r.map_err(|e| format!("writing sessions: {e}")));
        let _ = drain_tx.send(true);
        written
    });
    listener::serve(listener, router(app), limits, stop_rx, drain_rx).await;
    stopping
        .await
        .unwrap_or_else(|e| Err(format!("shutdown task: {e}")))
}

/// Everything `performer serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model directory.
    pub model_dir: PathBuf,
    /// How the model's quantized products are computed (`None`: the default, int8).
    pub quant_kernel: Option<performer::kernels::quant::QuantMethod>,
    /// Keep the quantized weights row-major only ([`performer::LoadOptions::no_packed_rows`]).
    pub no_packed_rows: bool,
    /// Address to listen on.
    pub host: String,
    /// Port to listen on.
    pub port: u16,
    /// Engine limits.
    pub engine: EngineConfig,
    /// Where sessions spill and persist (`None`: memory only).
    pub session_dir: Option<PathBuf>,
    /// A shared session store, `redis://HOST:PORT/DB` (excludes `session_dir`): the replica's
    /// session table becomes a cache of it (see [`RedisStore`]).
    pub session_store: Option<String>,
    /// The HTTP settings (`model_id` is filled from the directory name).
    pub options: ServerOptions,
}

async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("performer serve: shutting down");
}

/// Loads the model, starts the engine and serves until SIGINT or SIGTERM (blocking).
pub fn run(mut config: ServeConfig) -> Result<(), String> {
    let model = Model::load_with(
        &config.model_dir,
        performer::LoadOptions {
            quant_kernel: config.quant_kernel,
            no_packed_rows: config.no_packed_rows,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    config.options.model_id = config
        .model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "performer".into());
    config.options.chat_template =
        Arc::new(ChatTemplate::load(&config.model_dir).map_err(|e| e.to_string())?);
    let store: Option<Box<dyn SessionStore>> = match (&config.session_dir, &config.session_store) {
        (Some(_), Some(_)) => {
            return Err("--session-dir and --session-store exclude each other".into())
        }
        (Some(dir), None) => Some(Box::new(DiskStore::open(dir).map_err(|e| e.to_string())?)),
        (None, Some(url)) => {
            let store = RedisStore::open(url).map_err(|e| e.to_string())?;
            // Start even when Redis is down: stateless completions work, session requests
            // get 503 until it answers.
            if let Err(e) = store.ping() {
                eprintln!("performer serve: {e} (session requests get 503 until it answers)");
            }
            Some(Box::new(store))
        }
        (None, None) => None,
    };
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::start_with_observer(
        Arc::new(model),
        config.engine.clone(),
        store,
        Some(metrics.clone()),
    )
    .map_err(|e| e.to_string())?;
    let app = App::new(Arc::new(engine), metrics, config.options.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        eprintln!(
            "performer serve: {} on http://{}",
            app.options.model_id,
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let written = serve(listener, app, signal()).await?;
        eprintln!("performer serve: wrote {written} sessions");
        Ok(())
    })
}
