//! A serving engine with no HTTP in it: one scheduler thread owns the model and a decode pool,
//! takes requests over a channel and batches them continuously (every tick advances each
//! active generation by one token through [`Model::step_batch`]; prompts are ingested in
//! bounded slices between ticks). It also keeps the session table: states with owner and metadata, an LRU memory budget
//! with spill to a [`SessionStore`], and idle expiry; and a prefix-state cache, from which a
//! prompt that shares its head with a recent one resumes (docs/serving.md).
//!
//! ```no_run
//! use std::sync::Arc;
//! use performer_engine::{CompletionRequest, Engine, EngineConfig};
//! use performer::{Model, SamplingParams};
//! let model = Arc::new(Model::load("models/performer-byte")?);
//! let engine = Engine::start(model, EngineConfig::default(), None)?;
//! let prompt = "The sea".bytes().map(u32::from).collect();
//! let done = engine.complete(CompletionRequest::new(prompt, 32, SamplingParams::greedy()))?;
//! println!("{}", done.choices[0].text);
//! # Ok::<(), performer_engine::Error>(())
//! ```

pub mod error;
mod prefix;
mod request;
mod scheduler;
mod sessions;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use prefix::PrefixCacheStats;
pub use request::{
    CancelHandle, CompletionRequest, Event, FinishReason, SessionInfo, Sink, Target, TokenLogprob,
    Usage, MAX_LOGPROBS,
};
pub use sessions::SessionStats;
pub use store::{DiskStore, SessionKey, SessionMeta, SessionStore, StoredSession, MAX_NOTE_BYTES};

pub use error::{Error, Result};
use performer::{Model, State};
use prefix::PrefixCache;
use scheduler::{Cmd, Job, Scheduler};
use sessions::Sessions;

/// [`EngineConfig::prefix_cache_memory`] by default: 512 MiB, half the default session
/// memory; about 36 states of the gpt2-small shape (14 MiB each), six prompts' worth of kept
/// boundaries.
pub const DEFAULT_PREFIX_CACHE_MEMORY: usize = 512 << 20;

/// Limits and sizes of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most generations (choices) stepped per tick.
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; beyond, [`Error::QueueFull`].
    pub max_queue: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Most choices per request.
    pub max_n: usize,
    /// Prompt tokens ingested per tick: whole attention chunks, about this many
    /// ([`Model::prefill_slice_end`]; more than 64 tokens). Every other stream waits for them,
    /// so this bounds the stall a long prompt causes.
    pub prefill_chunk: usize,
    /// Threads of the decode pool.
    pub threads: usize,
    /// Bytes of session states kept in memory; past it the least recently used idle ones
    /// go to the store.
    pub max_session_memory: usize,
    /// Sessions unused for this long are dropped.
    pub session_ttl: Option<Duration>,
    /// Most prompt tokens one tenant may have waiting to be ingested (queued or being
    /// prefilled); beyond, [`Error::TenantQueueFull`]. Prompts are ingested in turns between
    /// jobs, so this bounds how much of the prefill time one tenant can claim.
    pub max_tenant_prompt_tokens: usize,
    /// Bytes of the prefix-state cache: states at slice boundaries of recent prompts
    /// (stateless completions and sessions created from a prompt), from which a later prompt
    /// of the same tenant with the same head resumes instead of ingesting it again (output
    /// bit for bit the same). Each entry is one state, whatever the prefix length; past the
    /// budget the least recently used go. 0 disables the cache.
    pub prefix_cache_memory: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 64,
            max_queue: 256,
            max_prompt_tokens: 1 << 20,
            max_tokens: 1 << 16,
            max_n: 16,
            prefill_chunk: 256,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_session_memory: 1 << 30,
            session_ttl: None,
            max_tenant_prompt_tokens: 1 << 21,
            prefix_cache_memory: DEFAULT_PREFIX_CACHE_MEMORY,
        }
    }
}

