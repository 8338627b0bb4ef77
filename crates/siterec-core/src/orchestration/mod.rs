//! The job engine's decisions, without I/O.
//!
//! A job is a list of steps, each named by a [`StepKey`] that is stored by
//! name, and a typed [`JobInput`] per [`JobKind`]. The vault's driver runs
//! one round of a job like this:
//!
//! 1. [`next_step`] says which step is due (or that the job is finished, or
//!    that a step written by another build cannot be resumed);
//! 2. [`needs`] says what the step must look at, the driver loads it from
//!    the database and answers an [`Observed`];
//! 3. [`decide`] turns the observation into a [`Decision`]: an [`Outcome`]
//!    (done, wait, fail) and the [`Effect`]s to write;
//! 4. the driver writes the effects and the step's new state in one
//!    transaction; on a failure, the effects of [`on_failure`] too (the
//!    job's compensation), on success those of [`on_success`].
//!
//! Because the effects of a round and the step's state commit together, a
//! crash at any moment leaves the job at the start of a round, and every
//! decision is a function of what is stored: the next process resumes it.
//! Effects are idempotent (an item already in the state an action leads to
//! stays there, a task is created once under a fixed id), so a step re-run
//! after its effects were written finds them and goes on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::network::{NicPlan, resolve_nics};
use crate::policy::Policy;
use crate::state::{
    ItemAction, JobKind, JobState, Lifecycle, Location, ProtectionState, TestAction,
    TestFailoverState,
};
use crate::wire::{MachineInfo, ReplicaStarted, SealedKey, TaskWork};

mod plan;
#[cfg(test)]
mod plan_tests;
#[cfg(test)]
mod tests;

pub use plan::{ChildJob, ChildSeen, PlanInput, PlanItemSeen, Refusal, script_env, script_task_id};

/// How long a step waits for an agent that is not heard from before failing.
pub const AGENT_WAIT_MS: i64 = 5 * 60_000;

/// A step of a job, by a name that stays the same across builds (stored in
/// `job_steps.step`; never reorder meaning behind a name, add new ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StepKey {
    ValidatePolicy,
    SavePolicy,
    CheckPairing,
    PairClouds,
    CheckEnable,
    IdentifyTarget,
    EnableReplication,
    InitialReplication,
    FinalizeProtection,
    CheckFailover,
    StopReplication,
    MaterializeDisks,
    StartVm,
    CompleteFailover,
    CheckCommit,
    Commit,
    VerifyStores,
    CheckTestFailover,
    StartTestVm,
    CompleteTestFailover,
    CheckCleanup,
    RemoveTestVm,
    CompleteCleanup,
    CheckNetworkMapping,
    MapNetworks,
    RemoveNetworkMapping,
    CheckPlannedFailover,
    ShutDownSource,
    FinalReplication,
    CompletePlannedFailover,
    CheckDisable,
    RemoveReplicaData,
    RemoveItem,
    CheckChangePoint,
    CompleteChangePoint,
    CheckReprotect,
    SeedReverseReplica,
    ReverseReplication,
    RemoveSeed,
    CompleteReprotect,
    WriteTestDisks,
    RemoveTestDisks,
    CheckPlan,
    PlanAction,
    PlanItems,
    CompletePlan,
    RemovePairing,
    ExportJobs,
}

impl StepKey {
    pub const ALL: [StepKey; 48] = [
        Self::ValidatePolicy,
        Self::SavePolicy,
        Self::CheckPairing,
        Self::PairClouds,
        Self::CheckEnable,
        Self::IdentifyTarget,
        Self::EnableReplication,
        Self::InitialReplication,
        Self::FinalizeProtection,
        Self::CheckFailover,
        Self::StopReplication,
        Self::MaterializeDisks,
        Self::StartVm,
        Self::CompleteFailover,
        Self::CheckCommit,
        Self::Commit,
        Self::VerifyStores,
        Self::CheckTestFailover,
        Self::StartTestVm,
        Self::CompleteTestFailover,
        Self::CheckCleanup,
        Self::RemoveTestVm,
        Self::CompleteCleanup,
        Self::CheckNetworkMapping,
        Self::MapNetworks,
        Self::RemoveNetworkMapping,
        Self::CheckPlannedFailover,
        Self::ShutDownSource,
        Self::FinalReplication,
        Self::CompletePlannedFailover,
        Self::CheckDisable,
        Self::RemoveReplicaData,
        Self::RemoveItem,
        Self::CheckChangePoint,
        Self::CompleteChangePoint,
        Self::CheckReprotect,
        Self::SeedReverseReplica,
        Self::ReverseReplication,
        Self::RemoveSeed,
        Self::CompleteReprotect,
        Self::WriteTestDisks,
        Self::RemoveTestDisks,
        Self::CheckPlan,
        Self::PlanAction,
        Self::PlanItems,
        Self::CompletePlan,
        Self::RemovePairing,
        Self::ExportJobs,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidatePolicy => "ValidatePolicy",
            Self::SavePolicy => "SavePolicy",
            Self::CheckPairing => "CheckPairing",
            Self::PairClouds => "PairClouds",
            Self::CheckEnable => "CheckEnable",
            Self::IdentifyTarget => "IdentifyTarget",
            Self::EnableReplication => "EnableReplication",
            Self::InitialReplication => "InitialReplication",
            Self::FinalizeProtection => "FinalizeProtection",
            Self::CheckFailover => "CheckFailover",
            Self::StopReplication => "StopReplication",
            Self::MaterializeDisks => "MaterializeDisks",
            Self::StartVm => "StartVm",
            Self::CompleteFailover => "CompleteFailover",
            Self::CheckCommit => "CheckCommit",
            Self::Commit => "Commit",
            Self::VerifyStores => "VerifyStores",
            Self::CheckTestFailover => "CheckTestFailover",
            Self::StartTestVm => "StartTestVm",
            Self::CompleteTestFailover => "CompleteTestFailover",
            Self::CheckCleanup => "CheckCleanup",
            Self::RemoveTestVm => "RemoveTestVm",
            Self::CompleteCleanup => "CompleteCleanup",
            Self::CheckNetworkMapping => "CheckNetworkMapping",
            Self::MapNetworks => "MapNetworks",
            Self::RemoveNetworkMapping => "RemoveNetworkMapping",
            Self::CheckPlannedFailover => "CheckPlannedFailover",
            Self::ShutDownSource => "ShutDownSource",
            Self::FinalReplication => "FinalReplication",
            Self::CompletePlannedFailover => "CompletePlannedFailover",
            Self::CheckDisable => "CheckDisable",
            Self::RemoveReplicaData => "RemoveReplicaData",
            Self::RemoveItem => "RemoveItem",
            Self::CheckChangePoint => "CheckChangePoint",
            Self::CompleteChangePoint => "CompleteChangePoint",
            Self::CheckReprotect => "CheckReprotect",
            Self::SeedReverseReplica => "SeedReverseReplica",
            Self::ReverseReplication => "ReverseReplication",
            Self::RemoveSeed => "RemoveSeed",
            Self::CompleteReprotect => "CompleteReprotect",
            Self::WriteTestDisks => "WriteTestDisks",
            Self::RemoveTestDisks => "RemoveTestDisks",
            Self::CheckPlan => "CheckPlan",
            Self::PlanAction => "PlanAction",
            Self::PlanItems => "PlanItems",
            Self::CompletePlan => "CompletePlan",
            Self::RemovePairing => "RemovePairing",
            Self::ExportJobs => "ExportJobs",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The step's name as the portal shows it (`job_steps.name`).
    pub fn title(self) -> &'static str {
        match self {
            Self::ValidatePolicy => "Validate the policy",
            Self::SavePolicy => "Save the policy",
            Self::CheckPairing => "Prerequisites check for pairing clouds",
            Self::PairClouds => "Pair the clouds",
            Self::CheckEnable => "Prerequisites check for enabling protection",
            Self::IdentifyTarget => "Identifying replication target",
            Self::EnableReplication => "Enable replication",
            Self::InitialReplication => "Starting initial replication",
            Self::FinalizeProtection => "Finalize protection",
            Self::CheckFailover => "Prerequisites check for failover",
            Self::StopReplication => "Stop replication at the source",
            Self::MaterializeDisks => "Materialize disks at the recovery site",
            Self::StartVm => "Create and start the virtual machine at the recovery site",
            Self::CompleteFailover => "Complete failover",
            Self::CheckCommit => "Prerequisites check for commit",
            Self::Commit => "Commit the failover",
            Self::VerifyStores => "Verify the chunks and manifests of the site's replica stores",
            Self::CheckTestFailover => "Prerequisites check for test failover",
            Self::StartTestVm => "Create and start the test virtual machine",
            Self::CompleteTestFailover => "Complete test failover",
            Self::CheckCleanup => "Prerequisites check for test failover cleanup",
            Self::RemoveTestVm => "Power off and delete the test virtual machine",
            Self::CompleteCleanup => "Complete test failover cleanup",
            Self::CheckNetworkMapping => "Prerequisites check for network mapping",
            Self::MapNetworks => "Map the networks",
            Self::RemoveNetworkMapping => "Remove the network mapping",
            Self::CheckPlannedFailover => "Prerequisites check for planned failover",
            Self::ShutDownSource => "Shut down the source machine",
            Self::FinalReplication => "Replicate the last changes into a final recovery point",
            Self::CompletePlannedFailover => "Complete planned failover",
            Self::CheckDisable => "Prerequisites check for disabling protection",
            Self::RemoveReplicaData => "Delete the replica's recovery points and disks",
            Self::RemoveItem => "Remove the protected item",
            Self::CheckChangePoint => "Prerequisites check for changing the recovery point",
            Self::CompleteChangePoint => "Complete the change of recovery point",
            Self::CheckReprotect => "Prerequisites check for reprotect",
            Self::SeedReverseReplica => "Hash the disks at the other site into its replica store",
            Self::ReverseReplication => "Replicate what differs to the other site",
            Self::RemoveSeed => "Remove the seed of the replica store",
            Self::CompleteReprotect => "Complete reprotect",
            Self::WriteTestDisks => "Write the test copy's disks at the recovery site",
            Self::RemoveTestDisks => "Delete the test copy's disks",
            Self::CheckPlan => "Check the recovery plan",
            Self::PlanAction => "Run an action of the recovery plan",
            Self::PlanItems => "Run the operation on a group's machines",
            Self::CompletePlan => "Complete the recovery plan",
            Self::RemovePairing => "Remove the cloud pairing",
            Self::ExportJobs => "Write the jobs' CSV",
        }
    }
}

