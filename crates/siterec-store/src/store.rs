//! The [`Store`]: chunks and recovery points on top of a [`Backend`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OwnedRwLockReadGuard, RwLock};
use tokio::task::{JoinHandle, JoinSet};

use crate::backend::{Backend, BlockingObjects, LocalDir};
use crate::behind::{Write, WriteBehind};
use crate::chunk::{
    CODEC_DELTA, ChunkContent, ChunkId, Delta, ZERO_BASE, apply_delta, apply_delta_in_place,
    check_chunk, decode_chunk, decode_chunk_unverified, delta_id, encode_chunk, is_all_zero,
    parse_chunk_header, parse_delta, parse_delta_unnamed,
};
use crate::crypt::{
    self, Cipher, DATA_KEY_ID_LEN, DataKey, ENCRYPTION_ALGORITHM, KEY_WRAP_SCHEME, NAME_KEY_SCHEME,
    OpenError, RecoveryKey, StoreCredential,
};
use crate::error::StoreError;
use crate::manifest::{DiskManifest, Manifest, validate_name};
use crate::upload::ChunkUpload;

/// The newest store format version this build opens.
pub const STORE_FORMAT_VERSION: u32 = STORE_FORMAT_VERSION_ENCRYPTED;
/// The version of stores created without a key (unchanged since 1).
pub const STORE_FORMAT_VERSION_PLAIN: u32 = 1;
/// The version of encrypted stores (recovery key held by the operator): a
/// version-1 reader must refuse them rather than misread their objects.
pub const STORE_FORMAT_VERSION_ENCRYPTED: u32 = 3;
/// Encrypted stores of the previous design (one symmetric key the agent
/// held): refused with [`StoreError::RetiredVersion`].
pub const STORE_FORMAT_VERSION_RETIRED: u32 = 2;
/// Key of the store description.
pub const STORE_INFO_KEY: &str = "store.json";
/// Key of the marker saying chunks may have been written without a barrier.
pub const UNSYNCED_MARKER_KEY: &str = "state/unsynced";
/// Value of [`StoreInfo::format`].
pub const STORE_FORMAT_NAME: &str = "siterec-store";
/// Value of [`StoreInfo::chunk_layout`] for version 1.
pub const CHUNK_LAYOUT_V1: &str = "chunks/<hex[0..2]>/<hex>";

pub(crate) const CHUNKS_PREFIX: &str = "chunks/";
const POINTS_PREFIX: &str = "points/";
const MANIFEST_SUFFIX: &str = ".manifest";
/// Concurrent backend requests for existence checks and deletes.
const META_PARALLELISM: usize = 16;
/// Concurrent chunk reads while verifying or scrubbing.
const READ_PARALLELISM: usize = 4;
/// Keys looked up or deleted per blocking call when a backend offers them.
pub(crate) const BLOCKING_BATCH: usize = 1024;

/// The content of `store.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreInfo {
    /// Always [`STORE_FORMAT_NAME`].
    pub format: String,
    /// Store format version.
    pub version: u32,
    /// When the store was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    /// Where chunks live; [`CHUNK_LAYOUT_V1`].
    pub chunk_layout: String,
    /// Present exactly in encrypted (version 3) stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionInfo>,
}

/// The `encryption` member of `store.json` (version 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionInfo {
    /// Always `"AES-256-GCM"` (chunks and manifests).
    pub algorithm: String,
    /// How data keys are sealed; always `"X25519-BLAKE3-AES-256-GCM"`.
    pub key_wrap: String,
    /// [`RecoveryKey::key_id`] of the store's recovery key.
    pub key_id: String,
    /// The X25519 public key data keys are sealed to (base64).
    pub public_key: String,
    /// How chunk object names are derived; always `"blake3-keyed"`.
    pub name_key: String,
}

/// The key of chunk `id` in a plain store: `chunks/<first 2 hex
/// digits>/<64 hex digits>`. An encrypted store names chunks differently:
/// use [`Store::chunk_object_key`], which is right for both.
pub fn chunk_key(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("{CHUNKS_PREFIX}{}/{hex}", &hex[..2])
}

/// The 32 bytes a key carries, if it is a well-formed chunk key: the chunk
/// id in a plain store, its keyed hash in an encrypted one.
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let rest = key.strip_prefix(CHUNKS_PREFIX)?;
    let (dir, name) = rest.split_once('/')?;
    let id: ChunkId = name.parse().ok()?;
    // Only lower-case hex in the right directory is ours.
    (dir.len() == 2 && name == id.to_hex() && name.starts_with(dir)).then_some(id)
}

/// The key of a manifest: `points/<item>/<point_id>.manifest`.
pub fn manifest_key(item: &str, point_id: &str) -> Result<String, StoreError> {
    validate_name("item", item)?;
    validate_name("point id", point_id)?;
    Ok(format!("{POINTS_PREFIX}{item}/{point_id}{MANIFEST_SUFFIX}"))
}

fn parse_manifest_key(key: &str) -> Option<PointRef> {
    let rest = key.strip_prefix(POINTS_PREFIX)?;
    let (item, file) = rest.split_once('/')?;
    let point_id = file.strip_suffix(MANIFEST_SUFFIX)?;
    if validate_name("item", item).is_err() || validate_name("point id", point_id).is_err() {
        return None;
    }
    Some(PointRef {
        item: item.to_string(),
        point_id: point_id.to_string(),
    })
}

/// Names a recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PointRef {
    /// The protected item.
    pub item: String,
    /// The point within the item.
    pub point_id: String,
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Recovery points whose chunks were kept.
    pub points: u64,
    /// Chunks kept (referenced by a point or in `keep`).
    pub chunks_kept: u64,
    /// Chunks deleted.
    pub chunks_deleted: u64,
    /// Leftover temporary files removed.
    pub temp_files_removed: u64,
    /// Pack files rewritten without their deleted objects and removed
    /// ([`Backend::compact`]).
    #[serde(default)]
    pub packs_compacted: u64,
    /// Bytes those packs freed.
    #[serde(default)]
    pub pack_bytes_freed: u64,
}

/// The result of verifying one recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointVerify {
    /// The protected item.
    pub item: String,
    /// The point.
    pub point_id: String,
    /// True if the manifest and every chunk it references are intact.
    pub ok: bool,
    /// Referenced chunks that are missing, corrupt or of the wrong length.
    pub damaged_chunks: Vec<ChunkId>,
    /// What is wrong, if anything.
    pub error: Option<String>,
}

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// One entry per recovery point, sorted by item then point id.
    pub points: Vec<PointVerify>,
    /// Distinct chunks read and hashed.
    pub chunks_checked: u64,
}

impl VerifyReport {
    /// True if every point verified.
    pub fn all_ok(&self) -> bool {
        self.points.iter().all(|p| p.ok)
    }
}

/// What opening the store did to recover from an unclean shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// Chunks read and verified.
    pub chunks_checked: u64,
    /// Chunks not read because the backend knows them whole (in a local
    /// store's packs: synced before their pack's index was written, or
    /// checked against their checksums when the store was opened).
    #[serde(default)]
    pub chunks_known_whole: u64,
    /// Chunks found damaged (e.g. not durable at the crash) and removed,
    /// by id. Only in plain stores: an encrypted store's object names do not
    /// reveal the id of a chunk that cannot be decrypted; see
    /// `objects_removed`.
    pub chunks_removed: Vec<ChunkId>,
    /// The keys of the damaged chunk objects removed (every store).
    #[serde(default)]
    pub objects_removed: Vec<String>,
    /// Leftover temporary files removed.
    pub temp_files_removed: u64,
}

/// One chunk-sized block of a disk, as yielded by [`DiskReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBlock {
    /// Index of the chunk in the disk.
    pub index: u64,
    /// Byte offset in the disk.
    pub offset: u64,
    /// Length of the block (the last one may be short).
    pub len: u64,
    /// The verified data (exactly `len` bytes), or `None` for a zero block.
    pub data: Option<Vec<u8>>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    info: StoreInfo,
    /// The credential's keys of an encrypted store; `None` for a plain one.
    cipher: Option<Cipher>,
    /// This writer session's data key, created (and its sealed object
    /// written) before the first chunk is sealed.
    session_key: Mutex<Option<Arc<DataKey>>>,
    /// Chunk puts, commits, deletes and reads take it shared; gc takes it
    /// exclusively so that it never sweeps a chunk a commit relies on.
    gate: Arc<RwLock<()>>,
    /// Serializes commits so that conflicting commits of one point id are
    /// detected.
    commit_lock: Mutex<()>,
    /// Whether the unsynced marker exists; writers set it before writing.
    unsynced: Mutex<bool>,
    writes_started: AtomicU64,
    writes_done: AtomicU64,
    recovery: std::sync::OnceLock<RecoveryReport>,
    /// The writer threads that write uploaded chunks after they were
    /// answered (backends with blocking calls; started at the first such
    /// upload). See `behind.rs`.
    behind: std::sync::OnceLock<WriteBehind>,
}

