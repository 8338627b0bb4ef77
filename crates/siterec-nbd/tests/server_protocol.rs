//! Our server against our own client and against raw, scripted clients that
//! send what no honest client sends: the server answers with errors where
//! the protocol allows it, hangs up where it must, never panics, never
//! leaves tasks behind, and goes on serving the next client.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use siterec_nbd::proto::*;
use siterec_nbd::{
    ConnectOptions, Export, ExportError, ExportExtent, MemoryExport, NbdClient, NbdError,
    NbdServer, STATE_HOLE, STATE_ZERO, Segment, ServerConfig, UnixServer,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

const SIZE: u64 = 64 * MIB;

fn server_with(export: Arc<dyn Export>, config: ServerConfig) -> NbdServer {
    NbdServer::new(export, config).unwrap()
}

fn standard_server() -> (NbdServer, Vec<u8>) {
    let data = standard_disk();
    let export = Arc::new(MemoryExport::new(data.clone(), CHUNK));
    (server_with(export, ServerConfig::new("disk")), data)
}

/// Serves one connection over a duplex pipe; the handle says how the server
/// ended (a panic shows up as a `JoinError`).
fn serve_duplex(server: &NbdServer) -> (DuplexStream, JoinHandle<Result<(), NbdError>>) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let server = server.clone();
    (a, tokio::spawn(async move { server.serve(b).await }))
}

/// How the server ended, within 5 s, and never by a panic.
async fn ended(h: JoinHandle<Result<(), NbdError>>) -> Result<(), NbdError> {
    tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("the server did not end")
        .expect("the server panicked")
}

async fn wait_idle(server: &UnixServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.active_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} connections linger",
            server.active_connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One reply message of the transmission phase.
#[derive(Debug)]
enum Rep {
    Simple {
        errno: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Rep {
    fn cookie(&self) -> u64 {
        match self {
            Rep::Simple { cookie, .. } | Rep::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The errno of a simple reply or an error chunk (0: success).
    fn errno(&self) -> u32 {
        match self {
            Rep::Simple { errno, .. } => *errno,
            Rep::Chunk { kind, payload, .. } if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
                u32::from_be_bytes(payload[0..4].try_into().unwrap())
            }
            Rep::Chunk { .. } => 0,
        }
    }

    fn message(&self) -> String {
        match self {
            Rep::Chunk { kind, payload, .. } if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
                let n = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                String::from_utf8(payload[6..6 + n].to_vec()).unwrap()
            }
            _ => String::new(),
        }
    }
}

/// A client that writes the protocol by hand.
struct Raw<S> {
    s: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn greeting(&mut self) -> u16 {
        assert_eq!(self.s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(self.s.read_u64().await.unwrap(), IHAVEOPT);
        self.s.read_u16().await.unwrap()
    }

    /// Greeting and our flags (fixed newstyle, no zeroes).
    async fn hello(&mut self) {
        let flags = self.greeting().await;
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.s
            .write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await
            .unwrap();
    }

    async fn opt_header(&mut self, opt: u32, len: u32) {
        self.s.write_u64(IHAVEOPT).await.unwrap();
        self.s.write_u32(opt).await.unwrap();
        self.s.write_u32(len).await.unwrap();
    }

    async fn opt(&mut self, opt: u32, data: &[u8]) {
        self.opt_header(opt, data.len() as u32).await;
        self.s.write_all(data).await.unwrap();
    }

    async fn opt_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.s.read_u64().await.unwrap(), REPLY_MAGIC_OPT);
        assert_eq!(self.s.read_u32().await.unwrap(), opt);
        let kind = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        assert!(len <= 64 * 1024);
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    /// All replies to one option, up to the final one (ACK or an error).
    async fn opt_replies(&mut self, opt: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (kind, data) = self.opt_reply(opt).await;
            let last = kind == REP_ACK || kind & REP_FLAG_ERROR != 0;
            out.push((kind, data));
            if last {
                return out;
            }
        }
    }

    /// The final reply type to an option.
    async fn ask(&mut self, opt: u32, data: &[u8]) -> u32 {
        self.opt(opt, data).await;
        self.opt_replies(opt).await.last().unwrap().0
    }

    fn name_data(name: &[u8]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d
    }

    fn go_data(name: &[u8]) -> Vec<u8> {
        let mut d = Self::name_data(name);
        d.extend(1u16.to_be_bytes());
        d.extend(INFO_BLOCK_SIZE.to_be_bytes());
        d
    }

    fn meta_data(name: &[u8], queries: &[&str]) -> Vec<u8> {
        let mut d = Self::name_data(name);
        d.extend((queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend((q.len() as u32).to_be_bytes());
            d.extend(q.as_bytes());
        }
        d
    }

    /// `NBD_OPT_GO`: the export's size and transmission flags.
    async fn go(&mut self, name: &[u8]) -> (u64, u16) {
        self.opt(OPT_GO, &Self::go_data(name)).await;
        let mut export = None;
        for (kind, data) in self.opt_replies(OPT_GO).await {
            match kind {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    export = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                }
                REP_INFO | REP_ACK => {}
                other => panic!("NBD_OPT_GO failed with {}", rep_err_name(other)),
            }
        }
        export.expect("no NBD_INFO_EXPORT")
    }

    /// A full handshake: structured replies and `base:allocation` if asked.
    async fn handshake(&mut self, structured: bool) -> u16 {
        self.hello().await;
        if structured {
            assert_eq!(self.ask(OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);
            let q = Self::meta_data(b"disk", &[BASE_ALLOCATION]);
            self.opt(OPT_SET_META_CONTEXT, &q).await;
            let r = self.opt_replies(OPT_SET_META_CONTEXT).await;
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].0, REP_META_CONTEXT);
            assert_eq!(&r[0].1[4..], BASE_ALLOCATION.as_bytes());
        }
        let (size, flags) = self.go(b"disk").await;
        assert_eq!(size, SIZE);
        flags
    }

