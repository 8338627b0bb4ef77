//! The compute driver with real QEMU and the real test guest: a replica VM
//! boots straight from the replica store (instant failover), finds the
//! guest's data, ends up on local disks only, and is removed with all it
//! created.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use siterec_agent::target::Target;
use siterec_core::Consistency;
use siterec_core::wire::{ReplicaNic, ReplicaStarted, TaskWork, VmInfo};
use siterec_store::{DiskManifest, Manifest, Store};
use siterec_testguest::{Mode, TestGuest, Verdict};

const SEED: u64 = 777;
const CHUNK: usize = 256 << 10;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stores a raw image as point `point` of `item`, one chunk per block.
async fn store_image(store: &Store, item: &str, point: &str, raw: &Path) {
    let data = std::fs::read(raw).unwrap();
    let mut chunks = Vec::new();
    for block in data.chunks(CHUNK) {
        chunks.push(store.put_plain_chunk(block.to_vec(), true).await.unwrap());
    }
    store.sync().await.unwrap();
    let manifest = Manifest {
        item: item.into(),
        point_id: point.into(),
        created_at_unix_ms: 1,
        consistency: Consistency::CrashConsistent,
        disks: vec![DiskManifest {
            disk_id: "vda".into(),
            size: data.len() as u64,
            chunk_size: CHUNK as u32,
            chunks,
        }],
        bases: Default::default(),
    };
    store.commit_point(&manifest).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_boots_from_the_store_then_stands_alone_and_is_removed() {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The guest writes its files on a disk, which becomes a recovery point.
    let disk = dir.path().join("source.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    let out = guest
        .boot(&disk, Mode::Write, SEED, Duration::from_secs(120))
        .unwrap();
    assert!(
        matches!(out.verdict, Verdict::Wrote(_)),
        "{}",
        out.serial_log
    );
    let raw = dir.path().join("source.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        disk.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let target = Target::open(&dir.path().join("store"), dir.path().join("failover"))
        .await
        .unwrap();
    store_image(&target.store, "app01", "p1", &raw).await;

    let work = TaskWork::StartReplica {
        item: "app01".into(),
        point_id: "p1".into(),
        vm_name: "app01-test".into(),
        test: true,
        vm: VmInfo {
            memory_mib: 256,
            cpus: 1,
            kernel: Some(guest.kernel.display().to_string()),
            initrd: Some(guest.initrd.display().to_string()),
            append: Some(siterec_testguest::append(Mode::Auto, SEED, 90, true)),
        },
        nics: vec![ReplicaNic {
            name: "eth0".into(),
            mac: Some("52:54:00:aa:bb:cc".into()),
            network: None,
        }],
        sealed_key: None,
    };
    let t0 = Instant::now();
    let started: ReplicaStarted =
        serde_json::from_value(target.run_task(&work).await.unwrap()).unwrap();
    eprintln!(
        "replica started and copied in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let run_dir = Path::new(&started.run_dir).to_path_buf();
    let serial = Path::new(&started.serial_log).to_path_buf();
    let begun = Instant::now();
    loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains("SITEREC-GUEST VERDICT") {
            assert!(log.contains("SITEREC-GUEST VERDICT OK"), "{log}");
            assert!(log.contains("SITEREC-GUEST MODE verify"), "{log}");
            break;
        }
        assert!(
            begun.elapsed() < Duration::from_secs(120),
            "no verdict:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The copy is done: the overlay has no backing any more, and the NBD
    // sockets are gone.
    let overlay = &started.disks[0].path;
    let info = qemu_img(&["info", "-U", "--output=json", overlay]);
    assert!(!info.contains("backing-filename"), "{info}");
    assert!(!run_dir.join("nbd-vda.sock").exists());
    // The NIC is isolated and keeps its MAC.
    let pid: u32 = std::fs::read_to_string(run_dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("user,id=net-eth0,restrict=on"),
        "{cmdline}"
    );
    assert!(cmdline.contains("mac=52:54:00:aa:bb:cc"), "{cmdline}");

    // Asked again (a redelivered task): the same VM, not a second one.
    let again: ReplicaStarted =
        serde_json::from_value(target.run_task(&work).await.unwrap()).unwrap();
    assert_eq!(again, started);
    let pid_again: u32 = std::fs::read_to_string(run_dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid_again, pid);
    // Another point under the same name is refused.
    let mut other = work.clone();
    if let TaskWork::StartReplica { point_id, .. } = &mut other {
        *point_id = "p2".into();
    }
    let err = target.run_task(&other).await.unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");

    // Cleanup powers it off and deletes everything it created.
    let remove = TaskWork::RemoveReplica {
        item: "app01".into(),
        vm_name: "app01-test".into(),
    };
    target.run_task(&remove).await.unwrap();
    assert!(!run_dir.exists());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU still runs"
    );
    target.run_task(&remove).await.unwrap();
}
