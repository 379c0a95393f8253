//! Evaluating requests against a compiled [`PolicySet`].
//!
//! The index is keyed by (direction, workload) first, so a decision only looks at the rules
//! of the workload being protected. Within those, rules whose callers are exact identities
//! are found by hash; only the others are scanned. Cost stays flat as the mesh grows.

use crate::decision::{AuditOutcome, Decision, NearMiss, PostureSource, Reason, Verdict};
use crate::model::{Action, Direction, HeaderCondition, ResourceName, WorkloadRef};
use crate::pattern::{HostPattern, IdentityPattern, Method, PathPattern, PortRange, Protocol};
use core::net::IpAddr;
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Access to a request's headers by lower-case name.
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Headers for &[(&str, &str)] {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

impl Headers for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The HTTP part of a request.
#[derive(Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    /// Lower case, without a port.
    pub host: Option<&'a str>,
    pub headers: &'a dyn Headers,
}

/// The other end of a request, as the deciding proxy knows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    /// Ingress: the caller's verified SPIFFE ID. Egress: the ID the server must present.
    pub identity: Option<&'a str>,
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

/// A compiled, immutable policy set at one revision.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub(crate) revision: u64,
    /// Per protected workload: `[ingress, egress]` rules.
    pub(crate) subjects: HashMap<WorkloadRef, [Option<SubjectRules>; 2]>,
    pub(crate) postures: Postures,
    pub(crate) identity_workloads: HashMap<String, Vec<WorkloadRef>>,
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
    pub namespaces: HashMap<String, ScopePostures>,
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

#[derive(Debug, Default)]
pub(crate) struct SubjectRules {
    pub enforce: RuleSet,
    pub audit: RuleSet,
    pub has_audit: bool,
}

#[derive(Debug, Default)]
pub(crate) struct RuleSet {
    pub deny: RuleList,
    pub allow: RuleList,
}

/// Rules in definition order, with a hash index on exact caller identities.
#[derive(Debug, Default)]
pub(crate) struct RuleList {
    rules: Vec<CompiledRule>,
    by_identity: HashMap<Box<str>, Vec<u32>>,
    general: Vec<u32>,
    /// Whether rule i is reached through `by_identity` (its callers are exact identities).
    indexed: Vec<bool>,
}

#[derive(Clone, Debug)]
pub(crate) struct CompiledRule {
    pub policy: Arc<ResourceName>,
    pub name: Arc<str>,
    /// Position in load order across the whole set, for ties between lists.
    pub order: u32,
    pub conds: Vec<Cond>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct IdentitySet {
    exact: HashSet<Box<str>>,
    prefixes: Vec<Box<str>>,
    any: bool,
}

/// One condition of a rule; a rule matches when all of its conditions hold.
#[derive(Clone, Debug)]
pub(crate) enum Cond {
    Identity(IdentitySet, IdentitySet),
    Namespace(Vec<String>, Vec<String>),
    SourceWorkload(IdentitySet),
    Cidr(Vec<IpNet>, Vec<IpNet>),
    DestWorkload(HashSet<WorkloadRef>),
    Port(Vec<PortRange>, Vec<PortRange>),
    Protocol(Vec<Protocol>),
    Method(Vec<Method>, Vec<Method>),
    Path(Vec<PathPattern>, Vec<PathPattern>),
    Host(Vec<HostPattern>, Vec<HostPattern>),
    Grpc(Vec<String>, Vec<String>),
    Header(HeaderCondition),
}

impl IdentitySet {
    pub(crate) fn new(patterns: &[IdentityPattern]) -> IdentitySet {
        let mut s = IdentitySet::default();
        for p in patterns {
            match p {
                IdentityPattern::Any => s.any = true,
                IdentityPattern::Exact(e) => {
                    s.exact.insert(e.as_str().into());
                }
                IdentityPattern::Prefix(p) => s.prefixes.push(p.as_str().into()),
            }
        }
        s
    }

    fn is_empty(&self) -> bool {
        !self.any && self.exact.is_empty() && self.prefixes.is_empty()
    }

    fn contains(&self, id: &str) -> bool {
        self.any
            || (!self.exact.is_empty() && self.exact.contains(id))
            || self.prefixes.iter().any(|p| id.starts_with(&**p))
    }

