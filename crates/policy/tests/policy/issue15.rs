//! What the policy says is what the sidecar enforces (issue #15): empty caller selectors
//! refused, lint warnings, reader errors in our words, located errors for every file, and
//! every canonicalisation rule decided as a sidecar decides it.

use super::*;

/// An empty caller selector, in any form, would match every caller: refused at the place it
/// is written, saying what it would have meant and what to write instead.
#[test]
fn empty_caller_selectors_are_refused() {
    let rules = |body: &str| format!("{HEAD}  action: allow\n  rules:\n{body}");
    let cases: Vec<(String, &str)> = vec![
        (
            rules("    - name: web\n      from:\n        workloadLabels: {}\n"),
            "p.yaml:13:25: policy shop/p rule web: `workloadLabels: {}` gives no label, so it would match every caller (any identity, declared or not, from any trust domain), not \"the workloads of this namespace\"; write the callers explicitly: `namespaces: [shop]`",
        ),
        (
            rules("    - from: {workloadLabels: }\n"),
            "p.yaml:11:28: policy shop/p rule rules[0]: `workloadLabels: {}` gives no label",
        ),
        (
            rules("    - from: {namespaces: [shop], workloadLabels: {}}\n"),
            "p.yaml:11:50: policy shop/p rule rules[0]: `workloadLabels: {}` gives no label",
        ),
        (
            rules("    - from: {}\n"),
            "p.yaml:11:13: policy shop/p rule rules[0]: `from` names no caller, so it would match every caller (authenticated or not, declared or not, from any trust domain); leave `from` out if the rule is meant for every caller",
        ),
        (rules("    - name: x\n      from:\n"), "p.yaml:12:"),
        (
            rules("    - from: {identities: []}\n      to: {ports: [8080]}\n"),
            "p.yaml:11:13: policy shop/p rule rules[0]: `from` names no caller",
        ),
    ];
    check_first_errors(&cases);
}

/// What compiles but protects nothing, or means something other than it looks, is a lint
/// warning at its place.
#[test]
fn lint_warns_about_selectors_that_select_nothing_and_regex_paths() {
    let text = format!(
        "{}{}{}{}",
        policy(
            "typo-deny",
            "paymnts",
            "  action: deny\n",
            "    - name: all\n"
        ),
        "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: by-labels, namespace: shop}\nspec:\n  selector:\n    matchLabels: {app: paymnts}\n  action: deny\n",
        policy(
            "callers",
            "orders",
            "  action: allow\n",
            "    - name: web\n      from:\n        workloadLabels: {tier: wbe}\n    - to:\n        paths: [\"/v1/.*\", \"/ok/*\"]\n"
        ),
        "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: empty-ns, namespace: ghosts}\nspec:\n  action: deny\n",
    );
    let files = vec![
        ("decl.yaml".to_string(), DECLARATIONS.as_bytes().to_vec()),
        ("p.yaml".to_string(), text.into_bytes()),
    ];
    let (parsed, _) = bulkhead_policy::load_bytes(&files, 1).expect("compiles");
    let got: Vec<String> = bulkhead_policy::lint_parsed(&parsed)
        .iter()
        .map(|w| w.to_string())
        .collect();
    assert_eq!(
        got,
        [
            "p.yaml:6:24: warning: policy shop/typo-deny selects workload shop/paymnts, which no Workload declares; if the name is misspelt it protects nothing (declare the Workload, or fix the name)",
            "p.yaml:16:18: warning: policy shop/by-labels selects no declared Workload: none in namespace shop has the labels {app: paymnts}; a misspelt label selects nothing",
            "p.yaml:28:25: warning: policy shop/callers rule web: no declared Workload has the labels {tier: wbe}, so this rule can never match (a misspelt label allows nothing)",
            "p.yaml:30:9: warning: policy shop/callers rule rules[1]: path \"/v1/.*\" looks like a regular expression, but paths are literal text with * (part of one segment) and ** (any number of segments); it is read as the prefix \"/v1/.\"",
            "p.yaml:34:18: warning: policy ghosts/empty-ns selects every declared Workload of namespace ghosts, and none is declared",
        ]
    );
}

