//! Live views over server-sent events: a page opens `/api/live/{view}` and gets the view
//! now, then again whenever it changed (a new revision, a stored flow report, or every
//! few seconds for what ages, like rates and proxy contact), never more than once a
//! second. `/api/tap` streams one workload's decisions as `bulkhead tap` does.
//!
//! Every stream is bounded: a view stream holds at most one pending view (the newest; a
//! slow reader skips the ones in between), a tap session the tap hub's bounded queue
//! (what does not fit is counted and told). A stream ends when its session does.

use super::auth::Access;
use super::serve::{App, error};
use super::views::{self, Params, ViewError, ViewSpec, param};
use crate::proxies::unix_now;
use crate::service::State;
use axum::Extension;
use axum::extract::{Path, Query, State as Ext};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bulkhead_insight::tap::{TapEvent, TapFilter, VerdictFilter};
use bulkhead_policy::model::{Direction, WorkloadRef};
use futures_util::Stream;
use http::StatusCode;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

/// Open live streams (views and taps) across all sessions.
const MAX_STREAMS: usize = 128;
/// A view is recomputed at most this often…
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// …and at least this often, for what changes with time alone.
const REFRESH: Duration = Duration::from_secs(10);
/// How often an idle tap checks that its session is still open (a view stream checks
/// whenever any session closes).
const SESSION_CHECK: Duration = Duration::from_secs(1);

/// The bound on open streams.
pub(super) struct Streams(Arc<Semaphore>);

impl Default for Streams {
    fn default() -> Streams {
        Streams(Arc::new(Semaphore::new(MAX_STREAMS)))
    }
}

fn slot(state: &State) -> Option<OwnedSemaphorePermit> {
    state.console.streams.0.clone().try_acquire_owned().ok()
}

fn no_slot() -> Response {
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many live console streams are open; close some pages",
    )
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;

fn sse(stream: Events) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `GET /api/live/{view}?…`: `event: view` with the view's JSON, now and on every change;
/// `event: failed` when it cannot be computed; `event: ended` when the session ends.
pub(super) async fn live(
    Ext(app): Ext<App>,
    Extension(access): Extension<Access>,
    Path(name): Path<String>,
    Query(q): Query<Params>,
) -> Response {
    let spec = match ViewSpec::parse(&name, &q) {
        Ok(s) => s,
        Err(e) => return views::respond(e),
    };
    let Some(permit) = slot(&app.state) else {
        return no_slot();
    };
    let follow = Follow {
        closings: app.state.console.auth.closings(),
        snapshot: app.state.snapshot.subscribe(),
        flows: app.state.console.flows.subscribe(),
        state: app.state,
        spec,
        access,
        last: None,
        computed: None,
        done: false,
        _permit: permit,
    };
    sse(Box::pin(futures_util::stream::unfold(follow, Follow::next)))
}

struct Follow {
    state: Arc<State>,
    spec: ViewSpec,
    access: Access,
    snapshot: watch::Receiver<Arc<crate::service::Snapshot>>,
    flows: watch::Receiver<u64>,
    /// A session was closed: this stream's may be the one.
    closings: watch::Receiver<u64>,
    /// The JSON last sent, so an unchanged view is not sent again.
    last: Option<String>,
    computed: Option<Instant>,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl Follow {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Follow)> {
        if self.done {
            return None;
        }
        loop {
            if let Some(at) = self.computed {
                let closed = tokio::select! {
                    r = self.snapshot.changed() => { r.ok()?; false }
                    r = self.flows.changed() => { r.ok()?; false }
                    r = self.closings.changed() => { r.ok()?; true }
                    _ = tokio::time::sleep(REFRESH) => false,
                };
                // Coalesce bursts: whatever else changes meanwhile is in the next view. A
                // closed session is checked at once, below.
                if !closed {
                    tokio::time::sleep_until(at + MIN_INTERVAL).await;
                }
                self.snapshot.borrow_and_update();
                self.flows.borrow_and_update();
            }
            if !self.state.console.auth.still_open(&self.access, unix_now()) {
                self.done = true;
                return Some((
                    Ok(Event::default().event("ended").data("the session ended")),
                    self,
                ));
            }
            self.computed = Some(Instant::now());
            match views::compute(&self.state, &self.spec).await {
                Ok(json) if self.last.as_ref() == Some(&json) => continue,
                Ok(json) => {
                    let event = Event::default().event("view").data(&json);
                    self.last = Some(json);
                    return Some((Ok(event), self));
                }
                Err(e) => {
                    let message = match &e {
                        ViewError::Internal(_) => {
                            "the view could not be computed; the control plane's log says why"
                                .to_string()
                        }
                        other => other.to_string(),
                    };
                    if let ViewError::Internal(e) = e {
                        tracing::error!(error = %e, "console live view failed");
                    }
                    self.last = None;
                    return Some((Ok(Event::default().event("failed").data(message)), self));
                }
            }
        }
    }
}

/// A tapped request with its caller named as the graph names it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Tapped {
    caller: String,
    #[serde(flatten)]
    event: TapEvent,
}

