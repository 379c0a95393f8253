//! `bulkhead demo`: a shop of three services on loopback, each behind its own sidecar. First
//! in discovery mode (mTLS everywhere, every authenticated caller let in): a compromised
//! frontend moves laterally unhindered, and the service graph and its blast radius show it.
//! Then with a least-privilege policy: legitimate traffic still flows, the lateral requests
//! are stopped with every verdict explained, and the graph and the blast radius shrink.
//!
//! Everything is real and in this one process: the control plane and its CA, TLS 1.3 mTLS
//! between sidecars, the policy push, the apps. The web console is served on loopback for as
//! long as the demo runs; it prints the address to open.

use crate::client;
use anyhow::{Context, Result, bail};
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::{ApplyRequest, CreateTokenRequest, DeleteRequest};
use bulkhead_policy::model::Resource;
use bulkhead_proxy::config::InboundSpec;
use bulkhead_proxy::{Config, UpstreamSpec};
use bulkhead_sample_app::{self as sample_app, AppSpec};
use http::{Method, StatusCode, Uri};
use std::net::SocketAddr;
use std::time::Duration;

const TRUST_DOMAIN: &str = "bulkhead.local";
const LOOPBACK_ANY: &str = "127.0.0.1:0";
/// Every demo app is declared on port 8080 (examples/shop.yaml); the sidecars map the apps'
/// ephemeral loopback ports to it.
const DECLARED_PORT: u16 = 8080;

type Admin = AdminClient<tonic::transport::Channel>;

/// The demo's policy; the same file serves as the README's example.
pub const POLICY: &str = include_str!("../../../examples/shop.yaml");

struct Mesh {
    frontend_app: SocketAddr,
    frontend_to_orders: SocketAddr,
    frontend_to_payments: SocketAddr,
}

/// One request of a round and the verdict it should get.
struct Call {
    who: &'static str,
    method: Method,
    target: &'static str,
    path: &'static str,
    expect: StatusCode,
}

pub async fn run(once: bool) -> Result<()> {
    crate::init_logging("warn");
    let dir = std::env::temp_dir().join(format!("bulkhead-demo-{}", std::process::id()));
    let result = run_in(&dir, once).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, once: bool) -> Result<()> {
    println!(
        "Bulkhead demo: three services on loopback, each behind its own sidecar; mTLS (TLS 1.3, SPIFFE IDs) on every hop.\n"
    );
    // The console on loopback over plain HTTP, so that a browser opens it without a
    // certificate warning (`--console-insecure-http`; docs/console.md).
    let console = bulkhead_control::ConsoleOptions {
        listen: LOOPBACK_ANY.parse()?,
        transport: bulkhead_control::ConsoleTransport::InsecureHttpOnLoopback,
        hosts: Vec::new(),
    };
    let control = bulkhead_control::start_with(
        bulkhead_control::ControlConfig {
            data_dir: dir.to_path_buf(),
            listen: LOOPBACK_ANY.parse()?,
            trust_domain: TRUST_DOMAIN.into(),
            svid_lifetime: bulkhead_identity::DEFAULT_SVID_LIFETIME,
        },
        bulkhead_control::ControlOptions {
            console: Some(console),
            ..Default::default()
        },
    )
    .await?;
    println!(
        "  control plane  {}  trust domain {TRUST_DOMAIN}, new root CA in {}",
        control.addr,
        dir.display()
    );
    let mut admin = client::admin(&control.context_file).await?;
    let login = admin
        .create_console_token(crate::admin_cmd::request(
            bulkhead_api::v1::CreateConsoleTokenRequest::default(),
        ))
        .await
        .map_err(client::status)?
        .into_inner();
    println!(
        "  web console    {}  open this address to log in (once, within 15 minutes; then\n                 BULKHEAD_CONTEXT={} bulkhead console token)",
        login.login_url,
        control.context_file.display()
    );
    apply(&mut admin, "demo-discovery.yaml", &discovery_set()?).await?;
    let bundle = std::fs::read_to_string(dir.join("ca.pem"))?;
    let mesh = start_mesh(&mut admin, control.addr, &bundle).await?;

    println!(
        "\n== Before: discovery mode. Every hop is mTLS, but there is no least-privilege policy yet:\n   the shop namespace's DefaultPosture lets every authenticated caller in."
    );
    let before = crate::unix_now();
    run_round(&mesh, Phase::Before, true).await?;
    show_graph(&mut admin, before).await?;
    show_blast_radius(&control.context_file).await?;

    // The graph after the policy shows only requests made after it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = crate::unix_now();
    let revision = apply(&mut admin, "demo-policy.yaml", POLICY).await?;
    let revision = admin
        .delete(crate::admin_cmd::request(DeleteRequest {
            keys: vec![format!("DefaultPosture/shop/{DISCOVERY}")],
            expect_revision: None,
        }))
        .await
        .map_err(client::status)?
        .into_inner()
        .revision
        .max(revision);
    println!(
        "\n== After: least-privilege policy (examples/shop.yaml) applied and the discovery posture deleted (revision {revision}):"
    );
    println!(
        "  shop/orders-allow-frontend   allow  frontend -> orders    GET, POST /orders, /orders/*"
    );
    println!("  shop/payments-allow-orders   allow  orders   -> payments  POST /charge");
    println!("  shop/payments-deny-admin     deny   anyone   -> payments  /admin, /admin/*");
    println!("  everything else              denied by default");
    let ok = run_round(&mesh, Phase::After, true).await?;
    show_graph(&mut admin, after).await?;
    show_blast_radius(&control.context_file).await?;
    println!(
        "  payments is two hops away now: reachable only by compromising orders as well, and then only POST /charge."
    );
    println!(
        "\nThe compromised frontend reached nothing its policy does not grant; every denial names the rule, or the nearest miss."
    );
    if once {
        if !ok {
            bail!("some verdicts were not as expected (see above)");
        }
        return Ok(());
    }
    println!(
        "\nRepeating the same traffic every 5 s; the console at {} follows it live. Ctrl-C to stop.",
        login.console_url
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { println!(); return Ok(()); }
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        run_round(&mesh, Phase::After, false).await?;
    }
}

