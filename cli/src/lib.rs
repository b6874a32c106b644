//! The edge of `performer`: what the command-line tool needs beyond the runtime library.
//!
//! [`bench`] measures prefill and generation throughput by context depth (llama-bench style)
//! (`bench/mod.rs`: the options and `run`; `models.rs`: the attention kinds it runs;
//! `measure.rs`: the tests and their statistics; `report.rs`: table, JSON, SVG; `batch.rs`:
//! batched decode) and draws its plots; [`loadtest`] drives a running server, [`conversation`]
//! with multi-turn conversations; [`npy`] writes
//! the `.npy` files of `performer logits`. The binary (`src/main.rs`, one module per command
//! in `src/cmd/`) parses arguments, calls the runtime, and turns errors into one-line messages
//! and exit codes. Keeping these here keeps clap, indicatif and plotters out of the
//! runtime crate's dependencies.

pub mod bench;
pub mod constrained_bench;
pub mod conversation;
pub mod loadtest;
pub mod npy;
pub mod page_cache;
