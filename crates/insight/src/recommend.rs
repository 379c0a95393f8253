//! Least-privilege policy from observed traffic: for each workload that received requests,
//! an ingress allow policy with one rule per caller, naming the ports, methods and paths
//! that caller was seen using, in audit mode, with the evidence beside each rule.
//!
//! A recommendation only ever allows what got through: denied requests, callers without an
//! identity and requests the language cannot express are listed in comments, never turned
//! into rules. It never writes a rule the compiler would refuse against the applied set:
//! methods and paths are written only on ports the destination's Workload declares (or
//! leaves undeclared) as HTTP, and otherwise the rule names ports alone and says why.

mod diff;
mod yaml;

pub use diff::{Change, DiffLine, RecommendationDiff, ResourceDiff, RuleDiff, diff};

use crate::edge::{Edge, EdgeStats, EdgeVerdict};
use crate::template::{DEFAULT_MAX_CHILDREN, generalise_with};
use bulkhead_policy::model::{
    Action, AuthorizationPolicySpec, DefaultPostureSpec, Direction, Document, Metadata, Mode, Name,
    Resource, Rule, Selector, Source, Target, WorkloadRef, WorkloadSpec,
};
use bulkhead_policy::{
    IdentityPattern, Located, Method, PathPattern, PortRange, Protocol, canonical,
};
use bulkhead_spiffe::SpiffeId;
use std::collections::{BTreeMap, BTreeSet};

/// Longest name the language accepts.
const MAX_NAME: usize = 63;

/// How a recommendation is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecommendOptions {
    /// A path prefix with more distinct children than this becomes `prefix/*`.
    pub max_children: usize,
}

impl Default for RecommendOptions {
    fn default() -> Self {
        RecommendOptions {
            max_children: DEFAULT_MAX_CHILDREN,
        }
    }
}

/// Recommended resources, in a fixed order: by namespace, then workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recommendation {
    /// One audit-mode allow policy per destination workload (some may have no rules, when
    /// none of its traffic could be recommended; those print as comments only).
    pub policies: Vec<RecommendedPolicy>,
    /// Audit-mode `ingress: deny` postures for namespaces that admit by default today.
    pub postures: Vec<RecommendedPosture>,
    /// What the operator should know that belongs to no one resource.
    pub notes: Vec<String>,
    /// Every ingress request the recommendation was made from.
    pub seen: EdgeStats,
}

/// `<workload>-recommended`: an audit-mode ingress allow policy for one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecommendedPolicy {
    pub namespace: Name,
    pub workload: Name,
    pub name: Name,
    pub rules: Vec<RecommendedRule>,
    /// Requests seen but not recommended, and why.
    pub left_out: Vec<LeftOut>,
    /// Every ingress request to the workload.
    pub seen: EdgeStats,
}

/// One caller: its identity and exactly the ports, methods and paths it was seen using.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecommendedRule {
    pub name: Name,
    /// Always one exact SPIFFE ID.
    pub identity: IdentityPattern,
    pub ports: Vec<u16>,
    /// Sorted; empty when the rule names ports only.
    pub methods: Vec<Method>,
    /// Generalised path patterns; empty when the rule names ports only.
    pub paths: Vec<PathPattern>,
    pub seen: EdgeStats,
    /// The requests behind the rule, most frequent first.
    pub evidence: Vec<Observed>,
    /// Why the rule is wider than the evidence, if it is.
    pub notes: Vec<String>,
}

/// Requests of one shape (port, protocol, method, path template).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub port: u16,
    pub protocol: Protocol,
    pub method: Option<String>,
    pub path: Option<String>,
    pub stats: EdgeStats,
    /// How many of them an audit-mode policy would have denied.
    pub would_deny: u64,
}

/// Requests that were seen but are not allowed by the recommendation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    pub source_identity: Option<SpiffeId>,
    pub source_workload: Option<WorkloadRef>,
    pub observed: Observed,
    pub reason: LeftOutReason,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LeftOutReason {
    /// Denied today; `would_allow` when an audit-mode policy would have allowed it.
    Denied {
        policy: Option<String>,
        rule: Option<String>,
        would_allow: bool,
    },
    /// No caller identity (plaintext, or unknown): a rule cannot name the caller.
    NoIdentity,
    /// The language cannot say it (the text says why).
    Unwritable(String),
}

