//! Fleecing: a point-in-time, read-only view of a running VM's disks,
//! served by QEMU's NBD server, with changed-block tracking.
//!
//! For each disk `D` a temporary qcow2 overlay (`fleece-D`, file
//! `RUN/fleece-D.qcow2`) is added with the live disk node as its backing,
//! and a `blockdev-backup sync=none` job copies every block the guest is
//! about to overwrite into it first. Reading the overlay therefore gives the
//! disk as it was when the job started, while the guest goes on writing.
//! All disks start in one QMP `transaction`, so the views of several disks
//! belong to the same instant (crash-consistent across disks).
//!
//! Changed-block tracking uses two dirty bitmaps per disk:
//! - the *active* bitmap records every guest write since the last point;
//! - at a point, inside the same transaction, the active bitmap's bits move
//!   to a *frozen* bitmap (added disabled, merged, active cleared). The
//!   frozen bitmap is exported with the view as the NBD meta context
//!   `qemu:dirty-bitmap:FROZEN`: exactly the blocks written since the
//!   previous point.
//!
//! The caller removes the frozen bitmap once the point is safely recorded
//! ([`Vm::drop_frozen`]), or merges it back into the active one when the
//! point failed ([`Vm::restore_frozen`]); either way, nothing the guest
//! wrote is forgotten. Both are persistent in qcow2 images when asked, so
//! a clean QEMU restart keeps them; QEMU marks them inconsistent after a
//! crash.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Error, QmpError, Vm, disk_node, io_err};

/// One disk in a [`FleecePlan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleeceDisk {
    /// The disk's name in the spec.
    pub disk: String,
    /// The disk's virtual size in bytes.
    pub size: u64,
    /// The active dirty bitmap's name.
    pub active: String,
    /// Create the active bitmap in the transaction (it does not exist yet).
    pub create_active: bool,
    /// Move the active bitmap's bits to `frozen` in the transaction (the
    /// view then comes with the blocks changed since the last point).
    pub frozen: Option<String>,
    /// Make new bitmaps persistent (qcow2 images only).
    pub persistent: bool,
    /// Bytes per bit of new bitmaps (a power of two, 512 B–2 GiB); `None`:
    /// QEMU's default (the image's cluster size, 64 KiB for raw).
    pub granularity: Option<u32>,
}

/// What [`Vm::start_fleece`] exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleece {
    /// QEMU's NBD server socket.
    pub socket: PathBuf,
    /// Export names, one per disk of the plan (the disk's name).
    pub exports: Vec<String>,
    /// When the views were taken (the transaction's return).
    pub taken_at: std::time::SystemTime,
}

fn fleece_node(disk: &str) -> String {
    format!("fleece-{disk}")
}

fn fleece_job(disk: &str) -> String {
    format!("fleece-job-{disk}")
}

fn fleece_file(run_dir: &Path, disk: &str) -> PathBuf {
    run_dir.join(format!("fleece-{disk}.qcow2"))
}

/// True for a QMP error that says the object does not exist.
fn not_found(e: &QmpError) -> bool {
    match e {
        QmpError::Command { class, desc, .. } => {
            class == "DeviceNotFound"
                || desc.contains("not found")
                || desc.contains("No such")
                || desc.contains("Cannot find")
                || desc.contains("Failed to find")
                || desc.contains("doesn't exist")
                || desc.contains("does not exist")
        }
        _ => false,
    }
}

