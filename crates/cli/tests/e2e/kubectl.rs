//! The CLI the way kubectl users reach for it: `apply -f` with several files, directories and
//! standard input in one revision, `--dry-run` that commits nothing, `get KIND NAME`, `-n`.

use super::POLICY;
use bulkhead_testkit::mesh::Mesh;

/// The e2e policy's documents, one per file.
fn documents() -> Vec<String> {
    POLICY.split("\n---\n").map(|d| format!("{d}\n")).collect()
}

#[test]
fn apply_takes_files_directories_and_stdin_as_one_revision_and_dry_runs() {
    let mesh = Mesh::start();
    let docs = documents();
    assert_eq!(docs.len(), 3);
    let dir = mesh.dir.path().join("policies");
    std::fs::create_dir_all(dir.join("nested")).unwrap();
    std::fs::write(dir.join("10-workload.yaml"), &docs[0]).unwrap();
    std::fs::write(dir.join("README.md"), "not a policy").unwrap();
    std::fs::write(dir.join("nested/20-allow.yaml"), &docs[1]).unwrap();
    let dir_arg = dir.to_str().unwrap();

    // A directory alone: its subdirectory is not read without -R, so the allow policy is
    // missing; the workload is created.
    let (code, out, err) = mesh.cli(&["apply", "-f", dir_arg, "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "Workload/shop/orders created (dry run)\nrevision 0 (dry run: nothing was changed; 1 workload(s) would get a new configuration)\n"
    );
    let (_, history, _) = mesh.cli(&["history", "-o", "json"]);
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert!(
        history["revisions"].as_array().unwrap().is_empty(),
        "a dry run committed: {history}"
    );

    // A dry run is checked like an apply: the deny policy alone names a workload nobody
    // declared, and is refused in the same words, with its file:line.
    let (code, _, err) = mesh.cli_stdin(&["apply", "-f", "-", "--dry-run"], &docs[2]);
    assert_ne!(code, 0);
    assert!(err.contains("<stdin>:"), "{err}");

    // -R, a file and standard input together: one revision.
    let (code, out, err) = mesh.cli_stdin(&["apply", "-R", "-f", dir_arg, "-f", "-"], &docs[2]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "AuthorizationPolicy/shop/orders-allow-frontend created\nAuthorizationPolicy/shop/orders-deny-internal created\nWorkload/shop/orders created\nrevision 1\n"
    );
    let (_, history, _) = mesh.cli(&["history", "--limit", "1"]);
    assert!(
        history.contains("<stdin>") && history.contains("20-allow.yaml"),
        "the revision names every file: {history}"
    );

    // The same resource twice is refused, naming both places; an empty directory says so.
    let again = mesh.dir.path().join("again.yaml");
    std::fs::write(&again, &docs[1]).unwrap();
    let (code, _, err) = mesh.cli(&["apply", "-R", "-f", dir_arg, "-f", again.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("AuthorizationPolicy/shop/orders-allow-frontend is also at")
            && err.contains("apply each resource once"),
        "{err}"
    );
    let empty = mesh.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = mesh.cli(&["apply", "-f", empty.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("holds no .yaml, .yml or .json file"), "{err}");
    // --dry-run and --wait cannot go together.
    let (code, _, err) = mesh.cli(&["apply", "-f", dir_arg, "--dry-run", "--wait"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn get_takes_a_kind_a_name_a_namespace_and_prints_names() {
    let mesh = Mesh::start();
    mesh.apply("policy.yaml", POLICY);
    mesh.apply(
        "other.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: orders, namespace: billing}\nspec:\n  identity: spiffe://test.local/ns/billing/sa/orders\n  ports: [{port: 8080, protocol: http}]\n",
    );
    let (code, out, err) = mesh.cli(&["get", "workloads", "-o", "name"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "Workload/billing/orders\nWorkload/shop/orders\n");
    let (_, out, _) = mesh.cli(&["get", "workload", "orders", "-n", "shop", "-o", "name"]);
    assert_eq!(out, "Workload/shop/orders\n");
    let (_, out, _) = mesh.cli(&["get", "workload/billing/orders", "-o", "name"]);
    assert_eq!(out, "Workload/billing/orders\n");
    let (_, out, _) = mesh.cli(&["get", "all", "-n", "shop", "-o", "name"]);
    assert_eq!(
        out,
        "AuthorizationPolicy/shop/orders-allow-frontend\nAuthorizationPolicy/shop/orders-deny-internal\nWorkload/shop/orders\n"
    );
    let (_, out, _) = mesh.cli(&["get", "policy", "orders-allow-frontend"]);
    expect_test::expect![[r#"
        KIND                 NAMESPACE  NAME                   SUMMARY
        AuthorizationPolicy  shop       orders-allow-frontend  ingress allow, workload orders, 1 rule(s)
        revision 2
    "#]]
    .assert_eq(&out);
    let (code, _, err) = mesh.cli(&["get", "policy", "nope", "-n", "shop"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("AuthorizationPolicy \"nope\" not found in namespace shop (revision 2)"),
        "{err}"
    );

    // Contexts, kubectl's way: a named context made current is used when neither --context
    // nor BULKHEAD_CONTEXT is given; a wrong name is refused in words.
    let config = mesh.dir.path().join("home/config");
    let admin = mesh.data().join("admin.yaml");
    let bulkhead = |args: &[&str]| {
        bulkhead_testkit::run(
            &mesh.bins.bulkhead,
            args,
            &[
                ("BULKHEAD_CONFIG", config.to_str().unwrap()),
                ("HOME", "/nonexistent"),
            ],
        )
    };
    let (code, _, err) = bulkhead(&["get", "workloads", "-o", "name"]);
    assert_ne!(code, 0);
    assert!(err.contains("bulkhead-data/admin.yaml"), "{err}");
    let (code, out, err) = bulkhead(&[
        "config",
        "set-context",
        "lab",
        "--file",
        admin.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("context \"lab\" added in"), "{out}");
    let (code, _, err) = bulkhead(&["config", "use-context", "lab"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = bulkhead(&["get", "workloads", "-n", "shop", "-o", "name"]);
    assert_eq!((code, out.as_str()), (0, "Workload/shop/orders\n"), "{err}");
    let (code, out, err) = bulkhead(&[
        "--context",
        "lab",
        "get",
        "workloads",
        "-n",
        "billing",
        "-o",
        "name",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (0, "Workload/billing/orders\n"),
        "{err}"
    );
    let (code, _, err) = bulkhead(&["--context", "labs", "get", "workloads"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot read admin context labs"), "{err}");
}

/// Whether `v` is an RFC 3339 UTC time as the CLI prints them (`2026-12-05T13:15:06Z`).
fn is_rfc3339(v: &serde_json::Value) -> bool {
    v.as_str().is_some_and(|s| {
        let b = s.as_bytes();
        s.len() == 20
            && b[4] == b'-'
            && b[10] == b'T'
            && b[19] == b'Z'
            && s.chars().filter(char::is_ascii_digit).count() == 14
    })
}

#[test]
fn json_output_is_camel_case_with_rfc3339_times() {
    let mesh = Mesh::start();
    mesh.apply("policy.yaml", POLICY);
    let history = mesh.cli_json(&["history", "-o", "json"]);
    assert!(is_rfc3339(&history["revisions"][0]["time"]), "{history}");
    let ca = mesh.cli_json(&["ca", "status", "-o", "json"]);
    let active = &ca["cas"][0];
    for key in ["notAfter", "added", "activated"] {
        assert!(is_rfc3339(&active[key]), "{key}: {active}");
    }
    assert!(active["retired"].is_null(), "no time is null: {active}");
    let token = mesh.cli(&[
        "token",
        "create",
        "--identity",
        "spiffe://test.local/ns/shop/sa/orders",
    ]);
    assert_eq!(token.0, 0);
    let tokens = mesh.cli_json(&["token", "list", "-o", "json"]);
    assert!(is_rfc3339(&tokens[0]["expires"]), "{tokens}");
    // No key anywhere is snake_case or says its unit.
    for v in [&history, &ca, &tokens] {
        let text = v.to_string();
        assert!(
            !text.contains("Unix\"") && !text.contains("Millis\""),
            "{text}"
        );
        let keys_ok = text
            .split('"')
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[1].starts_with(':'))
            .all(|w| !w[0].contains('_'));
        assert!(keys_ok, "a snake_case key: {text}");
    }
}
