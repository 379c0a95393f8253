//! What a policy change would do to the traffic the mesh has actually seen: every stored
//! edge is replayed against the current set and a candidate, and each flow whose verdict
//! changes is listed, newly denied first.
//!
//! A replayed request is a representative of its edge, not the request itself: the path is
//! the template with each `*` replaced by `x`, and it carries no headers, host or peer
//! address. Rules on those see the request as having none; the impact of such rules is an
//! estimate, and the explanation printed beside each flow says what decided. The request is
//! built as a sidecar builds it (`bulkhead_policy::canonical`); a flow a sidecar would now
//! refuse before any policy (recorded before paths and methods were canonical) is counted in
//! `refused`, not replayed: no policy change can alter a refusal.
//!
//! "What if I enforce this" is [`enforce_all`] before compiling the candidate: audit-mode
//! policies and postures then decide as if enforced.

use crate::edge::{Edge, EdgeKey, EdgeStats, rfc3339};
use bulkhead_policy::model::{Direction, Mode, Resource, WorkloadRef};
use bulkhead_policy::{
    CanonicalRequest, Decision, Peer, PolicySet, Protocol, RawRequest, Request, Verdict,
};
use bulkhead_spiffe::SpiffeId;
use std::collections::BTreeMap;
use std::fmt;

/// The resources with every audit-mode policy and posture switched to enforce. Where a scope
/// (a namespace, or the mesh) has both an audit and an enforced posture, the audit one takes
/// the enforced one's place, keeping the enforced one's direction where it sets none.
pub fn enforce_all(resources: &[Resource]) -> Vec<Resource> {
    // The enforced posture of each scope that also has an audit one.
    let scope = |r: &Resource| r.metadata().namespace.as_ref().map(|n| n.value.to_string());
    let mut audit_scopes = Vec::new();
    for r in resources {
        if let Resource::DefaultPosture(doc) = r
            && doc.spec.mode == Mode::Audit
        {
            audit_scopes.push(scope(r));
        }
    }
    let enforced: BTreeMap<Option<String>, &Resource> = resources
        .iter()
        .filter(|r| {
            matches!(r, Resource::DefaultPosture(d) if d.spec.mode == Mode::Enforce)
                && audit_scopes.contains(&scope(r))
        })
        .map(|r| (scope(r), r))
        .collect();
    let mut out = Vec::with_capacity(resources.len());
    for r in resources {
        match r {
            Resource::AuthorizationPolicy(doc) => {
                let mut doc = doc.clone();
                doc.spec.mode = Mode::Enforce;
                out.push(Resource::AuthorizationPolicy(doc));
            }
            Resource::DefaultPosture(doc) if doc.spec.mode == Mode::Audit => {
                let mut doc = doc.clone();
                doc.spec.mode = Mode::Enforce;
                if let Some(Resource::DefaultPosture(e)) = enforced.get(&scope(r)) {
                    doc.spec.ingress = doc.spec.ingress.or(e.spec.ingress);
                    doc.spec.egress = doc.spec.egress.or(e.spec.egress);
                }
                out.push(Resource::DefaultPosture(doc));
            }
            Resource::DefaultPosture(_) if enforced.values().any(|e| e.key() == r.key()) => {}
            other => out.push(other.clone()),
        }
    }
    out
}

/// `current` with `changes` applied as `bulkhead apply` would: a resource with the same
/// kind, namespace and name replaces the stored one in place; new ones are appended.
pub fn apply(current: &[Resource], changes: &[Resource]) -> Vec<Resource> {
    let mut out = current.to_vec();
    for c in changes {
        match out.iter_mut().find(|r| r.key() == c.key()) {
            Some(slot) => *slot = c.clone(),
            None => out.push(c.clone()),
        }
    }
    out
}

/// A request shape between two parties: an edge without its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub direction: Direction,
    pub source_identity: Option<SpiffeId>,
    pub source_workload: Option<WorkloadRef>,
    pub destination: WorkloadRef,
    pub port: u16,
    pub protocol: Protocol,
    pub method: Option<String>,
    /// The path template.
    pub path: Option<String>,
}

