//! A VM item's cycle: one point-in-time view of all its disks (QEMU
//! fleecing), read over NBD through [`crate::vm::nbd_scan`] — only the
//! blocks the frozen dirty bitmaps mark when tracking is intact, else every
//! block with data compared by hash — with the bitmap generations recorded
//! in the item's state directory, app-consistent freezes through the guest
//! agent and a group's pause. Part of the source: it drives
//! [`super::replicate_disk`] for each disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use siterec_core::Consistency;
use siterec_core::wire::ReplicationAssignment;
use siterec_qemu::{DiskFormat, FleeceDisk, Vm};
use tokio::sync::Mutex;

use super::{DiskReader, DiskResult, Sink, SourceCtx, replicate_disk};
use crate::util::write_durably;
use crate::vm::{NbdView, VmSlot, pause_vm, resume_vm, virtual_size};

/// The generation of an item's dirty bitmaps (`state/ITEM/cbt`): the
/// active bitmap of each disk is `siterec-GEN`, the frozen one
/// `siterec-GEN-frozen`. A generation is recorded only once a point read
/// with it is saved, so a bitmap named by the recorded generation has
/// tracked every write since the last saved point.
fn cbt_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cbt")
}

/// The generation a cycle started with, promoted to `cbt` after the save.
fn cbt_pending_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cbt-pending")
}

/// Why changed-block tracking was lost, and whether the resulting full
/// read has been saved (shown as a health warning).
fn cbt_lost_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cbt-lost.json")
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CbtLost {
    at_ms: i64,
    reason: String,
    done: bool,
}

/// How long the health warning about lost tracking stays after the
/// resynchronization finished.
const CBT_LOST_SHOWN_MS: i64 = 3600 * 1000;

fn active_name(generation: &str) -> String {
    format!("siterec-{generation}")
}

fn frozen_name(generation: &str) -> String {
    format!("siterec-{generation}-frozen")
}

/// The health warning about lost changed-block tracking, if any.
pub(crate) fn cbt_warning(state_dir: &Path) -> Option<String> {
    let bytes = std::fs::read(cbt_lost_path(state_dir)).ok()?;
    let lost: CbtLost = serde_json::from_slice(&bytes).ok()?;
    if !lost.done {
        return Some(format!(
            "changed-block tracking was lost ({}): resynchronizing by reading whole disks and comparing block hashes",
            lost.reason
        ));
    }
    (crate::util::now_ms() - lost.at_ms < CBT_LOST_SHOWN_MS).then(|| {
        format!(
            "changed-block tracking was lost ({}); the item resynchronized by block hashes",
            lost.reason
        )
    })
}

