//! NBD (Network Block Device) on tokio, both ends, of our own.
//!
//! The **client** ([`NbdClient`]) reads disks that QEMU exports — in
//! particular only the extents a `qemu:dirty-bitmap:NAME` meta context
//! reports dirty (changed-block tracking from a fleecing export) — and
//! writes the qcow2 images `qemu-nbd` serves (failback writes a point back
//! onto a VM's own disk).
//!
//! The **server** ([`NbdServer`]) serves one read-only [`Export`] — for
//! instant failover, a recovery point of the replica store that a replica VM
//! boots from (QEMU opens it as the backing file of a local overlay, with
//! copy-on-read and a block-stream job) — over any stream or a Unix socket
//! ([`NbdServer::listen_unix`]). See the [`server`] module for what it
//! speaks and how it guards itself against clients.
//!
//! Client, supported:
//! - fixed newstyle handshake over any `AsyncRead + AsyncWrite` stream, with
//!   helpers for Unix sockets and TCP (`NBD_FLAG_C_FIXED_NEWSTYLE`,
//!   `NBD_FLAG_C_NO_ZEROES`);
//! - `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` (any context
//!   names, e.g. `base:allocation`, `qemu:dirty-bitmap:bm0`; the ids the
//!   server assigned are kept), `NBD_OPT_GO` with `NBD_INFO_EXPORT` and
//!   `NBD_INFO_BLOCK_SIZE` (reads honour the minimum and maximum block
//!   size);
//! - `NBD_CMD_READ` with simple or structured replies (data, holes read as
//!   zeros, error chunks), split into requests of at most 32 MiB;
//! - `NBD_CMD_BLOCK_STATUS` (`NBD_REPLY_TYPE_BLOCK_STATUS`) for one context,
//!   also over ranges longer than one request ([`NbdClient::block_status_range`]);
//! - `NBD_CMD_WRITE`, split like reads, read-modify-write at unaligned ends
//!   when the server's minimum block size is above 1; `NBD_CMD_FLUSH` when
//!   the server advertises it;
//! - `NBD_CMD_DISC`.
//!
//! Everything the server sends is checked before it is used: reply magics
//! and cookies, chunk lengths against per-type caps, data and hole chunks
//! against the requested range (and against each other: no overlap, full
//! coverage), extents against the export size. A violation fails the call
//! with [`NbdError::Protocol`] and the connection refuses further requests.
//!
//! Client, not supported (yet): TLS (`NBD_OPT_STARTTLS`), extended headers
//! (64-bit lengths, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`), trim, write-zeroes, `NBD_OPT_LIST`/`NBD_OPT_INFO`, oldstyle and
//! non-fixed newstyle servers, `NBD_OPT_EXPORT_NAME` fallback for servers
//! without `NBD_OPT_GO`, and more than one request in flight (the cookie
//! bookkeeping is per request so pipelining can be added). There are no
//! timeouts inside: wrap calls in `tokio::time::timeout` if needed.

mod client;
mod error;
mod export;
pub mod proto;
pub mod server;

pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use client::{ConnectOptions, ExportInfo, NbdClient};
pub use error::{NbdError, Result};
pub use export::{Export, ExportError, ExportExtent, MemoryExport, Segment};
pub use proto::{Extent, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
pub use server::{NbdServer, ServerConfig, UnixServer};
