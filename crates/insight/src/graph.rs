//! The service graph: stored edges grouped into one line per caller, destination and port,
//! with the callers named as people reason about them (their workload, where known).
//!
//! `bulkhead graph` prints these lines and the web console draws them; both take them from
//! here, so the two can never disagree about who called whom or how often. Each call is seen
//! by both sidecars; a line keeps the destination's (ingress) view, and the source's
//! (egress) view only where the destination reported nothing for the pair.

use crate::edge::{Edge, EdgeVerdict};
use bulkhead_policy::model::{Direction, Resource, WorkloadRef};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Calls from one party to one workload's port, as one sidecar saw them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphLine {
    /// The caller, as [`caller_name`] names it.
    pub source: String,
    pub destination: String,
    pub port: u16,
    pub protocol: String,
    /// Which sidecar's view this is: `ingress` (the destination's) or `egress`.
    pub decided: String,
    /// Requests that got through (allow, and allow-would-deny).
    pub allowed: u64,
    /// Requests refused (deny, and deny-would-allow).
    pub denied: u64,
    /// Allowed requests that audit-mode policy would deny.
    pub would_deny: u64,
    /// Denied requests that audit-mode policy would allow.
    pub would_allow: u64,
    /// Unix seconds of the first and the last request.
    pub first_seen: u64,
    pub last_seen: u64,
}

impl GraphLine {
    /// Whether `edge` is one of the records this line was made of.
    pub fn includes(&self, edge: &Edge, by_identity: &BTreeMap<String, WorkloadRef>) -> bool {
        let k = &edge.key;
        direction_word(k.direction) == self.decided
            && k.port == self.port
            && k.destination.to_string() == self.destination
            && caller_name(
                k.source_workload.as_ref(),
                k.source_identity.as_deref(),
                by_identity,
            ) == self.source
    }

    /// How the line is drawn: `denied` if any request was refused, else `would-deny` if
    /// audit-mode policy would refuse some, else `allowed`. `bulkhead graph -o dot` colours
    /// by the same rule.
    pub fn class(&self) -> &'static str {
        if self.denied > 0 {
            "denied"
        } else if self.would_deny > 0 {
            "would-deny"
        } else {
            "allowed"
        }
    }
}

fn direction_word(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// The graph's lines, sorted by source, destination, port and view: one per caller,
/// destination and port, from the destination sidecar's view where it reported the pair.
pub fn graph_lines(edges: &[Edge], resources: &[Resource]) -> Vec<GraphLine> {
    let by_identity = identities(resources);
    let mut groups: BTreeMap<(String, String, u16, bool), GraphLine> = BTreeMap::new();
    for e in edges {
        let ingress = e.key.direction == Direction::Ingress;
        let k = (
            caller_name(
                e.key.source_workload.as_ref(),
                e.key.source_identity.as_deref(),
                &by_identity,
            ),
            e.key.destination.to_string(),
            e.key.port,
            ingress,
        );
        let g = groups.entry(k.clone()).or_default();
        if g.source.is_empty() {
            g.first_seen = e.stats.first_seen;
        }
        g.source = k.0;
        g.destination = k.1;
        g.port = k.2;
        g.protocol = e.key.protocol.as_str().to_string();
        g.decided = direction_word(e.key.direction).into();
        let n = e.stats.count;
        match e.key.verdict {
            EdgeVerdict::Allow => g.allowed += n,
            EdgeVerdict::Deny => g.denied += n,
            EdgeVerdict::AllowWouldDeny => {
                g.allowed += n;
                g.would_deny += n;
            }
            EdgeVerdict::DenyWouldAllow => {
                g.denied += n;
                g.would_allow += n;
            }
        }
        g.first_seen = g.first_seen.min(e.stats.first_seen);
        g.last_seen = g.last_seen.max(e.stats.last_seen);
    }
    let has_ingress: BTreeSet<(String, String, u16)> = groups
        .keys()
        .filter(|k| k.3)
        .map(|k| (k.0.clone(), k.1.clone(), k.2))
        .collect();
    groups
        .into_iter()
        .filter(|(k, _)| k.3 || !has_ingress.contains(&(k.0.clone(), k.1.clone(), k.2)))
        .map(|(_, g)| g)
        .collect()
}

/// A caller's workload, or the workload that declares its identity, or the identity, or
/// `(plaintext)` for a caller with neither.
pub fn caller_name(
    workload: Option<&WorkloadRef>,
    identity: Option<&str>,
    by_identity: &BTreeMap<String, WorkloadRef>,
) -> String {
    match (workload, identity) {
        (Some(w), _) => w.to_string(),
        (None, Some(id)) => by_identity
            .get(id)
            .map_or_else(|| id.to_string(), ToString::to_string),
        (None, None) => "(plaintext)".to_string(),
    }
}

/// Each exact identity a Workload declares, and that workload.
pub fn identities(resources: &[Resource]) -> BTreeMap<String, WorkloadRef> {
    resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(doc) => doc
                .spec
                .exact_identity()
                .map(|id| (id.to_string(), r.name())),
            _ => None,
        })
        .collect()
}

