//! What the agent API reads and writes: registration keys and enrolled
//! agents, the inventory a heartbeat reports (clouds, machines, networks),
//! the work an agent is given, task results and recovery point reports.

use sqlx::Row;

use crate::db::Db;
use crate::persist::jobs::Tx;
use siterec_core::retention::PointAge;
use siterec_core::wire::HeartbeatRequest;

/// The fabric an enrolled agent belongs to; `None`: not enrolled here.
pub async fn agent_fabric(db: &Db, agent: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT fabric FROM agents WHERE id = $1")
        .bind(agent)
        .fetch_optional(db)
        .await
}

/// A registration key as stored (its secret only as a hash).
pub struct KeyRow {
    pub fabric: String,
    pub secret_hash: String,
    pub expires_ms: i64,
    pub revoked_ms: Option<i64>,
}

pub async fn registration_key(db: &Db, key_id: &str) -> Result<Option<KeyRow>, sqlx::Error> {
    let row: Option<(String, String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT fabric, secret_hash, expires_ms, revoked_ms FROM registration_keys WHERE key_id = $1",
    )
    .bind(key_id)
    .fetch_optional(db)
    .await?;
    Ok(
        row.map(|(fabric, secret_hash, expires_ms, revoked_ms)| KeyRow {
            fabric,
            secret_hash,
            expires_ms,
            revoked_ms,
        }),
    )
}

/// An agent enrolled with a registration key.
pub struct NewAgent<'a> {
    pub id: &'a str,
    pub fabric: &'a str,
    pub hostname: &'a str,
    pub key_id: &'a str,
    pub version: &'a str,
}

pub async fn insert_agent(db: &Db, a: &NewAgent<'_>, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agents (id, fabric, hostname, key_id, version, enrolled_ms, last_seen_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(a.id)
    .bind(a.fabric)
    .bind(a.hostname)
    .bind(a.key_id)
    .bind(a.version)
    .bind(now)
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

/// A heartbeat to record.
pub struct Heartbeat<'a> {
    pub agent: &'a str,
    pub fabric: &'a str,
    pub req: &'a HeartbeatRequest,
    /// Each reported machine's report as stored, in the request's order.
    pub infos: &'a [String],
    /// The agent's counters as stored.
    pub counters: &'a str,
    /// The networks to record (those with valid names).
    pub networks: &'a [&'a String],
    /// The machines are as this agent's last recorded heartbeat reported
    /// them: they are not written again.
    pub machines_unchanged: bool,
}

