//! The NBD client: handshake (fixed newstyle) and transmission phase.

use std::collections::BTreeMap;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};

use crate::error::{NbdError, Result};
use crate::proto::{self, Extent, Reader};

/// What to ask for during the handshake.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The export to open (`NBD_OPT_GO`). QEMU's default export is `""`.
    pub export_name: String,
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`). Needed for
    /// block status and sparse reads; on by default.
    pub structured_replies: bool,
    /// Meta contexts to select with `NBD_OPT_SET_META_CONTEXT`, e.g.
    /// `base:allocation` or `qemu:dirty-bitmap:bm0`.
    pub meta_contexts: Vec<String>,
    /// The largest read request sent; larger reads are split. Capped at
    /// [`proto::MAX_READ_PAYLOAD`] (32 MiB) and at the server's maximum
    /// block size.
    pub max_read: u32,
}

impl ConnectOptions {
    /// Options for `export_name` with structured replies and no meta
    /// context.
    pub fn new(export_name: impl Into<String>) -> Self {
        ConnectOptions {
            export_name: export_name.into(),
            structured_replies: true,
            meta_contexts: Vec::new(),
            max_read: proto::MAX_READ_PAYLOAD,
        }
    }

    /// Adds a meta context to select.
    pub fn meta_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }
}

/// What the server told about the export in `NBD_OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`, see [`proto`]).
    pub flags: u16,
    /// Minimum block size (requests are aligned to it); 1 if not given.
    pub min_block: u32,
    /// Preferred block size; 4096 if not given.
    pub preferred_block: u32,
    /// Maximum payload of one request; 32 MiB if not given.
    pub max_block: u32,
}

/// One reply header from the server.
enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u32,
    },
}

/// An NBD connection in the transmission phase.
///
/// Requests are sent one at a time (each method takes `&mut self` and
/// consumes the whole reply before returning). Every request carries a fresh
/// cookie and every reply's cookie is checked against it, so pipelining
/// several requests later only needs a table from cookie to request state.
///
/// After a protocol violation or I/O error the connection is marked broken
/// and every later call fails with [`NbdError::ConnectionBroken`]: the byte
/// stream can no longer be trusted to be in step.
pub struct NbdClient<S> {
    stream: BufStream<S>,
    info: ExportInfo,
    structured: bool,
    contexts: Vec<(String, u32)>,
    max_read: u32,
    max_write: u32,
    next_cookie: u64,
    broken: Option<String>,
}

impl NbdClient<UnixStream> {
    /// Connects to a server on a Unix socket and performs the handshake.
    pub async fn connect_unix(path: impl AsRef<Path>, opts: &ConnectOptions) -> Result<Self> {
        let stream = UnixStream::connect(path).await?;
        Self::handshake(stream, opts).await
    }
}

impl NbdClient<TcpStream> {
    /// Connects to a server over TCP and performs the handshake.
    pub async fn connect_tcp(addr: impl ToSocketAddrs, opts: &ConnectOptions) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Self::handshake(stream, opts).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
    /// Performs the fixed newstyle handshake on an open stream: structured
    /// replies (if asked), meta contexts (if any), then `NBD_OPT_GO`.
    pub async fn handshake(stream: S, opts: &ConnectOptions) -> Result<Self> {
        check_string("export name", &opts.export_name)?;
        for c in &opts.meta_contexts {
            check_string("meta context name", c)?;
        }
        if opts.meta_contexts.len() > proto::MAX_META_CONTEXTS {
            return Err(NbdError::InvalidRequest(format!(
                "{} meta contexts requested, at most {}",
                opts.meta_contexts.len(),
                proto::MAX_META_CONTEXTS
            )));
        }
        if !opts.meta_contexts.is_empty() && !opts.structured_replies {
            return Err(NbdError::InvalidRequest(
                "meta contexts need structured replies".into(),
            ));
        }
        let mut hs = Handshake {
            stream: BufStream::new(stream),
            export: opts.export_name.clone(),
        };
        hs.greeting().await?;

        let mut structured = false;
        if opts.structured_replies {
            structured = hs.structured_reply().await?;
            if !structured && !opts.meta_contexts.is_empty() {
                return Err(NbdError::Unsupported(
                    "the server refused structured replies, which block status needs".into(),
                ));
            }
        }
        let contexts = if opts.meta_contexts.is_empty() {
            Vec::new()
        } else {
            hs.set_meta_context(&opts.meta_contexts).await?
        };
        let info = hs.go().await?;
        let max_read = opts
            .max_read
            .clamp(1, proto::MAX_READ_PAYLOAD)
            .min(info.max_block);
        // Keep reads aligned to the server's minimum block size.
        let max_read = (max_read - max_read % info.min_block).max(info.min_block);
        // Writes: the same caps, without the caller's read size.
        let max_write = proto::MAX_READ_PAYLOAD.min(info.max_block);
        let max_write = (max_write - max_write % info.min_block).max(info.min_block);
        Ok(NbdClient {
            stream: hs.stream,
            info,
            structured,
            contexts,
            max_read,
            max_write,
            next_cookie: 1,
            broken: None,
        })
    }

    /// The export's size in bytes.
    pub fn export_size(&self) -> u64 {
        self.info.size
    }

    /// The export's transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.info.flags
    }

    /// Whether the export is read-only (`NBD_FLAG_READ_ONLY`).
    pub fn is_read_only(&self) -> bool {
        self.info.flags & proto::TFLAG_READ_ONLY != 0
    }

    /// Size, flags and block sizes of the export.
    pub fn export_info(&self) -> ExportInfo {
        self.info
    }

    /// Whether the server agreed to structured replies.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The meta contexts the server selected, with the ids it assigned.
    pub fn meta_contexts(&self) -> &[(String, u32)] {
        &self.contexts
    }

    /// The id the server assigned to a meta context, if it selected it.
    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    /// Reads `len` bytes at `offset`. Larger reads are split into requests
    /// of at most 32 MiB (or the server's maximum); holes come back as zeros.
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check_range("read", offset, len as u64)?;
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_usable()?;
        self.check_range("read", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let min = u64::from(self.info.min_block);
        let end = offset + buf.len() as u64;
        if !offset.is_multiple_of(min) || !end.is_multiple_of(min) {
            // Widen to the server's minimum block size and copy out.
            let a_off = offset - offset % min;
            let a_end = end.div_ceil(min).saturating_mul(min).min(self.info.size);
            let mut tmp = vec![0u8; (a_end - a_off) as usize];
            self.read_aligned(a_off, &mut tmp).await?;
            let start = (offset - a_off) as usize;
            buf.copy_from_slice(&tmp[start..start + buf.len()]);
            return Ok(());
        }
        self.read_aligned(offset, buf).await
    }

    async fn read_aligned(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let step = self.max_read as usize;
        let mut pos = offset;
        for piece in buf.chunks_mut(step) {
            let r = self.read_one(pos, piece).await;
            self.note(r)?;
            pos += piece.len() as u64;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (`NBD_CMD_WRITE`). Larger writes are split
    /// into requests of at most 32 MiB (or the server's maximum block
    /// size), sent one after the other; each is acknowledged before the
    /// next is sent.
    ///
    /// Refused before anything is sent ([`NbdError::InvalidRequest`], the
    /// connection stays usable) on a read-only export and for a range past
    /// the end of the export.
    ///
    /// When the server's minimum block size is larger than 1 and `offset`
    /// or the end of the write is not a multiple of it, the partial blocks
    /// at either end are **read, modified and written back** (the aligned
    /// middle is written directly). That read-modify-write is not atomic:
    /// a concurrent writer of the same blocks on another connection can be
    /// overwritten. Aligned writes never read.
    ///
    /// The server may keep the data in a cache: call [`Self::flush`] before
    /// relying on it being on stable storage (e.g. before disconnecting).
    /// If a request fails part-way, the earlier requests of the same call
    /// have been written.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        if self.is_read_only() {
            return Err(NbdError::InvalidRequest(format!(
                "write of {} bytes at offset {offset}: the export is read-only (the server set NBD_FLAG_READ_ONLY); export it writable to write to it",
                data.len()
            )));
        }
        self.check_range("write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let min = u64::from(self.info.min_block);
        let end = offset + data.len() as u64;
        if offset.is_multiple_of(min) && (end.is_multiple_of(min) || end == self.info.size) {
            return self.write_aligned(offset, data).await;
        }
        let mut pos = offset;
        let mut rest = data;
        // The partial block at the start (which may hold the whole write).
        if !pos.is_multiple_of(min) {
            let block = pos - pos % min;
            let block_end = (block + min).min(self.info.size);
            let n = (block_end.min(end) - pos) as usize;
            self.patch_block(block, block_end, pos, &rest[..n]).await?;
            pos += n as u64;
            rest = &rest[n..];
        }
        // `pos` is aligned now, or the write is done.
        let tail = (rest.len() as u64 % min) as usize;
        let middle = rest.len() - tail;
        if middle > 0 {
            self.write_aligned(pos, &rest[..middle]).await?;
            pos += middle as u64;
            rest = &rest[middle..];
        }
        // The partial block at the end.
        if !rest.is_empty() {
            let block_end = (pos + min).min(self.info.size);
            self.patch_block(pos, block_end, pos, rest).await?;
        }
        Ok(())
    }

    /// Writes `data` at `at` inside the block `[block, block_end)`: reads the
    /// block, patches it and writes it back (only the write if it covers the
    /// whole block).
    async fn patch_block(
        &mut self,
        block: u64,
        block_end: u64,
        at: u64,
        data: &[u8],
    ) -> Result<()> {
        if at == block && at + data.len() as u64 == block_end {
            return self.write_aligned(at, data).await;
        }
        let mut tmp = vec![0u8; (block_end - block) as usize];
        self.read_aligned(block, &mut tmp).await?;
        let start = (at - block) as usize;
        tmp[start..start + data.len()].copy_from_slice(data);
        self.write_aligned(block, &tmp).await
    }

    async fn write_aligned(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let step = self.max_write as usize;
        let mut pos = offset;
        for piece in data.chunks(step) {
            let r = self.write_one(pos, piece).await;
            self.note(r)?;
            pos += piece.len() as u64;
        }
        Ok(())
    }

    /// Asks the server to put every write it has acknowledged on stable
    /// storage (`NBD_CMD_FLUSH`).
    ///
    /// Only sent when the server advertises `NBD_FLAG_SEND_FLUSH`. Without
    /// that flag the protocol forbids sending it (such a server is taken to
    /// write through, or offers no way to flush), and this returns `Ok(())`
    /// without sending anything.
    pub async fn flush(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.info.flags & proto::TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let cookie = self.cookie();
        let r = match self.send_request(proto::CMD_FLUSH, cookie, 0, 0).await {
            Ok(()) => self.ack_reply("flush", cookie, 0, 0).await,
            Err(e) => Err(e),
        };
        self.note(r)
    }

    /// Asks for the block status of `[offset, offset + len)` in meta context
    /// `context_id` (from [`Self::meta_context_id`]). The server may describe
    /// less than asked: the extents returned start at `offset`, are
    /// contiguous, and end at or before `offset + len` (clipped there).
    pub async fn block_status(
        &mut self,
        context_id: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>> {
        self.check_usable()?;
        if !self.structured {
            return Err(NbdError::InvalidRequest(
                "block status needs structured replies, which were not negotiated".into(),
            ));
        }
        if !self.contexts.iter().any(|(_, id)| *id == context_id) {
            return Err(NbdError::InvalidRequest(format!(
                "meta context id {context_id} was not negotiated (have {:?})",
                self.contexts
            )));
        }
        if len == 0 {
            return Err(NbdError::InvalidRequest("block status of 0 bytes".into()));
        }
        self.check_range("block status", offset, u64::from(len))?;
        let r = self.block_status_one(context_id, offset, len).await;
        self.note(r)
    }

    /// Block status of a whole range of any length: repeats
    /// [`Self::block_status`] until the range is covered and merges
    /// neighbouring extents with equal flags.
    pub async fn block_status_range(
        &mut self,
        context_id: u32,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        self.check_range("block status", offset, len)?;
        let end = offset + len;
        // At most 2 GiB per request, aligned to the minimum block size.
        let min = u64::from(self.info.min_block);
        let step_max = (1u64 << 31) - (1u64 << 31) % min;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let step = (end - pos).min(step_max) as u32;
            let extents = self.block_status(context_id, pos, step).await?;
            for e in extents {
                pos = e.offset + e.length;
                match out.last_mut() {
                    Some(last)
                        if last.flags == e.flags && last.offset + last.length == e.offset =>
                    {
                        last.length += e.length;
                    }
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`) and closes the write side.
    pub async fn disconnect(mut self) -> Result<()> {
        if self.broken.is_some() {
            return Ok(());
        }
        let cookie = self.cookie();
        self.send_request(proto::CMD_DISC, cookie, 0, 0).await?;
        self.stream.get_mut().shutdown().await?;
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(NbdError::ConnectionBroken(why.clone())),
            None => Ok(()),
        }
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(NbdError::InvalidRequest(format!(
                "{what} of {len} bytes at offset {offset} runs past the export size {}",
                self.info.size
            ))),
        }
    }

    /// Marks the connection broken on a fatal error.
    fn note<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && e.is_fatal()
        {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    async fn send_request(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32) -> Result<()> {
        self.write_request_header(cmd, cookie, offset, len).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Writes a request header into the send buffer (not flushed).
    async fn write_request_header(
        &mut self,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> Result<()> {
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        req[4..6].copy_from_slice(&0u16.to_be_bytes());
        req[6..8].copy_from_slice(&cmd.to_be_bytes());
        req[8..16].copy_from_slice(&cookie.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&req).await?;
        Ok(())
    }

    async fn reply_header(&mut self, cookie: u64) -> Result<ReplyHeader> {
        let magic = self.stream.read_u32().await?;
        let h = match magic {
            proto::SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: self.stream.read_u32().await?,
                cookie: self.stream.read_u64().await?,
            },
            proto::STRUCTURED_REPLY_MAGIC if self.structured => ReplyHeader::Chunk {
                flags: self.stream.read_u16().await?,
                kind: self.stream.read_u16().await?,
                cookie: self.stream.read_u64().await?,
                length: self.stream.read_u32().await?,
            },
            proto::STRUCTURED_REPLY_MAGIC => {
                return Err(NbdError::protocol(
                    "structured reply although structured replies were not negotiated",
                ));
            }
            other => {
                return Err(NbdError::protocol(format!("bad reply magic {other:#010x}")));
            }
        };
        let got = match h {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        };
        if got != cookie {
            return Err(NbdError::protocol(format!(
                "reply for cookie {got} while waiting for cookie {cookie}"
            )));
        }
        Ok(h)
    }

    /// Reads a payload of `length` bytes after checking it against `cap`.
    async fn payload(&mut self, length: u32, cap: u32, what: &str) -> Result<Vec<u8>> {
        if length > cap {
            return Err(NbdError::protocol(format!(
                "{what} chunk of {length} bytes exceeds the limit of {cap}"
            )));
        }
        let mut buf = vec![0u8; length as usize];
        self.stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    /// Reads an error chunk's payload: (errno, message, offset if any).
    async fn error_chunk(&mut self, kind: u16, length: u32) -> Result<(u32, String, Option<u64>)> {
        let payload = self
            .payload(length, proto::MAX_ERROR_PAYLOAD, "error")
            .await?;
        let mut r = Reader::new(&payload, "error chunk");
        let errno = r.u32()?;
        let msg_len = r.u16()?;
        let msg = String::from_utf8_lossy(r.bytes(usize::from(msg_len))?).into_owned();
        let offset = if kind == proto::REPLY_TYPE_ERROR_OFFSET {
            Some(r.u64()?)
        } else {
            None
        };
        // Unknown error types may carry more; the known ones may not.
        if kind == proto::REPLY_TYPE_ERROR || kind == proto::REPLY_TYPE_ERROR_OFFSET {
            r.end()?;
        }
        if errno == 0 {
            return Err(NbdError::protocol(format!(
                "error chunk with error number 0 (message {msg:?})"
            )));
        }
        Ok((errno, msg, offset))
    }

    async fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let req_len = u32::try_from(buf.len())
            .map_err(|_| NbdError::InvalidRequest(format!("read of {len} bytes")))?;
        let end = offset + len;
        let cookie = self.cookie();
        self.send_request(proto::CMD_READ, cookie, offset, req_len)
            .await?;

        let mut covered = Coverage::default();
        let mut first_error: Option<NbdError> = None;
        loop {
            match self.reply_header(cookie).await? {
                ReplyHeader::Simple { error, .. } => {
                    if error != 0 {
                        return Err(server_error("read", offset, error, String::new()));
                    }
                    if self.structured {
                        return Err(NbdError::protocol(
                            "simple reply with data to a read although structured replies were negotiated",
                        ));
                    }
                    self.stream.read_exact(buf).await?;
                    return Ok(());
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    length,
                    ..
                } => {
                    match kind {
                        proto::REPLY_TYPE_OFFSET_DATA => {
                            if length <= 8 || u64::from(length - 8) > len {
                                return Err(NbdError::protocol(format!(
                                    "data chunk of {length} bytes for a read of {len} bytes"
                                )));
                            }
                            let at = self.stream.read_u64().await?;
                            let n = u64::from(length - 8);
                            let (s, e) = in_range(at, n, offset, end, "data")?;
                            covered.add(s, e)?;
                            let from = (s - offset) as usize;
                            let to = (e - offset) as usize;
                            self.stream.read_exact(&mut buf[from..to]).await?;
                        }
                        proto::REPLY_TYPE_OFFSET_HOLE => {
                            if length != 12 {
                                return Err(NbdError::protocol(format!(
                                    "hole chunk of {length} bytes, expected 12"
                                )));
                            }
                            let at = self.stream.read_u64().await?;
                            let n = u64::from(self.stream.read_u32().await?);
                            if n == 0 {
                                return Err(NbdError::protocol("hole chunk of length 0"));
                            }
                            let (s, e) = in_range(at, n, offset, end, "hole")?;
                            covered.add(s, e)?;
                            buf[(s - offset) as usize..(e - offset) as usize].fill(0);
                        }
                        proto::REPLY_TYPE_NONE => {
                            if length != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                                return Err(NbdError::protocol(
                                    "NBD_REPLY_TYPE_NONE chunk with a payload or without the done flag",
                                ));
                            }
                        }
                        k if k & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                            let (errno, msg, at) = self.error_chunk(k, length).await?;
                            if let Some(at) = at
                                && (at < offset || at >= end)
                            {
                                return Err(NbdError::protocol(format!(
                                    "error offset {at} outside the read [{offset}, {end})"
                                )));
                            }
                            if first_error.is_none() {
                                first_error =
                                    Some(server_error("read", at.unwrap_or(offset), errno, msg));
                            }
                        }
                        k => {
                            return Err(NbdError::protocol(format!(
                                "unexpected chunk type {k} in a read reply"
                            )));
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if covered.total != len {
            return Err(NbdError::protocol(format!(
                "read reply covered {} of {len} bytes at offset {offset}",
                covered.total
            )));
        }
        Ok(())
    }

    /// One `NBD_CMD_WRITE` request with its payload, and its reply.
    async fn write_one(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let req_len = u32::try_from(data.len())
            .map_err(|_| NbdError::InvalidRequest(format!("write of {len} bytes")))?;
        let cookie = self.cookie();
        self.write_request_header(proto::CMD_WRITE, cookie, offset, req_len)
            .await?;
        self.stream.write_all(data).await?;
        self.stream.flush().await?;
        self.ack_reply("write", cookie, offset, len).await
    }

    /// Reads the reply to a command that returns no data (write, flush): a
    /// simple reply, or structured chunks that may only be errors or
    /// `NBD_REPLY_TYPE_NONE`, ending with the done flag. A server error
    /// comes back as [`NbdError::Server`] (the connection goes on); anything
    /// else unexpected is a protocol error. `len` 0 means the command has no
    /// range (flush): an error chunk then must not carry an offset.
    async fn ack_reply(
        &mut self,
        command: &'static str,
        cookie: u64,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let end = offset.saturating_add(len);
        let mut first_error: Option<NbdError> = None;
        loop {
            match self.reply_header(cookie).await? {
                ReplyHeader::Simple { error, .. } => {
                    // Simple replies are allowed for commands without data
                    // even when structured replies were negotiated.
                    if error != 0 {
                        return Err(server_error(command, offset, error, String::new()));
                    }
                    return Ok(());
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    length,
                    ..
                } => {
                    match kind {
                        proto::REPLY_TYPE_NONE => {
                            if length != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                                return Err(NbdError::protocol(
                                    "NBD_REPLY_TYPE_NONE chunk with a payload or without the done flag",
                                ));
                            }
                        }
                        k if k & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                            let (errno, msg, at) = self.error_chunk(k, length).await?;
                            if let Some(at) = at
                                && (at < offset || at >= end)
                            {
                                return Err(NbdError::protocol(format!(
                                    "error offset {at} outside the {command} [{offset}, {end})"
                                )));
                            }
                            if first_error.is_none() {
                                first_error =
                                    Some(server_error(command, at.unwrap_or(offset), errno, msg));
                            }
                        }
                        k => {
                            return Err(NbdError::protocol(format!(
                                "unexpected chunk type {k} in a {command} reply"
                            )));
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn block_status_one(
        &mut self,
        context_id: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>> {
        let cookie = self.cookie();
        self.send_request(proto::CMD_BLOCK_STATUS, cookie, offset, len)
            .await?;
        let mut ours: Option<Vec<Extent>> = None;
        let mut seen: Vec<u32> = Vec::new();
        let mut first_error: Option<NbdError> = None;
        loop {
            match self.reply_header(cookie).await? {
                ReplyHeader::Simple { error, .. } => {
                    if error != 0 {
                        return Err(server_error("block status", offset, error, String::new()));
                    }
                    return Err(NbdError::protocol(
                        "simple reply without error to a block status request",
                    ));
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    length,
                    ..
                } => {
                    match kind {
                        proto::REPLY_TYPE_BLOCK_STATUS => {
                            let payload = self
                                .payload(length, proto::MAX_BLOCK_STATUS_PAYLOAD, "block status")
                                .await?;
                            let mut r = Reader::new(&payload, "block status chunk");
                            let id = r.u32()?;
                            if !self.contexts.iter().any(|(_, c)| *c == id) {
                                return Err(NbdError::protocol(format!(
                                    "block status for context id {id}, which was not negotiated"
                                )));
                            }
                            if seen.contains(&id) {
                                return Err(NbdError::protocol(format!(
                                    "two block status chunks for context id {id}"
                                )));
                            }
                            seen.push(id);
                            let extents = proto::parse_extents(
                                r.rest(),
                                offset,
                                u64::from(len),
                                self.info.size,
                            )?;
                            if id == context_id {
                                ours = Some(extents);
                            }
                        }
                        proto::REPLY_TYPE_NONE => {
                            if length != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                                return Err(NbdError::protocol(
                                    "NBD_REPLY_TYPE_NONE chunk with a payload or without the done flag",
                                ));
                            }
                        }
                        k if k & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                            let (errno, msg, at) = self.error_chunk(k, length).await?;
                            if first_error.is_none() {
                                first_error = Some(server_error(
                                    "block status",
                                    at.unwrap_or(offset),
                                    errno,
                                    msg,
                                ));
                            }
                        }
                        k => {
                            return Err(NbdError::protocol(format!(
                                "unexpected chunk type {k} in a block status reply"
                            )));
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        ours.ok_or_else(|| {
            NbdError::protocol(format!(
                "block status reply has no extents for context id {context_id}"
            ))
        })
    }
}

fn server_error(command: &'static str, offset: u64, errno: u32, message: String) -> NbdError {
    NbdError::Server {
        command,
        offset,
        errno,
        message,
    }
}

/// Checks that `[at, at + n)` lies within `[start, end)`.
fn in_range(at: u64, n: u64, start: u64, end: u64, what: &str) -> Result<(u64, u64)> {
    match at.checked_add(n) {
        Some(e) if at >= start && e <= end => Ok((at, e)),
        _ => Err(NbdError::protocol(format!(
            "{what} chunk [{at}, +{n}) lies outside the requested range [{start}, {end})"
        ))),
    }
}

/// The parts of a read that chunks have covered; refuses overlaps. Adjacent
/// parts are merged, so replies in order stay one entry.
#[derive(Default)]
struct Coverage {
    parts: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    const MAX_PARTS: usize = 65536;

    fn add(&mut self, mut s: u64, mut e: u64) -> Result<()> {
        let overlap = || NbdError::protocol(format!("reply chunks overlap at [{s}, {e})"));
        let before = self.parts.range(..=s).next_back().map(|(a, b)| (*a, *b));
        if let Some((_, b)) = before
            && b > s
        {
            return Err(overlap());
        }
        let after = self.parts.range(s..).next().map(|(a, b)| (*a, *b));
        if let Some((a, _)) = after
            && a < e
        {
            return Err(overlap());
        }
        self.total += e - s;
        if let Some((a, b)) = before
            && b == s
        {
            self.parts.remove(&a);
            s = a;
        }
        if let Some((a, b)) = after
            && a == e
        {
            self.parts.remove(&a);
            e = b;
        }
        self.parts.insert(s, e);
        if self.parts.len() > Self::MAX_PARTS {
            return Err(NbdError::protocol(
                "read reply split into too many scattered chunks",
            ));
        }
        Ok(())
    }
}

fn check_string(what: &str, s: &str) -> Result<()> {
    if s.len() > proto::MAX_STRING {
        return Err(NbdError::InvalidRequest(format!(
            "{what} is {} bytes, at most {} allowed",
            s.len(),
            proto::MAX_STRING
        )));
    }
    Ok(())
}

/// The handshake phase.
struct Handshake<S> {
    stream: BufStream<S>,
    export: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handshake<S> {
    async fn greeting(&mut self) -> Result<()> {
        let magic = self.stream.read_u64().await?;
        if magic != proto::NBDMAGIC {
            return Err(NbdError::protocol(format!(
                "not an NBD server: greeting magic {magic:#018x}"
            )));
        }
        let style = self.stream.read_u64().await?;
        if style == proto::OLDSTYLE_MAGIC {
            return Err(NbdError::Unsupported(
                "oldstyle negotiation (only fixed newstyle is supported)".into(),
            ));
        }
        if style != proto::IHAVEOPT {
            return Err(NbdError::protocol(format!(
                "bad newstyle magic {style:#018x}"
            )));
        }
        let flags = self.stream.read_u16().await?;
        if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported(
                "the server does not offer fixed newstyle negotiation".into(),
            ));
        }
        let mut ours = proto::FLAG_C_FIXED_NEWSTYLE;
        if flags & proto::FLAG_NO_ZEROES != 0 {
            ours |= proto::FLAG_C_NO_ZEROES;
        }
        self.stream.write_u32(ours).await?;
        Ok(())
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::InvalidRequest("option data too large".into()))?;
        self.stream.write_u64(proto::IHAVEOPT).await?;
        self.stream.write_u32(option).await?;
        self.stream.write_u32(len).await?;
        self.stream.write_all(data).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads one option reply: (reply type, data).
    async fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let magic = self.stream.read_u64().await?;
        if magic != proto::REPLY_MAGIC_OPT {
            return Err(NbdError::protocol(format!(
                "bad option reply magic {magic:#018x}"
            )));
        }
        let opt = self.stream.read_u32().await?;
        if opt != option {
            return Err(NbdError::protocol(format!(
                "reply for {} while waiting for {}",
                proto::opt_name(opt),
                proto::opt_name(option)
            )));
        }
        let kind = self.stream.read_u32().await?;
        let len = self.stream.read_u32().await?;
        if len > proto::MAX_OPTION_REPLY {
            return Err(NbdError::protocol(format!(
                "reply to {} of {len} bytes exceeds the limit of {}",
                proto::opt_name(option),
                proto::MAX_OPTION_REPLY
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await?;
        Ok((kind, data))
    }

    fn refused(&self, option: u32, reply: u32, data: &[u8]) -> NbdError {
        let message = String::from_utf8_lossy(data).into_owned();
        if reply == proto::REP_ERR_UNKNOWN {
            NbdError::UnknownExport {
                name: self.export.clone(),
                message,
            }
        } else {
            NbdError::OptionRefused {
                option,
                reply,
                message,
            }
        }
    }

    fn unexpected(&self, option: u32, reply: u32) -> NbdError {
        NbdError::protocol(format!(
            "unexpected reply {} to {}",
            proto::rep_err_name(reply),
            proto::opt_name(option)
        ))
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: true if the server agreed.
    async fn structured_reply(&mut self) -> Result<bool> {
        let opt = proto::OPT_STRUCTURED_REPLY;
        self.send_option(opt, &[]).await?;
        let (kind, data) = self.option_reply(opt).await?;
        match kind {
            proto::REP_ACK if data.is_empty() => Ok(true),
            proto::REP_ACK => Err(NbdError::protocol("ACK with a payload")),
            proto::REP_ERR_UNSUP | proto::REP_ERR_POLICY => Ok(false),
            k if k & proto::REP_FLAG_ERROR != 0 => Err(self.refused(opt, k, &data)),
            k => Err(self.unexpected(opt, k)),
        }
    }

    fn name_prefixed(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&(self.export.len() as u32).to_be_bytes());
        buf.extend_from_slice(self.export.as_bytes());
    }

    /// `NBD_OPT_SET_META_CONTEXT`: the contexts the server selected.
    async fn set_meta_context(&mut self, names: &[String]) -> Result<Vec<(String, u32)>> {
        let opt = proto::OPT_SET_META_CONTEXT;
        let mut data = Vec::new();
        self.name_prefixed(&mut data);
        data.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for n in names {
            data.extend_from_slice(&(n.len() as u32).to_be_bytes());
            data.extend_from_slice(n.as_bytes());
        }
        self.send_option(opt, &data).await?;
        let mut out: Vec<(String, u32)> = Vec::new();
        loop {
            let (kind, data) = self.option_reply(opt).await?;
            match kind {
                proto::REP_META_CONTEXT => {
                    let mut r = Reader::new(&data, "meta context reply");
                    let id = r.u32()?;
                    let name = String::from_utf8(r.rest().to_vec())
                        .map_err(|_| NbdError::protocol("meta context name is not UTF-8"))?;
                    if out.iter().any(|(n, i)| *i == id || *n == name) {
                        return Err(NbdError::protocol(format!(
                            "meta context {name:?} / id {id} returned twice"
                        )));
                    }
                    if out.len() >= proto::MAX_META_CONTEXTS {
                        return Err(NbdError::protocol("too many meta contexts returned"));
                    }
                    out.push((name, id));
                }
                proto::REP_ACK => return Ok(out),
                k if k & proto::REP_FLAG_ERROR != 0 => return Err(self.refused(opt, k, &data)),
                k => return Err(self.unexpected(opt, k)),
            }
        }
    }

    /// `NBD_OPT_GO`, asking for block sizes too.
    async fn go(&mut self) -> Result<ExportInfo> {
        let opt = proto::OPT_GO;
        let mut data = Vec::new();
        self.name_prefixed(&mut data);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(opt, &data).await?;
        let mut export: Option<(u64, u16)> = None;
        let mut sizes: Option<(u32, u32, u32)> = None;
        loop {
            let (kind, data) = self.option_reply(opt).await?;
            match kind {
                proto::REP_INFO => {
                    let mut r = Reader::new(&data, "NBD_REP_INFO");
                    match r.u16()? {
                        proto::INFO_EXPORT => {
                            let size = r.u64()?;
                            let flags = r.u16()?;
                            r.end()?;
                            if size > i64::MAX as u64 {
                                return Err(NbdError::protocol(format!(
                                    "export size {size} is out of range"
                                )));
                            }
                            export = Some((size, flags));
                        }
                        proto::INFO_BLOCK_SIZE => {
                            let min = r.u32()?;
                            let pref = r.u32()?;
                            let max = r.u32()?;
                            r.end()?;
                            if !min.is_power_of_two() || min > 65536 || max < min {
                                return Err(NbdError::protocol(format!(
                                    "invalid block sizes: minimum {min}, preferred {pref}, maximum {max}"
                                )));
                            }
                            sizes = Some((min, pref, max));
                        }
                        // NBD_INFO_NAME, NBD_INFO_DESCRIPTION, and types we
                        // don't know: nothing we need.
                        _ => {}
                    }
                }
                proto::REP_ACK => break,
                k if k & proto::REP_FLAG_ERROR != 0 => return Err(self.refused(opt, k, &data)),
                k => return Err(self.unexpected(opt, k)),
            }
        }
        let (size, flags) = export
            .ok_or_else(|| NbdError::protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
        let (min_block, preferred_block, max_block) =
            sizes.unwrap_or((1, 4096, proto::MAX_READ_PAYLOAD));
        Ok(ExportInfo {
            size,
            flags,
            min_block,
            preferred_block,
            max_block,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_refuses_overlap() {
        let mut c = Coverage::default();
        c.add(10, 20).unwrap();
        c.add(0, 10).unwrap();
        c.add(30, 40).unwrap();
        c.add(20, 30).unwrap();
        assert_eq!(c.parts.len(), 1);
        assert_eq!(c.total, 40);
        assert!(c.add(5, 6).is_err());
        assert!(c.add(39, 41).is_err());
        c.add(40, 41).unwrap();
        assert_eq!(c.total, 41);
    }

    #[test]
    fn in_range_checks_bounds_and_overflow() {
        assert!(in_range(10, 5, 10, 15, "x").is_ok());
        assert!(in_range(9, 5, 10, 15, "x").is_err());
        assert!(in_range(11, 5, 10, 15, "x").is_err());
        assert!(in_range(u64::MAX, 2, 10, 15, "x").is_err());
    }
}
