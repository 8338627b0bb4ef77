//! `siterec bench replication`: the data plane measured side by side with
//! the tools people would otherwise use, in one run on one machine.
//!
//! It builds a mixed-content image (4 MiB extents: 40% zero, 30% text-like,
//! 30% random), then measures:
//! - initial replication into a local replica store, through the real
//!   source pipeline and a real target data endpoint over TLS, against
//!   `restic backup`, `borg create --compression zstd,1`, `rsync` and
//!   `qemu-img convert -O qcow2`;
//! - the next cycle after 1% of the 4 KiB blocks were overwritten at
//!   random, against restic, borg and `rsync --inplace --no-whole-file`;
//! - materializing the latest point as a raw image against `restic restore`
//!   and `borg extract`;
//! - this process's peak memory (it runs both the source and the target);
//! - with the peers, this disk's floor for the initial copy and the restore:
//!   the time it takes to make as many bytes durable as each must write,
//!   the best way (see `disk_floor`), beside what 3× restic asks.
//!
//! Peers that are not installed are skipped with a note (`--no-peers`
//! skips them all, to profile siterec alone). Every timed step starts after
//! a `sync`, so none pays for the writeback of the one before, and the
//! `sync` that ends it is timed too: siterec's steps end durable (synced),
//! most peers' do not, so each peer gets two ratios, as run and with that
//! sync added to both sides. Machines are shared and noisy: read the
//! ratios, not the absolute times.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Value, json};

use crate::output::Format;
use crate::sample;

pub struct BenchOptions {
    pub dir: PathBuf,
    pub size_mib: u64,
    pub churn_percent: f64,
    /// Chunk uploads in flight (the agent's `upload_streams`).
    pub streams: usize,
    /// Run the peers too (off: siterec alone, for profiling).
    pub peers: bool,
}

struct Row {
    phase: &'static str,
    tool: String,
    secs: Option<f64>,
    /// CPU time (user + system) the step used: this process's for
    /// siterec, the child's for a peer.
    cpu: Option<f64>,
    /// Seconds a `sync` right after the step took: writing back what the
    /// step left dirty. siterec syncs what it writes (about zero here);
    /// the peers mostly do not, so "peer + sync" is the like-for-like
    /// figure for a copy that survives a power cut.
    sync: Option<f64>,
    note: String,
}

/// A siterec row: the step timed from `(t, c)`, then the sync after it.
fn ours(phase: &'static str, t: Instant, c: f64, note: String) -> Row {
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(libc::RUSAGE_SELF) - c;
    Row {
        phase,
        tool: "siterec".into(),
        secs: Some(secs),
        cpu: Some(cpu),
        sync: Some(timed_sync()),
        note,
    }
}

/// Seconds a `sync(2)` takes now.
fn timed_sync() -> f64 {
    let t = Instant::now();
    settle();
    t.elapsed().as_secs_f64()
}

/// User + system CPU seconds of this process (`RUSAGE_SELF`) or of its
/// waited-for children (`RUSAGE_CHILDREN`).
fn cpu_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid
    // initial value for it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `who` is one of the two constants.
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

