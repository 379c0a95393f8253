//! Attacks on the request path, end to end with the real binaries (no root needed): h2c
//! upgrade smuggling, tunnels that outlive their policy, spoofed client-certificate headers,
//! stuck uploads that would starve a destination, idle connections that would become
//! handshakes at the peer, opaque TCP through an explicit upstream, and the refusals an
//! operator must be able to count.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually, id};
use bulkhead_testkit::{KeepAlive, Proc, content_length, http, websocket};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const ORDERS: &str = r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: orders, namespace: shop}
spec:
  identity: spiffe://test.local/ns/shop/sa/orders
  ports: [{port: 8080, protocol: http}, {port: 9000, protocol: tcp}]
  # Where it would be in the mesh; the explicit upstreams learn its ports from this.
  addresses: ["192.0.2.11"]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-allow, namespace: shop}
spec:
  selector: {workload: orders}
  action: allow
  rules:
    - name: frontend-reads
      from: {identities: ["spiffe://test.local/ns/shop/sa/frontend"]}
      to: {ports: [8080], methods: [GET], paths: ["/orders/*"]}
    - name: frontend-uploads
      from: {identities: ["spiffe://test.local/ns/shop/sa/frontend"]}
      to: {ports: [8080], methods: [POST], paths: ["/upload"]}
    - name: anyone-reads-orders
      to: {ports: [8080], methods: [GET], paths: ["/orders/*"]}
    - name: frontend-tcp
      from: {identities: ["spiffe://test.local/ns/shop/sa/frontend"]}
      to: {ports: [9000]}
"#;

/// A policy of its own for WebSockets, so that deleting it takes only them away.
const WS: &str = r#"apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-allow-ws, namespace: shop}
spec:
  selector: {workload: orders}
  action: allow
  rules:
    - name: frontend-websocket
      from: {identities: ["spiffe://test.local/ns/shop/sa/frontend"]}
      to: {ports: [8080], methods: [GET], paths: ["/ws"]}
"#;

/// The value of one metric series (`name{labels}`) on an admin port, 0 if absent.
fn metric(admin: SocketAddr, series: &str) -> u64 {
    let text = http(admin, "GET", "/metrics").body;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

fn refusals(admin: SocketAddr, direction: &str, reason: &str) -> u64 {
    metric(
        admin,
        &format!("bulkhead_refusals_total{{direction=\"{direction}\",reason=\"{reason}\"}}"),
    )
}

/// Reads until the peer closes (or 10 s pass).
fn read_all(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects to `to`, sends `request` and returns everything read until the connection ends.
fn exchange(to: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(to).unwrap();
    s.write_all(request).unwrap();
    read_all(&mut s)
}

/// A mesh with the orders app behind its sidecar (which also takes plaintext on 8080) and a
/// frontend sidecar with an upstream to it.
struct Pair {
    mesh: Mesh,
    procs: Vec<Proc>,
    /// The frontend's upstream listener for orders.
    to_orders: SocketAddr,
    /// The orders sidecar's inbound listener (plaintext accepted: permissive port).
    orders_in: SocketAddr,
    orders_app: SocketAddr,
    orders_admin: SocketAddr,
    frontend_admin: SocketAddr,
}

impl Pair {
    fn start(orders_extra: &[&str], frontend_extra: &[&str]) -> Pair {
        let mesh = Mesh::start();
        mesh.apply("policy.yaml", &format!("{ORDERS}---\n{WS}"));
        let (app, orders_app) = mesh.app("orders");
        let mut args = vec!["--permissive-port", "8080"];
        args.extend_from_slice(orders_extra);
        let (orders_proxy, orders) =
            mesh.inbound_proxy("orders", &mesh.token(&id("orders")), orders_app, &args);
        let orders_in = addr(&orders["inbound"]);
        let upstream = format!(
            "name=orders,listen=127.0.0.1:0,address={orders_in},identity={},port=8080",
            id("orders")
        );
        let mut args = vec!["--upstream", upstream.as_str()];
        args.extend_from_slice(frontend_extra);
        let (frontend_proxy, frontend) =
            mesh.proxy("frontend", &mesh.token(&id("frontend")), &args);
        Pair {
            to_orders: addr(&frontend["upstreams"]["orders"]),
            orders_in,
            orders_app,
            orders_admin: addr(&orders["admin"]),
            frontend_admin: addr(&frontend["admin"]),
            procs: vec![app, orders_proxy, frontend_proxy],
            mesh,
        }
    }
}

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// `n` GETs through `to`, one connection each; all must be 200. Their latencies.
fn timed_gets(to: SocketAddr, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let started = Instant::now();
            let r = http(to, "GET", &format!("/orders/{i}"));
            assert_eq!(r.status, 200, "{r:?}");
            started.elapsed()
        })
        .collect()
}

