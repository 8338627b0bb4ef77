//! Continuous replication (copy frequency below the seeds' 30 s): points
//! follow each other every few seconds and the item reports the achieved
//! RPO.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_five_second_policy_keeps_the_rpo_within_seconds() {
    let mut env = Env::start();
    let disk = env.path("c1.img");
    make_image(&disk, 8 << 20, 5);
    env.start_sites(&[("c1", vec![("disk0", disk.as_path())])]);
    env.json(&[
        "policy",
        "create",
        "fast",
        "--copy-frequency",
        "5",
        "--retention-hours",
        "1",
    ]);
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
    env.wait_machine("c1");
    env.enable("c1");
    let start = now_ms();
    // Changes keep coming; each is in a point within seconds.
    for round in 0..3u64 {
        scribble(&disk, round << 20, 64 << 10, 100 + round);
        let changed = now_ms();
        env.wait_point_after("c1", changed, Duration::from_secs(20));
        assert!(
            now_ms() - changed < 15_000,
            "round {round}: {} ms",
            now_ms() - changed
        );
    }
    let points = env.points("c1");
    let recent = points
        .iter()
        .filter(|p| {
            parse_ms(
                p["properties"]["recoveryPointTime"]
                    .as_str()
                    .unwrap_or_default(),
            ) > start
        })
        .count();
    assert!(recent >= 3, "{recent} points since enabling");
    let item = env.json(&["item", "show", "c1"]);
    let rpo = item["properties"]["providerSpecificDetails"]["rpoInSeconds"]
        .as_i64()
        .or_else(|| item["properties"]["rpoInSeconds"].as_i64())
        .unwrap_or_else(|| panic!("no rpoInSeconds in {item}"));
    assert!(rpo <= 10, "achieved RPO {rpo} s\n{item}");
    // The seeds' other values still hold, and nonsense is still refused.
    let err = env.fails(&["policy", "create", "bad", "--copy-frequency", "7"]);
    assert!(err.contains("5, 10 or 15"), "{err}");
}
