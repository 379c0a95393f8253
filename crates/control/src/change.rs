//! The one way the resource set changes: [`State::change`]. Apply, delete, rollback and
//! promote go through it, and so will a Kubernetes controller; nothing else writes the set.
//!
//! A change takes the write lock, reads the current set, lets its caller build the new one,
//! type-checks that set whole, checks the configuration each affected workload's proxies
//! would receive against the per-proxy bounds ([`ProxyBounds`]), commits one revision and
//! publishes it to every configuration stream. Refused at any step, it changes nothing. The
//! store behind it is used through three calls (commit, the set at a revision for rollback,
//! the revision log): the seam where the embedded store or etcd (`--etcd`, several
//! replicas) plugs in. On etcd the lock is this replica's only; what keeps replicas from
//! losing one another's changes is the commit's compare-and-swap on etcd's revision, and
//! a change that lost it is built and checked again on the set that won.
//!
//! It must never publish a set it did not check, never commit without the lock (and on etcd
//! without the comparison), and never let a configuration a proxy would refuse for its size
//! or rule count be reported as applied.

use crate::service::{Snapshot, State, internal};
use crate::store::etcd::Commit;
use crate::store::{Change, SetAt};
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

/// How many times a change is built and committed when other replicas keep committing first.
pub(crate) const COMMIT_ATTEMPTS: u32 = 8;

