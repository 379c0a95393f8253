//! `bulkhead demo`: a shop of three services on loopback, each behind its own sidecar, with a
//! least-privilege policy; legitimate traffic flows, a compromised frontend tries to move
//! laterally and is stopped, and every verdict is explained.
//!
//! Everything is real and in this one process: the control plane and its CA, TLS 1.3 mTLS
//! between sidecars, the policy push, the apps.

use crate::client;
use crate::sample_app::{self, AppSpec};
use anyhow::{Context, Result, bail};
use bulkhead_api::v1::{ApplyRequest, CreateTokenRequest};
use bulkhead_proxy::config::InboundSpec;
use bulkhead_proxy::{Config, UpstreamSpec};
use http::{Method, StatusCode, Uri};
use std::net::SocketAddr;
use std::time::Duration;

const TRUST_DOMAIN: &str = "bulkhead.local";
const LOOPBACK_ANY: &str = "127.0.0.1:0";
/// Every demo app is declared on port 8080 (examples/shop.yaml); the sidecars map the apps'
/// ephemeral loopback ports to it.
const DECLARED_PORT: u16 = 8080;

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
    let control = bulkhead_control::start(bulkhead_control::ControlConfig {
        data_dir: dir.to_path_buf(),
        listen: LOOPBACK_ANY.parse()?,
        trust_domain: TRUST_DOMAIN.into(),
        svid_lifetime: bulkhead_identity::DEFAULT_SVID_LIFETIME,
    })
    .await?;
    println!(
        "  control plane  {}  trust domain {TRUST_DOMAIN}, new root CA in {}",
        control.addr,
        dir.display()
    );
    let mut admin = client::admin(&control.context_file).await?;
    let applied = admin
        .apply(crate::admin_cmd::request(ApplyRequest {
            file: "demo-policy.yaml".into(),
            yaml: POLICY.into(),
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    let bundle = std::fs::read_to_string(dir.join("ca.pem"))?;

    let mesh = start_mesh(&mut admin, control.addr, &bundle).await?;
    println!("\nPolicy applied (revision {}):", applied.revision);
    println!(
        "  shop/orders-allow-frontend   allow  frontend -> orders    GET, POST /orders, /orders/*"
    );
    println!("  shop/payments-allow-orders   allow  orders   -> payments  POST /charge");
    println!("  shop/payments-deny-admin     deny   anyone   -> payments  /admin, /admin/*");
    println!("  everything else              denied by default");

    let mut round = 1;
    loop {
        let ok = run_round(&mesh, round == 1).await?;
        if once {
            if !ok {
                bail!("some verdicts were not as expected (see above)");
            }
            return Ok(());
        }
        if round == 1 {
            println!("\nRepeating the same traffic every 5 s; Ctrl-C to stop.");
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { println!(); return Ok(()); }
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        round += 1;
        let _ = round;
    }
}

async fn start_mesh(
    admin: &mut bulkhead_api::v1::admin_client::AdminClient<tonic::transport::Channel>,
    control: SocketAddr,
    bundle: &str,
) -> Result<Mesh> {
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
    admin: &mut bulkhead_api::v1::admin_client::AdminClient<tonic::transport::Channel>,
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
        control,
        trust_bundle_pem: bundle.to_string(),
        token: bulkhead_proxy::config::JoinToken(token),
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
        first_config_wait: Duration::from_secs(10),
        max_policy_rules: 100_000,
        flow_interval: Duration::from_secs(2),
        limits: bulkhead_proxy::Limits::default(),
    })
    .await?;
    Ok(running)
}

async fn run_round(mesh: &Mesh, verbose: bool) -> Result<bool> {
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
    for (title, calls) in [
        ("Legitimate traffic", &legit[..]),
        (
            "A compromised frontend tries to move laterally",
            &attack[..],
        ),
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
            let as_expected = status == call.expect;
            ok &= as_expected;
            if verbose || !as_expected {
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
                for line in body.lines() {
                    println!("           {}", line.trim_start_matches("bulkhead: "));
                }
            }
        }
    }
    if verbose {
        println!(
            "\n{allowed} allowed, {denied} denied. The compromised frontend reached nothing its policy does not grant; every denial names the rule, or the nearest miss."
        );
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
