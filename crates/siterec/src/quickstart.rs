//! `siterec quickstart`: the whole cycle once, unattended, checked.
//!
//! Starts a vault and two agents (site `primary` with a sample server and
//! a replica store for the way back, site `recovery` with the replica
//! store) in this process, protects the sample disk, changes part of it,
//! waits for a recovery point that contains the change, runs a test
//! failover from it (the test copy checked, then cleaned up), then the
//! cycle ([`cycle`]): planned failover, commit, writes at the recovery
//! site, reprotect, failback, commit, reprotect — checking the data after
//! each move. Exits 0 only if every check holds. `siterec bench roundtrip`
//! runs the same cycle on a larger disk beside a full copy and rsync.

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

    let sites = Sites::start(&dir, &disk, &say).await?;
    let result = protect_and_cycle(&sites.api, &dir, &disk, size, &say).await;
    let url = sites.stop().await;
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
                ("testFailoverSeconds", "test failover (s)"),
                ("testCopyIdentical", "test copy raw, qcow2 = source"),
                ("plannedFailoverSeconds", "planned failover (s)"),
                ("failedOverIdentical", "failed-over raw, qcow2 = source"),
                ("recoveryBytesChanged", "bytes changed at recovery"),
                ("reprotectSeconds", "reprotect (s)"),
                ("reprotectBytesSent", "reprotect bytes sent"),
                ("failbackSeconds", "failback (s)"),
                ("failbackBytesWritten", "failback bytes written"),
                ("failedBackIdentical", "failed-back disk = recovery copy"),
                ("reprotectBackBytesSent", "second reprotect bytes sent"),
                ("totalSeconds", "total (s)"),
                ("vaultUrl", "vault URL (stopped now)"),
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

