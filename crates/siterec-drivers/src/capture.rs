//! Reading source disks and detecting changed blocks.
//!
//! A source disk is a regular file (disk image) or a block device. [`scan`]
//! reads it in fixed-size blocks, hashes each block with BLAKE3 (all-zero
//! blocks are recognised without hashing) and hands every block that differs
//! from the last replicated state to a callback.
//!
//! Consistency: a recovery point must never silently mix blocks from
//! different moments. [`scan`] first tries a reflink snapshot (regular files on
//! btrfs / XFS / …); without one it does a *stable read* (compare the file's
//! identity and timestamps before and after, retry on change) and reports
//! `consistent: false` if the file never held still.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Hash of one block: `None` for an all-zero block (never shipped, never
/// stored), else the block's BLAKE3 hash.
pub type BlockHash = Option<[u8; 32]>;

/// Largest accepted block size (64 MiB).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// Target size of one read (several blocks are read at once). Small
/// enough that a batch is still in the reader's cache when it is hashed
/// and fingerprinted: 8 MiB batches made the replication benchmark's
/// initial copy about a tenth slower than 2 MiB ones.
const READ_BATCH: usize = 2 << 20;

/// Errors from opening or scanning a source disk.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The path does not exist.
    #[error("source disk {} does not exist", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The path exists but is neither a regular file nor a block device.
    #[error("source disk {} is a {kind}, not a regular file or block device", path.display())]
    NotADisk {
        /// The path given.
        path: PathBuf,
        /// What it is instead ("directory", "character device", …).
        kind: &'static str,
    },
    /// The disk cannot be opened for reading (permissions, …).
    #[error("source disk {} is not readable: {source}", path.display())]
    Unreadable {
        /// The path given.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// An I/O error while scanning.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A caller-supplied argument was rejected.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The `on_changed` callback failed; the scan was aborted.
    #[error("handling a changed block failed: {0:#}")]
    Callback(anyhow::Error),
    /// A persisted hash list is torn, truncated or of an unknown version.
    #[error("corrupt block hash list: {0}")]
    CorruptHashes(String),
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> CaptureError {
    CaptureError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What kind of object a [`DiskSource`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DiskKind {
    /// A regular file (disk image).
    File,
    /// A block device (`/dev/sdb`, `/dev/vg/lv`, …).
    BlockDevice,
}

/// A source disk: a regular file or a block device, checked to be readable.
#[derive(Debug, Clone)]
pub struct DiskSource {
    path: PathBuf,
    kind: DiskKind,
    size: u64,
}

impl DiskSource {
    /// Open `path`: it must exist, be a regular file or a block device, and
    /// be readable. The size is the file length, or `BLKGETSIZE64` for block
    /// devices.
    pub fn open(path: impl AsRef<Path>) -> Result<DiskSource, CaptureError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CaptureError::NotFound {
                path: path.to_path_buf(),
            },
            _ => CaptureError::Unreadable {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            DiskKind::File
        } else if ft.is_block_device() {
            DiskKind::BlockDevice
        } else {
            let what = if ft.is_dir() {
                "directory"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else {
                "special file"
            };
            return Err(CaptureError::NotADisk {
                path: path.to_path_buf(),
                kind: what,
            });
        };
        let file = File::open(path).map_err(|e| CaptureError::Unreadable {
            path: path.to_path_buf(),
            source: e,
        })?;
        let size = disk_size(&file, kind, path)?;
        Ok(DiskSource {
            path: path.to_path_buf(),
            kind,
            size,
        })
    }

    /// The path given to [`DiskSource::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// Size in bytes when opened (a scan re-reads the current size).
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// `_IOR(0x12, 114, size_t)` with the asm-generic ioctl encoding.
const BLKGETSIZE64: u64 =
    (2 << 30) | ((std::mem::size_of::<usize>() as u64) << 16) | (0x12 << 8) | 114;
/// `_IOW(0x94, 9, int)`.
const FICLONE: u64 = (1 << 30) | (4 << 16) | (0x94 << 8) | 9;

fn disk_size(file: &File, kind: DiskKind, path: &Path) -> Result<u64, CaptureError> {
    match kind {
        DiskKind::File => file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| io_err("stat", path, e)),
        DiskKind::BlockDevice => {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points to a live, properly aligned u64.
            let rc =
                unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
            if rc != 0 {
                return Err(io_err(
                    "BLKGETSIZE64 ioctl on",
                    path,
                    io::Error::last_os_error(),
                ));
            }
            Ok(size)
        }
    }
}

/// How a scan obtained a consistent view of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotMethod {
    /// A reflink (FICLONE) copy of the file was scanned: point-in-time.
    Reflink,
    /// The live file was read and checked not to have changed meanwhile.
    StableRead,
    /// Nothing guarantees consistency (block devices without a snapshot).
    None,
    /// A running VM's point-in-time view (QEMU fleecing), read over NBD.
    Fleece,
}

/// Options for [`scan`].
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Where a reflink snapshot of a regular file may be created. It must be
    /// on the same filesystem as the source for reflink to work. `None`
    /// disables snapshots (stable read only).
    pub scratch_dir: Option<PathBuf>,
    /// Stable-read attempts before giving up with `consistent: false` (≥ 1).
    pub max_attempts: u32,
    /// Pause between the "before" stat and the read (see [`scan`]).
    pub settle: Duration,
    /// Compute the [`page_fingerprints`] of every changed block on the
    /// reader threads, while the block is still in their cache, and hand
    /// them to `on_changed`.
    pub page_fingerprints: bool,
}

/// Bytes per page of [`page_fingerprints`].
pub const FINGERPRINT_PAGE: usize = 4096;

/// The 64-bit xxh3 of each [`FINGERPRINT_PAGE`]-byte page of `block` (the
/// last page may be short), into `out` (one per page; the rest of `out`
/// is left alone).
pub fn page_fingerprints(block: &[u8], out: &mut [u64]) {
    for (fp, page) in out.iter_mut().zip(block.chunks(FINGERPRINT_PAGE)) {
        *fp = page_fingerprint(page);
    }
}

/// The fingerprint of one page: its 64-bit xxh3.
pub fn page_fingerprint(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The [`page_fingerprints`] of each block of a batch (blocks `first..`)
/// that holds data and differs from `previous`; empty for the others.
fn batch_fingerprints(
    batch: &[u8],
    hashes: &[BlockHash],
    chunk: usize,
    first: usize,
    previous: Option<&[BlockHash]>,
) -> Vec<Vec<u64>> {
    batch
        .chunks(chunk)
        .zip(hashes)
        .enumerate()
        .map(|(k, (block, h))| {
            if h.is_none() || previous.and_then(|p| p.get(first + k)) == Some(h) {
                return Vec::new();
            }
            let mut fps = vec![0u64; block.len().div_ceil(FINGERPRINT_PAGE)];
            page_fingerprints(block, &mut fps);
            fps
        })
        .collect()
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            scratch_dir: None,
            max_attempts: 3,
            settle: Duration::from_millis(20),
            page_fingerprints: false,
        }
    }
}