/// Issue #14.3: 300 POSTs that declare a 1 GB body and never send it used to hold the
/// streams of the one shared connection between the sidecars, and 61 % of normal requests
/// timed out. Now a full connection spills over to another, and the stuck uploads are cut
/// at their deadline with a counted reason.
#[test]
fn stuck_uploads_leave_other_requests_unaffected() {
    // Long enough that the loaded run below ends before the cut even while the other tests of
    // this binary load the machine (4 s was not, on a busy CI machine).
    const STALL: u64 = 6;
    let stall = STALL.to_string();
    let deadline = ["--body-idle-timeout-secs", stall.as_str()];
    let pair = Pair::start(&deadline, &deadline);
    timed_gets(pair.to_orders, 5); // warm up: the shared connection is open
    let unloaded_all = timed_gets(pair.to_orders, 60);
    let unloaded = p50(unloaded_all.clone());

    let stuck_at = Instant::now();
    let mut stuck: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(pair.to_orders).unwrap();
            s.write_all(
                b"POST /upload HTTP/1.1\r\nHost: orders\r\nContent-Length: 1000000000\r\n\r\n",
            )
            .unwrap();
            s
        })
        .collect();
    // All 300 reached the app and hold their streams: more than one shared connection's
    // worth (256), so the frontend had to open a second.
    eventually(
        WAIT,
        "the stuck uploads to hold two shared connections",
        || {
            let config: serde_json::Value =
                serde_json::from_str(&http(pair.frontend_admin, "GET", "/config").body).unwrap();
            config["sharedUpstreamConnections"].as_u64() >= Some(2)
        },
    );
    let loaded = timed_gets(pair.to_orders, 60);
    assert!(
        stuck_at.elapsed() < Duration::from_secs(STALL),
        "the loaded run must end before the stuck uploads are cut ({:?}); the machine is too slow for this test",
        stuck_at.elapsed()
    );
    let p99 = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() * 99 / 100 - 1]
    };
    // The figures BENCHMARKS.md quotes (`cargo test --test bypass stuck -- --nocapture`).
    eprintln!(
        "normal GETs, 60 each: p50 {:?} → {:?}, p99 {:?} → {:?} with 300 stuck uploads",
        unloaded,
        p50(loaded.clone()),
        p99(unloaded_all.clone()),
        p99(loaded.clone())
    );
    let loaded = p50(loaded);
    assert!(
        loaded <= unloaded * 4 + Duration::from_millis(10),
        "p50 with 300 stuck uploads {loaded:?}, without {unloaded:?}"
    );

    // Each stuck upload is cut at its deadline: 408, said by the sidecar, counted.
    for s in &mut stuck {
        let answer = read_all(s);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains(&format!(
                "the request body stalled for more than {STALL} s (--body-idle-timeout-secs)"
            )),
            "{answer}"
        );
    }
    let waited = stuck_at.elapsed();
    assert!(
        waited >= Duration::from_secs(STALL) && waited < Duration::from_secs(STALL + 8),
        "cut after {waited:?}"
    );
    assert_eq!(
        refusals(pair.frontend_admin, "outbound", "body_idle_timeout"),
        300
    );
    // Their streams were freed: normal requests still flow, and the orders sidecar did not
    // count the frontend's resets as bad bodies.
    timed_gets(pair.to_orders, 5);
    assert_eq!(
        refusals(pair.orders_admin, "inbound", "bad_request_body"),
        0
    );
    drop(pair.procs);
}

