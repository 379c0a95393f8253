//! A custom resource as the API server sends it → the policy resource it declares, read by
//! the policy crate's own parser, so that a CR is checked exactly as a file for `bulkhead
//! apply` is, and every error names the CR's field (`spec.rules[0].to.methods[1]`).
//!
//! The CR's JSON is written out as YAML with one value per line, and each line's field path
//! remembered; the parser's and the compiler's `line:column` then map back to the path.
//!
//! It must never accept what the parser refuses, and never let a CR in one namespace declare
//! an identity of another namespace, or one of the mesh's own.

use crate::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use bulkhead_identity::parse_parts;
use bulkhead_policy::IdentityPattern;
use bulkhead_policy::model::Resource;
use bulkhead_policy::{API_VERSION, Origin, PolicyError};
use serde_json::{Map, Value, json};
use std::fmt::Write as _;

/// A CR read into a resource, with what maps its errors back to fields.
#[derive(Clone, Debug)]
pub struct ParsedCr {
    pub resource: Resource,
    pub origin: Origin,
    pub paths: FieldPaths,
}

/// Why a CR declares nothing: the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CrRefusal {
    /// `spec.rules[0].to.methods[1]`; `metadata.name`; empty for the whole object.
    pub path: String,
    pub message: String,
}

/// The field path of each line of the YAML a CR was read from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPaths(Vec<String>);

impl FieldPaths {
    /// The path at a 1-based line; the whole object when unknown.
    pub fn at(&self, line: u32) -> String {
        let i = usize::try_from(line).unwrap_or(0).saturating_sub(1);
        self.0.get(i).cloned().unwrap_or_default()
    }

    /// A policy error about this CR as a refusal naming its field. The message loses its
    /// `file:line:column` prefix, which would point into text nobody wrote.
    pub fn refusal(&self, error: &PolicyError) -> CrRefusal {
        match error {
            PolicyError::Parse { location, message }
            | PolicyError::Invalid { location, message } => CrRefusal {
                path: self.at(location.line),
                message: message.clone(),
            },
            PolicyError::Model { message, .. } => CrRefusal {
                path: String::new(),
                message: message.clone(),
            },
        }
    }
}

/// `Kind/namespace/name`, the key the resource has in the mesh's set and the file name its
/// errors carry.
pub fn key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// Reads a CR of `kind` (its whole JSON object) in a mesh of `trust_domain`.
pub fn parse(kind: &str, object: &Value, trust_domain: &str) -> Result<ParsedCr, CrRefusal> {
    let meta = object.get("metadata").cloned().unwrap_or(Value::Null);
    let text = |field: &str| meta.get(field).and_then(Value::as_str).unwrap_or_default();
    let (name, namespace) = (text("name"), text("namespace"));
    let mut labels: Map<String, Value> = meta
        .get("labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    labels.insert(MANAGED_BY_LABEL.into(), json!(MANAGED_BY_VALUE));
    let doc = json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": object.get("spec").cloned().unwrap_or_else(|| json!({})),
    });
    let (yaml, paths) = to_yaml(&doc);
    let file = key(kind, namespace, name);
    let mut parsed = bulkhead_policy::parse_file(&file, &yaml).map_err(|e| paths.refusal(&e))?;
    let Some((resource, origin)) = parsed.pop() else {
        return Err(CrRefusal {
            path: String::new(),
            message: "the object declares nothing".into(),
        });
    };
    if let Resource::Workload(w) = &resource
        && !in_namespace(&w.spec.identity.value, trust_domain, namespace)
    {
        return Err(CrRefusal {
            path: "spec.identity".into(),
            message: format!(
                "a Workload in namespace {namespace} may declare only identities of that namespace (spiffe://{trust_domain}/ns/{namespace}/…), not {}",
                w.spec.identity.value
            ),
        });
    }
    Ok(ParsedCr {
        resource,
        origin,
        paths,
    })
}

