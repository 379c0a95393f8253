//! A proxy's several control-plane replicas: which one is in use, the order the others are
//! tried in, and the connections abandoned when the one in use is lost.

use super::{ControlAddr, ControlAddrs, server_name};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long one replica may take to accept a connection and finish the TLS handshake
/// before the next is tried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// The replica a connection is on, as the proxy's admin shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnReplica {
    /// The address connected to.
    pub addr: SocketAddr,
    /// The `--control` entry it came from (a name, or the address itself).
    pub given: String,
    /// Its place (from 1) among the addresses the entries stood for at that dial.
    pub position: usize,
    /// When the connection was made.
    pub since: std::time::SystemTime,
    /// How many times the connection moved from one replica to another.
    pub moves: u64,
    /// Why it left the replica before, if it moved here.
    pub why: Option<String>,
}

/// Where the control plane's replicas are and which one is in use: shared by every call a
/// proxy makes, so that its configuration stream, renewals and flow reports go to one
/// replica. A dial tries the replica in use first, then the others in the order given; once
/// the replica in use is [`lost`](Replicas::lost), the next one first and the lost one last.
/// Every attempt passes the same TLS checks: a replica that does not present the control
/// plane's identity is refused and the next one tried.
pub struct Replicas {
    given: ControlAddrs,
    place: std::sync::Mutex<Place>,
    /// Bumped when the replica in use is lost: every connection dialled before is abandoned.
    generation: tokio::sync::watch::Sender<u64>,
    on: tokio::sync::watch::Sender<Option<OnReplica>>,
}

#[derive(Default)]
struct Place {
    current: Option<SocketAddr>,
    /// The replica in use when it was lost, and why: tried last by the next dial.
    left: Option<(SocketAddr, String)>,
    moves: u64,
}

impl Replicas {
    pub fn new(given: impl Into<ControlAddrs>) -> Arc<Replicas> {
        Arc::new(Replicas {
            given: given.into(),
            place: std::sync::Mutex::new(Place::default()),
            generation: tokio::sync::watch::Sender::new(0),
            on: tokio::sync::watch::Sender::new(None),
        })
    }

    /// The addresses as given.
    pub fn given(&self) -> &ControlAddrs {
        &self.given
    }

