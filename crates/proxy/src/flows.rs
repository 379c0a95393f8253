//! Flow reporting (issue #7): every decision this sidecar makes is counted into an edge —
//! who called what, how, and what was decided — and the edges are sent to the control plane
//! on an interval. The control plane stores them for `bulkhead graph`, `recommend`, `impact`
//! and `promote`.
//!
//! The buffer is bounded and never blocks traffic: a request that cannot be counted (the
//! buffer is full of other edges, or another thread holds it this instant) is dropped from
//! the report and counted as dropped, which the next report carries. Paths leave the sidecar
//! only as templates (`/orders/*`): ids and tokens in paths stay here.
//!
//! Counting is on every request's path, so a request whose edge is already held copies
//! nothing and reads nothing of the held key: the edge is found by a keyed 128-bit hash of
//! the fields the request borrows (see [`Found`]), its path hashed as its template without
//! the template being built. Only an edge's first request allocates its key.
//! `--flow-interval-secs 0` turns counting and reporting off.

use crate::Shared;
use crate::credentials::control_channel;
use bulkhead_api::v1::ReportFlowsRequest;
use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_identity::SpiffeId;
use bulkhead_insight::template::{template, template_hash};
use bulkhead_insight::{Edge, EdgeKey, EdgeStats, EdgeVerdict};
use bulkhead_policy::model::{Direction, ResourceName, WorkloadRef};
use bulkhead_policy::{Decision, Protocol, Reason, Verdict};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Distinct edges held between two reports; more are dropped and counted.
pub(crate) const MAX_EDGES: usize = 10_000;

/// One decided request or TCP connection, as the sidecar saw it.
pub(crate) struct Seen<'a> {
    pub direction: Direction,
    pub source_identity: Option<&'a SpiffeId>,
    pub source_workload: Option<&'a WorkloadRef>,
    pub destination: &'a WorkloadRef,
    pub port: u16,
    pub protocol: Protocol,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub decision: &'a Decision,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency: Duration,
    /// The HTTP status the caller got (403 for a denial, 502 when the destination did not
    /// answer); `None` for TCP.
    pub status: Option<u16>,
    /// gRPC only: a `grpc-status` that came with the response headers (for tap).
    pub grpc_status: Option<u32>,
}

pub(crate) struct Flows {
    /// False when flow reporting is off (`--flow-interval-secs 0`): nothing is counted.
    on: bool,
    /// Keys the hash that finds an edge: random per process, so that no caller can choose
    /// paths that pile up behind one hash.
    hasher: RandomState,
    edges: Mutex<Held>,
    /// Dropped since the last report.
    dropped: AtomicU64,
    /// Dropped since the start: `bulkhead_flow_requests_dropped_total`.
    dropped_total: prometheus_client::metrics::counter::Counter,
}

impl Flows {
    pub(crate) fn new(dropped_total: prometheus_client::metrics::counter::Counter) -> Flows {
        Flows {
            on: true,
            hasher: RandomState::new(),
            edges: Mutex::default(),
            dropped: AtomicU64::new(0),
            dropped_total,
        }
    }

    /// Flows that count when reports go out every `interval`, and count nothing when it is
    /// zero (flow reporting off).
    pub(crate) fn for_interval(
        interval: Duration,
        dropped_total: prometheus_client::metrics::counter::Counter,
    ) -> Flows {
        Flows {
            on: !interval.is_zero(),
            ..Flows::new(dropped_total)
        }
    }

    /// Counts one request into its edge. Never waits, and allocates only for the first
    /// request of an edge: the key is borrowed from `seen`, found by its hash and compared
    /// field by field, the path with the held template without building the request's.
    pub(crate) fn record(&self, seen: &Seen<'_>) {
        if !self.on {
            return;
        }
        let key = KeyRef::of(seen);
        let found = key.found(&self.hasher);
        let stats = EdgeStats::one(
            crate::unix_seconds(std::time::SystemTime::now()).max(0) as u64,
            seen.bytes_in,
            seen.bytes_out,
            seen.latency.as_micros().min(u128::from(u64::MAX)) as u64,
        );
        let counted = match self.edges.try_lock() {
            Ok(mut held) => held.add(found, || key.to_key(), &stats),
            Err(_) => false,
        };
        if !counted {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.inc();
        }
    }

