//! The engine's error: what the runtime raises (loading, stepping, snapshots, invalid input)
//! plus the serving cases (a full queue, a busy or missing session, the session store).

use std::path::PathBuf;

/// Everything that can go wrong while serving a request or a session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The runtime's error: invalid input, a model that cannot run there, a bad snapshot, I/O.
    #[error(transparent)]
    Runtime(#[from] performer::Error),

    /// The engine's queue is full: the request was not accepted; retry later.
    #[error("the server is at capacity: {active} generations running or queued (limit {limit})")]
    QueueFull {
        /// Generations running or waiting when the request came.
        active: usize,
        /// The most the engine takes at once (batch plus queue).
        limit: usize,
    },

    /// A session is in use by another request.
    #[error("session `{0}` is busy with another request")]
    SessionBusy(String),

    /// No session of that id exists for this tenant.
    #[error("no session `{0}`")]
    SessionNotFound(String),

    /// The session store or the session memory cannot take another session.
    #[error("session storage: {0}")]
    SessionStorage(String),

    /// A stored session changed since it was read (its version differs).
    #[error("session `{id}` is at version {found}, expected {expected}")]
    VersionConflict {
        /// The session's id.
        id: String,
        /// The version the writer expected.
        expected: u64,
        /// The version in the store.
        found: u64,
    },

    /// The session memory or the session store has no room for this session (the budget is
    /// spent and nothing can be spilled, or the store's disk is full or failing). Nothing of
    /// the request was kept. The message names no other session and no server path.
    #[error("insufficient session storage: {0}")]
    InsufficientStorage(String),

    /// A per-tenant limit is reached: the tenant has too many prompt tokens waiting to be
    /// ingested; retry later.
    #[error("too many prompt tokens queued for this tenant: {queued} waiting, {asked} more asked for (limit {limit})")]
    TenantQueueFull {
        /// Prompt tokens of the tenant's requests not yet ingested.
        queued: usize,
        /// The new request's prompt tokens.
        asked: usize,
        /// The most a tenant may have waiting.
        limit: usize,
    },

    /// The engine is shutting down and takes no more requests.
    #[error("the engine is shutting down")]
    ShuttingDown,

    /// The session store cannot be reached (a shared store down or timing out); the request
    /// may be retried later, the store is tried again on the next request.
    #[error("the session store is unavailable: {0}")]
    StoreUnavailable(String),
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path` ([`performer::Error::Io`]).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        performer::Error::io(path, source).into()
    }

    /// A parameter outside its domain ([`performer::Error::InvalidParameter`]).
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        performer::Error::invalid(name, message).into()
    }

    /// A store error as a client may see it: an I/O error (a full or failing disk) becomes
    /// [`Error::InsufficientStorage`] with the OS's reason only, never the file's path (which
    /// names the session and the server's directory); the full error goes to stderr for the
    /// operator. Other errors pass unchanged.
    pub fn from_store(self) -> Self {
        match self {
            Error::Runtime(performer::Error::Io { path, source }) => {
                eprintln!("performer: session store: {}: {source}", path.display());
                Error::InsufficientStorage(format!("the session store cannot be written: {source}"))
            }
            other => other,
        }
    }

    /// The runtime's error inside, if this is one.
    pub fn runtime(&self) -> Option<&performer::Error> {
        match self {
            Error::Runtime(e) => Some(e),
            _ => None,
        }
    }
}
