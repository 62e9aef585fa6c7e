//! A sorted set that also answers "how many keys are smaller than this one" without walking
//! the set: the wait queue needs a waiter's rank within its member's queue for positions,
//! and a mass rebuild puts tens of thousands of waiters into one member's queue.
//!
//! Square-root decomposition: the keys live in sorted chunks of at most `2 * CHUNK` keys.
//! Insert and remove touch one chunk (`O(log n + CHUNK)`); a rank sums the lengths of the
//! chunks before the key's own (`O(n / CHUNK + log n)`): about 200 additions for 100,000
//! keys. Simpler than a balanced order-statistics tree, and fast enough by a wide margin.

/// Target chunk length; a chunk is split when it grows past twice this.
const CHUNK: usize = 256;

/// A set of `K` in ascending order, with ranks.
#[derive(Clone, Debug)]
pub(super) struct Ranked<K> {
    /// Non-empty sorted chunks; every key of a chunk is below every key of the next one.
    chunks: Vec<Vec<K>>,
    len: usize,
}

impl<K> Default for Ranked<K> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Copy> Ranked<K> {
    /// How many keys.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk where `k` is or would go: the first whose last key is at least `k`, or the
    /// last chunk.
    fn chunk_of(&self, k: &K) -> usize {
        let i = self
            .chunks
            .partition_point(|c| c.last().is_some_and(|last| last < k));
        i.min(self.chunks.len().saturating_sub(1))
    }

    /// Adds `k`; returns whether it was new.
    pub(super) fn insert(&mut self, k: K) -> bool {
        if self.chunks.is_empty() {
            self.chunks.push(vec![k]);
            self.len = 1;
            return true;
        }
        let i = self.chunk_of(&k);
        let chunk = &mut self.chunks[i];
        let Err(at) = chunk.binary_search(&k) else {
            return false;
        };
        chunk.insert(at, k);
        self.len += 1;
        if chunk.len() > 2 * CHUNK {
            let tail = chunk.split_off(CHUNK);
            self.chunks.insert(i + 1, tail);
        }
        true
    }

    /// Removes `k`; returns whether it was there.
    pub(super) fn remove(&mut self, k: &K) -> bool {
        if self.chunks.is_empty() {
            return false;
        }
        let i = self.chunk_of(k);
        let chunk = &mut self.chunks[i];
        let Ok(at) = chunk.binary_search(k) else {
            return false;
        };
        chunk.remove(at);
        self.len -= 1;
        if chunk.is_empty() {
            self.chunks.remove(i);
        }
        true
    }

    /// How many keys are smaller than `k` (its 0-based rank when present).
    pub(super) fn rank(&self, k: &K) -> usize {
        if self.chunks.is_empty() {
            return 0;
        }
        let i = self.chunk_of(k);
        let before: usize = self.chunks[..i].iter().map(Vec::len).sum();
        before + self.chunks[i].partition_point(|x| x < k)
    }

    /// The smallest key.
    #[cfg(test)]
    pub(super) fn first(&self) -> Option<K> {
        self.chunks.first().and_then(|c| c.first()).copied()
    }

    /// Every key, ascending.
    pub(super) fn iter(&self) -> impl Iterator<Item = K> + '_ {
        self.chunks.iter().flatten().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against `BTreeSet` as the model: the same members, the same order, and every rank
        /// equals the count of smaller keys, across splits and emptied chunks.
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec((any::<bool>(), 0u32..2000), 1..3000)) {
            let mut r = Ranked::default();
            let mut m = BTreeSet::new();
            for (insert, k) in ops {
                if insert {
                    prop_assert_eq!(r.insert(k), m.insert(k));
                } else {
                    prop_assert_eq!(r.remove(&k), m.remove(&k));
                }
                prop_assert_eq!(r.len(), m.len());
                prop_assert_eq!(r.first(), m.first().copied());
                prop_assert_eq!(r.rank(&k), m.range(..k).count());
            }
            prop_assert!(r.iter().eq(m.iter().copied()));
        }
    }
}