impl Flow {
    /// The flow of an edge: its key without the outcome.
    pub fn of(k: &EdgeKey) -> Flow {
        Flow {
            direction: k.direction,
            source_identity: k.source_identity.clone(),
            source_workload: k.source_workload.clone(),
            destination: k.destination.clone(),
            port: k.port,
            protocol: k.protocol,
            method: k.method.clone(),
            path: k.path.clone(),
        }
    }

    /// Replays a representative request of the flow against `set` (see the module's
    /// documentation for what it carries), made canonical as a sidecar makes it. `identities`
    /// names each declared workload's identity, which an egress replay presents as the
    /// server's.
    pub fn replay(
        &self,
        set: &PolicySet,
        identities: &BTreeMap<WorkloadRef, String>,
    ) -> Result<Decision, Unreplayable> {
        let headers: Vec<(String, String)> = Vec::new();
        let path = self.path.as_deref().map(concrete_path);
        let canonical = match self.protocol.is_http() {
            false => None,
            true => {
                let raw = RawRequest {
                    method: self.method.as_deref().unwrap_or_default(),
                    target: path.as_deref().unwrap_or("/"),
                    authority: None,
                };
                let c = CanonicalRequest::new(raw, std::iter::empty())
                    .map_err(|_| Unreplayable::Refused)?;
                Some(c)
            }
        };
        let (subject, peer) = match self.direction {
            Direction::Ingress => (
                &self.destination,
                Peer {
                    identity: self.source_identity.as_deref(),
                    ip: None,
                    workload: None,
                },
            ),
            Direction::Egress => (
                self.source_workload
                    .as_ref()
                    .ok_or(Unreplayable::NoSourceWorkload)?,
                Peer {
                    identity: identities.get(&self.destination).map(String::as_str),
                    ip: None,
                    workload: Some(&self.destination),
                },
            ),
        };
        Ok(set.evaluate(&Request {
            direction: self.direction,
            subject,
            peer,
            port: self.port,
            protocol: self.protocol,
            http: canonical.as_ref().map(|c| c.http(&headers)),
        }))
    }
}

/// Why a recorded flow cannot be judged again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreplayable {
    /// An egress flow whose source workload is unknown: there is no subject to judge it for.
    NoSourceWorkload,
    /// A sidecar refuses the request before any policy (a lower-case method, a dot segment).
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VerdictChange {
    NewlyDenied,
    NewlyAllowed,
}

/// One flow whose verdict the candidate changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowChange {
    pub change: VerdictChange,
    pub flow: Flow,
    /// Every request of the flow, whatever it was decided at the time.
    pub stats: EdgeStats,
    /// The current set's decision.
    pub before: Decision,
    /// The candidate's decision: the policy and rule, or the posture and nearest miss.
    pub after: Decision,
}

/// The flows a candidate would change, newly denied first, then by request count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Impact {
    pub changes: Vec<FlowChange>,
    /// How many distinct flows were replayed.
    pub replayed: usize,
    /// Flows that could not be replayed: egress edges whose source workload is unknown.
    pub not_replayed: Vec<Flow>,
    /// Flows a sidecar refuses before any policy (a lower-case method, a dot segment …),
    /// whatever either set says.
    pub refused: Vec<Flow>,
}

impl Impact {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn newly_denied(&self) -> impl Iterator<Item = &FlowChange> {
        self.changes
            .iter()
            .filter(|c| c.change == VerdictChange::NewlyDenied)
    }
}

