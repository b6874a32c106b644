//! Zero-copy weight loading: a safetensors file mapped into memory, with typed views over its
//! f32, f16 and bf16 tensors.
//!
//! The file is mapped, its header parsed and validated (offsets inside the data, sorted and
//! non-overlapping, byte counts matching dtype × shape) by the `safetensors` crate, and each
//! tensor becomes a [`Tensor`]: a handle to a byte range of the mapping. Nothing is copied up
//! front; pages are read on first use, and on Linux the mapping is advised `MADV_HUGEPAGE` so
//! that a file read from disk is mapped with 2 MiB pages ([`WeightFile::page_report`]). A tensor whose data is not aligned for its element type
//! (possible with third-party writers) is the one exception: it is copied once into an aligned
//! buffer, since unaligned typed access would be undefined behaviour.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};

pub mod names;
mod write;

pub use write::{write_aligned, OwnedTensor, ALIGN};

/// The element types the runtime computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        })
    }
}

/// A borrowed, typed view of a tensor's elements.
#[derive(Debug, Clone, Copy)]
pub enum View<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
}

/// Calls a generic kernel with the concrete slice inside a [`View`].
///
/// ```
/// use performer::{with_view, weights::View, kernels};
/// let w = [1.0f32, 2.0, 3.0];
/// let v = View::F32(&w);
/// let d = with_view!(v, |s| kernels::dot(s, &[1.0, 1.0, 1.0]));
/// assert_eq!(d, 6.0);
/// ```
#[macro_export]
macro_rules! with_view {
    ($view:expr, |$s:ident| $body:expr) => {
        match $view {
            $crate::weights::View::F32($s) => $body,
            $crate::weights::View::F16($s) => $body,
            $crate::weights::View::BF16($s) => $body,
        }
    };
}

impl<'a> View<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        with_view!(*self, |s| s.len())
    }

    /// True when the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sub-view of elements `range`.
    pub fn slice(&self, range: Range<usize>) -> View<'a> {
        match *self {
            View::F32(s) => View::F32(&s[range]),
            View::F16(s) => View::F16(&s[range]),
            View::BF16(s) => View::BF16(&s[range]),
        }
    }

    /// Element `i` widened to f32.
    pub fn get(&self, i: usize) -> f32 {
        use crate::kernels::Elem;
        with_view!(*self, |s| s[i].to_f32())
    }

    /// Widens the elements into `out` (for small tensors and tests).
    pub fn to_f32_into(&self, out: &mut [f32]) {
        use crate::kernels::Elem;
        with_view!(*self, |s| {
            for (o, v) in out.iter_mut().zip(s.iter()) {
                *o = v.to_f32();
            }
        })
    }

    /// The elements widened into a new vector (for small tensors and tests).
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.to_f32_into(&mut v);
        v
    }

    /// Index of the first NaN or infinite element, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        use crate::kernels::Elem;
        with_view!(*self, |s| s.iter().position(|v| !v.to_f32().is_finite()))
    }
}

/// Where a tensor's bytes live.
#[derive(Debug)]
enum Storage {
    /// A range of the shared file mapping.
    Mapped(Arc<Mmap>, Range<usize>),
    /// An aligned copy, made only for misaligned tensors.
    OwnedF32(Vec<f32>),
    /// An aligned copy of 16-bit elements.
    OwnedU16(Vec<u16>),
}

/// One tensor of a loaded weights file: dtype, shape and a handle to its bytes.
#[derive(Debug, Clone)]
pub struct Tensor {
    name: Arc<str>,
    dtype: Dtype,
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl Tensor {
    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The typed elements, borrowed from the mapping.
    pub fn view(&self) -> View<'_> {
        match &*self.storage {
            Storage::Mapped(map, range) => {
                let bytes = &map[range.clone()];
                // The loader checked alignment and length when it made this tensor.
                match self.dtype {
                    Dtype::F32 => View::F32(bytemuck::cast_slice(bytes)),
                    Dtype::F16 => View::F16(bytemuck::cast_slice(bytes)),
                    Dtype::BF16 => View::BF16(bytemuck::cast_slice(bytes)),
                }
            }
            Storage::OwnedF32(v) => View::F32(v),
            Storage::OwnedU16(v) => match self.dtype {
                Dtype::F16 => View::F16(bytemuck::cast_slice(v)),
                _ => View::BF16(bytemuck::cast_slice(v)),
            },
        }
    }

