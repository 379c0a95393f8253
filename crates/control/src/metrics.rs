//! Every metric the control plane exports, defined in one place with its labels, and the
//! optional plain-HTTP listener that serves them (`bulkhead control --metrics ADDR`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `bulkhead_anomalies` | counter | `kind` (new-edge, new-identity, denial-spike, federation-refresh-failed): events stored |
//! | `bulkhead_flow_edges_stored` | counter | — (reported edges merged into the store) |
//! | `bulkhead_flow_edges_refused` | counter | — (reported edges the reporting sidecar did not decide) |
//! | `bulkhead_flow_requests_dropped` | counter | — (requests proxies left out of their reports, as they say) |
//! | `bulkhead_flow_paths_folded` | counter | — (reported edges counted into their edge's `/*` template: the edge held its bound of distinct paths) |
//! | `bulkhead_flow_rows_deleted` | counter | `reason` (expired, workload-bound, mesh-bound): stored edge rows deleted |
//! | `bulkhead_proxies_connected` | gauge | — (configuration streams open: one per proxy process) |
//! | `bulkhead_proxies_disconnected` | gauge | — (identity and workload pairs seen since start with no stream open and a certificate still valid: they should be back) |
//! | `bulkhead_proxies_behind` | gauge | — (connected identity and workload pairs that have not acknowledged the newest revision) |
//! | `bulkhead_proxies_nacking` | gauge | — (connected identity and workload pairs whose last answer refused a revision) |
//! | `bulkhead_policy_revision` | gauge | — (the newest committed revision; the proxies' gauge of the same name is the one in force there) |
//! | `bulkhead_svids_issued` | counter | `how` (join, renew) |
//! | `bulkhead_ca_expiry_seconds` | gauge | — (seconds until the signing CA's certificate expires) |
//! | `bulkhead_federation_refresh_failures` | counter | `trust_domain` (each federated trust domain of `--federation`): failed refreshes of its bundle |
//! | `bulkhead_federation_last_refresh_timestamp_seconds` | gauge | `trust_domain`: when its bundle was last fetched and checked |
//! | `bulkhead_push_duration_seconds` | histogram | `result` (ack, nack): from a revision's commit to a connected proxy's answer |
//!
//! Counters get the `_total` suffix on the wire, as OpenMetrics says; `bulkhead_build_info`
//! and the `process_*` families come from `bulkhead_api::process`. No label takes a value a
//! peer chooses, so the series are a fixed set. The listener serves these numbers, `/live`
//! (the process answers) and `/ready` (the store answers a read and a CA signs), without
//! TLS: bind it to loopback or a port only monitoring can reach. A scrape reads no table
//! of the store (the readiness check opens a read transaction, which never waits for a
//! writer), so it cannot slow a flow report down.

