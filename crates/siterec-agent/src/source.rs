//! The source role: replicate one machine's disks to its target, one cycle
//! every copy frequency.
//!
//! A cycle scans each disk in fixed-size blocks, compares each block's hash
//! with the state the target last acknowledged, and ships only the blocks
//! that changed (compressed, as store chunks). It then sends the recovery
//! point's manifest; once the target has committed it durably, the new
//! state is saved (durably) and the point is reported to the vault.
//!
//! Crash points: a cycle killed before the commit leaves chunks at the
//! target but no point; the next cycle starts from the same acknowledged
//! state and re-sends what changed. Killed after the commit but before the
//! state is saved: the next cycle compares with an older state and re-sends
//! a little more than needed. Killed before the vault heard of the point:
//! the report is kept in a pending file and re-sent. When the saved state is
//! missing or damaged, the cycle resynchronizes: it asks the target which
//! chunks it already has and sends only the others.
//!
//! When the target cannot be reached, a cycle captures its point into the
//! disk spool instead (see [`crate::spool`]); the next cycles ship the
//! spooled points, oldest first, before capturing anew. A spool that would
//! outgrow its bound is dropped whole and the item resynchronizes, with a
//! health warning, once the target is back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use siterec_core::Consistency;
use siterec_core::wire::{CommitRefused, ItemCounters, PointReport, ReplicationAssignment};
use siterec_drivers::capture::{
    BlockBases, BlockHash, DiskSource, ScanOptions, decode_state, encode_state, scan,
};
use siterec_store::{
    ChunkId, DiskManifest, EncodedChunk, Manifest, delta_id, encode_chunk_with_id,
    encode_delta_chunk,
};

use crate::pages::{PageRecords, Plan};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::spool::{Entry, Spool, SpoolFull};
use crate::util::{now_ms, write_durably};

pub use crate::limits::{CHUNK_SIZE, DEFAULT_UPLOAD_STREAMS, MAX_UPLOAD_STREAMS};

mod vm_cycle;

/// What every replicator of an agent shares.
pub struct SourceCtx {
    pub data_dir: PathBuf,
    /// mTLS client of the vault (trusts the vault's server CA).
    pub vault: reqwest::Client,
    /// mTLS client of target data endpoints (trusts the agent CA).
    pub data: reqwest::Client,
    pub vault_url: String,
    /// Counters and identity, written to `DATA/status.json` on every change.
    pub status: Arc<Mutex<crate::AgentStatus>>,
    /// Chunks in flight per disk (each encoded on a blocking thread, then sent).
    pub upload_streams: usize,
    /// The host's bandwidth limit, shared by every upload.
    pub throttle: Arc<crate::throttle::Throttle>,
    /// Bound of each item's disk spool, in bytes.
    pub spool_max_bytes: u64,
    /// The VMs this agent runs (VM items are read through QEMU).
    pub vms: Arc<crate::vm::VmHost>,
    /// Multi-VM consistency groups replicating on this agent.
    pub groups: crate::group::Groups,
}

impl SourceCtx {
    /// A source context with the defaults of an agent without settings:
    /// default upload streams and spool bound, no bandwidth limit, no
    /// groups, fresh counters. Callers override fields by struct update.
    pub fn new(
        data_dir: PathBuf,
        vault: reqwest::Client,
        data: reqwest::Client,
        vault_url: String,
        vms: Arc<crate::vm::VmHost>,
    ) -> SourceCtx {
        SourceCtx {
            data_dir,
            vault,
            data,
            vault_url,
            status: Default::default(),
            upload_streams: DEFAULT_UPLOAD_STREAMS,
            throttle: Default::default(),
            spool_max_bytes: crate::spool::DEFAULT_SPOOL_MAX_MIB << 20,
            vms,
            groups: Default::default(),
        }
    }

    fn state_dir(&self, item: &str) -> PathBuf {
        self.data_dir.join("state").join(item)
    }

    fn spool(&self, item: &str) -> Spool {
        Spool::new(self.data_dir.join("spool").join(item))
    }

    pub(crate) fn update(&self, item: &str, f: impl FnOnce(&mut ItemCounters)) {
        if let Ok(mut st) = self.status.lock() {
            f(st.items.entry(item.to_string()).or_default());
            st.save(&self.data_dir);
        }
    }

    fn failing(&self, item: &str) -> bool {
        self.status
            .lock()
            .map(|st| st.items.get(item).is_some_and(|c| c.last_error.is_some()))
            .unwrap_or(false)
    }
}

/// The file naming the replication epoch the item's saved state belongs to.
fn epoch_marker(state_dir: &Path) -> PathBuf {
    state_dir.join("epoch")
}

/// Makes the item's saved state that of the assignment's epoch. When the
/// epoch changed (a reprotect set up this direction; the vault names it),
/// everything saved of the item — acknowledged hashes, page records,
/// dirty-bitmap generations, a final-point marker, the spool, pending
/// reports — belongs to another direction and another store: it goes, and
/// the next cycle resynchronizes, asking the target for each block's chunk
/// and sending only those it lacks.
fn enter_epoch(ctx: &SourceCtx, a: &ReplicationAssignment) -> anyhow::Result<()> {
    let dir = ctx.state_dir(&a.item);
    let marker = epoch_marker(&dir);
    let saved = match std::fs::read_to_string(&marker) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", marker.display())),
    };
    if saved == a.epoch {
        return Ok(());
    }
    tracing::info!(item = %a.item, from = ?saved, to = ?a.epoch, "new replication epoch: starting over from what the target holds");
    for gone in [dir.clone(), ctx.data_dir.join("spool").join(&a.item)] {
        match std::fs::remove_dir_all(&gone) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", gone.display())),
        }
    }
    if let Some(epoch) = &a.epoch {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::util::write_durably(&marker, epoch.as_bytes(), 0o600)?;
    }
    Ok(())
}

