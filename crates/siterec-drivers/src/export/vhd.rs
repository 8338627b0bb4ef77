//! VHD writers, after Microsoft's "Virtual Hard Disk Image Format
//! Specification" (the "conectix" format Azure and Hyper-V take).
//!
//! All integers are big-endian; a sector is 512 bytes. The disk size is the
//! caller's virtual size rounded up to a whole MiB (Azure rejects anything
//! else); the extra tail is never written and reads as zeros.
//!
//! Fixed (`disk type` 2), file size = disk size + 512:
//!
//! ```text
//! 0             disk data, byte for byte (a sparse file: holes read as zeros)
//! disk size     footer (512 bytes, data offset 0xFFFF_FFFF_FFFF_FFFF)
//! ```
//!
//! Dynamic (`disk type` 3), 2 MiB blocks:
//!
//! ```text
//! 0             footer copy (512 bytes, data offset 512)
//! 512           dynamic disk header (1024 bytes, "cxsparse")
//! 1536          block allocation table: one u32 per 2 MiB block, the sector
//!               of the block's bitmap or 0xFFFF_FFFF when unallocated;
//!               padded with 0xFF to a sector boundary
//! after BAT     blocks in the order they were first written, each a
//!               512-byte sector bitmap (all ones) then 2 MiB of data;
//!               parts of a block never written are holes and read as zeros,
//!               which is what "all sectors present" promises
//! end           footer (512 bytes, same as the copy at 0)
//! ```
//!
//! Crash safety: until `finish`, the file has no footer anywhere (offset 0
//! and the last sector of the file are zeros), so no VHD reader accepts it.
//! `finish` writes the BAT and header, syncs, writes the footer copy at 0
//! (from which point the image is valid and complete for readers that, like
//! qemu, look at offset 0 first), syncs, then writes the trailing footer.
//! The fixed image likewise gets its footer only at `finish`, after the data
//! is synced.
//!
//! Size as seen by readers: Hyper-V and Azure use the footer's current
//! size. The footer also carries a CHS geometry computed by the
//! specification's algorithm, which rounds down: cylinders × heads × sectors
//! per track falls short of the current size by less than one cylinder
//! (< 504 KiB below 31.5 GiB, < 2 MiB up to 127.5 GiB, where the geometry
//! reaches its maximum and stops growing). Virtual PC sizes disks by it. qemu's
//! `vpc` driver (checked with qemu 10.0) uses the geometry only when the
//! creator application is "vpc " or "qemu" and the current size for any
//! other creator, ours ("srec") included, so `qemu-img info -f vpc` shows
//! the rounded size; `force_size_calc=chs` shows the geometry's.
//! The fixed image has no magic at offset 0, so qemu needs `-f vpc` (probing
//! takes it for raw).

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{ExportError, ImageWriter, check_range, create_file, io_err};
use crate::capture::is_zero;

/// VHD disk sizes are whole multiples of this (Azure's requirement).
const SIZE_ALIGNMENT: u64 = 1 << 20;
/// Dynamic VHD block size (the specification's default).
pub const VHD_BLOCK_SIZE: u64 = 2 << 20;
/// Largest disk size (after rounding): 2040 GiB, the limit of the format
/// as Hyper-V and qemu implement it.
pub const MAX_VHD_SIZE: u64 = 2040 << 30;

const SECTOR: u64 = 512;
const FOOTER_LEN: usize = 512;
const HEADER_OFFSET: u64 = 512;
const HEADER_LEN: usize = 1024;
const BAT_OFFSET: u64 = HEADER_OFFSET + HEADER_LEN as u64;
/// One bit per sector of a block, padded to a whole sector.
const BITMAP_LEN: u64 = (VHD_BLOCK_SIZE / SECTOR / 8).div_ceil(SECTOR) * SECTOR;
const BAT_UNUSED: u32 = 0xFFFF_FFFF;
const NO_DATA_OFFSET: u64 = 0xFFFF_FFFF_FFFF_FFFF;
const DISK_TYPE_FIXED: u32 = 2;
const DISK_TYPE_DYNAMIC: u32 = 3;
const FORMAT_VERSION: u32 = 0x0001_0000;
/// 2000-01-01T00:00:00Z as a Unix timestamp: the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;

