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
//! mask  32   4 × u64 LE: pages that differ from `base` (bit i of
//!            word i / 64 = page i)
//! len    4   u32 LE: the block's length
//! fps 2048   256 × u64 LE: xxh3 of each page (0 past the end)
//! ```
//!
//! (Blocks were 256 KiB — 64 pages, an 8-byte mask — before version 3 of
//! the block hash state; that state names its block size, and a state of
//! another size is not used, so no record of the old layout is trusted:
//! a record is only used when its `hash` is the block's acknowledged one.)
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
pub use crate::limits::PAGES;
/// A delta carries at most this many pages (a quarter of a block); more,
/// and the block ships whole (and becomes the base of its next deltas).
pub const MAX_DELTA_PAGES: u32 = (PAGES / 4) as u32;
const _: () = assert!(DELTA_PAGE == siterec_drivers::capture::FINGERPRINT_PAGE);
const MASK_WORDS: usize = PAGES / 64;
const LEN_AT: usize = 64 + MASK_WORDS * 8;
const FPS_AT: usize = LEN_AT + 4;
const RECORD_LEN: usize = FPS_AT + PAGES * 8;

/// A set of a block's pages (bit i = page i).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageMask([u64; MASK_WORDS]);

impl PageMask {
    /// No page.
    pub const EMPTY: PageMask = PageMask([0; MASK_WORDS]);
    /// Every page.
    pub const ALL: PageMask = PageMask([u64::MAX; MASK_WORDS]);

    /// The pages `first..=last` (indexes below [`PAGES`]).
    pub fn range(first: usize, last: usize) -> PageMask {
        let mut m = PageMask::EMPTY;
        for p in first..=last.min(PAGES - 1) {
            m.insert(p);
        }
        m
    }