/// Replicates one item until `stop` turns true. `previous`: the replicator
/// of the item's earlier assignment, told to stop; it finishes its cycle
/// before this one starts, so that two cycles of an item never overlap.
///
/// An assignment with `final_point` (a planned failover) takes one point
/// at once, reports it as the job's final point, and then takes no more.
pub async fn run_item(
    ctx: Arc<SourceCtx>,
    a: ReplicationAssignment,
    mut stop: watch::Receiver<bool>,
    previous: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(p) = previous {
        let _ = p.await;
    }
    if let Err(e) = enter_epoch(&ctx, &a) {
        tracing::warn!(item = %a.item, "starting the item's replication epoch: {e:#}");
        ctx.update(&a.item, |c| c.last_error = Some(format!("{e:#}")));
        return;
    }
    if let Some(job) = &a.final_point {
        return final_point(&ctx, &a, job, stop).await;
    }
    if let Some(nb) = a.not_before {
        let wait = nb * 1000 - now_ms();
        if wait > 0 {
            tracing::info!(item = %a.item, "initial replication scheduled in {} s", wait / 1000);
            if sleep_or_stop(&mut stop, Duration::from_millis(wait as u64)).await {
                return;
            }
        }
    }
    let period = Duration::from_secs(u64::from(a.copy_frequency_secs.max(1)));
    loop {
        let started = Instant::now();
        if let Err(e) = flush_pending_reports(&ctx, &a.item).await {
            tracing::warn!(item = %a.item, "reporting points to the vault: {e:#}");
        }
        match cycle(&ctx, &a).await {
            Ok(Cycle::Committed(point)) => {
                tracing::info!(item = %a.item, point = %point, "recovery point committed");
                ctx.update(&a.item, |c| c.last_error = None);
                if let Err(e) = flush_pending_reports(&ctx, &a.item).await {
                    tracing::warn!(item = %a.item, "reporting the point to the vault (will retry): {e:#}");
                }
            }
            Ok(Cycle::Spooled(point)) => {
                tracing::info!(item = %a.item, point = %point, "the target is unreachable: recovery point spooled");
                ctx.update(&a.item, |c| c.last_error = None);
            }
            Ok(Cycle::Exported(point)) => {
                tracing::debug!(item = %a.item, point = %point, "offline initial copy waits for its import");
                ctx.update(&a.item, |c| c.last_error = None);
            }
            Err(e) => {
                tracing::warn!(item = %a.item, "replication cycle failed: {e:#}");
                ctx.update(&a.item, |c| {
                    c.failed_cycles += 1;
                    c.last_error = Some(format!("{e:#}"));
                });
            }
        }
        refresh_health(&ctx, &a.item);
        if *stop.borrow() {
            return;
        }
        // A failed cycle is retried sooner than a full period.
        let wait = if ctx.failing(&a.item) {
            period.min(Duration::from_secs(5))
        } else {
            period
        };
        let wait = wait.saturating_sub(started.elapsed());
        if sleep_or_stop(&mut stop, wait).await {
            return;
        }
    }
}

/// The final point of planned failover `job`: cycles (a failed one again
/// after 5 s) until one is committed and reported, then waits for the
/// vault to take the item away.
async fn final_point(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    job: &str,
    mut stop: watch::Receiver<bool>,
) {
    let state_dir = ctx.state_dir(&a.item);
    loop {
        if let Err(e) = flush_pending_reports(ctx, &a.item).await {
            tracing::warn!(item = %a.item, "reporting points to the vault: {e:#}");
        }
        if let Some(point) = final_point_taken(&state_dir, job) {
            tracing::info!(item = %a.item, point = %point, job, "final point taken: replication stopped");
            // A VM shut down for this failover: its QEMU ends now.
            ctx.vms.power_off_held(&a.machine).await;
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        match cycle(ctx, a).await {
            Ok(Cycle::Committed(point)) => {
                ctx.update(&a.item, |c| c.last_error = None);
                tracing::info!(item = %a.item, point = %point, job, "planned failover cycle");
                // Told to stop meanwhile (a new assignment, e.g. the
                // target's address changed): the next replicator waits
                // for this one.
                if *stop.borrow() {
                    return;
                }
                continue;
            }
            Ok(c) => {
                // Spooled: the target is away. The final point must reach
                // it; try again shortly (and stop when told to).
                tracing::warn!(item = %a.item, point = %c.point_id(), job, "the target is unreachable: the final point waits");
            }
            Err(e) => {
                tracing::warn!(item = %a.item, "final replication cycle failed: {e:#}");
                ctx.update(&a.item, |c| {
                    c.failed_cycles += 1;
                    c.last_error = Some(format!("{e:#}"));
                });
            }
        }
        if sleep_or_stop(&mut stop, Duration::from_secs(5)).await {
            return;
        }
    }
}

async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        r = stop.changed() => r.is_err() || *stop.borrow(),
    }
}

pub(crate) struct DiskResult {
    manifest: DiskManifest,
    hashes: Vec<BlockHash>,
    /// Blocks stored as delta chunks: index → base (the saved state).
    block_bases: BlockBases,
    /// The manifest's delta chunk → base map.
    bases: std::collections::BTreeMap<ChunkId, ChunkId>,
    consistent: bool,
    /// Unix ms of the instant the captured content belongs to.
    captured_ms: i64,
    bytes_read: u64,
    bytes_sent: u64,
    chunks_sent: u64,
}

/// What a cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cycle {
    /// The target committed this point.
    Committed(String),
    /// The target was unreachable: the point waits in the disk spool.
    Spooled(String),
    /// Offline initial replication: this point was exported and waits to
    /// be imported at the target.
    Exported(String),
}

impl Cycle {
    pub fn point_id(&self) -> &str {
        match self {
            Cycle::Committed(p) | Cycle::Spooled(p) | Cycle::Exported(p) => p,
        }
    }
}

/// An offline initial copy waiting to be imported (`state/ITEM/offline-export.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct OfflineExport {
    report: PointReport,
    dir: PathBuf,
}

fn offline_marker(state_dir: &Path) -> PathBuf {
    state_dir.join("offline-export.json")
}

/// Offline initial replication (the seeds' "Offline" method): the first
/// cycle exports the initial copy to `export/ITEM` in the spool layout
/// instead of sending it; the operator carries that directory to the
/// recovery host's import path, where the target imports it. Until the
/// target has the point, cycles wait; then the point is reported and
/// replication goes on over the network with only the changes since.
/// Returns `None` when the cycle should proceed normally.
async fn offline_initial(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    export: &Path,
) -> anyhow::Result<Option<Cycle>> {
    let marker = offline_marker(state_dir);
    if let Ok(bytes) = std::fs::read(&marker) {
        let exported: OfflineExport = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", marker.display()))?;
        let point = exported.report.point_id.clone();
        let url = format!("{}/data/v1/items/{}/points/{point}", a.target_url, a.item);
        let resp = send_to_target(|| ctx.data.head(&url))
            .await
            .with_context(|| format!("asking the target whether it imported point {point}"))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Some(Cycle::Exported(point)));
        }
        if !resp.status().is_success() {
            bail!("the target answered {} about point {point}", resp.status());
        }
        // Imported: the exported point is the acknowledged state.
        let bytes_read = exported.report.bytes_read;
        ctx.update(&a.item, |c| {
            c.cycles += 1;
            c.bytes_read += bytes_read;
            c.last_point_id = Some(point.clone());
        });
        add_pending_report(state_dir, exported.report)?;
        std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
        return Ok(Some(Cycle::Committed(point)));
    }
    let initial = a
        .disks
        .iter()
        .all(|d| !state_dir.join(format!("{}.hashes", d.name)).exists());
    if !initial {
        return Ok(None);
    }
    let dir = export.join(&a.item);
    let spool = Spool::new(dir.clone());
    // An export is complete or absent (see `Spool::finish`); start over if
    // an earlier, unrecorded one is there.
    spool.discard_all()?;
    let tmp = spool.begin()?;
    let sink = Sink::Spool {
        initial: true,
        tmp: tmp.clone(),
        budget: Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)),
        max_bytes: u64::MAX,
    };
    let (manifest, results) = match capture(ctx, a, state_dir, &sink).await {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("exporting the initial copy to {}", dir.display())));
        }
    };
    spool.finish(&tmp, &manifest.encode())?;
    let bytes_read: u64 = results.iter().map(|r| r.bytes_read).sum();
    let bytes_exported: u64 = results.iter().map(|r| r.bytes_sent).sum();
    let exported = OfflineExport {
        report: PointReport {
            item: a.item.clone(),
            point_id: manifest.point_id.clone(),
            created_at_ms: manifest.created_at_unix_ms,
            consistency: manifest.consistency,
            bytes_sent: 0,
            bytes_read,
            final_for: None,
        },
        dir: dir.clone(),
    };
    // Marker first: hashes without a marker would start network deltas
    // against a point the target does not have.
    write_durably(&marker, &serde_json::to_vec(&exported)?, 0o600)?;
    save_hashes(state_dir, a, &results)?;
    vm_cycle::point_saved(ctx, a, state_dir).await;
    tracing::info!(item = %a.item, point = %manifest.point_id, dir = %dir.display(), bytes = bytes_exported, "initial copy exported for offline replication");
    Ok(Some(Cycle::Exported(manifest.point_id)))
}

