//! The engine over a *shared* session store (its table only a cache), without Redis: an
//! in-memory store that says it is shared, with compare-and-set and a switch that makes it
//! unreachable. The Redis backend itself is tested against a real redis-server in
//! server/tests/redis.rs.

mod common;

use common::{generate_text, shipped, toks};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use performer::{Model, SamplingParams, State};
use performer_engine::store::Listing;
use performer_engine::{
    CompletionRequest, Engine, EngineConfig, Event, SessionKey, SessionMeta, SessionStore,
    StoredSession, Target,
};
use performer_engine::{Error, Result};

/// What several engines share: sessions by key, a down switch and call counters.
#[derive(Default)]
struct Shared {
    map: Mutex<HashMap<SessionKey, StoredSession>>,
    down: AtomicBool,
    /// `version` sleeps this many milliseconds (a store that answers slowly).
    slow_ms: AtomicUsize,
    /// Set while a `version` call is sleeping.
    stalled: AtomicBool,
    /// `put` sleeps this many milliseconds.
    slow_put_ms: AtomicUsize,
    /// Set while a `put` call is sleeping.
    put_stalled: AtomicBool,
    gets: AtomicUsize,
    versions: AtomicUsize,
}

/// One engine's handle on the shared map.
struct MemStore(Arc<Shared>);

impl MemStore {
    fn up(&self) -> Result<()> {
        if self.0.down.load(Ordering::SeqCst) {
            return Err(Error::StoreUnavailable("switched off".into()));
        }
        Ok(())
    }
}

impl SessionStore for MemStore {
    fn get(&self, key: &SessionKey) -> Result<Option<StoredSession>> {
        self.up()?;
        self.0.gets.fetch_add(1, Ordering::SeqCst);
        Ok(self.0.map.lock().unwrap().get(key).cloned())
    }
    fn version(&self, key: &SessionKey) -> Result<Option<u64>> {
        self.up()?;
        let slow = self.0.slow_ms.load(Ordering::SeqCst);
        if slow > 0 {
            self.0.stalled.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(slow as u64));
            self.0.stalled.store(false, Ordering::SeqCst);
        }
        self.0.versions.fetch_add(1, Ordering::SeqCst);
        Ok(self.0.map.lock().unwrap().get(key).map(|s| s.meta.version))
    }
    fn put(&self, session: &StoredSession, expected: Option<u64>) -> Result<()> {
        self.up()?;
        let slow = self.0.slow_put_ms.load(Ordering::SeqCst);
        if slow > 0 {
            self.0.put_stalled.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(slow as u64));
            self.0.put_stalled.store(false, Ordering::SeqCst);
        }
        let mut map = self.0.map.lock().unwrap();
        let key = SessionKey::of(&session.meta);
        let found = map.get(&key).map_or(0, |s| s.meta.version);
        if let Some(want) = expected {
            if want != found {
                return Err(Error::VersionConflict {
                    id: key.id,
                    expected: want,
                    found,
                });
            }
        }
        map.insert(key, session.clone());
        Ok(())
    }
    fn delete(&self, key: &SessionKey) -> Result<()> {
        self.up()?;
        self.0.map.lock().unwrap().remove(key);
        Ok(())
    }
    fn list(&self) -> Result<Listing> {
        self.up()?;
        let metas: Vec<SessionMeta> = self
            .0
            .map
            .lock()
            .unwrap()
            .values()
            .map(|s| s.meta.clone())
            .collect();
        Ok((metas, Vec::new()))
    }
    fn shared(&self) -> bool {
        true
    }
}

/// A synthetic tiny model (rotary positions: no length limit, for long generations).
fn tiny() -> (tempfile::TempDir, Arc<Model>) {
    use performer::synthetic::{self, SyntheticShape, WeightDtype};
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(dir.path(), &shape, WeightDtype::F32, 1).unwrap();
    let model = Arc::new(Model::load(dir.path()).unwrap());
    (dir, model)
}

fn engine(model: &Arc<Model>, shared: &Arc<Shared>) -> Engine {
    let cfg = EngineConfig {
        threads: 1,
        ..EngineConfig::default()
    };
    Engine::start(model.clone(), cfg, Some(Box::new(MemStore(shared.clone())))).unwrap()
}

fn on_session(id: &str, prompt: &str, max_tokens: usize) -> CompletionRequest {
    let mut r = CompletionRequest::new(toks(prompt), max_tokens, SamplingParams::greedy());
    r.target = Target::Session(id.to_string());
    r
}

