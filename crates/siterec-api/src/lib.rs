//! The Site Recovery API as siterec serves it: resources, their properties,
//! list envelopes, long-running operation answers and ARM errors, as typed
//! serde structs. The vault answers with these, the CLI reads them, the
//! tests check them: one definition of the wire format.
//!
//! Names and shapes follow the Site Recovery API (api-version
//! [`siterec_core::names::API_VERSION`]): camelCase properties, resources
//! as `{id, name, type, location, properties}`, lists as `{value,
//! nextLink}`. Where siterec says more than Site Recovery does (an agent's
//! counters, a replica VM's run directory) the extra fields sit inside the
//! `customDetails` / `providerSpecificDetails` objects, as ARM providers do.
//! Optional values are written as `null`, not left out, so that a client
//! sees every field the vault knows of.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use siterec_core::wire::{DiskInfo, MaterializedDisk, ReplicaNic};

/// The `type` of each resource.
pub mod types {
    pub const VAULT: &str = "Microsoft.RecoveryServices/vaults";
    pub const FABRIC: &str = "Microsoft.RecoveryServices/vaults/replicationFabrics";
    pub const PROVIDER: &str =
        "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationRecoveryServicesProviders";
    pub const CONTAINER: &str =
        "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationProtectionContainers";
    pub const PROTECTABLE: &str = "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationProtectionContainers/replicationProtectableItems";
    pub const MAPPING: &str = "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationProtectionContainers/replicationProtectionContainerMappings";
    pub const ITEM: &str = "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationProtectionContainers/replicationProtectedItems";
    pub const POINT: &str = "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationProtectionContainers/replicationProtectedItems/recoveryPoints";
    pub const POLICY: &str = "Microsoft.RecoveryServices/vaults/replicationPolicies";
    pub const NETWORK: &str =
        "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationNetworks";
    pub const NETWORK_MAPPING: &str = "Microsoft.RecoveryServices/vaults/replicationFabrics/replicationNetworks/replicationNetworkMappings";
    pub const JOB: &str = "Microsoft.RecoveryServices/vaults/replicationJobs";
    pub const RECOVERY_PLAN: &str = "Microsoft.RecoveryServices/vaults/replicationRecoveryPlans";
    pub const EVENT: &str = "Microsoft.RecoveryServices/vaults/replicationEvents";
    pub const ALERT_SETTING: &str = "Microsoft.RecoveryServices/vaults/replicationAlertSettings";
}

/// The location siterec's resources report.
pub const LOCATION: &str = "local";

/// An ARM resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource<P> {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub location: String,
    pub properties: P,
}

impl<P> Resource<P> {
    pub fn new(id: String, name: &str, kind: &str, properties: P) -> Self {
        Resource {
            id,
            name: name.to_string(),
            kind: kind.to_string(),
            location: LOCATION.to_string(),
            properties,
        }
    }
}

/// A page of a list. `nextLink` is absent on the last page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct List<T> {
    pub value: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
}

impl<T> List<T> {
    pub fn all(value: Vec<T>) -> Self {
        List {
            value,
            next_link: None,
        }
    }
}

/// An ARM error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The answer of a long-running operation's 202: the job that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub job_id: String,
}

/// The Azure-AsyncOperation status of a long-running operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    pub id: String,
    pub name: String,
    /// InProgress, Succeeded, Failed or Canceled.
    pub status: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// `{"instanceType": ...}` alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceType {
    pub instance_type: String,
}

