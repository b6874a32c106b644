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

    // Chosen once: a later change of the variable does not move the cached level, and asking
    // for more than the CPU has gives the detected level.
    std::env::set_var(isa::ISA_ENV, "avx512");
    assert_eq!(kernels::isa::active().isa(), Isa::Portable);
    assert_eq!(Isa::choose().unwrap(), Isa::detected());
    std::env::remove_var(isa::ISA_ENV);
    assert_eq!(Isa::choose().unwrap(), Isa::detected());
}