/// `DefaultPosture <namespace>/recommended`: `ingress: deny` in audit mode, for a namespace
/// whose enforced posture admits what no rule decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecommendedPosture {
    pub namespace: Name,
    /// The enforced posture that admits today: `DefaultPosture shop/default`.
    pub admitted_by: String,
}

/// The name of every recommended DefaultPosture.
pub const POSTURE_NAME: &str = "recommended";
/// The suffix of every recommended policy's name.
pub const POLICY_SUFFIX: &str = "recommended";

/// Recommends least-privilege ingress policy for the workloads that received the `edges`,
/// given the `current` applied resources (Workloads for their ports, DefaultPostures for
/// the namespaces' posture). Only edges decided on ingress are used.
///
/// - Edges that got through (`allow`, `allow-would-deny`) from a caller with an identity
///   become rules: one per caller, `from.identities: [its ID]`, `to` with the ports, the
///   methods and the generalised path templates seen (ports alone for TCP).
/// - Denied edges (`deny`, `deny-would-allow`) and edges without an identity are listed in
///   comments, never allowed.
/// - Each namespace whose enforced ingress posture is allow (namespace DefaultPosture, then
///   mesh, then built-in deny) gets an audit `ingress: deny` posture, so that the audit
///   outcome shows every request the recommended rules would not allow.
pub fn recommend(edges: &[Edge], current: &[Resource], opts: &RecommendOptions) -> Recommendation {
    let declared: BTreeMap<WorkloadRef, &WorkloadSpec> = current
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(doc) => Some((r.name(), &doc.spec)),
            _ => None,
        })
        .collect();
    let mut by_destination: BTreeMap<&WorkloadRef, Vec<&Edge>> = BTreeMap::new();
    for e in edges
        .iter()
        .filter(|e| e.key.direction == Direction::Ingress)
    {
        by_destination
            .entry(&e.key.destination)
            .or_default()
            .push(e);
    }
    let mut rec = Recommendation::default();
    let mut policy_names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (dest, edges) in by_destination {
        for e in &edges {
            rec.seen.merge(&e.stats);
        }
        let (Ok(namespace), Ok(workload)) = (
            Name::try_from(dest.namespace.clone()),
            Name::try_from(dest.name.clone()),
        ) else {
            rec.notes.push(format!(
                "{} is not a valid workload name; no policy recommended for it",
                sanitize_comment(&dest.to_string())
            ));
            continue;
        };
        let taken = policy_names.entry(dest.namespace.clone()).or_default();
        let name = unique_name(workload.as_str(), POLICY_SUFFIX, taken);
        rec.policies.push(policy_for(
            namespace,
            workload,
            name,
            dest,
            &edges,
            declared.get(dest).copied(),
            opts,
        ));
    }
    recommend_postures(&mut rec, current);
    rec
}

/// The namespaces that admit by default get an audit deny posture, unless they already
/// have an audit posture of another name (a second one would be refused).
fn recommend_postures(rec: &mut Recommendation, current: &[Resource]) {
    let namespaces: BTreeSet<Name> = rec.policies.iter().map(|p| p.namespace.clone()).collect();
    let postures: Vec<(&Metadata, &DefaultPostureSpec)> = current
        .iter()
        .filter_map(|r| match r {
            Resource::DefaultPosture(doc) => Some((&doc.metadata, &doc.spec)),
            _ => None,
        })
        .collect();
    let enforced_ingress = |ns: Option<&str>| {
        postures.iter().find_map(|(m, s)| {
            let here = m.namespace.as_ref().map(|n| n.value.as_str()) == ns;
            (here && s.mode == Mode::Enforce)
                .then_some(s.ingress)
                .flatten()
                .map(|a| (a, m.name.value.as_str()))
        })
    };
    for ns in namespaces {
        let admitted_by = match enforced_ingress(Some(ns.as_str())) {
            Some((Action::Allow, name)) => format!("DefaultPosture {ns}/{name}"),
            Some((Action::Deny, _)) => continue,
            None => match enforced_ingress(None) {
                Some((Action::Allow, name)) => format!("the mesh-wide DefaultPosture {name}"),
                _ => continue,
            },
        };
        let other_audit = postures.iter().find(|(m, s)| {
            m.namespace.as_ref().map(|n| n.value.as_str()) == Some(ns.as_str())
                && s.mode == Mode::Audit
                && m.name.value.as_str() != POSTURE_NAME
        });
        if let Some((m, _)) = other_audit {
            rec.notes.push(format!(
                "namespace {ns} admits by default ({admitted_by}) but already has the audit posture {ns}/{}; no recommended posture added, so the audit outcome will not show what the recommended rules leave out",
                m.name.value
            ));
            continue;
        }
        rec.postures.push(RecommendedPosture {
            namespace: ns,
            admitted_by,
        });
    }
}

