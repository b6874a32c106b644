//! One module per subcommand: its arguments (a clap `Args` struct) and its `run`. What several
//! commands share (the model flags, the default model) is in [`shared`].

pub mod bench;
pub mod generate;
pub mod info;
pub mod loadtest;
pub mod logits;
pub mod perplexity;
mod perplexity_plot;
pub mod quantize;
pub mod serve;
pub mod shared;