pub async fn replication(opts: BenchOptions, out: Format) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = opts.dir.canonicalize()?;
    let image = dir.join("disk.img");
    let size = opts.size_mib * 1024 * 1024;
    eprintln!("building a {} MiB mixed image…", opts.size_mib);
    sample::make_mixed_image(&image, size, 1)?;
    let mut rows: Vec<Row> = Vec::new();

    // ---- ours: initial replication through the real pipeline ----
    let rig = Rig::start(&dir.join("siterec"), opts.streams).await?;
    let assignment = rig.assignment(&image, size);
    settle();
    let (t, c) = (Instant::now(), cpu_secs(libc::RUSAGE_SELF));
    let p1 = committed(siterec_agent::source::cycle(&rig.ctx, &assignment).await?)?;
    rows.push(ours("initial", t, c, rig.sent_note()));
    let store_bytes = du(&dir.join("siterec/store"));

    // ---- peers: initial ----
    let restic_repo = dir.join("restic");
    let borg_repo = dir.join("borg");
    let rsync_dest = dir.join("rsync");
    std::fs::create_dir_all(&rsync_dest)?;
    let has = |tool: &str, arg: &str| {
        opts.peers
            && Command::new(tool)
                .arg(arg)
                .output()
                .is_ok_and(|o| o.status.success())
    };
    let (restic, borg, rsync, qemu_img) = (
        has("restic", "version"),
        has("borg", "--version"),
        has("rsync", "--version"),
        has("qemu-img", "--version"),
    );
    if restic {
        run(Command::new("restic")
            .args(["init", "--repo"])
            .arg(&restic_repo)
            .env("RESTIC_PASSWORD", "bench"))?;
        rows.push(timed(
            "initial",
            "restic backup",
            Command::new("restic")
                .args(["backup", "--quiet", "--repo"])
                .arg(&restic_repo)
                .arg(&image)
                .env("RESTIC_PASSWORD", "bench"),
        )?);
    } else if opts.peers {
        rows.push(missing("initial", "restic"));
    }
    if borg {
        run(Command::new("borg")
            .args(["init", "-e", "repokey"])
            .arg(&borg_repo)
            .env("BORG_PASSPHRASE", "bench"))?;
        rows.push(timed(
            "initial",
            "borg create zstd,1",
            Command::new("borg")
                .args(["create", "--compression", "zstd,1"])
                .arg(format!("{}::a", borg_repo.display()))
                .arg(&image)
                .env("BORG_PASSPHRASE", "bench")
                .current_dir(&dir),
        )?);
    } else if opts.peers {
        rows.push(missing("initial", "borg"));
    }
    if rsync {
        rows.push(timed(
            "initial",
            "rsync",
            Command::new("rsync").arg(&image).arg(&rsync_dest),
        )?);
    } else if opts.peers {
        rows.push(missing("initial", "rsync"));
    }
    if qemu_img {
        rows.push(timed(
            "initial",
            "qemu-img convert -O qcow2",
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&image)
                .arg(dir.join("convert.qcow2")),
        )?);
    } else if opts.peers {
        rows.push(missing("initial", "qemu-img"));
    }

    if opts.peers {
        rows.push(disk_floor("initial", &dir, store_bytes)?);
    }

    // ---- churn: overwrite 1% of the 4 KiB blocks at random ----
    let blocks = churn(&image, size, opts.churn_percent)?;
    eprintln!(
        "overwrote {blocks} random 4 KiB blocks ({}%)",
        opts.churn_percent
    );
    settle();
    let (t, c) = (Instant::now(), cpu_secs(libc::RUSAGE_SELF));
    let p2 = committed(siterec_agent::source::cycle(&rig.ctx, &assignment).await?)?;
    rows.push(ours("delta", t, c, rig.sent_note()));
    if restic {
        rows.push(timed(
            "delta",
            "restic backup",
            Command::new("restic")
                .args(["backup", "--quiet", "--repo"])
                .arg(&restic_repo)
                .arg(&image)
                .env("RESTIC_PASSWORD", "bench"),
        )?);
    }
    if borg {
        rows.push(timed(
            "delta",
            "borg create zstd,1",
            Command::new("borg")
                .args(["create", "--compression", "zstd,1"])
                .arg(format!("{}::b", borg_repo.display()))
                .arg(&image)
                .env("BORG_PASSPHRASE", "bench")
                .current_dir(&dir),
        )?);
    }
    if rsync {
        rows.push(timed(
            "delta",
            "rsync --inplace --no-whole-file",
            Command::new("rsync")
                .args(["--inplace", "--no-whole-file"])
                .arg(&image)
                .arg(&rsync_dest),
        )?);
    }

    // ---- restore the latest point ----
    settle();
    let (t, c) = (Instant::now(), cpu_secs(libc::RUSAGE_SELF));
    let key = siterec_store::RecoveryKey::read_file(dir.join("siterec/recovery.key"))?;
    let disks = rig
        .target
        .materialize_with_key(&key, "bench", &p2, &["raw".to_string()])
        .await?;
    rows.push(ours("restore", t, c, String::new()));
    let restored = disks
        .first()
        .map(|d| PathBuf::from(&d.path))
        .context("no disk materialized")?;
    let identical = sample::hash_file(&restored)? == sample::hash_file(&image)?;
    if !identical {
        bail!("the materialized image differs from the source: the benchmark is void");
    }
    let restored_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&restored)?.blocks() * 512
    };
    if restic {
        let target = dir.join("restic-restore");
        rows.push(timed(
            "restore",
            "restic restore",
            Command::new("restic")
                .args(["restore", "latest", "--quiet", "--repo"])
                .arg(&restic_repo)
                .arg("--target")
                .arg(&target)
                .env("RESTIC_PASSWORD", "bench"),
        )?);
    }
    if borg {
        let target = dir.join("borg-extract");
        std::fs::create_dir_all(&target)?;
        rows.push(timed(
            "restore",
            "borg extract",
            Command::new("borg")
                .arg("extract")
                .arg(format!("{}::b", borg_repo.display()))
                .env("BORG_PASSPHRASE", "bench")
                .current_dir(&target),
        )?);
    }
    if opts.peers {
        rows.push(disk_floor("restore", &dir, restored_bytes)?);
    }
    let peak = peak_rss_mib();
    let _ = p1;

    // ---- report ----
    let siterec_row = |phase: &str| {
        rows.iter()
            .find(|r| r.phase == phase && r.tool == "siterec")
    };
    let report: Vec<Value> = rows
        .iter()
        .map(|r| {
            let us = siterec_row(r.phase).filter(|_| r.tool != "siterec" && r.tool != FLOOR);
            let ratio = match (r.secs, us.and_then(|u| u.secs)) {
                (Some(peer), Some(us)) if us > 0.0 => Some(peer / us),
                _ => None,
            };
            let durable = |row: &Row| Some(row.secs? + row.sync?);
            let durable_ratio = match (durable(r), us.and_then(durable)) {
                (Some(peer), Some(us)) if us > 0.0 => Some(peer / us),
                _ => None,
            };
            json!({"phase": r.phase, "tool": r.tool, "seconds": r.secs.map(round2), "cpuSeconds": r.cpu.map(round2), "syncSeconds": r.sync.map(round2), "peerOverSiterec": ratio.map(round2), "withSyncPeerOverSiterec": durable_ratio.map(round2), "note": r.note})
        })
        .collect();
    match out {
        Format::Json => crate::output::json(
            &json!({"sizeMiB": opts.size_mib, "churnPercent": opts.churn_percent, "rows": report, "peakRssMiB": peak, "storeBytes": store_bytes, "restoredIdentical": identical}),
        ),
        Format::Table => {
            println!(
                "image {} MiB, churn {}% of 4 KiB blocks, {} upload streams; restored image identical: {identical}",
                opts.size_mib, opts.churn_percent, opts.streams
            );
            crate::output::rows(
                out,
                &report,
                &[
                    ("PHASE", "/phase"),
                    ("TOOL", "/tool"),
                    ("SECONDS", "/seconds"),
                    ("CPU S", "/cpuSeconds"),
                    ("SYNC S", "/syncSeconds"),
                    ("PEER / SITEREC", "/peerOverSiterec"),
                    ("+ SYNC", "/withSyncPeerOverSiterec"),
                    ("NOTE", "/note"),
                ],
            );
            for phase in ["initial", "restore"] {
                if let Some(line) = target_line(&rows, phase) {
                    println!("{line}");
                }
            }
            println!("peak memory of this process (source + target + store): {peak} MiB");
            println!(
                "replica store on disk after the initial copy: {:.1} MiB",
                store_bytes as f64 / 1048576.0
            );
        }
    }
    rig.stop().await;
    Ok(())
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn missing(phase: &'static str, tool: &str) -> Row {
    Row {
        phase,
        tool: tool.into(),
        secs: None,
        cpu: None,
        sync: None,
        note: format!(
            "{tool} not installed (apt-get install {})",
            match tool {
                "borg" => "borgbackup",
                "qemu-img" => "qemu-utils",
                t => t,
            }
        ),
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn timed(phase: &'static str, tool: &str, cmd: &mut Command) -> anyhow::Result<Row> {
    eprintln!("{phase}: {tool}…");
    settle();
    let (t, c) = (Instant::now(), cpu_secs(libc::RUSAGE_CHILDREN));
    run(cmd)?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Row {
        phase,
        tool: tool.into(),
        secs: Some(secs),
        cpu: Some(cpu_secs(libc::RUSAGE_CHILDREN) - c),
        sync: Some(timed_sync()),
        note: String::new(),
    })
}

/// The tool name of the disk floor rows.
const FLOOR: &str = "disk floor";

/// The least time this disk takes to make `bytes` durable, the way a
/// store or a restore writes them at best: four threads appending 1 MiB
/// writes with `O_DIRECT` to files of their own, then an fsync of each.
/// No phase that must leave that many bytes durable can beat it here, so
/// it says what the targets can mean on this machine.
fn disk_floor(phase: &'static str, dir: &Path, bytes: u64) -> anyhow::Result<Row> {
    eprintln!("{phase}: {FLOOR}…");
    let (secs, written) = durable_write(dir, bytes)?;
    Ok(Row {
        phase,
        tool: FLOOR.into(),
        secs: Some(secs),
        cpu: None,
        sync: Some(timed_sync()),
        note: format!(
            "{:.0} MiB made durable: 4 threads, 1 MiB O_DIRECT writes, fsync",
            written as f64 / 1048576.0
        ),
    })
}

/// Makes at least `bytes` durable in `dir` the way [`disk_floor`] says
/// (after [`settle`]); returns the seconds it took and the bytes written.
pub(crate) fn durable_write(dir: &Path, bytes: u64) -> anyhow::Result<(f64, u64)> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const THREADS: u64 = 4;
    const BLOCK: usize = 1 << 20;
    const ALIGN: usize = 4096;
    let mut raw = vec![0u8; BLOCK + ALIGN];
    StdRng::seed_from_u64(7).fill_bytes(&mut raw);
    let start = raw.as_ptr().align_offset(ALIGN);
    let block = &raw[start..start + BLOCK];
    let per_thread = bytes.div_ceil(THREADS).div_ceil(BLOCK as u64);
    let paths: Vec<PathBuf> = (0..THREADS)
        .map(|i| dir.join(format!("floor-{i}")))
        .collect();
    settle();
    let t = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = paths
            .iter()
            .map(|path| {
                scope.spawn(move || -> std::io::Result<()> {
                    let open = |flags| {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .custom_flags(flags)
                            .open(path)
                    };
                    // A file system without O_DIRECT (tmpfs): through the
                    // page cache, which the fsync then writes.
                    let f = match open(libc::O_DIRECT) {
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0)?,
                        f => f?,
                    };
                    for i in 0..per_thread {
                        f.write_all_at(block, i * BLOCK as u64)?;
                    }
                    f.sync_all()
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a disk floor thread panicked"))?
                .context("writing the disk floor files")?;
        }
        Ok(())
    })?;
    let secs = t.elapsed().as_secs_f64();
    for path in &paths {
        let _ = std::fs::remove_file(path);
    }
    Ok((secs, per_thread * THREADS * BLOCK as u64))
}

