//! `bulkhead policy …`: offline commands for CI pipelines. They read files only and talk to
//! no control plane: lint a policy set, run tables of expected verdicts against it, show which
//! requests change verdict between two versions, and explain one request.
//!
//! Every request is judged as a sidecar judges it: through the policy crate's canonical
//! request, so a path, method or host a sidecar refuses with 400 is refused here too, and
//! what passes is what policy would see live. A case that names something no file declares
//! (a workload, a caller identity, a method, a port) is an error, not a silent default
//! deny: a misspelt case must never pass.

use anyhow::{Context, Result, bail};
use bulkhead_policy::model::{Direction, ResourceName};
use bulkhead_policy::{
    CanonicalRequest, Decision, IdentityPattern, KNOWN_METHODS, Peer, PolicySet, Protocol,
    RawRequest, Reason, Refusal, Request, canonical,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A table of requests and the verdict each should get.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub cases: Vec<Case>,
}

/// One request. Ingress: `from` is the caller's SPIFFE ID and `to` the protected
/// `namespace/workload:port`. Egress: `from` is the sending `namespace/workload`, `to` the
/// destination `namespace/workload:port`, and `toIdentity` the ID it must present (by
/// default the one its Workload declares).
#[derive(Clone, Deserialize)]
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
    pub ip: Option<std::net::IpAddr>,
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

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    /// Kept from the app: denied by policy (403), or refused before policy (400).
    Deny,
    /// Refused before policy, as malformed or ambiguous (400).
    Refuse,
}

/// What happens to a request.
pub enum Outcome {
    /// A sidecar answers 400 before any policy.
    Refused(Refusal),
    Decided(Decision),
}

impl Outcome {
    fn word(&self) -> &'static str {
        match self {
            Outcome::Refused(_) => "refuse",
            Outcome::Decided(d) if d.is_allow() => "allow",
            Outcome::Decided(_) => "deny",
        }
    }

    fn meets(&self, expect: Expect) -> bool {
        match (self, expect) {
            (Outcome::Refused(_), Expect::Deny | Expect::Refuse) => true,
            (Outcome::Decided(d), Expect::Allow) => d.is_allow(),
            (Outcome::Decided(d), Expect::Deny) => !d.is_allow(),
            (Outcome::Refused(_), Expect::Allow) | (Outcome::Decided(_), Expect::Refuse) => false,
        }
    }

    fn decided_by(&self) -> (Option<String>, Option<String>) {
        match self {
            Outcome::Decided(Decision {
                reason: Reason::Rule { policy, rule, .. },
                ..
            }) => (Some(policy.to_string()), Some(rule.to_string())),
            _ => (None, None),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Refused(why) => write!(f, "refused before any policy (400): {why}"),
            Outcome::Decided(d) => write!(f, "{d}"),
        }
    }
}

/// The files to read: each path, or each `.yaml`/`.yml` in a directory, as bytes (a file
/// that is not UTF-8 is reported as a located error of its own).
pub(crate) fn read_bytes(files: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in files {
        let paths: Vec<PathBuf> = if f.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("cannot read directory {}", f.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            v.sort();
            v
        } else {
            vec![f.clone()]
        };
        for p in paths {
            let bytes =
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            out.push((p.display().to_string(), bytes));
        }
    }
    Ok(out)
}

/// The files' texts; a non-UTF-8 file is a located error.
pub(crate) fn read_files(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
    read_bytes(files)?
        .into_iter()
        .map(|(name, bytes)| {
            let text = bulkhead_policy::text_of(&name, &bytes)?.to_string();
            Ok((name, text))
        })
        .collect()
}

/// Parses and compiles; prints every error and fails if there is any.
fn compile(files: &[PathBuf]) -> Result<bulkhead_policy::Loaded> {
    let texts = read_bytes(files)?;
    match bulkhead_policy::load_bytes(&texts, 0) {
        Ok(loaded) => Ok(loaded),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            bail!("{} error(s); the policy set is refused whole", errors.len())
        }
    }
}

pub fn lint(files: &[PathBuf], strict: bool) -> Result<()> {
    let (parsed, set) = compile(files)?;
    let warnings = bulkhead_policy::lint_parsed(&parsed);
    for w in &warnings {
        eprintln!("{w}");
    }
    if strict && !warnings.is_empty() {
        bail!("{} warning(s), which --strict makes errors", warnings.len());
    }
    let noted = match warnings.len() {
        0 => String::new(),
        n => format!("; {n} warning(s) above"),
    };
    println!(
        "ok: {} resources, {} rules; every rule is enforceable as written{noted}",
        parsed.len(),
        set.compiled_rule_count(),
    );
    Ok(())
}

