//! Flow reporting (issue #7): every decision this sidecar makes is counted into an edge —
//! who called what, how, and what was decided — and the edges are sent to the control plane
//! on an interval. The control plane stores them for `bulkhead graph`, `recommend`, `impact`
//! and `promote`.
//!
//! The buffer is bounded and never blocks traffic: a request that cannot be counted (the
//! buffer is full of other edges, or another thread holds it this instant) is dropped from
//! the report and counted as dropped, which the next report carries. Paths leave the sidecar
//! only as templates (`/orders/*`): ids and tokens in paths stay here.

use crate::Shared;
use crate::credentials::control_channel;
use bulkhead_api::v1::ReportFlowsRequest;
use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_insight::{Edge, EdgeKey, EdgeStats, EdgeVerdict};
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_policy::{Decision, PostureSource, Protocol, Reason, Verdict};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Distinct edges held between two reports; more are dropped and counted.
pub(crate) const MAX_EDGES: usize = 10_000;

/// One decided request or TCP connection, as the sidecar saw it.
pub(crate) struct Seen<'a> {
    pub direction: Direction,
    pub source_identity: Option<&'a str>,
    pub source_workload: Option<&'a WorkloadRef>,
    pub destination: &'a WorkloadRef,
    pub port: u16,
    pub protocol: Protocol,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub decision: &'a Decision,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency: Duration,
    /// The HTTP status the caller got (403 for a denial, 502 when the destination did not
    /// answer); `None` for TCP.
    pub status: Option<u16>,
}

pub(crate) struct Flows {
    edges: Mutex<HashMap<EdgeKey, EdgeStats>>,
    /// Dropped since the last report.
    dropped: AtomicU64,
    /// Dropped since the start: `bulkhead_flow_requests_dropped_total`.
    dropped_total: prometheus_client::metrics::counter::Counter,
}

impl Flows {
    pub(crate) fn new(dropped_total: prometheus_client::metrics::counter::Counter) -> Flows {
        Flows {
            edges: Mutex::default(),
            dropped: AtomicU64::new(0),
            dropped_total,
        }
    }

    /// Counts one request into its edge. Never waits.
    pub(crate) fn record(&self, seen: &Seen<'_>) {
        let key = key_of(seen);
        let stats = EdgeStats::one(
            crate::unix_seconds(std::time::SystemTime::now()).max(0) as u64,
            seen.bytes_in,
            seen.bytes_out,
            seen.latency.as_micros().min(u128::from(u64::MAX)) as u64,
        );
        let counted = match self.edges.try_lock() {
            Ok(mut edges) => merge_into(&mut edges, key, &stats),
            Err(_) => false,
        };
        if !counted {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.inc();
        }
    }

    /// Everything counted since the last call, and the drops.
    fn take(&self) -> (Vec<Edge>, u64) {
        let edges = match self.edges.lock() {
            Ok(mut e) => std::mem::take(&mut *e),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        let edges = edges
            .into_iter()
            .map(|(key, stats)| Edge { key, stats })
            .collect();
        (edges, dropped)
    }

    /// Puts back a report that could not be sent, as far as the buffer has room.
    fn restore(&self, edges: Vec<Edge>, dropped: u64) {
        let mut lost = dropped;
        if let Ok(mut held) = self.edges.lock() {
            for e in edges {
                let count = e.stats.count;
                if !merge_into(&mut held, e.key, &e.stats) {
                    lost += count;
                    self.dropped_total.inc_by(count);
                }
            }
        }
        self.dropped.fetch_add(lost, Ordering::Relaxed);
    }

    pub(crate) fn held(&self) -> usize {
        self.edges.lock().map_or(0, |e| e.len())
    }
}

/// Adds `stats` to the edge `key`; false when it is a new edge and the buffer is full.
fn merge_into(edges: &mut HashMap<EdgeKey, EdgeStats>, key: EdgeKey, stats: &EdgeStats) -> bool {
    if let Some(s) = edges.get_mut(&key) {
        s.merge(stats);
        return true;
    }
    if edges.len() >= MAX_EDGES {
        return false;
    }
    edges.insert(key, *stats);
    true
}

fn key_of(seen: &Seen<'_>) -> EdgeKey {
    let d = seen.decision;
    let (verdict, reason) = match d.audit.as_deref() {
        // When audit mode disagrees, the edge names what audit mode would have decided by.
        Some(a) if a.verdict != d.verdict => (
            if d.is_allow() {
                EdgeVerdict::AllowWouldDeny
            } else {
                EdgeVerdict::DenyWouldAllow
            },
            &a.reason,
        ),
        _ => (
            if d.verdict == Verdict::Allow {
                EdgeVerdict::Allow
            } else {
                EdgeVerdict::Deny
            },
            &d.reason,
        ),
    };
    let (policy, rule) = match reason {
        Reason::Rule { policy, rule, .. } => (Some(policy.to_string()), Some(rule.to_string())),
        Reason::Posture { source, .. } => (Some(posture_name(source)), None),
    };
    EdgeKey {
        source_identity: seen.source_identity.map(str::to_string),
        source_workload: seen.source_workload.cloned(),
        destination: seen.destination.clone(),
        port: seen.port,
        protocol: seen.protocol,
        method: seen.method.map(str::to_string),
        path: seen.path.map(bulkhead_insight::template::template),
        verdict,
        policy,
        rule,
        direction: seen.direction,
    }
}

fn posture_name(source: &PostureSource) -> String {
    match source.resource() {
        Some(r) => r.to_string(),
        None => "built-in".to_string(),
    }
}

/// Reports on `interval` for as long as the proxy runs. A failed report is kept for the
/// next one (within the buffer's bound).
pub(crate) fn spawn_reporter(control: SocketAddr, shared: Arc<Shared>, interval: Duration) {
    tokio::spawn(async move {
        let mut client = ConfigClient::new(control_channel(control, &shared));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (edges, dropped) = shared.flows.take();
            if edges.is_empty() && dropped == 0 {
                continue;
            }
            let edges_json = match serde_json::to_string(&edges) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "could not encode the flow report");
                    continue;
                }
            };
            let request = ReportFlowsRequest {
                namespace: shared.workload.namespace.clone(),
                workload: shared.workload.name.clone(),
                edges_json,
                dropped,
            };
            match client.report_flows(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::debug!(stored = r.stored, refused = r.refused, "flows reported");
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), edges = edges.len(), "could not report flows; keeping them for the next report");
                    shared.flows.restore(edges, dropped);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_policy::model::ResourceName;
    use bulkhead_policy::{Http, Peer, PolicySet, Request};

    const POLICY: &str = r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: orders, namespace: shop}
