//! Reachability answers as people and programs read them: an edge with the grants on each
//! side, every grant named the one way `bulkhead reach` prints it (table and JSON) and the
//! web console shows it. Both take them from here so that they can never disagree.
//!
//! Only presentation: a view holds what the analysis found, nothing less.

use super::{Grant, ReachEdge};
use crate::decision::PostureSource;
use crate::model::Mode;
use crate::pattern::Protocol;
use serde::Serialize;
use std::fmt;

/// One edge: `from` can send requests to `to` on `port`, and what allows it on each side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeView {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Empty when egress is bypassed.
    pub egress: Vec<GrantView>,
    pub ingress: Vec<GrantView>,
}

/// What allows one side of an edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum GrantView {
    Rule {
        policy: String,
        rule: String,
        mode: Mode,
    },
    Posture {
        scope: PostureScope,
        mode: Mode,
        /// The DefaultPosture; absent for the built-in posture.
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PostureScope {
    BuiltIn,
    Mesh,
    Namespace,
}

impl From<&Grant> for GrantView {
    fn from(g: &Grant) -> GrantView {
        match g {
            Grant::Rule { policy, rule, mode } => GrantView::Rule {
                policy: policy.to_string(),
                rule: rule.to_string(),
                mode: *mode,
            },
            Grant::Posture(source) => {
                let (scope, mode) = match source {
                    PostureSource::BuiltIn => (PostureScope::BuiltIn, Mode::Enforce),
                    PostureSource::Mesh(_) => (PostureScope::Mesh, Mode::Enforce),
                    PostureSource::Namespace(_) => (PostureScope::Namespace, Mode::Enforce),
                    PostureSource::AuditMesh(_) => (PostureScope::Mesh, Mode::Audit),
                    PostureSource::AuditNamespace(_) => (PostureScope::Namespace, Mode::Audit),
                };
                GrantView::Posture {
                    scope,
                    mode,
                    resource: source.resource().map(ToString::to_string),
                }
            }
        }
    }
}

impl From<&ReachEdge> for EdgeView {
    fn from(e: &ReachEdge) -> EdgeView {
        EdgeView {
            from: e.from.to_string(),
            to: e.to.to_string(),
            port: e.port,
            protocol: e.protocol,
            egress: e.egress.iter().map(GrantView::from).collect(),
            ingress: e.ingress.iter().map(GrantView::from).collect(),
        }
    }
}

impl EdgeView {
    /// `egress: policy shop/a rule x; ingress: policy shop/b rules y and z`
    pub fn allowed_by(&self) -> String {
        let egress = match self.egress.is_empty() {
            true => "not enforced (stolen key)".to_string(),
            false => grants(&self.egress),
        };
        format!("egress: {egress}; ingress: {}", grants(&self.ingress))
    }
}

/// The grants, the rules of one policy together: `policy shop/a rules x and y, built-in
/// posture`.
fn grants(list: &[GrantView]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < list.len() {
        let GrantView::Rule { policy, mode, .. } = &list[i] else {
            parts.push(list[i].to_string());
            i += 1;
            continue;
        };
        let mut rules = Vec::new();
        while let Some(GrantView::Rule {
            policy: p,
            mode: m,
            rule,
        }) = list.get(i)
        {
            if p != policy || m != mode {
                break;
            }
            rules.push(rule.as_str());
            i += 1;
        }
        let audit = if *mode == Mode::Audit { "audit " } else { "" };
        let names = match rules.split_last() {
            Some((last, [])) => format!("rule {last}"),
            Some((last, rest)) => format!("rules {} and {last}", rest.join(", ")),
            None => String::new(), // unreachable: the loop took list[i] at least
        };
        parts.push(format!("{audit}policy {policy} {names}"));
    }
    parts.join(", ")
}

/// `policy shop/a rule x`, `audit namespace posture shop/staged`, `built-in posture`: as the
/// policy crate names grants.
impl fmt::Display for GrantView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let audit = |mode: &Mode| if *mode == Mode::Audit { "audit " } else { "" };
        match self {
            GrantView::Rule { policy, rule, mode } => {
                write!(f, "{}policy {policy} rule {rule}", audit(mode))
            }
            GrantView::Posture {
                scope: PostureScope::BuiltIn,
                ..
            } => f.write_str("built-in posture"),
            GrantView::Posture {
                scope,
                mode,
                resource,
            } => {
                let scope = match scope {
                    PostureScope::Mesh => "mesh",
                    _ => "namespace",
                };
                let name = resource.as_deref().unwrap_or_default();
                write!(f, "{}{scope} posture {name}", audit(mode))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(policy: &str, rule: &str, mode: Mode) -> GrantView {
        GrantView::Rule {
            policy: policy.into(),
            rule: rule.into(),
            mode,
        }
    }

    #[test]
    fn grants_read_as_a_list_with_rules_grouped_by_policy() {
        let list = [
            rule("shop/a", "x", Mode::Enforce),
            rule("shop/a", "y", Mode::Enforce),
            rule("shop/a", "z", Mode::Enforce),
            rule("shop/b", "w", Mode::Audit),
            GrantView::Posture {
                scope: PostureScope::Namespace,
                mode: Mode::Audit,
                resource: Some("shop/staged".into()),
            },
            GrantView::Posture {
                scope: PostureScope::BuiltIn,
                mode: Mode::Enforce,
                resource: None,
            },
        ];
        assert_eq!(
            grants(&list),
            "policy shop/a rules x, y and z, audit policy shop/b rule w, \
             audit namespace posture shop/staged, built-in posture"
        );
    }
}
