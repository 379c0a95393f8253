//! HTTP/1.1 upgrades: which protocols a request may switch to, and what a switched
//! connection becomes — a tunnel, registered like an opaque relay and judged again, with the
//! request that opened it, on every policy change.
//!
//! Why it exists: once a connection has switched protocols the sidecars see only bytes, so
//! what may switch decides what passes unjudged. `websocket` may (on every port served as
//! HTTP; a port declared `tcp` is relayed opaquely anyway). `h2c` never: a switch to HTTP/2
//! inside an allowed request would carry any number of HTTP/2 requests past every
//! per-request decision (issue #22's smuggling of `GET /admin`). An upgrade to a protocol
//! not allowed is not refused with an error: the `Upgrade` header (with `HTTP2-Settings` and
//! the `Connection` tokens naming them) is stripped and the request is served as the plain
//! HTTP/1.1 request it also is, as RFC 9110 §7.8 lets a server do; the refusal is counted
//! (`upgrade_refused`) and logged.
//!
//! It must never forward an `Upgrade` token outside [`ALLOWED`], never join two sides on a
//! `101` that names another protocol than the one forwarded, never pass on a `101` to a
//! request that did not ask to switch, and never leave a tunnel off the list that policy
//! changes re-judge.

use crate::Shared;
use crate::authz::{Judgement, Permit, Snapshot};
use crate::deadline::{ResponseTimeout, response_head};
use crate::http::{Body, LinkError, proxy_response, response_body};
use crate::metrics::Refusal;
use crate::tcp::Flow;
use bulkhead_policy::model::WorkloadRef;
use bulkhead_policy::{Http, Protocol};
use http::header::{CONNECTION, HeaderValue, UPGRADE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// The protocols a request may switch to on a port served as HTTP. (Policy may name others
/// per port later; until then this is the whole list.)
pub(crate) const ALLOWED: &[&str] = &["websocket"];

/// Sent with `Upgrade: h2c`; means nothing without it.
const HTTP2_SETTINGS: &str = "http2-settings";

/// What a request asks to switch to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ask {
    /// Not an upgrade request.
    Nothing,
    /// A switch the port allows: the `Upgrade` value to forward (the allowed protocols of
    /// those asked, in the caller's order), and those left out, if any.
    Switch {
        upgrade: HeaderValue,
        refused: Option<String>,
    },
    /// Only protocols the port does not allow: served as plain HTTP/1.1.
    Refused(String),
}

/// An `Upgrade` token's protocol name, without its version (`websocket/13` → `websocket`).
fn protocol_name(token: &str) -> &str {
    token.split('/').next().unwrap_or(token).trim()
}

/// Whether a request asks to switch protocols (an HTTP/1.1 request with `Upgrade` and a
/// `Connection` header naming it), and to what.
pub(crate) fn ask<B>(req: &Request<B>) -> Ask {
    let connection_says_upgrade = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if req.version() != http::Version::HTTP_11
        || !connection_says_upgrade
        || !req.headers().contains_key(UPGRADE)
    {
        return Ask::Nothing;
    }
    let (mut allowed, mut refused) = (Vec::new(), Vec::new());
    for value in req.headers().get_all(UPGRADE) {
        // A value that is not text names no protocol we allow.
        let text = String::from_utf8_lossy(value.as_bytes());
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let name = protocol_name(token);
            if ALLOWED.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                allowed.push(token.to_string());
            } else {
                refused.push(token.to_string());
            }
        }
    }
    let refused = (!refused.is_empty()).then(|| refused.join(", "));
    match HeaderValue::from_str(&allowed.join(", ")) {
        Ok(upgrade) if !allowed.is_empty() => Ask::Switch { upgrade, refused },
        _ => Ask::Refused(refused.unwrap_or_default()),
    }
}

/// Makes a request's headers say exactly what may be forwarded: every hop-by-hop header and
/// `HTTP2-Settings` removed, then for an allowed switch `Connection: upgrade` and the
/// allowed `Upgrade` alone.
pub(crate) fn prepare(headers: &mut http::HeaderMap, switch: Option<&HeaderValue>) {
    crate::http::strip_hop_by_hop(headers);
    headers.remove(HTTP2_SETTINGS);
    if let Some(upgrade) = switch {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, upgrade.clone());
    }
}

/// What a request may switch to on this port ([`ask`]), if anything; each protocol it asked
/// for that is not allowed is counted and logged.
pub(crate) fn switch_to<B>(
    req: &Request<B>,
    shared: &Shared,
    direction: &'static str,
) -> Option<HeaderValue> {
    let (switch, left_out) = match ask(req) {
        Ask::Nothing => (None, None),
        Ask::Refused(protocols) => (None, Some(protocols)),
        Ask::Switch { upgrade, refused } => (Some(upgrade), refused),
    };
    if let Some(protocols) = left_out {
        refused(shared, direction, &protocols, req.uri().path());
    }
    switch
}

