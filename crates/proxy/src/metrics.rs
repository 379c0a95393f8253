//! Every metric the sidecar exports, defined in one place with its labels.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `bulkhead_requests` | counter | `direction` (inbound, outbound), the caller's and the callee's [`Place`] and SPIFFE ID (`source_namespace`, `source_workload`, `source_principal`, `destination_namespace`, `destination_workload`, `destination_principal`), `response_code`, `response_flags` (`RBAC` for a mesh denial, by this sidecar or the peer's; `-` otherwise) |
//! | `bulkhead_request_duration_seconds` | histogram | the same as `bulkhead_requests` |
//! | `bulkhead_authz_decisions` | counter | `direction`, `verdict` (allow, deny), `audit` (would_deny, would_allow, or empty), `policy`, `rule`, the caller (`source_namespace`, `source_workload`, `source_principal`) and the callee (`destination_namespace`, `destination_workload`) |
//! | `bulkhead_tls_handshake_failures` | counter | `direction`, `reason` (see [`TlsFailure`]) |
//! | `bulkhead_connections` | counter | `direction` |
//! | `bulkhead_connections_open` | gauge | `direction` (connections open now on the listeners) |
//! | `bulkhead_connections_refused` | counter | `direction` (over `--max-connections`) |
//! | `bulkhead_refusals` | counter | `direction` (inbound, outbound), `reason` (see [`Refusal`]): every refusal the proxy makes on its own, below |
//! | `bulkhead_svid_expiry_timestamp_seconds` | gauge | — |
//! | `bulkhead_svid_renewals` | counter | `result` (ok, error) |
//! | `bulkhead_config_updates` | counter | `result` (ack, nack) |
//! | `bulkhead_policy_revision` | gauge | — |
//! | `bulkhead_tcp_opened` | counter | `direction` (opaque TCP connections relayed) |
//! | `bulkhead_tcp_closed` | counter | `direction`, `reason` (done, error, idle, policy) |
//! | `bulkhead_tcp_bytes` | counter | `direction`, `flow` (to_peer, from_peer) |
//! | `bulkhead_connections_reset` | counter | `direction`, `reason` (see [`Metrics::reset`]) |
//! | `bulkhead_plaintext_connections` | counter | `port` (accepted without mTLS on a permissive port) |
//! | `bulkhead_flow_requests_dropped` | counter | — (requests the bounded flow buffer could not count) |
//! | `bulkhead_control_replica` | gauge | — (the place, from 1, of the control-plane replica in use among the `--control` addresses; 0 before the first connection) |
//! | `bulkhead_control_replica_losses` | counter | `reason` (stream_ended, stream_broke, unreachable): the replica in use was lost |
//! | `bulkhead_control_replica_moves` | counter | — (connections made to another replica than the one before) |
//!
//! Counters get the `_total` suffix on the wire, as OpenMetrics says. `/metrics` also
//! serves `bulkhead_build_info` and the `process_*` families (`bulkhead_api::process`).
//!
//! Cardinality: every label value comes from a bounded set: the mesh's workloads and
//! identities (a caller the sidecar cannot place is `unknown`; a plaintext caller's principal
//! is `plaintext`), the policies and rules in force, and fixed words. No path, address,
//! header or serial is ever a label value. `docs/observability.md` counts the series.
//!
//! `bulkhead_refusals_total` counts what the proxy refuses or cuts by itself; a policy denial
//! is in `bulkhead_authz_decisions_total` and a refused handshake in
//! `bulkhead_tls_handshake_failures_total`. Its `reason` values:
//!
//! | reason | what happened | the caller sees |
//! |---|---|---|
//! | `too_many_connections` | a listener at `--max-connections` | connection closed at accept |
//! | `header_timeout` | a request head not complete within `--header-read-timeout-secs` of its first byte (slowloris) | connection closed |
//! | `header_too_large` | a request head over `--max-header-bytes`, HTTP/1.1 or HTTP/2 | 431 |
//! | `rapid_reset` | an HTTP/2 client resetting streams faster than it lets them finish | GOAWAY `ENHANCE_YOUR_CALM` |
//! | `bad_path` | an ambiguous path | 400 |
//! | `opaque_to_http_port` | inbound: an opaque relay, or non-HTTP plaintext, to a port declared for HTTP | connection closed |
//! | `http_to_tcp_port` | inbound: multiplexed HTTP to a port declared `tcp` | 502 naming the port |
//! | `not_http` | outbound: an idle or non-HTTP connection to a destination port declared for HTTP, refused without dialling the peer | connection closed |
//! | `upgrade_refused` | an `Upgrade` to a protocol the port does not allow (`h2c` always) | the request is served as plain HTTP/1.1 |
//! | `upgrade_mismatch` | a `101` for another protocol than the one forwarded | 502, connection closed |
//! | `body_idle_timeout` | a request body stalled past `--body-idle-timeout-secs` | 408 |
//! | `body_timeout` | a request body not complete within `--body-timeout-secs` | 408 |
//! | `bad_request_body` | a request body that could not be read (bad chunked encoding) | 400 |
//! | `response_timeout` | no response head within `--response-timeout-secs` of the request's end | 504 |
//! | `route_changed` | transparent: the destination's address changed owner since the connection opened | 503, connection closed |
//! | `policy_changed` | an open relay or upgraded connection a new policy denies | connection closed |
//! | `no_original_destination` | transparent: a redirected connection without its original destination | connection closed |