fn read_cases(path: &Path) -> Result<Vec<Case>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.display().to_string();
    let text = bulkhead_policy::text_of(&name, &bytes)?;
    let file: CaseFile = bulkhead_policy::read_yaml(&name, text)?;
    Ok(file.cases)
}

fn workload_port(s: &str) -> Result<(ResourceName, u16)> {
    let (w, port) = s
        .rsplit_once(':')
        .with_context(|| format!("{s:?}: expected namespace/workload:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("{s:?}: {port:?} is not a port"))?;
    Ok((workload(w)?, port))
}

fn workload(s: &str) -> Result<ResourceName> {
    bulkhead_policy::model::parse_workload(s).map_err(anyhow::Error::msg)
}

/// A SPIFFE ID as a case names it: exact, never a pattern.
fn identity(case: &str, id: &str) -> Result<()> {
    match IdentityPattern::try_from(id.to_string()) {
        Ok(IdentityPattern::Exact(_)) => Ok(()),
        Ok(_) => bail!("case {case:?}: {id:?} is a pattern; a caller has one exact SPIFFE ID"),
        Err(e) => bail!("case {case:?}: {e}"),
    }
}

/// Refuses a case that names what no file declares, so that a misspelling cannot pass as a
/// default deny. Returns the protocol of the destination port.
fn check(set: &PolicySet, case: &Case) -> Result<Protocol> {
    // `explain` has one nameless request.
    let name = match case.name.as_str() {
        "" => "the request".to_string(),
        n => format!("case {n:?}"),
    };
    let (dest, port) = workload_port(&case.to)?;
    let misspelt = "a misspelt name would only test the default deny";
    if !set.declares(&dest) {
        bail!("{name}: no Workload {dest} is declared; {misspelt} (declare it, or fix the name)");
    }
    let ports = set.declared_ports(&dest).unwrap_or_default();
    let declared = ports
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, proto)| *proto);
    if declared.is_none() && !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(|(p, _)| p.to_string()).collect();
        bail!(
            "{name}: {dest} declares no port {port} (it declares {}); {misspelt}",
            list.join(", ")
        );
    }
    let protocol = match (case.protocol, declared) {
        (Some(given), Some(d)) if given != d => bail!(
            "{name}: port {port} of {dest} is declared {}, but the case says {}; a sidecar judges it as {}",
            d.as_str(),
            given.as_str(),
            d.as_str()
        ),
        (Some(given), _) => given,
        (None, Some(d)) => d,
        (None, None) => Protocol::Http,
    };
    let http_given = case.method.is_some()
        || case.path.is_some()
        || case.host.is_some()
        || !case.headers.is_empty();
    if !protocol.is_http() && http_given {
        bail!(
            "{name}: port {port} of {dest} is tcp, where a request has no method, path, host or headers; leave them out"
        );
    }
    if let Some(m) = case.method.as_deref()
        && canonical::method(m).is_ok()
        && !KNOWN_METHODS.contains(&m)
    {
        bail!(
            "{name}: method {m:?} is not one the policy language knows ({}); {misspelt}",
            KNOWN_METHODS.join(", ")
        );
    }
    match case.direction {
        Direction::Ingress => match (case.caller, case.from.as_deref()) {
            (Caller::Unauthenticated, None) => {}
            (Caller::Unauthenticated, Some(_)) => {
                bail!("{name}: an unauthenticated caller has no identity; leave `from` out")
            }
            (_, None) => bail!(
                "{name}: `from` (the caller's SPIFFE ID) is missing; for a caller without a certificate say so (`caller: unauthenticated` in a case, --unauthenticated for explain)"
            ),
            (Caller::Declared, Some(id)) => {
                identity(&name, id)?;
                if set.workloads_with_identity(id).is_empty() {
                    bail!(
                        "{name}: no Workload declares the identity {id}; {misspelt}. If the caller is meant to be outside the declared workloads, say so (`caller: undeclared` in a case, --undeclared for explain)"
                    );
                }
            }
            (Caller::Undeclared, Some(id)) => {
                identity(&name, id)?;
                if let Some(w) = set.workloads_with_identity(id).first() {
                    bail!(
                        "{name}: says the caller is undeclared, but Workload {w} declares {id}; drop `caller: undeclared` (or --undeclared)"
                    );
                }
            }
        },
        Direction::Egress => {
            if case.caller != Caller::Declared {
                bail!(
                    "{name}: `caller` is for ingress cases; on egress the caller is `from`, a declared workload"
                );
            }
            let source = workload(case.from.as_deref().unwrap_or_default())?;
            if !set.declares(&source) {
                bail!(
                    "{name}: no Workload {source} is declared; {misspelt} (declare it, or fix the name)"
                );
            }
            if let Some(id) = case.to_identity.as_deref() {
                identity(&name, id)?;
                if set.workloads_with_identity(id).is_empty() {
                    bail!("{name}: no Workload declares the identity {id}; {misspelt}");
                }
            }
        }
    }
    Ok(protocol)
}

