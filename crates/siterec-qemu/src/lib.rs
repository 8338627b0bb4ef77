//! A QEMU VM driver: starts `qemu-system-x86_64` from a [`VmSpec`] and
//! manages it over QMP.
//!
//! Supported in this version:
//! - x86_64 `q35` machines, KVM when `/dev/kvm` opens and the CPU shows
//!   `vmx`/`svm`, else TCG; no display, no default devices; the guest's
//!   first serial port goes to `RUN/serial.log`, QEMU's own messages to
//!   `RUN/qemu.log`, QMP listens on `RUN/qmp.sock` (the driver's) and
//!   `RUN/admin.sock` (the operator's); QEMU's pid is in `RUN/qemu.pid`.
//! - Disks: qcow2 or raw image files as `-blockdev` (format node
//!   `disk-<name>` on file node `file-<name>`) on `virtio-blk-pci` devices
//!   with id `vd-<name>`.
//! - NICs: `virtio-net-pci` (id `nic-<name>`) on a user-mode backend
//!   (`net-<name>`), restricted (`restrict=on`: no route anywhere) for an
//!   isolated NIC; the spec's network is a name ([`Vm::query_nics`]).
//! - Direct kernel boot (`kernel`, `initrd`, `append`).
//! - QMP ([`qmp::Qmp`], our own): block and NIC queries, dirty bitmaps (add,
//!   list, clear, remove; persistent ones are stored in qcow2 images when
//!   QEMU closes them), `query-status`, `quit`.
//! - The guest agent (`guest_agent` in the spec): a virtio-serial port
//!   `org.qemu.guest_agent.0` on the chardev socket `RUN/qga.sock`, and a
//!   client of our own ([`ga::GuestAgent`], [`Vm::guest_agent`]): ping,
//!   info, fsfreeze freeze/thaw/status.
//!
//! QEMU runs with `-no-shutdown`: when the guest powers off the VM stops
//! in state `shutdown` and stays queryable until [`Vm::quit`]. QEMU is
//! killed when its [`Vm`] is dropped.
//!
//! Not supported yet: other machine types or architectures, bridged or
//! routed networks, CD-ROMs, firmware choice, hotplug.

pub mod fleece;
pub mod ga;
pub mod qmp;
pub mod spec;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

pub use fleece::{Fleece, FleeceDisk};
pub use ga::{FsfreezeStatus, GaError, GaInfo, GuestAgent};
pub use qmp::{Event, Qmp, QmpError};
pub use spec::{DiskFormat, DiskSpec, NicSpec, SpecError, VmSpec};

/// How long to wait for QEMU's QMP socket after spawning it.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A driver failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid VM spec: {0}")]
    Spec(#[from] SpecError),
    #[error("qemu-system-x86_64 not found on PATH")]
    QemuMissing,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited during start ({status}): {log}")]
    StartFailed { status: ExitStatus, log: String },
    #[error("QEMU's QMP socket did not appear within {0:?}")]
    StartTimeout(Duration),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("no disk named {0:?} in this VM")]
    UnknownDisk(String),
    #[error("unexpected QMP reply to {command}: {detail}")]
    BadReply { command: String, detail: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The accelerator a VM runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// KVM when `/dev/kvm` opens read-write and the CPU flags show `vmx` or
/// `svm` (a nested host without them can expose a `/dev/kvm` whose guests
/// never run), else TCG.
pub fn choose_accel() -> Accel {
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hw_virt = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
        s.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    if kvm_opens && hw_virt {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Node name of a disk's format node.
pub fn disk_node(disk: &str) -> String {
    format!("disk-{disk}")
}

/// Node name of a disk's file node.
pub fn file_node(disk: &str) -> String {
    format!("file-{disk}")
}

/// One disk as QEMU sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// The disk's name in the spec.
    pub disk: String,
    /// Its format node (`disk-<name>`).
    pub node_name: String,
    /// The image file.
    pub file: String,
    /// QEMU's format driver (`qcow2`, `raw`).
    pub format: String,
    pub dirty_bitmaps: Vec<DirtyBitmap>,
}

/// A dirty bitmap on a disk's format node.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmap {
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes (a multiple of the granularity, capped at the disk size).
    pub count: u64,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub busy: bool,
    /// A persistent bitmap QEMU could not trust when it loaded it (QEMU
    /// was not shut down cleanly while the bitmap was in use).
    #[serde(default)]
    pub inconsistent: bool,
}

/// A NIC as reported: the spec's network and the MAC the guest sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicInfo {
    pub name: String,
    pub network: String,
    /// The spec's MAC, or the one QEMU assigned.
    pub mac: String,
}

