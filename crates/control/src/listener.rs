//! The control plane's TLS listener: every connection is TLS 1.3; a client certificate is
//! optional at the TLS layer (joining proxies have none yet) and each RPC decides whether it
//! needs one. The serving certificate is re-issued at half-life, and whenever the CAs change
//! (from the signing CA, trusting the new bundle).

use crate::cas::CaSet;
use crate::error::ControlError;
use crate::service::State;
use arc_swap::ArcSwap;
use bulkhead_api::channel::CONTROL_ID_PATH;
use bulkhead_identity::SpiffeId;
use bulkhead_identity::tls::{ClientAuth, peer_identity, server_config};
use rustls::ServerConfig;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How long a client may take over its TLS handshake, on every TLS listener of the control
/// plane and on the injection webhook.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a listener of the control plane (gRPC, metrics, console, bundle endpoint) and says
/// where it is bound (`listen` may ask for port 0).
pub(crate) async fn bind(listen: SocketAddr) -> Result<(TcpListener, SocketAddr), ControlError> {
    let bind_err = |source| ControlError::Bind {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    Ok((listener, addr))
}

/// Completes the TLS handshake of a connection to one of the HTTPS servers beside the gRPC
/// listener (`what`: the console, the bundle endpoint, the injection webhook) within the
/// handshake timeout. `None`, logged at debug level, when the client failed it or took too
/// long: the connection is dropped.
pub async fn tls_handshake(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    remote: SocketAddr,
    what: &str,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "{what} TLS handshake refused");
            None
        }
        Err(_) => None,
    }
}

/// Who is on the other end of a connection; available to every RPC as a request extension.
#[derive(Clone, Debug)]
pub(crate) struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified SPIFFE ID of the client certificate, if one was presented.
    pub identity: Option<SpiffeId>,
    /// When that certificate expires (seconds since the epoch).
    pub cert_not_after: Option<u64>,
    /// SHA-256 (hex) of the CA certificate that signed it (the second in its chain).
    pub cert_ca_sha256: Option<String>,
    /// Its serial, colon-separated hex (as `bulkhead_identity::serial_of` gives it).
    pub cert_serial: Option<String>,
}

pub(crate) struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The listener's TLS configuration: a serving SVID the signing CA issues now (with a key that
/// never leaves this process), and client certificates checked against the bundle. A revoked
/// certificate completes its handshake and is refused by every call that uses it
/// (`State::refuse_revoked`), so that its holder is told why.
pub(crate) fn serving_config(
    cas: &CaSet,
    svid_lifetime: Duration,
) -> Result<ServerConfig, ControlError> {
    let id = SpiffeId::parse(&format!("spiffe://{}{CONTROL_ID_PATH}", cas.trust_domain()))?;
    let svid = cas
        .active()
        .issue_local(&id, svid_lifetime, std::time::SystemTime::now())?;
    Ok(server_config(
        &svid,
        cas.bundle(),
        ClientAuth::Optional,
        &[b"h2"],
    )?)
}

/// Re-issues the serving certificate at half its lifetime; new connections get the new one.
pub(crate) fn spawn_cert_renewal(state: Arc<State>) {
    tokio::spawn(async move {
        let mut wait = state.svid_lifetime() / 2;
        loop {
            tokio::time::sleep(wait).await;
            wait = match state.refresh_serving() {
                Ok(()) => {
                    tracing::info!("renewed the control plane's serving certificate");
                    state.svid_lifetime() / 2
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not renew the serving certificate; retrying in 30s");
                    Duration::from_secs(30)
                }
            };
        }
    });
}

/// Accepts TCP, completes each TLS handshake on its own task, and yields finished
/// connections to tonic.
pub(crate) fn incoming(
    tcp: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    trust_domain: String,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match tcp.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = stream.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
            let tx = tx.clone();
            let trust_domain = trust_domain.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let certs = tls.get_ref().1.peer_certificates();
                let identity = match certs {
                    None => None,
                    Some(c) => match peer_identity(Some(c), &trust_domain) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            tracing::info!(%remote, reason = %e, "client certificate refused");
                            return;
                        }
                    },
                };
                let cert_not_after = certs
                    .and_then(|c| c.first())
                    .and_then(|c| bulkhead_identity::not_after_of(c))
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                let cert_ca_sha256 = certs
                    .and_then(|c| c.get(1))
                    .map(|c| bulkhead_identity::fingerprint(c));
                let cert_serial = certs
                    .and_then(|c| c.first())
                    .and_then(|c| bulkhead_identity::serial_of(c));
                let info = PeerInfo {
                    remote,
                    identity,
                    cert_not_after,
                    cert_ca_sha256,
                    cert_serial,
                };
                let _ = tx.send(Ok(TlsConn { inner: tls, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The next connection for an HTTPS listener of the control plane's own (the console, the
/// bundle endpoint), with one of its bounded connection slots: waits for a free slot, then
/// accepts. `None` once `stop` turns true. A failed accept (out of descriptors, say) is logged
/// with `what` and retried after 50 ms.
pub(crate) async fn next_connection(
    tcp: &TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    what: &str,
) -> Option<(tokio::sync::OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        _ = stopped(stop) => return None,
        p = slots.clone().acquire_owned() => p.ok()?,
    };
    loop {
        tokio::select! {
            _ = stopped(stop) => return None,
            a = tcp.accept() => match a {
                Ok((tcp, remote)) => return Some((permit, tcp, remote)),
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Until the control plane stops.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
