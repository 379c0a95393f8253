//! Transparent capture end to end, as root: network namespaces on a bridge (control plane,
//! client, server, …). `bulkhead-proxy init` installs the capture rules in the workloads'
//! namespaces; an unmodified `curl` (not root, so its traffic is captured) reaches the
//! server's app by its address. The request is intercepted on both ends, crosses the bridge
//! only inside mTLS (a capture on the bridge never sees it), is authorized, and is denied
//! when the policy says so.
//!
//! [`transparent_capture_leaves_no_way_around_the_sidecar`] then plays the compromised app:
//! IPv6, UDP, listeners bound to loopback, undeclared ports, the sidecar's admin port and a
//! port scan, each of which used to go around the mesh.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::mesh::{eventually, orders_policy_at, yaml_addresses};
use bulkhead_testkit::netns::{Lab, can_run, contains};
use bulkhead_testkit::{Bins, Proc, TempDir, parse_response};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const CONTROL_PORT: u16 = 7443;
/// The client runs as this uid: the proxies run as root (uid 0), which the rules exclude.
const APP_UID: &str = "65534";

struct Net {
    lab: Lab,
    bins: Bins,
    dir: TempDir,
    procs: Vec<Proc>,
}

impl Net {
    /// A lab of network namespaces named `hosts` on one bridge, nothing started yet.
    fn new(hosts: &[&str]) -> Net {
        Net {
            lab: Lab::new(hosts),
            bins: Bins::of_test(),
            dir: TempDir::new().unwrap(),
            procs: Vec::new(),
        }
    }

    fn cmd(&self, host: &str, program: &Path, args: &[&str]) -> Command {
        let mut c = self.lab.command(host, program);
        c.args(args);
        c.env("BULKHEAD_CONTEXT", self.dir.path().join("data/admin.yaml"));
        c
    }

