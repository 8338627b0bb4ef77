//! Tests of [`crate::Store`] on a [`crate::LocalDir`] backend.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::RngCore;
use siterec_core::Consistency;

use crate::backend::BlockingObjects;
use crate::*;

pub(crate) const CS: u32 = 64 * 1024;

async fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_local(dir.path()).await.unwrap();
    (dir, store)
}

/// The files of a [`LocalDir`] without its blocking calls (every other
/// call forwarded): the store then takes the path it takes for network
/// backends.
pub(crate) struct AsyncOnly(pub(crate) LocalDir);

#[async_trait::async_trait]
impl Backend for AsyncOnly {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.0.put(key, data).await
    }
    async fn put_durable(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.0.put_durable(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.0.exists(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.0.list(prefix).await
    }
    async fn barrier(&self) -> Result<(), StoreError> {
        self.0.barrier().await
    }
    async fn remove_stale_temp(&self, min_age: std::time::Duration) -> Result<u64, StoreError> {
        self.0.remove_stale_temp(min_age).await
    }
    fn describe(&self) -> String {
        format!("async-only {}", self.0.describe())
    }
}

/// A store on files, through [`LocalDir`]'s blocking calls or (with
/// `async_only`) without them.
async fn store_of_kind(async_only: bool) -> (tempfile::TempDir, Store) {
    if !async_only {
        return new_store().await;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = AsyncOnly(LocalDir::new(dir.path()).unwrap());
    assert!(backend.blocking_objects().is_none());
    let store = Store::open_or_create(std::sync::Arc::new(backend))
        .await
        .unwrap();
    (dir, store)
}

pub(crate) fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

pub(crate) fn texty(len: usize, seed: u8) -> Vec<u8> {
    format!("block {seed} of a text-like disk, compressible. ")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(len)
        .collect()
}

/// Where chunk `id` of the store in `dir` lies: a file (a pack or its
/// own), the offset of its bytes and their length. Opens the directory
/// afresh, as a tool would: it sees what a barrier covered, and scans
/// packs no barrier indexed yet.
pub(crate) fn chunk_at(dir: &Path, id: &ChunkId) -> Option<(PathBuf, u64, usize)> {
    LocalDir::new(dir).unwrap().locate(&chunk_key(id)).unwrap()
}

/// The bytes of chunk `id` as stored.
pub(crate) fn stored_chunk(dir: &Path, id: &ChunkId) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let (path, at, len) = chunk_at(dir, id).expect("chunk stored");
    let mut out = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut out, at)
        .unwrap();
    out
}

/// Changes the stored bytes of chunk `id` in place (same length), as
/// damage on disk would.
pub(crate) fn damage_chunk(dir: &Path, id: &ChunkId, f: impl FnOnce(&mut [u8])) {
    use std::os::unix::fs::FileExt;
    let (path, at, _) = chunk_at(dir, id).expect("chunk stored");
    let mut bytes = stored_chunk(dir, id);
    f(&mut bytes);
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&bytes, at)
        .unwrap();
}

/// Point "p1" of item "vm": one disk of one block, delta chunk `delta` on
/// `base`.
pub(crate) fn delta_manifest(delta: ChunkId, base: ChunkId) -> Manifest {
    let mut m = manifest(
        "vm",
        "p1",
        vec![DiskManifest {
            disk_id: "d".into(),
            size: CS as u64,
            chunk_size: CS,
            chunks: vec![Some(delta)],
        }],
    );
    m.bases.insert(delta, base);
    m
}

/// Uploads `image` as a disk the way the source agent would, returning its
/// manifest (without committing it).
pub(crate) async fn upload_disk(store: &Store, disk_id: &str, image: &[u8]) -> DiskManifest {
    let mut chunks = Vec::new();
    for block in image.chunks(CS as usize) {
        if is_all_zero(block) {
            chunks.push(None);
        } else {
            let enc = encode_chunk(block, true);
            store.put_encoded_chunk(enc.id, enc.bytes).await.unwrap();
            chunks.push(Some(enc.id));
        }
    }
    DiskManifest {
        disk_id: disk_id.into(),
        size: image.len() as u64,
        chunk_size: CS,
        chunks,
    }
}

pub(crate) fn manifest(item: &str, point: &str, disks: Vec<DiskManifest>) -> Manifest {
    Manifest {
        item: item.into(),
        point_id: point.into(),
        created_at_unix_ms: 1_700_000_000_000,
        consistency: Consistency::CrashConsistent,
        disks,
        bases: Default::default(),
    }
}

/// A disk image with text, random and zero blocks and a short last block.
pub(crate) fn image() -> Vec<u8> {
    let mut img = Vec::new();
    img.extend(texty(CS as usize, 1));
    img.extend(vec![0u8; CS as usize]);
    img.extend(random(CS as usize));
    img.extend(texty(CS as usize, 1)); // duplicate of block 0
    img.extend(random(1000)); // short last block
    img
}

pub(crate) async fn read_back(
    store: &Store,
    m: &Manifest,
    disk: usize,
    parallelism: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut r = store.read_disk(m, disk, parallelism).unwrap();
    let mut expected_index = 0;
    while let Some(block) = r.next().await {
        let block = block.unwrap();
        assert_eq!(block.index, expected_index);
        assert_eq!(block.offset, out.len() as u64);
        match block.data {
            Some(d) => {
                assert_eq!(d.len() as u64, block.len);
                out.extend(d);
            }
            None => out.extend(vec![0u8; block.len as usize]),
        }
        expected_index += 1;
    }
    out
}

