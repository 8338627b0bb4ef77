//! Protected items and their recovery points: the rows, the item pages,
//! and the writes the API does when an operation starts (the jobs write
//! the rest, through [`crate::persist::jobs`]).

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::Db;
use crate::persist::inventory::Exec;
use crate::persist::jobs::Tx;
use siterec_core::state::{Lifecycle, Location, ProtectionState, TestFailoverState};

/// A stored value the vault cannot have written: the row is corrupt.
fn corrupt(message: String) -> sqlx::Error {
    sqlx::Error::Decode(message.into())
}

/// A protected item as stored.
#[derive(Debug, Clone)]
pub struct ItemRow {
    pub name: String,
    pub fabric: String,
    pub container: String,
    pub machine: String,
    pub policy: String,
    pub target_fabric: String,
    pub target_container: String,
    pub target_agent_id: Option<String>,
    pub state: ProtectionState,
    /// Where the machine runs (`activeLocation`).
    pub active: Location,
    pub last_error: Option<String>,
    pub failover_point_id: Option<String>,
    pub failover_output: Option<String>,
    pub failover_ms: Option<i64>,
    pub test_state: TestFailoverState,
    pub test_output: Option<String>,
    pub test_point_id: Option<String>,
    pub test_error: Option<String>,
    pub test_ms: Option<i64>,
    /// The multi-VM consistency group (ARM `multiVmGroupName`), if any.
    pub group: Option<String>,
    pub created_ms: i64,
}

impl ItemRow {
    pub fn life(&self) -> Lifecycle {
        Lifecycle {
            state: self.state,
            active: self.active,
        }
    }

    pub fn from_row(row: &AnyRow) -> Result<ItemRow, sqlx::Error> {
        let state: String = row.try_get("state")?;
        Ok(ItemRow {
            name: row.try_get("name")?,
            fabric: row.try_get("fabric")?,
            container: row.try_get("container")?,
            machine: row.try_get("machine")?,
            policy: row.try_get("policy")?,
            target_fabric: row.try_get("target_fabric")?,
            target_container: row.try_get("target_container")?,
            target_agent_id: row.try_get("target_agent_id")?,
            state: ProtectionState::parse(&state).ok_or_else(|| {
                corrupt(format!("item state '{state}' is not a protection state"))
            })?,
            active: {
                let a: String = row.try_get("active_location")?;
                Location::parse(&a).ok_or_else(|| {
                    corrupt(format!("active location '{a}' is not Primary or Recovery"))
                })?
            },
            last_error: row.try_get("last_error")?,
            failover_point_id: row.try_get("failover_point_id")?,
            failover_output: row.try_get("failover_output")?,
            failover_ms: row.try_get("failover_ms")?,
            test_state: {
                let t: String = row.try_get("test_failover_state")?;
                TestFailoverState::parse(&t).ok_or_else(|| {
                    corrupt(format!(
                        "test failover state '{t}' is not a test failover state"
                    ))
                })?
            },
            test_output: row.try_get("test_failover_output")?,
            test_point_id: row.try_get("test_failover_point_id")?,
            test_error: row.try_get("test_failover_error")?,
            test_ms: row.try_get("test_failover_ms")?,
            group: row.try_get("multi_vm_group")?,
            created_ms: row.try_get("created_ms")?,
        })
    }
}

/// The item of that name.
pub async fn load<'e>(db: impl Exec<'e>, name: &str) -> Result<Option<ItemRow>, sqlx::Error> {
    let row = sqlx::query("SELECT * FROM protected_items WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?;
    row.as_ref().map(ItemRow::from_row).transpose()
}

/// Up to `limit` items (of one cloud, or all) after (`after_ms`,
/// `after_name`) in creation order.
pub async fn page(
    db: &Db,
    cloud: Option<(&str, &str)>,
    after_ms: i64,
    after_name: &str,
    limit: i64,
) -> Result<Vec<ItemRow>, sqlx::Error> {
    let (fabric, container) = cloud.unwrap_or(("", ""));
    let rows = sqlx::query(
        "SELECT * FROM protected_items WHERE ($1 = 0 OR (fabric = $2 AND container = $3)) AND (created_ms > $4 OR (created_ms = $5 AND name > $6)) ORDER BY created_ms, name LIMIT $7",
    )
    .bind(i64::from(cloud.is_some()))
    .bind(fabric)
    .bind(container)
    .bind(after_ms)
    .bind(after_ms)
    .bind(after_name)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.iter().map(ItemRow::from_row).collect()
}

/// The item protecting a machine, if any.
pub async fn item_of_machine<'e>(
    db: impl Exec<'e>,
    fabric: &str,
    machine: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM protected_items WHERE fabric = $1 AND machine = $2")
        .bind(fabric)
        .bind(machine)
        .fetch_optional(db)
        .await
}

