//! What the sites report and what lets clients in: fabrics, enrolled
//! agents, clouds (protection containers), machines, networks, API tokens
//! and registration keys.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::Db;
use crate::persist::jobs::Tx;

/// An agent is "connected" when heard from within this many milliseconds.
pub const AGENT_ONLINE_MS: i64 = 60_000;

/// Some executor of the `Any` driver: the pool or a transaction.
pub trait Exec<'e>: sqlx::Executor<'e, Database = sqlx::Any> {}
impl<'e, T: sqlx::Executor<'e, Database = sqlx::Any>> Exec<'e> for T {}

/// The vault's own identity (its ARM id's parts), once written.
pub async fn vault(db: &Db) -> Result<Option<crate::VaultInfo>, sqlx::Error> {
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT subscription, resource_group, name, location FROM vault WHERE id = 1",
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(
        |(subscription, resource_group, name, location)| crate::VaultInfo {
            subscription,
            resource_group,
            name,
            location,
        },
    ))
}

pub async fn insert_vault(db: &Db, v: &crate::VaultInfo, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO vault (id, subscription, resource_group, name, location, created_ms) VALUES (1, $1, $2, $3, $4, $5)")
        .bind(&v.subscription)
        .bind(&v.resource_group)
        .bind(&v.name)
        .bind(&v.location)
        .bind(now)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn token_count(db: &Db) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM api_tokens")
        .fetch_one(db)
        .await
}

pub async fn insert_token(
    db: &Db,
    name: &str,
    token_hash: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO api_tokens (token_hash, name, created_ms) VALUES ($1, $2, $3)")
        .bind(token_hash)
        .bind(name)
        .bind(now)
        .execute(db)
        .await?;
    Ok(())
}

/// The name of the API token with this hash, if one has it.
pub async fn token_name(db: &Db, token_hash: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM api_tokens WHERE token_hash = $1")
        .bind(token_hash)
        .fetch_optional(db)
        .await
}

// ---------- fabrics ----------

/// Every fabric, by name.
pub async fn fabric_names(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM fabrics ORDER BY name")
        .fetch_all(db)
        .await
}

/// The fabric as first spelled (names compare ignoring case).
pub async fn fabric<'e>(db: impl Exec<'e>, name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM fabrics WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await
}

/// Creates the fabric unless it exists.
pub async fn ensure_fabric<'e>(db: impl Exec<'e>, name: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO fabrics (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

// ---------- agents ----------

/// An enrolled agent, as its fabric's provider shows it.
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub id: String,
    pub fabric: String,
    pub hostname: String,
    pub version: String,
    pub last_seen_ms: Option<i64>,
    pub cloud: Option<String>,
    pub data_url: Option<String>,
    /// Its counters per item, as stored.
    pub counters: String,
}

impl AgentRow {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(AgentRow {
            id: row.try_get("id")?,
            fabric: row.try_get("fabric")?,
            hostname: row.try_get("hostname")?,
            version: row.try_get("version")?,
            last_seen_ms: row.try_get("last_seen_ms")?,
            cloud: row.try_get("cloud")?,
            data_url: row.try_get("data_url")?,
            counters: row.try_get("counters")?,
        })
    }
}

/// The agents of a fabric, in enrolment order.
pub async fn agents_of_fabric(db: &Db, fabric: &str) -> Result<Vec<AgentRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, fabric, hostname, version, last_seen_ms, cloud, data_url, counters FROM agents WHERE fabric = $1 ORDER BY enrolled_ms",
    )
    .bind(fabric)
    .fetch_all(db)
    .await?;
    rows.iter().map(AgentRow::from_row).collect()
}

/// How many agents a fabric has.
pub async fn agent_count(db: &Db, fabric: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM agents WHERE fabric = $1")
        .bind(fabric)
        .fetch_one(db)
        .await
}

/// How many agents of the cloud have a replica store and were heard from
/// after `since_ms`.
pub async fn online_stores(
    db: &Db,
    fabric: &str,
    cloud: &str,
    since_ms: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM agents WHERE fabric = $1 AND cloud = $2 AND data_url IS NOT NULL AND last_seen_ms > $3",
    )
    .bind(fabric)
    .bind(cloud)
    .bind(since_ms)
    .fetch_one(db)
    .await
}

/// How many agents of the cloud have an encrypted replica store.
pub async fn encrypted_stores(db: &Db, fabric: &str, cloud: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM agents WHERE fabric = $1 AND cloud = $2 AND data_url IS NOT NULL AND store_encrypted = 1",
    )
    .bind(fabric)
    .bind(cloud)
    .fetch_one(db)
    .await
}

/// The agents of a fabric that have a replica store, by id.
pub async fn store_agents(db: &Db, fabric: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM agents WHERE fabric = $1 AND data_url IS NOT NULL ORDER BY id",
    )
    .bind(fabric)
    .fetch_all(db)
    .await
}

pub async fn agent_hostname(tx: &mut Tx<'_>, agent: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT hostname FROM agents WHERE id = $1")
        .bind(agent)
        .fetch_optional(&mut **tx)
        .await
}