/// Decides one case as a sidecar would: refused before policy, or a decision. `checked`:
/// refuse cases naming what the files do not declare (`test`, `explain`); `diff` compares
/// two versions, where a name may exist in one only.
pub fn decide(set: &PolicySet, case: &Case, checked: bool) -> Result<Outcome> {
    let protocol = match checked {
        true => check(set, case)?,
        false => case.protocol.unwrap_or(Protocol::Http),
    };
    let (dest, port) = workload_port(&case.to)?;
    let headers: Vec<(String, String)> = case
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
                method: case.method.as_deref().unwrap_or("GET"),
                target: case.path.as_deref().unwrap_or("/"),
                authority: None,
            };
            match CanonicalRequest::new(raw, case.host.as_deref().map(str::as_bytes)) {
                Ok(c) => Some(c),
                Err(why) => return Ok(Outcome::Refused(why)),
            }
        }
    };
    let ip = case.ip.map(canonical::peer_ip);
    let to_identity = case
        .to_identity
        .as_deref()
        .or_else(|| set.declared_identity(&dest));
    let (subject, peer) = match case.direction {
        Direction::Ingress => (
            dest.clone(),
            Peer {
                identity: match case.caller {
                    Caller::Unauthenticated => None,
                    _ => case.from.as_deref(),
                },
                ip,
                workload: None,
            },
        ),
        Direction::Egress => (
            workload(case.from.as_deref().unwrap_or_default())?,
            Peer {
                identity: to_identity,
                ip,
                workload: Some(&dest),
            },
        ),
    };
    Ok(Outcome::Decided(set.evaluate(&Request {
        direction: case.direction,
        subject: &subject,
        peer,
        port,
        protocol,
        http: canonical.as_ref().map(|c| c.http(&headers)),
    })))
}

pub fn test(files: &[PathBuf], cases: &Path) -> Result<()> {
    let (_, set) = compile(files)?;
    let cases = read_cases(cases)?;
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        let Some(expect) = case.expect else {
            bail!("case {:?} has no `expect: allow|deny|refuse`", case.name);
        };
        let outcome = decide(&set, case, true)?;
        let (policy, rule) = outcome.decided_by();
        let mut problems = Vec::new();
        if !outcome.meets(expect) {
            problems.push(format!(
                "expected {}, got {}",
                format!("{expect:?}").to_lowercase(),
                outcome.word()
            ));
        }
        if case.policy.is_some() && case.policy != policy {
            problems.push(format!(
                "expected policy {}, decided by {}",
                case.policy.as_deref().unwrap_or_default(),
                match &outcome {
                    Outcome::Refused(_) => "no policy (refused before policy)",
                    Outcome::Decided(_) => policy.as_deref().unwrap_or("the default posture"),
                }
            ));
        }
        if case.rule.is_some() && case.rule != rule {
            problems.push(format!(
                "expected rule {}, got {}",
                case.rule.as_deref().unwrap_or_default(),
                rule.as_deref().unwrap_or("none")
            ));
        }
        if problems.is_empty() {
            passed += 1;
            match &outcome {
                Outcome::Refused(why) => println!("ok      {} (refused: {why})", case.name),
                Outcome::Decided(_) => println!("ok      {}", case.name),
            }
        } else {
            failed += 1;
            println!(
                "FAILED  {}: {}\n        {outcome}",
                case.name,
                problems.join("; ")
            );
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} case(s) did not get the expected verdict");
    }
    Ok(())
}

pub fn diff(old: &[PathBuf], new: &[PathBuf], cases: &Path) -> Result<()> {
    let (_, old_set) = compile(old)?;
    let (_, new_set) = compile(new)?;
    let cases = read_cases(cases)?;
    let mut changed = 0;
    for case in &cases {
        let (a, b) = (
            decide(&old_set, case, false)?,
            decide(&new_set, case, false)?,
        );
        if a.word() != b.word() {
            changed += 1;
            println!(
                "{}: {} -> {}\n  old: {a}\n  new: {b}",
                case.name,
                a.word(),
                b.word()
            );
        }
    }
    println!("{changed} of {} request(s) change verdict", cases.len());
    Ok(())
}

pub fn explain(files: &[PathBuf], case: Case) -> Result<()> {
    let (_, set) = compile(files)?;
    match decide(&set, &case, true)? {
        Outcome::Refused(why) => {
            println!("REFUSED (400, before any policy)");
            println!("bulkhead: {why}");
        }
        Outcome::Decided(d) => {
            println!("{}", if d.is_allow() { "ALLOW" } else { "DENY" });
            println!("{d}");
            println!("x-bulkhead-decision: {}", d.header_value());
        }
    }
    Ok(())
}
