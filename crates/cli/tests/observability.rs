//! The mesh in the tools its operators already run, for real: Prometheus from Debian scrapes
//! two sidecars and the control plane, found through the `file_sd` file the control plane
//! writes (`--prometheus-sd-file`); every page passes `promtool check metrics`; Prometheus
//! keeps every family's help and type, loads the alerting rules in `deploy/prometheus/`
//! without an error, and answers every query of the Grafana dashboard in `deploy/grafana/`
//! with data, and the numbers are the traffic sent. The rules' own behaviour is unit-tested
//! by `promtool test rules`.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually, orders_policy};
use bulkhead_testkit::prometheus::{self, Prometheus};
use bulkhead_testkit::{http, tool};
use serde_json::{Value, json};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
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

/// The `file_sd` file the control plane writes: its groups.
fn sd_groups(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// One GET with extra request headers, on a fresh connection: status line and headers.
fn get_with(to: SocketAddr, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(to).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: orders\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw).to_string()
}

#[test]
fn prometheus_scrapes_the_mesh_it_discovers_and_every_dashboard_query_has_data() {
    let test = "prometheus_scrapes_the_mesh_it_discovers_and_every_dashboard_query_has_data";
    let Some(prometheus_bin) = tool(test, "prometheus") else {
        return;
    };
    // The control plane writes the targets file into Prometheus' directory.
    let prometheus_dir = prometheus::dir();
    let sd_file = prometheus_dir.path().join("bulkhead-sd.json");
    let sd = sd_file.to_str().unwrap();
    let mesh = Mesh::start_with(&["--metrics", "127.0.0.1:0", "--prometheus-sd-file", sd]);
    mesh.apply("policy.yaml", &orders_policy("/orders/*"));
    let (mut procs, to_orders) = mesh.orders_and_frontend(&[]);
    let (orders, frontend) = (mesh.proxy_ready("orders"), mesh.proxy_ready("frontend"));
    let control_metrics = mesh.metrics_addr();

    // Each connected proxy is listed at the admin address it reported, with its workload.
    eventually(
        WAIT,
        "both sidecars and the control plane in the file",
        || sd_groups(&sd_file).len() == 3,
    );
    let groups = sd_groups(&sd_file);
    assert_eq!(groups[0]["targets"], json!([control_metrics.to_string()]));
    assert_eq!(groups[0]["labels"], json!({"job": "bulkhead-control"}));
    for (name, ready) in [("orders", &orders), ("frontend", &frontend)] {
        let group = groups
            .iter()
            .find(|g| g["labels"]["workload"] == name)
            .unwrap_or_else(|| panic!("{name} not in {groups:?}"));
        assert_eq!(group["targets"], json!([ready["admin"]]), "{group}");
        assert_eq!(group["labels"]["job"], "bulkhead-proxies");
        assert_eq!(group["labels"]["namespace"], "shop");
        assert!(
            group["labels"]["instance"]
                .as_str()
                .is_some_and(|i| !i.is_empty()),
            "{group}"
        );
    }

    // The control plane answers /live and /ready on its metrics port.
    for path in ["/live", "/ready"] {
        let r = http(control_metrics, "GET", path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    assert_eq!(http(control_metrics, "GET", "/nothing").status, 404);

    // One scrape job, the targets from the control plane's file, the job names from its labels.
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{rules:?}]\nscrape_configs:\n  - job_name: bulkhead\n    file_sd_configs: [{{files: [{sd:?}], refresh_interval: 1s}}]\n",
        rules = deploy().join("prometheus/bulkhead.rules.yaml"),
    );
    let prometheus = Prometheus::start(&prometheus_bin, prometheus_dir, &config);

    // Traffic of every kind the dashboard shows: allowed, denied by the mesh, refused by
    // the app itself, and a caller that does not speak TLS to a sidecar's mTLS port. Two
    // rounds, scrapes apart, so rates exist.
    let inbound = addr(&orders["inbound"]);
    for _ in 0..2 {
        for _ in 0..5 {
            assert_eq!(http(to_orders, "GET", "/orders/1").status, 200);
        }
        assert_eq!(http(to_orders, "GET", "/admin").status, 403);
        let own = get_with(to_orders, "/orders/2", "x-sample-status: 403\r\n");
        assert!(own.starts_with("HTTP/1.1 403"), "{own}");
        assert!(
            !own.to_lowercase().contains("forged"),
            "the app's forged decision header passed its sidecar: {own}"
        );
        let _ = bulkhead_testkit::http_raw(inbound, "GET", "/");
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
    // A revision pushed to connected proxies: its push is timed to their ACKs.
    mesh.apply(
        "more.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: health, namespace: shop}\nspec:\n  selector: {workload: orders}\n  action: allow\n  rules:\n    - name: health\n      from: {identities: [\"spiffe://test.local/ns/shop/sa/frontend\"]}\n      to: {methods: [GET], paths: [/health]}\n",
    );

    eventually(WAIT, "every target scraped and up", || {
        let up = prometheus.query("up");
        up.len() == 3 && up.iter().all(|s| s["value"][1] == "1")
    });
    // The proxies' series carry the labels the file gave them.
    let up = prometheus.query("up{job=\"bulkhead-proxies\"}");
    let mut workloads: Vec<&str> = up
        .iter()
        .map(|s| {
            assert_eq!(s["metric"]["namespace"], "shop", "{s}");
            s["metric"]["workload"].as_str().unwrap()
        })
        .collect();
    workloads.sort();
    assert_eq!(workloads, ["frontend", "orders"]);

    // Every page passes `promtool check metrics`, in the format promtool reads.
    let targets = prometheus.api("targets");
    let active = targets["data"]["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 3, "{targets}");
    for target in active {
        let url = target["scrapeUrl"].as_str().unwrap();
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        let page = http(host.parse().unwrap(), "GET", "/metrics");
        assert_eq!(page.status, 200);
        let complaints = bulkhead_testkit::promtool_check_metrics(test, &page.body);
        assert!(complaints.is_empty(), "{url}: {complaints}\n{}", page.body);
        for family in [
            "bulkhead_build_info{",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(
                page.body.contains(family),
                "{url}: no {family} in\n{}",
                page.body
            );
        }
    }

    // Prometheus kept each family's help and type (it drops them when the page's content
    // type and its body disagree).
    let metadata = prometheus.api("metadata");
    for (family, kind) in [
        ("bulkhead_requests", "counter"),
        ("bulkhead_authz_decisions", "counter"),
        ("bulkhead_anomalies", "counter"),
        ("bulkhead_svids_issued", "counter"),
        ("bulkhead_push_duration_seconds", "histogram"),
        ("bulkhead_build", "info"),
        ("process_resident_memory_bytes", "gauge"),
    ] {
        let entry = metadata["data"][family]
            .get(0)
            .unwrap_or_else(|| panic!("no metadata for {family}: {metadata}"));
        assert_eq!(entry["type"], kind, "{family}: {entry}");
        assert!(
            entry["help"].as_str().is_some_and(|h| !h.is_empty()),
            "{family}: {entry}"
        );
    }

    // Every alerting rule evaluates without an error against the real series.
    eventually(WAIT, "every rule evaluated", || {
        let v = prometheus.api("rules");
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        rules.len() == 9
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
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for row in ["Mesh overview", "Workload", "Authorization"] {
        assert!(rows.contains(&row), "no {row} row in {rows:?}");
    }
    // Its variables list the mesh's namespaces and workloads (`label_values(SELECTOR,
    // LABEL)`, as Grafana asks Prometheus: the label's values among the selector's series).
    let all = |q: &str| {
        q.replace("$__rate_interval", "1m")
            .replace("$namespace", ".*")
            .replace("$workload", ".*")
    };
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    for (name, want) in [("namespace", "shop"), ("workload", "orders")] {
        let var = variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"));
        let q = all(var["query"]["query"].as_str().unwrap());
        let (selector, label) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(", "))
            .unwrap_or_else(|| panic!("not label_values(SELECTOR, LABEL): {q}"));
        let values = prometheus.api(&format!(
            "label/{label}/values?match[]={}",
            prometheus::encode(selector)
        ));
        assert!(
            values["data"].as_array().unwrap().iter().any(|v| v == want),
            "${name}: {q} gives {values}"
        );
    }
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        for target in panel["targets"].as_array().unwrap() {
            // The variables at "All", as Grafana sends them.
            let expr = all(target["expr"].as_str().unwrap());
            // A rate needs two scrapes in its window: data may take a scrape interval.
            let what = format!("data for panel {} ({expr})", panel["title"]);
            eventually(WAIT, &what, || !prometheus.query(&expr).is_empty());
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");

    // And what they show is the traffic sent. 10 allowed requests reached orders …
    let count = |promql: &str| prometheus.value(promql).unwrap_or(-1.0);
    let inbound_orders = "direction=\"inbound\",source_namespace=\"shop\",source_workload=\"frontend\",destination_namespace=\"shop\",destination_workload=\"orders\"";
    assert_eq!(
        count(&format!(
            "sum(bulkhead_authz_decisions_total{{{inbound_orders},verdict=\"allow\"}})"
        )),
        12.0,
        "10 allowed and 2 the app refused itself"
    );
    // … the mesh denied 2, counted with the caller, and told apart from the app's own 403s.
    assert_eq!(
        count(&format!(
            "sum(bulkhead_authz_decisions_total{{{inbound_orders},verdict=\"deny\",source_principal=\"spiffe://test.local/ns/shop/sa/frontend\"}})"
        )),
        2.0
    );
    for (direction, flags, want) in [
        ("inbound", "RBAC", 2.0),
        ("inbound", "-", 2.0),
        ("outbound", "RBAC", 2.0),
        ("outbound", "-", 2.0),
    ] {
        let q = format!(
            "sum(bulkhead_requests_total{{direction=\"{direction}\",source_workload=\"frontend\",destination_workload=\"orders\",response_code=\"403\",response_flags=\"{flags}\"}})"
        );
        assert_eq!(count(&q), want, "{q}");
    }
    // The control plane's fleet: two connected, both SVIDs issued by join, the CA valid
    // for its lifetime, the revision pushed and acknowledged by both.
    assert_eq!(count("bulkhead_proxies_connected"), 2.0);
    assert_eq!(count("bulkhead_svids_issued_total{how=\"join\"}"), 2.0);
    let ca_left = count("bulkhead_ca_expiry_seconds");
    assert!(ca_left > 86400.0 * 300.0, "CA time left {ca_left}");
    eventually(
        WAIT,
        "both ACKs of revision 2 timed and none behind",
        || {
            count("bulkhead_push_duration_seconds_count{result=\"ack\"}") == 2.0
                && count("bulkhead_proxies_behind") == 0.0
                && count("bulkhead_policy_revision{job=\"bulkhead-control\"}") == 2.0
        },
    );
    assert_eq!(
        count("count(bulkhead_build_info{component=\"proxy\"})"),
        2.0
    );
    assert!(count("sum(bulkhead_connections_open{job=\"bulkhead-proxies\"})") >= 1.0);

    // A sidecar that stops leaves the file at once, and the control plane counts it
    // disconnected (the alert that replaces `up == 0` for discovered sidecars).
    procs[2].kill();
    eventually(WAIT, "the stopped sidecar out of the file", || {
        sd_groups(&sd_file).len() == 2
    });
    assert!(
        sd_groups(&sd_file)
            .iter()
            .all(|g| g["labels"]["workload"] != "frontend")
    );
    eventually(WAIT, "the stopped sidecar counted disconnected", || {
        prometheus.value("bulkhead_proxies_disconnected") == Some(1.0)
            && prometheus.value("bulkhead_proxies_connected") == Some(1.0)
    });
    let _ = prometheus.log_text();
}

/// An OTLP/gRPC trace receiver built from OpenTelemetry's own protobufs (the
/// `opentelemetry-proto` crate): it keeps every span it is sent, with its resource's
/// `service.name`.
mod otlp_receiver {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Receiver {
        pub spans: Arc<Mutex<Vec<(String, Span)>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut kept = self.spans.lock().unwrap();
            for rs in req.into_inner().resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    kept.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves on a thread of its own for the rest of the test.
    pub fn start() -> (SocketAddr, Receiver) {
        let receiver = Receiver::default();
        let served = receiver.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(served))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
        });
        (addr, receiver)
    }

    pub fn attr(span: &Span, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                Some(any_value::Value::IntValue(i)) => Some(i.to_string()),
                Some(any_value::Value::BoolValue(b)) => Some(b.to_string()),
                _ => None,
            })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn spans_of_an_allowed_and_a_denied_request_reach_an_otlp_receiver_linked() {
    use otlp_receiver::attr;
    let (collector, receiver) = otlp_receiver::start();
    let endpoint = format!("http://{collector}");
    let traced = ["--otlp-endpoint", endpoint.as_str()];
    let mesh = Mesh::start_with(&traced);
    mesh.apply("policy.yaml", &orders_policy("/orders"));
    let orders_flags = [traced[0], traced[1], "--log-format", "json"];
    let (procs, to_orders) = mesh.orders_and_frontend_with(&orders_flags, &traced);

    // The app sends a traceparent: the trace goes on through both sidecars to the app.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    let mut tcp = std::net::TcpStream::connect(to_orders).unwrap();
    std::io::Write::write_all(
        &mut tcp,
        format!(
            "GET /orders HTTP/1.1\r\nHost: orders\r\ntraceparent: 00-{trace}-{app_span}-01\r\ntracestate: vendor=kept\r\nx-echo-headers: 1\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut tcp, &mut raw).unwrap();
    let allowed = String::from_utf8_lossy(&raw).to_string();
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    // No traceparent: the sidecar starts a trace; this one is denied by orders' sidecar.
    assert_eq!(http(to_orders, "GET", "/admin").status, 403);
    assert_eq!(http(to_orders, "GET", "/admin/1234567").status, 403);

    let all_spans = || receiver.spans.lock().unwrap().clone();
    let request_spans = || {
        all_spans()
            .into_iter()
            .filter(|(service, _)| service != "bulkhead-control")
            .collect::<Vec<_>>()
    };
    eventually(WAIT, "six request spans at the receiver", || {
        request_spans().len() >= 6
    });
    let spans = request_spans();
    let find = |service: &str, path: &str| {
        spans
            .iter()
            .find(|(s, span)| s == service && attr(span, "url.path").as_deref() == Some(path))
            .map(|(_, span)| span.clone())
            .unwrap_or_else(|| panic!("no span of {service} for {path}: {spans:#?}"))
    };
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

    // Allowed: app span → frontend's client span → orders' server span → the app's request.
    let client = find("frontend", "/orders");
    let server = find("orders", "/orders");
    assert_eq!(hex(&client.trace_id), trace);
    assert_eq!(hex(&server.trace_id), trace);
    assert_eq!(hex(&client.parent_span_id), app_span);
    assert_eq!(
        server.parent_span_id, client.span_id,
        "server span is the client span's child"
    );
    assert_eq!(client.kind, SpanKind::Client as i32);
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(server.trace_state, "vendor=kept");
    assert!(
        allowed.to_lowercase().contains(&format!(
            "traceparent: 00-{trace}-{}-01",
            hex(&server.span_id)
        )),
        "the app's request carries orders' server span as its parent: {allowed}"
    );
    assert_eq!(attr(&server, "bulkhead.verdict").as_deref(), Some("allow"));
    assert_eq!(
        attr(&server, "bulkhead.policy").as_deref(),
        Some("shop/orders-allow-frontend")
    );
    assert_eq!(
        attr(&server, "bulkhead.rule").as_deref(),
        Some("frontend-reads-orders")
    );
    assert_eq!(
        attr(&server, "bulkhead.source.identity"),
        Some(bulkhead_testkit::mesh::id("frontend"))
    );
    assert_eq!(
        attr(&client, "bulkhead.destination.identity"),
        Some(bulkhead_testkit::mesh::id("orders"))
    );
    assert_eq!(
        attr(&server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(&server, "bulkhead.revision").as_deref(), Some("1"));
    assert!(server.start_time_unix_nano <= server.end_time_unix_nano);
    assert!(client.start_time_unix_nano <= server.start_time_unix_nano);

    // Denied: a new trace, the denial on orders' server span, the 403 on both.
    let client = find("frontend", "/admin");
    let server = find("orders", "/admin");
    assert_eq!(server.trace_id, client.trace_id);
    assert_ne!(hex(&client.trace_id), trace);
    assert!(
        client.parent_span_id.is_empty(),
        "a new trace starts at the client span"
    );
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(attr(&server, "bulkhead.verdict").as_deref(), Some("deny"));
    assert_eq!(
        attr(&server, "bulkhead.policy").as_deref(),
        Some("(default posture)")
    );
    assert_eq!(
        attr(&server, "http.response.status_code").as_deref(),
        Some("403")
    );
    assert_eq!(
        attr(&client, "http.response.status_code").as_deref(),
        Some("403")
    );
    let status = server.status.clone().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(
        status.message.contains("denied by the mesh"),
        "{}",
        status.message
    );

    // orders' access log (--log-format json): one object per request, in the documented
    // schema, with the trace id.
    let log = procs[1].log_text();
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "bulkhead::access")
        .collect();
    let allowed = lines
        .iter()
        .find(|v| v["path"] == "/orders")
        .unwrap_or_else(|| panic!("no access line for /orders in:\n{log}"));
    for (key, want) in [
        ("direction", json!("inbound")),
        ("protocol", json!("http")),
        ("source", json!(bulkhead_testkit::mesh::id("frontend"))),
        ("destination", json!(bulkhead_testkit::mesh::id("orders"))),
        ("destination_workload", json!("shop/orders")),
        ("method", json!("GET")),
        ("status", json!(200)),
        ("verdict", json!("allow")),
        ("policy", json!("shop/orders-allow-frontend")),
        ("rule", json!("frontend-reads-orders")),
        ("revision", json!(1)),
        ("trace_id", json!(trace)),
        ("message", json!("request")),
    ] {
        assert_eq!(allowed[key], want, "{key} in {allowed}");
    }
    assert!(allowed["duration_ms"].as_f64().is_some(), "{allowed}");
    let denied = lines.iter().find(|v| v["path"] == "/admin").unwrap();
    assert_eq!(denied["verdict"], "deny");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["policy"], "-");
    assert_ne!(denied["trace_id"], "-", "the trace the client span started");
    assert!(
        lines.iter().any(|v| v["path"] == "/admin/*"),
        "paths are logged as templates: {log}"
    );
    assert!(
        lines
            .iter()
            .all(|v| !v["path"].as_str().unwrap().contains("1234567")),
        "an id reached a path field: {log}"
    );
    assert!(
        allowed.get("decision").is_none(),
        "an allow needs no explanation: {allowed}"
    );
    assert!(
        denied["decision"]
            .as_str()
            .unwrap()
            .contains("nearest miss"),
        "a denial is explained: {denied}"
    );

    // Counted on each sidecar.
    for name in ["frontend", "orders"] {
        let admin = addr(&mesh.proxy_ready(name)["admin"]);
        let count = |metric: &str| -> u64 {
            http(admin, "GET", "/metrics")
                .body
                .lines()
                .find(|l| l.starts_with(&format!("{metric} ")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        eventually(WAIT, "the exports counted", || {
            count("bulkhead_trace_spans_exported_total") >= 2
        });
        assert_eq!(count("bulkhead_trace_spans_dropped_total"), 0, "{name}");
    }

    // The control plane: the apply call, the commit under it, and the push of the revision
    // to orders' proxy under the commit, ended by its ACK.
    mesh.apply(
        "more.yaml",
        "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: health, namespace: shop}\nspec:\n  selector: {workload: orders}\n  action: allow\n  rules:\n    - name: health\n      from: {identities: [\"spiffe://test.local/ns/shop/sa/frontend\"]}\n      to: {methods: [GET], paths: [/health]}\n",
    );
    let control = || {
        all_spans()
            .into_iter()
            .filter(|(service, _)| service == "bulkhead-control")
            .map(|(_, span)| span)
            .collect::<Vec<_>>()
    };
    let named = |spans: &[opentelemetry_proto::tonic::trace::v1::Span], name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let orders_push = |spans: &[opentelemetry_proto::tonic::trace::v1::Span]| {
        named(spans, "push revision 2")
            .into_iter()
            .find(|s| attr(s, "bulkhead.workload").as_deref() == Some("shop/orders"))
    };
    eventually(WAIT, "the push of revision 2 to orders answered", || {
        orders_push(&control()).is_some()
    });
    let spans = control();
    let commit = named(&spans, "commit revision 2")
        .pop()
        .expect("a commit span");
    let apply = spans
        .iter()
        .find(|s| s.span_id == commit.parent_span_id)
        .expect("the commit's parent is sent");
    assert_eq!(apply.name, "bulkhead.v1.Admin/Apply");
    assert_eq!(apply.kind, SpanKind::Server as i32);
    assert_eq!(attr(apply, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert!(
        attr(&commit, "bulkhead.action")
            .is_some_and(|a| a.starts_with("apply ") && a.ends_with("more.yaml")),
        "{commit:?}"
    );
    let push = orders_push(&spans).unwrap();
    assert_eq!(push.parent_span_id, commit.span_id);
    assert_eq!(push.trace_id, apply.trace_id);
    assert_eq!(
        attr(&push, "bulkhead.workload").as_deref(),
        Some("shop/orders")
    );
    assert_eq!(attr(&push, "bulkhead.result").as_deref(), Some("ack"));
    assert!(push.end_time_unix_nano >= push.start_time_unix_nano);
    // A refused call is an error span.
    let (code, _, _) = mesh.cli(&["rollback", "99"]);
    assert_ne!(code, 0);
    eventually(WAIT, "the refused rollback", || {
        control().iter().any(|s| {
            s.name == "bulkhead.v1.Admin/Rollback"
                && attr(s, "rpc.grpc.status_code").as_deref() == Some("5")
                && s.status
                    .as_ref()
                    .is_some_and(|st| st.code == StatusCode::Error as i32)
        })
    });
}

#[test]
fn a_dead_trace_collector_drops_spans_not_requests() {
    // Nothing listens there: every export fails.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{dead}");
    let mesh = Mesh::start();
    mesh.apply("policy.yaml", &orders_policy("/orders"));
    let traced = ["--otlp-endpoint", endpoint.as_str()];
    let (_procs, to_orders) = mesh.orders_and_frontend_with(&traced, &traced);
    for _ in 0..50 {
        assert_eq!(http(to_orders, "GET", "/orders").status, 200);
    }
    let admin = addr(&mesh.proxy_ready("frontend")["admin"]);
    eventually(WAIT, "the dropped spans counted", || {
        http(admin, "GET", "/metrics")
            .body
            .lines()
            .find(|l| l.starts_with("bulkhead_trace_spans_dropped_total "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n >= 50)
    });
}
