//! The serving engine without HTTP: batching determinism, n > 1, stops with rollback,
//! logprobs, limits, cancellation, sessions (busy, tenants, fork, snapshots, spill, expiry,
//! restart).

mod common;

use common::{generate_text, shipped, toks};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use performer::{Error as RtError, Model, SamplingParams, State};
use performer_engine::Error;
use performer_engine::{
    CompletionRequest, DiskStore, Engine, EngineConfig, Event, FinishReason, Observer, Target,
};

fn config() -> EngineConfig {
    EngineConfig {
        threads: 2,
        // These tests hold and count prompt ingestion with prompts they send more than once;
        // the prefix cache would skip ingesting the repeats (tests/prefix_cache.rs tests it).
        prefix_cache_memory: 0,
        ..EngineConfig::default()
    }
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: Some(40),
        top_p: Some(0.95),
        seed,
        ..SamplingParams::default()
    }
}

const PROMPTS: [&str; 16] = [
    "The sea",
    "Once upon a time",
    "In the beginning",
    "A road",
    "She said",
    "It was night",
    "The king",
    "Water",
    "He walked",
    "Light fell",
    "The old man",
    "Under the tree",
    "Rain",
    "My friend",
    "The city",
    "When we",
];

#[test]
fn batched_logits_equal_single_stream_logits() {
    let model = shipped();
    let mut single: Vec<State> = Vec::new();
    let mut batched: Vec<State> = Vec::new();
    for p in PROMPTS {
        let mut s = State::new(&model);
        model.prefill(&mut s, &toks(p)).unwrap();
        batched.push(s.clone());
        single.push(s);
    }
    for step in 0..8u32 {
        let tokens: Vec<u32> = (0..16).map(|i| 97 + (i + step) % 26).collect();
        for (s, &t) in single.iter_mut().zip(&tokens) {
            model.step(s, t).unwrap();
        }
        let mut refs: Vec<&mut State> = batched.iter_mut().collect();
        model.step_batch(&mut refs, &tokens).unwrap();
        for (a, b) in single.iter().zip(&batched) {
            let (a, b) = (a.logits().unwrap(), b.logits().unwrap());
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            // The bound: batched and single-stream products differ only in f32
            // summation order, 1e-5 relative to the largest logit.
            assert!(
                worst <= 1e-5 * scale,
                "step {step}: {worst} vs scale {scale}"
            );
        }
    }
}

/// Stronger than the bound on the shipped model (untied output projection, f16
/// weights, local and FAVOR+ heads): every product of a batched tick is computed in the same
/// order as single-stream decoding computes it (`kernels::matvec_batch`), and attention is
/// the same per-row code, so the logits are bit for bit the same, at every batch size the
/// register tiles split differently (odd sizes leave edge tiles).
#[test]
fn batched_logits_are_bit_identical_to_single_stream() {
    let model = shipped();
    for rows in [2usize, 3, 5, 16] {
        let mut single: Vec<State> = Vec::new();
        for p in &PROMPTS[..rows] {
            let mut s = State::new(&model);
            model.prefill(&mut s, &toks(p)).unwrap();
            single.push(s);
        }
        let mut batched = single.clone();
        for step in 0..4u32 {
            let tokens: Vec<u32> = (0..rows as u32).map(|i| 97 + (i + step) % 26).collect();
            for (s, &t) in single.iter_mut().zip(&tokens) {
                model.step(s, t).unwrap();
            }
            let mut refs: Vec<&mut State> = batched.iter_mut().collect();
            model.step_batch(&mut refs, &tokens).unwrap();
            for (i, (a, b)) in single.iter().zip(&batched).enumerate() {
                let bits = |s: &State| -> Vec<u32> {
                    s.logits().unwrap().iter().map(|x| x.to_bits()).collect()
                };
                assert!(
                    bits(a) == bits(b),
                    "batch of {rows}, step {step}, row {i}: logits differ"
                );
            }
        }
    }
}

