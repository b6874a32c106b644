//! The scheduler thread: admission, chunked prefill and one batched decode step per tick.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::prefix;
use super::request::{
    token_logprob, CancelHandle, CompletionRequest, Event, FinishReason, Sink, Target,
    TokenLogprob, Usage,
};
use super::sessions::PendingWrite;
use super::store::SessionStore;
use super::Shared;
use crate::error::{Error, Result};
use performer::constraint::GrammarMatcher;
use performer::generate::{Checkpoint, StopAction, StopMatcher};
use performer::sampling::Sampler;
use performer::State;
use rayon::prelude::*;

/// A message to the scheduler.
pub(crate) enum Cmd {
    /// A validated, counted request.
    Job(Box<Job>),
    /// Finish what runs until the deadline, cancel the rest, exit.
    Shutdown(Instant),
}

/// A request inside the engine.
pub(crate) struct Job {
    pub(crate) req: CompletionRequest,
    pub(crate) sink: Sink,
    pub(crate) cancel: CancelHandle,
    pub(crate) submitted: Instant,
    phase: Phase,
    /// The session's state before the request (restored if it fails or is cancelled).
    original: Option<State>,
    first_token: bool,
    cancelled: bool,
    /// Admission order, for the prefill rotation.
    seq: u64,
    /// Whether the prompt still counts in its tenant's queued prompt tokens (until it is
    /// ingested or the job ends).
    pub(crate) prompt_counted: std::cell::Cell<bool>,
    /// Prompt tokens the prefix cache's state held at admission.
    cached: usize,
    /// Slice ends at which the prompt's state goes to the prefix cache, ascending, with the
    /// hashes of the prefixes they end.
    snapshots: VecDeque<(usize, u64)>,
}

enum Phase {
    Queued,
    Prefill { state: Box<State>, done: usize },
    Decode { rows: Vec<Row> },
}

/// One choice being decoded.
struct Row {
    choice: usize,
    state: State,
    sampler: Sampler,
    /// Text out of the sampled tokens, and the stop strings (the rule of [`StopMatcher`]).
    out: StopMatcher,
    /// Prompt and sampled tokens for the repetition penalty (the last `penalty_window`).
    history: Vec<u32>,
    /// Every sampled token.
    generated: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    /// Sampled tokens before the stop matcher's checkpoint, and (sessions only) the state
    /// that had consumed them, to roll back to after a stop.
    checkpoint: Option<(Option<State>, usize)>,
    /// Log-probabilities already sent with text.
    sent_logprobs: usize,
    budget: usize,
    finished: Option<FinishReason>,
    last_token: Option<Instant>,
    /// Tokens of this choice returned to the caller.
    returned: usize,
    /// Whether the last sampled token goes through the model this tick.
    needs_step: bool,
    /// The request's grammar at this choice's text (constrained requests only).
    grammar: Option<GrammarMatcher>,
}

impl Job {
    pub(crate) fn new(req: CompletionRequest, sink: Sink, cancel: CancelHandle) -> Self {
        Job {
            req,
            sink,
            cancel,
            submitted: Instant::now(),
            phase: Phase::Queued,
            original: None,
            first_token: false,
            cancelled: false,
            seq: 0,
            prompt_counted: std::cell::Cell::new(true),
            cached: 0,
            snapshots: VecDeque::new(),
        }
    }

    fn send(&mut self, event: Event) {
        if !self.cancelled && !(self.sink)(event) {
            self.cancelled = true;
        }
    }

    fn keeps_state(&self) -> bool {
        self.req.target != Target::Stateless
    }
}

/// The scheduler's own data.
/// A finished request whose session write goes to the committer thread (shared store only):
/// the store is written outside the table's lock and off the scheduler thread, and `Done`
/// follows the write.
pub(crate) struct Commit {
    job: Job,
    write: PendingWrite,
    usage: Usage,
}

/// The committer thread: writes sessions to a shared store, then ends their requests.
pub(crate) fn run_committer(
    shared: Arc<Shared>,
    store: Arc<dyn SessionStore>,
    rx: Receiver<Commit>,
) {
    for Commit {
        mut job,
        write,
        usage,
    } in rx
    {
        let result = store.put(&write.session, Some(write.expected));
        let info = shared
            .sessions
            .lock()
            .expect("poisoned")
            .finish_write(write, result);
        match info {
            Ok(info) => job.send(Event::Done {
                usage,
                session: Some(info),
            }),
            Err(e) => job.send(Event::Failed(e)),
        }
        shared.inflight.fetch_sub(job.req.n, Ordering::AcqRel);
    }
}

pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    /// With a shared store: where finished session requests go to be written.
    committer: Option<Sender<Commit>>,
    pool: rayon::ThreadPool,
    rx: Receiver<Cmd>,
    queue: VecDeque<Job>,
    active: Vec<Job>,
    prefill_slice: usize,
    /// Admissions so far (the next job's `seq`).
    admitted: u64,
    /// `seq` of the job that got the last prefill slice: the next tick starts after it.
    last_prefilled: u64,
    deadline: Option<Instant>,
    last_expiry: Instant,
}

impl Scheduler {
    pub(crate) fn new(
        shared: Arc<Shared>,
        pool: rayon::ThreadPool,
        rx: Receiver<Cmd>,
        committer: Option<Sender<Commit>>,
    ) -> Self {
        // Pieces end where `Model::prefill_slice_end` puts them, so slicing changes no result.
        let prefill_slice = shared.config.prefill_chunk.max(1);
        Scheduler {
            shared,
            committer,
            pool,
            rx,
            queue: VecDeque::new(),
            active: Vec::new(),
            prefill_slice,
            admitted: 0,
            last_prefilled: 0,
            deadline: None,
            last_expiry: Instant::now(),
        }
    }

    /// Runs until shut down (or every sender is gone and no work is left).
    pub(crate) fn run(mut self) {
        loop {
            if self.active.is_empty() && self.queue.is_empty() {
                if self.deadline.is_some() {
                    break;
                }
                match self.rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            if self.last_expiry.elapsed() >= Duration::from_secs(1) {
                // Not when another thread holds the table (a request waiting on a slow shared
                // store): the batch must not wait for it; expiry runs on a later tick.
                if let Ok(mut sessions) = self.shared.sessions.try_lock() {
                    self.last_expiry = Instant::now();
                    sessions.expire();
                }
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                for job in self
                    .queue
                    .drain(..)
                    .chain(self.active.drain(..))
                    .collect::<Vec<_>>()
                {
                    self.fail(job, Error::ShuttingDown);
                }
                break;
            }
            self.reap_cancelled();
            self.admit();
            self.prefill();
            self.decode();
            self.publish();
        }
        self.publish();
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Job(job) => self.queue.push_back(*job),
            Cmd::Shutdown(deadline) => self.deadline = Some(deadline),
        }
    }

    fn publish(&self) {
        let rows: usize = self.active.iter().map(|j| j.req.n).sum();
        self.shared.running.store(rows, Ordering::Relaxed);
        self.shared
            .queued
            .store(self.queue.len(), Ordering::Relaxed);
    }

    /// Releases a finished, failed or cancelled job's slots.
    fn release(&self, job: &Job) {
        self.shared.uncount_prompt(job);
        self.shared.inflight.fetch_sub(job.req.n, Ordering::AcqRel);
    }

    fn fail(&self, mut job: Job, err: Error) {
        if let Target::Session(id) = &job.req.target {
            let original = job.original.take();
            self.shared
                .sessions
                .lock()
                .expect("poisoned")
                .restore(&job.req.tenant, id, original);
        }
        job.send(Event::Failed(err));
        self.release(&job);
    }