/// A chunk write counted as started (`writes_started`) and holding the
/// gate; dropping it counts the write done and releases the gate, on
/// whichever thread the write ends.
struct WriteToken {
    inner: Arc<Inner>,
    _gate: OwnedRwLockReadGuard<()>,
}

impl Drop for WriteToken {
    fn drop(&mut self) {
        self.inner.writes_done.fetch_add(1, Ordering::SeqCst);
    }
}

/// The replica store. Cheap to clone; clones share everything.
///
/// See the crate documentation for the durability protocol.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// The recovery key and the data keys it opened, if this handle was
    /// made by [`Store::with_recovery_key`]; reading chunk data of an
    /// encrypted store needs it.
    reader: Option<Arc<Reader>>,
}

struct Reader {
    key: RecoveryKey,
    data_keys: std::sync::Mutex<HashMap<[u8; DATA_KEY_ID_LEN], Arc<DataKey>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.backend.describe())
            .field("info", &self.inner.info)
            .finish()
    }
}

impl Inner {
    /// The object key of chunk `id`: [`chunk_key`] of the id itself in a
    /// plain store, of its keyed hash in an encrypted one.
    fn object_key(&self, id: &ChunkId) -> String {
        match &self.cipher {
            None => chunk_key(id),
            Some(c) => chunk_key(&c.chunk_name(id)),
        }
    }

    fn seal_manifest(&self, object_key: &str, encoded: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match &self.cipher {
            None => Ok(encoded),
            Some(c) => c.seal_manifest(object_key, &encoded),
        }
    }

    fn open_manifest(&self, object_key: &str, stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match &self.cipher {
            None => Ok(stored),
            Some(c) => c.open_manifest(object_key, stored).map_err(|e| match e {
                OpenError::Newer(found) => StoreError::UnsupportedVersion {
                    what: format!("encrypted manifest {object_key}"),
                    found,
                    supported: 1,
                },
                OpenError::Corrupt(reason) => StoreError::CorruptManifest {
                    what: object_key.to_string(),
                    reason,
                },
            }),
        }
    }
}

/// Runs `f` on every item with at most `limit` running at once; results
/// are in the order of `items`.
async fn map_bounded<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Result<Vec<R>, StoreError>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
{
    let n = items.len();
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut iter = items.into_iter().enumerate();
    loop {
        while set.len() < limit.max(1) {
            let Some((i, t)) = iter.next() else { break };
            let fut = f(t);
            set.spawn(async move { (i, fut.await) });
        }
        match set.join_next().await {
            Some(r) => {
                let (i, v) = r.map_err(StoreError::task)?;
                out[i] = Some(v);
            }
            None => break,
        }
    }
    Ok(out.into_iter().flatten().collect())
}

impl Store {
    /// Opens the store on `backend`, creating it (writing `store.json`) if
    /// the backend holds none.
    ///
    /// If the previous owner stopped while chunks it had received were not
    /// yet durable (the unsynced marker exists), every chunk is read and
    /// verified and damaged ones are removed before the store is returned;
    /// see [`Store::last_recovery`].
    ///
    /// Same as [`Store::open_or_create_with_credential`] without a
    /// credential: refuses an encrypted store
    /// ([`StoreError::CredentialRequired`]).
    pub async fn open_or_create(backend: Arc<dyn Backend>) -> Result<Store, StoreError> {
        Store::open_or_create_with_credential(backend, None).await
    }

    /// Opens the store on `backend`, creating it if the backend holds none:
    /// encrypted for `credential`'s recovery key if there is one (store
    /// format version 3), else plain (version 1).
    ///
    /// An existing store must match: an encrypted store needs its
    /// credential ([`StoreError::CredentialRequired`] without one,
    /// [`StoreError::WrongKey`] with another store's), and a plain store
    /// refuses one ([`StoreError::NotEncrypted`]) so that nobody believes
    /// data is encrypted when it is not. These checks come before anything
    /// is written.
    ///
    /// With the credential alone the store can do everything replication
    /// needs (put chunks, commit and read manifests, gc, verify integrity,
    /// crash recovery); reading chunk data needs
    /// [`Store::with_recovery_key`].
    pub async fn open_or_create_with_credential(
        backend: Arc<dyn Backend>,
        credential: Option<StoreCredential>,
    ) -> Result<Store, StoreError> {
        let info = match backend.get(STORE_INFO_KEY).await? {
            Some(bytes) => {
                let info = parse_store_info(&bytes)?;
                match (&info.encryption, &credential) {
                    (None, None) => {}
                    (None, Some(_)) => return Err(StoreError::NotEncrypted),
                    (Some(e), None) => {
                        return Err(StoreError::CredentialRequired {
                            key_id: e.key_id.clone(),
                        });
                    }
                    (Some(e), Some(c)) => {
                        if e.key_id != c.key_id() || e.public_key != c.public_key_base64() {
                            return Err(StoreError::WrongKey {
                                expected: e.key_id.clone(),
                                got: c.key_id(),
                            });
                        }
                    }
                }
                info
            }
            None => {
                let info = StoreInfo {
                    format: STORE_FORMAT_NAME.to_string(),
                    version: if credential.is_some() {
                        STORE_FORMAT_VERSION_ENCRYPTED
                    } else {
                        STORE_FORMAT_VERSION_PLAIN
                    },
                    created_at: time::OffsetDateTime::now_utc(),
                    chunk_layout: CHUNK_LAYOUT_V1.to_string(),
                    encryption: credential.as_ref().map(|c| EncryptionInfo {
                        algorithm: ENCRYPTION_ALGORITHM.to_string(),
                        key_wrap: KEY_WRAP_SCHEME.to_string(),
                        key_id: c.key_id(),
                        public_key: c.public_key_base64(),
                        name_key: NAME_KEY_SCHEME.to_string(),
                    }),
                };
                let json =
                    serde_json::to_vec_pretty(&info).map_err(|e| StoreError::CorruptMetadata {
                        key: STORE_INFO_KEY.into(),
                        reason: format!("cannot serialize: {e}"),
                    })?;
                backend.put_durable(STORE_INFO_KEY, json).await?;
                tracing::info!(
                    backend = %backend.describe(),
                    encrypted = credential.is_some(),
                    "created replica store"
                );
                info
            }
        };
        let cipher = credential.as_ref().map(Cipher::new).transpose()?;
        let unsynced = backend.exists(UNSYNCED_MARKER_KEY).await?;
        let store = Store {
            inner: Arc::new(Inner {
                backend,
                info,
                cipher,
                session_key: Mutex::new(None),
                gate: Arc::new(RwLock::new(())),
                commit_lock: Mutex::new(()),
                unsynced: Mutex::new(unsynced),
                writes_started: AtomicU64::new(0),
                writes_done: AtomicU64::new(0),
                recovery: std::sync::OnceLock::new(),
                behind: std::sync::OnceLock::new(),
            }),
            reader: None,
        };
        if unsynced {
            let report = store.recover_after_crash().await?;
            let _ = store.inner.recovery.set(report);
        }
        Ok(store)
    }

    /// A handle on the same store that can also read chunk data, with the
    /// store's recovery key (the key file the operator kept). Refuses a
    /// plain store ([`StoreError::NotEncrypted`]) and another store's key
    /// ([`StoreError::WrongKey`]). The key lives only as long as the
    /// returned handle and its clones.
    pub fn with_recovery_key(&self, key: &RecoveryKey) -> Result<Store, StoreError> {
        let Some(cipher) = &self.inner.cipher else {
            return Err(StoreError::NotEncrypted);
        };
        if !key.matches(cipher) {
            return Err(StoreError::WrongKey {
                expected: cipher.key_id().to_string(),
                got: key.key_id(),
            });
        }
        Ok(Store {
            inner: Arc::clone(&self.inner),
            reader: Some(Arc::new(Reader {
                key: key.clone(),
                data_keys: std::sync::Mutex::new(HashMap::new()),
            })),
        })
    }

    /// Whether this handle can read chunk data: a plain store, or an
    /// encrypted one opened [with its recovery key](Store::with_recovery_key).
    pub fn can_read_data(&self) -> bool {
        self.inner.cipher.is_none() || self.reader.is_some()
    }

    /// Opens or creates a store in a local directory.
    pub async fn open_local(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        let backend = LocalDir::new(root.as_ref())?;
        Store::open_or_create(Arc::new(backend)).await
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The content of `store.json`.
    pub fn info(&self) -> &StoreInfo {
        &self.inner.info
    }

    /// Whether the store is encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.inner.cipher.is_some()
    }

