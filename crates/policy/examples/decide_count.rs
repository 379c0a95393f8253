//! A fixed number of decisions on the mesh shape of `benches/decide.rs`, for counting
//! instructions, which the machine's noise does not move:
//! `valgrind --tool=callgrind --toggle-collect='*PolicySet*evaluate*' \
//!   target/release/examples/decide_count 10000 allow 100000` (BENCHMARKS.md).
//!
//! Arguments: number of policies (10 per workload), `allow` or `deny`, number of decisions.

use bulkhead_policy::model::{Direction, ResourceName};
use bulkhead_policy::{Http, Peer, PolicySet, Protocol, Request, parse_documents};
use std::fmt::Write as _;

const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

fn workload(j: usize) -> (String, String, String) {
    let ns = format!("ns{}", j / 100);
    let name = format!("w{j}");
    let id = format!("spiffe://mesh.local/ns/{ns}/sa/{name}");
    (ns, name, id)
}

fn caller(j: usize, k: usize, workloads: usize) -> String {
    workload((j * 7 + k * 13 + 1) % workloads.max(1)).2 + &format!("-c{k}")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let policies: usize = args.next().map_or(10_000, |a| a.parse().expect("policies"));
    let allow = args.next().is_none_or(|a| a == "allow");
    let decisions: usize = args
        .next()
        .map_or(100_000, |a| a.parse().expect("decisions"));
    let workloads = (policies / 10).max(1);
    let mut yaml = String::new();
    for j in 0..workloads {
        let (ns, name, id) = workload(j);
        let _ = write!(
            yaml,
            "---\napiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  identity: \"{id}\"\n  ports: [{{port: 8080, protocol: http}}]\n"
        );
        for k in 0..10 {
            let _ = write!(
                yaml,
                "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}-allow-{k}, namespace: {ns}}}\nspec:\n  selector: {{workload: {name}}}\n  action: allow\n  rules:\n    - name: r{k}\n      from: {{identities: [\"{}\"]}}\n      to: {{methods: [{}], paths: [\"/api/v{k}/*\"]}}\n",
                caller(j, k, workloads),
                METHODS[k % 4],
            );
        }
    }
    let resources = parse_documents("mesh.yaml", &yaml).expect("parses");
    let set = PolicySet::compile(&resources, 1).expect("compiles");
    let headers: &[(&str, &str)] = &[];
    let mut allowed = 0usize;
    for i in 0..decisions {
        let (j, k) = ((i * 37) % workloads, i % 10);
        let (namespace, name, _) = workload(j);
        let subject = ResourceName { namespace, name };
        let identity = match allow {
            true => caller(j, k, workloads),
            false => "spiffe://mesh.local/ns/x/sa/stranger".to_string(),
        };
        let path = format!("/api/v{k}/items/{i}");
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
                method: METHODS[k % 4],
                path: &path,
                host: None,
                headers: &headers,
            }),
        };
        allowed += usize::from(set.evaluate(&req).is_allow());
    }
    println!("{decisions} decisions, {allowed} allowed");
}
