//! Where sessions go when they leave memory: the [`SessionStore`] trait and its directory
//! implementation, [`DiskStore`].
//!
//! A stored session is its metadata plus the library's state snapshot
//! ([`performer::snapshot`]). File format of [`DiskStore`]: magic `PFSESS1\0`, the metadata's
//! JSON length (`u32`, little-endian), the JSON, then the snapshot bytes.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PFSESS1\0";

/// Longest [`SessionMeta::note`], in bytes (a stored session's metadata is at most 1 MiB).
pub const MAX_NOTE_BYTES: usize = 512 << 10;
const EXT: &str = "session";

/// A stored session's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// The session id.
    pub id: String,
    /// The tenant that owns it.
    pub tenant: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Last use, seconds since the Unix epoch.
    pub last_used: u64,
    /// Tokens the state has consumed.
    pub position: usize,
    /// Bytes of the state in memory.
    pub state_bytes: usize,
    /// Incremented on every write of the session.
    pub version: u64,
    /// [`performer::Model::fingerprint`] of the model the state belongs to.
    pub fingerprint: u64,
    /// What the caller attached to the session ([`crate::Engine::set_session_note`]; the
    /// server keeps a stored response's record there), opaque to the engine. Absent from the
    /// JSON when `None`, so sessions stored before it existed read as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A session at rest: metadata and snapshot bytes.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Metadata.
    pub meta: SessionMeta,
    /// [`performer::State::to_bytes`] output.
    pub snapshot: Vec<u8>,
}

/// What [`SessionStore::list`] finds: the readable sessions' metadata, and the entries that
/// could not be read, each with its reason.
pub type Listing = (Vec<SessionMeta>, Vec<(String, Error)>);

/// Names one stored session: the model it belongs to, its tenant and its id. A store keeps
/// sessions of different models or tenants apart (a shared store puts all three in its keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// [`performer::Model::fingerprint`] of the model.
    pub fingerprint: u64,
    /// The tenant that owns the session (`""` without authentication).
    pub tenant: String,
    /// The session id ([`valid_id`]).
    pub id: String,
}

impl SessionKey {
    /// The key of a session's metadata.
    pub fn of(meta: &SessionMeta) -> SessionKey {
        SessionKey {
            fingerprint: meta.fingerprint,
            tenant: meta.tenant.clone(),
            id: meta.id.clone(),
        }
    }
}

/// Storage for sessions out of memory. Implementations must be safe to call from several
/// threads; the engine calls them with its session table's lock held, except the writes of a
/// shared store after a generation (made by the engine's committer thread).
///
/// Two kinds exist. A store that is not [`shared`](SessionStore::shared) (the default,
/// [`DiskStore`]) belongs to one engine: the engine indexes it at start ([`Self::list`]) and
/// writes sessions to it when they leave memory. A shared store (Redis, in the server crate) is
/// the truth for several engines: the engine's table is only a cache, it looks sessions up on a
/// miss, checks [`Self::version`] before every use and writes every change at once with
/// compare-and-set.
pub trait SessionStore: Send + Sync {
    /// The session under that key, if stored (a session of another tenant or model under the
    /// same id is not returned).
    fn get(&self, key: &SessionKey) -> Result<Option<StoredSession>>;
    /// The stored version of the session under that key (`None`: not stored); cheaper than
    /// [`Self::get`].
    fn version(&self, key: &SessionKey) -> Result<Option<u64>>;
    /// Stores a session under [`SessionKey::of`] its metadata. With `expected` set, the write
    /// happens only if the stored version is that one (`Some(0)`: only if absent), else
    /// [`Error::VersionConflict`].
    fn put(&self, session: &StoredSession, expected: Option<u64>) -> Result<()>;
    /// Removes a session (absent is not an error).
    fn delete(&self, key: &SessionKey) -> Result<()>;
    /// The metadata of every stored session, of every model and tenant. Entries that cannot be
    /// read are reported in the second list, with the reason, and otherwise skipped.
    fn list(&self) -> Result<Listing>;
    /// The metadata of a tenant's sessions of one model.
    fn list_tenant(&self, fingerprint: u64, tenant: &str) -> Result<Vec<SessionMeta>> {
        let (metas, _) = self.list()?;
        Ok(metas
            .into_iter()
            .filter(|m| m.fingerprint == fingerprint && m.tenant == tenant)
            .collect())
    }
    /// Whether several engines share this store (see the trait's documentation).
    fn shared(&self) -> bool {
        false
    }
    /// Bytes the store can still take (`None`: unknown, not checked). The engine keeps this
    /// at least what writing every session held only in memory would take, so that shutdown
    /// can write them all.
    fn free_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Whether `id` is a valid session id: 1–64 ASCII letters, digits, `-` or `_` (it names a
/// file).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Sessions as files in one directory, written atomically.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
}

impl DiskStore {
    /// A store in `dir`, created if missing. Temporaries of session writes that never
    /// finished (`.<id>.session.tmp-<pid>-…`, left by a process killed mid-write) are removed,
    /// with one log line on stderr: the store belongs to one engine, so none is in use.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let store = DiskStore { dir };
        let removed = store.remove_stale_temporaries()?;
        if removed > 0 {
            eprintln!(
                "performer: removed {removed} unfinished session write(s) from {}",
                store.dir.display()
            );
        }
        Ok(store)
    }

