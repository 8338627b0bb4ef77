use std::path::PathBuf;

/// Errors produced by this crate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The certificate signing request could not be parsed, its signature is
    /// invalid, or it asks for something we refuse to sign.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    /// A PEM certificate or key could not be parsed / does not fit.
    #[error("invalid certificate or key: {0}")]
    InvalidPem(String),
    /// A caller-supplied argument was rejected.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Certificate generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),
    /// Building the client certificate verifier failed.
    #[error("TLS client verifier error: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Building the HTTP client failed.
    #[error("HTTP client error: {0}")]
    Http(#[from] reqwest::Error),
    /// File system error, with the path involved.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl PkiError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PkiError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;