pub(crate) use crate::refusal::Refusal;
use bulkhead_identity::SvidError;
use bulkhead_policy::model::ResourceName;
use bulkhead_policy::{Decision, Reason, Verdict};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

/// A label value shared, not copied: made once per connection (an identity) or per policy
/// set (a policy or rule name), so counting a request allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct LabelText(Arc<str>);

impl LabelText {
    pub(crate) fn new(text: &str) -> LabelText {
        LabelText(Arc::from(text))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Arc<str>> for LabelText {
    fn from(text: Arc<str>) -> LabelText {
        LabelText(text)
    }
}

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

/// The policy named by a decision, written `namespace/name`; `default` when a posture decided.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct PolicyLabel(Option<Arc<ResourceName>>);

impl EncodeLabelValue for PolicyLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(p) => write!(encoder, "{p}"),
            None => encoder.write_str("default"),
        }
    }
}

/// The value of a namespace or workload label for a party the sidecar cannot place.
pub(crate) const UNKNOWN: &str = "unknown";

/// Where a party sits in the mesh, as Istio and Linkerd label it: its namespace and workload.
/// Its Workload when the sidecar knows it (its own; a destination it was configured with or
/// found by address; a caller at a declared address with the declared identity), else the
/// namespace and service account of its SPIFFE ID (`spiffe://td/ns/<ns>/sa/<sa>`, the
/// identity a Workload's token binds), else `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Place {
    pub namespace: LabelText,
    pub workload: LabelText,
}

impl Place {
    pub(crate) fn of(identity: Option<&str>, workload: Option<&ResourceName>) -> Place {
        if let Some(w) = workload {
            return Place {
                namespace: LabelText::new(&w.namespace),
                workload: LabelText::new(&w.name),
            };
        }
        let from_id = identity.and_then(|id| {
            let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
            let mut parts = path.split('/');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("ns"), Some(ns), Some("sa"), Some(sa)) if parts.next().is_none() => {
                    Some((ns, sa))
                }
                _ => None,
            }
        });
        let (namespace, workload) = from_id.unwrap_or((UNKNOWN, UNKNOWN));
        Place {
            namespace: LabelText::new(namespace),
            workload: LabelText::new(workload),
        }
    }
}

/// Who called whom over one connection: the labels of every request and decision on it,
/// made once per connection.
#[derive(Clone, Debug)]
pub(crate) struct Parties {
    /// The caller's SPIFFE ID, or `plaintext`.
    pub source: LabelText,
    /// The callee's SPIFFE ID, or `-` outside the mesh.
    pub destination: LabelText,
    pub source_place: Place,
    pub destination_place: Place,
    /// The metrics these parties' requests and decisions last counted into (shared by clones:
    /// their labels are the same).
    handles: Arc<Mutex<Handles>>,
}

/// At most this many request label sets (status code and flags) and as many decision label
/// sets (verdict, audit, policy, rule) keep their metric per connection; past it the oldest
/// makes room.
const HANDLES_PER_PARTIES: usize = 8;

