//! A real QEMU VM protected by real processes: the agent runs the test
//! guest, replicates it through fleecing and dirty bitmaps over NBD, and
//! falls back to block hashes when QEMU loses the bitmaps.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use siterec_testguest::{Mode, TestGuest};

const MIB: u64 = 1 << 20;
const SEED: u64 = 4242;

fn qemu_img(args: &[&str]) -> Vec<u8> {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The primary agent's config for one VM: `vda` (qcow2, the guest's
/// filesystem) and `vdb` (raw, a data disk only the test writes).
fn vm_config(guest: &TestGuest, vda: &Path, vdb: &Path) -> String {
    format!(
        r#"cloud = "primary-cloud"
[[vms]]
name = "app01"
memory_mib = 256
cpus = 1
kernel = "{}"
initrd = "{}"
append = "{}"
disks = [
  {{ name = "vda", path = "{}", format = "qcow2" }},
  {{ name = "vdb", path = "{}", format = "raw" }},
]
nics = [ {{ name = "eth0", network = "prod-lan", mac = "52:54:00:12:34:56" }} ]
"#,
        guest.kernel.display(),
        guest.initrd.display(),
        siterec_testguest::append(Mode::Auto, SEED, 90, true),
        vda.display(),
        vdb.display()
    )
}

fn serial(run_dir: &Path) -> String {
    std::fs::read_to_string(run_dir.join("serial.log")).unwrap_or_default()
}

fn item_counters(agent: &Path) -> Value {
    let st = siterec_agent::AgentStatus::read(agent).expect("agent status");
    serde_json::to_value(st.items.get("app01").cloned().unwrap_or_default()).unwrap()
}

/// Waits for a new committed cycle of app01 after `cycles`; returns its counters.
fn next_cycle(agent: &Path, cycles: u64) -> Value {
    wait_until(Duration::from_secs(120), "the next cycle", || {
        item_counters(agent)["cycles"].as_u64().unwrap_or(0) > cycles
    });
    item_counters(agent)
}

/// The content of disk `index` of a point, from the replica store.
fn point_disk_hash(store: &Path, point: &str, index: usize) -> blake3::Hash {
    let store = open_store(store);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let manifest = rt.block_on(store.read_manifest("app01", point)).unwrap();
    let mut h = blake3::Hasher::new();
    let mut reader = store.read_disk(&manifest, index, 4).unwrap();
    while let Some(block) = rt.block_on(reader.next()) {
        let block = block.unwrap();
        match block.data {
            Some(d) => h.update(&d),
            None => h.update(&vec![0u8; block.len as usize]),
        };
    }
    h.finalize()
}

/// The live disk's content as the guest sees it (read while QEMU runs).
fn live_disk_hash(disk: &Path, format: &str, scratch: &Path) -> blake3::Hash {
    let raw = scratch.join("live.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        format,
        "-O",
        "raw",
        disk.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let h = blake3::hash(&std::fs::read(&raw).unwrap());
    std::fs::remove_file(&raw).unwrap();
    h
}

fn latest_point(env: &Env) -> String {
    env.points("app01")[0]["name"].as_str().unwrap().to_string()
}

#[test]
fn dirty_bitmaps_read_only_what_changed_and_lost_tracking_resynchronizes_by_hashes() {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let vda = disks.join("vda.qcow2");
    let vdb = disks.join("vdb.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", vda.to_str().unwrap(), "256M"]);
    std::fs::File::create(&vdb)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    let primary = env.start_agent("primary", &vm_config(&guest, &vda, &vdb));
    let run_dir: PathBuf = primary.join("vms/app01");
    env.start_agent(
        "recovery",
        "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    wait_until(
        Duration::from_secs(120),
        "the guest to write its files",
        || serial(&run_dir).contains("SITEREC-GUEST WROTE"),
    );
    // The VM is offered as a virtual machine.
    env.wait_machine("app01");
    let machines = env.json(&[
        "machine",
        "list",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
    ]);
    let m = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "app01")
        .unwrap()
        .clone();
    let text = m.to_string();
    assert!(text.contains("VirtualMachine"), "{m}");

    env.pair(&[]);
    env.enable("app01");
    let c0 = item_counters(&primary);
    let initial_read = c0["lastCycleBytesRead"].as_u64().unwrap();
    assert!(initial_read > 0, "{c0}");
    // Only the data is read, not the 320 MiB of the disks.
    assert!(initial_read < 64 * MIB, "initial read {initial_read}");

    // An idle guest: the next cycle reads nothing.
    let c1 = next_cycle(&primary, c0["cycles"].as_u64().unwrap());
    assert_eq!(c1["lastCycleBytesRead"], 0, "{c1}");

    // Whole blocks written on vda and most of a block on vdb: exactly the
    // pages written are read (vdb's block was zeros: it is rebuilt from
    // its written pages).
    vm_write(&run_dir, "vda", 0x5a, 200 * MIB, 3 * MIB);
    vm_write(&run_dir, "vdb", 0x6b, 10 * MIB + 4096, MIB - 8192);
    let before = item_counters(&primary)["cycles"].as_u64().unwrap();
    let c2 = next_cycle(&primary, before);
    assert_eq!(c2["lastCycleBytesRead"], 4 * MIB - 8192, "{c2}");
    assert!(c2["lastCycleChunksSent"].as_u64().unwrap() >= 2, "{c2}");
    // Single pages rewritten in three blocks that hold data: three pages
    // are read, and three small deltas sent.
    for (k, page) in [1u64, 2, 3].iter().enumerate() {
        vm_write(
            &run_dir,
            "vda",
            0x11 + k as u8,
            200 * MIB + k as u64 * MIB + page * 4096,
            4096,
        );
    }
    let before = item_counters(&primary)["cycles"].as_u64().unwrap();
    let c = next_cycle(&primary, before);
    assert_eq!(c["lastCycleBytesRead"], 3 * 4096, "{c}");
    assert_eq!(c["lastCycleChunksSent"], 3, "{c}");
    assert!(
        c["lastCycleBytesSent"].as_u64().unwrap() < 3 * 4096 + 1024,
        "{c}"
    );
    let point = latest_point(&env);
    let recovery_store = env.path("recovery-agent/store");
    assert_eq!(
        point_disk_hash(&recovery_store, &point, 0),
        live_disk_hash(&vda, "qcow2", &disks)
    );
    assert_eq!(
        point_disk_hash(&recovery_store, &point, 1),
        live_disk_hash(&vdb, "raw", &disks)
    );

    // QEMU dies (the bitmaps with it: raw disk, and an uncleanly closed
    // qcow2). The agent starts the VM again; the next cycle reads whole
    // disks, compares hashes, ships nothing that did not change, and says
    // so in the item's health.
    let pid: i32 = std::fs::read_to_string(run_dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the test's own QEMU.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let resyncs = c2["resyncs"].as_u64().unwrap_or(0);
    let before = item_counters(&primary)["cycles"].as_u64().unwrap();
    let c3 = next_cycle(&primary, before);
    assert_eq!(c3["resyncs"].as_u64().unwrap_or(0), resyncs + 1, "{c3}");
    assert!(
        c3["lastCycleBytesRead"].as_u64().unwrap() >= initial_read,
        "a whole read: {c3}"
    );
    let warnings = c3["healthWarnings"].to_string();
    assert!(warnings.contains("changed-block tracking was lost"), "{c3}");
    // The guest came back and found its files (it only reads them).
    wait_until(
        Duration::from_secs(120),
        "the restarted guest's verdict",
        || serial(&run_dir).contains("SITEREC-GUEST VERDICT"),
    );
    assert!(
        serial(&run_dir).contains("SITEREC-GUEST VERDICT OK"),
        "{}",
        serial(&run_dir)
    );
    // The next change is tracked again by the new bitmaps.
    vm_write(&run_dir, "vdb", 0x7c, 30 * MIB, 256 << 10);
    let before = item_counters(&primary)["cycles"].as_u64().unwrap();
    let c4 = next_cycle(&primary, before);
    assert_eq!(c4["lastCycleBytesRead"], 256 << 10, "{c4}");
    let point = latest_point(&env);
    assert_eq!(
        point_disk_hash(&recovery_store, &point, 1),
        live_disk_hash(&vdb, "raw", &disks)
    );
    assert_eq!(
        point_disk_hash(&recovery_store, &point, 0),
        live_disk_hash(&vda, "qcow2", &disks)
    );
    let points = env.points("app01");
    assert!(
        points
            .iter()
            .all(|p| p["properties"]["recoveryPointType"] != "Inconsistent"),
        "{points:?}"
    );
}
