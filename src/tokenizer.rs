//! Tokenizers and UTF-8-safe streaming decoding.

/// The byte-level tokenizer: token id = byte value, vocabulary 256.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Token ids of a string's UTF-8 bytes.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_bytes(text.as_bytes())
    }

    /// Token ids of raw bytes (a prompt file need not be valid UTF-8).
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        bytes.iter().map(|&b| b as u32).collect()
    }

    /// The byte of a token id, or `None` for ids outside 0..256.
    pub fn token_byte(&self, token: u32) -> Option<u8> {
        u8::try_from(token).ok()
    }
}

/// Turns a stream of bytes into text without ever emitting half a character.
///
/// Complete characters are returned as soon as their last byte arrives; an incomplete sequence
/// waits for more bytes; invalid bytes become U+FFFD, as `String::from_utf8_lossy` does.
///
/// ```
/// use performer::tokenizer::Utf8Stream;
/// let mut s = Utf8Stream::default();
/// assert_eq!(s.push(0xC3), ""); // first half of "é"
/// assert_eq!(s.push(0xA9), "é");
/// assert_eq!(s.finish(), "");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds one byte and returns the text it completes (often empty).
    pub fn push(&mut self, byte: u8) -> String {
        self.pending.push(byte);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("checked valid prefix"),
                    );
                    match e.error_len() {
                        // An incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whether no partial character is pending (every byte pushed so far came out as text).
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Flushes a trailing incomplete sequence as U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
