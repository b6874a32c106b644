//! [`RedisStore`]: sessions in Redis (or Valkey), shared by every replica that points at it
//! (`performer serve --session-store redis://HOST:PORT/DB`).
//!
//! Keys, for model fingerprint `fp` (16 hex digits), tenant `t` (`""` without authentication)
//! and session id `id`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `performer:{fp}:{t}:{id}:meta` | hash | `version`, `meta` (the [`SessionMeta`] as JSON), `payload` (the name of the snapshot key) |
//! | `performer:{fp}:{t}:{id}:snap:{version}:{nonce}` | string | the snapshot ([`performer::State::to_bytes`]), immutable |
//! | `performer:{fp}:{t}:index` | set | the tenant's session ids (for listing) |
//!
//! A write puts the snapshot under a new immutable key first, with an expiry (so a writer that
//! dies before the next step leaves nothing behind for long), then one Lua script compares the
//! stored version with the expected one and, atomically, points the meta hash at the new
//! snapshot, removes its expiry, deletes the previous snapshot and adds the id to the index.
//! Readers read the hash and its snapshot in one script, so they see the old version or the
//! new one, never a mix. The scripts touch keys they read from the hash, which a Redis
//! Cluster does not allow: use one Redis (with replicas or a managed primary), not a cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use performer_engine::store::{valid_id, Listing};
use performer_engine::{Error, Result};
use performer_engine::{SessionKey, SessionMeta, SessionStore, StoredSession};
use redis::{Connection, RedisError, Script};

/// Compare-and-set of a staged snapshot. KEYS: meta hash, staged snapshot, index set. ARGV:
/// expected version (`""`: any), new version, meta JSON, id. Returns `{status, found}` with
/// status `ok`, `conflict` or `expired` (the staged snapshot is gone). Versions are compared
/// as decimal strings (Lua numbers are doubles: 64-bit versions would round). Idempotent: a
/// retry of a commit that went through (same snapshot key) returns `ok`.
const COMMIT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'version') or '0'
if redis.call('HGET', KEYS[1], 'payload') == KEYS[2] and cur == ARGV[2] then
  return {'ok', cur}
end
if ARGV[1] ~= '' and ARGV[1] ~= cur then
  return {'conflict', cur}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {'expired', cur}
end
local old = redis.call('HGET', KEYS[1], 'payload')
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'meta', ARGV[3], 'payload', KEYS[2])
if old and old ~= KEYS[2] then redis.call('DEL', old) end
redis.call('SADD', KEYS[3], ARGV[4])
return {'ok', cur}
";

/// Reads a session atomically. KEYS: meta hash. Returns nil, `{meta}` (snapshot missing) or
/// `{meta, snapshot}`.
const READ: &str = r"
local h = redis.call('HMGET', KEYS[1], 'meta', 'payload')
if not h[1] then return false end
local p = false
if h[2] then p = redis.call('GET', h[2]) end
if not p then return {h[1]} end
return {h[1], p}
";

/// Deletes a session. KEYS: meta hash, index set. ARGV: id.
const DELETE: &str = r"
local p = redis.call('HGET', KEYS[1], 'payload')
if p then redis.call('DEL', p) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
";

/// A snapshot written under its own key but not yet committed (step one of
/// [`RedisStore::put`]); it expires unless [`RedisStore::commit`] makes it current.
#[derive(Debug, Clone)]
pub struct Staged {
    meta: SessionMeta,
    key: String,
}

impl Staged {
    /// The Redis key holding the staged snapshot.
    pub fn payload_key(&self) -> &str {
        &self.key
    }
}

/// Sessions in Redis, shared by several engines (see the module documentation for the keys
/// and the write protocol). One connection, opened on first use and opened again on the next
/// call after any connection error, with connect and read/write timeouts: while Redis is
/// unreachable every call fails at once (or after the timeout) with
/// [`Error::StoreUnavailable`], and the store recovers by itself when Redis is back.
pub struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<Connection>>,
    prefix: String,
    connect_timeout: Duration,
    io_timeout: Duration,
    staged_ttl: Duration,
    nonce: AtomicU64,
    commit: Script,
    read: Script,
    delete: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "server",
                &self.client.get_connection_info().addr().to_string(),
            )
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Whether an error means Redis cannot be reached or cannot serve now (retry later), as
/// opposed to a fault in a request.
fn unavailable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.code(),
            Some(
                "LOADING"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "MISCONF"
                    | "BUSY"
            )
        )
}

fn to_error(e: &RedisError) -> Error {
    if unavailable(e) {
        Error::StoreUnavailable(format!("redis: {e}"))
    } else {
        Error::SessionStorage(format!("redis: {e}"))
    }
}