    /// Row `i` of a 2-D tensor.
    pub fn row(&self, i: usize) -> View<'_> {
        let cols = self.shape.last().copied().unwrap_or(1);
        self.view().slice(i * cols..(i + 1) * cols)
    }

    /// True when the bytes are borrowed from the file mapping (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(&*self.storage, Storage::Mapped(..))
    }

    /// Checks the shape, naming the tensor in the error.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<&Self> {
        if self.shape != expected {
            return Err(Error::ShapeMismatch {
                name: self.name.to_string(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(self)
    }
}

/// Metadata of one entry of the file, whatever its dtype.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    /// The safetensors dtype name (`F32`, `I64`, …).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// The entry's size in bytes.
    pub bytes: usize,
}

/// A memory-mapped safetensors file.
#[derive(Debug)]
pub struct WeightFile {
    path: PathBuf,
    map: Arc<Mmap>,
    entries: BTreeMap<String, (EntryInfo, Range<usize>, Option<Dtype>)>,
}

fn malformed(path: &Path, message: impl Into<String>) -> Error {
    Error::MalformedWeights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Opens a weights file and its length, an empty file being malformed.
fn open_nonempty(path: &Path) -> Result<(File, u64)> {
    let (file, len) = crate::fsutil::open_regular_file(path, "a safetensors file")?;
    if len == 0 {
        return Err(malformed(path, "the file is empty"));
    }
    Ok((file, len))
}

impl WeightFile {
    /// Maps and validates a safetensors file. No tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (file, _) = open_nonempty(path)?;
        // SAFETY: the mapping is read-only and private to this process. The one hazard of
        // mapping a file is another process truncating or rewriting it while mapped (a SIGBUS
        // or changed weights); like every mmap-based loader we document that model files must
        // not be modified while loaded. All accesses below stay inside `len` bytes.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // Only advice, and zero-copy still: where the file system caches files in large
        // folios (ext4 and xfs on recent Linux), a mapping advised `MADV_HUGEPAGE` makes
        // readahead bring the file in as 2 MiB folios, which the kernel then maps with 2 MiB
        // pages. Decoding streams every weight once per token, and with 4 KiB pages a TLB
        // miss every 4 KiB costs a memory-bound model a measurable share of its bandwidth
        // (docs/performance.md). Pages already cached in small folios stay small; see
        // [`WeightFile::page_report`] to tell which case a process is in.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Self::from_map(path, Arc::new(map))
    }

    /// Reads a safetensors file into anonymous memory, advised (on Linux) to be backed by
    /// transparent huge pages, instead of mapping the file: a stated trade-off against the
    /// zero-copy default. Loading reads the whole file and the process holds its own copy
    /// (the page cache's can no longer be shared), but the weights then sit on 2 MiB pages
    /// whatever the page cache holds. [`WeightFile::open`] gets 2 MiB pages too when the file
    /// comes from disk (or was cached that way); this copy is for a file the page cache holds
    /// in small pages, e.g. one just written or copied. Tensors are still views into this one
    /// buffer, never copied again. Validation is the same as [`WeightFile::open`].
    pub fn open_huge_pages(path: impl AsRef<Path>) -> Result<Self> {
        use std::io::Read;
        let path = path.as_ref();
        let (mut file, len) = open_nonempty(path)?;
        let len = usize::try_from(len)
            .map_err(|_| malformed(path, "the file does not fit in the address space"))?;
        let mut buf = memmap2::MmapMut::map_anon(len).map_err(|e| Error::io(path, e))?;
        // Only advice: without transparent huge pages the copy still works, on 4 KiB pages.
        #[cfg(target_os = "linux")]
        let _ = buf.advise(memmap2::Advice::HugePage);
        file.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
        let map = buf.make_read_only().map_err(|e| Error::io(path, e))?;
        Self::from_map(path, Arc::new(map))
    }

    fn from_map(path: &Path, map: Arc<Mmap>) -> Result<Self> {
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| malformed(path, describe(&e)))?;
        let data_start = 8 + header_len;
        let mut entries = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let range = data_start + start..data_start + end;
            let dtype = match info.dtype {
                StDtype::F32 => Some(Dtype::F32),
                StDtype::F16 => Some(Dtype::F16),
                StDtype::BF16 => Some(Dtype::BF16),
                _ => None,
            };
            let entry = EntryInfo {
                dtype: format!("{:?}", info.dtype),
                shape: info.shape.clone(),
                bytes: end - start,
            };
            entries.insert(name, (entry, range, dtype));
        }
        Ok(WeightFile {
            path: path.to_path_buf(),
            map,
            entries,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The file's size in bytes.
    pub fn file_size(&self) -> usize {
        self.map.len()
    }

    /// How much of the weights' memory is resident and how much of it the kernel maps with
    /// 2 MiB pages, read from `/proc/self/smaps` (Linux; `None` elsewhere or when it cannot
    /// be read). Pages are counted once touched, so ask after decoding has read the weights.
    pub fn page_report(&self) -> Option<PageReport> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let start = self.map.as_ptr() as usize;
        Some(PageReport::from_smaps(
            &smaps,
            start..start + self.map.len(),
        ))
    }

    /// Names and metadata of every entry, in name order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &EntryInfo)> {
        self.entries.iter().map(|(k, (e, _, _))| (k.as_str(), e))
    }

    /// The shape of an entry, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|(e, _, _)| e.shape.as_slice())
    }

    /// Where a tensor's data starts in the file (and in the mapping, which starts on a page):
    /// modulo 64 it is the tensor's cache-line alignment. `None` for an unknown name.
    pub fn offset_of(&self, name: &str) -> Option<usize> {
        self.entries.get(name).map(|(_, range, _)| range.start)
    }

    /// True when the file holds an entry of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Any entry by name as raw bytes (see [`RawTensor`]): a missing name is a typed error.
    pub fn raw(&self, name: &str) -> Result<RawTensor> {
        let (info, range, _) = self
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        Ok(RawTensor {
            name: name.into(),
            dtype: info.dtype.clone(),
            shape: info.shape.clone(),
            map: self.map.clone(),
            range: range.clone(),
        })
    }

    /// A float tensor by name: missing names and non-float dtypes are typed errors.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (info, range, dtype) = self
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        let dtype = dtype.ok_or_else(|| Error::UnsupportedDtype {
            name: name.into(),
            dtype: info.dtype.clone(),
        })?;
        let bytes = &self.map[range.clone()];
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.size());
        let storage = if aligned {
            Storage::Mapped(self.map.clone(), range.clone())
        } else if dtype == Dtype::F32 {
            Storage::OwnedF32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        } else {
            Storage::OwnedU16(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )
        };
        Ok(Tensor {
            name: name.into(),
            dtype,
            shape: info.shape.clone(),
            storage: Arc::new(storage),
        })
    }
}