    /// Adds page `i` (ignored past the block).
    pub fn insert(&mut self, i: usize) {
        if i < PAGES {
            self.0[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether page `i` is in the set.
    pub fn contains(&self, i: usize) -> bool {
        i < PAGES && self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// How many pages are in the set.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Pages in `self` but not in `other`.
    pub fn without(&self, other: &PageMask) -> PageMask {
        let mut m = *self;
        for (a, b) in m.0.iter_mut().zip(&other.0) {
            *a &= !b;
        }
        m
    }

    /// The page indexes in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..PAGES).filter(|i| self.contains(*i))
    }
}

impl std::ops::BitOr for PageMask {
    type Output = PageMask;
    fn bitor(mut self, rhs: PageMask) -> PageMask {
        self |= rhs;
        self
    }
}

impl std::ops::BitOrAssign for PageMask {
    fn bitor_assign(&mut self, rhs: PageMask) {
        for (a, b) in self.0.iter_mut().zip(&rhs.0) {
            *a |= b;
        }
    }
}

impl FromIterator<usize> for PageMask {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> PageMask {
        let mut m = PageMask::EMPTY;
        for i in iter {
            m.insert(i);
        }
        m
    }
}

/// One block's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub hash: [u8; 32],
    pub base: [u8; 32],
    pub mask: PageMask,
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
        mask: PageMask,
    },
}

/// The page fingerprints of a block: `known` if the scan computed them
/// (one per page), else computed here.
pub fn fingerprints(data: &[u8], known: &[u64]) -> [u64; PAGES] {
    let mut fps = [0u64; PAGES];
    if known.len() == data.len().div_ceil(DELTA_PAGE) && known.len() <= PAGES {
        fps[..known.len()].copy_from_slice(known);
    } else {
        siterec_drivers::capture::page_fingerprints(data, &mut fps);
    }
    fps
}

/// Decides how a changed block ships, and its new record. `acked` is the
/// block's acknowledged hash, `old` its record, `known_fps` the block's
/// page fingerprints if the scan computed them (else empty).
pub fn plan(
    acked: Option<&[u8; 32]>,
    old: Option<&Record>,
    hash: &[u8; 32],
    data: &[u8],
    known_fps: &[u64],
) -> (Plan, Record) {
    let fps = fingerprints(data, known_fps);
    let len = data.len() as u32;
    let whole = Record {
        hash: *hash,
        base: *hash,
        mask: PageMask::EMPTY,
        len,
        fps,
    };
    let Some(old) =
        old.filter(|o| acked == Some(&o.hash) && o.len == len && data.len() <= PAGES * DELTA_PAGE)
    else {
        return on_zeros(data, whole);
    };
    let changed: PageMask = (old.fps.iter().zip(&fps).enumerate())
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    let mask = old.mask | changed;
    if mask.is_empty() || old.base == *hash {
        return (Plan::Whole, whole);
    }
    if mask.count() > MAX_DELTA_PAGES {
        return on_zeros(data, whole);
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

/// A block with no usable delta base: as a delta on zeros
/// ([`siterec_store::ZERO_BASE`]) when all but a few of its pages are zeros
/// (found exactly, page by page: a reader rebuilds the block from just
/// those pages), else whole. A block that was zeros before and took a few
/// writes costs those pages, not a megabyte to compress and check.
fn on_zeros(data: &[u8], whole: Record) -> (Plan, Record) {
    if data.len() > PAGES * DELTA_PAGE {
        return (Plan::Whole, whole);
    }
    let mut mask = PageMask::EMPTY;
    for (i, page) in data.chunks(DELTA_PAGE).enumerate() {
        if !siterec_store::is_all_zero(page) {
            mask.insert(i);
            // Most blocks stop here after a few dozen pages (each test
            // stops at its first non-zero byte).
            if mask.count() > MAX_DELTA_PAGES {
                return (Plan::Whole, whole);
            }
        }
    }
    if mask.is_empty() {
        // All zeros: the scan does not ship such a block at all.
        return (Plan::Whole, whole);
    }
    let base = siterec_store::ZERO_BASE.0;
    (
        Plan::Delta { base, mask },
        Record {
            base,
            mask,
            ..whole
        },
    )
}

/// For a full block of which only some pages will be read: the pages a
/// delta needs besides the rewritten ones (those that already differ from
/// the base), or `None` when no delta can be made (no trusted record).
pub fn delta_needs(acked: &[u8; 32], old: Option<&Record>) -> Option<PageMask> {
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
    let mut changed = PageMask::EMPTY;
    let mut have = PageMask::EMPTY;
    for (i, page) in read {
        let i = usize::from(*i);
        if i >= PAGES {
            return None;
        }
        let fp = siterec_drivers::capture::page_fingerprint(page);
        if fp != old.fps[i] {
            changed.insert(i);
        }
        fps[i] = fp;
        have.insert(i);
    }
    let mask = old.mask | changed;
    if mask.is_empty()
        || old.base == *hash
        || mask.count() > MAX_DELTA_PAGES
        || !mask.without(&have).is_empty()
    {
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
pub fn pages_of(data: &[u8], mask: PageMask) -> Vec<(u16, &[u8])> {
    data.chunks(DELTA_PAGE)
        .enumerate()
        .filter(|(i, _)| mask.contains(*i))
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
        let mut mask = PageMask::EMPTY;
        for (w, b) in mask.0.iter_mut().zip(buf[64..LEN_AT].chunks_exact(8)) {
            word.copy_from_slice(b);
            *w = u64::from_le_bytes(word);
        }
        let len = u32::from_le_bytes([
            buf[LEN_AT],
            buf[LEN_AT + 1],
            buf[LEN_AT + 2],
            buf[LEN_AT + 3],
        ]);
        let mut fps = [0u64; PAGES];
        for (fp, b) in fps.iter_mut().zip(buf[FPS_AT..].chunks_exact(8)) {
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
        for (b, w) in buf[64..LEN_AT].chunks_exact_mut(8).zip(&r.mask.0) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        buf[LEN_AT..FPS_AT].copy_from_slice(&r.len.to_le_bytes());
        for (b, fp) in buf[FPS_AT..].chunks_exact_mut(8).zip(&r.fps) {
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
    fn a_block_of_zeros_but_a_few_pages_ships_as_a_delta_on_zeros() {
        let zero = siterec_store::ZERO_BASE.0;
        let mut v1 = vec![0u8; PAGES * DELTA_PAGE];
        v1[3 * DELTA_PAGE + 100] = 7;
        v1[200 * DELTA_PAGE + DELTA_PAGE - 1] = 9;
        let h1 = hash(&v1);
        // No record, or one not acknowledged: the non-zero pages, on zeros.
        let (p, r1) = plan(None, None, &h1, &v1, &[]);
        assert_eq!(
            p,
            Plan::Delta {
                base: zero,
                mask: [3, 200].into_iter().collect()
            }
        );
        assert_eq!((r1.base, r1.hash), (zero, h1));
        // The next change accumulates on zeros, as on any base; a page
        // written back to zeros stays in the delta.
        let mut v2 = v1.clone();
        v2[3 * DELTA_PAGE + 100] = 0;
        v2[10 * DELTA_PAGE] = 1;
        let h2 = hash(&v2);
        let (p, r2) = plan(Some(&h1), Some(&r1), &h2, &v2, &[]);
        assert_eq!(
            p,
            Plan::Delta {
                base: zero,
                mask: [3, 10, 200].into_iter().collect()
            }
        );
        assert_eq!(r2.base, zero);
        // Past a quarter of the pages: whole.
        let mut full = vec![0u8; PAGES * DELTA_PAGE];
        for i in 0..=MAX_DELTA_PAGES as usize {
            full[i * DELTA_PAGE + 1] = 1;
        }
        assert_eq!(plan(None, None, &hash(&full), &full, &[]).0, Plan::Whole);
        // A page is zero only if every byte is, whatever its fingerprint.
        let mut last = vec![0u8; PAGES * DELTA_PAGE];
        last[PAGES * DELTA_PAGE - 1] = 1;
        assert_eq!(
            plan(None, None, &hash(&last), &last, &[]).0,
            Plan::Delta {
                base: zero,
                mask: [PAGES - 1].into_iter().collect()
            }
        );
        // Data everywhere: whole.
        let v = block(4);
        assert_eq!(plan(None, None, &hash(&v), &v, &[]).0, Plan::Whole);
    }

    #[test]
    fn changed_pages_ship_as_deltas_against_the_last_whole_chunk() {
        let v1 = block(1);
        let h1 = hash(&v1);
        let (p, r1) = plan(None, None, &h1, &v1, &[]);
        assert_eq!(p, Plan::Whole);
        // Two pages change: a delta of two pages against v1.
        let mut v2 = v1.clone();
        v2[5 * DELTA_PAGE + 7] ^= 1;
        v2[200 * DELTA_PAGE] ^= 1;
        let h2 = hash(&v2);
        let (p, r2) = plan(Some(&h1), Some(&r1), &h2, &v2, &[]);
        assert_eq!(
            p,
            Plan::Delta {
                base: h1,
                mask: [5, 200].into_iter().collect()
            }
        );
        assert_eq!(pages_of(&v2, [5, 200].into_iter().collect()).len(), 2);
        // The next change accumulates against the same base.
        let mut v3 = v2.clone();
        v3[9 * DELTA_PAGE] ^= 1;
        let h3 = hash(&v3);
        let (p, r3) = plan(Some(&h2), Some(&r2), &h3, &v3, &[]);
        assert_eq!(
            p,
            Plan::Delta {
                base: h1,
                mask: [5, 9, 200].into_iter().collect()
            }
        );
        // Fingerprints the scan computed give the same plan.
        let mut known = vec![0u64; PAGES];
        siterec_drivers::capture::page_fingerprints(&v3, &mut known);
        assert_eq!(
            plan(Some(&h2), Some(&r2), &h3, &v3, &known),
            (p.clone(), r3.clone())
        );
        // A record ahead of the acknowledged state is not trusted.
        assert_eq!(plan(Some(&h1), Some(&r3), &h3, &v3, &[]).0, Plan::Whole);
        // Too many pages: whole, and a new base.
        let mut v4 = v3.clone();
        for p in 20..20 + MAX_DELTA_PAGES as usize {
            v4[p * DELTA_PAGE] ^= 1;
        }
        let h4 = hash(&v4);
        let (p, r4) = plan(Some(&h3), Some(&r3), &h4, &v4, &[]);
        assert_eq!(p, Plan::Whole);
        assert_eq!((r4.base, r4.mask), (h4, PageMask::EMPTY));
    }

    #[test]
    fn page_masks_cover_every_page_of_a_block() {
        let mut m = PageMask::EMPTY;
        for i in [0, 63, 64, 130, PAGES - 1] {
            m.insert(i);
        }
        m.insert(PAGES); // past the block: ignored
        assert_eq!(m.count(), 5);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![0, 63, 64, 130, PAGES - 1]
        );
        assert!(m.contains(130) && !m.contains(129) && !m.contains(PAGES));
        assert_eq!(
            PageMask::range(62, 65).iter().collect::<Vec<_>>(),
            vec![62, 63, 64, 65]
        );
        assert_eq!(
            m.without(&PageMask::range(60, 140))
                .iter()
                .collect::<Vec<_>>(),
            vec![0, PAGES - 1]
        );
        assert_eq!(PageMask::ALL.count() as usize, PAGES);
        assert!((PageMask::EMPTY | PageMask::EMPTY).is_empty());
    }

    #[test]
    fn records_round_trip_and_missing_ones_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let recs = PageRecords::open(&dir.path().join("d.pages")).unwrap();
        assert!(recs.read(3).is_none());
        let v = block(7);
        let (_, mut r) = plan(None, None, &hash(&v), &v, &[]);
        r.mask = [1, 70, PAGES - 1].into_iter().collect();
        recs.write(3, &r).unwrap();
        assert_eq!(recs.read(3), Some(r));
        assert!(recs.read(0).is_none(), "a hole reads as no record");
        assert!(recs.read(4).is_none());
    }
}
