//! The mesh in the tools its operators already run, for real: Prometheus from Debian scrapes
//! two sidecars and the control plane (the sidecars found through `file_sd`), keeps every
//! family's help and type, loads the alerting rules in `deploy/prometheus/` without an
//! error, and answers every query of the Grafana dashboard in `deploy/grafana/` with data.
//! The rules' own behaviour is unit-tested by `promtool test rules`.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually, orders_policy};
use bulkhead_testkit::{Proc, http, tool};
use serde_json::{Value, json};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Percent-encodes a query parameter (everything but unreserved characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query against Prometheus' HTTP API; the `data.result` array.
fn query(prometheus: SocketAddr, promql: &str) -> Vec<Value> {
    let r = http(
        prometheus,
        "GET",
        &format!("/api/v1/query?query={}", encode(promql)),
    );
    let v: Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{promql}: not JSON ({e}): {}", r.body));
    assert_eq!(v["status"], "success", "{promql}: {v}");
    v["data"]["result"].as_array().unwrap().clone()
}

#[test]
fn alerting_rules_pass_their_unit_tests() {
    let Some(promtool) = tool("alerting_rules_pass_their_unit_tests", "promtool") else {
        return;
    };
    let dir = deploy().join("prometheus");
    for args in [
        ["check", "rules", "bulkhead.rules.yaml"],
        ["test", "rules", "bulkhead.rules.test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn prometheus_scrapes_the_mesh_and_every_dashboard_query_has_data() {
    let test = "prometheus_scrapes_the_mesh_and_every_dashboard_query_has_data";
    let Some(prometheus_bin) = tool(test, "prometheus") else {
        return;
    };
    let mesh = Mesh::start_with(&["--metrics", "127.0.0.1:0"]);
    mesh.apply("policy.yaml", &orders_policy("/orders/*"));
    let (_procs, to_orders) = mesh.orders_and_frontend(&[]);
    let ready = |name: &str| -> Value {
        let text = std::fs::read_to_string(mesh.dir.path().join(format!("{name}-proxy.json")));
        serde_json::from_str(&text.unwrap()).unwrap()
    };
    let (orders, frontend) = (ready("orders"), ready("frontend"));
    let control_metrics = mesh.metrics_addr().to_string();

    // Sidecars found through a file, as service discovery writes one.
    let dir = mesh.dir.path();
    let targets = json!([{
        "targets": [orders["admin"], frontend["admin"]],
        "labels": {"mesh": "test"},
    }]);
    std::fs::write(dir.join("proxies.json"), targets.to_string()).unwrap();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{rules:?}]\nscrape_configs:\n  - job_name: bulkhead-proxies\n    file_sd_configs: [{{files: [{sd:?}], refresh_interval: 1s}}]\n  - job_name: bulkhead-control\n    static_configs: [{{targets: [{control_metrics:?}]}}]\n",
        rules = deploy().join("prometheus/bulkhead.rules.yaml"),
        sd = dir.join("proxies.json"),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let prometheus: SocketAddr = listen.parse().unwrap();
    let mut server = Proc::spawn(
        "prometheus",
        dir,
        &prometheus_bin,
        &[
            &format!("--config.file={}", dir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            &format!("--web.listen-address={listen}"),
        ],
        &[],
    );
    eventually(WAIT, "Prometheus ready", || {
        server.assert_running();
        std::net::TcpStream::connect(prometheus).is_ok()
            && http(prometheus, "GET", "/-/ready").status == 200
    });

    // Traffic of every kind the dashboard shows: allowed, denied, and a caller that does
    // not speak TLS to a sidecar's mTLS port. Two rounds, scrapes apart, so rates exist.
    let inbound = addr(&orders["inbound"]);
    for _ in 0..2 {
        for _ in 0..5 {
            assert_eq!(http(to_orders, "GET", "/orders/1").status, 200);
        }
        assert_eq!(http(to_orders, "GET", "/admin").status, 403);
        let _ = bulkhead_testkit::http_raw(inbound, "GET", "/");
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }

    eventually(WAIT, "every target scraped and up", || {
        let up = query(prometheus, "up");
        up.len() == 3 && up.iter().all(|s| s["value"][1] == "1")
    });
    // Prometheus kept each family's help and type (it drops them when the page's content
    // type and its body disagree).
    let r = http(prometheus, "GET", "/api/v1/metadata");
    let metadata: Value = serde_json::from_str(&r.body).unwrap();
    for family in [
        "bulkhead_requests",
        "bulkhead_authz_decisions",
        "bulkhead_anomalies",
    ] {
        let entry = metadata["data"][family]
            .get(0)
            .unwrap_or_else(|| panic!("no metadata for {family}: {metadata}"));
        assert_eq!(entry["type"], "counter", "{family}: {entry}");
        assert!(
            entry["help"].as_str().is_some_and(|h| !h.is_empty()),
            "{family}: {entry}"
        );
    }

    // Every alerting rule evaluates without an error against the real series.
    eventually(WAIT, "every rule evaluated", || {
        let r = http(prometheus, "GET", "/api/v1/rules");
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        rules.len() == 6
            && rules.iter().all(|r| {
                assert_ne!(r["health"], "err", "{r}");
                r["health"] == "ok"
            })
    });

    // Every query of the dashboard returns data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/bulkhead-mesh.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            // A rate needs two scrapes in its window: data may take a scrape interval.
            let what = format!("data for panel {} ({expr})", panel["title"]);
            eventually(WAIT, &what, || !query(prometheus, &expr).is_empty());
        }
    }
    // And what they show is the traffic sent: 10 allowed requests reached orders.
    let allowed = query(
        prometheus,
        "sum(bulkhead_authz_decisions_total{direction=\"inbound\",verdict=\"allow\"})",
    );
    assert_eq!(allowed[0]["value"][1], "10", "{allowed:?}");
}
