//! Chunk objects of a [`LocalDir`](crate::LocalDir) appended to pack files.
//!
//! One file per chunk costs the filesystem an inode, a directory entry, a
//! rename and a lookup for every megabyte stored; on the disks we run on
//! that metadata costs as much as a fifth of the initial copy's time
//! (`scripts/disk-floor`). With packs, chunk objects (keys that
//! [`parse_chunk_key`] accepts) are appended to a few large files under
//! `.packs/`, found through an index held in memory, and everything else
//! stays one file per object. The layout is in `FORMAT.md` ("Packs"); in
//! short:
//!
//! * `.packs/<seq>.pack` — entries, each on a page boundary: a 64-byte
//!   header (magic, the object's 32 key bytes, where its data starts, its
//!   length, XXH3 of the data, XXH3 of the header) and the data. Objects of
//!   [`PAGE_DATA_MIN`] bytes or more start on the next page, so a chunk
//!   received into a page-aligned buffer is written as it lies, with
//!   `O_DIRECT`; smaller ones follow their header.
//! * `.packs/<seq>.idx` — the pack's live entries and the length they
//!   cover, rewritten at each barrier after the pack's data is synced.
//!
//! Writers take an idle pack (or start one), append, and give it back; a
//! pack is sealed at [`PACK_TARGET`] bytes and never appended to again, nor
//! is any pack found on disk: a reopened store starts new packs, so what a
//! crash left at the end of a pack is never overwritten. Opening reads
//! each index, then scans the pack past what it covers (all of it if the
//! index is missing or damaged), keeping entries while each is whole and
//! matches its checksums: chunks received since the last barrier that
//! reached the disk are kept, a torn one and whatever follows it are dead
//! space. Deletes drop index entries; [`Packs::compact`] copies the live
//! entries out of packs that are mostly dead and removes them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use xxhash_rust::xxh3::xxh3_64;

use crate::backend::{DIRECT_ALIGN, TEMP_PREFIX, padded_len, with_aligned};
use crate::bufpool::Pool;
use crate::error::StoreError;
use crate::keyindex::KeyIndex;
use crate::store::parse_chunk_key;

/// The directory of the packs, under the store's root. Keys cannot start
/// with `.`, so it is never taken for an object or listed as one.
pub(crate) const PACKS_DIR: &str = ".packs";
/// A pack is sealed once it is this long.
pub(crate) const PACK_TARGET: u64 = 64 << 20;
/// Objects at least this long start on a page of their own.
pub(crate) const PAGE_DATA_MIN: usize = 64 * 1024;
/// [`Packs::compact`] rewrites sealed packs whose live entries fill less
/// than this fraction of the file.
pub(crate) const COMPACT_BELOW: f64 = 0.5;
/// Sealed packs shorter than this (each restart seals the packs it had
/// open, mostly part-filled)...
pub(crate) const SMALL_PACK: u64 = PACK_TARGET / 4;
/// ...are merged by [`Packs::compact`] once there are this many (two
/// restarts' worth with four writers): fewer files to open and index,
/// without copying a few megabytes again at every gc.
pub(crate) const MERGE_SMALL_AT: usize = 8;

const ENTRY_MAGIC: &[u8; 8] = b"SRPKENT1";
const INDEX_MAGIC: &[u8; 8] = b"SRPKIDX1";
const HEADER_LEN: usize = 64;
/// Bytes of an index before its entries, and of each entry.
const INDEX_HEAD_LEN: usize = 28;
const INDEX_ENTRY_LEN: usize = 48;
/// Largest object a pack takes (chunk objects are at most 64 MiB and a
/// little).
const MAX_OBJECT: usize = 256 << 20;
/// Packs are numbered below this, and entries start before this offset
/// (so that a location fits 16 bytes).
const MAX_SEQ: u64 = u32::MAX as u64;
const MAX_ENTRY_OFF: u64 = (u32::MAX as u64) * DIRECT_ALIGN as u64;

/// Page-sized, page-aligned header buffers (over-allocated by a page).
static HEADER_PAGES: Pool = Pool::new(16, 2 * DIRECT_ALIGN);

/// Entries of one pack, with their objects' key bytes.
type Entries = Vec<([u8; 32], Loc)>;

/// Where an object lies: pack `pack`, entry at `off`, data at
/// `off + data_off`, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    /// The entry's offset in pages.
    page: u32,
    data_off: u32,
    len: u32,
}

impl Loc {
    /// `off` is a multiple of [`DIRECT_ALIGN`]; `pack` and `off / 4096`
    /// fit 32 bits (packs are numbered below 2^32 and are far smaller than
    /// 16 TiB): checked where packs are numbered and entries read.
    fn new(pack: u64, off: u64, data_off: u32, len: u32) -> Loc {
        Loc {
            pack: pack as u32,
            page: (off / DIRECT_ALIGN as u64) as u32,
            data_off,
            len,
        }
    }

    fn pack(&self) -> u64 {
        u64::from(self.pack)
    }

    fn off(&self) -> u64 {
        u64::from(self.page) * DIRECT_ALIGN as u64
    }

    /// Bytes of the pack the entry takes, header and padding included.
    fn span(&self) -> u64 {
        padded_len(self.data_off as usize + self.len as usize) as u64
    }
}