#[tokio::test]
async fn commit_list_and_read_back() {
    let (dir, store) = new_store().await;
    assert!(dir.path().join("store.json").exists());
    assert_eq!(store.info().version, STORE_FORMAT_VERSION_PLAIN);
    assert!(!store.is_encrypted() && store.key_id().is_none());
    let img = image();
    let disk = upload_disk(&store, "disk0", &img).await;
    assert_eq!(disk.chunks.len(), 5);
    assert_eq!(disk.chunks[1], None);
    assert_eq!(disk.chunks[0], disk.chunks[3]);
    let m = manifest("vm-1", "p1", vec![disk]);
    store.commit_point(&m).await.unwrap();

    assert_eq!(
        store.list_points(None).await.unwrap(),
        [PointRef {
            item: "vm-1".into(),
            point_id: "p1".into()
        }]
    );
    assert!(store.list_points(Some("vm-2")).await.unwrap().is_empty());
    assert!(store.list_points(Some("../x")).await.is_err());
    assert_eq!(store.read_manifest("vm-1", "p1").await.unwrap(), m);
    for parallelism in [1, 3, 16] {
        assert_eq!(read_back(&store, &m, 0, parallelism).await, img);
    }
    assert!(store.read_disk(&m, 1, 1).is_err());
    assert_eq!(store.read_chunk_at(&m.disks[0], 1).await.unwrap(), None);
    assert!(store.read_chunk_at(&m.disks[0], 5).await.is_err());
    assert!(matches!(
        store.read_manifest("vm-1", "nope").await,
        Err(StoreError::PointNotFound { .. })
    ));

    // Zero blocks are never stored: 3 distinct non-zero blocks.
    let chunk_files = store.backend().list("chunks/").await.unwrap();
    assert_eq!(chunk_files.len(), 3);

    let report = store.verify().await.unwrap();
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(report.chunks_checked, 3);
}

#[tokio::test]
async fn put_encoded_chunk_verifies_and_dedups() {
    for upload in [false, true] {
        put_encoded_chunk_checks(false, upload).await;
    }
}

#[tokio::test]
async fn put_encoded_chunk_verifies_and_dedups_without_blocking_calls() {
    for upload in [false, true] {
        put_encoded_chunk_checks(true, upload).await;
    }
}

/// Stores a chunk object as the target does: whole
/// ([`Store::put_encoded_chunk`]) or received in pieces into a
/// [`ChunkUpload`] ([`Store::put_chunk_upload`]).
pub(crate) async fn put_object(
    store: &Store,
    id: ChunkId,
    bytes: &[u8],
    upload: bool,
) -> Result<bool, StoreError> {
    if !upload {
        return store.put_encoded_chunk(id, bytes.to_vec()).await;
    }
    // Sized for less than arrives, as without a content length.
    let mut up = store.chunk_upload(bytes.len() / 3, bytes.len());
    for piece in bytes.chunks(16 * 1024 + 3) {
        up.extend_from_slice(piece).unwrap();
    }
    assert_eq!(up.object(), bytes);
    store.put_chunk_upload(id, up).await
}

async fn put_encoded_chunk_checks(async_only: bool, upload: bool) {
    let (dir, store) = store_of_kind(async_only).await;
    // Big enough to be written with direct I/O, not a whole number of pages.
    let plain = random(300_000);
    let enc = encode_chunk(&plain, true);
    assert!(enc.bytes.len() > 64 * 1024 && !enc.bytes.len().is_multiple_of(4096));
    assert!(
        put_object(&store, enc.id, &enc.bytes, upload)
            .await
            .unwrap()
    );
    store.sync().await.unwrap();
    // Where the object lies (file and offset) shows whether it was
    // written again.
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        let (path, at, _) = chunk_at(dir.path(), &enc.id).unwrap();
        (std::fs::metadata(path).unwrap().ino(), at)
    };
    let first = inode();
    let again = put_object(&store, enc.id, &enc.bytes, upload)
        .await
        .unwrap();
    // An upload written behind its answer does not look on disk before
    // answering (the writer thread does); the rest answer that it is there.
    assert!(!again || (upload && !async_only));
    store.sync().await.unwrap();
    assert_eq!(inode(), first, "a stored chunk is not written again");
    assert_eq!(store.get_chunk(enc.id).await.unwrap(), plain);
    assert_eq!(
        stored_chunk(dir.path(), &enc.id),
        enc.bytes,
        "an unencrypted store keeps the object as it came"
    );

    // Bytes that do not match the id are refused and not stored.
    let other = ChunkId::of(b"something else");
    let err = put_object(&store, other, &enc.bytes, upload)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::CorruptChunk { .. }), "{err}");
    assert!(!store.has_chunk(other).await.unwrap());
    let mut damaged = enc.bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    let plain2 = texty(10_000, 4);
    let id2 = ChunkId::of(&plain2);
    assert!(put_object(&store, id2, &damaged, upload).await.is_err());
    assert!(chunk_at(dir.path(), &id2).is_none());

    // All-zero chunks are refused.
    let zero = encode_chunk(&[0u8; 4096], true);
    let err = put_object(&store, zero.id, &zero.bytes, upload)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ZeroChunk { .. }), "{err}");
    assert!(!store.has_chunk(zero.id).await.unwrap());
    assert_eq!(
        store.put_plain_chunk(vec![0; 100], true).await.unwrap(),
        None
    );

    assert_eq!(
        store.has_chunks(&[enc.id, other, id2]).await.unwrap(),
        [true, false, false]
    );
    assert!(matches!(
        store.get_chunk(other).await,
        Err(StoreError::MissingChunk { .. })
    ));
}