/// Each declared workload, and the exact identity it declares: the reverse of
/// [`identities`].
pub fn declared_identities(resources: &[Resource]) -> BTreeMap<WorkloadRef, String> {
    identities(resources)
        .into_iter()
        .map(|(id, w)| (w, id))
        .collect()
}

/// The edges, each caller known only by its SPIFFE ID named by the Workload that declares
/// that identity (sidecars see identities; workloads are what people reason about).
pub fn with_declared_callers(edges: Vec<Edge>, resources: &[Resource]) -> Vec<Edge> {
    let by_identity = identities(resources);
    edges
        .into_iter()
        .map(|mut e| {
            if e.key.source_workload.is_none()
                && let Some(w) = e
                    .key
                    .source_identity
                    .as_ref()
                    .and_then(|id| by_identity.get(id.as_str()))
            {
                e.key.source_workload = Some(w.clone());
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::edge::{EdgeKey, EdgeStats};
    use bulkhead_policy::Protocol;

    const SHOP: &str = r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: frontend, namespace: shop}
spec:
  identity: spiffe://t/ns/shop/sa/frontend
  ports: [{port: 8080, protocol: http}]
"#;

    fn wl(name: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn edge(
        from: Option<&str>,
        identity: Option<&str>,
        verdict: EdgeVerdict,
        direction: Direction,
        count: u64,
        at: u64,
    ) -> Edge {
        Edge {
            key: EdgeKey {
                source_identity: identity.map(|id| id.parse().unwrap()),
                source_workload: from.map(wl),
                destination: wl("orders"),
                port: 8080,
                protocol: Protocol::Http,
                method: Some("GET".into()),
                path: Some("/orders".into()),
                verdict,
                policy: None,
                rule: None,
                direction,
            },
            stats: EdgeStats {
                count,
                first_seen: at,
                last_seen: at + 10,
                ..EdgeStats::default()
            },
        }
    }

    #[test]
    fn lines_keep_the_destinations_view_and_name_callers_by_their_declared_workload() {
        let resources = bulkhead_policy::parse_documents("shop.yaml", SHOP).unwrap();
        let id = Some("spiffe://t/ns/shop/sa/frontend");
        let edges = [
            // The destination saw the caller by identity only; it is the frontend.
            edge(None, id, EdgeVerdict::Allow, Direction::Ingress, 3, 100),
            edge(None, id, EdgeVerdict::Deny, Direction::Ingress, 2, 50),
            edge(
                None,
                id,
                EdgeVerdict::AllowWouldDeny,
                Direction::Ingress,
                1,
                200,
            ),
            // The source's view of the same calls is dropped: the destination reported.
            edge(
                Some("frontend"),
                id,
                EdgeVerdict::Allow,
                Direction::Egress,
                6,
                100,
            ),
            // A caller nobody declares, seen only at its own sidecar.
            edge(
                Some("batch"),
                None,
                EdgeVerdict::Allow,
                Direction::Egress,
                4,
                300,
            ),
        ];
        let lines = graph_lines(&edges, &resources);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let batch = &lines[0];
        assert_eq!(
            (batch.source.as_str(), batch.decided.as_str(), batch.allowed),
            ("shop/batch", "egress", 4)
        );
        let front = &lines[1];
        assert_eq!(front.source, "shop/frontend");
        assert_eq!(front.decided, "ingress");
        assert_eq!(
            (
                front.allowed,
                front.denied,
                front.would_deny,
                front.would_allow
            ),
            (4, 2, 1, 0)
        );
        assert_eq!((front.first_seen, front.last_seen), (50, 210));
        assert_eq!(front.class(), "denied");
        let by_identity = identities(&resources);
        let records: Vec<&Edge> = edges
            .iter()
            .filter(|e| front.includes(e, &by_identity))
            .collect();
        assert_eq!(
            records.len(),
            3,
            "the three ingress records, not the egress one"
        );
    }

    #[test]
    fn classes_put_denials_before_would_denies() {
        let mut g = GraphLine {
            allowed: 5,
            ..GraphLine::default()
        };
        assert_eq!(g.class(), "allowed");
        g.would_deny = 1;
        assert_eq!(g.class(), "would-deny");
        g.denied = 1;
        assert_eq!(g.class(), "denied");
    }

    #[test]
    fn callers_are_named_by_workload_then_declared_identity_then_identity() {
        let resources = bulkhead_policy::parse_documents("shop.yaml", SHOP).unwrap();
        let ids = identities(&resources);
        let frontend = wl("frontend");
        assert_eq!(caller_name(Some(&frontend), None, &ids), "shop/frontend");
        assert_eq!(
            caller_name(None, Some("spiffe://t/ns/shop/sa/frontend"), &ids),
            "shop/frontend"
        );
        assert_eq!(
            caller_name(None, Some("spiffe://t/ns/x/sa/y"), &ids),
            "spiffe://t/ns/x/sa/y"
        );
        assert_eq!(caller_name(None, None, &ids), "(plaintext)");
        assert_eq!(
            declared_identities(&resources)
                .get(&frontend)
                .map(String::as_str),
            Some("spiffe://t/ns/shop/sa/frontend")
        );
    }
}
