//! The one way the resource set changes: [`State::change`]. Apply, delete, rollback and
//! promote go through it, and so will a Kubernetes controller; nothing else writes the set.
//!
//! A change takes the write lock, reads the current set, lets its caller build the new one,
//! type-checks that set whole, checks the configuration each affected workload's proxies
//! would receive against the per-proxy bounds ([`ProxyBounds`]), commits one revision and
//! publishes it to every configuration stream. Refused at any step, it changes nothing. The
//! store behind it is used through two calls only (commit, and the set at a revision for
//! rollback): the seam a replicated store plugs into.
//!
//! It must never publish a set it did not check, never commit without the lock, and never
//! let a configuration a proxy would refuse for its size or rule count be reported as
//! applied.

use crate::service::{Snapshot, State, internal};
use crate::store::Change;
use bulkhead_policy::model::{Resource, ResourceName};
use bulkhead_policy::{Origin, PolicySet};
use std::collections::BTreeSet;
use std::sync::Arc;
use tonic::Status;

/// What a proxy takes, checked for every affected workload before a change is committed.
/// The defaults match `bulkhead-proxy`'s `--max-policy-rules` and stay well under what a
/// proxy reassembles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyBounds {
    /// Compiled rules in one workload's configuration (the proxy's own count).
    pub max_rules: usize,
    /// Bytes of one workload's configuration on the wire (its resources and the mesh's
    /// address table).
    pub max_config_bytes: usize,
}

impl Default for ProxyBounds {
    fn default() -> ProxyBounds {
        ProxyBounds {
            max_rules: 100_000,
            max_config_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The set as a change finds it.
pub(crate) struct Current<'a> {
    pub resources: &'a [Resource],
}

/// The whole set a change proposes, with where each resource came from when it came from
/// the operator's file (type errors then point into it).
pub(crate) struct Proposal {
    pub set: Vec<Resource>,
    pub origins: Vec<Option<Origin>>,
}

impl Proposal {
    /// A set none of whose resources comes from a file.
    pub(crate) fn unlocated(set: Vec<Resource>) -> Proposal {
        let origins = vec![None; set.len()];
        Proposal { set, origins }
    }
}

/// What a change did.
#[derive(Debug)]
pub(crate) struct Changed {
    /// The new revision, or the current one if the proposal changed nothing.
    pub revision: u64,
    pub changes: Vec<(String, Change)>,
    /// Workloads whose proxies' configuration is different at the new revision.
    pub affected: Vec<ResourceName>,
}

impl Changed {
    /// `Kind/namespace/name created|configured|unchanged|deleted` for the keys `keep` picks.
    pub(crate) fn lines(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        self.changes
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, c)| format!("{k} {}", c.word()))
            .collect()
    }

    pub(crate) fn affected_names(&self) -> Vec<String> {
        self.affected.iter().map(ToString::to_string).collect()
    }
}

