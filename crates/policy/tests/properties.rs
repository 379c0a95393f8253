//! Properties of the policy language, checked on random policy sets and requests.
//!
//! Policy sets are generated as YAML text over a small alphabet (three declared workloads in
//! namespace `shop`, a handful of identities, ports, methods, paths, header values) and read
//! with the real parser and compiler. Requests are drawn from the same alphabet, so rules
//! match often enough to be interesting.
//!
//! Besides the properties asked of the language (deny wins, default deny, monotonic allow and
//! deny, audit never decides, print/parse round trips), one test compares every verdict with a
//! small reference model written from the documented semantics.

use bulkhead_policy::model::{Action, Direction, Resource, ResourceName};
use bulkhead_policy::{Http, Peer, PolicySet, Protocol, Reason, Request, Verdict, parse_documents};
use proptest::prelude::*;
use proptest::sample::subsequence;
use std::fmt::Write as _;

#[path = "properties/paths.rs"]
mod paths;
#[path = "properties/reach.rs"]
mod reach;

const API: &str = "apiVersion: bulkhead.dev/v1alpha1";

// ---------------------------------------------------------------------------------------
// The alphabet.

/// Declared workloads of namespace `shop`: name and labels. Each is declared with HTTP ports.
const WORKLOADS: [(&str, [(&str, &str); 2]); 3] = [
    ("w0", [("app", "w0"), ("tier", "backend")]),
    ("w1", [("app", "w1"), ("tier", "backend")]),
    ("w2", [("app", "w2"), ("tier", "web")]),
];

/// The ports every workload declares, and the protocol requests on them use.
const DECLARED_PORTS: [(u16, Protocol); 3] = [
    (8080, Protocol::Http),
    (8081, Protocol::Http2),
    (9090, Protocol::Grpc),
];

/// Ports requests are sent to: the declared ones and one nobody declared.
const REQUEST_PORTS: [(u16, Protocol); 4] = [
    (8080, Protocol::Http),
    (8081, Protocol::Http2),
    (9090, Protocol::Grpc),
    (7000, Protocol::Http),
];

/// Caller identities a request may carry (or none).
const IDS: [&str; 5] = [
    "spiffe://td/ns/shop/sa/w0",
    "spiffe://td/ns/shop/sa/w1",
    "spiffe://td/ns/shop/sa/w2",
    "spiffe://td/ns/other/sa/x",
    "spiffe://evil/ns/shop/sa/w0",
];

/// Identity patterns rules may name.
const ID_PATTERNS: [&str; 7] = [
    "spiffe://td/ns/shop/sa/w0",
    "spiffe://td/ns/shop/sa/w1",
    "spiffe://td/ns/other/sa/x",
    "spiffe://evil/ns/shop/sa/w0",
    "spiffe://td/ns/shop/*",
    "spiffe://td/*",
    "*",
];

const NAMESPACES: [&str; 2] = ["shop", "other"];

/// Label pairs for selectors (each selects at least one workload).
const SELECTOR_LABELS: [(&str, &str); 3] = [("tier", "backend"), ("tier", "web"), ("app", "w1")];

/// Label pairs for `from.workloadLabels` (the last selects nobody).
const SOURCE_LABELS: [(&str, &str); 4] = [
    ("tier", "backend"),
    ("tier", "web"),
    ("app", "w1"),
    ("app", "nobody"),
];

/// Port entries as written in YAML, and the inclusive range each means.
const PORT_SPECS: [(&str, u16, u16); 5] = [
    ("8080", 8080, 8080),
    ("\"8080-8081\"", 8080, 8081),
    ("9090", 9090, 9090),
    ("\"7000-7999\"", 7000, 7999),
    ("\"8081\"", 8081, 8081),
];

const PROTOCOLS: [(&str, Protocol); 3] = [
    ("http", Protocol::Http),
    ("http2", Protocol::Http2),
    ("grpc", Protocol::Grpc),
];

const RULE_METHODS: [&str; 3] = ["GET", "POST", "DELETE"];
const REQUEST_METHODS: [&str; 4] = ["GET", "POST", "DELETE", "PUT"];

const PATH_PATTERNS: [&str; 5] = ["/a", "/a/*", "/a*", "/*/c", "/a/**/c"];
const REQUEST_PATHS: [&str; 7] = ["/", "/a", "/a/1", "/a/1/c", "/ab", "/x/c", "/a/c"];

/// Which request path each path pattern matches, worked out by hand from the documentation:
/// exact, prefix (`/a/*`, `/a*`), one segment (`*`), any number of segments (`**`).
fn path_matches(pattern: &str, path: &str) -> bool {
    let hits: &[&str] = match pattern {
        "/a" => &["/a"],
        "/a/*" => &["/a/1", "/a/1/c", "/a/c"],
        "/a*" => &["/a", "/a/1", "/a/1/c", "/ab", "/a/c"],
        "/*/c" => &["/x/c", "/a/c"],
        "/a/**/c" => &["/a/c", "/a/1/c"],
        other => panic!("no table for pattern {other}"),
    };
    hits.contains(&path)
}

const CIDRS: [&str; 3] = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"];
/// Caller addresses; the IPv4-mapped one is what a `[::]` listener reports for 10.1.2.3.
const IPS: [&str; 4] = ["10.0.0.1", "10.1.2.3", "192.168.1.1", "::ffff:10.1.2.3"];

fn cidr_contains(cidr: &str, ip: &str) -> bool {
    let hits: &[&str] = match cidr {
        "10.0.0.0/8" => &["10.0.0.1", "10.1.2.3", "::ffff:10.1.2.3"],
        "10.1.0.0/16" => &["10.1.2.3", "::ffff:10.1.2.3"],
        "192.168.0.0/16" => &["192.168.1.1"],
        other => panic!("no table for cidr {other}"),
    };
    hits.contains(&ip)
}

const HEADER_VALUES: [&str; 2] = ["prod", "dev"];
const REQUEST_HEADER_VALUES: [&str; 3] = ["prod", "dev", "PROD"];

/// Subjects requests are addressed to: the declared workloads, an undeclared one in the same
/// namespace, and one in another namespace.
const SUBJECTS: [(&str, &str); 5] = [
    ("shop", "w0"),
    ("shop", "w1"),
    ("shop", "w2"),
    ("shop", "ghost"),
    ("other", "w0"),
];

// ---------------------------------------------------------------------------------------
// Generated policy sets.

#[derive(Clone, Debug)]
enum Sel {
    Workload(usize),
    Labels(usize),
    All,
}

