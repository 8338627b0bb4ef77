//! The client against a real `qemu-nbd` serving images made with `qemu-img`
//! and `qemu-io`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use siterec_nbd::{
    ConnectOptions, Extent, NbdClient, NbdError, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A `qemu-nbd` serving one image on a Unix socket (or TCP); killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
    tcp_port: Option<u16>,
    log: PathBuf,
}

impl QemuNbd {
    /// Starts `qemu-nbd` on `image` with extra `args` and waits until its
    /// Unix socket accepts connections.
    fn spawn(dir: &Path, image: &Path, args: &[&str]) -> QemuNbd {
        Self::start(dir, image, args, None)
    }

    /// The same on TCP, on a free port of 127.0.0.1.
    fn spawn_tcp(dir: &Path, image: &Path, args: &[&str]) -> QemuNbd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start(dir, image, args, Some(port))
    }

    fn start(dir: &Path, image: &Path, args: &[&str], tcp_port: Option<u16>) -> QemuNbd {
        let stem = image.file_name().unwrap().to_string_lossy().into_owned();
        let socket = dir.join(format!("nbd-{stem}.sock"));
        let log = dir.join(format!("qemu-nbd-{stem}.log"));
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--persistent").arg("--shared=4");
        match tcp_port {
            Some(port) => cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()]),
            None => cmd.arg("--socket").arg(&socket),
        };
        let child = cmd
            .args(args)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start qemu-nbd");
        let mut server = QemuNbd {
            child,
            socket,
            tcp_port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "qemu-nbd exited early ({status}): {}",
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            let up = match tcp_port {
                Some(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                None => std::os::unix::net::UnixStream::connect(&server.socket).is_ok(),
            };
            if up {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd never started listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn connect(
        &self,
        opts: &ConnectOptions,
    ) -> Result<NbdClient<tokio::net::UnixStream>, NbdError> {
        NbdClient::connect_unix(&self.socket, opts).await
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse raw image of `size` bytes with random data at `regions`;
/// returns its bytes.
fn make_raw(path: &Path, size: u64, regions: &[(u64, usize)]) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut bytes = vec![0u8; size as usize];
    for (i, &(off, len)) in regions.iter().enumerate() {
        let data = random_bytes(0x9e37_79b9 + i as u64, len);
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&data).unwrap();
        bytes[off as usize..off as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    bytes
}

/// Merges neighbouring extents with equal flags.
fn merged(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents {
        match out.last_mut() {
            Some(l) if l.flags == e.flags && l.offset + l.length == e.offset => {
                l.length += e.length
            }
            _ => out.push(e),
        }
    }
    out
}

#[tokio::test]
async fn reads_match_the_image_bytes_raw_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * MIB; // more than one 32 MiB request
    let raw = dir.path().join("disk.raw");
    let regions = [
        (0, 4096),
        (100 * KIB, 3000),               // unaligned length, inside a cluster
        (MIB - 512, 200 * KIB as usize), // spans a MiB boundary
        (7 * MIB + 12345, 65536),        // unaligned start
        (33 * MIB, 2 * MIB as usize),    // past the first 32 MiB request
        (size - 4096, 4096),             // the last block
    ];
    let expected = make_raw(&raw, size, &regions);
    let qcow2 = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", p(&raw), p(&qcow2)],
    );

    for (image, format) in [(&raw, "raw"), (&qcow2, "qcow2")] {
        let server = QemuNbd::spawn(dir.path(), image, &["-r", "-f", format]);
        let mut c = server.connect(&ConnectOptions::new("")).await.unwrap();
        assert!(c.structured_replies());
        assert_eq!(c.export_size(), size, "{format}");
        assert!(c.is_read_only());

        // The whole export at once (split into two requests).
        let all = c.read(0, size as usize).await.unwrap();
        assert!(all == expected, "{format}: whole-export read differs");

        // Unaligned, spanning data and holes, and pure holes.
        for (off, len) in [
            (1, 1),
            (4095, 10_000),
            (100 * KIB - 7, 3010),
            (MIB - 1000, 300 * KIB as usize),
            (7 * MIB + 12000, 70_000),
            (20 * MIB, MIB as usize), // a hole: zeros
            (32 * MIB - 3, 2 * MIB as usize + 6),
            (size - 1, 1),
        ] {
            let got = c.read(off, len).await.unwrap();
            assert!(
                got == expected[off as usize..off as usize + len],
                "{format}: read of {len} at {off} differs"
            );
        }
        assert!(
            c.read(20 * MIB, 4096)
                .await
                .unwrap()
                .iter()
                .all(|b| *b == 0)
        );
        c.disconnect().await.unwrap();

        // Small requests (many per read) and simple replies give the same.
        let mut opts = ConnectOptions::new("");
        opts.max_read = 64 * 1024;
        let mut small = server.connect(&opts).await.unwrap();
        let got = small.read(MIB - 1000, 3 * MIB as usize).await.unwrap();
        assert!(got == expected[(MIB - 1000) as usize..(4 * MIB - 1000) as usize]);

        let mut opts = ConnectOptions::new("");
        opts.structured_replies = false;
        let mut simple = server.connect(&opts).await.unwrap();
        assert!(!simple.structured_replies());
        let got = simple.read(30 * MIB, 5 * MIB as usize).await.unwrap();
        assert!(
            got == expected[(30 * MIB) as usize..(35 * MIB) as usize],
            "{format}: simple replies"
        );
        simple.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn base_allocation_matches_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.qcow2");
    let size = 16 * MIB;
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xaa 0 64k",
            "-c",
            "write -P 0xbb 1M 192k",
            "-c",
            "write -z 4M 128k",
            "-c",
            "write -P 0xcc 9M 1M",
            "-c",
            "write -P 0x00 12M 64k",
            "-c",
            "write -P 0xdd 15M 1M",
            p(&img),
        ],
    );
    let map = run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", p(&img)],
    );
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let expected = merged(map.as_array().unwrap().iter().map(|e| {
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        Extent {
            offset: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            flags: if data { 0 } else { STATE_HOLE } | if zero { STATE_ZERO } else { 0 },
        }
    }));
    // The map must show both kinds, or the comparison proves little.
    assert!(expected.iter().any(|e| e.flags == 0));
    assert!(expected.iter().any(|e| e.flags == STATE_HOLE | STATE_ZERO));

    let server = QemuNbd::spawn(dir.path(), &img, &["-r", "-f", "qcow2"]);
    let opts = ConnectOptions::new("").meta_context("base:allocation");
    let mut c = server.connect(&opts).await.unwrap();
    let ctx = c
        .meta_context_id("base:allocation")
        .expect("base:allocation selected");
    let got = c.block_status_range(ctx, 0, size).await.unwrap();
    assert_eq!(got, expected);

    // A request in the middle is clipped to what was asked.
    let part = c.block_status(ctx, MIB + 4096, 4096).await.unwrap();
    assert_eq!(
        part,
        vec![Extent {
            offset: MIB + 4096,
            length: 4096,
            flags: 0
        }]
    );
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn dirty_bitmap_reports_exactly_the_written_granules() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("cbt.qcow2");
    let size = 8 * MIB;
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "8M"]);
    // Data written before the bitmap exists must not count as dirty.
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 2M 1M", p(&img)],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "--enable", "-f", "qcow2", p(&img), "bm0"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x55 1M 64k",
            "-c",
            "write -P 0x66 5000k 10k",
            p(&img),
        ],
    );
    let info = run(
        "qemu-img",
        &["info", "--output=json", "-f", "qcow2", p(&img)],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "bm0", "{info}");
    let gran = bitmaps[0]["granularity"].as_u64().unwrap();
    assert_eq!(gran, 64 * KIB);

    let server = QemuNbd::spawn(dir.path(), &img, &["-r", "-f", "qcow2", "-B", "bm0"]);
    let opts = ConnectOptions::new("")
        .meta_context("base:allocation")
        .meta_context("qemu:dirty-bitmap:bm0");
    let mut c = server.connect(&opts).await.unwrap();
    let dirty_ctx = c
        .meta_context_id("qemu:dirty-bitmap:bm0")
        .expect("bitmap context selected");
    let alloc_ctx = c
        .meta_context_id("base:allocation")
        .expect("base:allocation selected");
    assert_ne!(dirty_ctx, alloc_ctx);

    let second = (5000 * KIB) / gran * gran; // the granule holding 5000k..5010k
    assert_eq!((5010 * KIB - 1) / gran * gran, second);
    let expected = vec![
        Extent {
            offset: 0,
            length: MIB,
            flags: 0,
        },
        Extent {
            offset: MIB,
            length: gran,
            flags: STATE_DIRTY,
        },
        Extent {
            offset: MIB + gran,
            length: second - MIB - gran,
            flags: 0,
        },
        Extent {
            offset: second,
            length: gran,
            flags: STATE_DIRTY,
        },
        Extent {
            offset: second + gran,
            length: size - second - gran,
            flags: 0,
        },
    ];
    let got = c.block_status_range(dirty_ctx, 0, size).await.unwrap();
    assert_eq!(got, expected);

    // Reading the dirty extents gives the data written.
    let data = c.read(MIB, gran as usize).await.unwrap();
    assert!(data.iter().all(|b| *b == 0x55));
    let data = c.read(5000 * KIB, 10 * KIB as usize).await.unwrap();
    assert!(data.iter().all(|b| *b == 0x66));
    // The other context still answers on the same connection.
    let alloc = c.block_status_range(alloc_ctx, 2 * MIB, MIB).await.unwrap();
    assert_eq!(
        alloc,
        vec![Extent {
            offset: 2 * MIB,
            length: MIB,
            flags: 0
        }]
    );
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn errors_are_clear_and_nothing_is_sent_for_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.raw");
    let expected = make_raw(&img, MIB, &[(0, MIB as usize)]);
    let server = QemuNbd::spawn(dir.path(), &img, &["-r", "-f", "raw", "-x", "disk0"]);

    // A missing export name.
    let err = server
        .connect(&ConnectOptions::new("nope"))
        .await
        .err()
        .expect("must fail");
    assert!(
        matches!(err, NbdError::UnknownExport { ref name, .. } if name == "nope"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("\"nope\"") && msg.contains("does not exist"),
        "{msg}"
    );
    // Also when meta contexts are negotiated first.
    let err = server
        .connect(&ConnectOptions::new("nope").meta_context("base:allocation"))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, NbdError::UnknownExport { .. }), "{err:?}");

    // The right name works.
    let mut c = server.connect(&ConnectOptions::new("disk0")).await.unwrap();
    assert_eq!(c.export_size(), MIB);

    // Reads past the end are refused before anything is sent...
    for (off, len) in [(MIB - 10, 20), (MIB, 1), (u64::MAX, 2)] {
        let err = c.read(off, len).await.expect_err("must fail");
        assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
        assert!(err.to_string().contains("past the export size"), "{err}");
    }
    // ...so the connection is still in step and usable.
    let got = c.read(MIB - 10, 10).await.unwrap();
    assert_eq!(got, expected[(MIB - 10) as usize..]);

    // Block status on a context that was not negotiated.
    let err = c.block_status(1, 0, 4096).await.expect_err("must fail");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    assert!(err.to_string().contains("not negotiated"), "{err}");
    let got = c.read(0, 4096).await.unwrap();
    assert_eq!(got, expected[..4096]);
    c.disconnect().await.unwrap();

    // Nothing listening.
    let err = NbdClient::connect_unix(dir.path().join("absent.sock"), &ConnectOptions::new(""))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, NbdError::Io(_)), "{err:?}");
}

