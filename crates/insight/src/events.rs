//! Anomalies in observed traffic: a caller reaching a destination it never reached before
//! (`new-edge`), an identity calling for the first time (`new-identity`), and a burst of
//! denied requests to one destination (`denial-spike`).
//!
//! The control plane hands every flow report it accepts to a [`Detector`], which remembers
//! what it has seen and returns the [`Event`]s the report caused. Until the learning period
//! after the first report is over, new edges and identities are learned silently: they are
//! the baseline, not news. Denial spikes are reported from the start.
//!
//! Pure: the arrival time of each report is passed in (unix seconds); nothing is read or
//! written but the detector's own memory, and that is bounded ([`MAX_KNOWN_EDGES`],
//! [`MAX_KNOWN_IDENTITIES`], [`MAX_WATCHED_DESTINATIONS`]). A report is attacker input:
//! counts saturate, and no value makes the detector panic.

use crate::{Edge, EdgeKey, EdgeVerdict};
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_spiffe::SpiffeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

/// Denials are counted over this long (a sliding minute, in [`SLOT_SECS`] steps)…
pub const SPIKE_WINDOW_SECS: u64 = 60;
/// …and compared with their mean per minute over this long before it.
pub const BASELINE_SECS: u64 = 3600;
/// At most one spike event per destination within this long.
pub const SPIKE_COOLDOWN_SECS: u64 = 600;
/// Denials are counted in slots of this many seconds of report arrival time.
pub const SLOT_SECS: u64 = 10;
/// The most (caller, destination, port) triples remembered; past it, new ones are neither
/// remembered nor reported, and [`Observation::unremembered`] counts them.
pub const MAX_KNOWN_EDGES: usize = 500_000;
/// The most caller identities remembered, with the same rule.
pub const MAX_KNOWN_IDENTITIES: usize = 100_000;
/// The most destinations whose denials are counted at once.
pub const MAX_WATCHED_DESTINATIONS: usize = 4_096;
/// The most (slot, caller) tallies kept per destination to name its top callers.
const MAX_CALLER_TALLIES: usize = 256;
const WINDOW_SLOTS: u64 = SPIKE_WINDOW_SECS / SLOT_SECS;
const BASELINE_SLOTS: u64 = BASELINE_SECS / SLOT_SECS;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A caller reached a destination workload's port for the first time.
    NewEdge,
    /// A SPIFFE ID called anything for the first time.
    NewIdentity,
    /// Denied requests to one destination within a minute far above its usual rate.
    DenialSpike,
    /// A federated trust domain's bundle could not be refreshed (once per run of failures;
    /// its last good bundle stays in force).
    FederationRefreshFailed,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::NewEdge,
        EventKind::NewIdentity,
        EventKind::DenialSpike,
        EventKind::FederationRefreshFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::NewEdge => "new-edge",
            EventKind::NewIdentity => "new-identity",
            EventKind::DenialSpike => "denial-spike",
            EventKind::FederationRefreshFailed => "federation-refresh-failed",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One anomaly, as stored and listed (`bulkhead events`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Event {
    /// Given by the store, increasing; 0 until stored.
    pub seq: u64,
    /// Unix seconds when the report that caused it arrived.
    pub at: u64,
    pub kind: EventKind,
    /// The caller (new-edge, new-identity); `None` for a spike, which names its top callers
    /// in `detail`.
    pub source_identity: Option<SpiffeId>,
    pub source_workload: Option<WorkloadRef>,
    /// The destination workload; for a new identity, the first one it called.
    pub destination: Option<WorkloadRef>,
    pub port: Option<u16>,
    /// The requests behind the event: those of the report (new-edge, new-identity) or of the
    /// minute (denial-spike)…
    pub requests: u64,
    /// …and how many of them were denied.
    pub denied: u64,
    /// What happened, for a person.
    pub detail: String,
    /// With control-plane replicas on etcd, the replica that found it when another replica
    /// lists it (`None`: the replica asked, or the only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// When denials to one destination make a spike: at least `min_denials` within a minute,
/// and at least `factor` times their mean per minute over the hour before.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpikeRule {
    pub min_denials: u64,
    pub factor: f64,
}

impl Default for SpikeRule {
    fn default() -> SpikeRule {
        SpikeRule {
            min_denials: 20,
            factor: 5.0,
        }
    }
}

impl SpikeRule {
    /// The denials within a minute that make a spike, given the usual rate per minute.
    fn threshold(&self, usual_per_minute: f64) -> f64 {
        // `max` ignores a NaN factor; a minimum of 0 would make every denial a spike.
        (self.min_denials.max(1) as f64).max(self.factor * usual_per_minute)
    }
}

/// Who called, as events name it: its SPIFFE ID, else its workload, else nobody known.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Caller {
    Identity(SpiffeId),
    Workload(WorkloadRef),
    Unauthenticated,
}

