//! Run-time choice of the kernels' instruction set.
//!
//! The binary holds every kernel compiled three times, once per [`Isa`] level, each inside a
//! `#[target_feature]` entry point (see [`super::simd`] and the `kernels!` macro of
//! [`super`]). The level is detected
//! once per process, the best the CPU has, and cached; the environment variable
//! `PERFORMER_ISA` (`portable`, `avx2` or `avx512`) can force a lower one for testing and
//! benchmarking (a higher one than the CPU has falls back to the detected level).
//!
//! [`Kernels`] is the handle the kernels dispatch through; it can only be obtained for a level
//! the CPU supports, which is what makes calling a level's instructions sound.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::Error;

/// The environment variable that forces a lower kernel level.
pub const ISA_ENV: &str = "PERFORMER_ISA";

/// An instruction-set level of the kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Baseline vector code for any CPU of the target (SSE2 on x86-64), multiply-add unfused.
    Portable,
    /// AVX2 with FMA and F16C, 16 lanes as two 256-bit halves.
    Avx2,
    /// AVX-512 (F, BW, CD, DQ, VL), 16 lanes in one 512-bit register.
    Avx512,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// The name `PERFORMER_ISA` accepts and `performer info` prints.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a level name (`portable`, also `scalar`; `avx2`; `avx512`), case-insensitive.
    pub fn parse(s: &str) -> Result<Isa, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Ok(Isa::Portable),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            other => Err(Error::invalid(
                ISA_ENV,
                format!("{other:?}: expected portable, avx2 or avx512"),
            )),
        }
    }

    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::x86::Avx2::is_available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => super::x86::Avx512::is_available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best level this CPU supports.
    pub fn detected() -> Isa {
        Isa::supported().last().unwrap_or(Isa::Portable)
    }

    /// The levels this CPU supports, lowest first (always at least [`Isa::Portable`]).
    pub fn supported() -> impl DoubleEndedIterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|l| l.is_supported())
    }

    /// The level `PERFORMER_ISA` asks for, `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Isa>, Error> {
        match std::env::var(ISA_ENV) {
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => Isa::parse(&v).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Error::invalid(ISA_ENV, "not valid UTF-8"))
            }
        }
    }

    /// The level the kernels use in this process: [`Isa::detected`], lowered by
    /// `PERFORMER_ISA` when set. An invalid value is an error here and in [`check_env`]; the
    /// kernels themselves ignore it (they cannot fail) and use the detected level.
    pub fn choose() -> Result<Isa, Error> {
        let best = Isa::detected();
        Ok(Isa::from_env()?.map_or(best, |asked| asked.min(best)))
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks `PERFORMER_ISA` and returns the level the kernels use ([`active`]'s). Call it where
/// an invalid value should be reported (model loading, `performer info`).
pub fn check_env() -> Result<Isa, Error> {
    Isa::from_env()?;
    Ok(active().isa())
}

/// The kernels at one supported level. Obtained from [`active`] or [`Kernels::new`]; every
/// kernel of [`super`] is a method of it, and the module's free functions call [`active`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// Invariant: `isa.is_supported()`.
    isa: Isa,
}

impl Kernels {
    /// The kernels at `isa`, `None` when this CPU does not support it.
    pub fn new(isa: Isa) -> Option<Kernels> {
        isa.is_supported().then_some(Kernels { isa })
    }

    /// The level.
    pub fn isa(self) -> Isa {
        self.isa
    }

    /// The kernels at every level this CPU supports, lowest first (for tests and benchmarks).
    pub fn all_supported() -> Vec<Kernels> {
        Isa::supported().map(|isa| Kernels { isa }).collect()
    }
}

/// 0 = not chosen yet, else `Isa as u8 + 1`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The process's kernels: chosen on first use ([`Isa::choose`], an invalid `PERFORMER_ISA`
/// counting as unset) and cached.
#[inline]
pub fn active() -> Kernels {
    let isa = match ACTIVE.load(Ordering::Relaxed) {
        1 => Isa::Portable,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        _ => return choose_active(),
    };
    Kernels { isa }
}

#[cold]
#[inline(never)]
fn choose_active() -> Kernels {
    let isa = Isa::choose().unwrap_or_else(|_| Isa::detected());
    // Racing first calls all store the same value.
    ACTIVE.store(isa as u8 + 1, Ordering::Relaxed);
    Kernels { isa }
}
