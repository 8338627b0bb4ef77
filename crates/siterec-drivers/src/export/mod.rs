//! Disk image writers: materialise a recovery point as a raw, qcow2 or VHD
//! (fixed or dynamic) image.
//!
//! Data arrives as `(offset, bytes)` for non-zero blocks; regions never
//! written read as zeros (sparse in raw and fixed VHD, unallocated in qcow2
//! and dynamic VHD).

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::capture::is_zero;

mod direct;
mod vhd;
#[cfg(test)]
mod vhd_tests;

pub use vhd::{MAX_VHD_SIZE, VHD_BLOCK_SIZE, VhdDynamicWriter, VhdFixedWriter, vhd_disk_size};

/// Errors from the image writers.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// I/O error on the image file.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The image file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A qcow2 write did not start on a cluster boundary.
    #[error("write at offset {offset} is not aligned to the {alignment}-byte cluster size")]
    Unaligned {
        /// Offset requested.
        offset: u64,
        /// Required alignment.
        alignment: u64,
    },
    /// A write extends past the virtual size.
    #[error("write of {len} bytes at offset {offset} exceeds the virtual size {virtual_size}")]
    OutOfRange {
        /// Offset requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Image virtual size.
        virtual_size: u64,
    },
    /// Invalid argument (size, format name, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> ExportError {
    ExportError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Raw (sparse) image: byte-for-byte the disk.
    Raw,
    /// QEMU qcow2 version 3, 64 KiB clusters.
    Qcow2,
    /// Fixed VHD (what Azure takes): the raw disk, rounded up to a whole
    /// MiB, followed by a 512-byte footer.
    #[serde(rename = "vhd-fixed")]
    VhdFixed,
    /// Dynamic VHD (Hyper-V): 2 MiB blocks allocated as written.
    #[serde(rename = "vhd-dynamic")]
    VhdDynamic,
}

impl ImageFormat {
    /// `"raw"` / `"qcow2"` / `"vhd-fixed"` / `"vhd-dynamic"` (the serde and
    /// [`FromStr`] name).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::VhdFixed => "vhd-fixed",
            ImageFormat::VhdDynamic => "vhd-dynamic",
        }
    }

    /// The `qemu-img -f` driver name: `"raw"`, `"qcow2"`, or `"vpc"` for
    /// both VHD flavours (qemu tells them apart by the footer).
    pub fn qemu_driver(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::VhdFixed | ImageFormat::VhdDynamic => "vpc",
        }
    }

    /// Conventional file extension: `"img"` / `"qcow2"` / `"vhd"`.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Raw => "img",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::VhdFixed | ImageFormat::VhdDynamic => "vhd",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = ExportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            "vhd-fixed" => Ok(ImageFormat::VhdFixed),
            "vhd-dynamic" => Ok(ImageFormat::VhdDynamic),
            other => Err(ExportError::InvalidArgument(format!(
                "unknown image format {other:?} (expected \"raw\", \"qcow2\", \
                 \"vhd-fixed\" or \"vhd-dynamic\")"
            ))),
        }
    }
}

/// A disk image being written. Synchronous and blocking.
///
/// An image is only valid after [`ImageWriter::finish`]; dropping a writer
/// without finishing leaves an incomplete file (for qcow2: one without a
/// header; for VHD: one without a footer; no tool will open either).
pub trait ImageWriter: Send {
    /// Write `data` at virtual `offset`. For qcow2, `offset` must be a
    /// multiple of 64 KiB; `data` may have any length (a short last block
    /// is padded with zeros inside its cluster). Raw and VHD accept any
    /// offset, in any order.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError>;

    /// [`ImageWriter::write_at`] for a range nothing was written to yet
    /// (materializing writes each block once): a writer may leave the
    /// all-zero pages of `data` unwritten, as holes that read as zeros.
    /// The raw writer does, keeping the image sparse where the disk was.
    fn write_new_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        self.write_at(offset, data)
    }

    /// Write the metadata and fsync the image.
    fn finish(self: Box<Self>) -> Result<(), ExportError>;
}

