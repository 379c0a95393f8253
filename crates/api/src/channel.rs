//! The one way to reach the control plane: a tonic channel over TLS 1.3 whose server must
//! present the control plane's SPIFFE ID. Used by proxies and by the CLI.

use bulkhead_identity::tls::server_name;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// The path of the control plane's SPIFFE ID within its trust domain.
pub const CONTROL_ID_PATH: &str = "/bulkhead/control";
/// The path of the admin credential's SPIFFE ID within its trust domain.
pub const ADMIN_ID_PATH: &str = "/bulkhead/admin";

/// Connects lazily: the first RPC dials, and a broken connection is re-dialled on the next.
pub fn connect(addr: SocketAddr, tls: rustls::ClientConfig) -> Channel {
    let tls = Arc::new(tls);
    connect_dynamic(addr, move || tls.clone())
}

/// Like [`connect`], but asks `tls` for the configuration at every dial, so a rotated
/// certificate is used by the next connection while open ones carry on.
pub fn connect_dynamic(
    addr: SocketAddr,
    tls: impl Fn() -> Arc<rustls::ClientConfig> + Send + Sync + 'static,
) -> Channel {
    let tls = Arc::new(tls);
    // The URI is only a placeholder for tonic; the connector below decides where to dial.
    let endpoint = Endpoint::from_static("http://bulkhead.control")
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = TlsConnector::from(tls());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name(), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }))
}
