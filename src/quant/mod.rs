//! Block-quantized weights: the `q8_0`, `q4_0` and `q4_1` formats and their validation at load
//! ([`format`](mod@format)), and the conversion of a float model directory ([`convert`]:
//! [`quantize_dir`]). The kernels that multiply by them are in [`crate::kernels::quant`].

pub mod convert;
pub mod format;
pub mod packed;

pub use crate::weights::OwnedTensor;
pub use convert::{is_quantized_name, quantize_dir, quantize_file, COPIED_FILES};
pub use format::{
    dequantize_row, quantize_row, OwnedQMatrix, QMatrix, QRow, QuantFormat, QuantTensor, BLOCK,
    CONFIG_KEY, MINS_SUFFIX, SCALES_SUFFIX,
};
pub use packed::{PackedRows, PackedView, PACKED_ROWS};
