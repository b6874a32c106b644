//! The OpenAI Completions request body and the JSON of responses and stream chunks.

use performer::constraint::{Constraint, Grammar};
use performer::tokenizer::Tokenizer;
use performer::{Model, SamplingParams};
use performer_engine::{CompletionRequest, Target, TokenLogprob, Usage};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    pub include_usage: Option<bool>,
}

/// The body of `POST /v1/completions` (unknown fields are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct CompletionBody {
    /// The prompt text.
    pub prompt: Option<String>,
    /// Tokens to generate per choice (default 16).
    pub max_tokens: Option<u64>,
    /// Sampling temperature (default 1; 0 is greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (default 1: off).
    pub top_p: Option<f32>,
    /// Seed of the sampler (default: random).
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Top alternatives per token, 0–5.
    pub logprobs: Option<u32>,
    /// Choices.
    pub n: Option<u32>,
    /// Extension: keep the k most likely tokens (0: all).
    pub top_k: Option<u32>,
    /// Extension: CTRL-style repetition penalty (1: off).
    pub repetition_penalty: Option<f32>,
    /// Structured output: `{"type": "text"}` (none), `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name": …, "schema": {…}}}`.
    pub response_format: Option<ResponseFormat>,
    /// Extension: a Lark grammar (llguidance's dialect) the text must match, as llama.cpp's
    /// `grammar` takes GBNF.
    pub grammar: Option<String>,
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Plain text: no constraint.
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// `{"name": …, "schema": {…}, "strict": …}` as OpenAI's API takes it.
        json_schema: JsonSchemaFormat,
    },
}

/// `response_format.json_schema` in OpenAI's shape: its `name`, `description` and `strict`
/// are accepted and not used (every output is valid, strict or not).
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    /// The JSON schema.
    pub schema: Option<Value>,
}

/// Parses a JSON body into `T`, as a 400 in the OpenAI shape when it is malformed.
pub fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() {
            "invalid_type"
        } else {
            "invalid_json"
        };
        ApiError::bad_request(code, format!("invalid request body: {e}"))
    })
}

impl CompletionBody {
    /// Whether the response streams.
    pub fn streams(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The engine request for `tenant` on `target`.
    /// The prompt is encoded with `tokenizer` (the model's).
    pub fn to_request(
        &self,
        tenant: &str,
        target: Target,
        tokenizer: &Tokenizer,
    ) -> Result<CompletionRequest, ApiError> {
        let prompt = self.prompt.clone().unwrap_or_default();
        let seed = self.seed.unwrap_or_else(random_seed);
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.filter(|&k| k > 0).map(|k| k as usize),
            // 1 keeps every token (no nucleus cut); anything else outside (0, 1] is refused
            // by the sampler's validation with a 400 naming top_p.
            top_p: self.top_p.filter(|&p| p != 1.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed,
            ..SamplingParams::default()
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "stop takes at most 4 strings",
            ));
        }
        let max_tokens = usize::try_from(self.max_tokens.unwrap_or(16))
            .map_err(|_| ApiError::bad_request("invalid_parameter", "max_tokens is too large"))?;
        Ok(CompletionRequest {
            tenant: tenant.to_string(),
            prompt: tokenizer.encode(&prompt)?,
            max_tokens,
            sampling,
            stop,
            logprobs: self.logprobs.map(|k| k as usize),
            n: self.n.unwrap_or(1) as usize,
            target,
            constraint: None,
        })
    }

    /// The constraint that `response_format` or `grammar` asks for (none for text), compiled
    /// for `model`: an invalid one is a 400 naming the problem, before anything is generated.
    pub fn constraint(&self, model: &Model) -> Result<Option<Grammar>, ApiError> {
        let c = match (&self.response_format, &self.grammar) {
            (Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }), Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    "give response_format or grammar, not both",
                ))
            }
            (_, Some(g)) => Constraint::Lark(g.clone()),
            (None | Some(ResponseFormat::Text), None) => return Ok(None),
            (Some(ResponseFormat::JsonObject), None) => Constraint::Json,
            (Some(ResponseFormat::JsonSchema { json_schema }), None) => match &json_schema.schema {
                Some(s) => Constraint::JsonSchema(s.clone()),
                None => {
                    return Err(ApiError::bad_request(
                        "invalid_parameter",
                        "response_format.json_schema.schema is missing",
                    ))
                }
            },
        };
        Ok(Some(Grammar::compile(
            &c,
            model.tokenizer(),
            model.vocab_size(),
        )?))
    }
}

/// A seed from the clock and a counter, for requests that give none.
fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut s = t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    performer::sampling::splitmix64(&mut s)
}

/// A token's text in logprobs. Byte-level: the byte as text when it is ASCII, else
/// `bytes:\xNN`. Other tokenizers: the token's decoded text, or `<ID>` when the token alone is
/// not whole UTF-8 (part of a character) or has no text.
pub(crate) fn token_text(tokenizer: &Tokenizer, token: u32) -> String {
    if tokenizer.is_byte_level() {
        return match u8::try_from(token) {
            Ok(b) if b.is_ascii() => (b as char).to_string(),
            Ok(b) => format!("bytes:\\x{b:02x}"),
            Err(_) => format!("<{token}>"),
        };
    }
    match tokenizer.decode(&[token]) {
        Ok(t) if !t.is_empty() && !t.contains('\u{FFFD}') => t,
        _ => format!("<{token}>"),
    }
}

/// The OpenAI `logprobs` object of a run of tokens, with text offsets (bytes) from `offset`.
pub fn logprobs_json(lps: &[TokenLogprob], offset: usize, tokenizer: &Tokenizer) -> Value {
    let tokens: Vec<String> = lps.iter().map(|l| token_text(tokenizer, l.token)).collect();
    let token_logprobs: Vec<f32> = lps.iter().map(|l| l.logprob).collect();
    let top: Vec<Value> = lps
        .iter()
        .map(|l| {
            let m: serde_json::Map<String, Value> = l
                .top
                .iter()
                .map(|(t, lp)| (token_text(tokenizer, *t), json!(lp)))
                .collect();
            Value::Object(m)
        })
        .collect();
    let mut off = offset;
    let text_offset: Vec<usize> = lps
        .iter()
        .map(|l| {
            let o = off;
            off += if tokenizer.is_byte_level() {
                usize::from(l.token < 256)
            } else {
                tokenizer.decode(&[l.token]).map_or(0, |t| t.len())
            };
            o
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// The `usage` object, with `prompt_tokens_details.cached_tokens`: the prompt tokens the
/// prefix cache's state already held (not ingested again).
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}
