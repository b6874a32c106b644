//! `PERFORMER_ISA` lowers the kernels' level; an invalid value is a typed error. One test in
//! its own binary: it sets the variable before any kernel runs in this process.

use performer::kernels::{self, isa, Isa};

#[test]
fn env_forces_a_lower_level_once() {
    // SAFETY (of the environment edit): this binary runs no other test, and nothing else in
    // the process reads the environment concurrently.
    std::env::set_var(isa::ISA_ENV, "sse9");
    assert!(matches!(
        Isa::choose(),
        Err(performer::Error::InvalidParameter { .. })
    ));
    assert!(isa::check_env().is_err());

    std::env::set_var(isa::ISA_ENV, "portable");
    assert_eq!(Isa::choose().unwrap(), Isa::Portable);
    assert_eq!(kernels::isa::active().isa(), Isa::Portable);
    assert_eq!(isa::check_env().unwrap(), Isa::Portable);
    // The free functions run at the chosen level and agree with it exactly.
    let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
    let at_level = isa::active().dot(&x, &x);
    assert_eq!(kernels::dot(&x, &x).to_bits(), at_level.to_bits());
    // So do the quantized products: the free functions, a model's weights' kernels and the
    // activation quantization run at the forced level, bit for bit what it gives.
    use kernels::quant::{self as qk, QuantKernels, QuantMethod};
    let w: Vec<f32> = (0..24 * 96).map(|i| (i as f32 * 0.11).cos()).collect();
    let xq: Vec<f32> = (0..96).map(|i| (i as f32 * 0.29).sin()).collect();
    let portable = kernels::Kernels::new(Isa::Portable).unwrap();
    for format in performer::quant::QuantFormat::ALL {
        let q = performer::quant::OwnedQMatrix::quantize(format, "w", &w, 24, 96).unwrap();
        for method in QuantMethod::ALL {
            let active = QuantKernels::active(method);
            assert_eq!(active.kernels().isa(), Isa::Portable);
            assert!(!active.uses_vnni());
            let (mut a, mut b) = (vec![0f32; 24], vec![0f32; 24]);
            qk::matvec_with(method, q.matrix(), &xq, &mut a);
            QuantKernels::new(portable, method).matvec(q.matrix(), &xq, &mut b);
            assert!(
                a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{format} {method}"
            );
        }
    }

    // Chosen once: a later change of the variable does not move the cached level, and asking
    // for more than the CPU has gives the detected level.
    std::env::set_var(isa::ISA_ENV, "avx512");
    assert_eq!(kernels::isa::active().isa(), Isa::Portable);
    assert_eq!(Isa::choose().unwrap(), Isa::detected());
    std::env::remove_var(isa::ISA_ENV);
    assert_eq!(Isa::choose().unwrap(), Isa::detected());
}
