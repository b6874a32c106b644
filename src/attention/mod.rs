//! Attention: feature maps, rotary positions and the constant-size streaming FAVOR+ state.

pub mod favor;
pub mod features;
pub mod local;
pub mod rotary;

pub use features::{transposed_tiles, FeatureKind, FeatureMap, PROJECTION_TILE};
pub use rotary::Sinusoid;
