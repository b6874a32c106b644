//! Atomic writes and bounded reads (`performer::fsutil`): the old file survives any failure
//! and nothing partial is left behind.

use std::path::Path;

use performer::fsutil::{check_writable_dir, read_capped, read_regular_file, write_atomic};
use performer::Error;

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_complete_write_replaces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    write_atomic(&path, |w| w.write_all(b"first")).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"first");
    // A large write (several buffer sizes) replaces it whole.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    write_atomic(&path, |w| {
        for c in big.chunks(777) {
            w.write_all(c)?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), big);
    assert_eq!(names(dir.path()), ["f.bin"]);
}

#[test]
fn a_failing_writer_leaves_the_old_file_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("victim");
    std::fs::write(&path, b"good old bytes").unwrap();
    // Fails after writing more than the buffer holds, so bytes did reach the temporary file.
    let err = write_atomic(&path, |w| {
        w.write_all(&vec![7u8; 100_000])?;
        Err(std::io::Error::other("injected: disk full"))
    })
    .unwrap_err();
    match &err {
        Error::Io { path: p, source } => {
            assert_eq!(p, &path, "the error names the target");
            assert!(source.to_string().contains("injected"), "{source}");
        }
        e => panic!("expected an I/O error, got {e:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"good old bytes");
    assert_eq!(names(dir.path()), ["victim"]);
    // A failure when there was no file leaves none.
    let fresh = dir.path().join("fresh");
    assert!(write_atomic(&fresh, |_| Err(std::io::Error::other("no"))).is_err());
    assert!(!fresh.exists());
    assert_eq!(names(dir.path()), ["victim"]);
}

#[test]
fn a_panicking_writer_leaves_the_old_file_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("victim");
    std::fs::write(&path, b"good").unwrap();
    let r = std::panic::catch_unwind(|| {
        let _ = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            panic!("injected panic");
        });
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"good");
    assert_eq!(names(dir.path()), ["victim"]);
}

#[test]
fn unwritable_targets_are_refused_up_front_and_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nodir").join("x");
    let e = check_writable_dir(&missing).unwrap_err();
    assert!(e.to_string().contains("nodir"), "{e}");
    assert!(write_atomic(&missing, |w| w.write_all(b"x")).is_err());
    // A directory is not a file to replace.
    let e = check_writable_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    let e = write_atomic(dir.path(), |w| w.write_all(b"x")).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    // A writable directory passes and keeps no probe file.
    check_writable_dir(dir.path().join("ok")).unwrap();
    assert!(names(dir.path()).is_empty());
    // A bare file name refers to the current directory.
    assert!(check_writable_dir("relative-name-in-cwd").is_ok());
}

#[test]
fn capped_reads_stop_at_the_cap() {
    // An endless source is cut at the cap plus one byte.
    assert_eq!(read_capped(std::io::repeat(0), 1000).unwrap(), None);
    assert_eq!(
        read_capped(&b"12345"[..], 5).unwrap().as_deref(),
        Some(&b"12345"[..])
    );
    assert_eq!(read_capped(&b"123456"[..], 5).unwrap(), None);

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.txt");
    std::fs::write(&f, b"hello").unwrap();
    assert_eq!(read_regular_file(&f, 5).unwrap(), b"hello");
    let e = read_regular_file(&f, 4).unwrap_err().to_string();
    assert!(e.contains("p.txt") && e.contains("limit"), "{e}");
    let e = read_regular_file("/dev/zero", 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
    let e = read_regular_file(dir.path(), 10).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
}
