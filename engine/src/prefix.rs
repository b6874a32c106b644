//! The prefix-state cache: states at slice boundaries of recent prompts, so that a prompt
//! sharing a head with an earlier one resumes from there instead of ingesting it again.
//!
//! The scheduler ingests a prompt in slices whose ends [`Model::prefill_slice_end`] picks
//! ([`slice_points`]). Every end below the prompt's length is *canonical*: it depends only on
//! the end before it (and the engine's slice size and the model's row block), never on the
//! prompt's length or tokens; only the last piece may run past a canonical end to the
//! prompt's own end (a short remainder joins the piece before it). So two prompts whose
//! slicings both pass through a point `p`, with the same first `p` tokens, reach `p` by the
//! same prefill calls on the same tokens and hold bit for bit the same state there; from
//! `p` on each continues with its own slices, which depend only on `p` and its own length.
//! Resuming a prompt at a cached point of its own slicing therefore leaves exactly the state,
//! logits and output that ingesting it whole leaves.
//!
//! An entry is one state (its size fixed by the model, whatever the prefix length) and the
//! prefix's tokens, for the full compare that follows a hash match. Entries are keyed by
//! tenant: a hit is visible in a request's timing and in `cached_tokens`, so a shared cache
//! would tell one tenant whether another had sent a given text. The entries together stay
//! within a byte budget; past it the least recently used go.
//!
//! Which boundaries a prompt leaves ([`kept_points`]): its last three and those at a power
//! of two count of slices. The last ones serve a prompt re-sent with a different or longer
//! ending (a question after a shared document, a conversation re-sent with one more turn);
//! the powers of two serve a shared head of any length, resuming at least half-way into it,
//! at a cost of `3 + log2(slices)` states per prompt rather than one per slice (a state is
//! megabytes: one per slice of a long prompt would fill the budget with points few later
//! prompts share).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};

use performer::{Model, State};

/// How many of a prompt's last slice boundaries it leaves in the cache.
const LAST_POINTS: usize = 3;

/// Counts of the prefix cache, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// States cached.
    pub entries: usize,
    /// Bytes of the entries (states and prefix tokens); at most the budget.
    pub bytes: usize,
    /// The budget ([`crate::EngineConfig::prefix_cache_memory`]; 0: disabled).
    pub budget: usize,
    /// Prompts that resumed from a cached state.
    pub hits: u64,
    /// Prompts looked up without a cached state to resume from.
    pub misses: u64,
    /// Prompt tokens not ingested because a cached state held them.
    pub cached_tokens: u64,
    /// Entries dropped to stay within the budget.
    pub evictions: u64,
}

/// Where the scheduler ingests a prompt of `len` tokens in slices of about `max` tokens:
/// every slice's end, ascending, the last being `len` (empty for an empty prompt).
pub(crate) fn slice_points(model: &Model, len: usize, max: usize) -> Vec<usize> {
    let mut points = Vec::new();
    let mut done = 0;
    while done < len {
        done = model.prefill_slice_end(done, len, max);
        points.push(done);
    }
    points
}

/// The points of a prompt's slicing ([`slice_points`]) whose states the cache keeps: the
/// last [`LAST_POINTS`] and the `i`-th for every power of two `i` (1-based).
pub(crate) fn kept_points(points: &[usize]) -> Vec<usize> {
    let n = points.len();
    points
        .iter()
        .enumerate()
        .filter(|&(i, _)| (i + 1).is_power_of_two() || i + LAST_POINTS >= n)
        .map(|(_, &p)| p)
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tenant: String,
    len: usize,
    hash: u64,
}

struct Entry {
    /// The prefix, compared in full on a hash match.
    tokens: Vec<u32>,
    state: State,
    bytes: usize,
    /// Logical clock of the last use (the key of `lru`).
    tick: u64,
}

/// What a prompt gets from the cache: the state to start from (a fresh one on a miss) and
/// where to take snapshots on the way.
pub(crate) struct Plan {
    /// Prompt tokens the state already holds (0 on a miss).
    pub(crate) cached: usize,
    /// The cached state at `cached` (`None` on a miss).
    pub(crate) state: Option<State>,
    /// Points past `cached` to leave in the cache, ascending, with the hashes of the prefixes
    /// they end.
    pub(crate) store: Vec<(usize, u64)>,
}

/// The cache (owned by the engine, used by the scheduler thread).
pub(crate) struct PrefixCache {
    budget: usize,
    map: HashMap<Key, Entry>,
    /// Keys by last use, oldest first.
    lru: BTreeMap<u64, Key>,
    clock: u64,
    /// Randomly keyed per engine: prefixes that collide cannot be chosen in advance (a
    /// collision would only cost a miss, after the full compare).
    hasher: RandomState,
    stats: PrefixCacheStats,
}

