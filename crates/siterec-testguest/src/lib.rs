//! A tiny QEMU test guest the project builds itself: Debian's cloud kernel
//! and a busybox initramfs (`scripts/build-test-guest`). Booted in `write`
//! mode it makes an ext2 filesystem on its virtio disk, writes files of
//! content derived from a seed and a manifest of their SHA-256 sums; booted
//! in `verify` mode (as a replica would be) it checks them and reports a
//! verdict on its serial console, then powers off; `auto` picks one by
//! what the disk holds.
//!
//! Under another driver (a `VmSpec`, see [`Options`]) it can stay up after
//! its report, with the data filesystem mounted read-write on `/mnt` when
//! it rewrites `/mnt/churn` at a steady rate or has a guest agent to freeze
//! it, and it runs QEMU's
//! real guest agent (`qemu-ga` from Debian's `qemu-guest-agent`, the
//! release the host's QEMU came from) when the VM gives it the agent's
//! virtio-serial port; the agent's fsfreeze hook prints
//! `SITEREC-GUEST FSFREEZE freeze` before a freeze and
//! `SITEREC-GUEST FSFREEZE thaw` after a thaw ([`guest_lines`]).
//!
//! In every mode, at any time after its kernel modules are loaded, it
//! honours an ACPI power-button press (QMP `system_powerdown`, as a
//! planned failover stops a VM): it stops what it does (churn included),
//! syncs, unmounts `/mnt` if mounted, prints `SITEREC-GUEST POWERDOWN`
//! (`SITEREC-GUEST POWERDOWN /mnt still mounted: <why>` should the unmount
//! fail) and powers off, which QEMU under `-no-shutdown` reports as status
//! `shutdown`. It watches the fixed-feature power button's press counter,
//! `/sys/firmware/acpi/interrupts/ff_pwr_btn`, twice a second, so the
//! power-off follows the press within about a second.
//!
//! ```no_run
//! use std::time::Duration;
//! use siterec_testguest::{Mode, TestGuest, Verdict};
//! let guest = TestGuest::build(&siterec_testguest::default_build_dir())?;
//! let out = guest.boot("disk.qcow2".as_ref(), Mode::Write, 7, Duration::from_secs(120))?;
//! assert!(matches!(out.verdict, Verdict::Wrote(_)));
//! # Ok::<(), siterec_testguest::Error>(())
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Every 4096-byte block of a data file starts with this, then
/// `seed=S file=F block=B\n`.
pub const DATA_MARKER: &[u8] = b"SITEREC-DATA ";
/// Size of a data file block (the guest's filesystem block size too).
pub const DATA_BLOCK: usize = 4096;
/// Number of data files the guest writes; file `f` has `4 * (f + 1)` blocks.
pub const DATA_FILES: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found: run scripts/deps --test")]
    ToolMissing(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        what: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("scripts/build-test-guest left no {0}")]
    MissingArtifact(PathBuf),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// What the guest does with its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Make a filesystem on `/dev/vda` and write the seeded files.
    Write,
    /// Check the files against their manifest and the seed.
    Verify,
    /// Verify when the disk already holds a manifest (a replica booting),
    /// else write: one kernel command line for a VM and its replica.
    Auto,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Verify => "verify",
            Mode::Auto => "auto",
        }
    }
}

/// The kernel command line for booting the guest under another driver
/// (a `VmSpec`): serial console, `mode`, `seed`, the guest's own watchdog
/// (`timeout_secs`, for the time until its report), and with `stay` the
/// guest keeps running, idle, after a good report instead of powering off.
/// [`Options`] has the rest.
pub fn append(mode: Mode, seed: u64, timeout_secs: u64, stay: bool) -> String {
    Options {
        stay,
        ..Options::new(mode, seed, timeout_secs)
    }
    .append()
}

