//! The offline policy tools as a CI pipeline meets them, run in-process: each test writes
//! what the command would print (standard output, standard error, and the `error:` line and
//! exit code `main` would add) and compares it with the expectation written beside it.
//! `UPDATE_EXPECT=1 cargo test -p bulkhead-cli policy_cmd` rewrites the expectations; read
//! the diff before committing it.

use super::*;
use bulkhead_testkit::TempDir;
use expect_test::{Expect, expect};

/// The repository's root, for the examples.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A scratch directory whose path reads `$DIR` in transcripts.
struct Scratch(TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(TempDir::new().unwrap())
    }

    fn write(&self, name: &str, text: &[u8]) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn shop() -> PathBuf {
    root().join("examples/shop.yaml")
}

fn shop_cases() -> PathBuf {
    root().join("examples/shop-cases.yaml")
}

/// Runs one command as `main` would and returns what a terminal shows, with the scratch
/// directory and the repository written `$DIR` and `$ROOT`.
fn transcript(
    scratch: Option<&Scratch>,
    command: impl FnOnce(&mut dyn Write, &mut dyn Write) -> Result<()>,
) -> String {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = command(&mut out, &mut err);
    let mut text = String::from_utf8(out).unwrap();
    let err = String::from_utf8(err).unwrap();
    if !err.is_empty() {
        text.push_str("--- stderr\n");
        text.push_str(&err);
    }
    match result {
        Ok(()) => text.push_str("--- exit 0\n"),
        Err(e) => text.push_str(&format!("--- exit 1\nerror: {e:#}\n")),
    }
    if let Some(s) = scratch {
        text = text.replace(s.0.path().to_str().unwrap(), "$DIR");
    }
    let canonical = root().canonicalize().unwrap();
    text.replace(root().to_str().unwrap(), "$ROOT")
        .replace(canonical.to_str().unwrap(), "$ROOT")
}

fn check(actual: String, expect: Expect) {
    expect.assert_eq(&actual);
}

