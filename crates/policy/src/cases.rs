//! Tables of requests and the verdict each should get: the format `bulkhead policy test`,
//! `policy diff` and `policy explain` read, and the one this crate's own tests use, so a
//! pipeline's cases and ours cannot drift apart.
//!
//! Every request is judged as a sidecar judges it: through the [`canonical`]
//! request, so a path, method or host a sidecar refuses with 400 is refused here too. A case
//! that names something no file declares (a workload, a caller identity, a method, a port) is
//! an error ([`CaseError`]), not a silent default deny: a misspelt case must never pass.

use crate::canonical::{self, CanonicalRequest, RawRequest, Refusal};
use crate::model::{Direction, ResourceName, parse_workload};
use crate::{Decision, IdentityPattern, KNOWN_METHODS, Peer, PolicySet, Protocol, Reason, Request};
use core::net::IpAddr;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// A file of cases: `cases: [...]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub cases: Vec<Case>,
}

/// Reads a cases file (its name is used in located errors).
pub fn read_cases(file: &str, bytes: &[u8]) -> Result<Vec<Case>, crate::PolicyError> {
    let text = crate::text_of(file, bytes)?;
    let cases: CaseFile = crate::read_yaml(file, text)?;
    Ok(cases.cases)
}

/// One request. Ingress: `from` is the caller's SPIFFE ID and `to` the protected
/// `namespace/workload:port`. Egress: `from` is the sending `namespace/workload`, `to` the
/// destination `namespace/workload:port`, and `toIdentity` the ID it must present (by
/// default the one its Workload declares).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub direction: Direction,
    /// Absent only with `caller: unauthenticated`.
    #[serde(default)]
    pub from: Option<String>,
    pub to: String,
    #[serde(default)]
    pub to_identity: Option<String>,
    /// Ingress: who the caller is (see [`Caller`]).
    #[serde(default)]
    pub caller: Caller,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Default: the protocol the destination's Workload declares for the port.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub method: Option<String>,
    /// The request target: a path, with a query if you like.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// A value, or a list of values for a header sent more than once.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValues>,
    /// `allow`, `deny` or `refuse`; required by `policy test`.
    #[serde(default)]
    pub expect: Option<Expect>,
    /// The policy (`namespace/name`) expected to decide, if the test cares.
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
}

/// Who calls, on ingress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Caller {
    /// `from` is the identity of a declared Workload (misspelt ones are errors).
    #[default]
    Declared,
    /// `from` is an identity no Workload declares, on purpose (another trust domain, a
    /// workload outside the policy files).
    Undeclared,
    /// No certificate: a plaintext caller on a permissive port. `from` is left out.
    Unauthenticated,
}

/// A header's value, or its values when it is sent more than once.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

/// The verdict a case expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    /// Kept from the app: denied by policy (403), or refused before policy (400).
    Deny,
    /// Refused before policy, as malformed or ambiguous (400).
    Refuse,
}

impl Expect {
    pub fn word(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::Refuse => "refuse",
        }
    }
}

/// What happens to a request.
#[derive(Debug)]
pub enum Outcome {
    /// A sidecar answers 400 before any policy.
    Refused(Refusal),
    Decided(Decision),
}

impl Outcome {
    /// `allow`, `deny` or `refuse`.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Refused(_) => "refuse",
            Outcome::Decided(d) if d.is_allow() => "allow",
            Outcome::Decided(_) => "deny",
        }
    }

    /// Whether the outcome is what `expect` asks for (a refusal also keeps a request from
    /// the app, so it meets `deny`).
    pub fn meets(&self, expect: Expect) -> bool {
        match (self, expect) {
            (Outcome::Refused(_), Expect::Deny | Expect::Refuse) => true,
            (Outcome::Decided(d), Expect::Allow) => d.is_allow(),
            (Outcome::Decided(d), Expect::Deny) => !d.is_allow(),
            (Outcome::Refused(_), Expect::Allow) | (Outcome::Decided(_), Expect::Refuse) => false,
        }
    }

    /// The policy and rule that decided, when a rule did.
    pub fn decided_by(&self) -> (Option<String>, Option<String>) {
        match self {
            Outcome::Decided(Decision {
                reason: Reason::Rule { policy, rule, .. },
                ..
            }) => (Some(policy.to_string()), Some(rule.to_string())),
            _ => (None, None),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Refused(why) => write!(f, "refused before any policy (400): {why}"),
            Outcome::Decided(d) => write!(f, "{d}"),
        }
    }
}

