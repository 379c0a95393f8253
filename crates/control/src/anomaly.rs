//! Anomalies (`bulkhead events`): every accepted flow report goes through the detector of
//! `bulkhead_insight::events`, and what it finds is stored (`events` table) and counted.
//!
//! What the detector knows lives in memory, loaded at start from the stored edges, so a
//! restart does not announce again what the store kept; when learning started is kept in
//! the store too. Finding anomalies never fails or slows a flow report beyond a few hash
//! look-ups per edge: the store is written only when there is an event to keep, and an
//! error there is logged, not returned to the proxy, whose edges are already stored.

use crate::error::ControlError;
use crate::flows::bucket_of;
use crate::metrics::Metrics;
use crate::store::{EventRetention, Store};
use bulkhead_insight::Edge;
use bulkhead_insight::events::{BASELINE_SECS, Detector, Event, EventKind, SpikeRule};
use bulkhead_policy::model::WorkloadRef;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Events are kept this long and at most this many.
pub(crate) const EVENT_RETENTION: EventRetention = EventRetention {
    window_secs: 7 * 24 * 3600,
    max_rows: 10_000,
};
/// A `ListEvents` answers at most this many events.
pub(crate) const MAX_EVENTS_PER_LIST: usize = 1_000;

/// How the control plane finds anomalies in flow reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Anomalies {
    /// New edges and identities are learned silently for this long after the first flow
    /// report is stored: they are the baseline. 0: everything new is reported.
    pub learning: Duration,
    /// A denial spike: at least this many denied requests to one destination within a
    /// minute…
    pub spike_min_denials: u64,
    /// …and at least this many times their mean per minute over the hour before.
    pub spike_factor: f64,
}

impl Default for Anomalies {
    fn default() -> Anomalies {
        let rule = SpikeRule::default();
        Anomalies {
            learning: Duration::from_secs(3600),
            spike_min_denials: rule.min_denials,
            spike_factor: rule.factor,
        }
    }
}

/// The detector, shared by every report.
#[derive(Debug)]
pub(crate) struct Monitor {
    detector: Mutex<Detector>,
}

impl Monitor {
    /// A detector that knows every stored edge, learning since the first stored report.
    pub(crate) fn load(
        store: &Store,
        options: &Anomalies,
        now: u64,
    ) -> Result<Monitor, ControlError> {
        // One pass over the stored rows: every key becomes known, and the denials in the
        // stored hours that cover the last one give each destination's usual rate.
        let recent = bucket_of(now.saturating_sub(BASELINE_SECS));
        let mut keys = Vec::new();
        let (mut first_seen, mut recent_first_seen) = (u64::MAX, u64::MAX);
        let mut denied: BTreeMap<WorkloadRef, u64> = BTreeMap::new();
        store.each_edge_row(0, |bucket, edge| {
            first_seen = first_seen.min(edge.stats.first_seen);
            if bucket >= recent {
                recent_first_seen = recent_first_seen.min(edge.stats.first_seen);
                if !edge.key.verdict.is_allow() && edge.stats.count > 0 {
                    let n = denied.entry(edge.key.destination.clone()).or_default();
                    *n = n.saturating_add(edge.stats.count);
                }
            }
            keys.push(edge.key);
        })?;
        let mut start = store.learning_start()?;
        if start.is_none() && !keys.is_empty() {
            // Edges stored before anomalies were found: learning started with the first.
            store.set_learning_start(first_seen.min(now))?;
            start = Some(first_seen.min(now));
        }
        let rule = SpikeRule {
            min_denials: options.spike_min_denials,
            factor: options.spike_factor,
        };
        let mut detector = Detector::new(options.learning.as_secs(), rule, start);
        detector.learn(&keys);
        // Counted since the first request of those hours, but not before the first of them.
        let counted_from = recent_first_seen.max(recent);
        let destinations = denied.len();
        detector.recall_denials(denied, now.saturating_sub(counted_from), now);
        tracing::info!(
            rows = keys.len(),
            destinations_with_denials = destinations,
            learning_until = detector.learning_until(),
            "anomaly detection knows the stored edges and recent denial rates"
        );
        Ok(Monitor {
            detector: Mutex::new(detector),
        })
    }

