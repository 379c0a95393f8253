//! `bulkhead tap WORKLOAD`: the requests a workload's sidecars decide, live, with their
//! verdicts and the rule behind each. Filters run in the sidecars, so only matching
//! requests leave them; nothing is stored.

use crate::admin_cmd::request;
use crate::client;
use anyhow::{Context, Result, bail};
use bulkhead_api::v1::TapRequest;
use bulkhead_insight::tap::{TapEvent, TapFilter, VerdictFilter};
use bulkhead_policy::model::{Direction, WorkloadRef, parse_workload};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct TapArgs {
    /// The workload whose sidecars to tap, as namespace/name.
    workload: String,
    /// Only requests from this caller: a SPIFFE ID, or a workload as namespace/name.
    #[arg(long)]
    from: Option<String>,
    /// Only requests to this workload (namespace/name); the tapped workload's own outbound
    /// requests name their destination here.
    #[arg(long)]
    to: Option<String>,
    /// Only requests with this HTTP method.
    #[arg(long)]
    method: Option<String>,
    /// Only paths at or below this prefix (`/orders` matches `/orders/7`).
    #[arg(long)]
    path: Option<String>,
    /// Only this outcome: allow, deny, would-deny (allowed; an audit policy would deny) or
    /// would-allow.
    #[arg(long, value_parser = ["allow", "deny", "would-deny", "would-allow"])]
    verdict: Option<String>,
    /// Only requests the workload received (in) or sent (out).
    #[arg(long, value_parser = ["in", "out"])]
    direction: Option<String>,
    /// Stop after this many requests.
    #[arg(short = 'n', long)]
    max: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long = "for", value_parser = crate::parse_duration)]
    duration: Option<Duration>,
    /// table: one line per request; json: one JSON object per line.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

impl TapArgs {
    fn filter(&self) -> Result<TapFilter> {
        if let Some(to) = &self.to {
            parse_workload(to).map_err(anyhow::Error::msg)?;
        }
        if let Some(p) = &self.path
            && !p.starts_with('/')
        {
            bail!("--path {p:?} must start with '/'");
        }
        Ok(TapFilter {
            from: self.from.clone(),
            to: self.to.clone(),
            method: self.method.as_ref().map(|m| m.to_ascii_uppercase()),
            path: self.path.clone(),
            verdict: self.verdict.as_deref().and_then(VerdictFilter::parse),
            direction: self.direction.as_deref().map(|d| match d {
                "out" => Direction::Egress,
                _ => Direction::Ingress,
            }),
        })
    }
}