/// What a checked case got wrong about the policy set, or how it failed to parse. `case` is
/// `case "<name>"`, or `the request` for `explain`'s one nameless request.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{to:?}: expected namespace/workload:port")]
    Target { to: String },
    #[error("{to:?}: {port:?} is not a port")]
    Port { to: String, port: String },
    #[error("{0}")]
    Workload(String),
    #[error("{case}: {id:?} is a pattern; a caller has one exact SPIFFE ID")]
    Pattern { case: String, id: String },
    #[error("{case}: {message}")]
    Identity { case: String, message: String },
    #[error("{case}: no Workload {workload} is declared; {MISSPELT} (declare it, or fix the name)")]
    UnknownWorkload {
        case: String,
        workload: ResourceName,
    },
    #[error("{case}: {workload} declares no port {port} (it declares {}); {MISSPELT}", list(.declared))]
    UnknownPort {
        case: String,
        workload: ResourceName,
        port: u16,
        declared: Vec<u16>,
    },
    #[error(
        "{case}: port {port} of {workload} is declared {}, but the case says {}; a sidecar judges it as {}",
        .declared.as_str(), .given.as_str(), .declared.as_str()
    )]
    ProtocolMismatch {
        case: String,
        workload: ResourceName,
        port: u16,
        declared: Protocol,
        given: Protocol,
    },
    #[error(
        "{case}: port {port} of {workload} is tcp, where a request has no method, path, host or headers; leave them out"
    )]
    HttpOnTcp {
        case: String,
        workload: ResourceName,
        port: u16,
    },
    #[error(
        "{case}: method {method:?} is not one the policy language knows ({}); {MISSPELT}",
        KNOWN_METHODS.join(", ")
    )]
    UnknownMethod { case: String, method: String },
    #[error("{case}: an unauthenticated caller has no identity; leave `from` out")]
    FromWithoutCertificate { case: String },
    #[error(
        "{case}: `from` (the caller's SPIFFE ID) is missing; for a caller without a certificate say so (`caller: unauthenticated` in a case, --unauthenticated for explain)"
    )]
    MissingFrom { case: String },
    #[error(
        "{case}: no Workload declares the identity {id}; {MISSPELT}. If the caller is meant to be outside the declared workloads, say so (`caller: undeclared` in a case, --undeclared for explain)"
    )]
    UndeclaredCaller { case: String, id: String },
    #[error("{case}: no Workload declares the identity {id}; {MISSPELT}")]
    UndeclaredDestination { case: String, id: String },
    #[error(
        "{case}: says the caller is undeclared, but Workload {workload} declares {id}; drop `caller: undeclared` (or --undeclared)"
    )]
    DeclaredCaller {
        case: String,
        workload: ResourceName,
        id: String,
    },
    #[error(
        "{case}: `caller` is for ingress cases; on egress the caller is `from`, a declared workload"
    )]
    CallerOnEgress { case: String },
    #[error("case {case:?} has no `expect: allow|deny|refuse`")]
    NoExpect { case: String },
}

const MISSPELT: &str = "a misspelt name would only test the default deny";

fn list(ports: &[u16]) -> String {
    let words: Vec<String> = ports.iter().map(u16::to_string).collect();
    words.join(", ")
}

fn workload_port(s: &str) -> Result<(ResourceName, u16), CaseError> {
    let (w, port) = s
        .rsplit_once(':')
        .ok_or_else(|| CaseError::Target { to: s.to_string() })?;
    let port = port.parse().map_err(|_| CaseError::Port {
        to: s.to_string(),
        port: port.to_string(),
    })?;
    Ok((workload(w)?, port))
}

