//! Sizes and bounds the agent's modules share (the source, the page records
//! and their chaining values, the config): a leaf, so that none of them
//! needs another for a number.

/// Block (chunk) size of replicated disks.
pub const CHUNK_SIZE: u32 = 1024 * 1024;
/// Chunk uploads in flight per disk, by default (the seeds' UploadThreadsPerVM).
pub const DEFAULT_UPLOAD_STREAMS: usize = 4;
/// The most upload streams per disk.
pub const MAX_UPLOAD_STREAMS: usize = 32;
/// Pages (of `siterec_store::DELTA_PAGE` bytes) per block.
pub const PAGES: usize = CHUNK_SIZE as usize / siterec_store::DELTA_PAGE;
