//! `POST /v1/completions` and its session twin: JSON or server-sent events.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use performer_engine::{CancelHandle, CompletionRequest, Event, Target, TokenLogprob};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::error::ApiError;
use crate::sse;
use performer::tokenizer::Tokenizer;

use crate::openai::{logprobs_json, parse, usage_json, CompletionBody};
use crate::{App, Tenant};

/// Cancels the generation when the response (or the handler) is dropped: a client that goes
/// away frees its batch slot within one tick.
pub(crate) struct CancelOnDrop(pub(crate) CancelHandle);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Maps a body rejection (too large, unreadable) to the OpenAI error shape.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let too_large = status == StatusCode::PAYLOAD_TOO_LARGE;
        ApiError {
            status,
            kind: "invalid_request_error",
            code: if too_large {
                "body_too_large"
            } else {
                "invalid_body"
            },
            message: r.body_text(),
        }
    })
}

/// Submits `req` to the engine with a channel sink. A request on a session may read a
/// shared store (up to its timeouts while it is unreachable): it is submitted off the async
/// workers.
pub(crate) async fn submit(
    app: &App,
    req: CompletionRequest,
) -> Result<(UnboundedReceiver<Event>, CancelOnDrop), ApiError> {
    let (tx, rx) = unbounded_channel();
    let sink: performer_engine::Sink = Box::new(move |e| tx.send(e).is_ok());
    let submitted = if matches!(req.target, Target::Session(_)) {
        let engine = app.engine.clone();
        tokio::task::spawn_blocking(move || engine.submit(req, sink))
            .await
            .unwrap_or(Err(performer_engine::Error::ShuttingDown))
    } else {
        app.engine.submit(req, sink)
    };
    match submitted {
        Ok(h) => Ok((rx, CancelOnDrop(h))),
        Err(e) => Err(ApiError::from(e)),
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `prefix` and 16 hex digits, distinct within the process.
pub(crate) fn random_id(prefix: &str) -> String {
    let mut s = now() ^ (std::process::id() as u64) << 40;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    s ^= N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 20;
    format!("{prefix}{:016x}", performer::sampling::splitmix64(&mut s))
}

fn completion_id() -> String {
    random_id("cmpl-")
}

/// `POST /v1/completions`.
pub(crate) async fn stateless(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(&app, &tenant.0, Target::Stateless, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Runs a completion request on `target`.
pub(crate) async fn run(
    app: &Arc<App>,
    tenant: &str,
    target: Target,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let parsed: CompletionBody = parse(&bytes)?;
    let mut req = parsed.to_request(tenant, target, app.engine.model().tokenizer())?;
    req.constraint = parsed.constraint(app.engine.model())?;
    let n = req.n;
    let (rx, guard) = submit(app, req).await?;
    let head = Head {
        id: completion_id(),
        created: now(),
        model: app.options.model_id.clone(),
        tokenizer: app.engine.model().tokenizer().clone(),
    };
    if parsed.streams() {
        Ok(stream_response(head, rx, guard, parsed.include_usage(), n))
    } else {
        collect(head, rx, guard, n).await
    }
}

struct Head {
    id: String,
    created: u64,
    model: String,
    /// The model's, for the tokens' text in logprobs.
    tokenizer: Tokenizer,
}

impl Head {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

fn lp_value(lps: &[TokenLogprob], offset: usize, want: bool, tokenizer: &Tokenizer) -> Value {
    if want {
        logprobs_json(lps, offset, tokenizer)
    } else {
        Value::Null
    }
}

async fn collect(
    head: Head,
    mut rx: UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
    n: usize,
) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut reasons = vec!["length"; n];
    let mut any_lp = false;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text {
                choice,
                text,
                logprobs,
            } => {
                texts[choice].push_str(&text);
                any_lp |= !logprobs.is_empty();
                lps[choice].extend(logprobs);
            }
            Event::Finished { choice, reason } => reasons[choice] = reason.as_str(),
            Event::Failed(e) => return Err(e.into()),
            Event::Done { usage, .. } => {
                let choices: Vec<Value> = (0..n)
                    .map(|i| {
                        json!({
                            "text": texts[i],
                            "index": i,
                            "logprobs": lp_value(&lps[i], 0, any_lp, &head.tokenizer),
                            "finish_reason": reasons[i],
                        })
                    })
                    .collect();
                let body = head.chunk(Value::Array(choices), Some(usage_json(&usage)));
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(performer_engine::Error::ShuttingDown.into())
}

struct StreamState {
    head: Head,
    _guard: CancelOnDrop,
    include_usage: bool,
    offsets: Vec<usize>,
}

fn stream_response(
    head: Head,
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
    n: usize,
) -> Response {
    let st = StreamState {
        head,
        _guard: guard,
        include_usage,
        offsets: vec![0; n],
    };
    sse::data_response(st, rx)
}

impl sse::DataStream for StreamState {
    fn take(&mut self, e: Event, out: &mut sse::DataEvents) {
        let chunk = match e {
            Event::Text {
                choice,
                text,
                logprobs,
            } => {
                let lp = lp_value(
                    &logprobs,
                    self.offsets[choice],
                    !logprobs.is_empty(),
                    &self.head.tokenizer,
                );
                self.offsets[choice] += logprobs.iter().filter(|l| l.token < 256).count();
                self.head.chunk(
                    json!([{"text": text, "index": choice, "logprobs": lp, "finish_reason": null}]),
                    None,
                )
            }
            Event::Finished { choice, reason } => self.head.chunk(
                json!([{"text": "", "index": choice, "logprobs": null, "finish_reason": reason.as_str()}]),
                None,
            ),
            Event::Done { usage, .. } => {
                if self.include_usage {
                    out.send(&self.head.chunk(json!([]), Some(usage_json(&usage))));
                }
                out.finish();
                return;
            }
            Event::Failed(e) => {
                out.fail(e);
                return;
            }
        };
        out.send(&chunk);
    }
}
