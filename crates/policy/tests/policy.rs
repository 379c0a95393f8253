//! Policy behaviour as data: one `check` helper, tables of requests and expected verdicts,
//! and tables of refused files with their exact `file:line:column`.
//!
//! One test binary: the modules below share these helpers.

#[path = "policy/issue15.rs"]
mod issue15;
#[path = "policy/reach.rs"]
mod reach;
#[path = "policy/staged_postures.rs"]
mod staged_postures;

use bulkhead_policy::model::{Direction, Resource, ResourceName};
use bulkhead_policy::{
    Decision, Http, Peer, PolicyError, PolicySet, Protocol, Request, load, parse_documents,
};

const DECLARATIONS: &str = include_str!("fixtures/declarations.yaml");

/// One request: `direction subject peer-identity [ip] port protocol [METHOD path [host] [h=v,…]]`.
struct Case<'a> {
    direction: Direction,
    subject: &'a str,
    peer: &'a str,
    peer_workload: Option<&'a str>,
    ip: Option<&'a str>,
    port: u16,
    protocol: Protocol,
    method: &'a str,
    path: &'a str,
    host: Option<&'a str>,
    headers: &'a [(&'a str, &'a str)],
}

fn ingress<'a>(subject: &'a str, peer: &'a str, method: &'a str, path: &'a str) -> Case<'a> {
    Case {
        direction: Direction::Ingress,
        subject,
        peer,
        peer_workload: None,
        ip: None,
        port: 8080,
        protocol: Protocol::Http,
        method,
        path,
        host: None,
        headers: &[],
    }
}

