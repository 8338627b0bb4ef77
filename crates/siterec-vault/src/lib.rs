//! The vault: siterec's control plane.
//!
//! - [`arm`]: the Site Recovery Resource Manager API (a compatible subset),
//!   served over HTTP with a bearer token; the CLI uses only this.
//! - [`agent_api`]: enrolment and the agents' work channel, over TLS with
//!   certificates issued by the vault's CA. Agents always connect to the
//!   vault; the vault never connects to them.
//! - [`jobs`]: the durable job engine. Every state change is a job whose
//!   steps are rows in the database; a restarted vault resumes them.
//! - [`events`]: the watcher that raises events (RPO over threshold, a
//!   server not heard from, health changes, stale test failovers) and the
//!   webhook sender.
//! - [`persist`]: persistence — the SQL the vault runs, per area, on either engine.
//! - [`db`]: the database (SQLite or PostgreSQL) and its migrations.

pub mod agent_api;
pub mod arm;
pub mod db;
pub mod error;
pub mod events;
pub mod jobs;
pub mod model;
pub mod persist;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

pub use db::Db;

/// How to run a vault.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    pub data_dir: PathBuf,
    /// The ARM API (plain HTTP; put a TLS proxy in front for remote clients).
    pub listen: SocketAddr,
    /// The agent API (TLS, vault CA).
    pub agent_listen: SocketAddr,
    /// Vault resource name, used on first start only.
    pub name: String,
    /// A PostgreSQL URL for the database; `None`: SQLite, `DATA/vault.db`.
    pub database: Option<String>,
    /// Events and alerts: how old a completed test failover may get.
    pub events: events::EventOptions,
}

/// Identity of the one vault resource this process serves.
#[derive(Debug, Clone)]
pub struct VaultInfo {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
}

impl VaultInfo {
    pub fn id(&self) -> String {
        siterec_core::names::vault_id(&self.subscription, &self.resource_group, &self.name)
    }
}

/// Written to `DATA/vault.json` once the vault listens: how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultEndpoint {
    pub url: String,
    pub agent_url: String,
    pub vault_id: String,
    pub token_file: PathBuf,
}

/// Shared state of the vault's servers and job engine.
pub struct AppState {
    pub db: Db,
    pub info: VaultInfo,
    /// Signs agents' certificates (client certificates for the agent API,
    /// both ends of source-to-target connections).
    pub agent_ca: siterec_pki::Ca,
    /// Signs only the vault's own server certificate; its certificate is in
    /// registration key files.
    pub vault_ca: siterec_pki::Ca,
    pub agent_url: String,
    /// Wakes the job engine when something it waits for may have happened.
    pub wake: Notify,
    /// Counts the job engine's passes that may have changed what agents
    /// are told: a heartbeat that waits for a change returns when it moves.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Per agent: a digest of the inventory its last recorded heartbeat
    /// reported, and when. A heartbeat reporting the same machines within a
    /// minute does not write them again (an agent heartbeats each time the
    /// engine moves, many times a second while a plan runs).
    pub reported: std::sync::Mutex<std::collections::HashMap<String, (blake3::Hash, i64)>>,
}

pub type Shared = Arc<AppState>;

/// A vault that is up and serving.
pub struct RunningVault {
    pub endpoint: VaultEndpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<Notify>,
}