#[derive(Clone, Debug, Default)]
struct From {
    ids: Vec<&'static str>,
    not_ids: Vec<&'static str>,
    namespaces: Vec<&'static str>,
    not_namespaces: Vec<&'static str>,
    workload_labels: Option<usize>,
    cidrs: Vec<&'static str>,
    not_cidrs: Vec<&'static str>,
}

#[derive(Clone, Debug, Default)]
struct To {
    ports: Vec<usize>,
    not_ports: Vec<usize>,
    protocols: Vec<usize>,
    methods: Vec<&'static str>,
    not_methods: Vec<&'static str>,
    paths: Vec<&'static str>,
    not_paths: Vec<&'static str>,
}

#[derive(Clone, Debug)]
struct HeaderCond {
    values: Vec<&'static str>,
    not_values: Vec<&'static str>,
    present: Option<bool>,
}

#[derive(Clone, Debug)]
struct GenRule {
    named: bool,
    from: Option<From>,
    to: Option<To>,
    when: Vec<HeaderCond>,
}

#[derive(Clone, Debug)]
struct GenPolicy {
    selector: Sel,
    action: Action,
    audit: bool,
    /// Write `mode: enforce` / `direction: ingress` even though they are the defaults.
    explicit_defaults: bool,
    rules: Vec<GenRule>,
}

#[derive(Clone, Debug)]
struct Posture {
    /// For namespace `shop`, or (false) mesh-wide.
    namespaced: bool,
    ingress: Option<Action>,
}

#[derive(Clone, Debug)]
struct GenSet {
    posture: Option<Posture>,
    /// A DefaultPosture with `mode: audit`.
    audit_posture: Option<Posture>,
    policies: Vec<GenPolicy>,
}

#[derive(Clone, Debug)]
struct GenRequest {
    subject: usize,
    identity: Option<&'static str>,
    ip: Option<&'static str>,
    port: usize,
    method: &'static str,
    path: &'static str,
    /// The values of `x-env`, in order: none, one, or a repeated header.
    header: Vec<&'static str>,
}

/// Usually nothing; with probability `p`, one to `max` items of `items`. Keeping most fields
/// empty keeps rules short, so that they match a fair share of requests.
fn some_of<T: Clone + std::fmt::Debug + 'static>(
    items: &[T],
    max: usize,
    p: f64,
) -> impl Strategy<Value = Vec<T>> + use<T> {
    prop::option::weighted(p, subsequence(items.to_vec(), 1..=max.min(items.len())))
        .prop_map(Option::unwrap_or_default)
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny)]
}

fn from_strategy() -> impl Strategy<Value = From> {
    (
        some_of(&ID_PATTERNS, 2, 0.5),
        some_of(&ID_PATTERNS, 1, 0.2),
        some_of(&NAMESPACES, 1, 0.2),
        some_of(&NAMESPACES, 1, 0.15),
        prop::option::weighted(0.15, 0..SOURCE_LABELS.len()),
        // Address conditions are rarer: most requests carry no address.
        some_of(&CIDRS, 1, 0.1),
        some_of(&CIDRS, 1, 0.1),
    )
        .prop_map(
            |(ids, not_ids, namespaces, not_namespaces, workload_labels, cidrs, not_cidrs)| From {
                ids,
                not_ids,
                namespaces,
                not_namespaces,
                workload_labels,
                cidrs,
                not_cidrs,
            },
        )
}

fn to_strategy() -> impl Strategy<Value = To> {
    let idx = |n: usize, max: usize, p: f64| some_of(&(0..n).collect::<Vec<_>>(), max, p);
    (
        idx(PORT_SPECS.len(), 2, 0.3),
        idx(PORT_SPECS.len(), 1, 0.1),
        idx(PROTOCOLS.len(), 2, 0.15),
        some_of(&RULE_METHODS, 2, 0.4),
        some_of(&RULE_METHODS, 1, 0.15),
        some_of(&PATH_PATTERNS, 2, 0.4),
        some_of(&PATH_PATTERNS, 1, 0.15),
    )
        .prop_map(
            |(ports, not_ports, protocols, methods, not_methods, paths, not_paths)| To {
                ports,
                not_ports,
                protocols,
                methods,
                not_methods,
                paths,
                not_paths,
            },
        )
}

fn header_strategy() -> impl Strategy<Value = HeaderCond> {
    (
        some_of(&HEADER_VALUES, 2, 0.5),
        some_of(&HEADER_VALUES, 1, 0.3),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(values, not_values, present)| HeaderCond {
            values,
            not_values,
            present,
        })
}

fn rule_strategy() -> impl Strategy<Value = GenRule> {
    (
        any::<bool>(),
        prop::option::weighted(0.7, from_strategy()),
        prop::option::weighted(0.7, to_strategy()),
        prop::option::weighted(0.2, header_strategy()).prop_map(|h| h.into_iter().collect()),
    )
        .prop_map(|(named, from, to, when)| GenRule {
            named,
            from,
            to,
            when,
        })
}

fn selector_strategy() -> impl Strategy<Value = Sel> {
    prop_oneof![
        3 => (0..WORKLOADS.len()).prop_map(Sel::Workload),
        1 => (0..SELECTOR_LABELS.len()).prop_map(Sel::Labels),
        1 => Just(Sel::All),
    ]
}

fn policy_strategy(audit_weight: f64) -> impl Strategy<Value = GenPolicy> {
    (
        selector_strategy(),
        action(),
        prop::bool::weighted(audit_weight),
        any::<bool>(),
        prop::collection::vec(rule_strategy(), 0..=3),
    )
        .prop_map(
            |(selector, action, audit, explicit_defaults, rules)| GenPolicy {
                selector,
                action,
                audit,
                explicit_defaults,
                rules,
            },
        )
}

/// A DefaultPosture, present with probability `p`.
fn posture_strategy(p: f64) -> impl Strategy<Value = Option<Posture>> {
    prop::option::weighted(
        p,
        (any::<bool>(), prop::option::of(action())).prop_map(|(namespaced, ingress)| Posture {
            namespaced,
            ingress,
        }),
    )
}

fn set_strategy(audit_weight: f64) -> impl Strategy<Value = GenSet> {
    (
        posture_strategy(0.3),
        posture_strategy(audit_weight),
        prop::collection::vec(policy_strategy(audit_weight), 0..=5),
    )
        .prop_map(|(posture, audit_posture, policies)| GenSet {
            posture,
            audit_posture,
            policies,
        })
}

