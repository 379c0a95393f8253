//! Every Kubernetes API call the control plane makes or is built to make, with the RBAC
//! verbs it needs: the ClusterRole in `deploy/kubernetes/base/rbac.yaml` grants exactly
//! these, and a test (`crates/cli/tests/kubernetes.rs`) fails when the two differ either way.
//!
//! Add a call here in the same change that makes it; never grant the control plane anything
//! this list does not name.

/// Whether the code makes a call today, or it is for the controller still being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Made by code in this crate today (named).
    Now(&'static str),
    /// For the watch loop of issue #17, not written yet: granted so that the install does
    /// not change when it lands.
    Controller,
}

/// One RBAC rule: an API group, a resource (or `resource/subresource`), the verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Only these objects (`resourceNames`); empty: any.
    pub names: &'static [&'static str],
    pub caller: Caller,
}

const READ: &[&str] = &["get", "list", "watch"];

/// The name of the MutatingWebhookConfiguration the control plane keeps current.
pub const WEBHOOK_CONFIGURATION_NAME: &str = "bulkhead-injector";

/// The whole list.
pub const API_ACCESS: &[ApiAccess] = &[
    // What the controller derives Workloads and Services from.
    read("", "pods"),
    read("", "services"),
    read("", "namespaces"),
    read("", "serviceaccounts"),
    // The CRs, and the Accepted condition written back.
    read("bulkhead.dev", "authorizationpolicies"),
    read("bulkhead.dev", "workloads"),
    read("bulkhead.dev", "services"),
    read("bulkhead.dev", "defaultpostures"),
    status("authorizationpolicies/status"),
    status("workloads/status"),
    status("services/status"),
    status("defaultpostures/status"),
    // Service-account token attestation: Identity.Join with a service-account token
    // (`bulkhead control --kubernetes-attest`).
    ApiAccess {
        group: "authentication.k8s.io",
        resource: "tokenreviews",
        verbs: &["create"],
        names: &[],
        caller: Caller::Now("attest::TokenReviewer::review"),
    },
    // Keeping the webhook configuration's caBundle the mesh's bundle.
    ApiAccess {
        group: "admissionregistration.k8s.io",
        resource: "mutatingwebhookconfigurations",
        verbs: &["get", "update"],
        names: &[WEBHOOK_CONFIGURATION_NAME],
        caller: Caller::Controller,
    },
];

const fn read(group: &'static str, resource: &'static str) -> ApiAccess {
    ApiAccess {
        group,
        resource,
        verbs: READ,
        names: &[],
        caller: Caller::Controller,
    }
}

const fn status(resource: &'static str) -> ApiAccess {
    ApiAccess {
        group: "bulkhead.dev",
        resource,
        verbs: &["get", "patch", "update"],
        names: &[],
        caller: Caller::Controller,
    }
}