/// Counts and logs the protocols a request was not allowed to switch to.
fn refused(shared: &Shared, direction: &'static str, protocols: &str, path: &str) {
    if let Some(unlogged) = shared.refuse(direction, Refusal::UpgradeRefused) {
        tracing::warn!(
            direction,
            reason = Refusal::UpgradeRefused.label(),
            protocols,
            http.path = path,
            unlogged,
            "upgrade refused: this port allows switching only to {}; served as plain HTTP/1.1",
            ALLOWED.join(", ")
        );
    }
}

/// The request that opened a tunnel, kept to judge it again when policy changes.
#[derive(Debug)]
pub(crate) struct OpenedBy {
    /// The connection the request came on, as L4 sees it.
    pub flow: Flow,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
    /// What it switched to, for logs.
    pub protocol: String,
}

impl OpenedBy {
    /// Copies what policy saw of a request (made once per upgrade, not per request).
    pub(crate) fn of<B>(
        req: &Request<B>,
        flow: Flow,
        host: Option<String>,
        protocol: &HeaderValue,
    ) -> OpenedBy {
        OpenedBy {
            flow,
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
            host,
            headers: req
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
            protocol: String::from_utf8_lossy(protocol.as_bytes()).into_owned(),
        }
    }

    /// Judges the opening request again, against `snapshot`.
    pub(crate) fn judge(&self, snapshot: &Snapshot, subject: &WorkloadRef) -> Judgement {
        let http = Http {
            method: &self.method,
            path: &self.path,
            host: self.host.as_deref(),
            headers: &self.headers,
        };
        self.flow
            .judge_request(snapshot, subject, Protocol::Http, Some(http))
    }
}

/// Whether a `101`'s `Upgrade` names only protocols that were forwarded (at least one).
fn switched_as_asked(resp: &http::HeaderMap, forwarded: &HeaderValue) -> bool {
    let asked: Vec<&str> = forwarded
        .to_str()
        .unwrap_or_default()
        .split(',')
        .map(protocol_name)
        .collect();
    let mut named = resp
        .get_all(UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(protocol_name)
        .peekable();
    named.peek().is_some() && named.all(|n| asked.iter().any(|a| a.eq_ignore_ascii_case(n)))
}

/// The answer to a `101` the sidecar did not ask for, or for another protocol than the one
/// it forwarded: the switch is not joined, the caller gets 502 and its connection is
/// closed; counted (`upgrade_mismatch`) and logged.
pub(crate) fn mismatch(
    shared: &Shared,
    direction: &'static str,
    whom: &str,
    asked: Option<&HeaderValue>,
    answered: Option<&HeaderValue>,
) -> Response<Body> {
    let text = |v: Option<&HeaderValue>| {
        v.map_or("nothing".to_string(), |v| {
            format!("{:?}", String::from_utf8_lossy(v.as_bytes()))
        })
    };
    let (asked, answered) = (text(asked), text(answered));
    if let Some(unlogged) = shared.refuse(direction, Refusal::UpgradeMismatch) {
        tracing::warn!(
            direction,
            reason = Refusal::UpgradeMismatch.label(),
            asked,
            answered,
            unlogged,
            "{whom} switched protocols to something the sidecar did not ask for; connection closed"
        );
    }
    let mut resp = proxy_response(
        StatusCode::BAD_GATEWAY,
        None,
        format!(
            "bulkhead: {whom} answered 101 Switching Protocols to {answered} when asked for {asked}; the switch is refused"
        ),
    );
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Forwards an allowed upgrade on a connection of its own (`connect`, to `whom`), its
/// response head within the response deadline. On a `101` for the protocol asked, both
/// sides are joined into a tunnel judged again on every policy change (and closed when idle
/// for `--idle-timeout-secs`); on a `101` for anything else, nothing is joined and the
/// caller gets 502.
///
/// Boxed at once: an upgrade is rare, and its handshake would size every request's future.
pub(crate) fn forward<Fut, Io>(
    permit: Permit,
    req: Request<Incoming>,
    connect: Fut,
    upgrade: HeaderValue,
    opened: OpenedBy,
    shared: Arc<Shared>,
    whom: String,
) -> impl Future<Output = Result<Result<Response<Body>, LinkError>, ResponseTimeout>>
where
    Fut: Future<Output = std::io::Result<Io>>,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = shared.limits.response_timeout;
    let send = Box::pin(switch(permit, req, connect, upgrade, opened, shared, whom));
    async move { response_head(send, None, deadline).await }
}

async fn switch<Fut, Io>(
    permit: Permit,
    mut req: Request<Incoming>,
    connect: Fut,
    upgrade: HeaderValue,
    opened: OpenedBy,
    shared: Arc<Shared>,
    whom: String,
) -> Result<Response<Body>, LinkError>
where
    Fut: Future<Output = std::io::Result<Io>>,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let downstream = hyper::upgrade::on(&mut req);
    let io = TokioIo::new(connect.await.map_err(LinkError::Connect)?);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgraded upstream connection ended");
        }
    });
    let mut resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(response_body(resp));
    }
    let direction = opened.flow.direction_label();
    if !switched_as_asked(resp.headers(), &upgrade) {
        return Ok(mismatch(
            &shared,
            direction,
            &whom,
            Some(&upgrade),
            resp.headers().get(UPGRADE),
        ));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let opened = crate::tcp::Opened::Upgrade(Arc::new(opened));
                // How it ended is counted by the tunnel; nothing is left to reset here.
                let _ended = crate::tcp::tunnel(
                    &shared,
                    permit,
                    opened,
                    TokioIo::new(down),
                    TokioIo::new(up),
                )
                .await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
        }
    });
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, Body::peer(body)))
}

