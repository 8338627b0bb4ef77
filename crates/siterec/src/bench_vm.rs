//! `siterec bench vm`: VM replication and instant failover measured side
//! by side in one run on one machine (issue 4's benchmark), in three parts:
//!
//! 1. **Cycle cost.** One VM (QEMU, booting nothing and paused, so that its
//!    disk stays still) with a raw mixed-content disk, replicated in-process
//!    through fleecing and dirty bitmaps over NBD; after the initial cycle,
//!    `--churn-percent` of its 4 KiB blocks are written at random through
//!    QEMU's block layer (HMP `qemu-io` on the operator's QMP socket, as a
//!    guest's writes would go), then one cycle. The same disk and the same
//!    writes as a physical server's image file (the hash scan): initial
//!    cycle, the same writes, one cycle. Both cycles' bytes read, bytes sent
//!    and time, and the ratio of bytes read.
//! 2. **RPO.** The test guest churning `/mnt/churn` at 10 MiB/s on a 1 GiB
//!    qcow2 disk, replicated in-process: a cycle every 30 s for
//!    `--rpo-secs`, then cycles back to back for as long; every 100 ms the
//!    achieved RPO (now − the creation time of the newest committed point)
//!    is sampled. p50/p99/max per mode, and the guest's measured write rate
//!    (QEMU's block statistics of its disk).
//! 3. **Instant failover.** One recovery point of the test guest's disk
//!    stored as a 1 GiB and as a 64 GiB disk (the same data; the rest is
//!    sparse, no chunk stored); `StartReplica` for each, timed from the call
//!    to the first byte of the replica's serial console, to the guest's
//!    verdict line and to the end of the background copy.
//!
//! Each part runs in its own directory under `--dir`, removed afterwards
//! unless `--keep`. The source and the target share this process and the
//! machine's cores with the guests (TCG without KVM): read the ratios.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Value, json};
use siterec_agent::source::{CHUNK_SIZE, Cycle, DEFAULT_UPLOAD_STREAMS};
use siterec_core::wire::{ItemCounters, ReplicationAssignment, TaskWork, VmInfo};
use siterec_qemu::{DiskFormat, DiskSpec, Qmp, VmSpec};
use siterec_testguest::{Mode, TestGuest};

use crate::bench::{Rig, committed, round2, settle};
use crate::output::Format;
use crate::sample;

/// The parts `--skip` can name.
pub const PARTS: [&str; 3] = ["cycle", "rpo", "instant"];

/// The targets.
const CYCLE_READ_RATIO_TARGET: f64 = 20.0;
const RPO_PERIODIC_P99_TARGET_SECS: f64 = 45.0;
const RPO_CONTINUOUS_P99_TARGET_SECS: f64 = 5.0;
const INSTANT_RATIO_TARGET: f64 = 1.2;

/// The copy frequency of the RPO part's periodic mode.
const COPY_FREQUENCY: Duration = Duration::from_secs(30);
/// The guest's write load in the RPO part (10 MiB/s).
const GUEST_CHURN_KIB_PER_SEC: u32 = 10240;
/// Seed of the test guest's files.
const SEED: u64 = 4711;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