impl JobKind {
    /// The steps a job of this kind runs, in order (`vm`: a failover that
    /// boots a VM at the recovery site instead of writing disk images).
    pub fn step_keys(self, vm: bool) -> &'static [StepKey] {
        use StepKey as K;
        match self {
            Self::CreatePolicy => &[K::ValidatePolicy, K::SavePolicy],
            Self::ConfigureProtection => &[K::CheckPairing, K::PairClouds],
            Self::EnableProtection => &[
                K::CheckEnable,
                K::IdentifyTarget,
                K::EnableReplication,
                K::InitialReplication,
                K::FinalizeProtection,
            ],
            Self::UnplannedFailover if vm => &[
                K::CheckFailover,
                K::StopReplication,
                K::StartVm,
                K::CompleteFailover,
            ],
            Self::UnplannedFailover => &[
                K::CheckFailover,
                K::StopReplication,
                K::MaterializeDisks,
                K::CompleteFailover,
            ],
            Self::CommitFailover => &[K::CheckCommit, K::Commit],
            Self::VerifyStore => &[K::VerifyStores],
            Self::TestFailover if vm => &[
                K::CheckTestFailover,
                K::StartTestVm,
                K::CompleteTestFailover,
            ],
            Self::TestFailover => &[
                K::CheckTestFailover,
                K::WriteTestDisks,
                K::CompleteTestFailover,
            ],
            Self::TestFailoverCleanup if vm => {
                &[K::CheckCleanup, K::RemoveTestVm, K::CompleteCleanup]
            }
            Self::TestFailoverCleanup => &[K::CheckCleanup, K::RemoveTestDisks, K::CompleteCleanup],
            Self::CreateNetworkMapping => &[K::CheckNetworkMapping, K::MapNetworks],
            Self::DeleteNetworkMapping => &[K::RemoveNetworkMapping],
            Self::PlannedFailover if vm => &[
                K::CheckPlannedFailover,
                K::ShutDownSource,
                K::FinalReplication,
                K::StartVm,
                K::CompletePlannedFailover,
            ],
            Self::PlannedFailover => &[
                K::CheckPlannedFailover,
                K::ShutDownSource,
                K::FinalReplication,
                K::MaterializeDisks,
                K::CompletePlannedFailover,
            ],
            Self::ChangeRecoveryPoint if vm => {
                &[K::CheckChangePoint, K::StartVm, K::CompleteChangePoint]
            }
            Self::ChangeRecoveryPoint => &[
                K::CheckChangePoint,
                K::MaterializeDisks,
                K::CompleteChangePoint,
            ],
            Self::DisableProtection => &[
                K::CheckDisable,
                K::StopReplication,
                K::RemoveReplicaData,
                K::RemoveItem,
            ],
            Self::RecoveryPlanTestFailover
            | Self::RecoveryPlanTestFailoverCleanup
            | Self::RecoveryPlanPlannedFailover
            | Self::RecoveryPlanUnplannedFailover
            | Self::RecoveryPlanCommit
            | Self::RecoveryPlanReprotect => {
                &[K::CheckPlan, K::PlanAction, K::PlanItems, K::CompletePlan]
            }
            Self::Reprotect => &[
                K::CheckReprotect,
                K::SeedReverseReplica,
                K::ReverseReplication,
                K::RemoveSeed,
                K::CompleteReprotect,
            ],
            Self::DeletePairing => &[K::RemovePairing],
            Self::ExportJobs => &[K::ExportJobs],
        }
    }
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Jobs stored before inputs named a site acted on the recovery site.
fn recovery() -> Location {
    Location::Recovery
}

fn is_recovery(l: &Location) -> bool {
    *l == Location::Recovery
}

/// The input of a job, per kind. Stored as the JSON of the inner struct in
/// `jobs.input`, the kind in `jobs.kind`: [`JobInput::parse`] reads it back.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum JobInput {
    CreatePolicy(PolicyInput),
    ConfigureProtection(PairingInput),
    EnableProtection(ItemInput),
    UnplannedFailover(FailoverInput),
    CommitFailover(ItemInput),
    VerifyStore(VerifyInput),
    TestFailover(TestFailoverInput),
    TestFailoverCleanup(CleanupInput),
    CreateNetworkMapping(NetworkMappingInput),
    DeleteNetworkMapping(NetworkRef),
    PlannedFailover(PlannedFailoverInput),
    DisableProtection(DisableInput),
    ChangeRecoveryPoint(ChangePointInput),
    Reprotect(ReprotectInput),
    RecoveryPlan(PlanInput),
    /// A cloud pairing being removed (Unpairing, then gone).
    DeletePairing(PairingInput),
    /// An export of the jobs a query names; the CSV is written when the
    /// export is asked for (the job's output), the job only completes it.
    ExportJobs(ExportInput),
}

/// The query of a jobs export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInput {
    pub query: crate::jobquery::JobQuery,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInput {
    pub name: String,
    pub policy: Policy,
}

/// A cloud pairing (protection container mapping) being created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingInput {
    pub fabric: String,
    pub container: String,
    pub name: String,
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemInput {
    pub item: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverInput {
    pub item: String,
    pub point_id: String,
    /// The item is a VM: the failover boots it at the recovery site.
    #[serde(default, skip_serializing_if = "is_false")]
    pub vm: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Sealed to the recovery agent's transport key; forgotten once the
    /// task that needs it is over, or when the job ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedKey>,
    /// The site the machine fails over to (where the points are stored).
    #[serde(default = "recovery", skip_serializing_if = "is_recovery")]
    pub to: Location,
}

/// A planned failover: the source is stopped (a physical server by its
/// operator, who says so), its last changes are replicated into a final
/// point, and the machine is brought up from exactly that point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedFailoverInput {
    pub item: String,
    /// The operator says the source machine is stopped (a physical server:
    /// siterec cannot stop it).
    #[serde(default, skip_serializing_if = "is_false")]
    pub source_stopped: bool,
    /// The final point, once the source's agent has reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_point: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedKey>,
    /// The site the machine fails over to: Recovery, or Primary for a
    /// failback (the final point is written back onto the machine's own
    /// disks, where they differ).
    #[serde(default = "recovery", skip_serializing_if = "is_recovery")]
    pub to: Location,
    /// The protected machine (its agent finds its disks by this name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine: String,
    /// The machine is a VM: the source site's agent shuts it down (ACPI
    /// power-down through QMP), and a failover to the recovery site boots
    /// it there.
    #[serde(default, skip_serializing_if = "is_false")]
    pub vm: bool,
    /// The VM running at the source site, when it is not `machine` (a
    /// failback: the replica VM at the recovery site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_vm: Option<String>,
    /// How long the guest has to power off after the ACPI power-down.
    #[serde(default = "default_shutdown_secs")]
    pub shutdown_timeout_secs: u32,
    /// Power the VM off when the guest does not power off in time (as
    /// pulling its plug: the final point is crash-consistent).
    #[serde(default, skip_serializing_if = "is_false")]
    pub force: bool,
}

/// How long a guest has to power off by default, in seconds.
pub const DEFAULT_SHUTDOWN_SECS: u32 = 120;

fn default_shutdown_secs() -> u32 {
    DEFAULT_SHUTDOWN_SECS
}

impl PlannedFailoverInput {
    /// The VM to shut down at the source site.
    pub fn vm_to_stop(&self) -> &str {
        self.source_vm.as_deref().unwrap_or(&self.machine)
    }
}

/// A failed-over server's disks written again from another point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangePointInput {
    pub item: String,
    pub point_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedKey>,
    /// Where the machine runs now, failed over (its disks are rewritten).
    #[serde(default = "recovery", skip_serializing_if = "is_recovery")]
    pub at: Location,
    /// The machine is a VM: its replica VM is made again from the point.
    #[serde(default, skip_serializing_if = "is_false")]
    pub vm: bool,
}

/// Disabling protection of an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DisableInput {
    pub item: String,
    /// Delete the replica's recovery points and disks at the recovery site
    /// (the policy's `replicaDeletion`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub delete_replica: bool,
    /// The site whose agent keeps the replica (its points and disks).
    #[serde(default = "recovery", skip_serializing_if = "is_recovery")]
    pub at: Location,
}

/// Reprotect: replication from where the machine runs (`to.other()`) to
/// the site it left (`to`), whose agent first hashes the disks it still
/// has into its replica store (a seed point, `seed-JOB`), so that only the
/// blocks that differ travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprotectInput {
    pub item: String,
    pub machine: String,
    /// The site replication goes to (the item's active location's other).
    pub to: Location,
}

