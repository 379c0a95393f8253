//! Compiled rules and their conditions, and the lists a decision searches.
//!
//! A rule is compiled once, in the group of its policy's selector and direction; every
//! workload the selector picks holds the group by reference. Memory therefore grows with
//! rules plus workloads, never with their product, and a decision still searches one hash
//! index per group (usually one) instead of every rule.

use super::{Headers, Map, PolicySet, Request, Set, peer_namespace};
use crate::decision::NearMiss;
use crate::model::{HeaderCondition, ResourceName, WorkloadRef};
use crate::pattern::{HostPattern, IdentityPattern, Method, PathPattern, PortRange, Protocol};
use ipnet::IpNet;
use std::sync::Arc;

/// The rules one selector of one policy direction holds, shared by the workloads it picks.
#[derive(Debug, Default)]
pub(crate) struct RuleGroup {
    pub enforce: RuleSet,
    pub audit: RuleSet,
}

impl RuleGroup {
    pub(crate) fn has_audit(&self) -> bool {
        self.audit.deny.len() + self.audit.allow.len() > 0
    }

    pub(crate) fn len(&self) -> usize {
        self.enforce.deny.len()
            + self.enforce.allow.len()
            + self.audit.deny.len()
            + self.audit.allow.len()
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

/// The rules that apply to one workload in one direction: the groups of every selector that
/// picks it. A group no other workload holds (a policy that names this workload) is kept
/// inline, so the common case costs no more indirection than one list per workload did.
#[derive(Debug, Default)]
pub(crate) struct SubjectRules {
    pub own: Option<RuleGroup>,
    pub shared: Vec<Arc<RuleGroup>>,
    pub has_audit: bool,
}

/// Which list of a group to search.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ListKind {
    EnforceDeny,
    EnforceAllow,
    AuditDeny,
    AuditAllow,
}

impl RuleGroup {
    pub(crate) fn list(&self, kind: ListKind) -> &RuleList {
        match kind {
            ListKind::EnforceDeny => &self.enforce.deny,
            ListKind::EnforceAllow => &self.enforce.allow,
            ListKind::AuditDeny => &self.audit.deny,
            ListKind::AuditAllow => &self.audit.allow,
        }
    }
}

impl SubjectRules {
    /// Every group, the inline one first.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &RuleGroup> {
        self.own.iter().chain(self.shared.iter().map(|g| &**g))
    }

    /// The first rule in load order, over every group, of list `kind` that matches.
    pub(crate) fn first_match(
        &self,
        kind: ListKind,
        req: &Request<'_>,
        set: &PolicySet,
    ) -> Option<&CompiledRule> {
        // The common case, a workload only its own policies name: one list, no merging.
        if let (Some(own), true) = (&self.own, self.shared.is_empty()) {
            return own.list(kind).first_match(req, set);
        }
        let mut best: Option<&CompiledRule> = None;
        for g in self.groups() {
            if let Some(r) = g.list(kind).first_match(req, set)
                && best.is_none_or(|b| r.order < b.order)
            {
                best = Some(r);
            }
        }
        best
    }

    /// The rule of the lists `kinds` with the largest share of its conditions matched (the
    /// first in load order on a tie), and its score in thousandths.
    pub(crate) fn nearest(
        &self,
        kinds: &[ListKind],
        req: &Request<'_>,
        set: &PolicySet,
    ) -> Option<(usize, &CompiledRule)> {
        let mut best: Option<(usize, &CompiledRule)> = None;
        for g in self.groups() {
            for &kind in kinds {
                if let Some((score, r)) = g.list(kind).nearest(req, set)
                    && best.is_none_or(|(s, b)| score > s || (score == s && r.order < b.order))
                {
                    best = Some((score, r));
                }
            }
        }
        best
    }

    /// The nearest miss among the lists `kinds`, explained.
    pub(crate) fn nearest_miss(
        &self,
        kinds: &[ListKind],
        req: &Request<'_>,
        set: &PolicySet,
    ) -> Option<NearMiss> {
        self.nearest(kinds, req, set)
            .map(|(_, r)| r.near_miss(req, set).1)
    }

    pub(crate) fn len(&self) -> usize {
        self.groups().map(RuleGroup::len).sum()
    }
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
    by_identity: Map<Box<str>, Vec<u32>>,
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
    exact: Set<Box<str>>,
    prefixes: Vec<Box<str>>,
    any: bool,
}

/// How a header condition reads a header sent more than once. An allow rule's condition
/// holds only if every value satisfies it, a deny rule's if any value (or any
/// comma-separated item of one) does: neither a prepended nor an appended copy can turn a
/// verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quantifier {
    Every,
    Any,
}

/// One condition of a rule; a rule matches when all of its conditions hold.
#[derive(Clone, Debug)]
pub(crate) enum Cond {
    Identity(IdentitySet, IdentitySet),
    Namespace(Vec<String>, Vec<String>),
    SourceWorkload(IdentitySet),
    Cidr(Vec<IpNet>, Vec<IpNet>),
    DestWorkload(Set<WorkloadRef>),
    Port(Vec<PortRange>, Vec<PortRange>),
    Protocol(Vec<Protocol>),
    Method(Vec<Method>, Vec<Method>),
    Path(Vec<PathPattern>, Vec<PathPattern>),
    Host(Vec<HostPattern>, Vec<HostPattern>),
    Grpc(Vec<String>, Vec<String>),
    Header(HeaderCondition, Quantifier),
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

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.any
            || (!self.exact.is_empty() && self.exact.contains(id))
            || self.prefixes.iter().any(|p| id.starts_with(&**p))
    }

    /// The exact identities, if that is all this set holds.
    fn only_exact(&self) -> Option<&Set<Box<str>>> {
        (!self.any && self.prefixes.is_empty() && !self.exact.is_empty()).then_some(&self.exact)
    }
}

