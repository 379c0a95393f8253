//! Live tap (`bulkhead tap`): while an operator taps this workload, every decided request
//! that matches one of their filters is sent to the control plane as it happens.
//!
//! Off costs one atomic load per request. On, an event is built only for requests the
//! sidecar decided, sent at most [`MAX_EVENTS_PER_SECOND`] a second through a bounded queue
//! that never blocks traffic; what does not fit is counted and the operator is told.
//! An event carries the concrete path (never the query string, headers or body); the control
//! plane forwards it to the operator and stores nothing. When the control plane is away, the
//! tap is off.

use crate::Shared;
use crate::credentials::control_channel;
use crate::flows::{Seen, decided_by, outcome};
use arc_swap::ArcSwap;
use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_api::v1::{ReportTapRequest, WatchRequest};
use bulkhead_insight::tap::{TapEvent, TapFilter};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Events sent to the control plane per second, at most; more are counted as skipped.
pub(crate) const MAX_EVENTS_PER_SECOND: u64 = 100;
/// Events waiting to be sent.
const QUEUE: usize = 1_024;
/// Events per report, and how long the first one waits for company.
const BATCH: usize = 200;
const BATCH_WAIT: Duration = Duration::from_millis(100);

pub(crate) struct Tap {
    on: AtomicBool,
    filters: ArcSwap<Vec<TapFilter>>,
    queue: mpsc::Sender<TapEvent>,
    receiver: Mutex<Option<mpsc::Receiver<TapEvent>>>,
    /// Matching requests not sent since the last report.
    skipped: AtomicU64,
    /// The unix second the rate limit is counting, and how many were sent in it.
    second: AtomicU64,
    sent_this_second: AtomicU64,
}

impl Default for Tap {
    fn default() -> Tap {
        let (queue, receiver) = mpsc::channel(QUEUE);
        Tap {
            on: AtomicBool::new(false),
            filters: ArcSwap::default(),
            queue,
            receiver: Mutex::new(Some(receiver)),
            skipped: AtomicU64::new(0),
            second: AtomicU64::new(0),
            sent_this_second: AtomicU64::new(0),
        }
    }
}

impl Tap {
    /// Offers one decided request to the operators tapping. Never waits.
    #[inline]
    pub(crate) fn offer(&self, seen: &Seen<'_>) {
        if self.on.load(Ordering::Relaxed) {
            self.offer_tapped(seen);
        }
    }

