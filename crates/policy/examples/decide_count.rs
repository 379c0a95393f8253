//! A fixed number of decisions on the mesh shape of `benches/decide.rs`, for counting
//! instructions, which the machine's noise does not move:
//! `valgrind --tool=callgrind --toggle-collect='*PolicySet*evaluate*' \
//!   target/release/examples/decide_count 10000 allow 100000` (BENCHMARKS.md).
//!
//! Arguments: number of policies (10 per workload), `allow` or `deny`, number of decisions.

use bulkhead_policy::model::{Direction, ResourceName};
use bulkhead_policy::{Http, Peer, PolicySet, Protocol, Request, parse_documents};

#[path = "../benches/shape/mod.rs"]
mod shape;
use shape::{METHODS, RULES_PER_WORKLOAD, caller, mesh_yaml, rule_path, workload};

fn main() {
    let mut args = std::env::args().skip(1);
    let policies: usize = args.next().map_or(10_000, |a| a.parse().expect("policies"));
    let allow = args.next().is_none_or(|a| a == "allow");
    let decisions: usize = args
        .next()
        .map_or(100_000, |a| a.parse().expect("decisions"));
    let workloads = (policies / RULES_PER_WORKLOAD).max(1);
    let yaml = mesh_yaml(policies.max(RULES_PER_WORKLOAD));
    let resources = parse_documents("mesh.yaml", &yaml).expect("parses");
    let set = PolicySet::compile(&resources, 1).expect("compiles");
    let headers: &[(&str, &str)] = &[];
    let mut allowed = 0usize;
    for i in 0..decisions {
        let (j, k) = ((i * 37) % workloads, i % RULES_PER_WORKLOAD);
        let (namespace, name, _) = workload(j);
        let subject = ResourceName { namespace, name };
        let identity = match allow {
            true => caller(j, k, workloads),
            false => "spiffe://mesh.local/ns/x/sa/stranger".to_string(),
        };
        let path = format!("{}items/{i}", rule_path(k));
        let req = Request {
            direction: Direction::Ingress,
            subject: &subject,
            peer: Peer {
                identity: Some(&identity),
                ip: None,
                workload: None,
            },
            port: 8080,
            protocol: Protocol::Http,
            http: Some(Http {
                method: METHODS[k % METHODS.len()],
                path: &path,
                host: None,
                headers: &headers,
            }),
        };
        allowed += usize::from(set.evaluate(&req).is_allow());
    }
    println!("{decisions} decisions, {allowed} allowed");
}
