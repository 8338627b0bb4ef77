//! Client writes and flushes: against a real `qemu-nbd` (checked afterwards
//! with `qemu-img`, independently of our client), against a scripted
//! in-memory server with a minimum block size (read-modify-write, error
//! replies), and against our own read-only server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{CHUNK, KIB, MIB, random_bytes};
use siterec_nbd::proto::*;
use siterec_nbd::{ConnectOptions, MemoryExport, NbdClient, NbdError, NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;

/// Whether every tool is on PATH; says which is missing if not.
fn have_tools(tools: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            eprintln!("skipping: `{tool}` is not on PATH (install qemu-utils)");
            return false;
        }
    }
    true
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

/// A single-client `qemu-nbd` (no `--persistent`): it exits when its one
/// client disconnects. Killed on drop if still running.
struct OneShot {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl OneShot {
    fn spawn(dir: &Path, image: &Path, args: &[&str]) -> OneShot {
        let stem = image.file_name().unwrap().to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.push(p(image));
        Self::spawn_opts(dir, &stem, &all)
    }

    /// `qemu-nbd -k SOCKET ARGS` (the image is among `args`).
    fn spawn_opts(dir: &Path, stem: &str, args: &[&str]) -> OneShot {
        let socket = dir.join(format!("{stem}.sock"));
        let log = dir.join(format!("{stem}.log"));
        let child = Command::new("qemu-nbd")
            .arg("-k")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start qemu-nbd");
        OneShot { child, socket, log }
    }

    /// Connects, retrying until the socket accepts. No probe connection:
    /// qemu-nbd would count it as its one client and exit after it.
    async fn connect(&mut self, opts: &ConnectOptions) -> NbdClient<UnixStream> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("qemu-nbd exited early ({status}): {}", self.log());
            }
            match NbdClient::connect_unix(&self.socket, opts).await {
                Ok(c) => return c,
                Err(NbdError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => panic!("connecting to qemu-nbd: {e}: {}", self.log()),
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd never started listening"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for qemu-nbd to exit by itself (after the disconnect).
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not exit after the client disconnected"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OneShot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies `writes` to a model disk of `size` bytes and to the client.
async fn write_all_to<S>(c: &mut NbdClient<S>, model: &mut [u8], writes: &[(u64, usize)])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = random_bytes(0xd15c + i as u64, len);
        c.write(off, &data)
            .await
            .unwrap_or_else(|e| panic!("write of {len} at {off}: {e}"));
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
}

#[tokio::test]
async fn writes_to_qemu_nbd_qcow2_land_where_qemu_img_sees_them() {
    if !have_tools(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    let size = 80 * MIB;
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "80M"]);
    let mut server = OneShot::spawn(dir.path(), &img, &["-f", "qcow2"]);
    let mut c = server.connect(&ConnectOptions::new("")).await;
    assert!(!c.is_read_only());
    assert_eq!(c.export_size(), size);
    assert_ne!(c.transmission_flags() & TFLAG_SEND_FLUSH, 0);
    let min = c.export_info().min_block;

    let mut model = vec![0u8; size as usize];
    let writes = [
        (0, 4096),
        (MIB + 1, 5000),                    // unaligned start and length
        (32 * MIB - 3000, 6000),            // across the first 32 MiB boundary
        (33 * MIB + 17, 40 * MIB as usize), // > 32 MiB: two requests, unaligned
        (2 * MIB, 64 * KIB as usize),
        (2 * MIB + 100, 10), // overwrites part of the previous one
        (size - 100, 100),   // up to the last byte
    ];
    write_all_to(&mut c, &mut model, &writes).await;
    c.write(5 * MIB, &[]).await.unwrap(); // nothing to do

    // Past the end: refused before anything is sent, the connection goes on.
    for (off, len) in [(size - 10, 20), (size, 1), (u64::MAX, 2)] {
        let err = c.write(off, &vec![1u8; len]).await.expect_err("must fail");
        assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
        assert!(err.to_string().contains("past the export size"), "{err}");
    }

    // Our own reads see the writes.
    let back = c.read(MIB - 7, 5 * MIB as usize).await.unwrap();
    assert!(back == model[(MIB - 7) as usize..(6 * MIB - 7) as usize]);

    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
    let status = server.wait_exit();
    assert!(status.success(), "qemu-nbd: {status}: {}", server.log());

    // Independently: qemu-img reads the image itself.
    run("qemu-img", &["check", "-q", "-f", "qcow2", p(&img)]);
    let raw = dir.path().join("w.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&raw)],
    );
    let got = std::fs::read(&raw).unwrap();
    assert_eq!(got.len(), model.len());
    if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("byte {i} differs (min block {min})");
    }
}

