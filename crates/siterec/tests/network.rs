//! Networks and network mapping through real processes: agents report
//! their VM networks, the CLI maps them (and is refused clearly when the
//! mapping cannot be), VMs show their NICs, and test failover refuses what
//! the recovery site cannot boot. (Booting replica VMs needs the recovery
//! agent's compute driver, which is tested with it.)

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn networks_are_reported_mapped_and_unmapped_and_bad_input_changes_nothing() {
    let mut env = Env::start();
    let disk = env.path("phys1.img");
    make_image(&disk, 4 << 20, 7);
    let vm_disk = env.path("vm1.img");
    std::fs::write(&vm_disk, vec![0u8; 1 << 20]).unwrap();
    let primary = format!(
        r#"cloud = "primary-cloud"
[[machines]]
name = "phys1"
disks = [ {{ name = "disk0", path = "{}" }} ]
[[vms]]
name = "vm1"
memory_mib = 128
cpus = 1
disks = [ {{ name = "vda", path = "{}", format = "raw" }} ]
nics = [ {{ name = "eth0", network = "prod-lan", mac = "52:54:00:12:34:56" }}, {{ name = "eth1", network = "backup" }} ]
[[networks]]
name = "spare"
"#,
        disk.display(),
        vm_disk.display()
    );
    env.start_agent("primary", &primary);
    env.start_agent(
        "recovery",
        "cloud = \"recovery-cloud\"\n[[networks]]\nname = \"dr-lan\"\n[[networks]]\nname = \"test-net\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.wait_cloud("primary", "primary-cloud");
    env.wait_cloud("recovery", "recovery-cloud");

    // Each site's networks, as its agents report them.
    wait_until(Duration::from_secs(30), "the networks", || {
        let out = env.cli(&["--output", "json", "network", "list"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .map(|v| names(&v).len() == 5)
                .unwrap_or(false)
    });
    let recovery = env.json(&["network", "list", "--fabric", "recovery"]);
    assert_eq!(names(&recovery), ["dr-lan", "test-net"]);
    let primary_nets = env.json(&["network", "list", "--fabric", "primary"]);
    assert_eq!(names(&primary_nets), ["backup", "prod-lan", "spare"]);
    let err = env.fails(&["network", "list", "--fabric", "nowhere"]);
    assert!(err.contains("fabric 'nowhere' was not found"), "{err}");

    // The VM is offered with its NICs.
    env.wait_machine("vm1");
    let machines = env.json(&[
        "machine",
        "list",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
    ]);
    let vm = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "vm1")
        .unwrap();
    let d = &vm["properties"]["customDetails"];
    assert_eq!(d["instanceType"], "VirtualMachine", "{vm}");
    assert_eq!(d["vmNics"][0]["nicId"], "eth0");
    assert_eq!(d["vmNics"][0]["vMNetworkName"], "prod-lan");
    assert_eq!(d["vmNics"][0]["macAddress"], "52:54:00:12:34:56");
    assert_eq!(d["vmNics"][1]["vMNetworkName"], "backup");
    let table = env.cli(&[
        "machine",
        "list",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
    ]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("eth0: prod-lan"), "{table}");

    // Mappings that cannot be: each refused, naming what is wrong.
    let map = |network: &str, rf: &str, rn: &str| -> Vec<String> {
        [
            "network",
            "map",
            "--fabric",
            "primary",
            "--network",
            network,
            "--recovery-fabric",
            rf,
            "--recovery-network",
            rn,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    for (args, needle) in [
        (
            map("prod-lan", "recovery", "nowhere"),
            "recovery network 'nowhere' is not reported by any agent of fabric 'recovery' (its networks: dr-lan, test-net)",
        ),
        (
            map("prod-lan", "mars", "dr-lan"),
            "recovery fabric 'mars' does not exist",
        ),
        (
            map("nope", "recovery", "dr-lan"),
            "network 'nope' is not reported by any agent of fabric 'primary'",
        ),
    ] {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = env.fails(&refs);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.contains("400") || err.contains("404"), "{err}");
    }
    assert_eq!(env.json(&["network", "mappings"]), Value::Array(vec![]));

    // A mapping, then a second one for the same network is refused.
    let args = map("prod-lan", "recovery", "dr-lan");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let op = env.json(&refs);
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert_eq!(op["result"]["name"], "prod-lan-to-dr-lan");
    let mappings = env.json(&["network", "mappings"]);
    let m = &mappings[0]["properties"];
    assert_eq!(m["state"], "Paired", "{mappings}");
    assert_eq!(m["primaryNetworkFriendlyName"], "prod-lan");
    assert_eq!(m["recoveryNetworkFriendlyName"], "dr-lan");
    assert_eq!(m["recoveryFabricFriendlyName"], "recovery");
    assert_eq!(m["fabricSpecificSettings"]["instanceType"], "VmmToVmm");
    let args = map("prod-lan", "recovery", "test-net");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = env.fails(&refs);
    assert!(
        err.contains("already mapped to recovery/dr-lan") && err.contains("409"),
        "{err}"
    );
    assert_eq!(
        env.json(&["network", "mappings"]).as_array().unwrap().len(),
        1
    );

    // Removed, and a second removal says there is nothing to remove.
    let op = env.json(&[
        "network",
        "unmap",
        "--fabric",
        "primary",
        "--network",
        "prod-lan",
    ]);
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert_eq!(env.json(&["network", "mappings"]), Value::Array(vec![]));
    let err = env.fails(&[
        "network",
        "unmap",
        "--fabric",
        "primary",
        "--network",
        "prod-lan",
    ]);
    assert!(err.contains("has no mapping"), "{err}");

    // A physical server's test copy is its disks, with no network: a
    // network is refused, and there is nothing to clean up; neither
    // creates a job.
    env.pair(&["--retention-hours", "1"]);
    env.wait_machine("phys1");
    env.enable("phys1");
    let jobs_before = env.json(&["jobs", "list"]).as_array().unwrap().len();
    let err = env.fails(&["failover", "test", "phys1", "--network", "dr-lan"]);
    assert!(
        err.contains("attaches no network") && err.contains("400"),
        "{err}"
    );
    let err = env.fails(&["failover", "test-cleanup", "phys1"]);
    assert!(
        err.contains("no test failover to clean up") && err.contains("409"),
        "{err}"
    );
    assert_eq!(
        env.json(&["jobs", "list"]).as_array().unwrap().len(),
        jobs_before
    );
    let item = env.json(&["item", "show", "phys1"]);
    assert_eq!(item["properties"]["testFailoverState"], "None");
    assert_eq!(item["properties"]["protectionState"], "Protected");
}