    async fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend(flags.to_be_bytes());
        h.extend(kind.to_be_bytes());
        h.extend(cookie.to_be_bytes());
        h.extend(offset.to_be_bytes());
        h.extend(len.to_be_bytes());
        self.s.write_all(&h).await.unwrap();
    }
}

impl<S: AsyncRead + Unpin> Raw<S> {
    async fn reply(&mut self) -> Rep {
        match self.s.read_u32().await.unwrap() {
            SIMPLE_REPLY_MAGIC => Rep::Simple {
                errno: self.s.read_u32().await.unwrap(),
                cookie: self.s.read_u64().await.unwrap(),
            },
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.s.read_u16().await.unwrap();
                let kind = self.s.read_u16().await.unwrap();
                let cookie = self.s.read_u64().await.unwrap();
                let len = self.s.read_u32().await.unwrap();
                assert!(len <= 33 * 1024 * 1024);
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload).await.unwrap();
                Rep::Chunk {
                    flags,
                    kind,
                    cookie,
                    payload,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// The chunks of one structured reply, up to the one marked done.
    async fn chunks(&mut self, cookie: u64) -> Vec<Rep> {
        let (got, chunks) = self.any_chunks().await;
        assert_eq!(got, cookie);
        chunks
    }

    /// The next whole structured reply, whichever request it answers (this
    /// server writes each reply in one piece).
    async fn any_chunks(&mut self) -> (u64, Vec<Rep>) {
        let mut out = Vec::new();
        let mut cookie = None;
        loop {
            let r = self.reply().await;
            assert_eq!(*cookie.get_or_insert(r.cookie()), r.cookie());
            let done = matches!(r, Rep::Chunk { flags, .. } if flags & REPLY_FLAG_DONE != 0);
            out.push(r);
            if done {
                return (cookie.unwrap_or_default(), out);
            }
        }
    }

    /// A structured read reassembled: the bytes, and how many hole chunks.
    async fn read_chunks(&mut self, cookie: u64, offset: u64, len: u32) -> (Vec<u8>, usize) {
        let mut buf = vec![0xffu8; len as usize];
        let mut covered = 0u64;
        let mut holes = 0;
        for c in self.chunks(cookie).await {
            let Rep::Chunk { kind, payload, .. } = c else {
                panic!("simple reply to a structured read")
            };
            let at = u64::from_be_bytes(payload[0..8].try_into().unwrap_or([0; 8]));
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let d = &payload[8..];
                    let s = (at - offset) as usize;
                    buf[s..s + d.len()].copy_from_slice(d);
                    covered += d.len() as u64;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                    let s = (at - offset) as usize;
                    buf[s..s + n].fill(0);
                    covered += n as u64;
                    holes += 1;
                }
                REPLY_TYPE_NONE => {}
                k => panic!("unexpected chunk type {k:#x}"),
            }
        }
        assert_eq!(covered, u64::from(len));
        (buf, holes)
    }

    /// Expects the server to close the connection (EOF, possibly after
    /// some bytes).
    async fn expect_closed(&mut self) {
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), self.s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "the server did not close the connection");
    }
}

fn raw<S>(s: S) -> Raw<S> {
    Raw { s }
}

