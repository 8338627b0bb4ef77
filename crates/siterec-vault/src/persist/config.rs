//! What operators configure: replication policies, cloud pairings
//! (protection container mappings) and network mappings.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::Db;
use crate::persist::jobs::Tx;

/// A cloud pairing as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingRow {
    pub fabric: String,
    pub container: String,
    pub name: String,
    pub target_fabric: String,
    pub target_container: String,
    pub policy: String,
    /// Pairing or Paired.
    pub state: String,
}

impl PairingRow {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(PairingRow {
            fabric: row.try_get("fabric")?,
            container: row.try_get("container")?,
            name: row.try_get("name")?,
            target_fabric: row.try_get("target_fabric")?,
            target_container: row.try_get("target_container")?,
            policy: row.try_get("policy")?,
            state: row.try_get("state")?,
        })
    }
}

const PAIRING_COLUMNS: &str =
    "fabric, container, name, target_fabric, target_container, policy, state";

/// Every pairing, or a cloud's, in creation order.
pub async fn pairings(
    db: &Db,
    cloud: Option<(&str, &str)>,
) -> Result<Vec<PairingRow>, sqlx::Error> {
    let rows = match cloud {
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PAIRING_COLUMNS} FROM container_mappings ORDER BY created_ms"
            )))
            .fetch_all(db)
            .await?
        }
        Some((fabric, container)) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PAIRING_COLUMNS} FROM container_mappings WHERE fabric = $1 AND container = $2 ORDER BY created_ms"
            )))
            .bind(fabric)
            .bind(container)
            .fetch_all(db)
            .await?
        }
    };
    rows.iter().map(PairingRow::from_row).collect()
}

/// The pairing `name` of a cloud.
pub async fn pairing<'e, E>(
    db: E,
    fabric: &str,
    container: &str,
    name: &str,
) -> Result<Option<PairingRow>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {PAIRING_COLUMNS} FROM container_mappings WHERE fabric = $1 AND container = $2 AND name = $3"
    )))
    .bind(fabric)
    .bind(container)
    .bind(name)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(PairingRow::from_row).transpose()
}

/// A network mapping as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkMappingRow {
    pub fabric: String,
    pub network: String,
    pub name: String,
    pub recovery_fabric: String,
    pub recovery_network: String,
    pub instance_type: String,
    /// Pairing, Paired or Unpairing.
    pub state: String,
}

impl NetworkMappingRow {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(NetworkMappingRow {
            fabric: row.try_get("fabric")?,
            network: row.try_get("network")?,
            name: row.try_get("name")?,
            recovery_fabric: row.try_get("recovery_fabric")?,
            recovery_network: row.try_get("recovery_network")?,
            instance_type: row.try_get("instance_type")?,
            state: row.try_get("state")?,
        })
    }
}

const NETWORK_MAPPING_COLUMNS: &str =
    "fabric, network, name, recovery_fabric, recovery_network, instance_type, state";

/// Every network mapping, or a network's, in creation order.
pub async fn network_mappings(
    db: &Db,
    network: Option<(&str, &str)>,
) -> Result<Vec<NetworkMappingRow>, sqlx::Error> {
    let rows = match network {
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {NETWORK_MAPPING_COLUMNS} FROM network_mappings ORDER BY created_ms"
            )))
            .fetch_all(db)
            .await?
        }
        Some((fabric, network)) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {NETWORK_MAPPING_COLUMNS} FROM network_mappings WHERE fabric = $1 AND network = $2 ORDER BY created_ms"
            )))
            .bind(fabric)
            .bind(network)
            .fetch_all(db)
            .await?
        }
    };
    rows.iter().map(NetworkMappingRow::from_row).collect()
}

/// The network mapping `name` of a network.
pub async fn network_mapping<'e, E>(
    db: E,
    fabric: &str,
    network: &str,
    name: &str,
) -> Result<Option<NetworkMappingRow>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {NETWORK_MAPPING_COLUMNS} FROM network_mappings WHERE fabric = $1 AND network = $2 AND name = $3"
    )))
    .bind(fabric)
    .bind(network)
    .bind(name)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(NetworkMappingRow::from_row).transpose()
}

/// Every policy: (name, body as stored), by name.
pub async fn policies(db: &Db) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT name, body FROM policies ORDER BY name")
        .fetch_all(db)
        .await
}

/// The policy: (name as stored, body as stored).
pub async fn policy<'e, E>(db: E, name: &str) -> Result<Option<(String, String)>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query_as("SELECT name, body FROM policies WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await
}

pub async fn delete_policy(db: &Db, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM policies WHERE name = $1")
        .bind(name)
        .execute(db)
        .await?;
    Ok(())
}

