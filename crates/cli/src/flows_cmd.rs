//! See and adapt (issue #7): the verbs over the traffic edges the sidecars report.
//!
//! - `graph`: who called whom, on which port, and what was decided (table, DOT, JSON);
//! - `recommend`: least-privilege policy from what was observed, in audit mode, with its
//!   evidence, or (`--diff`) what changed since the recommendation now applied;
//! - `impact -f CANDIDATE`: the observed flows whose verdict the candidate would change;
//! - `promote KIND/NS/NAME`: audit → enforce, refused while it had would-deny flows (the
//!   control plane decides and commits it: `Admin.Promote`).

use crate::admin_cmd::{ChangeOptions, applied, request, wait_if_asked};
use crate::client;
use anyhow::{Context, Result};
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::{ListEdgesRequest, PromoteRequest};
use bulkhead_insight::{Edge, RecommendOptions};
use bulkhead_policy::PolicySet;
use bulkhead_policy::model::Resource;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

type Admin = AdminClient<Channel>;

/// The stored edges last seen within `window` (all kept edges without one).
pub(crate) async fn edges(admin: &mut Admin, window: Option<Duration>) -> Result<Vec<Edge>> {
    edges_after(admin, crate::since(window)).await
}

/// The stored edges last seen at or after `since` (unix seconds).
pub(crate) async fn edges_after(admin: &mut Admin, since: u64) -> Result<Vec<Edge>> {
    let mut chunks = admin
        .list_edges(request(ListEdgesRequest { since }))
        .await
        .map_err(client::status)?
        .into_inner();
    let mut edges = Vec::new();
    let mut missing = Vec::new();
    while let Some(chunk) = chunks.message().await.map_err(client::status)? {
        let part: Vec<Edge> = serde_json::from_str(&chunk.edges_json)
            .context("the control plane sent edges this CLI cannot read (versions differ?)")?;
        edges.extend(part.into_iter().filter(|e| e.stats.last_seen >= since));
        missing = chunk.missing_replicas;
    }
    for m in &missing {
        eprintln!(
            "warning: replica {m}: the edges its proxies reported are not included; ask again, or ask that replica"
        );
    }
    Ok(edges)
}

fn compile(resources: &[Resource], what: &str) -> Result<PolicySet> {
    PolicySet::compile(resources, 0).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{what} does not compile:\n{}", text.join("\n"))
    })
}

/// One line of the graph: calls from one party to one workload's port.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct GraphEdge {
    source: String,
    destination: String,
    port: u16,
    protocol: String,
    /// Which sidecar's view this is: ingress (the destination's) when it reported the pair.
    decided: String,
    allowed: u64,
    denied: u64,
    would_deny: u64,
    would_allow: u64,
    last_seen: String,
}

pub async fn graph(
    admin: &mut Admin,
    window: Option<Duration>,
    namespace: Option<&str>,
    output: &str,
) -> Result<()> {
    let edges = edges(admin, window).await?;
    let (resources, _) = applied(admin, "").await?;
    let mut lines = graph_lines(&edges, &resources);
    if let Some(ns) = namespace {
        // `namespace/workload` names; a caller known only by its SPIFFE ID is in no namespace.
        let in_ns = |name: &str| name.split_once('/').is_some_and(|(n, _)| n == ns);
        lines.retain(|g| in_ns(&g.source) || in_ns(&g.destination));
    }
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&lines)?),
        "dot" => print!("{}", graph_dot(&lines)),
        _ => print!("{}", graph_table(&lines, edges.len())),
    }
    Ok(())
}

/// The graph's lines: one per caller, destination and port, from the destination sidecar's
/// view where it reported the pair (`bulkhead_insight::graph_lines`, which the console
/// draws too).
pub(crate) fn graph_lines(edges: &[Edge], resources: &[Resource]) -> Vec<GraphEdge> {
    bulkhead_insight::graph_lines(edges, resources)
        .into_iter()
        .map(|g| GraphEdge {
            source: g.source,
            destination: g.destination,
            port: g.port,
            protocol: g.protocol,
            decided: g.decided,
            allowed: g.allowed,
            denied: g.denied,
            would_deny: g.would_deny,
            would_allow: g.would_allow,
            last_seen: bulkhead_insight::rfc3339(g.last_seen),
        })
        .collect()
}

