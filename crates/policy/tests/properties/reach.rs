//! Reachability never misses an edge: whenever a concrete request between two declared
//! workloads is allowed by the source's egress decision and the destination's ingress
//! decision, the analysis reports that edge. Checked for the enforced view, the staged view
//! (against the audit outcomes) and the bypassed-egress assumption (against ingress alone),
//! on every request of the alphabet.

use super::*;
use bulkhead_policy::{Decision, PolicyView, ReachOptions, SourceEgress, can_reach};
use std::collections::BTreeSet;

/// The addresses the reach sets declare: w2 declares none, so its address is unknown.
const ADDRESSES: [Option<&str>; 3] = [Some("10.0.0.1"), Some("10.1.2.3"), None];

/// An egress allow or deny policy: each rule names one destination workload.
#[derive(Clone, Debug)]
struct EgressPolicy {
    selector: Sel,
    action: Action,
    audit: bool,
    rules: Vec<(usize, Option<To>, Vec<HeaderCond>)>,
}

#[derive(Clone, Debug)]
struct ReachSet {
    /// Ingress policies; their postures are replaced by `ingress`/`egress` below.
    ingress_policies: Vec<GenPolicy>,
    egress_policies: Vec<EgressPolicy>,
    ingress: Option<Action>,
    egress: Option<Action>,
    /// Audit postures for `shop`.
    audit_ingress: Option<Action>,
    audit_egress: Option<Action>,
}

#[derive(Clone, Copy, Debug)]
struct ReachRequest {
    from: usize,
    to: usize,
    port: usize,
    /// Used when `from` declares no address.
    ip: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    header: Option<&'static str>,
}

/// Mostly allow: edges need allow rules on both sides.
fn mostly_allow() -> impl Strategy<Value = Action> {
    prop_oneof![3 => Just(Action::Allow), 1 => Just(Action::Deny)]
}

/// Operations more often than in the other properties: the proofs about them are what
/// this property checks.
fn operation_strategy() -> impl Strategy<Value = To> {
    let idx = |n: usize, max: usize, p: f64| some_of(&(0..n).collect::<Vec<_>>(), max, p);
    (
        idx(PORT_SPECS.len(), 2, 0.2),
        some_of(&RULE_METHODS, 2, 0.6),
        some_of(&RULE_METHODS, 1, 0.2),
        some_of(&PATH_PATTERNS, 2, 0.6),
        some_of(&PATH_PATTERNS, 2, 0.25),
    )
        .prop_map(|(ports, methods, not_methods, paths, not_paths)| To {
            ports,
            methods,
            not_methods,
            paths,
            not_paths,
            ..To::default()
        })
}

fn headers() -> impl Strategy<Value = Vec<HeaderCond>> {
    prop::option::weighted(0.3, header_strategy()).prop_map(|h| h.into_iter().collect())
}

fn ingress_policy_strategy() -> impl Strategy<Value = GenPolicy> {
    let rule = (
        any::<bool>(),
        prop::option::weighted(0.6, from_strategy()),
        prop::option::weighted(0.9, operation_strategy()),
        headers(),
    )
        .prop_map(|(named, from, to, when)| GenRule {
            named,
            from,
            to,
            when,
        });
    (
        selector_strategy(),
        mostly_allow(),
        prop::bool::weighted(0.3),
        prop::collection::vec(rule, 0..=3),
    )
        .prop_map(|(selector, action, audit, rules)| GenPolicy {
            selector,
            action,
            audit,
            explicit_defaults: false,
            rules,
        })
}

fn egress_policy_strategy() -> impl Strategy<Value = EgressPolicy> {
    let rule = (
        0..WORKLOADS.len(),
        prop::option::weighted(0.9, operation_strategy()),
        headers(),
    );
    (
        selector_strategy(),
        mostly_allow(),
        prop::bool::weighted(0.3),
        prop::collection::vec(rule, 0..=3),
    )
        .prop_map(|(selector, action, audit, rules)| EgressPolicy {
            selector,
            action,
            audit,
            rules,
        })
}