/// Where a cycle's changed blocks go.
#[derive(Clone)]
pub(crate) enum Sink {
    Target,
    /// Into a spool capture directory, within a byte budget.
    Spool {
        /// A whole initial copy (an offline export) rather than changes
        /// against the acknowledged state.
        initial: bool,
        tmp: PathBuf,
        budget: Arc<std::sync::atomic::AtomicI64>,
        max_bytes: u64,
    },
}

/// The file naming why an item must resynchronize (shown as a health
/// warning until a resynchronizing cycle has committed).
fn resync_reason_path(state_dir: &Path) -> PathBuf {
    state_dir.join("resync-reason")
}

/// Forgets the acknowledged state so that the next cycle resynchronizes
/// (compares block hashes with the target), and says why.
fn require_resync(state_dir: &Path, a: &ReplicationAssignment, why: &str) {
    for disk in &a.disks {
        let _ = std::fs::remove_file(state_dir.join(format!("{}.hashes", disk.name)));
    }
    if let Err(e) = write_durably(&resync_reason_path(state_dir), why.as_bytes(), 0o600) {
        tracing::warn!(item = %a.item, "recording the resynchronization reason: {e:#}");
    }
}

/// Recomputes an item's health warnings from its spool and state.
fn refresh_health(ctx: &SourceCtx, item: &str) {
    let health = health(ctx, item);
    ctx.update(item, |c| health.apply(c));
}

/// An item's health as its status shows it: warnings and the spool.
struct Health {
    warnings: Vec<String>,
    spool_points: u64,
    spool_bytes: u64,
}

impl Health {
    fn apply(self, c: &mut ItemCounters) {
        c.spool_points = self.spool_points;
        c.spool_bytes = self.spool_bytes;
        c.health_warnings = self.warnings;
    }
}

/// Reads an item's health from its state (see [`Health`]).
fn health(ctx: &SourceCtx, item: &str) -> Health {
    let mut warnings = Vec::new();
    if let Ok(why) = std::fs::read_to_string(resync_reason_path(&ctx.state_dir(item))) {
        warnings.push(format!("resynchronization required: {why}"));
    }
    if let Some(w) = vm_cycle::cbt_warning(&ctx.state_dir(item)) {
        warnings.push(w);
    }
    if let Ok(bytes) = std::fs::read(offline_marker(&ctx.state_dir(item)))
        && let Ok(exported) = serde_json::from_slice::<OfflineExport>(&bytes)
    {
        warnings.push(format!(
            "offline initial replication: the initial copy (point {}) was exported to {}; copy that directory into the offline import path on the recovery host",
            exported.report.point_id,
            exported.dir.display()
        ));
    }
    let spool = ctx.spool(item);
    let points = spool.entries().map(|e| e.len() as u64).unwrap_or(0);
    let bytes = spool.bytes().unwrap_or(0);
    if points > 0 {
        warnings.push(format!(
            "the target is unreachable: {points} recovery point(s) ({} MiB) wait in the disk spool",
            bytes.div_ceil(1 << 20)
        ));
    }
    Health {
        warnings,
        spool_points: points,
        spool_bytes: bytes,
    }
}

/// True if `e` comes from failing to reach the target at all (connection
/// refused or reset, timeout), as opposed to the target answering.
pub fn target_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_connect() || r.is_timeout() || r.is_request())
    })
}

/// One replication cycle: ships spooled points first, then captures a new
/// point and sends it, or spools it if the target cannot be reached.
pub async fn cycle(ctx: &SourceCtx, a: &ReplicationAssignment) -> anyhow::Result<Cycle> {
    let state_dir = ctx.state_dir(&a.item);
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    if let Some(export) = &a.offline_export
        && let Some(outcome) = offline_initial(ctx, a, &state_dir, Path::new(export)).await?
    {
        return Ok(outcome);
    }
    let spool = ctx.spool(&a.item);
    if !spool.entries()?.is_empty() {
        // This cycle ships what waited; the next one captures anew (a
        // capture right now would only crowd the last spooled point).
        return match drain(ctx, a, &spool, &state_dir).await {
            Ok(last) => Ok(Cycle::Committed(last)),
            Err(e) if e.chain().any(|c| c.downcast_ref::<BaseMissing>().is_some()) => {
                spool.discard_all()?;
                require_resync(&state_dir, a, &format!("{e:#}"));
                Err(e)
            }
            Err(e) if target_unreachable(&e) => spool_cycle(ctx, a, &state_dir, &spool).await,
            Err(e) => Err(e),
        };
    }
    let resync = a
        .disks
        .iter()
        .any(|d| !state_dir.join(format!("{}.hashes", d.name)).exists());
    let result = direct_cycle(ctx, a, &state_dir).await;
    if let Err(e) = &result
        && let Some(b) = e.chain().find_map(|c| c.downcast_ref::<BaseMissing>())
    {
        require_resync(&state_dir, a, &b.to_string());
    }
    match result {
        Ok(point) => {
            if resync {
                let _ = std::fs::remove_file(resync_reason_path(&state_dir));
                ctx.update(&a.item, |c| c.resyncs += 1);
            }
            Ok(Cycle::Committed(point))
        }
        // Spooling needs the acknowledged state to compare with; without
        // it, the cycle waits for the target.
        Err(e) if target_unreachable(&e) && !resync => {
            tracing::warn!(item = %a.item, "the target is unreachable, spooling: {e:#}");
            spool_cycle(ctx, a, &state_dir, &spool).await
        }
        Err(e) => Err(e),
    }
}

/// Captures every disk of the item into `sink`; returns the point's manifest.
async fn capture(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    sink: &Sink,
) -> anyhow::Result<(Manifest, Vec<DiskResult>)> {
    let (results, consistency, created_ms) = match ctx.vms.get(&a.machine) {
        Some(slot) => vm_cycle::capture_disks(ctx, a, state_dir, sink, &slot).await?,
        None => capture_files(ctx, a, state_dir, sink).await?,
    };
    let point_id = format!(
        "{created_ms}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let manifest = Manifest {
        item: a.item.clone(),
        point_id,
        created_at_unix_ms: created_ms,
        consistency,
        disks: results.iter().map(|r| r.manifest.clone()).collect(),
        bases: results.iter().flat_map(|r| r.bases.clone()).collect(),
    };
    Ok((manifest, results))
}

