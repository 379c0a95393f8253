//! The policy resources, shaped like Kubernetes objects (`apiVersion / kind / metadata /
//! spec`). The same types read the operator's YAML (with positions), travel on the wire as
//! JSON, and print back to YAML; printing then parsing gives the same resources.

use crate::located::Located;
use crate::pattern::{
    GrpcName, HeaderName, HostPattern, IdentityPattern, Method, PathPattern, PortRange, Protocol,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// One resource of any kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    AuthorizationPolicy(Document<AuthorizationPolicySpec>),
    Workload(Document<WorkloadSpec>),
    Service(Document<ServiceSpec>),
    DefaultPosture(Document<DefaultPostureSpec>),
}

/// The kinds this build knows, in the order documentation lists them.
pub const KINDS: &[&str] = &[
    "AuthorizationPolicy",
    "Workload",
    "Service",
    "DefaultPosture",
];

/// The envelope every kind shares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document<S> {
    pub api_version: Located<String>,
    pub kind: Located<String>,
    pub metadata: Metadata,
    pub spec: S,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: Located<Name>,
    /// Omitted means `default` for namespaced kinds, and the whole mesh for DefaultPosture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Located<Name>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A Kubernetes-style name: 1-63 lowercase letters, digits or '-', alphanumeric at both ends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if crate::is_valid_name(&s) {
            Ok(Name(s))
        } else {
            Err(format!(
                "{s:?} is not a valid name: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ))
        }
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `namespace/name` of a resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A workload, named within its namespace (`shop/payments`).
pub type WorkloadRef = ResourceName;

/// Reads `namespace/name` as people type it on command lines and in flags; both parts must
/// be valid names ([`crate::is_valid_name`]).
pub fn parse_workload(text: &str) -> Result<WorkloadRef, String> {
    match text.split_once('/') {
        Some((ns, name)) if crate::is_valid_name(ns) && crate::is_valid_name(name) => {
            Ok(ResourceName {
                namespace: ns.into(),
                name: name.into(),
            })
        }
        _ => Err(format!(
            "{text:?} is not a workload: write it as namespace/name, like shop/payments"
        )),
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Enforced by the destination's sidecar, on requests it receives.
    #[default]
    Ingress,
    /// Enforced by the source's sidecar, on requests it sends.
    Egress,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decides the verdict.
    #[default]
    Enforce,
    /// Evaluated beside the enforced policies and reported as would-allow / would-deny.
    Audit,
}

impl Mode {
    pub fn is_enforce(&self) -> bool {
        *self == Mode::Enforce
    }
}

/// Which workloads a policy protects: by name, by labels, or (empty) all in its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Located<Name>>,
    #[serde(default, skip_serializing_if = "Located::is_empty_map")]
    pub match_labels: Located<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Selector,
    #[serde(default)]
    pub direction: Direction,
    pub action: Action,
    #[serde(default)]
    pub mode: Mode,
    /// Each rule with its position, so that a nameless rule can still be pointed at.
    #[serde(default)]
    pub rules: Vec<Located<Rule>>,
}

/// A request matches a rule when it matches every part the rule gives (`from`, `to`, each
/// `when`); within a list, any entry may match; a `not…` list must match no entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Located<Name>>,
    /// `from:` written with nothing in it (or `null`) is `Some` of an empty `Source`, which
    /// the compiler refuses: it would name every caller without saying so.
    #[serde(
        default,
        deserialize_with = "crate::located::given",
        skip_serializing_if = "Option::is_none"
    )]
    pub from: Option<Located<Source>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Located<Target>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Located<HeaderCondition>>,
}

/// Who sends the request (ingress rules only: in egress rules the source is the selected
/// workload itself).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityPattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_identities: Vec<IdentityPattern>,
    /// The namespace in the caller's SPIFFE ID (`/ns/<namespace>/…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Name>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<Name>,
    /// Callers whose declared Workload has these labels (resolved to their identities).
    /// Given but empty (`{}`, `null`) is `Some` of an empty map, which the compiler refuses.
    #[serde(
        default,
        deserialize_with = "crate::located::given",
        skip_serializing_if = "Option::is_none"
    )]
    pub workload_labels: Option<Located<BTreeMap<String, String>>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub cidrs: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub not_cidrs: Vec<IpNet>,
}

/// What is asked of whom. In ingress rules the destination is the selected workload, so
/// only the operation (ports, protocol, HTTP, gRPC) may be given; egress rules also say which
/// destinations (identities, workloads, services, namespaces, CIDRs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Target {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityPattern>,
    /// Workloads by name, `name` (same namespace) or `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Located<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Located<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Name>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub cidrs: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub not_cidrs: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<PortRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<Protocol>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<Method>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathPattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<PathPattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostPattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<HostPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    /// `package.Service`
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<GrpcName>,
    /// `package.Service/Method`
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<GrpcName>,
}

/// A condition on one request header: one of `values`, none of `notValues`, or `present`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderCondition {
    pub header: HeaderName,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A workload: its labels (in metadata), identity, and the ports its app serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The exact SPIFFE ID the workload's proxy holds.
    pub identity: Located<IdentityPattern>,
    #[serde(default)]
    pub ports: Vec<PortDeclaration>,
    /// The IP addresses the workload's app is reached at. A sidecar in transparent mode
    /// recognises a mesh destination by its address and requires the declared identity there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Located<core::net::IpAddr>>,
}