impl State {
    /// Changes the resource set: under the write lock, `build` gets the current set and
    /// proposes the whole new one (and anything else its caller wants back); the proposal is
    /// type-checked whole and against the per-proxy bounds, committed as one revision with
    /// `actor` and `action` in the log, and pushed to every proxy. With `expect_revision`,
    /// refused unless the set is at exactly that revision.
    pub(crate) async fn change<T>(
        &self,
        actor: &str,
        action: &str,
        expect_revision: Option<u64>,
        build: impl FnOnce(Current<'_>) -> Result<(Proposal, T), Status>,
    ) -> Result<(Changed, T), Status> {
        let _one_change_at_a_time = self.writes.lock().await;
        let current = self.snapshot.borrow().clone();
        if let Some(expected) = expect_revision
            && expected != current.revision
        {
            return Err(Status::failed_precondition(format!(
                "the resource set is at revision {}, not {expected} (--expect-revision): it changed since it was read. Read it again (`bulkhead get`, `bulkhead history`), decide again, and retry with the revision you read",
                current.revision
            )));
        }
        let (proposal, extra) = build(Current {
            resources: &current.resources,
        })?;
        // The whole set after this change must compile: a change that would leave any
        // policy unenforceable (say, a port re-declared as tcp under an HTTP rule) is refused.
        self.check(&proposal.set, &proposal.origins)?;
        let mut set = proposal.set;
        set.sort_by_key(Resource::key);
        let candidate = Snapshot::new(current.revision + 1, set);
        let affected = self.within_bounds(&current, &candidate)?;
        let committed = self
            .store
            .commit(
                &candidate.resources,
                actor,
                action,
                crate::proxies::unix_now(),
            )
            .map_err(internal)?;
        if committed.pruned > 0 {
            tracing::info!(
                pruned = committed.pruned,
                "pruned revision snapshots past the history's retention"
            );
        }
        let changed = Changed {
            revision: committed.revision,
            changes: committed.changes,
            affected: if committed.revision == current.revision {
                Vec::new()
            } else {
                affected
            },
        };
        if committed.revision != current.revision {
            // What was checked is what is pushed; the store kept the same set, in key order.
            let snapshot = if committed.revision == candidate.revision {
                candidate
            } else {
                Snapshot::new(committed.revision, candidate.resources)
            };
            self.snapshot.send_replace(Arc::new(snapshot));
            tracing::info!(
                revision = changed.revision,
                actor,
                action,
                affected = changed.affected.len(),
                "new revision pushed"
            );
        }
        Ok((changed, extra))
    }

    /// The workloads whose configuration differs between `old` and `new`, after checking
    /// each one's configuration at `new` against the per-proxy bounds. A workload counts if
    /// a Workload declares it (then or now) or a proxy of it ever connected.
    fn within_bounds(&self, old: &Snapshot, new: &Snapshot) -> Result<Vec<ResourceName>, Status> {
        let mut workloads: BTreeSet<ResourceName> = self.proxies.workloads();
        for set in [&old.resources, &new.resources] {
            workloads.extend(
                set.iter()
                    .filter(|r| matches!(r, Resource::Workload(_)))
                    .map(Resource::name),
            );
        }
        let bounds = &self.proxy_bounds;
        let endpoints_changed = old.endpoints != new.endpoints;
        let endpoint_bytes = bulkhead_api::pieces::endpoints_bytes(&new.endpoints);
        let mut affected = Vec::new();
        let mut over = Vec::new();
        for workload in workloads {
            let before = old.distribution.indices_for(&workload);
            let after = new.distribution.indices_for(&workload);
            let same = !endpoints_changed
                && before.len() == after.len()
                && before
                    .iter()
                    .zip(&after)
                    .all(|(&b, &a)| old.wire.get(b) == new.wire.get(a));
            if same {
                continue;
            }
            let bytes = endpoint_bytes
                + after
                    .iter()
                    .filter_map(|&i| new.wire.get(i))
                    .map(bulkhead_api::pieces::resource_bytes)
                    .sum::<usize>();
            if bytes > bounds.max_config_bytes {
                over.push(format!(
                    "the configuration of workload {workload} would be {} on the wire; a proxy's configuration may be at most {} (bulkhead control --max-proxy-config-bytes)",
                    mib(bytes),
                    mib(bounds.max_config_bytes)
                ));
            } else if let Some(rules) = rule_count(new, &after, bounds.max_rules) {
                over.push(format!(
                    "the configuration of workload {workload} would hold {rules} compiled rules; a proxy takes at most {} (bulkhead control --max-proxy-rules, which should match each proxy's --max-policy-rules)",
                    bounds.max_rules
                ));
            }
            affected.push(workload);
        }
        if over.is_empty() {
            return Ok(affected);
        }
        let shown = over.len().min(5);
        let more = match over.len() - shown {
            0 => String::new(),
            n => format!("\n(and {n} more workloads)"),
        };
        Err(Status::invalid_argument(format!(
            "{}{more}\nNothing was changed: its proxies could not use that configuration. Split or narrow the policies, or raise the bound (and each proxy's own with it)",
            over[..shown].join("\n")
        )))
    }
}

/// The compiled rule count of the resources at `indices` of `set`, if it is over `max`.
/// Compiles only when a cheap upper bound (every rule once per workload the cut declares,
/// and one more) says it could be.
fn rule_count(set: &Snapshot, indices: &[usize], max: usize) -> Option<usize> {
    let cut: Vec<&Resource> = indices
        .iter()
        .filter_map(|&i| set.resources.get(i))
        .collect();
    let rules: usize = cut
        .iter()
        .map(|r| match r {
            Resource::AuthorizationPolicy(doc) => doc.spec.rules.len(),
            _ => 0,
        })
        .sum();
    let subjects = 1 + cut
        .iter()
        .filter(|r| matches!(r, Resource::Workload(_)))
        .count();
    if rules.saturating_mul(subjects) <= max {
        return None;
    }
    let owned: Vec<Resource> = cut.into_iter().cloned().collect();
    // A cut that does not compile is the proxy's to refuse; its size is what is checked here.
    let n = PolicySet::compile(&owned, 0).ok()?.rule_count();
    (n > max).then_some(n)
}

/// `3.2 MiB`, `512 KiB` or `900 bytes`.
pub(crate) fn mib(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    match bytes {
        b if b >= MIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b if b >= KIB => format!("{} KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}
