//! A read-only NBD server: one [`Export`] under one name (and the default
//! name `""`), over any `AsyncRead + AsyncWrite` stream ([`NbdServer::serve`])
//! or on a Unix socket with an accept loop ([`NbdServer::listen_unix`]).
//!
//! Handshake (fixed newstyle, `NBD_FLAG_NO_ZEROES`): `NBD_OPT_GO`,
//! `NBD_OPT_INFO` (`NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` always,
//! `NBD_INFO_NAME` on request, `NBD_INFO_DESCRIPTION` when configured),
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` (`base:allocation`
//! only), `NBD_OPT_LIST`, `NBD_OPT_ABORT`; `NBD_OPT_STARTTLS` is refused with
//! `NBD_REP_ERR_POLICY`, anything else with `NBD_REP_ERR_UNSUP` (extended
//! headers among them, so clients fall back to structured replies).
//!
//! Transmission flags: `HAS_FLAGS | READ_ONLY | CAN_MULTI_CONN` (nothing is
//! written, so every connection sees the same bytes), plus `SEND_DF` with
//! structured replies. Commands:
//! - `NBD_CMD_READ`: a simple reply, or structured `OFFSET_DATA` chunks with
//!   the export's zero segments as `OFFSET_HOLE` chunks (one data chunk with
//!   the zeros filled in under `NBD_CMD_FLAG_DF`);
//! - `NBD_CMD_BLOCK_STATUS` for `base:allocation` (`NBD_STATE_HOLE`,
//!   `NBD_STATE_ZERO`), honouring `NBD_CMD_FLAG_REQ_ONE`;
//! - `NBD_CMD_WRITE`, `NBD_CMD_TRIM`, `NBD_CMD_WRITE_ZEROES`: `EPERM` (a
//!   write's payload is read and dropped, so the stream stays in step);
//! - `NBD_CMD_FLUSH`: success, nothing to do; `NBD_CMD_DISC`: in-flight
//!   requests are answered, then the connection is closed;
//! - requests past the end, reads larger than the maximum block size, a
//!   zero-length block status, flags the command does not take and unknown
//!   commands: `EINVAL`, and the connection goes on.
//!
//! Each read and block status runs in its own task, so a slow chunk fetch
//! does not hold up the requests behind it; replies go out in the order they
//! complete, serialized by one writer. At most
//! [`ServerConfig::max_requests_in_flight`] requests and
//! [`ServerConfig::max_buffered_bytes`] of read data are outstanding per
//! connection: past that the server stops reading requests until replies
//! have been written. An [`Export`] error becomes an `EIO` reply (with the
//! message, under structured replies) and the connection goes on.
//!
//! Nothing the client sends is trusted: option payloads over
//! [`proto::MAX_OPTION_DATA`] are skipped unread (or end the connection past
//! [`proto::MAX_OPTION_SKIP`]), names and queries over 4096 bytes are
//! refused, the handshake must finish within
//! [`ServerConfig::handshake_timeout`], and a reply the client does not read
//! within [`ServerConfig::reply_timeout`] ends the connection. A bad magic
//! ends the connection (the stream can no longer be parsed); when it ends,
//! for whatever reason, its request tasks are aborted.
//!
//! Not supported: TLS, extended headers, writes, `NBD_CMD_CACHE`, meta
//! contexts other than `base:allocation`, several exports per server.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tracing::{Instrument, debug, error, warn};

use crate::error::{NbdError, Result};
use crate::export::{Export, Segment};
use crate::proto::{self, Reader};

/// The meta context id the server gives `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;
/// The most descriptors in one block status reply (QEMU's server sends at
/// most as many; the rest is asked for again).
const MAX_DESCRIPTORS: usize = 128 * 1024;
/// Buffer size of each direction of a connection.
const IO_BUFFER: usize = 64 * 1024;
/// Zeros to stream for holes in replies without structured replies.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// How the server presents its export and what it allows each client.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export's name. `""` (the default export) is accepted too.
    pub export_name: String,
    /// A description for humans (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: Option<String>,
    /// The preferred block size announced (`NBD_INFO_BLOCK_SIZE`): a power
    /// of two from 512 up to `max_block`. Default 4096 (as `qemu-nbd`).
    pub preferred_block: u32,
    /// The largest read accepted, announced as the maximum block size:
    /// at most 32 MiB (the default).
    pub max_block: u32,
    /// Requests one connection may have in flight (reads and block status
    /// running or replies waiting to be written). Default 16.
    pub max_requests_in_flight: usize,
    /// Bytes of read data one connection may hold in flight; at least
    /// `max_block`. Default 64 MiB.
    pub max_buffered_bytes: u32,
    /// The handshake must end (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME` or
    /// `NBD_OPT_ABORT`) within this time. Default 30 s.
    pub handshake_timeout: Duration,
    /// A reply (or the flush after a batch) that cannot be written within
    /// this time ends the connection: a client that stops reading its
    /// replies. Default 120 s.
    pub reply_timeout: Duration,
    /// Connections served at once by [`NbdServer::listen_unix`]; more are
    /// closed as soon as they are accepted. Default 16.
    pub max_connections: usize,
    /// On shutdown, how long connections get to answer what is in flight
    /// before they are cut. Default 5 s.
    pub shutdown_grace: Duration,
    /// Permissions of the Unix socket. Default `0o600`.
    pub socket_mode: u32,
}

