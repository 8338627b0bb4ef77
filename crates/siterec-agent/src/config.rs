//! The agent's configuration file (TOML).
//!
//! ```toml
//! cloud = "primary-cloud"        # the protection container this host is in
//! spool_max_mib = 10240          # disk spool bound per item (target unreachable)
//!
//! [[machines]]                   # source role: physical servers to offer
//! name = "web01"
//! disks = [ { name = "disk0", path = "/var/lib/images/web01.img" } ]
//!
//! [[vms]]                        # source role: QEMU/KVM VMs this agent runs and offers
//! name = "app01"
//! memory_mib = 512
//! cpus = 1
//! disks = [ { name = "vda", path = "/var/lib/images/app01.qcow2", format = "qcow2" } ]
//! nics = [ { name = "eth0", network = "prod-lan" } ]
//! kernel = "/boot/vmlinuz"       # optional direct kernel boot (initrd, append)
//!
//! [[networks]]                   # VM networks of this host (besides its VMs' own):
//! name = "recovery-lan"          # what replica VMs can be connected to at failover
//!
//! [target]                       # target role: keep a replica store
//! listen = "127.0.0.1:0"         # data endpoint (TLS, vault-issued certificates)
//! store = "/srv/siterec/store"   # default: DATA/store
//! failover_dir = "/srv/failover" # default: DATA/failover
//! # or keep the replica store in object storage instead of `store`:
//! # backend = { kind = "azure", account = "…", container = "…", key = "…" }
//! # backend = { kind = "s3", endpoint = "…", bucket = "…", access_key = "…", secret_key = "…" }
//! encryption = true             # encrypt data stored (AES-256-GCM)
//! recovery_key_export = "/root/siterec-recovery.key"  # written once, when the store is
//!                                # created: move it off this host; failover needs it
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The protection container ("cloud") of this host.
    pub cloud: String,
    /// Heartbeat interval in milliseconds (default 1000).
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
    /// Chunk uploads in flight per disk (1–32, default 4; the seeds'
    /// UploadThreadsPerVM).
    #[serde(default)]
    pub upload_streams: Option<usize>,
    /// Bound of each item's disk spool in MiB, where recovery points wait
    /// while the target is unreachable (default 10240).
    #[serde(default)]
    pub spool_max_mib: Option<u64>,
    #[serde(default)]
    pub machines: Vec<MachineConfig>,
    /// QEMU/KVM virtual machines this agent starts, manages and offers.
    #[serde(default)]
    pub vms: Vec<siterec_qemu::VmSpec>,
    /// VM networks of this host, besides those its VMs' NICs are on.
    #[serde(default)]
    pub networks: Vec<NetworkConfig>,
    #[serde(default)]
    pub target: Option<TargetConfig>,
    /// Where recovery plans' scripts are (their paths are relative to it;
    /// default `DATA/scripts`). Only programs in it are run.
    #[serde(default)]
    pub scripts_dir: Option<PathBuf>,
}

