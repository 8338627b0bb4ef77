use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Router};
use siterec_pki::{
    CLIENT_POOL_IDLE, Ca, ClientAuth, PeerIdentity, PkiError, SERVER_IDLE_TIMEOUT,
    csr_subject_alt_names, generate_csr, install_crypto_provider, reqwest_client, serve,
    server_config,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn whoami(Extension(peer): Extension<PeerIdentity>) -> String {
    peer.0.unwrap_or_else(|| "<none>".to_string())
}

async fn remote(ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
    addr.ip().to_string()
}

async fn port(ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
    addr.port().to_string()
}

fn router() -> Router {
    Router::new()
        .route("/whoami", get(whoami))
        .route("/remote", get(remote))
        .route("/port", get(port))
}

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, tls, router(), async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task,
        }
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

struct Pki {
    ca: Ca,
    agent_cert: String,
    agent_key: String,
}

fn pki() -> Pki {
    install_crypto_provider();
    let ca = Ca::generate("siterec test vault CA").unwrap();
    let (csr, agent_key) =
        generate_csr(&["agent-host.example".to_string(), "127.0.0.1".to_string()]).unwrap();
    let agent_cert = ca.sign_csr(&csr, "agent-3f2a", 30).unwrap();
    Pki {
        ca,
        agent_cert,
        agent_key,
    }
}

