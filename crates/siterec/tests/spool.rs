//! The source's disk spool: while the target is away, recovery points wait
//! on the source's disk and are shipped, in order and without resending
//! what the target has, when it is back; a spool that overflows makes the
//! item resynchronize (only differing blocks travel) with a health warning.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const ITEM: &str = "spool01";
const DISK: u64 = 64 << 20;

/// Both sites, one machine, a policy keeping an hour of points.
fn setup(
    env: &mut Env,
    disk: &Path,
    primary_settings: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dirs = env.start_sites_with(&[(ITEM, vec![("disk0", disk)])], primary_settings);
    env.pair(&["--retention-hours", "1"]);
    env.wait_machine(ITEM);
    env.enable(ITEM);
    env.wait_point_after(ITEM, 0, Duration::from_secs(120));
    dirs
}

fn warnings(agent: &Path) -> Vec<String> {
    agent_item(agent, ITEM)["healthWarnings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn item_health(env: &Env) -> (String, String) {
    let item = env.json(&["item", "show", ITEM]);
    let props = &item["properties"];
    (
        props["replicationHealth"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        props["replicationHealthErrors"].to_string(),
    )
}

fn file_hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

#[test]
fn outage_points_wait_in_the_spool_and_ship_in_order() {
    let mut env = Env::start();
    let disk = env.path("spool01.img");
    make_image(&disk, DISK, 11);
    let (primary, recovery) = setup(&mut env, &disk, "");
    let counter = |f: &str| agent_counter(&primary, ITEM, f);

    env.kill("recovery-agent");
    // Two versions of the disk, each captured into the spool.
    let t1 = now_ms();
    scribble(&disk, (3 << 20) + 4096, 256 << 10, 1);
    let v1 = file_hash(&disk);
    wait_until(Duration::from_secs(90), "a spooled point", || {
        counter("spoolPoints") >= 1
    });
    let t2 = now_ms();
    scribble(&disk, 40 << 20, 300 << 10, 2);
    let v2 = file_hash(&disk);
    wait_until(Duration::from_secs(90), "a second spooled point", || {
        counter("spoolPoints") >= 2
    });
    let spooled = counter("spoolPoints");
    assert!(counter("spoolBytes") > 256 << 10);
    assert!(
        warnings(&primary).iter().any(|w| w.contains("disk spool")),
        "no spool warning: {:?}",
        warnings(&primary)
    );
    wait_until(
        Duration::from_secs(30),
        "the vault to show the warning",
        || {
            let (health, errors) = item_health(&env);
            health == "Warning" && errors.contains("disk spool")
        },
    );

    let sent_before = counter("bytesSent");
    let resyncs_before = counter("resyncs");
    let back = now_ms();
    env.restart("recovery-agent");
    wait_until(Duration::from_secs(120), "the spool to drain", || {
        counter("spoolPoints") == 0
    });
    wait_until(
        Duration::from_secs(30),
        "the spooled points at the vault",
        || {
            env.points(ITEM).iter().any(|p| {
                let t = parse_ms(p["properties"]["recoveryPointTime"].as_str().unwrap_or(""));
                t > t2 && t < back
            })
        },
    );
    // Only the changes travelled: 556 KiB of random data in two blocks of
    // 1 MiB (shipped whole: more pages than a delta carries), whichever
    // spooled points carried them — not the disk's 64 MiB.
    let sent = counter("bytesSent") - sent_before;
    eprintln!("{spooled} spooled points shipped {sent} bytes after the outage");
    assert!(sent >= 556 << 10, "only {sent} bytes shipped");
    assert!(
        sent <= 3 << 20,
        "{sent} bytes shipped for 556 KiB of changes"
    );
    assert_eq!(
        counter("resyncs"),
        resyncs_before,
        "the spool must not resync"
    );
    wait_until(Duration::from_secs(30), "the warning to clear", || {
        !item_health(&env).1.contains("disk spool")
    });

    // Each point of the outage restores the disk as it was when captured.
    env.kill("primary-agent");
    let points = env.points(ITEM);
    env.kill("recovery-agent");
    let store = open_store(&recovery.join("store"));
    let (mut in_first, mut in_second) = (0, 0);
    for p in &points {
        let id = p["name"].as_str().unwrap();
        let t = parse_ms(p["properties"]["recoveryPointTime"].as_str().unwrap());
        let expected = if t > t1 && t < t2 {
            in_first += 1;
            v1
        } else if t > t2 && t < back {
            in_second += 1;
            v2
        } else {
            continue;
        };
        assert_eq!(
            restored_hash(&store, ITEM, id),
            expected,
            "point {id} at {t}"
        );
    }
    assert!(
        in_first >= 1 && in_second >= 1,
        "points of the outage: {points:?}"
    );
}

#[test]
fn overflowing_spool_resynchronizes_with_a_warning() {
    let mut env = Env::start();
    let disk = env.path("spool01.img");
    make_image(&disk, DISK, 12);
    let (primary, recovery) = setup(&mut env, &disk, "spool_max_mib = 1");
    let counter = |f: &str| agent_counter(&primary, ITEM, f);
    let initial_sent = counter("bytesSent");

    env.kill("recovery-agent");
    // 4 MiB of changes cannot fit a 1 MiB spool.
    scribble(&disk, 8 << 20, 4 << 20, 3);
    wait_until(
        Duration::from_secs(90),
        "the spool overflow warning",
        || {
            warnings(&primary)
                .iter()
                .any(|w| w.contains("resynchronization required") && w.contains("spool is full"))
        },
    );
    assert_eq!(counter("spoolPoints"), 0, "an overflowed spool is dropped");
    wait_until(
        Duration::from_secs(30),
        "the vault to show the warning",
        || {
            let (health, errors) = item_health(&env);
            health == "Warning" && errors.contains("resynchronization required")
        },
    );

    let sent_before = counter("bytesSent");
    let resyncs_before = counter("resyncs");
    let back = now_ms();
    env.restart("recovery-agent");
    let point = env.wait_point_after(ITEM, back, Duration::from_secs(120));
    wait_until(Duration::from_secs(10), "the resync counter", || {
        counter("resyncs") > resyncs_before
    });
    let sent = counter("bytesSent") - sent_before;
    eprintln!(
        "initial replication sent {initial_sent} bytes; the resynchronization sent {sent} bytes"
    );
    // Only the blocks that differ travel, not the disk.
    assert!(sent >= 4 << 20, "the changes must travel: {sent} bytes");
    assert!(
        sent <= 5 << 20,
        "the resync sent {sent} bytes for 4 MiB of changes"
    );
    assert!(warnings(&primary).is_empty(), "{:?}", warnings(&primary));
    wait_until(Duration::from_secs(30), "the warning to clear", || {
        !item_health(&env).1.contains("resynchronization")
    });

    env.kill("primary-agent");
    env.kill("recovery-agent");
    let store = open_store(&recovery.join("store"));
    assert_eq!(restored_hash(&store, ITEM, &point), file_hash(&disk));
}
