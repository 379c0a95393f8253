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
use bulkhead_insight::{Edge, EdgeVerdict, RecommendOptions};
use bulkhead_policy::PolicySet;
use bulkhead_policy::model::{Direction, Resource, WorkloadRef};
use std::collections::BTreeMap;
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
    while let Some(chunk) = chunks.message().await.map_err(client::status)? {
        let part: Vec<Edge> = serde_json::from_str(&chunk.edges_json)
            .context("the control plane sent edges this CLI cannot read (versions differ?)")?;
        edges.extend(part.into_iter().filter(|e| e.stats.last_seen >= since));
    }
    Ok(edges)
}

fn compile(resources: &[Resource], what: &str) -> Result<PolicySet> {
    PolicySet::compile(resources, 0).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{what} does not compile:\n{}", text.join("\n"))
    })
}

/// Names a caller for people: its workload when known (by edge or by declared identity).
fn caller(e: &Edge, by_identity: &BTreeMap<String, WorkloadRef>) -> String {
    caller_name(
        e.key.source_workload.as_ref(),
        e.key.source_identity.as_deref(),
        by_identity,
    )
}

/// A caller's workload, or the workload that declares its identity, or the identity.
pub(crate) fn caller_name(
    workload: Option<&WorkloadRef>,
    identity: Option<&str>,
    by_identity: &BTreeMap<String, WorkloadRef>,
) -> String {
    match (workload, identity) {
        (Some(w), _) => w.to_string(),
        (None, Some(id)) => by_identity
            .get(id)
            .map_or_else(|| id.to_string(), ToString::to_string),
        (None, None) => "(plaintext)".to_string(),
    }
}

pub(crate) fn identities(resources: &[Resource]) -> BTreeMap<String, WorkloadRef> {
    resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(doc) => match &doc.spec.identity.value {
                bulkhead_policy::IdentityPattern::Exact(id) => Some((id.clone(), r.name())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The edges, each caller known only by its SPIFFE ID named by the Workload that declares
/// that identity (sidecars see identities; workloads are what people reason about).
pub(crate) fn with_declared_callers(edges: Vec<Edge>, resources: &[Resource]) -> Vec<Edge> {
    let by_identity = identities(resources);
    edges
        .into_iter()
        .map(|mut e| {
            if e.key.source_workload.is_none()
                && let Some(w) = e
                    .key
                    .source_identity
                    .as_ref()
                    .and_then(|id| by_identity.get(id))
            {
                e.key.source_workload = Some(w.clone());
            }
            e
        })
        .collect()
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

pub async fn graph(admin: &mut Admin, window: Option<Duration>, output: &str) -> Result<()> {
    let edges = edges(admin, window).await?;
    let (resources, _) = applied(admin, "").await?;
    let lines = graph_lines(&edges, &resources);
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&lines)?),
        "dot" => print!("{}", graph_dot(&lines)),
        _ => print!("{}", graph_table(&lines, edges.len())),
    }
    Ok(())
}

/// The graph's lines: one per caller, destination and port, from the destination sidecar's
/// view where it reported the pair.
pub(crate) fn graph_lines(edges: &[Edge], resources: &[Resource]) -> Vec<GraphEdge> {
    let by_identity = identities(resources);
    // Each call is seen by both sidecars; the destination's (ingress) view is kept, and the
    // source's only where the destination reported nothing for the pair.
    let mut groups: BTreeMap<(String, String, u16, bool), (GraphEdge, u64)> = BTreeMap::new();
    for e in edges {
        let ingress = e.key.direction == Direction::Ingress;
        let k = (
            caller(e, &by_identity),
            e.key.destination.to_string(),
            e.key.port,
            ingress,
        );
        let (g, last) = groups.entry(k.clone()).or_default();
        g.source = k.0;
        g.destination = k.1;
        g.port = k.2;
        g.protocol = e.key.protocol.as_str().to_string();
        g.decided = if ingress { "ingress" } else { "egress" }.into();
        let n = e.stats.count;
        match e.key.verdict {
            EdgeVerdict::Allow => g.allowed += n,
            EdgeVerdict::Deny => g.denied += n,
            EdgeVerdict::AllowWouldDeny => {
                g.allowed += n;
                g.would_deny += n;
            }
            EdgeVerdict::DenyWouldAllow => {
                g.denied += n;
                g.would_allow += n;
            }
        }
        *last = (*last).max(e.stats.last_seen);
    }
    let has_ingress: std::collections::BTreeSet<(String, String, u16)> = groups
        .keys()
        .filter(|k| k.3)
        .map(|k| (k.0.clone(), k.1.clone(), k.2))
        .collect();
    groups
        .into_iter()
        .filter(|(k, _)| k.3 || !has_ingress.contains(&(k.0.clone(), k.1.clone(), k.2)))
        .map(|(_, (mut g, last))| {
            g.last_seen = bulkhead_insight::rfc3339(last);
            g
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

pub async fn recommend(admin: &mut Admin, window: Option<Duration>, diff: bool) -> Result<()> {
    let edges = edges(admin, window).await?;
    let (resources, _) = applied(admin, "").await?;
    let rec = bulkhead_insight::recommend(&edges, &resources, &RecommendOptions::default());
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