    /// The replica in use, updated at every connection.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Option<OnReplica>> {
        self.on.subscribe()
    }

    /// The replica in use is gone (its stream ended or broke, or it did not answer): the
    /// next dial starts with the next replica, and connections still open are abandoned so
    /// that every call follows. True when this is news: the replica in use was not known
    /// to be lost already.
    pub fn lost(&self, why: &str) -> bool {
        let news = {
            let mut place = self.place.lock().unwrap_or_else(|p| p.into_inner());
            // The first reason stays: later failures to reach it again are its consequence.
            match (place.current, &place.left) {
                (Some(current), Some((left, _))) if *left == current => false,
                (Some(current), _) => {
                    place.left = Some((current, why.to_string()));
                    true
                }
                (None, _) => false,
            }
        };
        self.generation.send_modify(|g| *g += 1);
        news
    }

    /// Every `--control` entry's addresses now, in the order given, each once.
    async fn candidates(&self) -> (Vec<(SocketAddr, &ControlAddr)>, Vec<String>) {
        let mut out: Vec<(SocketAddr, &ControlAddr)> = Vec::new();
        let mut failures = Vec::new();
        for given in self.given.iter() {
            match given.resolve().await {
                Ok(addrs) if addrs.is_empty() => {
                    failures.push(format!("{given} resolves to no address"))
                }
                Ok(addrs) => {
                    for a in addrs {
                        if !out.iter().any(|(seen, _)| *seen == a) {
                            out.push((a, given));
                        }
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        (out, failures)
    }

    /// Connects to a replica: TCP, then TLS 1.3 with `tls` (which checks the control plane's
    /// identity), each replica in [`attempt_order`], each attempt bounded.
    async fn dial(
        &self,
        tls: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let (candidates, mut failures) = self.candidates().await;
        let (current, left) = {
            let place = self.place.lock().unwrap_or_else(|p| p.into_inner());
            (place.current, place.left.as_ref().map(|l| l.0))
        };
        let addrs: Vec<SocketAddr> = candidates.iter().map(|c| c.0).collect();
        let connector = TlsConnector::from(tls);
        let mut kind = std::io::ErrorKind::NotFound;
        for i in attempt_order(&addrs, current, left) {
            let (addr, given) = candidates[i];
            let attempt = async {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                connector.connect(server_name(), tcp).await
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok(Ok(stream)) => {
                    self.arrived(addr, given, i + 1, &failures);
                    return Ok(stream);
                }
                Ok(Err(e)) => {
                    kind = e.kind();
                    tracing::debug!(replica = %addr, error = %e, "control-plane replica not reached");
                    failures.push(format!("{addr}: {e}"));
                }
                Err(_) => {
                    kind = std::io::ErrorKind::TimedOut;
                    failures.push(format!(
                        "{addr}: no answer within {} s",
                        ATTEMPT_TIMEOUT.as_secs()
                    ));
                }
            }
        }
        Err(std::io::Error::new(
            kind,
            match failures.as_slice() {
                [one] => one.clone(),
                _ => format!(
                    "no control-plane replica of {} answered ({})",
                    self.given,
                    failures.join("; ")
                ),
            },
        ))
    }

    /// [`Replicas::dial`], the connection abandoned once the replica is lost.
    pub(super) async fn connect(
        &self,
        tls: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Abandonable<tokio_rustls::client::TlsStream<TcpStream>>> {
        let stream = self.dial(tls).await?;
        Ok(Abandonable::new(stream, &self.generation))
    }

    /// Records the replica a dial reached; logs a move to another one, and why.
    fn arrived(&self, addr: SocketAddr, given: &ControlAddr, position: usize, failed: &[String]) {
        let mut place = self.place.lock().unwrap_or_else(|p| p.into_inner());
        let previous = place.current.replace(addr);
        let left = place.left.take();
        let why = match (&left, failed) {
            (Some((from, why)), []) => Some(format!("{from} was lost: {why}")),
            (Some((from, why)), failed) => Some(format!(
                "{from} was lost: {why}; then not reached: {}",
                failed.join("; ")
            )),
            (None, []) => None,
            (None, failed) => Some(format!("not reached: {}", failed.join("; "))),
        };
        match previous {
            Some(from) if from != addr => {
                place.moves += 1;
                tracing::warn!(
                    replica = %addr,
                    given = %given,
                    from = %from,
                    why = why.as_deref().unwrap_or("-"),
                    "moved to another control-plane replica"
                );
            }
            Some(_) if left.is_some() => {
                tracing::info!(replica = %addr, "reconnected to the same control-plane replica")
            }
            Some(_) => {}
            None => {
                tracing::info!(replica = %addr, given = %given, "connected to a control-plane replica")
            }
        }
        if previous == Some(addr) {
            // Another call's connection to the replica in use: nothing to tell.
            return;
        }
        self.on.send_replace(Some(OnReplica {
            addr,
            given: given.to_string(),
            position,
            since: std::time::SystemTime::now(),
            moves: place.moves,
            why: if previous.is_some() { why } else { None },
        }));
    }
}

/// The order to try replicas in, as indexes into `addrs` (in the order given): the one in
/// use first and then the ones after it, wrapping around; but once the one in use is lost
/// (`left`), the one after it first and the lost one last. With neither known, the order
/// given.
pub fn attempt_order(
    addrs: &[SocketAddr],
    current: Option<SocketAddr>,
    left: Option<SocketAddr>,
) -> Vec<usize> {
    let position = |a: Option<SocketAddr>| a.and_then(|a| addrs.iter().position(|x| *x == a));
    let start = match (position(left), position(current)) {
        (Some(l), _) => l + 1,
        (None, Some(c)) => c,
        (None, None) => 0,
    };
    (0..addrs.len())
        .map(|i| (start + i) % addrs.len())
        .collect()
}

/// A connection to one replica, abandoned (every read and write fails) once that replica is
/// lost, so the channel dials again and every call moves with it.
pub(super) struct Abandonable<T> {
    io: T,
    abandoned: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl<T> Abandonable<T> {
    fn new(io: T, generation: &tokio::sync::watch::Sender<u64>) -> Abandonable<T> {
        let mut rx = generation.subscribe();
        let mine = *rx.borrow_and_update();
        Abandonable {
            io,
            abandoned: Box::pin(async move {
                if rx.wait_for(|g| *g != mine).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }),
        }
    }

    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        match self.abandoned.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "left this control-plane replica",
            )),
            std::task::Poll::Pending => Ok(()),
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Abandonable<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Abandonable<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_stay_on_the_replica_in_use_and_leave_a_lost_one_last() {
        let a: Vec<SocketAddr> = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Nothing known yet: the order given.
        assert_eq!(attempt_order(&a, None, None), vec![0, 1, 2]);
        // On the second: it first, then the ones after it, wrapping around.
        assert_eq!(attempt_order(&a, Some(a[1]), None), vec![1, 2, 0]);
        // The second lost: the third first, the lost one last.
        assert_eq!(attempt_order(&a, Some(a[1]), Some(a[1])), vec![2, 0, 1]);
        // The last lost: around to the first.
        assert_eq!(attempt_order(&a, Some(a[2]), Some(a[2])), vec![0, 1, 2]);
        // A name that no longer resolves to the one in use: the order given.
        let gone: SocketAddr = "10.9.9.9:1".parse().unwrap();
        assert_eq!(attempt_order(&a, Some(gone), Some(gone)), vec![0, 1, 2]);
        assert_eq!(attempt_order(&[], Some(gone), None), Vec::<usize>::new());
        // One replica: always it.
        assert_eq!(attempt_order(&a[..1], Some(a[0]), Some(a[0])), vec![0]);
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_is_several_replicas() {
        // localhost resolves to 127.0.0.1 (and often ::1): each is a replica of its own, after
        // the address given first, and an address given twice counts once.
        let replicas = Replicas::new(
            "127.0.0.2:7443,localhost:7443,127.0.0.1:7443"
                .parse::<ControlAddrs>()
                .unwrap(),
        );
        let (candidates, failures) = replicas.candidates().await;
        assert!(failures.is_empty(), "{failures:?}");
        let addrs: Vec<SocketAddr> = candidates.iter().map(|c| c.0).collect();
        assert_eq!(addrs[0], "127.0.0.2:7443".parse().unwrap());
        assert!(
            addrs.contains(&"127.0.0.1:7443".parse().unwrap()),
            "{addrs:?}"
        );
        assert_eq!(
            addrs
                .iter()
                .filter(|a| a.port() == 7443 && a.ip().is_loopback())
                .count(),
            addrs.len()
        );
        let unique: std::collections::BTreeSet<_> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len(), "{addrs:?}");
        assert_eq!(candidates[1].1.to_string(), "localhost:7443");
    }

    /// A TLS server presenting `svid`, holding every connection open until the client goes.
    async fn serve(
        svid: &bulkhead_identity::Svid,
        bundle: &bulkhead_identity::TrustBundle,
    ) -> SocketAddr {
        use tokio::io::AsyncReadExt;
        let config = bulkhead_identity::tls::server_config(
            svid,
            bundle,
            bulkhead_identity::tls::ClientAuth::Optional,
            &[b"h2"],
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut buf = [0u8; 64];
                        while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                });
            }
        });
        addr
    }

    /// Real sockets and TLS: a refused address and an impostor (a workload's SVID from the
    /// mesh's own CA) are passed over for the first real replica; once it is lost, its open
    /// connection is abandoned and the next replica is reached; once that one is lost too,
    /// the attempts wrap around to the first.
    #[tokio::test]
    async fn replicas_are_tried_in_order_an_impostor_is_refused_and_a_lost_one_left() {
        use bulkhead_identity::tls::{ExpectedServer, client_config};
        use bulkhead_identity::{Ca, SpiffeId, TrustBundle};
        use tokio::io::AsyncReadExt;
        let now = std::time::SystemTime::now();
        let hour = Duration::from_secs(3600);
        let ca = Ca::generate("test.local", now).unwrap();
        let bundle = TrustBundle::from_pem(ca.cert_pem()).unwrap();
        let control_id = SpiffeId::parse("spiffe://test.local/bulkhead/control").unwrap();
        let control = ca.issue_local(&control_id, hour, now).unwrap();
        let workload = SpiffeId::parse("spiffe://test.local/ns/shop/sa/orders").unwrap();
        let impostor = ca.issue_local(&workload, hour, now).unwrap();
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let fake = serve(&impostor, &bundle).await;
        let a = serve(&control, &bundle).await;
        let b = serve(&control, &bundle).await;
        let replicas = Replicas::new(
            format!("{refused},{fake},{a},{b}")
                .parse::<ControlAddrs>()
                .unwrap(),
        );
        let tls = Arc::new(
            client_config(None, &bundle, ExpectedServer::Exact(control_id), &[b"h2"]).unwrap(),
        );
        let on = || replicas.watch().borrow().clone().unwrap();

        let first = replicas.dial(tls.clone()).await.unwrap();
        assert_eq!((on().addr, on().position, on().moves), (a, 3, 0));
        assert_eq!(on().why, None);
        // Another call's connection goes to the replica in use.
        let _second = replicas.dial(tls.clone()).await.unwrap();
        assert_eq!((on().addr, on().moves), (a, 0));

        let mut open = Abandonable::new(first, &replicas.generation);
        assert!(replicas.lost("the configuration stream ended"));
        assert!(!replicas.lost("no answer"), "already known");
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
            .await
            .expect("an abandoned connection fails at once")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);

        let _ = replicas.dial(tls.clone()).await.unwrap();
        assert_eq!((on().addr, on().position, on().moves), (b, 4, 1));
        assert_eq!(
            on().why.unwrap(),
            format!("{a} was lost: the configuration stream ended")
        );

        // The last one lost: around to the refused address and the impostor, then a.
        assert!(replicas.lost("no answer within the keepalive"));
        let _ = replicas.dial(tls.clone()).await.unwrap();
        let why = on().why.unwrap();
        assert_eq!((on().addr, on().moves), (a, 2));
        assert!(
            why.starts_with(&format!(
                "{b} was lost: no answer within the keepalive; then not reached: {refused}: "
            )),
            "{why}"
        );
        assert!(why.contains(&format!("{fake}: ")), "{why}");
        assert!(
            why.contains("spiffe://test.local/ns/shop/sa/orders"),
            "the impostor's identity named: {why}"
        );

        // None left: every failure said.
        let alone = Replicas::new(format!("{refused},{fake}").parse::<ControlAddrs>().unwrap());
        let err = alone.dial(tls).await.unwrap_err().to_string();
        assert!(err.starts_with("no control-plane replica of"), "{err}");
        assert!(
            err.contains(&refused.to_string()) && err.contains(&fake.to_string()),
            "{err}"
        );
    }
}
