//! Zero-copy loading: right after loading, resident memory grows by a small fraction of the
//! weights file, and every tensor is borrowed from the mapping. (A test binary of its own, so
//! no other test's allocations move the process's resident set meanwhile.)

use performer::synthetic::{self, SyntheticShape, WeightDtype};
use performer::Model;

fn resident_bytes() -> Option<usize> {
    performer_cli::bench::rss_bytes().map(|b| b as usize)
}

#[test]
fn loading_maps_weights_without_reading_them() {
    let tmp = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(tmp.path(), &shape, WeightDtype::F32, 1).unwrap();
    let file_size = std::fs::metadata(tmp.path().join("model.safetensors"))
        .unwrap()
        .len() as usize;
    let Some(before) = resident_bytes() else {
        // Not Linux: no /proc to read; the mapping check below still runs.
        let model = Model::load(tmp.path()).unwrap();
        assert!(model.tensors().all(|t| t.is_mapped()));
        return;
    };
    let model = Model::load(tmp.path()).unwrap();
    let after = resident_bytes().unwrap();
    assert!(
        model.tensors().all(|t| t.is_mapped()),
        "a tensor was copied"
    );
    let grown = after.saturating_sub(before);
    // Loading reads the header and a few small tensors' pages at most: well under 10% of a
    // 14 MB file (measured: a few hundred KB, mostly the header and allocator pages) plus,
    // where the kernel maps the file with 2 MiB pages (the mapping is advised MADV_HUGEPAGE
    // and the file comes fresh from disk: measured 2,101,248 bytes), the one 2 MiB page the
    // header sits in. Reading the weights would grow it by the whole file.
    assert!(
        grown < file_size / 10 + (2 << 20),
        "resident memory grew by {grown} bytes for a {file_size}-byte file"
    );
    drop(model);
}
