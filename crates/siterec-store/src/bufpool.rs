//! Large scratch buffers shared by the threads of the process.
//!
//! Chunk work needs megabyte-sized scratch space: a decompressed chunk to
//! hash, a compressor's worst-case output, a page-aligned staging area for
//! direct I/O. Allocating it for every chunk costs page faults (fresh pages
//! are zeroed by the kernel); keeping one per thread made memory grow with
//! the number of threads instead, and tokio's blocking pool grows on a
//! burst of short tasks — a hundred threads once held a quarter of a
//! gigabyte of buffers. A [`Pool`] keeps a few free buffers for whichever
//! thread asks next, so what it holds is bounded by the work in flight
//! plus [`Pool::keep`] spare buffers.

use std::sync::{Mutex, PoisonError};

/// A bounded free list of byte buffers.
pub(crate) struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Free buffers kept at most.
    keep: usize,
    /// Buffers with a larger capacity are dropped, not kept.
    max_capacity: usize,
}

impl Pool {
    pub(crate) const fn new(keep: usize, max_capacity: usize) -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
            keep,
            max_capacity,
        }
    }

    /// Runs `f` on a buffer from the pool (empty or holding whatever the
    /// last user left in it), and gives the buffer back afterwards unless
    /// the pool is full or the buffer grew too large.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let mut buf = self.take();
        let out = f(&mut buf);
        self.give(buf);
        out
    }

    /// A buffer from the pool (empty or holding whatever the last user
    /// left in it), for a user that holds it across calls; see
    /// [`Pool::give`].
    pub(crate) fn take(&self) -> Vec<u8> {
        self.lock().pop().unwrap_or_default()
    }

    /// Gives `buf` back, unless the pool is full or the buffer grew too
    /// large (then it is freed).
    pub(crate) fn give(&self, buf: Vec<u8>) {
        if buf.capacity() <= self.max_capacity {
            let mut free = self.lock();
            if free.len() < self.keep {
                free.push(buf);
            }
        }
    }

    /// Free buffers held now.
    #[cfg(test)]
    pub(crate) fn free_buffers(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic while the list was locked cannot leave it inconsistent
        // (a push or a pop): keep using it.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_keep_buffers_of_at_most_max_capacity() {
        let pool = Pool::new(2, 1024);
        // Three users at once: three buffers, two kept afterwards.
        pool.with(|a| {
            a.resize(100, 1);
            pool.with(|b| {
                b.resize(100, 2);
                pool.with(|c| c.resize(100, 3));
            })
        });
        assert_eq!(pool.free_buffers(), 2);
        // A reused buffer comes back with its contents and capacity.
        let (len, cap) = pool.with(|b| (b.len(), b.capacity()));
        assert_eq!(len, 100);
        assert!(cap >= 100);
        // One that grew beyond the limit is dropped.
        pool.with(|b| b.resize(4096, 0));
        assert_eq!(pool.free_buffers(), 1);
    }

    #[test]
    fn threads_share_the_buffers() {
        let pool = std::sync::Arc::new(Pool::new(4, 1 << 20));
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let pool = std::sync::Arc::clone(&pool);
                std::thread::spawn(move || pool.with(|b| b.resize(1000 + i, 0)))
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert!(pool.free_buffers() <= 4);
        assert!(pool.free_buffers() >= 1);
    }
}