#[tokio::test]
async fn has_chunks_answers_in_order_across_batches() {
    for async_only in [false, true] {
        let (_dir, store) = store_of_kind(async_only).await;
        let mut stored = Vec::new();
        for seed in 0..3u8 {
            let id = store
                .put_plain_chunk(texty(5000, seed), true)
                .await
                .unwrap()
                .unwrap();
            stored.push(id);
        }
        // More ids than one blocking batch, with the stored ones at the
        // start, on a batch boundary and at the end.
        let n = 2 * crate::store::BLOCKING_BATCH + 1;
        let mut ids: Vec<ChunkId> = (0..n)
            .map(|i| ChunkId::of(format!("absent {i}").as_bytes()))
            .collect();
        let at = [0, crate::store::BLOCKING_BATCH, n - 1];
        for (&i, &id) in at.iter().zip(&stored) {
            ids[i] = id;
        }
        let found = store.has_chunks(&ids).await.unwrap();
        assert_eq!(found.len(), n);
        let expected: Vec<bool> = (0..n).map(|i| at.contains(&i)).collect();
        assert_eq!(found, expected, "async_only={async_only}");
    }
}

#[tokio::test]
async fn corrupt_chunk_on_disk_is_detected() {
    let (dir, store) = new_store().await;
    let img = image();
    let disk = upload_disk(&store, "disk0", &img).await;
    let m = manifest("vm-1", "p1", vec![disk]);
    store.commit_point(&m).await.unwrap();
    let victim = m.disks[0].chunks[2].unwrap(); // a random (raw) block
    damage_chunk(dir.path(), &victim, |bytes| {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
    });

    let err = store.get_chunk(victim).await.unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptChunk { id, .. } if id == victim),
        "{err}"
    );
    assert!(store.read_chunk_at(&m.disks[0], 2).await.is_err());
    // The ordered reader yields the good blocks, then the error, then stops.
    let mut r = store.read_disk(&m, 0, 4).unwrap();
    assert!(r.next().await.unwrap().is_ok());
    assert!(r.next().await.unwrap().is_ok());
    assert!(r.next().await.unwrap().is_err());
    assert!(r.next().await.is_none());

    let report = store.verify().await.unwrap();
    assert!(!report.all_ok());
    assert_eq!(report.points[0].damaged_chunks, [victim]);
    assert!(
        report.points[0]
            .error
            .as_deref()
            .unwrap()
            .contains("corrupt")
    );

    // A compressed chunk, its last bytes lost.
    let victim = m.disks[0].chunks[0].unwrap();
    damage_chunk(dir.path(), &victim, |bytes| {
        let n = bytes.len();
        bytes[n - 3..].fill(0);
    });
    assert!(store.get_chunk(victim).await.is_err());
    let report = store.verify().await.unwrap();
    assert_eq!(report.points[0].damaged_chunks.len(), 2);
}

#[tokio::test]
async fn corrupt_manifest_on_disk_is_detected() {
    let (dir, store) = new_store().await;
    let disk = upload_disk(&store, "disk0", &image()).await;
    let m = manifest("vm-1", "p1", vec![disk.clone()]);
    store.commit_point(&m).await.unwrap();
    let path = dir.path().join(manifest_key("vm-1", "p1").unwrap());
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[30] ^= 0x04;
    std::fs::write(&path, &bad).unwrap();

    let err = store.read_manifest("vm-1", "p1").await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptManifest { .. }), "{err}");
    let report = store.verify().await.unwrap();
    assert!(!report.points[0].ok);
    assert!(report.points[0].error.is_some());
    // gc refuses to run rather than sweep chunks a damaged manifest may need.
    assert!(store.gc(&HashSet::new()).await.is_err());
    assert_eq!(store.backend().list("chunks/").await.unwrap().len(), 3);

    // A valid manifest stored under another point's name is refused too.
    std::fs::write(&path, &good).unwrap();
    let other = dir.path().join(manifest_key("vm-1", "p2").unwrap());
    std::fs::write(&other, &good).unwrap();
    assert!(matches!(
        store.read_manifest("vm-1", "p2").await,
        Err(StoreError::CorruptManifest { .. })
    ));
}

