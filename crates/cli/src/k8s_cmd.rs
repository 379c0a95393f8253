//! `bulkhead k8s`: what Bulkhead hands a Kubernetes cluster (`docs/kubernetes.md`).

use anyhow::Result;
use std::io::Write;

/// `bulkhead k8s crds`: the CRDs, exactly as `deploy/kubernetes/base/crds.yaml` holds them.
pub fn crds(out: &mut dyn Write) -> Result<()> {
    let yaml = bulkhead_kubernetes::crd::crds_yaml()
        .map_err(|e| anyhow::anyhow!("could not print the CRDs as YAML: {e}"))?;
    out.write_all(yaml.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `bulkhead k8s crds` prints is the committed install manifest, with every kind.
    #[test]
    fn k8s_crds_prints_the_committed_manifests() {
        let mut out = Vec::new();
        crds(&mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        let committed = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/kubernetes/base/crds.yaml"
        ))
        .unwrap();
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
}