/// The disk size a VHD of `virtual_size` bytes gets: rounded up to a whole
/// MiB (Azure requires it). Errors for 0 or more than [`MAX_VHD_SIZE`].
pub fn vhd_disk_size(virtual_size: u64) -> Result<u64, ExportError> {
    let rounded = virtual_size
        .checked_next_multiple_of(SIZE_ALIGNMENT)
        .filter(|&r| virtual_size > 0 && r <= MAX_VHD_SIZE);
    rounded.ok_or_else(|| {
        ExportError::InvalidArgument(format!(
            "VHD virtual size must be 1..={MAX_VHD_SIZE} bytes (after rounding up to a \
             whole MiB), got {virtual_size}"
        ))
    })
}

/// CHS geometry `(cylinders, heads, sectors per track)` for a disk of
/// `total_sectors`, by the algorithm of the VHD specification (appendix
/// "CHS calculation"). The product may be smaller than `total_sectors`.
pub(crate) fn chs_geometry(total_sectors: u64) -> (u16, u8, u8) {
    const MAX: u64 = 65535 * 16 * 255;
    let total = total_sectors.min(MAX);
    let (spt, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut spt = 17;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    // Bounded by construction: heads ≤ 16, spt ≤ 255, cylinders ≤ 65535.
    let cylinders = (cyl_times_heads / heads).min(65535);
    (cylinders as u16, heads as u8, spt as u8)
}

/// One's complement of the byte sum (the checksum field must be zero).
fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)))
}

