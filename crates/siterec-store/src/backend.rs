//! Where store objects live: the [`Backend`] trait and the [`LocalDir`] backend.

use std::os::unix::fs::FileExt;
#[cfg(target_os = "linux")]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::chunk::ChunkId;
use crate::error::StoreError;
use crate::pack::{CompactReport, PACKS_DIR, Packs, packable};
use crate::store::{CHUNKS_PREFIX, chunk_key};

/// An object store: flat keys (`/`-separated, see [`validate_key`]) mapping
/// to immutable byte strings.
///
/// Shaped after Azure Blob / S3 so that those can implement it too.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Stores `data` under `key`, replacing any previous object.
    ///
    /// Atomic: readers see the old object or the new one, never a part.
    /// Durable only once a later [`Backend::barrier`] has returned.
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError>;

    /// Like [`Backend::put`], but the object is durable when this returns,
    /// and after a crash the key either does not exist or holds all of
    /// `data`. Used for the few small objects that publish state
    /// (manifests, markers). The default is `put` then `barrier`, which is
    /// right for object stores where a put is durable once acknowledged.
    async fn put_durable(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.put(key, data).await?;
        self.barrier().await
    }

    /// The object under `key`, or `None` if there is none.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether an object exists under `key`.
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;

    /// Deletes the object under `key`; succeeds if there is none.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// All keys starting with `prefix` (a plain string prefix), in any order.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Makes every put and delete that returned before this call durable.
    async fn barrier(&self) -> Result<(), StoreError>;

    /// Removes leftovers of interrupted puts (temporary files) older than
    /// `min_age`; returns how many were removed. Backends without such
    /// leftovers keep the default, which does nothing.
    async fn remove_stale_temp(&self, min_age: Duration) -> Result<u64, StoreError> {
        let _ = min_age;
        Ok(0)
    }

    /// A human-readable description, e.g. `local:/var/lib/siterec/store`.
    fn describe(&self) -> String;

    /// Reclaims the space of deleted objects where the backend keeps
    /// several objects in one file ([`LocalDir`]'s packs: those mostly
    /// dead are rewritten); nothing elsewhere. Every object stays readable
    /// throughout. [`Store::gc`](crate::Store::gc) calls it.
    async fn compact(&self) -> Result<CompactReport, StoreError> {
        Ok(CompactReport::default())
    }

    /// Whether the object `key` is known to be whole without reading it,
    /// after a crash as much as now: [`LocalDir`]'s packed objects (synced
    /// before their pack's index was written, checked against their
    /// checksums when the store was opened, or written since). Crash
    /// recovery reads only the others. `false` by default.
    fn known_whole(&self, key: &str) -> bool {
        let _ = key;
        false
    }

    /// The same calls as blocking functions, for a backend whose calls are
    /// blocking system calls anyway ([`LocalDir`]); `None` (the default)
    /// for network backends.
    fn blocking_objects(&self) -> Option<&dyn BlockingObjects> {
        None
    }
}

/// Blocking forms of [`Backend`] calls, with the same meaning: a caller
/// already on a blocking thread (the store checks, seals and writes a chunk
/// there) uses them instead of a thread hop per call.
pub trait BlockingObjects: Send + Sync {
    /// [`Backend::exists`].
    fn exists_blocking(&self, key: &str) -> Result<bool, StoreError>;

    /// [`Backend::put`].
    fn put_blocking(&self, key: &str, data: &[u8]) -> Result<(), StoreError>;

    /// [`Backend::delete`].
    fn delete_blocking(&self, key: &str) -> Result<(), StoreError>;

    /// [`Backend::get`], lending the object to `read` in a buffer of the
    /// backend's (the store decrypts and decodes a chunk there instead of
    /// copying it out first). Returns `false`, without calling `read`, if
    /// there is no such object; an error from `read` is returned.
    fn get_blocking_with(
        &self,
        key: &str,
        read: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
    ) -> Result<bool, StoreError>;

    /// [`Backend::put`] of an object of `len` bytes that `fill` writes
    /// into a buffer the backend provides (the store seals a chunk
    /// straight into the buffer a file is written from, instead of
    /// sealing into one and copying into another). An error from `fill`
    /// stores nothing and is returned.
    fn put_blocking_with(
        &self,
        key: &str,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut data = vec![0u8; len];
        fill(&mut data)?;
        self.put_blocking(key, &data)
    }

    /// [`Backend::put`] of `buf[..len]`, where `buf` starts on a page
    /// boundary ([`DIRECT_ALIGN`]) and runs on to the end of `len`'s last
    /// page, zeros past `len`: a backend may write it as it is, with
    /// direct I/O. (The store seals an upload in the buffer it was
    /// received into.)
    fn put_blocking_aligned(&self, key: &str, buf: &[u8], len: usize) -> Result<(), StoreError> {
        let data = buf.get(..len).ok_or_else(|| {
            StoreError::Task(format!(
                "an object of {len} bytes in a buffer of {}",
                buf.len()
            ))
        })?;
        self.put_blocking(key, data)
    }
}