pub struct VmBenchOptions {
    pub dir: PathBuf,
    /// Part 1's disk size.
    pub size_mib: u64,
    /// Part 1's churn: this share of the 4 KiB blocks is written.
    pub churn_percent: f64,
    /// Part 2: seconds of each mode.
    pub rpo_secs: u64,
    /// Parts not to run (see [`PARTS`]).
    pub skip: Vec<String>,
    /// Part 3: replica boots per disk size (alternating; medians compared).
    pub failover_runs: usize,
    /// Keep each part's files (images, stores, VM run directories).
    pub keep: bool,
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn mib(bytes: u64) -> f64 {
    round2(bytes as f64 / MIB as f64)
}

pub async fn vm(opts: VmBenchOptions, out: Format) -> anyhow::Result<()> {
    let wall = Instant::now();
    for s in &opts.skip {
        if !PARTS.contains(&s.as_str()) {
            bail!(
                "--skip {s:?}: unknown part; the parts are {}",
                PARTS.join(", ")
            );
        }
    }
    if opts.size_mib < 64 {
        bail!("--size-mib {}: at least 64 MiB, please", opts.size_mib);
    }
    if !(opts.churn_percent > 0.0 && opts.churn_percent <= 100.0) {
        bail!(
            "--churn-percent {}: give a share of the blocks above 0 and at most 100",
            opts.churn_percent
        );
    }
    if !(1..=20).contains(&opts.failover_runs) {
        bail!("--failover-runs {}: 1 to 20", opts.failover_runs);
    }
    if opts.rpo_secs < COPY_FREQUENCY.as_secs() {
        bail!(
            "--rpo-secs {}: at least one copy frequency ({} s)",
            opts.rpo_secs,
            COPY_FREQUENCY.as_secs()
        );
    }
    let run = |part: &str| !opts.skip.iter().any(|s| s == part);
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = opts.dir.canonicalize()?;
    // qemu-io's command line (part 1) splits on blanks and cannot quote.
    if dir
        .to_string_lossy()
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\')
    {
        bail!(
            "--dir {}: use a path without blanks, quotes or backslashes (QEMU's qemu-io command line cannot carry them)",
            dir.display()
        );
    }
    let guest = if run("rpo") || run("instant") {
        eprintln!("building the test guest (cached)…");
        let build = siterec_testguest::default_build_dir();
        let guest = tokio::task::spawn_blocking(move || TestGuest::build(&build))
            .await?
            .context("building the test guest (scripts/build-test-guest; scripts/deps --test installs what it needs)")?;
        Some(guest)
    } else {
        None
    };
    let accel = siterec_qemu::choose_accel().as_str();

    let mut report = json!({
        "accel": accel,
        "sizeMiB": opts.size_mib,
        "churnPercent": opts.churn_percent,
        "rpoSecs": opts.rpo_secs,
    });
    if run("cycle") {
        let part = dir.join("cycle");
        let r = cycle_cost(&part, opts.size_mib, opts.churn_percent).await;
        cleanup(&part, opts.keep);
        let r = r.context("part 1 (cycle cost)")?;
        report["cycleCost"] = r.json();
        if out == Format::Table {
            r.print();
        }
    }
    if let (true, Some(guest)) = (run("rpo"), &guest) {
        let part = dir.join("rpo");
        let r = rpo(&part, guest, opts.rpo_secs).await;
        cleanup(&part, opts.keep);
        let r = r.context("part 2 (RPO)")?;
        report["rpo"] = r.json();
        if out == Format::Table {
            r.print();
        }
    }
    if let (true, Some(guest)) = (run("instant"), &guest) {
        let part = dir.join("instant");
        let r = instant_failover(&part, guest, opts.failover_runs).await;
        cleanup(&part, opts.keep);
        let r = r.context("part 3 (instant failover)")?;
        report["instantFailover"] = r.json();
        if out == Format::Table {
            r.print();
        }
    }
    let wall = wall.elapsed().as_secs_f64();
    report["wallSeconds"] = json!(round2(wall));
    match out {
        Format::Json => crate::output::json(&report),
        Format::Table => println!(
            "accelerator {accel}; whole benchmark {wall:.0} s (one process: source, target and store; the guests share the cores)"
        ),
    }
    Ok(())
}

/// Removes a part's directory (unless asked to keep it).
fn cleanup(part: &Path, keep: bool) {
    if !keep {
        let _ = std::fs::remove_dir_all(part);
    }
}

/// An empty directory at `path`.
fn fresh_dir(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn qemu_img(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("running qemu-img (is qemu-utils installed?)")?;
    if !out.status.success() {
        bail!(
            "qemu-img {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not valid UTF-8", p.display()))
}

/// The bench item's counters in the rig's source.
fn counters(rig: &Rig) -> ItemCounters {
    rig.ctx
        .status
        .lock()
        .ok()
        .and_then(|s| s.items.get("bench").cloned())
        .unwrap_or_default()
}

/// A VM item's assignment: machine = the VM's name, one disk.
fn vm_assignment(rig: &Rig, vm: &str, disk: &str, path: &Path, size: u64) -> ReplicationAssignment {
    let mut a = rig.assignment(path, size);
    a.machine = vm.to_string();
    if let Some(d) = a.disks.first_mut() {
        d.name = disk.to_string();
    }
    a
}

/// Starts the rig's VM (its `VmHost` holds exactly one).
async fn start_vm(rig: &Rig, name: &str) -> anyhow::Result<PathBuf> {
    let slot = rig
        .ctx
        .vms
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("no VM {name} in the bench's host"))?;
    let mut slot = slot.lock().await;
    let vm = slot.running().await?;
    Ok(vm.run_dir().to_path_buf())
}

/// The operator's QMP socket of a VM.
async fn admin(run_dir: &Path) -> anyhow::Result<Qmp> {
    let sock = run_dir.join("admin.sock");
    Qmp::connect(&sock, Duration::from_secs(30))
        .await
        .with_context(|| format!("connecting to {}", sock.display()))
}

/// An HMP command; its output must not report an error.
async fn hmp(qmp: &mut Qmp, line: &str) -> anyhow::Result<()> {
    let out = qmp
        .execute(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        )
        .await
        .with_context(|| format!("HMP {line}"))?;
    let text = out.as_str().unwrap_or_default();
    if text.to_lowercase().contains("error") {
        bail!("HMP {line}: {}", text.trim());
    }
    Ok(())
}

/// Bytes the guest wrote to `disk` since QEMU started (`query-blockstats`
/// of the disk's device: the guest's writes only, not the monitor's).
async fn guest_written(run_dir: &Path, disk: &str) -> anyhow::Result<u64> {
    let mut qmp = admin(run_dir).await?;
    let v = qmp.execute("query-blockstats", None).await?;
    let node = siterec_qemu::disk_node(disk);
    let qdev = format!("/machine/peripheral/vd-{disk}/");
    v.as_array()
        .and_then(|a| {
            a.iter().find(|e| {
                e.get("node-name").and_then(Value::as_str) == Some(node.as_str())
                    || e.get("qdev")
                        .and_then(Value::as_str)
                        .is_some_and(|q| q.starts_with(&qdev))
            })
        })
        .and_then(|e| e.pointer("/stats/wr_bytes"))
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow::anyhow!("query-blockstats has no write count for disk {disk}: {v}"))
}

// ---------------------------------------------------------------------------
// Part 1: the cost of a cycle, dirty bitmaps against the hash scan.