/// Seconds since the VHD epoch, saturating.
fn vhd_timestamp() -> u32 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// 16 random bytes (shaped as a version 4 UUID). Falls back to a hash of
/// time, process id, path and a counter if `/dev/urandom` is unavailable:
/// the id only has to be unique, not secret.
fn unique_id(path: &Path) -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut id = [0u8; 16];
    let random = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id));
    if random.is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut h = blake3::Hasher::new();
        h.update(&nanos.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        h.update(path.as_os_str().as_bytes());
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// Creator version: this crate's major.minor as two 16-bit halves.
fn creator_version() -> u32 {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    (major.min(0xFFFF) << 16) | minor.min(0xFFFF)
}

/// The 512-byte hard disk footer.
fn footer(
    disk_type: u32,
    data_offset: u64,
    disk_size: u64,
    timestamp: u32,
    id: &[u8; 16],
) -> Vec<u8> {
    let (cylinders, heads, spt) = chs_geometry(disk_size / SECTOR);
    let mut f = Vec::with_capacity(FOOTER_LEN);
    f.extend_from_slice(b"conectix");
    f.extend_from_slice(&2u32.to_be_bytes()); // features: reserved bit always set
    f.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    f.extend_from_slice(&data_offset.to_be_bytes());
    f.extend_from_slice(&timestamp.to_be_bytes());
    f.extend_from_slice(b"srec"); // creator application
    f.extend_from_slice(&creator_version().to_be_bytes());
    f.extend_from_slice(b"Wi2k"); // creator host OS
    f.extend_from_slice(&disk_size.to_be_bytes()); // original size
    f.extend_from_slice(&disk_size.to_be_bytes()); // current size
    f.extend_from_slice(&cylinders.to_be_bytes());
    f.push(heads);
    f.push(spt);
    f.extend_from_slice(&disk_type.to_be_bytes());
    let checksum_at = f.len();
    f.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
    f.extend_from_slice(id);
    f.push(0); // saved state
    f.resize(FOOTER_LEN, 0); // reserved
    let sum = checksum(&f);
    f[checksum_at..checksum_at + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The 1024-byte dynamic disk header.
fn dynamic_header(max_table_entries: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(b"cxsparse");
    h.extend_from_slice(&NO_DATA_OFFSET.to_be_bytes());
    h.extend_from_slice(&BAT_OFFSET.to_be_bytes()); // table offset
    h.extend_from_slice(&FORMAT_VERSION.to_be_bytes()); // header version
    h.extend_from_slice(&max_table_entries.to_be_bytes());
    h.extend_from_slice(&(VHD_BLOCK_SIZE as u32).to_be_bytes());
    let checksum_at = h.len();
    h.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
    // Parent unique id, parent time stamp, reserved, parent name and the
    // eight parent locators are all zero (no parent); then reserved.
    h.resize(HEADER_LEN, 0);
    let sum = checksum(&h);
    h[checksum_at..checksum_at + 4].copy_from_slice(&sum.to_be_bytes());
    h
}

fn pwrite(file: &File, path: &Path, data: &[u8], offset: u64) -> Result<(), ExportError> {
    file.write_all_at(data, offset)
        .map_err(|e| io_err("writing image", path, e))
}

fn set_len(file: &File, path: &Path, len: u64) -> Result<(), ExportError> {
    file.set_len(len)
        .map_err(|e| io_err("sizing image", path, e))
}

fn sync(file: &File, path: &Path) -> Result<(), ExportError> {
    file.sync_all()
        .map_err(|e| io_err("syncing image", path, e))
}

/// Fixed VHD writer: the disk (rounded up to a whole MiB) as a sparse file,
/// then the footer, written at `finish`. See the module documentation for
/// the layout.
#[derive(Debug)]
pub struct VhdFixedWriter {
    file: File,
    path: PathBuf,
    virtual_size: u64,
    disk_size: u64,
}

impl VhdFixedWriter {
    /// Create the image file (truncating) for a disk of `virtual_size`
    /// bytes; the VHD's size is [`vhd_disk_size`]`(virtual_size)`.
    pub fn create(path: &Path, virtual_size: u64) -> Result<VhdFixedWriter, ExportError> {
        let disk_size = vhd_disk_size(virtual_size)?;
        let file = create_file(path)?;
        // The footer's place is a hole (zeros) until `finish`, so that an
        // unfinished file never ends in guest data that might look like one.
        set_len(&file, path, disk_size + FOOTER_LEN as u64)?;
        Ok(VhdFixedWriter {
            file,
            path: path.to_path_buf(),
            virtual_size,
            disk_size,
        })
    }

    /// The VHD disk size (the virtual size rounded up to a whole MiB).
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }
}

impl ImageWriter for VhdFixedWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        check_range(offset, data.len(), self.virtual_size)?;
        pwrite(&self.file, &self.path, data, offset)
    }

    fn finish(self: Box<Self>) -> Result<(), ExportError> {
        sync(&self.file, &self.path)?;
        let footer = footer(
            DISK_TYPE_FIXED,
            NO_DATA_OFFSET,
            self.disk_size,
            vhd_timestamp(),
            &unique_id(&self.path),
        );
        pwrite(&self.file, &self.path, &footer, self.disk_size)?;
        sync(&self.file, &self.path)
    }
}

/// Dynamic VHD writer: 2 MiB blocks allocated on their first non-zero
/// write, in any order. Memory: the BAT (4 bytes per 2 MiB of disk, 4 MiB
/// at most); block data is written straight to the file, never buffered.
/// See the module documentation for the layout.
#[derive(Debug)]
pub struct VhdDynamicWriter {
    file: File,
    path: PathBuf,
    virtual_size: u64,
    disk_size: u64,
    /// Sector of each block's bitmap, or [`BAT_UNUSED`].
    bat: Vec<u32>,
    /// File offset where the next block goes (and, at the end, the footer).
    next_block: u64,
}

