//! The policies view: the applied set (`bulkhead get`), each policy's and posture's hits and
//! would-denies from the stored edges, the history (`bulkhead history`) with the diff each
//! revision made, and the recommendation (`bulkhead recommend` and `--diff`) with its
//! evidence.
//!
//! A revision's diff is the line diff of each changed resource's YAML between the set before
//! it and the set it made; revisions never change, so each diff is computed once.

use super::views::{ViewError, edges, since};
use crate::proxies::unix_now;
use crate::service::State;
use bulkhead_insight::{EdgeVerdict, RecommendOptions};
use bulkhead_policy::model::{Mode, Resource};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Revisions listed with their diffs.
const HISTORY_SHOWN: usize = 30;
/// Revision diffs kept; beyond, the cache starts over.
const MAX_DIFFS: usize = 500;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PoliciesView {
    revision: u64,
    since: u64,
    resources: Vec<ResourceView>,
    history: Vec<RevisionView>,
    recommendation: RecommendationView,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceView {
    /// `AuthorizationPolicy/shop/orders-allow-frontend`
    key: String,
    kind: &'static str,
    /// `shop/orders-allow-frontend`, as edges and decisions name it.
    name: String,
    mode: Option<Mode>,
    summary: String,
    yaml: String,
    hits: Hits,
}

/// Requests a policy or posture decided, by outcome, in the window.
#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Hits {
    allowed: u64,
    denied: u64,
    would_deny: u64,
    would_allow: u64,
    last_seen: u64,
}

#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RevisionView {
    revision: u64,
    time_unix: u64,
    actor: String,
    action: String,
    changes: Vec<String>,
    diff: Vec<ResourceDiff>,
}

#[derive(Clone, Serialize)]
struct ResourceDiff {
    key: String,
    lines: Vec<DiffLine>,
}