/// Result of a [`scan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScanOutcome {
    /// Per-block hashes of the disk as captured (the new replicated state
    /// once the target has acknowledged every delivered block).
    pub hashes: Vec<BlockHash>,
    /// Whether all blocks come from one instant.
    pub consistent: bool,
    /// How consistency was obtained (or attempted).
    pub method: SnapshotMethod,
    /// Size of the disk as captured, in bytes.
    pub size_bytes: u64,
    /// Bytes read, over all attempts.
    pub bytes_read: u64,
    /// Non-zero blocks of the final state whose hash differs from `previous`.
    pub changed_blocks: u64,
    /// Number of `on_changed` calls, over all attempts.
    pub delivered_blocks: u64,
    /// Read attempts made (1 for a snapshot or a first-time-stable read).
    pub attempts: u32,
    /// The instant the captured content belongs to: when the snapshot was
    /// taken, or when the successful stable read began (the disk did not
    /// change from then until the read ended). For an inconsistent capture,
    /// when its last pass began.
    pub captured_at: std::time::SystemTime,
}

impl ScanOutcome {
    /// The recovery point consistency this scan supports: crash-consistent
    /// when consistent, else inconsistent.
    pub fn consistency(&self) -> siterec_core::Consistency {
        if self.consistent {
            siterec_core::Consistency::CrashConsistent
        } else {
            siterec_core::Consistency::Inconsistent
        }
    }
}

