use super::*;
use crate::edge::{EdgeKey, EdgeVerdict};
use bulkhead_policy::parse_documents;

/// 2024-05-01T10:00:00Z
const T: u64 = 1_714_557_600;

const SHOP: &str = include_str!("../../testdata/impact-shop.yaml");

fn parse(text: &str) -> Vec<Resource> {
    parse_documents("test.yaml", text).unwrap()
}

fn compile(resources: &[Resource], revision: u64) -> PolicySet {
    PolicySet::compile(resources, revision).unwrap_or_else(|errors| {
        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        panic!("{}", errors.join("\n"))
    })
}

/// `edges` replayed from `current` (compiled as revision 1) to `candidate` (revision 2).
fn replay(
    edges: &[Edge],
    current: &[Resource],
    candidate: &[Resource],
    declared: &[Resource],
) -> Impact {
    impact(
        edges,
        &compile(current, 1),
        &compile(candidate, 2),
        declared,
    )
}

/// Each change as `Change flow | decision after`.
fn changes(impact: &Impact) -> Vec<String> {
    impact
        .changes
        .iter()
        .map(|c| format!("{:?} {} | {}", c.change, c.flow, c.after))
        .collect()
}

fn wl(s: &str) -> WorkloadRef {
    let (namespace, name) = s.split_once('/').unwrap();
    WorkloadRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// `count` requests from shop's `from` to `to`, the last `last` seconds after T.
fn edge(
    direction: Direction,
    from: &str,
    to: &str,
    method: &str,
    path: &str,
    count: u64,
    last: u64,
) -> Edge {
    Edge {
        key: EdgeKey {
            source_identity: Some(
                format!("spiffe://bulkhead.local/ns/shop/sa/{from}")
                    .parse()
                    .unwrap(),
            ),
            source_workload: Some(wl(&format!("shop/{from}"))),
            destination: wl(to),
            port: 8080,
            protocol: Protocol::Http,
            method: Some(method.into()),
            path: Some(path.into()),
            verdict: EdgeVerdict::Allow,
            policy: None,
            rule: None,
            direction,
        },
        stats: EdgeStats {
            count,
            first_seen: T,
            last_seen: T + last,
            ..EdgeStats::default()
        },
    }
}

fn ingress(from: &str, to: &str, method: &str, path: &str, count: u64) -> Edge {
    edge(Direction::Ingress, from, to, method, path, count, 60)
}

fn shop_edges() -> Vec<Edge> {
    vec![
        ingress("frontend", "shop/orders", "GET", "/orders", 30),
        ingress("frontend", "shop/orders", "GET", "/orders/*", 10),
        ingress("frontend", "shop/orders", "POST", "/orders", 2),
        ingress("frontend", "shop/orders", "POST", "/orders/*/cancel", 5),
        ingress("orders", "shop/payments", "POST", "/charge", 7),
        // Denied today; stays denied.
        ingress("frontend", "shop/payments", "POST", "/charge", 1),
    ]
}

const STAGED: &str = include_str!("../../testdata/impact-staged.yaml");

#[test]
fn enforcing_a_staged_deny_lists_exactly_the_flows_it_would_break() {
    let mut current = parse(SHOP);
    current.extend(parse(STAGED));
    let impact = replay(&shop_edges(), &current, &enforce_all(&current), &current);
    assert_eq!(
        impact.to_string(),
        "newly denied: spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend) -> shop/orders:8080 http POST /orders/*/cancel, ingress\n\
         \x20 5 requests, last seen 2024-05-01T10:01:00Z\n\
         \x20 before: allowed by policy shop/orders-allow-frontend rule frontend-manages-orders (revision 1); audit: would deny (policy shop/orders-deny-frontend-writes rule frontend-writes)\n\
         \x20 after:  denied by policy shop/orders-deny-frontend-writes rule frontend-writes (revision 2)\n\
         newly denied: spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend) -> shop/orders:8080 http POST /orders, ingress\n\
         \x20 2 requests, last seen 2024-05-01T10:01:00Z\n\
         \x20 before: allowed by policy shop/orders-allow-frontend rule frontend-manages-orders (revision 1); audit: would deny (policy shop/orders-deny-frontend-writes rule frontend-writes)\n\
         \x20 after:  denied by policy shop/orders-deny-frontend-writes rule frontend-writes (revision 2)\n\
         2 of 6 flows change: 2 newly denied (7 requests), 0 newly allowed (0 requests)\n"
    );
}

#[test]
fn a_candidate_identical_to_current_changes_nothing() {
    let current = parse(SHOP);
    let impact = replay(&shop_edges(), &current, &current, &current);
    assert!(impact.is_empty());
    assert_eq!(
        impact.to_string(),
        "0 of 6 flows change: 0 newly denied (0 requests), 0 newly allowed (0 requests)\n"
    );
}

#[test]
fn edges_of_one_flow_count_together_whatever_their_verdict_was() {
    let mut current = parse(SHOP);
    current.extend(parse(STAGED));
    let mut edges = vec![
        ingress("frontend", "shop/orders", "POST", "/orders", 2),
        ingress("frontend", "shop/orders", "POST", "/orders", 3),
    ];
    edges[1].key.verdict = EdgeVerdict::AllowWouldDeny;
    edges[1].stats.last_seen = T + 500;
    let impact = replay(&edges, &current, &enforce_all(&current), &current);
    assert_eq!(impact.replayed, 1);
    let c = &impact.changes[0];
    assert_eq!((c.stats.count, c.stats.last_seen), (5, T + 500));
}

#[test]
fn replacing_a_broad_allow_with_the_recommendation_shows_what_it_leaves_out() {
    // The frontend was only seen reading orders, so the recommendation allows GET only.
    let current = parse(SHOP);
    let seen = vec![
        ingress("frontend", "shop/orders", "GET", "/orders", 30),
        ingress("orders", "shop/payments", "POST", "/charge", 7),
    ];
    let rec = crate::recommend(&seen, &current, &crate::RecommendOptions::default());
    let candidate: Vec<Resource> = apply(&current, &rec.resources())
        .into_iter()
        .filter(|r| !r.name().name.ends_with("-allow-frontend"))
        .collect();
    let impact = replay(&shop_edges(), &current, &enforce_all(&candidate), &current);
    let denied: Vec<String> = impact
        .newly_denied()
        .map(|c| format!("{} | {}", c.flow, c.after))
        .collect();
    assert_eq!(
        denied,
        vec![
            "spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend) -> shop/orders:8080 http GET /orders/*, ingress | default deny: no policy allows this request (revision 2); nearest miss: policy shop/orders-recommended rule from-frontend matched the identity and port and method but not path /orders/x",
            "spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend) -> shop/orders:8080 http POST /orders/*/cancel, ingress | default deny: no policy allows this request (revision 2); nearest miss: policy shop/orders-recommended rule from-frontend matched the identity and port but not method POST",
            "spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend) -> shop/orders:8080 http POST /orders, ingress | default deny: no policy allows this request (revision 2); nearest miss: policy shop/orders-recommended rule from-frontend matched the identity and port and path but not method POST",
        ]
    );
    assert_eq!(impact.changes.len(), 3);
}

#[test]
fn an_audit_posture_enforced_denies_what_only_the_posture_admitted() {
    let mut current = parse(SHOP);
    current.extend(parse(
        "apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: shop}\nspec: {ingress: allow, egress: allow}\n\
         ---\n\
         apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: recommended, namespace: shop}\nspec: {ingress: deny, mode: audit}\n",
    ));
    let mut plaintext = ingress("legacy", "shop/orders", "GET", "/orders", 4);
    plaintext.key.source_identity = None;
    let edges = vec![
        ingress("frontend", "shop/orders", "GET", "/orders", 30),
        plaintext,
    ];
    let impact = replay(&edges, &current, &enforce_all(&current), &current);
    assert_eq!(
        changes(&impact),
        vec![
            "NewlyDenied shop/legacy (no identity) -> shop/orders:8080 http GET /orders, ingress | default deny: no policy allows this request (revision 2); nearest miss: policy shop/orders-allow-frontend rule frontend-manages-orders matched the method and path but not identity (none)"
        ]
    );
}

#[test]
fn egress_flows_are_replayed_from_the_source_with_the_servers_identity() {
    let current = parse(SHOP);
    let mut candidate = current.clone();
    candidate.extend(parse(
        r#"
apiVersion: bulkhead.dev/v1alpha1
kind: DefaultPosture
metadata: {name: default, namespace: shop}
spec: {egress: deny}
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: frontend-egress, namespace: shop}
spec:
  selector: {workload: frontend}
  direction: egress
  action: allow
  rules:
    - name: to-orders
      to:
        identities: ["spiffe://bulkhead.local/ns/shop/sa/orders"]
        ports: [8080]
"#,
    ));
    let mut unknown = edge(Direction::Egress, "ghost", "shop/orders", "GET", "/", 1, 0);
    unknown.key.source_workload = None;
    let edges = vec![
        edge(
            Direction::Egress,
            "frontend",
            "shop/orders",
            "GET",
            "/orders",
            30,
            60,
        ),
        edge(
            Direction::Egress,
            "frontend",
            "shop/payments",
            "POST",
            "/charge",
            2,
            90,
        ),
        unknown,
    ];
    let impact = replay(&edges, &current, &candidate, &candidate);
    assert_eq!(
        changes(&impact),
        vec![
            "NewlyDenied spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend) -> shop/payments:8080 http POST /charge, egress | default deny: no policy allows this request (revision 2); nearest miss: policy shop/frontend-egress rule to-orders matched the port but not identity spiffe://bulkhead.local/ns/shop/sa/payments"
        ]
    );
    assert_eq!(impact.replayed, 2);
    assert_eq!(impact.not_replayed.len(), 1);
}

