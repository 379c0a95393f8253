//! Evaluating requests against a compiled [`PolicySet`].
//!
//! The index is keyed by (direction, workload) first, so a decision only looks at the rules
//! of the workload being protected. Within those, rules whose callers are exact identities
//! are found by hash; only the others are scanned. Cost stays flat as the mesh grows.
//!
//! A request reaches this module only as [`crate::canonical`] built it; evaluation never
//! re-reads raw input.

mod rules;

use crate::decision::{AuditOutcome, Decision, PostureSource, Reason, Verdict};
use crate::model::{Action, Direction, ResourceName, WorkloadRef};
use crate::pattern::Protocol;
use core::net::IpAddr;
pub(crate) use rules::{
    CompiledRule, Cond, IdentitySet, ListKind, Quantifier, RuleGroup, RuleList, SubjectRules,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A request's headers, every value of them.
pub trait Headers {
    /// Calls `each` with every value of the header `name` (given in lower case), in the
    /// order received. A header sent twice has two values, and neither may be skipped: a
    /// condition of an allow rule must hold for every value, one of a deny rule for any.
    fn each_value(&self, name: &str, each: &mut dyn FnMut(&[u8]));
}

impl Headers for &[(&str, &str)] {
    fn each_value(&self, name: &str, each: &mut dyn FnMut(&[u8])) {
        for (_, v) in self.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)) {
            each(v.as_bytes());
        }
    }
}

impl Headers for Vec<(String, String)> {
    fn each_value(&self, name: &str, each: &mut dyn FnMut(&[u8])) {
        for (_, v) in self.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)) {
            each(v.as_bytes());
        }
    }
}

/// The HTTP part of a request, as [`crate::CanonicalRequest::http`] gives it: policy
/// assumes these values are canonical.
#[derive(Clone, Copy)]
pub struct Http<'a> {
    /// An upper-case token.
    pub method: &'a str,
    /// The canonical path, without the query string.
    pub path: &'a str,
    /// Lower case, without a port or trailing dot.
    pub host: Option<&'a str>,
    pub headers: &'a dyn Headers,
}

/// The other end of a request, as the deciding proxy knows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    /// Ingress: the caller's verified SPIFFE ID. Egress: the ID the server must present.
    pub identity: Option<&'a str>,
    /// Compared with CIDRs as [`crate::canonical::peer_ip`] gives it (IPv4-mapped IPv6
    /// addresses unmapped).
    pub ip: Option<IpAddr>,
    /// Egress: the destination workload, when known.
    pub workload: Option<&'a WorkloadRef>,
}

/// One request as an enforcement point sees it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub direction: Direction,
    /// The workload whose proxy decides: the destination on ingress, the source on egress.
    pub subject: &'a WorkloadRef,
    pub peer: Peer<'a>,
    /// The destination port.
    pub port: u16,
    pub protocol: Protocol,
    /// Present for HTTP, HTTP/2 and gRPC requests.
    pub http: Option<Http<'a>>,
}

/// The hash maps and sets a decision looks up: workloads, namespaces, exact caller
/// identities. Their keys all come from the policies, never from a request (a request only
/// looks one up), so a fast hash seeded per process serves where std's SipHash cost about a
/// third of a decision's instructions (BENCHMARKS.md, "Policy decisions").
pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// See [`Map`].
pub(crate) type Set<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// A compiled, immutable policy set at one revision.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub(crate) revision: u64,
    /// Per protected workload: `[ingress, egress]` rules.
    pub(crate) subjects: Map<WorkloadRef, [Option<SubjectRules>; 2]>,
    pub(crate) postures: Postures,
    pub(crate) identity_workloads: Map<String, Vec<WorkloadRef>>,
    /// Every declared Workload, in name order.
    pub(crate) declared: BTreeMap<WorkloadRef, DeclaredWorkload>,
}

/// A Workload declaration, as the evaluation and the reachability analysis need it.
#[derive(Debug)]
pub(crate) struct DeclaredWorkload {
    /// Its exact SPIFFE ID (the compiler refuses patterns).
    pub identity: String,
    /// Ports and their protocols, in declaration order.
    pub ports: Vec<(u16, Protocol)>,
    pub addresses: Vec<IpAddr>,
}

/// A DefaultPosture: its name, and its ingress and egress actions where it sets them.
pub(crate) type PostureEntry = Option<(Arc<ResourceName>, Option<Action>, Option<Action>)>;

/// The DefaultPostures of one scope (a namespace, or the mesh): at most one per mode.
#[derive(Debug, Default)]
pub(crate) struct ScopePostures {
    pub enforce: PostureEntry,
    pub audit: PostureEntry,
}

#[derive(Debug, Default)]
pub(crate) struct Postures {
    pub mesh: ScopePostures,
    pub namespaces: Map<String, ScopePostures>,
}