/// A VM network of the host. Version 1 connects NICs with QEMU's user-mode
/// networking; an isolated network (test failover) gets `restrict=on`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub name: String,
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub listen: SocketAddr,
    /// The replica store in a local directory (default DATA/store)...
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// ...or on any backend (local, Azure Blob, S3-compatible).
    #[serde(default)]
    pub backend: Option<siterec_store::BackendConfig>,
    /// Encrypt the replica store (store format version 3). The agent keeps
    /// only `DATA/store.credential`, which writes but cannot read data.
    #[serde(default)]
    pub encryption: bool,
    /// Where the recovery key is written, once, when the encrypted store is
    /// created. The operator keeps it (away from this host); failover of
    /// an encrypted item needs it.
    #[serde(default)]
    pub recovery_key_export: Option<PathBuf>,
    /// Retired (the agent held a key that could decrypt everything):
    /// refused with what to use instead.
    #[serde(default)]
    pub encryption_key: Option<toml::Value>,
    #[serde(default)]
    pub failover_dir: Option<PathBuf>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the agent config {}", path.display()))?;
        let cfg: AgentConfig = toml::from_str(&text)
            .with_context(|| format!("the agent config {} is not valid", path.display()))?;
        cfg.validate()
            .with_context(|| format!("the agent config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use siterec_core::names::check_name;
        check_name("cloud", &self.cloud)?;
        if let Some(n) = self.upload_streams
            && !(1..=crate::limits::MAX_UPLOAD_STREAMS).contains(&n)
        {
            anyhow::bail!(
                "upload_streams = {n} is out of range: use 1 to {}",
                crate::limits::MAX_UPLOAD_STREAMS
            );
        }
        if let Some(t) = &self.target
            && t.store.is_some()
            && t.backend.is_some()
        {
            anyhow::bail!(
                "[target] has both `store` and `backend`: keep one (store = DIR is backend = {{ kind = \"local\", path = DIR }})"
            );
        }
        if let Some(t) = &self.target {
            if t.encryption_key.is_some() {
                anyhow::bail!(
                    "[target] encryption_key is no longer supported: the recovery agent no longer keeps a key that decrypts its store. Use `encryption = true` and `recovery_key_export = PATH` instead: the recovery key is written to PATH once, when a new store is created; keep it away from this host and give it at failover (siterec failover unplanned ITEM --encryption-key PATH). A store created with encryption_key (format version 2) cannot be opened: point the agent at a new, empty store"
                );
            }
            if t.encryption && t.recovery_key_export.is_none() {
                anyhow::bail!(
                    "[target] encryption = true needs `recovery_key_export = PATH`: where the recovery key is written when the encrypted store is created (the operator keeps that file; failover needs it)"
                );
            }
            if !t.encryption && t.recovery_key_export.is_some() {
                anyhow::bail!(
                    "[target] recovery_key_export is set but encryption is not: add `encryption = true` to encrypt the replica store, or remove recovery_key_export"
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.vms {
            check_name("vm", &v.name)?;
            if !names.insert(v.name.to_ascii_lowercase()) {
                anyhow::bail!("vm '{}' is listed twice", v.name);
            }
            if v.disks.is_empty() {
                anyhow::bail!("vm '{}' has no disks: list at least one", v.name);
            }
        }
        for n in &self.networks {
            check_name("network", &n.name)?;
        }
        for m in &self.machines {
            check_name("machine", &m.name)?;
            if !names.insert(m.name.to_ascii_lowercase()) {
                anyhow::bail!(
                    "machine '{}' is listed twice (machines and vms share names)",
                    m.name
                );
            }
            if m.disks.is_empty() {
                anyhow::bail!("machine '{}' has no disks: list at least one", m.name);
            }
            let mut disks = std::collections::HashSet::new();
            for d in &m.disks {
                check_name("disk", &d.name)?;
                if !disks.insert(d.name.to_ascii_lowercase()) {
                    anyhow::bail!("machine '{}' lists disk '{}' twice", m.name, d.name);
                }
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// The VM networks this host reports: its `[[networks]]` and those its
    /// VMs' NICs are on, sorted, once each.
    pub fn network_names(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .networks
            .iter()
            .map(|n| n.name.clone())
            .chain(
                self.vms
                    .iter()
                    .flat_map(|v| v.nics.iter().map(|n| n.network.clone())),
            )
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The VM of this name in the config.
    pub fn vm(&self, name: &str) -> Option<&siterec_qemu::VmSpec> {
        self.vms.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let cfg: AgentConfig = toml::from_str(
            r#"
cloud = "primary-cloud"
[[machines]]
name = "web01"
disks = [ { name = "disk0", path = "/tmp/x.img" } ]
[target]
listen = "127.0.0.1:0"
"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.machines[0].disks[0].name, "disk0");
        assert!(cfg.target.is_some());

        let bad: AgentConfig =
            toml::from_str("cloud = \"c\"\n[[machines]]\nname = \"m\"\ndisks = []\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("no disks"));
        assert!(toml::from_str::<AgentConfig>("cloud = \"c\"\nunknown = 1\n").is_err());
        let old: AgentConfig = toml::from_str(
            "cloud = \"c\"\n[target]\nlisten = \"127.0.0.1:0\"\nencryption_key = \"/k\"\n",
        )
        .unwrap();
        let err = old.validate().unwrap_err().to_string();
        assert!(
            err.contains("encryption_key is no longer supported")
                && err.contains("encryption = true")
                && err.contains("recovery_key_export"),
            "{err}"
        );
        let half: AgentConfig = toml::from_str(
            "cloud = \"c\"\n[target]\nlisten = \"127.0.0.1:0\"\nencryption = true\n",
        )
        .unwrap();
        assert!(
            half.validate()
                .unwrap_err()
                .to_string()
                .contains("recovery_key_export")
        );
        let good: AgentConfig = toml::from_str(
            "cloud = \"c\"\n[target]\nlisten = \"127.0.0.1:0\"\nencryption = true\nrecovery_key_export = \"/r.key\"\n",
        )
        .unwrap();
        good.validate().unwrap();
        let many: AgentConfig = toml::from_str("cloud = \"c\"\nupload_streams = 33\n").unwrap();
        assert!(
            many.validate()
                .unwrap_err()
                .to_string()
                .contains("upload_streams = 33")
        );
    }
}