/// A vault and the two sites' agents, running in this process.
pub struct Sites {
    vault: siterec_vault::RunningVault,
    pub api: Api,
    stop_tx: watch::Sender<bool>,
    agents: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Sites {
    /// The vault, a primary agent offering `web01` (its one disk `disk`)
    /// with a replica store of its own (for reprotect), and a recovery
    /// agent with the replica store; returns once both have reported.
    pub async fn start(dir: &Path, disk: &Path, say: &impl Fn(&str)) -> anyhow::Result<Sites> {
        Sites::start_inner(dir, disk, say).await
    }

    /// Stops the agents and the vault; returns the vault's URL.
    pub async fn stop(self) -> String {
        let _ = self.stop_tx.send(true);
        for a in self.agents {
            match a.await {
                Ok(Err(e)) => eprintln!("agent stopped with an error: {e:#}"),
                Err(e) => eprintln!("agent task: {e}"),
                Ok(Ok(())) => {}
            }
        }
        let url = self.vault.endpoint.url.clone();
        self.vault.shutdown().await;
        url
    }

    async fn start_inner(dir: &Path, disk: &Path, say: &impl Fn(&str)) -> anyhow::Result<Sites> {
        // Vault.
        let vault = siterec_vault::start(siterec_vault::VaultOptions {
            data_dir: dir.join("vault"),
            listen: "127.0.0.1:0".parse()?,
            agent_listen: "127.0.0.1:0".parse()?,
            name: "quickstart".into(),
            database: None,
            events: Default::default(),
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
                    "cloud = \"primary-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n[[machines]]\nname = \"web01\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
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

        Ok(Sites {
            vault,
            api,
            stop_tx,
            agents,
        })
    }
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

/// Policy, pairing and protection of `web01`; returns once it is Protected
/// with the time and bytes of its initial replication.
pub async fn protect(
    api: &Api,
    dir: &Path,
    say: &impl Fn(&str),
) -> anyhow::Result<(Duration, u64)> {
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
    let op = api
        .run(
            reqwest::Method::PUT,
            ITEM_REL,
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
    Ok((initial_secs, initial_sent))
}

async fn protect_and_cycle(
    api: &Api,
    dir: &Path,
    disk: &Path,
    size: u64,
    say: &impl Fn(&str),
) -> anyhow::Result<Value> {
    let (initial_secs, initial_sent) = protect(api, dir, say).await?;

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
    let item_rel = ITEM_REL;
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

    // A test failover from that point while replication goes on: the
    // test copy's disks equal the source's, then the cleanup deletes them.
    let (tested_ok, test_secs) = test_failover(api, disk, &point_id, say).await?;

    // The cycle, with 1 % of the disk written at the recovery site.
    let mut report = cycle(api, disk, size, size / 100, say).await?;
    let passed = report["passed"].as_bool().unwrap_or(false) && tested_ok;
    let extra = json!({
        "recoveryPoint": point_id,
        "initialReplicationSeconds": secs(initial_secs),
        "initialBytesSent": initial_sent,
        "deltaBytesChanged": changed,
        "deltaBytesSent": delta_sent,
        "changeToPointSeconds": secs(change_secs),
        "testFailoverSeconds": secs(test_secs),
        "testCopyIdentical": tested_ok,
        "passed": passed,
    });
    if let (Some(r), Some(e)) = (report.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    Ok(report)
}

/// Test failover of `web01` from `point_id` (its disks written as images in
/// the recovery agent's test directory; the item goes on replicating),
/// checked against the source disk, then cleaned up (checked: the test
/// disks are gone, the item has no test failover left).
async fn test_failover(
    api: &Api,
    disk: &Path,
    point_id: &str,
    say: &impl Fn(&str),
) -> anyhow::Result<(bool, Duration)> {
    let body = json!({"properties": {
        "failoverDirection": "PrimaryToRecovery",
        "networkType": "NoNetworkAttachAsInput",
        "providerSpecificDetails": {"instanceType": "HyperVReplicaAzure", "recoveryPointId": point_id},
    }});
    let (item, took) = act(api, "testFailover", body, "run the test failover").await?;
    let p = &item["properties"];
    let test_disk = |format: &str| {
        p["providerSpecificDetails"]["testDisks"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["format"] == format))
            .and_then(|d| d["path"].as_str())
            .map(std::path::PathBuf::from)
    };
    let raw = test_disk("raw").context("the test failover wrote no raw disk")?;
    let raw_ok = sample::hash_file(&raw)? == sample::hash_file(disk)?;
    let qcow2_ok = match test_disk("qcow2") {
        Some(q) => qemu_img_compare(disk, &q)?,
        None => false,
    };
    let replicating =
        p["protectionState"] == "Protected" && p["testFailoverState"] == "TestFailoverCompleted";
    say(&format!(
        "test failover in {:.1} s from point {point_id}: test copy {} ({}), raw {}, qcow2 {}",
        took.as_secs_f64(),
        raw.parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        state_of(&item),
        verdict(raw_ok),
        verdict(qcow2_ok)
    ));
    let (item, _) = act(
        api,
        "testFailoverCleanup",
        json!({"properties": {"comments": "quickstart: test copy checked"}}),
        "clean up the test failover",
    )
    .await?;
    let cleaned = !raw.exists() && item["properties"]["testFailoverState"] == "None";
    say(&format!(
        "test failover cleaned up: test disks {}",
        if cleaned { "deleted" } else { "STILL THERE" }
    ));
    Ok((raw_ok && qcow2_ok && replicating && cleaned, took))
}

const ITEM_REL: &str = "replicationFabrics/primary/replicationProtectionContainers/primary-cloud/replicationProtectedItems/web01";

/// Runs an item action and waits for its job; returns the item after it
/// and how long it took.
async fn act(
    api: &Api,
    action: &str,
    body: Value,
    what: &str,
) -> anyhow::Result<(Value, Duration)> {
    let t = Instant::now();
    let op = api
        .run(
            reqwest::Method::POST,
            &format!("{ITEM_REL}/{action}"),
            &body,
            STEP_TIMEOUT,
        )
        .await?;
    ensure_ok(&op, what)?;
    let took = t.elapsed();
    let mut result = op.result.unwrap_or(Value::Null);
    // Where the time went: the job's steps.
    if let Ok(job) = api
        .get_as::<Value>(&format!("replicationJobs/{}", op.job_id))
        .await
        && let Some(tasks) = job["properties"]["tasks"].as_array()
    {
        let steps: Vec<Value> = tasks
            .iter()
            .map(|t| {
                let at = |k: &str| parse_ms(t[k].as_str().unwrap_or_default());
                json!({
                    "name": t["name"],
                    "seconds": (at("endTime") - at("startTime")).max(0) as f64 / 1000.0,
                })
            })
            .collect();
        result["jobSteps"] = json!(steps);
    }
    Ok((result, took))
}

/// The bytes the source sent for `point` (the newest point if `None`).
async fn point_bytes(api: &Api, point: Option<&str>) -> anyhow::Result<u64> {
    let points = api.list(&format!("{ITEM_REL}/recoveryPoints")).await?;
    let p = match point {
        Some(id) => points.iter().find(|p| p["name"] == id),
        None => points.iter().max_by_key(|p| {
            parse_ms(
                p["properties"]["recoveryPointTime"]
                    .as_str()
                    .unwrap_or_default(),
            )
        }),
    };
    Ok(
        p.and_then(|p| p["properties"]["providerSpecificDetails"]["bytesSent"].as_u64())
            .unwrap_or(0),
    )
}

fn disk_of(item: &Value, format: &str) -> Option<std::path::PathBuf> {
    item["properties"]["providerSpecificDetails"]["failoverDisks"]
        .as_array()?
        .iter()
        .find(|d| d["format"] == format)
        .and_then(|d| d["path"].as_str())
        .map(std::path::PathBuf::from)
}

fn state_of(item: &Value) -> String {
    format!(
        "{} at the {} site",
        item["properties"]["protectionState"]
            .as_str()
            .unwrap_or("?"),
        item["properties"]["activeLocation"]
            .as_str()
            .unwrap_or("?")
            .to_lowercase()
    )
}

/// The way there and back for the protected `web01` whose disk is `disk`:
/// planned failover (checked: the recovery copy equals the source), commit,
/// `recovery_change` bytes written at the recovery site, reprotect,
/// failback (checked: the source disk equals the recovery copy), commit,
/// reprotect. Returns the times, bytes and checks; `passed` only if every
/// check holds.
pub async fn cycle(
    api: &Api,
    disk: &Path,
    size: u64,
    recovery_change: u64,
    say: &impl Fn(&str),
) -> anyhow::Result<Value> {
    let stopped = json!({"properties": {"failoverDirection": "PrimaryToRecovery", "providerSpecificDetails": {"instanceType": "HyperVReplicaAzure", "sourceStopped": true}}});
    let (item, planned_secs) =
        act(api, "plannedFailover", stopped, "run the planned failover").await?;
    let final_point = item["properties"]["providerSpecificDetails"]["failoverRecoveryPointId"]
        .as_str()
        .map(str::to_string);
    let planned_bytes = point_bytes(api, final_point.as_deref()).await?;
    let source_hash = sample::hash_file(disk)?;
    let recovery_disk = disk_of(&item, "raw").context("the failover wrote no raw disk")?;
    let raw_ok = sample::hash_file(&recovery_disk)? == source_hash;
    let qcow2_ok = match disk_of(&item, "qcow2") {
        Some(p) => qemu_img_compare(disk, &p)?,
        None => false,
    };
    say(&format!(
        "planned failover in {:.1} s ({planned_bytes} bytes of last changes): {}; raw {}, qcow2 {}",
        planned_secs.as_secs_f64(),
        state_of(&item),
        verdict(raw_ok),
        verdict(qcow2_ok)
    ));
    let (item, _) = act(api, "failoverCommit", json!({}), "commit the failover").await?;
    say(&format!("committed: {}", state_of(&item)));

    sample::overwrite_scattered(&recovery_disk, size, recovery_change, 3, 1000)?;
    say(&format!(
        "the server ran at the recovery site and wrote {recovery_change} bytes there"
    ));
    let (item, reprotect_secs) =
        act(api, "reProtect", json!({"properties": {}}), "reprotect").await?;
    let reprotect_bytes = point_bytes(api, None).await?;
    let reprotect_steps = item["jobSteps"].clone();
    say(&format!(
        "reprotected in {:.1} s, {reprotect_bytes} bytes sent back: {}",
        reprotect_secs.as_secs_f64(),
        state_of(&item)
    ));

    let at_failback = sample::hash_file(&recovery_disk)?;
    let stopped = json!({"properties": {"failoverDirection": "RecoveryToPrimary", "providerSpecificDetails": {"instanceType": "HyperVReplicaAzure", "sourceStopped": true}}});
    let (item, failback_secs) = act(api, "plannedFailover", stopped, "fail back").await?;
    let failback_point = item["properties"]["providerSpecificDetails"]["failoverRecoveryPointId"]
        .as_str()
        .map(str::to_string);
    let failback_sent = point_bytes(api, failback_point.as_deref()).await?;
    let written: u64 = item["properties"]["providerSpecificDetails"]["failoverDisks"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["bytesWritten"].as_u64()).sum())
        .unwrap_or(0);
    let back_ok = sample::hash_file(disk)? == at_failback;
    say(&format!(
        "failed back in {:.1} s ({failback_sent} bytes of last changes, {written} bytes written in place): {}; source disk {}",
        failback_secs.as_secs_f64(),
        state_of(&item),
        verdict(back_ok)
    ));
    let (item, _) = act(api, "failoverCommit", json!({}), "commit the failback").await?;
    say(&format!("committed: {}", state_of(&item)));
    let (item, reprotect_back_secs) = act(
        api,
        "reProtect",
        json!({"properties": {}}),
        "reprotect after failback",
    )
    .await?;
    let reprotect_back_bytes = point_bytes(api, None).await?;
    let home = item["properties"]["protectionState"] == "Protected"
        && item["properties"]["activeLocation"] == "Primary";
    say(&format!(
        "reprotected in {:.1} s, {reprotect_back_bytes} bytes sent: {}",
        reprotect_back_secs.as_secs_f64(),
        state_of(&item)
    ));
    Ok(json!({
        "passed": raw_ok && qcow2_ok && back_ok && home,
        "diskBytes": size,
        "plannedFailoverSeconds": secs(planned_secs),
        "plannedFailoverBytesSent": planned_bytes,
        "failedOverIdentical": raw_ok && qcow2_ok,
        "recoveryBytesChanged": recovery_change,
        "reprotectSeconds": secs(reprotect_secs),
        "reprotectBytesSent": reprotect_bytes,
        "reprotectSteps": reprotect_steps,
        "failbackSeconds": secs(failback_secs),
        "failbackBytesSent": failback_sent,
        "failbackBytesWritten": written,
        "failedBackIdentical": back_ok,
        "reprotectBackSeconds": secs(reprotect_back_secs),
        "reprotectBackBytesSent": reprotect_back_bytes,
        "protectedAtPrimary": home,
        "recoveryDisk": recovery_disk.display().to_string(),
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
