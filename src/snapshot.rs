//! State snapshots: a sequence's whole context in a few megabytes, saved and restored
//! bit-exactly.
//!
//! Format, version 2, all little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `PFSTATE\0` |
//! | 8 | 4 | format version (`u32`, 2) |
//! | 12 | 4 | flags (`u32`; bit 0: logits present) |
//! | 16 | 8 | model fingerprint (`u64`: hash of the architecture config and of the weights file) |
//! | 24 | 8 | position: tokens consumed (`u64`) |
//! | 32 | 4 | `kernel_eps` (`f32`) |
//! | 36 | 4 | `denominator_eps` (`f32`) |
//! | 40 | 4 | feature map (`u32`: 0 softmax, 1 ReLU, 2 GELU, 3 no projection) |
//! | 44 | 4 | number of buffers (`u32`, 11) |
//! | 48 | … | per buffer: element count (`u64`), then the elements: `f32` `A`, `a`, `s`, `M`, the Kahan compensations of `A`, `a`, `s` in `bf16`, then `f32` local keys, local values, token-shift features, logits |
//! | end − 8 | 8 | checksum (`u64`: [`hash64`] of every byte before it) |
//!
//! Restoring checks magic, version, checksum, length, fingerprint, kernel settings and every
//! buffer's size; any mismatch is a typed error and leaves nothing half-restored.
//!
//! Version 1 (before the compensations became bf16) is the same with every buffer in `f32`;
//! it is still read, its compensations rounded to bf16 (what the state would have kept).

use std::io::Read;
use std::path::Path;

use crate::attention::FeatureKind;
use crate::config::KernelFn;
use crate::error::{Error, Result};
/// The checksum of snapshots (and the model fingerprint), re-exported from [`crate::hash`].
pub use crate::hash::hash64;
use crate::model::Model;
use crate::state::{Buffer, BufferMut, State};
use half::bf16;

/// The snapshot magic.
pub const MAGIC: &[u8; 8] = b"PFSTATE\0";
/// The current format version.
pub const VERSION: u32 = 2;
/// The oldest version still read: all buffers in `f32`.
const VERSION_F32: u32 = 1;
const HEADER: usize = 48;
const BUFFERS: u32 = crate::state::MEMORY_BUFFERS as u32;

fn feature_code(kind: FeatureKind) -> u32 {
    match kind {
        FeatureKind::Softmax { .. } => 0,
        FeatureKind::Generalized(KernelFn::Relu) => 1,
        FeatureKind::Generalized(KernelFn::Gelu) => 2,
        FeatureKind::NoProjection => 3,
    }
}

/// Bytes per element in a snapshot of `version` of a buffer held in bf16 (`bf16`) or f32:
/// version 1 wrote every buffer in f32.
fn element_bytes(version: u32, bf16: bool) -> usize {
    if bf16 && version != VERSION_F32 {
        2
    } else {
        4
    }
}

