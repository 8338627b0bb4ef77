//! Offline initial replication (the seeds, site to site): the source agent
//! exports the initial copy to a directory instead of sending it; the
//! operator carries it to the recovery host's import path; the recovery
//! agent imports it; then only changes travel over the network.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const ITEM: &str = "offline01";

fn copy_dir(from: &Path, to: &Path) {
    let out = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn initial_copy_travels_on_media_then_deltas_over_the_network() {
    let mut env = Env::start();
    let disk = env.path("offline01.img");
    make_image(&disk, 64 << 20, 21);
    let initial = blake3::hash(&std::fs::read(&disk).unwrap());
    let (primary, recovery) = env.start_sites(&[(ITEM, vec![("disk0", &disk)])]);
    let (export, import) = (env.path("export"), env.path("import"));
    std::fs::create_dir_all(&import).unwrap();
    let (e, i) = (export.display().to_string(), import.display().to_string());
    env.json(&[
        "policy",
        "create",
        "s2s",
        "--instance-type",
        "HyperVReplica2012R2",
        "--copy-frequency",
        "30",
        "--retention-hours",
        "1",
        "--offline-export-path",
        &e,
        "--offline-import-path",
        &i,
    ]);
    let policy = env.json(&["policy", "show", "s2s"]);
    let details = &policy["properties"]["providerSpecificDetails"];
    assert_eq!(details["initialReplicationMethod"], "Offline", "{policy}");
    assert_eq!(details["offlineReplicationImportPath"], i.as_str());
    env.json(&[
        "pairing",
        "create",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--target-fabric",
        "recovery",
        "--target-cloud",
        "recovery-cloud",
        "--policy",
        "s2s",
    ]);
    env.wait_machine(ITEM);
    env.json(&[
        "item",
        "enable",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--machine",
        ITEM,
        "--no-wait",
    ]);

    // The initial copy lands in the export directory, not on the network.
    let exported = export.join(ITEM);
    wait_until(Duration::from_secs(60), "the export", || {
        std::fs::read_dir(&exported)
            .map(|rd| rd.flatten().any(|e| e.path().join("manifest").exists()))
            .unwrap_or(false)
    });
    wait_until(Duration::from_secs(20), "the source's warning", || {
        agent_item(&primary, ITEM)["healthWarnings"]
            .to_string()
            .contains("offline initial replication")
    });
    assert_eq!(agent_counter(&primary, ITEM, "bytesSent"), 0);
    std::thread::sleep(Duration::from_secs(3));
    assert!(env.points(ITEM).is_empty(), "no point before the import");
    let item = env.json(&["item", "show", ITEM]);
    assert_eq!(
        item["properties"]["protectionState"], "InitialReplicationInProgress",
        "{item}"
    );

    // The operator carries the export to the recovery host.
    copy_dir(&exported, &import.join(ITEM));
    let first = env.wait_point_after(ITEM, 0, Duration::from_secs(90));
    wait_until(Duration::from_secs(60), "protection", || {
        env.json(&["item", "show", ITEM])["properties"]["protectionState"] == "Protected"
    });
    assert_eq!(
        agent_counter(&primary, ITEM, "bytesSent"),
        0,
        "the initial copy went over the network"
    );

    // From now on, changes travel over the network, and only them.
    scribble(&disk, 10 << 20, 1 << 20, 5);
    let changed = now_ms();
    let latest = env.wait_point_after(ITEM, changed, Duration::from_secs(90));
    let sent = agent_counter(&primary, ITEM, "bytesSent");
    assert!(
        (1 << 20..=2 << 20).contains(&sent),
        "{sent} bytes sent for a 1 MiB change"
    );

    env.kill("primary-agent");
    env.kill("recovery-agent");
    let store = open_store(&recovery.join("store"));
    assert_eq!(restored_hash(&store, ITEM, &first), initial);
    assert_eq!(
        restored_hash(&store, ITEM, &latest),
        blake3::hash(&std::fs::read(&disk).unwrap())
    );
}
