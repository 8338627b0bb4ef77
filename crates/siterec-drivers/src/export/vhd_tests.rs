//! VHD writers checked with the real qemu-img (driver `vpc`).
//!
//! qemu 10 sizes our images (creator "srec") by the footer's current size,
//! like Azure and Hyper-V; `force_size_calc=chs` shows the CHS geometry's
//! (smaller) size that Virtual PC would use. See the `vhd` module.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::RngCore;

use super::vhd::chs_geometry;
use super::*;

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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `--image-opts` for a VHD sized by its CHS geometry.
fn vpc_chs(path: &Path) -> String {
    format!(
        "driver=vpc,force_size_calc=chs,file.driver=file,file.filename={}",
        s(path).replace(',', ",,")
    )
}

fn virtual_size(info_args: &[&str]) -> u64 {
    let mut args = vec!["info", "--output", "json"];
    args.extend_from_slice(info_args);
    let (code, text) = run(&args);
    assert_eq!(code, 0, "qemu-img info failed:\n{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], "vpc", "{text}");
    v["virtual-size"].as_u64().unwrap()
}

/// `qemu-img check`: no errors, or the driver does not do checks (vpc in
/// qemu 10 does not), which is not a failure.
fn check_vpc(path: &Path) {
    let (code, text) = run(&["check", "-f", "vpc", s(path)]);
    if text.contains("does not support checks") {
        return;
    }
    assert_eq!(code, 0, "qemu-img check failed:\n{text}");
    assert!(text.contains("No errors were found"), "{text}");
}

/// `qemu-img compare`; true when identical, false when different.
fn compare(args: &[&str]) -> bool {
    let mut all = vec!["compare"];
    all.extend_from_slice(args);
    let (code, text) = run(&all);
    match code {
        0 => {
            assert!(text.contains("Images are identical"), "{text}");
            true
        }
        1 => false,
        _ => panic!("qemu-img compare failed:\n{text}"),
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// A raw file of `len` bytes holding `blocks` (clipped to `len`).
fn write_reference(path: &Path, len: u64, blocks: &[(u64, Vec<u8>)]) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (off, data) in blocks {
        if *off < len {
            let n = (len - off).min(data.len() as u64) as usize;
            f.write_all_at(&data[..n], *off).unwrap();
        }
    }
}

/// The CHS geometry's size in bytes.
fn chs_bytes(disk_size: u64) -> u64 {
    let (c, h, sp) = chs_geometry(disk_size / 512);
    u64::from(c) * u64::from(h) * u64::from(sp) * 512
}

/// Write `blocks` with the `format` writer and into a raw reference (padded
/// to the VHD disk size); judge the image with qemu-img.
fn exercise(format: ImageFormat, size: u64, blocks: &[(u64, Vec<u8>)]) {
    let dir = tempfile::tempdir().unwrap();
    let vhd = dir.path().join("disk.vhd");
    let reference = dir.path().join("reference.img");
    let disk = vhd_disk_size(size).unwrap();
    assert_eq!(disk % (1 << 20), 0);
    assert!(disk >= size && disk - size < 1 << 20);

    let mut w = create_writer(format, &vhd, size).unwrap();
    for (off, data) in blocks {
        w.write_at(*off, data).unwrap();
    }
    w.finish().unwrap();
    write_reference(&reference, disk, blocks);

    // Layout: footer at the end (and a copy at 0 for dynamic).
    let bytes_len = std::fs::metadata(&vhd).unwrap().len();
    let f = File::open(&vhd).unwrap();
    let mut tail = [0u8; 512];
    f.read_exact_at(&mut tail, bytes_len - 512).unwrap();
    assert_eq!(&tail[..8], b"conectix");
    assert_eq!(&tail[28..32], b"srec");
    assert_eq!(&tail[48..56], &disk.to_be_bytes());
    match format {
        ImageFormat::VhdFixed => {
            assert_eq!(bytes_len, disk + 512);
            assert_eq!(&tail[60..64], &2u32.to_be_bytes());
        }
        ImageFormat::VhdDynamic => {
            let mut head = [0u8; 512];
            f.read_exact_at(&mut head, 0).unwrap();
            assert_eq!(head, tail);
            assert_eq!(&tail[60..64], &3u32.to_be_bytes());
            // Only blocks holding data are stored.
            let touched: BTreeSet<u64> = blocks
                .iter()
                .filter(|(_, d)| d.iter().any(|&b| b != 0))
                .flat_map(|(off, d)| {
                    (off / VHD_BLOCK_SIZE)..=((off + d.len() as u64 - 1) / VHD_BLOCK_SIZE)
                })
                .collect();
            let bat = (disk.div_ceil(VHD_BLOCK_SIZE) * 4).next_multiple_of(512);
            let max = 1536 + bat + touched.len() as u64 * (VHD_BLOCK_SIZE + 512) + 512;
            assert!(bytes_len <= max, "{bytes_len} > {max}");
        }
        _ => unreachable!(),
    }

    check_vpc(&vhd);

    // qemu sizes the image by the footer (the rounded size); the CHS
    // geometry, read by Virtual PC only, is at most a cylinder smaller.
    assert_eq!(virtual_size(&["-f", "vpc", s(&vhd)]), disk);
    let chs = chs_bytes(disk);
    assert!(
        chs <= disk && disk - chs <= 16 * 255 * 512,
        "{chs} vs {disk}"
    );
    assert_eq!(virtual_size(&["--image-opts", &vpc_chs(&vhd)]), chs);

    assert!(
        compare(&["-f", "raw", "-F", "vpc", s(&reference), s(&vhd)]),
        "qemu-img compare reports a difference"
    );

    // Convert back to raw with qemu and compare.
    let back = dir.path().join("back.img");
    let (code, text) = run(&["convert", "-f", "vpc", "-O", "raw", s(&vhd), s(&back)]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(std::fs::metadata(&back).unwrap().len(), disk);
    if disk <= 64 << 20 {
        assert_eq!(
            std::fs::read(&back).unwrap(),
            std::fs::read(&reference).unwrap()
        );
    } else {
        assert!(compare(&[
            "-f",
            "raw",
            "-F",
            "raw",
            s(&reference),
            s(&back)
        ]));
        let (b, r) = (File::open(&back).unwrap(), File::open(&reference).unwrap());
        for (off, data) in blocks {
            let mut x = vec![0u8; data.len()];
            let mut y = vec![0u8; data.len()];
            b.read_exact_at(&mut x, *off).unwrap();
            r.read_exact_at(&mut y, *off).unwrap();
            assert!(x == y, "converted image differs at {off}");
        }
    }
}

fn both(size: u64, blocks: &[(u64, Vec<u8>)]) {
    exercise(ImageFormat::VhdFixed, size, blocks);
    exercise(ImageFormat::VhdDynamic, size, blocks);
}

#[test]
fn small_disk_with_short_last_block() {
    const CHUNK: u64 = 256 * 1024;
    let size = (1 << 20) + 123;
    let mut half = vec![0u8; CHUNK as usize];
    half[..CHUNK as usize / 2].copy_from_slice(&random_bytes(CHUNK as usize / 2));
    let blocks = vec![
        (0, random_bytes(CHUNK as usize)),
        (2 * CHUNK, random_bytes(CHUNK as usize)),
        (3 * CHUNK, half),
        (4 * CHUNK, random_bytes(123)),
    ];
    both(size, &blocks);
}

#[test]
fn sparse_300_mib_disk() {
    const CHUNK: u64 = 1 << 20;
    let size = 300 << 20;
    // The last block lies partly beyond the CHS geometry's size, which
    // qemu must not cut off.
    let blocks = vec![
        (0, random_bytes(CHUNK as usize)),
        (7 * CHUNK, random_bytes(CHUNK as usize)),
        (150 * CHUNK, random_bytes(4096)),
        (299 * CHUNK, random_bytes(CHUNK as usize)),
    ];
    assert!((299 << 20) < chs_bytes(size) && chs_bytes(size) < size);
    both(size, &blocks);
}

#[test]
fn sparse_5_gib_disk_several_blocks() {
    let size: u64 = 5 << 30;
    let blocks = vec![
        (0, random_bytes(1 << 20)),
        // Spans blocks 1 and 2.
        ((4 << 20) - (1 << 16), random_bytes(1 << 17)),
        ((3 << 30) + (5 << 16), random_bytes(65536 * 3 + 5)),
        // A zero write to an unallocated block stays unallocated.
        (1 << 30, vec![0u8; 1 << 16]),
        // Out of order, back into block 0 and block 1.
        (1 << 16, random_bytes(1 << 16)),
        ((2 << 20) + (1 << 16), random_bytes(1 << 16)),
        // Zeros over data in an allocated block must be written.
        (3 << 30, vec![0u8; 1 << 20]),
        (size - (4 << 20), random_bytes(3 << 20)),
    ];
    both(size, &blocks);
}

#[test]
fn tiny_and_empty_disks() {
    both(4096 + 17, &[(0, random_bytes(4096 + 17))]);
    both(3000, &[(0, random_bytes(1000))]);
    both(10 << 20, &[]);
}

#[test]
fn unfinished_images_are_not_vhd() {
    let dir = tempfile::tempdir().unwrap();
    // A genuine fixed-VHD footer for an 8 MiB disk...
    let genuine = dir.path().join("genuine.vhd");
    create_writer(ImageFormat::VhdFixed, &genuine, 8 << 20)
        .unwrap()
        .finish()
        .unwrap();
    let bytes = std::fs::read(&genuine).unwrap();
    let fake = &bytes[bytes.len() - 512..];
    for format in [ImageFormat::VhdFixed, ImageFormat::VhdDynamic] {
        let path = dir.path().join(format!("{format}.vhd"));
        let mut w = create_writer(format, &path, 8 << 20).unwrap();
        // ...inside the guest's data, ending exactly where the disk (and
        // the last dynamic block) ends.
        let mut data = random_bytes(1 << 20);
        data[(1 << 20) - 512..].copy_from_slice(fake);
        w.write_at(7 << 20, &data).unwrap();
        drop(w); // crash before finish
        let (code, text) = run(&["info", "-f", "vpc", s(&path)]);
        assert_ne!(code, 0, "{format}: unfinished image opens:\n{text}");
        let bytes = std::fs::read(&path).unwrap();
        if format == ImageFormat::VhdDynamic {
            assert!(bytes[..512].iter().all(|&b| b == 0));
        }
        assert!(bytes[bytes.len() - 512..].iter().all(|&b| b == 0));
        // Without the zero sector at the end it would open: the guard is
        // what keeps the file invalid.
        let cut = dir.path().join("cut.vhd");
        std::fs::write(&cut, &bytes[..bytes.len() - 512]).unwrap();
        let (code, text) = run(&["info", "-f", "vpc", s(&cut)]);
        assert_eq!(code, 0, "{format}: {text}");
    }
}

#[test]
fn compare_harness_detects_differences() {
    // Negative control: flip one byte of written data inside each image.
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("a.img");
    let data = random_bytes(70_000);
    let blocks = vec![(65536, data)];
    for format in [ImageFormat::VhdFixed, ImageFormat::VhdDynamic] {
        let vhd = dir.path().join(format!("{format}.vhd"));
        let mut w = create_writer(format, &vhd, 4 << 20).unwrap();
        w.write_at(65536, &blocks[0].1).unwrap();
        w.finish().unwrap();
        write_reference(&reference, 4 << 20, &blocks);
        assert!(compare(&["-f", "raw", "-F", "vpc", s(&reference), s(&vhd)]));

        // Where virtual byte 65536 + 69_999 is in the file.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&vhd)
            .unwrap();
        let data_start = if format == ImageFormat::VhdFixed {
            0
        } else {
            let mut header = [0u8; 1024];
            f.read_exact_at(&mut header, 512).unwrap();
            let bat_at = u64::from_be_bytes(header[16..24].try_into().unwrap());
            let mut entry = [0u8; 4];
            f.read_exact_at(&mut entry, bat_at).unwrap();
            u64::from(u32::from_be_bytes(entry)) * 512 + 512
        };
        let at = data_start + 65536 + 69_999;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        assert_eq!(b[0], blocks[0].1[69_999]);
        f.write_all_at(&[b[0] ^ 1], at).unwrap();
        drop(f);
        let (code, text) = run(&["compare", "-f", "raw", "-F", "vpc", s(&reference), s(&vhd)]);
        assert_eq!(code, 1, "{format}: {text}");
    }
}

#[test]
fn geometry_agrees_with_qemu() {
    // qemu-img create (without force_size) picks the smallest geometry, by
    // the same algorithm, that covers the size, and stores C×H×S as the
    // size; ours must give the same geometry for that sector count.
    let dir = tempfile::tempdir().unwrap();
    for size in ["1M", "2M", "300M", "5G", "31G", "40G", "64G"] {
        let path = dir.path().join(format!("{size}.vhd"));
        let (code, text) = run(&["create", "-q", "-f", "vpc", s(&path), size]);
        assert_eq!(code, 0, "{text}");
        let f = File::open(&path).unwrap();
        let mut footer = [0u8; 512];
        f.read_exact_at(&mut footer, 0).unwrap();
        let current = u64::from_be_bytes(footer[48..56].try_into().unwrap());
        let cyl = u16::from_be_bytes([footer[56], footer[57]]);
        assert_eq!(
            chs_geometry(current / 512),
            (cyl, footer[58], footer[59]),
            "{size}"
        );
    }
}

#[test]
fn rejects_bad_sizes_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.vhd");
    for format in [ImageFormat::VhdFixed, ImageFormat::VhdDynamic] {
        assert!(create_writer(format, &path, 0).is_err());
        assert!(create_writer(format, &path, MAX_VHD_SIZE + 1).is_err());
        let mut w = create_writer(format, &path, 1000).unwrap();
        // Beyond the caller's size, even if inside the rounded-up disk.
        let err = w.write_at(999, &[1, 2]).unwrap_err();
        assert!(matches!(err, ExportError::OutOfRange { .. }), "{err}");
        assert!(w.write_at(u64::MAX, &[1]).is_err());
        w.write_at(999, &[1]).unwrap();
        w.finish().unwrap();
        assert_eq!(virtual_size(&["-f", "vpc", s(&path)]), 1 << 20);
    }
    // The largest size is accepted and costs only the BAT.
    let mut w = VhdDynamicWriter::create(&path, MAX_VHD_SIZE).unwrap();
    assert_eq!(w.disk_size(), MAX_VHD_SIZE);
    w.write_at(MAX_VHD_SIZE - 65536, &random_bytes(65536))
        .unwrap();
    Box::new(w).finish().unwrap();
    assert_eq!(virtual_size(&["-f", "vpc", s(&path)]), MAX_VHD_SIZE);
    assert!(std::fs::metadata(&path).unwrap().len() < 8 << 20);
}

#[test]
fn vhd_format_names() {
    for (format, name) in [
        (ImageFormat::VhdFixed, "vhd-fixed"),
        (ImageFormat::VhdDynamic, "vhd-dynamic"),
    ] {
        assert_eq!(format.as_str(), name);
        assert_eq!(format.to_string(), name);
        assert_eq!(format.extension(), "vhd");
        assert_eq!(format.qemu_driver(), "vpc");
        assert_eq!(name.parse::<ImageFormat>().ok(), Some(format));
        assert_eq!(
            name.to_uppercase().parse::<ImageFormat>().ok(),
            Some(format)
        );
        let json = serde_json::to_string(&format).unwrap();
        assert_eq!(json, format!("\"{name}\""));
        assert_eq!(serde_json::from_str::<ImageFormat>(&json).unwrap(), format);
    }
    assert_eq!(
        serde_json::to_string(&ImageFormat::Qcow2).unwrap(),
        "\"qcow2\""
    );
    let err = "vhd".parse::<ImageFormat>().unwrap_err();
    assert!(err.to_string().contains("vhd-fixed"), "{err}");
}
