//! Wrong data is never restored silently: flip bytes in stored chunks, then
//! `store verify` names the damaged points and a failover to one of them
//! fails cleanly instead of writing a wrong disk.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(store.join("chunks")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().len() == 64 {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn damaged_chunks_are_reported_and_never_restored() {
    let mut env = Env::start();
    let disk = env.path("app01.img");
    make_image(&disk, 24 << 20, 9);
    let (_, recovery) = env.protect("app01", &disk, &["--retention-hours", "1"]);

    // A healthy store verifies clean.
    let clean = env.json(&["store", "verify", "--fabric", "recovery"]);
    assert_eq!(clean["status"], "Succeeded", "{clean}");
    let points = clean["points"].as_array().unwrap();
    assert!(
        !points.is_empty() && points.iter().all(|p| p["ok"] == true),
        "{clean}"
    );

    // Flip one byte in the middle of a stored chunk.
    let chunks = chunk_files(&recovery.join("store"));
    assert!(
        chunks.len() >= 3,
        "expected the store to hold chunks: {chunks:?}"
    );
    let victim = &chunks[chunks.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(victim, &bytes).unwrap();
    let victim_id = victim.file_name().unwrap().to_string_lossy().to_string();

    let out = env.cli(&[
        "--output", "json", "store", "verify", "--fabric", "recovery",
    ]);
    assert!(!out.status.success(), "verify must fail on damage");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let point = env.points("app01")[0]["name"].as_str().unwrap().to_string();
    let damaged: Vec<_> = report["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["ok"] == false)
        .collect();
    assert_eq!(damaged.len(), 1, "{report}");
    assert_eq!(damaged[0]["point"], point.as_str());
    assert!(
        damaged[0]["damagedChunks"].to_string().contains(&victim_id),
        "{report}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("replica store damage") && err.contains(&point),
        "{err}"
    );

    // Failing over to the damaged point fails and writes no disk.
    let err = env.fails(&["failover", "unplanned", "app01", "--point", &point]);
    assert!(
        err.contains("could not write the disks") && err.contains(&victim_id),
        "{err}"
    );
    let item = env.json(&["item", "show", "app01"]);
    assert_eq!(
        item["properties"]["protectionState"], "Protected",
        "the item returns to Protected"
    );
    let failover_dir = recovery.join("failover").join("app01");
    let finished: Vec<_> = std::fs::read_dir(&failover_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        finished.is_empty(),
        "no image may be left behind: {finished:?}"
    );

    // Verify removed the damaged chunk, so replication heals: the next
    // commit misses it, the source resynchronizes and sends it again.
    assert!(!victim.exists(), "verify removes the damaged chunk");
    let healed_after = now_ms();
    let fresh = env.wait_point_after("app01", healed_after, std::time::Duration::from_secs(150));
    let out = env.cli(&[
        "--output", "json", "store", "verify", "--fabric", "recovery",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fresh_entry = report["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["point"] == fresh.as_str())
        .cloned();
    assert_eq!(
        fresh_entry.as_ref().map(|p| p["ok"].clone()),
        Some(serde_json::json!(true)),
        "{report}"
    );
    assert!(victim.exists(), "the chunk was sent again");
    let failed = env.json(&["failover", "unplanned", "app01", "--point", &fresh]);
    assert_eq!(failed["status"], "Succeeded");
    let raw = failover_disk(&failed, "raw");
    assert!(qemu_img_identical(&disk, &raw, "raw"));
}
