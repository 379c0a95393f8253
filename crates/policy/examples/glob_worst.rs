//! Decides one request of the worst shape for path globs, once, so that its cost can be
//! counted in instructions, free of the machine's noise:
//! `valgrind --tool=callgrind target/release/examples/glob_worst 65535` (BENCHMARKS.md).
//!
//! The policy denies `/**/v1/**/v1/**/debug`; the path is `/v1/v1/…/x`, BYTES long, which
//! keeps every `**` alive to the end and does not match. Before matching was linear, a
//! 4,800-byte path took 15.8 s.

use bulkhead_policy::model::{Direction, ResourceName};
use bulkhead_policy::{CanonicalRequest, Peer, PolicySet, Protocol, RawRequest, Request};

const SET: &str = "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: api, namespace: shop}\nspec:\n  identity: spiffe://td/ns/shop/sa/api\n  ports: [{port: 8080, protocol: http}]\n---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-debug, namespace: shop}\nspec:\n  selector: {workload: api}\n  action: deny\n  rules:\n    - name: debug\n      to: {paths: [\"/**/v1/**/v1/**/debug\"]}\n";

fn main() {
    let bytes: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a path length in bytes"))
        .unwrap_or(65_535);
    let mut target = "/v1".repeat(bytes.saturating_sub(2) / 3);
    target.push_str("/x");
    let (_, set): (_, PolicySet) =
        bulkhead_policy::load(&[("p.yaml".into(), SET.into())], 1).expect("compiles");
    let raw = RawRequest {
        method: "GET",
        target: &target,
        authority: None,
    };
    let canonical = CanonicalRequest::new(raw, std::iter::empty()).expect("canonical");
    let headers: &[(&str, &str)] = &[];
    let subject = ResourceName {
        namespace: "shop".into(),
        name: "api".into(),
    };
    let decision = set.evaluate(&Request {
        direction: Direction::Ingress,
        subject: &subject,
        peer: Peer {
            identity: Some("spiffe://td/ns/shop/sa/web"),
            ip: None,
            workload: None,
        },
        port: 8080,
        protocol: Protocol::Http,
        http: Some(canonical.http(&headers)),
    });
    println!("{} bytes: {decision}", target.len());
}
