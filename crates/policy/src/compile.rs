//! The typed compiler: checks a whole set of resources and builds the evaluation index.
//!
//! It refuses, with `file:line:column`, any rule an enforcement point could not enforce as
//! written (HTTP conditions on an opaque TCP port, gRPC conditions on a non-gRPC port, a
//! destination list in an ingress rule …). A set with any error is refused whole: a compile
//! error never widens what is allowed.

use crate::error::PolicyError;
use crate::eval::{
    CompiledRule, Cond, DeclaredWorkload, IdentitySet, PolicySet, Postures, Quantifier, RuleGroup,
    RuleList, SubjectRules, slot,
};
use crate::model::{
    Action, Direction, Document, Mode, Resource, ResourceName, Rule, Selector, WorkloadRef,
    WorkloadSpec,
};
use crate::pattern::IdentityPattern;
use crate::source::Origin;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

mod check;
use check::check_rule;

/// Collects errors with their locations.
struct Errors<'a> {
    list: Vec<PolicyError>,
    origins: &'a [Option<Origin>],
}

impl Errors<'_> {
    fn at(&mut self, res: usize, resource: &Resource, pos: Option<(u32, u32)>, message: String) {
        self.list
            .push(match self.origins.get(res).and_then(|o| o.as_ref()) {
                Some(origin) => PolicyError::Invalid {
                    location: origin.at(pos),
                    message,
                },
                None => PolicyError::Model {
                    resource: resource.key(),
                    message,
                },
            });
    }
}

struct Declared<'a> {
    workloads: BTreeMap<WorkloadRef, (&'a Document<WorkloadSpec>, usize)>,
    services: BTreeMap<ResourceName, &'a Document<crate::model::ServiceSpec>>,
}

impl PolicySet {
    /// Compiles resources that carry no source positions (from the wire or a store).
    pub fn compile(resources: &[Resource], revision: u64) -> Result<PolicySet, Vec<PolicyError>> {
        let origins = vec![None; resources.len()];
        compile(resources, &origins, revision)
    }

    /// Compiles parsed resources; errors point into their files.
    pub fn compile_parsed(
        parsed: &[(Resource, Origin)],
        revision: u64,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let resources: Vec<Resource> = parsed.iter().map(|(r, _)| r.clone()).collect();
        let origins: Vec<Option<Origin>> = parsed.iter().map(|(_, o)| Some(o.clone())).collect();
        compile(&resources, &origins, revision)
    }

    /// Compiles resources of which some came from files (`Some` origin) and some from a store.
    pub fn compile_with_origins(
        resources: &[Resource],
        origins: &[Option<Origin>],
        revision: u64,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        compile(resources, origins, revision)
    }
}

/// The resources a workload's proxy needs, and no more: the policies that protect it (either
/// direction), its own Workload declaration, the declarations those policies refer to
/// (caller labels, destination workloads and services), and the postures of the mesh and its
/// namespace. A proxy learns nothing else about the mesh.
pub fn relevant_to(resources: &[Resource], workload: &WorkloadRef) -> Vec<Resource> {
    Distribution::new(resources)
        .indices_for(workload)
        .into_iter()
        .map(|i| resources[i].clone())
        .collect()
}

/// Precomputed once per resource set, it answers [`relevant_to`] for any workload in time
/// proportional to what that workload receives, not to the size of the mesh.
#[derive(Debug, Default)]
pub struct Distribution {
    /// Policy indices by the workloads they select.
    policies_by_subject: HashMap<WorkloadRef, Vec<usize>>,
    /// For each policy index: the declarations (resource indices) it refers to.
    refs: HashMap<usize, Vec<usize>>,
    declarations: HashMap<WorkloadRef, usize>,
    /// Enforced and audit DefaultPostures alike: a proxy needs both to report audit outcomes.
    mesh_postures: Vec<usize>,
    namespace_postures: HashMap<String, Vec<usize>>,
}

