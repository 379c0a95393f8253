//! Every protocol through a real sidecar pair, allowed and denied: HTTP/2 (h2c from the
//! client, h2 between the proxies), gRPC denials, HTTP upgrades, opaque TCP (including the
//! close of an open connection a new policy denies), permissive ports, and HTTP/2
//! rapid-reset protection.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually, id, log_has, orders_upstream};
use bulkhead_testkit::{Proc, http, run, websocket};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const POLICY: &str = include_str!("fixtures/protocols.yaml");

const TCP_RULE: &str = r#"    - name: frontend-tcp
      from: {identities: ["spiffe://test.local/ns/shop/sa/frontend"]}
      to: {ports: [9000]}
"#;

struct Shop {
    mesh: Mesh,
    _procs: Vec<Proc>,
    /// The frontend proxy's upstream listeners.
    http: SocketAddr,
    tcp: SocketAddr,
    /// The same TCP port, declared without `workload=`: found by its identity.
    tcp_by_identity: SocketAddr,
    /// The orders proxy's inbound (HTTP) listener and admin address.
    orders_in: SocketAddr,
    orders_admin: SocketAddr,
    frontend_admin: SocketAddr,
}

/// Orders' HTTP app (h1 + h2c) and TCP echo app, each behind an inbound proxy, and a
/// frontend proxy with an upstream to each.
fn shop() -> Shop {
    let mesh = Mesh::start();
    mesh.apply("policy.yaml", &format!("{POLICY}{TCP_RULE}"));
    let (http_app, http_app_addr) = mesh.app("orders");
    let (echo_app, echo_addr) = mesh.app_with("orders-echo", &["--tcp-echo"]);
    let (orders_proxy, orders) = mesh.inbound_proxy(
        "orders",
        &mesh.token(&id("orders")),
        http_app_addr,
        &["--permissive-port", "8080"],
    );
    let echo = echo_addr.to_string();
    let (tcp_proxy, orders_tcp) = mesh.proxy(
        "orders-tcp",
        &mesh.token(&id("orders")),
        // This one runs the multi-threaded runtime; the others the default single thread.
        &[
            "--inbound",
            "127.0.0.1:0",
            "--app",
            &echo,
            "--port",
            "9000",
            "--threads",
            "2",
        ],
    );
    let up_http = orders_upstream(addr(&orders["inbound"]));
    let up_tcp = format!(
        "name=orders-tcp,listen=127.0.0.1:0,address={},identity={},port=9000,workload=shop/orders",
        addr(&orders_tcp["inbound"]),
        id("orders")
    );
    let up_tcp_by_identity = format!(
        "name=orders-tcp-by-identity,listen=127.0.0.1:0,address={},identity={},port=9000",
        addr(&orders_tcp["inbound"]),
        id("orders")
    );
    let (frontend_proxy, frontend) = mesh.proxy(
        "frontend",
        &mesh.token(&id("frontend")),
        &[
            "--upstream",
            &up_http,
            "--upstream",
            &up_tcp,
            "--upstream",
            &up_tcp_by_identity,
        ],
    );
    Shop {
        http: addr(&frontend["upstreams"]["orders"]),
        tcp: addr(&frontend["upstreams"]["orders-tcp"]),
        tcp_by_identity: addr(&frontend["upstreams"]["orders-tcp-by-identity"]),
        orders_in: addr(&orders["inbound"]),
        orders_admin: addr(&orders["admin"]),
        frontend_admin: addr(&frontend["admin"]),
        mesh,
        _procs: vec![http_app, echo_app, orders_proxy, tcp_proxy, frontend_proxy],
    }
}

/// `curl` with the given flags; returns (exit code, stdout with headers).
fn curl(args: &[&str]) -> (i32, String) {
    let mut all = vec!["-sS", "-i", "--max-time", "10"];
    all.extend_from_slice(args);
    let (code, out, err) = run(std::path::Path::new("curl"), &all, &[]);
    (code, format!("{out}{err}"))
}

