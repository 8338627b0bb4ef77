//! An item's life after protection, through real processes (a vault and
//! two agents): a planned failover of a physical server brings it up at the
//! recovery site byte-identical to its last state (changes the regular
//! cycles never shipped included); an item that failed over is not enabled
//! again but reprotected; disabling protection from Protected and from a
//! committed failover removes the item, its assignment at the source and —
//! as its policy says — its recovery points and disks, after which the
//! machine can be protected again. After each step the item's state,
//! `allowedOperations` and `activeLocation`, and the protectable item's
//! status, are checked.

mod common;

use std::time::Duration;

use common::*;

fn protection_status(env: &Env, machine: &str) -> String {
    let list = env.json(&[
        "machine",
        "list",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
    ]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == machine)
        .unwrap_or_else(|| panic!("machine {machine} in {list}"))["properties"]["protectionStatus"]
        .as_str()
        .unwrap()
        .to_string()
}

fn step_names(env: &Env, job: &str) -> Vec<(String, String)> {
    let shown = env.json(&["jobs", "show", job]);
    shown["properties"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn planned_failover_commit_and_disable_protection() {
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let web = disks.join("web01.img");
    let db = disks.join("db01.img");
    make_image(&web, 96 << 20, 21);
    make_image(&db, 64 << 20, 22);
    let (primary_dir, recovery_dir) = env.start_sites(&[
        ("web01", vec![("disk0", &web)]),
        ("db01", vec![("disk0", &db)]),
    ]);
    env.pair(&["--retention-hours", "2", "--delete-replica"]);
    env.wait_machine("web01");
    env.wait_machine("db01");
    assert_eq!(protection_status(&env, "web01"), "Unprotected");
    let initial_state = env.path("web01-initial.img");
    std::fs::copy(&web, &initial_state).unwrap();
    for m in ["web01", "db01"] {
        let out = env.enable(m);
        let props = &out["result"]["properties"];
        assert_eq!(props["protectionState"], "Protected");
        assert_eq!(props["activeLocation"], "Primary");
        assert_eq!(
            ops(&out["result"]),
            [
                "PlannedFailover",
                "UnplannedFailover",
                "DisableProtection",
                "TestFailover"
            ]
        );
    }
    let enabled_at = std::time::Instant::now();
    assert_eq!(protection_status(&env, "web01"), "Protected");

    // Forbidden transitions through the API answer 409 naming the state
    // and what to do first, and change nothing.
    let err = env.fails(&["failover", "commit", "db01"]);
    assert!(
        err.contains("409") && err.contains("fail the item over first"),
        "{err}"
    );
    let (status, body) = env.arm(
        "POST",
        "replicationFabrics/primary/replicationProtectionContainers/primary-cloud/replicationProtectedItems/db01/plannedFailover",
        "api-version=2025-08-01",
        Some(serde_json::json!({"properties": {"failoverDirection": "RecoveryToPrimary"}})),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("runs at its primary site"),
        "{body}"
    );

    // A physical server must be stopped by its operator, who says so.
    let err = env.fails(&["failover", "planned", "web01"]);
    assert!(
        err.contains("SourceNotStopped") && err.contains("--source-stopped"),
        "{err}"
    );
    let item = env.json(&["item", "show", "web01"]);
    assert_eq!(item["properties"]["protectionState"], "Protected");
    let jobs = env.json(&["jobs", "list"]);
    assert!(
        !jobs
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["properties"]["scenarioName"] == "PlannedFailover"),
        "a refused planned failover creates no job"
    );

    // Retention keeps points 20 s apart in the first hour (30 s copy
    // frequency): let the initial point age past that, so that it stays
    // beside the final one for the change of recovery point below.
    let since_enable = std::time::Instant::now() - enabled_at;
    std::thread::sleep(Duration::from_secs(22).saturating_sub(since_enable));

    // The server's last writes, then it "stops": the planned failover must
    // bring them over although no regular cycle (every 30 s) took them.
    scribble(&web, 7 << 20, 3 << 20, 23);
    scribble(&web, 80 << 20, 1 << 20, 24);
    let last_state = env.path("web01-last.img");
    std::fs::copy(&web, &last_state).unwrap();
    let before = env
        .points("web01")
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    let out = env.json(&["failover", "planned", "web01", "--source-stopped"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let props = &out["result"]["properties"];
    assert_eq!(props["protectionState"], "PlannedFailoverCompleted");
    assert_eq!(props["activeLocation"], "Recovery");
    assert_eq!(ops(&out["result"]), ["Commit", "ChangePit"]);
    let final_point = props["providerSpecificDetails"]["failoverRecoveryPointId"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !before.contains(&final_point),
        "the failover used a new final point, not {final_point} of {before:?}"
    );
    for format in ["raw", "qcow2"] {
        assert!(
            qemu_img_identical(&last_state, &failover_disk(&out, format), format),
            "the {format} disk after planned failover is not the server's last state"
        );
    }
    let steps = step_names(&env, out["jobId"].as_str().unwrap());
    assert_eq!(
        steps.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        [
            "Prerequisites check for planned failover",
            "Shut down the source machine",
            "Replicate the last changes into a final recovery point",
            "Materialize disks at the recovery site",
            "Complete planned failover",
        ]
    );
    assert!(steps.iter().all(|s| s.1 == "Succeeded"), "{steps:?}");
    // Replication from the old primary has stopped: no point after the final one.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(env.points("web01")[0]["name"], final_point.as_str());

    // An item that failed over is reprotected, not enabled again.
    let err = env.fails(&[
        "item",
        "enable",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--machine",
        "web01",
    ]);
    assert!(
        err.contains("409") && err.contains("ReverseReplicate"),
        "{err}"
    );
    let err = env.fails(&["item", "disable", "web01"]);
    assert!(err.contains("commit the failover first"), "{err}");

    // Change the recovery point before commit: the server is rebuilt from
    // the initial replication's point (the oldest listed), which the
    // failover's disks then equal; a point that does not exist changes
    // nothing.
    let err = env.fails(&[
        "failover",
        "change-point",
        "web01",
        "--point",
        "no-such-point",
    ]);
    assert!(err.contains("not found"), "{err}");
    let item = env.json(&["item", "show", "web01"]);
    assert_eq!(
        item["properties"]["protectionState"],
        "PlannedFailoverCompleted"
    );
    let oldest = env.points("web01").last().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.json(&["failover", "change-point", "web01", "--point", &oldest]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let props = &out["result"]["properties"];
    assert_eq!(props["protectionState"], "UnplannedFailoverCompleted");
    assert_eq!(props["activeLocation"], "Recovery");
    assert_eq!(
        props["providerSpecificDetails"]["failoverRecoveryPointId"],
        oldest.as_str()
    );
    assert_eq!(ops(&out["result"]), ["Commit", "ChangePit"]);
    for format in ["raw", "qcow2"] {
        assert!(
            qemu_img_identical(&initial_state, &failover_disk(&out, format), format),
            "the {format} disk after the change is not the state at point {oldest}: {:#?}\n{}",
            env.points("web01"),
            env.logs()
        );
    }
    assert!(!qemu_img_identical(&initial_state, &last_state, "raw"));
    assert_eq!(
        protection_status(&env, "web01"),
        "UnplannedFailoverCompleted"
    );

    let out = env.json(&["failover", "commit", "web01"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    assert_eq!(
        out["result"]["properties"]["protectionState"],
        "FailoverCommitted"
    );
    assert_eq!(
        ops(&out["result"]),
        ["ReverseReplicate", "DisableProtection"]
    );
    assert_eq!(protection_status(&env, "web01"), "FailoverCommitted");
    // Reprotect needs a replica store at the primary site: this primary
    // agent has none, and the refusal names the setting.
    let err = env.fails(&["item", "reprotect", "web01"]);
    assert!(
        err.contains("NoReplicaStore") && err.contains("[target]"),
        "{err}"
    );
    let item = env.json(&["item", "show", "web01"]);
    assert_eq!(item["properties"]["protectionState"], "FailoverCommitted");

    // Disable protection from a committed failover: with replicaDeletion
    // Required, the recovery agent deletes the points and the disks.
    let failover_dir = recovery_dir.join("failover").join("web01");
    assert!(failover_dir.exists());
    let out = env.json(&["item", "disable", "web01"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let steps = step_names(&env, out["jobId"].as_str().unwrap());
    assert!(
        steps
            .iter()
            .any(|s| s.0 == "Delete the replica's recovery points and disks" && s.1 == "Succeeded"),
        "{steps:?}"
    );
    let err = env.fails(&["item", "show", "web01"]);
    assert!(err.contains("'web01' was not found"), "{err}");
    assert!(!failover_dir.exists(), "the failover disks are deleted");
    assert_eq!(protection_status(&env, "web01"), "Unprotected");

    // Disable from Protected: the source stops replicating the item.
    let out = env.json(&["item", "disable", "db01"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let cycles = agent_counter(&primary_dir, "db01", "cycles");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent_counter(&primary_dir, "db01", "cycles"), cycles);
    let store = open_store(&recovery_dir.join("store"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    for item in ["web01", "db01"] {
        let left = rt.block_on(store.list_points(Some(item))).unwrap();
        assert!(
            left.is_empty(),
            "{item}: points left in the store: {left:?}"
        );
    }
    drop(store);

    // Both machines can be protected again, from scratch.
    for m in ["web01", "db01"] {
        let out = env.enable(m);
        assert_eq!(out["result"]["properties"]["protectionState"], "Protected");
    }
    assert_eq!(protection_status(&env, "db01"), "Protected");
}
