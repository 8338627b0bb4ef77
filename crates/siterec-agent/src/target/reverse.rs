//! The target side of coming back home: seeding the store with the disks
//! this site still has before a reprotect, and writing a point back onto a
//! machine's own disks in place at failback. Both compare block hashes
//! first, so what is read from the network or written to the disk is only
//! what differs.

use std::os::unix::fs::FileExt;

use siterec_drivers::capture::DiskSource;
use siterec_store::{DiskManifest, Manifest};

use super::*;
use crate::limits::CHUNK_SIZE;

/// A disk of a machine this agent has locally: its name and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDisk {
    pub name: String,
    pub path: PathBuf,
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
    /// The machines of this agent's own config (`[[machines]]`), by name:
    /// what a seed reads and a failback writes.
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
    /// else the item's failover disks (raw images) written at failover.
    fn seed_disks(&self, item: &str, machine: &str) -> anyhow::Result<Vec<LocalDisk>> {
        if let Some(d) = self.local_disks(machine) {
            return Ok(d);
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
        &self,
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
            let chunks = self.seed_disk(item, disk, &mut report).await?;
            let size = DiskSource::open(&disk.path)?.size();
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

    async fn seed_disk(
        &self,
        item: &str,
        disk: &LocalDisk,
        report: &mut SeedReport,
    ) -> anyhow::Result<Vec<Option<ChunkId>>> {
        let mut chunks = Vec::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<u8>>>(8);
        let path = disk.path.clone();
        let reader = tokio::task::spawn_blocking(move || read_blocks(&path, &tx));
        while let Some(block) = rx.recv().await {
            let block = block?;
            report.blocks += 1;
            report.bytes_read += block.len() as u64;
            if siterec_drivers::capture::is_zero(&block) {
                report.zero_blocks += 1;
                chunks.push(None);
                continue;
            }
            let id = ChunkId::of(&block);
            // Kept from garbage collection until the seed is committed.
            self.remember(item, id);
            if !self.store.has_chunk(id).await? {
                self.store.put_plain_chunk(block, true).await?;
                report.chunks_stored += 1;
            }
            chunks.push(Some(id));
        }
        reader.await??;
        Ok(chunks)
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
                "machine '{machine}' is not in this agent's config ([[machines]]): the point cannot be written back onto its disks here"
            )
        })?;
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
            let written = write_back_disk(store, &manifest, disk, &target.path).await?;
            tracing::info!(item, disk = %disk.disk_id, bytes = written, "written back in place");
            out.push(MaterializedDisk {
                disk: disk.disk_id.clone(),
                format: "raw".into(),
                path: target.path.display().to_string(),
                size_bytes: disk.size,
                bytes_written: Some(written),
            });
        }
        Ok(out)
    }
}

/// The page size writes back are compared and written in.
const PAGE: usize = 4096;

/// Writes `data` at `off` where the file differs from it, in runs of
/// whole 4 KiB pages; returns the bytes written.
fn write_differing_pages(f: &std::fs::File, data: &[u8], off: u64) -> std::io::Result<u64> {
    let mut now = vec![0u8; data.len()];
    f.read_exact_at(&mut now, off)?;
    let mut written = 0u64;
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
        f.write_all_at(&data[i..j], off + i as u64)?;
        written += (j - i) as u64;
        i = j;
    }
    Ok(written)
}

/// Reads a disk in chunk-size blocks (the last may be short) into `tx`.
fn read_blocks(
    path: &Path,
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<Vec<u8>>>,
) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = DiskSource::open(path)?.size();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(u64::from(CHUNK_SIZE)) as usize;
        let mut buf = vec![0u8; len];
        let r = f
            .read_exact_at(&mut buf, off)
            .with_context(|| format!("reading {} at {off}", path.display()));
        let failed = r.is_err();
        if tx.blocking_send(r.map(|()| buf)).is_err() || failed {
            break;
        }
        off += len as u64;
    }
    Ok(())
}

/// Writes the blocks of `disk` that differ onto the file or device at
/// `path`; returns the bytes written.
async fn write_back_disk(
    store: &Store,
    manifest: &Manifest,
    disk: &DiskManifest,
    path: &Path,
) -> anyhow::Result<u64> {
    let size = DiskSource::open(path)?.size();
    if size != disk.size {
        anyhow::bail!(
            "{} is {size} bytes, the point's disk '{}' {} bytes: write it back onto a disk of the same size",
            path.display(),
            disk.disk_id,
            disk.size
        );
    }
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {} for writing", path.display()))?,
    );
    // Which blocks differ, from the disk's own hashes: the hash each
    // block must have (`None` of a zero block); a block stored as a delta
    // chunk is named by block and base, not by its hash, so it is `None`
    // here and always looked at, page by page, below.
    let want: Vec<Option<Option<ChunkId>>> = disk
        .chunks
        .iter()
        .map(|c| match c {
            Some(id) if manifest.bases.contains_key(id) => None,
            other => Some(*other),
        })
        .collect();
    let chunk_size = disk.chunk_size;
    let f = Arc::clone(&file);
    let p = path.to_path_buf();
    let differ: Vec<usize> = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<usize>> {
        let mut differ = Vec::new();
        let mut buf = vec![0u8; chunk_size as usize];
        for (i, id) in want.iter().enumerate() {
            let off = i as u64 * u64::from(chunk_size);
            let len = (size - off).min(u64::from(chunk_size)) as usize;
            f.read_exact_at(&mut buf[..len], off)
                .with_context(|| format!("reading {} at {off}", p.display()))?;
            let have = if siterec_drivers::capture::is_zero(&buf[..len]) {
                None
            } else {
                Some(ChunkId::of(&buf[..len]))
            };
            if *id != Some(have) {
                differ.push(i);
            }
        }
        Ok(differ)
    })
    .await??;
    let mut written = 0u64;
    for i in differ {
        let len = disk.len_of(i) as usize;
        let data = store
            .read_chunk_at(disk, i)
            .await?
            .unwrap_or_else(|| vec![0u8; len]);
        let off = disk.offset_of(i);
        let f = Arc::clone(&file);
        let p = path.to_path_buf();
        let wrote = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            write_differing_pages(&f, &data, off)
                .with_context(|| format!("writing {} at {off}", p.display()))
        })
        .await??;
        written += wrote;
    }
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        file.sync_all()
            .with_context(|| format!("syncing {}", p.display()))
    })
    .await??;
    Ok(written)
}
