//! See and adapt (issue #7): the verbs over the traffic edges the sidecars report.
//!
//! - `graph`: who called whom, on which port, and what was decided (table, DOT, JSON);
//! - `recommend`: least-privilege policy from what was observed, in audit mode, with its
//!   evidence, or (`--diff`) what changed since the recommendation now applied;
//! - `impact -f CANDIDATE`: the observed flows whose verdict the candidate would change;
//! - `promote KIND/NS/NAME`: audit → enforce, refused while it had would-deny flows.

use crate::admin_cmd::{applied, request};
use crate::client;
use anyhow::{Context, Result, bail};
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::{ApplyRequest, DeleteRequest, ListEdgesRequest};
use bulkhead_insight::{Edge, EdgeVerdict, RecommendOptions};
use bulkhead_policy::PolicySet;
use bulkhead_policy::model::{Mode, Resource, WorkloadRef};
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
    bulkhead_insight::caller_name(
        e.key.source_workload.as_ref(),
        e.key.source_identity.as_deref(),
        by_identity,
    )
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

pub async fn impact(admin: &mut Admin, files: &[PathBuf], window: Option<Duration>) -> Result<()> {
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

pub async fn promote(admin: &mut Admin, target: &str, window: Duration, force: bool) -> Result<()> {
    let key = resource_key(target);
    let (resources, _) = applied(admin, "").await?;
    let Some(resource) = resources.iter().find(|r| r.key() == key) else {
        bail!(
            "{key} is not applied; `bulkhead get policies` and `bulkhead get postures` list what is"
        );
    };
    let audit = match resource {
        Resource::AuthorizationPolicy(d) => d.spec.mode == Mode::Audit,
        Resource::DefaultPosture(d) => d.spec.mode == Mode::Audit,
        _ => bail!("only AuthorizationPolicies and DefaultPostures have a mode; {key} has none"),
    };
    if !audit {
        bail!("{key} is already enforced");
    }
    // The would-deny flows it is blamed for, within the window.
    let name = resource.name().to_string();
    let blamed: Vec<Edge> = edges(admin, Some(window))
        .await?
        .into_iter()
        .filter(|e| {
            e.key.verdict == EdgeVerdict::AllowWouldDeny && e.key.policy.as_deref() == Some(&name)
        })
        .collect();
    if !blamed.is_empty() {
        let by_identity = bulkhead_insight::identities(&resources);
        let total: u64 = blamed.iter().map(|e| e.stats.count).sum();
        let mut lines = Vec::new();
        for e in blamed.iter().take(10) {
            lines.push(format!(
                "  {} → {}:{} {} {} ({} requests, last seen {})",
                caller(e, &by_identity),
                e.key.destination,
                e.key.port,
                e.key.method.as_deref().unwrap_or("tcp"),
                e.key.path.as_deref().unwrap_or(""),
                e.stats.count,
                bulkhead_insight::rfc3339(e.stats.last_seen)
            ));
        }
        let what = format!(
            "{key} would have denied {total} requests in the last {}s that are allowed today:\n{}",
            window.as_secs(),
            lines.join("\n")
        );
        if !force {
            bail!(
                "{what}\nrefusing to enforce it. Allow that traffic first (bulkhead recommend), wait \
                 until it stops, or pass --force to deny it from now on"
            );
        }
        eprintln!("{what}\n--force: enforcing it anyway");
    }
    let mut enforced = resource.clone();
    let mut remove = None;
    match &mut enforced {
        Resource::AuthorizationPolicy(d) => d.spec.mode = Mode::Enforce,
        Resource::DefaultPosture(d) => {
            // One enforced posture per scope: fold the audit one's directions into it.
            let scope = d.metadata.namespace.as_ref().map(|n| n.value.to_string());
            let existing = resources.iter().find_map(|r| match r {
                Resource::DefaultPosture(e)
                    if e.spec.mode == Mode::Enforce
                        && e.metadata.namespace.as_ref().map(|n| n.value.to_string()) == scope =>
                {
                    Some(e)
                }
                _ => None,
            });
            d.spec.mode = Mode::Enforce;
            if let Some(existing) = existing {
                let mut merged = existing.clone();
                if d.spec.ingress.is_some() {
                    merged.spec.ingress = d.spec.ingress;
                }
                if d.spec.egress.is_some() {
                    merged.spec.egress = d.spec.egress;
                }
                remove = Some(key.clone());
                enforced = Resource::DefaultPosture(merged);
            }
        }
        _ => {}
    }
    let yaml = enforced.to_yaml().map_err(|e| anyhow::anyhow!(e))?;
    let resp = admin
        .apply(request(ApplyRequest {
            file: format!("promote {key}"),
            yaml,
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    let mut revision = resp.revision;
    if let Some(key) = remove {
        revision = admin
            .delete(request(DeleteRequest { keys: vec![key] }))
            .await
            .map_err(client::status)?
            .into_inner()
            .revision;
    }
    println!("{key} is enforced (revision {revision})");
    Ok(())
}