impl Distribution {
    pub fn new(resources: &[Resource]) -> Distribution {
        let mut errors = Errors {
            list: Vec::new(),
            origins: &[],
        };
        let declared = declarations(resources, &mut errors);
        let index_of: HashMap<String, usize> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| (r.key(), i))
            .collect();
        let decl_index =
            |kind: &str, name: &ResourceName| index_of.get(&format!("{kind}/{name}")).copied();
        let mut d = Distribution::default();
        for (i, r) in resources.iter().enumerate() {
            match r {
                Resource::Workload(_) => {
                    d.declarations.insert(r.name(), i);
                }
                Resource::DefaultPosture(doc) => match &doc.metadata.namespace {
                    None => d.mesh_postures.push(i),
                    Some(ns) => d
                        .namespace_postures
                        .entry(ns.value.to_string())
                        .or_default()
                        .push(i),
                },
                Resource::Service(_) => {}
                Resource::AuthorizationPolicy(doc) => {
                    let ns = r.name().namespace;
                    for subject in subjects_of(&doc.spec.selector, &ns, &declared) {
                        d.policies_by_subject.entry(subject).or_default().push(i);
                    }
                    let mut refs = Vec::new();
                    for rule in &doc.spec.rules {
                        if let Some(labels) = rule
                            .from
                            .as_ref()
                            .and_then(|f| f.value.workload_labels.as_ref())
                            .filter(|l| !l.is_empty())
                        {
                            for (name, (wdoc, _)) in &declared.workloads {
                                if labels_match(labels, &wdoc.metadata.labels) {
                                    refs.extend(decl_index("Workload", name));
                                }
                            }
                        }
                        if let Some(to) = &rule.to {
                            for w in &to.value.workloads {
                                refs.extend(decl_index("Workload", &workload_ref(&w.value, &ns)));
                            }
                            for s in &to.value.services {
                                let sref = workload_ref(&s.value, &ns);
                                refs.extend(decl_index("Service", &sref));
                                if let Some(svc) = declared.services.get(&sref) {
                                    for m in
                                        subjects_of(&svc.spec.selector, &sref.namespace, &declared)
                                    {
                                        refs.extend(decl_index("Workload", &m));
                                    }
                                }
                            }
                        }
                    }
                    d.refs.insert(i, refs);
                }
            }
        }
        d
    }

    /// Indices (in set order) of the resources `workload`'s proxy needs.
    pub fn indices_for(&self, workload: &WorkloadRef) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        out.extend(self.declarations.get(workload));
        out.extend(&self.mesh_postures);
        out.extend(
            self.namespace_postures
                .get(&workload.namespace)
                .map(|v| v.as_slice())
                .unwrap_or(&[]),
        );
        for &p in self
            .policies_by_subject
            .get(workload)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
        {
            out.push(p);
            out.extend(self.refs.get(&p).map(|v| v.as_slice()).unwrap_or(&[]));
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn compile(
    resources: &[Resource],
    origins: &[Option<Origin>],
    revision: u64,
) -> Result<PolicySet, Vec<PolicyError>> {
    let mut errors = Errors {
        list: Vec::new(),
        origins,
    };
    let mut seen = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        if let Some(first) = seen.insert(r.key(), i) {
            let earlier = match origins.get(first).and_then(|o| o.as_ref()) {
                Some(o) => format!(
                    "; first defined at {}",
                    o.at(resources[first].metadata().name.position())
                ),
                None => String::new(),
            };
            let message = format!("{} is defined twice{earlier}", r.key());
            errors.at(i, r, r.metadata().name.position(), message);
        }
    }
    let declared = declarations(resources, &mut errors);
    let postures = postures(resources, &mut errors);
    let identity_workloads = identity_index(&declared);

    // One group of rules per (direction, namespace, selector): every workload the selector
    // picks shares it, so a rule is compiled and stored once however many it protects.
    type GroupKey = (Direction, String, Option<String>, BTreeMap<String, String>);
    let mut group_of: HashMap<GroupKey, usize> = HashMap::new();
    let mut groups: Vec<(RuleGroup, Direction)> = Vec::new();
    let mut group_subjects: Vec<Vec<WorkloadRef>> = Vec::new();
    let mut order = 0u32;
    for (i, r) in resources.iter().enumerate() {
        let Resource::AuthorizationPolicy(doc) = r else {
            continue;
        };
        let name = Arc::new(r.name());
        let ns = name.namespace.clone();
        let sel = &doc.spec.selector;
        let key = (
            doc.spec.direction,
            ns.clone(),
            sel.workload.as_ref().map(|w| w.value.to_string()),
            sel.match_labels.value.clone(),
        );
        let gi = *group_of.entry(key).or_insert_with(|| {
            groups.push((RuleGroup::default(), doc.spec.direction));
            group_subjects.push(subjects_of(sel, &ns, &declared));
            groups.len() - 1
        });
        let targets = &group_subjects[gi];
        if doc.spec.selector.workload.is_some() && !doc.spec.selector.match_labels.is_empty() {
            errors.at(
                i,
                r,
                doc.metadata.name.position(),
                "selector: give workload or matchLabels, not both".into(),
            );
        }
        for (n, rule) in doc.spec.rules.iter().enumerate() {
            let rule_name: Arc<str> = match &rule.name {
                Some(n) => Arc::from(n.value.as_str()),
                None => Arc::from(format!("rules[{n}]").as_str()),
            };
            let before = errors.list.len();
            check_rule(
                i,
                r,
                &doc.spec,
                rule,
                &rule_name,
                targets,
                &ns,
                &declared,
                &mut errors,
            );
            if errors.list.len() > before {
                continue;
            }
            let compiled = CompiledRule {
                policy: name.clone(),
                name: rule_name,
                order,
                conds: conditions(rule, doc.spec.direction, doc.spec.action, &ns, &declared),
            };
            order = order.saturating_add(1);
            let group = &mut groups[gi].0;
            let set = match doc.spec.mode {
                Mode::Enforce => &mut group.enforce,
                Mode::Audit => &mut group.audit,
            };
            let list: &mut RuleList = match doc.spec.action {
                Action::Allow => &mut set.allow,
                Action::Deny => &mut set.deny,
            };
            list.push(compiled);
        }
        let mut names = HashSet::new();
        for rule in &doc.spec.rules {
            if let Some(n) = rule
                .name
                .as_ref()
                .filter(|n| !names.insert(n.value.as_str()))
            {
                errors.at(
                    i,
                    r,
                    n.position(),
                    format!(
                        "two rules are named {:?}; rule names must be unique in a policy",
                        n.value.as_str()
                    ),
                );
            }
        }
    }
    if !errors.list.is_empty() {
        return Err(errors.list);
    }
    let mut subjects: crate::eval::Map<WorkloadRef, [Option<SubjectRules>; 2]> =
        crate::eval::Map::default();
    for ((mut group, direction), members) in groups.into_iter().zip(group_subjects) {
        if group.len() == 0 {
            continue;
        }
        group.finish();
        let group = Arc::new(group);
        for subject in members {
            let entry = subjects.entry(subject).or_default()[slot(direction)]
                .get_or_insert_with(SubjectRules::default);
            entry.has_audit |= group.has_audit();
            entry.shared.push(group.clone());
        }
    }
    // A group only one workload holds moves inline (no reference count, one load less).
    for rules in subjects.values_mut().flatten().flatten() {
        if rules.shared.len() == 1
            && let Some(only) = rules.shared.pop()
        {
            match Arc::try_unwrap(only) {
                Ok(group) => rules.own = Some(group),
                Err(shared) => rules.shared.push(shared),
            }
        }
    }
    let declared = declared
        .workloads
        .iter()
        .filter_map(|(name, (doc, _))| {
            let workload = DeclaredWorkload {
                identity: doc.spec.exact_identity()?.to_string(),
                ports: doc.spec.port_protocols(),
                addresses: doc.spec.addresses.iter().map(|a| a.value).collect(),
            };
            Some((name.clone(), workload))
        })
        .collect();
    Ok(PolicySet {
        revision,
        subjects,
        postures,
        identity_workloads,
        declared,
    })
}

