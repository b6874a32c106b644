//! The session table: states with their metadata and owner, a busy flag, a memory budget
//! with least-recently-used spill to a [`SessionStore`], and idle expiry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::request::SessionInfo;
use super::store::{valid_id, SessionMeta, SessionStore, StoredSession};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::splitmix64;
use crate::state::State;

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
    busy: bool,
    /// Logical clock of the last use, for LRU.
    tick: u64,
}

/// The table. Every method is quick except those that touch the store.
pub(crate) struct Sessions {
    model: Arc<Model>,
    map: HashMap<String, Entry>,
    store: Option<Box<dyn SessionStore>>,
    max_bytes: usize,
    memory_bytes: usize,
    ttl: Option<Duration>,
    clock: u64,
    rng: u64,
    /// Ids of stored sessions this engine does not serve (another model's): never reused.
    foreign: std::collections::HashSet<String>,
}

impl Sessions {
    /// An empty table; with a store, indexes the sessions already there (skipping, with one
    /// log line each on stderr, files of another model or unreadable ones).
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
        let mut s = Sessions {
            model,
            map: HashMap::new(),
            store,
            max_bytes,
            memory_bytes: 0,
            ttl,
            clock: 0,
            rng: seed,
            foreign: Default::default(),
        };
        if let Some(store) = &s.store {
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
                    meta.id.clone(),
                    Entry {
                        meta,
                        state: None,
                        stored: true,
                        busy: false,
                        tick: 0,
                    },
                );
            }
        }
        Ok(s)
    }

    fn new_id(&mut self) -> String {
        loop {
            let id = format!("sess-{:016x}", splitmix64(&mut self.rng));
            if !self.map.contains_key(&id) && !self.foreign.contains(&id) {
                return id;
            }
        }
    }

    fn touch(&mut self, id: &str) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.map.get_mut(id) {
            e.tick = clock;
            e.meta.last_used = now_unix();
        }
    }

    /// The entry of `id` if `tenant` owns it.
    fn entry(&self, tenant: &str, id: &str) -> Result<&Entry> {
        self.map
            .get(id)
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

    /// Adds a new session holding `state`.
    pub(crate) fn insert(&mut self, tenant: &str, state: State) -> Result<SessionInfo> {
        let id = self.new_id();
        self.put_state(tenant, &id, state)
    }

    /// Creates or replaces session `id` with `state`.
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
        let now = now_unix();
        let (created, version) = match self.map.get(id) {
            Some(e) if e.meta.tenant != tenant => {
                return Err(Error::SessionNotFound(id.to_string()))
            }
            Some(e) if e.busy => return Err(Error::SessionBusy(id.to_string())),
            Some(e) => (e.meta.created, e.meta.version),
            None if self.foreign.contains(id) => {
                return Err(Error::SessionStorage(format!(
                    "`{id}` is taken by a stored session of another model"
                )))
            }
            None => (now, 0),
        };
        self.remove_memory(id);
        let bytes = state.size_bytes();
        let entry = Entry {
            meta: SessionMeta {
                id: id.to_string(),
                tenant: tenant.to_string(),
                created,
                last_used: now,
                position: state.position(),
                state_bytes: bytes,
                version: version + 1,
                fingerprint: self.model.fingerprint(),
            },
            state: Some(state),
            stored: false,
            busy: false,
            tick: 0,
        };
        self.memory_bytes += bytes;
        self.map.insert(id.to_string(), entry);
        self.touch(id);
        let info = Self::info(&self.map[id]);
        self.enforce_budget()?;
        Ok(info)
    }

    /// Drops `id`'s state from the memory count (the entry stays).
    fn remove_memory(&mut self, id: &str) {
        if let Some(st) = self.map.get_mut(id).and_then(|e| e.state.take()) {
            self.memory_bytes -= st.size_bytes();
        }
    }

    /// Metadata of a session.
    pub(crate) fn get(&self, tenant: &str, id: &str) -> Result<SessionInfo> {
        self.entry(tenant, id).map(Self::info)
    }

    /// Loads `id`'s state into memory if it is only in the store.
    fn load(&mut self, id: &str) -> Result<()> {
        let e = self.map.get(id).expect("checked by the caller");
        if e.state.is_some() {
            return Ok(());
        }
        let store = self.store.as_ref().ok_or_else(|| {
            Error::SessionStorage(format!("session `{id}` has no state and no store"))
        })?;
        let stored = store.get(id)?.ok_or_else(|| {
            Error::SessionStorage(format!("session `{id}` vanished from the store"))
        })?;
        let state = State::from_bytes(&self.model, &stored.snapshot)?;
        self.memory_bytes += state.size_bytes();
        self.map.get_mut(id).expect("present").state = Some(state);
        Ok(())
    }

    /// Marks a session busy without taking its state yet (a queued request): other requests
    /// get [`Error::SessionBusy`] from now on.
    pub(crate) fn reserve(&mut self, tenant: &str, id: &str) -> Result<()> {
        let e = self.entry(tenant, id)?;
        if e.busy {
            return Err(Error::SessionBusy(id.to_string()));
        }
        self.map.get_mut(id).expect("present").busy = true;
        Ok(())
    }

    /// Takes the state of a session [`Self::reserve`]d before.
    pub(crate) fn take_reserved(&mut self, id: &str) -> Result<State> {
        if !self.map.contains_key(id) {
            return Err(Error::SessionNotFound(id.to_string()));
        }
        self.load(id)?;
        let e = self.map.get_mut(id).expect("present");
        let state = e.state.take().expect("loaded");
        self.memory_bytes -= state.size_bytes();
        Ok(state)
    }

    /// Ends a request on a session: the state comes back (if the request got that far) and
    /// the session is free again.
    pub(crate) fn checkin(&mut self, id: &str, state: Option<State>) -> Option<SessionInfo> {
        let e = self.map.get_mut(id)?;
        e.busy = false;
        if let Some(st) = state {
            e.meta.position = st.position();
            e.meta.state_bytes = st.size_bytes();
            e.meta.version += 1;
            e.stored = false;
            self.memory_bytes += st.size_bytes();
            if let Some(old) = e.state.replace(st) {
                self.memory_bytes -= old.size_bytes();
            }
        }
        self.touch(id);
        let info = Self::info(&self.map[id]);
        if let Err(e) = self.enforce_budget() {
            eprintln!("performer: cannot spill sessions: {e}");
        }
        Some(info)
    }

    /// A copy of a session's state (for fork and download).
    pub(crate) fn copy_state(&mut self, tenant: &str, id: &str) -> Result<State> {
        let e = self.entry(tenant, id)?;
        if e.busy {
            return Err(Error::SessionBusy(id.to_string()));
        }
        self.load(id)?;
        self.touch(id);
        let st = self.map[id].state.clone().expect("loaded");
        self.enforce_budget()?;
        Ok(st)
    }

    /// Removes a session from memory and the store.
    pub(crate) fn delete(&mut self, tenant: &str, id: &str) -> Result<()> {
        let e = self.entry(tenant, id)?;
        if e.busy {
            return Err(Error::SessionBusy(id.to_string()));
        }
        if let Some(store) = &self.store {
            store.delete(id)?;
        }
        self.remove_memory(id);
        self.map.remove(id);
        Ok(())
    }

    /// Writes least recently used idle sessions to the store until memory is within budget.
    fn enforce_budget(&mut self) -> Result<()> {
        while self.memory_bytes > self.max_bytes {
            let victim = self
                .map
                .values()
                .filter(|e| !e.busy && e.state.is_some())
                .min_by_key(|e| e.tick)
                .map(|e| e.meta.id.clone());
            let Some(id) = victim else { return Ok(()) };
            if self.store.is_none() {
                return Err(Error::SessionStorage(format!(
                    "sessions take {} bytes, more than the {} allowed, and there is no session directory to spill to",
                    self.memory_bytes, self.max_bytes
                )));
            }
            self.spill(&id)?;
        }
        Ok(())
    }

    /// Writes `id` to the store (if changed) and drops its state from memory.
    fn spill(&mut self, id: &str) -> Result<()> {
        self.write_out(id)?;
        self.remove_memory(id);
        Ok(())
    }

    fn write_out(&mut self, id: &str) -> Result<()> {
        let e = &self.map[id];
        if e.stored {
            return Ok(());
        }
        let (Some(store), Some(state)) = (&self.store, &e.state) else {
            return Ok(());
        };
        let snapshot = state.to_bytes(&self.model)?;
        store.put(
            &StoredSession {
                meta: e.meta.clone(),
                snapshot,
            },
            None,
        )?;
        self.map.get_mut(id).expect("present").stored = true;
        Ok(())
    }

    /// Drops sessions idle for longer than the TTL; returns how many.
    pub(crate) fn expire(&mut self) -> usize {
        let Some(ttl) = self.ttl else { return 0 };
        let cutoff = now_unix().saturating_sub(ttl.as_secs());
        let old: Vec<String> = self
            .map
            .values()
            .filter(|e| !e.busy && e.meta.last_used < cutoff)
            .map(|e| e.meta.id.clone())
            .collect();
        for id in &old {
            if let Some(store) = &self.store {
                if let Err(e) = store.delete(id) {
                    eprintln!("performer: cannot delete expired session {id}: {e}");
                }
            }
            self.remove_memory(id);
            self.map.remove(id);
        }
        old.len()
    }

    /// Writes every session in memory to the store (at shutdown); returns how many were
    /// written.
    pub(crate) fn write_all(&mut self) -> Result<usize> {
        let ids: Vec<String> = self
            .map
            .values()
            .filter(|e| !e.stored && e.state.is_some())
            .map(|e| e.meta.id.clone())
            .collect();
        for id in &ids {
            self.write_out(id)?;
        }
        Ok(ids.len())
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
