//! The QEMU driver of the agent: VMs from the config as protectable items.

use std::io::Read;
use std::path::Path;

use siterec_core::wire::{DiskInfo, KIND_VM, MachineInfo, NicInfo, VmInfo};
use siterec_qemu::{DiskFormat, VmSpec};

/// The VM as a protectable machine: its disks (virtual sizes), NICs and
/// what a replica needs. A VM whose spec does not hold (a missing image, a
/// wrong format) is reported with the reason instead of failing the agent.
pub fn inventory(spec: &VmSpec) -> MachineInfo {
    let mut error = spec.validate().err().map(|e| e.to_string());
    let disks = spec
        .disks
        .iter()
        .map(|d| {
            let size_bytes = match virtual_size(&d.path, d.format) {
                Ok(s) => s,
                Err(e) => {
                    error.get_or_insert_with(|| format!("disk '{}': {e}", d.name));
                    0
                }
            };
            DiskInfo {
                name: d.name.clone(),
                path: d.path.display().to_string(),
                size_bytes,
            }
        })
        .collect();
    MachineInfo {
        name: spec.name.clone(),
        kind: KIND_VM.into(),
        disks,
        nics: spec
            .nics
            .iter()
            .map(|n| NicInfo {
                name: n.name.clone(),
                network: n.network.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        vm: Some(VmInfo {
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            kernel: spec.kernel.as_ref().map(|p| p.display().to_string()),
            initrd: spec.initrd.as_ref().map(|p| p.display().to_string()),
            append: spec.append.clone(),
        }),
        error,
    }
}

/// The size the guest sees: a raw image's length, a qcow2 image's header
/// field (bytes 24..32, big-endian).
pub fn virtual_size(path: &Path, format: DiskFormat) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    match format {
        DiskFormat::Raw => Ok(f.metadata()?.len()),
        DiskFormat::Qcow2 => {
            let mut header = [0u8; 32];
            f.read_exact(&mut header)?;
            if &header[..4] != b"QFI\xfb" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a qcow2 image (no QFI\\xfb magic)",
                ));
            }
            let mut size = [0u8; 8];
            size.copy_from_slice(&header[24..32]);
            Ok(u64::from_be_bytes(size))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_virtual_size_is_read_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("3G")
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(virtual_size(&img, DiskFormat::Qcow2).unwrap(), 3 << 30);
        let raw = dir.path().join("b.img");
        std::fs::write(&raw, vec![1u8; 4096]).unwrap();
        assert_eq!(virtual_size(&raw, DiskFormat::Raw).unwrap(), 4096);
        let err = virtual_size(&raw, DiskFormat::Qcow2).unwrap_err();
        assert!(err.to_string().contains("not a qcow2"), "{err}");
    }
}
