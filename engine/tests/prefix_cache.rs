//! The prefix-state cache: prompts that share a head with an earlier one resume from its
//! state at a slice boundary, with output, logprobs and final states bit for bit those of an
//! engine without the cache; per tenant; within its byte budget, least recently used first.

use std::sync::Arc;

use performer::sampling::splitmix64;
use performer::synthetic::{self, SyntheticShape, WeightDtype};
use performer::{Model, SamplingParams, State};
use performer_engine::{Completion, CompletionRequest, Engine, EngineConfig, Target};

/// A synthetic tiny model (rotary positions: prompts of any length), with its directory.
fn tiny() -> (tempfile::TempDir, Arc<Model>) {
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    synthetic::write(dir.path(), &shape, WeightDtype::F32, 1).unwrap();
    let model = Arc::new(Model::load(dir.path()).unwrap());
    (dir, model)
}

fn engine(model: &Arc<Model>, prefix_cache_memory: usize) -> Engine {
    let config = EngineConfig {
        threads: 2,
        prefill_chunk: 256,
        prefix_cache_memory,
        ..EngineConfig::default()
    };
    Engine::start(model.clone(), config, None).unwrap()
}

/// `n` pseudo-random tokens of the tiny model's 256.
fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut s = seed;
    (0..n).map(|_| (splitmix64(&mut s) % 256) as u32).collect()
}

fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
    [a, b].concat()
}

fn sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: Some(40),
        seed: 7,
        ..SamplingParams::default()
    }
}

fn request(tenant: &str, prompt: Vec<u32>, target: Target, n: usize) -> CompletionRequest {
    let mut r = CompletionRequest::new(prompt, 6, sampling());
    r.tenant = tenant.into();
    r.target = target;
    r.logprobs = Some(5);
    r.n = n;
    r
}