spec:
  identity: spiffe://t.local/ns/shop/sa/orders
  ports: [{port: 8080, protocol: http}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-allow, namespace: shop}
spec:
  selector: {workload: orders}
  action: allow
  rules:
    - name: frontend-reads
      from: {identities: ["spiffe://t.local/ns/shop/sa/frontend"]}
      to: {methods: [GET]}
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-staged, namespace: shop}
spec:
  selector: {workload: orders}
  action: deny
  mode: audit
  rules:
    - name: no-admin
      to: {paths: ["/admin/*"]}
"#;

    fn orders() -> WorkloadRef {
        ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        }
    }

    fn decide(set: &PolicySet, caller: &str, path: &str) -> Decision {
        set.evaluate(&Request {
            direction: Direction::Ingress,
            subject: &orders(),
            peer: Peer {
                identity: Some(caller),
                ip: None,
                workload: None,
            },
            port: 8080,
            protocol: Protocol::Http,
            http: Some(Http {
                method: "GET",
                path,
                host: None,
                headers: &Vec::<(String, String)>::new(),
            }),
        })
    }

    fn record(flows: &Flows, d: &Decision, caller: &str, path: &str) {
        flows.record(&Seen {
            direction: Direction::Ingress,
            source_identity: Some(caller),
            source_workload: None,
            destination: &orders(),
            port: 8080,
            protocol: Protocol::Http,
            method: Some("GET"),
            path: Some(path),
            decision: d,
            bytes_in: 10,
            bytes_out: 20,
            latency: Duration::from_micros(300),
            status: Some(200),
        });
    }

    #[test]
    fn requests_become_edges_with_templates_verdicts_and_drops() {
        let (_, set) = bulkhead_policy::load(&[("p.yaml".into(), POLICY.into())], 1).unwrap();
        let front = "spiffe://t.local/ns/shop/sa/frontend";
        let flows = Flows::new(Default::default());
        for id in ["1", "22", "333"] {
            let path = format!("/orders/{id}");
            record(&flows, &decide(&set, front, &path), front, &path);
        }
        record(&flows, &decide(&set, front, "/admin/x"), front, "/admin/x");
        let other = "spiffe://t.local/ns/shop/sa/payments";
        record(
            &flows,
            &decide(&set, other, "/orders/1"),
            other,
            "/orders/1",
        );

        let (mut edges, dropped) = flows.take();
        edges.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(dropped, 0);
        let shown: Vec<String> = edges
            .iter()
            .map(|e| {
                format!(
                    "{} {} {} {} {}",
                    e.key.path.as_deref().unwrap(),
                    e.key.verdict,
                    e.key.policy.as_deref().unwrap_or("-"),
                    e.key.rule.as_deref().unwrap_or("-"),
                    e.stats.count
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                // Allowed today; the audit policy would deny: the edge names the audit rule.
                "/admin/x allow-would-deny shop/orders-staged no-admin 1",
                // Three concrete paths, one template; allowed by the rule.
                "/orders/* allow shop/orders-allow frontend-reads 3",
                "/orders/* deny built-in - 1",
            ]
        );
        assert_eq!(edges[1].stats.bytes_in, 30);
        assert_eq!(edges[1].stats.latency_max_micros, 300);
        assert!(flows.take().0.is_empty(), "a report empties the buffer");

        // Past the bound, new edges are dropped and counted; known edges still count.
        let flows = Flows::new(Default::default());
        let d = decide(&set, front, "/orders/1");
        for i in 0..MAX_EDGES + 5 {
            record(&flows, &d, front, &format!("/p{i}"));
        }
        record(&flows, &d, front, "/p0");
        let (edges, dropped) = flows.take();
        assert_eq!(edges.len(), MAX_EDGES);
        assert_eq!(dropped, 5);
        assert_eq!(flows.dropped_total.get(), 5);
    }
}
