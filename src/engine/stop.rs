//! Text out of sampled byte tokens: stop strings, UTF-8-safe pieces, and the rollback point
//! that makes "after a stop, the state equals prompt + returned text" hold.
//!
//! Works on bytes (the byte tokenizer: token id = byte; ids ≥ 256 carry no text). A byte
//! sequence is held back while it could still start a stop string or ends inside a UTF-8
//! character; everything else is emitted at once.

use std::ops::Range;

/// What one pushed token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Text to send now (may be empty) and the tokens it covers (indices into the sampled
    /// tokens of this generation).
    Emit { text: String, tokens: Range<usize> },
    /// A stop string was found. `text` is the last piece to send (the text before the stop),
    /// `tokens` the tokens it covers; `keep` is how many sampled tokens the returned text
    /// holds in all: the state must end up having consumed exactly those.
    Stop {
        text: String,
        tokens: Range<usize>,
        keep: usize,
    },
}

/// The text side of one generation.
#[derive(Debug, Clone)]
pub(crate) struct TextOut {
    stops: Vec<Vec<u8>>,
    /// Byte of each sampled token (`None` for ids without text).
    bytes: Vec<Option<u8>>,
    /// Sampled tokens whose text has been emitted.
    emitted: usize,
    /// Bytes of the tokens `emitted..`.
    pending: Vec<u8>,
}

impl TextOut {
    /// A text stream ending at any of `stops` (non-empty strings).
    pub(crate) fn new(stops: &[String]) -> Self {
        TextOut {
            stops: stops.iter().map(|s| s.as_bytes().to_vec()).collect(),
            bytes: Vec::new(),
            emitted: 0,
            pending: Vec::new(),
        }
    }

    /// Sampled tokens so far.
    #[cfg(test)]
    pub(crate) fn sampled(&self) -> usize {
        self.bytes.len()
    }

    /// Whether every sampled token's text has been emitted.
    pub(crate) fn all_emitted(&self) -> bool {
        self.emitted == self.bytes.len()
    }

    /// Takes the next sampled token.
    pub(crate) fn push(&mut self, token: u32) -> Outcome {
        let byte = u8::try_from(token).ok();
        self.bytes.push(byte);
        if let Some(b) = byte {
            self.pending.push(b);
        }
        if let Some(idx) = self.first_stop() {
            let n = self.tokens_for(idx);
            let text = String::from_utf8_lossy(&self.pending[..idx]).into_owned();
            let tokens = self.emitted..self.emitted + n;
            let keep = tokens.end;
            self.emitted = self.bytes.len();
            self.pending.clear();
            return Outcome::Stop { text, tokens, keep };
        }
        let cut = self.pending.len() - self.held_back();
        let cut = cut - incomplete_tail(&self.pending[..cut]);
        self.emit(cut)
    }

    /// Everything still held back (the generation ended without a stop).
    pub(crate) fn finish(&mut self) -> Outcome {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        let tokens = self.emitted..self.bytes.len();
        self.emitted = self.bytes.len();
        self.pending.clear();
        Outcome::Emit { text, tokens }
    }

    /// Emits the first `cut` pending bytes.
    fn emit(&mut self, cut: usize) -> Outcome {
        let n = self.tokens_for(cut);
        let text = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        let tokens = self.emitted..self.emitted + n;
        self.emitted += n;
        Outcome::Emit { text, tokens }
    }

    /// How many tokens from `emitted` make up the first `len` pending bytes (textless tokens
    /// before the next byte included: they add no text).
    fn tokens_for(&self, len: usize) -> usize {
        let mut seen = 0;
        let mut n = 0;
        for b in &self.bytes[self.emitted..] {
            if b.is_some() {
                if seen == len {
                    break;
                }
                seen += 1;
            }
            n += 1;
        }
        n
    }

    /// Byte offset of the earliest stop string in the pending bytes.
    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| find(&self.pending, s))
            .min()
    }

    /// Length of the longest suffix of the pending bytes that is a proper prefix of a stop.
    fn held_back(&self) -> usize {
        let p = &self.pending;
        let mut hold = 0;
        for s in &self.stops {
            for len in (hold + 1..s.len().min(p.len() + 1)).rev() {
                if p.ends_with(&s[..len]) {
                    hold = len;
                    break;
                }
            }
        }
        hold
    }
}

/// First occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Bytes at the end of `b` that begin a UTF-8 character still missing continuation bytes.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let need = match c {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if back < need { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], text: &[u8]) -> (String, Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut out = TextOut::new(&stops);
        let mut got = String::new();
        let mut covered = 0;
        for &b in text {
            match out.push(b as u32) {
                Outcome::Emit { text, tokens } => {
                    assert_eq!(tokens.start, covered);
                    covered = tokens.end;
                    got.push_str(&text);
                }
                Outcome::Stop { text, tokens, keep } => {
                    assert_eq!(tokens.start, covered);
                    assert_eq!(tokens.end, keep);
                    got.push_str(&text);
                    return (got, Some(keep));
                }
            }
        }
        if let Outcome::Emit { text, tokens } = out.finish() {
            assert_eq!(tokens.start, covered);
            assert_eq!(tokens.end, out.sampled());
            got.push_str(&text);
        }
        (got, None)
    }

    #[test]
    fn stop_cuts_and_keeps_the_returned_tokens() {
        let (text, keep) = run(&["\n\n"], b"ab\ncd\n\nef");
        assert_eq!(text, "ab\ncd");
        assert_eq!(
            keep,
            Some(5),
            "the state keeps exactly the 5 returned bytes"
        );
    }

    #[test]
    fn stop_at_the_start_returns_nothing() {
        assert_eq!(run(&["x"], b"xyz"), (String::new(), Some(0)));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["END", "d"], b"abcdEND"), ("abc".into(), Some(3)));
    }

    #[test]
    fn held_prefix_that_does_not_complete_is_emitted() {
        let stops = vec!["abc".to_string()];
        let mut out = TextOut::new(&stops);
        assert_eq!(
            out.push(b'a' as u32),
            Outcome::Emit {
                text: String::new(),
                tokens: 0..0
            }
        );
        assert_eq!(
            out.push(b'b' as u32),
            Outcome::Emit {
                text: String::new(),
                tokens: 0..0
            }
        );
        assert_eq!(
            out.push(b'x' as u32),
            Outcome::Emit {
                text: "abx".into(),
                tokens: 0..3
            }
        );
        assert!(out.all_emitted());
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let stops: Vec<String> = Vec::new();
        let mut out = TextOut::new(&stops);
        let bytes = "é€".as_bytes();
        let mut pieces = Vec::new();
        for &b in bytes {
            if let Outcome::Emit { text, .. } = out.push(b as u32) {
                pieces.push(text);
            }
        }
        assert_eq!(pieces, ["", "é", "", "", "€"]);
    }

    #[test]
    fn stop_inside_multibyte_text() {
        assert_eq!(run(&["€"], "aé€b".as_bytes()), ("aé".into(), Some(3)));
    }

    #[test]
    fn length_end_flushes_held_text() {
        assert_eq!(run(&["abc"], b"xab"), ("xab".into(), None));
    }

    #[test]
    fn textless_tokens_are_counted() {
        let stops = vec!["z".to_string()];
        let mut out = TextOut::new(&stops);
        assert!(matches!(out.push(300), Outcome::Emit { .. }));
        assert!(matches!(out.push(b'a' as u32), Outcome::Emit { .. }));
        match out.push(b'z' as u32) {
            Outcome::Stop { keep, .. } => assert_eq!(keep, 2),
            o => panic!("expected a stop, got {o:?}"),
        }
    }
}