// ---------- the vault and its fabrics ----------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultProperties {
    pub provisioning_state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricProperties {
    pub friendly_name: String,
    pub internal_identifier: String,
    pub health: String,
    pub custom_details: FabricDetails,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricDetails {
    pub instance_type: String,
    /// Agents enrolled in the site.
    pub agents: i64,
}

/// An agent, as a Recovery Services provider of its fabric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderProperties {
    pub friendly_name: String,
    pub fabric_friendly_name: String,
    pub provider_version: String,
    /// Connected or NotConnected.
    pub connection_status: String,
    pub last_heart_beat: Option<String>,
    pub protection_container_friendly_name: Option<String>,
    /// A recovery agent's data endpoint (where sources send chunks).
    pub data_endpoint: Option<String>,
    /// The agent's counters per replicated item, as it last reported them.
    pub counters: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerProperties {
    pub friendly_name: String,
    pub fabric_friendly_name: String,
    pub fabric_type: String,
    /// Paired or NotPaired.
    pub pairing_status: String,
    /// Primary, Recovery or empty.
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtectableItemProperties {
    pub friendly_name: String,
    /// Protected or Unprotected.
    pub protection_status: String,
    pub protection_readiness_errors: Vec<String>,
    pub supported_replication_providers: Vec<String>,
    pub custom_details: ProtectableDetails,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtectableDetails {
    /// PhysicalServer or VirtualMachine.
    pub instance_type: String,
    pub disks: Vec<DiskInfo>,
    pub vm_nics: Vec<VmNic>,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
}

/// A NIC of a machine, as the SDK's VMNicDetails (`nicId`,
/// `vMNetworkName`), with its MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmNic {
    pub nic_id: String,
    #[serde(rename = "vMNetworkName")]
    pub vm_network_name: String,
    pub mac_address: Option<String>,
}

// ---------- networks ----------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkProperties {
    pub fabric_type: String,
    pub friendly_name: String,
    pub network_type: String,
    pub subnets: Vec<Value>,
    /// The agents of the fabric that report the network.
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMappingProperties {
    /// Pairing, Paired or Unpairing.
    pub state: String,
    pub primary_network_friendly_name: String,
    pub primary_network_id: String,
    pub primary_fabric_friendly_name: String,
    pub recovery_network_friendly_name: String,
    pub recovery_network_id: String,
    pub recovery_fabric_arm_id: String,
    pub recovery_fabric_friendly_name: String,
    pub fabric_specific_settings: InstanceType,
}

// ---------- policies and cloud pairings ----------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyProperties {
    pub friendly_name: String,
    pub provider_specific_details: PolicyDetails,
}

/// A policy's settings as its provider names them (HyperVReplicaAzure's
/// policy details; the same names the input takes, so a policy read back
/// can be written again as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDetails {
    pub instance_type: String,
    pub replication_interval: u32,
    pub replication_frequency_in_seconds: u32,
    pub application_consistent_snapshot_frequency_in_hours: u32,
    /// Enable or Disable.
    pub compression: String,
    /// Enable or Disable.
    pub encryption: String,
    /// Required or NotRequired: delete the replica when protection is disabled.
    #[serde(default = "not_required")]
    pub replica_deletion: String,
    /// OverNetwork or Offline.
    pub initial_replication_method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_replication_export_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_replication_import_path: Option<String>,
    /// Retention by age, hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_history_duration: Option<u32>,
    /// Retention by count: points kept besides the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_points: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_replication_start_time: Option<String>,
    /// The RPO alert threshold (ASR InMage's name), minutes, rounded up;
    /// absent when the policy sets none (the vault then uses two copy
    /// intervals and a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_threshold_in_minutes: Option<u32>,
    /// siterec extension: the same threshold exactly, in seconds (it may
    /// be under a minute for continuous replication); on input it wins
    /// over the minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_threshold_in_seconds: Option<u32>,
}

fn not_required() -> String {
    "NotRequired".into()
}

