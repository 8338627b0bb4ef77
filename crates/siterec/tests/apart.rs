//! Taking things apart through real processes, and jobs filtered and
//! exported: with a protected server, the CLI's deletes of its pairing,
//! agent, fabric and policy are refused naming what uses them; jobs are
//! listed by type, state, item and time and exported as CSV (parsed back:
//! the rows `jobs list` gives); then protection is disabled and each thing
//! goes in turn — the unregistered agent stops at its next heartbeat — and
//! the site is built again with a new agent.

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

/// The rows of a CSV export (RFC 4180 as the vault writes it: quoted
/// fields may hold commas, doubled quotes and line breaks).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(field.is_empty() && row.is_empty(), "the CSV ends mid-row");
    rows
}

#[test]
fn things_are_taken_apart_only_when_unused_and_jobs_are_filtered_and_exported() {
    let mut env = Env::start();
    let disk = env.path("web01.img");
    make_image(&disk, 4 << 20, 11);
    let _ = env.protect("web01", &disk, &["--retention-hours", "1"]);
    let agents = env.json(&["fabric", "agents", "primary"]);
    let agent = names(&agents).pop().expect("the primary agent");

    // Each refusal names what is in use, and changes nothing.
    let err = env.fails(&[
        "pairing",
        "delete",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
    ]);
    assert!(err.contains("protects 1 item(s): web01"), "{err}");
    let err = env.fails(&["agent", "unregister", "--fabric", "primary", &agent]);
    assert!(
        err.contains("in use by 1 protected item(s): web01"),
        "{err}"
    );
    let err = env.fails(&["fabric", "delete", "recovery"]);
    assert!(err.contains("fabric 'recovery' is in use"), "{err}");
    assert!(err.contains("protected items web01"), "{err}");
    let err = env.fails(&["policy", "delete", "pol"]);
    assert!(
        err.contains("pairing primary-cloud-to-recovery-cloud"),
        "{err}"
    );
    let err = env.fails(&["agent", "unregister", "--fabric", "primary", "agent-nobody"]);
    assert!(err.contains("has no agent 'agent-nobody'"), "{err}");
    assert_eq!(names(&env.json(&["pairing", "list"])).len(), 1);
    assert_eq!(
        names(&env.json(&["fabric", "agents", "primary"])),
        std::slice::from_ref(&agent)
    );

    // Jobs by type, state, item and time.
    let all = env.json(&["jobs", "list"]);
    assert!(names(&all).len() >= 3, "{all}");
    let enable = env.json(&["jobs", "list", "--type", "EnableDr", "--state", "Succeeded"]);
    assert_eq!(names(&enable).len(), 1, "{enable}");
    assert_eq!(enable[0]["properties"]["targetObjectName"], "web01");
    let of_item = env.json(&["jobs", "list", "--item", "web01"]);
    assert_eq!(names(&of_item), names(&enable));
    assert!(names(&env.json(&["jobs", "list", "--state", "Failed"])).is_empty());
    assert!(names(&env.json(&["jobs", "list", "--since", "2999-01-01T00:00:00Z"])).is_empty());
    let recent = env.json(&["jobs", "list", "--since", "1h"]);
    assert_eq!(names(&recent), names(&all));
    let err = env.fails(&["jobs", "list", "--state", "Broken"]);
    assert!(err.contains("jobStatus eq 'Broken'"), "{err}");
    let err = env.fails(&["jobs", "list", "--since", "last tuesday"]);
    assert!(err.contains("startTime eq 'last tuesday'"), "{err}");

    // Exported as CSV: to a file, the same rows as the list, newest first.
    let csv_path = env.path("jobs.csv");
    let out = env.cli(&[
        "jobs",
        "export",
        "--csv",
        "--out",
        &csv_path.display().to_string(),
        "--since",
        "1h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = parse_csv(&std::fs::read_to_string(&csv_path).unwrap());
    assert_eq!(
        rows[0][..4],
        ["Id", "ScenarioName", "FriendlyName", "State"]
    );
    let ids: Vec<String> = rows[1..].iter().map(|r| r[0].clone()).collect();
    assert_eq!(ids, names(&all));
    for r in &rows[1..] {
        assert_eq!(r.len(), rows[0].len(), "{r:?}");
        assert_eq!(r[3], "Succeeded", "{r:?}");
    }
    // To stdout, filtered.
    let out = env.cli(&["jobs", "export", "--csv", "--type", "EnableDr"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = parse_csv(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[1][1].as_str(), rows[1][4].as_str()),
        ("EnableDr", "web01")
    );
    // The export is itself a job.
    let exports = env.json(&["jobs", "list", "--type", "ExportJobs"]);
    assert_eq!(names(&exports).len(), 2, "{exports}");

    // Taken apart, in order.
    let out = env.json(&["item", "disable", "web01"]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    let out = env.json(&[
        "pairing",
        "delete",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
    ]);
    assert_eq!(out["status"], "Succeeded", "{out}");
    assert!(names(&env.json(&["pairing", "list"])).is_empty());
    env.json(&["policy", "delete", "pol"]);
    env.json(&["agent", "unregister", "--fabric", "primary", &agent]);
    // The agent hears it at its next heartbeat and stops.
    let log = env.path("primary-agent.log");
    wait_until(Duration::from_secs(30), "the primary agent to stop", || {
        let p = env
            .procs
            .iter_mut()
            .find(|p| p.name == "primary-agent")
            .unwrap();
        matches!(p.child.try_wait(), Ok(Some(_)))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("is not registered with this vault"), "{text}");
    assert!(names(&env.json(&["fabric", "agents", "primary"])).is_empty());
    let err = env.fails(&["fabric", "delete", "nowhere"]);
    assert!(err.contains("'nowhere'"), "{err}");
    env.json(&["fabric", "delete", "primary"]);
    let fabrics = env.json(&["fabric", "list"]);
    assert_eq!(names(&fabrics), ["recovery"]);

    // Built again: a new agent enrols into the site made again, and the
    // clouds pair again.
    let key = env.path("primary2.key");
    let k = key.display().to_string();
    env.json(&["vault", "key", "create", "--fabric", "primary", "--out", &k]);
    let cfg = env.path("primary2-agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "cloud = \"primary-cloud\"\n[[machines]]\nname = \"web01\"\ndisks = [ {{ name = \"disk0\", path = \"{}\" }} ]\n",
            disk.display()
        ),
    )
    .unwrap();
    let data = env.path("primary2-agent").display().to_string();
    let c = cfg.display().to_string();
    env.spawn(
        "primary2-agent",
        &["agent", "--key", &k, "--data", &data, "--config", &c],
    );
    env.wait_cloud("primary", "primary-cloud");
    env.pair(&["--retention-hours", "1"]);
    let pairings = env.json(&["pairing", "list"]);
    assert_eq!(pairings[0]["properties"]["state"], "Paired", "{pairings}");
    env.wait_machine("web01");
}