/// Whether a Workload's identity (one ID, or a `…/*` prefix) lies in `namespace` of
/// `trust_domain`: its path starts `/ns/<namespace>`. `*` (any identity) does not.
fn in_namespace(identity: &IdentityPattern, trust_domain: &str, namespace: &str) -> bool {
    fn within<'a>(mut segments: impl Iterator<Item = &'a str>, namespace: &str) -> bool {
        segments.next() == Some("ns") && segments.next() == Some(namespace)
    }
    match identity {
        IdentityPattern::Exact(id) => {
            id.trust_domain() == trust_domain && within(id.segments(), namespace)
        }
        IdentityPattern::Prefix(prefix) => match parse_parts(prefix.trim_end_matches('/')) {
            Ok((td, path)) => td.as_str() == trust_domain && within(path.segments(), namespace),
            Err(_) => false,
        },
        IdentityPattern::Any => false,
    }
}

/// Block YAML with one key or item per line, and the field path of every line.
pub fn to_yaml(value: &Value) -> (String, FieldPaths) {
    let mut out = String::new();
    let mut paths = Vec::new();
    emit_map_body(value, "", 0, &mut out, &mut paths);
    (out, FieldPaths(paths))
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else if key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        format!("{path}.{key}")
    } else {
        format!("{path}[{key:?}]")
    }
}

/// A scalar or an empty collection, inline; `None` for a collection with members.
fn inline(value: &Value) -> Option<String> {
    match value {
        Value::Object(m) if m.is_empty() => Some("{}".into()),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Object(_) | Value::Array(_) => None,
        // JSON's strings, numbers, booleans and null are YAML flow scalars as written.
        scalar => Some(scalar.to_string()),
    }
}

fn emit_map_body(
    value: &Value,
    path: &str,
    indent: usize,
    out: &mut String,
    paths: &mut Vec<String>,
) {
    let Value::Object(map) = value else { return };
    for (k, v) in map {
        let key = Value::String(k.clone());
        emit_entry(&format!("{key}:"), v, child(path, k), indent, out, paths);
    }
}

/// One member of a map (`lead` is `key:`) or of a list (`lead` is `-`): inline, or with its
/// members below it.
fn emit_entry(
    lead: &str,
    value: &Value,
    path: String,
    indent: usize,
    out: &mut String,
    paths: &mut Vec<String>,
) {
    match inline(value) {
        Some(s) => {
            let _ = writeln!(out, "{:indent$}{lead} {s}", "");
            paths.push(path);
        }
        None => {
            let _ = writeln!(out, "{:indent$}{lead}", "");
            paths.push(path.clone());
            emit_nested(value, &path, indent + 2, out, paths);
        }
    }
}

