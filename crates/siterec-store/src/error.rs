//! The one error type of the store.

use std::path::PathBuf;

use crate::chunk::ChunkId;

/// Everything that can go wrong in the store.
///
/// Messages name the object concerned and, where there is one, what the
/// operator or the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("I/O error while trying to {op} {path}: {source}")]
    Io {
        /// What was being done ("write", "rename", "read", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A backend (remote object store) reported a failure.
    #[error("backend {backend} failed: {message}")]
    Backend {
        /// [`crate::Backend::describe`] of the backend.
        backend: String,
        /// What went wrong.
        message: String,
    },

    /// The container (Azure) or bucket (S3) a backend is configured with
    /// does not exist. Found when the backend is opened, never mid-way.
    #[error("{kind} {name:?} does not exist in {location}: create it")]
    MissingContainer {
        /// "container" or "bucket".
        kind: &'static str,
        /// Its name.
        name: String,
        /// Where it was looked for, e.g. "storage account devstoreaccount1".
        location: String,
    },

    /// A chunk object does not decode to data whose BLAKE3 is its id.
    #[error(
        "chunk {id} is corrupt: {reason}; the stored copy cannot be trusted: run verify, \
         and have the source resend this chunk"
    )]
    CorruptChunk {
        /// The chunk id the data was expected to have.
        id: ChunkId,
        /// What is wrong with it.
        reason: String,
    },

    /// A manifest failed its checksum or is malformed.
    #[error("manifest {what} is corrupt: {reason}; the recovery point cannot be used")]
    CorruptManifest {
        /// The key of the manifest, or "manifest" when decoding bytes.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A store metadata object (such as `store.json`) is malformed.
    #[error("store metadata {key} is corrupt: {reason}")]
    CorruptMetadata {
        /// The key of the object.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A chunk that should be in the store is not.
    #[error("chunk {id} is missing from the store ({context})")]
    MissingChunk {
        /// The missing chunk.
        id: ChunkId,
        /// Where it was needed.
        context: String,
    },

    /// Someone tried to store an all-zero chunk: zero blocks are recorded as
    /// holes in manifests, never stored.
    #[error(
        "chunk {id} is all zeros (or empty) and must not be stored: record it as a zero block \
         (None) in the manifest instead"
    )]
    ZeroChunk {
        /// The id of the zero chunk.
        id: ChunkId,
    },

    /// A backend key is not acceptable.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why it is refused.
        reason: String,
    },

    /// A name used to build keys (item, point id) is not acceptable.
    #[error(
        "invalid {what} {name:?}: {reason} (allowed: 1 to 128 characters from [A-Za-z0-9._-], \
         not starting with '.')"
    )]
    InvalidName {
        /// "item" or "point id".
        what: &'static str,
        /// The name.
        name: String,
        /// Why it is refused.
        reason: String,
    },

    /// A manifest given to the store is not self-consistent.
    #[error("invalid manifest for {item}/{point_id}: {reason}")]
    InvalidManifest {
        /// Item of the manifest.
        item: String,
        /// Point id of the manifest.
        point_id: String,
        /// What is inconsistent.
        reason: String,
    },

    /// An object was written by a newer version of siterec.
    #[error(
        "{what} has format version {found}, but this build supports up to version {supported}; \
         upgrade siterec to read it"
    )]
    UnsupportedVersion {
        /// What carries the version ("store", "manifest", "chunk").
        what: String,
        /// The version found.
        found: u32,
        /// The newest version this build understands.
        supported: u32,
    },

    /// A different manifest is already committed under this point id.
    #[error(
        "recovery point {item}/{point_id} already exists with different contents; point ids \
         must be unique per item: delete the existing point first or use a new id"
    )]
    PointConflict {
        /// Item of the point.
        item: String,
        /// Point id.
        point_id: String,
    },

    /// No such recovery point.
    #[error("recovery point {item}/{point_id} does not exist")]
    PointNotFound {
        /// Item of the point.
        item: String,
        /// Point id.
        point_id: String,
    },

    /// A disk index or chunk index is out of range.
    #[error("{what} index {index} is out of range (count {count})")]
    OutOfRange {
        /// "disk" or "chunk".
        what: &'static str,
        /// The index asked for.
        index: u64,
        /// How many there are.
        count: u64,
    },

    /// The store is encrypted and was opened without its credential.
    #[error(
        "the replica store is encrypted (key id {key_id}) and was opened without its store \
         credential: restore the credential file written when the store was created \
         (DATA/store.credential on the recovery agent)"
    )]
    CredentialRequired {
        /// Id of the store's recovery key.
        key_id: String,
    },

    /// Reading chunk data of an encrypted store needs its recovery key,
    /// which the recovery agent does not keep.
    #[error(
        "reading data from the encrypted replica store needs its recovery key (key id \
         {key_id}), which neither the recovery agent nor the vault keeps: give the recovery \
         key file exported when the store was created (for a failover: siterec failover \
         unplanned ITEM --encryption-key FILE)"
    )]
    RecoveryKeyRequired {
        /// Id of the store's recovery key.
        key_id: String,
    },

    /// A recovery key or credential of another store was given.
    #[error(
        "wrong key: the replica store is encrypted with key id {expected}, but the key given \
         has id {got}; use the recovery key file exported when this store was created (key \
         id {expected})"
    )]
    WrongKey {
        /// Id of the store's key.
        expected: String,
        /// Id of the key given.
        got: String,
    },

    /// A key or credential was given for a store that is not encrypted.
    #[error(
        "an encryption key was given, but this replica store is not encrypted (it was created \
         without encryption, and its data is stored in the clear); open it without a key, or \
         create a new, encrypted store and replicate into it"
    )]
    NotEncrypted,

    /// An encrypted store of the retired format version 2 (one symmetric
    /// key held by the recovery agent).
    #[error(
        "this replica store has format version {found}: an encrypted store whose key the \
         recovery agent held, which this siterec no longer opens; create a new store (an empty \
         directory, container or bucket, with encryption = true and recovery_key_export in the \
         agent's [target] section) and enable protection again"
    )]
    RetiredVersion {
        /// The version found.
        found: u32,
    },

    /// A recovery key, credential or transport key file cannot be used.
    #[error("invalid key file {what}: {reason}")]
    InvalidKeyFile {
        /// The file (path), or "key file" when parsing bytes.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The cryptographic library failed (not a data error).
    #[error("cryptographic operation failed: could not {op}")]
    Crypto {
        /// What was being done.
        op: &'static str,
    },

    /// A background task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn task(err: tokio::task::JoinError) -> Self {
        StoreError::Task(err.to_string())
    }
}
