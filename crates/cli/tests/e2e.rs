//! End to end with the real binaries: `bulkhead control`, two `bulkhead-proxy` sidecars and
//! two `bulkhead sample-app` services on 127.0.0.1 with ephemeral ports, real TLS 1.3 and
//! certificates from the control plane's own CA.
#![allow(clippy::unwrap_used)]

#[path = "e2e/canonical.rs"]
mod canonical;
#[path = "spiffe/check.rs"]
mod check;
#[path = "e2e/federation.rs"]
mod federation;
#[path = "mesh/join.rs"]
mod join;
#[path = "e2e/kubectl.rs"]
mod kubectl;
#[path = "e2e/offline.rs"]
mod offline;
#[path = "e2e/readme.rs"]
mod readme;
#[path = "e2e/spiffe.rs"]
mod spiffe;

use bulkhead_testkit::mesh::{Mesh, TD, WAIT, addr, eventually, id, log_has, orders_upstream};
use bulkhead_testkit::{Bins, foreign_identity, http, http_raw, mtls_raw, parse_response, run};
use join::{join_as, mesh_trust};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const POLICY: &str = include_str!("fixtures/e2e.yaml");

#[test]
fn walking_skeleton_end_to_end() {
    let mut mesh = Mesh::start();
    let data = mesh.data();

    // The CA key is private to the control plane's user.
    let mode = std::fs::metadata(data.join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "ca.key must be 0600");

    // Certificates from our CA pass OpenSSL's own verification as TLS client and server
    // certificates (the admin SVID comes from the same signing path as every workload's).
    for purpose in ["sslclient", "sslserver"] {
        let ca = data.join("ca.pem");
        let admin = data.join("admin.pem");
        let (code, out, err) = run(
            Path::new("openssl"),
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                ca.to_str().unwrap(),
                admin.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 0, "openssl verify -purpose {purpose}: {out}{err}");
    }

    // An invalid policy is refused with file:line:column and changes nothing.
    let bad = mesh.dir.path().join("bad.yaml");
    std::fs::write(&bad, POLICY.replace("methods: [GET]", "methods: [FETCH]")).unwrap();
    let (code, _, err) = mesh.cli(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{}:22:19: unknown HTTP method \"FETCH\"",
            bad.display()
        )),
        "{err}"
    );

    let good = mesh.dir.path().join("policy.yaml");
    std::fs::write(&good, POLICY).unwrap();
    let (code, out, err) = mesh.cli(&["apply", "-f", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("AuthorizationPolicy/shop/orders-allow-frontend created"),
        "{out}"
    );
    assert!(out.contains("revision 1"), "{out}");

    // orders: app + sidecar inbound.
    let (_orders_app, orders_app_addr) = mesh.app("orders");
    let orders_token = mesh.token(&id("orders"));
    let (_orders_proxy, orders) = mesh.inbound_proxy(
        "orders",
        &orders_token,
        orders_app_addr,
        &["--identity", &id("orders")],
    );
    assert_eq!(orders["spiffe_id"], id("orders"));
    assert_eq!(orders["revision"], 1);
    let orders_in = addr(&orders["inbound"]);

    // frontend: app + sidecar with an upstream to orders, and one to an "impostor" upstream
    // that points at orders but expects the payments identity.
    let (_frontend_app, frontend_app_addr) = mesh.app("frontend");
    let frontend_token = mesh.token(&id("frontend"));
    let (_frontend_proxy, frontend) = mesh.proxy(
        "frontend",
        &frontend_token,
        &[
            "--inbound",
            "127.0.0.1:0",
            "--app",
            &frontend_app_addr.to_string(),
            "--upstream",
            &orders_upstream(orders_in),
            "--upstream",
            &format!(
                "name=impostor,listen=127.0.0.1:0,address={orders_in},identity={}",
                id("payments")
            ),
        ],
    );
    let to_orders = addr(&frontend["upstreams"]["orders"]);

    // Allowed: the app's own 200, with the caller's verified identity.
    let r = http(to_orders, "GET", "/orders");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body,
        format!("orders: GET /orders from {} (HTTP/1.1)\n", id("frontend"))
    );
    assert_eq!(
        r.header("x-bulkhead-decision"),
        Some("allow; policy=shop/orders-allow-frontend; rule=frontend-reads-orders; revision=1")
    );

    // Outside the policy: 403 naming the rule, or the nearest miss for a default deny.
    let r = http(to_orders, "GET", "/orders/internal/audit");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.header("x-bulkhead-decision"),
        Some("deny; policy=shop/orders-deny-internal; rule=internal-paths; revision=1")
    );
    assert_eq!(
        r.body,
        "bulkhead: denied by policy shop/orders-deny-internal rule internal-paths (revision 1)\n"
    );
    let r = http(to_orders, "DELETE", "/orders/7");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.header("x-bulkhead-decision"),
        Some("deny; policy=default-deny; revision=1")
    );
    assert!(
        r.body.contains("nearest miss: policy shop/orders-allow-frontend rule frontend-reads-orders matched the identity and path but not method DELETE"),
        "{}",
        r.body
    );

    // Outbound refuses a server that does not present the identity the upstream declares.
    let r = http(addr(&frontend["upstreams"]["impostor"]), "GET", "/orders");
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.body.contains(&format!(
            "peer identity {} is not the expected {}",
            id("orders"),
            id("payments")
        )),
        "{}",
        r.body
    );

    // Plaintext to the inbound port gets no HTTP answer.
    let raw = http_raw(orders_in, "GET", "/orders").unwrap_or_default();
    assert!(
        parse_response(&raw).is_none(),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&raw)
    );

    // A client certificate from another CA (same trust domain name, same SPIFFE ID) is refused.
    let bundle = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let rogue = foreign_identity(TD, &id("frontend"));
    let answer = mtls_raw(orders_in, &bundle, &id("orders"), &rogue, "/orders");
    assert!(
        answer
            .as_ref()
            .map(|raw| parse_response(raw).is_none())
            .unwrap_or(true),
        "a foreign CA's certificate got an HTTP answer: {answer:?}"
    );
    let deadline = Instant::now() + WAIT;
    while !log_has(
        &mesh,
        "orders-proxy",
        "connection refused: mTLS handshake failed",
    ) {
        assert!(Instant::now() < deadline, "the refusal was not logged");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The admin port shows what happened, labelled as an operator needs it.
    let admin = addr(&orders["admin"]);
    let page = http(admin, "GET", "/metrics");
    assert_eq!(
        page.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let metrics = page.body;
    for line in [
        "bulkhead_authz_decisions_total{direction=\"inbound\",verdict=\"deny\",audit=\"\",policy=\"shop/orders-deny-internal\",rule=\"internal-paths\",source_namespace=\"shop\",source_workload=\"frontend\",source_principal=\"spiffe://test.local/ns/shop/sa/frontend\",destination_namespace=\"shop\",destination_workload=\"orders\"} 1",
        "bulkhead_authz_decisions_total{direction=\"inbound\",verdict=\"allow\",audit=\"\",policy=\"shop/orders-allow-frontend\",rule=\"frontend-reads-orders\",source_namespace=\"shop\",source_workload=\"frontend\",source_principal=\"spiffe://test.local/ns/shop/sa/frontend\",destination_namespace=\"shop\",destination_workload=\"orders\"} 1",
        "bulkhead_requests_total{direction=\"inbound\",source_namespace=\"shop\",source_workload=\"frontend\",source_principal=\"spiffe://test.local/ns/shop/sa/frontend\",destination_namespace=\"shop\",destination_workload=\"orders\",destination_principal=\"spiffe://test.local/ns/shop/sa/orders\",response_code=\"403\",response_flags=\"RBAC\"} 2",
        // Mesh denials, told apart from an app's own 403 by `response_flags`; latency by the
        // same labels: two 403s observed.
        "bulkhead_request_duration_seconds_count{direction=\"inbound\",source_namespace=\"shop\",source_workload=\"frontend\",source_principal=\"spiffe://test.local/ns/shop/sa/frontend\",destination_namespace=\"shop\",destination_workload=\"orders\",destination_principal=\"spiffe://test.local/ns/shop/sa/orders\",response_code=\"403\",response_flags=\"RBAC\"} 2",
        "bulkhead_tls_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"} 1",
        // A foreign CA (roots carry a random tag in their name, so it is not ours).
        "bulkhead_tls_handshake_failures_total{direction=\"inbound\",reason=\"unknown_ca\"} 1",
        // The frontend refused this server's identity for its "impostor" upstream.
        "bulkhead_tls_handshake_failures_total{direction=\"inbound\",reason=\"refused_by_peer\"} 1",
        "bulkhead_config_updates_total{result=\"ack\"} 1",
        "bulkhead_policy_revision 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    assert!(
        metrics.contains("bulkhead_svid_expiry_timestamp_seconds "),
        "{metrics}"
    );
    // Prometheus' own checker takes the page as served (families, help, types).
    let complaints = bulkhead_testkit::promtool_check_metrics("e2e", &metrics);
    assert!(complaints.is_empty(), "{complaints}\n{metrics}");
    let frontend_metrics = http(addr(&frontend["admin"]), "GET", "/metrics").body;
    assert!(
        frontend_metrics.contains("bulkhead_tls_handshake_failures_total{direction=\"outbound\",reason=\"unexpected_identity\"} 1"),
        "{frontend_metrics}"
    );
    assert_eq!(http(admin, "GET", "/ready").status, 200);
    assert_eq!(http(admin, "GET", "/live").status, 200);
    let config: serde_json::Value =
        serde_json::from_str(&http(admin, "GET", "/config").body).unwrap();
    assert_eq!(config["spiffeId"], id("orders"));
    assert_eq!(config["policyRevision"], 1);

    // A policy change is pushed live: allowing DELETE takes effect without restarts.
    std::fs::write(
        &good,
        POLICY.replace("methods: [GET]", "methods: [GET, DELETE]"),
    )
    .unwrap();
    let (code, out, err) = mesh.cli(&["apply", "-f", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revision 2"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = http(to_orders, "DELETE", "/orders/7");
        if r.status == 200 {
            assert_eq!(
                r.header("x-bulkhead-decision"),
                Some(
                    "allow; policy=shop/orders-allow-frontend; rule=frontend-reads-orders; revision=2"
                )
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy revision 2 was not enforced within 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    mesh.control.assert_running();
}

#[test]
fn join_tokens_grant_exactly_one_identity() {
    let mesh = Mesh::start();

    // A token bound to frontend cannot obtain the payments identity, and says so.
    let token = mesh.token(&id("frontend"));
    let err = mesh.failing_proxy(&token, &["--identity", &id("payments")]);
    assert!(
        err.contains(&format!(
            "this credential is bound to {}; it cannot be used to obtain {}",
            id("frontend"),
            id("payments")
        )),
        "{err}"
    );

    // The refused attempt did not spend the token; its one use then works, and a second
    // use is refused as used up.
    let (mut p, ready) = mesh.proxy(
        "frontend",
        &token,
        &[
            "--upstream",
            &format!(
                "name=x,listen=127.0.0.1:0,address=127.0.0.1:9,identity={}",
                id("x")
            ),
        ],
    );
    assert_eq!(ready["spiffe_id"], id("frontend"));
    p.assert_running();
    // A second proxy with the spent token and no kept credential of its own.
    let err = mesh.failing_proxy(&token, &["--no-credential-file"]);
    assert!(err.contains("join token has been used up"), "{err}");

    // A made-up token is refused without detail about any real one.
    let fake = mesh.dir.path().join("fake.token");
    std::fs::write(
        &fake,
        "bhj.AAAAAAAAAAAAAAAA.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
    )
    .unwrap();
    let err = mesh.failing_proxy(&fake, &[]);
    assert!(
        err.contains("join token is not known to this control plane"),
        "{err}"
    );
}

#[test]
fn demo_once_shows_allowed_and_denied_calls() {
    let bins = Bins::next_to(env!("CARGO_BIN_EXE_bulkhead"));
    let (code, out, err) = run(&bins.bulkhead, &["demo", "--once"], &[]);
    assert_eq!(code, 0, "demo failed:\n{out}\n{err}");
    for needle in [
        // The web console, on loopback, with its one-time login address (#21).
        "  web console    http://127.0.0.1:",
        "/#token=",
        // Before: discovery mode lets the lateral requests through.
        "ALLOWED  frontend -> payments POST /charge  -> 200",
        "5 allowed, 0 denied.",
        // After: least privilege.
        "ALLOWED  customer -> frontend POST /checkout  -> 200",
        "-> POST /charge answered 200: payments: POST /charge from spiffe://bulkhead.local/ns/shop/sa/orders",
        "ALLOWED  frontend -> orders GET /orders  -> 200",
        "DENIED   frontend -> payments GET /admin/users  -> 403",
        "denied by policy shop/payments-deny-admin rule admin-paths (revision 3)",
        "DENIED   frontend -> payments POST /charge  -> 403",
        "matched the method and path but not identity spiffe://bulkhead.local/ns/shop/sa/frontend",
        "2 allowed, 3 denied.",
    ] {
        assert!(out.contains(needle), "demo output lacks {needle:?}:\n{out}");
    }
    // The graph and the blast radius, before and after the policy.
    let (before, after) = out.split_once("== After").unwrap();
    let row = |text: &str, from: &str, to: &str| -> Option<(u64, u64)> {
        text.lines().find_map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            (cells.len() > 6 && cells[0] == from && cells[1] == to)
                .then(|| (cells[4].parse().unwrap(), cells[5].parse().unwrap()))
        })
    };
    assert_eq!(
        row(before, "shop/frontend", "shop/payments"),
        Some((2, 0)),
        "{before}"
    );
    assert_eq!(
        row(after, "shop/frontend", "shop/payments"),
        Some((0, 2)),
        "{after}"
    );
    assert_eq!(
        row(after, "shop/frontend", "shop/orders"),
        Some((2, 1)),
        "{after}"
    );
    assert_eq!(
        row(after, "shop/orders", "shop/payments"),
        Some((1, 0)),
        "{after}"
    );
    assert!(
        before.contains("shop/payments  1     shop/frontend -> shop/payments:8080"),
        "{before}"
    );
    assert!(
        after.contains(
            "shop/payments  2     shop/frontend -> shop/orders:8080 -> shop/payments:8080"
        ),
        "{after}"
    );
    assert!(
        before.contains("--observed):\n  shop/orders (1 hop), shop/payments (1 hop)"),
        "{before}"
    );
    assert!(
        after.contains("--observed):\n  shop/orders (1 hop), shop/payments (2 hops)"),
        "{after}"
    );
}

#[test]
fn revisions_history_rollback_delete_and_proxy_status() {
    let mesh = Mesh::start();
    let file = |name: &str, text: &str| {
        let p = mesh.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let v1 = file("v1.yaml", POLICY);
    let v2 = file(
        "v2.yaml",
        &POLICY.replace("methods: [GET]", "methods: [GET, DELETE]"),
    );
    assert_eq!(mesh.cli(&["apply", "-f", &v1]).0, 0);
    let (_, at_rev1, _) = mesh.cli(&["get", "-o", "yaml"]);
    let (code, out, err) = mesh.cli(&["apply", "-f", &v2]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("AuthorizationPolicy/shop/orders-allow-frontend configured\n"),
        "{out}"
    );
    assert!(out.contains("Workload/shop/orders unchanged\n"), "{out}");
    assert!(out.ends_with("revision 2\n"), "{out}");

    // An invalid apply changes nothing: same set, same history.
    let (_, before, _) = mesh.cli(&["get", "-o", "yaml"]);
    let (_, history_before, _) = mesh.cli(&["history", "-o", "json"]);
    let bad = file(
        "bad.yaml",
        &POLICY.replace("paths: [\"/orders\", \"/orders/*\"]", "paths: [orders]"),
    );
    let (code, _, err) = mesh.cli(&["apply", "-f", &bad]);
    assert_eq!(code, 1);
    assert!(err.contains("path \"orders\" must start with '/'"), "{err}");
    assert_eq!(mesh.cli(&["get", "-o", "yaml"]).1, before);
    assert_eq!(mesh.cli(&["history", "-o", "json"]).1, history_before);

    // The audit log says who changed what, and how.
    let (_, history, _) = mesh.cli(&["history"]);
    assert!(history.contains(&format!("apply {v2}")), "{history}");
    assert!(
        history.contains("spiffe://test.local/bulkhead/admin (user alice)"),
        "{history}"
    );
    assert!(
        history.contains("AuthorizationPolicy/shop/orders-allow-frontend configured"),
        "{history}"
    );

    // Rollback restores revision 1 exactly, as revision 3.
    let (code, out, err) = mesh.cli(&["rollback", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("revision 3\n"), "{out}");
    let (_, now, _) = mesh.cli(&["get", "-o", "yaml"]);
    assert_eq!(now, at_rev1);
    assert!(
        mesh.cli(&["history", "--limit", "1"])
            .1
            .contains("rollback to 1")
    );
    let (code, _, err) = mesh.cli(&["rollback", "99"]);
    assert_eq!(code, 1);
    assert!(err.contains("there is no revision 99"), "{err}");

    // A delete that would leave a policy unenforceable is refused; a plain one works.
    let (code, _, err) = mesh.cli(&["delete", "Workload/shop/orders"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "uses methods, paths on workload shop/orders, which has no Workload declaration"
        ),
        "{err}"
    );
    let (code, out, err) = mesh.cli(&["delete", "AuthorizationPolicy/shop/orders-deny-internal"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "AuthorizationPolicy/shop/orders-deny-internal deleted\nrevision 4\n"
    );

    // Proxy status: an ACK, then a NACK that keeps the last good revision in force.
    let (_procs, to_orders) = mesh.orders_and_frontend(&["--max-policy-rules", "2"]);
    eventually(WAIT, "the orders proxy acknowledging revision 4", || {
        let (_, out, _) = mesh.cli(&["get", "proxies"]);
        out.lines().any(|l| {
            l.contains(&id("orders"))
                && l.contains("shop/orders")
                && l.contains("open")
                && l.contains("4 ACK")
        })
    });
    let big = file(
        "big.yaml",
        &POLICY.replace(
            "    - name: frontend-reads-orders",
            "    - name: one\n    - name: two\n    - name: frontend-reads-orders",
        ),
    );
    let (code, out, err) = mesh.cli(&["apply", "-f", &big]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("revision 5\n"), "{out}");
    eventually(WAIT, "the NACK showing in get proxies", || {
        let (_, out, _) = mesh.cli(&["get", "proxies"]);
        out.contains("5 NACK, 4 ACK")
            && out.contains(
                "NACK of revision 5: revision 5 has 4 rules for this proxy; it accepts at most 2",
            )
    });
    let r = http(to_orders, "DELETE", "/orders/1");
    assert_eq!(
        r.status, 403,
        "revision 5 allows everything, but the proxy refused it"
    );
    assert_eq!(
        r.header("x-bulkhead-decision"),
        Some("deny; policy=default-deny; revision=4")
    );
}

#[test]
fn control_plane_outage_keeps_enforcement_then_resyncs() {
    let mut mesh = Mesh::start();
    let policy = mesh.dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    assert_eq!(mesh.cli(&["apply", "-f", policy.to_str().unwrap()]).0, 0);
    let (_procs, to_orders) = mesh.orders_and_frontend(&[]);
    assert_eq!(http(to_orders, "GET", "/orders").status, 200);
    assert_eq!(http(to_orders, "DELETE", "/orders/7").status, 403);

    // The control plane dies: the last good policy stays in force, on new connections too.
    mesh.stop_control();
    for _ in 0..5 {
        assert_eq!(http(to_orders, "GET", "/orders").status, 200);
        let r = http(to_orders, "DELETE", "/orders/7");
        assert_eq!(r.status, 403);
        assert_eq!(
            r.header("x-bulkhead-decision"),
            Some("deny; policy=default-deny; revision=1")
        );
    }

    // It comes back with its state; proxies reconnect and enforce what is applied next.
    mesh.restart_control();
    std::fs::write(
        &policy,
        POLICY.replace("methods: [GET]", "methods: [GET, DELETE]"),
    )
    .unwrap();
    let (code, out, err) = mesh.cli(&["apply", "-f", policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.ends_with("revision 2\n"),
        "state was not kept across the restart: {out}"
    );
    eventually(
        Duration::from_secs(40),
        "revision 2 enforced after the restart",
        || http(to_orders, "DELETE", "/orders/7").status == 200,
    );
    eventually(
        WAIT,
        "both proxies reconnected and acknowledging revision 2",
        || mesh.proxies_open_acking(2) == 2,
    );

    // Every part says its version: the CLI, the control plane, and each proxy as reported.
    let want = env!("CARGO_PKG_VERSION");
    let (code, out, err) = mesh.cli(&["version"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!(
            "client         {want}\ncontrol plane  {want}\nproxies        2 at {want}\n"
        )),
        "{out}"
    );
    let (_, json, _) = mesh.cli(&["version", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["controlPlane"], want);
    let proxies = v["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 2, "{v}");
    assert!(proxies.iter().all(|p| p["version"] == want), "{v}");
    // Without a control plane, --client still answers.
    mesh.stop_control();
    let (code, out, _) = mesh.cli(&["version", "--client"]);
    assert_eq!((code, out), (0, format!("client         {want}\n")));
    let (code, _, err) = mesh.cli(&["version"]);
    assert_ne!(code, 0);
    assert!(err.contains("control plane unreachable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_cannot_administer_or_read_other_workloads() {
    use bulkhead_api::channel;
    use bulkhead_api::v1::GetRequest;
    use bulkhead_api::v1::admin_client::AdminClient;
    use bulkhead_identity::tls::client_config;

    let mesh = Mesh::start();
    let as_frontend = join::channel_as(&mesh, &id("frontend")).await;
    let (bundle, control) = mesh_trust(&mesh);
    let anonymous = client_config(None, &bundle, control, &[b"h2"]).unwrap();

    let err = AdminClient::new(as_frontend.clone())
        .get(GetRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.message(),
        format!(
            "this call needs the admin credential; {} is not an admin",
            id("frontend")
        )
    );
    let err = AdminClient::new(channel::connect(mesh.control_addr, anonymous))
        .get(GetRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let err = join::watch(as_frontend.clone(), "orders")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("may not read or report the configuration of workload shop/orders"),
        "{}",
        err.message()
    );
    let mut own = join::watch(as_frontend, "frontend").await.unwrap();
    assert!(
        own.message().await.unwrap().is_some(),
        "its own configuration arrives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_rotate_at_half_life_without_dropping_connections() {
    // 4-second certificates: the proxies renew about every 2 s.
    let mesh = Mesh::start_with(&["--svid-lifetime", "4s"]);
    let policy = mesh.dir.path().join("policy.yaml");
    // The walking skeleton's policy, plus an opaque TCP port 9000 on orders for the frontend.
    let with_tcp = POLICY
        .replace(
            "ports: [{port: 8080, protocol: http}]",
            "ports: [{port: 8080, protocol: http}, {port: 9000, protocol: tcp}]",
        )
        .replace(
            "      to:\n        methods: [GET]",
            "      to:\n        ports: [8080]\n        methods: [GET]",
        )
        .replace(
            "      to:\n        paths: [\"/orders/internal/*\"]",
            "      to:\n        ports: [8080]\n        paths: [\"/orders/internal/*\"]",
        )
        .replace(
            "  rules:\n    - name: frontend-reads-orders",
            "  rules:\n    - name: frontend-streams\n      from: {identities: [\"spiffe://test.local/ns/shop/sa/frontend\"]}\n      to: {ports: [9000]}\n    - name: frontend-reads-orders",
        );
    std::fs::write(&policy, with_tcp).unwrap();
    let (code, _, err) = mesh.cli(&["apply", "-f", policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (procs, to_orders) = mesh.orders_and_frontend(&[]);

    // A long-lived opaque TCP stream: echo app ← orders proxy (port 9000) ← frontend proxy.
    let (_echo_app, echo_addr) = mesh.app_with("orders-echo", &["--tcp-echo"]);
    let echo = echo_addr.to_string();
    let (_tcp_server, orders_tcp) = mesh.proxy(
        "orders-tcp",
        &mesh.token(&id("orders")),
        &["--inbound", "127.0.0.1:0", "--app", &echo, "--port", "9000"],
    );
    let up_tcp = format!(
        "name=orders-tcp,listen=127.0.0.1:0,address={},identity={},port=9000,workload=shop/orders",
        addr(&orders_tcp["inbound"]),
        id("orders")
    );
    let (tcp_client, frontend_tcp) = mesh.proxy(
        "frontend-tcp",
        &mesh.token(&id("frontend")),
        &["--upstream", &up_tcp],
    );
    let mut stream =
        std::net::TcpStream::connect(addr(&frontend_tcp["upstreams"]["orders-tcp"])).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let orders_in = addr(&mesh.proxy_ready("orders")["inbound"]);

    // One keep-alive connection and a new connection every round, for 10 s: several
    // rotations, and well past the first certificates' expiry. Not one error.
    let mut kept = bulkhead_testkit::KeepAlive::connect(to_orders).unwrap();
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(10) {
        let r = kept.request("GET", "/orders").unwrap_or_else(|e| {
            panic!("keep-alive request failed after {:?}: {e}", start.elapsed())
        });
        assert_eq!(
            r.status,
            200,
            "keep-alive request after {:?}: {r:?}",
            start.elapsed()
        );
        let r = http(to_orders, "GET", "/orders");
        assert_eq!(
            r.status,
            200,
            "new connection after {:?}: {r:?}",
            start.elapsed()
        );
        let line = format!("round {rounds}\n");
        std::io::Write::write_all(&mut stream, line.as_bytes())
            .unwrap_or_else(|e| panic!("TCP stream write failed after {:?}: {e}", start.elapsed()));
        let mut echoed = vec![0; line.len()];
        std::io::Read::read_exact(&mut stream, &mut echoed)
            .unwrap_or_else(|e| panic!("TCP stream read failed after {:?}: {e}", start.elapsed()));
        assert_eq!(echoed, line.as_bytes(), "after {:?}", start.elapsed());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rounds >= 20, "only {rounds} rounds");
    // The TCP stream outlived at least two renewals of the proxy that opened it.
    assert!(
        tcp_client
            .log_text()
            .matches("renewed SVID; new connections use it")
            .count()
            >= 2,
        "{}",
        tcp_client.log_text()
    );

    // Both proxies renewed at least twice, and a new handshake presents the newest serial.
    let log = procs[1].log_text();
    let renewals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("renewed SVID; new connections use it"))
        .collect();
    assert!(
        renewals.len() >= 2,
        "orders renewed {} times:\n{log}",
        renewals.len()
    );
    assert!(
        procs[2]
            .log_text()
            .matches("renewed SVID; new connections use it")
            .count()
            >= 2
    );
    let client = join_as(&mesh, &id("frontend")).await;
    let bundle = std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap();
    let serial =
        bulkhead_testkit::server_serial(orders_in, &bundle, &id("orders"), &client).unwrap();
    let log = procs[1].log_text();
    let newest = log
        .lines()
        .rev()
        .find(|l| l.contains("renewed SVID; new connections use it"))
        .and_then(|l| l.split("serial=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert_eq!(
        serial, newest,
        "a new connection must see the newest certificate"
    );
}

#[test]
fn hardening_limits_protect_the_proxy() {
    use std::io::{Read, Write};
    let mesh = Mesh::start();
    let policy = mesh.dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    assert_eq!(mesh.cli(&["apply", "-f", policy.to_str().unwrap()]).0, 0);
    let (procs, to_orders) = mesh.orders_and_frontend_with(
        &[],
        &[
            "--header-read-timeout-secs",
            "1",
            "--max-connections",
            "2",
            "--max-header-bytes",
            "16384",
        ],
    );

    // An oversized request head gets 431, and the proxy keeps serving. The proxy answers as
    // soon as it has read past its limit and closes, so the rest of our write may meet a
    // closed socket (and a reset may eat the answer): try a few times, and require a 431.
    let big = format!(
        "GET /orders HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "x".repeat(20_000)
    );
    let mut answers = Vec::new();
    for _ in 0..5 {
        let mut tcp = std::net::TcpStream::connect(to_orders).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = tcp.write_all(big.as_bytes());
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).to_string();
        if answer.starts_with("HTTP/1.1 431") {
            answers.clear();
            break;
        }
        answers.push(answer);
    }
    assert!(answers.is_empty(), "no 431 in five tries: {answers:?}");
    assert_eq!(http(to_orders, "GET", "/orders").status, 200);

    // A slow client (half a request head, then nothing) is cut after its timeout; others
    // are served meanwhile.
    let mut slow = std::net::TcpStream::connect(to_orders).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"GET /orders HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let started = Instant::now();
    assert_eq!(http(to_orders, "GET", "/orders").status, 200);
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "cut after {waited:?}"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains(" 200 "),
        "the slow request must not be served"
    );

    // With two connections open, a third is closed at once and counted.
    let a = std::net::TcpStream::connect(to_orders).unwrap();
    let b = std::net::TcpStream::connect(to_orders).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut third = std::net::TcpStream::connect(to_orders).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = third.write_all(b"GET /orders HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = Vec::new();
    let _ = third.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "the third connection was served: {:?}",
        String::from_utf8_lossy(&got)
    );
    drop((a, b));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http(to_orders, "GET", "/orders").status, 200);
    let ready = mesh.proxy_ready("frontend");
    let metrics = http(addr(&ready["admin"]), "GET", "/metrics").body;
    assert!(
        metrics.contains("bulkhead_connections_refused_total{direction=\"outbound\"} 1"),
        "{metrics}"
    );
    drop(procs);
}

#[test]
fn concurrent_applies_lose_nothing() {
    let mesh = Mesh::start();
    let files: Vec<String> = (0..20)
        .map(|i| {
            let p = mesh.dir.path().join(format!("p{i}.yaml"));
            let yaml = format!(
                "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: shop}}\nspec:\n  selector: {{workload: w{i}}}\n  action: allow\n  rules:\n    - name: any\n"
            );
            std::fs::write(&p, yaml).unwrap();
            p.to_str().unwrap().to_string()
        })
        .collect();
    std::thread::scope(|s| {
        for pair in files.chunks(2) {
            let handles: Vec<_> = pair
                .iter()
                .map(|f| s.spawn(|| mesh.cli(&["apply", "-f", f])))
                .collect();
            for h in handles {
                let (code, _, err) = h.join().unwrap();
                assert_eq!(code, 0, "{err}");
            }
        }
    });
    let v = mesh.cli_json(&["get", "policies", "-o", "json"]);
    assert_eq!(v["items"].as_array().unwrap().len(), 20, "{v}");
    assert_eq!(v["revision"], 20);
    let (_, history, _) = mesh.cli(&["history", "--limit", "100"]);
    assert!(
        !history.contains(" deleted"),
        "an apply deleted another's policy:\n{history}"
    );
}
