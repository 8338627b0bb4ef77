//! The QEMU driver of the agent: the config's VMs as protectable items,
//! run by the agent (started, or taken over when an earlier run of the agent
//! left them running), and replicated with changed-block tracking.
//!
//! A VM item's cycle takes one point-in-time view of all its disks
//! (QEMU fleecing, see `siterec_qemu::fleece`) and reads it over NBD: only
//! the blocks the disks' frozen dirty bitmaps mark, when tracking is intact;
//! every block with data otherwise (the first cycle, or after tracking was
//! lost: QEMU restarted on a raw disk, or crashed with a qcow2 one), compared
//! with the acknowledged block hashes so that only differing blocks ship.
//! The blocks then go through the same pipeline as a file's.
//!
//! This module is the VMs and their reading (the host, inventory, NBD
//! scans of a view); the cycle that uses them — fleecing, the bitmap
//! generations, app-consistent freezes, group pauses — is the source's
//! (`source::vm_cycle`), so that the source depends on this module and not
//! the other way round.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use siterec_core::wire::{DiskInfo, KIND_VM, MachineInfo, NicInfo, VmInfo};
use siterec_drivers::capture::{BlockHash, ScanOutcome, SnapshotMethod, hash_block};
use siterec_nbd::{ConnectOptions, NbdClient, STATE_DIRTY, STATE_ZERO};
use siterec_qemu::{DiskFormat, Vm, VmSpec};
use tokio::sync::Mutex;

use crate::util::write_durably;

/// The VM as a protectable machine: its disks (virtual sizes), NICs and
/// what a replica needs. A VM whose spec does not hold (a missing image, a
/// wrong format) is reported with the reason instead of failing the agent.
pub fn inventory(spec: &VmSpec) -> MachineInfo {
    let mut error = spec.validate().err().map(|e| e.to_string());
    let disks = spec
        .disks
        .iter()
        .map(|d| {
            let size_bytes = match virtual_size(&d.path, d.format) {
                Ok(s) => s,
                Err(e) => {
                    error.get_or_insert_with(|| format!("disk '{}': {e}", d.name));
                    0
                }
            };
            DiskInfo {
                name: d.name.clone(),
                path: d.path.display().to_string(),
                size_bytes,
            }
        })
        .collect();
    MachineInfo {
        name: spec.name.clone(),
        kind: KIND_VM.into(),
        disks,
        nics: spec
            .nics
            .iter()
            .map(|n| NicInfo {
                name: n.name.clone(),
                network: n.network.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        vm: Some(VmInfo {
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            kernel: spec.kernel.as_ref().map(|p| p.display().to_string()),
            initrd: spec.initrd.as_ref().map(|p| p.display().to_string()),
            append: spec.append.clone(),
        }),
        error,
    }
}

/// The size the guest sees: a raw image's length, a qcow2 image's header
/// field (bytes 24..32, big-endian).
pub fn virtual_size(path: &Path, format: DiskFormat) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    match format {
        DiskFormat::Raw => Ok(f.metadata()?.len()),
        DiskFormat::Qcow2 => {
            let mut header = [0u8; 32];
            f.read_exact(&mut header)?;
            if &header[..4] != b"QFI\xfb" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a qcow2 image (no QFI\\xfb magic)",
                ));
            }
            let mut size = [0u8; 8];
            size.copy_from_slice(&header[24..32]);
            Ok(u64::from_be_bytes(size))
        }
    }
}

// ---------------------------------------------------------------------------
// Running the configured VMs.

/// The VMs this agent runs, each with its QEMU once started: those of its
/// config, and the replica VMs its compute driver made at failovers
/// (added as they are made, so that a reprotect replicates them like any
/// VM).
pub struct VmHost {
    configured: Vec<String>,
    slots: std::sync::Mutex<std::collections::BTreeMap<String, Arc<Mutex<VmSlot>>>>,
    fence: Arc<Fence>,
}

/// The VMs this agent must not start: their items failed over (the vault
/// says so in every heartbeat answer; kept in `DATA/fenced.json` so that
/// a restarted agent knows before it hears from the vault).
pub struct Fence {
    path: PathBuf,
    names: std::sync::Mutex<std::collections::BTreeSet<String>>,
    answered: tokio::sync::watch::Sender<bool>,
}

