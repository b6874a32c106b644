//! The session table: states with their metadata and owner, a busy flag, a memory budget
//! with least-recently-used spill to a [`SessionStore`], and idle expiry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::request::SessionInfo;
use super::store::{
    valid_id, SessionKey, SessionMeta, SessionStore, StoredSession, MAX_NOTE_BYTES,
};
use crate::error::{Error, Result};
use performer::sampling::splitmix64;
use performer::{Model, State};

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts of the table, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Sessions whose state is in memory (including those running).
    pub in_memory: usize,
    /// Bytes of the states in memory.
    pub memory_bytes: usize,
    /// Sessions only in the store.
    pub on_disk: usize,
    /// Bytes of the states only in the store (their in-memory size).
    pub disk_bytes: usize,
}

struct Entry {
    meta: SessionMeta,
    /// `None`: only in the store (or, while busy, out with the scheduler).
    state: Option<State>,
    /// Whether the store holds the current version.
    stored: bool,
    /// Whether the store holds some version (then writing the current one replaces it).
    filed: bool,
    busy: bool,
    /// Bytes still counted against the budget while the state is out with the scheduler: a
    /// running session keeps its room, so its state always fits when it comes back.
    held: usize,
    /// Logical clock of the last use, for LRU.
    tick: u64,
}

/// Bytes a session file takes beyond its state's size, counted generously: the header, the
/// metadata, the snapshot's own header and the file system's rounding to whole blocks.
const FILE_OVERHEAD: u64 = 64 << 10;

/// A session write prepared under the table's lock, done outside it (shared store only).
pub(crate) struct PendingWrite {
    /// What to store.
    pub(crate) session: StoredSession,
    /// The version the store must hold (0: absent).
    pub(crate) expected: u64,
    /// The state the cache keeps once written.
    state: State,
}

/// A key of the table: (namespace, id). With a shared store the namespace is the tenant
/// (tenants never collide); otherwise it is `""`, the ids form one namespace and an id of
/// another tenant is refused as not found.
type Key = (String, String);

/// The table. Every method is quick except those that touch the store.
pub(crate) struct Sessions {
    model: Arc<Model>,
    map: HashMap<Key, Entry>,
    store: Option<Arc<dyn SessionStore>>,
    /// Whether the store is shared by several engines: then the table is only a cache, checked
    /// against the store before every use and written through on every change.
    shared: bool,
    max_bytes: usize,
    memory_bytes: usize,
    ttl: Option<Duration>,
    clock: u64,
    rng: u64,
    /// Ids of stored sessions this engine does not serve (another model's): never reused.
    foreign: std::collections::HashSet<String>,
}

impl Sessions {
    /// An empty table. With a store that is not shared, indexes the sessions already there
    /// (skipping, with one log line each on stderr, files of another model or unreadable
    /// ones); a shared store is only read on demand.
    pub(crate) fn open(
        model: Arc<Model>,
        store: Option<Box<dyn SessionStore>>,
        max_bytes: usize,
        ttl: Option<Duration>,
    ) -> Result<Self> {
        // Ids must differ between engines, even two in one process within one second.
        static ENGINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos
            ^ ((std::process::id() as u64) << 32)
            ^ ENGINES
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let shared = store.as_ref().is_some_and(|s| s.shared());
        let mut s = Sessions {
            model,
            map: HashMap::new(),
            store: store.map(Arc::from),
            shared,
            max_bytes,
            memory_bytes: 0,
            ttl,
            clock: 0,
            rng: seed,
            foreign: Default::default(),
        };
        if let (Some(store), false) = (&s.store, shared) {
            let (metas, bad) = store.list()?;
            for (name, e) in bad {
                eprintln!("performer: skipping session file {name}: {e}");
            }
            let fp = s.model.fingerprint();
            for meta in metas {
                if meta.fingerprint != fp {
                    eprintln!(
                        "performer: skipping session {} (made with another model)",
                        meta.id
                    );
                    s.foreign.insert(meta.id);
                    continue;
                }
                s.map.insert(
                    (String::new(), meta.id.clone()),
                    Entry {
                        meta,
                        state: None,
                        stored: true,
                        filed: true,
                        busy: false,
                        held: 0,
                        tick: 0,
                    },
                );
            }
        }
        Ok(s)
    }