/// `query-status`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct VmStatus {
    pub running: bool,
    /// QEMU's run state: `running`, `paused`, `shutdown`, …
    pub status: String,
}

/// A running QEMU process and its QMP session.
#[derive(Debug)]
pub struct Vm {
    spec: VmSpec,
    run_dir: PathBuf,
    accel: Accel,
    /// QEMU's process when this `Vm` spawned it; `None` when it was
    /// adopted ([`Vm::adopt`]) from an earlier owner.
    child: Option<Child>,
    /// QEMU's pid (from `RUN/qemu.pid`), also for an adopted QEMU.
    pid: Option<u32>,
    qmp: Qmp,
    ga: Option<GuestAgent>,
}

/// The `qemu-system-x86_64` arguments for `spec` with its runtime files in
/// `run_dir` (without validating the spec).
pub fn qemu_args(spec: &VmSpec, run_dir: &Path, accel: Accel) -> Vec<String> {
    let path = |name: &str| run_dir.join(name).to_string_lossy().into_owned();
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={}", spec.name)]);
    push(&["-machine", "q35", "-accel", accel.as_str()]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-nodefaults", "-display", "none", "-no-shutdown"]);
    push(&["-pidfile", &path("qemu.pid")]);
    // QEMU's option syntax doubles commas inside values.
    let qmp = format!(
        "unix:{},server=on,wait=off",
        path("qmp.sock").replace(',', ",,")
    );
    push(&["-qmp", &qmp]);
    // A second QMP monitor for the operator (siterec never uses it): QMP
    // serves one client at a time and the driver holds `qmp.sock`.
    let admin = format!(
        "unix:{},server=on,wait=off",
        path("admin.sock").replace(',', ",,")
    );
    push(&["-qmp", &admin]);
    push(&["-serial", &format!("file:{}", path("serial.log"))]);
    for d in &spec.disks {
        // JSON syntax: no escaping of the path needed.
        let blockdev = json!({
            "driver": d.format.as_str(),
            "node-name": disk_node(&d.name),
            "file": {
                "driver": "file",
                "filename": d.path.to_string_lossy(),
                "node-name": file_node(&d.name),
            },
        });
        let device = json!({
            "driver": "virtio-blk-pci",
            "drive": disk_node(&d.name),
            "id": format!("vd-{}", d.name),
        });
        push(&["-blockdev", &blockdev.to_string()]);
        push(&["-device", &device.to_string()]);
    }
    for n in &spec.nics {
        let mut netdev = format!("user,id=net-{}", n.name);
        if n.isolated {
            netdev.push_str(",restrict=on");
        }
        push(&["-netdev", &netdev]);
        let mut device = format!("virtio-net-pci,netdev=net-{0},id=nic-{0}", n.name);
        if let Some(mac) = &n.mac {
            device.push_str(&format!(",mac={mac}"));
        }
        push(&["-device", &device]);
    }
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &k.to_string_lossy()]);
    }
    if let Some(i) = &spec.initrd {
        push(&["-initrd", &i.to_string_lossy()]);
    }
    if let Some(ap) = &spec.append {
        push(&["-append", ap]);
    }
    if spec.guest_agent {
        a.extend(ga::qemu_args(run_dir));
    }
    a
}

