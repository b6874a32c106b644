//! Chat completions and the Responses API in-process: the template's prompt, streaming, `n`,
//! logprobs, structured output, every error case; stored responses as forked sessions, their
//! continuation byte-identical to the whole conversation sent through chat completions, and
//! their persistence across a restart.

mod common;
use common::{assert_error, shipped, sse_data, Server};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use performer::chat::{ChatTemplate, Message};
use performer::generate::{GenerateOptions, Generation};
use performer::{Model, SamplingParams, State};
use performer_engine::{DiskStore, Engine, EngineConfig, SessionStore};
use performer_server::{Metrics, ServerOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start(
    model: Arc<Model>,
    dir: Option<&Path>,
    keys: Option<Vec<String>>,
    template: Option<ChatTemplate>,
) -> Server {
    let store = dir.map(|d| Box::new(DiskStore::open(d).unwrap()) as Box<dyn SessionStore>);
    let metrics = Arc::new(Metrics::new());
    let cfg = EngineConfig {
        threads: 2,
        ..EngineConfig::default()
    };
    let engine =
        Arc::new(Engine::start_with_observer(model, cfg, store, Some(metrics.clone())).unwrap());
    let mut options = ServerOptions {
        model_id: "performer-byte".into(),
        api_keys: keys,
        grace: Duration::from_secs(2),
        ..ServerOptions::default()
    };
    if let Some(t) = template {
        options.chat_template = Arc::new(t);
    }
    Server::serve(engine, metrics, options).await
}

/// The greedy reply of the runtime alone to `messages` under the plain template: the
/// reference the served text must equal.
fn reference(model: &Model, messages: &[Message], max_tokens: usize) -> String {
    let t = ChatTemplate::plain();
    let prompt = t.render(messages, true).unwrap();
    let mut state = State::new(model);
    let options = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: t.stop_strings(),
        ..GenerateOptions::default()
    };
    let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
    Generation::new(model, &mut state, &ids, options)
        .unwrap()
        .collect::<performer::Result<String>>()
        .unwrap()
}

fn user(s: &str) -> Message {
    Message::new("user", s)
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_render_the_template_stream_and_validate() {
    let model = shipped();
    let s = start(model.clone(), None, None, None).await;

    // The playground has a chat tab on the Responses API.
    let page = s.http.get(s.url("/")).send().await.unwrap();
    let page = page.text().await.unwrap();
    assert!(page.contains("/v1/responses") && page.contains("previous_response_id"));
    let v: Value = s
        .http
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["chat_template"]["origin"], "default");
    assert_eq!(v["data"][0]["chat_template"]["stop"], json!(["\nuser:"]));

    let messages = json!([{"role": "system", "content": "A story."}, {"role": "user", "content": "Once upon a time"}]);
    let want = reference(
        &model,
        &[Message::new("system", "A story."), user("Once upon a time")],
        24,
    );
    let v = s
        .post_json(
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 24, "temperature": 0}),
        )
        .await;
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(content(&v), want);
    let prompt = "system: A story.\nuser: Once upon a time\nassistant: ";
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    // max_completion_tokens is max_tokens' newer name; content parts are joined.
    let parts = json!([{"role": "system", "content": [{"type": "text", "text": "A "}, {"type": "text", "text": "story."}]},
                       {"role": "user", "content": "Once upon a time"}]);
    let v2 = s
        .post_json(
            "/v1/chat/completions",
            json!({"messages": parts, "max_completion_tokens": 24, "temperature": 0}),
        )
        .await;
    assert_eq!(content(&v2), want);

    // Streaming: the role first, the same text, a finish reason, the usage, [DONE].
    let r = s
        .post(
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 24, "temperature": 0, "stream": true,
                   "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    let reasons: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|r| !r.is_null())
        .collect();
    assert_eq!(reasons.len(), 1);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][k], v["usage"][k], "{k}");
    }
    // The same prompt again: the prefix-state cache resumes it whole.
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        v["usage"]["prompt_tokens"]
    );

    // n choices with seeds seed + i; logprobs with alternatives, one entry per token.
    let one = |seed: u64| {
        json!({"messages": messages, "max_tokens": 12, "temperature": 1, "seed": seed,
               "logprobs": true, "top_logprobs": 2})
    };
    let mut body = one(7);
    body["n"] = json!(2);
    let v = s.post_json("/v1/chat/completions", body).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, seed) in [(0, 7), (1, 8)] {
        let single = s.post_json("/v1/chat/completions", one(seed)).await;
        assert_eq!(choices[i]["index"], i);
        assert_eq!(choices[i]["message"], single["choices"][0]["message"]);
        let lp = choices[i]["logprobs"]["content"].as_array().unwrap();
        let text = choices[i]["message"]["content"].as_str().unwrap();
        // Byte-level: one entry per byte returned.
        assert_eq!(lp.len(), text.len());
        for e in lp {
            assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
            assert!(e["logprob"].as_f64().unwrap() <= 0.0);
            assert_eq!(e["bytes"].as_array().unwrap().len(), 1);
        }
    }
    assert_eq!(v["usage"]["completion_tokens"], {
        let a = choices[0]["message"]["content"].as_str().unwrap().len();
        let b = choices[1]["message"]["content"].as_str().unwrap().len();
        a + b
    });

    // stop: the user's and the template's.
    let v = s
        .post_json(
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 24, "temperature": 0, "stop": [" "]}),
        )
        .await;
    let cut = want.split(' ').next().unwrap();
    assert_eq!(content(&v), cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Structured output.
    let schema = json!({"type": "object", "properties": {"a": {"enum": ["x", "y"]}},
                        "required": ["a"], "additionalProperties": false});
    let v = s
        .post_json(
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 64, "temperature": 1, "seed": 3,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}),
        )
        .await;
    let doc: Value = serde_json::from_str(&content(&v)).unwrap();
    assert!(doc["a"] == "x" || doc["a"] == "y", "{doc}");

    // Errors, in the OpenAI shape.
    let bad = [
        (json!({"messages": []}), "invalid_parameter"),
        (json!({}), "invalid_parameter"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "invalid_role",
        ),
        (json!({"messages": [{"content": "x"}]}), "invalid_role"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            "unsupported_content",
        ),
        (
            json!({"messages": messages, "top_logprobs": 2}),
            "invalid_parameter",
        ),
        (
            json!({"messages": messages, "logprobs": true, "top_logprobs": 9}),
            "invalid_parameter",
        ),
        (
            json!({"messages": messages, "max_tokens": 2, "max_completion_tokens": 2}),
            "invalid_parameter",
        ),
        (
            json!({"messages": messages, "temperature": -1}),
            "invalid_parameter",
        ),
        (json!({"messages": messages, "n": 0}), "invalid_parameter"),
        (json!({"messages": "hi"}), "invalid_type"),
        (
            json!({"messages": messages, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}),
            "invalid_constraint",
        ),
    ];
    for (body, code) in bad {
        let r = s.post("/v1/chat/completions", body.clone()).await;
        assert_error(r, StatusCode::BAD_REQUEST, code).await;
    }
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "invalid_json").await;
    s.shutdown().await;
}