#[tokio::test]
async fn tcp_connection_reads_and_reports_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("tcp.raw");
    let expected = make_raw(&img, 4 * MIB, &[(MIB, 100_000)]);
    let server = QemuNbd::spawn_tcp(dir.path(), &img, &["-r", "-f", "raw"]);
    let port = server.tcp_port.unwrap();
    let opts = ConnectOptions::new("").meta_context("base:allocation");
    let mut c = NbdClient::connect_tcp(("127.0.0.1", port), &opts)
        .await
        .unwrap();
    assert_eq!(c.export_size(), 4 * MIB);
    let got = c.read(MIB - 10, 100_020).await.unwrap();
    assert!(got == expected[(MIB - 10) as usize..(MIB + 100_010) as usize]);
    let ctx = c.meta_context_id("base:allocation").unwrap();
    let extents = c.block_status_range(ctx, 0, 4 * MIB).await.unwrap();
    // Contiguous over the export, and the written range is data (whether
    // the rest shows as holes depends on the file system).
    assert_eq!(extents[0].offset, 0);
    let last = extents.last().unwrap();
    assert_eq!(last.offset + last.length, 4 * MIB);
    assert!(
        extents
            .windows(2)
            .all(|w| w[0].offset + w[0].length == w[1].offset)
    );
    let data = extents
        .iter()
        .find(|e| e.offset <= MIB && e.offset + e.length > MIB)
        .unwrap();
    assert_eq!(data.flags & STATE_HOLE, 0, "{extents:?}");
    c.disconnect().await.unwrap();
}
