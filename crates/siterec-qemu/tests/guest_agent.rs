//! The guest agent against real QEMU and the test guest's real qemu-ga:
//! freeze and thaw seen in the guest (its fsfreeze hook on the console)
//! and on the disk (no write reaches it while frozen), a copy taken while
//! frozen booting as a verified replica; no agent in the guest found absent
//! within the timeout; no channel at all at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use siterec_qemu::{DiskFormat, DiskSpec, FsfreezeStatus, GaError, Vm, VmSpec};
use siterec_testguest::{Mode, Options, TestGuest, Verdict, guest_lines, parse_verdict};

/// Until the guest's report (TCG boots in seconds; generous for a loaded
/// machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_serial(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn bare_spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: 256,
        cpus: 1,
        disks: vec![],
        nics: vec![],
        kernel: None,
        initrd: None,
        append: None,
        guest_agent: false,
    }
}

/// The test guest with the agent's port, no disk yet.
fn vm_spec_of(options: &Options, name: &str) -> VmSpec {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    VmSpec {
        kernel: Some(guest.kernel),
        initrd: Some(guest.initrd),
        append: Some(options.append()),
        guest_agent: true,
        ..bare_spec(name)
    }
}

/// The test guest on a fresh 64 MiB qcow2, with the agent's port.
fn guest_spec(dir: &Path, name: &str, options: &Options) -> VmSpec {
    let image: PathBuf = dir.join(format!("{name}.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "64M",
    ]);
    VmSpec {
        disks: vec![DiskSpec {
            name: "os".into(),
            path: image,
            format: DiskFormat::Qcow2,
        }],
        ..vm_spec_of(options, name)
    }
}

