//! The console's JSON views: what each page shows, computed from the admin API's state with
//! the CLI's functions. `GET /api/view/{name}` answers one; `/api/live/{name}` streams it.
//!
//! - `graph`: `bulkhead graph`'s lines (`bulkhead_insight::graph_lines`) with their nodes,
//!   colour class and rate;
//! - `edge`: the stored records behind one line, each replayed against the revision in force
//!   when it was last seen, for the policy, rule and revision, or the nearest miss;
//! - `workload`, `policies` (in their modules) and `events` (`bulkhead events`).
//!
//! Views only read. A parameter a view cannot use is a 400 with the reason, never a guess.

use super::serve::{App, error};
use crate::error::ControlError;
use crate::proxies::unix_now;
use crate::service::State;
use axum::extract::{Path, Query, State as Ext};
use axum::response::{IntoResponse, Response};
use bulkhead_identity::{SpiffeId, SpiffeIdRule};
use bulkhead_insight::{Edge, EdgeVerdict, Flow, GraphLine};
use bulkhead_policy::model::{Resource, WorkloadRef};
use bulkhead_policy::{Decision, PolicySet, Reason};
use http::StatusCode;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Compiled sets kept for replays, by revision.
const MAX_SETS: usize = 16;

/// Why a view has no answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum ViewError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Internal(#[from] ControlError),
}

/// Which view, with its parameters, as the query string gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ViewSpec {
    Graph {
        window: u64,
    },
    Edge {
        window: u64,
        source: String,
        destination: String,
        port: u16,
        decided: String,
    },
    Workload(super::workload::WorkloadQuery),
    Policies {
        window: u64,
    },
    Events,
}

pub(super) type Params = HashMap<String, String>;

/// Query parameters from pairs, as the tests of the views write them.
#[cfg(test)]
pub(super) fn params(pairs: &[(&str, &str)]) -> Params {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn param<'a>(q: &'a Params, name: &str) -> Result<&'a str, ViewError> {
    q.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ViewError::BadRequest(format!("the parameter {name} is missing")))
}

/// `window`: seconds back from now (0 or absent: everything kept).
fn window(q: &Params) -> Result<u64, ViewError> {
    match q.get("window").map(String::as_str) {
        None | Some("") => Ok(0),
        Some(w) => w
            .parse()
            .map_err(|_| ViewError::BadRequest(format!("window={w:?} is not a number of seconds"))),
    }
}

impl ViewSpec {
    pub(super) fn parse(name: &str, q: &Params) -> Result<ViewSpec, ViewError> {
        Ok(match name {
            "graph" => ViewSpec::Graph { window: window(q)? },
            "edge" => ViewSpec::Edge {
                window: window(q)?,
                source: param(q, "source")?.to_string(),
                destination: param(q, "destination")?.to_string(),
                port: param(q, "port")?
                    .parse()
                    .map_err(|_| ViewError::BadRequest("port is not a port number".into()))?,
                decided: match param(q, "decided")? {
                    d @ ("ingress" | "egress") => d.to_string(),
                    d => {
                        return Err(ViewError::BadRequest(format!(
                            "decided={d:?}: ingress or egress"
                        )));
                    }
                },
            },
            "workload" => ViewSpec::Workload(super::workload::WorkloadQuery::parse(q)?),
            "policies" => ViewSpec::Policies { window: window(q)? },
            "events" => ViewSpec::Events,
            other => {
                return Err(ViewError::NotFound(format!(
                    "there is no view {other:?}; graph, edge, workload, policies or events"
                )));
            }
        })
    }
}

/// The view as JSON, computed off the async threads (it reads the store).
pub(super) async fn compute(state: &Arc<State>, spec: &ViewSpec) -> Result<String, ViewError> {
    let state = state.clone();
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || {
        let json = match &spec {
            ViewSpec::Graph { window } => serde_json::to_string(&graph(&state, *window)?),
            ViewSpec::Edge { .. } => serde_json::to_string(&edge(&state, &spec)?),
            ViewSpec::Workload(q) => serde_json::to_string(&super::workload::view(&state, q)?),
            ViewSpec::Policies { window } => {
                serde_json::to_string(&super::policies::view(&state, *window)?)
            }
            ViewSpec::Events => serde_json::to_string(&events(&state)?),
        };
        json.map_err(|e| ViewError::Internal(ControlError::Serve(e.to_string())))
    })
    .await
    .map_err(|e| ViewError::Internal(ControlError::Serve(e.to_string())))?
}

