//! Compiles a large mesh once and reports what it holds, so that peak memory can be measured
//! from outside: `/usr/bin/time -v target/release/examples/policy_scale` (BENCHMARKS.md).
//!
//! The shape is issue #15's: 1,000 Workloads in one namespace and 1,000 namespace-wide
//! AuthorizationPolicies (no selector), one rule each. Every policy protects every workload,
//! so a compiler that copied rules per workload would hold 1,000,000 of them.
//!
//! `cargo run --release -p bulkhead-policy --example policy_scale [WORKLOADS] [POLICIES]`

use std::fmt::Write as _;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut number = |default: usize| {
        args.next()
            .map(|a| a.parse().expect("a number of workloads or policies"))
            .unwrap_or(default)
    };
    let (workloads, policies) = (number(1_000), number(1_000));
    let mut yaml = String::new();
    for j in 0..workloads {
        let _ = write!(
            yaml,
            "---\napiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{j}, namespace: shop, labels: {{app: w{j}}}}}\nspec:\n  identity: spiffe://td/ns/shop/sa/w{j}\n  ports: [{{port: 8080, protocol: http}}]\n"
        );
    }
    for k in 0..policies {
        let _ = write!(
            yaml,
            "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p{k}, namespace: shop}}\nspec:\n  action: allow\n  rules:\n    - from: {{identities: [\"spiffe://td/ns/shop/sa/w{}\"]}}\n      to: {{paths: [\"/api/v{k}/*\"]}}\n",
            k % workloads.max(1)
        );
    }
    let started = Instant::now();
    let (_, set) = bulkhead_policy::load(&[("mesh.yaml".into(), yaml.clone())], 1)
        .unwrap_or_else(|e| panic!("the mesh is refused: {:?}", &e[..e.len().min(3)]));
    println!(
        "{workloads} workloads x {policies} namespace-wide policies: {} KB of YAML; {} rules compiled, {} rule uses over the workloads; parse + compile {:.2} s",
        yaml.len() / 1000,
        set.compiled_rule_count(),
        set.rule_count(),
        started.elapsed().as_secs_f64()
    );
}
