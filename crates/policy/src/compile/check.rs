//! The checks of one rule: what an enforcement point could not enforce as written, and caller
//! selectors that would silently name everyone. Each error names its `file:line:column`; a
//! check never changes the rule, it only refuses it.

use super::{Declared, Errors, subjects_of, workload_ref};
use crate::located::Located;
use crate::model::{
    AuthorizationPolicySpec, Direction, Resource, ResourceName, Rule, Source, Target, WorkloadRef,
};
use crate::pattern::Protocol;

/// The HTTP-only conditions a rule uses, by field name.
fn l7_fields(rule: &Rule) -> Vec<&'static str> {
    let mut out = Vec::new();
    if let Some(to) = &rule.to {
        let t = &to.value;
        for (set, name) in [
            (
                !t.methods.is_empty() || !t.not_methods.is_empty(),
                "methods",
            ),
            (!t.paths.is_empty() || !t.not_paths.is_empty(), "paths"),
            (!t.hosts.is_empty() || !t.not_hosts.is_empty(), "hosts"),
            (t.grpc.is_some(), "grpc"),
        ] {
            if set {
                out.push(name);
            }
        }
    }
    if !rule.when.is_empty() {
        out.push("when (headers)");
    }
    out
}

#[allow(clippy::too_many_arguments)]
pub(super) fn check_rule(
    i: usize,
    r: &Resource,
    spec: &AuthorizationPolicySpec,
    rule: &Located<Rule>,
    rule_name: &str,
    subjects: &[WorkloadRef],
    ns: &str,
    declared: &Declared<'_>,
    errors: &mut Errors<'_>,
) {
    let policy = r.name();
    // A nameless rule is pointed at by its own position (its first key).
    let rule_pos = rule
        .name
        .as_ref()
        .and_then(|n| n.position())
        .or(rule.position());
    let to = rule.to.as_ref();
    let to_pos = to.and_then(|t| t.position()).or(rule_pos);
    let t = to.map(|t| &t.value);
    let dests_given = t.is_some_and(|t| {
        !t.identities.is_empty()
            || !t.workloads.is_empty()
            || !t.services.is_empty()
            || !t.namespaces.is_empty()
            || !t.cidrs.is_empty()
            || !t.not_cidrs.is_empty()
    });
    match spec.direction {
        Direction::Ingress if dests_given => errors.at(i, r, to_pos, format!(
            "policy {policy} rule {rule_name}: in an ingress rule the destination is the selected workload; `to` may give only ports, protocols, methods, paths, hosts and grpc (use direction: egress to restrict destinations)"
        )),
        Direction::Egress if rule.from.is_some() => errors.at(i, r, rule.from.as_ref().and_then(|f| f.position()), format!(
            "policy {policy} rule {rule_name}: an egress rule has no `from`; its source is the selected workload"
        )),
        _ => {}
    }
    let mapped_nets = rule
        .from
        .iter()
        .flat_map(|f| {
            f.value
                .cidrs
                .iter()
                .chain(&f.value.not_cidrs)
                .map(|n| (n, f.position()))
        })
        .chain(
            t.into_iter()
                .flat_map(|t| t.cidrs.iter().chain(&t.not_cidrs).map(|n| (n, to_pos))),
        );
    for (net, pos) in mapped_nets {
        if let Some(v4) = unmapped_net(net) {
            errors.at(i, r, pos.or(rule_pos), format!(
                "policy {policy} rule {rule_name}: {net} is an IPv4-mapped IPv6 network, which no address is compared with: IPv4-mapped addresses are unmapped before matching; write {v4}"
            ));
        }
    }
    if spec.direction == Direction::Ingress
        && let Some(from) = &rule.from
    {
        check_callers(i, r, &policy, rule_name, rule_pos, from, errors);
    }
    if let Some(t) = t {
        for s in &t.services {
            let name = workload_ref(&s.value, ns);
            if !declared.services.contains_key(&name) {
                errors.at(i, r, s.position(), format!("no Service {name} is declared"));
            }
        }
        for w in &t.workloads {
            let name = workload_ref(&w.value, ns);
            if !crate::is_valid_name(&name.namespace) || !crate::is_valid_name(&name.name) {
                errors.at(
                    i,
                    r,
                    w.position(),
                    format!(
                        "{:?} is not a workload name (name or namespace/name)",
                        w.value
                    ),
                );
            }
        }
    }

    // Type check: HTTP and gRPC conditions only where every port the rule covers speaks them.
    let l7 = l7_fields(rule);
    if l7.is_empty() {
        return;
    }
    let fields = l7.join(", ");
    let wants_grpc = t.is_some_and(|t| t.grpc.is_some());
    if t.is_some_and(|t| t.protocols.contains(&Protocol::Tcp)) {
        errors.at(i, r, to_pos, format!(
            "policy {policy} rule {rule_name} uses {fields} but limits itself to protocol tcp, where requests have no HTTP attributes"
        ));
        return;
    }
    // Which workloads' ports does this rule act on?
    let checked: Vec<WorkloadRef> = match spec.direction {
        Direction::Ingress => subjects.to_vec(),
        Direction::Egress => {
            let t = t.cloned().unwrap_or_else(Target::default);
            let mut dests: Vec<WorkloadRef> = t
                .workloads
                .iter()
                .map(|w| workload_ref(&w.value, ns))
                .collect();
            for s in &t.services {
                if let Some(svc) = declared.services.get(&workload_ref(&s.value, ns)) {
                    let sns = workload_ref(&s.value, ns).namespace;
                    dests.extend(subjects_of(&svc.spec.selector, &sns, declared));
                }
            }
            if dests.is_empty() {
                errors.at(i, r, to_pos, format!(
                    "policy {policy} rule {rule_name} uses {fields} in an egress rule without naming destination workloads or services; name them so the compiler can check their ports speak HTTP"
                ));
                return;
            }
            dests
        }
    };
    if checked.is_empty() && spec.direction == Direction::Ingress {
        errors.at(i, r, to_pos, format!(
            "policy {policy} rule {rule_name} uses {fields} but its selector matches no declared Workload; declare the workloads with their ports and protocols"
        ));
        return;
    }
    for w in checked {
        let Some((doc, _)) = declared.workloads.get(&w) else {
            errors.at(i, r, to_pos, format!(
                "policy {policy} rule {rule_name} uses {fields} on workload {w}, which has no Workload declaration; declare it with its ports and protocols so the rule can be checked"
            ));
            continue;
        };
        if doc.spec.ports.is_empty() {
            errors.at(i, r, to_pos, format!(
                "policy {policy} rule {rule_name} uses {fields} on workload {w}, whose Workload declares no ports; declare its ports and protocols so the rule can be checked"
            ));
            continue;
        }
        for p in &doc.spec.ports {
            let port = p.port.value;
            let covered = t.is_none_or(|t| {
                (t.ports.is_empty() || t.ports.iter().any(|r| r.contains(port)))
                    && !t.not_ports.iter().any(|r| r.contains(port))
                    && (t.protocols.is_empty() || t.protocols.contains(&p.protocol))
            });
            if !covered {
                continue;
            }
            if !p.protocol.is_http() {
                errors.at(i, r, to_pos, format!(
                    "policy {policy} rule {rule_name} uses {fields}, but it applies to port {port} of {w}, declared {} (opaque TCP), where they cannot be enforced; limit the rule with `ports:` to the workload's HTTP ports",
                    p.protocol.as_str()
                ));
            } else if wants_grpc && p.protocol != Protocol::Grpc {
                errors.at(i, r, to_pos, format!(
                    "policy {policy} rule {rule_name} uses grpc, but it applies to port {port} of {w}, declared {}; limit the rule with `ports:` to gRPC ports",
                    p.protocol.as_str()
                ));
            }
        }
    }
}