// ---------------------------------------------------------------------------
// Our client against our server

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_reads_the_export_and_sees_its_holes() {
    let (server, data) = standard_server();
    let dir = tempfile::tempdir().unwrap();
    let unix = server.listen_unix(dir.path().join("s")).unwrap();

    let opts = ConnectOptions::new("disk").meta_context(BASE_ALLOCATION);
    let mut c = NbdClient::connect_unix(unix.path(), &opts).await.unwrap();
    let info = c.export_info();
    assert_eq!(info.size, SIZE);
    assert_eq!(
        info.flags,
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_DF
    );
    assert_eq!(
        (info.min_block, info.preferred_block, info.max_block),
        (1, 4096, 32 * 1024 * 1024)
    );
    assert!(c.structured_replies());

    // base:allocation over the whole disk is the store's hole map.
    let id = c.meta_context_id(BASE_ALLOCATION).unwrap();
    let got: Vec<(u64, u64, bool)> = c
        .block_status_range(id, 0, SIZE)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            let hole = e.flags == STATE_HOLE | STATE_ZERO;
            assert!(hole || e.flags == 0, "{e:?}");
            (e.offset, e.length, hole)
        })
        .collect();
    assert_eq!(got, hole_map(&data, CHUNK as usize));

    // Reads: the whole disk (two requests), and unaligned pieces across
    // data and holes.
    assert!(c.read(0, SIZE as usize).await.unwrap() == data);
    for (off, len) in [
        (1u64, 1usize),
        (64 * KIB - 3, 10),
        (3 * MIB + 12000, 800_000),
        (32 * MIB - 6000, 12_000),
        (20 * MIB, MIB as usize),
        (SIZE - 1, 1),
    ] {
        let got = c.read(off, len).await.unwrap();
        assert!(
            got == data[off as usize..off as usize + len],
            "read of {len} at {off}"
        );
    }
    c.disconnect().await.unwrap();

    // The default name, and simple replies (holes sent as zeros).
    let mut opts = ConnectOptions::new("");
    opts.structured_replies = false;
    let mut c = NbdClient::connect_unix(unix.path(), &opts).await.unwrap();
    assert!(!c.structured_replies());
    assert_eq!(c.transmission_flags() & TFLAG_SEND_DF, 0);
    let got = c.read(30 * MIB, 12 * MIB as usize).await.unwrap();
    assert!(got == data[30 * MIB as usize..42 * MIB as usize]);
    c.disconnect().await.unwrap();

    let err = NbdClient::connect_unix(unix.path(), &ConnectOptions::new("other"))
        .await
        .err()
        .expect("unknown export");
    assert!(matches!(err, NbdError::UnknownExport { .. }), "{err}");
    wait_idle(&unix).await;
    unix.shutdown().await;
}