use crate::flows::Counters;
use crate::service::State;
use bulkhead_insight::events::EventKind;
use bulkhead_policy::model::ResourceName;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabels {
    how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The fleet as the proxy registry and the CA set show it at a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Fleet {
    pub connected: i64,
    pub disconnected: i64,
    pub behind: i64,
    pub nacking: i64,
    pub revision: i64,
    /// Seconds until the signing CA expires (negative once it has).
    pub ca_expiry_seconds: f64,
}

/// A revision pushed to a proxy and not yet answered: which, and when it was committed.
type PendingPushes = HashMap<(String, ResourceName), (u64, Instant)>;

/// One open configuration stream in `bulkhead_proxies_connected`, until dropped.
pub(crate) struct OpenStream(Arc<AtomicI64>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why stored edge rows are deleted.
const ROW_DELETIONS: [&str; 3] = ["expired", "workload-bound", "mesh-bound"];

/// The counters kept here; the flow counters that `ListEdges` also reports live in
/// [`Counters`] and are read from there on each scrape.
#[derive(Debug)]
pub(crate) struct Metrics {
    anomalies: Family<KindLabels, Counter>,
    edges_stored: Counter,
    paths_folded: Counter,
    rows_deleted: Family<ReasonLabels, Counter>,
    svids_issued: Family<HowLabels, Counter>,
    federation_failures: Family<DomainLabels, Counter>,
    federation_refreshed: Family<DomainLabels, Gauge>,
    push_duration: Family<ResultLabels, Histogram>,
    pending_pushes: Mutex<PendingPushes>,
    /// Configuration streams open now (one per connected proxy process).
    streams: Arc<AtomicI64>,
    /// Spans the exporter sent and dropped (`--otlp-endpoint`).
    pub(crate) traces: std::sync::Arc<bulkhead_api::otlp::ExportCounts>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let anomalies = Family::<KindLabels, Counter>::default();
        // Every kind from the start, at 0: a rate over a missing series is no rate at all.
        for kind in EventKind::ALL {
            let _ = anomalies.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        let rows_deleted = Family::<ReasonLabels, Counter>::default();
        for reason in ROW_DELETIONS {
            let _ = rows_deleted.get_or_create(&ReasonLabels { reason });
        }
        let svids_issued = Family::<HowLabels, Counter>::default();
        for how in ["join", "renew"] {
            let _ = svids_issued.get_or_create(&HowLabels { how });
        }
        let push_duration = Family::<ResultLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        for result in ["ack", "nack"] {
            let _ = push_duration.get_or_create(&ResultLabels { result });
        }
        Metrics {
            anomalies,
            edges_stored: Counter::default(),
            paths_folded: Counter::default(),
            rows_deleted,
            svids_issued,
            federation_failures: Family::default(),
            federation_refreshed: Family::default(),
            push_duration,
            pending_pushes: Mutex::default(),
            streams: Arc::default(),
            traces: Default::default(),
        }
    }
}

impl Metrics {
    pub(crate) fn anomaly(&self, kind: EventKind) {
        self.anomalies
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// A proxy's configuration stream opened: counted connected until the guard drops.
    /// A federated trust domain's bundle refreshed (fetched and checked) now.
    pub(crate) fn federation_refreshed(&self, trust_domain: &str) {
        let labels = DomainLabels {
            trust_domain: trust_domain.to_string(),
        };
        let _ = self.federation_failures.get_or_create(&labels);
        self.federation_refreshed
            .get_or_create(&labels)
            .set(i64::try_from(crate::proxies::unix_now()).unwrap_or(i64::MAX));
    }

    /// A federated trust domain's bundle could not be refreshed.
    pub(crate) fn federation_failed(&self, trust_domain: &str) {
        self.federation_failures
            .get_or_create(&DomainLabels {
                trust_domain: trust_domain.to_string(),
            })
            .inc();
    }

    pub(crate) fn stream_opened(&self) -> OpenStream {
        self.streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.streams.clone())
    }

    /// Configuration streams open now.
    pub(crate) fn streams(&self) -> i64 {
        self.streams.load(Ordering::Relaxed)
    }

    /// A certificate issued by a join (`join`) or a renewal (`renew`).
    pub(crate) fn svid_issued(&self, how: &'static str) {
        self.svids_issued.get_or_create(&HowLabels { how }).inc();
    }

    /// A connected proxy's stream took `revision`, committed at `committed`: its answer
    /// ends the push's time. A newer revision replaces an unanswered older one; at most one
    /// is held per proxy ever seen, so the map is bounded by the fleet.
    pub(crate) fn pushed(
        &self,
        proxy: &str,
        workload: &ResourceName,
        revision: u64,
        committed: Instant,
    ) {
        let mut open = self
            .pending_pushes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.insert((proxy.to_string(), workload.clone()), (revision, committed));
    }

    /// A proxy answered `revision` (refused it when `nack`).
    pub(crate) fn answered(&self, proxy: &str, workload: &ResourceName, revision: u64, nack: bool) {
        let key = (proxy.to_string(), workload.clone());
        let committed = {
            let mut open = self
                .pending_pushes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match open.get(&key) {
                Some((r, _)) if *r == revision => open.remove(&key).map(|(_, at)| at),
                _ => None,
            }
        };
        if let Some(at) = committed {
            let result = if nack { "nack" } else { "ack" };
            self.push_duration
                .get_or_create(&ResultLabels { result })
                .observe(at.elapsed().as_secs_f64());
        }
    }

    /// Edges of one report merged into the store (at most a report's bound, so no wrap).
    pub(crate) fn edges_stored(&self, n: u64) {
        self.edges_stored.inc_by(n);
    }

    /// What the bounds did to one report: paths folded, rows deleted and why.
    pub(crate) fn edges_bounded(&self, written: &crate::store::EdgesWritten) {
        self.paths_folded.inc_by(written.folded);
        for (reason, n) in ROW_DELETIONS.into_iter().zip([
            written.expired,
            written.evicted_in_workload,
            written.evicted,
        ]) {
            if n > 0 {
                self.rows_deleted
                    .get_or_create(&ReasonLabels { reason })
                    .inc_by(n);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn encode(&self, flows: &Counters, fleet: &Fleet) -> String {
        let (dropped, refused) = flows.get();
        let mut registry = Registry::default();
        let gauge = |v: i64| ConstGauge::new(v);
        registry.register(
            "bulkhead_proxies_connected",
            "Proxies with a configuration stream open",
            gauge(fleet.connected),
        );
        registry.register(
            "bulkhead_proxies_disconnected",
            "Proxies seen since the control plane started whose stream is closed while their certificate is still valid",
            gauge(fleet.disconnected),
        );
        registry.register(
            "bulkhead_proxies_behind",
            "Connected proxies that have not acknowledged the newest revision",
            gauge(fleet.behind),
        );
        registry.register(
            "bulkhead_proxies_nacking",
            "Connected proxies whose last answer refused a revision (they keep their last good one)",
            gauge(fleet.nacking),
        );
        registry.register(
            "bulkhead_policy_revision",
            "The newest committed revision",
            gauge(fleet.revision),
        );
        registry.register(
            "bulkhead_ca_expiry_seconds",
            "Seconds until the signing CA's certificate expires",
            ConstGauge::new(fleet.ca_expiry_seconds),
        );
        registry.register(
            "bulkhead_svids_issued",
            "Workload certificates issued, by how (join, renew)",
            self.svids_issued.clone(),
        );
        registry.register(
            "bulkhead_federation_refresh_failures",
            "Failed refreshes of a federated trust domain's bundle, by trust domain (its last good bundle stays in force)",
            self.federation_failures.clone(),
        );
        registry.register(
            "bulkhead_federation_last_refresh_timestamp_seconds",
            "When a federated trust domain's bundle was last fetched and checked, Unix seconds",
            self.federation_refreshed.clone(),
        );
        registry.register(
            "bulkhead_push_duration_seconds",
            "From a revision's commit to a connected proxy's answer (ack or nack)",
            self.push_duration.clone(),
        );
        registry.register(
            "bulkhead_anomalies",
            "Events stored, by kind (new-edge, new-identity, denial-spike, federation-refresh-failed)",
            self.anomalies.clone(),
        );
        registry.register(
            "bulkhead_flow_edges_stored",
            "Reported traffic edges merged into the store",
            self.edges_stored.clone(),
        );
        registry.register(
            "bulkhead_flow_paths_folded",
            "Reported edges counted into their edge's /* template because the edge held its bound of distinct paths",
            self.paths_folded.clone(),
        );
        registry.register(
            "bulkhead_flow_rows_deleted",
            "Stored edge rows deleted, by reason (expired, workload-bound, mesh-bound)",
            self.rows_deleted.clone(),
        );
        registry.register(
            "bulkhead_flow_edges_refused",
            "Reported traffic edges refused because the reporting sidecar did not decide them",
            ConstCounter::new(refused),
        );
        registry.register(
            "bulkhead_flow_requests_dropped",
            "Requests proxies left out of their flow reports because their buffer was full",
            ConstCounter::new(dropped),
        );
        let spans = |c: &std::sync::atomic::AtomicU64| {
            ConstCounter::new(c.load(std::sync::atomic::Ordering::Relaxed))
        };
        registry.register(
            "bulkhead_trace_spans_exported",
            "Spans the trace collector accepted",
            spans(&self.traces.exported),
        );
        registry.register(
            "bulkhead_trace_spans_dropped",
            "Spans dropped: the queue was full, or the collector refused them or did not answer in time",
            spans(&self.traces.dropped),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl State {
    /// The fleet, the newest revision and the signing CA's time left, for a scrape.
    pub(crate) fn fleet(&self) -> crate::metrics::Fleet {
        let revision = self.snapshot.borrow().revision;
        let mut fleet = self.proxies.counts(revision, crate::proxies::unix_now());
        // Counted per stream: replicas sharing an identity are each a proxy.
        fleet.connected = self.metrics.streams();
        fleet.revision = i64::try_from(revision).unwrap_or(i64::MAX);
        let not_after = bulkhead_identity::not_after_of(self.signer().cert_der());
        fleet.ca_expiry_seconds = not_after.map_or(0.0, |t| {
            match t.duration_since(std::time::SystemTime::now()) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            }
        });
        fleet
    }

    /// Why the control plane is not ready to serve, if it is not: the store must answer a
    /// read, and the signing CA must be valid.
    pub(crate) fn not_ready(&self) -> Option<String> {
        if let Err(e) = self.store.answers() {
            return Some(format!("the store does not answer: {e}"));
        }
        let signer = self.signer();
        match bulkhead_identity::not_after_of(signer.cert_der()) {
            Some(t) if t > std::time::SystemTime::now() => None,
            Some(_) => Some(format!(
                "the signing CA {} has expired",
                signer.fingerprint()
            )),
            None => Some("the signing CA's certificate cannot be read".into()),
        }
    }
}

/// Serves `/metrics` on `listener` until `stop` turns true.
pub(crate) fn serve(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener: accept failed");
                        continue;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(req, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let format = bulkhead_api::exposition::Format::negotiate(
        req.headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            format.content_type(),
            format.render(bulkhead_api::process::with_process_families(
                state.metrics.encode(&state.flow_counters, &state.fleet()),
                "control",
            )),
        ),
        "/live" => (StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match state.not_ready() {
            None => (StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /ready or /live\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_its_labels() {
        let metrics = Metrics::default();
        let flows = Counters::default();
        flows.add(7, 2);
        metrics.edges_stored(3);
        metrics.anomaly(EventKind::DenialSpike);
        metrics.svid_issued("join");
        let orders = ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        metrics.pushed("spiffe://td/ns/shop/sa/orders", &orders, 4, Instant::now());
        metrics.answered("spiffe://td/ns/shop/sa/orders", &orders, 3, false);
        metrics.answered("spiffe://td/ns/shop/sa/orders", &orders, 4, false);
        metrics.answered("spiffe://td/ns/shop/sa/orders", &orders, 4, false);
        let fleet = Fleet {
            connected: 3,
            behind: 1,
            revision: 4,
            ca_expiry_seconds: 86400.0,
            ..Fleet::default()
        };
        let text = metrics.encode(&flows, &fleet);
        for line in [
            "bulkhead_anomalies_total{kind=\"denial-spike\"} 1",
            "bulkhead_anomalies_total{kind=\"new-edge\"} 0",
            "bulkhead_anomalies_total{kind=\"new-identity\"} 0",
            "bulkhead_flow_edges_stored_total 3",
            "bulkhead_flow_edges_refused_total 2",
            "bulkhead_flow_requests_dropped_total 7",
            "bulkhead_proxies_connected 3",
            "bulkhead_proxies_behind 1",
            "bulkhead_proxies_disconnected 0",
            "bulkhead_policy_revision 4",
            "bulkhead_ca_expiry_seconds 86400.0",
            "bulkhead_svids_issued_total{how=\"join\"} 1",
            "bulkhead_svids_issued_total{how=\"renew\"} 0",
            // One answer of revision 4 timed; the stale and the repeated answers are not.
            "bulkhead_push_duration_seconds_count{result=\"ack\"} 1",
            "bulkhead_push_duration_seconds_count{result=\"nack\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }
}
