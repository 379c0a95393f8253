//! The four `bulkhead.dev/v1alpha1` kinds as CustomResourceDefinitions, generated from the
//! policy crate's own spec types (kube's derive and schemars), so that a CR and a file for
//! `bulkhead apply` are one language with one schema.
//!
//! The generated schemas keep unknown fields (`x-kubernetes-preserve-unknown-fields`) where
//! the policy types refuse them: the API server would otherwise prune a misspelt field
//! silently (a `notPath` dropped widens a rule), where the controller refuses the CR whole and
//! says which field. This module must never describe a value the parser would refuse as
//! valid by omission of a required field, nor one it accepts as invalid.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group of every kind.
pub const GROUP: &str = "bulkhead.dev";
/// The one version.
pub const VERSION: &str = "v1alpha1";

/// What the controller reports on a CR.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrStatus {
    /// `Accepted`: whether the mesh enforces this generation of the CR.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The mesh revision that holds the accepted version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// A status condition, shaped as Kubernetes' own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339.
    pub last_transition_time: String,
}

macro_rules! kind {
    ($spec:ident, $inner:ty, $kind:literal, $plural:literal, $short:literal, $doc:literal $(, $col:expr)*) => {
        #[doc = $doc]
        #[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
        #[kube(
            group = "bulkhead.dev",
            version = "v1alpha1",
            kind = $kind,
            plural = $plural,
            shortname = $short,
            category = "bulkhead",
            namespaced,
            status = "CrStatus",
            doc = $doc,
            printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
            printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".status.revision"}"#,
            $(printcolumn = $col,)*
            printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
        )]
        #[serde(transparent)]
        pub struct $spec(pub $inner);
    };
}

kind!(
    AuthorizationPolicySpec,
    bulkhead_policy::model::AuthorizationPolicySpec,
    "AuthorizationPolicy",
    "authorizationpolicies",
    "bap",
    "Allow or deny requests to (ingress) or from (egress) the selected workloads; docs/policy.md.",
    r#"{"name":"Direction","type":"string","jsonPath":".spec.direction"}"#,
    r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
);
kind!(
    WorkloadSpec,
    bulkhead_policy::model::WorkloadSpec,
    "Workload",
    "workloads",
    "bwl",
    "A workload outside the cluster's pods (a VM, a process): its identity, ports and addresses. Pods get theirs derived.",
    r#"{"name":"Identity","type":"string","jsonPath":".spec.identity"}"#
);
kind!(
    ServiceSpec,
    bulkhead_policy::model::ServiceSpec,
    "Service",
    "services",
    "bsvc",
    "A named group of workloads for egress rules; Kubernetes Services get theirs derived."
);
kind!(
    DefaultPostureSpec,
    bulkhead_policy::model::DefaultPostureSpec,
    "DefaultPosture",
    "defaultpostures",
    "bdp",
    "What happens to requests no rule decides, in this CR's namespace.",
    r#"{"name":"Ingress","type":"string","jsonPath":".spec.ingress"}"#,
    r#"{"name":"Egress","type":"string","jsonPath":".spec.egress"}"#
);

/// The kinds and their plurals, as the controller watches them.
pub const KINDS: &[(&str, &str)] = &[
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("Workload", "workloads"),
    ("Service", "services"),
    ("DefaultPosture", "defaultpostures"),
];

/// The four CustomResourceDefinitions, schemas made structural and unknown fields kept.
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    [
        AuthorizationPolicy::crd(),
        Workload::crd(),
        Service::crd(),
        DefaultPosture::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let mut v = serde_json::to_value(&crd).unwrap_or(Value::Null);
        if let Some(versions) = v
            .pointer_mut("/spec/versions")
            .and_then(Value::as_array_mut)
        {
            for version in versions {
                if let Some(schema) = version.pointer_mut("/schema/openAPIV3Schema/properties/spec")
                {
                    keep_unknown_fields(schema);
                }
            }
        }
        // The round trip only rewrites schema objects that were already valid.
        serde_json::from_value(v).unwrap_or(crd)
    })
    .collect()
}

/// Every object with declared properties keeps unknown ones (kube's structural rewrite has
/// already dropped `additionalProperties: false`, which Kubernetes does not allow): the
/// policy parser refuses them, with their path, instead of the API server pruning them.
fn keep_unknown_fields(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            map.remove("additionalProperties")
                .filter(|a| a != &Value::Bool(false))
                .map(|a| map.insert("additionalProperties".into(), a));
            if map.contains_key("properties") {
                map.insert(
                    "x-kubernetes-preserve-unknown-fields".into(),
                    Value::Bool(true),
                );
            }
            for v in map.values_mut() {
                keep_unknown_fields(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(keep_unknown_fields),
        _ => {}
    }
}

/// The CRDs as one YAML stream, as `bulkhead k8s crds` prints it and `deploy/kubernetes/base/crds.yaml`
/// holds it.
pub fn crds_yaml() -> Result<String, String> {
    let mut out = String::from(
        "# Generated by `bulkhead k8s crds` from the policy crate's types; do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_names_and_scope() {
        let crds = crds();
        let names: Vec<String> = crds
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "authorizationpolicies.bulkhead.dev",
                "workloads.bulkhead.dev",
                "services.bulkhead.dev",
                "defaultpostures.bulkhead.dev"
            ]
        );
        for crd in &crds {
            assert_eq!(crd.spec.scope, "Namespaced");
            let v = &crd.spec.versions[0];
            assert!(v.served && v.storage);
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some()
            );
        }
    }

    #[test]
    fn schemas_keep_unknown_fields_instead_of_refusing_them() {
        let text = serde_json::to_string(&crds()).unwrap();
        assert!(!text.contains("\"additionalProperties\":false"));
        assert!(text.contains("x-kubernetes-preserve-unknown-fields"));
    }

    /// The committed manifests are what the types generate: a change to a policy type that
    /// is not regenerated fails here, with the command that fixes it.
    #[test]
    fn committed_crds_match_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/kubernetes/base/crds.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = crds_yaml().unwrap();
        assert!(
            committed == generated,
            "deploy/kubernetes/base/crds.yaml has drifted from the policy types; regenerate it: \
             cargo run -p bulkhead-cli -- k8s crds > deploy/kubernetes/base/crds.yaml"
        );
    }
}
