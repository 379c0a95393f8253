//! The web console in a real browser: a control plane serving the console, three workloads
//! with real sidecars and sample apps (the demo's shop: frontend → orders → payments, the
//! frontend also holding an upstream to payments, which a compromised frontend abuses), and `console/tests/console.mjs` driving
//! Debian's headless Chromium through playwright-core against it. The script checks what a
//! user sees (colours, counts, decisions, the blast radius, 401s) and takes the screenshots
//! committed under docs/console/ (`BULKHEAD_SCREENSHOTS=docs/console cargo test -p bulkhead-cli
//! --test console` refreshes them).
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::mesh::{Mesh, TD, addr, id};
use bulkhead_testkit::tool;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The demo's shop policy in this mesh's trust domain.
fn shop_yaml() -> String {
    std::fs::read_to_string(root().join("examples/shop.yaml"))
        .unwrap()
        .replace("bulkhead.local", TD)
}

/// The shop's Workloads and a namespace posture that lets every authenticated caller in:
/// where a mesh starts, before least privilege.
fn discovery_yaml() -> String {
    let shop = shop_yaml();
    let mut out = String::new();
    for doc in shop.split("\n---\n") {
        if doc.contains("kind: Workload") {
            out.push_str("---\n");
            out.push_str(doc.trim_start_matches("---\n"));
            out.push('\n');
        }
    }
    out.push_str("---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: discovery, namespace: shop}\nspec:\n  ingress: allow\n");
    out
}

fn upstream(name: &str, to: SocketAddr) -> String {
    format!(
        "name={name},listen=127.0.0.1:0,address={to},identity={},port=8080,workload=shop/{name}",
        id(name)
    )
}

#[test]
fn the_console_in_a_real_browser() {
    let test = "the_console_in_a_real_browser";
    let (Some(node), Some(chromium)) = (tool(test, "node"), tool(test, "chromium")) else {
        return;
    };
    let console_dir = root().join("console");
    if !console_dir.join("node_modules/playwright-core").exists() {
        assert!(
            std::env::var("BULKHEAD_STRICT").as_deref() != Ok("1"),
            "{test}: console/node_modules is missing; ./dev/test runs `npm ci` in console/"
        );
        eprintln!("skipped: {test}: console/node_modules is missing (npm ci in console/)");
        return;
    }
    // Anomalies reported from the first flow (no learning hour), for the events page.
    let mesh = Mesh::start_with(&["--console", "127.0.0.1:0", "--anomaly-learning-secs", "0"]);
    let dir = mesh.dir.path();
    let mut procs = Vec::new();

    // payments: an app behind a sidecar.
    let (payments_app, payments_app_addr) = mesh.app("payments");
    procs.push(payments_app);
    let token = mesh.token(&id("payments"));
    let (p, payments) = mesh.inbound_proxy("payments", &token, payments_app_addr, &[]);
    procs.push(p);
    let payments_in = addr(&payments["inbound"]);

    // orders: an app behind a sidecar that also holds an upstream to payments (the script
    // sends orders' calls to payments through it).
    let (orders_app, orders_app_addr) = mesh.app("orders");
    procs.push(orders_app);
    let token = mesh.token(&id("orders"));
    let (p, orders) = mesh.inbound_proxy(
        "orders",
        &token,
        orders_app_addr,
        &["--upstream", &upstream("payments", payments_in)],
    );
    procs.push(p);
    let orders_in = addr(&orders["inbound"]);
    let orders_to_payments = addr(&orders["upstreams"]["payments"]);

    // frontend: upstreams to orders and, for a compromised frontend to abuse, payments.
    let token = mesh.token(&id("frontend"));
    let (p, frontend) = mesh.proxy(
        "frontend",
        &token,
        &[
            "--upstream",
            &upstream("orders", orders_in),
            "--upstream",
            &upstream("payments", payments_in),
        ],
    );
    procs.push(p);

    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("shop.yaml"), shop_yaml()).unwrap();
    std::fs::write(policies.join("discovery.yaml"), discovery_yaml()).unwrap();
    // The screenshots in docs/console/ are these; they are rewritten only when asked
    // (`BULKHEAD_SCREENSHOTS=docs/console`, relative to the repository), so a test run
    // leaves the checkout as it was.
    let shots = match std::env::var("BULKHEAD_SCREENSHOTS") {
        Ok(to) => root().join(to),
        Err(_) => dir.join("screenshots"),
    };
    std::fs::create_dir_all(&shots).unwrap();

    let out = Command::new(node)
        .arg(console_dir.join("tests/console.mjs"))
        .current_dir(&console_dir)
        .env("BULKHEAD", &mesh.bins.bulkhead)
        .env("BULKHEAD_CONTEXT", mesh.data().join("admin.yaml"))
        .env("CONSOLE_CA", mesh.data().join("ca.pem"))
        .env("CHROMIUM", chromium)
        .env("POLICY_DIR", &policies)
        .env("SCREENSHOTS", &shots)
        .env(
            "FRONTEND_TO_ORDERS",
            frontend["upstreams"]["orders"].as_str().unwrap(),
        )
        .env(
            "FRONTEND_TO_PAYMENTS",
            frontend["upstreams"]["payments"].as_str().unwrap(),
        )
        .env("ORDERS_TO_PAYMENTS", orders_to_payments.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("FAIL:"),
        "the browser test failed ({}):\n{stdout}\n{stderr}\ncontrol plane log:\n{}",
        out.status,
        mesh.control.log_text()
    );
    let checks = stdout.lines().filter(|l| l.starts_with("ok: ")).count();
    assert!(checks >= 20, "only {checks} checks ran:\n{stdout}");
    drop(procs);
}
