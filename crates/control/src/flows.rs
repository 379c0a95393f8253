//! Traffic edges: what proxies report (`Config.ReportFlows`) and operators read back
//! (`Admin.ListEdges`). The edges themselves live in the store, one row per edge key and hour.
//!
//! A proxy may only report what its own workload decided: ingress edges whose destination is
//! its workload, egress edges whose source is (and, for egress, whose caller identity is its
//! own, when it names one). Everything else is refused and counted, never stored: a proxy must
//! not be able to write another workload's traffic into the graph that recommendations and
//! the observed reach are built from. A report is attacker input: it is bounded and never
//! panics.

use bulkhead_insight::{Edge, EdgeKey};
use bulkhead_policy::model::{Direction, WorkloadRef};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// At most this many edges in one report.
pub const MAX_EDGES_PER_REPORT: usize = 10_000;
/// At most this many bytes of `edges_json` in one report (4 MiB).
pub const MAX_REPORT_JSON_BYTES: usize = 4 * 1024 * 1024;
/// Edges are kept per hour of their `last_seen`.
pub(crate) const BUCKET_SECS: u64 = 3600;
/// How far ahead of the control plane's clock an edge's `last_seen` may be (clock skew);
/// later edges would escape the retention window, so they are not stored.
pub(crate) const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// How long the control plane keeps reported edges, and how many rows at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRetention {
    /// Hour buckets that ended longer ago than this are deleted (on each report).
    pub window: Duration,
    /// The most stored rows (one per edge key and hour); over it, the oldest hours go first.
    pub max_rows: u64,
    /// The most rows one workload's sidecars' reports may keep (the workload that decided:
    /// the destination for ingress, the source for egress); over it, that workload's
    /// oldest hours go first, so one noisy app cannot push the others' history out.
    pub max_rows_per_workload: u64,
    /// The most distinct path templates per edge (its key without the path); past it, new
    /// paths are counted into the edge's `/*` template.
    pub max_paths_per_edge: u64,
}

impl Default for FlowRetention {
    fn default() -> FlowRetention {
        FlowRetention {
            window: Duration::from_secs(7 * 24 * 3600),
            max_rows: 200_000,
            max_rows_per_workload: 20_000,
            max_paths_per_edge: bulkhead_insight::DEFAULT_MAX_PATHS_PER_EDGE,
        }
    }
}

impl FlowRetention {
    /// The oldest hour bucket still kept at `now_unix`.
    pub(crate) fn oldest_bucket(&self, now_unix: u64) -> u64 {
        bucket_of(now_unix.saturating_sub(self.window.as_secs()))
    }
}

/// The start of the hour that `unix` falls in.
pub(crate) fn bucket_of(unix: u64) -> u64 {
    unix / BUCKET_SECS * BUCKET_SECS
}

/// Why a report was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReportError {
    #[error(
        "edges_json is {size} bytes; a report may carry at most {max} bytes: report more often"
    )]
    TooLarge { size: usize, max: usize },
    #[error("edges_json is not a JSON array of edges: {message}")]
    Malformed { message: String },
    #[error("the report holds {count} edges; a report may carry at most {max}")]
    TooManyEdges { count: usize, max: usize },
}

/// Reads a report's edges, within the bounds. An empty string is a report of no edges (a
/// proxy that only reports `dropped`).
pub(crate) fn parse_report(edges_json: &str) -> Result<Vec<Edge>, ReportError> {
    if edges_json.len() > MAX_REPORT_JSON_BYTES {
        return Err(ReportError::TooLarge {
            size: edges_json.len(),
            max: MAX_REPORT_JSON_BYTES,
        });
    }
    if edges_json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let edges: Vec<Edge> =
        serde_json::from_str(edges_json).map_err(|e| ReportError::Malformed {
            message: e.to_string(),
        })?;
    if edges.len() > MAX_EDGES_PER_REPORT {
        return Err(ReportError::TooManyEdges {
            count: edges.len(),
            max: MAX_EDGES_PER_REPORT,
        });
    }
    Ok(edges)
}

/// The proxy that reports: its workload (bound to its identity by a join token) and the
/// verified identity itself.
pub(crate) struct Reporter<'a> {
    pub workload: &'a WorkloadRef,
    pub spiffe_id: &'a str,
}