/// The guest's kernel command line, option by option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    pub seed: u64,
    /// The guest's own watchdog: seconds until its report.
    pub timeout_secs: u64,
    /// After a good report keep running (`siterec.after=stay`) instead of
    /// powering off. With churn, or a guest agent port (and `agent`), the
    /// data filesystem is mounted read-write on `/mnt` from before the
    /// report line on (`STAY /mnt read-write`); otherwise the disk sees no
    /// write after the report, not even a mount's.
    pub stay: bool,
    /// With `stay`: rewrite `/mnt/churn` (outside the manifest) at this
    /// many KiB a second, a sync every second (`siterec.churn`); 0: idle.
    pub churn_kib_per_sec: u32,
    /// Start QEMU's guest agent when the VM gives the guest its port
    /// (`siterec.agent=off` when false).
    pub agent: bool,
}

impl Options {
    /// Powers off after the report, no churn, agent on.
    pub fn new(mode: Mode, seed: u64, timeout_secs: u64) -> Options {
        Options {
            mode,
            seed,
            timeout_secs,
            stay: false,
            churn_kib_per_sec: 0,
            agent: true,
        }
    }

    /// The kernel command line.
    pub fn append(&self) -> String {
        let mut s = format!(
            "console=ttyS0 quiet panic=-1 siterec.mode={} siterec.seed={} siterec.timeout={} siterec.after={}",
            self.mode.as_str(),
            self.seed,
            self.timeout_secs,
            if self.stay { "stay" } else { "off" }
        );
        if self.churn_kib_per_sec > 0 {
            s.push_str(&format!(" siterec.churn={}", self.churn_kib_per_sec));
        }
        if !self.agent {
            s.push_str(" siterec.agent=off");
        }
        s
    }
}

/// The accelerator QEMU runs the guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the guest reported on its serial console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `SITEREC-GUEST WROTE <n> files`
    Wrote(u32),
    /// `SITEREC-GUEST VERDICT OK <n>`
    Ok(u32),
    /// `SITEREC-GUEST VERDICT FAIL <reason>`
    Fail(String),
    /// No report line (QEMU failed, the kernel panicked, or the host timeout
    /// struck first).
    None,
}

/// The result of one boot.
#[derive(Debug)]
pub struct GuestOutcome {
    pub verdict: Verdict,
    /// Everything the guest wrote on its serial console.
    pub serial_log: String,
    /// QEMU's own standard error.
    pub qemu_stderr: String,
    /// From spawning QEMU to its exit (or to killing it).
    pub elapsed: Duration,
    pub accel: Accel,
    /// QEMU was killed at the host timeout.
    pub timed_out: bool,
}

/// Paths to a built guest.
#[derive(Clone, Debug)]
pub struct TestGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// `scripts/build-test-guest` of this checkout.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-guest")
}

/// Where tests keep the built guest: `$CARGO_TARGET_DIR/test-guest`, else
/// `target/test-guest` of this workspace.
pub fn default_build_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("test-guest"),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-guest"),
    }
}

/// Finds an executable on `PATH`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn require(tool: &'static str) -> Result<PathBuf, Error> {
    find_tool(tool).ok_or(Error::ToolMissing(tool))
}

