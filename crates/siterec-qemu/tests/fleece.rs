//! Fleecing against real QEMU: point-in-time views over NBD while the
//! "guest" writes (writes come through the disk's device with HMP
//! `qemu-io -d`, exactly where a guest's writes enter QEMU's block layer),
//! and the dirty bitmaps that say what changed between views.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use siterec_nbd::{ConnectOptions, NbdClient, STATE_DIRTY};
use siterec_qemu::{DiskFormat, DiskSpec, FleeceDisk, Vm, VmSpec};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spec(disk: &Path) -> VmSpec {
    VmSpec {
        name: "fleece".into(),
        memory_mib: 64,
        cpus: 1,
        disks: vec![DiskSpec {
            name: "vda".into(),
            path: disk.to_path_buf(),
            format: DiskFormat::Qcow2,
        }],
        nics: vec![],
        kernel: None,
        initrd: None,
        append: None,
        guest_agent: false,
    }
}

/// A write as the guest would make it: into the device's block backend.
async fn guest_write(vm: &mut Vm, pattern: u8, offset: u64, len: u64) {
    let cmd = format!(
        "qemu-io -d /machine/peripheral/vd-vda/virtio-backend \"write -P {pattern} {offset} {len}\""
    );
    let out = vm
        .qmp()
        .execute(
            "human-monitor-command",
            Some(json!({ "command-line": cmd })),
        )
        .await
        .unwrap();
    let text = out.as_str().unwrap_or_default();
    // qemu-io reports success on QEMU's stdout, errors in the reply.
    assert!(!text.to_lowercase().contains("error"), "qemu-io: {text}");
}

fn plan(create_active: bool, frozen: Option<&str>) -> Vec<FleeceDisk> {
    vec![FleeceDisk {
        disk: "vda".into(),
        size: SIZE,
        active: "act".into(),
        create_active,
        frozen: frozen.map(str::to_string),
        persistent: true,
        granularity: None,
    }]
}

async fn dirty(socket: &Path, bitmap: &str) -> Vec<(u64, u64)> {
    let ctx = format!("qemu:dirty-bitmap:{bitmap}");
    let mut c = NbdClient::connect_unix(socket, &ConnectOptions::new("vda").meta_context(&ctx))
        .await
        .unwrap();
    let id = c.meta_context_id(&ctx).unwrap();
    let ext = c.block_status_range(id, 0, SIZE).await.unwrap();
    ext.iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect()
}

async fn read(socket: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut c = NbdClient::connect_unix(socket, &ConnectOptions::new("vda"))
        .await
        .unwrap();
    c.read(offset, len).await.unwrap()
}