impl PrefixCache {
    /// An empty cache of `budget` bytes (0: disabled).
    pub(crate) fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            map: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            hasher: RandomState::new(),
            stats: PrefixCacheStats {
                budget,
                ..PrefixCacheStats::default()
            },
        }
    }

    /// Whether prompts are looked up at all.
    pub(crate) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// The counts.
    pub(crate) fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// The hash of `tokens[..p]` for every point `p` (ascending), in one pass.
    fn hashes(&self, tokens: &[u32], points: &[usize]) -> Vec<u64> {
        let mut h = self.hasher.build_hasher();
        let mut done = 0;
        points
            .iter()
            .map(|&p| {
                for &t in &tokens[done..p] {
                    h.write_u32(t);
                }
                done = p;
                h.finish()
            })
            .collect()
    }

    fn touch(&mut self, key: &Key) {
        if let Some(e) = self.map.get_mut(key) {
            self.lru.remove(&e.tick);
            self.clock += 1;
            e.tick = self.clock;
            self.lru.insert(self.clock, key.clone());
        }
    }

    /// Looks `prompt` (sliced at `points`, see [`slice_points`]) up for `tenant`: the longest
    /// cached point of its slicing whose prefix matches in full, and the kept points past it.
    /// Counts a hit or a miss. The entry used, and the cached points before it (the shared
    /// head it extends), become the most recently used.
    pub(crate) fn plan(&mut self, tenant: &str, prompt: &[u32], points: &[usize]) -> Plan {
        let hashes = self.hashes(prompt, points);
        let key = |i: usize| Key {
            tenant: tenant.to_string(),
            len: points[i],
            hash: hashes[i],
        };
        let mut hit = None;
        for i in (0..points.len()).rev() {
            let k = key(i);
            if let Some(e) = self.map.get(&k) {
                if e.tokens[..] == prompt[..points[i]] {
                    hit = Some((i, e.state.clone()));
                    break;
                }
            }
        }
        let (cached, state) = match hit {
            Some((i, state)) => {
                for j in 0..i {
                    self.touch(&key(j));
                }
                self.touch(&key(i));
                self.stats.hits += 1;
                self.stats.cached_tokens += points[i] as u64;
                (points[i], Some(state))
            }
            None => {
                self.stats.misses += 1;
                (0, None)
            }
        };
        let kept = kept_points(points);
        let store = points
            .iter()
            .zip(&hashes)
            .filter(|&(&p, _)| p > cached && kept.binary_search(&p).is_ok())
            .map(|(&p, &h)| (p, h))
            .collect();
        Plan {
            cached,
            state,
            store,
        }
    }

    /// Keeps a copy of `state`, which has ingested exactly `prefix` (whose hash, as
    /// [`PrefixCache::plan`] computed it, is `hash`), evicting the least recently used entries
    /// to stay within the budget. An entry already there is only marked used; a state larger
    /// than the whole budget is not kept.
    pub(crate) fn insert(&mut self, tenant: &str, prefix: &[u32], hash: u64, state: &State) {
        if !self.enabled() {
            return;
        }
        let key = Key {
            tenant: tenant.to_string(),
            len: prefix.len(),
            hash,
        };
        if self.map.get(&key).is_some_and(|e| e.tokens[..] == *prefix) {
            self.touch(&key);
            return;
        }
        if let Some(old) = self.map.remove(&key) {
            // A colliding prefix: the newer one takes the key.
            self.lru.remove(&old.tick);
            self.stats.bytes -= old.bytes;
            self.stats.entries -= 1;
        }
        let bytes = state.size_bytes() + std::mem::size_of_val(prefix) + key.tenant.len();
        if bytes > self.budget {
            return;
        }
        while self.stats.bytes + bytes > self.budget {
            let Some((_, oldest)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&oldest) {
                self.stats.bytes -= e.bytes;
                self.stats.entries -= 1;
                self.stats.evictions += 1;
            }
        }
        self.clock += 1;
        self.lru.insert(self.clock, key.clone());
        self.map.insert(
            key,
            Entry {
                tokens: prefix.to_vec(),
                state: state.fork(),
                bytes,
                tick: self.clock,
            },
        );
        self.stats.bytes += bytes;
        self.stats.entries += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::kept_points;

    #[test]
    fn kept_points_are_the_last_three_and_the_powers_of_two() {
        let points: Vec<usize> = (1..=17).map(|i| i * 256).collect();
        assert_eq!(
            kept_points(&points),
            [256, 512, 1024, 2048, 3840, 4096, 4352]
        );
        assert_eq!(kept_points(&[300]), [300]);
        assert_eq!(kept_points(&[256, 512, 600]), [256, 512, 600]);
        assert!(kept_points(&[]).is_empty());
    }
}