/// The seed point id of reprotect job `job_id`.
pub fn seed_point_id(job_id: &str) -> String {
    format!("seed-{job_id}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverInput {
    pub item: String,
    pub point_id: String,
    /// The test copy's name: `<machine>-test`.
    pub vm_name: String,
    /// A VM is booted; else (a physical server) the point's disks are
    /// written as images for the operator to test. Jobs stored before
    /// physical test failovers were all of VMs.
    #[serde(default = "yes")]
    pub vm: bool,
    /// The recovery network every NIC goes on; `None`: isolated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupInput {
    pub item: String,
    pub vm_name: String,
    /// The test copy is a VM; else its disks are deleted.
    #[serde(default = "yes")]
    pub vm: bool,
    #[serde(default)]
    pub comments: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyInput {
    pub fabric: String,
    /// The recovery agents whose stores are verified.
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMappingInput {
    pub fabric: String,
    pub network: String,
    pub name: String,
    pub recovery_fabric: String,
    pub recovery_network: String,
}

/// A network mapping: source fabric, source network, mapping name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRef {
    pub fabric: String,
    pub network: String,
    pub name: String,
}

/// A stored job input that does not read as its kind's.
#[derive(Debug, thiserror::Error)]
#[error("the stored input of a {kind} job does not read: {source}")]
pub struct InputError {
    pub kind: &'static str,
    #[source]
    pub source: serde_json::Error,
}

impl JobInput {
    pub fn kind(&self) -> JobKind {
        match self {
            Self::CreatePolicy(_) => JobKind::CreatePolicy,
            Self::ConfigureProtection(_) => JobKind::ConfigureProtection,
            Self::EnableProtection(_) => JobKind::EnableProtection,
            Self::UnplannedFailover(_) => JobKind::UnplannedFailover,
            Self::CommitFailover(_) => JobKind::CommitFailover,
            Self::VerifyStore(_) => JobKind::VerifyStore,
            Self::TestFailover(_) => JobKind::TestFailover,
            Self::TestFailoverCleanup(_) => JobKind::TestFailoverCleanup,
            Self::CreateNetworkMapping(_) => JobKind::CreateNetworkMapping,
            Self::DeleteNetworkMapping(_) => JobKind::DeleteNetworkMapping,
            Self::PlannedFailover(_) => JobKind::PlannedFailover,
            Self::DisableProtection(_) => JobKind::DisableProtection,
            Self::ChangeRecoveryPoint(_) => JobKind::ChangeRecoveryPoint,
            Self::Reprotect(_) => JobKind::Reprotect,
            Self::RecoveryPlan(p) => JobKind::for_plan(p.op),
            Self::DeletePairing(_) => JobKind::DeletePairing,
            Self::ExportJobs(_) => JobKind::ExportJobs,
        }
    }

    /// Reads a stored input (`jobs.input`) of a job of `kind`.
    pub fn parse(kind: JobKind, json: &str) -> Result<Self, InputError> {
        fn read<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, serde_json::Error> {
            serde_json::from_str(json)
        }
        let parsed = match kind {
            JobKind::CreatePolicy => read(json).map(Self::CreatePolicy),
            JobKind::ConfigureProtection => read(json).map(Self::ConfigureProtection),
            JobKind::EnableProtection => read(json).map(Self::EnableProtection),
            JobKind::UnplannedFailover => read(json).map(Self::UnplannedFailover),
            JobKind::CommitFailover => read(json).map(Self::CommitFailover),
            JobKind::VerifyStore => read(json).map(Self::VerifyStore),
            JobKind::TestFailover => read(json).map(Self::TestFailover),
            JobKind::TestFailoverCleanup => read(json).map(Self::TestFailoverCleanup),
            JobKind::CreateNetworkMapping => read(json).map(Self::CreateNetworkMapping),
            JobKind::DeleteNetworkMapping => read(json).map(Self::DeleteNetworkMapping),
            JobKind::PlannedFailover => read(json).map(Self::PlannedFailover),
            JobKind::DisableProtection => read(json).map(Self::DisableProtection),
            JobKind::ChangeRecoveryPoint => read(json).map(Self::ChangeRecoveryPoint),
            JobKind::Reprotect => read(json).map(Self::Reprotect),
            JobKind::RecoveryPlanTestFailover
            | JobKind::RecoveryPlanTestFailoverCleanup
            | JobKind::RecoveryPlanPlannedFailover
            | JobKind::RecoveryPlanUnplannedFailover
            | JobKind::RecoveryPlanCommit
            | JobKind::RecoveryPlanReprotect => read::<PlanInput>(json).and_then(|p| {
                if JobKind::for_plan(p.op) == kind {
                    Ok(Self::RecoveryPlan(p))
                } else {
                    Err(serde::de::Error::custom(format!(
                        "the plan's operation {} is not a {} job's",
                        p.op.as_str(),
                        kind.as_str()
                    )))
                }
            }),
            JobKind::DeletePairing => read(json).map(Self::DeletePairing),
            JobKind::ExportJobs => read(json).map(Self::ExportJobs),
        };
        parsed.map_err(|source| InputError {
            kind: kind.as_str(),
            source,
        })
    }

    /// The JSON stored in `jobs.input`.
    pub fn to_json(&self) -> String {
        // Plain structs of strings, booleans and a policy: nothing here can
        // fail to serialize.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// The steps a job with this input runs.
    pub fn step_keys(&self) -> &'static [StepKey] {
        let vm = match self {
            Self::UnplannedFailover(f) => f.vm,
            // A failback writes the VM's own disks back, then starts it.
            Self::PlannedFailover(p) => p.vm && p.to == Location::Recovery,
            Self::ChangeRecoveryPoint(c) => c.vm,
            Self::TestFailover(t) => t.vm,
            Self::TestFailoverCleanup(c) => c.vm,
            _ => false,
        };
        self.kind().step_keys(vm)
    }

    /// The steps a new job with this input gets, with their titles (a
    /// plan's depend on its groups and actions).
    pub fn steps(&self) -> Vec<(StepKey, String)> {
        match self {
            Self::RecoveryPlan(p) => p
                .layout()
                .into_iter()
                .map(|s| {
                    let key = match s {
                        crate::plan::PlanStep::Check => StepKey::CheckPlan,
                        crate::plan::PlanStep::Action { .. } => StepKey::PlanAction,
                        crate::plan::PlanStep::Items { .. } => StepKey::PlanItems,
                        crate::plan::PlanStep::Complete => StepKey::CompletePlan,
                    };
                    (key, p.title(s))
                })
                .collect(),
            _ => self
                .step_keys()
                .iter()
                .map(|k| (*k, k.title().to_string()))
                .collect(),
        }
    }

    /// The protected item the job acts on, if any.
    pub fn item(&self) -> Option<&str> {
        match self {
            Self::EnableProtection(i) | Self::CommitFailover(i) => Some(&i.item),
            Self::UnplannedFailover(f) => Some(&f.item),
            Self::TestFailover(t) => Some(&t.item),
            Self::TestFailoverCleanup(c) => Some(&c.item),
            Self::PlannedFailover(p) => Some(&p.item),
            Self::DisableProtection(d) => Some(&d.item),
            Self::ChangeRecoveryPoint(c) => Some(&c.item),
            Self::Reprotect(r) => Some(&r.item),
            _ => None,
        }
    }

    /// The site whose agent runs the job's tasks: where the machine goes
    /// (failovers), where it runs (change of point), where the replica is
    /// kept (disable, reprotect); the recovery site for the rest.
    pub fn task_site(&self) -> Location {
        match self {
            Self::UnplannedFailover(f) => f.to,
            Self::PlannedFailover(p) => p.to,
            Self::ChangeRecoveryPoint(c) => c.at,
            Self::DisableProtection(d) => d.at,
            Self::Reprotect(r) => r.to,
            _ => Location::Recovery,
        }
    }

    /// Drops the sealed recovery key; `true` if there was one.
    pub fn forget_sealed_key(&mut self) -> bool {
        let key = match self {
            Self::UnplannedFailover(f) => &mut f.sealed_key,
            Self::TestFailover(t) => &mut t.sealed_key,
            Self::PlannedFailover(p) => &mut p.sealed_key,
            Self::ChangeRecoveryPoint(c) => &mut c.sealed_key,
            _ => return false,
        };
        key.take().is_some()
    }

    fn sealed_key(&self) -> Option<SealedKey> {
        match self {
            Self::UnplannedFailover(f) => f.sealed_key.clone(),
            Self::TestFailover(t) => t.sealed_key.clone(),
            Self::PlannedFailover(p) => p.sealed_key.clone(),
            Self::ChangeRecoveryPoint(c) => c.sealed_key.clone(),
            _ => None,
        }
    }

    /// Records the final point of a planned failover in its input; `true`
    /// if the input changed.
    pub fn set_final_point(&mut self, point: &str) -> bool {
        match self {
            Self::PlannedFailover(p) if p.final_point.as_deref() != Some(point) => {
                p.final_point = Some(point.to_string());
                true
            }
            _ => false,
        }
    }

    /// The point a failover job brings the machine up from (a planned
    /// failover's: once its final point is known).
    fn failover_point(&self) -> Option<&str> {
        match self {
            Self::UnplannedFailover(f) => Some(&f.point_id),
            Self::PlannedFailover(p) => p.final_point.as_deref(),
            Self::ChangeRecoveryPoint(c) => Some(&c.point_id),
            _ => None,
        }
    }
}

/// A step as stored: its stable name (`None` on rows written before steps
/// had one, known by their index), its state and when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRow {
    pub key: Option<String>,
    pub state: JobState,
    pub started_ms: Option<i64>,
}

/// What a job does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Every step succeeded: the job succeeds.
    Finished,
    /// Run this step (its index in the job).
    Run { idx: usize, key: StepKey },
    /// The step cannot be run by this build: fail the job with this reason.
    Unrunnable {
        idx: usize,
        code: &'static str,
        message: String,
    },
}

/// The first unfinished step of a job, resolved to a step this build runs.
pub fn next_step(input: &JobInput, steps: &[StepRow]) -> Next {
    let Some(idx) = steps.iter().position(|s| !s.state.is_terminal()) else {
        return Next::Finished;
    };
    let keys = input.step_keys();
    if let JobInput::RecoveryPlan(_) = input {
        let layout = input.steps();
        let stored = steps[idx].key.as_deref().and_then(StepKey::parse);
        return match (stored, layout.get(idx)) {
            (Some(k), Some((want, _))) if k == *want && steps.len() == layout.len() => {
                Next::Run { idx, key: k }
            }
            _ => Next::Unrunnable {
                idx,
                code: "StepNotRunnable",
                message: format!(
                    "step {} of this recovery plan job does not match the plan's steps as this build lays them out; run the plan again",
                    idx + 1
                ),
            },
        };
    }
    let key = match &steps[idx].key {
        Some(name) => match StepKey::parse(name) {
            Some(k) if keys.contains(&k) => k,
            _ => {
                return Next::Unrunnable {
                    idx,
                    code: "StepNotRunnable",
                    message: format!(
                        "step '{name}' of this {} job was written by another siterec build and this build cannot run it; run the operation again",
                        input.kind().display_name()
                    ),
                };
            }
        },
        // Written before steps were named: the step list of that build
        // was this one's, so the index names the step.
        None => match (steps.len() == keys.len(), keys.get(idx)) {
            (true, Some(k)) => *k,
            _ => {
                return Next::Unrunnable {
                    idx,
                    code: "StepNotRunnable",
                    message: format!(
                        "this {} job was written by an older siterec build with {} steps where this build has {}; run the operation again",
                        input.kind().display_name(),
                        steps.len(),
                        keys.len()
                    ),
                };
            }
        },
    };
    Next::Run { idx, key }
}

