//! What a VM is made of: [`VmSpec`] and its validation.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest disk or NIC name: QEMU node names hold 31 bytes and ours are
/// `disk-<name>` / `file-<name>`.
pub const MAX_NAME_LEN: usize = 26;

/// A VM to start. Deserializable from the agent's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    pub cpus: u32,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Direct kernel boot (`-kernel`); `initrd` and `append` need it.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: Option<String>,
    /// Give the guest a virtio-serial port for QEMU's guest agent
    /// (`org.qemu.guest_agent.0`, host end `RUN/qga.sock`).
    #[serde(default)]
    pub guest_agent: bool,
}

/// A virtio-blk disk backed by an image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// Image format of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// QEMU's block driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A virtio-net NIC on a QEMU user-mode backend. In this version a
/// network is a name (reported, and mapped at failover): the NIC gets
/// QEMU's user-mode NAT, or with `isolated` a restricted backend through
/// which the guest reaches nothing (no route to the host or beyond).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub name: String,
    pub network: String,
    #[serde(default)]
    pub mac: Option<String>,
    /// No route anywhere (`restrict=on`): a test failover's network.
    #[serde(default)]
    pub isolated: bool,
}

/// Why a [`VmSpec`] cannot be started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "invalid {what} name {name:?}: use 1-{max} ASCII letters, digits, '-' or '_', starting with a letter"
    )]
    BadName {
        what: &'static str,
        name: String,
        max: usize,
    },
    #[error("memory_mib must be at least 16 (got {0})")]
    BadMemory(u32),
    #[error("cpus must be 1 to 255 (got {0})")]
    BadCpus(u32),
    #[error("duplicate disk name {0:?}")]
    DuplicateDisk(String),
    #[error("duplicate NIC name {0:?}")]
    DuplicateNic(String),
    #[error("disk {disk:?}: image file {path} is missing or not a regular file")]
    MissingDisk { disk: String, path: PathBuf },
    #[error("disk {disk:?}: cannot read {path}: {reason}")]
    UnreadableDisk {
        disk: String,
        path: PathBuf,
        reason: String,
    },
    #[error("disk {disk:?}: {path} is declared {declared} but holds a {found} image")]
    FormatMismatch {
        disk: String,
        path: PathBuf,
        declared: DiskFormat,
        found: DiskFormat,
    },
    #[error("NIC {nic:?}: network must not be empty")]
    EmptyNetwork { nic: String },
    #[error(
        "NIC {nic:?}: bad MAC address {mac:?} (want six hex pairs like 52:54:00:12:34:56, unicast)"
    )]
    BadMac { nic: String, mac: String },
    #[error("{what} file {path} is missing")]
    MissingBootFile { what: &'static str, path: PathBuf },
    #[error("initrd and append need a kernel")]
    BootWithoutKernel,
    #[error("append must not contain a newline or NUL")]
    BadAppend,
}

fn valid_name(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() <= max
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        // The first octet's low bit set means multicast: not a NIC address.
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// `qcow2` when the file starts with the qcow2 magic, else `raw`.
fn detect_format(path: &Path) -> std::io::Result<DiskFormat> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    let mut n = 0;
    while n < magic.len() {
        let got = f.read(&mut magic[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

impl VmSpec {
    /// Checks names, sizes, MACs and that every file exists; a disk's image
    /// must hold the declared format (a raw disk whose image looks like
    /// qcow2 is refused too: the guest could have written that header).
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_name(&self.name, 64) {
            return Err(SpecError::BadName {
                what: "VM",
                name: self.name.clone(),
                max: 64,
            });
        }
        if self.memory_mib < 16 {
            return Err(SpecError::BadMemory(self.memory_mib));
        }
        if self.cpus == 0 || self.cpus > 255 {
            return Err(SpecError::BadCpus(self.cpus));
        }
        let mut seen = HashSet::new();
        for d in &self.disks {
            if !valid_name(&d.name, MAX_NAME_LEN) {
                return Err(SpecError::BadName {
                    what: "disk",
                    name: d.name.clone(),
                    max: MAX_NAME_LEN,
                });
            }
            if !seen.insert(d.name.as_str()) {
                return Err(SpecError::DuplicateDisk(d.name.clone()));
            }
            if !d.path.is_file() {
                return Err(SpecError::MissingDisk {
                    disk: d.name.clone(),
                    path: d.path.clone(),
                });
            }
            let found = detect_format(&d.path).map_err(|e| SpecError::UnreadableDisk {
                disk: d.name.clone(),
                path: d.path.clone(),
                reason: e.to_string(),
            })?;
            if found != d.format {
                return Err(SpecError::FormatMismatch {
                    disk: d.name.clone(),
                    path: d.path.clone(),
                    declared: d.format,
                    found,
                });
            }
        }
        let mut seen = HashSet::new();
        for n in &self.nics {
            if !valid_name(&n.name, MAX_NAME_LEN) {
                return Err(SpecError::BadName {
                    what: "NIC",
                    name: n.name.clone(),
                    max: MAX_NAME_LEN,
                });
            }
            if !seen.insert(n.name.as_str()) {
                return Err(SpecError::DuplicateNic(n.name.clone()));
            }
            if n.network.trim().is_empty() {
                return Err(SpecError::EmptyNetwork {
                    nic: n.name.clone(),
                });
            }
            if let Some(mac) = &n.mac
                && !valid_mac(mac)
            {
                return Err(SpecError::BadMac {
                    nic: n.name.clone(),
                    mac: mac.clone(),
                });
            }
        }
        match &self.kernel {
            Some(k) if !k.is_file() => {
                return Err(SpecError::MissingBootFile {
                    what: "kernel",
                    path: k.clone(),
                });
            }
            Some(_) => {}
            None if self.initrd.is_some() || self.append.is_some() => {
                return Err(SpecError::BootWithoutKernel);
            }
            None => {}
        }
        if let Some(i) = &self.initrd
            && !i.is_file()
        {
            return Err(SpecError::MissingBootFile {
                what: "initrd",
                path: i.clone(),
            });
        }
        if self
            .append
            .as_deref()
            .is_some_and(|a| a.contains(['\n', '\0']))
        {
            return Err(SpecError::BadAppend);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs() {
        assert!(valid_name("os", MAX_NAME_LEN));
        assert!(valid_name("data_1-a", MAX_NAME_LEN));
        assert!(!valid_name("", MAX_NAME_LEN));
        assert!(!valid_name("1disk", MAX_NAME_LEN));
        assert!(!valid_name("a,b", MAX_NAME_LEN));
        assert!(!valid_name(&"a".repeat(MAX_NAME_LEN + 1), MAX_NAME_LEN));
        assert!(valid_mac("52:54:00:12:34:5f"));
        assert!(!valid_mac("53:54:00:12:34:56"));
        assert!(!valid_mac("52:54:00:12:34"));
        assert!(!valid_mac("52:54:00:12:34:zz"));
    }
}