/// Whether `data` is all zeros (word-wise, no hashing).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle part of the slice.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0u64, |acc, &w| acc | w) == 0)
}

/// The [`BlockHash`] of one block: `None` if all zeros, else BLAKE3.
pub fn hash_block(data: &[u8]) -> BlockHash {
    if is_zero(data) {
        None
    } else {
        Some(*blake3::hash(data).as_bytes())
    }
}

const HASHES_MAGIC: &[u8; 4] = b"SRBH";
const HASHES_VERSION: u8 = 1;
/// Version 2 adds tag 2: a block stored as a delta chunk, hash then base.
const HASHES_VERSION_BASES: u8 = 2;
/// Version 3 names the block size (u32 LE after the version byte): a
/// state of one block size says nothing about blocks of another.
const HASHES_VERSION_SIZED: u8 = 3;
/// The block size of version 1 and 2 states, which do not name theirs:
/// the only one the agent used before version 3.
pub const LEGACY_BLOCK_SIZE: u32 = 256 * 1024;

/// Delta bases of a disk's blocks: block index → the base chunk its
/// (delta) chunk is read against.
pub type BlockBases = std::collections::BTreeMap<usize, [u8; 32]>;

/// Serialise a hash list for persistence: magic `SRBH`, version byte,
/// count (u64 LE), one tag byte per block (0 = zero, 1 = hash) followed by
/// the 32-byte hash for tag 1, then a BLAKE3 checksum of everything before.
pub fn encode_hashes(hashes: &[BlockHash]) -> Vec<u8> {
    encode(hashes, &BlockBases::new(), None)
}

/// The state of a disk of `block_size` blocks: [`encode_hashes`] with the
/// block size (version 3: a u32 LE after the version byte) and the delta
/// bases of some blocks (tag 2: the 32-byte hash then the 32-byte base).
pub fn encode_state(hashes: &[BlockHash], bases: &BlockBases, block_size: u32) -> Vec<u8> {
    encode(hashes, bases, Some(block_size))
}