impl Reporter<'_> {
    /// Whether this reporter's sidecar is the one that decided `key`.
    pub(crate) fn decided(&self, key: &EdgeKey) -> bool {
        self.decides(
            key.direction,
            key.source_identity.as_deref(),
            key.source_workload.as_ref(),
            &key.destination,
        )
    }

    /// Whether this reporter's sidecar decides a request in `direction` from that source to
    /// `destination`: ingress to its workload, or egress from it under its own identity.
    pub(crate) fn decides(
        &self,
        direction: Direction,
        source_identity: Option<&str>,
        source_workload: Option<&WorkloadRef>,
        destination: &WorkloadRef,
    ) -> bool {
        match direction {
            Direction::Ingress => destination == self.workload,
            Direction::Egress => {
                source_workload == Some(self.workload)
                    && source_identity.is_none_or(|id| id == self.spiffe_id)
            }
        }
    }

    /// Splits a report into the edges this reporter decided and how many it did not.
    pub(crate) fn sort(&self, edges: Vec<Edge>) -> (Vec<Edge>, u64) {
        let total = edges.len();
        let kept: Vec<Edge> = edges.into_iter().filter(|e| self.decided(&e.key)).collect();
        let refused = (total - kept.len()) as u64;
        (kept, refused)
    }
}

/// What proxies dropped and what the control plane refused, since it started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    dropped: AtomicU64,
    refused: AtomicU64,
}

