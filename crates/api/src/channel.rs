//! The one way to reach the control plane: a tonic channel over TLS 1.3 whose server must
//! present the control plane's SPIFFE ID. Used by proxies and by the CLI.

use bulkhead_identity::tls::server_name;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

mod replicas;
pub use replicas::{OnReplica, Replicas, attempt_order};

/// The path of the control plane's SPIFFE ID within its trust domain.
pub const CONTROL_ID_PATH: &str = "/bulkhead/control";
/// The path of the admin credential's SPIFFE ID within its trust domain.
pub const ADMIN_ID_PATH: &str = "/bulkhead/admin";

/// Where the control plane is: an address, or a DNS name (a Kubernetes Service's, say) and a
/// port. A name is resolved again at every dial, and each address it resolves to is tried in
/// turn, so a name that moves or lists several replicas is followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlAddr {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl From<SocketAddr> for ControlAddr {
    fn from(addr: SocketAddr) -> ControlAddr {
        ControlAddr::Addr(addr)
    }
}

impl std::fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlAddr::Addr(a) => write!(f, "{a}"),
            ControlAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl std::str::FromStr for ControlAddr {
    type Err = String;

    /// `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT`.
    fn from_str(s: &str) -> Result<ControlAddr, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ControlAddr::Addr(addr));
        }
        let bad = || {
            format!(
                "{s:?} is not HOST:PORT (an address like 10.0.0.1:7443 or a DNS name like bulkhead-control.bulkhead.svc:7443)"
            )
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid || port == 0 {
            return Err(bad());
        }
        Ok(ControlAddr::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl ControlAddr {
    /// The addresses it stands for now: itself, or what the name resolves to.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match self {
            ControlAddr::Addr(a) => Ok(vec![*a]),
            ControlAddr::Name { host, port } => Ok(tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot resolve {self}: {e}")))?
                .collect()),
        }
    }

    /// Dials it: the address, or each address the name resolves to now, in turn.
    pub async fn dial(&self) -> std::io::Result<TcpStream> {
        let addrs = self.resolve().await?;
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{self} resolves to no address"),
        );
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The control plane's replicas as given to a proxy: one or more [`ControlAddr`]s in the
/// order given (`--control a:7443,b:7443 --control c:7443`). A name that resolves to several
/// addresses stands for as many replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlAddrs(Vec<ControlAddr>);

impl ControlAddrs {
    /// At least one address, or `None`.
    pub fn new(addrs: Vec<ControlAddr>) -> Option<ControlAddrs> {
        (!addrs.is_empty()).then_some(ControlAddrs(addrs))
    }

    pub fn iter(&self) -> impl Iterator<Item = &ControlAddr> {
        self.0.iter()
    }
}

impl From<ControlAddr> for ControlAddrs {
    fn from(addr: ControlAddr) -> ControlAddrs {
        ControlAddrs(vec![addr])
    }
}

impl From<SocketAddr> for ControlAddrs {
    fn from(addr: SocketAddr) -> ControlAddrs {
        ControlAddrs(vec![ControlAddr::Addr(addr)])
    }
}

impl std::fmt::Display for ControlAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ControlAddrs {
    type Err = String;

    /// `HOST:PORT[,HOST:PORT…]`, each as [`ControlAddr`] reads it.
    fn from_str(s: &str) -> Result<ControlAddrs, String> {
        let addrs = s
            .split(',')
            .map(|part| part.trim().parse::<ControlAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        ControlAddrs::new(addrs).ok_or_else(|| "no control-plane address given".to_string())
    }
}

/// Connects lazily: the first RPC dials, and a broken connection is re-dialled on the next.
pub fn connect(addr: impl Into<ControlAddrs>, tls: rustls::ClientConfig) -> Channel {
    let tls = Arc::new(tls);
    connect_dynamic(Replicas::new(addr), move || tls.clone())
}

/// Like [`connect`], to the replicas `replicas` follows (a join, say, whose replica the
/// calls after it then start with).
pub fn connect_to(replicas: Arc<Replicas>, tls: rustls::ClientConfig) -> Channel {
    let tls = Arc::new(tls);
    connect_dynamic(replicas, move || tls.clone())
}

/// Like [`connect`], to the replicas `replicas` follows, asking `tls` for the configuration
/// at every dial, so a rotated certificate is used by the next connection while open ones
/// carry on.
pub fn connect_dynamic(
    replicas: Arc<Replicas>,
    tls: impl Fn() -> Arc<rustls::ClientConfig> + Send + Sync + 'static,
) -> Channel {
    let tls = Arc::new(tls);
    // The URI is only a placeholder for tonic; the connector below decides where to dial,
    // each replica's attempt bounded on its own (`ATTEMPT_TIMEOUT`).
    let endpoint = Endpoint::from_static("http://bulkhead.control")
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let tls = tls();
        let replicas = replicas.clone();
        async move {
            let io = replicas.connect(tls).await?;
            Ok::<_, std::io::Error>(TokioIo::new(io))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_addresses_are_addresses_or_names() {
        assert_eq!(
            "10.0.0.1:7443".parse::<ControlAddr>(),
            Ok(ControlAddr::Addr("10.0.0.1:7443".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:7443".parse::<ControlAddr>(),
            Ok(ControlAddr::Addr("[::1]:7443".parse().unwrap()))
        );
        assert_eq!(
            "Bulkhead-Control.bulkhead.svc:7443".parse::<ControlAddr>(),
            Ok(ControlAddr::Name {
                host: "bulkhead-control.bulkhead.svc".into(),
                port: 7443
            })
        );
        for bad in [
            "",
            "host",
            "host:",
            ":7443",
            "host:0",
            "ho st:1",
            "-a.b:1",
            "a..b:1",
            "host:99999",
        ] {
            let err = bad.parse::<ControlAddr>().unwrap_err();
            assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_name_is_resolved_at_dial() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let by_name: ControlAddr = format!("localhost:{port}").parse().unwrap();
        let dialled = by_name.dial().await.unwrap();
        assert_eq!(dialled.peer_addr().unwrap().port(), port);
        let nowhere: ControlAddr = "no-such-host.invalid:7443".parse().unwrap();
        let err = nowhere.dial().await.unwrap_err().to_string();
        assert!(
            err.contains("cannot resolve no-such-host.invalid:7443"),
            "{err}"
        );
    }

    #[test]
    fn several_replicas_comma_separated() {
        let given: ControlAddrs = "10.0.0.1:7443, control-b.mesh:7443,[::1]:7443"
            .parse()
            .unwrap();
        assert_eq!(
            given.iter().cloned().collect::<Vec<_>>(),
            vec![
                ControlAddr::Addr("10.0.0.1:7443".parse().unwrap()),
                ControlAddr::Name {
                    host: "control-b.mesh".into(),
                    port: 7443
                },
                ControlAddr::Addr("[::1]:7443".parse().unwrap()),
            ]
        );
        assert_eq!(
            given.to_string(),
            "10.0.0.1:7443,control-b.mesh:7443,[::1]:7443"
        );
        for bad in ["", "10.0.0.1:7443,", "10.0.0.1:7443,,b:1", "a:1,b"] {
            let err = bad.parse::<ControlAddrs>().unwrap_err();
            assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
        }
        assert_eq!(ControlAddrs::new(vec![]), None);
    }
}