    fn reap_cancelled(&mut self) {
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|j| !(j.cancelled || j.cancel.is_cancelled()));
        self.active = keep;
        let (keep, gone_q): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|j| !(j.cancelled || j.cancel.is_cancelled()));
        self.queue = keep;
        for mut job in gone.into_iter().chain(gone_q) {
            job.cancelled = true;
            self.fail(job, Error::invalid("request", "cancelled"));
        }
    }

    fn admit(&mut self) {
        let max = self.shared.config.max_batch;
        let mut rows: usize = self.active.iter().map(|j| j.req.n).sum();
        while let Some(job) = self.queue.front() {
            if rows + job.req.n > max {
                break;
            }
            let mut job = self.queue.pop_front().expect("front");
            rows += job.req.n;
            let state = match &job.req.target {
                Target::Session(id) => {
                    let taken = self
                        .shared
                        .sessions
                        .lock()
                        .expect("poisoned")
                        .take_reserved(&job.req.tenant, id);
                    match taken {
                        Ok(st) => {
                            job.original = Some(st.clone());
                            Some(st)
                        }
                        Err(e) => {
                            rows -= job.req.n;
                            self.fail(job, e);
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let (state, done) = match state {
                Some(st) => (st, 0),
                None => self.start_state(&mut job),
            };
            job.phase = Phase::Prefill {
                state: Box::new(state),
                done,
            };
            self.admitted += 1;
            job.seq = self.admitted;
            self.active.push(job);
        }
    }

    /// The state a job's prompt starts from, which has consumed the returned number of its
    /// tokens: the prefix cache's for the longest cached head of the prompt, else a fresh one.
    /// Records where the job leaves states in the cache.
    fn start_state(&self, job: &mut Job) -> (State, usize) {
        let model = &self.shared.model;
        let prompt = &job.req.prompt;
        let mut cache = self.shared.prefix.lock().expect("poisoned");
        if !cache.enabled() || prompt.is_empty() {
            return (State::new(model), 0);
        }
        let points = prefix::slice_points(model, prompt.len(), self.prefill_slice);
        let plan = cache.plan(&job.req.tenant, prompt, &points);
        drop(cache);
        if let Some(o) = &self.shared.observer {
            o.prefix_lookup(plan.cached);
        }
        job.cached = plan.cached;
        job.snapshots = plan.store.into();
        (plan.state.unwrap_or_else(|| State::new(model)), plan.cached)
    }

    /// Ingests prompt slices: each job's prompt in slices of about `prefill_slice` tokens
    /// ([`Model::prefill_slice_end`]), at most one slice per job per tick, until this tick's
    /// budget (one slice) is spent. The jobs take turns: each tick starts with the job after
    /// the one served last, so a short prompt waits for one slice of each longer prompt, not
    /// for the whole of them.
    fn prefill(&mut self) {
        let mut budget = self.prefill_slice;
        // Active jobs are in admission order: `seq` ascending.
        let mut order: Vec<u64> = self
            .active
            .iter()
            .filter(|j| matches!(j.phase, Phase::Prefill { .. }))
            .map(|j| j.seq)
            .collect();
        let after = order.partition_point(|&s| s <= self.last_prefilled);
        order.rotate_left(after);
        for seq in order {
            if budget == 0 {
                break;
            }
            let Some(i) = self.active.iter().position(|j| j.seq == seq) else {
                continue;
            };
            let job = &mut self.active[i];
            let Phase::Prefill { state, done } = &mut job.phase else {
                continue;
            };
            let prompt = &job.req.prompt;
            if *done < prompt.len() {
                let model = &self.shared.model;
                let end = model.prefill_slice_end(*done, prompt.len(), self.prefill_slice);
                let slice = &prompt[*done..end];
                let r = self
                    .pool
                    .install(|| model.prefill(state, slice).map(|_| ()));
                budget = budget.saturating_sub(slice.len());
                *done = end;
                self.last_prefilled = seq;
                if let Err(e) = r {
                    let job = self.active.remove(i);
                    self.fail(job, e.into());
                    continue;
                }
                if let Some(o) = &self.shared.observer {
                    o.prompt_tokens(slice.len());
                }
                // Slice ends are where `slice_points` put them, so the planned points come up
                // in order.
                if let Some(&(p, hash)) = job.snapshots.front().filter(|s| s.0 == end) {
                    job.snapshots.pop_front();
                    self.shared.prefix.lock().expect("poisoned").insert(
                        &job.req.tenant,
                        &prompt[..p],
                        hash,
                        state,
                    );
                }
            }
            if *done == prompt.len() {
                let job = self.active.remove(i);
                self.shared.uncount_prompt(&job);
                if let Some(job) = self.start_decode(job) {
                    self.active.insert(i, job);
                }
            }
        }
    }

    /// Turns a prefilled job into decoding rows (or finishes it when nothing is to be
    /// sampled).
    fn start_decode(&mut self, mut job: Job) -> Option<Job> {
        let Phase::Prefill { state, .. } = std::mem::replace(&mut job.phase, Phase::Queued) else {
            unreachable!("called on prefilled jobs only")
        };
        if job.req.max_tokens == 0 {
            self.complete(job, Some(*state));
            return None;
        }
        if state.logits().is_none() {
            self.fail(
                job,
                performer::Error::EmptyInput(
                    "the prompt is empty and the session holds no context yet",
                )
                .into(),
            );
            return None;
        }
        let limit = self.shared.model.config().max_positions();
        let budget = match limit {
            Some(l) => job.req.max_tokens.min(l.saturating_sub(state.position())),
            None => job.req.max_tokens,
        };
        let window = job.req.sampling.penalty_window;
        let tail = job.req.prompt.len().saturating_sub(window);
        let history = job.req.prompt[tail..].to_vec();
        let mut rows = Vec::with_capacity(job.req.n);
        let mut state = Some(*state);
        for choice in 0..job.req.n {
            let mut params = job.req.sampling.clone();
            params.seed = params.seed.wrapping_add(choice as u64);
            let sampler = match Sampler::new(params) {
                Ok(s) => s,
                Err(e) => {
                    self.fail(job, e.into());
                    return None;
                }
            };
            let grammar = match job.req.constraint.as_ref().map(|g| g.matcher()).transpose() {
                Ok(g) => g,
                Err(e) => {
                    self.fail(job, e.into());
                    return None;
                }
            };
            let st = if choice + 1 == job.req.n {
                state.take().expect("last choice")
            } else {
                state.as_ref().expect("kept").fork()
            };
            rows.push(Row {
                choice,
                state: st,
                sampler,
                out: match StopMatcher::with_tokenizer(
                    job.req.stop.clone(),
                    self.shared.model.tokenizer(),
                    &job.req.prompt,
                ) {
                    Ok(m) => m,
                    Err(e) => {
                        self.fail(job, e.into());
                        return None;
                    }
                },
                history: history.clone(),
                generated: Vec::new(),
                logprobs: Vec::new(),
                checkpoint: None,
                sent_logprobs: 0,
                budget,
                finished: None,
                last_token: None,
                returned: 0,
                needs_step: false,
                grammar,
            });
        }
        if budget == 0 {
            for r in &mut rows {
                r.finished = Some(FinishReason::Length);
            }
        }
        job.phase = Phase::Decode { rows };
        Some(job)
    }

    /// One tick of decoding: every active row samples a token, and those that continue are
    /// stepped together.
    fn decode(&mut self) {
        let mut failed: Vec<(usize, Error)> = Vec::new();
        for (j, job) in self.active.iter_mut().enumerate() {
            if let Err(e) = sample_job(job, &self.shared) {
                failed.push((j, e));
            }
        }
        // Step every row that goes on (and rows of sessions that ended by length: the
        // session keeps the last token).
        let mut states: Vec<&mut State> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        // Grammars of rows that go on: their next masks depend only on the tokens committed,
        // so they are computed while the batch steps.
        let mut grammars: Vec<&mut GrammarMatcher> = Vec::new();
        for (j, job) in self.active.iter_mut().enumerate() {
            if let Phase::Decode { rows } = &mut job.phase {
                for r in rows.iter_mut().filter(|r| r.needs_step) {
                    r.needs_step = false;
                    states.push(&mut r.state);
                    tokens.push(*r.generated.last().expect("a sampled token"));
                    owners.push(j);
                    if r.finished.is_none() {
                        grammars.extend(r.grammar.as_mut().filter(|g| !g.is_complete()));
                    }
                }
            }
        }
        if !states.is_empty() {
            if let Some(o) = &self.shared.observer {
                o.batch(states.len());
            }
            let model = &self.shared.model;
            let result = self.pool.install(|| {
                if grammars.is_empty() {
                    return model.step_batch(&mut states, &tokens);
                }
                // The step on this thread, the masks on the pool's others (or here after the
                // step when none is free).
                let (stepped, ()) = rayon::join(
                    || model.step_batch(&mut states, &tokens),
                    || grammars.par_iter_mut().for_each(|g| g.prepare()),
                );
                stepped
            });
            if let Err(e) = result {
                owners.dedup();
                for j in owners {
                    failed.push((j, clone_err(&e)));
                }
            }
        }
        failed.sort_by_key(|f| std::cmp::Reverse(f.0));
        failed.dedup_by_key(|f| f.0);
        for (j, e) in failed {
            let job = self.active.remove(j);
            self.fail(job, e);
        }
        // Complete jobs whose rows are all finished.
        let mut i = 0;
        while i < self.active.len() {
            let done = matches!(&self.active[i].phase,
                Phase::Decode { rows } if rows.iter().all(|r| r.finished.is_some()));
            if done {
                let mut job = self.active.remove(i);
                let Phase::Decode { mut rows } = std::mem::replace(&mut job.phase, Phase::Queued)
                else {
                    unreachable!()
                };
                let returned = rows.iter().map(|r| r.returned).sum();
                let state = rows.pop().map(|r| r.state);
                self.complete_with(job, state, returned);
            } else {
                i += 1;
            }
        }
    }

    fn complete(&mut self, job: Job, state: Option<State>) {
        self.complete_with(job, state, 0);
    }

    /// Hands the state to its session (with a shared store: writes it there), then sends
    /// `Done` and frees the slots. A session that cannot be written fails the request instead:
    /// `Done` means the session is stored.
    fn complete_with(&mut self, mut job: Job, mut state: Option<State>, returned: usize) {
        let usage = Usage {
            prompt_tokens: job.req.prompt.len(),
            completion_tokens: returned,
            cached_tokens: job.cached,
        };
        // A stateless request leaves the session table alone (another thread may hold it while
        // it waits on a slow store).
        let session = if job.req.target == Target::Stateless {
            None
        } else {
            let mut sessions = self.shared.sessions.lock().expect("poisoned");
            // With a shared store the write goes to the committer thread, which sends `Done`.
            if let (Some(committer), true) = (&self.committer, state.is_some()) {
                let st = state.take().expect("checked");
                let prepared = match &job.req.target {
                    Target::Session(id) => sessions.prepare_checkin(&job.req.tenant, id, st),
                    _ => sessions.prepare_insert(&job.req.tenant, st),
                };
                drop(sessions);
                match prepared {
                    Ok(write) => {
                        let n = job.req.n;
                        if let Err(back) = committer.send(Commit { job, write, usage }) {
                            let mut job = back.0.job;
                            job.send(Event::Failed(Error::ShuttingDown));
                            self.shared.inflight.fetch_sub(n, Ordering::AcqRel);
                        }
                    }
                    Err(e) => {
                        job.send(Event::Failed(e));
                        self.release(&job);
                    }
                }
                return;
            }
            let kept = match (&job.req.target, state) {
                (Target::Session(id), st) => sessions.checkin(&job.req.tenant, id, st),
                (Target::NewSession, Some(st)) => sessions.insert(&job.req.tenant, st).map(Some),
                _ => Ok(None),
            };
            match kept {
                Ok(info) => info,
                Err(e) => {
                    drop(sessions);
                    job.send(Event::Failed(e));
                    self.release(&job);
                    return;
                }
            }
        };
        job.send(Event::Done { usage, session });
        self.release(&job);
    }
}

/// The same error for every request of a failed batch (`Error` is not `Clone`).
fn clone_err(e: &performer::Error) -> Error {
    use performer::Error as E;
    Error::Runtime(match e {
        E::NonFiniteLogits { position } => E::NonFiniteLogits {
            position: *position,
        },
        E::PositionOutOfRange {
            position,
            max_seq_len,
            kind,
        } => E::PositionOutOfRange {
            position: *position,
            max_seq_len: *max_seq_len,
            kind,
        },
        E::TokenOutOfRange { token, vocab } => E::TokenOutOfRange {
            token: *token,
            vocab: *vocab,
        },
        other => E::StateMismatch(format!("batched decode failed: {other}")),
    })
}

/// Samples one token for every unfinished row of a decoding job and sends the text it
/// completes.
fn sample_job(job: &mut Job, shared: &Shared) -> Result<()> {
    let keeps = job.keeps_state();
    let want = job.req.logprobs;
    let Phase::Decode { rows } = &mut job.phase else {
        return Ok(());
    };
    let mut events = Vec::new();
    let mut first = false;
    for r in rows.iter_mut().filter(|r| r.finished.is_none()) {
        let logits = r.state.logits().ok_or(performer::Error::EmptyInput(
            "the state holds no logits to sample from",
        ))?;
        let token = match &mut r.grammar {
            None => r.sampler.sample(logits, &r.history)?,
            Some(g) => match g.mask()? {
                Some(mask) => {
                    let token = r.sampler.sample_masked(logits, &r.history, mask)?;
                    g.commit(token)?;
                    token
                }
                None => {
                    // Complete before sampling anything (a grammar matching only the empty
                    // text): the state already holds everything returned.
                    let rest = r.out.finish()?;
                    r.checkpoint = None;
                    let s = r.generated.len();
                    events.push(text_event(r, rest, s, want));
                    r.finished = Some(FinishReason::Stop);
                    r.needs_step = false;
                    events.push(Some(Event::Finished {
                        choice: r.choice,
                        reason: FinishReason::Stop,
                    }));
                    continue;
                }
            },
        };
        if let Some(k) = want {
            r.logprobs.push(token_logprob(logits, token, k));
        }
        let now = Instant::now();
        if let Some(o) = &shared.observer {
            match r.last_token {
                Some(t) => o.inter_token(now - t),
                None => first = true,
            }
            o.generated_tokens(1);
        }
        r.last_token = Some(now);
        r.history.push(token);
        let window = r.sampler.params().penalty_window.max(1);
        if r.history.len() > 2 * window {
            r.history.drain(..r.history.len() - window);
        }
        r.generated.push(token);
        let s = r.generated.len();
        let mut grammar_done = false;
        let pushed = r.out.push(token)?;
        match pushed.action {
            StopAction::Step(checkpoint) => {
                match checkpoint {
                    // The state has not consumed this token yet: it is the one to restore.
                    Checkpoint::Take => {
                        r.checkpoint = Some((keeps.then(|| r.state.clone()), s - 1))
                    }
                    Checkpoint::Release => r.checkpoint = None,
                    Checkpoint::Keep => {}
                }
                let done = s - r.out.held_tokens();
                events.push(text_event(r, pushed.text, done, want));
                if r.grammar.as_ref().is_some_and(GrammarMatcher::is_complete) {
                    // The grammar is complete: everything sampled is returned, and the state
                    // (of a session) takes the last token as at the token limit.
                    let rest = r.out.finish()?;
                    r.checkpoint = None;
                    events.push(text_event(r, rest, s, want));
                    r.finished = Some(FinishReason::Stop);
                    grammar_done = true;
                } else if s >= r.budget {
                    // The token limit: the held-back text goes out and the state keeps every
                    // token.
                    let rest = r.out.finish()?;
                    r.checkpoint = None;
                    events.push(text_event(r, rest, s, want));
                    r.finished = Some(FinishReason::Length);
                }
            }
            StopAction::Stop { restore, replay } => {
                let kept = if restore {
                    let (state, at) = r
                        .checkpoint
                        .take()
                        .expect("the stop matcher asked for a checkpoint before restoring one");
                    if let Some(state) = state {
                        r.state = state;
                    }
                    at + replay.len()
                } else {
                    s - 1 + replay.len()
                };
                if keeps && !replay.is_empty() {
                    shared.model.prefill(&mut r.state, &replay)?;
                }
                events.push(text_event(r, pushed.text, kept, want));
                r.finished = Some(FinishReason::Stop);
            }
        }
        r.needs_step = match r.finished {
            None => true,
            Some(FinishReason::Length) => keeps,
            Some(FinishReason::Stop) => keeps && grammar_done,
        };
        if let Some(reason) = r.finished {
            events.push(Some(Event::Finished {
                choice: r.choice,
                reason,
            }));
        }
    }
    if first && !job.first_token {
        job.first_token = true;
        if let Some(o) = &shared.observer {
            o.first_token(job.submitted.elapsed());
        }
    }
    for e in events.into_iter().flatten() {
        job.send(e);
    }
    Ok(())
}

/// The event for a piece of text whose tokens end at `upto` (sampled tokens): it carries the
/// log-probabilities of the tokens not sent yet, and counts them as returned.
fn text_event(r: &mut Row, text: String, upto: usize, want: Option<usize>) -> Option<Event> {
    let from = r.sent_logprobs.min(upto);
    r.returned = r.returned.max(upto);
    let logprobs = if want.is_some() {
        r.sent_logprobs = upto;
        r.logprobs[from..upto].to_vec()
    } else {
        Vec::new()
    };
    if text.is_empty() && logprobs.is_empty() {
        return None;
    }
    Some(Event::Text {
        choice: r.choice,
        text,
        logprobs,
    })
}