#[tokio::test]
async fn unaligned_writes_to_a_4k_aligned_qemu_nbd_export_are_read_modify_written() {
    if !have_tools(&["qemu-nbd"]) {
        return;
    }
    // blkdebug's `align` as the export's root node gives it a 4 KiB request
    // alignment, which qemu-nbd advertises as the minimum block size (a
    // format on top of a file is advertised with a minimum of 1, even with
    // O_DIRECT). qemu-nbd only traces misaligned requests, so that the
    // client sends aligned ones is checked by the scripted server below;
    // this checks the bytes end up right on a real server.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("aligned.raw");
    let size = 8 * MIB;
    let mut model = random_bytes(77, size as usize);
    std::fs::write(&img, &model).unwrap();
    let opts = format!(
        "driver=blkdebug,align=4096,image.driver=file,image.filename={}",
        p(&img)
    );
    let mut server = OneShot::spawn_opts(dir.path(), "aligned", &["--image-opts", &opts]);
    let mut c = server.connect(&ConnectOptions::new("")).await;
    assert_eq!(c.export_info().min_block, 4096, "{:?}", c.export_info());
    let writes = [
        (1, 1),
        (4095, 2),
        (10_000, 3),             // inside one block
        (MIB - 100, 300 * 1024), // partial head and tail blocks
        (3 * MIB, 4096),         // aligned
        (32 * KIB - 10, 0),      // nothing
        (size - 5, 5),
    ];
    write_all_to(&mut c, &mut model, &writes).await;
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
    assert!(server.wait_exit().success(), "{}", server.log());
    let got = std::fs::read(&img).unwrap();
    if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("byte {i} differs");
    }
}

