//! Capture drivers (reading source disks, detecting changed blocks) and
//! export drivers (writing recovery points as raw / qcow2 disk images).
//!
//! Everything here is synchronous and blocking; async callers run it in
//! `tokio::task::spawn_blocking`.

pub mod capture;
pub mod export;

pub use capture::{
    BlockHash, CaptureError, DiskKind, DiskSource, ScanOptions, ScanOutcome, SnapshotMethod,
    decode_hashes, encode_hashes, hash_block, page_fingerprints, scan,
};
pub use export::{ExportError, ImageFormat, ImageWriter, Qcow2Writer, RawWriter, create_writer};