    /// Runs to completion; panics with its output unless it succeeds. Returns stdout.
    fn ok(&self, host: &str, program: &Path, args: &[&str]) -> String {
        let out = self.cmd(host, program, args).output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?} in {host} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self, host: &str, name: &str, program: &Path, args: &[&str]) -> usize {
        let cmd = self.cmd(host, program, args);
        self.procs
            .push(Proc::from_command(name, self.dir.path(), cmd));
        self.procs.len() - 1
    }

    /// [`Net::spawn`] with `--ready-file` `name.json` added; returns once the file is written.
    fn spawn_ready(&mut self, host: &str, name: &str, program: &Path, args: &[&str]) {
        let ready = self.dir.path().join(format!("{name}.json"));
        let mut args = args.to_vec();
        args.extend(["--ready-file", ready.to_str().unwrap()]);
        let i = self.spawn(host, name, program, &args);
        self.procs[i].wait_for_file(&ready, WAIT);
    }

    /// Starts a transparent sidecar for `sa` in `host` after installing the capture rules,
    /// with IPv4-only listeners (the admin port on loopback).
    fn sidecar(&mut self, host: &str, sa: &str) {
        self.sidecar_on(
            host,
            sa,
            ["0.0.0.0:15006", "127.0.0.1:15001", "127.0.0.1:15000"],
        );
    }

    /// The same with the given inbound, outbound and admin listeners.
    fn sidecar_on(&mut self, host: &str, sa: &str, [inbound, outbound, admin]: [&str; 3]) {
        let control = format!("{}:{CONTROL_PORT}", self.lab.ip("control"));
        let proxy = self.bins.proxy.clone();
        self.ok(
            host,
            &proxy,
            &["init", "--proxy-uid", "0", "--control", &control],
        );
        let token = self.ok(
            "control",
            &self.bins.bulkhead.clone(),
            &[
                "token",
                "create",
                "--identity",
                &format!("spiffe://test.local/ns/shop/sa/{sa}"),
            ],
        );
        let token_file = self.dir.path().join(format!("{sa}.token"));
        std::fs::write(&token_file, token.trim()).unwrap();
        let bundle = self.dir.path().join("data/ca.pem");
        let args = [
            "--control",
            &control,
            "--trust-bundle",
            bundle.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--inbound",
            inbound,
            "--transparent",
            "--outbound",
            outbound,
            "--admin",
            admin,
        ];
        self.spawn_ready(host, &format!("{sa}-proxy"), &proxy, &args);
    }

    /// `curl` in the client namespace as an ordinary user: returns the raw response.
    fn curl(&self, method: &str, url: &str) -> String {
        self.app(
            "client",
            "curl",
            &["-sS", "-i", "--max-time", "10", "-X", method, url],
        )
        .1
    }

    /// `program args…` in `host` as the app's uid: (exit code, stdout and stderr).
    fn app(&self, host: &str, program: &str, args: &[&str]) -> (i32, String) {
        let ids = [format!("--reuid={APP_UID}"), format!("--regid={APP_UID}")];
        let mut argv: Vec<&str> = vec![&ids[0], &ids[1], "--clear-groups", program];
        argv.extend(args);
        self.output(host, "setpriv", &argv)
    }

    /// `program args…` in `host` as root: (exit code, stdout and stderr).
    fn output(&self, host: &str, program: &str, args: &[&str]) -> (i32, String) {
        let out = self.cmd(host, Path::new(program), args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Starts the control plane in its namespace and applies `policy`.
    fn control(&mut self, policy: &str) {
        let data = self.dir.path().join("data");
        let listen = format!("{}:{CONTROL_PORT}", self.lab.ip("control"));
        let bulkhead = self.bins.bulkhead.clone();
        let c = self.spawn(
            "control",
            "control",
            &bulkhead,
            &[
                "control",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &listen,
                "--trust-domain",
                "test.local",
            ],
        );
        self.procs[c].wait_for_file(&data.join("admin.yaml"), WAIT);
        let file = self.dir.path().join("policy.yaml");
        std::fs::write(&file, policy).unwrap();
        self.ok(
            "control",
            &bulkhead,
            &["apply", "-f", file.to_str().unwrap()],
        );
    }

    /// Starts `bulkhead sample-app` in `host` on `listen`.
    fn sample_app(&mut self, host: &str, name: &str, listen: &str) {
        let bulkhead = self.bins.bulkhead.clone();
        let args = ["sample-app", "--name", name, "--listen", listen];
        self.spawn_ready(host, &format!("{host}-{name}-app"), &bulkhead, &args);
    }
}

/// A `Workload` of namespace shop, service account `name`, declared at `addresses` and no
/// ports (policy alone decides them).
fn workload_at(name: &str, addresses: &[IpAddr]) -> String {
    format!(
        "apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: shop}}
spec:
  identity: spiffe://test.local/ns/shop/sa/{name}
  addresses: {}
",
        yaml_addresses(addresses)
    )
}

#[test]
fn transparent_capture_encrypts_and_enforces_between_namespaces() {
    if !can_run(
        "transparent_capture_encrypts_and_enforces_between_namespaces",
        &["iptables", "iptables-restore", "tcpdump", "curl", "setpriv"],
    ) {
        return;
    }
    let mut net = Net::new(&["control", "client", "server"]);
    let (client_ip, server_ip) = (net.lab.ip("client"), net.lab.ip("server"));

    // The control plane, in its own namespace.
    let policy = format!(
        "{}---\n{}",
        orders_policy_at(&[server_ip.into()], "/orders/*"),
        workload_at("frontend", &[client_ip.into()]),
    );
    net.control(&policy);

    // The server: its app on 8080, unaware of the mesh; the sidecar in front, transparently.
    net.sample_app("server", "orders", "0.0.0.0:8080");
    net.sidecar("server", "orders");
    net.sidecar("client", "frontend");

    let capture = net.lab.capture();
    let marker = "plaintext-marker-5f1c9e";
    let url = format!("http://{server_ip}:8080/orders/{marker}");
    // Allowed: intercepted on both ends (the app names the caller the server's sidecar
    // verified, which only mTLS from the client's sidecar can give it).
    // Denied by the server's policy, with the reason.
    get_allowed_delete_denied(&net, &url, marker);
    let wire = capture.stop();
    // The capture saw the connections (the TLS ClientHello names our server name)...
    assert!(
        contains(&wire, b"bulkhead.mesh"),
        "the capture saw no mTLS handshake ({} bytes)",
        wire.len()
    );
    // ...and never the request itself.
    assert!(
        !contains(&wire, marker.as_bytes()),
        "the request crossed the bridge in plaintext"
    );
    assert!(
        !contains(&wire, b"GET /orders"),
        "the request crossed the bridge in plaintext"
    );
}

/// From the client's app, through both sidecars: a GET of `url` (orders' `/orders/{marker}`)
/// is answered by orders' app, which names the caller the server's sidecar verified (only
/// mTLS from the client's sidecar can give it that), and a DELETE of it is refused by orders'
/// default deny, with the reason.
fn get_allowed_delete_denied(net: &Net, url: &str, marker: &str) {
    let out = net.curl("GET", url);
    let resp = parse_response(out.as_bytes()).unwrap_or_else(|| panic!("no HTTP answer: {out}"));
    assert_eq!(resp.status, 200, "{url}: {out}");
    assert!(
        resp.body.contains(&format!(
            "orders: GET /orders/{marker} from spiffe://test.local/ns/shop/sa/frontend"
        )),
        "{out}"
    );
    let out = net.curl("DELETE", url);
    let resp = parse_response(out.as_bytes()).unwrap_or_else(|| panic!("no HTTP answer: {out}"));
    assert_eq!(resp.status, 403, "{url}: {out}");
    assert!(
        resp.header("x-bulkhead-decision")
            .unwrap_or_default()
            .starts_with("deny; policy=default-deny"),
        "{out}"
    );
}

/// What a TCP client in `host` (as the app's uid) sees at `to` when it sends a line and
/// reads until the connection ends: bash's /dev/tcp, then `cat`. A refused connection shows
/// "Connection reset by peer" at once (on the write or the read, whichever meets the reset);
/// one accepted and then closed shows only `cat=0`, a clean end.
fn tcp_probe(net: &Net, host: &str, to: SocketAddr) -> (String, Duration) {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} || exit 9; printf 'hello\\n' >&3; cat <&3; echo \"cat=$?\"",
        to.ip(),
        to.port()
    );
    let start = Instant::now();
    let (_, out) = net.app(host, "timeout", &["10", "bash", "-c", &script]);
    (out, start.elapsed())
}

