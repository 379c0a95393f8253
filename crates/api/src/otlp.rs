//! Traces out, as OpenTelemetry's OTLP/gRPC: W3C trace context (`traceparent`), sampling,
//! and an exporter that never slows or fails a request.
//!
//! A span is offered to a bounded queue with `try_send`. When the queue is full the span is
//! dropped and counted. A task sends queued spans in batches (up to [`BATCH`] spans, at
//! least once a second) to the collector's `TraceService/Export`. A batch the collector
//! refuses, or that times out after [`EXPORT_TIMEOUT`], is dropped and counted too. Nothing
//! is retried: a dead collector costs each request one failed `try_send` at most.
//!
//! The endpoint is read as the OpenTelemetry SDKs read it: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! else `OTEL_EXPORTER_OTLP_ENDPOINT`, both `http://host:port` (plaintext gRPC, the usual
//! node-local collector). HTTPS endpoints are refused with a clear error.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Spans waiting to be sent, at most.
pub const QUEUE: usize = 2048;
/// Spans sent in one export, at most.
pub const BATCH: usize = 512;
/// How long one export may take before its spans are dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The W3C trace context of one span: what `traceparent` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl SpanContext {
    /// Reads a `traceparent` header (version 00, or a later version read as 00 says):
    /// `None` when it is malformed or names an all-zero trace or span, as the spec says
    /// a receiver must treat it (start a new trace).
    pub fn from_traceparent(value: &str) -> Option<SpanContext> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex_bytes(trace)?;
        let span_id: [u8; 8] = hex_bytes(span)?;
        let [flags]: [u8; 1] = hex_bytes(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(SpanContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            hex(&self.trace_id),
            hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }

    /// A child of `parent` (same trace), or the root of a new trace.
    pub fn child_of(parent: Option<&SpanContext>) -> SpanContext {
        SpanContext {
            trace_id: parent.map_or_else(new_trace_id, |p| p.trace_id),
            span_id: new_span_id(),
            sampled: true,
        }
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !is_lower_hex(s) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Reads a sampling ratio given on a command line: a number from 0 to 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio between 0 and 1 (e.g. 0.01 for 1%)"
        )),
    }
}

/// Whether a request starts a span: it follows its parent's sampled flag when it has one
/// (parent-based sampling, so a trace is whole or absent), else a trace is sampled with
/// probability `ratio`.
pub fn sampled(parent: Option<&SpanContext>, ratio: f64) -> bool {
    match parent {
        Some(p) => p.sampled,
        None => ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
    Internal,
    Producer,
}

/// One attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// A finished span, ready to export.
#[derive(Clone, Debug)]
pub struct FinishedSpan {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    /// The `tracestate` the request carried, passed on unchanged.
    pub trace_state: String,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// Marks the span an error (a 5xx, or a refusal the mesh made), with a message.
    pub error: Option<String>,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn key_value(key: &str, value: Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(i) => any_value::Value::IntValue(i),
        Value::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

impl FinishedSpan {
    fn into_wire(self) -> Span {
        Span {
            trace_id: self.context.trace_id.to_vec(),
            span_id: self.context.span_id.to_vec(),
            trace_state: self.trace_state,
            parent_span_id: self.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 0x1,
            name: self.name,
            kind: match self.kind {
                SpanKind::Server => span::SpanKind::Server,
                SpanKind::Client => span::SpanKind::Client,
                SpanKind::Internal => span::SpanKind::Internal,
                SpanKind::Producer => span::SpanKind::Producer,
            } as i32,
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(self.end),
            attributes: self
                .attributes
                .into_iter()
                .map(|(k, v)| key_value(k, v))
                .collect(),
            status: Some(match self.error {
                Some(message) => Status {
                    message,
                    code: status::StatusCode::Error as i32,
                },
                None => Status::default(),
            }),
            ..Span::default()
        }
    }
}

/// Why a trace endpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "trace endpoint {0:?} is not http://HOST:PORT; the sidecar sends OTLP over plaintext gRPC to a collector beside it (an OpenTelemetry Collector agent), which may forward it over TLS"
    )]
    NotHttp(String),
    #[error("trace endpoint {0:?} is not a valid address: {1}")]
    Invalid(String, String),
}

/// The endpoint as the OpenTelemetry SDKs find it: the traces variable, then the general
/// one; an empty value counts as unset.
pub fn endpoint_from_env(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|k| get(k).filter(|v| !v.trim().is_empty()))
}

/// Where the exporter counts what it did: spans exported, and spans dropped (queue full,
/// or the collector refused or did not answer).
pub trait SpanCounts: Send + Sync + std::fmt::Debug + 'static {
    fn exported(&self, n: u64);
    fn dropped(&self, n: u64);
}

/// Counts kept in two atomics.
#[derive(Debug, Default)]
pub struct ExportCounts {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
}

impl SpanCounts for ExportCounts {
    fn exported(&self, n: u64) {
        self.exported.fetch_add(n, Ordering::Relaxed);
    }
    fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }
}

/// Sends finished spans to an OTLP collector in the background. Cloning shares the queue.
#[derive(Clone, Debug)]
pub struct Exporter {
    queue: mpsc::Sender<FinishedSpan>,
    counts: Arc<dyn SpanCounts>,
}

