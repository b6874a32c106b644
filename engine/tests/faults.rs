//! The session table under a memory budget and a failing disk: a refused create, upload or
//! fork leaves no trace; a full disk gives `InsufficientStorage` naming no other session and no
//! path while the states stay in memory; shutdown writes what it can and names what it could
//! not; an acknowledged session never comes back older than acknowledged. The disk faults come
//! from a store that wraps the real `DiskStore` and fails its writes on demand with the error
//! a full disk gives (`ENOSPC` on the session file's path).

mod common;

use common::{shipped, toks};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use performer::{Model, SamplingParams, State};
use performer_engine::store::Listing;
use performer_engine::{
    CompletionRequest, DiskStore, Engine, EngineConfig, Error, SessionKey, SessionStore,
    StoredSession, Target,
};

/// Which writes fail.
#[derive(Clone, Default)]
enum Fail {
    #[default]
    Nothing,
    Every,
    Ids(HashSet<String>),
}

/// A `DiskStore` whose writes fail as on a full disk when told to.
struct Faulty {
    inner: DiskStore,
    fail: Arc<Mutex<Fail>>,
}

impl Faulty {
    fn open(dir: &Path) -> (Box<dyn SessionStore>, Arc<Mutex<Fail>>) {
        let fail = Arc::new(Mutex::new(Fail::Nothing));
        let store = Faulty {
            inner: DiskStore::open(dir).unwrap(),
            fail: fail.clone(),
        };
        (Box::new(store), fail)
    }
}

impl SessionStore for Faulty {
    fn get(&self, key: &SessionKey) -> performer_engine::Result<Option<StoredSession>> {
        self.inner.get(key)
    }
    fn version(&self, key: &SessionKey) -> performer_engine::Result<Option<u64>> {
        self.inner.version(key)
    }
    fn put(&self, s: &StoredSession, expected: Option<u64>) -> performer_engine::Result<()> {
        let fails = match &*self.fail.lock().unwrap() {
            Fail::Nothing => false,
            Fail::Every => true,
            Fail::Ids(ids) => ids.contains(&s.meta.id),
        };
        if fails {
            // What `DiskStore::put` returns when the disk is full.
            let path: PathBuf = self.inner.dir().join(format!("{}.session", s.meta.id));
            return Err(performer::Error::io(path, std::io::Error::from_raw_os_error(28)).into());
        }
        self.inner.put(s, expected)
    }
    fn delete(&self, key: &SessionKey) -> performer_engine::Result<()> {
        self.inner.delete(key)
    }
    fn list(&self) -> performer_engine::Result<Listing> {
        self.inner.list()
    }
}

fn config(max_session_memory: usize) -> EngineConfig {
    EngineConfig {
        threads: 2,
        max_session_memory,
        ..EngineConfig::default()
    }
}

/// Bytes of one session's state of `model` (the same at every position).
fn state_bytes(model: &Model) -> usize {
    State::new(model).size_bytes()
}

fn continue_session(engine: &Engine, tenant: &str, id: &str, text: &str) -> usize {
    let mut r = CompletionRequest::new(toks(text), 2, SamplingParams::greedy());
    r.tenant = tenant.to_string();
    r.target = Target::Session(id.to_string());
    engine.complete(r).unwrap().session.unwrap().position
}

#[test]
fn a_refused_create_upload_or_fork_leaves_no_session_behind() {
    let model = shipped();
    let one = state_bytes(&model);
    // Room for two states and a half, no session directory.
    let engine = Engine::start(model, config(one * 5 / 2), None).unwrap();
    let a = engine.create_session("", toks("first")).unwrap();
    let b = engine.create_session("", toks("second")).unwrap();
    for _ in 0..5 {
        assert!(matches!(
            engine.create_session("", toks("third")),
            Err(Error::InsufficientStorage(_))
        ));
    }
    let snap = engine.session_snapshot("", &a.id).unwrap();
    assert!(matches!(
        engine.put_session_snapshot("", "uploaded", &snap),
        Err(Error::InsufficientStorage(_))
    ));
    assert!(matches!(
        engine.fork_session("", &b.id),
        Err(Error::InsufficientStorage(_))
    ));
    let ids: Vec<String> = engine
        .list_sessions("")
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&a.id) && ids.contains(&b.id));
    let stats = engine.stats().sessions;
    assert_eq!(stats.memory_bytes, 2 * one);
    // Replacing a session in place needs no more room, and what was kept still serves.
    engine.put_session_snapshot("", &a.id, &snap).unwrap();
    engine.session_snapshot("", &b.id).unwrap();
    continue_session(&engine, "", &b.id, " more");
    // Once one is deleted, a create fits again.
    engine.delete_session("", &a.id).unwrap();
    engine.create_session("", toks("third")).unwrap();
    assert_eq!(engine.stats().sessions.memory_bytes, 2 * one);
}