#[tokio::test]
async fn export_errors_become_error_replies_and_the_connection_goes_on() {
    let data = standard_disk();
    let bad = 40 * MIB + 256 * KIB;
    let export = FailingExport::new(data.clone(), bad, 1);
    let server = server_with(export.clone(), ServerConfig::new("disk"));

    for structured in [true, false] {
        let (a, h) = serve_duplex(&server);
        let mut opts = ConnectOptions::new("disk");
        opts.structured_replies = structured;
        if structured {
            opts = opts.meta_context(BASE_ALLOCATION);
        }
        let mut c = NbdClient::handshake(a, &opts).await.unwrap();
        let err = c.read(bad - 100, 4096).await.expect_err("must fail");
        match &err {
            NbdError::Server { errno, message, .. } => {
                assert_eq!(*errno, EIO);
                if structured {
                    assert!(message.contains("missing from the replica store"), "{err}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.is_fatal());
        // The same connection goes on.
        let got = c.read(bad - 8192, 4096).await.unwrap();
        assert!(got == data[(bad - 8192) as usize..(bad - 4096) as usize]);
        if structured {
            let id = c.meta_context_id(BASE_ALLOCATION).unwrap();
            let err = c.block_status(id, bad, 4096).await.expect_err("must fail");
            assert!(err.to_string().contains("manifest lookup failed"), "{err}");
            assert_eq!(c.block_status(id, 0, 4096).await.unwrap().len(), 1);
        }
        c.disconnect().await.unwrap();
        ended(h).await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// Concurrency

/// Reads below `gate_end` wait for a permit; every read takes `delay` and is
/// counted, with the largest number running at once.
struct SlowExport {
    inner: MemoryExport,
    gate: Semaphore,
    gate_end: u64,
    delay: Duration,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl SlowExport {
    fn new(data: Vec<u8>, gate_end: u64, delay: Duration) -> Arc<Self> {
        Arc::new(SlowExport {
            inner: MemoryExport::new(data, CHUNK),
            gate: Semaphore::new(0),
            gate_end,
            delay,
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
        })
    }
}

#[siterec_nbd::async_trait]
impl Export for SlowExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Segment>, ExportError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        if offset < self.gate_end {
            let _permit = self.gate.acquire().await;
        }
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.inner.read(offset, len).await
    }

    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<ExportExtent>, ExportError> {
        self.inner.extents(offset, len).await
    }
}

#[tokio::test]
async fn a_slow_read_does_not_hold_up_the_requests_behind_it() {
    let data = standard_disk();
    let export = SlowExport::new(data.clone(), 64 * KIB, Duration::ZERO);
    let server = server_with(export.clone(), ServerConfig::new("disk"));
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.handshake(true).await;
    c.request(0, CMD_READ, 1, 0, 4096).await; // waits for the gate
    c.request(0, CMD_READ, 2, MIB, 4096).await;
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 4096).await;
    // Both requests behind the held read are answered, in either order.
    let mut answered = Vec::new();
    for _ in 0..2 {
        let (cookie, chunks) = c.any_chunks().await;
        match cookie {
            2 => {
                let Rep::Chunk { kind, payload, .. } = &chunks[0] else {
                    panic!()
                };
                assert_eq!(*kind, REPLY_TYPE_OFFSET_DATA);
                assert!(payload[8..] == data[MIB as usize..MIB as usize + 4096]);
            }
            3 => assert_eq!(chunks.len(), 1),
            other => panic!("reply for cookie {other}"),
        }
        answered.push(cookie);
    }
    answered.sort();
    assert_eq!(answered, [2, 3]);
    export.gate.add_permits(1);
    let (got, _) = c.read_chunks(1, 0, 4096).await;
    assert!(got == data[..4096]);
    c.request(0, CMD_DISC, 4, 0, 0).await;
    c.expect_closed().await;
    ended(h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_with_a_bound_in_flight() {
    let data = standard_disk();
    let export = SlowExport::new(data.clone(), 0, Duration::from_millis(2));
    let mut config = ServerConfig::new("disk");
    config.max_requests_in_flight = 8;
    let server = server_with(export.clone(), config);
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.handshake(true).await;
    let (r, mut wc) = tokio::io::split(c.s);
    let mut rc = raw(r);

    const N: u64 = 400;
    let offset_of = |i: u64| (i * 163 * KIB) % (SIZE - 64 * KIB);
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
            h.extend(0u16.to_be_bytes());
            h.extend(CMD_READ.to_be_bytes());
            h.extend((1000 + i).to_be_bytes());
            h.extend(offset_of(i).to_be_bytes());
            h.extend((64 * 1024u32).to_be_bytes());
            wc.write_all(&h).await.unwrap();
        }
        wc
    });
    // Reassemble every reply by cookie: chunks of different requests may
    // interleave only between replies here (one writer, whole replies), but
    // replies come back in any order.
    let mut seen = std::collections::HashSet::new();
    let mut bufs: std::collections::HashMap<u64, (Vec<u8>, u64)> = Default::default();
    while seen.len() < N as usize {
        let rep = rc.reply().await;
        let cookie = rep.cookie();
        let i = cookie - 1000;
        let off = offset_of(i);
        let Rep::Chunk {
            flags,
            kind,
            payload,
            ..
        } = rep
        else {
            panic!("simple reply")
        };
        let entry = bufs
            .entry(cookie)
            .or_insert_with(|| (vec![0xff; 64 * 1024], 0));
        let at = u64::from_be_bytes(payload[0..8].try_into().unwrap()) - off;
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                let d = &payload[8..];
                entry.0[at as usize..at as usize + d.len()].copy_from_slice(d);
                entry.1 += d.len() as u64;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                entry.0[at as usize..at as usize + n].fill(0);
                entry.1 += n as u64;
            }
            k => panic!("chunk type {k}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            assert_eq!(entry.1, 64 * 1024);
            assert!(
                entry.0 == data[off as usize..off as usize + 64 * 1024],
                "cookie {cookie}"
            );
            assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        }
    }
    let mut wc = sender.await.unwrap();
    let max = export.max_running.load(Ordering::SeqCst);
    assert!(max > 1, "requests were served one at a time");
    assert!(max <= 8, "{max} reads ran at once, the bound is 8");
    wc.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 2])
        .await
        .unwrap();
    wc.write_all(&[0u8; 20]).await.unwrap();
    ended(h).await.unwrap();
}

// ---------------------------------------------------------------------------
// Bad requests in transmission