fn wref(s: &str) -> ResourceName {
    let (namespace, name) = s.split_once('/').expect("ns/name");
    ResourceName {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Compiles `policies` (with the shared declarations) at revision 7.
fn compile(policies: &str) -> PolicySet {
    let files = vec![
        ("decl.yaml".to_string(), DECLARATIONS.to_string()),
        ("p.yaml".to_string(), policies.to_string()),
    ];
    let (_, set) = load(&files, 7).unwrap_or_else(|e| panic!("policy refused: {e:?}"));
    set
}

/// Decides one case.
fn decide(set: &PolicySet, c: &Case<'_>) -> Decision {
    let subject = wref(c.subject);
    let peer_workload = c.peer_workload.map(wref);
    let http = (c.protocol != Protocol::Tcp).then_some(Http {
        method: c.method,
        path: c.path,
        host: c.host,
        headers: &c.headers,
    });
    set.evaluate(&Request {
        direction: c.direction,
        subject: &subject,
        peer: Peer {
            identity: Some(c.peer),
            ip: c.ip.map(|i| i.parse().expect("ip")),
            workload: peer_workload.as_ref(),
        },
        port: c.port,
        protocol: c.protocol,
        http,
    })
}

/// Compiles `policies` (with the shared declarations) and checks each case's explanation.
fn check(policies: &str, cases: &[(Case<'_>, &str)]) {
    let set = compile(policies);
    for (c, expected) in cases {
        let got = decide(&set, c).to_string();
        assert_eq!(
            &got,
            expected,
            "{} {} {} {}:{} {}",
            c.subject,
            c.peer,
            c.method,
            c.port,
            c.path,
            c.ip.unwrap_or("")
        );
    }
}

const ORDERS: &str = "spiffe://td/ns/shop/sa/orders";
const FRONTEND: &str = "spiffe://td/ns/shop/sa/frontend";
const PROM: &str = "spiffe://td/ns/monitoring/sa/prometheus";

fn policy(name: &str, workload: &str, extra: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{workload: {workload}}}\n{extra}  rules:\n{rules}"
    )
}

#[test]
fn identities_methods_paths_and_deny_precedence() {
    let p = policy(
        "payments-allow",
        "payments",
        "  action: allow\n",
        "    - name: charge\n      from: {identities: [\"spiffe://td/ns/shop/sa/orders\"]}\n      to: {methods: [POST], paths: [\"/charge\"], ports: [8080]}\n    - name: monitoring\n      from: {identities: [\"spiffe://td/ns/monitoring/*\"]}\n      to: {methods: [GET], paths: [\"/metrics\", \"/health/*\"], ports: [8080]}\n",
    ) + &policy(
        "payments-deny-admin",
        "payments",
        "  action: deny\n",
        "    - name: admin-paths\n      to: {paths: [\"/admin\", \"/admin/*\"], ports: [8080]}\n",
    );
    check(
        &p,
        &[
            (
                ingress("shop/payments", ORDERS, "POST", "/charge"),
                "allowed by policy shop/payments-allow rule charge (revision 7)",
            ),
            (
                ingress("shop/payments", PROM, "GET", "/health/live"),
                "allowed by policy shop/payments-allow rule monitoring (revision 7)",
            ),
            (
                ingress("shop/payments", ORDERS, "POST", "/admin/users"),
                "denied by policy shop/payments-deny-admin rule admin-paths (revision 7)",
            ),
            (
                ingress("shop/payments", ORDERS, "GET", "/charge"),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-allow rule charge matched the identity and port and path but not method GET",
            ),
            (
                ingress("shop/payments", FRONTEND, "POST", "/charge"),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-allow rule charge matched the port and method and path but not identity spiffe://td/ns/shop/sa/frontend",
            ),
            (
                ingress("shop/orders", ORDERS, "GET", "/"),
                "default deny: no policy allows this request (revision 7); no allow policy selects this workload",
            ),
        ],
    );
}

#[test]
fn namespaces_labels_cidrs_and_negations() {
    let p = policy(
        "orders-allow",
        "orders",
        "  action: allow\n",
        "    - name: same-namespace\n      from: {namespaces: [shop], notIdentities: [\"spiffe://td/ns/shop/sa/frontend\"]}\n    - name: web-tier\n      from: {workloadLabels: {tier: web}, cidrs: [10.1.0.0/16], notCidrs: [10.1.9.0/24]}\n",
    );
    let mut web_in = ingress("shop/orders", FRONTEND, "GET", "/x");
    web_in.ip = Some("10.1.2.3");
    let mut web_out = ingress("shop/orders", FRONTEND, "GET", "/x");
    web_out.ip = Some("10.1.9.3");
    check(
        &p,
        &[
            (
                ingress("shop/orders", "spiffe://td/ns/shop/sa/payments", "GET", "/"),
                "allowed by policy shop/orders-allow rule same-namespace (revision 7)",
            ),
            (
                ingress("shop/orders", PROM, "GET", "/"),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/orders-allow rule same-namespace matched the identity but not namespace monitoring",
            ),
            (
                web_in,
                "allowed by policy shop/orders-allow rule web-tier (revision 7)",
            ),
            (
                web_out,
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/orders-allow rule same-namespace matched the namespace but not identity spiffe://td/ns/shop/sa/frontend",
            ),
        ],
    );
}

#[test]
fn a_federated_identity_is_in_no_namespace_of_this_mesh_but_can_be_named() {
    let p = policy(
        "orders-allow",
        "orders",
        "  action: allow\n",
        "    - name: same-namespace\n      from: {namespaces: [shop]}\n    - name: partner\n      from: {identities: [\"spiffe://partner.test/ns/shop/sa/frontend\"]}\n      to: {methods: [GET]}\n",
    );
    check(
        &p,
        &[
            (
                ingress(
                    "shop/orders",
                    "spiffe://td/ns/shop/sa/payments",
                    "POST",
                    "/",
                ),
                "allowed by policy shop/orders-allow rule same-namespace (revision 7)",
            ),
            // Another trust domain's /ns/shop/ is not this mesh's namespace shop.
            (
                ingress(
                    "shop/orders",
                    "spiffe://partner.test/ns/shop/sa/payments",
                    "POST",
                    "/",
                ),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/orders-allow rule same-namespace did not match namespace (none: the caller is of another trust domain)",
            ),
            (
                ingress(
                    "shop/orders",
                    "spiffe://partner.test/ns/shop/sa/frontend",
                    "GET",
                    "/",
                ),
                "allowed by policy shop/orders-allow rule partner (revision 7)",
            ),
        ],
    );
}

#[test]
fn ports_protocols_hosts_headers_grpc_globs() {
    let p = policy(
        "payments-l7",
        "payments",
        "  action: allow\n",
        "    - name: db\n      to: {ports: [5432], protocols: [tcp]}\n    - name: api\n      to: {ports: [\"8000-8099\"], hosts: [\"*.shop.local\"], paths: [\"/v1/*/invoices/**\"], notMethods: [DELETE]}\n      when: [{header: x-env, values: [prod]}, {header: x-debug, present: false}]\n    - name: rpc\n      to: {ports: [9090], grpc: {methods: [shop.Payments/Charge]}}\n",
    );
    let mut db = ingress("shop/payments", ORDERS, "", "");
    db.port = 5432;
    db.protocol = Protocol::Tcp;
    let mut api = ingress("shop/payments", ORDERS, "GET", "/v1/acme/invoices/2026/1");
    api.host = Some("pay.shop.local");
    api.headers = &[("x-env", "prod")];
    let mut debug = ingress("shop/payments", ORDERS, "GET", "/v1/acme/invoices");
    debug.host = Some("pay.shop.local");
    debug.headers = &[("x-env", "prod"), ("x-debug", "1")];
    let mut rpc = ingress("shop/payments", ORDERS, "POST", "/shop.Payments/Charge");
    rpc.port = 9090;
    rpc.protocol = Protocol::Grpc;
    let mut refund = ingress("shop/payments", ORDERS, "POST", "/shop.Payments/Refund");
    refund.port = 9090;
    refund.protocol = Protocol::Grpc;
    check(
        &p,
        &[
            (
                db,
                "allowed by policy shop/payments-l7 rule db (revision 7)",
            ),
            (
                api,
                "allowed by policy shop/payments-l7 rule api (revision 7)",
            ),
            (
                debug,
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-l7 rule api matched the port and method and path and host and header but not header x-debug \"1\"",
            ),
            (
                rpc,
                "allowed by policy shop/payments-l7 rule rpc (revision 7)",
            ),
            (
                refund,
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-l7 rule rpc matched the port but not gRPC method /shop.Payments/Refund",
            ),
        ],
    );
}

#[test]
fn audit_mode_reports_without_changing_the_verdict() {
    let p = policy(
        "orders-allow-all",
        "orders",
        "  action: allow\n",
        "    - name: anyone\n",
    ) + &policy(
        "orders-staged",
        "orders",
        "  action: deny\n  mode: audit\n",
        "    - name: no-frontend\n      from: {identities: [\"spiffe://td/ns/shop/sa/frontend\"]}\n",
    );
    check(
        &p,
        &[
            (
                ingress("shop/orders", FRONTEND, "GET", "/"),
                "allowed by policy shop/orders-allow-all rule anyone (revision 7); audit: would deny (policy shop/orders-staged rule no-frontend)",
            ),
            (
                ingress("shop/orders", ORDERS, "GET", "/"),
                "allowed by policy shop/orders-allow-all rule anyone (revision 7)",
            ),
        ],
    );
}

#[test]
fn egress_and_postures() {
    let p = "---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: shop}\nspec: {egress: deny}\n".to_string()
        + &policy("frontend-egress", "frontend", "  direction: egress\n  action: allow\n", "    - name: to-backend\n      to: {services: [backend], ports: [8080], methods: [GET]}\n");
    let egress = |peer: &'static str, workload: &'static str, method: &'static str| Case {
        direction: Direction::Egress,
        peer_workload: Some(workload),
        ..ingress("shop/frontend", peer, method, "/")
    };
    check(
        &p,
        &[
            (
                egress(ORDERS, "shop/orders", "GET"),
                "allowed by policy shop/frontend-egress rule to-backend (revision 7)",
            ),
            (
                egress(ORDERS, "shop/orders", "POST"),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/frontend-egress rule to-backend matched the destination workload and port but not method POST",
            ),
            (
                egress(FRONTEND, "shop/frontend", "GET"),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/frontend-egress rule to-backend matched the port and method but not destination workload shop/frontend",
            ),
        ],
    );
}

#[test]
fn empty_policy_set_denies_ingress() {
    let set = PolicySet::compile(&[], 1).unwrap();
    let _: &dyn bulkhead_policy::Headers = &Vec::<(String, String)>::new();
    let w = wref("a/b");
    let req = Request {
        direction: Direction::Ingress,
        subject: &w,
        peer: Peer {
            identity: Some("spiffe://td/x"),
            ..Peer::default()
        },
        port: 80,
        protocol: Protocol::Tcp,
        http: None,
    };
    let d = set.evaluate(&req);
    assert!(!d.is_allow());
    assert_eq!(d.header_value(), "deny; policy=default-deny; revision=1");
}

fn first_error(files: &[(&str, &str)]) -> String {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    match load(&files, 1) {
        Err(errors) => match &errors[0] {
            e @ (PolicyError::Parse { .. } | PolicyError::Invalid { .. }) => e.to_string(),
            other => panic!("unexpected error kind {other:?}"),
        },
        Ok(_) => panic!("expected an error"),
    }
}

/// Each case's `p.yaml`, loaded after the declarations, fails first with an error starting
/// with its expected text; every mismatch is printed (with its YAML) before the test fails.
fn check_first_errors(cases: &[(String, &str)]) {
    let mut failed = false;
    for (yaml, want) in cases {
        let got = first_error(&[("decl.yaml", DECLARATIONS), ("p.yaml", yaml)]);
        if !got.starts_with(want) {
            eprintln!("MISMATCH want {want:?}\n got {got:?}\n{yaml}");
            failed = true;
        }
    }
    assert!(
        !failed,
        "some errors were not as expected (see MISMATCH lines)"
    );
}

const HEAD: &str = "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  selector:\n    workload: payments\n";

#[test]
fn errors_name_file_line_column() {
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "{HEAD}  action: allow\n  rules:\n    - from:\n        identities: [\"orders\"]\n"
            ),
            "p.yaml:12:22: identity \"orders\" must start with \"spiffe://\"",
        ),
        (
            format!("{HEAD}  action: allow\n  rules:\n    - to:\n        paths: [\"admin\"]\n"),
            "p.yaml:12:17: path \"admin\" must start with '/'",
        ),
        (
            format!("{HEAD}  action: allow\n  rules:\n    - to:\n        methods: [FETCH]\n"),
            "p.yaml:12:19: unknown HTTP method \"FETCH\"",
        ),
        (
            format!("{HEAD}  action: allow\n  rules:\n    - to:\n        ports: [\"9-1\"]\n"),
            "p.yaml:12:17: port range \"9-1\" is empty",
        ),
        (
            format!("{HEAD}  action: allow\n  rules:\n    - from:\n        cidrs: [10.0.0.0/33]\n"),
            "p.yaml:12:17:",
        ),
        (format!("{HEAD}  action: permit\n"), "p.yaml:9:11:"),
        (
            format!("{HEAD}  action: allow\n  rulez: []\n"),
            "p.yaml:10:3:",
        ),
        (
            HEAD.replace("kind: AuthorizationPolicy", "kind: Firewall") + "  action: allow\n",
            "p.yaml:2:7: unknown kind \"Firewall\"",
        ),
        (
            HEAD.replace("name: p", "name: Bad_Name") + "  action: allow\n",
            "p.yaml:4:9: \"Bad_Name\" is not a valid name",
        ),
        // The typed compiler: HTTP conditions on an opaque TCP port are refused, not dropped.
        (
            format!(
                "{HEAD}  action: allow\n  rules:\n    - name: admin\n      to:\n        paths: [\"/admin\"]\n"
            ),
            "p.yaml:13:9: policy shop/p rule admin uses paths, but it applies to port 5432 of shop/payments, declared tcp (opaque TCP), where they cannot be enforced",
        ),
        (
            format!(
                "{HEAD}  action: deny\n  rules:\n    - name: rpc\n      to:\n        ports: [8080]\n        grpc: {{services: [shop.Payments]}}\n"
            ),
            "p.yaml:13:9: policy shop/p rule rpc uses grpc, but it applies to port 8080 of shop/payments, declared http",
        ),
        (
            HEAD.replace("workload: payments", "workload: ghost")
                + "  action: allow\n  rules:\n    - name: r\n      to:\n        methods: [GET]\n",
            "p.yaml:13:9: policy shop/p rule r uses methods on workload shop/ghost, which has no Workload declaration",
        ),
        (
            format!(
                "{HEAD}  action: allow\n  rules:\n    - name: r\n      to:\n        workloads: [orders]\n"
            ),
            "p.yaml:13:9: policy shop/p rule r: in an ingress rule the destination is the selected workload",
        ),
        (
            format!(
                "{HEAD}  direction: egress\n  action: allow\n  rules:\n    - name: r\n      from:\n        namespaces: [shop]\n"
            ),
            "p.yaml:14:9: policy shop/p rule r: an egress rule has no `from`",
        ),
        (
            format!("{HEAD}  action: allow\n  rules:\n    - name: a\n    - name: a\n"),
            "p.yaml:12:13: two rules are named \"a\"",
        ),
        (
            format!("{HEAD}  action: allow\n---\n{HEAD}  action: deny\n"),
            "p.yaml:14:9: AuthorizationPolicy/shop/p is defined twice; first defined at p.yaml:4:9",
        ),
    ];
    check_first_errors(&cases);
}