impl VhdDynamicWriter {
    /// Create the image file (truncating) for a disk of `virtual_size`
    /// bytes; the VHD's size is [`vhd_disk_size`]`(virtual_size)`.
    pub fn create(path: &Path, virtual_size: u64) -> Result<VhdDynamicWriter, ExportError> {
        let disk_size = vhd_disk_size(virtual_size)?;
        let entries = disk_size.div_ceil(VHD_BLOCK_SIZE);
        let bat_bytes = (entries * 4).next_multiple_of(SECTOR);
        let next_block = BAT_OFFSET + bat_bytes;
        let file = create_file(path)?;
        // Headers, BAT and the footer's place stay holes until `finish`.
        set_len(&file, path, next_block + FOOTER_LEN as u64)?;
        Ok(VhdDynamicWriter {
            file,
            path: path.to_path_buf(),
            virtual_size,
            disk_size,
            bat: vec![BAT_UNUSED; entries as usize],
            next_block,
        })
    }

    /// The VHD disk size (the virtual size rounded up to a whole MiB).
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Allocate block `index` at the end of the file; returns the file
    /// offset of its data.
    fn allocate(&mut self, index: usize) -> Result<u64, ExportError> {
        let bitmap_at = self.next_block;
        let sector = u32::try_from(bitmap_at / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNUSED)
            .ok_or_else(|| {
                ExportError::InvalidArgument(format!(
                    "VHD block offset {bitmap_at} does not fit the allocation table"
                ))
            })?;
        // Every sector of the block is marked present; the ones never
        // written are holes in the file and read as zeros.
        pwrite(
            &self.file,
            &self.path,
            &[0xFF; BITMAP_LEN as usize],
            bitmap_at,
        )?;
        self.next_block = bitmap_at + BITMAP_LEN + VHD_BLOCK_SIZE;
        set_len(&self.file, &self.path, self.next_block + FOOTER_LEN as u64)?;
        self.bat[index] = sector;
        Ok(bitmap_at + BITMAP_LEN)
    }
}