/// Create an image of `format` at `path` (truncating an existing file) with
/// the given virtual size. VHD images round the size up to a whole MiB (see
/// [`vhd_disk_size`]); the extra tail reads as zeros.
pub fn create_writer(
    format: ImageFormat,
    path: &Path,
    virtual_size: u64,
) -> Result<Box<dyn ImageWriter>, ExportError> {
    Ok(match format {
        ImageFormat::Raw => Box::new(RawWriter::create(path, virtual_size)?),
        ImageFormat::Qcow2 => Box::new(Qcow2Writer::create(path, virtual_size)?),
        ImageFormat::VhdFixed => Box::new(VhdFixedWriter::create(path, virtual_size)?),
        ImageFormat::VhdDynamic => Box::new(VhdDynamicWriter::create(path, virtual_size)?),
    })
}

fn create_file(path: &Path) -> Result<File, ExportError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err("creating image", path, e))
}

fn check_range(offset: u64, len: usize, virtual_size: u64) -> Result<(), ExportError> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= virtual_size => Ok(()),
        _ => Err(ExportError::OutOfRange {
            offset,
            len,
            virtual_size,
        }),
    }
}

/// Raw image: a sparse file of exactly `virtual_size` bytes, written
/// around the page cache where the filesystem allows (see
/// [`direct::DirectWriter`]).
pub struct RawWriter {
    file: direct::DirectWriter,
    path: PathBuf,
    virtual_size: u64,
}

impl fmt::Debug for RawWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawWriter")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .finish()
    }
}

impl RawWriter {
    /// Create the file and size it (sparse).
    pub fn create(path: &Path, virtual_size: u64) -> Result<RawWriter, ExportError> {
        let file = create_file(path)?;
        file.set_len(virtual_size)
            .map_err(|e| io_err("sizing image", path, e))?;
        Ok(RawWriter {
            file: direct::DirectWriter::new(file, path),
            path: path.to_path_buf(),
            virtual_size,
        })
    }
}

impl ImageWriter for RawWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        check_range(offset, data.len(), self.virtual_size)?;
        self.file
            .write_at(offset, data)
            .map_err(|e| io_err("writing image", &self.path, e))
    }

    /// Writes the runs of pages of `data` that are not all zeros; the
    /// others stay holes (the file was created sparse). A block of a disk
    /// that was mostly empty then costs the device only its data.
    fn write_new_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        check_range(offset, data.len(), self.virtual_size)?;
        if !offset.is_multiple_of(SPARSE_PAGE as u64) {
            return self.write_at(offset, data);
        }
        let page = |at: usize| &data[at..(at + SPARSE_PAGE).min(data.len())];
        let mut at = 0;
        while at < data.len() {
            if crate::capture::is_zero(page(at)) {
                at += page(at).len();
                continue;
            }
            let start = at;
            while at < data.len() && !crate::capture::is_zero(page(at)) {
                at += page(at).len();
            }
            self.write_at(offset + start as u64, &data[start..at])?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), ExportError> {
        self.file
            .sync_all()
            .map_err(|e| io_err("syncing image", &self.path, e))
    }
}

/// Granularity at which [`RawWriter::write_new_at`] leaves zeros as holes.
const SPARSE_PAGE: usize = 4096;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// L2 entries per L2 table (one cluster of u64).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// refcount_order 4: 16-bit refcounts, so one refcount block covers this many clusters.
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// Entries (u64) per refcount table cluster.
const RT_ENTRIES_PER_CLUSTER: u64 = CLUSTER / 8;
/// "Refcount is exactly one" flag of L1/L2 entries.
const QCOW_OFLAG_COPIED: u64 = 1 << 63;
const HEADER_LENGTH: u32 = 104;
/// Largest virtual size we accept (L1 table ≤ 32 MiB, 2 PiB images).
const MAX_QCOW2_SIZE: u64 = 1 << 51;

