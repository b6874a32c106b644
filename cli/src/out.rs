//! Stdout that behaves in pipes, and writes that fail cleanly.
//!
//! Rust ignores `SIGPIPE`, so a write to a stdout whose reader has gone (`performer info |
//! head -1`) returns `EPIPE`; `println!` would panic on it. Every write to stdout goes through
//! a locked handle instead and maps `BrokenPipe` to [`StdoutClosed`], which `main` turns into
//! a quiet exit with success, as `cat` and `grep` do.

use std::fmt;

/// The reader of stdout has closed it: not an error to report.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("stdout was closed by its reader")
    }
}

impl std::error::Error for StdoutClosed {}

/// Maps an error writing to stdout: a broken pipe becomes [`StdoutClosed`], anything else a
/// message that says it was stdout.
pub fn stdout_error(e: std::io::Error) -> Box<dyn std::error::Error> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Box::new(StdoutClosed)
    } else {
        format!("writing to stdout: {e}").into()
    }
}

/// Writes `text` to stdout and flushes it, with [`stdout_error`]'s mapping.
pub fn print_stdout(text: &str) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// Ignores `SIGXFSZ`, so that a write past the file size limit (`ulimit -f`) fails with
/// `EFBIG` and the atomic writer removes its temporary file and reports the error, instead
/// of the signal killing the process with the temporary file left behind.
pub fn ignore_sigxfsz() {
    #[cfg(unix)]
    // SAFETY: `signal` with `SIG_IGN` installs no handler code; it only changes the
    // disposition of one signal, at start-up, before any other thread exists. Tested by
    // `tests/cli.rs` `a_failed_save_leaves_the_old_state_intact` (ulimit -f).
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
