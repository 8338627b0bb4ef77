//! A client of QEMU's guest agent (`qemu-ga` in the guest), for freezing
//! the guest's filesystems around an app-consistent recovery point.
//!
//! With [`VmSpec::guest_agent`](crate::VmSpec) set, [`Vm::start`] gives the
//! guest a virtio-serial port named `org.qemu.guest_agent.0` whose host end
//! is the chardev socket `RUN/qga.sock`; [`Vm::guest_agent`] hands out the
//! client. The protocol is JSON commands and replies over that socket. A
//! new connection, and every connection after a timeout, is synchronized
//! first: the client sends a 0xFF byte (the agent drops any half-read
//! input) and `guest-sync-delimited` with a fresh id; the agent puts a 0xFF
//! before its reply, and everything up to the reply with that id is stale
//! and dropped. Every command has a timeout.
//!
//! Whether an agent answers at all is known within the answer timeout
//! (3 s by default): [`GaError::is_absent`] is the branch to a
//! crash-consistent point. After a failed [`GuestAgent::fsfreeze_freeze`]
//! that is not [`GaError::is_absent`], call [`GuestAgent::fsfreeze_thaw`]:
//! the guest may have frozen after the client gave up waiting. The agent
//! does one command at a time, so that thaw is answered only once the
//! freeze is over: retry it while it times out or finds no answer.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::Vm;

/// The virtio-serial port name qemu-ga looks for.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
/// The chardev socket in the VM's run directory.
pub const SOCKET_NAME: &str = "qga.sock";
/// Default for synchronizing and for quick commands (ping, info, status).
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for freeze and thaw (a freeze first syncs the filesystems).
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest reply accepted from the agent.
const MAX_REPLY: usize = 4 << 20;

/// A guest agent failure.
#[derive(Debug, thiserror::Error)]
pub enum GaError {
    /// The VM's spec has no guest agent channel.
    #[error("this VM has no guest agent channel (set guest_agent = true in its spec)")]
    NotConfigured,
    /// The socket cannot be reached (QEMU not running) or closed.
    #[error("guest agent socket {socket}: {source}")]
    NotConnected {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Nothing in the guest answered the synchronization: no agent runs
    /// there (not installed, not started, or the guest is not up).
    #[error("no guest agent answered on {socket} within {timeout:?}")]
    NotAnswering { socket: PathBuf, timeout: Duration },
    /// The agent answered the synchronization, then not this command.
    #[error("guest agent: no reply to {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    /// The agent answered the command with an error.
    #[error("guest agent {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("guest agent protocol: {0}")]
    Protocol(String),
}

impl GaError {
    /// No guest agent to talk to: not configured, socket unreachable, or no
    /// answer to the synchronization. The caller takes a crash-consistent
    /// point; nothing was frozen.
    pub fn is_absent(&self) -> bool {
        matches!(
            self,
            GaError::NotConfigured | GaError::NotConnected { .. } | GaError::NotAnswering { .. }
        )
    }
}

/// `guest-fsfreeze-status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsfreezeStatus {
    Thawed,
    Frozen,
}

impl fmt::Display for FsfreezeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsfreezeStatus::Thawed => "thawed",
            FsfreezeStatus::Frozen => "frozen",
        })
    }
}

/// `guest-info`: the agent's version and commands.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct GaInfo {
    pub version: String,
    #[serde(rename = "supported_commands")]
    pub commands: Vec<GaCommandInfo>,
}

/// One command of [`GaInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct GaCommandInfo {
    pub name: String,
    pub enabled: bool,
    #[serde(rename = "success-response", default)]
    pub success_response: bool,
}

impl GaInfo {
    /// The agent has `command` and it is enabled.
    pub fn supports(&self, command: &str) -> bool {
        self.commands.iter().any(|c| c.name == command && c.enabled)
    }
}

/// What the agent's byte stream splits into.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// A 0xFF byte: what came before is stale.
    Sentinel,
    /// The bytes of one top-level JSON object.
    Object(Vec<u8>),
}