fn declarations<'a>(resources: &'a [Resource], errors: &mut Errors<'_>) -> Declared<'a> {
    let mut workloads = BTreeMap::new();
    let mut services = BTreeMap::new();
    let mut addresses: HashMap<core::net::IpAddr, ResourceName> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        match r {
            Resource::Workload(doc) => {
                for a in &doc.spec.addresses {
                    if let core::net::IpAddr::V6(v6) = a.value
                        && let Some(v4) = v6.to_ipv4_mapped()
                    {
                        errors.at(i, r, a.position(), format!(
                            "address {v6} is an IPv4-mapped IPv6 address; declare the IPv4 address {v4} (sidecars unmap such addresses before looking them up)"
                        ));
                    }
                    if let Some(other) = addresses.insert(a.value, r.name()) {
                        errors.at(
                            i,
                            r,
                            a.position(),
                            format!(
                                "address {} is already declared by Workload/{other}; an address belongs to one workload",
                                a.value
                            ),
                        );
                    }
                }
                if !matches!(doc.spec.identity.value, IdentityPattern::Exact(_)) {
                    errors.at(
                        i,
                        r,
                        doc.spec.identity.position(),
                        format!(
                            "a workload's identity must be one exact SPIFFE ID, not the pattern {}",
                            doc.spec.identity.value
                        ),
                    );
                }
                let mut ports = HashSet::new();
                for p in &doc.spec.ports {
                    if p.port.value == 0 || !ports.insert(p.port.value) {
                        errors.at(
                            i,
                            r,
                            p.port.position(),
                            format!("port {} is zero or declared twice", p.port.value),
                        );
                    }
                }
                workloads.insert(r.name(), (doc, i));
            }
            Resource::Service(doc) => {
                services.insert(r.name(), doc);
            }
            _ => {}
        }
    }
    Declared {
        workloads,
        services,
    }
}