/// What the "3× faster than restic" asks of `phase` here, beside
/// this disk's floor: `None` without both rows.
fn target_line(rows: &[Row], phase: &str) -> Option<String> {
    let secs = |tool: &str| {
        rows.iter()
            .find(|r| r.phase == phase && r.tool == tool)
            .and_then(|r| r.secs)
    };
    let restic = secs(if phase == "restore" {
        "restic restore"
    } else {
        "restic backup"
    })?;
    let floor = secs(FLOOR)?;
    let ours = secs("siterec")?;
    Some(format!(
        "{phase}: 3× restic means {:.2} s; this disk needs {floor:.2} s to make the bytes durable; siterec took {ours:.2} s ({:.2}× the floor)",
        restic / 3.0,
        ours / floor
    ))
}

/// Writes back every dirty page before a timed step, so that no step pays
/// for the previous one's writes (siterec syncs what it writes; the peers
/// do not, and would leave gigabytes dirty for the next step to flush).
pub(crate) fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Overwrites `percent`% of the 4 KiB blocks with random data; returns how many.
fn churn(path: &Path, size: u64, percent: f64) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut rng = StdRng::seed_from_u64(99);
    let blocks = size / 4096;
    let n = ((blocks as f64) * percent / 100.0).round() as u64;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, rng.random_range(0..blocks) * 4096)?;
    }
    f.sync_all()?;
    Ok(n)
}