    /// The exact identities, if that is all this set holds.
    fn only_exact(&self) -> Option<&HashSet<Box<str>>> {
        (!self.any && self.prefixes.is_empty() && !self.exact.is_empty()).then_some(&self.exact)
    }
}

/// The other end's namespace: the destination workload's on egress when known, else the
/// `/ns/<namespace>/` of its SPIFFE ID.
fn peer_namespace<'a>(req: &Request<'a>) -> Option<&'a str> {
    match (req.direction, req.peer.workload) {
        (Direction::Egress, Some(w)) => Some(w.namespace.as_str()),
        _ => req.peer.identity.and_then(namespace_of),
    }
}

/// Slot of a direction in [`PolicySet::subjects`].
pub(crate) fn slot(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// The namespace segment of a `spiffe://td/ns/<ns>/…` ID.
fn namespace_of(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut segs = path.split('/');
    match (segs.next(), segs.next()) {
        (Some("ns"), Some(ns)) => Some(ns),
        _ => None,
    }
}

impl Cond {
    /// The name used in explanations.
    fn label(&self) -> &'static str {
        match self {
            Cond::Identity(..) => "identity",
            Cond::Namespace(..) => "namespace",
            Cond::SourceWorkload(..) => "source workload",
            Cond::Cidr(..) => "address",
            Cond::DestWorkload(..) => "destination workload",
            Cond::Port(..) => "port",
            Cond::Protocol(..) => "protocol",
            Cond::Method(..) => "method",
            Cond::Path(..) => "path",
            Cond::Host(..) => "host",
            Cond::Grpc(..) => "gRPC method",
            Cond::Header(..) => "header",
        }
    }

    /// The request's value for this condition, for "… but not path /admin".
    fn describe(&self, req: &Request<'_>) -> String {
        let http = req.http;
        let v = match self {
            Cond::Identity(..) | Cond::SourceWorkload(..) => {
                req.peer.identity.unwrap_or("(none)").to_string()
            }
            Cond::Namespace(..) => peer_namespace(req).unwrap_or("(none)").to_string(),
            Cond::Cidr(..) => req
                .peer
                .ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "(unknown)".into()),
            Cond::DestWorkload(..) => req
                .peer
                .workload
                .map(|w| w.to_string())
                .unwrap_or_else(|| "(unknown)".into()),
            Cond::Port(..) => req.port.to_string(),
            Cond::Protocol(..) => req.protocol.as_str().to_string(),
            Cond::Method(..) => http.map(|h| h.method).unwrap_or("(not HTTP)").to_string(),
            Cond::Path(..) | Cond::Grpc(..) => {
                http.map(|h| h.path).unwrap_or("(not HTTP)").to_string()
            }
            Cond::Host(..) => http.and_then(|h| h.host).unwrap_or("(none)").to_string(),
            Cond::Header(h) => {
                let got = http.and_then(|x| x.headers.get(h.header.as_str()));
                return format!(
                    "header {} {}",
                    h.header.as_str(),
                    got.map(|g| format!("{g:?}"))
                        .unwrap_or_else(|| "(absent)".into())
                );
            }
        };
        format!("{} {v}", self.label())
    }

    pub(crate) fn holds(&self, req: &Request<'_>, set: &PolicySet) -> bool {
        let id = req.peer.identity;
        // A missing attribute is in no negated list, and matches no positive one.
        match self {
            Cond::Identity(any, none) => match id {
                Some(id) => (any.is_empty() || any.contains(id)) && !none.contains(id),
                None => any.is_empty(),
            },
            Cond::SourceWorkload(ids) => id.is_some_and(|id| ids.contains(id)),
            Cond::Namespace(any, none) => match peer_namespace(req) {
                Some(ns) => {
                    (any.is_empty() || any.iter().any(|a| a == ns)) && !none.iter().any(|n| n == ns)
                }
                None => any.is_empty(),
            },
            Cond::Cidr(any, none) => match req.peer.ip {
                Some(ip) => {
                    (any.is_empty() || any.iter().any(|n| n.contains(&ip)))
                        && !none.iter().any(|n| n.contains(&ip))
                }
                None => any.is_empty(),
            },
            Cond::DestWorkload(dests) => match req.peer.workload {
                Some(w) => dests.contains(w),
                None => id
                    .and_then(|id| set.identity_workloads.get(id))
                    .is_some_and(|ws| ws.iter().any(|w| dests.contains(w))),
            },
            Cond::Port(any, none) => {
                (any.is_empty() || any.iter().any(|r| r.contains(req.port)))
                    && !none.iter().any(|r| r.contains(req.port))
            }
            Cond::Protocol(any) => any.contains(&req.protocol),
            Cond::Method(any, none) => req.http.is_some_and(|h| {
                (any.is_empty() || any.iter().any(|m| m.as_str() == h.method))
                    && !none.iter().any(|m| m.as_str() == h.method)
            }),
            Cond::Path(any, none) => req.http.is_some_and(|h| {
                (any.is_empty() || any.iter().any(|p| p.matches(h.path)))
                    && !none.iter().any(|p| p.matches(h.path))
            }),
            Cond::Host(any, none) => req.http.is_some_and(|h| match h.host {
                Some(host) => {
                    (any.is_empty() || any.iter().any(|p| p.matches(host)))
                        && !none.iter().any(|p| p.matches(host))
                }
                None => any.is_empty(),
            }),
            // Any listed service, or any listed method.
            Cond::Grpc(services, methods) => req.http.is_some_and(|h| {
                let Some((svc, method)) = h.path.strip_prefix('/').and_then(|p| p.split_once('/'))
                else {
                    return false;
                };
                services.iter().any(|s| s == svc)
                    || methods
                        .iter()
                        .any(|m| m.split_once('/') == Some((svc, method)))
            }),
            Cond::Header(c) => req.http.is_some_and(|h| {
                let got = h.headers.get(c.header.as_str());
                // A bare `header:` means the header must be present.
                let bare = c.values.is_empty() && c.not_values.is_empty() && c.present.is_none();
                let present_ok = match c.present {
                    Some(p) => p == got.is_some(),
                    None => !bare || got.is_some(),
                };
                let values_ok =
                    c.values.is_empty() || got.is_some_and(|g| c.values.iter().any(|v| v == g));
                let not_ok = got.is_none_or(|g| !c.not_values.iter().any(|v| v == g));
                present_ok && values_ok && not_ok
            }),
        }
    }
}