#[tokio::test]
async fn commit_refuses_missing_chunks_and_leaves_nothing_visible() {
    let (dir, store) = new_store().await;
    let mut disk = upload_disk(&store, "disk0", &image()).await;
    let absent = ChunkId::of(b"never uploaded");
    disk.chunks[1] = Some(absent);
    let m = manifest("vm-1", "p1", vec![disk]);
    let err = store.commit_point(&m).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MissingChunk { id, .. } if id == absent),
        "{err}"
    );
    assert!(store.list_points(None).await.unwrap().is_empty());
    assert!(
        !dir.path()
            .join(manifest_key("vm-1", "p1").unwrap())
            .exists()
    );
    assert!(matches!(
        store.read_manifest("vm-1", "p1").await,
        Err(StoreError::PointNotFound { .. })
    ));

    // An invalid manifest is refused before anything happens.
    let mut bad = manifest("vm-1", "p1", vec![]);
    bad.point_id = "a/b".into();
    assert!(store.commit_point(&bad).await.is_err());
}

/// A [`LocalDir`] whose direct writes of the keys in `doomed` fail (an
/// I/O error, nothing written), to see what the store does with a write
/// that fails after its upload was answered.
struct FailingWrites {
    dir: LocalDir,
    doomed: std::sync::Mutex<HashSet<String>>,
}

#[async_trait::async_trait]
impl Backend for FailingWrites {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.dir.put(key, data).await
    }
    async fn put_durable(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.dir.put_durable(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.dir.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.dir.exists(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.dir.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.dir.list(prefix).await
    }
    async fn barrier(&self) -> Result<(), StoreError> {
        self.dir.barrier().await
    }
    fn describe(&self) -> String {
        format!("failing-writes {}", self.dir.describe())
    }
    fn blocking_objects(&self) -> Option<&dyn BlockingObjects> {
        Some(self)
    }
}

impl BlockingObjects for FailingWrites {
    fn exists_blocking(&self, key: &str) -> Result<bool, StoreError> {
        self.dir.exists_blocking(key)
    }
    fn put_blocking(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        self.dir.put_blocking(key, data)
    }
    fn delete_blocking(&self, key: &str) -> Result<(), StoreError> {
        self.dir.delete_blocking(key)
    }
    fn get_blocking_with(
        &self,
        key: &str,
        read: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        self.dir.get_blocking_with(key, read)
    }
    fn put_blocking_aligned(&self, key: &str, buf: &[u8], len: usize) -> Result<(), StoreError> {
        if self.doomed.lock().unwrap().contains(key) {
            return Err(StoreError::io(
                "write",
                Path::new(key),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.dir.put_blocking_aligned(key, buf, len)
    }
}

/// An upload is answered once checked and sealed; its file is written
/// behind. A commit waits for it; a write that failed fails the next
/// commit (once), and the chunk is then missing, so the source sends it
/// again.
#[tokio::test]
async fn uploads_written_behind_their_answers_are_waited_for_and_their_failures_reported() {
    let dir = tempfile::tempdir().unwrap();
    let backend = std::sync::Arc::new(FailingWrites {
        dir: LocalDir::new(dir.path()).unwrap(),
        doomed: Default::default(),
    });
    let store = Store::open_or_create(backend.clone()).await.unwrap();
    let blocks: Vec<Vec<u8>> = (0..3).map(|i| texty(CS as usize, i + 1)).collect();
    let encs: Vec<EncodedChunk> = blocks.iter().map(|b| encode_chunk(b, true)).collect();
    let doomed = &encs[2];
    backend
        .doomed
        .lock()
        .unwrap()
        .insert(store.chunk_object_key(&doomed.id));
    for e in &encs {
        assert!(put_object(&store, e.id, &e.bytes, true).await.unwrap());
    }
    // Answered: counted as stored whether written yet or not (the doomed
    // one's write may have failed already).
    assert_eq!(
        store.has_chunks(&[encs[0].id, encs[1].id]).await.unwrap(),
        [true, true]
    );
    let disk = |ids: &[ChunkId]| DiskManifest {
        disk_id: "d".into(),
        size: CS as u64 * ids.len() as u64,
        chunk_size: CS,
        chunks: ids.iter().map(|id| Some(*id)).collect(),
    };
    let all: Vec<ChunkId> = encs.iter().map(|e| e.id).collect();
    let m = manifest("vm", "p1", vec![disk(&all)]);
    let err = store.commit_point(&m).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Io { .. }),
        "the failed write fails the commit: {err}"
    );
    // Reported once; then the chunk is simply missing.
    let err = store.commit_point(&m).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MissingChunk { id, .. } if id == doomed.id),
        "{err}"
    );
    assert!(!store.has_chunk(doomed.id).await.unwrap());
    assert!(store.list_points(None).await.unwrap().is_empty());
    // The two that were written read back, and a point of them commits.
    let m2 = manifest("vm", "p2", vec![disk(&all[..2])]);
    store.commit_point(&m2).await.unwrap();
    assert_eq!(read_back(&store, &m2, 0, 4).await, blocks[..2].concat());
    // Sent again once writes work, it is stored and the point commits.
    backend.doomed.lock().unwrap().clear();
    assert!(
        put_object(&store, doomed.id, &doomed.bytes, true)
            .await
            .unwrap()
    );
    store.commit_point(&m).await.unwrap();
    assert_eq!(read_back(&store, &m, 0, 4).await, blocks.concat());
    assert_eq!(stored_chunk(dir.path(), &doomed.id), doomed.bytes);
}