/// Refcount blocks and refcount table clusters needed so that the refcount
/// structures cover `used` clusters plus themselves (a fixed point: adding
/// refcount blocks adds clusters that need refcounts).
fn refcount_layout(used: u64) -> (u64, u64) {
    let mut blocks = 1u64;
    let mut table = 1u64;
    loop {
        let total = used + blocks + table;
        let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let need_table = need_blocks.div_ceil(RT_ENTRIES_PER_CLUSTER);
        if need_blocks <= blocks && need_table <= table {
            return (blocks, table);
        }
        blocks = blocks.max(need_blocks);
        table = table.max(need_table);
    }
}

/// qcow2 (version 3) writer: 64 KiB clusters, 16-bit refcounts, no backing
/// file, no snapshots, no compression.
///
/// Layout: cluster 0 = header (written last, at `finish`, so an unfinished
/// image is never a valid qcow2), then the L1 table, then L2 tables and data
/// clusters appended in write order, then at `finish` the refcount blocks and
/// the refcount table. Every cluster is referenced exactly once, so all
/// refcounts are 1 and every L1/L2 entry carries `QCOW_OFLAG_COPIED`.
///
/// Memory: the L1 table plus one L2 table (the current one; others are
/// written out when the writer moves on and read back if revisited), so any
/// size up to 2 PiB works with a few MiB at most.
#[derive(Debug)]
pub struct Qcow2Writer {
    /// Data clusters are allocated in order, so they gather into long
    /// direct writes (see [`direct::DirectWriter`]).
    file: direct::DirectWriter,
    path: PathBuf,
    virtual_size: u64,
    /// Virtual size recorded in the header: rounded up to 512 bytes, as qemu
    /// only addresses whole sectors.
    header_size: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    /// The L2 table in memory: (L1 index, entries, dirty).
    current_l2: Option<(usize, Vec<u64>, bool)>,
    /// Next free cluster index (all clusters below are used, refcount 1).
    next_cluster: u64,
    /// Scratch buffer for padding a partial cluster.
    pad: Vec<u8>,
    /// L2 tables allocated: L1 index → file offset (mirrors `l1`).
    l2_offsets: HashMap<usize, u64>,
}

impl Qcow2Writer {
    /// Create the image file (truncating) for a disk of `virtual_size` bytes.
    pub fn create(path: &Path, virtual_size: u64) -> Result<Qcow2Writer, ExportError> {
        if virtual_size == 0 || virtual_size > MAX_QCOW2_SIZE {
            return Err(ExportError::InvalidArgument(format!(
                "qcow2 virtual size must be 1..={MAX_QCOW2_SIZE} bytes, got {virtual_size}"
            )));
        }
        let header_size = virtual_size.div_ceil(512) * 512;
        let l1_entries = header_size.div_ceil(CLUSTER * L2_ENTRIES);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
        let file = direct::DirectWriter::new(create_file(path)?, path);
        Ok(Qcow2Writer {
            file,
            path: path.to_path_buf(),
            virtual_size,
            header_size,
            l1: vec![0; l1_entries as usize],
            l1_offset: CLUSTER,
            current_l2: None,
            next_cluster: 1 + l1_clusters,
            pad: Vec::new(),
            l2_offsets: HashMap::new(),
        })
    }

    fn alloc_cluster(&mut self) -> u64 {
        let off = self.next_cluster * CLUSTER;
        self.next_cluster += 1;
        off
    }

    fn pwrite(&mut self, data: &[u8], offset: u64) -> Result<(), ExportError> {
        self.file
            .write_at(offset, data)
            .map_err(|e| io_err("writing image", &self.path, e))
    }

