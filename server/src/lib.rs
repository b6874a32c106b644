//! `performer serve`: an HTTP layer (axum, tokio) over [`performer::engine::Engine`].
//!
//! Routes: `GET /health`, `GET /` (playground), `GET /metrics`, and behind Bearer auth
//! `GET /v1/models`, `POST /v1/completions` (OpenAI Completions, with server-sent events) and
//! the sessions API under `/v1/sessions`. The engine knows nothing of HTTP: events reach the
//! async side through a channel sink, and dropping a response cancels its generation.

mod completions;
mod error;
mod listener;
mod metrics;
mod openai;
mod redis_store;
mod sessions;

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
use performer::engine::{DiskStore, Engine, EngineConfig, SessionStore};
use performer::Model;

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
    /// Largest uploaded snapshot, in bytes.
    pub max_upload_bytes: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "performer".into(),
            api_keys: None,
            max_body_bytes: 1 << 20,
            max_upload_bytes: 256 << 20,
            grace: Duration::from_secs(10),
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
        Arc::new(App {
            engine,
            metrics,
            options,
            tenants,
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
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
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

/// Every route, with auth on `/v1/*` and request counting on all.
pub fn router(app: Arc<App>) -> Router {
    let body = DefaultBodyLimit::max(app.options.max_body_bytes);
    let upload = DefaultBodyLimit::max(app.options.max_upload_bytes);
    let v1 = Router::new()
        .route("/models", get(models))
        .route("/completions", post(completions::stateless).layer(body))
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
            get(sessions::download).put(sessions::upload).layer(upload),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .nest("/v1", v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// Serves `app` on `listener` until `shutdown` resolves; then closes the port, lets
/// requests run for the grace period (new ones on open connections get 503), stops the engine,
/// writes its sessions out and closes the connections. Returns how many sessions were written.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<usize, String> {
    let (close_tx, close_rx) = tokio::sync::watch::channel(false);
    let listener = listener::Closable::new(listener, close_rx).map_err(|e| e.to_string())?;
    let engine = app.engine.clone();
    let grace = app.options.grace;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        shutdown.await;
        let _ = close_tx.send(true);
        let written = tokio::task::spawn_blocking(move || engine.shutdown(grace))
            .await
            .map_err(|e| format!("shutdown task: {e}"))
            .and_then(|r| r.map_err(|e| format!("writing sessions: {e}")));
        let _ = done_tx.send(written);
    });
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    let stopped = async move {
        let written = done_rx
            .await
            .unwrap_or_else(|_| Err("the shutdown task ended early".into()));
        let _ = written_tx.send(written);
    };
    axum::serve(listener, router(app))
        .with_graceful_shutdown(stopped)
        .await
        .map_err(|e| format!("server: {e}"))?;
    written_rx
        .await
        .unwrap_or_else(|_| Err("the server stopped without a shutdown".into()))
}

/// Everything `performer serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model directory.
    pub model_dir: PathBuf,
    /// How the model's quantized products are computed (`None`: the default, dequant).
    pub quant_kernel: Option<performer::kernels::quant::QuantMethod>,
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
