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

/// The ARM API refuses what the real one would: requests without a served
/// `api-version`, policies of an unknown `instanceType`, ids in a body that
/// are not whole ids of this vault's resources of the right type, and an
/// item enabled under a policy that is not its pairing's. Each answer is a
/// 400 or 404 that names the problem, and nothing changes.
#[test]
fn api_versions_instance_types_and_ids_are_checked() {
    let mut env = Env::start();
    let q = "api-version=2025-08-01";

    // api-version: missing, old, junk, repeated — 400 naming the one served.
    for (query, code) in [
        ("", "MissingApiVersionParameter"),
        ("api-version=2016-08-10", "InvalidApiVersionParameter"),
        ("api-version=latest", "InvalidApiVersionParameter"),
        (
            "api-version=2025-08-01&api-version=2016-08-10",
            "InvalidApiVersionParameter",
        ),
    ] {
        let (status, body) = env.arm("GET", "replicationFabrics", query, None);
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("2025-08-01"),
            "{body}"
        );
    }
    let (status, _) = env.arm("GET", "replicationFabrics", q, None);
    assert_eq!(status, 200);
    // The parameter's name is case-insensitive, as in ARM.
    let (status, _) = env.arm("GET", "replicationFabrics", "API-VERSION=2025-08-01", None);
    assert_eq!(status, 200);

    // A policy's instanceType: unknown, missing, not a string.
    for (input, needle) in [
        (
            serde_json::json!({"instanceType": "Bogus", "replicationInterval": 300}),
            "'Bogus' is not known",
        ),
        (
            serde_json::json!({"replicationInterval": 300}),
            "instanceType is missing",
        ),
        (
            serde_json::json!({"instanceType": 42, "replicationInterval": 300}),
            "must be a string",
        ),
    ] {
        let (status, body) = env.arm(
            "PUT",
            "replicationPolicies/p1",
            q,
            Some(serde_json::json!({"properties": {"providerSpecificInput": input}})),
        );
        assert_eq!(status, 400, "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle) && msg.contains("HyperVReplicaAzure, HyperVReplica2012R2"),
            "{msg}"
        );
    }
    assert_eq!(env.json(&["policy", "list"]).as_array().unwrap().len(), 0);

    let disk = env.path("web01.img");
    make_image(&disk, 4 << 20, 9);
    env.start_sites(&[("web01", vec![("disk0", &disk)])]);
    env.pair(&["--retention-hours", "1"]);
    env.json(&["policy", "create", "other", "--copy-frequency", "300"]);
    env.wait_machine("web01");
    let vault = env.vault_id();
    let evil = vault.replace("/vaults/", "/vaults/EVIL-");
    let sub0 = {
        // The same vault name under another subscription.
        let parts: Vec<&str> = vault.split('/').collect();
        let mut p = parts.clone();
        p[2] = "0000";
        p.join("/")
    };
    let container = "replicationFabrics/primary/replicationProtectionContainers/primary-cloud";

    // Pairing: ids of another vault, of no shape, of the wrong type, of
    // nothing. The cloud is paired already, but ids are checked first.
    let target = format!(
        "{vault}/replicationFabrics/recovery/replicationProtectionContainers/recovery-cloud"
    );
    let policy = format!("{vault}/replicationPolicies/pol");
    let mapping = |target: &str, policy: &str| {
        Some(serde_json::json!({"properties": {
            "targetProtectionContainerId": target,
            "policyId": policy,
            "providerSpecificInput": {"instanceType": "ReplicationProviderSpecificContainerMappingInput"}
        }}))
    };
    let rel = format!("{container}/replicationProtectionContainerMappings/again");
    for (t, p, status, needle) in [
        (
            target.clone(),
            format!("{evil}/replicationPolicies/pol"),
            400,
            "another vault",
        ),
        (
            target.clone(),
            format!("{sub0}/replicationPolicies/pol"),
            400,
            "another vault",
        ),
        (
            target.clone(),
            "/totally/bogus/web04".to_string(),
            400,
            "is not a replication policy id",
        ),
        (
            target.clone(),
            "pol".to_string(),
            400,
            "is not a replication policy id",
        ),
        (
            target.clone(),
            format!("{vault}/replicationFabrics/recovery/replicationNetworks/pol"),
            400,
            "not a replication policy id",
        ),
        (
            target.clone(),
            format!("{vault}/replicationPolicies/int900"),
            404,
            "replication policy 'int900' was not found",
        ),
        (
            format!(
                "{evil}/replicationFabrics/recovery/replicationProtectionContainers/recovery-cloud"
            ),
            policy.clone(),
            400,
            "another vault",
        ),
        (
            "/totally/bogus/recovery-cloud".to_string(),
            policy.clone(),
            400,
            "is not a protection container id",
        ),
        (
            format!("{vault}/replicationFabrics/recovery/replicationProtectionContainers/nocloud"),
            policy.clone(),
            404,
            "'recovery/nocloud' was not found",
        ),
    ] {
        let (s, body) = env.arm("PUT", &rel, q, mapping(&t, &p));
        assert_eq!(s, status, "{t} {p}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{t} {p}: {msg}");
    }
    assert_eq!(
        env.json(&["pairing", "list"]).as_array().unwrap().len(),
        1,
        "no pairing was added"
    );

    // Enable protection: the machine's id and the policy are checked whole.
    let item_rel = format!("{container}/replicationProtectedItems/web01");
    let machine = format!("{vault}/{container}/replicationProtectableItems/web01");
    let enable = |machine: &str, policy: Option<&str>| {
        let mut props = serde_json::json!({
            "protectableItemId": machine,
            "providerSpecificDetails": {"instanceType": "HyperVReplicaAzure"}
        });
        if let Some(p) = policy {
            props["policyId"] = p.into();
        }
        Some(serde_json::json!({ "properties": props }))
    };
    let other_policy = format!("{vault}/replicationPolicies/other");
    for (m, p, status, needle) in [
        (
            "/totally/bogus/web04".to_string(),
            None,
            400,
            "is not a protectable item id",
        ),
        (
            "web01".to_string(),
            None,
            400,
            "is not a protectable item id",
        ),
        (
            format!("{evil}/{container}/replicationProtectableItems/web01"),
            None,
            400,
            "another vault",
        ),
        (
            format!(
                "{vault}/replicationFabrics/recovery/replicationProtectionContainers/recovery-cloud/replicationProtectableItems/web01"
            ),
            None,
            400,
            "enable it under the machine's own cloud",
        ),
        (
            format!("{vault}/{container}/replicationProtectedItems/web01"),
            None,
            400,
            "not a protectable item id",
        ),
        (
            format!("{vault}/{container}/replicationProtectableItems/web99"),
            None,
            404,
            "web99",
        ),
        (
            machine.clone(),
            Some(other_policy.as_str()),
            400,
            "is not the policy of cloud primary/primary-cloud's pairing",
        ),
        (
            machine.clone(),
            Some(
                "/subscriptions/0000/resourceGroups/x/providers/Microsoft.RecoveryServices/vaults/EVIL/replicationPolicies/pol",
            ),
            400,
            "another vault",
        ),
    ] {
        let (s, body) = env.arm("PUT", &item_rel, q, enable(&m, p));
        assert_eq!(s, status, "{m} {p:?}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{m} {p:?}: {msg}");
    }
    assert_eq!(
        env.json(&["item", "list"]).as_array().unwrap().len(),
        0,
        "no item was created"
    );
    // The right ids, spelled in another case as ARM allows, are accepted.
    let (s, body) = env.arm(
        "PUT",
        &item_rel,
        q,
        enable(
            &machine.to_ascii_lowercase(),
            Some(&policy.to_ascii_uppercase()),
        ),
    );
    assert_eq!(s, 202, "{body}");
    wait_until(Duration::from_secs(60), "web01 protected", || {
        env.json(&["item", "list"])
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
}