/// The name of the demo's discovery-mode DefaultPosture.
const DISCOVERY: &str = "discovery";

/// The shop's Workloads from the example policy, and a namespace posture that allows every
/// authenticated caller in: where a mesh starts before least privilege.
fn discovery_set() -> Result<String> {
    let resources = bulkhead_policy::parse_documents("examples/shop.yaml", POLICY)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut yaml = String::new();
    for r in resources
        .iter()
        .filter(|r| matches!(r, Resource::Workload(_)))
    {
        yaml.push_str("---\n");
        yaml.push_str(&r.to_yaml().map_err(|e| anyhow::anyhow!(e))?);
    }
    yaml.push_str(&format!(
        "---\napiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {{name: {DISCOVERY}, namespace: shop}}\nspec:\n  ingress: allow\n"
    ));
    Ok(yaml)
}

async fn apply(admin: &mut Admin, file: &str, yaml: &str) -> Result<u64> {
    Ok(admin
        .apply(crate::admin_cmd::request(ApplyRequest {
            file: file.into(),
            yaml: yaml.into(),
            expect_revision: None,
            ..Default::default()
        }))
        .await
        .map_err(client::status)?
        .into_inner()
        .revision)
}

/// Requests through sidecars per round, each decided at its destination's sidecar: orders
/// and payments behind the checkout, the frontend's read, and three lateral attempts.
const DECIDED_PER_ROUND: u64 = 6;

