//! What changed between an earlier recommendation and a new one, as traffic changes: which
//! policies and rules are new, gone, or changed, down to the single method or path.
//!
//! Resources are matched by kind/namespace/name and rules by name, so a rule whose caller
//! adds a method shows as that one `+` line. Only recommended resources take part (policies
//! named `…-recommended`, postures named `recommended`), so the previous side may be an
//! earlier recommendation file or the whole applied set.

use super::{POLICY_SUFFIX, POSTURE_NAME, Recommendation};
use bulkhead_policy::model::Resource;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// The changes, resources sorted by key, rules by name; empty when nothing changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecommendationDiff {
    pub resources: Vec<ResourceDiff>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// One resource that is new, gone, or changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDiff {
    /// `AuthorizationPolicy/shop/orders-recommended`
    pub key: String,
    pub change: Change,
    /// The spec outside the rules (`selector.workload: orders`, `mode: audit` …); for a
    /// changed resource only when it changed.
    pub spec: Vec<DiffLine>,
    /// The rules that are new, gone or changed.
    pub rules: Vec<RuleDiff>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDiff {
    pub name: String,
    pub change: Change,
    /// Every field value of the rule, one per line (`to.methods: POST`).
    pub lines: Vec<DiffLine>,
}

/// `field: value`, present on both sides, only the new one, or only the old one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiffLine {
    Same(String),
    Added(String),
    Removed(String),
}

impl RecommendationDiff {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

/// A resource flattened to `(field, value)` lines: the spec without its rules, and each rule.
#[derive(Default, PartialEq)]
struct Flat {
    spec: Vec<(String, String)>,
    rules: BTreeMap<String, Vec<(String, String)>>,
}

/// Compares the recommended resources in `previous` with `next`.
pub fn diff(previous: &[Resource], next: &Recommendation) -> RecommendationDiff {
    let before = flatten_all(previous);
    let after = flatten_all(&next.resources());
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let mut resources = Vec::new();
    for key in keys {
        let empty = Flat::default();
        let (change, old, new) = match (before.get(key), after.get(key)) {
            (Some(a), Some(b)) if a == b => continue,
            (Some(a), Some(b)) => (Change::Changed, a, b),
            (Some(a), None) => (Change::Removed, a, &empty),
            (None, Some(b)) => (Change::Added, &empty, b),
            (None, None) => continue,
        };
        let mut spec = lines(&old.spec, &new.spec);
        if change == Change::Changed && spec.iter().all(|l| matches!(l, DiffLine::Same(_))) {
            spec.clear();
        }
        let names: std::collections::BTreeSet<&String> =
            old.rules.keys().chain(new.rules.keys()).collect();
        let mut rules = Vec::new();
        for name in names {
            let (rule_change, a, b) = match (old.rules.get(name), new.rules.get(name)) {
                (Some(a), Some(b)) if a == b => continue,
                (Some(a), Some(b)) => (Change::Changed, a.as_slice(), b.as_slice()),
                (Some(a), None) => (Change::Removed, a.as_slice(), &[][..]),
                (None, Some(b)) => (Change::Added, &[][..], b.as_slice()),
                (None, None) => continue,
            };
            rules.push(RuleDiff {
                name: name.clone(),
                change: rule_change,
                lines: lines(a, b),
            });
        }
        resources.push(ResourceDiff {
            key: key.clone(),
            change,
            spec,
            rules,
        });
    }
    RecommendationDiff { resources }
}

fn flatten_all(resources: &[Resource]) -> BTreeMap<String, Flat> {
    let mut out = BTreeMap::new();
    for r in resources {
        let name = r.name().name;
        let (spec, rules) = match r {
            Resource::AuthorizationPolicy(doc) if name.ends_with(&format!("-{POLICY_SUFFIX}")) => {
                (serde_json::to_value(&doc.spec), doc.spec.rules.as_slice())
            }
            Resource::DefaultPosture(doc) if name == POSTURE_NAME => {
                (serde_json::to_value(&doc.spec), &[][..])
            }
            _ => continue,
        };
        let mut flat = Flat::default();
        if let Ok(Value::Object(mut spec)) = spec {
            spec.remove("rules");
            flatten("", &Value::Object(spec), &mut flat.spec);
        }
        for (i, rule) in rules.iter().enumerate() {
            let rule_name = match &rule.name {
                Some(n) => n.value.to_string(),
                None => format!("rules[{i}]"),
            };
            let mut lines = Vec::new();
            if let Ok(Value::Object(mut v)) = serde_json::to_value(rule) {
                v.remove("name");
                flatten("", &Value::Object(v), &mut lines);
            }
            flat.rules.insert(rule_name, lines);
        }
        out.insert(r.key(), flat);
    }
    out
}

/// Objects become dotted field names; each list entry is its own line.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            // Sorted here, whatever order the map keeps.
            let mut fields: Vec<(&String, &Value)> = map.iter().collect();
            fields.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in fields {
                let field = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&field, v, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        out.push((prefix.to_string(), item.to_string()));
                    }
                    scalar => flatten(prefix, scalar, out),
                }
            }
        }
        Value::Null => {}
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        scalar => out.push((prefix.to_string(), scalar.to_string())),
    }
}

/// Both sides' lines, field by field (in the order fields first appear), new values in
/// their order and then the removed ones.
fn lines(old: &[(String, String)], new: &[(String, String)]) -> Vec<DiffLine> {
    let mut fields: Vec<&String> = Vec::new();
    for (f, _) in new.iter().chain(old) {
        if !fields.contains(&f) {
            fields.push(f);
        }
    }
    let mut out = Vec::new();
    for f in fields {
        for line in new.iter().filter(|(g, _)| g == f) {
            let text = format!("{}: {}", line.0, line.1);
            out.push(if old.contains(line) {
                DiffLine::Same(text)
            } else {
                DiffLine::Added(text)
            });
        }
        for line in old.iter().filter(|(g, _)| g == f) {
            if !new.contains(line) {
                out.push(DiffLine::Removed(format!("{}: {}", line.0, line.1)));
            }
        }
    }
    out
}

fn mark(c: Change) -> char {
    match c {
        Change::Added => '+',
        Change::Removed => '-',
        Change::Changed => '~',
    }
}

fn write_lines(f: &mut fmt::Formatter<'_>, lines: &[DiffLine], indent: &str) -> fmt::Result {
    for l in lines {
        match l {
            DiffLine::Same(t) => writeln!(f, " {indent}{t}")?,
            DiffLine::Added(t) => writeln!(f, "+{indent}{t}")?,
            DiffLine::Removed(t) => writeln!(f, "-{indent}{t}")?,
        }
    }
    Ok(())
}

/// ```text
/// ~ AuthorizationPolicy/shop/orders-recommended
/// ~   rule from-frontend
///       from.identities: spiffe://bulkhead.local/ns/shop/sa/frontend
///       to.methods: GET
/// +     to.methods: POST
/// ```
impl fmt::Display for RecommendationDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.resources.is_empty() {
            return writeln!(f, "no changes");
        }
        for r in &self.resources {
            writeln!(f, "{} {}", mark(r.change), r.key)?;
            write_lines(f, &r.spec, "   ")?;
            for rule in &r.rules {
                writeln!(f, "{}   rule {}", mark(rule.change), rule.name)?;
                write_lines(f, &rule.lines, "     ")?;
            }
        }
        Ok(())
    }
}