/// Captures the disks of a physical server (files or block devices), one
/// after another.
async fn capture_files(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    sink: &Sink,
) -> anyhow::Result<(Vec<DiskResult>, Consistency, i64)> {
    let before = disk_stamps(a);
    let mut results = Vec::new();
    for disk in &a.disks {
        results.push(
            replicate_disk(
                ctx,
                a,
                state_dir,
                &disk.name,
                DiskReader::File(PathBuf::from(&disk.path)),
                sink,
            )
            .await?,
        );
    }
    // Disks are read one after another: the point is crash-consistent
    // across disks only if none of them changed during the whole cycle.
    let across = a.disks.len() <= 1 || before == disk_stamps(a);
    let consistency = if across && results.iter().all(|r| r.consistent) {
        Consistency::CrashConsistent
    } else {
        Consistency::Inconsistent
    };
    // The point's time is the instant its content belongs to (for several
    // disks read one after another and unchanged throughout, any instant of
    // the cycle; the last capture is used).
    let created_ms = results
        .iter()
        .map(|r| r.captured_ms)
        .max()
        .unwrap_or_else(now_ms);
    Ok((results, consistency, created_ms))
}

/// Sends a point's manifest; the target commits it once it has every chunk.
/// A refusal for missing chunks makes the item resynchronize.
async fn commit_point(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    manifest: &Manifest,
) -> anyhow::Result<()> {
    let url = format!("{}/data/v1/items/{}/points", a.target_url, a.item);
    let body = axum::body::Bytes::from(manifest.encode());
    let resp = send_to_target(|| ctx.data.post(&url).body(body.clone()))
        .await
        .with_context(|| format!("sending the recovery point to the target {url}"))?;
    let status = resp.status();
    if status == reqwest::StatusCode::CONFLICT {
        let refused: Option<CommitRefused> = resp.json().await.ok();
        let message = refused
            .map(|r| r.message)
            .unwrap_or_else(|| "conflict".into());
        // The target lacks chunks this agent believed it had: forget the
        // saved state (and anything spooled on top of it) so that the next
        // cycle resynchronizes.
        let _ = ctx.spool(&a.item).discard_all();
        require_resync(
            state_dir,
            a,
            &format!("the target refused point {}: {message}", manifest.point_id),
        );
        bail!("the target refused the point: {message}; the next cycle resynchronizes");
    }
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("the target refused the point ({status}): {body}");
    }
    Ok(())
}

fn save_hashes(
    state_dir: &Path,
    a: &ReplicationAssignment,
    results: &[DiskResult],
) -> anyhow::Result<()> {
    for (disk, r) in a.disks.iter().zip(results) {
        write_durably(
            &state_dir.join(format!("{}.hashes", disk.name)),
            &encode_state(&r.hashes, &r.block_bases, CHUNK_SIZE),
            0o600,
        )?;
    }
    Ok(())
}

/// What a committed point cost.
struct PointCost {
    bytes_read: u64,
    bytes_sent: u64,
    chunks_sent: u64,
}

/// Counts a committed point and queues its report to the vault
/// (`final_for`: the planned failover it is the final point of).
fn point_committed(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    manifest: &Manifest,
    cost: PointCost,
    final_for: Option<&str>,
) -> anyhow::Result<()> {
    let PointCost {
        bytes_read,
        bytes_sent,
        chunks_sent,
    } = cost;
    let point_id = manifest.point_id.clone();
    // The health goes with the count: whoever sees the new cycle sees
    // what it left (a lost-tracking warning, say) too.
    let health = health(ctx, &a.item);
    ctx.update(&a.item, |c| {
        health.apply(c);
        c.cycles += 1;
        c.bytes_read += bytes_read;
        c.bytes_sent += bytes_sent;
        c.chunks_sent += chunks_sent;
        c.last_cycle_bytes_read = bytes_read;
        c.last_cycle_bytes_sent = bytes_sent;
        c.last_cycle_chunks_sent = chunks_sent;
        c.last_point_id = Some(point_id.clone());
    });
    add_pending_report(
        state_dir,
        PointReport {
            item: a.item.clone(),
            point_id,
            created_at_ms: manifest.created_at_unix_ms,
            consistency: manifest.consistency,
            bytes_sent,
            bytes_read,
            final_for: final_for.map(str::to_string),
        },
    )
}

/// Captures and sends a point straight to the target.
async fn direct_cycle(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    let (manifest, results) = capture(ctx, a, state_dir, &Sink::Target).await?;
    let captured = started.elapsed();
    commit_point(ctx, a, state_dir, &manifest).await?;
    let committed = started.elapsed();
    // The target has the point durably: this is the new acknowledged state.
    save_hashes(state_dir, a, &results)?;
    vm_cycle::point_saved(ctx, a, state_dir).await;
    tracing::debug!(
        item = %a.item,
        capture_ms = captured.as_millis() as u64,
        commit_ms = (committed - captured).as_millis() as u64,
        save_ms = (started.elapsed() - committed).as_millis() as u64,
        "cycle timing"
    );
    let bytes_sent: u64 = results.iter().map(|r| r.bytes_sent).sum();
    let bytes_read: u64 = results.iter().map(|r| r.bytes_read).sum();
    let chunks_sent: u64 = results.iter().map(|r| r.chunks_sent).sum();
    point_committed(
        ctx,
        a,
        state_dir,
        &manifest,
        PointCost {
            bytes_read,
            bytes_sent,
            chunks_sent,
        },
        a.final_point.as_deref(),
    )?;
    if let Some(job) = &a.final_point {
        // Taken after the source stopped, reported as the job's final
        // point: the item takes no more.
        let marker = FinalMarker {
            job: job.clone(),
            point_id: manifest.point_id.clone(),
        };
        crate::util::write_durably(
            &final_marker(state_dir),
            &serde_json::to_vec(&marker)?,
            0o600,
        )?;
    }
    Ok(manifest.point_id)
}

/// The final point a planned failover asked for, once taken
/// (`state/ITEM/final-point.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FinalMarker {
    job: String,
    point_id: String,
}

fn final_marker(state_dir: &Path) -> PathBuf {
    state_dir.join("final-point.json")
}

/// The final point already taken for planned failover `job`, if any.
fn final_point_taken(state_dir: &Path, job: &str) -> Option<String> {
    let bytes = std::fs::read(final_marker(state_dir)).ok()?;
    let m: FinalMarker = serde_json::from_slice(&bytes).ok()?;
    (m.job == job).then_some(m.point_id)
}