#[tokio::test]
async fn recommit_is_idempotent_and_conflicts_are_refused() {
    let (_dir, store) = new_store().await;
    let disk = upload_disk(&store, "disk0", &image()).await;
    let m = manifest("vm-1", "p1", vec![disk]);
    store.commit_point(&m).await.unwrap();
    store.commit_point(&m).await.unwrap();
    let mut changed = m.clone();
    changed.consistency = Consistency::AppConsistent;
    let err = store.commit_point(&changed).await.unwrap_err();
    assert!(matches!(err, StoreError::PointConflict { .. }), "{err}");
    assert_eq!(store.read_manifest("vm-1", "p1").await.unwrap(), m);
    assert_eq!(store.list_points(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn wrong_length_chunk_is_reported() {
    let (_dir, store) = new_store().await;
    let short = store
        .put_plain_chunk(texty(100, 9), true)
        .await
        .unwrap()
        .unwrap();
    // Position 0 of a disk with 4096-byte chunks needs 4096 bytes.
    let disk = DiskManifest {
        disk_id: "d".into(),
        size: 8192,
        chunk_size: 4096,
        chunks: vec![Some(short), None],
    };
    let m = manifest("vm-1", "p1", vec![disk]);
    store.commit_point(&m).await.unwrap();
    assert!(store.read_chunk_at(&m.disks[0], 0).await.is_err());
    let report = store.verify().await.unwrap();
    assert_eq!(report.points[0].damaged_chunks, [short]);
}

#[tokio::test]
async fn gc_sweeps_only_unreferenced_chunks() {
    gc_sweeps(false).await;
}

#[tokio::test]
async fn gc_sweeps_only_unreferenced_chunks_without_blocking_calls() {
    gc_sweeps(true).await;
}

async fn gc_sweeps(async_only: bool) {
    let (dir, store) = store_of_kind(async_only).await;
    let img1 = image();
    let mut img2 = img1.clone();
    img2[CS as usize * 2..CS as usize * 3].copy_from_slice(&random(CS as usize));
    let d1 = upload_disk(&store, "disk0", &img1).await;
    let d2 = upload_disk(&store, "disk0", &img2).await;
    let m1 = manifest("vm-1", "p1", vec![d1.clone()]);
    let m2 = manifest("vm-1", "p2", vec![d2.clone()]);
    store.commit_point(&m1).await.unwrap();
    store.commit_point(&m2).await.unwrap();
    let orphan = store
        .put_plain_chunk(texty(5000, 20), true)
        .await
        .unwrap()
        .unwrap();
    let in_flight = store
        .put_plain_chunk(texty(5000, 21), true)
        .await
        .unwrap()
        .unwrap();
    // A leftover temporary file from an interrupted put.
    let tmp = dir.path().join("chunks/.srtmp-leftover");
    std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
    std::fs::write(&tmp, b"partial").unwrap();

    let keep: HashSet<ChunkId> = [in_flight].into();
    let report = store.gc(&keep).await.unwrap();
    assert_eq!(report.points, 2);
    assert_eq!(report.chunks_deleted, 1);
    assert_eq!(report.chunks_kept, 5); // 4 distinct referenced + 1 kept
    assert_eq!(report.temp_files_removed, 1);
    assert!(!tmp.exists());
    assert!(!store.has_chunk(orphan).await.unwrap());
    assert!(store.has_chunk(in_flight).await.unwrap());
    assert_eq!(read_back(&store, &m1, 0, 4).await, img1);
    assert_eq!(read_back(&store, &m2, 0, 4).await, img2);

    // Deleting p1 frees its unique chunk, not the shared ones.
    let unique_to_p1 = d1.chunks[2].unwrap();
    store.delete_point("vm-1", "p1").await.unwrap();
    store.delete_point("vm-1", "p1").await.unwrap(); // idempotent
    assert_eq!(store.list_points(Some("vm-1")).await.unwrap().len(), 1);
    let report = store.gc(&HashSet::new()).await.unwrap();
    assert_eq!(report.chunks_deleted, 2); // p1's unique block and in_flight
    assert!(!store.has_chunk(unique_to_p1).await.unwrap());
    assert!(!store.has_chunk(in_flight).await.unwrap());
    assert_eq!(read_back(&store, &m2, 0, 2).await, img2);
    assert!(store.verify().await.unwrap().all_ok());
}

#[tokio::test]
async fn unclean_shutdown_scrubs_damaged_chunks() {
    for packs in [false, true] {
        unclean_shutdown_scrubs_damaged_chunks_in(packs).await;
    }
}

/// A local directory backend in either layout: chunks in packs, or one
/// file each (`without_packs`).
pub(crate) fn local_layout(dir: &Path, packs: bool) -> LocalDir {
    let backend = LocalDir::new(dir).unwrap();
    if packs {
        backend
    } else {
        backend.without_packs().unwrap()
    }
}

/// The store in `dir`, its chunks in packs or one file each.
async fn open_layout(dir: &Path, packs: bool) -> Store {
    Store::open_or_create(std::sync::Arc::new(local_layout(dir, packs)))
        .await
        .unwrap()
}

async fn unclean_shutdown_scrubs_damaged_chunks_in(packs: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_layout(dir.path(), packs).await;
    assert!(store.last_recovery().is_none());
    let good = store
        .put_plain_chunk(texty(9000, 1), true)
        .await
        .unwrap()
        .unwrap();
    let torn = store
        .put_plain_chunk(texty(9000, 2), true)
        .await
        .unwrap()
        .unwrap();
    assert!(dir.path().join(UNSYNCED_MARKER_KEY).exists());
    drop(store);
    // As after a power cut before the barrier: the file exists, but
    // empty; the pack holds the entry, but not its data.
    if packs {
        damage_chunk(dir.path(), &torn, |bytes| bytes.fill(0));
    } else {
        std::fs::write(dir.path().join(chunk_key(&torn)), b"").unwrap();
    }

    let store = open_layout(dir.path(), packs).await;
    let rec = store.last_recovery().unwrap();
    if packs {
        // Opening the pack, no index covering it, stopped at the entry
        // whose data does not match its checksum; the good one needs no
        // second look.
        assert_eq!(rec.chunks_checked, 0);
        assert_eq!(rec.chunks_known_whole, 1);
        assert!(rec.chunks_removed.is_empty());
    } else {
        assert_eq!(rec.chunks_checked, 2);
        assert_eq!(rec.chunks_known_whole, 0);
        assert_eq!(rec.chunks_removed, [torn]);
    }
    assert!(store.has_chunk(good).await.unwrap());
    assert!(
        !store.has_chunk(torn).await.unwrap(),
        "a torn chunk must not be vouched for"
    );
    assert!(!dir.path().join(UNSYNCED_MARKER_KEY).exists());

    // After a barrier covering all writes, reopening does not scrub.
    store.put_plain_chunk(texty(9000, 3), true).await.unwrap();
    assert!(dir.path().join(UNSYNCED_MARKER_KEY).exists());
    store.sync().await.unwrap();
    assert!(!dir.path().join(UNSYNCED_MARKER_KEY).exists());
    drop(store);
    let store = open_layout(dir.path(), packs).await;
    assert!(store.last_recovery().is_none());

    // A commit's barrier also clears it.
    let id = store
        .put_plain_chunk(texty(CS as usize, 4), true)
        .await
        .unwrap()
        .unwrap();
    assert!(dir.path().join(UNSYNCED_MARKER_KEY).exists());
    let disk = DiskManifest {
        disk_id: "d".into(),
        size: u64::from(CS),
        chunk_size: CS,
        chunks: vec![Some(id)],
    };
    store
        .commit_point(&manifest("vm", "p", vec![disk]))
        .await
        .unwrap();
    assert!(!dir.path().join(UNSYNCED_MARKER_KEY).exists());
}

#[tokio::test]
async fn store_json_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_local(dir.path()).await.unwrap();
    let created = store.info().created_at;
    drop(store);
    let store = Store::open_local(dir.path()).await.unwrap();
    assert_eq!(
        store.info().created_at,
        created,
        "reopening keeps store.json"
    );
    drop(store);

    let path = dir.path().join(STORE_INFO_KEY);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let original = v.clone();
    v["version"] = 4.into();
    v["new_field"] = "x".into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = Store::open_local(dir.path()).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::UnsupportedVersion {
                found: 4,
                supported: 3,
                ..
            }
        ),
        "{err}"
    );
    // Version 2 (the retired encrypted format) is refused with what to do.
    let mut v = original.clone();
    v["version"] = 2.into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = Store::open_local(dir.path()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::RetiredVersion { found: 2 }),
        "{err}"
    );
    // Version 3 means encrypted: without an "encryption" member it is not
    // a known store, and neither is a version 1 store with one.
    let mut v = original.clone();
    v["version"] = 3.into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = Store::open_local(dir.path()).await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptMetadata { .. }), "{err}");
    let mut v = original.clone();
    v["encryption"] = serde_json::json!({
        "algorithm": "AES-256-GCM", "keyWrap": "X25519-BLAKE3-AES-256-GCM",
        "keyId": "0011223344556677", "publicKey": "AAAA", "nameKey": "blake3-keyed"
    });
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = Store::open_local(dir.path()).await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptMetadata { .. }), "{err}");
    v["version"] = 3.into();
    v["encryption"]["algorithm"] = "ROT13".into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = Store::open_local(dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("ROT13"), "{err}");

    std::fs::write(&path, b"{\"hello\": 1}").unwrap();
    let err = Store::open_local(dir.path()).await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptMetadata { .. }), "{err}");
    std::fs::write(&path, b"not json").unwrap();
    assert!(Store::open_local(dir.path()).await.is_err());
}