struct CycleFigures {
    initial_read: u64,
    initial_sent: u64,
    initial_secs: f64,
    read: u64,
    sent: u64,
    chunks: u64,
    secs: f64,
}

impl CycleFigures {
    fn json(&self) -> Value {
        json!({
            "initialBytesRead": self.initial_read,
            "initialBytesSent": self.initial_sent,
            "initialSeconds": round2(self.initial_secs),
            "bytesRead": self.read,
            "bytesSent": self.sent,
            "chunksSent": self.chunks,
            "seconds": round2(self.secs),
        })
    }
}

struct CycleCost {
    size_mib: u64,
    churn_percent: f64,
    writes: u64,
    write_secs: f64,
    /// The agent's active dirty bitmap before the cycle: granularity and
    /// bytes marked dirty.
    bitmap: (u64, u64),
    bitmaps: CycleFigures,
    scan: CycleFigures,
    same_data: bool,
}

impl CycleCost {
    fn read_ratio(&self) -> f64 {
        self.scan.read as f64 / self.bitmaps.read.max(1) as f64
    }

    fn json(&self) -> Value {
        let ratio = self.read_ratio();
        json!({
            "diskMiB": self.size_mib,
            "churnPercent": self.churn_percent,
            "blocksWritten": self.writes,
            "writeSeconds": round2(self.write_secs),
            "dirtyBitmaps": self.bitmaps.json(),
            "hashScan": self.scan.json(),
            "sameData": self.same_data,
            "bitmapGranularity": self.bitmap.0,
            "bitmapDirtyBytes": self.bitmap.1,
            "bytesReadScanOverBitmaps": round2(ratio),
            "secondsScanOverBitmaps": round2(self.scan.secs / self.bitmaps.secs.max(1e-9)),
            "target": CYCLE_READ_RATIO_TARGET,
            "met": ratio >= CYCLE_READ_RATIO_TARGET,
        })
    }

    fn print(&self) {
        println!(
            "\n1. Cycle cost: {} MiB raw mixed disk, {}% of its 4 KiB blocks written at random ({} writes through QEMU, {:.1} s); the same data both ways: {}",
            self.size_mib, self.churn_percent, self.writes, self.write_secs, self.same_data
        );
        let row = |path: &str, f: &CycleFigures| {
            json!({
                "path": path,
                "initial": format!("{:.0} MiB read in {:.1} s", mib(f.initial_read), f.initial_secs),
                "read": mib(f.read),
                "sent": mib(f.sent),
                "chunks": f.chunks,
                "secs": round2(f.secs),
            })
        };
        let rows = [
            row("dirty bitmaps (VM, fleecing over NBD)", &self.bitmaps),
            row("hash scan (the image file)", &self.scan),
        ];
        crate::output::rows(
            Format::Table,
            &rows,
            &[
                ("READ PATH", "/path"),
                ("INITIAL CYCLE", "/initial"),
                ("CYCLE: MiB READ", "/read"),
                ("MiB SENT", "/sent"),
                ("CHUNKS", "/chunks"),
                ("SECONDS", "/secs"),
            ],
        );
        println!(
            "the dirty bitmap (granularity {} KiB) marked {:.2} MiB before the cycle; the 4 KiB blocks written: {:.2} MiB",
            self.bitmap.0 / 1024,
            mib(self.bitmap.1),
            mib(self.writes * 4096)
        );
        let ratio = self.read_ratio();
        println!(
            "bytes read, hash scan / dirty bitmaps: {ratio:.1}× (target ≥ {CYCLE_READ_RATIO_TARGET}×): {}; time {:.1}×",
            met(ratio >= CYCLE_READ_RATIO_TARGET),
            self.scan.secs / self.bitmaps.secs.max(1e-9)
        );
    }
}

/// The agent's active dirty bitmap of `disk` (`siterec-GEN`): its
/// granularity and how many bytes it marks dirty.
async fn active_bitmap(qmp: &mut Qmp, disk: &str) -> anyhow::Result<(u64, u64)> {
    let v = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await?;
    let node = siterec_qemu::disk_node(disk);
    let bitmaps = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node.as_str()))
        })
        .and_then(|n| n.get("dirty-bitmaps"))
        .cloned()
        .unwrap_or(Value::Null);
    let list: Vec<siterec_qemu::DirtyBitmap> =
        serde_json::from_value(bitmaps).with_context(|| format!("the dirty bitmaps of {node}"))?;
    list.iter()
        .find(|b| b.name.starts_with("siterec-") && !b.name.ends_with("-frozen"))
        .map(|b| (b.granularity, b.count))
        .ok_or_else(|| anyhow::anyhow!("no active siterec dirty bitmap on {node}: {list:?}"))
}

/// One cycle of the rig's item, timed after a `sync`; its counters.
async fn timed_cycle(rig: &Rig, a: &ReplicationAssignment) -> anyhow::Result<(f64, ItemCounters)> {
    settle();
    let t = Instant::now();
    committed(siterec_agent::source::cycle(&rig.ctx, a).await?)?;
    Ok((t.elapsed().as_secs_f64(), counters(rig)))
}

