//! Request spans, exported as OTLP (`bulkhead_api::otlp`). Each sidecar makes a server span for
//! every inbound request and a client span for every outbound one. A span continues the
//! request's W3C `traceparent` when there is one, and starts a trace otherwise. The request
//! goes on carrying the new span as its parent, so the peer's server span is the child of this
//! client span and the app's own spans are children of the server span. The app only has to
//! forward the headers, as with every mesh. `tracestate` passes through untouched.
//!
//! Off (no endpoint), this costs one branch per request. On, a span is a few allocations and
//! one `try_send`: a slow or dead collector drops spans, never requests
//! (`bulkhead_trace_spans_dropped_total`).

use bulkhead_api::otlp::{self, FinishedSpan, SpanContext, SpanKind, Value};
use bulkhead_policy::{Decision, Reason};
use http::{HeaderMap, HeaderValue};
use std::time::SystemTime;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Spans on, toward one collector.
pub(crate) struct Tracer(otlp::Tracer);

/// A request's span, from when its head arrived.
pub(crate) struct RequestSpan {
    context: SpanContext,
    parent: Option<[u8; 8]>,
    trace_state: String,
    kind: SpanKind,
    start: SystemTime,
}

/// A span begun on a request, if tracing is on and the request is sampled; it ends (once)
/// with the outcome the caller got.
pub(crate) struct Pending<'a> {
    tracer: Option<&'a Tracer>,
    span: std::sync::Mutex<Option<RequestSpan>>,
    /// The request's trace: this span's, or (untraced here) the one its `traceparent` names.
    trace_id: Option<[u8; 16]>,
}

impl<'a> Pending<'a> {
    /// Begins a span for the request with `headers` if `tracer` is on and it is sampled,
    /// making the span the parent the request carries on. Call it after the request is
    /// judged: policy sees the `traceparent` the caller sent.
    pub(crate) fn begin(
        tracer: Option<&'a Tracer>,
        headers: &mut HeaderMap,
        kind: SpanKind,
        start: SystemTime,
    ) -> Pending<'a> {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(SpanContext::from_traceparent)
            .map(|c| c.trace_id);
        let span = tracer.and_then(|t| t.begin(headers, kind, start));
        let trace_id = span.as_ref().map(|s| s.context.trace_id).or(incoming);
        Pending {
            tracer,
            span: std::sync::Mutex::new(span),
            trace_id,
        }
    }

    /// The request's trace id, for its log line.
    pub(crate) fn trace_id(&self) -> Option<[u8; 16]> {
        self.trace_id
    }

    pub(crate) fn end(&self, outcome: &Outcome<'_>) {
        let Some(t) = self.tracer else {
            return;
        };
        let taken = self
            .span
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(span) = taken {
            t.end(span, outcome);
        }
    }
}

/// What a finished span says about its request.
pub(crate) struct Outcome<'a> {
    pub direction: &'static str,
    pub method: &'a str,
    pub path: &'a str,
    pub port: u16,
    pub source: Option<&'a str>,
    pub destination: Option<&'a str>,
    pub decision: &'a Decision,
    pub status: u16,
}

impl Tracer {
    pub(crate) fn start(
        endpoint: &str,
        ratio: f64,
        resource: Vec<(&'static str, Value)>,
        counts: std::sync::Arc<dyn otlp::SpanCounts>,
    ) -> Result<Tracer, otlp::EndpointError> {
        Ok(Tracer(otlp::Tracer::start(
            endpoint, ratio, resource, counts,
        )?))
    }

    /// Starts a span for a request whose headers are `headers`, if it is sampled, and makes
    /// it the parent the request carries on.
    pub(crate) fn begin(
        &self,
        headers: &mut HeaderMap,
        kind: SpanKind,
        start: SystemTime,
    ) -> Option<RequestSpan> {
        // Only the first traceparent counts; a request with several is read as having one.
        let parent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(SpanContext::from_traceparent);
        let context = self.0.sample(parent.as_ref())?;
        let value = HeaderValue::from_str(&context.traceparent()).ok()?;
        headers.insert(TRACEPARENT, value);
        let trace_state = parent
            .and_then(|_| headers.get(TRACESTATE))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Some(RequestSpan {
            context,
            parent: parent.map(|p| p.span_id),
            trace_state,
            kind,
            start,
        })
    }

    pub(crate) fn end(&self, span: RequestSpan, o: &Outcome<'_>) {
        let mut attributes = vec![
            ("bulkhead.direction", Value::Str(o.direction.into())),
            ("http.request.method", Value::Str(o.method.into())),
            ("url.path", Value::Str(o.path.into())),
            ("server.port", Value::Int(o.port.into())),
            ("http.response.status_code", Value::Int(o.status.into())),
            (
                "bulkhead.verdict",
                Value::Str(
                    if o.decision.is_allow() {
                        "allow"
                    } else {
                        "deny"
                    }
                    .into(),
                ),
            ),
            (
                "bulkhead.revision",
                Value::Int(i64::try_from(o.decision.revision).unwrap_or(i64::MAX)),
            ),
        ];
        if let Some(s) = o.source {
            attributes.push(("bulkhead.source.identity", Value::Str(s.into())));
        }
        if let Some(d) = o.destination {
            attributes.push(("bulkhead.destination.identity", Value::Str(d.into())));
        }
        match &o.decision.reason {
            Reason::Rule { policy, rule, .. } => {
                attributes.push(("bulkhead.policy", Value::Str(policy.to_string())));
                attributes.push(("bulkhead.rule", Value::Str(rule.to_string())));
            }
            Reason::Posture { .. } => {
                attributes.push(("bulkhead.policy", Value::Str("(default posture)".into())));
            }
        }
        if o.decision.would_deny() {
            attributes.push(("bulkhead.audit", Value::Str("would deny".into())));
        }
        let error = if !o.decision.is_allow() {
            Some(format!("denied by the mesh: {}", o.decision))
        } else if o.status >= 500 {
            Some(format!("HTTP {}", o.status))
        } else {
            None
        };
        self.0.export(FinishedSpan {
            context: span.context,
            parent: span.parent,
            trace_state: span.trace_state,
            name: format!("{} {}", o.method, o.direction),
            kind: span.kind,
            start: span.start,
            end: SystemTime::now(),
            attributes,
            error,
        });
    }
}