    /// The [key id](RecoveryKey::key_id) of an encrypted store's key.
    pub fn key_id(&self) -> Option<String> {
        self.inner.cipher.as_ref().map(|c| c.key_id().to_string())
    }

    /// The backend key of chunk `id`'s object: [`chunk_key`] of `id` in a
    /// plain store; in an encrypted one, of a keyed hash of `id` that
    /// reveals nothing about the data. For callers that must address the
    /// object itself (e.g. to delete a damaged chunk).
    pub fn chunk_object_key(&self, id: &ChunkId) -> String {
        self.inner.object_key(id)
    }

    /// What opening did to recover from an unclean shutdown, if it had to.
    pub fn last_recovery(&self) -> Option<&RecoveryReport> {
        self.inner.recovery.get()
    }

    async fn recover_after_crash(&self) -> Result<RecoveryReport, StoreError> {
        tracing::warn!(
            backend = %self.inner.backend.describe(),
            "store was not shut down cleanly while receiving chunks: verifying all chunks"
        );
        let _g = self.inner.gate.write().await;
        let backend = &self.inner.backend;
        // (object key, the 32 bytes its name carries): the chunk id in a
        // plain store, a keyed hash of it in an encrypted one.
        let mut known_whole = 0;
        let objects: Vec<(String, ChunkId)> = backend
            .list(CHUNKS_PREFIX)
            .await?
            .into_iter()
            .filter(|k| {
                let whole = backend.known_whole(k);
                known_whole += u64::from(whole);
                !whole
            })
            .filter_map(|k| parse_chunk_key(&k).map(|named| (k, named)))
            .collect();
        let this = self.clone();
        let results = map_bounded(objects.clone(), READ_PARALLELISM, move |(key, named)| {
            let this = this.clone();
            async move { this.check_chunk_object(key, named).await }
        })
        .await?;
        let mut report = RecoveryReport {
            chunks_checked: objects.len() as u64,
            chunks_known_whole: known_whole,
            ..Default::default()
        };
        for ((key, named), r) in objects.into_iter().zip(results) {
            match r {
                Ok(_) => {}
                Err(StoreError::CorruptChunk { reason, .. }) => {
                    tracing::warn!(object = %key, %reason, "removing damaged chunk");
                    backend.delete(&key).await?;
                    if !self.is_encrypted() {
                        report.chunks_removed.push(named);
                    }
                    report.objects_removed.push(key);
                }
                // Missing (raced with nothing, we hold the gate) or a newer
                // chunk version: not ours to remove.
                Err(StoreError::MissingChunk { .. } | StoreError::UnsupportedVersion { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        report.temp_files_removed = backend.remove_stale_temp(Duration::ZERO).await?;
        self.barrier_and_settle().await?;
        Ok(report)
    }

    /// Reads the chunk object `key` and checks it holds a chunk whose
    /// object key is `key`, without knowing the chunk's id beforehand.
    /// `named` is what the name carries, used in errors. Returns the chunk
    /// id (in an encrypted store, `named`: without the recovery key only
    /// the envelope's checksum can be checked, which is what catches a
    /// chunk torn by a crash).
    async fn check_chunk_object(&self, key: String, named: ChunkId) -> Result<ChunkId, StoreError> {
        let stored =
            self.inner
                .backend
                .get(&key)
                .await?
                .ok_or_else(|| StoreError::MissingChunk {
                    id: named,
                    context: format!("object {key} not found"),
                })?;
        if self.inner.cipher.is_some() {
            let k = key.clone();
            return tokio::task::spawn_blocking(move || {
                crypt::check_chunk_envelope(&stored)
                    .map(|_| named)
                    .map_err(|e| envelope_error(named, &k, e))
            })
            .await
            .map_err(StoreError::task)?;
        }
        let encoded = stored;
        // A delta is checked by rebuilding it on its (verified) base.
        let base = if parse_chunk_header(named, &encoded)?.codec == CODEC_DELTA {
            let delta = parse_delta_unnamed(named, &encoded)?;
            Some(match delta.base {
                ZERO_BASE => vec![0; delta.plain_len as usize],
                base => self.get_chunk_unlocked(base).await?,
            })
        } else {
            None
        };
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let id = match base {
                Some(base) => {
                    // Named by its delta id; its content must rebuild the target.
                    let delta = parse_delta_unnamed(named, &encoded)?;
                    let rebuilt = ChunkId::of(&apply_delta(named, &delta, &base)?);
                    if rebuilt != delta.target {
                        return Err(StoreError::CorruptChunk {
                            id: named,
                            reason: format!(
                                "rebuilt on its base {}, it hashes to {rebuilt}, not {}",
                                delta.base, delta.target
                            ),
                        });
                    }
                    delta_id(delta.target, delta.base)
                }
                None => ChunkId::of(&decode_chunk_unverified(named, &encoded)?),
            };
            if inner.object_key(&id) != key {
                return Err(StoreError::CorruptChunk {
                    id: named,
                    reason: format!(
                        "its plaintext hashes to {id}, which is not the chunk object {key} \
                         names"
                    ),
                });
            }
            Ok(id)
        })
        .await
        .map_err(StoreError::task)?
    }

    /// Makes everything written so far durable, and records that no chunk
    /// is waiting for a barrier (if none is being written). Call it before
    /// a clean shutdown so that the next open does not scrub.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let _g = self.inner.gate.read().await;
        self.barrier_and_settle().await
    }

    /// Barrier, then remove the unsynced marker if every chunk write that
    /// ever started was complete before the barrier began.
    async fn barrier_and_settle(&self) -> Result<(), StoreError> {
        self.wait_for_writes().await?;
        let inner = &self.inner;
        let started = inner.writes_started.load(Ordering::SeqCst);
        let done = inner.writes_done.load(Ordering::SeqCst);
        inner.backend.barrier().await?;
        if started == done {
            let mut flag = inner.unsynced.lock().await;
            // Writers increment `writes_started` while holding `unsynced`,
            // so no write has started since the counters were read.
            if *flag && inner.writes_started.load(Ordering::SeqCst) == started {
                inner.backend.delete(UNSYNCED_MARKER_KEY).await?;
                *flag = false;
            }
        }
        Ok(())
    }

    /// Stores a chunk object received from the network, after checking
    /// that it decodes to a plaintext hashing to `id` (on a blocking
    /// thread). Returns `false` if the chunk was already present (nothing
    /// written).
    ///
    /// All-zero chunks are refused ([`StoreError::ZeroChunk`]): manifests
    /// record them as `None`. A delta chunk is checked for shape and for
    /// its base being here; its content is checked against its id whenever
    /// it is read (the base is not decoded on every write).
    pub async fn put_encoded_chunk(&self, id: ChunkId, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let guard = Arc::clone(&self.inner.gate).read_owned().await;
        let key = self.inner.object_key(&id);
        let need = prerequisite(&self.inner, id, &bytes)?;
        let dek = self.session_key().await?;
        if self.inner.backend.blocking_objects().is_some() {
            return self
                .write_blocking(guard, move |inner, objects, _token| {
                    store_checked(inner, objects, id, &key, need, bytes, dek.as_deref())
                })
                .await;
        }
        if self.inner.backend.exists(&key).await? {
            return Ok(false);
        }
        if let Prerequisite::Base(Some((base, base_key))) = &need
            && !self.inner.backend.exists(base_key).await?
        {
            return Err(missing_base(id, *base));
        }
        let object_key = key.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            if let Prerequisite::Content = need {
                check_stored_content(id, &bytes)?;
            }
            seal_stored(dek.as_deref(), &object_key, bytes)
        })
        .await
        .map_err(StoreError::task)??;
        self.write_chunk(guard, key, bytes).await?;
        Ok(true)
    }

    /// An empty [`ChunkUpload`] for a chunk object of about `expected`
    /// bytes and at most `max`, to be stored by
    /// [`Store::put_chunk_upload`].
    pub fn chunk_upload(&self, expected: usize, max: usize) -> ChunkUpload {
        let room = if self.is_encrypted() {
            crypt::ENVELOPE_BODY_START
        } else {
            0
        };
        ChunkUpload::new(room, expected, max)
    }

    /// [`Store::put_encoded_chunk`] of a received [`ChunkUpload`]: on
    /// files the object is checked and sealed where it was received, and
    /// written from there, without another copy, by the store's writer
    /// threads after this returns (see `behind.rs`: the next commit, sync
    /// or gc waits for it and fails if it failed; reads of it wait for it).
    /// On files, `false` means a write of the chunk is queued already; a
    /// chunk found on disk only by the writer thread answers `true`, and
    /// is not written again.
    pub async fn put_chunk_upload(&self, id: ChunkId, up: ChunkUpload) -> Result<bool, StoreError> {
        if self.inner.backend.blocking_objects().is_none() {
            return self.put_encoded_chunk(id, up.object().to_vec()).await;
        }
        let guard = Arc::clone(&self.inner.gate).read_owned().await;
        let key = self.inner.object_key(&id);
        let need = prerequisite(&self.inner, id, up.object())?;
        let dek = self.session_key().await?;
        self.write_blocking(guard, move |inner, objects, token| {
            store_upload_checked(inner, objects, id, key, need, up, dek.as_deref(), token)
        })
        .await
    }

    /// Runs a chunk write on a backend with blocking calls as one blocking
    /// call — look, check, seal and write — rather than a thread hop for
    /// each (a chunk arrives every millisecond or two during an initial
    /// copy). The write is counted, and `guard` (the gate) held, until
    /// `write` drops the token it is given: at its end, or once a write it
    /// queued behind is over.
    async fn write_blocking(
        &self,
        guard: OwnedRwLockReadGuard<()>,
        write: impl FnOnce(&Arc<Inner>, &dyn BlockingObjects, WriteToken) -> Result<bool, StoreError>
        + Send
        + 'static,
    ) -> Result<bool, StoreError> {
        self.begin_write().await?;
        let inner = Arc::clone(&self.inner);
        // Made at once (no await since the write was counted), so that a
        // cancelled caller still counts it done.
        let token = WriteToken {
            inner: Arc::clone(&inner),
            _gate: guard,
        };
        tokio::task::spawn_blocking(move || match inner.backend.blocking_objects() {
            Some(objects) => write(&inner, objects, token),
            None => Err(StoreError::Task(
                "the backend no longer offers blocking calls".into(),
            )),
        })
        .await
        .map_err(StoreError::task)?
    }

    /// Waits while a write of object `key` is queued behind its upload's
    /// answer, so that a read finds what was uploaded.
    async fn until_written(&self, key: &str) -> Result<(), StoreError> {
        if !self.inner.behind.get().is_some_and(|b| b.pending(key)) {
            return Ok(());
        }
        let (inner, key) = (Arc::clone(&self.inner), key.to_string());
        tokio::task::spawn_blocking(move || {
            if let Some(behind) = inner.behind.get() {
                behind.wait_for(&key);
            }
        })
        .await
        .map_err(StoreError::task)
    }

    /// Waits for the chunk writes queued behind their uploads' answers
    /// (see `behind.rs`); the first that failed since the last wait fails
    /// this.
    async fn wait_for_writes(&self) -> Result<(), StoreError> {
        if self.inner.behind.get().is_none() {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || match inner.behind.get() {
            Some(behind) => behind.wait(),
            None => Ok(()),
        })
        .await
        .map_err(StoreError::task)?
    }

    /// Encodes and stores a plaintext chunk (used when the data is local).
    /// Returns `None`, storing nothing, for an all-zero chunk.
    pub async fn put_plain_chunk(
        &self,
        plain: Vec<u8>,
        compress: bool,
    ) -> Result<Option<ChunkId>, StoreError> {
        self.put_plain(plain, None, compress).await
    }

    /// [`Store::put_plain_chunk`] for a caller that has hashed `plain`
    /// already (`id` = [`ChunkId::of`]`(plain)`): the data is not hashed
    /// again. A wrong id stores a chunk every reader rejects.
    pub async fn put_plain_chunk_hashed(
        &self,
        plain: Vec<u8>,
        id: ChunkId,
        compress: bool,
    ) -> Result<Option<ChunkId>, StoreError> {
        self.put_plain(plain, Some(id), compress).await
    }

    async fn put_plain(
        &self,
        plain: Vec<u8>,
        id: Option<ChunkId>,
        compress: bool,
    ) -> Result<Option<ChunkId>, StoreError> {
        let inner = Arc::clone(&self.inner);
        let dek = self.session_key().await?;
        let sealed = tokio::task::spawn_blocking(move || {
            if is_all_zero(&plain) {
                return Ok(None);
            }
            let enc = match id {
                Some(id) => crate::chunk::encode_chunk_with_id(&plain, id, compress),
                None => encode_chunk(&plain, compress),
            };
            let key = inner.object_key(&enc.id);
            let bytes = seal_stored(dek.as_deref(), &key, enc.bytes)?;
            Ok::<_, StoreError>(Some((enc.id, key, bytes)))
        })
        .await
        .map_err(StoreError::task)??;
        let Some((id, key, bytes)) = sealed else {
            return Ok(None);
        };
        let guard = Arc::clone(&self.inner.gate).read_owned().await;
        if !self.inner.backend.exists(&key).await? {
            self.write_chunk(guard, key, bytes).await?;
        }
        Ok(Some(id))
    }

    /// Writes a chunk object following the unsynced-marker protocol. The
    /// write runs in its own task (holding `guard`) so that cancelling the
    /// caller cannot leave a write the counters do not know about.
    async fn write_chunk(
        &self,
        guard: OwnedRwLockReadGuard<()>,
        key: String,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.begin_write().await?;
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            let r = inner.backend.put(&key, bytes).await;
            inner.writes_done.fetch_add(1, Ordering::SeqCst);
            drop(guard);
            r
        });
        task.await.map_err(StoreError::task)?
    }

    /// The first half of the unsynced-marker protocol for a chunk write:
    /// the marker exists (written durably by the first writer since the
    /// last settled barrier), and the write is counted as started. The
    /// caller counts it done (`writes_done`) once the write has returned,
    /// whatever its outcome.
    async fn begin_write(&self) -> Result<(), StoreError> {
        let mut flag = self.inner.unsynced.lock().await;
        if !*flag {
            let stamp = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
            self.inner
                .backend
                .put_durable(UNSYNCED_MARKER_KEY, stamp.into_bytes())
                .await?;
            *flag = true;
        }
        self.inner.writes_started.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Whether chunk `id` is stored.
    pub async fn has_chunk(&self, id: ChunkId) -> Result<bool, StoreError> {
        let _g = self.inner.gate.read().await;
        self.inner.backend.exists(&self.inner.object_key(&id)).await
    }

    /// For each id, whether it is stored.
    pub async fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        let _g = self.inner.gate.read().await;
        self.exists_many(ids.to_vec()).await
    }

    async fn exists_many(&self, ids: Vec<ChunkId>) -> Result<Vec<bool>, StoreError> {
        let keys: Vec<String> = ids.iter().map(|id| self.inner.object_key(id)).collect();
        if self.inner.backend.blocking_objects().is_some() {
            // Queued writes first: one that ends between the two looks is
            // then seen by the second.
            let queued: Vec<bool> = match self.inner.behind.get() {
                Some(b) => keys.iter().map(|k| b.pending(k)).collect(),
                None => vec![false; keys.len()],
            };
            let stored = self
                .in_blocking_batches(keys, |objects, key| objects.exists_blocking(key))
                .await?;
            return Ok(queued
                .into_iter()
                .zip(stored)
                .map(|(q, s)| q || s)
                .collect());
        }
        let backend = Arc::clone(&self.inner.backend);
        map_bounded(keys, META_PARALLELISM, move |key| {
            let backend = Arc::clone(&backend);
            async move { backend.exists(&key).await }
        })
        .await?
        .into_iter()
        .collect()
    }

    /// Runs `f` on every key, on blocking threads, [`BLOCKING_BATCH`] keys
    /// to a call; results in the order of `keys`. For a backend offering
    /// blocking calls (files): a `stat` or an `unlink` takes microseconds,
    /// a thread hop per key cost more than the call itself, and a burst of
    /// short blocking tasks makes tokio start a thread for nearly each.
    async fn in_blocking_batches<R: Send + 'static>(
        &self,
        keys: Vec<String>,
        f: fn(&dyn BlockingObjects, &str) -> Result<R, StoreError>,
    ) -> Result<Vec<R>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(BLOCKING_BATCH) {
            let (inner, batch) = (Arc::clone(&self.inner), batch.to_vec());
            let part = tokio::task::spawn_blocking(move || {
                let objects = inner.backend.blocking_objects().ok_or_else(|| {
                    StoreError::Task("the backend no longer offers blocking calls".into())
                })?;
                batch
                    .iter()
                    .map(|key| f(objects, key))
                    .collect::<Result<Vec<R>, StoreError>>()
            })
            .await
            .map_err(StoreError::task)??;
            out.extend(part);
        }
        Ok(out)
    }

    /// The verified plaintext of chunk `id`.
    pub async fn get_chunk(&self, id: ChunkId) -> Result<Vec<u8>, StoreError> {
        let _g = self.inner.gate.read().await;
        self.get_chunk_unlocked(id).await
    }

    async fn get_chunk_unlocked(&self, id: ChunkId) -> Result<Vec<u8>, StoreError> {
        if self.inner.backend.blocking_objects().is_some()
            && (self.inner.cipher.is_none() || self.reader.is_some())
        {
            // Files: read, open and decode in one blocking call, in a
            // pooled buffer, instead of a thread hop and a copy for each.
            // A data key not loaded yet is loaded and the read tried again.
            for _ in 0..3 {
                // Keys only for an encrypted store's envelopes.
                let reader = self.inner.cipher.as_ref().and(self.reader.clone());
                let inner = Arc::clone(&self.inner);
                let read = tokio::task::spawn_blocking(move || {
                    let objects = inner.backend.blocking_objects().ok_or_else(|| {
                        StoreError::Task("the backend no longer offers blocking calls".into())
                    })?;
                    read_chunk_blocking(&inner, reader.as_deref(), objects, id)
                })
                .await
                .map_err(StoreError::task)??;
                match (read, &self.reader) {
                    (ChunkRead::Plain(plain), _) => return Ok(plain),
                    (ChunkRead::NeedKey(chunk, dek_id), Some(reader)) => {
                        self.data_key(reader, chunk, dek_id).await?;
                    }
                    (ChunkRead::NeedKey(..), None) => break,
                }
            }
        }
        let key = self.inner.object_key(&id);
        let context = format!("object {key} not found");
        let encoded = self.fetch_encoded(id, key, context).await?;
        if parse_chunk_header(id, &encoded)?.codec != CODEC_DELTA {
            return tokio::task::spawn_blocking(move || decode_chunk(id, &encoded))
                .await
                .map_err(StoreError::task)?;
        }
        // A delta: rebuild it on its base (which is never a delta itself)
        // and check the result against the id like any chunk.
        let delta = parse_delta(id, &encoded)?;
        let base_id = delta.base;
        if base_id == ZERO_BASE {
            let zeros = vec![0; delta.plain_len as usize];
            return tokio::task::spawn_blocking(move || rebuild_delta(id, &delta, zeros))
                .await
                .map_err(StoreError::task)?;
        }
        let base_key = self.inner.object_key(&base_id);
        let context = format!("the base of delta chunk {id}: object {base_key} not found");
        let base_encoded = self.fetch_encoded(base_id, base_key, context).await?;
        tokio::task::spawn_blocking(move || {
            rebuild_delta(id, &delta, decode_chunk_unverified(base_id, &base_encoded)?)
        })
        .await
        .map_err(StoreError::task)?
    }

    /// The encoded chunk (store format) in chunk `id`'s object: as stored
    /// in a plain store; decrypted with its data key in an encrypted one,
    /// which needs the recovery key ([`StoreError::RecoveryKeyRequired`]).
    async fn fetch_encoded(
        &self,
        id: ChunkId,
        key: String,
        missing: String,
    ) -> Result<Vec<u8>, StoreError> {
        let reader = match (&self.inner.cipher, &self.reader) {
            (None, _) => None,
            (Some(c), None) => {
                return Err(StoreError::RecoveryKeyRequired {
                    key_id: c.key_id().to_string(),
                });
            }
            (Some(_), Some(r)) => Some(Arc::clone(r)),
        };
        self.until_written(&key).await?;
        let stored = self
            .inner
            .backend
            .get(&key)
            .await?
            .ok_or(StoreError::MissingChunk {
                id,
                context: missing,
            })?;
        let Some(reader) = reader else {
            return Ok(stored);
        };
        let dek_id =
            crypt::check_chunk_envelope(&stored).map_err(|e| envelope_error(id, &key, e))?;
        let dek = self.data_key(&reader, id, dek_id).await?;
        tokio::task::spawn_blocking(move || {
            crypt::open_chunk(&dek, &key, stored).map_err(|e| envelope_error(id, &key, e))
        })
        .await
        .map_err(StoreError::task)?
    }

    /// The data key `dek_id` (object `keys/<id>`), opened with the
    /// recovery key once per handle. `chunk` names the chunk in errors.
    async fn data_key(
        &self,
        reader: &Reader,
        chunk: ChunkId,
        dek_id: [u8; DATA_KEY_ID_LEN],
    ) -> Result<Arc<DataKey>, StoreError> {
        if let Some(k) = reader
            .data_keys
            .lock()
            .ok()
            .and_then(|m| m.get(&dek_id).cloned())
        {
            return Ok(k);
        }
        let object = crypt::data_key_object(&dek_id);
        let sealed =
            self.inner
                .backend
                .get(&object)
                .await?
                .ok_or_else(|| StoreError::CorruptChunk {
                    id: chunk,
                    reason: format!("the data key it was sealed with ({object}) is missing"),
                })?;
        let dek = DataKey::open(&reader.key, dek_id, &sealed).map_err(|reason| {
            StoreError::CorruptChunk {
                id: chunk,
                reason: format!("the data key {object} cannot be opened: {reason}"),
            }
        })?;
        let dek = Arc::new(dek);
        if let Ok(mut m) = reader.data_keys.lock() {
            m.insert(dek_id, Arc::clone(&dek));
        }
        Ok(dek)
    }

    /// This writer session's data key (encrypted stores): generated and its
    /// sealed object written durably before the first chunk uses it.
    async fn session_key(&self) -> Result<Option<Arc<DataKey>>, StoreError> {
        let Some(cipher) = &self.inner.cipher else {
            return Ok(None);
        };
        let mut slot = self.inner.session_key.lock().await;
        if let Some(k) = &*slot {
            return Ok(Some(Arc::clone(k)));
        }
        let (dek, object, sealed) = DataKey::generate(cipher.public())?;
        self.inner.backend.put_durable(&object, sealed).await?;
        let dek = Arc::new(dek);
        *slot = Some(Arc::clone(&dek));
        Ok(Some(dek))
    }

    /// Checks chunk `id` as far as this handle can: with access to the data
    /// (a plain store, or the recovery key) it is read, decoded and hashed,
    /// and its length returned; in an encrypted store without the recovery
    /// key, its envelope's checksum and the presence of its data key are
    /// checked, and the length is unknown (`None`).
    pub async fn check_chunk(&self, id: ChunkId) -> Result<Option<usize>, StoreError> {
        let _g = self.inner.gate.read().await;
        self.check_chunk_unlocked(id).await
    }

    async fn check_chunk_unlocked(&self, id: ChunkId) -> Result<Option<usize>, StoreError> {
        if self.can_read_data() {
            return self.get_chunk_unlocked(id).await.map(|p| Some(p.len()));
        }
        let key = self.inner.object_key(&id);
        self.until_written(&key).await?;
        let stored =
            self.inner
                .backend
                .get(&key)
                .await?
                .ok_or_else(|| StoreError::MissingChunk {
                    id,
                    context: format!("object {key} not found"),
                })?;
        let k = key.clone();
        let dek_id = tokio::task::spawn_blocking(move || {
            crypt::check_chunk_envelope(&stored).map_err(|e| envelope_error(id, &k, e))
        })
        .await
        .map_err(StoreError::task)??;
        let object = crypt::data_key_object(&dek_id);
        if !self.inner.backend.exists(&object).await? {
            return Err(StoreError::CorruptChunk {
                id,
                reason: format!("the data key it was sealed with ({object}) is missing"),
            });
        }
        Ok(None)
    }

    /// Commits a recovery point: makes it visible once every chunk it
    /// references and the manifest itself are durable.
    ///
    /// 1. validate the manifest; if a manifest already exists under this
    ///    point id, succeed (after a barrier) if it is byte-identical, else
    ///    fail with [`StoreError::PointConflict`];
    /// 2. check every referenced chunk exists ([`StoreError::MissingChunk`]
    ///    names the first missing one; nothing is written);
    /// 3. barrier: the chunks are durable;
    /// 4. write the manifest durably (temp file, fsync, rename, fsync dir).
    pub async fn commit_point(&self, manifest: &Manifest) -> Result<(), StoreError> {
        manifest.validate()?;
        let key = manifest_key(&manifest.item, &manifest.point_id)?;
        let bytes = manifest.encode();
        let _g = self.inner.gate.read().await;
        let _c = self.inner.commit_lock.lock().await;
        let backend = &self.inner.backend;
        if let Some(existing) = backend.get(&key).await? {
            // Encrypted manifests differ on every write (random nonces):
            // compare what they hold.
            if self.inner.open_manifest(&key, existing)? == bytes {
                return self.barrier_and_settle().await;
            }
            return Err(StoreError::PointConflict {
                item: manifest.item.clone(),
                point_id: manifest.point_id.clone(),
            });
        }
        // Chunks answered before this commit are written (or failed) first.
        self.wait_for_writes().await?;
        let mut refs: Vec<ChunkId> = manifest.referenced_chunks().into_iter().collect();
        refs.sort();
        let present = self.exists_many(refs.clone()).await?;
        if let Some((id, _)) = refs.iter().zip(&present).find(|(_, p)| !**p) {
            let missing = present.iter().filter(|p| !**p).count();
            return Err(StoreError::MissingChunk {
                id: *id,
                context: format!(
                    "referenced by recovery point {}/{} ({missing} of {} chunks missing); \
                     upload the missing chunks before committing",
                    manifest.item,
                    manifest.point_id,
                    refs.len()
                ),
            });
        }
        let bytes = self.inner.seal_manifest(&key, bytes)?;
        self.barrier_and_settle().await?;
        backend.put_durable(&key, bytes).await?;
        tracing::info!(item = %manifest.item, point = %manifest.point_id, "committed recovery point");
        Ok(())
    }

    /// The committed recovery points, of one item or all, sorted.
    pub async fn list_points(&self, item: Option<&str>) -> Result<Vec<PointRef>, StoreError> {
        let _g = self.inner.gate.read().await;
        self.list_points_unlocked(item).await
    }

    async fn list_points_unlocked(&self, item: Option<&str>) -> Result<Vec<PointRef>, StoreError> {
        let prefix = match item {
            Some(i) => {
                validate_name("item", i)?;
                format!("{POINTS_PREFIX}{i}/")
            }
            None => POINTS_PREFIX.to_string(),
        };
        let mut points: Vec<PointRef> = self
            .inner
            .backend
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|k| parse_manifest_key(k))
            .collect();
        points.sort();
        Ok(points)
    }

    /// Reads and verifies the manifest of a recovery point.
    pub async fn read_manifest(&self, item: &str, point_id: &str) -> Result<Manifest, StoreError> {
        let _g = self.inner.gate.read().await;
        self.read_manifest_unlocked(item, point_id).await
    }

    async fn read_manifest_unlocked(
        &self,
        item: &str,
        point_id: &str,
    ) -> Result<Manifest, StoreError> {
        let key = manifest_key(item, point_id)?;
        let bytes =
            self.inner
                .backend
                .get(&key)
                .await?
                .ok_or_else(|| StoreError::PointNotFound {
                    item: item.to_string(),
                    point_id: point_id.to_string(),
                })?;
        let (item, point_id) = (item.to_string(), point_id.to_string());
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let bytes = inner.open_manifest(&key, bytes)?;
            let m = Manifest::decode_named(&key, &bytes)?;
            if m.item != item || m.point_id != point_id {
                return Err(StoreError::CorruptManifest {
                    what: key,
                    reason: format!(
                        "it describes point {}/{}, not the one its name says",
                        m.item, m.point_id
                    ),
                });
            }
            Ok(m)
        })
        .await
        .map_err(StoreError::task)?
    }

    /// Deletes a recovery point (its manifest; run [`Store::gc`] to free
    /// chunks). Succeeds if the point does not exist. The deletion is
    /// durable when this returns.
    pub async fn delete_point(&self, item: &str, point_id: &str) -> Result<(), StoreError> {
        let key = manifest_key(item, point_id)?;
        let _g = self.inner.gate.read().await;
        self.inner.backend.delete(&key).await?;
        self.inner.backend.barrier().await
    }

    /// The verified data of chunk `index` of `disk`: `None` for a zero
    /// block, else exactly `disk.len_of(index)` bytes.
    pub async fn read_chunk_at(
        &self,
        disk: &DiskManifest,
        index: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let entry = *disk.chunks.get(index).ok_or(StoreError::OutOfRange {
            what: "chunk",
            index: index as u64,
            count: disk.chunks.len() as u64,
        })?;
        let Some(id) = entry else { return Ok(None) };
        let data = self.get_chunk(id).await?;
        check_block_len(&disk.disk_id, index, disk.len_of(index), id, data.len())?;
        Ok(Some(data))
    }

    /// Reads disk `disk_index` of `manifest` in ascending offset order,
    /// fetching up to `parallelism` chunks ahead.
    pub fn read_disk(
        &self,
        manifest: &Manifest,
        disk_index: usize,
        parallelism: usize,
    ) -> Result<DiskReader, StoreError> {
        let disk = manifest
            .disks
            .get(disk_index)
            .ok_or(StoreError::OutOfRange {
                what: "disk",
                index: disk_index as u64,
                count: manifest.disks.len() as u64,
            })?;
        Ok(DiskReader {
            store: self.clone(),
            disk: Arc::new(disk.clone()),
            next_spawn: 0,
            next_yield: 0,
            window: parallelism.max(1),
            pending: VecDeque::new(),
            failed: false,
        })
    }

    /// Deletes every chunk that no recovery point references and that is
    /// not in `keep` (chunks of uploads whose point is not committed yet),
    /// and removes leftover temporary files.
    ///
    /// Takes the store's exclusive lock: chunk puts, commits and reads made
    /// through this `Store` (or its clones) wait until gc is done, so a
    /// commit never relies on a chunk gc is sweeping. Chunks uploaded but
    /// not committed before gc must be listed in `keep` or they are
    /// deleted (and a later commit referencing them fails cleanly with
    /// [`StoreError::MissingChunk`]). If any manifest cannot be read, gc
    /// deletes nothing and returns the error.
    pub async fn gc(&self, keep: &HashSet<ChunkId>) -> Result<GcReport, StoreError> {
        let _g = self.inner.gate.write().await;
        let backend = &self.inner.backend;
        // Manifest deletions must be durable before chunks go.
        backend.barrier().await?;
        let mut report = GcReport {
            temp_files_removed: backend.remove_stale_temp(Duration::ZERO).await?,
            ..Default::default()
        };
        let mut marked = keep.clone();
        for p in self.list_points_unlocked(None).await? {
            let m = self.read_manifest_unlocked(&p.item, &p.point_id).await?;
            marked.extend(m.referenced_chunks());
            report.points += 1;
        }
        // Marks are plaintext ids; objects are named by their keys.
        let marked: HashSet<String> = marked.iter().map(|id| self.inner.object_key(id)).collect();
        let mut doomed = Vec::new();
        for key in backend.list(CHUNKS_PREFIX).await? {
            if parse_chunk_key(&key).is_none() {
                tracing::warn!(%key, "gc: ignoring unexpected object under chunks/");
            } else if marked.contains(&key) {
                report.chunks_kept += 1;
            } else {
                doomed.push(key);
            }
        }
        if backend.blocking_objects().is_some() {
            let deleted = self
                .in_blocking_batches(doomed, |objects, key| objects.delete_blocking(key))
                .await?;
            report.chunks_deleted += deleted.len() as u64;
        } else {
            let b = Arc::clone(backend);
            let results = map_bounded(doomed, META_PARALLELISM, move |key| {
                let b = Arc::clone(&b);
                async move { b.delete(&key).await }
            })
            .await?;
            for r in results {
                r?;
                report.chunks_deleted += 1;
            }
        }
        // Reclaim the space the deleted chunks held in packs; the store's
        // write gate is held, so no chunk comes or goes meanwhile.
        let compacted = backend.compact().await?;
        report.packs_compacted = compacted.packs_removed;
        report.pack_bytes_freed = compacted.bytes_freed;
        self.barrier_and_settle().await?;
        tracing::info!(?report, "gc done");
        Ok(report)
    }

    /// Re-reads every manifest and every chunk it references, decoding and
    /// hashing each, and checks each chunk has the length its position
    /// needs. Chunks shared by several points are read once.
    pub async fn verify(&self) -> Result<VerifyReport, StoreError> {
        let _g = self.inner.gate.read().await;
        // Per chunk: Ok(plain length, if this handle can read data) or what
        // is wrong.
        let mut cache: HashMap<ChunkId, Result<Option<usize>, String>> = HashMap::new();
        let mut report = VerifyReport::default();
        for p in self.list_points_unlocked(None).await? {
            let m = match self.read_manifest_unlocked(&p.item, &p.point_id).await {
                Ok(m) => m,
                // Deleted (pruned) since it was listed: nothing to verify.
                Err(StoreError::PointNotFound { .. }) => continue,
                Err(e) => {
                    report.points.push(PointVerify {
                        item: p.item,
                        point_id: p.point_id,
                        ok: false,
                        damaged_chunks: vec![],
                        error: Some(e.to_string()),
                    });
                    continue;
                }
            };
            let mut todo: Vec<ChunkId> = m
                .referenced_chunks()
                .into_iter()
                .filter(|id| !cache.contains_key(id))
                .collect();
            todo.sort();
            let this = self.clone();
            let results = map_bounded(todo.clone(), READ_PARALLELISM, move |id| {
                let this = this.clone();
                async move {
                    this.check_chunk_unlocked(id)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await?;
            cache.extend(todo.into_iter().zip(results));

            let mut damaged = Vec::new();
            let mut first_error = None;
            for d in &m.disks {
                for (i, entry) in d.chunks.iter().enumerate() {
                    let Some(id) = entry else { continue };
                    let problem = match cache.get(id) {
                        Some(Ok(Some(len))) => {
                            check_block_len(&d.disk_id, i, d.len_of(i), *id, *len)
                                .err()
                                .map(|e| e.to_string())
                        }
                        Some(Ok(None)) => None,
                        Some(Err(e)) => Some(e.clone()),
                        None => Some(format!("chunk {id} was not checked")),
                    };
                    if let Some(problem) = problem {
                        if !damaged.contains(id) {
                            damaged.push(*id);
                        }
                        first_error.get_or_insert(problem);
                    }
                }
            }
            // A delta's block is checked as rebuilt, so damage to its base
            // in the pages the delta replaces does not show there: the base
            // is reported on its own.
            for base in m.bases.values() {
                if let Some(Err(e)) = cache.get(base)
                    && !damaged.contains(base)
                {
                    damaged.push(*base);
                    first_error.get_or_insert_with(|| e.clone());
                }
            }
            report.points.push(PointVerify {
                item: p.item,
                point_id: p.point_id,
                ok: damaged.is_empty(),
                error: first_error
                    .map(|e| format!("{} damaged chunk(s); first: {e}", damaged.len())),
                damaged_chunks: damaged,
            });
        }
        report.chunks_checked = cache.len() as u64;
        Ok(report)
    }
}

fn parse_store_info(bytes: &[u8]) -> Result<StoreInfo, StoreError> {
    let corrupt = |reason: String| StoreError::CorruptMetadata {
        key: STORE_INFO_KEY.into(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(STORE_FORMAT_NAME) {
        return Err(corrupt(format!(
            "\"format\" is not {STORE_FORMAT_NAME:?}: this directory is not a siterec store"
        )));
    }
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| corrupt("no numeric \"version\"".into()))?;
    if version > u64::from(STORE_FORMAT_VERSION) {
        return Err(StoreError::UnsupportedVersion {
            what: format!("store ({STORE_INFO_KEY})"),
            found: u32::try_from(version).unwrap_or(u32::MAX),
            supported: STORE_FORMAT_VERSION,
        });
    }
    if version == u64::from(STORE_FORMAT_VERSION_RETIRED) {
        return Err(StoreError::RetiredVersion {
            found: STORE_FORMAT_VERSION_RETIRED,
        });
    }
    let info: StoreInfo =
        serde_json::from_value(value).map_err(|e| corrupt(format!("invalid: {e}")))?;
    if info.version == 0 || info.chunk_layout != CHUNK_LAYOUT_V1 {
        return Err(corrupt(format!(
            "version {} with chunk layout {:?} is not a known combination",
            info.version, info.chunk_layout
        )));
    }
    match (&info.encryption, info.version) {
        (None, STORE_FORMAT_VERSION_PLAIN) => {}
        (Some(e), STORE_FORMAT_VERSION_ENCRYPTED) => {
            if e.algorithm != ENCRYPTION_ALGORITHM
                || e.key_wrap != KEY_WRAP_SCHEME
                || e.name_key != NAME_KEY_SCHEME
            {
                return Err(corrupt(format!(
                    "unknown encryption (algorithm {:?}, keyWrap {:?}, nameKey {:?}); this \
                     build knows {ENCRYPTION_ALGORITHM:?} with {KEY_WRAP_SCHEME:?} and \
                     {NAME_KEY_SCHEME:?}",
                    e.algorithm, e.key_wrap, e.name_key
                )));
            }
        }
        (None, v) => {
            return Err(corrupt(format!(
                "version {v} requires an \"encryption\" member, and there is none"
            )));
        }
        (Some(_), v) => {
            return Err(corrupt(format!(
                "version {v} stores are not encrypted, yet it has an \"encryption\" member"
            )));
        }
    }
    Ok(info)
}

/// Checks a whole (non-delta) chunk object received for storing: valid
/// for `id`, and not all zeros.
fn check_stored_content(id: ChunkId, bytes: &[u8]) -> Result<(), StoreError> {
    match check_chunk(id, bytes)? {
        ChunkContent::Zero => Err(StoreError::ZeroChunk { id }),
        ChunkContent::Data => Ok(()),
    }
}

fn missing_base(id: ChunkId, base: ChunkId) -> StoreError {
    StoreError::MissingChunk {
        id: base,
        context: format!("the base of delta chunk {id}; send the chunk whole"),
    }
}

/// [`Store::put_encoded_chunk`]'s work on a blocking thread, for a backend
/// with blocking calls: nothing if `key` exists, else check (a delta's
/// base is present, a whole chunk's content), seal and write.
fn store_checked(
    inner: &Inner,
    objects: &dyn BlockingObjects,
    id: ChunkId,
    key: &str,
    need: Prerequisite,
    bytes: Vec<u8>,
    dek: Option<&DataKey>,
) -> Result<bool, StoreError> {
    if !needs_storing(inner, objects, id, key, &need, &bytes, true)? {
        return Ok(false);
    }
    write_checked(objects, key, &bytes, dek)?;
    Ok(true)
}

/// Whether chunk `id`, received as `object`, is to be written: `false`
/// if it is stored (or queued to be) already; an error if a delta's base
/// is not here or a whole chunk's content is not what `id` says. Without
/// `look_on_disk`, only the queued writes are looked at for `key` (the
/// writer thread looks on disk; a directory lookup can wait on the disk).
fn needs_storing(
    inner: &Inner,
    objects: &dyn BlockingObjects,
    id: ChunkId,
    key: &str,
    need: &Prerequisite,
    object: &[u8],
    look_on_disk: bool,
) -> Result<bool, StoreError> {
    // A queued write is looked for first: if it ends between the two
    // looks, the second sees its object.
    let present = |key: &str, on_disk: bool| -> Result<bool, StoreError> {
        Ok(inner.behind.get().is_some_and(|b| b.pending(key))
            || (on_disk && objects.exists_blocking(key)?))
    };
    if present(key, look_on_disk)? {
        return Ok(false);
    }
    match need {
        Prerequisite::Base(Some((base, base_key))) => {
            if !present(base_key, true)? {
                return Err(missing_base(id, *base));
            }
        }
        Prerequisite::Base(None) => {}
        Prerequisite::Content => check_stored_content(id, object)?,
    }
    Ok(true)
}

/// What a received chunk object needs checked before it is stored.
enum Prerequisite {
    /// A whole chunk: its content, against its id.
    Content,
    /// A delta: that its base (id, object key) is stored; `None` for a
    /// delta on zeros ([`ZERO_BASE`]), which has no base object. A delta's
    /// content is checked whenever it is read.
    Base(Option<(ChunkId, String)>),
}

/// The [`Prerequisite`] of chunk object `object`, named `id`.
fn prerequisite(inner: &Inner, id: ChunkId, object: &[u8]) -> Result<Prerequisite, StoreError> {
    Ok(match parse_chunk_header(id, object)?.codec {
        CODEC_DELTA => Prerequisite::Base(match parse_delta(id, object)?.base {
            ZERO_BASE => None,
            base => Some((base, inner.object_key(&base))),
        }),
        _ => Prerequisite::Content,
    })
}

/// [`store_checked`] of an upload: sealed (with `dek`) in its own buffer,
/// and queued to be written from there by the store's writer threads
/// (`token` goes with it).
#[allow(clippy::too_many_arguments)]
fn store_upload_checked(
    inner: &Arc<Inner>,
    objects: &dyn BlockingObjects,
    id: ChunkId,
    key: String,
    need: Prerequisite,
    mut up: ChunkUpload,
    dek: Option<&DataKey>,
    token: WriteToken,
) -> Result<bool, StoreError> {
    let key = key.as_str();
    // Whether it is on disk already, the writer thread looks.
    if !needs_storing(inner, objects, id, key, &need, up.object(), false)? {
        return Ok(false);
    }
    let object_len = up.object().len();
    let (stored_len, sealing) = match dek {
        Some(_) if up.room() == crypt::ENVELOPE_BODY_START => {
            (object_len + crypt::ENVELOPE_OVERHEAD, true)
        }
        None if up.room() == 0 => (object_len, false),
        // Received for another setting of the store: copy once.
        _ => return write_checked(objects, key, up.object(), dek).map(|()| true),
    };
    let buf = up.stored_mut(stored_len).ok_or_else(|| {
        StoreError::Task(format!(
            "an upload of {object_len} bytes has no room to be stored"
        ))
    })?;
    if let (true, Some(dek)) = (sealing, dek) {
        crypt::seal_chunk_in_place(dek, key, &mut buf[..stored_len])?;
    }
    let behind = inner
        .behind
        .get_or_init(|| WriteBehind::start(Arc::clone(&inner.backend)));
    behind.submit(
        objects,
        Write {
            key: key.to_string(),
            upload: up,
            len: stored_len,
            done: Box::new(token),
        },
    )?;
    Ok(true)
}

/// Writes the checked chunk object `bytes`, sealed with `dek` if any.
fn write_checked(
    objects: &dyn BlockingObjects,
    key: &str,
    bytes: &[u8],
    dek: Option<&DataKey>,
) -> Result<(), StoreError> {
    match dek {
        None => objects.put_blocking(key, bytes),
        // Sealed straight into the buffer the object is written from.
        Some(dek) => {
            objects.put_blocking_with(key, bytes.len() + crypt::ENVELOPE_OVERHEAD, &mut |out| {
                crypt::seal_chunk_into(dek, key, bytes, out)
            })
        }
    }
}

/// What [`read_chunk_blocking`] found.
enum ChunkRead {
    /// The verified plaintext.
    Plain(Vec<u8>),
    /// Chunk `.0` is sealed with data key `.1`, not loaded yet.
    NeedKey(ChunkId, [u8; DATA_KEY_ID_LEN]),
}

/// Reads chunk `id` (and the base of a delta) through blocking calls:
/// opens it in the backend's buffer if the store is encrypted (`reader`
/// holds the data keys loaded so far), decodes it and checks it against
/// its id, as [`Store::get_chunk`] does.
fn read_chunk_blocking(
    inner: &Inner,
    reader: Option<&Reader>,
    objects: &dyn BlockingObjects,
    id: ChunkId,
) -> Result<ChunkRead, StoreError> {
    // A whole chunk decodes in the lent buffer; a delta (a few pages) is
    // parsed out of it and rebuilt on its base, read the same way.
    enum Found {
        Plain(Vec<u8>),
        Delta(Delta),
        NeedKey(ChunkId, [u8; DATA_KEY_ID_LEN]),
    }
    let read =
        |id: ChunkId, verify: bool, missing: &dyn Fn() -> String| -> Result<Found, StoreError> {
            let key = inner.object_key(&id);
            if let Some(behind) = inner.behind.get() {
                behind.wait_for(&key);
            }
            let mut found = None;
            let present = objects.get_blocking_with(&key, &mut |stored| {
                let encoded: &[u8] = match reader {
                    None => stored,
                    Some(reader) => {
                        let dek_id = crypt::check_chunk_envelope(stored)
                            .map_err(|e| envelope_error(id, &key, e))?;
                        let dek = reader
                            .data_keys
                            .lock()
                            .ok()
                            .and_then(|m| m.get(&dek_id).cloned());
                        let Some(dek) = dek else {
                            found = Some(Found::NeedKey(id, dek_id));
                            return Ok(());
                        };
                        let n = crypt::open_chunk_in_place(&dek, &key, stored)
                            .map_err(|e| envelope_error(id, &key, e))?;
                        &stored[..n]
                    }
                };
                found = Some(if parse_chunk_header(id, encoded)?.codec == CODEC_DELTA {
                    Found::Delta(parse_delta(id, encoded)?)
                } else if verify {
                    Found::Plain(decode_chunk(id, encoded)?)
                } else {
                    Found::Plain(decode_chunk_unverified(id, encoded)?)
                });
                Ok(())
            })?;
            match found {
                Some(found) if present => Ok(found),
                _ => Err(StoreError::MissingChunk {
                    id,
                    context: missing(),
                }),
            }
        };
    let key = inner.object_key(&id);
    let delta = match read(id, true, &|| format!("object {key} not found"))? {
        Found::Plain(plain) => return Ok(ChunkRead::Plain(plain)),
        Found::NeedKey(chunk, dek) => return Ok(ChunkRead::NeedKey(chunk, dek)),
        Found::Delta(delta) => delta,
    };
    if delta.base == ZERO_BASE {
        let zeros = vec![0; delta.plain_len as usize];
        return rebuild_delta(id, &delta, zeros).map(ChunkRead::Plain);
    }
    let base_key = inner.object_key(&delta.base);
    let missing = || format!("the base of delta chunk {id}: object {base_key} not found");
    // The base is not hashed on its own: what is checked is the block
    // rebuilt on it (see `rebuild_delta`).
    let base = match read(delta.base, false, &missing)? {
        Found::Plain(base) => base,
        Found::NeedKey(chunk, dek) => return Ok(ChunkRead::NeedKey(chunk, dek)),
        Found::Delta(_) => {
            return Err(StoreError::CorruptChunk {
                id,
                reason: format!("its base {} is itself a delta", delta.base),
            });
        }
    };
    rebuild_delta(id, &delta, base).map(ChunkRead::Plain)
}

/// The plaintext of delta chunk `id` rebuilt on its base's plaintext
/// (decoded but not hashed: the pages the delta replaces need not be
/// right), checked against the id it must hash to. What is returned is
/// verified as any chunk read is; a damaged base or delta fails here
/// (`verify` checks each object on its own and names which).
fn rebuild_delta(id: ChunkId, delta: &Delta, base: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    let plain = apply_delta_in_place(id, delta, base)?;
    let actual = ChunkId::of(&plain);
    if actual != delta.target {
        return Err(StoreError::CorruptChunk {
            id,
            reason: format!(
                "rebuilt on its base {}, it hashes to {actual}, not {}: the delta or its base is damaged",
                delta.base, delta.target
            ),
        });
    }
    Ok(plain)
}

/// The encoded chunk to store: as is in a plain store (`dek` is `None`),
/// else sealed with the session's data key.
fn seal_stored(
    dek: Option<&DataKey>,
    object_key: &str,
    encoded: Vec<u8>,
) -> Result<Vec<u8>, StoreError> {
    match dek {
        None => Ok(encoded),
        Some(dek) => crypt::seal_chunk(dek, object_key, &encoded),
    }
}

fn envelope_error(id: ChunkId, object_key: &str, e: OpenError) -> StoreError {
    match e {
        OpenError::Newer(found) => StoreError::UnsupportedVersion {
            what: format!("encrypted chunk {id} ({object_key})"),
            found,
            supported: 3,
        },
        OpenError::Corrupt(reason) => StoreError::CorruptChunk { id, reason },
    }
}

fn check_block_len(
    disk_id: &str,
    index: usize,
    expected: u64,
    id: ChunkId,
    actual: usize,
) -> Result<(), StoreError> {
    if actual as u64 == expected {
        return Ok(());
    }
    Err(StoreError::CorruptManifest {
        what: format!("disk {disk_id}"),
        reason: format!(
            "chunk {index} references {id}, which holds {actual} bytes where {expected} are needed"
        ),
    })
}

/// Reads one disk of a recovery point in order; see [`Store::read_disk`].
///
/// Each chunk is read under the store's shared lock, so gc cannot run in
/// the middle of one chunk read; deleting the point while reading it makes
/// later chunks fail with [`StoreError::MissingChunk`] after gc.
pub struct DiskReader {
    store: Store,
    disk: Arc<DiskManifest>,
    next_spawn: usize,
    next_yield: usize,
    window: usize,
    pending: VecDeque<JoinHandle<Result<Option<Vec<u8>>, StoreError>>>,
    failed: bool,
}

impl DiskReader {
    /// The disk being read.
    pub fn disk(&self) -> &DiskManifest {
        &self.disk
    }

    /// The next block, in ascending offset order; `None` at the end. After
    /// an error, the reader yields nothing more.
    pub async fn next(&mut self) -> Option<Result<DiskBlock, StoreError>> {
        if self.failed || self.next_yield >= self.disk.chunks.len() {
            return None;
        }
        while self.pending.len() < self.window && self.next_spawn < self.disk.chunks.len() {
            let (store, disk, index) =
                (self.store.clone(), Arc::clone(&self.disk), self.next_spawn);
            self.pending.push_back(tokio::spawn(async move {
                store.read_chunk_at(&disk, index).await
            }));
            self.next_spawn += 1;
        }
        let handle = self.pending.pop_front()?;
        let index = self.next_yield;
        self.next_yield += 1;
        let result = match handle.await {
            Ok(Ok(data)) => Ok(DiskBlock {
                index: index as u64,
                offset: self.disk.offset_of(index),
                len: self.disk.len_of(index),
                data,
            }),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(StoreError::task(e)),
        };
        if result.is_err() {
            self.failed = true;
            self.abort_pending();
        }
        Some(result)
    }

    fn abort_pending(&mut self) {
        for h in self.pending.drain(..) {
            h.abort();
        }
    }
}

impl Drop for DiskReader {
    fn drop(&mut self) {
        self.abort_pending();
    }
}
