use super::*;
use crate::edge::{EdgeKey, EdgeStats, EdgeVerdict};
use bulkhead_policy::{PolicySet, parse_documents};
use bulkhead_spiffe::SpiffeId;

/// 2024-05-01T10:00:00Z
const T: u64 = 1_714_557_600;

/// The applied set: the shop of `examples/shop.yaml`, plus a database on an opaque TCP port.
const SHOP: &str = concat!(
    include_str!("../../../../examples/shop.yaml"),
    r#"---
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: db, namespace: shop}
spec:
  identity: spiffe://bulkhead.local/ns/shop/sa/db
  ports: [{port: 5432, protocol: tcp}]
"#
);

fn shop() -> Vec<Resource> {
    parse_documents("shop.yaml", SHOP).unwrap()
}

/// The shop with the documents of `text` (read as the file `name`) added.
fn shop_with(name: &str, text: &str) -> Vec<Resource> {
    let mut resources = shop();
    resources.extend(parse_documents(name, text).unwrap());
    resources
}

fn id(sa: &str) -> Option<SpiffeId> {
    Some(
        format!("spiffe://bulkhead.local/ns/shop/sa/{sa}")
            .parse()
            .unwrap(),
    )
}

fn wl(s: &str) -> WorkloadRef {
    let (namespace, name) = s.split_once('/').unwrap();
    WorkloadRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// An ingress edge: `count` requests, the first at `T + first`, the last at `T + last`.
#[allow(clippy::too_many_arguments)]
fn edge(
    from: Option<SpiffeId>,
    to: &str,
    port: u16,
    protocol: Protocol,
    method: Option<&str>,
    path: Option<&str>,
    verdict: EdgeVerdict,
    count: u64,
    (first, last): (u64, u64),
) -> Edge {
    let source_workload = from
        .as_deref()
        .and_then(|f| f.rsplit_once('/'))
        .map(|(_, sa)| wl(&format!("shop/{sa}")));
    Edge {
        key: EdgeKey {
            source_identity: from,
            source_workload,
            destination: wl(to),
            port,
            protocol,
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            verdict,
            policy: None,
            rule: None,
            direction: Direction::Ingress,
        },
        stats: EdgeStats {
            count,
            bytes_in: 0,
            bytes_out: 0,
            latency_sum_micros: 0,
            latency_max_micros: 0,
            first_seen: T + first,
            last_seen: T + last,
        },
    }
}

fn http(from: &str, to: &str, method: &str, path: &str, verdict: EdgeVerdict, count: u64) -> Edge {
    edge(
        id(from),
        to,
        8080,
        Protocol::Http,
        Some(method),
        Some(path),
        verdict,
        count,
        (0, 3600),
    )
}

/// `count` allowed `POST /charge` from orders to payments.
fn orders_charging_payments(count: u64) -> Vec<Edge> {
    vec![http(
        "orders",
        "shop/payments",
        "POST",
        "/charge",
        EdgeVerdict::Allow,
        count,
    )]
}

fn observed_edges() -> Vec<Edge> {
    use EdgeVerdict::*;
    let mut admin = http("orders", "shop/payments", "GET", "/admin/*", Deny, 1);
    admin.key.policy = Some("shop/payments-deny-admin".into());
    admin.key.rule = Some("admin-paths".into());
    let mut plaintext = http("legacy", "shop/orders", "GET", "/orders", Allow, 4);
    plaintext.key.source_identity = None;
    let mut egress = http("frontend", "shop/orders", "PUT", "/orders/*", Allow, 9);
    egress.key.direction = Direction::Egress;
    vec![
        http("frontend", "shop/orders", "GET", "/orders", Allow, 30),
        http("frontend", "shop/orders", "GET", "/orders/*", Allow, 10),
        http("frontend", "shop/orders", "POST", "/orders", Allow, 2),
        http("frontend", "shop/orders", "DELETE", "/orders/*", Deny, 3),
        http("cart", "shop/orders", "GET", "/orders/*", AllowWouldDeny, 2),
        http("orders", "shop/payments", "POST", "/charge", Allow, 5),
        admin,
        plaintext,
        egress,
        edge(
            id("payments"),
            "shop/db",
            5432,
            Protocol::Tcp,
            None,
            None,
            Allow,
            7,
            (60, 120),
        ),
    ]
}

const EXPECTED: &str = r#"# Least-privilege ingress policy, recommended from 64 requests seen
# 2024-05-01T10:00:00Z to 2024-05-01T11:00:00Z.
# Everything here is in audit mode: apply it, watch the decisions for audit=would-deny
# and audit=would-allow, then remove `mode: audit` to enforce it.
---
# shop/db: 7 requests seen 2024-05-01T10:01:00Z to 2024-05-01T10:02:00Z.
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: db-recommended
  namespace: shop
spec:
  selector:
    workload: db
  action: allow
  mode: audit
  rules:
    # evidence: 7 requests, first seen 2024-05-01T10:01:00Z, last seen 2024-05-01T10:02:00Z
    #   5432/tcp: 7
    - name: from-payments
      from:
        identities: ["spiffe://bulkhead.local/ns/shop/sa/payments"]
      to:
        ports: [5432]
---
# shop/orders: 51 requests seen 2024-05-01T10:00:00Z to 2024-05-01T11:00:00Z.
# denied, not recommended:
#   spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend), 8080/http DELETE /orders/*: 3 requests, last seen 2024-05-01T11:00:00Z
# no identity (plaintext), not turned into rules:
#   from shop/legacy, 8080/http GET /orders: 4 requests, last seen 2024-05-01T11:00:00Z
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: orders-recommended
  namespace: shop
spec:
  selector:
    workload: orders
  action: allow
  mode: audit
  rules:
    # evidence: 2 requests, first seen 2024-05-01T10:00:00Z, last seen 2024-05-01T11:00:00Z
    #   8080/http GET /orders/*: 2
    # note: 2 of these requests would be denied by an audit-mode policy today
    - name: from-cart
      from:
        identities: ["spiffe://bulkhead.local/ns/shop/sa/cart"]
      to:
        ports: [8080]
        methods: [GET]
        paths: ["/orders/*"]
    # evidence: 42 requests, first seen 2024-05-01T10:00:00Z, last seen 2024-05-01T11:00:00Z
    #   8080/http GET /orders: 30
    #   8080/http GET /orders/*: 10
    #   8080/http POST /orders: 2
    - name: from-frontend
      from:
        identities: ["spiffe://bulkhead.local/ns/shop/sa/frontend"]
      to:
        ports: [8080]
        methods: [GET, POST]
        paths: ["/orders", "/orders/*"]
---
# shop/payments: 6 requests seen 2024-05-01T10:00:00Z to 2024-05-01T11:00:00Z.
# denied, not recommended:
#   spiffe://bulkhead.local/ns/shop/sa/orders (shop/orders), 8080/http GET /admin/*: 1 request, last seen 2024-05-01T11:00:00Z; denied by policy shop/payments-deny-admin rule admin-paths
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: payments-recommended
  namespace: shop
spec:
  selector:
    workload: payments
  action: allow
  mode: audit
  rules:
    # evidence: 5 requests, first seen 2024-05-01T10:00:00Z, last seen 2024-05-01T11:00:00Z
    #   8080/http POST /charge: 5
    - name: from-orders
      from:
        identities: ["spiffe://bulkhead.local/ns/shop/sa/orders"]
      to:
        ports: [8080]
        methods: [POST]
        paths: ["/charge"]
"#;

#[test]
fn the_shop_gets_one_audit_policy_per_workload_with_its_evidence() {
    let rec = recommend(&observed_edges(), &shop(), &RecommendOptions::default());
    let yaml = rec.to_yaml();
    assert_eq!(yaml, EXPECTED, "got:\n{yaml}");
}

/// The text parses back to exactly the resources, and compiles with the applied set.
fn check_applies(rec: &Recommendation, current: &[Resource]) {
    let yaml = rec.to_yaml();
    let parsed =
        parse_documents("recommended.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(parsed, rec.resources());
    let mut all = current.to_vec();
    all.extend(parsed);
    if let Err(errors) = PolicySet::compile(&all, 1) {
        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        panic!("{}\n{yaml}", errors.join("\n"));
    }
}

#[test]
fn the_recommendation_parses_and_compiles_with_the_applied_set() {
    let rec = recommend(&observed_edges(), &shop(), &RecommendOptions::default());
    check_applies(&rec, &shop());
}

#[test]
fn no_traffic_recommends_nothing() {
    let rec = recommend(&[], &shop(), &RecommendOptions::default());
    assert_eq!(
        rec.to_yaml(),
        "# No ingress requests were observed; nothing to recommend.\n"
    );
    assert!(rec.resources().is_empty());
}

#[test]
fn a_namespace_that_admits_by_default_gets_an_audit_deny_posture() {
    let current = shop_with(
        "posture.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: shop}\nspec: {ingress: allow}\n",
    );
    let edges = orders_charging_payments(5);
    let rec = recommend(&edges, &current, &RecommendOptions::default());
    let yaml = rec.to_yaml();
    let posture = "---\n\
        # Namespace shop admits what no rule decides today (DefaultPosture shop/default).\n\
        # In audit mode, this posture reports every request there the recommended rules would not allow.\n\
        apiVersion: bulkhead.dev/v1alpha1\n\
        kind: DefaultPosture\n\
        metadata:\n  name: recommended\n  namespace: shop\n\
        spec:\n  ingress: deny\n  mode: audit\n\
        ---\n# shop/payments:";
    assert!(yaml.contains(posture), "got:\n{yaml}");
    // Needs audit DefaultPostures in the policy crate (one enforced and one audit per scope).
    check_applies(&rec, &current);
}

#[test]
fn a_mesh_posture_that_admits_counts_and_a_namespace_deny_overrides_it() {
    let mesh_allow = "apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default}\nspec: {ingress: allow}\n";
    let shop_deny = "apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: shop}\nspec: {ingress: deny}\n";
    let edges = orders_charging_payments(1);
    let mut current = shop_with("mesh.yaml", mesh_allow);
    let rec = recommend(&edges, &current, &RecommendOptions::default());
    assert_eq!(
        rec.postures,
        vec![RecommendedPosture {
            namespace: Name::try_from("shop".to_string()).unwrap(),
            admitted_by: "the mesh-wide DefaultPosture default".into(),
        }]
    );
    current.extend(parse_documents("shop-posture.yaml", shop_deny).unwrap());
    let rec = recommend(&edges, &current, &RecommendOptions::default());
    assert!(rec.postures.is_empty());
}

#[test]
fn an_existing_audit_posture_of_another_name_is_left_alone_with_a_note() {
    let current = shop_with(
        "postures.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: shop}\nspec: {ingress: allow}\n---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: staged, namespace: shop}\nspec: {egress: deny, mode: audit}\n",
    );
    let edges = orders_charging_payments(1);
    let rec = recommend(&edges, &current, &RecommendOptions::default());
    assert!(rec.postures.is_empty());
    assert!(
        rec.to_yaml().contains("# note: namespace shop admits by default (DefaultPosture shop/default) but already has the audit posture shop/staged; no recommended posture added"),
        "{}",
        rec.to_yaml()
    );
}

#[test]
fn http_traffic_to_an_undeclared_workload_gets_ports_only_and_says_why() {
    let edges = vec![http(
        "frontend",
        "shop/ghost",
        "GET",
        "/x",
        EdgeVerdict::Allow,
        2,
    )];
    let rec = recommend(&edges, &shop(), &RecommendOptions::default());
    let yaml = rec.to_yaml();
    assert!(
        yaml.contains(
            "    # note: methods and paths not written: shop/ghost has no Workload declaration, so the compiler cannot check methods and paths on it; declare it with its ports to narrow this rule\n\
             \x20   - name: from-frontend\n\
             \x20     from:\n\
             \x20       identities: [\"spiffe://bulkhead.local/ns/shop/sa/frontend\"]\n\
             \x20     to:\n\
             \x20       ports: [8080]\n"
        ),
        "got:\n{yaml}"
    );
    check_applies(&rec, &shop());
}

#[test]
fn a_caller_on_http_and_tcp_ports_gets_two_rules_the_compiler_accepts() {
    let current = parse_documents(
        "ledger.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: ledger, namespace: billing}\nspec:\n  identity: spiffe://bulkhead.local/ns/billing/sa/ledger\n  ports: [{port: 8080, protocol: http}, {port: 7000, protocol: tcp}]\n",
    )
    .unwrap();
    let mut h = http(
        "orders",
        "billing/ledger",
        "GET",
        "/entries/*",
        EdgeVerdict::Allow,
        3,
    );
    h.key.source_workload = None;
    let t = edge(
        id("orders"),
        "billing/ledger",
        7000,
        Protocol::Tcp,
        None,
        None,
        EdgeVerdict::Allow,
        1,
        (0, 0),
    );
    let rec = recommend(&[h, t], &current, &RecommendOptions::default());
    let rules: Vec<(String, Vec<u16>, usize)> = rec.policies[0]
        .rules
        .iter()
        .map(|r| (r.name.to_string(), r.ports.clone(), r.methods.len()))
        .collect();
    assert_eq!(
        rules,
        vec![
            ("from-shop-orders".to_string(), vec![8080], 1),
            ("from-shop-orders-ports".to_string(), vec![7000], 0),
        ]
    );
    check_applies(&rec, &current);
}

#[test]
fn requests_the_language_cannot_say_are_listed_not_allowed() {
    let edges = vec![
        http(
            "frontend",
            "shop/orders",
            "PROPFIND",
            "/dav",
            EdgeVerdict::Allow,
            1,
        ),
        http("frontend", "shop/orders", "GET", "*", EdgeVerdict::Allow, 1),
    ];
    let rec = recommend(&edges, &shop(), &RecommendOptions::default());
    let yaml = rec.to_yaml();
    assert_eq!(
        yaml.lines()
            .skip_while(|l| !l.starts_with("# shop/orders"))
            .collect::<Vec<_>>(),
        vec![
            "# shop/orders: 2 requests seen 2024-05-01T10:00:00Z to 2024-05-01T11:00:00Z; no rule recommended.",
            "# cannot be written as a rule:",
            "#   spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend), 8080/http PROPFIND /dav: 1 request, last seen 2024-05-01T11:00:00Z; method PROPFIND cannot be written in a policy",
            "#   spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend), 8080/http GET *: 1 request, last seen 2024-05-01T11:00:00Z; path template *: sidecars refuse it (the path must start with '/')",
        ]
    );
    assert!(rec.resources().is_empty());
}

#[test]
fn denied_today_but_allowed_by_audit_is_still_denied_here() {
    let mut e = http(
        "frontend",
        "shop/payments",
        "POST",
        "/charge",
        EdgeVerdict::DenyWouldAllow,
        2,
    );
    e.key.policy = Some("default-deny".into());
    let rec = recommend(&[e], &shop(), &RecommendOptions::default());
    assert!(rec.resources().is_empty());
    assert!(rec.to_yaml().contains(
        "#   spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend), 8080/http POST /charge: 2 requests, last seen 2024-05-01T11:00:00Z; denied by default-deny; an audit-mode policy would allow it\n"
    ));
}

#[test]
fn many_paths_fold_into_a_prefix() {
    let edges: Vec<Edge> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|p| {
            http(
                "frontend",
                "shop/orders",
                "GET",
                &format!("/reports/{p}"),
                EdgeVerdict::Allow,
                1,
            )
        })
        .collect();
    let rec = recommend(&edges, &shop(), &RecommendOptions::default());
    let paths: Vec<String> = rec.policies[0].rules[0]
        .paths
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(paths, vec!["/reports/*"]);
    let narrow = recommend(&edges, &shop(), &RecommendOptions { max_children: 10 });
    assert_eq!(narrow.policies[0].rules[0].paths.len(), 6);
}

#[test]
fn rule_names_come_from_identities_and_stay_unique_and_valid() {
    assert_eq!(
        rule_base(
            &SpiffeId::parse("spiffe://bulkhead.local/ns/shop/sa/frontend").unwrap(),
            "shop"
        ),
        "from-frontend"
    );
    assert_eq!(
        rule_base(
            &SpiffeId::parse("spiffe://bulkhead.local/ns/edge/sa/gateway").unwrap(),
            "shop"
        ),
        "from-edge-gateway"
    );
    assert_eq!(
        rule_base(
            &SpiffeId::parse("spiffe://partner.example/Billing/API_v2").unwrap(),
            "shop"
        ),
        "from-billing-api-v2"
    );
    let mut taken = BTreeSet::new();
    let long = "x".repeat(80);
    let a = unique_name(&long, POLICY_SUFFIX, &mut taken);
    let b = unique_name(&long, POLICY_SUFFIX, &mut taken);
    assert_eq!(a.as_str().len(), 63);
    assert!(a.as_str().ends_with("x-recommended"));
    assert!(b.as_str().ends_with("x-2-recommended"), "{b}");
    assert_eq!(
        Name::try_from(POSTURE_NAME.to_string()).unwrap().as_str(),
        "recommended"
    );
}

#[test]
fn names_yaml_would_misread_are_quoted_and_still_parse() {
    let mut e = http(
        "frontend",
        "yes/123",
        "GET",
        // Written as sidecars see it: the ü percent-encoded, the rest as it came.
        "/a'quoted'path/ü!&*:@",
        EdgeVerdict::Allow,
        1,
    );
    e.key.source_identity = Some("spiffe://bulkhead.local/ns/yes/sa/null".parse().unwrap());
    let current = parse_documents(
        "odd.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: \"123\", namespace: \"yes\"}\nspec:\n  identity: spiffe://bulkhead.local/ns/yes/sa/app\n  ports: [{port: 8080, protocol: http}]\n",
    )
    .unwrap();
    let rec = recommend(&[e], &current, &RecommendOptions::default());
    let yaml = rec.to_yaml();
    assert!(yaml.contains("  namespace: \"yes\"\n"), "{yaml}");
    assert!(yaml.contains("    workload: \"123\"\n"), "{yaml}");
    assert!(yaml.contains("    - name: from-null\n"), "{yaml}");
    assert!(
        yaml.contains("        paths: [\"/a'quoted'path/%C3%BC!&*:@\"]\n"),
        "{yaml}"
    );
    check_applies(&rec, &current);
}

#[test]
fn the_same_traffic_gives_the_same_text() {
    let mut edges = observed_edges();
    let a = recommend(&edges, &shop(), &RecommendOptions::default()).to_yaml();
    edges.reverse();
    let b = recommend(&edges, &shop(), &RecommendOptions::default()).to_yaml();
    assert_eq!(a, b);
}

// ---- diff ----

#[test]
fn a_new_method_and_a_new_caller_show_as_plus_lines() {
    let before = recommend(&observed_edges(), &shop(), &RecommendOptions::default());
    let mut edges = observed_edges();
    edges.push(http(
        "frontend",
        "shop/orders",
        "PUT",
        "/orders/*",
        EdgeVerdict::Allow,
        1,
    ));
    edges.push(http(
        "refunds",
        "shop/payments",
        "POST",
        "/refund",
        EdgeVerdict::Allow,
        1,
    ));
    let after = recommend(&edges, &shop(), &RecommendOptions::default());
    let previous = parse_documents("before.yaml", &before.to_yaml()).unwrap();
    let d = diff(&previous, &after);
    assert_eq!(
        d.to_string(),
        "~ AuthorizationPolicy/shop/orders-recommended\n\
         ~   rule from-frontend\n\
         \x20     from.identities: spiffe://bulkhead.local/ns/shop/sa/frontend\n\
         \x20     to.methods: GET\n\
         \x20     to.methods: POST\n\
         +     to.methods: PUT\n\
         \x20     to.paths: /orders\n\
         \x20     to.paths: /orders/*\n\
         \x20     to.ports: 8080\n\
         ~ AuthorizationPolicy/shop/payments-recommended\n\
         +   rule from-refunds\n\
         +     from.identities: spiffe://bulkhead.local/ns/shop/sa/refunds\n\
         +     to.methods: POST\n\
         +     to.paths: /refund\n\
         +     to.ports: 8080\n"
    );
}

#[test]
fn gone_traffic_shows_as_removed_rules_and_policies() {
    let before = recommend(&observed_edges(), &shop(), &RecommendOptions::default());
    let edges: Vec<Edge> = observed_edges()
        .into_iter()
        .filter(|e| e.key.destination.name == "orders" && e.key.source_identity != id("cart"))
        .collect();
    let after = recommend(&edges, &shop(), &RecommendOptions::default());
    let d = diff(&before.resources(), &after);
    assert_eq!(
        d.to_string(),
        "- AuthorizationPolicy/shop/db-recommended\n\
         -   action: allow\n\
         -   direction: ingress\n\
         -   mode: audit\n\
         -   selector.workload: db\n\
         -   rule from-payments\n\
         -     from.identities: spiffe://bulkhead.local/ns/shop/sa/payments\n\
         -     to.ports: 5432\n\
         ~ AuthorizationPolicy/shop/orders-recommended\n\
         -   rule from-cart\n\
         -     from.identities: spiffe://bulkhead.local/ns/shop/sa/cart\n\
         -     to.methods: GET\n\
         -     to.paths: /orders/*\n\
         -     to.ports: 8080\n\
         - AuthorizationPolicy/shop/payments-recommended\n\
         -   action: allow\n\
         -   direction: ingress\n\
         -   mode: audit\n\
         -   selector.workload: payments\n\
         -   rule from-orders\n\
         -     from.identities: spiffe://bulkhead.local/ns/shop/sa/orders\n\
         -     to.methods: POST\n\
         -     to.paths: /charge\n\
         -     to.ports: 8080\n"
    );
}

#[test]
fn the_same_recommendation_has_no_diff_and_other_resources_are_ignored() {
    let rec = recommend(&observed_edges(), &shop(), &RecommendOptions::default());
    let mut previous = shop();
    previous.extend(rec.resources());
    let d = diff(&previous, &rec);
    assert!(d.is_empty());
    assert_eq!(d.to_string(), "no changes\n");
}

#[test]
fn methods_are_written_once_in_upper_case_and_sorted() {
    let edges = vec![
        http(
            "frontend",
            "shop/orders",
            "post",
            "/orders",
            EdgeVerdict::Allow,
            1,
        ),
        http(
            "frontend",
            "shop/orders",
            "POST",
            "/orders",
            EdgeVerdict::Allow,
            1,
        ),
        http(
            "frontend",
            "shop/orders",
            "DELETE",
            "/orders",
            EdgeVerdict::Allow,
            1,
        ),
    ];
    let rec = recommend(&edges, &shop(), &RecommendOptions::default());
    assert!(
        rec.to_yaml().contains("        methods: [DELETE, POST]\n"),
        "{}",
        rec.to_yaml()
    );
}
