//! The OpenAI Responses API (text): `POST /v1/responses`, `GET` and `DELETE
//! /v1/responses/{id}`.
//!
//! A stored response is a session named `resp_…` whose state is the conversation at the end
//! of the response's output, with the response's record (its JSON and the conversation's
//! messages) as the session's note: it lives in the session store with the sessions' budgets,
//! spill, TTL and tenants. A continuation (`previous_response_id`) forks that session and
//! ingests only what the new messages add to the rendered conversation
//! ([`performer::chat::ChatTemplate::delta`]), never the history; the original stays as it
//! was, so two continuations of one response are two forks. `store: false` keeps nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use performer::chat::Message;
use performer_engine::{Engine, Event, Target, Usage, MAX_NOTE_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::chat::{add_template_stops, completion_body, InMessage};
use crate::completions::{body_bytes, now, random_id, submit, CancelOnDrop};
use crate::error::ApiError;
use crate::openai::{parse, JsonSchemaFormat, ResponseFormat};
use crate::sessions::blocking;
use crate::sse;
use crate::{App, Tenant};

/// Prefix of stored responses' ids (and their sessions').
pub const RESPONSE_PREFIX: &str = "resp_";

/// `input`: a string (one user message) or a list of messages.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<InMessage>),
}

/// `text.format`, flat as the Responses API has it.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TextFormat {
    Text,
    JsonObject,
    JsonSchema { schema: Option<Value> },
}

#[derive(Debug, Default, Deserialize)]
struct TextOptions {
    format: Option<Value>,
}

/// The body of `POST /v1/responses` (unknown fields are ignored).
#[derive(Debug, Default, Deserialize)]
struct ResponseBody {
    input: Option<Input>,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    store: Option<bool>,
    max_output_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Extension: the sampler's seed (default: random).
    seed: Option<u64>,
    stream: Option<bool>,
    text: Option<TextOptions>,
    /// Extension: a Lark grammar the output must match (as on `/v1/completions`).
    grammar: Option<String>,
    metadata: Option<Value>,
}

/// What a stored response's session note holds.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The response object as `GET` returns it.
    response: Value,
    /// The conversation, its last message the response's output: what a continuation renders
    /// whole to find what it adds.
    messages: Vec<Message>,
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "response_not_found",
        message: format!("no response `{id}`"),
    }
}

/// The record of response `id`, `None` for a session that is not a response.
async fn record(app: &App, tenant: &str, id: &str) -> Result<Record, ApiError> {
    let engine = app.engine.clone();
    let (t, i) = (tenant.to_string(), id.to_string());
    let note = blocking(move || engine.session_note(&t, &i))
        .await
        .map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                not_found(id)
            } else {
                e
            }
        })?;
    note.filter(|_| id.starts_with(RESPONSE_PREFIX))
        .and_then(|n| serde_json::from_str(&n).ok())
        .ok_or_else(|| not_found(id))
}

/// A response's session that goes away unless kept: a failed, cancelled or `store: false`
/// response leaves nothing. The engine restores a session's state when its request fails, a
/// tick after the cancel: deletion waits for it (off the async workers).
struct Branch {
    engine: Arc<Engine>,
    tenant: String,
    id: String,
    keep: bool,
}

impl Drop for Branch {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let (engine, tenant, id) = (
            self.engine.clone(),
            std::mem::take(&mut self.tenant),
            std::mem::take(&mut self.id),
        );
        let delete = move || {
            // A busy session is one whose request the engine has not reaped yet (within a
            // tick); give it up to 10 s.
            for _ in 0..500 {
                match engine.delete_session(&tenant, &id) {
                    Err(performer_engine::Error::SessionBusy(_)) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => return,
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(delete);
            }
            Err(_) => delete(),
        }
    }
}

/// The fields a response object echoes from its request.
struct Echo {
    model: String,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    store: bool,
    max_output_tokens: Option<u64>,
    temperature: f32,
    top_p: f32,
    format: Value,
    metadata: Value,
}