/// One line of a diff: `" "` kept, `"+"` added, `"-"` removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct DiffLine {
    op: &'static str,
    text: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RecommendationView {
    /// `bulkhead recommend`: the YAML with the evidence in comments.
    yaml: String,
    /// `bulkhead recommend --diff`: against the recommendation applied now.
    diff: String,
    policies: Vec<RecommendedView>,
    notes: Vec<String>,
    /// Ingress requests it was made from.
    requests: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RecommendedView {
    name: String,
    workload: String,
    rules: Vec<RuleView>,
    /// Requests seen but not recommended (denied, or without an identity); the YAML lists
    /// them in comments.
    left_out: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RuleView {
    name: String,
    identity: String,
    ports: Vec<u16>,
    methods: Vec<String>,
    paths: Vec<String>,
    requests: u64,
    last_seen: u64,
    /// `8080/http GET /orders/*: 12 requests` …, most frequent first.
    evidence: Vec<String>,
    notes: Vec<String>,
}

pub(super) fn view(state: &State, window: u64) -> Result<PoliciesView, ViewError> {
    let now = unix_now();
    let since = since(window, now);
    let snapshot = state.snapshot.borrow().clone();
    let edges = edges(state, since, now)?;
    let mut hits: BTreeMap<&str, Hits> = BTreeMap::new();
    for e in &edges {
        let Some(policy) = e.key.policy.as_deref() else {
            continue;
        };
        let h = hits.entry(policy).or_default();
        let n = e.stats.count;
        match e.key.verdict {
            EdgeVerdict::Allow => h.allowed += n,
            EdgeVerdict::Deny => h.denied += n,
            EdgeVerdict::AllowWouldDeny => h.would_deny += n,
            EdgeVerdict::DenyWouldAllow => h.would_allow += n,
        }
        h.last_seen = h.last_seen.max(e.stats.last_seen);
    }
    let resources = snapshot
        .resources
        .iter()
        .map(|r| {
            let name = r.name().to_string();
            ResourceView {
                key: r.key(),
                kind: r.kind(),
                mode: match r {
                    Resource::AuthorizationPolicy(d) => Some(d.spec.mode),
                    Resource::DefaultPosture(d) => Some(d.spec.mode),
                    _ => None,
                },
                summary: r.summary(),
                yaml: r
                    .to_yaml()
                    .unwrap_or_else(|e| format!("# cannot print: {e}\n")),
                hits: match r {
                    Resource::AuthorizationPolicy(_) | Resource::DefaultPosture(_) => {
                        hits.remove(name.as_str()).unwrap_or_default()
                    }
                    _ => Hits::default(),
                },
                name,
            }
        })
        .collect();
    let history = state
        .store
        .history(HISTORY_SHOWN)?
        .into_iter()
        .map(|r| state.console.diffs.revision(state, r).map(|v| (*v).clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let rec =
        bulkhead_insight::recommend(&edges, &snapshot.resources, &RecommendOptions::default());
    let recommendation = RecommendationView {
        yaml: rec.to_yaml(),
        diff: bulkhead_insight::diff(&snapshot.resources, &rec).to_string(),
        policies: rec
            .policies
            .iter()
            .map(|p| RecommendedView {
                name: format!("{}/{}", p.namespace.as_str(), p.name.as_str()),
                workload: format!("{}/{}", p.namespace.as_str(), p.workload.as_str()),
                rules: p
                    .rules
                    .iter()
                    .map(|r| RuleView {
                        name: r.name.as_str().to_string(),
                        identity: r.identity.to_string(),
                        ports: r.ports.clone(),
                        methods: r.methods.iter().map(|m| m.as_str().to_string()).collect(),
                        paths: r.paths.iter().map(ToString::to_string).collect(),
                        requests: r.seen.count,
                        last_seen: r.seen.last_seen,
                        evidence: r
                            .evidence
                            .iter()
                            .map(|o| match o.would_deny {
                                0 => format!("{o}: {} requests", o.stats.count),
                                n => format!(
                                    "{o}: {} requests, {n} of them would be denied today",
                                    o.stats.count
                                ),
                            })
                            .collect(),
                        notes: r.notes.clone(),
                    })
                    .collect(),
                left_out: p.left_out.len(),
            })
            .collect(),
        notes: rec.notes.clone(),
        requests: rec.seen.count,
    };
    Ok(PoliciesView {
        revision: snapshot.revision,
        since,
        resources,
        history,
        recommendation,
    })
}

/// Each revision's view with its diff, made once.
#[derive(Default)]
pub(super) struct Diffs {
    made: Mutex<BTreeMap<u64, Arc<RevisionView>>>,
}

impl Diffs {
    fn revision(
        &self,
        state: &State,
        r: crate::store::RevisionRecord,
    ) -> Result<Arc<RevisionView>, ViewError> {
        let lock = || self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = lock().get(&r.revision) {
            return Ok(v.clone());
        }
        let before = state.store.set_at(r.revision.saturating_sub(1))?.known();
        let after = state.store.set_at(r.revision)?.known();
        let view = Arc::new(RevisionView {
            revision: r.revision,
            time_unix: r.time_unix,
            actor: r.actor,
            action: r.action,
            changes: r.changes,
            // A pruned snapshot leaves the diff unknown: shown as none, never as a guess.
            diff: match (before, after) {
                (Some(before), Some(after)) => diff_sets(&before, &after),
                _ => Vec::new(),
            },
        });
        let mut made = lock();
        if made.len() >= MAX_DIFFS {
            made.clear();
        }
        made.insert(view.revision, view.clone());
        Ok(view)
    }
}

/// Each resource whose YAML differs between `before` and `after`, with the line diff.
fn diff_sets(before: &[Resource], after: &[Resource]) -> Vec<ResourceDiff> {
    let yaml = |set: &[Resource]| -> BTreeMap<String, String> {
        set.iter()
            .map(|r| (r.key(), r.to_yaml().unwrap_or_default()))
            .collect()
    };
    let (old, new) = (yaml(before), yaml(after));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let a = old.get(k).map(String::as_str).unwrap_or_default();
            let b = new.get(k).map(String::as_str).unwrap_or_default();
            (a != b).then(|| ResourceDiff {
                key: k.clone(),
                lines: line_diff(a, b),
            })
        })
        .collect()
}

/// The lines of `a` and `b` in order, each kept, removed or added, by their longest common
/// subsequence. Resources are short, so the quadratic table is small.
fn line_diff(a: &str, b: &str) -> Vec<DiffLine> {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = Vec::with_capacity(n.max(m));
    let (mut i, mut j) = (0, 0);
    let line = |op, text: &str| DiffLine {
        op,
        text: text.to_string(),
    };
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push(line(" ", a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(line("+", b[j]));
            j += 1;
        } else {
            out.push(line("-", a[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ops(d: &[DiffLine]) -> String {
        d.iter().map(|l| format!("{}{}\n", l.op, l.text)).collect()
    }

    #[test]
    fn a_line_diff_keeps_what_both_sides_share() {
        let d = line_diff("a\nb\nc\n", "a\nc\nd\n");
        assert_eq!(ops(&d), " a\n-b\n c\n+d\n");
        assert_eq!(ops(&line_diff("", "x\n")), "+x\n");
        assert_eq!(ops(&line_diff("x\n", "")), "-x\n");
    }

    #[test]
    fn a_revision_diff_lists_changed_resources_only() {
        let doc = |methods: &str| {
            format!(
                "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  selector: {{workload: orders}}\n  action: allow\n  rules:\n    - name: r\n      from: {{identities: [\"spiffe://t/ns/shop/sa/f\"]}}\n      to: {{methods: [{methods}]}}\n"
            )
        };
        let w = "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: orders, namespace: shop}\nspec:\n  identity: spiffe://t/ns/shop/sa/orders\n  ports: [{port: 8080, protocol: http}]\n";
        let before =
            bulkhead_policy::parse_documents("a", &format!("{w}---\n{}", doc("GET"))).unwrap();
        let after = bulkhead_policy::parse_documents("b", &format!("{w}---\n{}", doc("GET, POST")))
            .unwrap();
        let d = diff_sets(&before, &after);
        assert_eq!(d.len(), 1, "the Workload did not change");
        assert_eq!(d[0].key, "AuthorizationPolicy/shop/p");
        let added: Vec<&str> = d[0]
            .lines
            .iter()
            .filter(|l| l.op == "+")
            .map(|l| l.text.trim())
            .collect();
        assert_eq!(added, vec!["- POST"], "{}", ops(&d[0].lines));
        let gone = diff_sets(&after, &before[..1]);
        assert!(gone[0].lines.iter().all(|l| l.op == "-"));
    }
}