/// The protection state of the item protecting a machine, if any.
pub async fn state_of_machine(
    db: &Db,
    fabric: &str,
    machine: &str,
) -> Result<Option<ProtectionState>, sqlx::Error> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM protected_items WHERE fabric = $1 AND machine = $2")
            .bind(fabric)
            .bind(machine)
            .fetch_optional(db)
            .await?;
    state
        .map(|s| {
            ProtectionState::parse(&s)
                .ok_or_else(|| corrupt(format!("item state '{s}' is not a protection state")))
        })
        .transpose()
}

/// A new item, as enable protection writes it.
pub struct NewItem<'a> {
    pub name: &'a str,
    pub fabric: &'a str,
    pub container: &'a str,
    pub machine: &'a str,
    pub policy: &'a str,
    pub target_fabric: &'a str,
    pub target_container: &'a str,
    pub state: ProtectionState,
    pub group: Option<&'a str>,
}

pub async fn insert(tx: &mut Tx<'_>, i: &NewItem<'_>, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, multi_vm_group, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(i.name)
    .bind(i.fabric)
    .bind(i.container)
    .bind(i.machine)
    .bind(i.policy)
    .bind(i.target_fabric)
    .bind(i.target_container)
    .bind(i.state.as_str())
    .bind(i.group)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A member of a multi-VM group, with its machine's agent when reported.
pub struct GroupMember {
    pub name: String,
    /// The group as this member spells it.
    pub group: Option<String>,
    pub policy: String,
    pub fabric: String,
    pub container: String,
    pub target_fabric: String,
    pub target_container: String,
    pub agent_id: Option<String>,
    pub hostname: Option<String>,
}

/// The group's members, in creation order.
pub async fn group_members(tx: &mut Tx<'_>, group: &str) -> Result<Vec<GroupMember>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT i.name, i.multi_vm_group, i.policy, i.fabric, i.container, i.target_fabric, i.target_container, m.agent_id, a.hostname
         FROM protected_items i
         LEFT JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine
         LEFT JOIN agents a ON a.id = m.agent_id
         WHERE i.multi_vm_group = $1
         ORDER BY i.created_ms, i.name",
    )
    .bind(group)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(GroupMember {
                name: row.try_get("name")?,
                group: row.try_get("multi_vm_group")?,
                policy: row.try_get("policy")?,
                fabric: row.try_get("fabric")?,
                container: row.try_get("container")?,
                target_fabric: row.try_get("target_fabric")?,
                target_container: row.try_get("target_container")?,
                agent_id: row.try_get("agent_id")?,
                hostname: row.try_get("hostname")?,
            })
        })
        .collect()
}

/// The item's lifecycle (protection state and active location), its last
/// error cleared when `clear_error`.
pub async fn set_life(
    tx: &mut Tx<'_>,
    item: &str,
    life: Lifecycle,
    clear_error: bool,
    now: i64,
) -> Result<(), sqlx::Error> {
    let sql = if clear_error {
        "UPDATE protected_items SET state = $1, active_location = $2, last_error = NULL, updated_ms = $3 WHERE name = $4"
    } else {
        "UPDATE protected_items SET state = $1, active_location = $2, updated_ms = $3 WHERE name = $4"
    };
    sqlx::query(sql)
        .bind(life.state.as_str())
        .bind(life.active.as_str())
        .bind(now)
        .bind(item)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A test failover starts from `point`: what the last one showed is cleared.
pub async fn start_test_failover(
    tx: &mut Tx<'_>,
    item: &str,
    state: TestFailoverState,
    point: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE protected_items SET test_failover_state = $1, test_failover_point_id = $2, test_failover_output = NULL, test_failover_error = NULL, updated_ms = $3 WHERE name = $4",
    )
    .bind(state.as_str())
    .bind(point)
    .bind(now)
    .bind(item)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn set_test_state(
    tx: &mut Tx<'_>,
    item: &str,
    state: TestFailoverState,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE protected_items SET test_failover_state = $1, updated_ms = $2 WHERE name = $3",
    )
    .bind(state.as_str())
    .bind(now)
    .bind(item)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---------- recovery points ----------

/// A recovery point as stored.
pub struct PointRow {
    pub point_id: String,
    pub created_ms: i64,
    pub consistency: String,
    pub bytes_sent: i64,
    pub bytes_read: i64,
}

impl PointRow {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(PointRow {
            point_id: row.try_get("point_id")?,
            created_ms: row.try_get("created_ms")?,
            consistency: row.try_get("consistency")?,
            bytes_sent: row.try_get("bytes_sent")?,
            bytes_read: row.try_get("bytes_read")?,
        })
    }
}