/// Captures a point into the disk spool. If the spool would outgrow its
/// bound, everything spooled is dropped and the item resynchronizes once
/// the target is back (with a health warning): nothing is lost silently.
async fn spool_cycle(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    spool: &Spool,
) -> anyhow::Result<Cycle> {
    let used = spool.bytes()?;
    let tmp = spool.begin()?;
    let sink = Sink::Spool {
        initial: false,
        tmp: tmp.clone(),
        budget: Arc::new(std::sync::atomic::AtomicI64::new(
            ctx.spool_max_bytes as i64 - used as i64,
        )),
        max_bytes: ctx.spool_max_bytes,
    };
    let captured = capture(ctx, a, state_dir, &sink).await;
    let (manifest, results) = match captured {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            if e.chain().any(|c| c.downcast_ref::<SpoolFull>().is_some()) {
                spool.discard_all()?;
                require_resync(
                    state_dir,
                    a,
                    &format!(
                        "{e:#}: the spooled recovery points were dropped; when the target is back, only the blocks that differ from it are sent"
                    ),
                );
            }
            return Err(e);
        }
    };
    spool.finish(&tmp, &manifest.encode())?;
    // The spooled point is the base of the next capture.
    save_hashes(state_dir, a, &results)?;
    vm_cycle::point_saved(ctx, a, state_dir).await;
    let bytes_read: u64 = results.iter().map(|r| r.bytes_read).sum();
    ctx.update(&a.item, |c| {
        c.bytes_read += bytes_read;
        c.last_cycle_bytes_read = bytes_read;
    });
    Ok(Cycle::Spooled(manifest.point_id))
}

/// Ships spooled points to the target, oldest first, skipping chunks it
/// has already taken. Returns the last point's id.
async fn drain(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    spool: &Spool,
    state_dir: &Path,
) -> anyhow::Result<String> {
    let mut last = String::new();
    let base = format!("{}/data/v1/items/{}/chunks", a.target_url, a.item);
    let streams = ctx.upload_streams.clamp(1, MAX_UPLOAD_STREAMS);
    for entry in spool.entries()? {
        let bytes = std::fs::read(entry.manifest_path())
            .with_context(|| format!("reading {}", entry.manifest_path().display()))?;
        let manifest = Manifest::decode(&bytes)
            .with_context(|| format!("spooled point {}", entry.dir.display()))?;
        let (bytes_sent, chunks_sent) = ship_spooled_chunks(ctx, &base, &entry, streams).await?;
        commit_point(ctx, a, state_dir, &manifest).await?;
        point_committed(
            ctx,
            a,
            state_dir,
            &manifest,
            PointCost {
                bytes_read: 0,
                bytes_sent,
                chunks_sent,
            },
            None,
        )?;
        spool.remove(&entry)?;
        tracing::info!(item = %a.item, point = %manifest.point_id, "spooled recovery point committed");
        refresh_health(ctx, &a.item);
        last = manifest.point_id;
    }
    Ok(last)
}

async fn ship_spooled_chunks(
    ctx: &SourceCtx,
    base: &str,
    entry: &Entry,
    streams: usize,
) -> anyhow::Result<(u64, u64)> {
    let acked = entry.acked();
    let mut set: JoinSet<anyhow::Result<(String, u64)>> = JoinSet::new();
    let (mut bytes, mut chunks) = (0u64, 0u64);
    let mut done = |r: Result<anyhow::Result<(String, u64)>, tokio::task::JoinError>| {
        let (name, len) = r.context("upload task")??;
        entry.mark_acked(&name)?;
        bytes += len;
        chunks += 1;
        anyhow::Ok(())
    };
    for (name, path) in entry.chunks()? {
        if acked.contains(&name) {
            continue;
        }
        while set.len() >= streams {
            if let Some(r) = set.join_next().await {
                done(r)?;
            }
        }
        let (client, base, throttle) = (ctx.data.clone(), base.to_string(), ctx.throttle.clone());
        set.spawn(async move {
            let data = tokio::fs::read(&path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            let len = put_encoded(&client, &base, &name, data, &throttle).await?;
            Ok((name, len))
        });
    }
    while let Some(r) = set.join_next().await {
        done(r)?;
    }
    Ok((bytes, chunks))
}

/// (mtime, ctime) of each disk, to notice writes across a multi-disk cycle.
fn disk_stamps(a: &ReplicationAssignment) -> Vec<Option<(i64, i64, i64, i64)>> {
    use std::os::unix::fs::MetadataExt;
    a.disks
        .iter()
        .map(|d| {
            std::fs::metadata(&d.path)
                .ok()
                .map(|m| (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
        })
        .collect()
}

/// Where a disk's blocks are read from.
pub(crate) enum DiskReader {
    /// A file or block device, scanned whole (`siterec_drivers::capture`).
    File(PathBuf),
    /// A VM disk's point-in-time view exported by QEMU over NBD; with a
    /// dirty bitmap only the blocks it marks are read (see `crate::vm`).
    Nbd(crate::vm::NbdView),
}

impl DiskReader {
    fn describe(&self) -> String {
        match self {
            DiskReader::File(p) => p.display().to_string(),
            DiskReader::Nbd(v) => format!("NBD export '{}' of {}", v.export, v.socket.display()),
        }
    }
}

pub(crate) async fn replicate_disk(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    disk_name: &str,
    reader: DiskReader,
    sink: &Sink,
) -> anyhow::Result<DiskResult> {
    let what = reader.describe();
    let baseline = match saved_state(state_dir, disk_name) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(item = %a.item, disk = disk_name, "{e}: resynchronizing");
            None
        }
    };
    let resync = baseline.is_none();
    let (baseline, block_bases) = match baseline {
        Some((h, b)) => (Some(h), b),
        None => (None, BlockBases::new()),
    };
    let records = PageRecords::open(&state_dir.join(format!("{disk_name}.pages")))?;
    let streams = ctx.upload_streams.clamp(1, MAX_UPLOAD_STREAMS);
    let compress = a.compression;
    let (tx, rx) = mpsc::channel::<Vec<Outgoing>>(streams * 2);
    let rx = Blocks::new(rx);
    let uploader = match sink {
        Sink::Target => tokio::spawn(upload(
            ctx.data.clone(),
            format!("{}/data/v1/items/{}/chunks", a.target_url, a.item),
            rx,
            Upload {
                resync,
                streams,
                throttle: ctx.throttle.clone(),
            },
        )),
        Sink::Spool { initial: false, .. } if resync => bail!(
            "the target is unreachable and disk '{disk_name}' has no acknowledged state to spool changes against; replication waits for the target"
        ),
        Sink::Spool {
            tmp,
            budget,
            max_bytes,
            ..
        } => tokio::spawn(spool_write(
            rx,
            tmp.clone(),
            streams,
            budget.clone(),
            *max_bytes,
        )),
    };
    let scratch = ctx.data_dir.join("scratch");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let runtime = tokio::runtime::Handle::current();
    let cv_path = state_dir.join(format!("{disk_name}.cvs"));
    let scan_task = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut planner = Planner {
            baseline,
            records,
            block_bases,
            compress,
            group: Vec::new(),
            group_bytes: 0,
            tx,
        };
        let outcome = match reader {
            DiskReader::File(path) => {
                let source = DiskSource::open(&path)?;
                let options = ScanOptions {
                    scratch_dir: Some(scratch),
                    page_fingerprints: true,
                    ..ScanOptions::default()
                };
                let previous = planner.baseline.clone();
                scan(
                    &source,
                    CHUNK_SIZE,
                    previous.as_deref(),
                    &options,
                    |i, d, h, fps| planner.whole(i, d, h, fps),
                )?
            }
            DiskReader::Nbd(view) => {
                let cvs = crate::cvs::CvRecords::open(&cv_path)?;
                let previous = planner.baseline.clone();
                crate::vm::nbd_scan(
                    &runtime,
                    &view,
                    CHUNK_SIZE,
                    previous.as_deref(),
                    &cvs,
                    &mut planner,
                )?
            }
        };
        planner.flush()?;
        Ok((outcome, planner.block_bases))
    });
    let t0 = std::time::Instant::now();
    let scanned = scan_task.await.context("disk scan task")?;
    let scan_ms = t0.elapsed().as_millis() as u64;
    let uploaded = uploader.await.context("upload task")?;
    tracing::debug!(
        item = %a.item,
        disk = disk_name,
        scan_ms,
        upload_ms = t0.elapsed().as_millis() as u64,
        "disk timing"
    );
    // An upload error explains a scan stopped by a closed channel: report it first.
    let (bytes_sent, chunks_sent) = uploaded?;
    let (outcome, mut block_bases) =
        scanned.with_context(|| format!("reading disk '{disk_name}' ({what})"))?;
    // Blocks now zero (or beyond a shrunk disk) have no base.
    block_bases.retain(|i, _| outcome.hashes.get(*i).is_some_and(|h| h.is_some()));
    let mut bases = std::collections::BTreeMap::new();
    let chunks = outcome
        .hashes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            h.map(|h| match block_bases.get(&i) {
                Some(base) => {
                    let id = delta_id(ChunkId(h), ChunkId(*base));
                    bases.insert(id, ChunkId(*base));
                    id
                }
                None => ChunkId(h),
            })
        })
        .collect();
    let manifest = DiskManifest {
        disk_id: disk_name.to_string(),
        size: outcome.size_bytes,
        chunk_size: CHUNK_SIZE,
        chunks,
    };
    Ok(DiskResult {
        manifest,
        block_bases,
        bases,
        consistent: outcome.consistent,
        captured_ms: outcome
            .captured_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_else(|_| now_ms()),
        bytes_read: outcome.bytes_read,
        hashes: outcome.hashes,
        bytes_sent,
        chunks_sent,
    })
}

