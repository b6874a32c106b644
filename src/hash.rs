//! The crate's one non-cryptographic hash, for model fingerprints and snapshot checksums.

/// A fast 64-bit hash (four multiply-rotate lanes over 8-byte words, then a final mix); used
/// for model fingerprints and snapshot checksums. Not cryptographic.
pub fn hash64(bytes: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut lanes = [P1, P2, !P1, !P2];
    let mut chunks = bytes.chunks_exact(32);
    for c in chunks.by_ref() {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ w.wrapping_mul(P2))
                .rotate_left(31)
                .wrapping_mul(P1);
        }
    }
    let mut h = lanes.iter().fold(bytes.len() as u64, |h, &l| {
        (h ^ l).wrapping_mul(P1).rotate_left(27)
    });
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(P1).rotate_left(11);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h
}