impl Fence {
    fn load(path: PathBuf) -> Fence {
        let names = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Vec<String>>(&b).unwrap_or_else(|e| {
                // Unreadable: fence nothing until the vault says; the
                // first answer is waited for before any VM starts.
                tracing::warn!("{}: {e}; waiting for the vault's word", path.display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        Fence {
            path,
            names: std::sync::Mutex::new(names.into_iter().collect()),
            answered: tokio::sync::watch::channel(false).0,
        }
    }

    /// Keeps `names` durably in `DATA/fenced.json` (a failure is logged:
    /// the vault says the fence again in every answer).
    fn save(&self, names: &std::collections::BTreeSet<String>) {
        let bytes = serde_json::to_vec(names).unwrap_or_default();
        if let Err(e) = crate::util::write_durably(&self.path, &bytes, 0o600) {
            tracing::warn!("keeping the fence: {e:#}");
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.lock().map(|n| n.contains(name)).unwrap_or(true)
    }
}

/// How long the agent waits for the vault's first answer before starting
/// its VMs (fenced ones stay down whatever happens).
const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// One configured VM.
pub struct VmSlot {
    pub(crate) spec: VmSpec,
    pub(crate) run_dir: PathBuf,
    pub(crate) vm: Option<Vm>,
    fence: Arc<Fence>,
}

impl VmHost {
    /// The config's VMs, with their runtime files in `DATA/vms/NAME`.
    pub fn new(specs: &[VmSpec], data_dir: &Path) -> VmHost {
        let fence = Arc::new(Fence::load(data_dir.join("fenced.json")));
        VmHost {
            configured: specs.iter().map(|s| s.name.clone()).collect(),
            slots: std::sync::Mutex::new(
                specs
                    .iter()
                    .map(|s| {
                        let slot = VmSlot {
                            spec: s.clone(),
                            run_dir: data_dir.join("vms").join(&s.name),
                            vm: None,
                            fence: fence.clone(),
                        };
                        (s.name.clone(), Arc::new(Mutex::new(slot)))
                    })
                    .collect(),
            ),
            fence,
        }
    }

    /// The slot of replica VM `spec.name`, whose runtime files are in
    /// `run_dir` (made now, or the one made before with its spec updated).
    /// A name the config uses is refused.
    pub async fn replica(
        &self,
        spec: VmSpec,
        run_dir: PathBuf,
    ) -> anyhow::Result<Arc<Mutex<VmSlot>>> {
        if self.configured.contains(&spec.name) {
            anyhow::bail!(
                "a VM named '{}' is configured on this agent ([[vms]]): a replica VM cannot take its name",
                spec.name
            );
        }
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| anyhow::anyhow!("the VM table is poisoned"))?;
            slots
                .entry(spec.name.clone())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(VmSlot {
                        spec: spec.clone(),
                        run_dir: run_dir.clone(),
                        vm: None,
                        fence: self.fence.clone(),
                    }))
                })
                .clone()
        };
        {
            let mut s = slot.lock().await;
            s.spec = spec;
            s.run_dir = run_dir;
        }
        Ok(slot)
    }

    /// Forgets a replica VM (deleted); the config's VMs stay.
    pub fn forget_replica(&self, name: &str) {
        if self.configured.iter().any(|n| n == name) {
            return;
        }
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(name);
        }
    }

    /// Planned failover: shuts VM `name` down (see [`VmSlot::shut_down`]).
    pub async fn stop_vm(
        &self,
        name: &str,
        timeout: std::time::Duration,
        force: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let slot = self.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "no VM named '{name}' runs on this agent (neither in its config's [[vms]] nor a replica VM): nothing to shut down here"
            )
        })?;
        let mut slot = slot.lock().await;
        slot.shut_down(timeout, force).await
    }

    /// Ends the QEMU of a VM held down for a planned failover (its final
    /// point is taken): it flushes and closes the disks. The VM stays held.
    pub async fn power_off_held(&self, name: &str) {
        let Some(slot) = self.get(name) else { return };
        let mut slot = slot.lock().await;
        if !held_marker(&slot.run_dir).exists() {
            return;
        }
        if let Some(vm) = slot.vm.take() {
            match vm.quit(std::time::Duration::from_secs(20)).await {
                Ok(_) => tracing::info!(vm = name, "VM powered off after its final point"),
                Err(e) => tracing::warn!(vm = name, "ending the QEMU of the VM: {e}"),
            }
        }
    }

    /// Fails unless VM `name` is down here: no QEMU of it runs, one left
    /// by an earlier run of the agent included (a QEMU in state `shutdown`
    /// still holds the disks).
    pub async fn ensure_stopped(&self, name: &str) -> anyhow::Result<()> {
        let Some(slot) = self.get(name) else {
            return Ok(());
        };
        let mut slot = slot.lock().await;
        if !match &mut slot.vm {
            Some(vm) => vm.status().await.is_ok(),
            None => false,
        } {
            // Gone, or never ours: one an earlier run left is taken over.
            slot.vm = Vm::adopt(slot.spec.clone(), &slot.run_dir)
                .await
                .ok()
                .flatten();
        }
        if slot.vm.is_some() {
            anyhow::bail!(
                "VM '{name}' runs here (its QEMU holds its disks): its disks cannot be written back while it runs; shut it down first"
            );
        }
        Ok(())
    }

    /// Failback: VM `name` (of this agent's config) runs here again. Its
    /// hold and the fence kept here are lifted (the vault lifts its own
    /// once the failback completes) and it is started.
    pub async fn release_and_start(&self, name: &str) -> anyhow::Result<()> {
        let slot = self.get(name).ok_or_else(|| {
            anyhow::anyhow!("no VM named '{name}' in this agent's config: nothing to start")
        })?;
        if let Ok(mut n) = self.fence.names.lock()
            && n.remove(name)
        {
            self.fence.save(&n);
        }
        let mut slot = slot.lock().await;
        match std::fs::remove_file(held_marker(&slot.run_dir)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("releasing VM '{name}' held for a failover"));
            }
        }
        slot.running().await?;
        tracing::info!(vm = name, "VM started again at its own site");
        Ok(())
    }

    /// The machines the vault says are fenced (a heartbeat answer): kept
    /// durably when they change.
    pub fn set_fenced(&self, names: &[String]) {
        let new: std::collections::BTreeSet<String> = names.iter().cloned().collect();
        let changed = match self.fence.names.lock() {
            Ok(mut n) if *n != new => {
                *n = new.clone();
                true
            }
            _ => false,
        };
        if changed {
            tracing::info!(fenced = ?new, "machines that failed over are fenced: not started here");
            self.fence.save(&new);
        }
        self.fence.answered.send_replace(true);
    }

    /// Starts (or adopts) every VM that is not fenced, once the vault has
    /// answered (or after [`FIRST_ANSWER_WAIT`] without an answer, going by
    /// the fence kept on disk); one that cannot start is logged and tried
    /// again at its next replication cycle.
    pub async fn start_all(&self) {
        let mut answered = self.fence.answered.subscribe();
        if tokio::time::timeout(FIRST_ANSWER_WAIT, answered.wait_for(|a| *a))
            .await
            .is_err()
        {
            tracing::warn!("no answer from the vault yet: starting the VMs the kept fence allows");
        }
        for name in &self.configured {
            let Some(slot) = self.get(name) else { continue };
            if self.fence.contains(name) {
                tracing::warn!(vm = %name, "not starting the VM: its item failed over (fenced until a failback)");
                continue;
            }
            if let Err(e) = slot.lock().await.running().await {
                tracing::warn!(vm = %name, "starting the VM: {e:#}");
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Mutex<VmSlot>>> {
        self.slots.lock().ok().and_then(|s| s.get(name).cloned())
    }
}

impl VmSlot {
    /// The VM's QEMU: the one this agent runs, else one an earlier run of
    /// the agent left running (adopted), else a new one. A QEMU that has
    /// gone away (crashed, killed) is started again, as a hypervisor's
    /// restart policy would.
    pub async fn running(&mut self) -> anyhow::Result<&mut Vm> {
        let alive = match &mut self.vm {
            Some(vm) => vm.status().await.is_ok(),
            None => false,
        };
        if !alive {
            if let Some(mut old) = self.vm.take() {
                let _ = old.kill().await;
            }
            let name = &self.spec.name;
            if held_marker(&self.run_dir).exists() {
                anyhow::bail!(
                    "VM '{name}' was shut down for a planned failover: it is not started again here until a failback releases it"
                );
            }
            if self.fence.contains(name) {
                anyhow::bail!(
                    "VM '{name}' is fenced: its item failed over and runs at the other site; it is not started here until a failback"
                );
            }
            let vm = match Vm::adopt(self.spec.clone(), &self.run_dir)
                .await
                .with_context(|| format!("taking over VM '{name}' left running"))?
            {
                Some(vm) => {
                    tracing::info!(vm = %name, pid = ?vm.pid(), "took over the running VM");
                    vm
                }
                None => {
                    let vm = Vm::start(self.spec.clone(), &self.run_dir)
                        .await
                        .with_context(|| format!("starting VM '{name}'"))?;
                    tracing::info!(vm = %name, pid = ?vm.pid(), accel = ?vm.accel(), "VM started");
                    vm
                }
            };
            self.vm = Some(vm);
        }
        // Paused by an earlier run of the agent for a group point: resume.
        let marker = paused_marker(&self.run_dir);
        if marker.exists()
            && let Some(vm) = self.vm.as_mut()
        {
            resume_vm(vm, &self.run_dir).await;
            let _ = std::fs::remove_file(&marker);
        }
        self.vm
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("VM '{}' is not running", self.spec.name))
    }

    /// Whether the VM is held down for a planned failover.
    pub fn held(&self) -> bool {
        held_marker(&self.run_dir).exists()
    }

    /// Planned failover: ACPI power-down through QMP, then up to `timeout`
    /// for the guest to power off (QEMU stays, in state `shutdown`, for the
    /// final point); `force`: then its vCPUs are stopped where they are (as
    /// pulling the plug). From the power-down on, the VM is held: nothing
    /// starts it again here (see [`held_marker`]). A guest that does not
    /// power off in time, unforced, is left running and released.
    /// Idempotent: a VM already down answers ok.
    pub async fn shut_down(
        &mut self,
        timeout: std::time::Duration,
        force: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let name = self.spec.name.clone();
        let held = held_marker(&self.run_dir);
        if self.vm.is_none() {
            // A QEMU an earlier run of the agent left: take it over, but
            // never start one to stop it.
            self.vm = Vm::adopt(self.spec.clone(), &self.run_dir)
                .await
                .with_context(|| format!("taking over VM '{name}' left running"))?;
        }
        let Some(vm) = self.vm.as_mut() else {
            std::fs::create_dir_all(&self.run_dir)
                .with_context(|| format!("creating {}", self.run_dir.display()))?;
            write_durably(&held, b"", 0o600)?;
            return Ok(serde_json::json!({ "vm": name, "stopped": "notRunning" }));
        };
        let status = vm
            .status()
            .await
            .with_context(|| format!("asking VM '{name}' its state"))?;
        if status.status == "shutdown" || (held.exists() && !status.running) {
            write_durably(&held, b"", 0o600)?;
            return Ok(serde_json::json!({ "vm": name, "stopped": "alreadyStopped" }));
        }
        write_durably(&held, b"", 0o600)?;
        let begun = std::time::Instant::now();
        if let Err(e) = vm.qmp().execute("system_powerdown", None).await {
            let _ = std::fs::remove_file(&held);
            return Err(e).with_context(|| format!("asking VM '{name}' to power down (ACPI)"));
        }
        tracing::info!(vm = %name, timeout_secs = timeout.as_secs(), "ACPI power-down sent: waiting for the guest to power off");
        while begun.elapsed() < timeout {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            match vm.status().await {
                Ok(s) if s.status == "shutdown" => {
                    let secs = begun.elapsed().as_secs_f64();
                    tracing::info!(vm = %name, secs, "the guest powered off");
                    return Ok(serde_json::json!({
                        "vm": name, "stopped": "poweredDown", "secs": secs,
                    }));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("asking VM '{name}' its state"));
                }
            }
        }
        if force {
            vm.qmp()
                .execute("stop", None)
                .await
                .with_context(|| format!("powering VM '{name}' off"))?;
            tracing::warn!(vm = %name, "the guest did not power off in time: powered off (forced)");
            return Ok(serde_json::json!({
                "vm": name, "stopped": "forcedOff", "secs": begun.elapsed().as_secs_f64(),
                "notes": [format!("the guest did not power off within {} s of the ACPI power-down; it was powered off (--force): the final point is crash-consistent", timeout.as_secs())],
            }));
        }
        let _ = std::fs::remove_file(&held);
        anyhow::bail!(
            "the guest of VM '{name}' did not power off within {} s of the ACPI power-down and keeps running: shut it down from inside the guest and run the planned failover again, or run it with --force to power the VM off",
            timeout.as_secs()
        )
    }
}

