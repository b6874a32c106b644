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

/// The position buckets of [`PositionBuckets`]: `[start, end)` in tokens of context, the last
/// one open-ended. The standard long-context evaluation curve: 0–511, 512–2k, 2k–8k, 8k–32k,
/// 32k–128k, 128k+.
pub const POSITION_BUCKETS: [(usize, Option<usize>); 6] = [
    (0, Some(512)),
    (512, Some(2048)),
    (2048, Some(8192)),
    (8192, Some(32768)),
    (32768, Some(131072)),
    (131072, None),
];

/// The scored tokens of one position bucket.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BucketStats {
    /// First position of the bucket.
    pub start: usize,
    /// One past its last position (`None`: open-ended).
    pub end: Option<usize>,
    /// Tokens scored in it.
    pub scored: usize,
    /// Bytes of text those tokens stand for (one per token with the byte tokenizer).
    pub bytes: usize,
    /// Their total negative log-likelihood, in nats.
    pub nll_sum: f64,
    /// The largest position scored in it (meaningful when `scored > 0`).
    pub max_position: usize,
}

impl BucketStats {
    /// Mean NLL per scored token, in nats (`NaN` when empty).
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.scored as f64
    }

    /// Bits per byte of the bucket: its NLL in bits over the bytes its tokens stand for
    /// (`NaN` when empty).
    pub fn bits_per_byte(&self) -> f64 {
        self.nll_sum / std::f64::consts::LN_2 / self.bytes as f64
    }

    /// `"0–511"`, `"512–2k"`, …, `"128k+"`.
    pub fn label(&self) -> String {
        let k = |n: usize| {
            if n >= 1024 && n.is_multiple_of(1024) {
                format!("{}k", n / 1024)
            } else {
                n.to_string()
            }
        };
        match self.end {
            Some(512) => format!("{}–511", self.start),
            Some(e) => format!("{}–{}", k(self.start), k(e)),
            None => format!("{}+", k(self.start)),
        }
    }
}

/// Scores accumulated by position, in [`POSITION_BUCKETS`]: fixed size, whatever the length
/// of the stream. The position of a scored token is the number of tokens of context its
/// prediction had (in one unbroken stream: its index; with `window`, the tokens since the
/// last reset, `window` for the first token of a window).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionBuckets {
    stats: [BucketStats; POSITION_BUCKETS.len()],
}

impl Default for PositionBuckets {
    fn default() -> Self {
        Self::new()
    }
}

impl PositionBuckets {
    /// Empty buckets.
    pub fn new() -> Self {
        let mut stats = [BucketStats::default(); POSITION_BUCKETS.len()];
        for (s, &(start, end)) in stats.iter_mut().zip(&POSITION_BUCKETS) {
            s.start = start;
            s.end = end;
        }
        PositionBuckets { stats }
    }

    /// The index in [`POSITION_BUCKETS`] of the bucket holding `position`.
    pub fn bucket_of(position: usize) -> usize {
        POSITION_BUCKETS
            .iter()
            .position(|&(_, end)| end.is_none_or(|e| position < e))
            .unwrap_or(POSITION_BUCKETS.len() - 1)
    }

    /// Adds one scored token: its position, its NLL in nats and the bytes of text it stands
    /// for.
    pub fn add(&mut self, position: usize, nll: f64, bytes: usize) {
        let s = &mut self.stats[Self::bucket_of(position)];
        s.scored += 1;
        s.bytes += bytes;
        s.nll_sum += nll;
        s.max_position = s.max_position.max(position);
    }

    /// Every bucket, empty ones included, in order.
    pub fn all(&self) -> &[BucketStats] {
        &self.stats
    }

    /// The buckets that scored at least one token, in order.
    pub fn non_empty(&self) -> impl Iterator<Item = &BucketStats> {
        self.stats.iter().filter(|s| s.scored > 0)
    }

    /// Tokens scored over all buckets.
    pub fn scored(&self) -> usize {
        self.stats.iter().map(|s| s.scored).sum()
    }
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
    /// The same scores by position (tokens of context), in fixed buckets.
    pub by_position: PositionBuckets,
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
    let mut by_position = PositionBuckets::new();
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
            // Tokens of context of the token at `start`: the whole prefix in one stream, the
            // tokens since the reset with a window (a full window for a window's first token).
            let context = match options.window {
                Some(w) if pos_in_window == 0 => w,
                _ => pos_in_window,
            };
            // Bytes of text the token at stream index `i` stands for.
            let token_bytes =
                |i: usize| tokenized.as_ref().map_or(1, |t| t.bytes_between(i, i + 1));
            if let Some(prev) = pending.take() {
                let x = nll(&prev, piece[0]);
                total += x;
                scored += 1;
                by_position.add(context, x, token_bytes(tokens + start));
            }
            let logits =
                model.prefill_all_logits(&mut state, piece, crate::model::rows::DEFAULT_CHUNK)?;
            for (t, &next) in piece.iter().enumerate().skip(1) {
                let x = nll(&logits[(t - 1) * vocab..t * vocab], next);
                total += x;
                scored += 1;
                by_position.add(pos_in_window + t, x, token_bytes(tokens + start + t));
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
        by_position,
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
