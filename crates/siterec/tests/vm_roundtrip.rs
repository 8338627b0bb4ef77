//! The whole cycle of a QEMU VM through real processes and a real guest
//! that keeps writing (the test guest rewrites a file of its filesystem
//! every second): protect → planned failover (the guest powers off on the
//! ACPI power-down, its last writes come over) → commit → writes at the
//! recovery site → reprotect (the replica VM replicates back, only what
//! differs) → failback (the replica VM powers off, its final point is
//! written into the VM's own qcow2 image, and the VM starts again at home)
//! → commit → reprotect. After each step the item's state, the job's steps
//! and the data are checked: the disks at rest against the final points,
//! block for block, and the recovery site's write on the primary disk.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use siterec_testguest::{Mode, Options, TestGuest};

const SEED: u64 = 4711;

fn state(op: &Value) -> (String, String) {
    let p = &op["result"]["properties"];
    (
        p["protectionState"].as_str().unwrap().to_string(),
        p["activeLocation"].as_str().unwrap().to_string(),
    )
}

fn steps(env: &Env, op: &Value) -> Vec<String> {
    let shown = env.json(&["jobs", "show", op["jobId"].as_str().unwrap()]);
    let tasks = shown["properties"]["tasks"].as_array().unwrap();
    assert!(
        tasks.iter().all(|t| t["state"] == "Succeeded"),
        "{tasks:#?}"
    );
    tasks
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

fn details(op: &Value) -> &Value {
    &op["result"]["properties"]["providerSpecificDetails"]
}

fn pid_alive(run_dir: &Path) -> bool {
    std::fs::read_to_string(run_dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        })
}

