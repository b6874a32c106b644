//! The process-wide choice of the quantized matrix-vector method (`kernels::quant::set_method`),
//! in a test binary of its own: the choice is global, and tests/quant.rs relies on the default.

mod common;

use common::{max_diff, TestRng};
use performer::kernels::quant::{self as qk, Method};
use performer::quant::{OwnedQMatrix, QuantFormat};

#[test]
fn the_process_wide_method_choice_is_honoured_and_restored() {
    let mut rng = TestRng(21);
    let (rows, cols) = (40, 256);
    let default = QuantFormat::ALL.map(qk::default_method);
    for format in QuantFormat::ALL {
        let w = rng.vec(rows * cols, 1.0);
        let q = OwnedQMatrix::quantize(format, "w", &w, rows, cols).unwrap();
        let m = q.matrix();
        let x = rng.vec(cols, 1.0);
        for method in [Method::Portable, Method::Dequant, Method::Int8] {
            if !qk::supported(method) {
                // An unsupported method is refused and changes nothing.
                assert!(!qk::set_method(format, Some(method)));
                continue;
            }
            assert!(qk::set_method(format, Some(method)));
            assert_eq!(qk::default_method(format), method);
            let mut y = vec![0f32; rows];
            qk::matvec(m, &x, &mut y);
            let mut twin = vec![0f32; rows];
            if method == Method::Int8 {
                qk::scalar_matvec_int8(m, &x, &mut twin);
            } else {
                qk::scalar_matvec(m, &x, &mut twin);
            }
            // As in tests/quant.rs: 1e-5 of Σ|w·x|, which is below 256 here (|w| ≤ 1 after
            // rounding, |x| < 1, 256 terms).
            assert!(max_diff(&y, &twin) <= 1e-5 * 256.0, "{format} {method:?}");
            // One activation shared by row blocks (as decoding's stacked products share it)
            // gives bit for bit the rows of the plain product, also while another product
            // quantizes on this thread inside the shared scope: a row's sum does not depend
            // on the rows computed beside it.
            let mut blocks = vec![0f32; rows];
            qk::with_activation(&x, |act| {
                // Blocks of 7 rows, which split the rows differently from the plain product.
                for (b, yb) in blocks.chunks_mut(7).enumerate() {
                    let r0 = b * 7;
                    let act = qk::needs_activation(format).then_some(act);
                    qk::matvec_serial_prepared(m.row_range(r0..r0 + yb.len()), &x, act, yb);
                    let mut nested = vec![0f32; rows];
                    qk::matvec_serial(m, &x, &mut nested);
                    assert!(nested
                        .iter()
                        .zip(&y)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            });
            assert!(
                blocks
                    .iter()
                    .zip(&y)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{format} {method:?}: shared activation"
            );
        }
        assert!(qk::set_method(format, None));
    }
    assert_eq!(default, QuantFormat::ALL.map(qk::default_method));
}