impl Exporter {
    /// Starts the exporting task (on the current Tokio runtime) for `endpoint`, naming the
    /// sender with `resource` attributes (`service.name` and the like).
    pub fn start(
        endpoint: &str,
        resource: Vec<(&'static str, Value)>,
        counts: Arc<dyn SpanCounts>,
    ) -> Result<Exporter, EndpointError> {
        if !endpoint.starts_with("http://") {
            return Err(EndpointError::NotHttp(endpoint.to_string()));
        }
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| EndpointError::Invalid(endpoint.to_string(), e.to_string()))?
            .connect_timeout(EXPORT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (queue, mut rx) = mpsc::channel::<FinishedSpan>(QUEUE);
        let task_counts = counts.clone();
        let resource = Resource {
            attributes: resource.into_iter().map(|(k, v)| key_value(k, v)).collect(),
            ..Resource::default()
        };
        let endpoint = endpoint.to_string();
        tokio::spawn(async move {
            let mut client = TraceServiceClient::new(channel);
            let mut batch: Vec<FinishedSpan> = Vec::with_capacity(BATCH);
            let mut warned_at: Option<std::time::Instant> = None;
            loop {
                // Wait for a first span, then take what else is queued, up to a batch, for
                // at most a second.
                match rx.recv().await {
                    Some(span) => batch.push(span),
                    None => return,
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(span)) => batch.push(span),
                        Ok(None) | Err(_) => break,
                    }
                }
                let n = batch.len() as u64;
                let request = ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "bulkhead".into(),
                                version: env!("CARGO_PKG_VERSION").into(),
                                ..InstrumentationScope::default()
                            }),
                            spans: batch.drain(..).map(FinishedSpan::into_wire).collect(),
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    }],
                };
                match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await {
                    Ok(Ok(_)) => {
                        task_counts.exported(n);
                    }
                    failed => {
                        task_counts.dropped(n);
                        // At most one line a minute: a dead collector is one fact.
                        if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            warned_at = Some(std::time::Instant::now());
                            let why = match failed {
                                Ok(Err(status)) => status.message().to_string(),
                                _ => "timed out".to_string(),
                            };
                            tracing::warn!(
                                endpoint,
                                spans = n,
                                error = why,
                                "could not export spans; they are dropped (bulkhead_trace_spans_dropped_total)"
                            );
                        }
                    }
                }
            }
        });
        Ok(Exporter { queue, counts })
    }

    /// Queues a span, or drops and counts it when the queue is full. Never waits.
    pub fn offer(&self, span: FinishedSpan) {
        if self.queue.try_send(span).is_err() {
            self.counts.dropped(1);
        }
    }
}

/// Sampling and export together: what a process that makes spans holds.
#[derive(Debug)]
pub struct Tracer {
    exporter: Exporter,
    /// The probability that work without a sampled parent starts a trace.
    ratio: f64,
}

impl Tracer {
    pub fn start(
        endpoint: &str,
        ratio: f64,
        resource: Vec<(&'static str, Value)>,
        counts: Arc<dyn SpanCounts>,
    ) -> Result<Tracer, EndpointError> {
        Ok(Tracer {
            exporter: Exporter::start(endpoint, resource, counts)?,
            ratio,
        })
    }

    /// The context of a new span under `parent`, if it is sampled (see [`sampled`]).
    pub fn sample(&self, parent: Option<&SpanContext>) -> Option<SpanContext> {
        sampled(parent, self.ratio).then(|| SpanContext::child_of(parent))
    }

    pub fn export(&self, span: FinishedSpan) {
        self.exporter.offer(span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_start_a_new_trace() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = SpanContext::from_traceparent(header).unwrap();
        assert!(ctx.sampled);
        assert_eq!(hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.traceparent(), header);
        let unsampled = SpanContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )
        .unwrap();
        assert!(!unsampled.sampled);
        // A later version may carry more fields.
        assert!(
            SpanContext::from_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
            )
            .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanContext::from_traceparent(bad), None, "{bad}");
        }
        let child = SpanContext::child_of(Some(&ctx));
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
        assert_ne!(SpanContext::child_of(None).trace_id, ctx.trace_id);
    }

    #[test]
    fn sampling_follows_the_parent_and_the_ratio() {
        let parent = |sampled| SpanContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled,
        };
        assert!(sampled(Some(&parent(true)), 0.0));
        assert!(!sampled(Some(&parent(false)), 1.0));
        assert!(sampled(None, 1.0));
        assert!(!sampled(None, 0.0));
        let hits = (0..10_000).filter(|_| sampled(None, 0.1)).count();
        assert!((700..1300).contains(&hits), "{hits}");
    }

    #[test]
    fn endpoints_are_read_as_the_sdks_read_them() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            endpoint_from_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
            ])),
            Some("http://b:4317".into())
        );
        assert_eq!(
            endpoint_from_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", " "),
            ])),
            Some("http://a:4317".into())
        );
        assert_eq!(endpoint_from_env(env(&[])), None);
    }

    #[tokio::test]
    async fn a_dead_collector_drops_and_counts_without_waiting() {
        let counts = Arc::new(ExportCounts::default());
        let exporter = Exporter::start("http://127.0.0.1:9", vec![], counts.clone()).unwrap();
        let span = FinishedSpan {
            context: SpanContext::child_of(None),
            parent: None,
            trace_state: String::new(),
            name: "GET".into(),
            kind: SpanKind::Server,
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: vec![],
            error: None,
        };
        let started = std::time::Instant::now();
        for _ in 0..QUEUE + 10 {
            exporter.offer(span.clone());
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(counts.dropped.load(Ordering::Relaxed) >= 10);
        assert!(matches!(
            Exporter::start("https://collector:4317", vec![], counts),
            Err(EndpointError::NotHttp(_))
        ));
    }
}
