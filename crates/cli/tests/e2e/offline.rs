//! The offline policy tools as a CI pipeline meets them: misspellings are errors, not
//! default denies; lint warns about what protects nothing and fails on it with `--strict`;
//! every error is located; and a closed pipe (`| head -1`) is no error for any verb.

use bulkhead_testkit::mesh::Mesh;
use bulkhead_testkit::{Bins, TempDir, run};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write(dir: &TempDir, name: &str, text: &[u8]) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn misspelt_cases_and_selectors_never_pass_as_a_default_deny() {
    let bins = Bins::next_to(env!("CARGO_BIN_EXE_bulkhead"));
    let dir = TempDir::new().unwrap();
    let shop = root().join("examples/shop.yaml");
    let shop = shop.to_str().unwrap();
    let cli = |args: &[&str]| run(&bins.bulkhead, args, &[]);

    // A case naming what no file declares is an error, whatever it expects.
    for (case, error) in [
        (
            "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/ordrs:8080",
            "case \"c\": no Workload shop/ordrs is declared; a misspelt name would only test the default deny",
        ),
        (
            "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders:8081",
            "case \"c\": shop/orders declares no port 8081 (it declares 8080)",
        ),
        (
            "from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders:8080\n    method: DELET",
            "case \"c\": method \"DELET\" is not one the policy language knows",
        ),
        (
            "from: spiffe://bulkhead.local/ns/shop/sa/frontnd\n    to: shop/orders:8080",
            "case \"c\": no Workload declares the identity spiffe://bulkhead.local/ns/shop/sa/frontnd; a misspelt name would only test the default deny. If the caller is meant to be outside the declared workloads, say so (`caller: undeclared` in a case, --undeclared for explain)",
        ),
        (
            "to: shop/orders:8080",
            "case \"c\": `from` (the caller's SPIFFE ID) is missing; for a caller without a certificate say so",
        ),
        (
            "from: spiffe://bulkhead.local/ns/shop/sa/orders\n    caller: undeclared\n    to: shop/orders:8080",
            "case \"c\": says the caller is undeclared, but Workload shop/orders declares spiffe://bulkhead.local/ns/shop/sa/orders",
        ),
    ] {
        let cases = write(
            &dir,
            "cases.yaml",
            format!("cases:\n  - name: c\n    {case}\n    expect: deny\n").as_bytes(),
        );
        let (code, out, err) = cli(&["policy", "test", shop, "--cases", &cases]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains(error), "want {error}\n got {err}");
    }

    // An outsider and a caller without a certificate can be modelled, on purpose.
    let cases = write(
        &dir,
        "cases.yaml",
        b"cases:\n  - name: partner\n    from: spiffe://partner.example/ns/x/sa/y\n    caller: undeclared\n    to: shop/orders:8080\n    path: /orders\n    expect: deny\n  - name: plaintext\n    caller: unauthenticated\n    to: shop/payments:8080\n    method: POST\n    path: /charge\n    expect: deny\n  - name: lower-case method\n    from: spiffe://bulkhead.local/ns/shop/sa/frontend\n    to: shop/orders:8080\n    method: get\n    path: /orders\n    expect: refuse\n",
    );
    let (code, out, err) = cli(&["policy", "test", shop, "--cases", &cases]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "ok      lower-case method (refused: the method must be an HTTP token in upper case"
        ),
        "{out}"
    );
    assert!(out.ends_with("\n3 passed, 0 failed\n"), "{out}");

    // A cases file with a duplicate key is located and said in our words.
    let cases = write(&dir, "dup.yaml", b"cases:\n  - name: a\n    name: b\n");
    let (code, _, err) = cli(&["policy", "test", shop, "--cases", &cases]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{cases}:3:5: the key \"name\" is given twice in one mapping"
        )),
        "{err}"
    );

    // explain: the canonical request, refusals, and an unauthenticated caller.
    let explain = |extra: &[&str]| {
        let mut args = vec!["policy", "explain", shop, "--to", "shop/payments:8080"];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let orders = "spiffe://bulkhead.local/ns/shop/sa/orders";
    let (code, out, _) = explain(&["--from", orders, "--path", "/%61dmin/users"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("DENY\ndenied by policy shop/payments-deny-admin rule admin-paths"),
        "{out}"
    );
    let (_, out, _) = explain(&["--from", orders, "--path", "/x/../admin"]);
    assert_eq!(
        out,
        "REFUSED (400, before any policy)\nbulkhead: the path holds a '.' or '..' segment (also when encoded, as %2e)\n"
    );
    let (_, out, _) = explain(&["--unauthenticated", "--method", "POST", "--path", "/charge"]);
    assert!(
        out.contains("nearest miss: policy shop/payments-allow-orders rule orders-charges matched the method and path but not identity (none)"),
        "{out}"
    );

    // lint: a misspelt selector compiles, but is a warning, and an error with --strict.
    let typo = write(
        &dir,
        "typo.yaml",
        b"apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: shop}\nspec:\n  selector: {workload: paymnts}\n  action: deny\n  rules:\n    - name: everything\n---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: orders-api, namespace: shop}\nspec:\n  selector: {workload: orders}\n  action: allow\n  rules:\n    - to: {paths: [\"/v1/.*\"]}\n",
    );
    let (code, out, err) = cli(&["policy", "lint", shop, &typo]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("; 2 warning(s) above\n"), "{out}");
    assert!(
        err.contains(&format!("{typo}:5:24: warning: policy shop/deny-admin selects workload shop/paymnts, which no Workload declares")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{typo}:17:11: warning: policy shop/orders-api rule rules[0]: path \"/v1/.*\" looks like a regular expression")),
        "{err}"
    );
    let (code, _, err) = cli(&["policy", "lint", "--strict", shop, &typo]);
    assert_eq!(code, 1);
    assert!(
        err.contains("error: 2 warning(s), which --strict makes errors"),
        "{err}"
    );

    // lint: `workloadLabels: {}` is refused where it is written; a file that is not UTF-8
    // is an error of its own, located, and the other files are still read.
    let open = write(
        &dir,
        "open.yaml",
        b"apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: open, namespace: shop}\nspec:\n  selector: {workload: orders}\n  action: allow\n  rules:\n    - from: {workloadLabels: {}}\n",
    );
    let latin1 = write(&dir, "latin1.yaml", b"# caf\xe9\nkind: Workload\n");
    let old = write(&dir, "old.yaml", b"apiVersion: v9\n");
    let (code, _, err) = cli(&["policy", "lint", shop, &open]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{open}:8:30: policy shop/open rule rules[0]: `workloadLabels: {{}}` gives no label, so it would match every caller")),
        "{err}"
    );
    let (code, _, err) = cli(&["policy", "lint", &latin1, &old]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{latin1}:1:6: the file is not UTF-8 text (byte 0xE9 here is not part of a UTF-8 character)")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{old}:1:13: apiVersion \"v9\" is not supported")),
        "{err}"
    );
}

