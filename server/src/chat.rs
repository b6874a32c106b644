//! `POST /v1/chat/completions`: messages rendered with the model's chat template
//! ([`performer::chat`]), then a stateless completion, as JSON or `chat.completion.chunk`
//! server-sent events.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use performer::chat::Message;
use performer::tokenizer::Tokenizer;
use performer_engine::{CompletionRequest, Event, Target, TokenLogprob, Usage};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::completions::{body_bytes, now, random_id, submit, CancelOnDrop};
use crate::error::ApiError;
use crate::openai::{
    parse, token_text, usage_json, CompletionBody, ResponseFormat, Stop, StreamOptions,
};
use crate::sse;
use crate::{App, Tenant};

/// `max_tokens` of a chat completion or a response that gives none: replies end at the
/// template's stop string long before, as a rule.
pub const DEFAULT_MAX_TOKENS: u64 = 1024;

/// A message's `content`: a string, or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    /// Plain text.
    Text(String),
    /// Parts: `{"type": "text" | "input_text" | "output_text", "text": …}`.
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub(crate) struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// A message as the OpenAI APIs take it.
#[derive(Debug, Deserialize)]
pub(crate) struct InMessage {
    pub(crate) role: Option<String>,
    pub(crate) content: Option<Content>,
    /// Responses API input items: `"message"` (or absent); other item types are refused.
    #[serde(rename = "type")]
    pub(crate) kind: Option<String>,
}

impl InMessage {
    /// The template's message: text parts joined, `developer` read as `system`; tools and
    /// non-text parts are refused with a 400 naming them.
    pub(crate) fn to_message(&self, at: usize) -> Result<Message, ApiError> {
        if let Some(k) = self.kind.as_deref().filter(|k| *k != "message") {
            return Err(ApiError::bad_request(
                "unsupported_input",
                format!("input item {at}: type `{k}` is not supported (text messages only)"),
            ));
        }
        let role = match self.role.as_deref() {
            Some("developer") => "system",
            Some(r @ ("system" | "user" | "assistant")) => r,
            Some(r) => {
                return Err(ApiError::bad_request(
                    "invalid_role",
                    format!("message {at}: role `{r}` is not supported (system, developer, user, assistant)"),
                ))
            }
            None => {
                return Err(ApiError::bad_request(
                    "invalid_role",
                    format!("message {at} has no role"),
                ))
            }
        };
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text" | "input_text" | "output_text", Some(t)) => s.push_str(t),
                        (k, _) => {
                            return Err(ApiError::bad_request(
                                "unsupported_content",
                                format!(
                                    "message {at}: content part `{k}` is not supported (text only)"
                                ),
                            ))
                        }
                    }
                }
                s
            }
        };
        Ok(Message::new(role, content))
    }
}

/// The body of `POST /v1/chat/completions` (unknown fields are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct ChatBody {
    messages: Option<Vec<InMessage>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    n: Option<u32>,
    top_k: Option<u32>,
    repetition_penalty: Option<f32>,
    response_format: Option<ResponseFormat>,
    grammar: Option<String>,
}

/// The sampling fields shared by chat completions and responses, as a Completions body (the
/// prompt is set from the template afterwards).
pub(crate) fn completion_body(
    max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
) -> CompletionBody {
    CompletionBody {
        max_tokens: Some(max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        temperature,
        top_p,
        seed,
        ..CompletionBody::default()
    }
}

/// Adds the template's stop strings to a request's own.
pub(crate) fn add_template_stops(app: &App, req: &mut CompletionRequest) {
    for s in app.options.chat_template.stop_strings() {
        if !req.stop.contains(&s) {
            req.stop.push(s);
        }
    }
}

/// `POST /v1/chat/completions`.
pub(crate) async fn completions(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(&app, &tenant.0, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run(
    app: &Arc<App>,
    tenant: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let parsed: ChatBody = parse(&bytes)?;
    let messages = parsed
        .messages
        .as_deref()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("invalid_parameter", "messages must not be empty"))?
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_message(i))
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.max_tokens.is_some() && parsed.max_completion_tokens.is_some() {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "give max_tokens or max_completion_tokens, not both",
        ));
    }
    let logprobs = match (parsed.logprobs.unwrap_or(false), parsed.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "top_logprobs needs logprobs: true",
            ))
        }
        (false, None) => None,
        (true, k) => Some(k.unwrap_or(0)),
    };
    let mut cb = completion_body(
        parsed.max_completion_tokens.or(parsed.max_tokens),
        parsed.temperature,
        parsed.top_p,
        parsed.seed,
    );
    cb.stop = parsed.stop;
    cb.logprobs = logprobs;
    cb.n = parsed.n;
    cb.top_k = parsed.top_k;
    cb.repetition_penalty = parsed.repetition_penalty;
    cb.response_format = parsed.response_format;
    cb.grammar = parsed.grammar;
    let model = app.engine.model();
    let mut req = cb.to_request(tenant, Target::Stateless, model.tokenizer())?;
    let prompt = app.options.chat_template.render(&messages, true)?;
    req.prompt = model.tokenizer().encode_continuation(&prompt)?;
    add_template_stops(app, &mut req);
    req.constraint = cb.constraint(model)?;
    let n = req.n;
    let (rx, guard) = submit(app, req).await?;
    let head = Head {
        id: random_id("chatcmpl-"),
        created: now(),
        model: app.options.model_id.clone(),
        tokenizer: model.tokenizer().clone(),
    };
    if parsed.stream.unwrap_or(false) {
        let include_usage = parsed
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(stream_response(head, rx, guard, include_usage, n))
    } else {
        let c = collect(rx, n).await?;
        let choices: Vec<Value> = (0..n)
            .map(|i| {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.texts[i], "refusal": null},
                    "logprobs": if logprobs.is_some() { chat_logprobs(&c.logprobs[i], &head.tokenizer) } else { Value::Null },
                    "finish_reason": c.reasons[i],
                })
            })
            .collect();
        drop(guard);
        Ok(
            Json(head.object("chat.completion", Value::Array(choices), Some(&c.usage)))
                .into_response(),
        )
    }
}

