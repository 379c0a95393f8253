//! What an evaluation returns: a verdict and the reason for it, naming the policy and rule,
//! or the posture and the nearest miss; plus what audit-mode policies would have decided.

use crate::model::{Action, ResourceName};
use std::fmt;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

/// The verdict for one request. A denial is a value, never an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    pub revision: u64,
    /// Present when audit-mode policies apply to this workload and direction, or when its
    /// posture for the direction comes from an audit-mode DefaultPosture: the verdict they
    /// would give if they were enforced beside the enforced ones.
    pub audit: Option<Box<AuditOutcome>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A rule matched (deny rules are checked first and win).
    Rule {
        action: Action,
        policy: Arc<ResourceName>,
        rule: Arc<str>,
    },
    /// No rule matched; the posture decided.
    Posture {
        action: Action,
        source: PostureSource,
        nearest_miss: Option<NearMiss>,
    },
}

/// Which posture applied.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PostureSource {
    /// No DefaultPosture says otherwise: ingress deny, egress allow.
    BuiltIn,
    Mesh(Arc<ResourceName>),
    Namespace(Arc<ResourceName>),
    /// A mesh-wide DefaultPosture with `mode: audit`; only ever in an audit outcome.
    AuditMesh(Arc<ResourceName>),
    /// A namespace's DefaultPosture with `mode: audit`; only ever in an audit outcome.
    AuditNamespace(Arc<ResourceName>),
}

impl PostureSource {
    /// Whether this is a `mode: audit` DefaultPosture.
    pub fn is_audit(&self) -> bool {
        matches!(
            self,
            PostureSource::AuditMesh(_) | PostureSource::AuditNamespace(_)
        )
    }

    /// The DefaultPosture, if one (rather than the built-in posture) decided.
    pub fn resource(&self) -> Option<&Arc<ResourceName>> {
        match self {
            PostureSource::BuiltIn => None,
            PostureSource::Mesh(p)
            | PostureSource::Namespace(p)
            | PostureSource::AuditMesh(p)
            | PostureSource::AuditNamespace(p) => Some(p),
        }
    }
}

/// `built-in posture`, `namespace posture shop/default`, `audit mesh posture */staged` …
impl fmt::Display for PostureSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostureSource::BuiltIn => f.write_str("built-in posture"),
            PostureSource::Mesh(p) => write!(f, "mesh posture {p}"),
            PostureSource::Namespace(p) => write!(f, "namespace posture {p}"),
            PostureSource::AuditMesh(p) => write!(f, "audit mesh posture {p}"),
            PostureSource::AuditNamespace(p) => write!(f, "audit namespace posture {p}"),
        }
    }
}

/// What the verdict would be with every `mode: audit` policy and DefaultPosture enforced.
/// When a posture decides it and the outcome differs from the real verdict, a deny names
/// the nearest miss among the enforced and audit allow rules; otherwise `nearest_miss` is
/// `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditOutcome {
    pub verdict: Verdict,
    pub reason: Reason,
}

/// The allow rule that came closest to matching a denied request, and where it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearMiss {
    pub policy: Arc<ResourceName>,
    pub rule: Arc<str>,
    /// The conditions that did match, e.g. `["identity", "method"]`.
    pub matched: Vec<&'static str>,
    /// The first condition that did not, with the request's value: `path /admin`.
    pub failed: String,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// Whether audit-mode policies would turn this allow into a deny.
    pub fn would_deny(&self) -> bool {
        self.is_allow()
            && self
                .audit
                .as_ref()
                .is_some_and(|a| a.verdict == Verdict::Deny)
    }

    /// A compact, header-safe summary: `allow; policy=ns/name; rule=r; revision=3`.
    pub fn header_value(&self) -> String {
        let mut out = format!(
            "{}; {}; revision={}",
            verdict_word(self.verdict),
            reason_fields(&self.reason, ""),
            self.revision
        );
        if let Some(a) = self.audit.as_ref().filter(|a| a.verdict != self.verdict) {
            out.push_str(&format!(
                "; audit=would-{}; {}",
                verdict_word(a.verdict),
                reason_fields(&a.reason, "audit-")
            ));
            if let Reason::Posture { source, .. } = &a.reason
                && let Some(p) = source.resource()
            {
                out.push_str(&format!("; audit-posture={p}"));
            }
        }
        out
    }
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    }
}

/// `policy=…; rule=…`, each key with `prefix` in front.
fn reason_fields(r: &Reason, prefix: &str) -> String {
    match r {
        Reason::Rule { policy, rule, .. } => {
            format!("{prefix}policy={policy}; {prefix}rule={rule}")
        }
        Reason::Posture {
            action: Action::Deny,
            ..
        } => format!("{prefix}policy=default-deny"),
        Reason::Posture {
            action: Action::Allow,
            ..
        } => format!("{prefix}policy=default-allow"),
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rev = self.revision;
        match &self.reason {
            Reason::Rule {
                action: Action::Allow,
                policy,
                rule,
            } => write!(f, "allowed by policy {policy} rule {rule} (revision {rev})")?,
            Reason::Rule {
                action: Action::Deny,
                policy,
                rule,
            } => write!(f, "denied by policy {policy} rule {rule} (revision {rev})")?,
            Reason::Posture {
                action: Action::Deny,
                nearest_miss,
                ..
            } => {
                write!(
                    f,
                    "default deny: no policy allows this request (revision {rev})"
                )?;
                write_miss(f, nearest_miss)?;
            }
            Reason::Posture {
                action: Action::Allow,
                source: PostureSource::BuiltIn,
                ..
            } => write!(
                f,
                "allowed by default: nothing restricts this direction (revision {rev})"
            )?,
            Reason::Posture {
                action: Action::Allow,
                source,
                ..
            } => write!(f, "allowed by default: {source} (revision {rev})")?,
        }
        if let Some(a) = self.audit.as_ref().filter(|a| a.verdict != self.verdict) {
            write!(f, "; audit: would {} (", verdict_word(a.verdict))?;
            match &a.reason {
                Reason::Rule { policy, rule, .. } => write!(f, "policy {policy} rule {rule}")?,
                Reason::Posture {
                    action,
                    source,
                    nearest_miss,
                } => {
                    f.write_str(match action {
                        Action::Deny => "default deny",
                        Action::Allow => "default allow",
                    })?;
                    if *source != PostureSource::BuiltIn {
                        write!(f, " by {source}")?;
                    }
                    if *action == Action::Deny {
                        write_miss(f, nearest_miss)?;
                    }
                }
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

fn write_miss(f: &mut fmt::Formatter<'_>, miss: &Option<NearMiss>) -> fmt::Result {
    match miss {
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
