//! Writing image data around the page cache.
//!
//! Materializing a disk writes gigabytes that nobody reads back soon, and
//! the image is synced before it is renamed into place. Through the page
//! cache each byte is copied by the kernel into a fresh page and written
//! back at the sync; on the virtual machines we run on the copy alone costs
//! about a second per GiB of CPU. [`DirectWriter`] instead gathers
//! contiguous writes into a 4 MiB page-aligned buffer and writes it with
//! `O_DIRECT`: the device reads it straight from our buffer.
//!
//! A direct write returns only when the device has the data (about 12 ms
//! per 4 MiB on our virtual disks), so the writes go to an I/O thread that
//! owns the file's descriptors: while it waits for the device, the caller
//! gathers the next run into another buffer. The I/O thread takes runs in
//! the order they were made (one FIFO queue), and every operation that
//! reads, resizes or syncs the file, or writes around the queue, first
//! waits until the queue is empty; so the file sees the writes in the
//! order the caller made them. The first failed write poisons the writer:
//! every later call returns its error.
//!
//! Whatever `O_DIRECT` cannot take (a filesystem without it, such as tmpfs;
//! a write not starting on a 4 KiB boundary; the unaligned tail of a run;
//! a short run, see [`DIRECT_MIN`]) goes through an ordinary descriptor of
//! the same file. The kernel keeps the two coherent: a direct write first
//! writes back and drops any cached page it overlaps.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Alignment of offsets, lengths and memory for `O_DIRECT` (the page size;
/// also a multiple of every logical block size we meet).
const ALIGN: usize = 4096;
/// Contiguous data gathered before one direct write.
const GATHER: usize = 4 << 20;
/// Runs shorter than this go through the page cache even when direct
/// writes work. A direct write waits for the device, and a point's blocks
/// touched by a few scattered pages (a delta over an empty region) come as
/// thousands of 4 KiB runs: through the cache they cost one copy now and
/// one sorted, merged writeback at the sync.
const DIRECT_MIN: usize = 64 << 10;
/// Gather buffers per writer: one being filled, the others queued for or
/// being written by the I/O thread (3 × 4 MiB of memory).
const BUFFERS: usize = 3;

/// A page-aligned byte buffer of fixed capacity, in safe code: an
/// over-allocated vector and the offset of its first aligned byte.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(capacity: usize) -> AlignedBuf {
        let raw = vec![0u8; capacity + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start }
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + GATHER]
    }

    fn slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + GATHER]
    }
}

/// One gathered run for the I/O thread: `len` bytes of `buf` at `start`.
struct Run {
    buf: AlignedBuf,
    start: u64,
    len: usize,
}

/// What the I/O thread hands back for each run: the buffer (to be filled
/// again), the outcome, and whether the filesystem refused a direct write.
struct Done {
    buf: AlignedBuf,
    result: io::Result<()>,
    direct_refused: bool,
}

/// The I/O thread's half: both descriptors of the file.
struct IoFiles {
    buffered: Arc<File>,
    direct: Option<File>,
}

impl IoFiles {
    /// Writes a run: its aligned part directly (if at least
    /// [`DIRECT_MIN`]), the rest through the page cache.
    fn write(&mut self, run: &Run) -> (io::Result<()>, bool) {
        let data = &run.buf.slice()[..run.len];
        let aligned = run.len / ALIGN * ALIGN;
        let mut done = 0;
        let mut refused = false;
        if aligned >= DIRECT_MIN
            && let Some(direct) = &self.direct
        {
            match direct.write_all_at(&data[..aligned], run.start) {
                Ok(()) => done = aligned,
                // The filesystem takes the flag at open but not these
                // writes: stop trying and write through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = None;
                    refused = true;
                }
                Err(e) => return (Err(e), refused),
            }
        }
        let rest = self
            .buffered
            .write_all_at(&data[done..], run.start + done as u64);
        (rest, refused)
    }
}

/// The running I/O thread and its queues.
struct IoThread {
    runs: Option<SyncSender<Run>>,
    done: Receiver<Done>,
    handle: Option<JoinHandle<()>>,
    /// Runs sent and not yet handed back.
    in_flight: usize,
}

