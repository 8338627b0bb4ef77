//! Page records: what the source knows about each block's 4 KiB pages, so
//! that a block with a few changed pages ships as a delta chunk (those
//! pages and the id of a base chunk the target has) instead of whole.
//!
//! `state/ITEM/DISK.pages` holds one fixed-size record per block, at
//! `index * RECORD_LEN`, for the version of the block the source captured
//! last:
//!
//! ```text
//! hash  32   BLAKE3 of the block (its chunk id)
//! base  32   the full chunk the block's delta is against (= hash when whole)
//! mask   8   u64 LE: pages that differ from `base` (bit i = page i)
//! len    4   u32 LE: the block's length
//! fps  512   64 × u64 LE: xxh3 of each page (0 past the end)
//! ```
//!
//! Records are written when a block is captured, before its point is
//! acknowledged; a record is trusted only if its `hash` equals the block's
//! acknowledged hash, so a record ahead of the acknowledged state (a cycle
//! that failed or crashed) only makes the block ship whole. A page whose
//! fingerprint collides with its old one would be missed by a delta; the
//! rebuilt chunk then fails its hash check when read (never silently
//! wrong).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context;
use siterec_store::DELTA_PAGE;

/// Pages per block (blocks are at most this many pages long).
pub const PAGES: usize = 64;
/// A delta carries at most this many pages; more, and the block ships whole
/// (and becomes the base of its next deltas).
pub const MAX_DELTA_PAGES: u32 = 16;
const RECORD_LEN: usize = 32 + 32 + 8 + 4 + PAGES * 8;

/// One block's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub hash: [u8; 32],
    pub base: [u8; 32],
    pub mask: u64,
    pub len: u32,
    pub fps: [u64; PAGES],
}

/// How a changed block ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Whole,
    /// The pages in `mask`, against the full chunk `base`.
    Delta {
        base: [u8; 32],
        mask: u64,
    },
}

/// The page fingerprints of a block.
pub fn fingerprints(data: &[u8]) -> [u64; PAGES] {
    let mut fps = [0u64; PAGES];
    for (fp, page) in fps.iter_mut().zip(data.chunks(DELTA_PAGE)) {
        *fp = xxhash_rust::xxh3::xxh3_64(page);
    }
    fps
}

/// Decides how a changed block ships, and its new record. `acked` is the
/// block's acknowledged hash, `old` its record.
pub fn plan(
    acked: Option<&[u8; 32]>,
    old: Option<&Record>,
    hash: &[u8; 32],
    data: &[u8],
) -> (Plan, Record) {
    let fps = fingerprints(data);
    let len = data.len() as u32;
    let whole = Record {
        hash: *hash,
        base: *hash,
        mask: 0,
        len,
        fps,
    };
    let Some(old) =
        old.filter(|o| acked == Some(&o.hash) && o.len == len && data.len() <= PAGES * DELTA_PAGE)
    else {
        return (Plan::Whole, whole);
    };
    let mut changed = 0u64;
    for (i, (a, b)) in old.fps.iter().zip(&fps).enumerate() {
        if a != b {
            changed |= 1 << i;
        }
    }
    let mask = old.mask | changed;
    if mask == 0 || old.base == *hash || mask.count_ones() > MAX_DELTA_PAGES {
        return (Plan::Whole, whole);
    }
    (
        Plan::Delta {
            base: old.base,
            mask,
        },
        Record {
            base: old.base,
            mask,
            ..whole
        },
    )
}

/// For a full block of which only some pages will be read: the pages a
/// delta needs besides the rewritten ones (those that already differ from
/// the base), or `None` when no delta can be made (no trusted record).
pub fn delta_needs(acked: &[u8; 32], old: Option<&Record>) -> Option<u64> {
    old.filter(|o| &o.hash == acked && o.len as usize == PAGES * DELTA_PAGE)
        .map(|o| o.mask)
}

/// Plans a delta for a full block from the pages read (`read`: the
/// rewritten pages and those [`delta_needs`] named, with their current
/// content) and the block's new `hash`; `None` when it must ship whole.
pub fn plan_partial(
    old: &Record,
    hash: &[u8; 32],
    read: &[(u16, &[u8])],
) -> Option<(Plan, Record)> {
    let mut fps = old.fps;
    let mut changed = 0u64;
    let mut have = 0u64;
    for (i, page) in read {
        let i = usize::from(*i);
        if i >= PAGES {
            return None;
        }
        let fp = xxhash_rust::xxh3::xxh3_64(page);
        if fp != old.fps[i] {
            changed |= 1 << i;
        }
        fps[i] = fp;
        have |= 1 << i;
    }
    let mask = old.mask | changed;
    if mask == 0 || old.base == *hash || mask.count_ones() > MAX_DELTA_PAGES || mask & !have != 0 {
        return None;
    }
    Some((
        Plan::Delta {
            base: old.base,
            mask,
        },
        Record {
            hash: *hash,
            base: old.base,
            mask,
            len: old.len,
            fps,
        },
    ))
}