/// Receives the engine's measurements (to feed metrics). Called on the scheduler thread;
/// must be quick.
pub trait Observer: Send + Sync {
    /// Rows stepped together in one tick.
    fn batch(&self, _rows: usize) {}
    /// Time from submission to a request's first sampled token.
    fn first_token(&self, _latency: Duration) {}
    /// Time between two consecutive tokens of one choice.
    fn inter_token(&self, _gap: Duration) {}
    /// Prompt tokens ingested.
    fn prompt_tokens(&self, _n: usize) {}
    /// Tokens sampled.
    fn generated_tokens(&self, _n: usize) {}
    /// A prompt looked up in the prefix cache: the prompt tokens it resumes past (0: a miss).
    /// Only with the cache enabled, for prompts that start from a fresh state.
    fn prefix_lookup(&self, _cached_tokens: usize) {}
}

/// What the scheduler and the callers share.
pub(crate) struct Shared {
    pub(crate) model: Arc<Model>,
    pub(crate) config: EngineConfig,
    pub(crate) sessions: Mutex<Sessions>,
    /// The prefix-state cache: used by the scheduler thread, read for stats.
    pub(crate) prefix: Mutex<PrefixCache>,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    /// Choices queued or running.
    pub(crate) inflight: AtomicUsize,
    /// Choices running (published by the scheduler every tick).
    pub(crate) running: AtomicUsize,
    /// Requests waiting (published by the scheduler every tick).
    pub(crate) queued: AtomicUsize,
    /// Per tenant: prompt tokens of its jobs not yet ingested.
    pending_prompt: Mutex<HashMap<String, usize>>,
    accepting: AtomicBool,
}

impl Shared {
    /// Counts `tokens` more prompt tokens waiting for `tenant`, unless that passes the limit.
    fn count_prompt(&self, tenant: &str, tokens: usize) -> Result<()> {
        let limit = self.config.max_tenant_prompt_tokens;
        let mut pending = self.pending_prompt.lock().expect("poisoned");
        let queued = pending.get(tenant).copied().unwrap_or(0);
        if queued + tokens > limit {
            return Err(Error::TenantQueueFull {
                queued,
                asked: tokens,
                limit,
            });
        }
        *pending.entry(tenant.to_string()).or_default() += tokens;
        Ok(())
    }

    /// Takes a job's prompt out of its tenant's count (once; later calls do nothing).
    pub(crate) fn uncount_prompt(&self, job: &Job) {
        if job.prompt_counted.replace(false) {
            self.release_prompt(&job.req.tenant, job.req.prompt.len());
        }
    }

    fn release_prompt(&self, tenant: &str, tokens: usize) {
        let mut pending = self.pending_prompt.lock().expect("poisoned");
        if let Some(n) = pending.get_mut(tenant) {
            *n = n.saturating_sub(tokens);
            if *n == 0 {
                pending.remove(tenant);
            }
        }
    }
}

/// Live counts of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Choices being prefilled or decoded.
    pub running: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Choices accepted and not finished (running or queued).
    pub inflight: usize,
    /// The session table.
    pub sessions: SessionStats,
    /// The prefix-state cache.
    pub prefix_cache: PrefixCacheStats,
}

/// A finished choice of [`Engine::complete`].
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// The text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: Option<FinishReason>,
    /// Per token, if asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// The result of [`Engine::complete`].
#[derive(Debug, Clone)]
pub struct Completion {
    /// One per choice.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// The session involved, if any.
    pub session: Option<SessionInfo>,
}

/// The engine: a handle to the scheduler thread and the session table.
pub struct Engine {
    shared: Arc<Shared>,
    tx: Mutex<Option<Sender<Cmd>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// With a shared store: the thread that writes finished sessions to it.
    committer: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the scheduler for `model`. With a `store`, sessions already stored for this
    /// model become available (others are skipped with a log line on stderr). With a
    /// [shared](SessionStore::shared) store the engine's session table is a cache of the store:
    /// every use checks the stored version first and every change is written through before
    /// the request completes (see [`SessionStore`]).
    pub fn start(
        model: Arc<Model>,
        config: EngineConfig,
        store: Option<Box<dyn SessionStore>>,
    ) -> Result<Engine> {
        Self::start_with_observer(model, config, store, None)
    }