#[tokio::test]
async fn writes_and_bad_requests_get_errors_and_the_connection_goes_on() {
    let (server, data) = standard_server();
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    let flags = c.handshake(true).await;
    assert_ne!(flags & TFLAG_SEND_DF, 0);

    // A write is refused; its payload is consumed, so the next request
    // parses.
    c.request(0, CMD_WRITE, 1, 0, 100_000).await;
    c.s.write_all(&vec![7u8; 100_000]).await.unwrap();
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.errno()), (1, EPERM), "{r:?}");
    assert!(r.message().contains("read-only"));
    for (cookie, kind) in [(2, CMD_TRIM), (3, CMD_WRITE_ZEROES)] {
        c.request(0, kind, cookie, 0, 4096).await;
        let r = c.reply().await;
        assert_eq!((r.cookie(), r.errno()), (cookie, EPERM));
    }
    // Out of range, too large, overflowing, bad flags, unknown commands.
    for (cookie, flags, kind, offset, len) in [
        (10, 0, CMD_READ, SIZE - 10, 4096),
        (11, 0, CMD_READ, 0, 32 * 1024 * 1024 + 1),
        (12, 0, CMD_READ, u64::MAX - 100, 4096),
        (13, 0x40, CMD_READ, 0, 4096),
        (14, 0, 42, 0, 4096),
        (15, 0, CMD_CACHE, 0, 4096),
        (16, 0, CMD_BLOCK_STATUS, 0, 0),
        (17, 0, CMD_BLOCK_STATUS, SIZE, 1),
        (18, CMD_FLAG_DF, CMD_BLOCK_STATUS, 0, 4096),
    ] {
        c.request(flags, kind, cookie, offset, len).await;
        let r = c.reply().await;
        assert_eq!((r.cookie(), r.errno()), (cookie, EINVAL), "{r:?}");
        assert!(!r.message().is_empty());
    }
    // Flush: nothing to do; a read of nothing: done at once.
    c.request(0, CMD_FLUSH, 20, 0, 0).await;
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.errno()), (20, 0));
    c.request(0, CMD_READ, 21, 5, 0).await;
    assert!(matches!(
        c.reply().await,
        Rep::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_NONE,
            cookie: 21,
            ..
        }
    ));

    // A read across data and holes comes as data and hole chunks, or as one
    // data chunk with the zeros in it under NBD_CMD_FLAG_DF.
    let (off, len) = (MIB - 4096, 2 * MIB as u32);
    c.request(0, CMD_READ, 30, off, len).await;
    let (got, holes) = c.read_chunks(30, off, len).await;
    assert!(got == data[off as usize..(off + u64::from(len)) as usize]);
    assert!(holes >= 1, "no hole chunk");
    c.request(CMD_FLAG_DF, CMD_READ, 31, off, len).await;
    let chunks = c.chunks(31).await;
    assert_eq!(chunks.len(), 1);
    let Rep::Chunk { kind, payload, .. } = &chunks[0] else {
        panic!()
    };
    assert_eq!(*kind, REPLY_TYPE_OFFSET_DATA);
    assert!(payload[8..] == data[off as usize..(off + u64::from(len)) as usize]);

    // Block status: one descriptor with REQ_ONE, several without.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 40, 0, 8 * 1024 * 1024)
        .await;
    let Rep::Chunk { kind, payload, .. } = &c.chunks(40).await[0] else {
        panic!()
    };
    assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(payload.len(), 4 + 8);
    c.request(0, CMD_BLOCK_STATUS, 41, 0, 8 * 1024 * 1024).await;
    let Rep::Chunk { payload, .. } = &c.chunks(41).await[0] else {
        panic!()
    };
    assert!(payload.len() > 4 + 8);

    // Still serving.
    c.request(0, CMD_READ, 50, 0, 4096).await;
    let (got, _) = c.read_chunks(50, 0, 4096).await;
    assert!(got == data[..4096]);
    c.request(0, CMD_DISC, 51, 0, 0).await;
    c.expect_closed().await;
    ended(h).await.unwrap();
}

#[tokio::test]
async fn without_structured_replies_errors_are_simple_replies() {
    let (server, data) = standard_server();
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    let flags = c.handshake(false).await;
    assert_eq!(flags & TFLAG_SEND_DF, 0);
    for (cookie, flags, kind, len, errno) in [
        (1, 0, CMD_BLOCK_STATUS, 4096, EINVAL),
        (2, CMD_FLAG_DF, CMD_READ, 4096, EINVAL),
        (3, 0, CMD_TRIM, 4096, EPERM),
        (4, 0, CMD_READ, 64 * 1024 * 1024, EINVAL),
    ] {
        c.request(flags, kind, cookie, 0, len).await;
        match c.reply().await {
            Rep::Simple {
                errno: e,
                cookie: k,
            } => assert_eq!((k, e), (cookie, errno)),
            other => panic!("{other:?}"),
        }
    }
    c.request(0, CMD_READ, 5, MIB - 10, 20).await;
    match c.reply().await {
        Rep::Simple {
            errno: 0,
            cookie: 5,
        } => {}
        other => panic!("{other:?}"),
    }
    let mut buf = [0u8; 20];
    c.s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf[..], data[MIB as usize - 10..MIB as usize + 10]);
    drop(c); // no NBD_CMD_DISC: a hang-up between requests is fine
    ended(h).await.unwrap();
}

// ---------------------------------------------------------------------------
// Hostile handshakes

