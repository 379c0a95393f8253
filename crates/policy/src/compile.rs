//! Compiling checked resources into an index, and evaluating requests against it.
//!
//! The index is keyed by destination workload first, so a decision only looks at the rules
//! that protect the workload being called.

use crate::decision::{Decision, Denial, NearMiss, Permit};
use crate::model::{Action, Resource, ResourceName, Rule, WorkloadRef};
use crate::pattern::{IdentityPattern, Method, PathPattern};
use std::collections::HashMap;
use std::sync::Arc;

/// One request as the enforcement point sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The verified SPIFFE ID of the caller.
    pub source: &'a str,
    pub workload: &'a WorkloadRef,
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
}

/// A compiled, immutable policy set at one revision.
#[derive(Debug, Default)]
pub struct PolicySet {
    revision: u64,
    by_workload: HashMap<WorkloadRef, WorkloadRules>,
}

#[derive(Debug, Default)]
struct WorkloadRules {
    deny: Vec<CompiledRule>,
    allow: Vec<CompiledRule>,
}

#[derive(Debug)]
struct CompiledRule {
    policy: Arc<ResourceName>,
    name: Arc<str>,
    from: Vec<IdentityPattern>,
    methods: Vec<Method>,
    paths: Vec<PathPattern>,
}

/// Which parts of a rule a request matched.
struct Match {
    identity: bool,
    method: bool,
    path: bool,
}

impl CompiledRule {
    fn check(&self, req: &Request<'_>) -> Match {
        Match {
            identity: self.from.is_empty() || self.from.iter().any(|p| p.matches(req.source)),
            method: self.methods.is_empty()
                || self.methods.iter().any(|m| m.as_str() == req.method),
            path: self.paths.is_empty() || self.paths.iter().any(|p| p.matches(req.path)),
        }
    }
}

impl Match {
    fn all(&self) -> bool {
        self.identity && self.method && self.path
    }

    fn near_miss(self, rule: &CompiledRule, req: &Request<'_>) -> (usize, NearMiss) {
        let mut matched = Vec::new();
        let mut failed = None;
        for (ok, attr, value) in [
            (self.identity, "identity", req.source),
            (self.method, "method", req.method),
            (self.path, "path", req.path),
        ] {
            if ok {
                matched.push(attr);
            } else if failed.is_none() {
                failed = Some(format!("{attr} {value}"));
            }
        }
        let score = matched.len();
        (
            score,
            NearMiss {
                policy: rule.policy.clone(),
                rule: rule.name.clone(),
                matched,
                failed: failed.unwrap_or_default(),
            },
        )
    }
}

impl PolicySet {
    /// Compiles checked resources at `revision`. Infallible: all checks happened on parse.
    pub fn compile(resources: &[Resource], revision: u64) -> PolicySet {
        let mut by_workload: HashMap<WorkloadRef, WorkloadRules> = HashMap::new();
        for res in resources {
            let Resource::AuthorizationPolicy(p) = res;
            let policy = Arc::new(p.name.clone());
            let entry = by_workload
                .entry(p.spec.selector.workload.clone())
                .or_default();
            let list = match p.spec.action {
                Action::Allow => &mut entry.allow,
                Action::Deny => &mut entry.deny,
            };
            list.extend(p.spec.rules.iter().map(|r: &Rule| CompiledRule {
                policy: policy.clone(),
                name: Arc::from(r.name.as_str()),
                from: r.from.clone(),
                methods: r.methods.clone(),
                paths: r.paths.clone(),
            }));
        }
        PolicySet {
            revision,
            by_workload,
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Decides one request: deny rules win, then allow rules, then the default deny.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let revision = self.revision;
        let Some(rules) = self.by_workload.get(req.workload) else {
            return Decision::Deny(Denial::Default {
                revision,
                nearest_miss: None,
            });
        };
        if let Some(r) = rules.deny.iter().find(|r| r.check(req).all()) {
            return Decision::Deny(Denial::Rule {
                policy: r.policy.clone(),
                rule: r.name.clone(),
                revision,
            });
        }
        let mut nearest: Option<(usize, NearMiss)> = None;
        for r in &rules.allow {
            let m = r.check(req);
            if m.all() {
                return Decision::Allow(Permit {
                    policy: r.policy.clone(),
                    rule: r.name.clone(),
                    revision,
                });
            }
            let (score, miss) = m.near_miss(r, req);
            if nearest.as_ref().is_none_or(|(best, _)| score > *best) {
                nearest = Some((score, miss));
            }
        }
        Decision::Deny(Denial::Default {
            revision,
            nearest_miss: nearest.map(|(_, m)| m),
        })
    }
}
