//! The target role: a replica store, the data endpoint source agents ship
//! to, and the tasks the vault gives a recovery-site agent (materialize a
//! recovery point as disk images, prune points).
//!
//! Data endpoint (TLS; a client certificate from the vault CA is required):
//! - `HEAD /data/v1/items/{item}/chunks/{id}`: 200 if the store has the chunk.
//! - `PUT  /data/v1/items/{item}/chunks/{id}`: an encoded chunk (store format);
//!   verified against its id before it is stored.
//! - `POST /data/v1/items/{item}/points`: an encoded manifest; commits the
//!   recovery point durably. 409 with the missing chunk ids if any chunk it
//!   references is absent.

mod endpoint;
mod reverse;
mod tasks;

pub use reverse::LocalDisk;

pub use endpoint::DataError;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Extension, Json, Router};
use siterec_core::wire::{CommitRefused, MaterializedDisk, TaskWork, WireError};
use siterec_drivers::export::{ImageFormat, create_writer};
use siterec_pki::PeerIdentity;
use siterec_store::{
    BackendConfig, ChunkId, Manifest, RecoveryKey, STORE_INFO_KEY, Store, StoreCredential,
    StoreError, TransportKey,
};

/// How the target's replica store is encrypted ([target] `encryption`).
#[derive(Debug, Clone)]
pub struct StoreEncryption {
    /// `DATA/store.credential`: what the agent keeps (writes, cannot read).
    pub credential: PathBuf,
    /// Where the recovery key is written when the store is created.
    pub recovery_key_export: PathBuf,
}

/// The target role's shared state.
pub struct Target {
    /// The store as the agent holds it: in an encrypted store, it writes
    /// and manages but cannot read chunk data.
    pub store: Store,
    pub failover_dir: PathBuf,
    /// Opens recovery keys the vault sealed to this agent (materialize).
    transport: std::sync::OnceLock<TransportKey>,
    /// Chunks uploaded or vouched for per item since its last commit: kept
    /// by garbage collection until the point that uses them is committed.
    in_flight: Mutex<HashMap<String, HashSet<ChunkId>>>,
    /// Item → the source agent allowed to write it, as the vault last said.
    sources: Mutex<HashMap<String, String>>,
    /// The compute driver: replica VMs booted at failover.
    pub compute: crate::compute::Compute,
    /// When garbage collection last ran after a prune, and whether one is
    /// scheduled: see [`Target::collect_after_prune`].
    gc_pacing: Mutex<GcPacing>,
    /// This agent's own machines (`[[machines]]`) by name: the disks a
    /// reprotect seeds from and a failback writes back onto.
    local_machines: Mutex<HashMap<String, Vec<LocalDisk>>>,
}

/// Garbage collection after a prune runs at most this often. A policy
/// copying every 5 s prunes a point on every report once its window is
/// full, and each collection reads every manifest and lists every chunk:
/// prunes in between only delete their points, and one collection a
/// minute later takes all their chunks.
pub const GC_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

struct GcPacing {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    scheduled: bool,
}

impl Target {
    pub async fn open(store_dir: &Path, failover_dir: PathBuf) -> anyhow::Result<Arc<Target>> {
        Target::open_backend(
            None,
            &BackendConfig::Local {
                path: store_dir.to_path_buf(),
            },
            failover_dir,
        )
        .await
    }

