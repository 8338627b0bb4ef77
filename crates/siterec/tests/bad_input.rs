//! Bad input gets a clear error that names the problem, a non-zero exit
//! and a 4xx answer, and changes nothing.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let mut env = Env::start();

    // Policy values out of range.
    for (args, needle) in [
        (
            vec!["--copy-frequency", "60"],
            "copy frequency 60 s is not allowed",
        ),
        (
            vec!["--retention-hours", "25"],
            "retention of 25 hours is out of range",
        ),
        (
            vec!["--recovery-points", "16"],
            "16 additional recovery points is out of range",
        ),
        (
            vec!["--app-consistent-hours", "13"],
            "13 hours is out of range",
        ),
    ] {
        let mut all = vec!["policy", "create", "p1"];
        all.extend(args);
        let err = env.fails(&all);
        assert!(err.contains(needle) && err.contains("400"), "{err}");
    }
    let err = env.fails(&["policy", "create", "bad!name"]);
    assert!(err.contains("not valid"), "{err}");
    assert_eq!(
        env.json(&["policy", "list"]).as_array().unwrap().len(),
        0,
        "no policy was created"
    );

    // Unknown things are named.
    let err = env.fails(&["cloud", "list", "--fabric", "nowhere"]);
    assert!(
        err.contains("fabric 'nowhere' was not found") && err.contains("404"),
        "{err}"
    );
    let err = env.fails(&["item", "show", "ghost"]);
    assert!(
        err.contains("protected item 'ghost' was not found"),
        "{err}"
    );
    let err = env.fails(&["failover", "unplanned", "ghost"]);
    assert!(err.contains("'ghost' was not found"), "{err}");
    let err = env.fails(&["jobs", "show", "no-such-job"]);
    assert!(err.contains("job 'no-such-job' was not found"), "{err}");
    let err = env.fails(&["policy", "show", "nope"]);
    assert!(
        err.contains("replication policy 'nope' was not found"),
        "{err}"
    );

    // A wrong token is refused.
    let token = env.path("wrong.token");
    std::fs::write(&token, "not-the-token").unwrap();
    let url = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(env.vault_dir.join("vault.json")).unwrap(),
    )
    .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let vault_id = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(env.vault_dir.join("vault.json")).unwrap(),
    )
    .unwrap()["vaultId"]
        .as_str()
        .unwrap()
        .to_string();
    let out = std::process::Command::new(BIN)
        .args([
            "--url",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "--vault-id",
            &vault_id,
            "fabric",
            "list",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Expired and revoked registration keys are refused by the vault.
    let expired = env.path("expired.key");
    env.json(&[
        "vault",
        "key",
        "create",
        "--fabric",
        "primary",
        "--out",
        expired.to_str().unwrap(),
        "--valid-seconds",
        "1",
    ]);
    let revoked = env.path("revoked.key");
    let created = env.json(&[
        "vault",
        "key",
        "create",
        "--fabric",
        "primary",
        "--out",
        revoked.to_str().unwrap(),
    ]);
    env.json(&["vault", "key", "revoke", created["keyId"].as_str().unwrap()]);
    let err = env.fails(&[
        "vault",
        "key",
        "create",
        "--fabric",
        "primary",
        "--out",
        env.path("x.key").to_str().unwrap(),
        "--valid-seconds",
        "999999",
    ]);
    assert!(err.contains("validSeconds must be"), "{err}");
    std::thread::sleep(Duration::from_millis(2100));
    let cfg = env.path("a.toml");
    std::fs::write(&cfg, "cloud = \"c\"\n").unwrap();
    for (key, needle) in [(&expired, "expired"), (&revoked, "revoked")] {
        let out = std::process::Command::new(BIN)
            .args([
                "agent",
                "--key",
                key.to_str().unwrap(),
                "--data",
                env.path(&format!("agent-{needle}")).to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{needle}: {err}"
        );
    }
    // A garbled key file is named as such.
    let garbled = env.path("garbled.key");
    std::fs::write(&garbled, "{not json").unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "--key",
            garbled.to_str().unwrap(),
            "--data",
            env.path("agent-g").to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a siterec registration key file"));

    // Pairing with a cloud whose agent keeps no replica store is refused.
    env.start_agent("lonely", "cloud = \"empty-cloud\"\n");
    env.wait_cloud("lonely", "empty-cloud");
    env.json(&["policy", "create", "p0", "--copy-frequency", "300"]);
    let err = env.fails(&[
        "pairing",
        "create",
        "--fabric",
        "lonely",
        "--cloud",
        "empty-cloud",
        "--target-fabric",
        "lonely",
        "--target-cloud",
        "empty-cloud",
        "--policy",
        "p0",
    ]);
    assert!(
        err.contains("no connected agent with a replica store"),
        "{err}"
    );
    env.json(&["policy", "delete", "p0"]);

    // A replica store on an object store that cannot be reached stops the
    // agent at start, naming the store, instead of failing mid-replication.
    let key = env.path("s3.key");
    env.json(&[
        "vault",
        "key",
        "create",
        "--fabric",
        "recovery",
        "--out",
        key.to_str().unwrap(),
    ]);
    let s3_cfg = env.path("s3.toml");
    std::fs::write(
        &s3_cfg,
        format!(
            "cloud = \"c\"\n[target]\nlisten = \"127.0.0.1:0\"\nbackend = {{ kind = \"s3\", endpoint = \"http://127.0.0.1:{}\", bucket = \"replicas\", access_key = \"a\", secret_key = \"s\" }}\n",
            free_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "--key",
            key.to_str().unwrap(),
            "--data",
            env.path("agent-s3").to_str().unwrap(),
            "--config",
            s3_cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("opening the replica store"),
        "{err}"
    );

    // A machine whose disk path does not exist is reported with the reason
    // and cannot be protected.
    let good = env.path("good.img");
    make_image(&good, 4 << 20, 5);
    let missing = env.path("missing.img");
    env.start_sites(&[
        ("ok01", vec![("disk0", &good)]),
        ("broken01", vec![("disk0", &missing)]),
    ]);
    env.pair(&["--retention-hours", "1"]);
    env.wait_machine("broken01");
    let machines = env.json(&[
        "machine",
        "list",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
    ]);
    let broken = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "broken01")
        .unwrap();
    let errors = broken["properties"]["protectionReadinessErrors"].to_string();
    assert!(errors.contains("missing.img"), "{errors}");
    let err = env.fails(&[
        "item",
        "enable",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--machine",
        "broken01",
    ]);
    assert!(
        err.contains("cannot be protected") && err.contains("missing.img") && err.contains("400"),
        "{err}"
    );
    let err = env.fails(&[
        "item",
        "enable",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--machine",
        "nosuch",
    ]);
    assert!(
        err.contains("protectable item") && err.contains("not found"),
        "{err}"
    );
    assert_eq!(
        env.json(&["item", "list"]).as_array().unwrap().len(),
        0,
        "no item was created"
    );
    // Pairing an already paired cloud is refused.
    let err = env.fails(&[
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
        "--name",
        "again",
    ]);
    assert!(err.contains("already paired"), "{err}");
    // A policy in use cannot be deleted.
    let err = env.fails(&["policy", "delete", "pol"]);
    assert!(err.contains("is used by"), "{err}");
}