/// Everything a completion returns that must not depend on the cache, logprobs as bits;
/// with a created session, its state's snapshot bytes.
fn outcome(engine: &Engine, tenant: &str, done: &Completion) -> Vec<String> {
    let mut out = vec![format!(
        "prompt {} completion {}",
        done.usage.prompt_tokens, done.usage.completion_tokens
    )];
    for c in &done.choices {
        out.push(format!("{:?} {:?}", c.text, c.finish_reason));
        for lp in &c.logprobs {
            let top: Vec<(u32, u32)> = lp.top.iter().map(|&(t, l)| (t, l.to_bits())).collect();
            out.push(format!("{} {} {top:?}", lp.token, lp.logprob.to_bits()));
        }
    }
    if let Some(s) = &done.session {
        let bytes = engine.session_snapshot(tenant, &s.id).unwrap();
        out.push(format!("session at {}: {:016x}", s.position, hash(&bytes)));
    }
    out
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Prompts sharing heads of every kind of length with earlier ones: shorter than a slice,
/// exactly one, several plus a tail, across row blocks; stateless (one and three choices) and
/// sessions created from the prompt. Each runs on an engine with the cache and one without;
/// everything they return is the same, and the cached engine resumed exactly where the
/// slicing allows.
#[test]
fn cached_prefixes_change_no_bit_of_the_output() {
    let (_dir, model) = tiny();
    // The slicing the expected resume points follow: slices of 256 tokens, row blocks of 1024,
    // a remainder of at most 64 tokens joining the slice before it.
    assert_eq!(model.prefill_block_tokens(), 1024);
    let cached = engine(&model, 256 << 20);
    let plain = engine(&model, 0);
    let base = tokens(1, 3000);
    let (ta, tb, tc, td) = (tokens(2, 40), tokens(3, 100), tokens(4, 400), tokens(5, 50));
    use Target::{NewSession as New, Stateless as Sl};
    #[rustfmt::skip]
    let steps: Vec<(&str, Vec<u32>, Target, usize, usize)> = vec![
        // (what, prompt, target, choices, tokens resumed past)
        ("shorter than a slice", base[..100].to_vec(), Sl, 1, 0),
        ("the same again", base[..100].to_vec(), Sl, 1, 100),
        ("sharing 80 tokens", cat(&base[..80], &ta[..30]), Sl, 1, 0),
        ("exactly one slice", base[..256].to_vec(), New, 1, 0),
        // 296 tokens are one slice (the 40 join it): 256 is no boundary of this prompt.
        ("one slice and 40", cat(&base[..256], &ta), Sl, 1, 0),
        ("one slice and 100", cat(&base[..256], &tb), New, 1, 256),
        // Slices end at 256, 512, 768, 1024 and 1317 (the last 37 join the slice at 1024).
        ("several slices and a tail", base[..1317].to_vec(), Sl, 3, 256),
        ("sharing 1000 tokens", cat(&base[..1000], &tc), Sl, 1, 768),
        // Ends 256 … 2048, 2304, 2600: past 1024, the longest point cached with this head.
        ("three row blocks", base[..2600].to_vec(), New, 1, 1024),
        ("the several slices again", base[..1317].to_vec(), Sl, 1, 1317),
        // Ends … 2304, 2560, 2650: 2600 is no boundary; of those kept, 2304 is the longest.
        ("three row blocks and 50", cat(&base[..2600], &td), New, 1, 2304),
    ];
    let mut expected_hits = 0;
    for (what, prompt, target, n, resumed) in steps {
        let ask = |e: &Engine| {
            let done = e
                .complete(request("t", prompt.clone(), target.clone(), n))
                .unwrap();
            let out = outcome(e, "t", &done);
            (done.usage.cached_tokens, out)
        };
        let (with, with_out) = ask(&cached);
        let (without, without_out) = ask(&plain);
        assert_eq!(
            with_out, without_out,
            "{what}: the cache changed the output"
        );
        assert_eq!(with, resumed, "{what}: resumed past {with} tokens");
        assert_eq!(without, 0, "{what}: the engine without a cache resumed");
        expected_hits += usize::from(resumed > 0);
    }
    let stats = cached.stats().prefix_cache;
    assert_eq!(stats.hits as usize, expected_hits);
    assert_eq!(stats.misses as usize, 11 - expected_hits);
    assert!(
        stats.entries > 0 && stats.bytes <= stats.budget,
        "{stats:?}"
    );
    let off = plain.stats().prefix_cache;
    assert_eq!((off.hits, off.misses, off.entries, off.bytes), (0, 0, 0, 0));

    // A prompt appended to an existing session starts from the session's state: no lookup.
    let s = cached.create_session("t", base[..300].to_vec()).unwrap();
    let before = cached.stats().prefix_cache;
    let done = cached
        .complete(request(
            "t",
            base[300..600].to_vec(),
            Target::Session(s.id),
            1,
        ))
        .unwrap();
    assert_eq!(done.usage.cached_tokens, 0);
    let after = cached.stats().prefix_cache;
    assert_eq!((after.hits, after.misses), (before.hits, before.misses));
}

/// The state a cached prompt ends in is the one a single prefill of the whole prompt leaves.
#[test]
fn a_resumed_session_holds_the_whole_prompts_state() {
    let (_dir, model) = tiny();
    let cached = engine(&model, 256 << 20);
    let head = tokens(11, 1024);
    cached.create_session("t", head.clone()).unwrap();
    let prompt = cat(&head, &tokens(12, 300));
    let mut req = request("t", prompt.clone(), Target::NewSession, 1);
    req.max_tokens = 0;
    let done = cached.complete(req).unwrap();
    assert_eq!(done.usage.cached_tokens, 1024);
    let id = done.session.unwrap().id;
    let mut whole = State::new(&model);
    model.prefill(&mut whole, &prompt).unwrap();
    assert!(
        cached.session_snapshot("t", &id).unwrap() == whole.to_bytes(&model).unwrap(),
        "the resumed state differs from one prefill of the whole prompt"
    );
}

/// Requests sharing a head run at once, while the first ones are still storing its states:
/// every output equals the uncached engine's, and once the head is cached they all resume.
#[test]
fn concurrent_requests_with_a_shared_head_match_the_uncached_engine() {
    let (_dir, model) = tiny();
    let cached = Arc::new(engine(&model, 256 << 20));
    let plain = engine(&model, 0);
    let head = tokens(21, 1100);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| cat(&head, &tokens(100 + i, 90 + 37 * i as usize)))
        .collect();
    let reference: Vec<Vec<String>> = prompts
        .iter()
        .map(|p| {
            let done = plain
                .complete(request("t", p.clone(), Target::Stateless, 1))
                .unwrap();
            outcome(&plain, "t", &done)
        })
        .collect();
    for wave in 0..2 {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (e, p) = (cached.clone(), p.clone());
                std::thread::spawn(move || {
                    let done = e.complete(request("t", p, Target::Stateless, 1)).unwrap();
                    (done.usage.cached_tokens, outcome(&e, "t", &done))
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let (resumed, out) = h.join().unwrap();
            assert_eq!(out, reference[i], "wave {wave}, prompt {i}");
            if wave == 1 {
                // 1024 (a row block's end, kept as the fourth slice boundary) is the longest
                // cached point inside the shared head.
                assert!(
                    resumed >= 1024,
                    "wave 1, prompt {i}: resumed past {resumed}"
                );
            }
        }
    }
    assert!(cached.stats().prefix_cache.hits >= 8);
}

/// Bytes of one entry: the state, the prefix's tokens and the tenant's name.
fn entry_bytes(model: &Model, prefix: usize, tenant: &str) -> usize {
    State::new(model).size_bytes() + 4 * prefix + tenant.len()
}

/// The entries never exceed the budget; past it the least recently used one goes; a state
/// larger than the budget is not kept at all.
#[test]
fn the_budget_holds_and_the_least_recently_used_entry_goes() {
    let (_dir, model) = tiny();
    let one = entry_bytes(&model, 200, "t");
    // Room for three entries, not four.
    let budget = 3 * one + one / 2;
    let cached = engine(&model, budget);
    let prompt = |i: u64| tokens(30 + i, 200);
    let ask = |i: u64| {
        let done = cached
            .complete(request("t", prompt(i), Target::Stateless, 1))
            .unwrap();
        let s = cached.stats().prefix_cache;
        assert!(s.bytes <= budget, "{s:?}");
        assert_eq!(s.bytes, s.entries * one, "{s:?}");
        done.usage.cached_tokens
    };
    for i in 0..3 {
        assert_eq!(ask(i), 0);
    }
    assert_eq!(cached.stats().prefix_cache.entries, 3);
    assert_eq!(
        ask(0),
        200,
        "A is cached; it becomes the most recently used"
    );
    assert_eq!(ask(3), 0, "D is new: B, the least recently used, goes");
    let s = cached.stats().prefix_cache;
    assert_eq!((s.entries, s.evictions), (3, 1));
    assert_eq!(ask(0), 200, "A stayed");
    assert_eq!(ask(3), 200, "D is cached");
    assert_eq!(ask(1), 0, "B was evicted; it comes back in place of C");
    assert_eq!(ask(2), 0, "C was evicted");
    assert_eq!(cached.stats().prefix_cache.evictions, 3);

    // A budget smaller than one state keeps nothing (and still answers the same).
    let tight = engine(&model, one - 1);
    let plain = engine(&model, 0);
    for _ in 0..2 {
        let a = tight
            .complete(request("t", prompt(0), Target::Stateless, 1))
            .unwrap();
        let b = plain
            .complete(request("t", prompt(0), Target::Stateless, 1))
            .unwrap();
        assert_eq!(a.usage.cached_tokens, 0);
        assert_eq!(outcome(&tight, "t", &a), outcome(&plain, "t", &b));
    }
    let s = tight.stats().prefix_cache;
    assert_eq!((s.entries, s.bytes, s.hits, s.misses), (0, 0, 0, 2));
}

/// One tenant's prompts never resume from another's states (a hit would show in timing and
/// `cached_tokens`).
#[test]
fn tenants_do_not_share_cached_states() {
    let (_dir, model) = tiny();
    let cached = engine(&model, 256 << 20);
    let prompt = tokens(40, 600);
    let ask = |tenant: &str| {
        cached
            .complete(request(tenant, prompt.clone(), Target::Stateless, 1))
            .unwrap()
            .usage
            .cached_tokens
    };
    assert_eq!(ask("alice"), 0);
    assert_eq!(ask("bob"), 0, "bob resumed from alice's state");
    assert_eq!(ask("alice"), 600);
    assert_eq!(ask("bob"), 600);
}
