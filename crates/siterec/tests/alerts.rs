//! Events and alerts through real processes (a vault and two agents): a
//! webhook receiver started by the test — a plain HTTP server on loopback
//! whose first answer is a 503, so the vault must retry — is set as the
//! alert settings' webhook with the CLI. The item's policy replicates
//! continuously (5 s) with an RPO threshold of 20 s (siterec's
//! `rpoThresholdInSeconds`; the ARM field is in minutes). Stopping the
//! source agent holds replication back: the receiver gets the
//! RPO-threshold alert for the item and the server-not-heard-from alert
//! for the agent, each once; starting it again brings the Info events
//! that end both. `siterec events list` shows the same events, filtered
//! by severity, item and time. A webhook that is not http(s) is refused.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// What the receiver got: every request's body (JSON), in order, and
/// the number of requests it refused.
#[derive(Default)]
struct Received {
    bodies: Vec<Value>,
    refused: usize,
}

/// A webhook receiver on loopback: answers the first request 503 and the
/// others 200.
fn start_receiver() -> (String, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/siterec", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Received::default()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0usize;
            let mut json_type = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("content-type:") && lower.contains("application/json") {
                    json_type = true;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            assert!(
                request_line.starts_with("POST /hooks/siterec "),
                "{request_line}"
            );
            assert!(json_type, "the event is sent as application/json");
            let mut r = g.lock().unwrap();
            let status = if r.refused == 0 {
                r.refused += 1;
                "503 Service Unavailable"
            } else {
                r.bodies.push(serde_json::from_slice(&body).unwrap());
                "200 OK"
            };
            drop(r);
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (url, got)
}

fn codes(got: &Arc<Mutex<Received>>) -> Vec<(String, String, String)> {
    got.lock()
        .unwrap()
        .bodies
        .iter()
        .map(|e| {
            let p = &e["properties"];
            (
                p["eventCode"].as_str().unwrap_or_default().to_string(),
                p["severity"].as_str().unwrap_or_default().to_string(),
                p["affectedObjectFriendlyName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

fn received(got: &Arc<Mutex<Received>>, code: &str) -> Vec<Value> {
    got.lock()
        .unwrap()
        .bodies
        .iter()
        .filter(|e| e["properties"]["eventCode"] == code)
        .cloned()
        .collect()
}

fn wait_for(env: &Env, got: &Arc<Mutex<Received>>, code: &str) -> Value {
    wait_until(Duration::from_secs(90), &format!("a {code} event"), || {
        !received(got, code).is_empty()
    });
    let _ = env;
    received(got, code).remove(0)
}

#[test]
fn a_webhook_gets_the_rpo_and_not_heard_from_alerts_once_each_and_their_end() {
    let mut env = Env::start();
    let disks = env.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let web = disks.join("web01.img");
    make_image(&web, 16 << 20, 7);
    env.start_sites(&[("web01", vec![("disk0", &web)])]);

    // Alert settings: a webhook that is not http(s) is refused, changing nothing.
    let err = env.fails(&["alerts", "set", "--webhook", "ftp://127.0.0.1/x"]);
    assert!(
        err.contains("webhookUrl") && err.contains("http://"),
        "{err}"
    );
    let err = env.fails(&["alerts", "set", "--email", "not-an-address"]);
    assert!(err.contains("not-an-address"), "{err}");
    let shown = env.json(&["alerts", "show"]);
    assert!(shown["properties"]["webhookUrl"].is_null(), "{shown}");
    let (url, got) = start_receiver();
    let set = env.json(&[
        "alerts",
        "set",
        "--email",
        "ops@example.com",
        "--webhook",
        &url,
    ]);
    assert_eq!(set["properties"]["webhookUrl"], url.as_str());
    let shown = env.json(&["alerts", "show"]);
    assert_eq!(
        shown["properties"]["customEmailAddresses"][0],
        "ops@example.com"
    );
    assert_eq!(shown["properties"]["webhookUrl"], url.as_str());

    // A threshold under the copy frequency would alert every cycle: refused.
    let err = env.fails(&[
        "policy",
        "create",
        "bad",
        "--copy-frequency",
        "30",
        "--rpo-threshold-secs",
        "10",
    ]);
    assert!(err.contains("below the copy frequency"), "{err}");
    let pol = env.json(&[
        "policy",
        "create",
        "fast",
        "--copy-frequency",
        "5",
        "--retention-hours",
        "1",
        "--rpo-threshold-secs",
        "20",
    ]);
    let details = &pol["result"]["properties"]["providerSpecificDetails"];
    assert_eq!(details["rpoThresholdInSeconds"], 20, "{pol}");
    assert_eq!(details["recoveryPointThresholdInMinutes"], 1, "{pol}");
    env.json(&[
        "pairing",
        "create",
        "--fabric",
        "primary",
        "--cloud",
        "primary-cloud",
        "--target-fabric",
        "recovery",
        "--target-cloud",
        "recovery-cloud",
        "--policy",
        "fast",
    ]);
    env.wait_machine("web01");
    env.enable("web01");
    // Replicating every 5 s: a while with no RPO alert and no silent server.
    std::thread::sleep(Duration::from_secs(12));
    let before: Vec<_> = codes(&got)
        .into_iter()
        .filter(|(c, _, _)| c == "RpoThresholdExceeded" || c == "ServerNotHeardFrom")
        .collect();
    assert!(before.is_empty(), "alerts while replicating: {before:?}");
    let enabled_ms = now_ms();

    // Hold replication back: stop the source agent.
    env.kill("primary-agent");
    let silent = wait_for(&env, &got, "ServerNotHeardFrom");
    let p = &silent["properties"];
    assert_eq!(p["severity"], "Critical", "{silent}");
    assert_eq!(p["eventType"], "Server", "{silent}");
    assert!(
        p["fabricId"]
            .as_str()
            .unwrap()
            .ends_with("/replicationFabrics/primary"),
        "{silent}"
    );
    assert!(
        p["description"]
            .as_str()
            .unwrap()
            .contains("not been heard from")
    );
    let rpo = wait_for(&env, &got, "RpoThresholdExceeded");
    let p = &rpo["properties"];
    assert_eq!(p["severity"], "Warning", "{rpo}");
    assert_eq!(p["affectedObjectFriendlyName"], "web01", "{rpo}");
    assert_eq!(
        p["eventSpecificDetails"]["rpoThresholdInSeconds"], 20,
        "{rpo}"
    );
    assert!(
        p["eventSpecificDetails"]["rpoInSeconds"].as_i64().unwrap() > 20,
        "{rpo}"
    );
    assert!(
        rpo["id"].as_str().unwrap().ends_with(&format!(
            "/replicationEvents/{}",
            rpo["name"].as_str().unwrap()
        )),
        "{rpo}"
    );
    // The item says so too.
    let item = env.json(&["item", "show", "web01"]);
    assert_eq!(item["properties"]["replicationHealth"], "Warning", "{item}");
    // Edge-triggered: a while later, still one of each.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        received(&got, "ServerNotHeardFrom").len(),
        1,
        "{:?}",
        codes(&got)
    );
    assert_eq!(
        received(&got, "RpoThresholdExceeded").len(),
        1,
        "{:?}",
        codes(&got)
    );

    // Back: the agent heartbeats and replicates again.
    env.restart("primary-agent");
    let heard = wait_for(&env, &got, "ServerHeardFrom");
    assert_eq!(heard["properties"]["severity"], "Info");
    assert_eq!(
        heard["properties"]["affectedObjectCorrelationId"],
        silent["properties"]["affectedObjectCorrelationId"]
    );
    let within = wait_for(&env, &got, "RpoWithinThreshold");
    assert_eq!(within["properties"]["severity"], "Info");
    assert_eq!(within["properties"]["affectedObjectFriendlyName"], "web01");

    // The first delivery was refused (503) and retried: nothing lost,
    // every event delivered (at least once) is one the vault lists.
    assert_eq!(got.lock().unwrap().refused, 1);
    let listed = env.json(&["events", "list"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for body in &got.lock().unwrap().bodies {
        assert!(
            names.contains(&body["name"].as_str().unwrap()),
            "{body} not in {listed}"
        );
    }
    for code in [
        "ServerNotHeardFrom",
        "RpoThresholdExceeded",
        "ServerHeardFrom",
        "RpoWithinThreshold",
    ] {
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["properties"]["eventCode"] == code),
            "{code} not listed: {listed}"
        );
    }

    // Filters: by severity, by item, by time.
    let critical = env.json(&["events", "list", "--severity", "critical"]);
    let critical = critical.as_array().unwrap();
    assert!(!critical.is_empty());
    assert!(
        critical
            .iter()
            .all(|e| e["properties"]["severity"] == "Critical"),
        "{critical:?}"
    );
    let of_item = env.json(&["events", "list", "--item", "web01"]);
    let of_item = of_item.as_array().unwrap();
    assert!(of_item.len() >= 2, "{of_item:?}");
    assert!(
        of_item
            .iter()
            .all(|e| e["properties"]["affectedObjectFriendlyName"] == "web01"),
        "{of_item:?}"
    );
    let since = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(enabled_ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let recent = env.json(&["events", "list", "--since", &since]);
    assert!(
        recent.as_array().unwrap().iter().all(|e| parse_ms(
            e["properties"]["timeOfOccurrence"].as_str().unwrap()
        ) >= enabled_ms - 1000),
        "{recent}"
    );
    let none = env.json(&["events", "list", "--since", "0s", "--item", "nothing-here"]);
    assert_eq!(none.as_array().unwrap().len(), 0, "{none}");
    let err = env.fails(&["events", "list", "--severity", "loud"]);
    assert!(err.contains("Critical, Warning, Info"), "{err}");
    let one = &listed.as_array().unwrap()[0];
    let shown = env.json(&["events", "show", one["name"].as_str().unwrap()]);
    assert_eq!(shown["name"], one["name"]);
}