/// The service graph as the sidecars reported it, from requests since `since`.
async fn show_graph(admin: &mut Admin, since: u64) -> Result<()> {
    // Sidecars report every 2 s: wait for this round's requests to be in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let edges = loop {
        let edges = crate::flows_cmd::edges_after(admin, since).await?;
        let decided: u64 = edges
            .iter()
            .filter(|e| e.key.direction == bulkhead_policy::model::Direction::Ingress)
            .map(|e| e.stats.count)
            .sum();
        if decided >= DECIDED_PER_ROUND || tokio::time::Instant::now() > deadline {
            break edges;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (resources, _) = crate::admin_cmd::applied(admin, "").await?;
    let lines = crate::flows_cmd::graph_lines(&edges, &resources);
    println!("\nService graph, as the sidecars reported it (bulkhead graph):");
    print!(
        "{}",
        indent(&crate::flows_cmd::graph_table(&lines, edges.len()))
    );

    let edges = bulkhead_insight::with_declared_callers(edges, &resources);
    let frontend =
        bulkhead_policy::model::parse_workload("shop/frontend").map_err(anyhow::Error::msg)?;
    let window = bulkhead_insight::Window {
        since,
        until: u64::MAX,
    };
    let reached: Vec<String> = bulkhead_insight::observed_reach(&edges, &frontend, window)
        .iter()
        .map(|r| {
            let hops = if r.hops == 1 { "hop" } else { "hops" };
            format!("{} ({} {hops})", r.party, r.hops)
        })
        .collect();
    println!(
        "\nBlast radius of the frontend in observed traffic, hop by hop over requests that got through\n(bulkhead reach shop/frontend --blast-radius --observed):\n  {}",
        match reached.is_empty() {
            true => "nothing".to_string(),
            false => reached.join(", "),
        }
    );
    Ok(())
}

async fn show_blast_radius(context: &std::path::Path) -> Result<()> {
    println!(
        "\nBlast radius of a compromised frontend, from policy (bulkhead reach shop/frontend --blast-radius):"
    );
    let table = crate::reach_cmd::blast_radius_table(context, "shop/frontend").await?;
    print!("{}", indent(&table));
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

async fn start_mesh(admin: &mut Admin, control: SocketAddr, bundle: &str) -> Result<Mesh> {
    let id = |sa: &str| format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{sa}");
    let any: SocketAddr = LOOPBACK_ANY.parse()?;

    // payments: an app and its sidecar's inbound.
    let payments_app = sample_app::bind(any).await?;
    let payments_app_addr = payments_app.local_addr()?;
    sample_app::serve(
        AppSpec {
            tcp_echo: false,
            name: "payments".into(),
            downstream: None,
        },
        payments_app,
    )?;
    let payments = sidecar(
        admin,
        control,
        bundle,
        &id("payments"),
        Some(payments_app_addr),
        vec![],
    )
    .await?;
    let payments_in = payments.inbound.context("payments inbound")?;

    // orders: calls payments through its sidecar's upstream port.
    let orders_app = sample_app::bind(any).await?;
    let orders_app_addr = orders_app.local_addr()?;
    let orders = sidecar(
        admin,
        control,
        bundle,
        &id("orders"),
        Some(orders_app_addr),
        vec![upstream("payments", payments_in, &id("payments"))?],
    )
    .await?;
    let orders_in = orders.inbound.context("orders inbound")?;
    let to_payments = orders.upstreams["payments"];
    sample_app::serve(
        AppSpec {
            tcp_echo: false,
            name: "orders".into(),
            downstream: Some(format!("http://{to_payments}/charge").parse()?),
        },
        orders_app,
    )?;

    // frontend: calls orders; its sidecar also has a payments upstream, which a compromised
    // frontend will try to abuse.
    let frontend_app = sample_app::bind(any).await?;
    let frontend_app_addr = frontend_app.local_addr()?;
    let frontend = sidecar(
        admin,
        control,
        bundle,
        &id("frontend"),
        Some(frontend_app_addr),
        vec![
            upstream("orders", orders_in, &id("orders"))?,
            upstream("payments", payments_in, &id("payments"))?,
        ],
    )
    .await?;
    let to_orders = frontend.upstreams["orders"];
    sample_app::serve(
        AppSpec {
            tcp_echo: false,
            name: "frontend".into(),
            downstream: Some(format!("http://{to_orders}/orders").parse()?),
        },
        frontend_app,
    )?;

    for (name, app, running) in [
        ("frontend", frontend_app_addr, &frontend),
        ("orders", orders_app_addr, &orders),
        ("payments", payments_app_addr, &payments),
    ] {
        let inbound = running.inbound.map(|a| a.to_string()).unwrap_or_default();
        println!(
            "  {name:<9}      {}  app {app}, sidecar inbound {inbound}",
            running.spiffe_id
        );
    }
    Ok(Mesh {
        frontend_app: frontend_app_addr,
        frontend_to_orders: to_orders,
        frontend_to_payments: frontend.upstreams["payments"],
    })
}

fn upstream(name: &str, address: SocketAddr, identity: &str) -> Result<UpstreamSpec> {
    format!("name={name},listen={LOOPBACK_ANY},address={address},identity={identity},port={DECLARED_PORT},workload=shop/{name}")
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))
}

