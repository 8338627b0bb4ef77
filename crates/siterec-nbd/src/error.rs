//! The errors of this crate: what went wrong, and where it came from (our
//! caller, the server's answer, or the connection).

use crate::proto;

/// Everything that can go wrong talking NBD.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed (connect, read, write, or closed early).
    #[error("NBD connection I/O failed: {0}")]
    Io(#[from] std::io::Error),

    /// The server broke the protocol: a bad magic, a length or offset out of
    /// bounds, an unexpected reply. The connection is unusable afterwards.
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),

    /// The server does not speak what this client needs (fixed newstyle).
    #[error("NBD server not supported: {0}")]
    Unsupported(String),

    /// The server has no export of that name (`NBD_REP_ERR_UNKNOWN`).
    #[error("NBD export {name:?} does not exist on the server{}", detail(.message))]
    UnknownExport { name: String, message: String },

    /// The server refused an option during the handshake.
    #[error(
        "NBD server refused option {} with {}{}",
        proto::opt_name(*.option),
        proto::rep_err_name(*.reply),
        detail(.message)
    )]
    OptionRefused {
        option: u32,
        reply: u32,
        message: String,
    },

    /// A request the client will not send because it is invalid for this
    /// export (beyond its end, too large, context not negotiated, …).
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),

    /// The server answered a request with an error (an errno from the NBD
    /// error set).
    #[error("NBD server error {} ({}) for {command} at offset {offset}{}",
        proto::errno_name(*.errno), .errno, detail(.message))]
    Server {
        command: &'static str,
        offset: u64,
        errno: u32,
        message: String,
    },

    /// (Server side) the client broke the protocol in a way that leaves the
    /// byte stream out of step or is not answerable (a bad magic, an unknown
    /// client flag, an oversized option, an unknown export in
    /// `NBD_OPT_EXPORT_NAME`): the server closes the connection.
    #[error("NBD protocol violation by the client: {0}")]
    ClientProtocol(String),

    /// (Server side) the server was configured with values the protocol
    /// cannot carry (block sizes, names too long, zero limits).
    #[error("invalid NBD server configuration: {0}")]
    Config(String),

    /// An earlier protocol or I/O error left the connection in an unknown
    /// state, or it was disconnected: no further requests are sent on it.
    #[error("NBD connection is no longer usable ({0})")]
    ConnectionBroken(String),
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl NbdError {
    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        NbdError::Protocol(msg.into())
    }

    /// Whether the connection can no longer be used after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            NbdError::Io(_)
                | NbdError::Protocol(_)
                | NbdError::ClientProtocol(_)
                | NbdError::Unsupported(_)
                | NbdError::ConnectionBroken(_)
        )
    }
}

/// Result with [`NbdError`].
pub type Result<T> = std::result::Result<T, NbdError>;