async fn cycle_cost(dir: &Path, size_mib: u64, churn_percent: f64) -> anyhow::Result<CycleCost> {
    fresh_dir(dir)?;
    let size = size_mib * MIB;
    let vm_disk = dir.join("vm.img");
    let server_disk = dir.join("server.img");
    eprintln!("part 1: building a {size_mib} MiB mixed image…");
    sample::make_mixed_image(&vm_disk, size, 1)?;
    let status = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&vm_disk)
        .arg(&server_disk)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("copying {} failed", vm_disk.display());
    }
    // The writes: random 4 KiB pages at random 4 KiB offsets, each also in
    // a file for qemu-io (`write -s FILE`).
    let pages_dir = dir.join("pages");
    std::fs::create_dir_all(&pages_dir)?;
    let blocks = size / 4096;
    let n = ((blocks as f64) * churn_percent / 100.0).round().max(1.0) as u64;
    let mut rng = StdRng::seed_from_u64(99);
    let mut writes: Vec<(u64, PathBuf)> = Vec::with_capacity(n as usize);
    let mut page = [0u8; 4096];
    for i in 0..n {
        rng.fill_bytes(&mut page);
        let p = pages_dir.join(format!("{i}"));
        std::fs::write(&p, page).with_context(|| format!("writing {}", p.display()))?;
        writes.push((rng.random_range(0..blocks) * 4096, p));
    }

    // ---- dirty bitmaps: the disk as a VM's ----
    let mut rig = Rig::start(&dir.join("vm-rig"), DEFAULT_UPLOAD_STREAMS).await?;
    let spec = VmSpec {
        name: "benchvm".into(),
        memory_mib: 128,
        cpus: 1,
        disks: vec![DiskSpec {
            name: "vda".into(),
            path: vm_disk.clone(),
            format: DiskFormat::Raw,
        }],
        nics: vec![],
        kernel: None,
        initrd: None,
        append: None,
        guest_agent: false,
    };
    rig.ctx.vms = Arc::new(siterec_agent::vm::VmHost::new(&[spec], &rig.ctx.data_dir));
    let run_dir = start_vm(&rig, "benchvm").await?;
    // It boots nothing (no kernel, no bootable disk): paused, it leaves the
    // disk still and the cores to the benchmark.
    let mut qmp = admin(&run_dir).await?;
    qmp.execute("stop", None).await.context("pausing the VM")?;
    let a = vm_assignment(&rig, "benchvm", "vda", &vm_disk, size);
    eprintln!("part 1: initial cycle of the VM…");
    let (initial_secs, c) = timed_cycle(&rig, &a).await?;
    let (initial_read, initial_sent) = (c.last_cycle_bytes_read, c.last_cycle_bytes_sent);
    eprintln!("part 1: writing {n} random 4 KiB blocks through QEMU…");
    let t = Instant::now();
    for (offset, p) in &writes {
        hmp(
            &mut qmp,
            &format!(
                "qemu-io -d /machine/peripheral/vd-vda/virtio-backend \"write -s {} {offset} 4096\"",
                p.display()
            ),
        )
        .await?;
    }
    hmp(
        &mut qmp,
        "qemu-io -d /machine/peripheral/vd-vda/virtio-backend \"flush\"",
    )
    .await?;
    let write_secs = t.elapsed().as_secs_f64();
    let bitmap = active_bitmap(&mut qmp, "vda").await?;
    drop(qmp);
    eprintln!("part 1: the VM's cycle (dirty bitmaps)…");
    let (secs, c) = timed_cycle(&rig, &a).await?;
    let bitmaps = CycleFigures {
        initial_read,
        initial_sent,
        initial_secs,
        read: c.last_cycle_bytes_read,
        sent: c.last_cycle_bytes_sent,
        chunks: c.last_cycle_chunks_sent,
        secs,
    };
    rig.stop().await;

    // ---- hash scan: the same disk as a physical server's image file ----
    let rig = Rig::start(&dir.join("server-rig"), DEFAULT_UPLOAD_STREAMS).await?;
    let a = rig.assignment(&server_disk, size);
    eprintln!("part 1: initial cycle of the image file…");
    let (initial_secs, c) = timed_cycle(&rig, &a).await?;
    let (initial_read, initial_sent) = (c.last_cycle_bytes_read, c.last_cycle_bytes_sent);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&server_disk)
            .with_context(|| format!("opening {}", server_disk.display()))?;
        for (offset, p) in &writes {
            f.write_all_at(&std::fs::read(p)?, *offset)?;
        }
        f.sync_all()?;
    }
    eprintln!("part 1: the image file's cycle (hash scan)…");
    let (secs, c) = timed_cycle(&rig, &a).await?;
    let scan = CycleFigures {
        initial_read,
        initial_sent,
        initial_secs,
        read: c.last_cycle_bytes_read,
        sent: c.last_cycle_bytes_sent,
        chunks: c.last_cycle_chunks_sent,
        secs,
    };
    rig.stop().await;
    // The VM's disk (raw, flushed) and the image file hold the same bytes.
    let same_data = sample::hash_file(&vm_disk)? == sample::hash_file(&server_disk)?;
    if !same_data {
        bail!(
            "the VM's disk and the image file differ after the same writes: the comparison is void"
        );
    }
    Ok(CycleCost {
        size_mib,
        churn_percent,
        writes: n,
        write_secs,
        bitmap,
        bitmaps,
        scan,
        same_data,
    })
}

// ---------------------------------------------------------------------------
// Part 2: the achieved RPO under a steady guest write load.

#[derive(Clone, Copy)]
enum Schedule {
    Every(Duration),
    Continuous,
}

