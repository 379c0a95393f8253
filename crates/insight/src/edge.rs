//! An edge: every request between the same two parties with the same shape and the same
//! outcome, counted together.
//!
//! A sidecar aggregates the requests it decides into edges and reports them; the control
//! plane stores them. The key says who called what and how it was decided; the stats say how
//! often, how much and when. Merging two reports of one key is [`EdgeStats::merge`]; nothing
//! else about an edge changes after it is made.
//!
//! An edge holds a path *template* (see [`crate::template`]), never a concrete path: ids,
//! tokens and e-mail addresses do not leave the sidecar.

use bulkhead_policy::Protocol;
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_spiffe::SpiffeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Requests of one shape between two parties, with their outcome and how often they came.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    pub key: EdgeKey,
    pub stats: EdgeStats,
}

/// Who called what, how, and what was decided. Edges with equal keys are merged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgeKey {
    /// The caller's verified SPIFFE ID; `None` for plaintext or otherwise unknown callers.
    pub source_identity: Option<SpiffeId>,
    /// The caller's workload, when the reporting sidecar knows it.
    pub source_workload: Option<WorkloadRef>,
    pub destination: WorkloadRef,
    pub port: u16,
    pub protocol: Protocol,
    /// The HTTP method; `None` for TCP, or when the request had none the sidecar could read.
    pub method: Option<String>,
    /// The path template (`/orders/*`), already generalised; `None` for TCP.
    pub path: Option<String>,
    pub verdict: EdgeVerdict,
    /// What decided: a policy (`shop/orders-allow-frontend`) or a posture (`shop/default`,
    /// `*/default`, `built-in`).
    pub policy: Option<String>,
    /// The rule that decided, when a rule did (`frontend-manages-orders`).
    pub rule: Option<String>,
    /// Which sidecar decided: the destination's (ingress) or the source's (egress).
    pub direction: Direction,
}

impl EdgeKey {
    /// The same key without its path: the edge whose path templates are counted together
    /// for the per-edge bound ([`crate::template::DEFAULT_MAX_PATHS_PER_EDGE`]).
    pub fn without_path(&self) -> EdgeKey {
        EdgeKey {
            path: None,
            ..self.clone()
        }
    }
}

/// The verdict the deciding sidecar gave, and what audit-mode policy would have given when
/// that differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeVerdict {
    Allow,
    Deny,
    /// Allowed; audit-mode policy would have denied it.
    AllowWouldDeny,
    /// Denied; audit-mode policy would have allowed it.
    DenyWouldAllow,
}

impl EdgeVerdict {
    /// Whether the requests got through the deciding sidecar.
    pub fn is_allow(self) -> bool {
        matches!(self, EdgeVerdict::Allow | EdgeVerdict::AllowWouldDeny)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EdgeVerdict::Allow => "allow",
            EdgeVerdict::Deny => "deny",
            EdgeVerdict::AllowWouldDeny => "allow-would-deny",
            EdgeVerdict::DenyWouldAllow => "deny-would-allow",
        }
    }
}

impl fmt::Display for EdgeVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often, how much, how slow, and when.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgeStats {
    pub count: u64,
    /// Bytes from the caller to the destination.
    pub bytes_in: u64,
    /// Bytes from the destination back to the caller.
    pub bytes_out: u64,
    pub latency_sum_micros: u64,
    pub latency_max_micros: u64,
    /// Unix seconds of the first and the last request.
    pub first_seen: u64,
    pub last_seen: u64,
}

impl EdgeStats {
    /// One request.
    pub fn one(at: u64, bytes_in: u64, bytes_out: u64, latency_micros: u64) -> EdgeStats {
        EdgeStats {
            count: 1,
            bytes_in,
            bytes_out,
            latency_sum_micros: latency_micros,
            latency_max_micros: latency_micros,
            first_seen: at,
            last_seen: at,
        }
    }

    /// Adds `other`'s requests to these. Sums saturate rather than wrap; empty stats (count
    /// 0) carry no times, so they never move `first_seen` back to 0.
    pub fn merge(&mut self, other: &EdgeStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count = self.count.saturating_add(other.count);
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
        self.latency_sum_micros = self
            .latency_sum_micros
            .saturating_add(other.latency_sum_micros);
        self.latency_max_micros = self.latency_max_micros.max(other.latency_max_micros);
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }
}

/// Merges edges with equal keys; the result is sorted by key.
pub fn merge_edges(edges: impl IntoIterator<Item = Edge>) -> Vec<Edge> {
    let mut merged: BTreeMap<EdgeKey, EdgeStats> = BTreeMap::new();
    for e in edges {
        merged.entry(e.key).or_default().merge(&e.stats);
    }
    merged
        .into_iter()
        .map(|(key, stats)| Edge { key, stats })
        .collect()
}

