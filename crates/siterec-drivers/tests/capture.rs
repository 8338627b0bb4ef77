use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::RngCore;
use siterec_drivers::capture::{
    BlockBases, BlockHash, CaptureError, DiskKind, DiskSource, LEGACY_BLOCK_SIZE, ScanOptions,
    ScanOutcome, SnapshotMethod, decode_hashes, decode_state, encode_hashes, encode_state,
    hash_block, scan,
};

const CHUNK: u32 = 64 * 1024;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Expected per-block hashes of a file's current content.
fn expected_hashes(path: &Path, chunk: u32) -> Vec<BlockHash> {
    let data = std::fs::read(path).unwrap();
    data.chunks(chunk as usize).map(hash_block).collect()
}

fn stable_only() -> ScanOptions {
    ScanOptions {
        scratch_dir: None,
        ..ScanOptions::default()
    }
}

fn collect(
    source: &DiskSource,
    previous: Option<&[BlockHash]>,
    options: &ScanOptions,
) -> (ScanOutcome, Vec<(u64, Vec<u8>)>) {
    let mut got = Vec::new();
    let outcome = scan(source, CHUNK, previous, options, |i, d, _, _| {
        got.push((i, d.to_vec()));
        Ok(())
    })
    .unwrap();
    (outcome, got)
}

#[test]
fn detects_only_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    // 10 blocks: 0..3 random, 4..6 zero, 7..9 random, last one short.
    let len = 9 * CHUNK as usize + 1000;
    let mut data = vec![0u8; len];
    for b in [0usize, 1, 2, 3, 7, 8, 9] {
        let start = b * CHUNK as usize;
        let end = (start + CHUNK as usize).min(len);
        data[start..end].copy_from_slice(&random_bytes(end - start));
    }
    std::fs::write(&path, &data).unwrap();

    let source = DiskSource::open(&path).unwrap();
    assert_eq!(source.kind(), DiskKind::File);
    assert_eq!(source.size(), len as u64);

    // First scan: every non-zero block is delivered, zero blocks are not.
    let (first, got) = collect(&source, None, &stable_only());
    let indices: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 7, 8, 9]);
    assert_eq!(first.hashes.len(), 10);
    assert_eq!(first.hashes, expected_hashes(&path, CHUNK));
    assert!(first.hashes[4].is_none() && first.hashes[5].is_none() && first.hashes[6].is_none());
    // Short last block delivered with its real length.
    assert_eq!(got.last().unwrap().1.len(), 1000);
    assert_eq!(got.last().unwrap().1, data[9 * CHUNK as usize..]);
    assert_eq!(got[1].1, data[CHUNK as usize..2 * CHUNK as usize]);
    assert!(first.consistent);
    assert_eq!(first.method, SnapshotMethod::StableRead);
    assert_eq!(first.attempts, 1);
    assert_eq!(first.bytes_read, len as u64);
    assert_eq!(first.changed_blocks, 7);

    // Nothing changed: nothing delivered.
    let (same, got) = collect(&source, Some(&first.hashes), &stable_only());
    assert!(got.is_empty());
    assert_eq!(same.hashes, first.hashes);
    assert_eq!(same.changed_blocks, 0);

    // Modify block 2 (one byte), make block 5 non-zero, zero block 8,
    // touch the short tail.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[!data[2 * CHUNK as usize + 17]], 2 * u64::from(CHUNK) + 17)
        .unwrap();
    f.write_all_at(&[1, 2, 3], 5 * u64::from(CHUNK)).unwrap();
    f.write_all_at(&vec![0u8; CHUNK as usize], 8 * u64::from(CHUNK))
        .unwrap();
    f.write_all_at(
        &[!data[9 * CHUNK as usize + 999]],
        9 * u64::from(CHUNK) + 999,
    )
    .unwrap();
    drop(f);

    let (second, got) = collect(&source, Some(&first.hashes), &stable_only());
    let indices: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, vec![2, 5, 9]);
    assert_eq!(second.hashes, expected_hashes(&path, CHUNK));
    assert!(second.hashes[8].is_none());
    assert_eq!(second.changed_blocks, 3);
    let now = std::fs::read(&path).unwrap();
    for (i, d) in &got {
        let start = *i as usize * CHUNK as usize;
        assert_eq!(&now[start..start + d.len()], &d[..]);
    }

    // A previous list of another length means "deliver everything".
    let (_, got) = collect(&source, Some(&first.hashes[..5]), &stable_only());
    assert_eq!(got.len(), 7);
}

