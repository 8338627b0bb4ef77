//! The target side of coming back home: seeding the store with the disks
//! this site still has before a reprotect, and writing a point back onto a
//! machine's own disks in place at failback. Both compare block hashes
//! first, so what is read from the network or written to the disk is only
//! what differs. Disks are raw files or devices, or a VM's qcow2 images
//! (through `qemu-nbd`, see [`crate::image`]).

use siterec_qemu::DiskFormat;
use siterec_store::{DiskManifest, Manifest};

use super::*;
use crate::image::DiskImage;
use crate::limits::CHUNK_SIZE;

/// A disk of a machine this agent has locally: its name, path and format
/// (a physical server's disks are raw; a VM's may be qcow2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDisk {
    pub name: String,
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// What a seed put into the store.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SeedReport {
    seed_point: String,
    disks: Vec<String>,
    blocks: u64,
    zero_blocks: u64,
    /// Blocks whose chunk the store did not hold yet.
    chunks_stored: u64,
    bytes_read: u64,
}

impl Target {
    /// The machines of this agent's own config (`[[machines]]` and
    /// `[[vms]]`), by name: what a seed reads and a failback writes.
    pub fn set_local_machines(&self, machines: HashMap<String, Vec<LocalDisk>>) {
        if let Ok(mut m) = self.local_machines.lock() {
            *m = machines;
        }
    }

    fn local_disks(&self, machine: &str) -> Option<Vec<LocalDisk>> {
        self.local_machines
            .lock()
            .ok()
            .and_then(|m| m.get(machine).cloned())
    }

