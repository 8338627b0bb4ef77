//! Wrong data is never restored silently: flip bytes in stored chunks, then
//! `store verify` names the damaged points and a failover to one of them
//! fails cleanly instead of writing a wrong disk.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The stored chunks of the store at `store`: each one's name (64 hex
/// digits), and where its bytes lie (a pack or a file of its own, an
/// offset, a length). Opening the directory only reads it.
fn stored_chunks(store: &Path) -> Vec<(String, PathBuf, u64, usize)> {
    use siterec_store::Backend;
    let dir = siterec_store::LocalDir::new(store).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut keys = rt.block_on(dir.list("chunks/")).unwrap();
    keys.sort();
    keys.into_iter()
        .filter(|key| key.rsplit('/').next().is_some_and(|n| n.len() == 64))
        .map(|key| {
            let (path, at, len) = dir.locate(&key).unwrap().unwrap();
            let name = key.rsplit('/').next().unwrap().to_string();
            (name, path, at, len)
        })
        .collect()
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
    let chunks = stored_chunks(&recovery.join("store"));
    assert!(
        chunks.len() >= 3,
        "expected the store to hold chunks: {chunks:?}"
    );
    let (victim_id, path, at, len) = chunks[chunks.len() / 2].clone();
    let is_stored = |id: &str| {
        stored_chunks(&recovery.join("store"))
            .iter()
            .any(|(name, ..)| name == id)
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    let middle = at + len as u64 / 2;
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, middle).unwrap();
    byte[0] ^= 0x5a;
    std::os::unix::fs::FileExt::write_all_at(&file, &byte, middle).unwrap();

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
    assert!(!is_stored(&victim_id), "verify removes the damaged chunk");
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
    assert!(is_stored(&victim_id), "the chunk was sent again");
    let failed = env.json(&["failover", "unplanned", "app01", "--point", &fresh]);
    assert_eq!(failed["status"], "Succeeded");
    let raw = failover_disk(&failed, "raw");
    assert!(qemu_img_identical(&disk, &raw, "raw"));
}
