//! A whole mesh of real processes for end-to-end tests: a control plane on its own data
//! directory, sample apps and sidecars, each logging to a file in one temporary directory.

use crate::{Bins, Proc, TempDir, run};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

pub const TD: &str = "test.local";
pub const WAIT: Duration = Duration::from_secs(30);

pub fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

/// The orders workload (port 8080, HTTP) and a policy that lets the frontend GET `path`.
pub fn orders_policy(path: &str) -> String {
    orders_policy_at(&[], path)
}

/// [`orders_policy`] with the orders workload declared at `addresses` (none: wherever its
/// sidecar runs), as transparent capture needs.
pub fn orders_policy_at(addresses: &[IpAddr], path: &str) -> String {
    let addresses = if addresses.is_empty() {
        String::new()
    } else {
        format!("  addresses: {}\n", yaml_addresses(addresses))
    };
    format!(
        r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {{name: orders, namespace: shop}}
spec:
  identity: spiffe://{TD}/ns/shop/sa/orders
{addresses}  ports: [{{port: 8080, protocol: http}}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-allow-frontend, namespace: shop}}
spec:
  selector: {{workload: orders}}
  action: allow
  rules:
    - name: frontend-reads-orders
      from: {{identities: ["spiffe://{TD}/ns/shop/sa/frontend"]}}
      to: {{methods: [GET], paths: ["{path}"]}}
"#
    )
}