struct Window {
    mode: &'static str,
    target_p99: f64,
    secs: f64,
    cycles: u64,
    failed: u64,
    first_error: Option<String>,
    cycle_secs: Vec<f64>,
    bytes_read: u64,
    bytes_sent: u64,
    /// RPO samples, seconds.
    samples: Vec<f64>,
    guest_bytes: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Window {
    fn stats(&self) -> (f64, f64, f64) {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        (
            percentile(&s, 0.5),
            percentile(&s, 0.99),
            s.last().copied().unwrap_or(f64::NAN),
        )
    }

    fn guest_rate(&self) -> f64 {
        self.guest_bytes as f64 / self.secs.max(1e-9)
    }

    fn json(&self) -> Value {
        let (p50, p99, max) = self.stats();
        let mean = self.cycle_secs.iter().sum::<f64>() / self.cycle_secs.len().max(1) as f64;
        let longest = self.cycle_secs.iter().copied().fold(0.0, f64::max);
        json!({
            "mode": self.mode,
            "seconds": round2(self.secs),
            "cycles": self.cycles,
            "failedCycles": self.failed,
            "firstError": self.first_error,
            "cycleSecondsMean": round2(mean),
            "cycleSecondsMax": round2(longest),
            "bytesRead": self.bytes_read,
            "bytesSent": self.bytes_sent,
            "samples": self.samples.len(),
            "rpoP50": round2(p50),
            "rpoP99": round2(p99),
            "rpoMax": round2(max),
            "targetP99": self.target_p99,
            "met": p99 < self.target_p99,
            "guestBytesWritten": self.guest_bytes,
            "guestMBPerSec": round2(self.guest_rate() / 1e6),
        })
    }
}

struct Rpo {
    churn_line: String,
    windows: Vec<Window>,
}

impl Rpo {
    fn json(&self) -> Value {
        json!({
            "guestChurnAskedKiBPerSec": GUEST_CHURN_KIB_PER_SEC,
            "guestChurnLine": self.churn_line,
            "modes": self.windows.iter().map(Window::json).collect::<Vec<_>>(),
        })
    }