#[derive(Debug, Default)]
struct PackMeta {
    /// End of the last complete entry.
    len: u64,
    /// Length of the file: `len`, or more where a crash or a failed write
    /// left a dead tail.
    file_len: u64,
    /// Bytes of the entries the index points at.
    live: u64,
    /// Changes since the pack's index file was last written (0: it is up
    /// to date).
    changed: u64,
    /// No more appends.
    sealed: bool,
}

#[derive(Default)]
struct Index {
    /// 48 bytes per object (see [`KeyIndex`]).
    map: KeyIndex<Loc>,
    packs: BTreeMap<u64, PackMeta>,
}

impl Index {
    /// Records `loc` for `id`; the entry it replaces, if any, is dead.
    fn insert(&mut self, id: [u8; 32], loc: Loc) {
        if let Some(meta) = self.packs.get_mut(&loc.pack()) {
            meta.live += loc.span();
            meta.changed += 1;
        }
        if let Some(old) = self.map.insert(id, loc) {
            self.forget(old);
        }
    }

    fn forget(&mut self, old: Loc) {
        if let Some(meta) = self.packs.get_mut(&old.pack()) {
            meta.live = meta.live.saturating_sub(old.span());
            meta.changed += 1;
        }
    }
}

/// A pack open for appending, held by one writer at a time.
struct Appender {
    seq: u64,
    path: PathBuf,
    file: File,
    /// The same file without `O_DIRECT`, for small entries (opened when
    /// first needed).
    buffered: Option<File>,
    len: u64,
    direct: bool,
}

/// The packs of one store directory (see the module docs).
pub(crate) struct Packs {
    dir: PathBuf,
    index: RwLock<Index>,
    idle: Mutex<Vec<Appender>>,
    next_seq: AtomicU64,
    /// One barrier or compaction at a time.
    barrier: Mutex<()>,
}

impl std::fmt::Debug for Packs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packs").field("dir", &self.dir).finish()
    }
}

/// What [`Packs::compact`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    /// Packs rewritten and removed.
    pub packs_removed: u64,
    /// Live entries copied into new packs.
    pub entries_moved: u64,
    /// Bytes of pack files freed (their length, less what was copied).
    pub bytes_freed: u64,
}