fn request_strategy() -> impl Strategy<Value = GenRequest> {
    (
        // Mostly the declared workloads, which policies protect.
        prop_oneof![4 => 0..3usize, 1 => 0..SUBJECTS.len()],
        prop::option::weighted(0.9, prop::sample::select(IDS.to_vec())),
        prop::option::weighted(0.3, prop::sample::select(IPS.to_vec())),
        0..REQUEST_PORTS.len(),
        prop::sample::select(REQUEST_METHODS.to_vec()),
        prop::sample::select(REQUEST_PATHS.to_vec()),
        prop::collection::vec(prop::sample::select(REQUEST_HEADER_VALUES.to_vec()), 0..=2),
    )
        .prop_map(
            |(subject, identity, ip, port, method, path, header)| GenRequest {
                subject,
                identity,
                ip,
                port,
                method,
                path,
                header,
            },
        )
}

fn requests() -> impl Strategy<Value = Vec<GenRequest>> {
    prop::collection::vec(request_strategy(), 1..24)
}

// ---------------------------------------------------------------------------------------
// Printing generated sets as YAML.

/// A YAML double-quoted scalar holding exactly `s`.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            // Printable and not a line separator or byte-order mark: written as is.
            c if matches!(c as u32, 0x20..=0x7E | 0xA0..=0x2027 | 0x202A..=0xD7FF | 0xE000..=0xFEFE | 0xFF00..=0xFFFD | 0x10000..) => {
                out.push(c)
            }
            c if (c as u32) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08X}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