#[tokio::test]
async fn views_hold_still_while_the_guest_writes_and_bitmaps_say_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.qcow2");
    let disk_s = disk.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", disk_s, &SIZE.to_string()]);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 17 0 4M", disk_s])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut vm = Vm::start(spec(&disk), &dir.path().join("run"))
        .await
        .unwrap();

    // First view: creates the active bitmap at that instant; no frozen one.
    let f = vm.start_fleece(&plan(true, None)).await.unwrap();
    assert_eq!(f.exports, vec!["vda".to_string()]);
    let data = read(&f.socket, 0, (8 * MIB) as usize).await;
    assert!(data[..(4 * MIB) as usize].iter().all(|&b| b == 17));
    assert!(data[(4 * MIB) as usize..].iter().all(|&b| b == 0));
    vm.stop_fleece().await.unwrap();
    assert!(!dir.path().join("run/fleece-vda.qcow2").exists());

    // The guest writes 1 MiB at 8 MiB; the next view's frozen bitmap holds
    // exactly that, and the active one starts over.
    guest_write(&mut vm, 34, 8 * MIB, MIB).await;
    let f = vm.start_fleece(&plan(false, Some("frz"))).await.unwrap();
    assert_eq!(dirty(&f.socket, "frz").await, vec![(8 * MIB, MIB)]);
    let bitmaps = vm.dirty_bitmaps("vda").await.unwrap();
    let act = bitmaps.iter().find(|b| b.name == "act").unwrap();
    assert_eq!(act.count, 0, "{bitmaps:?}");
    assert!(act.recording && act.persistent);

    // Writes during the view do not show in it (point in time)...
    guest_write(&mut vm, 51, 8 * MIB, 512 << 10).await;
    guest_write(&mut vm, 68, 16 * MIB, 512 << 10).await;
    let view = read(&f.socket, 8 * MIB, (9 * MIB) as usize).await;
    assert!(
        view[..MIB as usize].iter().all(|&b| b == 34),
        "old data at 8 MiB"
    );
    assert!(
        view[(8 * MIB) as usize..].iter().all(|&b| b == 0),
        "no data at 16 MiB yet"
    );
    // ...and the active bitmap has them.
    let bitmaps = vm.dirty_bitmaps("vda").await.unwrap();
    let act = bitmaps.iter().find(|b| b.name == "act").unwrap();
    assert_eq!(act.count, MIB, "{bitmaps:?}");
    vm.stop_fleece().await.unwrap();

    // The point failed: the frozen bits go back into the active bitmap.
    vm.restore_frozen("vda", "act", "frz").await.unwrap();
    let bitmaps = vm.dirty_bitmaps("vda").await.unwrap();
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert_eq!(bitmaps[0].count, MIB + (512 << 10), "{bitmaps:?}");
    // Restoring twice changes nothing.
    vm.restore_frozen("vda", "act", "frz").await.unwrap();

    // The next view carries all of it; the live data is now in the view.
    let f = vm.start_fleece(&plan(false, Some("frz"))).await.unwrap();
    assert_eq!(
        dirty(&f.socket, "frz").await,
        vec![(8 * MIB, MIB), (16 * MIB, 512 << 10)]
    );
    let view = read(&f.socket, 8 * MIB, MIB as usize).await;
    assert!(view[..(512 << 10)].iter().all(|&b| b == 51));
    assert!(view[(512 << 10)..].iter().all(|&b| b == 34));
    vm.stop_fleece().await.unwrap();
    // Recorded: the frozen bitmap goes.
    vm.drop_frozen("vda", "frz").await.unwrap();
    vm.drop_frozen("vda", "frz").await.unwrap();
    let bitmaps = vm.dirty_bitmaps("vda").await.unwrap();
    assert_eq!(bitmaps.len(), 1);
    assert_eq!(bitmaps[0].count, 0);

    // A failed transaction changes no bitmap and leaves no fleece behind.
    let err = vm.start_fleece(&plan(true, None)).await.unwrap_err();
    assert!(err.to_string().contains("act"), "{err}");
    assert!(!dir.path().join("run/fleece-vda.qcow2").exists());
    assert_eq!(vm.dirty_bitmaps("vda").await.unwrap().len(), 1);

    // The active bitmap is persistent: it is in the image after quit.
    vm.quit(std::time::Duration::from_secs(10)).await.unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", disk_s])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let names: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["act"]);
}

#[tokio::test]
async fn a_qemu_left_running_by_an_earlier_owner_is_adopted_and_keeps_its_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        disk.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let run = dir.path().join("run");
    assert!(
        Vm::adopt(spec(&disk), &run).await.unwrap().is_none(),
        "nothing to adopt yet"
    );
    std::fs::create_dir_all(&run).unwrap();
    // An earlier owner started QEMU and died without stopping it.
    let args = siterec_qemu::qemu_args(&spec(&disk), &run, siterec_qemu::choose_accel());
    let mut orphan = std::process::Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let begun = std::time::Instant::now();
    let mut vm = loop {
        if let Some(vm) = Vm::adopt(spec(&disk), &run).await.unwrap() {
            break vm;
        }
        assert!(begun.elapsed().as_secs() < 30, "QEMU did not come up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(vm.pid(), Some(orphan.id()));
    vm.add_dirty_bitmap("vda", "act", true).await.unwrap();
    guest_write(&mut vm, 1, 0, MIB).await;
    drop(vm); // the owner dies again; QEMU goes on
    let mut vm = Vm::adopt(spec(&disk), &run)
        .await
        .unwrap()
        .expect("still running");
    let bitmaps = vm.dirty_bitmaps("vda").await.unwrap();
    assert_eq!(bitmaps.len(), 1);
    assert_eq!(bitmaps[0].count, MIB);
    let (_, killed) = vm.quit(std::time::Duration::from_secs(10)).await.unwrap();
    assert!(!killed);
    let status = orphan.wait().unwrap();
    assert!(status.success(), "{status}");
}