fn du(path: &Path) -> u64 {
    let Ok(out) = Command::new("du").args(["-sb"]).arg(path).output() else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// A source context and a target data endpoint in this process, with
/// throwaway certificates.
pub(crate) struct Rig {
    pub(crate) ctx: siterec_agent::source::SourceCtx,
    pub(crate) target: Arc<siterec_agent::target::Target>,
    pub(crate) url: String,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Rig {
    pub(crate) async fn start(dir: &Path, streams: usize) -> anyhow::Result<Rig> {
        std::fs::create_dir_all(dir)?;
        let ca = siterec_pki::Ca::generate("bench CA")?;
        let names = ["127.0.0.1".to_string(), "localhost".to_string()];
        let (csr, key) = siterec_pki::generate_csr(&names)?;
        let cert = ca.sign_csr(&csr, "agent-bench", 1)?;
        // The store is encrypted, as the issue asks of the measure (the
        // recovery key is written next to it, for the restore).
        let encryption = siterec_agent::target::StoreEncryption {
            credential: dir.join("store.credential"),
            recovery_key_export: dir.join("recovery.key"),
        };
        let target = siterec_agent::target::Target::open_backend(
            Some(&encryption),
            &siterec_store::BackendConfig::Local {
                path: dir.join("store"),
            },
            dir.join("failover"),
        )
        .await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let tls = siterec_pki::server_config(
            &cert,
            &key,
            Some(ca.cert_pem()),
            siterec_pki::ClientAuth::Required,
        )?;
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        target.set_sources([("bench".to_string(), "agent-bench".to_string())]);
        let router = target.router();
        let server = tokio::spawn(async move {
            let _ = siterec_pki::serve(listener, Some(tls), router, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        });
        let client = siterec_pki::reqwest_client(
            ca.cert_pem(),
            Some((&cert, &key)),
            Duration::from_secs(300),
        )?;
        let ctx = siterec_agent::source::SourceCtx {
            upload_streams: streams,
            ..siterec_agent::source::SourceCtx::new(
                dir.join("source"),
                client.clone(),
                client,
                "https://127.0.0.1:9".into(),
                Arc::new(siterec_agent::vm::VmHost::new(&[], &dir.join("source"))),
            )
        };
        Ok(Rig {
            ctx,
            target,
            url,
            stop,
            server,
        })
    }

    pub(crate) fn assignment(
        &self,
        image: &Path,
        size: u64,
    ) -> siterec_core::wire::ReplicationAssignment {
        siterec_core::wire::ReplicationAssignment {
            item: "bench".into(),
            machine: "bench".into(),
            disks: vec![siterec_core::wire::DiskInfo {
                name: "disk0".into(),
                path: image.display().to_string(),
                size_bytes: size,
            }],
            target_agent_id: "agent-bench".into(),
            target_url: self.url.clone(),
            copy_frequency_secs: 30,
            app_consistent_secs: 0,
            group: None,
            compression: true,
            not_before: None,
            offline_export: None,
            final_point: None,
            epoch: None,
        }
    }

    fn sent_note(&self) -> String {
        let st = self
            .ctx
            .status
            .lock()
            .map(|s| s.items.get("bench").cloned())
            .ok()
            .flatten()
            .unwrap_or_default();
        format!(
            "read {:.0} MiB, sent {:.1} MiB in {} chunks",
            st.last_cycle_bytes_read as f64 / 1048576.0,
            st.last_cycle_bytes_sent as f64 / 1048576.0,
            st.last_cycle_chunks_sent
        )
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let _ = self.target.store.sync().await;
    }
}

/// The bench's target is local and always up: a spooled point is an error.
pub(crate) fn committed(c: siterec_agent::source::Cycle) -> anyhow::Result<String> {
    match c {
        siterec_agent::source::Cycle::Committed(p) => Ok(p),
        siterec_agent::source::Cycle::Spooled(p) | siterec_agent::source::Cycle::Exported(p) => {
            anyhow::bail!("point {p} did not reach the bench's target")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_floor_writes_what_it_says_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let row = disk_floor("initial", dir.path(), 6 << 20).unwrap();
        assert_eq!(row.tool, FLOOR);
        assert!(row.secs.is_some_and(|s| s > 0.0));
        // Rounded up to whole 1 MiB writes on each of four threads.
        assert!(row.note.starts_with("8 MiB made durable"), "{}", row.note);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_target_line_sets_three_times_restic_beside_the_floor() {
        let row = |phase, tool: &str, secs| Row {
            phase,
            tool: tool.into(),
            secs: Some(secs),
            cpu: None,
            sync: None,
            note: String::new(),
        };
        let rows = [
            row("initial", "siterec", 4.0),
            row("initial", "restic backup", 9.0),
            row("initial", FLOOR, 2.0),
            row("restore", "siterec", 3.0),
            row("restore", FLOOR, 2.5),
        ];
        assert_eq!(
            target_line(&rows, "initial").unwrap(),
            "initial: 3× restic means 3.00 s; this disk needs 2.00 s to make the bytes durable; siterec took 4.00 s (2.00× the floor)"
        );
        // No restic restore row: nothing to say.
        assert_eq!(target_line(&rows, "restore"), None);
    }
}
