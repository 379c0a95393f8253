//! Opaque TCP: relay bytes both ways once policy has allowed the connection, and keep every
//! open relay on a list so that a policy change can judge it again. A connection the new
//! policy denies is closed, with a log line naming the decision.

use crate::Shared;
use crate::authz::{Judgement, Permit, Snapshot};
use bulkhead_identity::SpiffeId;
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_policy::{Decision, Http, Peer, Protocol, Request as PolicyRequest};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

/// What policy knows about an opaque connection: everything but HTTP.
#[derive(Clone, Debug)]
pub(crate) struct Flow {
    pub direction: Direction,
    pub peer_identity: Option<SpiffeId>,
    pub peer_ip: Option<IpAddr>,
    pub peer_workload: Option<WorkloadRef>,
    pub port: u16,
}

impl Flow {
    /// Judges the connection against one snapshot, as L4 policy sees it.
    pub(crate) fn judge(&self, snapshot: &Snapshot, subject: &WorkloadRef) -> Judgement {
        self.judge_request(snapshot, subject, Protocol::Tcp, None)
    }

    /// Judges a request on this connection against one snapshot: `http` is what policy sees
    /// of it, `None` for L4.
    pub(crate) fn judge_request(
        &self,
        snapshot: &Snapshot,
        subject: &WorkloadRef,
        protocol: Protocol,
        http: Option<Http<'_>>,
    ) -> Judgement {
        snapshot.judge(&PolicyRequest {
            direction: self.direction,
            subject,
            peer: Peer {
                identity: self.peer_identity.as_deref(),
                ip: self.peer_ip,
                workload: self.peer_workload.as_ref(),
            },
            port: self.port,
            protocol,
            http,
        })
    }

    /// Judges the connection against the policy in force and logs the decision; `None`,
    /// counted as a reset for denial, when policy denies it (the caller resets it).
    pub(crate) fn admit(&self, shared: &Shared) -> Option<Permit> {
        let (decision, permit) = self
            .judge(&shared.snapshot.load(), &shared.workload)
            .into_parts();
        self.log(&decision, shared);
        if permit.is_none() {
            shared.metrics.reset(self.direction_label(), "denied");
        }
        permit
    }

    /// Counts the connection into its edge for the flow report.
    fn record(&self, decision: &Decision, shared: &Shared) {
        let (source_identity, source_workload, destination) = match self.direction {
            Direction::Ingress => (
                self.peer_identity.as_ref(),
                self.peer_workload.as_ref(),
                &shared.workload,
            ),
            Direction::Egress => match self.peer_workload.as_ref() {
                Some(d) => (Some(&shared.spiffe_id), Some(&shared.workload), d),
                None => return,
            },
        };
        shared.observe(&crate::flows::Seen {
            direction: self.direction,
            source_identity,
            source_workload,
            destination,
            port: self.port,
            protocol: Protocol::Tcp,
            method: None,
            path: None,
            decision,
            bytes_in: 0,
            bytes_out: 0,
            latency: Duration::ZERO,
            status: None,
            grpc_status: None,
        });
    }

    /// The metric labels of this connection's parties (made once per connection).
    fn parties(&self, shared: &Shared) -> crate::metrics::Parties {
        crate::metrics::Parties::with_peer(
            self.direction == Direction::Ingress,
            &shared.identity,
            &shared.place,
            self.peer_identity.as_deref(),
            self.peer_workload.as_ref(),
        )
    }

