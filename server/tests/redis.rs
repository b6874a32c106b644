//! The shared session store against a real `redis-server` that each test starts on a free
//! 127.0.0.1 port in a temporary directory: compare-and-set between two stores and two engines
//! (the loser gets 409), tenant and model isolation, payload before index, Redis down (503 with
//! Retry-After, stateless completions still served) and back (sessions intact, no restart of
//! the server), one session continued alternately on two servers that share one Redis, and a
//! conversation through `previous_response_id` alternating between them.
//!
//! Without `redis-server` on the PATH every test prints why it is skipped and passes, unless
//! `PERFORMER_REQUIRE_REDIS=1` (set by `.ci/run`, which installs it), where that fails.

mod common;
use common::{assert_error, generate_text, shipped, tiny, Server};

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use performer::{Model, SamplingParams};
use performer_engine::Error;
use performer_engine::{
    CompletionRequest, Engine, EngineConfig, SessionKey, SessionMeta, SessionStore, StoredSession,
    Target,
};
use performer_server::{Metrics, RedisStore, ServerOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// `redis-server` on the PATH, or `None` after printing why the test is skipped (a failure
/// where `PERFORMER_REQUIRE_REDIS=1`).
fn redis_bin() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("PERFORMER_REQUIRE_REDIS").as_deref() != Ok("1"),
            "PERFORMER_REQUIRE_REDIS=1 but redis-server is not on the PATH"
        );
        // Straight to stderr, past the test harness's capture: the reason shows in the output.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: redis-server is not installed (apt-get install redis-server)"
        );
    }
    found
}