impl ServerConfig {
    /// Defaults for an export named `export_name`.
    pub fn new(export_name: impl Into<String>) -> Self {
        ServerConfig {
            export_name: export_name.into(),
            description: None,
            preferred_block: 4096,
            max_block: proto::MAX_READ_PAYLOAD,
            max_requests_in_flight: 16,
            max_buffered_bytes: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(120),
            max_connections: 16,
            shutdown_grace: Duration::from_secs(5),
            socket_mode: 0o600,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NbdError::Config(m));
        if self.export_name.len() > proto::MAX_STRING || self.export_name.contains('\0') {
            return bad(format!(
                "export name must be at most {} bytes without NUL",
                proto::MAX_STRING
            ));
        }
        if let Some(d) = &self.description
            && (d.len() > proto::MAX_STRING || d.contains('\0'))
        {
            return bad(format!(
                "description must be at most {} bytes without NUL",
                proto::MAX_STRING
            ));
        }
        if self.max_block == 0 || self.max_block > proto::MAX_READ_PAYLOAD {
            return bad(format!(
                "maximum block size {} is not within 1..={}",
                self.max_block,
                proto::MAX_READ_PAYLOAD
            ));
        }
        if !self.preferred_block.is_power_of_two()
            || self.preferred_block < 512
            || self.preferred_block > self.max_block
        {
            return bad(format!(
                "preferred block size {} must be a power of two from 512 to the maximum block size {}",
                self.preferred_block, self.max_block
            ));
        }
        if self.max_requests_in_flight == 0 || self.max_requests_in_flight > Semaphore::MAX_PERMITS
        {
            return bad("max_requests_in_flight must be at least 1".into());
        }
        if self.max_buffered_bytes < self.max_block {
            return bad(format!(
                "max_buffered_bytes {} is smaller than the maximum block size {}",
                self.max_buffered_bytes, self.max_block
            ));
        }
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        Ok(())
    }
}

struct Inner {
    export: Arc<dyn Export>,
    size: u64,
    config: ServerConfig,
}

impl Inner {
    /// Whether `name` names our export (its name or the default `""`).
    fn is_ours(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.config.export_name.as_bytes()
    }
}

/// A read-only NBD server for one export. Cheap to clone; every clone
/// serves the same export.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("size", &self.inner.size)
            .field("config", &self.inner.config)
            .finish()
    }
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy)]
struct Session {
    structured: bool,
    base_allocation: bool,
}

impl NbdServer {
    /// A server for `export`. Fails if the configuration cannot be carried
    /// by the protocol or the export is larger than 2^63 - 1 bytes.
    pub fn new(export: Arc<dyn Export>, config: ServerConfig) -> Result<Self> {
        config.validate()?;
        let size = export.size();
        if size > i64::MAX as u64 {
            return Err(NbdError::Config(format!(
                "export size {size} is larger than NBD clients accept"
            )));
        }
        Ok(NbdServer {
            inner: Arc::new(Inner {
                export,
                size,
                config,
            }),
        })
    }

    /// The export's size in bytes.
    pub fn export_size(&self) -> u64 {
        self.inner.size
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Serves one client on `stream` until it disconnects (`Ok` after
    /// `NBD_CMD_DISC`, `NBD_OPT_ABORT` or a close between requests) or
    /// breaks the protocol (`Err`).
    pub async fn serve<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite,
    {
        self.serve_until(stream, std::future::pending()).await
    }

    /// [`Self::serve`], but when `shutdown` completes the server stops
    /// reading requests, answers those in flight and closes the connection
    /// (during the handshake it just closes it).
    pub async fn serve_until<S, F>(&self, stream: S, shutdown: F) -> Result<()>
    where
        S: AsyncRead + AsyncWrite,
        F: Future<Output = ()>,
    {
        let (r, w) = tokio::io::split(stream);
        let mut r = BufReader::with_capacity(IO_BUFFER, r);
        let mut w = BufWriter::with_capacity(IO_BUFFER, w);
        let mut shutdown = std::pin::pin!(shutdown);
        let limit = self.inner.config.handshake_timeout;
        let session = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            res = tokio::time::timeout(limit, handshake(&mut r, &mut w, &self.inner)) => match res {
                Err(_) => {
                    return Err(NbdError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client did not finish the handshake within {limit:?}"),
                    )));
                }
                Ok(Ok(Some(session))) => session,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
            }
        };
        debug!(
            structured = session.structured,
            base_allocation = session.base_allocation,
            "NBD client entered transmission"
        );
        transmission(r, w, session, &self.inner, shutdown).await
    }

    /// Listens on a Unix socket at `path` and serves every client that
    /// connects, each in its own task, until [`UnixServer::shutdown`] (or
    /// until the [`UnixServer`] is dropped). The socket gets
    /// [`ServerConfig::socket_mode`]. A stale socket file left by a dead
    /// server is replaced; any other file at `path` is an error. Must be
    /// called within a tokio runtime.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<UnixServer> {
        let path = path.as_ref().to_path_buf();
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(self.inner.config.socket_mode),
        )?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let active = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(
            self.clone(),
            listener,
            path.clone(),
            stop_rx,
            active.clone(),
        ));
        Ok(UnixServer {
            path,
            stop: stop_tx,
            task: Some(task),
            active,
        })
    }
}

/// A server listening on a Unix socket (from [`NbdServer::listen_unix`]).
/// Dropping it stops the server as [`Self::shutdown`] does, without
/// waiting.
#[derive(Debug)]
pub struct UnixServer {
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    active: Arc<AtomicUsize>,
}