    pub(crate) fn direction_label(&self) -> &'static str {
        match self.direction {
            Direction::Ingress => "inbound",
            Direction::Egress => "outbound",
        }
    }

    /// The access line for this connection, when it is judged (the schema of HTTP requests'
    /// lines, with `protocol="tcp"`, the port, and no method, path or status).
    pub(crate) fn log(&self, decision: &Decision, shared: &Shared) {
        self.record(decision, shared);
        shared
            .metrics
            .decision(self.direction_label(), decision, &self.parties(shared));
        if !tracing::enabled!(target: "bulkhead::access", tracing::Level::INFO) {
            return;
        }
        let (verdict, policy, rule) = crate::http::verdict_policy_rule(decision);
        let peer = self.peer_identity.as_deref().unwrap_or("-");
        let peer_workload = self
            .peer_workload
            .as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string);
        let (source, destination, source_workload, destination_workload) = match self.direction {
            Direction::Ingress => (
                peer,
                shared.identity.as_str(),
                peer_workload,
                shared.workload.to_string(),
            ),
            Direction::Egress => (
                shared.identity.as_str(),
                peer,
                shared.workload.to_string(),
                peer_workload,
            ),
        };
        tracing::info!(
            target: "bulkhead::access",
            direction = self.direction_label(),
            protocol = "tcp",
            source,
            source_workload,
            destination,
            destination_workload,
            peer_ip = ?self.peer_ip,
            port = self.port,
            verdict,
            policy = %policy,
            rule = %rule,
            revision = decision.revision,
            decision = %decision,
            "connection"
        );
    }
}

/// What opened a relay, to judge it again: an opaque connection, or the HTTP request that
/// switched protocols.
#[derive(Clone)]
pub(crate) enum Opened {
    Tcp(Flow),
    Upgrade(Arc<crate::upgrade::OpenedBy>),
}

impl Opened {
    /// The connection it opened, as L4 sees it.
    fn flow(&self) -> &Flow {
        match self {
            Opened::Tcp(flow) => flow,
            Opened::Upgrade(by) => &by.flow,
        }
    }

    fn direction_label(&self) -> &'static str {
        self.flow().direction_label()
    }

    fn parties(&self, shared: &Shared) -> crate::metrics::Parties {
        self.flow().parties(shared)
    }

    fn judge(&self, snapshot: &Snapshot, subject: &WorkloadRef) -> Judgement {
        match self {
            Opened::Tcp(flow) => flow.judge(snapshot, subject),
            Opened::Upgrade(by) => by.judge(snapshot, subject),
        }
    }

    /// Says why the relay is being closed.
    fn log_close(&self, decision: &Decision) {
        let reason = crate::metrics::Refusal::PolicyChanged.label();
        match self {
            Opened::Tcp(flow) => tracing::warn!(
                direction = flow.direction_label(),
                peer.id = flow.peer_identity.as_deref().unwrap_or("-"),
                peer.ip = ?flow.peer_ip,
                port = flow.port,
                reason,
                decision = %decision,
                "closing an open TCP connection: the new policy denies it"
            ),
            Opened::Upgrade(by) => tracing::warn!(
                direction = self.direction_label(),
                peer.id = by.flow.peer_identity.as_deref().unwrap_or("-"),
                peer.ip = ?by.flow.peer_ip,
                port = by.flow.port,
                http.method = by.method,
                http.path = by.path,
                protocol = by.protocol,
                reason,
                decision = %decision,
                "closing an upgraded connection: the new policy denies the request that opened it"
            ),
        }
    }
}

/// Open relays (opaque connections and upgraded ones), each with a way to close it.
#[derive(Default)]
pub(crate) struct Relays {
    next: AtomicU64,
    open: Mutex<HashMap<u64, (Opened, Arc<Notify>)>>,
}

/// Removes a relay from the list when it ends, however it ends.
struct Registered<'a> {
    relays: &'a Relays,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.relays
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Relays {
    fn register(&self, opened: Opened) -> (Registered<'_>, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (opened, close.clone()));
        (Registered { relays: self, id }, close)
    }

    pub(crate) fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Judges every open relay (with the request that opened it, for an upgraded connection)
/// against the policy now in force; closes the ones it denies.
pub(crate) fn recheck(shared: &Shared) {
    let open: Vec<(Opened, Arc<Notify>)> = shared
        .relays
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    let snapshot = shared.snapshot.load();
    for (opened, close) in open {
        let judged = opened.judge(&snapshot, &shared.workload);
        let decision = judged.decision();
        if !decision.is_allow() {
            opened.log_close(decision);
            let direction = opened.direction_label();
            shared
                .metrics
                .decision(direction, decision, &opened.parties(shared));
            shared
                .metrics
                .refusal(direction, crate::metrics::Refusal::PolicyChanged);
            close.notify_one();
        }
    }
}

/// Relays an opaque connection between `a` (the side that connected to us) and `b`: see
/// [`tunnel`]. Returns why it ended (the `reason` label).
pub(crate) async fn relay<A, B>(
    shared: &Shared,
    permit: Permit,
    flow: Flow,
    a: A,
    b: B,
) -> &'static str
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tunnel(shared, permit, Opened::Tcp(flow), a, b).await
}