/// Which policies and postures count: those the verdict obeys, or also the audit-mode ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyView {
    /// Enforced policies and DefaultPostures only: what the verdict obeys.
    #[default]
    Enforced,
    /// As if every `mode: audit` policy and DefaultPosture were enforced: what the audit
    /// evaluation reports. At each scope the audit posture comes before the enforced one.
    Staged,
}

impl Postures {
    /// The posture for `direction` in namespace `namespace`, and where it came from. Enforced:
    /// namespace, mesh, built-in. Staged: audit namespace, namespace, audit mesh, mesh,
    /// built-in.
    pub(crate) fn lookup(
        &self,
        namespace: &str,
        direction: Direction,
        view: PolicyView,
    ) -> (Action, PostureSource) {
        self.lookup_in(self.namespaces.get(namespace), direction, view)
    }

    fn lookup_in(
        &self,
        scope: Option<&ScopePostures>,
        direction: Direction,
        view: PolicyView,
    ) -> (Action, PostureSource) {
        let pick = |entry: &PostureEntry| {
            entry.as_ref().and_then(|(name, ingress, egress)| {
                let a = match direction {
                    Direction::Ingress => *ingress,
                    Direction::Egress => *egress,
                };
                a.map(|a| (a, name.clone()))
            })
        };
        let staged = view == PolicyView::Staged;
        let found = scope
            .and_then(|s| {
                let audit = staged
                    .then(|| pick(&s.audit))
                    .flatten()
                    .map(|(a, n)| (a, PostureSource::AuditNamespace(n)));
                audit.or_else(|| pick(&s.enforce).map(|(a, n)| (a, PostureSource::Namespace(n))))
            })
            .or_else(|| {
                staged
                    .then(|| pick(&self.mesh.audit))
                    .flatten()
                    .map(|(a, n)| (a, PostureSource::AuditMesh(n)))
            })
            .or_else(|| pick(&self.mesh.enforce).map(|(a, n)| (a, PostureSource::Mesh(n))));
        found.unwrap_or(match direction {
            Direction::Ingress => (Action::Deny, PostureSource::BuiltIn),
            Direction::Egress => (Action::Allow, PostureSource::BuiltIn),
        })
    }
}

/// The other end's namespace: the destination workload's on egress when known, else the
/// `/ns/<namespace>/` of its SPIFFE ID — but only for an ID of the deciding workload's own
/// trust domain. A namespace is a namespace of this mesh: an identity of a federated trust
/// domain that happens to have `/ns/shop/` in its path is in no namespace here, so
/// `namespaces: [shop]` never admits another domain's callers (name them by identity).
pub(crate) fn peer_namespace<'a>(req: &Request<'a>, set: &PolicySet) -> Option<&'a str> {
    match (req.direction, req.peer.workload) {
        (Direction::Egress, Some(w)) => Some(w.namespace.as_str()),
        _ => {
            let id = req.peer.identity?;
            if let Some(own) = set.declared.get(req.subject)
                && bulkhead_spiffe::trust_domain_of(id)
                    != bulkhead_spiffe::trust_domain_of(&own.identity)
            {
                return None;
            }
            bulkhead_spiffe::namespace_of(id)
        }
    }
}

