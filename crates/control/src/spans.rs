//! The control plane's spans (`bulkhead control --otlp-endpoint`): a server span for every
//! gRPC call but the long-lived streams (configuration and tap streams), a child span for
//! the revision a change commits, and a span per proxy for each pushed revision, from when
//! the proxy's stream takes it to when the proxy acknowledges or refuses it (push latency).
//!
//! The call being served is the parent of what it does: its context is a task-local that
//! `State::change` reads. A push span's parent is the commit span of its revision. Export is
//! `bulkhead_api::otlp`'s: bounded, never waiting, drops counted.

use bulkhead_api::otlp::{FinishedSpan, SpanContext, SpanKind, Tracer, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

tokio::task_local! {
    /// The span of the call being served, if it is traced.
    static CALL: SpanContext;
}

/// The traced call's span, within a call's task.
pub(crate) fn current_call() -> Option<SpanContext> {
    CALL.try_with(|c| *c).ok()
}

/// Streams that stay open for as long as a proxy or an operator watches: a span would
/// measure their whole life, not a call.
fn long_lived(path: &str) -> bool {
    path.starts_with("/bulkhead.v1.Config/Watch")
        || matches!(
            path,
            "/bulkhead.v1.Admin/Tap" | "/bulkhead.v1.Admin/AwaitRevision"
        )
}

/// A span begun now, to end later.
#[derive(Clone, Debug)]
pub(crate) struct Begun {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    pub start: SystemTime,
}

impl Begun {
    pub(crate) fn under(tracer: &Tracer, parent: Option<&SpanContext>) -> Option<Begun> {
        tracer.sample(parent).map(|context| Begun {
            context,
            parent: parent.map(|p| p.span_id),
            start: SystemTime::now(),
        })
    }

    pub(crate) fn end(
        self,
        tracer: &Tracer,
        name: String,
        kind: SpanKind,
        attributes: Vec<(&'static str, Value)>,
        error: Option<String>,
    ) {
        tracer.export(FinishedSpan {
            context: self.context,
            parent: self.parent,
            trace_state: String::new(),
            name,
            kind,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            error,
        });
    }
}

/// Wraps the gRPC server: a span per call.
#[derive(Clone)]
pub(crate) struct CallSpans {
    pub tracer: Option<Arc<Tracer>>,
}

impl<S> tower::Layer<S> for CallSpans {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Traced<S> {
    inner: S,
    tracer: Option<Arc<Tracer>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let begun = match &self.tracer {
            Some(tracer) if !long_lived(&path) => {
                let parent = req
                    .headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .and_then(SpanContext::from_traceparent);
                Begun::under(tracer, parent.as_ref()).map(|b| (tracer.clone(), b))
            }
            _ => None,
        };
        let call = self.inner.call(req);
        let Some((tracer, begun)) = begun else {
            return Box::pin(call);
        };
        Box::pin(async move {
            let result = CALL.scope(begun.context, call).await;
            // tonic answers an error with its status in the response headers; a success
            // carries it in the trailers, after this.
            let code = match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0),
                Err(_) => 2,
            };
            let (service, method) = path
                .trim_start_matches('/')
                .split_once('/')
                .unwrap_or(("", &path));
            let error = (code != 0).then(|| format!("gRPC status {code}"));
            begun.end(
                &tracer,
                path.trim_start_matches('/').to_string(),
                SpanKind::Server,
                vec![
                    ("rpc.system", Value::Str("grpc".into())),
                    ("rpc.service", Value::Str(service.to_string())),
                    ("rpc.method", Value::Str(method.to_string())),
                    ("rpc.grpc.status_code", Value::Int(code)),
                ],
                error,
            );
            result
        })
    }
}

/// Per proxy (identity and workload): the revision pushed and not yet answered, and its span.
type PendingPushes =
    std::collections::HashMap<(String, bulkhead_policy::model::ResourceName), (u64, Begun)>;

/// Revisions pushed to proxies and not yet answered, each with its span. Clones share.
#[derive(Clone, Default)]
pub(crate) struct Pushes {
    open: Arc<std::sync::Mutex<PendingPushes>>,
}

impl Pushes {
    /// A proxy's stream took `revision`, committed under `commit`'s span.
    pub(crate) fn sent(
        &self,
        tracer: &Tracer,
        proxy: &str,
        workload: &bulkhead_policy::model::ResourceName,
        revision: u64,
        commit: Option<&SpanContext>,
    ) {
        let Some(commit) = commit else {
            return;
        };
        if let Some(begun) = Begun::under(tracer, Some(commit)) {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            // At most one pending push per proxy: a newer revision replaces an older one.
            open.insert((proxy.to_string(), workload.clone()), (revision, begun));
        }
    }

    /// The proxy answered `revision`: its push span ends, with the answer.
    pub(crate) fn answered(
        &self,
        tracer: &Tracer,
        proxy: &str,
        workload: &bulkhead_policy::model::ResourceName,
        revision: u64,
        refused: Option<&str>,
    ) {
        let key = (proxy.to_string(), workload.clone());
        let taken = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            match open.get(&key) {
                Some((r, _)) if *r == revision => open.remove(&key),
                _ => None,
            }
        };
        let Some((_, begun)) = taken else {
            return;
        };
        begun.end(
            tracer,
            format!("push revision {revision}"),
            SpanKind::Producer,
            vec![
                (
                    "bulkhead.revision",
                    Value::Int(i64::try_from(revision).unwrap_or(i64::MAX)),
                ),
                ("bulkhead.proxy.identity", Value::Str(proxy.to_string())),
                ("bulkhead.workload", Value::Str(workload.to_string())),
                (
                    "bulkhead.result",
                    Value::Str(if refused.is_some() { "nack" } else { "ack" }.into()),
                ),
            ],
            refused.map(|e| format!("the proxy refused it: {e}")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lived_streams_get_no_call_span() {
        assert!(long_lived("/bulkhead.v1.Config/Watch"));
        assert!(long_lived("/bulkhead.v1.Config/WatchTaps"));
        assert!(long_lived("/bulkhead.v1.Admin/Tap"));
        assert!(!long_lived("/bulkhead.v1.Admin/Apply"));
        assert!(!long_lived("/bulkhead.v1.Identity/Join"));
    }
}