/// Issue #14.8: idle connections, and ones that never speak HTTP, to an upstream port
/// declared for HTTP are refused by the frontend's own sidecar: no connection, so no mTLS
/// handshake, reaches the orders sidecar, and each is counted as `not_http`.
#[test]
fn idle_connections_to_an_http_port_cause_no_handshakes_at_the_peer() {
    let pair = Pair::start(&[], &["--detect-timeout-ms", "300"]);
    timed_gets(pair.to_orders, 3); // the shared connection is open
    let accepted = || {
        metric(
            pair.orders_admin,
            "bulkhead_connections_total{direction=\"inbound\"}",
        )
    };
    let before = accepted();
    assert!(before >= 1, "the warm-up connection is counted");
    // The issue's figure: 5,000 idle connections (each one a file descriptor here and, until
    // its detection timeout, in the frontend's sidecar).
    let mut refused: Vec<TcpStream> = (0..5_000)
        .map(|_| TcpStream::connect(pair.to_orders).unwrap())
        .collect();
    let mut ssh = TcpStream::connect(pair.to_orders).unwrap();
    ssh.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
    refused.push(ssh);
    // Each is closed by the frontend's sidecar without a byte (idle ones after the
    // detection timeout).
    for s in &mut refused {
        let answer = read_all(s);
        assert!(answer.is_empty(), "{answer}");
    }
    assert_eq!(refusals(pair.frontend_admin, "outbound", "not_http"), 5_001);
    assert_eq!(accepted(), before, "no refused connection reached the peer");
    // HTTP still flows through the same upstream.
    timed_gets(pair.to_orders, 3);
    drop(pair.procs);
}