fn quoted_list(items: &[&str]) -> String {
    format!(
        "[{}]",
        items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

fn workload_yaml(i: usize) -> String {
    let (name, labels) = WORKLOADS[i];
    let labels = labels
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let ports = DECLARED_PORTS
        .iter()
        .map(|(p, proto)| format!("{{port: {p}, protocol: {}}}", proto.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{API}\nkind: Workload\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{{labels}}}\nspec:\n  identity: {}\n  ports: [{ports}]\n",
        q(&format!("spiffe://td/ns/shop/sa/{name}"))
    )
}

fn declarations_yaml() -> String {
    (0..WORKLOADS.len())
        .map(workload_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

fn action_word(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    }
}

fn rule_yaml(rule: &GenRule, name: &str, out: &mut String) {
    let mut lines: Vec<String> = Vec::new();
    if rule.named {
        lines.push(format!("name: {name}"));
    }
    if let Some(f) = &rule.from {
        let mut fl = Vec::new();
        if !f.ids.is_empty() {
            fl.push(format!("identities: {}", quoted_list(&f.ids)));
        }
        if !f.not_ids.is_empty() {
            fl.push(format!("notIdentities: {}", quoted_list(&f.not_ids)));
        }
        if !f.namespaces.is_empty() {
            fl.push(format!("namespaces: [{}]", f.namespaces.join(", ")));
        }
        if !f.not_namespaces.is_empty() {
            fl.push(format!("notNamespaces: [{}]", f.not_namespaces.join(", ")));
        }
        if let Some(l) = f.workload_labels {
            let (k, v) = SOURCE_LABELS[l];
            fl.push(format!("workloadLabels: {{{k}: {v}}}"));
        }
        if !f.cidrs.is_empty() {
            fl.push(format!("cidrs: [{}]", f.cidrs.join(", ")));
        }
        if !f.not_cidrs.is_empty() {
            fl.push(format!("notCidrs: [{}]", f.not_cidrs.join(", ")));
        }
        // A `from` naming nobody is refused (it would match every caller); the model reads a
        // generated empty `From` as no condition, which is written by leaving `from` out.
        if !fl.is_empty() {
            lines.push("from:".into());
            lines.extend(fl.into_iter().map(|l| format!("  {l}")));
        }
    }
    if let Some(t) = &rule.to {
        let mut tl = Vec::new();
        let ports = |v: &[usize]| {
            format!(
                "[{}]",
                v.iter()
                    .map(|&i| PORT_SPECS[i].0)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        if !t.ports.is_empty() {
            tl.push(format!("ports: {}", ports(&t.ports)));
        }
        if !t.not_ports.is_empty() {
            tl.push(format!("notPorts: {}", ports(&t.not_ports)));
        }
        if !t.protocols.is_empty() {
            let p: Vec<&str> = t.protocols.iter().map(|&i| PROTOCOLS[i].0).collect();
            tl.push(format!("protocols: [{}]", p.join(", ")));
        }
        if !t.methods.is_empty() {
            tl.push(format!("methods: [{}]", t.methods.join(", ")));
        }
        if !t.not_methods.is_empty() {
            // Methods are case-insensitive on input.
            let lower: Vec<String> = t
                .not_methods
                .iter()
                .map(|m| m.to_ascii_lowercase())
                .collect();
            tl.push(format!("notMethods: [{}]", lower.join(", ")));
        }
        if !t.paths.is_empty() {
            tl.push(format!("paths: {}", quoted_list(&t.paths)));
        }
        if !t.not_paths.is_empty() {
            tl.push(format!("notPaths: {}", quoted_list(&t.not_paths)));
        }
        if tl.is_empty() {
            lines.push("to: {}".into());
        } else {
            lines.push("to:".into());
            lines.extend(tl.into_iter().map(|l| format!("  {l}")));
        }
    }
    if !rule.when.is_empty() {
        lines.push("when:".into());
        for h in &rule.when {
            let mut parts = vec!["header: X-Env".to_string()];
            if !h.values.is_empty() {
                parts.push(format!("values: {}", quoted_list(&h.values)));
            }
            if !h.not_values.is_empty() {
                parts.push(format!("notValues: [{}]", h.not_values.join(", ")));
            }
            if let Some(p) = h.present {
                parts.push(format!("present: {p}"));
            }
            lines.push(format!("  - {{{}}}", parts.join(", ")));
        }
    }
    if lines.is_empty() {
        out.push_str("    - {}\n");
        return;
    }
    for (i, l) in lines.iter().enumerate() {
        out.push_str(if i == 0 { "    - " } else { "      " });
        out.push_str(l);
        out.push('\n');
    }
}

/// The name a rule is known by: its own, or `rules[n]`.
fn rule_label(rule: &GenRule, n: usize) -> String {
    if rule.named {
        format!("r{n}")
    } else {
        format!("rules[{n}]")
    }
}

fn policy_yaml(name: &str, p: &GenPolicy) -> String {
    let mut out = format!(
        "{API}\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n"
    );
    match &p.selector {
        Sel::Workload(w) => {
            let _ = writeln!(out, "  selector:\n    workload: {}", WORKLOADS[*w].0);
        }
        Sel::Labels(l) => {
            let (k, v) = SELECTOR_LABELS[*l];
            let _ = writeln!(out, "  selector: {{matchLabels: {{{k}: {}}}}}", q(v));
        }
        Sel::All if p.explicit_defaults => out.push_str("  selector: {}\n"),
        Sel::All => {}
    }
    if p.explicit_defaults {
        out.push_str("  direction: ingress\n");
    }
    let _ = writeln!(out, "  action: {}", action_word(p.action));
    if p.audit {
        out.push_str("  mode: audit\n");
    } else if p.explicit_defaults {
        out.push_str("  mode: enforce\n");
    }
    if p.rules.is_empty() {
        if p.explicit_defaults {
            out.push_str("  rules: []\n");
        }
        return out;
    }
    out.push_str("  rules:\n");
    for (n, r) in p.rules.iter().enumerate() {
        rule_yaml(r, &format!("r{n}"), &mut out);
    }
    out
}

fn posture_yaml(p: &Posture, audit: bool) -> String {
    let ns = if p.namespaced {
        "\n  namespace: shop"
    } else {
        ""
    };
    let spec = match p.ingress {
        Some(a) => format!("{{ingress: {}}}", action_word(a)),
        None => "{egress: allow}".to_string(),
    };
    let (name, spec) = match audit {
        true => ("staged", spec.replace('}', ", mode: audit}")),
        false => ("posture", spec),
    };
    format!("{API}\nkind: DefaultPosture\nmetadata:\n  name: {name}{ns}\nspec: {spec}\n")
}

fn set_yaml(set: &GenSet) -> String {
    set_yaml_keeping(set, |_| true, true)
}

/// The set's YAML with only the policies `keep` accepts (each keeps its name `p{i}`), and
/// the audit posture if `audit_posture`.
fn set_yaml_keeping(
    set: &GenSet,
    keep: impl Fn(&GenPolicy) -> bool,
    audit_posture: bool,
) -> String {
    let mut docs = vec![declarations_yaml()];
    if let Some(p) = &set.posture {
        docs.push(posture_yaml(p, false));
    }
    if let Some(p) = set.audit_posture.as_ref().filter(|_| audit_posture) {
        docs.push(posture_yaml(p, true));
    }
    for (i, p) in set.policies.iter().enumerate() {
        if keep(p) {
            docs.push(policy_yaml(&format!("p{i}"), p));
        }
    }
    docs.join("---\n")
}

/// Parses and compiles generated YAML; the generators only make valid sets.
fn compile_yaml(text: &str) -> Result<(Vec<Resource>, PolicySet), TestCaseError> {
    let resources = parse_documents("gen.yaml", text)
        .map_err(|e| TestCaseError::fail(format!("generated YAML refused: {e}\n{text}")))?;
    let set = PolicySet::compile(&resources, 1)
        .map_err(|e| TestCaseError::fail(format!("generated set refused: {e:?}\n{text}")))?;
    Ok((resources, set))
}

fn compile_set(set: &GenSet) -> Result<PolicySet, TestCaseError> {
    compile_yaml(&set_yaml(set)).map(|(_, s)| s)
}

// ---------------------------------------------------------------------------------------
// Evaluating generated requests.

fn evaluate(set: &PolicySet, r: &GenRequest) -> bulkhead_policy::Decision {
    let (ns, name) = SUBJECTS[r.subject];
    let subject = ResourceName {
        namespace: ns.into(),
        name: name.into(),
    };
    let headers: Vec<(String, String)> = r
        .header
        .iter()
        .map(|v| ("x-env".to_string(), v.to_string()))
        .collect();
    let (port, protocol) = REQUEST_PORTS[r.port];
    let req = Request {
        direction: Direction::Ingress,
        subject: &subject,
        peer: Peer {
            identity: r.identity,
            ip: r.ip.map(|i| i.parse().expect("ip")),
            workload: None,
        },
        port,
        protocol,
        http: Some(Http {
            method: r.method,
            path: r.path,
            host: None,
            headers: &headers,
        }),
    };
    set.evaluate(&req)
}

// ---------------------------------------------------------------------------------------
// The reference model: the documented semantics, over the generated structures.

fn id_pattern_matches(pattern: &str, id: &str) -> bool {
    match pattern {
        "*" => true,
        p => match p.strip_suffix('*') {
            Some(prefix) => id.starts_with(prefix),
            None => p == id,
        },
    }
}

/// `spiffe://<td>/ns/<namespace>/…` → namespace.
fn namespace_of(id: &str) -> Option<&str> {
    let segs: Vec<&str> = id.strip_prefix("spiffe://")?.split('/').collect();
    (segs.len() > 2 && segs[1] == "ns").then(|| segs[2])
}

/// The caller's namespace as seen by `subject`: a declared workload (of trust domain `td`)
/// sees a namespace only in a caller of its own trust domain.
fn caller_namespace(subject: usize, id: &str) -> Option<&str> {
    let (_, name) = SUBJECTS[subject];
    let declared = SUBJECTS[subject].0 == "shop" && workload_labels(name).is_some();
    if declared && !id.starts_with("spiffe://td/") {
        return None;
    }
    namespace_of(id)
}

fn workload_labels(name: &str) -> Option<&'static [(&'static str, &'static str); 2]> {
    WORKLOADS.iter().find(|(n, _)| *n == name).map(|(_, l)| l)
}

fn selects(sel: &Sel, subject: usize) -> bool {
    let (ns, name) = SUBJECTS[subject];
    if ns != "shop" {
        return false;
    }
    match sel {
        Sel::Workload(w) => WORKLOADS[*w].0 == name,
        Sel::Labels(l) => {
            workload_labels(name).is_some_and(|labels| labels.contains(&SELECTOR_LABELS[*l]))
        }
        Sel::All => workload_labels(name).is_some(),
    }
}

/// `any` (empty: no constraint) and none of `none`.
fn any_none<T>(any: &[T], none: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (any.is_empty() || any.iter().any(&hit)) && !none.iter().any(hit)
}

/// Whether a rule matches. A caller attribute that is missing (no identity, no `/ns/`, no
/// address) matches no positive list and is in no `not…` list.
///
/// A header sent more than once satisfies an allow rule's condition only if every value
/// does, a deny rule's if any value does.
fn rule_matches(rule: &GenRule, action: Action, r: &GenRequest) -> bool {
    if let Some(f) = &rule.from {
        if !f.ids.is_empty() || !f.not_ids.is_empty() {
            let ok = match r.identity {
                Some(id) => any_none(&f.ids, &f.not_ids, |p| id_pattern_matches(p, id)),
                None => f.ids.is_empty(),
            };
            if !ok {
                return false;
            }
        }
        if !f.namespaces.is_empty() || !f.not_namespaces.is_empty() {
            let ok = match r.identity.and_then(|id| caller_namespace(r.subject, id)) {
                Some(ns) => any_none(&f.namespaces, &f.not_namespaces, |n| *n == ns),
                None => f.namespaces.is_empty(),
            };
            if !ok {
                return false;
            }
        }
        if let Some(l) = f.workload_labels {
            let wanted = SOURCE_LABELS[l];
            let callers: Vec<String> = WORKLOADS
                .iter()
                .filter(|(_, labels)| labels.contains(&wanted))
                .map(|(n, _)| format!("spiffe://td/ns/shop/sa/{n}"))
                .collect();
            if !r.identity.is_some_and(|id| callers.iter().any(|c| c == id)) {
                return false;
            }
        }
        if !f.cidrs.is_empty() || !f.not_cidrs.is_empty() {
            let ok = match r.ip {
                Some(ip) => any_none(&f.cidrs, &f.not_cidrs, |c| cidr_contains(c, ip)),
                None => f.cidrs.is_empty(),
            };
            if !ok {
                return false;
            }
        }
    }
    if let Some(t) = &rule.to {
        let (port, protocol) = REQUEST_PORTS[r.port];
        let in_range = |i: &usize| (PORT_SPECS[*i].1..=PORT_SPECS[*i].2).contains(&port);
        if !any_none(&t.ports, &t.not_ports, in_range) {
            return false;
        }
        if !t.protocols.is_empty() && !t.protocols.iter().any(|&i| PROTOCOLS[i].1 == protocol) {
            return false;
        }
        if !any_none(&t.methods, &t.not_methods, |m| *m == r.method) {
            return false;
        }
        if !any_none(&t.paths, &t.not_paths, |p| path_matches(p, r.path)) {
            return false;
        }
    }
    rule.when.iter().all(|h| {
        // A bare `header:` requires the header.
        let bare = h.values.is_empty() && h.not_values.is_empty() && h.present.is_none();
        let value_ok =
            |g: &&str| (h.values.is_empty() || h.values.contains(g)) && !h.not_values.contains(g);
        if r.header.is_empty() {
            return h.present != Some(true) && !bare && h.values.is_empty();
        }
        h.present != Some(false)
            && match action {
                Action::Allow => r.header.iter().all(value_ok),
                Action::Deny => r.header.iter().any(value_ok),
            }
    })
}

/// The first enforced rule of `action` (in definition order) that applies to the request's
/// subject and matches it: (policy name, rule label).
fn first_match(set: &GenSet, action: Action, r: &GenRequest) -> Option<(String, String)> {
    set.policies
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.audit && p.action == action && selects(&p.selector, r.subject))
        .find_map(|(i, p)| {
            p.rules
                .iter()
                .enumerate()
                .find(|(_, rule)| rule_matches(rule, action, r))
                .map(|(n, rule)| (format!("p{i}"), rule_label(rule, n)))
        })
}

fn posture(set: &GenSet, r: &GenRequest) -> Verdict {
    staged_posture(set, r, false)
}

/// The ingress posture; `staged`: as the audit evaluation looks it up (audit namespace,
/// namespace, audit mesh, mesh, built-in deny).
fn staged_posture(set: &GenSet, r: &GenRequest, staged: bool) -> Verdict {
    let in_shop = SUBJECTS[r.subject].0 == "shop";
    let audit = set.audit_posture.as_ref().filter(|_| staged);
    let sets_ingress = |p: Option<&Posture>, namespaced: bool| {
        p.filter(|p| p.namespaced == namespaced && (!namespaced || in_shop))
            .and_then(|p| p.ingress)
    };
    let enforced = set.posture.as_ref();
    let action = sets_ingress(audit, true)
        .or(sets_ingress(enforced, true))
        .or(sets_ingress(audit, false))
        .or(sets_ingress(enforced, false));
    match action {
        Some(Action::Allow) => Verdict::Allow,
        _ => Verdict::Deny,
    }
}

/// The model's audit outcome: audit policies enforced too, and the staged posture.
fn staged_model(set: &GenSet, r: &GenRequest) -> Verdict {
    let rules = |action: Action| {
        set.policies
            .iter()
            .filter(|p| p.action == action && selects(&p.selector, r.subject))
            .any(|p| p.rules.iter().any(|rule| rule_matches(rule, action, r)))
    };
    if rules(Action::Deny) {
        Verdict::Deny
    } else if rules(Action::Allow) {
        Verdict::Allow
    } else {
        staged_posture(set, r, true)
    }
}

/// The model's verdict and, when a rule decides, which one.
fn model(set: &GenSet, r: &GenRequest) -> (Verdict, Option<(String, String)>) {
    if let Some(hit) = first_match(set, Action::Deny, r) {
        return (Verdict::Deny, Some(hit));
    }
    if let Some(hit) = first_match(set, Action::Allow, r) {
        return (Verdict::Allow, Some(hit));
    }
    (posture(set, r), None)
}

fn config(cases: u32) -> ProptestConfig {
    // No regression files: this suite must not write into the source tree.
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Where an extra rule goes: a new policy, or appended to an existing policy of its action.
#[derive(Clone, Debug)]
enum Placement {
    NewPolicy(Sel),
    Append(usize),
}

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![
        selector_strategy().prop_map(Placement::NewPolicy),
        any::<usize>().prop_map(Placement::Append)
    ]
}

/// `set` with one more enforced `action` rule.
fn with_extra_rule(set: &GenSet, action: Action, rule: GenRule, place: Placement) -> GenSet {
    let mut out = set.clone();
    let candidates: Vec<usize> = (0..out.policies.len())
        .filter(|&i| out.policies[i].action == action && !out.policies[i].audit)
        .collect();
    match place {
        Placement::Append(k) if !candidates.is_empty() => {
            out.policies[candidates[k % candidates.len()]]
                .rules
                .push(rule);
        }
        Placement::Append(_) => out.policies.push(GenPolicy {
            selector: Sel::All,
            action,
            audit: false,
            explicit_defaults: false,
            rules: vec![rule],
        }),
        Placement::NewPolicy(selector) => out.policies.push(GenPolicy {
            selector,
            action,
            audit: false,
            explicit_defaults: false,
            rules: vec![rule],
        }),
    }
    out
}

fn describe(r: &GenRequest) -> String {
    let (ns, name) = SUBJECTS[r.subject];
    format!(
        "{ns}/{name} from {:?} ip {:?} port {} {} {} x-env={:?}",
        r.identity, r.ip, REQUEST_PORTS[r.port].0, r.method, r.path, r.header
    )
}

proptest! {
    #![proptest_config(config(128))]

    /// (a) If an enforced deny rule that protects the subject matches, the verdict is Deny,
    /// whatever allow rules and postures say, and the reason names a deny rule.
    #[test]
    fn deny_beats_allow(set in set_strategy(0.2), reqs in requests()) {
        let compiled = compile_set(&set)?;
        for r in &reqs {
            if first_match(&set, Action::Deny, r).is_some() {
                let d = evaluate(&compiled, r);
                prop_assert_eq!(d.verdict, Verdict::Deny, "{}: {}\n{}", describe(r), d, set_yaml(&set));
                let by_deny_rule = matches!(d.reason, Reason::Rule { action: Action::Deny, .. });
                prop_assert!(by_deny_rule, "{}: {}", describe(r), d);
            }
        }
    }

    /// Every verdict, and the rule that decides it, agrees with the reference model.
    #[test]
    fn verdicts_agree_with_the_reference_model(set in set_strategy(0.2), reqs in requests()) {
        let compiled = compile_set(&set)?;
        for r in &reqs {
            let d = evaluate(&compiled, r);
            let (verdict, rule) = model(&set, r);
            prop_assert_eq!(d.verdict, verdict, "{}: {}\n{}", describe(r), d, set_yaml(&set));
            let got_rule = match &d.reason {
                Reason::Rule { policy, rule, .. } => Some((policy.name.clone(), rule.to_string())),
                Reason::Posture { .. } => None,
            };
            prop_assert_eq!(got_rule, rule, "{}: {}\n{}", describe(r), d, set_yaml(&set));
        }
    }

    /// (b) Without any AuthorizationPolicy (and no DefaultPosture), every ingress request is
    /// denied by the built-in posture, whichever workloads are declared.
    #[test]
    fn empty_policy_set_denies_all_ingress(declared in subsequence(vec![0usize, 1, 2], 0..=3), reqs in requests()) {
        let text = declared.iter().map(|&i| workload_yaml(i)).collect::<Vec<_>>().join("---\n");
        let (_, set) = compile_yaml(&text)?;
        let empty = PolicySet::compile(&[], 1).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        for r in &reqs {
            for s in [&set, &empty] {
                let d = evaluate(s, r);
                prop_assert_eq!(d.verdict, Verdict::Deny, "{}: {}", describe(r), d);
                let by_posture = matches!(d.reason, Reason::Posture { action: Action::Deny, .. });
                prop_assert!(by_posture, "{}: {}", describe(r), d);
            }
        }
    }

    /// (c) Adding an allow rule never turns an Allow into a Deny.
    #[test]
    fn adding_an_allow_rule_never_denies_more(
        set in set_strategy(0.2), rule in rule_strategy(), place in placement(), reqs in requests()
    ) {
        let before = compile_set(&set)?;
        let bigger = with_extra_rule(&set, Action::Allow, rule, place);
        let after = compile_set(&bigger)?;
        for r in &reqs {
            if evaluate(&before, r).is_allow() {
                let d = evaluate(&after, r);
                prop_assert!(d.is_allow(), "{}: now {}\n{}", describe(r), d, set_yaml(&bigger));
            }
        }
    }

    /// (d) Adding a deny rule never turns a Deny into an Allow.
    #[test]
    fn adding_a_deny_rule_never_allows_more(
        set in set_strategy(0.2), rule in rule_strategy(), place in placement(), reqs in requests()
    ) {
        let before = compile_set(&set)?;
        let bigger = with_extra_rule(&set, Action::Deny, rule, place);
        let after = compile_set(&bigger)?;
        for r in &reqs {
            if !evaluate(&before, r).is_allow() {
                let d = evaluate(&after, r);
                prop_assert!(!d.is_allow(), "{}: now {}\n{}", describe(r), d, set_yaml(&bigger));
            }
        }
    }

    /// The audit outcome (or the verdict, when none is reported) agrees with the reference
    /// model of the audit evaluation, including the order postures are looked up in.
    #[test]
    fn audit_outcomes_agree_with_the_reference_model(set in set_strategy(0.5), reqs in requests()) {
        let compiled = compile_set(&set)?;
        for r in &reqs {
            let d = evaluate(&compiled, r);
            let staged = d.audit.as_ref().map(|a| a.verdict).unwrap_or(d.verdict);
            prop_assert_eq!(staged, staged_model(&set, r), "{}: {}\n{}", describe(r), d, set_yaml(&set));
        }
    }

    /// (f) Audit-mode policies and postures never change the verdict, nor its reason: the set
    /// with them decides exactly as the set without them.
    #[test]
    fn audit_policies_never_change_the_verdict(set in set_strategy(0.5), reqs in requests()) {
        let with_audit = compile_set(&set)?;
        let (_, without) = compile_yaml(&set_yaml_keeping(&set, |p| !p.audit, false))?;
        for r in &reqs {
            let a = evaluate(&with_audit, r);
            let b = evaluate(&without, r);
            prop_assert_eq!(a.verdict, b.verdict, "{}: {} vs {}\n{}", describe(r), a, b, set_yaml(&set));
            prop_assert_eq!(&a.reason, &b.reason, "{}: {} vs {}\n{}", describe(r), a, b, set_yaml(&set));
            prop_assert!(b.audit.is_none(), "{}: {}", describe(r), b);
        }
    }

    /// (e) Print → parse is stable for every resource of a generated set: YAML and JSON.
    #[test]
    fn generated_sets_print_and_parse_back(set in set_strategy(0.3)) {
        let (resources, _) = compile_yaml(&set_yaml(&set))?;
        for r in &resources {
            check_round_trip(r)?;
        }
    }
}

fn check_round_trip(r: &Resource) -> Result<(), TestCaseError> {
    let yaml = r.to_yaml().expect("a parsed resource prints");
    prop_assert!(!yaml.is_empty(), "{} printed as empty YAML: {r:?}", r.key());
    match parse_documents("x", &yaml) {
        Ok(back) => prop_assert_eq!(back, vec![r.clone()], "printed YAML:\n{}", yaml),
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "printed YAML does not parse: {e}\n{yaml}"
            )));
        }
    }
    let json = r.to_json().expect("a parsed resource serializes");
    match Resource::from_json(&json) {
        Ok(back) => prop_assert_eq!(&back, r, "printed JSON: {}", json),
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "printed JSON does not parse: {e}\n{json}"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (e) continued: resources with every field and awkward strings, for the printer.

/// Strings YAML printers get wrong, and arbitrary Unicode.
fn awkward_string() -> impl Strategy<Value = String> {
    let pool: Vec<String> = [
        "",
        " ",
        "null",
        "Null",
        "~",
        "true",
        "False",
        "yes",
        "no",
        "on",
        "off",
        "y",
        "n",
        "0",
        "-1",
        "+1",
        "007",
        "0x1F",
        "0o17",
        "1e3",
        "1_000",
        ".inf",
        "-.Inf",
        ".nan",
        "3.14",
        "12:30:00",
        "2026-01-01",
        "a: b",
        "a:b",
        "#x",
        "x #y",
        "- x",
        "-",
        "---",
        "...",
        "--- x",
        "? x",
        "[x]",
        "{x}",
        "&a",
        "*a",
        "!x",
        "!!str",
        "%YAML",
        "@x",
        "`x",
        "|",
        ">",
        "'x'",
        "\"x\"",
        "\\",
        "x\n",
        "\nx",
        "a\n---\nb",
        "a\n...\nb",
        " lead",
        "trail ",
        "\t",
        "x\ty",
        "\r\n",
        "\u{0}",
        "\u{7}",
        "\u{7f}",
        "\u{85}",
        "\u{a0}",
        "\u{2028}",
        "\u{feff}",
        "é",
        "日本",
        "😀",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    prop_oneof![
        3 => prop::sample::select(pool),
        2 => "(?s).{0,12}",
        1 => "[ -~]{0,16}",
    ]
}

/// Names that are valid (`[a-z0-9-]`) but look like other YAML types.
fn name() -> impl Strategy<Value = String> {
    let pool: Vec<String> = [
        "shop",
        "null",
        "true",
        "false",
        "yes",
        "no",
        "on",
        "off",
        "y",
        "n",
        "0",
        "123",
        "007",
        "1e3",
        "0x1f",
        "0o17",
        "nan",
        "inf",
        "1-2",
        "12-30",
        "2026-01-01",
        "a",
        "a-b-c",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    prop_oneof![2 => prop::sample::select(pool), 1 => "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"]
}

fn identity_pattern() -> impl Strategy<Value = String> {
    let seg = "[A-Za-z0-9_-][A-Za-z0-9._-]{0,6}";
    prop_oneof![
        1 => Just("*".to_string()),
        1 => "[a-z0-9][a-z0-9._-]{0,8}".prop_map(|d| format!("spiffe://{d}/*")),
        4 => ("[a-z0-9._-]{1,8}", prop::collection::vec(seg, 1..4), any::<bool>()).prop_map(|(d, segs, prefix)| {
            format!("spiffe://{d}/{}{}", segs.join("/"), if prefix { "/*" } else { "" })
        }),
    ]
}

fn path_pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => prop::sample::select(vec!["/".to_string(), "/a/**/b".into(), "/users/*/x".into(), "/f/*.pdf".into(), "/**".into()]),
        // Arbitrary text, in the canonical form a pattern must have (requests are matched
        // canonical); text no request path can hold is skipped.
        3 => ("[^?#*]{0,10}", any::<bool>()).prop_filter_map("no request path holds it", |(p, star)| {
            let c = bulkhead_policy::canonical::path(&format!("/{p}")).ok()?.into_owned();
            Some(format!("{c}{}", if star { "*" } else { "" }))
        }),
    ]
}

fn port_entry() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u16..).prop_map(|p| p.to_string()),
        (1u16..).prop_map(|p| format!("\"{p}\"")),
        (1u16.., 0u16..200).prop_map(|(a, d)| format!("\"{a}-{}\"", a.saturating_add(d))),
    ]
}

fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, l)| format!("{}/{l}", std::net::Ipv4Addr::from(a))),
        (any::<[u16; 8]>(), 0u8..=128)
            .prop_map(|(a, l)| format!("{}/{l}", std::net::Ipv6Addr::from(a))),
    ]
}

fn host_pattern() -> impl Strategy<Value = String> {
    (
        "[a-zA-Z0-9-]{1,6}(\\.[a-zA-Z0-9-]{1,6}){0,2}",
        any::<bool>(),
    )
        .prop_map(|(h, wild)| if wild { format!("*.{h}") } else { h })
}

fn grpc_name() -> impl Strategy<Value = String> {
    (
        "[A-Za-z0-9_]{1,5}(\\.[A-Za-z0-9_]{1,5}){0,2}",
        prop::option::of("[A-Za-z0-9_]{1,6}"),
    )
        .prop_map(|(s, m)| match m {
            Some(m) => format!("{s}/{m}"),
            None => s,
        })
}

fn labels_yaml() -> impl Strategy<Value = String> {
    prop::collection::btree_map(awkward_string(), awkward_string(), 0..4).prop_map(|m| {
        let items: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{}: {}", q(k), q(v)))
            .collect();
        format!("{{{}}}", items.join(", "))
    })
}

fn list<S: Strategy<Value = String>>(s: S, max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(s, 0..=max)
}

