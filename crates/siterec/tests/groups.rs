//! Multi-VM consistency groups through real processes: two physical
//! servers of one agent are protected in one group and show it; a machine
//! of another agent at the same site and in the same cloud cannot join
//! that group (its points could not be taken at the same instant), and a
//! bad group name is refused; neither writes anything. (Taking a group's
//! points together is the source agent's work, tested with it.)

mod common;

use common::*;

fn enable_args<'a>(machine: &'a str, group: &'a str) -> Vec<&'a str> {
    vec![
        "item",
        "enable",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--machine",
        machine,
        "--group",
        group,
    ]
}

#[test]
fn machines_of_one_agent_share_a_group_and_another_agents_machine_is_refused() {
    let mut env = Env::start();
    let disks: Vec<_> = (1..=3)
        .map(|i| {
            let p = env.path(&format!("s{i}.img"));
            make_image(&p, 1 << 20, i);
            p
        })
        .collect();
    env.start_sites(&[
        ("s1", vec![("disk0", disks[0].as_path())]),
        ("s2", vec![("disk0", disks[1].as_path())]),
    ]);
    // A second agent at the primary site, in the same cloud, with s3.
    let key = env.path("primary2.key");
    env.json(&[
        "vault",
        "key",
        "create",
        "--fabric",
        "primary",
        "--out",
        key.to_str().unwrap(),
    ]);
    let cfg = env.path("primary2-agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "cloud = \"primary-cloud\"\n[[machines]]\nname = \"s3\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
            disks[2].display()
        ),
    )
    .unwrap();
    let data = env.path("primary2-agent");
    env.spawn(
        "primary2-agent",
        &[
            "agent",
            "--key",
            key.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    env.pair(&[]);
    for m in ["s1", "s2", "s3"] {
        env.wait_machine(m);
    }

    // Both of the first agent's servers join group "app" and replicate.
    for m in ["s1", "s2"] {
        let out = env.json(&enable_args(m, "app"));
        assert_eq!(out["status"], "Succeeded", "{out}");
        let item = env.json(&["item", "show", m]);
        let d = &item["properties"]["providerSpecificDetails"];
        assert_eq!(d["multiVmGroupName"], "app", "{item}");
        assert_eq!(d["multiVmGroupId"], "app", "{item}");
        assert_eq!(item["properties"]["protectionState"], "Protected");
    }
    let show = env.cli(&["item", "show", "s2"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("GROUP") && l.contains("app")),
        "{text}"
    );
    let list = env.cli(&["item", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("GROUP"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| (l.contains("s1") || l.contains("s2")) && l.contains("app"))
            .count(),
        2,
        "{text}"
    );

    // s3 is on the other agent: refused, saying why; nothing written.
    let err = env.fails(&enable_args("s3", "app"));
    assert!(
        err.contains("409")
            && err.contains("machine 's3' is on agent")
            && err.contains("multi-VM group 'app' is replicated by agent")
            && err.contains("one instant by one source agent"),
        "{err}"
    );
    let err = env.fails(&enable_args("s3", "bad name"));
    assert!(
        err.contains("400") && err.contains("multi-VM group name \"bad name\" is not valid"),
        "{err}"
    );
    let items = env.json(&["item", "list"]);
    let names: Vec<&str> = items
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{items}");
    assert!(!names.contains(&"s3"), "{items}");
}