/// A `redis-server` child process on 127.0.0.1, persisting with an append-only file in its
/// directory (so a restart on the same directory finds every acknowledged write).
struct Redis {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    fn start() -> Option<Redis> {
        let bin = redis_bin()?;
        let mut r = Redis {
            bin,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            child: None,
        };
        r.restart();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(&self.bin)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let start = Instant::now();
        loop {
            let up = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not answer: {:?}",
                std::fs::read_to_string(self.dir.path().join("redis.log"))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: what it acknowledged is in the append-only file).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut self.raw())
            .unwrap();
        keys.sort();
        keys
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn store(r: &Redis) -> RedisStore {
    RedisStore::open(&r.url())
        .unwrap()
        .with_timeouts(Duration::from_millis(500), Duration::from_secs(5))
}

fn session(tenant: &str, id: &str, fingerprint: u64, version: u64, bytes: &[u8]) -> StoredSession {
    StoredSession {
        meta: SessionMeta {
            id: id.into(),
            tenant: tenant.into(),
            created: 1,
            last_used: 2,
            position: version as usize,
            state_bytes: bytes.len(),
            version,
            fingerprint,
            note: None,
        },
        snapshot: bytes.to_vec(),
    }
}

fn key(tenant: &str, id: &str, fingerprint: u64) -> SessionKey {
    SessionKey {
        fingerprint,
        tenant: tenant.into(),
        id: id.into(),
    }
}

#[test]
fn compare_and_set_between_two_stores() {
    let Some(r) = Redis::start() else { return };
    let (a, b) = (store(&r), store(&r));
    assert!(a.shared());
    let k = key("t", "s1", 7);
    assert_eq!(a.version(&k).unwrap(), None);
    assert!(a.get(&k).unwrap().is_none());
    a.put(&session("t", "s1", 7, 1, b"one"), Some(0)).unwrap();
    // B read version 0 too (absent) and loses.
    match b.put(&session("t", "s1", 7, 1, b"uno"), Some(0)) {
        Err(Error::VersionConflict {
            expected: 0,
            found: 1,
            ..
        }) => {}
        other => panic!("expected a version conflict, got {other:?}"),
    }
    // Both read version 1; A writes first, B loses and changes nothing.
    a.put(&session("t", "s1", 7, 2, b"two"), Some(1)).unwrap();
    assert!(matches!(
        b.put(&session("t", "s1", 7, 2, b"dos"), Some(1)),
        Err(Error::VersionConflict { found: 2, .. })
    ));
    assert_eq!(b.version(&k).unwrap(), Some(2));
    let got = b.get(&k).unwrap().unwrap();
    assert_eq!(got.snapshot, b"two");
    assert_eq!(got.meta, session("t", "s1", 7, 2, b"two").meta);
    // One snapshot key is left: the committed one (old ones and losers' are deleted).
    assert_eq!(r.keys("performer:*:snap:*").len(), 1);
    // A commit is idempotent (a retry after a lost reply succeeds without a conflict).
    let staged = a.stage(&session("t", "s1", 7, 3, b"three")).unwrap();
    a.commit(&staged, Some(2)).unwrap();
    a.commit(&staged, Some(2)).unwrap();
    assert_eq!(a.get(&k).unwrap().unwrap().snapshot, b"three");
    a.delete(&k).unwrap();
    a.delete(&k).unwrap();
    assert!(a.get(&k).unwrap().is_none());
    assert!(a.list_tenant(7, "t").unwrap().is_empty());
    assert!(
        r.keys("performer:*").is_empty(),
        "delete leaves no key: {:?}",
        r.keys("performer:*")
    );
    assert!(
        a.get(&key("t", "../x", 7)).is_err() && a.get(&key("a:b", "x", 7)).is_err(),
        "ids and tenants that could break the key layout are refused"
    );
}

#[test]
fn payload_is_written_before_the_index_and_a_crash_between_leaves_the_old_version() {
    let Some(r) = Redis::start() else { return };
    let s = store(&r);
    let k = key("t", "s1", 7);
    s.put(&session("t", "s1", 7, 1, b"old"), Some(0)).unwrap();
    // Step one only (a writer that dies before the compare-and-set): the snapshot is in
    // Redis with an expiry, nothing refers to it, readers get the old version.
    let staged = s.stage(&session("t", "s1", 7, 2, b"new")).unwrap();
    let mut raw = r.raw();
    let data: Vec<u8> = redis::cmd("GET")
        .arg(staged.payload_key())
        .query(&mut raw)
        .unwrap();
    assert_eq!(data, b"new", "the payload is written first");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(staged.payload_key())
        .query(&mut raw)
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 300_000,
        "a staged payload expires: {ttl} ms"
    );
    let got = store(&r).get(&k).unwrap().unwrap();
    assert_eq!((got.meta.version, &got.snapshot[..]), (1, &b"old"[..]));
    assert_eq!(store(&r).version(&k).unwrap(), Some(1));
    // The index moves only with the commit, which makes the payload permanent.
    s.commit(&staged, Some(1)).unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(staged.payload_key())
        .query(&mut raw)
        .unwrap();
    assert_eq!(ttl, -1, "a committed payload does not expire");
    assert_eq!(s.get(&k).unwrap().unwrap().snapshot, b"new");
    // A staged payload that expired before its commit is refused; the session stays.
    let short = store(&r).with_staged_ttl(Duration::from_millis(50));
    let staged = short.stage(&session("t", "s1", 7, 3, b"late")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(matches!(
        short.commit(&staged, Some(2)),
        Err(Error::SessionStorage(m)) if m.contains("expired")
    ));
    let got = s.get(&k).unwrap().unwrap();
    assert_eq!((got.meta.version, &got.snapshot[..]), (2, &b"new"[..]));
    assert_eq!(r.keys("performer:*:snap:*").len(), 1);
}

#[test]
fn tenants_and_models_never_collide() {
    let Some(r) = Redis::start() else { return };
    let s = store(&r);
    for (tenant, fp, bytes) in [
        ("t1", 1, &b"t1-m1"[..]),
        ("t2", 1, b"t2-m1"),
        ("t1", 2, b"t1-m2"),
        ("", 1, b"none-m1"),
    ] {
        s.put(&session(tenant, "same", fp, 1, bytes), Some(0))
            .unwrap();
    }
    for (tenant, fp, bytes) in [
        ("t1", 1, &b"t1-m1"[..]),
        ("t2", 1, b"t2-m1"),
        ("t1", 2, b"t1-m2"),
        ("", 1, b"none-m1"),
    ] {
        let got = s.get(&key(tenant, "same", fp)).unwrap().unwrap();
        assert_eq!(got.snapshot, bytes);
        let listed = s.list_tenant(fp, tenant).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].tenant.as_str(), listed[0].fingerprint),
            (tenant, fp)
        );
    }
    assert!(s.list_tenant(3, "t1").unwrap().is_empty());
    let (all, bad) = s.list().unwrap();
    assert_eq!((all.len(), bad.len()), (4, 0));
    s.delete(&key("t1", "same", 1)).unwrap();
    assert!(s.get(&key("t1", "same", 1)).unwrap().is_none());
    assert!(s.get(&key("t2", "same", 1)).unwrap().is_some());
    assert!(s.get(&key("t1", "same", 2)).unwrap().is_some());

    // Through engines: a session of one model or tenant is not found by another.
    let model = shipped();
    let (_dir, other) = tiny();
    let cfg = || EngineConfig {
        threads: 1,
        ..EngineConfig::default()
    };
    let e1 = Engine::start(model, cfg(), Some(Box::new(store(&r)))).unwrap();
    let e2 = Engine::start(other, cfg(), Some(Box::new(store(&r)))).unwrap();
    let info = e1
        .create_session("ta", "Hello".bytes().map(u32::from).collect())
        .unwrap();
    assert_eq!(e1.session_info("ta", &info.id).unwrap().position, 5);
    assert!(matches!(
        e2.session_info("ta", &info.id),
        Err(Error::SessionNotFound(_))
    ));
    assert!(matches!(
        e1.session_info("tb", &info.id),
        Err(Error::SessionNotFound(_))
    ));
    // The same id, uploaded by another tenant, is another session.
    let snap = e1.session_snapshot("ta", &info.id).unwrap();
    e1.put_session_snapshot("tb", &info.id, &snap).unwrap();
    e1.delete_session("tb", &info.id).unwrap();
    assert_eq!(e1.session_info("ta", &info.id).unwrap().position, 5);
    assert_eq!(e1.list_sessions("ta").unwrap().len(), 1);
    assert!(e1.list_sessions("tb").unwrap().is_empty());
}

