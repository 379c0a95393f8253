//! Anomalies (issue #7), end to end with real processes: a control plane that learns no
//! baseline (`--anomaly-learning-secs 0`) and serves `/metrics`, sidecars reporting flows
//! every second. The frontend's first calls to orders are one new identity and one new edge;
//! more of the same is no news; a burst of denied requests from an identity never seen
//! before is its new identity and edge plus one denial spike naming orders; `bulkhead events`
//! (also `--follow`) lists exactly these, and the metrics count them.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::http;
use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually, id, orders_policy};
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const FLOWS_EVERY_SECOND: [&str; 2] = ["--flow-interval-secs", "1"];

/// The events `bulkhead events -o json` lists.
fn events(mesh: &Mesh) -> Vec<serde_json::Value> {
    let (code, out, err) = mesh.cli(&["events", "-o", "json"]);
    assert_eq!(code, 0, "bulkhead events failed: {err}");
    assert!(!err.contains("learning"), "no learning period: {err}");
    serde_json::from_str(&out).unwrap()
}

fn kinds(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["sourceIdentity"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

/// The value of one metric line (`name{labels}`), 0 if absent.
fn metric(at: SocketAddr, series: &str) -> u64 {
    let r = http(at, "GET", "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits until `n` more reported edges are stored; returns how many are stored then.
fn reported(mesh: &Mesh, metrics: SocketAddr, before: u64, n: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(metrics, "bulkhead_flow_edges_stored_total");
        if now >= before + n {
            return now;
        }
        if Instant::now() > deadline {
            let log = |name: &str| {
                std::fs::read_to_string(mesh.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default()
            };
            panic!(
                "{now} edges stored, not {}; control plane log:\n{}\norders sidecar:\n{}\nfrontend sidecar:\n{}",
                before + n,
                log("control"),
                log("orders-proxy"),
                log("frontend-proxy")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `bulkhead events --follow -o json`, its lines read into a channel.
fn follow(mesh: &Mesh) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(&mesh.bins.bulkhead)
        .args(["events", "--follow", "-o", "json"])
        .env("BULKHEAD_CONTEXT", mesh.data().join("admin.yaml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[test]
fn new_edges_new_identities_and_denial_spikes() {
    let mesh = Mesh::start_with(&["--anomaly-learning-secs", "0", "--metrics", "127.0.0.1:0"]);
    mesh.apply("policy.yaml", &orders_policy("/orders/*"));
    let metrics = mesh.metrics_addr();
    assert_eq!(
        metric(metrics, "bulkhead_anomalies_total{kind=\"new-edge\"}"),
        0
    );
    let (_procs, to_orders) =
        mesh.orders_and_frontend_with(&FLOWS_EVERY_SECOND, &FLOWS_EVERY_SECOND);

    // The frontend's first calls: one new identity and one new edge, however many requests
    // and whichever sidecar reports first.
    for path in ["/orders/1", "/orders/2", "/orders/3"] {
        assert_eq!(http(to_orders, "GET", path).status, 200);
    }
    let page = http(metrics, "GET", "/metrics").body;
    let complaints = bulkhead_testkit::promtool_check_metrics("events", &page);
    assert!(complaints.is_empty(), "{complaints}\n{page}");
    let stored = reported(&mesh, metrics, 0, 1);
    let frontend = id("frontend");
    let first = events(&mesh);
    assert_eq!(
        kinds(&first),
        vec![
            ("new-identity".into(), frontend.clone()),
            ("new-edge".into(), frontend.clone()),
        ]
    );
    let edge = &first[1];
    assert_eq!(edge["destination"]["name"], "orders");
    assert_eq!(edge["port"], 8080);
    let detail = edge["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("first seen: 3 requests allowed; for example GET /orders/* allowed by shop/orders-allow-frontend"),
        "{detail}"
    );

    // More of the same is no news.
    for path in ["/orders/4", "/orders/5"] {
        assert_eq!(http(to_orders, "GET", path).status, 200);
    }
    reported(&mesh, metrics, stored, 1);
    assert_eq!(events(&mesh).len(), 2);

    // An identity never seen before, denied 25 times within a minute.
    let (follower, lines) = follow(&mesh);
    let _follower = KillOnDrop(follower);
    let orders_ready = mesh.proxy_ready("orders");
    // This sidecar knows the destination's workload, so it reports its side of the calls
    // too: still one new edge.
    let upstream = format!(
        "name=orders,listen=127.0.0.1:0,address={},identity={},port=8080,workload=shop/orders",
        addr(&orders_ready["inbound"]),
        id("orders")
    );
    let mut args = vec!["--upstream", upstream.as_str()];
    args.extend(FLOWS_EVERY_SECOND);
    let (_intruder, ready) = mesh.proxy("intruder", &mesh.token(&id("intruder")), &args);
    let via_intruder = addr(&ready["upstreams"]["orders"]);
    for i in 0..25 {
        let r = http(via_intruder, "GET", &format!("/orders/{i}"));
        assert_eq!(r.status, 403, "{r:?}");
    }
    eventually(WAIT, "a denial spike", || {
        events(&mesh).iter().any(|e| e["kind"] == "denial-spike")
    });
    let all = events(&mesh);
    let intruder = id("intruder");
    let mut seen = kinds(&all);
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("denial-spike".into(), "-".into()),
            ("new-edge".into(), frontend.clone()),
            ("new-edge".into(), intruder.clone()),
            ("new-identity".into(), frontend.clone()),
            ("new-identity".into(), intruder.clone()),
        ],
        "{all:#?}"
    );
    let spike = all.iter().find(|e| e["kind"] == "denial-spike").unwrap();
    assert_eq!(spike["destination"]["name"], "orders");
    let detail = spike["detail"].as_str().unwrap();
    assert!(
        detail.contains(
            " denied requests to shop/orders in one minute (usual: 0.0 per minute); top callers: "
        ) && detail.contains(&format!("{intruder} (")),
        "{detail}"
    );
    let denied = spike["denied"].as_u64().unwrap();
    assert!((20..=25).contains(&denied), "{detail}");

    // The follower printed it as it was found.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut followed = Vec::new();
    while !followed
        .iter()
        .any(|l: &String| l.contains("\"kind\":\"denial-spike\""))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => followed.push(line),
            Err(_) => panic!("--follow did not print the spike; it printed {followed:#?}"),
        }
    }

    // The table names the parties; the metrics count every kind.
    let (code, table, err) = mesh.cli(&["events", "--since", "1h"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("TIME"), "{table}");
    assert!(
        table.contains(&format!("{intruder} → shop/orders:8080")) && table.contains("denial-spike"),
        "{table}"
    );
    // -n keeps the events with a side in the namespace: every one here is about shop/orders.
    let listed = |ns: &str| {
        let (code, out, err) = mesh.cli(&["events", "-n", ns, "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    };
    assert_eq!(listed("shop"), events(&mesh));
    assert_eq!(listed("billing"), Vec::<serde_json::Value>::new());
    for (kind, n) in [("new-edge", 2), ("new-identity", 2), ("denial-spike", 1)] {
        let series = format!("bulkhead_anomalies_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(metrics, &series), n, "{series}");
    }
    assert_eq!(metric(metrics, "bulkhead_flow_edges_refused_total"), 0);
    assert_eq!(http(metrics, "GET", "/other").status, 404);
}

/// Stops the follower however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
