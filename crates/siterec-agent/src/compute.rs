//! The compute driver of the recovery agent: replica VMs booted from
//! recovery points (failover and test failover) and removed again (test
//! failover cleanup).
//!
//! A replica VM `NAME` lives in `FAILOVER_DIR/vms/NAME/`: its disks are the
//! recovery point written as qcow2 images under `disks/`, QEMU's runtime
//! files (QMP sockets, `serial.log`, `qemu.pid`) next to them, and
//! `replica.json` records which item and point it was made from. That file
//! is written last, after QEMU started: a directory without it is a start
//! that did not finish and is started over.
//!
//! Instant failover: the VM does not wait for its disks to be written. Each
//! disk of the point is served over NBD from the replica store
//! ([`crate::instant::StoreExport`], socket `nbd-DISK.sock`), the VM boots
//! at once from a local qcow2 overlay backed by that export, and QEMU's
//! `block-stream` copies the rest into the overlay meanwhile. The task ends
//! when every copy is done and the overlays stand alone; `replica.json`
//! says `copying` until then, so a restarted agent serves the exports again
//! and finishes the copy without losing what the VM wrote.
//!
//! NICs keep the source's MAC; each connects to its mapped recovery
//! network (QEMU user-mode NAT in this version) or, without one, to an
//! isolated network with no route anywhere (`restrict=on`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use siterec_core::wire::{MaterializedDisk, ReplicaNic, ReplicaStarted, VmInfo};
use siterec_nbd::{NbdServer, ServerConfig, UnixServer};
use siterec_qemu::{DiskFormat, DiskSpec, NicSpec, Vm, VmSpec};
use siterec_store::Store;
use tokio::sync::Mutex;

use crate::util::write_durably;
use crate::vm::VmHost;

/// The network name a NIC without a mapped network is reported on.
pub const ISOLATED_NETWORK: &str = "isolated";

/// What a `StartReplica` task asks for.
pub struct ReplicaRequest<'a> {
    pub item: &'a str,
    pub point_id: &'a str,
    pub vm_name: &'a str,
    pub test: bool,
    pub vm: &'a VmInfo,
    pub nics: &'a [ReplicaNic],
}

/// `replica.json`: what a replica VM was made from and what it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct ReplicaRecord {
    item: String,
    point_id: String,
    test: bool,
    /// The disks are still being copied from the replica store.
    #[serde(default)]
    copying: bool,
    spec: VmSpec,
    started: ReplicaStarted,
}

/// The replica VMs of this agent. They run in the agent's [`VmHost`]
/// beside its configured VMs, so that a reprotect replicates a replica VM
/// through its QEMU as any VM.
pub struct Compute {
    root: PathBuf,
    host: std::sync::RwLock<Arc<VmHost>>,
    /// One VM operation at a time.
    ops: Mutex<()>,
}

impl Compute {
    pub fn new(root: PathBuf) -> Compute {
        let host = Arc::new(VmHost::new(&[], &root));
        Compute {
            root,
            host: std::sync::RwLock::new(host),
            ops: Mutex::new(()),
        }
    }

    /// The agent's VMs, which replica VMs join.
    pub fn set_host(&self, host: Arc<VmHost>) {
        if let Ok(mut h) = self.host.write() {
            *h = host;
        }
    }

    /// Puts the replica VMs an earlier run of the agent made (each with a
    /// `replica.json`) into the agent's VMs, so that their QEMUs are taken
    /// over and a reprotect finds them after a restart.
    pub async fn register_existing(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let host = self.host();
        for entry in entries.flatten() {
            let dir = entry.path();
            let Ok(bytes) = std::fs::read(dir.join("replica.json")) else {
                continue;
            };
            match serde_json::from_slice::<ReplicaRecord>(&bytes) {
                Ok(record) => {
                    if let Err(e) = host.replica(record.spec, dir.clone()).await {
                        tracing::warn!(dir = %dir.display(), "replica VM not taken over: {e:#}");
                    }
                }
                Err(e) => tracing::warn!(dir = %dir.display(), "unreadable replica.json: {e}"),
            }
        }
    }

