//! A fleet written at once for `siterec bench api` and tests of lists:
//! the rows the vault writes itself, many at a time.

use crate::db::Db;
use crate::error::{ApiError, ApiResult};
use serde_json::json;
use siterec_core::wire::MachineInfo;

/// Fills an empty vault database with a fleet for `siterec bench api`:
/// `agents` source agents in fabric `bench-primary`, each with
/// `items_per_agent` machines of two disks, all protected under one policy
/// to a recovery cloud, each item with `points` recovery points and the
/// counters its agent reports. Rows are what the vault writes itself;
/// this only writes many of them at once. Returns the item names.
#[doc(hidden)]
pub async fn seed_fleet(
    db: &Db,
    agents: usize,
    items_per_agent: usize,
    points: usize,
) -> ApiResult<Vec<String>> {
    let now = crate::db::now_ms();
    let policy = siterec_core::policy::Policy::from_arm_input(&json!({
        "instanceType": "HyperVReplicaAzure",
        "replicationInterval": 300,
        "recoveryPointHistoryDuration": 24
    }))
    .map_err(|e| ApiError::internal("bench policy", e))?;
    let mut tx = crate::db::begin(db).await?;
    for (fabric, cloud) in [
        ("bench-primary", "primary-cloud"),
        ("bench-recovery", "recovery-cloud"),
    ] {
        sqlx::query("INSERT INTO fabrics (name, created_ms) VALUES ($1, $2)")
            .bind(fabric)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        sqlx::query("INSERT INTO containers (fabric, name, created_ms) VALUES ($1, $2, $3)")
            .bind(fabric)
            .bind(cloud)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("INSERT INTO policies (name, body, created_ms) VALUES ('bench', $1, $2)")
        .bind(serde_json::to_string(&policy).map_err(|e| ApiError::internal("bench policy", e))?)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO container_mappings (fabric, container, name, target_fabric, target_container, policy, state, created_ms) VALUES ('bench-primary', 'primary-cloud', 'bench', 'bench-recovery', 'recovery-cloud', 'bench', 'Paired', $1)",
    )
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let mut names = Vec::with_capacity(agents * items_per_agent);
    for a in 0..agents {
        let agent_id = format!("bench-agent-{a:04}");
        let mut counters = serde_json::Map::new();
        for i in 0..items_per_agent {
            let name = format!("vm{a:04}-{i:03}");
            let info = MachineInfo {
                name: name.clone(),
                kind: siterec_core::wire::KIND_PHYSICAL.to_string(),
                disks: ["disk0", "disk1"]
                    .iter()
                    .map(|d| siterec_core::wire::DiskInfo {
                        name: d.to_string(),
                        path: format!("/dev/vg0/{name}-{d}"),
                        size_bytes: 64 << 30,
                    })
                    .collect(),
                nics: Vec::new(),
                vm: None,
                error: None,
            };
            sqlx::query(
                "INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES ('bench-primary', 'primary-cloud', $1, $2, $3, $4)",
            )
            .bind(&name)
            .bind(&agent_id)
            .bind(serde_json::to_string(&info).map_err(|e| ApiError::internal("bench machine", e))?)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            let created = now - 86_400_000 + (names.len() as i64);
            sqlx::query(
                "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, created_ms, updated_ms) VALUES ($1, 'bench-primary', 'primary-cloud', $2, 'bench', 'bench-recovery', 'recovery-cloud', 'Protected', $3, $4)",
            )
            .bind(&name)
            .bind(&name)
            .bind(created)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            for p in 0..points {
                let at = now - (points - p) as i64 * 300_000;
                sqlx::query(
                    "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms) VALUES ($1, $2, $3, 'CrashConsistent', 1048576, 4194304, $4)",
                )
                .bind(&name)
                .bind(format!("{at}-{p:02}"))
                .bind(at)
                .bind(at)
                .execute(&mut **tx)
                .await?;
            }
            counters.insert(
                name.clone(),
                json!({"bytesSent": 1_u64 << 30, "cycles": 288, "lastCycleMs": 1200, "healthWarnings": []}),
            );
            names.push(name);
        }
        sqlx::query(
            "INSERT INTO agents (id, fabric, hostname, key_id, cloud, version, counters, enrolled_ms, last_seen_ms) VALUES ($1, 'bench-primary', $2, 'bench', 'primary-cloud', 'bench', $3, $4, $5)",
        )
        .bind(&agent_id)
        .bind(format!("host{a:04}"))
        .bind(serde_json::Value::Object(counters).to_string())
        .bind(now)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    tx.commit().await?;
    // Statistics, as a database that grew to this size would have them
    // (autovacuum on PostgreSQL; SQLite plans well without).
    if crate::db::Engine::of(db) == crate::db::Engine::Postgres {
        sqlx::query("ANALYZE").execute(db).await?;
    }
    Ok(names)
}