fn encode(hashes: &[BlockHash], bases: &BlockBases, block_size: Option<u32>) -> Vec<u8> {
    let present = hashes.iter().filter(|h| h.is_some()).count();
    let mut out =
        Vec::with_capacity(4 + 1 + 4 + 8 + hashes.len() + present * 32 + bases.len() * 32 + 32);
    out.extend_from_slice(HASHES_MAGIC);
    match block_size {
        Some(size) => {
            out.push(HASHES_VERSION_SIZED);
            out.extend_from_slice(&size.to_le_bytes());
        }
        None if bases.is_empty() => out.push(HASHES_VERSION),
        None => out.push(HASHES_VERSION_BASES),
    }
    out.extend_from_slice(&(hashes.len() as u64).to_le_bytes());
    for (i, h) in hashes.iter().enumerate() {
        match (h, bases.get(&i)) {
            (None, _) => out.push(0),
            (Some(h), None) => {
                out.push(1);
                out.extend_from_slice(h);
            }
            (Some(h), Some(base)) => {
                out.push(2);
                out.extend_from_slice(h);
                out.extend_from_slice(base);
            }
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Inverse of [`encode_hashes`]; a torn, truncated or foreign file gives
/// [`CaptureError::CorruptHashes`]. Delta bases are dropped.
pub fn decode_hashes(bytes: &[u8]) -> Result<Vec<BlockHash>, CaptureError> {
    decode_state(bytes).map(|(h, _, _)| h)
}

/// Inverse of [`encode_state`] (and of [`encode_hashes`]): the hashes, the
/// delta bases and the block size ([`LEGACY_BLOCK_SIZE`] for versions 1
/// and 2).
pub fn decode_state(bytes: &[u8]) -> Result<(Vec<BlockHash>, BlockBases, u32), CaptureError> {
    let corrupt = |m: &str| CaptureError::CorruptHashes(m.to_string());
    if bytes.len() < 4 + 1 + 8 + 32 {
        return Err(corrupt("too short"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if &body[..4] != HASHES_MAGIC {
        return Err(corrupt("bad magic"));
    }
    let version = body[4];
    if !matches!(
        version,
        HASHES_VERSION | HASHES_VERSION_BASES | HASHES_VERSION_SIZED
    ) {
        return Err(CaptureError::CorruptHashes(format!(
            "unsupported version {version}"
        )));
    }
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("checksum mismatch (torn or modified file)"));
    }
    let (block_size, body) = if version == HASHES_VERSION_SIZED {
        if body.len() < 4 + 1 + 4 + 8 {
            return Err(corrupt("too short"));
        }
        let size = u32::from_le_bytes([body[5], body[6], body[7], body[8]]);
        // Drop 4 bytes of the magic so the count is where it is in v1/v2.
        (size, &body[4..])
    } else {
        (LEGACY_BLOCK_SIZE, body)
    };
    let mut count_bytes = [0u8; 8];
    count_bytes.copy_from_slice(&body[5..13]);
    let count = u64::from_le_bytes(count_bytes);
    let mut rest = &body[13..];
    if count > rest.len() as u64 {
        return Err(corrupt("count larger than data"));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut bases = BlockBases::new();
    for i in 0..count as usize {
        let (&tag, tail) = rest.split_first().ok_or_else(|| corrupt("truncated"))?;
        match tag {
            0 => {
                out.push(None);
                rest = tail;
            }
            1 | 2 if tag == 1 || version >= HASHES_VERSION_BASES => {
                let len = if tag == 1 { 32 } else { 64 };
                if tail.len() < len {
                    return Err(corrupt("truncated hash"));
                }
                let mut h = [0u8; 32];
                h.copy_from_slice(&tail[..32]);
                out.push(Some(h));
                if tag == 2 {
                    let mut b = [0u8; 32];
                    b.copy_from_slice(&tail[32..64]);
                    bases.insert(i, b);
                }
                rest = &tail[len..];
            }
            t => {
                return Err(CaptureError::CorruptHashes(format!("bad tag {t}")));
            }
        }
    }
    if !rest.is_empty() {
        return Err(corrupt("trailing data"));
    }
    Ok((out, bases, block_size))
}

/// Identity and timestamps of the file, compared before and after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Removes the snapshot file when dropped.
struct TempSnapshot {
    path: PathBuf,
}

impl Drop for TempSnapshot {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "removing snapshot failed: {e}");
        }
    }
}

static SNAPSHOT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Try to reflink `source` into a new file in `scratch_dir`. `Ok(None)` when
/// the filesystem cannot do it (the caller falls back to a stable read).
fn try_reflink(source: &Path, scratch_dir: &Path) -> Result<Option<TempSnapshot>, CaptureError> {
    let src = File::open(source).map_err(|e| CaptureError::Unreadable {
        path: source.to_path_buf(),
        source: e,
    })?;
    let n = SNAPSHOT_COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = scratch_dir.join(format!(".siterec-snapshot-{}-{n}", std::process::id()));
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_err("creating snapshot file", &path, e))?;
    let guard = TempSnapshot { path };
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(Some(guard));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS) => {
            tracing::debug!(source = %source.display(), "reflink unsupported ({err}); using stable read");
        }
        _ => {
            tracing::warn!(source = %source.display(), "reflink snapshot failed ({err}); using stable read");
        }
    }
    Ok(None) // guard dropped: the empty file is removed
}

/// Per-scan state shared by the attempts.
struct Delivery<'a, F> {
    /// What the consumer is known to have for each block: the last delivered
    /// hash, or `previous` before any delivery; `None` = nothing known.
    baseline: Vec<Option<BlockHash>>,
    on_changed: &'a mut F,
    delivered: u64,
    /// Whether readers compute page fingerprints of changed blocks.
    fingerprints: bool,
}

