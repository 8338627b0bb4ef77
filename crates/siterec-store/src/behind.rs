//! Chunk writes behind the upload's answer.
//!
//! A target used to answer a chunk upload only once the chunk's file was
//! written: a direct write of up to a megabyte into a new file, 2–15 ms on
//! the virtual disks we measured, during which the source's upload stream
//! waited. With four streams (the policy default) the initial copy spent a
//! third of its time with both cores idle, waiting on the disk. Now an
//! upload is answered once the chunk is checked and sealed; its write is
//! queued to a few writer threads, so the disk works while the next
//! chunks are received, checked and sealed.
//!
//! What an answer means, then: the chunk is valid and will be written
//! before the next commit, sync or gc of the store returns — each first
//! waits ([`WriteBehind::wait`]) for every write queued before it, and the
//! first failed write since the last wait fails it. A failed write leaves
//! no object, so a commit that needs the chunk is refused as missing and
//! the source sends it again. While queued, a chunk counts as stored
//! ([`WriteBehind::pending`]). A process killed with writes queued loses
//! them as a power cut loses chunks not yet synced: nothing refers to them
//! until a commit, which would find them missing.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::backend::{Backend, BlockingObjects};
use crate::error::StoreError;
use crate::upload::ChunkUpload;

/// Writer threads: writes in flight at the device.
const WRITERS: usize = 4;
/// Writes queued beyond those being written; a full queue holds up the
/// next upload (each holds a buffer of up to a few megabytes).
const QUEUED: usize = 8;

/// One chunk object to write: `upload`'s stored buffer, `len` bytes, under
/// `key`.
pub(crate) struct Write {
    pub key: String,
    pub upload: ChunkUpload,
    pub len: usize,
    /// Dropped once the write is over, whatever its outcome, and before
    /// [`WriteBehind::wait`] can see it over (the store counts the write
    /// done and releases its gate there).
    #[allow(dead_code, reason = "held only to be dropped")]
    pub done: Box<dyn Send>,
}

struct Job {
    seq: u64,
    write: Write,
}

#[derive(Default)]
struct State {
    /// Sequence number of the next write.
    next: u64,
    /// Writes queued or being written.
    in_flight: BTreeSet<u64>,
    /// Their keys, with how many writes of each are in flight.
    keys: HashMap<String, usize>,
    /// The first write that failed since the last wait.
    failure: Option<StoreError>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits on `changed` while `busy` holds.
    fn wait_while<'a>(
        &self,
        s: MutexGuard<'a, State>,
        busy: impl FnMut(&mut State) -> bool,
    ) -> MutexGuard<'a, State> {
        self.changed
            .wait_while(s, busy)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that write `seq` of `key` is over.
    fn finish(&self, seq: u64, key: &str, result: Result<(), StoreError>) {
        let mut s = self.lock();
        s.in_flight.remove(&seq);
        if let Some(n) = s.keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                s.keys.remove(key);
            }
        }
        if let Err(e) = result {
            tracing::error!(%key, error = %e, "writing a chunk object failed");
            s.failure.get_or_insert(e);
        }
        drop(s);
        self.changed.notify_all();
    }
}

/// The writer threads of one store and what they have in hand.
pub(crate) struct WriteBehind {
    /// `None` if no writer thread could be started: writes then happen in
    /// the caller, as before.
    tx: Option<SyncSender<Job>>,
    shared: Arc<Shared>,
}

