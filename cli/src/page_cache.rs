//! Dropping a file from the page cache, so that the next load reads it as a checkpoint on disk
//! is read.

use std::path::Path;

use performer::error::{Error, Result};

/// Flushes a file just written to disk and asks the kernel to drop it from the page cache.
/// That matters for benchmarks: pages left cached by the writes stay in the small folios the
/// writes made, while a mapped read from disk (the loader advises `MADV_HUGEPAGE`) comes in as
/// 2 MiB folios mapped with 2 MiB pages, and a memory-bound decode runs measurably faster on
/// those (docs/performance.md). Dropping is only advice: where it is not available it does
/// nothing.
pub fn drop_from_page_cache(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Dirty pages cannot be dropped; write them out first.
    file.sync_all().map_err(|e| Error::io(path, e))?;
    #[cfg(target_os = "linux")]
    let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
    Ok(())
}