/// The IPv4 network an IPv4-mapped IPv6 network (inside `::ffff:0:0/96`) stands for.
fn unmapped_net(net: &ipnet::IpNet) -> Option<ipnet::Ipv4Net> {
    let ipnet::IpNet::V6(v6) = net else {
        return None;
    };
    let v4 = v6.network().to_ipv4_mapped()?;
    let len = v6.prefix_len().checked_sub(96)?;
    ipnet::Ipv4Net::new(v4, len).ok()
}

/// No silent wildcards: a caller selector that names nobody would match everybody, so it is
/// refused with what it would have meant and how to say the intended thing explicitly.
fn check_callers(
    i: usize,
    r: &Resource,
    policy: &ResourceName,
    rule_name: &str,
    rule_pos: Option<(u32, u32)>,
    from: &Located<Source>,
    errors: &mut Errors<'_>,
) {
    let f = &from.value;
    let ns = &policy.namespace;
    if let Some(labels) = f.workload_labels.as_ref().filter(|l| l.is_empty()) {
        errors.at(i, r, labels.position().or(from.position()).or(rule_pos), format!(
            "policy {policy} rule {rule_name}: `workloadLabels: {{}}` gives no label, so it would match every caller (any identity, declared or not, from any trust domain), not \"the workloads of this namespace\"; write the callers explicitly: `namespaces: [{ns}]` for callers whose identity is in namespace {ns}, `workloadLabels` with at least one label for declared workloads, or `identities: [\"*\"]` for any authenticated caller"
        ));
        return;
    }
    let names_someone = !f.identities.is_empty()
        || !f.not_identities.is_empty()
        || !f.namespaces.is_empty()
        || !f.not_namespaces.is_empty()
        || f.workload_labels.is_some()
        || !f.cidrs.is_empty()
        || !f.not_cidrs.is_empty();
    if !names_someone {
        errors.at(i, r, from.position().or(rule_pos), format!(
            "policy {policy} rule {rule_name}: `from` names no caller, so it would match every caller (authenticated or not, declared or not, from any trust domain); leave `from` out if the rule is meant for every caller, or name them: `identities: [\"*\"]` for any authenticated caller, `namespaces: [{ns}]` for callers of namespace {ns}, `workloadLabels: {{…}}` for declared workloads"
        ));
    }
}
