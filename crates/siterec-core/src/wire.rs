//! The agent protocol: what agents and the vault, and source and target
//! agents, say to each other. Version 1; see `docs/agent-protocol.md`.
//!
//! Agents open every connection themselves (to the vault, and a source agent
//! to its target's data endpoint); the vault never connects to an agent.

use serde::{Deserialize, Serialize};

use crate::Consistency;

/// Version of the agent protocol; sent in the `siterec-agent-protocol` header.
pub const AGENT_PROTOCOL_VERSION: u32 = 1;
/// The `format` field of a registration key file.
pub const KEY_FILE_FORMAT: &str = "siterec-registration-key/1";
/// Registration keys are valid for 5 days, as in the seeds.
pub const KEY_VALIDITY_SECS: i64 = 5 * 24 * 3600;

/// The error code of the vault's answer (401) to an agent it does not know
/// (unregistered): the agent stops instead of retrying.
pub const AGENT_NOT_REGISTERED: &str = "AgentNotRegistered";

/// A registration key file (the vault credentials an agent enrols with).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyFile {
    pub format: String,
    /// The vault's ARM resource id.
    pub vault_id: String,
    /// Base URL of the vault's agent API (https).
    pub agent_url: String,
    /// The vault's server CA certificate: agents trust it for the agent API
    /// only (agent certificates come from another CA, so no agent can pose
    /// as the vault).
    pub ca_pem: String,
    pub fabric: String,
    pub key_id: String,
    pub secret: String,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolRequest {
    pub key_id: String,
    pub secret: String,
    pub csr_pem: String,
    pub hostname: String,
    pub agent_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolResponse {
    pub agent_id: String,
    pub fabric: String,
    pub cert_pem: String,
    /// The CA of agent certificates: trusted for data endpoints (source to
    /// target), not for the vault.
    pub agent_ca_pem: String,
}

/// A disk of a protectable machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DiskInfo {
    /// Stable name within the machine (from the agent config).
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
}

/// A protectable machine reported by an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MachineInfo {
    pub name: String,
    /// [`KIND_PHYSICAL`] or [`KIND_VM`].
    pub kind: String,
    pub disks: Vec<DiskInfo>,
    /// The machine's NICs, each on a VM network of its site (VMs only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicInfo>,
    /// What a replica of this VM is made of besides its disks (VMs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
    /// Set when the machine's disks cannot be read (the path is missing...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `MachineInfo::kind` of a server whose disks are files or block devices.
pub const KIND_PHYSICAL: &str = "PhysicalServer";
/// `MachineInfo::kind` of a QEMU/KVM virtual machine the agent manages.
pub const KIND_VM: &str = "VirtualMachine";

/// A NIC of a protectable VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NicInfo {
    /// Stable name within the machine (from the agent config).
    pub name: String,
    /// The VM network (of the machine's site) the NIC is connected to.
    pub network: String,
    /// The MAC address the guest sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A VM's size and boot settings: what the recovery site needs, besides the
/// disks, to create the replica VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Direct kernel boot (paths that must exist on the recovery host too);
    /// without `kernel` the VM boots from its first disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
}

/// A replica VM's NIC, after network mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaNic {
    /// The source NIC's name.
    pub name: String,
    /// The source NIC's MAC (kept, as a failed-over VM keeps its identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The recovery site's VM network to connect to; `None`: an isolated
    /// network with no route to anything (test failover without a network,
    /// or a source network without a mapping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// What a `StartReplica` task produced (its output).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStarted {
    pub vm_name: String,
    /// The VM's directory on the recovery host (QMP socket, logs, disks).
    pub run_dir: String,
    /// The guest's serial console, as a file on the recovery host.
    pub serial_log: String,
    pub disks: Vec<MaterializedDisk>,
    pub nics: Vec<ReplicaNic>,
}