    fn print(&self) {
        println!(
            "\n2. RPO: the test guest writing {} KiB/s ({}) on a 1 GiB qcow2 disk, replicated in-process; RPO = now − creation time of the newest committed point, sampled every 100 ms",
            GUEST_CHURN_KIB_PER_SEC, self.churn_line
        );
        let rows: Vec<Value> = self
            .windows
            .iter()
            .map(|w| {
                let (p50, p99, max) = w.stats();
                let mean = w.cycle_secs.iter().sum::<f64>() / w.cycle_secs.len().max(1) as f64;
                json!({
                    "mode": w.mode,
                    "cycles": format!("{}{}", w.cycles, if w.failed > 0 { format!(" (+{} failed)", w.failed) } else { String::new() }),
                    "cycle": round2(mean),
                    "read": round2(w.bytes_read as f64 / MIB as f64 / w.cycles.max(1) as f64),
                    "guest": round2(w.guest_rate() / 1e6),
                    "p50": round2(p50),
                    "p99": round2(p99),
                    "max": round2(max),
                    "target": format!("p99 < {} s", w.target_p99),
                    "result": met(p99 < w.target_p99),
                })
            })
            .collect();
        crate::output::rows(
            Format::Table,
            &rows,
            &[
                ("MODE", "/mode"),
                ("CYCLES", "/cycles"),
                ("MEAN CYCLE S", "/cycle"),
                ("MiB READ / CYCLE", "/read"),
                ("GUEST MB/S", "/guest"),
                ("RPO P50 S", "/p50"),
                ("P99 S", "/p99"),
                ("MAX S", "/max"),
                ("TARGET", "/target"),
                ("RESULT", "/result"),
            ],
        );
        for w in &self.windows {
            if let Some(e) = &w.first_error {
                println!("{}: {} cycle(s) failed, the first: {e}", w.mode, w.failed);
            }
        }
    }
}

fn point_ms(point: &str) -> Option<i64> {
    point.split('-').next()?.parse().ok()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Waits for a line in the VM's serial log; fails on a FAIL verdict.
async fn wait_serial(run_dir: &Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    let path = run_dir.join("serial.log");
    let begun = Instant::now();
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return Ok(line.trim().to_string());
        }
        if log.contains("VERDICT FAIL") || log.contains("not mounted") {
            bail!("the test guest failed:\n{log}");
        }
        if begun.elapsed() > timeout {
            bail!("no {needle:?} on the guest's console within {timeout:?}:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn rpo(dir: &Path, guest: &TestGuest, secs: u64) -> anyhow::Result<Rpo> {
    fresh_dir(dir)?;
    let disk = dir.join("vda.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&disk)?, "1G"])?;
    let mut rig = Rig::start(&dir.join("rig"), DEFAULT_UPLOAD_STREAMS).await?;
    let options = siterec_testguest::Options {
        stay: true,
        churn_kib_per_sec: GUEST_CHURN_KIB_PER_SEC,
        agent: false,
        ..siterec_testguest::Options::new(Mode::Write, SEED, 300)
    };
    let spec = VmSpec {
        name: "rpovm".into(),
        memory_mib: 256,
        cpus: 1,
        disks: vec![DiskSpec {
            name: "vda".into(),
            path: disk.clone(),
            format: DiskFormat::Qcow2,
        }],
        nics: vec![],
        kernel: Some(guest.kernel.clone()),
        initrd: Some(guest.initrd.clone()),
        append: Some(options.append()),
        guest_agent: false,
    };
    rig.ctx.vms = Arc::new(siterec_agent::vm::VmHost::new(&[spec], &rig.ctx.data_dir));
    eprintln!("part 2: booting the test guest (writes its files, then churns)…");
    let run_dir = start_vm(&rig, "rpovm").await?;
    let churn_line = wait_serial(&run_dir, "SITEREC-GUEST CHURN", Duration::from_secs(300)).await?;
    let churn_line = churn_line
        .split("SITEREC-GUEST ")
        .nth(1)
        .unwrap_or(&churn_line)
        .to_string();
    let a = vm_assignment(&rig, "rpovm", "vda", &disk, GIB);
    eprintln!("part 2: initial cycle…");
    committed(siterec_agent::source::cycle(&rig.ctx, &a).await?)?;
    let mut windows = Vec::new();
    for (mode, schedule, target) in [
        (
            "every 30 s",
            Schedule::Every(COPY_FREQUENCY),
            RPO_PERIODIC_P99_TARGET_SECS,
        ),
        (
            "continuous",
            Schedule::Continuous,
            RPO_CONTINUOUS_P99_TARGET_SECS,
        ),
    ] {
        eprintln!("part 2: {mode} for {secs} s…");
        let mut w = rpo_window(&rig, &a, &run_dir, schedule, secs).await?;
        w.mode = mode;
        w.target_p99 = target;
        windows.push(w);
    }
    // The guest kept churning throughout.
    wait_serial(&run_dir, "SITEREC-GUEST CHURN", Duration::from_secs(1)).await?;
    rig.stop().await;
    Ok(Rpo {
        churn_line,
        windows,
    })
}

/// One mode: a lead-in cycle on the mode's schedule (not sampled, so that
/// the window starts in the mode's steady state), then `secs` of cycles on
/// the schedule with the RPO sampled every 100 ms.
async fn rpo_window(
    rig: &Rig,
    a: &ReplicationAssignment,
    run_dir: &Path,
    schedule: Schedule,
    secs: u64,
) -> anyhow::Result<Window> {
    let lead_in = Instant::now();
    let point = committed(siterec_agent::source::cycle(&rig.ctx, a).await?)?;
    let newest = Arc::new(AtomicI64::new(point_ms(&point).unwrap_or_else(now_ms)));
    let mut next = match schedule {
        Schedule::Every(period) => lead_in + period,
        Schedule::Continuous => Instant::now(),
    };
    let written_before = guest_written(run_dir, "vda").await?;
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let sampler = {
        let newest = newest.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if Instant::now() >= end {
                    break;
                }
                samples.push((now_ms() - newest.load(Ordering::SeqCst)) as f64 / 1000.0);
            }
            samples
        })
    };
    let mut w = Window {
        mode: "",
        target_p99: 0.0,
        secs: 0.0,
        cycles: 0,
        failed: 0,
        first_error: None,
        cycle_secs: Vec::new(),
        bytes_read: 0,
        bytes_sent: 0,
        samples: Vec::new(),
        guest_bytes: 0,
    };
    while next < end {
        tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
        let begun = Instant::now();
        match siterec_agent::source::cycle(&rig.ctx, a).await {
            Ok(Cycle::Committed(p)) => {
                if let Some(ms) = point_ms(&p) {
                    newest.fetch_max(ms, Ordering::SeqCst);
                }
                w.cycles += 1;
                w.cycle_secs.push(begun.elapsed().as_secs_f64());
                let c = counters(rig);
                w.bytes_read += c.last_cycle_bytes_read;
                w.bytes_sent += c.last_cycle_bytes_sent;
            }
            Ok(other) => bail!(
                "point {} did not reach the bench's target",
                other.point_id()
            ),
            Err(e) => {
                // Retried soon, as the agent does.
                w.failed += 1;
                w.first_error.get_or_insert_with(|| format!("{e:#}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        next = match schedule {
            // As the agent schedules: a period after this cycle began (at
            // once if the cycle took longer).
            Schedule::Every(period) => begun + period,
            Schedule::Continuous => Instant::now(),
        };
    }
    w.samples = sampler.await?;
    w.guest_bytes = guest_written(run_dir, "vda")
        .await?
        .saturating_sub(written_before);
    w.secs = started.elapsed().as_secs_f64();
    Ok(w)
}

// ---------------------------------------------------------------------------
// Part 3: instant failover of a small and of a large (sparse) disk.

struct Boot {
    label: &'static str,
    run: usize,
    qemu_started: Option<f64>,
    first_output: Option<f64>,
    first_text: String,
    verdict: Option<(f64, bool)>,
    copy_done: f64,
}

impl Boot {
    fn json(&self) -> Value {
        json!({
            "disk": self.label,
            "run": self.run,
            "qemuStartedSeconds": self.qemu_started.map(round3),
            "firstSerialOutputSeconds": self.first_output.map(round3),
            "firstSerialLine": self.first_text,
            "verdictSeconds": self.verdict.map(|v| round2(v.0)),
            "verdictOk": self.verdict.map(|v| v.1),
            "copyDoneSeconds": round2(self.copy_done),
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

const SMALL: &str = "1 GiB";
const LARGE: &str = "64 GiB (sparse)";

struct InstantFailover {
    data_bytes: u64,
    boots: Vec<Boot>,
}

impl InstantFailover {
    /// The median of a figure over the runs of one disk (every run must
    /// have it).
    fn median(&self, label: &str, f: &impl Fn(&Boot) -> Option<f64>) -> Option<f64> {
        let runs: Vec<Option<f64>> = self
            .boots
            .iter()
            .filter(|b| b.label == label)
            .map(f)
            .collect();
        median(runs.into_iter().collect::<Option<Vec<f64>>>()?)
    }

    fn ratio(&self, f: impl Fn(&Boot) -> Option<f64>) -> Option<f64> {
        Some(self.median(LARGE, &f)? / self.median(SMALL, &f)?.max(1e-9))
    }

    fn first_output_ratio(&self) -> Option<f64> {
        self.ratio(|b| b.first_output)
    }

    fn all_ok(&self) -> bool {
        self.boots.iter().all(|b| b.verdict.is_some_and(|v| v.1))
    }

    fn json(&self) -> Value {
        let ratio = self.first_output_ratio();
        let medians = |label: &str| {
            json!({
                "disk": label,
                "qemuStartedSeconds": self.median(label, &|b: &Boot| b.qemu_started).map(round3),
                "firstSerialOutputSeconds": self.median(label, &|b: &Boot| b.first_output).map(round3),
                "verdictSeconds": self.median(label, &|b: &Boot| b.verdict.map(|v| v.0)).map(round2),
                "copyDoneSeconds": self.median(label, &|b: &Boot| Some(b.copy_done)).map(round2),
            })
        };
        json!({
            "dataBytesStored": self.data_bytes,
            "runs": self.boots.iter().map(Boot::json).collect::<Vec<_>>(),
            "medians": [medians(SMALL), medians(LARGE)],
            "everyVerdictOk": self.all_ok(),
            "firstOutputLargeOverSmall": ratio.map(round2),
            "verdictLargeOverSmall": self.ratio(|b| b.verdict.map(|v| v.0)).map(round2),
            "copyLargeOverSmall": self.ratio(|b| Some(b.copy_done)).map(round2),
            "target": INSTANT_RATIO_TARGET,
            "met": ratio.is_some_and(|r| r <= INSTANT_RATIO_TARGET),
        })
    }

    fn print(&self) {
        let runs = self.boots.iter().filter(|b| b.label == SMALL).count();
        println!(
            "\n3. Instant failover: StartReplica of the test guest's recovery point ({:.1} MiB of chunks stored) as a 1 GiB and as a 64 GiB disk, {runs} run(s) each, alternating; the VM boots from the store over NBD while block-stream copies; seconds from the call",
            self.data_bytes as f64 / MIB as f64
        );
        let verdict = |v: Option<(f64, bool)>| match v {
            Some((s, ok)) => format!("{s:.2} ({})", if ok { "OK" } else { "FAIL" }),
            None => "none".into(),
        };
        let mut rows: Vec<Value> = self
            .boots
            .iter()
            .map(|b| {
                json!({
                    "disk": b.label,
                    "run": b.run.to_string(),
                    "qemu": b.qemu_started.map(round3),
                    "first": b.first_output.map(round3),
                    "verdict": verdict(b.verdict),
                    "copy": round2(b.copy_done),
                })
            })
            .collect();
        for label in [SMALL, LARGE] {
            rows.push(json!({
                "disk": label,
                "run": "median",
                "qemu": self.median(label, &|b: &Boot| b.qemu_started).map(round3),
                "first": self.median(label, &|b: &Boot| b.first_output).map(round3),
                "verdict": self.median(label, &|b: &Boot| b.verdict.map(|v| v.0)).map(round2),
                "copy": self.median(label, &|b: &Boot| Some(b.copy_done)).map(round2),
            }));
        }
        crate::output::rows(
            Format::Table,
            &rows,
            &[
                ("VIRTUAL DISK", "/disk"),
                ("RUN", "/run"),
                ("QEMU STARTED S", "/qemu"),
                ("FIRST SERIAL OUTPUT S", "/first"),
                ("GUEST VERDICT S", "/verdict"),
                ("COPY DONE S", "/copy"),
            ],
        );
        let show = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}×"));
        let ratio = self.first_output_ratio();
        println!(
            "first serial output, 64 GiB / 1 GiB (medians): {} (target ≤ {INSTANT_RATIO_TARGET}×): {}; guest verdict {}; copy {}; every verdict OK: {}",
            show(ratio),
            met(ratio.is_some_and(|r| r <= INSTANT_RATIO_TARGET)),
            show(self.ratio(|b| b.verdict.map(|v| v.0))),
            show(self.ratio(|b| Some(b.copy_done))),
            self.all_ok()
        );
    }
}

async fn instant_failover(
    dir: &Path,
    guest: &TestGuest,
    runs: usize,
) -> anyhow::Result<InstantFailover> {
    fresh_dir(dir)?;
    // The guest writes its files on a 1 GiB disk: the recovery point's data.
    let source = dir.join("source.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&source)?, "1G"])?;
    eprintln!("part 3: the test guest writes its files…");
    let boot = {
        let (guest, source) = (guest.clone(), source.clone());
        tokio::task::spawn_blocking(move || {
            guest.boot(&source, Mode::Write, SEED, Duration::from_secs(240))
        })
        .await??
    };
    if !matches!(boot.verdict, siterec_testguest::Verdict::Wrote(_)) {
        bail!(
            "the test guest did not write its files:\n{}",
            boot.serial_log
        );
    }
    let raw = dir.join("source.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        path_str(&source)?,
        path_str(&raw)?,
    ])?;
    let target =
        siterec_agent::target::Target::open(&dir.join("store"), dir.join("failover")).await?;
    // One chunk per block with data; all-zero blocks are holes.
    let mut chunks = Vec::new();
    let mut data_bytes = 0u64;
    {
        use std::io::Read;
        let mut f =
            std::fs::File::open(&raw).with_context(|| format!("opening {}", raw.display()))?;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for _ in 0..(GIB / u64::from(CHUNK_SIZE)) {
            f.read_exact(&mut buf)
                .with_context(|| format!("reading {}", raw.display()))?;
            let id = target.store.put_plain_chunk(buf.clone(), true).await?;
            if id.is_some() {
                data_bytes += u64::from(CHUNK_SIZE);
            }
            chunks.push(id);
        }
    }
    target.store.sync().await?;
    for (point, size) in [("p-1g", GIB), ("p-64g", 64 * GIB)] {
        let mut disk_chunks = chunks.clone();
        disk_chunks.resize((size / u64::from(CHUNK_SIZE)) as usize, None);
        let manifest = siterec_store::Manifest {
            item: "bench".into(),
            point_id: point.into(),
            created_at_unix_ms: now_ms(),
            consistency: siterec_core::Consistency::CrashConsistent,
            disks: vec![siterec_store::DiskManifest {
                disk_id: "vda".into(),
                size,
                chunk_size: CHUNK_SIZE,
                chunks: disk_chunks,
            }],
            bases: Default::default(),
        };
        target.store.commit_point(&manifest).await?;
    }
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&source);

    let mut boots = Vec::new();
    for run in 1..=runs {
        for (label, point, vm_name) in [(SMALL, "p-1g", "bench-1g"), (LARGE, "p-64g", "bench-64g")]
        {
            eprintln!("part 3: instant failover of the {label} disk, run {run}/{runs}…");
            let serial = dir.join("failover/vms").join(vm_name).join("serial.log");
            let work = TaskWork::StartReplica {
                item: "bench".into(),
                point_id: point.into(),
                vm_name: vm_name.into(),
                test: true,
                vm: VmInfo {
                    memory_mib: 256,
                    cpus: 1,
                    kernel: Some(guest.kernel.display().to_string()),
                    initrd: Some(guest.initrd.display().to_string()),
                    append: Some(siterec_testguest::append(Mode::Auto, SEED, 120, true)),
                },
                nics: vec![],
                sealed_key: None,
            };
            settle();
            let t0 = Instant::now();
            let watcher = tokio::spawn(watch_serial(serial, t0, Duration::from_secs(300)));
            let started = target.run_task(&work).await;
            let copy_done = t0.elapsed().as_secs_f64();
            if let Err(e) = started {
                watcher.abort();
                return Err(e.context(format!("starting the replica of the {label} disk")));
            }
            let seen = watcher.await?;
            boots.push(Boot {
                label,
                run,
                qemu_started: seen.qemu_started,
                first_output: seen.first_output,
                first_text: seen.first_text,
                verdict: seen.verdict,
                copy_done,
            });
            target
                .run_task(&TaskWork::RemoveReplica {
                    item: "bench".into(),
                    vm_name: vm_name.into(),
                })
                .await
                .with_context(|| format!("removing the replica {vm_name}"))?;
        }
    }
    Ok(InstantFailover { data_bytes, boots })
}

/// What [`watch_serial`] saw, in seconds from the call.
struct SerialTimes {
    /// The log file exists: QEMU has started (it creates the file as it
    /// sets up the serial port, before the guest runs).
    qemu_started: Option<f64>,
    first_output: Option<f64>,
    /// The first line the guest printed (as far as it had come).
    first_text: String,
    verdict: Option<(f64, bool)>,
}

/// Polls a serial log every 10 ms: seconds from `t0` to the file's
/// creation, to its first byte and to the guest's verdict line (and
/// whether it says OK).
async fn watch_serial(path: PathBuf, t0: Instant, timeout: Duration) -> SerialTimes {
    let mut t = SerialTimes {
        qemu_started: None,
        first_output: None,
        first_text: String::new(),
        verdict: None,
    };
    loop {
        if t.first_output.is_none()
            && let Ok(m) = std::fs::metadata(&path)
        {
            t.qemu_started
                .get_or_insert_with(|| t0.elapsed().as_secs_f64());
            if m.len() > 0 {
                t.first_output = Some(t0.elapsed().as_secs_f64());
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                t.first_text = log
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(100)
                    .collect();
            }
        }
        if t.first_output.is_some() {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if log.contains("SITEREC-GUEST VERDICT") {
                let ok = log.contains("SITEREC-GUEST VERDICT OK");
                t.verdict = Some((t0.elapsed().as_secs_f64(), ok));
                return t;
            }
        }
        if t0.elapsed() > timeout {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_point_times() {
        let s: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.5), 50.0);
        assert_eq!(percentile(&s, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(point_ms("1764123456789-abcd1234"), Some(1764123456789));
        assert_eq!(point_ms("p-1g"), None);
    }
}
