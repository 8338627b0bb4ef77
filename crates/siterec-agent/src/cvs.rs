//! Page chaining values: a block's BLAKE3 hash (its chunk id) assembled
//! from the BLAKE3 tree nodes of its 4 KiB pages, so that a block whose
//! dirty pages are known can be re-hashed by reading only those pages.
//!
//! A full block (1 MiB = 256 pages of 4 KiB = 1024 BLAKE3 chunks of 1 KiB)
//! is a perfect BLAKE3 tree: each page is a complete subtree at its offset,
//! and merging the 256 page chaining values pairwise gives the root, equal
//! to `blake3::hash(block)` (tested). Short blocks (the end of a disk) are
//! not handled here: they are read whole.
//!
//! `state/ITEM/DISK.cvs` holds, per block, at `index * RECORD_LEN`: the
//! block's hash (32 bytes) and its 256 page chaining values (32 bytes
//! each). A record is self-checking — used only when merging its values
//! gives its hash, and that hash is the block's acknowledged one — so it
//! needs no sync: a torn or stale record only makes the block read whole.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes per page.
pub const PAGE: usize = 4096;
/// Pages per full block (a power of two, so that pages merge pairwise).
pub use crate::limits::PAGES;
/// A full block's length.
pub const BLOCK: usize = PAGE * PAGES;
const _: () = assert!(PAGES.is_power_of_two() && PAGE == siterec_store::DELTA_PAGE);
const RECORD_LEN: usize = 32 + PAGES * 32;

/// One block's page chaining values.
pub type Cvs = [ChainingValue; PAGES];

/// The chaining value of page `index` of a block.
pub fn page_cv(index: usize, page: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset((index * PAGE) as u64)
        .update(page)
        .finalize_non_root()
}

/// The chaining values of a full block's pages.
pub fn block_cvs(block: &[u8]) -> Option<Cvs> {
    if block.len() != BLOCK {
        return None;
    }
    let mut cvs = [[0u8; 32]; PAGES];
    for (i, (cv, page)) in cvs.iter_mut().zip(block.chunks_exact(PAGE)).enumerate() {
        *cv = page_cv(i, page);
    }
    Some(cvs)
}

/// The block's hash from its pages' chaining values.
pub fn root(cvs: &Cvs) -> [u8; 32] {
    let mut level: Vec<ChainingValue> = cvs.to_vec();
    while level.len() > 2 {
        level = level
            .chunks_exact(2)
            .map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash))
            .collect();
    }
    *merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes()
}

/// The chaining values of an all-zero block.
pub fn zero_cvs() -> &'static Cvs {
    static ZERO: OnceLock<Cvs> = OnceLock::new();
    ZERO.get_or_init(|| {
        let page = [0u8; PAGE];
        let mut cvs = [[0u8; 32]; PAGES];
        for (i, cv) in cvs.iter_mut().enumerate() {
            *cv = page_cv(i, &page);
        }
        cvs
    })
}

/// A disk's chaining value file.
pub struct CvRecords {
    file: File,
}

impl CvRecords {
    pub fn open(path: &Path) -> anyhow::Result<CvRecords> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(CvRecords { file })
    }

    /// Block `index`'s chaining values, if its record holds together and
    /// belongs to `hash`.
    pub fn read(&self, index: u64, hash: &[u8; 32]) -> Option<Cvs> {
        let mut buf = vec![0u8; RECORD_LEN];
        self.file
            .read_exact_at(&mut buf, index * RECORD_LEN as u64)
            .ok()?;
        if &buf[..32] != hash {
            return None;
        }
        let mut cvs = [[0u8; 32]; PAGES];
        for (cv, b) in cvs.iter_mut().zip(buf[32..].chunks_exact(32)) {
            cv.copy_from_slice(b);
        }
        (root(&cvs) == *hash).then_some(cvs)
    }

    /// Writes block `index`'s record (not synced: see the module docs).
    pub fn write(&self, index: u64, hash: &[u8; 32], cvs: &Cvs) -> anyhow::Result<()> {
        let mut buf = vec![0u8; RECORD_LEN];
        buf[..32].copy_from_slice(hash);
        for (b, cv) in buf[32..].chunks_exact_mut(32).zip(cvs) {
            b.copy_from_slice(cv);
        }
        self.file
            .write_all_at(&buf, index * RECORD_LEN as u64)
            .context("writing a chaining value record")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_of_page_values_is_the_blocks_blake3() {
        let mut block: Vec<u8> = (0..BLOCK).map(|i| (i * 7 + i / 4096) as u8).collect();
        let cvs = block_cvs(&block).unwrap();
        assert_eq!(root(&cvs), *blake3::hash(&block).as_bytes());
        // Change one page: re-hashing that page alone gives the new hash.
        block[5 * PAGE + 17] ^= 0xff;
        let mut updated = cvs;
        updated[5] = page_cv(5, &block[5 * PAGE..6 * PAGE]);
        assert_eq!(root(&updated), *blake3::hash(&block).as_bytes());
        assert_ne!(root(&updated), root(&cvs));
        assert_eq!(
            root(zero_cvs()),
            *blake3::hash(&vec![0u8; BLOCK]).as_bytes()
        );
        assert!(block_cvs(&block[..BLOCK - 1]).is_none());
    }

    #[test]
    fn records_are_used_only_when_they_hold_together() {
        let dir = tempfile::tempdir().unwrap();
        let recs = CvRecords::open(&dir.path().join("d.cvs")).unwrap();
        let block = vec![3u8; BLOCK];
        let cvs = block_cvs(&block).unwrap();
        let hash = root(&cvs);
        recs.write(2, &hash, &cvs).unwrap();
        assert_eq!(recs.read(2, &hash), Some(cvs));
        assert_eq!(recs.read(2, &[9u8; 32]), None, "another hash");
        assert_eq!(recs.read(1, &hash), None, "never written");
        // A torn record (values of another block under this hash).
        let other = block_cvs(&vec![4u8; BLOCK]).unwrap();
        recs.write(2, &hash, &other).unwrap();
        assert_eq!(recs.read(2, &hash), None);
    }
}
