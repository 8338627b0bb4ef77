//! The whole flow through real processes: a vault and two agents (the
//! `siterec` binary), protection of two servers, deltas, failover to the
//! latest point for one and to an older point for the other, commit; the
//! failed-over raw and qcow2 disks are judged by `qemu-img compare`.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn protect_replicate_fail_over_and_commit() {
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let web = disks.join("web01.img");
    let db = disks.join("db01.img");
    make_image(&web, 96 << 20, 1);
    make_image(&db, (80 << 20) + 12345, 2); // not a multiple of the chunk or sector size
    env.start_sites(&[
        ("web01", vec![("disk0", &web)]),
        ("db01", vec![("disk0", &db)]),
    ]);
    env.pair(&["--retention-hours", "2"]);
    env.wait_machine("web01");
    env.wait_machine("db01");

    // The state at the first (initial replication) point.
    let web_a = env.path("web01-at-a.img");
    let db_a = env.path("db01-at-a.img");
    std::fs::copy(&web, &web_a).unwrap();
    std::fs::copy(&db, &db_a).unwrap();
    for m in ["web01", "db01"] {
        let out = env.json(&[
            "item",
            "enable",
            "--fabric",
            "primary",
            "--cloud",
            "primary-cloud",
            "--machine",
            m,
        ]);
        assert_eq!(out["status"], "Succeeded", "{out}");
        assert_eq!(out["result"]["properties"]["protectionState"], "Protected");
    }
    // Points are listed newest first: the last is the initial replication's.
    let web_first = env.points("web01");
    let web_point_a = web_first.last().expect("a point after initial replication")["name"]
        .as_str()
        .unwrap()
        .to_string();

    // A bad recovery point id is refused and changes nothing.
    let err = env.fails(&["failover", "unplanned", "web01", "--point", "no-such-point"]);
    assert!(
        err.contains("recovery point") && err.contains("not found") && err.contains("404"),
        "{err}"
    );
    let item = env.json(&["item", "show", "web01"]);
    assert_eq!(item["properties"]["protectionState"], "Protected");
    // Commit before failover is refused with a hint.
    let err = env.fails(&["failover", "commit", "web01"]);
    assert!(err.contains("fail the item over first"), "{err}");

    // Change both disks; wait for points that hold the change.
    scribble(&web, 5 << 20, 3 << 20, 10);
    scribble(&db, (40 << 20) + 777, 1 << 20, 11);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&vec![0u8; 2 << 20]).unwrap(); // blocks that become zero
        f.sync_all().unwrap();
    }
    let changed = now_ms();
    let web_b = env.path("web01-at-b.img");
    let db_b = env.path("db01-at-b.img");
    std::fs::copy(&web, &web_b).unwrap();
    std::fs::copy(&db, &db_b).unwrap();
    let web_point_b = env.wait_point_after("web01", changed, Duration::from_secs(120));
    env.wait_point_after("db01", changed, Duration::from_secs(120));
    assert_ne!(web_point_a, web_point_b);
    assert!(
        env.points("web01")
            .iter()
            .any(|p| p["name"] == web_point_a.as_str()),
        "the older point is kept"
    );

    // web01: fail over to the older point A; db01: to the latest.
    let out = env.json(&["failover", "unplanned", "web01", "--point", &web_point_a]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let props = &out["result"]["properties"];
    assert_eq!(props["protectionState"], "UnplannedFailoverCompleted");
    assert_eq!(
        props["providerSpecificDetails"]["failoverRecoveryPointId"],
        web_point_a.as_str()
    );
    check_disks(&out["result"], &web_a, "web01 at the older point");

    let out = env.json(&["failover", "unplanned", "db01", "--point", "latest"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    check_disks(&out["result"], &db_b, "db01 at the latest point");
    // And the older state really differs, so the comparisons mean something.
    assert!(!qemu_img_identical(&web_b, &web_a, "raw"));
    assert!(!qemu_img_identical(&db_a, &db_b, "raw"));

    // A second failover of a failed-over item is refused.
    let err = env.fails(&["failover", "unplanned", "db01"]);
    assert!(err.contains("already failed over"), "{err}");

    for m in ["web01", "db01"] {
        let out = env.json(&["failover", "commit", m]);
        assert_eq!(
            out["result"]["properties"]["protectionState"], "FailoverCommitted",
            "{out}"
        );
        assert_eq!(out["result"]["properties"]["activeLocation"], "Recovery");
    }

    // Every operation is a job with persisted steps.
    let jobs = env.json(&["jobs", "list"]);
    let jobs = jobs.as_array().unwrap();
    for (scenario, n) in [
        ("EnableDr", 2),
        ("UnplannedFailover", 2),
        ("CommitFailover", 2),
        ("ConfigureProtection", 1),
        ("AddProtectionProfile", 1),
    ] {
        let found: Vec<_> = jobs
            .iter()
            .filter(|j| j["properties"]["scenarioName"] == scenario)
            .collect();
        assert_eq!(found.len(), n, "{scenario} jobs: {jobs:?}");
        for j in found {
            assert_eq!(j["properties"]["state"], "Succeeded", "{j}");
            assert!(
                j["properties"]["startTime"].is_string() && j["properties"]["endTime"].is_string()
            );
        }
    }
    let enable = jobs
        .iter()
        .find(|j| j["properties"]["scenarioName"] == "EnableDr")
        .unwrap();
    let shown = env.json(&["jobs", "show", enable["name"].as_str().unwrap()]);
    let steps: Vec<&str> = shown["properties"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps.last(), Some(&"Finalize protection"), "{steps:?}");
    assert!(
        shown["properties"]["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "Succeeded")
    );
    // The human table works too.
    let out = env.cli(&["jobs", "list"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Unplanned failover")
    );
}

fn check_disks(item: &serde_json::Value, reference: &std::path::Path, what: &str) {
    let disks = item["properties"]["providerSpecificDetails"]["failoverDisks"]
        .as_array()
        .expect("failover disks");
    let mut formats = Vec::new();
    for d in disks {
        let format = d["format"].as_str().unwrap();
        let path = std::path::PathBuf::from(d["path"].as_str().unwrap());
        assert!(
            qemu_img_identical(reference, &path, format),
            "{what}: {format} image {} differs from the source",
            path.display()
        );
        formats.push(format.to_string());
    }
    formats.sort();
    assert_eq!(formats, ["qcow2", "raw"], "{what}");
    // qemu-img check accepts the qcow2 we wrote.
    let qcow2 = disks.iter().find(|d| d["format"] == "qcow2").unwrap()["path"]
        .as_str()
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", qcow2])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