impl CompiledRule {
    fn matches(&self, req: &Request<'_>, set: &PolicySet) -> bool {
        self.conds.iter().all(|c| c.holds(req, set))
    }

    /// How close a non-matching rule came: (share of its conditions matched, in thousandths;
    /// explanation).
    fn near_miss(&self, req: &Request<'_>, set: &PolicySet) -> (usize, NearMiss) {
        let mut matched = Vec::new();
        let mut failed = None;
        for c in &self.conds {
            if c.holds(req, set) {
                matched.push(c.label());
            } else if failed.is_none() {
                failed = Some(c.describe(req));
            }
        }
        (
            matched.len() * 1000 / self.conds.len().max(1),
            NearMiss {
                policy: self.policy.clone(),
                rule: self.name.clone(),
                matched,
                failed: failed.unwrap_or_default(),
            },
        )
    }
}

impl RuleList {
    pub(crate) fn push(&mut self, rule: CompiledRule) {
        self.rules.push(rule);
    }

    /// The rules in definition order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &CompiledRule> {
        self.rules.iter()
    }

    /// Builds the identity index once every rule is in.
    pub(crate) fn finish(&mut self) {
        self.by_identity.clear();
        self.general.clear();
        self.indexed = vec![false; self.rules.len()];
        for (i, rule) in self.rules.iter().enumerate() {
            let exact = rule.conds.iter().find_map(|c| match c {
                Cond::Identity(any, _) => any.only_exact(),
                _ => None,
            });
            match exact {
                Some(ids) => {
                    self.indexed[i] = true;
                    for id in ids {
                        self.by_identity
                            .entry(id.clone())
                            .or_default()
                            .push(i as u32);
                    }
                }
                None => self.general.push(i as u32),
            }
        }
    }

    /// The first rule (in definition order) that matches.
    fn first_match(&self, req: &Request<'_>, set: &PolicySet) -> Option<&CompiledRule> {
        let hashed: &[u32] = req
            .peer
            .identity
            .and_then(|id| self.by_identity.get(id))
            .map(|v| v.as_slice())
            .unwrap_or(&[]);
        let (mut a, mut b) = (hashed.iter().peekable(), self.general.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x <= y => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => return None,
            };
            let rule = next.and_then(|&i| self.rules.get(i as usize))?;
            if rule.matches(req, set) {
                return Some(rule);
            }
        }
    }

    /// The rule with the largest share of its conditions matched (the first on a tie);
    /// scored without allocating, explained only for the winner.
    fn nearest_miss(&self, req: &Request<'_>, set: &PolicySet) -> Option<NearMiss> {
        self.nearest(req, set).map(|(_, r)| r.near_miss(req, set).1)
    }

    /// The nearest rule and its score (thousandths of its conditions matched).
    fn nearest(&self, req: &Request<'_>, set: &PolicySet) -> Option<(usize, &CompiledRule)> {
        // One lookup answers the identity condition of every indexed rule.
        let hits: &[u32] = req
            .peer
            .identity
            .and_then(|id| self.by_identity.get(id))
            .map(|v| v.as_slice())
            .unwrap_or(&[]);
        let mut best: Option<(usize, &CompiledRule)> = None;
        for (i, r) in self.rules.iter().enumerate() {
            let indexed = self.indexed.get(i).copied().unwrap_or(false);
            let matched = r
                .conds
                .iter()
                .filter(|c| match c {
                    Cond::Identity(_, none) if indexed => {
                        hits.binary_search(&(i as u32)).is_ok()
                            && req.peer.identity.is_none_or(|id| !none.contains(id))
                    }
                    _ => c.holds(req, set),
                })
                .count();
            let score = matched * 1000 / r.conds.len().max(1);
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, r));
            }
        }
        best
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }
}