#[test]
fn a_full_disk_refuses_new_sessions_names_nothing_else_and_keeps_the_states_in_memory() {
    let model = shipped();
    let one = state_bytes(&model);
    let dir = tempfile::tempdir().unwrap();
    let (store, fail) = Faulty::open(dir.path());
    let engine = Engine::start(model, config(one * 2), Some(store)).unwrap();
    let a = engine.create_session("alice", toks("alice's")).unwrap();
    let b = engine.create_session("bob", toks("bob's")).unwrap();
    *fail.lock().unwrap() = Fail::Every;
    let snap_a = engine.session_snapshot("alice", &a.id).unwrap();
    for attempt in [
        engine.create_session("carol", toks("carol's")),
        engine.put_session_snapshot("carol", "carols", &snap_a),
        engine.fork_session("bob", &b.id),
    ] {
        let Err(Error::InsufficientStorage(msg)) = attempt else {
            panic!("expected InsufficientStorage, got {attempt:?}");
        };
        let dir_name = dir.path().to_string_lossy();
        assert!(!msg.contains(&a.id) && !msg.contains(&b.id), "{msg}");
        assert!(
            !msg.contains(&*dir_name) && !msg.contains(".session"),
            "{msg}"
        );
    }
    // Nothing was spilled (every write failed): both states are in memory and serve.
    assert_eq!(engine.list_sessions("carol").unwrap().len(), 0);
    assert_eq!(engine.stats().sessions.in_memory, 2);
    assert_eq!(engine.stats().sessions.memory_bytes, 2 * one);
    assert_eq!(engine.session_snapshot("alice", &a.id).unwrap(), snap_a);
    continue_session(&engine, "bob", &b.id, " continued");
    // The disk has room again: a create spills the least recently used session and fits.
    *fail.lock().unwrap() = Fail::Nothing;
    engine.create_session("carol", toks("carol's")).unwrap();
    assert_eq!(engine.stats().sessions.on_disk, 1);
    assert_eq!(engine.session_snapshot("alice", &a.id).unwrap(), snap_a);
}

#[test]
fn shutdown_writes_every_other_session_after_a_failure_and_names_the_one_it_could_not() {
    let model = shipped();
    let dir = tempfile::tempdir().unwrap();
    let (store, fail) = Faulty::open(dir.path());
    let engine = Engine::start(model.clone(), config(1 << 30), Some(store)).unwrap();
    let ids: Vec<String> = (0..5)
        .map(|i| {
            engine
                .create_session("", toks(&format!("s{i}")))
                .unwrap()
                .id
        })
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    // The first in write order fails: the four after it are still written.
    *fail.lock().unwrap() = Fail::Ids(HashSet::from([sorted[0].clone()]));
    let report = engine.shutdown_report(std::time::Duration::ZERO);
    assert_eq!(report.written, 4);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, sorted[0]);
    drop(engine);
    let again = Engine::start(
        model,
        config(1 << 30),
        Some(Box::new(DiskStore::open(dir.path()).unwrap())),
    )
    .unwrap();
    let back: HashSet<String> = again
        .list_sessions("")
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(back, sorted[1..].iter().cloned().collect());
}

#[test]
fn an_acknowledged_session_never_comes_back_older_after_a_failed_shutdown_write() {
    let model = shipped();
    let one = state_bytes(&model);
    let dir = tempfile::tempdir().unwrap();
    let (store, fail) = Faulty::open(dir.path());
    // Room for one state: every other session lives on disk.
    let engine = Engine::start(model.clone(), config(one), Some(store)).unwrap();
    let a = engine.create_session("", toks("Once upon")).unwrap();
    let b = engine.create_session("", toks("a time")).unwrap();
    assert_eq!(engine.stats().sessions.on_disk, 1, "a was spilled for b");
    // Continuing a loads it (b is spilled for it): a's file is now an older version.
    let acknowledged = continue_session(&engine, "", &a.id, " there");
    assert!(acknowledged > a.position);
    *fail.lock().unwrap() = Fail::Every;
    let report = engine.shutdown_report(std::time::Duration::ZERO);
    assert_eq!(report.written, 0);
    assert_eq!(
        report.failed.iter().map(|f| &f.0).collect::<Vec<_>>(),
        [&a.id]
    );
    drop(engine);
    let again = Engine::start(
        model,
        config(one),
        Some(Box::new(DiskStore::open(dir.path()).unwrap())),
    )
    .unwrap();
    // b is back as acknowledged; a is not served at its older position.
    assert_eq!(again.session_info("", &b.id).unwrap().position, b.position);
    match again.session_info("", &a.id) {
        Err(Error::SessionNotFound(_)) => {}
        Ok(info) => assert_eq!(info.position, acknowledged, "a came back older"),
        Err(e) => panic!("{e}"),
    }
}