    /// Everything counted since the last call, and the drops.
    fn take(&self) -> (Vec<Edge>, u64) {
        let held = match self.edges.lock() {
            Ok(mut e) => std::mem::take(&mut *e),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        let edges = held
            .buckets
            .into_values()
            .flatten()
            .map(|(_, key, stats)| Edge { key, stats })
            .collect();
        (edges, dropped)
    }

    /// Puts back a report that could not be sent, as far as the buffer has room.
    fn restore(&self, edges: Vec<Edge>, dropped: u64) {
        let mut lost = dropped;
        if let Ok(mut held) = self.edges.lock() {
            for Edge { key, stats } in edges {
                let found = Found::of_key(&key, &self.hasher);
                if !held.add(found, || key, &stats) {
                    lost += stats.count;
                    self.dropped_total.inc_by(stats.count);
                }
            }
        }
        self.dropped.fetch_add(lost, Ordering::Relaxed);
    }

    pub(crate) fn held(&self) -> usize {
        self.edges.lock().map_or(0, |e| e.len)
    }
}

/// The edges counted since the last report, by the hash of their [`Shape`].
#[derive(Default)]
struct Held {
    /// Edges of one shape differ only in what decided them, so a bucket holds one edge but
    /// for rare exceptions (and hash collisions); each with its fingerprint.
    buckets: HashMap<u64, Vec<(u64, EdgeKey, EdgeStats)>, BuildHasherDefault<Prehashed>>,
    /// Edges in all buckets.
    len: usize,
}

impl Held {
    /// Adds `stats` to the edge `found` finds, or to a new edge `make` builds; false when
    /// that would be a new edge and the buffer is full.
    fn add(&mut self, found: Found, make: impl FnOnce() -> EdgeKey, stats: &EdgeStats) -> bool {
        if let Some(bucket) = self.buckets.get_mut(&found.bucket)
            && let Some((_, _, held)) = bucket.iter_mut().find(|(f, _, _)| *f == found.fingerprint)
        {
            held.merge(stats);
            return true;
        }
        if self.len >= MAX_EDGES {
            return false;
        }
        self.buckets
            .entry(found.bucket)
            .or_default()
            .push((found.fingerprint, make(), *stats));
        self.len += 1;
        true
    }
}

/// The map's keys are SipHash values already; hashing them again would be wasted work.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed (`write_u64`); this is here because the trait needs it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// How a held edge is found: `bucket` hashes the fields of its [`Shape`], `fingerprint`
/// those and what decided it, in one pass of SipHash keyed at random per process. Two keys
/// are taken for the same edge when both agree: 128 bits of a keyed hash for keys of
/// different shapes, 64 for the rare ones that share a shape. An accidental match is out of
/// reach (at most about 2^-64 for a pair of keys), and no caller can aim for one without
/// the key. In exchange, the held key's strings, cold in memory by the time the next
/// request comes, are never read: comparing them was most of what counting cost a sidecar
/// (BENCHMARKS.md, "Flow reporting cost").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Found {
    bucket: u64,
    fingerprint: u64,
}

impl Found {
    /// What a held key is found by: the same as [`KeyRef::found`] for the request it was
    /// built from.
    fn of_key(key: &EdgeKey, state: &RandomState) -> Found {
        let mut h = Shape::of_key(key).hasher(state);
        let bucket = h.finish();
        hash_names(key.policy.as_deref(), key.rule.as_deref(), &mut h);
        Found {
            bucket,
            fingerprint: h.finish(),
        }
    }
}

