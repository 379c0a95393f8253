//! Printing a recommendation as YAML an operator can review and apply: every resource in
//! audit mode, every rule preceded by its evidence in comments.
//!
//! Written by hand, because comments are what matters here and no serializer writes them.
//! The text must parse back to exactly [`Recommendation::resources`]; a test holds it to that.

use super::{
    LeftOut, LeftOutReason, Observed, Recommendation, RecommendedPolicy, RecommendedPosture,
    sanitize_comment,
};
use crate::edge::{EdgeStats, rfc3339};
use bulkhead_policy::model::Name;
use std::fmt::Write;

impl Recommendation {
    /// The recommendation as one YAML file: a comment header, then for each namespace its
    /// recommended posture and its policies. Policies with no rule print as comments only.
    pub fn to_yaml(&self) -> String {
        let mut docs = vec![self.header()];
        for ns in self.namespaces() {
            for p in self.postures.iter().filter(|p| &p.namespace == ns) {
                docs.push(posture_yaml(p));
            }
            for p in self.policies.iter().filter(|p| &p.namespace == ns) {
                docs.push(policy_yaml(p));
            }
        }
        docs.join("---\n")
    }

    fn header(&self) -> String {
        let mut out = String::new();
        if self.seen.count == 0 {
            out.push_str("# No ingress requests were observed; nothing to recommend.\n");
        } else {
            let _ = writeln!(
                out,
                "# Least-privilege ingress policy, recommended from {} seen\n# {} to {}.",
                requests(self.seen.count),
                rfc3339(self.seen.first_seen),
                rfc3339(self.seen.last_seen)
            );
            out.push_str(
                "# Everything here is in audit mode: apply it, watch the decisions for audit=would-deny\n\
                 # and audit=would-allow, then remove `mode: audit` to enforce it.\n",
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "# note: {}", sanitize_comment(note));
        }
        out
    }
}

fn posture_yaml(p: &RecommendedPosture) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Namespace {} admits what no rule decides today ({}).\n\
         # In audit mode, this posture reports every request there the recommended rules would not allow.",
        p.namespace,
        sanitize_comment(&p.admitted_by)
    );
    let _ = write!(
        out,
        "apiVersion: {}\nkind: DefaultPosture\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  ingress: deny\n  mode: audit\n",
        bulkhead_policy::API_VERSION,
        name(&p.name()),
        name(&p.namespace),
    );
    out
}

fn policy_yaml(p: &RecommendedPolicy) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {}/{}: {} seen {} to {}{}",
        p.namespace,
        p.workload,
        requests(p.seen.count),
        rfc3339(p.seen.first_seen),
        rfc3339(p.seen.last_seen),
        if p.rules.is_empty() {
            "; no rule recommended."
        } else {
            "."
        }
    );
    left_out_comments(&mut out, &p.left_out);
    if p.rules.is_empty() {
        return out;
    }
    let _ = write!(
        out,
        "apiVersion: {}\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  selector:\n    workload: {}\n  action: allow\n  mode: audit\n  rules:\n",
        bulkhead_policy::API_VERSION,
        name(&p.name),
        name(&p.namespace),
        name(&p.workload),
    );
    for r in &p.rules {
        let _ = writeln!(out, "    # evidence: {}", span(&r.seen));
        for o in &r.evidence {
            let _ = writeln!(out, "    #   {}: {}", describe(o), o.stats.count);
        }
        for note in &r.notes {
            let _ = writeln!(out, "    # note: {}", sanitize_comment(note));
        }
        let _ = writeln!(out, "    - name: {}", name(&r.name));
        let _ = writeln!(out, "      from:");
        let _ = writeln!(
            out,
            "        identities: [{}]",
            quote(&r.identity.to_string())
        );
        let _ = writeln!(out, "      to:");
        let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(out, "        ports: [{}]", ports.join(", "));
        if !r.methods.is_empty() {
            let methods: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
            let _ = writeln!(out, "        methods: [{}]", methods.join(", "));
        }
        if !r.paths.is_empty() {
            let paths: Vec<String> = r.paths.iter().map(|p| quote(&p.to_string())).collect();
            let _ = writeln!(out, "        paths: [{}]", paths.join(", "));
        }
    }
    out
}

/// The comment block for requests seen but not recommended, one heading per kind of reason.
fn left_out_comments(out: &mut String, left_out: &[LeftOut]) {
    let headings = [
        "denied, not recommended",
        "no identity (plaintext), not turned into rules",
        "cannot be written as a rule",
    ];
    let section = |r: &LeftOutReason| match r {
        LeftOutReason::Denied { .. } => 0,
        LeftOutReason::NoIdentity => 1,
        LeftOutReason::Unwritable(_) => 2,
    };
    for (i, heading) in headings.iter().enumerate() {
        let rows: Vec<&LeftOut> = left_out
            .iter()
            .filter(|l| section(&l.reason) == i)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# {heading}:");
        for l in rows {
            let why = match &l.reason {
                LeftOutReason::Denied {
                    policy,
                    rule,
                    would_allow,
                } => {
                    let mut by = match (policy, rule) {
                        (Some(p), Some(r)) => format!("; denied by policy {p} rule {r}"),
                        (Some(p), None) => format!("; denied by {p}"),
                        _ => String::new(),
                    };
                    if *would_allow {
                        by.push_str("; an audit-mode policy would allow it");
                    }
                    by
                }
                LeftOutReason::NoIdentity => String::new(),
                LeftOutReason::Unwritable(why) => format!("; {why}"),
            };
            let _ = writeln!(
                out,
                "#   {}, {}: {}, last seen {}{}",
                source(l),
                describe(&l.observed),
                requests(l.observed.stats.count),
                rfc3339(l.observed.stats.last_seen),
                sanitize_comment(&why)
            );
        }
    }
}

/// `spiffe://… (shop/frontend)`, `from shop/legacy`, `an unknown caller`.
fn source(l: &LeftOut) -> String {
    let s = match (&l.source_identity, &l.source_workload) {
        (Some(id), Some(w)) => format!("{id} ({w})"),
        (Some(id), None) => id.to_string(),
        (None, Some(w)) => format!("from {w}"),
        (None, None) => "from an unknown caller".into(),
    };
    sanitize_comment(&s)
}

/// `8080/http GET /orders/*`, `5432/tcp`.
fn describe(o: &Observed) -> String {
    let mut s = format!("{}/{}", o.port, o.protocol.as_str());
    for part in [&o.method, &o.path].into_iter().flatten() {
        s.push(' ');
        s.push_str(part);
    }
    sanitize_comment(&s)
}

/// `8080/http GET /orders/*`, `5432/tcp`: the shape of the requests, as the evidence
/// comments name it.
impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(self))
    }
}

fn span(s: &EdgeStats) -> String {
    format!(
        "{}, first seen {}, last seen {}",
        requests(s.count),
        rfc3339(s.first_seen),
        rfc3339(s.last_seen)
    )
}

fn requests(n: u64) -> String {
    if n == 1 {
        "1 request".into()
    } else {
        format!("{n} requests")
    }
}

/// A name as a YAML scalar: plain, unless YAML would read it as something else.
fn name(n: &Name) -> String {
    let s = n.as_str();
    let reserved = ["y", "n", "yes", "no", "on", "off", "true", "false", "null"];
    if s.starts_with(|c: char| c.is_ascii_digit()) || reserved.contains(&s) {
        quote(s)
    } else {
        s.to_string()
    }
}

/// A YAML double-quoted scalar.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