/// Counters an agent keeps per replicated item (also written to its status file).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ItemCounters {
    pub cycles: u64,
    pub failed_cycles: u64,
    /// Bytes read from the source disks, all cycles.
    pub bytes_read: u64,
    /// Chunk bytes sent on the wire (after compression), all cycles.
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    pub last_cycle_bytes_read: u64,
    pub last_cycle_bytes_sent: u64,
    pub last_cycle_chunks_sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_point_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Recovery points waiting in the source's disk spool, and their bytes.
    #[serde(default)]
    pub spool_points: u64,
    #[serde(default)]
    pub spool_bytes: u64,
    /// Resynchronizations completed (after lost state or a spool overflow).
    #[serde(default)]
    pub resyncs: u64,
    /// What needs the operator's attention (spooling, resynchronization).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest {
    /// The protection container ("cloud") the agent's host belongs to.
    pub cloud: String,
    pub machines: Vec<MachineInfo>,
    /// The target role's data endpoint, if this agent keeps a replica store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_url: Option<String>,
    /// The VM networks of this host (its VMs' networks and the networks
    /// its compute driver can connect replica VMs to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Whether the target role's replica store is encrypted.
    #[serde(default)]
    pub store_encrypted: bool,
    /// The key id of the encrypted store's recovery key (checked by the
    /// vault against the key an operator gives at failover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_key_id: Option<String>,
    /// The agent's X25519 transport public key (base64): the vault seals a
    /// recovery key to it for the one task that needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_key: Option<String>,
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, ItemCounters>,
    /// The `version` of the last answer this agent has: the vault answers
    /// once that changed, or after `wait_ms` (a long poll), so that tasks
    /// and assignments reach the agent as soon as the vault has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_version: Option<u64>,
    #[serde(default)]
    pub wait_ms: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    pub agent_id: String,
    /// Work for this agent, oldest first. Delivered until a result is posted.
    pub tasks: Vec<AgentTask>,
    /// The items this agent must replicate as a source, complete each time:
    /// an item missing from the list is no longer replicated.
    pub replications: Vec<ReplicationAssignment>,
    /// Target role: for each item whose replicas this agent keeps, the one
    /// source agent allowed to write it. Complete each time.
    #[serde(default)]
    pub sources: std::collections::BTreeMap<String, String>,
    /// Target role: item → directory to import its offline initial copy
    /// from (items in offline initial replication only).
    #[serde(default)]
    pub imports: std::collections::BTreeMap<String, String>,
    /// Source role: the machines of this agent whose items have failed
    /// over (they run, or are being brought up, at the other site). The
    /// agent never starts them on its own and says they are fenced; a
    /// failback lifts it. Complete each time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<String>,
    /// What the answer reflects (the vault's count of job engine passes);
    /// 0 from a vault that does not wait for changes.
    #[serde(default)]
    pub version: u64,
}