/// An agent's replica store keys: whether it encrypts, its recovery key
/// id, and the agent's transport public key.
pub struct StoreKeys {
    pub encrypted: bool,
    pub key_id: Option<String>,
    pub transport_key: Option<String>,
}

pub async fn store_keys(db: &Db, agent: &str) -> Result<Option<StoreKeys>, sqlx::Error> {
    let row: Option<(i64, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT store_encrypted, store_key_id, transport_key FROM agents WHERE id = $1",
    )
    .bind(agent)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(encrypted, key_id, transport_key)| StoreKeys {
        encrypted: encrypted != 0,
        key_id,
        transport_key,
    }))
}

// ---------- clouds, machines, networks ----------

/// The clouds of a fabric, by name.
pub async fn container_names(db: &Db, fabric: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM containers WHERE fabric = $1 ORDER BY name")
        .bind(fabric)
        .fetch_all(db)
        .await
}

/// The cloud as first spelled.
pub async fn container(db: &Db, fabric: &str, name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM containers WHERE fabric = $1 AND name = $2")
        .bind(fabric)
        .bind(name)
        .fetch_optional(db)
        .await
}

/// A cloud's pairing, as primary or recovery: its (fabric, cloud) primary.
pub async fn container_pairing(
    db: &Db,
    fabric: &str,
    name: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT fabric, container FROM container_mappings WHERE (fabric = $1 AND container = $2) OR (target_fabric = $3 AND target_container = $4) LIMIT 1",
    )
    .bind(fabric)
    .bind(name)
    .bind(fabric)
    .bind(name)
    .fetch_optional(db)
    .await
}

/// A machine as reported: its name, report (as stored) and agent.
pub struct MachineRow {
    pub name: String,
    pub info: String,
    pub agent_id: String,
}

/// The machines of a cloud, by name.
pub async fn machines_of_cloud(
    db: &Db,
    fabric: &str,
    container: &str,
) -> Result<Vec<MachineRow>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT name, info, agent_id FROM machines WHERE fabric = $1 AND container = $2 ORDER BY name",
    )
    .bind(fabric)
    .bind(container)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, info, agent_id)| MachineRow {
            name,
            info,
            agent_id,
        })
        .collect())
}

/// A machine of a cloud.
pub async fn machine_of_cloud(
    db: &Db,
    fabric: &str,
    container: &str,
    name: &str,
) -> Result<Option<MachineRow>, sqlx::Error> {
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT name, info, agent_id FROM machines WHERE fabric = $1 AND container = $2 AND name = $3",
    )
    .bind(fabric)
    .bind(container)
    .bind(name)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(name, info, agent_id)| MachineRow {
        name,
        info,
        agent_id,
    }))
}

/// A machine's report as stored.
pub async fn machine_info(
    db: &Db,
    fabric: &str,
    machine: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT info FROM machines WHERE fabric = $1 AND name = $2")
        .bind(fabric)
        .bind(machine)
        .fetch_optional(db)
        .await
}

/// The agents of `fabric` that report network `name`, by id.
pub async fn network_agents(db: &Db, fabric: &str, name: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT agent_id FROM networks WHERE fabric = $1 AND name = $2 ORDER BY agent_id",
    )
    .bind(fabric)
    .bind(name)
    .fetch_all(db)
    .await
}

/// The networks of a fabric, each once per spelling its agents use.
pub async fn fabric_networks(db: &Db, fabric: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT DISTINCT name FROM networks WHERE fabric = $1")
        .bind(fabric)
        .fetch_all(db)
        .await
}

/// The network as an agent of the fabric spells it.
pub async fn network(db: &Db, fabric: &str, name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM networks WHERE fabric = $1 AND name = $2 LIMIT 1")
        .bind(fabric)
        .bind(name)
        .fetch_optional(db)
        .await
}

/// The networks an agent's host has, by name.
pub async fn agent_networks(db: &Db, agent: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM networks WHERE agent_id = $1 ORDER BY name")
        .bind(agent)
        .fetch_all(db)
        .await
}

// ---------- registration keys ----------

/// A registration key as listed.
pub struct KeyListRow {
    pub key_id: String,
    pub fabric: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub revoked_ms: Option<i64>,
}

pub async fn registration_keys(db: &Db) -> Result<Vec<KeyListRow>, sqlx::Error> {
    let rows: Vec<(String, String, i64, i64, Option<i64>)> = sqlx::query_as(
        "SELECT key_id, fabric, created_ms, expires_ms, revoked_ms FROM registration_keys ORDER BY created_ms",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(key_id, fabric, created_ms, expires_ms, revoked_ms)| KeyListRow {
                key_id,
                fabric,
                created_ms,
                expires_ms,
                revoked_ms,
            },
        )
        .collect())
}

/// Revokes the key (a revoked key stays revoked at its first time);
/// `false` if there is no such key.
pub async fn revoke_key(db: &Db, key_id: &str, now: i64) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE registration_keys SET revoked_ms = COALESCE(revoked_ms, $1) WHERE key_id = $2",
    )
    .bind(now)
    .bind(key_id)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// A new registration key (its secret only as a hash).