fn graph_dot(lines: &[GraphEdge]) -> String {
    let mut out = String::from("digraph mesh {\n  rankdir=LR;\n  node [shape=box];\n");
    for g in lines {
        let color = if g.denied > 0 {
            "red"
        } else if g.would_deny > 0 {
            "orange"
        } else {
            "black"
        };
        let would_deny = match g.would_deny {
            0 => String::new(),
            n => format!(" would-deny {n}"),
        };
        out.push_str(&format!(
            "  \"{}\" -> \"{}\" [label=\"{}/{} allow {} deny {}{would_deny}\", color={color}];\n",
            g.source, g.destination, g.port, g.protocol, g.allowed, g.denied,
        ));
    }
    out.push_str("}\n");
    out
}

/// The graph for a person; `records` is how many stored edge records it was drawn from.
pub(crate) fn graph_table(lines: &[GraphEdge], records: usize) -> String {
    let row = |cells: [&str; 8]| {
        format!(
            "{:<28} {:<24} {:>6} {:<6} {:>8} {:>7} {:>10}  {}\n",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
        )
    };
    let mut out = row([
        "SOURCE",
        "DESTINATION",
        "PORT",
        "PROTO",
        "ALLOWED",
        "DENIED",
        "WOULD-DENY",
        "LAST SEEN",
    ]);
    for g in lines {
        out.push_str(&row([
            &g.source,
            &g.destination,
            &g.port.to_string(),
            &g.protocol,
            &g.allowed.to_string(),
            &g.denied.to_string(),
            &g.would_deny.to_string(),
            &g.last_seen,
        ]));
    }
    out.push_str(&format!(
        "{} edges from {records} reported edge records\n",
        lines.len()
    ));
    out
}

pub async fn recommend(
    admin: &mut Admin,
    window: Option<Duration>,
    namespace: Option<&str>,
    diff: bool,
) -> Result<()> {
    let mut edges = edges(admin, window).await?;
    let (mut resources, _) = applied(admin, "").await?;
    if let Some(ns) = namespace {
        // A recommendation is for the workloads that received the traffic: only theirs.
        edges.retain(|e| e.key.destination.namespace == ns);
    }
    let mut rec = bulkhead_insight::recommend(&edges, &resources, &RecommendOptions::default());
    if let Some(ns) = namespace {
        rec.postures.retain(|p| p.namespace.as_str() == ns);
        // Compared with what is applied in that namespace only, so the others' applied
        // recommendations do not show as removed.
        resources.retain(|r| r.name().namespace == ns);
    }
    if diff {
        print!("{}", bulkhead_insight::diff(&resources, &rec));
    } else {
        print!("{}", rec.to_yaml());
    }
    Ok(())
}

pub async fn impact(
    admin: &mut Admin,
    files: &[PathBuf],
    window: Option<Duration>,
    fail_on_new_deny: bool,
) -> Result<()> {
    let mut changes = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        changes.extend(bulkhead_policy::parse_documents(
            &f.display().to_string(),
            &text,
        )?);
    }
    let edges = edges(admin, window).await?;
    let (resources, revision) = applied(admin, "").await?;
    let current = compile(&resources, "the applied set")?;
    let merged = bulkhead_insight::apply(&resources, &changes);
    // "What if I enforce this": audit policies and postures of the result count as enforced.
    let candidate = compile(
        &bulkhead_insight::enforce_all(&merged),
        "the applied set with the candidate",
    )?;
    let impact = bulkhead_insight::impact(&edges, &current, &candidate, &merged);
    println!(
        "Replaying observed flows against revision {revision} and against it with {} enforced:",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    print!("{impact}");
    let newly_denied = impact.newly_denied().count();
    if fail_on_new_deny && newly_denied > 0 {
        anyhow::bail!(
            "{newly_denied} observed flow(s) allowed today would be denied (--fail-on-new-deny)"
        );
    }
    Ok(())
}

/// `Kind/namespace/name`, or `namespace/name` for an AuthorizationPolicy.
fn resource_key(s: &str) -> String {
    if s.matches('/').count() >= 2 {
        s.to_string()
    } else {
        format!("AuthorizationPolicy/{s}")
    }
}

/// Enforces an audit policy or posture: the control plane checks its would-deny flows and
/// commits it in one revision (`Admin.Promote`); this only says what it did.
pub async fn promote(
    admin: &mut Admin,
    target: &str,
    window: Duration,
    force: bool,
    opts: ChangeOptions,
) -> Result<()> {
    let key = resource_key(target);
    let resp = admin
        .promote(request(PromoteRequest {
            key: key.clone(),
            window_seconds: window.as_secs(),
            force,
            expect_revision: opts.expect_revision,
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    if !resp.forced_over.is_empty() {
        eprintln!("{}\n--force: enforcing it anyway", resp.forced_over);
    }
    let result = resp.result.unwrap_or_default();
    println!("{key} is enforced (revision {})", result.revision);
    wait_if_asked(admin, &result, opts.wait).await
}