/// Scan `source` in `chunk_size` blocks (the last one may be short).
///
/// For every non-zero block whose hash differs from `previous` (every
/// non-zero block when `previous` is `None` or has a different length),
/// `on_changed(index, data, hash, fingerprints)` is called (`hash`: the
/// block's BLAKE3; `fingerprints`: its [`page_fingerprints`] when
/// `options.page_fingerprints` is set, else empty — and empty for a block
/// that a retried attempt delivers although it equals `previous`).
/// Blocking; run it in `spawn_blocking`.
///
/// # Consistency
///
/// 1. Regular file and `options.scratch_dir` set: try a reflink (FICLONE)
///    copy into the scratch dir, scan the copy (point-in-time:
///    `method: Reflink`, `consistent: true`), delete it.
/// 2. Otherwise (e.g. ext4, where FICLONE fails with EOPNOTSUPP / EXDEV /
///    EINVAL) a *stable read*: record (dev, inode, size, mtime ns, ctime ns),
///    wait `options.settle` (20 ms), read and hash everything, stat again. If
///    anything changed, retry, up to `options.max_attempts` attempts; after the
///    last failed one, return `consistent: false`.
///
///    The pause exists because ext4 (like most Linux filesystems) stamps
///    mtime/ctime from a coarse clock that advances once per timer tick
///    (1–10 ms), not from the nanosecond clock. A write landing in the same
///    tick as the "before" stat would get exactly the "before" timestamps and
///    go unnoticed. Sleeping past a tick boundary before reading guarantees
///    that any write that can race with the read gets a newer timestamp.
/// 3. Block devices: writes to a block device (by a mounted filesystem or a
///    VM) do not update any inode timestamp we could stat, so a stable read
///    cannot be verified. Without a snapshot, one pass is made and the
///    outcome is `consistent: false`, `method: None`.
///
/// # Delivery across attempts
///
/// A retried attempt re-delivers a block only when its content differs from
/// what was last delivered for that index (or from `previous` if never
/// delivered). So after a successful return, for each index whose final hash
/// is non-zero, the last data delivered for it (if any) has exactly that
/// hash, and indexes never delivered still equal `previous`. Blocks that
/// became all-zero are never delivered: build the point from `hashes`.
///
/// An error from `on_changed` aborts the scan with [`CaptureError::Callback`].
pub fn scan<F>(
    source: &DiskSource,
    chunk_size: u32,
    previous: Option<&[BlockHash]>,
    options: &ScanOptions,
    mut on_changed: F,
) -> Result<ScanOutcome, CaptureError>
where
    F: FnMut(u64, &[u8], &[u8; 32], &[u64]) -> anyhow::Result<()>,
{
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
        return Err(CaptureError::InvalidArgument(format!(
            "chunk_size must be 1..={MAX_CHUNK_SIZE}, got {chunk_size}"
        )));
    }
    let max_attempts = options.max_attempts.max(1);
    let mut delivery = Delivery {
        baseline: Vec::new(),
        on_changed: &mut on_changed,
        delivered: 0,
        fingerprints: options.page_fingerprints,
    };
    let mut bytes_read = 0u64;

    let snapshot_time = std::time::SystemTime::now();
    if source.kind == DiskKind::File
        && let Some(dir) = &options.scratch_dir
        && let Some(snapshot) = try_reflink(&source.path, dir)?
    {
        let file = File::open(&snapshot.path).map_err(|e| CaptureError::Unreadable {
            path: snapshot.path.clone(),
            source: e,
        })?;
        let size = file
            .metadata()
            .map_err(|e| io_err("stat", &snapshot.path, e))?
            .len();
        let pass = read_pass(
            &file,
            &snapshot.path,
            size,
            chunk_size,
            previous,
            &mut delivery,
        )?;
        bytes_read += pass.bytes_read;
        let hashes = pass.hashes.ok_or_else(|| {
            io_err(
                "reading snapshot",
                &snapshot.path,
                io::Error::from(io::ErrorKind::UnexpectedEof),
            )
        })?;
        drop(snapshot);
        let mut o = outcome(
            hashes,
            true,
            SnapshotMethod::Reflink,
            size,
            bytes_read,
            previous,
            delivery.delivered,
            1,
        );
        o.captured_at = snapshot_time;
        return Ok(o);
    }

    let path = &source.path;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CaptureError::NotFound { path: path.clone() },
            _ => CaptureError::Unreadable {
                path: path.clone(),
                source: e,
            },
        })?;
        advise_sequential(&file);

        if source.kind == DiskKind::BlockDevice {
            let pass_time = std::time::SystemTime::now();
            let size = disk_size(&file, DiskKind::BlockDevice, path)?;
            let pass = read_pass(&file, path, size, chunk_size, previous, &mut delivery)?;
            bytes_read += pass.bytes_read;
            let hashes = pass.hashes.ok_or_else(|| {
                io_err(
                    "reading",
                    path,
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                )
            })?;
            let mut o = outcome(
                hashes,
                false,
                SnapshotMethod::None,
                size,
                bytes_read,
                previous,
                delivery.delivered,
                attempt,
            );
            o.captured_at = pass_time;
            return Ok(o);
        }

        let pass_time = std::time::SystemTime::now();
        let before = Fingerprint::of(&file.metadata().map_err(|e| io_err("stat", path, e))?);
        std::thread::sleep(options.settle);
        let pass = read_pass(
            &file,
            path,
            before.size,
            chunk_size,
            previous,
            &mut delivery,
        )?;
        bytes_read += pass.bytes_read;
        let after_fd = Fingerprint::of(&file.metadata().map_err(|e| io_err("stat", path, e))?);
        // The path may have been replaced (rename over it) meanwhile.
        let after_path = std::fs::metadata(path).map(|m| Fingerprint::of(&m)).ok();
        let stable = pass.hashes.is_some() && after_fd == before && after_path == Some(before);

        if stable || attempt >= max_attempts {
            if let Some(hashes) = pass.hashes {
                if !stable {
                    tracing::warn!(
                        path = %path.display(),
                        attempts = attempt,
                        "disk kept changing while being read; recovery point is not consistent"
                    );
                }
                let mut o = outcome(
                    hashes,
                    stable,
                    SnapshotMethod::StableRead,
                    before.size,
                    bytes_read,
                    previous,
                    delivery.delivered,
                    attempt,
                );
                o.captured_at = pass_time;
                return Ok(o);
            }
            if attempt >= max_attempts {
                return Err(io_err(
                    "reading (file kept shrinking)",
                    path,
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ));
            }
        }
        tracing::debug!(path = %path.display(), attempt, "disk changed during read; retrying");
        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
    }
}