impl RedisStore {
    /// A store for the Redis at `url` (`redis://HOST:PORT/DB`, optionally with
    /// `USER:PASSWORD@`). Does not connect: the first call does (see [`Self::ping`]).
    pub fn open(url: &str) -> Result<RedisStore> {
        if !url.starts_with("redis://") {
            return Err(Error::invalid(
                "session store",
                format!("`{url}` is not a redis://HOST:PORT/DB address"),
            ));
        }
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid("session store", format!("`{url}`: {e}")))?;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((std::process::id() as u64) << 32);
        Ok(RedisStore {
            client,
            conn: Mutex::new(None),
            prefix: "performer".into(),
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(5),
            staged_ttl: Duration::from_secs(300),
            nonce: AtomicU64::new(seed),
            commit: Script::new(COMMIT),
            read: Script::new(READ),
            delete: Script::new(DELETE),
        })
    }

    /// Sets the connect timeout and the read/write timeout of every call (default 1 s and 5 s).
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> Self {
        self.connect_timeout = connect;
        self.io_timeout = io;
        self
    }

    /// Sets how long a staged snapshot lives unless committed (default 300 s).
    pub fn with_staged_ttl(mut self, ttl: Duration) -> Self {
        self.staged_ttl = ttl;
        self
    }

    /// Checks that Redis answers.
    pub fn ping(&self) -> Result<()> {
        self.with(|c| redis::cmd("PING").query::<String>(c).map(|_| ()))
    }

    fn connect(&self) -> Result<Connection> {
        let c = self
            .client
            .get_connection_with_timeout(self.connect_timeout)
            .map_err(|e| to_error(&e))?;
        c.set_read_timeout(Some(self.io_timeout))
            .and_then(|()| c.set_write_timeout(Some(self.io_timeout)))
            .map_err(|e| to_error(&e))?;
        Ok(c)
    }

    /// Runs `f` on the connection (opening one if needed). A connection error drops the
    /// connection; if it was an old one (Redis restarted since), `f` runs once more on a new
    /// one. Every call made through here is idempotent.
    fn with<T>(&self, mut f: impl FnMut(&mut Connection) -> redis::RedisResult<T>) -> Result<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = false;
        loop {
            if guard.is_none() {
                *guard = Some(self.connect()?);
                fresh = true;
            }
            match f(guard.as_mut().expect("connected")) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if unavailable(&e) {
                        *guard = None;
                        if !fresh {
                            continue;
                        }
                    }
                    return Err(to_error(&e));
                }
            }
        }
    }

    fn check_key(key: &SessionKey) -> Result<()> {
        if !valid_id(&key.id) {
            return Err(Error::invalid(
                "session id",
                format!("`{}` is not valid", key.id),
            ));
        }
        if !key.tenant.is_empty() && !valid_id(&key.tenant) {
            return Err(Error::invalid(
                "tenant",
                format!("`{}` cannot be part of a key", key.tenant),
            ));
        }
        Ok(())
    }

    fn base(&self, key: &SessionKey) -> String {
        format!(
            "{}:{:016x}:{}:{}",
            self.prefix, key.fingerprint, key.tenant, key.id
        )
    }

    fn meta_key(&self, key: &SessionKey) -> String {
        format!("{}:meta", self.base(key))
    }

    fn index_key(&self, fingerprint: u64, tenant: &str) -> String {
        format!("{}:{fingerprint:016x}:{tenant}:index", self.prefix)
    }

    /// Step one of [`SessionStore::put`]: writes the snapshot under a new, immutable key that
    /// expires after the staged lifetime unless committed. Nothing refers to it yet: readers
    /// still see the previous version.
    pub fn stage(&self, session: &StoredSession) -> Result<Staged> {
        let key = SessionKey::of(&session.meta);
        Self::check_key(&key)?;
        let nonce =
            performer::sampling::splitmix64(&mut self.nonce.fetch_add(1, Ordering::Relaxed));
        let payload = format!(
            "{}:snap:{}:{nonce:016x}",
            self.base(&key),
            session.meta.version
        );
        let ttl_ms = self.staged_ttl.as_millis().max(1) as u64;
        self.with(|c| {
            redis::cmd("SET")
                .arg(&payload)
                .arg(&session.snapshot[..])
                .arg("PX")
                .arg(ttl_ms)
                .query::<()>(c)
        })?;
        Ok(Staged {
            meta: session.meta.clone(),
            key: payload,
        })
    }

    /// Step two of [`SessionStore::put`]: if the stored version is `expected` (`None`: any;
    /// `Some(0)`: absent), makes the staged snapshot the session's current version, atomically;
    /// else [`Error::VersionConflict`] and the store is unchanged.
    pub fn commit(&self, staged: &Staged, expected: Option<u64>) -> Result<()> {
        let key = SessionKey::of(&staged.meta);
        let json = serde_json::to_string(&staged.meta)
            .map_err(|e| Error::SessionStorage(format!("metadata: {e}")))?;
        let meta_key = self.meta_key(&key);
        let index = self.index_key(key.fingerprint, &key.tenant);
        let expected_arg = expected.map_or(String::new(), |v| v.to_string());
        let (status, found): (String, String) = self.with(|c| {
            self.commit
                .key(&meta_key)
                .key(&staged.key)
                .key(&index)
                .arg(&expected_arg)
                .arg(staged.meta.version)
                .arg(&json)
                .arg(&key.id)
                .invoke(c)
        })?;
        let found: u64 = found.parse().map_err(|_| {
            Error::SessionStorage(format!("redis: version `{found}` of `{}`", key.id))
        })?;
        match status.as_str() {
            "ok" => Ok(()),
            "conflict" => Err(Error::VersionConflict {
                id: key.id,
                expected: expected.unwrap_or(0),
                found,
            }),
            "expired" => Err(Error::SessionStorage(format!(
                "the snapshot of `{}` expired before it was committed",
                key.id
            ))),
            other => Err(Error::SessionStorage(format!(
                "redis: unexpected commit status `{other}`"
            ))),
        }
    }

    fn parse_meta(bytes: &[u8]) -> Result<SessionMeta> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::SessionStorage(format!("redis: session metadata: {e}")))
    }
}