fn find_qemu() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl Vm {
    /// Validates `spec`, starts QEMU with its runtime files in `run_dir`
    /// (created if missing) and negotiates QMP. Nothing is spawned when the
    /// spec is invalid.
    pub async fn start(spec: VmSpec, run_dir: &Path) -> Result<Vm, Error> {
        spec.validate()?;
        let qemu = find_qemu().ok_or(Error::QemuMissing)?;
        std::fs::create_dir_all(run_dir)
            .map_err(io_err(format!("creating {}", run_dir.display())))?;
        let sock = run_dir.join("qmp.sock");
        match std::fs::remove_file(&sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", sock.display()))(e)),
        }
        let log_path = run_dir.join("qemu.log");
        let log = std::fs::File::create(&log_path)
            .map_err(io_err(format!("creating {}", log_path.display())))?;
        let accel = choose_accel();
        let mut child = Command::new(qemu)
            .args(qemu_args(&spec, run_dir, accel))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io_err("starting qemu-system-x86_64"))?;
        let read_log = || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let begun = Instant::now();
        let qmp = loop {
            if let Some(status) = child
                .try_wait()
                .map_err(io_err("waiting for qemu-system-x86_64"))?
            {
                return Err(Error::StartFailed {
                    status,
                    log: read_log(),
                });
            }
            if sock.exists() {
                match Qmp::connect(&sock, QMP_TIMEOUT).await {
                    Ok(q) => break q,
                    // Not listening yet.
                    Err(QmpError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if begun.elapsed() > START_TIMEOUT {
                return Err(Error::StartTimeout(START_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let pid = child.id();
        Ok(Vm {
            ga: ga::for_spec(&spec, run_dir),
            spec,
            run_dir: run_dir.to_path_buf(),
            accel,
            child: Some(child),
            pid,
            qmp,
        })
    }

    /// Takes over a QEMU that an earlier owner (a previous run of the
    /// agent) started for `spec` in `run_dir` and that still runs: connects
    /// to its QMP socket. `Ok(None)` when no QEMU answers there. An adopted
    /// QEMU is not killed when the `Vm` is dropped (it was not before).
    pub async fn adopt(spec: VmSpec, run_dir: &Path) -> Result<Option<Vm>, Error> {
        let sock = run_dir.join("qmp.sock");
        if !sock.exists() {
            return Ok(None);
        }
        let qmp = match Qmp::connect(&sock, QMP_TIMEOUT).await {
            Ok(q) => q,
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let pid = std::fs::read_to_string(run_dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(Some(Vm {
            // A QEMU started without the port (an older spec) has no
            // socket: the client finds it absent.
            ga: ga::for_spec(&spec, run_dir),
            spec,
            run_dir: run_dir.to_path_buf(),
            accel: choose_accel(),
            child: None,
            pid,
            qmp,
        }))
    }

    /// The directory of the VM's runtime files.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// QEMU's version from the QMP greeting.
    pub fn qemu_version(&self) -> &str {
        &self.qmp.version
    }

    /// QEMU's process id (none once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        match &self.child {
            Some(c) => c.id(),
            None => self.pid,
        }
    }

    /// The guest's serial console log.
    pub fn serial_log_path(&self) -> PathBuf {
        self.run_dir.join("serial.log")
    }

    /// QEMU's own standard error.
    pub fn qemu_log_path(&self) -> PathBuf {
        self.run_dir.join("qemu.log")
    }

    /// The QMP session, for commands this type has no method for.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    fn node_of(&self, disk: &str) -> Result<String, Error> {
        if self.spec.disks.iter().any(|d| d.name == disk) {
            Ok(disk_node(disk))
        } else {
            Err(Error::UnknownDisk(disk.to_string()))
        }
    }

    /// `query-status`.
    pub async fn status(&mut self) -> Result<VmStatus, Error> {
        let v = self.qmp.execute("query-status", None).await?;
        parse(v, "query-status")
    }

    /// The spec's disks as QEMU has them (`query-block`), in spec order.
    pub async fn query_block(&mut self) -> Result<Vec<BlockInfo>, Error> {
        let v = self.qmp.execute("query-block", None).await?;
        let entries = v.as_array().ok_or_else(|| Error::BadReply {
            command: "query-block".into(),
            detail: "not an array".into(),
        })?;
        let mut out = Vec::new();
        for d in &self.spec.disks {
            let node = disk_node(&d.name);
            let inserted = entries
                .iter()
                .filter_map(|e| e.get("inserted"))
                .find(|i| i.get("node-name").and_then(Value::as_str) == Some(node.as_str()));
            let Some(inserted) = inserted else {
                return Err(Error::BadReply {
                    command: "query-block".into(),
                    detail: format!("no device with node {node}"),
                });
            };
            let field = |k: &str| {
                inserted
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let dirty_bitmaps = match inserted.get("dirty-bitmaps") {
                Some(b) => parse(b.clone(), "query-block")?,
                None => Vec::new(),
            };
            out.push(BlockInfo {
                disk: d.name.clone(),
                node_name: node.clone(),
                file: field("file"),
                format: field("drv"),
                dirty_bitmaps,
            });
        }
        Ok(out)
    }

    /// The spec's NICs with their MACs (`query-rx-filter`), in spec order.
    pub async fn query_nics(&mut self) -> Result<Vec<NicInfo>, Error> {
        let mut out = Vec::new();
        for n in self.spec.nics.clone() {
            let args = json!({ "name": format!("nic-{}", n.name) });
            let v = self.qmp.execute("query-rx-filter", Some(args)).await?;
            let mac = v
                .as_array()
                .and_then(|a| a.first())
                .and_then(|f| f.get("main-mac"))
                .and_then(Value::as_str)
                .ok_or_else(|| Error::BadReply {
                    command: "query-rx-filter".into(),
                    detail: format!("no main-mac for nic-{}", n.name),
                })?;
            out.push(NicInfo {
                name: n.name,
                network: n.network,
                mac: mac.to_string(),
            });
        }
        Ok(out)
    }

    /// The dirty bitmaps on `disk`'s format node. Read from the node
    /// itself (`query-named-block-nodes`): while a backup job runs, a
    /// filter sits between the device and the node and `query-block` shows
    /// the filter.
    pub async fn dirty_bitmaps(&mut self, disk: &str) -> Result<Vec<DirtyBitmap>, Error> {
        let node = self.node_of(disk)?;
        let v = self
            .qmp
            .execute("query-named-block-nodes", Some(json!({ "flat": true })))
            .await?;
        let entry = v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node.as_str()))
            })
            .ok_or_else(|| Error::BadReply {
                command: "query-named-block-nodes".into(),
                detail: format!("no node {node}"),
            })?;
        match entry.get("dirty-bitmaps") {
            Some(b) => parse(b.clone(), "query-named-block-nodes"),
            None => Ok(Vec::new()),
        }
    }

    /// `block-dirty-bitmap-add` on `disk`'s format node. A persistent
    /// bitmap is written into a qcow2 image when QEMU closes it.
    pub async fn add_dirty_bitmap(
        &mut self,
        disk: &str,
        name: &str,
        persistent: bool,
    ) -> Result<(), Error> {
        let node = self.node_of(disk)?;
        let args = json!({ "node": node, "name": name, "persistent": persistent });
        self.qmp
            .execute("block-dirty-bitmap-add", Some(args))
            .await?;
        Ok(())
    }

    /// `block-dirty-bitmap-remove` (a persistent bitmap leaves the image too).
    pub async fn remove_dirty_bitmap(&mut self, disk: &str, name: &str) -> Result<(), Error> {
        let node = self.node_of(disk)?;
        let args = json!({ "node": node, "name": name });
        self.qmp
            .execute("block-dirty-bitmap-remove", Some(args))
            .await?;
        Ok(())
    }

    /// `block-dirty-bitmap-clear`: no bit dirty afterwards.
    pub async fn clear_dirty_bitmap(&mut self, disk: &str, name: &str) -> Result<(), Error> {
        let node = self.node_of(disk)?;
        let args = json!({ "node": node, "name": name });
        self.qmp
            .execute("block-dirty-bitmap-clear", Some(args))
            .await?;
        Ok(())
    }

    /// Asks QEMU to `quit` (it flushes and closes its images, storing
    /// persistent bitmaps) and waits up to `timeout` for it to exit, then
    /// kills it. Returns QEMU's exit status and whether it was killed.
    pub async fn quit(mut self, timeout: Duration) -> Result<(ExitStatus, bool), Error> {
        match self.qmp.execute("quit", None).await {
            // QEMU may close the socket before or after replying.
            Ok(_) | Err(QmpError::Closed) => {}
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) => {}
            Err(e) => {
                self.kill().await?;
                return Err(e.into());
            }
        }
        match &mut self.child {
            Some(child) => match tokio::time::timeout(timeout, child.wait()).await {
                Ok(status) => Ok((status.map_err(io_err("waiting for QEMU"))?, false)),
                Err(_) => Ok((self.kill().await?, true)),
            },
            None => {
                // Not our child: wait for its pid to go away.
                let begun = Instant::now();
                while self.pid.is_some_and(pid_alive) {
                    if begun.elapsed() > timeout {
                        return Ok((self.kill().await?, true));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok((ExitStatus::default(), false))
            }
        }
    }

    /// Kills QEMU at once and reaps it.
    pub async fn kill(&mut self) -> Result<ExitStatus, Error> {
        match &mut self.child {
            Some(child) => {
                child.start_kill().ok();
                child.wait().await.map_err(io_err("waiting for QEMU"))
            }
            None => {
                if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill(2) with a pid read from QEMU's pidfile.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    let begun = Instant::now();
                    while pid_alive(pid as u32) && begun.elapsed() < Duration::from_secs(5) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Ok(ExitStatus::default())
            }
        }
    }
}

/// Whether a process with `pid` exists (and is not a zombie we could see).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses; Z = zombie.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, command: &str) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::BadReply {
        command: command.to_string(),
        detail: e.to_string(),
    })
}