/// With replicas on etcd, follows etcd's revision and publishes every new one to the proxies
/// connected to this replica, as [`State::change`] publishes a local one. Without, nothing.
pub(crate) fn spawn_follow(state: Arc<State>) {
    let Some(etcd) = state.shared.clone() else {
        return;
    };
    let mut values = crate::service::followed(&etcd, crate::store::etcd::revision_key());
    let weak = Arc::downgrade(&state);
    tokio::spawn(async move {
        while values.changed().await.is_ok() {
            let value = values.borrow_and_update().clone();
            let Ok(revision) = etcd.revision_in(&value) else {
                continue;
            };
            let Some(state) = weak.upgrade() else {
                return;
            };
            if revision > state.snapshot.borrow().revision {
                let _one_change_at_a_time = state.writes.lock().await;
                if let Err(e) = state.catch_up().await {
                    tracing::warn!(error = %e, revision, "cannot read a new revision from etcd; trying at the next one");
                }
            }
        }
    });
    crate::service::spawn_follow_revocations(state.clone());
    crate::service::spawn_follow_cas(state);
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
        build: impl FnMut(Current<'_>) -> Result<(Proposal, T), Status>,
    ) -> Result<(Changed, T), Status> {
        self.change_with(actor, action, expect_revision, false, build)
            .await
    }

    /// [`State::change`], or with `dry_run` everything but the commit: the same checks and
    /// refusals, and what would change, at the current revision.
    ///
    /// With replicas on etcd, the set is first brought up to etcd's revision, and the commit
    /// compares etcd's revision with the one the change was built on: when another replica
    /// committed in between, nothing is written, the new set is read and `build` runs again
    /// on it (so `build` may run more than once), up to [`COMMIT_ATTEMPTS`] times.
    pub(crate) async fn change_with<T>(
        &self,
        actor: &str,
        action: &str,
        expect_revision: Option<u64>,
        dry_run: bool,
        mut build: impl FnMut(Current<'_>) -> Result<(Proposal, T), Status>,
    ) -> Result<(Changed, T), Status> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let _one_change_at_a_time = self.writes.lock().await;
            self.catch_up().await.map_err(internal)?;
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
            if dry_run {
                let as_json = |set: &[Resource]| {
                    crate::store::by_key(set).map_err(|e| {
                        Status::internal(format!("a resource does not serialize: {e}"))
                    })
                };
                let changes = crate::store::changes(
                    &as_json(&current.resources)?,
                    &as_json(&candidate.resources)?,
                );
                let nothing = changes
                    .iter()
                    .all(|(_, c)| *c == crate::store::Change::Unchanged);
                return Ok((
                    Changed {
                        revision: current.revision,
                        changes,
                        affected: if nothing { Vec::new() } else { affected },
                    },
                    extra,
                ));
            }
            let now = crate::proxies::unix_now();
            let committed = match &self.shared {
                None => self
                    .store
                    .commit(&candidate.resources, actor, action, now)
                    .map_err(internal)?,
                Some(etcd) => match etcd
                    .commit(
                        current.revision,
                        &current.resources,
                        &candidate.resources,
                        actor,
                        action,
                        now,
                    )
                    .await
                    .map_err(internal)?
                {
                    Commit::Done(committed) => committed,
                    Commit::Conflict if attempt < COMMIT_ATTEMPTS => {
                        tracing::info!(
                            base = current.revision,
                            attempt,
                            "another replica committed first; building the change again on the new set"
                        );
                        continue;
                    }
                    Commit::Conflict => {
                        return Err(Status::aborted(format!(
                            "other replicas committed {COMMIT_ATTEMPTS} times while this change was being checked; nothing was changed. Try again (`bulkhead history` shows who is changing the set)"
                        )));
                    }
                },
            };
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
                let mut snapshot = if committed.revision == candidate.revision {
                    candidate
                } else {
                    Snapshot::new(committed.revision, candidate.resources)
                };
                snapshot.commit_span = self.commit_span(&changed, actor, action);
                self.snapshot.send_replace(Arc::new(snapshot));
                tracing::info!(
                    revision = changed.revision,
                    actor,
                    action,
                    affected = changed.affected.len(),
                    "new revision pushed"
                );
            }
            return Ok((changed, extra));
        }
    }

    /// With replicas on etcd, makes etcd's current set this replica's, if it is newer:
    /// published to every proxy connected here exactly as a local change is. The caller
    /// holds [`State::writes`].
    async fn catch_up(&self) -> Result<(), crate::ControlError> {
        let Some(etcd) = &self.shared else {
            return Ok(());
        };
        let local = self.snapshot.borrow().revision;
        if etcd.current_revision().await? <= local {
            return Ok(());
        }
        let (revision, mut set) = etcd.resources().await?;
        if revision <= local {
            return Ok(());
        }
        set.sort_by_key(Resource::key);
        self.snapshot
            .send_replace(Arc::new(Snapshot::new(revision, set)));
        tracing::info!(revision, "new revision from another replica pushed");
        Ok(())
    }

    /// The set at `revision`, from etcd with replicas, else from the embedded store.
    pub(crate) async fn set_at(&self, revision: u64) -> Result<SetAt, Status> {
        match &self.shared {
            Some(etcd) => etcd.set_at(revision).await.map_err(internal),
            None => self.store.set_at(revision).map_err(internal),
        }
    }

    /// The newest `limit` entries of the revision log, from etcd with replicas.
    pub(crate) async fn revision_log(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::store::RevisionRecord>, Status> {
        match &self.shared {
            Some(etcd) => etcd.history(limit).await.map_err(internal),
            None => self.store.history(limit).map_err(internal),
        }
    }

    /// Records the commit of a revision as a span under the call that made it, if traced.
    fn commit_span(
        &self,
        changed: &Changed,
        actor: &str,
        action: &str,
    ) -> Option<bulkhead_api::otlp::SpanContext> {
        use bulkhead_api::otlp::{SpanKind, Value};
        let tracer = self.tracer.as_ref()?;
        let call = crate::spans::current_call();
        let begun = crate::spans::Begun::under(tracer, call.as_ref())?;
        let context = begun.context;
        begun.end(
            tracer,
            format!("commit revision {}", changed.revision),
            SpanKind::Internal,
            vec![
                (
                    "bulkhead.revision",
                    Value::Int(i64::try_from(changed.revision).unwrap_or(i64::MAX)),
                ),
                ("bulkhead.actor", Value::Str(actor.to_string())),
                ("bulkhead.action", Value::Str(action.to_string())),
                (
                    "bulkhead.affected_workloads",
                    Value::Int(i64::try_from(changed.affected.len()).unwrap_or(i64::MAX)),
                ),
            ],
            None,
        );
        Some(context)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::HistoryRetention;
    use crate::testing::{Plane, from};
    use bulkhead_api::v1::{self as pb, admin_server::Admin};
    use bulkhead_insight::{Edge, EdgeVerdict};
    use std::time::Duration;

    /// A request from the admin, with its verified identity.
    fn admin<T>(message: T) -> tonic::Request<T> {
        from("spiffe://td.test/bulkhead/admin", message)
    }

    const DECLARATIONS: &str = r#"
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: orders, namespace: shop}
spec:
  identity: spiffe://td.test/ns/shop/sa/orders
  ports: [{port: 8080, protocol: http}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: payments, namespace: shop}
spec:
  identity: spiffe://td.test/ns/shop/sa/payments
  ports: [{port: 8080, protocol: http}]
"#;

    /// A deny policy for `workload` with `rules` rules on paths of `len` bytes.
    fn deny(name: &str, workload: &str, rules: usize, len: usize) -> String {
        let mut yaml = format!(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{workload: {workload}}}\n  action: deny\n  rules:\n"
        );
        for i in 0..rules {
            yaml.push_str(&format!(
                "    - name: r{i}\n      to: {{paths: [\"/{i}/{}\"]}}\n",
                "x".repeat(len)
            ));
        }
        yaml
    }

    async fn apply(
        p: &Plane,
        yaml: &str,
        expect_revision: Option<u64>,
    ) -> Result<pb::ApplyResponse, tonic::Status> {
        p.state
            .apply(admin(pb::ApplyRequest {
                file: "test.yaml".into(),
                yaml: yaml.into(),
                expect_revision,
                ..Default::default()
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    #[tokio::test]
    async fn a_change_against_a_revision_that_moved_on_is_refused() {
        let p = Plane::with(
            "change-expect",
            ProxyBounds::default(),
            HistoryRetention::default(),
        );
        let err = apply(&p, DECLARATIONS, Some(3)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message()
                .starts_with("the resource set is at revision 0, not 3 (--expect-revision)"),
            "{}",
            err.message()
        );
        assert_eq!(apply(&p, DECLARATIONS, Some(0)).await.unwrap().revision, 1);
        let err = p
            .state
            .delete(admin(pb::DeleteRequest {
                keys: vec!["Workload/shop/payments".into()],
                expect_revision: Some(0),
            }))
            .await
            .unwrap_err();
        assert!(
            err.message().contains("at revision 1, not 0"),
            "{}",
            err.message()
        );
        let err = p
            .state
            .rollback(admin(pb::RollbackRequest {
                revision: 0,
                expect_revision: Some(7),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn a_configuration_over_a_proxys_bounds_is_refused_naming_the_workload_and_bound() {
        let bounds = ProxyBounds {
            max_rules: 3,
            max_config_bytes: 4096,
        };
        let p = Plane::with("change-bounds", bounds, HistoryRetention::default());
        apply(&p, DECLARATIONS, None).await.unwrap();
        let err = apply(&p, &deny("many", "orders", 4, 1), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with(
                "the configuration of workload shop/orders would hold 4 compiled rules; a proxy takes at most 3 (bulkhead control --max-proxy-rules"
            ),
            "{}",
            err.message()
        );
        assert!(err.message().contains("Nothing was changed"));
        let err = apply(&p, &deny("long", "payments", 1, 5000), None)
            .await
            .unwrap_err();
        assert!(
            err.message().starts_with("the configuration of workload shop/payments would be ")
                && err.message().contains(
                    "a proxy's configuration may be at most 4 KiB (bulkhead control --max-proxy-config-bytes)"
                ),
            "{}",
            err.message()
        );
        assert_eq!(
            p.state.snapshot.borrow().revision,
            1,
            "nothing was committed"
        );
        // Within the bounds it goes through.
        let ok = apply(&p, &deny("few", "orders", 3, 1), None).await.unwrap();
        assert_eq!(ok.revision, 2);
    }

    #[tokio::test]
    async fn a_file_over_the_apply_bound_is_refused_in_our_words() {
        let p = Plane::with(
            "change-too-large",
            ProxyBounds::default(),
            HistoryRetention::default(),
        );
        let yaml = "#".repeat(crate::admin::MAX_APPLY_BYTES + 1024 * 1024);
        let err = apply(&p, &yaml, None).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "test.yaml is 17.0 MiB; one apply may carry at most 16.0 MiB: split it into several files and apply each"
        );
    }

    #[tokio::test]
    async fn the_affected_workloads_are_those_whose_configuration_changed() {
        let p = Plane::with(
            "change-affected",
            ProxyBounds::default(),
            HistoryRetention::default(),
        );
        let first = apply(&p, DECLARATIONS, None).await.unwrap();
        assert_eq!(
            first.affected_workloads,
            vec!["shop/orders", "shop/payments"]
        );
        let one = apply(&p, &deny("d", "orders", 1, 1), None).await.unwrap();
        assert_eq!(one.affected_workloads, vec!["shop/orders"]);
        // A proxy of an undeclared workload counts once it has connected.
        let frontend = ResourceName {
            namespace: "shop".into(),
            name: "frontend".into(),
        };
        let _c = p.state.proxies.connect(
            "spiffe://td.test/ns/shop/sa/frontend",
            &frontend,
            crate::proxies::Connecting::default(),
        );
        let posture = "apiVersion: bulkhead.dev/v1alpha1\nkind: DefaultPosture\nmetadata: {name: default, namespace: shop}\nspec: {ingress: deny}\n";
        let all = apply(&p, posture, None).await.unwrap();
        assert_eq!(
            all.affected_workloads,
            vec!["shop/frontend", "shop/orders", "shop/payments"]
        );
        let same = apply(&p, posture, None).await.unwrap();
        assert_eq!(
            (same.revision, same.affected_workloads.len()),
            (all.revision, 0)
        );
    }

    #[tokio::test]
    async fn a_pruned_revision_says_so_and_names_the_oldest_kept() {
        let history = HistoryRetention {
            max_revisions: 2,
            max_age: Duration::from_secs(86_400),
        };
        let p = Plane::with("change-pruned", ProxyBounds::default(), history);
        apply(&p, DECLARATIONS, None).await.unwrap();
        for i in 0..3 {
            apply(&p, &deny("d", "orders", 1, i + 1), None)
                .await
                .unwrap();
        }
        let err = p
            .state
            .rollback(admin(pb::RollbackRequest {
                revision: 1,
                expect_revision: None,
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(
            err.message().starts_with("revision 1 was pruned: the control plane keeps the whole set of the newest 2 revisions for at most 1 days")
                && err.message().contains("The oldest revision it can restore is 3"),
            "{}",
            err.message()
        );
        let back = p
            .state
            .rollback(admin(pb::RollbackRequest {
                revision: 3,
                expect_revision: Some(4),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.revision, 5);
    }

    const AUDIT: &str = r#"
apiVersion: bulkhead.dev/v1alpha1
kind: DefaultPosture
metadata: {name: default, namespace: shop}
spec: {egress: allow}
---
apiVersion: bulkhead.dev/v1alpha1
kind: DefaultPosture
metadata: {name: recommended, namespace: shop}
spec: {ingress: deny, mode: audit}
"#;

    async fn promote(
        p: &Plane,
        key: &str,
        force: bool,
    ) -> Result<pb::PromoteResponse, tonic::Status> {
        p.state
            .promote(admin(pb::PromoteRequest {
                key: key.into(),
                window_seconds: 3600,
                force,
                expect_revision: None,
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    #[tokio::test]
    async fn promote_folds_a_posture_into_the_enforced_one_in_one_revision() {
        let p = Plane::with(
            "change-promote",
            ProxyBounds::default(),
            HistoryRetention::default(),
        );
        apply(&p, DECLARATIONS, None).await.unwrap();
        apply(&p, AUDIT, None).await.unwrap();
        let r = promote(&p, "DefaultPosture/shop/recommended", false)
            .await
            .unwrap();
        assert_eq!(r.result.as_ref().unwrap().revision, 3, "one revision");
        assert!(r.forced_over.is_empty());
        let snap = p.state.snapshot.borrow().clone();
        let postures: Vec<String> = snap
            .resources
            .iter()
            .filter(|r| r.kind() == "DefaultPosture")
            .map(|r| r.to_json().unwrap())
            .collect();
        assert_eq!(postures.len(), 1, "{postures:?}");
        assert!(
            postures[0].contains("\"ingress\":\"deny\"")
                && postures[0].contains("\"egress\":\"allow\""),
            "{postures:?}"
        );
        let history = p.state.store.history(1).unwrap();
        assert_eq!(history[0].action, "promote DefaultPosture/shop/recommended");

        let err = promote(&p, "DefaultPosture/shop/default", false)
            .await
            .unwrap_err();
        assert_eq!(
            err.message(),
            "DefaultPosture/shop/default is already enforced"
        );
        let err = promote(&p, "Workload/shop/orders", false)
            .await
            .unwrap_err();
        assert!(err.message().contains("have a mode"), "{}", err.message());
        let err = promote(&p, "AuthorizationPolicy/shop/ghost", false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn promote_is_refused_while_it_had_would_deny_flows_unless_forced() {
        let p = Plane::with(
            "change-would-deny",
            ProxyBounds::default(),
            HistoryRetention::default(),
        );
        apply(&p, DECLARATIONS, None).await.unwrap();
        apply(&p, AUDIT, None).await.unwrap();
        let mut blamed: Edge = crate::flows::tests::edge(
            "frontend",
            "payments",
            bulkhead_policy::model::Direction::Ingress,
            "/charge",
            crate::proxies::unix_now(),
        );
        blamed.key.verdict = EdgeVerdict::AllowWouldDeny;
        blamed.key.policy = Some("shop/recommended".into());
        blamed.key.method = Some("POST".into());
        p.state
            .store
            .merge_edges(
                &mut [blamed],
                crate::proxies::unix_now(),
                &crate::flows::FlowRetention::default(),
            )
            .unwrap();
        let err = promote(&p, "DefaultPosture/shop/recommended", false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().starts_with(
                "DefaultPosture/shop/recommended would have denied 1 requests in the last 3600s that are allowed today:\n  shop/frontend → shop/payments:8080 POST /charge (1 requests, last seen "
            ),
            "{}",
            err.message()
        );
        assert!(err.message().contains("pass --force"));
        assert_eq!(p.state.snapshot.borrow().revision, 2, "nothing changed");
        let r = promote(&p, "DefaultPosture/shop/recommended", true)
            .await
            .unwrap();
        assert_eq!(r.result.unwrap().revision, 3);
        assert!(r.forced_over.contains("would have denied 1 requests"));
    }
}
