//! The edge of `performer`: what the command-line tool needs beyond the runtime library.
//!
//! [`bench`] measures prefill and generation throughput by context depth (llama-bench style)
//! and draws its plots; [`npy`] writes the `.npy` files of `performer logits`. The binary
//! (`src/main.rs`) parses arguments, calls the runtime, and turns errors into one-line
//! messages and exit codes. Keeping these here keeps clap, indicatif and plotters out of the
//! runtime crate's dependencies.

pub mod batch_bench;
pub mod bench;
pub mod constrained_bench;
pub mod loadtest;
pub mod npy;
pub mod page_cache;
