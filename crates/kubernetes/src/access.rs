//! Every Kubernetes API call the control plane makes, with the code that makes it and the RBAC
//! verbs it needs: the ClusterRole in `deploy/kubernetes/base/rbac.yaml` grants exactly
//! these, and a test (`crates/cli/tests/kubernetes.rs`) fails when the two differ either way.
//!
//! Add a call here in the same change that makes it; never grant the control plane anything
//! this list does not name.

/// The code that makes a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller(pub &'static str);

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

/// What a reflector does: list, then watch from the list's resourceVersion.
const READ: &[&str] = &["list", "watch"];

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
        caller: Caller("attest::TokenReviewer::review"),
    },
    // Keeping the webhook configuration's caBundle the mesh's bundle.
    ApiAccess {
        group: "admissionregistration.k8s.io",
        resource: "mutatingwebhookconfigurations",
        verbs: &["get", "update"],
        names: &[WEBHOOK_CONFIGURATION_NAME],
        caller: Caller("controller::set_ca_bundle"),
    },
];

const fn read(group: &'static str, resource: &'static str) -> ApiAccess {
    ApiAccess {
        group,
        resource,
        verbs: READ,
        names: &[],
        caller: Caller("controller::spawn (watcher and reflector)"),
    }
}

const fn status(resource: &'static str) -> ApiAccess {
    ApiAccess {
        group: "bulkhead.dev",
        resource,
        verbs: &["patch"],
        names: &[],
        caller: Caller("controller::report (status merge patch)"),
    }
}