/// One enforced and one audit DefaultPosture per scope (a namespace, or the mesh).
fn postures(resources: &[Resource], errors: &mut Errors<'_>) -> Postures {
    let mut p = Postures::default();
    // The resource index of the posture already in each (scope, mode) slot.
    let mut first: HashMap<(String, Mode), usize> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        let Resource::DefaultPosture(doc) = r else {
            continue;
        };
        let name = Arc::new(r.name());
        let scope = match &doc.metadata.namespace {
            None => &mut p.mesh,
            Some(ns) => p.namespaces.entry(ns.value.to_string()).or_default(),
        };
        let slot = match doc.spec.mode {
            Mode::Enforce => &mut scope.enforce,
            Mode::Audit => &mut scope.audit,
        };
        if let Some(&earlier) = first.get(&(name.namespace.clone(), doc.spec.mode)) {
            let scope_word = match name.namespace.as_str() {
                "*" => "the mesh".to_string(),
                ns => format!("namespace {ns}"),
            };
            let mode_word = match doc.spec.mode {
                Mode::Enforce => "",
                Mode::Audit => "audit ",
            };
            let earlier_at = match errors.origins.get(earlier).and_then(|o| o.as_ref()) {
                Some(o) => format!(
                    ", at {}",
                    o.at(resources[earlier].metadata().name.position())
                ),
                None => String::new(),
            };
            errors.at(i, r, doc.metadata.name.position(), format!(
                "a second {mode_word}DefaultPosture for {scope_word} (the first is {}{earlier_at}); there can be one enforced and one audit (mode: audit) DefaultPosture per namespace and for the mesh",
                resources[earlier].key()
            ));
        } else {
            first.insert((name.namespace.clone(), doc.spec.mode), i);
        }
        *slot = Some((name, doc.spec.ingress, doc.spec.egress));
    }
    p
}

/// Which declared workloads carry each identity.
fn identity_index(declared: &Declared<'_>) -> crate::eval::Map<String, Vec<WorkloadRef>> {
    let mut map: crate::eval::Map<String, Vec<WorkloadRef>> = crate::eval::Map::default();
    for (name, (doc, _)) in &declared.workloads {
        if let Some(id) = doc.spec.exact_identity() {
            map.entry(id.to_string()).or_default().push(name.clone());
        }
    }
    map
}

