//! What the policy says is what the sidecar enforces: one table of requests, each written
//! the awkward way an attacker or a sloppy client would write it (host with port,
//! traversal, `%61dmin`, `..;`, a lower-case method, repeated headers, an IPv4 caller seen by
//! an IPv6 listener), decided offline by `bulkhead policy test` and live through a real
//! sidecar pair, and both compared with the same expectations: the same verdict, the same
//! deciding rule, and for allowed requests the canonical path at the app.

use bulkhead_testkit::mesh::{Mesh, addr, id, orders_upstream};
use bulkhead_testkit::{HttpResponse, parse_response};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const POLICY: &str = include_str!("../fixtures/canonical.yaml");

/// How a request gets to the orders sidecar: through the frontend's sidecar (mTLS, the
/// frontend's identity), or in plaintext to orders' permissive port (no identity).
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Frontend,
    Plaintext,
}

struct Row {
    name: &'static str,
    via: Via,
    method: &'static str,
    target: &'static str,
    host: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// allow, deny or refuse.
    expect: &'static str,
    /// The deny rule (`policy/rule`) or allow rule expected to decide.
    decided_by: Option<(&'static str, &'static str)>,
    /// For allowed requests: the path the app must receive.
    app_path: Option<&'static str>,
}

const PROD: &[(&str, &str)] = &[("x-env", "prod")];

fn rows() -> Vec<Row> {
    let row = |name, via, method, target, host, headers, expect| Row {
        name,
        via,
        method,
        target,
        host,
        headers,
        expect,
        decided_by: None,
        app_path: None,
    };
    let allow = |r: Row, rule, path| Row {
        decided_by: Some(("shop/orders-allow", rule)),
        app_path: Some(path),
        ..r
    };
    let denied_by = |r: Row, rule| Row {
        decided_by: Some(("shop/orders-deny", rule)),
        ..r
    };
    use Via::{Frontend as F, Plaintext as P};
    let host = "orders.shop";
    vec![
        allow(
            row(
                "host with a port",
                F,
                "GET",
                "/orders/1",
                "Orders.Shop:8080",
                PROD,
                "allow",
            ),
            "frontend-reads",
            "/orders/1",
        ),
        allow(
            row(
                "host with a trailing dot",
                F,
                "GET",
                "/orders/2",
                "orders.shop.",
                PROD,
                "allow",
            ),
            "frontend-reads",
            "/orders/2",
        ),
        allow(
            row(
                "escaped unreserved characters",
                F,
                "GET",
                "/%6Frders/%7E1",
                host,
                PROD,
                "allow",
            ),
            "frontend-reads",
            "/orders/~1",
        ),
        denied_by(
            row("%61dmin", F, "GET", "/%61dmin/users", host, PROD, "deny"),
            "admin",
        ),
        row(
            "traversal",
            F,
            "GET",
            "/orders/../admin/users",
            host,
            PROD,
            "refuse",
        ),
        row(
            "encoded traversal",
            F,
            "GET",
            "/orders/%2e%2e/admin/users",
            host,
            PROD,
            "refuse",
        ),
        row(
            "path parameter",
            F,
            "GET",
            "/orders/..;/admin/users",
            host,
            PROD,
            "refuse",
        ),
        row(
            "encoded slash",
            F,
            "GET",
            "/orders%2Fadmin",
            host,
            PROD,
            "refuse",
        ),
        row(
            "lower-case method",
            F,
            "delete",
            "/orders/1",
            host,
            PROD,
            "refuse",
        ),
        denied_by(
            row(
                "upper-case method",
                F,
                "DELETE",
                "/orders/1",
                host,
                PROD,
                "deny",
            ),
            "deletes",
        ),
        row(
            "an allow needs every value of a repeated header",
            F,
            "GET",
            "/orders/3",
            host,
            &[("x-env", "prod"), ("x-env", "dev")],
            "deny",
        ),
        denied_by(
            row(
                "a deny takes any value of a repeated header",
                F,
                "GET",
                "/orders/3",
                host,
                &[("x-env", "prod"), ("x-debug", "off"), ("x-debug", "on")],
                "deny",
            ),
            "debug",
        ),
        denied_by(
            row(
                "IPv4 caller on an IPv6 listener",
                F,
                "GET",
                "/local/x",
                host,
                PROD,
                "deny",
            ),
            "loopback-local",
        ),
        allow(
            row(
                "unauthenticated, allowed",
                P,
                "GET",
                "/health",
                host,
                &[],
                "allow",
            ),
            "anyone-health",
            "/health",
        ),
        row(
            "unauthenticated, no rule for it",
            P,
            "GET",
            "/orders/1",
            host,
            PROD,
            "deny",
        ),
        row(
            "unauthenticated, dot segment",
            P,
            "GET",
            "/x/./health",
            host,
            &[],
            "refuse",
        ),
        row(
            "unauthenticated, lower-case method",
            P,
            "get",
            "/health",
            host,
            &[],
            "refuse",
        ),
    ]
}