/// Records a heartbeat in one transaction: the agent is seen, its cloud
/// exists, its machines are exactly the ones reported, and so are its
/// networks. `false`, and nothing written, when the agent is no longer
/// registered (unregistered since its certificate was checked).
pub async fn record_heartbeat(db: &Db, h: &Heartbeat<'_>, now: i64) -> Result<bool, sqlx::Error> {
    let Heartbeat {
        agent,
        fabric,
        req,
        infos,
        counters,
        networks,
        machines_unchanged,
    } = *h;
    let mut tx = crate::db::begin(db).await?;
    let seen = sqlx::query(
        "UPDATE agents SET last_seen_ms = $1, cloud = $2, data_url = $3, store_encrypted = $4, store_key_id = $5, transport_key = $6, counters = $7, heartbeat_ms = $9 WHERE id = $8",
    )
    .bind(now)
    .bind(&req.cloud)
    .bind(&req.data_url)
    .bind(i64::from(req.store_encrypted))
    .bind(&req.store_key_id)
    .bind(&req.transport_key)
    .bind(counters)
    .bind(agent)
    .bind(i64::from(req.wait_ms))
    .execute(&mut **tx)
    .await?;
    if seen.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO containers (fabric, name, created_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(fabric)
    .bind(&req.cloud)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    // The cloud as first spelled (names compare ignoring case).
    let cloud: String =
        sqlx::query_scalar("SELECT name FROM containers WHERE fabric = $1 AND name = $2")
            .bind(fabric)
            .bind(&req.cloud)
            .fetch_one(&mut **tx)
            .await?;
    let mut reported = Vec::new();
    let machines = if machines_unchanged {
        &[][..]
    } else {
        &req.machines[..]
    };
    for (m, info) in machines.iter().zip(infos) {
        sqlx::query(
            "INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (fabric, name) DO UPDATE SET container = excluded.container, agent_id = excluded.agent_id, info = excluded.info, updated_ms = excluded.updated_ms
             WHERE machines.container <> excluded.container OR machines.agent_id <> excluded.agent_id OR machines.info <> excluded.info",
        )
        .bind(fabric)
        .bind(&cloud)
        .bind(&m.name)
        .bind(agent)
        .bind(info)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        reported.push(m.name.to_ascii_lowercase());
    }
    let mine: Vec<String> = if machines_unchanged {
        Vec::new()
    } else {
        sqlx::query_scalar("SELECT name FROM machines WHERE agent_id = $1")
            .bind(agent)
            .fetch_all(&mut **tx)
            .await?
    };
    for name in mine {
        if !reported.contains(&name.to_ascii_lowercase()) {
            sqlx::query("DELETE FROM machines WHERE agent_id = $1 AND name = $2")
                .bind(agent)
                .bind(&name)
                .execute(&mut **tx)
                .await?;
        }
    }
    // The host's VM networks: exactly what this heartbeat reports.
    sqlx::query("DELETE FROM networks WHERE agent_id = $1")
        .bind(agent)
        .execute(&mut **tx)
        .await?;
    for n in networks {
        sqlx::query(
            "INSERT INTO networks (fabric, name, agent_id, updated_ms) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(fabric)
        .bind(*n)
        .bind(agent)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// The agent's pending tasks, oldest first: (id, work as stored).
pub async fn pending_tasks(db: &Db, agent: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, work FROM agent_tasks WHERE agent_id = $1 AND state = 'Pending' ORDER BY created_ms",
    )
    .bind(agent)
    .fetch_all(db)
    .await
}

/// The items a recovery agent keeps: (item, state, policy).
pub async fn target_items(
    db: &Db,
    agent: &str,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT name, state, policy FROM protected_items WHERE target_agent_id = $1")
        .bind(agent)
        .fetch_all(db)
        .await
}

/// The items `agent` keeps the replica of, with their source agents:
/// (item, state, source agent). The recovery agent of items running at
/// their primary site, the primary agent of items running at the recovery
/// site (replicated back by reprotect).
pub async fn target_sources(
    db: &Db,
    agent: &str,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.name, i.state, m.agent_id FROM protected_items i JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
           WHERE i.target_agent_id = $1 AND i.active_location = 'Primary'
         UNION ALL
         SELECT i.name, i.state, i.target_agent_id FROM protected_items i JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
           WHERE m.agent_id = $1 AND i.active_location = 'Recovery' AND i.target_agent_id IS NOT NULL",
    )
    .bind(agent)
    .fetch_all(db)
    .await
}

/// The machines `agent` hosts whose items have failed over or are failing
/// over: they run (or are being brought up) at the recovery site, or are
/// being shut down for a planned failover.
pub async fn fenced_machines(db: &Db, agent: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT m.name FROM protected_items i JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
         WHERE m.agent_id = $1 AND (i.active_location = 'Recovery' OR i.state IN ('UnplannedFailoverInProgress', 'PlannedFailoverInProgress'))
         ORDER BY m.name",
    )
    .bind(agent)
    .fetch_all(db)
    .await
}

/// An item whose machine a source agent hosts, with its recovery agent.
pub struct SourceItem {
    pub name: String,
    pub machine: String,
    pub state: String,
    pub policy: String,
    pub group: Option<String>,
    /// The machine's report as stored.
    pub info: String,
    pub target_id: String,
    pub target_url: Option<String>,
    /// The running planned failover job waiting for the item's final point
    /// (once its source is shut down: a point taken before would miss the
    /// last writes).
    pub final_job: Option<String>,
    /// The item runs at the recovery site and `agent` is its recovery
    /// agent: it replicates the failover disks back to the primary agent.
    pub reverse: bool,
    /// The item's replication epoch (`replication_epoch`).
    pub epoch: Option<String>,
    /// The item's failover disks as the failover recorded them (JSON).
    pub failover_output: Option<String>,
}

/// The items whose machines `agent` of `fabric` hosts and that have a
/// recovery agent.
pub async fn source_items(
    db: &Db,
    agent: &str,
    fabric: &str,
) -> Result<Vec<SourceItem>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT i.name, i.machine, i.state, i.policy, i.multi_vm_group, m.info, a.id AS target_id, a.data_url,
           (SELECT j.id FROM jobs j WHERE j.kind = 'PlannedFailover' AND j.target_name = i.name
              AND j.state IN ('NotStarted', 'InProgress')
              AND NOT EXISTS (SELECT 1 FROM job_steps s WHERE s.job_id = j.id AND s.step = 'ShutDownSource' AND s.state <> 'Succeeded')
              ORDER BY j.created_ms DESC LIMIT 1) AS final_job,
           0 AS reverse, i.replication_epoch, i.failover_output
         FROM protected_items i
         JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
         JOIN agents a ON a.id = i.target_agent_id
         WHERE m.agent_id = $1 AND i.fabric = $2 AND i.active_location = 'Primary'
         UNION ALL
         SELECT i.name, i.machine, i.state, i.policy, i.multi_vm_group, m.info, a.id AS target_id, a.data_url,
           (SELECT j.id FROM jobs j WHERE j.kind = 'PlannedFailover' AND j.target_name = i.name
              AND j.state IN ('NotStarted', 'InProgress')
              AND NOT EXISTS (SELECT 1 FROM job_steps s WHERE s.job_id = j.id AND s.step = 'ShutDownSource' AND s.state <> 'Succeeded')
              ORDER BY j.created_ms DESC LIMIT 1) AS final_job,
           1 AS reverse, i.replication_epoch, i.failover_output
         FROM protected_items i
         JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
         JOIN agents a ON a.id = m.agent_id
         WHERE i.target_agent_id = $1 AND i.target_fabric = $2 AND i.active_location = 'Recovery'",
    )
    .bind(agent)
    .bind(fabric)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(SourceItem {
                name: row.try_get("name")?,
                machine: row.try_get("machine")?,
                state: row.try_get("state")?,
                policy: row.try_get("policy")?,
                group: row.try_get("multi_vm_group")?,
                info: row.try_get("info")?,
                target_id: row.try_get("target_id")?,
                target_url: row.try_get("data_url")?,
                final_job: row.try_get("final_job")?,
                reverse: row.try_get::<i64, _>("reverse")? != 0,
                epoch: row.try_get("replication_epoch")?,
                failover_output: row.try_get("failover_output")?,
            })
        })
        .collect()
}