#[test]
fn two_engines_on_one_shared_store_continue_one_generation() {
    let model = shipped();
    let shared = Arc::new(Shared::default());
    let (a, b) = (engine(&model, &shared), engine(&model, &shared));
    let id = a.create_session("", toks("The sea")).unwrap().id;
    assert_eq!(
        shared.map.lock().unwrap().len(),
        1,
        "written through at once"
    );
    let mut text = String::new();
    for i in 0..6 {
        let e = if i % 2 == 0 { &b } else { &a };
        let done = e.complete(on_session(&id, "", 7)).unwrap();
        text.push_str(&done.choices[0].text);
        // `Done` came after the write: the store already holds this version.
        let stored = shared.map.lock().unwrap()[&SessionKey {
            fingerprint: model.fingerprint(),
            tenant: String::new(),
            id: id.clone(),
        }]
            .meta
            .clone();
        assert_eq!(stored.position, done.session.unwrap().position);
    }
    assert_eq!(text, generate_text(&model, "The sea", 42));
    // Nothing is left to write at shutdown: everything is in the store already.
    assert_eq!(a.shutdown(Duration::ZERO).unwrap(), 0);
    assert_eq!(b.shutdown(Duration::ZERO).unwrap(), 0);
}

#[test]
fn a_cached_session_is_reloaded_only_when_its_version_changed() {
    let model = shipped();
    let shared = Arc::new(Shared::default());
    let (a, b) = (engine(&model, &shared), engine(&model, &shared));
    let id = a.create_session("", toks("Rain")).unwrap().id;
    b.complete(on_session(&id, " fell", 3)).unwrap();
    let gets = shared.gets.load(Ordering::SeqCst);
    let versions = shared.versions.load(Ordering::SeqCst);
    // B's cache holds the current version: a version read, no snapshot read.
    b.complete(on_session(&id, "", 3)).unwrap();
    assert_eq!(shared.gets.load(Ordering::SeqCst), gets);
    assert!(shared.versions.load(Ordering::SeqCst) > versions);
    // A's cache is stale: it reloads, and continues from B's state.
    let done = a.complete(on_session(&id, "", 3)).unwrap();
    assert_eq!(shared.gets.load(Ordering::SeqCst), gets + 1);
    assert_eq!(done.session.unwrap().position, 4 + 5 + 3 + 3 + 3);
}

#[test]
fn the_loser_of_a_race_gets_a_version_conflict_and_the_winner_is_kept() {
    let (_dir, model) = tiny();
    let shared = Arc::new(Shared::default());
    let (a, b) = (engine(&model, &shared), engine(&model, &shared));
    let id = a.create_session("", toks("The king")).unwrap().id;
    // B starts a long generation ...
    let (tx, rx) = std::sync::mpsc::channel();
    b.submit(
        on_session(&id, "", 3_000),
        Box::new(move |e| tx.send(e).is_ok()),
    )
    .unwrap();
    let start = Instant::now();
    while b.stats().running == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::yield_now();
    }
    // ... A, from the same version, finishes first.
    let won = a.complete(on_session(&id, " said", 1)).unwrap();
    let position = won.session.unwrap().position;
    let lost = rx.iter().find_map(|e| match e {
        Event::Failed(e) => Some(Err(e)),
        Event::Done { .. } => Some(Ok(())),
        _ => None,
    });
    assert!(
        matches!(lost, Some(Err(Error::VersionConflict { .. }))),
        "{lost:?}"
    );
    assert_eq!(b.session_info("", &id).unwrap().position, position);
    // B serves the winner's state from now on (the synthetic model's text is random bytes,
    // so positions are compared, not text).
    let done = b.complete(on_session(&id, "", 5)).unwrap();
    assert_eq!(done.session.unwrap().position, position + 5);
    assert_eq!(a.session_info("", &id).unwrap().position, position + 5);
}

#[test]
fn a_store_down_fails_session_requests_only_and_recovers() {
    let model = shipped();
    let shared = Arc::new(Shared::default());
    let a = engine(&model, &shared);
    let id = a.create_session("t", toks("Water")).unwrap().id;
    shared.down.store(true, Ordering::SeqCst);
    let mut r = on_session(&id, "", 3);
    r.tenant = "t".into();
    assert!(matches!(
        a.complete(r.clone()),
        Err(Error::StoreUnavailable(_))
    ));
    assert!(matches!(
        a.create_session("t", toks("x")),
        Err(Error::StoreUnavailable(_))
    ));
    assert!(matches!(
        a.session_info("t", &id),
        Err(Error::StoreUnavailable(_))
    ));
    let plain = CompletionRequest::new(toks("Water"), 3, SamplingParams::greedy());
    assert_eq!(
        a.complete(plain).unwrap().choices[0].text,
        generate_text(&model, "Water", 3)
    );
    // Up again: the session is served, with nothing lost.
    shared.down.store(false, Ordering::SeqCst);
    assert_eq!(
        a.complete(r).unwrap().choices[0].text,
        generate_text(&model, "Water", 3)
    );
    // Other tenants and other models do not see it.
    assert!(matches!(
        a.session_info("u", &id),
        Err(Error::SessionNotFound(_))
    ));
    let other = Arc::new(Model::load(common::fixture("default_a")).unwrap());
    let o = engine(&other, &shared);
    assert!(matches!(
        o.session_info("t", &id),
        Err(Error::SessionNotFound(_))
    ));
    assert_eq!(a.list_sessions("t").unwrap().len(), 1);
    assert!(o.list_sessions("t").unwrap().is_empty());
}

