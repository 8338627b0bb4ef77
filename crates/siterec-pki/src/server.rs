use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::tls::certificate_common_name;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// After shutdown, how long in-flight connections may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server waits for a request's headers, counted from when the
/// connection becomes idle (hyper's header read timeout): a keep-alive
/// connection idle this long is closed. Clients must drop pooled connections
/// sooner ([`crate::CLIENT_POOL_IDLE`]), or a request sent as the server
/// closes fails with a reset.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The verified client certificate's subject common name (for agents: the
/// agent id chosen by the vault at enrolment), or `None` when the client
/// presented no certificate or the connection is plain HTTP.
///
/// Inserted by [`serve`] into every request's extensions, so handlers can take
/// `axum::Extension<PeerIdentity>`. [`axum::extract::ConnectInfo<SocketAddr>`]
/// is inserted as well.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity(pub Option<String>);

impl PeerIdentity {
    /// The common name, if any.
    pub fn common_name(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// Per-connection hyper service: tags each request with the connection's
/// peer identity and remote address, then hands it to the router.
#[derive(Clone)]
struct ConnService {
    router: Router,
    peer: PeerIdentity,
    remote: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.peer.clone());
        req.extensions_mut().insert(ConnectInfo(self.remote));
        let mut router = self.router.clone();
        // Router is always ready (poll_ready returns Ready immediately).
        tower::Service::call(&mut router, req)
    }
}

/// Serve `router` on `listener` until `shutdown` resolves.
///
/// With `tls = Some(config)` every connection is TLS (see
/// [`crate::server_config`]); the peer certificate's CN, if any, becomes the
/// request extension [`PeerIdentity`]. With `tls = None` it is plain HTTP/1.1
/// and every request carries `PeerIdentity(None)`.
///
/// A failed or slow (>15 s) handshake only drops that connection (logged);
/// accept errors (e.g. out of file descriptors) are logged and retried.
/// When `shutdown` resolves the listener is closed, idle keep-alive
/// connections are closed, in-flight requests get up to 10 s to finish, and
/// the function returns.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send,
{
    let acceptor = tls.map(TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let local = listener.local_addr().ok();
    tracing::debug!(?local, tls = acceptor.is_some(), "serving");

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(res) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = res
                    && e.is_panic()
                {
                    tracing::error!("connection task panicked: {e}");
                }
            }
            res = listener.accept() => match res {
                Ok((stream, remote)) => {
                    conns.spawn(handle_connection(
                        stream,
                        remote,
                        acceptor.clone(),
                        router.clone(),
                        stop_rx.clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(?local, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!(
            ?local,
            "connections still open after shutdown grace period; aborting them"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    tracing::debug!(?local, "server stopped");
    Ok(())
}

async fn handle_connection(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    router: Router,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    match acceptor {
        None => {
            let svc = ConnService {
                router,
                peer: PeerIdentity(None),
                remote,
            };
            serve_http(TokioIo::new(stream), svc, stop).await;
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| certificate_common_name(cert.as_ref()));
            tracing::trace!(%remote, ?peer, "TLS connection established");
            let svc = ConnService {
                router,
                peer: PeerIdentity(peer),
                remote,
            };
            serve_http(TokioIo::new(tls), svc, stop).await;
        }
    }
}

async fn serve_http<I>(io: I, svc: ConnService, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let remote = svc.remote;
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Against slowloris, and closes idle keep-alive connections.
    builder.timer(TokioTimer::new());
    builder.header_read_timeout(SERVER_IDLE_TIMEOUT);
    let conn = builder.serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = async { stop.wait_for(|stopped| *stopped).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(%remote, "connection ended with error: {e}");
    }
}