#[allow(clippy::too_many_arguments)]
fn outcome(
    hashes: Vec<BlockHash>,
    consistent: bool,
    method: SnapshotMethod,
    size_bytes: u64,
    bytes_read: u64,
    previous: Option<&[BlockHash]>,
    delivered_blocks: u64,
    attempts: u32,
) -> ScanOutcome {
    let prev = previous.filter(|p| p.len() == hashes.len());
    let changed_blocks = hashes
        .iter()
        .enumerate()
        .filter(|(i, h)| h.is_some() && prev.is_none_or(|p| p[*i] != **h))
        .count() as u64;
    ScanOutcome {
        hashes,
        consistent,
        method,
        size_bytes,
        bytes_read,
        changed_blocks,
        delivered_blocks,
        attempts,
        captured_at: std::time::SystemTime::now(),
    }
}

fn advise_sequential(file: &File) {
    // SAFETY: plain advisory syscall on an open fd.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
}

struct Pass {
    /// `None` when the file ended early (it shrank during the read).
    hashes: Option<Vec<BlockHash>>,
    bytes_read: u64,
}

/// Threads that read and hash batches of a pass side by side.
const READERS: usize = 2;

/// One batch read and hashed by a reader thread.
struct Batch {
    buf: Vec<u8>,
    len: usize,
    hashes: Vec<BlockHash>,
    /// Page fingerprints, one per page of each block; empty for blocks not
    /// changed from `previous` (or when not asked for).
    fps: Vec<Vec<u64>>,
    /// Bytes actually read (holes are not).
    read: u64,
}

/// What a reader thread hands over for one batch.
enum BatchResult {
    Ready(Batch),
    /// The file ended before this batch (it shrank during the pass).
    Eof,
}

/// The data ranges of `file` within `[start, end)` (everything else is a
/// hole: reads as zeros), from `SEEK_DATA`/`SEEK_HOLE`; `None` where the
/// file cannot say (block devices, filesystems without it).
fn data_ranges(file: &File, start: u64, end: u64) -> Option<Vec<std::ops::Range<u64>>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let at = i64::try_from(pos).ok()?;
        // SAFETY: lseek on a valid descriptor; only the returned offset is
        // used (every read here is positional, so the file position the
        // call moves is irrelevant, also across threads).
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data at or after `pos`.
            return (io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)).then_some(out);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let hole = (hole as u64).min(end);
        if hole <= data {
            return None; // not a sane answer: read everything
        }
        out.push(data..hole);
        pos = hole;
    }
    Some(out)
}

