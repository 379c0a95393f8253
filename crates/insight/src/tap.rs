//! Tap: one decided request as it happens, and the filter an operator taps with.
//!
//! A sidecar sends a [`TapEvent`] for each request it decides that matches a filter an
//! operator is tapping with (`bulkhead tap`); the control plane forwards it and stores
//! nothing. Unlike an [`Edge`](crate::Edge), an event carries the concrete path — the
//! operator is looking at live traffic — but never a query string, a header or a body.

use crate::EdgeVerdict;
use bulkhead_policy::Protocol;
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_spiffe::SpiffeId;
use serde::{Deserialize, Serialize};

/// One request (or TCP connection) a sidecar decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TapEvent {
    /// Unix milliseconds when the sidecar finished with it.
    pub at_millis: u64,
    /// Which sidecar decided: the destination's (ingress) or the source's (egress).
    pub direction: Direction,
    pub source_identity: Option<SpiffeId>,
    pub source_workload: Option<WorkloadRef>,
    pub destination: WorkloadRef,
    pub port: u16,
    pub protocol: Protocol,
    pub method: Option<String>,
    /// The path, without its query string; `None` for TCP.
    pub path: Option<String>,
    /// The HTTP status the caller got; `None` for TCP, or when the destination never
    /// answered.
    pub status: Option<u16>,
    /// gRPC only: the `grpc-status` the caller got, when it came with the response headers
    /// (a denial, or a call that failed before any message). A status sent in trailers, at
    /// the end of a stream, comes after the event and is not in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    pub verdict: EdgeVerdict,
    /// What decided (`shop/orders-allow`, `shop/default`, `built-in`), and by which rule.
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub latency_micros: u64,
}

/// Which requests to tap. Every field that is set must match; an empty filter matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TapFilter {
    /// The caller: its SPIFFE ID, or its workload as `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The destination workload, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A path prefix: `/orders` matches `/orders` and `/orders/7`, not `/ordersx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<VerdictFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
}

/// Verdicts to tap: what the caller got, or where audit-mode policy disagrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerdictFilter {
    /// Got through (including allow-would-deny).
    Allow,
    /// Was refused (including deny-would-allow).
    Deny,
    /// Allowed now; audit-mode policy would deny it.
    WouldDeny,
    /// Denied now; audit-mode policy would allow it.
    WouldAllow,
}

impl VerdictFilter {
    pub fn parse(text: &str) -> Option<VerdictFilter> {
        Some(match text {
            "allow" => VerdictFilter::Allow,
            "deny" => VerdictFilter::Deny,
            "would-deny" => VerdictFilter::WouldDeny,
            "would-allow" => VerdictFilter::WouldAllow,
            _ => return None,
        })
    }

    fn admits(self, v: EdgeVerdict) -> bool {
        match self {
            VerdictFilter::Allow => v.is_allow(),
            VerdictFilter::Deny => !v.is_allow(),
            VerdictFilter::WouldDeny => v == EdgeVerdict::AllowWouldDeny,
            VerdictFilter::WouldAllow => v == EdgeVerdict::DenyWouldAllow,
        }
    }
}

impl TapFilter {
    /// Whether `e` is one of the requests this filter asks for.
    pub fn matches(&self, e: &TapEvent) -> bool {
        if let Some(from) = &self.from {
            let by_identity = e.source_identity.as_deref() == Some(from.as_str());
            let by_workload = e.source_workload.as_ref().is_some_and(|w| names(w, from));
            if !by_identity && !by_workload {
                return false;
            }
        }
        if let Some(to) = &self.to
            && !names(&e.destination, to)
        {
            return false;
        }
        if let Some(m) = &self.method
            && !e
                .method
                .as_deref()
                .is_some_and(|x| x.eq_ignore_ascii_case(m))
        {
            return false;
        }
        if let Some(prefix) = &self.path
            && !e.path.as_deref().is_some_and(|p| under(p, prefix))
        {
            return false;
        }
        if let Some(v) = self.verdict
            && !v.admits(e.verdict)
        {
            return false;
        }
        if let Some(d) = self.direction
            && d != e.direction
        {
            return false;
        }
        true
    }
}

/// Whether `text` (`namespace/name`) names `w`.
fn names(w: &WorkloadRef, text: &str) -> bool {
    text.split_once('/')
        .is_some_and(|(ns, name)| ns == w.namespace && name == w.name)
}

/// `path` is `prefix` or lies below it, segment-wise.
fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_policy::model::ResourceName;

    fn wl(ns: &str, name: &str) -> WorkloadRef {
        ResourceName {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn event() -> TapEvent {
        TapEvent {
            at_millis: 1,
            direction: Direction::Ingress,
            source_identity: Some("spiffe://t/ns/shop/sa/frontend".parse().unwrap()),
            source_workload: Some(wl("shop", "frontend")),
            destination: wl("shop", "orders"),
            port: 8080,
            protocol: Protocol::Http,
            method: Some("GET".into()),
            path: Some("/orders/7".into()),
            status: Some(200),
            grpc_status: None,
            verdict: EdgeVerdict::AllowWouldDeny,
            policy: Some("shop/p".into()),
            rule: Some("r".into()),
            latency_micros: 10,
        }
    }

    fn filter(json: &str) -> TapFilter {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn every_set_field_must_match() {
        let e = event();
        for (f, want) in [
            ("{}", true),
            (r#"{"from":"spiffe://t/ns/shop/sa/frontend"}"#, true),
            (r#"{"from":"shop/frontend"}"#, true),
            (r#"{"from":"shop/payments"}"#, false),
            (r#"{"from":"spiffe://t/ns/shop/sa/payments"}"#, false),
            (r#"{"to":"shop/orders"}"#, true),
            (r#"{"to":"shop/order"}"#, false),
            (r#"{"to":"orders"}"#, false),
            (r#"{"method":"get"}"#, true),
            (r#"{"method":"POST"}"#, false),
            (r#"{"path":"/orders"}"#, true),
            (r#"{"path":"/orders/"}"#, true),
            (r#"{"path":"/orders/7"}"#, true),
            (r#"{"path":"/order"}"#, false),
            (r#"{"path":"/"}"#, true),
            (r#"{"verdict":"allow"}"#, true),
            (r#"{"verdict":"would-deny"}"#, true),
            (r#"{"verdict":"deny"}"#, false),
            (r#"{"verdict":"would-allow"}"#, false),
            (r#"{"direction":"ingress"}"#, true),
            (r#"{"direction":"egress"}"#, false),
            (r#"{"to":"shop/orders","method":"DELETE"}"#, false),
        ] {
            assert_eq!(filter(f).matches(&e), want, "{f}");
        }
        let tcp = TapEvent {
            method: None,
            path: None,
            ..event()
        };
        assert!(!filter(r#"{"path":"/"}"#).matches(&tcp));
        assert!(!filter(r#"{"method":"GET"}"#).matches(&tcp));
    }

    #[test]
    fn unknown_filter_fields_are_refused() {
        assert!(serde_json::from_str::<TapFilter>(r#"{"paht":"/x"}"#).is_err());
    }
}