#[test]
fn parse_print_parse_is_stable() {
    let p = policy(
        "payments-l7",
        "payments",
        "  action: allow\n  mode: audit\n",
        "    - name: api\n      from: {identities: [\"spiffe://td/ns/shop/*\"], cidrs: [10.0.0.0/8]}\n      to: {ports: [\"8000-8099\"], hosts: [\"*.shop.local\"], paths: [\"/v1/*/x/**\", \"/a*\"], notMethods: [DELETE]}\n      when: [{header: x-env, values: [prod]}]\n",
    );
    let resources = parse_documents("p.yaml", &(DECLARATIONS.to_string() + &p)).unwrap();
    for r in &resources {
        let back = Resource::from_json(&r.to_json().unwrap()).unwrap();
        assert_eq!(&back, r);
        let printed = parse_documents("printed.yaml", &r.to_yaml().unwrap()).unwrap();
        assert_eq!(
            printed,
            vec![r.clone()],
            "printed:\n{}",
            r.to_yaml().unwrap()
        );
    }
}

#[test]
fn wildcards_negations_and_postures() {
    let mesh_allow = "---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default}\nspec: {ingress: allow}\n---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: shop}\nspec: {ingress: deny}\n";
    let p = mesh_allow.to_string()
        + &policy(
            "orders-allow",
            "orders",
            "  action: allow\n",
            "    - name: anyone-in-domain\n      from: {identities: [\"spiffe://td/*\"]}\n      to: {hosts: [orders.shop.local], notPaths: [\"/internal/*\"], notHosts: [\"*.evil.local\"], notPorts: [9000]}\n      when: [{header: x-tenant, present: true, notValues: [blocked]}]\n    - name: anyone-at-all\n      from: {identities: [\"*\"]}\n      to: {paths: [\"/public/*\"]}\n",
        );
    let with = |peer: &'static str,
                path: &'static str,
                host: Option<&'static str>,
                headers: &'static [(&'static str, &'static str)]| Case {
        host,
        headers,
        ..ingress("shop/orders", peer, "GET", path)
    };
    let tenant: &'static [(&str, &str)] = &[("x-tenant", "acme")];
    let blocked: &'static [(&str, &str)] = &[("x-tenant", "blocked")];
    check(
        &p,
        &[
            (
                with(FRONTEND, "/orders", Some("orders.shop.local"), tenant),
                "allowed by policy shop/orders-allow rule anyone-in-domain (revision 7)",
            ),
            (
                with(FRONTEND, "/internal/x", Some("orders.shop.local"), tenant),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/orders-allow rule anyone-in-domain matched the identity and port and host and header but not path /internal/x",
            ),
            (
                with(FRONTEND, "/orders", Some("orders.shop.local"), blocked),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/orders-allow rule anyone-in-domain matched the identity and port and path and host but not header x-tenant \"blocked\"",
            ),
            (
                with(FRONTEND, "/orders", Some("orders.shop.local"), &[]),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/orders-allow rule anyone-in-domain matched the identity and port and path and host but not header x-tenant (absent)",
            ),
            (
                with(
                    "spiffe://elsewhere/ns/x/sa/y",
                    "/public/logo.png",
                    None,
                    &[],
                ),
                "allowed by policy shop/orders-allow rule anyone-at-all (revision 7)",
            ),
            (
                with(
                    "spiffe://elsewhere/ns/x/sa/y",
                    "/orders",
                    Some("orders.shop.local"),
                    tenant,
                ),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/orders-allow rule anyone-in-domain matched the port and path and host and header but not identity spiffe://elsewhere/ns/x/sa/y",
            ),
            // The namespace posture (deny) overrides the mesh posture (allow) for shop …
            (
                ingress("shop/frontend", ORDERS, "GET", "/"),
                "default deny: no policy allows this request (revision 7); no allow policy selects this workload",
            ),
            // … and other namespaces get the mesh posture.
            (
                ingress("other/thing", ORDERS, "GET", "/"),
                "allowed by default: mesh posture */default (revision 7)",
            ),
        ],
    );
}

