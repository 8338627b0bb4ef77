//! The replica store of siterec.
//!
//! The target agent keeps the replicated disks of every protected item in a
//! store: disk contents cut into fixed-size chunks, each stored once under
//! its BLAKE3 hash ([`ChunkId`]), plus one [`Manifest`] per recovery point
//! listing, for each disk, the chunk at each offset (`None` for an all-zero
//! block, which is never stored).
//!
//! Objects live in a [`Backend`], an object-store-shaped async trait with
//! three implementations that hold the same keys:
//!
//! * [`LocalDir`]: files under a directory, chunk objects appended to
//!   pack files (`.packs/`, see `pack.rs`);
//! * [`AzureBlob`]: block blobs in an Azure Blob Storage container;
//! * [`S3`]: objects in a bucket of an S3-compatible object store.
//!
//! [`BackendConfig`] (serde, TOML-friendly) says which one to use, and
//! [`open_backend`] opens it, checking up front that the container or
//! bucket exists and the credentials work. The layout and encodings are
//! described precisely in `FORMAT.md` next to this crate's `Cargo.toml`.
//!
//! Every backend passes the same conformance suite (this crate's tests,
//! `conformance.rs`): the object-store ones against Azurite and moto,
//! which the tests start themselves (see `test_servers.rs` for how to
//! install them).
//!
//! # Guarantees
//!
//! * **Atomic, durable points.** [`Store::commit_point`] checks that every
//!   referenced chunk is present, makes all chunks durable with one
//!   [`Backend::barrier`], and only then writes the manifest durably
//!   ([`Backend::put_durable`]). A point is visible exactly when its manifest
//!   exists, so a crash never leaves a visible, incomplete point.
//! * **Uploads written behind their answer.** On files, a chunk upload
//!   ([`Store::put_chunk_upload`]) returns once it is checked and sealed;
//!   writer threads write it. Commits, [`Store::sync`] and gc wait for the
//!   writes accepted before them and fail if one failed; until written, a
//!   chunk counts as present and reads of it wait.
//! * **Chunks received before a crash.** Chunk writes are not fsynced one by
//!   one, so after a power cut a chunk object may exist with damaged content
//!   (e.g. an empty file; in a pack, opening drops entries whose checksums
//!   fail). Before the first chunk write after a barrier, the store
//!   durably writes the marker `state/unsynced`; the marker is removed once
//!   a barrier covers every started write. If [`Store::open_or_create`]
//!   finds the marker, it verifies every chunk and removes damaged ones, so
//!   `has_chunk` never vouches for a chunk that did not survive the crash.
//!   Call [`Store::sync`] before a clean shutdown to avoid that scan.
//! * **No silent corruption.** Every chunk read is decoded and hashed
//!   against its id ([`decode_chunk`]); manifests carry a BLAKE3 trailer
//!   checked on every read. Failures are [`StoreError::CorruptChunk`] and
//!   [`StoreError::CorruptManifest`]; wrong data is never returned.
//! * **Garbage collection excludes writers.** The store holds an internal
//!   read/write lock: chunk puts, commits and reads share it, [`Store::gc`]
//!   takes it exclusively. Chunks uploaded for a point not yet committed
//!   must be passed to `gc` in `keep`.
//!
//! # Encryption at rest
//!
//! An encrypted store (store format version 3, the policy setting "encrypt
//! data stored") is created with [`Store::open_or_create_with_credential`]
//! and the [`StoreCredential`] of a new [`RecoveryKey`]. The recovery key
//! (an X25519 private key and the chunk name key) is exported once to a
//! file the operator keeps ([`RecoveryKey::write_file`]); the recovery
//! agent keeps only the credential (the public key and the name key).
//!
//! Each writer session seals a random AES-256-GCM data key to the public
//! key (object `keys/<id>`) and encrypts chunks with it; chunk objects are
//! named by a keyed BLAKE3 of their id, so names reveal nothing; manifests
//! are encrypted with a key derived from the name key. With the credential
//! alone the store does everything replication needs — put chunks (delta
//! chunks included), commit and read manifests, gc, verify integrity
//! (every chunk object carries a checksum), recover from a crash — but
//! [`Store::get_chunk`] and [`Store::read_disk`] fail with
//! [`StoreError::RecoveryKeyRequired`] until the handle is made with
//! [`Store::with_recovery_key`]. Callers keep using plaintext
//! [`ChunkId`]s (use [`Store::chunk_object_key`] to address a chunk's
//! object). A plain store refuses a credential
//! ([`StoreError::NotEncrypted`]); plain stores are version 1, unchanged.
//!
//! A store is owned by one process at a time (one [`Store`] value and its
//! clones); two processes sharing a directory, container or bucket are not
//! supported.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), siterec_store::StoreError> {
//! use siterec_store::{DiskManifest, Manifest, Store, encode_chunk};
//!
//! let store = Store::open_local("/var/lib/siterec/store").await?;
//! let block = vec![7u8; 4096];
//! let enc = encode_chunk(&block, true); // done by the source agent
//! store.put_encoded_chunk(enc.id, enc.bytes).await?;
//! let manifest = Manifest {
//!     item: "vm-1".into(),
//!     point_id: "p1".into(),
//!     created_at_unix_ms: 0,
//!     consistency: siterec_core::Consistency::CrashConsistent,
//!     disks: vec![DiskManifest {
//!         disk_id: "disk0".into(),
//!         size: 8192,
//!         chunk_size: 4096,
//!         chunks: vec![Some(enc.id), None],
//!     }],
//!     bases: Default::default(), // delta chunk -> its base
//! };
//! store.commit_point(&manifest).await?;
//! let mut reader = store.read_disk(&manifest, 0, 4)?;
//! while let Some(block) = reader.next().await {
//!     let block = block?; // block.offset, block.data (None = zeros)
//! #   let _ = block;
//! }
//! # Ok(())
//! # }
//! ```

