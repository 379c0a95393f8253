//! Bulkhead on Kubernetes: the same resources as CRDs (`crd`, read by `cr`), Workloads and
//! Services derived from pods and Kubernetes Services (`derive`), the set the cluster asks
//! for (`desired`), sidecar injection (`inject`, served by `webhook`), service-account token
//! attestation (`attest`), and the controller that watches the cluster and commits what it
//! derives as revisions of the control plane (`controller`).
//!
//! The control plane knows nothing of Kubernetes: this crate calls into it through
//! `bulkhead_control::Resources` (read the set, change it as one checked revision) and plugs
//! attestation into its Join through `bulkhead_control::ServiceAccountAttestor`. The logic
//! that reads Kubernetes objects is pure and tested on objects as the API server sends them;
//! only `controller`, `webhook` and `attest` talk to the network.
//!
//! It must never loosen enforcement on bad input: a CR that does not compile changes nothing,
//! a pod that should be meshed is refused rather than admitted without its sidecar, and a
//! token is never taken on its own word.

pub mod access;
pub mod admission;
pub mod attest;
pub mod controller;
pub mod cr;
pub mod crd;
pub mod derive;
pub mod desired;
pub mod inject;
pub mod webhook;

/// The label every resource the controller writes carries; the controller owns exactly the
/// resources with it, and replaces or deletes them as the cluster changes.
pub const MANAGED_BY_LABEL: &str = "bulkhead.dev/managed-by";
pub const MANAGED_BY_VALUE: &str = "kubernetes";