/// Records the largest batch; when armed, its next prompt slice holds the scheduler until
/// released (so that requests submitted meanwhile are admitted together).
#[derive(Default)]
struct Held {
    max_batch: AtomicUsize,
    /// Ticks that stepped a batch.
    batches: AtomicUsize,
    hold: std::sync::Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl Observer for Held {
    fn prompt_tokens(&self, _n: usize) {
        if let Some((entered, release)) = self.hold.lock().unwrap().take() {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
    }
    fn batch(&self, rows: usize) {
        self.max_batch.fetch_max(rows, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn text_is_the_same_alone_and_among_sixteen() {
    let model = shipped();
    let held = Arc::new(Held::default());
    let engine =
        Engine::start_with_observer(model.clone(), config(), None, Some(held.clone())).unwrap();
    let greedy = |p: &str| CompletionRequest::new(toks(p), 24, SamplingParams::greedy());
    let sampled = |p: &str, i: u64| CompletionRequest::new(toks(p), 24, seeded(1000 + i));
    let alone_greedy = engine.complete(greedy(PROMPTS[0])).unwrap().choices[0]
        .text
        .clone();
    let alone_seeded = engine.complete(sampled(PROMPTS[1], 1)).unwrap().choices[0]
        .text
        .clone();
    assert_eq!(alone_greedy, generate_text(&model, PROMPTS[0], 24));
    assert!(!alone_greedy.is_empty());

    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *held.hold.lock().unwrap() = Some((entered_tx, release_rx));
    let (tx, rx) = mpsc::channel();
    for (i, p) in PROMPTS.iter().enumerate() {
        let req = if i.is_multiple_of(2) {
            greedy(p)
        } else {
            sampled(p, i as u64)
        };
        let tx = tx.clone();
        engine
            .submit(req, Box::new(move |e| tx.send((i, e)).is_ok()))
            .unwrap();
        if i == 0 {
            // The scheduler holds in the first prompt until the other 15 are queued.
            entered.recv().unwrap();
        }
    }
    release.send(()).unwrap();
    drop(tx);
    let mut texts = vec![String::new(); 16];
    let mut done = 0;
    for (i, e) in rx {
        match e {
            Event::Text { text, .. } => texts[i].push_str(&text),
            Event::Done { .. } => done += 1,
            Event::Failed(e) => panic!("request {i} failed: {e}"),
            Event::Finished { .. } => {}
        }
    }
    assert_eq!(done, 16);
    // They ran together: the 15 queued prompts (a few short slices) are in before the first
    // request's 24 tokens are done, and from then on all 16 step in one tick.
    assert_eq!(held.max_batch.load(Ordering::Relaxed), 16);
    assert_eq!(
        texts[0], alone_greedy,
        "greedy text changed in a batch of 16"
    );
    assert_eq!(
        texts[1], alone_seeded,
        "seeded text changed in a batch of 16"
    );
    for (i, p) in PROMPTS.iter().enumerate().step_by(2) {
        assert_eq!(texts[i], generate_text(&model, p, 24), "prompt {p:?}");
    }
}

#[derive(Default)]
struct Counts {
    prompt: AtomicUsize,
    batches: AtomicUsize,
    max_batch: AtomicUsize,
}

impl Observer for Counts {
    fn prompt_tokens(&self, n: usize) {
        self.prompt.fetch_add(n, Ordering::Relaxed);
    }
    fn batch(&self, rows: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.max_batch.fetch_max(rows, Ordering::Relaxed);
    }
}

#[test]
fn n_choices_share_one_prefill() {
    let model = shipped();
    let counts = Arc::new(Counts::default());
    let engine = Engine::start_with_observer(model, config(), None, Some(counts.clone())).unwrap();
    let prompt = toks("Once upon a time there was");
    let one = engine
        .complete(CompletionRequest::new(prompt.clone(), 16, seeded(7)))
        .unwrap();
    let before = counts.prompt.load(Ordering::Relaxed);
    let mut req = CompletionRequest::new(prompt.clone(), 16, seeded(7));
    req.n = 4;
    let four = engine.complete(req).unwrap();
    assert_eq!(
        counts.prompt.load(Ordering::Relaxed) - before,
        prompt.len(),
        "the prompt is ingested once for all choices"
    );
    assert_eq!(four.usage.prompt_tokens, prompt.len());
    assert_eq!(four.choices.len(), 4);
    assert_eq!(
        four.choices[0].text, one.choices[0].text,
        "choice 0 uses the seed itself"
    );
    assert!(
        four.choices[1..]
            .iter()
            .any(|c| c.text != four.choices[0].text),
        "choices use seeds seed + i and differ"
    );
    assert_eq!(
        four.usage.completion_tokens,
        four.choices.iter().map(|c| c.text.len()).sum::<usize>()
    );
    assert!(
        counts.max_batch.load(Ordering::Relaxed) >= 4,
        "choices step together"
    );
}

#[test]
fn stop_leaves_the_session_at_prompt_plus_returned_text() {
    let model = shipped();
    let engine = Engine::start(model.clone(), config(), None).unwrap();
    let prompt = "The old man said";
    // Find a stop string that occurs in the greedy continuation, a few bytes in.
    let free = generate_text(&model, prompt, 40);
    let at = free
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= 6 && free.is_char_boundary(i + 2))
        .unwrap();
    let stop = free[at..at + 2].to_string();
    let expected = free[..free.find(&stop).unwrap()].to_string();

    let info = engine.create_session("t", toks(prompt)).unwrap();
    let mut req = CompletionRequest::new(Vec::new(), 40, SamplingParams::greedy());
    req.tenant = "t".into();
    req.stop = vec![stop.clone()];
    req.target = Target::Session(info.id.clone());
    let out = engine.complete(req).unwrap();
    assert_eq!(out.choices[0].text, expected);
    assert_eq!(out.choices[0].finish_reason, Some(FinishReason::Stop));
    let session = out.session.unwrap();
    assert_eq!(session.position, prompt.len() + expected.len());

    // The session's logits equal those of a state that read prompt + returned text.
    let snap = engine.session_snapshot("t", &info.id).unwrap();
    let got = State::from_bytes(&model, &snap).unwrap();
    let mut want = State::new(&model);
    model
        .prefill(&mut want, &toks(&format!("{prompt}{expected}")))
        .unwrap();
    let (a, b) = (got.logits().unwrap(), want.logits().unwrap());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    // Decode steps against one chunked prefill: summation order only (the repo's prefill
    // vs step tests use the same 1e-4 relative bound).
    assert!(worst <= 1e-4 * scale, "{worst} vs {scale}");

    // Continuing the session continues the text as one generation would.
    let mut req = CompletionRequest::new(Vec::new(), 8, SamplingParams::greedy());
    req.tenant = "t".into();
    req.target = Target::Session(info.id.clone());
    let next = engine.complete(req).unwrap();
    assert_eq!(
        next.choices[0].text,
        generate_text(&model, &format!("{prompt}{expected}"), 8)
    );
}

#[test]
fn logprobs_cover_every_returned_token() {
    let engine = Engine::start(shipped(), config(), None).unwrap();
    let mut req = CompletionRequest::new(toks("In the beginning"), 12, seeded(3));
    req.logprobs = Some(5);
    let out = engine.complete(req).unwrap();
    let c = &out.choices[0];
    assert_eq!(c.logprobs.len(), c.text.len(), "one entry per byte token");
    for (lp, b) in c.logprobs.iter().zip(c.text.bytes()) {
        assert_eq!(lp.token, b as u32);
        assert!(lp.logprob <= 0.0);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    let mut req = CompletionRequest::new(toks("x"), 1, seeded(3));
    req.logprobs = Some(6);
    assert!(matches!(
        engine.complete(req),
        Err(Error::Runtime(RtError::InvalidParameter {
            name: "logprobs",
            ..
        }))
    ));
}

#[test]
fn limits_are_enforced_before_queueing() {
    let cfg = EngineConfig {
        max_prompt_tokens: 8,
        max_tokens: 10,
        max_n: 2,
        ..config()
    };
    let engine = Engine::start(shipped(), cfg, None).unwrap();
    let g = SamplingParams::greedy();
    let err = |r: CompletionRequest| engine.complete(r).unwrap_err();
    assert!(matches!(
        err(CompletionRequest::new(toks("123456789"), 1, g.clone())),
        Error::Runtime(RtError::InvalidParameter { name: "prompt", .. })
    ));
    assert!(matches!(
        err(CompletionRequest::new(toks("1"), 11, g.clone())),
        Error::Runtime(RtError::InvalidParameter {
            name: "max_tokens",
            ..
        })
    ));
    let mut r = CompletionRequest::new(toks("1"), 1, g.clone());
    r.n = 3;
    assert!(matches!(
        err(r),
        Error::Runtime(RtError::InvalidParameter { name: "n", .. })
    ));
    let mut r = CompletionRequest::new(toks("1"), 1, g.clone());
    r.stop = vec![String::new()];
    assert!(matches!(
        err(r),
        Error::Runtime(RtError::InvalidParameter { name: "stop", .. })
    ));
    assert!(matches!(
        err(CompletionRequest::new(vec![300], 1, g.clone())),
        Error::Runtime(RtError::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        err(CompletionRequest::new(Vec::new(), 1, g.clone())),
        Error::Runtime(RtError::EmptyInput(_))
    ));
    let mut bad = g.clone();
    bad.temperature = -1.0;
    assert!(matches!(
        err(CompletionRequest::new(toks("1"), 1, bad)),
        Error::Runtime(RtError::InvalidParameter {
            name: "temperature",
            ..
        })
    ));
    // Past an absolute-position model's 64 positions: rejected up front.
    let absolute = Arc::new(Model::load(common::fixture("opt_scalenorm_tie")).unwrap());
    assert_eq!(absolute.config().max_positions(), Some(64));
    let engine = Engine::start(absolute, config(), None).unwrap();
    assert!(matches!(
        engine.complete(CompletionRequest::new(vec![65; 70], 1, g.clone())),
        Err(Error::Runtime(RtError::PositionOutOfRange { .. }))
    ));
    // A generation reaching the end of the positions ends by length.
    let out = engine
        .complete(CompletionRequest::new(vec![65; 60], 50, g))
        .unwrap();
    assert_eq!(out.choices[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(out.usage.completion_tokens, 4);
}

/// Submits a long request whose events go to a channel.
fn long_request(
    engine: &Engine,
    max_tokens: usize,
) -> (performer_engine::CancelHandle, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let h = engine
        .submit(
            CompletionRequest::new(toks("Long"), max_tokens, seeded(1)),
            Box::new(move |e| tx.send(e).is_ok()),
        )
        .unwrap();
    (h, rx)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn full_queue_rejects_and_cancellation_frees_slots() {
    let cfg = EngineConfig {
        max_batch: 1,
        max_queue: 1,
        ..config()
    };
    let held = Arc::new(Held::default());
    let engine = Engine::start_with_observer(shipped(), cfg, None, Some(held.clone())).unwrap();
    // The first request's sink notes, when the engine drops it (on the scheduler thread, as
    // the request ends), how many ticks had run.
    struct OnDrop<F: FnMut()>(F);
    impl<F: FnMut()> Drop for OnDrop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let failed_at = Arc::new(AtomicUsize::new(usize::MAX));
    let (tx1, rx1) = mpsc::channel();
    let (h, f) = (held.clone(), failed_at.clone());
    let noted = OnDrop(move || f.store(h.batches.load(Ordering::SeqCst), Ordering::SeqCst));
    let h1 = engine
        .submit(
            CompletionRequest::new(toks("Long"), 400, seeded(1)),
            Box::new(move |e| {
                let _ = &noted;
                tx1.send(e).is_ok()
            }),
        )
        .unwrap();
    let (_h2, rx2) = long_request(&engine, 400);
    let third = engine.submit(
        CompletionRequest::new(toks("x"), 1, seeded(1)),
        Box::new(|_| true),
    );
    assert!(matches!(
        third,
        Err(Error::QueueFull {
            active: 2,
            limit: 2
        })
    ));
    // Dropping the receiver cancels at the next event; the handle cancels within a tick.
    drop(rx2);
    wait_until("the first request to decode", || {
        held.batches.load(Ordering::SeqCst) > 0
    });
    let cancelled_at = held.batches.load(Ordering::SeqCst);
    h1.cancel();
    wait_until("slots to free", || engine.stats().inflight == 0);
    // At most the tick in progress when it was cancelled ran before it ended.
    let failed_at = failed_at.load(Ordering::SeqCst);
    assert!(
        failed_at != usize::MAX && failed_at - cancelled_at <= 1,
        "cancelled after tick {cancelled_at}, ended after tick {failed_at}"
    );
    assert!(
        rx1.iter().all(|e| !matches!(e, Event::Done { .. })),
        "a cancelled request never completes"
    );
    let ok = engine.complete(CompletionRequest::new(toks("x"), 2, seeded(1)));
    assert!(ok.is_ok());
}

#[test]
fn sessions_are_per_tenant_busy_forkable_and_snapshotted() {
    let model = shipped();
    let engine = Engine::start(model.clone(), config(), None).unwrap();
    let a = engine
        .create_session("alice", toks("Once upon a time"))
        .unwrap();
    assert_eq!(a.position, 16);
    assert!(a.state_bytes > 0);
    assert!(matches!(
        engine.session_info("bob", &a.id),
        Err(Error::SessionNotFound(_))
    ));
    assert!(matches!(
        engine.delete_session("bob", &a.id),
        Err(Error::SessionNotFound(_))
    ));
    assert!(matches!(
        engine.session_snapshot("bob", &a.id),
        Err(Error::SessionNotFound(_))
    ));
    assert!(matches!(
        engine.fork_session("bob", &a.id),
        Err(Error::SessionNotFound(_))
    ));

    // Busy while a request runs on it.
    let (tx, rx) = mpsc::channel();
    let mut req = CompletionRequest::new(toks(","), 300, seeded(2));
    req.tenant = "alice".into();
    req.target = Target::Session(a.id.clone());
    let h = engine
        .submit(req.clone(), Box::new(move |e| tx.send(e).is_ok()))
        .unwrap();
    assert!(matches!(
        engine.submit(req.clone(), Box::new(|_| true)),
        Err(Error::SessionBusy(_))
    ));
    assert!(matches!(
        engine.session_snapshot("alice", &a.id),
        Err(Error::SessionBusy(_))
    ));
    assert!(matches!(
        engine.delete_session("alice", &a.id),
        Err(Error::SessionBusy(_))
    ));
    h.cancel();
    drop(rx);
    wait_until("the session to be free", || engine.stats().inflight == 0);
    assert_eq!(
        engine.session_info("alice", &a.id).unwrap().position,
        16,
        "a cancelled request leaves the session as it was"
    );

    // Fork: both continue identically from the same point.
    let b = engine.fork_session("alice", &a.id).unwrap();
    assert_ne!(b.id, a.id);
    let cont = |id: &str| {
        let mut r = CompletionRequest::new(toks(" there"), 10, SamplingParams::greedy());
        r.tenant = "alice".into();
        r.target = Target::Session(id.into());
        engine.complete(r).unwrap().choices[0].text.clone()
    };
    assert_eq!(cont(&a.id), cont(&b.id));

    // Snapshot download and upload under a new id, and bad uploads.
    let snap = engine.session_snapshot("alice", &a.id).unwrap();
    let c = engine
        .put_session_snapshot("bob", "bobs-copy", &snap)
        .unwrap();
    assert_eq!(
        c.position,
        engine.session_info("alice", &a.id).unwrap().position
    );
    assert!(matches!(
        engine.put_session_snapshot("alice", "bobs-copy", &snap),
        Err(Error::SessionNotFound(_))
    ));
    let mut corrupt = snap.clone();
    corrupt[100] ^= 1;
    assert!(
        matches!(engine.put_session_snapshot("bob", "x", &corrupt), Err(Error::Runtime(RtError::InvalidSnapshot(m))) if m.contains("checksum"))
    );
    let mut version = snap.clone();
    version[8] = 9;
    assert!(
        matches!(engine.put_session_snapshot("bob", "x", &version), Err(Error::Runtime(RtError::InvalidSnapshot(m))) if m.contains("version"))
    );
    let other = Model::load(common::fixture("default_a")).unwrap();
    let mut st = State::new(&other);
    other.prefill(&mut st, &[1, 2]).unwrap();
    let foreign = st.to_bytes(&other).unwrap();
    assert!(
        matches!(engine.put_session_snapshot("bob", "x", &foreign), Err(Error::Runtime(RtError::StateMismatch(m))) if m.contains("another model"))
    );
    assert!(matches!(
        engine.put_session_snapshot("bob", "../x", &snap),
        Err(Error::Runtime(RtError::InvalidParameter { .. }))
    ));

    engine.delete_session("alice", &a.id).unwrap();
    assert!(matches!(
        engine.session_info("alice", &a.id),
        Err(Error::SessionNotFound(_))
    ));
    let empty = engine.create_session("alice", Vec::new()).unwrap();
    let mut r = CompletionRequest::new(Vec::new(), 4, SamplingParams::greedy());
    r.tenant = "alice".into();
    r.target = Target::Session(empty.id);
    assert!(matches!(
        engine.complete(r),
        Err(Error::Runtime(RtError::EmptyInput(_)))
    ));
}

#[test]
fn sessions_spill_past_the_memory_budget_and_survive_a_restart() {
    let model = shipped();
    let dir = tempfile::tempdir().unwrap();
    let one = State::new(&model).size_bytes();
    let cfg = EngineConfig {
        max_session_memory: 2 * one,
        ..config()
    };
    let store = || Some(Box::new(DiskStore::open(dir.path()).unwrap()) as _);
    let engine = Engine::start(model.clone(), cfg.clone(), store()).unwrap();
    let ids: Vec<String> = (0..6)
        .map(|i| {
            engine
                .create_session("t", toks(&format!("Session {i}:")))
                .unwrap()
                .id
        })
        .collect();
    let s = engine.stats().sessions;
    assert_eq!((s.in_memory, s.on_disk), (2, 4));
    assert!(s.memory_bytes <= 2 * one);
    // Every spilled session resumes from disk and continues as it would have.
    let mut texts = Vec::new();
    for id in &ids {
        let mut r = CompletionRequest::new(toks(" a"), 6, SamplingParams::greedy());
        r.tenant = "t".into();
        r.target = Target::Session(id.clone());
        texts.push(engine.complete(r).unwrap().choices[0].text.clone());
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, &generate_text(&model, &format!("Session {i}: a"), 6));
    }
    assert!(engine.stats().sessions.memory_bytes <= 2 * one);
    let written = engine.shutdown(Duration::from_secs(1)).unwrap();
    assert_eq!(
        written, 2,
        "the two sessions in memory are written at shutdown"
    );
    drop(engine);

    // A file of another model in the same directory is skipped.
    let other = Arc::new(Model::load(common::fixture("default_a")).unwrap());
    let foreign = Engine::start(other, config(), store()).unwrap();
    foreign.create_session("t", vec![1, 2, 3]).unwrap();
    foreign.shutdown(Duration::ZERO).unwrap();
    drop(foreign);

    let engine = Engine::start(model.clone(), cfg, store()).unwrap();
    assert_eq!(
        engine.stats().sessions.on_disk,
        6,
        "the foreign session is not served"
    );
    for (i, id) in ids.iter().enumerate() {
        let info = engine.session_info("t", id).unwrap();
        assert_eq!(info.position, format!("Session {i}: a").len() + 6);
    }
}

#[test]
fn idle_sessions_expire() {
    let cfg = EngineConfig {
        session_ttl: Some(Duration::from_secs(1)),
        ..config()
    };
    let engine = Engine::start(shipped(), cfg, None).unwrap();
    let s = engine.create_session("t", toks("x")).unwrap();
    wait_until("expiry", || engine.session_info("t", &s.id).is_err());
}

/// Constrained and unconstrained requests step in the same ticks: with one request of each
/// kind per prompt admitted together, a tick steps all eight rows; every text is the one the
/// request gives alone (the mask touches only its own row, whatever runs beside it).
#[test]
fn constrained_and_unconstrained_requests_share_ticks() {
    use performer::constraint::{Constraint, Grammar};
    let model = shipped();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("schemas/person.json")).unwrap(),
    )
    .unwrap();
    let grammar = Grammar::compile(
        &Constraint::JsonSchema(schema),
        model.tokenizer(),
        model.vocab_size(),
    )
    .unwrap();
    let held = Arc::new(Held::default());
    let engine =
        Engine::start_with_observer(model.clone(), config(), None, Some(held.clone())).unwrap();
    let request = |i: usize| {
        let p = PROMPTS[i / 2];
        if i.is_multiple_of(2) {
            CompletionRequest::new(toks(p), 64, SamplingParams::greedy())
        } else {
            // Temperature 1: the grammar's mask decides among many allowed tokens.
            let mut r = CompletionRequest::new(
                toks(p),
                200,
                SamplingParams {
                    temperature: 1.0,
                    seed: i as u64,
                    ..SamplingParams::default()
                },
            );
            r.constraint = Some(grammar.clone());
            r
        }
    };
    let alone: Vec<String> = (0..8)
        .map(|i| engine.complete(request(i)).unwrap().choices[0].text.clone())
        .collect();
    let before = held.max_batch.swap(0, Ordering::Relaxed);
    assert_eq!(before, 1, "alone, every tick steps one row");

    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *held.hold.lock().unwrap() = Some((entered_tx, release_rx));
    let (tx, rx) = mpsc::channel();
    for i in 0..8 {
        let tx = tx.clone();
        engine
            .submit(request(i), Box::new(move |e| tx.send((i, e)).is_ok()))
            .unwrap();
        if i == 0 {
            // The scheduler holds in the first prompt until the other 7 are queued.
            entered.recv().unwrap();
        }
    }
    release.send(()).unwrap();
    drop(tx);
    let mut texts = vec![String::new(); 8];
    for (i, e) in rx {
        match e {
            Event::Text { text, .. } => texts[i].push_str(&text),
            Event::Failed(e) => panic!("request {i} failed: {e}"),
            _ => {}
        }
    }
    // Every JSON document is at least 33 tokens (`{"name":"x","age":0,"color":"red"}`), far
    // more than the ticks the seven short prompts take to be ingested: all eight rows meet.
    assert_eq!(
        held.max_batch.load(Ordering::Relaxed),
        8,
        "constrained and unconstrained rows in one tick"
    );
    for (i, (text, want)) in texts.iter().zip(&alone).enumerate() {
        assert_eq!(text, want, "request {i} changed beside the others");
        if !i.is_multiple_of(2) {
            serde_json::from_str::<serde_json::Value>(text).unwrap();
        }
    }
}