/// Captures the disks of a VM item: one point-in-time view of all disks
/// (fleecing), read over NBD — only the blocks the dirty bitmaps mark when
/// tracking is intact and the acknowledged state exists, else every block
/// with data, compared by hash. Returns the disks' results, the point's
/// consistency and its time.
pub(crate) async fn capture_disks(
    ctx: &SourceCtx,
    a: &ReplicationAssignment,
    state_dir: &Path,
    sink: &Sink,
    slot: &Mutex<VmSlot>,
) -> anyhow::Result<(Vec<DiskResult>, Consistency, i64)> {
    let mut slot = slot.lock().await;
    let spec = slot.spec.clone();
    let mut disks = Vec::new();
    for d in &a.disks {
        let Some(s) = spec.disks.iter().find(|s| s.name == d.name) else {
            bail!(
                "VM '{}' has no disk '{}' (its disks: {}); the item was protected with another configuration",
                spec.name,
                d.name,
                spec.disks
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        disks.push(s.clone());
    }
    let slot_run_dir = slot.run_dir.clone();
    // Shut down for a planned failover: its final point is of disks at
    // rest (no guest to freeze, no vCPUs to pause or resume).
    let held = slot.held();
    let vm = slot.running().await?;
    // Dirty bitmaps are read against the saved block hashes: every disk
    // needs usable ones (else the read is whole, compared by hashes).
    let have_state = disks
        .iter()
        .all(|d| matches!(crate::source::saved_state(state_dir, &d.name), Ok(Some(_))));
    let recorded = std::fs::read_to_string(cbt_path(state_dir))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    // Is every disk's active bitmap there, recording and trusted?
    let mut broken: Option<String> = None;
    for d in &disks {
        let bitmaps = vm
            .dirty_bitmaps(&d.name)
            .await
            .with_context(|| format!("listing the dirty bitmaps of disk '{}'", d.name))?;
        let Some(generation) = &recorded else { break };
        let name = active_name(generation);
        broken = match bitmaps.iter().find(|b| b.name == name) {
            None => Some(format!(
                "disk '{}' has no dirty bitmap {name}: QEMU restarted without it",
                d.name
            )),
            Some(b) if b.inconsistent => Some(format!(
                "the dirty bitmap {name} of disk '{}' is inconsistent: QEMU stopped uncleanly",
                d.name
            )),
            Some(b) if !b.recording => Some(format!(
                "the dirty bitmap {name} of disk '{}' is not recording",
                d.name
            )),
            Some(_) => None,
        };
        if broken.is_some() {
            break;
        }
    }
    let valid = recorded.is_some() && broken.is_none();
    let generation = match (&recorded, valid) {
        (Some(g), true) => g.clone(),
        _ => uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
    };
    if valid {
        // A frozen bitmap left by a failed or killed cycle: its blocks
        // count as changed again.
        for d in &disks {
            vm.restore_frozen(
                &d.name,
                &active_name(&generation),
                &frozen_name(&generation),
            )
            .await
            .with_context(|| format!("restoring the frozen dirty bitmap of disk '{}'", d.name))?;
        }
    } else {
        for d in &disks {
            for b in vm.dirty_bitmaps(&d.name).await? {
                if b.name.starts_with("siterec-") {
                    vm.remove_dirty_bitmap(&d.name, &b.name)
                        .await
                        .with_context(|| {
                            format!(
                                "removing the stale dirty bitmap {} of disk '{}'",
                                b.name, d.name
                            )
                        })?;
                }
            }
        }
        if let (Some(reason), true) = (&broken, have_state) {
            tracing::warn!(item = %a.item, "changed-block tracking lost, resynchronizing by block hashes: {reason}");
            let lost = CbtLost {
                at_ms: crate::util::now_ms(),
                reason: reason.clone(),
                done: false,
            };
            write_durably(
                &cbt_lost_path(state_dir),
                &serde_json::to_vec(&lost)?,
                0o600,
            )?;
        }
    }
    write_durably(&cbt_pending_path(state_dir), generation.as_bytes(), 0o600)?;
    let incremental = valid && have_state;
    let plan: Vec<FleeceDisk> = disks
        .iter()
        .map(|d| {
            Ok(FleeceDisk {
                disk: d.name.clone(),
                size: virtual_size(&d.path, d.format)
                    .with_context(|| format!("reading the size of {}", d.path.display()))?,
                active: active_name(&generation),
                create_active: !valid,
                frozen: valid.then(|| frozen_name(&generation)),
                persistent: d.format == DiskFormat::Qcow2,
                // Page-sized bits: a cycle reads the pages written, not
                // whole blocks (64 KiB per GiB of disk per bitmap).
                granularity: Some(crate::cvs::PAGE as u32),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    // App-consistent when due: the guest's filesystems are frozen through
    // its agent for just the instant of the view (one QMP transaction).
    let app_due = !held && app_consistent_due(state_dir, a);
    let frozen = app_due && freeze_guest(vm, &spec.name, spec.guest_agent).await;
    // A group member pauses its VM until every member's VM is paused: the
    // group's instant (see `crate::group`).
    let mut group_instant = None;
    if let Some(g) = a.group.as_ref().filter(|_| !held)
        && let Some(rendezvous) = ctx.groups.get(g)
    {
        pause_vm(vm, &slot_run_dir).await?;
        let wait = Duration::from_secs(u64::from(a.copy_frequency_secs) + 30);
        group_instant = rendezvous.arrive(&a.item, wait).await;
        if group_instant.is_none() {
            tracing::warn!(item = %a.item, group = %g, "not every member of the group came to take a point: this point is the VM's own, not the group's");
        }
    }
    let fleece = vm.start_fleece(&plan).await;
    if a.group.is_some() && !held {
        resume_vm(vm, &slot_run_dir).await;
    }
    if frozen {
        thaw_guest(vm, &spec.name).await;
    }
    if app_due {
        // Attempted: the next try is one app-consistent period later, also
        // when no guest agent answered (the point is crash-consistent).
        write_durably(
            &app_pending_path(state_dir),
            crate::util::now_ms().to_string().as_bytes(),
            0o600,
        )?;
    }
    let fleece =
        fleece.with_context(|| format!("taking a point-in-time view of VM '{}'", spec.name))?;
    let mut results = Vec::new();
    let mut failure = None;
    for d in &disks {
        let view = NbdView {
            socket: fleece.socket.clone(),
            export: d.name.clone(),
            dirty_bitmap: incremental.then(|| frozen_name(&generation)),
            taken_at: fleece.taken_at,
        };
        match replicate_disk(ctx, a, state_dir, &d.name, DiskReader::Nbd(view), sink).await {
            Ok(r) => results.push(r),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Err(e) = vm.stop_fleece().await {
        tracing::warn!(item = %a.item, "removing the point-in-time view: {e}");
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let created_ms = group_instant.unwrap_or_else(|| {
        fleece
            .taken_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_else(|_| crate::util::now_ms())
    });
    let consistency = if frozen {
        Consistency::AppConsistent
    } else {
        Consistency::CrashConsistent
    };
    Ok((results, consistency, created_ms))
}

/// When the last app-consistent point was attempted (Unix ms), recorded
/// once that cycle's point is saved.
fn app_last_path(state_dir: &Path) -> PathBuf {
    state_dir.join("app-consistent-last")
}

fn app_pending_path(state_dir: &Path) -> PathBuf {
    state_dir.join("app-consistent-pending")
}

fn app_consistent_due(state_dir: &Path, a: &ReplicationAssignment) -> bool {
    if a.app_consistent_secs == 0 {
        return false;
    }
    let last: i64 = std::fs::read_to_string(app_last_path(state_dir))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    crate::util::now_ms() - last >= i64::from(a.app_consistent_secs) * 1000
}

/// Freezes the guest's filesystems; false (crash-consistent point) when
/// the VM has no guest agent or none answers.
async fn freeze_guest(vm: &mut Vm, name: &str, configured: bool) -> bool {
    if !configured {
        tracing::info!(
            vm = name,
            "app-consistent point due, but the VM has no guest agent channel (guest_agent = true): crash-consistent"
        );
        return false;
    }
    let ga = match vm.guest_agent() {
        Ok(ga) => ga,
        Err(e) => {
            tracing::warn!(
                vm = name,
                "app-consistent point due, no guest agent: {e}; crash-consistent"
            );
            return false;
        }
    };
    match ga.fsfreeze_freeze().await {
        Ok(n) => {
            tracing::info!(vm = name, filesystems = n, "guest filesystems frozen");
            true
        }
        Err(e) if e.is_absent() => {
            tracing::warn!(
                vm = name,
                "no guest agent answers ({e}); the point is crash-consistent"
            );
            false
        }
        Err(e) => {
            // A freeze that failed half-way may have frozen some: thaw.
            tracing::warn!(
                vm = name,
                "freezing the guest's filesystems failed ({e}); the point is crash-consistent"
            );
            let _ = ga.fsfreeze_thaw().await;
            false
        }
    }
}

/// Thaws the guest's filesystems, retrying: a guest left frozen stops
/// its applications.
async fn thaw_guest(vm: &mut Vm, name: &str) {
    for attempt in 1..=3 {
        let result = match vm.guest_agent() {
            Ok(ga) => ga.fsfreeze_thaw().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(n) => {
                tracing::info!(vm = name, filesystems = n, "guest filesystems thawed");
                return;
            }
            Err(e) => {
                tracing::error!(
                    vm = name,
                    attempt,
                    "thawing the guest's filesystems failed: {e}"
                );
            }
        }
    }
}

/// After a VM item's point is saved as the acknowledged state: its bitmap
/// generation becomes the recorded one and the frozen bitmaps go. A
/// failure here is harmless (the next cycle reads a little more).
pub(crate) async fn point_saved(ctx: &SourceCtx, a: &ReplicationAssignment, state_dir: &Path) {
    let Some(slot) = ctx.vms.get(&a.machine) else {
        return;
    };
    let pending = cbt_pending_path(state_dir);
    if let Ok(generation) = std::fs::read_to_string(&pending) {
        if let Err(e) = write_durably(&cbt_path(state_dir), generation.trim().as_bytes(), 0o600) {
            tracing::warn!(item = %a.item, "recording the dirty bitmap generation: {e:#}");
            return;
        }
        let _ = std::fs::remove_file(&pending);
    }
    if let Ok(at) = std::fs::read(app_pending_path(state_dir)) {
        if let Err(e) = write_durably(&app_last_path(state_dir), &at, 0o600) {
            tracing::warn!(item = %a.item, "recording the app-consistent point: {e:#}");
        }
        let _ = std::fs::remove_file(app_pending_path(state_dir));
    }
    let lost = cbt_lost_path(state_dir);
    if let Ok(bytes) = std::fs::read(&lost)
        && let Ok(mut l) = serde_json::from_slice::<CbtLost>(&bytes)
        && !l.done
    {
        l.done = true;
        l.at_ms = crate::util::now_ms();
        if let Ok(b) = serde_json::to_vec(&l) {
            let _ = write_durably(&lost, &b, 0o600);
        }
        ctx.update(&a.item, |c| c.resyncs += 1);
    }
    let Ok(generation) = std::fs::read_to_string(cbt_path(state_dir)) else {
        return;
    };
    let mut slot = slot.lock().await;
    if let Some(vm) = slot.vm.as_mut() {
        for d in &a.disks {
            if let Err(e) = vm
                .drop_frozen(&d.name, &frozen_name(generation.trim()))
                .await
            {
                tracing::warn!(item = %a.item, disk = %d.name, "removing the frozen dirty bitmap (the next cycle reads those blocks again): {e}");
            }
        }
    }
}
