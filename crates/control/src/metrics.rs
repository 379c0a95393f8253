//! Every metric the control plane exports, defined in one place with its labels, and the
//! optional plain-HTTP listener that serves them (`bulkhead control --metrics ADDR`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `bulkhead_anomalies` | counter | `kind` (new-edge, new-identity, denial-spike): anomaly events stored |
//! | `bulkhead_flow_edges_stored` | counter | — (reported edges merged into the store) |
//! | `bulkhead_flow_edges_refused` | counter | — (reported edges the reporting sidecar did not decide) |
//! | `bulkhead_flow_requests_dropped` | counter | — (requests proxies left out of their reports, as they say) |
//! | `bulkhead_flow_paths_folded` | counter | — (reported edges counted into their edge's `/*` template: the edge held its bound of distinct paths) |
//! | `bulkhead_flow_rows_deleted` | counter | `reason` (expired, workload-bound, mesh-bound): stored edge rows deleted |
//!
//! Counters get the `_total` suffix on the wire, as OpenMetrics says. The listener serves
//! nothing but these numbers, without TLS: bind it to loopback or a port only monitoring can
//! reach. It never touches the store, so a scrape cannot slow a flow report down.

use crate::error::ControlError;
use crate::flows::Counters;
use crate::service::State;
use bulkhead_insight::events::EventKind;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
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
        Metrics {
            anomalies,
            edges_stored: Counter::default(),
            paths_folded: Counter::default(),
            rows_deleted,
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
    pub(crate) fn encode(&self, flows: &Counters) -> String {
        let (dropped, refused) = flows.get();
        let mut registry = Registry::default();
        registry.register(
            "bulkhead_anomalies",
            "Anomaly events stored, by kind (new-edge, new-identity, denial-spike)",
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

/// Binds the metrics listener and says where it is bound; serving starts with [`serve`].
pub(crate) async fn bind(listen: SocketAddr) -> Result<(TcpListener, SocketAddr), ControlError> {
    let bind_err = |source| ControlError::Bind {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    Ok((listener, addr))
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
            format.render(state.metrics.encode(&state.flow_counters)),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the control plane serves /metrics only\n".into(),
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
        let text = metrics.encode(&flows);
        for line in [
            "bulkhead_anomalies_total{kind=\"denial-spike\"} 1",
            "bulkhead_anomalies_total{kind=\"new-edge\"} 0",
            "bulkhead_anomalies_total{kind=\"new-identity\"} 0",
            "bulkhead_flow_edges_stored_total 3",
            "bulkhead_flow_edges_refused_total 2",
            "bulkhead_flow_requests_dropped_total 7",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }
}