async fn sidecar(
    admin: &mut Admin,
    control: SocketAddr,
    bundle: &str,
    identity: &str,
    app: Option<SocketAddr>,
    upstreams: Vec<UpstreamSpec>,
) -> Result<bulkhead_proxy::Running> {
    let token = admin
        .create_token(CreateTokenRequest {
            spiffe_id: identity.into(),
            ..Default::default()
        })
        .await
        .map_err(client::status)?
        .into_inner()
        .token;
    let running = bulkhead_proxy::start(Config {
        control: control.into(),
        trust_bundle_pem: bundle.to_string(),
        token: bulkhead_proxy::config::JoinToken(token),
        service_account_token_file: None,
        identity: Some(bulkhead_identity::SpiffeId::parse(identity)?),
        inbound: app.map(|app| InboundSpec {
            listen: LOOPBACK_ANY.parse().expect("literal address"),
            target: bulkhead_proxy::config::InboundTarget::App {
                app,
                port: DECLARED_PORT,
            },
            permissive_ports: Vec::new(),
        }),
        upstreams,
        outbound: None,
        ready_file: None,
        admin: None,
        traces: None,
        credential_file: None,
        workload_api: None,
        first_config_wait: Duration::from_secs(10),
        max_policy_rules: 100_000,
        flow_interval: Duration::from_secs(2),
        limits: bulkhead_proxy::Limits::default(),
    })
    .await?;
    Ok(running)
}

/// Before the least-privilege policy, or after it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    After,
}

async fn run_round(mesh: &Mesh, phase: Phase, verbose: bool) -> Result<bool> {
    let legit = [
        Call {
            who: "customer -> frontend",
            method: Method::POST,
            target: "frontend-app",
            path: "/checkout",
            expect: StatusCode::OK,
        },
        Call {
            who: "frontend -> orders",
            method: Method::GET,
            target: "orders",
            path: "/orders",
            expect: StatusCode::OK,
        },
    ];
    let attack = [
        Call {
            who: "frontend -> payments",
            method: Method::POST,
            target: "payments",
            path: "/charge",
            expect: StatusCode::FORBIDDEN,
        },
        Call {
            who: "frontend -> payments",
            method: Method::GET,
            target: "payments",
            path: "/admin/users",
            expect: StatusCode::FORBIDDEN,
        },
        Call {
            who: "frontend -> orders",
            method: Method::DELETE,
            target: "orders",
            path: "/orders/42",
            expect: StatusCode::FORBIDDEN,
        },
    ];
    let mut ok = true;
    let (mut allowed, mut denied) = (0, 0);
    let attack_title = match phase {
        Phase::Before => "A compromised frontend tries to move laterally, and nothing stops it",
        Phase::After => "A compromised frontend tries to move laterally",
    };
    for (title, calls) in [
        ("Legitimate traffic", &legit[..]),
        (attack_title, &attack[..]),
    ] {
        if verbose {
            println!("\n{title}:");
        }
        for call in calls {
            let addr = match call.target {
                "frontend-app" => mesh.frontend_app,
                "orders" => mesh.frontend_to_orders,
                _ => mesh.frontend_to_payments,
            };
            let uri: Uri = format!("http://{addr}{}", call.path).parse()?;
            let (status, body, headers) = sample_app::request(call.method.clone(), &uri).await?;
            if status.is_success() {
                allowed += 1;
            } else {
                denied += 1;
            }
            let expect = match phase {
                Phase::Before => StatusCode::OK,
                Phase::After => call.expect,
            };
            let as_expected = status == expect;
            ok &= as_expected;
            if verbose || !as_expected {
                let detail = phase == Phase::After || !as_expected;
                let mark = match (status.is_success(), as_expected) {
                    (_, false) => "UNEXPECTED",
                    (true, true) => "ALLOWED",
                    (false, true) => "DENIED",
                };
                println!(
                    "  {mark:<8} {} {} {}  -> {}",
                    call.who,
                    call.method,
                    call.path,
                    status.as_u16()
                );
                if let Some(d) = headers
                    .get("x-bulkhead-decision")
                    .and_then(|v| v.to_str().ok())
                {
                    println!("           decision: {d}");
                }
                if detail {
                    for line in body.lines() {
                        println!("           {}", line.trim_start_matches("bulkhead: "));
                    }
                }
            }
        }
    }
    if verbose {
        println!("\n{allowed} allowed, {denied} denied.");
    } else {
        println!(
            "  round: {allowed} allowed, {denied} denied{}",
            if ok {
                ""
            } else {
                " (UNEXPECTED verdicts above)"
            }
        );
    }
    Ok(ok)
}