/// Splits the stream into top-level JSON objects by brace depth (strings
/// and escapes tracked), whatever the line breaks. Bytes between objects
/// are skipped; 0xFF, which no UTF-8 text holds, resets the state.
#[derive(Debug, Default)]
struct Framer {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Framer {
    fn push(&mut self, byte: u8) -> Result<Option<Frame>, GaError> {
        if byte == 0xFF {
            *self = Framer::default();
            return Ok(Some(Frame::Sentinel));
        }
        if self.depth == 0 {
            if byte == b'{' {
                self.buf.clear();
                self.buf.push(byte);
                self.depth = 1;
            }
            return Ok(None);
        }
        self.buf.push(byte);
        if self.buf.len() > MAX_REPLY {
            *self = Framer::default();
            return Err(GaError::Protocol(format!(
                "reply longer than {MAX_REPLY} bytes"
            )));
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
            }
            return Ok(None);
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return Ok(Some(Frame::Object(std::mem::take(&mut self.buf))));
                }
            }
            _ => {}
        }
        Ok(None)
    }
}

#[derive(Debug)]
struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    framer: Framer,
    frames: VecDeque<Frame>,
}

impl Conn {
    async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Ok(f);
            }
            let n = self.reader.read(&mut chunk).await.map_err(ReadError::Io)?;
            if n == 0 {
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed by QEMU",
                )));
            }
            for &b in &chunk[..n] {
                if let Some(f) = self.framer.push(b).map_err(ReadError::Ga)? {
                    self.frames.push_back(f);
                }
            }
        }
    }
}

enum ReadError {
    Io(io::Error),
    Ga(GaError),
}

/// A client of one guest agent socket. Commands go one at a time
/// (`&mut self`); QEMU's chardev serves one connection at a time, so keep
/// one client per VM ([`Vm::guest_agent`] does).
#[derive(Debug)]
pub struct GuestAgent {
    socket: PathBuf,
    answer_timeout: Duration,
    freeze_timeout: Duration,
    conn: Option<Conn>,
    /// The stream holds nothing stale: synchronized, and no timeout since.
    synced: bool,
    next_id: u64,
}