#[test]
fn egress_destinations_by_identity_namespace_and_cidr() {
    let p = policy(
        "frontend-egress",
        "frontend",
        "  direction: egress\n  action: deny\n",
        "    - name: no-monitoring\n      to: {namespaces: [monitoring]}\n    - name: no-payments-id\n      to: {identities: [\"spiffe://td/ns/shop/sa/payments\"]}\n    - name: no-metadata-service\n      to: {cidrs: [169.254.0.0/16]}\n",
    );
    let egress = |peer: &'static str, workload: &'static str, ip: Option<&'static str>| Case {
        direction: Direction::Egress,
        peer_workload: Some(workload),
        ip,
        ..ingress("shop/frontend", peer, "GET", "/")
    };
    check(
        &p,
        &[
            (
                egress(PROM, "monitoring/prometheus", None),
                "denied by policy shop/frontend-egress rule no-monitoring (revision 7)",
            ),
            (
                egress("spiffe://td/ns/shop/sa/payments", "shop/payments", None),
                "denied by policy shop/frontend-egress rule no-payments-id (revision 7)",
            ),
            (
                egress(ORDERS, "shop/orders", Some("169.254.169.254")),
                "denied by policy shop/frontend-egress rule no-metadata-service (revision 7)",
            ),
            (
                egress(ORDERS, "shop/orders", Some("10.0.0.7")),
                "allowed by default: nothing restricts this direction (revision 7)",
            ),
        ],
    );
}

