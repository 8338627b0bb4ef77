//! The tasks the vault gives a recovery-site agent: offline import,
//! materialize, prune, verify.

use super::*;

impl Target {
    /// Imports offline initial copies: for each item, the points exported
    /// by its source agent (the spool layout, see `crate::spool`) that the
    /// operator copied to `import_path/ITEM`. Every chunk is verified
    /// against its name as it is stored; a point is committed only once
    /// all of its chunks are in. Points already in the store are skipped,
    /// so importing again is harmless. Returns the points committed.
    pub async fn import_offline(
        &self,
        item: &str,
        import_path: &Path,
    ) -> anyhow::Result<Vec<String>> {
        let spool = crate::spool::Spool::new(import_path.join(item));
        let mut imported = Vec::new();
        for entry in spool.entries()? {
            let path = entry.manifest_path();
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let manifest = Manifest::decode_named(&path.display().to_string(), &bytes)?;
            if manifest.item != item {
                anyhow::bail!(
                    "{} holds a point of item '{}', not '{item}': copy each item's export to IMPORT_PATH/ITEM",
                    path.display(),
                    manifest.item
                );
            }
            if self
                .store
                .read_manifest(item, &manifest.point_id)
                .await
                .is_ok()
            {
                continue;
            }
            for (name, chunk) in entry.chunks()? {
                let id: ChunkId = name.parse().map_err(|e| {
                    anyhow::anyhow!("{} is not named by a chunk id: {e}", chunk.display())
                })?;
                self.remember(item, id);
                let data = tokio::fs::read(&chunk)
                    .await
                    .with_context(|| format!("reading {}", chunk.display()))?;
                self.store
                    .put_encoded_chunk(id, data)
                    .await
                    .with_context(|| format!("importing {}", chunk.display()))?;
            }
            self.store
                .commit_point(&manifest)
                .await
                .with_context(|| format!("committing the imported point {}", manifest.point_id))?;
            if let Ok(mut m) = self.in_flight.lock() {
                m.remove(item);
            }
            tracing::info!(item, point = %manifest.point_id, from = %entry.dir.display(), "offline initial copy imported");
            imported.push(manifest.point_id);
        }
        Ok(imported)
    }

