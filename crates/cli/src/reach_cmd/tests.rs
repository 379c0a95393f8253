//! `bulkhead reach` from policy files (`-f`), in-process: who can reach a workload and the
//! blast radius of a compromised one, under the enforced and the staged view, with and
//! without a stolen key, and the errors, each as `main` would print it (standard output,
//! standard error with its `error:` line, exit code). The same from the policy applied to a
//! real control plane runs as processes, in `tests/adapt.rs`.
//!
//! The topology: frontend → orders → payments (8080 http, and 9000 tcp from orders); admin,
//! which an allow policy opens to the namespace but a covering deny closes to everyone;
//! ops/prober, allowed to call orders' /health; shop's egress posture is deny, so only what
//! an egress policy allows leaves a shop sidecar. A staged (audit) policy would let frontend
//! call payments' /refund directly.

use super::*;
use bulkhead_testkit::TempDir;
use clap::Parser;
use serde_json::{Value, json};

const SHOP: &str = include_str!("../../tests/fixtures/reach-shop.yaml");

const STAGED: &str = include_str!("../../tests/fixtures/reach-staged.yaml");

/// The tables `tests/adapt.rs` expects from the control plane too.
fn who_reaches_payments() -> &'static str {
    include_str!("../../tests/fixtures/reach-who-reaches-payments.txt").trim_end()
}

fn who_reaches_payments_staged() -> &'static str {
    include_str!("../../tests/fixtures/reach-who-reaches-payments-staged.txt").trim_end()
}

fn frontend_blast_radius() -> &'static str {
    include_str!("../../tests/fixtures/reach-frontend-blast-radius.txt").trim_end()
}

/// The policy files, written once per test.
struct Files {
    dir: TempDir,
    shop: PathBuf,
    staged: PathBuf,
}

fn files() -> Files {
    let dir = TempDir::new().unwrap();
    let (shop, staged) = (dir.path().join("shop.yaml"), dir.path().join("staged.yaml"));
    std::fs::write(&shop, SHOP).unwrap();
    std::fs::write(&staged, STAGED).unwrap();
    Files { dir, shop, staged }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `bulkhead reach` as the command line parses it.
#[derive(Parser)]
struct Reach {
    #[command(flatten)]
    args: ReachArgs,
}

/// `bulkhead reach ARGS` with `context` as the admin context, run in-process: (exit code,
/// stdout, stderr) as `main` leaves them.
fn reach_in(context: &Path, args: &[&str]) -> (i32, String, String) {
    let parsed = Reach::try_parse_from(std::iter::once("reach").chain(args.iter().copied()))
        .unwrap()
        .args;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(from_policy(context, parsed, &mut out, &mut err));
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            writeln!(err, "error: {e:#}").unwrap();
            1
        }
    };
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// `bulkhead reach ARGS -f shop.yaml -f staged.yaml`, offline; (code, stdout, stderr).
fn reach(f: &Files, args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.extend(["-f", s(&f.shop), "-f", s(&f.staged)]);
    reach_in(&f.dir.path().join("admin.yaml"), &all)
}