impl RunningVault {
    /// Stops serving and waits for the servers to close.
    pub async fn shutdown(self) {
        self.stop.notify_waiters();
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Opens (or creates) the vault in `opts.data_dir`, binds its listeners and
/// starts serving in the background.
pub async fn start(opts: VaultOptions) -> anyhow::Result<RunningVault> {
    siterec_pki::install_crypto_provider();
    std::fs::create_dir_all(&opts.data_dir).with_context(|| {
        format!(
            "creating the vault data directory {}",
            opts.data_dir.display()
        )
    })?;
    let sqlite_path = opts.data_dir.join("vault.db");
    let db = db::open_at(match &opts.database {
        Some(url) => db::Location::Url(url),
        None => db::Location::Sqlite(&sqlite_path),
    })
    .await?;
    let info = init_vault(&db, &opts.name).await?;
    let token_file = opts.data_dir.join("admin.token");
    init_admin_token(&db, &token_file).await?;
    let vault_ca = load_or_create_ca(
        &opts.data_dir.join("ca"),
        &format!("siterec vault {} CA", info.name),
    )?;
    let agent_ca = load_or_create_ca(
        &opts.data_dir.join("agent-ca"),
        &format!("siterec vault {} agent CA", info.name),
    )?;

    let arm_listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| {
            format!(
                "binding the API address {} (is another vault running?)",
                opts.listen
            )
        })?;
    let agent_listener = tokio::net::TcpListener::bind(opts.agent_listen)
        .await
        .with_context(|| format!("binding the agent API address {}", opts.agent_listen))?;
    let arm_addr = arm_listener.local_addr()?;
    let agent_addr = agent_listener.local_addr()?;
    let mut names = vec!["localhost".to_string(), agent_addr.ip().to_string()];
    if agent_addr.ip().is_unspecified() {
        names.push("127.0.0.1".into());
    }
    let (cert, key) = vault_ca.issue_server_cert(&names)?;
    let tls = siterec_pki::server_config(
        &cert,
        &key,
        Some(agent_ca.cert_pem()),
        siterec_pki::ClientAuth::Optional,
    )?;
    let host = |a: SocketAddr| {
        if a.ip().is_unspecified() {
            format!("127.0.0.1:{}", a.port())
        } else {
            a.to_string()
        }
    };
    let agent_url = format!("https://{}", host(agent_addr));
    let endpoint = VaultEndpoint {
        url: format!("http://{}", host(arm_addr)),
        agent_url: agent_url.clone(),
        vault_id: info.id(),
        token_file: token_file.clone(),
    };

    let state: Shared = Arc::new(AppState {
        db,
        info,
        agent_ca,
        vault_ca,
        agent_url,
        wake: Notify::new(),
        changes: tokio::sync::watch::channel(1).0,
        reported: Default::default(),
    });
    let stop = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    {
        let stop = stop.clone();
        let router = arm::router(state.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) =
                siterec_pki::serve(
                    arm_listener,
                    None,
                    router,
                    async move { stop.notified().await },
                )
                .await
            {
                tracing::error!("API server stopped: {e:#}");
            }
        }));
    }
    {
        let stop = stop.clone();
        let router = agent_api::router(state.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = siterec_pki::serve(agent_listener, Some(tls), router, async move {
                stop.notified().await
            })
            .await
            {
                tracing::error!("agent API server stopped: {e:#}");
            }
        }));
    }
    tasks.push(tokio::spawn(jobs::run_engine(
        state.clone(),
        arm::start_plan_item,
    )));
    tasks.push(tokio::spawn(events::run_watcher(
        state.clone(),
        opts.events.clone(),
    )));
    tasks.push(tokio::spawn(events::run_webhook(state.clone())));
    write_endpoint(&opts.data_dir, &endpoint)?;
    Ok(RunningVault {
        endpoint,
        tasks,
        stop,
    })
}

fn load_or_create_ca(dir: &Path, name: &str) -> anyhow::Result<siterec_pki::Ca> {
    if siterec_pki::Ca::exists(dir) {
        return siterec_pki::Ca::load(dir)
            .with_context(|| format!("loading the CA in {}", dir.display()));
    }
    let ca = siterec_pki::Ca::generate(name)?;
    ca.save(dir)?;
    Ok(ca)
}

fn write_endpoint(dir: &Path, endpoint: &VaultEndpoint) -> anyhow::Result<()> {
    let body = serde_json::to_vec_pretty(endpoint)?;
    Ok(siterec_pki::write_file_durable(
        &dir.join("vault.json"),
        &body,
        0o644,
    )?)
}

async fn init_vault(db: &Db, name: &str) -> anyhow::Result<VaultInfo> {
    if let Some(info) = persist::inventory::vault(db).await? {
        return Ok(info);
    }
    siterec_core::names::check_name("vault", name)?;
    let info = VaultInfo {
        subscription: uuid::Uuid::new_v4().to_string(),
        resource_group: "siterec".into(),
        name: name.to_string(),
        location: "local".into(),
    };
    persist::inventory::insert_vault(db, &info, db::now_ms()).await?;
    Ok(info)
}

async fn init_admin_token(db: &Db, token_file: &Path) -> anyhow::Result<()> {
    let count = persist::inventory::token_count(db).await?;
    if count > 0 {
        return Ok(());
    }
    let token = db::random_secret(32);
    // The file first: a crash between the two leaves a token file that does
    // not work yet, and the next start writes a new one.
    siterec_pki::write_file_durable(token_file, token.as_bytes(), 0o600)?;
    persist::inventory::insert_token(db, "admin", &db::secret_hash(&token), db::now_ms()).await?;
    Ok(())
}