    /// Runs one task from the vault; the result's `output` is JSON.
    pub async fn run_task(self: &Arc<Self>, work: &TaskWork) -> anyhow::Result<serde_json::Value> {
        match work {
            TaskWork::Materialize {
                item,
                point_id,
                formats,
                sealed_key,
            } => {
                // The recovery key lives in this handle only, for this task.
                let store = self.reading_store(sealed_key.as_ref())?;
                let disks = self
                    .materialize_from(&store, item, point_id, formats)
                    .await?;
                Ok(serde_json::to_value(disks)?)
            }
            TaskWork::MaterializeTest {
                item,
                point_id,
                formats,
                sealed_key,
            } => {
                siterec_core::names::check_name("protected item", item)?;
                let store = self.reading_store(sealed_key.as_ref())?;
                let dir = self.test_dir(item);
                let disks = self
                    .materialize_into(&store, item, point_id, formats, &dir)
                    .await?;
                Ok(serde_json::to_value(disks)?)
            }
            TaskWork::RemoveTestDisks { item } => {
                siterec_core::names::check_name("protected item", item)?;
                let dir = self.test_dir(item);
                let removed = match std::fs::remove_dir_all(&dir) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing {}", dir.display()));
                    }
                };
                tracing::info!(item, dir = %dir.display(), removed, "test failover disks removed");
                Ok(serde_json::json!({ "removed": removed, "dir": dir }))
            }
            TaskWork::Verify => self.verify().await,
            TaskWork::StartReplica {
                item,
                point_id,
                vm_name,
                test,
                vm,
                nics,
                sealed_key,
            } => {
                let store = self.reading_store(sealed_key.as_ref())?;
                let started = self
                    .compute
                    .start_replica(
                        &store,
                        crate::compute::ReplicaRequest {
                            item,
                            point_id,
                            vm_name,
                            test: *test,
                            vm,
                            nics,
                        },
                    )
                    .await?;
                Ok(serde_json::to_value(started)?)
            }
            TaskWork::RemoveReplica { item, vm_name } => {
                self.compute.remove_replica(item, vm_name).await?;
                Ok(serde_json::json!({ "removed": vm_name }))
            }
            TaskWork::DeleteReplica { item } => self.delete_replica(item).await,
            TaskWork::SeedReplica {
                item,
                machine,
                seed_id,
            } => self.seed_replica(item, machine, seed_id).await,
            TaskWork::WriteBack {
                item,
                machine,
                point_id,
                sealed_key,
            } => {
                let store = self.reading_store(sealed_key.as_ref())?;
                let disks = self.write_back(&store, item, machine, point_id).await?;
                Ok(serde_json::to_value(disks)?)
            }
            TaskWork::StopVm {
                vm_name,
                timeout_secs,
                force,
                ..
            } => {
                self.compute
                    .host()
                    .stop_vm(
                        vm_name,
                        std::time::Duration::from_secs(u64::from(*timeout_secs)),
                        *force,
                    )
                    .await
            }
            // Run by the agent's task loop (lib.rs), store or not.
            TaskWork::RunScript { .. } => {
                anyhow::bail!("a recovery plan's script is run by the agent, not its store")
            }
            TaskWork::Prune { item, point_ids } => {
                for p in point_ids {
                    self.store.delete_point(item, p).await?;
                }
                Ok(match self.collect_after_prune().await? {
                    Some(report) => serde_json::json!({
                        "deletedPoints": point_ids,
                        "chunksDeleted": report.chunks_deleted,
                        "chunksKept": report.chunks_kept,
                    }),
                    None => serde_json::json!({
                        "deletedPoints": point_ids,
                        "garbageCollection": "deferred",
                    }),
                })
            }
        }
    }

    /// Where a physical server's test failover writes its disks: apart from
    /// the failover disks (a dot name is never an item's).
    pub fn test_dir(&self, item: &str) -> PathBuf {
        self.failover_dir.join(".test").join(item)
    }

    /// Deletes everything this agent keeps of `item`: its replica VMs, its
    /// failover disks and every recovery point, then collects the chunks
    /// no other point references. Idempotent: what is already gone is
    /// skipped.
    async fn delete_replica(self: &Arc<Self>, item: &str) -> anyhow::Result<serde_json::Value> {
        siterec_core::names::check_name("protected item", item)?;
        let vms = self.compute.remove_replicas_of(item).await?;
        let dir = self.failover_dir.join(item);
        let disks_deleted = match std::fs::remove_dir_all(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        };
        let test = self.test_dir(item);
        match std::fs::remove_dir_all(&test) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", test.display())),
        }
        let points = self.store.list_points(Some(item)).await?;
        for p in &points {
            self.store.delete_point(item, &p.point_id).await?;
        }
        let gc = self.collect_after_prune().await?;
        tracing::info!(item, points = points.len(), "replica deleted");
        Ok(serde_json::json!({
            "deletedPoints": points.iter().map(|p| p.point_id.clone()).collect::<Vec<_>>(),
            "deletedVms": vms,
            "failoverDisksDeleted": disks_deleted,
            "garbageCollection": if gc.is_some() { "done" } else { "deferred" },
        }))
    }

    /// Verifies the whole store. Chunks found damaged are removed: they are
    /// useless, and while they exist the store would vouch for them and new
    /// points would keep referencing them. With them gone, the next commit
    /// that needs one is refused as missing and the source resynchronizes,
    /// sending the data again. Damaged points stay damaged and are reported.
    async fn verify(&self) -> anyhow::Result<serde_json::Value> {
        let report = self.store.verify().await?;
        let damaged: HashSet<ChunkId> = report
            .points
            .iter()
            .flat_map(|p| p.damaged_chunks.iter().copied())
            .collect();
        let mut removed = Vec::new();
        for id in damaged {
            // Checked as far as the agent can (integrity, without the
            // recovery key in an encrypted store).
            if let Err(StoreError::CorruptChunk { .. }) = self.store.check_chunk(id).await {
                self.store
                    .backend()
                    .delete(&self.store.chunk_object_key(&id))
                    .await?;
                tracing::warn!(chunk = %id, "removed a damaged chunk from the replica store");
                removed.push(id.to_hex());
            }
        }
        if !removed.is_empty() {
            // Removed for good: back after a crash, a damaged chunk would
            // be vouched for again (a pack's index forgets it only here).
            self.store.sync().await?;
        }
        let mut v = serde_json::to_value(&report)?;
        v["removed_chunks"] = serde_json::json!(removed);
        Ok(v)
    }

    /// Writes every disk of a recovery point as images, one file per disk
    /// and format, under `failover_dir/ITEM/`. Each file is written under a
    /// temporary name, synced, then renamed: a crash never leaves a
    /// half-written image under the final name.
    pub async fn materialize(
        &self,
        item: &str,
        point_id: &str,
        formats: &[String],
    ) -> anyhow::Result<Vec<MaterializedDisk>> {
        self.materialize_from(&self.store, item, point_id, formats)
            .await
    }

    /// [`Target::materialize`] of an encrypted store with its recovery key
    /// in hand (the operator's, as `siterec bench` holds it).
    pub async fn materialize_with_key(
        &self,
        key: &RecoveryKey,
        item: &str,
        point_id: &str,
        formats: &[String],
    ) -> anyhow::Result<Vec<MaterializedDisk>> {
        let store = self.store.with_recovery_key(key)?;
        self.materialize_from(&store, item, point_id, formats).await
    }

    /// [`Target::materialize`] reading through `store` (a handle with the
    /// recovery key for an encrypted store).
    async fn materialize_from(
        &self,
        store: &Store,
        item: &str,
        point_id: &str,
        formats: &[String],
    ) -> anyhow::Result<Vec<MaterializedDisk>> {
        if !store.can_read_data() {
            // Before any file is created.
            return Err(StoreError::RecoveryKeyRequired {
                key_id: store.key_id().unwrap_or_default(),
            }
            .into());
        }
        self.materialize_into(
            store,
            item,
            point_id,
            formats,
            &self.failover_dir.join(item),
        )
        .await
    }

    /// Writes a point's disks as images into `dir` (see
    /// [`Target::materialize`]).
    pub(crate) async fn materialize_into(
        &self,
        store: &Store,
        item: &str,
        point_id: &str,
        formats: &[String],
        dir: &Path,
    ) -> anyhow::Result<Vec<MaterializedDisk>> {
        if !store.can_read_data() {
            return Err(StoreError::RecoveryKeyRequired {
                key_id: store.key_id().unwrap_or_default(),
            }
            .into());
        }
        let manifest = store.read_manifest(item, point_id).await?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut out = Vec::new();
        for (di, disk) in manifest.disks.iter().enumerate() {
            let mut images = Vec::new();
            for format in formats {
                let fmt: ImageFormat = format.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "unknown image format '{format}': use raw, qcow2, vhd-fixed or vhd-dynamic"
                    )
                })?;
                // Both VHD kinds end in .vhd: the fixed one is named apart.
                let name = match fmt {
                    ImageFormat::VhdFixed => format!("{}.fixed.vhd", disk.disk_id),
                    _ => format!("{}.{}", disk.disk_id, fmt.extension()),
                };
                let tmp = dir.join(format!(".{name}.partial"));
                images.push((fmt, dir.join(&name), tmp));
            }
            let targets: Vec<(ImageFormat, PathBuf)> =
                images.iter().map(|(f, _, t)| (*f, t.clone())).collect();
            if let Err(e) = write_images(store, &manifest, di, &targets).await {
                for (_, _, tmp) in &images {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e);
            }
            for (fmt, path, tmp) in images {
                std::fs::rename(&tmp, &path)
                    .with_context(|| format!("renaming into {}", path.display()))?;
                out.push(MaterializedDisk {
                    disk: disk.disk_id.clone(),
                    format: fmt.as_str().into(),
                    path: path.display().to_string(),
                    size_bytes: disk.size,
                    bytes_written: None,
                });
            }
            std::fs::File::open(dir)?.sync_all()?;
        }
        let _ = item;
        Ok(out)
    }
}