/// The size of a snapshot of `version` of a state whose memory is `memory`.
fn snapshot_len_of(memory: &[Buffer<'_>], version: u32) -> usize {
    let data: usize = memory
        .iter()
        .map(|b| element_bytes(version, b.is_bf16()) * b.len())
        .sum();
    HEADER + 8 * BUFFERS as usize + data + 8
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidSnapshot(msg.into())
}

impl State {
    /// An independent copy for branching generations: both continue from here.
    pub fn fork(&self) -> State {
        self.clone()
    }

    /// Serializes the state (see the module docs for the format).
    pub fn to_bytes(&self, model: &Model) -> Result<Vec<u8>> {
        self.check_fits(model.state_shape())?;
        if self.is_f64() {
            return Err(Error::invalid(
                "precision",
                "snapshots hold f32 states; f64 states are a measurement tool",
            ));
        }
        let c = model.config();
        let mut out = Vec::with_capacity(snapshot_len_of(&self.mem.buffers(), VERSION));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.has_logits as u32).to_le_bytes());
        out.extend_from_slice(&model.fingerprint().to_le_bytes());
        out.extend_from_slice(&(self.pos as u64).to_le_bytes());
        out.extend_from_slice(&c.kernel_eps.to_le_bytes());
        out.extend_from_slice(&c.denominator_eps.to_le_bytes());
        out.extend_from_slice(&feature_code(model.feature_map(0).kind).to_le_bytes());
        out.extend_from_slice(&BUFFERS.to_le_bytes());
        for b in self.mem.buffers() {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            match b {
                Buffer::F32(b) => b.iter().for_each(|v| out.extend(v.to_le_bytes())),
                Buffer::Bf16(b) => b.iter().for_each(|v| out.extend(v.to_le_bytes())),
            }
        }
        let sum = hash64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        Ok(out)
    }

    /// Restores a state for `model` from [`State::to_bytes`] output.
    pub fn from_bytes(model: &Model, bytes: &[u8]) -> Result<State> {
        if bytes.len() < HEADER + 8 {
            return Err(bad(format!(
                "{} bytes is shorter than the header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a performer state snapshot (bad magic)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        if version != VERSION && version != VERSION_F32 {
            return Err(bad(format!(
                "format version {version} is not supported (this build reads versions {VERSION_F32} and {VERSION})"
            )));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        if hash64(body) != u64::from_le_bytes(tail.try_into().expect("8 bytes")) {
            return Err(bad(
                "checksum mismatch: the snapshot is corrupted or truncated",
            ));
        }
        if u64_at(16) != model.fingerprint() {
            return Err(Error::StateMismatch(
                "the snapshot was made with another model (config or weights differ)".into(),
            ));
        }
        let c = model.config();
        let (ke, de, fk) = (f32_at(32), f32_at(36), u32_at(40));
        if ke.to_bits() != c.kernel_eps.to_bits()
            || de.to_bits() != c.denominator_eps.to_bits()
            || fk != feature_code(model.feature_map(0).kind)
        {
            return Err(Error::StateMismatch(format!(
                "the snapshot was made with kernel_eps {ke}, denominator_eps {de}, feature map {fk}; the model has {}, {}, {}",
                c.kernel_eps,
                c.denominator_eps,
                feature_code(model.feature_map(0).kind)
            )));
        }
        if u32_at(44) != BUFFERS {
            return Err(bad(format!("{} buffers, expected {BUFFERS}", u32_at(44))));
        }
        let position = usize::try_from(u64_at(24)).map_err(|_| bad("position overflows"))?;
        let mut state = State::new(model);
        let mut off = HEADER;
        for (i, buf) in state.mem.buffers_mut().into_iter().enumerate() {
            let n = body
                .get(off..off + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or_else(|| bad("truncated buffer table"))?;
            let len = buf.len();
            if n != len as u64 {
                return Err(Error::StateMismatch(format!(
                    "buffer {i} holds {n} values, this model's state has {len}"
                )));
            }
            off += 8;
            let width = element_bytes(version, buf.is_bf16());
            let data = body
                .get(off..off + width * len)
                .ok_or_else(|| bad("truncated buffer data"))?;
            let f32_of = |b: &[u8]| f32::from_le_bytes(b.try_into().expect("4 bytes"));
            match buf {
                BufferMut::F32(buf) => {
                    for (v, b) in buf.iter_mut().zip(data.chunks_exact(4)) {
                        *v = f32_of(b);
                    }
                }
                BufferMut::Bf16(buf) if width == 4 => {
                    for (v, b) in buf.iter_mut().zip(data.chunks_exact(4)) {
                        *v = bf16::from_f32(f32_of(b));
                    }
                }
                BufferMut::Bf16(buf) => {
                    for (v, b) in buf.iter_mut().zip(data.chunks_exact(2)) {
                        *v = bf16::from_le_bytes(b.try_into().expect("2 bytes"));
                    }
                }
            }
            off += data.len();
        }
        if off != body.len() {
            return Err(bad("trailing bytes after the last buffer"));
        }
        state.pos = position;
        state.has_logits = u32_at(12) & 1 == 1;
        Ok(state)
    }

    /// The exact size in bytes of a snapshot of a state of `model` ([`State::to_bytes`]).
    pub fn snapshot_len(model: &Model) -> usize {
        snapshot_len_of(&State::new(model).mem.buffers(), VERSION)
    }

    /// Writes [`State::to_bytes`] to a file, atomically ([`crate::fsutil::write_atomic`]): on
    /// any failure an existing file at `path` is left as it was and nothing partial remains.
    pub fn save(&self, model: &Model, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_bytes(model)?;
        crate::fsutil::write_atomic(path, |w| w.write_all(&bytes))
    }

    /// Reads a snapshot file written by [`State::save`]; see [`State::read_from`] for how
    /// far it reads.
    pub fn load(model: &Model, path: impl AsRef<Path>) -> Result<State> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "is a directory, expected a state file",
                ),
            ));
        }
        State::read_from(model, std::io::BufReader::new(file)).map_err(|e| match e {
            Error::Io { source, .. } => Error::io(path, source),
            e => e,
        })
    }

    /// Reads a snapshot from `reader`, never more than [`State::snapshot_len`] + 1 bytes
    /// (or a version 1 snapshot's size + 1): the header is read and checked first (magic,
    /// version, model fingerprint), then the rest up to the size this model's snapshots of
    /// that version have. A source with more bytes (a longer file, `/dev/zero`) is an
    /// [`Error::InvalidSnapshot`], not an unbounded read.
    pub fn read_from(model: &Model, mut reader: impl Read) -> Result<State> {
        let io = |e| Error::io("<snapshot>", e);
        let mut bytes = Vec::with_capacity(HEADER);
        (&mut reader)
            .take(HEADER as u64)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let known_version = bytes.len() == HEADER
            && &bytes[..8] == MAGIC
            && (bytes[8..12] == VERSION.to_le_bytes() || bytes[8..12] == VERSION_F32.to_le_bytes());
        let version = if known_version && bytes[8..12] == VERSION_F32.to_le_bytes() {
            VERSION_F32
        } else {
            VERSION
        };
        let expected = snapshot_len_of(&State::new(model).mem.buffers(), version);
        bytes.reserve(expected - bytes.len());
        if known_version && bytes[16..24] != model.fingerprint().to_le_bytes() {
            return Err(Error::StateMismatch(
                "the snapshot was made with another model (config or weights differ)".into(),
            ));
        }
        reader
            .take((expected - bytes.len()) as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() > expected {
            if bytes.len() < HEADER + 8 || &bytes[..8] != MAGIC {
                return Err(bad("not a performer state snapshot (bad magic)"));
            }
            return Err(bad(format!(
                "longer than the {expected} bytes a snapshot of this model has"
            )));
        }
        State::from_bytes(model, &bytes)
    }
}
