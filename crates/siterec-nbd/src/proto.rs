//! Wire constants of the NBD protocol (fixed newstyle handshake,
//! transmission phase, structured replies) shared by the client and the
//! server, and the pure parsing of reply payloads. All integers on the wire
//! are big-endian.

use crate::error::{NbdError, Result};

// Handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// The reply to `NBD_OPT_EXPORT_NAME` without `NBD_FLAG_C_NO_ZEROES`: size,
/// flags, then this many zero bytes.
pub const EXPORT_NAME_ZEROES: usize = 124;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (from NBD_INFO_EXPORT).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Transmission phase.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// The size of a (compact) request header: magic, flags, type, cookie,
/// offset, length.
pub const REQUEST_SIZE: usize = 28;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Error numbers of the transmission phase (the protocol's own set).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// `base:allocation`: the extent is unallocated (a hole).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The one meta context the protocol itself defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The largest payload this client accepts in one read request (and so in
/// one data chunk): 32 MiB, as QEMU and nbdkit use.
pub const MAX_READ_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The largest option reply payload accepted during the handshake. Strings
/// in the handshake are at most 4096 bytes by the spec.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The largest block status chunk accepted: 4 bytes of context id and
/// 512 Ki descriptors (QEMU sends at most 128 Ki per reply).
pub const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * 512 * 1024;
/// The largest error chunk: 6 bytes, a message of at most 4096 bytes, an
/// offset.
pub const MAX_ERROR_PAYLOAD: u32 = 6 + 4096 + 8;
/// How many meta contexts the server may return for one
/// `NBD_OPT_SET_META_CONTEXT`.
pub const MAX_META_CONTEXTS: usize = 256;
/// The longest export or context name sent (the spec's string limit).
pub const MAX_STRING: usize = 4096;
/// The largest option payload the server reads into memory. Real options
/// are far smaller (a name, a few queries of at most 4096 bytes each).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option payloads up to this size past [`MAX_OPTION_DATA`] are skipped
/// (streamed, never buffered) and refused with `NBD_REP_ERR_TOO_BIG`; a
/// larger one ends the connection (QEMU's server draws the same line).
pub const MAX_OPTION_SKIP: u32 = 32 * 1024 * 1024;

/// Name of an option, for messages.
pub fn opt_name(opt: u32) -> String {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_INFO => "NBD_OPT_INFO".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS".into(),
        other => format!("option {other}"),
    }
}

/// Name of an option error reply, with what it means.
pub fn rep_err_name(rep: u32) -> String {
    match rep {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)".into(),
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by server policy)".into(),
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid option data)".into(),
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on this platform)".into(),
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (the server requires TLS)".into(),
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)".into(),
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server is shutting down)".into(),
        REP_ERR_BLOCK_SIZE_REQD => {
            "NBD_REP_ERR_BLOCK_SIZE_REQD (client must request block sizes)".into()
        }
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (request or reply too large)".into(),
        REP_ERR_EXT_HEADER_REQD => {
            "NBD_REP_ERR_EXT_HEADER_REQD (server requires extended headers)".into()
        }
        other if other & REP_FLAG_ERROR != 0 => {
            format!("unknown error reply {:#x}", other)
        }
        other => format!("reply type {other}"),
    }
}

/// Name of an NBD error number (the protocol's errno subset).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

/// Name of a transmission command, for messages.
pub fn cmd_name(cmd: u16) -> String {
    match cmd {
        CMD_READ => "NBD_CMD_READ".into(),
        CMD_WRITE => "NBD_CMD_WRITE".into(),
        CMD_DISC => "NBD_CMD_DISC".into(),
        CMD_FLUSH => "NBD_CMD_FLUSH".into(),
        CMD_TRIM => "NBD_CMD_TRIM".into(),
        CMD_CACHE => "NBD_CMD_CACHE".into(),
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES".into(),
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS".into(),
        other => format!("command {other}"),
    }
}

/// A cursor over a payload that refuses to read past its end.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(NbdError::protocol(format!(
                "{} is truncated: needs {} more bytes, has {}",
                self.what,
                n,
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(NbdError::protocol(format!(
                "{} has {} unexpected trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

/// One extent of a block status reply, in absolute export offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// The context's status bits (e.g. [`STATE_HOLE`] | [`STATE_ZERO`] for
    /// `base:allocation`, [`STATE_DIRTY`] for a dirty bitmap).
    pub flags: u32,
}

/// Parses the descriptors of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (after
/// its context id) for a request starting at `offset`. Extents are clipped
/// to `offset + len` (the spec lets the last one run past the request) and
/// must not run past `export_size`.
pub fn parse_extents(
    payload: &[u8],
    offset: u64,
    len: u64,
    export_size: u64,
) -> Result<Vec<Extent>> {
    if payload.is_empty() || !payload.len().is_multiple_of(8) {
        return Err(NbdError::protocol(format!(
            "block status chunk has {} bytes of descriptors, not a non-zero multiple of 8",
            payload.len()
        )));
    }
    let end = offset.saturating_add(len);
    let mut r = Reader::new(payload, "block status descriptor");
    let mut out = Vec::with_capacity(payload.len() / 8);
    let mut pos = offset;
    while r.remaining() > 0 {
        let length = u64::from(r.u32()?);
        let flags = r.u32()?;
        if length == 0 {
            return Err(NbdError::protocol(
                "block status descriptor has length 0".to_string(),
            ));
        }
        if pos >= end {
            return Err(NbdError::protocol(format!(
                "block status reply has descriptors past the request end {end}"
            )));
        }
        let ext_end = pos
            .checked_add(length)
            .filter(|e| *e <= export_size)
            .ok_or_else(|| {
                NbdError::protocol(format!(
                    "block status extent at {pos} of length {length} runs past the export size {export_size}"
                ))
            })?;
        let clipped = ext_end.min(end);
        out.push(Extent {
            offset: pos,
            length: clipped - pos,
            flags,
        });
        pos = ext_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(v: &[(u32, u32)]) -> Vec<u8> {
        v.iter()
            .flat_map(|(l, f)| l.to_be_bytes().into_iter().chain(f.to_be_bytes()))
            .collect()
    }

    #[test]
    fn extents_are_absolute_and_clipped() {
        let e = parse_extents(&desc(&[(4096, 0), (8192, 3)]), 1000, 6000, 1 << 20).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 1000,
                    length: 4096,
                    flags: 0
                },
                Extent {
                    offset: 5096,
                    length: 1904,
                    flags: 3
                },
            ]
        );
    }

    #[test]
    fn bad_extents_are_refused() {
        // zero length
        assert!(parse_extents(&desc(&[(0, 0)]), 0, 10, 100).is_err());
        // past export size
        assert!(parse_extents(&desc(&[(200, 0)]), 0, 10, 100).is_err());
        // descriptor after the request end
        assert!(parse_extents(&desc(&[(10, 0), (10, 0)]), 0, 10, 100).is_err());
        // not a multiple of 8 / empty
        assert!(parse_extents(&[0, 0, 0, 1], 0, 10, 100).is_err());
        assert!(parse_extents(&[], 0, 10, 100).is_err());
        // overflow of offset + length
        assert!(parse_extents(&desc(&[(u32::MAX, 0)]), u64::MAX - 5, 3, u64::MAX).is_err());
    }

    #[test]
    fn reader_refuses_truncation() {
        let mut r = Reader::new(&[1, 2, 3], "x");
        assert!(r.u32().is_err());
        assert_eq!(r.u16().unwrap(), 0x0102);
        assert!(r.end().is_err());
    }
}