    pub fn host(&self) -> Arc<VmHost> {
        match self.host.read() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The disks of the failed-over (not test) replica VM of `item`, if
    /// this agent has one: what a reprotect seeds from here.
    pub fn replica_disks_of(&self, item: &str) -> Option<Vec<DiskSpec>> {
        let entries = std::fs::read_dir(&self.root).ok()?;
        for entry in entries.flatten() {
            let Ok(bytes) = std::fs::read(entry.path().join("replica.json")) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<ReplicaRecord>(&bytes) else {
                continue;
            };
            if record.item == item && !record.test {
                return Some(record.spec.disks);
            }
        }
        None
    }

    fn dir(&self, vm_name: &str) -> PathBuf {
        self.root.join(vm_name)
    }

    /// Creates the replica VM from the point and starts it. Asked again for
    /// a VM already made from the same item and point, answers what it
    /// started (and starts its QEMU again if that stopped); a VM of that
    /// name made from anything else is refused.
    pub async fn start_replica(
        &self,
        store: &Store,
        req: ReplicaRequest<'_>,
    ) -> anyhow::Result<ReplicaStarted> {
        siterec_core::names::check_name("vm", req.vm_name)?;
        let dir = self.dir(req.vm_name);
        let record_path = dir.join("replica.json");
        let _op = self.ops.lock().await;
        let host = self.host();
        let old = std::fs::read(&record_path)
            .ok()
            .map(|bytes| serde_json::from_slice::<ReplicaRecord>(&bytes))
            .transpose()
            .with_context(|| format!("reading {}", record_path.display()))?;
        // The item's own failed-over VM made from another point (failed
        // back since, or a change of point) is replaced.
        let replaced = old.as_ref().is_some_and(|r| {
            r.item == req.item && !r.test && !req.test && r.point_id != req.point_id
        });
        if let Some(record) = old.filter(|_| !replaced) {
            if record.item != req.item || record.point_id != req.point_id {
                bail!(
                    "a replica VM named '{}' already exists (item {}, point {}): remove it first (test failover cleanup)",
                    req.vm_name,
                    record.item,
                    record.point_id
                );
            }
            // A copy interrupted by a restart: serve the point again first
            // (the VM reads through it), then finish the copy.
            let servers = if record.copying {
                let manifest = store.read_manifest(req.item, req.point_id).await?;
                serve_point(store, &manifest, &dir)?
            } else {
                Vec::new()
            };
            let slot = host.replica(record.spec.clone(), dir.clone()).await?;
            let mut slot = slot.lock().await;
            let running = match &mut slot.vm {
                Some(vm) => vm.status().await.is_ok(),
                None => false,
            };
            if !running {
                let vm = match Vm::adopt(record.spec.clone(), &dir).await? {
                    Some(vm) => vm,
                    None => Vm::start(record.spec.clone(), &dir)
                        .await
                        .with_context(|| format!("starting replica VM '{}'", req.vm_name))?,
                };
                slot.vm = Some(vm);
            }
            if record.copying {
                let vm = slot
                    .vm
                    .as_mut()
                    .ok_or_else(|| anyhow::anyhow!("replica VM '{}' is gone", req.vm_name))?;
                stream_disks(vm, &record.spec).await?;
                stop_serving(servers).await;
                let mut done = record.clone();
                done.copying = false;
                write_durably(&record_path, &serde_json::to_vec_pretty(&done)?, 0o600)?;
            }
            return Ok(record.started);
        }
        // A start that did not finish, or a VM replaced: begin again from
        // nothing.
        if let Some(slot) = host.get(req.vm_name)
            && let Some(mut vm) = slot.lock().await.vm.take()
        {
            let _ = vm.kill().await;
        }
        kill_leftover(&dir).await;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
        let disks_dir = dir.join("disks");
        std::fs::create_dir_all(&disks_dir)
            .with_context(|| format!("creating {}", disks_dir.display()))?;
        let manifest = store.read_manifest(req.item, req.point_id).await?;
        let servers = serve_point(store, &manifest, &dir)?;
        let mut disks = Vec::new();
        for d in &manifest.disks {
            let overlay = disks_dir.join(format!("{}.qcow2", d.disk_id));
            create_overlay(&overlay, &nbd_socket(&dir, &d.disk_id), &d.disk_id, d.size).await?;
            disks.push(MaterializedDisk {
                disk: d.disk_id.clone(),
                format: "qcow2".into(),
                path: overlay.display().to_string(),
                size_bytes: d.size,
                bytes_written: None,
            });
        }
        let nics: Vec<NicSpec> = req
            .nics
            .iter()
            .map(|n| NicSpec {
                name: n.name.clone(),
                network: n
                    .network
                    .clone()
                    .unwrap_or_else(|| ISOLATED_NETWORK.to_string()),
                mac: n.mac.clone(),
                isolated: n.network.is_none(),
            })
            .collect();
        let spec = VmSpec {
            name: req.vm_name.to_string(),
            memory_mib: req.vm.memory_mib,
            cpus: req.vm.cpus,
            disks: disks
                .iter()
                .map(|d| DiskSpec {
                    name: d.disk.clone(),
                    path: PathBuf::from(&d.path),
                    format: DiskFormat::Qcow2,
                })
                .collect(),
            nics,
            kernel: req.vm.kernel.as_ref().map(PathBuf::from),
            initrd: req.vm.initrd.as_ref().map(PathBuf::from),
            append: req.vm.append.clone(),
            guest_agent: false,
        };
        let vm = Vm::start(spec.clone(), &dir)
            .await
            .with_context(|| format!("starting replica VM '{}'", req.vm_name))?;
        let started = ReplicaStarted {
            vm_name: req.vm_name.to_string(),
            run_dir: dir.display().to_string(),
            serial_log: vm.serial_log_path().display().to_string(),
            disks,
            nics: req.nics.to_vec(),
        };
        let mut record = ReplicaRecord {
            item: req.item.to_string(),
            point_id: req.point_id.to_string(),
            test: req.test,
            copying: true,
            spec,
            started: started.clone(),
        };
        write_durably(&record_path, &serde_json::to_vec_pretty(&record)?, 0o600)?;
        tracing::info!(vm = req.vm_name, item = req.item, point = req.point_id, test = req.test, pid = ?vm.pid(), "replica VM started from the replica store; copying its disks");
        let copy_started = std::time::Instant::now();
        let slot = host.replica(record.spec.clone(), dir.clone()).await?;
        let mut slot = slot.lock().await;
        let vm = slot.vm.insert(vm);
        stream_disks(vm, &record.spec).await?;
        stop_serving(servers).await;
        record.copying = false;
        write_durably(&record_path, &serde_json::to_vec_pretty(&record)?, 0o600)?;
        tracing::info!(
            vm = req.vm_name,
            secs = copy_started.elapsed().as_secs_f64(),
            "replica VM's disks copied to local storage"
        );
        Ok(started)
    }

    /// Powers the replica VM off and deletes it with everything it created.
    /// A VM that does not exist is already removed.
    pub async fn remove_replica(&self, item: &str, vm_name: &str) -> anyhow::Result<()> {
        siterec_core::names::check_name("vm", vm_name)?;
        let dir = self.dir(vm_name);
        let _op = self.ops.lock().await;
        let host = self.host();
        if let Ok(bytes) = std::fs::read(dir.join("replica.json"))
            && let Ok(record) = serde_json::from_slice::<ReplicaRecord>(&bytes)
            && record.item != item
        {
            bail!(
                "the replica VM '{vm_name}' belongs to item {}, not {item}",
                record.item
            );
        }
        if let Some(slot) = host.get(vm_name) {
            let vm = slot.lock().await.vm.take();
            if let Some(vm) = vm {
                vm.quit(std::time::Duration::from_secs(5))
                    .await
                    .with_context(|| format!("powering off replica VM '{vm_name}'"))?;
            }
        }
        host.forget_replica(vm_name);
        kill_leftover(&dir).await;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(vm = vm_name, item, "replica VM removed");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
}

impl Compute {
    /// Powers off and deletes every replica VM (test or not) made from
    /// `item`'s points; answers their names.
    pub async fn remove_replicas_of(&self, item: &str) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.root.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", self.root.display()))?;
            let Ok(bytes) = std::fs::read(entry.path().join("replica.json")) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<ReplicaRecord>(&bytes) else {
                continue;
            };
            if record.item == item {
                let name = entry.file_name().to_string_lossy().into_owned();
                self.remove_replica(item, &name).await?;
                names.push(name);
            }
        }
        Ok(names)
    }
}