/// What a request's events add up to.
pub(crate) struct Collected {
    /// Text per choice.
    pub(crate) texts: Vec<String>,
    /// Log-probabilities per choice (when asked for).
    pub(crate) logprobs: Vec<Vec<TokenLogprob>>,
    /// `"stop"` or `"length"` per choice.
    pub(crate) reasons: Vec<&'static str>,
    /// Token counts.
    pub(crate) usage: Usage,
}

/// Reads a request's events to its end.
pub(crate) async fn collect(
    mut rx: UnboundedReceiver<Event>,
    n: usize,
) -> Result<Collected, ApiError> {
    let mut c = Collected {
        texts: vec![String::new(); n],
        logprobs: vec![Vec::new(); n],
        reasons: vec!["length"; n],
        usage: Usage::default(),
    };
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text {
                choice,
                text,
                logprobs,
            } => {
                c.texts[choice].push_str(&text);
                c.logprobs[choice].extend(logprobs);
            }
            Event::Finished { choice, reason } => c.reasons[choice] = reason.as_str(),
            Event::Failed(e) => return Err(e.into()),
            Event::Done { usage, .. } => {
                c.usage = usage;
                return Ok(c);
            }
        }
    }
    Err(performer_engine::Error::ShuttingDown.into())
}

/// A token's bytes: the byte of a byte-level token, else its text's (none for a token without
/// text).
fn token_bytes(tokenizer: &Tokenizer, token: u32) -> Vec<u8> {
    if tokenizer.is_byte_level() {
        return u8::try_from(token).map_or_else(|_| Vec::new(), |b| vec![b]);
    }
    tokenizer
        .decode(&[token])
        .map_or_else(|_| Vec::new(), String::into_bytes)
}

/// The chat `logprobs` object: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.
pub(crate) fn chat_logprobs(lps: &[TokenLogprob], tokenizer: &Tokenizer) -> Value {
    let entry = |t: u32, lp: f32| json!({"token": token_text(tokenizer, t), "logprob": lp, "bytes": token_bytes(tokenizer, t)});
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|&(t, lp)| entry(t, lp)).collect());
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

struct Head {
    id: String,
    created: u64,
    model: String,
    tokenizer: Tokenizer,
}

impl Head {
    fn object(&self, object: &str, choices: Value, usage: Option<&Usage>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = usage_json(u);
        }
        v
    }
}

struct StreamState {
    head: Head,
    _guard: CancelOnDrop,
    include_usage: bool,
    started: Vec<bool>,
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
        started: vec![false; n],
    };
    sse::data_response(st, rx)
}

impl StreamState {
    fn chunk(&mut self, choice: usize, mut delta: Value, logprobs: Value, reason: Value) -> Value {
        if !self.started[choice] {
            self.started[choice] = true;
            delta["role"] = json!("assistant");
        }
        self.head.object(
            "chat.completion.chunk",
            json!([{"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]),
            None,
        )
    }
}

impl sse::DataStream for StreamState {
    fn take(&mut self, e: Event, out: &mut sse::DataEvents) {
        match e {
            Event::Text {
                choice,
                text,
                logprobs,
            } => {
                let lp = if logprobs.is_empty() {
                    Value::Null
                } else {
                    chat_logprobs(&logprobs, &self.head.tokenizer)
                };
                out.send(&self.chunk(choice, json!({"content": text}), lp, Value::Null));
            }
            Event::Finished { choice, reason } => {
                out.send(&self.chunk(choice, json!({}), Value::Null, json!(reason.as_str())));
            }
            Event::Done { usage, .. } => {
                if self.include_usage {
                    out.send(
                        &self
                            .head
                            .object("chat.completion.chunk", json!([]), Some(&usage)),
                    );
                }
                out.finish();
            }
            Event::Failed(e) => out.fail(e),
        }
    }
}