impl IoThread {
    fn spawn(mut files: IoFiles) -> io::Result<IoThread> {
        let (runs_tx, runs_rx) = sync_channel::<Run>(BUFFERS);
        let (done_tx, done_rx) = sync_channel::<Done>(BUFFERS);
        let handle = std::thread::Builder::new()
            .name("siterec-image-io".into())
            .spawn(move || {
                while let Ok(run) = runs_rx.recv() {
                    let (result, direct_refused) = files.write(&run);
                    let done = Done {
                        buf: run.buf,
                        result,
                        direct_refused,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            })?;
        Ok(IoThread {
            runs: Some(runs_tx),
            done: done_rx,
            handle: Some(handle),
            in_flight: 0,
        })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread once the queued runs are
        // written; wait for that so that no write lands after we return.
        self.runs = None;
        while self.in_flight > 0 && self.done.recv().is_ok() {
            self.in_flight -= 1;
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Positional writes to one file, direct where possible (see the module
/// docs). Call [`DirectWriter::flush`] before syncing or reading the file.
pub(crate) struct DirectWriter {
    buffered: Arc<File>,
    /// Whether direct writes are still tried (`false` once the filesystem
    /// refused `O_DIRECT`, at open or at a write).
    direct: bool,
    /// The direct descriptor until the I/O thread is started (lazily, at
    /// the first run: a writer on tmpfs never starts one).
    direct_file: Option<File>,
    io: Option<IoThread>,
    /// The buffer being filled, and the others when not in flight.
    buf: Option<AlignedBuf>,
    free: Vec<AlignedBuf>,
    /// File offset of the gathered run (aligned) and its length.
    run_start: u64,
    run_len: usize,
    /// The first write error of the I/O thread, returned by every later
    /// call (the image is not what the caller wrote).
    poisoned: Option<(io::ErrorKind, String)>,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("direct", &self.direct)
            .field("run_start", &self.run_start)
            .field("run_len", &self.run_len)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl DirectWriter {
    /// Wraps `file` (opened for writing at `path`), opening `path` a second
    /// time with `O_DIRECT` if the filesystem allows it.
    pub(crate) fn new(file: File, path: &Path) -> DirectWriter {
        let direct_file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        DirectWriter {
            buffered: Arc::new(file),
            direct: direct_file.is_some(),
            direct_file,
            io: None,
            buf: None,
            free: Vec::new(),
            run_start: 0,
            run_len: 0,
            poisoned: None,
        }
    }

    fn check(&self) -> io::Result<()> {
        match &self.poisoned {
            None => Ok(()),
            Some((kind, msg)) => Err(io::Error::new(
                *kind,
                format!("an earlier write of this image failed: {msg}"),
            )),
        }
    }

    /// Takes one finished run back from the I/O thread (blocking).
    fn reap_one(&mut self) -> io::Result<()> {
        let Some(io) = &mut self.io else {
            return Ok(());
        };
        if io.in_flight == 0 {
            return Ok(());
        }
        let done = io.done.recv().map_err(|_| {
            io::Error::other("the image I/O thread stopped before writing its queue")
        })?;
        io.in_flight -= 1;
        self.free.push(done.buf);
        if done.direct_refused {
            self.direct = false;
        }
        if let Err(e) = done.result
            && self.poisoned.is_none()
        {
            self.poisoned = Some((e.kind(), e.to_string()));
        }
        Ok(())
    }

    /// Queues the gathered run and waits until the queue is written: what
    /// must come before reading, resizing, syncing or writing around it.
    fn write_out(&mut self) -> io::Result<()> {
        self.flush()?;
        self.drain()
    }

    /// Waits until every queued run is written.
    fn drain(&mut self) -> io::Result<()> {
        while self.io.as_ref().is_some_and(|io| io.in_flight > 0) {
            self.reap_one()?;
        }
        self.check()
    }

    /// A buffer to gather into: a free one, or the next one the I/O thread
    /// hands back, or a new one while fewer than [`BUFFERS`] exist.
    fn take_buffer(&mut self) -> io::Result<AlignedBuf> {
        loop {
            if let Some(b) = self.free.pop() {
                return Ok(b);
            }
            let in_flight = self.io.as_ref().map_or(0, |io| io.in_flight);
            if in_flight + 1 < BUFFERS {
                return Ok(AlignedBuf::new(GATHER));
            }
            self.reap_one()?;
            self.check()?;
        }
    }

    /// Writes `data` at `offset` (possibly later: it may be gathered).
    pub(crate) fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        if !self.direct {
            self.write_out()?;
            return self.buffered.write_all_at(data, offset);
        }
        let contiguous = self.run_len > 0 && offset == self.run_start + self.run_len as u64;
        if !(contiguous && self.run_len + data.len() <= GATHER) {
            self.flush()?;
            if !offset.is_multiple_of(ALIGN as u64) || data.len() > GATHER {
                // Around the queue: after what is queued, as the caller
                // ordered it.
                self.drain()?;
                return self.buffered.write_all_at(data, offset);
            }
            self.run_start = offset;
        }
        let mut buf = match self.buf.take() {
            Some(b) => b,
            None => self.take_buffer()?,
        };
        let at = self.run_len;
        buf.slice_mut()[at..at + data.len()].copy_from_slice(data);
        self.buf = Some(buf);
        self.run_len += data.len();
        Ok(())
    }

    /// Queues the gathered run for the I/O thread, which writes its
    /// aligned part directly and the rest (less than a page) through the
    /// page cache; a short run (under [`DIRECT_MIN`]) wholly through the
    /// cache.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let len = std::mem::take(&mut self.run_len);
        if len == 0 {
            return self.check();
        }
        let Some(buf) = self.buf.take() else {
            return Err(io::Error::other(
                "internal error: a gathered run without its buffer",
            ));
        };
        let run = Run {
            buf,
            start: self.run_start,
            len,
        };
        if self.io.is_none() {
            let files = IoFiles {
                buffered: Arc::clone(&self.buffered),
                direct: self.direct_file.take(),
            };
            self.io = Some(IoThread::spawn(files)?);
        }
        let Some(io) = &mut self.io else {
            return Err(io::Error::other("internal error: no image I/O thread"));
        };
        let sender = io
            .runs
            .as_ref()
            .ok_or_else(|| io::Error::other("internal error: the image I/O queue is closed"))?;
        sender.send(run).map_err(|_| {
            io::Error::other("the image I/O thread stopped before writing its queue")
        })?;
        io.in_flight += 1;
        self.check()
    }

    /// Flushes and syncs the file's data and metadata.
    pub(crate) fn sync_all(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.buffered.sync_all()
    }

    /// Flushes and syncs the file's data.
    pub(crate) fn sync_data(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.buffered.sync_data()
    }

    /// Reads back what was written (after writing out the queue).
    pub(crate) fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.write_out()?;
        self.buffered.read_exact_at(buf, offset)
    }

    /// Sets the file's length (after writing out the queue).
    pub(crate) fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.write_out()?;
        self.buffered.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A new sparse file of `size` bytes in `dir`, and a writer on it.
    fn sparse_image(dir: &Path, size: usize) -> (PathBuf, DirectWriter) {
        let path = dir.join("img");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size as u64).unwrap();
        let w = DirectWriter::new(file, &path);
        (path, w)
    }

    /// Runs of every alignment and contiguity land where they were aimed:
    /// the file reads back as the same writes into a plain buffer.
    #[test]
    fn gathered_direct_writes_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * GATHER + 12345;
        let (path, mut w) = sparse_image(dir.path(), size);
        let mut expect = vec![0u8; size];
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            seed
        };
        // Contiguous aligned blocks (gathered), a gap, an unaligned write,
        // a run that overflows the buffer, and a short tail at the end.
        let mut writes: Vec<(usize, usize)> = (0..20).map(|i| (i * 65536, 65536)).collect();
        writes.push((20 * 65536 + 8192, 100));
        writes.push((GATHER + 3, 5000));
        writes.push((2 * GATHER, GATHER));
        writes.push((3 * GATHER, 4096));
        writes.push((3 * GATHER + 4096, 12345 - 4096));
        for (off, len) in writes {
            let data: Vec<u8> = (0..len).map(|_| (next() >> 16) as u8).collect();
            expect[off..off + len].copy_from_slice(&data);
            w.write_at(off as u64, &data).unwrap();
        }
        w.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expect);
    }