async fn vault_server(pki: &Pki, auth: ClientAuth) -> Server {
    let (cert, key) = pki
        .ca
        .issue_server_cert(&["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    let tls = server_config(&cert, &key, Some(pki.ca.cert_pem()), auth).unwrap();
    Server::start(Some(tls)).await
}

#[tokio::test]
async fn optional_client_auth_round_trip() {
    let pki = pki();
    let server = vault_server(&pki, ClientAuth::Optional).await;

    // With the agent certificate: the handler sees the CN chosen by the vault.
    let with_cert = reqwest_client(
        pki.ca.cert_pem(),
        Some((&pki.agent_cert, &pki.agent_key)),
        TIMEOUT,
    )
    .unwrap();
    let body = with_cert
        .get(server.url("https", "/whoami"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "agent-3f2a");
    // Keep-alive connection reuse keeps the identity; ConnectInfo works too.
    let body = with_cert
        .get(server.url("https", "/remote"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "127.0.0.1");

    // Without a certificate (enrolment): allowed, identity None.
    let anonymous = reqwest_client(pki.ca.cert_pem(), None, TIMEOUT).unwrap();
    let body = anonymous
        .get(server.url("https", "/whoami"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "<none>");

    // A client trusting a different CA refuses the server.
    let other = Ca::generate("some other CA").unwrap();
    let stranger = reqwest_client(other.cert_pem(), None, TIMEOUT).unwrap();
    let err = stranger
        .get(server.url("https", "/whoami"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    // A client certificate from another CA is rejected even in Optional mode.
    let (csr, key) = generate_csr(&[]).unwrap();
    let forged = other.sign_csr(&csr, "agent-forged", 30).unwrap();
    let forger = reqwest_client(pki.ca.cert_pem(), Some((&forged, &key)), TIMEOUT).unwrap();
    assert!(
        forger
            .get(server.url("https", "/whoami"))
            .send()
            .await
            .is_err()
    );

    // The server survived all the failed handshakes.
    let body = with_cert
        .get(server.url("https", "/whoami"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "agent-3f2a");

    server.stop().await;
}

#[tokio::test]
async fn required_client_auth_rejects_anonymous() {
    let pki = pki();
    let server = vault_server(&pki, ClientAuth::Required).await;

    let anonymous = reqwest_client(pki.ca.cert_pem(), None, TIMEOUT).unwrap();
    let res = anonymous.get(server.url("https", "/whoami")).send().await;
    assert!(res.is_err(), "anonymous client was accepted: {res:?}");

    let with_cert = reqwest_client(
        pki.ca.cert_pem(),
        Some((&pki.agent_cert, &pki.agent_key)),
        TIMEOUT,
    )
    .unwrap();
    let body = with_cert
        .get(server.url("https", "/whoami"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "agent-3f2a");
    server.stop().await;
}

#[tokio::test]
async fn agent_data_endpoint_uses_agent_certificate() {
    // The target agent serves with its own (CA-signed) certificate; a source
    // agent connects with its client certificate.
    let pki = pki();
    let tls = server_config(
        &pki.agent_cert,
        &pki.agent_key,
        Some(pki.ca.cert_pem()),
        ClientAuth::Required,
    )
    .unwrap();
    let server = Server::start(Some(tls)).await;
    let (csr, key) = generate_csr(&[]).unwrap();
    let source_cert = pki.ca.sign_csr(&csr, "agent-source", 30).unwrap();
    let client = reqwest_client(pki.ca.cert_pem(), Some((&source_cert, &key)), TIMEOUT).unwrap();
    let body = client
        .get(server.url("https", "/whoami"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "agent-source");
    server.stop().await;
}

#[tokio::test]
async fn plain_http_has_no_identity() {
    install_crypto_provider();
    let server = Server::start(None).await;
    let ca = Ca::generate("ca").unwrap();
    let client = reqwest_client(ca.cert_pem(), None, TIMEOUT).unwrap();
    let body = client
        .get(server.url("http", "/whoami"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "<none>");
    server.stop().await;
}

/// The server closes a keep-alive connection idle for
/// `SERVER_IDLE_TIMEOUT`; clients stop reusing one after `CLIENT_POOL_IDLE`,
/// well before, so a request never goes out on a connection being closed
/// (agents reporting every 30 s met exactly that race). Both halves run at
/// once, at the real values.
#[tokio::test]
async fn clients_drop_idle_connections_before_the_server_closes_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert!(CLIENT_POOL_IDLE + Duration::from_secs(10) <= SERVER_IDLE_TIMEOUT);
    let pki = pki();
    let server = vault_server(&pki, ClientAuth::Optional).await;
    let plain = Server::start(None).await;
    let client = reqwest_client(pki.ca.cert_pem(), None, TIMEOUT).unwrap();
    let url = server.url("https", "/port");
    let client_port = || async {
        let resp = client.get(&url).send().await.unwrap();
        assert!(resp.status().is_success());
        resp.text().await.unwrap()
    };
    let client_side = async {
        let first = client_port().await;
        assert_eq!(client_port().await, first, "an idle connection is reused");
        tokio::time::sleep(CLIENT_POOL_IDLE + Duration::from_secs(2)).await;
        assert_ne!(
            client_port().await,
            first,
            "a connection idle longer than CLIENT_POOL_IDLE is not reused"
        );
    };
    let server_side = async {
        let mut conn = tokio::net::TcpStream::connect(plain.addr).await.unwrap();
        conn.write_all(b"GET /port HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while !response.ends_with(b"\r\n\r\n") || response.len() < 40 {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the server closed before answering");
            response.extend_from_slice(&buf[..n]);
            // The body (a port number) follows the headers.
            if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n")
                && response.len() > at + 4
            {
                break;
            }
        }
        assert!(response.starts_with(b"HTTP/1.1 200"));
        let idle = std::time::Instant::now();
        let n = tokio::time::timeout(SERVER_IDLE_TIMEOUT * 2, conn.read(&mut buf))
            .await
            .expect("the server keeps an idle connection open")
            .unwrap_or(0);
        assert_eq!(n, 0, "the server sent more than one answer");
        let after = idle.elapsed();
        assert!(
            after + Duration::from_secs(1) >= SERVER_IDLE_TIMEOUT,
            "closed after {after:?}, before SERVER_IDLE_TIMEOUT"
        );
    };
    tokio::join!(client_side, server_side);
    server.stop().await;
    plain.stop().await;
}

#[test]
fn sign_csr_sets_identity_and_keeps_sans() {
    let ca = Ca::generate("vault CA").unwrap();
    let (csr, _key) = generate_csr(&["node1.example".to_string(), "10.0.0.7".to_string()]).unwrap();
    assert_eq!(
        csr_subject_alt_names(&csr).unwrap(),
        vec!["node1.example".to_string(), "10.0.0.7".to_string()]
    );
    let cert_pem = ca.sign_csr(&csr, "agent-3f2a", 365).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "agent-3f2a");
    assert_eq!(cert.subject().iter_common_name().count(), 1);
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san.general_names.iter().map(|n| format!("{n}")).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().any(|n| n.contains("node1.example")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.contains("0a:00:00:07")), "{names:?}");
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
    assert!((365..=366).contains(&days), "{days}");
}

#[test]
fn malformed_csr_is_rejected() {
    let ca = Ca::generate("vault CA").unwrap();
    for bad in [
        "",
        "not a csr at all",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ca.cert_pem(),
    ] {
        let err = ca.sign_csr(bad, "agent-x", 30).unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr(_)), "{err:?}");
        assert!(
            err.to_string().contains("certificate signing request"),
            "{err}"
        );
    }
    // Tampered body: signature no longer verifies (or no longer parses).
    let (csr, _) = generate_csr(&["host.example".to_string()]).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr.as_bytes()).unwrap();
    let mut der = pem.contents.clone();
    let idx = der.len() - 40;
    der[idx] ^= 0x01;
    let rewrapped = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64_encode(&der)
    );
    let err = ca.sign_csr(&rewrapped, "agent-x", 30).unwrap_err();
    assert!(matches!(err, PkiError::InvalidCsr(_)), "{err:?}");
    // Bad identity / validity are rejected too.
    assert!(ca.sign_csr(&csr, "", 30).is_err());
    assert!(ca.sign_csr(&csr, "agent-x", 0).is_err());
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn ca_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("vault CA").unwrap();
    assert!(!Ca::exists(dir.path()));
    ca.save(dir.path()).unwrap();
    assert!(Ca::exists(dir.path()));
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let loaded = Ca::load(dir.path()).unwrap();
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(loaded.key_pem(), ca.key_pem());
    // Saving again (overwrite) works.
    loaded.save(dir.path()).unwrap();

    // The CA is valid for ~10 years.
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert!(cert.is_ca());
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
    assert!((3650..=3651).contains(&days), "{days}");

    // Mismatched key is refused.
    let other = Ca::generate("other").unwrap();
    assert!(Ca::from_pem(ca.cert_pem(), other.key_pem()).is_err());
    // A leaf certificate is not a CA.
    let (leaf, leaf_key) = ca.issue_server_cert(&["localhost".to_string()]).unwrap();
    assert!(Ca::from_pem(&leaf, &leaf_key).is_err());
    // Missing directory names the path.
    let err = Ca::load(&dir.path().join("nope")).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn server_config_needs_client_ca_for_client_auth() {
    let ca = Ca::generate("vault CA").unwrap();
    let (cert, key) = ca
        .issue_server_cert(&["vault.example".to_string(), "::1".to_string()])
        .unwrap();
    assert!(server_config(&cert, &key, None, ClientAuth::Required).is_err());
    assert!(server_config(&cert, &key, None, ClientAuth::None).is_ok());
    assert!(server_config(&cert, "garbage", None, ClientAuth::None).is_err());
    assert!(ca.issue_server_cert(&[]).is_err());
}