#[test]
fn more_errors_name_file_line_column() {
    let workload = |body: &str| {
        format!(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w, namespace: shop}}\nspec:\n{body}"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        ("kind: Workload\nmetadata: {name: w}\n".into(), "p.yaml:1:1: missing apiVersion"),
        ("apiVersion: v1\nkind: Workload\n".into(), "p.yaml:1:13: apiVersion \"v1\" is not supported"),
        ("apiVersion: bulkhead.dev/v1alpha1\nmetadata: {name: w}\n".into(), "p.yaml:1:1: missing kind"),
        (workload("  identity: spiffe://td/ns/shop/*\n"), "p.yaml:5:13: a workload's identity must be one exact SPIFFE ID"),
        (workload("  identity: spiffe://td/ns/shop/sa/w\n  ports: [{port: 80, protocol: http}, {port: 80, protocol: tcp}]\n"), "p.yaml:6:46: port 80 is zero or declared twice"),
        (workload("  identity: spiffe://td/ns/shop/sa/w\n  ports: [{port: 80, protocol: udp}]\n"), "p.yaml:6:32: unknown variant `udp`"),
        (format!("{HEAD}  action: allow\n  rules:\n    - to:\n        hosts: [\"a.b:80\"]\n"), "p.yaml:12:17: host \"a.b:80\" must be a DNS name"),
        (format!("{HEAD}  action: allow\n  rules:\n    - when: [{{header: \"bad header\"}}]\n"), "p.yaml:11:23: \"bad header\" is not a valid HTTP header name"),
        (format!("{HEAD}  action: allow\n  rules:\n    - to: {{ports: [9090], grpc: {{methods: [\"Payments/\"]}}}}\n"), "p.yaml:11:44: \"Payments/\" is not a gRPC service"),
        (format!("{HEAD}  action: allow\n  rules:\n    - to: {{paths: [\"/a/b**\"]}}\n"), "p.yaml:11:20: path \"/a/b**\": '**' must be a whole segment"),
        (format!("{HEAD}  action: allow\n  rules:\n    - to: {{protocols: [tcp], paths: [\"/x\"]}}\n"), "p.yaml:11:11: policy shop/p rule rules[0] uses paths but limits itself to protocol tcp"),
        (HEAD.replace("    workload: payments\n", "    workload: payments\n    matchLabels: {app: x}\n") + "  action: allow\n", "p.yaml:4:9: selector: give workload or matchLabels, not both"),
        (HEAD.replace("workload: payments", "workload: frontend") + "  direction: egress\n  action: allow\n  rules:\n    - to: {services: [nope]}\n", "p.yaml:12:23: no Service shop/nope is declared"),
        (HEAD.replace("workload: payments", "workload: frontend") + "  direction: egress\n  action: allow\n  rules:\n    - to: {identities: [\"spiffe://td/ns/shop/sa/orders\"], paths: [\"/x\"]}\n",
         "p.yaml:12:11: policy shop/p rule rules[0] uses paths in an egress rule without naming destination workloads or services"),
        ("apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: a}\nspec: {ingress: deny}\n---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: b}\nspec: {ingress: allow}\n".into(),
         "p.yaml:8:18: a second DefaultPosture for the mesh"),
    ];
    check_first_errors(&cases);
}