    /// Opens the replica store on any backend. A missing container or
    /// bucket, a wrong endpoint or rejected credentials stop the agent here
    /// with the backend's message, not in the middle of replication.
    pub async fn open_backend(
        encryption: Option<&StoreEncryption>,
        config: &BackendConfig,
        failover_dir: PathBuf,
    ) -> anyhow::Result<Arc<Target>> {
        let backend = siterec_store::open_backend(config)
            .await
            .context("opening the replica store")?;
        let what = backend.describe();
        let store = match encryption {
            None => Store::open_or_create(backend)
                .await
                .with_context(|| format!("opening the replica store on {what}"))?,
            Some(enc) => open_encrypted(backend, enc, &what).await?,
        };
        if let Some(r) = store.last_recovery() {
            tracing::warn!(
                checked = r.chunks_checked,
                known_whole = r.chunks_known_whole,
                removed = r.objects_removed.len().max(r.chunks_removed.len()),
                "replica store recovered from an unclean shutdown"
            );
        }
        std::fs::create_dir_all(&failover_dir).with_context(|| {
            format!("creating the failover directory {}", failover_dir.display())
        })?;
        Ok(Arc::new(Target {
            store,
            compute: crate::compute::Compute::new(failover_dir.join("vms")),
            failover_dir,
            transport: std::sync::OnceLock::new(),
            in_flight: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
            gc_pacing: Mutex::new(GcPacing {
                interval: GC_MIN_INTERVAL,
                last: None,
                scheduled: false,
            }),
            local_machines: Mutex::new(HashMap::new()),
        }))
    }

    /// Paces garbage collection after prunes at `interval` instead of
    /// [`GC_MIN_INTERVAL`] (tests).
    pub fn set_gc_interval(&self, interval: std::time::Duration) {
        if let Ok(mut p) = self.gc_pacing.lock() {
            p.interval = interval;
        }
    }

    /// Collects garbage after a prune, at most once per interval: now
    /// if the last collection is that old (returns its report), else once
    /// the interval has passed, in the background (returns `None`). A
    /// collection that a restart loses is made by the next prune.
    async fn collect_after_prune(
        self: &Arc<Self>,
    ) -> anyhow::Result<Option<siterec_store::GcReport>> {
        let wait = {
            let mut p = self
                .gc_pacing
                .lock()
                .map_err(|_| anyhow::anyhow!("gc pacing lock poisoned"))?;
            match p.last.map(|t| t.elapsed()) {
                Some(since) if since < p.interval => {
                    if p.scheduled {
                        return Ok(None);
                    }
                    p.scheduled = true;
                    Some(p.interval - since)
                }
                _ => {
                    p.last = Some(std::time::Instant::now());
                    None
                }
            }
        };
        let Some(wait) = wait else {
            return Ok(Some(self.store.gc(&self.keep_set()).await?));
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Ok(mut p) = this.gc_pacing.lock() {
                p.scheduled = false;
                p.last = Some(std::time::Instant::now());
            }
            match this.store.gc(&this.keep_set()).await {
                Ok(report) => tracing::info!(
                    deleted = report.chunks_deleted,
                    kept = report.chunks_kept,
                    "deferred garbage collection after prunes"
                ),
                Err(e) => tracing::warn!("deferred garbage collection failed: {e:#}"),
            }
        });
        Ok(None)
    }

    /// Sets the transport key that opens recovery keys sealed by the vault.
    pub fn set_transport_key(&self, key: TransportKey) {
        let _ = self.transport.set(key);
    }

    /// The store handle a task reads data through: for an encrypted store,
    /// opened with the recovery key the vault sealed to this agent for this
    /// task only.
    fn reading_store(
        &self,
        sealed: Option<&siterec_core::wire::SealedKey>,
    ) -> anyhow::Result<Store> {
        let Some(sealed) = sealed else {
            return Ok(self.store.clone());
        };
        use base64::Engine;
        let transport = self.transport.get().context(
            "this agent has no transport key to open the recovery key with (DATA/identity/transport.key)",
        )?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(&sealed.0)
            .context("the sealed recovery key is not base64")?;
        let mut bytes = transport
            .open(&blob)
            .context("opening the recovery key the vault sealed to this agent")?;
        let key = RecoveryKey::from_file_bytes(&bytes);
        bytes.fill(0);
        let key = key.context("the recovery key given for the failover")?;
        Ok(self.store.with_recovery_key(&key)?)
    }

    /// Replaces the item → source agent map (from each heartbeat).
    pub fn set_sources(&self, sources: impl IntoIterator<Item = (String, String)>) {
        if let Ok(mut m) = self.sources.lock() {
            *m = sources.into_iter().collect();
        }
    }

    /// Only the item's source agent may write it.
    fn check_peer(&self, peer: &PeerIdentity, item: &str) -> Result<(), DataError> {
        let Some(cn) = peer.0.as_deref() else {
            return Err(DataError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a client certificate issued by the vault is required",
            ));
        };
        let allowed = self
            .sources
            .lock()
            .map(|m| m.get(item).is_some_and(|s| s == cn))
            .unwrap_or(false);
        if allowed {
            Ok(())
        } else {
            Err(DataError::new(
                StatusCode::FORBIDDEN,
                "NotTheSource",
                format!(
                    "agent {cn} is not the replication source of item '{item}' (as far as the vault has told this agent)"
                ),
            ))
        }
    }

    fn remember(&self, item: &str, id: ChunkId) {
        if let Ok(mut m) = self.in_flight.lock() {
            m.entry(item.to_string()).or_default().insert(id);
        }
    }

    fn keep_set(&self) -> HashSet<ChunkId> {
        self.in_flight
            .lock()
            .map(|m| m.values().flat_map(|s| s.iter().copied()).collect())
            .unwrap_or_default()
    }
}