/// Replicate one machine to a target agent's data endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationAssignment {
    /// The protected item's name (also its key in the replica store).
    pub item: String,
    pub machine: String,
    pub disks: Vec<DiskInfo>,
    pub target_agent_id: String,
    pub target_url: String,
    pub copy_frequency_secs: u32,
    /// Take an app-consistent point (guest filesystems frozen through the
    /// guest agent) this often; 0 = never (the policy's app-consistent
    /// snapshot frequency).
    #[serde(default)]
    pub app_consistent_secs: u32,
    /// Multi-VM consistency group: the items of one group (all on this
    /// agent, one policy) get their recovery points at the same instant,
    /// with identical times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub compression: bool,
    /// Unix seconds before which initial replication must not start.
    #[serde(default)]
    pub not_before: Option<i64>,
    /// Offline initial replication: export the initial copy to this
    /// directory (on the source host) instead of sending it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_export: Option<String>,
    /// A planned failover (this job id) waits for a final point: take one
    /// now, report it with `finalFor` set to this id, and take no more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_point: Option<String>,
    /// The replication epoch (the reprotect job that set up this direction;
    /// `None` before any). When it changes, the agent forgets what it
    /// saved of the item and starts over from what the target holds
    /// (blocks whose chunks the target has are not sent again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentTask {
    pub id: String,
    pub work: TaskWork,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum TaskWork {
    /// Target: write the disks of a recovery point as images.
    #[serde(rename_all = "camelCase")]
    Materialize {
        item: String,
        point_id: String,
        /// "raw", "qcow2", "vhd-fixed", "vhd-dynamic".
        formats: Vec<String>,
        /// For an encrypted store: the recovery key the operator gave,
        /// sealed to this agent's transport key (`SRKT0001`, base64).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sealed_key: Option<SealedKey>,
    },
    /// Target: a physical server's test failover. Like `Materialize`, but
    /// into the item's test directory (`<failover dir>/.test/<item>/`),
    /// never over its failover disks; replication goes on. The output is a
    /// list of [`MaterializedDisk`].
    #[serde(rename_all = "camelCase")]
    MaterializeTest {
        item: String,
        point_id: String,
        formats: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sealed_key: Option<SealedKey>,
    },
    /// Target: delete the item's test directory (a physical test failover's
    /// cleanup). Idempotent: a directory that is gone is answered ok.
    #[serde(rename_all = "camelCase")]
    RemoveTestDisks { item: String },
    /// Target: delete these points of an item and collect unreferenced chunks.
    #[serde(rename_all = "camelCase")]
    Prune {
        item: String,
        point_ids: Vec<String>,
    },
    /// Target: re-read every manifest and chunk of the replica store; the
    /// output is the store's verify report.
    Verify,
    /// Target (compute): create a VM named `vm_name` from a recovery point
    /// (its disks written as qcow2 images on the recovery host) and start
    /// it. Idempotent: a VM of that name already started from that point is
    /// answered as it is. The output is a [`ReplicaStarted`].
    #[serde(rename_all = "camelCase")]
    StartReplica {
        item: String,
        point_id: String,
        /// `<machine>` for a failover, `<machine>-test` for a test failover.
        vm_name: String,
        /// A test failover's VM (replication of the item goes on).
        test: bool,
        vm: VmInfo,
        /// One per source NIC, in the source's order, networks mapped.
        nics: Vec<ReplicaNic>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sealed_key: Option<SealedKey>,
    },
    /// Target (compute): power off the VM `vm_name` and delete it with
    /// everything it created (disks, run directory). Idempotent: a VM that
    /// does not exist is answered ok.
    #[serde(rename_all = "camelCase")]
    RemoveReplica { item: String, vm_name: String },
    /// Target of a reprotect: hash the disks this agent still has of the
    /// machine (its own config's disks of `machine`, else the item's
    /// failover disks) into the replica store as point `seed_id`, so that
    /// the new source sends only the blocks that differ. Idempotent.
    #[serde(rename_all = "camelCase")]
    SeedReplica {
        item: String,
        machine: String,
        seed_id: String,
    },
    /// Failback: write recovery point `point_id` from this agent's store
    /// onto the disks of `machine` (this agent's own), in place, only the
    /// blocks that differ. The output is a list of [`MaterializedDisk`].
    #[serde(rename_all = "camelCase")]
    WriteBack {
        item: String,
        machine: String,
        point_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sealed_key: Option<SealedKey>,
    },
    /// The agent where VM `vm_name` runs (a planned failover's source
    /// site): ACPI power-down through QMP, then wait up to `timeout_secs`
    /// for the guest to power off; `force`: then power it off (its vCPUs
    /// stop where they are). The VM then stays down at this site: its QEMU
    /// is kept (stopped) for the final point, and this agent does not start
    /// it again. Idempotent: a VM already down is answered ok. Runs
    /// without a replica store.
    #[serde(rename_all = "camelCase")]
    StopVm {
        item: String,
        vm_name: String,
        timeout_secs: u32,
        #[serde(default)]
        force: bool,
    },
    /// Delete every recovery point of the item from the store (and collect
    /// its chunks), its failover disks, and a replica VM of it if one runs
    /// (disabling protection with replica deletion).
    #[serde(rename_all = "camelCase")]
    DeleteReplica { item: String },
    /// A recovery plan's script: run `path` (relative to the agent's
    /// scripts directory) with `env` added to its environment, stopped
    /// after `timeout_secs`. The task succeeds with `exitCode` (`null`
    /// when killed), `timedOut`, `stdout`/`stderr` (their last 64 KiB),
    /// `startedMs`, `endedMs`, whatever the exit status: the plan's job
    /// judges it. Runs without a replica store.
    #[serde(rename_all = "camelCase")]
    RunScript {
        path: String,
        timeout_secs: u32,
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
    },
}

/// A recovery key sealed to an agent's transport key (base64 of an
/// `SRKT0001` box). Only the agent can open it; `Debug` does not show it,
/// so task logs never carry it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SealedKey(pub String);

impl std::fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedKey(..)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub output: serde_json::Value,
}

/// What a materialize task produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MaterializedDisk {
    pub disk: String,
    pub format: String,
    pub path: String,
    pub size_bytes: u64,
    /// Written back in place (failback): the bytes written where the disk
    /// differed from the point; the rest was left as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
}

/// The vault's answer to a task result: the state the task has now (the
/// first result posted counts; a repeat is answered with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResultRecorded {
    pub task_id: String,
    pub state: String,
}

/// The vault's answer to a point report: the point is listed, and these
/// points of the item are pruned by the policy's retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PointRecorded {
    pub item: String,
    pub point_id: String,
    pub pruned: Vec<String>,
}

/// A source agent reports a recovery point the target has committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PointReport {
    pub item: String,
    pub point_id: String,
    pub created_at_ms: i64,
    pub consistency: Consistency,
    pub bytes_sent: u64,
    pub bytes_read: u64,
    /// The planned failover job this point is the final point of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_for: Option<String>,
}

/// Answer of the target's commit endpoint when chunks are missing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitRefused {
    pub message: String,
    pub missing_chunks: Vec<String>,
}

/// Error body of the agent API and data endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireError {
    pub code: String,
    pub message: String,
}
