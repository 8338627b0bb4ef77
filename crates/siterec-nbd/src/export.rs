//! What the server exports: the [`Export`] trait (size, async reads that
//! may come back sparse, allocation extents) and [`MemoryExport`], an
//! in-memory export with the replica store's hole rule (all-zero blocks are
//! holes).

use bytes::Bytes;

/// One piece of the answer to [`Export::read`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Bytes of the export.
    Data(Bytes),
    /// This many bytes that read as zeros (sent to clients that negotiated
    /// structured replies as `NBD_REPLY_TYPE_OFFSET_HOLE`, without the
    /// zeros on the wire).
    Zero(u32),
}

impl Segment {
    /// How many bytes of the export the segment covers.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Data(b) => b.len() as u64,
            Segment::Zero(n) => u64::from(*n),
        }
    }

    /// Whether the segment covers no bytes (such segments are skipped).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The allocation status of a run of the export, for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportExtent {
    /// Length in bytes.
    pub length: u64,
    /// Not allocated in the backing storage (`NBD_STATE_HOLE`). For the
    /// replica store: a chunk that is not stored (all zeros).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl ExportExtent {
    /// Allocated data.
    pub fn data(length: u64) -> Self {
        ExportExtent {
            length,
            hole: false,
            zero: false,
        }
    }

    /// A hole that reads as zeros (what the store has for all-zero chunks).
    pub fn hole(length: u64) -> Self {
        ExportExtent {
            length,
            hole: true,
            zero: true,
        }
    }

    /// Allocated, but known to read as zeros.
    pub fn zero(length: u64) -> Self {
        ExportExtent {
            length,
            hole: false,
            zero: true,
        }
    }

    /// The `base:allocation` status flags.
    pub fn flags(&self) -> u32 {
        (if self.hole {
            crate::proto::STATE_HOLE
        } else {
            0
        }) | (if self.zero {
            crate::proto::STATE_ZERO
        } else {
            0
        })
    }
}

/// A failed read or extent lookup of an [`Export`]. The server answers the
/// request with `EIO` and this message (structured replies carry it to the
/// client), logs it, and keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    message: String,
}

impl ExportError {
    /// An error with a message for the client and the log.
    pub fn new(message: impl Into<String>) -> Self {
        ExportError {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        ExportError::new(e.to_string())
    }
}

/// What an NBD server exports: a read-only disk of [`Export::size`] bytes.
///
/// The server checks every request against the size before calling in, so
/// `offset + len <= size()` always holds, `len` is at most the server's
/// maximum block size (32 MiB by default) for reads, and `len > 0`. Calls
/// for several requests of one connection (and of several connections) run
/// concurrently. A call may be cancelled (its future dropped) when the
/// client disconnects or the server shuts down.
///
/// Object safe: the server holds an `Arc<dyn Export>`. Implement it with
/// `#[siterec_nbd::async_trait]` on the impl block.
#[async_trait::async_trait]
pub trait Export: Send + Sync {
    /// The size in bytes. Must not change while the export is served.
    fn size(&self) -> u64;

    /// Reads `len` bytes at `offset`: segments in order whose lengths add up
    /// to exactly `len` (anything else is answered with `EIO`). Return
    /// [`Segment::Zero`] for runs known to be zeros, so that clients with
    /// structured replies get holes instead of zeros on the wire.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Segment>, ExportError>;

    /// The allocation status of `[offset, offset + len)`, in order from
    /// `offset`. The list may describe less than `len` (the client asks again
    /// for the rest) but not nothing; whatever runs past `len` is cut off.
    /// The default says "all data", which is always correct but makes QEMU
    /// copy holes.
    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<ExportExtent>, ExportError> {
        let _ = offset;
        Ok(vec![ExportExtent::data(u64::from(len))])
    }
}

/// An export held in memory. Blocks of `block` bytes (the last one may be
/// shorter) that are all zeros are holes, as chunks are in the replica
/// store: reads return [`Segment::Zero`] for them and `base:allocation`
/// reports them as `NBD_STATE_HOLE | NBD_STATE_ZERO`. For tests, and for
/// serving small images.
#[derive(Debug, Clone)]
pub struct MemoryExport {
    data: Bytes,
    block: u64,
    holes: Vec<bool>,
}

impl MemoryExport {
    /// An export of `data` with holes found at `block` granularity (at least
    /// 1; the agent's chunks are 1 MiB).
    pub fn new(data: impl Into<Bytes>, block: u32) -> Self {
        let data = data.into();
        let block = u64::from(block.max(1));
        let holes = data
            .chunks(block as usize)
            .map(|b| b.iter().all(|x| *x == 0))
            .collect();
        MemoryExport { data, block, holes }
    }

    /// The bytes exported.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// Calls `f(start, end, hole)` for each run of equal hole status in
    /// `[offset, offset + len)`, clipped to the range.
    fn runs(&self, offset: u64, len: u64, mut f: impl FnMut(u64, u64, bool)) {
        let end = offset.saturating_add(len).min(self.data.len() as u64);
        let mut pos = offset;
        while pos < end {
            let index = (pos / self.block) as usize;
            let hole = self.holes.get(index).copied().unwrap_or(false);
            let mut run_end = ((index as u64 + 1) * self.block).min(end);
            let mut next = index + 1;
            while run_end < end && self.holes.get(next).copied() == Some(hole) {
                run_end = ((next as u64 + 1) * self.block).min(end);
                next += 1;
            }
            f(pos, run_end, hole);
            pos = run_end;
        }
    }
}

#[async_trait::async_trait]
impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Segment>, ExportError> {
        let end = offset
            .checked_add(u64::from(len))
            .filter(|e| *e <= self.size())
            .ok_or_else(|| {
                ExportError::new(format!("read of {len} bytes at {offset} is out of range"))
            })?;
        let mut out = Vec::new();
        self.runs(offset, end - offset, |s, e, hole| {
            out.push(if hole {
                Segment::Zero((e - s) as u32)
            } else {
                Segment::Data(self.data.slice(s as usize..e as usize))
            })
        });
        Ok(out)
    }

    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<ExportExtent>, ExportError> {
        let mut out = Vec::new();
        self.runs(offset, u64::from(len), |s, e, hole| {
            out.push(if hole {
                ExportExtent::hole(e - s)
            } else {
                ExportExtent::data(e - s)
            })
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_export_reads_holes_as_zero_segments() {
        let mut data = vec![0u8; 10 * 1024];
        data[1024..2048].fill(7); // block 1 of 1 KiB blocks
        data[9 * 1024 + 5] = 1; // block 9
        let e = MemoryExport::new(data.clone(), 1024);
        let segs = e.read(512, 9000).await.unwrap();
        assert_eq!(
            segs,
            vec![
                Segment::Zero(512),
                Segment::Data(Bytes::copy_from_slice(&data[1024..2048])),
                Segment::Zero(7 * 1024),
                Segment::Data(Bytes::copy_from_slice(&data[9216..9512])),
            ]
        );
        let ext = e.extents(0, 10 * 1024).await.unwrap();
        assert_eq!(
            ext,
            vec![
                ExportExtent::hole(1024),
                ExportExtent::data(1024),
                ExportExtent::hole(7 * 1024),
                ExportExtent::data(1024),
            ]
        );
        assert!(e.read(10 * 1024 - 1, 2).await.is_err());
    }
}
