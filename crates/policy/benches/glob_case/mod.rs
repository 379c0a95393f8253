//! The worst case for path globs that `benches/glob.rs` measures and `examples/glob_worst.rs`
//! counts instructions on: workload shop/api, a deny rule on a glob with several `**`, and a
//! path of `/v1` segments it does not match, decided as a sidecar decides.

use bulkhead_policy::model::{Direction, ResourceName};
use bulkhead_policy::{CanonicalRequest, Decision, Peer, PolicySet, Protocol, RawRequest, Request};

/// The workload shop/api, HTTP on 8080.
pub const DECL: &str = "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: api, namespace: shop}\nspec:\n  identity: spiffe://td/ns/shop/sa/api\n  ports: [{port: 8080, protocol: http}]\n";

/// A second document (after `---`): shop/no-debug denies paths matching `pattern` on api.
pub fn no_debug(pattern: &str) -> String {
    format!(
        "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: no-debug, namespace: shop}}\nspec:\n  selector: {{workload: api}}\n  action: deny\n  rules:\n    - name: debug\n      to: {{paths: [\"{pattern}\"]}}\n"
    )
}

/// `/v1/v1/…/v1/x`, `bytes` long at most: every `/v1` keeps every `**` alive.
pub fn path(bytes: usize) -> String {
    let mut p = "/v1".repeat(bytes.saturating_sub(2) / 3);
    p.push_str("/x");
    p
}

/// shop/api, the subject of every decision here.
pub fn api() -> ResourceName {
    ResourceName {
        namespace: "shop".into(),
        name: "api".into(),
    }
}

/// `GET target` to `subject` on 8080 from shop/web, decided through the whole set.
pub fn decide(set: &PolicySet, subject: &ResourceName, target: &str) -> Decision {
    let canonical = CanonicalRequest::new(
        RawRequest {
            method: "GET",
            target,
            authority: None,
        },
        std::iter::empty(),
    )
    .expect("canonical");
    let headers: &[(&str, &str)] = &[];
    set.evaluate(&Request {
        direction: Direction::Ingress,
        subject,
        peer: Peer {
            identity: Some("spiffe://td/ns/shop/sa/web"),
            ip: None,
            workload: None,
        },
        port: 8080,
        protocol: Protocol::Http,
        http: Some(canonical.http(&headers)),
    })
}