/// BLAKE3 of a qcow2 image's guest-visible content, read by qemu-img.
fn image_hash(image: &Path, scratch: &Path) -> blake3::Hash {
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(scratch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = blake3::hash(&std::fs::read(scratch).unwrap());
    std::fs::remove_file(scratch).unwrap();
    h
}

/// Whether the qcow2 image holds `pattern` over `len` bytes at `offset`.
fn holds_pattern(image: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -P {pattern} {offset} {len}"))
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed")
}

fn newest_point(env: &Env, item: &str) -> (String, u64) {
    let points = env.points(item);
    let p = &points[0];
    (
        p["name"].as_str().unwrap().to_string(),
        p["properties"]["providerSpecificDetails"]["bytesSent"]
            .as_u64()
            .unwrap(),
    )
}

fn final_point(op: &Value) -> String {
    details(op)["failoverRecoveryPointId"]
        .as_str()
        .unwrap()
        .to_string()
}

const DISK: u64 = 128 << 20;

#[test]
fn a_vm_fails_over_planned_is_reprotected_fails_back_and_is_reprotected_again() {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let vda = disks.join("vda.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&vda)
        .arg(DISK.to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    // Writes its files, then rewrites /mnt/churn at 64 KiB/s; a replica
    // (auto mode) verifies the files, then churns too.
    let append = Options {
        stay: true,
        churn_kib_per_sec: 64,
        agent: false,
        ..Options::new(Mode::Auto, SEED, 120)
    }
    .append();
    let primary = env.start_agent(
        "primary",
        &format!(
            r#"cloud = "primary-cloud"
[[vms]]
name = "app01"
memory_mib = 256
cpus = 1
kernel = "{}"
initrd = "{}"
append = "{append}"
disks = [ {{ name = "vda", path = "{}", format = "qcow2" }} ]
nics = [ {{ name = "eth0", network = "prod-lan", mac = "52:54:00:00:00:07" }} ]
[target]
listen = "127.0.0.1:0"
"#,
            guest.kernel.display(),
            guest.initrd.display(),
            vda.display()
        ),
    );
    let recovery = env.start_agent(
        "recovery",
        "cloud = \"recovery-cloud\"\n[[networks]]\nname = \"recovery-lan\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    let primary_run = primary.join("vms/app01");
    let primary_serial = primary_run.join("serial.log");
    wait_until(Duration::from_secs(120), "the guest to churn", || {
        serial_log(&primary_serial).contains("SITEREC-GUEST CHURN")
    });
    env.pair(&["--retention-hours", "2", "--delete-replica"]);
    env.wait_machine("app01");
    env.enable("app01");
    // Replication goes on while the guest writes.
    let first = env.wait_point_after("app01", now_ms(), Duration::from_secs(120));

    // Planned failover: the guest powers off on the ACPI power-down, the
    // last writes come over in a final point, the VM boots from it at the
    // recovery site.
    let op = env.json(&["failover", "planned", "app01", "--shutdown-timeout", "60"]);
    assert_eq!(op["status"], "Succeeded", "{op}\n{}", env.logs());
    assert_eq!(
        state(&op),
        ("PlannedFailoverCompleted".into(), "Recovery".into())
    );
    assert_eq!(
        steps(&env, &op),
        [
            "Prerequisites check for planned failover",
            "Shut down the source machine",
            "Replicate the last changes into a final recovery point",
            "Create and start the virtual machine at the recovery site",
            "Complete planned failover",
        ]
    );
    let log = serial_log(&primary_serial);
    assert!(log.contains("SITEREC-GUEST POWERDOWN"), "{log}");
    assert!(!pid_alive(&primary_run), "the old VM's QEMU is gone");
    let at_failover = final_point(&op);
    assert_ne!(at_failover, first);
    let scratch = env.path("scratch.raw");
    let recovery_store = open_store(&recovery.join("store"));
    assert_eq!(
        image_hash(&vda, &scratch),
        restored_hash(&recovery_store, "app01", &at_failover),
        "the final point is not the VM's disk as it shut down"
    );
    let vm = &details(&op)["failoverVm"];
    let replica_run = PathBuf::from(vm["runDir"].as_str().unwrap());
    let replica_serial = PathBuf::from(vm["serialLog"].as_str().unwrap());
    let replica_disk = replica_run.join("disks/vda.qcow2");
    wait_until(
        Duration::from_secs(120),
        "the replica guest's verdict",
        || serial_log(&replica_serial).contains("SITEREC-GUEST VERDICT"),
    );
    assert!(
        serial_log(&replica_serial).contains("SITEREC-GUEST VERDICT OK"),
        "{}",
        serial_log(&replica_serial)
    );
    let op = env.json(&["failover", "commit", "app01"]);
    assert_eq!(state(&op), ("FailoverCommitted".into(), "Recovery".into()));

    // The VM writes at the recovery site: its churn, and 1 MiB beyond its
    // filesystem's data.
    vm_write(&replica_run, "vda", 0x5a, 100 << 20, 1 << 20);

    // Reprotect: the replica VM replicates back to the primary site, which
    // seeds its store from the VM's old qcow2 image first.
    let op = env.json(&["item", "reprotect", "app01"]);
    assert_eq!(op["status"], "Succeeded", "{op}\n{}", env.logs());
    assert_eq!(state(&op), ("Protected".into(), "Recovery".into()));
    let (_, sent) = newest_point(&env, "app01");
    eprintln!("reprotect: {sent} bytes sent of a {DISK}-byte disk");
    assert!(
        sent < DISK / 8,
        "reprotect sent {sent} bytes of a {DISK}-byte disk"
    );
    // (The 1 MiB of one pattern compresses to a few KiB.)
    assert!(sent > 0, "the recovery site's writes were sent");
    assert!(!pid_alive(&primary_run), "the old VM stays down (fenced)");

    // Failback: the replica VM powers off, its final point is written into
    // the VM's own image, and the VM runs at home again.
    let op = env.json(&["failover", "planned", "app01"]);
    assert_eq!(op["status"], "Succeeded", "{op}\n{}", env.logs());
    assert_eq!(
        state(&op),
        ("PlannedFailoverCompleted".into(), "Primary".into())
    );
    assert!(
        serial_log(&replica_serial).contains("SITEREC-GUEST POWERDOWN"),
        "{}",
        serial_log(&replica_serial)
    );
    assert!(!pid_alive(&replica_run), "the replica VM's QEMU is gone");
    let at_failback = final_point(&op);
    let primary_store = open_store(&primary.join("store"));
    assert_eq!(
        image_hash(&replica_disk, &scratch),
        restored_hash(&primary_store, "app01", &at_failback),
        "the final point is not the replica VM's disk as it shut down"
    );
    let written = details(&op)["failoverDisks"][0]["bytesWritten"]
        .as_u64()
        .unwrap();
    eprintln!("failback: {written} bytes written into the VM's own image");
    assert!(
        (1 << 20..DISK / 8).contains(&written),
        "failback wrote {written} bytes"
    );
    assert!(
        holds_pattern(&vda, 0x5a, 100 << 20, 1 << 20),
        "the recovery site's write is on the primary disk"
    );
    wait_until(Duration::from_secs(60), "the VM to start at home", || {
        pid_alive(&primary_run)
    });
    wait_until(
        Duration::from_secs(120),
        "the guest's verdict at home",
        || serial_log(&primary_serial).contains("SITEREC-GUEST VERDICT"),
    );
    assert!(
        serial_log(&primary_serial).contains("SITEREC-GUEST VERDICT OK"),
        "{}",
        serial_log(&primary_serial)
    );
    let op = env.json(&["failover", "commit", "app01"]);
    assert_eq!(state(&op), ("FailoverCommitted".into(), "Primary".into()));

    // Reprotect again: the original direction, only what differs.
    let op = env.json(&["item", "reprotect", "app01"]);
    assert_eq!(op["status"], "Succeeded", "{op}\n{}", env.logs());
    assert_eq!(state(&op), ("Protected".into(), "Primary".into()));
    let (_, sent) = newest_point(&env, "app01");
    eprintln!("second reprotect: {sent} bytes sent");
    assert!(sent < DISK / 8, "second reprotect sent {sent} bytes");
    let later = env.wait_point_after("app01", now_ms(), Duration::from_secs(120));
    assert!(!later.is_empty());
    assert!(!pid_alive(&replica_run), "the replica VM stays down");
}