/// What a step must look at before it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Nothing,
    /// Whether the policy exists.
    Policy {
        name: String,
    },
    /// The machine an item protects, as its agent reports it.
    Machine {
        item: String,
    },
    /// The item's recovery agent, and the one it could have.
    Target {
        item: String,
    },
    /// How many recovery points the item has (`epoch`: only those reported
    /// since replication of that epoch, a reprotect job's id, began).
    Points {
        item: String,
        epoch: Option<String>,
    },
    /// The item's states, and whether `point` (if any) is listed.
    Item {
        item: String,
        point: Option<String>,
    },
    /// The item's agent at `site` and the task `task_id`.
    Task {
        item: String,
        task_id: String,
        site: Location,
    },
    /// [`Need::Task`], and what a VM needs to be placed at the recovery site.
    Replica {
        item: String,
        task_id: String,
    },
    /// Each agent's task, by (agent, task id).
    Stores {
        tasks: Vec<(String, String)>,
    },
    /// Whether a network is reported in the fabric.
    Network {
        fabric: String,
        name: String,
    },
    /// The latest point the item's source agent reported as the final
    /// point of job `job_id`, and the source agent.
    FinalPoint {
        item: String,
        job_id: String,
        /// Where the machine runs (its agent replicates it).
        source: Location,
    },
    /// A plan's items: their states, groups and points at `site`'s store
    /// (the store a failover toward `site` reads).
    PlanItems {
        items: Vec<String>,
        site: Location,
    },
    /// Each item's child jobs (ids by attempt, from 0).
    PlanChildren {
        children: Vec<(String, Vec<String>)>,
    },
    /// A script's task, and an agent of `fabric` to run it (the one most
    /// recently heard from).
    PlanScript {
        task_id: String,
        fabric: String,
    },
    /// Whether step `idx` of the job was resumed by an operator.
    Resumed {
        job_id: String,
        idx: usize,
    },
}

/// What the driver found for a [`Need`].
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Nothing,
    Policy {
        exists: bool,
    },
    Machine(MachineSeen),
    Target {
        current: Option<String>,
        /// An online recovery agent that can take the item (the one its
        /// multi-VM group replicates to, while that one can).
        candidate: Option<String>,
        recovery_fabric: String,
        recovery_cloud: String,
    },
    Points {
        listed: u64,
    },
    Item {
        state: Option<ProtectionState>,
        test: Option<TestFailoverState>,
        /// The asked point is listed (not pruned); `false` when none asked.
        point_listed: bool,
    },
    Task(TaskSeen),
    Replica {
        task: TaskSeen,
        placement: Box<Placement>,
    },
    Stores(Vec<StoreTask>),
    Network {
        exists: bool,
    },
    FinalPoint {
        point: Option<String>,
        /// The agent replicating the item (`None`: no agent reports it).
        source_agent: Option<String>,
        source_last_seen_ms: Option<i64>,
    },
    PlanItems(Vec<PlanItemSeen>),
    PlanChildren(Vec<ChildSeen>),
    PlanScript {
        task: Option<TaskResult>,
        /// The task's agent, else the candidate.
        agent: Option<String>,
        agent_last_seen_ms: Option<i64>,
    },
    Resumed {
        /// When, and the operator's comments.
        resumed: Option<(i64, Option<String>)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineSeen {
    ItemGone,
    MachineGone {
        fabric: String,
        machine: String,
    },
    /// Reported; `error` when its agent says it cannot be protected.
    Reported {
        machine: String,
        error: Option<String>,
    },
}

/// An agent task of a step, and the agent that runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSeen {
    /// The item's recovery agent (`None`: none was chosen).
    pub agent: Option<String>,
    /// `None`: not created yet.
    pub task: Option<TaskResult>,
    pub agent_last_seen_ms: Option<i64>,
}

/// A task's state as the agent reported it.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskResult {
    Pending,
    Succeeded { output: Value },
    Failed { error: String },
}

/// What placing an item's VM at the recovery site looks at.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Placement {
    pub fabric: String,
    pub machine: String,
    /// As last reported; `None` when no agent reports it.
    pub info: Option<MachineInfo>,
    /// Source network (lower case) → recovery network, mappings in force
    /// toward the item's recovery fabric.
    pub mappings: BTreeMap<String, String>,
    /// The networks the recovery agent reports.
    pub available: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreTask {
    pub agent: String,
    pub task: Option<TaskResult>,
    pub agent_last_seen_ms: Option<i64>,
}

/// A write the driver does for a decision, in the round's transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    SavePolicy {
        name: String,
        policy: Policy,
    },
    /// Pairing → Paired.
    PairClouds(PairingInput),
    /// Delete the mapping if it is still Pairing.
    DropPendingPairing(PairingInput),
    /// Pairing → Paired.
    MapNetworks(NetworkRef),
    DropPendingNetworkMapping(NetworkRef),
    RemoveNetworkMapping(NetworkRef),
    /// Unpairing → Paired.
    KeepNetworkMapping(NetworkRef),
    /// Delete the cloud pairing.
    RemovePairing(PairingInput),
    /// Unpairing → Paired (a failed removal).
    KeepPairing(PairingInput),
    /// The item's state by `action`, idempotently ([`transition`]); an
    /// action that does not apply is an error (the round is retried).
    Transition {
        item: String,
        action: ItemAction,
    },
    /// Best effort (a compensation): the item's state by `action` when it
    /// applies, and `message` as its last error.
    Compensate {
        item: String,
        action: ItemAction,
        message: String,
    },
    TestTransition {
        item: String,
        action: TestAction,
    },
    /// Best effort: the test failover state by `action`, and the error.
    CompensateTest {
        item: String,
        action: TestAction,
        message: String,
    },
    SetRecoveryAgent {
        item: String,
        agent: String,
    },
    /// Create the task unless one of that id exists.
    EnsureTask {
        id: String,
        agent: String,
        work: TaskWork,
    },
    /// Delete the sealed recovery key from the job's input and tasks.
    ForgetSealedKey,
    SetFailoverOutput {
        item: String,
        output: Value,
    },
    SetTestFailoverOutput {
        item: String,
        output: Value,
    },
    /// The failover is over: when, and from which point.
    RecordFailover {
        item: String,
        point_id: String,
    },
    RecordTestFailover {
        item: String,
    },
    ClearTestFailover {
        item: String,
    },
    /// The item's replication epoch (`replication_epoch`): replication
    /// runs from the active location, the agents starting over from what
    /// the target store holds when it changes; `None` stops a reverse
    /// replication that has not finished its reprotect.
    SetEpoch {
        item: String,
        epoch: Option<String>,
    },
    /// Record the final point of a planned failover in the job's input.
    SetFinalPoint {
        point_id: String,
    },
    /// The item is gone: its row, its recovery points' rows, its group
    /// membership (disable protection's last step).
    DeleteItem {
        item: String,
    },
    /// What the step wants the operator to know (`job_steps.output`).
    StepOutput(Value),
    /// Record the points a plan's items fail over to in its input.
    SetPlanPoints(BTreeMap<String, String>),
    /// Start `item`'s operation of the plan as job `job_id` (the vault does
    /// it after the round commits, as the API would; a refusal is recorded
    /// with [`Effect::PlanRefused`]).
    StartPlanItem {
        item: String,
        job_id: String,
    },
    /// Record in the plan job's input why `item`'s operation was refused.
    PlanRefused {
        item: String,
        code: String,
        message: String,
    },
    /// The job waits for an operator (`Suspended`) until resumed.
    SuspendJob,
    /// The plan's last run of `op` (its `lastTestFailoverTime`, ...).
    RecordPlanRun {
        plan: String,
        op: crate::plan::PlanOp,
    },
    /// The job's output (`jobs.output`).
    JobOutput(Value),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Wait,
    Fail { code: &'static str, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub effects: Vec<Effect>,
}

impl Decision {
    fn done(effects: Vec<Effect>) -> Self {
        Self {
            outcome: Outcome::Done,
            effects,
        }
    }
    fn wait() -> Self {
        Self {
            outcome: Outcome::Wait,
            effects: vec![],
        }
    }
    fn fail(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Fail {
                code,
                message: message.into(),
            },
            effects: vec![],
        }
    }
    fn with(mut self, effects: impl IntoIterator<Item = Effect>) -> Self {
        self.effects.extend(effects);
        self
    }
}

/// The round's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCtx<'a> {
    pub job_id: &'a str,
    /// The step's index in the job.
    pub idx: usize,
    /// When the step started (its first round).
    pub started_ms: i64,
    pub now_ms: i64,
}

fn task_id(job_id: &str, key: StepKey) -> String {
    match key {
        StepKey::MaterializeDisks => format!("{job_id}-materialize"),
        StepKey::StartVm | StepKey::StartTestVm => format!("{job_id}-start-replica"),
        StepKey::RemoveReplicaData => format!("{job_id}-delete-replica"),
        StepKey::SeedReverseReplica => format!("{job_id}-seed"),
        StepKey::RemoveSeed => format!("{job_id}-remove-seed"),
        StepKey::ShutDownSource => format!("{job_id}-shutdown"),
        StepKey::WriteTestDisks => format!("{job_id}-test-disks"),
        StepKey::RemoveTestDisks => format!("{job_id}-remove-test-disks"),
        _ => format!("{job_id}-remove-replica"),
    }
}