#[test]
fn file_changing_during_scan_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let len = 16 * CHUNK as usize;
    std::fs::write(&path, random_bytes(len)).unwrap();
    let source = DiskSource::open(&path).unwrap();
    let options = stable_only();

    // On the first delivery of the first attempt, write to a block the
    // attempt has already passed (block 0) and to one it has not (block 12).
    let writer = OpenOptions::new().write(true).open(&path).unwrap();
    let mut calls = 0u32;
    let mut delivered: Vec<u64> = Vec::new();
    let mut last = std::collections::HashMap::new();
    let outcome = scan(&source, CHUNK, None, &options, |i, d, _, _| {
        calls += 1;
        if calls == 1 {
            writer.write_all_at(b"changed!", 100).unwrap();
            writer
                .write_all_at(b"also changed", 12 * u64::from(CHUNK) + 5)
                .unwrap();
        }
        delivered.push(i);
        last.insert(i, blake3::hash(d));
        Ok(())
    })
    .unwrap();
    assert_eq!(outcome.attempts, 2, "{outcome:?}");
    assert!(outcome.consistent);
    assert_eq!(outcome.method, SnapshotMethod::StableRead);
    assert_eq!(outcome.hashes, expected_hashes(&path, CHUNK));
    // Attempt 1 delivered all 16; attempt 2 re-delivered only the changed
    // blocks: 0 surely (changed after delivery), 12 if attempt 1 had already
    // read it when the write landed (reads are batched).
    assert_eq!(delivered[..16], (0..16).collect::<Vec<u64>>()[..]);
    let mut again = delivered[16..].to_vec();
    again.sort_unstable();
    assert!(again == [0] || again == [0, 12], "{delivered:?}");
    assert_eq!(outcome.delivered_blocks, delivered.len() as u64);
    assert_eq!(outcome.bytes_read, 2 * len as u64);
    // The last delivery of every block matches the final state.
    for (i, h) in outcome.hashes.iter().enumerate() {
        assert_eq!(
            last.get(&(i as u64)).map(|h| *h.as_bytes()),
            *h,
            "block {i}"
        );
    }
}

#[test]
fn file_that_never_settles_is_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let len = 4 * CHUNK as usize;
    std::fs::write(&path, random_bytes(len)).unwrap();
    let source = DiskSource::open(&path).unwrap();
    let options = ScanOptions {
        max_attempts: 3,
        ..stable_only()
    };
    let writer = OpenOptions::new().write(true).open(&path).unwrap();
    let mut n = 0u64;
    let outcome = scan(&source, CHUNK, None, &options, |i, _, _, _| {
        // Every attempt's first block triggers a write.
        if i == 0 {
            n += 1;
            writer.write_all_at(&n.to_le_bytes(), 0).unwrap();
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(outcome.attempts, 3);
    assert!(!outcome.consistent);
    assert_eq!(
        outcome.consistency(),
        siterec_core::Consistency::Inconsistent
    );
    assert_eq!(outcome.hashes.len(), 4);
}

#[test]
fn snapshot_or_fallback_with_scratch_dir() {
    // On ext4 FICLONE fails and the scan falls back to a stable read; on
    // btrfs/XFS a reflink is used. Either way the result is correct and no
    // snapshot file is left behind.
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, random_bytes(3 * CHUNK as usize + 7)).unwrap();
    let source = DiskSource::open(&path).unwrap();
    let options = ScanOptions {
        scratch_dir: Some(scratch.clone()),
        ..ScanOptions::default()
    };
    let (outcome, got) = collect(&source, None, &options);
    assert!(outcome.consistent);
    assert!(matches!(
        outcome.method,
        SnapshotMethod::Reflink | SnapshotMethod::StableRead
    ));
    assert_eq!(got.len(), 4);
    assert_eq!(outcome.hashes, expected_hashes(&path, CHUNK));
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
}

#[test]
fn callback_error_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, random_bytes(2 * CHUNK as usize)).unwrap();
    let source = DiskSource::open(&path).unwrap();
    let err = scan(&source, CHUNK, None, &stable_only(), |_, _, _, _| {
        anyhow::bail!("target unreachable")
    })
    .unwrap_err();
    assert!(matches!(err, CaptureError::Callback(_)));
    assert!(err.to_string().contains("target unreachable"), "{err}");
}

#[test]
fn open_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-disk.img");
    let err = DiskSource::open(&missing).unwrap_err();
    assert!(matches!(err, CaptureError::NotFound { .. }));
    assert!(err.to_string().contains("no-such-disk.img"), "{err}");

    let err = DiskSource::open(dir.path()).unwrap_err();
    assert!(matches!(err, CaptureError::NotADisk { .. }), "{err}");
    assert!(err.to_string().contains("directory"), "{err}");

    let err = DiskSource::open("/dev/null").unwrap_err();
    assert!(err.to_string().contains("character device"), "{err}");

    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let source = DiskSource::open(&empty).unwrap();
    let (outcome, got) = collect(&source, None, &stable_only());
    assert!(outcome.hashes.is_empty() && got.is_empty());

    assert!(scan(&source, 0, None, &stable_only(), |_, _, _, _| Ok(())).is_err());
}

