//! Against real QEMU (TCG unless KVM is usable) with the project's test
//! guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use siterec_qemu::{DiskFormat, DiskSpec, Error, NicSpec, SpecError, Vm, VmSpec};
use siterec_testguest::{TestGuest, Verdict, parse_verdict};

const DISK_SIZE: u64 = 64 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn spec(disks: Vec<DiskSpec>) -> VmSpec {
    VmSpec {
        name: "vm1".into(),
        memory_mib: 256,
        cpus: 1,
        disks,
        nics: vec![],
        kernel: None,
        initrd: None,
        append: None,
        guest_agent: false,
    }
}

fn disk(name: &str, path: &Path, format: DiskFormat) -> DiskSpec {
    DiskSpec {
        name: name.into(),
        path: path.to_path_buf(),
        format,
    }
}

#[tokio::test]
async fn bad_specs_give_clear_errors_and_start_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let qcow = dir.path().join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "1M"]);
    let raw = dir.path().join("b.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let missing = dir.path().join("nope.qcow2");

    let cases: Vec<(VmSpec, SpecError)> = vec![
        (
            spec(vec![disk("os", &missing, DiskFormat::Qcow2)]),
            SpecError::MissingDisk {
                disk: "os".into(),
                path: missing.clone(),
            },
        ),
        (
            spec(vec![
                disk("os", &qcow, DiskFormat::Qcow2),
                disk("os", &raw, DiskFormat::Raw),
            ]),
            SpecError::DuplicateDisk("os".into()),
        ),
        (
            spec(vec![disk("os", &qcow, DiskFormat::Raw)]),
            SpecError::FormatMismatch {
                disk: "os".into(),
                path: qcow.clone(),
                declared: DiskFormat::Raw,
                found: DiskFormat::Qcow2,
            },
        ),
        (
            spec(vec![disk("data", &raw, DiskFormat::Qcow2)]),
            SpecError::FormatMismatch {
                disk: "data".into(),
                path: raw.clone(),
                declared: DiskFormat::Qcow2,
                found: DiskFormat::Raw,
            },
        ),
        (
            spec(vec![disk("a,b", &raw, DiskFormat::Raw)]),
            SpecError::BadName {
                what: "disk",
                name: "a,b".into(),
                max: siterec_qemu::spec::MAX_NAME_LEN,
            },
        ),
        (
            VmSpec {
                nics: vec![
                    NicSpec {
                        name: "eth0".into(),
                        network: "lan".into(),
                        mac: None,
                        isolated: false,
                    },
                    NicSpec {
                        name: "eth0".into(),
                        network: "wan".into(),
                        mac: None,
                        isolated: false,
                    },
                ],
                ..spec(vec![])
            },
            SpecError::DuplicateNic("eth0".into()),
        ),
        (
            VmSpec {
                nics: vec![NicSpec {
                    name: "eth0".into(),
                    network: "lan".into(),
                    mac: Some("52:54:00:zz:00:01".into()),
                    isolated: false,
                }],
                ..spec(vec![])
            },
            SpecError::BadMac {
                nic: "eth0".into(),
                mac: "52:54:00:zz:00:01".into(),
            },
        ),
        (
            VmSpec {
                memory_mib: 0,
                ..spec(vec![])
            },
            SpecError::BadMemory(0),
        ),
        (
            VmSpec {
                append: Some("console=ttyS0".into()),
                ..spec(vec![])
            },
            SpecError::BootWithoutKernel,
        ),
    ];
    for (i, (s, want)) in cases.into_iter().enumerate() {
        let run = dir.path().join(format!("run{i}"));
        match Vm::start(s, &run).await {
            Err(Error::Spec(got)) => {
                assert_eq!(got, want, "case {i}");
                // The message names the culprit.
                let msg = Error::Spec(got).to_string();
                assert!(msg.starts_with("invalid VM spec: "), "{msg}");
            }
            Err(e) => panic!("case {i}: wrong error {e}"),
            Ok(_) => panic!("case {i}: started"),
        }
        assert!(!run.exists(), "case {i}: run dir created");
    }
    let msg = SpecError::MissingDisk {
        disk: "os".into(),
        path: missing.clone(),
    }
    .to_string();
    assert!(
        msg.contains("nope.qcow2") && msg.contains("\"os\""),
        "{msg}"
    );

    // From config text: an unknown format is refused by name.
    let text = format!(
        "name = \"vm1\"\nmemory_mib = 256\ncpus = 1\n[[disks]]\nname = \"os\"\npath = {:?}\nformat = \"vmdk\"\n",
        qcow.to_str().unwrap()
    );
    let err = toml::from_str::<VmSpec>(&text).unwrap_err().to_string();
    assert!(err.contains("vmdk") && err.contains("qcow2"), "{err}");
    let good: VmSpec = toml::from_str(&text.replace("vmdk", "qcow2")).unwrap();
    good.validate().unwrap();
    assert_eq!(good.disks[0].format, DiskFormat::Qcow2);
}