/// The acknowledged block hashes and delta bases of a disk
/// (`state/ITEM/DISK.hashes`): `Ok(None)` if there are none, an error
/// saying why if they cannot be used (unreadable, or for another block
/// size than [`CHUNK_SIZE`]).
pub(crate) fn saved_state(
    state_dir: &Path,
    disk_name: &str,
) -> Result<Option<(Vec<BlockHash>, BlockBases)>, String> {
    let path = state_dir.join(format!("{disk_name}.hashes"));
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("saved state {} unreadable: {e}", path.display())),
    };
    match decode_state(&bytes) {
        Ok((h, b, size)) if size == CHUNK_SIZE => Ok(Some((h, b))),
        Ok((_, _, size)) => Err(format!(
            "saved state {} is for {} KiB blocks, this agent uses {} KiB",
            path.display(),
            size / 1024,
            CHUNK_SIZE / 1024
        )),
        Err(e) => Err(format!("saved state {} unreadable: {e}", path.display())),
    }
}

/// Decides how each changed block ships (whole, or as a delta of its
/// changed pages, see `crate::pages`), encodes it as a chunk object while
/// the block is still in the scan's buffer (and in the core's cache), and
/// hands chunks to the uploads in groups: a hand-over to the runtime wakes
/// a thread, which costs as much as sending a small delta chunk.
struct Planner {
    /// The acknowledged block hashes (`None`: resynchronizing).
    baseline: Option<Vec<BlockHash>>,
    records: PageRecords,
    block_bases: BlockBases,
    /// The policy's data transfer compression.
    compress: bool,
    group: Vec<Outgoing>,
    group_bytes: usize,
    tx: mpsc::Sender<Vec<Outgoing>>,
}

impl Planner {
    fn acked(&self, index: u64) -> Option<&[u8; 32]> {
        self.baseline
            .as_ref()
            .and_then(|b| b.get(index as usize))
            .and_then(|h| h.as_ref())
    }

    /// A changed block, read whole, with its page fingerprints if the
    /// scan computed them (else empty).
    fn whole(
        &mut self,
        index: u64,
        data: &[u8],
        hash: &[u8; 32],
        fps: &[u64],
    ) -> anyhow::Result<()> {
        let i = index as usize;
        let (plan, record) = crate::pages::plan(
            self.acked(index),
            self.records.read(index).as_ref(),
            hash,
            data,
            fps,
        );
        self.records.write(index, &record)?;
        // Resynchronizing, a block goes whole: its chunk is named by the
        // block's hash, which the target may hold already (seeded by a
        // reprotect, or from another point), while a delta (on zeros) is
        // named by block and base and would be sent again.
        let plan = if self.baseline.is_none() {
            Plan::Whole
        } else {
            plan
        };
        let out = match plan {
            // Resynchronizing: encoded only if the target lacks it.
            Plan::Whole if self.baseline.is_none() => {
                self.block_bases.remove(&i);
                Outgoing::Plain {
                    id: ChunkId(*hash),
                    data: data.to_vec(),
                    compress: self.compress,
                }
            }
            Plan::Whole => {
                self.block_bases.remove(&i);
                Outgoing::Whole(encode_chunk_with_id(data, ChunkId(*hash), self.compress))
            }
            Plan::Delta { base, mask } => {
                self.block_bases.insert(i, base);
                Outgoing::Delta(encode_delta_chunk(
                    ChunkId(*hash),
                    data.len() as u32,
                    ChunkId(base),
                    &crate::pages::pages_of(data, mask),
                    self.compress,
                ))
            }
        };
        self.push(out)
    }

    fn push(&mut self, out: Outgoing) -> anyhow::Result<()> {
        self.group_bytes += out.len();
        self.group.push(out);
        if self.group_bytes >= GROUP_BYTES || self.group.len() >= GROUP_BLOCKS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.group_bytes = 0;
        if self.group.is_empty() {
            return Ok(());
        }
        self.tx
            .blocking_send(std::mem::take(&mut self.group))
            .map_err(|_| anyhow::anyhow!("the upload to the target stopped"))
    }
}

impl crate::vm::BlockSink for Planner {
    fn whole(&mut self, index: u64, data: &[u8], hash: &[u8; 32]) -> anyhow::Result<()> {
        Planner::whole(self, index, data, hash, &[])
    }

    fn delta_needs(&mut self, index: u64) -> Option<crate::pages::PageMask> {
        let acked = *self.acked(index)?;
        crate::pages::delta_needs(&acked, self.records.read(index).as_ref())
    }

    fn delta(
        &mut self,
        index: u64,
        hash: &[u8; 32],
        read: &[(u16, &[u8])],
    ) -> anyhow::Result<bool> {
        let Some(old) = self.records.read(index) else {
            return Ok(false);
        };
        let Some((Plan::Delta { base, mask }, record)) =
            crate::pages::plan_partial(&old, hash, read)
        else {
            return Ok(false);
        };
        self.records.write(index, &record)?;
        self.block_bases.insert(index as usize, base);
        let pages: Vec<(u16, &[u8])> = read
            .iter()
            .filter(|(i, _)| mask.contains(usize::from(*i)))
            .map(|(i, p)| (*i, *p))
            .collect();
        self.push(Outgoing::Delta(encode_delta_chunk(
            ChunkId(*hash),
            old.len,
            ChunkId(base),
            &pages,
            self.compress,
        )))?;
        Ok(true)
    }
}