const MAX_KEY_LEN: usize = 1024;
/// Longest `/`-separated component: a file name on common filesystems.
const MAX_COMPONENT_LEN: usize = 255;

/// Checks that `key` is a valid object key.
///
/// A key is 1 to 1024 characters from `[A-Za-z0-9._/-]`, made of non-empty
/// `/`-separated components of at most 255 characters (so that every
/// backend, including [`LocalDir`], can store every valid key), none of
/// which starts with `.` (which excludes
/// `.`, `..` and the backend's temporary files). It may not start or end
/// with `/`.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::InvalidKey {
        key: key.chars().take(200).collect(),
        reason: reason.to_string(),
    };
    if key.is_empty() {
        return Err(bad("empty key"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(bad("longer than 1024 characters"));
    }
    validate_key_chars(key).map_err(|r| bad(&r))?;
    if key.starts_with('/') {
        return Err(bad("absolute keys are not allowed"));
    }
    for component in key.split('/') {
        if component.is_empty() {
            return Err(bad(
                "empty path component (leading, trailing or double '/')",
            ));
        }
        if component.len() > MAX_COMPONENT_LEN {
            return Err(bad(
                "path component longer than 255 characters (a file name on LocalDir)",
            ));
        }
        if component.starts_with('.') {
            return Err(bad(
                "path components must not start with '.' (no '.', '..' or hidden names)",
            ));
        }
    }
    Ok(())
}

/// Checks a listing prefix: like a key, but may be empty or end in `/`,
/// and its last component may be partial.
pub fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    validate_key(trimmed).map_err(|e| match e {
        StoreError::InvalidKey { reason, .. } => StoreError::InvalidKey {
            key: prefix.chars().take(200).collect(),
            reason: format!("invalid prefix: {reason}"),
        },
        other => other,
    })
}

fn validate_key_chars(key: &str) -> Result<(), String> {
    match key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        Some(c) => Err(format!(
            "character {c:?} is not allowed (only [A-Za-z0-9._/-])"
        )),
        None => Ok(()),
    }
}

/// Prefix of temporary file names. Keys cannot have components starting
/// with `.`, so these never collide with objects and are never listed.
pub(crate) const TEMP_PREFIX: &str = ".srtmp-";

/// A backend storing each object as a file under a root directory:
/// key `a/b/c` is the file `root/a/b/c`.
///
/// Puts write a temporary file in the target directory and rename it into
/// place (atomic, not fsynced); [`Backend::barrier`] makes everything durable
/// with one `syncfs(2)` of the root's filesystem. The root directory must not
/// span several filesystems, and is owned by one process at a time.
///
/// Every [`FLUSH_AHEAD`] bytes put, a background `syncfs` starts (see
/// [`FlushAhead`]), so the barrier that commits a recovery point finds the
/// device's write cache mostly written already.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: Arc<PathBuf>,
    ahead: Arc<FlushAhead>,
    /// Chunk objects appended to pack files, if this store uses them
    /// (always, unless [`LocalDir::without_packs`]).
    packs: Option<Arc<Packs>>,
    /// Whether chunk objects may also lie as files (written before the
    /// store had packs): lookups that miss the packs then look there.
    chunk_files: bool,
}

/// Bytes put between two background flushes of a [`LocalDir`].
pub const FLUSH_AHEAD: u64 = 128 << 20;

/// Background flushes of a [`LocalDir`]'s filesystem while objects are put.
///
/// Chunk objects are written with `O_DIRECT`: the device has them, but in a
/// volatile write cache (a virtual disk's is the host's page cache) until a
/// flush. Left to the commit's barrier, that flush comes all at once: about
/// a second per GiB on the virtual machines we run on, with the copy
/// already done. Started every [`FLUSH_AHEAD`] bytes, the device writes
/// while we still compute (the initial copy of the benchmark's image: 0.4-
/// 1.1 s less here). At most one runs at a time; puts never wait for it.
///
/// Only the barrier makes anything durable: a background flush is an early
/// start, never relied on. It must not hide a failure from the barrier,
/// though: `syncfs` reports a writeback error only to descriptors opened
/// before anyone saw it, so a background flush that fails keeps the error,
/// and the next barrier returns it. The background flush holds the error
/// slot's lock from before its `syncfs` until it has recorded the outcome,
/// and the barrier takes that lock after its own `syncfs`: an error seen
/// by a flush still running when the barrier opened its descriptor is not
/// missed.
#[derive(Debug)]
pub struct FlushAhead {
    every: u64,
    /// Bytes put since the last flush started.
    since: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicBool,
    /// Background flushes started (for tests and diagnostics).
    started: std::sync::atomic::AtomicU64,
    /// The first failure of a background flush since the last barrier;
    /// locked by a running flush (see above).
    failed: std::sync::Mutex<Option<std::io::Error>>,
}

impl FlushAhead {
    fn new(every: u64) -> FlushAhead {
        FlushAhead {
            every,
            since: 0.into(),
            running: false.into(),
            started: 0.into(),
            failed: std::sync::Mutex::new(None),
        }
    }