    fn flush_l2(&mut self) -> Result<(), ExportError> {
        if let Some((idx, table, dirty)) = &mut self.current_l2
            && *dirty
        {
            let off = self.l2_offsets.get(idx).copied().ok_or_else(|| {
                ExportError::InvalidArgument("internal error: L2 table without offset".into())
            })?;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file
                .write_at(off, &bytes)
                .map_err(|e| io_err("writing image", &self.path, e))?;
            *dirty = false;
        }
        Ok(())
    }

    /// Make the L2 table for `l1_index` current, allocating it if needed.
    fn load_l2(&mut self, l1_index: usize) -> Result<(), ExportError> {
        if matches!(&self.current_l2, Some((i, _, _)) if *i == l1_index) {
            return Ok(());
        }
        self.flush_l2()?;
        let table = match self.l2_offsets.get(&l1_index).copied() {
            Some(off) => {
                let mut bytes = vec![0u8; CLUSTER as usize];
                self.file
                    .read_exact_at(&mut bytes, off)
                    .map_err(|e| io_err("reading back L2 table of", &self.path, e))?;
                (l1_index, be_u64s(&bytes), false)
            }
            None => {
                let off = self.alloc_cluster();
                self.l2_offsets.insert(l1_index, off);
                self.l1[l1_index] = off | QCOW_OFLAG_COPIED;
                (l1_index, vec![0u64; L2_ENTRIES as usize], true)
            }
        };
        self.current_l2 = Some(table);
        Ok(())
    }

    /// Write one cluster's worth (≤ 64 KiB) of data at cluster-aligned `offset`.
    fn write_cluster(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        let cluster_index = offset / CLUSTER;
        let l1_index = (cluster_index / L2_ENTRIES) as usize;
        let l2_index = (cluster_index % L2_ENTRIES) as usize;
        let existing = if self.l2_offsets.contains_key(&l1_index) {
            self.load_l2(l1_index)?;
            match &self.current_l2 {
                Some((_, t, _)) => t[l2_index] & !QCOW_OFLAG_COPIED,
                None => 0,
            }
        } else {
            0
        };
        if existing == 0 && is_zero(data) {
            return Ok(()); // unallocated reads as zeros
        }
        self.load_l2(l1_index)?;
        let host = if existing != 0 {
            existing
        } else {
            self.alloc_cluster()
        };
        if data.len() as u64 == CLUSTER {
            self.pwrite(data, host)?;
        } else {
            let mut pad = std::mem::take(&mut self.pad);
            pad.clear();
            pad.extend_from_slice(data);
            pad.resize(CLUSTER as usize, 0);
            let res = self.pwrite(&pad, host);
            self.pad = pad;
            res?;
        }
        if existing == 0
            && let Some((_, table, dirty)) = &mut self.current_l2
        {
            table[l2_index] = host | QCOW_OFLAG_COPIED;
            *dirty = true;
        }
        Ok(())
    }

    fn header(&self, refcount_table_offset: u64, refcount_table_clusters: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LENGTH as usize + 8);
        h.extend_from_slice(b"QFI\xfb");
        h.extend_from_slice(&3u32.to_be_bytes()); // version
        h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
        h.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
        h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
        h.extend_from_slice(&self.header_size.to_be_bytes()); // size
        h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        h.extend_from_slice(&(self.l1.len() as u32).to_be_bytes()); // l1_size
        h.extend_from_slice(&self.l1_offset.to_be_bytes());
        h.extend_from_slice(&refcount_table_offset.to_be_bytes());
        h.extend_from_slice(&(refcount_table_clusters as u32).to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
        h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
        h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
        h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
        h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
        h.extend_from_slice(&4u32.to_be_bytes()); // refcount_order
        h.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
        debug_assert_eq!(h.len(), HEADER_LENGTH as usize);
        h.extend_from_slice(&[0u8; 8]); // header extension end marker
        h
    }
}

fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect()
}