/// KVM when `/dev/kvm` opens read-write and the CPU shows hardware
/// virtualization (`vmx`/`svm`; a nested host without it can expose
/// `/dev/kvm` whose guests never run), else TCG. `SITEREC_TESTGUEST_ACCEL`
/// (`kvm` or `tcg`) overrides.
pub fn choose_accel() -> Accel {
    match std::env::var("SITEREC_TESTGUEST_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hw_virt = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    if kvm_opens && hw_virt {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

impl TestGuest {
    /// Builds the guest into `dir` with `scripts/build-test-guest` (cached:
    /// a no-op when `dir` already holds this recipe's artifacts).
    pub fn build(dir: &Path) -> Result<TestGuest, Error> {
        for tool in ["apt-get", "dpkg-deb", "cpio", "gzip", "ldd"] {
            require(tool)?;
        }
        let script = build_script();
        let out = Command::new("bash")
            .arg(&script)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {}", script.display())))?;
        if !out.status.success() {
            return Err(Error::Command {
                what: "scripts/build-test-guest".into(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let guest = TestGuest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
        };
        for p in [&guest.kernel, &guest.initrd] {
            if !p.is_file() {
                return Err(Error::MissingArtifact(p.clone()));
            }
        }
        Ok(guest)
    }

    /// Boots the guest on `disk` (qcow2 or raw, detected). See [`boot`].
    pub fn boot(
        &self,
        disk: &Path,
        mode: Mode,
        seed: u64,
        timeout: Duration,
    ) -> Result<GuestOutcome, Error> {
        boot(&self.kernel, &self.initrd, disk, mode, seed, timeout)
    }
}

/// `qcow2` when the file starts with the qcow2 magic, else `raw`.
pub fn disk_format(disk: &Path) -> Result<&'static str, Error> {
    let mut magic = [0u8; 4];
    let mut f = File::open(disk).map_err(io_err(format!("opening {}", disk.display())))?;
    let n = f
        .read(&mut magic)
        .map_err(io_err(format!("reading {}", disk.display())))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// Kills QEMU if the caller gives up (timeout, panic) before it exits.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Boots `kernel` + `initrd` with `disk` as its virtio disk, in `mode` with
/// `seed`, and waits for QEMU to exit (the guest powers off after its
/// report) or kills it after `timeout`. The guest's own watchdog fires at
/// three quarters of `timeout` (at least 5 s) with a FAIL verdict.
pub fn boot(
    kernel: &Path,
    initrd: &Path,
    disk: &Path,
    mode: Mode,
    seed: u64,
    timeout: Duration,
) -> Result<GuestOutcome, Error> {
    let qemu = require("qemu-system-x86_64")?;
    let format = disk_format(disk)?;
    let accel = choose_accel();
    let guest_timeout = (timeout.as_secs() * 3 / 4).max(5);
    let append = format!(
        "console=ttyS0 quiet panic=-1 siterec.mode={} siterec.seed={seed} siterec.timeout={guest_timeout}",
        mode.as_str()
    );
    let mut drive = String::from("file=");
    // QEMU's option syntax doubles commas inside values.
    drive.push_str(&disk.to_string_lossy().replace(',', ",,"));
    drive.push_str(&format!(",format={format},if=virtio"));
    let mut cmd = Command::new(qemu);
    cmd.args(["-machine", "q35", "-m", "256", "-smp", "1"])
        .args(["-accel", &accel.to_string()])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .args(["-drive", &drive])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    let start = Instant::now();
    let mut child = KillOnDrop(cmd.spawn().map_err(io_err("starting qemu-system-x86_64"))?);
    let stdout = child.0.stdout.take().map(drain);
    let stderr = child.0.stderr.take().map(drain);
    let mut timed_out = false;
    loop {
        match child.0.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => return Err(io_err("waiting for qemu-system-x86_64")(e)),
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            let _ = child.0.kill();
            let _ = child.0.wait();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let elapsed = start.elapsed();
    let join = |h: Option<thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let serial_log = join(stdout);
    let qemu_stderr = join(stderr);
    Ok(GuestOutcome {
        verdict: parse_verdict(&serial_log),
        serial_log,
        qemu_stderr,
        elapsed,
        accel,
        timed_out,
    })
}

/// The first report line in a serial log.
pub fn parse_verdict(log: &str) -> Verdict {
    for line in log.lines() {
        let Some(at) = line.find("SITEREC-GUEST ") else {
            continue;
        };
        let rest = line[at + "SITEREC-GUEST ".len()..].trim_end_matches('\r');
        let count = |s: &str| s.split_whitespace().next().and_then(|n| n.parse().ok());
        if let Some(n) = rest.strip_prefix("WROTE ").and_then(count) {
            return Verdict::Wrote(n);
        }
        if let Some(n) = rest.strip_prefix("VERDICT OK ").and_then(count) {
            return Verdict::Ok(n);
        }
        if let Some(reason) = rest.strip_prefix("VERDICT FAIL") {
            return Verdict::Fail(reason.trim().to_string());
        }
    }
    Verdict::None
}

/// Every `SITEREC-GUEST` line in a serial log, without that prefix, in
/// order: the report and the lines around it (`MODE write`,
/// `AGENT started vport0p1`, `FSFREEZE freeze`, `FSFREEZE thaw`,
/// `CHURN 256 KiB/s over 15360 KiB`, `POWERDOWN`, …).
pub fn guest_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let at = line.find("SITEREC-GUEST ")?;
            Some(
                line[at + "SITEREC-GUEST ".len()..]
                    .trim_end_matches('\r')
                    .trim_end()
                    .to_string(),
            )
        })
        .collect()
}

/// A data file block found in a raw disk image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataBlock {
    /// Byte offset of the block in the image.
    pub offset: u64,
    pub seed: u64,
    pub file: u32,
    pub block: u32,
}

/// The data file blocks in a raw image, found by their marker line at
/// 512-byte aligned offsets. For corrupting a replica on purpose.
pub fn data_blocks(image: &[u8]) -> Vec<DataBlock> {
    let mut found = Vec::new();
    let mut off = 0usize;
    while off + DATA_BLOCK <= image.len() {
        if image[off..].starts_with(DATA_MARKER)
            && let Some(b) = parse_marker(&image[off + DATA_MARKER.len()..off + 96])
        {
            found.push(DataBlock {
                offset: off as u64,
                ..b
            });
        }
        off += 512;
    }
    found
}

fn parse_marker(bytes: &[u8]) -> Option<DataBlock> {
    let line = bytes.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut b = DataBlock {
        offset: 0,
        seed: 0,
        file: 0,
        block: 0,
    };
    let mut fields = 0;
    for kv in line.split(' ') {
        match kv.split_once('=')? {
            ("seed", v) => b.seed = v.parse().ok()?,
            ("file", v) => b.file = v.parse().ok()?,
            ("block", v) => b.block = v.parse().ok()?,
            _ => return None,
        }
        fields += 1;
    }
    (fields == 3).then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_amid_kernel_noise() {
        let log = "[    1.0] virtio_blk virtio1: [vda] 131072 512-byte\r\nSITEREC-GUEST WROTE 4 files\r\n[    3.8] reboot: Power down\r\n";
        assert_eq!(parse_verdict(log), Verdict::Wrote(4));
        assert_eq!(
            parse_verdict("x\nSITEREC-GUEST VERDICT OK 4\n"),
            Verdict::Ok(4)
        );
        assert_eq!(
            parse_verdict("SITEREC-GUEST VERDICT FAIL checksum mismatch: data2: FAILED \r\n"),
            Verdict::Fail("checksum mismatch: data2: FAILED".into())
        );
        assert_eq!(parse_verdict("Kernel panic - not syncing\n"), Verdict::None);
    }

    #[test]
    fn command_lines_and_guest_lines() {
        assert_eq!(
            append(Mode::Auto, 7, 90, true),
            "console=ttyS0 quiet panic=-1 siterec.mode=auto siterec.seed=7 siterec.timeout=90 siterec.after=stay"
        );
        let o = Options {
            stay: true,
            churn_kib_per_sec: 256,
            agent: false,
            ..Options::new(Mode::Write, 1, 60)
        };
        assert!(
            o.append()
                .ends_with("siterec.after=stay siterec.churn=256 siterec.agent=off"),
            "{}",
            o.append()
        );
        let log = "[ 1.0] boot\r\nSITEREC-GUEST MODE write\r\nSITEREC-GUEST AGENT started ../vport0p1\r\nSITEREC-GUEST WROTE 4 files\r\nnoise SITEREC-GUEST FSFREEZE freeze\n";
        assert_eq!(
            guest_lines(log),
            [
                "MODE write",
                "AGENT started ../vport0p1",
                "WROTE 4 files",
                "FSFREEZE freeze"
            ]
        );
        assert_eq!(parse_verdict(log), Verdict::Wrote(4));
    }

    #[test]
    fn data_blocks_are_found_by_marker() {
        let mut img = vec![0u8; 4 * DATA_BLOCK];
        let head = b"SITEREC-DATA seed=9 file=2 block=5\n";
        img[DATA_BLOCK..DATA_BLOCK + head.len()].copy_from_slice(head);
        // A marker with junk after it is not a block.
        let junk = b"SITEREC-DATA nonsense\n";
        img[2 * DATA_BLOCK..2 * DATA_BLOCK + junk.len()].copy_from_slice(junk);
        assert_eq!(
            data_blocks(&img),
            vec![DataBlock {
                offset: DATA_BLOCK as u64,
                seed: 9,
                file: 2,
                block: 5
            }]
        );
    }
}