/// The task id of the store verification of `agent` in job `job_id`.
pub fn verify_task_id(job_id: &str, agent: &str) -> String {
    format!("{job_id}-verify-{agent}")
}

/// What `key` must look at.
pub fn needs(key: StepKey, input: &JobInput, job_id: &str, idx: usize) -> Need {
    use JobInput as I;
    use StepKey as K;
    let item = || input.item().unwrap_or_default().to_string();
    match (key, input) {
        (_, I::RecoveryPlan(p)) => plan::needs(p, idx, job_id),
        (K::CheckPairing, I::ConfigureProtection(p)) => Need::Policy {
            name: p.policy.clone(),
        },
        (K::CheckEnable, _) => Need::Machine { item: item() },
        (K::IdentifyTarget, _) => Need::Target { item: item() },
        (K::InitialReplication, _) => Need::Points {
            item: item(),
            epoch: None,
        },
        (K::ReverseReplication, _) => Need::Points {
            item: item(),
            epoch: Some(job_id.to_string()),
        },
        (K::CheckFailover, I::UnplannedFailover(f)) => Need::Item {
            item: f.item.clone(),
            point: Some(f.point_id.clone()),
        },
        (K::CheckChangePoint, I::ChangeRecoveryPoint(c)) => Need::Item {
            item: c.item.clone(),
            point: Some(c.point_id.clone()),
        },
        (K::CheckTestFailover, I::TestFailover(t)) => Need::Item {
            item: t.item.clone(),
            point: Some(t.point_id.clone()),
        },
        (
            K::CheckCommit
            | K::CheckCleanup
            | K::CheckPlannedFailover
            | K::CheckDisable
            | K::CheckReprotect,
            _,
        ) => Need::Item {
            item: item(),
            point: None,
        },
        (K::FinalReplication, _) => Need::FinalPoint {
            item: item(),
            job_id: job_id.to_string(),
            source: input.task_site().other(),
        },
        (
            K::MaterializeDisks
            | K::RemoveTestVm
            | K::WriteTestDisks
            | K::RemoveTestDisks
            | K::RemoveReplicaData
            | K::SeedReverseReplica
            | K::RemoveSeed,
            _,
        ) => Need::Task {
            item: item(),
            task_id: task_id(job_id, key),
            site: input.task_site(),
        },
        (K::ShutDownSource, I::PlannedFailover(p)) if p.vm => Need::Task {
            item: item(),
            task_id: task_id(job_id, key),
            site: input.task_site().other(),
        },
        (K::StartVm | K::StartTestVm, _) => Need::Replica {
            item: item(),
            task_id: task_id(job_id, key),
        },
        (K::VerifyStores, I::VerifyStore(v)) => Need::Stores {
            tasks: v
                .agents
                .iter()
                .map(|a| (a.clone(), verify_task_id(job_id, a)))
                .collect(),
        },
        (K::CheckNetworkMapping, I::CreateNetworkMapping(m)) => Need::Network {
            fabric: m.recovery_fabric.clone(),
            name: m.recovery_network.clone(),
        },
        _ => Need::Nothing,
    }
}

/// Fails a step whose agent task has had no answer for 5 minutes while the
/// agent was not heard from; `None` while it is worth waiting.
fn agent_gone(
    ctx: &StepCtx<'_>,
    agent: &str,
    last_seen: Option<i64>,
    what: &str,
) -> Option<Decision> {
    (ctx.now_ms - last_seen.unwrap_or(0).max(ctx.started_ms) > AGENT_WAIT_MS).then(|| {
        Decision::fail(
            "RecoveryAgentNotConnected",
            format!(
                "recovery agent {agent} has not been heard from for 5 minutes; start it and retry the {what}"
            ),
        )
    })
}

/// Decides step `key` of a job from what was observed.
pub fn decide(key: StepKey, input: &JobInput, ctx: &StepCtx<'_>, seen: &Observed) -> Decision {
    use JobInput as I;
    use StepKey as K;
    let item = input.item().unwrap_or_default().to_string();
    if let I::RecoveryPlan(p) = input {
        return plan::decide(p, ctx, seen);
    }
    match (key, input, seen) {
        (K::ValidatePolicy, I::CreatePolicy(p), _) => match p.policy.validate() {
            Ok(()) => Decision::done(vec![]),
            Err(e) => Decision::fail("InvalidPolicy", e.to_string()),
        },
        (K::SavePolicy, I::CreatePolicy(p), _) => Decision::done(vec![Effect::SavePolicy {
            name: p.name.clone(),
            policy: p.policy.clone(),
        }]),
        (K::CheckPairing, I::ConfigureProtection(p), Observed::Policy { exists }) => {
            if *exists {
                Decision::done(vec![])
            } else {
                Decision::fail(
                    "PolicyNotFound",
                    format!("replication policy '{}' no longer exists", p.policy),
                )
            }
        }
        (K::PairClouds, I::ConfigureProtection(p), _) => {
            Decision::done(vec![Effect::PairClouds(p.clone())])
        }
        (K::CheckEnable, _, Observed::Machine(m)) => match m {
            MachineSeen::ItemGone => Decision::fail(
                "ItemNotFound",
                format!("protected item '{item}' no longer exists"),
            ),
            MachineSeen::MachineGone { fabric, machine } => Decision::fail(
                "MachineNotFound",
                format!(
                    "machine '{machine}' is no longer reported by any agent of fabric '{fabric}'"
                ),
            ),
            MachineSeen::Reported {
                machine,
                error: Some(err),
            } => Decision::fail(
                "MachineNotReady",
                format!("machine '{machine}' cannot be protected: {err}"),
            ),
            MachineSeen::Reported { error: None, .. } => Decision::done(vec![]),
        },
        (
            K::IdentifyTarget,
            _,
            Observed::Target {
                current,
                candidate,
                recovery_fabric,
                recovery_cloud,
            },
        ) => match (current, candidate) {
            (Some(_), _) => Decision::done(vec![]),
            (None, Some(agent)) => Decision::done(vec![Effect::SetRecoveryAgent {
                item,
                agent: agent.clone(),
            }]),
            (None, None) if ctx.now_ms - ctx.started_ms > AGENT_WAIT_MS => Decision::fail(
                "NoRecoveryAgent",
                format!(
                    "no agent of recovery cloud {recovery_fabric}/{recovery_cloud} with a replica store has been heard from; start the recovery site's agent and enable protection again"
                ),
            ),
            (None, None) => Decision::wait(),
        },
        (K::EnableReplication, _, _) => Decision::done(vec![Effect::Transition {
            item,
            action: ItemAction::StartInitialReplication,
        }]),
        (K::InitialReplication, _, Observed::Points { listed }) => {
            if *listed > 0 {
                Decision::done(vec![])
            } else {
                Decision::wait()
            }
        }
        (K::FinalizeProtection, _, _) => Decision::done(vec![Effect::Transition {
            item,
            action: ItemAction::FinishInitialReplication,
        }]),
        (
            K::CheckFailover,
            I::UnplannedFailover(f),
            Observed::Item {
                state,
                point_listed,
                ..
            },
        ) => match state {
            Some(
                ProtectionState::UnplannedFailoverInProgress
                | ProtectionState::UnplannedFailoverCompleted,
            ) => point_check(&item, &f.point_id, *point_listed),
            other => Decision::fail(
                "InvalidState",
                format!("the item is {other:?}, not failing over"),
            ),
        },
        // Replication stops as soon as the item leaves the replicating
        // states (the API moved it there): source agents drop it from their
        // next heartbeat's assignments, and late points are refused.
        (K::StopReplication, _, _) => Decision::done(vec![]),
        (K::MaterializeDisks, _, Observed::Task(t)) => match input.failover_point() {
            Some(point) => materialize(ctx, input, point, t),
            None => Decision::fail(
                "JobInconsistent",
                "the disks are to be written before the failover's point is known: this is a bug in siterec",
            ),
        },
        (K::StartVm, _, Observed::Replica { task, placement }) => {
            start_replica(ctx, input, false, task, placement)
        }
        (K::StartTestVm, _, Observed::Replica { task, placement }) => {
            start_replica(ctx, input, true, task, placement)
        }
        (K::CompleteFailover, I::UnplannedFailover(f), _) => Decision::done(vec![
            Effect::Transition {
                item: item.clone(),
                action: ItemAction::FinishUnplannedFailover,
            },
            Effect::RecordFailover {
                item,
                point_id: f.point_id.clone(),
            },
        ]),
        (K::CheckCommit, _, Observed::Item { state, .. }) => match state {
            Some(
                ProtectionState::FailoverCommitInProgress | ProtectionState::FailoverCommitted,
            ) => Decision::done(vec![]),
            other => Decision::fail(
                "InvalidState",
                format!("the item is {other:?}, not committing a failover"),
            ),
        },
        (K::Commit, _, _) => Decision::done(vec![Effect::Transition {
            item,
            action: ItemAction::FinishCommit,
        }]),
        (K::CheckPlannedFailover, _, Observed::Item { state, .. }) => match state {
            Some(ProtectionState::PlannedFailoverInProgress) => Decision::done(vec![]),
            other => Decision::fail(
                "InvalidState",
                format!("the item is {other:?}, not in a planned failover"),
            ),
        },
        (K::ShutDownSource, I::PlannedFailover(p), Observed::Task(t)) if p.vm => {
            shut_down_vm(ctx, p, t)
        }
        (K::ShutDownSource, I::PlannedFailover(p), _) => {
            if p.source_stopped {
                Decision::done(vec![Effect::StepOutput(json!({
                    "notes": ["the operator confirmed that the source server is stopped"]
                }))])
            } else {
                Decision::fail(
                    "SourceNotStopped",
                    "siterec cannot stop a physical server: stop it (or take its disks out of service), then run the planned failover again saying so (--source-stopped)",
                )
            }
        }
        (
            K::FinalReplication,
            _,
            Observed::FinalPoint {
                point,
                source_agent,
                source_last_seen_ms,
            },
        ) => final_replication(ctx, &item, point, source_agent, *source_last_seen_ms),
        (K::CompletePlannedFailover, I::PlannedFailover(p), _) => match &p.final_point {
            Some(point) => Decision::done(vec![
                Effect::Transition {
                    item: item.clone(),
                    action: ItemAction::FinishPlannedFailover,
                },
                Effect::RecordFailover {
                    item,
                    point_id: point.clone(),
                },
            ]),
            None => Decision::fail(
                "JobInconsistent",
                "a planned failover completes without its final point: this is a bug in siterec",
            ),
        },
        (K::CheckDisable, _, Observed::Item { state, .. }) => match state {
            Some(ProtectionState::DisablingProtection) => Decision::done(vec![]),
            None => Decision::done(vec![Effect::StepOutput(json!({
                "notes": ["the item is already gone"]
            }))]),
            other => Decision::fail(
                "InvalidState",
                format!("the item is {other:?}, not disabling protection"),
            ),
        },
        (K::RemoveReplicaData, I::DisableProtection(d), Observed::Task(t)) => {
            delete_replica(ctx, d, t)
        }
        (K::RemoveItem, _, _) => Decision::done(vec![Effect::DeleteItem { item }]),
        (
            K::CheckChangePoint,
            I::ChangeRecoveryPoint(c),
            Observed::Item {
                state,
                point_listed,
                ..
            },
        ) => match state {
            Some(ProtectionState::ChangeRecoveryPointInProgress) => {
                point_check(&item, &c.point_id, *point_listed)
            }
            other => Decision::fail(
                "InvalidState",
                format!("the item is {other:?}, not changing its recovery point"),
            ),
        },
        (K::CompleteChangePoint, I::ChangeRecoveryPoint(c), _) => Decision::done(vec![
            Effect::Transition {
                item: item.clone(),
                action: ItemAction::FinishChangeRecoveryPoint,
            },
            Effect::RecordFailover {
                item,
                point_id: c.point_id.clone(),
            },
        ]),
        (K::CheckReprotect, _, Observed::Item { state, .. }) => match state {
            Some(ProtectionState::ReprotectInProgress) => Decision::done(vec![]),
            other => Decision::fail(
                "InvalidState",
                format!("the item is {other:?}, not being reprotected"),
            ),
        },
        (K::SeedReverseReplica, I::Reprotect(r), Observed::Task(t)) => seed_reverse(ctx, r, t),
        (K::ReverseReplication, _, Observed::Points { listed }) => {
            if *listed > 0 {
                Decision::done(vec![])
            } else {
                Decision::wait()
            }
        }
        (K::RemoveSeed, I::Reprotect(r), Observed::Task(t)) => remove_seed(ctx, r, t),
        (K::CompleteReprotect, _, _) => Decision::done(vec![Effect::Transition {
            item,
            action: ItemAction::FinishReprotect,
        }]),
        (K::VerifyStores, _, Observed::Stores(tasks)) => verify_stores(ctx, tasks),
        (
            K::CheckTestFailover,
            I::TestFailover(t),
            Observed::Item {
                test, point_listed, ..
            },
        ) => match test {
            Some(
                TestFailoverState::TestFailoverInitiated | TestFailoverState::TestFailoverCompleted,
            ) => point_check(&item, &t.point_id, *point_listed),
            other => Decision::fail(
                "InvalidState",
                format!("item '{item}' is not in a test failover (test failover state {other:?})"),
            ),
        },
        (K::CompleteTestFailover, _, _) => Decision::done(vec![
            Effect::TestTransition {
                item: item.clone(),
                action: TestAction::Finish,
            },
            Effect::RecordTestFailover { item },
        ]),
        (K::CheckCleanup, _, Observed::Item { test, .. }) => match test {
            Some(TestFailoverState::TestFailoverCleanupInitiated | TestFailoverState::None) => {
                Decision::done(vec![])
            }
            other => Decision::fail(
                "InvalidState",
                format!(
                    "item '{item}' is not cleaning up a test failover (test failover state {other:?})"
                ),
            ),
        },
        (K::RemoveTestVm, I::TestFailoverCleanup(c), Observed::Task(t)) => {
            remove_replica(ctx, c, t)
        }
        (K::WriteTestDisks, I::TestFailover(tf), Observed::Task(t)) => {
            write_test_disks(ctx, input, tf, t)
        }
        (K::RemoveTestDisks, I::TestFailoverCleanup(c), Observed::Task(t)) => {
            remove_test_disks(ctx, c, t)
        }
        (K::CompleteCleanup, _, _) => Decision::done(vec![
            Effect::TestTransition {
                item: item.clone(),
                action: TestAction::FinishCleanup,
            },
            Effect::ClearTestFailover { item },
        ]),
        (K::CheckNetworkMapping, I::CreateNetworkMapping(m), Observed::Network { exists }) => {
            if *exists {
                Decision::done(vec![])
            } else {
                Decision::fail(
                    "NetworkNotFound",
                    format!(
                        "recovery network '{}' is no longer reported by any agent of fabric '{}'",
                        m.recovery_network, m.recovery_fabric
                    ),
                )
            }
        }
        (K::MapNetworks, I::CreateNetworkMapping(m), _) => {
            Decision::done(vec![Effect::MapNetworks(NetworkRef {
                fabric: m.fabric.clone(),
                network: m.network.clone(),
                name: m.name.clone(),
            })])
        }
        (K::RemoveNetworkMapping, I::DeleteNetworkMapping(m), _) => {
            Decision::done(vec![Effect::RemoveNetworkMapping(m.clone())])
        }
        (K::RemovePairing, I::DeletePairing(p), _) => {
            Decision::done(vec![Effect::RemovePairing(p.clone())])
        }
        (K::ExportJobs, I::ExportJobs(_), _) => Decision::done(vec![]),
        (key, input, seen) => Decision::fail(
            "JobInconsistent",
            format!(
                "step {} of a {} job cannot decide on {seen:?}: this is a bug in siterec",
                key.as_str(),
                input.kind().as_str()
            ),
        ),
    }
}

