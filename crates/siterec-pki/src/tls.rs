use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::error::{PkiError, Result};

/// Install rustls' aws-lc-rs provider as the process default (used by
/// clients not made here, such as the object-storage ones). Idempotent: a
/// provider already installed (by us or anyone else) is left alone.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race against another installer is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// The crypto provider of every TLS configuration made here: rustls'
/// ring provider. Its AES-GCM has a VAES-AVX2 implementation that aws-lc
/// lacks, which halves the cost of the bulk cipher on the data path of
/// CPUs with AVX2 but no AVX-512 (measured 5.5-6.5 GB/s against 3.2-3.5
/// on an AMD EPYC). The process default (aws-lc-rs, see
/// [`install_crypto_provider`]) is left for other clients.
fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Whether (and how) a TLS server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Do not ask for a client certificate.
    None,
    /// Ask; accept clients without one (they get `PeerIdentity(None)`), but a
    /// certificate that is presented must verify against the client CA.
    Optional,
    /// Require a client certificate signed by the client CA.
    Required,
}

pub(crate) fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::InvalidPem(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::InvalidPem(
            "no \"CERTIFICATE\" PEM block found".into(),
        ));
    }
    Ok(certs)
}

pub(crate) fn parse_single_cert(pem: &str) -> Result<CertificateDer<'static>> {
    let mut certs = parse_certs(pem)?;
    Ok(certs.swap_remove(0))
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::InvalidPem(format!("private key PEM: {e}")))
}

fn root_store(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| PkiError::InvalidPem(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The subject common name of a DER certificate, if it has a (UTF-8) one.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A rustls server configuration presenting `cert_pem` (leaf first, then any
/// chain) with `key_pem`. With [`ClientAuth::Optional`] / [`ClientAuth::Required`]
/// client certificates are verified against `client_ca_pem`, which is then
/// mandatory. ALPN advertises `http/1.1`.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
    client_auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>> {
    install_crypto_provider();
    let certs = parse_certs(cert_pem)?;
    let key = parse_key(key_pem)?;
    let builder = rustls::ServerConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional | ClientAuth::Required => {
            let ca = client_ca_pem.ok_or_else(|| {
                PkiError::InvalidArgument(format!(
                    "client_auth {client_auth:?} needs a client CA certificate"
                ))
            })?;
            let mut vb =
                WebPkiClientVerifier::builder_with_provider(root_store(ca)?, tls_provider());
            if client_auth == ClientAuth::Optional {
                vb = vb.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(vb.build()?)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls client configuration trusting only the CA(s) in `ca_pem`, and
/// presenting `identity = (cert_pem, key_pem)` as client certificate if given.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<rustls::ClientConfig> {
    install_crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_pem)?);
    let config = match identity {
        Some((cert_pem, key_pem)) => {
            builder.with_client_auth_cert(parse_certs(cert_pem)?, parse_key(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// How long a client keeps an idle connection for reuse: well under
/// [`crate::SERVER_IDLE_TIMEOUT`], so that it never sends a request on a
/// connection the server is closing (the agents' 30 s replication cycle
/// otherwise meets the server's 30 s idle close now and then).
pub const CLIENT_POOL_IDLE: Duration = Duration::from_secs(15);

/// A reqwest client using [`client_config`] (trusts only `ca_pem`, optional
/// client certificate), with an overall per-request `timeout`, a connect
/// timeout of at most 10 s, and idle connections kept [`CLIENT_POOL_IDLE`]. Proxy environment variables (`HTTPS_PROXY`,
/// `NO_PROXY`) are honoured as usual; TLS is end to end through a proxy.
pub fn reqwest_client(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<reqwest::Client> {
    let tls = client_config(ca_pem, identity)?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(CLIENT_POOL_IDLE)
        .build()?;
    Ok(client)
}
