//! Rows of the vault database and their ARM JSON renderings.

use std::collections::HashMap;

use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::VaultInfo;
use crate::db::{Db, opt_rfc3339, rfc3339};
use crate::error::{ApiError, ApiResult};
use siterec_core::state::{JobKind, JobState, ProtectionState, TestFailoverState};
use siterec_core::wire::{KIND_VM, MachineInfo, ReplicaStarted};

use siterec_api as api;
use siterec_api::types;

/// An agent is "connected" when heard from within this many milliseconds.
pub const AGENT_ONLINE_MS: i64 = 60_000;

pub fn fabric_id(v: &VaultInfo, fabric: &str) -> String {
    format!("{}/replicationFabrics/{fabric}", v.id())
}
pub fn container_id(v: &VaultInfo, fabric: &str, container: &str) -> String {
    format!(
        "{}/replicationProtectionContainers/{container}",
        fabric_id(v, fabric)
    )
}
pub fn item_id(v: &VaultInfo, fabric: &str, container: &str, item: &str) -> String {
    format!(
        "{}/replicationProtectedItems/{item}",
        container_id(v, fabric, container)
    )
}
pub fn network_id(v: &VaultInfo, fabric: &str, network: &str) -> String {
    format!("{}/replicationNetworks/{network}", fabric_id(v, fabric))
}
pub fn network_mapping_id(v: &VaultInfo, fabric: &str, network: &str, name: &str) -> String {
    format!(
        "{}/replicationNetworkMappings/{name}",
        network_id(v, fabric, network)
    )
}
pub fn policy_id(v: &VaultInfo, policy: &str) -> String {
    format!("{}/replicationPolicies/{policy}", v.id())
}
pub fn job_id(v: &VaultInfo, job: &str) -> String {
    format!("{}/replicationJobs/{job}", v.id())
}

fn resource<P>(id: String, name: &str, ty: &str, properties: P) -> api::Resource<P> {
    api::Resource::new(id, name, ty, properties)
}

pub fn list<T>(value: Vec<T>) -> api::List<T> {
    api::List::all(value)
}

/// A page of a list: `nextLink` is absent on the last page.
pub fn page<T>(value: Vec<T>, next_link: Option<String>) -> api::List<T> {
    api::List { value, next_link }
}

/// Where a page of protected items resumes: after this item in creation
/// order (`created_ms`, then name). Its token is `{created_ms}~{name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemCursor {
    pub created_ms: i64,
    pub name: String,
}

impl ItemCursor {
    pub fn token(&self) -> String {
        format!("{}~{}", self.created_ms, self.name)
    }

    pub fn parse(token: &str) -> Option<ItemCursor> {
        let (ms, name) = token.split_once('~')?;
        let created_ms = ms.parse().ok()?;
        siterec_core::names::check_name("item", name).ok()?;
        Some(ItemCursor {
            created_ms,
            name: name.to_string(),
        })
    }
}

/// Up to `limit` items after `after` (of one cloud, or all), and the
/// cursor of the next page when there are more.
pub async fn item_page(
    db: &Db,
    cloud: Option<(&str, &str)>,
    after: Option<&ItemCursor>,
    limit: i64,
) -> ApiResult<(Vec<ItemRow>, Option<ItemCursor>)> {
    let (after_ms, after_name) = after
        .map(|c| (c.created_ms, c.name.clone()))
        .unwrap_or((i64::MIN, String::new()));
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
    .bind(limit + 1)
    .fetch_all(db)
    .await?;
    let mut items = rows
        .iter()
        .map(ItemRow::from_row)
        .collect::<ApiResult<Vec<_>>>()?;
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|i| ItemCursor {
            created_ms: i.created_ms,
            name: i.name.clone(),
        })
    } else {
        None
    };
    Ok((items, next))
}

// ---------- fabrics, providers, containers ----------

pub async fn fabric_exists(db: &Db, name: &str) -> ApiResult<String> {
    sqlx::query_scalar::<_, String>("SELECT name FROM fabrics WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| ApiError::not_found("fabric", name))
}

pub async fn container_exists(db: &Db, fabric: &str, name: &str) -> ApiResult<String> {
    let fabric = fabric_exists(db, fabric).await?;
    sqlx::query_scalar::<_, String>("SELECT name FROM containers WHERE fabric = $1 AND name = $2")
        .bind(&fabric)
        .bind(name)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| ApiError::not_found("protection container", &format!("{fabric}/{name}")))
}