fn point_check(item: &str, point: &str, listed: bool) -> Decision {
    if listed {
        Decision::done(vec![])
    } else {
        Decision::fail(
            "RecoveryPointNotFound",
            format!("recovery point '{point}' of item '{item}' no longer exists"),
        )
    }
}

fn task_error(error: &str) -> &str {
    if error.is_empty() {
        "unknown error"
    } else {
        error
    }
}

/// Decides the final replication of a planned failover: done once the
/// source agent has reported the job's final point; failed when that agent
/// is not heard from, since the last changes cannot be shipped then.
fn final_replication(
    ctx: &StepCtx<'_>,
    item: &str,
    point: &Option<String>,
    source_agent: &Option<String>,
    source_last_seen_ms: Option<i64>,
) -> Decision {
    if let Some(point) = point {
        return Decision::done(vec![
            Effect::SetFinalPoint {
                point_id: point.clone(),
            },
            Effect::StepOutput(json!({ "finalPointId": point })),
        ]);
    }
    let Some(agent) = source_agent else {
        return Decision::fail(
            "SourceAgentNotConnected",
            format!(
                "no agent reports the machine of item '{item}': its last changes cannot be replicated; start its agent and run the planned failover again, or run an unplanned failover"
            ),
        );
    };
    if ctx.now_ms - source_last_seen_ms.unwrap_or(0).max(ctx.started_ms) > AGENT_WAIT_MS {
        return Decision::fail(
            "SourceAgentNotConnected",
            format!(
                "source agent {agent} has not been heard from for 5 minutes: the last changes of item '{item}' cannot be replicated; start the agent and run the planned failover again, or run an unplanned failover"
            ),
        );
    }
    Decision::wait()
}

/// Asks the item's recovery agent to delete its recovery points and
/// failover disks (when the job says so).
fn delete_replica(ctx: &StepCtx<'_>, d: &DisableInput, t: &TaskSeen) -> Decision {
    if !d.delete_replica {
        return Decision::done(vec![Effect::StepOutput(json!({
            "notes": ["the replica's recovery points and disks are kept (policy replicaDeletion: NotRequired)"]
        }))]);
    }
    let Some(agent) = &t.agent else {
        return Decision::done(vec![Effect::StepOutput(json!({
            "notes": ["the item has no recovery agent: nothing was replicated"]
        }))]);
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::RemoveReplicaData),
                agent: agent.clone(),
                work: TaskWork::DeleteReplica {
                    item: d.item.clone(),
                },
            });
            TaskResult::Pending
        }
    };
    match task {
        TaskResult::Succeeded { output } => {
            Decision::done(effects).with([Effect::StepOutput(output)])
        }
        TaskResult::Failed { error } => Decision::fail(
            "DeleteReplicaFailed",
            format!(
                "recovery agent {agent} could not delete the replica of item '{}': {}; run DisableProtection again",
                d.item,
                task_error(&error)
            ),
        ),
        TaskResult::Pending => agent_gone(ctx, agent, t.agent_last_seen_ms, "disable protection")
            .unwrap_or_else(Decision::wait)
            .with(effects),
    }
}

/// Asks the agent of the site replication goes to to hash the disks it
/// still has of the machine into its store as a seed point; replication
/// of the new epoch starts once it is there.
fn seed_reverse(ctx: &StepCtx<'_>, r: &ReprotectInput, t: &TaskSeen) -> Decision {
    let site = r.to.as_str();
    let Some(agent) = &t.agent else {
        return Decision::fail(
            "NoReplicaStore",
            format!("item '{}' has no agent at its {site} site", r.item),
        );
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::SeedReverseReplica),
                agent: agent.clone(),
                work: TaskWork::SeedReplica {
                    item: r.item.clone(),
                    machine: r.machine.clone(),
                    seed_id: seed_point_id(ctx.job_id),
                },
            });
            TaskResult::Pending
        }
    };
    match task {
        TaskResult::Succeeded { output } => Decision::done(vec![
            Effect::SetEpoch {
                item: r.item.clone(),
                epoch: Some(ctx.job_id.to_string()),
            },
            Effect::StepOutput(output),
        ]),
        TaskResult::Failed { error } => Decision::fail(
            "SeedFailed",
            format!(
                "the agent at the {site} site could not hash the machine's disks into its replica store: {}",
                task_error(&error)
            ),
        ),
        TaskResult::Pending => agent_gone(ctx, agent, t.agent_last_seen_ms, "reprotect")
            .unwrap_or_else(Decision::wait)
            .with(effects),
    }
}