/// A `DiskStore` on a disk of `capacity` bytes: a write past it fails as a full disk does, and
/// the free space it reports is what its files leave.
struct SmallDisk {
    inner: DiskStore,
    capacity: u64,
}

impl SmallDisk {
    fn used(&self) -> u64 {
        std::fs::read_dir(self.inner.dir())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }
}

impl SessionStore for SmallDisk {
    fn get(&self, key: &SessionKey) -> performer_engine::Result<Option<StoredSession>> {
        self.inner.get(key)
    }
    fn version(&self, key: &SessionKey) -> performer_engine::Result<Option<u64>> {
        self.inner.version(key)
    }
    fn put(&self, s: &StoredSession, expected: Option<u64>) -> performer_engine::Result<()> {
        // The temporary file is written in full before it replaces an older version.
        if self.used() + s.snapshot.len() as u64 > self.capacity {
            let path: PathBuf = self.inner.dir().join(format!("{}.session", s.meta.id));
            return Err(performer::Error::io(path, std::io::Error::from_raw_os_error(28)).into());
        }
        self.inner.put(s, expected)
    }
    fn delete(&self, key: &SessionKey) -> performer_engine::Result<()> {
        self.inner.delete(key)
    }
    fn list(&self) -> performer_engine::Result<Listing> {
        self.inner.list()
    }
    fn free_bytes(&self) -> performer_engine::Result<Option<u64>> {
        Ok(Some(self.capacity.saturating_sub(self.used())))
    }
}

/// The disk is never promised more than it can take: on a disk of room for a few sessions,
/// creates, continuations and forks are refused (`InsufficientStorage`) once writing every
/// session held only in memory would not fit, so that shutdown writes them all and a restart
/// serves every acknowledged session at its acknowledged version, byte for byte.
#[test]
fn a_small_disk_keeps_every_acknowledged_session_across_a_restart() {
    let model = shipped();
    let one = state_bytes(&model);
    let dir = tempfile::tempdir().unwrap();
    let store = SmallDisk {
        inner: DiskStore::open(dir.path()).unwrap(),
        capacity: (one * 5 / 2) as u64,
    };
    // Memory for two states: sessions spill to the small disk too.
    let engine = Engine::start(model.clone(), config(one * 2), Some(Box::new(store))).unwrap();
    let mut acked: Vec<(String, usize)> = Vec::new();
    let mut refused = 0;
    for i in 0..30 {
        let result = match (i % 3, acked.len()) {
            (_, 0) | (0, _) => engine.create_session("", toks(&format!("session {i}"))),
            (1, n) => {
                let id = acked[i % n].0.clone();
                let mut r = CompletionRequest::new(toks(" and"), 2, SamplingParams::greedy());
                r.target = Target::Session(id);
                engine
                    .complete(r)
                    .map(|c| c.session.expect("a session request"))
            }
            (_, n) => engine.fork_session("", &acked[(i * 5) % n].0),
        };
        match result {
            Ok(info) => match acked.iter_mut().find(|(id, _)| *id == info.id) {
                Some(a) => a.1 = info.position,
                None => acked.push((info.id, info.position)),
            },
            Err(Error::InsufficientStorage(msg)) => {
                assert!(!msg.contains("sess-") && !msg.contains('/'), "{msg}");
                refused += 1;
            }
            Err(e) => panic!("request {i}: {e}"),
        }
    }
    assert!(refused > 0, "the disk never filled");
    assert!(acked.len() >= 2, "{acked:?}");
    let snapshots: Vec<Vec<u8>> = acked
        .iter()
        .map(|(id, _)| engine.session_snapshot("", id).unwrap())
        .collect();
    let report = engine.shutdown_report(std::time::Duration::ZERO);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    drop(engine);
    let again = Engine::start(
        model,
        config(one * 2),
        Some(Box::new(DiskStore::open(dir.path()).unwrap())),
    )
    .unwrap();
    for ((id, position), snap) in acked.iter().zip(&snapshots) {
        assert_eq!(again.session_info("", id).unwrap().position, *position);
        assert!(
            again.session_snapshot("", id).unwrap() == *snap,
            "{id} changed"
        );
    }
}
