//! A recovery point's disk served over NBD straight from the replica store
//! (instant failover): the replica VM boots from a local qcow2 overlay whose
//! backing is this export, while QEMU's `block-stream` copies everything to
//! the overlay in the background.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use siterec_nbd::Bytes;
use siterec_nbd::async_trait;
use siterec_nbd::{Export, ExportError, ExportExtent, Segment};
use siterec_store::{DiskManifest, Store};

/// Chunks kept in memory per export (a few MiB): the guest's and the
/// stream's reads of one chunk come in several requests.
const CACHE_CHUNKS: usize = 32;

/// One disk of a recovery point as an NBD export. All-zero chunks (not
/// stored) are holes; every chunk read is verified by the store.
pub struct StoreExport {
    store: Store,
    disk: Arc<DiskManifest>,
    cache: Mutex<(HashMap<usize, Bytes>, VecDeque<usize>)>,
}

impl StoreExport {
    pub fn new(store: Store, disk: DiskManifest) -> StoreExport {
        StoreExport {
            store,
            disk: Arc::new(disk),
            cache: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    async fn chunk(&self, index: usize) -> Result<Option<Bytes>, ExportError> {
        if let Ok(c) = self.cache.lock()
            && let Some(b) = c.0.get(&index)
        {
            return Ok(Some(b.clone()));
        }
        let data = self
            .store
            .read_chunk_at(&self.disk, index)
            .await
            .map_err(|e| {
                ExportError::new(format!(
                    "chunk {index} of disk '{}': {e}",
                    self.disk.disk_id
                ))
            })?;
        let Some(data) = data else { return Ok(None) };
        let bytes = Bytes::from(data);
        if let Ok(mut c) = self.cache.lock() {
            if c.0.insert(index, bytes.clone()).is_none() {
                c.1.push_back(index);
            }
            while c.1.len() > CACHE_CHUNKS {
                if let Some(old) = c.1.pop_front() {
                    c.0.remove(&old);
                }
            }
        }
        Ok(Some(bytes))
    }
}

#[async_trait]
impl Export for StoreExport {
    fn size(&self) -> u64 {
        self.disk.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Segment>, ExportError> {
        let chunk = u64::from(self.disk.chunk_size);
        let end = offset + u64::from(len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = (pos / chunk) as usize;
            let start = index as u64 * chunk;
            let piece_end = (start + chunk).min(end);
            let from = (pos - start) as usize;
            let to = (piece_end - start) as usize;
            match self.disk.chunks.get(index).copied().flatten() {
                None => out.push(Segment::Zero((piece_end - pos) as u32)),
                Some(_) => match self.chunk(index).await? {
                    Some(b) if b.len() >= to => out.push(Segment::Data(b.slice(from..to))),
                    Some(b) => {
                        return Err(ExportError::new(format!(
                            "chunk {index} of disk '{}' holds {} bytes, {to} needed",
                            self.disk.disk_id,
                            b.len()
                        )));
                    }
                    None => out.push(Segment::Zero((piece_end - pos) as u32)),
                },
            }
            pos = piece_end;
        }
        Ok(out)
    }

    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<ExportExtent>, ExportError> {
        let chunk = u64::from(self.disk.chunk_size);
        let end = offset + u64::from(len);
        let mut out: Vec<ExportExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = (pos / chunk) as usize;
            let piece_end = ((index as u64 + 1) * chunk).min(end);
            let length = piece_end - pos;
            let hole = self.disk.chunks.get(index).copied().flatten().is_none();
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += length,
                // A chunk that is not stored is a hole and not also
                // "zero": QEMU counts zero extents as allocated, and its
                // background copy would then write every hole of a sparse
                // disk. Reads of a hole return zeros all the same.
                _ => out.push(ExportExtent {
                    length,
                    hole,
                    zero: false,
                }),
            }
            pos = piece_end;
        }
        Ok(out)
    }
}