/// The table as a `policy test` cases file. The live caller's address is what the orders
/// sidecar sees on its dual-stack listener: the IPv4-mapped loopback.
fn cases_yaml(rows: &[Row]) -> String {
    let mut out = String::from("cases:\n");
    for r in rows {
        out.push_str(&format!("  - name: {:?}\n", r.name));
        match r.via {
            Via::Frontend => out.push_str(&format!("    from: {}\n", id("frontend"))),
            Via::Plaintext => out.push_str("    caller: unauthenticated\n"),
        }
        out.push_str(&format!(
            "    to: shop/orders:8080\n    ip: \"::ffff:127.0.0.1\"\n    method: {:?}\n    path: {:?}\n    host: {:?}\n    expect: {}\n",
            r.method, r.target, r.host, r.expect
        ));
        let mut headers: Vec<(&str, Vec<&str>)> = Vec::new();
        for (k, v) in r.headers {
            match headers.iter_mut().find(|(name, _)| name == k) {
                Some((_, values)) => values.push(v),
                None => headers.push((k, vec![v])),
            }
        }
        if !headers.is_empty() {
            out.push_str("    headers:\n");
            for (k, values) in headers {
                out.push_str(&format!("      {k}: {values:?}\n"));
            }
        }
        if let Some((policy, rule)) = r.decided_by {
            out.push_str(&format!("    policy: {policy}\n    rule: {rule}\n"));
        }
    }
    out
}

/// One raw HTTP/1.1 request, written exactly as given; `None` if the connection closed
/// without an answer.
fn send(to: SocketAddr, r: &Row) -> Option<HttpResponse> {
    let mut tcp = TcpStream::connect(to).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("{} {} HTTP/1.1\r\nHost: {}\r\n", r.method, r.target, r.host);
    for (k, v) in r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    tcp.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    match raw.is_empty() {
        true => None,
        false => Some(parse_response(&raw).unwrap_or_else(|| {
            panic!(
                "{}: not an HTTP answer: {:?}",
                r.name,
                String::from_utf8_lossy(&raw)
            )
        })),
    }
}

