//! A minimal QMP client: one JSON object per line over a Unix socket.
//! Commands carry an `id`; the reply with that id is returned, events that
//! arrive meanwhile are queued for [`Qmp::take_events`].

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line accepted from QEMU.
const MAX_LINE: u64 = 16 << 20;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("QMP: no reply to {0} within {1:?}")]
    Timeout(String, Duration),
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub event: String,
    pub data: Value,
}

/// A QMP session past its capabilities negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: VecDeque<Event>,
    timeout: Duration,
    /// A reply timed out part-way through a line: the stream's position is
    /// unknown, so the session refuses further commands.
    broken: bool,
    /// QEMU's version from the greeting (`major.minor.micro`).
    pub version: String,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let (r, w) = UnixStream::connect(path).await?.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
            broken: false,
            version: String::new(),
        };
        let greeting = tokio::time::timeout(timeout, qmp.read_message())
            .await
            .map_err(|_| QmpError::Timeout("the greeting".into(), timeout))??;
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| {
                QmpError::Protocol(format!(
                    "unexpected greeting {}",
                    Value::Object(greeting.clone())
                ))
            })?;
        let part = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        qmp.version = format!("{}.{}.{}", part("major"), part("minor"), part("micro"));
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (an object) and returns its `return`.
    /// After a [`QmpError::Timeout`] the session is unusable.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        if self.broken {
            return Err(QmpError::Protocol(
                "session unusable after an earlier timeout".into(),
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.reply(command, id)).await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(QmpError::Timeout(command.to_string(), timeout))
            }
        }
    }

    async fn reply(&mut self, command: &str, id: u64) -> Result<Value, QmpError> {
        loop {
            let mut msg = self.read_message().await?;
            if let Some(event) = msg.get("event").and_then(Value::as_str) {
                let event = event.to_string();
                let data = msg.remove("data").unwrap_or(Value::Null);
                self.events.push_back(Event { event, data });
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to a command we gave up waiting for.
                continue;
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
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply to {command} has neither return nor error"
            )));
        }
    }

    async fn read_message(&mut self) -> Result<Map<String, Value>, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE)
                .read_line(&mut line)
                .await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if !line.ends_with('\n') && n as u64 == MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "message longer than {MAX_LINE} bytes"
                )));
            }
            if line.trim().is_empty() {
                continue;
            }
            return match serde_json::from_str::<Value>(&line) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(other) => Err(QmpError::Protocol(format!("not an object: {other}"))),
                Err(e) => Err(QmpError::Protocol(format!("bad JSON: {e}"))),
            };
        }
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }
}