/// Reads the batch at `offset` into `buf` and hashes its blocks, reading
/// only what is not a hole: blocks entirely in holes are all-zero
/// (`None`) without a read, blocks partly in a hole are zero-filled there
/// first. A sparse disk image costs only its data. Returns the hashes and
/// the bytes read.
fn read_batch(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    chunk: usize,
) -> io::Result<(Vec<BlockHash>, u64)> {
    let end = offset + buf.len() as u64;
    let Some(ranges) = data_ranges(file, offset, end) else {
        file.read_exact_at(buf, offset)?;
        return Ok((
            buf.chunks(chunk).map(hash_block).collect(),
            buf.len() as u64,
        ));
    };
    let blocks = buf.len().div_ceil(chunk);
    // Per block: how many of its bytes are data.
    let mut data_bytes = vec![0usize; blocks];
    for r in &ranges {
        let (a, b) = ((r.start - offset) as usize, (r.end - offset) as usize);
        let mut i = a / chunk;
        while i < blocks && i * chunk < b {
            let (s, e) = (i * chunk, ((i + 1) * chunk).min(buf.len()));
            data_bytes[i] += e.min(b) - s.max(a);
            i += 1;
        }
    }
    for (i, block) in buf.chunks_mut(chunk).enumerate() {
        if data_bytes[i] > 0 && data_bytes[i] < block.len() {
            block.fill(0);
        }
    }
    let mut read = 0;
    for r in &ranges {
        let (a, b) = ((r.start - offset) as usize, (r.end - offset) as usize);
        file.read_exact_at(&mut buf[a..b], r.start)?;
        read += r.end - r.start;
    }
    let hashes = buf
        .chunks(chunk)
        .zip(&data_bytes)
        .map(|(block, &n)| if n == 0 { None } else { hash_block(block) })
        .collect();
    Ok((hashes, read))
}