    /// The disks of `machine` here: this agent's own machine of that name,
    /// else the disks of the item's replica VM, else the item's failover
    /// disks (raw images) written at failover.
    fn seed_disks(&self, item: &str, machine: &str) -> anyhow::Result<Vec<LocalDisk>> {
        if let Some(d) = self.local_disks(machine) {
            return Ok(d);
        }
        if let Some(disks) = self.compute.replica_disks_of(item) {
            return Ok(disks
                .into_iter()
                .map(|d| LocalDisk {
                    name: d.name,
                    path: d.path,
                    format: d.format,
                })
                .collect());
        }
        let dir = self.failover_dir.join(item);
        let mut disks = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                anyhow::bail!(
                    "this agent has neither a machine '{machine}' in its config nor failover disks of item '{item}' ({}): nothing to reprotect from here",
                    dir.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for e in entries {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let raw = format!(".{}", ImageFormat::Raw.extension());
            if let Some(disk) = name.strip_suffix(raw.as_str())
                && !name.starts_with('.')
            {
                disks.push(LocalDisk {
                    name: disk.to_string(),
                    path: path.clone(),
                    format: DiskFormat::Raw,
                });
            }
        }
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        if disks.is_empty() {
            anyhow::bail!("no raw failover disk of item '{item}' in {}", dir.display());
        }
        Ok(disks)
    }

    /// Puts every block of the machine's disks here into the store (each
    /// only if its chunk is not there yet) and commits them as point
    /// `seed_id` of `item`, a point the vault does not list: it keeps them
    /// until the reprotect's first point holds them, then the job removes
    /// it. The new source, starting over, asks for each block's chunk and
    /// sends only those missing — the blocks that differ. Idempotent: a
    /// seed already committed is answered as it is.
    pub(crate) async fn seed_replica(
        self: &Arc<Self>,
        item: &str,
        machine: &str,
        seed_id: &str,
    ) -> anyhow::Result<serde_json::Value> {
        siterec_core::names::check_name("protected item", item)?;
        if self.store.read_manifest(item, seed_id).await.is_ok() {
            return Ok(serde_json::json!({ "seedPoint": seed_id, "alreadySeeded": true }));
        }
        let disks = self.seed_disks(item, machine)?;
        let mut report = SeedReport {
            seed_point: seed_id.to_string(),
            ..Default::default()
        };
        let mut manifest = Manifest {
            item: item.to_string(),
            point_id: seed_id.to_string(),
            created_at_unix_ms: crate::util::now_ms(),
            consistency: siterec_core::Consistency::CrashConsistent,
            disks: Vec::new(),
            bases: Default::default(),
        };
        for disk in &disks {
            let (chunks, size) = self.seed_disk(item, disk, &mut report).await?;
            manifest.disks.push(DiskManifest {
                disk_id: disk.name.clone(),
                size,
                chunk_size: CHUNK_SIZE,
                chunks,
            });
            report.disks.push(disk.name.clone());
        }
        self.store
            .commit_point(&manifest)
            .await
            .with_context(|| format!("committing the seed point {seed_id}"))?;
        if let Ok(mut m) = self.in_flight.lock() {
            m.remove(item);
        }
        tracing::info!(
            item,
            seed = seed_id,
            blocks = report.blocks,
            stored = report.chunks_stored,
            "replica store seeded"
        );
        Ok(serde_json::to_value(report)?)
    }

    /// Seeds one disk; answers its chunks and its size. Blocks are hashed
    /// and stored a few at a time, beside the read of the next ones.
    async fn seed_disk(
        self: &Arc<Self>,
        item: &str,
        disk: &LocalDisk,
        report: &mut SeedReport,
    ) -> anyhow::Result<(Vec<Option<ChunkId>>, u64)> {
        let image = DiskImage::open(&disk.path, disk.format, false).await?;
        let size = image.size();
        let blocks = size.div_ceil(u64::from(CHUNK_SIZE)) as usize;
        let mut chunks: Vec<Option<ChunkId>> = vec![None; blocks];
        let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<u8>>>(8);
        let reader = tokio::spawn(read_blocks(image, tx));
        let mut storing: tokio::task::JoinSet<anyhow::Result<(usize, ChunkId, bool)>> =
            tokio::task::JoinSet::new();
        let mut index = 0usize;
        let absorb = |done: anyhow::Result<(usize, ChunkId, bool)>,
                      chunks: &mut Vec<Option<ChunkId>>,
                      report: &mut SeedReport|
         -> anyhow::Result<()> {
            let (i, id, stored) = done?;
            chunks[i] = Some(id);
            report.chunks_stored += u64::from(stored);
            Ok(())
        };
        while let Some(block) = rx.recv().await {
            let block = block?;
            let i = index;
            index += 1;
            report.blocks += 1;
            report.bytes_read += block.len() as u64;
            if siterec_drivers::capture::is_zero(&block) {
                report.zero_blocks += 1;
                continue;
            }
            while storing.len() >= SEED_STORING {
                if let Some(done) = storing.join_next().await {
                    absorb(done?, &mut chunks, report)?;
                }
            }
            let me = Arc::clone(self);
            let item = item.to_string();
            storing.spawn(async move {
                let (id, block) =
                    tokio::task::spawn_blocking(move || (ChunkId::of(&block), block)).await?;
                // Kept from garbage collection until the seed is committed.
                me.remember(&item, id);
                let stored = if me.store.has_chunk(id).await? {
                    false
                } else {
                    me.store.put_plain_chunk_hashed(block, id, true).await?;
                    true
                };
                Ok((i, id, stored))
            });
        }
        while let Some(done) = storing.join_next().await {
            absorb(done?, &mut chunks, report)?;
        }
        reader.await??;
        if index != blocks {
            anyhow::bail!("{}: read {index} blocks of {blocks}", disk.path.display());
        }
        Ok((chunks, size))
    }

    /// Failback: writes point `point_id` of `item` from this store onto
    /// the disks of `machine` (this agent's own), in place. Each block is
    /// read from the disk and hashed first; only the blocks whose hash is
    /// not the point's are fetched from the store and written, then each
    /// disk is synced. Running it again writes nothing more, so a task
    /// redelivered after a crash finishes the job.
    pub(crate) async fn write_back(
        &self,
        store: &Store,
        item: &str,
        machine: &str,
        point_id: &str,
    ) -> anyhow::Result<Vec<MaterializedDisk>> {
        if !store.can_read_data() {
            return Err(StoreError::RecoveryKeyRequired {
                key_id: store.key_id().unwrap_or_default(),
            }
            .into());
        }
        let local = self.local_disks(machine).ok_or_else(|| {
            anyhow::anyhow!(
                "machine '{machine}' is not in this agent's config ([[machines]] or [[vms]]): the point cannot be written back onto its disks here"
            )
        })?;
        // A VM of this agent: it must be down while its disks are written
        // (it was shut down at the failover, and fenced since).
        let host = self.compute.host();
        let vm = host.get(machine);
        if vm.is_some() {
            host.ensure_stopped(machine).await?;
        }
        let manifest = store.read_manifest(item, point_id).await?;
        let mut out = Vec::new();
        for disk in &manifest.disks {
            let target = local
                .iter()
                .find(|d| d.name == disk.disk_id)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "point {point_id} has disk '{}', which machine '{machine}' does not have here",
                        disk.disk_id
                    )
                })?;
            let written = write_back_disk(store, &manifest, disk, target).await?;
            tracing::info!(item, disk = %disk.disk_id, bytes = written, "written back in place");
            out.push(MaterializedDisk {
                disk: disk.disk_id.clone(),
                format: target.format.as_str().into(),
                path: target.path.display().to_string(),
                size_bytes: disk.size,
                bytes_written: Some(written),
            });
        }
        if vm.is_some() {
            // Its disks hold the point: the VM runs here again.
            host.release_and_start(machine).await?;
        }
        Ok(out)
    }
}