#[test]
fn fixes_from_review() {
    // A deny rule made only of negations still fires when the attribute is missing: an ID
    // with no /ns/ segment is outside every namespace list.
    let p = policy(
        "orders-all",
        "orders",
        "  action: allow\n",
        "    - name: anyone\n",
    ) + &policy(
        "orders-only-shop",
        "orders",
        "  action: deny\n",
        "    - name: outsiders\n      from: {notNamespaces: [shop]}\n",
    );
    check(
        &p,
        &[
            (
                ingress("shop/orders", "spiffe://td/batch/job", "GET", "/"),
                "denied by policy shop/orders-only-shop rule outsiders (revision 7)",
            ),
            (
                ingress("shop/orders", FRONTEND, "GET", "/"),
                "allowed by policy shop/orders-all rule anyone (revision 7)",
            ),
        ],
    );

    // A bare `header:` requires the header; gRPC services and methods add up.
    let p = policy(
        "payments-rpc",
        "payments",
        "  action: allow\n",
        "    - name: traced\n      to: {ports: [9090], grpc: {services: [shop.Ledger], methods: [shop.Payments/Charge]}}\n      when: [{header: traceparent}]\n",
    );
    let rpc = |path: &'static str, headers: &'static [(&'static str, &'static str)]| Case {
        port: 9090,
        protocol: Protocol::Grpc,
        headers,
        ..ingress("shop/payments", ORDERS, "POST", path)
    };
    let traced: &'static [(&str, &str)] = &[("traceparent", "00-1-2-01")];
    check(
        &p,
        &[
            (
                rpc("/shop.Ledger/Append", traced),
                "allowed by policy shop/payments-rpc rule traced (revision 7)",
            ),
            (
                rpc("/shop.Payments/Charge", traced),
                "allowed by policy shop/payments-rpc rule traced (revision 7)",
            ),
            (
                rpc("/shop.Payments/Refund", traced),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-rpc rule traced matched the port and header but not gRPC method /shop.Payments/Refund",
            ),
            (
                rpc("/shop.Ledger/Append", &[]),
                "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-rpc rule traced matched the port and gRPC method but not header traceparent (absent)",
            ),
        ],
    );

    // HTTP conditions on a workload that declares no ports are refused.
    let decl = "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: bare, namespace: shop}\nspec:\n  identity: spiffe://td/ns/shop/sa/bare\n---\n";
    let got = first_error(&[
        ("decl.yaml", DECLARATIONS),
        (
            "p.yaml",
            &(decl.to_string()
                + &HEAD.replace("workload: payments", "workload: bare")
                + "  action: deny\n  rules:\n    - to: {paths: [\"/admin\"]}\n"),
        ),
    ]);
    assert!(got.starts_with("p.yaml:17:11: policy shop/p rule rules[0] uses paths on workload shop/bare, whose Workload declares no ports"), "{got}");

    // The audit part of the header prefixes both of its keys.
    let p = policy(
        "orders-all",
        "orders",
        "  action: allow\n",
        "    - name: anyone\n",
    ) + &policy(
        "orders-staged",
        "orders",
        "  action: deny\n  mode: audit\n",
        "    - name: staged\n",
    );
    let files = vec![
        ("decl.yaml".to_string(), DECLARATIONS.to_string()),
        ("p.yaml".to_string(), p),
    ];
    let (_, set) = load(&files, 2).unwrap();
    let w = wref("shop/orders");
    let d = set.evaluate(&Request {
        direction: Direction::Ingress,
        subject: &w,
        peer: Peer {
            identity: Some(ORDERS),
            ..Peer::default()
        },
        port: 8080,
        protocol: Protocol::Http,
        http: None,
    });
    assert!(d.would_deny());
    assert_eq!(
        d.header_value(),
        "allow; policy=shop/orders-all; rule=anyone; revision=2; audit=would-deny; audit-policy=shop/orders-staged; audit-rule=staged"
    );
}