/// Runs `bulkhead ARGS` with its standard output a pipe whose reader is already gone.
fn closed_stdout(bin: &Path, args: &[&str]) -> (i32, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bulkhead … | head -1`: every verb that prints exits 0, quietly, when the reader of its
/// output has gone.
#[test]
fn a_closed_pipe_is_no_error_for_any_verb() {
    let mesh = Mesh::start();
    mesh.apply(
        "shop.yaml",
        &std::fs::read_to_string(root().join("examples/shop.yaml")).unwrap(),
    );
    let shop = root().join("examples/shop.yaml");
    let cases = root().join("examples/shop-cases.yaml");
    let (shop, cases) = (shop.to_str().unwrap(), cases.to_str().unwrap());
    let context = mesh.data().join("admin.yaml");
    let context = context.to_str().unwrap();
    let verbs: Vec<Vec<&str>> = vec![
        vec!["--help"],
        vec!["--version"],
        vec!["policy", "lint", shop],
        vec!["policy", "test", shop, "--cases", cases],
        vec!["policy", "diff", shop, shop, "--cases", cases],
        vec![
            "policy",
            "explain",
            shop,
            "--from",
            "spiffe://bulkhead.local/ns/shop/sa/orders",
            "--to",
            "shop/payments:8080",
        ],
        vec!["reach", "shop/payments", "-f", shop],
        vec![
            "reach",
            "shop/frontend",
            "--blast-radius",
            "-f",
            shop,
            "-o",
            "json",
        ],
        vec!["--context", context, "get", "all"],
        vec!["--context", context, "get", "all", "-o", "yaml"],
        vec!["--context", context, "get", "policies", "-o", "json"],
        vec!["--context", context, "history"],
        vec!["--context", context, "graph"],
        vec!["--context", context, "recommend"],
        vec!["--context", context, "events"],
        vec!["--context", context, "impact", "-f", shop],
        vec!["--context", context, "ca", "status"],
    ];
    for args in verbs {
        let (code, err) = closed_stdout(&mesh.bins.bulkhead, &args);
        let quiet = !["panicked", "Broken pipe", "error"]
            .iter()
            .any(|w| err.contains(w));
        assert!(
            code == 0 && quiet,
            "bulkhead {}: exit {code}\n{err}",
            args.join(" ")
        );
    }
}
