//! The siterec agent: one daemon per host.
//!
//! It enrols once with a registration key ([`identity`]), then opens every
//! connection itself: heartbeats to the vault carry its inventory and
//! counters and bring back tasks and replication assignments. In the source
//! role ([`source`]) it replicates machines to their target agent; in the
//! target role ([`target`]) it keeps a replica store, receives chunks and
//! points from source agents, and materializes recovery points on failover.

pub mod batch;
pub mod compute;
pub mod config;
pub mod cvs;
pub mod group;
pub mod identity;
pub mod image;
pub mod instant;
pub mod limits;
pub mod pages;
pub mod script;
pub mod source;
pub mod spool;
pub mod target;
pub mod throttle;
mod util;
pub mod vm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use siterec_core::wire::{
    AgentTask, DiskInfo, HeartbeatRequest, HeartbeatResponse, ItemCounters, MachineInfo,
    ReplicationAssignment, TaskResult,
};
use siterec_drivers::capture::DiskSource;
use tokio::sync::watch;

pub use config::AgentConfig;

/// How to run an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub data_dir: PathBuf,
    /// Registration key file; needed only for the first start.
    pub key_file: Option<PathBuf>,
    pub config: AgentConfig,
}

/// Written to `DATA/status.json` after every heartbeat and cycle.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub agent_id: String,
    pub fabric: String,
    #[serde(default)]
    pub data_url: Option<String>,
    pub last_heartbeat_ms: Option<i64>,
    #[serde(default)]
    pub last_heartbeat_error: Option<String>,
    pub items: BTreeMap<String, ItemCounters>,
    /// Machines of this agent whose items failed over: not started here
    /// (as the vault last said).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<String>,
}

impl AgentStatus {
    /// Writes the status file atomically; a failure is only logged.
    pub fn save(&self, data_dir: &Path) {
        let result = serde_json::to_vec_pretty(self)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| util::write_atomically(&data_dir.join("status.json"), &bytes));
        if let Err(e) = result {
            tracing::warn!("writing the status file: {e:#}");
        }
    }

    pub fn read(data_dir: &Path) -> anyhow::Result<AgentStatus> {
        let path = data_dir.join("status.json");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (has the agent started with this --data directory?)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not an agent status file", path.display()))
    }
}

struct Replication {
    assignment: ReplicationAssignment,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    opts: AgentOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    siterec_pki::install_crypto_provider();
    let data = opts.data_dir.clone();
    std::fs::create_dir_all(&data)
        .with_context(|| format!("creating the agent data directory {}", data.display()))?;
    let cfg = opts.config.clone();
    let mut extra_names = Vec::new();
    if let Some(t) = &cfg.target
        && !t.listen.ip().is_unspecified()
    {
        extra_names.push(t.listen.ip().to_string());
    }
    let id = identity::load_or_enrol(&data, opts.key_file.as_deref(), &extra_names).await?;
    // Two trust roots: the vault's server CA for the vault, the agent CA
    // for other agents' data endpoints.
    let identity = Some((id.cert_pem.as_str(), id.key_pem.as_str()));
    let client = siterec_pki::reqwest_client(&id.vault_ca_pem, identity, Duration::from_secs(120))?;
    let data_client =
        siterec_pki::reqwest_client(&id.agent_ca_pem, identity, Duration::from_secs(120))?;

    let transport = identity::load_or_create_transport_key(&data)?;
    let transport_public = transport.public_key_base64();

    // The config's VMs, which replica VMs made here join.
    let vms = Arc::new(vm::VmHost::new(&cfg.vms, &data));