/// Replays every flow of `edges` against `current` and `candidate` and lists the flows whose
/// verdict differs. `declared` gives the Workloads whose identities an egress replay needs
/// (the server's identity); ingress replays need only the edge.
///
/// To see what enforcing audit-mode resources would do, compile the candidate from
/// [`enforce_all`]; a candidate compiled as is shows what applying it would do (nothing, for
/// audit-mode resources).
pub fn impact(
    edges: &[Edge],
    current: &PolicySet,
    candidate: &PolicySet,
    declared: &[Resource],
) -> Impact {
    let identities = crate::graph::declared_identities(declared);
    let mut flows: BTreeMap<Flow, EdgeStats> = BTreeMap::new();
    for e in edges {
        flows.entry(Flow::of(&e.key)).or_default().merge(&e.stats);
    }
    let mut out = Impact::default();
    for (flow, stats) in flows {
        let (before, after) = match (
            flow.replay(current, &identities),
            flow.replay(candidate, &identities),
        ) {
            (Ok(before), Ok(after)) => (before, after),
            (Err(Unreplayable::Refused), _) | (_, Err(Unreplayable::Refused)) => {
                out.refused.push(flow);
                continue;
            }
            _ => {
                out.not_replayed.push(flow);
                continue;
            }
        };
        out.replayed += 1;
        let change = match (before.verdict, after.verdict) {
            (Verdict::Allow, Verdict::Deny) => VerdictChange::NewlyDenied,
            (Verdict::Deny, Verdict::Allow) => VerdictChange::NewlyAllowed,
            _ => continue,
        };
        out.changes.push(FlowChange {
            change,
            flow,
            stats,
            before,
            after,
        });
    }
    out.changes.sort_by(|a, b| {
        (a.change, std::cmp::Reverse(a.stats.count), &a.flow).cmp(&(
            b.change,
            std::cmp::Reverse(b.stats.count),
            &b.flow,
        ))
    });
    out
}

/// A path that matches its template: each `*` becomes `x` (`/orders/*` → `/orders/x`).
pub fn concrete_path(template: &str) -> String {
    template
        .split('/')
        .map(|seg| {
            if seg == "**" {
                "x".to_string()
            } else {
                seg.replace('*', "x")
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// `spiffe://…/frontend (shop/frontend) -> shop/orders:8080 http GET /orders/*, ingress`
impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source_identity, &self.source_workload) {
            (Some(id), Some(w)) => write!(f, "{id} ({w})")?,
            (Some(id), None) => f.write_str(id)?,
            (None, Some(w)) => write!(f, "{w} (no identity)")?,
            (None, None) => f.write_str("(no identity)")?,
        }
        write!(
            f,
            " -> {}:{} {}",
            self.destination,
            self.port,
            self.protocol.as_str()
        )?;
        for part in [&self.method, &self.path].into_iter().flatten() {
            write!(f, " {part}")?;
        }
        let dir = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        write!(f, ", {dir}")
    }
}

/// One paragraph per flow, then a summary line.
impl fmt::Display for Impact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut totals = [(0usize, 0u64); 2];
        for c in &self.changes {
            let (word, slot) = match c.change {
                VerdictChange::NewlyDenied => ("newly denied", 0),
                VerdictChange::NewlyAllowed => ("newly allowed", 1),
            };
            totals[slot].0 += 1;
            totals[slot].1 += c.stats.count;
            let n = c.stats.count;
            writeln!(
                f,
                "{word}: {}\n  {n} request{}, last seen {}\n  before: {}\n  after:  {}",
                c.flow,
                if n == 1 { "" } else { "s" },
                rfc3339(c.stats.last_seen),
                c.before,
                c.after
            )?;
        }
        write!(
            f,
            "{} of {} flows change: {} newly denied ({} requests), {} newly allowed ({} requests)",
            self.changes.len(),
            self.replayed,
            totals[0].0,
            totals[0].1,
            totals[1].0,
            totals[1].1
        )?;
        if !self.not_replayed.is_empty() {
            write!(
                f,
                "; {} egress flows without a source workload not replayed",
                self.not_replayed.len()
            )?;
        }
        if !self.refused.is_empty() {
            write!(
                f,
                "; {} flows a sidecar refuses before any policy (a lower-case method or an ambiguous path) not replayed",
                self.refused.len()
            )?;
        }
        writeln!(f)
    }
}

#[cfg(test)]
mod tests;