/// The output text of a response object.
fn output(v: &Value) -> String {
    v["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no output text in {v}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_through_previous_response_id_is_the_whole_conversation() {
    let model = shipped();
    let s = start(model.clone(), None, None, None).await;
    let turns = ["Once upon a time", "And then?", "What next?"];
    for sampling in [
        json!({"temperature": 0}),
        json!({"temperature": 1, "seed": 11}),
    ] {
        let mut prev: Option<String> = None;
        let mut history: Vec<Value> = vec![json!({"role": "system", "content": "Tell a story."})];
        for (k, turn) in turns.iter().enumerate() {
            let mut body = json!({"input": turn, "max_output_tokens": 20});
            for (key, val) in sampling.as_object().unwrap() {
                body[key] = val.clone();
            }
            match &prev {
                Some(p) => body["previous_response_id"] = json!(p),
                None => body["instructions"] = json!("Tell a story."),
            }
            let r = s.post_json("/v1/responses", body).await;
            assert_eq!(r["object"], "response", "{r}");
            let id = r["id"].as_str().unwrap().to_string();
            assert!(id.starts_with("resp_"));
            let text = output(&r);
            assert!(
                !text.is_empty(),
                "turn {k}: an empty reply would prove nothing"
            );
            // The whole conversation at once through chat completions: the same text.
            history.push(json!({"role": "user", "content": turn}));
            let mut chat = json!({"messages": history, "max_tokens": 20});
            for (key, val) in sampling.as_object().unwrap() {
                chat[key] = val.clone();
            }
            let c = s.post_json("/v1/chat/completions", chat).await;
            assert_eq!(text, content(&c), "turn {k}, {sampling}");
            // Only the new input is ingested: the delta, not the history.
            let full = c["usage"]["prompt_tokens"].as_u64().unwrap();
            let ingested = r["usage"]["input_tokens"].as_u64().unwrap();
            if k == 0 {
                assert_eq!(ingested, full);
            } else {
                let delta = format!("\nuser: {turn}\nassistant: ");
                assert_eq!(ingested as usize, delta.len(), "turn {k}");
                assert!(ingested < full);
            }
            assert_eq!(
                r["usage"]["output_tokens"].as_u64().unwrap() as usize,
                text.len()
            );
            // The stored state is the conversation so far: position = the whole prompt + reply.
            let sess: Value = s
                .http
                .get(s.url(&format!("/v1/sessions/{id}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(sess["position"].as_u64().unwrap(), full + text.len() as u64);
            history.push(json!({"role": "assistant", "content": text}));
            prev = Some(id);
        }
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_store_fork_stream_get_delete_and_errors() {
    let model = shipped();
    let keys = vec!["key-a".to_string(), "key-b".to_string()];
    let s = start(model.clone(), None, Some(keys), None).await;
    let post = |key: &'static str, path: &'static str, body: Value| {
        let req = s.http.post(s.url(path)).bearer_auth(key).json(&body);
        async move { req.send().await.unwrap() }
    };
    let get = |key: &'static str, path: String| {
        let req = s.http.get(s.url(&path)).bearer_auth(key);
        async move { req.send().await.unwrap() }
    };
    let first: Value = post(
        "key-a",
        "/v1/responses",
        json!({"input": "Once upon a time", "max_output_tokens": 16, "temperature": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(
        first["status"], "incomplete",
        "16 tokens cut the reply: {first}"
    );
    assert_eq!(first["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(first["store"], true);
    let got: Value = get("key-a", format!("/v1/responses/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got, first);
    // Another tenant sees nothing.
    assert_error(
        get("key-b", format!("/v1/responses/{id}")).await,
        StatusCode::NOT_FOUND,
        "response_not_found",
    )
    .await;
    let state_before: Value = get("key-a", format!("/v1/sessions/{id}"))
        .await
        .json()
        .await
        .unwrap();

    // Two continuations of one response are two forks: the same greedy text, two ids, the
    // original untouched.
    let cont = json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "More."}]}],
                      "previous_response_id": id, "max_output_tokens": 16, "temperature": 0});
    let a: Value = post("key-a", "/v1/responses", cont.clone())
        .await
        .json()
        .await
        .unwrap();
    let b: Value = post("key-a", "/v1/responses", cont.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(a["id"], b["id"]);
    assert_eq!(output(&a), output(&b));
    assert_eq!(a["previous_response_id"], id.as_str());
    let state_after: Value = get("key-a", format!("/v1/sessions/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(state_after["position"], state_before["position"]);
    let a_state: Value = get(
        "key-a",
        format!("/v1/sessions/{}", a["id"].as_str().unwrap()),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        a_state["state_bytes"], state_before["state_bytes"],
        "one state per response, whatever its length"
    );

    // Streaming: the semantic events in order, the deltas adding up to the stored text.
    let r = post("key-a", "/v1/responses", json!({"input": "More.", "previous_response_id": id, "max_output_tokens": 16, "temperature": 0, "stream": true})).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let events: Vec<(String, Value)> = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let kind = e
                .lines()
                .find_map(|l| l.strip_prefix("event:"))
                .unwrap()
                .trim()
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .unwrap()
                .trim();
            (kind, serde_json::from_str(data).unwrap())
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        &kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        &kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete"
        ]
    );
    for (i, (k, d)) in events.iter().enumerate() {
        assert_eq!(d["type"], k.as_str());
        assert_eq!(d["sequence_number"], i);
    }
    let deltas: String = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, output(&a));
    let done = &events.last().unwrap().1["response"];
    let sid = done["id"].as_str().unwrap();
    let got: Value = get("key-a", format!("/v1/responses/{sid}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(&got, done);

    // store: false keeps nothing, first turn or continuation.
    let sessions = |key: &'static str| {
        let req = s.http.get(s.url("/v1/sessions")).bearer_auth(key);
        async move {
            req.send().await.unwrap().json::<Value>().await.unwrap()["data"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    let before = sessions("key-a").await;
    for extra in [json!({}), json!({"previous_response_id": id})] {
        let mut body =
            json!({"input": "More.", "max_output_tokens": 4, "store": false, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v: Value = post("key-a", "/v1/responses", body)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["store"], false);
        assert_error(
            get(
                "key-a",
                format!("/v1/responses/{}", v["id"].as_str().unwrap()),
            )
            .await,
            StatusCode::NOT_FOUND,
            "response_not_found",
        )
        .await;
    }
    // The continuation's fork is deleted as soon as the engine lets go of it.
    for _ in 0..100 {
        if sessions("key-a").await == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sessions("key-a").await, before);

    // Errors.
    let bad = [
        (json!({}), StatusCode::BAD_REQUEST, "invalid_parameter"),
        (
            json!({"input": []}),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            json!({"input": [{"type": "function_call_output", "output": "x"}]}),
            StatusCode::BAD_REQUEST,
            "unsupported_input",
        ),
        (
            json!({"input": "x", "previous_response_id": "resp_nope"}),
            StatusCode::NOT_FOUND,
            "response_not_found",
        ),
        (
            json!({"input": "x", "previous_response_id": id, "instructions": "Other."}),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            json!({"input": "x", "temperature": -1}),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            json!({"input": "x", "text": {"format": {"type": "nope"}}}),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
    ];
    for (body, status, code) in bad {
        assert_error(post("key-a", "/v1/responses", body).await, status, code).await;
    }
    // A plain session is not a response.
    let sess: Value = post("key-a", "/v1/sessions", json!({"prompt": "x"}))
        .await
        .json()
        .await
        .unwrap();
    assert_error(
        get(
            "key-a",
            format!("/v1/responses/{}", sess["id"].as_str().unwrap()),
        )
        .await,
        StatusCode::NOT_FOUND,
        "response_not_found",
    )
    .await;

    // Structured output through text.format.
    let schema = json!({"type": "object", "properties": {"a": {"enum": ["x", "y"]}},
                        "required": ["a"], "additionalProperties": false});
    let v: Value = post("key-a", "/v1/responses", json!({"input": "JSON:", "max_output_tokens": 64, "seed": 1,
        "text": {"format": {"type": "json_schema", "name": "t", "schema": schema, "strict": true}}}))
        .await
        .json()
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&output(&v)).unwrap();
    assert!(doc["a"] == "x" || doc["a"] == "y", "{doc}");
    assert_eq!(v["text"]["format"]["type"], "json_schema");

    // Delete: the response and its state go; a second delete is a 404.
    let del = |key: &'static str, path: String| {
        let req = s.http.delete(s.url(&path)).bearer_auth(key);
        async move { req.send().await.unwrap() }
    };
    assert_error(
        del("key-b", format!("/v1/responses/{id}")).await,
        StatusCode::NOT_FOUND,
        "response_not_found",
    )
    .await;
    let r = del("key-a", format!("/v1/responses/{id}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], true);
    assert_error(
        get("key-a", format!("/v1/responses/{id}")).await,
        StatusCode::NOT_FOUND,
        "response_not_found",
    )
    .await;
    assert_error(
        del("key-a", format!("/v1/responses/{id}")).await,
        StatusCode::NOT_FOUND,
        "response_not_found",
    )
    .await;
    // Its continuations stand alone.
    let got = get(
        "key-a",
        format!("/v1/responses/{}", a["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got.status(), 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_survive_a_restart_and_templates_must_be_prefix_stable() {
    let model = shipped();
    let dir = tempfile::tempdir().unwrap();
    let s = start(model.clone(), Some(dir.path()), None, None).await;
    let first = s
        .post_json(
            "/v1/responses",
            json!({"input": "Once upon a time", "max_output_tokens": 8, "temperature": 0}),
        )
        .await;
    let id = first["id"].as_str().unwrap().to_string();
    let cont = json!({"input": "More.", "previous_response_id": id, "max_output_tokens": 8, "temperature": 0});
    let before = s.post_json("/v1/responses", cont.clone()).await;
    assert!(s.shutdown().await >= 2);

    let s = start(model.clone(), Some(dir.path()), None, None).await;
    let got = s
        .http
        .get(s.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.json::<Value>().await.unwrap(), first);
    let after = s.post_json("/v1/responses", cont).await;
    assert_eq!(output(&after), output(&before));
    s.shutdown().await;

    // A template that rewrites the reply (strips it) cannot continue from the state: a 400
    // that says so, and nothing is kept.
    let strip = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
        "",
        "",
    )
    .unwrap();
    let s = start(model, None, None, Some(strip)).await;
    // Greedy, the reply of this prompt ends in a space (checked below): trimmed, it is not
    // what the state holds.
    let mut seen_space = false;
    for n in 2..40 {
        let v = s
            .post_json(
                "/v1/responses",
                json!({"input": "Once upon a time", "max_output_tokens": n, "temperature": 0}),
            )
            .await;
        if !output(&v).ends_with(' ') {
            continue;
        }
        seen_space = true;
        let r = s
            .post(
                "/v1/responses",
                json!({"input": "x", "previous_response_id": v["id"]}),
            )
            .await;
        let e = assert_error(r, StatusCode::BAD_REQUEST, "chat_template").await;
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prefix-stable"));
        break;
    }
    assert!(seen_space, "no greedy reply ended in a space");
    s.shutdown().await;
}