    /// Counts `len` bytes put under `root`; starts a background flush of
    /// its filesystem when [`FlushAhead::every`] bytes have been put since
    /// the last one and none is running.
    fn wrote(self: &Arc<Self>, root: &Arc<PathBuf>, len: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        let since = self.since.fetch_add(len as u64, SeqCst) + len as u64;
        if since < self.every
            || self
                .running
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_err()
        {
            return;
        }
        self.since.store(0, SeqCst);
        self.started.fetch_add(1, SeqCst);
        let (me, root) = (Arc::clone(self), Arc::clone(root));
        let spawned = std::thread::Builder::new()
            .name("siterec-flush-ahead".into())
            .spawn(move || {
                // Poisoned only if a thread panicked holding it: the slot
                // (an Option) is still meaningful.
                let mut failed = me.failed.lock().unwrap_or_else(|p| p.into_inner());
                let result =
                    std::fs::File::open(root.as_path()).and_then(|dir| sync_filesystem(&dir));
                if let Err(e) = result {
                    tracing::warn!(root = %root.display(), "background flush of the replica store failed: {e}");
                    failed.get_or_insert(e);
                }
                drop(failed);
                me.running.store(false, SeqCst);
            });
        if spawned.is_err() {
            // No thread now: the barrier will flush everything anyway.
            self.running.store(false, SeqCst);
        }
    }

    /// The error of a failed background flush since the last barrier
    /// (taken: the barrier that returns it has reported it), after any
    /// running flush has finished.
    fn take_failure(&self) -> Option<std::io::Error> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Background flushes started so far.
    pub fn started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl LocalDir {
    /// Opens (creating it if needed) a store directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| StoreError::io("create", &root, e))?;
        let packs = Packs::open(&root)?;
        Ok(LocalDir {
            chunk_files: root.join("chunks").exists(),
            root: Arc::new(root),
            ahead: Arc::new(FlushAhead::new(FLUSH_AHEAD)),
            packs: Some(Arc::new(packs)),
        })
    }

    /// The same store writing each chunk object to a file of its own, as
    /// stores did before packs (tests of that layout, and measurements).
    /// Refused for a store that already has packs: their objects would
    /// vanish from view.
    pub fn without_packs(mut self) -> Result<LocalDir, StoreError> {
        let dir = self.root.join(PACKS_DIR);
        if dir.exists() {
            return Err(StoreError::io(
                "open without packs",
                dir,
                std::io::Error::other("this store keeps chunks in packs"),
            ));
        }
        self.packs = None;
        self.chunk_files = true;
        Ok(self)
    }

    /// Where the object `key` lies on disk: a file, the offset of the
    /// object's bytes in it and their length. `None` if there is no such
    /// object. For tools, and tests that damage data on purpose.
    pub fn locate(&self, key: &str) -> Result<Option<(PathBuf, u64, usize)>, StoreError> {
        if let Some((packs, id)) = self.packed(key)
            && let Some(at) = packs.locate(&id)
        {
            return Ok(Some(at));
        }
        let path = self.path_of(key)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some((path, 0, m.len() as usize))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("stat", &path, e)),
        }
    }

    /// The keys of the objects in packs (tests).
    #[cfg(test)]
    pub(crate) fn packed_keys(&self) -> Vec<String> {
        self.packs.as_ref().map_or_else(Vec::new, |p| {
            p.ids().iter().map(|id| chunk_key(&ChunkId(*id))).collect()
        })
    }

    /// The packs and key bytes of `key`, if it is a chunk key and this
    /// store has packs.
    fn packed(&self, key: &str) -> Option<(&Arc<Packs>, [u8; 32])> {
        let packs = self.packs.as_ref()?;
        Some((packs, packable(key)?))
    }

    /// Whether a miss in the packs must look for a file (always for keys
    /// that are not chunk keys).
    fn file_may_hold(&self, key: &str) -> bool {
        self.chunk_files || self.packed(key).is_none()
    }

    /// Whether `key` exists, if the packs can tell without a look at the
    /// files (`None`: look).
    fn exists_without_a_file(&self, key: &str) -> Option<bool> {
        if let Some((packs, id)) = self.packed(key)
            && packs.contains(&id)
        {
            return Some(true);
        }
        (!self.file_may_hold(key)).then_some(false)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The same store with a background flush every `every` bytes put
    /// instead of every [`FLUSH_AHEAD`] (tests use small values).
    pub fn with_flush_ahead(mut self, every: u64) -> LocalDir {
        self.ahead = Arc::new(FlushAhead::new(every));
        self
    }

    /// The background flushes of this store (shared by its clones).
    pub fn flush_ahead(&self) -> &FlushAhead {
        &self.ahead
    }

    /// Notes a successful put of `len` bytes (see [`FlushAhead`]).
    fn wrote(&self, len: usize) {
        self.ahead.wrote(&self.root, len);
    }

    /// The file holding `key` (validated).
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T, StoreError> + Send + 'static,
    {
        let root = Arc::clone(&self.root);
        tokio::task::spawn_blocking(move || f(&root))
            .await
            .map_err(StoreError::task)?
    }
}

