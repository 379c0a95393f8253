//! Warnings about a set that compiles but probably does not say what its author meant: a
//! selector that picks no declared workload (a misspelt name or label protects nothing and
//! denies nothing), caller labels that match nobody, and paths written as regular
//! expressions. `bulkhead policy lint` prints them; with `--strict` they fail the lint.
//!
//! A warning never changes what is compiled or enforced; this module only reads the set.

use crate::error::SourceLocation;
use crate::model::{Document, Resource, ResourceName, Selector};
use crate::pattern::{PathPattern, looks_like_regex};
use crate::source::Origin;
use std::collections::BTreeMap;
use std::fmt;

/// One warning, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// `None` for a resource that came from a store, not a file.
    pub location: Option<SourceLocation>,
    /// `Kind/namespace/name` of the resource.
    pub resource: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(l) => write!(f, "{l}: warning: {}", self.message),
            None => write!(f, "{}: warning: {}", self.resource, self.message),
        }
    }
}

/// The warnings for parsed files, in file order.
pub fn lint_parsed(parsed: &[(Resource, Origin)]) -> Vec<Warning> {
    let resources: Vec<Resource> = parsed.iter().map(|(r, _)| r.clone()).collect();
    let origins: Vec<Option<Origin>> = parsed.iter().map(|(_, o)| Some(o.clone())).collect();
    lint(&resources, &origins)
}

/// The warnings for a set; `origins[i]` says where `resources[i]` came from, if from a file.
pub fn lint(resources: &[Resource], origins: &[Option<Origin>]) -> Vec<Warning> {
    let workloads: Vec<(ResourceName, &BTreeMap<String, String>)> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(d) => Some((r.name(), &d.metadata.labels)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (i, r) in resources.iter().enumerate() {
        let mut warn = |pos: Option<(u32, u32)>, message: String| {
            out.push(Warning {
                location: origins.get(i).and_then(|o| o.as_ref()).map(|o| o.at(pos)),
                resource: r.key(),
                message,
            })
        };
        let ns = r.name().namespace;
        match r {
            Resource::AuthorizationPolicy(doc) => {
                let what = format!("policy {}", r.name());
                if let Some((pos, why)) = selects_nothing(&doc.spec.selector, doc, &ns, &workloads)
                {
                    warn(pos, format!("{what} {why}"));
                }
                for (n, rule) in doc.spec.rules.iter().enumerate() {
                    let rule_name = match &rule.name {
                        Some(name) => name.value.to_string(),
                        None => format!("rules[{n}]"),
                    };
                    let rule_pos = rule.name.as_ref().and_then(|n| n.position());
                    let rule_pos = rule_pos.or(rule.position());
                    if let Some(labels) = rule
                        .from
                        .as_ref()
                        .and_then(|f| f.value.workload_labels.as_ref())
                        .filter(|l| !l.is_empty())
                        && !workloads.iter().any(|(_, have)| contains(have, labels))
                    {
                        warn(
                            labels.position().or(rule_pos),
                            format!(
                                "{what} rule {rule_name}: no declared Workload has the labels {}, so this rule can never match (a misspelt label {} nothing)",
                                show(labels),
                                match doc.spec.action {
                                    crate::model::Action::Allow => "allows",
                                    crate::model::Action::Deny => "denies",
                                }
                            ),
                        );
                    }
                    let Some(to) = &rule.to else { continue };
                    for p in to.value.paths.iter().chain(&to.value.not_paths) {
                        let text = p.to_string();
                        if looks_like_regex(&text) {
                            warn(
                                to.position().or(rule_pos),
                                format!(
                                    "{what} rule {rule_name}: path {text:?} looks like a regular expression, but paths are literal text with * (part of one segment) and ** (any number of segments); it is read as {}",
                                    read_as(p)
                                ),
                            );
                        }
                    }
                }
            }
            Resource::Service(doc) => {
                if let Some((pos, why)) = selects_nothing(&doc.spec.selector, doc, &ns, &workloads)
                {
                    warn(pos, format!("Service {} {why}", r.name()));
                }
            }
            Resource::Workload(_) | Resource::DefaultPosture(_) => {}
        }
    }
    out
}

fn contains(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// `{app: orders, tier: backend}`
fn show(labels: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", items.join(", "))
}

fn read_as(p: &PathPattern) -> String {
    match p {
        PathPattern::Exact(e) => format!("the exact path {e:?}"),
        PathPattern::Prefix(prefix) => format!("the prefix {prefix:?}"),
        PathPattern::Glob(g) => format!("the glob {:?}", g.as_str()),
    }
}

/// Why a selector picks no declared workload, and where to point, if it picks none.
fn selects_nothing<S>(
    sel: &Selector,
    doc: &Document<S>,
    ns: &str,
    workloads: &[(ResourceName, &BTreeMap<String, String>)],
) -> Option<(Option<(u32, u32)>, String)> {
    let in_ns = || workloads.iter().filter(|(w, _)| w.namespace == ns);
    if let Some(w) = &sel.workload {
        let declared = in_ns().any(|(name, _)| name.name == w.value.as_str());
        return (!declared).then(|| {
            (
                w.position(),
                format!(
                    "selects workload {ns}/{}, which no Workload declares; if the name is misspelt it protects nothing (declare the Workload, or fix the name)",
                    w.value
                ),
            )
        });
    }
    if in_ns().any(|(_, labels)| contains(labels, &sel.match_labels)) {
        return None;
    }
    let pos = sel.match_labels.position().or(doc.metadata.name.position());
    Some(match sel.match_labels.is_empty() {
        true => (
            pos,
            format!("selects every declared Workload of namespace {ns}, and none is declared"),
        ),
        false => (
            pos,
            format!(
                "selects no declared Workload: none in namespace {ns} has the labels {}; a misspelt label selects nothing",
                show(&sel.match_labels)
            ),
        ),
    })
}