#[test]
fn hash_list_round_trip_and_torn_detection() {
    let hashes: Vec<BlockHash> = vec![
        Some([7u8; 32]),
        None,
        None,
        Some(*blake3::hash(b"x").as_bytes()),
    ];
    let bytes = encode_hashes(&hashes);
    assert_eq!(decode_hashes(&bytes).unwrap(), hashes);
    assert_eq!(decode_hashes(&encode_hashes(&[])).unwrap(), Vec::new());
    // Torn (truncated) file.
    for cut in [0, 5, bytes.len() / 2, bytes.len() - 1] {
        assert!(matches!(
            decode_hashes(&bytes[..cut]),
            Err(CaptureError::CorruptHashes(_))
        ));
    }
    // Flipped bit.
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    assert!(decode_hashes(&bad).is_err());
    // Unknown version.
    let mut bad = bytes.clone();
    bad[4] = 9;
    assert!(
        decode_hashes(&bad)
            .unwrap_err()
            .to_string()
            .contains("version")
    );
    // A state names its block size (version 3); older ones are 256 KiB.
    let mut bases = BlockBases::new();
    bases.insert(3, [9u8; 32]);
    let sized = encode_state(&hashes, &bases, 1 << 20);
    assert_eq!(
        decode_state(&sized).unwrap(),
        (hashes.clone(), bases.clone(), 1 << 20)
    );
    assert_eq!(
        decode_state(&bytes).unwrap(),
        (hashes.clone(), BlockBases::new(), LEGACY_BLOCK_SIZE)
    );
    for cut in [5, 9, 12, sized.len() - 1] {
        assert!(decode_state(&sized[..cut]).is_err());
    }
    let mut bad = sized.clone();
    bad[6] ^= 1; // the block size
    assert!(decode_state(&bad).is_err());
    // Serde-able as plain data too.
    let json = serde_json::to_string(&hashes).unwrap();
    let back: Vec<BlockHash> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, hashes);
}

#[test]
fn scan_throughput_from_page_cache() {
    // 256 MiB of non-zero data, 1 MiB blocks; reported for information and
    // loosely bounded (debug builds of this crate are not optimised).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    let block = random_bytes(1 << 20);
    {
        let f = std::fs::File::create(&path).unwrap();
        for i in 0..256u64 {
            f.write_all_at(&block, i << 20).unwrap();
        }
    }
    let source = DiskSource::open(&path).unwrap();
    // Warm the page cache.
    let _ = std::fs::read(&path).unwrap();
    let start = std::time::Instant::now();
    let outcome = scan(&source, 1 << 20, None, &stable_only(), |_, _, _, _| Ok(())).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let mbps = 256.0 / secs;
    eprintln!("scan: 256 MiB in {secs:.3} s = {mbps:.0} MiB/s");
    assert_eq!(outcome.hashes.len(), 256);
    assert!(mbps > 50.0, "scan too slow: {mbps:.0} MiB/s");
}

/// With `page_fingerprints`, every delivered block comes with the xxh3 of
/// each of its 4 KiB pages (computed on the reader threads), a short last
/// block with as many as it has pages; without, with none.
#[test]
fn page_fingerprints_come_with_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let len = 3 * CHUNK as usize + 5000;
    std::fs::write(&path, random_bytes(len)).unwrap();
    let source = DiskSource::open(&path).unwrap();
    let options = ScanOptions {
        page_fingerprints: true,
        ..stable_only()
    };
    let mut got = Vec::new();
    let outcome = scan(&source, CHUNK, None, &options, |i, d, _, fps| {
        got.push((i, d.to_vec(), fps.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(got.len(), 4);
    for (i, block, fps) in &got {
        let pages: Vec<u64> = block.chunks(4096).map(xxhash_rust::xxh3::xxh3_64).collect();
        assert_eq!(fps, &pages, "block {i}");
    }
    assert_eq!(got[3].2.len(), 2, "5000 bytes are two pages");
    // Only the changed block is delivered, with its fingerprints.
    let mut data = std::fs::read(&path).unwrap();
    data[CHUNK as usize + 10] ^= 1;
    std::fs::write(&path, &data).unwrap();
    let mut again = Vec::new();
    scan(
        &source,
        CHUNK,
        Some(&outcome.hashes),
        &options,
        |i, _, _, fps| {
            again.push((i, fps.len()));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(again, vec![(1, CHUNK as usize / 4096)]);
    // Not asked for: none.
    scan(&source, CHUNK, None, &stable_only(), |_, _, _, fps| {
        assert!(fps.is_empty());
        Ok(())
    })
    .unwrap();
}