#[test]
fn a_proxy_gets_only_what_concerns_it_and_decides_the_same() {
    let p = policy(
        "orders-allow",
        "orders",
        "  action: allow\n",
        "    - name: web\n      from: {workloadLabels: {tier: web}}\n",
    ) + &policy(
        "frontend-egress",
        "frontend",
        "  direction: egress\n  action: allow\n",
        "    - name: to-backend\n      to: {services: [backend], ports: [8080], methods: [GET]}\n",
    ) + "---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: other}\nspec: {ingress: allow}\n";
    let files = vec![
        ("decl.yaml".to_string(), DECLARATIONS.to_string()),
        ("p.yaml".to_string(), p),
    ];
    let (all, full) = load(&files, 3).unwrap();
    let keys = |w: &str| -> Vec<String> {
        bulkhead_policy::relevant_to(&all, &wref(w))
            .iter()
            .map(|r| r.key())
            .collect()
    };
    // orders: its policy, itself, and the callers its labels rule resolves to (frontend).
    assert_eq!(
        keys("shop/orders"),
        [
            "Workload/shop/orders",
            "Workload/shop/frontend",
            "AuthorizationPolicy/shop/orders-allow"
        ]
    );
    // frontend: its egress policy, the service and its members; not other namespaces' postures.
    assert_eq!(
        keys("shop/frontend"),
        [
            "Workload/shop/payments",
            "Workload/shop/orders",
            "Workload/shop/frontend",
            "Service/shop/backend",
            "AuthorizationPolicy/shop/frontend-egress"
        ]
    );
    // payments: nothing selects it; only its own declaration.
    assert_eq!(keys("shop/payments"), ["Workload/shop/payments"]);

    // Each subset compiles and decides as the full set does for its workload.
    for (subject, direction, peer, dest) in [
        ("shop/orders", Direction::Ingress, FRONTEND, None),
        ("shop/orders", Direction::Ingress, ORDERS, None),
        (
            "shop/frontend",
            Direction::Egress,
            ORDERS,
            Some("shop/orders"),
        ),
        (
            "shop/frontend",
            Direction::Egress,
            FRONTEND,
            Some("shop/frontend"),
        ),
        ("shop/payments", Direction::Ingress, ORDERS, None),
    ] {
        let part =
            PolicySet::compile(&bulkhead_policy::relevant_to(&all, &wref(subject)), 3).unwrap();
        let w = wref(subject);
        let d = dest.map(wref);
        const NO_HEADERS: &[(&str, &str)] = &[];
        let req = Request {
            direction,
            subject: &w,
            peer: Peer {
                identity: Some(peer),
                ip: None,
                workload: d.as_ref(),
            },
            port: 8080,
            protocol: Protocol::Http,
            http: Some(Http {
                method: "GET",
                path: "/",
                host: None,
                headers: &NO_HEADERS,
            }),
        };
        assert_eq!(part.evaluate(&req), full.evaluate(&req), "{subject} {peer}");
    }
}

