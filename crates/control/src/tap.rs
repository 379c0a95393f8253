//! Live tap (`bulkhead tap`): routes the requests a workload's proxies decide to the
//! operators tapping it. Nothing is stored.
//!
//! An operator's `Admin.Tap` call registers a session (a filter and a bounded queue) under
//! the tapped workload; the workload's proxies follow the union of the sessions' filters on
//! `Config.WatchTaps` and send what matches on `Config.ReportTap`; each session gets the
//! events its own filter admits. A session whose reader is slower than the traffic loses
//! events rather than holding anything up, and is told how many. The session ends when the
//! operator hangs up, and with the last one the proxies stop sending.

use crate::flows::Reporter;
use bulkhead_api::v1 as pb;
use bulkhead_insight::tap::{TapEvent, TapFilter};
use bulkhead_policy::model::ResourceName;
use futures_util::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tonic::Status;

pub(crate) type TapStream = Pin<Box<dyn Stream<Item = Result<pb::TapResponse, Status>> + Send>>;
pub(crate) type FiltersStream = Pin<Box<dyn Stream<Item = Result<pb::TapFilters, Status>> + Send>>;

/// Messages queued for one operator before events are skipped (each carries a batch).
const SESSION_QUEUE: usize = 256;
/// Bounds on one proxy report: events and JSON bytes.
pub(crate) const MAX_EVENTS_PER_REPORT: usize = 1_000;
pub(crate) const MAX_REPORT_BYTES: usize = 1024 * 1024;
/// Sessions per workload; more taps are refused until one ends.
const MAX_SESSIONS: usize = 32;

type Filters = Arc<Vec<TapFilter>>;

/// What one session is handed from one proxy report: the events its filter admits and how
/// many it did not get. Put on the wire (`pb::TapResponse`) only as the operator reads it.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) events: Vec<TapEvent>,
    pub(crate) skipped: u64,
}

#[derive(Default)]
pub(crate) struct TapHub {
    workloads: Mutex<HashMap<ResourceName, Workload>>,
    next_id: AtomicU64,
}

struct Workload {
    sessions: Vec<Session>,
    /// The sessions' filters, deduplicated: what the workload's proxies send.
    filters: watch::Sender<Filters>,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            sessions: Vec::new(),
            filters: watch::Sender::new(Arc::default()),
        }
    }
}

struct Session {
    id: u64,
    filter: TapFilter,
    queue: mpsc::Sender<Batch>,
    /// Events this session did not get since its last delivered message.
    skipped: Arc<AtomicU64>,
}

/// An open tap; dropping it ends the session.
pub(crate) struct Subscription {
    hub: Arc<TapHub>,
    workload: ResourceName,
    id: u64,
    skipped: Arc<AtomicU64>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.end(&self.workload, self.id);
    }
}

impl TapHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ResourceName, Workload>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.workloads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `workload`'s proxies should send, now and on every change.
    pub(crate) fn filters(&self, workload: &ResourceName) -> watch::Receiver<Filters> {
        self.lock()
            .entry(workload.clone())
            .or_default()
            .filters
            .subscribe()
    }

    /// Opens a session tapping `workload` with `filter`.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        workload: &ResourceName,
        filter: TapFilter,
    ) -> Result<(Subscription, mpsc::Receiver<Batch>), Status> {
        let (queue, rx) = mpsc::channel(SESSION_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let skipped = Arc::new(AtomicU64::new(0));
        let mut map = self.lock();
        let w = map.entry(workload.clone()).or_default();
        if w.sessions.len() >= MAX_SESSIONS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_SESSIONS} taps of {workload} are open already; end one and try again"
            )));
        }
        w.sessions.push(Session {
            id,
            filter,
            queue,
            skipped: skipped.clone(),
        });
        w.publish_filters();
        drop(map);
        Ok((
            Subscription {
                hub: self.clone(),
                workload: workload.clone(),
                id,
                skipped,
            },
            rx,
        ))
    }

    fn end(&self, workload: &ResourceName, id: u64) {
        let mut map = self.lock();
        if let Some(w) = map.get_mut(workload) {
            w.sessions.retain(|s| s.id != id);
            w.publish_filters();
            if w.sessions.is_empty() && w.filters.receiver_count() == 0 {
                map.remove(workload);
            }
        }
    }

    /// Hands a proxy's report to every session of `workload` whose filter admits events;
    /// `skipped` (what the proxy could not send) is told to every session.
    pub(crate) fn publish(&self, workload: &ResourceName, events: &[TapEvent], skipped: u64) {
        let map = self.lock();
        let Some(w) = map.get(workload) else {
            return;
        };
        for s in &w.sessions {
            let mine: Vec<TapEvent> = events
                .iter()
                .filter(|e| s.filter.matches(e))
                .cloned()
                .collect();
            if mine.is_empty() && skipped == 0 {
                continue;
            }
            let untold = s.skipped.swap(0, Ordering::Relaxed);
            let batch = Batch {
                events: mine,
                skipped: untold.saturating_add(skipped),
            };
            if let Err(mpsc::error::TrySendError::Full(batch)) = s.queue.try_send(batch) {
                // The operator reads slower than the traffic: count, never wait.
                let lost = batch.skipped.saturating_add(batch.events.len() as u64);
                s.skipped.fetch_add(lost, Ordering::Relaxed);
            }
        }
    }
}