/// What recording a task result did.
#[derive(Debug, PartialEq, Eq)]
pub enum TaskRecorded {
    Recorded,
    /// The task had a result already (the agent retried): the first counts.
    AlreadyAnswered,
    /// No task of that id for this agent.
    Unknown,
}

pub async fn record_task_result(
    db: &Db,
    task: &str,
    agent: &str,
    state: &str,
    result: &str,
    now: i64,
) -> Result<TaskRecorded, sqlx::Error> {
    let n = sqlx::query("UPDATE agent_tasks SET state = $1, result = $2, updated_ms = $3 WHERE id = $4 AND agent_id = $5 AND state = 'Pending'")
        .bind(state)
        .bind(result)
        .bind(now)
        .bind(task)
        .bind(agent)
        .execute(db)
        .await?
        .rows_affected();
    if n > 0 {
        return Ok(TaskRecorded::Recorded);
    }
    let exists: Option<String> =
        sqlx::query_scalar("SELECT state FROM agent_tasks WHERE id = $1 AND agent_id = $2")
            .bind(task)
            .bind(agent)
            .fetch_optional(db)
            .await?;
    Ok(match exists {
        Some(_) => TaskRecorded::AlreadyAnswered,
        None => TaskRecorded::Unknown,
    })
}

/// A protected item as a source agent's point report finds it.
pub struct ReportedItem {
    pub state: String,
    pub policy: String,
    /// As stored (the report may spell it otherwise).
    pub name: String,
    /// The agent whose store holds the point.
    pub target: Option<String>,
    /// That agent's site ('Recovery', or 'Primary' when the item runs at
    /// the recovery site and replicates back).
    pub site: String,
    pub epoch: Option<String>,
}