#[test]
fn lint_counts_resources_and_rules() {
    check(
        transcript(None, |o, e| lint(&[shop()], false, o, e)),
        expect![[r#"
            ok: 6 resources, 3 rules; every rule is enforceable as written
            --- exit 0
        "#]],
    );
}

#[test]
fn test_runs_the_examples_cases() {
    check(
        transcript(None, |o, e| test(&[shop()], &shop_cases(), o, e)),
        expect![[r#"
            ok      frontend lists orders
            ok      orders charges a payment
            ok      frontend cannot charge directly
            ok      nobody reaches the payments admin API
            ok      frontend cannot delete orders
            ok      an escaped letter is the same path
            ok      a lower-case method never reaches policy or the app (refused: the method must be an HTTP token in upper case (methods are case-sensitive: `delete` is not DELETE))
            ok      a caller without a certificate is denied

            8 passed, 0 failed
            --- exit 0
        "#]],
    );
}

#[test]
fn a_wrong_expectation_fails_and_says_what_was_decided() {
    let dir = Scratch::new();
    let text = std::fs::read_to_string(shop_cases()).unwrap();
    let wrong = dir.write(
        "wrong.yaml",
        text.replacen("expect: deny", "expect: allow", 1).as_bytes(),
    );
    check(
        transcript(Some(&dir), |o, e| test(&[shop()], &wrong, o, e)),
        expect![[r#"
            ok      frontend lists orders
            ok      orders charges a payment
            FAILED  frontend cannot charge directly: expected allow, got deny
                    default deny: no policy allows this request (revision 0); nearest miss: policy shop/payments-allow-orders rule orders-charges matched the method and path but not identity spiffe://bulkhead.local/ns/shop/sa/frontend
            ok      nobody reaches the payments admin API
            ok      frontend cannot delete orders
            ok      an escaped letter is the same path
            ok      a lower-case method never reaches policy or the app (refused: the method must be an HTTP token in upper case (methods are case-sensitive: `delete` is not DELETE))
            ok      a caller without a certificate is denied

            7 passed, 1 failed
            --- exit 1
            error: 1 case(s) did not get the expected verdict
        "#]],
    );
}

#[test]
fn diff_shows_each_changed_verdict() {
    let dir = Scratch::new();
    let newer = std::fs::read_to_string(shop())
        .unwrap()
        .replace("methods: [GET, POST]", "methods: [GET, POST, DELETE]");
    let newer = dir.write("new.yaml", newer.as_bytes());
    check(
        transcript(Some(&dir), |o, e| {
            diff(&[shop()], &[newer], &shop_cases(), o, e)
        }),
        expect![[r#"
            frontend cannot delete orders: deny -> allow
              old: default deny: no policy allows this request (revision 0); nearest miss: policy shop/orders-allow-frontend rule frontend-manages-orders matched the identity and path but not method DELETE
              new: allowed by policy shop/orders-allow-frontend rule frontend-manages-orders (revision 0)
            1 of 8 request(s) change verdict
            --- exit 0
        "#]],
    );
}

/// `policy explain` against the shop example, towards payments.
fn explain_payments(case: Case) -> String {
    let case = Case {
        to: "shop/payments:8080".to_string(),
        ..case
    };
    transcript(None, |o, e| explain(&[shop()], &case, o, e))
}

fn from(id: &str) -> Option<String> {
    Some(format!("spiffe://bulkhead.local/ns/shop/sa/{id}"))
}

#[test]
fn explain_names_the_nearest_miss() {
    check(
        explain_payments(Case {
            from: from("frontend"),
            method: Some("POST".into()),
            path: Some("/charge".into()),
            ..Case::default()
        }),
        expect![[r#"
            DENY
            default deny: no policy allows this request (revision 0); nearest miss: policy shop/payments-allow-orders rule orders-charges matched the method and path but not identity spiffe://bulkhead.local/ns/shop/sa/frontend
            x-bulkhead-decision: deny; policy=default-deny; revision=0
            --- exit 0
        "#]],
    );
    check(
        explain_payments(Case {
            caller: Caller::Unauthenticated,
            method: Some("POST".into()),
            path: Some("/charge".into()),
            ..Case::default()
        }),
        expect![[r#"
            DENY
            default deny: no policy allows this request (revision 0); nearest miss: policy shop/payments-allow-orders rule orders-charges matched the method and path but not identity (none)
            x-bulkhead-decision: deny; policy=default-deny; revision=0
            --- exit 0
        "#]],
    );
}

#[test]
fn explain_judges_the_canonical_request() {
    check(
        explain_payments(Case {
            from: from("orders"),
            path: Some("/%61dmin/users".into()),
            ..Case::default()
        }),
        expect![[r#"
            DENY
            denied by policy shop/payments-deny-admin rule admin-paths (revision 0)
            x-bulkhead-decision: deny; policy=shop/payments-deny-admin; rule=admin-paths; revision=0
            --- exit 0
        "#]],
    );
    check(
        explain_payments(Case {
            from: from("orders"),
            path: Some("/x/../admin".into()),
            ..Case::default()
        }),
        expect![[r#"
            REFUSED (400, before any policy)
            bulkhead: the path holds a '.' or '..' segment (also when encoded, as %2e)
            --- exit 0
        "#]],
    );
}

#[test]
fn misspelt_cases_never_pass_as_a_default_deny() {
    let dir = Scratch::new();
    let mut all = String::new();
    for case in [
        "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/ordrs:8080",
        "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders:8081",
        "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders:8080\n    method: DELET",
        "from: spiffe://bulkhead.local/ns/shop/sa/frontnd\n    to: shop/orders:8080",
        "to: shop/orders:8080",
        "from: spiffe://bulkhead.local/ns/shop/sa/orders\n    caller: undeclared\n    to: shop/orders:8080",
        "from: spiffe://bulkhead.local/ns/shop/sa/*\n    to: shop/orders:8080",
        "caller: unauthenticated\n    from: spiffe://bulkhead.local/ns/shop/sa/orders\n    to: shop/orders:8080",
        "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders:8080\n    protocol: tcp",
        "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders",
        "direction: egress\n    caller: undeclared\n    from: shop/frontend\n    to: shop/orders:8080",
        "direction: egress\n    from: shop/frontnd\n    to: shop/orders:8080",
    ] {
        let cases = dir.write(
            "cases.yaml",
            format!("cases:\n  - name: c\n    {case}\n    expect: deny\n").as_bytes(),
        );
        all.push_str(&transcript(Some(&dir), |o, e| {
            test(&[shop()], &cases, o, e)
        }));
    }
    check(
        all,
        expect![[r#"
        --- exit 1
        error: case "c": no Workload shop/ordrs is declared; a misspelt name would only test the default deny (declare it, or fix the name)
        --- exit 1
        error: case "c": shop/orders declares no port 8081 (it declares 8080); a misspelt name would only test the default deny
        --- exit 1
        error: case "c": method "DELET" is not one the policy language knows (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE); a misspelt name would only test the default deny
        --- exit 1
        error: case "c": no Workload declares the identity spiffe://bulkhead.local/ns/shop/sa/frontnd; a misspelt name would only test the default deny. If the caller is meant to be outside the declared workloads, say so (`caller: undeclared` in a case, --undeclared for explain)
        --- exit 1
        error: case "c": `from` (the caller's SPIFFE ID) is missing; for a caller without a certificate say so (`caller: unauthenticated` in a case, --unauthenticated for explain)
        --- exit 1
        error: case "c": says the caller is undeclared, but Workload shop/orders declares spiffe://bulkhead.local/ns/shop/sa/orders; drop `caller: undeclared` (or --undeclared)
        --- exit 1
        error: case "c": "spiffe://bulkhead.local/ns/shop/sa/*" is a pattern; a caller has one exact SPIFFE ID
        --- exit 1
        error: case "c": an unauthenticated caller has no identity; leave `from` out
        --- exit 1
        error: case "c": port 8080 of shop/orders is declared http, but the case says tcp; a sidecar judges it as http
        --- exit 1
        error: "shop/orders": expected namespace/workload:port
        --- exit 1
        error: case "c": `caller` is for ingress cases; on egress the caller is `from`, a declared workload
        --- exit 1
        error: case "c": no Workload shop/frontnd is declared; a misspelt name would only test the default deny (declare it, or fix the name)
    "#]],
    );
}

#[test]
fn outsiders_plaintext_callers_and_refusals_can_be_modelled() {
    let dir = Scratch::new();
    let cases = dir.write(
        "cases.yaml",
        b"cases:\n  - name: partner\n    from: spiffe://partner.example/ns/x/sa/y\n    caller: undeclared\n    to: shop/orders:8080\n    path: /orders\n    expect: deny\n  - name: plaintext\n    caller: unauthenticated\n    to: shop/payments:8080\n    method: POST\n    path: /charge\n    expect: deny\n  - name: lower-case method\n    from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders:8080\n    method: get\n    path: /orders\n    expect: refuse\n",
    );
    check(
        transcript(Some(&dir), |o, e| test(&[shop()], &cases, o, e)),
        expect![[r#"
            ok      partner
            ok      plaintext
            ok      lower-case method (refused: the method must be an HTTP token in upper case (methods are case-sensitive: `delete` is not DELETE))

            3 passed, 0 failed
            --- exit 0
        "#]],
    );
}

#[test]
fn a_cases_file_with_a_duplicate_key_is_located() {
    let dir = Scratch::new();
    let cases = dir.write("dup.yaml", b"cases:\n  - name: a\n    name: b\n");
    check(
        transcript(Some(&dir), |o, e| test(&[shop()], &cases, o, e)),
        expect![[r#"
            --- exit 1
            error: $DIR/dup.yaml:3:5: the key "name" is given twice in one mapping; keys must be unique (a second value would silently replace the first), so remove one
        "#]],
    );
}

#[test]
fn lint_warns_about_what_protects_nothing_and_strict_fails_on_it() {
    let dir = Scratch::new();
    let typo = dir.write(
        "typo.yaml",
        b"apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: shop}\nspec:\n  selector: {workload: paymnts}\n  action: deny\n  rules:\n    - name: everything\n---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders-api, namespace: shop}\nspec:\n  selector: {workload: orders}\n  action: allow\n  rules:\n    - to: {paths: [\"/v1/.*\"]}\n",
    );
    let files = [shop(), typo];
    check(
        transcript(Some(&dir), |o, e| lint(&files, false, o, e)),
        expect![[r#"
            ok: 8 resources, 5 rules; every rule is enforceable as written; 2 warning(s) above
            --- stderr
            $DIR/typo.yaml:5:24: warning: policy shop/deny-admin selects workload shop/paymnts, which no Workload declares; if the name is misspelt it protects nothing (declare the Workload, or fix the name)
            $DIR/typo.yaml:17:11: warning: policy shop/orders-api rule rules[0]: path "/v1/.*" looks like a regular expression, but paths are literal text with * (part of one segment) and ** (any number of segments); it is read as the prefix "/v1/."
            --- exit 0
        "#]],
    );
    check(
        transcript(Some(&dir), |o, e| lint(&files, true, o, e)),
        expect![[r#"
            --- stderr
            $DIR/typo.yaml:5:24: warning: policy shop/deny-admin selects workload shop/paymnts, which no Workload declares; if the name is misspelt it protects nothing (declare the Workload, or fix the name)
            $DIR/typo.yaml:17:11: warning: policy shop/orders-api rule rules[0]: path "/v1/.*" looks like a regular expression, but paths are literal text with * (part of one segment) and ** (any number of segments); it is read as the prefix "/v1/."
            --- exit 1
            error: 2 warning(s), which --strict makes errors
        "#]],
    );
}

#[test]
fn lint_locates_every_error() {
    let dir = Scratch::new();
    let open = dir.write(
        "open.yaml",
        b"apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: open, namespace: shop}\nspec:\n  selector: {workload: orders}\n  action: allow\n  rules:\n    - from: {workloadLabels: {}}\n",
    );
    check(
        transcript(Some(&dir), |o, e| lint(&[shop(), open], false, o, e)),
        expect![[r#"
            --- stderr
            $DIR/open.yaml:8:30: policy shop/open rule rules[0]: `workloadLabels: {}` gives no label, so it would match every caller (any identity, declared or not, from any trust domain), not "the workloads of this namespace"; write the callers explicitly: `namespaces: [shop]` for callers whose identity is in namespace shop, `workloadLabels` with at least one label for declared workloads, or `identities: ["*"]` for any authenticated caller
            --- exit 1
            error: 1 error(s); the policy set is refused whole
        "#]],
    );
    // A file that is not UTF-8 is an error of its own, and the other files are still read.
    let latin1 = dir.write("latin1.yaml", b"# caf\xe9\nkind: Workload\n");
    let old = dir.write("old.yaml", b"apiVersion: v9\n");
    check(
        transcript(Some(&dir), |o, e| lint(&[latin1, old], false, o, e)),
        expect![[r#"
            --- stderr
            $DIR/latin1.yaml:1:6: the file is not UTF-8 text (byte 0xE9 here is not part of a UTF-8 character); policy files must be UTF-8
            $DIR/old.yaml:1:13: apiVersion "v9" is not supported; use "bulkhead.dev/v1alpha1"
            --- exit 1
            error: 2 error(s); the policy set is refused whole
        "#]],
    );
    // An unenforceable rule: paths on a tcp port.
    let bad = dir.write(
        "bad.yaml",
        b"apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: db, namespace: shop}\nspec:\n  identity: spiffe://bulkhead.local/ns/shop/sa/db\n  ports: [{port: 5432, protocol: tcp}]\n---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: db-admin, namespace: shop}\nspec:\n  selector: {workload: db}\n  action: deny\n  rules:\n    - to: {paths: [\"/admin\"]}\n",
    );
    check(
        transcript(Some(&dir), |o, e| lint(&[bad], false, o, e)),
        expect![[r#"
            --- stderr
            $DIR/bad.yaml:15:11: policy shop/db-admin rule rules[0] uses paths, but it applies to port 5432 of shop/db, declared tcp (opaque TCP), where they cannot be enforced; limit the rule with `ports:` to the workload's HTTP ports
            --- exit 1
            error: 1 error(s); the policy set is refused whole
        "#]],
    );
}