fn reach_set_strategy() -> impl Strategy<Value = ReachSet> {
    // Mostly deny postures, so that edges depend on rules and their operations.
    let posture = || {
        prop_oneof![
            3 => Just(Some(Action::Deny)),
            1 => Just(Some(Action::Allow)),
            1 => Just(None),
        ]
    };
    (
        prop::collection::vec(ingress_policy_strategy(), 1..=5),
        prop::collection::vec(egress_policy_strategy(), 1..=4),
        posture(),
        posture(),
        prop::option::weighted(0.3, action()),
        prop::option::weighted(0.3, action()),
    )
        .prop_map(
            |(ingress_policies, egress_policies, ingress, egress, audit_ingress, audit_egress)| {
                ReachSet {
                    ingress_policies,
                    egress_policies,
                    ingress,
                    egress,
                    audit_ingress,
                    audit_egress,
                }
            },
        )
}

/// Every request of the alphabet between declared workloads; every source address for the
/// workload that declares none.
fn all_requests() -> Vec<ReachRequest> {
    let mut out = Vec::new();
    let headers: Vec<Option<&'static str>> = std::iter::once(None)
        .chain(REQUEST_HEADER_VALUES.iter().copied().map(Some))
        .collect();
    for (from, address) in ADDRESSES.iter().enumerate() {
        let ips: Vec<Option<&'static str>> = match address {
            Some(_) => vec![None],
            None => std::iter::once(None)
                .chain(IPS.iter().copied().map(Some))
                .collect(),
        };
        for to in 0..WORKLOADS.len() {
            for port in 0..DECLARED_PORTS.len() {
                for &ip in &ips {
                    for method in REQUEST_METHODS {
                        for path in REQUEST_PATHS {
                            for &header in &headers {
                                out.push(ReachRequest {
                                    from,
                                    to,
                                    port,
                                    ip,
                                    method,
                                    path,
                                    header,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn posture_doc(name: &str, ingress: Option<Action>, egress: Option<Action>, audit: bool) -> String {
    let mut spec = Vec::new();
    if let Some(a) = ingress {
        spec.push(format!("ingress: {}", action_word(a)));
    }
    if let Some(a) = egress {
        spec.push(format!("egress: {}", action_word(a)));
    }
    if audit {
        spec.push("mode: audit".to_string());
    }
    format!(
        "{API}\nkind: DefaultPosture\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{{}}}\n",
        spec.join(", ")
    )
}

fn egress_yaml(name: &str, p: &EgressPolicy) -> String {
    let mut out = format!(
        "{API}\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  direction: egress\n"
    );
    match &p.selector {
        Sel::Workload(w) => {
            let _ = writeln!(out, "  selector: {{workload: {}}}", WORKLOADS[*w].0);
        }
        Sel::Labels(l) => {
            let (k, v) = SELECTOR_LABELS[*l];
            let _ = writeln!(out, "  selector: {{matchLabels: {{{k}: {}}}}}", q(v));
        }
        Sel::All => {}
    }
    let _ = writeln!(out, "  action: {}", action_word(p.action));
    if p.audit {
        out.push_str("  mode: audit\n");
    }
    if p.rules.is_empty() {
        out.push_str("  rules: []\n");
        return out;
    }
    out.push_str("  rules:\n");
    for (n, (dest, to, when)) in p.rules.iter().enumerate() {
        let rule = GenRule {
            named: true,
            from: None,
            to: Some(to.clone().unwrap_or_default()),
            when: when.clone(),
        };
        let mut text = String::new();
        rule_yaml(&rule, &format!("r{n}"), &mut text);
        // The destination goes first in `to:`.
        let dest_line = format!("\n      to:\n        workloads: [{}]", WORKLOADS[*dest].0);
        let text = match text.find("\n      to: {}") {
            Some(_) => text.replacen("\n      to: {}", &dest_line, 1),
            None => text.replacen("\n      to:", &dest_line, 1),
        };
        out.push_str(&text);
    }
    out
}

fn reach_yaml(set: &ReachSet) -> String {
    let mut docs: Vec<String> = (0..WORKLOADS.len())
        .map(|i| match ADDRESSES[i] {
            Some(a) => workload_yaml(i) + &format!("  addresses: [{a}]\n"),
            None => workload_yaml(i),
        })
        .collect();
    docs.push(posture_doc("posture", set.ingress, set.egress, false));
    docs.push(posture_doc(
        "staged",
        set.audit_ingress,
        set.audit_egress,
        true,
    ));
    for (i, p) in set.ingress_policies.iter().enumerate() {
        docs.push(policy_yaml(&format!("in{i}"), p));
    }
    for (i, p) in set.egress_policies.iter().enumerate() {
        docs.push(egress_yaml(&format!("out{i}"), p));
    }
    docs.join("---\n")
}

fn name(i: usize) -> ResourceName {
    ResourceName {
        namespace: "shop".into(),
        name: WORKLOADS[i].0.into(),
    }
}

fn identity(i: usize) -> String {
    format!("spiffe://td/ns/shop/sa/{}", WORKLOADS[i].0)
}

/// The ingress decision at `to` and the egress decisions at `from` (destination known by
/// name, and by identity only).
fn decide(set: &PolicySet, r: &ReachRequest) -> (Decision, [Decision; 2]) {
    let (from, to) = (name(r.from), name(r.to));
    let (from_id, to_id) = (identity(r.from), identity(r.to));
    let headers: Vec<(String, String)> = r
        .header
        .iter()
        .map(|v| ("x-env".to_string(), v.to_string()))
        .collect();
    let (port, protocol) = DECLARED_PORTS[r.port];
    let http = Some(Http {
        method: r.method,
        path: r.path,
        host: None,
        headers: &headers,
    });
    let ip = |a: Option<&str>| a.map(|i| i.parse().expect("ip"));
    let ingress = set.evaluate(&Request {
        direction: Direction::Ingress,
        subject: &to,
        peer: Peer {
            identity: Some(&from_id),
            ip: ip(ADDRESSES[r.from].or(r.ip)),
            workload: None,
        },
        port,
        protocol,
        http,
    });
    let egress = |workload: Option<&ResourceName>| {
        set.evaluate(&Request {
            direction: Direction::Egress,
            subject: &from,
            peer: Peer {
                identity: Some(&to_id),
                ip: ip(ADDRESSES[r.to]),
                workload,
            },
            port,
            protocol,
            http,
        })
    };
    (ingress, [egress(Some(&to)), egress(None)])
}

fn staged_allows(d: &Decision) -> bool {
    d.audit.as_ref().map(|a| a.verdict).unwrap_or(d.verdict) == Verdict::Allow
}

fn edges(
    set: &PolicySet,
    view: PolicyView,
    egress: SourceEgress,
) -> BTreeSet<(String, String, u16)> {
    can_reach(set, ReachOptions { view, egress })
        .into_iter()
        .map(|e| (e.from.to_string(), e.to.to_string(), e.port))
        .collect()
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn reachability_never_misses_an_edge(set in reach_set_strategy()) {
        let reqs = all_requests();
        let text = reach_yaml(&set);
        let (_, compiled) = compile_yaml(&text)?;
        let enforced = edges(&compiled, PolicyView::Enforced, SourceEgress::Enforced);
        let staged = edges(&compiled, PolicyView::Staged, SourceEgress::Enforced);
        let bypassed = edges(&compiled, PolicyView::Enforced, SourceEgress::Bypassed);
        prop_assert!(enforced.is_subset(&bypassed), "{text}");
        for r in &reqs {
            let (ingress, egress) = decide(&compiled, r);
            let edge = (name(r.from).to_string(), name(r.to).to_string(), DECLARED_PORTS[r.port].0);
            for e in &egress {
                if ingress.is_allow() && e.is_allow() {
                    prop_assert!(enforced.contains(&edge), "{r:?}: {ingress} / {e}\n{text}");
                }
                if staged_allows(&ingress) && staged_allows(e) {
                    prop_assert!(staged.contains(&edge), "staged {r:?}: {ingress} / {e}\n{text}");
                }
            }
            if ingress.is_allow() {
                prop_assert!(bypassed.contains(&edge), "bypassed {r:?}: {ingress}\n{text}");
            }
        }
    }
}