impl ImageWriter for VhdDynamicWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        check_range(offset, data.len(), self.virtual_size)?;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let index = (at / VHD_BLOCK_SIZE) as usize;
            let within = at % VHD_BLOCK_SIZE;
            let n = ((VHD_BLOCK_SIZE - within) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            done += n;
            let data_at = match self.bat.get(index).copied() {
                Some(BAT_UNUSED) if is_zero(piece) => continue, // reads as zeros
                Some(BAT_UNUSED) => self.allocate(index)?,
                Some(sector) => u64::from(sector) * SECTOR + BITMAP_LEN,
                None => {
                    return Err(ExportError::OutOfRange {
                        offset,
                        len: data.len() as u64,
                        virtual_size: self.virtual_size,
                    });
                }
            };
            pwrite(&self.file, &self.path, piece, data_at + within)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), ExportError> {
        let mut bat: Vec<u8> = self.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
        bat.resize(bat.len().next_multiple_of(SECTOR as usize), 0xFF);
        pwrite(&self.file, &self.path, &bat, BAT_OFFSET)?;
        let entries = u32::try_from(self.bat.len())
            .map_err(|_| ExportError::InvalidArgument("VHD allocation table too large".into()))?;
        pwrite(
            &self.file,
            &self.path,
            &dynamic_header(entries),
            HEADER_OFFSET,
        )?;
        // Blocks, BAT and header are durable before any footer exists.
        sync(&self.file, &self.path)?;
        let footer = footer(
            DISK_TYPE_DYNAMIC,
            HEADER_OFFSET,
            self.disk_size,
            vhd_timestamp(),
            &unique_id(&self.path),
        );
        // The copy at 0 first: a file with a footer only at its end would
        // be taken for a fixed disk by some readers.
        pwrite(&self.file, &self.path, &footer, 0)?;
        sync(&self.file, &self.path)?;
        pwrite(&self.file, &self.path, &footer, self.next_block)?;
        sync(&self.file, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_specification() {
        // 1 MiB: 2048 sectors → 17 spt, 4 heads, 30 cylinders.
        assert_eq!(chs_geometry(2048), (30, 4, 17));
        // 300 MiB: needs 63 spt.
        assert_eq!(chs_geometry(614_400), (609, 16, 63));
        // Above 65535 × 16 × 63 sectors: 255 spt.
        assert_eq!(chs_geometry(64 << 21), (32_896, 16, 255));
        // Capped at the maximum geometry.
        assert_eq!(chs_geometry(MAX_VHD_SIZE / 512), (65535, 16, 255));
        for sectors in [1u64, 2048, 614_400, 10 << 21, 64 << 21, MAX_VHD_SIZE / 512] {
            let (c, h, s) = chs_geometry(sectors);
            assert!(u64::from(c) * u64::from(h) * u64::from(s) <= sectors);
        }
    }

    #[test]
    fn sizes_round_up_to_a_mebibyte() {
        assert_eq!(vhd_disk_size(1).ok(), Some(1 << 20));
        assert_eq!(vhd_disk_size(1 << 20).ok(), Some(1 << 20));
        assert_eq!(vhd_disk_size((1 << 20) + 123).ok(), Some(2 << 20));
        assert_eq!(vhd_disk_size(MAX_VHD_SIZE).ok(), Some(MAX_VHD_SIZE));
        assert!(vhd_disk_size(0).is_err());
        assert!(vhd_disk_size(MAX_VHD_SIZE + 1).is_err());
        assert!(vhd_disk_size(u64::MAX).is_err());
    }

    #[test]
    fn footer_and_header_fields() {
        let id = [7u8; 16];
        let f = footer(DISK_TYPE_DYNAMIC, 512, 300 << 20, 1234, &id);
        assert_eq!(f.len(), FOOTER_LEN);
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(&f[8..12], &2u32.to_be_bytes());
        assert_eq!(&f[12..16], &0x0001_0000u32.to_be_bytes());
        assert_eq!(&f[16..24], &512u64.to_be_bytes());
        assert_eq!(&f[24..28], &1234u32.to_be_bytes());
        assert_eq!(&f[28..32], b"srec");
        assert_eq!(&f[36..40], b"Wi2k");
        assert_eq!(&f[40..48], &(300u64 << 20).to_be_bytes());
        assert_eq!(&f[48..56], &(300u64 << 20).to_be_bytes());
        assert_eq!(&f[56..58], &609u16.to_be_bytes());
        assert_eq!((f[58], f[59]), (16, 63));
        assert_eq!(&f[60..64], &3u32.to_be_bytes());
        assert_eq!(&f[68..84], &id);
        assert_eq!(f[84], 0);
        let mut zeroed = f.clone();
        zeroed[64..68].fill(0);
        assert_eq!(&f[64..68], &checksum(&zeroed).to_be_bytes());

        let h = dynamic_header(150);
        assert_eq!(h.len(), HEADER_LEN);
        assert_eq!(&h[0..8], b"cxsparse");
        assert_eq!(&h[8..16], &[0xFF; 8]);
        assert_eq!(&h[16..24], &1536u64.to_be_bytes());
        assert_eq!(&h[24..28], &0x0001_0000u32.to_be_bytes());
        assert_eq!(&h[28..32], &150u32.to_be_bytes());
        assert_eq!(&h[32..36], &(2u32 << 20).to_be_bytes());
        let mut zeroed = h.clone();
        zeroed[36..40].fill(0);
        assert_eq!(&h[36..40], &checksum(&zeroed).to_be_bytes());
        assert_eq!(BITMAP_LEN, 512);
    }

    #[test]
    fn unique_ids_differ() {
        let p = Path::new("/x");
        assert_ne!(unique_id(p), unique_id(p));
        assert_eq!(unique_id(p)[6] >> 4, 4);
    }
}
