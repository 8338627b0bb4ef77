//! The way there and back survives SIGKILLs: rounds of planned failover
//! and reprotect, alternately from the primary site and back (failback),
//! each started and then hit by a SIGKILL of the primary agent, the
//! recovery agent or the vault at a seeded random moment. Every operation
//! resumes or fails cleanly with its job saying which (and a failed one
//! leaves the item where it was, to be run again); after each failover the
//! copy the machine now runs on is byte-identical to the disk as it was
//! when it stopped (`qemu-img compare`), so no acknowledged write is lost.
//!
//! `SITEREC_CYCLE_KILLS` (default 30) and `SITEREC_CRASH_SEED` (default 7)
//! change the run.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const DISK: u64 = 16 << 20;
const NAMES: [&str; 3] = ["primary-agent", "recovery-agent", "vault"];

fn job_state(env: &Env, job: &str) -> Option<Value> {
    let out = env.cli(&["--output", "json", "jobs", "show", job]);
    if !out.status.success() {
        return None; // the vault is restarting
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits for the job to end; `true` if it succeeded.
fn wait_job(env: &Env, job: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(j) = job_state(env, job) {
            match j["properties"]["state"].as_str() {
                Some("Succeeded") => return true,
                Some("Failed") | Some("Canceled") => {
                    let errors = &j["properties"]["errors"];
                    eprintln!("job {job} failed cleanly: {errors}");
                    assert!(
                        !errors.as_array().is_none_or(|e| e.is_empty()),
                        "a failed job says why: {j}"
                    );
                    return false;
                }
                _ => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {job} did not end: {:#}\n{}",
            job_state(env, job).unwrap_or_default(),
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Starts `args` (an item operation with --no-wait), SIGKILLs a victim at
/// a random moment while it runs, and waits for its job; the operation is
/// run again (without a kill) until it succeeds. Returns the kills made.
fn run_killed(env: &mut Env, rng: &mut impl Rng, args: &[&str], log: &mut Vec<String>) -> usize {
    let mut kills = 0;
    let mut attempt = 0;
    loop {
        let mut full: Vec<&str> = args.to_vec();
        full.push("--no-wait");
        let out = env.json(&full);
        let job = out["jobId"].as_str().expect("a job id").to_string();
        if attempt == 0 {
            let victim = rng.random_range(0..3);
            std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
            env.kill_and_restart(NAMES[victim]);
            kills += 1;
            log.push(format!("{}: killed {}", args.join(" "), NAMES[victim]));
            eprintln!("{}", log.last().unwrap());
            if NAMES[victim] == "vault" {
                wait_until(Duration::from_secs(30), "the vault to come back", || {
                    env.cli(&["fabric", "list"]).status.success()
                });
            }
        }
        if wait_job(env, &job) {
            return kills;
        }
        attempt += 1;
        assert!(
            attempt < 4,
            "{args:?} failed {attempt} times\n{}",
            env.logs()
        );
    }
}

fn item(env: &Env) -> Value {
    env.json(&["item", "show", "web01"])
}

fn snapshot(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

#[test]
fn sigkill_during_planned_failover_reprotect_and_failback_loses_nothing() {
    let kills: usize = env_or("SITEREC_CYCLE_KILLS", 30);
    let seed: u64 = env_or("SITEREC_CRASH_SEED", 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut env = Env::start();
    let disk = env.path("web01.img");
    make_image(&disk, DISK, seed);
    env.start_sites_with(
        &[("web01", vec![("disk0", &disk)])],
        "[target]\nlisten = \"127.0.0.1:0\"\n",
    );
    env.pair(&["--retention-hours", "2"]);
    env.wait_machine("web01");
    env.enable("web01");

    let mut made = 0;
    let mut round = 0u64;
    let mut log = Vec::new();
    let mut active_disk = disk.clone();
    let started = Instant::now();
    while made < kills {
        round += 1;
        // The machine writes where it runs, then stops: this is the state
        // the failover must bring over, byte for byte.
        let off = rng.random_range(0..(DISK - (128 << 10))) & !4095;
        scribble(&active_disk, off, 128 << 10, seed * 1000 + round);
        let expected = env.path(&format!("expected-{round}.img"));
        snapshot(&active_disk, &expected);
        let at_primary = active_disk == disk;

        made += run_killed(
            &mut env,
            &mut rng,
            &["failover", "planned", "web01", "--source-stopped"],
            &mut log,
        );
        let it = item(&env);
        let p = &it["properties"];
        assert_eq!(p["protectionState"], "PlannedFailoverCompleted", "{it}");
        let want = if at_primary { "Recovery" } else { "Primary" };
        assert_eq!(p["activeLocation"], want, "{it}");
        active_disk = if at_primary {
            item_disk(&it, "raw")
        } else {
            disk.clone()
        };
        assert!(
            qemu_img_identical(&expected, &active_disk, "raw"),
            "round {round}: after the failover to {want}, {} is not the disk as it stopped\n{log:#?}",
            active_disk.display()
        );
        std::fs::remove_file(&expected).unwrap();
        let out = env.json(&["failover", "commit", "web01"]);
        assert_eq!(out["status"], "Succeeded", "{out}");

        made += run_killed(
            &mut env,
            &mut rng,
            &["item", "reprotect", "web01"],
            &mut log,
        );
        let it = item(&env);
        assert_eq!(it["properties"]["protectionState"], "Protected", "{it}");
        assert_eq!(it["properties"]["activeLocation"], want, "{it}");
        eprintln!(
            "round {round}: {made} kills ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!("{log:#?}");
    assert!(made >= kills);
}