impl Counters {
    pub(crate) fn add(&self, dropped: u64, refused: u64) {
        let add = |counter: &AtomicU64, n: u64| {
            // The closure always returns Some, so the update cannot fail.
            let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(n))
            });
        };
        add(&self.dropped, dropped);
        add(&self.refused, refused);
    }

    /// `(dropped, refused)`.
    pub(crate) fn get(&self) -> (u64, u64) {
        (
            self.dropped.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// About how many bytes of `edges_json` one `ListEdges` answer carries.
pub(crate) const LIST_CHUNK_BYTES: usize = 1024 * 1024;

/// Edges as JSON arrays of at most about `max_bytes` each, in order, built one at a time as
/// they are asked for. An edge larger than that alone makes a chunk of its own. There is
/// always at least one chunk, so that no edges is `[]`.
pub(crate) struct JsonChunks {
    edges: std::vec::IntoIter<Edge>,
    /// An edge already encoded that did not fit in the last chunk.
    carried: Option<String>,
    max_bytes: usize,
    started: bool,
}

impl JsonChunks {
    pub(crate) fn new(edges: Vec<Edge>, max_bytes: usize) -> JsonChunks {
        JsonChunks {
            edges: edges.into_iter(),
            carried: None,
            max_bytes,
            started: false,
        }
    }
}

impl Iterator for JsonChunks {
    type Item = Result<String, serde_json::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut chunk = String::from("[");
        let mut first = true;
        loop {
            let json = match self.carried.take() {
                Some(json) => json,
                None => match self.edges.next() {
                    Some(edge) => match serde_json::to_string(&edge) {
                        Ok(json) => json,
                        Err(e) => return Some(Err(e)),
                    },
                    None => break,
                },
            };
            if !first && chunk.len() + 1 + json.len() + 1 > self.max_bytes {
                self.carried = Some(json);
                break;
            }
            if !first {
                chunk.push(',');
            }
            chunk.push_str(&json);
            first = false;
        }
        if first && self.started {
            return None;
        }
        self.started = true;
        chunk.push(']');
        Some(Ok(chunk))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::{Plane, from};
    use bulkhead_api::v1::{self as pb, admin_server::Admin, config_server::Config};
    use bulkhead_identity::SpiffeId;
    use bulkhead_insight::{EdgeStats, EdgeVerdict};
    use bulkhead_policy::Protocol;

    pub(crate) fn workload(name: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    pub(crate) fn id(name: &str) -> SpiffeId {
        format!("spiffe://td.test/ns/shop/sa/{name}")
            .parse()
            .unwrap()
    }

    /// `from` → `to` on `path`, decided by the sidecar of `direction`, one request at `at`.
    pub(crate) fn edge(from: &str, to: &str, direction: Direction, path: &str, at: u64) -> Edge {
        Edge {
            key: EdgeKey {
                source_identity: Some(id(from)),
                source_workload: Some(workload(from)),
                destination: workload(to),
                port: 8080,
                protocol: Protocol::Http,
                method: Some("GET".into()),
                path: Some(path.into()),
                verdict: EdgeVerdict::Allow,
                policy: Some("shop/allow".into()),
                rule: None,
                direction,
            },
            stats: EdgeStats::one(at, 10, 20, 100),
        }
    }

    #[test]
    fn a_reporter_keeps_only_what_its_sidecar_decided() {
        let orders = workload("orders");
        let orders_id = id("orders");
        let reporter = Reporter {
            workload: &orders,
            spiffe_id: &orders_id,
        };
        let ingress_to_me = edge("frontend", "orders", Direction::Ingress, "/a", 1);
        let egress_from_me = edge("orders", "db", Direction::Egress, "/a", 1);
        let mut egress_unnamed = egress_from_me.clone();
        egress_unnamed.key.source_identity = None;
        let ingress_elsewhere = edge("frontend", "cart", Direction::Ingress, "/a", 1);
        let egress_from_other = edge("frontend", "orders", Direction::Egress, "/a", 1);
        let mut egress_spoofed_id = egress_from_me.clone();
        egress_spoofed_id.key.source_identity = Some(id("admin"));
        let (kept, refused) = reporter.sort(vec![
            ingress_to_me.clone(),
            egress_from_me.clone(),
            egress_unnamed.clone(),
            ingress_elsewhere,
            egress_from_other,
            egress_spoofed_id,
        ]);
        assert_eq!(kept, vec![ingress_to_me, egress_from_me, egress_unnamed]);
        assert_eq!(refused, 3);
    }

    #[test]
    fn malformed_and_oversized_reports_are_refused_with_a_reason() {
        let err = parse_report("{\"not\": \"an array\"}").unwrap_err();
        assert!(matches!(err, ReportError::Malformed { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("edges_json is not a JSON array of edges: ")
        );

        let one = serde_json::to_string(&edge("a", "b", Direction::Ingress, "/", 1)).unwrap();
        let unknown_field = format!("[{}]", one.replace("\"port\"", "\"prt\""));
        assert!(matches!(
            parse_report(&unknown_field),
            Err(ReportError::Malformed { .. })
        ));
        assert!(matches!(
            parse_report(&format!("[{one}")),
            Err(ReportError::Malformed { .. })
        ));
        // A caller that is not one SPIFFE ID (a glob, another scheme) never reaches the
        // graph: the report is refused, and says which rule the ID broke.
        for bad in [
            "spiffe://td.test/ns/shop/*",
            "https://td.test/ns/shop/sa/a",
            "",
        ] {
            let report = format!("[{}]", one.replace(id("a").as_str(), bad));
            let err = parse_report(&report).unwrap_err();
            assert!(
                matches!(err, ReportError::Malformed { .. }) && err.to_string().contains(bad),
                "{bad:?}: {err}"
            );
        }

        let too_many = format!(
            "[{}]",
            vec![one.as_str(); MAX_EDGES_PER_REPORT + 1].join(",")
        );
        let err = parse_report(&too_many).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the report holds 10001 edges; a report may carry at most 10000"
        );

        let huge = " ".repeat(MAX_REPORT_JSON_BYTES + 1);
        assert!(matches!(
            parse_report(&huge),
            Err(ReportError::TooLarge { .. })
        ));

        assert_eq!(parse_report("").unwrap(), Vec::new());
        assert_eq!(parse_report(&format!("[{one}]")).unwrap().len(), 1);
    }

    /// Binds `name`'s identity to workload `shop/name`, as a join token would.
    fn joined(plane: &Plane, name: &str) -> String {
        let spiffe_id = id(name);
        plane
            .state
            .store
            .bind(&spiffe_id, &workload(name), crate::proxies::unix_now())
            .unwrap();
        spiffe_id.to_string()
    }

    fn report(name: &str, edges: &[Edge], dropped: u64) -> pb::ReportFlowsRequest {
        pb::ReportFlowsRequest {
            namespace: "shop".into(),
            workload: name.into(),
            edges_json: serde_json::to_string(edges).unwrap(),
            dropped,
        }
    }

    async fn list_edges(plane: &Plane, since: u64) -> (Vec<Edge>, u64, u64) {
        let (edges, counters, _) = list_edge_chunks(plane, since).await;
        (edges, counters.0, counters.1)
    }

    /// The edges, `(dropped, refused)` and how many chunks carried them.
    async fn list_edge_chunks(plane: &Plane, since: u64) -> (Vec<Edge>, (u64, u64), usize) {
        use futures_util::StreamExt;
        let admin = format!("spiffe://td.test{}", bulkhead_api::channel::ADMIN_ID_PATH);
        let mut chunks = plane
            .state
            .list_edges(from(&admin, pb::ListEdgesRequest { since }))
            .await
            .unwrap()
            .into_inner();
        let (mut edges, mut counters, mut count) = (Vec::new(), (0, 0), 0);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.edges_json.len() <= LIST_CHUNK_BYTES);
            edges.extend(serde_json::from_str::<Vec<Edge>>(&chunk.edges_json).unwrap());
            counters = (chunk.dropped, chunk.refused);
            count += 1;
        }
        (edges, counters, count)
    }

    #[tokio::test]
    async fn many_edges_come_back_whole_in_several_chunks() {
        let plane = Plane::new("flows-many");
        let orders = joined(&plane, "orders");
        let now = crate::proxies::unix_now();
        let sent: Vec<Edge> = (0..6_000)
            .map(|i| {
                // Each on a port of its own: one path per edge, within the per-edge bound.
                let path = format!("/orders/{i:05}/a-path-long-enough-to-fill-chunks-sooner");
                let mut e = edge("frontend", "orders", Direction::Ingress, &path, now);
                e.key.port = 10_000 + i;
                e
            })
            .collect();
        let r = plane
            .state
            .report_flows(from(&orders, report("orders", &sent, 0)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.stored, r.refused), (6_000, 0));
        let (edges, _, chunks) = list_edge_chunks(&plane, 0).await;
        assert!(chunks >= 2, "{chunks} chunk(s)");
        assert_eq!(edges, sent);
    }

    #[test]
    fn edges_are_listed_in_chunks_that_keep_their_bound_and_order() {
        let edges: Vec<Edge> = (0..50)
            .map(|i| {
                edge(
                    "frontend",
                    "orders",
                    Direction::Ingress,
                    &format!("/{i}"),
                    1,
                )
            })
            .collect();
        let one = serde_json::to_string(&edges[0]).unwrap().len();
        let max = 3 * one + 10;
        let chunks: Vec<String> = JsonChunks::new(edges.clone(), max)
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(chunks.len() >= 50 / 3, "{} chunks", chunks.len());
        let mut back = Vec::new();
        for chunk in &chunks {
            assert!(chunk.len() <= max, "a chunk of {} bytes", chunk.len());
            let part: Vec<Edge> = serde_json::from_str(chunk).unwrap();
            assert!(!part.is_empty());
            back.extend(part);
        }
        assert_eq!(back, edges);

        // An edge over the bound goes alone; no edges is one empty array.
        let alone: Vec<String> = JsonChunks::new(edges[..2].to_vec(), 1)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(alone.len(), 2);
        let none: Vec<String> = JsonChunks::new(Vec::new(), max)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(none, vec!["[]".to_string()]);
    }

    #[tokio::test]
    async fn a_proxy_cannot_report_another_workloads_traffic() {
        let plane = Plane::new("flows-refused");
        let frontend = joined(&plane, "frontend");
        let now = crate::proxies::unix_now();
        // The frontend's sidecar claims to have decided a request that reached orders.
        let forged = edge("frontend", "orders", Direction::Ingress, "/a", now);
        let r = plane
            .state
            .report_flows(from(&frontend, report("frontend", &[forged], 0)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.stored, r.refused), (0, 1));

        // What it did decide is kept; the forged edge never is.
        let own = edge("frontend", "orders", Direction::Egress, "/a", now);
        let r = plane
            .state
            .report_flows(from(
                &frontend,
                report("frontend", std::slice::from_ref(&own), 7),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.stored, r.refused), (1, 0));
        let (edges, dropped, refused) = list_edges(&plane, 0).await;
        assert_eq!(edges, vec![own]);
        assert_eq!((dropped, refused), (7, 1));
    }

    #[tokio::test]
    async fn a_proxy_reports_only_as_its_own_workload_and_cannot_read_edges() {
        let plane = Plane::new("flows-bound");
        let frontend = joined(&plane, "frontend");
        joined(&plane, "orders");
        let now = crate::proxies::unix_now();
        let theirs = edge("frontend", "orders", Direction::Ingress, "/a", now);
        let err = plane
            .state
            .report_flows(from(&frontend, report("orders", &[theirs], 0)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

        let Err(err) = plane
            .state
            .list_edges(from(&frontend, pb::ListEdgesRequest { since: 0 }))
            .await
        else {
            panic!("a proxy read the edges");
        };
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert_eq!(list_edges(&plane, 0).await, (Vec::new(), 0, 0));
    }

    #[tokio::test]
    async fn a_malformed_report_is_an_invalid_argument_that_says_why() {
        let plane = Plane::new("flows-malformed");
        let orders = joined(&plane, "orders");
        let mut req = report("orders", &[], 3);
        req.edges_json = r#"[{"key": 1}]"#.into();
        let err = plane
            .state
            .report_flows(from(&orders, req))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .starts_with("edges_json is not a JSON array of edges: invalid type: integer"),
            "{}",
            err.message()
        );
        // Nothing of a refused report counts, not even its `dropped`.
        assert_eq!(list_edges(&plane, 0).await, (Vec::new(), 0, 0));
    }

    #[test]
    fn counters_add_up_and_saturate() {
        let c = Counters::default();
        c.add(3, 1);
        c.add(u64::MAX, 2);
        assert_eq!(c.get(), (u64::MAX, 3));
    }
}