fn nbd_socket(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("nbd-{disk}.sock"))
}

/// Serves every disk of `manifest` over NBD from the store, one socket each.
fn serve_point(
    store: &Store,
    manifest: &siterec_store::Manifest,
    dir: &Path,
) -> anyhow::Result<Vec<UnixServer>> {
    let mut servers = Vec::new();
    for d in &manifest.disks {
        let export = Arc::new(crate::instant::StoreExport::new(store.clone(), d.clone()));
        let server = NbdServer::new(export, ServerConfig::new(d.disk_id.clone()))
            .with_context(|| format!("NBD export of disk '{}'", d.disk_id))?;
        let sock = nbd_socket(dir, &d.disk_id);
        servers.push(
            server
                .listen_unix(&sock)
                .with_context(|| format!("listening on {}", sock.display()))?,
        );
    }
    Ok(servers)
}

async fn stop_serving(servers: Vec<UnixServer>) {
    for s in servers {
        s.shutdown().await;
    }
}

/// An empty qcow2 overlay of `size` bytes whose backing is the NBD export
/// `export` on `socket` (raw).
async fn create_overlay(path: &Path, socket: &Path, export: &str, size: u64) -> anyhow::Result<()> {
    let backing = serde_json::json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": { "type": "unix", "path": socket.to_string_lossy() },
            "export": export,
        },
    });
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .arg(format!("json:{backing}"))
        .arg(path)
        .arg(size.to_string())
        .output()
        .await
        .context("running qemu-img create (is qemu-utils installed?)")?;
    if !out.status.success() {
        bail!(
            "qemu-img create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Copies each disk's backing (the NBD export) into its overlay with
/// `block-stream` and waits until every overlay stands alone.
async fn stream_disks(vm: &mut Vm, spec: &VmSpec) -> anyhow::Result<()> {
    for d in &spec.disks {
        let args = serde_json::json!({
            "job-id": format!("stream-{}", d.name),
            "device": siterec_qemu::disk_node(&d.name),
        });
        match vm.qmp().execute("block-stream", Some(args)).await {
            Ok(_) => {}
            // Already streaming (a redelivered task), or nothing left to
            // stream (the overlay has no backing any more).
            Err(siterec_qemu::QmpError::Command { desc, .. })
                if desc.contains("in use") || desc.contains("already") => {}
            Err(e) => return Err(e).with_context(|| format!("copying disk '{}'", d.name)),
        }
    }
    loop {
        let jobs = vm.qmp().execute("query-block-jobs", None).await?;
        let ours = jobs.as_array().is_some_and(|a| {
            a.iter().any(|j| {
                j.get("device")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|id| id.starts_with("stream-"))
            })
        });
        for ev in vm.qmp().take_events() {
            if ev.event == "BLOCK_JOB_COMPLETED"
                && let Some(err) = ev.data.get("error").and_then(serde_json::Value::as_str)
            {
                bail!("copying a disk of the replica VM failed: {err}");
            }
        }
        if !ours {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The copies are durable on the recovery host before the task says so:
    // QEMU keeps qcow2 metadata in memory until a flush, and QMP has no
    // flush command, so flush through the device as the guest would.
    for d in &spec.disks {
        let cmd = format!(
            "qemu-io -d /machine/peripheral/vd-{}/virtio-backend \"flush\"",
            d.name
        );
        let out = vm
            .qmp()
            .execute(
                "human-monitor-command",
                Some(serde_json::json!({ "command-line": cmd })),
            )
            .await
            .with_context(|| format!("flushing disk '{}'", d.name))?;
        let text = out.as_str().unwrap_or_default();
        if !text.trim().is_empty() {
            bail!("flushing disk '{}' of the replica VM: {text}", d.name);
        }
    }
    Ok(())
}

/// Stops a QEMU an earlier run of the agent left running in `dir`.
async fn kill_leftover(dir: &Path) {
    let spec = VmSpec {
        name: "leftover".into(),
        memory_mib: 16,
        cpus: 1,
        disks: vec![],
        nics: vec![],
        kernel: None,
        initrd: None,
        append: None,
        guest_agent: false,
    };
    if let Ok(Some(mut vm)) = Vm::adopt(spec, dir).await {
        let _ = vm.kill().await;
    }
}
