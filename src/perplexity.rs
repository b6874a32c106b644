//! Scoring text: mean negative log-likelihood, perplexity and bits per byte, streaming in
//! constant memory.

use std::io::Read;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::state::State;

/// What to score.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerplexityOptions {
    /// Score at most this many tokens (`None`: the whole input).
    pub max_tokens: Option<usize>,
    /// Reset the context every `window` tokens: inputs are cut into windows of `window`
    /// tokens, each window's logits predict the next `window` tokens (the first token of the
    /// next window included), so every token after the first is scored exactly once from at
    /// most `window` tokens of context — the usual evaluation of a model trained on windows of
    /// `max_seq_len` (PyTorch: `model(x[s:s+L])` against `x[s+1:s+1+L]`, `s = 0, L, 2L, …`).
    /// `None`: one unbroken stream, every token after the first scored with its whole prefix.
    pub window: Option<usize>,
}

/// The result of scoring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerplexityReport {
    /// Tokens read.
    pub tokens: usize,
    /// Tokens scored (each predicted from the ones before it).
    pub scored: usize,
    /// Bytes the scored tokens stand for.
    pub bytes: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Total NLL in bits over the scored bytes.
    pub bits_per_byte: f64,
}

/// Tokens per block read from the input and run through the chunked path.
const BLOCK: usize = 4096;

/// `−log softmax(logits)[target]` in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - logits[target as usize] as f64
}

/// Scores the text of `input`. A byte-level model reads it in blocks (any bytes); a model with
/// another tokenizer reads the whole text (UTF-8), tokenizes it, and scores its tokens in the
/// same blocks, with bits per byte counted on the text's bytes. `progress` is called with the
/// number of tokens read so far after each block.
pub fn evaluate(
    model: &Model,
    mut input: impl Read,
    options: PerplexityOptions,
    mut progress: impl FnMut(usize),
) -> Result<PerplexityReport> {
    if options.window == Some(0) || options.window == Some(1) {
        return Err(Error::invalid("window", "must be at least 2 tokens"));
    }
    let vocab = model.vocab_size();
    let mut state = State::new(model);
    let (mut tokens, mut scored, mut total) = (0usize, 0usize, 0f64);
    // The logits that predict the next token, if the context is not empty.
    let mut pending: Option<Vec<f32>> = None;
    let mut buf = vec![0u8; BLOCK];
    let limit = options.max_tokens.unwrap_or(usize::MAX);
    let tokenizer = model.tokenizer();
    let tokenized = match tokenizer.is_byte_level() {
        true => None,
        false => {
            let mut bytes = Vec::new();
            input
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io("<input>", e))?;
            Some(tokenizer.tokenize(std::str::from_utf8(&bytes).map_err(|e| {
                Error::invalid(
                    "text",
                    format!("this model's tokenizer needs UTF-8 text: {e}"),
                )
            })?)?)
        }
    };
    loop {
        let want = BLOCK.min(limit - tokens);
        if want == 0 {
            break;
        }
        let block: Vec<u32> = match &tokenized {
            None => {
                let n = read_full(&mut input, &mut buf[..want])?;
                buf[..n].iter().map(|&b| b as u32).collect()
            }
            Some(t) => t.ids[tokens.min(t.ids.len())..(tokens + want).min(t.ids.len())].to_vec(),
        };
        let n = block.len();
        if n == 0 {
            break;
        }
        // Split the block at window boundaries.
        let mut start = 0;
        while start < block.len() {
            let pos_in_window = options
                .window
                .map_or(tokens + start, |w| (tokens + start) % w);
            if options.window.is_some() && pos_in_window == 0 {
                // The previous window's last logits still score this token.
                state.reset();
            }
            let end = match options.window {
                Some(w) => block.len().min(start + (w - pos_in_window)),
                None => block.len(),
            };
            let piece = &block[start..end];
            if let Some(prev) = pending.take() {
                total += nll(&prev, piece[0]);
                scored += 1;
            }
            let logits =
                model.prefill_all_logits(&mut state, piece, crate::parallel::DEFAULT_CHUNK)?;
            for (t, &next) in piece.iter().enumerate().skip(1) {
                total += nll(&logits[(t - 1) * vocab..t * vocab], next);
                scored += 1;
            }
            pending = Some(logits[(piece.len() - 1) * vocab..].to_vec());
            start = end;
        }
        tokens += n;
        progress(tokens);
    }
    if scored == 0 {
        return Err(Error::EmptyInput(
            "perplexity needs at least two tokens of text",
        ));
    }
    let mean_nll = total / scored as f64;
    // Every token after the first is scored: the bytes of tokens 1..tokens.
    let bytes = tokenized.map_or(scored, |t| t.bytes_between(1, tokens));
    Ok(PerplexityReport {
        tokens,
        scored,
        bytes,
        mean_nll,
        perplexity: mean_nll.exp(),
        bits_per_byte: total / std::f64::consts::LN_2 / bytes as f64,
    })
}

fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("<input>", e)),
        }
    }
    Ok(n)
}
