//! `siterec bench plan`: the time to test-fail-over a recovery plan of 10
//! and of 100 file-backed machines (their disks written as images at the
//! recovery site, no boot), and where it goes: the plan's own steps, the
//! machines' jobs being started, and each step of the machines' jobs
//! (median and slowest), beside two floors: the database's commits times
//! its sync latency, and the test copies' bytes over the device's direct
//! write rate. Target: 100 machines within 3× the time of 10.
//! A vault and two agents run in this process, as in the quickstart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::client::Api;
use crate::output::Format;
use siterec_api as sapi;

#[derive(clap::Args)]
pub struct PlanBenchOptions {
    /// Working directory (must be empty or absent).
    #[arg(long)]
    pub dir: PathBuf,
    /// Disk size of each machine, in MiB.
    #[arg(long, default_value_t = 4)]
    pub disk_mib: u64,
    /// The plan sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10usize, 100])]
    pub sizes: Vec<usize>,
}

const TIMEOUT: Duration = Duration::from_secs(900);

async fn wait_for<F, Fut>(what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if f().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out waiting for {what}")
}

fn ms(s: &Option<String>) -> Option<i64> {
    let t = time::OffsetDateTime::parse(
        s.as_deref()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

async fn job(api: &Api, id: &str) -> anyhow::Result<sapi::Job> {
    api.get_as(&format!("replicationJobs/{id}")).await
}

/// Runs one plan operation to its end; returns the wall time and the job.
async fn run_plan(api: &Api, rel: &str, body: &Value) -> anyhow::Result<(f64, sapi::Job)> {
    let t = Instant::now();
    let (id, _, _) = api.start(reqwest::Method::POST, rel, body).await?;
    let deadline = Instant::now() + TIMEOUT;
    let j = loop {
        let j = job(api, &id).await?;
        if matches!(
            j.properties.state.as_str(),
            "Succeeded" | "Failed" | "Cancelled"
        ) {
            break j;
        }
        if Instant::now() > deadline {
            bail!("plan job {id} did not end");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let secs = t.elapsed().as_secs_f64();
    if j.properties.state != "Succeeded" {
        bail!(
            "plan job {id} ended {}: {:?}",
            j.properties.state,
            j.properties.errors
        );
    }
    Ok((secs, j))
}

/// Where a plan job's time went: its steps, and its machines' steps
/// (median, max) and the spread of their starts.
async fn breakdown(api: &Api, plan_job: &sapi::Job) -> anyhow::Result<Value> {
    let mut plan_steps = Vec::new();
    for t in &plan_job.properties.tasks {
        if let (Some(a), Some(b)) = (ms(&t.start_time), ms(&t.end_time)) {
            plan_steps.push(json!({"step": t.name, "seconds": (b - a) as f64 / 1000.0}));
        }
    }
    let machines = plan_job
        .properties
        .custom_details
        .output
        .as_ref()
        .and_then(|o| o["machines"].as_array().cloned())
        .unwrap_or_default();
    let mut per_step: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for m in &machines {
        let Some(id) = m["job"].as_str() else {
            continue;
        };
        let j = job(api, id).await?;
        starts.extend(ms(&j.properties.start_time));
        ends.extend(ms(&j.properties.end_time));
        for t in &j.properties.tasks {
            if let (Some(a), Some(b)) = (ms(&t.start_time), ms(&t.end_time)) {
                per_step.entry(t.name.clone()).or_default().push(b - a);
            }
        }
    }
    // A machine's job commits at least twice on its own (its creation by
    // the ARM handler, its task's result from the agent); its steps commit
    // with the engine's passes, shared by all jobs; every plan step once.
    let commits: usize = 2 * machines.len() + plan_job.properties.tasks.len();
    let steps: Vec<Value> = per_step
        .into_iter()
        .map(|(name, mut v)| {
            v.sort_unstable();
            json!({
                "step": name,
                "medianSeconds": v[v.len() / 2] as f64 / 1000.0,
                "maxSeconds": v.last().copied().unwrap_or(0) as f64 / 1000.0,
            })
        })
        .collect();
    let spread = |v: &[i64]| match (v.iter().min(), v.iter().max()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
        _ => 0.0,
    };
    Ok(json!({
        "planSteps": plan_steps,
        "machineSteps": steps,
        "machineStartsSpreadSeconds": spread(&starts),
        "machineEndsSpreadSeconds": spread(&ends),
        "minimumCommits": commits,
    }))
}

pub async fn plan(opts: PlanBenchOptions, out: Format) -> anyhow::Result<()> {
    let dir = &opts.dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: give an empty or new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let n = opts.sizes.iter().copied().max().unwrap_or(0);
    if n == 0 || n > siterec_core::plan::MAX_PLAN_ITEMS {
        bail!(
            "plan sizes go from 1 to {}",
            siterec_core::plan::MAX_PLAN_ITEMS
        );
    }
    let say = |m: &str| {
        if out == Format::Table {
            println!("• {m}");
        }
    };
    let disks = dir.join("disks");
    std::fs::create_dir_all(&disks)?;
    let mut cfg = String::from("cloud = \"primary-cloud\"\n");
    for i in 0..n {
        let p = disks.join(format!("m{i:03}.img"));
        crate::sample::make_mixed_image(&p, opts.disk_mib << 20, 1000 + i as u64)?;
        cfg.push_str(&format!(
            "[[machines]]\nname = \"m{i:03}\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
            p.display()
        ));
    }
    say(&format!(
        "{n} machines of one {} MiB disk each",
        opts.disk_mib
    ));

    let vault = siterec_vault::start(siterec_vault::VaultOptions {
        data_dir: dir.join("vault"),
        listen: "127.0.0.1:0".parse()?,
        agent_listen: "127.0.0.1:0".parse()?,
        name: "bench-plan".into(),
        database: None,
        events: Default::default(),
    })
    .await?;
    let api = Api::from_vault_dir(&dir.join("vault"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = Vec::new();
    for (fabric, text) in [
        ("primary", cfg),
        (
            "recovery",
            "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n".to_string(),
        ),
    ] {
        let key = api.create_key(fabric, None).await?;
        let key_path = dir.join(format!("{fabric}.key"));
        std::fs::write(&key_path, serde_json::to_vec_pretty(&key)?)?;
        let cfg_path = dir.join(format!("{fabric}-agent.toml"));
        std::fs::write(&cfg_path, text)?;
        let opts = siterec_agent::AgentOptions {
            data_dir: dir.join(format!("{fabric}-agent")),
            key_file: Some(key_path),
            config: siterec_agent::AgentConfig::load(&cfg_path)?,
        };
        let mut rx = stop_rx.clone();
        agents.push(tokio::spawn(async move {
            siterec_agent::run(opts, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    let fsync_ms = fsync_latency_ms(&dir.join("vault"))?;
    let write_mb_s = direct_write_mb_s(&dir)?;
    let result = measure(&api, &dir, n, &opts.sizes, &say)
        .await
        .map(|mut r| {
            add_floor(&mut r, fsync_ms, write_mb_s);
            r
        });
    let _ = stop_tx.send(true);
    for a in agents {
        let _ = a.await;
    }
    vault.shutdown().await;
    let report = result?;
    match out {
        Format::Json => crate::output::json(&report),
        Format::Table => print_report(&report),
    }
    Ok(())
}

/// The time of one small durable write (write + fdatasync) where the
/// vault's database is: what each of its commits costs at least.
fn fsync_latency_ms(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe.tmp");
    let mut f = std::fs::File::create(&path)?;
    let t = Instant::now();
    let n = 50;
    for _ in 0..n {
        f.write_all(&[0u8; 4096])?;
        f.sync_data()?;
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(ms)
}

/// The device's best write rate where the recovery agent writes (MB/s):
/// 64 MiB made durable as the replication benchmark's disk floor does it
/// (direct writes, as the agent writes images).
fn direct_write_mb_s(dir: &Path) -> anyhow::Result<f64> {
    let (secs, bytes) = crate::bench::durable_write(dir, 64 << 20)?;
    Ok(bytes as f64 / secs / 1e6)
}

/// The bytes a plan's test failover wrote at the recovery site: the
/// allocated size of every machine's test copy (zero pages are holes).
async fn test_copy_bytes(api: &Api) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for item in api.list("replicationProtectedItems").await? {
        let disks = &item["properties"]["providerSpecificDetails"]["testDisks"];
        for d in disks.as_array().into_iter().flatten() {
            if let Some(path) = d["path"].as_str() {
                total += std::fs::metadata(path)?.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// The floor beside each run: its minimum number of database commits
/// (each a synced write on SQLite with synchronous = FULL) times the
/// measured sync latency.
///
/// And the data floor: the bytes of the test copies over the device's
/// best write rate. Each machine's copy is its own data, so this floor
/// grows with the machines: at 100 machines it alone can exceed 3× the
/// time of 10.
fn add_floor(r: &mut Value, fsync_ms: f64, write_mb_s: f64) {
    r["fsyncMs"] = json!((fsync_ms * 100.0).round() / 100.0);
    r["directWriteMBps"] = json!(write_mb_s.round());
    for run in r["runs"].as_array_mut().into_iter().flatten() {
        let commits = run["where"]["minimumCommits"].as_f64().unwrap_or(0.0);
        run["commitFloorSeconds"] = json!((commits * fsync_ms / 10.0).round() / 100.0);
        let bytes = run["testCopyBytes"].as_f64().unwrap_or(0.0);
        run["dataFloorSeconds"] = json!((bytes / 1e6 / write_mb_s * 100.0).round() / 100.0);
    }
}

async fn measure(
    api: &Api,
    _dir: &Path,
    n: usize,
    sizes: &[usize],
    say: &impl Fn(&str),
) -> anyhow::Result<Value> {
    let vid = api.vault_id().to_string();
    let cloud = "replicationFabrics/primary/replicationProtectionContainers/primary-cloud";
    wait_for("the machines to be reported", || async {
        Ok(api
            .list(&format!("{cloud}/replicationProtectableItems"))
            .await
            .map(|m| m.len())
            .unwrap_or(0)
            >= n)
    })
    .await?;
    wait_for("the recovery agent", || async {
        Ok(api
            .list("replicationFabrics/recovery/replicationProtectionContainers")
            .await
            .map(|c| !c.is_empty())
            .unwrap_or(false))
    })
    .await?;
    let op = api
        .run(
            reqwest::Method::PUT,
            "replicationPolicies/bench",
            &json!({"properties": {"providerSpecificInput": {"instanceType": "HyperVReplicaAzure", "replicationInterval": 900, "recoveryPointHistoryDuration": 1}}}),
            TIMEOUT,
        )
        .await?;
    anyhow::ensure!(op.status == "Succeeded", "policy: {:?}", op.error);
    let op = api
        .run(
            reqwest::Method::PUT,
            &format!("{cloud}/replicationProtectionContainerMappings/bench"),
            &json!({"properties": {
                "targetProtectionContainerId": format!("{vid}/replicationFabrics/recovery/replicationProtectionContainers/recovery-cloud"),
                "policyId": format!("{vid}/replicationPolicies/bench"),
            }}),
            TIMEOUT,
        )
        .await?;
    anyhow::ensure!(op.status == "Succeeded", "pairing: {:?}", op.error);
    let t = Instant::now();
    for i in 0..n {
        let m = format!("m{i:03}");
        api.start(
            reqwest::Method::PUT,
            &format!("{cloud}/replicationProtectedItems/{m}"),
            &json!({"properties": {"protectableItemId": format!("{vid}/{cloud}/replicationProtectableItems/{m}")}}),
        )
        .await?;
    }
    wait_for("every machine to be protected", || async {
        let items: Vec<sapi::ProtectedItem> = api.list_as("replicationProtectedItems").await?;
        Ok(items.len() >= n
            && items
                .iter()
                .all(|i| i.properties.protection_state == "Protected"))
    })
    .await?;
    say(&format!(
        "{n} machines protected in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let mut rows = Vec::new();
    for &size in sizes {
        let name = format!("plan{size}");
        let groups = vec![sapi::RecoveryPlanGroup {
            group_type: "Boot".into(),
            replication_protected_items: (0..size)
                .map(|i| sapi::PlanItemRef {
                    id: format!("m{i:03}"),
                    virtual_machine_id: None,
                })
                .collect(),
            start_group_actions: vec![],
            end_group_actions: vec![],
        }];
        api.put_sync(
            &format!("replicationRecoveryPlans/{name}"),
            &serde_json::to_value(sapi::Input {
                properties: sapi::CreateRecoveryPlanInput {
                    primary_fabric_id: "primary".into(),
                    recovery_fabric_id: "recovery".into(),
                    failover_deployment_model: None,
                    groups,
                },
            })?,
        )
        .await?;
        let body = serde_json::to_value(sapi::Input {
            properties: sapi::RecoveryPlanFailoverInput {
                failover_direction: Some("PrimaryToRecovery".into()),
                network_type: Some("NoNetworkAttachAsInput".into()),
                ..Default::default()
            },
        })?;
        let (secs, j) = run_plan(
            api,
            &format!("replicationRecoveryPlans/{name}/testFailover"),
            &body,
        )
        .await?;
        let detail = breakdown(api, &j).await?;
        let copies = test_copy_bytes(api).await?;
        say(&format!("test failover of {size} machines: {secs:.2} s"));
        let (cleanup, _) = run_plan(
            api,
            &format!("replicationRecoveryPlans/{name}/testFailoverCleanup"),
            &json!({"properties": {"comments": "bench"}}),
        )
        .await?;
        rows.push(json!({
            "machines": size,
            "testFailoverSeconds": (secs * 100.0).round() / 100.0,
            "cleanupSeconds": (cleanup * 100.0).round() / 100.0,
            "testCopyBytes": copies,
            "where": detail,
        }));
    }
    let t = |size: usize| {
        rows.iter()
            .find(|r| r["machines"] == size)
            .and_then(|r| r["testFailoverSeconds"].as_f64())
    };
    let ratio = match (t(10), t(100)) {
        (Some(a), Some(b)) if a > 0.0 => Some((b / a * 100.0).round() / 100.0),
        _ => None,
    };
    Ok(json!({
        "runs": rows,
        "ratio100to10": ratio,
        "target": "100 machines within 3x the time of 10",
        "met": ratio.map(|r| r <= 3.0),
    }))
}

fn print_report(r: &Value) {
    println!();
    println!("recovery plan test failover (materialize only, no boot)");
    for run in r["runs"].as_array().into_iter().flatten() {
        println!(
            "  {:>3} machines: test failover {:>6.2} s, cleanup {:>6.2} s (machine jobs started over {:.2} s, ended over {:.2} s)",
            run["machines"],
            run["testFailoverSeconds"].as_f64().unwrap_or(0.0),
            run["cleanupSeconds"].as_f64().unwrap_or(0.0),
            run["where"]["machineStartsSpreadSeconds"]
                .as_f64()
                .unwrap_or(0.0),
            run["where"]["machineEndsSpreadSeconds"]
                .as_f64()
                .unwrap_or(0.0),
        );
        println!(
            "      floor: {} commits x {} ms sync = {:.2} s (the vault's database syncs every commit)",
            run["where"]["minimumCommits"],
            crate::output::cell(r.get("fsyncMs")),
            run["commitFloorSeconds"].as_f64().unwrap_or(0.0)
        );
        println!(
            "      data floor: {:.0} MB of test copies at {} MB/s (direct writes here) = {:.2} s",
            run["testCopyBytes"].as_f64().unwrap_or(0.0) / 1e6,
            crate::output::cell(r.get("directWriteMBps")),
            run["dataFloorSeconds"].as_f64().unwrap_or(0.0)
        );
        for s in run["where"]["planSteps"].as_array().into_iter().flatten() {
            println!(
                "      plan  {:<48} {:>6.2} s",
                s["step"].as_str().unwrap_or(""),
                s["seconds"].as_f64().unwrap_or(0.0)
            );
        }
        for s in run["where"]["machineSteps"]
            .as_array()
            .into_iter()
            .flatten()
        {
            println!(
                "      item  {:<48} median {:>5.2} s, max {:>5.2} s",
                s["step"].as_str().unwrap_or(""),
                s["medianSeconds"].as_f64().unwrap_or(0.0),
                s["maxSeconds"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!(
        "  100 / 10 = {} (target: within 3x): {}",
        crate::output::cell(r.get("ratio100to10")),
        match r["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        }
    );
}