impl WriteBehind {
    /// Starts the writer threads, which write to `backend`'s blocking
    /// calls. They end when this is dropped and the queue is empty.
    pub(crate) fn start(backend: Arc<dyn Backend>) -> WriteBehind {
        let (tx, rx) = sync_channel::<Job>(QUEUED);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let mut started = 0;
        for _ in 0..WRITERS {
            let (rx, shared, backend) =
                (Arc::clone(&rx), Arc::clone(&shared), Arc::clone(&backend));
            let spawned = std::thread::Builder::new()
                .name("siterec-chunk-write".into())
                .spawn(move || run(&rx, &shared, &*backend));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!(error = %e, "starting a chunk writer thread"),
            }
        }
        WriteBehind {
            tx: (started > 0).then_some(tx),
            shared,
        }
    }

    /// Queues `write`, waiting while the queue is full (call it from a
    /// blocking thread). Without writer threads it is written here, and
    /// its outcome returned.
    pub(crate) fn submit(
        &self,
        objects: &dyn BlockingObjects,
        write: Write,
    ) -> Result<(), StoreError> {
        let Some(tx) = &self.tx else {
            return write_now(objects, &write);
        };
        let seq = {
            let mut s = self.shared.lock();
            let seq = s.next;
            s.next += 1;
            s.in_flight.insert(seq);
            *s.keys.entry(write.key.clone()).or_default() += 1;
            seq
        };
        if let Err(refused) = tx.send(Job { seq, write }) {
            // Every writer thread is gone (they only end when this is
            // dropped, or by a panic): write it here.
            let Job { seq, write } = refused.0;
            let result = write_now(objects, &write);
            let key = write.key.clone();
            drop(write);
            self.shared.finish(seq, &key, Ok(()));
            return result;
        }
        Ok(())
    }

    /// Whether a write of `key` is queued or under way.
    pub(crate) fn pending(&self, key: &str) -> bool {
        self.shared.lock().keys.contains_key(key)
    }

    /// Waits (blocking) while a write of `key` is queued or under way, so
    /// that a read right after an upload finds its object.
    pub(crate) fn wait_for(&self, key: &str) {
        let s = self.shared.lock();
        drop(self.shared.wait_while(s, |s| s.keys.contains_key(key)));
    }

    /// Waits (blocking) until every write queued before this call is over;
    /// then returns, once, the first failure since the last wait.
    pub(crate) fn wait(&self) -> Result<(), StoreError> {
        let s = self.shared.lock();
        let until = s.next;
        let mut s = self
            .shared
            .wait_while(s, |s| s.in_flight.first().is_some_and(|&seq| seq < until));
        match s.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Writes `w` unless its object is stored already (the upload did not
/// look: a directory lookup can wait on the disk).
fn write_now(objects: &dyn BlockingObjects, w: &Write) -> Result<(), StoreError> {
    if objects.exists_blocking(&w.key)? {
        return Ok(());
    }
    let buf = w.upload.stored(w.len).ok_or_else(|| {
        StoreError::Task(format!(
            "writing {}: an object of {} bytes does not fit its buffer",
            w.key, w.len
        ))
    })?;
    objects.put_blocking_aligned(&w.key, buf, w.len)
}

/// A writer thread: takes jobs until the queue is closed and empty.
fn run(rx: &Mutex<Receiver<Job>>, shared: &Shared, backend: &dyn Backend) {
    loop {
        let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let Job { seq, write } = job;
        // A panic must not leave the write in flight forever (a commit
        // would wait for it): it becomes the write's failure.
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| match backend.blocking_objects() {
                Some(objects) => write_now(objects, &write),
                None => Err(StoreError::Task(
                    "the backend no longer offers blocking calls".into(),
                )),
            }))
            .unwrap_or_else(|_| {
                Err(StoreError::Task(format!(
                    "writing {}: the writer thread panicked",
                    write.key
                )))
            });
        let key = write.key.clone();
        // The store counts the write done before a wait can see it over.
        drop(write);
        shared.finish(seq, &key, result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalDir;

    fn upload(data: &[u8]) -> (ChunkUpload, usize) {
        let mut up = ChunkUpload::new(0, data.len(), data.len());
        up.extend_from_slice(data).unwrap();
        up.stored_mut(data.len()).unwrap();
        (up, data.len())
    }

    #[test]
    fn queued_writes_are_pending_until_written_and_wait_sees_them_through() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(dir.path()).unwrap());
        let wb = WriteBehind::start(Arc::clone(&backend));
        let objects = backend.blocking_objects().unwrap();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let n = 40;
        for i in 0..n {
            let data = vec![i as u8 + 1; 300_000 + i * 4096];
            let (upload, len) = upload(&data);
            let key = format!("chunks/{i:02}/x");
            wb.submit(
                objects,
                Write {
                    key: key.clone(),
                    upload,
                    len,
                    done: Box::new(Count(Arc::clone(&done))),
                },
            )
            .unwrap();
            // Queued or written: one or the other, never neither.
            assert!(wb.pending(&key) || objects.exists_blocking(&key).unwrap());
        }
        wb.wait().unwrap();
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), n);
        for i in 0..n {
            let key = format!("chunks/{i:02}/x");
            assert!(!wb.pending(&key));
            let got = std::fs::read(dir.path().join(&key)).unwrap();
            assert_eq!(got, vec![i as u8 + 1; 300_000 + i * 4096], "{key}");
        }
    }

    #[test]
    fn a_failed_write_fails_the_next_wait_once_and_leaves_no_object() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(dir.path()).unwrap());
        let wb = WriteBehind::start(Arc::clone(&backend));
        let objects = backend.blocking_objects().unwrap();
        // A file where the key's directory should be: the write fails.
        std::fs::write(dir.path().join("chunks"), b"in the way").unwrap();
        let (upload, len) = upload(&[7u8; 100_000]);
        wb.submit(
            objects,
            Write {
                key: "chunks/ab/cd".into(),
                upload,
                len,
                done: Box::new(()),
            },
        )
        .unwrap();
        let e = wb.wait().unwrap_err();
        assert!(e.to_string().contains("chunks"), "{e}");
        assert!(!wb.pending("chunks/ab/cd"));
        wb.wait().unwrap();
        assert!(!dir.path().join("chunks/ab/cd").exists());
    }
}