    /// Removes the temporaries of unfinished session writes; returns how many.
    fn remove_stale_temporaries(&self) -> Result<usize> {
        let mut removed = 0;
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // `fsutil::write_atomic`'s temporary of `<id>.session`.
            let stale = name.starts_with('.')
                && name
                    .split_once(&format!(".{EXT}.tmp-"))
                    .is_some_and(|(id, _)| valid_id(&id[1..]));
            if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> Result<PathBuf> {
        if !valid_id(id) {
            return Err(Error::invalid("session id", format!("`{id}` is not valid")));
        }
        Ok(self.dir.join(format!("{id}.{EXT}")))
    }

    /// Reads the header (metadata) of a session file, leaving `file` at the snapshot.
    fn read_meta(path: &Path, file: &mut File) -> Result<SessionMeta> {
        // The file's name only: the message may reach a client, the directory is the server's.
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let bad = |m: &str| Error::SessionStorage(format!("{name}: {m}"));
        let mut head = [0u8; 12];
        file.read_exact(&mut head)
            .map_err(|_| bad("shorter than a session header"))?;
        if &head[..8] != MAGIC {
            return Err(bad("not a session file (bad magic)"));
        }
        let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        if len > 1 << 20 {
            return Err(bad("metadata larger than 1 MiB"));
        }
        let mut json = vec![0u8; len];
        file.read_exact(&mut json)
            .map_err(|_| bad("truncated metadata"))?;
        serde_json::from_slice(&json).map_err(|e| bad(&format!("metadata: {e}")))
    }
}

impl DiskStore {
    /// The metadata of the file of `id`, if there is one.
    fn meta_of(&self, id: &str) -> Result<Option<SessionMeta>> {
        let path = self.path(id)?;
        match File::open(&path) {
            Ok(mut f) => Self::read_meta(&path, &mut f).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// Whether a stored session's metadata is the one `key` names.
fn matches(meta: &SessionMeta, key: &SessionKey) -> bool {
    meta.id == key.id && meta.tenant == key.tenant && meta.fingerprint == key.fingerprint
}

/// One directory is one namespace of ids: a file is named by the session id alone, and a
/// session of another tenant or model under the same id is neither returned nor overwritten.
impl SessionStore for DiskStore {
    fn get(&self, key: &SessionKey) -> Result<Option<StoredSession>> {
        let id = key.id.as_str();
        let path = self.path(id)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let meta = Self::read_meta(&path, &mut file)?;
        if !matches(&meta, key) {
            return Ok(None);
        }
        let mut snapshot = Vec::new();
        file.read_to_end(&mut snapshot)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Some(StoredSession { meta, snapshot }))
    }

    fn version(&self, key: &SessionKey) -> Result<Option<u64>> {
        Ok(self
            .meta_of(&key.id)?
            .filter(|m| matches(m, key))
            .map(|m| m.version))
    }

    fn put(&self, session: &StoredSession, expected: Option<u64>) -> Result<()> {
        let path = self.path(&session.meta.id)?;
        let key = SessionKey::of(&session.meta);
        let current = self.meta_of(&key.id)?;
        if current.as_ref().is_some_and(|m| !matches(m, &key)) {
            return Err(Error::SessionStorage(format!(
                "`{}` is taken by a stored session of another tenant or model",
                key.id
            )));
        }
        if let Some(want) = expected {
            let found = current.map_or(0, |m| m.version);
            if found != want {
                return Err(Error::VersionConflict {
                    id: session.meta.id.clone(),
                    expected: want,
                    found,
                });
            }
        }
        let json = serde_json::to_vec(&session.meta)
            .map_err(|e| Error::SessionStorage(format!("metadata: {e}")))?;
        let mut bytes = Vec::with_capacity(12 + json.len() + session.snapshot.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        bytes.extend_from_slice(&session.snapshot);
        // Temporary file in the same directory, fsync, rename: a crash leaves the old
        // session or the new one, never a torn file.
        performer::fsutil::write_atomic(&path, |w| w.write_all(&bytes)).map_err(Error::from)
    }

    #[cfg(unix)]
    fn free_bytes(&self) -> Result<Option<u64>> {
        let st = rustix::fs::statvfs(&self.dir)
            .map_err(|e| Error::io(&self.dir, std::io::Error::from(e)).from_store())?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }

    fn delete(&self, key: &SessionKey) -> Result<()> {
        if self.version(key)?.is_none() {
            return Ok(());
        }
        let path = self.path(&key.id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn list(&self) -> Result<Listing> {
        let mut metas = Vec::new();
        let mut bad = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            let name = path.display().to_string();
            let meta = File::open(&path)
                .map_err(|e| Error::io(&path, e))
                .and_then(|mut f| Self::read_meta(&path, &mut f));
            match meta {
                Ok(m) if path.file_stem().and_then(|s| s.to_str()) == Some(m.id.as_str()) => {
                    metas.push(m)
                }
                Ok(m) => bad.push((
                    name,
                    Error::SessionStorage(format!("holds session `{}` under another name", m.id)),
                )),
                Err(e) => bad.push((name, e)),
            }
        }
        Ok((metas, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, version: u64) -> StoredSession {
        StoredSession {
            meta: SessionMeta {
                id: id.into(),
                tenant: "t".into(),
                created: 1,
                last_used: 2,
                position: 3,
                state_bytes: 4,
                version,
                fingerprint: 5,
                note: None,
            },
            snapshot: vec![1, 2, 3],
        }
    }

    fn key(id: &str) -> SessionKey {
        SessionKey::of(&session(id, 0).meta)
    }

    #[test]
    fn stale_temporaries_are_removed_at_open_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        store.put(&session("a", 1), None).unwrap();
        // What a process killed mid-write leaves (`fsutil::write_atomic`'s naming), and files
        // that only look alike.
        let stale = dir.path().join(".sess-0123abcd.session.tmp-4242-0-17");
        std::fs::write(&stale, b"half a session").unwrap();
        let keep = [
            "notes.tmp-1",
            ".hidden",
            "a.session.tmp-1-2-3",
            ".x.y.tmp-1",
        ];
        for k in keep {
            std::fs::write(dir.path().join(k), b"other").unwrap();
        }
        drop(store);
        let store = DiskStore::open(dir.path()).unwrap();
        assert!(!stale.exists());
        for k in keep {
            assert!(dir.path().join(k).exists(), "{k} was removed");
        }
        assert_eq!(store.get(&key("a")).unwrap().unwrap().meta.version, 1);
    }

    #[test]
    fn put_get_list_delete_with_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(store.version(&key("a")).unwrap(), None);
        store.put(&session("a", 1), Some(0)).unwrap();
        assert!(matches!(
            store.put(&session("a", 2), Some(0)),
            Err(Error::VersionConflict { found: 1, .. })
        ));
        store.put(&session("a", 2), Some(1)).unwrap();
        assert_eq!(store.version(&key("a")).unwrap(), Some(2));
        let got = store.get(&key("a")).unwrap().unwrap();
        assert_eq!(got.meta, session("a", 2).meta);
        assert_eq!(got.snapshot, [1, 2, 3]);
        std::fs::write(dir.path().join("junk.session"), b"nope").unwrap();
        let (metas, bad) = store.list().unwrap();
        assert_eq!(metas.len(), 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(store.list_tenant(5, "t").unwrap().len(), 1);
        assert!(store.list_tenant(5, "u").unwrap().is_empty());
        assert!(store.list_tenant(6, "t").unwrap().is_empty());
        store.delete(&key("a")).unwrap();
        store.delete(&key("a")).unwrap();
        assert!(store.get(&key("a")).unwrap().is_none());
        assert!(
            store.get(&key("../x")).is_err(),
            "ids are checked before touching files"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files are left behind");
    }

    #[test]
    fn another_tenant_or_model_neither_reads_nor_overwrites_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        store.put(&session("a", 1), Some(0)).unwrap();
        let mut other_tenant = session("a", 1);
        other_tenant.meta.tenant = "u".into();
        let mut other_model = session("a", 1);
        other_model.meta.fingerprint = 6;
        for s in [&other_tenant, &other_model] {
            let k = SessionKey::of(&s.meta);
            assert!(store.get(&k).unwrap().is_none());
            assert_eq!(store.version(&k).unwrap(), None);
            assert!(matches!(store.put(s, None), Err(Error::SessionStorage(_))));
            store.delete(&k).unwrap();
        }
        assert_eq!(store.version(&key("a")).unwrap(), Some(1), "left alone");
    }
}