/// Whether a UDP datagram from `host` (as the app's uid, or root) to `to` came back from the
/// echo server there within a second.
fn udp_echoed(net: &Net, host: &str, as_app: bool, to: SocketAddr) -> bool {
    let script = format!(
        "exec 3<>/dev/udp/{}/{} && printf probe >&3 && timeout 1 head -c 5 <&3",
        to.ip(),
        to.port()
    );
    let (code, out) = if as_app {
        net.app(host, "bash", &["-c", &script])
    } else {
        net.output(host, "bash", &["-c", &script])
    };
    code == 0 && out == "probe"
}

fn url(ip: IpAddr, port: u16, path: &str) -> String {
    format!("http://{}{path}", SocketAddr::new(ip, port))
}

/// The `/metrics` page of the sidecar admin port at `ip`, scraped from the namespace outside
/// the mesh (as root).
fn scrape_from_outside(net: &Net, ip: IpAddr) -> String {
    let (code, page) = net.output(
        "outside",
        "curl",
        &["-sS", "--max-time", "5", &url(ip, 15000, "/metrics")],
    );
    assert_eq!(code, 0, "{page}");
    page
}

/// The value of `metric` (name and labels, exactly as exposed) in a Prometheus text page.
fn metric(page: &str, metric: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn transparent_capture_leaves_no_way_around_the_sidecar() {
    if !can_run(
        "transparent_capture_leaves_no_way_around_the_sidecar",
        &[
            "iptables",
            "iptables-restore",
            "ip6tables-restore",
            "tcpdump",
            "curl",
            "setpriv",
            "bash",
            "timeout",
            "head",
        ],
    ) {
        return;
    }
    let mut net = Net::new(&["control", "client", "server", "payments", "outside"]);
    let lab = &net.lab;
    let (client4, client6) = (lab.ip("client"), lab.ip6("client"));
    let (server4, server6) = (lab.ip("server"), lab.ip6("server"));
    let (payments4, payments6) = (lab.ip("payments"), lab.ip6("payments"));
    let (outside4, outside6) = (lab.ip("outside"), lab.ip6("outside"));
    // orders declares its port; payments declares none, so policy alone decides its ports.
    // Both are allowed to frontend by rules without `ports:`. Egress to port 9000 of the
    // host outside the mesh is denied by address, IPv4 and IPv6 alike.
    let policy = format!(
        r#"{}---
{}---
{}---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: payments-allow-frontend, namespace: shop}}
spec:
  selector: {{workload: payments}}
  action: allow
  rules:
    - name: frontend-anything
      from: {{identities: ["spiffe://test.local/ns/shop/sa/frontend"]}}
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: frontend-egress, namespace: shop}}
spec:
  selector: {{workload: frontend}}
  direction: egress
  action: deny
  rules:
    - name: no-outside-9000
      to: {{cidrs: ["{outside4}/32", "{outside6}/128"], ports: [9000]}}