/// What the values of one header say about a condition: whether there were any, whether
/// every one satisfied it, whether one (or a comma-separated item of one) did.
struct Seen {
    count: usize,
    every: bool,
    any: bool,
}

fn value_ok(c: &HeaderCondition, v: &[u8]) -> bool {
    (c.values.is_empty() || c.values.iter().any(|x| x.as_bytes() == v))
        && !c.not_values.iter().any(|x| x.as_bytes() == v)
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn seen(c: &HeaderCondition, headers: &dyn Headers, items: bool) -> Seen {
    let mut s = Seen {
        count: 0,
        every: true,
        any: false,
    };
    headers.each_value(c.header.as_str(), &mut |v| {
        s.count += 1;
        let ok = value_ok(c, v);
        s.every &= ok;
        s.any |= ok || (items && v.split(|&b| b == b',').any(|i| value_ok(c, trim(i))));
    });
    s
}

/// Whether a header condition holds. A bare `header:` requires the header; `values` require
/// it; `present` says which; `notValues` alone also admit an absent header.
pub(crate) fn header_holds(c: &HeaderCondition, q: Quantifier, headers: &dyn Headers) -> bool {
    let bare = c.values.is_empty() && c.not_values.is_empty() && c.present.is_none();
    let s = seen(c, headers, q == Quantifier::Any);
    match s.count {
        0 => c.present != Some(true) && !bare && c.values.is_empty(),
        _ => {
            c.present != Some(false)
                && match q {
                    Quantifier::Every => s.every,
                    Quantifier::Any => s.any,
                }
        }
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
    fn describe(&self, req: &Request<'_>, set: &PolicySet) -> String {
        let http = req.http;
        let v = match self {
            Cond::Identity(..) | Cond::SourceWorkload(..) => {
                req.peer.identity.unwrap_or("(none)").to_string()
            }
            Cond::Namespace(..) => match (peer_namespace(req, set), req.peer.identity) {
                (Some(ns), _) => ns.to_string(),
                (None, Some(id)) if bulkhead_spiffe::namespace_of(id).is_some() => {
                    "(none: the caller is of another trust domain)".to_string()
                }
                (None, _) => "(none)".to_string(),
            },
            Cond::Cidr(..) => req
                .peer
                .ip
                .map(|i| crate::canonical::peer_ip(i).to_string())
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
            Cond::Header(h, _) => {
                let mut got = Vec::new();
                if let Some(x) = http {
                    x.headers.each_value(h.header.as_str(), &mut |v| {
                        got.push(format!("{:?}", String::from_utf8_lossy(v)));
                    });
                }
                let got = match got.is_empty() {
                    true => "(absent)".to_string(),
                    false => got.join(", "),
                };
                return format!("header {} {got}", h.header.as_str());
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
            Cond::Namespace(any, none) => match peer_namespace(req, set) {
                Some(ns) => {
                    (any.is_empty() || any.iter().any(|a| a == ns)) && !none.iter().any(|n| n == ns)
                }
                None => any.is_empty(),
            },
            Cond::Cidr(any, none) => match req.peer.ip.map(crate::canonical::peer_ip) {
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
            Cond::Header(c, q) => req.http.is_some_and(|h| header_holds(c, *q, h.headers)),
        }
    }
}

impl CompiledRule {
    fn matches(&self, req: &Request<'_>, set: &PolicySet) -> bool {
        self.conds.iter().all(|c| c.holds(req, set))
    }

    /// How close a non-matching rule came: (share of its conditions matched, in thousandths;
    /// explanation).
    pub(crate) fn near_miss(&self, req: &Request<'_>, set: &PolicySet) -> (usize, NearMiss) {
        let mut matched = Vec::new();
        let mut failed = None;
        for c in &self.conds {
            if c.holds(req, set) {
                matched.push(c.label());
            } else if failed.is_none() {
                failed = Some(c.describe(req, set));
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

    /// The indexed rules (ascending) whose identity condition names the caller's identity.
    #[inline]
    fn identity_hits(&self, req: &Request<'_>) -> &[u32] {
        req.peer
            .identity
            .and_then(|id| self.by_identity.get(id))
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// The first rule (in definition order) that matches.
    #[inline]
    fn first_match(&self, req: &Request<'_>, set: &PolicySet) -> Option<&CompiledRule> {
        if self.rules.is_empty() {
            return None;
        }
        let hashed = self.identity_hits(req);
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

    /// The nearest rule and its score (thousandths of its conditions matched); scored
    /// without allocating, explained only for the winner.
    fn nearest(&self, req: &Request<'_>, set: &PolicySet) -> Option<(usize, &CompiledRule)> {
        // One lookup answers the identity condition of every indexed rule.
        let hits = self.identity_hits(req);
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