impl From<&siterec_core::policy::Policy> for PolicyDetails {
    fn from(p: &siterec_core::policy::Policy) -> Self {
        use siterec_core::policy::Retention;
        let enable = |on: bool| if on { "Enable" } else { "Disable" }.to_string();
        let (hours, points) = match p.retention {
            Retention::Hours { hours } => (Some(hours), None),
            Retention::Count { additional } => (None, Some(additional)),
        };
        PolicyDetails {
            instance_type: p.instance_type.clone(),
            replication_interval: p.copy_frequency_secs,
            replication_frequency_in_seconds: p.copy_frequency_secs,
            application_consistent_snapshot_frequency_in_hours: p.app_consistent_frequency_hours,
            compression: enable(p.compression),
            encryption: enable(p.encryption),
            replica_deletion: if p.replica_deletion {
                "Required"
            } else {
                "NotRequired"
            }
            .into(),
            initial_replication_method: if p.offline.is_some() {
                "Offline"
            } else {
                "OverNetwork"
            }
            .into(),
            offline_replication_export_path: p.offline.as_ref().map(|o| o.export_path.clone()),
            offline_replication_import_path: p.offline.as_ref().map(|o| o.import_path.clone()),
            recovery_point_history_duration: hours,
            recovery_points: points,
            online_replication_start_time: p.start_time_rfc3339(),
            recovery_point_threshold_in_minutes: p.rpo_threshold_secs.map(|s| s.div_ceil(60)),
            rpo_threshold_in_seconds: p.rpo_threshold_secs,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerMappingProperties {
    pub source_fabric_friendly_name: String,
    pub source_protection_container_friendly_name: String,
    pub target_fabric_friendly_name: String,
    pub target_protection_container_friendly_name: String,
    pub target_protection_container_id: String,
    pub policy_id: String,
    pub policy_friendly_name: String,
    /// Pairing or Paired.
    pub state: String,
    pub health: String,
}

// ---------- protected items and recovery points ----------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedItemProperties {
    pub friendly_name: String,
    pub protected_item_type: String,
    pub protectable_item_id: String,
    /// The recovery agent.
    pub recovery_services_provider_id: Option<String>,
    pub primary_fabric_friendly_name: String,
    pub recovery_fabric_friendly_name: String,
    pub primary_protection_container_friendly_name: String,
    pub recovery_protection_container_friendly_name: String,
    pub recovery_container_id: String,
    pub policy_id: String,
    pub policy_friendly_name: String,
    pub protection_state: String,
    pub protection_state_description: String,
    /// Normal, Warning or Critical.
    pub replication_health: String,
    pub replication_health_errors: Vec<HealthError>,
    /// Primary or Recovery.
    pub active_location: String,
    pub allowed_operations: Vec<String>,
    pub last_successful_failover_time: Option<String>,
    pub test_failover_state: String,
    pub test_failover_state_description: String,
    pub last_successful_test_failover_time: Option<String>,
    pub provider_specific_details: ReplicationDetails,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthError {
    pub error_message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationDetails {
    /// The policy's instance type.
    pub instance_type: String,
    pub last_replicated_time: Option<String>,
    pub rpo_in_seconds: Option<i64>,
    pub recovery_point_count: i64,
    /// The source agent's counters for the item, as last reported.
    pub source_agent_counters: Value,
    pub failover_recovery_point_id: Option<String>,
    /// The disks a failover wrote (a server's images, or a VM's disks).
    pub failover_disks: Value,
    /// The VM a failover started.
    pub failover_vm: Option<ReplicaVm>,
    /// A VM's NICs and where they go at failover and test failover.
    pub vm_nics: Option<Vec<ItemNic>>,
    /// The VM of the test failover in progress.
    pub test_vm: Option<ReplicaVm>,
    /// A physical server's test copy: the disks its test failover wrote
    /// (null when none).
    #[serde(default)]
    pub test_disks: Value,
    /// As the SDK's InMageAzureV2ReplicationDetails: a group's id is its
    /// name (as Azure PowerShell sets both).
    pub multi_vm_group_id: Option<String>,
    pub multi_vm_group_name: Option<String>,
    /// Enabled or Disabled.
    pub multi_vm_sync_status: String,
}

/// A replica VM the recovery agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaVm {
    pub name: String,
    pub run_dir: String,
    pub serial_log: String,
    pub disks: Vec<MaterializedDisk>,
    pub nics: Vec<ReplicaNic>,
    /// A test VM's recovery point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_id: Option<String>,
}

/// A protected VM's NIC, as the SDK's VMNicDetails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemNic {
    pub nic_id: String,
    #[serde(rename = "vMNetworkName")]
    pub vm_network_name: String,
    pub mac_address: Option<String>,
    /// Where a failover connects it (per the network mappings).
    #[serde(rename = "recoveryVMNetworkId")]
    pub recovery_vm_network_id: Option<String>,
    #[serde(rename = "recoveryVMNetworkName")]
    pub recovery_vm_network_name: Option<String>,
    /// Where the test failover in progress connected it.
    #[serde(rename = "tfoVMNetworkId")]
    pub tfo_vm_network_id: Option<String>,
    pub selection_type: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointProperties {
    pub recovery_point_time: String,
    /// CrashConsistent or ApplicationConsistent.
    pub recovery_point_type: String,
    pub provider_specific_details: PointDetails,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PointDetails {
    pub instance_type: String,
    pub bytes_sent: i64,
    pub bytes_read: i64,
}

// ---------- jobs ----------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobProperties {
    pub activity_id: String,
    /// The job's kind ([`siterec_core::state::JobKind::as_str`]).
    pub scenario_name: String,
    pub friendly_name: String,
    pub state: String,
    pub state_description: String,
    pub tasks: Vec<JobTask>,
    pub errors: Vec<JobError>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub allowed_actions: Vec<String>,
    pub target_object_id: String,
    pub target_object_name: String,
    pub target_instance_type: String,
    pub custom_details: JobDetails,
}

/// A step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobTask {
    pub task_id: String,
    pub name: String,
    pub friendly_name: String,
    pub state: String,
    pub state_description: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub errors: Vec<TaskError>,
    pub custom_details: Option<StepDetails>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskError {
    pub task_error_details: TaskErrorDetails,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskErrorDetails {
    pub error_message: String,
}

/// What a step wanted the operator to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepDetails {
    pub instance_type: String,
    pub notes: Option<Value>,
    pub output: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobError {
    pub service_error_details: ErrorDetail,
    pub provider_error_details: Option<ErrorDetail>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobDetails {
    /// `JobDetails`, or `ExportJobDetails` for a jobs export.
    pub instance_type: String,
    /// A job's own output (a store verification's reports, an export's
    /// row count).
    pub output: Option<Value>,
    /// An export's CSV: where to GET it from the vault (ASR gives a blob's
    /// URL; siterec serves it itself, with the API's bearer token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_uri: Option<String>,
    /// What to append to `blobUri` (ASR: a SAS token; here the query
    /// string with the `api-version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_token: Option<String>,
}

// ---------- inputs ----------
//
// What a client sends. Optional fields the client did not set are left out
// (the vault tells a missing field from a null one only where ARM does).

/// A PUT or POST body: `{"properties": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input<P> {
    pub properties: P,
}

/// PUT replicationPolicies/{name} (the SDK's CreatePolicyInput).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatePolicyInput {
    pub provider_specific_input: PolicyProviderInput,
}

/// The replication settings of a policy, as HyperVReplicaAzurePolicyInput
/// (and the other providers) name them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyProviderInput {
    pub instance_type: String,
    /// Seconds between recovery points.
    pub replication_interval: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_history_duration: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_points: Option<u32>,
    pub application_consistent_snapshot_frequency_in_hours: u32,
    /// Enable or Disable.
    pub compression: String,
    /// Enable or Disable (siterec: encrypt what the store holds).
    pub encryption: String,
    /// Required or NotRequired (the default): delete the replica when
    /// protection is disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_deletion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_replication_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_replication_export_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_replication_import_path: Option<String>,
    /// The RPO alert threshold, minutes (ASR InMage's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_threshold_in_minutes: Option<u32>,
    /// siterec extension: the threshold in seconds (wins over minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_threshold_in_seconds: Option<u32>,
}

/// PUT …/replicationProtectionContainerMappings/{name}.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateContainerMappingInput {
    pub target_protection_container_id: String,
    pub policy_id: String,
    pub provider_specific_input: InstanceType,
}

/// PUT …/replicationProtectedItems/{name} (EnableProtectionInput).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnableProtectionInput {
    pub protectable_item_id: String,
    /// The pairing's policy when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    pub provider_specific_details: EnableProtectionDetails,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnableProtectionDetails {
    pub instance_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_vm_group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_vm_group_name: Option<String>,
}

