//! What the proxy's unit tests share: the request a sidecar asks its policy about.

use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_policy::{Http, Peer, Protocol, Request};

const NO_HEADERS: &[(&str, &str)] = &[];

/// `GET path` from `caller` to `subject` on its HTTP port 8080, as `subject`'s sidecar judges
/// it (ingress, no host, no headers).
pub(crate) fn get<'a>(subject: &'a WorkloadRef, caller: &'a str, path: &'a str) -> Request<'a> {
    Request {
        direction: Direction::Ingress,
        subject,
        peer: Peer {
            identity: Some(caller),
            ip: None,
            workload: None,
        },
        port: 8080,
        protocol: Protocol::Http,
        http: Some(Http {
            method: "GET",
            path,
            host: None,
            headers: &NO_HEADERS,
        }),
    }
}