/// Issue #14.9: the limits on request heads and bodies, at the level an operator sees them:
/// the status code and the refusal counter.
#[test]
fn head_and_body_limits_are_enforced_and_counted() {
    let pair = Pair::start(
        &[],
        &[
            "--header-read-timeout-secs",
            "1",
            "--keepalive-timeout-secs",
            "3",
        ],
    );
    let fe = pair.frontend_admin;

    // An idle keep-alive connection outlives the header-read timeout (1 s) ...
    let mut conn = KeepAlive::connect(pair.to_orders).unwrap();
    assert_eq!(conn.request("GET", "/orders/1").unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(1800));
    assert_eq!(conn.request("GET", "/orders/2").unwrap().status, 200);
    // ... until the keep-alive timeout (3 s); that is not a refusal.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(conn.request("GET", "/orders/3").is_err());
    assert_eq!(refusals(fe, "outbound", "header_timeout"), 0);

    // A head that starts and stalls (slowloris) is cut 1 s after its first byte, counted.
    let mut slow = TcpStream::connect(pair.to_orders).unwrap();
    slow.write_all(b"GET /orders/1 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let started = Instant::now();
    let rest = read_all(&mut slow);
    assert!(!rest.contains(" 200 "), "{rest}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "cut after {waited:?}"
    );
    assert_eq!(refusals(fe, "outbound", "header_timeout"), 1);

    // Heads of 70 to 100 KiB are over the 64 KiB limit however they arrive: 431 from the
    // client's own sidecar, counted there.
    for kib in [70, 80, 100] {
        let head = format!(
            "GET /orders/1 HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "x".repeat(kib * 1024)
        );
        let mut tries = Vec::new();
        // The proxy answers as soon as it has read past the limit and closes, so the rest
        // of our write may meet a reset that eats the answer: try a few times.
        for _ in 0..5 {
            let mut s = TcpStream::connect(pair.to_orders).unwrap();
            let _ = s.write_all(head.as_bytes());
            let answer = read_all(&mut s);
            if answer.starts_with("HTTP/1.1 431") {
                tries.clear();
                break;
            }
            tries.push(answer);
        }
        assert!(
            tries.is_empty(),
            "{kib} KiB head: no 431 in five tries: {tries:?}"
        );
    }
    assert!(refusals(fe, "outbound", "header_too_large") >= 3);
    assert_eq!(
        refusals(pair.orders_admin, "inbound", "header_too_large"),
        0
    );

    // A malformed chunked body is the client's fault: 400 from its sidecar, not a 502 that
    // would blame the upstream.
    let answer = exchange(
        pair.to_orders,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-a-size\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("the request body is malformed"), "{answer}");
    assert_eq!(refusals(fe, "outbound", "bad_request_body"), 1);

    // An ambiguous path: 400, counted.
    let r = http(pair.to_orders, "GET", "/orders/../admin");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(refusals(fe, "outbound", "bad_path"), 1);

    // A proper upload still works, and no refusal was logged more than once per burst.
    let answer = exchange(
        pair.to_orders,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let log = pair.procs[2].log_text();
    let lines = log
        .lines()
        .filter(|l| {
            l.contains("reason=\"header_too_large\"") || l.contains("reason=header_too_large")
        })
        .count();
    assert_eq!(lines, 1, "{log}");
}

/// An allowed request that asks to switch to HTTP/2 cleartext, as the attacker of issue #22
/// sent it (hypercorn-style servers answer 101 to it).
const SMUGGLE: &str = "GET /orders/1 HTTP/1.1\r\nHost: orders\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nx-echo-headers: 1\r\n\r\n";

/// What the smuggling attempt got: the answer to the allowed request (head and body), and
/// what `GET /admin`, sent as HTTP/2 on the same connection afterwards, got: its status and
/// body, or why it was not served.
struct Smuggled {
    head: String,
    body: String,
    admin: Result<(u16, String), String>,
}

fn smuggle(to: SocketAddr) -> Smuggled {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(to).await.unwrap();
        tcp.write_all(SMUGGLE.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match tcp.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut body = String::new();
        if !head.starts_with("HTTP/1.1 101") {
            let len = content_length(&head).unwrap_or(0);
            let mut buf = vec![0u8; len];
            tcp.read_exact(&mut buf).await.unwrap();
            body = String::from_utf8_lossy(&buf).into_owned();
        }
        // Whatever the answer, speak HTTP/2 on the connection now, as the attacker did.
        let admin = async {
            let (client, conn) = h2::client::handshake(tcp)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut client = client.ready().await.map_err(|e| e.to_string())?;
            let req = http::Request::get("http://orders/admin").body(()).unwrap();
            let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
            let resp = resp.await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut text = Vec::new();
            while let Some(chunk) = body.data().await {
                text.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
            }
            Ok((status, String::from_utf8_lossy(&text).into_owned()))
        };
        let admin = tokio::time::timeout(Duration::from_secs(10), admin)
            .await
            .unwrap_or_else(|_| Err("no answer within 10 s".into()));
        Smuggled { head, body, admin }
    })
}

fn echoes(ws: &mut TcpStream, msg: &str) -> bool {
    if ws.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    ws.read_exact(&mut buf).is_ok() && buf == msg.as_bytes()
}

/// Issue #22.1 and #22.5: an allowed request carrying `Upgrade: h2c` used to reach the app,
/// which answered 101, and `GET /admin` sent as HTTP/2 inside got 200. Now neither sidecar
/// forwards an h2c upgrade (the request is served as plain HTTP/1.1, counted), a 101 for
/// anything but what was forwarded is refused, WebSockets still work, and a caller's
/// `x-forwarded-client-cert` never reaches the app.
#[test]
fn h2c_smuggling_is_refused_while_websockets_work() {
    let pair = Pair::start(&[], &[]);

    // The app really does switch to HTTP/2 when asked directly: the attack is real.
    let direct = smuggle(pair.orders_app);
    assert!(direct.head.starts_with("HTTP/1.1 101"), "{}", direct.head);
    let (status, body) = direct.admin.expect("the app serves HTTP/2 after its 101");
    assert_eq!(status, 200);
    assert!(body.contains("orders: GET /admin"), "{body}");

    // A WebSocket through the pair, open through everything that follows.
    let (mut ws, head) = websocket(pair.to_orders, "/ws", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(echoes(&mut ws, "ping before"));

    // Through the frontend's sidecar: served as plain HTTP/1.1; the app never saw the
    // upgrade, and HTTP/2 afterwards on the connection reaches nothing.
    let through = smuggle(pair.to_orders);
    assert!(through.head.starts_with("HTTP/1.1 200"), "{}", through.head);
    assert!(
        through.body.starts_with(&format!(
            "orders: GET /orders/1 from {} (HTTP/1.1)",
            id("frontend")
        )),
        "{}",
        through.body
    );
    for gone in ["upgrade", "http2-settings"] {
        assert!(
            !through
                .body
                .to_ascii_lowercase()
                .contains(&format!("\n  {gone}:")),
            "the app saw {gone}: {}",
            through.body
        );
    }
    assert!(through.admin.is_err(), "GET /admin got {:?}", through.admin);
    // Straight at the orders sidecar (plaintext on its permissive port): the same.
    let inbound = smuggle(pair.orders_in);
    assert!(inbound.head.starts_with("HTTP/1.1 200"), "{}", inbound.head);
    assert!(inbound.admin.is_err(), "GET /admin got {:?}", inbound.admin);
    // The app's own log: it upgraded once, when asked directly.
    let app_log = pair.procs[0].log_text();
    assert_eq!(app_log.matches("upgraded to h2c").count(), 1, "{app_log}");
    assert_eq!(
        refusals(pair.frontend_admin, "outbound", "upgrade_refused"),
        1
    );
    assert_eq!(refusals(pair.orders_admin, "inbound", "upgrade_refused"), 1);

    // An app that answers 101 for another protocol than the one asked: not joined, 502,
    // the caller's connection closed, counted where it happened.
    let (mut odd, head) = websocket(pair.to_orders, "/ws", "x-sample-upgrade-as: h2c\r\n");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let rest = read_all(&mut odd);
    assert!(
        rest.contains("answered 101 Switching Protocols to \"h2c\" when asked for \"websocket\""),
        "{rest}"
    );
    assert_eq!(
        refusals(pair.orders_admin, "inbound", "upgrade_mismatch"),
        1
    );

    // The mesh owns x-forwarded-client-cert: a caller's copy is dropped on both sides, and
    // the receiving sidecar states the verified caller.
    let answer = exchange(
        pair.to_orders,
        b"GET /orders/1 HTTP/1.1\r\nHost: orders\r\nConnection: close\r\nx-echo-headers: 1\r\nX-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://test.local/ns/shop/sa/admin\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.contains("evil") && !answer.contains("sa/admin"),
        "{answer}"
    );
    assert!(
        answer.contains(&format!(
            "\n  x-forwarded-client-cert: By={};URI={}",
            id("orders"),
            id("frontend")
        )),
        "{answer}"
    );
    // Plaintext (no verified caller): none at all.
    let answer = exchange(
        pair.orders_in,
        b"GET /orders/1 HTTP/1.1\r\nHost: orders\r\nConnection: close\r\nx-echo-headers: 1\r\nx-forwarded-client-cert: URI=spiffe://test.local/ns/shop/sa/frontend\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("x-forwarded-client-cert"), "{answer}");

    // The WebSocket opened first still works.
    assert!(echoes(&mut ws, "ping after"));
}

/// Issue #22.1: a tunnel used to outlive the policy that allowed it. Now an upgraded
/// connection is judged again, with the request that opened it, on every policy change.
#[test]
fn a_websocket_is_closed_when_its_policy_is_deleted() {
    let pair = Pair::start(&[], &[]);
    let (mut ws, head) = websocket(pair.to_orders, "/ws", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(echoes(&mut ws, "still allowed"));
    // An unrelated change keeps it open.
    pair.mesh
        .apply("policy.yaml", &format!("{ORDERS}---\n{WS}"));
    let (code, _, err) = pair
        .mesh
        .cli(&["delete", "AuthorizationPolicy/shop/orders-allow-ws"]);
    assert_eq!(code, 0, "{err}");
    eventually(WAIT, "the WebSocket to be closed", || {
        ws.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = ws.write_all(b"x");
        let mut buf = [0u8; 8];
        match ws.read(&mut buf) {
            Ok(0) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            Ok(_) => false,
        }
    });
    let log = pair.procs[1].log_text();
    assert!(
        log.contains(
            "closing an upgraded connection: the new policy denies the request that opened it"
        ),
        "{log}"
    );
    assert!(
        log.contains("http.path=\"/ws\"") || log.contains("http.path=/ws"),
        "{log}"
    );
    assert_eq!(refusals(pair.orders_admin, "inbound", "policy_changed"), 1);
    // A new one is denied outright.
    let (_, head) = websocket(pair.to_orders, "/ws", "");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}
