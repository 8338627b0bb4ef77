//! Encryption at rest: a policy that encrypts data stored replicates only to
//! an encrypted replica store; the store's object names and contents reveal
//! nothing of the disk; the recovery key is written once to the file the
//! operator keeps, and neither the recovery agent nor the vault holds it;
//! failover needs it (400 EncryptionKeyRequired without it, no job; 400
//! InvalidEncryptionKey with another store's key) and restores the disk.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn job_count(env: &Env) -> usize {
    env.json(&["jobs", "list"])
        .as_array()
        .map_or(0, |a| a.len())
}

#[test]
fn encrypted_store_protects_and_fails_over_with_the_operators_key() {
    let mut env = Env::start();
    let disk = env.path("sec01.img");
    make_image(&disk, 16 << 20, 21);
    let key_file = env.path("operator-recovery.key");
    let primary_cfg = format!(
        "cloud = \"primary-cloud\"\n[[machines]]\nname = \"sec01\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
        disk.display()
    );
    env.start_agent("primary", &primary_cfg);
    let recovery = env.start_agent(
        "recovery",
        &format!(
            "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\nencryption = true\nrecovery_key_export = \"{}\"\n",
            key_file.display()
        ),
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    wait_until(Duration::from_secs(30), "the recovery key file", || {
        key_file.exists()
    });
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600,
        "the recovery key file is private"
    );
    let key_text = std::fs::read(&key_file).unwrap();
    let key_lines: Vec<String> = String::from_utf8(key_text.clone())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(key_lines[0], "siterec-recovery-key/1");
    let key_id = key_lines[1].clone();
    let private_b64 = key_lines[2].clone();
    let private = base64::engine::general_purpose::STANDARD
        .decode(&private_b64)
        .unwrap();
    let file_b64 = base64::engine::general_purpose::STANDARD.encode(&key_text);
    assert!(
        std::fs::read_to_string(recovery.join("store/store.json"))
            .unwrap()
            .contains(&key_id)
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
        .chunks(siterec_agent::source::CHUNK_SIZE as usize)
        .filter(|b| b.iter().any(|x| *x != 0))
        .map(|b| blake3::hash(b).to_hex().to_string())
        .collect();
    let store_files = files_under(&recovery.join("store"));
    // The store holds the point (its manifest) and its data (chunk files,
    // or packs of them: how many files that makes depends on packing, not
    // on the number of blocks).
    assert!(
        store_files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "manifest"))
            && store_files.iter().any(|f| {
                f.extension().is_some_and(|e| e == "pack")
                    || f.components().any(|c| c.as_os_str() == "chunks")
            }),
        "no point or no data in the store: {store_files:?}"
    );
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

    // Without the key: 400 EncryptionKeyRequired, and no job.
    let jobs_before = job_count(&env);
    let err = env.fails(&["failover", "unplanned", "sec01"]);
    assert!(
        err.contains("400") && err.contains("EncryptionKeyRequired") && err.contains(&key_id),
        "{err}"
    );
    assert!(err.contains("--encryption-key"), "{err}");
    // Another store's recovery key: 400 InvalidEncryptionKey naming the
    // expected key id, and no job.
    let wrong = env.path("operator-wrong.key");
    let other = siterec_store::RecoveryKey::generate().unwrap();
    other.write_file(&wrong).unwrap();
    let err = env.fails(&[
        "failover",
        "unplanned",
        "sec01",
        "--encryption-key",
        wrong.to_str().unwrap(),
    ]);
    assert!(
        err.contains("400") && err.contains("InvalidEncryptionKey") && err.contains(&key_id),
        "{err}"
    );
    // Not a key file at all: refused before the vault is asked.
    let err = env.fails(&[
        "failover",
        "unplanned",
        "sec01",
        "--encryption-key",
        disk.to_str().unwrap(),
    ]);
    assert!(err.contains("not a recovery key file"), "{err}");
    assert_eq!(
        job_count(&env),
        jobs_before,
        "a refused failover made a job"
    );
    let item = env.json(&["item", "show", "sec01"]);
    assert_eq!(item["properties"]["protectionState"], "Protected", "{item}");

    // With the operator's key: the disk comes back byte-identical.
    let out = env.json(&[
        "failover",
        "unplanned",
        "sec01",
        "--encryption-key",
        key_file.to_str().unwrap(),
    ]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let raw = failover_disk(&out, "raw");
    assert_eq!(
        blake3::hash(&std::fs::read(&raw).unwrap()),
        blake3::hash(&data),
        "restored disk differs"
    );
    assert!(qemu_img_identical(&disk, &raw, "raw"));

    // Neither the recovery agent's data directory nor the vault's (its
    // database included) nor any log holds the key, in any encoding.
    let mut checked = 0;
    let logs: Vec<PathBuf> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    for f in files_under(&recovery)
        .into_iter()
        .chain(files_under(&env.vault_dir))
        .chain(logs)
    {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [&private[..], private_b64.as_bytes(), file_b64.as_bytes()] {
            assert!(
                !contains(&bytes, needle),
                "{} holds the recovery key",
                f.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 10);
    assert!(recovery.join("store.credential").exists());
    assert!(recovery.join("identity/transport.key").exists());
    // The database: SQLite's file was among the vault's files; a database
    // on PostgreSQL is read whole with pg_dump.
    match &env.postgres {
        None => {
            let db = std::fs::read(env.vault_dir.join("vault.db")).unwrap();
            assert!(!db.is_empty());
        }
        Some(pg) => {
            let dump = std::process::Command::new("pg_dump")
                .args(["--data-only", &pg.url()])
                .output()
                .expect("pg_dump (install postgresql-client)");
            assert!(
                dump.status.success() && dump.stdout.len() > 1000,
                "pg_dump: {}",
                String::from_utf8_lossy(&dump.stderr)
            );
            for needle in [&private[..], private_b64.as_bytes(), file_b64.as_bytes()] {
                assert!(
                    !contains(&dump.stdout, needle),
                    "the vault's database holds the recovery key"
                );
            }
        }
    }

    // The agent restarts without the operator's file (it was moved off
    // the host): it needs only its credential.
    env.kill("recovery-agent");
    std::fs::rename(&key_file, env.path("operator-recovery.key.offsite")).unwrap();
    env.restart("recovery-agent");
    wait_until(
        Duration::from_secs(30),
        "the recovery agent's heartbeat",
        || {
            std::fs::read_to_string(env.path("recovery-agent.log"))
                .is_ok_and(|l| l.matches("agent running").count() >= 2)
        },
    );
    assert!(!key_file.exists(), "the recovery key is written only once");
}

#[test]
fn the_retired_encryption_key_option_says_what_to_use() {
    let env = Env::start();
    let cfg = env.path("agent.toml");
    std::fs::write(
        &cfg,
        "cloud = \"c\"\n[target]\nlisten = \"127.0.0.1:0\"\nencryption_key = \"/root/store.key\"\n",
    )
    .unwrap();
    let data = env.path("agent-data");
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "--data",
            data.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("encryption_key is no longer supported")
            && err.contains("recovery_key_export"),
        "{err}"
    );
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
            && err.contains("encryption = true")
            && err.contains("400"),
        "{err}"
    );
    assert_eq!(env.json(&["item", "list"]).as_array().unwrap().len(), 0);
}