/// POST …/unplannedFailover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnplannedFailoverInput {
    pub failover_direction: String,
    pub source_site_operations: String,
    pub provider_specific_details: FailoverDetails,
}

/// POST …/plannedFailover (the SDK's `PlannedFailoverInput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedFailoverInput {
    /// PrimaryToRecovery, or RecoveryToPrimary (failback).
    pub failover_direction: String,
    pub provider_specific_details: PlannedFailoverDetails,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedFailoverDetails {
    pub instance_type: String,
    /// siterec's own: the operator says the source server is stopped
    /// (siterec cannot stop a physical server).
    #[serde(default)]
    pub source_stopped: bool,
    /// The recovery key of an encrypted store, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_kek_certificate_pfx: Option<String>,
    /// siterec's own, for a VM: how long the guest has to power off after
    /// the ACPI power-down (default 120 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_seconds: Option<u32>,
    /// siterec's own, for a VM: power it off when the guest does not
    /// power off in time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_shutdown: bool,
}

/// POST …/applyRecoveryPoint (the SDK's `ApplyRecoveryPointInput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyRecoveryPointInput {
    /// The recovery point's id.
    pub recovery_point_id: String,
    pub provider_specific_details: PlannedFailoverDetails,
}

/// POST …/remove (the SDK's `DisableProtectionInput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DisableProtectionInput {
    /// NotSpecified or MigrationComplete.
    pub disable_protection_reason: String,
}

