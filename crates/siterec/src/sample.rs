//! Sample disk images with mixed content, for the quickstart, tests and
//! benchmarks: 4 MiB extents, 40% zero, 30% text-like, 30% random, chosen by
//! a seeded generator so the same seed makes the same image.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

pub const EXTENT: u64 = 4 * 1024 * 1024;

const WORDS: &[&str] = &[
    "replica",
    "failover",
    "recovery",
    "point",
    "vault",
    "fabric",
    "cloud",
    "policy",
    "retention",
    "commit",
    "the",
    "of",
    "and",
    "disk",
    "block",
    "chunk",
    "server",
    "site",
    "primary",
    "network",
];

/// Fills `buf` with text-like bytes (words, spaces, newlines).
pub fn fill_text(rng: &mut StdRng, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let w = WORDS[rng.random_range(0..WORDS.len())].as_bytes();
        for &b in w
            .iter()
            .chain(if rng.random_ratio(1, 12) { b"\n" } else { b" " })
        {
            if i < buf.len() {
                buf[i] = b;
                i += 1;
            }
        }
    }
}

/// Writes a sparse image of `size` bytes with mixed content.
pub fn make_mixed_image(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let mut buf = vec![0u8; EXTENT as usize];
    let mut off = 0u64;
    while off < size {
        let len = EXTENT.min(size - off) as usize;
        let pick = rng.random_range(0..10);
        if pick >= 4 {
            if pick < 7 {
                fill_text(&mut rng, &mut buf[..len]);
            } else {
                rng.fill_bytes(&mut buf[..len]);
            }
            f.seek(SeekFrom::Start(off))?;
            f.write_all(&buf[..len])?;
        }
        off += len as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Overwrites `len` bytes at `offset` with random data.
pub fn overwrite_random(path: &Path, offset: u64, len: usize, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&buf)?;
    f.sync_all()?;
    Ok(())
}

/// Overwrites `total` bytes with random data in 16 runs spread over a disk
/// of `size` bytes, each `1/part` of the way into its sixteenth.
pub fn overwrite_scattered(
    path: &Path,
    size: u64,
    total: u64,
    part: u64,
    seed: u64,
) -> anyhow::Result<()> {
    let n = 16u64;
    let len = (total / n).max(4096);
    for i in 0..n {
        let off = ((size / n) * i + size / n / part.max(1)).min(size.saturating_sub(len)) & !4095;
        overwrite_random(path, off, len as usize, seed + i)?;
    }
    Ok(())
}

/// BLAKE3 of a whole file.
pub fn hash_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
    )?;
    Ok(h.finalize())
}