/// The filter the page's fields describe: every field given must match. A caller named as
/// a declared workload is tapped by that workload's identity, which is what sidecars see.
fn filter(q: &Params, by_identity: &BTreeMap<String, WorkloadRef>) -> Result<TapFilter, String> {
    let field = |name: &str| q.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut f = TapFilter {
        method: field("method").map(str::to_ascii_uppercase),
        ..TapFilter::default()
    };
    if let Some(to) = field("to") {
        bulkhead_policy::model::parse_workload(to)?;
        f.to = Some(to.to_string());
    }
    if let Some(path) = field("path") {
        if !path.starts_with('/') {
            return Err(format!("the path {path:?} must start with '/'"));
        }
        f.path = Some(path.to_string());
    }
    if let Some(v) = field("verdict") {
        f.verdict = Some(
            VerdictFilter::parse(v)
                .ok_or_else(|| format!("verdict {v:?}: allow, deny, would-deny or would-allow"))?,
        );
    }
    f.direction = match field("direction") {
        None => None,
        Some("in") => Some(Direction::Ingress),
        Some("out") => Some(Direction::Egress),
        Some(d) => return Err(format!("direction {d:?}: in or out")),
    };
    f.from = field("from").map(|from| {
        by_identity
            .iter()
            .find(|(_, w)| w.to_string() == from)
            .map_or_else(|| from.to_string(), |(id, _)| id.clone())
    });
    Ok(f)
}

/// `GET /api/tap?workload=ns/name[&from=…&to=…&method=…&path=…&verdict=…&direction=in|out]`:
/// `event: hello` with how many sidecars are tapped, then `event: tap` with each batch of
/// requests and how many were skipped; `event: ended` when the session ends.
pub(super) async fn tap(
    Ext(app): Ext<App>,
    Extension(access): Extension<Access>,
    Query(q): Query<Params>,
) -> Response {
    let workload = match param(&q, "workload")
        .map_err(|e| e.to_string())
        .and_then(bulkhead_policy::model::parse_workload)
    {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let resources = app.state.snapshot.borrow().resources.clone();
    let by_identity = bulkhead_insight::identities(&resources);
    let filter = match filter(&q, &by_identity) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let Some(permit) = slot(&app.state) else {
        return no_slot();
    };
    let (subscription, rx) = match app.state.taps.subscribe(&workload, filter) {
        Ok(s) => s,
        Err(status) => return error(StatusCode::TOO_MANY_REQUESTS, status.message()),
    };
    let connected = app.state.proxies.connected(&workload);
    tracing::info!(%workload, proxies = connected, actor = access.actor, "console tap opened");
    let hello = Event::default()
        .event("hello")
        .data(serde_json::json!({ "proxiesConnected": connected }).to_string());
    let first = futures_util::stream::iter([Ok(hello)]);
    let state = app.state.clone();
    let rest = futures_util::stream::unfold(
        (subscription, rx, permit, false),
        move |(sub, mut rx, permit, done)| {
            let state = state.clone();
            let by_identity = by_identity.clone();
            let access = access.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let message = tokio::select! {
                        m = rx.recv() => m?,
                        _ = tokio::time::sleep(SESSION_CHECK) => {
                            if state.console.auth.still_open(&access, unix_now()) {
                                continue;
                            }
                            let ended = Event::default().event("ended").data("the session ended");
                            return Some((Ok(ended), (sub, rx, permit, true)));
                        }
                    };
                    if !state.console.auth.still_open(&access, unix_now()) {
                        let ended = Event::default().event("ended").data("the session ended");
                        return Some((Ok(ended), (sub, rx, permit, true)));
                    }
                    let events: Vec<Tapped> = message
                        .events
                        .into_iter()
                        .map(|event| Tapped {
                            caller: bulkhead_insight::caller_name(
                                event.source_workload.as_ref(),
                                event.source_identity.as_deref(),
                                &by_identity,
                            ),
                            event,
                        })
                        .collect();
                    let skipped = message.skipped.saturating_add(sub.take_skipped());
                    let data = serde_json::json!({ "events": events, "skipped": skipped });
                    let event = Event::default().event("tap").data(data.to_string());
                    return Some((Ok(event), (sub, rx, permit, false)));
                }
            }
        },
    );
    sse(Box::pin(futures_util::StreamExt::chain(first, rest)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tap_fields_make_the_clis_filter() {
        let frontend = WorkloadRef {
            namespace: "shop".into(),
            name: "frontend".into(),
        };
        let ids = BTreeMap::from([("spiffe://t/ns/shop/sa/frontend".to_string(), frontend)]);
        let q: Params = [
            ("from", "shop/frontend"),
            ("method", "delete"),
            ("path", "/orders"),
            ("verdict", "deny"),
            ("direction", "in"),
            ("to", ""),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let f = filter(&q, &ids).unwrap();
        assert_eq!(f.from.as_deref(), Some("spiffe://t/ns/shop/sa/frontend"));
        assert_eq!(f.method.as_deref(), Some("DELETE"));
        assert_eq!(f.verdict, Some(VerdictFilter::Deny));
        assert_eq!(f.direction, Some(Direction::Ingress));
        assert_eq!(f.to, None, "an empty field is no filter");
        let bad = |k: &str, v: &str| {
            let q: Params = [(k.to_string(), v.to_string())].into_iter().collect();
            filter(&q, &ids).unwrap_err()
        };
        assert!(bad("path", "orders").contains("must start with '/'"));
        assert!(bad("verdict", "maybe").contains("would-deny"));
        assert!(bad("direction", "up").contains("in or out"));
        assert!(bad("to", "orders").contains("namespace/name"));
    }
}