/// Blocks fetched and decoded ahead of the image writer.
const WRITE_AHEAD: usize = 8;

/// Writes disk `disk_index` of a point as each of `targets` (format, path)
/// from one read of the store: each block is fetched and decoded once and
/// handed to every image's writer, each writing on a thread of its own
/// (direct writes wait for the device) while the blocks ahead of them are
/// fetched and decoded. Every image is synced before this returns.
async fn write_images(
    store: &Store,
    manifest: &Manifest,
    disk_index: usize,
    targets: &[(ImageFormat, PathBuf)],
) -> anyhow::Result<()> {
    let size = manifest.disks[disk_index].size;
    let mut senders = Vec::new();
    let mut writers = Vec::new();
    for (fmt, path) in targets {
        let (fmt, path) = (*fmt, path.clone());
        let mut writer =
            tokio::task::spawn_blocking(move || create_writer(fmt, &path, size)).await??;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Arc<Vec<u8>>)>(WRITE_AHEAD);
        writers.push(tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            while let Some((offset, data)) = rx.blocking_recv() {
                // Each block once, into a new image: its zero pages
                // may stay holes.
                writer.write_new_at(offset, &data)?;
            }
            Ok(writer)
        }));
        senders.push(tx);
    }
    let reading = async {
        let mut reader = store.read_disk(manifest, disk_index, 8)?;
        while let Some(block) = reader.next().await {
            let block = block?;
            if let Some(data) = block.data {
                let data = Arc::new(data);
                for tx in &senders {
                    if tx.send((block.offset, data.clone())).await.is_err() {
                        // A writer failed: its error is reported below.
                        return anyhow::Ok(());
                    }
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(senders);
    let mut done = Vec::new();
    for w in writers {
        done.push(w.await?);
    }
    reading?;
    let mut finishing = Vec::new();
    for writer in done {
        let writer = writer?;
        finishing.push(tokio::task::spawn_blocking(move || writer.finish()));
    }
    for f in finishing {
        f.await??;
    }
    Ok(())
}