pub(super) fn respond(e: ViewError) -> Response {
    match e {
        ViewError::BadRequest(m) => error(StatusCode::BAD_REQUEST, &m),
        ViewError::NotFound(m) => error(StatusCode::NOT_FOUND, &m),
        ViewError::Internal(e) => {
            tracing::error!(error = %e, "console view failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the view could not be computed; the control plane's log says why",
            )
        }
    }
}

/// `GET /api/view/{name}?…`
pub(super) async fn view(
    Ext(app): Ext<App>,
    Path(name): Path<String>,
    Query(q): Query<Params>,
) -> Response {
    let spec = match ViewSpec::parse(&name, &q) {
        Ok(s) => s,
        Err(e) => return respond(e),
    };
    match compute(&app.state, &spec).await {
        Ok(json) => ([(http::header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => respond(e),
    }
}

/// The start of a window of `window` seconds ending now (0: everything kept).
pub(super) fn since(window: u64, now: u64) -> u64 {
    match window {
        0 => 0,
        w => now.saturating_sub(w),
    }
}

/// The stored edges last seen at or after `since`, as `bulkhead graph --since` reads them.
pub(super) fn edges(state: &State, since: u64, now: u64) -> Result<Vec<Edge>, ControlError> {
    let from = since.max(state.flow_retention.oldest_bucket(now));
    let mut edges = state.store.edges_since(from)?;
    edges.retain(|e| e.stats.last_seen >= since);
    Ok(edges)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GraphView {
    revision: u64,
    now: u64,
    since: u64,
    nodes: Vec<Node>,
    lines: Vec<Line>,
    namespaces: Vec<String>,
    protocols: Vec<String>,
    /// Stored edge records the lines were drawn from.
    records: usize,
    /// Requests proxies left out of their reports, and edges refused, since the start.
    dropped: u64,
    refused: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Node {
    id: String,
    namespace: String,
    /// `workload`, `identity` (a caller known only by its SPIFFE ID) or `plaintext`.
    kind: &'static str,
    declared: bool,
}

#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Line {
    id: String,
    #[serde(flatten)]
    line: GraphLine,
    /// `allowed`, `denied` or `would-deny`: how it is drawn.
    class: &'static str,
    /// Requests per minute, from the first one in the window (or the window's start) to now.
    rate_per_minute: f64,
}

fn line(g: GraphLine, since: u64, now: u64) -> Line {
    let from = g.first_seen.max(since);
    let minutes = (now.saturating_sub(from) as f64 / 60.0).max(1.0);
    let total = g.allowed.saturating_add(g.denied);
    Line {
        id: format!("{}|{}|{}|{}", g.source, g.destination, g.port, g.decided),
        class: g.class(),
        rate_per_minute: (total as f64 / minutes * 10.0).round() / 10.0,
        line: g,
    }
}

pub(super) fn graph(state: &State, window: u64) -> Result<GraphView, ViewError> {
    let now = unix_now();
    let since = since(window, now);
    let snapshot = state.snapshot.borrow().clone();
    let edges = edges(state, since, now)?;
    let lines: Vec<Line> = bulkhead_insight::graph_lines(&edges, &snapshot.resources)
        .into_iter()
        .map(|g| line(g, since, now))
        .collect();
    let declared: BTreeSet<String> = snapshot
        .resources
        .iter()
        .filter(|r| matches!(r, Resource::Workload(_)))
        .map(|r| r.name().to_string())
        .collect();
    let mut names: BTreeSet<String> = declared.clone();
    for l in &lines {
        names.insert(l.line.source.clone());
        names.insert(l.line.destination.clone());
    }
    let nodes: Vec<Node> = names.into_iter().map(|id| node(id, &declared)).collect();
    let namespaces = nodes
        .iter()
        .map(|n| n.namespace.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let protocols = lines
        .iter()
        .map(|l| l.line.protocol.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (dropped, refused) = state.flow_counters.get();
    Ok(GraphView {
        revision: snapshot.revision,
        now,
        since,
        nodes,
        lines,
        namespaces,
        protocols,
        records: edges.len(),
        dropped,
        refused,
    })
}

/// A party by the name the graph gives it: `ns/name`, a SPIFFE ID, or `(plaintext)`.
fn node(id: String, declared: &BTreeSet<String>) -> Node {
    let (kind, namespace) = match SpiffeId::parse(&id) {
        Ok(s) => ("identity", s.namespace().unwrap_or("(outside)").to_string()),
        // A spiffe:// name that is not a well-formed ID is still someone outside.
        Err(e) if e.rule() != SpiffeIdRule::Scheme => ("identity", "(outside)".into()),
        Err(_) => match id.split_once('/') {
            Some((ns, _)) => ("workload", ns.to_string()),
            None => ("plaintext", "(plaintext)".into()),
        },
    };
    Node {
        declared: declared.contains(&id),
        id,
        namespace,
        kind,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EdgeDetail {
    line: Option<Line>,
    decisions: Vec<DecisionView>,
}

/// One stored record of a line: what was decided, by what, and why.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DecisionView {
    method: Option<String>,
    path: Option<String>,
    protocol: String,
    verdict: EdgeVerdict,
    direction: String,
    policy: Option<String>,
    rule: Option<String>,
    count: u64,
    first_seen: u64,
    last_seen: u64,
    /// The revision in force when the record was last seen, which the replay used.
    revision: u64,
    /// The replayed decision as a sentence (the 403 body's words): policy and rule, or the
    /// posture and the nearest miss.
    explanation: String,
    nearest_miss: Option<NearMissView>,
    /// Whether the replay gives the recorded verdict and decider. A replay carries no
    /// headers, host or address, so rules on those can decide otherwise.
    replay_agrees: bool,
    /// The applied resource that decided (`AuthorizationPolicy/shop/x`), to link to.
    resource: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NearMissView {
    policy: String,
    rule: String,
    matched: Vec<&'static str>,
    failed: String,
}

pub(super) fn edge(state: &State, spec: &ViewSpec) -> Result<EdgeDetail, ViewError> {
    let ViewSpec::Edge {
        window,
        source,
        destination,
        port,
        decided,
    } = spec
    else {
        return Err(ViewError::BadRequest("not an edge".into()));
    };
    let now = unix_now();
    let since = since(*window, now);
    let snapshot = state.snapshot.borrow().clone();
    let edges = edges(state, since, now)?;
    let by_identity = bulkhead_insight::identities(&snapshot.resources);
    let found = bulkhead_insight::graph_lines(&edges, &snapshot.resources)
        .into_iter()
        .find(|g| {
            &g.source == source
                && &g.destination == destination
                && g.port == *port
                && &g.decided == decided
        });
    let Some(found) = found else {
        return Ok(EdgeDetail {
            line: None,
            decisions: Vec::new(),
        });
    };
    let times = state.console.memo.revision_times(state)?;
    let mut decisions = Vec::new();
    for e in edges.iter().filter(|e| found.includes(e, &by_identity)) {
        let revision = times
            .iter()
            .rev()
            .find(|(_, t)| *t <= e.stats.last_seen)
            .map_or(0, |(r, _)| *r);
        let replay = state
            .console
            .memo
            .set(state, revision)?
            .and_then(|(set, ids)| Flow::of(&e.key).replay(&set, &ids).ok());
        let resource = e.key.policy.as_deref().and_then(|p| {
            snapshot
                .resources
                .iter()
                .find(|r| {
                    matches!(
                        r,
                        Resource::AuthorizationPolicy(_) | Resource::DefaultPosture(_)
                    ) && r.name().to_string() == p
                })
                .map(Resource::key)
        });
        let (explanation, nearest_miss, replay_agrees) = match &replay {
            Some(d) => (d.to_string(), nearest_miss(d, e.key.verdict), agrees(d, e)),
            None => (
                format!(
                    "revision {revision} cannot be replayed here (no compiled set, or an egress record without a source workload)"
                ),
                None,
                false,
            ),
        };
        decisions.push(DecisionView {
            method: e.key.method.clone(),
            path: e.key.path.clone(),
            protocol: e.key.protocol.as_str().to_string(),
            verdict: e.key.verdict,
            direction: decided.clone(),
            policy: e.key.policy.clone(),
            rule: e.key.rule.clone(),
            count: e.stats.count,
            first_seen: e.stats.first_seen,
            last_seen: e.stats.last_seen,
            revision,
            explanation,
            nearest_miss,
            replay_agrees,
            resource,
        });
    }
    // Refusals first, then the busiest.
    decisions.sort_by_key(|d| (d.verdict.is_allow(), std::cmp::Reverse(d.count)));
    Ok(EdgeDetail {
        line: Some(line(found, since, now)),
        decisions,
    })
}

/// The nearest miss of the default deny behind a record: the enforced one for a denial, the
/// audit one for an allow that audit mode would deny.
fn nearest_miss(d: &Decision, verdict: EdgeVerdict) -> Option<NearMissView> {
    let reason = match verdict {
        EdgeVerdict::AllowWouldDeny => &d.audit.as_ref()?.reason,
        EdgeVerdict::Deny => &d.reason,
        _ => return None,
    };
    match reason {
        Reason::Posture {
            nearest_miss: Some(m),
            ..
        } => Some(NearMissView {
            policy: m.policy.to_string(),
            rule: m.rule.to_string(),
            matched: m.matched.clone(),
            failed: m.failed.clone(),
        }),
        _ => None,
    }
}

/// Whether a replay reproduces a record: the same verdict (audit's included) and the same
/// policy or posture named for it.
fn agrees(d: &Decision, e: &Edge) -> bool {
    let audit = d.audit.as_deref().filter(|a| a.verdict != d.verdict);
    let verdict = match (d.is_allow(), audit.is_some()) {
        (true, false) => EdgeVerdict::Allow,
        (false, false) => EdgeVerdict::Deny,
        (true, true) => EdgeVerdict::AllowWouldDeny,
        (false, true) => EdgeVerdict::DenyWouldAllow,
    };
    let reason = audit.map_or(&d.reason, |a| &a.reason);
    let named = match reason {
        Reason::Rule { policy, .. } => policy.to_string(),
        Reason::Posture { source, .. } => source
            .resource()
            .map_or_else(|| "built-in".to_string(), |r| r.to_string()),
    };
    verdict == e.key.verdict && e.key.policy.as_deref() == Some(named.as_str())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EventsView {
    events: Vec<bulkhead_insight::events::Event>,
    /// Unix seconds until which new edges and identities are learned silently (0: not).
    learning_until: u64,
    last: u64,
}

/// The newest events, oldest first, as `bulkhead events` lists them.
const EVENTS_SHOWN: usize = 200;
const EVENT_PAGE: usize = 1_000;

pub(super) fn events(state: &State) -> Result<EventsView, ViewError> {
    let now = unix_now();
    let since = now.saturating_sub(crate::anomaly::EVENT_RETENTION.window_secs);
    // Pages from the oldest kept (at most 10,000), keeping the newest few.
    let mut shown = std::collections::VecDeque::new();
    let mut after = 0;
    let last = loop {
        let page = state.store.events(after, since, EVENT_PAGE)?;
        let full = page.events.len() >= EVENT_PAGE;
        shown.extend(page.events);
        while shown.len() > EVENTS_SHOWN {
            shown.pop_front();
        }
        if !full || page.last <= after {
            break page.last;
        }
        after = page.last;
    };
    Ok(EventsView {
        events: shown.into(),
        learning_until: state.anomalies.learning_until(now),
        last,
    })
}

/// What views compute once and keep: when each revision was made, and compiled sets.
#[derive(Default)]
pub(super) struct Memo {
    /// `(revision, time)` ascending, as of the revision in the key.
    times: Mutex<Option<(u64, Times)>>,
    sets: Mutex<BTreeMap<u64, Replay>>,
}

/// `(revision, time)` pairs, oldest first.
type Times = Arc<Vec<(u64, u64)>>;

type Replay = Option<(Arc<PolicySet>, Arc<BTreeMap<WorkloadRef, String>>)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Caches only: a panicking holder leaves at worst a value to recompute.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Memo {
    /// When each revision was made, oldest first.
    pub(super) fn revision_times(&self, state: &State) -> Result<Times, ViewError> {
        let current = state.snapshot.borrow().revision;
        if let Some((at, times)) = lock(&self.times).as_ref()
            && *at == current
        {
            return Ok(times.clone());
        }
        let mut times: Vec<(u64, u64)> = state
            .store
            .history(usize::MAX)?
            .into_iter()
            .map(|r| (r.revision, r.time_unix))
            .collect();
        times.sort_unstable();
        let times = Arc::new(times);
        *lock(&self.times) = Some((current, times.clone()));
        Ok(times)
    }

    /// The set at `revision`, compiled, with its declared identities; `None` if it does not
    /// compile in this build.
    pub(super) fn set(&self, state: &State, revision: u64) -> Result<Replay, ViewError> {
        if let Some(r) = lock(&self.sets).get(&revision) {
            return Ok(r.clone());
        }
        let crate::store::SetAt::Kept(resources) = state.store.set_at(revision)? else {
            return Ok(None);
        };
        let replay = PolicySet::compile(&resources, revision).ok().map(|set| {
            (
                Arc::new(set),
                Arc::new(bulkhead_insight::declared_identities(&resources)),
            )
        });
        let mut sets = lock(&self.sets);
        if sets.len() >= MAX_SETS {
            sets.pop_first();
        }
        sets.insert(revision, replay.clone());
        Ok(replay)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::params as q;
    use super::*;

    #[test]
    fn views_refuse_what_they_cannot_use() {
        assert_eq!(
            ViewSpec::parse("graph", &q(&[("window", "900")])).unwrap(),
            ViewSpec::Graph { window: 900 }
        );
        let bad = |name, p: &[(&str, &str)]| ViewSpec::parse(name, &q(p)).unwrap_err().to_string();
        assert!(bad("graph", &[("window", "15m")]).contains("not a number of seconds"));
        assert!(bad("edge", &[("source", "a")]).contains("destination is missing"));
        let e = bad(
            "edge",
            &[
                ("source", "a"),
                ("destination", "b"),
                ("port", "80"),
                ("decided", "sideways"),
            ],
        );
        assert!(e.contains("ingress or egress"), "{e}");
        assert!(bad("secrets", &[]).contains("there is no view"));
    }

    #[test]
    fn lines_carry_their_rate_and_class() {
        let g = GraphLine {
            source: "shop/frontend".into(),
            destination: "shop/orders".into(),
            port: 8080,
            decided: "ingress".into(),
            allowed: 90,
            denied: 30,
            first_seen: 1_000,
            last_seen: 1_500,
            ..GraphLine::default()
        };
        let l = line(g, 0, 1_000 + 600);
        assert_eq!(l.id, "shop/frontend|shop/orders|8080|ingress");
        assert_eq!(l.class, "denied");
        assert_eq!(l.rate_per_minute, 12.0, "120 requests over ten minutes");
        let nodes: Vec<Node> = ["shop/orders", "spiffe://t/ns/batch/sa/x", "(plaintext)"]
            .iter()
            .map(|n| node(n.to_string(), &BTreeSet::from(["shop/orders".to_string()])))
            .collect();
        let kinds: Vec<(&str, &str, bool)> = nodes
            .iter()
            .map(|n| (n.kind, n.namespace.as_str(), n.declared))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("workload", "shop", true),
                ("identity", "batch", false),
                ("plaintext", "(plaintext)", false)
            ]
        );
    }
}
