//! The resource set the cluster asks for: the mesh's current set, less what the controller
//! wrote before, plus what it derives now and the CRs that compile.
//!
//! Ownership is the `bulkhead.dev/managed-by: kubernetes` label: every resource with it is the
//! controller's to replace or delete; resources applied with `bulkhead apply` are kept, unless
//! the cluster declares the same `Kind/namespace/name` (the cluster wins, and the change log
//! shows it). A CR overrides a derived resource of the same key.
//!
//! A CR whose new version does not parse or does not compile with the rest is refused like a
//! refused apply: its previous version, if the mesh holds one, stays in force, and it gets a
//! condition saying why. An error no new CR version explains (a derived Workload that no
//! longer fits a policy applied by hand, say) blocks the whole change: nothing is committed,
//! and the mesh keeps enforcing what it has. Pure; it must never drop a resource it does not
//! own, and never let one bad CR hold back the others.

use crate::cr::{CrRefusal, FieldPaths, ParsedCr};
use crate::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use bulkhead_policy::model::Resource;
use bulkhead_policy::{Origin, PolicyError, PolicySet};
use std::collections::{BTreeMap, BTreeSet};

/// One CR as the controller found it.
#[derive(Clone, Debug)]
pub struct CrInput {
    /// `Kind/namespace/name`.
    pub key: String,
    pub parsed: Result<ParsedCr, CrRefusal>,
}

/// What became of a CR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrOutcome {
    /// This version is in the set.
    Accepted,
    /// This version is not; the previous one (if any) still is.
    Refused(CrRefusal),
}

/// The set to commit, or why none can be.
#[derive(Clone, Debug)]
pub struct Plan {
    /// In key order.
    pub set: Vec<Resource>,
    /// Where each resource of `set` came from, for the compiler's errors (CRs only).
    pub origins: Vec<Option<Origin>>,
    pub outcomes: BTreeMap<String, CrOutcome>,
    /// Errors no CR's new version explains; when any, `set` must not be committed.
    pub blocked: Vec<String>,
}

/// Whether the controller wrote `r`.
pub fn is_managed(r: &Resource) -> bool {
    r.metadata()
        .labels
        .get(MANAGED_BY_LABEL)
        .map(String::as_str)
        == Some(MANAGED_BY_VALUE)
}

/// The key an error is about: the CR file it points into, or the resource it names.
fn blamed_key(e: &PolicyError) -> &str {
    match e {
        PolicyError::Parse { location, .. } | PolicyError::Invalid { location, .. } => {
            &location.file
        }
        PolicyError::Model { resource, .. } => resource,
    }
}

/// Plans the set for `current` given what the cluster declares now.
pub fn plan(current: &[Resource], derived: Vec<Resource>, crs: Vec<CrInput>) -> Plan {
    let mut outcomes: BTreeMap<String, CrOutcome> = BTreeMap::new();
    let mut fresh: BTreeMap<String, ParsedCr> = BTreeMap::new();
    let mut refused_keys: BTreeSet<String> = BTreeSet::new();
    for cr in crs {
        match cr.parsed {
            Ok(p) => {
                fresh.insert(cr.key, p);
            }
            Err(refusal) => {
                refused_keys.insert(cr.key.clone());
                outcomes.insert(cr.key, CrOutcome::Refused(refusal));
            }
        }
    }
    let previous: BTreeMap<String, &Resource> = current
        .iter()
        .filter(|r| is_managed(r))
        .map(|r| (r.key(), r))
        .collect();
    loop {
        let mut by_key: BTreeMap<String, (Resource, Option<Origin>)> = BTreeMap::new();
        for r in current.iter().filter(|r| !is_managed(r)) {
            by_key.insert(r.key(), (r.clone(), None));
        }
        for r in &derived {
            by_key.insert(r.key(), (r.clone(), None));
        }
        for key in &refused_keys {
            match previous.get(key) {
                Some(old) => {
                    by_key.insert(key.clone(), ((*old).clone(), None));
                }
                None => {
                    // A derived resource of that key stays; a hand-applied one too.
                }
            }
        }
        for (key, p) in &fresh {
            by_key.insert(key.clone(), (p.resource.clone(), Some(p.origin.clone())));
        }
        let (set, origins): (Vec<Resource>, Vec<Option<Origin>>) = by_key.into_values().unzip();
        let errors = match PolicySet::compile_with_origins(&set, &origins, 0) {
            Ok(_) => Vec::new(),
            Err(errors) => errors,
        };
        let mut newly_refused: Vec<(String, CrRefusal)> = Vec::new();
        for e in &errors {
            let key = blamed_key(e);
            if let Some(p) = fresh.get(key)
                && !newly_refused.iter().any(|(k, _)| k == key)
            {
                newly_refused.push((key.to_string(), p.paths.refusal(e)));
            }
        }
        if errors.is_empty() || newly_refused.is_empty() {
            for key in fresh.keys() {
                outcomes.insert(key.clone(), CrOutcome::Accepted);
            }
            return Plan {
                set,
                origins,
                outcomes,
                blocked: errors.iter().map(ToString::to_string).collect(),
            };
        }
        for (key, refusal) in newly_refused {
            fresh.remove(&key);
            refused_keys.insert(key.clone());
            outcomes.insert(key, CrOutcome::Refused(refusal));
        }
    }
}

/// A refusal for an error that has no field map (the whole CR).
pub fn unlocated(message: String) -> CrRefusal {
    FieldPaths::default().refusal(&PolicyError::Model {
        resource: String::new(),
        message,
    })
}