impl Workload {
    fn publish_filters(&self) {
        let mut filters: Vec<TapFilter> = Vec::new();
        for s in &self.sessions {
            if !filters.contains(&s.filter) {
                filters.push(s.filter.clone());
            }
        }
        self.filters.send_replace(Arc::new(filters));
    }
}

impl Subscription {
    /// Events skipped for this session and not yet told.
    pub(crate) fn take_skipped(&self) -> u64 {
        self.skipped.swap(0, Ordering::Relaxed)
    }
}

/// The operator's stream: a first message saying how many proxies will be tapped, then
/// each batch, for as long as the operator stays.
pub(crate) fn session_stream(
    subscription: Subscription,
    rx: mpsc::Receiver<Batch>,
    proxies_connected: u32,
) -> TapStream {
    let hello = pb::TapResponse {
        events_json: "[]".into(),
        skipped: 0,
        proxies_connected,
    };
    let first = futures_util::stream::iter([Ok(hello)]);
    let rest = futures_util::stream::unfold((subscription, rx), |(sub, mut rx)| async move {
        let batch = rx.recv().await?;
        let message = match serde_json::to_string(&batch.events) {
            Ok(events_json) => Ok(pb::TapResponse {
                events_json,
                skipped: batch.skipped.saturating_add(sub.take_skipped()),
                proxies_connected: 0,
            }),
            Err(e) => Err(Status::internal(format!("cannot encode tap events: {e}"))),
        };
        Some((message, (sub, rx)))
    });
    Box::pin(futures_util::StreamExt::chain(first, rest))
}

/// A proxy's stream of the filters it should tap with.
pub(crate) fn filters_stream(rx: watch::Receiver<Filters>) -> FiltersStream {
    let stream = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let filters = rx.borrow_and_update().clone();
        let message = match serde_json::to_string(&*filters) {
            Ok(filters_json) => Ok(pb::TapFilters { filters_json }),
            Err(e) => Err(Status::internal(format!("cannot encode tap filters: {e}"))),
        };
        Some((message, (rx, false)))
    });
    Box::pin(stream)
}