/// Deletes the seed point once a point of the new epoch holds what it
/// vouched for. A seed left behind costs space only: said, not failed.
fn remove_seed(ctx: &StepCtx<'_>, r: &ReprotectInput, t: &TaskSeen) -> Decision {
    let seed = seed_point_id(ctx.job_id);
    let left = |why: String| {
        Decision::done(vec![Effect::StepOutput(json!({
            "notes": [format!("the seed point {seed} was left in the replica store: {why}")]
        }))])
    };
    let Some(agent) = &t.agent else {
        return left("the item has no agent there".into());
    };
    match &t.task {
        None => Decision::wait().with([Effect::EnsureTask {
            id: task_id(ctx.job_id, StepKey::RemoveSeed),
            agent: agent.clone(),
            work: TaskWork::Prune {
                item: r.item.clone(),
                point_ids: vec![seed.clone()],
            },
        }]),
        Some(TaskResult::Succeeded { .. }) => Decision::done(vec![]),
        Some(TaskResult::Failed { error }) => left(task_error(error).to_string()),
        Some(TaskResult::Pending) => {
            match agent_gone(ctx, agent, t.agent_last_seen_ms, "reprotect") {
                Some(_) => left(format!("agent {agent} did not answer")),
                None => Decision::wait(),
            }
        }
    }
}

fn materialize(ctx: &StepCtx<'_>, input: &JobInput, point: &str, t: &TaskSeen) -> Decision {
    let item = input.item().unwrap_or_default().to_string();
    let Some(agent) = &t.agent else {
        return Decision::fail(
            "NoRecoveryAgent",
            format!("item '{item}' has no recovery agent"),
        );
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            let work = match input {
                // Failback: the machine's own disks take the point, in place.
                JobInput::PlannedFailover(p) if p.to == Location::Primary => TaskWork::WriteBack {
                    item: item.clone(),
                    machine: p.machine.clone(),
                    point_id: point.to_string(),
                    sealed_key: input.sealed_key(),
                },
                _ => TaskWork::Materialize {
                    item: item.clone(),
                    point_id: point.to_string(),
                    formats: vec!["raw".into(), "qcow2".into()],
                    sealed_key: input.sealed_key(),
                },
            };
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::MaterializeDisks),
                agent: agent.clone(),
                work,
            });
            TaskResult::Pending
        }
    };
    match task {
        TaskResult::Succeeded { output } => Decision::done(effects).with([
            Effect::ForgetSealedKey,
            Effect::SetFailoverOutput { item, output },
        ]),
        TaskResult::Failed { error } => Decision::fail(
            "MaterializeFailed",
            format!(
                "the recovery agent could not write the disks: {}",
                task_error(&error)
            ),
        )
        .with([Effect::ForgetSealedKey]),
        TaskResult::Pending => agent_gone(ctx, agent, t.agent_last_seen_ms, "failover")
            .unwrap_or_else(Decision::wait)
            .with(effects),
    }
}

/// Asks the item's recovery agent to create and start a VM from the job's
/// recovery point (`test`: the test VM of a test failover, beside the
/// replicating item; else the failed-over VM), and records what it started.
/// The task is created once, with the NICs resolved then: a test failover
/// puts every NIC on the network the operator chose (or isolates them), a
/// failover follows the network mappings, and a NIC left isolated is said
/// in the step's output.
fn start_replica(
    ctx: &StepCtx<'_>,
    input: &JobInput,
    test: bool,
    t: &TaskSeen,
    placement: &Placement,
) -> Decision {
    let item = input.item().unwrap_or_default().to_string();
    let (point_id, vm_name, test_network) = match input {
        JobInput::TestFailover(t) => (&t.point_id, t.vm_name.clone(), t.network.as_deref()),
        JobInput::UnplannedFailover(f) => (
            &f.point_id,
            f.vm_name
                .clone()
                .unwrap_or_else(|| placement.machine.clone()),
            None,
        ),
        JobInput::PlannedFailover(PlannedFailoverInput {
            final_point: Some(point),
            ..
        }) => (point, placement.machine.clone(), None),
        JobInput::ChangeRecoveryPoint(c) => (&c.point_id, placement.machine.clone(), None),
        _ => {
            return Decision::fail(
                "JobInconsistent",
                "a VM start step in a job that starts no VM: this is a bug in siterec",
            );
        }
    };
    let Some(agent) = &t.agent else {
        return Decision::fail(
            "NoRecoveryAgent",
            format!("item '{item}' has no recovery agent"),
        );
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            let (fabric, machine) = (&placement.fabric, &placement.machine);
            let Some(info) = &placement.info else {
                return Decision::fail(
                    "MachineNotFound",
                    format!(
                        "machine '{machine}' is no longer reported by fabric '{fabric}': its VM settings (memory, CPUs, NICs) are unknown"
                    ),
                );
            };
            let Some(vm) = info.vm.clone() else {
                return Decision::fail(
                    "NotAVirtualMachine",
                    format!(
                        "machine '{machine}' is not a virtual machine: the recovery site cannot boot it"
                    ),
                );
            };
            let plan = match (test, test_network) {
                (true, Some(n)) => NicPlan::AllTo(n),
                (true, None) => NicPlan::Isolated,
                (false, _) => NicPlan::Mapped {
                    mappings: &placement.mappings,
                    available: &placement.available,
                },
            };
            let resolved = resolve_nics(&info.nics, plan);
            effects.push(Effect::StepOutput(json!({
                "vmName": vm_name, "agent": agent, "nics": resolved.nics, "notes": resolved.notes
            })));
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::StartVm),
                agent: agent.clone(),
                work: TaskWork::StartReplica {
                    item: item.clone(),
                    point_id: point_id.clone(),
                    vm_name: vm_name.clone(),
                    test,
                    vm,
                    nics: resolved.nics,
                    sealed_key: input.sealed_key(),
                },
            });
            TaskResult::Pending
        }
    };
    let what = if test { "test failover" } else { "failover" };
    match task {
        TaskResult::Succeeded { output } => {
            if let Err(e) = serde_json::from_value::<ReplicaStarted>(output.clone()) {
                return Decision::fail(
                    "StartReplicaFailed",
                    format!(
                        "recovery agent {agent} answered the VM start with an output that is not a started replica ({e})"
                    ),
                )
                .with([Effect::ForgetSealedKey]);
            }
            let record = if test {
                Effect::SetTestFailoverOutput { item, output }
            } else {
                Effect::SetFailoverOutput { item, output }
            };
            Decision::done(effects).with([Effect::ForgetSealedKey, record])
        }
        TaskResult::Failed { error } => Decision::fail(
            "StartReplicaFailed",
            format!(
                "the recovery agent could not create and start VM {vm_name}: {}",
                task_error(&error)
            ),
        )
        .with([Effect::ForgetSealedKey]),
        TaskResult::Pending => agent_gone(ctx, agent, t.agent_last_seen_ms, what)
            .unwrap_or_else(Decision::wait)
            .with(effects),
    }
}

/// A planned failover of a VM: the agent of the site it runs at powers it
/// down through ACPI and waits for the guest to power off (or, forced,
/// powers it off); the VM then stays down there.
fn shut_down_vm(ctx: &StepCtx<'_>, p: &PlannedFailoverInput, t: &TaskSeen) -> Decision {
    let Some(agent) = &t.agent else {
        return Decision::fail(
            "NoSourceAgent",
            format!(
                "no agent reports machine '{}' at the source site: its VM cannot be shut down",
                p.machine
            ),
        );
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::ShutDownSource),
                agent: agent.clone(),
                work: TaskWork::StopVm {
                    item: p.item.clone(),
                    vm_name: p.vm_to_stop().to_string(),
                    timeout_secs: p.shutdown_timeout_secs,
                    force: p.force,
                },
            });
            TaskResult::Pending
        }
    };
    match task {
        TaskResult::Succeeded { output } => {
            Decision::done(effects).with([Effect::StepOutput(output)])
        }
        TaskResult::Failed { error } => Decision::fail(
            "SourceNotStopped",
            format!(
                "VM '{}' was not shut down: {}",
                p.vm_to_stop(),
                task_error(&error)
            ),
        ),
        TaskResult::Pending => agent_gone(ctx, agent, t.agent_last_seen_ms, "planned failover")
            .unwrap_or_else(Decision::wait)
            .with(effects),
    }
}

/// A physical server's test failover: the recovery agent writes the
/// point's disks as images in a test directory of their own (beside, never
/// over, the failover disks), for the operator to boot or mount in an
/// isolated place; replication goes on.
fn write_test_disks(
    ctx: &StepCtx<'_>,
    input: &JobInput,
    tf: &TestFailoverInput,
    t: &TaskSeen,
) -> Decision {
    let Some(agent) = &t.agent else {
        return Decision::fail(
            "NoRecoveryAgent",
            format!("item '{}' has no recovery agent", tf.item),
        );
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::WriteTestDisks),
                agent: agent.clone(),
                work: TaskWork::MaterializeTest {
                    item: tf.item.clone(),
                    point_id: tf.point_id.clone(),
                    formats: vec!["raw".into(), "qcow2".into()],
                    sealed_key: input.sealed_key(),
                },
            });
            TaskResult::Pending
        }
    };
    match task {
        TaskResult::Succeeded { output } => Decision::done(effects).with([
            Effect::ForgetSealedKey,
            Effect::SetTestFailoverOutput {
                item: tf.item.clone(),
                output: json!({
                    "vmName": tf.vm_name,
                    "pointId": tf.point_id,
                    "agent": agent,
                    "disks": output,
                }),
            },
        ]),
        TaskResult::Failed { error } => Decision::fail(
            "MaterializeFailed",
            format!(
                "the recovery agent could not write the test copy's disks: {}",
                task_error(&error)
            ),
        )
        .with([Effect::ForgetSealedKey]),
        TaskResult::Pending => agent_gone(ctx, agent, t.agent_last_seen_ms, "test failover")
            .unwrap_or_else(Decision::wait)
            .with(effects),
    }
}

