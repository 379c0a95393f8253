//! The checked policy model: what the control plane stores and sends to proxies.
//!
//! Every value here has passed [`crate::parse_documents`]'s checks; deserializing a model
//! (from the wire) re-runs the value checks, so a proxy never holds an unchecked pattern.

use crate::pattern::{IdentityPattern, Method, PathPattern};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One policy resource, tagged by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum Resource {
    AuthorizationPolicy(AuthorizationPolicy),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
        }
    }

    pub fn name(&self) -> &ResourceName {
        match self {
            Resource::AuthorizationPolicy(p) => &p.name,
        }
    }

    /// The destination workload this resource is enforced for, if it targets one.
    pub fn target_workload(&self) -> Option<&WorkloadRef> {
        match self {
            Resource::AuthorizationPolicy(p) => Some(&p.spec.selector.workload),
        }
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: ResourceName,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Selector,
    pub action: Action,
    pub rules: Vec<Rule>,
}

/// Which workloads a policy protects. The workload lives in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub workload: WorkloadRef,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One rule: a request matches when it matches `from` and `to` (an empty list matches all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub from: Vec<IdentityPattern>,
    pub methods: Vec<Method>,
    pub paths: Vec<PathPattern>,
}
