//! `perplexity` streams in constant memory: the heap in use while scoring a long stream is no
//! larger than for a short one. A counting global allocator (this test binary only) records
//! the peak of live heap bytes.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::fixture;
use performer::perplexity::{evaluate, PerplexityOptions};
use performer::Model;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout and pointer;
// the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `n` pseudo-random bytes, generated as they are read: the input itself takes no memory.
struct Synthetic {
    left: usize,
    x: u64,
}

impl std::io::Read for Synthetic {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left);
        for b in &mut buf[..n] {
            self.x = self
                .x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (self.x >> 56) as u8;
        }
        self.left -= n;
        Ok(n)
    }
}

/// Peak live heap bytes above the level at the start, while scoring `n` tokens.
fn peak_while_scoring(model: &Model, n: usize) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = evaluate(
        model,
        Synthetic { left: n, x: 3 },
        PerplexityOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(r.scored, n - 1);
    assert_eq!(r.by_position.scored(), n - 1);
    PEAK.load(Ordering::SeqCst) - base
}

#[test]
fn scoring_a_long_stream_takes_no_more_memory_than_a_short_one() {
    let model = Model::load(fixture("default_b")).unwrap();
    // Warm-up: the thread pool and lazily built tables allocate once, on first use.
    peak_while_scoring(&model, 10_000);
    let short = peak_while_scoring(&model, 10_000);
    let long = peak_while_scoring(&model, 140_000);
    // The long stream reaches the 32k–128k and 128k+ buckets. Anything kept per token (even
    // one byte for each of the 130,000 extra tokens) would add more than 128 KiB; the slack
    // covers allocator-visible differences between runs such as the pool's scratch.
    assert!(
        long <= short + (32 << 10),
        "peak heap {long} bytes for 140k tokens vs {short} for 10k"
    );
    assert!(short > 0, "the counter sees the scoring's allocations");
}