pub async fn fabric_json(db: &Db, v: &VaultInfo, name: &str) -> ApiResult<api::Fabric> {
    let agents: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM agents WHERE fabric = $1")
        .bind(name)
        .fetch_one(db)
        .await?;
    Ok(resource(
        fabric_id(v, name),
        name,
        types::FABRIC,
        api::FabricProperties {
            friendly_name: name.to_string(),
            internal_identifier: name.to_string(),
            health: "Normal".into(),
            custom_details: api::FabricDetails {
                instance_type: "SiterecSite".into(),
                agents,
            },
        },
    ))
}

pub async fn provider_json(row: &AnyRow, v: &VaultInfo, now: i64) -> ApiResult<api::Provider> {
    let id: String = row.try_get("id")?;
    let fabric: String = row.try_get("fabric")?;
    let last_seen: Option<i64> = row.try_get("last_seen_ms")?;
    let online = last_seen.is_some_and(|t| now - t < AGENT_ONLINE_MS);
    let counters: String = row.try_get("counters")?;
    Ok(resource(
        format!(
            "{}/replicationRecoveryServicesProviders/{id}",
            fabric_id(v, &fabric)
        ),
        &id,
        types::PROVIDER,
        api::ProviderProperties {
            friendly_name: row.try_get("hostname")?,
            fabric_friendly_name: fabric,
            provider_version: row.try_get("version")?,
            connection_status: if online { "Connected" } else { "NotConnected" }.into(),
            last_heart_beat: opt_rfc3339(last_seen),
            protection_container_friendly_name: row.try_get("cloud")?,
            data_endpoint: row.try_get("data_url")?,
            counters: serde_json::from_str(&counters)
                .map_err(|e| ApiError::internal("stored agent counters", e))?,
        },
    ))
}

pub async fn container_json(
    db: &Db,
    v: &VaultInfo,
    fabric: &str,
    name: &str,
) -> ApiResult<api::Container> {
    let paired: Option<(String, String)> = sqlx::query_as(
        "SELECT fabric, container FROM container_mappings WHERE (fabric = $1 AND container = $2) OR (target_fabric = $3 AND target_container = $4) LIMIT 1",
    )
    .bind(fabric)
    .bind(name)
    .bind(fabric)
    .bind(name)
    .fetch_optional(db)
    .await?;
    Ok(resource(
        container_id(v, fabric, name),
        name,
        types::CONTAINER,
        api::ContainerProperties {
            friendly_name: name.to_string(),
            fabric_friendly_name: fabric.to_string(),
            fabric_type: "SiterecSite".into(),
            pairing_status: if paired.is_some() {
                "Paired"
            } else {
                "NotPaired"
            }
            .into(),
            role: match &paired {
                Some((f, c)) if f.eq_ignore_ascii_case(fabric) && c.eq_ignore_ascii_case(name) => {
                    "Primary"
                }
                Some(_) => "Recovery",
                None => "",
            }
            .into(),
        },
    ))
}

pub fn protectable_json(
    v: &VaultInfo,
    fabric: &str,
    container: &str,
    name: &str,
    info: &MachineInfo,
    protected: bool,
) -> api::ProtectableItem {
    resource(
        format!(
            "{}/replicationProtectableItems/{name}",
            container_id(v, fabric, container)
        ),
        name,
        types::PROTECTABLE,
        api::ProtectableItemProperties {
            friendly_name: name.to_string(),
            protection_status: if protected {
                "Protected"
            } else {
                "Unprotected"
            }
            .into(),
            protection_readiness_errors: info.error.iter().cloned().collect(),
            supported_replication_providers: [
                "HyperVReplicaAzure",
                "HyperVReplica2012R2",
                "InMageAzureV2",
            ]
            .map(String::from)
            .to_vec(),
            custom_details: api::ProtectableDetails {
                instance_type: info.kind.clone(),
                disks: info.disks.clone(),
                vm_nics: info
                    .nics
                    .iter()
                    .map(|n| api::VmNic {
                        nic_id: n.name.clone(),
                        vm_network_name: n.network.clone(),
                        mac_address: n.mac.clone(),
                    })
                    .collect(),
                memory_mib: info.vm.as_ref().map(|vm| vm.memory_mib),
                cpus: info.vm.as_ref().map(|vm| vm.cpus),
            },
        },
    )
}