/// Waits until the guest has printed every line in `want` (as prefixes of
/// its `SITEREC-GUEST` lines); panics on a FAIL verdict or at the timeout.
async fn wait_for_lines(vm: &Vm, want: &[&str]) -> Vec<String> {
    let begun = Instant::now();
    loop {
        let log = read_serial(&vm.serial_log_path());
        if let Verdict::Fail(reason) = parse_verdict(&log) {
            panic!("guest failed: {reason}\nserial:\n{log}");
        }
        let lines = guest_lines(&log);
        if want.iter().all(|w| lines.iter().any(|l| l.starts_with(w))) {
            return lines;
        }
        assert!(
            begun.elapsed() < BOOT_TIMEOUT,
            "no {want:?} after {BOOT_TIMEOUT:?}; serial:\n{log}\nqemu:\n{}",
            read_serial(&vm.qemu_log_path())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn fsfreeze_lines(vm: &Vm) -> Vec<String> {
    guest_lines(&read_serial(&vm.serial_log_path()))
        .into_iter()
        .filter(|l| l.starts_with("FSFREEZE"))
        .collect()
}

/// Waits (briefly: the hook has run, its line is on its way through the
/// guest's serial port) until the guest's FSFREEZE lines are `want`.
async fn expect_fsfreeze_lines(vm: &Vm, want: &[&str]) {
    let begun = Instant::now();
    loop {
        let got = fsfreeze_lines(vm);
        if got == want {
            return;
        }
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "FSFREEZE lines {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes the guest wrote to disk `os` during `secs` seconds, by a
/// transient dirty bitmap cleared at the start.
async fn dirty_during(vm: &mut Vm, secs: f64) -> u64 {
    vm.clear_dirty_bitmap("os", "watch").await.unwrap();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    vm.dirty_bitmaps("os")
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.name == "watch")
        .map(|b| b.count)
        .unwrap_or_default()
}

/// Freeze, copy the disk (an app-consistent point), thaw; the copy boots as
/// a replica and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_freezes_and_thaws_the_guest_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        stay: true,
        churn_kib_per_sec: 256,
        ..Options::new(Mode::Auto, 11, BOOT_TIMEOUT.as_secs())
    };
    let spec = guest_spec(dir.path(), "frozen", &options);
    let begun = Instant::now();
    let mut vm = Vm::start(spec, &dir.path().join("run"))
        .await
        .expect("VM starts");
    assert!(dir.path().join("run/qga.sock").exists());
    vm.add_dirty_bitmap("os", "watch", false).await.unwrap();
    let lines = wait_for_lines(
        &vm,
        &["STAY /mnt read-write", "WROTE", "AGENT started", "CHURN"],
    )
    .await;
    eprintln!(
        "guest up in {:?} ({}): {lines:?}",
        begun.elapsed(),
        vm.accel().as_str()
    );

    let ga = vm.guest_agent().unwrap();
    let t = Instant::now();
    ga.ping().await.expect("the agent answers");
    eprintln!("first ping (with sync) {:?}", t.elapsed());
    let info = ga.info().await.unwrap();
    eprintln!("qemu-ga {}", info.version);
    assert!(!info.version.is_empty());
    for c in [
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
        "guest-fsfreeze-status",
    ] {
        assert!(info.supports(c), "{c} missing: {info:?}");
    }
    assert_eq!(ga.fsfreeze_status().await.unwrap(), FsfreezeStatus::Thawed);
    assert!(fsfreeze_lines(&vm).is_empty());

    // The churn reaches the disk.
    let before = dirty_during(&mut vm, 2.5).await;
    assert!(before > 0, "no churn reached the disk");

    let ga = vm.guest_agent().unwrap();
    let t = Instant::now();
    let frozen = ga.fsfreeze_freeze().await.expect("freeze");
    let freeze_took = t.elapsed();
    assert!(frozen >= 1, "froze {frozen} filesystems");
    assert_eq!(ga.fsfreeze_status().await.unwrap(), FsfreezeStatus::Frozen);
    // The hook ran before the freeze returned.
    expect_fsfreeze_lines(&vm, &["FSFREEZE freeze"]).await;
    // Frozen: the churning writer is held, nothing reaches the disk.
    let while_frozen = dirty_during(&mut vm, 2.0).await;
    assert_eq!(while_frozen, 0, "writes reached the disk while frozen");
    // The point: a copy of the image while frozen (the freeze flushed the
    // guest's writes, so QEMU's image file is complete).
    let image = vm.spec().disks[0].path.clone();
    let copy = dir.path().join("point.qcow2");
    let t = Instant::now();
    qemu_img(&[
        "convert",
        "-U",
        "-q",
        "-O",
        "qcow2",
        image.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    let copy_took = t.elapsed();

    let ga = vm.guest_agent().unwrap();
    let t = Instant::now();
    let thawed = ga.fsfreeze_thaw().await.expect("thaw");
    let thaw_took = t.elapsed();
    assert_eq!(thawed, frozen);
    assert_eq!(ga.fsfreeze_status().await.unwrap(), FsfreezeStatus::Thawed);
    expect_fsfreeze_lines(&vm, &["FSFREEZE freeze", "FSFREEZE thaw"]).await;
    // A thaw with nothing frozen thaws nothing.
    let ga = vm.guest_agent().unwrap();
    assert_eq!(ga.fsfreeze_thaw().await.unwrap(), 0);
    let after = dirty_during(&mut vm, 2.5).await;
    assert!(after > 0, "the churn did not resume after the thaw");
    eprintln!(
        "froze {frozen} fs in {freeze_took:?}, copied in {copy_took:?}, thawed in {thaw_took:?}; dirty bytes in 2.5 s before {before}, 2 s frozen {while_frozen}, 2.5 s after {after}"
    );
    let (status, killed) = vm.quit(Duration::from_secs(30)).await.unwrap();
    assert!(
        status.success() && !killed,
        "quit: {status} killed={killed}"
    );

    // The point boots as a replica with the same command line: auto mode
    // verifies it (the churn file is outside the manifest), and staying up
    // it mounts the filesystem read-write again and churns on.
    let spec = VmSpec {
        disks: vec![DiskSpec {
            name: "os".into(),
            path: copy,
            format: DiskFormat::Qcow2,
        }],
        ..vm_spec_of(&options, "replica")
    };
    let mut replica = Vm::start(spec, &dir.path().join("run-replica"))
        .await
        .expect("replica starts");
    replica
        .add_dirty_bitmap("os", "watch", false)
        .await
        .unwrap();
    let lines = wait_for_lines(
        &replica,
        &["MODE verify", "STAY /mnt read-write", "VERDICT OK", "CHURN"],
    )
    .await;
    assert_eq!(
        parse_verdict(&read_serial(&replica.serial_log_path())),
        Verdict::Ok(siterec_testguest::DATA_FILES),
        "{lines:?}"
    );
    let churned = dirty_during(&mut replica, 2.5).await;
    assert!(churned > 0, "the replica's /mnt is not writable");
    replica.quit(Duration::from_secs(30)).await.unwrap();
    eprintln!("whole test {:?}", begun.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_without_an_agent_is_absent_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        stay: true,
        agent: false,
        ..Options::new(Mode::Write, 12, BOOT_TIMEOUT.as_secs())
    };
    let spec = guest_spec(dir.path(), "noagent", &options);
    let mut vm = Vm::start(spec, &dir.path().join("run"))
        .await
        .expect("VM starts");
    // The guest is up and running, with the port but no agent on it.
    wait_for_lines(&vm, &["WROTE", "AGENT off"]).await;
    let timeout = Duration::from_secs(2);
    let ga = vm.guest_agent().unwrap();
    ga.set_answer_timeout(timeout);
    for what in ["ping", "freeze"] {
        let t = Instant::now();
        let e = match what {
            "ping" => ga.ping().await.unwrap_err(),
            _ => ga.fsfreeze_freeze().await.unwrap_err(),
        };
        let took = t.elapsed();
        eprintln!("{what}: {e} after {took:?}");
        assert!(matches!(e, GaError::NotAnswering { .. }), "{what}: {e:?}");
        assert!(e.is_absent());
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "{what} took {took:?}"
        );
    }
    assert!(fsfreeze_lines(&vm).is_empty());
    vm.quit(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test]
async fn without_guest_agent_in_the_spec_there_is_no_channel() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut vm = Vm::start(bare_spec("plain"), &run)
        .await
        .expect("VM starts");
    let t = Instant::now();
    let e = vm.guest_agent().unwrap_err();
    assert!(matches!(e, GaError::NotConfigured), "{e:?}");
    assert!(e.is_absent());
    assert!(t.elapsed() < Duration::from_millis(100));
    assert!(e.to_string().contains("guest_agent"), "{e}");
    assert!(!run.join("qga.sock").exists());
    vm.quit(Duration::from_secs(30)).await.unwrap();

    // The port without a guest OS (firmware finds nothing to boot): the
    // socket is there, nothing answers.
    let run = dir.path().join("run2");
    let spec = VmSpec {
        guest_agent: true,
        ..bare_spec("firmware")
    };
    let args = siterec_qemu::qemu_args(&spec, &run, siterec_qemu::Accel::Tcg).join(" ");
    assert!(
        args.contains("virtserialport,bus=vser-qga.0,chardev=qga0,name=org.qemu.guest_agent.0"),
        "{args}"
    );
    let mut vm = Vm::start(spec, &run).await.expect("VM starts");
    assert!(run.join("qga.sock").exists());
    let ga = vm.guest_agent().unwrap();
    ga.set_answer_timeout(Duration::from_millis(500));
    let e = ga.fsfreeze_status().await.unwrap_err();
    assert!(matches!(e, GaError::NotAnswering { .. }), "{e:?}");
    vm.quit(Duration::from_secs(30)).await.unwrap();
}

#[test]
fn guest_agent_in_config_text() {
    let base = "name = \"vm1\"\nmemory_mib = 256\ncpus = 1\n";
    let plain: VmSpec = toml::from_str(base).unwrap();
    assert!(!plain.guest_agent);
    let with: VmSpec = toml::from_str(&format!("{base}guest_agent = true\n")).unwrap();
    assert!(with.guest_agent);
    // Unknown fields are still refused, by name.
    let err = toml::from_str::<VmSpec>(&format!("{base}guest_agnet = true\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("guest_agnet"), "{err}");
}