/// Reads a proxy's tap report, keeping only events the reporting proxy decided (ingress to
/// its workload, egress from it under its own identity). Returns the events and how many
/// were refused.
pub(crate) fn parse_report(
    json: &str,
    workload: &ResourceName,
    spiffe_id: &str,
) -> Result<(Vec<TapEvent>, usize), String> {
    if json.len() > MAX_REPORT_BYTES {
        return Err(format!(
            "a tap report is {} bytes; at most {MAX_REPORT_BYTES} are accepted",
            json.len()
        ));
    }
    let events: Vec<TapEvent> =
        serde_json::from_str(json).map_err(|e| format!("a tap report does not decode: {e}"))?;
    if events.len() > MAX_EVENTS_PER_REPORT {
        return Err(format!(
            "a tap report holds {} events; at most {MAX_EVENTS_PER_REPORT} are accepted",
            events.len()
        ));
    }
    let total = events.len();
    let reporter = Reporter {
        workload,
        spiffe_id,
    };
    let kept: Vec<TapEvent> = events
        .into_iter()
        .filter(|e| {
            reporter.decides(
                e.direction,
                e.source_identity.as_deref(),
                e.source_workload.as_ref(),
                &e.destination,
            )
        })
        .collect();
    let refused = total - kept.len();
    Ok((kept, refused))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_insight::EdgeVerdict;
    use bulkhead_policy::Protocol;
    use bulkhead_policy::model::Direction;

    fn wl(name: &str) -> ResourceName {
        ResourceName {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn event(method: &str, direction: Direction) -> TapEvent {
        TapEvent {
            at_millis: 1,
            direction,
            source_identity: Some("spiffe://t/ns/shop/sa/frontend".parse().unwrap()),
            source_workload: Some(wl("frontend")),
            destination: wl("orders"),
            port: 8080,
            protocol: Protocol::Http,
            method: Some(method.into()),
            path: Some("/orders/1".into()),
            status: Some(200),
            grpc_status: None,
            verdict: EdgeVerdict::Allow,
            policy: None,
            rule: None,
            latency_micros: 5,
        }
    }

    #[tokio::test]
    async fn sessions_get_what_their_filter_admits_and_proxies_follow_the_union() {
        let hub = Arc::new(TapHub::default());
        let orders = wl("orders");
        let mut proxy = hub.filters(&orders);
        assert!(proxy.borrow_and_update().is_empty(), "nobody taps yet");

        let deletes = TapFilter {
            method: Some("DELETE".into()),
            ..TapFilter::default()
        };
        let (all, mut all_rx) = hub.subscribe(&orders, TapFilter::default()).unwrap();
        let (del, mut del_rx) = hub.subscribe(&orders, deletes.clone()).unwrap();
        assert_eq!(
            **proxy.borrow_and_update(),
            vec![TapFilter::default(), deletes.clone()]
        );

        let events = [
            event("GET", Direction::Ingress),
            event("DELETE", Direction::Ingress),
        ];
        hub.publish(&orders, &events, 0);
        assert_eq!(all_rx.recv().await.unwrap().events.len(), 2);
        let only = del_rx.recv().await.unwrap().events;
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].method.as_deref(), Some("DELETE"));

        // Another workload's reports reach nobody here.
        hub.publish(&wl("payments"), &events, 0);
        assert!(all_rx.try_recv().is_err());

        drop(all);
        assert_eq!(**proxy.borrow_and_update(), vec![deletes]);
        drop(del);
        assert!(proxy.borrow_and_update().is_empty(), "the last tap ended");
    }

    #[tokio::test]
    async fn a_slow_reader_loses_events_and_is_told_how_many() {
        let hub = Arc::new(TapHub::default());
        let orders = wl("orders");
        let (sub, mut rx) = hub.subscribe(&orders, TapFilter::default()).unwrap();
        let one = [event("GET", Direction::Ingress)];
        for _ in 0..SESSION_QUEUE + 3 {
            hub.publish(&orders, &one, 0);
        }
        for _ in 0..SESSION_QUEUE {
            assert_eq!(rx.recv().await.unwrap().skipped, 0);
        }
        assert_eq!(sub.take_skipped(), 3);
    }

    #[test]
    fn a_proxy_reports_only_what_it_decided() {
        let orders = wl("orders");
        let me = "spiffe://t/ns/shop/sa/orders";
        let mut egress_as_me = event("GET", Direction::Egress);
        egress_as_me.source_workload = Some(orders.clone());
        egress_as_me.source_identity = Some(me.parse().unwrap());
        let json = serde_json::to_string(&[
            // Ingress to orders: ours.
            event("GET", Direction::Ingress),
            // Egress claiming to be frontend's: not ours.
            event("GET", Direction::Egress),
            egress_as_me,
        ])
        .unwrap();
        let (kept, refused) = parse_report(&json, &orders, me).unwrap();
        assert_eq!((kept.len(), refused), (2, 1));
        assert!(parse_report("{", &orders, me).is_err());
        let huge = format!("[{}]", " ".repeat(MAX_REPORT_BYTES));
        assert!(
            parse_report(&huge, &orders, me)
                .unwrap_err()
                .contains("at most")
        );
    }
}