/// POST …/reProtect (the SDK's `ReverseReplicationInput`): replication
/// from where the machine runs back to the site it left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReverseReplicationInput {
    /// RecoveryToPrimary after a failover, PrimaryToRecovery after a
    /// failback; checked against where the machine runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_direction: Option<String>,
}

/// POST …/testFailover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverInput {
    pub failover_direction: String,
    /// NoNetworkAttachAsInput (isolated) or VmNetworkAsInput.
    pub network_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_id: Option<String>,
    pub provider_specific_details: FailoverDetails,
}

/// The point and key of a failover or test failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverDetails {
    pub instance_type: String,
    /// The latest point when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_id: Option<String>,
    /// The recovery key of an encrypted store, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_kek_certificate_pfx: Option<String>,
}

/// POST …/testFailoverCleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverCleanupInput {
    pub comments: String,
}

/// PUT …/replicationNetworkMappings/{name}.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateNetworkMappingInput {
    pub recovery_fabric_name: String,
    pub recovery_network_id: String,
    pub fabric_specific_details: InstanceType,
}

/// POST siterecRegistrationKeys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyInput {
    pub fabric: String,
    pub valid_seconds: Option<i64>,
}

// ---------- siterec's own resources ----------

/// A registration key (siterec's enrolment secret for agents of a fabric),
/// as listed: the secret itself is only in the key file made at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationKey {
    pub key_id: String,
    pub fabric: String,
    pub created_time: String,
    pub expiry_time: String,
    /// Valid, Expired or Revoked.
    pub state: String,
}

/// The answer to revoking a registration key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRevoked {
    pub key_id: String,
    pub state: String,
}

pub type Fabric = Resource<FabricProperties>;
pub type Provider = Resource<ProviderProperties>;
pub type Container = Resource<ContainerProperties>;
pub type ProtectableItem = Resource<ProtectableItemProperties>;
pub type Network = Resource<NetworkProperties>;
pub type NetworkMapping = Resource<NetworkMappingProperties>;
pub type Policy = Resource<PolicyProperties>;
pub type ContainerMapping = Resource<ContainerMappingProperties>;
pub type ProtectedItem = Resource<ProtectedItemProperties>;
pub type RecoveryPoint = Resource<RecoveryPointProperties>;
pub type Job = Resource<JobProperties>;
pub type RecoveryPlan = Resource<RecoveryPlanProperties>;
pub type Vault = Resource<VaultProperties>;

// ---------- events and alert settings ----------

/// An event (ASR `Event`): something the vault noticed — a replication
/// health change, an RPO over its policy's threshold, a server not heard
/// from, a failover's outcome.
pub type Event = Resource<EventProperties>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventProperties {
    /// What happened, as a stable code (e.g. `RpoThresholdExceeded`).
    pub event_code: String,
    pub description: String,
    /// The kind of object it is about: `ProtectedItem`, `Server` or `Job`.
    pub event_type: String,
    /// The item's, agent's (its host name) or job's name.
    pub affected_object_friendly_name: String,
    /// The item's or job's name, or the agent's id.
    pub affected_object_correlation_id: String,
    /// Critical, Warning or Info.
    pub severity: String,
    /// RFC 3339 (the spec spells it `timeOfOccurrence`).
    pub time_of_occurrence: String,
    /// The fabric (site) it happened at, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_id: Option<String>,
    /// What was observed (RPO and threshold, last heartbeat, the job).
    pub event_specific_details: serde_json::Value,
}