#[test]
fn chunk_keys() {
    let id = ChunkId::of(b"x");
    let key = chunk_key(&id);
    let hex = id.to_hex();
    assert_eq!(key, format!("chunks/{}/{hex}", &hex[..2]));
    validate_key(&key).unwrap();
    assert_eq!(parse_chunk_key(&key), Some(id));
    assert_eq!(parse_chunk_key(&format!("chunks/zz/{hex}")), None);
    assert_eq!(
        parse_chunk_key(&format!("chunks/{}/{}", &hex[..2], hex.to_uppercase())),
        None
    );
    assert_eq!(parse_chunk_key("chunks/ab/short"), None);
    assert_eq!(manifest_key("vm", "p1").unwrap(), "points/vm/p1.manifest");
    assert!(manifest_key("vm", "..").is_err());
}

/// A delta chunk: a few pages against a base, read back rebuilt and
/// verified, its base kept by gc through the manifest, and refused or
/// reported when the base or the delta is not what it claims.
#[tokio::test]
async fn delta_chunks_rebuild_on_their_base() {
    delta_chunk_checks(false).await;
}

#[tokio::test]
async fn delta_chunks_rebuild_on_their_base_without_blocking_calls() {
    delta_chunk_checks(true).await;
}

async fn delta_chunk_checks(async_only: bool) {
    let (_dir, store) = store_of_kind(async_only).await;
    let v1 = texty(CS as usize, 1);
    let base = encode_chunk(&v1, true);
    let mut v2 = v1.clone();
    v2[4096..8192].copy_from_slice(&random(4096));
    let last = v2.len() - 100;
    v2[last..].copy_from_slice(&random(100));
    let target = ChunkId::of(&v2);
    let pages: Vec<(u16, &[u8])> = vec![(1, &v2[4096..8192]), (15, &v2[15 * 4096..])];
    let delta = encode_delta_chunk(target, v2.len() as u32, base.id, &pages, true);
    assert_eq!(delta.id, delta_id(target, base.id));
    assert_ne!(delta.id, target, "a delta is not named by its content");
    assert!(delta.bytes.len() < 9000, "a delta holds its pages only");

    // The base must be there first.
    assert!(matches!(
        store.put_encoded_chunk(delta.id, delta.bytes.clone()).await,
        Err(StoreError::MissingChunk { id, .. }) if id == base.id
    ));
    store.put_encoded_chunk(base.id, base.bytes).await.unwrap();
    // A delta under another id is refused.
    assert!(matches!(
        store.put_encoded_chunk(target, delta.bytes.clone()).await,
        Err(StoreError::CorruptChunk { .. })
    ));
    assert!(
        store
            .put_encoded_chunk(delta.id, delta.bytes.clone())
            .await
            .unwrap()
    );
    assert_eq!(store.get_chunk(delta.id).await.unwrap(), v2);

    // The base is listed: without it the manifest would not say what gc
    // must keep.
    let m = delta_manifest(delta.id, base.id);
    store.commit_point(&m).await.unwrap();
    let back = store.read_manifest("vm", "p1").await.unwrap();
    assert_eq!(back.bases, m.bases);
    assert_eq!(read_back(&store, &back, 0, 2).await, v2);
    let report = store.gc(&HashSet::new()).await.unwrap();
    assert_eq!(report.chunks_deleted, 0, "{report:?}");
    assert!(store.verify().await.unwrap().all_ok());

    // A delta whose pages do not rebuild its target is caught when read
    // and by verify.
    let wrong = encode_delta_chunk(
        ChunkId::of(&v1[..]),
        v1.len() as u32,
        base.id,
        &[(2, &v2[4096..8192])],
        false,
    );
    store
        .put_encoded_chunk(wrong.id, wrong.bytes)
        .await
        .unwrap();
    assert!(matches!(
        store.get_chunk(wrong.id).await,
        Err(StoreError::CorruptChunk { .. })
    ));
    let mut m2 = manifest(
        "vm",
        "p2",
        vec![DiskManifest {
            disk_id: "d".into(),
            size: CS as u64,
            chunk_size: CS,
            chunks: vec![Some(wrong.id)],
        }],
    );
    m2.bases.insert(wrong.id, base.id);
    store.commit_point(&m2).await.unwrap();
    let report = store.verify().await.unwrap();
    assert!(!report.all_ok());
    assert!(report.points.iter().any(|p| p.point_id == "p1" && p.ok));

    // Losing the base breaks the delta loudly.
    store
        .backend()
        .delete(&store.chunk_object_key(&base.id))
        .await
        .unwrap();
    assert!(matches!(
        store.get_chunk(delta.id).await,
        Err(StoreError::MissingChunk { id, .. }) if id == base.id
    ));
}

