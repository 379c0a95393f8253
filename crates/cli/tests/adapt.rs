//! See and adapt (issue #7), end to end with real processes: traffic through a sample mesh
//! in discovery mode (ingress allowed by the namespace posture) → `bulkhead graph` shows it →
//! `bulkhead recommend` writes least-privilege audit policy from it → applied, the observed
//! traffic shows no would-deny while a new lateral request does → `bulkhead impact` lists
//! exactly that request as newly denied → `bulkhead promote` refuses while it had would-deny
//! flows, then (forced) enforces, and the lateral request is denied while the observed
//! traffic still flows. And `bulkhead reach` over the policy applied to a control plane.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually, id};
use bulkhead_testkit::{Proc, http};
use std::net::SocketAddr;

const DISCOVERY: &str = include_str!("fixtures/adapt-discovery.yaml");

struct Shop {
    mesh: Mesh,
    _procs: Vec<Proc>,
    to_orders: SocketAddr,
    to_payments: SocketAddr,
}

fn shop() -> Shop {
    let mesh = Mesh::start();
    mesh.apply("discovery.yaml", DISCOVERY);
    let mut procs = Vec::new();
    let mut upstreams = Vec::new();
    for name in ["orders", "payments"] {
        let (app, app_addr) = mesh.app(name);
        let (proxy, ready) = mesh.inbound_proxy(
            name,
            &mesh.token(&id(name)),
            app_addr,
            &["--flow-interval-secs", "1"],
        );
        upstreams.push(format!(
            "name={name},listen=127.0.0.1:0,address={},identity={},port=8080,workload=shop/{name}",
            addr(&ready["inbound"]),
            id(name)
        ));
        procs.extend([app, proxy]);
    }
    let (frontend, ready) = mesh.proxy(
        "frontend",
        &mesh.token(&id("frontend")),
        &[
            "--upstream",
            &upstreams[0],
            "--upstream",
            &upstreams[1],
            "--flow-interval-secs",
            "1",
        ],
    );
    procs.push(frontend);
    Shop {
        to_orders: addr(&ready["upstreams"]["orders"]),
        to_payments: addr(&ready["upstreams"]["payments"]),
        mesh,
        _procs: procs,
    }
}

fn cli(mesh: &Mesh, args: &[&str]) -> String {
    let (code, out, err) = mesh.cli(args);
    assert_eq!(code, 0, "bulkhead {args:?} failed: {err}");
    out
}

/// The frontend's everyday traffic: reads and creates orders.
fn everyday(shop: &Shop) {
    for path in ["/orders/1", "/orders/2", "/orders/37"] {
        assert_eq!(http(shop.to_orders, "GET", path).status, 200);
    }
    assert_eq!(http(shop.to_orders, "POST", "/orders").status, 200);
}

