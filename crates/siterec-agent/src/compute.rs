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
//! NICs keep the source's MAC; each connects to its mapped recovery
//! network (QEMU user-mode NAT in this version) or, without one, to an
//! isolated network with no route anywhere (`restrict=on`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use siterec_core::wire::{ReplicaNic, ReplicaStarted, VmInfo};
use siterec_qemu::{DiskFormat, DiskSpec, NicSpec, Vm, VmSpec};
use siterec_store::Store;
use tokio::sync::Mutex;

use crate::target::Target;
use crate::util::write_durably;

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
    spec: VmSpec,
    started: ReplicaStarted,
}

/// The replica VMs of this agent.
pub struct Compute {
    root: PathBuf,
    vms: Mutex<HashMap<String, Vm>>,
}

impl Compute {
    pub fn new(root: PathBuf) -> Compute {
        Compute {
            root,
            vms: Mutex::new(HashMap::new()),
        }
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
        target: &Target,
        store: &Store,
        req: ReplicaRequest<'_>,
    ) -> anyhow::Result<ReplicaStarted> {
        siterec_core::names::check_name("vm", req.vm_name)?;
        let dir = self.dir(req.vm_name);
        let record_path = dir.join("replica.json");
        let mut vms = self.vms.lock().await;
        if let Ok(bytes) = std::fs::read(&record_path) {
            let record: ReplicaRecord = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", record_path.display()))?;
            if record.item != req.item || record.point_id != req.point_id {
                bail!(
                    "a replica VM named '{}' already exists (item {}, point {}): remove it first (test failover cleanup)",
                    req.vm_name,
                    record.item,
                    record.point_id
                );
            }
            let running = match vms.get_mut(req.vm_name) {
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
                vms.insert(req.vm_name.to_string(), vm);
            }
            return Ok(record.started);
        }
        // A start that did not finish: begin again from nothing.
        if let Some(mut vm) = vms.remove(req.vm_name) {
            let _ = vm.kill().await;
        }
        kill_leftover(&dir).await;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
        let disks_dir = dir.join("disks");
        let disks = target
            .materialize_into(
                store,
                req.item,
                req.point_id,
                &["qcow2".to_string()],
                &disks_dir,
            )
            .await
            .with_context(|| format!("writing the disks of point {}", req.point_id))?;
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
        let record = ReplicaRecord {
            item: req.item.to_string(),
            point_id: req.point_id.to_string(),
            test: req.test,
            spec,
            started: started.clone(),
        };
        write_durably(&record_path, &serde_json::to_vec_pretty(&record)?, 0o600)?;
        tracing::info!(vm = req.vm_name, item = req.item, point = req.point_id, test = req.test, pid = ?vm.pid(), "replica VM started");
        vms.insert(req.vm_name.to_string(), vm);
        Ok(started)
    }

    /// Powers the replica VM off and deletes it with everything it created.
    /// A VM that does not exist is already removed.
    pub async fn remove_replica(&self, item: &str, vm_name: &str) -> anyhow::Result<()> {
        siterec_core::names::check_name("vm", vm_name)?;
        let dir = self.dir(vm_name);
        let mut vms = self.vms.lock().await;
        if let Ok(bytes) = std::fs::read(dir.join("replica.json"))
            && let Ok(record) = serde_json::from_slice::<ReplicaRecord>(&bytes)
            && record.item != item
        {
            bail!(
                "the replica VM '{vm_name}' belongs to item {}, not {item}",
                record.item
            );
        }
        if let Some(vm) = vms.remove(vm_name) {
            vm.quit(std::time::Duration::from_secs(5))
                .await
                .with_context(|| format!("powering off replica VM '{vm_name}'"))?;
        }
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
    };
    if let Ok(Some(mut vm)) = Vm::adopt(spec, dir).await {
        let _ = vm.kill().await;
    }
}