"#,
        orders_policy_at(&[server4.into(), server6.into()], "/orders/*"),
        workload_at("payments", &[payments4.into(), payments6.into()]),
        workload_at("frontend", &[client4.into(), client6.into()]),
    );
    net.control(&policy);

    // Each app has a listener on its workload address (dual-stack) and another on loopback
    // only; the host outside the mesh serves two ports, and a UDP "DNS" resolver.
    for (host, name) in [("server", "orders"), ("payments", "payments")] {
        net.sample_app(host, name, "[::]:8080");
        net.sample_app(host, &format!("{name}-local"), "127.0.0.1:9901");
    }
    net.sample_app("outside", "outside", "[::]:8080");
    net.sample_app("outside", "outside-9000", "[::]:9000");
    let udp = [
        udp_echo(&mut net, "outside", "53"),
        udp_echo(&mut net, "server", "9999"),
    ];
    let resolv = format!("nameserver {outside4}\nnameserver {outside6}\n");
    net.lab.set_resolv_conf("client", &resolv);
    let dual = ["[::]:15006", "[::]:15001", "[::]:15000"];
    net.sidecar_on("server", "orders", dual);
    net.sidecar_on("payments", "payments", dual);
    net.sidecar_on("client", "frontend", dual);

    // IPv6 is captured and judged exactly as IPv4: allowed through mTLS both ends (the app
    // names the verified caller), denied with 403 from orders' sidecar, and nothing in
    // plaintext on the wire.
    let capture = net.lab.capture();
    for ip in [IpAddr::from(server6), IpAddr::from(server4)] {
        let marker = format!("plaintext-marker-{}", if ip.is_ipv6() { 6 } else { 4 });
        get_allowed_delete_denied(&net, &url(ip, 8080, &format!("/orders/{marker}")), &marker);
    }
    let wire = capture.stop();
    assert!(
        contains(&wire, b"bulkhead.mesh"),
        "the capture saw no mTLS handshake"
    );
    assert!(
        contains(&wire, &server6.octets()),
        "the capture saw no IPv6 packet to orders"
    );
    for marker in ["plaintext-marker-6", "plaintext-marker-4", "GET /orders"] {
        assert!(
            !contains(&wire, marker.as_bytes()),
            "{marker} crossed the bridge in plaintext"
        );
    }

    // An address no Workload declares is outside the mesh, and egress policy decides for
    // IPv6 as for IPv4: port 8080 allowed (plain), port 9000 refused by address.
    for ip in [IpAddr::from(outside4), IpAddr::from(outside6)] {
        let out = net.curl("GET", &url(ip, 8080, "/x"));
        assert!(out.starts_with("HTTP/1.1 200"), "{ip}:8080: {out}");
        assert!(out.contains("outside: GET /x"), "{out}");
        // Refused with a reset: before or after curl sent its request, depending on timing.
        let out = net.curl("GET", &url(ip, 9000, "/x"));
        assert!(
            out.contains("Connection reset by peer") || out.contains("Couldn't connect"),
            "{ip}:9000 not refused: {out}"
        );
    }

    // Listeners bound to loopback stay local, whatever the rule's ports: on orders (which
    // declares 8080) port 9901 is refused before policy; on payments (no ports declared,
    // the rule allows any) the sidecar forwards to the workload address, where nothing
    // listens on 9901 — never to the loopback-only app.
    for ip in [IpAddr::from(server4), IpAddr::from(server6)] {
        let out = net.curl("GET", &url(ip, 9901, "/orders/1"));
        assert!(
            !out.contains("orders-local"),
            "{ip}: the loopback-only app answered: {out}"
        );
        assert!(out.starts_with("HTTP/1.1 502"), "{ip}:9901: {out}");
    }
    for ip in [IpAddr::from(payments4), IpAddr::from(payments6)] {
        let out = net.curl("GET", &url(ip, 8080, "/charge"));
        assert!(
            out.contains("payments: GET /charge from spiffe://test.local/ns/shop/sa/frontend"),
            "{ip}: {out}"
        );
        let out = net.curl("GET", &url(ip, 9901, "/charge"));
        assert!(
            !out.contains("payments-local"),
            "{ip}: the loopback-only app answered: {out}"
        );
        assert!(out.starts_with("HTTP/1.1 502"), "{ip}:9901: {out}");
        assert!(out.contains("did not answer"), "{out}");
    }

    // A port scan sees a reset for what is refused (an undeclared port, nothing listening,
    // outside the mesh or in it), at once; not an accepted connection closing cleanly.
    for to in [
        SocketAddr::new(server4.into(), 7777),
        SocketAddr::new(server6.into(), 7777),
        SocketAddr::new(payments4.into(), 7777),
        SocketAddr::new(payments6.into(), 7777),
        SocketAddr::new(outside4.into(), 7777),
        SocketAddr::new(outside6.into(), 7777),
    ] {
        let (out, took) = tcp_probe(&net, "client", to);
        // The reset shows where it lands: on connect, on the write, or on the read.
        assert!(
            out.contains("Connection reset by peer") || out.contains("Connection refused"),
            "{to}: no reset: {out}"
        );
        assert!(
            took < Duration::from_secs(3),
            "{to}: the reset took {took:?}"
        );
    }

    // UDP does not go around the mesh: dropped to a neighbour over either family, on the
    // way out of the app and on the way into orders (even from root, the proxy's uid, which
    // the client lets out), while DNS to the resolver of resolv.conf passes. The service is
    // there: it answers on orders' own address from inside.
    for v6 in [false, true] {
        let at = |host: &str, port| SocketAddr::new(net.lab.addr(host, v6), port);
        assert!(
            udp_echoed(&net, "server", true, at("server", 9999)),
            "v6={v6}: the UDP service is not answering"
        );
        assert!(
            !udp_echoed(&net, "client", true, at("server", 9999)),
            "v6={v6}: UDP to orders passed"
        );
        assert!(
            !udp_echoed(&net, "client", false, at("server", 9999)),
            "v6={v6}: UDP into orders passed"
        );
        assert!(
            udp_echoed(&net, "client", true, at("outside", 53)),
            "v6={v6}: DNS to the resolver dropped"
        );
    }

    // The sidecar's admin port is the operator's: the app cannot read /config or /metrics,
    // root (the proxy's uid) and a scrape from another namespace can.
    for path in ["/config", "/metrics"] {
        for ip in ["127.0.0.1", "::1"] {
            let target = url(ip.parse().unwrap(), 15000, path);
            let (code, out) = net.app("client", "curl", &["-sS", "--max-time", "5", &target]);
            assert_eq!(code, 7, "the app reached {target}: {out}");
            let (code, _) = net.output("client", "curl", &["-sS", "--max-time", "5", &target]);
            assert_eq!(code, 0, "{target} does not answer root");
        }
    }
    let page = scrape_from_outside(&net, server6.into());
    // The refusals were counted, with their reasons.
    let undeclared = metric(
        &page,
        "bulkhead_connections_reset_total{direction=\"inbound\",reason=\"undeclared_port\"}",
    );
    assert!(undeclared.is_some_and(|n| n >= 4.0), "{page}");
    let page = scrape_from_outside(&net, client4.into());
    let denied = metric(
        &page,
        "bulkhead_connections_reset_total{direction=\"outbound\",reason=\"denied\"}",
    );
    assert!(denied.is_some_and(|n| n >= 2.0), "{page}");
    upgrades_from_a_compromised_app(&net, server4);
    drop(udp);
}