impl UnixServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many connections are being served now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Stops accepting, removes the socket file, lets connections answer
    /// what they have in flight (up to [`ServerConfig::shutdown_grace`]),
    /// closes them, and returns when all are gone.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            error!(error = %e, "NBD accept loop failed");
        }
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Removes a socket file nobody listens on; refuses anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another server is listening on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// Counts a live connection; the count drops with the guard, however the
/// connection's task ends (returned, aborted or panicked).
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(count)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn log_task_end(what: &str, res: std::result::Result<(), JoinError>) {
    if let Err(e) = res
        && e.is_panic()
    {
        error!(error = %e, "NBD {what} task panicked");
    }
}

async fn accept_loop(
    server: NbdServer,
    listener: UnixListener,
    path: PathBuf,
    mut stop: watch::Receiver<bool>,
    active: Arc<AtomicUsize>,
) {
    let config = &server.inner.config;
    let conn_stop = stop.clone();
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            // Completes on `true` and when the handle is dropped. (The
            // guard `wait_for` returns must not live across an await.)
            _ = async { stop.wait_for(|v| *v).await.is_ok() } => break,
            Some(res) = conns.join_next(), if !conns.is_empty() => log_task_end("connection", res),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if conns.len() >= config.max_connections {
                        warn!(
                            max = config.max_connections,
                            "NBD connection refused: too many connections"
                        );
                        drop(stream);
                        continue;
                    }
                    next_id += 1;
                    let guard = ActiveGuard::new(active.clone());
                    let server = server.clone();
                    let mut stop = conn_stop.clone();
                    let span = tracing::debug_span!("nbd_connection", id = next_id);
                    conns.spawn(
                        async move {
                            let _guard = guard;
                            let shutdown = async move {
                                let _ = stop.wait_for(|v| *v).await;
                            };
                            match server.serve_until(stream, shutdown).await {
                                Ok(()) => debug!("NBD connection closed"),
                                Err(e) => debug!(error = %e, "NBD connection ended with an error"),
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // EMFILE and the like: wait rather than spin.
                    warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "could not remove the NBD socket");
    }
    let drain = async {
        while let Some(res) = conns.join_next().await {
            log_task_end("connection", res);
        }
    };
    if tokio::time::timeout(config.shutdown_grace, drain)
        .await
        .is_err()
    {
        warn!(
            left = conns.len(),
            "NBD connections still busy after the shutdown grace period: closing them"
        );
        conns.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// Handshake

fn client_err(msg: impl Into<String>) -> NbdError {
    NbdError::ClientProtocol(msg.into())
}

/// The message of a parse error of option data.
fn parse_msg(e: NbdError) -> String {
    match e {
        NbdError::Protocol(m) => m,
        other => other.to_string(),
    }
}

/// A client-supplied name, shortened and made printable for messages.
fn shown(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(&name[..name.len().min(256)]);
    format!("{s:?}")
}

fn transmission_flags(structured: bool) -> u16 {
    let mut flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY | proto::TFLAG_CAN_MULTI_CONN;
    if structured {
        flags |= proto::TFLAG_SEND_DF;
    }
    flags
}

async fn send_rep<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> Result<()> {
    let mut head = [0u8; 20];
    head[0..8].copy_from_slice(&proto::REPLY_MAGIC_OPT.to_be_bytes());
    head[8..12].copy_from_slice(&opt.to_be_bytes());
    head[12..16].copy_from_slice(&kind.to_be_bytes());
    head[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(data).await?;
    Ok(())
}

/// Sends an error reply with a message, and flushes.
async fn send_err<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, kind: u32, msg: &str) -> Result<()> {
    send_rep(w, opt, kind, clip_message(msg).as_bytes()).await?;
    w.flush().await?;
    Ok(())
}

/// Sends `NBD_REP_ACK` and flushes.
async fn send_ack<W: AsyncWrite + Unpin>(w: &mut W, opt: u32) -> Result<()> {
    send_rep(w, opt, proto::REP_ACK, &[]).await?;
    w.flush().await?;
    Ok(())
}

/// Reads and drops `n` bytes without buffering them.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *r).take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the client closed the connection inside a payload",
        ));
    }
    Ok(())
}