/// Requests of one shape: port, protocol, method, path template.
type Shape = (u16, Protocol, Option<String>, Option<String>);
type Rows = BTreeMap<Shape, Observed>;
/// A caller's identity and workload, and why its requests were left out.
type LeftOutKey = (Option<SpiffeId>, Option<WorkloadRef>, LeftOutReason);

/// One caller's requests that can become one rule.
#[derive(Default)]
struct Group {
    ports: BTreeSet<u16>,
    methods: BTreeSet<String>,
    templates: BTreeSet<String>,
    seen: EdgeStats,
    evidence: Rows,
    notes: BTreeSet<String>,
}

fn observed(e: &Edge) -> Observed {
    Observed {
        port: e.key.port,
        protocol: e.key.protocol,
        method: e.key.method.clone(),
        path: e.key.path.clone(),
        stats: e.stats,
        would_deny: if e.key.verdict == EdgeVerdict::AllowWouldDeny {
            e.stats.count
        } else {
            0
        },
    }
}

fn add(rows: &mut Rows, e: &Edge) {
    let key = (
        e.key.port,
        e.key.protocol,
        e.key.method.clone(),
        e.key.path.clone(),
    );
    let o = observed(e);
    rows.entry(key)
        .and_modify(|row| {
            row.stats.merge(&o.stats);
            row.would_deny += o.would_deny;
        })
        .or_insert(o);
}

/// Whether a rule on `port` of `dest` may carry methods and paths: the compiler accepts them
/// only where the Workload is declared, declares ports, and does not declare `port` as TCP.
fn http_conditions(
    dest: &WorkloadRef,
    decl: Option<&WorkloadSpec>,
    port: u16,
) -> Result<(), String> {
    let Some(w) = decl else {
        return Err(format!(
            "{dest} has no Workload declaration, so the compiler cannot check methods and paths on it; declare it with its ports to narrow this rule"
        ));
    };
    if w.ports.is_empty() {
        return Err(format!(
            "the Workload {dest} declares no ports, so the compiler cannot check methods and paths on it; declare its ports to narrow this rule"
        ));
    }
    match w.ports.iter().find(|p| p.port.value == port) {
        Some(p) if !p.protocol.is_http() => Err(format!(
            "port {port} of {dest} is declared {}, where methods and paths cannot be enforced",
            p.protocol.as_str()
        )),
        _ => Ok(()),
    }
}

/// Why an allowed request from a caller with an exact identity still cannot go into a rule
/// that carries methods and paths.
///
/// Paths and methods are read as a sidecar reads them (the canonical request): a template
/// a sidecar would refuse with 400, or a lower-case method, is left out with that reason.
fn unwritable_http(e: &Edge) -> Option<String> {
    let Some(method) = &e.key.method else {
        return Some("an HTTP request without a method".into());
    };
    if let Err(why) = canonical::method(method) {
        return Some(format!(
            "method {}: sidecars refuse it ({why})",
            sanitize_comment(method)
        ));
    }
    if Method::try_from(method.clone()).is_err() {
        return Some(format!(
            "method {} cannot be written in a policy",
            sanitize_comment(method)
        ));
    }
    let Some(path) = &e.key.path else {
        return Some("an HTTP request without a path".into());
    };
    let canonical = match canonical::path(path) {
        Ok(c) => c,
        Err(why) => {
            return Some(format!(
                "path template {}: sidecars refuse it ({why})",
                sanitize_comment(path)
            ));
        }
    };
    if PathPattern::try_from(canonical.into_owned()).is_err() {
        return Some(format!(
            "path template {} cannot be written in a policy",
            sanitize_comment(path)
        ));
    }
    None
}