fn read_serial(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_guest_dirties_a_persistent_bitmap_stored_in_the_qcow2() {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    let dir = tempfile::tempdir().unwrap();
    let image: PathBuf = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        &DISK_SIZE.to_string(),
    ]);
    let timeout = Duration::from_secs(240);
    let vm_spec = VmSpec {
        name: "testguest".into(),
        memory_mib: 256,
        cpus: 1,
        disks: vec![disk("os", &image, DiskFormat::Qcow2)],
        nics: vec![NicSpec {
            name: "eth0".into(),
            network: "lan".into(),
            mac: Some("52:54:00:12:34:56".into()),
            isolated: false,
        }],
        kernel: Some(guest.kernel.clone()),
        initrd: Some(guest.initrd.clone()),
        append: Some(format!(
            "console=ttyS0 quiet panic=-1 siterec.mode=write siterec.seed=7 siterec.timeout={}",
            timeout.as_secs() * 3 / 4
        )),
        guest_agent: false,
    };
    let run = dir.path().join("run");
    let begun = Instant::now();
    let mut vm = Vm::start(vm_spec, &run).await.expect("VM starts");
    vm.add_dirty_bitmap("os", "sr-1", true).await.unwrap();
    eprintln!(
        "QEMU {} ({}) up in {:?}",
        vm.qemu_version(),
        vm.accel().as_str(),
        begun.elapsed()
    );

    let blocks = vm.query_block().await.unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].node_name, "disk-os");
    assert_eq!(blocks[0].format, "qcow2");
    assert_eq!(Path::new(&blocks[0].file), image);
    let bitmaps = vm.dirty_bitmaps("os").await.unwrap();
    assert_eq!(bitmaps.len(), 1);
    assert!(bitmaps[0].persistent && bitmaps[0].recording);
    assert!(matches!(
        vm.add_dirty_bitmap("nope", "x", false).await,
        Err(Error::UnknownDisk(_))
    ));
    // A QMP error keeps its class and description.
    match vm.add_dirty_bitmap("os", "sr-1", true).await {
        Err(Error::Qmp(siterec_qemu::QmpError::Command { class, desc, .. })) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("sr-1"), "{desc}");
        }
        other => panic!("duplicate bitmap: {other:?}"),
    }

    // The guest writes, syncs, reports and powers off; with -no-shutdown
    // QEMU stays up in state `shutdown`.
    let serial = vm.serial_log_path();
    let mut wrote = false;
    loop {
        let status = vm.status().await.unwrap();
        let verdict = parse_verdict(&read_serial(&serial));
        if matches!(verdict, Verdict::Wrote(_)) {
            wrote = true;
        }
        if status.status == "shutdown" {
            assert!(!status.running);
            break;
        }
        assert!(
            begun.elapsed() < timeout,
            "guest still {status:?} after {timeout:?}; serial:\n{}",
            read_serial(&serial)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = read_serial(&serial);
    assert!(
        wrote && parse_verdict(&log) == Verdict::Wrote(siterec_testguest::DATA_FILES),
        "no WROTE line; serial:\n{log}"
    );
    eprintln!("guest wrote and powered off after {:?}", begun.elapsed());

    let bitmaps = vm.dirty_bitmaps("os").await.unwrap();
    let b = &bitmaps[0];
    assert_eq!(b.name, "sr-1");
    assert!(b.count > 0, "nothing dirty: {b:?}");
    assert!(b.count < DISK_SIZE, "whole disk dirty: {b:?}");
    assert_eq!(b.count % b.granularity, 0);
    eprintln!("dirty: {} of {DISK_SIZE} bytes", b.count);

    // A second, transient bitmap: cleared and removed; it never reaches
    // the image.
    vm.add_dirty_bitmap("os", "scratch", false).await.unwrap();
    vm.clear_dirty_bitmap("os", "scratch").await.unwrap();
    vm.remove_dirty_bitmap("os", "scratch").await.unwrap();
    let names: Vec<String> = vm
        .dirty_bitmaps("os")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["sr-1"]);

    let events: Vec<String> = vm
        .qmp()
        .take_events()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert!(events.iter().any(|e| e == "SHUTDOWN"), "{events:?}");

    let (status, killed) = vm.quit(Duration::from_secs(30)).await.unwrap();
    assert!(
        status.success() && !killed,
        "quit: {status} killed={killed}"
    );
    eprintln!("quit after {:?}", begun.elapsed());

    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        image.to_str().unwrap(),
    ]))
    .unwrap();
    let stored = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap_or_else(|| panic!("no bitmaps in {info}"));
    assert_eq!(stored.len(), 1, "{info}");
    assert_eq!(stored[0]["name"], "sr-1");
    assert_eq!(stored[0]["granularity"], b.granularity);
    // Stored cleanly: no `in-use` flag left behind.
    let flags = stored[0]["flags"].to_string();
    assert!(!flags.contains("in-use"), "{flags}");
}