/// `2024-05-01T10:00:00Z` for a time in unix seconds (UTC, RFC 3339).
pub fn rfc3339(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(verdict: EdgeVerdict) -> EdgeKey {
        EdgeKey {
            source_identity: Some(
                "spiffe://bulkhead.local/ns/shop/sa/frontend"
                    .parse()
                    .unwrap(),
            ),
            source_workload: Some(WorkloadRef {
                namespace: "shop".into(),
                name: "frontend".into(),
            }),
            destination: WorkloadRef {
                namespace: "shop".into(),
                name: "orders".into(),
            },
            port: 8080,
            protocol: Protocol::Http,
            method: Some("GET".into()),
            path: Some("/orders/*".into()),
            verdict,
            policy: Some("shop/orders-allow-frontend".into()),
            rule: Some("frontend-manages-orders".into()),
            direction: Direction::Ingress,
        }
    }

    #[test]
    fn merging_adds_counts_and_widens_the_time_span() {
        let mut a = EdgeStats::one(1_000, 10, 200, 1_500);
        a.merge(&EdgeStats::one(900, 5, 100, 4_000));
        a.merge(&EdgeStats::one(2_000, 1, 1, 10));
        assert_eq!(
            a,
            EdgeStats {
                count: 3,
                bytes_in: 16,
                bytes_out: 301,
                latency_sum_micros: 5_510,
                latency_max_micros: 4_000,
                first_seen: 900,
                last_seen: 2_000,
            }
        );
    }

    #[test]
    fn merging_with_empty_stats_keeps_the_times() {
        let mut empty = EdgeStats::default();
        empty.merge(&EdgeStats::one(1_000, 1, 1, 1));
        assert_eq!(empty.first_seen, 1_000);
        let mut one = EdgeStats::one(1_000, 1, 1, 1);
        one.merge(&EdgeStats::default());
        assert_eq!(one, EdgeStats::one(1_000, 1, 1, 1));
    }

    #[test]
    fn merging_saturates() {
        let mut a = EdgeStats::one(1, u64::MAX, 0, 0);
        a.merge(&EdgeStats::one(2, 1, 0, 0));
        assert_eq!(a.bytes_in, u64::MAX);
    }

    #[test]
    fn merge_edges_merges_equal_keys_only() {
        let edges = vec![
            Edge {
                key: key(EdgeVerdict::Allow),
                stats: EdgeStats::one(10, 0, 0, 0),
            },
            Edge {
                key: key(EdgeVerdict::AllowWouldDeny),
                stats: EdgeStats::one(11, 0, 0, 0),
            },
            Edge {
                key: key(EdgeVerdict::Allow),
                stats: EdgeStats::one(12, 0, 0, 0),
            },
        ];
        let merged = merge_edges(edges);
        let counts: Vec<(EdgeVerdict, u64)> = merged
            .iter()
            .map(|e| (e.key.verdict, e.stats.count))
            .collect();
        assert_eq!(
            counts,
            vec![(EdgeVerdict::Allow, 2), (EdgeVerdict::AllowWouldDeny, 1)]
        );
    }

    #[test]
    fn an_edge_reads_and_writes_as_json() {
        let edge = Edge {
            key: key(EdgeVerdict::AllowWouldDeny),
            stats: EdgeStats::one(1_714_557_600, 120, 2_048, 900),
        };
        let json = serde_json::to_string(&edge).unwrap();
        assert_eq!(
            json,
            r#"{"key":{"sourceIdentity":"spiffe://bulkhead.local/ns/shop/sa/frontend","sourceWorkload":{"namespace":"shop","name":"frontend"},"destination":{"namespace":"shop","name":"orders"},"port":8080,"protocol":"http","method":"GET","path":"/orders/*","verdict":"allow-would-deny","policy":"shop/orders-allow-frontend","rule":"frontend-manages-orders","direction":"ingress"},"stats":{"count":1,"bytesIn":120,"bytesOut":2048,"latencySumMicros":900,"latencyMaxMicros":900,"firstSeen":1714557600,"lastSeen":1714557600}}"#
        );
        let back: Edge = serde_json::from_str(&json).unwrap();
        assert_eq!(back, edge);
        assert!(serde_json::from_str::<Edge>(&json.replace("\"port\"", "\"prt\"")).is_err());
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_714_557_600), "2024-05-01T10:00:00Z");
        assert_eq!(rfc3339(951_868_799), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}