/// The item's listed points, newest first.
pub async fn points(db: &Db, item: &str) -> Result<Vec<PointRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT point_id, created_ms, consistency, bytes_sent, bytes_read FROM recovery_points WHERE item = $1 AND pruned_ms IS NULL ORDER BY created_ms DESC",
    )
    .bind(item)
    .fetch_all(db)
    .await?;
    rows.iter().map(PointRow::from_row).collect()
}

/// A listed point of the item.
pub async fn point(db: &Db, item: &str, point: &str) -> Result<Option<PointRow>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT point_id, created_ms, consistency, bytes_sent, bytes_read FROM recovery_points WHERE item = $1 AND point_id = $2 AND pruned_ms IS NULL",
    )
    .bind(item)
    .bind(point)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(PointRow::from_row).transpose()
}

/// The point's id if it is listed and kept in the store at `site`.
pub async fn listed_point(
    tx: &mut Tx<'_>,
    item: &str,
    point: &str,
    site: Location,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT point_id FROM recovery_points WHERE item = $1 AND point_id = $2 AND site = $3 AND pruned_ms IS NULL",
    )
    .bind(item)
    .bind(point)
    .bind(site.as_str())
    .fetch_optional(&mut **tx)
    .await
}

/// The item's agent at `site`: its machine's agent at the primary site,
/// its recovery agent at the recovery site.
pub async fn agent_at(
    db: &Db,
    item: &ItemRow,
    site: Location,
) -> Result<Option<String>, sqlx::Error> {
    match site {
        Location::Recovery => Ok(item.target_agent_id.clone()),
        Location::Primary => {
            let agent: Option<Option<String>> =
                sqlx::query_scalar("SELECT agent_id FROM machines WHERE fabric = $1 AND name = $2")
                    .bind(&item.fabric)
                    .bind(&item.machine)
                    .fetch_optional(db)
                    .await?;
            Ok(agent.flatten())
        }
    }
}

/// Whether the agent has a replica store (its `[target]`: a data URL).
pub async fn agent_has_store(db: &Db, agent: &str) -> Result<bool, sqlx::Error> {
    let url: Option<Option<String>> =
        sqlx::query_scalar("SELECT data_url FROM agents WHERE id = $1")
            .bind(agent)
            .fetch_optional(db)
            .await?;
    Ok(url.flatten().is_some())
}

/// Clears the item's replication epoch: no agent replicates it in a new
/// direction until a reprotect job has seeded the target and set it.
pub async fn clear_epoch(tx: &mut Tx<'_>, item: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE protected_items SET replication_epoch = NULL WHERE name = $1")
        .bind(item)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The item's latest listed point.
pub async fn latest_point(
    tx: &mut Tx<'_>,
    item: &str,
    site: Location,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT point_id FROM recovery_points WHERE item = $1 AND site = $2 AND pruned_ms IS NULL ORDER BY created_ms DESC LIMIT 1",
    )
    .bind(item)
    .bind(site.as_str())
    .fetch_optional(&mut **tx)
    .await
}

/// The listed points of these items: (item, point, created).
pub async fn listed_points_of(
    db: &Db,
    items: &[&str],
) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    let sql = format!(
        "SELECT item, point_id, created_ms FROM recovery_points WHERE pruned_ms IS NULL AND item IN ({})",
        super::placeholders(1, items.len())
    );
    let mut q = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(sql));
    for n in items {
        q = q.bind(*n);
    }
    q.fetch_all(db).await
}