/// A changed block on its way to the target (or the spool), encoded.
enum Outgoing {
    /// A whole block's chunk.
    Whole(EncodedChunk),
    /// A delta chunk: the block's changed pages against an earlier whole
    /// chunk (a few KiB).
    Delta(EncodedChunk),
    /// A whole block not encoded yet (resynchronizing: the target likely
    /// holds it, seeded by a reprotect or from another point, so it is
    /// compressed only once the target is known to lack it).
    Plain {
        id: ChunkId,
        data: Vec<u8>,
        compress: bool,
    },
}

/// Blocks handed from the scan to the uploads at once: at most this many
/// bytes (or whole blocks)...
const GROUP_BYTES: usize = 1 << 20;
/// ...or this many blocks.
const GROUP_BLOCKS: usize = 64;

/// The receiving end of the scan's groups of blocks, one block at a time.
struct Blocks {
    rx: mpsc::Receiver<Vec<Outgoing>>,
    queue: std::collections::VecDeque<Outgoing>,
}

impl Blocks {
    fn new(rx: mpsc::Receiver<Vec<Outgoing>>) -> Blocks {
        Blocks {
            rx,
            queue: Default::default(),
        }
    }

    async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some(b);
            }
            self.queue.extend(self.rx.recv().await?);
        }
    }
}

impl Outgoing {
    /// Encoded (blocking: a plain block is compressed here).
    fn into_chunk(self) -> EncodedChunk {
        match self {
            Outgoing::Whole(c) | Outgoing::Delta(c) => c,
            Outgoing::Plain { id, data, compress } => encode_chunk_with_id(&data, id, compress),
        }
    }

    /// Bytes it sends (a plain block: at most).
    fn len(&self) -> usize {
        match self {
            Outgoing::Whole(c) | Outgoing::Delta(c) => c.bytes.len(),
            Outgoing::Plain { data, .. } => data.len(),
        }
    }
}

struct Upload {
    /// Ask the target before sending (no trusted saved state).
    resync: bool,
    streams: usize,
    throttle: Arc<crate::throttle::Throttle>,
}

/// Uploads the planner's chunks, `streams` requests at a time. Whole
/// blocks go on their own request; delta chunks, a few KiB each, are
/// gathered into batches ([`crate::batch`]). In resync mode it first asks
/// whether the target already has a whole block's chunk. Returns (bytes
/// sent, chunks sent).
async fn upload(
    client: reqwest::Client,
    base: String,
    mut rx: Blocks,
    opts: Upload,
) -> anyhow::Result<(u64, u64)> {
    let mut set: JoinSet<anyhow::Result<(u64, u64)>> = JoinSet::new();
    let mut bytes = 0u64;
    let mut chunks = 0u64;
    let mut account =
        |r: Result<anyhow::Result<(u64, u64)>, tokio::task::JoinError>| -> anyhow::Result<()> {
            let (b, c) = r.context("upload task")??;
            bytes += b;
            chunks += c;
            Ok(())
        };
    let mut batch: Vec<EncodedChunk> = Vec::new();
    let mut batch_bytes = 0usize;
    loop {
        let block = rx.recv().await;
        let flush = match &block {
            Some(b @ Outgoing::Delta(_)) => {
                batch_bytes += b.len();
                batch.len() + 1 >= crate::batch::MAX_BATCH_CHUNKS
                    || batch_bytes >= crate::batch::BATCH_BYTES
            }
            Some(Outgoing::Whole(_) | Outgoing::Plain { .. }) => false,
            None => !batch.is_empty(),
        };
        let job = match block {
            Some(Outgoing::Delta(c)) => {
                batch.push(c);
                if !flush {
                    continue;
                }
                batch_bytes = 0;
                Job::Batch(std::mem::take(&mut batch))
            }
            Some(Outgoing::Whole(c)) => Job::One(c),
            Some(Outgoing::Plain { id, data, compress }) => Job::Plain { id, data, compress },
            None if flush => Job::Batch(std::mem::take(&mut batch)),
            None => break,
        };
        while set.len() >= opts.streams {
            if let Some(r) = set.join_next().await {
                account(r)?;
            }
        }
        let client = client.clone();
        let base = base.clone();
        let (resync, throttle) = (opts.resync, opts.throttle.clone());
        set.spawn(async move {
            let chunk = match job {
                Job::Batch(mut chunks) => {
                    if resync {
                        chunks = lacking(&client, &base, chunks).await?;
                        if chunks.is_empty() {
                            return Ok((0, 0));
                        }
                    }
                    return put_batch(&client, &base, chunks, &throttle).await;
                }
                Job::One(chunk) => {
                    if resync && target_holds(&client, &base, chunk.id).await? {
                        return Ok((0, 0));
                    }
                    chunk
                }
                Job::Plain { id, data, compress } => {
                    if target_holds(&client, &base, id).await? {
                        return Ok((0, 0));
                    }
                    tokio::task::spawn_blocking(move || encode_chunk_with_id(&data, id, compress))
                        .await
                        .context("encoding a block")?
                }
            };
            let name = chunk.id.to_hex();
            let sent = put_encoded(&client, &base, &name, chunk.bytes, &throttle).await?;
            Ok((sent, 1))
        });
    }
    while let Some(r) = set.join_next().await {
        account(r)?;
    }
    Ok((bytes, chunks))
}

/// Whether the target holds chunk `id` already (`HEAD`).
async fn target_holds(client: &reqwest::Client, base: &str, id: ChunkId) -> anyhow::Result<bool> {
    let url = format!("{base}/{}", id.to_hex());
    let head = send_to_target(|| client.head(&url))
        .await
        .with_context(|| format!("asking the target for chunk {id}"))?;
    Ok(head.status().is_success())
}

/// One upload request's worth of chunks.
enum Job {
    One(EncodedChunk),
    /// An [`Outgoing::Plain`] block: asked about, then encoded if lacking.
    Plain {
        id: ChunkId,
        data: Vec<u8>,
        compress: bool,
    },
    Batch(Vec<EncodedChunk>),
}

/// The chunks of a batch the target does not hold (`POST chunks/have`,
/// one request for the whole batch): what a resynchronizing cycle sends.
async fn lacking(
    client: &reqwest::Client,
    base: &str,
    chunks: Vec<EncodedChunk>,
) -> anyhow::Result<Vec<EncodedChunk>> {
    let mut ids = Vec::with_capacity(chunks.len() * 32);
    for c in &chunks {
        ids.extend_from_slice(c.id.as_bytes());
    }
    let body = axum::body::Bytes::from(ids);
    let url = format!("{base}/have");
    let resp = send_to_target(|| client.post(&url).body(body.clone()))
        .await
        .context("asking the target which chunks it holds")?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "the target answered {status} when asked which chunks it holds: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let have = resp.bytes().await?;
    if have.len() != chunks.len() {
        bail!(
            "the target answered {} flags for {} chunks it was asked about",
            have.len(),
            chunks.len()
        );
    }
    Ok(chunks
        .into_iter()
        .zip(have.iter())
        .filter(|(_, h)| **h == 0)
        .map(|(c, _)| c)
        .collect())
}

