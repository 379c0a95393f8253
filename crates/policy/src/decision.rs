//! What an evaluation returns: a permit or a denial, each naming what made it.

use crate::model::ResourceName;
use std::fmt;
use std::sync::Arc;

/// The verdict for one request. A denial is a value, never an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Permit),
    Deny(Denial),
}

/// The allow rule that let a request through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permit {
    pub policy: Arc<ResourceName>,
    pub rule: Arc<str>,
    pub revision: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A deny rule matched. Deny wins over any allow.
    Rule {
        policy: Arc<ResourceName>,
        rule: Arc<str>,
        revision: u64,
    },
    /// No allow rule matched: the mesh default. Names the closest allow rule, if any.
    Default {
        revision: u64,
        nearest_miss: Option<NearMiss>,
    },
}

/// The allow rule that came closest to matching a denied request, and where it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearMiss {
    pub policy: Arc<ResourceName>,
    pub rule: Arc<str>,
    /// The attributes that did match, e.g. `["identity", "method"]`.
    pub matched: Vec<&'static str>,
    /// The first attribute that did not, with the request's value: `path /admin`.
    pub failed: String,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// A compact, header-safe summary: `allow; policy=ns/name; rule=r; revision=3`.
    pub fn header_value(&self) -> String {
        match self {
            Decision::Allow(p) => format!(
                "allow; policy={}; rule={}; revision={}",
                p.policy, p.rule, p.revision
            ),
            Decision::Deny(Denial::Rule {
                policy,
                rule,
                revision,
            }) => format!("deny; policy={policy}; rule={rule}; revision={revision}"),
            Decision::Deny(Denial::Default { revision, .. }) => {
                format!("deny; policy=default-deny; revision={revision}")
            }
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow(p) => write!(
                f,
                "allowed by policy {} rule {} (revision {})",
                p.policy, p.rule, p.revision
            ),
            Decision::Deny(d) => d.fmt(f),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Rule {
                policy,
                rule,
                revision,
            } => write!(
                f,
                "denied by policy {policy} rule {rule} (revision {revision})"
            ),
            Denial::Default {
                revision,
                nearest_miss,
            } => {
                write!(
                    f,
                    "default deny: no policy allows this request (revision {revision})"
                )?;
                match nearest_miss {
                    Some(m) if m.matched.is_empty() => write!(
                        f,
                        "; nearest miss: policy {} rule {} did not match {}",
                        m.policy, m.rule, m.failed
                    ),
                    Some(m) => write!(
                        f,
                        "; nearest miss: policy {} rule {} matched the {} but not {}",
                        m.policy,
                        m.rule,
                        m.matched.join(" and "),
                        m.failed
                    ),
                    None => write!(f, "; no allow policy selects this workload"),
                }
            }
        }
    }
}