fn labels_match(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The workloads a selector picks in namespace `ns`.
fn subjects_of(sel: &Selector, ns: &str, declared: &Declared<'_>) -> Vec<WorkloadRef> {
    if let Some(w) = &sel.workload {
        return vec![ResourceName {
            namespace: ns.to_string(),
            name: w.value.to_string(),
        }];
    }
    declared
        .workloads
        .iter()
        .filter(|(name, (doc, _))| {
            name.namespace == ns && labels_match(&sel.match_labels, &doc.metadata.labels)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// `name` or `namespace/name`, relative to `ns`.
fn workload_ref(s: &str, ns: &str) -> ResourceName {
    match s.split_once('/') {
        Some((n, w)) => ResourceName {
            namespace: n.into(),
            name: w.into(),
        },
        None => ResourceName {
            namespace: ns.into(),
            name: s.into(),
        },
    }
}

/// Builds the rule's conditions in explanation order.
fn conditions(
    rule: &Rule,
    direction: Direction,
    action: Action,
    ns: &str,
    declared: &Declared<'_>,
) -> Vec<Cond> {
    // How a repeated header is read: every value must satisfy an allow rule's condition,
    // any value a deny rule's.
    let quantifier = match action {
        Action::Allow => Quantifier::Every,
        Action::Deny => Quantifier::Any,
    };
    let mut conds = Vec::new();
    if let Some(from) = &rule.from {
        let f = &from.value;
        if !f.identities.is_empty() || !f.not_identities.is_empty() {
            conds.push(Cond::Identity(
                IdentitySet::new(&f.identities),
                IdentitySet::new(&f.not_identities),
            ));
        }
        if !f.namespaces.is_empty() || !f.not_namespaces.is_empty() {
            conds.push(Cond::Namespace(
                names(&f.namespaces),
                names(&f.not_namespaces),
            ));
        }
        if let Some(labels) = &f.workload_labels {
            let ids: Vec<IdentityPattern> = declared
                .workloads
                .values()
                .filter(|(doc, _)| labels_match(labels, &doc.metadata.labels))
                .map(|(doc, _)| doc.spec.identity.value.clone())
                .collect();
            conds.push(Cond::SourceWorkload(IdentitySet::new(&ids)));
        }
        if !f.cidrs.is_empty() || !f.not_cidrs.is_empty() {
            conds.push(Cond::Cidr(f.cidrs.clone(), f.not_cidrs.clone()));
        }
    }
    if let Some(to) = &rule.to {
        let t = &to.value;
        if direction == Direction::Egress {
            if !t.identities.is_empty() {
                conds.push(Cond::Identity(
                    IdentitySet::new(&t.identities),
                    IdentitySet::default(),
                ));
            }
            let mut dests: crate::eval::Set<WorkloadRef> = t
                .workloads
                .iter()
                .map(|w| workload_ref(&w.value, ns))
                .collect();
            for s in &t.services {
                let sref = workload_ref(&s.value, ns);
                if let Some(svc) = declared.services.get(&sref) {
                    dests.extend(subjects_of(&svc.spec.selector, &sref.namespace, declared));
                }
            }
            if !t.workloads.is_empty() || !t.services.is_empty() {
                conds.push(Cond::DestWorkload(dests));
            }
            if !t.namespaces.is_empty() {
                conds.push(Cond::Namespace(names(&t.namespaces), Vec::new()));
            }
            if !t.cidrs.is_empty() || !t.not_cidrs.is_empty() {
                conds.push(Cond::Cidr(t.cidrs.clone(), t.not_cidrs.clone()));
            }
        }
        if !t.ports.is_empty() || !t.not_ports.is_empty() {
            conds.push(Cond::Port(t.ports.clone(), t.not_ports.clone()));
        }
        if !t.protocols.is_empty() {
            conds.push(Cond::Protocol(t.protocols.clone()));
        }
        if !t.methods.is_empty() || !t.not_methods.is_empty() {
            conds.push(Cond::Method(t.methods.clone(), t.not_methods.clone()));
        }
        if !t.paths.is_empty() || !t.not_paths.is_empty() {
            conds.push(Cond::Path(t.paths.clone(), t.not_paths.clone()));
        }
        if !t.hosts.is_empty() || !t.not_hosts.is_empty() {
            conds.push(Cond::Host(t.hosts.clone(), t.not_hosts.clone()));
        }
        if let Some(g) = &t.grpc {
            conds.push(Cond::Grpc(
                g.services.iter().map(|s| s.as_str().to_string()).collect(),
                g.methods.iter().map(|s| s.as_str().to_string()).collect(),
            ));
        }
    }
    for w in &rule.when {
        conds.push(Cond::Header(w.value.clone(), quantifier));
    }
    conds
}

fn names(v: &[crate::model::Name]) -> Vec<String> {
    v.iter().map(|n| n.as_str().to_string()).collect()
}