/// #22.1 and #22.5 from the app's uid: an allowed request carrying `Upgrade: h2c` (and a
/// forged `x-forwarded-client-cert`) gets a plain HTTP/1.1 answer, never a tunnel, so the
/// `/admin` sent next on that connection is judged and refused; the app never sees the forged
/// header; a WebSocket still works, and is closed when the policy that allowed it goes.
fn upgrades_from_a_compromised_app(net: &Net, orders: std::net::Ipv4Addr) {
    let smuggle = format!(
        "exec 3<>/dev/tcp/{orders}/8080; printf 'GET /orders/1 HTTP/1.1\\r\\nHost: orders\\r\\n\
         Connection: Upgrade, HTTP2-Settings\\r\\nUpgrade: h2c\\r\\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\\r\\n\
         x-echo-headers: 1\\r\\nx-forwarded-client-cert: URI=spiffe://test.local/ns/shop/sa/admin\\r\\n\\r\\n\
         GET /admin HTTP/1.1\\r\\nHost: orders\\r\\nConnection: close\\r\\n\\r\\n' >&3; timeout 10 cat <&3"
    );
    let (code, out) = net.app("client", "bash", &["-c", &smuggle]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "the upgrade was not refused: {out}"
    );
    assert!(!out.contains(" 101 "), "{out}");
    assert!(
        !out.contains("sa/admin"),
        "the app saw the forged header: {out}"
    );
    let admin = out
        .find("HTTP/1.1 403")
        .unwrap_or_else(|| panic!("/admin not refused: {out}"));
    assert!(out[admin..].contains("x-bulkhead-decision: deny"), "{out}");

    // #22.4: a path parameter, which Tomcat and Jetty resolve (`/orders/..;/admin` is their
    // `/admin`), is refused before any policy and never reaches the app.
    let params = format!(
        "exec 3<>/dev/tcp/{orders}/8080; printf 'GET /orders/..;/admin HTTP/1.1\\r\\nHost: orders\\r\\n\
         x-echo-headers: 1\\r\\nConnection: close\\r\\n\\r\\n' >&3; timeout 10 cat <&3"
    );
    let (code, out) = net.app("client", "bash", &["-c", &params]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("HTTP/1.1 400"),
        "a path parameter was not refused: {out}"
    );
    assert!(
        out.contains("bulkhead: ") && !out.contains("orders: GET"),
        "{out}"
    );

    // A WebSocket (GET /orders/ws: allowed) echoes; deleting the policy closes it.
    let ws = format!(
        "exec 3<>/dev/tcp/{orders}/8080; cat <&3 & c=$!; \
         printf 'GET /orders/ws HTTP/1.1\\r\\nHost: orders\\r\\nConnection: Upgrade\\r\\nUpgrade: websocket\\r\\n\\r\\n' >&3; \
         sleep 0.5; printf 'still-allowed' >&3; wait $c; echo CLOSED"
    );
    let ids = [format!("--reuid={APP_UID}"), format!("--regid={APP_UID}")];
    let mut tunnel = net
        .cmd(
            "client",
            Path::new("timeout"),
            &[
                "60",
                "setpriv",
                &ids[0],
                &ids[1],
                "--clear-groups",
                "bash",
                "-c",
                &ws,
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (seen, mut stdout) = (seen.clone(), tunnel.stdout.take().unwrap());
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let read = || seen.lock().unwrap().clone();
    eventually(WAIT, "the WebSocket to echo", || {
        read().contains("still-allowed")
    });
    assert!(read().starts_with("HTTP/1.1 101"), "{}", read());
    assert!(!read().contains("CLOSED"));
    net.ok(
        "control",
        &net.bins.bulkhead,
        &["delete", "AuthorizationPolicy/shop/orders-allow-frontend"],
    );
    eventually(WAIT, "the WebSocket to be closed", || {
        read().contains("CLOSED")
    });
    let _ = tunnel.wait();
    let _ = reader.join();
}

const UDP_ENV: &str = "BULKHEAD_TRANSPARENT_UDP";

/// Starts this test binary in `host` as [`udp_echo_in_namespace`] on `port`.
fn udp_echo(net: &mut Net, host: &str, port: &str) -> Proc {
    let ready = net.dir.path().join(format!("{host}-udp-{port}.ready"));
    let mut cmd = net.lab.command(host, &std::env::current_exe().unwrap());
    cmd.args([
        "udp_echo_in_namespace",
        "--exact",
        "--ignored",
        "--nocapture",
    ])
    .env(UDP_ENV, format!("{port}={}", ready.display()));
    let mut echo = Proc::from_command(&format!("{host}-udp-{port}"), net.dir.path(), cmd);
    echo.wait_for_file(&ready, WAIT);
    echo
}

/// Not a test: run inside a namespace (BULKHEAD_TRANSPARENT_UDP=`port=ready-file`), it echoes
/// every UDP datagram on `[::]:port`, IPv4 and IPv6.
#[test]
#[ignore = "a helper the tests above run inside a network namespace"]
fn udp_echo_in_namespace() {
    let Some((port, ready)) = std::env::var(UDP_ENV).ok().and_then(|v| {
        v.split_once('=')
            .map(|(p, r)| (p.to_string(), r.to_string()))
    }) else {
        return;
    };
    // A new namespace has net.ipv6.bindv6only 0: `[::]` takes IPv4 too.
    let socket = std::net::UdpSocket::bind(format!("[::]:{port}")).unwrap();
    std::fs::write(ready, "listening").unwrap();
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        let _ = socket.send_to(&buf[..n], from);
    }
}