/// The answer on the plain path, where no switch was forwarded: a `101` from `whom` is never
/// passed on, but answered as a [`mismatch`].
pub(crate) fn unasked<E>(
    sent: Result<Response<Body>, E>,
    shared: &Shared,
    direction: &'static str,
    whom: impl FnOnce() -> String,
) -> Result<Response<Body>, E> {
    match sent {
        Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => Ok(mismatch(
            shared,
            direction,
            &whom(),
            None,
            resp.headers().get(UPGRADE),
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/orders/1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_websocket_may_switch() {
        let up = |v: &str| HeaderValue::from_str(v).unwrap();
        assert_eq!(ask(&req(&[])), Ask::Nothing);
        // Upgrade without Connection naming it is not an upgrade (and is stripped anyway).
        assert_eq!(ask(&req(&[("upgrade", "websocket")])), Ask::Nothing);
        assert_eq!(
            ask(&req(&[("connection", "Upgrade"), ("upgrade", "websocket")])),
            Ask::Switch {
                upgrade: up("websocket"),
                refused: None
            }
        );
        assert_eq!(
            ask(&req(&[
                ("connection", "keep-alive, upgrade"),
                ("upgrade", "WebSocket/13")
            ])),
            Ask::Switch {
                upgrade: up("WebSocket/13"),
                refused: None
            }
        );
        // h2c is never tunnelled, whatever the Connection header says.
        for connection in [
            "Upgrade",
            "Upgrade, HTTP2-Settings",
            "HTTP2-Settings, upgrade",
        ] {
            assert_eq!(
                ask(&req(&[
                    ("connection", connection),
                    ("upgrade", "h2c"),
                    ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
                ])),
                Ask::Refused("h2c".into())
            );
        }
        // Mixed: the allowed one goes on, the other is refused.
        assert_eq!(
            ask(&req(&[
                ("connection", "upgrade"),
                ("upgrade", "h2c, websocket")
            ])),
            Ask::Switch {
                upgrade: up("websocket"),
                refused: Some("h2c".into())
            }
        );
        assert_eq!(
            ask(&req(&[
                ("connection", "upgrade"),
                ("upgrade", "foo/1, TLS/1.3")
            ])),
            Ask::Refused("foo/1, TLS/1.3".into())
        );
        // HTTP/2 has no Upgrade.
        let mut h2 = req(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        *h2.version_mut() = http::Version::HTTP_2;
        assert_eq!(ask(&h2), Ask::Nothing);
    }

    #[test]
    fn a_refused_switch_leaves_no_trace_of_it() {
        let mut r = req(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("x-kept", "1"),
        ]);
        prepare(r.headers_mut(), None);
        let names: Vec<&str> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        // Even when Connection does not name it, HTTP2-Settings goes.
        let mut r = req(&[("http2-settings", "AAMA"), ("upgrade", "h2c")]);
        prepare(r.headers_mut(), None);
        assert!(r.headers().is_empty());
        // An allowed switch keeps exactly Connection: upgrade and the allowed Upgrade.
        let mut r = req(&[
            ("connection", "Upgrade, HTTP2-Settings, x-hop"),
            ("upgrade", "h2c, websocket"),
            ("x-hop", "gone"),
        ]);
        prepare(
            r.headers_mut(),
            Some(&HeaderValue::from_static("websocket")),
        );
        assert_eq!(r.headers()["connection"], "upgrade");
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers().len(), 2);
    }

    #[test]
    fn a_101_must_name_what_was_forwarded() {
        let ws = HeaderValue::from_static("websocket");
        let resp = |v: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(v) = v {
                h.insert(UPGRADE, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        assert!(switched_as_asked(&resp(Some("websocket")), &ws));
        assert!(switched_as_asked(&resp(Some("WebSocket")), &ws));
        assert!(!switched_as_asked(&resp(Some("h2c")), &ws));
        assert!(!switched_as_asked(&resp(Some("websocket, h2c")), &ws));
        assert!(!switched_as_asked(&resp(None), &ws));
    }
}