fn metrics(admin: SocketAddr) -> String {
    http(admin, "GET", "/metrics").body
}

#[test]
fn http2_grpc_upgrades_and_permissive_ports() {
    let shop = shop();
    let base = format!("http://{}", shop.http);

    // HTTP/2 with prior knowledge (h2c) from the client; the app sees HTTP/2 too.
    let (code, out) = curl(&["--http2-prior-knowledge", &format!("{base}/orders/7")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.contains(
            "orders: GET /orders/7 from spiffe://test.local/ns/shop/sa/frontend (HTTP/2.0)"
        ),
        "{out}"
    );
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        "-X",
        "DELETE",
        &format!("{base}/orders/7"),
    ]);
    assert!(out.starts_with("HTTP/2 403"), "{out}");
    assert!(
        out.contains("x-bulkhead-decision: deny; policy=default-deny"),
        "{out}"
    );

    // gRPC: allowed calls reach the app; a denied one is grpc-status 7 with the reason.
    let grpc = [
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "--data-binary",
        "",
    ];
    let (_, out) = curl(&[&grpc[..], &[&format!("{base}/shop.Orders/Get")]].concat());
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("orders: POST /shop.Orders/Get"), "{out}");
    assert!(!out.contains("grpc-status"), "{out}");
    let (_, out) = curl(&[&grpc[..], &[&format!("{base}/shop.Orders/Cancel")]].concat());
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("grpc-status: 7"), "{out}");
    assert!(
        out.contains("grpc-message: bulkhead: default deny: no policy allows this request"),
        "{out}"
    );
    assert!(out.contains("not path /shop.Orders/Cancel"), "{out}");
    assert!(out.contains("x-bulkhead-decision: deny"), "{out}");
    // Tap tells a denied call from an allowed one by its gRPC status, not the HTTP 200.
    let (events, _) = shop.mesh.tap(
        &[
            "shop/orders",
            "--path",
            "/shop.Orders",
            "-n",
            "2",
            "--for",
            "30s",
        ],
        || {
            for method in ["Get", "Cancel"] {
                curl(&[&grpc[..], &[&format!("{base}/shop.Orders/{method}")]].concat());
            }
        },
    );
    // The tap may open between the two calls of a round: sorted, not in order sent.
    let mut seen: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e["path"].as_str(),
                e["status"].as_u64(),
                e["grpcStatus"].as_u64(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (Some("/shop.Orders/Cancel"), Some(200), Some(7)),
            (Some("/shop.Orders/Get"), Some(200), None),
        ],
        "{events:?}"
    );

    // HTTP/1.1 still works on the same upstream port.
    let (_, out) = curl(&[&format!("{base}/orders")]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    // HTTP/1.1 requests from separate app connections share one mTLS connection between
    // the sidecars: five more app connections, no new connection at the orders sidecar.
    let inbound_conns = || {
        metrics(shop.orders_admin)
            .lines()
            .find(|l| l.starts_with("bulkhead_connections_total{direction=\"inbound\"}"))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .unwrap()
    };
    let before = inbound_conns();
    for i in 0..5 {
        let r = http(shop.http, "GET", &format!("/orders/{i}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.body.contains("(HTTP/1.1)"),
            "the app still sees HTTP/1.1: {}",
            r.body
        );
    }
    assert_eq!(inbound_conns(), before);
    let config: serde_json::Value =
        serde_json::from_str(&http(shop.frontend_admin, "GET", "/config").body).unwrap();
    assert_eq!(config["sharedUpstreamConnections"], 1, "{config}");

    // An upgrade (WebSocket-style): allowed on /ws, then bytes flow both ways.
    let (mut ws, head) = websocket(shop.http, "/ws", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.write_all(b"ping over the upgraded connection").unwrap();
    let mut buf = [0u8; 64];
    let n = ws.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping over the upgraded connection");
    // ...and denied elsewhere.
    let (_, head) = websocket(shop.http, "/admin", "");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // Permissive port: plaintext straight to the orders proxy is accepted, counted and
    // labelled; policy sees a caller without identity.
    let plain = http(shop.orders_in, "GET", "/health");
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert!(
        plain.body.contains("from outside the mesh"),
        "{}",
        plain.body
    );
    let plain = http(shop.orders_in, "GET", "/orders/1");
    assert_eq!(plain.status, 403, "{}", plain.body);
    let m = metrics(shop.orders_admin);
    assert!(
        m.contains("bulkhead_plaintext_connections_total{port=\"8080\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("source_namespace=\"unknown\",source_workload=\"unknown\",source_principal=\"plaintext\",destination_namespace=\"shop\",destination_workload=\"orders\",destination_principal=\"spiffe://test.local/ns/shop/sa/orders\",response_code=\"200\",response_flags=\"-\""),
        "{m}"
    );
}

#[test]
fn opaque_tcp_is_relayed_and_closed_when_policy_changes() {
    let shop = shop();
    let mut conn = TcpStream::connect(shop.tcp).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    for round in 0..3 {
        let msg = format!("opaque bytes, round {round}");
        conn.write_all(msg.as_bytes()).unwrap();
        let n = conn.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
    }

    // A new policy without the TCP rule closes the open connection, and says why.
    shop.mesh.apply("policy.yaml", POLICY);
    eventually(WAIT, "the open TCP connection to be closed", || {
        let _ = conn.write_all(b"still there?");
        matches!(conn.read(&mut buf), Ok(0) | Err(_))
    });
    assert!(log_has(
        &shop.mesh,
        "orders-tcp-proxy",
        "closing an open TCP connection: the new policy denies it"
    ));
    // New connections are refused too: closed without a byte.
    let mut conn = TcpStream::connect(shop.tcp).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = conn.write_all(b"hello");
    assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)));
}

