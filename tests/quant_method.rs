//! The quantized method is chosen per model (`LoadOptions::quant_kernel`): two models of the
//! same weights loaded side by side in one process compute by their own methods, and the int8
//! method's products share one quantized activation across row blocks.

mod common;

use common::{max_diff, TestRng};
use performer::kernels::quant::{self as qk, QuantKernels, QuantMethod};
use performer::quant::{self, OwnedQMatrix, QuantFormat};
use performer::synthetic::{self, SyntheticShape, WeightDtype};
use performer::{LoadOptions, Model, State};

#[test]
fn each_model_keeps_its_own_method() {
    let tmp = tempfile::tempdir().unwrap();
    let float = tmp.path().join("f32");
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(&float, &shape, WeightDtype::F32, 5).unwrap();
    let mut rng = TestRng(9);
    let tokens = rng.tokens(12, 256);
    let float_model = Model::load(&float).unwrap();
    assert_eq!(float_model.quant_method(), None);
    for format in QuantFormat::ALL {
        let dir = tmp.path().join(format.name());
        quant::quantize_dir(&float, &dir, format, |_, _| {}).unwrap();
        let load = |m: Option<QuantMethod>| {
            Model::load_with(
                &dir,
                LoadOptions {
                    quant_kernel: m,
                    ..LoadOptions::default()
                },
            )
            .unwrap()
        };
        // Both loaded at once: a process-wide switch could not give them different methods.
        let (default, dequant, int8) = (
            load(None),
            load(Some(QuantMethod::Dequant)),
            load(Some(QuantMethod::Int8)),
        );
        assert_eq!(default.quant_method(), Some(QuantMethod::Int8));
        assert_eq!(dequant.quant_method(), Some(QuantMethod::Dequant));
        assert_eq!(int8.quant_method(), Some(QuantMethod::Int8));
        assert!(int8.quantized().all(|q| q.method() == QuantMethod::Int8));
        let run = |m: &Model| {
            let mut s = State::new(m);
            tokens
                .iter()
                .map(|&t| m.step(&mut s, t).unwrap().to_vec())
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (run(&default), run(&dequant), run(&int8));
        let scale = a.iter().flatten().fold(1f32, |m, &v| m.max(v.abs()));
        let mut int8_moved = false;
        for t in 0..tokens.len() {
            // The default is the int8 method: the same logits, bit for bit.
            assert!(
                a[t].iter()
                    .zip(&c[t])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{format} t={t}"
            );
            // The int8 model's activations are rounded to 8 bits per block of 32 (relative
            // 1/254 of each block's largest value per product): its logits stay within a few
            // percent of the largest logit of this tiny model, and differ from the exact ones.
            let d = max_diff(&b[t], &c[t]);
            assert!(d <= 0.05 * scale, "{format} t={t}: {d} (scale {scale})");
            int8_moved |= d > 0.0;
        }
        assert!(
            int8_moved,
            "{format}: the int8 model computed exactly the dequant logits"
        );
    }
}

#[test]
fn a_shared_activation_gives_the_rows_of_the_plain_product() {
    let mut rng = TestRng(21);
    let (rows, cols) = (40, 256);
    for format in QuantFormat::ALL {
        let w = rng.vec(rows * cols, 1.0);
        let q = OwnedQMatrix::quantize(format, "w", &w, rows, cols).unwrap();
        let m = q.matrix();
        let x = rng.vec(cols, 1.0);
        for method in QuantMethod::ALL {
            let k = QuantKernels::active(method);
            let mut y = vec![0f32; rows];
            k.matvec(m, &x, &mut y);
            let mut twin = vec![0f32; rows];
            if method == QuantMethod::Int8 {
                qk::scalar_matvec_int8(m, &x, &mut twin);
            } else {
                qk::scalar_matvec(m, &x, &mut twin);
            }
            // As in tests/quant.rs: 1e-5 of Σ|w·x|, which is below 256 here (|w| ≤ 1 after
            // rounding, |x| < 1, 256 terms).
            assert!(max_diff(&y, &twin) <= 1e-5 * 256.0, "{format} {method}");
            // One activation shared by row blocks (as decoding's stacked products share it)
            // gives bit for bit the rows of the plain product, also while another product
            // quantizes on this thread inside the shared scope: a row's sum does not depend
            // on the rows computed beside it.
            let mut blocks = vec![0f32; rows];
            qk::with_activation(&x, |act| {
                // Blocks of 7 rows, which split the rows differently from the plain product.
                for (b, yb) in blocks.chunks_mut(7).enumerate() {
                    let r0 = b * 7;
                    let act = k.needs_activation().then_some(act);
                    k.matvec_serial_prepared(m.row_range(r0..r0 + yb.len()), &x, act, yb);
                    let mut nested = vec![0f32; rows];
                    k.matvec_serial(m, &x, &mut nested);
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
                "{format} {method}: shared activation"
            );
        }
    }
}

#[test]
fn the_int8_default_keeps_the_shipped_models_stepped_bits_per_byte() {
    // Decode (one token at a time) is where the int8 method runs; prefill widens the weights
    // into a float matrix product whichever method is chosen. Over 768 bytes of the shipped
    // model's held-out text, quantized, the int8 method's bits per byte must stay within
    // 0.2% of the exact method's: measured within 0.02% over 6,000 bytes (q8_0 −0.02%,
    // q4_0 +0.01%, q4_1 −0.01%), against 0.1–0.3% that quantizing the weights itself costs.
    let shipped = common::workspace_root().join("models/performer-byte");
    let text = std::fs::read(shipped.join("heldout.txt")).unwrap();
    let text = &text[..768];
    let tmp = tempfile::tempdir().unwrap();
    let bits = |model: &Model| {
        let mut state = State::new(model);
        let mut total = 0f64;
        for pair in text.windows(2) {
            let logits = model.step(&mut state, pair[0] as u32).unwrap();
            let max = logits.iter().fold(f32::MIN, |m, &v| m.max(v));
            let z: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
            total += (z.ln() - (logits[pair[1] as usize] - max) as f64) / std::f64::consts::LN_2;
        }
        total / (text.len() - 1) as f64
    };
    for format in QuantFormat::ALL {
        let dir = tmp.path().join(format.name());
        quant::quantize_dir(&shipped, &dir, format, |_, _| {}).unwrap();
        let load = |m| {
            let options = LoadOptions {
                quant_kernel: m,
                ..LoadOptions::default()
            };
            Model::load_with(&dir, options).unwrap()
        };
        let (int8, exact) = (bits(&load(None)), bits(&load(Some(QuantMethod::Dequant))));
        let rel = (int8 - exact) / exact;
        assert!(
            rel.abs() <= 0.002,
            "{format}: int8 {int8} vs exact {exact} bits per byte ({:+.3}%)",
            100.0 * rel
        );
    }
}
