//! QEMU's own NBD clients (`qemu-img`, `qemu-io`, `qemu-nbd --list`) against
//! our server on a Unix socket: what QEMU will do with a recovery point the
//! recovery agent serves.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use siterec_nbd::{Export, MemoryExport, NbdServer, ServerConfig, UnixServer};

struct Served {
    dir: tempfile::TempDir,
    server: UnixServer,
    data: Vec<u8>,
}

impl Served {
    fn start(export: Arc<dyn Export>, data: Vec<u8>) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new("disk");
        config.description = Some("recovery point 7 of vm1".into());
        let server = NbdServer::new(export, config)
            .unwrap()
            .listen_unix(dir.path().join("nbd.sock"))
            .unwrap();
        Served { dir, server, data }
    }

    fn standard() -> Served {
        let data = standard_disk();
        Self::start(Arc::new(MemoryExport::new(data.clone(), CHUNK)), data)
    }

    fn socket(&self) -> &Path {
        self.server.path()
    }

    /// The export by name, and by the default name.
    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket().display())
    }

    fn default_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket().display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(cmd: &str, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect(cmd);
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args).await;
    assert!(
        out.ok,
        "{cmd} {args:?} failed: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_and_qemu_nbd_list_describe_the_export() {
    let s = Served::standard();
    let info = run_ok("qemu-img", &["info", "--output=json", &s.uri()]).await;
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
    let info = run_ok("qemu-img", &["info", &s.default_uri()]).await;
    assert!(info.contains("virtual size: 64 MiB"), "{info}");

    // NBD_OPT_LIST, NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT.
    let list = run_ok("qemu-nbd", &["--list", "-k", s.socket().to_str().unwrap()]).await;
    for needle in [
        "exports available: 1",
        "export: 'disk'",
        "description: recovery point 7 of vm1",
        &format!("size:  {}", 64 * MIB),
        "readonly",
        "multi",
        "min block: 1",
        "opt block: 4096",
        "max block: 33554432",
        "base:allocation",
    ] {
        assert!(list.contains(needle), "{needle:?} not in:\n{list}");
    }
    assert!(!list.contains("flush"), "{list}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_the_export_exactly_and_sparsely() {
    let s = Served::standard();
    let raw = s.path("copy.raw");
    let raw_s = raw.to_str().unwrap();
    let started = std::time::Instant::now();
    run_ok("qemu-img", &["convert", "-O", "raw", &s.uri(), raw_s]).await;
    let took = started.elapsed();
    let copy = std::fs::read(&raw).unwrap();
    assert_eq!(copy.len(), s.data.len());
    assert!(
        copy == s.data,
        "the converted image differs from the export"
    );
    // Holes came back as holes (block status), so the copy is sparse: about
    // 5 MiB of data in 64 MiB.
    let allocated = std::fs::metadata(&raw).unwrap().blocks() * 512;
    assert!(
        allocated < 12 * MIB,
        "copy has {allocated} bytes allocated: holes were copied as data"
    );
    eprintln!("qemu-img convert of 64 MiB took {took:?}, {allocated} bytes allocated");

    // Many requests in flight (-m 16), to qcow2, through the default name;
    // qemu-img compare reads both sides again.
    let qcow2 = s.path("copy.qcow2");
    let qcow2_s = qcow2.to_str().unwrap();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-m",
            "16",
            "-W",
            "-O",
            "qcow2",
            &s.default_uri(),
            qcow2_s,
        ],
    )
    .await;
    let cmp = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &s.uri(), qcow2_s],
    )
    .await;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_shows_the_holes() {
    let s = Served::standard();
    let map = run_ok("qemu-img", &["map", "--output=json", &s.uri()]).await;
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut got: Vec<(u64, u64, bool)> = Vec::new();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        assert_eq!(data, !zero, "{e}");
        match got.last_mut() {
            Some(l) if l.2 != data => l.1 += len,
            _ => got.push((start, len, !data)),
        }
    }
    let expected = hole_map(&s.data, CHUNK as usize);
    assert_eq!(got, expected);
    assert!(expected.iter().filter(|e| e.2).count() >= 6);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_reads_the_patterns_and_cannot_write() {
    let s = Served::standard();
    let uri = s.uri();
    let out = run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 64k 960k",
            "-c",
            "read -P 0xcd 1M 300k",
            "-c",
            "read -P 0 20M 4M",
            "-c",
            "read -P 0xef 65532k 4k",
            "-c",
            "read -P 0xab 4095 1", // unaligned, one byte
            "-c",
            "aio_read -P 0xcd 1M 64k",
            "-c",
            "aio_read -P 0 30M 1M",
            "-c",
            "aio_flush",
            &uri,
        ],
    )
    .await;
    assert!(!out.contains("failed"), "{out}");

    // A pattern that is not there is noticed (the test can fail).
    let bad = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0xab 1M 4k", &uri],
    )
    .await;
    assert!(!bad.ok && bad.stdout.contains("Pattern verification failed"));

    // The export is read-only: QEMU refuses to open it for writing, and a
    // read-only open refuses the write.
    let w = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]).await;
    assert!(!w.ok, "write succeeded: {}", w.stdout);
    assert!(w.stderr.contains("Permission denied"), "{}", w.stderr);
    let w = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "write -P 1 0 4k", &uri],
    )
    .await;
    assert!(!w.ok && w.stderr.contains("read-only"), "{}", w.stderr);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_read_error_is_eio_in_qemu_and_the_connection_goes_on() {
    let data = standard_disk();
    let export = FailingExport::new(data.clone(), 3 * MIB + 512 * KIB, 4096);
    let s = Served::start(export.clone(), data);
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read 3M 1M",
            "-c",
            "read -P 0xcd 1M 300k",
            &s.uri(),
        ],
    )
    .await;
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("read failed: Input/output error"),
        "no EIO in:\n{all}"
    );
    // The reads before and after on the same connection worked.
    assert_eq!(
        all.matches("read 65536/65536 bytes at offset 0").count(),
        1,
        "{all}"
    );
    assert_eq!(
        all.matches("read 307200/307200 bytes at offset 1048576")
            .count(),
        1,
        "{all}"
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_qemu_clients_at_once() {
    let s = Served::standard();
    let uri = s.uri();
    let jobs: Vec<_> = (0..4)
        .map(|i| {
            let uri = uri.clone();
            tokio::spawn(async move {
                let off = format!("{}", 40 * MIB + i * 256 * KIB);
                run(
                    "qemu-io",
                    &[
                        "-r",
                        "-f",
                        "raw",
                        "-c",
                        "read -P 0xab 0 64k",
                        "-c",
                        &format!("read {off} 256k"),
                        "-c",
                        "read -P 0 50M 8M",
                        &uri,
                    ],
                )
                .await
            })
        })
        .collect();
    for j in jobs {
        let out = j.await.unwrap();
        assert!(out.ok, "{}{}", out.stdout, out.stderr);
    }
    // Each disconnected (NBD_CMD_DISC): nothing left behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.server.active_connections() > 0 {
        assert!(std::time::Instant::now() < deadline, "connections linger");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let sock = s.socket().to_path_buf();
    s.server.shutdown().await;
    assert!(!sock.exists(), "socket left behind");
}
