//! `siterec`: the one binary. Vault, agent, every operation, and the quickstart.

mod bench;
mod bench_api;
mod bench_plan;
mod bench_roundtrip;
mod bench_vm;
mod client;
mod output;
mod plan_cli;
mod quickstart;
mod sample;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use client::Api;
use output::Format;
use siterec_api as sapi;

#[derive(Parser)]
#[command(
    name = "siterec",
    version,
    about = "Self-hosted Site Recovery: replicate machines' disks, keep recovery points, fail over"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How the CLI finds the vault's API.
#[derive(Args, Clone)]
struct Conn {
    /// The vault's data directory (reads vault.json and admin.token there).
    #[arg(long, global = true, env = "SITEREC_VAULT_DIR")]
    vault_dir: Option<PathBuf>,
    /// The vault's API URL, with --token-file and --vault-id, instead of --vault-dir.
    #[arg(long, global = true, env = "SITEREC_URL")]
    url: Option<String>,
    #[arg(long, global = true, env = "SITEREC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[arg(long, global = true, env = "SITEREC_VAULT_ID")]
    vault_id: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the vault (control plane), or manage its registration keys.
    Vault(VaultCmd),
    /// Run an agent, or show its status.
    Agent(AgentCmd),
    /// Sites (fabrics).
    #[command(subcommand)]
    Fabric(FabricCmd),
    /// Protection containers ("clouds") of a site.
    #[command(subcommand)]
    Cloud(CloudCmd),
    /// Machines agents discovered (protectable items).
    #[command(subcommand)]
    Machine(MachineCmd),
    /// Replication policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Cloud pairings (protection container mappings).
    #[command(subcommand)]
    Pairing(PairingCmd),
    /// VM networks agents report, and network mappings (source VM network →
    /// recovery network).
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Protected items: enable protection, list, show.
    #[command(subcommand)]
    Item(ItemCmd),
    /// Recovery points of a protected item.
    #[command(subcommand)]
    Points(PointsCmd),
    /// Fail a protected item over, and commit the failover.
    #[command(subcommand)]
    Failover(FailoverCmd),
    /// Recovery plans: machines in ordered groups, with scripts and manual
    /// actions, failed over (and back) together.
    #[command(subcommand)]
    Plan(plan_cli::PlanCmd),
    /// Jobs: every long operation, with its steps.
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// Replica stores.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Events the vault raised: RPO over threshold, servers not heard
    /// from, replication health changes, failover outcomes.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Alert settings: email addresses (stored) and a webhook every new
    /// event is POSTed to.
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Benchmarks that run the peers (restic, borg, rsync, qemu-img) side by side.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run everything once, unattended, and check the result.
    Quickstart {
        /// Working directory (created; everything goes under it).
        #[arg(long)]
        dir: PathBuf,
        /// Size of the sample disk in MiB.
        #[arg(long, default_value_t = 256)]
        disk_mib: u64,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// The vault's API at a fleet's size: list 10,000 protected items page by page and get single items, on SQLite and PostgreSQL.
    Api(bench_api::ApiBenchOptions),
    /// Test failover of a recovery plan of 10 and of 100 file-backed machines (disks written at the recovery site, no boot), and where the time goes.
    ///
    /// Example: siterec bench plan --dir /var/tmp/plan
    Plan(bench_plan::PlanBenchOptions),
    /// The way there and back of a physical server: planned failover, reprotect and failback with 1% changed on each side, against a full copy and rsync --inplace --no-whole-file bringing the disk back.
    ///
    /// Example: siterec bench roundtrip --dir /var/tmp/rt
    Roundtrip {
        /// Working directory (needs about 5× the disk size free).
        #[arg(long)]
        dir: PathBuf,
        /// Disk size in MiB.
        #[arg(long, default_value_t = 2048)]
        size_mib: u64,
        /// Percentage of the disk written on each side.
        #[arg(long, default_value_t = 1.0)]
        change_percent: f64,
    },
    /// Initial replication, a 1% delta cycle and restore, against restic, borg, rsync and qemu-img.
    Replication {
        /// Working directory (needs about 5× the image size free).
        #[arg(long)]
        dir: PathBuf,
        /// Image size in MiB.
        #[arg(long, default_value_t = 2048)]
        size_mib: u64,
        /// Percentage of 4 KiB blocks overwritten before the delta cycle.
        #[arg(long, default_value_t = 1.0)]
        churn_percent: f64,
        /// Chunk uploads in flight (as the agent's upload_streams, 1-32).
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Measure siterec only (for profiling): skip restic, borg, rsync and qemu-img.
        #[arg(long)]
        no_peers: bool,
    },
    /// VM replication and instant failover: a cycle with dirty bitmaps against the hash scan, the RPO at 30 s and continuous, and replica boot time of a 1 GiB against a 64 GiB disk.
    Vm {
        /// Working directory (needs about 3× --size-mib free, and a few GiB for the RPO part's store).
        #[arg(long)]
        dir: PathBuf,
        /// Disk size of the cycle-cost part, in MiB.
        #[arg(long, default_value_t = 2048)]
        size_mib: u64,
        /// Percentage of the 4 KiB blocks written before the measured cycle.
        #[arg(long, default_value_t = 1.0)]
        churn_percent: f64,
        /// Seconds of each RPO mode (a cycle every 30 s, then continuous).
        #[arg(long, default_value_t = 120)]
        rpo_secs: u64,
        /// Parts to skip, comma-separated: cycle, rpo, instant.
        #[arg(long, value_delimiter = ',')]
        skip: Vec<String>,
        /// Replica boots per disk size in the instant failover part (alternating; medians compared).
        #[arg(long, default_value_t = 3)]
        failover_runs: usize,
        /// Keep each part's files (images, stores, VM directories) under --dir.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct VaultCmd {
    #[command(subcommand)]
    sub: Option<VaultSub>,
    /// Data directory (database, CA, token).
    #[arg(long, default_value = "siterec-vault")]
    data: PathBuf,
    /// API address.
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// Agent API address (TLS).
    #[arg(long, default_value = "127.0.0.1:7443")]
    agent_listen: SocketAddr,
    /// Vault name (first start only).
    #[arg(long, default_value = "siterec-vault")]
    name: String,
    /// The vault database: a PostgreSQL URL (postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE).
    /// Without it, SQLite in the data directory (vault.db).
    #[arg(long, env = "SITEREC_DATABASE")]
    database: Option<String>,
    /// A test failover left completed longer than this is cleaned up by
    /// the vault (an event says so): 14d, 36h, 90m or 600s.
    #[arg(long, default_value = "14d", value_parser = parse_duration)]
    test_failover_max_age: std::time::Duration,
}

#[derive(Subcommand)]
enum VaultSub {
    /// Registration keys for enrolling agents.
    #[command(subcommand)]
    Key(KeyCmd),
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Write a registration key file, valid for 5 days, for agents of one site.
    Create {
        #[arg(long)]
        fabric: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in seconds (default and maximum: 432000, 5 days).
        #[arg(long)]
        valid_seconds: Option<i64>,
    },
    List,
    /// Revoke a key: agents can no longer enrol with it.
    Revoke {
        key_id: String,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentCmd {
    #[command(subcommand)]
    sub: Option<AgentSub>,
    /// Registration key file (first start only).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Data directory (identity, state, replica store).
    #[arg(long, default_value = "siterec-agent")]
    data: PathBuf,
    /// Agent configuration (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AgentSub {
    /// Show the agent's identity and counters from its data directory.
    Status {
        #[arg(long, default_value = "siterec-agent")]
        data: PathBuf,
    },
    /// Set the host's replication bandwidth limits (the running agent picks
    /// them up within a second): work and non-work hours, 512 Kbps to 102
    /// Mbps each, or --none.
    Throttle {
        #[arg(long, default_value = "siterec-agent")]
        data: PathBuf,
        /// No throttling.
        #[arg(long, conflicts_with_all = ["work_kbps", "non_work_kbps"])]
        none: bool,
        /// Work days, e.g. mon,tue,wed,thu,fri.
        #[arg(long, default_value = "mon,tue,wed,thu,fri")]
        work_days: String,
        #[arg(long, default_value_t = 9)]
        start_hour: u8,
        #[arg(long, default_value_t = 18)]
        end_hour: u8,
        #[arg(long, required_unless_present = "none")]
        work_kbps: Option<u64>,
        #[arg(long, required_unless_present = "none")]
        non_work_kbps: Option<u64>,
        /// The schedule's time zone as minutes east of UTC.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        utc_offset_minutes: i32,
    },
    /// Unregister an agent from the vault (refused while a protected item
    /// needs it): its certificate is no longer accepted, and the agent
    /// stops at its next heartbeat.
    Unregister {
        #[arg(long)]
        fabric: String,
        /// The agent's id (see 'siterec fabric agents FABRIC').
        agent: String,
    },
}

#[derive(Subcommand)]
enum FabricCmd {
    List,
    /// The agents (recovery services providers) of a site.
    Agents {
        fabric: String,
    },
    /// Delete a site (refused while it has agents, pairings, protected
    /// items or network mappings).
    Delete {
        fabric: String,
    },
}

#[derive(Subcommand)]
enum CloudCmd {
    List {
        #[arg(long)]
        fabric: String,
    },
}

#[derive(Subcommand)]
enum MachineCmd {
    List {
        #[arg(long)]
        fabric: String,
        #[arg(long)]
        cloud: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    Create {
        name: String,
        /// Copy frequency in seconds: 30, 300 or 900 (the seeds), or 5, 10 or
        /// 15 (continuous replication).
        #[arg(long, default_value_t = 300)]
        copy_frequency: u32,
        /// Keep recovery points for this many hours (0–24).
        #[arg(long, conflicts_with = "recovery_points")]
        retention_hours: Option<u32>,
        /// Or keep this many additional recovery points (0–15).
        #[arg(long)]
        recovery_points: Option<u32>,
        /// App-consistent snapshot frequency in hours (0 = off, up to 12).
        #[arg(long, default_value_t = 0)]
        app_consistent_hours: u32,
        #[arg(long)]
        no_compression: bool,
        /// Encrypt data stored (the recovery agent's store must be encrypted).
        #[arg(long)]
        encrypt: bool,
        /// Delete the replica (its recovery points and disks at the
        /// recovery site) when protection is disabled.
        #[arg(long)]
        delete_replica: bool,
        /// ARM instanceType of the policy.
        #[arg(long, default_value = "HyperVReplicaAzure")]
        instance_type: String,
        /// Offline initial replication: the source agent exports the initial
        /// copy to this directory on its host (needs --offline-import-path).
        #[arg(long, requires = "offline_import_path")]
        offline_export_path: Option<String>,
        /// Where the operator puts the exported copy on the recovery host;
        /// the recovery agent imports it from there.
        #[arg(long, requires = "offline_export_path")]
        offline_import_path: Option<String>,
        /// Alert when an item's RPO exceeds this many minutes (default:
        /// two copy intervals and a minute).
        #[arg(long, conflicts_with = "rpo_threshold_secs")]
        rpo_threshold_minutes: Option<u32>,
        /// The RPO alert threshold in seconds, for thresholds under a
        /// minute (siterec's rpoThresholdInSeconds).
        #[arg(long)]
        rpo_threshold_secs: Option<u32>,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum PairingCmd {
    /// Pair a primary cloud with a recovery cloud under a policy.
    Create {
        #[arg(long)]
        fabric: String,
        #[arg(long)]
        cloud: String,
        #[arg(long)]
        target_fabric: String,
        #[arg(long)]
        target_cloud: String,
        #[arg(long)]
        policy: String,
        #[arg(long)]
        name: Option<String>,
    },
    List,
    /// Delete a cloud pairing (refused while it protects items).
    Delete {
        #[arg(long)]
        fabric: String,
        #[arg(long)]
        cloud: String,
        /// The pairing's name (default: the cloud's one pairing).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// The VM networks of a site (reported by its agents), or of every site.
    List {
        #[arg(long)]
        fabric: Option<String>,
    },
    /// Map a VM network of a site to a network of the recovery site: a
    /// failed-over VM's NIC on the source network is connected to it.
    Map {
        #[arg(long)]
        fabric: String,
        #[arg(long)]
        network: String,
        #[arg(long)]
        recovery_fabric: String,
        #[arg(long)]
        recovery_network: String,
        /// Mapping name (default: NETWORK-to-RECOVERY_NETWORK).
        #[arg(long)]
        name: Option<String>,
        /// ARM instanceType of the mapping's fabric-specific details.
        #[arg(long, default_value = "VmmToVmm")]
        instance_type: String,
    },
    /// Every network mapping of the vault.
    Mappings,
    /// Remove the network mapping of a VM network.
    Unmap {
        #[arg(long)]
        fabric: String,
        #[arg(long)]
        network: String,
        /// The mapping's name (default: the network's one mapping).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum ItemCmd {
    /// Enable protection of a machine (runs initial replication).
    Enable {
        #[arg(long)]
        fabric: String,
        #[arg(long)]
        cloud: String,
        #[arg(long)]
        machine: String,
        /// Protected item name (default: the machine's).
        #[arg(long)]
        name: Option<String>,
        /// Policy (default: the pairing's).
        #[arg(long)]
        policy: Option<String>,
        /// Multi-VM consistency group to put the item in (created by its
        /// first item). The recovery points of a group's items are taken
        /// at one instant: every machine of a group must be on the same
        /// agent and use the same policy.
        #[arg(long)]
        group: Option<String>,
        /// Return once the job has started.
        #[arg(long)]
        no_wait: bool,
    },
    List,
    Show {
        item: String,
    },
    /// Disable protection: replication stops and the item is removed (with
    /// its recovery points and replica disks when its policy says
    /// replicaDeletion Required).
    Disable {
        item: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Reprotect a machine whose failover is committed: replicate it from
    /// where it runs back to the site it left (whose agent needs a
    /// [target] store). Only the blocks that differ from the disks still
    /// there are sent.
    ///
    /// Example: siterec item reprotect web01
    Reprotect {
        item: String,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum PointsCmd {
    List { item: String },
}

#[derive(Subcommand)]
enum FailoverCmd {
    /// Unplanned failover to the recovery site.
    Unplanned {
        item: String,
        /// `latest` or a recovery point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// The recovery key file exported when the item's encrypted replica
        /// store was created (required for an item in an encrypted store).
        /// The vault seals it to the recovery agent for this failover only.
        #[arg(long, value_name = "FILE")]
        encryption_key: Option<std::path::PathBuf>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Planned failover, without data loss: the source's last changes are
    /// replicated into a final point and the machine comes up from it. A
    /// physical server must be stopped first; say so with --source-stopped.
    /// A VM is shut down by siterec (ACPI power-down, then up to
    /// --shutdown-timeout for the guest to power off; --force powers it off
    /// after that).
    Planned {
        item: String,
        /// The source server is stopped (or its disks are out of service).
        #[arg(long)]
        source_stopped: bool,
        /// A VM: seconds the guest has to power off after the ACPI
        /// power-down (default 120).
        #[arg(long, value_name = "SECONDS")]
        shutdown_timeout: Option<u32>,
        /// A VM: power it off when the guest does not power off in time
        /// (its final point is then crash-consistent).
        #[arg(long)]
        force: bool,
        /// The recovery key file, for an item in an encrypted replica store.
        #[arg(long, value_name = "FILE")]
        encryption_key: Option<std::path::PathBuf>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Rebuild a failed-over (not yet committed) server from another
    /// recovery point.
    ChangePoint {
        item: String,
        /// The recovery point id.
        #[arg(long)]
        point: String,
        /// The recovery key file, for an item in an encrypted replica store.
        #[arg(long, value_name = "FILE")]
        encryption_key: Option<std::path::PathBuf>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Commit a completed failover.
    Commit {
        item: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Test failover: start a copy of a protected VM at the recovery site,
    /// named ITEM's machine with `-test`, while replication goes on; for a
    /// physical server, write its disks as images into a test directory
    /// of the recovery agent (no network).
    Test {
        item: String,
        /// `latest` or a recovery point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// A network of the recovery site to connect every NIC to (default:
        /// an isolated network).
        #[arg(long)]
        network: Option<String>,
        /// The recovery key file, for an item in an encrypted replica store.
        #[arg(long, value_name = "FILE")]
        encryption_key: Option<std::path::PathBuf>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Power off and delete a test failover's VM (a server's: its disks).
    TestCleanup {
        item: String,
        /// Notes on the test (kept with the cleanup job).
        #[arg(long)]
        comments: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Re-read and check every chunk and manifest of a site's replica
    /// stores (through its agents); report damage per recovery point.
    Verify {
        #[arg(long)]
        fabric: String,
    },
}

#[derive(Subcommand)]
enum JobsCmd {
    /// The jobs, newest first; the options filter them (ARM `$filter`).
    List(JobFilterArgs),
    Show {
        id: String,
    },
    /// Export the jobs as CSV (ARM replicationJobs/export), to stdout or a file.
    Export {
        /// CSV (the one format written; the flag says so in scripts).
        #[arg(long)]
        csv: bool,
        /// Write the CSV to this file instead of stdout (`--out`, as `vault
        /// key create` has it: `--output` is the global output format).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        filter: JobFilterArgs,
    },
    /// Run a failed recovery plan's job again from the step that failed
    /// (machines whose operation failed are tried again).
    Restart {
        id: String,
        /// Follow the job to its end.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a recovery plan's job between its steps (machines whose
    /// operations run finish them; no further group starts).
    Cancel {
        id: String,
    },
}

#[derive(Subcommand)]
enum EventsCmd {
    /// Events, oldest first (the newest 1,000 that match).
    List {
        /// Critical, Warning or Info.
        #[arg(long)]
        severity: Option<String>,
        /// Only events about this protected item (or agent host, or job target).
        #[arg(long)]
        item: Option<String>,
        /// Only events since this time: RFC 3339 (2026-01-31T22:00:00Z) or
        /// an age (90s, 10m, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
    },
    /// One event, with its details.
    Show { name: String },
}

#[derive(Subcommand)]
enum AlertsCmd {
    /// Change the alert settings (what is not given stays as it was).
    Set {
        /// An email address to notify (repeat for more; stored only — siterec
        /// sends no mail). Replaces the stored list.
        #[arg(long = "email")]
        emails: Vec<String>,
        /// Remove every stored email address.
        #[arg(long, conflicts_with = "emails")]
        no_email: bool,
        /// POST every new event as JSON to this http(s) URL, retried with
        /// backoff until it answers 2xx.
        #[arg(long, conflicts_with = "no_webhook")]
        webhook: Option<String>,
        /// Stop sending events to the webhook.
        #[arg(long)]
        no_webhook: bool,
        /// Also notify the subscription's owners (stored only).
        #[arg(long)]
        send_to_owners: Option<bool>,
    },
    /// The alert settings.
    Show,
}

/// Which jobs: each option a clause of the ARM `$filter`.
#[derive(Args, Default)]
struct JobFilterArgs {
    /// Job type (scenarioName, e.g. UnplannedFailover, EnableDr); a comma-separated list.
    #[arg(long = "type")]
    kind: Option<String>,
    /// Job state (NotStarted, InProgress, Succeeded, Failed, Cancelled); a comma-separated list.
    #[arg(long)]
    state: Option<String>,
    /// The job's target, e.g. a protected item's name.
    #[arg(long)]
    item: Option<String>,
    /// Jobs started at or after this RFC 3339 time, or this long ago (30m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// Jobs started at or before this RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
    /// Jobs on resources of this site.
    #[arg(long)]
    fabric: Option<String>,
}

impl JobFilterArgs {
    /// (JobQueryParameter field, value) for each option given.
    fn fields(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut out = Vec::new();
        for (field, v) in [
            ("jobName", &self.kind),
            ("jobStatus", &self.state),
            ("targetObjectName", &self.item),
            ("fabricId", &self.fabric),
        ] {
            if let Some(v) = v {
                out.push((field, v.clone()));
            }
        }
        if let Some(t) = &self.since {
            out.push(("startTime", cli_time(t)?));
        }
        if let Some(t) = &self.until {
            out.push(("endTime", cli_time(t)?));
        }
        Ok(out)
    }

    /// The ARM `$filter`, if any option was given.
    fn filter(&self) -> anyhow::Result<Option<String>> {
        let clauses: Vec<String> = self
            .fields()?
            .into_iter()
            .map(|(f, v)| format!("{f} eq '{}'", v.replace('\'', "''")))
            .collect();
        Ok((!clauses.is_empty()).then(|| clauses.join(" and ")))
    }
}

/// A time for a job filter: RFC 3339 as given, or `N` followed by s, m, h
/// or d: that long before now.
fn cli_time(t: &str) -> anyhow::Result<String> {
    let t = t.trim();
    let unit = t.chars().last().unwrap_or(' ');
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return Ok(t.to_string()),
    };
    match t[..t.len() - 1].parse::<i64>() {
        Ok(n) if n >= 0 => {
            let at = time::OffsetDateTime::now_utc() - time::Duration::seconds(n * secs);
            Ok(at
                .replace_nanosecond(0)
                .unwrap_or(at)
                .format(&time::format_description::well_known::Rfc3339)?)
        }
        _ => Ok(t.to_string()),
    }
}

/// Caps glibc's malloc arenas. The agent moves 1 MiB chunk buffers
/// between many threads (the runtime's and its blocking pool's); with an
/// arena per thread, freed buffers stay scattered over the arenas and the
/// resident set grows by half again (measured: 221 MiB peak for the
/// replication benchmark, 144 MiB with this cap, the same speed). An
/// explicit `MALLOC_ARENA_MAX` in the environment wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before
        // any thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // One TLS crypto provider (aws-lc-rs) for every client and server.
    siterec_pki::install_crypto_provider();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SITEREC_LOG")
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn api(conn: &Conn) -> anyhow::Result<Api> {
    if let Some(url) = &conn.url {
        let Some(tf) = &conn.token_file else {
            bail!("--url needs --token-file")
        };
        let token = client::read_token(tf)?;
        return Api::new(url, &token, conn.vault_id.as_deref())?
            .resolve()
            .await;
    }
    let dir = conn
        .vault_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("siterec-vault"));
    Api::from_vault_dir(&dir)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

const JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Prints the outcome of an operation; non-zero exit if it failed.
fn finish(op: client::Operation, out: Format, what: &str) -> anyhow::Result<ExitCode> {
    if op.status != "Succeeded" {
        eprintln!(
            "error: {what} failed: {} (job {})",
            op.error.unwrap_or_else(|| op.status.clone()),
            op.job_id
        );
        return Ok(ExitCode::FAILURE);
    }
    match out {
        Format::Json => {
            output::json(&json!({"jobId": op.job_id, "status": op.status, "result": op.result}))
        }
        Format::Table => println!("{what} succeeded (job {})", op.job_id),
    }
    Ok(ExitCode::SUCCESS)
}

fn started(job: &str, out: Format, what: &str) -> ExitCode {
    match out {
        Format::Json => output::json(&json!({"jobId": job, "status": "InProgress"})),
        Format::Table => println!("{what} started: job {job} ('siterec jobs show {job}')"),
    }
    ExitCode::SUCCESS
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let out = cli.output;
    match cli.cmd {
        Cmd::Vault(VaultCmd {
            sub: None,
            data,
            listen,
            agent_listen,
            name,
            database,
            test_failover_max_age,
        }) => {
            let v = siterec_vault::start(siterec_vault::VaultOptions {
                data_dir: data.clone(),
                listen,
                agent_listen,
                name,
                database,
                events: siterec_vault::events::EventOptions {
                    test_failover_max_age,
                },
            })
            .await?;
            println!("vault {}", v.endpoint.vault_id);
            println!("api   {}", v.endpoint.url);
            println!("agent {}", v.endpoint.agent_url);
            println!("token {}", v.endpoint.token_file.display());
            shutdown_signal().await;
            v.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vault(VaultCmd {
            sub: Some(VaultSub::Key(k)),
            ..
        }) => {
            let api = api(&cli.conn).await?;
            match k {
                KeyCmd::Create {
                    fabric,
                    out: path,
                    valid_seconds,
                } => {
                    let key = api.create_key(&fabric, valid_seconds).await?;
                    let body = serde_json::to_vec_pretty(&key)?;
                    write_private(&path, &body)?;
                    match out {
                        Format::Json => output::json(
                            &json!({"keyId": key["keyId"], "fabric": key["fabric"], "file": path, "expiresAt": key["expiresAt"]}),
                        ),
                        Format::Table => println!(
                            "registration key for fabric '{}' written to {} (valid 5 days)",
                            key["fabric"].as_str().unwrap_or(&fabric),
                            path.display()
                        ),
                    }
                }
                KeyCmd::List => {
                    let keys = api
                        .rows::<sapi::RegistrationKey>("siterecRegistrationKeys")
                        .await?;
                    output::rows(
                        out,
                        &keys,
                        &[
                            ("KEY", "/keyId"),
                            ("FABRIC", "/fabric"),
                            ("STATE", "/state"),
                            ("EXPIRES", "/expiryTime"),
                        ],
                    );
                }
                KeyCmd::Revoke { key_id } => {
                    api.delete(&format!("siterecRegistrationKeys/{key_id}"))
                        .await?;
                    if out == Format::Table {
                        println!("key {key_id} revoked");
                    } else {
                        output::json(&json!({"keyId": key_id, "state": "Revoked"}));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Agent(AgentCmd {
            sub: Some(AgentSub::Status { data }),
            ..
        }) => {
            let st = siterec_agent::AgentStatus::read(&data)?;
            let v = serde_json::to_value(&st)?;
            match out {
                Format::Json => output::json(&v),
                Format::Table => {
                    output::object(
                        out,
                        &v,
                        &[
                            ("agent", "/agentId"),
                            ("fabric", "/fabric"),
                            ("data endpoint", "/dataUrl"),
                            ("last heartbeat error", "/lastHeartbeatError"),
                        ],
                    );
                    let rows: Vec<Value> = st
                        .items
                        .iter()
                        .map(|(k, c)| {
                            let mut r = serde_json::to_value(c).unwrap_or(Value::Null);
                            r["item"] = k.clone().into();
                            r
                        })
                        .collect();
                    output::rows(
                        out,
                        &rows,
                        &[
                            ("ITEM", "/item"),
                            ("CYCLES", "/cycles"),
                            ("BYTES READ", "/bytesRead"),
                            ("BYTES SENT", "/bytesSent"),
                            ("LAST CYCLE SENT", "/lastCycleBytesSent"),
                            ("LAST ERROR", "/lastError"),
                        ],
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Agent(AgentCmd {
            sub:
                Some(AgentSub::Throttle {
                    data,
                    none,
                    work_days,
                    start_hour,
                    end_hour,
                    work_kbps,
                    non_work_kbps,
                    utc_offset_minutes,
                }),
            ..
        }) => throttle(
            &data,
            none,
            &work_days,
            (start_hour, end_hour),
            (work_kbps, non_work_kbps),
            utc_offset_minutes,
            out,
        ),
        Cmd::Agent(AgentCmd {
            sub: None,
            key,
            data,
            config,
        }) => {
            let Some(config) = config else {
                bail!("--config FILE is required to run an agent")
            };
            let config = siterec_agent::AgentConfig::load(&config)?;
            siterec_agent::run(
                siterec_agent::AgentOptions {
                    data_dir: data,
                    key_file: key,
                    config,
                },
                shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fabric(FabricCmd::List) => {
            let v = api(&cli.conn)
                .await?
                .rows::<sapi::Fabric>("replicationFabrics")
                .await?;
            output::rows(
                out,
                &v,
                &[
                    ("NAME", "/name"),
                    ("AGENTS", "/properties/customDetails/agents"),
                    ("ID", "/id"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fabric(FabricCmd::Agents { fabric }) => {
            let v = api(&cli.conn)
                .await?
                .rows::<sapi::Provider>(&format!(
                    "replicationFabrics/{fabric}/replicationRecoveryServicesProviders"
                ))
                .await?;
            output::rows(
                out,
                &v,
                &[
                    ("AGENT", "/name"),
                    ("HOST", "/properties/friendlyName"),
                    ("CLOUD", "/properties/protectionContainerFriendlyName"),
                    ("STATUS", "/properties/connectionStatus"),
                    ("LAST HEARTBEAT", "/properties/lastHeartBeat"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cloud(CloudCmd::List { fabric }) => {
            let v = api(&cli.conn)
                .await?
                .rows::<sapi::Container>(&format!(
                    "replicationFabrics/{fabric}/replicationProtectionContainers"
                ))
                .await?;
            output::rows(
                out,
                &v,
                &[
                    ("NAME", "/name"),
                    ("FABRIC", "/properties/fabricFriendlyName"),
                    ("PAIRING", "/properties/pairingStatus"),
                    ("ROLE", "/properties/role"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Machine(MachineCmd::List { fabric, cloud }) => {
            let machines = api(&cli.conn)
                .await?
                .list_as::<sapi::ProtectableItem>(&format!("replicationFabrics/{fabric}/replicationProtectionContainers/{cloud}/replicationProtectableItems"))
                .await?;
            let mut v = Vec::new();
            for m in &machines {
                let mut row = serde_json::to_value(m)?;
                if out == Format::Table {
                    let nics = m
                        .properties
                        .custom_details
                        .vm_nics
                        .iter()
                        .map(|n| format!("{}: {}", n.nic_id, n.vm_network_name))
                        .collect::<Vec<_>>()
                        .join(", ");
                    row["nicsText"] = nics.into();
                }
                v.push(row);
            }
            output::rows(
                out,
                &v,
                &[
                    ("NAME", "/name"),
                    ("STATUS", "/properties/protectionStatus"),
                    ("KIND", "/properties/customDetails/instanceType"),
                    ("NICS", "/nicsText"),
                    ("ERRORS", "/properties/protectionReadinessErrors"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Policy(p) => policy(&cli.conn, out, p).await,
        Cmd::Events(e) => events(&cli.conn, out, e).await,
        Cmd::Alerts(a) => alerts(&cli.conn, out, a).await,
        Cmd::Pairing(PairingCmd::Create {
            fabric,
            cloud,
            target_fabric,
            target_cloud,
            policy,
            name,
        }) => {
            let api = api(&cli.conn).await?;
            let name = name.unwrap_or_else(|| format!("{cloud}-to-{target_cloud}"));
            let body = input(sapi::CreateContainerMappingInput {
                target_protection_container_id: format!(
                    "{}/replicationFabrics/{target_fabric}/replicationProtectionContainers/{target_cloud}",
                    api.vault_id()
                ),
                policy_id: format!("{}/replicationPolicies/{policy}", api.vault_id()),
                provider_specific_input: sapi::InstanceType {
                    instance_type: "ReplicationProviderSpecificContainerMappingInput".into(),
                },
            });
            let rel = format!(
                "replicationFabrics/{fabric}/replicationProtectionContainers/{cloud}/replicationProtectionContainerMappings/{name}"
            );
            let op = api
                .run(reqwest::Method::PUT, &rel, &body, JOB_TIMEOUT)
                .await?;
            finish(op, out, &format!("pairing {name}"))
        }
        Cmd::Pairing(PairingCmd::List) => {
            let v = api(&cli.conn)
                .await?
                .rows::<sapi::ContainerMapping>("replicationProtectionContainerMappings")
                .await?;
            output::rows(
                out,
                &v,
                &[
                    ("NAME", "/name"),
                    ("SOURCE FABRIC", "/properties/sourceFabricFriendlyName"),
                    (
                        "SOURCE CLOUD",
                        "/properties/sourceProtectionContainerFriendlyName",
                    ),
                    ("TARGET FABRIC", "/properties/targetFabricFriendlyName"),
                    (
                        "TARGET CLOUD",
                        "/properties/targetProtectionContainerFriendlyName",
                    ),
                    ("POLICY", "/properties/policyFriendlyName"),
                    ("STATE", "/properties/state"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Network(n) => network(&cli.conn, out, n).await,
        Cmd::Item(i) => item(&cli.conn, out, i).await,
        Cmd::Points(PointsCmd::List { item }) => {
            let api = api(&cli.conn).await?;
            let (rel, _) = api.item_path(&item).await?;
            let v = api
                .rows::<sapi::RecoveryPoint>(&format!("{rel}/recoveryPoints"))
                .await?;
            output::rows(
                out,
                &v,
                &[
                    ("ID", "/name"),
                    ("TIME", "/properties/recoveryPointTime"),
                    ("TYPE", "/properties/recoveryPointType"),
                    (
                        "BYTES SENT",
                        "/properties/providerSpecificDetails/bytesSent",
                    ),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Failover(f) => failover(&cli.conn, out, f).await,
        Cmd::Jobs(JobsCmd::List(filter)) => {
            let api = api(&cli.conn).await?;
            let v = match filter.filter()? {
                Some(f) => {
                    api.rows_query::<sapi::Job>("replicationJobs", &[("$filter", &f)])
                        .await?
                }
                None => api.rows::<sapi::Job>("replicationJobs").await?,
            };
            output::rows(
                out,
                &v,
                &[
                    ("ID", "/name"),
                    ("JOB", "/properties/friendlyName"),
                    ("TARGET", "/properties/targetObjectName"),
                    ("STATE", "/properties/state"),
                    ("START", "/properties/startTime"),
                    ("END", "/properties/endTime"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plan(cmd) => plan_cli::run(api(&cli.conn).await?, cmd, out).await,
        Cmd::Jobs(JobsCmd::Restart { id, wait }) => {
            let api = api(&cli.conn).await?;
            api.start(
                reqwest::Method::POST,
                &format!("replicationJobs/{id}/restart"),
                &json!({}),
            )
            .await?;
            if wait {
                return plan_cli::follow(&api, &id, out).await;
            }
            Ok(started(&id, out, "restart"))
        }
        Cmd::Jobs(JobsCmd::Cancel { id }) => {
            api(&cli.conn)
                .await?
                .start(
                    reqwest::Method::POST,
                    &format!("replicationJobs/{id}/cancel"),
                    &json!({}),
                )
                .await?;
            if out == Format::Table {
                println!("job {id} cancelled");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Jobs(JobsCmd::Show { id }) => {
            let job: sapi::Job = api(&cli.conn)
                .await?
                .get_as(&format!("replicationJobs/{id}"))
                .await?;
            let v = serde_json::to_value(&job)?;
            if out == Format::Json {
                output::json(&v);
            } else {
                output::object(
                    out,
                    &v,
                    &[
                        ("job", "/name"),
                        ("name", "/properties/friendlyName"),
                        ("target", "/properties/targetObjectName"),
                        ("state", "/properties/state"),
                        ("start", "/properties/startTime"),
                        ("end", "/properties/endTime"),
                    ],
                );
                let steps = job
                    .properties
                    .tasks
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<Vec<_>, _>>()?;
                output::rows(
                    out,
                    &steps,
                    &[
                        ("STEP", "/name"),
                        ("STATE", "/state"),
                        ("START", "/startTime"),
                        ("END", "/endTime"),
                        ("ERROR", "/errors/0/taskErrorDetails/errorMessage"),
                        ("NOTES", "/customDetails/notes"),
                    ],
                );
                if let Some(e) = job.properties.errors.first() {
                    println!("error: {}", e.service_error_details.message);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Store(StoreCmd::Verify { fabric }) => verify_stores(&cli.conn, out, &fabric).await,
        Cmd::Jobs(JobsCmd::Export {
            csv: _,
            out: file,
            filter,
        }) => export_jobs(&cli.conn, file, &filter).await,
        Cmd::Pairing(PairingCmd::Delete {
            fabric,
            cloud,
            name,
        }) => delete_pairing(&cli.conn, out, &fabric, &cloud, name).await,
        Cmd::Fabric(FabricCmd::Delete { fabric }) => {
            let api = api(&cli.conn).await?;
            // Named before anything is removed: a typo is an error, not a no-op.
            api.get(&format!("replicationFabrics/{fabric}")).await?;
            api.delete(&format!("replicationFabrics/{fabric}")).await?;
            match out {
                Format::Table => println!("fabric {fabric} deleted"),
                Format::Json => output::json(&json!({"name": fabric, "deleted": true})),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Agent(AgentCmd {
            sub: Some(AgentSub::Unregister { fabric, agent }),
            ..
        }) => {
            let api = api(&cli.conn).await?;
            let base = format!("replicationFabrics/{fabric}/replicationRecoveryServicesProviders");
            let agents = api.list_as::<sapi::Provider>(&base).await?;
            if !agents.iter().any(|a| a.name.eq_ignore_ascii_case(&agent)) {
                bail!(
                    "fabric '{fabric}' has no agent '{agent}'; 'siterec fabric agents {fabric}' lists them"
                );
            }
            api.delete(&format!("{base}/{agent}")).await?;
            match out {
                Format::Table => println!("agent {agent} unregistered"),
                Format::Json => output::json(&json!({"agent": agent, "unregistered": true})),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Quickstart { dir, disk_mib } => quickstart::run(&dir, disk_mib, out).await,
        Cmd::Bench(BenchCmd::Replication {
            dir,
            size_mib,
            churn_percent,
            streams,
            no_peers,
        }) => {
            bench::replication(
                bench::BenchOptions {
                    dir,
                    size_mib,
                    churn_percent,
                    streams: streams.clamp(1, siterec_agent::source::MAX_UPLOAD_STREAMS),
                    peers: !no_peers,
                },
                out,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Roundtrip {
            dir,
            size_mib,
            change_percent,
        }) => {
            let ok = bench_roundtrip::roundtrip(
                bench_roundtrip::RoundtripOptions {
                    dir,
                    size_mib,
                    change_percent,
                },
                out,
            )
            .await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Bench(BenchCmd::Plan(opts)) => {
            bench_plan::plan(opts, out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Api(opts)) => {
            bench_api::api(opts, out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Vm {
            dir,
            size_mib,
            churn_percent,
            rpo_secs,
            skip,
            failover_runs,
            keep,
        }) => {
            bench_vm::vm(
                bench_vm::VmBenchOptions {
                    dir,
                    size_mib,
                    churn_percent,
                    rpo_secs,
                    skip,
                    failover_runs,
                    keep,
                },
                out,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn policy(conn: &Conn, out: Format, cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    let cols = [
        ("NAME", "/name"),
        ("TYPE", "/properties/providerSpecificDetails/instanceType"),
        (
            "COPY FREQUENCY (S)",
            "/properties/providerSpecificDetails/replicationInterval",
        ),
        (
            "RETENTION (H)",
            "/properties/providerSpecificDetails/recoveryPointHistoryDuration",
        ),
        (
            "POINTS",
            "/properties/providerSpecificDetails/recoveryPoints",
        ),
        (
            "APP-CONSISTENT (H)",
            "/properties/providerSpecificDetails/applicationConsistentSnapshotFrequencyInHours",
        ),
        (
            "COMPRESSION",
            "/properties/providerSpecificDetails/compression",
        ),
        (
            "ENCRYPTION",
            "/properties/providerSpecificDetails/encryption",
        ),
        (
            "RPO THRESHOLD (S)",
            "/properties/providerSpecificDetails/rpoThresholdInSeconds",
        ),
    ];
    match cmd {
        PolicyCmd::Create {
            name,
            copy_frequency,
            retention_hours,
            recovery_points,
            app_consistent_hours,
            no_compression,
            encrypt,
            delete_replica,
            instance_type,
            offline_export_path,
            offline_import_path,
            rpo_threshold_minutes,
            rpo_threshold_secs,
        } => {
            let (history, points) = match (retention_hours, recovery_points) {
                (_, Some(n)) => (None, Some(n)),
                (Some(h), None) => (Some(h), None),
                (None, None) => (Some(24), None),
            };
            let offline = match (offline_export_path, offline_import_path) {
                (Some(export), Some(import)) => Some((export, import)),
                _ => None,
            };
            let policy_input = sapi::PolicyProviderInput {
                instance_type,
                replication_interval: copy_frequency,
                recovery_point_history_duration: history,
                recovery_points: points,
                application_consistent_snapshot_frequency_in_hours: app_consistent_hours,
                compression: if no_compression { "Disable" } else { "Enable" }.into(),
                encryption: if encrypt { "Enable" } else { "Disable" }.into(),
                replica_deletion: delete_replica.then(|| "Required".into()),
                initial_replication_method: offline.as_ref().map(|_| "Offline".to_string()),
                offline_replication_export_path: offline.as_ref().map(|o| o.0.clone()),
                offline_replication_import_path: offline.map(|o| o.1),
                recovery_point_threshold_in_minutes: rpo_threshold_minutes,
                rpo_threshold_in_seconds: rpo_threshold_secs,
            };
            let op = api
                .run(
                    reqwest::Method::PUT,
                    &format!("replicationPolicies/{name}"),
                    &input(sapi::CreatePolicyInput {
                        provider_specific_input: policy_input,
                    }),
                    JOB_TIMEOUT,
                )
                .await?;
            finish(op, out, &format!("policy {name}"))
        }
        PolicyCmd::List => {
            output::rows(
                out,
                &api.rows::<sapi::Policy>("replicationPolicies").await?,
                &cols,
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Show { name } => {
            output::object(
                out,
                &api.get(&format!("replicationPolicies/{name}")).await?,
                &cols,
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Delete { name } => {
            api.delete(&format!("replicationPolicies/{name}")).await?;
            match out {
                Format::Table => println!("policy {name} deleted"),
                Format::Json => output::json(&json!({"name": name, "deleted": true})),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `90s`, `10m`, `36h`, `14d` (or plain seconds) as a duration.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: use e.g. 90s, 10m, 36h or 14d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("'{s}': the unit must be s, m, h or d")),
    };
    n.checked_mul(secs)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("'{s}' is too long"))
}

const EVENT_COLS: [(&str, &str); 6] = [
    ("TIME", "/properties/timeOfOccurrence"),
    ("SEVERITY", "/properties/severity"),
    ("CODE", "/properties/eventCode"),
    ("TYPE", "/properties/eventType"),
    ("OBJECT", "/properties/affectedObjectFriendlyName"),
    ("DESCRIPTION", "/properties/description"),
];

async fn events(conn: &Conn, out: Format, cmd: EventsCmd) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    match cmd {
        EventsCmd::List {
            severity,
            item,
            since,
        } => {
            // An OData string literal: quotes doubled.
            let lit = |v: &str| format!("'{}'", v.replace('\'', "''"));
            let mut clauses = Vec::new();
            if let Some(s) = severity {
                clauses.push(format!("Severity eq {}", lit(&s)));
            }
            if let Some(i) = item {
                clauses.push(format!("AffectedObjectFriendlyName eq {}", lit(&i)));
            }
            if let Some(s) = since {
                let t = match parse_duration(&s) {
                    Ok(age) => time::OffsetDateTime::now_utc() - age,
                    Err(_) => time::OffsetDateTime::parse(
                        &s,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "--since '{s}' is neither an RFC 3339 time (2026-01-31T22:00:00Z) nor an age (90s, 10m, 2h, 1d)"
                        )
                    })?,
                };
                let t = t
                    .format(&time::format_description::well_known::Rfc3339)
                    .context("formatting --since")?;
                clauses.push(format!("StartTime ge {}", lit(&t)));
            }
            let rows = api
                .rows_query::<sapi::Event>(
                    "replicationEvents",
                    &[("$filter", &clauses.join(" and "))],
                )
                .await?;
            output::rows(out, &rows, &EVENT_COLS);
        }
        EventsCmd::Show { name } => {
            let e: sapi::Event = api.get_as(&format!("replicationEvents/{name}")).await?;
            output::object(
                out,
                &serde_json::to_value(&e)?,
                &[
                    ("NAME", "/name"),
                    ("TIME", "/properties/timeOfOccurrence"),
                    ("SEVERITY", "/properties/severity"),
                    ("CODE", "/properties/eventCode"),
                    ("TYPE", "/properties/eventType"),
                    ("OBJECT", "/properties/affectedObjectFriendlyName"),
                    ("ID", "/properties/affectedObjectCorrelationId"),
                    ("DESCRIPTION", "/properties/description"),
                    ("DETAILS", "/properties/eventSpecificDetails"),
                ],
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn alerts(conn: &Conn, out: Format, cmd: AlertsCmd) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    let rel = "replicationAlertSettings/defaultAlertSetting";
    let setting = match cmd {
        AlertsCmd::Set {
            emails,
            no_email,
            webhook,
            no_webhook,
            send_to_owners,
        } => {
            let body = sapi::ConfigureAlertRequest {
                properties: sapi::ConfigureAlertProperties {
                    send_to_owners: send_to_owners
                        .map(|s| if s { "Send" } else { "DoNotSend" }.to_string()),
                    custom_email_addresses: if no_email {
                        Some(Vec::new())
                    } else {
                        Some(emails).filter(|e| !e.is_empty())
                    },
                    locale: None,
                    webhook_url: if no_webhook {
                        Some(String::new())
                    } else {
                        webhook
                    },
                },
            };
            api.put_as::<sapi::AlertSetting>(rel, &serde_json::to_value(&body)?)
                .await?
        }
        AlertsCmd::Show => api.get_as::<sapi::AlertSetting>(rel).await?,
    };
    output::object(
        out,
        &serde_json::to_value(&setting)?,
        &[
            ("NAME", "/name"),
            ("EMAILS", "/properties/customEmailAddresses"),
            ("SEND TO OWNERS", "/properties/sendToOwners"),
            ("WEBHOOK", "/properties/webhookUrl"),
        ],
    );
    Ok(ExitCode::SUCCESS)
}

const ITEM_COLS: [(&str, &str); 8] = [
    ("NAME", "/name"),
    ("STATE", "/properties/protectionState"),
    ("HEALTH", "/properties/replicationHealth"),
    ("ACTIVE", "/properties/activeLocation"),
    (
        "LAST REPLICATED",
        "/properties/providerSpecificDetails/lastReplicatedTime",
    ),
    (
        "RPO (S)",
        "/properties/providerSpecificDetails/rpoInSeconds",
    ),
    (
        "POINTS",
        "/properties/providerSpecificDetails/recoveryPointCount",
    ),
    (
        "GROUP",
        "/properties/providerSpecificDetails/multiVmGroupName",
    ),
];

async fn item(conn: &Conn, out: Format, cmd: ItemCmd) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    match cmd {
        ItemCmd::Enable {
            fabric,
            cloud,
            machine,
            name,
            policy,
            group,
            no_wait,
        } => {
            let name = name.unwrap_or_else(|| machine.clone());
            let base =
                format!("replicationFabrics/{fabric}/replicationProtectionContainers/{cloud}");
            let rel = format!("{base}/replicationProtectedItems/{name}");
            let body = input(sapi::EnableProtectionInput {
                protectable_item_id: format!(
                    "{}/{base}/replicationProtectableItems/{machine}",
                    api.vault_id()
                ),
                policy_id: policy.map(|p| format!("{}/replicationPolicies/{p}", api.vault_id())),
                provider_specific_details: sapi::EnableProtectionDetails {
                    instance_type: "HyperVReplicaAzure".into(),
                    // As Azure PowerShell: the group's name is also its id.
                    multi_vm_group_id: group.clone(),
                    multi_vm_group_name: group,
                },
            });
            if no_wait {
                let (job, _, _) = api.start(reqwest::Method::PUT, &rel, &body).await?;
                return Ok(started(&job, out, "enable protection"));
            }
            let op = api
                .run(reqwest::Method::PUT, &rel, &body, JOB_TIMEOUT)
                .await?;
            finish(op, out, &format!("enable protection of {name}"))
        }
        ItemCmd::List => {
            output::rows(
                out,
                &api.rows::<sapi::ProtectedItem>("replicationProtectedItems")
                    .await?,
                &ITEM_COLS,
            );
            Ok(ExitCode::SUCCESS)
        }
        ItemCmd::Show { item } => {
            let (_, item) = api.item_path(&item).await?;
            let mut v = serde_json::to_value(&item)?;
            let mut fields = ITEM_COLS.to_vec();
            fields.extend([
                ("machine", "/properties/protectableItemId"),
                ("policy", "/properties/policyFriendlyName"),
                ("errors", "/properties/replicationHealthErrors"),
                ("allowed operations", "/properties/allowedOperations"),
                (
                    "failover point",
                    "/properties/providerSpecificDetails/failoverRecoveryPointId",
                ),
                (
                    "failover disks",
                    "/properties/providerSpecificDetails/failoverDisks",
                ),
                (
                    "failover VM",
                    "/properties/providerSpecificDetails/failoverVm/name",
                ),
                (
                    "failover VM serial log",
                    "/properties/providerSpecificDetails/failoverVm/serialLog",
                ),
                ("test failover", "/properties/testFailoverStateDescription"),
                ("test VM", "/properties/providerSpecificDetails/testVm/name"),
                (
                    "test VM run dir",
                    "/properties/providerSpecificDetails/testVm/runDir",
                ),
                (
                    "test VM serial log",
                    "/properties/providerSpecificDetails/testVm/serialLog",
                ),
                ("NICs", "/nicsText"),
            ]);
            if out == Format::Table {
                let nics = nics_text(
                    item.properties
                        .provider_specific_details
                        .vm_nics
                        .as_deref()
                        .unwrap_or_default(),
                );
                v["nicsText"] = nics.into();
            }
            output::object(out, &v, &fields);
            Ok(ExitCode::SUCCESS)
        }
        ItemCmd::Disable { item, no_wait } => {
            let (rel, _) = api.item_path(&item).await?;
            let body = input(sapi::DisableProtectionInput {
                disable_protection_reason: "NotSpecified".into(),
            });
            let what = format!("disable protection of {item}");
            item_action(&api, &format!("{rel}/remove"), &body, no_wait, out, &what).await
        }
        ItemCmd::Reprotect { item, no_wait } => {
            let (rel, _) = api.item_path(&item).await?;
            let body = input(sapi::ReverseReplicationInput {
                failover_direction: None,
            });
            let what = format!("reprotect of {item}");
            item_action(
                &api,
                &format!("{rel}/reProtect"),
                &body,
                no_wait,
                out,
                &what,
            )
            .await
        }
    }
}

/// POSTs an item's action and waits for its job (`no_wait`: returns once
/// it has started).
async fn item_action(
    api: &client::Api,
    path: &str,
    body: &Value,
    no_wait: bool,
    out: Format,
    what: &str,
) -> anyhow::Result<ExitCode> {
    if no_wait {
        let (job, _, _) = api.start(reqwest::Method::POST, path, body).await?;
        return Ok(started(&job, out, what));
    }
    let op = api
        .run(reqwest::Method::POST, path, body, JOB_TIMEOUT)
        .await?;
    finish(op, out, what)
}

/// The recovery key file, base64-encoded as the ARM API takes it
/// (`primaryKekCertificatePfx`). Checked here so that a wrong file is
/// named before the vault is asked anything.
fn read_encryption_key(path: &std::path::Path) -> anyhow::Result<String> {
    use base64::Engine;
    let mut bytes = std::fs::read(path)
        .with_context(|| format!("reading the recovery key file {}", path.display()))?;
    let parsed = siterec_store::RecoveryKey::from_file_bytes(&bytes).map(drop);
    let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
    bytes.fill(0);
    parsed.with_context(|| {
        format!(
            "{} is not a recovery key file (give the file written to recovery_key_export when the encrypted store was created)",
            path.display()
        )
    })?;
    Ok(encoded)
}

fn read_optional_key(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    path.map(read_encryption_key).transpose()
}

/// The `providerSpecificDetails` of a failover or test failover: the point
/// (`latest` = none given) and the recovery key, if any.
fn failover_details(
    api: &Api,
    rel: &str,
    point: &str,
    key: Option<String>,
) -> sapi::FailoverDetails {
    sapi::FailoverDetails {
        instance_type: "HyperVReplicaAzure".into(),
        recovery_point_id: (point != "latest")
            .then(|| format!("{}/{rel}/recoveryPoints/{point}", api.vault_id())),
        primary_kek_certificate_pfx: key,
    }
}

/// A request body: `{"properties": ...}`, as JSON.
pub(crate) fn input<P: serde::Serialize>(properties: P) -> Value {
    serde_json::to_value(sapi::Input { properties }).unwrap_or(Value::Null)
}

/// A failover of `item` now leaves where it runs.
fn failover_direction(item: &sapi::ProtectedItem) -> &'static str {
    if item.properties.active_location == "Recovery" {
        "RecoveryToPrimary"
    } else {
        "PrimaryToRecovery"
    }
}

async fn failover(conn: &Conn, out: Format, cmd: FailoverCmd) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    match cmd {
        FailoverCmd::Unplanned {
            item,
            point,
            encryption_key,
            no_wait,
        } => {
            // Read before anything is asked of the vault.
            let key = read_optional_key(encryption_key.as_deref())?;
            let (rel, v) = api.item_path(&item).await?;
            let details = failover_details(&api, &rel, &point, key);
            let body = input(sapi::UnplannedFailoverInput {
                failover_direction: failover_direction(&v).into(),
                source_site_operations: "NotRequired".into(),
                provider_specific_details: details,
            });
            if no_wait {
                let (job, _, _) = api
                    .start(
                        reqwest::Method::POST,
                        &format!("{rel}/unplannedFailover"),
                        &body,
                    )
                    .await?;
                return Ok(started(&job, out, "unplanned failover"));
            }
            let op = api
                .run(
                    reqwest::Method::POST,
                    &format!("{rel}/unplannedFailover"),
                    &body,
                    JOB_TIMEOUT,
                )
                .await?;
            if op.status == "Succeeded"
                && out == Format::Table
                && let Some(failed_over) = op.result_as::<sapi::ProtectedItem>()?
            {
                let disks = serde_json::from_value::<Vec<sapi::MaterializedDisk>>(
                    failed_over
                        .properties
                        .provider_specific_details
                        .failover_disks,
                )
                .unwrap_or_default();
                for d in disks {
                    println!("{} ({}): {}", d.disk, d.format, d.path);
                }
            }
            finish(op, out, &format!("unplanned failover of {item}"))
        }
        FailoverCmd::Planned {
            item,
            source_stopped,
            shutdown_timeout,
            force,
            encryption_key,
            no_wait,
        } => {
            let key = read_optional_key(encryption_key.as_deref())?;
            let (rel, v) = api.item_path(&item).await?;
            let body = input(sapi::PlannedFailoverInput {
                failover_direction: failover_direction(&v).into(),
                provider_specific_details: sapi::PlannedFailoverDetails {
                    instance_type: "HyperVReplicaAzure".into(),
                    source_stopped,
                    primary_kek_certificate_pfx: key,
                    shutdown_timeout_seconds: shutdown_timeout,
                    force_shutdown: force,
                },
            });
            let what = format!("planned failover of {item}");
            item_action(
                &api,
                &format!("{rel}/plannedFailover"),
                &body,
                no_wait,
                out,
                &what,
            )
            .await
        }
        FailoverCmd::ChangePoint {
            item,
            point,
            encryption_key,
            no_wait,
        } => {
            let key = read_optional_key(encryption_key.as_deref())?;
            let (rel, _) = api.item_path(&item).await?;
            let body = input(sapi::ApplyRecoveryPointInput {
                recovery_point_id: format!("{}/{rel}/recoveryPoints/{point}", api.vault_id()),
                provider_specific_details: sapi::PlannedFailoverDetails {
                    instance_type: "HyperVReplicaAzure".into(),
                    source_stopped: false,
                    primary_kek_certificate_pfx: key,
                    shutdown_timeout_seconds: None,
                    force_shutdown: false,
                },
            });
            let what = format!("change of recovery point of {item}");
            item_action(
                &api,
                &format!("{rel}/applyRecoveryPoint"),
                &body,
                no_wait,
                out,
                &what,
            )
            .await
        }
        FailoverCmd::Commit { item, no_wait } => {
            let (rel, _) = api.item_path(&item).await?;
            let what = format!("commit of {item}");
            item_action(
                &api,
                &format!("{rel}/failoverCommit"),
                &json!({}),
                no_wait,
                out,
                &what,
            )
            .await
        }
        FailoverCmd::Test {
            item,
            point,
            network,
            encryption_key,
            no_wait,
        } => {
            let key = read_optional_key(encryption_key.as_deref())?;
            let (rel, v) = api.item_path(&item).await?;
            let rf = &v.properties.recovery_fabric_friendly_name;
            let body = input(sapi::TestFailoverInput {
                failover_direction: "PrimaryToRecovery".into(),
                network_type: if network.is_some() {
                    "VmNetworkAsInput"
                } else {
                    "NoNetworkAttachAsInput"
                }
                .into(),
                network_id: network.map(|n| {
                    format!(
                        "{}/replicationFabrics/{rf}/replicationNetworks/{n}",
                        api.vault_id()
                    )
                }),
                provider_specific_details: failover_details(&api, &rel, &point, key),
            });
            let rel = format!("{rel}/testFailover");
            if no_wait {
                let (job, _, _) = api.start(reqwest::Method::POST, &rel, &body).await?;
                return Ok(started(&job, out, "test failover"));
            }
            let op = api
                .run(reqwest::Method::POST, &rel, &body, JOB_TIMEOUT)
                .await?;
            if op.status == "Succeeded"
                && out == Format::Table
                && let Some(tested) = op.result_as::<sapi::ProtectedItem>()?
                && let Some(vm) = tested.properties.provider_specific_details.test_vm
            {
                println!(
                    "test VM {} started from point {} in {} (serial console: {})",
                    vm.name,
                    vm.recovery_point_id.as_deref().unwrap_or_default(),
                    vm.run_dir,
                    vm.serial_log
                );
                for n in &vm.nics {
                    let net = n.network.as_deref().unwrap_or("an isolated network");
                    println!("  NIC {}: {net}", n.name);
                }
                println!("clean it up with 'siterec failover test-cleanup {item}'");
            } else if op.status == "Succeeded"
                && out == Format::Table
                && let Some(tested) = op.result_as::<sapi::ProtectedItem>()?
                && let Ok(disks) = serde_json::from_value::<Vec<siterec_core::wire::MaterializedDisk>>(
                    tested.properties.provider_specific_details.test_disks,
                )
                && !disks.is_empty()
            {
                println!("test copy of {item}'s disks written at the recovery site:");
                for d in &disks {
                    println!("  {} ({}): {}", d.disk, d.format, d.path);
                }
                println!("clean it up with 'siterec failover test-cleanup {item}'");
            }
            finish(op, out, &format!("test failover of {item}"))
        }
        FailoverCmd::TestCleanup {
            item,
            comments,
            no_wait,
        } => {
            let (rel, _) = api.item_path(&item).await?;
            let body = input(sapi::TestFailoverCleanupInput {
                comments: comments.unwrap_or_default(),
            });
            let rel = format!("{rel}/testFailoverCleanup");
            if no_wait {
                let (job, _, _) = api.start(reqwest::Method::POST, &rel, &body).await?;
                return Ok(started(&job, out, "test failover cleanup"));
            }
            let op = api
                .run(reqwest::Method::POST, &rel, &body, JOB_TIMEOUT)
                .await?;
            finish(op, out, &format!("test failover cleanup of {item}"))
        }
    }
}

/// A VM's NICs in one cell: `eth0: prod-lan → recovery/dr-lan`.
fn nics_text(nics: &[sapi::ItemNic]) -> String {
    nics.iter()
        .map(|n| {
            let mut s = format!("{}: {}", n.nic_id, n.vm_network_name);
            if let Some(target) = &n.recovery_vm_network_id {
                let fabric = siterec_core::names::segment_after(target, "replicationFabrics")
                    .unwrap_or_default();
                s.push_str(&format!(
                    " → {fabric}/{}",
                    siterec_core::names::last_segment(target)
                ));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

const NETWORK_MAPPING_COLS: [(&str, &str); 6] = [
    ("NAME", "/name"),
    ("FABRIC", "/properties/primaryFabricFriendlyName"),
    ("NETWORK", "/properties/primaryNetworkFriendlyName"),
    ("RECOVERY FABRIC", "/properties/recoveryFabricFriendlyName"),
    (
        "RECOVERY NETWORK",
        "/properties/recoveryNetworkFriendlyName",
    ),
    ("STATE", "/properties/state"),
];

async fn network(conn: &Conn, out: Format, cmd: NetworkCmd) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    match cmd {
        NetworkCmd::List { fabric } => {
            let rel = match &fabric {
                Some(f) => format!("replicationFabrics/{f}/replicationNetworks"),
                None => "replicationNetworks".to_string(),
            };
            let mut v = api.rows::<sapi::Network>(&rel).await?;
            for n in &mut v {
                let id = n["id"].as_str().unwrap_or_default();
                n["fabric"] = siterec_core::names::segment_after(id, "replicationFabrics")
                    .unwrap_or_default()
                    .into();
            }
            output::rows(
                out,
                &v,
                &[
                    ("NAME", "/name"),
                    ("FABRIC", "/fabric"),
                    ("AGENTS", "/properties/agents"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        NetworkCmd::Map {
            fabric,
            network,
            recovery_fabric,
            recovery_network,
            name,
            instance_type,
        } => {
            let name = name.unwrap_or_else(|| format!("{network}-to-{recovery_network}"));
            let body = input(sapi::CreateNetworkMappingInput {
                recovery_network_id: format!(
                    "{}/replicationFabrics/{recovery_fabric}/replicationNetworks/{recovery_network}",
                    api.vault_id()
                ),
                recovery_fabric_name: recovery_fabric,
                fabric_specific_details: sapi::InstanceType { instance_type },
            });
            let rel = format!(
                "replicationFabrics/{fabric}/replicationNetworks/{network}/replicationNetworkMappings/{name}"
            );
            let op = api
                .run(reqwest::Method::PUT, &rel, &body, JOB_TIMEOUT)
                .await?;
            finish(op, out, &format!("network mapping {name}"))
        }
        NetworkCmd::Mappings => {
            output::rows(
                out,
                &api.rows::<sapi::NetworkMapping>("replicationNetworkMappings")
                    .await?,
                &NETWORK_MAPPING_COLS,
            );
            Ok(ExitCode::SUCCESS)
        }
        NetworkCmd::Unmap {
            fabric,
            network,
            name,
        } => {
            let base = format!(
                "replicationFabrics/{fabric}/replicationNetworks/{network}/replicationNetworkMappings"
            );
            let none = format!(
                "network '{network}' of fabric '{fabric}' has no mapping; 'siterec network mappings' lists them"
            );
            delete_named_or_only(&api, out, &base, name, &none, "removal of network mapping").await
        }
    }
}

async fn verify_stores(conn: &Conn, out: Format, fabric: &str) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    let op = api
        .run(
            reqwest::Method::POST,
            &format!("replicationFabrics/{fabric}/siterecVerifyStores"),
            &json!({}),
            JOB_TIMEOUT,
        )
        .await?;
    let job: sapi::Job = api
        .get_as(&format!("replicationJobs/{}", op.job_id))
        .await?;
    let output = job.properties.custom_details.output.unwrap_or(Value::Null);
    let mut rows = Vec::new();
    for store in output["stores"].as_array().into_iter().flatten() {
        if let Some(e) = store["error"].as_str() {
            rows.push(json!({"agent": store["agent"], "error": e}));
        }
        for p in store["report"]["points"].as_array().into_iter().flatten() {
            rows.push(json!({
                "agent": store["agent"],
                "item": p["item"],
                "point": p["point_id"],
                "ok": p["ok"],
                "damagedChunks": p["damaged_chunks"],
                "error": p["error"],
            }));
        }
    }
    match out {
        Format::Json => output::json(
            &json!({"jobId": op.job_id, "status": op.status, "error": op.error, "points": rows}),
        ),
        Format::Table => output::rows(
            out,
            &rows,
            &[
                ("AGENT", "/agent"),
                ("ITEM", "/item"),
                ("POINT", "/point"),
                ("OK", "/ok"),
                ("ERROR", "/error"),
            ],
        ),
    }
    if op.status != "Succeeded" {
        eprintln!(
            "error: {} (job {})",
            op.error.unwrap_or(op.status),
            op.job_id
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn throttle(
    data: &std::path::Path,
    none: bool,
    work_days: &str,
    (start_hour, end_hour): (u8, u8),
    (work_kbps, non_work_kbps): (Option<u64>, Option<u64>),
    utc_offset_minutes: i32,
    out: Format,
) -> anyhow::Result<ExitCode> {
    use siterec_agent::throttle::ThrottleSettings;
    let settings = if none {
        ThrottleSettings::None
    } else {
        let days = work_days
            .split(',')
            .filter(|d| !d.trim().is_empty())
            .map(|d| match d.trim().to_ascii_lowercase().get(..3) {
                Some("mon") => Ok(0),
                Some("tue") => Ok(1),
                Some("wed") => Ok(2),
                Some("thu") => Ok(3),
                Some("fri") => Ok(4),
                Some("sat") => Ok(5),
                Some("sun") => Ok(6),
                _ => Err(anyhow::anyhow!(
                    "'{d}' is not a day: use mon, tue, wed, thu, fri, sat, sun"
                )),
            })
            .collect::<anyhow::Result<Vec<u8>>>()?;
        ThrottleSettings::Schedule {
            work_days: days,
            start_hour,
            end_hour,
            work_kbps: work_kbps.unwrap_or_default(),
            non_work_kbps: non_work_kbps.unwrap_or_default(),
            utc_offset_minutes,
        }
    };
    if !data.is_dir() {
        bail!("{} is not an agent data directory", data.display());
    }
    settings.write(data)?;
    match out {
        Format::Json => output::json(&serde_json::to_value(&settings)?),
        Format::Table => println!(
            "bandwidth throttling of {} set: {settings:?}",
            data.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a secret file with mode 0600, refusing to overwrite.
fn write_private(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// `siterec pairing delete`: the pairing named (or the cloud's one), then
/// its removal job.
async fn delete_pairing(
    conn: &Conn,
    out: Format,
    fabric: &str,
    cloud: &str,
    name: Option<String>,
) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    let base = format!(
        "replicationFabrics/{fabric}/replicationProtectionContainers/{cloud}/replicationProtectionContainerMappings"
    );
    let none = format!(
        "cloud '{cloud}' of fabric '{fabric}' has no pairing; 'siterec pairing list' lists them"
    );
    delete_named_or_only(&api, out, &base, name, &none, "deleting pairing").await
}

/// Deletes the resource `name` of the collection `base`, or its first one
/// when no name is given (`none` is the error when there is none), through
/// its job; `what` names the operation in the answer. The resource is
/// looked up before anything is removed: a typo is an error, not a no-op.
async fn delete_named_or_only(
    api: &client::Api,
    out: Format,
    base: &str,
    name: Option<String>,
    none: &str,
    what: &str,
) -> anyhow::Result<ExitCode> {
    let name = match name {
        Some(n) => {
            api.get(&format!("{base}/{n}")).await?;
            n
        }
        None => api
            .list(base)
            .await?
            .into_iter()
            .find_map(|m| m["name"].as_str().map(str::to_string))
            .ok_or_else(|| anyhow::anyhow!("{none}"))?,
    };
    let op = api
        .run(
            reqwest::Method::DELETE,
            &format!("{base}/{name}"),
            &json!({}),
            JOB_TIMEOUT,
        )
        .await?;
    finish(op, out, &format!("{what} {name}"))
}

/// `siterec jobs export --csv`: the export job run to its end, then its
/// CSV fetched from where the job says (`blobUri` + `sasToken`).
async fn export_jobs(
    conn: &Conn,
    output: Option<PathBuf>,
    filter: &JobFilterArgs,
) -> anyhow::Result<ExitCode> {
    let api = api(conn).await?;
    let mut body = serde_json::Map::new();
    for (field, v) in filter.fields()? {
        body.insert(field.into(), v.into());
    }
    body.insert("jobOutputType".into(), "Excel".into());
    let op = api
        .run(
            reqwest::Method::POST,
            "replicationJobs/export",
            &Value::Object(body),
            JOB_TIMEOUT,
        )
        .await?;
    if op.status != "Succeeded" {
        bail!(
            "the export failed: {} (job {})",
            op.error.unwrap_or_else(|| op.status.clone()),
            op.job_id
        );
    }
    let job: sapi::Job = op
        .result_as()?
        .ok_or_else(|| anyhow::anyhow!("the export job {} has no result", op.job_id))?;
    let d = &job.properties.custom_details;
    let (Some(uri), Some(token)) = (&d.blob_uri, &d.sas_token) else {
        bail!(
            "export job {} does not say where its CSV is (customDetails has no blobUri)",
            op.job_id
        );
    };
    let csv = api.get_text_url(&format!("{uri}{token}")).await?;
    match output {
        Some(path) => {
            std::fs::write(&path, &csv).with_context(|| format!("writing {}", path.display()))?;
            let rows = csv.lines().count().saturating_sub(1);
            eprintln!("{rows} job(s) exported to {}", path.display());
        }
        None => print!("{csv}"),
    }
    Ok(ExitCode::SUCCESS)
}