/// A response object. `output`: the text so far (`None`: no output item yet).
fn response_json(
    id: &str,
    created: u64,
    echo: &Echo,
    status: &str,
    message_id: &str,
    output: Option<&str>,
    usage: Option<&Usage>,
) -> Value {
    let output: Vec<Value> = output
        .map(|text| {
            let done = status != "in_progress";
            json!({
                "type": "message",
                "id": message_id,
                "status": if done { status } else { "in_progress" },
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            })
        })
        .into_iter()
        .collect();
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": null,
        "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "model": echo.model,
        "output": output,
        "parallel_tool_calls": false,
        "previous_response_id": echo.previous_response_id,
        "store": echo.store,
        "temperature": echo.temperature,
        "top_p": echo.top_p,
        "text": {"format": echo.format},
        "tool_choice": "none",
        "tools": [],
        "truncation": "disabled",
        "metadata": echo.metadata,
        "usage": usage.map(|u| json!({
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        })),
    })
}

/// `POST /v1/responses`.
pub(crate) async fn create(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(&app, tenant.0, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn text_format(text: Option<&TextOptions>) -> Result<(Option<ResponseFormat>, Value), ApiError> {
    let Some(v) = text.and_then(|t| t.format.clone()) else {
        return Ok((None, json!({"type": "text"})));
    };
    let f: TextFormat = serde_json::from_value(v.clone())
        .map_err(|e| ApiError::bad_request("invalid_parameter", format!("text.format: {e}")))?;
    let rf = match f {
        TextFormat::Text => None,
        TextFormat::JsonObject => Some(ResponseFormat::JsonObject),
        TextFormat::JsonSchema { schema } => Some(ResponseFormat::JsonSchema {
            json_schema: JsonSchemaFormat { schema },
        }),
    };
    Ok((rf, v))
}

async fn run(
    app: &Arc<App>,
    tenant: String,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let parsed: ResponseBody = parse(&bytes)?;
    let mut new = match &parsed.input {
        None => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "input is required",
            ))
        }
        Some(Input::Text(t)) => vec![Message::new("user", t.clone())],
        Some(Input::Items(items)) => items
            .iter()
            .enumerate()
            .map(|(i, m)| m.to_message(i))
            .collect::<Result<Vec<_>, _>>()?,
    };
    if new.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "input must hold at least one message",
        ));
    }
    let store = parsed.store.unwrap_or(true);
    let history = match &parsed.previous_response_id {
        Some(p) => record(app, &tenant, p).await?.messages,
        None => Vec::new(),
    };
    if let Some(i) = &parsed.instructions {
        match history.first() {
            None => new.insert(0, Message::new("system", i.clone())),
            Some(m) if m.role == "system" && &m.content == i => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    "the instructions of a continued conversation are in its stored state and \
                     cannot change: give the first response's instructions, or none",
                ))
            }
        }
    }
    let template = &app.options.chat_template;
    let delta = template.delta(&history, &new)?;
    let (format, format_json) = text_format(parsed.text.as_ref())?;
    let mut cb = completion_body(
        parsed.max_output_tokens,
        parsed.temperature,
        parsed.top_p,
        parsed.seed,
    );
    cb.response_format = format;
    cb.grammar = parsed.grammar.clone();
    let model = app.engine.model();
    let mut req = cb.to_request(&tenant, Target::Stateless, model.tokenizer())?;
    req.prompt = model.tokenizer().encode_continuation(&delta)?;
    add_template_stops(app, &mut req);
    req.constraint = cb.constraint(model)?;
    let mut messages = history;
    messages.extend(new);
    // The record must fit in a session's note with the output still to come.
    let transcript = serde_json::to_string(&messages).map_or(0, |s| s.len());
    if transcript > MAX_NOTE_BYTES / 2 {
        return Err(ApiError::bad_request(
            "conversation_too_long",
            format!(
                "the conversation's text ({transcript} bytes) is too long to store with a \
                 response; continue it with the sessions API"
            ),
        ));
    }
    let branch = if store || parsed.previous_response_id.is_some() {
        let engine = app.engine.clone();
        let (t, from) = (tenant.clone(), parsed.previous_response_id.clone());
        let info =
            blocking(move || engine.branch_session(&t, from.as_deref(), RESPONSE_PREFIX)).await?;
        Some(Branch {
            engine: app.engine.clone(),
            tenant: tenant.clone(),
            id: info.id,
            keep: false,
        })
    } else {
        None
    };
    let id = branch
        .as_ref()
        .map_or_else(|| random_id(RESPONSE_PREFIX), |b| b.id.clone());
    if let Some(b) = &branch {
        req.target = Target::Session(b.id.clone());
    }
    let (rx, guard) = submit(app, req).await?;
    let echo = Echo {
        model: app.options.model_id.clone(),
        instructions: parsed.instructions.clone(),
        previous_response_id: parsed.previous_response_id.clone(),
        store,
        max_output_tokens: parsed.max_output_tokens,
        temperature: parsed.temperature.unwrap_or(1.0),
        top_p: parsed.top_p.unwrap_or(1.0),
        format: format_json,
        metadata: parsed.metadata.clone().unwrap_or_else(|| json!({})),
    };
    let run = Run {
        app: app.clone(),
        tenant,
        id,
        message_id: random_id("msg_"),
        created: now(),
        echo,
        messages,
        branch,
        store,
    };
    if parsed.stream.unwrap_or(false) {
        Ok(stream_response(run, rx, guard))
    } else {
        let c = crate::chat::collect(rx, 1).await?;
        drop(guard);
        let status = if c.reasons[0] == "length" {
            "incomplete"
        } else {
            "completed"
        };
        let body = run.finish(&c.texts[0], status, &c.usage).await?;
        Ok(Json(body).into_response())
    }
}