/// Reads a u32 or u64 at a point where the client may legitimately hang up:
/// `None` on a clean end of stream.
async fn read_u32_or_eof<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<u32>> {
    match r.read_u32().await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn read_u64_or_eof<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<u64>> {
    match r.read_u64().await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: the name and the info types
/// asked for.
fn parse_info(data: &[u8]) -> std::result::Result<(&[u8], Vec<u16>), String> {
    let mut r = Reader::new(data, "NBD_OPT_GO data");
    let name_len = r.u32().map_err(parse_msg)? as usize;
    if name_len > proto::MAX_STRING {
        return Err(format!(
            "export name of {name_len} bytes (at most {})",
            proto::MAX_STRING
        ));
    }
    let name = r.bytes(name_len).map_err(parse_msg)?;
    let count = r.u16().map_err(parse_msg)?;
    let mut requests = Vec::new();
    for _ in 0..count {
        requests.push(r.u16().map_err(parse_msg)?);
    }
    r.end().map_err(parse_msg)?;
    Ok((name, requests))
}

/// Parses `NBD_OPT_{LIST,SET}_META_CONTEXT` data: the name and the queries.
fn parse_meta(data: &[u8]) -> std::result::Result<(&[u8], Vec<&[u8]>), String> {
    let mut r = Reader::new(data, "meta context option data");
    let name_len = r.u32().map_err(parse_msg)? as usize;
    if name_len > proto::MAX_STRING {
        return Err(format!(
            "export name of {name_len} bytes (at most {})",
            proto::MAX_STRING
        ));
    }
    let name = r.bytes(name_len).map_err(parse_msg)?;
    let count = r.u32().map_err(parse_msg)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32().map_err(parse_msg)? as usize;
        if len > proto::MAX_STRING {
            return Err(format!(
                "meta context query of {len} bytes (at most {})",
                proto::MAX_STRING
            ));
        }
        queries.push(r.bytes(len).map_err(parse_msg)?);
    }
    r.end().map_err(parse_msg)?;
    Ok((name, queries))
}

/// The option haggling. `Ok(None)`: the client aborted or went away.
async fn handshake<R, W>(r: &mut R, w: &mut W, inner: &Inner) -> Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello[16..18]
        .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;

    let Some(client_flags) = read_u32_or_eof(r).await? else {
        return Ok(None);
    };
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(client_err(format!(
            "unknown client flags {:#x}",
            client_flags & !known
        )));
    }
    let fixed = client_flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut session = Session {
        structured: false,
        base_allocation: false,
    };
    let config = &inner.config;

    loop {
        let Some(magic) = read_u64_or_eof(r).await? else {
            return Ok(None);
        };
        if magic != proto::IHAVEOPT {
            return Err(client_err(format!("bad option magic {magic:#018x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if !fixed && opt != proto::OPT_EXPORT_NAME {
            return Err(client_err(format!(
                "{} from a client without fixed newstyle",
                proto::opt_name(opt)
            )));
        }
        if len > proto::MAX_OPTION_DATA {
            if opt == proto::OPT_EXPORT_NAME || len > proto::MAX_OPTION_SKIP {
                return Err(client_err(format!(
                    "{} with {len} bytes of data",
                    proto::opt_name(opt)
                )));
            }
            skip(r, u64::from(len)).await?;
            send_err(
                w,
                opt,
                proto::REP_ERR_TOO_BIG,
                &format!("option data of {len} bytes is too large"),
            )
            .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match opt {
            proto::OPT_EXPORT_NAME => {
                if !inner.is_ours(&data) {
                    // No error reply exists for this option: hang up.
                    return Err(client_err(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {}",
                        shown(&data)
                    )));
                }
                w.write_u64(inner.size).await?;
                w.write_u16(transmission_flags(session.structured)).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; proto::EXPORT_NAME_ZEROES]).await?;
                }
                w.flush().await?;
                return Ok(Some(session));
            }
            proto::OPT_ABORT => {
                // The client may hang up without reading this.
                let _ = send_ack(w, opt).await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    send_err(w, opt, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                let name = config.export_name.as_bytes();
                let mut entry = (name.len() as u32).to_be_bytes().to_vec();
                entry.extend_from_slice(name);
                if let Some(d) = &config.description {
                    entry.extend_from_slice(d.as_bytes());
                }
                send_rep(w, opt, proto::REP_SERVER, &entry).await?;
                send_ack(w, opt).await?;
            }
            proto::OPT_STARTTLS => {
                send_err(w, opt, proto::REP_ERR_POLICY, "TLS is not offered").await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let (name, requests) = match parse_info(&data) {
                    Ok(v) => v,
                    Err(m) => {
                        send_err(w, opt, proto::REP_ERR_INVALID, &m).await?;
                        continue;
                    }
                };
                if !inner.is_ours(name) {
                    send_err(
                        w,
                        opt,
                        proto::REP_ERR_UNKNOWN,
                        &format!("no export named {}", shown(name)),
                    )
                    .await?;
                    continue;
                }
                if requests.contains(&proto::INFO_NAME) {
                    let mut info = proto::INFO_NAME.to_be_bytes().to_vec();
                    info.extend_from_slice(config.export_name.as_bytes());
                    send_rep(w, opt, proto::REP_INFO, &info).await?;
                }
                if let Some(d) = &config.description {
                    let mut info = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
                    info.extend_from_slice(d.as_bytes());
                    send_rep(w, opt, proto::REP_INFO, &info).await?;
                }
                let mut info = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                info.extend_from_slice(&1u32.to_be_bytes());
                info.extend_from_slice(&config.preferred_block.to_be_bytes());
                info.extend_from_slice(&config.max_block.to_be_bytes());
                send_rep(w, opt, proto::REP_INFO, &info).await?;
                let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&inner.size.to_be_bytes());
                info.extend_from_slice(&transmission_flags(session.structured).to_be_bytes());
                send_rep(w, opt, proto::REP_INFO, &info).await?;
                send_ack(w, opt).await?;
                if opt == proto::OPT_GO {
                    return Ok(Some(session));
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_err(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if session.structured {
                    send_err(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "structured replies are already negotiated",
                    )
                    .await?;
                } else {
                    session.structured = true;
                    send_ack(w, opt).await?;
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                if set {
                    // A new selection replaces the old one, also when it fails.
                    session.base_allocation = false;
                }
                if !session.structured {
                    send_err(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "meta contexts need structured replies first",
                    )
                    .await?;
                    continue;
                }
                let (name, queries) = match parse_meta(&data) {
                    Ok(v) => v,
                    Err(m) => {
                        send_err(w, opt, proto::REP_ERR_INVALID, &m).await?;
                        continue;
                    }
                };
                if !inner.is_ours(name) {
                    send_err(
                        w,
                        opt,
                        proto::REP_ERR_UNKNOWN,
                        &format!("no export named {}", shown(name)),
                    )
                    .await?;
                    continue;
                }
                let selected = if set {
                    queries
                        .iter()
                        .any(|q| *q == proto::BASE_ALLOCATION.as_bytes())
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == proto::BASE_ALLOCATION.as_bytes() || *q == b"base:")
                };
                if selected {
                    // Ids in a list reply are reserved: 0.
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut reply = id.to_be_bytes().to_vec();
                    reply.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    send_rep(w, opt, proto::REP_META_CONTEXT, &reply).await?;
                }
                if set {
                    session.base_allocation = selected;
                }
                send_ack(w, opt).await?;
            }
            other => {
                send_err(
                    w,
                    other,
                    proto::REP_ERR_UNSUP,
                    &format!("{} is not supported", proto::opt_name(other)),
                )
                .await?;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Transmission

/// A reply on its way to the writer, with the permits it holds until it has
/// been written.
struct Reply {
    cookie: u64,
    body: Body,
    _slot: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

enum Body {
    /// Success without data.
    Ok,
    Error {
        errno: u32,
        message: String,
    },
    Read {
        offset: u64,
        segments: Vec<Segment>,
        df: bool,
    },
    Extents {
        context: u32,
        descriptors: Vec<(u32, u32)>,
    },
}

impl Reply {
    fn inline(cookie: u64, body: Body) -> Self {
        Reply {
            cookie,
            body,
            _slot: None,
            _bytes: None,
        }
    }

    fn error(cookie: u64, errno: u32, message: impl Into<String>) -> Self {
        Self::inline(
            cookie,
            Body::Error {
                errno,
                message: message.into(),
            },
        )
    }
}

/// Answers with `EIO` if a request task ends without replying (a panic in
/// the export): the client must not wait forever for that cookie.
struct ReplyGuard {
    tx: mpsc::Sender<Reply>,
    cookie: u64,
    replied: bool,
}

impl ReplyGuard {
    async fn send(mut self, reply: Reply) {
        self.replied = true;
        let _ = self.tx.send(reply).await;
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        // Only while unwinding: an aborted task belongs to a connection that
        // is going away, and needs no answer.
        if !self.replied && std::thread::panicking() {
            let _ = self.tx.try_send(Reply::error(
                self.cookie,
                proto::EIO,
                "internal server error",
            ));
        }
    }
}

/// At most 4096 bytes (on a character boundary), without NUL.
fn clip_message(msg: &str) -> String {
    let mut end = msg.len().min(proto::MAX_STRING);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg[..end].replace('\0', " ")
}

/// Checks the export's answer to a read of `len` bytes: lengths must add up;
/// empty segments go, neighbouring zero runs merge.
fn check_segments(segments: Vec<Segment>, len: u32) -> std::result::Result<Vec<Segment>, String> {
    let mut total: u64 = 0;
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for s in segments {
        total = total.saturating_add(s.len());
        if s.is_empty() {
            continue;
        }
        match (out.last_mut(), s) {
            (Some(Segment::Zero(a)), Segment::Zero(b)) => *a = a.saturating_add(b),
            (_, s) => out.push(s),
        }
    }
    if total != u64::from(len) {
        return Err(format!(
            "the export returned {total} bytes for a read of {len}"
        ));
    }
    Ok(out)
}

/// Turns the export's extents into block status descriptors for a request
/// of `len` bytes: cut at `len`, empty ones dropped, equal neighbours
/// merged, at most one with `req_one`.
fn descriptors(
    extents: &[crate::export::ExportExtent],
    len: u32,
    req_one: bool,
) -> Vec<(u32, u32)> {
    let len = u64::from(len);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut total: u64 = 0;
    for e in extents {
        if total >= len {
            break;
        }
        let n = e.length.min(len - total);
        if n == 0 {
            continue;
        }
        let flags = e.flags();
        match out.last_mut() {
            // The sum stays within `len`, which fits in a u32.
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ => {
                if out.len() >= MAX_DESCRIPTORS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((n as u32, flags));
            }
        }
        total += n;
    }
    out
}

/// How the reader loop ended.
enum ReaderEnd {
    /// `NBD_CMD_DISC`, or shutdown: in-flight requests were answered.
    Graceful,
    /// The client closed the connection between requests.
    Closed,
}

struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Reads one request header: `None` on a clean end of stream before it.
async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Request>> {
    let mut h = [0u8; proto::REQUEST_SIZE];
    let mut n = 0;
    while n < h.len() {
        let k = r.read(&mut h[n..]).await?;
        if k == 0 {
            if n == 0 {
                return Ok(None);
            }
            return Err(NbdError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection inside a request header",
            )));
        }
        n += k;
    }
    let mut rd = Reader::new(&h, "request");
    let magic = rd.u32().map_err(|e| client_err(parse_msg(e)))?;
    if magic != proto::REQUEST_MAGIC {
        return Err(client_err(format!("bad request magic {magic:#010x}")));
    }
    let req = Request {
        flags: rd.u16().map_err(|e| client_err(parse_msg(e)))?,
        kind: rd.u16().map_err(|e| client_err(parse_msg(e)))?,
        cookie: rd.u64().map_err(|e| client_err(parse_msg(e)))?,
        offset: rd.u64().map_err(|e| client_err(parse_msg(e)))?,
        len: rd.u32().map_err(|e| client_err(parse_msg(e)))?,
    };
    Ok(Some(req))
}

async fn transmission<R, W, F>(
    mut r: BufReader<R>,
    w: BufWriter<W>,
    session: Session,
    inner: &Arc<Inner>,
    shutdown: std::pin::Pin<&mut F>,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: Future<Output = ()>,
{
    let config = &inner.config;
    let (tx, rx) = mpsc::channel::<Reply>(config.max_requests_in_flight);
    let writer = write_replies(w, rx, session.structured, config.reply_timeout);
    let reader = read_requests(&mut r, tx, session, inner, shutdown);
    let mut writer = std::pin::pin!(writer);
    let mut reader = std::pin::pin!(reader);
    tokio::select! {
        end = &mut reader => match end {
            // Everything in flight has been answered: let the writer drain
            // (each write is bounded by the reply timeout).
            Ok(ReaderEnd::Graceful) => writer.await,
            // The client hung up: whatever is still queued may not arrive.
            Ok(ReaderEnd::Closed) => {
                let _ = writer.await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        // The writer only stops early on an error: the client is gone or
        // stopped reading. Dropping the reader aborts its tasks.
        res = &mut writer => res.and_then(|()| {
            Err(NbdError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the reply writer stopped",
            )))
        }),
    }
}

/// The request loop: validates each request, answers the trivial ones
/// itself and spawns a task for each read and block status.
async fn read_requests<R, F>(
    r: &mut R,
    tx: mpsc::Sender<Reply>,
    session: Session,
    inner: &Arc<Inner>,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Result<ReaderEnd>
where
    R: AsyncRead + Unpin,
    F: Future<Output = ()>,
{
    let config = &inner.config;
    let slots = Arc::new(Semaphore::new(config.max_requests_in_flight));
    let budget = Arc::new(Semaphore::new(config.max_buffered_bytes as usize));
    // Dropped (so aborted) with this future if the connection fails.
    let mut tasks: JoinSet<()> = JoinSet::new();
    let gone = || {
        NbdError::Io(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the reply writer stopped",
        ))
    };
    let end = loop {
        while let Some(res) = tasks.try_join_next() {
            log_task_end("request", res);
        }
        let req = tokio::select! {
            biased;
            _ = &mut shutdown => break ReaderEnd::Graceful,
            req = read_request(r) => req?,
        };
        let Some(req) = req else {
            break ReaderEnd::Closed;
        };
        let cookie = req.cookie;
        let in_range = req
            .offset
            .checked_add(u64::from(req.len))
            .is_some_and(|e| e <= inner.size);
        let out_of_range = || {
            Reply::error(
                cookie,
                proto::EINVAL,
                format!(
                    "{} of {} bytes at offset {} runs past the export size {}",
                    proto::cmd_name(req.kind),
                    req.len,
                    req.offset,
                    inner.size
                ),
            )
        };
        let bad_flags = |allowed: u16| {
            Reply::error(
                cookie,
                proto::EINVAL,
                format!(
                    "flags {:#x} are not valid for {}",
                    req.flags & !allowed,
                    proto::cmd_name(req.kind)
                ),
            )
        };
        let reply = match req.kind {
            proto::CMD_DISC => break ReaderEnd::Graceful,
            proto::CMD_READ => {
                let mut allowed = proto::CMD_FLAG_FUA;
                if session.structured {
                    allowed |= proto::CMD_FLAG_DF;
                }
                if req.flags & !allowed != 0 {
                    bad_flags(allowed)
                } else if req.len > config.max_block {
                    Reply::error(
                        cookie,
                        proto::EINVAL,
                        format!(
                            "read of {} bytes is larger than the maximum block size {}",
                            req.len, config.max_block
                        ),
                    )
                } else if !in_range {
                    out_of_range()
                } else if req.len == 0 {
                    Reply::inline(
                        cookie,
                        Body::Read {
                            offset: req.offset,
                            segments: Vec::new(),
                            df: false,
                        },
                    )
                } else {
                    let slot = slots.clone().acquire_owned().await.map_err(|_| gone())?;
                    let bytes = budget
                        .clone()
                        .acquire_many_owned(req.len)
                        .await
                        .map_err(|_| gone())?;
                    let export = inner.export.clone();
                    let guard = ReplyGuard {
                        tx: tx.clone(),
                        cookie,
                        replied: false,
                    };
                    let (offset, len) = (req.offset, req.len);
                    let df = req.flags & proto::CMD_FLAG_DF != 0;
                    tasks.spawn(async move {
                        let body = match export.read(offset, len).await {
                            Ok(segments) => match check_segments(segments, len) {
                                Ok(segments) => Body::Read {
                                    offset,
                                    segments,
                                    df,
                                },
                                Err(message) => {
                                    error!(offset, len, %message, "NBD export broke the read contract");
                                    Body::Error {
                                        errno: proto::EIO,
                                        message,
                                    }
                                }
                            },
                            Err(e) => {
                                warn!(offset, len, error = %e, "NBD export read failed");
                                Body::Error {
                                    errno: proto::EIO,
                                    message: e.to_string(),
                                }
                            }
                        };
                        guard
                            .send(Reply {
                                cookie,
                                body,
                                _slot: Some(slot),
                                _bytes: Some(bytes),
                            })
                            .await;
                    });
                    continue;
                }
            }
            proto::CMD_BLOCK_STATUS => {
                let allowed = proto::CMD_FLAG_FUA | proto::CMD_FLAG_REQ_ONE;
                if !session.structured || !session.base_allocation {
                    Reply::error(
                        cookie,
                        proto::EINVAL,
                        "block status without a negotiated meta context",
                    )
                } else if req.flags & !allowed != 0 {
                    bad_flags(allowed)
                } else if req.len == 0 {
                    Reply::error(cookie, proto::EINVAL, "block status of 0 bytes")
                } else if !in_range {
                    out_of_range()
                } else {
                    let slot = slots.clone().acquire_owned().await.map_err(|_| gone())?;
                    let export = inner.export.clone();
                    let guard = ReplyGuard {
                        tx: tx.clone(),
                        cookie,
                        replied: false,
                    };
                    let (offset, len) = (req.offset, req.len);
                    let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
                    tasks.spawn(async move {
                        let body = match export.extents(offset, len).await {
                            Ok(extents) => {
                                let descriptors = descriptors(&extents, len, req_one);
                                if descriptors.is_empty() {
                                    error!(offset, len, "NBD export reported no extents");
                                    Body::Error {
                                        errno: proto::EIO,
                                        message: "the export reported no extents".into(),
                                    }
                                } else {
                                    Body::Extents {
                                        context: BASE_ALLOCATION_ID,
                                        descriptors,
                                    }
                                }
                            }
                            Err(e) => {
                                warn!(offset, len, error = %e, "NBD export block status failed");
                                Body::Error {
                                    errno: proto::EIO,
                                    message: e.to_string(),
                                }
                            }
                        };
                        guard
                            .send(Reply {
                                cookie,
                                body,
                                _slot: Some(slot),
                                _bytes: None,
                            })
                            .await;
                    });
                    continue;
                }
            }
            proto::CMD_WRITE => {
                // Keep the stream in step: the payload follows the header.
                skip(r, u64::from(req.len)).await?;
                Reply::error(cookie, proto::EPERM, "the export is read-only")
            }
            proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {
                Reply::error(cookie, proto::EPERM, "the export is read-only")
            }
            proto::CMD_FLUSH => Reply::inline(cookie, Body::Ok),
            other => Reply::error(
                cookie,
                proto::EINVAL,
                format!("{} is not supported", proto::cmd_name(other)),
            ),
        };
        tx.send(reply).await.map_err(|_| gone())?;
    };
    match end {
        ReaderEnd::Graceful => {
            while let Some(res) = tasks.join_next().await {
                log_task_end("request", res);
            }
        }
        ReaderEnd::Closed => tasks.shutdown().await,
    }
    Ok(end)
}

async fn timed<T>(limit: Duration, fut: impl Future<Output = io::Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(res) => Ok(res?),
        Err(_) => Err(NbdError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client did not take a reply within {limit:?}"),
        ))),
    }
}

/// The writer: encodes replies in the order they arrive, flushing whenever
/// nothing more is queued. Ends when every sender is gone.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
    limit: Duration,
) -> Result<()> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            timed(limit, encode(&mut w, &reply, structured)).await?;
            drop(reply); // releases its permits
            next = rx.try_recv().ok();
        }
        timed(limit, w.flush()).await?;
    }
    timed(limit, w.flush()).await?;
    timed(limit, w.shutdown()).await?;
    Ok(())
}