// ---------- networks and network mappings ----------

/// The agents of `fabric` that report network `name` (empty: no such network).
pub async fn network_agents(db: &Db, fabric: &str, name: &str) -> ApiResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT agent_id FROM networks WHERE fabric = $1 AND name = $2 ORDER BY agent_id",
    )
    .bind(fabric)
    .bind(name)
    .fetch_all(db)
    .await?)
}

/// The networks of a fabric (as its agents spell them), sorted.
pub async fn fabric_networks(db: &Db, fabric: &str) -> ApiResult<Vec<String>> {
    let mut names: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT name FROM networks WHERE fabric = $1")
            .bind(fabric)
            .fetch_all(db)
            .await?;
    names.sort_by_key(|n| n.to_ascii_lowercase());
    names.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    Ok(names)
}

/// A network of a fabric by name, as its agents spell it; 404 naming the
/// fabric's networks otherwise.
pub async fn network_exists(db: &Db, fabric: &str, name: &str) -> ApiResult<String> {
    let fabric = fabric_exists(db, fabric).await?;
    let found: Option<String> =
        sqlx::query_scalar("SELECT name FROM networks WHERE fabric = $1 AND name = $2 LIMIT 1")
            .bind(&fabric)
            .bind(name)
            .fetch_optional(db)
            .await?;
    found.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!(
                "network '{name}' is not reported by any agent of fabric '{fabric}'; 'siterec network list --fabric {fabric}' shows its networks"
            ),
        )
    })
}

pub fn network_json(v: &VaultInfo, fabric: &str, name: &str, agents: &[String]) -> api::Network {
    resource(
        network_id(v, fabric, name),
        name,
        types::NETWORK,
        api::NetworkProperties {
            fabric_type: "SiterecSite".into(),
            friendly_name: name.to_string(),
            network_type: "VmNetwork".into(),
            subnets: vec![],
            agents: agents.to_vec(),
        },
    )
}

