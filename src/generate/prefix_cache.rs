//! Prompt prefixes kept between requests: the KV of blocks of prompt tokens, so that a request
//! that starts like an earlier one (every chat request starts with its template's head) prefills
//! only what differs.
//!
//! A prompt is cut into blocks of [`BLOCK`] tokens. Block `i`'s key is the sha256 of block
//! `i - 1`'s key and block `i`'s tokens, and block 0's starts from the steering's prompt
//! fingerprint ([`ResolvedSteering::prompt_fingerprint`]): a block is reused only after the same
//! tokens, from the start, under steering that does the same to prompt positions. Blocks are
//! evicted least recently used beyond a memory budget.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::steer::ResolvedSteering;

/// Tokens per cached block.
pub const BLOCK: usize = 32;

/// A block's key: its tokens and everything before them, under one steering fingerprint.
pub type BlockKey = [u8; 32];

/// How the prefix cache has done, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens of the requests that could reuse a prefix.
    pub lookup_tokens: u64,
    /// Of those, tokens whose KV came from the cache instead of a prefill.
    pub hit_tokens: u64,
    /// Blocks held.
    pub blocks: usize,
    /// Bytes they hold.
    pub bytes: usize,
}

struct Entry {
    kv: Vec<u8>,
    used_at: u64,
}

/// Blocks of prompt KV by [`BlockKey`], within a byte budget; see the module docs.
pub struct PrefixCache {
    budget: usize,
    entries: HashMap<BlockKey, Entry>,
    clock: u64,
    stats: PrefixStats,
}

/// The fingerprint a row's steering gives its prompt positions (unsteered rows and steering of
/// generated positions only share one); `None`: its prompt KV cannot be shared.
pub fn prompt_fingerprint(steering: &Option<Arc<ResolvedSteering>>) -> Option<[u8; 32]> {
    match steering {
        Some(steering) => steering.prompt_fingerprint(),
        None => ResolvedSteering::default().prompt_fingerprint(),
    }
}

/// The keys of the whole blocks of `ids` under `fingerprint`, in order.
pub fn block_keys(fingerprint: &[u8; 32], ids: &[u32]) -> Vec<BlockKey> {
    let mut previous = *fingerprint;
    ids.chunks_exact(BLOCK)
        .map(|block| {
            let mut digest = Sha256::new();
            digest.update(previous);
            for id in block {
                digest.update(id.to_le_bytes());
            }
            previous = digest.finalize().into();
            previous
        })
        .collect()
}

impl PrefixCache {
    /// An empty cache that holds at most `budget` bytes of blocks.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: HashMap::new(),
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    /// How many leading blocks of a prompt of `tokens` tokens with `keys` are cached, leaving at
    /// least its last token to prefill (its logits choose the first new token). Counts the
    /// lookup in the stats and marks the blocks used.
    pub fn matched(&mut self, keys: &[BlockKey], tokens: usize) -> usize {
        self.clock += 1;
        let most = tokens.saturating_sub(1) / BLOCK;
        let mut matched = 0;
        for key in keys.iter().take(most) {
            match self.entries.get_mut(key) {
                Some(entry) => entry.used_at = self.clock,
                None => break,
            }
            matched += 1;
        }
        self.stats.lookup_tokens += tokens as u64;
        self.stats.hit_tokens += (matched * BLOCK) as u64;
        matched
    }

    /// The KV of the block `key`, if held.
    pub fn block(&self, key: &BlockKey) -> Option<&[u8]> {
        self.entries.get(key).map(|entry| entry.kv.as_slice())
    }

    /// True if the block `key` is held.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Keep `kv` as the block `key`, evicting the least recently used blocks to stay within the
    /// budget (a block larger than the budget is not kept).
    pub fn insert(&mut self, key: BlockKey, kv: Vec<u8>) {
        if kv.len() > self.budget || self.entries.contains_key(&key) {
            return;
        }
        while self.stats.bytes + kv.len() > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.used_at)
                .map(|(key, _)| *key)
            else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.stats.bytes -= entry.kv.len();
            }
        }
        self.clock += 1;
        self.stats.bytes += kv.len();
        self.entries.insert(
            key,
            Entry {
                kv,
                used_at: self.clock,
            },
        );
        self.stats.blocks = self.entries.len();
    }

    /// Lookups, hits and memory so far.
    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            blocks: self.entries.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, offset: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i + offset).collect()
    }

    #[test]
    fn a_block_key_depends_on_everything_before_it_and_on_the_steering() {
        let unsteered = prompt_fingerprint(&None).unwrap();
        let a = block_keys(&unsteered, &ids(3 * BLOCK + 5, 0));
        assert_eq!(a.len(), 3, "only whole blocks have keys");
        let mut other = ids(3 * BLOCK, 0);
        other[0] = 999;
        let b = block_keys(&unsteered, &other);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "a change in block 0 changes every key"
        );
        let steered = block_keys(&[7; 32], &ids(3 * BLOCK, 0));
        assert_ne!(a[0], steered[0]);
        assert_eq!(a, block_keys(&unsteered, &ids(3 * BLOCK + 9, 0))[..3]);
    }

    #[test]
    fn matching_leaves_the_last_token_and_stops_at_the_first_missing_block() {
        let keys = block_keys(&[0; 32], &ids(4 * BLOCK, 0));
        let mut cache = PrefixCache::new(1 << 20);
        for key in &keys[..2] {
            cache.insert(*key, vec![1; 10]);
        }
        cache.insert(keys[3], vec![1; 10]);
        assert_eq!(cache.matched(&keys, 4 * BLOCK), 2, "block 2 is missing");
        assert_eq!(
            cache.matched(&keys[..2], 2 * BLOCK),
            1,
            "the last token is run"
        );
        let stats = cache.stats();
        assert_eq!(
            (stats.lookup_tokens, stats.hit_tokens),
            (6 * BLOCK as u64, 3 * BLOCK as u64)
        );
        assert_eq!((stats.blocks, stats.bytes), (3, 30));
    }

    #[test]
    fn the_least_recently_used_block_goes_first() {
        let keys = block_keys(&[0; 32], &ids(3 * BLOCK, 0));
        let mut cache = PrefixCache::new(20);
        cache.insert(keys[0], vec![0; 10]);
        cache.insert(keys[1], vec![1; 10]);
        assert_eq!(
            cache.matched(&keys[..1], BLOCK + 1),
            1,
            "block 0 used again"
        );
        cache.insert(keys[2], vec![2; 10]);
        assert!(cache.contains(&keys[0]) && !cache.contains(&keys[1]) && cache.contains(&keys[2]));
        cache.insert(keys[1], vec![9; 30]);
        assert!(
            !cache.contains(&keys[1]),
            "larger than the budget: not kept"
        );
        assert_eq!(cache.stats().bytes, 20);
    }
}