/// A key's `policy` and `rule`, hashed: a tag for a rule or a posture, then each name and a
/// byte no UTF-8 text holds.
fn hash_names(policy: Option<&str>, rule: Option<&str>, h: &mut impl Hasher) {
    h.write_u8(if rule.is_some() { 1 } else { 2 });
    h.write(policy.unwrap_or_default().as_bytes());
    h.write_u8(0xff);
    if let Some(rule) = rule {
        h.write(rule.as_bytes());
        h.write_u8(0xff);
    }
}

/// `name` as [`hash_names`] hashes it as printed (`namespace/name`), without printing it:
/// SipHash reads its input as one stream of bytes, however it is split into writes.
fn hash_resource_name(name: &ResourceName, h: &mut impl Hasher) {
    h.write(name.namespace.as_bytes());
    h.write(b"/");
    h.write(name.name.as_bytes());
    h.write_u8(0xff);
}

/// The fields of an edge's key that find its bucket: all but what decided (a policy and
/// rule, or a posture), which tells apart only the rare edges that share everything else.
struct Shape<'a> {
    direction: Direction,
    source_identity: Option<&'a SpiffeId>,
    source_workload: Option<&'a WorkloadRef>,
    destination: &'a WorkloadRef,
    port: u16,
    protocol: Protocol,
    method: Option<&'a str>,
    /// A request's path, or a held edge's template: both hash as the template.
    path: Option<&'a str>,
    verdict: EdgeVerdict,
}

impl Shape<'_> {
    fn of_key(key: &EdgeKey) -> Shape<'_> {
        Shape {
            direction: key.direction,
            source_identity: key.source_identity.as_ref(),
            source_workload: key.source_workload.as_ref(),
            destination: &key.destination,
            port: key.port,
            protocol: key.protocol,
            method: key.method.as_deref(),
            path: key.path.as_deref(),
            verdict: key.verdict,
        }
    }

    /// A hasher that has read the shape: the same for a request and the key it counts
    /// into (a template is its own template).
    fn hasher(&self, state: &RandomState) -> std::hash::DefaultHasher {
        let mut h = state.build_hasher();
        (
            self.direction,
            self.source_identity,
            self.source_workload,
            self.destination,
            self.port,
            self.protocol,
            self.method,
            self.verdict,
        )
            .hash(&mut h);
        match self.path {
            None => h.write_u8(0),
            Some(path) => {
                h.write_u8(1);
                template_hash(path, &mut h);
            }
        }
        h
    }
}

/// The key of the edge a request counts into, borrowed from the request and its decision.
struct KeyRef<'a> {
    shape: Shape<'a>,
    decided_by: DecidedBy<'a>,
}

/// What decided, as the key names it in `policy` and `rule`.
enum DecidedBy<'a> {
    Rule {
        policy: &'a ResourceName,
        rule: &'a str,
    },
    /// A DefaultPosture, or the built-in one (`None`).
    Posture(Option<&'a ResourceName>),
}

