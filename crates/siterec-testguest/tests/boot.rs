//! Boots the real test guest under QEMU: write on a qcow2 disk, verify a
//! copy, verify a copy with corrupted data blocks, and a blank disk.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use siterec_testguest::{
    DATA_BLOCK, DATA_FILES, GuestOutcome, Mode, TestGuest, Verdict, data_blocks, default_build_dir,
};

const TIMEOUT: Duration = Duration::from_secs(120);
const SEED: u64 = 20240917;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img not found: run scripts/deps");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn boot(guest: &TestGuest, disk: &Path, mode: Mode, seed: u64, what: &str) -> GuestOutcome {
    let out = guest
        .boot(disk, mode, seed, TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!(
        "{what}: {:?} in {:.1} s ({})",
        out.verdict,
        out.elapsed.as_secs_f64(),
        out.accel
    );
    assert!(
        !out.timed_out,
        "{what}: QEMU killed at the host timeout\nserial:\n{}\nstderr:\n{}",
        out.serial_log, out.qemu_stderr
    );
    out
}

fn build() -> TestGuest {
    let dir = default_build_dir();
    TestGuest::build(&dir).unwrap_or_else(|e| panic!("building the test guest in {dir:?}: {e}"))
}

#[test]
fn written_disk_verifies_on_a_copy_and_corruption_fails() {
    let guest = build();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = tmp.path().join("source.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&disk), "64M"]);

    let out = boot(&guest, &disk, Mode::Write, SEED, "write");
    assert_eq!(
        out.verdict,
        Verdict::Wrote(DATA_FILES),
        "{}",
        out.serial_log
    );

    // A replica: an independent copy of the written disk.
    let copy = tmp.path().join("replica.qcow2");
    qemu_img(&["convert", "-q", "-O", "qcow2", path(&disk), path(&copy)]);
    let out = boot(&guest, &copy, Mode::Verify, SEED, "verify copy");
    assert_eq!(out.verdict, Verdict::Ok(DATA_FILES), "{}", out.serial_log);

    // The same disk with another seed: the files are intact but not the
    // ones this seed writes.
    let out = boot(&guest, &copy, Mode::Verify, SEED + 1, "verify, other seed");
    assert!(
        matches!(&out.verdict, Verdict::Fail(r) if r.contains("seed")),
        "{:?}\n{}",
        out.verdict,
        out.serial_log
    );

    // A raw copy with one data file's blocks damaged in their middles.
    let raw = tmp.path().join("replica.raw");
    qemu_img(&["convert", "-q", "-O", "raw", path(&disk), path(&raw)]);
    let mut image = std::fs::read(&raw).expect("reading the raw copy");
    let blocks = data_blocks(&image);
    let expected: u32 = (0..DATA_FILES).map(|f| 4 * (f + 1)).sum();
    assert_eq!(
        blocks.len() as u32,
        expected,
        "data blocks found: {blocks:?}"
    );
    assert!(blocks.iter().all(|b| b.seed == SEED));
    let victims: Vec<_> = blocks.iter().filter(|b| b.file == 2).collect();
    assert_eq!(victims.len(), 12);
    for b in &victims {
        let mid = b.offset as usize + DATA_BLOCK / 2;
        for byte in &mut image[mid..mid + 16] {
            *byte ^= 0x5a;
        }
    }
    std::fs::write(&raw, &image).expect("writing the corrupted copy");
    let out = boot(&guest, &raw, Mode::Verify, SEED, "verify corrupted");
    assert!(
        matches!(&out.verdict, Verdict::Fail(r) if r.contains("checksum mismatch") && r.contains("data2")),
        "{:?}\n{}",
        out.verdict,
        out.serial_log
    );
}

#[test]
fn blank_disk_fails_verify_without_hanging() {
    let guest = build();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = tmp.path().join("blank.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("creating a blank raw disk");
    let out = boot(&guest, &disk, Mode::Verify, SEED, "verify blank");
    assert!(
        matches!(&out.verdict, Verdict::Fail(r) if r.contains("mount")),
        "{:?}\n{}",
        out.verdict,
        out.serial_log
    );
}

#[test]
fn auto_mode_writes_a_blank_disk_and_verifies_a_written_one() {
    let guest = build();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = tmp.path().join("auto.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&disk), "64M"]);
    let out = boot(&guest, &disk, Mode::Auto, SEED, "auto on a blank disk");
    assert_eq!(
        out.verdict,
        Verdict::Wrote(DATA_FILES),
        "{}",
        out.serial_log
    );
    assert!(out.serial_log.contains("SITEREC-GUEST MODE write"));
    let out = boot(&guest, &disk, Mode::Auto, SEED, "auto on the written disk");
    assert!(out.serial_log.contains("SITEREC-GUEST MODE verify"));
    assert_eq!(out.verdict, Verdict::Ok(DATA_FILES), "{}", out.serial_log);
    // And a wrong seed is still caught in auto mode.
    let out = boot(&guest, &disk, Mode::Auto, SEED + 1, "auto, other seed");
    assert!(matches!(out.verdict, Verdict::Fail(_)), "{:?}", out.verdict);
}
