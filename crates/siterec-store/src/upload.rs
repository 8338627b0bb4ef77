//! A chunk object received from the network, collected straight into the
//! buffer the store checks, seals and writes it from.
//!
//! The target used to gather an upload into a fresh buffer (page faults on
//! every megabyte), then copy it into a direct-I/O staging buffer to seal
//! it. A [`ChunkUpload`] is that staging buffer from the start: page
//! aligned, from the shared pool, with room left before the object for
//! the envelope header and after it for the trailer, so an encrypted store
//! seals it where it lies and writes it with `O_DIRECT` as it is.

use crate::backend::{DIRECT_ALIGN, DIRECT_BUF, padded_len};
use crate::crypt::ENVELOPE_OVERHEAD;

/// An upload longer than the receiver accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the chunk object is longer than {max} bytes")]
pub struct UploadTooLarge {
    pub max: usize,
}

/// A chunk object being received; see the module documentation. Made by
/// [`crate::Store::chunk_upload`], stored by
/// [`crate::Store::put_chunk_upload`].
pub struct ChunkUpload {
    /// From [`DIRECT_BUF`]; every byte initialised.
    raw: Vec<u8>,
    /// Page-aligned offset in `raw` where the stored object begins.
    start: usize,
    /// Bytes before the chunk object (the envelope header when sealing).
    room: usize,
    /// Chunk object bytes received.
    len: usize,
    /// Longest chunk object accepted.
    max: usize,
}

impl ChunkUpload {
    /// An empty upload with `room` bytes before the object, sized for
    /// `expected` bytes (it grows up to `max`).
    pub(crate) fn new(room: usize, expected: usize, max: usize) -> ChunkUpload {
        let mut up = ChunkUpload {
            raw: DIRECT_BUF.take(),
            start: 0,
            room,
            len: 0,
            max,
        };
        up.reserve(expected.min(max));
        up
    }

    /// Makes room for an object of `len` bytes (keeping what was
    /// received); grows by at least half again to bound the copies.
    fn reserve(&mut self, len: usize) {
        let need = padded_len(self.room + len + ENVELOPE_OVERHEAD);
        let start = self.raw.as_ptr().align_offset(DIRECT_ALIGN);
        if start + need <= self.raw.len() {
            self.start = start;
            return;
        }
        let grown = need.max(self.raw.len() + self.raw.len() / 2);
        let mut raw = vec![0u8; grown + DIRECT_ALIGN];
        let new_start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        // Only the object is kept: nothing is in the room yet.
        if self.len > 0 {
            let (from, to) = (self.start + self.room, new_start + self.room);
            raw[to..to + self.len].copy_from_slice(&self.raw[from..from + self.len]);
        }
        let old = std::mem::replace(&mut self.raw, raw);
        DIRECT_BUF.give(old);
        self.start = new_start;
    }

    /// Appends received bytes; refuses (keeping nothing of `data`) to go
    /// past the maximum.
    pub fn extend_from_slice(&mut self, data: &[u8]) -> Result<(), UploadTooLarge> {
        let len = self.len + data.len();
        if len > self.max {
            return Err(UploadTooLarge { max: self.max });
        }
        self.reserve(len);
        let at = self.start + self.room + self.len;
        self.raw[at..at + data.len()].copy_from_slice(data);
        self.len = len;
        Ok(())
    }

    /// The chunk object received so far.
    pub fn object(&self) -> &[u8] {
        &self.raw[self.start + self.room..][..self.len]
    }

    /// Bytes before the object.
    pub(crate) fn room(&self) -> usize {
        self.room
    }

    /// The stored object's buffer as [`ChunkUpload::stored_mut`] made it
    /// (once sealed), for writing; `None` if `stored_len` does not fit.
    pub(crate) fn stored(&self, stored_len: usize) -> Option<&[u8]> {
        self.raw
            .get(self.start..self.start + padded_len(stored_len))
    }

    /// The stored object's page-aligned buffer for `stored_len` bytes
    /// (the room, the object, then what follows it), zeros from
    /// `stored_len` to the end of its last page; `None` if `stored_len`
    /// does not fit what was reserved.
    pub(crate) fn stored_mut(&mut self, stored_len: usize) -> Option<&mut [u8]> {
        let padded = padded_len(stored_len);
        let buf = self.raw.get_mut(self.start..self.start + padded)?;
        buf[stored_len..].fill(0);
        Some(buf)
    }
}

impl Drop for ChunkUpload {
    fn drop(&mut self) {
        DIRECT_BUF.give(std::mem::take(&mut self.raw));
    }
}

impl std::fmt::Debug for ChunkUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkUpload")
            .field("room", &self.room)
            .field("len", &self.len)
            .field("max", &self.max)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_keeps_what_it_holds_and_refuses_past_the_maximum() {
        // Whatever the pool holds (other tests share it), and with a
        // buffer too small to begin with.
        drop(ChunkUpload {
            raw: Vec::new(),
            start: 0,
            room: 0,
            len: 0,
            max: 0,
        });
        let mut empty = ChunkUpload::new(40, 0, 10);
        empty.extend_from_slice(b"0123456789").unwrap();
        assert_eq!(empty.object(), b"0123456789");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // Sized for far less than arrives: it grows, staying aligned.
        let mut up = ChunkUpload::new(40, 1000, 300_000);
        for piece in data.chunks(16 * 1024 + 7) {
            up.extend_from_slice(piece).unwrap();
        }
        assert_eq!(up.object(), &data[..]);
        assert_eq!(
            up.extend_from_slice(b"x"),
            Err(UploadTooLarge { max: 300_000 })
        );
        assert_eq!(up.object(), &data[..], "a refused piece changes nothing");
        let stored = 40 + data.len() + 5;
        let buf = up.stored_mut(stored).unwrap();
        assert_eq!(buf.as_ptr().align_offset(DIRECT_ALIGN), 0);
        assert_eq!(buf.len(), padded_len(stored));
        assert_eq!(&buf[40..40 + data.len()], &data[..]);
        assert!(buf[stored..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_reused_buffer_shows_nothing_of_its_last_upload() {
        let mut up = ChunkUpload::new(0, 8192, 8192);
        up.extend_from_slice(&[7u8; 8192]).unwrap();
        drop(up);
        let mut up = ChunkUpload::new(0, 8192, 8192);
        assert!(up.object().is_empty());
        up.extend_from_slice(&[1u8; 100]).unwrap();
        let buf = up.stored_mut(100).unwrap();
        assert!(buf[100..].iter().all(|&b| b == 0), "the padding is zeros");
    }
}