/// `key: [a, b]` with each item quoted, or nothing for an empty list.
fn field(key: &str, items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(
            ", {key}: [{}]",
            items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
        )
    }
}

fn metadata_yaml() -> impl Strategy<Value = String> {
    (name(), prop::option::of(name()), labels_yaml()).prop_map(|(n, ns, labels)| {
        let ns = ns
            .map(|ns| format!(", namespace: {}", q(&ns)))
            .unwrap_or_default();
        format!("metadata: {{name: {}{ns}, labels: {labels}}}\n", q(&n))
    })
}

fn ports_yaml() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            any::<u16>(),
            prop::sample::select(vec!["http", "http2", "grpc", "tcp"]),
            prop::option::of(name()),
        ),
        0..3,
    )
    .prop_map(|ps| {
        let items: Vec<String> = ps
            .iter()
            .map(|(p, proto, n)| {
                let n = n
                    .as_ref()
                    .map(|n| format!(", name: {}", q(n)))
                    .unwrap_or_default();
                format!("{{port: {p}, protocol: {proto}{n}}}")
            })
            .collect();
        format!("[{}]", items.join(", "))
    })
}

fn selector_yaml() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{}".to_string()),
        name().prop_map(|n| format!("{{workload: {}}}", q(&n))),
        labels_yaml().prop_map(|l| format!("{{matchLabels: {l}}}")),
    ]
}