impl Caller {
    pub fn of(key: &EdgeKey) -> Caller {
        match (&key.source_identity, &key.source_workload) {
            (Some(id), _) => Caller::Identity(id.clone()),
            (None, Some(w)) => Caller::Workload(w.clone()),
            (None, None) => Caller::Unauthenticated,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Identity(id) => f.write_str(id),
            Caller::Workload(w) => write!(f, "{w}"),
            Caller::Unauthenticated => f.write_str("unauthenticated"),
        }
    }
}

/// A caller reaching a destination workload's port: what "new edge" is new about.
type Triple = (Caller, WorkloadRef, u16);

/// What one report caused.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// New identities, then new edges, each in the order of the report, then spikes; `seq`
    /// is 0.
    pub events: Vec<Event>,
    /// New edges, identities and destinations not remembered because their bound was
    /// reached: they cause no event, now or later.
    pub unremembered: u64,
}

/// Remembers which callers reached what, and recent denials per destination.
#[derive(Debug)]
pub struct Detector {
    learning_secs: u64,
    spike: SpikeRule,
    learning_start: Option<u64>,
    edges: HashSet<Triple>,
    identities: HashSet<SpiffeId>,
    denials: HashMap<WorkloadRef, Denials>,
}

impl Detector {
    /// A detector that learns silently for `learning_secs` from `learning_start` (or, if
    /// `None`, from the first report it observes).
    pub fn new(learning_secs: u64, spike: SpikeRule, learning_start: Option<u64>) -> Detector {
        Detector {
            learning_secs,
            spike,
            learning_start,
            edges: HashSet::new(),
            identities: HashSet::new(),
            denials: HashMap::new(),
        }
    }

