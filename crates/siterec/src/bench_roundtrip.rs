//! `siterec bench roundtrip`: the way there and back of one physical
//! server, measured beside what an operator would do without siterec.
//!
//! A vault and both sites' agents run in this process (as in the
//! quickstart). A mixed disk (zeros, text, random) is protected; 1 % of it
//! changes at the primary site, then [`quickstart::cycle`] runs: planned
//! failover, commit, 1 % written at the recovery site, reprotect, failback
//! (written in place), commit, reprotect. Beside it, in the same run: a
//! full copy of the disk (what a reprotect without a seed would send) and
//! `rsync --inplace --no-whole-file` bringing the recovery site's disk back
//! onto a copy of the primary's old one. The machine is shared and noisy:
//! read the ratios, not the absolute times.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};

use crate::output::Format;
use crate::quickstart::{self, Sites};
use crate::sample;

pub struct RoundtripOptions {
    pub dir: PathBuf,
    pub size_mib: u64,
    pub change_percent: f64,
}

pub async fn roundtrip(opts: RoundtripOptions, out: Format) -> anyhow::Result<bool> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir.join("vault").exists() {
        anyhow::bail!(
            "{} holds an earlier run; choose an empty directory",
            dir.display()
        );
    }
    let say = |m: &str| eprintln!("• {m}");
    let size = opts.size_mib << 20;
    let change = ((size as f64) * opts.change_percent / 100.0) as u64;
    let disks = dir.join("disks");
    std::fs::create_dir_all(&disks)?;
    let disk = disks.join("web01-disk0.img");
    sample::make_mixed_image(&disk, size, 11)?;
    say(&format!("made a {} MiB mixed disk", opts.size_mib));

    let sites = Sites::start(&dir, &disk, &say).await?;
    let result = async {
        quickstart::protect(&sites.api, &dir, &say).await?;
        // 1 % changes at the primary site before it stops: the planned
        // failover's final point ships them.
        sample::overwrite_scattered(&disk, size, change, 2, 500)?;
        // The primary's disk as the failover leaves it: what rsync would
        // update in place when bringing the recovery site's disk back.
        let old = dir.join("old-primary.img");
        copy_sparse(&disk, &old)?;
        let report = quickstart::cycle(&sites.api, &disk, size, change, &say).await?;
        anyhow::Ok((report, old))
    }
    .await;
    sites.stop().await;
    let (mut report, old) = result?;

    // Peers, on the same disks: the recovery site's last state is now the
    // primary disk's (the cycle checked it).
    let t = Instant::now();
    let full = dir.join("full-copy.img");
    std::fs::copy(&disk, &full).context("full copy")?;
    std::fs::File::open(&full)?.sync_all()?;
    let full_secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&full);
    let (rsync_secs, rsync_bytes) = match rsync(&disk, &old) {
        Ok(v) => (Some(v.0), Some(v.1)),
        Err(e) => {
            eprintln!("rsync: {e:#}");
            (None, None)
        }
    };
    let _ = std::fs::remove_file(&old);
    // The floor of a reprotect that sends only what differs: each side
    // reads and hashes its disk once (the seed, then the new source's scan).
    let t = Instant::now();
    sample::hash_file(&disk)?;
    let read_secs = t.elapsed().as_secs_f64();
    let pct = |b: u64| (b as f64) * 100.0 / (size as f64);
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let rows = [
        (
            "planned failover (final point)",
            num(&report["plannedFailoverSeconds"]),
            report["plannedFailoverBytesSent"].as_u64().unwrap_or(0),
        ),
        (
            "reprotect (send what differs back)",
            num(&report["reprotectSeconds"]),
            report["reprotectBytesSent"].as_u64().unwrap_or(0),
        ),
        (
            "failback (final point + write in place)",
            num(&report["failbackSeconds"]),
            report["failbackBytesSent"].as_u64().unwrap_or(0),
        ),
        (
            "reprotect after failback",
            num(&report["reprotectBackSeconds"]),
            report["reprotectBackBytesSent"].as_u64().unwrap_or(0),
        ),
        ("full copy of the disk (cp + fsync)", full_secs, size),
        (
            "floor: read + hash the disk, both sides",
            2.0 * read_secs,
            0,
        ),
    ];
    report["fullCopySeconds"] = json!(full_secs);
    report["readAndHashSeconds"] = json!(read_secs);
    report["rsyncSeconds"] = json!(rsync_secs);
    report["rsyncBytesSent"] = json!(rsync_bytes);
    let passed = report["passed"].as_bool().unwrap_or(false);
    match out {
        Format::Json => crate::output::json(&report),
        Format::Table => {
            println!(
                "roundtrip of a {} MiB mixed disk, {} % changed on each side",
                opts.size_mib, opts.change_percent
            );
            println!(
                "  {:<42} {:>9} {:>14} {:>8}",
                "operation", "seconds", "bytes sent", "% disk"
            );
            for (what, secs, bytes) in rows {
                println!("  {what:<42} {secs:>9.2} {bytes:>14} {:>8.2}", pct(bytes));
            }
            match (rsync_secs, rsync_bytes) {
                (Some(s), Some(b)) => println!(
                    "  {:<42} {s:>9.2} {b:>14} {:>8.2}",
                    "rsync --inplace --no-whole-file (back)",
                    pct(b)
                ),
                _ => println!(
                    "  {:<42} {:>9}",
                    "rsync --inplace --no-whole-file (back)", "n/a"
                ),
            }
            if let Some(steps) = report["reprotectSteps"].as_array() {
                println!("  reprotect's steps:");
                for st in steps {
                    println!(
                        "    {:<52} {:>6.2} s",
                        st["name"].as_str().unwrap_or_default(),
                        st["seconds"].as_f64().unwrap_or(0.0)
                    );
                }
            }
            println!(
                "  failback wrote {} bytes in place; data checks {}",
                report["failbackBytesWritten"],
                if passed { "passed" } else { "FAILED" }
            );
        }
    }
    Ok(passed)
}

fn copy_sparse(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    let st = Command::new("cp")
        .args(["--sparse=always"])
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    anyhow::ensure!(st.success(), "cp {} failed", from.display());
    Ok(())
}

/// `rsync --inplace --no-whole-file` of `from` onto `to`: seconds and the
/// bytes it sent (its `--stats` "Total bytes sent").
fn rsync(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<(f64, u64)> {
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(from)
        .arg(to)
        .output()
        .context("running rsync (install the rsync package)")?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let sent = text
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|v| v.replace(',', ""))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((secs, sent))
}
