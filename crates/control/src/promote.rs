//! `Admin.Promote` (issue #13.4): audit → enforce, decided here, under the same lock as every
//! change. An audit-mode AuthorizationPolicy or DefaultPosture is enforced in one revision,
//! and refused while it had would-deny flows within the window, unless forced; an audit
//! posture is folded into the enforced posture of its scope, if there is one, in that same
//! revision. The flows are read inside the change, so no other change can slip between the
//! check and the commit, and no client can skip the check.
//!
//! With replicas on etcd, each proxy reports its flows to the replica it is on: the check
//! asks the other live replicas for theirs first (as `ListEdges` does), and a replica that
//! does not answer refuses the promotion like a would-deny flow would, unless forced, since
//! its proxies' flows cannot be checked.

use crate::change::{Changed, Proposal};
use crate::proxies::unix_now;
use crate::service::{State, internal};
use bulkhead_api::v1 as pb;
use bulkhead_insight::{Edge, EdgeVerdict};
use bulkhead_policy::model::{Mode, Resource, WorkloadRef};
use std::collections::BTreeMap;
use tonic::Status;

/// Would-deny flows are looked for over this long when the caller does not say.
const DEFAULT_WINDOW_SECS: u64 = 3600;
/// At most this many blamed flows are named.
const NAMED_FLOWS: usize = 10;

impl State {
    /// Enforces the audit resource `r.key` in one revision; returns the change and, when
    /// forced over would-deny flows, their description.
    pub(crate) async fn promote_audit(
        &self,
        actor: &str,
        r: pb::PromoteRequest,
    ) -> Result<(Changed, String), Status> {
        let window = match r.window_seconds {
            0 => DEFAULT_WINDOW_SECS,
            s => s,
        };
        let key = r.key;
        let since = unix_now().saturating_sub(window);
        // The other replicas' flows, read before the change: a network call cannot wait
        // under the write lock. This replica's own are read inside it, as without replicas.
        let others = match (&self.shared, &self.replica) {
            (Some(etcd), Some(replica)) => {
                crate::replicas::others_edges(self, etcd, replica, since)
                    .await
                    .map_err(internal)?
            }
            _ => crate::replicas::OthersEdges::default(),
        };
        let action = match r.force {
            true => format!("promote {key} --force"),
            false => format!("promote {key}"),
        };
        self.change(actor, &action, r.expect_revision, |current| {
            let resources = current.resources;
            let Some(resource) = resources.iter().find(|res| res.key() == key) else {
                return Err(Status::not_found(format!(
                    "{key} is not applied; `bulkhead get policies` and `bulkhead get postures` list what is"
                )));
            };
            let audit = match resource {
                Resource::AuthorizationPolicy(d) => d.spec.mode == Mode::Audit,
                Resource::DefaultPosture(d) => d.spec.mode == Mode::Audit,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "only AuthorizationPolicies and DefaultPostures have a mode; {key} has none"
                    )));
                }
            };
            if !audit {
                return Err(Status::failed_precondition(format!(
                    "{key} is already enforced"
                )));
            }
            let name = resource.name().to_string();
            let mine = self.store.edges_since(since).map_err(internal)?;
            let blamed: Vec<Edge> = bulkhead_insight::merge_edges(
                mine.into_iter().chain(others.edges.iter().cloned()),
            )
            .into_iter()
            .filter(|e| {
                e.stats.last_seen >= since
                    && e.key.verdict == EdgeVerdict::AllowWouldDeny
                    && e.key.policy.as_deref() == Some(&name)
            })
            .collect();
            let mut forced_over = String::new();
            if !blamed.is_empty() {
                let what = describe(&key, &blamed, window, resources);
                if !r.force {
                    return Err(Status::failed_precondition(format!(
                        "{what}\nrefusing to enforce it. Allow that traffic first (bulkhead recommend), wait \
                         until it stops, or pass --force to deny it from now on"
                    )));
                }
                forced_over = what;
            } else if !others.missing.is_empty() {
                let what = format!(
                    "{key}: the flows of {} replica(s) could not be checked for requests it would deny:\n  {}",
                    others.missing.len(),
                    others.missing.join("\n  ")
                );
                if !r.force {
                    return Err(Status::failed_precondition(format!(
                        "{what}\nrefusing to enforce it unchecked. Ask again when every replica answers \
                         (`bulkhead get replicas`), or pass --force to enforce it anyway"
                    )));
                }
                forced_over = what;
            }
            Ok((Proposal::unlocated(enforced(resources, resource, &key)), forced_over))
        })
        .await
    }
}

