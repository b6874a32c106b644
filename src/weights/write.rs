//! Writing safetensors files whose tensors start on 64-byte boundaries.
//!
//! A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes back
//! to back; the mapping of the file starts on a page, so a tensor's address is its file offset
//! modulo 64. The `safetensors` crate pads the header to 8 bytes only, which leaves f32 rows
//! straddling cache lines: every 512-bit load of the batched product then touches two lines,
//! which costs it a measurable share of its throughput (docs/performance.md). [`write_aligned`]
//! pads the header with spaces (the format allows it) so that the data starts on a 64-byte
//! boundary and stores first the tensors whose sizes are multiples of 64 bytes, so every one
//! of those starts on a boundary too. The file is an ordinary safetensors file for any reader.

use std::path::Path;

use safetensors::View;

use crate::error::{Error, Result};

/// One tensor of a file being written (by [`write_aligned`]): dtype, shape and little-endian
/// bytes. The quantizer and the synthetic models build their files from these.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    /// The safetensors dtype.
    pub dtype: safetensors::Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// The bytes.
    pub data: Vec<u8>,
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The boundary the data of [`write_aligned`]'s files starts on: a cache line, and a 512-bit
/// vector.
pub const ALIGN: usize = 64;

/// Writes `tensors` (name and data, in any order) and `metadata` as a safetensors file at
/// `path`, atomically ([`crate::fsutil::write_atomic`]), every tensor whose byte size is a
/// multiple of [`ALIGN`] starting at a multiple of [`ALIGN`] in the file. The same inputs
/// always give the same bytes.
///
/// # Errors
/// [`Error::Config`] for a duplicate name, a name `__metadata__`, or a tensor whose data
/// length is not its dtype × shape; [`Error::Io`] when the file cannot be written.
///
/// # Example
/// ```
/// use performer::weights::{write_aligned, WeightFile};
/// use safetensors::{tensor::TensorView, Dtype};
///
/// let dir = std::env::temp_dir().join(format!("performer-doc-aligned-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("model.safetensors");
/// let odd = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]; // 3 × f32: 12 bytes
/// let row = vec![0u8; 64 * 4]; // 64 × f32: 256 bytes
/// let tensors = [
///     ("odd", TensorView::new(Dtype::F32, vec![3], &odd).unwrap()),
///     ("row", TensorView::new(Dtype::F32, vec![64], &row).unwrap()),
/// ];
/// write_aligned(&path, tensors, &Default::default())?;
/// let file = WeightFile::open(&path)?;
/// assert_eq!(file.tensor("row")?.view().len(), 64);
/// assert_eq!(file.offset_of("row").unwrap() % 64, 0);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), performer::Error>(())
/// ```
pub fn write_aligned<S: AsRef<str>, V: View>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (S, V)>,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut tensors: Vec<(S, V)> = tensors.into_iter().collect();
    // Whole lines first (stable, so the caller's order within each group is kept).
    tensors.sort_by_key(|(_, t)| !t.data_len().is_multiple_of(ALIGN));
    // A BTreeMap, and each entry's keys inserted in sorted order: the header's bytes are the
    // same whether or not a dependency turns on serde_json's `preserve_order` (llguidance does,
    // with the `constraints` feature), so a model writes the same file from every build.
    let mut header = std::collections::BTreeMap::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut offset = 0usize;
    for (name, t) in &tensors {
        let name = name.as_ref();
        let elems: usize = t.shape().iter().product();
        let bits = elems.checked_mul(t.dtype().bitsize());
        if bits.map(|b| b.div_ceil(8)) != Some(t.data_len()) {
            return Err(Error::Config(format!(
                "tensor {name}: {} data bytes for {:?} of shape {:?}",
                t.data_len(),
                t.dtype(),
                t.shape()
            )));
        }
        if name == "__metadata__" {
            return Err(Error::Config(
                "a tensor cannot be named __metadata__".into(),
            ));
        }
        let entry = serde_json::json!({
            "data_offsets": [offset, offset + t.data_len()],
            "dtype": t.dtype(),
            "shape": t.shape(),
        });
        if header.insert(name.to_string(), entry).is_some() {
            return Err(Error::Config(format!("tensor {name} named twice")));
        }
        offset += t.data_len();
    }
    let mut json = serde_json::to_vec(&header).expect("JSON values");
    // Spaces up to the boundary: 8 length bytes + the header end where the data begins.
    json.resize(
        json.len() + (ALIGN - (8 + json.len()) % ALIGN) % ALIGN,
        b' ',
    );
    crate::fsutil::write_atomic(path, |w| {
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        for (_, t) in &tensors {
            w.write_all(&t.data())?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::WeightFile;
    use safetensors::{tensor::TensorView, Dtype};

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "performer-write-aligned-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("model.safetensors")
    }

    #[test]
    fn whole_line_tensors_start_on_lines_and_everything_round_trips() {
        let path = temp("roundtrip");
        // Odd sizes between the whole-line ones, in the caller's order: 12, 256, 6, 4096 bytes.
        let a: Vec<u8> = (0..12).collect();
        let b: Vec<u8> = (0..256).map(|i| i as u8).collect();
        let c: Vec<u8> = vec![7; 6];
        let d: Vec<u8> = (0..4096).map(|i| (i * 7) as u8).collect();
        let tensors = [
            ("a", TensorView::new(Dtype::F32, vec![3], &a).unwrap()),
            ("b", TensorView::new(Dtype::F32, vec![8, 8], &b).unwrap()),
            ("c", TensorView::new(Dtype::F16, vec![3], &c).unwrap()),
            (
                "d",
                TensorView::new(Dtype::BF16, vec![2, 1024], &d).unwrap(),
            ),
        ];
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("who".to_string(), "test".to_string());
        write_aligned(&path, tensors.clone(), &meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // The crate's own reader accepts it, with every byte where it was.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, data) in [("a", &a), ("b", &b), ("c", &c), ("d", &d)] {
            assert_eq!(st.tensor(name).unwrap().data(), &data[..], "{name}");
        }
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["who"], "test");
        let file = WeightFile::open(&path).unwrap();
        assert_eq!(file.offset_of("b").unwrap() % ALIGN, 0);
        assert_eq!(file.offset_of("d").unwrap() % ALIGN, 0);
        assert_eq!(
            file.tensor("b").unwrap().view().get(0),
            f32::from_le_bytes([0, 1, 2, 3])
        );
        // Deterministic.
        let again = temp("roundtrip-again");
        write_aligned(&again, tensors, &meta).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), bytes);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        std::fs::remove_dir_all(again.parent().unwrap()).unwrap();
    }

    #[test]
    fn bad_inputs_are_errors_and_leave_no_file() {
        let path = temp("bad");
        let a = vec![0u8; 8];
        let two = [
            ("x", TensorView::new(Dtype::F32, vec![2], &a).unwrap()),
            ("x", TensorView::new(Dtype::F32, vec![2], &a).unwrap()),
        ];
        let err = write_aligned(&path, two, &Default::default()).unwrap_err();
        assert!(err.to_string().contains("named twice"), "{err}");
        let meta = [(
            "__metadata__",
            TensorView::new(Dtype::F32, vec![2], &a).unwrap(),
        )];
        assert!(write_aligned(&path, meta, &Default::default()).is_err());
        assert!(!path.exists());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