impl SessionStore for RedisStore {
    fn get(&self, key: &SessionKey) -> Result<Option<StoredSession>> {
        Self::check_key(key)?;
        let meta_key = self.meta_key(key);
        let got: Option<Vec<Vec<u8>>> = self.with(|c| self.read.key(&meta_key).invoke(c))?;
        let Some(mut parts) = got else {
            return Ok(None);
        };
        if parts.len() != 2 {
            return Err(Error::SessionStorage(format!(
                "redis: the snapshot of `{}` is missing",
                key.id
            )));
        }
        let snapshot = parts.pop().expect("two parts");
        let meta = Self::parse_meta(&parts[0])?;
        if SessionKey::of(&meta) != *key {
            return Err(Error::SessionStorage(format!(
                "redis: `{meta_key}` holds another session's metadata"
            )));
        }
        Ok(Some(StoredSession { meta, snapshot }))
    }

    fn version(&self, key: &SessionKey) -> Result<Option<u64>> {
        Self::check_key(key)?;
        let meta_key = self.meta_key(key);
        self.with(|c| {
            redis::cmd("HGET")
                .arg(&meta_key)
                .arg("version")
                .query::<Option<u64>>(c)
        })
    }

    /// [`Self::stage`] then [`Self::commit`]: the snapshot is in Redis before anything refers
    /// to it.
    fn put(&self, session: &StoredSession, expected: Option<u64>) -> Result<()> {
        let staged = self.stage(session)?;
        let committed = self.commit(&staged, expected);
        if committed.is_err() {
            // The loser's snapshot would expire anyway; delete it now if Redis answers.
            let _ = self.with(|c| redis::cmd("DEL").arg(&staged.key).query::<()>(c));
        }
        committed
    }

    fn delete(&self, key: &SessionKey) -> Result<()> {
        Self::check_key(key)?;
        let meta_key = self.meta_key(key);
        let index = self.index_key(key.fingerprint, &key.tenant);
        self.with(|c| {
            self.delete
                .key(&meta_key)
                .key(&index)
                .arg(&key.id)
                .invoke::<i64>(c)
                .map(|_| ())
        })
    }

    /// Every session of every model and tenant (a `SCAN` of the meta keys: for tools, not for
    /// requests; the engine never calls it on a shared store).
    fn list(&self) -> Result<Listing> {
        let pattern = format!("{}:*:meta", self.prefix);
        let keys: Vec<String> = self.with(|c| {
            let mut out = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                out.extend(batch);
                if next == 0 {
                    return Ok(out);
                }
                cursor = next;
            }
        })?;
        let mut metas = Vec::new();
        let mut bad = Vec::new();
        for k in keys {
            let json: Option<Vec<u8>> =
                self.with(|c| redis::cmd("HGET").arg(&k).arg("meta").query(c))?;
            match json.map(|j| Self::parse_meta(&j)) {
                Some(Ok(m)) => metas.push(m),
                Some(Err(e)) => bad.push((k, e)),
                None => {}
            }
        }
        Ok((metas, bad))
    }

    fn list_tenant(&self, fingerprint: u64, tenant: &str) -> Result<Vec<SessionMeta>> {
        let index = self.index_key(fingerprint, tenant);
        let ids: Vec<String> = self.with(|c| redis::cmd("SMEMBERS").arg(&index).query(c))?;
        let keys: Vec<String> = ids
            .into_iter()
            .map(|id| SessionKey {
                fingerprint,
                tenant: tenant.to_string(),
                id,
            })
            .filter(|k| Self::check_key(k).is_ok())
            .map(|k| self.meta_key(&k))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for all of them.
        let jsons: Vec<Option<Vec<u8>>> = self.with(|c| {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("HGET").arg(k).arg("meta");
            }
            pipe.query(c)
        })?;
        // An id whose session was deleted between the two reads is skipped.
        jsons
            .into_iter()
            .flatten()
            .map(|j| Self::parse_meta(&j))
            .collect()
    }

    fn shared(&self) -> bool {
        true
    }
}