/// Marks a VM shut down for a planned failover: no cycle, restart of the
/// agent or adoption starts it again at this site (the fence from the
/// vault may not say so yet, or not at all: a replica VM at the recovery
/// site). Lifted by a failback's start ([`VmHost::release_and_start`]).
pub(crate) fn held_marker(run_dir: &Path) -> PathBuf {
    run_dir.join("held-for-failover")
}

// ---------------------------------------------------------------------------
// Changed-block tracking and capture.

/// A disk's point-in-time view, exported by QEMU over NBD.
pub struct NbdView {
    pub socket: PathBuf,
    pub export: String,
    /// The frozen dirty bitmap exported with the view: read only the
    /// blocks it marks. `None`: read every block that holds data.
    pub dirty_bitmap: Option<String>,
    pub taken_at: std::time::SystemTime,
}

/// Consecutive blocks read with one NBD request, at most.
const READ_RUN_BLOCKS: u64 = 16;

/// Where [`nbd_scan`] delivers changed blocks (the replication pipeline's
/// planner).
pub(crate) trait BlockSink {
    /// A changed block, read (or known) whole.
    fn whole(&mut self, index: u64, data: &[u8], hash: &[u8; 32]) -> anyhow::Result<()>;
    /// The pages, besides the rewritten ones, that a delta of block `index`
    /// needs; `None` when the block cannot ship as a delta.
    fn delta_needs(&mut self, index: u64) -> Option<crate::pages::PageMask>;
    /// A changed full block of which only the pages `read` were read (the
    /// rewritten ones and those `delta_needs` named): ship it as a delta.
    /// `Ok(false)`: it must ship whole after all.
    fn delta(&mut self, index: u64, hash: &[u8; 32], read: &[(u16, &[u8])])
    -> anyhow::Result<bool>;
}