/// Two engines share one Redis: the loser of a race on one session gets a version conflict,
/// the store keeps the winner's state, and the loser's engine then serves the winner's.
#[test]
fn two_engines_race_on_one_session_and_the_loser_gets_a_conflict() {
    let Some(r) = Redis::start() else { return };
    let (_dir, model) = tiny();
    let cfg = || EngineConfig {
        threads: 1,
        max_tokens: 1 << 20,
        ..EngineConfig::default()
    };
    let e1 = Engine::start(model.clone(), cfg(), Some(Box::new(store(&r)))).unwrap();
    let e2 = Engine::start(model.clone(), cfg(), Some(Box::new(store(&r)))).unwrap();
    let id = e1.create_session("", vec![1, 2, 3]).unwrap().id;
    let req = |max_tokens| {
        let mut q = CompletionRequest::new(vec![4], max_tokens, SamplingParams::greedy());
        q.target = Target::Session(id.clone());
        q
    };
    // E2 starts a long generation from version 1 ...
    let (tx, rx) = std::sync::mpsc::channel();
    e2.submit(req(3_000), Box::new(move |e| tx.send(e).is_ok()))
        .unwrap();
    let start = Instant::now();
    while e2.stats().running == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(1));
    }
    // ... E1 finishes a short one on the same version first and wins.
    let won = e1.complete(req(2)).unwrap();
    let position = won.session.unwrap().position;
    assert_eq!(position, 3 + 1 + 2);
    let lost = rx
        .iter()
        .find_map(|e| match e {
            performer_engine::Event::Failed(e) => Some(Err(e)),
            performer_engine::Event::Done { .. } => Some(Ok(())),
            _ => None,
        })
        .unwrap();
    assert!(
        matches!(
            lost,
            Err(Error::VersionConflict { expected, found, .. }) if found == expected + 1
        ),
        "{lost:?}"
    );
    // The store holds the winner's state; the loser's engine reloads it.
    assert_eq!(e2.session_info("", &id).unwrap().position, position);
    let next = e2.complete(req(1)).unwrap();
    assert_eq!(next.session.unwrap().position, position + 2);
    assert_eq!(e1.session_info("", &id).unwrap().position, position + 2);
}

/// The shared test server, with a Redis session store.
impl Server {
    async fn start(model: Arc<Model>, redis_url: &str) -> Server {
        let store = RedisStore::open(redis_url)
            .unwrap()
            .with_timeouts(Duration::from_millis(500), Duration::from_secs(5));
        let metrics = Arc::new(Metrics::new());
        let cfg = EngineConfig {
            threads: 1,
            max_tokens: 1 << 20,
            ..EngineConfig::default()
        };
        let engine = Arc::new(
            Engine::start_with_observer(model, cfg, Some(Box::new(store)), Some(metrics.clone()))
                .unwrap(),
        );
        let options = ServerOptions {
            model_id: "performer-byte".into(),
            grace: Duration::from_secs(1),
            ..ServerOptions::default()
        };
        Server::serve(engine, metrics, options).await
    }
}

