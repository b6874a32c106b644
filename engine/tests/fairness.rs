//! Prompt ingestion shared fairly between tenants: slices rotate between jobs, so a short
//! prompt's first token does not wait for a long prompt's whole ingestion; and a tenant's
//! queued prompt tokens are capped. Deterministic: the tests count ingested tokens, never
//! time, and hold the scheduler inside its first slice (the observer blocks) while they
//! submit the rest.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use performer::{Model, SamplingParams};
use performer_engine::{CompletionRequest, Engine, EngineConfig, Error, Event, Observer};

/// A synthetic tiny model (rotary positions: prompts of any length).
fn tiny() -> (tempfile::TempDir, Arc<Model>) {
    use performer::synthetic::{self, SyntheticShape, WeightDtype};
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(dir.path(), &shape, WeightDtype::F32, 1).unwrap();
    let model = Arc::new(Model::load(dir.path()).unwrap());
    (dir, model)
}

/// Counts ingested prompt tokens and notes how many were in at the first sampled token of
/// any request; its first prompt slice blocks the scheduler until released.
struct Gate {
    ingested: AtomicUsize,
    at_first_token: Mutex<Option<usize>>,
    entered: Mutex<Option<Sender<()>>>,
    release: Mutex<Option<Receiver<()>>>,
}

impl Observer for Gate {
    fn first_token(&self, _latency: std::time::Duration) {
        let mut first = self.at_first_token.lock().unwrap();
        if first.is_none() {
            *first = Some(self.ingested.load(Ordering::SeqCst));
        }
    }

    fn prompt_tokens(&self, n: usize) {
        self.ingested.fetch_add(n, Ordering::SeqCst);
        if let Some(entered) = self.entered.lock().unwrap().take() {
            entered.send(()).unwrap();
            let release = self.release.lock().unwrap().take().unwrap();
            release.recv().unwrap();
        }
    }
}

/// An engine whose scheduler stops in its first prompt slice: the returned receiver says it
/// is there, the sender lets it go on.
fn gated(model: Arc<Model>, cfg: EngineConfig) -> (Engine, Arc<Gate>, Receiver<()>, Sender<()>) {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        ingested: AtomicUsize::new(0),
        at_first_token: Mutex::new(None),
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(Some(release_rx)),
    });
    let engine = Engine::start_with_observer(model, cfg, None, Some(gate.clone())).unwrap();
    (engine, gate, entered_rx, release_tx)
}

fn request(tenant: &str, prompt_len: usize) -> CompletionRequest {
    let mut r = CompletionRequest::new(vec![7; prompt_len], 1, SamplingParams::greedy());
    r.tenant = tenant.to_string();
    r
}

#[test]
fn a_short_prompt_is_not_stuck_behind_a_long_one() {
    let (_dir, model) = tiny();
    // A slice is whole attention chunks: ask for 64 tokens, get what the model makes of it.
    let slice = model.prefill_slice_end(0, 1 << 20, 64);
    let cfg = EngineConfig {
        threads: 2,
        prefill_chunk: 64,
        ..EngineConfig::default()
    };
    let (engine, gate, entered, release) = gated(model, cfg);
    let long = 12 * slice;
    let (long_tx, long_rx) = mpsc::channel();
    engine
        .submit(
            request("big", long),
            Box::new(move |e| long_tx.send(e).is_ok()),
        )
        .unwrap();
    entered.recv().unwrap();
    // The long prompt's first slice is in; the scheduler waits. A short request arrives.
    let small = engine
        .submit(request("small", 5), Box::new(|_| true))
        .unwrap();
    release.send(()).unwrap();
    for e in long_rx {
        if let Event::Done { usage, .. } = e {
            assert_eq!(usage.prompt_tokens, long);
            break;
        }
    }
    drop(small);
    assert_eq!(gate.ingested.load(Ordering::SeqCst), long + 5);
    // The first token sampled (the long prompt cannot have one before all of it is in: it is
    // the short request's) came after the short prompt and at most a few slices of the long.
    let before_first_token = gate.at_first_token.lock().unwrap().unwrap();
    // The short prompt, and at most a slice or two of the long one (its first, and the rest
    // of a tick's budget, whole attention chunks, after the short prompt): not the whole of it.
    assert!(
        before_first_token <= 5 + 2 * slice,
        "{before_first_token} prompt tokens were ingested before the short request's first token"
    );
}

#[test]
fn a_tenant_s_queued_prompt_tokens_are_capped() {
    let (_dir, model) = tiny();
    let cfg = EngineConfig {
        threads: 2,
        prefill_chunk: 64,
        max_tenant_prompt_tokens: 100,
        ..EngineConfig::default()
    };
    let (engine, _gate, entered, release) = gated(model, cfg);
    let (tx, rx) = mpsc::channel();
    let t = tx.clone();
    engine
        .submit(request("a", 80), Box::new(move |e| t.send(e).is_ok()))
        .unwrap();
    entered.recv().unwrap();
    // a's 80 tokens count until its prefill has ended (the scheduler is held inside it): 30
    // more pass the limit of 100, for a only.
    assert!(matches!(
        engine.submit(request("a", 30), Box::new(|_| true)),
        Err(Error::TenantQueueFull {
            asked: 30,
            limit: 100,
            ..
        })
    ));
    assert!(matches!(
        engine.submit(request("a", 101), Box::new(|_| true)),
        Err(Error::TenantQueueFull { .. })
    ));
    let t = tx.clone();
    engine
        .submit(request("b", 30), Box::new(move |e| t.send(e).is_ok()))
        .unwrap();
    release.send(()).unwrap();
    drop(tx);
    let done = rx
        .iter()
        .filter(|e| matches!(e, Event::Done { .. }))
        .count();
    assert_eq!(done, 2);
    // Ingested: a's count is back to zero.
    engine.complete(request("a", 100)).unwrap();
}