#[tokio::test]
async fn writing_to_a_read_only_qemu_nbd_export_fails_clearly() {
    if !have_tools(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    let mut server = OneShot::spawn(dir.path(), &img, &["-f", "qcow2", "--read-only"]);
    let mut c = server.connect(&ConnectOptions::new("")).await;
    assert!(c.is_read_only());
    let err = c.write(0, &[1u8; 4096]).await.expect_err("must fail");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    assert!(err.to_string().contains("read-only"), "{err}");
    // Nothing was sent: the connection is in step.
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
    assert!(server.wait_exit().success(), "{}", server.log());
}

#[tokio::test]
async fn writing_to_our_read_only_server_fails_before_sending() {
    let data = random_bytes(5, MIB as usize);
    let export = Arc::new(MemoryExport::new(data.clone(), CHUNK));
    let server = NbdServer::new(export, ServerConfig::new("disk")).unwrap();
    let (a, b) = tokio::io::duplex(256 * 1024);
    let served = tokio::spawn(async move { server.serve(b).await });
    let mut c = NbdClient::handshake(a, &ConnectOptions::new("disk"))
        .await
        .unwrap();
    assert!(c.is_read_only());
    let err = c.write(0, b"abc").await.expect_err("must fail");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    assert!(err.to_string().contains("read-only"), "{err}");
    // It does not advertise NBD_FLAG_SEND_FLUSH: flush sends nothing.
    assert_eq!(c.transmission_flags() & TFLAG_SEND_FLUSH, 0);
    c.flush().await.unwrap();
    assert!(c.read(0, 4096).await.unwrap() == data[..4096]);
    c.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---- A scripted writable in-memory server ----

/// A request: (command, offset, length).
type Req = (u16, u64, u32);

/// What the scripted server saw.
#[derive(Default)]
struct Log {
    /// Every request, in order.
    requests: Vec<Req>,
}

/// How the scripted server behaves.
#[derive(Clone)]
struct Script {
    size: u64,
    flags: u16,
    /// Minimum, preferred, maximum block size (`NBD_INFO_BLOCK_SIZE`).
    blocks: Option<(u32, u32, u32)>,
    structured: bool,
    /// Writes touching this offset fail with `ENOSPC` (an error chunk with
    /// an offset under structured replies).
    fail_at: Option<u64>,
    /// Flushes fail with `EIO`.
    fail_flush: bool,
}

impl Script {
    fn new(size: u64) -> Script {
        Script {
            size,
            flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
            blocks: None,
            structured: true,
            fail_at: None,
            fail_flush: false,
        }
    }
}

fn opt_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = REPLY_MAGIC_OPT.to_be_bytes().to_vec();
    v.extend(opt.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    v
}

fn simple(cookie: u64, errno: u32) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(errno.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend(payload);
    v
}

fn error_chunk(cookie: u64, errno: u32, msg: &str, at: Option<u64>) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend((msg.len() as u16).to_be_bytes());
    p.extend(msg.as_bytes());
    let kind = match at {
        Some(at) => {
            p.extend(at.to_be_bytes());
            REPLY_TYPE_ERROR_OFFSET
        }
        None => REPLY_TYPE_ERROR,
    };
    chunk(REPLY_FLAG_DONE, kind, cookie, &p)
}

/// Serves `disk` per `script`, refusing misaligned requests with `EINVAL`
/// as the protocol allows.
async fn scripted(
    mut s: DuplexStream,
    script: Script,
    disk: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Log>>,
) {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend(IHAVEOPT.to_be_bytes());
    hello.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await.unwrap();
    s.read_u32().await.unwrap();
    let mut structured = false;
    loop {
        let _magic = s.read_u64().await.unwrap();
        let opt = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        let out = match opt {
            OPT_STRUCTURED_REPLY if script.structured => {
                structured = true;
                opt_reply(opt, REP_ACK, &[])
            }
            OPT_GO => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend(script.size.to_be_bytes());
                info.extend(script.flags.to_be_bytes());
                let mut v = opt_reply(opt, REP_INFO, &info);
                if let Some((min, pref, max)) = script.blocks {
                    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    b.extend(min.to_be_bytes());
                    b.extend(pref.to_be_bytes());
                    b.extend(max.to_be_bytes());
                    v.extend(opt_reply(opt, REP_INFO, &b));
                }
                v.extend(opt_reply(opt, REP_ACK, &[]));
                v
            }
            _ => opt_reply(opt, REP_ERR_UNSUP, &[]),
        };
        s.write_all(&out).await.unwrap();
        if opt == OPT_GO {
            break;
        }
    }
    let (min, max) = script.blocks.map_or((1, 32 << 20), |(a, _, c)| (a, c));
    loop {
        let mut req = [0u8; 28];
        if s.read_exact(&mut req).await.is_err() {
            return;
        }
        let cmd = u16::from_be_bytes([req[6], req[7]]);
        let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(req[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(req[24..28].try_into().unwrap());
        log.lock().unwrap().requests.push((cmd, offset, len));
        let end = offset + u64::from(len);
        let aligned = offset.is_multiple_of(u64::from(min))
            && (end.is_multiple_of(u64::from(min)) || end == script.size)
            && len <= max
            && end <= script.size;
        let out = match cmd {
            CMD_DISC => return,
            CMD_READ if !aligned => simple(cookie, EINVAL),
            CMD_READ => {
                let d = disk.lock().unwrap()[offset as usize..end as usize].to_vec();
                if structured {
                    let mut p = offset.to_be_bytes().to_vec();
                    p.extend(d);
                    chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &p)
                } else {
                    let mut v = simple(cookie, 0);
                    v.extend(d);
                    v
                }
            }
            CMD_WRITE => {
                let mut d = vec![0u8; len as usize];
                s.read_exact(&mut d).await.unwrap();
                let fail = script.fail_at.filter(|f| (offset..end).contains(f));
                if !aligned {
                    simple(cookie, EINVAL)
                } else if let Some(at) = fail {
                    if structured {
                        error_chunk(cookie, ENOSPC, "the disk is full", Some(at))
                    } else {
                        simple(cookie, ENOSPC)
                    }
                } else {
                    disk.lock().unwrap()[offset as usize..end as usize].copy_from_slice(&d);
                    if structured {
                        chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
                    } else {
                        simple(cookie, 0)
                    }
                }
            }
            CMD_FLUSH if script.fail_flush && structured => {
                error_chunk(cookie, EIO, "flush failed", None)
            }
            CMD_FLUSH if script.fail_flush => simple(cookie, EIO),
            CMD_FLUSH if structured => chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[]),
            CMD_FLUSH => simple(cookie, 0),
            _ => simple(cookie, EINVAL),
        };
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

struct Scripted {
    client: NbdClient<DuplexStream>,
    disk: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Log>>,
}

async fn scripted_client(script: Script, initial: Vec<u8>) -> Scripted {
    let disk = Arc::new(Mutex::new(initial));
    let log = Arc::new(Mutex::new(Log::default()));
    let (a, b) = tokio::io::duplex(1 << 16);
    tokio::spawn(scripted(b, script, disk.clone(), log.clone()));
    let client = NbdClient::handshake(a, &ConnectOptions::new(""))
        .await
        .unwrap();
    Scripted { client, disk, log }
}

impl Scripted {
    fn requests(&self) -> Vec<Req> {
        std::mem::take(&mut self.log.lock().unwrap().requests)
    }
}

#[tokio::test]
async fn unaligned_writes_keep_to_the_minimum_block_size() {
    for structured in [true, false] {
        let size = 1 << 20;
        let mut model = random_bytes(1, size);
        let mut script = Script::new(size as u64);
        script.blocks = Some((4096, 4096, 64 * 1024));
        script.structured = structured;
        let mut s = scripted_client(script, model.clone()).await;
        assert_eq!(s.client.structured_replies(), structured);

        // Each case: (offset, length, the requests expected).
        let w = |o: u64, l: u32| (CMD_WRITE, o, l);
        let r = |o: u64, l: u32| (CMD_READ, o, l);
        let cases: Vec<(u64, usize, Vec<Req>)> = vec![
            (8192, 4096, vec![w(8192, 4096)]),
            (1, 1, vec![r(0, 4096), w(0, 4096)]),
            (4100, 100, vec![r(4096, 4096), w(4096, 4096)]),
            // Head, middle, tail.
            (
                4096 * 3 - 10,
                4096 + 20,
                vec![
                    r(8192, 4096),
                    w(8192, 4096),
                    w(12288, 4096),
                    r(16384, 4096),
                    w(16384, 4096),
                ],
            ),
            // Aligned start, partial tail.
            (
                65536,
                5000,
                vec![w(65536, 4096), r(69632, 4096), w(69632, 4096)],
            ),
            // Larger than the maximum block size: split, aligned.
            (
                100,
                150 * 1024,
                vec![
                    r(0, 4096),
                    w(0, 4096),
                    w(4096, 65536),
                    w(69632, 65536),
                    w(135168, 16384),
                    r(151552, 4096),
                    w(151552, 4096),
                ],
            ),
            // The last bytes.
            (
                size as u64 - 3,
                3,
                vec![r(size as u64 - 4096, 4096), w(size as u64 - 4096, 4096)],
            ),
        ];
        for (i, (off, len, expected)) in cases.into_iter().enumerate() {
            let data = random_bytes(100 + i as u64, len);
            s.client.write(off, &data).await.unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            assert_eq!(s.requests(), expected, "write of {len} at {off}");
        }
        assert!(*s.disk.lock().unwrap() == model);

        s.client.flush().await.unwrap();
        assert_eq!(s.requests(), vec![(CMD_FLUSH, 0, 0)]);
        s.client.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn write_and_flush_errors_are_reported_and_the_connection_goes_on() {
    for structured in [true, false] {
        let size = 1u64 << 20;
        let mut script = Script::new(size);
        script.structured = structured;
        script.fail_at = Some(300_000);
        script.fail_flush = true;
        let mut s = scripted_client(script, vec![0u8; size as usize]).await;

        let err = s
            .client
            .write(299_000, &[7u8; 2000])
            .await
            .expect_err("must fail");
        match &err {
            NbdError::Server {
                command,
                offset,
                errno,
                message,
            } => {
                assert_eq!(*command, "write");
                assert_eq!(*errno, ENOSPC);
                if structured {
                    assert_eq!(*offset, 300_000);
                    assert_eq!(message, "the disk is full");
                } else {
                    assert_eq!(*offset, 299_000);
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.is_fatal());
        assert!(err.to_string().contains("ENOSPC"), "{err}");

        let err = s.client.flush().await.expect_err("must fail");
        assert!(
            matches!(
                err,
                NbdError::Server {
                    command: "flush",
                    errno: EIO,
                    ..
                }
            ),
            "{err:?}"
        );

        // Still usable.
        s.client.write(0, b"hello").await.unwrap();
        assert_eq!(&s.client.read(0, 5).await.unwrap(), b"hello");
        assert_eq!(&s.disk.lock().unwrap()[..5], b"hello");
        s.client.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn flush_without_send_flush_sends_nothing_and_read_only_refuses() {
    let size = 1u64 << 20;
    let mut script = Script::new(size);
    script.flags = TFLAG_HAS_FLAGS;
    let mut s = scripted_client(script, vec![0u8; size as usize]).await;
    s.client.flush().await.unwrap();
    s.client.write(10, b"x").await.unwrap();
    assert_eq!(s.requests(), vec![(CMD_WRITE, 10, 1)]);

    let mut script = Script::new(size);
    script.flags |= TFLAG_READ_ONLY;
    let mut s = scripted_client(script, vec![0u8; size as usize]).await;
    let err = s.client.write(0, b"x").await.expect_err("must fail");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    assert!(err.to_string().contains("read-only"), "{err}");
    assert!(s.requests().is_empty());
}

#[tokio::test]
async fn a_bad_write_reply_breaks_the_connection() {
    // A server that answers a write with a data chunk.
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend(IHAVEOPT.to_be_bytes());
        hello.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        b.write_all(&hello).await.unwrap();
        b.read_u32().await.unwrap();
        loop {
            let _ = b.read_u64().await.unwrap();
            let opt = b.read_u32().await.unwrap();
            let len = b.read_u32().await.unwrap();
            let mut d = vec![0u8; len as usize];
            b.read_exact(&mut d).await.unwrap();
            if opt == OPT_STRUCTURED_REPLY {
                b.write_all(&opt_reply(opt, REP_ACK, &[])).await.unwrap();
                continue;
            }
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend((1u64 << 20).to_be_bytes());
            info.extend(TFLAG_HAS_FLAGS.to_be_bytes());
            let mut v = opt_reply(opt, REP_INFO, &info);
            v.extend(opt_reply(opt, REP_ACK, &[]));
            b.write_all(&v).await.unwrap();
            break;
        }
        let mut req = [0u8; 28];
        b.read_exact(&mut req).await.unwrap();
        let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
        let mut payload = [0u8; 4];
        b.read_exact(&mut payload).await.unwrap();
        let mut p = 0u64.to_be_bytes().to_vec();
        p.extend(payload);
        b.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &p))
            .await
            .unwrap();
        b
    });
    let mut c = NbdClient::handshake(a, &ConnectOptions::new(""))
        .await
        .unwrap();
    let err = c.write(0, b"abcd").await.expect_err("must fail");
    assert!(matches!(err, NbdError::Protocol(_)), "{err:?}");
    assert!(err.to_string().contains("write reply"), "{err}");
    let err = c.write(0, b"abcd").await.expect_err("must fail");
    assert!(matches!(err, NbdError::ConnectionBroken(_)), "{err:?}");
    let err = c.flush().await.expect_err("must fail");
    assert!(matches!(err, NbdError::ConnectionBroken(_)), "{err:?}");
    drop(server.await.unwrap());
}