#[test]
fn a_session_deleted_and_uploaded_again_is_not_served_from_a_stale_cache() {
    let model = shipped();
    let shared = Arc::new(Shared::default());
    let (a, b) = (engine(&model, &shared), engine(&model, &shared));
    let snapshot = |prompt: &str| {
        let mut st = State::new(&model);
        model.prefill(&mut st, &toks(prompt)).unwrap();
        st.to_bytes(&model).unwrap()
    };
    a.put_session_snapshot("", "fixed", &snapshot("abc"))
        .unwrap();
    assert_eq!(
        b.session_info("", "fixed").unwrap().position,
        3,
        "cached in B"
    );
    a.delete_session("", "fixed").unwrap();
    a.put_session_snapshot("", "fixed", &snapshot("abcdefgh"))
        .unwrap();
    assert_eq!(b.session_info("", "fixed").unwrap().position, 8);
    let text = b.complete(on_session("fixed", "", 4)).unwrap().choices[0]
        .text
        .clone();
    assert_eq!(text, generate_text(&model, "abcdefgh", 4));
}

#[test]
fn a_slow_store_does_not_hold_up_stateless_completions() {
    let model = shipped();
    let shared = Arc::new(Shared::default());
    let a = Arc::new(engine(&model, &shared));
    let id = a.create_session("", toks("Light fell")).unwrap().id;
    // A session request waits 3 s on the store's version read, holding the session table;
    // the scheduler's idle expiry comes round every second meanwhile.
    shared.slow_ms.store(3000, Ordering::SeqCst);
    let waiting = {
        let a = a.clone();
        let id = id.clone();
        std::thread::spawn(move || a.complete(on_session(&id, "", 2)))
    };
    let start = Instant::now();
    while !shared.stalled.load(Ordering::SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(1200));
    for prompt in ["Water", "The sea"] {
        let plain = CompletionRequest::new(toks(prompt), 8, SamplingParams::greedy());
        assert_eq!(
            a.complete(plain).unwrap().choices[0].text,
            generate_text(&model, prompt, 8)
        );
    }
    assert!(
        shared.stalled.load(Ordering::SeqCst),
        "the stateless completions finished while the session request was still waiting"
    );
    shared.slow_ms.store(0, Ordering::SeqCst);
    assert!(waiting.join().unwrap().is_ok());
}

#[test]
fn a_slow_commit_does_not_hold_up_the_batch() {
    let model = shipped();
    let shared = Arc::new(Shared::default());
    let a = Arc::new(engine(&model, &shared));
    let id = a.create_session("", toks("Under the tree")).unwrap().id;
    let other = a.create_session("", toks("My friend")).unwrap().id;
    // The write after this generation takes 3 s (it runs on the committer thread).
    shared.slow_put_ms.store(3000, Ordering::SeqCst);
    let committing = {
        let a = a.clone();
        let id = id.clone();
        std::thread::spawn(move || a.complete(on_session(&id, "", 4)))
    };
    let start = Instant::now();
    while !shared.put_stalled.load(Ordering::SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::yield_now();
    }
    shared.slow_put_ms.store(0, Ordering::SeqCst);
    let plain = CompletionRequest::new(toks("Water"), 8, SamplingParams::greedy());
    assert_eq!(
        a.complete(plain).unwrap().choices[0].text,
        generate_text(&model, "Water", 8)
    );
    // The session being written is busy meanwhile.
    assert!(matches!(
        a.complete(on_session(&id, "", 1)),
        Err(Error::SessionBusy(_))
    ));
    assert!(
        shared.put_stalled.load(Ordering::SeqCst),
        "all that happened while the write was still going on"
    );
    // Writes are in order, one at a time: another session's request generates meanwhile and
    // completes once its write (after the slow one) is done.
    assert_eq!(
        a.complete(on_session(&other, "", 4)).unwrap().choices[0].text,
        generate_text(&model, "My friend", 4)
    );
    let done = committing.join().unwrap().unwrap();
    assert_eq!(
        done.choices[0].text,
        generate_text(&model, "Under the tree", 4)
    );
    assert_eq!(done.session.unwrap().position, 14 + 4);
}