fn workload(s: &str) -> Result<ResourceName, CaseError> {
    parse_workload(s).map_err(CaseError::Workload)
}

/// A SPIFFE ID as a case names it: exact, never a pattern.
fn identity(case: &str, id: &str) -> Result<(), CaseError> {
    match IdentityPattern::try_from(id.to_string()) {
        Ok(IdentityPattern::Exact(_)) => Ok(()),
        Ok(_) => Err(CaseError::Pattern {
            case: case.to_string(),
            id: id.to_string(),
        }),
        Err(message) => Err(CaseError::Identity {
            case: case.to_string(),
            message,
        }),
    }
}

impl Case {
    /// How errors name the case: `case "<name>"`, or `the request` when it has no name.
    fn label(&self) -> String {
        match self.name.as_str() {
            "" => "the request".to_string(),
            n => format!("case {n:?}"),
        }
    }

    /// Refuses a case that names what no file declares, so that a misspelling cannot pass
    /// as a default deny. Returns the protocol of the destination port.
    pub fn check(&self, set: &PolicySet) -> Result<Protocol, CaseError> {
        let case = self.label();
        let (dest, port) = workload_port(&self.to)?;
        if !set.declares(&dest) {
            return Err(CaseError::UnknownWorkload {
                case,
                workload: dest,
            });
        }
        let ports = set.declared_ports(&dest).unwrap_or_default();
        let declared = ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, proto)| *proto);
        if declared.is_none() && !ports.is_empty() {
            return Err(CaseError::UnknownPort {
                case,
                workload: dest,
                port,
                declared: ports.iter().map(|(p, _)| *p).collect(),
            });
        }
        let protocol = match (self.protocol, declared) {
            (Some(given), Some(declared)) if given != declared => {
                return Err(CaseError::ProtocolMismatch {
                    case,
                    workload: dest,
                    port,
                    declared,
                    given,
                });
            }
            (Some(given), _) => given,
            (None, Some(d)) => d,
            (None, None) => Protocol::Http,
        };
        let http_given = self.method.is_some()
            || self.path.is_some()
            || self.host.is_some()
            || !self.headers.is_empty();
        if !protocol.is_http() && http_given {
            return Err(CaseError::HttpOnTcp {
                case,
                workload: dest,
                port,
            });
        }
        if let Some(m) = self.method.as_deref()
            && canonical::method(m).is_ok()
            && !KNOWN_METHODS.contains(&m)
        {
            return Err(CaseError::UnknownMethod {
                case,
                method: m.to_string(),
            });
        }
        match self.direction {
            Direction::Ingress => match (self.caller, self.from.as_deref()) {
                (Caller::Unauthenticated, None) => {}
                (Caller::Unauthenticated, Some(_)) => {
                    return Err(CaseError::FromWithoutCertificate { case });
                }
                (_, None) => return Err(CaseError::MissingFrom { case }),
                (Caller::Declared, Some(id)) => {
                    identity(&case, id)?;
                    if set.workloads_with_identity(id).is_empty() {
                        let id = id.to_string();
                        return Err(CaseError::UndeclaredCaller { case, id });
                    }
                }
                (Caller::Undeclared, Some(id)) => {
                    identity(&case, id)?;
                    if let Some(w) = set.workloads_with_identity(id).first() {
                        return Err(CaseError::DeclaredCaller {
                            case,
                            workload: w.clone(),
                            id: id.to_string(),
                        });
                    }
                }
            },
            Direction::Egress => {
                if self.caller != Caller::Declared {
                    return Err(CaseError::CallerOnEgress { case });
                }
                let source = workload(self.from.as_deref().unwrap_or_default())?;
                if !set.declares(&source) {
                    return Err(CaseError::UnknownWorkload {
                        case,
                        workload: source,
                    });
                }
                if let Some(id) = self.to_identity.as_deref() {
                    identity(&case, id)?;
                    if set.workloads_with_identity(id).is_empty() {
                        let id = id.to_string();
                        return Err(CaseError::UndeclaredDestination { case, id });
                    }
                }
            }
        }
        Ok(protocol)
    }

    /// Decides the case as a sidecar would: refused before policy, or a decision. `checked`:
    /// refuse cases naming what the set does not declare (`test`, `explain`); `diff`
    /// compares two versions, where a name may exist in one only.
    pub fn decide(&self, set: &PolicySet, checked: bool) -> Result<Outcome, CaseError> {
        let protocol = match checked {
            true => self.check(set)?,
            false => self.protocol.unwrap_or(Protocol::Http),
        };
        let (dest, port) = workload_port(&self.to)?;
        let headers: Vec<(String, String)> = self
            .headers
            .iter()
            .flat_map(|(k, v)| {
                let values = match v {
                    HeaderValues::One(one) => std::slice::from_ref(one),
                    HeaderValues::Many(many) => many.as_slice(),
                };
                values
                    .iter()
                    .map(move |v| (k.to_ascii_lowercase(), v.clone()))
            })
            .collect();
        let canonical = match protocol.is_http() {
            false => None,
            true => {
                let raw = RawRequest {
                    method: self.method.as_deref().unwrap_or("GET"),
                    target: self.path.as_deref().unwrap_or("/"),
                    authority: None,
                };
                match CanonicalRequest::new(raw, self.host.as_deref().map(str::as_bytes)) {
                    Ok(c) => Some(c),
                    Err(why) => return Ok(Outcome::Refused(why)),
                }
            }
        };
        let ip = self.ip.map(canonical::peer_ip);
        let to_identity = self
            .to_identity
            .as_deref()
            .or_else(|| set.declared_identity(&dest));
        let (subject, peer) = match self.direction {
            Direction::Ingress => (
                dest.clone(),
                Peer {
                    identity: match self.caller {
                        Caller::Unauthenticated => None,
                        _ => self.from.as_deref(),
                    },
                    ip,
                    workload: None,
                },
            ),
            Direction::Egress => (
                workload(self.from.as_deref().unwrap_or_default())?,
                Peer {
                    identity: to_identity,
                    ip,
                    workload: Some(&dest),
                },
            ),
        };
        Ok(Outcome::Decided(set.evaluate(&Request {
            direction: self.direction,
            subject: &subject,
            peer,
            port,
            protocol,
            http: canonical.as_ref().map(|c| c.http(&headers)),
        })))
    }

    /// Runs the case as `policy test` does: checked, decided, and compared with what it
    /// expects. The problems are empty when it passes.
    pub fn run(&self, set: &PolicySet) -> Result<Verdict, CaseError> {
        let Some(expect) = self.expect else {
            return Err(CaseError::NoExpect {
                case: self.name.clone(),
            });
        };
        let outcome = self.decide(set, true)?;
        let (policy, rule) = outcome.decided_by();
        let mut problems = Vec::new();
        if !outcome.meets(expect) {
            problems.push(format!(
                "expected {}, got {}",
                expect.word(),
                outcome.word()
            ));
        }
        if self.policy.is_some() && self.policy != policy {
            problems.push(format!(
                "expected policy {}, decided by {}",
                self.policy.as_deref().unwrap_or_default(),
                match &outcome {
                    Outcome::Refused(_) => "no policy (refused before policy)",
                    Outcome::Decided(_) => policy.as_deref().unwrap_or("the default posture"),
                }
            ));
        }
        if self.rule.is_some() && self.rule != rule {
            problems.push(format!(
                "expected rule {}, got {}",
                self.rule.as_deref().unwrap_or_default(),
                rule.as_deref().unwrap_or("none")
            ));
        }
        Ok(Verdict { outcome, problems })
    }
}

/// A case's result under `policy test`.
#[derive(Debug)]
pub struct Verdict {
    pub outcome: Outcome,
    /// What differed from the case's expectations; empty when it passed.
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}