/// Regular expressions that are not even canonical paths are refused, and say why.
#[test]
fn regex_paths_and_non_canonical_paths_are_refused_with_the_form_to_write() {
    let to = |paths: &str| {
        format!("{HEAD}  action: deny\n  rules:\n    - to: {{ports: [8080], paths: [{paths}]}}\n")
    };
    for (paths, want) in [
        (
            "\"/v1/[a-z]+\"",
            "p.yaml:11:35: path \"/v1/[a-z]+\" is not in canonical form: write \"/v1/%5Ba-z%5D+\" (requests are matched after percent-encoded letters, digits and -._~ are decoded, and other escapes upper-cased) (this looks like a regular expression; paths are literal, with * for part of one segment and ** for any number of segments)",
        ),
        (
            "\"/v1/\\\\d+\"",
            "p.yaml:11:35: path \"/v1/\\\\d+\" can never match: the path holds a '\\' (raw or encoded), and the sidecar refuses such requests with 400 before any policy (this looks like a regular expression",
        ),
        (
            "\"^/admin$\"",
            "p.yaml:11:35: path \"^/admin$\" must start with '/' (this looks like a regular expression",
        ),
        (
            "\"/%61dmin/*\"",
            "p.yaml:11:35: path \"/%61dmin/*\" is not in canonical form: write \"/admin/*\"",
        ),
        (
            "\"/orders/..;/admin\"",
            "p.yaml:11:35: path \"/orders/..;/admin\" can never match: the path holds a ';'",
        ),
        (
            "\"/a/../b\"",
            "p.yaml:11:35: path \"/a/../b\" can never match: the path holds a '.' or '..' segment",
        ),
    ] {
        let got = first_error(&[("decl.yaml", DECLARATIONS), ("p.yaml", &to(paths))]);
        assert!(got.starts_with(want), "want {want}\n got {got}");
    }
}

/// The YAML reader's own words (its options, its budget variants) never reach a user.
#[test]
fn reader_errors_are_in_our_words() {
    let dup = "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: a, name: b}\nspec: {identity: spiffe://td/ns/a/sa/b}\n";
    assert_eq!(
        first_error(&[("p.yaml", dup)]),
        "p.yaml:3:21: the key \"name\" is given twice in one mapping; keys must be unique (a second value would silently replace the first), so remove one"
    );
    let mut bomb =
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\na: &a [x,x,x,x,x,x,x,x,x,x]\n"
            .to_string();
    for (name, prev) in [("b", "a"), ("c", "b"), ("d", "c"), ("e", "d"), ("f", "e")] {
        bomb.push_str(&format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 10].join(",")
        ));
    }
    let got = first_error(&[("p.yaml", &bomb)]);
    assert_eq!(
        got,
        "p.yaml:8:11: the document is too large for a policy file: it holds more than 250000 values, counting what aliases (*name) expand to; split it into smaller documents"
    );
    let deep = format!(
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {}\n",
        "[".repeat(5000)
    );
    let got = first_error(&[("p.yaml", &deep)]);
    assert!(
        got.starts_with("p.yaml:3:") && got.ends_with("the document is too large for a policy file: it nests too deeply; split it into smaller documents"),
        "{got}"
    );
    for text in [&dup.to_string(), &bomb, &deep] {
        let got = first_error(&[("p.yaml", text)]);
        for internal in [
            "Options",
            "DuplicateKeyPolicy",
            "budget",
            "Nodes",
            "{ nodes",
        ] {
            assert!(!got.contains(internal), "{got}");
        }
    }
}

/// A file that is not UTF-8 is an error for that file only, located; the other files are
/// still read and their errors reported.
#[test]
fn non_utf8_files_are_located_errors_of_their_own() {
    let files = vec![
        (
            "a.yaml".to_string(),
            b"apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: \xe9}\n".to_vec(),
        ),
        ("b.yaml".to_string(), b"apiVersion: v9\n".to_vec()),
    ];
    let errors: Vec<String> = match bulkhead_policy::load_bytes(&files, 1) {
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
        Ok(_) => panic!("refused"),
    };
    assert_eq!(
        errors,
        [
            "a.yaml:3:18: the file is not UTF-8 text (byte 0xE9 here is not part of a UTF-8 character); policy files must be UTF-8",
            "b.yaml:1:13: apiVersion \"v9\" is not supported; use \"bulkhead.dev/v1alpha1\"",
        ]
    );
}