    /// Remembers the callers and triples of `keys` as known, without events: what the
    /// control plane stored before it restarted.
    pub fn learn<'a>(&mut self, keys: impl IntoIterator<Item = &'a EdgeKey>) {
        for key in keys {
            if let Some(id) = &key.source_identity
                && self.identities.len() < MAX_KNOWN_IDENTITIES
            {
                self.identities.insert(id.clone());
            }
            if self.edges.len() < MAX_KNOWN_EDGES {
                self.edges.insert(triple(key));
            }
        }
    }

    /// Recalls the usual denial rates from before a restart: `denied` requests to each
    /// destination over the `over_secs` before `now`, as the store kept them. They count
    /// as one slot just before the current minute, scaled to the baseline's length, so a
    /// destination's usual rate is known at once (not 0 for an hour, when any 20 denials
    /// would be a spike) and fades out of the baseline an hour later, as live history does.
    /// They are spread over a baseline's length at least: a restart soon after a burst of
    /// denials must not make the burst look usual. Recalling errs towards reporting a
    /// spike, never towards hiding one.
    pub fn recall_denials(
        &mut self,
        denied: impl IntoIterator<Item = (WorkloadRef, u64)>,
        over_secs: u64,
        now: u64,
    ) {
        let over_secs = over_secs.max(BASELINE_SECS);
        let slot = (now / SLOT_SECS).saturating_sub(WINDOW_SLOTS);
        for (destination, n) in denied {
            let watched = self.denials.contains_key(&destination);
            if n == 0 || (!watched && self.denials.len() >= MAX_WATCHED_DESTINATIONS) {
                continue;
            }
            let scaled = u128::from(n) * u128::from(BASELINE_SECS) / u128::from(over_secs);
            let scaled = u64::try_from(scaled).unwrap_or(u64::MAX);
            let history = self.denials.entry(destination).or_default();
            match history.slots.back_mut() {
                Some((last, count)) if *last >= slot => *count = count.saturating_add(scaled),
                _ => history.slots.push_back((slot, scaled)),
            }
        }
    }

    /// When the first report came (learning started), if one has.
    pub fn learning_start(&self) -> Option<u64> {
        self.learning_start
    }

    /// When learning ends (or ended), once it has started.
    pub fn learning_until(&self) -> Option<u64> {
        self.learning_start
            .map(|s| s.saturating_add(self.learning_secs))
    }

    pub fn learning_secs(&self) -> u64 {
        self.learning_secs
    }

    /// Counts one report's edges, arrived at `now`, and returns the events they cause.
    pub fn observe(&mut self, edges: &[Edge], now: u64) -> Observation {
        // A row of no requests is not stored, so it is not traffic seen.
        let edges: Vec<&Edge> = edges.iter().filter(|e| e.stats.count > 0).collect();
        if edges.is_empty() {
            return Observation::default();
        }
        let start = *self.learning_start.get_or_insert(now);
        let learning = now < start.saturating_add(self.learning_secs);
        let mut fresh = Fresh::default();
        let mut denied: BTreeMap<&WorkloadRef, Vec<(Caller, u64)>> = BTreeMap::new();
        let mut unremembered = 0;
        for e in edges {
            unremembered += self.remember(e, &mut fresh);
            if !e.key.verdict.is_allow() {
                denied
                    .entry(&e.key.destination)
                    .or_default()
                    .push((Caller::of(&e.key), e.stats.count));
            }
        }
        let mut events = if learning {
            Vec::new()
        } else {
            fresh.events(now)
        };
        for (destination, callers) in denied {
            match self.count_denials(destination, callers, now) {
                Some(Some(event)) => events.push(event),
                Some(None) => {}
                None => unremembered += 1,
            }
        }
        Observation {
            events,
            unremembered,
        }
    }

    /// Remembers `e`'s identity and triple, noting in `fresh` those never seen before.
    /// Returns how many could not be remembered.
    fn remember<'a>(&mut self, e: &'a Edge, fresh: &mut Fresh<'a>) -> u64 {
        let mut unremembered = 0;
        if let Some(id) = &e.key.source_identity {
            let full = fresh
                .identities
                .note(&mut self.identities, MAX_KNOWN_IDENTITIES, id, e);
            unremembered += u64::from(full);
        }
        let full = fresh
            .edges
            .note(&mut self.edges, MAX_KNOWN_EDGES, &triple(&e.key), e);
        unremembered + u64::from(full)
    }

    /// Adds one report's denials to `destination`; returns a spike event if they make one,
    /// or `None` if the destination cannot be watched (too many are).
    fn count_denials(
        &mut self,
        destination: &WorkloadRef,
        callers: Vec<(Caller, u64)>,
        now: u64,
    ) -> Option<Option<Event>> {
        let slot = now / SLOT_SECS;
        if !self.denials.contains_key(destination) {
            if self.denials.len() >= MAX_WATCHED_DESTINATIONS {
                self.denials.retain(|_, d| d.active(slot, now));
            }
            if self.denials.len() >= MAX_WATCHED_DESTINATIONS {
                return None;
            }
        }
        let history = self.denials.entry(destination.clone()).or_default();
        history.add(slot, callers);
        let (recent, usual) = history.rates(slot);
        if (recent as f64) < self.spike.threshold(usual) || history.cooling(now) {
            return Some(None);
        }
        history.last_spike = Some(now);
        let top = history.top_callers(3);
        Some(Some(Event {
            seq: 0,
            at: now,
            kind: EventKind::DenialSpike,
            source_identity: None,
            source_workload: None,
            destination: Some(destination.clone()),
            port: None,
            requests: recent,
            denied: recent,
            detail: format!(
                "{recent} denied requests to {destination} in one minute (usual: {usual:.1} per minute); top callers: {top}"
            ),
            replica: None,
        }))
    }
}

fn triple(key: &EdgeKey) -> Triple {
    (Caller::of(key), key.destination.clone(), key.port)
}

