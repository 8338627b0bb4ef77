//! A map from 32-byte keys to small values that costs little more than its
//! entries: a sorted array, plus a hash table of the changes since it was
//! last rebuilt.
//!
//! The packs of a local store find their objects through it: a store holds
//! millions of chunks, and a `HashMap` of them costs its entries twice over
//! at worst (its table doubles when it grows, and each slot carries a
//! control byte). Here the array holds each live entry once (48 bytes with
//! the packs' 16-byte locations); inserts and removals go to the change
//! table first, which is merged into the array, in place, when it reaches
//! an eighth of it.

use std::collections::HashMap;

/// Changes kept before a merge, at least.
const MIN_CHANGES: usize = 4096;

pub(crate) struct KeyIndex<V> {
    /// Sorted by key, keys unique. Entries changed since the last merge
    /// are superseded by `changes`.
    main: Vec<([u8; 32], V)>,
    /// Since the last merge: `Some` inserted or replaced, `None` removed
    /// (only for keys in `main`).
    changes: HashMap<[u8; 32], Option<V>>,
    len: usize,
}

impl<V: Copy> Default for KeyIndex<V> {
    fn default() -> Self {
        KeyIndex {
            main: Vec::new(),
            changes: HashMap::new(),
            len: 0,
        }
    }
}

impl<V: Copy> KeyIndex<V> {
    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn in_main(&self, key: &[u8; 32]) -> Option<V> {
        self.main
            .binary_search_by(|(k, _)| k.cmp(key))
            .ok()
            .map(|i| self.main[i].1)
    }

    pub(crate) fn get(&self, key: &[u8; 32]) -> Option<V> {
        match self.changes.get(key) {
            Some(change) => *change,
            None => self.in_main(key),
        }
    }

    pub(crate) fn contains_key(&self, key: &[u8; 32]) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub(crate) fn insert(&mut self, key: [u8; 32], value: V) -> Option<V> {
        let old = self.get(&key);
        self.changes.insert(key, Some(value));
        if old.is_none() {
            self.len += 1;
        }
        self.maybe_merge();
        old
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8; 32]) -> Option<V> {
        let old = self.get(key)?;
        if self.in_main(key).is_some() {
            self.changes.insert(*key, None);
        } else {
            self.changes.remove(key);
        }
        self.len -= 1;
        self.maybe_merge();
        Some(old)
    }

    /// Calls `f` on every entry (in no particular order).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&[u8; 32], V)) {
        for (k, v) in &self.main {
            if !self.changes.contains_key(k) {
                f(k, *v);
            }
        }
        for (k, v) in &self.changes {
            if let Some(v) = v {
                f(k, *v);
            }
        }
    }

    fn maybe_merge(&mut self) {
        if self.changes.len() >= MIN_CHANGES.max(self.main.len() / 8) {
            self.merge();
        }
    }

    /// Folds the changes into the sorted array, in place: replacements
    /// where the keys lie, removals by one pass, then the new keys merged
    /// in from the end.
    fn merge(&mut self) {
        let mut added: Vec<([u8; 32], V)> = Vec::new();
        let mut doomed: Vec<usize> = Vec::new();
        for (k, change) in self.changes.drain() {
            match (self.main.binary_search_by(|(m, _)| m.cmp(&k)), change) {
                (Ok(i), Some(v)) => self.main[i].1 = v,
                (Ok(i), None) => doomed.push(i),
                (Err(_), Some(v)) => added.push((k, v)),
                (Err(_), None) => {}
            }
        }
        if !doomed.is_empty() {
            doomed.sort_unstable();
            let (mut next, mut at) = (0, 0);
            self.main.retain(|_| {
                let drop = doomed.get(next) == Some(&at);
                next += usize::from(drop);
                at += 1;
                !drop
            });
        }
        added.sort_unstable_by_key(|e| e.0);
        let old = self.main.len();
        self.main.reserve_exact(added.len());
        self.main.extend_from_slice(&added);
        // Merge main[..old] and `added` from the back into main.
        let (mut i, mut j, mut w) = (old, added.len(), old + added.len());
        while j > 0 {
            w -= 1;
            if i > 0 && self.main[i - 1].0 > added[j - 1].0 {
                self.main[w] = self.main[i - 1];
                i -= 1;
            } else {
                self.main[w] = added[j - 1];
                j -= 1;
            }
        }
        debug_assert_eq!(self.main.len(), self.len);
    }

    /// Merges now (tests).
    #[cfg(test)]
    fn merge_now(&mut self) {
        self.merge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn key(i: u32) -> [u8; 32] {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    /// Random inserts, replacements and removals agree with a HashMap at
    /// every step, across many merges.
    #[test]
    fn behaves_as_a_map() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ix: KeyIndex<u64> = KeyIndex::default();
        let mut model: HashMap<[u8; 32], u64> = HashMap::new();
        for step in 0..60_000u64 {
            let k = key(rng.random_range(0..20_000));
            match rng.random_range(0..10) {
                0..=5 => assert_eq!(ix.insert(k, step), model.insert(k, step)),
                6..=8 => assert_eq!(ix.remove(&k), model.remove(&k)),
                _ => assert_eq!(ix.get(&k), model.get(&k).copied()),
            }
            assert_eq!(ix.len(), model.len());
            if step % 9_999 == 0 {
                let mut all = Vec::new();
                ix.for_each(|k, v| all.push((*k, v)));
                all.sort_unstable();
                let mut want: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
                want.sort_unstable();
                assert_eq!(all, want);
            }
        }
        ix.merge_now();
        assert!(ix.changes.is_empty());
        assert!(ix.main.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(ix.main.len(), model.len());
        for (k, v) in &model {
            assert_eq!(ix.get(k), Some(*v));
        }
    }

    /// After a merge the array holds each entry once, and no more room
    /// than the entries need.
    #[test]
    fn holds_its_entries_once() {
        let mut ix: KeyIndex<[u8; 16]> = KeyIndex::default();
        for i in 0..100_000 {
            ix.insert(key(i), [0; 16]);
        }
        ix.merge_now();
        assert_eq!(ix.main.len(), 100_000);
        assert!(ix.main.capacity() <= 100_000 + 100_000 / 8 + MIN_CHANGES);
        assert_eq!(std::mem::size_of::<([u8; 32], [u8; 16])>(), 48);
    }
}
