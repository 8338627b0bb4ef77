//! Image writers checked with the real qemu-img.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::RngCore;
use siterec_drivers::export::ImageWriter;
use siterec_drivers::export::{ExportError, ImageFormat, Qcow2Writer, create_writer};

const QEMU_IMG: &str = "/usr/bin/qemu-img";

fn qemu_img() -> PathBuf {
    let candidates = [
        PathBuf::from(QEMU_IMG),
        PathBuf::from("/usr/local/bin/qemu-img"),
    ];
    for c in candidates {
        if c.exists() {
            return c;
        }
    }
    panic!(
        "qemu-img not found at {QEMU_IMG}: these tests need it, install qemu-utils \
         (apt-get install qemu-utils)"
    );
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(qemu_img()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn check_qcow2(path: &Path) {
    let p = path.to_str().unwrap();
    let (code, text) = run(&["check", "-f", "qcow2", p]);
    assert_eq!(code, 0, "qemu-img check failed:\n{text}");
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leak"), "{text}");
}

fn compare(fmt_a: &str, a: &Path, fmt_b: &str, b: &Path) {
    let (code, text) = run(&[
        "compare",
        "-f",
        fmt_a,
        "-F",
        fmt_b,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "qemu-img compare reports a difference:\n{text}");
    assert!(text.contains("Images are identical"), "{text}");
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Write `blocks` (offset, data) with both writers and independently into
/// a reference raw file; check and compare everything.
fn exercise(size: u64, blocks: &[(u64, Vec<u8>)]) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    let qcow = dir.path().join("disk.qcow2");
    let reference = dir.path().join("reference.img");

    for (format, path) in [(ImageFormat::Raw, &raw), (ImageFormat::Qcow2, &qcow)] {
        let mut w = create_writer(format, path, size).unwrap();
        for (off, data) in blocks {
            w.write_at(*off, data).unwrap();
        }
        w.finish().unwrap();
    }
    {
        let f = std::fs::File::create(&reference).unwrap();
        f.set_len(size).unwrap();
        for (off, data) in blocks {
            f.write_all_at(data, *off).unwrap();
        }
    }

    assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
    check_qcow2(&qcow);
    let (code, info) = run(&["info", "-f", "qcow2", qcow.to_str().unwrap()]);
    assert_eq!(code, 0, "{info}");
    assert!(info.contains("compat: 1.1"), "{info}");
    compare("raw", &raw, "qcow2", &qcow);
    compare("raw", &reference, "qcow2", &qcow);
    compare("raw", &reference, "raw", &raw);
    if size <= 64 << 20 {
        assert_eq!(
            std::fs::read(&raw).unwrap(),
            std::fs::read(&reference).unwrap()
        );
        // Convert back to raw with qemu and compare bytes.
        let back = dir.path().join("back.img");
        let (code, text) = run(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow.to_str().unwrap(),
            back.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{text}");
        let back = std::fs::read(&back).unwrap();
        let want = std::fs::read(&reference).unwrap();
        assert_eq!(&back[..want.len()], &want[..]);
        assert!(back[want.len()..].iter().all(|&b| b == 0));
    }
}

#[test]
fn small_disk_with_short_last_block() {
    const CHUNK: u64 = 256 * 1024;
    let size = (1 << 20) + 123;
    let mut blocks = Vec::new();
    // Blocks 0 and 2 random, 1 zero (skipped by the caller), 3 half random,
    // last short block (123 bytes) random.
    blocks.push((0, random_bytes(CHUNK as usize)));
    blocks.push((2 * CHUNK, random_bytes(CHUNK as usize)));
    let mut half = vec![0u8; CHUNK as usize];
    half[..CHUNK as usize / 2].copy_from_slice(&random_bytes(CHUNK as usize / 2));
    blocks.push((3 * CHUNK, half));
    blocks.push((4 * CHUNK, random_bytes(123)));
    exercise(size, &blocks);
}

#[test]
fn sparse_300_mib_disk() {
    const CHUNK: u64 = 1 << 20;
    let size = 300 << 20;
    let blocks = vec![
        (0, random_bytes(CHUNK as usize)),
        (7 * CHUNK, random_bytes(CHUNK as usize)),
        (150 * CHUNK, random_bytes(4096)),
        (299 * CHUNK, random_bytes(CHUNK as usize)),
    ];
    exercise(size, &blocks);
}

#[test]
fn tiny_disk() {
    exercise(4096 + 17, &[(0, random_bytes(4096 + 17))]);
    exercise(3000, &[(0, random_bytes(1000))]);
}

#[test]
fn large_virtual_size_several_l2_tables() {
    // 64 GiB virtual: 128 L2 tables possible; touch a few, out of order.
    let size: u64 = 64 << 30;
    let blocks = vec![
        (0, random_bytes(1 << 20)),
        ((20 << 30) + (5 << 16), random_bytes(65536 * 3 + 5)),
        ((1 << 29) - (1 << 16), random_bytes(1 << 17)), // spans two L2 tables
        (size - (1 << 20), random_bytes(1 << 20)),
        (0, random_bytes(1 << 16)), // overwrite, revisiting the first L2 table
    ];
    let dir = tempfile::tempdir().unwrap();
    let qcow = dir.path().join("big.qcow2");
    let reference = dir.path().join("big.img");
    let mut w = Qcow2Writer::create(&qcow, size).unwrap();
    let f = std::fs::File::create(&reference).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in &blocks {
        w.write_at(*off, data).unwrap();
        f.write_all_at(data, *off).unwrap();
    }
    Box::new(w).finish().unwrap();
    drop(f);
    check_qcow2(&qcow);
    compare("raw", &reference, "qcow2", &qcow);
    // Only tables are stored, not the virtual size.
    assert!(std::fs::metadata(&qcow).unwrap().len() < 16 << 20);
}

#[test]
fn unaligned_and_out_of_range_writes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.qcow2");
    let mut w = create_writer(ImageFormat::Qcow2, &path, 1 << 20).unwrap();
    let err = w.write_at(512, &[1u8; 512]).unwrap_err();
    assert!(
        matches!(err, ExportError::Unaligned { offset: 512, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("aligned"), "{err}");
    let err = w.write_at(1 << 20, &[1u8; 1]).unwrap_err();
    assert!(matches!(err, ExportError::OutOfRange { .. }), "{err}");
    w.finish().unwrap();
    check_qcow2(&path);

    let raw = dir.path().join("x.img");
    let mut w = create_writer(ImageFormat::Raw, &raw, 1000).unwrap();
    assert!(w.write_at(999, &[1, 2]).is_err());
    w.write_at(999, &[1]).unwrap();
    w.finish().unwrap();

    assert!(create_writer(ImageFormat::Qcow2, &path, 0).is_err());
}

#[test]
fn empty_qcow2_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.qcow2");
    let raw = dir.path().join("empty.img");
    create_writer(ImageFormat::Qcow2, &path, 10 << 20)
        .unwrap()
        .finish()
        .unwrap();
    create_writer(ImageFormat::Raw, &raw, 10 << 20)
        .unwrap()
        .finish()
        .unwrap();
    check_qcow2(&path);
    compare("raw", &raw, "qcow2", &path);
}

#[test]
fn compare_harness_detects_differences() {
    // Negative control: a one-byte difference must be reported by qemu-img.
    let dir = tempfile::tempdir().unwrap();
    let qcow = dir.path().join("a.qcow2");
    let raw = dir.path().join("a.img");
    let data = random_bytes(70_000);
    let mut w = create_writer(ImageFormat::Qcow2, &qcow, 1 << 20).unwrap();
    w.write_at(65536, &data).unwrap();
    w.finish().unwrap();
    let mut other = data.clone();
    other[69_999] ^= 1;
    let mut w = create_writer(ImageFormat::Raw, &raw, 1 << 20).unwrap();
    w.write_at(65536, &other).unwrap();
    w.finish().unwrap();
    let (code, text) = run(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{text}");
}

/// `write_new_at` writes what `write_at` would, leaving zero pages as
/// holes in a raw image: the file reads back exactly (checked against a
/// reference written plainly, with qemu-img) and uses less space.
#[test]
fn raw_write_new_at_leaves_zero_pages_as_holes() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("sparse.img");
    let reference = dir.path().join("reference.img");
    let size = 16u64 << 20;
    // 1 MiB blocks: all zeros but three scattered pages; half zeros; a
    // block with an unaligned offset; a short last block.
    let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut mostly_zero = vec![0u8; 1 << 20];
    for page in [3usize, 4, 200] {
        mostly_zero[page * 4096..(page + 1) * 4096].copy_from_slice(&random_bytes(4096));
    }
    mostly_zero[(1 << 20) - 1] = 7;
    blocks.push((0, mostly_zero));
    let mut half = random_bytes(1 << 20);
    half[..1 << 19].fill(0);
    blocks.push((4 << 20, half));
    blocks.push((8 << 20, vec![0u8; 1 << 20]));
    blocks.push(((10 << 20) + 5, random_bytes(10_000)));
    blocks.push((size - 3000, random_bytes(3000)));
    let mut w = create_writer(ImageFormat::Raw, &sparse, size).unwrap();
    for (off, data) in &blocks {
        w.write_new_at(*off, data).unwrap();
    }
    w.finish().unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&reference)
        .unwrap();
    f.set_len(size).unwrap();
    for (off, data) in &blocks {
        f.write_all_at(data, *off).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    compare("raw", &reference, "raw", &sparse);
    assert_eq!(
        std::fs::read(&sparse).unwrap(),
        std::fs::read(&reference).unwrap()
    );
    // Data written: about 4 pages + 512 KiB + 10 KB + 3 KB, not 2 MiB
    // of mostly zeros (filesystems allocate a little more; tmpfs and ext4
    // both count 512-byte units).
    let used = std::fs::metadata(&sparse).unwrap().blocks() * 512;
    let reference_used = std::fs::metadata(&reference).unwrap().blocks() * 512;
    assert!(
        used < reference_used - (1 << 20),
        "sparse image uses {used} bytes, the plain one {reference_used}"
    );
}
