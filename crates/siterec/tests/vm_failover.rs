//! The first question a user asks — does my VM come back up at the other
//! site with its data? — answered with real processes and a real guest: the
//! test guest boots at the primary site and writes its files, replicates,
//! a test failover boots the replica in an isolated network while
//! replication goes on, the guest's own verdict is read from the replica's
//! serial console, cleanup removes the test VM, then an unplanned failover
//! boots the replica on the mapped recovery network and the guest checks
//! its data again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use siterec_testguest::{Mode, TestGuest};

const SEED: u64 = 90210;

/// Waits for the guest's verdict on a serial log; returns the log.
fn verdict(path: &Path) -> String {
    wait_until(
        Duration::from_secs(180),
        "the replica guest's verdict",
        || serial_log(path).contains("SITEREC-GUEST VERDICT"),
    );
    serial_log(path)
}

fn qemu_cmdline(run_dir: &Path) -> (u32, String) {
    let pid: u32 = std::fs::read_to_string(run_dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    (pid, String::from_utf8_lossy(&raw).replace('\0', " "))
}

fn details(op: &Value) -> &Value {
    &op["result"]["properties"]["providerSpecificDetails"]
}

#[test]
fn a_protected_vm_boots_at_the_recovery_site_in_test_and_unplanned_failover() {
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let vda = disks.join("vda.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", vda.to_str().unwrap(), "128M"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let primary = env.start_agent(
        "primary",
        &format!(
            r#"cloud = "primary-cloud"
[[vms]]
name = "app01"
memory_mib = 256
cpus = 1
kernel = "{}"
initrd = "{}"
append = "{}"
disks = [ {{ name = "vda", path = "{}", format = "qcow2" }} ]
nics = [ {{ name = "eth0", network = "prod-lan", mac = "52:54:00:00:00:01" }} ]
"#,
            guest.kernel.display(),
            guest.initrd.display(),
            siterec_testguest::append(Mode::Auto, SEED, 90, true),
            vda.display()
        ),
    );
    env.start_agent(
        "recovery",
        "cloud = \"recovery-cloud\"\n[[networks]]\nname = \"recovery-lan\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    let primary_serial = primary.join("vms/app01/serial.log");
    wait_until(
        Duration::from_secs(120),
        "the guest to write its files",
        || serial_log(&primary_serial).contains("SITEREC-GUEST WROTE"),
    );

    env.json(&[
        "network",
        "map",
        "--fabric",
        "primary",
        "--network",
        "prod-lan",
        "--recovery-fabric",
        "recovery",
        "--recovery-network",
        "recovery-lan",
    ]);
    env.pair(&[]);
    env.wait_machine("app01");
    env.enable("app01");

    // Test failover: the replica boots in an isolated network.
    let started = now_ms();
    let op = env.json(&["failover", "test", "app01"]);
    assert_eq!(op["status"], "Succeeded", "{op}");
    let props = &op["result"]["properties"];
    assert_eq!(props["protectionState"], "Protected", "{op}");
    let test_vm = &details(&op)["testVm"];
    assert_eq!(test_vm["name"], "app01-test", "{op}");
    let test_dir = PathBuf::from(test_vm["runDir"].as_str().unwrap());
    let log = verdict(Path::new(test_vm["serialLog"].as_str().unwrap()));
    assert!(log.contains("SITEREC-GUEST MODE verify"), "{log}");
    assert!(log.contains("SITEREC-GUEST VERDICT OK"), "{log}");
    let (test_pid, cmdline) = qemu_cmdline(&test_dir);
    assert!(
        cmdline.contains("user,id=net-eth0,restrict=on"),
        "{cmdline}"
    );
    assert!(cmdline.contains("mac=52:54:00:00:00:01"), "{cmdline}");
    // Replication goes on during the test.
    env.wait_point_after("app01", started, Duration::from_secs(120));
    let err = env.fails(&["failover", "test", "app01"]);
    assert!(err.to_lowercase().contains("clean"), "{err}");

    let op = env.json(&[
        "failover",
        "test-cleanup",
        "app01",
        "--comments",
        "boots fine",
    ]);
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert!(!test_dir.exists(), "the test VM's files are gone");
    assert!(
        !Path::new(&format!("/proc/{test_pid}")).exists(),
        "the test VM is powered off"
    );

    // Unplanned failover: the replica boots on the mapped network.
    let op = env.json(&["failover", "unplanned", "app01", "--point", "latest"]);
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert_eq!(
        op["result"]["properties"]["protectionState"],
        "UnplannedFailoverCompleted"
    );
    let vm = &details(&op)["failoverVm"];
    assert_eq!(vm["name"], "app01", "{op}");
    let run_dir = PathBuf::from(vm["runDir"].as_str().unwrap());
    let log = verdict(Path::new(vm["serialLog"].as_str().unwrap()));
    assert!(log.contains("SITEREC-GUEST VERDICT OK"), "{log}");
    let (_, cmdline) = qemu_cmdline(&run_dir);
    assert!(cmdline.contains("user,id=net-eth0 "), "{cmdline}");
    assert!(!cmdline.contains("restrict=on"), "{cmdline}");
    // Its disk is the source's, block for block (the guest only read it),
    // and stands alone on the recovery host.
    let replica_disk = run_dir.join("disks/vda.qcow2");
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(&vda)
        .arg(&replica_disk)
        .output()
        .unwrap();
    let dump = |p: &Path| {
        let o = Command::new("qemu-io")
            .args(["-r", "-U", "-f", "qcow2", "-c", "read -v 1024 128"])
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}\nsource:\n{}\nreplica:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        dump(&vda),
        dump(&replica_disk)
    );
    let info = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(&replica_disk)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&info.stdout).contains("backing file"));

    let op = env.json(&["failover", "commit", "app01"]);
    assert_eq!(
        op["result"]["properties"]["protectionState"], "FailoverCommitted",
        "{op}"
    );

    // Fencing: the primary site goes down — its agent and the old VM
    // killed — and comes back. The agent learns (and keeps) that app01
    // failed over, and does not start the old VM again: one copy runs.
    let pid_file = primary.join("vms/app01/qemu.pid");
    let old_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    env.kill("primary-agent");
    sigkill(old_pid);
    wait_until(Duration::from_secs(20), "the old VM to die", || {
        !Path::new(&format!("/proc/{old_pid}")).exists()
    });
    let fence = primary.join("fenced.json");
    assert_eq!(
        std::fs::read_to_string(&fence).unwrap().trim(),
        r#"["app01"]"#,
        "the fence was kept on disk before the site went down"
    );
    env.restart("primary-agent");
    wait_until(
        Duration::from_secs(30),
        "the primary agent to report",
        || {
            siterec_agent::AgentStatus::read(&primary).is_ok_and(|s| {
                s.fenced == ["app01"] && s.last_heartbeat_ms.is_some_and(|t| t > now_ms() - 5_000)
            })
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let pid_now = std::fs::read_to_string(&pid_file).unwrap_or_default();
    let restarted = pid_now
        .trim()
        .parse::<i32>()
        .is_ok_and(|p| p != old_pid && Path::new(&format!("/proc/{p}")).exists());
    assert!(
        !restarted,
        "the old primary started the failed-over VM again\n{}",
        env.logs()
    );
    assert!(
        env.logs()
            .contains("not starting the VM: its item failed over"),
        "{}",
        env.logs()
    );
}

/// SIGKILL, as a power cut would.
fn sigkill(pid: i32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}
