//! State snapshots: bit-identical continuation, typed errors for every bad snapshot, forks, and
//! concurrent sequences sharing one model.

mod common;

use common::{fixture, TestRng};
use performer::snapshot::{hash64, MAGIC};
use performer::{Error, GenerateOptions, Generation, LoadOptions, Model, SamplingParams, State};

fn continue_tokens(model: &Model, state: &mut State, tokens: &[u32]) -> Vec<Vec<f32>> {
    tokens
        .iter()
        .map(|&t| model.step(state, t).unwrap().to_vec())
        .collect()
}

#[test]
fn restored_state_continues_bit_identically() {
    // default_a: FAVOR+ only; opt_local: local windows; opt_rezero_shift: token shifts.
    for name in ["default_a", "opt_local", "opt_rezero_shift", "opt_noproj"] {
        let model = Model::load(fixture(name)).unwrap();
        let mut rng = TestRng(31);
        let prompt = rng.tokens(23, 256);
        let rest = rng.tokens(17, 256);
        let mut state = State::new(&model);
        model.prefill(&mut state, &prompt).unwrap();
        let bytes = state.to_bytes(&model).unwrap();
        let mut restored = State::from_bytes(&model, &bytes).unwrap();
        assert_eq!(restored.position(), 23);
        assert_eq!(restored.logits(), state.logits());
        let a = continue_tokens(&model, &mut state, &rest);
        let b = continue_tokens(&model, &mut restored, &rest);
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn fork_branches_independently() {
    let model = Model::load(fixture("default_b")).unwrap();
    let mut state = State::new(&model);
    model.prefill(&mut state, &[1, 2, 3, 4]).unwrap();
    let mut branch = state.fork();
    let a = continue_tokens(&model, &mut state, &[9, 9]);
    let b = continue_tokens(&model, &mut branch, &[7, 7]);
    assert_ne!(a, b);
    let mut again = State::new(&model);
    model.prefill(&mut again, &[1, 2, 3, 4]).unwrap();
    assert_eq!(continue_tokens(&model, &mut again, &[7, 7]), b);
}

/// Re-seals a modified snapshot with a valid checksum, to reach the checks behind it.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 8;
    let sum = hash64(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum.to_le_bytes());
    bytes
}

/// The version 1 form of a version 2 snapshot: the same buffers with the Kahan compensations
/// (buffers 4, 5 and 6) widened from bf16 to f32, as builds before version 2 wrote them.
fn as_version_1(v2: &[u8]) -> Vec<u8> {
    let mut out = v2[..48].to_vec();
    out[8..12].copy_from_slice(&1u32.to_le_bytes());
    let mut off = 48;
    for buffer in 0..11 {
        let n = u64::from_le_bytes(v2[off..off + 8].try_into().unwrap()) as usize;
        out.extend_from_slice(&v2[off..off + 8]);
        off += 8;
        if (4..=6).contains(&buffer) {
            for h in v2[off..off + 2 * n].chunks_exact(2) {
                let bits = (u16::from_le_bytes([h[0], h[1]]) as u32) << 16;
                out.extend_from_slice(&bits.to_le_bytes());
            }
            off += 2 * n;
        } else {
            out.extend_from_slice(&v2[off..off + 4 * n]);
            off += 4 * n;
        }
    }
    assert_eq!(off, v2.len() - 8);
    out.extend_from_slice(&[0; 8]);
    reseal(out)
}

#[test]
fn version_1_snapshots_still_restore() {
    // opt_local and opt_rezero_shift: every kind of buffer holds data.
    for name in ["default_a", "opt_local", "opt_rezero_shift"] {
        let model = Model::load(fixture(name)).unwrap();
        let mut state = State::new(&model);
        model
            .prefill(&mut state, &TestRng(5).tokens(40, 256))
            .unwrap();
        let v2 = state.to_bytes(&model).unwrap();
        let v1 = as_version_1(&v2);
        assert!(v1.len() > v2.len());
        // bf16 → f32 → bf16 is exact: the same state, by either entry point.
        let restored = State::from_bytes(&model, &v1).unwrap();
        assert_eq!(restored.to_bytes(&model).unwrap(), v2, "{name}");
        let read = State::read_from(&model, &v1[..]).unwrap();
        assert_eq!(read.to_bytes(&model).unwrap(), v2, "{name}");
        // Each body under the other's version number (checksum valid): typed errors, by
        // either entry point; a buffer table read at the wrong width shows as a wrong
        // buffer size (`StateMismatch`) or a wrong length (`InvalidSnapshot`).
        let mut relabeled = [v1.clone(), v2.clone()];
        relabeled[0][8..12].copy_from_slice(&2u32.to_le_bytes());
        relabeled[1][8..12].copy_from_slice(&1u32.to_le_bytes());
        for bytes in relabeled.map(reseal) {
            for r in [
                State::from_bytes(&model, &bytes),
                State::read_from(&model, &bytes[..]),
            ] {
                assert!(
                    matches!(r, Err(Error::InvalidSnapshot(_) | Error::StateMismatch(_))),
                    "{name}: {:?}",
                    r.map(|_| ())
                );
            }
        }
        // Bounded by the version 1 size: one byte more is refused.
        let mut longer = v1.clone();
        longer.push(0);
        assert!(matches!(
            State::read_from(&model, &longer[..]),
            Err(Error::InvalidSnapshot(m)) if m.contains("longer than")
        ));
    }
}

#[test]
fn bad_snapshots_are_typed_errors() {
    let model = Model::load(fixture("default_a")).unwrap();
    let mut state = State::new(&model);
    model.prefill(&mut state, &[5, 6, 7]).unwrap();
    let good = state.to_bytes(&model).unwrap();
    let invalid = |b: &[u8]| matches!(State::from_bytes(&model, b), Err(Error::InvalidSnapshot(_)));

    assert!(invalid(&[]));
    assert!(invalid(&good[..40]));
    assert!(invalid(&good[..good.len() - 1]));
    let mut flipped = good.clone();
    flipped[200] ^= 0x10;
    assert!(invalid(&flipped));
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(invalid(&magic));
    assert_eq!(&good[..8], MAGIC);
    let mut version = good.clone();
    version[8..12].copy_from_slice(&3u32.to_le_bytes());
    let e = State::from_bytes(&model, &reseal(version)).unwrap_err();
    assert!(e.to_string().contains("version 3"), "{e}");
    let mut longer = good[..good.len() - 8].to_vec();
    longer.extend_from_slice(&[0; 4]);
    longer.extend_from_slice(&[0; 8]);
    assert!(invalid(&reseal(longer)));

    // Another model, or the same weights with other kernel settings.
    let other = Model::load(fixture("default_b")).unwrap();
    assert!(matches!(
        State::from_bytes(&other, &good),
        Err(Error::StateMismatch(_))
    ));
    let eps0 = Model::load_with(
        fixture("default_a"),
        LoadOptions {
            kernel_eps: Some(0.0),
            denominator_eps: Some(0.0),
            huge_pages: false,
            quant_kernel: None,
            no_packed_rows: false,
        },
    )
    .unwrap();
    assert!(matches!(
        State::from_bytes(&eps0, &good),
        Err(Error::StateMismatch(_))
    ));
    // The f16 copy of the same model has other weights.
    let f16 = Model::load(fixture("default_a_f16")).unwrap();
    assert!(matches!(
        State::from_bytes(&f16, &good),
        Err(Error::StateMismatch(_))
    ));

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("s.pfstate");
    state.save(&model, &path).unwrap();
    let loaded = State::load(&model, &path).unwrap();
    assert_eq!(loaded.to_bytes(&model).unwrap(), good);
    assert!(matches!(
        State::load(&model, tmp.path().join("missing")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn eight_threads_share_one_model() {
    let model = Model::load(fixture("default_b")).unwrap();
    let run = |seed: u64| -> Vec<u32> {
        let mut state = State::new(&model);
        let opts = GenerateOptions {
            max_tokens: 48,
            sampling: SamplingParams {
                temperature: 1.0,
                seed,
                ..SamplingParams::default()
            },
            ..GenerateOptions::default()
        };
        let mut g = Generation::new(&model, &mut state, &[80, 101, 114], opts).unwrap();
        g.by_ref().for_each(|p| drop(p.unwrap()));
        g.tokens().to_vec()
    };
    let serial: Vec<Vec<u32>> = (0..8).map(run).collect();
    let parallel: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|i| s.spawn(move || run(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(serial, parallel);
}

#[test]
fn snapshot_reads_are_bounded_by_the_model() {
    let model = Model::load(fixture("default_a")).unwrap();
    let mut state = State::new(&model);
    model.prefill(&mut state, &[1, 2, 3]).unwrap();
    let bytes = state.to_bytes(&model).unwrap();
    assert_eq!(bytes.len(), State::snapshot_len(&model));
    // Through a reader: the same state.
    let back = State::read_from(&model, &bytes[..]).unwrap();
    assert_eq!(back.to_bytes(&model).unwrap(), bytes);
    // An endless source (reads stop at the snapshot size plus one byte), of zeros or of a
    // valid snapshot followed by more bytes: typed errors, not an unbounded read.
    assert!(matches!(
        State::read_from(&model, std::io::repeat(0)),
        Err(Error::InvalidSnapshot(_))
    ));
    let endless = std::io::Read::chain(&bytes[..], std::io::repeat(1));
    match State::read_from(&model, endless) {
        Err(Error::InvalidSnapshot(m)) => assert!(m.contains("longer than"), "{m}"),
        r => panic!("expected InvalidSnapshot, got {:?}", r.map(|_| ())),
    }
    // A snapshot of another model is refused from its header, before reading its body.
    let other = Model::load(fixture("default_b")).unwrap();
    let endless = std::io::Read::chain(&bytes[..48], std::io::repeat(1));
    assert!(matches!(
        State::read_from(&other, endless),
        Err(Error::StateMismatch(_))
    ));
    // From a file: /dev/zero ends, with an error naming no partial state.
    assert!(matches!(
        State::load(&model, "/dev/zero"),
        Err(Error::InvalidSnapshot(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let e = State::load(&model, dir.path()).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
}