fn rich_rule_yaml() -> impl Strategy<Value = String> {
    let from = (
        list(identity_pattern(), 2),
        list(identity_pattern(), 1),
        list(name(), 2),
        list(name(), 1),
        labels_yaml(),
        list(cidr(), 2),
        list(cidr(), 1),
    )
        .prop_map(|(ids, nids, nss, nnss, labels, cidrs, ncidrs)| {
            format!(
                "from: {{workloadLabels: {labels}{}{}{}{}{}{}}}",
                field("identities", &ids),
                field("notIdentities", &nids),
                field("namespaces", &nss),
                field("notNamespaces", &nnss),
                field("cidrs", &cidrs),
                field("notCidrs", &ncidrs)
            )
        });
    let dests = (
        list(identity_pattern(), 1),
        list(awkward_string(), 2),
        list(awkward_string(), 1),
        list(name(), 1),
        list(cidr(), 1),
        list(cidr(), 1),
    );
    let ops = (
        list(port_entry(), 2),
        list(port_entry(), 1),
        list(
            prop::sample::select(vec!["http", "http2", "grpc", "tcp"]).prop_map(String::from),
            2,
        ),
        list(
            prop::sample::select(vec![
                "get", "GET", "Post", "PATCH", "options", "HEAD", "connect", "trace", "PUT",
                "delete",
            ])
            .prop_map(String::from),
            2,
        ),
        list(
            prop::sample::select(vec!["GET", "DELETE"]).prop_map(String::from),
            1,
        ),
        list(path_pattern(), 2),
        list(path_pattern(), 1),
        list(host_pattern(), 2),
        list(host_pattern(), 1),
        prop::option::of((list(grpc_name(), 2), list(grpc_name(), 2))),
    );
    let when = list(
        (
            "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,10}",
            list(awkward_string(), 2),
            list(awkward_string(), 1),
            prop::option::of(any::<bool>()),
        )
            .prop_map(|(h, v, nv, present)| {
                let present = present
                    .map(|p| format!(", present: {p}"))
                    .unwrap_or_default();
                format!(
                    "{{header: {}{}{}{present}}}",
                    q(&h),
                    field("values", &v),
                    field("notValues", &nv)
                )
            }),
        2,
    );
    (
        prop::option::of(name()),
        prop::option::of(from),
        dests,
        ops,
        when,
    )
        .prop_map(|(n, from, d, o, when)| {
            let mut parts = Vec::new();
            if let Some(n) = n {
                parts.push(format!("name: {}", q(&n)));
            }
            if let Some(f) = from {
                parts.push(f);
            }
            let ports: Vec<String> = o.0.clone();
            let not_ports: Vec<String> = o.1.clone();
            let raw = |key: &str, items: &[String]| {
                if items.is_empty() {
                    String::new()
                } else {
                    format!(", {key}: [{}]", items.join(", "))
                }
            };
            let grpc = match &o.9 {
                Some((s, m)) => format!(
                    ", grpc: {{services: [{}], methods: [{}]}}",
                    s.iter().map(|x| q(x)).collect::<Vec<_>>().join(", "),
                    m.iter().map(|x| q(x)).collect::<Vec<_>>().join(", ")
                ),
                None => String::new(),
            };
            parts.push(format!(
                "to: {{protocols: [{}]{}{}{}{}{}{}{}{}{}{}{}{}{}{}{grpc}}}",
                o.2.join(", "),
                field("identities", &d.0),
                field("workloads", &d.1),
                field("services", &d.2),
                field("namespaces", &d.3),
                field("cidrs", &d.4),
                field("notCidrs", &d.5),
                raw("ports", &ports),
                raw("notPorts", &not_ports),
                raw("methods", &o.3),
                field("notMethods", &o.4),
                field("paths", &o.5),
                field("notPaths", &o.6),
                field("hosts", &o.7),
                field("notHosts", &o.8),
            ));
            if !when.is_empty() {
                parts.push(format!("when: [{}]", when.join(", ")));
            }
            format!("{{{}}}", parts.join(", "))
        })
}