#[test]
fn observe_recommend_audit_impact_promote() {
    let shop = shop();
    let mesh = &shop.mesh;
    everyday(&shop);

    // The graph shows the observed edge, from the destination sidecar's view.
    eventually(WAIT, "the frontend → orders edge in the graph", || {
        let out = cli(mesh, &["graph", "-o", "json"]);
        let g: serde_json::Value = serde_json::from_str(&out).unwrap();
        g.as_array().unwrap().iter().any(|e| {
            e["source"] == "shop/frontend"
                && e["destination"] == "shop/orders"
                && e["decided"] == "ingress"
                && e["allowed"] == 4
        })
    });
    // -n keeps the lines with a side in the namespace.
    let lines = |ns: &str| -> usize {
        let out = cli(mesh, &["graph", "-n", ns, "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert!(lines("shop") >= 1);
    assert_eq!(lines("billing"), 0);
    let dot = cli(mesh, &["graph", "-o", "dot"]);
    assert!(
        dot.contains("\"shop/frontend\" -> \"shop/orders\" [label=\"8080/http allow 4 deny 0\""),
        "{dot}"
    );

    // The observed blast radius: the frontend actually reached orders and nothing else
    // (policy would let it reach payments too: the namespace posture allows everything).
    let reached = |args: &[&str]| -> Vec<(String, u64)> {
        let out = cli(mesh, args);
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        r["reached"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["party"].as_str().unwrap().to_string(),
                    v["hops"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let observed = ["--observed", "-o", "json"];
    assert_eq!(
        reached(&[&["reach", "shop/frontend", "--blast-radius"], &observed[..]].concat()),
        [("shop/orders".to_string(), 1)]
    );
    assert_eq!(
        reached(&[&["reach", "shop/orders"], &observed[..]].concat()),
        [("shop/frontend".to_string(), 1)]
    );
    let by_policy = cli(mesh, &["reach", "shop/frontend", "--blast-radius"]);
    assert!(by_policy.contains("shop/payments"), "{by_policy}");

    // Recommend: an audit allow policy for orders naming the frontend, ids generalised,
    // with its evidence; and an audit deny posture for the namespace.
    let rec = cli(mesh, &["recommend"]);
    for needle in [
        "name: orders-recommended",
        "mode: audit",
        "spiffe://test.local/ns/shop/sa/frontend",
        "/orders/*",
        "GET",
        "POST",
        "kind: DefaultPosture",
        "ingress: deny",
    ] {
        assert!(rec.contains(needle), "missing {needle:?} in:\n{rec}");
    }
    assert!(rec.contains("# "), "the evidence is in comments:\n{rec}");
    assert!(
        !rec.contains("payments-recommended"),
        "no traffic to payments was seen:\n{rec}"
    );
    // -n: only the workloads of that namespace, as `graph -n`.
    let in_shop = cli(mesh, &["recommend", "-n", "shop"]);
    assert!(in_shop.contains("name: orders-recommended"), "{in_shop}");
    let elsewhere = cli(mesh, &["recommend", "-n", "billing"]);
    assert!(
        !elsewhere.contains("orders-recommended") && !elsewhere.contains("kind: DefaultPosture"),
        "{elsewhere}"
    );
    mesh.apply("recommended.yaml", &rec);

    // In audit mode: everyday traffic is allowed with no audit difference; a new lateral
    // request (the frontend calling payments, never seen before) is allowed today but
    // would be denied.
    everyday(&shop);
    let r = http(shop.to_orders, "GET", "/orders/5");
    let header = r.header("x-bulkhead-decision").unwrap().to_string();
    assert!(!header.contains("audit"), "{header}");
    let lateral = http(shop.to_payments, "POST", "/charge");
    assert_eq!(lateral.status, 200, "allowed today: {lateral:?}");
    let header = lateral.header("x-bulkhead-decision").unwrap();
    assert!(
        header.contains("audit=would-deny") && header.contains("audit-posture=shop/recommended"),
        "{header}"
    );

    // Impact of enforcing the recommendation: exactly the lateral request is newly denied.
    let file = mesh.dir.path().join("recommended.yaml");
    eventually(WAIT, "the lateral request in the impact", || {
        let out = cli(mesh, &["impact", "-f", file.to_str().unwrap()]);
        out.contains("newly denied") && out.contains("shop/payments")
    });
    let out = cli(mesh, &["impact", "-f", file.to_str().unwrap()]);
    let denied: Vec<&str> = out.lines().filter(|l| l.contains("newly denied")).collect();
    assert!(
        denied.iter().all(|l| !l.contains("shop/orders")),
        "observed traffic must not be newly denied:\n{out}"
    );
    assert!(out.contains("POST /charge"), "{out}");
    // As a pipeline gate: the same report, then exit 1 naming the count.
    let (code, gated, err) =
        mesh.cli(&["impact", "-f", file.to_str().unwrap(), "--fail-on-new-deny"]);
    assert_eq!(code, 1, "{gated}{err}");
    assert!(gated.contains("POST /charge"), "{gated}");
    assert!(
        err.contains(
            "error: 1 observed flow(s) allowed today would be denied (--fail-on-new-deny)"
        ),
        "{err}"
    );

    // Promote: the allow policy has no would-deny flows; the posture has the lateral one.
    let out = cli(mesh, &["promote", "shop/orders-recommended"]);
    assert!(
        out.contains("AuthorizationPolicy/shop/orders-recommended is enforced"),
        "{out}"
    );
    let (code, _, err) = mesh.cli(&["promote", "DefaultPosture/shop/recommended"]);
    assert_ne!(code, 0, "promote must refuse while it had would-deny flows");
    assert!(err.contains("would have denied 1 requests"), "{err}");
    assert!(
        err.contains("shop/frontend → shop/payments:8080 POST /charge"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    let out = cli(
        mesh,
        &["promote", "DefaultPosture/shop/recommended", "--force"],
    );
    assert!(out.contains("is enforced"), "{out}");

    // Enforced: the lateral request is denied; everyday traffic still flows.
    eventually(WAIT, "the lateral request denied", || {
        http(shop.to_payments, "POST", "/charge").status == 403
    });
    everyday(&shop);
    // Enforced already, the recommendation denies nothing new: the gate passes.
    let (code, out, err) =
        mesh.cli(&["impact", "-f", file.to_str().unwrap(), "--fail-on-new-deny"]);
    assert_eq!(code, 0, "{out}{err}");
    let postures = cli(mesh, &["get", "postures", "-o", "yaml"]);
    assert!(postures.contains("ingress: deny"), "{postures}");
    assert!(!postures.contains("mode: audit"), "{postures}");
}

/// `bulkhead tap` shows the requests a workload's sidecar decides as they happen, filtered
/// in the sidecar: concrete paths, the status the caller got, the verdict and the rule.
#[test]
fn tap_shows_live_requests_with_their_verdicts() {
    let shop = shop();
    let mesh = &shop.mesh;
    mesh.apply(
        "no-delete.yaml",
        r#"apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: keep-order-9, namespace: shop}
spec:
  selector: {workload: orders}
  action: deny
  rules:
    - name: no-deleting-9
      to: {methods: [DELETE], paths: ["/orders/9"]}
"#,
    );
    let (events, stderr) = mesh.tap(
        &[
            "shop/orders",
            "--method",
            "delete",
            "--from",
            "shop/frontend",
            "-n",
            "2",
            "--for",
            "30s",
        ],
        || {
            assert_eq!(http(shop.to_orders, "GET", "/orders/1").status, 200);
            assert_eq!(http(shop.to_orders, "DELETE", "/orders/9").status, 403);
            assert_eq!(http(shop.to_orders, "DELETE", "/orders/10").status, 200);
        },
    );
    assert!(
        stderr.contains("tapping shop/orders (1 sidecar connected"),
        "{stderr}"
    );
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["method"], "DELETE", "the GETs were filtered out: {e}");
        assert!(e.get("grpcStatus").is_none(), "not gRPC: {e}");
        assert_eq!(e["direction"], "ingress");
        assert_eq!(e["sourceIdentity"], id("frontend").as_str());
        assert_eq!(e["destination"]["name"], "orders");
        let expected = match e["path"].as_str().unwrap() {
            "/orders/9" => (403, "deny", "shop/keep-order-9", "no-deleting-9"),
            "/orders/10" => (200, "allow", "shop/discovery", ""),
            other => panic!("the path is the concrete one: {other}"),
        };
        assert_eq!(
            (
                e["status"].as_u64().unwrap(),
                e["verdict"].as_str().unwrap(),
                e["policy"].as_str().unwrap(),
                e["rule"].as_str().unwrap_or(""),
            ),
            (expected.0, expected.1, expected.2, expected.3),
            "{e}"
        );
    }
}

#[test]
fn reach_reads_the_policy_applied_to_the_control_plane() {
    let mesh = Mesh::start();
    let dir = bulkhead_testkit::TempDir::new().unwrap();
    let (shop, staged) = (dir.path().join("shop.yaml"), dir.path().join("staged.yaml"));
    std::fs::write(&shop, include_str!("fixtures/reach-shop.yaml")).unwrap();
    std::fs::write(&staged, include_str!("fixtures/reach-staged.yaml")).unwrap();
    // The tables the in-process tests (`reach_cmd/tests.rs`) expect from the same files.
    let who_reaches_payments = include_str!("fixtures/reach-who-reaches-payments.txt").trim_end();
    let frontend_blast_radius = include_str!("fixtures/reach-frontend-blast-radius.txt").trim_end();
    let who_reaches_payments_staged =
        include_str!("fixtures/reach-who-reaches-payments-staged.txt").trim_end();
    let table = |(code, out, err): (i32, String, String)| {
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        out.strip_suffix('\n').unwrap_or(&out).to_string()
    };

    // Nothing applied yet: nothing is declared, and the error says so.
    let (code, _, err) = mesh.cli(&["reach", "shop/payments"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: no Workload shop/payments is declared; reachability is computed between declared workloads only; the applied policy (revision 0) declares no Workload at all: declare each workload (kind: Workload, with its identity and ports) for reach to analyse it\n"
    );

    for file in [&shop, &staged] {
        let (code, _, err) = mesh.cli(&["apply", "-f", file.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
    // The same answers as from the files, at the revision they were computed for.
    assert_eq!(
        table(mesh.cli(&["reach", "shop/payments"])),
        format!("{who_reaches_payments} (revision 2)")
    );
    assert_eq!(
        table(mesh.cli(&["reach", "shop/frontend", "--blast-radius"])),
        format!("{frontend_blast_radius} (revision 2)")
    );
    assert_eq!(
        table(mesh.cli(&["reach", "shop/payments", "--staged"])),
        who_reaches_payments_staged.replace("(staged:", "(revision 2; staged:")
    );
    let v: serde_json::Value = serde_json::from_str(&table(mesh.cli(&[
        "reach",
        "shop/frontend",
        "--blast-radius",
        "-o",
        "json",
    ])))
    .unwrap();
    assert_eq!(
        v["source"],
        serde_json::json!({"kind": "controlPlane", "revision": 2})
    );
    let reached: Vec<(&str, u64)> = v["reached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["workload"].as_str().unwrap(), r["hops"].as_u64().unwrap()))
        .collect();
    assert_eq!(reached, [("shop/orders", 1), ("shop/payments", 2)]);

    let (code, _, err) = mesh.cli(&["reach", "shop/ghost"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: no Workload shop/ghost is declared; reachability is computed between declared workloads only; the applied policy (revision 2) declares 5 workloads: ops/prober, shop/admin, shop/frontend, shop/orders, shop/payments\n"
    );
}