/// The table a successful run prints, without its final newline.
fn table(result: (i32, String, String)) -> String {
    let (code, out, err) = result;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

fn json_of(result: (i32, String, String)) -> Value {
    serde_json::from_str(&table(result)).unwrap()
}

fn rule(policy: &str, rule: &str, mode: &str) -> Value {
    json!({"kind": "rule", "policy": policy, "rule": rule, "mode": mode})
}

fn edge(from: &str, to: &str, port: u16, protocol: &str, egress: Value, ingress: Value) -> Value {
    json!({"from": from, "to": to, "port": port, "protocol": protocol,
           "egress": egress, "ingress": ingress})
}

#[test]
fn workloads_are_namespace_slash_name() {
    assert_eq!(
        parse_workload("shop/payments").map(|w| w.to_string()).ok(),
        Some("shop/payments".to_string())
    );
    for bad in ["payments", "/payments", "shop/", "a/b/c", "Shop/payments"] {
        let e = parse_workload(bad).err().map(|e| e.to_string());
        assert_eq!(
            e,
            Some(format!(
                "{bad:?} is not a workload: write it as namespace/name, like shop/payments"
            ))
        );
    }
}

#[test]
fn who_can_reach_from_files_as_a_table_and_as_json() {
    let f = files();
    // The audit policy in staged.yaml changes nothing under the enforced view.
    assert_eq!(table(reach(&f, &["shop/payments"])), who_reaches_payments());

    // A posture grant (ops has no egress posture) beside policy grants, one policy's rules
    // together.
    assert_eq!(
        table(reach(&f, &["shop/orders"])),
        "\
SOURCE         PORT  PROTOCOL  ALLOWED BY
ops/prober     8080  http      egress: built-in posture; ingress: policy shop/orders-ingress rule health
shop/frontend  8080  http      egress: policy shop/frontend-egress rule to-orders; ingress: policy shop/orders-ingress rules frontend-manages-orders and health
2 workloads can reach shop/orders"
    );

    // admin-allow-shop opens admin to its namespace, but admin-lockdown covers it.
    assert_eq!(
        table(reach(&f, &["shop/admin"])),
        "no workload can reach shop/admin"
    );

    let v = json_of(reach(&f, &["shop/orders", "-o", "json"]));
    assert_eq!(
        v,
        json!({
            "question": "who-can-reach",
            "workload": "shop/orders",
            "source": {"kind": "files", "files": [s(&f.shop), s(&f.staged)]},
            "assumptions": {"view": "enforced", "egress": "enforced"},
            "sources": ["ops/prober", "shop/frontend"],
            "edges": [
                edge("ops/prober", "shop/orders", 8080, "http",
                     json!([{"kind": "posture", "scope": "builtIn", "mode": "enforce"}]),
                     json!([rule("shop/orders-ingress", "health", "enforce")])),
                edge("shop/frontend", "shop/orders", 8080, "http",
                     json!([rule("shop/frontend-egress", "to-orders", "enforce")]),
                     json!([rule("shop/orders-ingress", "frontend-manages-orders", "enforce"),
                            rule("shop/orders-ingress", "health", "enforce")])),
            ],
        })
    );
}

#[test]
fn blast_radius_from_files_lists_every_workload_reached_with_hops_and_path() {
    let f = files();
    assert_eq!(
        table(reach(&f, &["shop/frontend", "--blast-radius"])),
        frontend_blast_radius()
    );
    // The prober may only call /health, yet two hops take it to payments.
    assert_eq!(
        table(reach(&f, &["ops/prober", "--blast-radius"])),
        "\
WORKLOAD       HOPS  PATH
shop/orders    1     ops/prober -> shop/orders:8080
shop/payments  2     ops/prober -> shop/orders:8080 -> shop/payments:8080
if ops/prober is compromised, 2 of 4 other workloads are reachable"
    );
    // payments' sidecar lets nothing out.
    assert_eq!(
        table(reach(&f, &["shop/payments", "--blast-radius"])),
        "if shop/payments is compromised, 0 of 4 other workloads are reachable"
    );

    let v = json_of(reach(
        &f,
        &["shop/frontend", "--blast-radius", "-o", "json"],
    ));
    let to_orders = edge(
        "shop/frontend",
        "shop/orders",
        8080,
        "http",
        json!([rule("shop/frontend-egress", "to-orders", "enforce")]),
        json!([
            rule("shop/orders-ingress", "frontend-manages-orders", "enforce"),
            rule("shop/orders-ingress", "health", "enforce")
        ]),
    );
    let to_payments = edge(
        "shop/orders",
        "shop/payments",
        8080,
        "http",
        json!([rule("shop/orders-egress", "to-payments", "enforce")]),
        json!([rule("shop/payments-allow-orders", "charges", "enforce")]),
    );
    assert_eq!(
        v,
        json!({
            "question": "blast-radius",
            "workload": "shop/frontend",
            "source": {"kind": "files", "files": [s(&f.shop), s(&f.staged)]},
            "assumptions": {"view": "enforced", "egress": "enforced"},
            "otherWorkloads": 4,
            "reached": [
                {"workload": "shop/orders", "hops": 1, "path": [to_orders.clone()]},
                {"workload": "shop/payments", "hops": 2, "path": [to_orders, to_payments]},
            ],
        })
    );
}

#[test]
fn staged_and_stolen_key_change_what_is_reachable() {
    let f = files();
    // --staged: the audit policy lets frontend reach payments directly, in one hop.
    assert_eq!(
        table(reach(&f, &["shop/payments", "--staged"])),
        who_reaches_payments_staged()
    );
    assert_eq!(
        table(reach(&f, &["shop/frontend", "--blast-radius", "--staged"])),
        "\
WORKLOAD       HOPS  PATH
shop/orders    1     shop/frontend -> shop/orders:8080
shop/payments  1     shop/frontend -> shop/payments:8080
if shop/frontend is compromised, 2 of 4 other workloads are reachable (staged: audit policies and postures as if enforced)"
    );
    let v = json_of(reach(&f, &["shop/payments", "--staged", "-o", "json"]));
    assert_eq!(
        v["assumptions"],
        json!({"view": "staged", "egress": "enforced"})
    );
    assert_eq!(
        v["edges"][0]["ingress"],
        json!([rule(
            "shop/payments-allow-refunds",
            "frontend-refunds",
            "audit"
        )])
    );

    // --stolen-key: shop's egress posture no longer holds anyone back; orders' /health rule
    // admits the whole namespace and ops.
    let v = json_of(reach(&f, &["shop/orders", "--stolen-key", "-o", "json"]));
    assert_eq!(
        v["assumptions"],
        json!({"view": "enforced", "egress": "bypassed"})
    );
    assert_eq!(
        v["sources"],
        json!([
            "ops/prober",
            "shop/admin",
            "shop/frontend",
            "shop/orders",
            "shop/payments"
        ])
    );
    assert_eq!(v["edges"][1]["egress"], json!([]));
    assert_eq!(
        table(reach(&f, &["shop/payments", "--blast-radius", "--stolen-key"])),
        "\
WORKLOAD     HOPS  PATH
shop/orders  1     shop/payments -> shop/orders:8080
if shop/payments is compromised, 1 of 4 other workloads is reachable (stolen key: egress not enforced, any source address)"
    );
    // The covering deny holds even for a stolen key.
    assert_eq!(
        table(reach(&f, &["shop/admin", "--stolen-key"])),
        "no workload can reach shop/admin (stolen key: egress not enforced, any source address)"
    );
}

#[test]
fn errors_say_what_went_wrong_and_what_to_do() {
    let f = files();
    let known = "ops/prober, shop/admin, shop/frontend, shop/orders, shop/payments";

    let (code, out, err) = reach(&f, &["shop/paymnts"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        format!(
            "error: no Workload shop/paymnts is declared; reachability is computed between declared workloads only; the policy files declare 5 workloads: {known}\n"
        )
    );

    let (code, _, err) = reach(&f, &["ops/payments", "--blast-radius"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "error: no Workload ops/payments is declared; reachability is computed between declared workloads only (did you mean shop/payments?); the policy files declare 5 workloads: {known}\n"
        )
    );

    let (code, _, err) = reach(&f, &["payments"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: \"payments\" is not a workload: write it as namespace/name, like shop/payments\n"
    );

    // A set that does not compile is refused with every error's location.
    let dir = TempDir::new().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, SHOP.replace("protocol: tcp", "protocol: tpc")).unwrap();
    let (code, out, err) = reach_in(
        &dir.path().join("admin.yaml"),
        &["shop/orders", "-f", s(&bad)],
    );
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.starts_with(&format!("{}:20:", bad.display())), "{err}");
    assert!(
        err.ends_with("error: 1 error(s) in the policy files, so there is no set to analyse; fix them (`bulkhead policy lint` checks the same)\n"),
        "{err}"
    );

    // Without -f and without a control plane: say so, and offer -f.
    let missing = dir.path().join("admin.yaml");
    let (code, _, err) = reach_in(&missing, &["shop/orders"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("error: cannot read the applied policy from the control plane (pass -f FILE to analyse policy files instead): cannot read admin context {}", missing.display())),
        "{err}"
    );
}