    // Target role.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut target = None;
    let mut data_url = None;
    let mut server = None;
    if let Some(t) = &cfg.target {
        let backend = match (&t.backend, &t.store) {
            (Some(b), _) => b.clone(),
            (None, Some(path)) => siterec_store::BackendConfig::Local { path: path.clone() },
            (None, None) => siterec_store::BackendConfig::Local {
                path: data.join("store"),
            },
        };
        let failover_dir = t
            .failover_dir
            .clone()
            .unwrap_or_else(|| data.join("failover"));
        let encryption = match (t.encryption, &t.recovery_key_export) {
            (true, Some(export)) => Some(target::StoreEncryption {
                credential: data.join("store.credential"),
                recovery_key_export: export.clone(),
            }),
            _ => None,
        };
        let tg = target::Target::open_backend(encryption.as_ref(), &backend, failover_dir).await?;
        tg.set_transport_key(transport.clone());
        tg.compute.set_host(vms.clone());
        tg.compute.register_existing().await;
        tg.set_local_machines(
            cfg.machines
                .iter()
                .map(|m| {
                    let disks = m
                        .disks
                        .iter()
                        .map(|d| target::LocalDisk {
                            name: d.name.clone(),
                            path: d.path.clone(),
                            format: siterec_qemu::DiskFormat::Raw,
                        })
                        .collect();
                    (m.name.clone(), disks)
                })
                .chain(cfg.vms.iter().map(|v| {
                    let disks = v
                        .disks
                        .iter()
                        .map(|d| target::LocalDisk {
                            name: d.name.clone(),
                            path: d.path.clone(),
                            format: d.format,
                        })
                        .collect();
                    (v.name.clone(), disks)
                }))
                .collect(),
        );
        let listener = tokio::net::TcpListener::bind(t.listen)
            .await
            .with_context(|| format!("binding the data endpoint {}", t.listen))?;
        let addr = listener.local_addr()?;
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        data_url = Some(format!("https://{host}:{}", addr.port()));
        let tls = siterec_pki::server_config(
            &id.cert_pem,
            &id.key_pem,
            Some(&id.agent_ca_pem),
            siterec_pki::ClientAuth::Required,
        )?;
        let router = tg.router();
        let mut rx = stop_rx.clone();
        server = Some(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = siterec_pki::serve(listener, Some(tls), router, stop).await {
                tracing::error!("data endpoint stopped: {e}");
            }
        }));
        target = Some(tg);
    }

    // Counters survive restarts: start from the last status file.
    let items = AgentStatus::read(&data)
        .map(|s| s.items)
        .unwrap_or_default();
    let status = Arc::new(Mutex::new(AgentStatus {
        agent_id: id.agent_id.clone(),
        fabric: id.fabric.clone(),
        data_url: data_url.clone(),
        items,
        ..Default::default()
    }));
    let throttle = Arc::new(throttle::Throttle::new(throttle::ThrottleSettings::read(
        &data,
    )?));
    // The VMs are started beside the heartbeat, not before it (a slow
    // QEMU must not hold up enrolment); an item's cycle waits for its VM,
    // and one that could not start is retried by its item's cycles.
    tokio::spawn({
        let vms = vms.clone();
        async move { vms.start_all().await }
    });
    let ctx = Arc::new(source::SourceCtx {
        status: status.clone(),
        upload_streams: cfg.upload_streams.unwrap_or(source::DEFAULT_UPLOAD_STREAMS),
        throttle: throttle.clone(),
        spool_max_bytes: cfg.spool_max_mib.unwrap_or(spool::DEFAULT_SPOOL_MAX_MIB) << 20,
        ..source::SourceCtx::new(
            data.clone(),
            client.clone(),
            data_client,
            id.agent_url.clone(),
            vms,
        )
    });
    let mut replications: HashMap<String, Replication> = HashMap::new();
    let running_tasks: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let importing: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let finished_tasks: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let period = Duration::from_millis(cfg.heartbeat_ms.unwrap_or(1000).max(100));
    let scripts_dir = cfg
        .scripts_dir
        .clone()
        .unwrap_or_else(|| data.join("scripts"));
    tracing::info!(agent = %id.agent_id, fabric = %id.fabric, data_url = ?data_url, "agent running");

    let mut shutdown = std::pin::pin!(shutdown);
    // The version of the vault's last answer: the next heartbeat waits for
    // it to change (a long poll of up to one period) instead of sleeping.
    let mut seen_version: Option<u64> = None;
    // Set when the vault says this agent is unregistered: the loop ends.
    let mut unregistered: Option<anyhow::Error> = None;
    loop {
        // Throttling can change while replicating: re-read it every round.
        match throttle::ThrottleSettings::read(&data) {
            Ok(settings) => throttle.set(settings),
            Err(e) => tracing::warn!("keeping the current bandwidth throttling: {e:#}"),
        }
        let req = HeartbeatRequest {
            cloud: cfg.cloud.clone(),
            machines: inventory(&cfg),
            data_url: data_url.clone(),
            networks: cfg.network_names(),
            store_encrypted: target.as_ref().is_some_and(|t| t.store.is_encrypted()),
            store_key_id: target.as_ref().and_then(|t| t.store.key_id()),
            transport_key: target.as_ref().map(|_| transport_public.clone()),
            counters: status.lock().map(|s| s.items.clone()).unwrap_or_default(),
            seen_version,
            wait_ms: period.as_millis() as u32,
        };
        let result = tokio::select! {
            _ = &mut shutdown => break,
            r = heartbeat(&client, &id.agent_url, &req) => r,
        };
        // Waited at the vault: go round at once (an old vault, or a failed
        // heartbeat, waits here).
        let waited = matches!(&result, Ok(r) if r.version != 0 && seen_version.is_some());
        seen_version = match &result {
            Ok(r) if r.version != 0 => Some(r.version),
            _ => None,
        };
        if let Ok(mut st) = status.lock() {
            match &result {
                Ok(_) => {
                    st.last_heartbeat_ms = Some(util::now_ms());
                    st.last_heartbeat_error = None;
                }
                Err(e) => st.last_heartbeat_error = Some(format!("{e:#}")),
            }
            st.save(&data);
        }
        match result {
            Ok(resp) => {
                ctx.vms.set_fenced(&resp.fenced);
                if let Ok(mut st) = status.lock()
                    && st.fenced != resp.fenced
                {
                    st.fenced = resp.fenced.clone();
                    st.save(&data);
                }
                if let Some(t) = &target {
                    t.set_sources(resp.sources.clone());
                    start_imports(t, &resp.imports, &importing);
                }
                reconcile(&ctx, &mut replications, resp.replications);
                for task in resp.tasks {
                    start_task(
                        &client,
                        &id.agent_url,
                        target.clone(),
                        ctx.vms.clone(),
                        (&data, &scripts_dir),
                        task,
                        &running_tasks,
                        &finished_tasks,
                    );
                }
            }
            Err(e) if e.downcast_ref::<Unregistered>().is_some() => {
                tracing::error!("the vault refused this agent, stopping: {e:#}");
                unregistered = Some(e);
                break;
            }
            Err(e) => tracing::warn!("heartbeat failed: {e:#}"),
        }
        if waited {
            continue;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(period) => {}
        }
    }

    tracing::info!("agent stopping");
    for (_, r) in replications.drain() {
        let _ = r.stop.send(true);
        r.handle.abort();
    }
    let _ = stop_tx.send(true);
    if let Some(s) = server {
        let _ = s.await;
    }
    if let Some(t) = target {
        t.store.sync().await.context("syncing the replica store")?;
    }
    match unregistered {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The machines and VMs of the config, with their disks' sizes; a disk that
/// cannot be opened marks its machine with an error instead of failing the
/// agent.
fn inventory(cfg: &AgentConfig) -> Vec<MachineInfo> {
    let mut all = physical_inventory(cfg);
    all.extend(cfg.vms.iter().map(vm::inventory));
    all
}

fn physical_inventory(cfg: &AgentConfig) -> Vec<MachineInfo> {
    cfg.machines
        .iter()
        .map(|m| {
            let mut disks = Vec::new();
            let mut error = None;
            for d in &m.disks {
                match DiskSource::open(&d.path) {
                    Ok(src) => disks.push(DiskInfo {
                        name: d.name.clone(),
                        path: d.path.display().to_string(),
                        size_bytes: src.size(),
                    }),
                    Err(e) => {
                        error = Some(format!("disk '{}': {e}", d.name));
                        disks.push(DiskInfo {
                            name: d.name.clone(),
                            path: d.path.display().to_string(),
                            size_bytes: 0,
                        });
                    }
                }
            }
            MachineInfo {
                name: m.name.clone(),
                kind: siterec_core::wire::KIND_PHYSICAL.into(),
                disks,
                nics: Vec::new(),
                vm: None,
                error,
            }
        })
        .collect()
}

async fn heartbeat(
    client: &reqwest::Client,
    vault: &str,
    req: &HeartbeatRequest,
) -> anyhow::Result<HeartbeatResponse> {
    let url = format!("{vault}/agent/v1/heartbeat");
    let resp = client
        .post(&url)
        .json(req)
        .send()
        .await
        .with_context(|| format!("contacting the vault at {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::UNAUTHORIZED
            && let Ok(e) = serde_json::from_str::<serde_json::Value>(&text)
            && e["error"]["code"] == siterec_core::wire::AGENT_NOT_REGISTERED
        {
            let message = e["error"]["message"].as_str().unwrap_or("unregistered");
            return Err(Unregistered(message.to_string()).into());
        }
        anyhow::bail!("the vault answered {status}: {text}");
    }
    resp.json().await.context("reading the heartbeat answer")
}

/// The vault no longer knows this agent (it was unregistered): it stops.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unregistered(pub String);

/// Starts replicators for new assignments, restarts changed ones and stops
/// those the vault no longer lists.
fn reconcile(
    ctx: &Arc<source::SourceCtx>,
    running: &mut HashMap<String, Replication>,
    wanted: Vec<ReplicationAssignment>,
) {
    let wanted: HashMap<String, ReplicationAssignment> =
        wanted.into_iter().map(|a| (a.item.clone(), a)).collect();
    let mut groups: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
    for a in wanted.values() {
        if let Some(g) = &a.group {
            groups.entry(g.clone()).or_default().insert(a.item.clone());
        }
    }
    ctx.groups.set_members(groups);
    // Replicators told to stop finish their cycle first; a new one for the
    // same item waits for that (two cycles of an item never overlap).
    let mut stopping: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    for item in running.keys().cloned().collect::<Vec<_>>() {
        let keep = match (wanted.get(&item), running.get(&item)) {
            (Some(a), Some(r)) => *a == r.assignment && !r.handle.is_finished(),
            _ => false,
        };
        if !keep && let Some(r) = running.remove(&item) {
            tracing::info!(item, "stopping replication");
            let _ = r.stop.send(true);
            stopping.insert(item, r.handle);
        }
    }
    for (item, a) in wanted {
        if running.contains_key(&item) {
            continue;
        }
        tracing::info!(item = %item, target = %a.target_url, "starting replication");
        let (stop, rx) = watch::channel(false);
        let previous = stopping.remove(&item);
        let handle = tokio::spawn(source::run_item(ctx.clone(), a.clone(), rx, previous));
        running.insert(
            item,
            Replication {
                assignment: a,
                stop,
                handle,
            },
        );
    }
}

// The task's context is this loop's state, passed as it is.
#[allow(clippy::too_many_arguments)]
fn start_task(
    client: &reqwest::Client,
    vault: &str,
    target: Option<Arc<target::Target>>,
    vms: Arc<vm::VmHost>,
    (data, scripts_dir): (&std::path::Path, &std::path::Path),
    task: AgentTask,
    running: &Arc<Mutex<HashSet<String>>>,
    finished: &Arc<Mutex<HashSet<String>>>,
) {
    {
        let Ok(mut r) = running.lock() else { return };
        let done = finished
            .lock()
            .map(|f| f.contains(&task.id))
            .unwrap_or(false);
        if done || !r.insert(task.id.clone()) {
            return;
        }
    }
    let client = client.clone();
    let url = format!("{vault}/agent/v1/tasks/{}/result", task.id);
    let running = running.clone();
    let finished = finished.clone();
    let (data, scripts_dir) = (data.to_path_buf(), scripts_dir.to_path_buf());
    tokio::spawn(async move {
        tracing::info!(task = %task.id, "running task {:?}", task.work);
        let result = match (&target, &task.work) {
            // A planned failover's source site needs no replica store.
            (
                _,
                siterec_core::wire::TaskWork::StopVm {
                    vm_name,
                    timeout_secs,
                    force,
                    ..
                },
            ) => {
                vms.stop_vm(
                    vm_name,
                    Duration::from_secs(u64::from(*timeout_secs)),
                    *force,
                )
                .await
            }
            // A recovery plan's script runs on any agent of its site.
            (
                _,
                siterec_core::wire::TaskWork::RunScript {
                    path,
                    timeout_secs,
                    env,
                },
            ) => {
                script::run(
                    &data,
                    &scripts_dir,
                    &task.id,
                    path,
                    Duration::from_secs(u64::from(*timeout_secs)),
                    env,
                )
                .await
            }
            (Some(t), _) => t.run_task(&task.work).await,
            (None, _) => Err(anyhow::anyhow!(
                "this agent has no replica store (no [target] section in its config)"
            )),
        };
        let body = match result {
            Ok(output) => TaskResult {
                ok: true,
                error: None,
                output,
            },
            Err(e) => {
                tracing::warn!(task = %task.id, "task failed: {e:#}");
                TaskResult {
                    ok: false,
                    error: Some(format!("{e:#}")),
                    output: serde_json::Value::Null,
                }
            }
        };
        // Post the result until the vault has it.
        for attempt in 0..60u32 {
            match client.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() || r.status().is_client_error() => break,
                Ok(r) => tracing::warn!(task = %task.id, "posting the result: {}", r.status()),
                Err(e) => tracing::warn!(task = %task.id, "posting the result: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt.min(10) + 1))).await;
        }
        if let Ok(mut f) = finished.lock() {
            f.insert(task.id.clone());
        }
        if let Ok(mut r) = running.lock() {
            r.remove(&task.id);
        }
    });
}

/// Target role: looks for offline initial copies to import, one import per
/// item at a time (each heartbeat checks again until the item's initial
/// replication is over).
fn start_imports(
    target: &Arc<target::Target>,
    imports: &std::collections::BTreeMap<String, String>,
    importing: &Arc<Mutex<HashSet<String>>>,
) {
    for (item, path) in imports {
        let Ok(mut running) = importing.lock() else {
            return;
        };
        if !running.insert(item.clone()) {
            continue;
        }
        let (t, item, path, importing) = (
            target.clone(),
            item.clone(),
            std::path::PathBuf::from(path),
            importing.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = t.import_offline(&item, &path).await {
                tracing::warn!(item = %item, path = %path.display(), "importing the offline initial copy: {e:#}");
            }
            if let Ok(mut running) = importing.lock() {
                running.remove(&item);
            }
        });
    }
}