/// An HTTP client through an explicit upstream to a port its Workload declares `tcp` gets
/// an opaque relay (its bytes reach the echo app and come back), not an HTTP error from a
/// sidecar that took them for HTTP; with or without `workload=` on the upstream (#13.7).
#[test]
fn http_bytes_to_a_tcp_port_are_relayed_opaquely() {
    let shop = shop();
    let request = "GET /orders/1 HTTP/1.1\r\nHost: orders\r\n\r\n";
    for upstream in [shop.tcp, shop.tcp_by_identity] {
        let mut conn = TcpStream::connect(upstream).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < request.len() {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            request,
            "through {upstream}: the echo app's answer, not a sidecar's"
        );
    }
}

#[test]
fn http2_rapid_reset_closes_that_connection_only() {
    let shop = shop();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(shop.http).await.unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let uri = format!("http://{}/orders/1", shop.http);
        // Open and at once cancel streams, far faster than they can be served.
        let mut sent = 0;
        for _ in 0..5000 {
            let req = http::Request::get(&uri).body(()).unwrap();
            let Ok(ready) = client.clone().ready().await else {
                break;
            };
            client = ready;
            match client.send_request(req, true) {
                Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
                Err(_) => break,
            }
            sent += 1;
        }
        // The client still holds the connection open: only the proxy can end it.
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        let err = match ended {
            Ok(Ok(Err(e))) => e,
            other => {
                panic!("the connection should end with an error after {sent} resets: {other:?}")
            }
        };
        // The proxy ends the connection: GOAWAY (ENHANCE_YOUR_CALM), or a closed socket if
        // the client was still writing when it went.
        assert!(
            err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
            "{err}"
        );
    });
    // The proxy is up and serves others.
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        &format!("http://{}/orders/2", shop.http),
    ]);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    // Counted, with its reason, where it happened.
    let page = metrics(shop.frontend_admin);
    let counted = page
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "bulkhead_refusals_total{direction=\"outbound\",reason=\"rapid_reset\"} ",
            )
        })
        .and_then(|v| v.parse::<f64>().ok());
    assert!(counted.is_some_and(|n| n >= 1.0), "{page}");
}