/// The set with `resource` (audit) enforced: an AuthorizationPolicy switched to enforce; a
/// posture switched too, or, when its scope already has an enforced posture, folded into
/// that one (its directions win) and removed, since a scope has one enforced posture.
fn enforced(resources: &[Resource], resource: &Resource, key: &str) -> Vec<Resource> {
    let mut set: Vec<Resource> = resources.to_vec();
    let mut promoted = resource.clone();
    let mut merged_into = None;
    match &mut promoted {
        Resource::AuthorizationPolicy(d) => d.spec.mode = Mode::Enforce,
        Resource::DefaultPosture(d) => {
            d.spec.mode = Mode::Enforce;
            let scope = d.metadata.namespace.as_ref().map(|n| n.value.to_string());
            let existing = resources.iter().find(|r| match r {
                Resource::DefaultPosture(e) => {
                    e.spec.mode == Mode::Enforce
                        && e.metadata.namespace.as_ref().map(|n| n.value.to_string()) == scope
                }
                _ => false,
            });
            if let Some(Resource::DefaultPosture(existing)) = existing {
                let mut merged = existing.clone();
                if d.spec.ingress.is_some() {
                    merged.spec.ingress = d.spec.ingress;
                }
                if d.spec.egress.is_some() {
                    merged.spec.egress = d.spec.egress;
                }
                merged_into = Some(Resource::DefaultPosture(merged));
            }
        }
        _ => {}
    }
    match merged_into {
        Some(merged) => {
            let merged_key = merged.key();
            set.retain(|r| r.key() != key);
            for r in &mut set {
                if r.key() == merged_key {
                    *r = merged.clone();
                }
            }
        }
        None => {
            for r in &mut set {
                if r.key() == key {
                    *r = promoted.clone();
                }
            }
        }
    }
    set
}

/// `KEY would have denied N requests in the last Ws that are allowed today:` and the flows.
fn describe(key: &str, blamed: &[Edge], window: u64, resources: &[Resource]) -> String {
    let by_identity: BTreeMap<&str, WorkloadRef> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(doc) => doc.spec.exact_identity().map(|id| (id.as_str(), r.name())),
            _ => None,
        })
        .collect();
    let caller = |e: &Edge| match (&e.key.source_workload, &e.key.source_identity) {
        (Some(w), _) => w.to_string(),
        (None, Some(id)) => by_identity
            .get(id.as_str())
            .map_or_else(|| id.to_string(), ToString::to_string),
        (None, None) => "(plaintext)".to_string(),
    };
    let total: u64 = blamed.iter().map(|e| e.stats.count).sum();
    let lines: Vec<String> = blamed
        .iter()
        .take(NAMED_FLOWS)
        .map(|e| {
            format!(
                "  {} → {}:{} {} {} ({} requests, last seen {})",
                caller(e),
                e.key.destination,
                e.key.port,
                e.key.method.as_deref().unwrap_or("tcp"),
                e.key.path.as_deref().unwrap_or(""),
                e.stats.count,
                bulkhead_insight::rfc3339(e.stats.last_seen)
            )
        })
        .collect();
    format!(
        "{key} would have denied {total} requests in the last {window}s that are allowed today:\n{}",
        lines.join("\n")
    )
}
