//! The simulated proxies of the scale benchmark and what they saw. Each one works as a real
//! proxy does: its own key, a `Join` over a connection without a certificate, its own mTLS
//! connection with its new SVID for `Config.Watch` and `Config.Ack`, and `Identity.Renew`
//! over that connection.

use crate::{Error, Result, workload_name};
use bulkhead_api::channel;
use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_api::v1::{AckRequest, JoinRequest, ProxyConfig, RenewRequest, WatchRequest};
use bulkhead_identity::tls::{ExpectedServer, client_config};
use bulkhead_identity::{LocalKey, Svid, TrustBundle};
use bulkhead_policy::model::ResourceName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::Code;
use tonic::transport::Channel;

#[derive(Default, Clone, Copy)]
pub struct Seen {
    pub received: usize,
    pub acked: usize,
    pub first_received: Option<Instant>,
    pub last_received: Option<Instant>,
    pub last_acked: Option<Instant>,
}

#[derive(Default)]
pub struct Tracker {
    revisions: Mutex<HashMap<u64, Seen>>,
    changed: Notify,
    pub stream_errors: AtomicUsize,
    pub ack_errors: AtomicUsize,
}

impl Tracker {
    fn received(&self, revision: u64, at: Instant) {
        let mut map = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.entry(revision).or_default();
        s.received += 1;
        s.first_received.get_or_insert(at);
        s.last_received = Some(at);
    }

    fn acked(&self, revision: u64, at: Instant) {
        {
            let mut map = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
            let s = map.entry(revision).or_default();
            s.acked += 1;
            s.last_acked = Some(at);
        }
        self.changed.notify_waiters();
    }

    pub fn get(&self, revision: u64) -> Seen {
        let map = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&revision).copied().unwrap_or_default()
    }

    /// Waits until `count` proxies have had their ACK of `revision` answered.
    pub async fn wait_acked(&self, revision: u64, count: usize, timeout: Duration) -> Option<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let seen = self.get(revision);
            if seen.acked >= count {
                return Some(seen);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// One control-plane replica (the only one, on the embedded store).
pub struct Control {
    pub addr: SocketAddr,
    pub bundle: TrustBundle,
    pub expected: ExpectedServer,
}

impl Control {
    pub fn channel(&self, svid: Option<&Svid>) -> Result<Channel> {
        let tls = client_config(svid, &self.bundle, self.expected.clone(), &[b"h2"])?;
        Ok(channel::connect(self.addr, tls))
    }
}

/// Retries a call while the server says it is unavailable (still starting, or overloaded).
/// Each attempt gets its own clone of `client` (tonic clients are cheap handles).
pub async fn retry<C, T, F, Fut>(what: &str, client: &C, mut call: F) -> Result<T>
where
    C: Clone,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = std::result::Result<T, tonic::Status>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match call(client.clone()).await {
            Ok(v) => return Ok(v),
            Err(s) if s.code() == Code::Unavailable && delay < Duration::from_secs(10) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(s) => return Err(format!("{what}: {:?}: {}", s.code(), s.message()).into()),
        }
    }
}

/// A proxy before it joins: its key and CSR are made before the clock starts, so that the
/// join figure is the control plane's.
pub struct Unjoined {
    pub i: usize,
    key: LocalKey,
    csr_der: Vec<u8>,
}

impl Unjoined {
    pub fn new(i: usize) -> Result<Unjoined> {
        let key = LocalKey::generate()?;
        let csr_der = key.csr_der(None)?;
        Ok(Unjoined { i, key, csr_der })
    }

    /// `Identity.Join` with `token`, on a connection of its own without a client
    /// certificate, as a real proxy's first dial.
    pub async fn join(self, token: String, control: &Control) -> Result<Joined> {
        let request = JoinRequest {
            token,
            csr_der: self.csr_der,
            ..Default::default()
        };
        let identity = IdentityClient::new(control.channel(None)?);
        let joined = retry("join", &identity, |mut c| {
            let r = request.clone();
            async move { c.join(r).await }
        })
        .await?
        .into_inner();
        let chain = joined.cert_chain_der.into_iter().map(Into::into).collect();
        let svid = self.key.into_svid(chain)?;
        let workload = ResourceName {
            namespace: joined.namespace,
            name: joined.workload,
        };
        if workload.name != workload_name(self.i) {
            return Err(format!("proxy {} was bound to {workload}", self.i).into());
        }
        Ok(Joined {
            i: self.i,
            svid,
            workload,
        })
    }
}

pub struct Joined {
    pub i: usize,
    svid: Svid,
    workload: ResourceName,
}

impl Joined {
    /// Opens its own mTLS connection with its SVID, calls `Config.Watch` and ACKs the first
    /// configuration, then follows (ACKing every configuration) on its own task. Returns the
    /// connection, for its renewal.
    pub async fn watch(
        self,
        control: &Control,
        tracker: std::sync::Arc<Tracker>,
    ) -> Result<Channel> {
        let channel = control.channel(Some(&self.svid))?;
        let mut client = ConfigClient::new(channel.clone());
        let watch = WatchRequest {
            namespace: self.workload.namespace.clone(),
            workload: self.workload.name.clone(),
            ..Default::default()
        };
        let mut stream = retry("watch", &client, |mut c| {
            let w = watch.clone();
            async move { c.watch(w).await }
        })
        .await?
        .into_inner();
        let ack = |config: &ProxyConfig| AckRequest {
            namespace: self.workload.namespace.clone(),
            workload: self.workload.name.clone(),
            revision: config.revision,
            accepted: true,
            error: String::new(),
            ..Default::default()
        };
        // The first configuration arrives at once; answer it before counting this proxy in.
        let first = stream
            .message()
            .await?
            .ok_or("stream closed before the first configuration")?;
        tracker.received(first.revision, Instant::now());
        client.ack(ack(&first)).await?;
        tracker.acked(first.revision, Instant::now());
        let ack_request = ack(&first);
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(config)) => {
                        tracker.received(config.revision, Instant::now());
                        let request = AckRequest {
                            revision: config.revision,
                            ..ack_request.clone()
                        };
                        match client.ack(request).await {
                            Ok(_) => tracker.acked(config.revision, Instant::now()),
                            Err(_) => {
                                tracker.ack_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracker.stream_errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
        Ok(channel)
    }
}

/// A CSR for a proxy's next key, made before the clock starts.
pub fn renewal_csr() -> Result<Vec<u8>> {
    Ok(LocalKey::generate()?.csr_der(None)?)
}

/// `Identity.Renew` over the proxy's own mTLS connection: the new SVID must be for the same
/// workload.
pub async fn renew(i: usize, channel: Channel, csr_der: Vec<u8>) -> Result<()> {
    let renewed = IdentityClient::new(channel)
        .renew(RenewRequest { csr_der })
        .await
        .map_err(|s| Error::from(format!("renew: {:?}: {}", s.code(), s.message())))?
        .into_inner();
    if renewed.workload != workload_name(i) || renewed.cert_chain_der.is_empty() {
        return Err(format!(
            "proxy {i} was renewed for {}/{} with {} certificates",
            renewed.namespace,
            renewed.workload,
            renewed.cert_chain_der.len()
        )
        .into());
    }
    Ok(())
}
