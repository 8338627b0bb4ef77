//! Rows of the vault database and their ARM JSON renderings.

use std::collections::HashMap;

use serde_json::Value;

use crate::VaultInfo;
use crate::db::{Db, opt_rfc3339, rfc3339};
use crate::error::{ApiError, ApiResult};
use crate::persist::config::{NetworkMappingRow, PairingRow};
use crate::persist::inventory::{self, AgentRow};
use crate::persist::items;
use siterec_core::state::{JobKind, JobState, ProtectionState, TestFailoverState};
use siterec_core::wire::{KIND_VM, MachineInfo, ReplicaStarted};

use siterec_api as api;
use siterec_api::types;

pub use crate::persist::inventory::AGENT_ONLINE_MS;

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
    let mut items = items::page(db, cloud, after_ms, &after_name, limit + 1).await?;
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
    inventory::fabric(db, name)
        .await?
        .ok_or_else(|| ApiError::not_found("fabric", name))
}

pub async fn container_exists(db: &Db, fabric: &str, name: &str) -> ApiResult<String> {
    let fabric = fabric_exists(db, fabric).await?;
    inventory::container(db, &fabric, name)
        .await?
        .ok_or_else(|| ApiError::not_found("protection container", &format!("{fabric}/{name}")))
}

pub async fn fabric_json(db: &Db, v: &VaultInfo, name: &str) -> ApiResult<api::Fabric> {
    let agents = inventory::agent_count(db, name).await?;
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

pub fn provider_json(row: &AgentRow, v: &VaultInfo, now: i64) -> ApiResult<api::Provider> {
    let AgentRow {
        id,
        fabric,
        hostname,
        version,
        last_seen_ms: last_seen,
        cloud,
        data_url,
        counters,
    } = row.clone();
    let online = last_seen.is_some_and(|t| now - t < AGENT_ONLINE_MS);
    Ok(resource(
        format!(
            "{}/replicationRecoveryServicesProviders/{id}",
            fabric_id(v, &fabric)
        ),
        &id,
        types::PROVIDER,
        api::ProviderProperties {
            friendly_name: hostname,
            fabric_friendly_name: fabric,
            provider_version: version,
            connection_status: if online { "Connected" } else { "NotConnected" }.into(),
            last_heart_beat: opt_rfc3339(last_seen),
            protection_container_friendly_name: cloud,
            data_endpoint: data_url,
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
    let paired = inventory::container_pairing(db, fabric, name).await?;
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
    protected: Option<ProtectionState>,
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
            // The protecting item's state, as it changes (failed over,
            // committed, …); a machine no item protects is Unprotected.
            protection_status: protected
                .map_or("Unprotected", ProtectionState::as_str)
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
    Ok(inventory::network_agents(db, fabric, name).await?)
}

/// The networks of a fabric (as its agents spell them), sorted.
pub async fn fabric_networks(db: &Db, fabric: &str) -> ApiResult<Vec<String>> {
    let mut names = inventory::fabric_networks(db, fabric).await?;
    names.sort_by_key(|n| n.to_ascii_lowercase());
    names.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    Ok(names)
}

/// A network of a fabric by name, as its agents spell it; 404 naming the
/// fabric's networks otherwise.
pub async fn network_exists(db: &Db, fabric: &str, name: &str) -> ApiResult<String> {
    let fabric = fabric_exists(db, fabric).await?;
    let found = inventory::network(db, &fabric, name).await?;
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

pub fn network_mapping_json(v: &VaultInfo, row: &NetworkMappingRow) -> api::NetworkMapping {
    let NetworkMappingRow {
        fabric,
        network,
        name,
        recovery_fabric: rf,
        recovery_network: rn,
        instance_type: instance,
        state,
    } = row.clone();
    resource(
        network_mapping_id(v, &fabric, &network, &name),
        &name,
        types::NETWORK_MAPPING,
        api::NetworkMappingProperties {
            state,
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
    )
}

pub use crate::persist::config::paired_network_mappings;

/// The machine an item protects, as its agent last reported it.
pub async fn machine_info(db: &Db, fabric: &str, machine: &str) -> ApiResult<Option<MachineInfo>> {
    inventory::machine_info(db, fabric, machine)
        .await?
        .map(|i| {
            serde_json::from_str(&i).map_err(|e| {
                ApiError::internal(&format!("stored report of machine '{machine}'"), e)
            })
        })
        .transpose()
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
            provider_specific_details: api::PolicyDetails::from(policy),
        },
    )
}

pub async fn load_policy(db: &Db, name: &str) -> ApiResult<(String, siterec_core::policy::Policy)> {
    let (name, body) = crate::persist::config::policy(db, name)
        .await?
        .ok_or_else(|| ApiError::not_found("replication policy", name))?;
    let policy = serde_json::from_str(&body).map_err(|e| ApiError::internal("stored policy", e))?;
    Ok((name, policy))
}

pub fn mapping_json(v: &VaultInfo, row: &PairingRow) -> api::ContainerMapping {
    let PairingRow {
        fabric,
        container,
        name,
        target_fabric: tf,
        target_container: tc,
        policy,
        state,
    } = row.clone();
    resource(
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
            state,
            health: "Normal".into(),
        },
    )
}

// ---------- protected items and recovery points ----------

pub use crate::persist::items::ItemRow;

pub async fn load_item(db: &Db, name: &str) -> ApiResult<ItemRow> {
    items::load(db, name)
        .await?
        .ok_or_else(|| ApiError::not_found("protected item", name))
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

/// Reads the [`ItemFacts`] of `items`.
pub async fn item_facts(db: &Db, items: &[ItemRow]) -> ApiResult<ItemFacts> {
    let mut facts = ItemFacts::default();
    if items.is_empty() {
        return Ok(facts);
    }
    let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
    for (item, point, created) in items::listed_points_of(db, &names).await? {
        let e = facts
            .points
            .entry(item.to_ascii_lowercase())
            .or_insert((0, None));
        e.0 += 1;
        if e.1.as_ref().is_none_or(|(_, t)| created > *t) {
            e.1 = Some((point, created));
        }
    }
    for (name, body) in crate::persist::config::policies(db).await? {
        let p = serde_json::from_str(&body)
            .map_err(|e| ApiError::internal(&format!("stored policy '{name}'"), e))?;
        facts.policies.insert(name.to_ascii_lowercase(), p);
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
        for (fabric, name, agent, info) in inventory::machines_named(db, fabric, machines).await? {
            let info = serde_json::from_str(&info).map_err(|e| {
                ApiError::internal(&format!("stored report of machine '{name}'"), e)
            })?;
            facts.machines.insert(
                (fabric.to_ascii_lowercase(), name.to_ascii_lowercase()),
                (agent, Some(info)),
            );
        }
    }
    let mut agents: Vec<&str> = facts.machines.values().map(|(a, _)| a.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    if !agents.is_empty() {
        for (id, counters) in inventory::agent_counters(db, &agents).await? {
            let c = serde_json::from_str::<Value>(&counters)
                .map_err(|e| ApiError::internal(&format!("stored counters of agent {id}"), e))?;
            facts.counters.insert(id, c);
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
    // Unhealthy past the policy's RPO threshold (by default two copy
    // intervals and a minute).
    let (policy_instance, threshold_secs) =
        match facts.policies.get(&item.policy.to_ascii_lowercase()) {
            Some(p) => (p.instance_type.clone(), p.rpo_threshold_secs()),
            None => ("HyperVReplicaAzure".to_string(), 2 * 300 + 60),
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
        (None, ProtectionState::Protected, Some(rpo)) if rpo > threshold_secs => "Warning",
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
    let test_output = item
        .test_output
        .as_deref()
        .and_then(|s| serde_json::from_str::<Value>(s).ok());
    let test_vm = test_output
        .as_ref()
        .and_then(|o| replica_vm(o, item.test_point_id.as_deref()));
    // A physical server's test copy is its disks.
    let test_disks = match &test_output {
        Some(o) if test_vm.is_none() => o.get("disks").cloned().unwrap_or(Value::Null),
        _ => Value::Null,
    };
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
            active_location: item.active.as_str().into(),
            allowed_operations: siterec_core::state::allowed_operations(
                item.life(),
                item.test_state,
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
                test_disks,
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

pub fn point_json(v: &VaultInfo, item: &ItemRow, row: &items::PointRow) -> api::RecoveryPoint {
    resource(
        format!(
            "{}/recoveryPoints/{}",
            item_id(v, &item.fabric, &item.container, &item.name),
            row.point_id
        ),
        &row.point_id,
        types::POINT,
        api::RecoveryPointProperties {
            recovery_point_time: rfc3339(row.created_ms),
            recovery_point_type: row.consistency.clone(),
            provider_specific_details: api::PointDetails {
                instance_type: "Siterec".into(),
                bytes_sent: row.bytes_sent,
                bytes_read: row.bytes_read,
            },
        },
    )
}

// ---------- events and alert settings ----------

pub fn event_json(v: &VaultInfo, row: &crate::persist::events::EventRow) -> ApiResult<api::Event> {
    let details: Value = serde_json::from_str(&row.details)
        .map_err(|e| ApiError::internal(&format!("stored details of event {}", row.name), e))?;
    Ok(resource(
        format!("{}/replicationEvents/{}", v.id(), row.name),
        &row.name,
        types::EVENT,
        api::EventProperties {
            event_code: row.code.clone(),
            description: row.summary.clone(),
            event_type: row.kind.clone(),
            affected_object_friendly_name: row.object_name.clone(),
            affected_object_correlation_id: row.correlation_id.clone(),
            severity: row.severity.clone(),
            time_of_occurrence: rfc3339(row.time_ms),
            fabric_id: row.fabric.as_deref().map(|f| fabric_id(v, f)),
            event_specific_details: details,
        },
    ))
}

pub fn alert_json(v: &VaultInfo, row: &crate::persist::events::AlertRow) -> api::AlertSetting {
    resource(
        format!("{}/replicationAlertSettings/{}", v.id(), row.name),
        &row.name,
        types::ALERT_SETTING,
        api::AlertProperties {
            send_to_owners: row.send_to_owners.clone(),
            custom_email_addresses: row.emails.clone(),
            locale: row.locale.clone(),
            webhook_url: row.webhook_url.clone(),
        },
    )
}

// ---------- jobs ----------

pub async fn job_json(db: &Db, v: &VaultInfo, job_id: &str) -> ApiResult<api::Job> {
    let row = crate::persist::jobs::view(db, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", job_id))?;
    let steps = crate::persist::jobs::step_views(db, job_id).await?;
    let kind = row.kind.clone();
    let state = row.state.clone();
    let display = JobKind::parse(&kind)
        .map(|k| k.display_name())
        .unwrap_or("Job");
    let mut tasks = Vec::new();
    for s in steps {
        let st = s.state;
        let err = s.error;
        let output = s
            .output
            .map(|o| serde_json::from_str::<Value>(&o))
            .transpose()
            .map_err(|e| ApiError::internal("stored step output", e))?;
        let name = s.name;
        tasks.push(api::JobTask {
            task_id: format!("{job_id}-{}", s.idx),
            name: name.clone(),
            friendly_name: name,
            state: st.clone(),
            state_description: st,
            start_time: opt_rfc3339(s.start_ms),
            end_time: opt_rfc3339(s.end_ms),
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
    let errors = match (row.error_code, row.error_message) {
        (Some(code), Some(message)) => vec![api::JobError {
            service_error_details: api::ErrorDetail { code, message },
            provider_error_details: None,
        }],
        _ => vec![],
    };
    let output = row
        .output
        .map(|o| serde_json::from_str::<Value>(&o))
        .transpose()
        .map_err(|e| ApiError::internal("stored job output", e))?;
    let custom_details = if kind == JobKind::ExportJobs.as_str() {
        export_details(output.as_ref())
    } else {
        api::JobDetails {
            instance_type: "JobDetails".into(),
            output,
            blob_uri: None,
            sas_token: None,
        }
    };
    let st = JobState::parse(&state);
    let plan = JobKind::parse(&kind).is_some_and(|k| k.is_plan());
    let allowed_actions = match st {
        Some(JobState::Suspended) => vec!["Resume".to_string(), "Cancel".to_string()],
        Some(JobState::Failed) if plan => vec!["Restart".to_string()],
        Some(JobState::NotStarted | JobState::InProgress) if plan => vec!["Cancel".to_string()],
        _ => vec![],
    };
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
            start_time: opt_rfc3339(row.start_ms),
            end_time: opt_rfc3339(row.end_ms),
            allowed_actions,
            target_object_id: row.target_id,
            target_object_name: row.target_name,
            target_instance_type: row.target_type,
            custom_details,
        },
    ))
}

/// What an export job keeps as its output (`jobs.output`): its CSV, and
/// where the API serves it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportOutput {
    pub blob_uri: String,
    pub sas_token: String,
    pub rows: usize,
    pub csv: String,
}

#[derive(serde::Serialize)]
struct ExportSummary {
    rows: Option<usize>,
}

/// An export job's details: where its CSV is, and how many rows it has
/// (the CSV itself is served at `blobUri`, not shown in the job).
fn export_details(output: Option<&Value>) -> api::JobDetails {
    let out = output.and_then(|o| serde_json::from_value::<ExportOutput>(o.clone()).ok());
    api::JobDetails {
        instance_type: "ExportJobDetails".into(),
        output: serde_json::to_value(ExportSummary {
            rows: out.as_ref().map(|o| o.rows),
        })
        .ok(),
        blob_uri: out.as_ref().map(|o| o.blob_uri.clone()),
        sas_token: out.map(|o| o.sas_token),
    }
}

pub use crate::persist::seed::seed_fleet;