    /// The table's key of a tenant's session.
    fn key(&self, tenant: &str, id: &str) -> Key {
        let ns = if self.shared { tenant } else { "" };
        (ns.to_string(), id.to_string())
    }

    /// The store's key of a tenant's session of this model.
    fn store_key(&self, tenant: &str, id: &str) -> SessionKey {
        SessionKey {
            fingerprint: self.model.fingerprint(),
            tenant: tenant.to_string(),
            id: id.to_string(),
        }
    }

    fn new_id(&mut self, tenant: &str, prefix: &str) -> String {
        loop {
            let id = format!("{prefix}{:016x}", splitmix64(&mut self.rng));
            if !self.map.contains_key(&self.key(tenant, &id)) && !self.foreign.contains(&id) {
                return id;
            }
        }
    }

    fn touch(&mut self, k: &Key) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.map.get_mut(k) {
            e.tick = clock;
            e.meta.last_used = now_unix();
        }
    }

    /// The entry of `id` if `tenant` owns it.
    fn entry(&self, tenant: &str, id: &str) -> Result<&Entry> {
        self.map
            .get(&self.key(tenant, id))
            .filter(|e| e.meta.tenant == tenant)
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))
    }

    fn info(e: &Entry) -> SessionInfo {
        SessionInfo {
            id: e.meta.id.clone(),
            position: e.meta.position,
            state_bytes: e.meta.state_bytes,
            created: e.meta.created,
            last_used: e.meta.last_used,
        }
    }

    /// Writes `state` under `meta` to the shared store if the stored version is still
    /// `expected` (compare and set). On an error the caller forgets its entry: the local copy
    /// may no longer be what the store holds.
    fn write_through(&self, state: &State, meta: &SessionMeta, expected: u64) -> Result<()> {
        let snapshot = state.to_bytes(&self.model)?;
        let store = self.store.as_ref().expect("a shared table has a store");
        store.put(
            &StoredSession {
                meta: meta.clone(),
                snapshot,
            },
            Some(expected),
        )
    }

    /// Drops an entry (and its state) from the table.
    fn forget(&mut self, k: &Key) {
        if let Some(e) = self.map.remove(k) {
            self.memory_bytes -= e.held;
            if let Some(st) = e.state {
                self.memory_bytes -= st.size_bytes();
            }
        }
    }

    /// With a shared store: makes the cached entry of `id` the stored version, loading it on a
    /// miss or when the store holds another version. An entry busy here is left alone (the
    /// compare-and-set of its commit decides). Without a shared store: nothing.
    fn sync(&mut self, tenant: &str, id: &str) -> Result<()> {
        if !self.shared {
            return Ok(());
        }
        if !valid_id(id) {
            return Err(Error::SessionNotFound(id.to_string()));
        }
        let k = self.key(tenant, id);
        let sk = self.store_key(tenant, id);
        let store = self.store.as_ref().expect("a shared table has a store");
        if let Some(e) = self.map.get(&k) {
            if e.busy {
                return Ok(());
            }
            if e.state.is_some() {
                match store.version(&sk)? {
                    Some(v) if v == e.meta.version => return Ok(()),
                    Some(_) => {}
                    None => {
                        self.forget(&k);
                        return Err(Error::SessionNotFound(id.to_string()));
                    }
                }
            }
        }
        let Some(stored) = store.get(&sk)? else {
            self.forget(&k);
            return Err(Error::SessionNotFound(id.to_string()));
        };
        if SessionKey::of(&stored.meta) != sk {
            return Err(Error::SessionStorage(format!(
                "the store returned another session for `{id}`"
            )));
        }
        let state = State::from_bytes(&self.model, &stored.snapshot)?;
        self.forget(&k);
        self.memory_bytes += state.size_bytes();
        self.map.insert(
            k.clone(),
            Entry {
                meta: stored.meta,
                state: Some(state),
                stored: true,
                filed: true,
                busy: false,
                held: 0,
                tick: 0,
            },
        );
        self.touch(&k);
        self.enforce_budget()
    }

    /// The store, if it is shared: for writes done outside the table's lock (see
    /// [`Self::prepare_checkin`]).
    pub(crate) fn shared_store(&self) -> Option<Arc<dyn SessionStore>> {
        self.store.clone().filter(|_| self.shared)
    }

    /// With a shared store, the first step of ending a request that changed session `id`:
    /// the new version's metadata and snapshot, to be written (outside the lock) with
    /// compare-and-set against the version the request started from, then handed to
    /// [`Self::finish_write`]. The session stays busy meanwhile. On an error the cached entry
    /// is dropped.
    pub(crate) fn prepare_checkin(
        &mut self,
        tenant: &str,
        id: &str,
        state: State,
    ) -> Result<PendingWrite> {
        let k = self.key(tenant, id);
        let e = self
            .map
            .get(&k)
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        let mut meta = e.meta.clone();
        meta.position = state.position();
        meta.state_bytes = state.size_bytes();
        meta.version += 1;
        meta.last_used = now_unix();
        let expected = e.meta.version;
        match state.to_bytes(&self.model) {
            Ok(snapshot) => Ok(PendingWrite {
                session: StoredSession { meta, snapshot },
                expected,
                state,
            }),
            Err(err) => {
                self.forget(&k);
                Err(err.into())
            }
        }
    }

    /// [`Self::prepare_checkin`] for a new session of `tenant` holding `state` (a new id, a
    /// random first version, expected absent).
    pub(crate) fn prepare_insert(&mut self, tenant: &str, state: State) -> Result<PendingWrite> {
        let id = self.new_id(tenant, "sess-");
        let now = now_unix();
        let meta = SessionMeta {
            id,
            tenant: tenant.to_string(),
            created: now,
            last_used: now,
            position: state.position(),
            state_bytes: state.size_bytes(),
            version: (splitmix64(&mut self.rng) >> 2).max(1),
            fingerprint: self.model.fingerprint(),
            note: None,
        };
        let snapshot = state.to_bytes(&self.model)?;
        Ok(PendingWrite {
            session: StoredSession { meta, snapshot },
            expected: 0,
            state,
        })
    }

    /// Ends a write prepared by [`Self::prepare_checkin`] or [`Self::prepare_insert`] with the
    /// store's answer: on success the cache holds the new version, free; on failure the cached
    /// entry is dropped (the next use reloads it) and the error comes back.
    pub(crate) fn finish_write(
        &mut self,
        write: PendingWrite,
        result: Result<()>,
    ) -> Result<SessionInfo> {
        let meta = write.session.meta;
        let k = self.key(&meta.tenant, &meta.id);
        self.forget(&k);
        result?;
        self.memory_bytes += write.state.size_bytes();
        self.map.insert(
            k.clone(),
            Entry {
                meta,
                state: Some(write.state),
                stored: true,
                filed: true,
                busy: false,
                held: 0,
                tick: 0,
            },
        );
        self.touch(&k);
        let info = Self::info(&self.map[&k]);
        if let Err(e) = self.enforce_budget() {
            eprintln!("performer: cannot spill sessions: {e}");
        }
        Ok(info)
    }

    /// Adds a new session holding `state`.
    pub(crate) fn insert(&mut self, tenant: &str, state: State) -> Result<SessionInfo> {
        self.insert_prefixed(tenant, "sess-", state)
    }

    /// Adds a new session holding `state`, its id `prefix` and 16 random hex digits.
    pub(crate) fn insert_prefixed(
        &mut self,
        tenant: &str,
        prefix: &str,
        state: State,
    ) -> Result<SessionInfo> {
        let id = self.new_id(tenant, prefix);
        self.put_state(tenant, &id, state)
    }

    /// A session's note ([`SessionMeta::note`]).
    pub(crate) fn note(&mut self, tenant: &str, id: &str) -> Result<Option<String>> {
        self.sync(tenant, id)?;
        Ok(self.entry(tenant, id)?.meta.note.clone())
    }

    /// Attaches `note` to an idle session (with a shared store, written through as a new
    /// version). The state is loaded if it was spilled: the note is written with it.
    pub(crate) fn set_note(
        &mut self,
        tenant: &str,
        id: &str,
        note: Option<String>,
    ) -> Result<SessionInfo> {
        if let Some(n) = note.as_ref().filter(|n| n.len() > MAX_NOTE_BYTES) {
            return Err(Error::invalid(
                "note",
                format!("{} bytes is above the limit {MAX_NOTE_BYTES}", n.len()),
            ));
        }
        self.sync(tenant, id)?;
        if self.entry(tenant, id)?.busy {
            return Err(Error::SessionBusy(id.to_string()));
        }
        let k = self.key(tenant, id);
        self.load(&k)?;
        let e = &self.map[&k];
        let mut meta = e.meta.clone();
        meta.note = note;
        if self.shared {
            meta.version += 1;
            meta.last_used = now_unix();
            let state = e.state.as_ref().expect("loaded");
            if let Err(err) = self.write_through(state, &meta, e.meta.version) {
                self.forget(&k);
                return Err(err);
            }
        }
        let e = self.map.get_mut(&k).expect("present");
        e.meta = meta;
        e.stored = self.shared;
        self.touch(&k);
        Ok(Self::info(&self.map[&k]))
    }

    /// Creates or replaces session `id` with `state` (with a shared store, written through).
    pub(crate) fn put_state(
        &mut self,
        tenant: &str,
        id: &str,
        state: State,
    ) -> Result<SessionInfo> {
        if !valid_id(id) {
            return Err(Error::invalid(
                "session id",
                "1-64 ASCII letters, digits, '-' or '_'",
            ));
        }
        match self.sync(tenant, id) {
            Ok(()) | Err(Error::SessionNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let k = self.key(tenant, id);
        let now = now_unix();
        let (created, version, filed) = match self.map.get(&k) {
            Some(e) if e.meta.tenant != tenant => {
                return Err(Error::SessionNotFound(id.to_string()))
            }
            Some(e) if e.busy => return Err(Error::SessionBusy(id.to_string())),
            Some(e) => (e.meta.created, e.meta.version, e.filed),
            None if self.foreign.contains(id) => {
                return Err(Error::SessionStorage(format!(
                    "`{id}` is taken by a stored session of another model"
                )))
            }
            None => (now, 0, false),
        };
        // With a shared store a new session's first version is random (below 2^62), not 1: a
        // session deleted and created again under the same id (by an upload) does not repeat
        // a version of its earlier life that another engine may still have cached.
        let next = if self.shared && version == 0 {
            (splitmix64(&mut self.rng) >> 2).max(1)
        } else {
            version + 1
        };
        let bytes = state.size_bytes();
        // Room first: what does not fit is refused before anything changes (the entry it
        // replaces keeps its room until then), on the disk too.
        self.check_disk(&k, bytes, filed)?;
        let replaced = self.map.get(&k).map_or(0, |e| {
            e.held + e.state.as_ref().map_or(0, State::size_bytes)
        });
        self.make_room(bytes.saturating_sub(replaced), Some(&k))?;
        let meta = SessionMeta {
            id: id.to_string(),
            tenant: tenant.to_string(),
            created,
            last_used: now,
            position: state.position(),
            state_bytes: bytes,
            version: next,
            fingerprint: self.model.fingerprint(),
            note: None,
        };
        if self.shared {
            if let Err(e) = self.write_through(&state, &meta, version) {
                self.forget(&k);
                return Err(e);
            }
        }
        self.forget(&k);
        let entry = Entry {
            meta,
            state: Some(state),
            stored: self.shared,
            filed: self.shared || filed,
            busy: false,
            held: 0,
            tick: 0,
        };
        self.memory_bytes += bytes;
        self.map.insert(k.clone(), entry);
        self.touch(&k);
        Ok(Self::info(&self.map[&k]))
    }

    /// Metadata of a session (with a shared store, of its stored version).
    pub(crate) fn get(&mut self, tenant: &str, id: &str) -> Result<SessionInfo> {
        self.sync(tenant, id)?;
        self.entry(tenant, id).map(Self::info)
    }

    /// The tenant's sessions, oldest first (with a shared store, those it holds for this
    /// model).
    pub(crate) fn list(&self, tenant: &str) -> Result<Vec<SessionInfo>> {
        let mut out: Vec<SessionInfo> = match (&self.store, self.shared) {
            (Some(store), true) => store
                .list_tenant(self.model.fingerprint(), tenant)?
                .into_iter()
                .map(|meta| {
                    Self::info(&Entry {
                        meta,
                        state: None,
                        stored: true,
                        filed: true,
                        busy: false,
                        held: 0,
                        tick: 0,
                    })
                })
                .collect(),
            _ => self
                .map
                .values()
                .filter(|e| e.meta.tenant == tenant)
                .map(Self::info)
                .collect(),
        };
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Loads `k`'s state into memory if it is only in the store.
    fn load(&mut self, k: &Key) -> Result<()> {
        let e = self.map.get(k).expect("checked by the caller");
        if e.state.is_some() {
            return Ok(());
        }
        let sk = SessionKey::of(&e.meta);
        let need = e.meta.state_bytes;
        self.make_room(need, Some(k))?;
        let store = self.store.as_ref().ok_or_else(|| {
            Error::SessionStorage(format!("session `{}` has no state and no store", k.1))
        })?;
        let stored = store.get(&sk).map_err(Error::from_store)?.ok_or_else(|| {
            Error::SessionStorage(format!("session `{}` vanished from the store", k.1))
        })?;
        let state = State::from_bytes(&self.model, &stored.snapshot)?;
        self.memory_bytes += state.size_bytes();
        self.map.get_mut(k).expect("present").state = Some(state);
        Ok(())
    }

    /// Marks a session busy without taking its state yet (a queued request): other requests
    /// get [`Error::SessionBusy`] from now on.
    pub(crate) fn reserve(&mut self, tenant: &str, id: &str) -> Result<()> {
        self.sync(tenant, id)?;
        let e = self.entry(tenant, id)?;
        if e.busy {
            return Err(Error::SessionBusy(id.to_string()));
        }
        let (bytes, filed) = (e.meta.state_bytes, e.filed);
        let k = self.key(tenant, id);
        // The request leaves a new version only in memory: it must fit on the disk too.
        self.check_disk(&k, bytes, filed)?;
        self.map.get_mut(&k).expect("present").busy = true;
        Ok(())
    }

    /// Takes the state of a session [`Self::reserve`]d before.
    pub(crate) fn take_reserved(&mut self, tenant: &str, id: &str) -> Result<State> {
        let k = self.key(tenant, id);
        if !self.map.contains_key(&k) {
            return Err(Error::SessionNotFound(id.to_string()));
        }
        self.load(&k)?;
        let e = self.map.get_mut(&k).expect("present");
        let state = e.state.take().expect("loaded");
        // The bytes stay counted (as `held`) until the state comes back.
        e.held += state.size_bytes();
        Ok(state)
    }

    /// Ends a failed or cancelled request on a session: the state it had before comes back
    /// (if it was taken) unchanged, version and all, and the session is free again.
    pub(crate) fn restore(&mut self, tenant: &str, id: &str, original: Option<State>) {
        let k = self.key(tenant, id);
        let Some(e) = self.map.get_mut(&k) else {
            return;
        };
        e.busy = false;
        self.memory_bytes -= std::mem::take(&mut e.held);
        if let Some(st) = original {
            self.memory_bytes += st.size_bytes();
            if let Some(old) = e.state.replace(st) {
                self.memory_bytes -= old.size_bytes();
            }
        }
        self.touch(&k);
    }

    /// Ends a request on a session that changed its state: the new state comes back and the
    /// session is free again. With a shared store the new version is written through first,
    /// with compare-and-set against the version the request started from; if that fails
    /// (another engine wrote the session meanwhile: [`Error::VersionConflict`]; the store is
    /// down) the cached entry is dropped, the next use reloads it, and the error is returned.
    pub(crate) fn checkin(
        &mut self,
        tenant: &str,
        id: &str,
        state: Option<State>,
    ) -> Result<Option<SessionInfo>> {
        let k = self.key(tenant, id);
        let Some(e) = self.map.get_mut(&k) else {
            return Ok(None);
        };
        e.busy = false;
        self.memory_bytes -= std::mem::take(&mut e.held);
        if let Some(st) = state {
            let mut meta = e.meta.clone();
            meta.position = st.position();
            meta.state_bytes = st.size_bytes();
            meta.version += 1;
            meta.last_used = now_unix();
            if self.shared {
                let expected = e.meta.version;
                if let Err(err) = self.write_through(&st, &meta, expected) {
                    self.forget(&k);
                    return Err(err);
                }
            }
            let e = self.map.get_mut(&k).expect("present");
            e.meta = meta;
            e.stored = self.shared;
            self.memory_bytes += st.size_bytes();
            if let Some(old) = e.state.replace(st) {
                self.memory_bytes -= old.size_bytes();
            }
        }
        self.touch(&k);
        let info = Self::info(&self.map[&k]);
        if let Err(e) = self.enforce_budget() {
            eprintln!("performer: cannot spill sessions: {e}");
        }
        Ok(Some(info))
    }

    /// A copy of a session's state (for fork and download).
    pub(crate) fn copy_state(&mut self, tenant: &str, id: &str) -> Result<State> {
        self.sync(tenant, id)?;
        let e = self.entry(tenant, id)?;
        if e.busy {
            return Err(Error::SessionBusy(id.to_string()));
        }
        let k = self.key(tenant, id);
        self.touch(&k);
        let e = &self.map[&k];
        if let Some(st) = &e.state {
            return Ok(st.clone());
        }
        // Only in the store: read for this copy, not cached (the copy is the caller's; the
        // table's budget is not touched, so nothing else has to be spilled for it).
        let store = self.store.as_ref().ok_or_else(|| {
            Error::SessionStorage(format!("session `{id}` has no state and no store"))
        })?;
        let stored = store
            .get(&SessionKey::of(&e.meta))
            .map_err(Error::from_store)?
            .ok_or_else(|| {
                Error::SessionStorage(format!("session `{id}` vanished from the store"))
            })?;
        Ok(State::from_bytes(&self.model, &stored.snapshot)?)
    }

    /// Removes a session from memory and the store.
    pub(crate) fn delete(&mut self, tenant: &str, id: &str) -> Result<()> {
        self.sync(tenant, id)?;
        let e = self.entry(tenant, id)?;
        if e.busy {
            return Err(Error::SessionBusy(id.to_string()));
        }
        let sk = SessionKey::of(&e.meta);
        if let Some(store) = &self.store {
            store.delete(&sk)?;
        }
        let k = self.key(tenant, id);
        self.forget(&k);
        Ok(())
    }

    /// Writes least recently used idle sessions to the store until memory is within budget
    /// (with a shared store they are there already: only their states leave the cache). For
    /// states already admitted (a session coming back from a request, one read from a shared
    /// store): what cannot be spilled stays in memory, over the budget, with a log line.
    fn enforce_budget(&mut self) -> Result<()> {
        self.make_room(0, None)
    }

    /// Spills least recently used idle sessions (never `keep`) until `need` more bytes fit in
    /// the budget. A session whose write fails stays in memory (its state is not dropped) and
    /// the error comes back as [`Error::InsufficientStorage`], naming neither that session
    /// nor a path (it may be another tenant's); the details go to stderr.
    fn make_room(&mut self, need: usize, keep: Option<&Key>) -> Result<()> {
        while self.memory_bytes.saturating_add(need) > self.max_bytes {
            let victim = self
                .map
                .iter()
                .filter(|(k, e)| !e.busy && e.state.is_some() && Some(*k) != keep)
                .min_by_key(|(_, e)| e.tick)
                .map(|(k, _)| k.clone());
            let no_room = || {
                Error::InsufficientStorage(format!(
                    "{need} more bytes of session state do not fit: {} of the {} bytes allowed are in use",
                    self.memory_bytes, self.max_bytes
                ))
            };
            let Some(k) = victim else {
                return Err(no_room());
            };
            if self.store.is_none() {
                return Err(Error::InsufficientStorage(format!(
                    "{need} more bytes of session state do not fit in the {} bytes allowed, and there is no session directory to spill to",
                    self.max_bytes
                )));
            }
            if let Err(e) = self.write_out(&k) {
                eprintln!("performer: cannot spill session {}: {e}", k.1);
                return Err(match e {
                    Error::InsufficientStorage(reason) => Error::InsufficientStorage(reason),
                    _ => Error::InsufficientStorage(
                        "the session store cannot take another session".into(),
                    ),
                });
            }
            self.remove_memory(&k);
        }
        Ok(())
    }

    /// Drops `k`'s state from the memory count (the entry stays).
    fn remove_memory(&mut self, k: &Key) {
        if let Some(st) = self.map.get_mut(k).and_then(|e| e.state.take()) {
            self.memory_bytes -= st.size_bytes();
        }
    }

    fn write_out(&mut self, k: &Key) -> Result<()> {
        let e = &self.map[k];
        if e.stored {
            return Ok(());
        }
        let (Some(store), Some(state)) = (&self.store, &e.state) else {
            return Ok(());
        };
        let snapshot = state.to_bytes(&self.model)?;
        store
            .put(
                &StoredSession {
                    meta: e.meta.clone(),
                    snapshot,
                },
                None,
            )
            .map_err(Error::from_store)?;
        let e = self.map.get_mut(k).expect("present");
        e.stored = true;
        e.filed = true;
        Ok(())
    }

    /// Bytes the store needs to take every session whose newest version is only in memory
    /// (or will be, once a running request ends), with the session under `k` counted as such
    /// and `bytes` large: a new file for each that has none in the store, and room for the
    /// largest of those that replace one (written one at a time, each replacement frees its
    /// older file as it lands).
    fn disk_needed(&self, k: &Key, bytes: usize, filed: bool) -> u64 {
        let size = |b: usize| b as u64 + FILE_OVERHEAD;
        let (mut new_files, mut largest) = (0u64, 0u64);
        let mut count = |bytes: usize, filed: bool| {
            if filed {
                largest = largest.max(size(bytes));
            } else {
                new_files += size(bytes);
            }
        };
        for (key, e) in &self.map {
            if key != k && (e.busy || (e.state.is_some() && !e.stored)) {
                count(e.meta.state_bytes, e.filed);
            }
        }
        count(bytes, filed);
        new_files + largest
    }

    /// Refuses ([`Error::InsufficientStorage`]) to keep a new version of the session under
    /// `k` (`bytes` large) only in memory when the store could not then take every such
    /// session at shutdown: what is acknowledged can always be written. Not checked with a
    /// shared store (written through) or a store that cannot tell its free space.
    fn check_disk(&self, k: &Key, bytes: usize, filed: bool) -> Result<()> {
        let Some(store) = self.store.as_ref().filter(|_| !self.shared) else {
            return Ok(());
        };
        let Some(free) = store.free_bytes()? else {
            return Ok(());
        };
        let need = self.disk_needed(k, bytes, filed);
        if need > free {
            return Err(Error::InsufficientStorage(format!(
                "the session directory has {free} bytes free, and {need} are needed to write \
                 every session kept in memory with this one"
            )));
        }
        Ok(())
    }

    /// Drops sessions idle for longer than the TTL; returns how many. With a shared store only
    /// the cache forgets them (another engine may be using them; expiry in the store is the
    /// store's own business).
    pub(crate) fn expire(&mut self) -> usize {
        let Some(ttl) = self.ttl else { return 0 };
        let cutoff = now_unix().saturating_sub(ttl.as_secs());
        let old: Vec<Key> = self
            .map
            .iter()
            .filter(|(_, e)| !e.busy && e.meta.last_used < cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            if let (Some(store), false) = (&self.store, self.shared) {
                let sk = SessionKey::of(&self.map[k].meta);
                if let Err(e) = store.delete(&sk) {
                    eprintln!("performer: cannot delete expired session {}: {e}", k.1);
                }
            }
            self.forget(k);
        }
        old.len()
    }

    /// Writes every session in memory to the store (at shutdown). A failed write does not
    /// stop the others. A session that cannot be written has its older stored version (if
    /// any) deleted, so that a restart never serves it older than acknowledged; the space
    /// this frees is tried once more for the sessions that failed. Returns how many were
    /// written and, for each that could not be, its id and the reason. With a shared store
    /// every change is written already: none.
    pub(crate) fn write_all(&mut self) -> (usize, Vec<(String, String)>) {
        let mut keys: Vec<Key> = self
            .map
            .iter()
            .filter(|(_, e)| !e.stored && e.state.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        let mut written = 0;
        let mut failed = Vec::new();
        for k in keys {
            match self.write_out(&k) {
                Ok(()) => written += 1,
                Err(e) => {
                    let sk = SessionKey::of(&self.map[&k].meta);
                    if let Some(store) = &self.store {
                        match store.delete(&sk) {
                            Ok(()) => self.map.get_mut(&k).expect("present").filed = false,
                            Err(d) => eprintln!(
                                "performer: cannot delete the older version of session {}: {d}",
                                k.1
                            ),
                        }
                    }
                    failed.push((k, e));
                }
            }
        }
        let mut lost = Vec::new();
        for (k, first) in failed {
            match self.write_out(&k) {
                Ok(()) => written += 1,
                Err(_) => lost.push((k.1, first.to_string())),
            }
        }
        (written, lost)
    }

    /// Counts for metrics.
    pub(crate) fn stats(&self) -> SessionStats {
        let mut s = SessionStats::default();
        for e in self.map.values() {
            if e.state.is_some() || e.busy {
                s.in_memory += 1;
            } else {
                s.on_disk += 1;
                s.disk_bytes += e.meta.state_bytes;
            }
        }
        s.memory_bytes = self.memory_bytes;
        s
    }
}