/// A nameless rule's errors point at the rule itself, not at its document.
#[test]
fn a_nameless_rule_is_pointed_at() {
    let yaml = format!(
        "{HEAD}  action: allow\n  rules:\n    - name: ok\n    - from:\n        identities: [\"*\"]\n      to:\n        workloads: [orders]\n"
    );
    let got = first_error(&[("decl.yaml", DECLARATIONS), ("p.yaml", &yaml)]);
    assert!(
        got.starts_with("p.yaml:15:9: policy shop/p rule rules[1]: in an ingress rule"),
        "{got}"
    );
    let yaml = format!(
        "{HEAD}  direction: egress\n  action: allow\n  rules:\n    - from: {{namespaces: [shop]}}\n"
    );
    let got = first_error(&[("decl.yaml", DECLARATIONS), ("p.yaml", &yaml)]);
    assert!(
        got.starts_with("p.yaml:12:13: policy shop/p rule rules[0]: an egress rule has no `from`"),
        "{got}"
    );
}

/// A raw request, as a sidecar receives it, through the canonical request to a decision:
/// `refused (400): …` or the decision's explanation.
fn decide_raw(
    set: &PolicySet,
    peer: &str,
    ip: Option<&str>,
    method: &str,
    target: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
) -> String {
    use bulkhead_policy::{CanonicalRequest, RawRequest, canonical};
    let raw = RawRequest {
        method,
        target,
        authority: None,
    };
    let canon = match CanonicalRequest::new(raw, host.map(str::as_bytes)) {
        Ok(c) => c,
        Err(why) => return format!("refused (400): {why}"),
    };
    let subject = wref("shop/payments");
    let headers: &[(&str, &str)] = headers;
    set.evaluate(&Request {
        direction: Direction::Ingress,
        subject: &subject,
        peer: Peer {
            identity: Some(peer),
            ip: ip.map(|i| canonical::peer_ip(i.parse().expect("ip"))),
            workload: None,
        },
        port: 8080,
        protocol: Protocol::Http,
        http: Some(canon.http(&headers)),
    })
    .to_string()
}