fn policy_for(
    namespace: Name,
    workload: Name,
    name: Name,
    dest: &WorkloadRef,
    edges: &[&Edge],
    decl: Option<&WorkloadSpec>,
    opts: &RecommendOptions,
) -> RecommendedPolicy {
    let mut seen = EdgeStats::default();
    let mut left_out: BTreeMap<LeftOutKey, Rows> = BTreeMap::new();
    // (identity, whether the rule carries methods and paths) → requests.
    let mut groups: BTreeMap<(SpiffeId, bool), Group> = BTreeMap::new();
    for e in edges {
        seen.merge(&e.stats);
        let k = &e.key;
        let reason = if !k.verdict.is_allow() {
            Some(LeftOutReason::Denied {
                policy: k.policy.clone(),
                rule: k.rule.clone(),
                would_allow: k.verdict == EdgeVerdict::DenyWouldAllow,
            })
        } else {
            match &k.source_identity {
                None => Some(LeftOutReason::NoIdentity),
                Some(_) if k.port == 0 => Some(LeftOutReason::Unwritable("port 0".into())),
                Some(_) => None,
            }
        };
        let http = k.protocol.is_http() && http_conditions(dest, decl, k.port).is_ok();
        let reason = reason.or_else(|| {
            http.then(|| unwritable_http(e))
                .flatten()
                .map(LeftOutReason::Unwritable)
        });
        if let Some(reason) = reason {
            let rows = left_out
                .entry((k.source_identity.clone(), k.source_workload.clone(), reason))
                .or_default();
            add(rows, e);
            continue;
        }
        let Some(identity) = k.source_identity.clone() else {
            continue; // unreachable: an edge without an identity was left out above
        };
        let g = groups.entry((identity, http)).or_default();
        g.ports.insert(k.port);
        g.seen.merge(&e.stats);
        add(&mut g.evidence, e);
        if http {
            // Canonical already (`unwritable_http` left out the others); a template recorded
            // before sidecars canonicalised paths (`/%61dmin/*`) is written as they see it.
            g.methods.extend(
                k.method
                    .clone()
                    .and_then(|m| Method::try_from(m).ok())
                    .map(|m| m.as_str().to_string()),
            );
            g.templates.extend(
                k.path
                    .as_deref()
                    .and_then(|p| canonical::path(p).ok())
                    .map(|p| p.into_owned()),
            );
        } else if k.protocol.is_http()
            && let Err(why) = http_conditions(dest, decl, k.port)
        {
            g.notes
                .insert(format!("methods and paths not written: {why}"));
        }
    }
    let identities_with_http: BTreeSet<&SpiffeId> = groups
        .keys()
        .filter(|(_, http)| *http)
        .map(|(id, _)| id)
        .collect();
    let mut taken = BTreeSet::new();
    let mut rules = Vec::new();
    for ((identity, http), g) in &groups {
        let mut base = rule_base(identity, dest.namespace.as_str());
        if !http && identities_with_http.contains(identity) {
            base.push_str("-ports");
        }
        let id = IdentityPattern::Exact(identity.clone());
        let mut evidence: Vec<Observed> = g.evidence.values().cloned().collect();
        evidence.sort_by_key(|o| std::cmp::Reverse(o.stats.count));
        let would_deny: u64 = evidence.iter().map(|o| o.would_deny).sum();
        let mut notes: Vec<String> = g.notes.iter().cloned().collect();
        if would_deny > 0 {
            notes.push(format!(
                "{would_deny} of these requests would be denied by an audit-mode policy today"
            ));
        }
        rules.push(RecommendedRule {
            name: unique_name(&base, "", &mut taken),
            identity: id,
            ports: g.ports.iter().copied().collect(),
            methods: if *http {
                g.methods
                    .iter()
                    .filter_map(|m| Method::try_from(m.clone()).ok())
                    .collect()
            } else {
                Vec::new()
            },
            paths: if *http {
                generalise_with(&g.templates, opts.max_children)
                    .into_iter()
                    .filter_map(|p| PathPattern::try_from(p).ok())
                    .collect()
            } else {
                Vec::new()
            },
            seen: g.seen,
            evidence,
            notes,
        });
    }
    rules.sort_by(|a, b| a.name.cmp(&b.name));
    let left_out = left_out
        .into_iter()
        .flat_map(|((source_identity, source_workload, reason), rows)| {
            rows.into_values().map(move |observed| LeftOut {
                source_identity: source_identity.clone(),
                source_workload: source_workload.clone(),
                observed,
                reason: reason.clone(),
            })
        })
        .collect();
    RecommendedPolicy {
        namespace,
        workload,
        name,
        rules,
        left_out,
        seen,
    }
}

/// `from-<sa>` for `spiffe://td/ns/<same namespace>/sa/<sa>`, `from-<ns>-<sa>` for another
/// namespace, `from-<path>` for any other layout.
fn rule_base(identity: &SpiffeId, namespace: &str) -> String {
    let who = match (identity.namespace(), identity.service_account()) {
        (Some(ns), Some(sa)) if ns == namespace => sa.to_string(),
        (Some(ns), Some(sa)) => format!("{ns}-{sa}"),
        _ => identity.segments().collect::<Vec<_>>().join("-"),
    };
    format!("from-{}", sanitize_name(&who))
}