#[tokio::test]
async fn the_handshake_answers_bad_options_and_goes_on() {
    let (server, _) = standard_server();
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.hello().await;
    // Unknown and unsupported options.
    assert_eq!(c.ask(0x1234, &[9u8; 100]).await, REP_ERR_UNSUP);
    assert_eq!(c.ask(OPT_EXTENDED_HEADERS, &[]).await, REP_ERR_UNSUP);
    assert_eq!(c.ask(OPT_STARTTLS, &[]).await, REP_ERR_POLICY);
    // Too much data: skipped unread, refused.
    assert_eq!(c.ask(0x77, &vec![1u8; 1 << 20]).await, REP_ERR_TOO_BIG);
    assert_eq!(c.ask(OPT_GO, &vec![1u8; 1 << 20]).await, REP_ERR_TOO_BIG);
    // Lengths inside the data that lie.
    let mut lying = u32::MAX.to_be_bytes().to_vec();
    lying.extend(b"disk");
    assert_eq!(c.ask(OPT_GO, &lying).await, REP_ERR_INVALID);
    assert_eq!(c.ask(OPT_INFO, &[0, 0]).await, REP_ERR_INVALID);
    let mut trailing = Raw::<DuplexStream>::go_data(b"disk");
    trailing.push(0);
    assert_eq!(c.ask(OPT_GO, &trailing).await, REP_ERR_INVALID);
    // Options in the wrong order or with data they do not take.
    let meta = Raw::<DuplexStream>::meta_data(b"disk", &[BASE_ALLOCATION]);
    assert_eq!(c.ask(OPT_SET_META_CONTEXT, &meta).await, REP_ERR_INVALID);
    assert_eq!(c.ask(OPT_LIST, &[1]).await, REP_ERR_INVALID);
    assert_eq!(c.ask(OPT_STRUCTURED_REPLY, &[1]).await, REP_ERR_INVALID);
    assert_eq!(c.ask(OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);
    assert_eq!(c.ask(OPT_STRUCTURED_REPLY, &[]).await, REP_ERR_INVALID);
    let mut many = 0u32.to_be_bytes().to_vec();
    many.extend(u32::MAX.to_be_bytes());
    assert_eq!(c.ask(OPT_LIST_META_CONTEXT, &many).await, REP_ERR_INVALID);
    let mut long_query = 0u32.to_be_bytes().to_vec();
    long_query.extend(1u32.to_be_bytes());
    long_query.extend(5000u32.to_be_bytes());
    long_query.extend(vec![b'a'; 5000]);
    assert_eq!(
        c.ask(OPT_SET_META_CONTEXT, &long_query).await,
        REP_ERR_INVALID
    );
    // Unknown exports.
    assert_eq!(
        c.ask(OPT_INFO, &Raw::<DuplexStream>::go_data(b"nope"))
            .await,
        REP_ERR_UNKNOWN
    );
    let other = Raw::<DuplexStream>::meta_data(b"nope", &[BASE_ALLOCATION]);
    assert_eq!(c.ask(OPT_SET_META_CONTEXT, &other).await, REP_ERR_UNKNOWN);

    // What is there is listed.
    c.opt(OPT_LIST, &[]).await;
    let list = c.opt_replies(OPT_LIST).await;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].0, REP_SERVER);
    assert_eq!(list[0].1, [&4u32.to_be_bytes()[..], b"disk"].concat());
    for (queries, expect) in [
        (vec![], true),
        (vec!["base:"], true),
        (vec![BASE_ALLOCATION], true),
        (vec!["qemu:dirty-bitmap:bm0", "x-y:z", "nonsense"], false),
    ] {
        let q = Raw::<DuplexStream>::meta_data(b"", &queries);
        c.opt(OPT_LIST_META_CONTEXT, &q).await;
        let r = c.opt_replies(OPT_LIST_META_CONTEXT).await;
        assert_eq!(r.len(), if expect { 2 } else { 1 }, "{queries:?}: {r:?}");
        if expect {
            assert_eq!(r[0].1, [&[0u8; 4][..], BASE_ALLOCATION.as_bytes()].concat());
        }
    }
    // INFO with a name request: the canonical name comes back.
    let mut info = Raw::<DuplexStream>::name_data(b"");
    info.extend(1u16.to_be_bytes());
    info.extend(INFO_NAME.to_be_bytes());
    c.opt(OPT_INFO, &info).await;
    let r = c.opt_replies(OPT_INFO).await;
    assert!(
        r.iter()
            .any(|(k, d)| *k == REP_INFO && d[..] == [&[0u8, 1][..], b"disk"].concat())
    );

    // After all that, the session still works.
    let meta = Raw::<DuplexStream>::meta_data(b"disk", &[BASE_ALLOCATION, "base:allocation"]);
    c.opt(OPT_SET_META_CONTEXT, &meta).await;
    assert_eq!(c.opt_replies(OPT_SET_META_CONTEXT).await.len(), 2);
    c.go(b"").await;
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096).await;
    assert_eq!(c.reply().await.errno(), 0);
    c.request(0, CMD_DISC, 2, 0, 0).await;
    c.expect_closed().await;
    ended(h).await.unwrap();
}