#[test]
fn manifests_of_version_one_still_read() {
    let m = crate::manifest::tests::sample();
    let mut v2 = m.encode();
    assert_eq!(&v2[8..12], &2u32.to_le_bytes());
    // A version 1 manifest: no bases section.
    v2.truncate(v2.len() - 32 - 4);
    v2[8..12].copy_from_slice(&1u32.to_le_bytes());
    let sum = blake3::hash(&v2);
    v2.extend_from_slice(sum.as_bytes());
    assert_eq!(Manifest::decode(&v2).unwrap(), m);
}

/// A delta is read by rebuilding it on its base, and only the rebuilt
/// block is hashed: damage to the base in a page the delta replaces does
/// not matter to the block, damage elsewhere fails the read (never wrong
/// data), and `verify` names the damaged base either way.
#[tokio::test]
async fn a_delta_is_checked_as_rebuilt_and_a_damaged_base_is_named_by_verify() {
    for async_only in [false, true] {
        let (dir, store) = store_of_kind(async_only).await;
        let v1 = random(CS as usize);
        let base = encode_chunk(&v1, true);
        assert_eq!(base.bytes[CHUNK_MAGIC.len()], CODEC_RAW, "a raw base");
        let mut v2 = v1.clone();
        v2[4096..8192].copy_from_slice(&random(4096));
        let target = ChunkId::of(&v2);
        let delta = encode_delta_chunk(target, CS, base.id, &[(1, &v2[4096..8192])], true);
        store
            .put_encoded_chunk(base.id, base.bytes.clone())
            .await
            .unwrap();
        store
            .put_encoded_chunk(delta.id, delta.bytes)
            .await
            .unwrap();
        let m = delta_manifest(delta.id, base.id);
        store.commit_point(&m).await.unwrap();
        assert_eq!(store.get_chunk(delta.id).await.unwrap(), v2);

        // A byte of the base's page 1, which the delta replaces.
        let flip = |at: usize| {
            damage_chunk(dir.path(), &base.id, |bytes| {
                bytes[CHUNK_HEADER_LEN + at] ^= 0x5a;
            });
        };
        flip(4096 + 10);
        assert_eq!(
            store.get_chunk(delta.id).await.unwrap(),
            v2,
            "async_only {async_only}"
        );
        assert!(matches!(
            store.get_chunk(base.id).await,
            Err(StoreError::CorruptChunk { id, .. }) if id == base.id
        ));
        let report = store.verify().await.unwrap();
        assert_eq!(report.points[0].damaged_chunks, vec![base.id]);

        // A byte of page 5, which the block keeps from its base.
        flip(4096 + 10);
        flip(5 * 4096 + 3);
        let err = store.get_chunk(delta.id).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::CorruptChunk { id, reason } if *id == delta.id && reason.contains(&base.id.to_string())),
            "async_only {async_only}: {err}"
        );
        let report = store.verify().await.unwrap();
        assert!(
            report.points[0].damaged_chunks.contains(&base.id),
            "{report:?}"
        );
    }
}