/// One resource of any kind, every optional field sometimes given, as YAML text.
fn rich_resource_yaml() -> impl Strategy<Value = String> {
    let policy = (
        metadata_yaml(),
        selector_yaml(),
        prop::sample::select(vec!["", "  direction: ingress\n", "  direction: egress\n"]),
        prop::sample::select(vec!["allow", "deny"]),
        prop::sample::select(vec!["", "  mode: audit\n", "  mode: enforce\n"]),
        prop::collection::vec(rich_rule_yaml(), 0..3),
    )
        .prop_map(|(meta, sel, dir, action, mode, rules)| {
            let rules: String = rules.iter().map(|r| format!("    - {r}\n")).collect();
            let rules = if rules.is_empty() { String::new() } else { format!("  rules:\n{rules}") };
            format!("{API}\nkind: AuthorizationPolicy\n{meta}spec:\n  selector: {sel}\n{dir}  action: {action}\n{mode}{rules}")
        });
    let workload =
        (metadata_yaml(), identity_pattern(), ports_yaml()).prop_map(|(meta, id, ports)| {
            format!(
                "{API}\nkind: Workload\n{meta}spec:\n  identity: {}\n  ports: {ports}\n",
                q(&id)
            )
        });
    let service =
        (metadata_yaml(), selector_yaml(), ports_yaml()).prop_map(|(meta, sel, ports)| {
            format!("{API}\nkind: Service\n{meta}spec: {{selector: {sel}, ports: {ports}}}\n")
        });
    let posture_action = prop::option::of(prop::sample::select(vec!["allow", "deny"]));
    let posture =
        (metadata_yaml(), posture_action.clone(), posture_action).prop_map(|(meta, i, e)| {
            let mut spec = Vec::new();
            if let Some(i) = i {
                spec.push(format!("ingress: {i}"));
            }
            if let Some(e) = e {
                spec.push(format!("egress: {e}"));
            }
            format!(
                "{API}\nkind: DefaultPosture\n{meta}spec: {{{}}}\n",
                spec.join(", ")
            )
        });
    prop_oneof![3 => policy, 1 => workload, 1 => service, 1 => posture]
}

proptest! {
    #![proptest_config(config(128))]

    /// (e) Print → parse is stable for resources using every field, with awkward strings.
    #[test]
    fn rich_resources_print_and_parse_back(text in rich_resource_yaml()) {
        let parsed = parse_documents("gen.yaml", &text)
            .map_err(|e| TestCaseError::fail(format!("generated YAML refused: {e}\n{text}")))?;
        prop_assert_eq!(parsed.len(), 1);
        check_round_trip(&parsed[0])?;
    }
}
