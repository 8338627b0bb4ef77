//! The vault's certificate authority, agent identities and TLS plumbing.
//!
//! * [`Ca`]: the vault's own CA (generate / load / save, issue the vault's
//!   server certificate, sign agent CSRs with an identity chosen by the vault).
//! * [`generate_csr`]: the agent side of enrolment (key pair generated locally).
//! * [`server_config`], [`client_config`], [`reqwest_client`]: rustls
//!   configurations (aws-lc-rs only; `ring` must stay out of the tree).
//! * [`serve`]: serve an [`axum::Router`] over TLS (or plain HTTP) and expose
//!   the client certificate's common name to handlers as [`PeerIdentity`].

mod ca;
mod error;
mod fsutil;
mod server;
mod tls;

pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CA_VALIDITY_DAYS, Ca, SERVER_CERT_VALIDITY_DAYS,
    csr_subject_alt_names, generate_csr,
};
pub use error::{PkiError, Result};
pub use fsutil::write_file_durable;
pub use server::{PeerIdentity, SERVER_IDLE_TIMEOUT, serve};
pub use tls::{
    CLIENT_POOL_IDLE, ClientAuth, certificate_common_name, client_config, install_crypto_provider,
    reqwest_client, server_config,
};