/// The text of a streamed completion, and whether it ended with `[DONE]` after no error.
fn sse_text(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut clean = true;
    let mut done = false;
    for data in body
        .split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data:")))
        .map(str::trim)
    {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v.get("error").is_some() {
            clean = false;
        }
        if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
    }
    (text, clean && done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_continued_alternately_on_two_servers_is_one_greedy_generation() {
    let Some(r) = Redis::start() else { return };
    let model = shipped();
    let a = Server::start(model.clone(), &r.url()).await;
    let b = Server::start(model.clone(), &r.url()).await;
    let prompt = "Once upon a time";
    let v: Value = a.post_json("/v1/sessions", json!({"prompt": prompt})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let mut text = String::new();
    let steps = 6;
    let per = 10;
    for i in 0..steps {
        let s = if i % 2 == 0 { &b } else { &a };
        let path = format!("/v1/sessions/{id}/completions");
        let body = json!({"prompt": "", "max_tokens": per, "temperature": 0, "stream": i % 4 == 0});
        let resp = s.post(&path, body).await;
        assert_eq!(resp.status(), 200);
        if i % 4 == 0 {
            let (t, clean) = sse_text(&resp.text().await.unwrap());
            assert!(clean, "the stream ends with [DONE] and no error");
            text.push_str(&t);
        } else {
            let v: Value = resp.json().await.unwrap();
            text.push_str(v["choices"][0]["text"].as_str().unwrap());
        }
    }
    assert_eq!(text, generate_text(&model, prompt, steps * per));
    // Both servers report the same stored session.
    for s in [&a, &b] {
        let v: Value = s
            .http
            .get(s.url(&format!("/v1/sessions/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["position"], prompt.len() + steps * per);
        let list: Value = s
            .http
            .get(s.url("/v1/sessions"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["data"].as_array().unwrap().len(), 1);
        assert_eq!(list["data"][0]["id"], id.as_str());
    }
    // A download on one server and a fork on the other see the same state.
    let snap = b
        .http
        .get(b.url(&format!("/v1/sessions/{id}/state")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let fork: Value = a
        .post_json(&format!("/v1/sessions/{id}/fork"), json!({}))
        .await;
    let fork_snap = b
        .http
        .get(b.url(&format!(
            "/v1/sessions/{}/state",
            fork["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(snap, fork_snap);
    // A delete on one is a 404 on the other.
    let resp = b
        .http
        .delete(b.url(&format!("/v1/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = a
        .post(
            &format!("/v1/sessions/{id}/completions"),
            json!({"prompt": "x"}),
        )
        .await;
    assert_error(resp, StatusCode::NOT_FOUND, "session_not_found").await;
    assert_eq!(
        a.shutdown().await,
        0,
        "nothing is left to write at shutdown"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_racing_on_one_session_the_loser_gets_409() {
    let Some(r) = Redis::start() else { return };
    let (_dir, model) = tiny();
    let a = Server::start(model.clone(), &r.url()).await;
    let b = Server::start(model.clone(), &r.url()).await;
    let v: Value = a.post_json("/v1/sessions", json!({"prompt": "abc"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/v1/sessions/{id}/completions");
    let long = {
        let http = b.http.clone();
        let url = b.url(&path);
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"prompt": "d", "max_tokens": 3000, "temperature": 0}))
                .send()
                .await
                .unwrap()
        })
    };
    let start = Instant::now();
    while b.engine.stats().running == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let resp = a
        .post(
            &path,
            json!({"prompt": "e", "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let resp = long.await.unwrap();
    let v = assert_error(resp, StatusCode::CONFLICT, "version_conflict").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("version"));
    let v: Value = b
        .http
        .get(b.url(&format!("/v1/sessions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["position"], 3 + 1 + 2, "the winner's state is stored");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_503_for_sessions_and_recovers_when_it_returns() {
    let Some(mut r) = Redis::start() else { return };
    let model = shipped();
    let s = Server::start(model.clone(), &r.url()).await;
    let prompt = "The old house";
    let v: Value = s.post_json("/v1/sessions", json!({"prompt": prompt})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/v1/sessions/{id}/completions");
    let first: Value = s
        .post_json(&path, json!({"max_tokens": 8, "temperature": 0}))
        .await;
    let mut text = first["choices"][0]["text"].as_str().unwrap().to_string();

    r.stop();
    for resp in [
        s.post(&path, json!({"max_tokens": 8, "temperature": 0}))
            .await,
        s.post(
            &path,
            json!({"max_tokens": 8, "temperature": 0, "stream": true}),
        )
        .await,
        s.post("/v1/sessions", json!({"prompt": "x"})).await,
        s.http
            .get(s.url(&format!("/v1/sessions/{id}")))
            .send()
            .await
            .unwrap(),
        s.http.get(s.url("/v1/sessions")).send().await.unwrap(),
    ] {
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert_error(resp, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    }
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("performer_rejected_requests_total{reason=\"store_unavailable\"} 5"),
        "{metrics}"
    );
    let v: Value = s
        .post_json(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(
        v["choices"][0]["text"],
        generate_text(&model, prompt, 8).as_str(),
        "stateless completions keep working"
    );

    // Back on the same directory: the session is there, and the same server serves it
    // without a restart.
    r.restart();
    let v: Value = s
        .post_json(&path, json!({"max_tokens": 8, "temperature": 0}))
        .await;
    text.push_str(v["choices"][0]["text"].as_str().unwrap());
    assert_eq!(text, generate_text(&model, prompt, 16));
    s.shutdown().await;
}

/// A server that goes away in the middle of a generation leaves the session at its last
/// committed version, and another server continues from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_gone_mid_stream_leaves_the_last_committed_version() {
    let Some(r) = Redis::start() else { return };
    let (_dir, model) = tiny();
    let a = Server::start(model.clone(), &r.url()).await;
    let b = Server::start(model.clone(), &r.url()).await;
    let v: Value = a.post_json("/v1/sessions", json!({"prompt": "abc"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/v1/sessions/{id}/completions");
    let mut resp = a
        .post(
            &path,
            json!({"prompt": "d", "max_tokens": 30000, "stream": true, "temperature": 0}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    resp.chunk().await.unwrap().expect("the stream has begun");
    // Server A stops with its generation unfinished (ended at the 1 s grace).
    let engine = a.engine.clone();
    a.shutdown().await;
    drop(resp);
    assert_eq!(engine.stats().running, 0);
    let v: Value = b
        .http
        .get(b.url(&format!("/v1/sessions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["position"], 3, "the last committed version");
    let resp = b
        .post(
            &path,
            json!({"prompt": "d", "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_through_previous_response_id_alternates_between_two_servers() {
    let Some(r) = Redis::start() else { return };
    let model = shipped();
    let a = Server::start(model.clone(), &r.url()).await;
    let b = Server::start(model.clone(), &r.url()).await;
    let turns = ["Once upon a time", "And then?", "What next?"];
    let mut prev: Option<String> = None;
    let mut history: Vec<Value> = Vec::new();
    for (k, turn) in turns.iter().enumerate() {
        let s = if k % 2 == 0 { &a } else { &b };
        let mut body = json!({"input": turn, "max_output_tokens": 12, "temperature": 0});
        if let Some(p) = &prev {
            body["previous_response_id"] = json!(p);
        }
        let v = s.post_json("/v1/responses", body).await;
        let text = v["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("turn {k}: {v}"))
            .to_string();
        // The whole conversation at once on the other server: the same reply.
        history.push(json!({"role": "user", "content": turn}));
        let other = if k % 2 == 0 { &b } else { &a };
        let c = other
            .post_json(
                "/v1/chat/completions",
                json!({"messages": history, "max_tokens": 12, "temperature": 0}),
            )
            .await;
        assert_eq!(
            c["choices"][0]["message"]["content"],
            text.as_str(),
            "turn {k}"
        );
        history.push(json!({"role": "assistant", "content": text}));
        // The other server serves the stored response as it was returned.
        let id = v["id"].as_str().unwrap().to_string();
        let got: Value = other
            .http
            .get(other.url(&format!("/v1/responses/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got, v);
        prev = Some(id);
    }
    let id = prev.unwrap();
    let resp = a
        .http
        .delete(a.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = b
        .http
        .get(b.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, "response_not_found").await;
    a.shutdown().await;
    b.shutdown().await;
}
