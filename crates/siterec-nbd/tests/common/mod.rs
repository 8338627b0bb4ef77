//! Exports and helpers shared by the server tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use siterec_nbd::{Export, ExportError, ExportExtent, MemoryExport, Segment};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// The replica store's chunk size: the hole granularity of test exports.
pub const CHUNK: u32 = 256 * 1024;

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A disk of `size` bytes, zeros except `regions` (offset, length, fill:
/// `None` for random bytes, `Some(b)` for a pattern byte).
pub fn disk(size: u64, regions: &[(u64, u64, Option<u8>)]) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (i, &(off, len, fill)) in regions.iter().enumerate() {
        let r = &mut d[off as usize..(off + len) as usize];
        match fill {
            Some(b) => r.fill(b),
            None => r.copy_from_slice(&random_bytes(0x5eed + i as u64, len as usize)),
        }
    }
    d
}

/// The standard test disk: 64 MiB, mostly holes, with data in unaligned
/// places, patterns for qemu-io, a data chunk that straddles the 32 MiB
/// request limit and data in the last chunk.
pub fn standard_disk() -> Vec<u8> {
    disk(
        64 * MIB,
        &[
            (0, 64 * KIB, Some(0xab)),
            (MIB, 300 * KIB, Some(0xcd)),
            (3 * MIB + 12345, 700 * KIB, None),
            (10 * MIB - 100, 200, None),
            (32 * MIB - 5000, 10_000, None),
            (40 * MIB, 3 * MIB, None),
            (64 * MIB - 4096, 4096, Some(0xef)),
        ],
    )
}

/// `(offset, length, hole)` runs of `data` at chunk granularity, merged:
/// what the store (and [`MemoryExport`]) reports.
pub fn hole_map(data: &[u8], chunk: usize) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (i, c) in data.chunks(chunk).enumerate() {
        let hole = c.iter().all(|b| *b == 0);
        let off = (i * chunk) as u64;
        match out.last_mut() {
            Some(last) if last.2 == hole => last.1 += c.len() as u64,
            _ => out.push((off, c.len() as u64, hole)),
        }
    }
    out
}

/// A [`MemoryExport`] whose reads and extent lookups fail inside
/// `[fail_at, fail_at + fail_len)`, as a store read of a missing or damaged
/// chunk would; counts the calls it got.
pub struct FailingExport {
    pub inner: MemoryExport,
    pub fail_at: u64,
    pub fail_len: u64,
    pub reads: AtomicUsize,
}

impl FailingExport {
    pub fn new(data: Vec<u8>, fail_at: u64, fail_len: u64) -> Arc<Self> {
        Arc::new(FailingExport {
            inner: MemoryExport::new(data, CHUNK),
            fail_at,
            fail_len,
            reads: AtomicUsize::new(0),
        })
    }

    fn hits(&self, offset: u64, len: u32) -> bool {
        offset < self.fail_at + self.fail_len && self.fail_at < offset + u64::from(len)
    }
}

#[siterec_nbd::async_trait]
impl Export for FailingExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Segment>, ExportError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.hits(offset, len) {
            return Err(ExportError::new(format!(
                "chunk at {} is missing from the replica store",
                self.fail_at
            )));
        }
        self.inner.read(offset, len).await
    }

    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<ExportExtent>, ExportError> {
        if self.hits(offset, len) {
            return Err(ExportError::new("manifest lookup failed"));
        }
        self.inner.extents(offset, len).await
    }
}