/// Sends `chunks` as one batch; returns (bytes, chunks).
async fn put_batch(
    client: &reqwest::Client,
    base: &str,
    chunks: Vec<EncodedChunk>,
    throttle: &crate::throttle::Throttle,
) -> anyhow::Result<(u64, u64)> {
    let count = chunks.len() as u64;
    let encoded: Vec<_> = chunks.into_iter().map(|c| (c.id, c.bytes)).collect();
    let body = crate::batch::encode(&encoded);
    let len = body.len() as u64;
    throttle.acquire(len).await;
    let body = axum::body::Bytes::from(body);
    let resp = send_to_target(|| client.post(base).body(body.clone()))
        .await
        .with_context(|| format!("sending a batch of {count} chunks to the target"))?;
    if resp.status() == reqwest::StatusCode::CONFLICT {
        return Err(BaseMissing(resp.text().await.unwrap_or_default()).into());
    }
    if !resp.status().is_success() {
        let status = resp.status();
        bail!(
            "the target refused a batch of {count} chunks ({status}): {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok((len, count))
}

/// Sends one encoded chunk (the target verifies it against its name).
async fn put_encoded(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    bytes: Vec<u8>,
    throttle: &crate::throttle::Throttle,
) -> anyhow::Result<u64> {
    let len = bytes.len() as u64;
    throttle.acquire(len).await;
    let url = format!("{base}/{name}");
    let body = axum::body::Bytes::from(bytes);
    let resp = send_to_target(|| client.put(&url).body(body.clone()))
        .await
        .with_context(|| format!("sending chunk {name} to the target"))?;
    if resp.status() == reqwest::StatusCode::CONFLICT {
        return Err(BaseMissing(resp.text().await.unwrap_or_default()).into());
    }
    if !resp.status().is_success() {
        let status = resp.status();
        bail!(
            "the target refused chunk {name} ({status}): {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(len)
}

/// The target lacks the base of a delta chunk (it was damaged and removed,
/// say): the item must resynchronize.
#[derive(Debug)]
struct BaseMissing(String);

impl std::fmt::Display for BaseMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the target lacks the base of a delta chunk: {}", self.0)
    }
}

impl std::error::Error for BaseMissing {}

/// Writes the planner's chunks into a spool capture, `streams` at a time,
/// within the spool's byte budget. Returns (bytes, chunks).
async fn spool_write(
    mut rx: Blocks,
    tmp: PathBuf,
    streams: usize,
    budget: Arc<std::sync::atomic::AtomicI64>,
    max_bytes: u64,
) -> anyhow::Result<(u64, u64)> {
    use std::sync::atomic::Ordering;
    let mut set: JoinSet<anyhow::Result<u64>> = JoinSet::new();
    let (mut bytes, mut chunks) = (0u64, 0u64);
    let mut account = |r: Result<anyhow::Result<u64>, tokio::task::JoinError>| {
        bytes += r.context("spool task")??;
        chunks += 1;
        anyhow::Ok(())
    };
    while let Some(block) = rx.recv().await {
        while set.len() >= streams {
            if let Some(r) = set.join_next().await {
                account(r)?;
            }
        }
        let (tmp, budget) = (tmp.clone(), budget.clone());
        set.spawn_blocking(move || {
            let enc = block.into_chunk();
            let len = enc.bytes.len() as u64;
            if budget.fetch_sub(len as i64, Ordering::SeqCst) < len as i64 {
                return Err(SpoolFull { max_bytes }.into());
            }
            crate::spool::write_chunk(&tmp, &enc.id.to_hex(), &enc.bytes)?;
            Ok(len)
        });
    }
    while let Some(r) = set.join_next().await {
        account(r)?;
    }
    Ok((bytes, chunks))
}

/// Sends a request to the target data endpoint. Every data-plane request is
/// idempotent (chunks are content-addressed, a commit of a point the target
/// holds succeeds), so one that failed on the way (the connection reset or
/// closed under it) is sent once more on a new connection before the target
/// counts as unreachable; connect errors and timeouts are not repeated. A 403
/// means the target has not yet heard from the vault that this agent is the
/// item's source (it learns that on its next heartbeat): retry for about ten
/// seconds.
async fn send_to_target(
    build: impl Fn() -> reqwest::RequestBuilder,
) -> reqwest::Result<reqwest::Response> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    let mut resent = false;
    loop {
        let resp = match build().send().await {
            Ok(resp) => resp,
            Err(e) if !resent && e.is_request() && !e.is_connect() && !e.is_timeout() => {
                tracing::debug!("resending a request the target did not answer: {e}");
                resent = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        if resp.status() != reqwest::StatusCode::FORBIDDEN || attempt >= 8 {
            return Ok(resp);
        }
        attempt += 1;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn pending_path(state_dir: &Path) -> PathBuf {
    state_dir.join("pending-reports.json")
}

fn add_pending_report(state_dir: &Path, report: PointReport) -> anyhow::Result<()> {
    let path = pending_path(state_dir);
    let mut pending: Vec<PointReport> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    pending.push(report);
    write_durably(&path, &serde_json::to_vec(&pending)?, 0o600)
}

/// Sends the recovery points the vault has not acknowledged yet, oldest first.
async fn flush_pending_reports(ctx: &SourceCtx, item: &str) -> anyhow::Result<()> {
    let state_dir = ctx.state_dir(item);
    let path = pending_path(&state_dir);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(());
    };
    let mut pending: Vec<PointReport> = serde_json::from_slice(&bytes).unwrap_or_default();
    while let Some(report) = pending.first() {
        let url = format!("{}/agent/v1/points", ctx.vault_url);
        let resp = ctx
            .vault
            .post(&url)
            .json(report)
            .send()
            .await
            .with_context(|| format!("reporting a point to {url}"))?;
        let status = resp.status();
        if status.is_success() || status.is_client_error() {
            if status.is_client_error() {
                tracing::warn!(item, point = %report.point_id, "the vault did not record the point: {}", resp.text().await.unwrap_or_default());
            }
            pending.remove(0);
            write_durably(&path, &serde_json::to_vec(&pending)?, 0o600)?;
        } else {
            bail!("the vault answered {status} to a point report");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener that drops the first `drop_first` connections once it has
    /// read a request from them, then answers 200 "ok" on each later one.
    async fn flaky_server(drop_first: usize) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/x", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut accepted = 0;
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                accepted += 1;
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                if accepted <= drop_first {
                    drop(conn);
                    continue;
                }
                conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                )
                .await
                .unwrap();
                return accepted;
            }
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_request_cut_off_on_the_way_is_sent_once_more() {
        siterec_pki::install_crypto_provider();
        let client = reqwest::Client::new();
        let (url, server) = flaky_server(1).await;
        let resp = send_to_target(|| client.put(&url).body("chunk"))
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        assert_eq!(server.await.unwrap(), 2);

        // Twice in a row: the target counts as unreachable.
        let (url, server) = flaky_server(2).await;
        let err = send_to_target(|| client.put(&url).body("chunk"))
            .await
            .unwrap_err();
        assert!(target_unreachable(&err.into()));
        server.abort();
    }
}
