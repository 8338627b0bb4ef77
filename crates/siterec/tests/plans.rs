//! Recovery plans through real processes: a plan of three groups — a
//! database server with a pre-script, then two application machines (one
//! of them a QEMU VM, in both tests) with a post-script and a manual
//! action, then a web server — run by the vault's job with real agents.
//! The order is checked by the scripts' own log (their timestamps against
//! the machines' jobs), the pause by the job's state until `plan resume`,
//! each machine by its state and its disks (`qemu-img compare`, and the
//! test guest's verdict on its own files for the VM's copies), and the
//! job's output by its per-machine outcome. The unplanned failover has one
//! machine made to fail (its failover directory is a file), runs to its
//! end, and survives a SIGKILLed vault during a script, during a group and
//! while paused.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The scripts of the plan, in the recovery agent's scripts directory:
/// each appends "NANOS GROUP PHASE TYPE ITEMS" to `log` and sleeps
/// `$(cat sleep-GROUP-PHASE)` seconds if that file exists.
fn write_scripts(recovery_data: &Path, log: &Path) {
    let dir = recovery_data.join("scripts");
    std::fs::create_dir_all(&dir).unwrap();
    let body = format!(
        "#!/bin/sh\nd=$(dirname \"$0\")\necho \"$(date +%s%N) $SITEREC_PLAN_GROUP $SITEREC_PLAN_PHASE $SITEREC_FAILOVER_TYPE $SITEREC_PLAN_ITEMS $SITEREC_PLAN\" >> {log}\nf=\"$d/sleep-$SITEREC_PLAN_GROUP-$SITEREC_PLAN_PHASE\"\n[ -f \"$f\" ] && sleep \"$(cat \"$f\")\"\necho \"script of group $SITEREC_PLAN_GROUP done\"\n",
        log = log.display()
    );
    for name in ["fence.sh", "dns.sh"] {
        let p = dir.join(name);
        std::fs::write(&p, &body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn plan_file(env: &Env, app: &str) -> PathBuf {
    let p = env.path("plan.toml");
    std::fs::write(
        &p,
        format!(
            r#"primary_fabric = "primary"
recovery_fabric = "recovery"

[[group]]
items = ["db"]
[[group.pre]]
name = "fence"
script = "fence.sh"
timeout = 60

[[group]]
items = ["{app}", "app2"]
[[group.post]]
name = "dns"
script = "dns.sh"
[[group.post]]
name = "confirm"
manual = "Check that the application answers, then resume"

[[group]]
items = ["web"]
"#
        ),
    )
    .unwrap();
    p
}

fn job(env: &Env, id: &str) -> Value {
    env.json(&["jobs", "show", id])
}

fn wait_job(env: &Env, id: &str, states: &[&str], timeout: Duration) -> Value {
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let out = env.cli(&["--output", "json", "jobs", "show", id]);
        if out.status.success()
            && let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
        {
            if states.iter().any(|s| v["properties"]["state"] == *s) {
                return v;
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!(
        "job {id} is not {states:?} after {timeout:?}: {last:#}\n{}",
        env.logs()
    );
}

fn item(env: &Env, name: &str) -> Value {
    env.json(&["item", "show", name])
}

fn state(env: &Env, name: &str) -> String {
    item(env, name)["properties"]["protectionState"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn test_state(env: &Env, name: &str) -> String {
    item(env, name)["properties"]["testFailoverState"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The scripts' log: (nanos, group, phase, type, items).
fn script_log(path: &Path) -> Vec<(i64, String, String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse::<i64>().unwrap() / 1_000_000,
                f[1].into(),
                f[2].into(),
                f[3].into(),
                f[4].into(),
            )
        })
        .collect()
}

fn job_times(j: &Value) -> (i64, i64) {
    let p = &j["properties"];
    (
        parse_ms(p["startTime"].as_str().unwrap_or_default()),
        parse_ms(p["endTime"].as_str().unwrap_or_default()),
    )
}

fn start_plan(env: &Env, args: &[&str]) -> String {
    let v = env.json(args);
    v["jobId"].as_str().unwrap().to_string()
}

fn machine_outcome<'a>(j: &'a Value, item: &str) -> &'a Value {
    j["properties"]["customDetails"]["output"]["machines"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["item"] == item))
        .unwrap_or_else(|| panic!("no outcome of {item}: {j:#}"))
}

/// The plan's machines at the primary site: three file-backed servers
/// (db, app2, web) and a QEMU VM (app1) running the test guest, which
/// wrote its files before protection; the recovery agent has the plan's
/// scripts. Each machine is protected.
struct Shop {
    servers: Vec<(&'static str, PathBuf)>,
    recovery: PathBuf,
    log: PathBuf,
}

const SERVERS: [&str; 3] = ["db", "app2", "web"];
const MACHINES: [&str; 4] = ["db", "app1", "app2", "web"];

fn start_shop(env: &mut Env, seed: u64) -> Shop {
    use siterec_testguest::{Mode, Options, TestGuest};
    let guest = TestGuest::build(&siterec_testguest::default_build_dir()).expect("test guest");
    let servers: Vec<(&'static str, PathBuf)> = SERVERS
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = env.path(&format!("{n}.img"));
            make_image(&p, 2 << 20, seed + i as u64);
            (*n, p)
        })
        .collect();
    let vda = env.path("vda.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&vda)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let append = Options {
        stay: true,
        agent: false,
        ..Options::new(Mode::Auto, seed, 120)
    }
    .append();
    let mut cfg = format!(
        r#"cloud = "primary-cloud"
[[vms]]
name = "app1"
memory_mib = 256
cpus = 1
kernel = "{}"
initrd = "{}"
append = "{append}"
disks = [ {{ name = "vda", path = "{}", format = "qcow2" }} ]
nics = [ {{ name = "eth0", network = "prod-lan", mac = "52:54:00:00:00:31" }} ]
"#,
        guest.kernel.display(),
        guest.initrd.display(),
        vda.display()
    );
    for (n, d) in &servers {
        cfg.push_str(&format!(
            "[[machines]]\nname = \"{n}\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
            d.display()
        ));
    }
    let primary = env.start_agent("primary", &cfg);
    let recovery = env.start_agent(
        "recovery",
        "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");
    let log = env.path("scripts.log");
    write_scripts(&recovery, &log);
    let primary_serial = primary.join("vms/app1/serial.log");
    wait_until(
        Duration::from_secs(120),
        "the guest to write its files",
        || serial_log(&primary_serial).contains("SITEREC-GUEST WROTE"),
    );
    env.pair(&[]);
    for n in MACHINES {
        env.wait_machine(n);
        env.enable(n);
    }
    Shop {
        servers,
        recovery,
        log,
    }
}

/// Waits for the guest's verdict on the serial log of `vm` (an item's
/// `testVm` or `failoverVm`): the VM booted with the data it wrote.
fn assert_vm_verdict(vm: &Value) {
    let serial = PathBuf::from(
        vm["serialLog"]
            .as_str()
            .unwrap_or_else(|| panic!("no serial log in {vm:#}")),
    );
    wait_until(Duration::from_secs(180), "the VM's verdict", || {
        serial_log(&serial).contains("SITEREC-GUEST VERDICT")
    });
    assert!(
        serial_log(&serial).contains("SITEREC-GUEST VERDICT OK"),
        "{}",
        serial_log(&serial)
    );
}

#[test]
fn an_unplanned_plan_runs_to_its_end_through_vault_kills_and_reports_each_machine() {
    let mut env = Env::start();
    let shop = start_shop(&mut env, 100);
    let (recovery, log) = (shop.recovery.clone(), shop.log.clone());
    let file = plan_file(&env, "app1");
    let created = env.json(&["plan", "create", "shop", "--file", file.to_str().unwrap()]);
    assert_eq!(created["name"], "shop", "{created}");
    let ops = created["properties"]["allowedOperations"].clone();
    assert!(
        ops.as_array()
            .unwrap()
            .iter()
            .any(|o| o == "UnplannedFailover"),
        "{created}"
    );

    // Refused plans change nothing.
    let (code, v) = env.arm(
        "PUT",
        "replicationRecoveryPlans/bad",
        "api-version=2025-08-01",
        Some(serde_json::json!({"properties": {"primaryFabricId": "primary", "recoveryFabricId": "recovery", "groups": [
            {"groupType": "Boot", "replicationProtectedItems": [{"id": "db"}, {"id": "nosuch"}]}
        ]}})),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v.to_string().contains("nosuch"), "{v}");
    for (groups, needle) in [
        (
            serde_json::json!([{"groupType": "Boot", "replicationProtectedItems": [{"id": "db"}]}, {"groupType": "Boot", "replicationProtectedItems": [{"id": "DB"}]}]),
            "twice",
        ),
        (
            serde_json::json!([{"groupType": "Boot", "replicationProtectedItems": [{"id": "db"}], "startGroupActions": [
            {"actionName": "x", "customDetails": {"instanceType": "ScriptActionDetails", "path": "/etc/passwd"}}]}]),
            "relative",
        ),
        (
            serde_json::json!([{"groupType": "Boot", "replicationProtectedItems": [{"id": "db"}], "startGroupActions": [
            {"actionName": "x", "customDetails": {"instanceType": "AutomationRunbookActionDetails"}}]}]),
            "not supported",
        ),
        (
            serde_json::json!([{"groupType": "Shutdown", "replicationProtectedItems": [{"id": "db"}]}]),
            "Boot groups only",
        ),
    ] {
        let (code, v) = env.arm(
            "PUT",
            "replicationRecoveryPlans/bad",
            "api-version=2025-08-01",
            Some(serde_json::json!({"properties": {"primaryFabricId": "primary", "recoveryFabricId": "recovery", "groups": groups}})),
        );
        assert_eq!(code, 400, "{v}");
        assert!(v.to_string().contains(needle), "{needle}: {v}");
    }
    let listed = env.json(&["plan", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // An ended job is not cancelled, a job that did not fail not restarted.
    let jobs = env.json(&["jobs", "list"]);
    let item_job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["properties"]["scenarioName"] == "EnableDr")
        .and_then(|j| j["name"].as_str())
        .unwrap()
        .to_string();
    assert!(
        env.fails(&["jobs", "cancel", &item_job])
            .contains("nothing to cancel")
    );
    assert!(
        env.fails(&["jobs", "restart", &item_job])
            .contains("only a failed job")
    );

    // app2 cannot be written at the recovery site: its failover fails.
    let blocked = recovery.join("failover").join("app2");
    std::fs::create_dir_all(blocked.parent().unwrap()).unwrap();
    std::fs::write(&blocked, b"not a directory").unwrap();
    // The pre-script takes a while: the vault is killed while it runs.
    std::fs::write(recovery.join("scripts/sleep-1-pre"), "4").unwrap();

    let id = start_plan(&env, &["plan", "unplanned-failover", "shop"]);
    wait_until(Duration::from_secs(30), "the pre-script to start", || {
        !script_log(&log).is_empty()
    });
    env.kill_and_restart("vault");
    // Group 2 runs: kill the vault while its machines fail over.
    wait_until(Duration::from_secs(90), "group 2 to start", || {
        env.cli(&["--output", "json", "jobs", "show", &format!("{id}-app1")])
            .status
            .success()
    });
    env.kill_and_restart("vault");
    // Paused at the manual action, after the post-script.
    let paused = wait_job(&env, &id, &["Suspended"], Duration::from_secs(180));
    assert_eq!(state(&env, "web"), "Protected", "group 3 waits: {paused:#}");
    env.kill_and_restart("vault");
    let paused = wait_job(&env, &id, &["Suspended"], Duration::from_secs(60));
    let allowed = paused["properties"]["allowedActions"].clone();
    assert!(allowed.to_string().contains("Resume"), "{paused:#}");
    // While the plan runs it is neither edited nor deleted, nor run again.
    assert!(env.fails(&["plan", "delete", "shop"]).contains("runs job"));
    assert!(
        env.fails(&["plan", "edit", "shop", "--group", "db"])
            .contains("runs job")
    );
    assert!(
        env.fails(&["plan", "test-failover", "shop"])
            .contains("runs job")
    );
    assert!(
        env.fails(&["jobs", "restart", &id])
            .contains("only a failed job")
    );
    let resumed_at = now_ms();
    env.json(&["plan", "resume", &id, "--comments", "app checked"]);
    let done = wait_job(
        &env,
        &id,
        &["Succeeded", "Failed"],
        Duration::from_secs(180),
    );

    assert!(env.fails(&["plan", "resume", &id]).contains("not waiting"));
    // The job ran to its end and says which machine failed.
    assert_eq!(done["properties"]["state"], "Failed", "{done:#}");
    let err = done["properties"]["errors"][0]["serviceErrorDetails"].clone();
    assert_eq!(err["code"], "SomeMachinesFailed", "{done:#}");
    assert!(err["message"].as_str().unwrap().contains("app2"), "{err}");
    for n in ["db", "app1", "web"] {
        assert_eq!(
            machine_outcome(&done, n)["state"],
            "Succeeded",
            "{n}: {done:#}"
        );
        assert_eq!(state(&env, n), "UnplannedFailoverCompleted", "{n}");
    }
    let app2 = machine_outcome(&done, "app2");
    assert_eq!(app2["state"], "Failed", "{done:#}");
    assert_eq!(
        state(&env, "app2"),
        "Protected",
        "app2's failover was undone"
    );
    // The manual action's step kept the operator's words.
    let steps = done["properties"]["tasks"].as_array().unwrap();
    let confirm = steps
        .iter()
        .find(|s| s["name"].as_str().unwrap().contains("'confirm'"))
        .unwrap();
    assert_eq!(
        confirm["customDetails"]["output"]["comments"],
        "app checked"
    );
    let dns = steps
        .iter()
        .find(|s| s["name"].as_str().unwrap().contains("'dns'"))
        .unwrap();
    assert_eq!(
        dns["customDetails"]["output"]["stdout"],
        "script of group 2 done\n"
    );

    // Order: the pre-script before db's failover, the post-script after
    // both of group 2's machines, group 3 after the resume. The pre-script
    // may have run twice (the vault was killed while it ran and the agent
    // answered again from its record: one line).
    let lines = script_log(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (pre_ms, g, phase, ty, items) = lines[0].clone();
    assert_eq!(
        (g.as_str(), phase.as_str(), ty.as_str(), items.as_str()),
        ("1", "pre", "UnplannedFailover", "db")
    );
    let (post_ms, g, phase, _, items) = lines[1].clone();
    assert_eq!(
        (g.as_str(), phase.as_str(), items.as_str()),
        ("2", "post", "app1,app2")
    );
    let (db_start, db_end) = job_times(&job(&env, &format!("{id}-db")));
    assert!(
        pre_ms < db_start,
        "pre-script {pre_ms} before db {db_start}"
    );
    for n in ["app1", "app2"] {
        let (start, end) = job_times(&job(&env, &format!("{id}-{n}")));
        assert!(db_end <= start, "{n} starts after group 1 ended");
        assert!(end <= post_ms, "the post-script runs after {n} ended");
    }
    let (web_start, _) = job_times(&job(&env, &format!("{id}-web")));
    assert!(web_start >= resumed_at, "group 3 after the resume");

    // The machines that failed over have their disks; the VM's replica
    // runs with its data.
    for (n, d) in &shop.servers {
        if *n == "app2" {
            continue;
        }
        let it = item(&env, n);
        assert!(
            qemu_img_identical(d, &item_disk(&it, "raw"), "raw"),
            "{n}'s failover disk"
        );
    }
    assert_vm_verdict(&item(&env, "app1")["properties"]["providerSpecificDetails"]["failoverVm"]);

    // Restart: app2 can be written now; only it fails over again.
    std::fs::remove_file(&blocked).unwrap();
    env.json(&["jobs", "restart", &id]);
    let again = wait_job(
        &env,
        &id,
        &["Succeeded", "Failed"],
        Duration::from_secs(180),
    );
    assert_eq!(again["properties"]["state"], "Succeeded", "{again:#}");
    assert_eq!(state(&env, "app2"), "UnplannedFailoverCompleted");
    assert!(
        env.cli(&["--output", "json", "jobs", "show", &format!("{id}-r1-app2")])
            .status
            .success()
    );
    assert!(
        !env.cli(&["--output", "json", "jobs", "show", &format!("{id}-r1-db")])
            .status
            .success(),
        "db was not failed over twice"
    );

    // The plan commits its machines; the plan cannot be failed over now.
    let commit = start_plan(&env, &["plan", "commit", "shop"]);
    wait_job(&env, &commit, &["Succeeded"], Duration::from_secs(120));
    for n in MACHINES {
        assert_eq!(state(&env, n), "FailoverCommitted", "{n}");
    }
    let refused = env.fails(&["plan", "unplanned-failover", "shop"]);
    for n in MACHINES {
        assert!(refused.contains(&format!("item '{n}'")), "{refused}");
    }
    kill_vms_under(env.path("").as_path());
}

#[test]
fn a_plan_with_a_vm_is_test_failed_over_cleaned_up_and_failed_over_planned() {
    let mut env = Env::start();
    let shop = start_shop(&mut env, 200);
    let log = shop.log.clone();
    let file = plan_file(&env, "app1");
    env.json(&["plan", "create", "shop", "--file", file.to_str().unwrap()]);

    // Test failover: pauses at the manual action with group 3 not started.
    let id = start_plan(&env, &["plan", "test-failover", "shop"]);
    let paused = wait_job(&env, &id, &["Suspended"], Duration::from_secs(240));
    for n in ["db", "app1", "app2"] {
        assert_eq!(
            test_state(&env, n),
            "TestFailoverCompleted",
            "{n}: {paused:#}"
        );
    }
    assert_eq!(test_state(&env, "web"), "None");
    let shown = env.json(&["plan", "show", "shop"]);
    assert_eq!(
        shown["properties"]["currentScenarioStatus"], "Suspended",
        "{shown:#}"
    );
    env.json(&["plan", "resume", &id]);
    let done = wait_job(
        &env,
        &id,
        &["Succeeded", "Failed"],
        Duration::from_secs(180),
    );
    assert_eq!(done["properties"]["state"], "Succeeded", "{done:#}");
    assert_eq!(test_state(&env, "web"), "TestFailoverCompleted");
    // Each machine's test copy: the servers' disks as they are, the VM
    // booted with its data (the guest's verdict).
    for (n, d) in &shop.servers {
        let it = item(&env, n);
        let test_disks = it["properties"]["providerSpecificDetails"]["testDisks"].clone();
        let raw = test_disks
            .as_array()
            .and_then(|a| a.iter().find(|x| x["format"] == "raw"))
            .and_then(|x| x["path"].as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{n}: no raw test disk in {it:#}"));
        assert!(qemu_img_identical(d, &raw, "raw"), "{n}'s test copy");
    }
    let vm = item(&env, "app1")["properties"]["providerSpecificDetails"]["testVm"].clone();
    assert_vm_verdict(&vm);
    let lines = script_log(&log);
    assert_eq!(
        lines
            .iter()
            .map(|l| (l.1.as_str(), l.2.as_str(), l.3.as_str()))
            .collect::<Vec<_>>(),
        [("1", "pre", "TestFailover"), ("2", "post", "TestFailover")]
    );

    // Cleanup: no action runs for it, nothing pauses.
    let id = start_plan(
        &env,
        &["plan", "test-cleanup", "shop", "--comments", "drill ok"],
    );
    let done = wait_job(
        &env,
        &id,
        &["Succeeded", "Failed"],
        Duration::from_secs(180),
    );
    assert_eq!(done["properties"]["state"], "Succeeded", "{done:#}");
    for n in MACHINES {
        assert_eq!(test_state(&env, n), "None", "{n}");
    }
    assert!(
        !Path::new(vm["runDir"].as_str().unwrap()).exists(),
        "test VM removed"
    );
    assert_eq!(script_log(&log).len(), 2);

    // Planned failover: the VM is shut down by siterec, the servers are
    // stopped by the operator (--source-stopped).
    let id = start_plan(
        &env,
        &["plan", "planned-failover", "shop", "--source-stopped"],
    );
    wait_job(&env, &id, &["Suspended"], Duration::from_secs(300));
    env.json(&["plan", "resume", &id]);
    let done = wait_job(
        &env,
        &id,
        &["Succeeded", "Failed"],
        Duration::from_secs(180),
    );
    assert_eq!(done["properties"]["state"], "Succeeded", "{done:#}");
    for n in MACHINES {
        assert_eq!(state(&env, n), "PlannedFailoverCompleted", "{n}");
        assert_eq!(machine_outcome(&done, n)["state"], "Succeeded");
    }
    for (n, d) in &shop.servers {
        assert!(
            qemu_img_identical(d, &item_disk(&item(&env, n), "raw"), "raw"),
            "{n}'s failover disk"
        );
    }
    assert_vm_verdict(&item(&env, "app1")["properties"]["providerSpecificDetails"]["failoverVm"]);
    let lines = script_log(&log);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[2].3, "PlannedFailover");
    let shown = env.json(&["plan", "show", "shop"]);
    assert!(
        shown["properties"]["lastPlannedFailoverTime"].is_string(),
        "{shown:#}"
    );
    assert!(
        shown["properties"]["lastTestFailoverTime"].is_string(),
        "{shown:#}"
    );
    kill_vms_under(env.path("").as_path());
}