/// The 32 key bytes of `key` if it is a chunk key (a pack may hold it).
pub(crate) fn packable(key: &str) -> Option<[u8; 32]> {
    parse_chunk_key(key).map(|id| id.0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Packs {
    /// Loads the packs under `root` (none yet is fine). Changes nothing on
    /// disk: a read-only user of the store may open it while its owner is
    /// away.
    pub(crate) fn open(root: &Path) -> Result<Packs, StoreError> {
        let dir = root.join(PACKS_DIR);
        let mut packs = Vec::new();
        let mut indexes = std::collections::HashSet::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(|e| StoreError::io("list", &dir, e))?;
                    let name = e.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if let Some(seq) = name.strip_suffix(".pack").and_then(parse_seq) {
                        if seq > MAX_SEQ {
                            return Err(StoreError::io(
                                "open pack",
                                dir.join(name),
                                std::io::Error::other(format!(
                                    "pack numbers stop at {MAX_SEQ:016x}: this is not a pack this version wrote"
                                )),
                            ));
                        }
                        packs.push(seq);
                    } else if let Some(seq) = name.strip_suffix(".idx").and_then(parse_seq) {
                        indexes.insert(seq);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        }
        packs.sort_unstable();
        let mut index = Index::default();
        for &seq in &packs {
            let path = pack_path(&dir, seq);
            let file = match File::open(&path) {
                Ok(f) => f,
                // Removed since the listing (its owner compacted it).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("open", &path, e)),
            };
            let file_len = file
                .metadata()
                .map_err(|e| StoreError::io("stat", &path, e))?
                .len();
            let from_index = if indexes.contains(&seq) {
                read_index(&dir, seq, file_len)?
            } else {
                None
            };
            // Past what the index covers (all of it without one), whole
            // entries written since the last barrier may follow.
            let (mut entries, covered) = from_index.unwrap_or_default();
            let (more, len) = scan(&file, &path, seq, covered, file_len)?;
            let scanned = !more.is_empty() || len != covered;
            if scanned {
                tracing::info!(pack = %path.display(), entries = more.len(), "kept whole entries past the pack's index");
            }
            entries.extend(more);
            index.packs.insert(
                seq,
                PackMeta {
                    len,
                    file_len,
                    live: 0,
                    // A scanned pack gets its index at the next barrier.
                    changed: u64::from(scanned),
                    sealed: true,
                },
            );
            for (id, loc) in entries {
                // Later packs win: an entry copied by a compaction that
                // stopped before removing the old pack.
                index.insert(id, loc);
            }
            if !scanned && let Some(meta) = index.packs.get_mut(&seq) {
                meta.changed = 0;
            }
        }
        let next = packs.last().map_or(1, |s| s + 1);
        Ok(Packs {
            dir,
            index: RwLock::new(index),
            idle: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(next),
            barrier: Mutex::new(()),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a pack holds the object `id`.
    pub(crate) fn contains(&self, id: &[u8; 32]) -> bool {
        self.read().map.contains_key(id)
    }

    /// The key bytes of every object the packs hold.
    pub(crate) fn ids(&self) -> Vec<[u8; 32]> {
        let ix = self.read();
        let mut ids = Vec::with_capacity(ix.map.len());
        ix.map.for_each(|id, _| ids.push(*id));
        ids
    }

    /// Drops object `id`; whether a pack held it.
    pub(crate) fn delete(&self, id: &[u8; 32]) -> bool {
        let mut ix = self.write();
        match ix.map.remove(id) {
            Some(old) => {
                ix.forget(old);
                true
            }
            None => false,
        }
    }

    /// Stores `data` as object `id`.
    pub(crate) fn put_bytes(&self, id: &[u8; 32], data: &[u8]) -> Result<(), StoreError> {
        self.put_with(id, data.len(), &mut |buf| {
            buf.copy_from_slice(data);
            Ok(())
        })
    }

    /// Stores an object of `len` bytes that `fill` writes into the buffer
    /// it is appended from.
    pub(crate) fn put_with(
        &self,
        id: &[u8; 32],
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        check_len(len)?;
        let data_off = if len >= PAGE_DATA_MIN {
            DIRECT_ALIGN
        } else {
            HEADER_LEN
        };
        with_aligned(padded_len(data_off + len), |buf| {
            let (head, rest) = buf.split_at_mut(data_off);
            let (data, pad) = rest.split_at_mut(len);
            fill(data)?;
            pad.fill(0);
            head[..HEADER_LEN].copy_from_slice(&entry_header(id, data_off, data));
            head[HEADER_LEN..].fill(0);
            self.append(id, &[buf], data_off, len)
        })
    }

    /// Stores `buf[..len]` as object `id`; `buf` is page-aligned and
    /// `padded_len(len)` long, zeros past `len`: a large object is written
    /// from it as it lies, after a header page.
    pub(crate) fn put_aligned(
        &self,
        id: &[u8; 32],
        buf: &[u8],
        len: usize,
    ) -> Result<(), StoreError> {
        check_len(len)?;
        let data = buf.get(..len).ok_or_else(|| {
            StoreError::Task(format!(
                "an object of {len} bytes in a buffer of {}",
                buf.len()
            ))
        })?;
        if len < PAGE_DATA_MIN
            || buf.len() != padded_len(len)
            || buf.as_ptr().align_offset(DIRECT_ALIGN) != 0
        {
            return self.put_bytes(id, data);
        }
        HEADER_PAGES.with(|raw| {
            if raw.len() < 2 * DIRECT_ALIGN {
                *raw = vec![0u8; 2 * DIRECT_ALIGN];
            }
            let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
            let page = &mut raw[start..start + DIRECT_ALIGN];
            page[..HEADER_LEN].copy_from_slice(&entry_header(id, DIRECT_ALIGN, data));
            page[HEADER_LEN..].fill(0);
            self.append(id, &[page, buf], DIRECT_ALIGN, len)
        })
    }

    /// Appends the entry `parts` (header first, each a whole number of
    /// pages) to an idle pack and records it.
    fn append(
        &self,
        id: &[u8; 32],
        parts: &[&[u8]],
        data_off: usize,
        len: usize,
    ) -> Result<(), StoreError> {
        let mut app = self.take_appender()?;
        let off = app.len;
        // Small objects (a delta's few pages) through the page cache, as
        // small files were: one copy instead of a round trip to the
        // device each, and a restore soon after finds them there.
        if let Err(e) = app.write_at(parts, off, data_off == DIRECT_ALIGN) {
            // Part of the entry may be in the file: no more appends here.
            let path = app.path.clone();
            if let Some(meta) = self.write().packs.get_mut(&app.seq) {
                meta.sealed = true;
                meta.file_len = meta.file_len.max(off + DIRECT_ALIGN as u64);
            }
            return Err(StoreError::io("append to pack", path, e));
        }
        let span: u64 = parts.iter().map(|p| p.len() as u64).sum();
        app.len = off + span;
        let sealed = app.len >= PACK_TARGET.min(MAX_ENTRY_OFF);
        {
            let mut ix = self.write();
            if let Some(meta) = ix.packs.get_mut(&app.seq) {
                meta.len = app.len;
                meta.file_len = app.len;
                meta.sealed = sealed;
            }
            ix.insert(*id, Loc::new(app.seq, off, data_off as u32, len as u32));
        }
        if !sealed {
            lock(&self.idle).push(app);
        }
        Ok(())
    }

    /// An idle open pack, or a new one.
    fn take_appender(&self) -> Result<Appender, StoreError> {
        if let Some(app) = lock(&self.idle).pop() {
            return Ok(app);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let path = pack_path(&self.dir, seq);
        if seq > MAX_SEQ {
            return Err(StoreError::io(
                "create pack",
                path,
                std::io::Error::other(
                    "no pack numbers left: copy the store's objects to a new store",
                ),
            ));
        }
        let create = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let opened = match create(true) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.dir)
                    .map_err(|e| StoreError::io("create directory", &self.dir, e))?;
                create(true)
            }
            other => other,
        };
        let (file, direct) = match opened {
            Ok(f) => (f, true),
            // No direct I/O on this filesystem (tmpfs); the file was
            // created before the flag was refused.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map(|f| (f, false))
                .map_err(|e| StoreError::io("create", &path, e))?,
            Err(e) => return Err(StoreError::io("create", &path, e)),
        };
        self.write().packs.insert(seq, PackMeta::default());
        Ok(Appender {
            seq,
            path,
            file,
            buffered: None,
            len: 0,
            direct,
        })
    }

    /// Lends object `id` to `read`; `false` if no pack holds it.
    pub(crate) fn get_with(
        &self,
        id: &[u8; 32],
        read: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        // A compaction may move the object and remove its pack between
        // the lookup and the open: look again.
        for _ in 0..3 {
            let Some(loc) = self.read().map.get(id) else {
                return Ok(false);
            };
            let path = pack_path(&self.dir, loc.pack());
            match read_entry_data(&path, loc, read) {
                Ok(()) => return Ok(true),
                Err(ReadError::Gone) => continue,
                Err(ReadError::Io(e)) => return Err(StoreError::io("read from pack", path, e)),
                Err(ReadError::Caller(e)) => return Err(e),
            }
        }
        Err(StoreError::Task(format!(
            "object {} kept moving between packs while being read",
            hex::encode(id)
        )))
    }

    /// Makes the packs' entries durable and writes the index of every pack
    /// that changed; removes sealed packs with no live entry. The caller
    /// syncs the filesystem afterwards (the indexes are renamed into place
    /// but not fsynced: a torn one is scanned around at the next open).
    pub(crate) fn barrier(&self) -> Result<(), StoreError> {
        let _one = lock(&self.barrier);
        self.write_indexes()
    }

    fn write_indexes(&self) -> Result<(), StoreError> {
        struct Snap {
            len: u64,
            changed: u64,
            empty_and_sealed: bool,
            entries: Vec<([u8; 32], Loc)>,
        }
        let mut snaps: BTreeMap<u64, Snap> = {
            let ix = self.read();
            let mut snaps: BTreeMap<u64, Snap> = ix
                .packs
                .iter()
                .filter(|(_, m)| m.changed > 0)
                .map(|(&seq, m)| {
                    (
                        seq,
                        Snap {
                            len: m.len,
                            changed: m.changed,
                            empty_and_sealed: m.sealed && m.live == 0,
                            entries: Vec::new(),
                        },
                    )
                })
                .collect();
            if snaps.is_empty() {
                return Ok(());
            }
            ix.map.for_each(|id, loc| {
                if let Some(s) = snaps.get_mut(&loc.pack())
                    && loc.off() < s.len
                {
                    s.entries.push((*id, loc));
                }
            });
            snaps
        };
        for (&seq, s) in &mut snaps {
            let path = pack_path(&self.dir, seq);
            if s.empty_and_sealed && s.entries.is_empty() {
                remove_if_there(&index_path(&self.dir, seq))?;
                remove_if_there(&path)?;
                continue;
            }
            // The data before the index that vouches for it.
            File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| StoreError::io("fsync", &path, e))?;
            s.entries.sort_unstable_by_key(|(_, loc)| loc.off());
            write_index(&self.dir, seq, s.len, &s.entries)?;
        }
        let mut ix = self.write();
        for (seq, s) in snaps {
            if s.empty_and_sealed && s.entries.is_empty() {
                ix.packs.remove(&seq);
            } else if let Some(meta) = ix.packs.get_mut(&seq) {
                meta.changed = meta.changed.saturating_sub(s.changed);
            }
        }
        Ok(())
    }

    /// Copies the live entries of sealed packs that are mostly dead (less
    /// than [`COMPACT_BELOW`] live), and of small sealed packs once there
    /// are [`MERGE_SMALL_AT`] of them, into new packs, makes those durable
    /// with their indexes, then removes the old packs. Readers are never
    /// without the object: the index points at the old copy until the new
    /// one is written, and a reader that finds the old pack gone looks
    /// again. A crash in between leaves both copies; the newer pack wins
    /// at the next open and the older is compacted again.
    pub(crate) fn compact(&self) -> Result<CompactReport, StoreError> {
        let _one = lock(&self.barrier);
        let victims: Vec<(u64, u64)> = {
            let ix = self.read();
            let small = ix
                .packs
                .values()
                .filter(|m| m.sealed && m.file_len < SMALL_PACK)
                .count();
            let merge = small >= MERGE_SMALL_AT;
            ix.packs
                .iter()
                .filter(|(_, m)| {
                    m.sealed
                        && (m.live == 0
                            || (m.live as f64) < COMPACT_BELOW * m.file_len as f64
                            || (merge && m.file_len < SMALL_PACK))
                })
                .map(|(&seq, m)| (seq, m.file_len))
                .collect()
        };
        let mut report = CompactReport::default();
        if victims.is_empty() {
            return Ok(report);
        }
        let doomed: std::collections::HashSet<u64> = victims.iter().map(|v| v.0).collect();
        let moving: Vec<([u8; 32], Loc)> = {
            let mut moving = Vec::new();
            self.read().map.for_each(|id, loc| {
                if doomed.contains(&loc.pack()) {
                    moving.push((*id, loc));
                }
            });
            moving
        };
        let mut copied = 0u64;
        for (id, loc) in moving {
            let path = pack_path(&self.dir, loc.pack());
            let mut data = Vec::new();
            read_entry_data(&path, loc, &mut |d| {
                data.extend_from_slice(d);
                Ok(())
            })
            .map_err(|e| match e {
                ReadError::Io(e) => StoreError::io("read from pack", &path, e),
                ReadError::Caller(e) => e,
                ReadError::Gone => {
                    StoreError::io("read from pack", &path, std::io::ErrorKind::NotFound.into())
                }
            })?;
            // Deleted or replaced meanwhile: nothing to move.
            if self.read().map.get(&id) != Some(loc) {
                continue;
            }
            self.put_bytes(&id, &data)?;
            copied += loc.span();
            report.entries_moved += 1;
        }
        // The copies durable and indexed before the originals go: their
        // data was synced by `write_indexes`, and their names (new packs,
        // renamed indexes) must be too before an old pack's removal can
        // reach the disk (a file system without a journal keeps no order
        // between the two).
        self.write_indexes()?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io("fsync directory", &self.dir, e))?;
        for (seq, file_len) in victims {
            // Every live entry was moved; the live count says so without a
            // walk of the whole index (a guard, never expected to hold).
            if self.read().packs.get(&seq).is_some_and(|m| m.live > 0) {
                continue;
            }
            remove_if_there(&index_path(&self.dir, seq))?;
            remove_if_there(&pack_path(&self.dir, seq))?;
            self.write().packs.remove(&seq);
            report.packs_removed += 1;
            report.bytes_freed += file_len;
        }
        report.bytes_freed = report.bytes_freed.saturating_sub(copied);
        Ok(report)
    }

    /// Removes temporary files (of index writes) at least `min_age` old.
    pub(crate) fn remove_stale_temp(&self, min_age: Duration) -> Result<u64, StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io("list", &self.dir, e)),
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for e in entries {
            let e = e.map_err(|e| StoreError::io("list", &self.dir, e))?;
            if !e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                continue;
            }
            let old_enough = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|m| now.duration_since(m).unwrap_or(Duration::ZERO) >= min_age)
                .unwrap_or(true);
            if old_enough {
                remove_if_there(&e.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Where object `id` lies on disk: the pack file, the offset of its
    /// data and its length (for tools, and tests that damage data).
    pub(crate) fn locate(&self, id: &[u8; 32]) -> Option<(PathBuf, u64, usize)> {
        let loc = self.read().map.get(id)?;
        Some((
            pack_path(&self.dir, loc.pack()),
            loc.off() + u64::from(loc.data_off),
            loc.len as usize,
        ))
    }

    /// Pack files known now, with their length and live bytes.
    #[cfg(test)]
    pub(crate) fn pack_stats(&self) -> Vec<(u64, u64, u64)> {
        self.read()
            .packs
            .iter()
            .map(|(&s, m)| (s, m.file_len, m.live))
            .collect()
    }

    /// Seals every open pack (tests: what a reopened store would do).
    #[cfg(test)]
    pub(crate) fn seal_all(&self) {
        let idle: Vec<Appender> = std::mem::take(&mut *lock(&self.idle));
        let mut ix = self.write();
        for app in idle {
            if let Some(meta) = ix.packs.get_mut(&app.seq) {
                meta.sealed = true;
                meta.changed += 1;
            }
        }
    }
}

fn check_len(len: usize) -> Result<(), StoreError> {
    if len > MAX_OBJECT {
        return Err(StoreError::Task(format!(
            "an object of {len} bytes is larger than a pack takes ({MAX_OBJECT})"
        )));
    }
    Ok(())
}

impl Appender {
    /// Writes `parts` at `off`, around the page cache if `direct` and the
    /// pack was opened so.
    fn write_at(&mut self, parts: &[&[u8]], off: u64, direct: bool) -> std::io::Result<()> {
        if !direct && self.direct {
            if self.buffered.is_none() {
                self.buffered = Some(std::fs::OpenOptions::new().write(true).open(&self.path)?);
            }
            if let Some(f) = &self.buffered {
                return write_all_vectored_at(f, parts, off);
            }
        }
        // One call for the header page and the object: with `O_DIRECT`
        // each call is a round trip to the device, and two per entry
        // halved what a writer thread could push.
        match write_all_vectored_at(&self.file, parts, off) {
            Ok(()) => Ok(()),
            // A filesystem that takes the flag but not the write:
            // this pack goes through the page cache from now on.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
                self.direct = false;
                write_all_vectored_at(&self.file, parts, off)
            }
            Err(e) => Err(e),
        }
    }
}