pub async fn run(context: &Path, args: TapArgs) -> Result<()> {
    let workload = parse_workload(&args.workload).map_err(anyhow::Error::msg)?;
    let mut filter = args.filter()?;
    let mut admin = client::admin(context).await?;
    // A sidecar knows its caller by SPIFFE ID; name callers by their declared workloads.
    let (resources, _) = crate::admin_cmd::applied(&mut admin, "").await?;
    let by_identity = bulkhead_insight::identities(&resources);
    if let Some(from) = &filter.from
        && let Some((id, _)) = by_identity.iter().find(|(_, w)| w.to_string() == *from)
    {
        filter.from = Some(id.clone());
    }
    let mut stream = admin
        .tap(request(TapRequest {
            namespace: workload.namespace.clone(),
            workload: workload.name.clone(),
            filter_json: serde_json::to_string(&filter)?,
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let until_deadline = || async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let mut shown = 0u64;
    let mut first = true;
    let mut out = std::io::stdout().lock();
    loop {
        let message = tokio::select! {
            m = stream.message() => m.map_err(client::status)?,
            _ = until_deadline() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(message) = message else {
            bail!("the control plane ended the tap");
        };
        if first {
            first = false;
            match message.proxies_connected {
                0 => eprintln!(
                    "tapping {workload}: no sidecar of it is connected now; waiting for one (Ctrl-C to stop)"
                ),
                n => eprintln!(
                    "tapping {workload} ({n} sidecar{} connected; Ctrl-C to stop)",
                    if n == 1 { "" } else { "s" }
                ),
            }
        }
        if message.skipped > 0 {
            eprintln!(
                "… {} matching requests not shown (each sidecar sends at most 100 a second, and this terminal may be slower than the traffic)",
                message.skipped
            );
        }
        let events: Vec<TapEvent> = serde_json::from_str(&message.events_json)
            .context("the control plane sent tap events this CLI cannot read (versions differ?)")?;
        for e in &events {
            match args.output.as_str() {
                "json" => {
                    let mut v = serde_json::to_value(e)?;
                    crate::jsonstyle::times(&mut v, &[], &[("atMillis", "at")]);
                    writeln!(out, "{}", serde_json::to_string(&v)?)?
                }
                _ => writeln!(out, "{}", line(e, &by_identity))?,
            }
            shown += 1;
            if args.max.is_some_and(|m| shown >= m) {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
    }
}

/// `10:42:01.123  in   frontend(spiffe://…) -> shop/orders:8080  GET /orders/7  403  deny  built-in  0.3 ms`
fn line(e: &TapEvent, by_identity: &BTreeMap<String, WorkloadRef>) -> String {
    let time = bulkhead_insight::rfc3339(e.at_millis / 1000);
    let clock = time.get(11..19).unwrap_or(&time);
    let direction = match e.direction {
        Direction::Ingress => "in ",
        Direction::Egress => "out",
    };
    let caller = bulkhead_insight::caller_name(
        e.source_workload.as_ref(),
        e.source_identity.as_deref(),
        by_identity,
    );
    let what = match (&e.method, &e.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        _ => e.protocol.as_str().to_string(),
    };
    let mut status = e.status.map_or_else(|| "-".to_string(), |s| s.to_string());
    if let Some(grpc) = e.grpc_status {
        status.push_str(&format!(" grpc-status {grpc}"));
    }
    let by = match (&e.policy, &e.rule) {
        (Some(p), Some(r)) => format!("{p} rule {r}"),
        (Some(p), None) => p.clone(),
        _ => "-".to_string(),
    };
    format!(
        "{clock}.{:03}  {direction}  {caller} -> {}:{}  {what}  {status}  {}  {by}  {:.1} ms",
        e.at_millis % 1000,
        e.destination,
        e.port,
        e.verdict,
        e.latency_micros as f64 / 1000.0
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_insight::EdgeVerdict;
    use bulkhead_policy::Protocol;
    use bulkhead_policy::model::ResourceName;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tap: TapArgs,
    }

    fn filter(args: &[&str]) -> Result<TapFilter> {
        let cli = Cli::try_parse_from(std::iter::once("tap").chain(args.iter().copied()))?;
        cli.tap.filter()
    }

    #[test]
    fn flags_become_a_filter() {
        let f = filter(&[
            "shop/orders",
            "--method",
            "delete",
            "--verdict",
            "would-deny",
            "--direction",
            "out",
            "--to",
            "shop/payments",
        ])
        .unwrap();
        assert_eq!(f.method.as_deref(), Some("DELETE"));
        assert_eq!(f.verdict, Some(VerdictFilter::WouldDeny));
        assert_eq!(f.direction, Some(Direction::Egress));
        assert!(
            filter(&["shop/orders", "--to", "payments"])
                .unwrap_err()
                .to_string()
                .contains("is not a workload")
        );
        assert!(
            filter(&["shop/orders", "--path", "orders"])
                .unwrap_err()
                .to_string()
                .contains("must start with '/'")
        );
        assert!(filter(&["shop/orders", "--verdict", "maybe"]).is_err());
    }

    #[test]
    fn a_line_says_who_what_and_why() {
        let e = TapEvent {
            at_millis: 1_700_000_000_123,
            direction: Direction::Ingress,
            source_identity: Some("spiffe://t/ns/shop/sa/frontend".parse().unwrap()),
            source_workload: None,
            destination: ResourceName {
                namespace: "shop".into(),
                name: "orders".into(),
            },
            port: 8080,
            protocol: Protocol::Http,
            method: Some("DELETE".into()),
            path: Some("/orders/7".into()),
            status: Some(403),
            grpc_status: None,
            verdict: EdgeVerdict::Deny,
            policy: Some("built-in".into()),
            rule: None,
            latency_micros: 250,
        };
        assert_eq!(
            line(&e, &BTreeMap::new()),
            "22:13:20.123  in   spiffe://t/ns/shop/sa/frontend -> shop/orders:8080  DELETE /orders/7  403  deny  built-in  0.2 ms"
        );
        let known = BTreeMap::from([(
            "spiffe://t/ns/shop/sa/frontend".to_string(),
            ResourceName {
                namespace: "shop".into(),
                name: "frontend".into(),
            },
        )]);
        assert!(line(&e, &known).contains("  shop/frontend -> shop/orders:8080  "));

        // A denied gRPC call is HTTP 200; its gRPC status says what happened.
        let grpc = TapEvent {
            protocol: Protocol::Grpc,
            method: Some("POST".into()),
            path: Some("/shop.Orders/Cancel".into()),
            status: Some(200),
            grpc_status: Some(7),
            ..e
        };
        assert!(
            line(&grpc, &known).contains("  POST /shop.Orders/Cancel  200 grpc-status 7  deny  "),
            "{}",
            line(&grpc, &known)
        );
    }
}