/// Alert settings (ASR `Alert`). Only `defaultAlertSetting` exists.
pub type AlertSetting = Resource<AlertProperties>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertProperties {
    /// Send to the subscription's owners: Send or DoNotSend (stored only).
    pub send_to_owners: String,
    /// Stored; siterec has no mail server to send through.
    pub custom_email_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// siterec extension: every new event is POSTed here as JSON (the
    /// event resource), retried with backoff until it is answered 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// The body of PUT `replicationAlertSettings/{name}` (ASR
/// `ConfigureAlertRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureAlertRequest {
    pub properties: ConfigureAlertProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureAlertProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_to_owners: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_email_addresses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// siterec extension (see [`AlertProperties::webhook_url`]); an empty
    /// string removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resources_and_lists_have_the_arm_shape() {
        let r = Resource::new(
            "/x/vaults/v/replicationFabrics/f".into(),
            "f",
            types::FABRIC,
            FabricProperties {
                friendly_name: "f".into(),
                internal_identifier: "f".into(),
                health: "Normal".into(),
                custom_details: FabricDetails {
                    instance_type: "SiterecSite".into(),
                    agents: 2,
                },
            },
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["type"], types::FABRIC);
        assert_eq!(v["location"], "local");
        assert_eq!(v["properties"]["customDetails"]["agents"], 2);
        let back: Fabric = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        // The last page has no nextLink; others have one.
        let last = serde_json::to_value(List::all(vec![1])).unwrap();
        assert_eq!(last, json!({"value": [1]}));
        let page: List<i32> =
            serde_json::from_value(json!({"value": [], "nextLink": "https://n"})).unwrap();
        assert_eq!(page.next_link.as_deref(), Some("https://n"));
    }

    #[test]
    fn a_policy_read_back_writes_the_same_policy() {
        use siterec_core::policy::Policy;
        for input in [
            json!({"instanceType": "HyperVReplicaAzure", "recoveryPointHistoryDuration": 3, "replicationInterval": 300, "onlineReplicationStartTime": "2026-01-31T22:00:00Z"}),
            json!({"instanceType": "InMageAzureV2", "replicationInterval": 30, "recoveryPoints": 2, "compression": "Disable", "encryption": "Enable", "applicationConsistentSnapshotFrequencyInHours": 1}),
            json!({"instanceType": "HyperVReplicaAzure", "replicationInterval": 300, "initialReplicationMethod": "Offline", "offlineReplicationExportPath": "/mnt/export", "offlineReplicationImportPath": "/mnt/import"}),
            json!({"instanceType": "InMageAzureV2", "replicationInterval": 30, "recoveryPointThresholdInMinutes": 15}),
            json!({"instanceType": "InMageAzureV2", "replicationInterval": 5, "rpoThresholdInSeconds": 90}),
        ] {
            let p = Policy::from_arm_input(&input).unwrap();
            let details = PolicyDetails::from(&p);
            let v = serde_json::to_value(&details).unwrap();
            assert_eq!(Policy::from_arm_input(&v).unwrap(), p, "{v}");
            assert_eq!(serde_json::from_value::<PolicyDetails>(v).unwrap(), details);
        }
        let offline = Policy::from_arm_input(&json!({"instanceType": "HyperVReplicaAzure", "replicationInterval": 300, "initialReplicationMethod": "Offline", "offlineReplicationExportPath": "/mnt/export", "offlineReplicationImportPath": "/mnt/import"})).unwrap();
        let v = serde_json::to_value(PolicyDetails::from(&offline)).unwrap();
        assert_eq!(v["initialReplicationMethod"], "Offline");
        assert_eq!(v["offlineReplicationImportPath"], "/mnt/import");
        assert_eq!(v["replicationFrequencyInSeconds"], 300);
    }

    #[test]
    fn nic_fields_are_named_as_the_sdk_names_them() {
        let nic = ItemNic {
            nic_id: "eth0".into(),
            vm_network_name: "prod".into(),
            mac_address: None,
            recovery_vm_network_id: Some("/n".into()),
            recovery_vm_network_name: Some("dr".into()),
            tfo_vm_network_id: None,
            selection_type: "SelectedByUser".into(),
        };
        let v = serde_json::to_value(&nic).unwrap();
        for key in [
            "nicId",
            "vMNetworkName",
            "macAddress",
            "recoveryVMNetworkId",
            "recoveryVMNetworkName",
            "tfoVMNetworkId",
            "selectionType",
        ] {
            assert!(v.get(key).is_some(), "{key} in {v}");
        }
        // Unknown optional values are written as null, not left out.
        assert!(v["macAddress"].is_null());
    }
}