/// The series a connection's requests and decisions were counted in, so that the next
/// request with the same labels counts into the same series without hashing its ten labels
/// to find it again. A handle is the family's own metric (a clone shares the value); no
/// family ever removes a series, so a held handle always counts where `/metrics` reads.
#[derive(Debug, Default)]
struct Handles {
    requests: Vec<RequestHandle>,
    decisions: Vec<DecisionHandle>,
}

#[derive(Debug)]
struct RequestHandle {
    direction: &'static str,
    status: u16,
    flags: &'static str,
    count: Counter,
    duration: Histogram,
}

#[derive(Debug)]
struct DecisionHandle {
    direction: &'static str,
    verdict: &'static str,
    audit: &'static str,
    policy: Option<Arc<ResourceName>>,
    rule: Option<Arc<str>>,
    count: Counter,
}

impl Parties {
    fn handles(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps `item` among at most [`HANDLES_PER_PARTIES`], dropping the oldest. The list grows
/// one place at a time: most connections count into one or two series, and every open
/// connection holds its lists (a `Vec`'s first push would make room for four).
fn keep<T>(held: &mut Vec<T>, item: T) {
    if held.len() >= HANDLES_PER_PARTIES {
        held.remove(0);
    } else if held.len() == held.capacity() {
        held.reserve_exact(1);
    }
    held.push(item);
}

impl Parties {
    /// The parties of a connection between this sidecar (`own`, its place `own_place`)
    /// and a peer: the peer called when `inbound`. A peer without an identity is a plaintext
    /// caller inbound, a destination outside the mesh outbound.
    pub(crate) fn with_peer(
        inbound: bool,
        own: &LabelText,
        own_place: &Place,
        peer: Option<&str>,
        peer_workload: Option<&ResourceName>,
    ) -> Parties {
        let mine = own_place.clone();
        let theirs = Place::of(peer, peer_workload);
        match inbound {
            true => Parties {
                source: LabelText::new(peer.unwrap_or(crate::inbound::PLAINTEXT_PEER)),
                destination: own.clone(),
                source_place: theirs,
                destination_place: mine,
                handles: Arc::default(),
            },
            false => Parties {
                source: own.clone(),
                destination: LabelText::new(peer.unwrap_or("-")),
                source_place: mine,
                destination_place: theirs,
                handles: Arc::default(),
            },
        }
    }
}

/// What kind of answer a request got, beside its status code (Envoy's response flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResponseFlags {
    /// The app's (or the destination's) own answer, whatever its status.
    None,
    /// Denied by the mesh: by this sidecar's policy, or, outbound, by the destination's
    /// sidecar (its `x-bulkhead-decision: deny…`, which the receiving sidecar never lets an
    /// app set). An app's own 403 is not this.
    Rbac,
}

impl ResponseFlags {
    fn label(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Rbac => "RBAC",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub direction: &'static str,
    pub source_namespace: LabelText,
    pub source_workload: LabelText,
    pub source_principal: LabelText,
    pub destination_namespace: LabelText,
    pub destination_workload: LabelText,
    pub destination_principal: LabelText,
    pub response_code: u16,
    pub response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DecisionLabels {
    pub direction: &'static str,
    pub verdict: &'static str,
    pub audit: &'static str,
    pub policy: PolicyLabel,
    pub rule: Option<LabelText>,
    pub source_namespace: LabelText,
    pub source_workload: LabelText,
    pub source_principal: LabelText,
    pub destination_namespace: LabelText,
    pub destination_workload: LabelText,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TlsLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TcpCloseLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TcpBytesLabels {
    pub direction: &'static str,
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PortLabels {
    pub port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub result: &'static str,
}

pub(crate) struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub tls_failures: Family<TlsLabels, Counter>,
    pub connections: Family<DirectionLabels, Counter>,
    pub open: Family<DirectionLabels, Gauge>,
    pub refused: Family<DirectionLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub svid_expiry: Gauge,
    pub renewals: Family<ResultLabels, Counter>,
    pub config_updates: Family<ResultLabels, Counter>,
    pub revision: Gauge,
    pub tcp_opened: Family<DirectionLabels, Counter>,
    pub tcp_closed: Family<TcpCloseLabels, Counter>,
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    pub plaintext: Family<PortLabels, Counter>,
    pub resets: Family<TcpCloseLabels, Counter>,
    pub flows_dropped: Counter,
    pub control_replica: Gauge,
    pub control_losses: Family<ReasonLabels, Counter>,
    pub control_moves: Counter,
    /// Spans sent to the trace collector, and dropped (`--otlp-endpoint`).
    pub traces: Arc<TraceCounters>,
    registry: Registry,
}

/// What the span exporter did; registered whether or not tracing is on.
#[derive(Debug, Default)]
pub(crate) struct TraceCounters {
    exported: Counter,
    dropped: Counter,
}

impl bulkhead_api::otlp::SpanCounts for TraceCounters {
    fn exported(&self, n: u64) {
        self.exported.inc_by(n);
    }
    fn dropped(&self, n: u64) {
        self.dropped.inc_by(n);
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        let decisions = Family::<DecisionLabels, Counter>::default();
        let tls_failures = Family::<TlsLabels, Counter>::default();
        let connections = Family::<DirectionLabels, Counter>::default();
        let open = Family::<DirectionLabels, Gauge>::default();
        // Both directions from the start, at 0: a sidecar with nothing open says so.
        for direction in ["inbound", "outbound"] {
            let _ = open.get_or_create(&DirectionLabels { direction });
        }
        registry.register(
            "bulkhead_connections_open",
            "Connections open now on the sidecar's listeners, by direction",
            open.clone(),
        );
        let refused = Family::<DirectionLabels, Counter>::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        let svid_expiry = Gauge::default();
        let renewals = Family::<ResultLabels, Counter>::default();
        let config_updates = Family::<ResultLabels, Counter>::default();
        let revision = Gauge::default();
        let tcp_opened = Family::<DirectionLabels, Counter>::default();
        let tcp_closed = Family::<TcpCloseLabels, Counter>::default();
        let tcp_bytes = Family::<TcpBytesLabels, Counter>::default();
        let plaintext = Family::<PortLabels, Counter>::default();
        let resets = Family::<TcpCloseLabels, Counter>::default();
        registry.register(
            "bulkhead_connections_reset",
            "Connections refused or ended with a TCP reset, by direction and reason",
            resets.clone(),
        );
        let flows_dropped = Counter::default();
        registry.register(
            "bulkhead_flow_requests_dropped",
            "Requests left out of the flow report because its buffer was full",
            flows_dropped.clone(),
        );
        registry.register(
            "bulkhead_tcp_opened",
            "Opaque TCP connections relayed, by direction",
            tcp_opened.clone(),
        );
        registry.register(
            "bulkhead_tcp_closed",
            "Opaque TCP connections ended, by reason (done, error, idle, policy)",
            tcp_closed.clone(),
        );
        registry.register(
            "bulkhead_tcp_bytes",
            "Bytes relayed on opaque TCP connections",
            tcp_bytes.clone(),
        );
        registry.register(
            "bulkhead_plaintext_connections",
            "Connections accepted without mTLS on a permissive port",
            plaintext.clone(),
        );
        registry.register(
            "bulkhead_requests",
            "HTTP requests handled, by direction, caller and callee (namespace, workload, SPIFFE ID), response code and flags (RBAC: denied by the mesh)",
            requests.clone(),
        );
        registry.register(
            "bulkhead_request_duration_seconds",
            "Time from request to response headers, by the labels of bulkhead_requests",
            duration.clone(),
        );
        registry.register(
            "bulkhead_authz_decisions",
            "Authorization decisions by verdict, audit outcome, policy, rule, caller and callee",
            decisions.clone(),
        );
        registry.register(
            "bulkhead_tls_handshake_failures",
            "Refused mTLS handshakes and peer certificates, by reason",
            tls_failures.clone(),
        );
        registry.register(
            "bulkhead_connections",
            "Connections accepted (inbound) or opened to an upstream (outbound)",
            connections.clone(),
        );
        registry.register(
            "bulkhead_connections_refused",
            "Connections closed at accept because the listener was at its limit",
            refused.clone(),
        );
        registry.register(
            "bulkhead_refusals",
            "Requests and connections the proxy refused or cut on its own (not policy denials), by direction and reason",
            refusals.clone(),
        );
        registry.register(
            "bulkhead_svid_expiry_timestamp_seconds",
            "When the current SVID expires (Unix time)",
            svid_expiry.clone(),
        );
        registry.register(
            "bulkhead_svid_renewals",
            "SVID renewal attempts by result",
            renewals.clone(),
        );
        registry.register(
            "bulkhead_config_updates",
            "Configuration revisions put in force (ack) or refused (nack)",
            config_updates.clone(),
        );
        registry.register(
            "bulkhead_policy_revision",
            "The policy revision in force",
            revision.clone(),
        );
        let control_replica = Gauge::default();
        registry.register(
            "bulkhead_control_replica",
            "The place (from 1) of the control-plane replica in use among the --control addresses; 0 before the first connection",
            control_replica.clone(),
        );
        let control_losses = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "bulkhead_control_replica_losses",
            "Times the control-plane replica in use was lost, by reason (stream_ended, stream_broke, unreachable)",
            control_losses.clone(),
        );
        let control_moves = Counter::default();
        registry.register(
            "bulkhead_control_replica_moves",
            "Connections made to another control-plane replica than the one before",
            control_moves.clone(),
        );
        let traces = Arc::new(TraceCounters::default());
        registry.register(
            "bulkhead_trace_spans_exported",
            "Spans the trace collector accepted",
            traces.exported.clone(),
        );
        registry.register(
            "bulkhead_trace_spans_dropped",
            "Spans dropped: the queue was full, or the collector refused them or did not answer in time",
            traces.dropped.clone(),
        );
        Metrics {
            traces,
            requests,
            duration,
            decisions,
            tls_failures,
            connections,
            open,
            refused,
            refusals,
            svid_expiry,
            renewals,
            config_updates,
            revision,
            tcp_opened,
            tcp_closed,
            tcp_bytes,
            plaintext,
            resets,
            flows_dropped,
            control_replica,
            control_losses,
            control_moves,
            registry,
        }
    }

    /// The control-plane replica in use was lost (`reason` a fixed word).
    pub(crate) fn control_lost(&self, reason: &'static str) {
        self.control_losses
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn decision(&self, direction: &'static str, d: &Decision, parties: &Parties) {
        let (policy, rule) = match &d.reason {
            Reason::Rule { policy, rule, .. } => (Some(policy), Some(rule)),
            Reason::Posture { .. } => (None, None),
        };
        let audit = match d.audit.as_ref() {
            Some(a) if a.verdict != d.verdict && a.verdict == Verdict::Deny => "would_deny",
            Some(a) if a.verdict != d.verdict => "would_allow",
            _ => "",
        };
        let verdict = if d.is_allow() { "allow" } else { "deny" };
        let mut handles = parties.handles();
        let held = handles.decisions.iter().find(|h| {
            h.direction == direction
                && h.verdict == verdict
                && h.audit == audit
                && h.policy.as_ref() == policy
                && h.rule.as_ref() == rule
        });
        if let Some(h) = held {
            h.count.inc();
            return;
        }
        let count = self
            .decisions
            .get_or_create(&DecisionLabels {
                direction,
                verdict,
                audit,
                policy: PolicyLabel(policy.cloned()),
                rule: rule.map(|r| LabelText(r.clone())),
                source_namespace: parties.source_place.namespace.clone(),
                source_workload: parties.source_place.workload.clone(),
                source_principal: parties.source.clone(),
                destination_namespace: parties.destination_place.namespace.clone(),
                destination_workload: parties.destination_place.workload.clone(),
            })
            .clone();
        count.inc();
        let handle = DecisionHandle {
            direction,
            verdict,
            audit,
            policy: policy.cloned(),
            rule: rule.cloned(),
            count,
        };
        keep(&mut handles.decisions, handle);
    }

    pub(crate) fn request(
        &self,
        direction: &'static str,
        parties: &Parties,
        status: u16,
        flags: ResponseFlags,
        elapsed: std::time::Duration,
    ) {
        let flags = flags.label();
        let mut handles = parties.handles();
        let held = handles
            .requests
            .iter()
            .find(|h| h.direction == direction && h.status == status && h.flags == flags);
        if let Some(h) = held {
            h.count.inc();
            h.duration.observe(elapsed.as_secs_f64());
            return;
        }
        let labels = RequestLabels {
            direction,
            source_namespace: parties.source_place.namespace.clone(),
            source_workload: parties.source_place.workload.clone(),
            source_principal: parties.source.clone(),
            destination_namespace: parties.destination_place.namespace.clone(),
            destination_workload: parties.destination_place.workload.clone(),
            destination_principal: parties.destination.clone(),
            response_code: status,
            response_flags: flags,
        };
        let count = self.requests.get_or_create(&labels).clone();
        let duration = self.duration.get_or_create(&labels).clone();
        count.inc();
        duration.observe(elapsed.as_secs_f64());
        let handle = RequestHandle {
            direction,
            status,
            flags,
            count,
            duration,
        };
        keep(&mut handles.requests, handle);
    }

    pub(crate) fn refused_connection(&self, direction: &'static str) {
        self.refused
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub(crate) fn refusal(&self, direction: &'static str, reason: Refusal) {
        self.refusals
            .get_or_create(&RefusalLabels {
                direction,
                reason: reason.label(),
            })
            .inc();
    }

    /// A connection closed with a TCP reset. Reasons: `undeclared_port` (inbound, to a port
    /// the workload does not declare while it declares some), `not_redirected` (not sent by
    /// `init`'s rules, e.g. to the proxy's own port), `not_local` (inbound, the original
    /// destination is not an address of this namespace), `denied` (opaque TCP policy denied),
    /// `unreachable` (nothing accepted it onward), `relay_error` (one side of a relay failed).
    pub(crate) fn reset(&self, direction: &'static str, reason: &'static str) {
        self.resets
            .get_or_create(&TcpCloseLabels { direction, reason })
            .inc();
    }

    /// A connection opened on a listener: counted open until the guard is dropped.
    pub(crate) fn opened(&self, direction: &'static str) -> OpenConnection {
        let gauge = self
            .open
            .get_or_create(&DirectionLabels { direction })
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    pub(crate) fn connection(&self, direction: &'static str) {
        self.connections
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub(crate) fn tls_failure(&self, direction: &'static str, reason: TlsFailure) {
        self.tls_failures
            .get_or_create(&TlsLabels {
                direction,
                reason: reason.label(),
            })
            .inc();
    }
}

/// One open connection in `bulkhead_connections_open`, until dropped.
pub(crate) struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a handshake or a peer certificate was refused; each a distinct metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TlsFailure {
    NotTls,
    NoClientCert,
    Expired,
    NotYetValid,
    UnknownCa,
    BadSignature,
    WrongTrustDomain,
    UnexpectedIdentity,
    NoSpiffeId,
    ManyUriSans,
    CaLeaf,
    BadSpiffeId,
    /// The leaf's extended key usage does not allow its use here (a client certificate
    /// without clientAuth, a server certificate without serverAuth).
    WrongPurpose,
    /// The peer's identity or certificate was revoked (`bulkhead revoke`).
    Revoked,
    Incompatible,
    /// The peer refused our certificate (it sent an alert).
    RefusedByPeer,
    Timeout,
    Other,
}

impl TlsFailure {
    pub(crate) fn label(self) -> &'static str {
        match self {
            TlsFailure::NotTls => "not_tls",
            TlsFailure::NoClientCert => "no_client_cert",
            TlsFailure::Expired => "expired",
            TlsFailure::NotYetValid => "not_yet_valid",
            TlsFailure::UnknownCa => "unknown_ca",
            TlsFailure::BadSignature => "bad_signature",
            TlsFailure::WrongTrustDomain => "wrong_trust_domain",
            TlsFailure::UnexpectedIdentity => "unexpected_identity",
            TlsFailure::NoSpiffeId => "no_spiffe_id",
            TlsFailure::ManyUriSans => "many_uri_sans",
            TlsFailure::CaLeaf => "ca_flag_on_leaf",
            TlsFailure::BadSpiffeId => "bad_spiffe_id",
            TlsFailure::WrongPurpose => "wrong_purpose",
            TlsFailure::Revoked => "revoked",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::RefusedByPeer => "refused_by_peer",
            TlsFailure::Timeout => "timeout",
            TlsFailure::Other => "other",
        }
    }

    pub(crate) fn of_svid(e: &SvidError) -> TlsFailure {
        match e {
            SvidError::Malformed | SvidError::BadId(_) => TlsFailure::BadSpiffeId,
            SvidError::NoSpiffeId => TlsFailure::NoSpiffeId,
            SvidError::ManyUriSans(_) => TlsFailure::ManyUriSans,
            SvidError::CaLeaf => TlsFailure::CaLeaf,
            SvidError::UnexpectedIdentity { .. } => TlsFailure::UnexpectedIdentity,
            SvidError::WrongTrustDomain { .. } => TlsFailure::WrongTrustDomain,
            SvidError::Revoked { .. } => TlsFailure::Revoked,
        }
    }

    /// Classifies the error a TLS accept or connect returned.
    pub(crate) fn of_io(e: &std::io::Error) -> TlsFailure {
        use rustls::{CertificateError as C, Error as E};
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
            return TlsFailure::Other;
        };
        match tls {
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. } => TlsFailure::NotTls,
            E::NoCertificatesPresented => TlsFailure::NoClientCert,
            E::PeerIncompatible(_) => TlsFailure::Incompatible,
            E::AlertReceived(_) => TlsFailure::RefusedByPeer,
            E::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => TlsFailure::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => TlsFailure::NotYetValid,
                C::UnknownIssuer => TlsFailure::UnknownCa,
                C::BadSignature => TlsFailure::BadSignature,
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => TlsFailure::WrongPurpose,
                C::Other(o) => {
                    o.0.downcast_ref::<SvidError>()
                        .map(TlsFailure::of_svid)
                        .unwrap_or(TlsFailure::Other)
                }
                _ => TlsFailure::Other,
            },
            _ => TlsFailure::Other,
        }
    }
}

/// Keeps `bulkhead_control_replica` and `bulkhead_control_replica_moves` in step with the
/// replica in use, for as long as the proxy runs.
pub(crate) fn follow_replica(shared: &Arc<crate::Shared>) {
    let mut on = shared.control.watch();
    let metrics = shared.clone();
    tokio::spawn(async move {
        let mut counted = 0;
        loop {
            if let Some(replica) = on.borrow_and_update().clone() {
                let m = &metrics.metrics;
                m.control_replica.set(replica.position as i64);
                m.control_moves
                    .inc_by(replica.moves.saturating_sub(counted));
                counted = counted.max(replica.moves);
            }
            if on.changed().await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_party_is_placed_by_its_workload_or_its_spiffe_id() {
        let place = |p: Place| {
            (
                p.namespace.as_str().to_string(),
                p.workload.as_str().to_string(),
            )
        };
        let orders = ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            place(Place::of(Some("spiffe://td/ns/x/sa/y"), Some(&orders))),
            s("shop", "orders")
        );
        assert_eq!(
            place(Place::of(Some("spiffe://td/ns/pay/sa/ledger"), None)),
            s("pay", "ledger")
        );
        for odd in [
            "spiffe://td/bulkhead/control",
            "spiffe://td/ns/a/sa/b/c",
            "x",
        ] {
            assert_eq!(
                place(Place::of(Some(odd), None)),
                s(UNKNOWN, UNKNOWN),
                "{odd}"
            );
        }
        assert_eq!(place(Place::of(None, None)), s(UNKNOWN, UNKNOWN));
    }

    /// The value of the one series of `family` whose label set holds every `labels` pair.
    fn series(page: &str, family: &str, labels: &[&str]) -> Option<f64> {
        let mut found = page.lines().filter(|l| {
            l.starts_with(&format!("{family}{{")) && labels.iter().all(|p| l.contains(p))
        });
        let line = found.next()?;
        assert!(found.next().is_none(), "more than one series: {labels:?}");
        line.rsplit(' ').next()?.parse().ok()
    }

    #[test]
    fn a_kept_handle_counts_in_the_series_its_labels_name() {
        let metrics = Metrics::new();
        let own = LabelText::new("spiffe://td/ns/shop/sa/orders");
        let place = Place::of(Some(own.as_str()), None);
        let caller =
            Parties::with_peer(true, &own, &place, Some("spiffe://td/ns/shop/sa/web"), None);
        let other = Parties::with_peer(
            true,
            &own,
            &place,
            Some("spiffe://td/ns/pay/sa/ledger"),
            None,
        );
        let ms = std::time::Duration::from_millis(1);
        // More status codes than a connection keeps handles for, each counted n times, in
        // turns, so handles are dropped and made again; a second caller on its own handles.
        let codes: Vec<u16> = (0..2 * HANDLES_PER_PARTIES as u16)
            .map(|i| 200 + i)
            .collect();
        for round in 0..3 {
            for (i, &code) in codes.iter().enumerate() {
                if round <= i % 3 {
                    metrics.request("inbound", &caller, code, ResponseFlags::None, ms);
                }
            }
            metrics.request("inbound", &other, 200, ResponseFlags::Rbac, ms);
        }
        let deny = |policy: &str, rule: &str| Decision {
            verdict: Verdict::Deny,
            reason: Reason::Rule {
                action: bulkhead_policy::model::Action::Deny,
                policy: Arc::new(ResourceName {
                    namespace: "shop".into(),
                    name: policy.into(),
                }),
                rule: Arc::from(rule),
            },
            revision: 1,
            audit: None,
        };
        // Equal names made anew (as a new policy set makes them) count in the same series.
        for _ in 0..3 {
            metrics.decision("inbound", &deny("p", "a"), &caller);
            metrics.decision("inbound", &deny("p", "b"), &caller);
        }
        metrics.decision("inbound", &deny("p", "a"), &other);
        let page = metrics.encode();
        let web = "source_principal=\"spiffe://td/ns/shop/sa/web\"";
        let ledger = "source_principal=\"spiffe://td/ns/pay/sa/ledger\"";
        for (i, code) in codes.iter().enumerate() {
            let code = format!("response_code=\"{code}\"");
            let want = (i % 3 + 1) as f64;
            let labels = [web, &code, "response_flags=\"-\""];
            assert_eq!(
                series(&page, "bulkhead_requests_total", &labels),
                Some(want),
                "{code}\n{page}"
            );
            assert_eq!(
                series(&page, "bulkhead_request_duration_seconds_count", &labels),
                Some(want),
                "{code}"
            );
        }
        let rbac = [ledger, "response_code=\"200\"", "response_flags=\"RBAC\""];
        assert_eq!(series(&page, "bulkhead_requests_total", &rbac), Some(3.0));
        let rule = |r: &str| format!("rule=\"{r}\"");
        for (who, r, want) in [(web, "a", 3.0), (web, "b", 3.0), (ledger, "a", 1.0)] {
            let labels = [who, "policy=\"shop/p\"", "verdict=\"deny\"", &rule(r)];
            assert_eq!(
                series(&page, "bulkhead_authz_decisions_total", &labels),
                Some(want),
                "{who} {r}\n{page}"
            );
        }
    }

    #[test]
    fn each_refusal_has_its_own_reason() {
        use rustls::{CertificateError as C, Error as E};
        let cases = [
            (io(E::InvalidCertificate(C::Expired)), "expired"),
            (io(E::InvalidCertificate(C::NotValidYet)), "not_yet_valid"),
            (io(E::InvalidCertificate(C::UnknownIssuer)), "unknown_ca"),
            (io(E::NoCertificatesPresented), "no_client_cert"),
            (
                io(E::AlertReceived(rustls::AlertDescription::BadCertificate)),
                "refused_by_peer",
            ),
            (io(E::InvalidCertificate(C::BadSignature)), "bad_signature"),
            (
                io(E::InvalidCertificate(C::InvalidPurpose)),
                "wrong_purpose",
            ),
            (
                io(E::InvalidCertificate(C::Other(rustls::OtherError(
                    Arc::new(SvidError::Revoked {
                        id: "spiffe://td/a".into(),
                        serial: "01".into(),
                    }),
                )))),
                "revoked",
            ),
            (
                io(E::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                "not_tls",
            ),
            (
                io(E::InvalidCertificate(C::Other(rustls::OtherError(
                    Arc::new(SvidError::WrongTrustDomain {
                        expected: "a".into(),
                        found: "b".into(),
                    }),
                )))),
                "wrong_trust_domain",
            ),
            (
                io(E::InvalidCertificate(C::Other(rustls::OtherError(
                    Arc::new(SvidError::ManyUriSans(2)),
                )))),
                "many_uri_sans",
            ),
            (
                io(E::InvalidCertificate(C::Other(rustls::OtherError(
                    Arc::new(SvidError::CaLeaf),
                )))),
                "ca_flag_on_leaf",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(TlsFailure::of_io(&e).label(), want, "{e}");
        }
    }
}
