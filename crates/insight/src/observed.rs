//! The observed blast radius: which workloads a workload actually reached, directly or
//! through others, and who actually reached a workload, from the edges that got through.
//!
//! This is what happened, not what policy would allow: a hop exists only if requests along
//! it were allowed (`allow` or `allow-would-deny`) within the window. A call counts as
//! arrived when the destination's sidecar allowed it on ingress; an egress allow counts only
//! for a caller and destination with no ingress edge at all (a destination without a
//! sidecar), since an ingress edge says better whether it arrived.

use crate::edge::{Edge, EdgeStats};
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_spiffe::SpiffeId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// A party to a call: a workload, or, for callers whose workload is unknown, their identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Party {
    Workload(WorkloadRef),
    /// A caller known only by its SPIFFE ID.
    Identity(SpiffeId),
    /// A caller with neither workload nor identity (plaintext).
    Unknown,
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Party::Workload(w) => write!(f, "{w}"),
            Party::Identity(id) => f.write_str(id),
            Party::Unknown => f.write_str("(no identity)"),
        }
    }
}

/// A party reached (or reaching) in `hops` calls, along `path` (start to end, both included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    pub party: Party,
    pub hops: usize,
    pub path: Vec<Party>,
}

/// Unix seconds, both ends included. An edge is in the window if any of its requests may
/// have been: its `[first_seen, last_seen]` overlaps the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub since: u64,
    pub until: u64,
}

impl Window {
    pub const ALL: Window = Window {
        since: 0,
        until: u64::MAX,
    };

    pub fn overlaps(&self, stats: &EdgeStats) -> bool {
        stats.count > 0 && stats.last_seen >= self.since && stats.first_seen <= self.until
    }
}

/// Every workload `start` reached through calls that got through, nearest first, each with
/// the hops and one shortest path (the first in sorted order).
pub fn observed_reach(edges: &[Edge], start: &WorkloadRef, window: Window) -> Vec<Reach> {
    let mut next: BTreeMap<Party, BTreeSet<Party>> = BTreeMap::new();
    for (caller, dest) in links(edges, window) {
        next.entry(caller)
            .or_default()
            .insert(Party::Workload(dest));
    }
    let mut found = bfs(&next, Party::Workload(start.clone()));
    found.sort_by(|a, b| (a.hops, &a.party).cmp(&(b.hops, &b.party)));
    found
}

/// Every party that reached `target`, directly (1 hop) or through workloads that called it,
/// nearest first; each path runs from the party to `target`.
pub fn who_reached(edges: &[Edge], target: &WorkloadRef, window: Window) -> Vec<Reach> {
    let mut prev: BTreeMap<Party, BTreeSet<Party>> = BTreeMap::new();
    for (caller, dest) in links(edges, window) {
        prev.entry(Party::Workload(dest))
            .or_default()
            .insert(caller);
    }
    let mut found = bfs(&prev, Party::Workload(target.clone()));
    for r in &mut found {
        r.path.reverse();
    }
    found.sort_by(|a, b| (a.hops, &a.party).cmp(&(b.hops, &b.party)));
    found
}

/// Breadth first from `start`, neighbours in sorted order; `start` itself is not listed.
fn bfs(graph: &BTreeMap<Party, BTreeSet<Party>>, start: Party) -> Vec<Reach> {
    let mut parent: BTreeMap<Party, Option<Party>> = BTreeMap::new();
    parent.insert(start.clone(), None);
    let mut queue = VecDeque::from([(start.clone(), 0usize)]);
    let mut out = Vec::new();
    while let Some((node, hops)) = queue.pop_front() {
        for n in graph.get(&node).into_iter().flatten() {
            if parent.contains_key(n) {
                continue;
            }
            parent.insert(n.clone(), Some(node.clone()));
            let mut path = vec![n.clone()];
            let mut at = node.clone();
            loop {
                path.push(at.clone());
                match parent.get(&at) {
                    Some(Some(p)) => at = p.clone(),
                    _ => break,
                }
            }
            path.reverse();
            out.push(Reach {
                party: n.clone(),
                hops: hops + 1,
                path,
            });
            queue.push_back((n.clone(), hops + 1));
        }
    }
    out
}