/// Lower case letters, digits and single dashes, never empty.
fn sanitize_name(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-');
    if out.is_empty() {
        "caller".into()
    } else {
        out.into()
    }
}

/// `<base>[-<n>][-<suffix>]`, cut to 63 characters, not yet in `taken`.
fn unique_name(base: &str, suffix: &str, taken: &mut BTreeSet<String>) -> Name {
    let base = sanitize_name(base);
    let mut n = 1usize;
    loop {
        let counter = if n == 1 {
            String::new()
        } else {
            format!("-{n}")
        };
        let tail = if suffix.is_empty() {
            counter
        } else {
            format!("{counter}-{suffix}")
        };
        let room = MAX_NAME.saturating_sub(tail.len()).max(1);
        let head: String = base.chars().take(room).collect();
        let candidate = format!("{}{tail}", head.trim_end_matches('-'));
        if !taken.contains(&candidate)
            && let Ok(name) = Name::try_from(candidate.clone())
        {
            taken.insert(candidate);
            return name;
        }
        n += 1;
    }
}

/// Text from edges goes into YAML comments: no line breaks or other control characters.
pub(crate) fn sanitize_comment(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl Recommendation {
    /// Every namespace with a recommended posture or policy, in order.
    fn namespaces(&self) -> BTreeSet<&Name> {
        self.policies
            .iter()
            .map(|p| &p.namespace)
            .chain(self.postures.iter().map(|p| &p.namespace))
            .collect()
    }

    /// The recommended resources, as the YAML of [`Recommendation::to_yaml`] parses: for each
    /// namespace its posture, then its policies that have rules.
    pub fn resources(&self) -> Vec<Resource> {
        let mut out = Vec::new();
        for ns in self.namespaces() {
            for p in self.postures.iter().filter(|p| &p.namespace == ns) {
                out.push(p.resource());
            }
            for p in self
                .policies
                .iter()
                .filter(|p| &p.namespace == ns && !p.rules.is_empty())
            {
                out.push(p.resource());
            }
        }
        out
    }
}

fn document<S>(kind: &str, name: &Name, namespace: &Name, spec: S) -> Document<S> {
    Document {
        api_version: Located::new(bulkhead_policy::API_VERSION.to_string()),
        kind: Located::new(kind.to_string()),
        metadata: Metadata {
            name: Located::new(name.clone()),
            namespace: Some(Located::new(namespace.clone())),
            labels: BTreeMap::new(),
        },
        spec,
    }
}

impl RecommendedPosture {
    pub fn name(&self) -> Name {
        // POSTURE_NAME is a constant valid name; a test parses it.
        Name::try_from(POSTURE_NAME.to_string()).expect("POSTURE_NAME is a valid name")
    }

    pub fn resource(&self) -> Resource {
        Resource::DefaultPosture(document(
            "DefaultPosture",
            &self.name(),
            &self.namespace,
            DefaultPostureSpec {
                ingress: Some(Action::Deny),
                egress: None,
                mode: Mode::Audit,
            },
        ))
    }
}

impl RecommendedPolicy {
    pub fn resource(&self) -> Resource {
        Resource::AuthorizationPolicy(document(
            "AuthorizationPolicy",
            &self.name,
            &self.namespace,
            AuthorizationPolicySpec {
                selector: Selector {
                    workload: Some(Located::new(self.workload.clone())),
                    match_labels: Located::new(BTreeMap::new()),
                },
                direction: Direction::Ingress,
                action: Action::Allow,
                mode: Mode::Audit,
                rules: self.rules.iter().map(|r| Located::new(r.rule())).collect(),
            },
        ))
    }
}

impl RecommendedRule {
    pub fn rule(&self) -> Rule {
        Rule {
            name: Some(Located::new(self.name.clone())),
            from: Some(Located::new(Source {
                identities: vec![self.identity.clone()],
                ..Source::default()
            })),
            to: Some(Located::new(Target {
                ports: self
                    .ports
                    .iter()
                    .map(|&p| PortRange { first: p, last: p })
                    .collect(),
                methods: self.methods.clone(),
                paths: self.paths.clone(),
                ..Target::default()
            })),
            when: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