/// Blocks of a seed being hashed and stored at once.
const SEED_STORING: usize = 4;

/// The page size writes back are compared and written in.
const PAGE: usize = 4096;

/// The runs of whole 4 KiB pages where `now` differs from `data`, as
/// (start, end) byte ranges of `data`.
fn differing_runs(data: &[u8], now: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let end = (i + PAGE).min(data.len());
        if data[i..end] == now[i..end] {
            i = end;
            continue;
        }
        // A run of differing pages, written at once.
        let mut j = end;
        while j < data.len() {
            let e = (j + PAGE).min(data.len());
            if data[j..e] == now[j..e] {
                break;
            }
            j = e;
        }
        runs.push((i, j));
        i = j;
    }
    runs
}

/// Reads a disk in chunk-size blocks (the last may be short) into `tx`,
/// then closes it.
async fn read_blocks(
    mut image: DiskImage,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<Vec<u8>>>,
) -> anyhow::Result<()> {
    let size = image.size();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(u64::from(CHUNK_SIZE)) as usize;
        let mut buf = vec![0u8; len];
        let r = image.read_at(off, &mut buf).await;
        let failed = r.is_err();
        if tx.send(r.map(|()| buf)).await.is_err() || failed {
            break;
        }
        off += len as u64;
    }
    image.close().await
}

/// Writes the blocks of `disk` that differ onto the local disk `target`;
/// returns the bytes written.
async fn write_back_disk(
    store: &Store,
    manifest: &Manifest,
    disk: &DiskManifest,
    target: &LocalDisk,
) -> anyhow::Result<u64> {
    let path = &target.path;
    let mut image = DiskImage::open(path, target.format, true).await?;
    let size = image.size();
    if size != disk.size {
        let _ = image.close().await;
        anyhow::bail!(
            "{} is {size} bytes, the point's disk '{}' {} bytes: write it back onto a disk of the same size",
            path.display(),
            disk.disk_id,
            disk.size
        );
    }
    let result = write_back_image(store, manifest, disk, &mut image).await;
    match result {
        Ok(written) => {
            image
                .close()
                .await
                .with_context(|| format!("closing {}", path.display()))?;
            Ok(written)
        }
        Err(e) => {
            let _ = image.close().await;
            Err(e.context(format!("writing back onto {}", path.display())))
        }
    }
}

async fn write_back_image(
    store: &Store,
    manifest: &Manifest,
    disk: &DiskManifest,
    image: &mut DiskImage,
) -> anyhow::Result<u64> {
    // Which blocks differ, from the disk's own hashes: the hash each
    // block must have (`None` of a zero block); a block stored as a delta
    // chunk is named by block and base, not by its hash, so it is looked
    // at page by page below.
    let mut differ = Vec::new();
    let mut buf = vec![0u8; disk.chunk_size as usize];
    for (i, c) in disk.chunks.iter().enumerate() {
        let want = match c {
            Some(id) if manifest.bases.contains_key(id) => None,
            other => Some(*other),
        };
        let off = disk.offset_of(i);
        let len = disk.len_of(i) as usize;
        image
            .read_at(off, &mut buf[..len])
            .await
            .with_context(|| format!("reading at {off}"))?;
        let have = if siterec_drivers::capture::is_zero(&buf[..len]) {
            None
        } else {
            Some(ChunkId::of(&buf[..len]))
        };
        if want != Some(have) {
            differ.push(i);
        }
    }
    let mut written = 0u64;
    let mut now = vec![0u8; disk.chunk_size as usize];
    for i in differ {
        let len = disk.len_of(i) as usize;
        let data = store
            .read_chunk_at(disk, i)
            .await?
            .unwrap_or_else(|| vec![0u8; len]);
        let off = disk.offset_of(i);
        image
            .read_at(off, &mut now[..len])
            .await
            .with_context(|| format!("reading at {off}"))?;
        for (a, b) in differing_runs(&data, &now[..len]) {
            image
                .write_at(off + a as u64, &data[a..b])
                .await
                .with_context(|| format!("writing at {}", off + a as u64))?;
            written += (b - a) as u64;
        }
    }
    image.sync().await.context("syncing")?;
    Ok(written)
}