/// A delta on zeros has no base object: it is stored, committed, read,
/// verified and kept by garbage collection on its own.
#[tokio::test]
async fn a_delta_on_zeros_stands_alone() {
    for async_only in [false, true] {
        for upload in [false, true] {
            let (dir, store) = store_of_kind(async_only).await;
            let mut block = vec![0u8; CS as usize];
            block[4096..8192].copy_from_slice(&random(4096));
            block[CS as usize - 1] = 3;
            let target = ChunkId::of(&block);
            let last = (CS / 4096 - 1) as u16;
            let delta = encode_delta_chunk(
                target,
                CS,
                ZERO_BASE,
                &[
                    (1, &block[4096..8192]),
                    (last, &block[CS as usize - 4096..]),
                ],
                true,
            );
            assert!(
                put_object(&store, delta.id, &delta.bytes, upload)
                    .await
                    .unwrap()
            );
            let m = delta_manifest(delta.id, ZERO_BASE);
            assert_eq!(m.referenced_chunks(), HashSet::from([delta.id]));
            store.commit_point(&m).await.unwrap();
            assert_eq!(store.get_chunk(delta.id).await.unwrap(), block);
            assert_eq!(read_back(&store, &m, 0, 1).await, block);
            let report = store.gc(&HashSet::new()).await.unwrap();
            assert_eq!(report.chunks_deleted, 0, "{report:?}");
            assert!(store.verify().await.unwrap().all_ok());
            // Damage shows when it is read: never zeros or wrong pages.
            damage_chunk(dir.path(), &delta.id, |bytes| {
                let at = bytes.len() - 1;
                bytes[at] ^= 0x20;
            });
            assert!(store.get_chunk(delta.id).await.is_err());
            assert!(!store.verify().await.unwrap().all_ok());
        }
    }
}

#[tokio::test]
async fn gc_compacts_packs_and_the_survivors_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let packs_dir = dir.path().join(".packs");
    let pack_files = || -> usize {
        std::fs::read_dir(&packs_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".pack")
            })
            .count()
    };
    let store = Store::open_local(dir.path()).await.unwrap();
    // p1 holds three quarters of what is stored, p2 the rest.
    let big = random(12 * CS as usize);
    let small = random(4 * CS as usize);
    let d1 = upload_disk(&store, "d", &big).await;
    let d2 = upload_disk(&store, "d", &small).await;
    let (m1, m2) = (
        manifest("vm", "p1", vec![d1]),
        manifest("vm", "p2", vec![d2]),
    );
    store.commit_point(&m1).await.unwrap();
    store.commit_point(&m2).await.unwrap();
    drop(store);
    // Reopened, the store writes to new packs: the old ones are sealed
    // and may be compacted.
    let store = Store::open_local(dir.path()).await.unwrap();
    let before = pack_files();
    assert!(before >= 1);
    store.delete_point("vm", "p1").await.unwrap();
    let report = store.gc(&HashSet::new()).await.unwrap();
    assert_eq!(report.chunks_deleted, 12, "{report:?}");
    assert!(report.packs_compacted >= 1, "{report:?}");
    assert!(report.pack_bytes_freed >= 11 * u64::from(CS), "{report:?}");
    assert_eq!(read_back(&store, &m2, 0, 4).await, small);
    assert!(store.verify().await.unwrap().all_ok());
    drop(store);
    let store = Store::open_local(dir.path()).await.unwrap();
    assert_eq!(read_back(&store, &m2, 0, 4).await, small);
    assert_eq!(store.backend().list("chunks/").await.unwrap().len(), 4);
    // What is on disk now is about what p2 needs.
    let on_disk: u64 = std::fs::read_dir(&packs_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk < 6 * u64::from(CS), "{on_disk} bytes in packs");
    assert!(pack_files() <= before, "{} packs", pack_files());
}