pub fn network_mapping_json(v: &VaultInfo, row: &AnyRow) -> ApiResult<api::NetworkMapping> {
    let fabric: String = row.try_get("fabric")?;
    let network: String = row.try_get("network")?;
    let name: String = row.try_get("name")?;
    let rf: String = row.try_get("recovery_fabric")?;
    let rn: String = row.try_get("recovery_network")?;
    let instance: String = row.try_get("instance_type")?;
    Ok(resource(
        network_mapping_id(v, &fabric, &network, &name),
        &name,
        types::NETWORK_MAPPING,
        api::NetworkMappingProperties {
            state: row.try_get("state")?,
            primary_network_id: network_id(v, &fabric, &network),
            primary_network_friendly_name: network,
            primary_fabric_friendly_name: fabric,
            recovery_network_id: network_id(v, &rf, &rn),
            recovery_network_friendly_name: rn,
            recovery_fabric_arm_id: fabric_id(v, &rf),
            recovery_fabric_friendly_name: rf,
            fabric_specific_settings: api::InstanceType {
                instance_type: instance,
            },
        },
    ))
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

/// The machine an item protects, as its agent last reported it.
pub async fn machine_info(db: &Db, fabric: &str, machine: &str) -> ApiResult<Option<MachineInfo>> {
    let info: Option<String> =
        sqlx::query_scalar("SELECT info FROM machines WHERE fabric = $1 AND name = $2")
            .bind(fabric)
            .bind(machine)
            .fetch_optional(db)
            .await?;
    Ok(info.and_then(|i| serde_json::from_str(&i).ok()))
}

/// Whether a reported machine is a VM the recovery site can boot.
pub fn is_vm(info: &MachineInfo) -> bool {
    info.kind == KIND_VM && info.vm.is_some()
}

// ---------- policies and mappings ----------

pub fn policy_json(
    v: &VaultInfo,
    name: &str,
    policy: &siterec_core::policy::Policy,
) -> api::Policy {
    resource(
        policy_id(v, name),
        name,
        types::POLICY,
        api::PolicyProperties {
            friendly_name: name.to_string(),
            provider_specific_details: policy.to_arm_details(),
        },
    )
}

pub async fn load_policy(db: &Db, name: &str) -> ApiResult<(String, siterec_core::policy::Policy)> {
    let (name, body): (String, String) =
        sqlx::query_as("SELECT name, body FROM policies WHERE name = $1")
            .bind(name)
            .fetch_optional(db)
            .await?
            .ok_or_else(|| ApiError::not_found("replication policy", name))?;
    let policy = serde_json::from_str(&body).map_err(|e| ApiError::internal("stored policy", e))?;
    Ok((name, policy))
}

pub fn mapping_json(v: &VaultInfo, row: &AnyRow) -> ApiResult<api::ContainerMapping> {
    let fabric: String = row.try_get("fabric")?;
    let container: String = row.try_get("container")?;
    let name: String = row.try_get("name")?;
    let tf: String = row.try_get("target_fabric")?;
    let tc: String = row.try_get("target_container")?;
    let policy: String = row.try_get("policy")?;
    Ok(resource(
        format!(
            "{}/replicationProtectionContainerMappings/{name}",
            container_id(v, &fabric, &container)
        ),
        &name,
        types::MAPPING,
        api::ContainerMappingProperties {
            source_fabric_friendly_name: fabric,
            source_protection_container_friendly_name: container,
            target_protection_container_id: container_id(v, &tf, &tc),
            target_fabric_friendly_name: tf,
            target_protection_container_friendly_name: tc,
            policy_id: policy_id(v, &policy),
            policy_friendly_name: policy,
            state: row.try_get("state")?,
            health: "Normal".into(),
        },
    ))
}

// ---------- protected items and recovery points ----------

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
    pub fn from_row(row: &AnyRow) -> ApiResult<ItemRow> {
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
                ApiError::internal("stored item state", format!("unknown state {state}"))
            })?,
            last_error: row.try_get("last_error")?,
            failover_point_id: row.try_get("failover_point_id")?,
            failover_output: row.try_get("failover_output")?,
            failover_ms: row.try_get("failover_ms")?,
            test_state: {
                let t: String = row.try_get("test_failover_state")?;
                TestFailoverState::parse(&t).ok_or_else(|| {
                    ApiError::internal("stored test failover state", format!("unknown state {t}"))
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

pub async fn load_item(db: &Db, name: &str) -> ApiResult<ItemRow> {
    let row = sqlx::query("SELECT * FROM protected_items WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| ApiError::not_found("protected item", name))?;
    ItemRow::from_row(&row)
}

/// Loads an item addressed by its ARM path, checking fabric and container.
pub async fn load_item_at(
    db: &Db,
    fabric: &str,
    container: &str,
    name: &str,
) -> ApiResult<ItemRow> {
    container_exists(db, fabric, container).await?;
    let item = load_item(db, name).await?;
    if !item.fabric.eq_ignore_ascii_case(fabric) || !item.container.eq_ignore_ascii_case(container)
    {
        return Err(ApiError::not_found(
            "protected item",
            &format!("{fabric}/{container}/{name}"),
        ));
    }
    Ok(item)
}

/// What the views of protected items need besides their rows, read for
/// a whole page of items in a few statements (not a few per item).
#[derive(Default)]
pub struct ItemFacts {
    /// Per item (lower-case name): its unpruned points' count, and the
    /// latest one (id, created).
    points: HashMap<String, (i64, Option<(String, i64)>)>,
    /// Per policy (lower-case name).
    policies: HashMap<String, siterec_core::policy::Policy>,
    /// Per machine (lower-case fabric and name): its agent and its report.
    machines: HashMap<(String, String), (String, Option<MachineInfo>)>,
    /// Per agent id: the counters it last reported, per item.
    counters: HashMap<String, Value>,
    /// Per fabric (lower-case): its paired network mappings.
    network_mappings: HashMap<String, std::collections::BTreeMap<String, (String, String)>>,
}

/// `$first, $first+1, ...` for `n` values bound in an `IN (...)` list.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the [`ItemFacts`] of `items`.
pub async fn item_facts(db: &Db, items: &[ItemRow]) -> ApiResult<ItemFacts> {
    let mut facts = ItemFacts::default();
    if items.is_empty() {
        return Ok(facts);
    }
    let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
    let sql = format!(
        "SELECT item, point_id, created_ms FROM recovery_points WHERE pruned_ms IS NULL AND item IN ({})",
        placeholders(1, names.len())
    );
    let mut q = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(sql));
    for n in &names {
        q = q.bind(*n);
    }
    for (item, point, created) in q.fetch_all(db).await? {
        let e = facts
            .points
            .entry(item.to_ascii_lowercase())
            .or_insert((0, None));
        e.0 += 1;
        if e.1.as_ref().is_none_or(|(_, t)| created > *t) {
            e.1 = Some((point, created));
        }
    }
    let policies: Vec<(String, String)> = sqlx::query_as("SELECT name, body FROM policies")
        .fetch_all(db)
        .await?;
    for (name, body) in policies {
        if let Ok(p) = serde_json::from_str(&body) {
            facts.policies.insert(name.to_ascii_lowercase(), p);
        }
    }
    // Per fabric, so that the lookup follows the machines' key (fabric, name).
    let mut by_fabric: HashMap<String, Vec<&str>> = HashMap::new();
    for i in items {
        by_fabric
            .entry(i.fabric.to_ascii_lowercase())
            .or_default()
            .push(i.machine.as_str());
    }
    for (fabric, machines) in &by_fabric {
        let sql = format!(
            "SELECT fabric, name, agent_id, info FROM machines WHERE fabric = $1 AND name IN ({})",
            placeholders(2, machines.len())
        );
        let mut q = sqlx::query_as::<_, (String, String, String, String)>(sqlx::AssertSqlSafe(sql))
            .bind(fabric.as_str());
        for m in machines {
            q = q.bind(*m);
        }
        for (fabric, name, agent, info) in q.fetch_all(db).await? {
            facts.machines.insert(
                (fabric.to_ascii_lowercase(), name.to_ascii_lowercase()),
                (agent, serde_json::from_str(&info).ok()),
            );
        }
    }
    let mut agents: Vec<&str> = facts.machines.values().map(|(a, _)| a.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    if !agents.is_empty() {
        let sql = format!(
            "SELECT id, counters FROM agents WHERE id IN ({})",
            placeholders(1, agents.len())
        );
        let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql));
        for a in &agents {
            q = q.bind(*a);
        }
        let rows = q.fetch_all(db).await?;
        for (id, counters) in rows {
            if let Ok(c) = serde_json::from_str::<Value>(&counters) {
                facts.counters.insert(id, c);
            }
        }
    }
    let mut vm_fabrics: Vec<String> = items
        .iter()
        .filter(|i| {
            facts
                .machine(&i.fabric, &i.machine)
                .is_some_and(|(_, m)| m.as_ref().is_some_and(is_vm))
        })
        .map(|i| i.fabric.to_ascii_lowercase())
        .collect();
    vm_fabrics.sort_unstable();
    vm_fabrics.dedup();
    for f in vm_fabrics {
        let m = paired_network_mappings(db, &f).await?;
        facts.network_mappings.insert(f, m);
    }
    Ok(facts)
}

impl ItemFacts {
    fn machine(&self, fabric: &str, name: &str) -> Option<&(String, Option<MachineInfo>)> {
        self.machines
            .get(&(fabric.to_ascii_lowercase(), name.to_ascii_lowercase()))
    }
}

/// One protected item as the API shows it.
pub async fn item_json(db: &Db, v: &VaultInfo, item: &ItemRow) -> ApiResult<api::ProtectedItem> {
    let facts = item_facts(db, std::slice::from_ref(item)).await?;
    Ok(item_view(v, item, &facts, crate::db::now_ms()))
}

/// Protected items as the API shows them, reading what they need at once.
pub async fn items_json(
    db: &Db,
    v: &VaultInfo,
    items: &[ItemRow],
) -> ApiResult<Vec<api::ProtectedItem>> {
    let facts = item_facts(db, items).await?;
    let now = crate::db::now_ms();
    Ok(items.iter().map(|i| item_view(v, i, &facts, now)).collect())
}

/// The view of one protected item from its row and its facts.
pub fn item_view(v: &VaultInfo, item: &ItemRow, facts: &ItemFacts, now: i64) -> api::ProtectedItem {
    let (points, latest) = facts
        .points
        .get(&item.name.to_ascii_lowercase())
        .cloned()
        .unwrap_or((0, None));
    let (policy_instance, copy_secs) = match facts.policies.get(&item.policy.to_ascii_lowercase()) {
        Some(p) => (p.instance_type.clone(), i64::from(p.copy_frequency_secs)),
        None => ("HyperVReplicaAzure".to_string(), 300),
    };
    let rpo_secs = latest.as_ref().map(|(_, t)| (now - t) / 1000);
    // The source agent's counters for this item, as last reported.
    let counters = facts
        .machine(&item.fabric, &item.machine)
        .and_then(|(agent, _)| facts.counters.get(agent))
        .and_then(|c| c.get(&item.name).cloned())
        .unwrap_or(Value::Null);
    // The source agent's own warnings (disk spool in use, resynchronization).
    let agent_warnings: Vec<String> = counters
        .get("healthWarnings")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|w| w.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let health = match (&item.last_error, item.state, rpo_secs) {
        (None, ProtectionState::ProtectionFailed, _) => "Critical",
        (Some(_), _, _) => "Warning",
        _ if item.state.replicating() && !agent_warnings.is_empty() => "Warning",
        (None, ProtectionState::Protected, Some(rpo)) if rpo > 2 * copy_secs + 60 => "Warning",
        _ => "Normal",
    };
    let mut health_errors: Vec<api::HealthError> = item
        .last_error
        .iter()
        .map(|e| api::HealthError {
            error_message: e.clone(),
            error_level: None,
            error_source: None,
        })
        .collect();
    if item.state.replicating() {
        health_errors.extend(agent_warnings.iter().map(|w| api::HealthError {
            error_message: w.clone(),
            error_level: Some("Warning".into()),
            error_source: Some("SourceAgent".into()),
        }));
    }
    // A physical server's failover output is its materialized disks; a
    // VM's is the replica the recovery agent started (with its disks).
    let failover_output: Value = item
        .failover_output
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let (failover_disks, failover_vm) = match &failover_output {
        Value::Object(o) if o.contains_key("vmName") => (
            o.get("disks").cloned().unwrap_or(Value::Null),
            replica_vm(&failover_output, None),
        ),
        other => (other.clone(), None),
    };
    let test_vm = item
        .test_output
        .as_deref()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|o| replica_vm(&o, item.test_point_id.as_deref()));
    let machine = facts
        .machine(&item.fabric, &item.machine)
        .and_then(|(_, m)| m.as_ref());
    let vm = machine.is_some_and(is_vm);
    let no_mappings = std::collections::BTreeMap::new();
    let vm_nics = match machine {
        Some(m) if vm => {
            let mappings = facts
                .network_mappings
                .get(&item.fabric.to_ascii_lowercase())
                .unwrap_or(&no_mappings);
            let test_nics: Vec<ReplicaNicView> = item
                .test_output
                .as_deref()
                .and_then(|s| serde_json::from_str::<ReplicaStarted>(s).ok())
                .map(|r| {
                    r.nics
                        .into_iter()
                        .map(|n| ReplicaNicView {
                            name: n.name,
                            network: n.network,
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(
                m.nics
                    .iter()
                    .map(|n| {
                        let mapped = mappings.get(&n.network.to_ascii_lowercase());
                        let tfo = test_nics
                            .iter()
                            .find(|t| t.name == n.name)
                            .and_then(|t| t.network.as_deref())
                            .map(|net| network_id(v, &item.target_fabric, net));
                        api::ItemNic {
                            nic_id: n.name.clone(),
                            vm_network_name: n.network.clone(),
                            mac_address: n.mac.clone(),
                            recovery_vm_network_id: mapped.map(|(rf, rn)| network_id(v, rf, rn)),
                            recovery_vm_network_name: mapped.map(|(_, rn)| rn.clone()),
                            tfo_vm_network_id: tfo,
                            selection_type: "SelectedByUser".into(),
                        }
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    let test_description = match (&item.test_error, item.test_state) {
        (Some(e), TestFailoverState::TestFailoverFailed | TestFailoverState::MarkedForDeletion) => {
            format!("{}: {e}", item.test_state.description())
        }
        _ => item.test_state.description().to_string(),
    };
    let active_location = match item.state {
        ProtectionState::UnplannedFailoverCompleted
        | ProtectionState::FailoverCommitInProgress
        | ProtectionState::FailoverCommitted => "Recovery",
        _ => "Primary",
    };
    resource(
        item_id(v, &item.fabric, &item.container, &item.name),
        &item.name,
        types::ITEM,
        api::ProtectedItemProperties {
            friendly_name: item.name.clone(),
            protected_item_type: machine
                .map(|m| m.kind.as_str())
                .unwrap_or("PhysicalServer")
                .into(),
            protectable_item_id: format!(
                "{}/replicationProtectableItems/{}",
                container_id(v, &item.fabric, &item.container),
                item.machine
            ),
            recovery_services_provider_id: item.target_agent_id.clone(),
            primary_fabric_friendly_name: item.fabric.clone(),
            recovery_fabric_friendly_name: item.target_fabric.clone(),
            primary_protection_container_friendly_name: item.container.clone(),
            recovery_protection_container_friendly_name: item.target_container.clone(),
            recovery_container_id: container_id(v, &item.target_fabric, &item.target_container),
            policy_id: policy_id(v, &item.policy),
            policy_friendly_name: item.policy.clone(),
            protection_state: item.state.as_str().into(),
            protection_state_description: item.state.description().into(),
            replication_health: health.into(),
            replication_health_errors: health_errors,
            active_location: active_location.into(),
            allowed_operations: siterec_core::state::allowed_operations(
                item.state,
                item.test_state,
                vm,
            )
            .iter()
            .map(|s| s.to_string())
            .collect(),
            last_successful_failover_time: opt_rfc3339(item.failover_ms),
            test_failover_state: item.test_state.as_str().into(),
            test_failover_state_description: test_description,
            last_successful_test_failover_time: opt_rfc3339(item.test_ms),
            provider_specific_details: api::ReplicationDetails {
                instance_type: policy_instance,
                last_replicated_time: opt_rfc3339(latest.as_ref().map(|l| l.1)),
                rpo_in_seconds: rpo_secs,
                recovery_point_count: points,
                source_agent_counters: counters,
                failover_recovery_point_id: item.failover_point_id.clone(),
                failover_disks,
                failover_vm,
                vm_nics,
                test_vm,
                multi_vm_group_id: item.group.clone(),
                multi_vm_group_name: item.group.clone(),
                multi_vm_sync_status: if item.group.is_some() {
                    "Enabled"
                } else {
                    "Disabled"
                }
                .into(),
            },
        },
    )
}

struct ReplicaNicView {
    name: String,
    network: Option<String>,
}

/// A replica VM (a StartReplica output) as the API shows it; `None` for
/// an output that is not a started replica (the job that wrote it refused
/// such an output, so only a failed start leaves none).
fn replica_vm(out: &Value, point: Option<&str>) -> Option<api::ReplicaVm> {
    let r: ReplicaStarted = serde_json::from_value(out.clone()).ok()?;
    Some(api::ReplicaVm {
        name: r.vm_name,
        run_dir: r.run_dir,
        serial_log: r.serial_log,
        disks: r.disks,
        nics: r.nics,
        recovery_point_id: point.map(str::to_string),
    })
}

pub fn point_json(v: &VaultInfo, item: &ItemRow, row: &AnyRow) -> ApiResult<api::RecoveryPoint> {
    let point_id: String = row.try_get("point_id")?;
    let consistency: String = row.try_get("consistency")?;
    Ok(resource(
        format!(
            "{}/recoveryPoints/{point_id}",
            item_id(v, &item.fabric, &item.container, &item.name)
        ),
        &point_id,
        types::POINT,
        api::RecoveryPointProperties {
            recovery_point_time: rfc3339(row.try_get("created_ms")?),
            recovery_point_type: consistency,
            provider_specific_details: api::PointDetails {
                instance_type: "Siterec".into(),
                bytes_sent: row.try_get("bytes_sent")?,
                bytes_read: row.try_get("bytes_read")?,
            },
        },
    ))
}

// ---------- jobs ----------

pub async fn job_json(db: &Db, v: &VaultInfo, job_id: &str) -> ApiResult<api::Job> {
    let row = sqlx::query("SELECT * FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| ApiError::not_found("job", job_id))?;
    let steps = sqlx::query("SELECT * FROM job_steps WHERE job_id = $1 ORDER BY idx")
        .bind(job_id)
        .fetch_all(db)
        .await?;
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    let display = JobKind::parse(&kind)
        .map(|k| k.display_name())
        .unwrap_or("Job");
    let mut tasks = Vec::new();
    for s in &steps {
        let st: String = s.try_get("state")?;
        let err: Option<String> = s.try_get("error")?;
        let output = s
            .try_get::<Option<String>, _>("output")?
            .map(|o| serde_json::from_str::<Value>(&o))
            .transpose()
            .map_err(|e| ApiError::internal("stored step output", e))?;
        let name: String = s.try_get("name")?;
        tasks.push(api::JobTask {
            task_id: format!("{job_id}-{}", s.try_get::<i64, _>("idx")?),
            name: name.clone(),
            friendly_name: name,
            state: st.clone(),
            state_description: st,
            start_time: opt_rfc3339(s.try_get("start_ms")?),
            end_time: opt_rfc3339(s.try_get("end_ms")?),
            errors: err
                .into_iter()
                .map(|e| api::TaskError {
                    task_error_details: api::TaskErrorDetails { error_message: e },
                })
                .collect(),
            custom_details: output.map(|o| api::StepDetails {
                instance_type: "SiterecStepOutput".into(),
                notes: o.get("notes").cloned(),
                output: o,
            }),
        });
    }
    let code: Option<String> = row.try_get("error_code")?;
    let message: Option<String> = row.try_get("error_message")?;
    let errors = match (code, message) {
        (Some(code), Some(message)) => vec![api::JobError {
            service_error_details: api::ErrorDetail { code, message },
            provider_error_details: None,
        }],
        _ => vec![],
    };
    let output = row
        .try_get::<Option<String>, _>("output")?
        .map(|o| serde_json::from_str::<Value>(&o))
        .transpose()
        .map_err(|e| ApiError::internal("stored job output", e))?;
    let st = JobState::parse(&state);
    Ok(resource(
        crate::model::job_id(v, job_id),
        job_id,
        types::JOB,
        api::JobProperties {
            activity_id: job_id.to_string(),
            scenario_name: kind,
            friendly_name: display.into(),
            state_description: st.map(|s| s.as_str()).unwrap_or("Unknown").into(),
            state,
            tasks,
            errors,
            start_time: opt_rfc3339(row.try_get("start_ms")?),
            end_time: opt_rfc3339(row.try_get("end_ms")?),
            allowed_actions: vec![],
            target_object_id: row.try_get("target_id")?,
            target_object_name: row.try_get("target_name")?,
            target_instance_type: row.try_get("target_type")?,
            custom_details: api::JobDetails {
                instance_type: "JobDetails".into(),
                output,
            },
        },
    ))
}

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
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO containers (fabric, name, created_ms) VALUES ($1, $2, $3)")
            .bind(fabric)
            .bind(cloud)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("INSERT INTO policies (name, body, created_ms) VALUES ('bench', $1, $2)")
        .bind(serde_json::to_string(&policy).map_err(|e| ApiError::internal("bench policy", e))?)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO container_mappings (fabric, container, name, target_fabric, target_container, policy, state, created_ms) VALUES ('bench-primary', 'primary-cloud', 'bench', 'bench-recovery', 'recovery-cloud', 'bench', 'Paired', $1)",
    )
    .bind(now)
    .execute(&mut *tx)
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
            .execute(&mut *tx)
            .await?;
            let created = now - 86_400_000 + (names.len() as i64);
            sqlx::query(
                "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, created_ms, updated_ms) VALUES ($1, 'bench-primary', 'primary-cloud', $2, 'bench', 'bench-recovery', 'recovery-cloud', 'Protected', $3, $4)",
            )
            .bind(&name)
            .bind(&name)
            .bind(created)
            .bind(now)
            .execute(&mut *tx)
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
                .execute(&mut *tx)
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
        .execute(&mut *tx)
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