/// The identities and triples first seen in one report, in order, with their requests.
#[derive(Default)]
struct Fresh<'a> {
    identities: Firsts<'a, SpiffeId>,
    edges: Firsts<'a, Triple>,
}

impl Fresh<'_> {
    fn events(&self, now: u64) -> Vec<Event> {
        let identities = self
            .identities
            .tallies
            .iter()
            .map(|t| t.event(now, EventKind::NewIdentity));
        let edges = self
            .edges
            .tallies
            .iter()
            .map(|t| t.event(now, EventKind::NewEdge));
        identities.chain(edges).collect()
    }
}

/// The keys of one kind (identities, triples) first seen in one report, in order, each
/// with its requests.
struct Firsts<'a, K> {
    tallies: Vec<Tally<'a>>,
    index: HashMap<K, usize>,
}

impl<K> Default for Firsts<'_, K> {
    fn default() -> Self {
        Firsts {
            tallies: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<'a, K: Clone + Eq + std::hash::Hash> Firsts<'a, K> {
    /// Counts `e` under `key` when `key` is new: already first seen in this report, or not
    /// in `known` (it is remembered there while `known` holds fewer than `max`). Returns
    /// whether it was new and could not be remembered.
    fn note(&mut self, known: &mut HashSet<K>, max: usize, key: &K, e: &'a Edge) -> bool {
        if let Some(&i) = self.index.get(key) {
            self.tallies[i].add(e);
        } else if !known.contains(key) {
            if known.len() >= max {
                return true;
            }
            known.insert(key.clone());
            self.index.insert(key.clone(), self.tallies.len());
            self.tallies.push(Tally::new(e));
        }
        false
    }
}

/// The requests of one report that share something new, with an edge to describe them by.
struct Tally<'a> {
    first: &'a Edge,
    /// The first denied edge, if any was: the more telling example.
    first_denied: Option<&'a Edge>,
    requests: u64,
    denied: u64,
}

impl<'a> Tally<'a> {
    fn new(e: &'a Edge) -> Tally<'a> {
        let mut t = Tally {
            first: e,
            first_denied: None,
            requests: 0,
            denied: 0,
        };
        t.add(e);
        t
    }

    fn add(&mut self, e: &'a Edge) {
        self.requests = self.requests.saturating_add(e.stats.count);
        if !e.key.verdict.is_allow() {
            self.denied = self.denied.saturating_add(e.stats.count);
            self.first_denied.get_or_insert(e);
        }
    }

    fn event(&self, now: u64, kind: EventKind) -> Event {
        let key = &self.first.key;
        let example = &self.first_denied.unwrap_or(self.first).key;
        let outcome = outcome(self.requests, self.denied);
        // The parties are in the event's fields (and a table's columns), not repeated here.
        let detail = match (kind, &key.source_workload) {
            (EventKind::NewIdentity, Some(w)) => {
                format!("first seen calling (workload {w}): {outcome}")
            }
            (EventKind::NewIdentity, None) => format!("first seen calling: {outcome}"),
            _ => format!("first seen: {outcome}; for example {}", describe(example)),
        };
        Event {
            seq: 0,
            at: now,
            kind,
            source_identity: key.source_identity.clone(),
            source_workload: key.source_workload.clone(),
            destination: Some(key.destination.clone()),
            port: Some(key.port),
            requests: self.requests,
            denied: self.denied,
            detail,
            replica: None,
        }
    }
}

/// `3 requests allowed`, `25 requests denied`, `4 requests, 1 denied`.
fn outcome(requests: u64, denied: u64) -> String {
    let noun = if requests == 1 { "request" } else { "requests" };
    match denied {
        0 => format!("{requests} {noun} allowed"),
        d if d >= requests => format!("{requests} {noun} denied"),
        d => format!("{requests} {noun}, {d} denied"),
    }
}

/// `GET /orders/* allowed by shop/orders-allow (rule frontend) at the destination's sidecar`.
fn describe(key: &EdgeKey) -> String {
    let shape = match (&key.method, &key.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        (Some(m), None) => m.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => key.protocol.as_str().to_string(),
    };
    let verdict = match key.verdict {
        EdgeVerdict::Allow => "allowed",
        EdgeVerdict::Deny => "denied",
        EdgeVerdict::AllowWouldDeny => "allowed (audit policy would deny)",
        EdgeVerdict::DenyWouldAllow => "denied (audit policy would allow)",
    };
    let by = match (&key.policy, &key.rule) {
        (Some(p), _) if p == "built-in" => " by the built-in default".to_string(),
        (Some(p), Some(r)) => format!(" by {p} (rule {r})"),
        (Some(p), None) => format!(" by {p}"),
        (None, _) => String::new(),
    };
    let side = match key.direction {
        Direction::Ingress => "the destination's",
        Direction::Egress => "the caller's",
    };
    format!("{shape} {verdict}{by} at {side} sidecar")
}

/// Recent denials to one destination, by arrival slot, and who made them.
#[derive(Debug, Default)]
struct Denials {
    /// `(slot, denied)`, oldest first, only slots within the window and the baseline.
    slots: VecDeque<(u64, u64)>,
    /// `(slot, caller, denied)` within the window, at most [`MAX_CALLER_TALLIES`].
    callers: Vec<(u64, Caller, u64)>,
    last_spike: Option<u64>,
}

impl Denials {
    fn add(&mut self, slot: u64, callers: Vec<(Caller, u64)>) {
        let total = callers.iter().fold(0u64, |s, (_, n)| s.saturating_add(*n));
        match self.slots.back_mut() {
            // A clock that went back counts into the newest slot.
            Some((last, n)) if *last >= slot => *n = n.saturating_add(total),
            _ => self.slots.push_back((slot, total)),
        }
        let oldest = slot.saturating_sub(WINDOW_SLOTS + BASELINE_SLOTS - 1);
        while self.slots.front().is_some_and(|(s, _)| *s < oldest) {
            self.slots.pop_front();
        }
        let window_start = slot.saturating_sub(WINDOW_SLOTS - 1);
        self.callers.retain(|(s, _, _)| *s >= window_start);
        for (caller, n) in callers {
            let tally = self
                .callers
                .iter_mut()
                .find(|(s, c, _)| *s == slot && *c == caller);
            match tally {
                Some((_, _, count)) => *count = count.saturating_add(n),
                None => {
                    if self.callers.len() < MAX_CALLER_TALLIES {
                        self.callers.push((slot, caller, n));
                    }
                }
            }
        }
    }

    /// Denials within the window ending with `slot`, and the mean per minute over the
    /// baseline before it.
    fn rates(&self, slot: u64) -> (u64, f64) {
        let window_start = slot.saturating_sub(WINDOW_SLOTS - 1);
        let (mut recent, mut before) = (0u64, 0u64);
        for (s, n) in &self.slots {
            if *s >= window_start {
                recent = recent.saturating_add(*n);
            } else {
                before = before.saturating_add(*n);
            }
        }
        (recent, before as f64 / (BASELINE_SECS / 60) as f64)
    }

    fn cooling(&self, now: u64) -> bool {
        self.last_spike
            .is_some_and(|t| now < t.saturating_add(SPIKE_COOLDOWN_SECS))
    }

    /// Whether anything here still matters at `slot`.
    fn active(&self, slot: u64, now: u64) -> bool {
        let oldest = slot.saturating_sub(WINDOW_SLOTS + BASELINE_SLOTS - 1);
        self.cooling(now) || self.slots.back().is_some_and(|(s, _)| *s >= oldest)
    }

    /// `spiffe://…/a (30), shop/b (4)`: the `n` callers with most denials in the window.
    fn top_callers(&self, n: usize) -> String {
        let mut by_caller: BTreeMap<&Caller, u64> = BTreeMap::new();
        for (_, caller, count) in &self.callers {
            let c = by_caller.entry(caller).or_default();
            *c = c.saturating_add(*count);
        }
        let mut ranked: Vec<(&Caller, u64)> = by_caller.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let names: Vec<String> = ranked
            .iter()
            .take(n)
            .map(|(c, count)| format!("{c} ({count})"))
            .collect();
        let mut text = names.join(", ");
        if ranked.len() > n {
            text.push_str(&format!(" and {} more", ranked.len() - n));
        }
        text
    }
}

#[cfg(test)]
mod tests;