/// Asks the item's recovery agent to delete a physical test copy's disks.
fn remove_test_disks(ctx: &StepCtx<'_>, c: &CleanupInput, t: &TaskSeen) -> Decision {
    let Some(agent) = &t.agent else {
        return Decision::done(vec![Effect::StepOutput(json!({
            "notes": ["the item has no recovery agent: no test disks to delete"]
        }))]);
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::RemoveTestDisks),
                agent: agent.clone(),
                work: TaskWork::RemoveTestDisks {
                    item: c.item.clone(),
                },
            });
            TaskResult::Pending
        }
    };
    match task {
        TaskResult::Succeeded { .. } => Decision::done(effects),
        TaskResult::Failed { error } => Decision::fail(
            "RemoveTestDisksFailed",
            format!(
                "the recovery agent could not delete the test copy's disks: {}",
                task_error(&error)
            ),
        ),
        TaskResult::Pending => {
            agent_gone(ctx, agent, t.agent_last_seen_ms, "test failover cleanup")
                .unwrap_or_else(Decision::wait)
                .with(effects)
        }
    }
}

/// Asks the item's recovery agent to power off and delete the test VM.
fn remove_replica(ctx: &StepCtx<'_>, c: &CleanupInput, t: &TaskSeen) -> Decision {
    let Some(agent) = &t.agent else {
        // No recovery agent was ever chosen: no VM can have been started.
        return Decision::done(vec![Effect::StepOutput(json!({
            "notes": ["the item has no recovery agent: no test VM to delete"]
        }))]);
    };
    let mut effects = Vec::new();
    let task = match &t.task {
        Some(task) => task.clone(),
        None => {
            effects.push(Effect::EnsureTask {
                id: task_id(ctx.job_id, StepKey::RemoveTestVm),
                agent: agent.clone(),
                work: TaskWork::RemoveReplica {
                    item: c.item.clone(),
                    vm_name: c.vm_name.clone(),
                },
            });
            TaskResult::Pending
        }
    };
    match task {
        TaskResult::Succeeded { .. } => Decision::done(effects),
        TaskResult::Failed { error } => Decision::fail(
            "RemoveReplicaFailed",
            format!(
                "the recovery agent could not power off and delete test VM {}: {}",
                c.vm_name,
                task_error(&error)
            ),
        ),
        TaskResult::Pending => {
            agent_gone(ctx, agent, t.agent_last_seen_ms, "test failover cleanup")
                .unwrap_or_else(Decision::wait)
                .with(effects)
        }
    }
}

/// Asks every target agent the job names to verify its replica store and
/// waits for all of them. The reports become the job's output; any damage
/// (or a store that could not be verified) fails the job, naming the points.
fn verify_stores(ctx: &StepCtx<'_>, tasks: &[StoreTask]) -> Decision {
    let mut effects = Vec::new();
    let mut reports = Vec::new();
    let mut pending = false;
    let mut problems = Vec::new();
    for t in tasks {
        let agent = &t.agent;
        let task = match &t.task {
            Some(task) => task.clone(),
            None => {
                effects.push(Effect::EnsureTask {
                    id: verify_task_id(ctx.job_id, agent),
                    agent: agent.clone(),
                    work: TaskWork::Verify,
                });
                TaskResult::Pending
            }
        };
        match task {
            TaskResult::Succeeded { output } => {
                for p in output["points"].as_array().into_iter().flatten() {
                    if p["ok"] != Value::Bool(true) {
                        problems.push(format!(
                            "{}/{} ({} damaged chunk(s){})",
                            p["item"].as_str().unwrap_or("?"),
                            p["point_id"].as_str().unwrap_or("?"),
                            p["damaged_chunks"].as_array().map(|a| a.len()).unwrap_or(0),
                            p["error"]
                                .as_str()
                                .map(|e| format!(": {e}"))
                                .unwrap_or_default()
                        ));
                    }
                }
                reports.push(json!({"agent": agent, "report": output}));
            }
            TaskResult::Failed { error } => {
                let error = task_error(&error).to_string();
                problems.push(format!("agent {agent} could not verify its store: {error}"));
                reports.push(json!({"agent": agent, "error": error}));
            }
            TaskResult::Pending => {
                if ctx.now_ms - t.agent_last_seen_ms.unwrap_or(0).max(ctx.started_ms)
                    > AGENT_WAIT_MS
                {
                    problems.push(format!(
                        "agent {agent} has not been heard from for 5 minutes"
                    ));
                    reports.push(json!({"agent": agent, "error": "not connected"}));
                } else {
                    pending = true;
                }
            }
        }
    }
    if pending {
        return Decision::wait().with(effects);
    }
    effects.push(Effect::JobOutput(json!({ "stores": reports })));
    if problems.is_empty() {
        Decision::done(effects)
    } else {
        Decision::fail(
            "DamageFound",
            format!("replica store damage: {}", problems.join("; ")),
        )
        .with(effects)
    }
}

/// What a job that succeeded writes last.
pub fn on_success(_input: &JobInput) -> Vec<Effect> {
    vec![Effect::ForgetSealedKey]
}

/// The compensation of a failed job: what returns the resources it acted
/// on to where they were (an aborted failover returns the item to
/// Protected), and the error where the operator looks for it.
pub fn on_failure(input: &JobInput, message: &str) -> Vec<Effect> {
    let message = message.to_string();
    let mut effects = match input {
        JobInput::EnableProtection(i) => vec![Effect::Compensate {
            item: i.item.clone(),
            action: ItemAction::FailProtection,
            message,
        }],
        JobInput::UnplannedFailover(f) => vec![Effect::Compensate {
            item: f.item.clone(),
            action: ItemAction::AbortUnplannedFailover,
            message,
        }],
        JobInput::PlannedFailover(p) => vec![Effect::Compensate {
            item: p.item.clone(),
            action: ItemAction::AbortPlannedFailover,
            message,
        }],
        // The item stays DisablingProtection, its error saying what
        // failed: DisableProtection is what to run again.
        JobInput::DisableProtection(d) => vec![Effect::Compensate {
            item: d.item.clone(),
            action: ItemAction::StartDisable,
            message,
        }],
        // The disks may be from neither point: the item stays failed over,
        // its error saying so, for the point to be changed again.
        JobInput::ChangeRecoveryPoint(c) => vec![Effect::Compensate {
            item: c.item.clone(),
            action: ItemAction::AbortChangeRecoveryPoint,
            message,
        }],
        // Back to committed, and no replication of the new direction.
        JobInput::Reprotect(r) => vec![
            Effect::Compensate {
                item: r.item.clone(),
                action: ItemAction::AbortReprotect,
                message,
            },
            Effect::SetEpoch {
                item: r.item.clone(),
                epoch: None,
            },
        ],
        JobInput::CommitFailover(i) => vec![Effect::Compensate {
            item: i.item.clone(),
            action: ItemAction::AbortCommit,
            message,
        }],
        JobInput::ConfigureProtection(p) => vec![Effect::DropPendingPairing(p.clone())],
        // The item goes on replicating: its test failover state says what
        // failed, and cleanup is what to do next.
        JobInput::TestFailover(t) => vec![Effect::CompensateTest {
            item: t.item.clone(),
            action: TestAction::Fail,
            message,
        }],
        JobInput::TestFailoverCleanup(c) => vec![Effect::CompensateTest {
            item: c.item.clone(),
            action: TestAction::FailCleanup,
            message,
        }],
        JobInput::CreateNetworkMapping(m) => {
            vec![Effect::DropPendingNetworkMapping(NetworkRef {
                fabric: m.fabric.clone(),
                network: m.network.clone(),
                name: m.name.clone(),
            })]
        }
        JobInput::DeleteNetworkMapping(m) => vec![Effect::KeepNetworkMapping(m.clone())],
        JobInput::DeletePairing(p) => vec![Effect::KeepPairing(p.clone())],
        JobInput::ExportJobs(_) => vec![],
        // Each machine's job compensates its own operation; the plan's
        // job says where it stopped.
        JobInput::CreatePolicy(_) | JobInput::VerifyStore(_) | JobInput::RecoveryPlan(_) => {
            vec![]
        }
    };
    effects.push(Effect::ForgetSealedKey);
    effects
}

/// `action` applied to an item's lifecycle, idempotently: where the item
/// already is in the state the action leads to (a step re-run after a
/// crash), it stays — and its machine does not move twice.
pub fn transition(
    life: Lifecycle,
    action: ItemAction,
) -> Result<Lifecycle, crate::state::TransitionError> {
    use ItemAction as A;
    use ProtectionState as S;
    life.apply(action).or_else(|e| {
        let there = matches!(
            (life.state, action),
            (
                S::InitialReplicationInProgress | S::Protected,
                A::StartInitialReplication
            ) | (S::Protected, A::FinishInitialReplication)
                | (S::UnplannedFailoverCompleted, A::FinishUnplannedFailover)
                | (S::PlannedFailoverCompleted, A::FinishPlannedFailover)
                | (S::UnplannedFailoverCompleted, A::FinishChangeRecoveryPoint)
                | (S::FailoverCommitted, A::FinishCommit)
                | (S::Protected, A::FinishReprotect)
        );
        if there { Ok(life) } else { Err(e) }
    })
}

/// A test failover action applied idempotently, like [`transition`].
pub fn test_transition(
    state: TestFailoverState,
    action: TestAction,
    protection: ProtectionState,
) -> Result<TestFailoverState, crate::state::TransitionError> {
    use TestAction as A;
    use TestFailoverState as T;
    state.apply(action, protection).or_else(|e| {
        let there = matches!(
            (state, action),
            (T::TestFailoverCompleted, A::Finish)
                | (T::TestFailoverFailed, A::Fail)
                | (T::None, A::FinishCleanup)
                | (T::MarkedForDeletion, A::FailCleanup)
        );
        if there { Ok(state) } else { Err(e) }
    })
}
