//! `performer loadtest` against the server in-process: every level runs requests, none fails,
//! and the report and its table carry the figures (with authentication and a pre-filled
//! session depth, which exercise the sessions API).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use performer::Model;
use performer_cli::conversation::{self, ConversationOptions};
use performer_cli::loadtest::{self, LoadOptions};
use performer_engine::{Engine, EngineConfig};
use performer_server::{App, Metrics, ServerOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_runs_every_level_against_a_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = Arc::new(Model::load(root.join("models/performer-byte")).unwrap());
    let metrics = Arc::new(Metrics::new());
    let cfg = EngineConfig {
        threads: 2,
        ..EngineConfig::default()
    };
    let engine =
        Arc::new(Engine::start_with_observer(model, cfg, None, Some(metrics.clone())).unwrap());
    let options = ServerOptions {
        api_keys: Some(vec!["k".into()]),
        ..ServerOptions::default()
    };
    let app = App::new(engine, metrics, options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(performer_server::serve(listener, app, async {
        let _ = stopped.await;
    }));
    let reports = loadtest::run(LoadOptions {
        url,
        concurrency: vec![1, 2],
        duration: Duration::from_millis(400),
        max_tokens: 4,
        prompt: "Once upon a time".into(),
        api_key: Some("k".into()),
        depth: 16,
        server_pid: None,
    })
    .await
    .unwrap();
    assert_eq!(
        reports.iter().map(|r| r.concurrency).collect::<Vec<_>>(),
        [1, 2]
    );
    for r in &reports {
        assert!(r.requests > 0, "level {} ran no request", r.concurrency);
        assert_eq!(r.errors, 0, "level {}", r.concurrency);
        assert!(r.tokens_per_s > 0.0);
        assert!(r.ttft_ms.0.is_finite() && r.ttft_ms.0 <= r.ttft_ms.1);
    }
    let table = loadtest::markdown(&reports);
    assert_eq!(table.lines().count(), 2 + reports.len(), "{table}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_compare_previous_response_id_with_whole_resends() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = Arc::new(Model::load(root.join("models/performer-byte")).unwrap());
    let metrics = Arc::new(Metrics::new());
    let cfg = EngineConfig {
        threads: 2,
        ..EngineConfig::default()
    };
    let engine =
        Arc::new(Engine::start_with_observer(model, cfg, None, Some(metrics.clone())).unwrap());
    let app = App::new(engine.clone(), metrics, ServerOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(performer_server::serve(listener, app, async {
        let _ = stopped.await;
    }));
    let report = conversation::run(ConversationOptions {
        url,
        api_key: None,
        turns: 3,
        concurrency: 2,
        max_tokens: 6,
        compare_chat: true,
        chat_every: 1,
        server_pid: None,
    })
    .await
    .unwrap();
    assert_eq!(report.failed, 0);
    assert_eq!(report.requests, 2 * 3 * 2);
    assert_eq!(
        report.mismatched, 0,
        "greedy: both paths begin the same replies"
    );
    assert_eq!(report.turns.len(), 3);
    let t = &report.turns;
    for k in 1..3 {
        // The continuation ingests the new message only, the re-send everything.
        assert!(
            t[k].responses_input_tokens < t[k].chat_prompt_tokens,
            "{t:?}"
        );
        assert!(
            t[k].chat_prompt_tokens > t[k - 1].chat_prompt_tokens,
            "{t:?}"
        );
        assert_eq!(t[k].state_bytes, t[0].state_bytes, "one state per response");
    }
    assert!(t[0].state_bytes > 0);
    assert_eq!(t[0].responses_input_tokens, t[0].chat_prompt_tokens);
    let table = conversation::markdown(&report);
    assert!(table.contains("0 failed"), "{table}");
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("c.svg");
    conversation::svg(&report, "test", &svg).unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    // Each conversation deleted its responses: no session is left.
    assert_eq!(engine.list_sessions("").unwrap().len(), 0);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