/// `addresses` as a YAML flow list of quoted strings: `["10.0.0.2", "fd00::2"]`.
pub fn yaml_addresses(addresses: &[IpAddr]) -> String {
    let quoted: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The `--upstream` of a frontend sidecar calling orders' sidecar at `orders_in`: listening on
/// a loopback port of its own, expecting orders' identity.
pub fn orders_upstream(orders_in: SocketAddr) -> String {
    format!(
        "name=orders,listen=127.0.0.1:0,address={orders_in},identity={}",
        id("orders")
    )
}

pub struct Mesh {
    pub bins: Bins,
    pub dir: TempDir,
    pub control: Proc,
    pub control_addr: SocketAddr,
}

pub fn start_control(bins: &Bins, dir: &Path, listen: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    start_control_in(bins, dir, listen, TD, extra)
}

/// [`start_control`] for the trust domain `td`.
pub fn start_control_in(
    bins: &Bins,
    dir: &Path,
    listen: &str,
    td: &str,
    extra: &[&str],
) -> (Proc, SocketAddr) {
    let data = dir.join("data");
    let args = [
        "control",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        listen,
        "--trust-domain",
        td,
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    let mut control = Proc::spawn("control", dir, &bins.bulkhead, &args, &[]);
    let context = control.wait_for_file(&data.join("admin.yaml"), WAIT);
    let server = context
        .lines()
        .find_map(|l| l.strip_prefix("server: "))
        .expect("admin.yaml names the server")
        .trim_matches('"')
        .parse()
        .unwrap();
    (control, server)
}

impl Mesh {
    pub fn start() -> Mesh {
        Mesh::start_with(&[])
    }

    /// Starts the control plane with extra flags.
    pub fn start_with(extra: &[&str]) -> Mesh {
        Mesh::start_in(TD, extra)
    }

    /// Starts the control plane of trust domain `td` with extra flags (a second mesh, for
    /// federation).
    pub fn start_in(td: &str, extra: &[&str]) -> Mesh {
        let bins = Bins::of_test();
        let dir = TempDir::new().unwrap();
        let (control, control_addr) = start_control_in(&bins, dir.path(), "127.0.0.1:0", td, extra);
        Mesh {
            bins,
            dir,
            control,
            control_addr,
        }
    }

    /// Kills the control plane and starts it again on the same data directory and port.
    pub fn restart_control(&mut self) {
        self.restart_control_at(self.control_addr);
    }

    /// Kills the control plane and starts it again on the same data directory, listening
    /// on `listen` (the same mesh, moved to another address).
    pub fn restart_control_at(&mut self, listen: SocketAddr) {
        self.restart_control_with(listen, TD, &[]);
    }

    /// [`Mesh::restart_control`] for a mesh of trust domain `td`, with flags `extra`.
    pub fn restart_control_in(&mut self, td: &str, extra: &[&str]) {
        self.restart_control_with(self.control_addr, td, extra);
    }

    fn restart_control_with(&mut self, listen: SocketAddr, td: &str, extra: &[&str]) {
        self.control.kill();
        let _ = std::fs::remove_file(self.data().join("admin.yaml"));
        let _ = std::fs::rename(
            self.dir.path().join("control.log"),
            self.dir.path().join("control.1.log"),
        );
        let (control, addr) =
            start_control_in(&self.bins, self.dir.path(), &listen.to_string(), td, extra);
        self.control = control;
        assert_eq!(addr, listen);
        self.control_addr = addr;
    }

    pub fn stop_control(&mut self) {
        self.control.kill();
    }

    /// Where the control plane serves `/metrics` (started with `--metrics`), as it wrote in
    /// admin.yaml.
    pub fn metrics_addr(&self) -> SocketAddr {
        let context = std::fs::read_to_string(self.data().join("admin.yaml")).unwrap();
        context
            .lines()
            .find_map(|l| l.strip_prefix("metrics: "))
            .expect("admin.yaml names the metrics listener (start with --metrics)")
            .trim_matches('"')
            .parse()
            .unwrap()
    }

    pub fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Writes `text` to `name` in the test directory and applies it; panics if refused.
    pub fn apply(&self, name: &str, text: &str) {
        let file = self.dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let (code, _, err) = self.cli(&["apply", "-f", file.to_str().unwrap()]);
        assert_eq!(code, 0, "apply failed: {err}");
    }

    /// Runs `bulkhead ARGS` as the admin; returns (code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let context = self.data().join("admin.yaml");
        run(
            &self.bins.bulkhead,
            args,
            &[
                ("BULKHEAD_CONTEXT", context.to_str().unwrap()),
                ("USER", "alice"),
            ],
        )
    }

    /// [`Mesh::cli`] for a command that must succeed and print JSON (`-o json`): its output,
    /// parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "bulkhead {} failed: {err}", args.join(" "));
        serde_json::from_str(&out).unwrap()
    }

    /// [`Mesh::cli`] with `input` on its standard input.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> (i32, String, String) {
        use std::io::Write;
        let context = self.data().join("admin.yaml");
        let mut child = std::process::Command::new(&self.bins.bulkhead)
            .args(args)
            .env("BULKHEAD_CONTEXT", &context)
            .env("USER", "alice")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `bulkhead tap ARGS -o json` (ARGS should end it, with `-n` or `--for`) and calls
    /// `drive` every 100 ms, for up to 10 s, until the tap exits. A tap reaches the sidecars
    /// a moment after it opens, so `drive` sends the traffic to be seen again each time.
    /// Returns the events, one JSON object per line, and the tap's stderr; panics if the
    /// tap fails or never ends.
    pub fn tap(&self, args: &[&str], mut drive: impl FnMut()) -> (Vec<serde_json::Value>, String) {
        let out = self.dir.path().join("tap.out");
        let err = self.dir.path().join("tap.err");
        let mut tap = std::process::Command::new(&self.bins.bulkhead)
            .arg("tap")
            .args(args)
            .args(["-o", "json"])
            .env("BULKHEAD_CONTEXT", self.data().join("admin.yaml"))
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let mut exited = None;
        for _ in 0..100 {
            drive();
            if let Some(status) = tap.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = tap.kill();
        let _ = tap.wait();
        let stderr = std::fs::read_to_string(&err).unwrap();
        assert!(exited.is_some_and(|s| s.success()), "tap: {stderr}");
        let events = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (events, stderr)
    }

    pub fn token(&self, identity: &str) -> std::path::PathBuf {
        let (code, out, err) = self.cli(&["token", "create", "--identity", identity]);
        assert_eq!(code, 0, "token create failed: {err}");
        // A file of its own per token: a running proxy claims its token file's kept
        // credential, so two proxies of one identity cannot share a file.
        let name = identity.rsplit('/').next().unwrap();
        let file = (1..)
            .map(|n| match n {
                1 => self.dir.path().join(format!("{name}.token")),
                n => self.dir.path().join(format!("{name}-{n}.token")),
            })
            .find(|f| !f.exists())
            .unwrap();
        std::fs::write(&file, out.trim()).unwrap();
        file
    }

    pub fn app(&self, name: &str) -> (Proc, SocketAddr) {
        self.app_with(name, &[])
    }

    /// Starts `bulkhead sample-app` with extra flags (e.g. `--tcp-echo`).
    pub fn app_with(&self, name: &str, extra: &[&str]) -> (Proc, SocketAddr) {
        let args = ["sample-app", "--name", name, "--listen", "127.0.0.1:0"];
        let label = format!("{name}-app");
        let (p, json) = self.start_ready(&label, &self.bins.bulkhead, &args, extra);
        let addr = json["addr"].as_str().unwrap().parse().unwrap();
        (p, addr)
    }

    /// Starts a sidecar; returns it and its ready-file JSON.
    pub fn proxy(&self, name: &str, token: &Path, extra: &[&str]) -> (Proc, serde_json::Value) {
        self.proxy_joining(name, self.proxy_args(token), extra)
    }

    /// The flags of a sidecar that joins by the service-account token in `file` (a control
    /// plane with `--kubernetes-attest`) instead of a join token.
    pub fn attested_proxy_args(&self, file: &Path) -> Vec<String> {
        self.proxy_args(file)
            .into_iter()
            .map(|a| match a.as_str() {
                "--token-file" => "--service-account-token-file".to_string(),
                _ => a,
            })
            .collect()
    }

    /// Starts a sidecar with `args` (the join's flags, as [`Mesh::proxy_args`] makes them)
    /// and `extra`; returns it and its ready-file JSON.
    pub fn proxy_joining(
        &self,
        name: &str,
        args: Vec<String>,
        extra: &[&str],
    ) -> (Proc, serde_json::Value) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_ready(&format!("{name}-proxy"), &self.bins.proxy, &args, extra)
    }

    /// Starts `program` as `label` with `args`, `--ready-file` (`label.json`, where this
    /// mesh keeps its files) and `extra`; returns it once it has written the file, and the
    /// file's JSON.
    fn start_ready(
        &self,
        label: &str,
        program: &Path,
        args: &[&str],
        extra: &[&str],
    ) -> (Proc, serde_json::Value) {
        let ready = self.dir.path().join(format!("{label}.json"));
        // An earlier process of the same name left its file: never read as this one's.
        let _ = std::fs::remove_file(&ready);
        let mut all = args.to_vec();
        all.extend(["--ready-file", ready.to_str().unwrap()]);
        all.extend_from_slice(extra);
        let mut p = Proc::spawn(label, self.dir.path(), program, &all, &[]);
        let json = serde_json::from_str(&p.wait_for_file(&ready, WAIT)).unwrap();
        (p, json)
    }

    /// Starts `name`'s sidecar in front of the app at `app`: inbound on loopback, the app's
    /// declared port 8080, and `extra`; returns it and its ready-file JSON.
    pub fn inbound_proxy(
        &self,
        name: &str,
        token: &Path,
        app: SocketAddr,
        extra: &[&str],
    ) -> (Proc, serde_json::Value) {
        let app = app.to_string();
        let mut args = vec!["--inbound", "127.0.0.1:0", "--app", &app, "--port", "8080"];
        args.extend_from_slice(extra);
        self.proxy(name, token, &args)
    }

    pub fn proxy_args(&self, token: &Path) -> Vec<String> {
        vec![
            "--control".into(),
            self.control_addr.to_string(),
            "--trust-bundle".into(),
            self.data().join("ca.pem").to_str().unwrap().into(),
            "--token-file".into(),
            token.to_str().unwrap().into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
        ]
    }

    /// Starts the orders app and sidecar (inbound, `--port 8080`) and a frontend sidecar with
    /// an upstream `orders` to it; returns the processes and the frontend's upstream address.
    pub fn orders_and_frontend(&self, orders_extra: &[&str]) -> (Vec<Proc>, SocketAddr) {
        self.orders_and_frontend_with(orders_extra, &[])
    }

    /// [`Mesh::orders_and_frontend`] with extra flags for the frontend sidecar too.
    pub fn orders_and_frontend_with(
        &self,
        orders_extra: &[&str],
        frontend_extra: &[&str],
    ) -> (Vec<Proc>, SocketAddr) {
        let (orders_app, orders_app_addr) = self.app("orders");
        let token = self.token(&id("orders"));
        let (orders_proxy, orders) =
            self.inbound_proxy("orders", &token, orders_app_addr, orders_extra);
        let orders_in = addr(&orders["inbound"]);
        let token = self.token(&id("frontend"));
        let upstream = orders_upstream(orders_in);
        let mut args = vec!["--upstream", upstream.as_str()];
        args.extend_from_slice(frontend_extra);
        let (frontend_proxy, frontend) = self.proxy("frontend", &token, &args);
        (
            vec![orders_app, orders_proxy, frontend_proxy],
            addr(&frontend["upstreams"]["orders"]),
        )
    }

    /// The ready-file JSON of the sidecar started as `name` (its addresses, identity and
    /// revision).
    pub fn proxy_ready(&self, name: &str) -> serde_json::Value {
        let file = self.dir.path().join(format!("{name}-proxy.json"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        serde_json::from_str(&text).unwrap()
    }

    /// How many proxies `bulkhead get proxies` lists with an open stream that acknowledged
    /// `revision`.
    pub fn proxies_open_acking(&self, revision: u64) -> usize {
        let (_, out, _) = self.cli(&["get", "proxies"]);
        let ack = format!("{revision} ACK");
        out.lines()
            .filter(|l| l.contains(" open ") && l.contains(&ack))
            .count()
    }

    /// Runs a proxy expected to fail at start; returns its stderr.
    pub fn failing_proxy(&self, token: &Path, extra: &[&str]) -> String {
        self.failing_proxy_joining(self.proxy_args(token), extra)
    }

    /// [`Mesh::failing_proxy`] with the join's flags `args`.
    pub fn failing_proxy_joining(&self, mut args: Vec<String>, extra: &[&str]) -> String {
        args.extend([
            "--upstream".into(),
            format!(
                "name=x,listen=127.0.0.1:0,address=127.0.0.1:9,identity={}",
                id("x")
            ),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run(&self.bins.proxy, &args, &[]);
        assert_ne!(code, 0, "proxy should have refused to start; stderr: {err}");
        err
    }
}

pub fn addr(v: &serde_json::Value) -> SocketAddr {
    v.as_str().unwrap().parse().unwrap()
}

pub fn log_has(mesh: &Mesh, name: &str, needle: &str) -> bool {
    std::fs::read_to_string(mesh.dir.path().join(format!("{name}.log")))
        .map(|t| t.contains(needle))
        .unwrap_or(false)
}

/// Polls until `f` holds, or fails with `what` after `timeout`.
pub fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
