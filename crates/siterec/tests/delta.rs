//! Only changed blocks travel: after initial replication of a 1 GiB image,
//! changing 1 MiB makes the next cycle send at most 2 MiB of chunk data,
//! read from the source agent's own counters.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn one_mib_change_sends_at_most_two_mib() {
    let mut env = Env::start();
    let disk = env.path("big.img");
    make_image(&disk, 1 << 30, 3);
    let (primary, _) = env.protect("big", &disk, &["--recovery-points", "3"]);

    let status = |field: &str| -> u64 {
        let p = primary.display().to_string();
        let out = std::process::Command::new(BIN)
            .args(["--output", "json", "agent", "status", "--data", &p])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["items"]["big"][field].as_u64().unwrap_or(0)
    };
    let initial = status("bytesSent");
    // 60% of the image holds data; compression shrinks the text part.
    assert!(
        initial > 200 << 20,
        "initial replication sent only {initial} bytes"
    );
    assert!(status("bytesRead") >= 1 << 30);

    // 1 MiB of new random data at an offset that straddles two blocks.
    scribble(&disk, (300 << 20) + 100_000, 1 << 20, 42);
    let changed = now_ms();
    let sent_before = status("bytesSent");
    let cycles_before = status("cycles");
    env.wait_point_after("big", changed, Duration::from_secs(120));
    wait_until(Duration::from_secs(10), "the counters", || {
        status("cycles") > cycles_before
    });
    // Everything sent since the change (whichever cycles carried it).
    let sent = status("bytesSent") - sent_before;
    eprintln!("initial replication sent {initial} bytes; the 1 MiB change sent {sent} bytes");
    assert!(
        sent >= 1 << 20,
        "the change itself must travel: only {sent} bytes sent"
    );
    assert!(
        sent <= 2 << 20,
        "the cycle sent {sent} bytes for a 1 MiB change"
    );
}

/// Scattered 4 KiB writes ship as delta chunks (the changed pages only, not
/// their 1 MiB blocks), and the point still restores byte-identical.
#[test]
fn scattered_page_writes_ship_only_the_pages() {
    use rand::{Rng, SeedableRng};
    let mut env = Env::start();
    let disk = env.path("pages.img");
    make_image(&disk, 256 << 20, 4);
    let (primary, recovery) = env.protect("pages", &disk, &["--recovery-points", "3"]);
    let counter = |f: &str| agent_counter(&primary, "pages", f);

    // Two rounds of 64 random 4 KiB pages: the second round's deltas build
    // on the same bases as the first's.
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut last = String::new();
    for round in 0..2u64 {
        for k in 0..64u64 {
            let page = rng.random_range(0..(256u64 << 20) / 4096);
            scribble(&disk, page * 4096, 4096, round * 1000 + k);
        }
        let changed = now_ms();
        let sent_before = counter("bytesSent");
        let cycles_before = counter("cycles");
        last = env.wait_point_after("pages", changed, Duration::from_secs(120));
        wait_until(Duration::from_secs(10), "the counters", || {
            counter("cycles") > cycles_before
        });
        let sent = counter("bytesSent") - sent_before;
        eprintln!("round {round}: 64 scattered 4 KiB pages sent {sent} bytes");
        // Whole blocks would be 64 × 1 MiB = 64 MiB.
        assert!(sent >= 64 * 4096, "the pages must travel: {sent} bytes");
        assert!(sent <= 3 * 64 * 4096, "{sent} bytes for 64 changed pages");
    }
    env.kill("primary-agent");
    env.kill("recovery-agent");
    let store = open_store(&recovery.join("store"));
    assert_eq!(
        restored_hash(&store, "pages", &last),
        blake3::hash(&std::fs::read(&disk).unwrap())
    );
    let report = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(store.verify())
        .unwrap();
    assert!(report.all_ok(), "{report:?}");
}
