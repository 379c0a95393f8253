//! `bulkhead policy …`: offline commands for CI pipelines. They read files only and talk to
//! no control plane: lint a policy set, run tables of expected verdicts against it, show which
//! requests change verdict between two versions, and explain one request.

use anyhow::{Context, Result, bail};
use bulkhead_policy::model::{Direction, ResourceName};
use bulkhead_policy::{Decision, Http, Peer, PolicySet, Protocol, Reason, Request};
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
/// destination `namespace/workload:port`, and `toIdentity` the ID it must present.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub direction: Direction,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub to_identity: Option<String>,
    #[serde(default)]
    pub ip: Option<std::net::IpAddr>,
    #[serde(default = "http")]
    pub protocol: Protocol,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `allow` or `deny`; required by `policy test`.
    #[serde(default)]
    pub expect: Option<Expect>,
    /// The policy (`namespace/name`) expected to decide, if the test cares.
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
}

fn http() -> Protocol {
    Protocol::Http
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

pub(crate) fn read_files(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
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
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            out.push((p.display().to_string(), text));
        }
    }
    Ok(out)
}

/// Parses and compiles; prints every error and fails if there is any.
fn compile(files: &[PathBuf]) -> Result<(usize, PolicySet)> {
    let texts = read_files(files)?;
    match bulkhead_policy::load(&texts, 0) {
        Ok((resources, set)) => Ok((resources.len(), set)),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            bail!("{} error(s); the policy set is refused whole", errors.len())
        }
    }
}

pub fn lint(files: &[PathBuf]) -> Result<()> {
    let (resources, set) = compile(files)?;
    println!(
        "ok: {resources} resources, {} rules; every rule is enforceable as written",
        set.rule_count()
    );
    Ok(())
}

fn read_cases(path: &Path) -> Result<Vec<Case>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: CaseFile = serde_saphyr::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            path.display(),
            e.to_string().lines().next().unwrap_or_default()
        )
    })?;
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

/// Evaluates one case against a set.
pub fn decide(set: &PolicySet, case: &Case) -> Result<Decision> {
    let (dest, port) = workload_port(&case.to)?;
    let headers: Vec<(String, String)> = case
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let http = case.protocol.is_http().then(|| Http {
        method: case.method.as_deref().unwrap_or("GET"),
        path: case.path.as_deref().unwrap_or("/"),
        host: case.host.as_deref(),
        headers: &headers,
    });
    let (subject, peer) = match case.direction {
        Direction::Ingress => (
            dest.clone(),
            Peer {
                identity: Some(case.from.as_str()),
                ip: case.ip,
                workload: None,
            },
        ),
        Direction::Egress => (
            workload(&case.from)?,
            Peer {
                identity: case.to_identity.as_deref(),
                ip: case.ip,
                workload: Some(&dest),
            },
        ),
    };
    Ok(set.evaluate(&Request {
        direction: case.direction,
        subject: &subject,
        peer,
        port,
        protocol: case.protocol,
        http,
    }))
}

fn decided_by(d: &Decision) -> (Option<String>, Option<String>) {
    match &d.reason {
        Reason::Rule { policy, rule, .. } => (Some(policy.to_string()), Some(rule.to_string())),
        Reason::Posture { .. } => (None, None),
    }
}

pub fn test(files: &[PathBuf], cases: &Path) -> Result<()> {
    let (_, set) = compile(files)?;
    let cases = read_cases(cases)?;
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        let d = decide(&set, case)?;
        let Some(expect) = case.expect else {
            bail!("case {:?} has no `expect: allow|deny`", case.name);
        };
        let got = if d.is_allow() {
            Expect::Allow
        } else {
            Expect::Deny
        };
        let (policy, rule) = decided_by(&d);
        let mut problems = Vec::new();
        if got != expect {
            problems.push(format!("expected {expect:?}, got {got:?}").to_lowercase());
        }
        if case.policy.is_some() && case.policy != policy {
            problems.push(format!(
                "expected policy {}, decided by {}",
                case.policy.as_deref().unwrap_or_default(),
                policy.as_deref().unwrap_or("the default posture")
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
            println!("ok      {}", case.name);
        } else {
            failed += 1;
            println!(
                "FAILED  {}: {}\n        {d}",
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
        let (a, b) = (decide(&old_set, case)?, decide(&new_set, case)?);
        if a.verdict != b.verdict {
            changed += 1;
            let word = |d: &Decision| if d.is_allow() { "allow" } else { "deny" };
            println!(
                "{}: {} -> {}\n  old: {a}\n  new: {b}",
                case.name,
                word(&a),
                word(&b)
            );
        }
    }
    println!("{changed} of {} request(s) change verdict", cases.len());
    Ok(())
}

pub fn explain(files: &[PathBuf], case: Case) -> Result<()> {
    let (_, set) = compile(files)?;
    let d = decide(&set, &case)?;
    println!("{}", if d.is_allow() { "ALLOW" } else { "DENY" });
    println!("{d}");
    println!("x-bulkhead-decision: {}", d.header_value());
    Ok(())
}
