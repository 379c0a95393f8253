//! Reading YAML documents into the checked model, with file:line:column on every error.

use crate::error::{PolicyError, SourceLocation};
use crate::model::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Resource, ResourceName, Rule, Selector,
};
use crate::pattern::{IdentityPattern, Method, PathPattern};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDocument {
    api_version: Spanned<String>,
    kind: Spanned<String>,
    metadata: RawMetadata,
    spec: RawAuthorizationPolicySpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: Spanned<String>,
    #[serde(default)]
    namespace: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorizationPolicySpec {
    selector: RawSelector,
    action: Spanned<Action>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    workload: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    from: Option<RawFrom>,
    #[serde(default)]
    to: Option<RawTo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    #[serde(default)]
    identities: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
}

/// Parses every YAML document in `text` (named `file` in errors) and checks each value.
///
/// Returns all resources, or the first error with its location; nothing partial.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, PolicyError> {
    let raws: Vec<RawDocument> =
        serde_saphyr::from_multiple(text).map_err(|e| parse_error(file, &e))?;
    let at = |loc: &Location| SourceLocation {
        file: file.to_string(),
        line: loc.line() as u32,
        column: loc.column() as u32,
    };
    let invalid = |loc: &Location, message: String| PolicyError::Invalid {
        location: at(loc),
        message,
    };
    let mut out = Vec::with_capacity(raws.len());
    for raw in raws {
        if raw.api_version.value != crate::API_VERSION {
            return Err(invalid(
                &raw.api_version.referenced,
                format!(
                    "apiVersion {:?} is not supported; use {:?}",
                    raw.api_version.value,
                    crate::API_VERSION
                ),
            ));
        }
        if raw.kind.value != "AuthorizationPolicy" {
            return Err(invalid(
                &raw.kind.referenced,
                format!(
                    "unknown kind {:?}; this version knows: AuthorizationPolicy",
                    raw.kind.value
                ),
            ));
        }
        let name =
            dns_label(&raw.metadata.name).map_err(|m| invalid(&raw.metadata.name.referenced, m))?;
        let namespace = match &raw.metadata.namespace {
            Some(ns) => dns_label(ns).map_err(|m| invalid(&ns.referenced, m))?,
            None => "default".to_string(),
        };
        let workload = &raw.spec.selector.workload;
        let workload_name = dns_label(workload).map_err(|m| invalid(&workload.referenced, m))?;

        let mut rules = Vec::with_capacity(raw.spec.rules.len());
        for (i, r) in raw.spec.rules.into_iter().enumerate() {
            let rule_name = match &r.name {
                Some(n) => dns_label(n).map_err(|m| invalid(&n.referenced, m))?,
                None => format!("rules[{i}]"),
            };
            let from = r.from.map(|f| f.identities).unwrap_or_default();
            let (methods, paths) = r.to.map(|t| (t.methods, t.paths)).unwrap_or_default();
            rules.push(Rule {
                name: rule_name,
                from: checked::<IdentityPattern>(from, &invalid)?,
                methods: checked::<Method>(methods, &invalid)?,
                paths: checked::<PathPattern>(paths, &invalid)?,
            });
        }
        if let Some(dup) = duplicate_rule_name(&rules) {
            return Err(invalid(
                &raw.metadata.name.referenced,
                format!("two rules are named {dup:?}; rule names must be unique in a policy"),
            ));
        }
        out.push(Resource::AuthorizationPolicy(AuthorizationPolicy {
            name: ResourceName {
                namespace: namespace.clone(),
                name,
            },
            spec: AuthorizationPolicySpec {
                selector: Selector {
                    workload: ResourceName {
                        namespace,
                        name: workload_name,
                    },
                },
                action: raw.spec.action.value,
                rules,
            },
        }));
    }
    Ok(out)
}

fn checked<T: TryFrom<String, Error = String>>(
    values: Vec<Spanned<String>>,
    invalid: &impl Fn(&Location, String) -> PolicyError,
) -> Result<Vec<T>, PolicyError> {
    values
        .into_iter()
        .map(|v| T::try_from(v.value).map_err(|m| invalid(&v.referenced, m)))
        .collect()
}

fn duplicate_rule_name(rules: &[Rule]) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    rules
        .iter()
        .find(|r| !seen.insert(r.name.as_str()))
        .map(|r| r.name.as_str())
}

/// Resource, namespace and workload names follow Kubernetes: lowercase letters, digits and '-', at most 63, not starting or
/// ending with '-'.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_label(v: &Spanned<String>) -> Result<String, String> {
    let s = &v.value;
    if is_valid_name(s) {
        Ok(s.clone())
    } else {
        Err(format!(
            "{s:?} is not a valid name: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

fn parse_error(file: &str, e: &serde_saphyr::Error) -> PolicyError {
    let (line, column) = e
        .location()
        .map(|l| (l.line() as u32, l.column() as u32))
        .unwrap_or((1, 1));
    PolicyError::Parse {
        location: SourceLocation {
            file: file.to_string(),
            line,
            column,
        },
        message: first_line(&e.to_string()),
    }
}

/// serde-saphyr renders a source snippet after the message; a CLI error wants the message.
fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or("invalid YAML")
        .trim()
        .to_string()
}
