//! Recovery plans (`recovery_plans`): the plan's groups and actions as the
//! JSON of [`RecoveryPlan`], and when each failover type last ran.

use sqlx::Row;

use super::jobs::Tx;
use crate::Db;
use siterec_core::plan::{PlanOp, RecoveryPlan};

/// A stored plan.
#[derive(Debug, Clone)]
pub struct PlanRow {
    pub name: String,
    pub plan: RecoveryPlan,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub last_test_failover_ms: Option<i64>,
    pub last_planned_failover_ms: Option<i64>,
    pub last_unplanned_failover_ms: Option<i64>,
}

const COLUMNS: &str = "name, body, created_ms, updated_ms, last_test_failover_ms, last_planned_failover_ms, last_unplanned_failover_ms";

fn read(row: &sqlx::any::AnyRow) -> anyhow::Result<PlanRow> {
    let name: String = row.try_get("name")?;
    let body: String = row.try_get("body")?;
    let plan = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("recovery plan '{name}' as stored does not read: {e}"))?;
    Ok(PlanRow {
        name,
        plan,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        last_test_failover_ms: row.try_get("last_test_failover_ms")?,
        last_planned_failover_ms: row.try_get("last_planned_failover_ms")?,
        last_unplanned_failover_ms: row.try_get("last_unplanned_failover_ms")?,
    })
}

/// The plan of that name (ignoring case).
pub async fn get(tx: &mut Tx<'_>, name: &str) -> anyhow::Result<Option<PlanRow>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM recovery_plans WHERE name = $1"
    )))
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(read).transpose()
}

/// Every plan, by name.
pub async fn list(db: &Db) -> anyhow::Result<Vec<PlanRow>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM recovery_plans ORDER BY name"
    )))
    .fetch_all(db)
    .await?;
    rows.iter().map(read).collect()
}

/// Creates or replaces the plan's groups (`created`: whether it is new).
pub async fn put(
    tx: &mut Tx<'_>,
    name: &str,
    plan: &RecoveryPlan,
    now: i64,
) -> anyhow::Result<bool> {
    let body = serde_json::to_string(plan)?;
    let updated = sqlx::query(
        "UPDATE recovery_plans SET body = $1, primary_fabric = $2, recovery_fabric = $3, updated_ms = $4 WHERE name = $5",
    )
    .bind(&body)
    .bind(&plan.primary_fabric)
    .bind(&plan.recovery_fabric)
    .bind(now)
    .bind(name)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated > 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO recovery_plans (name, primary_fabric, recovery_fabric, body, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $5)",
    )
    .bind(name)
    .bind(&plan.primary_fabric)
    .bind(&plan.recovery_fabric)
    .bind(&body)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// Deletes the plan; `false` if there was none.
pub async fn delete(tx: &mut Tx<'_>, name: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM recovery_plans WHERE name = $1")
        .bind(name)
        .execute(&mut **tx)
        .await?
        .rows_affected()
        > 0)
}

/// Records that the plan's `op` ran to its end now.
pub async fn record_run(
    tx: &mut Tx<'_>,
    name: &str,
    op: PlanOp,
    now: i64,
) -> Result<(), sqlx::Error> {
    let column = match op {
        PlanOp::TestFailover => "last_test_failover_ms",
        PlanOp::PlannedFailover => "last_planned_failover_ms",
        PlanOp::UnplannedFailover => "last_unplanned_failover_ms",
        _ => return Ok(()),
    };
    // `column` is one of three names above, never input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE recovery_plans SET {column} = $1 WHERE name = $2"
    )))
    .bind(now)
    .bind(name)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The plan job not yet ended of this plan, if one runs.
pub async fn running_job(tx: &mut Tx<'_>, plan: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE target_type = 'RecoveryPlan' AND target_name = $1 AND state IN ('NotStarted', 'InProgress', 'Suspended') ORDER BY created_ms DESC LIMIT 1",
    )
    .bind(plan)
    .fetch_optional(&mut **tx)
    .await
}
