//! The whole cycle of a physical server through real processes (a vault,
//! a primary agent with a replica store of its own, a recovery agent):
//! protect → planned failover → commit → writes at the recovery site →
//! reprotect (replication back, only the blocks that differ) → failback (a
//! planned failover home, written back in place) → commit → reprotect
//! (the original direction again, only what differs). After each step the
//! item's state, `activeLocation`, `allowedOperations`, the job's steps and
//! the data (`qemu-img compare` against the machine as it was) are checked.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

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

fn state(op: &Value) -> (String, String) {
    let p = &op["result"]["properties"];
    (
        p["protectionState"].as_str().unwrap().to_string(),
        p["activeLocation"].as_str().unwrap().to_string(),
    )
}

/// The bytes the source sent for the newest point.
fn newest_point_bytes(env: &Env, item: &str) -> (String, u64) {
    let points = env.points(item);
    let p = &points[0];
    (
        p["name"].as_str().unwrap().to_string(),
        p["properties"]["providerSpecificDetails"]["bytesSent"]
            .as_u64()
            .unwrap(),
    )
}

fn seeds_left(store_dir: &Path, item: &str) -> Vec<String> {
    let store = open_store(store_dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(store.list_points(Some(item)))
        .unwrap()
        .into_iter()
        .map(|p| p.point_id)
        .filter(|p| p.starts_with("seed-"))
        .collect()
}

const DISK: u64 = 64 << 20;

#[test]
fn protect_fail_over_reprotect_fail_back_and_reprotect_again() {
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let web = disks.join("web01.img");
    make_image(&web, DISK, 31);
    let db = disks.join("db01.img");
    make_image(&db, 16 << 20, 41);
    // The primary agent keeps a replica store too: reprotect replicates to it.
    let (primary_dir, recovery_dir) = env.start_sites_with(
        &[
            ("web01", vec![("disk0", &web)]),
            ("db01", vec![("disk0", &db)]),
        ],
        "[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.pair(&["--retention-hours", "2", "--delete-replica"]);
    env.wait_machine("web01");
    env.wait_machine("db01");
    env.enable("web01");
    env.enable("db01");

    // Planned failover: the server's last writes come over.
    scribble(&web, 5 << 20, 2 << 20, 32);
    let at_failover = env.path("at-failover.img");
    std::fs::copy(&web, &at_failover).unwrap();
    let out = env.json(&["failover", "planned", "web01", "--source-stopped"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    assert_eq!(
        state(&out),
        ("PlannedFailoverCompleted".into(), "Recovery".into())
    );
    let recovery_disk = failover_disk(&out, "raw");
    assert!(qemu_img_identical(&at_failover, &recovery_disk, "raw"));
    let out = env.json(&["failover", "commit", "web01"]);
    assert_eq!(state(&out), ("FailoverCommitted".into(), "Recovery".into()));
    assert_eq!(
        ops(&out["result"]),
        ["ReverseReplicate", "DisableProtection"]
    );

    // The server runs at the recovery site and writes there (1 % of the
    // disk); its old disks at the primary site stay as they were.
    scribble(&recovery_disk, 20 << 20, 320 << 10, 33);
    scribble(&recovery_disk, 50 << 20, 320 << 10, 34);

    // Reprotect: replication back to the primary site, only what differs.
    let primary_cycles = agent_counter(&primary_dir, "web01", "cycles");
    let out = env.json(&["item", "reprotect", "web01"]);
    assert_eq!(out["status"], "Succeeded", "{out}\n{}", env.logs());
    assert_eq!(state(&out), ("Protected".into(), "Recovery".into()));
    assert_eq!(
        ops(&out["result"]),
        ["PlannedFailover", "DisableProtection"]
    );
    assert_eq!(
        steps(&env, &out),
        [
            "Prerequisites check for reprotect",
            "Hash the disks at the other site into its replica store",
            "Replicate what differs to the other site",
            "Remove the seed of the replica store",
            "Complete reprotect",
        ]
    );
    let (reverse_point, sent) = newest_point_bytes(&env, "web01");
    eprintln!("reprotect: {sent} bytes sent of a {DISK}-byte disk");
    // 640 KiB changed, in two 1 MiB blocks.
    assert!(
        sent <= (2 << 20) + 4096,
        "reprotect sent {sent} bytes of a {DISK}-byte disk of which 640 KiB changed"
    );
    assert!(sent >= 640 << 10, "the changed blocks were sent: {sent}");
    assert!(
        seeds_left(&primary_dir.join("store"), "web01").is_empty(),
        "the seed point is removed"
    );
    // The old primary does not replicate the machine any more.
    assert_eq!(
        agent_counter(&primary_dir, "web01", "cycles"),
        primary_cycles
    );
    // An unplanned failover back is refused: failback is planned.
    let err = env.fails(&["failover", "unplanned", "web01"]);
    assert!(err.contains("planned failover"), "{err}");

    // More writes at the recovery site, then failback: the final point is
    // written onto the primary disks in place, only where they differ.
    scribble(&recovery_disk, 40 << 20, 256 << 10, 35);
    let at_failback = env.path("at-failback.img");
    std::fs::copy(&recovery_disk, &at_failback).unwrap();
    let out = env.json(&["failover", "planned", "web01", "--source-stopped"]);
    assert_eq!(out["status"], "Succeeded", "{out}\n{}", env.logs());
    assert_eq!(
        state(&out),
        ("PlannedFailoverCompleted".into(), "Primary".into())
    );
    let final_point =
        out["result"]["properties"]["providerSpecificDetails"]["failoverRecoveryPointId"]
            .as_str()
            .unwrap()
            .to_string();
    assert_ne!(final_point, reverse_point, "a new final point");
    assert!(
        qemu_img_identical(&at_failback, &web, "raw"),
        "the primary disk after failback is not the recovery site's last state"
    );
    let disks_out = &out["result"]["properties"]["providerSpecificDetails"]["failoverDisks"];
    let written = disks_out[0]["bytesWritten"].as_u64().unwrap();
    eprintln!("failback: {written} bytes written in place");
    assert_eq!(
        disks_out[0]["path"].as_str().unwrap(),
        web.display().to_string(),
        "written back onto the server's own disk"
    );
    // Changed since the old disks: the 2 × 320 KiB and 256 KiB, in whole blocks.
    assert!(
        (896 << 10..=3 << 20).contains(&written),
        "failback wrote {written} bytes"
    );
    let out = env.json(&["failover", "commit", "web01"]);
    assert_eq!(state(&out), ("FailoverCommitted".into(), "Primary".into()));

    // Reprotect again: the original direction, only what differs.
    let before = now_ms();
    let out = env.json(&["item", "reprotect", "web01"]);
    assert_eq!(out["status"], "Succeeded", "{out}\n{}", env.logs());
    assert_eq!(state(&out), ("Protected".into(), "Primary".into()));
    assert_eq!(
        ops(&out["result"]),
        [
            "PlannedFailover",
            "UnplannedFailover",
            "DisableProtection",
            "TestFailover"
        ]
    );
    let (_, sent) = newest_point_bytes(&env, "web01");
    eprintln!("second reprotect: {sent} bytes sent");
    assert!(
        sent < 64 << 10,
        "the second reprotect sent {sent} bytes, though both sides are the same"
    );
    // The reprotect's point came from the primary site, after it began.
    let point = env.wait_point_after("web01", before, Duration::from_secs(10));
    assert_eq!(point, env.points("web01")[0]["name"].as_str().unwrap());
    // Points of both directions stay listed (retention thins each
    // direction's own): the reverse direction's final point among them.
    let history: Vec<String> = env
        .points("web01")
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        history.contains(&final_point) && history.len() >= 2,
        "{history:?}"
    );

    // Disable protection in the reverse direction: db01 runs at the
    // recovery site and replicates back; disabling it stops that, deletes
    // the replica kept at the primary site (its points in the primary's
    // store) and leaves the running copy alone; the machine can then be
    // protected again from the primary site.
    let out = env.json(&["failover", "planned", "db01", "--source-stopped"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let db_running = failover_disk(&out, "raw");
    env.json(&["failover", "commit", "db01"]);
    let out = env.json(&["item", "reprotect", "db01"]);
    assert_eq!(state(&out), ("Protected".into(), "Recovery".into()));
    let out = env.json(&["item", "disable", "db01"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let err = env.fails(&["item", "show", "db01"]);
    assert!(err.contains("'db01' was not found"), "{err}");
    assert!(
        db_running.exists(),
        "the copy running at the recovery site stays"
    );
    let cycles = agent_counter(&recovery_dir, "db01", "cycles");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        agent_counter(&recovery_dir, "db01", "cycles"),
        cycles,
        "the recovery agent stopped replicating db01 back"
    );
    let store = open_store(&primary_dir.join("store"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let left = rt.block_on(store.list_points(Some("db01"))).unwrap();
    assert!(left.is_empty(), "points left at the primary site: {left:?}");
    drop(store);
    let out = env.enable("db01");
    assert_eq!(state(&out), ("Protected".into(), "Primary".into()));
}

/// The cycle after an unplanned failover whose old primary comes back: it
/// does not replicate the failed-over server, reprotect sends only what
/// differs (the recovery site's writes, and the old primary's writes the
/// failover lost), and failback restores the recovery site's writes onto
/// the server's own disk.
#[test]
fn after_an_unplanned_failover_the_old_primary_comes_back_and_the_cycle_holds() {
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let app = disks.join("app02.img");
    make_image(&app, DISK, 51);
    let (primary_dir, _) = env.start_sites_with(
        &[("app02", vec![("disk0", &app)])],
        "[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.pair(&["--retention-hours", "2"]);
    env.wait_machine("app02");
    env.enable("app02");

    // The primary site goes down with writes no point holds.
    scribble(&app, 9 << 20, 128 << 10, 52);
    env.kill("primary-agent");
    let out = env.json(&["failover", "unplanned", "app02", "--point", "latest"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    assert_eq!(
        state(&out),
        ("UnplannedFailoverCompleted".into(), "Recovery".into())
    );
    let recovery_disk = failover_disk(&out, "raw");
    env.json(&["failover", "commit", "app02"]);
    scribble(&recovery_disk, 33 << 20, 192 << 10, 53);

    // The old primary comes back with its old config: it is not assigned
    // the item, so it takes no point of it.
    let points_before = env.points("app02").len();
    let cycles = agent_counter(&primary_dir, "app02", "cycles");
    env.restart("primary-agent");
    wait_until(
        Duration::from_secs(30),
        "the primary agent to report",
        || {
            siterec_agent::AgentStatus::read(&primary_dir)
                .is_ok_and(|s| s.last_heartbeat_ms.is_some_and(|t| t > now_ms() - 3_000))
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent_counter(&primary_dir, "app02", "cycles"), cycles);
    assert_eq!(env.points("app02").len(), points_before);

    let out = env.json(&["item", "reprotect", "app02"]);
    assert_eq!(out["status"], "Succeeded", "{out}\n{}", env.logs());
    assert_eq!(state(&out), ("Protected".into(), "Recovery".into()));
    let (_, sent) = newest_point_bytes(&env, "app02");
    // Two blocks differ: the recovery site's write and the lost one.
    assert!(
        (192 << 10..=(2 << 20) + 4096).contains(&sent),
        "reprotect sent {sent} bytes"
    );
    let at_failback = env.path("app02-at-failback.img");
    std::fs::copy(&recovery_disk, &at_failback).unwrap();
    let out = env.json(&["failover", "planned", "app02", "--source-stopped"]);
    assert_eq!(out["status"], "Succeeded", "{out}\n{}", env.logs());
    assert_eq!(
        state(&out),
        ("PlannedFailoverCompleted".into(), "Primary".into())
    );
    assert!(
        qemu_img_identical(&at_failback, &app, "raw"),
        "failback restores the recovery site's writes (and drops the lost ones)"
    );
    env.json(&["failover", "commit", "app02"]);
    let out = env.json(&["item", "reprotect", "app02"]);
    assert_eq!(state(&out), ("Protected".into(), "Primary".into()));
}