impl<'a> DecidedBy<'a> {
    fn of(reason: &'a Reason) -> DecidedBy<'a> {
        match reason {
            Reason::Rule { policy, rule, .. } => DecidedBy::Rule { policy, rule },
            Reason::Posture { source, .. } => {
                DecidedBy::Posture(source.resource().map(|r| r.as_ref()))
            }
        }
    }

    /// Hashes what [`Self::names`] gives, as [`hash_names`] does, without building it.
    fn hash(&self, h: &mut impl Hasher) {
        match self {
            DecidedBy::Rule { policy, rule } => {
                h.write_u8(1);
                hash_resource_name(policy, h);
                h.write(rule.as_bytes());
                h.write_u8(0xff);
            }
            DecidedBy::Posture(Some(r)) => {
                h.write_u8(2);
                hash_resource_name(r, h);
            }
            DecidedBy::Posture(None) => {
                h.write_u8(2);
                h.write(BUILT_IN.as_bytes());
                h.write_u8(0xff);
            }
        }
    }

    /// The key's `policy` and `rule`.
    fn names(&self) -> (Option<String>, Option<String>) {
        match self {
            DecidedBy::Rule { policy, rule } => (Some(policy.to_string()), Some(rule.to_string())),
            DecidedBy::Posture(Some(r)) => (Some(r.to_string()), None),
            DecidedBy::Posture(None) => (Some(BUILT_IN.to_string()), None),
        }
    }
}

/// The policy (or posture) and the rule that decided, as an edge or a tap event names them.
pub(crate) fn decided_by(reason: &Reason) -> (Option<String>, Option<String>) {
    DecidedBy::of(reason).names()
}

/// The key's `policy` when the built-in posture decided.
const BUILT_IN: &str = "built-in";

/// What the decision was, for an edge or a tap event: the verdict, with audit mode's when it
/// disagrees, and the reason that goes with it (audit mode's, when it disagrees: the edge
/// names what it would have decided by).
pub(crate) fn outcome(d: &Decision) -> (EdgeVerdict, &Reason) {
    match d.audit.as_deref() {
        Some(a) if a.verdict != d.verdict => (
            if d.is_allow() {
                EdgeVerdict::AllowWouldDeny
            } else {
                EdgeVerdict::DenyWouldAllow
            },
            &a.reason,
        ),
        _ => (
            if d.verdict == Verdict::Allow {
                EdgeVerdict::Allow
            } else {
                EdgeVerdict::Deny
            },
            &d.reason,
        ),
    }
}

impl<'a> KeyRef<'a> {
    fn of(seen: &Seen<'a>) -> KeyRef<'a> {
        let (verdict, reason) = outcome(seen.decision);
        let decided_by = DecidedBy::of(reason);
        KeyRef {
            shape: Shape {
                direction: seen.direction,
                source_identity: seen.source_identity,
                source_workload: seen.source_workload,
                destination: seen.destination,
                port: seen.port,
                protocol: seen.protocol,
                method: seen.method,
                path: seen.path,
                verdict,
            },
            decided_by,
        }
    }

    /// What finds the edge this request counts into.
    fn found(&self, state: &RandomState) -> Found {
        let mut h = self.shape.hasher(state);
        let bucket = h.finish();
        self.decided_by.hash(&mut h);
        Found {
            bucket,
            fingerprint: h.finish(),
        }
    }

    /// The owned key: for the first request of an edge.
    fn to_key(&self) -> EdgeKey {
        let s = &self.shape;
        let (policy, rule) = self.decided_by.names();
        EdgeKey {
            source_identity: s.source_identity.cloned(),
            source_workload: s.source_workload.cloned(),
            destination: s.destination.clone(),
            port: s.port,
            protocol: s.protocol,
            method: s.method.map(str::to_string),
            path: s.path.map(template),
            verdict: s.verdict,
            policy,
            rule,
            direction: s.direction,
        }
    }
}

/// Reports on `interval` for as long as the proxy runs. A failed report is kept for the
/// next one (within the buffer's bound).
pub(crate) fn spawn_reporter(
    control: Arc<bulkhead_api::channel::Replicas>,
    shared: Arc<Shared>,
    interval: Duration,
) {
    if interval.is_zero() {
        // Flow reporting is off: nothing is counted, so there is nothing to report.
        return;
    }
    tokio::spawn(async move {
        let mut client = ConfigClient::new(control_channel(control, &shared));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (edges, dropped) = shared.flows.take();
            if edges.is_empty() && dropped == 0 {
                continue;
            }
            let edges_json = match serde_json::to_string(&edges) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "could not encode the flow report");
                    continue;
                }
            };
            let request = ReportFlowsRequest {
                namespace: shared.workload.namespace.clone(),
                workload: shared.workload.name.clone(),
                edges_json,
                dropped,
            };
            match client.report_flows(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::debug!(stored = r.stored, refused = r.refused, "flows reported");
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), edges = edges.len(), "could not report flows; keeping them for the next report");
                    shared.flows.restore(edges, dropped);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests;