impl ImageWriter for Qcow2Writer {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        if !offset.is_multiple_of(CLUSTER) {
            return Err(ExportError::Unaligned {
                offset,
                alignment: CLUSTER,
            });
        }
        check_range(offset, data.len(), self.virtual_size)?;
        for (i, piece) in data.chunks(CLUSTER as usize).enumerate() {
            self.write_cluster(offset + i as u64 * CLUSTER, piece)?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), ExportError> {
        self.flush_l2()?;

        // L1 table (zero-padded to whole clusters by the file layout).
        let l1_bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        if !l1_bytes.is_empty() {
            self.pwrite(&l1_bytes, self.l1_offset)?;
        }

        // Refcount blocks then table, right after the last used cluster.
        let used = self.next_cluster;
        let (rb_count, rt_clusters) = refcount_layout(used);
        let total = used + rb_count + rt_clusters;
        let rb_first = used;
        let rt_offset = (used + rb_count) * CLUSTER;
        let mut block = vec![0u8; CLUSTER as usize];
        for b in 0..rb_count {
            let first = b * REFCOUNTS_PER_BLOCK;
            block.fill(0);
            let n = total.saturating_sub(first).min(REFCOUNTS_PER_BLOCK) as usize;
            for e in block[..n * 2].chunks_exact_mut(2) {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            self.pwrite(&block, (rb_first + b) * CLUSTER)?;
        }
        let mut table = vec![0u8; (rt_clusters * CLUSTER) as usize];
        for b in 0..rb_count {
            let off = (rb_first + b) * CLUSTER;
            let i = (b * 8) as usize;
            table[i..i + 8].copy_from_slice(&off.to_be_bytes());
        }
        self.pwrite(&table, rt_offset)?;
        // The file must cover every cluster (the L1 area may be only partly
        // written); the table just written ends exactly at `total`.
        self.file
            .set_len(total * CLUSTER)
            .map_err(|e| io_err("sizing image", &self.path, e))?;

        // Everything the header points to is durable before the header.
        self.file
            .sync_data()
            .map_err(|e| io_err("syncing image", &self.path, e))?;
        let mut header = self.header(rt_offset, rt_clusters);
        header.resize(512, 0);
        self.pwrite(&header, 0)?;
        self.file
            .sync_all()
            .map_err(|e| io_err("syncing image", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_fixed_point_covers_itself() {
        for used in [
            1,
            2,
            100,
            REFCOUNTS_PER_BLOCK - 2,
            REFCOUNTS_PER_BLOCK - 1,
            REFCOUNTS_PER_BLOCK,
            3 * REFCOUNTS_PER_BLOCK - 3,
            REFCOUNTS_PER_BLOCK * RT_ENTRIES_PER_CLUSTER - 1,
            REFCOUNTS_PER_BLOCK * RT_ENTRIES_PER_CLUSTER + 5,
        ] {
            let (blocks, table) = refcount_layout(used);
            let total = used + blocks + table;
            assert!(blocks * REFCOUNTS_PER_BLOCK >= total, "used {used}");
            assert!(table * RT_ENTRIES_PER_CLUSTER >= blocks, "used {used}");
            // Not wasteful: one block fewer would not do.
            assert!((blocks - 1) * REFCOUNTS_PER_BLOCK < total, "used {used}");
        }
        assert_eq!(refcount_layout(REFCOUNTS_PER_BLOCK - 2), (1, 1));
        assert_eq!(refcount_layout(REFCOUNTS_PER_BLOCK - 1), (2, 1));
    }

    #[test]
    fn format_names() {
        assert_eq!(
            "qcow2".parse::<ImageFormat>().ok(),
            Some(ImageFormat::Qcow2)
        );
        assert_eq!("RAW".parse::<ImageFormat>().ok(), Some(ImageFormat::Raw));
        assert!("vmdk".parse::<ImageFormat>().is_err());
        assert_eq!(ImageFormat::Qcow2.to_string(), "qcow2");
    }
}