fn emit_nested(
    value: &Value,
    path: &str,
    indent: usize,
    out: &mut String,
    paths: &mut Vec<String>,
) {
    match value {
        Value::Object(_) => emit_map_body(value, path, indent, out, paths),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                emit_entry("-", item, format!("{path}[{i}]"), indent, out, paths);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn policy(spec: Value) -> Value {
        json!({
            "apiVersion": "bulkhead.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "orders-allow", "namespace": "shop", "generation": 2,
                "labels": {"team": "orders"}},
            "spec": spec,
        })
    }

    #[test]
    fn a_valid_cr_reads_as_the_same_resource_a_file_would() {
        let cr = policy(json!({
            "selector": {"workload": "orders"},
            "action": "allow",
            "rules": [{"from": {"identities": ["spiffe://cluster.local/ns/shop/sa/frontend"]},
                       "to": {"methods": ["GET"], "paths": ["/orders/*"]}}],
        }));
        let parsed = parse("AuthorizationPolicy", &cr, TD).unwrap();
        let file = bulkhead_policy::parse_documents(
            "f.yaml",
            "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: orders-allow\n  namespace: shop\n  labels: {team: orders, bulkhead.dev/managed-by: kubernetes}\nspec:\n  selector: {workload: orders}\n  action: allow\n  rules:\n    - from: {identities: [\"spiffe://cluster.local/ns/shop/sa/frontend\"]}\n      to: {methods: [GET], paths: [\"/orders/*\"]}\n",
        )
        .unwrap();
        assert_eq!(vec![parsed.resource.clone()], file);
        assert_eq!(parsed.origin.file, "AuthorizationPolicy/shop/orders-allow");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                json!({"action": "allow", "rules": [{"to": {"methods": ["GET", "FETCH"]}}]}),
                "spec.rules[0].to.methods[1]",
                "unknown HTTP method \"FETCH\"",
            ),
            (
                json!({"action": "allow", "rules": [{"to": {"notPath": ["/admin"]}}]}),
                "spec.rules[0].to",
                "notPath",
            ),
            (json!({"action": "maybe"}), "spec.action", "maybe"),
        ];
        for (spec, path, message) in cases {
            let refusal = parse("AuthorizationPolicy", &policy(spec.clone()), TD).unwrap_err();
            assert!(
                refusal.path.starts_with(path),
                "{spec}: {refusal:?} should point at {path}"
            );
            assert!(refusal.message.contains(message), "{spec}: {refusal:?}");
            assert!(
                !refusal.message.contains("AuthorizationPolicy/shop"),
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn a_name_kubernetes_allows_but_bulkhead_does_not_is_refused_at_metadata_name() {
        let mut cr = policy(json!({"action": "allow"}));
        cr["metadata"]["name"] = json!("orders.allow");
        let refusal = parse("AuthorizationPolicy", &cr, TD).unwrap_err();
        assert_eq!(refusal.path, "metadata.name", "{refusal:?}");
    }

    #[test]
    fn a_workload_cr_declares_identities_of_its_own_namespace_only() {
        let wl = |identity: &str| {
            json!({"metadata": {"name": "vm", "namespace": "shop"},
                   "spec": {"identity": identity, "ports": [{"port": 5432, "protocol": "tcp"}]}})
        };
        for own in [
            "spiffe://cluster.local/ns/shop/sa/db",
            "spiffe://cluster.local/ns/shop/anything/else",
            "spiffe://cluster.local/ns/shop/*",
            "spiffe://cluster.local/ns/shop/sa/*",
        ] {
            assert!(parse("Workload", &wl(own), TD).is_ok(), "{own}");
        }
        for foreign in [
            "spiffe://cluster.local/ns/payments/sa/db",
            "spiffe://cluster.local/bulkhead/control",
            "spiffe://other.td/ns/shop/sa/db",
            "spiffe://cluster.local/ns/shopping/sa/db",
            "spiffe://cluster.local/ns/shopping/*",
            "spiffe://cluster.local/ns/*",
            "spiffe://cluster.local/*",
            "spiffe://other.td/ns/shop/*",
            "*",
        ] {
            let refusal = parse("Workload", &wl(foreign), TD).unwrap_err();
            assert_eq!(refusal.path, "spec.identity", "{foreign}");
        }
    }

    #[test]
    fn yaml_lines_carry_paths_for_awkward_keys_and_values() {
        let v = json!({"spec": {"when": [{"header": "x-a", "values": ["a: b", "#c", "\"q\""]}],
            "labels": {"app.kubernetes.io/name": "x"}, "e": [], "o": {}}});
        let (yaml, paths) = to_yaml(&v);
        let back: Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, v, "{yaml}");
        let lines: Vec<&str> = yaml.lines().collect();
        let at = |needle: &str| {
            let i = lines.iter().position(|l| l.contains(needle)).unwrap();
            paths.at(u32::try_from(i + 1).unwrap())
        };
        assert_eq!(at("\"#c\""), "spec.when[0].values[1]");
        assert_eq!(
            at("app.kubernetes.io"),
            "spec.labels[\"app.kubernetes.io/name\"]"
        );
    }
}
