//! # performer
//!
//! Streaming CPU inference for causal Performer language models (FAVOR+ attention), compatible
//! with performer-pytorch's `PerformerLM` checkpoints.
//!
//! Data flow: [`weights`] (a memory-mapped safetensors file) → [`Model`] (config plus typed
//! views of the weights) → [`State`] (the constant-size attention state of one sequence) →
//! logits → [`sampling`] → [`tokenizer`] → text, with [`generate`] tying the last steps into an
//! iterator. [`kernels`] holds the SIMD kernels and their scalar twins.
//!
//! ```no_run
//! use performer::{Model, State};
//! let model = Model::load("models/performer-byte")?;
//! let mut state = State::new(&model);
//! model.prefill(&mut state, &[72, 101, 108, 108, 111])?;
//! let logits = model.step(&mut state, 32)?;
//! assert_eq!(logits.len(), model.vocab_size());
//! # Ok::<(), performer::Error>(())
//! ```

pub mod attention;
pub mod baseline;
#[cfg(feature = "chat")]
pub mod chat;
pub mod config;
pub mod constraint;
pub mod error;
pub mod fsutil;
pub mod generate;
pub mod hash;
pub mod kernels;
pub mod model;
pub mod perplexity;
pub mod quant;
pub mod sampling;
pub mod snapshot;
pub mod state;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use config::Config;
pub use constraint::Constraint;
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation};
pub use model::{LoadOptions, Model};
pub use sampling::{Sampler, SamplingParams};
pub use state::{Precision, State, StateShape};

/// The row path's chunk sizes, under their former path ([`model::rows`]).
pub use model::rows as parallel;