/// The item `item` of `fabric` whose machine `agent` hosts.
pub async fn reported_item(
    db: &Db,
    item: &str,
    fabric: &str,
    agent: &str,
) -> Result<Option<ReportedItem>, sqlx::Error> {
    // Only the agent where the machine runs replicates it: an old primary
    // reporting a point of a failed-over item is not heard.
    type Row = (
        String,
        String,
        String,
        Option<String>,
        String,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT i.state, i.policy, i.name, i.target_agent_id, 'Recovery', i.replication_epoch FROM protected_items i JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
         WHERE i.name = $1 AND i.fabric = $2 AND m.agent_id = $3 AND i.active_location = 'Primary'
         UNION ALL
         SELECT i.state, i.policy, i.name, m.agent_id, 'Primary', i.replication_epoch FROM protected_items i JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
         WHERE i.name = $1 AND i.target_fabric = $2 AND i.target_agent_id = $3 AND i.active_location = 'Recovery'",
    )
    .bind(item)
    .bind(fabric)
    .bind(agent)
    .fetch_optional(db)
    .await?;
    Ok(
        row.map(|(state, policy, name, target, site, epoch)| ReportedItem {
            state,
            policy,
            name,
            target,
            site,
            epoch,
        }),
    )
}

/// A recovery point as reported (a repeat of a listed point changes nothing).
pub struct NewPoint<'a> {
    pub item: &'a str,
    pub point_id: &'a str,
    pub created_ms: i64,
    pub consistency: &'a str,
    pub bytes_sent: i64,
    pub bytes_read: i64,
    /// The planned failover job this is the final point of.
    pub final_for: Option<&'a str>,
    /// The site whose store holds it.
    pub site: &'a str,
    pub epoch: Option<&'a str>,
}

pub async fn insert_point(tx: &mut Tx<'_>, p: &NewPoint<'_>, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms, final_for, site, epoch) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
    )
    .bind(p.item)
    .bind(p.point_id)
    .bind(p.created_ms)
    .bind(p.consistency)
    .bind(p.bytes_sent)
    .bind(p.bytes_read)
    .bind(now)
    .bind(p.final_for)
    .bind(p.site)
    .bind(p.epoch)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The item's listed (not pruned) points in the store at `site`.
pub async fn listed_points(
    tx: &mut Tx<'_>,
    item: &str,
    site: &str,
) -> Result<Vec<PointAge>, sqlx::Error> {
    let points: Vec<(String, i64)> = sqlx::query_as(
        "SELECT point_id, created_ms FROM recovery_points WHERE item = $1 AND site = $2 AND pruned_ms IS NULL",
    )
    .bind(item)
    .bind(site)
    .fetch_all(&mut **tx)
    .await?;
    Ok(points
        .into_iter()
        .map(|(id, created_at_ms)| PointAge { id, created_at_ms })
        .collect())
}

/// The point a test failover of the item is creating its VM from, while
/// it does.
pub async fn held_test_point(tx: &mut Tx<'_>, item: &str) -> Result<Option<String>, sqlx::Error> {
    let held: Option<Option<String>> = sqlx::query_scalar(
        "SELECT test_failover_point_id FROM protected_items WHERE name = $1 AND test_failover_state = 'TestFailoverInitiated'",
    )
    .bind(item)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(held.flatten())
}

/// Hides the points from every list (the target deletes them after).
pub async fn hide_points(
    tx: &mut Tx<'_>,
    item: &str,
    points: &[String],
    now: i64,
) -> Result<(), sqlx::Error> {
    for id in points {
        sqlx::query("UPDATE recovery_points SET pruned_ms = $1 WHERE item = $2 AND point_id = $3")
            .bind(now)
            .bind(item)
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}