/// A response being generated.
struct Run {
    app: Arc<App>,
    tenant: String,
    id: String,
    message_id: String,
    created: u64,
    echo: Echo,
    /// The conversation up to the new output.
    messages: Vec<Message>,
    branch: Option<Branch>,
    store: bool,
}

impl Run {
    fn json(&self, status: &str, output: Option<&str>, usage: Option<&Usage>) -> Value {
        response_json(
            &self.id,
            self.created,
            &self.echo,
            status,
            &self.message_id,
            output,
            usage,
        )
    }

    /// The finished response; stored (its session kept with its record) unless `store` is
    /// false.
    async fn finish(mut self, text: &str, status: &str, usage: &Usage) -> Result<Value, ApiError> {
        let body = self.json(status, Some(text), Some(usage));
        if self.store {
            let mut messages = std::mem::take(&mut self.messages);
            messages.push(Message::new("assistant", text));
            let note = serde_json::to_string(&Record {
                response: body.clone(),
                messages,
            })
            .map_err(|e| ApiError::bad_request("invalid_parameter", e.to_string()))?;
            let engine = self.app.engine.clone();
            let (t, id) = (self.tenant.clone(), self.id.clone());
            blocking(move || engine.set_session_note(&t, &id, Some(note))).await?;
            if let Some(b) = &mut self.branch {
                b.keep = true;
            }
        }
        Ok(body)
    }
}

/// `GET /v1/responses/{id}`.
pub(crate) async fn get(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(record(&app, &tenant.0, &id).await?.response))
}

/// `DELETE /v1/responses/{id}`: the response and its state.
pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    record(&app, &tenant.0, &id).await?;
    let engine = app.engine.clone();
    let (t, i) = (tenant.0.clone(), id.clone());
    blocking(move || engine.delete_session(&t, &i)).await?;
    Ok(Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}

