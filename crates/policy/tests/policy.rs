//! Policy behaviour as data: one `check` helper, tables of requests and expected verdicts.

use bulkhead_policy::{
    Decision, PolicyError, PolicySet, Request, model::ResourceName, parse_documents,
};

const SHOP: &str = r#"
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: payments-allow
  namespace: shop
spec:
  selector:
    workload: payments
  action: allow
  rules:
    - name: charge
      from:
        identities: ["spiffe://td/ns/shop/sa/orders"]
      to:
        methods: [POST]
        paths: ["/charge"]
    - name: monitoring
      from:
        identities: ["spiffe://td/ns/monitoring/*"]
      to:
        methods: [GET]
        paths: ["/metrics", "/health/*"]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: payments-deny-admin
  namespace: shop
spec:
  selector:
    workload: payments
  action: deny
  rules:
    - name: admin-paths
      to:
        paths: ["/admin/*", "/admin"]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: catalog-open
  namespace: shop
spec:
  selector:
    workload: catalog
  action: allow
  rules:
    - from:
        identities: ["spiffe://td/*"]
"#;

fn check(yaml: &str, from: &str, workload: &str, method: &str, path: &str, expected: &str) {
    let resources = parse_documents("test.yaml", yaml).expect("policy parses");
    let set = PolicySet::compile(&resources, 7);
    let (namespace, name) = workload.split_once('/').expect("ns/name");
    let workload = ResourceName {
        namespace: namespace.into(),
        name: name.into(),
    };
    let d = set.evaluate(&Request {
        source: from,
        workload: &workload,
        method,
        path,
    });
    assert_eq!(d.to_string(), expected, "{from} {method} {workload}{path}");
}

#[test]
fn verdicts() {
    let orders = "spiffe://td/ns/shop/sa/orders";
    let frontend = "spiffe://td/ns/shop/sa/frontend";
    let prom = "spiffe://td/ns/monitoring/sa/prometheus";
    let cases = [
        (
            orders,
            "shop/payments",
            "POST",
            "/charge",
            "allowed by policy shop/payments-allow rule charge (revision 7)",
        ),
        (
            prom,
            "shop/payments",
            "GET",
            "/metrics",
            "allowed by policy shop/payments-allow rule monitoring (revision 7)",
        ),
        (
            prom,
            "shop/payments",
            "GET",
            "/health/live",
            "allowed by policy shop/payments-allow rule monitoring (revision 7)",
        ),
        (
            orders,
            "shop/payments",
            "POST",
            "/admin/users",
            "denied by policy shop/payments-deny-admin rule admin-paths (revision 7)",
        ),
        (
            prom,
            "shop/payments",
            "GET",
            "/admin",
            "denied by policy shop/payments-deny-admin rule admin-paths (revision 7)",
        ),
        (
            orders,
            "shop/payments",
            "GET",
            "/charge",
            "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-allow rule charge matched the identity and path but not method GET",
        ),
        (
            frontend,
            "shop/payments",
            "POST",
            "/charge",
            "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-allow rule charge matched the method and path but not identity spiffe://td/ns/shop/sa/frontend",
        ),
        (
            orders,
            "shop/payments",
            "POST",
            "/charge/x",
            "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-allow rule charge matched the identity and method but not path /charge/x",
        ),
        (
            frontend,
            "shop/catalog",
            "DELETE",
            "/anything",
            "allowed by policy shop/catalog-open rule rules[0] (revision 7)",
        ),
        (
            "spiffe://other/ns/shop/sa/x",
            "shop/catalog",
            "GET",
            "/",
            "default deny: no policy allows this request (revision 7); nearest miss: policy shop/catalog-open rule rules[0] matched the method and path but not identity spiffe://other/ns/shop/sa/x",
        ),
        (
            orders,
            "shop/unknown",
            "GET",
            "/",
            "default deny: no policy allows this request (revision 7); no allow policy selects this workload",
        ),
        (
            orders,
            "other/payments",
            "POST",
            "/charge",
            "default deny: no policy allows this request (revision 7); no allow policy selects this workload",
        ),
    ];
    for (from, workload, method, path, expected) in cases {
        check(SHOP, from, workload, method, path, expected);
    }
}

#[test]
fn empty_policy_set_denies() {
    let set = PolicySet::compile(&[], 1);
    let w = ResourceName {
        namespace: "a".into(),
        name: "b".into(),
    };
    let d = set.evaluate(&Request {
        source: "spiffe://td/x",
        workload: &w,
        method: "GET",
        path: "/",
    });
    assert!(!d.is_allow());
    assert_eq!(d.header_value(), "deny; policy=default-deny; revision=1");
}

fn error_of(yaml: &str) -> String {
    match parse_documents("p.yaml", yaml) {
        Err(e @ (PolicyError::Parse { .. } | PolicyError::Invalid { .. })) => e.to_string(),
        other => panic!("expected an error, got {other:?}"),
    }
}

const HEAD: &str = "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\nspec:\n  selector:\n    workload: w\n";

#[test]
fn errors_name_file_line_column() {
    let cases = [
        (
            format!(
                "{HEAD}  action: allow\n  rules:\n    - from:\n        identities: [\"orders\"]\n"
            ),
            "p.yaml:11:22: identity \"orders\" must start with \"spiffe://\"",
        ),
        (
            format!("{HEAD}  action: allow\n  rules:\n    - to:\n        paths: [\"admin\"]\n"),
            "p.yaml:11:17: path \"admin\" must start with '/'",
        ),
        (
            format!("{HEAD}  action: allow\n  rules:\n    - to:\n        methods: [FETCH]\n"),
            "p.yaml:11:19: unknown HTTP method \"FETCH\"",
        ),
        (format!("{HEAD}  action: permit\n"), "p.yaml:8:"),
        (
            format!("{HEAD}  action: allow\n  rulez: []\n"),
            "p.yaml:9:3:",
        ),
        (
            HEAD.replace("kind: AuthorizationPolicy", "kind: Firewall") + "  action: allow\n",
            "p.yaml:2:7: unknown kind \"Firewall\"",
        ),
        (
            HEAD.replace("name: p", "name: Bad_Name") + "  action: allow\n",
            "p.yaml:4:9: \"Bad_Name\" is not a valid name",
        ),
    ];
    for (yaml, want) in cases {
        let got = error_of(&yaml);
        assert!(got.starts_with(want), "want prefix {want:?}\n got {got:?}");
    }
}

#[test]
fn model_round_trips_through_json() {
    let resources = parse_documents("shop.yaml", SHOP).unwrap();
    let json = serde_json::to_string(&resources).unwrap();
    let back: Vec<bulkhead_policy::model::Resource> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, resources);
}

#[test]
fn decision_header_names_policy_and_rule() {
    let resources = parse_documents("shop.yaml", SHOP).unwrap();
    let set = PolicySet::compile(&resources, 3);
    let w = ResourceName {
        namespace: "shop".into(),
        name: "payments".into(),
    };
    let d = set.evaluate(&Request {
        source: "spiffe://td/ns/shop/sa/orders",
        workload: &w,
        method: "GET",
        path: "/admin",
    });
    assert!(matches!(d, Decision::Deny(_)));
    assert_eq!(
        d.header_value(),
        "deny; policy=shop/payments-deny-admin; rule=admin-paths; revision=3"
    );
}