/// Relays between `a` (the side that connected to us) and `b` until either side closes, the
/// connection is idle for `--idle-timeout-secs`, or a policy change denies what `opened`
/// it. The permit is the decision that allowed it. Returns why it ended (the `reason`
/// label): on `"error"` (a side reset or failed) the caller resets both, so that the failure
/// reaches the other end as a reset rather than an orderly close.
pub(crate) async fn tunnel<A, B>(
    shared: &Shared,
    _permit: Permit,
    opened: Opened,
    a: A,
    b: B,
) -> &'static str
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let direction = opened.direction_label();
    shared
        .metrics
        .tcp_opened
        .get_or_create(&crate::metrics::DirectionLabels { direction })
        .inc();
    let (_registered, close) = shared.relays.register(opened);
    let idle = shared.limits.idle_timeout;
    let (to_peer, from_peer, reason) = pump(a, b, idle, &close).await;
    let m = &shared.metrics;
    for (flow, n) in [("to_peer", to_peer), ("from_peer", from_peer)] {
        m.tcp_bytes
            .get_or_create(&crate::metrics::TcpBytesLabels { direction, flow })
            .inc_by(n);
    }
    m.tcp_closed
        .get_or_create(&crate::metrics::TcpCloseLabels { direction, reason })
        .inc();
    tracing::debug!(direction, reason, to_peer, from_peer, "TCP relay ended");
    reason
}

/// A connection that can be closed with a TCP reset (`SO_LINGER` 0) instead of an orderly
/// close: how the sidecar refuses what it cannot or will not carry, so that a client (or a
/// port scan) sees a refusal at once rather than an accepted connection closing.
pub(crate) trait Reset: Sized {
    fn tcp(&self) -> &tokio::net::TcpStream;

    fn reset(self) {
        // If the option cannot be set the close is orderly instead: still a refusal.
        let _ = self.tcp().set_zero_linger();
    }
}

impl Reset for tokio::net::TcpStream {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self
    }
}

impl Reset for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }
}

impl Reset for tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }
}

/// Copies both ways; returns bytes a→b, bytes b→a and why it stopped.
async fn pump<A, B>(mut a: A, mut b: B, idle: Duration, close: &Notify) -> (u64, u64, &'static str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
    let (mut buf_a, mut buf_b) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut a_open, mut b_open) = (true, true);
    let reason = loop {
        if !a_open && !b_open {
            break "done";
        }
        tokio::select! {
            _ = close.notified() => break "policy",
            _ = tokio::time::sleep(idle) => break "idle",
            r = a.read(&mut buf_a), if a_open => match r {
                Ok(0) => { a_open = false; let _ = b.shutdown().await; }
                Ok(n) => {
                    if b.write_all(&buf_a[..n]).await.is_err() { break "error"; }
                    let _ = b.flush().await;
                    a_to_b += n as u64;
                }
                Err(_) => break "error",
            },
            r = b.read(&mut buf_b), if b_open => match r {
                Ok(0) => { b_open = false; let _ = a.shutdown().await; }
                Ok(n) => {
                    if a.write_all(&buf_b[..n]).await.is_err() { break "error"; }
                    let _ = a.flush().await;
                    b_to_a += n as u64;
                }
                Err(_) => break "error",
            },
        }
    };
    (a_to_b, b_to_a, reason)
}