#[tokio::test]
async fn the_handshake_hangs_up_where_it_cannot_answer() {
    let (server, data) = standard_server();

    // An option length the server will not even skip.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.hello().await;
    c.opt_header(0x99, u32::MAX).await;
    c.expect_closed().await;
    assert!(matches!(ended(h).await, Err(NbdError::ClientProtocol(_))));

    // A bad option magic.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.hello().await;
    c.s.write_all(b"GARBAGE!garbage!").await.unwrap();
    c.expect_closed().await;
    assert!(matches!(ended(h).await, Err(NbdError::ClientProtocol(_))));

    // Unknown client flags.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.greeting().await;
    c.s.write_u32(0x8000_0001).await.unwrap();
    c.expect_closed().await;
    assert!(matches!(ended(h).await, Err(NbdError::ClientProtocol(_))));

    // A non-fixed-newstyle client may only say NBD_OPT_EXPORT_NAME.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.greeting().await;
    c.s.write_u32(0).await.unwrap();
    c.opt(OPT_GO, &Raw::<DuplexStream>::go_data(b"")).await;
    c.expect_closed().await;
    assert!(matches!(ended(h).await, Err(NbdError::ClientProtocol(_))));

    // NBD_OPT_EXPORT_NAME of an unknown export has no error reply.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.hello().await;
    c.opt(OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
    assert!(matches!(ended(h).await, Err(NbdError::ClientProtocol(_))));

    // The client hangs up inside option data.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.hello().await;
    c.opt_header(OPT_GO, 1000).await;
    c.s.write_all(&[0u8; 10]).await.unwrap();
    drop(c);
    assert!(matches!(ended(h).await, Err(NbdError::Io(_))));

    // NBD_OPT_ABORT is acknowledged.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.hello().await;
    assert_eq!(c.ask(OPT_ABORT, &[]).await, REP_ACK);
    c.expect_closed().await;
    ended(h).await.unwrap();

    // Old style NBD_OPT_EXPORT_NAME, without NO_ZEROES: size, flags, 124
    // zeros, then transmission with simple replies.
    let (a, h) = serve_duplex(&server);
    let mut c = raw(a);
    c.greeting().await;
    c.s.write_u32(FLAG_C_FIXED_NEWSTYLE).await.unwrap();
    c.opt(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.s.read_u64().await.unwrap(), SIZE);
    let flags = c.s.read_u16().await.unwrap();
    assert_eq!(
        flags,
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
    );
    let mut zeroes = [1u8; 124];
    c.s.read_exact(&mut zeroes).await.unwrap();
    assert_eq!(zeroes, [0u8; 124]);
    c.request(0, CMD_READ, 9, 0, 16).await;
    assert_eq!(c.reply().await.errno(), 0);
    let mut buf = [0u8; 16];
    c.s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf[..], data[..16]);
    c.request(0, CMD_DISC, 10, 0, 0).await;
    c.expect_closed().await;
    ended(h).await.unwrap();
}

// ---------------------------------------------------------------------------
// The Unix socket server: hostile clients, timeouts, shutdown