/// Writes `parts` one after another at `off` with `pwritev`, resuming
/// after a short write (a short write ends on a boundary of the file
/// system's choosing, so what remains is written as it lies).
fn write_all_vectored_at(file: &File, parts: &[&[u8]], off: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut at = off;
    while !parts.is_empty() {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .take(IOV_MAX)
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let pos = libc::off_t::try_from(at)
            .map_err(|_| std::io::Error::other("pack offset beyond what pwritev takes"))?;
        // SAFETY: every iovec points into a slice borrowed for this call,
        // with its length; the descriptor is open for writing.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, pos) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        at += n as u64;
        while let Some(first) = parts.first_mut() {
            if n < first.len() {
                *first = &first[n..];
                break;
            }
            n -= first.len();
            parts.remove(0);
        }
    }
    Ok(())
}

/// Most buffers one `pwritev` call takes (the Linux limit is 1024).
const IOV_MAX: usize = 64;

fn parse_seq(s: &str) -> Option<u64> {
    (s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| u64::from_str_radix(s, 16).ok())
    .flatten()
}

fn pack_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.pack"))
}

fn index_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.idx"))
}

fn remove_if_there(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("delete", path, e)),
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The 64-byte header of an entry holding `data` at `data_off`.
fn entry_header(id: &[u8; 32], data_off: usize, data: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(ENTRY_MAGIC);
    h[8..40].copy_from_slice(id);
    h[40..44].copy_from_slice(&(data_off as u32).to_le_bytes());
    h[44..48].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[48..56].copy_from_slice(&xxh3_64(data).to_le_bytes());
    let sum = xxh3_64(&h[..56]);
    h[56..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The id, data offset, length and data checksum of a well-formed header.
fn parse_header(h: &[u8]) -> Option<([u8; 32], usize, usize, u64)> {
    if h.len() < HEADER_LEN || &h[..8] != ENTRY_MAGIC || le_u64(&h[56..]) != xxh3_64(&h[..56]) {
        return None;
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&h[8..40]);
    let data_off = le_u32(&h[40..]) as usize;
    let len = le_u32(&h[44..]) as usize;
    let shape_ok = match data_off {
        DIRECT_ALIGN => len >= PAGE_DATA_MIN,
        HEADER_LEN => len < PAGE_DATA_MIN,
        _ => false,
    };
    (shape_ok && len <= MAX_OBJECT).then_some((id, data_off, len, le_u64(&h[48..])))
}

/// Walks a pack from `from` (an entry boundary), keeping entries while
/// each is whole and matches its checksums. Returns them and where the
/// last one ends.
fn scan(
    file: &File,
    path: &Path,
    seq: u64,
    from: u64,
    file_len: u64,
) -> Result<(Entries, u64), StoreError> {
    let mut entries = Vec::new();
    let mut off = from;
    let mut head = vec![0u8; HEADER_LEN];
    let mut data = Vec::new();
    while off + HEADER_LEN as u64 <= file_len && off < MAX_ENTRY_OFF {
        file.read_exact_at(&mut head, off)
            .map_err(|e| StoreError::io("read from pack", path, e))?;
        let Some((id, data_off, len, sum)) = parse_header(&head) else {
            break;
        };
        let loc = Loc::new(seq, off, data_off as u32, len as u32);
        if off + loc.span() > file_len {
            break;
        }
        data.resize(len, 0);
        file.read_exact_at(&mut data, off + data_off as u64)
            .map_err(|e| StoreError::io("read from pack", path, e))?;
        if xxh3_64(&data) != sum {
            break;
        }
        entries.push((id, loc));
        off += loc.span();
    }
    Ok((entries, off))
}

/// Writes the index of pack `seq`: temporary file, rename (not fsynced).
fn write_index(
    dir: &Path,
    seq: u64,
    covered: u64,
    entries: &[([u8; 32], Loc)],
) -> Result<(), StoreError> {
    let mut out = Vec::with_capacity(INDEX_HEAD_LEN + entries.len() * INDEX_ENTRY_LEN + 8);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&covered.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (id, loc) in entries {
        out.extend_from_slice(id);
        out.extend_from_slice(&loc.off().to_le_bytes());
        out.extend_from_slice(&loc.data_off.to_le_bytes());
        out.extend_from_slice(&loc.len.to_le_bytes());
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    let path = index_path(dir, seq);
    let tmp = dir.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
    let result = std::fs::write(&tmp, &out)
        .map_err(|e| StoreError::io("write", &tmp, e))
        .and_then(|()| {
            std::fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename into place", &path, e))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The entries and covered length of pack `seq`'s index, or `None` if the
/// index is damaged or does not fit the pack (then the pack is scanned).
fn read_index(dir: &Path, seq: u64, file_len: u64) -> Result<Option<(Entries, u64)>, StoreError> {
    let path = index_path(dir, seq);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", &path, e)),
    };
    let parsed = (|| {
        if bytes.len() < INDEX_HEAD_LEN + 8 || &bytes[..8] != INDEX_MAGIC {
            return None;
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if le_u64(sum) != xxh3_64(body) || le_u64(&body[8..]) != seq {
            return None;
        }
        let covered = le_u64(&body[16..]);
        let n = le_u32(&body[24..]) as usize;
        if covered > file_len || body.len() != INDEX_HEAD_LEN + n * INDEX_ENTRY_LEN {
            return None;
        }
        let mut entries = Vec::with_capacity(n);
        for e in body[INDEX_HEAD_LEN..].chunks_exact(INDEX_ENTRY_LEN) {
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[..32]);
            let (off, data_off, len) = (le_u64(&e[32..]), le_u32(&e[40..]), le_u32(&e[44..]));
            if !off.is_multiple_of(DIRECT_ALIGN as u64) || off >= MAX_ENTRY_OFF {
                return None;
            }
            let loc = Loc::new(seq, off, data_off, len);
            if loc.off() + loc.span() > covered {
                return None;
            }
            entries.push((id, loc));
        }
        Some((entries, covered))
    })();
    if parsed.is_none() {
        tracing::warn!(index = %path.display(), "damaged pack index: scanning the pack instead");
    }
    Ok(parsed)
}

enum ReadError {
    /// The pack is gone (compacted away).
    Gone,
    Io(std::io::Error),
    Caller(StoreError),
}

/// Reads the data of the entry at `loc` of the pack at `path` into a
/// staging buffer and lends it to `read`, with `O_DIRECT` where the
/// filesystem allows it.
fn read_entry_data(
    path: &Path,
    loc: Loc,
    read: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
) -> Result<(), ReadError> {
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    let gone = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReadError::Gone
        } else {
            ReadError::Io(e)
        }
    };
    // Small entries were written through the page cache (see `append`).
    let direct = loc.data_off as usize == DIRECT_ALIGN;
    let file = match open(direct) {
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => open(false),
        other => other,
    }
    .map_err(gone)?;
    let start = loc.off() + u64::from(loc.data_off);
    let aligned = start - start % DIRECT_ALIGN as u64;
    let skip = (start - aligned) as usize;
    let len = loc.len as usize;
    with_aligned(padded_len(skip + len), |buf| {
        let got = match file.read_exact_at(buf, aligned) {
            Ok(()) => Ok(()),
            // A filesystem that takes the flag but not the read.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                open(false).and_then(|f| f.read_exact_at(&mut buf[skip..skip + len], start))
            }
            Err(e) => Err(e),
        };
        got.map_err(ReadError::Io)?;
        read(&mut buf[skip..skip + len]).map_err(ReadError::Caller)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> [u8; 32] {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    fn object(i: u32, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn get(p: &Packs, i: u32) -> Option<Vec<u8>> {
        let mut out = None;
        let found = p
            .get_with(&id(i), &mut |d| {
                out = Some(d.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(found, out.is_some());
        out
    }

    fn aligned_put(p: &Packs, i: u32, data: &[u8]) {
        with_aligned(padded_len(data.len()), |buf| {
            buf[..data.len()].copy_from_slice(data);
            buf[data.len()..].fill(0);
            p.put_aligned(&id(i), buf, data.len()).unwrap();
        });
    }

    /// Sizes around the page and the small/large boundary.
    const SIZES: [usize; 7] = [0, 1, 4032, 4096, PAGE_DATA_MIN - 1, PAGE_DATA_MIN, 300_001];

    #[test]
    fn objects_round_trip_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = Packs::open(dir.path()).unwrap();
        for (i, &len) in SIZES.iter().enumerate() {
            p.put_bytes(&id(i as u32), &object(i as u32, len)).unwrap();
            aligned_put(&p, 100 + i as u32, &object(100 + i as u32, len));
        }
        for (i, &len) in SIZES.iter().enumerate() {
            assert_eq!(
                get(&p, i as u32).unwrap(),
                object(i as u32, len),
                "len {len}"
            );
            assert_eq!(
                get(&p, 100 + i as u32).unwrap(),
                object(100 + i as u32, len)
            );
        }
        assert_eq!(get(&p, 999), None);
        // Replace one, delete another.
        p.put_bytes(&id(1), b"again").unwrap();
        assert!(p.delete(&id(2)));
        assert!(!p.delete(&id(2)));
        p.barrier().unwrap();
        drop(p);

        let p = Packs::open(dir.path()).unwrap();
        assert_eq!(get(&p, 1).unwrap(), b"again");
        assert_eq!(get(&p, 2), None);
        assert_eq!(get(&p, 6).unwrap(), object(6, SIZES[6]));
        assert_eq!(p.ids().len(), 2 * SIZES.len() - 1);
        // A reopened store appends to new packs only.
        p.put_bytes(&id(500), b"new").unwrap();
        let stats = p.pack_stats();
        assert_eq!(stats.len(), 2, "{stats:?}");
    }

    #[test]
    fn what_no_barrier_covered_is_dropped_or_kept_only_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = Packs::open(dir.path()).unwrap();
        p.put_bytes(&id(1), &object(1, 100_000)).unwrap();
        p.barrier().unwrap();
        p.put_bytes(&id(2), &object(2, 100_000)).unwrap();
        drop(p);
        // The index covers entry 1 only: entry 2, whole past it, is kept.
        let p = Packs::open(dir.path()).unwrap();
        assert!(p.contains(&id(1)));
        assert_eq!(get(&p, 2).unwrap(), object(2, 100_000));
        drop(p);

        // Without an index the pack is scanned: whole entries are kept,
        // a torn one and everything after it are not.
        let dir = tempfile::tempdir().unwrap();
        let p = Packs::open(dir.path()).unwrap();
        for i in 0..3 {
            p.put_bytes(&id(i), &object(i, 70_000)).unwrap();
        }
        let (path, data_at, _) = p.locate(&id(1)).unwrap();
        drop(p);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"torn", data_at + 500).unwrap();
        let p = Packs::open(dir.path()).unwrap();
        assert!(p.contains(&id(0)));
        assert!(!p.contains(&id(1)));
        assert!(!p.contains(&id(2)));
        assert_eq!(get(&p, 0).unwrap(), object(0, 70_000));
    }

    #[test]
    fn a_damaged_index_is_scanned_around() {
        let dir = tempfile::tempdir().unwrap();
        let p = Packs::open(dir.path()).unwrap();
        for i in 0..4 {
            p.put_bytes(&id(i), &object(i, 5000)).unwrap();
        }
        p.barrier().unwrap();
        drop(p);
        let idx = std::fs::read_dir(dir.path().join(PACKS_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "idx"))
            .unwrap();
        let mut bytes = std::fs::read(&idx).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&idx, &bytes).unwrap();
        let p = Packs::open(dir.path()).unwrap();
        for i in 0..4 {
            assert_eq!(get(&p, i).unwrap(), object(i, 5000));
        }
    }

    #[test]
    fn compaction_moves_live_entries_and_removes_dead_packs() {
        let dir = tempfile::tempdir().unwrap();
        let p = Packs::open(dir.path()).unwrap();
        for i in 0..10 {
            p.put_bytes(&id(i), &object(i, 80_000)).unwrap();
        }
        p.barrier().unwrap();
        p.seal_all();
        for i in 0..7 {
            p.delete(&id(i));
        }
        p.barrier().unwrap();
        let before = p.pack_stats();
        assert_eq!(before.len(), 1);
        let report = p.compact().unwrap();
        assert_eq!(report.packs_removed, 1);
        assert_eq!(report.entries_moved, 3);
        assert!(report.bytes_freed > 0);
        assert!(!pack_path(&dir.path().join(PACKS_DIR), before[0].0).exists());
        for i in 7..10 {
            assert_eq!(get(&p, i).unwrap(), object(i, 80_000));
        }
        // Nothing more to do; the moved entries survive a reopen.
        assert_eq!(p.compact().unwrap(), CompactReport::default());
        p.barrier().unwrap();
        drop(p);
        let p = Packs::open(dir.path()).unwrap();
        assert_eq!(p.ids().len(), 3);
        for i in 7..10 {
            assert_eq!(get(&p, i).unwrap(), object(i, 80_000));
        }

        // A pack with no live entry left goes at the barrier.
        p.seal_all();
        for i in 7..10 {
            p.delete(&id(i));
        }
        p.barrier().unwrap();
        assert!(p.pack_stats().is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path().join(PACKS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn compaction_merges_small_packs_once_there_are_enough() {
        let dir = tempfile::tempdir().unwrap();
        let p = Packs::open(dir.path()).unwrap();
        // Each "restart" seals a part-filled pack; fully live, so only the
        // merge rule can pick them.
        let mut n = 0;
        let mut restart = |p: &Packs, k: u32| {
            for _ in 0..k {
                p.put_bytes(&id(n), &object(n, 70_000)).unwrap();
                n += 1;
            }
            p.barrier().unwrap();
            p.seal_all();
        };
        for _ in 0..MERGE_SMALL_AT - 1 {
            restart(&p, 3);
        }
        assert_eq!(p.pack_stats().len(), MERGE_SMALL_AT - 1);
        assert_eq!(p.compact().unwrap(), CompactReport::default());
        restart(&p, 3);
        let before = p.pack_stats();
        assert_eq!(before.len(), MERGE_SMALL_AT);
        let report = p.compact().unwrap();
        assert_eq!(report.packs_removed, MERGE_SMALL_AT as u64);
        assert_eq!(report.entries_moved, 3 * MERGE_SMALL_AT as u64);
        let after = p.pack_stats();
        assert_eq!(after.len(), 1, "{after:?}");
        for (seq, _, _) in &before {
            assert!(!pack_path(&dir.path().join(PACKS_DIR), *seq).exists());
        }
        let total = 3 * MERGE_SMALL_AT as u32;
        for i in 0..total {
            assert_eq!(get(&p, i).unwrap(), object(i, 70_000));
        }
        p.barrier().unwrap();
        drop(p);
        let p = Packs::open(dir.path()).unwrap();
        assert_eq!(p.ids().len(), total as usize);
        for i in 0..total {
            assert_eq!(get(&p, i).unwrap(), object(i, 70_000));
        }
    }

    #[test]
    fn an_empty_pack_left_by_a_crash_is_removed_by_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let packs = dir.path().join(PACKS_DIR);
        std::fs::create_dir_all(&packs).unwrap();
        // Created, then the process died before its first entry.
        std::fs::write(pack_path(&packs, 5), b"").unwrap();
        let p = Packs::open(dir.path()).unwrap();
        assert_eq!(p.compact().unwrap().packs_removed, 1);
        assert!(!pack_path(&packs, 5).exists());
    }

    #[test]
    fn concurrent_writers_each_get_a_pack() {
        let dir = tempfile::tempdir().unwrap();
        let p = std::sync::Arc::new(Packs::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let p = std::sync::Arc::clone(&p);
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let n = t * 100 + i;
                        aligned_put(&p, n, &object(n, 70_000 + i as usize));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        p.barrier().unwrap();
        let p2 = Packs::open(dir.path()).unwrap();
        for t in 0..4u32 {
            for i in 0..25 {
                let n = t * 100 + i;
                assert_eq!(get(&p2, n).unwrap(), object(n, 70_000 + i as usize));
            }
        }
        assert!(p.pack_stats().len() <= 4);
    }
}