// ---------- recovery plans ----------

/// A recovery plan (the SDK's `RecoveryPlanProperties`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanProperties {
    pub friendly_name: String,
    pub primary_fabric_id: String,
    pub primary_fabric_friendly_name: String,
    pub recovery_fabric_id: String,
    pub recovery_fabric_friendly_name: String,
    pub failover_deployment_model: String,
    pub replication_providers: Vec<String>,
    /// What every machine of the plan allows now.
    pub allowed_operations: Vec<String>,
    pub last_planned_failover_time: Option<String>,
    pub last_unplanned_failover_time: Option<String>,
    pub last_test_failover_time: Option<String>,
    /// The plan's job that runs now, if one does.
    pub current_scenario: Option<CurrentScenario>,
    pub current_scenario_status: Option<String>,
    pub current_scenario_status_description: Option<String>,
    pub groups: Vec<RecoveryPlanGroup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentScenario {
    pub scenario_name: String,
    pub job_id: String,
    pub start_time: Option<String>,
}

/// A group of a plan: Shutdown and Failover groups (which siterec keeps
/// empty), then the Boot groups (Group 1, 2, ...) that hold the machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanGroup {
    /// Shutdown, Failover or Boot.
    pub group_type: String,
    #[serde(default)]
    pub replication_protected_items: Vec<PlanItemRef>,
    #[serde(default)]
    pub start_group_actions: Vec<RecoveryPlanAction>,
    #[serde(default)]
    pub end_group_actions: Vec<RecoveryPlanAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanItemRef {
    /// The protected item's id (siterec also takes its bare name).
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanAction {
    pub action_name: String,
    /// The operations it runs for (TestFailover, PlannedFailover,
    /// UnplannedFailover, ...); empty: every failover.
    #[serde(default)]
    pub failover_types: Vec<String>,
    /// PrimaryToRecovery, RecoveryToPrimary; empty: both.
    #[serde(default)]
    pub failover_directions: Vec<String>,
    pub custom_details: ActionDetails,
}

/// `ScriptActionDetails` (path, timeout, fabricLocation) or
/// `ManualActionDetails` (description).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionDetails {
    pub instance_type: String,
    /// A script's path, relative to the agent's scripts directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A script's timeout: seconds, or an ISO 8601 duration (PT10M).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Where the script runs; siterec runs it at the failover's
    /// destination (Recovery for failovers to the recovery site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_location: Option<String>,
    /// A manual action's instructions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// PUT replicationRecoveryPlans/{name} (`CreateRecoveryPlanInputProperties`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRecoveryPlanInput {
    pub primary_fabric_id: String,
    pub recovery_fabric_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_deployment_model: Option<String>,
    pub groups: Vec<RecoveryPlanGroup>,
}

/// PATCH replicationRecoveryPlans/{name} (`UpdateRecoveryPlanInputProperties`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateRecoveryPlanInput {
    pub groups: Vec<RecoveryPlanGroup>,
}

/// POST replicationRecoveryPlans/{name}/plannedFailover, unplannedFailover,
/// testFailover (the SDK's RecoveryPlan*FailoverInputProperties).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanFailoverInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_direction: Option<String>,
    /// Test failover: NoNetworkAttachAsInput or VmNetworkAsInput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_site_operations: Option<String>,
    #[serde(default)]
    pub provider_specific_details: Vec<RecoveryPlanProviderInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanProviderInput {
    pub instance_type: String,
    /// Latest (the default) or LatestProcessed; multi-VM groups use the
    /// latest point their members share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_type: Option<String>,
    /// siterec's own: the operator says the plan's physical servers are
    /// stopped (planned failover).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_stopped: bool,
}

/// POST replicationRecoveryPlans/{name}/testFailoverCleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanCleanupInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comments: Option<String>,
}

/// POST replicationJobs/{name}/resume (`ResumeJobParamsProperties`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResumeJobInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comments: Option<String>,
}