#[test]
fn enforce_all_switches_policies_and_folds_audit_postures_into_their_scope() {
    let resources = parse(
        r#"
apiVersion: bulkhead.dev/v1alpha1
kind: DefaultPosture
metadata: {name: default, namespace: shop}
spec: {ingress: allow, egress: deny}
---
apiVersion: bulkhead.dev/v1alpha1
kind: DefaultPosture
metadata: {name: recommended, namespace: shop}
spec: {ingress: deny, mode: audit}
---
apiVersion: bulkhead.dev/v1alpha1
kind: DefaultPosture
metadata: {name: default}
spec: {ingress: allow}
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: staged, namespace: shop}
spec:
  selector: {workload: orders}
  action: deny
  mode: audit
  rules: [{name: all}]
"#,
    );
    let summaries: Vec<String> = enforce_all(&resources)
        .iter()
        .map(|r| format!("{}: {}", r.key(), r.summary()))
        .collect();
    assert_eq!(
        summaries,
        vec![
            "DefaultPosture/shop/recommended: ingress deny, egress deny",
            "DefaultPosture/*/default: ingress allow, egress (inherit)",
            "AuthorizationPolicy/shop/staged: ingress deny, workload orders, 1 rule(s)",
        ]
    );
}

#[test]
fn apply_replaces_by_key_and_appends_the_rest() {
    let current = parse(SHOP);
    let changes = parse(
        r#"
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: orders, namespace: shop}
spec:
  identity: spiffe://bulkhead.local/ns/shop/sa/orders
  ports: [{port: 9090, protocol: grpc}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: cart, namespace: shop}
spec:
  identity: spiffe://bulkhead.local/ns/shop/sa/cart
"#,
    );
    let keys: Vec<String> = apply(&current, &changes)
        .iter()
        .map(|r| format!("{} {}", r.key(), r.summary()))
        .collect();
    assert_eq!(
        keys,
        vec![
            "Workload/shop/frontend spiffe://bulkhead.local/ns/shop/sa/frontend ports 8080/http",
            "Workload/shop/orders spiffe://bulkhead.local/ns/shop/sa/orders ports 9090/grpc",
            "Workload/shop/payments spiffe://bulkhead.local/ns/shop/sa/payments ports 8080/http",
            "AuthorizationPolicy/shop/orders-allow-frontend ingress allow, workload orders, 1 rule(s)",
            "AuthorizationPolicy/shop/payments-allow-orders ingress allow, workload payments, 1 rule(s)",
            "Workload/shop/cart spiffe://bulkhead.local/ns/shop/sa/cart ports ",
        ]
    );
}