    fn detector(&self) -> MutexGuard<'_, Detector> {
        // A panic elsewhere cannot leave the sets half-updated in a way that matters here.
        self.detector.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Finds the anomalies in the edges of one accepted report, arrived at `now`; stores,
    /// counts and logs them.
    pub(crate) fn observe(&self, store: &Store, edges: &[Edge], now: u64, metrics: &Metrics) {
        let (observation, started) = {
            let mut detector = self.detector();
            let before = detector.learning_start();
            let observation = detector.observe(edges, now);
            let started = match before {
                None => detector.learning_until(),
                Some(_) => None,
            };
            (observation, started)
        };
        if let Some(until) = started {
            if now < until {
                tracing::info!(
                    until = %bulkhead_insight::rfc3339(until),
                    "first flow report: learning the baseline; new edges and identities seen until then are not reported"
                );
            }
            if let Err(e) = store.set_learning_start(now) {
                tracing::error!(error = %e, "could not record when learning started; after a restart it starts again");
            }
        }
        if observation.unremembered > 0 {
            tracing::warn!(
                unremembered = observation.unremembered,
                "anomaly detection is at its memory bound: new edges, identities or destinations were neither remembered nor reported"
            );
        }
        if observation.events.is_empty() {
            return;
        }
        match store.append_events(observation.events, now, &EVENT_RETENTION) {
            Ok(stored) => {
                for e in &stored {
                    metrics.anomaly(e.kind);
                    log(e);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "could not store anomaly events; they are lost, the flow report is kept")
            }
        }
    }

    /// Until when new edges and identities are learned silently, or 0 if they are not (any
    /// more). Before the first report, the earliest that learning could end.
    pub(crate) fn learning_until(&self, now: u64) -> u64 {
        let detector = self.detector();
        match detector.learning_until() {
            Some(until) if now < until => until,
            Some(_) => 0,
            None if detector.learning_secs() > 0 => now.saturating_add(detector.learning_secs()),
            None => 0,
        }
    }
}