/// Reads the file in `READ_BATCH` batches and hashes their blocks. Reading
/// (a copy out of the page cache) and hashing take about the same time, so
/// [`READERS`] threads each take every other batch, and this thread takes
/// the results back in order to compare and deliver them. Each reader
/// recycles two buffers, so memory stays at `2 × READERS × READ_BATCH`.
fn read_pass<F>(
    file: &File,
    path: &Path,
    size: u64,
    chunk_size: u32,
    previous: Option<&[BlockHash]>,
    delivery: &mut Delivery<'_, F>,
) -> Result<Pass, CaptureError>
where
    F: FnMut(u64, &[u8], &[u8; 32], &[u64]) -> anyhow::Result<()>,
{
    let chunk = u64::from(chunk_size);
    let blocks = size.div_ceil(chunk);
    let blocks_usize = usize::try_from(blocks)
        .map_err(|_| CaptureError::InvalidArgument("disk has too many blocks".into()))?;
    let previous = previous.filter(|p| p.len() == blocks_usize);
    if delivery.baseline.len() != blocks_usize {
        // First attempt, or the size changed: start from `previous`.
        delivery.baseline = match previous {
            Some(p) => p.iter().map(|h| Some(*h)).collect(),
            None => vec![None; blocks_usize],
        };
    }

    let per_batch = (READ_BATCH as u64 / chunk).max(1);
    let batch_bytes = per_batch * chunk;
    let batches = blocks.div_ceil(per_batch);
    let readers = (READERS as u64).min(batches.max(1)) as usize;
    let fingerprint = delivery.fingerprints;
    let mut hashes = Vec::with_capacity(blocks_usize);
    let mut bytes_read = 0u64;

    std::thread::scope(|scope| -> Result<Pass, CaptureError> {
        let mut results = Vec::with_capacity(readers);
        let mut recycle = Vec::with_capacity(readers);
        for r in 0..readers {
            let (res_tx, res_rx) =
                std::sync::mpsc::sync_channel::<Result<BatchResult, CaptureError>>(1);
            let (buf_tx, buf_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            for _ in 0..2 {
                // Cannot fail: the receiver is alive.
                let _ = buf_tx.send(vec![0u8; batch_bytes as usize]);
            }
            results.push(res_rx);
            recycle.push(buf_tx);
            scope.spawn(move || {
                let mut b = r as u64;
                while b < batches {
                    // Ends when the consumer stops (it drops its channels).
                    let Ok(mut buf) = buf_rx.recv() else { return };
                    let offset = b * batch_bytes;
                    let len = batch_bytes.min(size - offset) as usize;
                    let out = match read_batch(file, &mut buf[..len], offset, chunk as usize) {
                        Ok((hashes, read)) => {
                            let fps = if fingerprint {
                                let first = (offset / chunk) as usize;
                                batch_fingerprints(
                                    &buf[..len],
                                    &hashes,
                                    chunk as usize,
                                    first,
                                    previous,
                                )
                            } else {
                                vec![Vec::new(); hashes.len()]
                            };
                            Ok(BatchResult::Ready(Batch {
                                hashes,
                                fps,
                                buf,
                                len,
                                read,
                            }))
                        }
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(BatchResult::Eof),
                        Err(e) => Err(io_err("reading", path, e)),
                    };
                    let stop = !matches!(out, Ok(BatchResult::Ready(_)));
                    if res_tx.send(out).is_err() || stop {
                        return;
                    }
                    b += readers as u64;
                }
            });
        }
        let mut index = 0u64;
        for b in 0..batches {
            let r = (b % readers as u64) as usize;
            let batch = match results[r].recv() {
                Ok(Ok(BatchResult::Ready(batch))) => batch,
                Ok(Ok(BatchResult::Eof)) => {
                    return Ok(Pass {
                        hashes: None,
                        bytes_read,
                    });
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(io_err(
                        "reading",
                        path,
                        io::Error::other("a reader thread stopped"),
                    ));
                }
            };
            bytes_read += batch.read;
            for ((block, h), fps) in batch.buf[..batch.len]
                .chunks(chunk as usize)
                .zip(batch.hashes)
                .zip(&batch.fps)
            {
                let i = index as usize;
                if let Some(hash) = h.as_ref().filter(|_| delivery.baseline[i] != Some(h)) {
                    (delivery.on_changed)(index, block, hash, fps)
                        .map_err(CaptureError::Callback)?;
                    delivery.baseline[i] = Some(h);
                    delivery.delivered += 1;
                }
                hashes.push(h);
                index += 1;
            }
            // The reader may have finished: then the buffer is not needed.
            let _ = recycle[r].send(batch.buf);
        }
        Ok(Pass {
            hashes: Some(hashes),
            bytes_read,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading around holes gives exactly the hashes of reading everything:
    /// blocks wholly in holes, partly in holes (data not block-aligned),
    /// full of data, written zeros, and a short last block.
    #[test]
    fn reading_around_holes_hashes_like_reading_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let chunk = 64 * 1024;
        let size = 40 * chunk as u64 + 1000;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        let pattern = |n: usize, seed: u8| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
                .collect()
        };
        f.write_all_at(&pattern(chunk * 2, 1), 3 * chunk as u64)
            .unwrap();
        f.write_all_at(&pattern(100, 2), 10 * chunk as u64 + 500)
            .unwrap();
        f.write_all_at(&pattern(5000, 3), 20 * chunk as u64 - 2500)
            .unwrap();
        f.write_all_at(&vec![0u8; chunk], 30 * chunk as u64)
            .unwrap();
        f.write_all_at(&pattern(10, 4), size - 10).unwrap();
        f.sync_all().unwrap();

        let expect: Vec<BlockHash> = std::fs::read(&path)
            .unwrap()
            .chunks(chunk)
            .map(hash_block)
            .collect();
        let mut buf = vec![0xAAu8; size as usize];
        let (got, read) = read_batch(&f, &mut buf, 0, chunk).unwrap();
        assert_eq!(got, expect);
        assert!(read < size / 2, "holes were read: {read} of {size} bytes");
        let non_zero = got.iter().filter(|h| h.is_some()).count();
        assert_eq!(non_zero, 2 + 1 + 2 + 1, "{got:?}");
        // A batch that starts inside the file, across a partly-data block.
        let off = 10 * chunk as u64;
        let mut buf = vec![0x55u8; 12 * chunk];
        let (got, _) = read_batch(&f, &mut buf, off, chunk).unwrap();
        assert_eq!(got, expect[10..22]);
        // The ranges the filesystem reports cover every written byte.
        let ranges = data_ranges(&f, 0, size).expect("this filesystem reports holes");
        for (at, len) in [(3 * chunk as u64, 2 * chunk as u64), (size - 10, 10)] {
            assert!(
                ranges.iter().any(|r| r.start <= at && at + len <= r.end),
                "{ranges:?} miss {at}+{len}"
            );
        }
    }
}
