//! Bulkhead on Kubernetes with the real binary: `bulkhead k8s crds` prints the CRDs the
//! install manifests hold, and the API server's own tooling (`kubectl kustomize`) renders them.
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::{Bins, run};
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn k8s_crds_prints_the_committed_manifests() {
    let bins = Bins::next_to(env!("CARGO_BIN_EXE_bulkhead"));
    let (code, out, err) = run(&bins.bulkhead, &["k8s", "crds"], &[]);
    assert_eq!(code, 0, "{err}");
    let committed =
        std::fs::read_to_string(repo().join("deploy/kubernetes/base/crds.yaml")).unwrap();
    assert_eq!(out, committed);
    for name in [
        "authorizationpolicies.bulkhead.dev",
        "workloads.bulkhead.dev",
        "services.bulkhead.dev",
        "defaultpostures.bulkhead.dev",
    ] {
        assert!(out.contains(&format!("name: {name}")), "{name} missing");
    }
    assert!(out.contains("openAPIV3Schema"));
    assert!(out.contains("additionalPrinterColumns"));
    assert!(out.contains("status: {}"));
}