async fn simple_header<W: AsyncWrite + Unpin>(
    w: &mut W,
    errno: u32,
    cookie: u64,
) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&errno.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&h).await
}

async fn chunk_header<W: AsyncWrite + Unpin>(
    w: &mut W,
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&length.to_be_bytes());
    w.write_all(&h).await
}

async fn write_zeroes<W: AsyncWrite + Unpin>(w: &mut W, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROES.len() as u64) as usize;
        w.write_all(&ZEROES[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Writes segments as plain bytes, zeros filled in.
async fn write_segments<W: AsyncWrite + Unpin>(w: &mut W, segments: &[Segment]) -> io::Result<()> {
    for s in segments {
        match s {
            Segment::Data(b) => w.write_all(b).await?,
            Segment::Zero(n) => write_zeroes(w, u64::from(*n)).await?,
        }
    }
    Ok(())
}

async fn encode<W: AsyncWrite + Unpin>(
    w: &mut W,
    reply: &Reply,
    structured: bool,
) -> io::Result<()> {
    let cookie = reply.cookie;
    match (&reply.body, structured) {
        (Body::Ok, _) => simple_header(w, 0, cookie).await,
        (Body::Error { errno, .. }, false) => simple_header(w, *errno, cookie).await,
        (Body::Error { errno, message }, true) => {
            let msg = clip_message(message);
            chunk_header(
                w,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR,
                cookie,
                6 + msg.len() as u32,
            )
            .await?;
            w.write_all(&errno.to_be_bytes()).await?;
            w.write_all(&(msg.len() as u16).to_be_bytes()).await?;
            w.write_all(msg.as_bytes()).await
        }
        (Body::Read { segments, .. }, false) => {
            simple_header(w, 0, cookie).await?;
            write_segments(w, segments).await
        }
        (Body::Read { segments, .. }, true) if segments.is_empty() => {
            chunk_header(w, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, cookie, 0).await
        }
        (
            Body::Read {
                offset,
                segments,
                df: true,
            },
            true,
        ) => {
            // One data chunk; the total is at most the maximum block size.
            let total: u64 = segments.iter().map(Segment::len).sum();
            chunk_header(
                w,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + total as u32,
            )
            .await?;
            w.write_all(&offset.to_be_bytes()).await?;
            write_segments(w, segments).await
        }
        (
            Body::Read {
                offset,
                segments,
                df: false,
            },
            true,
        ) => {
            let mut at = *offset;
            for (i, s) in segments.iter().enumerate() {
                let flags = if i + 1 == segments.len() {
                    proto::REPLY_FLAG_DONE
                } else {
                    0
                };
                match s {
                    Segment::Data(b) => {
                        chunk_header(
                            w,
                            flags,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            8 + b.len() as u32,
                        )
                        .await?;
                        w.write_all(&at.to_be_bytes()).await?;
                        w.write_all(b).await?;
                    }
                    Segment::Zero(n) => {
                        chunk_header(w, flags, proto::REPLY_TYPE_OFFSET_HOLE, cookie, 12).await?;
                        w.write_all(&at.to_be_bytes()).await?;
                        w.write_all(&n.to_be_bytes()).await?;
                    }
                }
                at += s.len();
            }
            Ok(())
        }
        (
            Body::Extents {
                context,
                descriptors,
            },
            true,
        ) => {
            chunk_header(
                w,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_BLOCK_STATUS,
                cookie,
                4 + 8 * descriptors.len() as u32,
            )
            .await?;
            let mut buf = Vec::with_capacity(4 + 8 * descriptors.len());
            buf.extend_from_slice(&context.to_be_bytes());
            for (len, flags) in descriptors {
                buf.extend_from_slice(&len.to_be_bytes());
                buf.extend_from_slice(&flags.to_be_bytes());
            }
            w.write_all(&buf).await
        }
        // Never built: block status is refused without structured replies.
        (Body::Extents { .. }, false) => simple_header(w, proto::EINVAL, cookie).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportExtent;
    use bytes::Bytes;

    #[test]
    fn segments_must_add_up_and_zero_runs_merge() {
        let segs = vec![
            Segment::Zero(10),
            Segment::Zero(0),
            Segment::Zero(5),
            Segment::Data(Bytes::new()),
            Segment::Data(Bytes::from_static(b"abc")),
            Segment::Zero(2),
        ];
        assert_eq!(
            check_segments(segs.clone(), 20).unwrap(),
            vec![
                Segment::Zero(15),
                Segment::Data(Bytes::from_static(b"abc")),
                Segment::Zero(2)
            ]
        );
        assert!(check_segments(segs.clone(), 21).is_err());
        assert!(check_segments(segs, 19).is_err());
        assert!(check_segments(vec![Segment::Zero(u32::MAX); 3], 5).is_err());
    }

    #[test]
    fn descriptors_are_clipped_merged_and_bounded() {
        let e = [
            ExportExtent::hole(100),
            ExportExtent::hole(50),
            ExportExtent::data(0),
            ExportExtent::data(30),
            ExportExtent::zero(1000),
        ];
        assert_eq!(
            descriptors(&e, 200, false),
            vec![(150, 3), (30, 0), (20, 2)]
        );
        assert_eq!(descriptors(&e, 200, true), vec![(150, 3)]);
        assert_eq!(descriptors(&e, 120, false), vec![(120, 3)]);
        assert!(descriptors(&[], 10, false).is_empty());
        let many: Vec<_> = (0..MAX_DESCRIPTORS + 10)
            .map(|i| {
                if i % 2 == 0 {
                    ExportExtent::data(1)
                } else {
                    ExportExtent::hole(1)
                }
            })
            .collect();
        assert_eq!(descriptors(&many, u32::MAX, false).len(), MAX_DESCRIPTORS);
        let huge = [ExportExtent::data(u64::MAX)];
        assert_eq!(descriptors(&huge, u32::MAX, false), vec![(u32::MAX, 0)]);
    }

    #[test]
    fn messages_are_clipped_on_char_boundaries() {
        let long = "é".repeat(3000); // 6000 bytes
        let m = clip_message(&long);
        assert!(m.len() <= proto::MAX_STRING);
        assert!(m.chars().all(|c| c == 'é'));
        assert_eq!(clip_message("a\0b"), "a b");
    }

    #[test]
    fn config_is_validated() {
        let ok = ServerConfig::new("disk");
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.preferred_block = 3000;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.max_block = 64 * 1024 * 1024;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.max_buffered_bytes = 1024;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.export_name = "x".repeat(5000);
        assert!(c.validate().is_err());
        let mut c = ok;
        c.max_requests_in_flight = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn info_and_meta_data_are_parsed_strictly() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend(b"disk");
        d.extend(2u16.to_be_bytes());
        d.extend(proto::INFO_BLOCK_SIZE.to_be_bytes());
        d.extend(proto::INFO_NAME.to_be_bytes());
        let (name, req) = parse_info(&d).unwrap();
        assert_eq!(name, b"disk");
        assert_eq!(req, vec![proto::INFO_BLOCK_SIZE, proto::INFO_NAME]);
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_info(&extra).is_err());
        assert!(parse_info(&d[..d.len() - 1]).is_err());
        assert!(parse_info(&u32::MAX.to_be_bytes()).is_err());

        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend(u32::MAX.to_be_bytes()); // claims 4 billion queries
        m.extend(15u32.to_be_bytes());
        m.extend(b"base:allocation");
        assert!(parse_meta(&m).is_err());
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend(1u32.to_be_bytes());
        m.extend(15u32.to_be_bytes());
        m.extend(b"base:allocation");
        let (name, q) = parse_meta(&m).unwrap();
        assert!(name.is_empty());
        assert_eq!(q, vec![b"base:allocation".as_slice()]);
    }
}