    /// Runs queued for the I/O thread and writes made around the queue
    /// (unaligned, or short through the cache) land in the order they were
    /// made, even where they overlap; reading back mid-way sees every
    /// earlier write.
    #[test]
    fn queued_and_direct_writes_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * GATHER;
        let (path, mut w) = sparse_image(dir.path(), size);
        let mut expect = vec![0u8; size];
        let mut seed = 11u32;
        let mut byte = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8
        };
        // Full runs (queued), each overwritten in part right after by an
        // unaligned write (around the queue) and by a short aligned one
        // (a cache write inside the I/O thread's queue).
        let mut writes = Vec::new();
        for i in 0..6 {
            writes.push((i * GATHER, GATHER));
            writes.push((i * GATHER + 100, 3000));
            writes.push((i * GATHER + 8192, 4096));
        }
        // Scattered single pages, then one overwriting a queued run.
        for i in 0..40 {
            writes.push((6 * GATHER + i * 3 * ALIGN, ALIGN));
        }
        writes.push((7 * GATHER, GATHER));
        writes.push((7 * GATHER + GATHER / 2, ALIGN));
        for (n, (off, len)) in writes.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|_| byte()).collect();
            expect[off..off + len].copy_from_slice(&data);
            w.write_at(off as u64, &data).unwrap();
            if n == 9 {
                let mut back = vec![0u8; GATHER];
                w.read_exact_at(&mut back, GATHER as u64).unwrap();
                assert_eq!(back, expect[GATHER..2 * GATHER]);
            }
        }
        w.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expect);
    }

    /// A write the I/O thread fails is reported, by a later call at the
    /// latest by the sync, and every call after it fails too: an image
    /// with a lost write is never reported synced.
    #[test]
    fn a_failed_queued_write_poisons_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 2 * GATHER]).unwrap();
        // The cache descriptor cannot write: short runs fail in the I/O
        // thread (or at once where there are no direct writes).
        let read_only = File::open(&path).unwrap();
        let mut w = DirectWriter::new(read_only, &path);
        let first = w
            .write_at(0, &[7u8; ALIGN])
            .and_then(|()| w.write_at(GATHER as u64, &[8u8; ALIGN]))
            .and_then(|()| w.sync_all());
        assert!(first.is_err(), "a lost write was not reported");
        assert!(w.write_at(3 * ALIGN as u64, &[9u8; ALIGN]).is_err());
        assert!(w.sync_all().is_err());
    }
}