/// Where a new object for `path` is written before it is renamed into
/// place: a temporary name in the same directory.
fn temp_path_for(path: &Path) -> Result<(&Path, PathBuf), StoreError> {
    let dir = path.parent().ok_or_else(|| {
        StoreError::io(
            "find the parent of",
            path,
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let tmp = dir.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
    Ok((dir, tmp))
}

/// Writes `data` as a new object at `path` (see [`write_object`]).
fn write_bytes(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    write_object(path, data.len(), &mut |buf| {
        buf.copy_from_slice(data);
        Ok(())
    })
}

/// Writes `data` to a temporary file and renames it into place, fsyncing
/// the file and its directories up to `root` (manifests, the store's own
/// state).
fn write_durably(root: &Path, path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let (dir, tmp) = temp_path_for(path)?;
    let result = (|| {
        let f = create_temp(dir, &tmp, false)?.0;
        f.write_all_at(data, 0)
            .map_err(|e| StoreError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| StoreError::io("fsync", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| StoreError::io("rename into place", path, e))?;
        // The new entry, and any directory create_dir_all may just have
        // made, must survive a crash: fsync every directory from the
        // file's up to the root (keys are at most a few levels deep).
        let mut d = Some(dir);
        while let Some(cur) = d {
            let f = std::fs::File::open(cur).map_err(|e| StoreError::io("open", cur, e))?;
            f.sync_all()
                .map_err(|e| StoreError::io("fsync directory", cur, e))?;
            d = if cur == root { None } else { cur.parent() };
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a new object of `len` bytes, which `fill` puts into a staging
/// buffer from a shared pool, as [`write_aligned`] does.
fn write_object(
    path: &Path,
    len: usize,
    fill: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    with_aligned(padded_len(len), |buf| {
        let (data, pad) = buf.split_at_mut(len);
        fill(data)?;
        pad.fill(0);
        write_aligned(path, buf, len)
    })
}

/// `len` rounded up to whole [`DIRECT_ALIGN`] pages.
pub(crate) fn padded_len(len: usize) -> usize {
    len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

/// Writes the object `buf[..len]` to a temporary file and renames it into
/// place (atomic, not fsynced: the barrier's `syncfs` makes it durable).
/// `buf` is page-aligned and [`padded_len`]`(len)` long, zeros past `len`.
///
/// Objects of [`DIRECT_MIN`] bytes or more are written with `O_DIRECT`,
/// padded to whole pages and then truncated to their length: one open and
/// one write, and no page-cache copy. A chunk object is written once and
/// rarely read back soon; through the page cache the kernel copies every
/// byte into a fresh page, which on the virtual machines we run on costs
/// about as much as compressing it. Where the filesystem has no direct
/// I/O (tmpfs), the object goes through the page cache, with writeback
/// started at once.
fn write_aligned(path: &Path, buf: &[u8], len: usize) -> Result<(), StoreError> {
    let padded = padded_len(len);
    if buf.len() != padded || buf.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
        return Err(StoreError::Task(format!(
            "writing {}: an object of {len} bytes needs {padded} page-aligned bytes, not {}",
            path.display(),
            buf.len()
        )));
    }
    let (dir, tmp) = temp_path_for(path)?;
    let result = (|| {
        let (f, direct) = create_temp(dir, &tmp, len >= DIRECT_MIN)?;
        let written = if direct { buf } else { &buf[..len] };
        match f.write_all_at(written, 0) {
            Ok(()) => {}
            // A filesystem that takes the flag but not the write: write
            // the object again, through the page cache.
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                let plain = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&tmp)
                    .map_err(|e| StoreError::io("open", &tmp, e))?;
                plain
                    .write_all_at(&buf[..len], 0)
                    .map_err(|e| StoreError::io("write", &tmp, e))?;
                plain
                    .set_len(len as u64)
                    .map_err(|e| StoreError::io("truncate", &tmp, e))?;
                start_writeback(&plain);
                drop(plain);
                drop(f);
                return std::fs::rename(&tmp, path)
                    .map_err(|e| StoreError::io("rename into place", path, e));
            }
            Err(e) => return Err(StoreError::io("write", &tmp, e)),
        }
        if direct && padded != len {
            f.set_len(len as u64)
                .map_err(|e| StoreError::io("truncate", &tmp, e))?;
        }
        if !direct {
            start_writeback(&f);
        }
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| StoreError::io("rename into place", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates the temporary file `tmp` in `dir` (making `dir` if it does not
/// exist: it usually does), with `O_DIRECT` if `direct` and the
/// filesystem allows it. Returns the file and whether it is direct.
fn create_temp(dir: &Path, tmp: &Path, direct: bool) -> Result<(std::fs::File, bool), StoreError> {
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(target_os = "linux")]
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = direct;
        o.open(tmp)
    };
    let direct = direct && cfg!(target_os = "linux");
    let opened = match open(direct) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
            open(direct)
        }
        other => other,
    };
    match opened {
        Ok(f) => Ok((f, direct)),
        // No direct I/O on this filesystem. The file was created before
        // the flag was refused: open it again without.
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map(|f| (f, false))
            .map_err(|e| StoreError::io("create", tmp, e)),
        Err(e) => Err(StoreError::io("create", tmp, e)),
    }
}

fn walk(
    dir: &Path,
    rel: &str,
    out: &mut Vec<String>,
    temps: &mut Vec<PathBuf>,
) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // Nothing under a missing path, nor under a file (prefix "k/" of
        // an object "k").
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(StoreError::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue; // Not a key we could have written.
        };
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| StoreError::io("stat", &path, e))?;
        if name.starts_with(TEMP_PREFIX) && ft.is_file() {
            temps.push(path);
            continue;
        }
        let key = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        if validate_key(&key).is_err() {
            continue; // Foreign file: not ours to list.
        }
        if ft.is_dir() {
            walk(&path, &key, out, temps)?;
        } else if ft.is_file() {
            out.push(key);
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Backend for LocalDir {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let len = data.len();
        match self.packed(key) {
            Some((packs, id)) => {
                let packs = Arc::clone(packs);
                self.blocking(move |_| packs.put_bytes(&id, &data)).await?;
            }
            None => self.blocking(move |_| write_bytes(&path, &data)).await?,
        }
        self.wrote(len);
        Ok(())
    }

    async fn put_durable(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        self.blocking(move |root| write_durably(root, &path, &data))
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path_of(key)?;
        if let Some((packs, id)) = self.packed(key) {
            let packs = Arc::clone(packs);
            let found = self
                .blocking(move |_| {
                    let mut out = None;
                    packs.get_with(&id, &mut |d| {
                        out = Some(d.to_vec());
                        Ok(())
                    })?;
                    Ok(out)
                })
                .await?;
            if found.is_some() || !self.chunk_files {
                return Ok(found);
            }
        }
        self.blocking(move |_| match read_object(&path) {
            Ok(data) => Ok(Some(data)),
            // A directory is a key prefix, not an object (as for `exists`).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(StoreError::io("read", &path, e)),
        })
        .await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        if let Some(known) = self.exists_without_a_file(key) {
            return Ok(known);
        }
        self.blocking(move |_| file_exists(&path)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        if let Some((packs, id)) = self.packed(key) {
            packs.delete(&id);
        }
        if !self.file_may_hold(key) {
            return Ok(());
        }
        self.blocking(move |_| remove_object(&path)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        validate_prefix(prefix)?;
        let prefix = prefix.to_string();
        let packs = self.packs.clone();
        self.blocking(move |root| {
            // Start at the deepest directory the prefix designates.
            let rel = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            let mut keys = Vec::new();
            let mut temps = Vec::new();
            walk(&root.join(rel), rel, &mut keys, &mut temps)?;
            if let Some(packs) = packs
                && (prefix.starts_with(CHUNKS_PREFIX) || CHUNKS_PREFIX.starts_with(prefix.as_str()))
            {
                let had_files = !keys.is_empty();
                keys.extend(packs.ids().iter().map(|id| chunk_key(&ChunkId(*id))));
                if had_files {
                    // A chunk both in a pack and in a file is one object.
                    keys.sort_unstable();
                    keys.dedup();
                }
            }
            keys.retain(|k| k.starts_with(prefix.as_str()));
            Ok(keys)
        })
        .await
    }

    async fn barrier(&self) -> Result<(), StoreError> {
        let ahead = Arc::clone(&self.ahead);
        let packs = self.packs.clone();
        self.blocking(move |root| {
            if let Some(packs) = packs {
                packs.barrier()?;
            }
            let dir = std::fs::File::open(root).map_err(|e| StoreError::io("open", root, e))?;
            sync_filesystem(&dir).map_err(|e| StoreError::io("syncfs", root, e))?;
            // After our own syncfs: a background one that failed before it
            // may have taken the error that ours would have seen.
            match ahead.take_failure() {
                None => Ok(()),
                Some(e) => Err(StoreError::io("flush in the background (syncfs)", root, e)),
            }
        })
        .await
    }

    async fn remove_stale_temp(&self, min_age: Duration) -> Result<u64, StoreError> {
        let packs = self.packs.clone();
        self.blocking(move |root| {
            let in_packs = match packs {
                Some(p) => p.remove_stale_temp(min_age)?,
                None => 0,
            };
            let mut keys = Vec::new();
            let mut temps = Vec::new();
            walk(root, "", &mut keys, &mut temps)?;
            let now = SystemTime::now();
            let mut removed = 0;
            for t in temps {
                let old_enough = std::fs::metadata(&t)
                    .and_then(|m| m.modified())
                    .map(|m| now.duration_since(m).unwrap_or(Duration::ZERO) >= min_age)
                    .unwrap_or(true);
                if !old_enough {
                    continue;
                }
                match std::fs::remove_file(&t) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io("delete temporary file", &t, e)),
                }
            }
            Ok(removed + in_packs)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    fn known_whole(&self, key: &str) -> bool {
        self.packed(key)
            .is_some_and(|(packs, id)| packs.contains(&id))
    }

    async fn compact(&self) -> Result<CompactReport, StoreError> {
        let packs = self.packs.clone();
        self.blocking(move |_| match packs {
            Some(p) => p.compact(),
            None => Ok(CompactReport::default()),
        })
        .await
    }

    fn blocking_objects(&self) -> Option<&dyn BlockingObjects> {
        Some(self)
    }
}

impl BlockingObjects for LocalDir {
    fn exists_blocking(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        if let Some(known) = self.exists_without_a_file(key) {
            return Ok(known);
        }
        file_exists(&path)
    }

    fn put_blocking(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match self.packed(key) {
            Some((packs, id)) => packs.put_bytes(&id, data)?,
            None => write_bytes(&path, data)?,
        }
        self.wrote(data.len());
        Ok(())
    }

    fn delete_blocking(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        if let Some((packs, id)) = self.packed(key) {
            packs.delete(&id);
        }
        if !self.file_may_hold(key) {
            return Ok(());
        }
        remove_object(&path)
    }

    fn put_blocking_with(
        &self,
        key: &str,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match self.packed(key) {
            Some((packs, id)) => packs.put_with(&id, len, fill)?,
            None => write_object(&path, len, fill)?,
        }
        self.wrote(len);
        Ok(())
    }

    fn put_blocking_aligned(&self, key: &str, buf: &[u8], len: usize) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match self.packed(key) {
            Some((packs, id)) => packs.put_aligned(&id, buf, len)?,
            None => write_aligned(&path, buf, len)?,
        }
        self.wrote(len);
        Ok(())
    }

    fn get_blocking_with(
        &self,
        key: &str,
        read: &mut dyn FnMut(&mut [u8]) -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        if let Some((packs, id)) = self.packed(key) {
            if packs.get_with(&id, read)? {
                return Ok(true);
            }
            if !self.chunk_files {
                return Ok(false);
            }
        }
        match read_object_with(&path, read) {
            Ok(r) => r.map(|()| true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("read", &path, e)),
        }
    }
}

/// Removes an object file; no object there (nothing, or a directory: a
/// key prefix) is not an error.
fn remove_object(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(StoreError::io("delete", path, e)),
    }
}

fn file_exists(path: &Path) -> Result<bool, StoreError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.is_file()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("stat", path, e)),
    }
}

/// Alignment of `O_DIRECT` offsets, lengths and memory (the page size; a
/// multiple of every logical block size we meet).
pub(crate) const DIRECT_ALIGN: usize = 4096;
/// Objects shorter than this go through the page cache only.
const DIRECT_MIN: usize = 64 * 1024;
/// Objects longer than this are read through the page cache.
#[cfg(target_os = "linux")]
const DIRECT_MAX: usize = 256 << 20;
/// Largest staging buffer kept between direct writes and reads.
const DIRECT_KEEP: usize = 4 << 20;

/// Staging buffers for direct I/O (over-allocated by one page so that a
/// page-aligned stretch fits).
pub(crate) static DIRECT_BUF: crate::bufpool::Pool =
    crate::bufpool::Pool::new(8, DIRECT_KEEP + DIRECT_ALIGN);

/// Runs `f` on `len` page-aligned bytes of a staging buffer from the
/// shared pool.
pub(crate) fn with_aligned<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    DIRECT_BUF.with(|raw| {
        let fits = |raw: &Vec<u8>| {
            let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
            (start + len <= raw.len()).then_some(start)
        };
        let start = match fits(raw) {
            Some(start) => start,
            None => {
                *raw = vec![0u8; len + DIRECT_ALIGN];
                raw.as_ptr().align_offset(DIRECT_ALIGN)
            }
        };
        f(&mut raw[start..start + len])
    })
}

/// Reads a whole object file.
fn read_object(path: &Path) -> std::io::Result<Vec<u8>> {
    read_object_with(path, &mut |data| data.to_vec())
}

/// Reads a whole object file into a buffer from the shared pool and runs
/// `f` on it, with `O_DIRECT` when the object is large and the filesystem
/// allows it: chunk objects are read once (a restore, a verification), so
/// filling fresh page-cache pages with them costs the same copy
/// [`write_object`] avoids, for nothing.
#[cfg(target_os = "linux")]
fn read_object_with<T>(path: &Path, f: &mut dyn FnMut(&mut [u8]) -> T) -> std::io::Result<T> {
    use std::io::Read;
    let plain = |f: &mut dyn FnMut(&mut [u8]) -> T| std::fs::read(path).map(|mut v| f(&mut v));
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let mut file = match direct {
        Ok(file) => file,
        // No direct I/O here (tmpfs): read through the page cache.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return plain(f),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    // Small objects, and ones far larger than any chunk (a big manifest),
    // through the page cache.
    if !(DIRECT_MIN..=DIRECT_MAX).contains(&len) {
        drop(file);
        return plain(f);
    }
    let room = len.div_ceil(DIRECT_ALIGN).saturating_add(1) * DIRECT_ALIGN;
    let read = with_aligned(room, |buf| {
        // Whole pages until the end of the file (a short read there).
        let mut got = 0;
        let result = loop {
            match file.read(&mut buf[got..]) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
            if got == buf.len() || !got.is_multiple_of(DIRECT_ALIGN) {
                break Ok(());
            }
        };
        match result {
            Ok(()) if got == len => Ok(Some(f(&mut buf[..got]))),
            // Not the length it had a moment ago (objects are replaced
            // whole, never changed in place): read it again, plainly.
            Ok(()) => Ok(None),
            // A filesystem that takes the flag but not the read.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    })?;
    match read {
        Some(t) => Ok(t),
        None => plain(f),
    }
}

#[cfg(not(target_os = "linux"))]
fn read_object_with<T>(path: &Path, f: &mut dyn FnMut(&mut [u8]) -> T) -> std::io::Result<T> {
    std::fs::read(path).map(|mut v| f(&mut v))
}

#[cfg(target_os = "linux")]
fn sync_filesystem(dir: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is valid for the lifetime of `dir`; syncfs only reads it.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks the kernel to start writing `f`'s data to disk now, without
/// waiting: the barrier that follows a batch of puts then finds little left
/// to write, and the writes overlap with the work that produced them.
#[cfg(target_os = "linux")]
fn start_writeback(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is valid for the lifetime of `f`; the call only starts
    // writeback of its dirty pages. Failure only means no early start.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_f: &std::fs::File) {}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem(dir: &std::fs::File) -> std::io::Result<()> {
    // No syncfs: flush everything, then the root directory itself.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    dir.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Objects of every size around the direct-I/O thresholds come back
    /// byte for byte, with their exact length on disk, whether written by
    /// `put` or `put_blocking`, and a thread's reused aligned buffer never
    /// leaks an earlier object's bytes into a shorter one.
    async fn objects_round_trip_in(root: &Path) {
        let dir = LocalDir::new(root).unwrap();
        let sizes = [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_MIN - 1,
            DIRECT_MIN,
            DIRECT_MIN + 1,
            3 * DIRECT_ALIGN + DIRECT_MIN,
            (1 << 20) + 13,
            DIRECT_KEEP + 5,
            (1 << 20) + 4099,
        ];
        for (n, &len) in sizes.iter().enumerate() {
            let fill = (n as u8).wrapping_mul(37).wrapping_add(1);
            let data: Vec<u8> = (0..len).map(|i| fill ^ (i % 251) as u8).collect();
            let key = format!("chunks/{:02x}/obj{n}", n);
            let (d, k, v) = (dir.clone(), key.clone(), data.clone());
            match n % 3 {
                0 => dir.put(&key, data.clone()).await.unwrap(),
                1 => tokio::task::spawn_blocking(move || d.put_blocking(&k, &v))
                    .await
                    .unwrap()
                    .unwrap(),
                _ => tokio::task::spawn_blocking(move || {
                    d.put_blocking_with(&k, v.len(), &mut |buf| {
                        buf.copy_from_slice(&v);
                        Ok(())
                    })
                })
                .await
                .unwrap()
                .unwrap(),
            }
            let on_disk = std::fs::metadata(dir.path_of(&key).unwrap()).unwrap().len();
            assert_eq!(on_disk, len as u64, "size of {key}");
            let back = dir.get(&key).await.unwrap().unwrap();
            assert!(back == data, "{key} ({len} bytes) did not round-trip");
        }
        // Replacing a large object with a shorter one.
        dir.put("chunks/zz/same", vec![0xAA; 2 << 20])
            .await
            .unwrap();
        dir.put("chunks/zz/same", vec![0x55; (1 << 20) + 100])
            .await
            .unwrap();
        assert_eq!(
            dir.get("chunks/zz/same").await.unwrap().unwrap(),
            vec![0x55; (1 << 20) + 100]
        );
        assert!(dir.get("chunks/zz/none").await.unwrap().is_none());
        // A fill that fails stores nothing, large or small, and leaves no
        // temporary file behind.
        for len in [100, (1 << 20) + 7] {
            let err = dir
                .put_blocking_with("chunks/zz/failed", len, &mut |buf| {
                    buf[0] = 1;
                    Err(StoreError::Task("no".into()))
                })
                .unwrap_err();
            assert!(matches!(err, StoreError::Task(_)), "{err}");
            assert!(!dir.exists("chunks/zz/failed").await.unwrap());
        }
        let leftovers: Vec<_> = std::fs::read_dir(root.join("chunks/zz"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(TEMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[tokio::test]
    async fn objects_round_trip_around_direct_io_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        objects_round_trip_in(tmp.path()).await;
    }

    /// tmpfs has no direct I/O: everything goes through the page cache.
    #[tokio::test]
    async fn objects_round_trip_without_direct_io() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("no /dev/shm here: the fallback is not exercised");
            return;
        }
        let tmp = tempfile::tempdir_in(shm).unwrap();
        objects_round_trip_in(tmp.path()).await;
    }

    #[test]
    fn key_validation() {
        for good in [
            "store.json",
            "chunks/ab/abcdef",
            "points/vm-1/p_2.manifest",
            "a-b_c.d/E9",
        ] {
            validate_key(good).unwrap();
        }
        for bad in [
            "",
            "/abs",
            "a/../b",
            "..",
            ".",
            "a/./b",
            "a//b",
            "a/",
            "a b",
            "a\\b",
            "é",
            "a/.hidden",
            ".srtmp-123",
            "a\0b",
        ] {
            let err = validate_key(bad).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidKey { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(validate_key(&"a".repeat(1025)).is_err());
        validate_key(&"a".repeat(255)).unwrap();
        assert!(validate_key(&"a".repeat(256)).is_err());
        assert!(validate_key(&format!("x/{}/y", "a".repeat(256))).is_err());
        validate_prefix("").unwrap();
        validate_prefix("chunks/").unwrap();
        validate_prefix("chunks/a").unwrap();
        assert!(validate_prefix("../").is_err());
        assert!(validate_prefix("/").is_err());
    }

    #[tokio::test]
    async fn local_dir_basics_and_invalid_keys() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::new(dir.path().join("store")).unwrap();
        assert_eq!(b.get("x/y").await.unwrap(), None);
        assert!(!b.exists("x/y").await.unwrap());
        b.put("x/y", b"one".to_vec()).await.unwrap();
        b.put("x/y", b"two".to_vec()).await.unwrap();
        b.put_durable("x/z", b"three".to_vec()).await.unwrap();
        b.put("top", b"t".to_vec()).await.unwrap();
        assert_eq!(b.get("x/y").await.unwrap().as_deref(), Some(&b"two"[..]));
        assert!(b.exists("x/z").await.unwrap());
        assert!(!b.exists("x").await.unwrap(), "directories are not objects");
        b.barrier().await.unwrap();

        for bad in ["../escape", "/etc/passwd", "x/../../y", "x/.srtmp-1"] {
            assert!(matches!(
                b.put(bad, b"no".to_vec()).await.unwrap_err(),
                StoreError::InvalidKey { .. }
            ));
            assert!(b.get(bad).await.is_err());
            assert!(b.delete(bad).await.is_err());
            assert!(b.exists(bad).await.is_err());
        }
        assert!(!dir.path().join("escape").exists());
        assert!(b.list("../").await.is_err());

        let mut all = b.list("").await.unwrap();
        all.sort();
        assert_eq!(all, ["top", "x/y", "x/z"]);
        let mut xs = b.list("x/").await.unwrap();
        xs.sort();
        assert_eq!(xs, ["x/y", "x/z"]);
        assert_eq!(b.list("x/z").await.unwrap(), ["x/z"]);
        assert_eq!(b.list("t").await.unwrap(), ["top"]);
        assert!(b.list("nothing/").await.unwrap().is_empty());

        b.delete("x/y").await.unwrap();
        b.delete("x/y").await.unwrap(); // idempotent
        assert_eq!(b.list("x/").await.unwrap(), ["x/z"]);
    }

    #[tokio::test]
    async fn list_ignores_temp_files_and_cleanup_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::new(dir.path()).unwrap();
        b.put("chunks/ab/k1", b"1".to_vec()).await.unwrap();
        let tmp = dir.path().join("chunks/ab/.srtmp-deadbeef");
        std::fs::write(&tmp, b"partial").unwrap();
        std::fs::write(dir.path().join(".srtmp-top"), b"partial").unwrap();
        // A foreign file with a name that is not a valid key.
        std::fs::write(dir.path().join("chunks/ab/has space"), b"?").unwrap();

        assert_eq!(b.list("").await.unwrap(), ["chunks/ab/k1"]);
        assert_eq!(b.list("chunks/ab/").await.unwrap(), ["chunks/ab/k1"]);

        // Too young to be stale.
        assert_eq!(
            b.remove_stale_temp(Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert!(tmp.exists());
        assert_eq!(b.remove_stale_temp(Duration::ZERO).await.unwrap(), 2);
        assert!(!tmp.exists());
        assert!(dir.path().join("chunks/ab/k1").exists());
    }

    /// A background flush starts once `every` bytes have been put (by any
    /// clone), not before, and the store's objects and barrier are as
    /// without it.
    #[tokio::test]
    async fn a_background_flush_starts_every_so_many_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::new(dir.path()).unwrap().with_flush_ahead(1 << 20);
        let clone = b.clone();
        let object = vec![5u8; 600 << 10];
        b.put_blocking("chunks/aa/one", &object).unwrap();
        assert_eq!(b.flush_ahead().started(), 0);
        clone.put("chunks/aa/two", object.clone()).await.unwrap();
        assert_eq!(b.flush_ahead().started(), 1);
        // The counter starts again after a flush: 600 KiB more is short.
        b.put_blocking_with("chunks/aa/three", object.len(), &mut |buf| {
            buf.copy_from_slice(&object);
            Ok(())
        })
        .unwrap();
        assert_eq!(clone.flush_ahead().started(), 1);
        b.barrier().await.unwrap();
        for key in ["chunks/aa/one", "chunks/aa/two", "chunks/aa/three"] {
            assert_eq!(b.get(key).await.unwrap().as_deref(), Some(&object[..]));
        }
    }
}