#[test]
fn a_template_replays_as_a_path_that_matches_it() {
    assert_eq!(concrete_path("/orders/*/items/*"), "/orders/x/items/x");
    assert_eq!(concrete_path("/files/*.pdf"), "/files/x.pdf");
    assert_eq!(concrete_path("/api/**/health"), "/api/x/health");
    assert_eq!(concrete_path("/"), "/");
}

/// Replays are built as a sidecar builds requests: a template recorded with an escaped
/// letter is the path policy sees now, and a flow a sidecar would refuse is not replayed.
#[test]
fn replays_use_the_canonical_request() {
    let current = parse(SHOP);
    let candidate = parse(&format!(
        "{SHOP}---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: orders-deny-admin, namespace: shop}}\nspec:\n  selector: {{workload: orders}}\n  action: deny\n  rules:\n    - name: admin\n      to: {{paths: [\"/orders/admin\", \"/orders/admin/*\"]}}\n"
    ));
    let edges = vec![
        ingress("frontend", "shop/orders", "GET", "/orders/%61dmin/*", 3),
        ingress("frontend", "shop/orders", "get", "/orders/*", 2),
        ingress("frontend", "shop/orders", "GET", "/orders/../x", 1),
    ];
    let impact = replay(&edges, &current, &candidate, &candidate);
    assert_eq!(
        changes(&impact),
        vec![
            "NewlyDenied spiffe://bulkhead.local/ns/shop/sa/frontend (shop/frontend) -> shop/orders:8080 http GET /orders/%61dmin/*, ingress | denied by policy shop/orders-deny-admin rule admin (revision 2)"
        ]
    );
    assert_eq!(impact.replayed, 1);
    assert_eq!(impact.refused.len(), 2);
    assert!(
        impact.to_string().ends_with("; 2 flows a sidecar refuses before any policy (a lower-case method or an ambiguous path) not replayed\n"),
        "{impact}"
    );
}