mod backend;
mod behind;
mod bufpool;
mod chunk;
mod config;
mod crypt;
mod error;
mod keyindex;
mod manifest;
mod pack;
mod remote;
mod store;
mod upload;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod encryption_tests;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod test_servers;

pub use backend::{Backend, LocalDir, validate_key, validate_prefix};
pub use chunk::{
    CHUNK_HEADER_LEN, CHUNK_MAGIC, CODEC_DELTA, CODEC_RAW, CODEC_ZSTD, ChunkContent, ChunkHeader,
    ChunkId, DELTA_PAGE, EncodedChunk, MAX_CHUNK_LEN, ParseChunkIdError, ZERO_BASE, check_chunk,
    decode_chunk, delta_base, delta_id, encode_chunk, encode_chunk_with_id, encode_delta_chunk,
    is_all_zero, parse_chunk_header,
};
pub use config::{AzureConfig, BackendConfig, S3Config, Secret, open_backend};
pub use crypt::{
    CREDENTIAL_HEADER, DATA_KEY_MAGIC, DATA_KEYS_PREFIX, ENCRYPTION_ALGORITHM, ENVELOPE_MAGIC,
    ENVELOPE_MAGIC_V2, ENVELOPE_OVERHEAD, KEY_LEN, KEY_WRAP_SCHEME, MANIFEST_ENVELOPE_MAGIC,
    NAME_KEY_SCHEME, RECOVERY_KEY_HEADER, RecoveryKey, StoreCredential, TRANSPORT_KEY_HEADER,
    TRANSPORT_MAGIC, TransportKey, seal_for_transport,
};
pub use error::StoreError;
pub use manifest::{DiskManifest, MANIFEST_MAGIC, MANIFEST_VERSION, Manifest, validate_name};
pub use pack::CompactReport;
pub use remote::{AzureBlob, S3};
pub use store::{
    CHUNK_LAYOUT_V1, DiskBlock, DiskReader, EncryptionInfo, GcReport, PointRef, PointVerify,
    RecoveryReport, STORE_FORMAT_NAME, STORE_FORMAT_VERSION, STORE_FORMAT_VERSION_ENCRYPTED,
    STORE_FORMAT_VERSION_PLAIN, STORE_FORMAT_VERSION_RETIRED, STORE_INFO_KEY, Store, StoreInfo,
    UNSYNCED_MARKER_KEY, VerifyReport, chunk_key, manifest_key, parse_chunk_key,
};
pub use upload::{ChunkUpload, UploadTooLarge};