#[test]
fn offline_and_live_verdicts_agree() {
    let mesh = Mesh::start();
    mesh.apply("policy.yaml", POLICY);
    let table = rows();

    // Offline: the same table through `policy test`, every case as expected.
    let policy = mesh.dir.path().join("offline.yaml");
    let cases = mesh.dir.path().join("cases.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    std::fs::write(&cases, cases_yaml(&table)).unwrap();
    let (code, out, err) = mesh.cli(&[
        "policy",
        "test",
        policy.to_str().unwrap(),
        "--cases",
        cases.to_str().unwrap(),
    ]);
    assert_eq!(
        code, 0,
        "offline verdicts differ from the table:\n{out}{err}"
    );
    assert!(
        out.ends_with(&format!("\n{} passed, 0 failed\n", table.len())),
        "{out}"
    );
    assert!(
        out.contains("ok      \"path parameter\" (refused: the path holds a ';'")
            || out.contains("ok      path parameter (refused: the path holds a ';'"),
        "{out}"
    );

    // Live: orders' sidecar listens dual-stack, so the frontend's sidecar, dialling
    // 127.0.0.1, arrives as ::ffff:127.0.0.1; 8080 also accepts plaintext.
    let (_app, app_addr) = mesh.app("orders");
    let app = app_addr.to_string();
    let (_orders_proxy, orders) = mesh.proxy(
        "orders",
        &mesh.token(&id("orders")),
        &[
            "--inbound",
            "[::]:0",
            "--app",
            &app,
            "--port",
            "8080",
            "--permissive-port",
            "8080",
        ],
    );
    let orders_in = SocketAddr::from(([127, 0, 0, 1], addr(&orders["inbound"]).port()));
    let upstream = orders_upstream(orders_in);
    let (_frontend_proxy, frontend) = mesh.proxy(
        "frontend",
        &mesh.token(&id("frontend")),
        &["--upstream", &upstream],
    );
    let to_orders = addr(&frontend["upstreams"]["orders"]);

    let mut wrong = Vec::new();
    for r in &table {
        let to = match r.via {
            Via::Frontend => to_orders,
            Via::Plaintext => orders_in,
        };
        // A method that is not an upper-case token is not even taken for HTTP/1.1 by the
        // sidecar's protocol detection: the connection is refused (closed), so the request
        // reaches neither policy nor the app. Over HTTP/2 it gets 400 (below).
        let Some(resp) = send(to, r) else {
            if r.expect != "refuse" || r.method.bytes().all(|b| !b.is_ascii_lowercase()) {
                wrong.push(format!(
                    "{}: the connection closed without an answer",
                    r.name
                ));
            }
            continue;
        };
        let got = match resp.status {
            200 => "allow",
            403 => "deny",
            400 => "refuse",
            other => panic!("{}: status {other}: {resp:?}", r.name),
        };
        let decision = resp.header("x-bulkhead-decision").unwrap_or_default();
        let named = match r.decided_by {
            Some((policy, rule)) => decision.contains(&format!("policy={policy}; rule={rule};")),
            None if got == "deny" => decision.starts_with("deny; policy=default-deny;"),
            None => true,
        };
        let at_app = match (got, r.app_path) {
            ("allow", Some(path)) => resp.body.starts_with(&format!("orders: GET {path} from ")),
            _ => true,
        };
        if got != r.expect || !named || !at_app {
            wrong.push(format!(
                "{}: expected {} ({:?}), got {} {}: {decision} {}",
                r.name, r.expect, r.decided_by, resp.status, got, resp.body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "live verdicts differ from the table:\n{}",
        wrong.join("\n")
    );

    // Over HTTP/2 the method arrives framed, so it reaches the canonical request, which
    // refuses it with 400 before any policy, on the sending side already; so is a path
    // parameter in an HTTP/2 `:path`, and an escaped letter reaches the app decoded.
    let h2 = |method: &str, path: &str| {
        let (code, out, err) = bulkhead_testkit::run(
            std::path::Path::new("curl"),
            &[
                "-sS",
                "-i",
                "--max-time",
                "10",
                "--http2-prior-knowledge",
                "--path-as-is",
                "-X",
                method,
                "-H",
                "x-env: prod",
                "-H",
                "host: orders.shop",
                &format!("http://{to_orders}{path}"),
            ],
            &[],
        );
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let out = h2("delete", "/orders/1");
    assert!(out.starts_with("HTTP/2 400"), "{out}");
    assert!(
        out.ends_with("bulkhead: the method must be an HTTP token in upper case (methods are case-sensitive: `delete` is not DELETE)\n"),
        "{out}"
    );
    let out = h2("GET", "/orders/..;/admin/users");
    assert!(out.starts_with("HTTP/2 400"), "{out}");
    assert!(
        out.ends_with("bulkhead: the path holds a ';' (path parameters: some servers strip them and resolve /a/..;/b to /b)\n"),
        "{out}"
    );
    let out = h2("GET", "/%6Frders/%7E9");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("orders: GET /orders/~9 from "), "{out}");
}
