//! `siterec quickstart`: the whole job once, unattended, checked.
//!
//! Starts a vault and two agents (site `primary` with a sample server, site
//! `recovery` with the replica store) in this process, protects the sample
//! disk, changes part of it, waits for a recovery point that contains the
//! change, fails over to it, commits, and checks that the failed-over raw
//! and qcow2 disks equal the source. Exits 0 only if they do.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::client::Api;
use crate::output::Format;
use crate::sample;

const STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn run(dir: &Path, disk_mib: u64, out: Format) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir.join("vault").exists() {
        bail!(
            "{} already holds a quickstart; choose an empty directory",
            dir.display()
        );
    }
    let t_all = Instant::now();
    let say = |msg: &str| {
        if out == Format::Table {
            println!("• {msg}");
        }
    };

    // The sample server's disk.
    let disks = dir.join("disks");
    std::fs::create_dir_all(&disks)?;
    let disk = disks.join("web01-disk0.img");
    let size = disk_mib * 1024 * 1024;
    sample::make_mixed_image(&disk, size, 7)?;
    say(&format!(
        "made a {disk_mib} MiB sample disk with zeros, text and random data: {}",
        disk.display()
    ));

    // Vault.
    let vault = siterec_vault::start(siterec_vault::VaultOptions {
        data_dir: dir.join("vault"),
        listen: "127.0.0.1:0".parse()?,
        agent_listen: "127.0.0.1:0".parse()?,
        name: "quickstart".into(),
        database: None,
    })
    .await?;
    let api = Api::from_vault_dir(&dir.join("vault"))?;
    say(&format!(
        "vault {} listening at {}",
        vault.endpoint.vault_id, vault.endpoint.url
    ));

    // Agents.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = Vec::new();
    for (fabric, cloud, cfg) in [
        (
            "primary",
            "primary-cloud",
            format!(
                "cloud = \"primary-cloud\"\n[[machines]]\nname = \"web01\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
                disk.display()
            ),
        ),
        (
            "recovery",
            "recovery-cloud",
            "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n".to_string(),
        ),
    ] {
        let key = api.create_key(fabric, None).await?;
        let key_path = dir.join(format!("{fabric}.key"));
        std::fs::write(&key_path, serde_json::to_vec_pretty(&key)?)?;
        let cfg_path = dir.join(format!("{fabric}-agent.toml"));
        std::fs::write(&cfg_path, cfg)?;
        let config = siterec_agent::AgentConfig::load(&cfg_path)?;
        let opts = siterec_agent::AgentOptions {
            data_dir: dir.join(format!("{fabric}-agent")),
            key_file: Some(key_path),
            config,
        };
        let mut rx = stop_rx.clone();
        agents.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            siterec_agent::run(opts, stop).await
        }));
        wait_for(|| async {
            Ok(api
                .list(&format!(
                    "replicationFabrics/{fabric}/replicationProtectionContainers"
                ))
                .await
                .ok()
                .is_some_and(|c| c.iter().any(|c| c["name"] == cloud)))
        })
        .await
        .with_context(|| format!("the {fabric} agent did not report"))?;
        say(&format!(
            "agent of site '{fabric}' enrolled and reported cloud '{cloud}'"
        ));
    }

    let result = protect_and_fail_over(&api, &dir, &disk, size, say).await;
    let _ = stop_tx.send(true);
    for a in agents {
        match a.await {
            Ok(Err(e)) => eprintln!("agent stopped with an error: {e:#}"),
            Err(e) => eprintln!("agent task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    let url = vault.endpoint.url.clone();
    vault.shutdown().await;
    let mut report = result?;
    report["vaultUrl"] = url.into();
    report["totalSeconds"] = secs(t_all.elapsed());
    let passed = report["passed"].as_bool().unwrap_or(false);
    match out {
        Format::Json => crate::output::json(&report),
        Format::Table => {
            println!();
            println!("quickstart report");
            for (k, label) in [
                ("initialReplicationSeconds", "initial replication (s)"),
                ("initialBytesSent", "initial bytes sent"),
                ("deltaBytesChanged", "bytes changed at the source"),
                ("deltaBytesSent", "delta cycle bytes sent"),
                ("changeToPointSeconds", "change to recovery point (s)"),
                ("failoverSeconds", "failover (s)"),
                ("totalSeconds", "total (s)"),
                ("vaultUrl", "vault URL (stopped now)"),
                ("rawIdentical", "failed-over raw equals source"),
                ("qcow2Identical", "failed-over qcow2 equals source"),
            ] {
                println!("  {label:<34} {}", crate::output::cell(report.get(k)));
            }
            println!(
                "  {:<34} {}",
                "result",
                if passed { "PASSED" } else { "FAILED" }
            );
        }
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn secs(d: Duration) -> Value {
    json!((d.as_secs_f64() * 10.0).round() / 10.0)
}

async fn wait_for<F, Fut>(mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Instant::now() < deadline {
        if f().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("timed out after {} s", STEP_TIMEOUT.as_secs())
}

fn agent_counter(dir: &Path, field: &str) -> u64 {
    siterec_agent::AgentStatus::read(&dir.join("primary-agent"))
        .ok()
        .and_then(|s| {
            s.items
                .get("web01")
                .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
        })
        .and_then(|c| c[field].as_u64())
        .unwrap_or(0)
}

async fn protect_and_fail_over(
    api: &Api,
    dir: &Path,
    disk: &Path,
    size: u64,
    say: impl Fn(&str),
) -> anyhow::Result<Value> {
    let vid = api.vault_id().to_string();
    let op = api
        .run(
            reqwest::Method::PUT,
            "replicationPolicies/quickstart-policy",
            &json!({"properties": {"providerSpecificInput": {"instanceType": "HyperVReplicaAzure", "replicationInterval": 30, "recoveryPointHistoryDuration": 1}}}),
            STEP_TIMEOUT,
        )
        .await?;
    ensure_ok(&op, "create the policy")?;
    let op = api
        .run(
            reqwest::Method::PUT,
            "replicationFabrics/primary/replicationProtectionContainers/primary-cloud/replicationProtectionContainerMappings/quickstart-pairing",
            &json!({"properties": {
                "targetProtectionContainerId": format!("{vid}/replicationFabrics/recovery/replicationProtectionContainers/recovery-cloud"),
                "policyId": format!("{vid}/replicationPolicies/quickstart-policy"),
            }}),
            STEP_TIMEOUT,
        )
        .await?;
    ensure_ok(&op, "pair the clouds")?;
    say("policy created (copy frequency 30 s, 1 h retention) and clouds paired");
    wait_for(|| async {
        Ok(api
            .list("replicationFabrics/primary/replicationProtectionContainers/primary-cloud/replicationProtectableItems")
            .await?
            .iter()
            .any(|m| m["name"] == "web01"))
    })
    .await
    .context("machine web01 was not discovered")?;

    let t0 = Instant::now();
    let item_rel = "replicationFabrics/primary/replicationProtectionContainers/primary-cloud/replicationProtectedItems/web01";
    let op = api
        .run(
            reqwest::Method::PUT,
            item_rel,
            &json!({"properties": {"protectableItemId": format!("{vid}/replicationFabrics/primary/replicationProtectionContainers/primary-cloud/replicationProtectableItems/web01")}}),
            STEP_TIMEOUT,
        )
        .await?;
    ensure_ok(&op, "enable protection")?;
    let initial_secs = t0.elapsed();
    let initial_sent = agent_counter(dir, "bytesSent");
    say(&format!(
        "protection enabled: initial replication took {:.1} s",
        initial_secs.as_secs_f64()
    ));

    // Change part of the disk: 4 MiB of random data and 1 MiB of zeros.
    let changed = 5 * 1024 * 1024u64;
    sample::overwrite_random(disk, size / 3, 4 * 1024 * 1024, 99)?;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(disk)?;
        f.seek(SeekFrom::Start(size / 2))?;
        f.write_all(&vec![0u8; 1024 * 1024])?;
        f.sync_all()?;
    }
    let changed_at_ms = now_ms();
    let t1 = Instant::now();
    say("changed 5 MiB of the source disk; waiting for the next recovery point");
    let mut point_id = String::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while point_id.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "no recovery point after the change within {} s",
                STEP_TIMEOUT.as_secs()
            );
        }
        for p in api.list(&format!("{item_rel}/recoveryPoints")).await? {
            let t = p["properties"]["recoveryPointTime"]
                .as_str()
                .unwrap_or_default();
            if parse_ms(t) > changed_at_ms {
                point_id = p["name"].as_str().unwrap_or_default().to_string();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let change_secs = t1.elapsed();
    let delta_sent = agent_counter(dir, "lastCycleBytesSent");
    say(&format!(
        "recovery point {point_id} holds the change ({delta_sent} bytes sent)"
    ));

    let t2 = Instant::now();
    let op = api
        .run(
            reqwest::Method::POST,
            &format!("{item_rel}/unplannedFailover"),
            &json!({"properties": {"failoverDirection": "PrimaryToRecovery", "providerSpecificDetails": {"instanceType": "HyperVReplicaAzure", "recoveryPointId": format!("{vid}/{item_rel}/recoveryPoints/{point_id}")}}}),
            STEP_TIMEOUT,
        )
        .await?;
    ensure_ok(&op, "fail over")?;
    let op2 = api
        .run(
            reqwest::Method::POST,
            &format!("{item_rel}/failoverCommit"),
            &json!({}),
            STEP_TIMEOUT,
        )
        .await?;
    ensure_ok(&op2, "commit the failover")?;
    let failover_secs = t2.elapsed();
    let item = op2.result.unwrap_or(Value::Null);
    say(&format!(
        "failed over and committed: item is {}",
        item["properties"]["protectionState"]
            .as_str()
            .unwrap_or("?")
    ));

    let disks = item["properties"]["providerSpecificDetails"]["failoverDisks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let path_of = |fmt: &str| {
        disks
            .iter()
            .find(|d| d["format"] == fmt)
            .and_then(|d| d["path"].as_str())
            .map(std::path::PathBuf::from)
    };
    let source_hash = sample::hash_file(disk)?;
    let raw_ok = match path_of("raw") {
        Some(p) => sample::hash_file(&p)? == source_hash,
        None => false,
    };
    let qcow2_ok = match path_of("qcow2") {
        Some(p) => qemu_img_compare(disk, &p)?,
        None => false,
    };
    say(&format!(
        "checked the failed-over disks against the source: raw {}, qcow2 {}",
        verdict(raw_ok),
        verdict(qcow2_ok)
    ));
    Ok(json!({
        "passed": raw_ok && qcow2_ok,
        "rawIdentical": raw_ok,
        "qcow2Identical": qcow2_ok,
        "recoveryPoint": point_id,
        "initialReplicationSeconds": secs(initial_secs),
        "initialBytesSent": initial_sent,
        "deltaBytesChanged": changed,
        "deltaBytesSent": delta_sent,
        "changeToPointSeconds": secs(change_secs),
        "failoverSeconds": secs(failover_secs),
        "failoverDisks": disks,
    }))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "identical" } else { "DIFFERENT" }
}

/// `qemu-img compare` judges the qcow2 image independently of our reader.
fn qemu_img_compare(raw: &Path, qcow2: &Path) -> anyhow::Result<bool> {
    let status = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .status()
        .context("running qemu-img (install the qemu-utils package)")?;
    Ok(status.success())
}

fn ensure_ok(op: &crate::client::Operation, what: &str) -> anyhow::Result<()> {
    if op.status != "Succeeded" {
        bail!(
            "could not {what}: {} (job {})",
            op.error.clone().unwrap_or_else(|| op.status.clone()),
            op.job_id
        );
    }
    Ok(())
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn parse_ms(s: &str) -> i64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}