impl Vm {
    /// QEMU's NBD server socket (`RUN/nbd.sock`), started on first use.
    pub async fn nbd_socket(&mut self) -> Result<PathBuf, Error> {
        let sock = self.run_dir.join("nbd.sock");
        // `nbd-server-start` takes the legacy address form (`data` nested).
        let args =
            json!({ "addr": { "type": "unix", "data": { "path": sock.to_string_lossy() } } });
        match self.qmp.execute("nbd-server-start", Some(args)).await {
            Ok(_) => Ok(sock),
            Err(QmpError::Command { desc, .. }) if desc.contains("already running") => Ok(sock),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes point-in-time views of the plan's disks in one transaction
    /// (with the bitmap changes the plan asks for) and exports each over
    /// NBD as its disk's name, read-only, with the frozen bitmap if any.
    /// Leftovers of an earlier fleece are removed first. On error nothing
    /// of the fleece is left behind; bitmap changes are all-or-nothing.
    pub async fn start_fleece(&mut self, plan: &[FleeceDisk]) -> Result<Fleece, Error> {
        for d in plan {
            self.node_of(&d.disk)?;
        }
        self.stop_fleece().await?;
        let socket = self.nbd_socket().await?;
        let result = self.fleece_inner(plan, &socket).await;
        if result.is_err() {
            let _ = self.stop_fleece().await;
        }
        result
    }

    async fn fleece_inner(&mut self, plan: &[FleeceDisk], socket: &Path) -> Result<Fleece, Error> {
        for d in plan {
            let file = fleece_file(&self.run_dir, &d.disk);
            create_overlay(&file, d.size).await?;
            let args = json!({
                "driver": "qcow2",
                "node-name": fleece_node(&d.disk),
                "file": { "driver": "file", "filename": file.to_string_lossy() },
                "backing": disk_node(&d.disk),
            });
            self.qmp.execute("blockdev-add", Some(args)).await?;
        }
        let mut actions = Vec::new();
        for d in plan {
            let node = disk_node(&d.disk);
            let add = |name: &str, disabled: bool| {
                let mut data = json!({ "node": node, "name": name, "persistent": d.persistent });
                if disabled {
                    data["disabled"] = json!(true);
                }
                if let Some(g) = d.granularity {
                    data["granularity"] = json!(g);
                }
                json!({ "type": "block-dirty-bitmap-add", "data": data })
            };
            if d.create_active {
                actions.push(add(&d.active, false));
            }
            if let Some(frozen) = &d.frozen {
                actions.push(add(frozen, true));
                actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                    "node": node, "target": frozen, "bitmaps": [d.active] }}));
                actions.push(json!({"type": "block-dirty-bitmap-clear", "data": {
                    "node": node, "name": d.active }}));
            }
            actions.push(json!({"type": "blockdev-backup", "data": {
                "device": node, "target": fleece_node(&d.disk), "sync": "none",
                "job-id": fleece_job(&d.disk), "auto-finalize": true, "auto-dismiss": true }}));
        }
        self.qmp
            .execute("transaction", Some(json!({ "actions": actions })))
            .await?;
        let taken_at = std::time::SystemTime::now();
        let mut exports = Vec::new();
        for d in plan {
            let mut args = json!({
                "type": "nbd",
                "id": fleece_node(&d.disk),
                "node-name": fleece_node(&d.disk),
                "name": d.disk,
                "writable": false,
            });
            if let Some(frozen) = &d.frozen {
                args["bitmaps"] = json!([{ "node": disk_node(&d.disk), "name": frozen }]);
            }
            self.qmp.execute("block-export-add", Some(args)).await?;
            exports.push(d.disk.clone());
        }
        Ok(Fleece {
            socket: socket.to_path_buf(),
            exports,
            taken_at,
        })
    }

    /// Removes every fleece of this VM: exports, backup jobs, overlay nodes
    /// and files. Idempotent; safe after a crash of whoever started them.
    pub async fn stop_fleece(&mut self) -> Result<(), Error> {
        let disks: Vec<String> = self.spec.disks.iter().map(|d| d.name.clone()).collect();
        for d in &disks {
            let args = json!({ "id": fleece_node(d), "mode": "hard" });
            match self.qmp.execute("block-export-del", Some(args)).await {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
            let args = json!({ "device": fleece_job(d), "force": true });
            match self.qmp.execute("block-job-cancel", Some(args)).await {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Exports and jobs go away asynchronously; the overlay can only be
        // deleted once nothing uses it.
        let begun = Instant::now();
        loop {
            let exports = self.qmp.execute("query-block-exports", None).await?;
            let jobs = self.qmp.execute("query-block-jobs", None).await?;
            let ours = |v: &Value, key: &str| {
                v.as_array().is_some_and(|a| {
                    a.iter().any(|e| {
                        e.get(key)
                            .and_then(Value::as_str)
                            .is_some_and(|id| id.starts_with("fleece-"))
                    })
                })
            };
            if !ours(&exports, "id") && !ours(&jobs, "device") {
                break;
            }
            if begun.elapsed() > Duration::from_secs(10) {
                return Err(Error::BadReply {
                    command: "block-job-cancel".into(),
                    detail: "fleece exports or jobs still present after 10 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for d in &disks {
            let args = json!({ "node-name": fleece_node(d) });
            match self.qmp.execute("blockdev-del", Some(args)).await {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
            let file = fleece_file(&self.run_dir, d);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", file.display()))(e)),
            }
        }
        Ok(())
    }

    /// Merges `frozen` back into `active` and removes it: the blocks it
    /// held count as changed again (the point taken with it was not kept).
    /// Nothing to do when `frozen` does not exist.
    pub async fn restore_frozen(
        &mut self,
        disk: &str,
        active: &str,
        frozen: &str,
    ) -> Result<(), Error> {
        let node = self.node_of(disk)?;
        let bitmaps = self.dirty_bitmaps(disk).await?;
        if !bitmaps.iter().any(|b| b.name == frozen) {
            return Ok(());
        }
        if bitmaps.iter().any(|b| b.name == active) {
            let args = json!({ "node": node, "target": active, "bitmaps": [frozen] });
            self.qmp
                .execute("block-dirty-bitmap-merge", Some(args))
                .await?;
        }
        self.remove_dirty_bitmap(disk, frozen).await
    }

    /// Removes `frozen` (its point is recorded). Nothing to do when it does
    /// not exist.
    pub async fn drop_frozen(&mut self, disk: &str, frozen: &str) -> Result<(), Error> {
        let bitmaps = self.dirty_bitmaps(disk).await?;
        if !bitmaps.iter().any(|b| b.name == frozen) {
            return Ok(());
        }
        self.remove_dirty_bitmap(disk, frozen).await
    }
}

/// Creates an empty qcow2 image of `size` bytes at `path` (replacing one
/// left over) with `qemu-img create`.
async fn create_overlay(path: &Path, size: u64) -> Result<(), Error> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .await
        .map_err(io_err("running qemu-img create (is qemu-utils installed?)"))?;
    if !out.status.success() {
        return Err(Error::Io {
            what: format!("qemu-img create {}", path.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}