#[tokio::test]
async fn qemu_refusing_an_image_reports_its_error() {
    let dir = tempfile::tempdir().unwrap();
    // The qcow2 magic, then garbage: validation passes, QEMU refuses it.
    let image = dir.path().join("broken.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xff; 4092]);
    std::fs::write(&image, bytes).unwrap();
    let run = dir.path().join("run");
    match Vm::start(spec(vec![disk("os", &image, DiskFormat::Qcow2)]), &run).await {
        Err(Error::StartFailed { status, log }) => {
            assert!(!status.success());
            assert!(log.contains("broken.qcow2"), "{log}");
            eprintln!("QEMU said: {log}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("QEMU accepted a broken image"),
    }
}

#[tokio::test]
async fn diskless_vm_reports_nics_and_quits_with_a_comma_in_its_run_dir() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU's option syntax would split an unescaped comma.
    let run = dir.path().join("run,1 x");
    let vm_spec = VmSpec {
        nics: vec![
            NicSpec {
                name: "eth0".into(),
                network: "lan".into(),
                mac: Some("52:54:00:aa:bb:01".into()),
                isolated: false,
            },
            NicSpec {
                name: "eth1".into(),
                network: "backup".into(),
                mac: None,
                isolated: false,
            },
        ],
        ..spec(vec![])
    };
    let mut vm = Vm::start(vm_spec, &run).await.expect("VM starts");
    assert!(run.join("qmp.sock").exists());
    let status = vm.status().await.unwrap();
    assert!(status.running, "{status:?}");
    assert!(vm.query_block().await.unwrap().is_empty());
    let nics = vm.query_nics().await.unwrap();
    assert_eq!(nics.len(), 2);
    assert_eq!(
        (
            nics[0].name.as_str(),
            nics[0].network.as_str(),
            nics[0].mac.as_str()
        ),
        ("eth0", "lan", "52:54:00:aa:bb:01")
    );
    assert_eq!(
        (nics[1].name.as_str(), nics[1].network.as_str()),
        ("eth1", "backup")
    );
    assert_eq!(nics[1].mac.len(), 17, "{:?}", nics[1]);
    assert_ne!(nics[1].mac, nics[0].mac);
    let pid = vm.pid().expect("running");
    let (status, killed) = vm.quit(Duration::from_secs(30)).await.unwrap();
    assert!(
        status.success() && !killed,
        "quit: {status} killed={killed}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU still there"
    );
}

#[tokio::test]
async fn dropping_a_vm_kills_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::start(spec(vec![]), &dir.path().join("run"))
        .await
        .expect("VM starts");
    let pid = vm.pid().expect("running");
    drop(vm);
    let begun = Instant::now();
    // Killed, then reaped by tokio in the background: gone or a zombie.
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let gone = state.is_empty() || state.split_whitespace().nth(2) == Some("Z");
        if gone {
            break;
        }
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "QEMU {pid} lives on: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