/// The pages of `data` selected by `mask`, as (index, bytes).
pub fn pages_of(data: &[u8], mask: u64) -> Vec<(u16, &[u8])> {
    data.chunks(DELTA_PAGE)
        .enumerate()
        .filter(|(i, _)| *i < PAGES && mask & (1 << i) != 0)
        .map(|(i, p)| (i as u16, p))
        .collect()
}

/// A disk's page record file.
pub struct PageRecords {
    file: File,
}

impl PageRecords {
    pub fn open(path: &Path) -> anyhow::Result<PageRecords> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(PageRecords { file })
    }

    /// Block `index`'s record, if there is one.
    pub fn read(&self, index: u64) -> Option<Record> {
        let mut buf = [0u8; RECORD_LEN];
        self.file
            .read_exact_at(&mut buf, index * RECORD_LEN as u64)
            .ok()?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&buf[..32]);
        if hash == [0u8; 32] {
            return None;
        }
        let mut base = [0u8; 32];
        base.copy_from_slice(&buf[32..64]);
        let mut word = [0u8; 8];
        word.copy_from_slice(&buf[64..72]);
        let mask = u64::from_le_bytes(word);
        let len = u32::from_le_bytes([buf[72], buf[73], buf[74], buf[75]]);
        let mut fps = [0u64; PAGES];
        for (fp, b) in fps.iter_mut().zip(buf[76..].chunks_exact(8)) {
            word.copy_from_slice(b);
            *fp = u64::from_le_bytes(word);
        }
        Some(Record {
            hash,
            base,
            mask,
            len,
            fps,
        })
    }

    /// Writes block `index`'s record (not synced: records are hints,
    /// checked against the acknowledged state before use).
    pub fn write(&self, index: u64, r: &Record) -> anyhow::Result<()> {
        let mut buf = [0u8; RECORD_LEN];
        buf[..32].copy_from_slice(&r.hash);
        buf[32..64].copy_from_slice(&r.base);
        buf[64..72].copy_from_slice(&r.mask.to_le_bytes());
        buf[72..76].copy_from_slice(&r.len.to_le_bytes());
        for (b, fp) in buf[76..].chunks_exact_mut(8).zip(&r.fps) {
            b.copy_from_slice(&fp.to_le_bytes());
        }
        self.file
            .write_all_at(&buf, index * RECORD_LEN as u64)
            .context("writing a page record")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u8) -> Vec<u8> {
        (0..PAGES * DELTA_PAGE)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn hash(d: &[u8]) -> [u8; 32] {
        *blake3::hash(d).as_bytes()
    }

    #[test]
    fn changed_pages_ship_as_deltas_against_the_last_whole_chunk() {
        let v1 = block(1);
        let h1 = hash(&v1);
        let (p, r1) = plan(None, None, &h1, &v1);
        assert_eq!(p, Plan::Whole);
        // Two pages change: a delta of two pages against v1.
        let mut v2 = v1.clone();
        v2[5 * DELTA_PAGE + 7] ^= 1;
        v2[63 * DELTA_PAGE] ^= 1;
        let h2 = hash(&v2);
        let (p, r2) = plan(Some(&h1), Some(&r1), &h2, &v2);
        assert_eq!(
            p,
            Plan::Delta {
                base: h1,
                mask: (1 << 5) | (1 << 63)
            }
        );
        assert_eq!(pages_of(&v2, (1 << 5) | (1 << 63)).len(), 2);
        // The next change accumulates against the same base.
        let mut v3 = v2.clone();
        v3[9 * DELTA_PAGE] ^= 1;
        let h3 = hash(&v3);
        let (p, r3) = plan(Some(&h2), Some(&r2), &h3, &v3);
        assert_eq!(
            p,
            Plan::Delta {
                base: h1,
                mask: (1 << 5) | (1 << 9) | (1 << 63)
            }
        );
        // A record ahead of the acknowledged state is not trusted.
        assert_eq!(plan(Some(&h1), Some(&r3), &h3, &v3).0, Plan::Whole);
        // Too many pages: whole, and a new base.
        let mut v4 = v3.clone();
        for p in 20..40 {
            v4[p * DELTA_PAGE] ^= 1;
        }
        let h4 = hash(&v4);
        let (p, r4) = plan(Some(&h3), Some(&r3), &h4, &v4);
        assert_eq!(p, Plan::Whole);
        assert_eq!((r4.base, r4.mask), (h4, 0));
    }

    #[test]
    fn records_round_trip_and_missing_ones_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let recs = PageRecords::open(&dir.path().join("d.pages")).unwrap();
        assert!(recs.read(3).is_none());
        let v = block(7);
        let (_, r) = plan(None, None, &hash(&v), &v);
        recs.write(3, &r).unwrap();
        assert_eq!(recs.read(3), Some(r));
        assert!(recs.read(0).is_none(), "a hole reads as no record");
        assert!(recs.read(4).is_none());
    }
}