/// Every canonicalisation rule, decided: what a policy says is what a request gets, whatever
/// spelling the request uses.
#[test]
fn canonical_requests_get_the_verdict_the_policy_says() {
    let set = compile(
        &(policy(
            "payments-allow",
            "payments",
            "  action: allow\n",
            "    - name: orders\n      from: {identities: [\"spiffe://td/ns/shop/sa/orders\"]}\n      to: {ports: [8080], hosts: [pay.shop]}\n      when: [{header: x-env, values: [prod]}]\n",
        ) + &policy(
            "payments-deny",
            "payments",
            "  action: deny\n",
            "    - name: admin\n      to: {ports: [8080], paths: [\"/admin\", \"/admin/*\"]}\n    - name: deletes\n      to: {ports: [8080], methods: [DELETE]}\n    - name: debug\n      to: {ports: [8080]}\n      when: [{header: x-debug, values: [\"on\"]}]\n    - name: outside\n      from: {cidrs: [10.0.0.0/8]}\n",
        )),
    );
    let prod: &[(&str, &str)] = &[("x-env", "prod")];
    let allowed = "allowed by policy shop/payments-allow rule orders (revision 7)";
    let admin = "denied by policy shop/payments-deny rule admin (revision 7)";
    for (method, target, host, headers, ip, want) in [
        ("GET", "/charge", Some("pay.shop"), prod, None, allowed),
        // Host: case, port, trailing dot.
        ("GET", "/charge", Some("PAY.shop:8080"), prod, None, allowed),
        ("GET", "/charge", Some("pay.shop."), prod, None, allowed),
        // Percent-encoded letters are the same path.
        ("GET", "/%61dmin/users", Some("pay.shop"), prod, None, admin),
        ("GET", "/%41dmin", Some("pay.shop"), prod, None, allowed),
        ("GET", "/ad%6Din", Some("pay.shop"), prod, None, admin),
        // Ambiguous paths never reach policy.
        (
            "GET",
            "/x/../admin",
            Some("pay.shop"),
            prod,
            None,
            "refused (400): the path holds a '.' or '..' segment (also when encoded, as %2e)",
        ),
        (
            "GET",
            "/x/%2e%2e/admin",
            Some("pay.shop"),
            prod,
            None,
            "refused (400): the path holds a '.' or '..' segment (also when encoded, as %2e)",
        ),
        (
            "GET",
            "/orders/..;/admin",
            Some("pay.shop"),
            prod,
            None,
            "refused (400): the path holds a ';' (path parameters: some servers strip them and resolve /a/..;/b to /b)",
        ),
        (
            "GET",
            "/admin%2Fusers",
            Some("pay.shop"),
            prod,
            None,
            "refused (400): the path holds an encoded '/' (%2F)",
        ),
        // Methods are case-sensitive: a lower-case one is refused, never upper-cased.
        (
            "DELETE",
            "/charge",
            Some("pay.shop"),
            prod,
            None,
            "denied by policy shop/payments-deny rule deletes (revision 7)",
        ),
        (
            "delete",
            "/charge",
            Some("pay.shop"),
            prod,
            None,
            "refused (400): the method must be an HTTP token in upper case (methods are case-sensitive: `delete` is not DELETE)",
        ),
        (
            "Delete",
            "/charge",
            Some("pay.shop"),
            prod,
            None,
            "refused (400): the method must be an HTTP token in upper case (methods are case-sensitive: `delete` is not DELETE)",
        ),
        // A repeated header: an allow condition needs every value, a deny condition any.
        (
            "GET",
            "/charge",
            Some("pay.shop"),
            &[("x-env", "prod"), ("x-env", "dev")],
            None,
            "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-allow rule orders matched the identity and port and host but not header x-env \"prod\", \"dev\"",
        ),
        (
            "GET",
            "/charge",
            Some("pay.shop"),
            &[("x-env", "dev"), ("x-env", "prod")],
            None,
            "default deny: no policy allows this request (revision 7); nearest miss: policy shop/payments-allow rule orders matched the identity and port and host but not header x-env \"dev\", \"prod\"",
        ),
        (
            "GET",
            "/charge",
            Some("pay.shop"),
            &[("x-env", "prod"), ("x-debug", "off"), ("x-debug", "on")],
            None,
            "denied by policy shop/payments-deny rule debug (revision 7)",
        ),
        (
            "GET",
            "/charge",
            Some("pay.shop"),
            &[("x-env", "prod"), ("x-debug", "on"), ("x-debug", "off")],
            None,
            "denied by policy shop/payments-deny rule debug (revision 7)",
        ),
        (
            "GET",
            "/charge",
            Some("pay.shop"),
            &[("x-env", "prod"), ("x-debug", "off, on")],
            None,
            "denied by policy shop/payments-deny rule debug (revision 7)",
        ),
        // An IPv4 caller seen by an IPv6 listener is still inside 10.0.0.0/8.
        (
            "GET",
            "/charge",
            Some("pay.shop"),
            prod,
            Some("::ffff:10.1.2.3"),
            "denied by policy shop/payments-deny rule outside (revision 7)",
        ),
        (
            "GET",
            "/charge",
            Some("pay.shop"),
            prod,
            Some("fd00::1"),
            allowed,
        ),
    ] {
        let got = decide_raw(&set, ORDERS, ip, method, target, host, headers);
        assert_eq!(got, want, "{method} {target} {host:?} {headers:?} {ip:?}");
    }
}

#[test]
fn mapped_networks_and_addresses_are_refused_with_the_ipv4_form() {
    let got = first_error(&[
        ("decl.yaml", DECLARATIONS),
        (
            "p.yaml",
            &format!(
                "{HEAD}  action: deny\n  rules:\n    - from: {{cidrs: [\"::ffff:10.0.0.0/104\"]}}\n"
            ),
        ),
    ]);
    assert_eq!(
        got,
        "p.yaml:11:13: policy shop/p rule rules[0]: ::ffff:10.0.0.0/104 is an IPv4-mapped IPv6 network, which no address is compared with: IPv4-mapped addresses are unmapped before matching; write 10.0.0.0/8"
    );
    let got = first_error(&[(
        "p.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec:\n  identity: spiffe://td/ns/shop/sa/w\n  addresses: [\"::ffff:10.1.2.3\"]\n",
    )]);
    assert_eq!(
        got,
        "p.yaml:6:15: address ::ffff:10.1.2.3 is an IPv4-mapped IPv6 address; declare the IPv4 address 10.1.2.3 (sidecars unmap such addresses before looking them up)"
    );
}