/// The (caller, destination) pairs with calls that arrived in the window.
fn links(edges: &[Edge], window: Window) -> BTreeSet<(Party, WorkloadRef)> {
    let edges: Vec<&Edge> = edges.iter().filter(|e| window.overlaps(&e.stats)).collect();
    // A caller known only by its identity is the workload other edges pair that identity
    // with, when there is exactly one.
    let mut workloads_of: BTreeMap<&str, BTreeSet<&WorkloadRef>> = BTreeMap::new();
    for e in &edges {
        if let (Some(id), Some(w)) = (&e.key.source_identity, &e.key.source_workload) {
            workloads_of.entry(id).or_default().insert(w);
        }
    }
    let caller = |e: &Edge| match (&e.key.source_workload, &e.key.source_identity) {
        (Some(w), _) => Party::Workload(w.clone()),
        (None, Some(id)) => match workloads_of.get(id.as_str()) {
            Some(ws) if ws.len() == 1 => ws
                .first()
                .map(|w| Party::Workload((*w).clone()))
                .unwrap_or_else(|| Party::Identity(id.clone())),
            _ => Party::Identity(id.clone()),
        },
        (None, None) => Party::Unknown,
    };
    let mut ingress_seen = BTreeSet::new();
    let mut out = BTreeSet::new();
    for e in edges
        .iter()
        .filter(|e| e.key.direction == Direction::Ingress)
    {
        let pair = (caller(e), e.key.destination.clone());
        if e.key.verdict.is_allow() {
            out.insert(pair.clone());
        }
        ingress_seen.insert(pair);
    }
    for e in edges
        .iter()
        .filter(|e| e.key.direction == Direction::Egress)
    {
        let pair = (caller(e), e.key.destination.clone());
        if e.key.verdict.is_allow() && !ingress_seen.contains(&pair) {
            out.insert(pair);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::{EdgeKey, EdgeStats, EdgeVerdict};
    use bulkhead_policy::Protocol;

    fn w(s: &str) -> WorkloadRef {
        let (namespace, name) = s.split_once('/').unwrap();
        WorkloadRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn edge(from: &str, to: &str, verdict: EdgeVerdict, direction: Direction, at: u64) -> Edge {
        let src = w(from);
        Edge {
            key: EdgeKey {
                source_identity: Some(
                    format!(
                        "spiffe://bulkhead.local/ns/{}/sa/{}",
                        src.namespace, src.name
                    )
                    .parse()
                    .unwrap(),
                ),
                source_workload: Some(src),
                destination: w(to),
                port: 8080,
                protocol: Protocol::Http,
                method: Some("GET".into()),
                path: Some("/".into()),
                verdict,
                policy: None,
                rule: None,
                direction,
            },
            stats: EdgeStats::one(at, 0, 0, 0),
        }
    }

    fn ingress(from: &str, to: &str, verdict: EdgeVerdict) -> Edge {
        edge(from, to, verdict, Direction::Ingress, 100)
    }

    /// `party hops a > b > c` per line.
    fn show(reach: &[Reach]) -> Vec<String> {
        reach
            .iter()
            .map(|r| {
                let path: Vec<String> = r.path.iter().map(|p| p.to_string()).collect();
                format!("{} {} {}", r.party, r.hops, path.join(" > "))
            })
            .collect()
    }

    fn shop() -> Vec<Edge> {
        use EdgeVerdict::*;
        vec![
            ingress("edge/gateway", "shop/frontend", Allow),
            ingress("shop/frontend", "shop/orders", Allow),
            ingress("shop/frontend", "shop/cart", AllowWouldDeny),
            ingress("shop/orders", "shop/payments", Allow),
            ingress("shop/cart", "shop/payments", Allow),
            ingress("shop/payments", "bank/psp", Deny),
            ingress("shop/orders", "shop/frontend", Allow),
        ]
    }

    #[test]
    fn reach_follows_calls_that_got_through_nearest_first() {
        assert_eq!(
            show(&observed_reach(&shop(), &w("edge/gateway"), Window::ALL)),
            vec![
                "shop/frontend 1 edge/gateway > shop/frontend",
                "shop/cart 2 edge/gateway > shop/frontend > shop/cart",
                "shop/orders 2 edge/gateway > shop/frontend > shop/orders",
                "shop/payments 3 edge/gateway > shop/frontend > shop/cart > shop/payments",
            ]
        );
    }

    #[test]
    fn denied_calls_are_no_hop() {
        let reach = observed_reach(&shop(), &w("shop/payments"), Window::ALL);
        assert!(reach.is_empty(), "{:?}", show(&reach));
    }

    #[test]
    fn who_reached_walks_back_to_every_caller() {
        assert_eq!(
            show(&who_reached(&shop(), &w("shop/payments"), Window::ALL)),
            vec![
                "shop/cart 1 shop/cart > shop/payments",
                "shop/orders 1 shop/orders > shop/payments",
                "shop/frontend 2 shop/frontend > shop/cart > shop/payments",
                "edge/gateway 3 edge/gateway > shop/frontend > shop/cart > shop/payments",
            ]
        );
    }

    #[test]
    fn the_window_keeps_only_edges_seen_in_it() {
        let edges = vec![
            edge("a/x", "a/y", EdgeVerdict::Allow, Direction::Ingress, 100),
            edge("a/y", "a/z", EdgeVerdict::Allow, Direction::Ingress, 500),
        ];
        let window = Window {
            since: 0,
            until: 200,
        };
        assert_eq!(
            show(&observed_reach(&edges, &w("a/x"), window)),
            vec!["a/y 1 a/x > a/y"]
        );
    }

    #[test]
    fn an_egress_allow_counts_only_where_no_ingress_edge_says_otherwise() {
        let edges = vec![
            // Left, but the destination's sidecar refused it.
            edge("a/x", "a/y", EdgeVerdict::Allow, Direction::Egress, 100),
            edge("a/x", "a/y", EdgeVerdict::Deny, Direction::Ingress, 100),
            // A destination without a sidecar: only the egress side reports.
            edge("a/x", "ext/db", EdgeVerdict::Allow, Direction::Egress, 100),
        ];
        assert_eq!(
            show(&observed_reach(&edges, &w("a/x"), Window::ALL)),
            vec!["ext/db 1 a/x > ext/db"]
        );
    }

    #[test]
    fn callers_without_a_workload_are_named_by_identity_or_as_unknown() {
        let mut by_id = ingress("a/x", "a/target", EdgeVerdict::Allow);
        by_id.key.source_workload = None;
        by_id.key.source_identity = Some("spiffe://partner.example/api".parse().unwrap());
        let mut plain = ingress("a/x", "a/target", EdgeVerdict::Allow);
        plain.key.source_workload = None;
        plain.key.source_identity = None;
        // Known only by identity here, but another edge pairs the identity with a/y.
        let mut inferred = ingress("a/y", "a/target", EdgeVerdict::Allow);
        inferred.key.source_workload = None;
        let edges = vec![
            by_id,
            plain,
            inferred,
            ingress("a/y", "a/other", EdgeVerdict::Allow),
        ];
        assert_eq!(
            show(&who_reached(&edges, &w("a/target"), Window::ALL)),
            vec![
                "a/y 1 a/y > a/target",
                "spiffe://partner.example/api 1 spiffe://partner.example/api > a/target",
                "(no identity) 1 (no identity) > a/target",
            ]
        );
    }
}