impl GuestAgent {
    /// A client of the agent behind `socket` (QEMU's chardev socket). It
    /// connects at its first command.
    pub fn new(socket: impl Into<PathBuf>) -> GuestAgent {
        // Ids differ from any earlier client's, whose replies may still be
        // in the channel. Kept below 2^53.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = (now ^ (u64::from(std::process::id()) << 20)) & ((1 << 52) - 1);
        GuestAgent {
            socket: socket.into(),
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            freeze_timeout: DEFAULT_FREEZE_TIMEOUT,
            conn: None,
            synced: false,
            next_id: seed.max(1),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How long to wait for the synchronization and for quick commands
    /// (ping, info, status): the time it takes to find that no agent
    /// answers.
    pub fn set_answer_timeout(&mut self, timeout: Duration) {
        self.answer_timeout = timeout;
    }

    /// How long to wait for a freeze or thaw.
    pub fn set_freeze_timeout(&mut self, timeout: Duration) {
        self.freeze_timeout = timeout;
    }

    pub fn answer_timeout(&self) -> Duration {
        self.answer_timeout
    }

    pub fn freeze_timeout(&self) -> Duration {
        self.freeze_timeout
    }

    /// `guest-ping`: an agent answers.
    pub async fn ping(&mut self) -> Result<(), GaError> {
        self.execute("guest-ping", None, self.answer_timeout)
            .await
            .map(drop)
    }

    /// `guest-info`.
    pub async fn info(&mut self) -> Result<GaInfo, GaError> {
        let v = self
            .execute("guest-info", None, self.answer_timeout)
            .await?;
        parse(v, "guest-info")
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&mut self) -> Result<FsfreezeStatus, GaError> {
        let v = self
            .execute("guest-fsfreeze-status", None, self.answer_timeout)
            .await?;
        parse(v, "guest-fsfreeze-status")
    }

    /// `guest-fsfreeze-freeze`: syncs and freezes the guest's local
    /// filesystems; the number frozen. On an error that is not
    /// [`GaError::is_absent`], thaw.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u32, GaError> {
        let v = self
            .execute("guest-fsfreeze-freeze", None, self.freeze_timeout)
            .await?;
        parse(v, "guest-fsfreeze-freeze")
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed (0 when
    /// none was frozen).
    pub async fn fsfreeze_thaw(&mut self) -> Result<u32, GaError> {
        let v = self
            .execute("guest-fsfreeze-thaw", None, self.freeze_timeout)
            .await?;
        parse(v, "guest-fsfreeze-thaw")
    }

    /// Runs `command` with `arguments` (an object) and returns its
    /// `return`, waiting up to `timeout` for the reply (after a
    /// synchronization, if one is due, of up to the answer timeout).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, GaError> {
        if !self.synced || self.conn.is_none() {
            self.sync().await?;
        }
        let id = self.fresh_id();
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        match tokio::time::timeout(timeout, self.exchange(line, command, id)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // Its reply may come later: resynchronize before the next.
                self.synced = false;
                Err(GaError::Timeout {
                    command: command.to_string(),
                    timeout,
                })
            }
        }
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = (self.next_id + 1) & ((1 << 52) - 1);
        id.max(1)
    }

    fn lost(&mut self, source: io::Error) -> GaError {
        self.conn = None;
        self.synced = false;
        GaError::NotConnected {
            socket: self.socket.clone(),
            source,
        }
    }

    fn read_failed(&mut self, e: ReadError) -> GaError {
        match e {
            ReadError::Io(e) => self.lost(e),
            ReadError::Ga(e) => {
                self.synced = false;
                e
            }
        }
    }

    /// Connects if needed and synchronizes within the answer timeout.
    async fn sync(&mut self) -> Result<(), GaError> {
        self.synced = false;
        let timeout = self.answer_timeout;
        let id = self.fresh_id();
        match tokio::time::timeout(timeout, self.sync_inner(id)).await {
            Ok(Ok(())) => {
                self.synced = true;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(GaError::NotAnswering {
                socket: self.socket.clone(),
                timeout,
            }),
        }
    }

    async fn sync_inner(&mut self, id: u64) -> Result<(), GaError> {
        if self.conn.is_none() {
            let stream = UnixStream::connect(&self.socket).await.map_err(|source| {
                GaError::NotConnected {
                    socket: self.socket.clone(),
                    source,
                }
            })?;
            let (reader, writer) = stream.into_split();
            self.conn = Some(Conn {
                reader,
                writer,
                framer: Framer::default(),
                frames: VecDeque::new(),
            });
        }
        let mut msg = vec![0xFF];
        msg.extend_from_slice(
            json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } })
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        let Some(conn) = self.conn.as_mut() else {
            return Err(GaError::Protocol("no connection".into()));
        };
        // Whatever was queued is stale now.
        conn.frames.clear();
        if let Err(e) = conn.writer.write_all(&msg).await {
            return Err(self.lost(e));
        }
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Err(GaError::Protocol("no connection".into()));
            };
            let frame = match conn.next_frame().await {
                Ok(f) => f,
                // A stale reply too long or garbled: skip it.
                Err(ReadError::Ga(_)) => continue,
                Err(e) => return Err(self.read_failed(e)),
            };
            // Anything but the reply with our id is stale (the agent also
            // answers the 0xFF itself with a parse error).
            if let Frame::Object(bytes) = frame
                && let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&bytes)
                && m.get("return").and_then(Value::as_u64) == Some(id)
            {
                return Ok(());
            }
        }
    }

    async fn exchange(&mut self, line: Vec<u8>, command: &str, id: u64) -> Result<Value, GaError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(GaError::Protocol("no connection".into()));
        };
        if let Err(e) = conn.writer.write_all(&line).await {
            return Err(self.lost(e));
        }
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Err(GaError::Protocol("no connection".into()));
            };
            let bytes = match conn.next_frame().await {
                Ok(Frame::Object(b)) => b,
                Ok(Frame::Sentinel) => continue,
                Err(e) => return Err(self.read_failed(e)),
            };
            let mut msg: Map<String, Value> = match serde_json::from_slice(&bytes) {
                Ok(Value::Object(m)) => m,
                Ok(other) => {
                    self.synced = false;
                    return Err(GaError::Protocol(format!(
                        "reply to {command} is not an object: {other}"
                    )));
                }
                Err(e) => {
                    self.synced = false;
                    return Err(GaError::Protocol(format!(
                        "bad JSON in reply to {command}: {e}"
                    )));
                }
            };
            if msg.contains_key("event") {
                continue;
            }
            // The agent echoes the id; a reply with another is stale.
            match msg.get("id") {
                Some(v) if v.as_u64() != Some(id) => continue,
                _ => {}
            }
            if let Some(ret) = msg.remove("return") {
                return Ok(ret);
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(GaError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            self.synced = false;
            return Err(GaError::Protocol(format!(
                "reply to {command} has neither return nor error"
            )));
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, command: &str) -> Result<T, GaError> {
    serde_json::from_value(v.clone())
        .map_err(|e| GaError::Protocol(format!("unexpected reply to {command}: {v}: {e}")))
}

/// The QEMU arguments that give the guest its agent port: a virtio-serial
/// controller, the chardev socket `RUN/qga.sock` (server, no waiting for a
/// client) and the port on it.
pub(crate) fn qemu_args(run_dir: &Path) -> Vec<String> {
    let sock = run_dir
        .join(SOCKET_NAME)
        .to_string_lossy()
        .replace(',', ",,");
    vec![
        "-chardev".into(),
        format!("socket,id=qga0,path={sock},server=on,wait=off"),
        "-device".into(),
        "virtio-serial-pci,id=vser-qga".into(),
        "-device".into(),
        format!("virtserialport,bus=vser-qga.0,chardev=qga0,name={PORT_NAME}"),
    ]
}

/// The client for a VM started from `spec` in `run_dir`, if its spec asks
/// for a guest agent.
pub(crate) fn for_spec(spec: &crate::VmSpec, run_dir: &Path) -> Option<GuestAgent> {
    spec.guest_agent
        .then(|| GuestAgent::new(run_dir.join(SOCKET_NAME)))
}

impl Vm {
    /// The guest agent client ([`GaError::NotConfigured`] at once when the
    /// spec has no `guest_agent`). One per VM, kept across calls.
    pub fn guest_agent(&mut self) -> Result<&mut GuestAgent, GaError> {
        self.ga.as_mut().ok_or(GaError::NotConfigured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut f = Framer::default();
        bytes
            .iter()
            .filter_map(|&b| f.push(b).expect("no error"))
            .collect()
    }

    #[test]
    fn framer_splits_objects_and_resets_at_the_sentinel() {
        let got = frames(
            b"{\"return\": {\"a\": [1, {\"b\": \"}{\\\"\"}]}}\n  junk {\"half\": \"x\xff{\"return\": 5}{\"return\": 6}",
        );
        assert_eq!(
            got,
            vec![
                Frame::Object(b"{\"return\": {\"a\": [1, {\"b\": \"}{\\\"\"}]}}".to_vec()),
                Frame::Sentinel,
                Frame::Object(b"{\"return\": 5}".to_vec()),
                Frame::Object(b"{\"return\": 6}".to_vec()),
            ]
        );
        let mut f = Framer::default();
        f.push(b'{').unwrap();
        let mut err = None;
        for _ in 0..=MAX_REPLY {
            if let Err(e) = f.push(b' ') {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(GaError::Protocol(_))), "{err:?}");
    }

    /// A scripted agent: answers each line the client sends with what
    /// `reply` makes of it (raw bytes), from a task.
    fn fake_agent(
        dir: &Path,
        reply: impl Fn(&Value) -> Vec<u8> + Send + 'static,
    ) -> (PathBuf, tokio::task::JoinHandle<Vec<Value>>) {
        let path = dir.join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = tokio::io::BufReader::new(r);
            loop {
                let mut line = Vec::new();
                if r.read_until(b'\n', &mut line).await.unwrap() == 0 {
                    return seen;
                }
                // The client's 0xFF comes first on a sync.
                let text: Vec<u8> = line.into_iter().filter(|&b| b != 0xFF).collect();
                let v: Value = serde_json::from_slice(&text).unwrap();
                let out = reply(&v);
                seen.push(v);
                w.write_all(&out).await.unwrap();
            }
        });
        (path, task)
    }

    fn id_of(v: &Value) -> u64 {
        v["arguments"]["id"]
            .as_u64()
            .or_else(|| v["id"].as_u64())
            .unwrap()
    }

    #[tokio::test]
    async fn stale_replies_are_dropped_and_errors_keep_class_and_desc() {
        let dir = tempfile::tempdir().unwrap();
        let (path, task) = fake_agent(dir.path(), |v| {
            match v["execute"].as_str().unwrap() {
            // A stale reply and the agent's parse error for the 0xFF, then
            // its sentinel, a half object cut off by another sentinel, a
            // stale sync reply, and ours spread over lines.
            "guest-sync-delimited" => {
                let mut out = b"{\"return\": 1}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray\"}}\n".to_vec();
                out.extend_from_slice(b"\xff{\"return\": {\"x\": \"}\xff{\"return\": 2}\n");
                out.extend_from_slice(format!("{{\n  \"return\":\n  {}\n}}\n", id_of(v)).as_bytes());
                out
            }
            "guest-ping" => format!("{{\"return\": {{}}, \"id\": {}}}\n", id_of(v)).into_bytes(),
            "guest-fsfreeze-status" => {
                // A reply with a wrong id first (stale), then ours.
                format!(
                    "{{\"return\": \"frozen\", \"id\": 3}}\n{{\"return\": \"thawed\", \"id\": {}}}\n",
                    id_of(v)
                )
                .into_bytes()
            }
            "guest-fsfreeze-freeze" => format!(
                "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"failed to freeze /mnt\"}}, \"id\": {}}}\n",
                id_of(v)
            )
            .into_bytes(),
            "guest-info" => format!(
                "{{\"return\": {{\"version\": \"10.0.2\", \"supported_commands\": [{{\"enabled\": true, \"name\": \"guest-ping\", \"success-response\": true}}, {{\"enabled\": false, \"name\": \"guest-exec\", \"success-response\": true}}]}}, \"id\": {}}}\n",
                id_of(v)
            )
            .into_bytes(),
            _ => b"{\"return\": \"what\"}\n".to_vec(),
        }
        });
        let mut ga = GuestAgent::new(&path);
        ga.ping().await.unwrap();
        assert_eq!(ga.fsfreeze_status().await.unwrap(), FsfreezeStatus::Thawed);
        match ga.fsfreeze_freeze().await {
            Err(GaError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "guest-fsfreeze-freeze");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "failed to freeze /mnt");
            }
            other => panic!("{other:?}"),
        }
        let info = ga.info().await.unwrap();
        assert_eq!(info.version, "10.0.2");
        assert!(info.supports("guest-ping"));
        assert!(!info.supports("guest-exec"));
        assert!(!info.supports("guest-fsfreeze-freeze"));
        // A reply of the wrong type is a protocol error.
        assert!(matches!(
            ga.fsfreeze_thaw().await,
            Err(GaError::Protocol(_))
        ));
        drop(ga);
        let seen = task.await.unwrap();
        let cmds: Vec<&str> = seen
            .iter()
            .map(|v| v["execute"].as_str().unwrap())
            .collect();
        // One synchronization for the whole session.
        assert_eq!(
            cmds,
            [
                "guest-sync-delimited",
                "guest-ping",
                "guest-fsfreeze-status",
                "guest-fsfreeze-freeze",
                "guest-info",
                "guest-fsfreeze-thaw"
            ]
        );
    }

    #[tokio::test]
    async fn silence_is_absent_quickly_and_a_command_timeout_resynchronizes() {
        let dir = tempfile::tempdir().unwrap();
        // Answers nothing at first; then syncs, but never a thaw.
        let state = std::sync::Arc::new(std::sync::Mutex::new(0u32));
        let s = state.clone();
        let (path, _task) = fake_agent(dir.path(), move |v| {
            let mut n = s.lock().unwrap();
            *n += 1;
            match (v["execute"].as_str().unwrap(), *n) {
                ("guest-sync-delimited", 1) => Vec::new(),
                ("guest-sync-delimited", _) => {
                    format!("\u{0}{{\"return\": {}}}\n", id_of(v)).into_bytes()
                }
                ("guest-fsfreeze-thaw", _) => Vec::new(),
                _ => b"{\"return\": {}}\n".to_vec(),
            }
        });
        let mut ga = GuestAgent::new(&path);
        ga.set_answer_timeout(Duration::from_millis(300));
        ga.set_freeze_timeout(Duration::from_millis(300));
        let begun = std::time::Instant::now();
        let e = ga.ping().await.unwrap_err();
        assert!(matches!(e, GaError::NotAnswering { .. }), "{e:?}");
        assert!(e.is_absent());
        assert!(begun.elapsed() < Duration::from_secs(2));
        // Now the sync is answered (its reply carries a NUL, not a
        // sentinel: skipped as junk); the thaw is not.
        let e = ga.fsfreeze_thaw().await.unwrap_err();
        assert!(matches!(e, GaError::Timeout { .. }), "{e:?}");
        assert!(!e.is_absent());
        // The next command synchronizes again and goes through.
        ga.ping().await.unwrap();
        assert_eq!(*state.lock().unwrap(), 5);
    }

    #[tokio::test]
    async fn no_socket_is_not_connected_and_a_closed_one_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut ga = GuestAgent::new(dir.path().join("nope.sock"));
        let e = ga.ping().await.unwrap_err();
        assert!(matches!(e, GaError::NotConnected { .. }), "{e:?}");
        assert!(e.is_absent());
        assert!(e.to_string().contains("nope.sock"), "{e}");

        // QEMU going away mid-session.
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        });
        let mut ga = GuestAgent::new(&path);
        let e = ga.ping().await.unwrap_err();
        assert!(matches!(e, GaError::NotConnected { .. }), "{e:?}");
        server.await.unwrap();
    }
}
