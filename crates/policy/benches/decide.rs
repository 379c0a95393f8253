//! How fast a proxy decides, and how fast a policy set compiles, on mesh-shaped sets.
//!
//! A set of N policies protects W = N / 10 workloads: each workload is declared with an HTTP
//! port and is selected by 10 AuthorizationPolicies of one rule each; every rule allows one
//! exact caller identity, one method and one path prefix. Sizes: 10 (1 workload), 1,000
//! (100 workloads) and 10,000 (1,000 workloads).
//!
//! Decisions are measured on a rotating list of requests spread over all workloads (not one
//! request in a hot loop), for an allowed and a denied request. After criterion's runs, the
//! bench also times single decisions one by one and prints their p50 and p99.
//!
//! Run: `cargo bench -p bulkhead-policy --bench decide` (see BENCHMARKS.md).

use bulkhead_policy::model::{Direction, Resource, ResourceName};
use bulkhead_policy::{Http, Peer, PolicySet, Protocol, Request, load, parse_documents};
use criterion::{BenchmarkId, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant};

mod shape;
use shape::{METHODS, RULES_PER_WORKLOAD, caller, mesh_yaml, rule_path, workload};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

struct Mesh {
    policies: usize,
    workloads: usize,
    resources: Vec<Resource>,
    set: PolicySet,
}

fn mesh(policies: usize) -> Mesh {
    let resources = parse_documents("mesh.yaml", &mesh_yaml(policies)).expect("mesh parses");
    let set = PolicySet::compile(&resources, 1).expect("mesh compiles");
    Mesh {
        policies,
        workloads: policies / RULES_PER_WORKLOAD,
        resources,
        set,
    }
}

/// One request, owned, so a list of them can be rotated through.
struct Owned {
    subject: ResourceName,
    identity: String,
    method: &'static str,
    path: String,
}

impl Owned {
    fn decide(&self, set: &PolicySet) -> bool {
        let headers: &[(&str, &str)] = &[];
        let req = Request {
            direction: Direction::Ingress,
            subject: &self.subject,
            peer: Peer {
                identity: Some(&self.identity),
                ip: None,
                workload: None,
            },
            port: 8080,
            protocol: Protocol::Http,
            http: Some(Http {
                method: self.method,
                path: &self.path,
                host: None,
                headers: &headers,
            }),
        };
        set.evaluate(&req).is_allow()
    }
}

/// 1,024 requests spread over the mesh's workloads and rules (or, not `spread`, over the
/// rules of one workload): all allowed, or all denied (a caller no rule names, which also
/// makes the explanation look for the nearest miss).
fn requests(m: &Mesh, allowed: bool, spread: bool) -> Vec<Owned> {
    (0..1024)
        .map(|i| {
            let j = if spread {
                (i * 131) % m.workloads
            } else {
                m.workloads / 2
            };
            let k = (i * 7) % RULES_PER_WORKLOAD;
            let (namespace, name, _) = workload(j);
            let identity = if allowed {
                caller(j, k, m.workloads)
            } else {
                format!("spiffe://mesh.local/ns/intruder/sa/x{i}")
            };
            Owned {
                subject: ResourceName { namespace, name },
                identity,
                method: METHODS[k % METHODS.len()],
                path: format!("{}items/{i}", rule_path(k)),
            }
        })
        .collect()
}

fn bench_decisions(c: &mut Criterion, meshes: &[Mesh]) {
    for (label, allowed, spread) in [
        ("allow", true, true),
        ("deny", false, true),
        ("allow-one-workload", true, false),
    ] {
        let mut group = c.benchmark_group(format!("evaluate/{label}"));
        for m in meshes {
            let reqs = requests(m, allowed, spread);
            assert!(
                reqs.iter().all(|r| r.decide(&m.set) == allowed),
                "{label} requests must all be {}",
                if allowed { "allowed" } else { "denied" }
            );
            let mut i = 0usize;
            group.bench_function(BenchmarkId::from_parameter(m.policies), |b| {
                b.iter(|| {
                    i = (i + 1) & 1023;
                    black_box(reqs[i].decide(black_box(&m.set)))
                })
            });
        }
        group.finish();
    }
}

fn bench_compile(c: &mut Criterion, big: &Mesh) {
    let text = mesh_yaml(big.policies);
    let files = vec![("mesh.yaml".to_string(), text)];
    let mut group = c.benchmark_group("compile");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.bench_function(BenchmarkId::new("compile", big.policies), |b| {
        b.iter(|| black_box(PolicySet::compile(black_box(&big.resources), 1).expect("compiles")))
    });
    group.bench_function(BenchmarkId::new("parse+compile", big.policies), |b| {
        b.iter(|| black_box(load(black_box(&files), 1).expect("loads")))
    });
    group.finish();
}

/// Times `n` single decisions one by one; returns (p50, p99) in nanoseconds, including the
/// cost of reading the clock (printed beside them).
fn percentiles(set: &PolicySet, reqs: &[Owned], n: usize) -> (u64, u64) {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let r = &reqs[i % reqs.len()];
        let t = Instant::now();
        black_box(r.decide(black_box(set)));
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    (samples[n / 2], samples[n * 99 / 100])
}

fn clock_cost(n: usize) -> u64 {
    let mut samples: Vec<u64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            t.elapsed().as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    samples[n / 2]
}

fn report_percentiles(meshes: &[Mesh]) {
    const N: usize = 200_000;
    println!(
        "\nsingle decisions, timed one by one ({N} each; clock read costs ~{} ns, included):",
        clock_cost(N)
    );
    println!(
        "{:>8} {:>6} {:>10} {:>10}",
        "policies", "kind", "p50 ns", "p99 ns"
    );
    for m in meshes {
        for (label, allowed) in [("allow", true), ("deny", false)] {
            let reqs = requests(m, allowed, true);
            let _ = percentiles(&m.set, &reqs, N / 10);
            let (p50, p99) = percentiles(&m.set, &reqs, N);
            println!("{:>8} {:>6} {:>10} {:>10}", m.policies, label, p50, p99);
        }
    }
}

fn main() {
    let meshes: Vec<Mesh> = SIZES.iter().map(|&n| mesh(n)).collect();
    for m in &meshes {
        assert_eq!(m.set.rule_count(), m.policies);
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .configure_from_args();
    bench_decisions(&mut c, &meshes);
    bench_compile(&mut c, &meshes[meshes.len() - 1]);
    c.final_summary();
    // Only when benchmarking for real (`cargo bench`), not under `cargo test --benches`.
    if std::env::args().any(|a| a == "--bench") {
        report_percentiles(&meshes);
    }
}