/// An entry's bytes, whatever its dtype, borrowed from the file mapping: the integer tensors
/// of the block-quantized formats ([`crate::quant`]) are read through this. Bytes have no
/// alignment requirement, so nothing is ever copied.
#[derive(Debug, Clone)]
pub struct RawTensor {
    name: Arc<str>,
    dtype: String,
    shape: Vec<usize>,
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl RawTensor {
    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The safetensors dtype name (`I8`, `U8`, …).
    pub fn dtype(&self) -> &str {
        &self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The bytes, borrowed from the mapping (the safetensors header validation guarantees
    /// their count matches dtype × shape).
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// Residency of a memory range: see [`WeightFile::page_report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct PageReport {
    /// Bytes of the range in memory.
    pub resident_bytes: u64,
    /// Of those, bytes mapped with 2 MiB pages (a file's `FilePmdMapped` or, for the
    /// `--huge-pages` copy, `AnonHugePages`).
    pub huge_page_bytes: u64,
}

impl PageReport {
    /// Sums the `Rss`, `FilePmdMapped` and `AnonHugePages` fields of the `smaps` entries that
    /// overlap `range`, each entry's figures capped at the size of its overlap. A file mapping
    /// is one or several entries of its own, counted exactly; an anonymous one (the
    /// `--huge-pages` copy) may have been merged by the kernel with a neighbour of the same
    /// permissions, whose pages cannot be told apart from ours, hence the cap: for a range
    /// that is fully resident the result is still exact.
    pub fn from_smaps(smaps: &str, range: Range<usize>) -> PageReport {
        let mut report = PageReport::default();
        // Bytes of the current entry inside `range` (0: outside), and its figures so far.
        let mut overlap = 0u64;
        let (mut rss, mut huge) = (0u64, 0u64);
        let mut flush = |overlap: u64, rss: u64, huge: u64| {
            let resident = rss.min(overlap);
            report.resident_bytes += resident;
            report.huge_page_bytes += huge.min(resident);
        };
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let Some(first) = fields.next() else { continue };
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    flush(overlap, rss, huge);
                    (rss, huge) = (0, 0);
                    overlap = hi.min(range.end).saturating_sub(lo.max(range.start)) as u64;
                    continue;
                }
            }
            if overlap == 0 {
                continue;
            }
            let kib = fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            match first {
                "Rss:" => rss += kib * 1024,
                "FilePmdMapped:" | "AnonHugePages:" => huge += kib * 1024,
                _ => {}
            }
        }
        flush(overlap, rss, huge);
        report
    }

    /// Share of the resident bytes on 2 MiB pages (0 when nothing is resident).
    pub fn huge_fraction(&self) -> f64 {
        if self.resident_bytes == 0 {
            0.0
        } else {
            self.huge_page_bytes as f64 / self.resident_bytes as f64
        }
    }
}

/// A one-line description of a safetensors error.
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "shorter than the 8-byte header length".into(),
        E::HeaderTooLarge => "the header length is larger than allowed (100 MB)".into(),
        E::InvalidHeaderLength => "the header length points past the end of the file".into(),
        E::InvalidHeader(_) => "the header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(err) => {
            format!("the header is not a valid tensor table: {err}")
        }
        E::InvalidOffset(name) => format!(
            "tensor `{name}`: data offsets are out of order, overlapping or outside the data"
        ),
        E::TensorInvalidInfo => "a tensor's byte count does not match its dtype and shape".into(),
        E::MetadataIncompleteBuffer => {
            "the data section's length does not match the tensors the header lists".into()
        }
        E::ValidationOverflow => "a tensor's size overflows".into(),
        other => other.to_string(),
    }
}