/// The examples' case tables, run through `bulkhead_policy::cases`, the format and judge
/// `bulkhead policy test` uses: what users copy from `examples/` passes here first.
#[test]
fn the_examples_cases_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut ran = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(stem) = name.strip_suffix("-cases.yaml") else {
            continue;
        };
        let policies = root.join(format!("{stem}.yaml"));
        let files = [(
            policies.display().to_string(),
            std::fs::read(&policies).unwrap(),
        )];
        let (_, set) = bulkhead_policy::load_bytes(&files, 0).unwrap();
        let cases = bulkhead_policy::cases::read_cases(&name, &std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        for case in &cases {
            let verdict = case.run(&set).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                verdict.passed(),
                "{name}: {}: {}\n{}",
                case.name,
                verdict.problems.join("; "),
                verdict.outcome
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} cases found under examples/");
}

/// A case that names what the set does not declare is an error of its own kind, never a
/// default deny that would pass an `expect: deny`.
#[test]
fn a_misspelt_case_is_an_error_not_a_deny() {
    let set = compile("");
    let case = bulkhead_policy::cases::Case {
        name: "typo".into(),
        from: Some("spiffe://td/ns/shop/sa/frontend".into()),
        to: "shop/paymnts:8080".into(),
        expect: Some(bulkhead_policy::cases::Expect::Deny),
        ..Default::default()
    };
    assert!(matches!(
        case.run(&set),
        Err(bulkhead_policy::cases::CaseError::UnknownWorkload { .. })
    ));
    let case = bulkhead_policy::cases::Case {
        to: "shop/payments:8080".into(),
        ..case
    };
    assert!(case.run(&set).unwrap().passed());
}