impl SubjectRules {
    /// The nearest miss among the enforced and the audit allow rules together (the first in
    /// load order on a tie).
    fn nearest_staged_miss(&self, req: &Request<'_>, set: &PolicySet) -> Option<NearMiss> {
        let enforced = self.enforce.allow.nearest(req, set);
        let audit = self.audit.allow.nearest(req, set);
        let best = match (enforced, audit) {
            (Some(e), Some(a)) if a.0 > e.0 || (a.0 == e.0 && a.1.order < e.1.order) => Some(a),
            (Some(e), _) => Some(e),
            (None, a) => a,
        };
        best.map(|(_, r)| r.near_miss(req, set).1)
    }

    pub(crate) fn finish(&mut self) {
        for list in [
            &mut self.enforce.deny,
            &mut self.enforce.allow,
            &mut self.audit.deny,
            &mut self.audit.allow,
        ] {
            list.finish();
        }
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
            .map(|s| {
                s.enforce.deny.len()
                    + s.enforce.allow.len()
                    + s.audit.deny.len()
                    + s.audit.allow.len()
            })
            .sum()
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
        let deny = rules.enforce.deny.first_match(req, self);
        let allow = match deny {
            Some(_) => None,
            None => rules.enforce.allow.first_match(req, self),
        };
        let (verdict, reason) = match (deny, allow) {
            (Some(r), _) => (Verdict::Deny, rule_reason(Action::Deny, r)),
            (None, Some(r)) => (Verdict::Allow, rule_reason(Action::Allow, r)),
            (None, None) => {
                let nearest_miss = match posture {
                    Action::Deny => rules.enforce.allow.nearest_miss(req, self),
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
            let shadow_deny = deny.or_else(|| rules.audit.deny.first_match(req, self));
            let shadow_allow = match shadow_deny {
                Some(_) => None,
                None => allow.or_else(|| rules.audit.allow.first_match(req, self)),
            };
            let (verdict, reason) = match (shadow_deny, shadow_allow) {
                (Some(r), _) => (Verdict::Deny, rule_reason(Action::Deny, r)),
                (None, Some(r)) => (Verdict::Allow, rule_reason(Action::Allow, r)),
                (None, None) => {
                    // Explained only when reported, i.e. when it differs from the verdict.
                    let nearest_miss = match staged_posture {
                        Action::Deny if verdict == Verdict::Allow => {
                            rules.nearest_staged_miss(req, self)
                        }
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