/// Reads a view in `chunk_size` blocks and delivers every non-zero block
/// whose hash differs from `previous` to `sink`.
///
/// Without a dirty bitmap every block that `base:allocation` does not
/// report as zero is read whole. With one (4 KiB granularity), only the
/// dirty pages of a block are read: its new hash is rebuilt from the
/// pages' BLAKE3 chaining values (`crate::cvs`: the old ones for clean
/// pages, recomputed for dirty ones) and it ships as a delta of those
/// pages. A block is read whole when that cannot work: no trusted
/// chaining values or page record, too many changed pages for a delta, a
/// short last block, or a clean page whose content is not what its
/// chaining value says. A block that was all zeros is rebuilt from its
/// dirty pages without reading the rest. Blocking: runs NBD on `rt`.
pub(crate) fn nbd_scan(
    rt: &tokio::runtime::Handle,
    view: &NbdView,
    chunk_size: u32,
    previous: Option<&[BlockHash]>,
    cvs: &crate::cvs::CvRecords,
    sink: &mut dyn BlockSink,
) -> anyhow::Result<ScanOutcome> {
    use crate::cvs::{BLOCK, PAGE, PAGES, block_cvs, page_cv, root, zero_cvs};
    use crate::pages::PageMask;
    let context = match &view.dirty_bitmap {
        Some(b) => format!("qemu:dirty-bitmap:{b}"),
        None => "base:allocation".to_string(),
    };
    let opts = ConnectOptions::new(view.export.clone()).meta_context(context.clone());
    let mut client = rt
        .block_on(NbdClient::connect_unix(&view.socket, &opts))
        .with_context(|| format!("connecting to {}", view.socket.display()))?;
    let ctx_id = client
        .meta_context_id(&context)
        .ok_or_else(|| anyhow::anyhow!("the NBD server did not agree to meta context {context}"))?;
    let size = client.export_size();
    let chunk = u64::from(chunk_size);
    let blocks = size.div_ceil(chunk);
    let extents = rt
        .block_on(client.block_status_range(ctx_id, 0, size))
        .with_context(|| format!("block status ({context})"))?;
    let incremental = view.dirty_bitmap.is_some();
    let paged = incremental && chunk as usize == BLOCK;
    // Per block: the dirty pages, or all of them to read it whole.
    let mut wanted = vec![PageMask::EMPTY; blocks as usize];
    for e in &extents {
        let read = if incremental {
            e.flags & STATE_DIRTY != 0
        } else {
            e.flags & STATE_ZERO == 0
        };
        if !read || e.length == 0 {
            continue;
        }
        let end = (e.offset + e.length).min(size);
        let mut pos = e.offset;
        while pos < end {
            let i = pos / chunk;
            let block_end = ((i + 1) * chunk).min(end);
            let mask = if paged {
                let first = (pos - i * chunk) / PAGE as u64;
                let last = (block_end - 1 - i * chunk) / PAGE as u64;
                PageMask::range(first as usize, last as usize)
            } else {
                PageMask::ALL
            };
            wanted[i as usize] |= mask;
            pos = block_end;
        }
    }
    let mut hashes: Vec<BlockHash> = match previous {
        Some(p) if incremental && p.len() == blocks as usize => p.to_vec(),
        _ if incremental => anyhow::bail!(
            "a dirty-bitmap read needs the previous block hashes of the whole disk ({blocks} blocks)"
        ),
        _ => vec![None; blocks as usize],
    };
    let mut bytes_read = 0u64;
    // Counted by the whole-block reader too.
    let (changed, delivered) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let before = |index: u64| {
        previous
            .and_then(|p| p.get(index as usize))
            .copied()
            .flatten()
    };
    // Reads whole blocks `i .. i + run`, hashes and delivers them.
    let read_whole = |client: &mut NbdClient<tokio::net::UnixStream>,
                      hashes: &mut Vec<BlockHash>,
                      sink: &mut dyn BlockSink,
                      i: u64,
                      run: u64|
     -> anyhow::Result<u64> {
        let offset = i * chunk;
        let len = (run * chunk).min(size - offset);
        let data = rt
            .block_on(client.read(offset, len as usize))
            .with_context(|| format!("reading {len} bytes at {offset}"))?;
        for (k, block) in data.chunks(chunk as usize).enumerate() {
            let index = i + k as u64;
            let hash = match block_cvs(block) {
                _ if siterec_drivers::capture::is_zero(block) => None,
                Some(c) => {
                    let h = root(&c);
                    cvs.write(index, &h, &c)?;
                    Some(h)
                }
                None => hash_block(block),
            };
            if let Some(h) = &hash
                && Some(*h) != before(index)
            {
                changed.set(changed.get() + 1);
                delivered.set(delivered.get() + 1);
                sink.whole(index, block, h)?;
            }
            hashes[index as usize] = hash;
        }
        Ok(len)
    };
    // Reads the pages of `mask` of block `i`, coalescing neighbours.
    let read_pages = |client: &mut NbdClient<tokio::net::UnixStream>,
                      i: u64,
                      mask: PageMask|
     -> anyhow::Result<Vec<(u16, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut p = 0usize;
        while p < PAGES {
            if !mask.contains(p) {
                p += 1;
                continue;
            }
            let mut n = 1;
            while p + n < PAGES && mask.contains(p + n) {
                n += 1;
            }
            let offset = i * chunk + (p * PAGE) as u64;
            let data = rt
                .block_on(client.read(offset, n * PAGE))
                .with_context(|| format!("reading {} bytes at {offset}", n * PAGE))?;
            for (k, page) in data.chunks(PAGE).enumerate() {
                out.push(((p + k) as u16, page.to_vec()));
            }
            p += n;
        }
        Ok(out)
    };
    let mut i = 0u64;
    while i < blocks {
        let dirty = wanted[i as usize];
        if dirty.is_empty() {
            i += 1;
            continue;
        }
        let full = size - i * chunk >= chunk;
        if !paged || !full || dirty == PageMask::ALL {
            let mut run = 1;
            while run < READ_RUN_BLOCKS
                && i + run < blocks
                && !wanted[(i + run) as usize].is_empty()
                && !paged
            {
                run += 1;
            }
            bytes_read += read_whole(&mut client, &mut hashes, sink, i, run)?;
            i += run;
            continue;
        }
        let old_hash = before(i);
        // Pages to read, and the chaining values the clean ones keep.
        let (old_cvs, need) = match &old_hash {
            None => (Some(*zero_cvs()), Some(PageMask::EMPTY)),
            Some(h) => (cvs.read(i, h), sink.delta_needs(i)),
        };
        let (Some(old_cvs), Some(need)) = (old_cvs, need) else {
            bytes_read += read_whole(&mut client, &mut hashes, sink, i, 1)?;
            i += 1;
            continue;
        };
        let mask = dirty | need;
        if old_hash.is_some() && mask.count() > crate::pages::MAX_DELTA_PAGES {
            bytes_read += read_whole(&mut client, &mut hashes, sink, i, 1)?;
            i += 1;
            continue;
        }
        let pages = read_pages(&mut client, i, mask)?;
        bytes_read += (pages.len() * PAGE) as u64;
        let mut new_cvs = old_cvs;
        let mut stale = false;
        for (p, page) in &pages {
            let p = usize::from(*p);
            let cv = page_cv(p, page);
            if dirty.contains(p) {
                new_cvs[p] = cv;
            } else if cv != old_cvs[p] {
                stale = true;
            }
        }
        if stale {
            tracing::warn!(
                block = i,
                "a clean page differs from its chaining value: reading the block whole"
            );
            bytes_read += read_whole(&mut client, &mut hashes, sink, i, 1)?;
            i += 1;
            continue;
        }
        if new_cvs == *zero_cvs() {
            hashes[i as usize] = None;
            i += 1;
            continue;
        }
        let hash = root(&new_cvs);
        if Some(hash) != old_hash {
            changed.set(changed.get() + 1);
            delivered.set(delivered.get() + 1);
            let shipped = match old_hash {
                // A block that was all zeros: the rest of it is zeros.
                None => {
                    let mut block = vec![0u8; BLOCK];
                    for (p, page) in &pages {
                        let at = usize::from(*p) * PAGE;
                        block[at..at + PAGE].copy_from_slice(page);
                    }
                    sink.whole(i, &block, &hash)?;
                    true
                }
                Some(_) => {
                    let read: Vec<(u16, &[u8])> =
                        pages.iter().map(|(p, d)| (*p, d.as_slice())).collect();
                    sink.delta(i, &hash, &read)?
                }
            };
            if !shipped {
                bytes_read += read_whole(&mut client, &mut hashes, sink, i, 1)?;
                i += 1;
                continue;
            }
            cvs.write(i, &hash, &new_cvs)?;
        }
        hashes[i as usize] = Some(hash);
        i += 1;
    }
    let _ = rt.block_on(client.disconnect());
    Ok(ScanOutcome {
        hashes,
        consistent: true,
        method: SnapshotMethod::Fleece,
        size_bytes: size,
        bytes_read,
        changed_blocks: changed.get(),
        delivered_blocks: delivered.get(),
        attempts: 1,
        captured_at: view.taken_at,
    })
}

