//! Who this proxy refuses although their certificates chain to the bundle: the identities and
//! certificates the control plane revoked (`bulkhead revoke`), pushed with every configuration
//! message. Every TLS configuration the proxy builds asks this list at each handshake (inbound
//! and outbound, reason `revoked`), and an open inbound connection from a peer that becomes
//! revoked is closed at once (`bulkhead_connection_resets{reason="revoked"}`).

use bulkhead_api::v1::Revocations as WireRevocations;
use bulkhead_identity::{RevocationCheck, RevokedSet, SpiffeId};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, Default)]
pub(crate) struct Revoked {
    list: watch::Sender<Arc<RevokedSet>>,
}

impl RevocationCheck for Revoked {
    fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.list.borrow().refuses(id.as_str(), serial)
    }
}

impl Revoked {
    /// Takes the list a configuration message carries (absent: keep the one held). Returns
    /// whether it changed.
    pub(crate) fn take(&self, wire: Option<&WireRevocations>) -> bool {
        let Some(wire) = wire else {
            return false;
        };
        let next = RevokedSet::new(
            wire.identities.iter().cloned(),
            wire.serials.iter().cloned(),
        );
        let changed = self.list.send_if_modified(|held| {
            if **held == next {
                return false;
            }
            *held = Arc::new(next.clone());
            true
        });
        if changed {
            tracing::warn!(
                identities = ?next.identities().collect::<Vec<_>>(),
                serials = ?next.serials().collect::<Vec<_>>(),
                "revocations in force: these peers are refused, and open connections from them closed"
            );
        }
        changed
    }

    /// Resolves once the certificate of `id` with `serial` is revoked (at once if it is);
    /// never otherwise.
    pub(crate) async fn until_revoked(&self, id: &SpiffeId, serial: &str) {
        let mut list = self.list.subscribe();
        loop {
            if list.borrow_and_update().refuses(id.as_str(), serial) {
                return;
            }
            if list.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// A connection this sidecar opened to a peer, closed (both ways, at the socket) as soon as
/// the peer's certificate is revoked. Dropping it stops the watch.
pub(crate) struct Watched<T> {
    inner: T,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<T: crate::tcp::Reset> Watched<T> {
    /// Watches `inner`, whose peer presented the certificate of `id` with `serial`.
    pub(crate) fn new(inner: T, id: SpiffeId, serial: String, shared: &Arc<crate::Shared>) -> Self {
        let dup = match std::os::fd::AsFd::as_fd(inner.tcp()).try_clone_to_owned() {
            Ok(fd) => socket2::Socket::from(fd),
            Err(e) => {
                // Without a second handle the connection cannot be cut from outside; new
                // handshakes are still refused.
                tracing::warn!(error = %e, "cannot watch an upstream connection for revocation");
                return Watched { inner, _stop: None };
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shared.revoked.until_revoked(&id, &serial) => {
                    let _ = dup.shutdown(std::net::Shutdown::Both);
                    shared.metrics.reset("outbound", "revoked");
                    tracing::warn!(dst.id = %id, serial, reason = "revoked", "closed an open connection: its peer was revoked");
                }
                _ = stopped => {}
            }
        });
        Watched {
            inner,
            _stop: Some(stop),
        }
    }
}

impl<T: crate::tcp::Reset> crate::tcp::Reset for Watched<T> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.inner.tcp()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_open_connection_learns_of_its_revocation() {
        let revoked = Arc::new(Revoked::default());
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let waiting = {
            let revoked = revoked.clone();
            let id = id.clone();
            tokio::spawn(async move { revoked.until_revoked(&id, "0a:0b").await })
        };
        assert!(!revoked.take(None), "a message without a list keeps it");
        let other = WireRevocations {
            identities: vec!["spiffe://td/ns/a/sa/c".into()],
            serials: vec!["0c".into()],
        };
        assert!(revoked.take(Some(&other)));
        assert!(
            !revoked.take(Some(&other)),
            "the same list again changes nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "another identity and serial are not this one"
        );
        assert!(!revoked.is_revoked(&id, "0a:0b"));
        let by_serial = WireRevocations {
            identities: vec![],
            serials: vec!["0a:0b".into()],
        };
        assert!(revoked.take(Some(&by_serial)));
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken by the new list")
            .unwrap();
        assert!(revoked.is_revoked(&id, "0a:0b"));
        assert!(!revoked.is_revoked(&id, "0a:0c"));
    }
}