    /// [`Engine::start`] with an [`Observer`] for metrics.
    pub fn start_with_observer(
        model: Arc<Model>,
        config: EngineConfig,
        store: Option<Box<dyn SessionStore>>,
        observer: Option<Arc<dyn Observer>>,
    ) -> Result<Engine> {
        for (name, v) in [
            ("max_batch", config.max_batch),
            ("threads", config.threads),
            ("max_n", config.max_n),
        ] {
            if v == 0 {
                return Err(Error::invalid(name, "must be at least 1"));
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("performer-decode-{i}"))
            .build()
            .map_err(|e| Error::invalid("threads", format!("cannot start the pool: {e}")))?;
        let sessions = Sessions::open(
            model.clone(),
            store,
            config.max_session_memory,
            config.session_ttl,
        )?;
        let shared_store = sessions.shared_store();
        let prefix = PrefixCache::new(config.prefix_cache_memory);
        let shared = Arc::new(Shared {
            model,
            config,
            sessions: Mutex::new(sessions),
            prefix: Mutex::new(prefix),
            observer,
            inflight: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            pending_prompt: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
        });
        let (tx, rx) = mpsc::channel();
        let (commit_tx, committer) = match shared_store {
            Some(store) => {
                let (ctx, crx) = mpsc::channel();
                let sh = shared.clone();
                let t = std::thread::Builder::new()
                    .name("performer-committer".into())
                    .spawn(move || scheduler::run_committer(sh, store, crx))
                    .map_err(|e| {
                        Error::invalid("threads", format!("cannot start the committer: {e}"))
                    })?;
                (Some(ctx), Some(t))
            }
            None => (None, None),
        };
        let scheduler = Scheduler::new(shared.clone(), pool, rx, commit_tx);
        let thread = std::thread::Builder::new()
            .name("performer-scheduler".into())
            .spawn(move || scheduler.run())
            .map_err(|e| Error::invalid("threads", format!("cannot start the scheduler: {e}")))?;
        Ok(Engine {
            shared,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            committer: Mutex::new(committer),
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.shared.model
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Live counts.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.shared.running.load(Ordering::Relaxed),
            queued: self.shared.queued.load(Ordering::Relaxed),
            inflight: self.shared.inflight.load(Ordering::Relaxed),
            sessions: self.sessions().stats(),
            prefix_cache: self.shared.prefix.lock().expect("poisoned").stats(),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.shared.sessions.lock().expect("session table poisoned")
    }

    /// Checks a request against the limits and the model before it is queued.
    fn validate(&self, req: &CompletionRequest) -> Result<()> {
        let c = &self.shared.config;
        if req.n == 0 || req.n > c.max_n.min(c.max_batch) {
            return Err(Error::invalid(
                "n",
                format!("must be in 1..={}", c.max_n.min(c.max_batch)),
            ));
        }
        if req.n > 1 && req.target != Target::Stateless {
            return Err(Error::invalid("n", "sessions take one choice"));
        }
        if req.max_tokens > c.max_tokens {
            return Err(Error::invalid(
                "max_tokens",
                format!("{} is above the limit {}", req.max_tokens, c.max_tokens),
            ));
        }
        if req.prompt.len() > c.max_prompt_tokens {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{} tokens is above the limit {}",
                    req.prompt.len(),
                    c.max_prompt_tokens
                ),
            ));
        }
        if req.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
            return Err(Error::invalid(
                "logprobs",
                format!("must be in 0..={MAX_LOGPROBS}"),
            ));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(Error::invalid("stop", "stop strings must not be empty"));
        }
        req.sampling.validate()?;
        let vocab = self.shared.model.vocab_size();
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(performer::Error::TokenOutOfRange { token: t, vocab }.into());
        }
        if req.target == Target::Stateless && req.prompt.is_empty() {
            return Err(performer::Error::EmptyInput("the prompt is empty").into());
        }
        Ok(())
    }

    /// Queues a request; its events go to `sink` on the scheduler thread. Fails at once
    /// (nothing sent to the sink) on invalid input, a full queue
    /// ([`Error::QueueFull`]), an unknown session ([`Error::SessionNotFound`]), one in use
    /// ([`Error::SessionBusy`]) or a shared store that cannot be reached
    /// ([`Error::StoreUnavailable`]). A request on a session of a shared store reads the
    /// store (it may block for the store's timeouts).
    pub fn submit(&self, req: CompletionRequest, sink: Sink) -> Result<CancelHandle> {
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        self.validate(&req)?;
        let start = match &req.target {
            Target::Session(id) => self.sessions().get(&req.tenant, id)?.position,
            _ => 0,
        };
        let config = self.shared.model.config();
        if let Some(limit) = config.max_positions() {
            if start + req.prompt.len() > limit {
                return Err(performer::Error::PositionOutOfRange {
                    position: start + req.prompt.len(),
                    max_seq_len: limit,
                    kind: match config.position_kind() {
                        performer::config::PositionKind::Axial => "axial",
                        _ => "absolute",
                    },
                }
                .into());
            }
        }
        let c = &self.shared.config;
        let limit = c.max_batch + c.max_queue;
        let n = req.n;
        self.shared
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= limit).then_some(cur + n)
            })
            .map_err(|active| Error::QueueFull { active, limit })?;
        if let Err(e) = self.shared.count_prompt(&req.tenant, req.prompt.len()) {
            self.shared.inflight.fetch_sub(n, Ordering::AcqRel);
            return Err(e);
        }
        let (tenant, tokens) = (req.tenant.clone(), req.prompt.len());
        if let Target::Session(id) = &req.target {
            if let Err(e) = self.sessions().reserve(&req.tenant, id) {
                self.shared.inflight.fetch_sub(n, Ordering::AcqRel);
                self.shared.release_prompt(&tenant, tokens);
                return Err(e);
            }
        }
        let cancel = CancelHandle::default();
        let job = Job::new(req, sink, cancel.clone());
        let sent = self
            .tx
            .lock()
            .expect("poisoned")
            .as_ref()
            .map(|tx| tx.send(Cmd::Job(Box::new(job))));
        match sent {
            Some(Ok(())) => Ok(cancel),
            _ => {
                self.shared.inflight.fetch_sub(n, Ordering::AcqRel);
                self.shared.release_prompt(&tenant, tokens);
                Err(Error::ShuttingDown)
            }
        }
    }

    /// Runs a request to the end on the calling thread's behalf and collects its output.
    pub fn complete(&self, req: CompletionRequest) -> Result<Completion> {
        let (tx, rx) = mpsc::channel();
        let n = req.n;
        self.submit(req, Box::new(move |e| tx.send(e).is_ok()))?;
        let mut choices = vec![Choice::default(); n];
        for event in rx {
            match event {
                Event::Text {
                    choice,
                    text,
                    logprobs,
                } => {
                    choices[choice].text.push_str(&text);
                    choices[choice].logprobs.extend(logprobs);
                }
                Event::Finished { choice, reason } => choices[choice].finish_reason = Some(reason),
                Event::Done { usage, session } => {
                    return Ok(Completion {
                        choices,
                        usage,
                        session,
                    })
                }
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::ShuttingDown)
    }

    /// Creates a session for `tenant` from `prompt` (ingested by the scheduler; may be empty).
    pub fn create_session(&self, tenant: &str, prompt: Vec<u32>) -> Result<SessionInfo> {
        let mut req = CompletionRequest::new(prompt, 0, performer::SamplingParams::greedy());
        req.tenant = tenant.to_string();
        req.target = Target::NewSession;
        self.complete(req)?
            .session
            .ok_or_else(|| Error::SessionStorage("the session was not created".into()))
    }

    /// A session's metadata.
    pub fn session_info(&self, tenant: &str, id: &str) -> Result<SessionInfo> {
        self.sessions().get(tenant, id)
    }

    /// The tenant's sessions of this model, oldest first.
    pub fn list_sessions(&self, tenant: &str) -> Result<Vec<SessionInfo>> {
        self.sessions().list(tenant)
    }

    /// A session's state as snapshot bytes ([`State::to_bytes`]).
    pub fn session_snapshot(&self, tenant: &str, id: &str) -> Result<Vec<u8>> {
        let state = self.sessions().copy_state(tenant, id)?;
        Ok(state.to_bytes(&self.shared.model)?)
    }

    /// Creates or replaces session `id` from snapshot bytes. A snapshot of another model, a
    /// corrupted one or one of an unknown version is an error naming the reason.
    pub fn put_session_snapshot(
        &self,
        tenant: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<SessionInfo> {
        let state = State::from_bytes(&self.shared.model, bytes)?;
        self.sessions().put_state(tenant, id, state)
    }

    /// A new session with a copy of another's state.
    pub fn fork_session(&self, tenant: &str, id: &str) -> Result<SessionInfo> {
        let mut sessions = self.sessions();
        let state = sessions.copy_state(tenant, id)?;
        sessions.insert(tenant, state)
    }

    /// A new session of `tenant` whose id is `prefix` followed by 16 random hex digits,
    /// holding a copy of session `from`'s state (a fork, the original untouched) or, without
    /// `from`, an empty state. The server names stored responses so (`resp_…`).
    pub fn branch_session(
        &self,
        tenant: &str,
        from: Option<&str>,
        prefix: &str,
    ) -> Result<SessionInfo> {
        if !store::valid_id(&format!("{prefix}0000000000000000")) {
            return Err(Error::invalid(
                "session id prefix",
                "at most 48 ASCII letters, digits, '-' or '_'",
            ));
        }
        let mut sessions = self.sessions();
        let state = match from {
            Some(id) => sessions.copy_state(tenant, id)?,
            None => State::new(&self.shared.model),
        };
        sessions.insert_prefixed(tenant, prefix, state)
    }

    /// The note attached to a session ([`SessionMeta::note`]; `None` if none).
    pub fn session_note(&self, tenant: &str, id: &str) -> Result<Option<String>> {
        self.sessions().note(tenant, id)
    }

    /// Attaches `note` to an idle session, replacing any earlier one; it is stored with the
    /// session (spilled, persisted, shared, expired and deleted with it).
    pub fn set_session_note(
        &self,
        tenant: &str,
        id: &str,
        note: Option<String>,
    ) -> Result<SessionInfo> {
        self.sessions().set_note(tenant, id, note)
    }

    /// Deletes a session from memory and the store.
    pub fn delete_session(&self, tenant: &str, id: &str) -> Result<()> {
        self.sessions().delete(tenant, id)
    }

    /// Stops taking requests, lets running ones finish for up to `grace` (then cancels them
    /// with [`Error::ShuttingDown`]), stops the scheduler and writes every session in memory
    /// to the store. Returns how many sessions were written; if some could not be (a full or
    /// failing disk), every other one is still written and the error lists those that were
    /// not ([`Engine::shutdown_report`] has the details). Later calls do nothing.
    pub fn shutdown(&self, grace: Duration) -> Result<usize> {
        let report = self.shutdown_report(grace);
        if report.failed.is_empty() {
            return Ok(report.written);
        }
        let list: Vec<String> = report
            .failed
            .iter()
            .map(|(id, why)| format!("{id} ({why})"))
            .collect();
        Err(Error::SessionStorage(format!(
            "wrote {} sessions; could not write {}: {}",
            report.written,
            report.failed.len(),
            list.join(", ")
        )))
    }

    /// [`Engine::shutdown`], reporting each session it could not write.
    pub fn shutdown_report(&self, grace: Duration) -> ShutdownReport {
        self.shared.accepting.store(false, Ordering::Release);
        if let Some(tx) = self.tx.lock().expect("poisoned").take() {
            let _ = tx.send(Cmd::Shutdown(Instant::now() + grace));
        }
        let thread = self.thread.lock().expect("poisoned").take();
        match thread {
            Some(t) => {
                let _ = t.join();
                // The scheduler is gone, so is the committer's sender: it ends once the writes
                // it has are done.
                if let Some(c) = self.committer.lock().expect("poisoned").take() {
                    let _ = c.join();
                }
                let (written, failed) = self.sessions().write_all();
                ShutdownReport { written, failed }
            }
            None => ShutdownReport::default(),
        }
    }
}

/// What [`Engine::shutdown_report`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sessions written to the store.
    pub written: usize,
    /// Sessions that could not be written: id and reason. Their older stored version, if
    /// any, was deleted (a restart does not serve a session older than acknowledged).
    pub failed: Vec<(String, String)>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(Duration::ZERO) {
            eprintln!("performer: writing sessions at shutdown: {e}");
        }
    }
}