/// One structured log event per anomaly, with its parties as fields.
fn log(e: &Event) {
    let src_id = e.source_identity.as_deref().unwrap_or("");
    let src_workload = e.source_workload.as_ref().map(ToString::to_string);
    let dst = e.destination.as_ref().map(ToString::to_string);
    let (seq, kind, detail) = (e.seq, e.kind.as_str(), e.detail.as_str());
    match e.kind {
        EventKind::DenialSpike | EventKind::FederationRefreshFailed => {
            tracing::warn!(seq, kind, dst.workload = dst, detail, "anomaly")
        }
        _ => tracing::info!(
            seq,
            kind,
            src.id = src_id,
            src.workload = src_workload,
            dst.workload = dst,
            dst.port = e.port,
            detail,
            "anomaly"
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::flows::FlowRetention;
    use crate::flows::tests::edge;
    use crate::testing::{TempDir, from};
    use bulkhead_insight::EdgeVerdict;
    use bulkhead_policy::model::Direction::Ingress;

    /// 2024-05-01 10:00 UTC.
    const T0: u64 = 1_714_557_600;

    fn open(dir: &TempDir) -> Store {
        Store::open(&dir.path().join("state.redb")).unwrap()
    }

    fn no_learning() -> Anomalies {
        Anomalies {
            learning: Duration::ZERO,
            ..Anomalies::default()
        }
    }

    /// Stores `edges` as a report would, then observes them.
    fn report(store: &Store, monitor: &Monitor, edges: &[bulkhead_insight::Edge], now: u64) {
        let mut edges = edges.to_vec();
        store
            .merge_edges(&mut edges, now, &FlowRetention::default())
            .unwrap();
        monitor.observe(store, &edges, now, &Metrics::default());
    }

    fn kinds(store: &Store) -> Vec<(u64, EventKind)> {
        let page = store.events(0, 0, 100).unwrap();
        page.events.iter().map(|e| (e.seq, e.kind)).collect()
    }

    #[test]
    fn a_restart_announces_nothing_the_store_kept_and_keeps_learning_time() {
        let dir = TempDir::new("anomaly-restart");
        let learn = Anomalies {
            learning: Duration::from_secs(600),
            ..Anomalies::default()
        };
        {
            let store = open(&dir);
            let monitor = Monitor::load(&store, &learn, T0).unwrap();
            assert_eq!(monitor.learning_until(T0), T0 + 600, "not started yet");
            report(
                &store,
                &monitor,
                &[edge("a", "orders", Ingress, "/", T0)],
                T0,
            );
            assert_eq!(monitor.learning_until(T0 + 300), T0 + 600);
            assert!(kinds(&store).is_empty(), "learned silently");
        }
        let store = open(&dir);
        let monitor = Monitor::load(&store, &learn, T0 + 300).unwrap();
        assert_eq!(
            monitor.learning_until(T0 + 300),
            T0 + 600,
            "kept across restarts"
        );
        assert_eq!(monitor.learning_until(T0 + 600), 0);
        let now = T0 + 700;
        report(
            &store,
            &monitor,
            &[
                edge("a", "orders", Ingress, "/", now),
                edge("b", "orders", Ingress, "/", now),
            ],
            now,
        );
        assert_eq!(
            kinds(&store),
            vec![(1, EventKind::NewIdentity), (2, EventKind::NewEdge)]
        );
    }

    #[test]
    fn a_restart_recalls_the_usual_denial_rate() {
        let denials = |n: u64, at: u64| {
            let mut e = edge("a", "orders", Ingress, "/", at);
            e.key.verdict = bulkhead_insight::EdgeVerdict::Deny;
            e.stats.count = n;
            e
        };
        let spikes = |store: &Store| {
            let page = store.events(0, 0, 100).unwrap();
            page.events
                .iter()
                .filter(|e| e.kind == EventKind::DenialSpike)
                .count()
        };
        let dir = TempDir::new("anomaly-denials");
        {
            // 10 denials a minute for an hour: the usual rate, never a spike.
            let store = open(&dir);
            let monitor = Monitor::load(&store, &no_learning(), T0).unwrap();
            for minute in 0..60 {
                let at = T0 + minute * 60;
                report(&store, &monitor, &[denials(10, at)], at);
            }
            assert_eq!(spikes(&store), 0);
        }
        // After a restart, 40 in a minute is under 5 times the usual 10…
        let now = T0 + 3600;
        let store = open(&dir);
        let monitor = Monitor::load(&store, &no_learning(), now).unwrap();
        report(&store, &monitor, &[denials(40, now)], now);
        assert_eq!(spikes(&store), 0, "the usual rate was recalled");
        // …where a control plane that knew no history would call it a spike.
        let empty = TempDir::new("anomaly-no-denials");
        let store = open(&empty);
        let monitor = Monitor::load(&store, &no_learning(), now).unwrap();
        report(&store, &monitor, &[denials(40, now)], now);
        assert_eq!(spikes(&store), 1);
    }

    #[test]
    fn a_store_from_before_anomalies_learned_since_its_first_edge() {
        let dir = TempDir::new("anomaly-upgrade");
        let store = open(&dir);
        store
            .merge_edges(
                &mut [edge("a", "orders", Ingress, "/", T0)],
                T0,
                &FlowRetention::default(),
            )
            .unwrap();
        let monitor = Monitor::load(&store, &Anomalies::default(), T0 + 7200).unwrap();
        assert_eq!(store.learning_start().unwrap(), Some(T0));
        assert_eq!(monitor.learning_until(T0 + 7200), 0);
        let now = T0 + 7200;
        report(
            &store,
            &monitor,
            &[edge("a", "orders", Ingress, "/", now)],
            now,
        );
        assert!(kinds(&store).is_empty());
    }

    #[test]
    fn events_are_numbered_listed_after_a_number_and_bounded() {
        let dir = TempDir::new("anomaly-list");
        let store = open(&dir);
        let monitor = Monitor::load(&store, &no_learning(), T0).unwrap();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let now = T0 + i as u64;
            report(
                &store,
                &monitor,
                &[edge(name, "orders", Ingress, "/", now)],
                now,
            );
        }
        let all = store.events(0, 0, 100).unwrap();
        assert_eq!(all.events.len(), 6);
        assert_eq!(all.last, 6);
        // A page cut by its limit ends where a follower continues.
        let page = store.events(2, 0, 3).unwrap();
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!((seqs, page.last), (vec![3, 4, 5], 5));
        let rest = store.events(page.last, 0, 3).unwrap();
        assert_eq!((rest.events.len(), rest.last), (1, 6));
        let none = crate::store::events::EventPage {
            events: Vec::new(),
            last: 6,
        };
        assert_eq!(store.events(6, 0, 3).unwrap(), none);
        // `since` leaves out older events.
        let recent = store.events(0, T0 + 2, 100).unwrap();
        assert_eq!(recent.events.len(), 2);

        // Rows past the bound or the window go, oldest first; numbers are never reused.
        let tight = EventRetention {
            window_secs: 100,
            max_rows: 3,
        };
        let mut spike = edge("d", "orders", Ingress, "/", T0);
        spike.key.verdict = EdgeVerdict::Deny;
        let mut events = Detector::new(0, SpikeRule::default(), None)
            .observe(&[spike], T0 + 10)
            .events;
        let stored = store
            .append_events(events.clone(), T0 + 10, &tight)
            .unwrap();
        assert_eq!(stored[0].seq, 7);
        let left: Vec<u64> = kinds(&store).iter().map(|(s, _)| *s).collect();
        assert_eq!(left, vec![6, 7, 8]);
        for e in &mut events {
            e.at = T0 + 200;
        }
        store.append_events(events, T0 + 200, &tight).unwrap();
        let left: Vec<u64> = kinds(&store).iter().map(|(s, _)| *s).collect();
        assert_eq!(left, vec![9, 10]);
    }

    /// Through the handlers, as tonic calls them with the peer the TLS layer verified: a
    /// proxy's report makes events that only the admin can list, and the metrics count them.
    #[tokio::test]
    async fn reported_denials_are_listed_for_the_admin_and_counted() {
        use bulkhead_api::v1::{self as pb, admin_server::Admin, config_server::Config};
        let dir = TempDir::new("anomaly-handlers");
        let lifetime = Duration::from_secs(3600);
        let (data, cas) = crate::datadir::DataDir::open(dir.path(), "td.test", lifetime).unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let retention = FlowRetention::default();
        let state = crate::service::State::with_options(
            data,
            cas,
            store,
            lifetime,
            retention,
            &no_learning(),
            crate::change::ProxyBounds::default(),
            None,
        )
        .await
        .unwrap();
        let orders = crate::flows::tests::id("orders");
        let orders_wl = crate::flows::tests::workload("orders");
        state.store.bind(&orders, &orders_wl, T0).unwrap();
        let mut denied = edge(
            "intruder",
            "orders",
            Ingress,
            "/",
            crate::proxies::unix_now(),
        );
        denied.key.verdict = EdgeVerdict::Deny;
        denied.stats.count = 25;
        let req = from(
            &orders,
            pb::ReportFlowsRequest {
                namespace: "shop".into(),
                workload: "orders".into(),
                edges_json: serde_json::to_string(&[denied]).unwrap(),
                dropped: 0,
            },
        );
        state.report_flows(req).await.unwrap();

        let list = |who: &str| {
            let req = from(
                who,
                pb::ListEventsRequest {
                    after: 0,
                    since: 0,
                    limit: 0,
                },
            );
            state.list_events(req)
        };
        let err = list(&orders).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let admin = format!("spiffe://td.test{}", bulkhead_api::channel::ADMIN_ID_PATH);
        let r = list(&admin).await.unwrap().into_inner();
        let events: Vec<bulkhead_insight::events::Event> =
            serde_json::from_str(&r.events_json).unwrap();
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::NewIdentity,
                EventKind::NewEdge,
                EventKind::DenialSpike
            ]
        );
        assert!(
            events[2]
                .detail
                .starts_with("25 denied requests to shop/orders in one minute"),
            "{}",
            events[2].detail
        );
        assert_eq!((r.last, r.learning_until), (3, 0));
        let text = state.metrics.encode(&state.flow_counters, &state.fleet());
        assert!(
            text.contains("bulkhead_anomalies_total{kind=\"denial-spike\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bulkhead_flow_edges_stored_total 1"),
            "{text}"
        );
    }
}
