//! The mesh shape `benches/decide.rs` measures and `examples/decide_count.rs` counts
//! instructions on: `policies / 10` workloads, each selected by 10 single-rule allow
//! policies (one exact caller, one method, one path prefix each).

use std::fmt::Write as _;

pub const RULES_PER_WORKLOAD: usize = 10;
pub const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

/// Workload `j`: namespace, name, identity.
pub fn workload(j: usize) -> (String, String, String) {
    let ns = format!("ns{}", j / 100);
    let name = format!("w{j}");
    let id = format!("spiffe://mesh.local/ns/{ns}/sa/{name}");
    (ns, name, id)
}

/// The caller that rule `k` of workload `j` allows: another workload of the mesh.
pub fn caller(j: usize, k: usize, workloads: usize) -> String {
    workload((j * 7 + k * 13 + 1) % workloads.max(1)).2 + &format!("-c{k}")
}

pub fn rule_path(k: usize) -> String {
    format!("/api/v{k}/")
}

/// The YAML of a mesh with `policies` single-rule policies over `policies / 10` workloads.
pub fn mesh_yaml(policies: usize) -> String {
    let workloads = policies / RULES_PER_WORKLOAD;
    let mut out = String::with_capacity(policies * 400);
    for j in 0..workloads {
        let (ns, name, id) = workload(j);
        let _ = write!(
            out,
            "---\napiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\nspec:\n  identity: \"{id}\"\n  ports: [{{port: 8080, protocol: http}}]\n"
        );
        for k in 0..RULES_PER_WORKLOAD {
            let _ = write!(
                out,
                "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}-allow-{k}, namespace: {ns}}}\nspec:\n  selector: {{workload: {name}}}\n  action: allow\n  rules:\n    - name: r{k}\n      from: {{identities: [\"{}\"]}}\n      to: {{methods: [{}], paths: [\"{}*\"]}}\n",
                caller(j, k, workloads),
                METHODS[k % METHODS.len()],
                rule_path(k)
            );
        }
    }
    out
}