    fn offer_tapped(&self, seen: &Seen<'_>) {
        let now = unix_millis();
        let event = event_of(seen, now);
        if !self.filters.load().iter().any(|f| f.matches(&event)) {
            return;
        }
        let sent = self.within_rate(now / 1000) && self.queue.try_send(event).is_ok();
        if !sent {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn within_rate(&self, second: u64) -> bool {
        if self.second.swap(second, Ordering::Relaxed) != second {
            self.sent_this_second.store(0, Ordering::Relaxed);
        }
        self.sent_this_second.fetch_add(1, Ordering::Relaxed) < MAX_EVENTS_PER_SECOND
    }

    fn set_filters(&self, filters: Vec<TapFilter>) {
        let on = !filters.is_empty();
        self.filters.store(Arc::new(filters));
        self.on.store(on, Ordering::Relaxed);
    }

    fn take_skipped(&self) -> u64 {
        self.skipped.swap(0, Ordering::Relaxed)
    }
}

fn event_of(seen: &Seen<'_>, at_millis: u64) -> TapEvent {
    let (verdict, reason) = outcome(seen.decision);
    let (policy, rule) = decided_by(reason);
    TapEvent {
        at_millis,
        direction: seen.direction,
        source_identity: seen.source_identity.cloned(),
        source_workload: seen.source_workload.cloned(),
        destination: seen.destination.clone(),
        port: seen.port,
        protocol: seen.protocol,
        method: seen.method.map(str::to_string),
        path: seen.path.map(str::to_string),
        status: seen.status,
        grpc_status: seen.grpc_status,
        verdict,
        policy,
        rule,
        latency_micros: seen.latency.as_micros().min(u128::from(u64::MAX)) as u64,
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

/// Follows what operators tap at this workload, and sends what matches.
pub(crate) fn spawn(control: Arc<bulkhead_api::channel::Replicas>, shared: Arc<Shared>) {
    let receiver = shared.tap.receiver.lock().ok().and_then(|mut r| r.take());
    let Some(receiver) = receiver else {
        return;
    };
    let client = ConfigClient::new(control_channel(control, &shared));
    tokio::spawn(follow(client.clone(), shared.clone()));
    tokio::spawn(send(client, shared, receiver));
}

async fn follow(mut client: ConfigClient<tonic::transport::Channel>, shared: Arc<Shared>) {
    let request = WatchRequest {
        namespace: shared.workload.namespace.clone(),
        workload: shared.workload.name.clone(),
        ..WatchRequest::default()
    };
    // The same prompt, jittered, capped retries as the configuration stream.
    let mut backoff = crate::watch::Backoff::reconnect();
    loop {
        match client.watch_taps(request.clone()).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                while let Ok(Some(message)) = stream.message().await {
                    backoff.reset();
                    match serde_json::from_str::<Vec<TapFilter>>(&message.filters_json) {
                        Ok(filters) => {
                            if !filters.is_empty() {
                                tracing::info!(filters = filters.len(), "tapped by an operator");
                            }
                            shared.tap.set_filters(filters);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "tap filters do not decode; not tapping");
                            shared.tap.set_filters(Vec::new());
                        }
                    }
                }
            }
            Err(status) => {
                tracing::debug!(error = %status.message(), "cannot follow taps");
            }
        }
        // Nobody can be told what is tapped while the control plane is away.
        shared.tap.set_filters(Vec::new());
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

async fn send(
    mut client: ConfigClient<tonic::transport::Channel>,
    shared: Arc<Shared>,
    mut receiver: mpsc::Receiver<TapEvent>,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        let skipped = shared.tap.take_skipped();
        let events_json = match serde_json::to_string(&batch) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "could not encode tapped requests");
                continue;
            }
        };
        let report = ReportTapRequest {
            namespace: shared.workload.namespace.clone(),
            workload: shared.workload.name.clone(),
            events_json,
            skipped,
        };
        if let Err(status) = client.report_tap(report).await {
            tracing::debug!(error = %status.message(), "could not send tapped requests");
            let lost = skipped.saturating_add(batch.len() as u64);
            shared.tap.skipped.fetch_add(lost, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_identity::SpiffeId;
    use bulkhead_insight::EdgeVerdict;
    use bulkhead_policy::model::{Direction, ResourceName};
    use bulkhead_policy::{Decision, PolicySet, Protocol};

    static FRONTEND: std::sync::LazyLock<SpiffeId> =
        std::sync::LazyLock::new(|| "spiffe://t/ns/shop/sa/frontend".parse().unwrap());

    fn seen<'a>(
        decision: &'a Decision,
        destination: &'a ResourceName,
        method: &'a str,
    ) -> Seen<'a> {
        Seen {
            direction: Direction::Ingress,
            source_identity: Some(&FRONTEND),
            source_workload: None,
            destination,
            port: 8080,
            protocol: Protocol::Http,
            method: Some(method),
            path: Some("/orders/7"),
            decision,
            bytes_in: 0,
            bytes_out: 0,
            latency: Duration::from_micros(250),
            status: Some(403),
            grpc_status: None,
        }
    }

    #[test]
    fn only_matching_requests_are_queued_and_the_rate_is_bounded() {
        let set = PolicySet::default();
        let orders = ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        let decision = set.evaluate(&bulkhead_policy::Request {
            direction: Direction::Ingress,
            subject: &orders,
            peer: bulkhead_policy::Peer {
                identity: None,
                ip: None,
                workload: None,
            },
            port: 8080,
            protocol: Protocol::Tcp,
            http: None,
        });
        let tap = Tap::default();
        let mut rx = tap.receiver.lock().unwrap().take().unwrap();

        tap.offer(&seen(&decision, &orders, "DELETE"));
        assert!(rx.try_recv().is_err(), "off: nothing is queued");

        tap.set_filters(vec![TapFilter {
            method: Some("DELETE".into()),
            ..TapFilter::default()
        }]);
        tap.offer(&seen(&decision, &orders, "GET"));
        tap.offer(&seen(&decision, &orders, "DELETE"));
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.method.as_deref(), e.path.as_deref(), e.status, e.verdict),
            (
                Some("DELETE"),
                Some("/orders/7"),
                Some(403),
                EdgeVerdict::Deny
            )
        );
        assert_eq!(e.policy.as_deref(), Some("built-in"));
        assert!(rx.try_recv().is_err(), "the GET did not match");

        let many = MAX_EVENTS_PER_SECOND as usize * 3;
        for _ in 0..many {
            tap.offer(&seen(&decision, &orders, "DELETE"));
        }
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        // Within one or two rate windows (the loop may straddle a second), and at least one
        // window's worth but the DELETE above, which may have taken one of this second's:
        // the limit bounds, it does not starve.
        assert!(queued <= 2 * MAX_EVENTS_PER_SECOND as usize, "{queued}");
        assert!(queued >= MAX_EVENTS_PER_SECOND as usize - 1, "{queued}");
        assert_eq!(tap.take_skipped(), (many - queued) as u64);

        tap.set_filters(Vec::new());
        tap.offer(&seen(&decision, &orders, "DELETE"));
        assert!(rx.try_recv().is_err(), "off again");
    }
}