async fn unix_raw(path: &Path) -> Raw<UnixStream> {
    raw(UnixStream::connect(path).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_leave_nothing_behind_and_the_next_client_is_served() {
    let (server, data) = standard_server();
    let dir = tempfile::tempdir().unwrap();
    let unix = server.listen_unix(dir.path().join("s")).unwrap();
    let path = unix.path().to_path_buf();

    // Hang up inside a request header.
    let mut c = unix_raw(&path).await;
    c.handshake(true).await;
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    drop(c);

    // Hang up inside a write payload.
    let mut c = unix_raw(&path).await;
    c.handshake(false).await;
    c.request(0, CMD_WRITE, 1, 0, 1 << 20).await;
    c.s.write_all(&[1u8; 10]).await.unwrap();
    drop(c);

    // Ask for 32 MiB reads and hang up at once (their tasks are aborted).
    let mut c = unix_raw(&path).await;
    c.handshake(true).await;
    for i in 0..10 {
        c.request(0, CMD_READ, i, 0, 32 * 1024 * 1024).await;
    }
    drop(c);

    // A bad request magic.
    let mut c = unix_raw(&path).await;
    c.handshake(true).await;
    c.s.write_all(&[0xde; 28]).await.unwrap();
    c.expect_closed().await;

    // Seeded garbage, during the handshake and after it.
    for seed in 0..60u64 {
        let mut c = unix_raw(&path).await;
        if seed % 2 == 0 {
            c.handshake(seed % 4 == 0).await;
        } else {
            c.greeting().await;
        }
        let noise = random_bytes(seed * 7919 + 1, 64 + (seed as usize * 997) % 4000);
        // The server may hang up before it has read everything.
        let _ = c.s.write_all(&noise).await;
        let _ = c.s.shutdown().await;
        c.expect_closed().await;
    }
    // Seeded garbage that starts with a valid request magic (so it gets
    // through to command dispatch): errors are answered, or the server
    // hangs up; the test only drains.
    for seed in 0..40u64 {
        let mut c = unix_raw(&path).await;
        c.handshake(seed % 2 == 0).await;
        let mut noise = Vec::new();
        for k in 0..20 {
            noise.extend(REQUEST_MAGIC.to_be_bytes());
            noise.extend(random_bytes(seed * 31 + k, 24));
        }
        let _ = c.s.write_all(&noise).await;
        let _ = c.s.shutdown().await;
        c.expect_closed().await;
    }

    wait_idle(&unix).await;
    let opts = ConnectOptions::new("disk").meta_context(BASE_ALLOCATION);
    let mut good = NbdClient::connect_unix(&path, &opts).await.unwrap();
    assert!(
        good.read(3 * MIB, MIB as usize).await.unwrap() == data[3 * MIB as usize..4 * MIB as usize]
    );
    good.disconnect().await.unwrap();
    wait_idle(&unix).await;
    unix.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_and_clients_that_do_not_read_replies_are_cut_off() {
    let (_, data) = standard_server();
    let export = Arc::new(MemoryExport::new(data, CHUNK));
    let mut config = ServerConfig::new("disk");
    config.handshake_timeout = Duration::from_millis(300);
    config.reply_timeout = Duration::from_millis(300);
    let server = server_with(export, config);
    let dir = tempfile::tempdir().unwrap();
    let unix = server.listen_unix(dir.path().join("s")).unwrap();

    // Connects and says nothing.
    let started = Instant::now();
    let mut silent = unix_raw(unix.path()).await;
    silent.greeting().await;
    silent.expect_closed().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_idle(&unix).await;

    // Asks for 320 MiB and reads none of it.
    let mut greedy = unix_raw(unix.path()).await;
    greedy.handshake(false).await;
    for i in 0..10 {
        greedy.request(0, CMD_READ, i, 0, 32 * 1024 * 1024).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(unix.active_connections(), 1);
    wait_idle(&unix).await;
    drop(greedy);
    drop(silent);
    unix.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_what_is_in_flight_then_closes() {
    let data = standard_disk();
    let export = SlowExport::new(data.clone(), 64 * KIB, Duration::ZERO);
    let mut config = ServerConfig::new("disk");
    config.shutdown_grace = Duration::from_millis(500);
    let server = server_with(export.clone(), config);
    let dir = tempfile::tempdir().unwrap();
    let unix = server.listen_unix(dir.path().join("s")).unwrap();
    let path = unix.path().to_path_buf();

    let mut c = unix_raw(&path).await;
    c.handshake(true).await;
    c.request(0, CMD_READ, 1, 0, 4096).await; // held at the gate
    let mut idle = unix_raw(&path).await;
    idle.handshake(true).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(unix.active_connections(), 2);

    let stopping = tokio::spawn(unix.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!path.exists(), "the socket is still there");
    assert!(UnixStream::connect(&path).await.is_err());
    idle.expect_closed().await;
    export.gate.add_permits(1);
    let (got, _) = c.read_chunks(1, 0, 4096).await;
    assert!(got == data[..4096]);
    c.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(2), stopping)
        .await
        .expect("shutdown hangs")
        .unwrap();

    // A read that never finishes is cut after the grace period.
    let server = server_with(
        SlowExport::new(data, SIZE, Duration::ZERO),
        ServerConfig {
            shutdown_grace: Duration::from_millis(200),
            ..ServerConfig::new("disk")
        },
    );
    let unix = server.listen_unix(&path).unwrap();
    let mut c = unix_raw(&path).await;
    c.handshake(true).await;
    c.request(0, CMD_READ, 1, 0, 4096).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), unix.shutdown())
        .await
        .expect("shutdown hangs");
    assert!(started.elapsed() >= Duration::from_millis(150));
    c.expect_closed().await;
}

#[tokio::test]
async fn the_socket_path_is_checked() {
    let (server, _) = standard_server();
    let dir = tempfile::tempdir().unwrap();
    // Not a socket: refused, left alone.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(server.listen_unix(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A live server's socket: refused.
    let path = dir.path().join("s");
    let first = server.listen_unix(&path).unwrap();
    assert!(server.listen_unix(&path).is_err());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // A stale socket (its server died without cleaning up): replaced.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("stale")).unwrap());
    let second = server.listen_unix(dir.path().join("stale")).unwrap();
    let c = NbdClient::connect_unix(second.path(), &ConnectOptions::new("")).await;
    assert!(c.is_ok());
    drop(c);
    first.shutdown().await;
    second.shutdown().await;
    assert!(!path.exists());
}

/// Panics on reads at `at` — a bug in an export must not leave the client
/// waiting forever for its reply.
struct PanickingExport {
    inner: MemoryExport,
    at: u64,
}

#[siterec_nbd::async_trait]
impl Export for PanickingExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<Segment>, ExportError> {
        if offset == self.at {
            panic!("export bug (expected by the test)");
        }
        self.inner.read(offset, len).await
    }
}

#[tokio::test]
async fn a_panicking_export_read_is_answered_with_eio() {
    let data = standard_disk();
    let export = Arc::new(PanickingExport {
        inner: MemoryExport::new(data.clone(), CHUNK),
        at: 4096,
    });
    let server = server_with(export, ServerConfig::new("disk"));
    let (a, h) = serve_duplex(&server);
    let opts = ConnectOptions::new("disk").meta_context(BASE_ALLOCATION);
    let mut c = NbdClient::handshake(a, &opts).await.unwrap();
    let err = c.read(4096, 512).await.expect_err("must fail");
    assert!(
        matches!(err, NbdError::Server { errno: EIO, .. }),
        "{err:?}"
    );
    assert!(c.read(0, 512).await.unwrap() == data[..512]);
    // The trait's default extents: everything is data.
    let id = c.meta_context_id(BASE_ALLOCATION).unwrap();
    let ext = c.block_status(id, 0, 1 << 20).await.unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!((ext[0].length, ext[0].flags), (1 << 20, 0));
    c.disconnect().await.unwrap();
    ended(h).await.unwrap();
}
