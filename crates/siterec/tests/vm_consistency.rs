//! Consistency of VM recovery points through real processes: with a guest
//! agent the app-consistent point freezes the guest's filesystems (the
//! guest itself reports the freeze and the thaw on its console); without
//! one the point is crash-consistent and marked so.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use siterec_testguest::{Mode, TestGuest};

fn vm_block(guest: &TestGuest, name: &str, disk: &Path, guest_agent: bool, seed: u64) -> String {
    format!(
        r#"[[vms]]
name = "{name}"
memory_mib = 256
cpus = 1
guest_agent = {guest_agent}
kernel = "{}"
initrd = "{}"
append = "{}"
disks = [ {{ name = "vda", path = "{}", format = "qcow2" }} ]
"#,
        guest.kernel.display(),
        guest.initrd.display(),
        siterec_testguest::append(Mode::Auto, seed, 90, true),
        disk.display()
    )
}

fn serial(agent: &Path, vm: &str) -> String {
    std::fs::read_to_string(agent.join(format!("vms/{vm}/serial.log"))).unwrap_or_default()
}

/// (point time, type) of an item's points, oldest first.
fn point_types(env: &Env, item: &str) -> Vec<(i64, String)> {
    let mut v: Vec<(i64, String)> = env
        .points(item)
        .iter()
        .map(|p| {
            (
                parse_ms(
                    p["properties"]["recoveryPointTime"]
                        .as_str()
                        .unwrap_or_default(),
                ),
                p["properties"]["recoveryPointType"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn app_consistent_points_freeze_the_guest_and_fall_back_without_an_agent() {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let mut cfg = String::from("cloud = \"primary-cloud\"\n");
    for (name, agent, seed) in [("app01", true, 11), ("app02", false, 22)] {
        let disk = disks.join(format!("{name}.qcow2"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"])
            .output()
            .unwrap();
        assert!(out.status.success());
        cfg.push_str(&vm_block(&guest, name, &disk, agent, seed));
    }
    let primary = env.start_agent("primary", &cfg);
    env.start_agent(
        "recovery",
        "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    for vm in ["app01", "app02"] {
        wait_until(Duration::from_secs(120), "the guests to write", || {
            serial(&primary, vm).contains("SITEREC-GUEST WROTE")
        });
    }
    // The guest with an agent has it running; the other has no channel.
    assert!(serial(&primary, "app01").contains("SITEREC-GUEST AGENT started"));
    assert!(!serial(&primary, "app02").contains("SITEREC-GUEST AGENT started"));
    assert!(!serial(&primary, "app01").contains("FSFREEZE"));

    // App-consistent snapshots every hour: the first point of each item is due.
    env.pair(&["--retention-hours", "2", "--app-consistent-hours", "1"]);
    env.wait_machine("app01");
    env.wait_machine("app02");
    let since = now_ms();
    env.enable("app01");
    env.enable("app02");

    let p1 = point_types(&env, "app01");
    assert_eq!(p1[0].1, "AppConsistent", "{p1:?}");
    let log = serial(&primary, "app01");
    let freeze = log
        .find("SITEREC-GUEST FSFREEZE freeze")
        .expect("the guest saw the freeze");
    let thaw = log
        .find("SITEREC-GUEST FSFREEZE thaw")
        .expect("the guest saw the thaw");
    assert!(freeze < thaw, "{log}");
    let p2 = point_types(&env, "app02");
    assert_eq!(p2[0].1, "CrashConsistent", "{p2:?}");
    assert!(!serial(&primary, "app02").contains("FSFREEZE"));

    // The next points come every copy frequency, crash-consistent: the
    // app-consistent one is not due again for an hour.
    let t1 = p1[0].0.max(since);
    env.wait_point_after("app01", t1, Duration::from_secs(120));
    let p1 = point_types(&env, "app01");
    assert_eq!(p1.last().unwrap().1, "CrashConsistent", "{p1:?}");
    assert_eq!(
        serial(&primary, "app01").matches("FSFREEZE freeze").count(),
        1,
        "one freeze only"
    );
}

/// The item's point's disk content, from the replica store.
fn point_hash(store: &Path, item: &str, point: &str) -> blake3::Hash {
    restored_hash(&open_store(store), item, point)
}

fn live_hash(disk: &Path, scratch: &Path) -> blake3::Hash {
    let raw = scratch.join("live.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(disk)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success());
    let h = blake3::hash(&std::fs::read(&raw).unwrap());
    std::fs::remove_file(&raw).unwrap();
    h
}

/// The newest point of `item`: (id, time).
fn newest(env: &Env, item: &str) -> (String, String) {
    let p = &env.points(item)[0];
    (
        p["name"].as_str().unwrap().to_string(),
        p["properties"]["recoveryPointTime"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[test]
fn a_multi_vm_group_gets_points_at_one_instant() {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let mut cfg = String::from("cloud = \"primary-cloud\"\n");
    let mut paths = Vec::new();
    for (name, seed) in [("app01", 31), ("app02", 32)] {
        let disk = disks.join(format!("{name}.qcow2"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"])
            .output()
            .unwrap();
        assert!(out.status.success());
        cfg.push_str(&vm_block(&guest, name, &disk, false, seed));
        paths.push(disk);
    }
    let primary = env.start_agent("primary", &cfg);
    env.start_agent(
        "recovery",
        "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    for vm in ["app01", "app02"] {
        wait_until(Duration::from_secs(120), "the guests to write", || {
            serial(&primary, vm).contains("SITEREC-GUEST WROTE")
        });
    }
    env.pair(&[]);
    env.wait_machine("app01");
    env.wait_machine("app02");
    for m in ["app01", "app02"] {
        let out = env.json(&[
            "item",
            "enable",
            "--fabric",
            "primary",
            "--cloud",
            "primary-cloud",
            "--machine",
            m,
            "--group",
            "app",
        ]);
        assert_eq!(out["status"], "Succeeded", "{out}");
    }
    let store = env.path("recovery-agent/store");
    // Two rounds, each after different writes in each VM: the two points of
    // a round have the same time, and each holds its VM's disk as it was.
    for (round, (pa, pb)) in [(0x21u8, 0x31u8), (0x22, 0x32)].into_iter().enumerate() {
        vm_write(
            &primary.join("vms/app01"),
            "vda",
            pa,
            (40 + round as u64) << 20,
            64 << 10,
        );
        vm_write(
            &primary.join("vms/app02"),
            "vda",
            pb,
            (50 + round as u64) << 20,
            128 << 10,
        );
        let after = now_ms();
        let a = env.wait_point_after("app01", after, Duration::from_secs(150));
        env.wait_point_after("app02", after, Duration::from_secs(150));
        let (a_id, a_time) = newest(&env, "app01");
        let (b_id, b_time) = newest(&env, "app02");
        assert_eq!(a, a_id);
        assert_eq!(
            a_time, b_time,
            "round {round}: the group's points share one instant"
        );
        assert_eq!(
            point_hash(&store, "app01", &a_id),
            live_hash(&paths[0], &disks)
        );
        assert_eq!(
            point_hash(&store, "app02", &b_id),
            live_hash(&paths[1], &disks)
        );
    }
    // Both guests run on after being paused for the points. The group's
    // next cycle may be pausing them right now (the marker exists for the
    // few moments of each pause), so a VM fails only if it stays paused.
    for vm in ["app01", "app02"] {
        let marker = primary.join(format!("vms/{vm}/paused-by-siterec"));
        wait_until(Duration::from_secs(30), &format!("{vm} to run on"), || {
            !marker.exists()
        });
    }
}
