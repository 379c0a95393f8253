//! Transparent capture end to end, as root: three network namespaces on a bridge (control
//! plane, client, server). `bulkhead-proxy init` installs the capture rules in the client and
//! server namespaces; an unmodified `curl` (not root, so its traffic is captured) reaches the
//! server's app by its address. The request is intercepted on both ends, crosses the bridge
//! only inside mTLS (a capture on the bridge never sees it), is authorized, and is denied
//! when the policy says so.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::netns::{Lab, can_run, contains};
use bulkhead_testkit::{Bins, Proc, TempDir, parse_response};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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

    /// Starts a transparent sidecar for `sa` in `host` after installing the capture rules.
    fn sidecar(&mut self, host: &str, sa: &str) {
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
        let ready = self.dir.path().join(format!("{sa}-proxy.json"));
        let bundle = self.dir.path().join("data/ca.pem");
        let args = [
            "--control",
            &control,
            "--trust-bundle",
            bundle.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--inbound",
            "0.0.0.0:15006",
            "--transparent",
            "--outbound",
            "127.0.0.1:15001",
            "--admin",
            "127.0.0.1:15000",
            "--ready-file",
            ready.to_str().unwrap(),
        ];
        let i = self.spawn(host, &format!("{sa}-proxy"), &proxy, &args);
        self.procs[i].wait_for_file(&ready, WAIT);
    }

    /// `curl` in the client namespace as an ordinary user: returns the raw response.
    fn curl(&self, method: &str, url: &str) -> String {
        let out = self
            .cmd(
                "client",
                Path::new("setpriv"),
                &[
                    &format!("--reuid={APP_UID}"),
                    &format!("--regid={APP_UID}"),
                    "--clear-groups",
                    "curl",
                    "-sS",
                    "-i",
                    "--max-time",
                    "10",
                    "-X",
                    method,
                    url,
                ],
            )
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

#[test]
fn transparent_capture_encrypts_and_enforces_between_namespaces() {
    if !can_run(
        "transparent_capture_encrypts_and_enforces_between_namespaces",
        &["iptables", "iptables-restore", "tcpdump", "curl", "setpriv"],
    ) {
        return;
    }
    let mut net = Net {
        lab: Lab::new(&["control", "client", "server"]),
        bins: Bins::of_test(),
        dir: TempDir::new().unwrap(),
        procs: Vec::new(),
    };
    let (client_ip, server_ip) = (net.lab.ip("client"), net.lab.ip("server"));

    // The control plane, in its own namespace.
    let data = net.dir.path().join("data");
    let listen = format!("{}:{CONTROL_PORT}", net.lab.ip("control"));
    let bulkhead = net.bins.bulkhead.clone();
    let c = net.spawn(
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
    net.procs[c].wait_for_file(&data.join("admin.yaml"), WAIT);
    let policy = format!(
        r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {{name: orders, namespace: shop}}
spec:
  identity: spiffe://test.local/ns/shop/sa/orders
  addresses: ["{server_ip}"]
  ports: [{{port: 8080, protocol: http}}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {{name: frontend, namespace: shop}}
spec:
  identity: spiffe://test.local/ns/shop/sa/frontend
  addresses: ["{client_ip}"]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-allow-frontend, namespace: shop}}
spec:
  selector: {{workload: orders}}
  action: allow
  rules:
    - name: frontend-reads-orders
      from: {{identities: ["spiffe://test.local/ns/shop/sa/frontend"]}}
      to: {{methods: [GET], paths: ["/orders/*"]}}
"#
    );
    let file = net.dir.path().join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    net.ok(
        "control",
        &bulkhead,
        &["apply", "-f", file.to_str().unwrap()],
    );

    // The server: its app on 8080, unaware of the mesh; the sidecar in front, transparently.
    let ready = net.dir.path().join("orders-app.json");
    let a = net.spawn(
        "server",
        "orders-app",
        &bulkhead,
        &[
            "sample-app",
            "--name",
            "orders",
            "--listen",
            "0.0.0.0:8080",
            "--ready-file",
            ready.to_str().unwrap(),
        ],
    );
    net.procs[a].wait_for_file(&ready, WAIT);
    net.sidecar("server", "orders");
    net.sidecar("client", "frontend");

    let capture = net.lab.capture();
    let marker = "plaintext-marker-5f1c9e";
    let url = format!("http://{server_ip}:8080/orders/{marker}");
    // Allowed: intercepted on both ends (the app names the caller the server's sidecar
    // verified, which only mTLS from the client's sidecar can give it).
    let out = net.curl("GET", &url);
    let resp = parse_response(out.as_bytes()).unwrap_or_else(|| panic!("no HTTP answer: {out}"));
    assert_eq!(resp.status, 200, "{out}");
    assert!(
        resp.body.contains(&format!(
            "orders: GET /orders/{marker} from spiffe://test.local/ns/shop/sa/frontend"
        )),
        "{out}"
    );
    // Denied by the server's policy, with the reason.
    let out = net.curl("DELETE", &url);
    let resp = parse_response(out.as_bytes()).unwrap_or_else(|| panic!("no HTTP answer: {out}"));
    assert_eq!(resp.status, 403, "{out}");
    assert!(
        resp.header("x-bulkhead-decision")
            .unwrap_or_default()
            .starts_with("deny; policy=default-deny"),
        "{out}"
    );
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
