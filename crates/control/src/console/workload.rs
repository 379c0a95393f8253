//! The workload view: what a workload is (identity, labels, ports, addresses), the proxies
//! serving it (revision acknowledged, certificate expiry), who can reach it and its blast
//! radius, each from policy (`bulkhead reach`) and from traffic (`bulkhead reach
//! --observed`), with hop counts and one shortest path per workload reached.
//!
//! It answers with the CLI's analyses (`bulkhead_policy::who_can_reach`, `blast_radius`,
//! `bulkhead_insight::observed_reach`, `who_reached`) and their views, and never shows less
//! than they found.

use super::views::{Params, ViewError, edges, param, since};
use crate::proxies::unix_now;
use crate::service::State;
use bulkhead_insight::{Reach, Window};
use bulkhead_policy::model::{Resource, WorkloadRef};
use bulkhead_policy::{BlastRadius, EdgeView, PolicySet, PolicyView, ReachOptions, SourceEgress};
use serde::Serialize;

/// `?name=ns/name[&view=staged][&egress=bypassed][&window=SECS]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct WorkloadQuery {
    workload: WorkloadRef,
    staged: bool,
    stolen_key: bool,
    /// Seconds of traffic for the observed answers (0: all kept).
    window: u64,
}

impl WorkloadQuery {
    pub(super) fn parse(q: &Params) -> Result<WorkloadQuery, ViewError> {
        let workload = bulkhead_policy::model::parse_workload(param(q, "name")?)
            .map_err(ViewError::BadRequest)?;
        let flag = |name: &str, yes: &str, no: &str| match q.get(name).map(String::as_str) {
            None | Some("") => Ok(false),
            Some(v) if v == yes => Ok(true),
            Some(v) if v == no => Ok(false),
            Some(v) => Err(ViewError::BadRequest(format!(
                "{name}={v:?}: {no} or {yes}"
            ))),
        };
        Ok(WorkloadQuery {
            workload,
            staged: flag("view", "staged", "enforced")?,
            stolen_key: flag("egress", "bypassed", "enforced")?,
            window: match q.get("window").map(String::as_str) {
                None | Some("") => 0,
                Some(w) => w.parse().map_err(|_| {
                    ViewError::BadRequest(format!("window={w:?} is not a number of seconds"))
                })?,
            },
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkloadView {
    name: String,
    revision: u64,
    /// Absent when no Workload declares it (it is only seen in traffic).
    declared: Option<Declared>,
    proxies: Vec<ProxyView>,
    assumptions: Assumptions,
    /// From policy; absent when the workload is not declared (`policyError` says why).
    who_can_reach: Option<Vec<EdgeRow>>,
    blast_radius: Option<PolicyBlast>,
    policy_error: Option<String>,
    /// From traffic that got through, within the window.
    observed_callers: Vec<ObservedRow>,
    observed_reach: Vec<ObservedRow>,
    since: u64,
    /// Every workload declared besides this one.
    other_workloads: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Declared {
    identity: String,
    labels: std::collections::BTreeMap<String, String>,
    ports: Vec<PortView>,
    addresses: Vec<String>,
}

#[derive(Serialize)]
struct PortView {
    port: u16,
    protocol: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyView {
    spiffe_id: String,
    connected: bool,
    sent_revision: u64,
    acked_revision: u64,
    nacked_revision: u64,
    nack_error: String,
    last_contact_unix: u64,
    cert_not_after_unix: u64,
    remote: String,
    bundle_current: bool,
}

#[derive(Serialize)]
struct Assumptions {
    view: &'static str,
    egress: &'static str,
}

/// An edge from policy, with its grants in words.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EdgeRow {
    #[serde(flatten)]
    edge: EdgeView,
    allowed_by: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyBlast {
    reached: Vec<ReachedRow>,
    /// Every edge between the start and the workloads it reaches: what an attacker holding
    /// the start could use, hop after hop. Fewer edges, fewer ways to move.
    edges: Vec<EdgeRow>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReachedRow {
    workload: String,
    hops: usize,
    path: Vec<EdgeRow>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObservedRow {
    party: String,
    hops: usize,
    path: Vec<String>,
}

fn row(e: &bulkhead_policy::ReachEdge) -> EdgeRow {
    let edge = EdgeView::from(e);
    EdgeRow {
        allowed_by: edge.allowed_by(),
        edge,
    }
}

/// The edges among the start of `blast` and every workload it reached: ways to move from
/// one workload to another (a workload calling itself moves nowhere, so it is left out).
fn radius_edges(set: &PolicySet, blast: &BlastRadius, options: ReachOptions) -> Vec<EdgeRow> {
    let inside: std::collections::BTreeSet<&WorkloadRef> = std::iter::once(&blast.start)
        .chain(blast.reached.iter().map(|r| &r.workload))
        .collect();
    inside
        .iter()
        .filter_map(|w| bulkhead_policy::reachable_from(set, w, options).ok())
        .flatten()
        .filter(|e| e.from != e.to && inside.contains(&e.to))
        .map(|e| row(&e))
        .collect()
}

fn observed(found: Vec<Reach>) -> Vec<ObservedRow> {
    found
        .into_iter()
        .map(|r| ObservedRow {
            party: r.party.to_string(),
            hops: r.hops,
            path: r.path.iter().map(ToString::to_string).collect(),
        })
        .collect()
}

pub(super) fn view(state: &State, q: &WorkloadQuery) -> Result<WorkloadView, ViewError> {
    let now = unix_now();
    let snapshot = state.snapshot.borrow().clone();
    let resources = &snapshot.resources;
    let declared = resources.iter().find_map(|r| match r {
        Resource::Workload(doc) if r.name() == q.workload => Some(Declared {
            identity: doc.spec.identity.value.to_string(),
            labels: doc
                .metadata
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: doc
                .spec
                .port_protocols()
                .into_iter()
                .map(|(port, p)| PortView {
                    port,
                    protocol: p.as_str().to_string(),
                })
                .collect(),
            addresses: doc
                .spec
                .addresses
                .iter()
                .map(|a| a.value.to_string())
                .collect(),
        }),
        _ => None,
    });
    let workloads = resources
        .iter()
        .filter(|r| matches!(r, Resource::Workload(_)))
        .count();
    let options = ReachOptions {
        view: match q.staged {
            true => PolicyView::Staged,
            false => PolicyView::Enforced,
        },
        egress: match q.stolen_key {
            true => SourceEgress::Bypassed,
            false => SourceEgress::Enforced,
        },
    };
    let (who_can_reach, blast_radius, policy_error) =
        match PolicySet::compile(resources, snapshot.revision) {
            Err(errors) => (
                None,
                None,
                Some(format!(
                    "the applied set does not compile in this control plane: {}",
                    errors.first().map(ToString::to_string).unwrap_or_default()
                )),
            ),
            Ok(set) => {
                let who = bulkhead_policy::who_can_reach(&set, &q.workload, options);
                let blast = bulkhead_policy::blast_radius(&set, &q.workload, options);
                match (who, blast) {
                    (Ok(who), Ok(blast)) => (
                        Some(who.iter().map(row).collect()),
                        Some(PolicyBlast {
                            edges: radius_edges(&set, &blast, options),
                            reached: blast
                                .reached
                                .iter()
                                .map(|r| ReachedRow {
                                    workload: r.workload.to_string(),
                                    hops: r.hops,
                                    path: r.path.iter().map(row).collect(),
                                })
                                .collect(),
                        }),
                        None,
                    ),
                    (Err(e), _) | (_, Err(e)) => (None, None, Some(e.to_string())),
                }
            }
        };
    let since = since(q.window, now);
    let traffic = bulkhead_insight::with_declared_callers(edges(state, since, now)?, resources);
    let window = Window {
        since,
        until: u64::MAX,
    };
    let bundle = state.cas.borrow().bundle().fingerprints();
    let proxies = state
        .proxies
        .list(&bundle)
        .into_iter()
        .filter(|p| p.namespace == q.workload.namespace && p.workload == q.workload.name)
        .map(|p| ProxyView {
            spiffe_id: p.spiffe_id,
            connected: p.connected,
            sent_revision: p.sent_revision,
            acked_revision: p.acked_revision,
            nacked_revision: p.nacked_revision,
            nack_error: p.nack_error,
            last_contact_unix: p.last_contact_unix,
            cert_not_after_unix: p.cert_not_after_unix,
            remote: p.remote,
            bundle_current: p.bundle_current,
        })
        .collect();
    Ok(WorkloadView {
        name: q.workload.to_string(),
        revision: snapshot.revision,
        other_workloads: workloads.saturating_sub(usize::from(declared.is_some())),
        declared,
        proxies,
        assumptions: Assumptions {
            view: if q.staged { "staged" } else { "enforced" },
            egress: if q.stolen_key { "bypassed" } else { "enforced" },
        },
        who_can_reach,
        blast_radius,
        policy_error,
        observed_callers: observed(bulkhead_insight::who_reached(&traffic, &q.workload, window)),
        observed_reach: observed(bulkhead_insight::observed_reach(
            &traffic,
            &q.workload,
            window,
        )),
        since,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::console::views::params as q;

    #[test]
    fn queries_name_a_workload_and_the_assumptions() {
        let w = WorkloadQuery::parse(&q(&[
            ("name", "shop/frontend"),
            ("view", "staged"),
            ("egress", "bypassed"),
            ("window", "3600"),
        ]))
        .unwrap();
        assert_eq!(w.workload.to_string(), "shop/frontend");
        assert!(w.staged && w.stolen_key);
        assert_eq!(w.window, 3600);
        let e = WorkloadQuery::parse(&q(&[("name", "frontend")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("namespace/name"), "{e}");
        let e = WorkloadQuery::parse(&q(&[("name", "shop/a"), ("view", "maybe")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("enforced or staged"), "{e}");
    }
}