/// Marks a VM paused by siterec (not by its operator), so that an agent
/// that died while it was paused resumes it when it takes it over.
pub(crate) fn paused_marker(run_dir: &Path) -> PathBuf {
    run_dir.join("paused-by-siterec")
}

pub(crate) async fn pause_vm(vm: &mut Vm, run_dir: &Path) -> anyhow::Result<()> {
    write_durably(&paused_marker(run_dir), b"", 0o600)?;
    vm.qmp()
        .execute("stop", None)
        .await
        .context("pausing the VM for the group's point")?;
    Ok(())
}

pub(crate) async fn resume_vm(vm: &mut Vm, run_dir: &Path) {
    match vm.qmp().execute("cont", None).await {
        Ok(_) => {
            let _ = std::fs::remove_file(paused_marker(run_dir));
        }
        Err(e) => tracing::error!("resuming the VM after the group's point: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_virtual_size_is_read_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("3G")
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(virtual_size(&img, DiskFormat::Qcow2).unwrap(), 3 << 30);
        let raw = dir.path().join("b.img");
        std::fs::write(&raw, vec![1u8; 4096]).unwrap();
        assert_eq!(virtual_size(&raw, DiskFormat::Raw).unwrap(), 4096);
        let err = virtual_size(&raw, DiskFormat::Qcow2).unwrap_err();
        assert!(err.to_string().contains("not a qcow2"), "{err}");
    }
}