pub struct NewKey<'a> {
    pub key_id: &'a str,
    pub fabric: &'a str,
    pub secret_hash: &'a str,
    pub created_ms: i64,
    pub expires_ms: i64,
}

pub async fn insert_key(tx: &mut Tx<'_>, k: &NewKey<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO registration_keys (key_id, fabric, secret_hash, created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5)")
        .bind(k.key_id)
        .bind(k.fabric)
        .bind(k.secret_hash)
        .bind(k.created_ms)
        .bind(k.expires_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// These machines of a fabric: (fabric, name, agent, report as stored).
pub async fn machines_named(
    db: &Db,
    fabric: &str,
    names: &[&str],
) -> Result<Vec<(String, String, String, String)>, sqlx::Error> {
    let sql = format!(
        "SELECT fabric, name, agent_id, info FROM machines WHERE fabric = $1 AND name IN ({})",
        super::placeholders(2, names.len())
    );
    let mut q = sqlx::query_as::<_, (String, String, String, String)>(sqlx::AssertSqlSafe(sql))
        .bind(fabric);
    for m in names {
        q = q.bind(*m);
    }
    q.fetch_all(db).await
}

/// These agents' counters as stored: (id, counters).
pub async fn agent_counters(
    db: &Db,
    agents: &[&str],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let sql = format!(
        "SELECT id, counters FROM agents WHERE id IN ({})",
        super::placeholders(1, agents.len())
    );
    let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql));
    for a in agents {
        q = q.bind(*a);
    }
    q.fetch_all(db).await
}

// ---------- taking things apart ----------

/// The agent of a fabric, as stored (its id as enrolled).
pub async fn agent_of_fabric(
    tx: &mut Tx<'_>,
    fabric: &str,
    agent: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM agents WHERE fabric = $1 AND id = $2")
        .bind(fabric)
        .bind(agent)
        .fetch_optional(&mut **tx)
        .await
}

/// The protected items that need the agent, by name: those of machines it
/// reports, and those whose replicas it keeps.
pub async fn agent_items(tx: &mut Tx<'_>, agent: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT p.name FROM protected_items p WHERE p.target_agent_id = $1 OR EXISTS (SELECT 1 FROM machines m WHERE m.fabric = p.fabric AND m.name = p.machine AND m.agent_id = $2) ORDER BY p.name",
    )
    .bind(agent)
    .bind(agent)
    .fetch_all(&mut **tx)
    .await
}

/// Forgets an agent: its row (its certificate is no longer accepted), the
/// machines and networks it reported and its tasks.
pub async fn remove_agent(tx: &mut Tx<'_>, agent: &str) -> Result<(), sqlx::Error> {
    for sql in [
        "DELETE FROM machines WHERE agent_id = $1",
        "DELETE FROM networks WHERE agent_id = $1",
        "DELETE FROM agent_tasks WHERE agent_id = $1",
        "DELETE FROM agents WHERE id = $1",
    ] {
        sqlx::query(sql).bind(agent).execute(&mut **tx).await?;
    }
    Ok(())
}

/// What keeps a fabric from being deleted, each as a phrase naming the
/// things (e.g. "agents agent-1, agent-2"); empty when nothing does.
pub async fn fabric_uses(tx: &mut Tx<'_>, fabric: &str) -> Result<Vec<String>, sqlx::Error> {
    let mut out = Vec::new();
    for (what, sql, binds) in [
        (
            "agents",
            "SELECT id FROM agents WHERE fabric = $1 ORDER BY enrolled_ms",
            1,
        ),
        (
            "cloud pairings",
            "SELECT name FROM container_mappings WHERE fabric = $1 OR target_fabric = $2 ORDER BY name",
            2,
        ),
        (
            "protected items",
            "SELECT name FROM protected_items WHERE fabric = $1 OR target_fabric = $2 ORDER BY name",
            2,
        ),
        (
            "network mappings",
            "SELECT name FROM network_mappings WHERE fabric = $1 OR recovery_fabric = $2 ORDER BY name",
            2,
        ),
    ] {
        let mut q = sqlx::query_scalar::<_, String>(sql).bind(fabric);
        if binds == 2 {
            q = q.bind(fabric);
        }
        let names = q.fetch_all(&mut **tx).await?;
        if !names.is_empty() {
            out.push(format!("{what} {}", names.join(", ")));
        }
    }
    Ok(out)
}

/// Deletes a fabric that nothing uses: its clouds, what its agents
/// reported, and its registration keys (revoked: no agent enrols with them
/// into a fabric made again).
pub async fn remove_fabric(tx: &mut Tx<'_>, fabric: &str, now: i64) -> Result<(), sqlx::Error> {
    for sql in [
        "DELETE FROM containers WHERE fabric = $1",
        "DELETE FROM machines WHERE fabric = $1",
        "DELETE FROM networks WHERE fabric = $1",
        "DELETE FROM fabrics WHERE name = $1",
    ] {
        sqlx::query(sql).bind(fabric).execute(&mut **tx).await?;
    }
    sqlx::query(
        "UPDATE registration_keys SET revoked_ms = $1 WHERE fabric = $2 AND revoked_ms IS NULL",
    )
    .bind(now)
    .bind(fabric)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