struct StreamState {
    run: Option<Run>,
    guard: Option<CancelOnDrop>,
    text: String,
    reason: &'static str,
    seq: u64,
    out: VecDeque<(String, Value)>,
    ended: bool,
}

impl StreamState {
    fn emit(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.out.push_back((kind.to_string(), data));
    }

    fn item(&self) -> (&str, Value) {
        let run = self.run.as_ref().expect("running");
        (
            &run.message_id,
            json!({"item_id": run.message_id, "output_index": 0, "content_index": 0}),
        )
    }

    fn failed(&mut self, e: ApiError) {
        if let Some(run) = self.run.take() {
            let mut r = run.json("failed", Some(&self.text), None);
            r["error"] = json!({"code": e.code, "message": e.message});
            self.emit("response.failed", json!({"response": r}));
        }
        self.ended = true;
    }

    async fn take(&mut self, e: Event) {
        match e {
            Event::Text { text, .. } => {
                self.text.push_str(&text);
                let (_, mut d) = self.item();
                d["delta"] = json!(text);
                d["logprobs"] = json!([]);
                self.emit("response.output_text.delta", d);
            }
            Event::Finished { reason, .. } => self.reason = reason.as_str(),
            Event::Failed(e) => self.failed(e.into()),
            Event::Done { usage, .. } => {
                self.guard.take();
                let status = if self.reason == "length" {
                    "incomplete"
                } else {
                    "completed"
                };
                let text = std::mem::take(&mut self.text);
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                let (mid, base) = self.item();
                let mid = mid.to_string();
                let mut d = base.clone();
                d["text"] = json!(text);
                d["logprobs"] = json!([]);
                self.emit("response.output_text.done", d);
                let mut d = base;
                d["part"] = part.clone();
                self.emit("response.content_part.done", d);
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": 0, "item": {
                        "type": "message", "id": mid, "status": status, "role": "assistant",
                        "content": [part],
                    }}),
                );
                let run = self.run.take().expect("running");
                match run.finish(&text, status, &usage).await {
                    Ok(r) => {
                        let kind = if status == "completed" {
                            "response.completed"
                        } else {
                            "response.incomplete"
                        };
                        self.emit(kind, json!({"response": r}));
                        self.ended = true;
                    }
                    Err(e) => {
                        self.text = text;
                        // `finish` consumed the run: rebuild the failure without it.
                        self.emit(
                            "error",
                            json!({"code": e.code, "message": e.message, "param": null}),
                        );
                        self.ended = true;
                    }
                }
            }
        }
    }
}

fn stream_response(run: Run, rx: UnboundedReceiver<Event>, guard: CancelOnDrop) -> Response {
    let mut st = StreamState {
        run: Some(run),
        guard: Some(guard),
        text: String::new(),
        reason: "stop",
        seq: 0,
        out: VecDeque::new(),
        ended: false,
    };
    let r = st
        .run
        .as_ref()
        .expect("running")
        .json("in_progress", None, None);
    st.emit("response.created", json!({"response": r}));
    st.emit("response.in_progress", json!({"response": r}));
    let mid = st.run.as_ref().expect("running").message_id.clone();
    st.emit(
        "response.output_item.added",
        json!({"output_index": 0, "item": {
            "type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": [],
        }}),
    );
    let (_, mut d) = st.item();
    d["part"] = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
    st.emit("response.content_part.added", d);
    sse::response(st, rx)
}

impl sse::EventStream for StreamState {
    async fn push(&mut self, event: Option<Event>) {
        match event {
            Some(e) => self.take(e).await,
            // The engine hung up without a final event: the response fails.
            None => self.failed(performer_engine::Error::ShuttingDown.into()),
        }
    }

    fn pop(&mut self) -> Option<SseEvent> {
        self.out
            .pop_front()
            .map(|(kind, data)| SseEvent::default().event(kind).data(data.to_string()))
    }

    fn ended(&self) -> bool {
        self.ended
    }
}