/// Slot of a direction in [`PolicySet::subjects`].
pub(crate) fn slot(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn rule_reason(action: Action, r: &CompiledRule) -> Reason {
    Reason::Rule {
        action,
        policy: r.policy.clone(),
        rule: r.name.clone(),
    }
}

fn verdict_of(action: Action) -> Verdict {
    match action {
        Action::Allow => Verdict::Allow,
        Action::Deny => Verdict::Deny,
    }
}

impl PolicySet {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether a Workload declares `workload`.
    pub fn declares(&self, workload: &WorkloadRef) -> bool {
        self.declared.contains_key(workload)
    }

    /// The identity `workload`'s Workload declares.
    pub fn declared_identity(&self, workload: &WorkloadRef) -> Option<&str> {
        self.declared.get(workload).map(|w| w.identity.as_str())
    }

    /// The ports and protocols `workload`'s Workload declares, in declaration order.
    pub fn declared_ports(&self, workload: &WorkloadRef) -> Option<&[(u16, Protocol)]> {
        self.declared.get(workload).map(|w| w.ports.as_slice())
    }

    /// The declared workloads whose Workload names `identity`.
    pub fn workloads_with_identity(&self, identity: &str) -> &[WorkloadRef] {
        self.identity_workloads
            .get(identity)
            .map_or(&[], Vec::as_slice)
    }

    /// The protocol `workload` declares for `port`, if it declares that port.
    pub fn declared_protocol(&self, workload: &WorkloadRef, port: u16) -> Option<Protocol> {
        self.declared
            .get(workload)?
            .ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, proto)| *proto)
    }

    /// Whether `workload` declares any port. A transparent sidecar refuses connections to
    /// the ports such a workload does not declare, before policy: a rule without `ports:`
    /// then covers the declared ports only.
    pub fn declares_ports(&self, workload: &WorkloadRef) -> bool {
        self.declared
            .get(workload)
            .is_some_and(|w| !w.ports.is_empty())
    }

    /// How many compiled rules there are, counted once per protected workload; for tooling.
    pub fn rule_count(&self) -> usize {
        self.subjects
            .values()
            .flatten()
            .flatten()
            .map(SubjectRules::len)
            .sum()
    }

    /// How many rules were compiled: each once, however many workloads it protects.
    pub fn compiled_rule_count(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let subjects = || self.subjects.values().flatten().flatten();
        let own: usize = subjects()
            .filter_map(|s| s.own.as_ref())
            .map(RuleGroup::len)
            .sum();
        let shared: usize = subjects()
            .flat_map(|s| s.shared.iter())
            .filter(|g| seen.insert(Arc::as_ptr(g)))
            .map(|g| g.len())
            .sum();
        own + shared
    }

    /// The posture for a workload's namespace and direction, and where it came from.
    pub(crate) fn posture(
        &self,
        subject: &WorkloadRef,
        direction: Direction,
        view: PolicyView,
    ) -> (Action, PostureSource) {
        self.postures.lookup(&subject.namespace, direction, view)
    }

    /// Decides one request: deny rules win, then allow rules, then the posture. Audit-mode
    /// policies and postures are evaluated beside the enforced ones and reported, never
    /// obeyed.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let rules = self
            .subjects
            .get(req.subject)
            .and_then(|d| d[slot(req.direction)].as_ref());
        let scope = self.postures.namespaces.get(&req.subject.namespace);
        let (posture, source) = self
            .postures
            .lookup_in(scope, req.direction, PolicyView::Enforced);
        let (staged_posture, staged_source) =
            self.postures
                .lookup_in(scope, req.direction, PolicyView::Staged);
        let staged = staged_source.is_audit();
        let Some(rules) = rules else {
            let verdict = verdict_of(posture);
            let audit = staged.then(|| {
                Box::new(AuditOutcome {
                    verdict: verdict_of(staged_posture),
                    // No rule applies, so no allow rule can be named.
                    reason: Reason::Posture {
                        action: staged_posture,
                        source: staged_source,
                        nearest_miss: None,
                    },
                })
            });
            return Decision {
                verdict,
                reason: Reason::Posture {
                    action: posture,
                    source,
                    nearest_miss: None,
                },
                revision: self.revision,
                audit,
            };
        };
        let deny = rules.first_match(ListKind::EnforceDeny, req, self);
        let allow = match deny {
            Some(_) => None,
            None => rules.first_match(ListKind::EnforceAllow, req, self),
        };
        let (verdict, reason) = match (deny, allow) {
            (Some(r), _) => (Verdict::Deny, rule_reason(Action::Deny, r)),
            (None, Some(r)) => (Verdict::Allow, rule_reason(Action::Allow, r)),
            (None, None) => {
                let nearest_miss = match posture {
                    Action::Deny => rules.nearest_miss(&[ListKind::EnforceAllow], req, self),
                    Action::Allow => None,
                };
                (
                    verdict_of(posture),
                    Reason::Posture {
                        action: posture,
                        source,
                        nearest_miss,
                    },
                )
            }
        };
        let audit = (rules.has_audit || staged).then(|| {
            // Steps 4-6 again, with the audit policies added and the staged posture.
            let shadow_deny = deny.or_else(|| rules.first_match(ListKind::AuditDeny, req, self));
            let shadow_allow = match shadow_deny {
                Some(_) => None,
                None => allow.or_else(|| rules.first_match(ListKind::AuditAllow, req, self)),
            };
            let (verdict, reason) = match (shadow_deny, shadow_allow) {
                (Some(r), _) => (Verdict::Deny, rule_reason(Action::Deny, r)),
                (None, Some(r)) => (Verdict::Allow, rule_reason(Action::Allow, r)),
                (None, None) => {
                    // Explained only when reported, i.e. when it differs from the verdict.
                    let nearest_miss = match staged_posture {
                        Action::Deny if verdict == Verdict::Allow => rules.nearest_miss(
                            &[ListKind::EnforceAllow, ListKind::AuditAllow],
                            req,
                            self,
                        ),
                        _ => None,
                    };
                    (
                        verdict_of(staged_posture),
                        Reason::Posture {
                            action: staged_posture,
                            source: staged_source,
                            nearest_miss,
                        },
                    )
                }
            };
            Box::new(AuditOutcome { verdict, reason })
        });
        Decision {
            verdict,
            reason,
            revision: self.revision,
            audit,
        }
    }
}
