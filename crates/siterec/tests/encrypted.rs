//! Encryption at rest: a policy that encrypts data stored replicates only to
//! an encrypted replica store; the store's object names and contents reveal
//! nothing of the disk; failover restores the disk; without the key file
//! the recovery agent cannot open its store and says why.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn encrypted_store_protects_and_fails_over() {
    let mut env = Env::start();
    let disk = env.path("sec01.img");
    make_image(&disk, 16 << 20, 21);
    let key_file = env.path("store.key");
    let primary_cfg = format!(
        "cloud = \"primary-cloud\"\n[[machines]]\nname = \"sec01\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
        disk.display()
    );
    env.start_agent("primary", &primary_cfg);
    let recovery = env.start_agent(
        "recovery",
        &format!("cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\nencryption_key = \"{}\"\n", key_file.display()),
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    wait_until(Duration::from_secs(30), "the store key file", || {
        key_file.exists()
    });
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600,
        "the key file is private"
    );

    let policy = env.json(&[
        "policy",
        "create",
        "pol",
        "--copy-frequency",
        "30",
        "--retention-hours",
        "1",
        "--encrypt",
    ]);
    assert_eq!(
        policy["result"]["properties"]["providerSpecificDetails"]["encryption"], "Enable",
        "{policy}"
    );
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
        "pol",
    ]);
    env.wait_machine("sec01");
    env.enable("sec01");

    // Nothing in the store names or shows the disk's blocks.
    let data = std::fs::read(&disk).unwrap();
    let block_ids: std::collections::HashSet<String> = data
        .chunks(256 * 1024)
        .filter(|b| b.iter().any(|x| *x != 0))
        .map(|b| blake3::hash(b).to_hex().to_string())
        .collect();
    let store_files = files_under(&recovery.join("store"));
    assert!(store_files.len() > 10);
    for f in &store_files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !block_ids.contains(&name),
            "object {name} is named by a plaintext hash"
        );
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes
                .windows(26)
                .any(|w| w == b"lorem ipsum dolor sit amet"),
            "{} holds plaintext",
            f.display()
        );
    }

    let out = env.json(&["failover", "unplanned", "sec01"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let raw = failover_disk(&out, "raw");
    assert!(qemu_img_identical(&disk, &raw, "raw"));

    // Without its key file, the recovery agent cannot open the store.
    env.kill("recovery-agent");
    std::fs::rename(&key_file, env.path("store.key.saved")).unwrap();
    let cfg = env.path("recovery-agent.toml");
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "--data",
            recovery.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent must not start without its key"
    );
    assert!(err.contains("key file") && err.contains("missing"), "{err}");
    assert!(!key_file.exists(), "no new key may replace the lost one");
}

#[test]
fn an_encrypting_policy_needs_an_encrypted_store() {
    let mut env = Env::start();
    let disk = env.path("plain01.img");
    make_image(&disk, 4 << 20, 22);
    env.start_sites(&[("plain01", vec![("disk0", &disk)])]);
    env.json(&[
        "policy",
        "create",
        "pol",
        "--copy-frequency",
        "30",
        "--encrypt",
    ]);
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
        "pol",
    ]);
    env.wait_machine("plain01");
    let err = env.fails(&[
        "item",
        "enable",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--machine",
        "plain01",
    ]);
    assert!(
        err.contains("encrypts data stored")
            && err.contains("encryption_key")
            && err.contains("400"),
        "{err}"
    );
    assert_eq!(env.json(&["item", "list"]).as_array().unwrap().len(), 0);
}