impl WorkloadSpec {
    /// The exact SPIFFE ID; `None` for a pattern (which the compiler refuses).
    pub fn exact_identity(&self) -> Option<&bulkhead_spiffe::SpiffeId> {
        match &self.identity.value {
            IdentityPattern::Exact(identity) => Some(identity),
            _ => None,
        }
    }

    /// The declared ports and their protocols, in declaration order.
    pub fn port_protocols(&self) -> Vec<(u16, Protocol)> {
        self.ports
            .iter()
            .map(|p| (p.port.value, p.protocol))
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PortDeclaration {
    pub port: Located<u16>,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
}

/// A named group of workloads (selected by labels) serving the given ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: Selector,
    #[serde(default)]
    pub ports: Vec<PortDeclaration>,
}

/// What happens to a request no allow rule matches, mesh-wide (no namespace) or for one
/// namespace. Without any DefaultPosture: ingress deny, egress allow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultPostureSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Action>,
    /// `enforce`: decides requests no enforced rule decided. `audit`: consulted only by the
    /// audit evaluation, never by the verdict. Not written when `enforce`, so a sidecar that
    /// predates audit postures still reads every enforced one, and refuses (NACKs) an audit
    /// one rather than enforcing it.
    #[serde(default, skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Resource::AuthorizationPolicy(d) => d.serialize(s),
            Resource::Workload(d) => d.serialize(s),
            Resource::Service(d) => d.serialize(s),
            Resource::DefaultPosture(d) => d.serialize(s),
        }
    }
}

impl Resource {
    /// A one-line summary for tables: what it selects or declares.
    pub fn summary(&self) -> String {
        match self {
            Resource::AuthorizationPolicy(d) => {
                let sel = match (
                    &d.spec.selector.workload,
                    d.spec.selector.match_labels.is_empty(),
                ) {
                    (Some(w), _) => format!("workload {}", w.value),
                    (None, false) => format!("labels {:?}", d.spec.selector.match_labels.value),
                    (None, true) => "all workloads".to_string(),
                };
                let mode = match d.spec.mode {
                    Mode::Enforce => "",
                    Mode::Audit => " (audit)",
                };
                format!(
                    "{:?} {:?}{mode}, {sel}, {} rule(s)",
                    d.spec.direction,
                    d.spec.action,
                    d.spec.rules.len()
                )
                .to_lowercase()
            }
            Resource::Workload(d) => {
                let ports: Vec<String> = d
                    .spec
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port.value, p.protocol.as_str()))
                    .collect();
                format!("{} ports {}", d.spec.identity.value, ports.join(","))
            }
            Resource::Service(d) => format!("selects {:?}", d.spec.selector.match_labels.value),
            Resource::DefaultPosture(d) => format!(
                "ingress {}, egress {}{}",
                d.spec
                    .ingress
                    .map(|a| format!("{a:?}").to_lowercase())
                    .unwrap_or_else(|| "(inherit)".into()),
                d.spec
                    .egress
                    .map(|a| format!("{a:?}").to_lowercase())
                    .unwrap_or_else(|| "(inherit)".into()),
                match d.spec.mode {
                    Mode::Enforce => "",
                    Mode::Audit => " (audit)",
                },
            ),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::Workload(_) => "Workload",
            Resource::Service(_) => "Service",
            Resource::DefaultPosture(_) => "DefaultPosture",
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::AuthorizationPolicy(d) => &d.metadata,
            Resource::Workload(d) => &d.metadata,
            Resource::Service(d) => &d.metadata,
            Resource::DefaultPosture(d) => &d.metadata,
        }
    }

    /// `namespace/name`; a mesh-wide DefaultPosture has the namespace `*`.
    pub fn name(&self) -> ResourceName {
        let m = self.metadata();
        let namespace = match (&m.namespace, self) {
            (Some(ns), _) => ns.value.to_string(),
            (None, Resource::DefaultPosture(_)) => "*".to_string(),
            (None, _) => "default".to_string(),
        };
        ResourceName {
            namespace,
            name: m.name.value.to_string(),
        }
    }

    /// `Kind/namespace/name`, the key a store keeps it under.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }

    /// Serializes as the JSON document.
    pub fn to_json(&self) -> Result<String, String> {
        serde_json::to_string(self).map_err(|e| format!("{}: cannot serialize: {e}", self.key()))
    }

    /// Reads a document from JSON (the wire), re-checking every value.
    pub fn from_json(json: &str) -> Result<Resource, String> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let err = |e: serde_json::Error| e.to_string();
        Ok(match kind.as_str() {
            "AuthorizationPolicy" => {
                Resource::AuthorizationPolicy(serde_json::from_value(v).map_err(err)?)
            }
            "Workload" => Resource::Workload(serde_json::from_value(v).map_err(err)?),
            "Service" => Resource::Service(serde_json::from_value(v).map_err(err)?),
            "DefaultPosture" => Resource::DefaultPosture(serde_json::from_value(v).map_err(err)?),
            other => return Err(format!("unknown kind {other:?}")),
        })
    }

    /// Prints as one YAML document.
    pub fn to_yaml(&self) -> Result<String, String> {
        serde_saphyr::to_string(self).map_err(|e| format!("{}: cannot print: {e}", self.key()))
    }
}