/// Opens the encrypted store with the agent's credential. The first time
/// (no credential, no store yet), creates it: a new recovery key is written
/// to `recovery_key_export` (once, mode 0600; the operator keeps it), the
/// credential to `DATA/store.credential`, then the store. If a previous
/// attempt stopped after writing the recovery key, that key is used (the
/// operator may already hold it) rather than written again.
async fn open_encrypted(
    backend: Arc<dyn siterec_store::Backend>,
    enc: &StoreEncryption,
    what: &str,
) -> anyhow::Result<Store> {
    let cred_path = &enc.credential;
    if cred_path.exists() {
        let credential = StoreCredential::read_file(cred_path)
            .with_context(|| format!("reading the store credential {}", cred_path.display()))?;
        return Store::open_or_create_with_credential(backend, Some(credential))
            .await
            .with_context(|| {
                format!(
                    "opening the encrypted replica store on {what} with the credential {}",
                    cred_path.display()
                )
            });
    }
    if backend.exists(STORE_INFO_KEY).await? {
        anyhow::bail!(
            "the replica store on {what} already exists, and its credential {} is missing: restore that file (written when the store was created), or point the agent at a new, empty store",
            cred_path.display()
        );
    }
    let export = &enc.recovery_key_export;
    let key = if export.exists() {
        let key = RecoveryKey::read_file(export).with_context(|| {
            format!(
                "{} exists but is not a usable recovery key; move it away so that a new store's recovery key can be written there",
                export.display()
            )
        })?;
        tracing::warn!(key = %export.display(), key_id = %key.key_id(), "creating the encrypted store for the recovery key already at recovery_key_export");
        key
    } else {
        let key = RecoveryKey::generate()?;
        key.write_file(export).with_context(|| {
            format!(
                "writing the recovery key to {} (recovery_key_export)",
                export.display()
            )
        })?;
        key
    };
    let credential = key.credential();
    let key_id = key.key_id();
    drop(key);
    if let Some(dir) = cred_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    siterec_pki::write_file_durable(cred_path, &credential.to_file_bytes(), 0o600)
        .with_context(|| format!("writing the store credential {}", cred_path.display()))?;
    let store = Store::open_or_create_with_credential(backend, Some(credential))
        .await
        .with_context(|| format!("creating the encrypted replica store on {what}"))?;
    tracing::warn!(
        recovery_key = %export.display(),
        %key_id,
        "created an encrypted replica store: its recovery key was written to this file. Move it off this host and keep it safe: this agent cannot read the data, and failover needs the file"
    );
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::endpoint::*;
    use super::*;
    use siterec_core::Consistency;
    use siterec_store::{DiskManifest, encode_chunk};

    /// A target on a local store in a fresh directory (kept alive by the
    /// returned guard).
    async fn new_target() -> (tempfile::TempDir, Arc<Target>) {
        let dir = tempfile::tempdir().unwrap();
        let t = Target::open(&dir.path().join("store"), dir.path().join("failover"))
            .await
            .unwrap();
        (dir, t)
    }

    const CS: usize = 64 * 1024;

    async fn put(t: &Target, data: &[u8]) -> ChunkId {
        let enc = encode_chunk(data, true);
        t.store.put_encoded_chunk(enc.id, enc.bytes).await.unwrap();
        enc.id
    }

    fn manifest(point: &str, size: u64, chunks: Vec<Option<ChunkId>>) -> Manifest {
        Manifest {
            item: "web01".into(),
            point_id: point.into(),
            created_at_unix_ms: 1,
            consistency: Consistency::CrashConsistent,
            disks: vec![DiskManifest {
                disk_id: "disk0".into(),
                size,
                chunk_size: CS as u32,
                chunks,
            }],
            bases: Default::default(),
        }
    }

    #[tokio::test]
    async fn chunk_batches_store_each_chunk_or_say_what_is_wrong() {
        let (_dir, t) = new_target().await;
        t.set_sources([("web01".to_string(), "agent-a".to_string())]);
        let send = |body: Vec<u8>| {
            put_chunk_batch(
                State(t.clone()),
                Extension(PeerIdentity(Some("agent-a".into()))),
                UrlPath("web01".to_string()),
                Bytes::from(body),
            )
        };
        let base: Vec<u8> = (0..CS as u32).map(|i| (i % 253) as u8 + 1).collect();
        let other = vec![b'x'; CS];
        let mut changed = base.clone();
        changed[4096..8192].fill(7);
        let whole = encode_chunk(&base, true);
        let whole2 = encode_chunk(&other, true);
        let target = ChunkId::of(&changed);
        let delta = siterec_store::encode_delta_chunk(
            target,
            CS as u32,
            whole.id,
            &[(1, &changed[4096..8192])],
            true,
        );
        // Wholes first (their own batch), then the delta on one of them.
        let ok = send(crate::batch::encode(&[
            (whole.id, whole.bytes.clone()),
            (whole2.id, whole2.bytes.clone()),
        ]))
        .await
        .map_err(|e| e.message)
        .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        send(crate::batch::encode(&[(delta.id, delta.bytes.clone())]))
            .await
            .map_err(|e| e.message)
            .unwrap();
        assert_eq!(t.store.get_chunk(delta.id).await.unwrap(), changed);
        assert_eq!(t.store.get_chunk(whole2.id).await.unwrap(), other);

        // A delta on a base the target lacks: 409, the source resyncs.
        let lost = ChunkId::of(b"never stored");
        let orphan = siterec_store::encode_delta_chunk(
            target,
            CS as u32,
            lost,
            &[(1, &changed[4096..8192])],
            true,
        );
        let err = send(crate::batch::encode(&[(orphan.id, orphan.bytes)]))
            .await
            .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::CONFLICT, "MissingBase")
        );
        // Bytes that are not what their (new) id says, and a damaged
        // body: 400.
        let claimed = ChunkId::of(b"some other content");
        let err = send(crate::batch::encode(&[(claimed, whole.bytes.clone())]))
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST, "{}", err.message);
        let mut body = crate::batch::encode(&[(whole.id, whole.bytes)]);
        body.truncate(body.len() - 1);
        let err = send(body).await.unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("truncated"), "{}", err.message);
    }

    #[tokio::test]
    async fn single_chunk_puts_are_checked_stored_and_bounded() {
        let (dir, t) = new_target().await;
        t.set_sources([("web01".to_string(), "agent-a".to_string())]);
        let send = |id: ChunkId, body: Vec<u8>, declared: bool| {
            let mut headers = axum::http::HeaderMap::new();
            if declared {
                headers.insert(axum::http::header::CONTENT_LENGTH, body.len().into());
            }
            put_chunk(
                State(t.clone()),
                Extension(PeerIdentity(Some("agent-a".into()))),
                UrlPath(("web01".to_string(), id.to_hex())),
                headers,
                axum::body::Body::from(body),
            )
        };
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let enc = encode_chunk(&data, true);
        assert_eq!(
            send(enc.id, enc.bytes.clone(), true)
                .await
                .map_err(|e| e.message)
                .unwrap(),
            StatusCode::CREATED
        );
        t.store.sync().await.unwrap();
        // Where the object lies (a file, an offset in it) shows whether it
        // was written again.
        let key = t.store.chunk_object_key(&enc.id);
        let inode = || {
            use std::os::unix::fs::MetadataExt;
            let (path, at, _) = siterec_store::LocalDir::new(dir.path().join("store"))
                .unwrap()
                .locate(&key)
                .unwrap()
                .unwrap();
            (std::fs::metadata(path).unwrap().ino(), at)
        };
        let first = inode();
        // Sent again: 200 if the target knows it has it; 201 if only the
        // writer thread finds it on disk (the answer does not wait for a
        // directory lookup). Either way it is not written again.
        let again = send(enc.id, enc.bytes.clone(), false)
            .await
            .map_err(|e| e.message)
            .unwrap();
        assert!(
            matches!(again, StatusCode::OK | StatusCode::CREATED),
            "{again}"
        );
        t.store.sync().await.unwrap();
        assert_eq!(inode(), first, "a stored chunk is not written again");
        assert_eq!(t.store.get_chunk(enc.id).await.unwrap(), data);

        // Bytes that are not what the id says: 400, nothing stored.
        let claimed = ChunkId::of(b"some other content");
        let err = send(claimed, enc.bytes.clone(), true).await.unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST, "{}", err.message);
        assert!(!t.store.has_chunk(claimed).await.unwrap());

        // Too long, declared or found while reading: 413, nothing stored.
        let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
        let big_id = ChunkId::of(&big);
        let mut object = encode_chunk(&big[..1 << 20], false).bytes;
        object.resize(MAX_CHUNK_UPLOAD + 1, 1);
        for declared in [true, false] {
            let err = send(big_id, object.clone(), declared).await.unwrap_err();
            assert_eq!(
                (err.status, err.code),
                (StatusCode::PAYLOAD_TOO_LARGE, "TooLarge"),
                "{}",
                err.message
            );
            assert!(err.message.contains(&MAX_CHUNK_UPLOAD.to_string()));
            assert!(!t.store.has_chunk(big_id).await.unwrap());
        }
    }

    #[tokio::test]
    async fn only_the_items_source_agent_may_write_it() {
        let (_dir, t) = new_target().await;
        let peer = |cn: Option<&str>| PeerIdentity(cn.map(str::to_string));
        // Before the vault has said anything, nobody may write.
        assert_eq!(
            t.check_peer(&peer(Some("agent-a")), "web01")
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        t.set_sources([("web01".to_string(), "agent-a".to_string())]);
        assert!(t.check_peer(&peer(Some("agent-a")), "web01").is_ok());
        let err = t.check_peer(&peer(Some("agent-b")), "web01").unwrap_err();
        assert_eq!(err.status, StatusCode::FORBIDDEN);
        assert!(err.message.contains("agent-b") && err.message.contains("web01"));
        assert_eq!(
            t.check_peer(&peer(Some("agent-a")), "db01")
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            t.check_peer(&peer(None), "web01").unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        // The map is replaced, not merged.
        t.set_sources([("db01".to_string(), "agent-a".to_string())]);
        assert!(t.check_peer(&peer(Some("agent-a")), "web01").is_err());
    }

    /// Prunes close together delete their points at once but collect the
    /// chunks once per interval: the first prune collects, the next ones
    /// leave it to one collection after the interval.
    #[tokio::test]
    async fn garbage_collection_after_prunes_is_paced() {
        let (_dir, t) = new_target().await;
        t.set_gc_interval(std::time::Duration::from_millis(700));
        let blocks: Vec<Vec<u8>> = (1..=4u8).map(|k| vec![k; CS]).collect();
        let mut ids = Vec::new();
        for (k, b) in blocks.iter().enumerate() {
            let id = put(&t, b).await;
            ids.push(id);
            t.store
                .commit_point(&manifest(&format!("p{k}"), CS as u64, vec![Some(id)]))
                .await
                .unwrap();
        }
        let prune = |p: &str| TaskWork::Prune {
            item: "web01".into(),
            point_ids: vec![p.into()],
        };
        let out = t.run_task(&prune("p0")).await.unwrap();
        assert_eq!(out["chunksDeleted"], 1, "{out}");
        assert!(!t.store.has_chunk(ids[0]).await.unwrap());
        for p in ["p1", "p2"] {
            let out = t.run_task(&prune(p)).await.unwrap();
            assert_eq!(out["garbageCollection"], "deferred", "{out}");
        }
        let points = t.store.list_points(Some("web01")).await.unwrap();
        assert_eq!(points.len(), 1, "the points go at once");
        assert!(
            t.store.has_chunk(ids[1]).await.unwrap(),
            "their chunks wait"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        for id in &ids[1..3] {
            assert!(!t.store.has_chunk(*id).await.unwrap(), "collected later");
        }
        assert!(t.store.has_chunk(ids[3]).await.unwrap());
        assert!(t.store.verify().await.unwrap().all_ok());
    }

    #[tokio::test]
    async fn materializes_points_as_images_and_prunes_with_gc() {
        let (_dir, t) = new_target().await;
        let a = vec![b'a'; CS];
        let b: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8 + 1).collect(); // short last block
        let c: Vec<u8> = (0..CS as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let size = (2 * CS + b.len()) as u64;
        let (ia, ib, ic) = (put(&t, &a).await, put(&t, &b).await, put(&t, &c).await);
        t.store
            .commit_point(&manifest("p1", size, vec![Some(ia), None, Some(ib)]))
            .await
            .unwrap();
        t.store
            .commit_point(&manifest("p2", size, vec![Some(ia), Some(ic), None]))
            .await
            .unwrap();

        let out = t
            .run_task(&TaskWork::Materialize {
                item: "web01".into(),
                point_id: "p1".into(),
                formats: vec![
                    "raw".into(),
                    "qcow2".into(),
                    "vhd-dynamic".into(),
                    "vhd-fixed".into(),
                ],
                sealed_key: None,
            })
            .await
            .unwrap();
        let disks: Vec<MaterializedDisk> = serde_json::from_value(out).unwrap();
        assert_eq!(disks.len(), 4);
        let raw = disks.iter().find(|d| d.format == "raw").unwrap();
        let mut expected = a.clone();
        expected.extend(vec![0u8; CS]);
        expected.extend(&b);
        assert_eq!(std::fs::read(&raw.path).unwrap(), expected);
        // qemu-img judges every other format against the raw image (a VHD
        // is rounded up to whole MiB; the tail must read as zeros).
        for (format, driver) in [
            ("qcow2", "qcow2"),
            ("vhd-dynamic", "vpc"),
            ("vhd-fixed", "vpc"),
        ] {
            let image = disks.iter().find(|d| d.format == format).unwrap();
            let cmp = std::process::Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", driver, &raw.path, &image.path])
                .status()
                .expect("qemu-img (install qemu-utils)");
            assert!(cmp.success(), "{format} differs from raw");
        }
        let err = t
            .run_task(&TaskWork::Materialize {
                item: "web01".into(),
                point_id: "p1".into(),
                formats: vec!["vmdk".into()],
                sealed_key: None,
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown image format 'vmdk'"),
            "{err}"
        );

        // A chunk still being uploaded for the next point survives gc.
        let d = vec![b'd'; CS];
        let id_d = put(&t, &d).await;
        t.remember("web01", id_d);
        t.run_task(&TaskWork::Prune {
            item: "web01".into(),
            point_ids: vec!["p1".into()],
        })
        .await
        .unwrap();
        let points: Vec<String> = t
            .store
            .list_points(Some("web01"))
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.point_id)
            .collect();
        assert_eq!(points, ["p2"]);
        assert!(
            !t.store.has_chunk(ib).await.unwrap(),
            "the chunk only p1 used is collected"
        );
        assert!(t.store.has_chunk(ia).await.unwrap() && t.store.has_chunk(ic).await.unwrap());
        assert!(
            t.store.has_chunk(id_d).await.unwrap(),
            "in-flight chunk kept"
        );
        assert!(t.store.verify().await.unwrap().all_ok());
    }

    /// An encrypted target writes with its credential only; materializing
    /// needs the recovery key the vault sealed to its transport key, and
    /// without it nothing is written.
    #[tokio::test]
    async fn encrypted_materialize_needs_the_sealed_recovery_key() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("operator-recovery.key");
        let enc = StoreEncryption {
            credential: dir.path().join("data/store.credential"),
            recovery_key_export: export.clone(),
        };
        let backend = BackendConfig::Local {
            path: dir.path().join("store"),
        };
        let failover = dir.path().join("failover");
        let t = Target::open_backend(Some(&enc), &backend, failover.clone())
            .await
            .unwrap();
        let transport = TransportKey::generate().unwrap();
        t.set_transport_key(transport.clone());
        assert!(t.store.is_encrypted() && !t.store.can_read_data());
        let key = RecoveryKey::read_file(&export).unwrap();
        assert_eq!(t.store.key_id(), Some(key.key_id()));
        let a: Vec<u8> = (0..CS as u32).map(|i| (i % 251) as u8 + 1).collect();
        let ia = put(&t, &a).await;
        t.store
            .commit_point(&manifest("p1", CS as u64, vec![Some(ia)]))
            .await
            .unwrap();
        let work = |sealed_key| TaskWork::Materialize {
            item: "web01".into(),
            point_id: "p1".into(),
            formats: vec!["raw".into()],
            sealed_key,
        };
        let err = t.run_task(&work(None)).await.unwrap_err();
        assert!(format!("{err:#}").contains("recovery key"), "{err:#}");
        assert!(!failover.join("web01").exists(), "nothing is written");

        // Sealed to another agent: refused.
        let other = TransportKey::generate().unwrap();
        let seal = |to: &TransportKey| {
            let blob =
                siterec_store::seal_for_transport(&to.public_key_base64(), &key.to_file_bytes())
                    .unwrap();
            Some(siterec_core::wire::SealedKey(
                base64::engine::general_purpose::STANDARD.encode(blob),
            ))
        };
        assert!(t.run_task(&work(seal(&other))).await.is_err());
        let out = t.run_task(&work(seal(&transport))).await.unwrap();
        let disks: Vec<MaterializedDisk> = serde_json::from_value(out).unwrap();
        assert_eq!(std::fs::read(&disks[0].path).unwrap(), a);
        // The handle the agent keeps still cannot read.
        assert!(matches!(
            t.store.get_chunk(ia).await,
            Err(StoreError::RecoveryKeyRequired { .. })
        ));

        // Reopening uses the credential; the recovery key file is never
        // written again.
        drop(t);
        std::fs::remove_file(&export).unwrap();
        let t = Target::open_backend(Some(&enc), &backend, failover)
            .await
            .unwrap();
        assert_eq!(t.store.key_id(), Some(key.key_id()));
        assert!(!export.exists());
    }
}
