//! Files written whole or not at all, and reads that stop at a known size.
//!
//! Everything `performer` writes (state snapshots, `.npy` logits, benchmark plots, synthetic
//! models, and the server's session spills) goes through [`write_atomic`]: the bytes go to a
//! temporary file in the target's own directory, which is synced and then renamed over the
//! target. A reader therefore sees either the old file or the complete new one, never a
//! prefix, and a failure midway (a full disk, a file size limit, an I/O error, a panic in the
//! writer) leaves the old file byte for byte as it was and removes the temporary file.
//!
//! [`check_writable_dir`] is the cheap check to run *before* expensive work whose result is
//! to be written (a generation before `--save-state`): it creates and removes a probe file in
//! the target's directory.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Counter making temporary names unique within the process (with the pid across processes
/// and the time across pid reuse).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory a file `path` lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A fresh, unused name for a temporary file next to `path`: `.NAME.tmp-PID-COUNTER-NANOS`.
/// The leading dot keeps it out of plain directory listings.
fn temp_name(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path has no file name",
            ),
        )
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".tmp-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(parent_dir(path).join(tmp))
}

/// Removes the temporary file when dropped unless disarmed: the cleanup runs on every early
/// return and on a panic in the writer.
struct TempGuard<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

/// Writes a file atomically: `write` fills a buffered writer on a new temporary file in the
/// same directory as `path` (created with `create_new`, so nothing existing is ever opened),
/// which is then flushed, `fsync`ed and renamed over `path`; finally the directory is synced
/// so that the rename itself survives a crash.
///
/// On any error, from `write` or from the file system, the temporary file is removed, `path`
/// is left exactly as it was (absent, or the old bytes), and the error comes back as
/// [`Error::Io`] naming `path`. The same holds if `write` panics. A failed directory sync
/// after the rename is the one error after which the new file is already in place.
///
/// The file gets the default permissions for new files (`0o666` less the umask), not those
/// of the file it replaces. `path` must name a file, not a directory; a symbolic link at
/// `path` is replaced by a regular file, not followed.
///
/// ```
/// use std::io::Write;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("out.txt");
/// performer::fsutil::write_atomic(&path, |w| w.write_all(b"complete or absent"))?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"complete or absent");
/// // A failing writer leaves the old contents.
/// let err = performer::fsutil::write_atomic(&path, |w| {
///     w.write_all(b"half")?;
///     Err(std::io::Error::other("disk full"))
/// });
/// assert!(err.is_err());
/// assert_eq!(std::fs::read(&path).unwrap(), b"complete or absent");
/// # Ok::<(), performer::Error>(())
/// ```
pub fn write_atomic(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, expected a file path",
            ),
        ));
    }
    let tmp = temp_name(path)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(path, e))?;
    let mut guard = TempGuard {
        path: &tmp,
        armed: true,
    };
    let io = (|| {
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    io.map_err(|e| Error::io(path, e))?;
    guard.armed = false;
    sync_dir(parent_dir(path))
}

/// Syncs a directory so that a rename in it (or a file created in it) is durable; the error
/// names `dir`. File systems that cannot sync a directory (`EINVAL`) are taken at their word.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        match File::open(dir).and_then(|d| d.sync_all()) {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            r => r.map_err(|e| Error::io(dir, e)),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Opens `path` for reading and checks that it is a regular file: a directory, device, FIFO
/// or socket is an error naming `path` and saying what was `expected` ("a file", "a
/// safetensors file"). Returns the file and its length.
pub fn open_regular_file(path: &Path, expected: &str) -> Result<(File, u64)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                format!("is a directory, expected {expected}"),
            ),
        ));
    }
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::other(format!(
                "not a regular file (a device, FIFO or socket), expected {expected}"
            )),
        ));
    }
    Ok((file, meta.len()))
}

/// Checks, cheaply and before any long work, that a file can be written at `path` by
/// [`write_atomic`]: `path` is not a directory and a probe file can be created (and is
/// removed again) in its directory. The error names the directory or the path.
pub fn check_writable_dir(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, expected a file path",
            ),
        ));
    }
    let dir = parent_dir(path);
    let probe = temp_name(path)?;
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Reads at most `limit` bytes from `reader`; a source holding more is an error rather than
/// an unbounded read (`/dev/zero`, a FIFO that never ends, a file larger than it may be).
/// Returns the bytes, or `None` when more than `limit` were on offer.
pub fn read_capped(reader: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    reader.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= limit).then_some(buf))
}

/// Reads a whole *regular* file of at most `limit` bytes. Devices, FIFOs and directories are
/// refused with an error naming `path` (their size is unknown or unbounded), as is a file
/// over the limit (checked against its size first, and again while reading, in case it grows).
pub fn read_regular_file(path: impl AsRef<Path>, limit: u64) -> Result<Vec<u8>> {
    let path = path.as_ref();
    // Not a device or FIFO: their size is unknown or unbounded.
    let (file, len) = open_regular_file(path, "a file")?;
    let too_big = || {
        Error::io(
            path,
            std::io::Error::other(format!("larger than the limit of {limit} bytes")),
        )
    };
    if len > limit {
        return Err(too_big());
    }
    read_capped(file, limit)
        .map_err(|e| Error::io(path, e))?
        .ok_or_else(too_big)
}