/// How many pairings the cloud is in, as primary or recovery.
pub async fn cloud_pairings(
    tx: &mut Tx<'_>,
    fabric: &str,
    container: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM container_mappings WHERE (fabric = $1 AND container = $2) OR (target_fabric = $3 AND target_container = $4)",
    )
    .bind(fabric)
    .bind(container)
    .bind(fabric)
    .bind(container)
    .fetch_one(&mut **tx)
    .await
}

/// A new pairing, in state Pairing (its job pairs it).
pub async fn insert_pairing(tx: &mut Tx<'_>, p: &PairingRow, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO container_mappings (fabric, container, name, target_fabric, target_container, policy, state, created_ms) VALUES ($1, $2, $3, $4, $5, $6, 'Pairing', $7)",
    )
    .bind(&p.fabric)
    .bind(&p.container)
    .bind(&p.name)
    .bind(&p.target_fabric)
    .bind(&p.target_container)
    .bind(&p.policy)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The mapping of a network (a network has at most one).
pub async fn mapping_of_network(
    tx: &mut Tx<'_>,
    fabric: &str,
    network: &str,
) -> Result<Option<NetworkMappingRow>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {NETWORK_MAPPING_COLUMNS} FROM network_mappings WHERE fabric = $1 AND network = $2"
    )))
    .bind(fabric)
    .bind(network)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(NetworkMappingRow::from_row).transpose()
}

/// A new network mapping, in state Pairing (its job pairs it).
pub async fn insert_network_mapping(
    tx: &mut Tx<'_>,
    m: &NetworkMappingRow,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO network_mappings (fabric, network, name, recovery_fabric, recovery_network, instance_type, state, created_ms) VALUES ($1, $2, $3, $4, $5, $6, 'Pairing', $7)",
    )
    .bind(&m.fabric)
    .bind(&m.network)
    .bind(&m.name)
    .bind(&m.recovery_fabric)
    .bind(&m.recovery_network)
    .bind(&m.instance_type)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The mapping is being removed (its job removes it).
pub async fn unpair_network_mapping(
    tx: &mut Tx<'_>,
    fabric: &str,
    network: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE network_mappings SET state = 'Unpairing' WHERE fabric = $1 AND network = $2 AND name = $3")
        .bind(fabric)
        .bind(network)
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The cloud's pairing in force, as primary: (recovery fabric, recovery
/// cloud, policy).
pub async fn paired_target(
    db: &Db,
    fabric: &str,
    container: &str,
) -> Result<Option<(String, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT target_fabric, target_container, policy FROM container_mappings WHERE fabric = $1 AND container = $2 AND state = 'Paired'",
    )
    .bind(fabric)
    .bind(container)
    .fetch_optional(db)
    .await
}

/// The network mappings in force from `fabric`'s networks: source network
/// (lower case) → (recovery fabric, recovery network).
pub async fn paired_network_mappings<'e, E>(
    db: E,
    fabric: &str,
) -> Result<std::collections::BTreeMap<String, (String, String)>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT network, recovery_fabric, recovery_network FROM network_mappings WHERE fabric = $1 AND state = 'Paired'",
    )
    .bind(fabric)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(n, rf, rn)| (n.to_ascii_lowercase(), (rf, rn)))
        .collect())
}

/// The protected items a pairing protects (its clouds'), by name.
pub async fn pairing_items(tx: &mut Tx<'_>, p: &PairingRow) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT name FROM protected_items WHERE fabric = $1 AND container = $2 AND target_fabric = $3 AND target_container = $4 ORDER BY name",
    )
    .bind(&p.fabric)
    .bind(&p.container)
    .bind(&p.target_fabric)
    .bind(&p.target_container)
    .fetch_all(&mut **tx)
    .await
}

/// The pairing is being removed (its job removes it): no item is enabled
/// under it from now on (only Paired pairings are).
pub async fn unpair(
    tx: &mut Tx<'_>,
    fabric: &str,
    container: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE container_mappings SET state = 'Unpairing' WHERE fabric = $1 AND container = $2 AND name = $3")
        .bind(fabric)
        .bind(container)
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What uses a policy, each named ("pairing P", "protected item I").
pub async fn policy_users(db: &Db, name: &str) -> Result<Vec<String>, sqlx::Error> {
    let pairings: Vec<String> =
        sqlx::query_scalar("SELECT name FROM container_mappings WHERE policy = $1 ORDER BY name")
            .bind(name)
            .fetch_all(db)
            .await?;
    let items: Vec<String> =
        sqlx::query_scalar("SELECT name FROM protected_items WHERE policy = $1 ORDER BY name")
            .bind(name)
            .fetch_all(db)
            .await?;
    Ok(pairings
        .into_iter()
        .map(|p| format!("pairing {p}"))
        .chain(items.into_iter().map(|i| format!("protected item {i}")))
        .collect())
}
